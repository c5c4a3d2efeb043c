//! Backends: the engines that serve a model, behind one trait. One file each; adding one touches
//! its file and a registration line in `config.rs`.
//!
//! - [`llamacpp`]: spawns a real `llama-server` (tested for real).
//!
//! Every backend speaks an OpenAI-compatible HTTP API once started; forwarding is shared
//! (`forward.rs`).

pub mod llamacpp;

use std::path::PathBuf;
use std::time::Duration;

use crate::process::Supervised;

/// What to start: the model, where, and how.
#[derive(Clone, Debug)]
pub struct StartSpec {
    pub model_path: PathBuf,
    /// The name the upstream serves the model under (the registry name).
    pub alias: String,
    /// Context per slot, in tokens.
    pub context: u64,
    pub parallel: u32,
    /// `f16`, `q8_0`, `q4_0`.
    pub cache_type: &'static str,
    /// `None` = all layers.
    pub gpu_layers: Option<u32>,
    pub embeddings: bool,
    pub flash_attention: Option<bool>,
    /// The leased GPU, `None` when the GPU is simulated (run on the CPU).
    pub gpu: Option<u32>,
    /// Bytes of the lease (engines that take a memory budget get it).
    pub lease_bytes: u64,
    /// Give up if not healthy within this.
    pub start_timeout: Duration,
}

/// A started backend.
pub struct Started {
    /// Base URL of its OpenAI-compatible API, e.g. `http://127.0.0.1:41234`.
    pub endpoint: String,
    pub port: u16,
    /// The child, when the manager spawned one.
    pub process: Option<Supervised>,
    /// Memory the engine says it allocated (bytes), when it says.
    pub measured: Option<Measured>,
}

/// Buffer sizes an engine reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Measured {
    pub model: u64,
    pub kv: u64,
    pub compute: u64,
    pub output: u64,
}

impl Measured {
    pub fn total(&self) -> u64 {
        self.model + self.kv + self.compute + self.output
    }
}

/// A start that failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    #[error("cannot start {program}: {reason}")]
    Spawn { program: String, reason: String },
    #[error("the backend exited during start ({exit}); last output:\n{tail}")]
    ExitedDuringStart { exit: String, tail: String },
    #[error("the backend was not ready within {secs} s; last output:\n{tail}")]
    Timeout { secs: u64, tail: String },
    #[error("the backend stalled: no output for {secs} s during start; last output:\n{tail}")]
    Stalled { secs: u64, tail: String },
}

/// An engine that can serve a model.
#[tonic::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// "llama.cpp", "ollama", ...
    fn name(&self) -> &'static str;
    /// Start serving `spec`; returns once the upstream answers health checks.
    async fn start(&self, spec: &StartSpec) -> Result<Started, BackendError>;
}
