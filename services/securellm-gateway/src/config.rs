//! The gateway's configuration: `[gateway]` of the shared TOML file, overridden by flags.

use std::path::PathBuf;

use clap::Parser;
use securellm_common::ByteSize;
use securellm_common::config::ConfigError;
use securellm_common::internal_auth::{self, InternalToken};
use serde::Deserialize;

/// `[gateway]` in the config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// gRPC (Gateway, GatewayAdmin, health, reflection); TLS when `tls` is set.
    pub listen: String,
    /// Prometheus `/metrics` listener (HOST:PORT; port 0 picks a free one; "off" = none).
    /// Unset: no listener when started in-process, the documented port when resolved by the binary.
    pub metrics_listen: Option<String>,
    /// The OpenAI-compatible HTTP API.
    pub http_listen: String,
    pub data_dir: Option<PathBuf>,
    /// The backend manager's gRPC address.
    pub backend: String,
    /// The registry's gRPC address.
    pub registry: String,
    /// The VRAM scheduler's gRPC address (GPUs, leases and the queue for the management API's
    /// status).
    pub scheduler: String,
    /// Largest request body accepted (413 beyond).
    pub max_body: ByteSize,
    /// Whole-request time limit, load included.
    pub request_timeout_ms: u64,
    /// Serve the HTTP API and the gRPC port over TLS (`[gateway.tls]` with `cert_file` and
    /// `key_file`).
    pub tls: Option<crate::listener::TlsConfig>,
    /// Most simultaneous connections on each port (HTTP and gRPC). At the cap a new connection
    /// replaces the longest-idle one; when all have a request in progress, new ones wait to be
    /// accepted.
    pub max_connections: u32,
    /// A request's headers, the HTTP/2 preface and a TLS handshake must arrive within this; also
    /// how long a connection with no request in progress stays open (both ports).
    pub header_read_timeout_ms: u64,
    /// Largest request head (431 beyond).
    pub max_header_bytes: ByteSize,
    /// A request's whole body must arrive within this, counted from its head (408 beyond): a
    /// total, not a gap between bytes.
    pub body_read_timeout_ms: u64,
    /// Most requests in progress per API key (or JWT subject), counted from the headers to the
    /// end of the response; more are refused with 429 before their body is read. 0 = no cap.
    pub max_inflight_per_key: u32,
    /// Most requests in progress per client address, likewise. 0 = no cap.
    pub max_inflight_per_address: u32,
    /// How long the audit writer gathers rows into one transaction (one fsync) after the first.
    /// Larger batches cost less CPU under load. 0 = commit whatever is queued at once.
    pub audit_linger_ms: u64,
    /// `async` (default): answers do not wait for their audit row; a `kill -9` or power loss loses
    /// the rows not yet committed (those of requests answered within about one commit before the
    /// crash). `sync`: fail-closed; no 2xx (upstream answer, model list, admin success) is sent
    /// and no stream ends before its row is committed, and a row that cannot be committed turns
    /// the answer into a 503 (the gateway's own refusals and errors are queued as in `async`).
    pub audit_mode: AuditMode,
    /// Async worker threads; 0 = one per CPU core.
    pub worker_threads: u32,
    /// When no API key exists yet, create one (all models) and write its secret to this file
    /// (mode 0600).
    pub bootstrap_key_file: Option<PathBuf>,
    /// The admin token for the GatewayAdmin gRPC service (created with a random value if missing);
    /// default `<data-dir>/admin-token`.
    pub admin_token_file: Option<PathBuf>,
    /// The internal token file (default `<data-dir>/internal-token`): the gateway presents the
    /// token to the backend manager and the registry.
    pub internal_token_file: Option<PathBuf>,
    /// That token, read or created by `resolve`; `None`: none is sent (in-process tests).
    #[serde(skip)]
    pub internal_token: Option<InternalToken>,
    /// JWT bearer tokens (`[gateway.jwt]`); absent = API keys only.
    pub jwt: Option<crate::auth::jwt::JwtConfig>,
    /// Cloud upstreams by name (`[gateway.upstreams.<name>]`).
    pub upstreams: std::collections::BTreeMap<String, crate::upstream::cloud::CloudConfig>,
    /// Extra secret patterns for redaction: name → regex.
    pub redact_patterns: std::collections::BTreeMap<String, String>,
    /// The largest `max_tokens` (or `max_completion_tokens`) a request may ask for (400 beyond);
    /// requests to local models without one get this, so generation is never unbounded. A key's
    /// (or token's) own `max_tokens` limit lowers it.
    pub max_tokens_cap: u32,
    /// `[storage]` (its own section): where keys and rate limits live.
    #[serde(skip)]
    pub storage: StorageConfig,
    /// `[internal_tls]` (its own section): mutual TLS to the node services.
    #[serde(skip)]
    pub internal_tls: Option<securellm_common::mtls::InternalTls>,
}

