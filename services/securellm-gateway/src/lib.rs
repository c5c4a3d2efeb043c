//! securellm-gateway: the one external door.
//!
//! Folders by concern:
//! - [`http`]: the OpenAI-compatible HTTP API (the tower stack in front of the pipeline).
//! - [`grpc`]: the same API over gRPC (`securellm.v1.Gateway`), and [`grpc::admin`], the
//!   `GatewayAdmin` service (keys, audit) behind an admin token.
//! - [`management`]: the management operations (keys, audit query, the stack's status,
//!   catalogue, instances, load / unload), once, behind `GatewayAdmin` and the HTTP management
//!   API under `/admin/v1/` ([`http::admin`], with its OpenAPI document).
//! - [`pipeline`]: the request path both transports share: authenticate → authorize → validate →
//!   rate-limit → redact → audit → route → forward.
//! - [`state`]: what the request path shares ([`state::AppState`]).
//! - [`upstream`]: the [`upstream::Upstream`] seam and the routing table; the local backend
//!   manager over gRPC ([`upstream::Local`]) and OpenAI-compatible cloud upstreams
//!   ([`upstream::cloud`], redacted prompts).
//! - [`auth`]: API keys ([`auth::keys`]) and JWT bearer tokens ([`auth::jwt`]).
//! - [`limits`]: requests / tokens per minute and concurrency per key, failed-auth limits
//!   ([`limits::ratelimit`]); requests in progress per key and address ([`limits::inflight`]).
//! - [`audit`]: the hash-chained, group-committed audit log: the row encoding an outside
//!   verifier ports (`audit/encoding.rs`), the writer (`audit/writer.rs`), the chain walk
//!   (`audit/verify.rs`).
//! - [`listener`]: the HTTP listener and the gRPC port's connections (TLS, HTTP/1.1 + HTTP/2,
//!   connection cap with shedding of idle connections, idle, header and body deadlines).
//! - [`redact`]: secrets in prompts bound for cloud upstreams.
//! - [`validate`]: the OpenAI request schema, checked before routing; the `max_tokens` cap.
//! - [`error`]: OpenAI-shaped errors.
//!
//! The former flat paths (`keys`, `jwt`, `ratelimit`, `inflight`, `cloud`, `app`, `admin`) are
//! re-exported.

pub mod audit;
pub mod auth;
pub mod config;
pub mod error;
pub mod grpc;
pub mod http;
pub mod limits;
pub mod listener;
pub mod management;
pub mod observe;
pub mod pipeline;
pub mod placement;
pub mod redact;
pub mod state;
pub mod upstream;
pub mod validate;

