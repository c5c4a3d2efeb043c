//! `securellm-bench`: benchmark programs. Each one measures a baseline in the same run and prints
//! a ratio; the last line is `RESULT key=value ...` with plain numbers (latencies in
//! microseconds `_us`, rates `_per_s`, ratios `_x`).

mod backend;
mod estimate;
mod gateway;
mod placement;
mod registry;
mod scheduler;
mod stats;
mod storage;
mod swap;
mod telemetry;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "securellm-bench",
    version,
    about = "SecureLLM benchmark programs"
)]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Lease acquire+release round trips over gRPC on loopback vs the in-process actor.
    Scheduler(scheduler::Args),
    /// Registry scan: cold scan and unchanged rescan of 1,000 GGUF files vs Python's gguf reader.
    Registry(registry::Args),
    /// Memory-estimate accuracy: the registry's estimate vs the buffer sizes the real
    /// llama-server logs, over several tiny models and configurations.
    Estimate(estimate::Args),
    /// Backend manager overhead: request latency via the manager vs direct to llama-server, and
    /// cold start vs a raw llama-server start.
    Backend(backend::Args),
    /// Gateway overhead vs a direct mock OpenAI upstream, RSS, streaming time to first byte.
    Gateway(gateway::Args),
    /// Model swaps on a full GPU through the gateway vs llama.cpp's router mode and a raw cold
    /// start.
    Swap(swap::Args),
    /// What metrics and OTLP trace export cost the gateway: bare vs metrics vs export on, beside
    /// nginx, interleaved runs at concurrency 64.
    Telemetry(telemetry::Args),
    /// Keys and rate limits in PostgreSQL (one transaction per admission) vs in the gateway
    /// (SQLite + memory), and two gateways sharing the database.
    Storage(storage::Args),
    /// The gateway's placement decision over 16 GPU nodes vs over one (in process).
    Placement(placement::Args),
}

fn main() -> anyhow::Result<()> {
    securellm_common::telemetry::init("warn");
    securellm_common::tls::install_crypto_provider();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.bench {
        Bench::Scheduler(a) => rt.block_on(scheduler::run(a)),
        Bench::Registry(a) => rt.block_on(registry::run(a)),
        Bench::Estimate(a) => estimate::run(a),
        Bench::Backend(a) => rt.block_on(backend::run(a)),
        Bench::Gateway(a) => rt.block_on(gateway::run(a)),
        Bench::Swap(a) => rt.block_on(swap::run(a)),
        Bench::Telemetry(a) => rt.block_on(telemetry::run(a)),
        Bench::Storage(a) => rt.block_on(storage::run(a)),
        Bench::Placement(a) => placement::run(a),
    }
}
