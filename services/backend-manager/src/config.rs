//! The backend manager's configuration: `[backend]` of the shared TOML file (with per-model
//! overrides under `[backend.models.<name>]`), overridden by flags.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Parser;
use securellm_common::config::ConfigError;
use securellm_common::internal_auth::{self, InternalToken};
use serde::Deserialize;

/// Settings an instance runs with; every field optional so layers can be merged
/// (request > per-model config > defaults).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    pub context: Option<u64>,
    pub parallel: Option<u32>,
    pub cache_type: Option<String>,
    pub gpu_layers: Option<u32>,
    pub embeddings: Option<bool>,
    pub flash_attention: Option<bool>,
    pub priority: Option<i32>,
    pub gpu_index: Option<u32>,
    pub idle_ttl_ms: Option<u64>,
}

impl ModelSettings {
    /// `self` where set, else `other`.
    pub fn or(&self, other: &ModelSettings) -> ModelSettings {
        ModelSettings {
            context: self.context.or(other.context),
            parallel: self.parallel.or(other.parallel),
            cache_type: self.cache_type.clone().or(other.cache_type.clone()),
            gpu_layers: self.gpu_layers.or(other.gpu_layers),
            embeddings: self.embeddings.or(other.embeddings),
            flash_attention: self.flash_attention.or(other.flash_attention),
            priority: self.priority.or(other.priority),
            gpu_index: self.gpu_index.or(other.gpu_index),
            idle_ttl_ms: self.idle_ttl_ms.or(other.idle_ttl_ms),
        }
    }
}

/// Fully resolved settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Effective {
    pub context: u64,
    pub parallel: u32,
    pub cache_type: &'static str,
    pub gpu_layers: Option<u32>,
    pub embeddings: bool,
    pub flash_attention: Option<bool>,
    pub priority: i32,
    pub gpu_index: Option<u32>,
    pub idle_ttl_ms: u64,
}

impl Effective {
    /// Resolve, validating each field; the error names it.
    pub fn from(s: &ModelSettings) -> Result<Self, String> {
        let cache_type = match s.cache_type.as_deref().unwrap_or("f16") {
            "f16" => "f16",
            "q8_0" => "q8_0",
            "q4_0" => "q4_0",
            other => {
                return Err(format!(
                    "cache_type {other:?} is not one of f16, q8_0, q4_0"
                ));
            }
        };
        let context = s.context.unwrap_or(4096);
        if context == 0 || context > 1 << 24 {
            return Err(format!(
                "context must be 1..=16777216 tokens, got {context}"
            ));
        }
        let parallel = s.parallel.unwrap_or(1);
        if parallel == 0 || parallel > 256 {
            return Err(format!("parallel must be 1..=256, got {parallel}"));
        }
        Ok(Self {
            context,
            parallel,
            cache_type,
            gpu_layers: s.gpu_layers,
            embeddings: s.embeddings.unwrap_or(false),
            flash_attention: s.flash_attention,
            priority: s.priority.unwrap_or(0),
            gpu_index: s.gpu_index,
            idle_ttl_ms: s.idle_ttl_ms.unwrap_or(300_000),
        })
    }
}

