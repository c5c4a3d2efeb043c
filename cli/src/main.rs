//! `securellm`: the command line for the SecureLLM stack.
//!
//! Each subcommand is a thin gRPC client of one service; the addresses default to the loopback
//! ports `make run` uses and can be set by flag or environment.

mod audit;
mod health;
mod keys;
mod models;
mod ps;
mod status;
mod vram;

use clap::{Parser, Subcommand};
use securellm_client::admin::GatewayArgs;
use securellm_client::{ServiceArgs, endpoint};

#[derive(Debug, Parser)]
#[command(
    name = "securellm",
    version,
    about = "SecureLLM: a secure, VRAM-scheduled local LLM stack"
)]
struct Cli {
    #[command(flatten)]
    services: ServiceArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// GPUs (used / leased / foreign / free), the lease table and the queue.
    Vram {
        #[command(subcommand)]
        action: Option<vram::VramAction>,
    },
    /// Write a tiny random-weight llama GGUF that llama-server loads (output is gibberish).
    DemoModel {
        /// Where to write it.
        path: std::path::PathBuf,
        /// The bigger variant (about 45 MB) for memory tests.
        #[arg(long)]
        bigger: bool,
    },
    /// Loaded models: state, GPU, memory, idle time (like `ollama ps`).
    Ps,
    /// Load a model now.
    Load { model: String },
    /// Unload a model (drain, stop, release its lease).
    Unload { model: String },
    /// The tamper-evident logs: the gateway's audit log (one row per request) and the
    /// scheduler's GPU decisions (who got memory, who was evicted for whom): verify both chains,
    /// show the newest rows.
    Audit {
        #[command(subcommand)]
        action: audit::AuditAction,
    },
    /// API keys through the gateway's admin API.
    Keys {
        #[command(flatten)]
        gateway: GatewayArgs,
        #[command(subcommand)]
        action: keys::KeysAction,
    },
    /// The whole stack at a glance: each service up or down, GPUs and leases, loaded models,
    /// requests/s (exit 0 when all four services are up).
    Status {
        /// The gateway's gRPC address [default: the running stack's, else 127.0.0.1:50054].
        #[arg(long, env = "SECURELLM_GATEWAY")]
        gateway: Option<String>,
        /// The gateway's metrics listener, read for requests/s [default: the running stack's,
        /// else 127.0.0.1:9454].
        #[arg(long, env = "SECURELLM_GATEWAY_METRICS")]
        gateway_metrics: Option<String>,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// gRPC health check of a service (exit 0 when SERVING), for container healthchecks.
    Health {
        /// HOST:PORT of the service.
        addr: String,
        /// A service name (e.g. securellm.v1.VramScheduler); empty = the server as a whole.
        #[arg(long, default_value = "")]
        service: String,
    },
    /// Models the registry found: table, details, rescan.
    Models {
        #[command(subcommand)]
        action: Option<models::ModelsAction>,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Vram { action } => {
            let token = cli.services.internal_token()?;
            vram::run(&endpoint(&cli.services.scheduler()), &token, action).await
        }
        Command::DemoModel { path, bigger } => {
            use securellm_gguf::testmodels::{TinyLlamaOptions, write_tiny_llama};
            let opts = if bigger {
                TinyLlamaOptions::bigger()
            } else {
                TinyLlamaOptions::default()
            };
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            let n = write_tiny_llama(&path, &opts)?;
            println!(
                "wrote {} ({})",
                path.display(),
                securellm_common::format_bytes(n)
            );
            Ok(())
        }
        Command::Audit { action } => audit::run(&cli.services.data_dir(), action).await,
        Command::Keys { gateway, action } => {
            let token_file = gateway.admin_token_path(&cli.services.data_dir());
            keys::run(&endpoint(&gateway.gateway()), Some(token_file), action).await
        }
        Command::Status {
            gateway,
            gateway_metrics,
            json,
        } => {
            // Without the internal token the services still answer health checks; what needs
            // the token is reported as refused.
            let addrs = status::Addresses {
                internal_token: cli.services.internal_token().ok(),
                scheduler: cli.services.scheduler(),
                registry: cli.services.registry(),
                backend: cli.services.backend(),
                gateway: GatewayArgs {
                    gateway,
                    admin_token_file: None,
                }
                .gateway(),
                gateway_metrics: status::gateway_metrics_addr(gateway_metrics.as_deref()),
            };
            if !status::run(&addrs, json).await? {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Health { addr, service } => health::run(&endpoint(&addr), &service).await,
        Command::Ps => {
            let token = cli.services.internal_token()?;
            ps::ps(&endpoint(&cli.services.backend()), &token).await
        }
        Command::Load { model } => {
            let token = cli.services.internal_token()?;
            ps::load(&endpoint(&cli.services.backend()), &token, &model).await
        }
        Command::Unload { model } => {
            let token = cli.services.internal_token()?;
            ps::unload(&endpoint(&cli.services.backend()), &token, &model).await
        }
        Command::Models { action } => {
            let token = cli.services.internal_token()?;
            models::run(&endpoint(&cli.services.registry()), &token, action).await
        }
    }
}
