//! Text Generation Inference: one `text-generation-launcher` child per instance (or an attached
//! server), OpenAI-compatible API (`/v1/chat/completions`, `/v1/completions`).
//!
//! Started as `<command> --model-id <model folder> --hostname 127.0.0.1 --port P
//! --max-total-tokens CONTEXT --max-concurrent-requests PARALLEL --cuda-memory-fraction F
//! --shard-uds-path <tmp>/securellm-tgi-P --master-port Q` with `F` = lease / GPU total (rounded
//! down to 4 decimals, clamped to 0.01..=0.99). The socket path and the master port are per
//! instance so that two TGI instances on one machine do not collide on the launcher's defaults
//! (`/tmp/text-generation-server`, 29500). `CUDA_VISIBLE_DEVICES` pins it to the leased GPU. Ready
//! when `GET /health` answers 200; the lease stays at the estimate. A random per-instance API key
//! goes in `API_KEY` (the launcher's `--api-key`; TGI releases without it ignore the variable and
//! stay open on the loopback port).
//!
//! With `endpoint` set, nothing is spawned: the manager waits for the server's `/health` and
//! forwards to it.
//!
//! Not run for real here: tested against `tests/fakes/fake_openai_engine.py`, which accepts the
//! launcher's flags and speaks TGI's OpenAI-compatible API.

use securellm_proto::v1 as pb;

use super::engine::{self, free_port, memory_fraction};
use super::{Backend, BackendError, StartSpec, Started};
use crate::config::EngineConfig;

/// The TGI backend (`[backend.tgi]`).
pub struct Tgi {
    pub cfg: EngineConfig,
    pub http: reqwest::Client,
}

impl Tgi {
    /// Used when `[backend.tgi]` has no `command`.
    pub const DEFAULT_COMMAND: &'static [&'static str] = &["text-generation-launcher"];
    /// The launcher reads `--api-key` from this variable.
    pub const API_KEY_ENV: &'static str = "API_KEY";

    /// The arguments after the configured command.
    pub fn args(spec: &StartSpec, port: u16, master_port: u16, fraction: &str) -> Vec<String> {
        vec![
            "--model-id".into(),
            spec.model_path.display().to_string(),
            "--hostname".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
            "--max-total-tokens".into(),
            spec.context.to_string(),
            "--max-concurrent-requests".into(),
            spec.parallel.to_string(),
            "--cuda-memory-fraction".into(),
            fraction.to_string(),
            "--shard-uds-path".into(),
            std::env::temp_dir()
                .join(format!("securellm-tgi-{port}"))
                .display()
                .to_string(),
            "--master-port".into(),
            master_port.to_string(),
        ]
    }
}

#[tonic::async_trait]
impl Backend for Tgi {
    fn name(&self) -> &'static str {
        "tgi"
    }

    fn kind(&self) -> pb::BackendKind {
        pb::BackendKind::Tgi
    }

    async fn start(&self, spec: &StartSpec) -> Result<Started, BackendError> {
        if let Some(ep) = &self.cfg.endpoint {
            return engine::attach(&self.http, "the TGI server", spec, ep).await;
        }
        let fraction = memory_fraction("TGI", spec.lease_bytes, spec.gpu_total)?;
        let no_port = |e: std::io::Error| BackendError::Spawn {
            program: "TGI".into(),
            reason: format!("no free loopback port: {e}"),
        };
        let port = free_port().map_err(no_port)?;
        let master_port = loop {
            let p = free_port().map_err(no_port)?;
            if p != port {
                break p;
            }
        };
        let (program, mut args) = engine::command(&self.cfg, Self::DEFAULT_COMMAND);
        args.extend(Self::args(spec, port, master_port, &fraction));
        engine::launch(&self.http, spec, program, args, port, Self::API_KEY_ENV).await
    }
}
