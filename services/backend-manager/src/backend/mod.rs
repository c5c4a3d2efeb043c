//! Backends: the engines that serve a model, behind one trait. One file each; adding one touches
//! its file, its `[backend.<name>]` section in `config.rs` and the choice by model format in
//! `manager.rs`.
//!
//! - [`llamacpp`]: spawns a real `llama-server` (tested for real).
//! - [`ollama`]: drives a running Ollama daemon through its HTTP API.
//! - [`vllm`], [`tgi`]: spawn the configured command (or attach to an endpoint) with a memory
//!   fraction equal to lease / GPU total; [`engine`] holds what the two share.
//!
//! Ollama, vLLM and TGI are tested against fakes that speak their HTTP API and accept their command
//! lines (`tests/fakes/`), not against the real engines.
//!
//! Every backend speaks an OpenAI-compatible HTTP API once started; forwarding is shared
//! (`forward.rs`).
//!
//! Nobody but the manager may talk to an engine the manager spawns (that would walk around the
//! gateway's keys, limits and audit): each spawned engine gets a random API key of its own
//! ([`new_api_key`]), passed in its environment (never on its command line, which every local
//! user can read) and sent by the manager as `Authorization: Bearer` with every request.

pub mod engine;
pub mod llamacpp;
pub mod ollama;
pub mod tgi;
pub mod vllm;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use securellm_proto::v1 as pb;

use crate::process::Supervised;

/// What to start: the model, where, and how.
#[derive(Clone, Debug)]
pub struct StartSpec {
    /// The GGUF file (first part of a split model, or an Ollama blob), or the safetensors folder.
    pub model_path: PathBuf,
    /// The name the engine serves the model under: llama.cpp `--alias` and vLLM
    /// `--served-model-name` (the registry name), Ollama's `name:tag`.
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
    /// Total bytes of the leased GPU (for engines that take a fraction of it); 0 = unknown.
    pub gpu_total: u64,
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
    /// The `model` to put in request bodies (what the engine answers to).
    pub served_name: String,
    /// The API key the engine requires (`Authorization: Bearer`), when the manager gave it one.
    pub api_key: Option<Arc<str>>,
}

/// A fresh random API key for one engine instance (256 bits, hex).
pub fn new_api_key() -> Arc<str> {
    securellm_common::internal_auth::random_hex(32).into()
}

/// Memory an engine reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Measured {
    pub model: u64,
    pub kv: u64,
    pub compute: u64,
    pub output: u64,
    /// The engine reported one total (in `model`), not a breakdown by buffer (Ollama's
    /// `size_vram`): the registry gets it as the GPU memory used, not as per-term sizes.
    pub total_only: bool,
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
    #[error("{what} at {url} is unreachable: {reason}")]
    Unreachable {
        what: &'static str,
        url: String,
        reason: String,
    },
    #[error("{what} at {url} does not have model {model:?}: {detail}")]
    ModelNotFound {
        what: &'static str,
        url: String,
        model: String,
        detail: String,
    },
    #[error("{what} at {url} answered HTTP {status}: {body}")]
    Upstream {
        what: &'static str,
        url: String,
        status: u16,
        body: String,
    },
    #[error("{0}")]
    Config(String),
}

/// An engine that can serve a model.
#[tonic::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// "llama.cpp", "ollama", ...
    fn name(&self) -> &'static str;
    /// What `ListInstances` reports.
    fn kind(&self) -> pb::BackendKind;
    /// Start serving `spec`; returns once the upstream answers health checks.
    async fn start(&self, spec: &StartSpec) -> Result<Started, BackendError>;
    /// Stop serving what `start` started; returns once its memory is given back (the child
    /// exited). The default stops the child (SIGTERM, SIGKILL after `grace`), if there is one.
    async fn stop(&self, started: &Started, grace: Duration) {
        if let Some(p) = &started.process {
            p.stop(grace).await;
        }
    }
}

/// The backends the manager was configured with; each instance gets one at creation, chosen by the
/// model's format (`Manager::backend_for`).
#[derive(Clone)]
pub struct Backends {
    pub llamacpp: Arc<dyn Backend>,
    /// `[backend.ollama]`
    pub ollama: Option<Arc<dyn Backend>>,
    /// `[backend.vllm]`
    pub vllm: Option<Arc<dyn Backend>>,
    /// `[backend.tgi]`
    pub tgi: Option<Arc<dyn Backend>>,
}

impl Backends {
    /// From `[backend]`: llama.cpp always; Ollama, vLLM, TGI when their section is present.
    pub fn from_config(cfg: &crate::config::BackendConfig, http: &reqwest::Client) -> Self {
        Self {
            llamacpp: Arc::new(llamacpp::LlamaCpp {
                binary: cfg.llama_server_path(),
                threads: cfg.threads,
                stall_timeout: Duration::from_millis(cfg.stall_timeout_ms),
                http: http.clone(),
            }),
            ollama: cfg.ollama.as_ref().map(|o| {
                Arc::new(ollama::Ollama {
                    url: o.url.clone(),
                    http: http.clone(),
                }) as Arc<dyn Backend>
            }),
            vllm: cfg.vllm.as_ref().map(|e| {
                Arc::new(vllm::Vllm {
                    cfg: e.clone(),
                    http: http.clone(),
                }) as Arc<dyn Backend>
            }),
            tgi: cfg.tgi.as_ref().map(|e| {
                Arc::new(tgi::Tgi {
                    cfg: e.clone(),
                    http: http.clone(),
                }) as Arc<dyn Backend>
            }),
        }
    }
}

/// `http://host:port/...` → port (80 / 443 when absent).
pub fn url_port(url: &str) -> u16 {
    let (rest, default) = match url.strip_prefix("https://") {
        Some(r) => (r, 443),
        None => (url.strip_prefix("http://").unwrap_or(url), 80),
    };
    let hostport = rest.split('/').next().unwrap_or("");
    // `[::1]:8080`: the port follows the closing bracket.
    let after_host = hostport.rsplit_once(']').map_or(hostport, |(_, p)| p);
    after_host
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(default)
}

/// `url` without trailing slashes.
pub fn base_url(url: &str) -> String {
    url.trim_end_matches('/').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_from_urls() {
        assert_eq!(url_port("http://127.0.0.1:11434"), 11434);
        assert_eq!(url_port("http://127.0.0.1:11434/"), 11434);
        assert_eq!(url_port("http://localhost"), 80);
        assert_eq!(url_port("https://ollama.example/api"), 443);
        assert_eq!(url_port("http://[::1]:8000/x"), 8000);
        assert_eq!(url_port("http://[::1]"), 80);
        assert_eq!(base_url("http://h:1//"), "http://h:1");
    }
}
