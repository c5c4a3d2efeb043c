//! `securellm keys create|list|revoke`: API keys through the gateway's admin gRPC service.
//!
//! The admin token: `$SECURELLM_ADMIN_TOKEN`, else `--admin-token-file` (default
//! `<data dir>/gateway/admin-token`, which the gateway writes on first start; see
//! `securellm_client::admin`).

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use securellm_client::admin::{admin_client, token};
use securellm_proto::v1 as pb;

#[derive(Debug, Subcommand)]
pub enum KeysAction {
    /// Create a key; its secret is printed once.
    Create {
        #[arg(long)]
        name: String,
        /// Model patterns (`*` wildcards), repeatable or comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "*")]
        models: Vec<String>,
        /// Requests per minute (0 = unlimited).
        #[arg(long)]
        rpm: Option<u32>,
        /// Tokens per minute (0 = unlimited).
        #[arg(long)]
        tpm: Option<u64>,
        /// Requests in flight at once.
        #[arg(long)]
        concurrent: Option<u32>,
        /// The largest `max_tokens` a request may ask for (below the gateway's cap).
        #[arg(long)]
        max_tokens: Option<u32>,
        /// Priority of the model loads this key triggers (-1000..=1000; default: the model's).
        /// A key never evicts the model of a key with a higher priority; e.g. 10 interactive,
        /// -10 batch.
        #[arg(long, allow_hyphen_values = true)]
        priority: Option<i32>,
    },
    /// Key records (never secrets).
    List {
        /// Also revoked and expired keys.
        #[arg(long)]
        all: bool,
    },
    /// Revoke a key by id.
    Revoke { id: String },
}

pub async fn run(
    endpoint: &str,
    token_file: Option<PathBuf>,
    action: KeysAction,
) -> anyhow::Result<()> {
    let token = token(token_file)?;
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())?
        .connect()
        .await
        .with_context(|| format!("cannot reach the gateway at {endpoint}"))?;
    let mut c = admin_client(channel, &token)?;
    let msg = |s: tonic::Status| anyhow::anyhow!("{}", s.message());
    match action {
        KeysAction::Create {
            name,
            models,
            rpm,
            tpm,
            concurrent,
            max_tokens,
            priority,
        } => {
            let r = c
                .create_api_key(pb::CreateApiKeyRequest {
                    name,
                    models: Some(pb::ApiKeyModelPatterns { patterns: models }),
                    limits: Some(pb::ApiKeyLimits {
                        requests_per_minute: rpm,
                        tokens_per_minute: tpm,
                        max_concurrent: concurrent,
                        max_tokens,
                    }),
                    expires_at_ms: None,
                    subject: String::new(),
                    priority,
                })
                .await
                .map_err(msg)?
                .into_inner();
            let k = r.key.unwrap_or_default();
            println!("{}", r.secret);
            eprintln!(
                "created {} ({}); the secret above is shown only once",
                k.id, k.name
            );
        }
        KeysAction::List { all } => {
            let r = c
                .list_api_keys(pb::ListApiKeysRequest {
                    include_inactive: all,
                })
                .await
                .map_err(msg)?
                .into_inner();
            println!(
                "{:<18} {:<16} {:<16} {:<9} {:<24} {:>6} {:>8} {:>5}",
                "ID", "NAME", "PREFIX", "STATE", "MODELS", "RPM", "TPM", "PRIO"
            );
            for k in r.keys {
                let l = k.limits.unwrap_or_default();
                let state = match pb::ApiKeyState::try_from(k.state) {
                    Ok(pb::ApiKeyState::Active) => "active",
                    Ok(pb::ApiKeyState::Revoked) => "revoked",
                    Ok(pb::ApiKeyState::Expired) => "expired",
                    _ => "?",
                };
                println!(
                    "{:<18} {:<16} {:<16} {:<9} {:<24} {:>6} {:>8} {:>5}",
                    k.id,
                    k.name,
                    k.secret_prefix,
                    state,
                    k.models.map(|m| m.patterns.join(",")).unwrap_or_default(),
                    l.requests_per_minute.map_or("-".into(), |v| v.to_string()),
                    l.tokens_per_minute.map_or("-".into(), |v| v.to_string()),
                    k.priority.map_or("-".into(), |v| v.to_string())
                );
            }
        }
        KeysAction::Revoke { id } => {
            let k = c
                .revoke_api_key(pb::RevokeApiKeyRequest { id })
                .await
                .map_err(msg)?
                .into_inner();
            println!("revoked {} ({})", k.id, k.name);
        }
    }
    Ok(())
}