/// `[backend]` in the config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    pub listen: String,
    /// Prometheus `/metrics` listener (HOST:PORT; port 0 picks a free one; "off" = none).
    /// Unset: no listener when started in-process, the documented port when resolved by the binary.
    pub metrics_listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    /// The vram-scheduler's gRPC address.
    pub scheduler: String,
    /// The registry's gRPC address.
    pub registry: String,
    /// `llama-server` binary; else `$LLAMA_SERVER`, else `llama-server` on PATH.
    pub llama_server: Option<PathBuf>,
    /// CPU threads per llama-server (`-t`).
    pub threads: u32,
    /// The holder name used for leases.
    pub holder: String,
    pub lease_ttl_ms: u64,
    /// Longest wait in the scheduler's queue when the request has no deadline.
    pub lease_wait_ms: u64,
    pub start_timeout_ms: u64,
    pub stall_timeout_ms: u64,
    /// SIGTERM → SIGKILL grace.
    pub stop_grace_ms: u64,
    /// How long in-flight requests may finish when unloading.
    pub drain_timeout_ms: u64,
    /// First crash backoff; doubles per consecutive crash up to `max_backoff_ms`.
    pub backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// Defaults for every model.
    pub defaults: ModelSettings,
    /// Per-model settings by registry name, alias or id.
    pub models: BTreeMap<String, ModelSettings>,
    /// `[backend.ollama]`: serve Ollama-format models through a running Ollama daemon. Absent:
    /// llama.cpp serves the Ollama blob (a GGUF file) directly.
    pub ollama: Option<OllamaConfig>,
    /// `[backend.vllm]`: serve safetensors folders with vLLM (preferred over TGI when both are
    /// configured). Absent: not configured.
    pub vllm: Option<EngineConfig>,
    /// `[backend.tgi]`: serve safetensors folders with Text Generation Inference. Absent: not
    /// configured.
    pub tgi: Option<EngineConfig>,
    /// The internal token file (default `<data dir>/internal-token`).
    pub internal_token_file: Option<PathBuf>,
    /// The token every call to this service must carry (health checks excepted) and that its calls
    /// to the scheduler and the registry carry; read or created by `resolve`. `None` = open: only
    /// in-process tests start a manager that way.
    #[serde(skip)]
    pub internal_token: Option<InternalToken>,
    /// `[internal_tls]` (mutual TLS on internal gRPC), loaded with the config.
    #[serde(skip)]
    pub internal_tls: Option<securellm_common::mtls::InternalTls>,
}

/// `[backend.ollama]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct OllamaConfig {
    /// Base URL of the Ollama daemon's HTTP API.
    pub url: String,
}

impl Default for OllamaConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:11434".into(),
        }
    }
}

/// `[backend.vllm]` / `[backend.tgi]`: an OpenAI-compatible engine, spawned per instance from
/// `command` or attached at `endpoint`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Program and leading arguments, e.g. `["vllm", "serve"]`; the manager appends the model and
    /// its flags. Absent: the engine's usual command (`vllm serve`, `text-generation-launcher`).
    pub command: Option<Vec<String>>,
    /// Base URL of an engine already running (e.g. `http://127.0.0.1:8000`): attach to it instead
    /// of spawning. The manager then cannot bound its memory; the lease stays at the estimate.
    pub endpoint: Option<String>,
}

impl EngineConfig {
    /// Check the section; `what` names it in the message.
    pub fn validate(&self) -> Result<(), String> {
        match (&self.command, &self.endpoint) {
            (Some(_), Some(_)) => Err("set either `command` or `endpoint`, not both".into()),
            (Some(c), None) if c.is_empty() || c[0].trim().is_empty() => {
                Err("`command` must name a program".into())
            }
            (None, Some(e)) => check_http_url(e).map_err(|m| format!("`endpoint`: {m}")),
            _ => Ok(()),
        }
    }
}

/// `http://host[:port][/...]` or `https://...`.
pub fn check_http_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("{url:?} is not an http:// or https:// URL"))?;
    if rest.split('/').next().unwrap_or("").is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    Ok(())
}

impl Default for BackendConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50053".into(),
            metrics_listen: None,
            data_dir: None,
            scheduler: "127.0.0.1:50051".into(),
            registry: "127.0.0.1:50052".into(),
            llama_server: None,
            threads: 1,
            holder: "backend-manager".into(),
            lease_ttl_ms: 15_000,
            lease_wait_ms: 60_000,
            start_timeout_ms: 120_000,
            stall_timeout_ms: 60_000,
            stop_grace_ms: 3_000,
            drain_timeout_ms: 30_000,
            backoff_ms: 250,
            max_backoff_ms: 30_000,
            defaults: ModelSettings::default(),
            models: BTreeMap::new(),
            ollama: None,
            vllm: None,
            tgi: None,
            internal_token_file: None,
            internal_token: None,
            internal_tls: None,
        }
    }
}

