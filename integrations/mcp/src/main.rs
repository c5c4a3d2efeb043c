//! `securellm-mcp`: the SecureLLM MCP server. Over stdio by default (what assistants launch);
//! `--http 127.0.0.1:PORT` serves streamable HTTP at `/mcp` instead and prints
//! `ready securellm-mcp http=ADDR` on stdout when it listens. Logs go to stderr (stdout is the
//! protocol channel in stdio mode).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use rmcp::ServiceExt;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use securellm_client::ServiceArgs;
use securellm_client::admin::GatewayArgs;
use securellm_mcp::{Config, SecureLlmMcp};

#[derive(Debug, Parser)]
#[command(
    name = "securellm-mcp",
    version,
    about = "The SecureLLM MCP server: VRAM, models, load/unload, chat through the gateway, audit"
)]
struct Args {
    #[command(flatten)]
    services: ServiceArgs,
    #[command(flatten)]
    gateway: GatewayArgs,
    /// The gateway's OpenAI HTTP API (HOST:PORT or a base URL), used by the `chat` tool
    /// [default: the running stack's, else 127.0.0.1:8088].
    #[arg(long, env = "SECURELLM_GATEWAY_HTTP")]
    gateway_http: Option<String>,
    /// The file holding the gateway API key for `chat` (default: $SECURELLM_API_KEY, else
    /// <data dir>/api-key).
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// Serve streamable HTTP at http://ADDR/mcp (a loopback address) instead of stdio.
    #[arg(long, value_name = "ADDR")]
    http: Option<SocketAddr>,
    /// The limit of a status or catalogue call, in milliseconds.
    #[arg(long, default_value_t = 5_000)]
    timeout_ms: u64,
    /// The limit of load_model, unload_model and chat, in milliseconds.
    #[arg(long, default_value_t = 120_000)]
    long_timeout_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    securellm_common::telemetry::init("warn,securellm_mcp=info");
    securellm_common::tls::install_crypto_provider();
    let internal_token_file = Some(args.services.internal_token_path());
    let data_dir = args.services.data_dir();
    let cfg = Config {
        scheduler: args.services.scheduler(),
        registry: args.services.registry(),
        backend: args.services.backend(),
        gateway: args.gateway.gateway(),
        gateway_http: args.gateway_http.unwrap_or_else(|| {
            securellm_client::stack::get(securellm_client::stack::GATEWAY_HTTP)
                .unwrap_or_else(|| securellm_client::DEFAULT_GATEWAY_HTTP.to_string())
        }),
        api_key_file: args
            .api_key_file
            .or_else(|| args.services.data_dir.as_ref().map(|d| d.join("api-key"))),
        admin_token_file: Some(args.gateway.admin_token_path(&data_dir)),
        internal_token_file,
        timeout: Duration::from_millis(args.timeout_ms.max(1)),
        long_timeout: Duration::from_millis(args.long_timeout_ms.max(1)),
    };
    let server = SecureLlmMcp::new(cfg)?;
    match args.http {
        None => serve_stdio(server).await,
        Some(addr) => serve_http(server, addr).await,
    }
}

/// Serve one session on stdin/stdout until the client closes stdin (or a signal).
async fn serve_stdio(server: SecureLlmMcp) -> anyhow::Result<()> {
    let running = server
        .serve(rmcp::transport::stdio())
        .await
        .context("MCP initialization over stdio failed")?;
    tokio::select! {
        r = running.waiting() => {
            r.context("the stdio session ended with an error")?;
        }
        () = securellm_common::serve::shutdown_signal() => {
            // A pending read on stdin cannot be cancelled: leave without waiting for it.
            std::process::exit(0);
        }
    }
    Ok(())
}

/// Streamable HTTP at `/mcp` on a loopback address: the endpoint has no authentication of its
/// own (it acts with the configured API key and admin token), so it is never exposed further.
async fn serve_http(server: SecureLlmMcp, addr: SocketAddr) -> anyhow::Result<()> {
    anyhow::ensure!(
        addr.ip().is_loopback(),
        "--http {addr}: only a loopback address is allowed (the MCP endpoint has no \
         authentication of its own and acts with the configured API key and admin token)"
    );
    let config = StreamableHttpServerConfig::default();
    let cancel = config.cancellation_token.clone();
    let service = StreamableHttpService::new(
        move || Ok(server.clone()),
        Arc::new(LocalSessionManager::default()),
        config,
    );
    let app = axum::Router::new().nest_service("/mcp", service);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "ready securellm-mcp http={local}");
        let _ = out.flush();
    }
    tracing::info!("MCP streamable HTTP at http://{local}/mcp");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            securellm_common::serve::shutdown_signal().await;
            cancel.cancel();
        })
        .await?;
    Ok(())
}
