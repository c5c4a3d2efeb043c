//! registry: finds every model on disk, parses its header, estimates its memory, keeps it in
//! SQLite.
//!
//! - [`discover`]: walk the roots; which files form which model (no parsing).
//! - [`fence`]: the only way files are stamped or opened: regular files under the roots.
//! - [`record`]: a model record, built from a discovery candidate by parsing headers only.
//! - [`safetensors`]: safetensors headers and `config.json`.
//! - [`estimate`]: the memory estimate, term by term (pure).
//! - [`store`]: SQLite (sqlx, WAL, embedded migrations).
//! - [`catalog`]: the actor that owns the model set; scans run beside it.
//! - [`watch`]: inotify → debounced incremental rescans.
//! - [`grpc`]: the `securellm.v1.ModelRegistry` edge.
//! - [`metrics`]: the Prometheus metrics; spans `registry.scan` and `registry.estimate`.

pub mod catalog;
pub mod config;
pub mod discover;
pub mod estimate;
pub mod fence;
pub mod grpc;
pub mod metrics;
pub mod record;
pub mod safetensors;
pub mod store;
pub mod watch;

use std::net::SocketAddr;
use std::time::Duration;

use securellm_common::serve;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::catalog::Catalog;
use crate::config::RegistryConfig;

/// Why the registry could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    InternalTls(#[from] securellm_common::mtls::MtlsError),
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Catalog(#[from] catalog::RegistryError),
    #[error(transparent)]
    Serve(#[from] serve::ServeError),
}

/// A running registry.
pub struct RunningRegistry {
    pub catalog: Catalog,
    pub addr: SocketAddr,
    /// The `/metrics` listener, when one was asked for.
    pub metrics: Option<securellm_common::prometheus::MetricsServer>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    _watch: Option<watch::WatchGuard>,
}

impl RunningRegistry {
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        securellm_common::serve::finish(&mut self.server).await;
    }
}

/// Open the database, load the catalogue, scan once, start the watch and the gRPC server.
pub async fn start(cfg: &RegistryConfig) -> Result<RunningRegistry, StartError> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(|source| StartError::DataDir {
        path: cfg.data_dir.clone(),
        source,
    })?;
    if cfg.registry.metrics_listen.is_some() {
        // Before the first scan, so that it is counted.
        securellm_common::prometheus::recorder();
        metrics::describe();
    }
    let db = cfg.data_dir.join("registry.db");
    let store = store::Store::open(&db).await?;
    let params = estimate::EstimateParams {
        runtime_overhead: cfg.registry.runtime_overhead.0,
        ..estimate::EstimateParams::default()
    };
    let catalog = catalog::spawn(store, cfg.roots.clone(), cfg.aliases.clone(), params).await?;
    if cfg.roots.is_empty() {
        tracing::warn!(
            "no model roots configured (--models DIR, SECURELLM_MODELS or models.roots)"
        );
    }
    let first = catalog.rescan(Vec::new(), false, None).await?;
    tracing::info!(
        "scan: {} files, {} parsed, {} unchanged, {} failed; models +{} ~{} -{} ({} ms)",
        first.files_seen,
        first.files_parsed,
        first.files_unchanged,
        first.files_failed,
        first.added,
        first.changed,
        first.removed,
        first.elapsed_ms
    );
    let watch = if cfg.registry.watch && !cfg.roots.is_empty() {
        match watch::start(
            catalog.clone(),
            cfg.roots.clone(),
            Duration::from_millis(cfg.registry.watch_debounce_ms),
        ) {
            Ok(g) => Some(g),
            Err(e) => {
                tracing::warn!("filesystem watch unavailable ({e}); use Rescan");
                None
            }
        }
    } else {
        None
    };
    let metrics = match cfg.registry.metrics_listen.as_deref() {
        Some(a) => Some(
            securellm_common::prometheus::serve(
                a,
                "registry",
                Some(metrics::collect(catalog.clone())),
            )
            .await?,
        ),
        None => None,
    };
    let listener = serve::bind(&cfg.registry.listen).await?;
    let addr = listener.addr;
    let health = serve::health_service(&[securellm_proto::service_names::REGISTRY]).await;
    let svc = grpc::RegistryService::new(catalog.clone()).into_server();
    let tls = cfg
        .registry
        .internal_tls
        .as_ref()
        .map(|t| t.read())
        .transpose()?;
    securellm_common::mtls::warn_if_plaintext("registry", &cfg.registry.listen, tls.as_ref());
    let mut builder = tonic::transport::Server::builder();
    if let Some(m) = &tls {
        builder = builder
            .tls_config(m.server())
            .map_err(|e| securellm_common::mtls::MtlsError::Tls(e.to_string()))?;
    }
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(
        builder
            .layer(securellm_common::telemetry::GrpcTraceLayer)
            .layer(securellm_common::internal_auth::require(
                cfg.registry.internal_token.as_ref(),
                "registry",
            ))
            .add_service(health)
            .add_service(serve::reflection_v1()?)
            .add_service(serve::reflection_v1alpha()?)
            .add_service(svc)
            .serve_with_incoming_shutdown(listener.incoming(), async {
                let _ = stop_rx.await;
            }),
    );
    Ok(RunningRegistry {
        catalog,
        addr,
        metrics,
        stop: Some(stop_tx),
        server,
        _watch: watch,
    })
}