/// `[storage]`: shared state for several gateways. Without `url`, one gateway keeps its keys and
/// audit log in SQLite in its data directory and its limits in memory (the single-box default).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// `postgres://USER@HOST/DB` (or `?host=/socket/dir`): API keys, rate limits and the audit
    /// log shared by every gateway using the same database. `$SECURELLM_DATABASE_URL` wins.
    pub url: Option<String>,
    /// When the database cannot be reached for a rate-limit decision: `local` (each gateway
    /// applies the key's limits ÷ live replicas) or `closed` (503).
    pub when_unreachable: crate::limits::shared::Unreachable,
    /// This gateway's audit chain on the shared log (`$SECURELLM_REPLICA_ID` wins); by default
    /// `<hostname>:<HTTP port>`, so a restarted replica continues its own chain.
    pub replica_id: Option<String>,
    /// Ed25519 signing key (a file with the 32-byte seed as 64 hex digits, mode 0600; `securellm
    /// audit keygen` makes one): this gateway signs checkpoints over every chain's head.
    pub audit_signing_key_file: Option<PathBuf>,
    /// The checkpoint signer's public key the gateway's `VerifyAudit` pins (64 hex digits, or a
    /// file holding them); by default the signing key's own.
    pub audit_public_key: Option<String>,
    /// How often a gateway with a signing key signs a checkpoint (also once when it stops).
    pub checkpoint_interval_ms: u64,
    /// Also append each checkpoint as a JSON line to this file (fsynced): a copy the database's
    /// owner cannot rewrite (`securellm audit verify --checkpoints FILE` checks against it).
    pub checkpoint_export_file: Option<PathBuf>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            url: None,
            when_unreachable: Default::default(),
            replica_id: None,
            audit_signing_key_file: None,
            audit_public_key: None,
            checkpoint_interval_ms: 60_000,
            checkpoint_export_file: None,
        }
    }
}

/// The environment variable that sets `[storage] replica_id`.
pub const REPLICA_ID_ENV: &str = "SECURELLM_REPLICA_ID";

/// The environment variable that sets `[storage] url`.
pub const DATABASE_URL_ENV: &str = "SECURELLM_DATABASE_URL";

