//! The gateway's admin API (`GatewayAdmin` on its gRPC port): where it is, the admin token, and a
//! client that sends the token with every call (`securellm keys` / `status`, the MCP
//! `audit_verify` tool).
//!
//! The admin token: `$SECURELLM_ADMIN_TOKEN`, else `--admin-token-file` (default
//! `<data dir>/gateway/admin-token`, which the gateway writes on first start).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use securellm_proto::v1::gateway_admin_client::GatewayAdminClient;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::DEFAULT_GATEWAY;

/// Where the gateway's admin API is and how to authenticate to it.
#[derive(Debug, Clone, Args)]
pub struct GatewayArgs {
    /// The gateway's gRPC address.
    #[arg(long, env = "SECURELLM_GATEWAY", default_value = DEFAULT_GATEWAY)]
    pub gateway: String,
    /// The admin token file (default <data dir>/gateway/admin-token).
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
}

/// The admin token: `$SECURELLM_ADMIN_TOKEN`, else the file (default
/// `<data dir>/gateway/admin-token`, the data dir being `$SECURELLM_DATA_DIR` when set).
pub fn token(file: Option<PathBuf>) -> anyhow::Result<String> {
    if let Ok(t) = std::env::var("SECURELLM_ADMIN_TOKEN")
        && !t.is_empty()
    {
        return Ok(t);
    }
    // The stack's data directory: `$SECURELLM_DATA_DIR` (as `make run` uses it), else the default.
    let path = file.unwrap_or_else(|| {
        std::env::var_os("SECURELLM_DATA_DIR")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(securellm_common::config::default_data_dir)
            .join("gateway/admin-token")
    });
    Ok(std::fs::read_to_string(&path)
        .with_context(|| {
            format!(
                "cannot read the admin token {} (set --admin-token-file or SECURELLM_ADMIN_TOKEN)",
                path.display()
            )
        })?
        .trim()
        .to_string())
}

/// A GatewayAdmin client that sends `authorization: Bearer <token>` with every call.
pub fn admin_client(
    channel: Channel,
    token: &str,
) -> anyhow::Result<GatewayAdminClient<InterceptedService<Channel, impl Interceptor + use<>>>> {
    let auth: MetadataValue<_> = format!("Bearer {token}")
        .parse()
        .context("the admin token is not a valid header value")?;
    Ok(GatewayAdminClient::with_interceptor(
        channel,
        move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", auth.clone());
            Ok(r)
        },
    ))
}
