//! `vram-scheduler`: serve the GPU memory authority over gRPC.

use anyhow::Context;
use clap::Parser;
use vram_scheduler::config::{Args, SchedulerConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    securellm_common::telemetry::init("info");
    let args = Args::parse();
    let cfg = SchedulerConfig::resolve(&args)?;
    let running = vram_scheduler::start(&cfg)
        .await
        .context("starting vram-scheduler")?;
    securellm_common::serve::announce_ready("vram-scheduler", running.addr, None);
    tracing::info!(
        inventory = running.inventory,
        "vram-scheduler listening on {}",
        running.addr
    );
    securellm_common::serve::shutdown_signal().await;
    running.shutdown().await;
    Ok(())
}
