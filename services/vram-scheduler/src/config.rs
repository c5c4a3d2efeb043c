//! The scheduler's configuration: the `[scheduler]` section of the shared TOML file, overridden by
//! flags (and the `SECURELLM_SCHEDULER_*` environment variables clap maps onto them).

use std::path::PathBuf;

use clap::Parser;
use securellm_common::ByteSize;
use securellm_common::internal_auth::{self, InternalToken};
use serde::Deserialize;

use crate::table::Limits;

/// How the GPU inventory is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
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
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        let l = Limits::default();
        Self {
            listen: "127.0.0.1:50051".into(),
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
        }
    }
}

/// The GPU memory authority of SecureLLM.
#[derive(Debug, Parser)]
#[command(name = "vram-scheduler", version, about)]
pub struct Args {
    /// gRPC listen address (HOST:PORT; port 0 picks a free one).
    #[arg(long, env = "SECURELLM_SCHEDULER_LISTEN")]
    pub listen: Option<String>,
    /// Config file (TOML; this service reads its [scheduler] section).
    #[arg(long, env = "SECURELLM_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where the lease snapshot is kept.
    #[arg(long, env = "SECURELLM_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Add a simulated GPU of this size (repeatable: two flags, two GPUs). Implies simulated
    /// inventory unless --inventory says otherwise.
    #[arg(long = "simulate-gpu", value_name = "SIZE")]
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
}

impl SchedulerConfig {
    /// Flags over file over defaults.
    pub fn resolve(args: &Args) -> Result<Self, securellm_common::config::ConfigError> {
        let mut c: SchedulerConfig =
            securellm_common::config::load_section(args.config.as_deref(), "scheduler")?;
        if let Some(v) = &args.listen {
            c.listen = v.clone();
        }
        if let Some(v) = &args.data_dir {
            c.data_dir = Some(v.clone());
        }
        if !args.simulate_gpu.is_empty() {
            c.simulate_gpus = args.simulate_gpu.clone();
            if args.inventory.is_none() {
                c.inventory = InventoryMode::Simulated;
            }
        }
        if let Some(v) = args.inventory {
            c.inventory = v;
        }
        if let Some(v) = args.reserve {
            c.reserve = v;
        }
        if let Some(v) = args.eviction_grace_ms {
            c.eviction_grace_ms = v;
        }
        if let Some(v) = args.max_ttl_ms {
            c.max_ttl_ms = v;
        }
        if let Some(v) = args.preempt_busy_after_ms {
            c.preempt_busy_after_ms = v;
        }
        if let Some(v) = args.refresh_interval_ms {
            c.refresh_interval_ms = v;
        }
        if let Some(v) = &args.internal_token_file {
            c.internal_token_file = Some(v.clone());
        }
        c.validate()?;
        c.internal_token = Some(internal_auth::for_service(
            c.internal_token_file.as_deref(),
            c.data_dir.as_deref(),
            "scheduler",
        )?);
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
