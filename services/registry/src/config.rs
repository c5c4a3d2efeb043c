//! The registry's configuration: `[registry]` and `[models]` of the shared TOML file, flags, and
//! `SECURELLM_MODELS` (colon-separated roots).
//!
//! Model roots, by precedence: `--models DIR` flags (repeatable), else `SECURELLM_MODELS`, else
//! `models.roots` in the file.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Parser;
use securellm_common::ByteSize;
use securellm_common::config::ConfigError;
use securellm_common::internal_auth::{self, InternalToken};
use serde::Deserialize;

/// `[registry]` in the config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrySection {
    pub listen: String,
    /// Prometheus `/metrics` listener (HOST:PORT; port 0 picks a free one; "off" = none).
    /// Unset: no listener when started in-process, the documented port when resolved by the binary.
    pub metrics_listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    /// Watch the roots for changes (inotify).
    pub watch: bool,
    /// Quiet time after a change before the watch rescans.
    pub watch_debounce_ms: u64,
    /// Fixed GPU runtime overhead added to estimates (CUDA context etc.).
    pub runtime_overhead: ByteSize,
    /// The internal token file (default `<data dir>/internal-token`).
    pub internal_token_file: Option<PathBuf>,
    /// The token every call must carry (health checks excepted), read or created by `resolve`.
    /// `None` = open: only in-process tests start a registry that way.
    #[serde(skip)]
    pub internal_token: Option<InternalToken>,
    /// `[internal_tls]` (mutual TLS on internal gRPC), loaded with the config.
    #[serde(skip)]
    pub internal_tls: Option<securellm_common::mtls::InternalTls>,
}

impl Default for RegistrySection {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50052".into(),
            metrics_listen: None,
            data_dir: None,
            watch: true,
            watch_debounce_ms: 300,
            runtime_overhead: ByteSize(0),
            internal_token_file: None,
            internal_token: None,
            internal_tls: None,
        }
    }
}

/// `[models]` in the config file (shared with the backend manager).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelsSection {
    pub roots: Vec<PathBuf>,
    /// alias → model id, name, or path (absolute, or relative to a root).
    pub aliases: BTreeMap<String, String>,
}

/// Finds models on disk, parses their headers, estimates memory, keeps them in SQLite.
#[derive(Debug, Parser)]
#[command(name = "registry", version, about)]
pub struct Args {
    /// gRPC listen address (HOST:PORT; port 0 picks a free one).
    #[arg(long, env = "SECURELLM_REGISTRY_LISTEN")]
    pub listen: Option<String>,
    /// Prometheus /metrics listen address (HOST:PORT; port 0 picks a free one; "off" = none).
    #[arg(long, env = "SECURELLM_REGISTRY_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Config file (TOML; this service reads [registry] and [models]).
    #[arg(long, env = "SECURELLM_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where the SQLite database lives.
    #[arg(long, env = "SECURELLM_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// A model root (repeatable). Overrides SECURELLM_MODELS and models.roots.
    #[arg(long = "models", value_name = "DIR")]
    pub models: Vec<PathBuf>,
    /// Do not watch the roots for changes.
    #[arg(long)]
    pub no_watch: bool,
    /// The internal token every caller must present (created with a random value if missing;
    /// default <data dir>/internal-token).
    #[arg(long, env = internal_auth::TOKEN_FILE_ENV)]
    pub internal_token_file: Option<PathBuf>,
    /// Check this config file (with the other flags over it) and exit: 0 when valid, 1 with the
    /// field named. Creates and starts nothing (model roots need not exist yet).
    #[arg(long, value_name = "FILE")]
    pub check_config: Option<PathBuf>,
}

/// Everything the registry needs, resolved.
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    pub registry: RegistrySection,
    pub roots: Vec<PathBuf>,
    pub aliases: BTreeMap<String, String>,
    pub data_dir: PathBuf,
}

/// Roots from `SECURELLM_MODELS` (colon-separated, empty entries ignored).
pub fn roots_from_env(v: &str) -> Vec<PathBuf> {
    v.split(':')
        .filter(|s| !s.trim().is_empty())
        .map(PathBuf::from)
        .collect()
}

impl RegistryConfig {
    /// Flags over file over defaults, with the internal token read (or created).
    pub fn resolve(args: &Args) -> Result<Self, ConfigError> {
        let mut c = Self::load(args)?;
        c.registry.internal_token = Some(internal_auth::for_service(
            c.registry.internal_token_file.as_deref(),
            Some(&c.data_dir),
            "registry",
        )?);
        Ok(c)
    }

    /// Flags over file over defaults, validated; reads the file and nothing else (what
    /// `--check-config` runs).
    pub fn load(args: &Args) -> Result<Self, ConfigError> {
        let path = args.config.as_deref();
        let mut registry: RegistrySection =
            securellm_common::config::load_section(path, "registry")?;
        registry.internal_tls = securellm_common::mtls::load(path)?;
        let models: ModelsSection = securellm_common::config::load_section(path, "models")?;
        if let Some(l) = &args.listen {
            registry.listen = l.clone();
        }
        registry.metrics_listen = securellm_common::prometheus::listen_addr(
            args.metrics_listen
                .as_deref()
                .or(registry.metrics_listen.as_deref()),
            securellm_common::prometheus::DEFAULT_REGISTRY,
        );
        if args.no_watch {
            registry.watch = false;
        }
        let roots = if !args.models.is_empty() {
            args.models.clone()
        } else if let Ok(v) = std::env::var("SECURELLM_MODELS") {
            roots_from_env(&v)
        } else {
            models.roots.clone()
        };
        let data_dir = args
            .data_dir
            .clone()
            .or(registry.data_dir.clone())
            .unwrap_or_else(securellm_common::config::default_data_dir);
        for (alias, target) in &models.aliases {
            if alias.trim().is_empty() || target.trim().is_empty() {
                return Err(ConfigError::Field {
                    field: format!("models.aliases.{alias}"),
                    message: "alias and target must not be empty".into(),
                });
            }
        }
        if let Some(v) = &args.internal_token_file {
            registry.internal_token_file = Some(v.clone());
        }
        Ok(Self {
            registry,
            roots,
            aliases: models.aliases,
            data_dir,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_roots_split_on_colons() {
        assert_eq!(
            roots_from_env("/a::/b"),
            vec![PathBuf::from("/a"), PathBuf::from("/b")]
        );
        assert!(roots_from_env("").is_empty());
    }
}
