//! `vram-scheduler`: serve the GPU memory authority over gRPC.

use anyhow::Context;
use clap::Parser;
use vram_scheduler::config::{Args, SchedulerConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if let Some(file) = args.check_config.take() {
        args.config = Some(file.clone());
        securellm_common::config::check_and_exit("vram-scheduler", &file, || {
            SchedulerConfig::load(&args).map(drop)
        });
    }
    let telemetry: securellm_common::telemetry::TelemetryConfig =
        securellm_common::config::load_section(args.config.as_deref(), "telemetry")?;
    let _telemetry =
        securellm_common::telemetry::init_service("vram-scheduler", "info", &telemetry)?;
    let cfg = SchedulerConfig::resolve(&args)?;
    let running = vram_scheduler::start(&cfg)
        .await
        .context("starting vram-scheduler")?;
    securellm_common::serve::announce_ready(
        "vram-scheduler",
        running.addr,
        None,
        running.metrics.as_ref().map(|m| m.addr),
    );
    tracing::info!(
        inventory = running.inventory,
        "vram-scheduler listening on {}",
        running.addr
    );
    securellm_common::serve::shutdown_signal().await;
    running.shutdown().await;
    Ok(())
}