pub use auth::{jwt, keys};
pub use grpc::admin;
pub use http as app;
pub use limits::{inflight, ratelimit};
pub use upstream::cloud;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use securellm_common::serve;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::GatewayConfig;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Keys(#[from] keys::KeyError),
    #[error(transparent)]
    Audit(#[from] audit::AuditError),
    #[error(transparent)]
    AuditKey(#[from] audit::checkpoint::CheckpointError),
    #[error(transparent)]
    InternalTls(#[from] securellm_common::mtls::MtlsError),
    #[error(transparent)]
    Jwt(#[from] jwt::JwtConfigError),
    #[error(transparent)]
    Cloud(#[from] cloud::CloudConfigError),
    #[error("invalid `gateway.redact_patterns`: {0}")]
    Redact(#[from] redact::RedactError),
    #[error("HTTP client: {0}")]
    Http(String),
    #[error(transparent)]
    Serve(#[from] serve::ServeError),
    #[error(transparent)]
    Tls(#[from] listener::TlsError),
    #[error("invalid address {0}")]
    Address(String),
    #[error("cannot read the admin token file {path}: {source}")]
    AdminToken {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("shared rate limits (`storage.url`): {0}")]
    SharedLimits(sqlx::Error),
    #[error("cannot write the bootstrap key file {path}: {source}")]
    Bootstrap {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// A running gateway.
pub struct RunningGateway {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub state: state::Shared,
    /// The `/metrics` listener, when one was asked for.
    pub metrics: Option<securellm_common::prometheus::MetricsServer>,
    stop: Option<oneshot::Sender<()>>,
    http_stop: Option<oneshot::Sender<()>>,
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    http: JoinHandle<Result<(), std::io::Error>>,
}

impl RunningGateway {
    /// Stop both listeners and flush the audit log.
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(s) = self.http_stop.take() {
            let _ = s.send(());
        }
        // Both listeners drain their requests in flight concurrently (the HTTP one for up to
        // 10 s); the audit rows those requests write on their way out are flushed after.
        let grace = Duration::from_secs(12);
        tokio::join!(
            serve::finish_within(&mut self.grpc, grace),
            serve::finish_within(&mut self.http, grace),
        );
        self.state.audit.flush().await;
    }
}

/// A channel to an internal service whose calls carry the internal token.
fn channel(
    addr: &str,
    cfg: &GatewayConfig,
    call_timeout: Option<Duration>,
) -> Result<securellm_common::internal_auth::AuthChannel, StartError> {
    // HTTP/2 keepalive pings find a peer whose network was cut off (no reset ever comes) within
    // seconds, so the next call connects again instead of waiting on the dead connection; mutual
    // TLS when `[internal_tls]` is configured.
    let tls = cfg.internal_tls.as_ref().map(|t| t.read()).transpose()?;
    let endpoint = securellm_common::mtls::endpoint(addr, tls.as_ref(), None, call_timeout)?;
    let channel = endpoint.connect_lazy();
    Ok(securellm_common::internal_auth::authenticated(
        channel,
        cfg.internal_token.as_ref(),
    ))
}

/// This replica's audit chain when `[storage] replica_id` is not set: `<hostname>:<HTTP port>`
/// (stable across restarts); with port 0, a random suffix instead of the port.
fn default_replica_id(http_listen: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "gateway".into());
    match http_listen.rsplit_once(':').map(|(_, p)| p) {
        Some(port) if port != "0" && !port.is_empty() => format!("{host}:{port}"),
        _ => {
            let mut b = [0u8; 4];
            let _ = getrandom::fill(&mut b);
            format!("{host}:{}", hex::encode(b))
        }
    }
}

/// Open the key store and audit log, then serve HTTP and gRPC.
pub async fn start(cfg: &GatewayConfig) -> Result<RunningGateway, StartError> {
    securellm_common::tls::install_crypto_provider();
    let data = cfg
        .data_dir
        .clone()
        .unwrap_or_else(securellm_common::config::default_data_dir);
    private_dir(&data).map_err(|source| StartError::DataDir {
        path: data.clone(),
        source,
    })?;
    // Keys and rate limits: in this gateway (SQLite, memory), or shared by every gateway on one
    // PostgreSQL database.
    let (keys, shared_limits) = match &cfg.storage.url {
        None => (
            keys::KeyStore::open(&data.join("gateway-keys.db")).await?,
            None,
        ),
        Some(url) => {
            let keys = keys::KeyStore::open_postgres(url).await?;
            let limits = limits::shared::SharedLimiter::open(
                url,
                Duration::from_millis(cfg.request_timeout_ms),
                cfg.storage.when_unreachable,
            )
            .await
            .map_err(StartError::SharedLimits)?;
            (keys, Some(limits))
        }
    };
    if let Some(path) = &cfg.bootstrap_key_file
        && keys.is_empty()
    {
        let (secret, rec) = keys
            .create(keys::NewKey {
                name: "bootstrap".into(),
                models: vec!["*".into()],
                ..Default::default()
            })
            .await?;
        write_secret(path, &secret).map_err(|source| StartError::Bootstrap {
            path: path.clone(),
            source,
        })?;
        tracing::info!(key = %rec.id, "created the first API key; its secret is in {}", path.display());
    }
    let jwt = cfg.jwt.as_ref().map(jwt::JwtVerifier::new).transpose()?;
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .build()
        .map_err(|e| StartError::Http(e.to_string()))?;
    let clouds = cloud::from_config(&cfg.upstreams, &http)?;
    let patterns: Vec<(String, String)> = cfg
        .redact_patterns
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let redactor = redact::Redactor::new(&patterns)?;
    let audit_options = audit::AuditOptions {
        linger: Duration::from_millis(cfg.audit_linger_ms),
        ..Default::default()
    };
    let audit = match &cfg.storage.url {
        None => audit::AuditLog::open_with(&data.join("gateway-audit.db"), audit_options).await?,
        Some(url) => {
            let s = &cfg.storage;
            let pg = audit::PgAuditOptions {
                chain_id: s
                    .replica_id
                    .clone()
                    .unwrap_or_else(|| default_replica_id(&cfg.http_listen)),
                signing_key: s
                    .audit_signing_key_file
                    .as_deref()
                    .map(audit::checkpoint::SigningKey::load)
                    .transpose()?,
                trusted_key: s
                    .audit_public_key
                    .as_deref()
                    .map(audit::checkpoint::parse_public_key)
                    .transpose()?,
                checkpoint_interval: Duration::from_millis(s.checkpoint_interval_ms),
                export_file: s.checkpoint_export_file.clone(),
            };
            audit::AuditLog::open_postgres(url, pg, audit_options).await?
        }
    };
    // Registry calls are short (the model list); the backend manager's answers stream for as
    // long as generation runs, so only the registry's calls are bounded.
    let local = upstream::Local::new(
        channel(&cfg.backend, cfg, None)?,
        channel(&cfg.registry, cfg, Some(Duration::from_secs(5)))?,
    );
    let state = Arc::new(state::AppState {
        keys,
        jwt,
        upstreams: upstream::Upstreams {
            remote: clouds
                .into_iter()
                .map(|c| Arc::new(c) as Arc<dyn upstream::Upstream>)
                .collect(),
            local: Arc::new(local),
        },
        redactor,
        audit,
        limits: ratelimit::RateLimiter::new(),
        shared_limits,
        inflight: inflight::InFlight::new(
            cfg.max_inflight_per_key as usize,
            cfg.max_inflight_per_address as usize,
        ),
        audit_sync: cfg.audit_mode == config::AuditMode::Sync,
        body_read_timeout: Duration::from_millis(cfg.body_read_timeout_ms),
        request_timeout: Duration::from_millis(cfg.request_timeout_ms),
        max_tokens_cap: cfg.max_tokens_cap,
    });
    {
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                st.limits.retain_recent();
            }
        });
    }
    let http_listener = tokio::net::TcpListener::bind(&cfg.http_listen)
        .await
        .map_err(|source| serve::ServeError::Bind {
            addr: cfg.http_listen.clone(),
            source,
        })?;
    let http_addr = http_listener
        .local_addr()
        .map_err(|source| serve::ServeError::Bind {
            addr: cfg.http_listen.clone(),
            source,
        })?;
    let token_path = cfg
        .admin_token_file
        .clone()
        .unwrap_or_else(|| data.join("admin-token"));
    let from_env = std::env::var("SECURELLM_ADMIN_TOKEN")
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty());
    let admin_token: secrecy::SecretString =
        match from_env.map(Ok).unwrap_or_else(|| read_secret(&token_path)) {
            Ok(t) => t.trim().to_string(),
            // Only a missing file gets a new token; one that cannot be read is an error (a
            // replaced token would lock the operator out without a word).
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(StartError::AdminToken {
                    path: token_path.clone(),
                    source: e,
                });
            }
            Err(_) => {
                let mut raw = [0u8; 32];
                getrandom::fill(&mut raw).map_err(|e| StartError::Http(e.to_string()))?;
                let t = hex::encode(raw);
                write_secret(&token_path, &t).map_err(|source| StartError::Bootstrap {
                    path: token_path.clone(),
                    source,
                })?;
                tracing::info!("created the admin token in {}", token_path.display());
                t
            }
        }
        .into();
    // The management operations behind both admin doors (gRPC `GatewayAdmin`, HTTP `/admin/v1`).
    let management = management::Management::new(
        state.clone(),
        admin_token,
        channel(&cfg.scheduler, cfg, None)?,
        channel(&cfg.registry, cfg, None)?,
        channel(&cfg.backend, cfg, None)?,
        management::Addresses {
            scheduler: cfg.scheduler.clone(),
            registry: cfg.registry.clone(),
            backend: cfg.backend.clone(),
        },
    );
    let tls = cfg.tls.as_ref().map(listener::tls_config).transpose()?;
    let router = http::router(
        state.clone(),
        management.clone(),
        cfg.max_body.0 as usize,
        Duration::from_millis(cfg.body_read_timeout_ms),
    );
    let (http_stop, http_rx) = oneshot::channel::<()>();
    let http = tokio::spawn(listener::serve(
        http_listener,
        router,
        tls.clone(),
        listener::Limits {
            max_connections: cfg.max_connections as usize,
            header_read_timeout: Duration::from_millis(cfg.header_read_timeout_ms),
            max_header_bytes: cfg.max_header_bytes.0 as usize,
        },
        http_rx,
        Duration::from_secs(10),
    ));
    let metrics = match cfg.metrics_listen.as_deref() {
        Some(a) => {
            observe::enable();
            // State gauges (the audit writer's queue, rows written and dropped) are read from
            // the writer just before each scrape, not on the request path.
            let st = state.clone();
            let collect: securellm_common::prometheus::Collect = Arc::new(move || {
                let st = st.clone();
                Box::pin(async move { observe::audit_state(st.audit.stats()) })
            });
            Some(securellm_common::prometheus::serve(a, "securellm-gateway", Some(collect)).await?)
        }
        None => None,
    };
    let listener = serve::bind(&cfg.listen).await?;
    let grpc_addr = listener.addr;
    let health = serve::health_service(&[
        securellm_proto::service_names::GATEWAY,
        securellm_proto::service_names::GATEWAY_ADMIN,
    ])
    .await;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (incoming, active_calls) = listener::grpc_incoming(
        listener.into_listener(),
        tls.clone(),
        cfg.max_connections as usize,
        Duration::from_millis(cfg.header_read_timeout_ms),
        Duration::from_millis(cfg.body_read_timeout_ms),
    );
    let router = tonic::transport::Server::builder()
        .max_concurrent_streams(256)
        .http2_max_header_list_size(u32::try_from(cfg.max_header_bytes.0).unwrap_or(u32::MAX))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .layer(active_calls)
        .layer(securellm_common::telemetry::GrpcTraceLayer)
        .add_service(health)
        .add_service(serve::reflection_v1()?)
        .add_service(serve::reflection_v1alpha()?)
        .add_service(grpc::GatewayService::new(
            state.clone(),
            cfg.max_body.0 as usize,
        ))
        .add_service(admin::AdminService::new(state.clone(), management));
    let stopped = async {
        let _ = stop_rx.await;
    };
    let grpc = tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped));
    Ok(RunningGateway {
        grpc_addr,
        http_addr,
        state,
        metrics,
        stop: Some(stop_tx),
        http_stop: Some(http_stop),
        grpc,
        http,
    })
}

/// Write a secret file: a new file of mode 0600 beside `path`, then renamed over it (an existing
/// file, or a link planted there, is replaced, never written through). A missing parent directory
/// is created with mode 0700.
fn write_secret(path: &std::path::Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        writeln!(f, "{secret}")?;
        f.sync_all()
    })();
    match written.and_then(|()| std::fs::rename(&tmp, path)) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Read a secret file, first tightening it to 0600 if others could read it (with a warning).
