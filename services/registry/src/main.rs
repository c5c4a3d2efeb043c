//! `registry`: serve the model catalogue over gRPC.

use anyhow::Context;
use clap::Parser;
use registry::config::{Args, RegistryConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    securellm_common::telemetry::init("info");
    let args = Args::parse();
    let cfg = RegistryConfig::resolve(&args)?;
    let running = registry::start(&cfg).await.context("starting registry")?;
    securellm_common::serve::announce_ready("registry", running.addr, None);
    securellm_common::serve::shutdown_signal().await;
    running.shutdown().await;
    Ok(())
}
