//! `backend-manager`: serve models through leases over gRPC.

use anyhow::Context;
use backend_manager::config::{Args, BackendConfig};
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    securellm_common::telemetry::init("info");
    let args = Args::parse();
    let cfg = BackendConfig::resolve(&args)?;
    let running = backend_manager::start(&cfg)
        .await
        .context("starting backend-manager")?;
    securellm_common::serve::announce_ready("backend-manager", running.addr, None);
    securellm_common::serve::shutdown_signal().await;
    running.shutdown().await;
    Ok(())
}
