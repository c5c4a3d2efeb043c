//! `securellm`: the command line for the SecureLLM stack.
//!
//! Each subcommand is a thin gRPC client of one service; the addresses default to the loopback
//! ports `make run` uses and can be set by flag or environment.

mod vram;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "securellm",
    version,
    about = "SecureLLM: a secure, VRAM-scheduled local LLM stack"
)]
struct Cli {
    /// The vram-scheduler's gRPC address.
    #[arg(
        long,
        global = true,
        env = "SECURELLM_SCHEDULER",
        default_value = "127.0.0.1:50051"
    )]
    scheduler: String,
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
}

fn endpoint(addr: &str) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Vram { action } => vram::run(&endpoint(&cli.scheduler), action).await,
    }
}
