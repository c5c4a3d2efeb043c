//! vram-scheduler: the single source of truth for GPU memory.
//!
//! - [`table`]: every scheduling decision as pure functions over plain data (tested without a
//!   runtime, property-tested for the invariant `granted + foreign + reserve <= total`).
//! - [`actor`]: one task owns the table; [`actor::SchedulerHandle`] is the API.
//! - [`inventory`]: NVML, or simulated GPUs where there is no NVIDIA driver.
//! - [`decisions`]: every GPU decision in a hash-chained, verifiable file.
//! - [`persist`]: the lease snapshot that lets holders re-attach after a restart.
//! - [`grpc`]: the thin `securellm.v1.VramScheduler` edge.
//! - [`config`]: the `[scheduler]` section and flags.
//! - [`metrics`]: the Prometheus metrics (state gauges read from the actor at scrape time,
//!   counters from its events).

pub mod actor;
pub mod config;
pub mod decisions;
pub mod grpc;
pub mod inventory;
pub mod metrics;
pub mod persist;
pub mod table;

use std::net::SocketAddr;
use std::time::Duration;

use securellm_common::format_bytes;
use securellm_common::serve;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::actor::{PersistOptions, SchedulerHandle};
use crate::config::{InventoryMode, SchedulerConfig};
use crate::inventory::Inventory;
use crate::table::LeaseTable;

