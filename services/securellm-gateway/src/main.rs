//! `securellm-gateway`: the OpenAI-compatible door to the local stack.

use anyhow::Context;
use clap::Parser;
use securellm_gateway::config::{Args, GatewayConfig};

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if let Some(file) = args.check_config.take() {
        args.config = Some(file.clone());
        securellm_common::config::check_and_exit("securellm-gateway", &file, || {
            GatewayConfig::load(&args).map(drop)
        });
    }
    let telemetry: securellm_common::telemetry::TelemetryConfig =
        securellm_common::config::load_section(args.config.as_deref(), "telemetry")?;
    let _telemetry =
        securellm_common::telemetry::init_service("securellm-gateway", "info", &telemetry)?;
    let cfg = GatewayConfig::resolve(&args)?;
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if cfg.worker_threads > 0 {
        rt.worker_threads(cfg.worker_threads as usize);
    }
    rt.build()
        .context("starting the async runtime")?
        .block_on(async {
            let running = securellm_gateway::start(&cfg)
                .await
                .context("starting securellm-gateway")?;
            securellm_common::serve::announce_ready(
                "securellm-gateway",
                running.grpc_addr,
                Some(running.http_addr),
                running.metrics.as_ref().map(|m| m.addr),
            );
            securellm_common::serve::shutdown_signal().await;
            running.shutdown().await;
            Ok(())
        })
}