impl StorageConfig {
    /// The section, with `$SECURELLM_DATABASE_URL` over `url`; a URL that is not PostgreSQL's is
    /// refused naming the field.
    fn load(
        path: Option<&std::path::Path>,
        env: Option<String>,
        replica_id: Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut s: StorageConfig = securellm_common::config::load_section(path, "storage")?;
        if let Some(u) = env.filter(|u| !u.trim().is_empty()) {
            s.url = Some(u);
        }
        if let Some(u) = &s.url
            && !(u.starts_with("postgres://") || u.starts_with("postgresql://"))
        {
            return Err(ConfigError::Field {
                field: "storage.url".into(),
                message: "must be a postgres:// URL (without it, SQLite in the data directory)"
                    .into(),
            });
        }
        if let Some(r) = replica_id.filter(|r| !r.trim().is_empty()) {
            s.replica_id = Some(r);
        }
        let field = |f: &str, m: String| ConfigError::Field {
            field: format!("storage.{f}"),
            message: m,
        };
        if let Some(r) = &s.replica_id
            && (r.trim().is_empty() || r.len() > 256 || r.chars().any(char::is_control))
        {
            return Err(field(
                "replica_id",
                "must be 1 to 256 bytes without control characters".into(),
            ));
        }
        if s.checkpoint_interval_ms != 0 && s.checkpoint_interval_ms < 100 {
            return Err(field(
                "checkpoint_interval_ms",
                "must be at least 100 (or 0: a checkpoint only when the gateway stops)".into(),
            ));
        }
        if let Some(k) = &s.audit_public_key {
            crate::audit::checkpoint::parse_public_key(k)
                .map_err(|e| field("audit_public_key", e.to_string()))?;
        }
        if s.url.is_none()
            && (s.audit_signing_key_file.is_some() || s.checkpoint_export_file.is_some())
        {
            return Err(field(
                "audit_signing_key_file",
                "signed checkpoints are for the shared audit log: set storage.url too".into(),
            ));
        }
        Ok(s)
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50054".into(),
            metrics_listen: None,
            http_listen: "127.0.0.1:8088".into(),
            data_dir: None,
            backend: "127.0.0.1:50053".into(),
            registry: "127.0.0.1:50052".into(),
            scheduler: "127.0.0.1:50051".into(),
            max_body: ByteSize(4 << 20),
            request_timeout_ms: 600_000,
            tls: None,
            max_connections: 1024,
            header_read_timeout_ms: 10_000,
            max_header_bytes: ByteSize(64 << 10),
            body_read_timeout_ms: 30_000,
            max_inflight_per_key: 256,
            max_inflight_per_address: 512,
            audit_linger_ms: 5,
            audit_mode: AuditMode::Async,
            worker_threads: 0,
            bootstrap_key_file: None,
            admin_token_file: None,
            internal_token_file: None,
            internal_token: None,
            jwt: None,
            upstreams: Default::default(),
            redact_patterns: Default::default(),
            max_tokens_cap: crate::validate::DEFAULT_MAX_TOKENS_CAP,
            storage: StorageConfig::default(),
            internal_tls: None,
        }
    }
}

/// When an answer may leave relative to its audit row's commit (`audit_mode`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuditMode {
    /// Rows are committed in the background (group commit); answers never wait.
    #[default]
    Async,
    /// Fail-closed: an answer waits for its row's commit.
    Sync,
}

/// The one external door: OpenAI-compatible HTTP in front of the local stack.
///
/// Each field serializes under its `[gateway]` key, so the flags are merged over the file in one
/// step (`load_section_with`); unset flags are `None` and leave the file's value.
#[derive(Debug, Parser, serde::Serialize)]
#[command(name = "securellm-gateway", version, about)]
pub struct Args {
    /// gRPC listen address.
    #[arg(long, env = "SECURELLM_GATEWAY_LISTEN")]
    pub listen: Option<String>,
    /// Prometheus /metrics listen address (HOST:PORT; port 0 picks a free one; "off" = none).
    #[arg(long, env = "SECURELLM_GATEWAY_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// HTTP (OpenAI-compatible) listen address.
    #[arg(long, env = "SECURELLM_GATEWAY_HTTP_LISTEN")]
    pub http_listen: Option<String>,
    /// Config file (TOML; this service reads [gateway]).
    #[arg(long, env = "SECURELLM_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Where the key store and the audit log live.
    #[arg(long, env = "SECURELLM_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The backend manager's address.
    #[arg(long, env = "SECURELLM_BACKEND")]
    pub backend: Option<String>,
    /// The registry's address.
    #[arg(long, env = "SECURELLM_REGISTRY")]
    pub registry: Option<String>,
    /// The VRAM scheduler's address (the management API's status: GPUs, leases, queue).
    #[arg(long, env = "SECURELLM_SCHEDULER")]
    pub scheduler: Option<String>,
    /// Create a first API key if none exists and write it to this file.
    #[arg(long)]
    pub bootstrap_key_file: Option<PathBuf>,
    /// Async worker threads (0 = one per CPU core).
    #[arg(long, env = "SECURELLM_GATEWAY_WORKER_THREADS")]
    pub worker_threads: Option<u32>,
    /// The internal token presented to the backend manager and the registry (created with a
    /// random value if missing; default <data dir>/internal-token).
    #[arg(long, env = internal_auth::TOKEN_FILE_ENV)]
    pub internal_token_file: Option<PathBuf>,
    /// Check this config file (with the other flags over it) and exit: 0 when valid, 1 with the
    /// field named. Creates and starts nothing; secret files (keys, certificates) are not read,
    /// only required where the configuration needs them.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub check_config: Option<PathBuf>,
}

