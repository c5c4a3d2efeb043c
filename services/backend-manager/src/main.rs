//! `backend-manager`: serve models through leases over gRPC.

use anyhow::Context;
use backend_manager::config::{Args, BackendConfig};
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if let Some(file) = args.check_config.take() {
        args.config = Some(file.clone());
        securellm_common::config::check_and_exit("backend-manager", &file, || {
            BackendConfig::load(&args).map(drop)
        });
    }
    let telemetry: securellm_common::telemetry::TelemetryConfig =
        securellm_common::config::load_section(args.config.as_deref(), "telemetry")?;
    let _telemetry =
        securellm_common::telemetry::init_service("backend-manager", "info", &telemetry)?;
    let cfg = BackendConfig::resolve(&args)?;
    let running = backend_manager::start(&cfg)
        .await
        .context("starting backend-manager")?;
    securellm_common::serve::announce_ready(
        "backend-manager",
        running.addr,
        None,
        running.metrics.as_ref().map(|m| m.addr),
    );
    securellm_common::serve::shutdown_signal().await;
    running.shutdown().await;
    Ok(())
}