/// Makes a model answer: llama-server children behind leases, on demand.
///
/// Each field serializes under its `[backend]` key, so the flags are merged over the file in one
/// step (`load_section_with`); unset flags are `None` and leave the file's value.
#[derive(Debug, Parser, serde::Serialize)]
#[command(name = "backend-manager", version, about)]
pub struct Args {
    /// gRPC listen address (HOST:PORT; port 0 picks a free one).
    #[arg(long, env = "SECURELLM_BACKEND_LISTEN")]
    pub listen: Option<String>,
    /// Prometheus /metrics listen address (HOST:PORT; port 0 picks a free one; "off" = none).
    #[arg(long, env = "SECURELLM_BACKEND_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Config file (TOML; this service reads [backend]).
    #[arg(long, env = "SECURELLM_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Data directory (logs of children).
    #[arg(long, env = "SECURELLM_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The scheduler's address.
    #[arg(long, env = "SECURELLM_SCHEDULER")]
    pub scheduler: Option<String>,
    /// The registry's address.
    #[arg(long, env = "SECURELLM_REGISTRY")]
    pub registry: Option<String>,
    /// The llama-server binary.
    #[arg(long, env = "LLAMA_SERVER")]
    pub llama_server: Option<PathBuf>,
    /// Default idle TTL before an unused model is unloaded (ms; 0 = never).
    #[arg(long)]
    #[serde(skip)] // `defaults.idle_ttl_ms`, set after the merge
    pub idle_ttl_ms: Option<u64>,
    /// Lease TTL (ms); the manager renews at a third of it.
    #[arg(long)]
    pub lease_ttl_ms: Option<u64>,
    /// The internal token: every caller must present it, and the manager presents it to the
    /// scheduler and the registry (created with a random value if missing; default
    /// <data dir>/internal-token).
    #[arg(long, env = internal_auth::TOKEN_FILE_ENV)]
    pub internal_token_file: Option<PathBuf>,
    /// Check this config file (with the other flags over it) and exit: 0 when valid, 1 with the
    /// field named. Creates and starts nothing.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub check_config: Option<PathBuf>,
}

impl BackendConfig {
    /// Flags over file over defaults, with the internal token read (or created).
    pub fn resolve(args: &Args) -> Result<Self, ConfigError> {
        let mut c = Self::load(args)?;
        c.internal_token = Some(internal_auth::for_service(
            c.internal_token_file.as_deref(),
            c.data_dir.as_deref(),
            "backend",
        )?);
        Ok(c)
    }

    /// Flags over file over defaults, validated; reads the file and nothing else (what
    /// `--check-config` runs).
    pub fn load(args: &Args) -> Result<Self, ConfigError> {
        // Flags (and their environment variables) over the file over defaults, in one merge.
        let mut c: BackendConfig =
            securellm_common::config::load_section_with(args.config.as_deref(), "backend", args)?;
        c.internal_tls = securellm_common::mtls::load(args.config.as_deref())?;
        c.metrics_listen = securellm_common::prometheus::listen_addr(
            c.metrics_listen.as_deref(),
            securellm_common::prometheus::DEFAULT_BACKEND,
        );
        if let Some(v) = args.idle_ttl_ms {
            c.defaults.idle_ttl_ms = Some(v);
        }
        let field = |f: &str, m: String| ConfigError::Field {
            field: format!("backend.{f}"),
            message: m,
        };
        Effective::from(&c.defaults).map_err(|m| field("defaults", m))?;
        for (name, s) in &c.models {
            Effective::from(&s.or(&c.defaults)).map_err(|m| field(&format!("models.{name}"), m))?;
        }
        if c.lease_ttl_ms < 300 {
            return Err(field("lease_ttl_ms", "must be at least 300".into()));
        }
        if c.threads == 0 {
            return Err(field("threads", "must be at least 1".into()));
        }
        c.validate_backends().map_err(|(f, m)| field(&f, m))?;
        Ok(c)
    }

    /// Check `[backend.ollama]`, `[backend.vllm]` and `[backend.tgi]`; the error names the field.
    pub fn validate_backends(&self) -> Result<(), (String, String)> {
        if let Some(o) = &self.ollama {
            check_http_url(&o.url).map_err(|m| ("ollama.url".to_string(), m))?;
        }
        for (name, e) in [("vllm", &self.vllm), ("tgi", &self.tgi)] {
            if let Some(e) = e {
                e.validate().map_err(|m| (name.to_string(), m))?;
            }
        }
        Ok(())
    }