impl GatewayConfig {
    /// Flags over file over defaults, with the internal token read (or created).
    pub fn resolve(args: &Args) -> Result<Self, ConfigError> {
        let mut c = Self::load(args)?;
        c.internal_token = Some(internal_auth::for_service(
            c.internal_token_file.as_deref(),
            c.data_dir.as_deref(),
            "gateway",
        )?);
        Ok(c)
    }

    /// Flags over file over defaults, validated (upstreams and `[gateway.jwt]` as far as they can
    /// be without reading their secret files); reads the config file and nothing else (what
    /// `--check-config` runs).
    pub fn load(args: &Args) -> Result<Self, ConfigError> {
        // Flags (and their environment variables) over the file over defaults, in one merge.
        let mut c: GatewayConfig =
            securellm_common::config::load_section_with(args.config.as_deref(), "gateway", args)?;
        c.internal_tls = securellm_common::mtls::load(args.config.as_deref())?;
        c.storage = StorageConfig::load(
            args.config.as_deref(),
            std::env::var(DATABASE_URL_ENV).ok(),
            std::env::var(REPLICA_ID_ENV).ok(),
        )?;
        c.metrics_listen = securellm_common::prometheus::listen_addr(
            c.metrics_listen.as_deref(),
            securellm_common::prometheus::DEFAULT_GATEWAY,
        );
        if c.max_body.0 < 1024 {
            return Err(ConfigError::Field {
                field: "gateway.max_body".into(),
                message: "must be at least 1KiB".into(),
            });
        }
        let field = |f: &str, m: &str| ConfigError::Field {
            field: format!("gateway.{f}"),
            message: m.into(),
        };
        if c.audit_linger_ms > 1000 {
            return Err(field("audit_linger_ms", "must be at most 1000"));
        }
        if c.max_connections == 0 {
            return Err(field("max_connections", "must be at least 1"));
        }
        if c.header_read_timeout_ms < 100 {
            return Err(field("header_read_timeout_ms", "must be at least 100"));
        }
        if c.body_read_timeout_ms < 100 {
            return Err(field("body_read_timeout_ms", "must be at least 100"));
        }
        if c.max_header_bytes.0 < 8192 || c.max_header_bytes.0 > (16 << 20) {
            return Err(field("max_header_bytes", "must be between 8KiB and 16MiB"));
        }
        if c.max_tokens_cap == 0 {
            return Err(field("max_tokens_cap", "must be at least 1"));
        }
        if c.request_timeout_ms < 1000 {
            return Err(ConfigError::Field {
                field: "gateway.request_timeout_ms".into(),
                message: "must be at least 1000".into(),
            });
        }
        for (name, u) in &c.upstreams {
            u.check(name).map_err(|e| ConfigError::Field {
                field: format!("gateway.upstreams.{name}"),
                message: e.message,
            })?;
        }
        if let Some(j) = &c.jwt {
            j.check().map_err(|e| {
                let crate::auth::jwt::JwtConfigError::Invalid { field, message } = e;
                ConfigError::Field {
                    field: format!("gateway.jwt.{field}"),
                    message,
                }
            })?;
        }
        Ok(c)
    }
}
