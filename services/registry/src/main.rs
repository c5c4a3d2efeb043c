//! `registry`: serve the model catalogue over gRPC.

use anyhow::Context;
use clap::Parser;
use registry::config::{Args, RegistryConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if let Some(file) = args.check_config.take() {
        args.config = Some(file.clone());
        securellm_common::config::check_and_exit("registry", &file, || {
            RegistryConfig::load(&args).map(drop)
        });
    }
    let telemetry: securellm_common::telemetry::TelemetryConfig =
        securellm_common::config::load_section(args.config.as_deref(), "telemetry")?;
    let _telemetry = securellm_common::telemetry::init_service("registry", "info", &telemetry)?;
    let cfg = RegistryConfig::resolve(&args)?;
    let running = registry::start(&cfg).await.context("starting registry")?;
    securellm_common::serve::announce_ready(
        "registry",
        running.addr,
        None,
        running.metrics.as_ref().map(|m| m.addr),
    );
    securellm_common::serve::shutdown_signal().await;
    running.shutdown().await;
    Ok(())
}
