//! The gateway's admin API (`GatewayAdmin` on its gRPC port): where it is, the admin token, and a
//! client that sends the token with every call (`securellm keys` / `status`, the MCP
//! `audit_verify` tool).
//!
//! The admin token: `$SECURELLM_ADMIN_TOKEN`, else `--admin-token-file` (default
//! `<data dir>/gateway/admin-token`, which the gateway writes on first start).

use std::path::{Path, PathBuf};

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
    /// The gateway's gRPC address [default: the running stack's, else 127.0.0.1:50054].
    #[arg(long, env = "SECURELLM_GATEWAY")]
    pub gateway: Option<String>,
    /// The admin token file [default: <data dir>/gateway/admin-token].
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
}

impl GatewayArgs {
    /// The gateway's gRPC address: the flag, else the running stack's, else the default.
    pub fn gateway(&self) -> String {
        crate::flag_stack_default(&self.gateway, crate::stack::GATEWAY, DEFAULT_GATEWAY)
    }

    /// The admin token file: the flag, else the one in the stack's data directory `data_dir`.
    pub fn admin_token_path(&self, data_dir: &Path) -> PathBuf {
        self.admin_token_file
            .clone()
            .unwrap_or_else(|| crate::gateway_file(data_dir, "admin-token"))
    }
}

/// The admin token: `$SECURELLM_ADMIN_TOKEN`, else the file (default
/// `<data dir>/gateway/admin-token`, the data dir as [`crate::data_dir`] finds it).
pub fn token(file: Option<PathBuf>) -> anyhow::Result<String> {
    if let Ok(t) = std::env::var("SECURELLM_ADMIN_TOKEN")
        && !t.is_empty()
    {
        return Ok(t);
    }
    let path = file.unwrap_or_else(|| crate::gateway_file(&crate::data_dir(None), "admin-token"));
    let t = std::fs::read_to_string(&path)
        .with_context(|| {
            format!(
                "cannot read the admin token {} (set --data-dir, --admin-token-file or SECURELLM_ADMIN_TOKEN)",
                path.display()
            )
        })?
        .trim()
        .to_string();
    anyhow::ensure!(
        !t.is_empty(),
        "the admin token file {} is empty",
        path.display()
    );
    Ok(t)
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