fn read_secret(path: &std::path::Path) -> std::io::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)?;
    let mode = meta.permissions().mode() & 0o777;
    // A systemd credential is root's, read through an ACL: its mode bits say nothing.
    if meta.is_file() && securellm_common::internal_auth::may_be_read_by_others(mode, path) {
        tracing::warn!(
            "{} was readable by others (mode {:o}); setting it to 0600",
            path.display(),
            meta.permissions().mode() & 0o777
        );
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    std::fs::read_to_string(path)
}

/// The data directory, private to this user: created with mode 0700, or tightened to 0700 (with
/// a warning) if it exists with access for others. Key hashes and audit rows live there.
pub(crate) fn private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            "data directory {} was open to others (mode {:o}); setting it to 0700",
            dir.display(),
            mode & 0o777
        );
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// A database file private to this user: created empty with mode 0600 if missing (SQLite takes an
/// empty file as a new database and gives its `-wal` / `-shm` / `-journal` files the same mode);
/// tightened to 0600, with the files beside it, if it exists with access for others.
pub(crate) fn private_file(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let p = std::path::PathBuf::from(p);
        if let Ok(m) = std::fs::symlink_metadata(&p)
            && m.is_file()
            && m.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                "{} was open to others (mode {:o}); setting it to 0600",
                p.display(),
                m.permissions().mode() & 0o777
            );
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(())
}