    /// The llama-server binary to use.
    pub fn llama_server_path(&self) -> PathBuf {
        self.llama_server
            .clone()
            .or_else(|| std::env::var_os("LLAMA_SERVER").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("llama-server"))
    }
}

pub use securellm_common::grpc_url;

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn flags_override_the_file_including_the_nested_idle_ttl() {
        use clap::Parser;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "[backend]\nscheduler = \"10.0.0.1:1\"\nregistry = \"10.0.0.2:2\"\nlease_ttl_ms = 9000\n",
        )
        .unwrap();
        let d = dir.path().to_str().unwrap();
        let args = Args::try_parse_from([
            "backend-manager",
            "--config",
            f.to_str().unwrap(),
            "--data-dir",
            d,
            "--registry",
            "127.0.0.1:7",
            "--idle-ttl-ms",
            "5",
        ])
        .unwrap();
        let c = BackendConfig::resolve(&args).unwrap();
        assert_eq!(c.scheduler, "10.0.0.1:1", "the file's");
        assert_eq!(c.registry, "127.0.0.1:7", "the flag's");
        assert_eq!(c.lease_ttl_ms, 9000);
        assert_eq!(c.defaults.idle_ttl_ms, Some(5));
        assert_eq!(c.stop_grace_ms, BackendConfig::default().stop_grace_ms);
    }

    #[test]
    fn settings_merge_and_validate_with_the_field_named() {
        let a = ModelSettings {
            context: Some(1024),
            ..Default::default()
        };
        let b = ModelSettings {
            context: Some(8),
            parallel: Some(2),
            ..Default::default()
        };
        let m = a.or(&b);
        assert_eq!((m.context, m.parallel), (Some(1024), Some(2)));
        let e = Effective::from(&m).unwrap();
        assert_eq!(
            (e.context, e.parallel, e.cache_type, e.idle_ttl_ms),
            (1024, 2, "f16", 300_000)
        );
        let bad = ModelSettings {
            cache_type: Some("q9".into()),
            ..Default::default()
        };
        assert!(Effective::from(&bad).unwrap_err().contains("cache_type"));
        let bad = ModelSettings {
            parallel: Some(0),
            ..Default::default()
        };
        assert!(Effective::from(&bad).unwrap_err().contains("parallel"));
    }

    #[test]
    fn engine_sections_are_validated() {
        let parse = |text: &str| -> BackendConfig {
            securellm_common::config::section_from_str(text, Path::new("test.toml"), "backend")
                .unwrap()
        };
        let c = parse(
            r#"
            [backend.ollama]
            url = "http://127.0.0.1:11434"
            [backend.vllm]
            command = ["vllm", "serve"]
            [backend.tgi]
            endpoint = "http://127.0.0.1:8080"
            "#,
        );
        assert_eq!(c.ollama.as_ref().unwrap().url, "http://127.0.0.1:11434");
        assert_eq!(
            c.vllm.as_ref().unwrap().command.as_deref(),
            Some(&["vllm".to_string(), "serve".to_string()][..])
        );
        assert!(c.validate_backends().is_ok());
        let both = EngineConfig {
            command: Some(vec!["x".into()]),
            endpoint: Some("http://h:1".into()),
        };
        assert!(both.validate().unwrap_err().contains("not both"));
        let empty = EngineConfig {
            command: Some(vec![]),
            endpoint: None,
        };
        assert!(empty.validate().is_err());
        let bad = EngineConfig {
            command: None,
            endpoint: Some("127.0.0.1:8000".into()),
        };
        assert!(bad.validate().unwrap_err().contains("endpoint"));
        let c = BackendConfig {
            ollama: Some(OllamaConfig {
                url: "ftp://x".into(),
            }),
            ..Default::default()
        };
        assert_eq!(c.validate_backends().unwrap_err().0, "ollama.url");
        // An empty section means the usual command.
        let c = parse("[backend.tgi]\n");
        assert_eq!(c.tgi, Some(EngineConfig::default()));
        assert_eq!((c.vllm, c.ollama), (None, None));
    }
}
