//! The scheduler's configuration: the `[scheduler]` section of the shared TOML file, overridden by
//! flags (and the `SECURELLM_SCHEDULER_*` environment variables clap maps onto them).

use std::path::PathBuf;

use clap::Parser;
use securellm_common::ByteSize;
use securellm_common::internal_auth::{self, InternalToken};
use serde::{Deserialize, Serialize};

use crate::table::Limits;

/// How the GPU inventory is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum InventoryMode {
    /// NVML if it loads and sees a GPU, else simulated GPUs (explicit simulated GPUs win).
    #[default]
    Auto,
    /// NVML or fail.
    Nvml,
    /// Simulated GPUs only.
    Simulated,
}

/// `[scheduler]` in the config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    pub listen: String,
    /// Prometheus `/metrics` listener (HOST:PORT; port 0 picks a free one; "off" = none).
    /// Unset: no listener when started in-process, the documented port when resolved by the binary.
    pub metrics_listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub inventory: InventoryMode,
    /// Sizes of simulated GPUs, e.g. `["24GiB", "16GiB"]`.
    pub simulate_gpus: Vec<ByteSize>,
    /// Memory per GPU that is never granted.
    pub reserve: ByteSize,
    pub refresh_interval_ms: u64,
    pub max_ttl_ms: u64,
    pub max_wait_ms: u64,
    pub eviction_grace_ms: u64,
    /// A request waiting this long may evict busy leases of its own priority once their current
    /// requests finish (0 = never). Idle leases of its priority yield at once.
    pub preempt_busy_after_ms: u64,
    /// How long those current requests get to finish.
    pub busy_drain_ms: u64,
    pub persist_interval_ms: u64,
    /// The internal token file (default `<data dir>/internal-token`).
    pub internal_token_file: Option<PathBuf>,
    /// The token every call must carry (health checks excepted), read or created by `resolve`.
    /// `None` = open: only in-process tests start a scheduler that way.
    #[serde(skip)]
    pub internal_token: Option<InternalToken>,
    /// `[internal_tls]` (mutual TLS on internal gRPC), loaded with the config.
    #[serde(skip)]
    pub internal_tls: Option<securellm_common::mtls::InternalTls>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        let l = Limits::default();
        Self {
            listen: "127.0.0.1:50051".into(),
            metrics_listen: None,
            data_dir: None,
            inventory: InventoryMode::Auto,
            simulate_gpus: Vec::new(),
            reserve: ByteSize(0),
            refresh_interval_ms: 1000,
            max_ttl_ms: l.max_ttl_ms,
            max_wait_ms: l.max_wait_ms,
            eviction_grace_ms: l.eviction_grace_ms,
            preempt_busy_after_ms: l.preempt_busy_after_ms,
            busy_drain_ms: l.busy_drain_ms,
            persist_interval_ms: 100,
            internal_token_file: None,
            internal_token: None,
            internal_tls: None,
        }
    }
}

/// The GPU memory authority of SecureLLM.
///
/// Each field serializes under its `[scheduler]` key: the flags are merged over the file in one
/// step (`load_section_with`); unset flags are `None` and leave the file's value.
#[derive(Debug, Parser, Serialize)]
#[command(name = "vram-scheduler", version, about)]
pub struct Args {
    /// gRPC listen address (HOST:PORT; port 0 picks a free one).
    #[arg(long, env = "SECURELLM_SCHEDULER_LISTEN")]
    pub listen: Option<String>,
    /// Prometheus /metrics listen address (HOST:PORT; port 0 picks a free one; "off" = none).
    #[arg(long, env = "SECURELLM_SCHEDULER_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Config file (TOML; this service reads its [scheduler] section).
    #[arg(long, env = "SECURELLM_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Where the lease snapshot is kept.
    #[arg(long, env = "SECURELLM_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Add a simulated GPU of this size (repeatable: two flags, two GPUs). Implies simulated
    /// inventory unless --inventory says otherwise.
    #[arg(long = "simulate-gpu", value_name = "SIZE")]
    #[serde(rename = "simulate_gpus", skip_serializing_if = "Vec::is_empty")]
    pub simulate_gpu: Vec<ByteSize>,
    /// auto (NVML, else simulated), nvml, or simulated.
    #[arg(long, value_enum, env = "SECURELLM_SCHEDULER_INVENTORY")]
    pub inventory: Option<InventoryMode>,
    /// Memory per GPU that is never granted (e.g. 512MiB).
    #[arg(long, env = "SECURELLM_SCHEDULER_RESERVE")]
    pub reserve: Option<ByteSize>,
    /// How long a holder has to release after an eviction notice.
    #[arg(long)]
    pub eviction_grace_ms: Option<u64>,
    /// The longest TTL a lease may ask for.
    #[arg(long)]
    pub max_ttl_ms: Option<u64>,
    /// A request waiting this long may evict busy leases of its own priority (0 = never).
    #[arg(long, env = "SECURELLM_SCHEDULER_PREEMPT_BUSY_AFTER_MS")]
    pub preempt_busy_after_ms: Option<u64>,
    /// How often NVML is read.
    #[arg(long)]
    pub refresh_interval_ms: Option<u64>,
    /// The internal token every caller must present (created with a random value if missing;
    /// default <data dir>/internal-token).
    #[arg(long, env = internal_auth::TOKEN_FILE_ENV)]
    pub internal_token_file: Option<PathBuf>,
    /// Check this config file (with the other flags over it) and exit: 0 when valid, 1 with the
    /// field named. Creates and starts nothing.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub check_config: Option<PathBuf>,
}

