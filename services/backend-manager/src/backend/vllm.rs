//! vLLM: one `vllm serve` child per instance (or an attached server), OpenAI-compatible API.
//!
//! Started as `<command> <model folder> --host 127.0.0.1 --port P --served-model-name NAME
//! --max-model-len CONTEXT --max-num-seqs PARALLEL --gpu-memory-utilization F` with `F` = lease /
//! GPU total (rounded down to 4 decimals, clamped to 0.01..=0.99), so vLLM's whole footprint
//! (weights, activations, KV cache) stays inside the lease. `CUDA_VISIBLE_DEVICES` pins it to the
//! leased GPU. Ready when `GET /health` answers 200. vLLM prints no buffer sizes the manager could
//! parse: the lease stays at the estimate. A random per-instance API key goes in `VLLM_API_KEY`
//! (vLLM's `--api-key`); vLLM checks it only under `/v1` (other routes of its, e.g. `/tokenize`,
//! stay open on the loopback port).
//!
//! With `endpoint` set, nothing is spawned: the manager waits for the server's `/health` and
//! forwards to it (its memory is whatever it was started with).
//!
//! Not run for real here: tested against `tests/fakes/fake_openai_engine.py`, which accepts vLLM's
//! command line and speaks its HTTP API.

use securellm_proto::v1 as pb;

use super::engine::{self, free_port, memory_fraction};
use super::{Backend, BackendError, StartSpec, Started};
use crate::config::EngineConfig;

/// The vLLM backend (`[backend.vllm]`).
pub struct Vllm {
    pub cfg: EngineConfig,
    pub http: reqwest::Client,
}

impl Vllm {
    /// Used when `[backend.vllm]` has no `command`.
    pub const DEFAULT_COMMAND: &'static [&'static str] = &["vllm", "serve"];
    /// vLLM reads `--api-key` from this variable.
    pub const API_KEY_ENV: &'static str = "VLLM_API_KEY";

    /// The arguments after the configured command.
    pub fn args(spec: &StartSpec, port: u16, fraction: &str) -> Vec<String> {
        vec![
            spec.model_path.display().to_string(),
            "--host".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
            "--served-model-name".into(),
            spec.alias.clone(),
            "--max-model-len".into(),
            spec.context.to_string(),
            "--max-num-seqs".into(),
            spec.parallel.to_string(),
            "--gpu-memory-utilization".into(),
            fraction.to_string(),
        ]
    }
}

#[tonic::async_trait]
impl Backend for Vllm {
    fn name(&self) -> &'static str {
        "vllm"
    }

    fn kind(&self) -> pb::BackendKind {
        pb::BackendKind::Vllm
    }

    async fn start(&self, spec: &StartSpec) -> Result<Started, BackendError> {
        if let Some(ep) = &self.cfg.endpoint {
            return engine::attach(&self.http, "the vLLM server", spec, ep).await;
        }
        let fraction = memory_fraction("vLLM", spec.lease_bytes, spec.gpu_total)?;
        let port = free_port().map_err(|e| BackendError::Spawn {
            program: "vLLM".into(),
            reason: format!("no free loopback port: {e}"),
        })?;
        let (program, mut args) = engine::command(&self.cfg, Self::DEFAULT_COMMAND);
        args.extend(Self::args(spec, port, &fraction));
        engine::launch(&self.http, spec, program, args, port, Self::API_KEY_ENV).await
    }
}