/// Why the scheduler could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    InternalTls(#[from] securellm_common::mtls::MtlsError),
    #[error(transparent)]
    Inventory(#[from] inventory::InventoryError),
    #[error(transparent)]
    Persist(#[from] persist::PersistError),
    #[error(transparent)]
    Decisions(#[from] decisions::DecisionError),
    #[error(transparent)]
    Serve(#[from] serve::ServeError),
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// A running scheduler: its handle, its address, and how to stop it.
pub struct RunningScheduler {
    pub handle: SchedulerHandle,
    pub addr: SocketAddr,
    pub inventory: &'static str,
    /// The `/metrics` listener, when one was asked for.
    pub metrics: Option<securellm_common::prometheus::MetricsServer>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningScheduler {
    /// Stop serving, write the snapshot, and wait for the server to finish.
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = self.handle.flush().await;
        securellm_common::serve::finish(&mut self.server).await;
    }
}

/// Choose the inventory the configuration asks for, and say which in the log.
fn open_inventory(cfg: &SchedulerConfig) -> Result<(Inventory, Vec<table::Gpu>), StartError> {
    let reserve = cfg.reserve.0;
    let simulated = |sizes: &[securellm_common::ByteSize]| {
        let sizes: Vec<u64> = if sizes.is_empty() {
            vec![24 << 30]
        } else {
            sizes.iter().map(|s| s.0).collect()
        };
        let gpus = inventory::simulated(&sizes, reserve);
        tracing::info!(
            "inventory: simulated GPUs ({})",
            gpus.iter()
                .map(|g| format_bytes(g.total))
                .collect::<Vec<_>>()
                .join(", ")
        );
        (Inventory::Simulated, gpus)
    };
    match cfg.inventory {
        InventoryMode::Simulated => Ok(simulated(&cfg.simulate_gpus)),
        InventoryMode::Nvml => {
            let (inv, gpus) = inventory::open_nvml(reserve)?;
            log_nvml(&gpus);
            Ok((inv, gpus))
        }
        InventoryMode::Auto => {
            if !cfg.simulate_gpus.is_empty() {
                return Ok(simulated(&cfg.simulate_gpus));
            }
            match inventory::open_nvml(reserve) {
                Ok((inv, gpus)) => {
                    log_nvml(&gpus);
                    Ok((inv, gpus))
                }
                Err(e) => {
                    tracing::info!("{e}; falling back to simulated GPUs");
                    Ok(simulated(&[]))
                }
            }
        }
    }
}

fn log_nvml(gpus: &[table::Gpu]) {
    for g in gpus {
        tracing::info!(
            "inventory: NVML GPU {} {} ({}) total {} used {}",
            g.index,
            g.name,
            g.uuid,
            format_bytes(g.total),
            format_bytes(g.observed_used)
        );
    }
}

/// Start the scheduler: inventory, actor (with the snapshot restored), NVML refresh, gRPC server
/// with health and reflection.
pub async fn start(cfg: &SchedulerConfig) -> Result<RunningScheduler, StartError> {
    let (inv, gpus) = open_inventory(cfg)?;
    // The key that makes lease ids unguessable (an id is a capability to release memory).
    let id_key = uuid::Uuid::new_v4().simple().to_string();
    let mut table = LeaseTable::new(gpus, cfg.limits(), id_key);
    let mut persist_opts = None;
    if let Some(dir) = &cfg.data_dir {
        std::fs::create_dir_all(dir).map_err(|source| StartError::DataDir {
            path: dir.clone(),
            source,
        })?;
        let path = persist::snapshot_path(dir);
        let snap = persist::load(&path)?;
        let n = snap.leases.len();
        let dropped = table.restore_snapshot(snap, securellm_common::time::now_ms());
        if n > 0 {
            tracing::info!(
                "restored {} lease(s) from {}; holders have one TTL to re-attach",
                n - dropped.len(),
                path.display()
            );
        }
        for l in dropped {
            tracing::warn!(lease = %l.id, holder = %l.holder, "snapshot lease no longer fits; dropped");
        }
        persist_opts = Some(PersistOptions {
            path,
            interval: Duration::from_millis(cfg.persist_interval_ms),
        });
    }
    let decision_log = match &cfg.data_dir {
        Some(dir) => Some(decisions::open_at_start(dir, inv.kind(), table.gpus())?),
        None => None,
    };
    let handle = actor::spawn_with_decisions(table, inv.kind(), persist_opts, decision_log);
    // Subscribed before anything can happen (the actor only publishes after a message), so the
    // counters miss no event. It ends when the actor does.
    metrics::spawn_event_counter(handle.subscribe());

    if let Inventory::Nvml(nvml) = &inv {
        let nvml = nvml.clone();
        let h = handle.clone();
        let every = Duration::from_millis(cfg.refresh_interval_ms);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let n = nvml.clone();
                match tokio::task::spawn_blocking(move || inventory::read_nvml(&n)).await {
                    Ok(Ok(obs)) => {
                        if h.observe(obs).await.is_err() {
                            return;
                        }
                    }
                    Ok(Err(e)) => {
                        metrics::nvml_refresh_error();
                        tracing::warn!("NVML refresh failed: {e}");
                    }
                    Err(e) => {
                        metrics::nvml_refresh_error();
                        tracing::warn!("NVML refresh task failed: {e}");
                    }
                }
            }
        });
    }

    let metrics = match cfg.metrics_listen.as_deref() {
        Some(a) => {
            let collect = metrics::collect(handle.clone());
            let server =
                securellm_common::prometheus::serve(a, "vram-scheduler", Some(collect)).await?;
            metrics::describe();
            Some(server)
        }
        None => None,
    };
    let listener = serve::bind(&cfg.listen).await?;
    let addr = listener.addr;
    let health = serve::health_service(&[securellm_proto::service_names::SCHEDULER]).await;
    let reflection = serve::reflection_v1()?;
    let reflection_alpha = serve::reflection_v1alpha()?;
    let svc = grpc::SchedulerService::new(handle.clone()).into_server();
    let tls = cfg.internal_tls.as_ref().map(|t| t.read()).transpose()?;
    securellm_common::mtls::warn_if_plaintext("vram-scheduler", &cfg.listen, tls.as_ref());
    let mut builder = tonic::transport::Server::builder();
    if let Some(m) = &tls {
        builder = builder
            .tls_config(m.server())
            .map_err(|e| securellm_common::mtls::MtlsError::Tls(e.to_string()))?;
    }
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(
        builder
            .tcp_nodelay(true)
            .layer(securellm_common::telemetry::GrpcTraceLayer)
            .layer(securellm_common::internal_auth::require(
                cfg.internal_token.as_ref(),
                "vram-scheduler",
            ))
            .add_service(health)
            .add_service(reflection)
            .add_service(reflection_alpha)
            .add_service(svc)
            .serve_with_incoming_shutdown(listener.incoming(), async {
                let _ = stop_rx.await;
            }),
    );
    Ok(RunningScheduler {
        handle,
        addr,
        inventory: inv.kind(),
        metrics,
        stop: Some(stop_tx),
        server,
    })
}