impl SchedulerConfig {
    /// Flags over file over defaults, with the internal token read (or created).
    pub fn resolve(args: &Args) -> Result<Self, securellm_common::config::ConfigError> {
        let mut c = Self::load(args)?;
        c.internal_token = Some(internal_auth::for_service(
            c.internal_token_file.as_deref(),
            c.data_dir.as_deref(),
            "scheduler",
        )?);
        Ok(c)
    }

    /// Flags over file over defaults, validated; reads the file and nothing else (what
    /// `--check-config` runs).
    pub fn load(args: &Args) -> Result<Self, securellm_common::config::ConfigError> {
        let mut c: SchedulerConfig =
            securellm_common::config::load_section_with(args.config.as_deref(), "scheduler", args)?;
        c.internal_tls = securellm_common::mtls::load(args.config.as_deref())?;
        // Simulated GPUs on the command line imply simulated inventory unless it is named.
        if !args.simulate_gpu.is_empty() && args.inventory.is_none() {
            c.inventory = InventoryMode::Simulated;
        }
        c.validate()?;
        c.metrics_listen = securellm_common::prometheus::listen_addr(
            c.metrics_listen.as_deref(),
            securellm_common::prometheus::DEFAULT_SCHEDULER,
        );
        Ok(c)
    }

    fn validate(&self) -> Result<(), securellm_common::config::ConfigError> {
        let field = |field: &str, message: &str| securellm_common::config::ConfigError::Field {
            field: format!("scheduler.{field}"),
            message: message.to_string(),
        };
        if self.simulate_gpus.iter().any(|s| s.0 == 0) {
            return Err(field(
                "simulate_gpus",
                "a simulated GPU must have more than 0 bytes",
            ));
        }
        if self.max_ttl_ms == 0 {
            return Err(field("max_ttl_ms", "must be greater than 0"));
        }
        if self.refresh_interval_ms == 0 {
            return Err(field("refresh_interval_ms", "must be greater than 0"));
        }
        if self.persist_interval_ms == 0 {
            return Err(field("persist_interval_ms", "must be greater than 0"));
        }
        Ok(())
    }

    pub fn limits(&self) -> Limits {
        Limits {
            max_ttl_ms: self.max_ttl_ms,
            max_wait_ms: self.max_wait_ms,
            eviction_grace_ms: self.eviction_grace_ms,
            preempt_busy_after_ms: self.preempt_busy_after_ms,
            busy_drain_ms: self.busy_drain_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(argv: &[&str]) -> Result<SchedulerConfig, String> {
        let dir = tempfile::tempdir().unwrap();
        let mut full = vec!["vram-scheduler", "--data-dir"];
        let d = dir.path().to_str().unwrap().to_string();
        full.push(&d);
        full.extend_from_slice(argv);
        let args = Args::try_parse_from(full).map_err(|e| e.to_string())?;
        SchedulerConfig::resolve(&args).map_err(|e| e.to_string())
    }

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("securellm.toml");
        std::fs::write(
            &f,
            "[scheduler]\ninventory = \"nvml\"\nreserve = \"1GiB\"\neviction_grace_ms = 111\nmax_ttl_ms = 222\n",
        )
        .unwrap();
        let f = f.to_str().unwrap();
        let c = resolve(&["--config", f, "--max-ttl-ms", "333"]).unwrap();
        assert_eq!(c.inventory, InventoryMode::Nvml);
        assert_eq!(c.reserve, ByteSize(1 << 30));
        assert_eq!(c.eviction_grace_ms, 111, "the file's, no flag");
        assert_eq!(c.max_ttl_ms, 333, "the flag's");
        assert_eq!(c.busy_drain_ms, SchedulerConfig::default().busy_drain_ms);
        // --simulate-gpu implies simulated inventory over the file, unless --inventory names one.
        let c = resolve(&[
            "--config",
            f,
            "--simulate-gpu",
            "24GiB",
            "--simulate-gpu",
            "8GiB",
        ])
        .unwrap();
        assert_eq!(c.inventory, InventoryMode::Simulated);
        assert_eq!(c.simulate_gpus, vec![ByteSize(24 << 30), ByteSize(8 << 30)]);
        let c = resolve(&[
            "--config",
            f,
            "--simulate-gpu",
            "24GiB",
            "--inventory",
            "auto",
        ])
        .unwrap();
        assert_eq!(c.inventory, InventoryMode::Auto);
        // Bad values are still refused, naming the field.
        let e = resolve(&["--max-ttl-ms", "0"]).unwrap_err();
        assert!(e.contains("max_ttl_ms"), "{e}");
    }
}
