//! backend-manager: makes a model answer.
//!
//! - [`backend`]: engines behind one trait: llama.cpp (tested for real), Ollama, vLLM, TGI (tested
//!   against fakes of their HTTP APIs and command lines).
//! - [`process`]: supervised children (own process group, die with the manager, no zombies).
//! - [`lifecycle`]: an instance's life cycle as a pure state machine (`step(state, event, now)`
//!   → new state and actions), unit-tested without processes.
//! - [`instance`]: one actor per model instance that only performs the life cycle's actions
//!   (leases, child processes, tickets, timers) and feeds it what happens.
//! - [`manager`]: model resolution, the routing table, the scheduler watch (evictions, re-attach).
//! - [`forward`]: OpenAI-shaped requests to the upstream over pooled HTTP, SSE relayed chunk by
//!   chunk.
//! - [`grpc`]: the `securellm.v1.BackendManager` edge.
//! - [`metrics`]: the Prometheus metrics. Spans: `backend.resolve`, `backend.lease_wait`,
//!   `backend.load` (in the instance actor, under the span of the request that caused the load),
//!   `backend.forward` (its trace context goes to the engine in `traceparent`) with a
//!   `first token` event.

pub mod backend;
pub mod config;
pub mod forward;
pub mod grpc;
pub mod instance;
pub mod lifecycle;
pub mod manager;
pub mod metrics;
pub mod process;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use securellm_common::internal_auth::{self, AuthChannel};
use securellm_common::serve;
use securellm_proto::v1::model_registry_client::ModelRegistryClient;
use securellm_proto::v1::vram_scheduler_client::VramSchedulerClient;
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;

use crate::config::BackendConfig;
use crate::instance::Shared;
use crate::manager::Manager;

/// Why the manager could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    InternalTls(#[from] securellm_common::mtls::MtlsError),
    #[error("invalid address {addr}: {message}")]
    Address { addr: String, message: String },
    #[error(transparent)]
    Serve(#[from] serve::ServeError),
    #[error("HTTP client: {0}")]
    Http(String),
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// A running backend manager.
pub struct RunningManager {
    pub manager: Manager,
    pub addr: SocketAddr,
    /// The `/metrics` listener, when one was asked for.
    pub metrics: Option<securellm_common::prometheus::MetricsServer>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningManager {
    /// Stop serving, unload every model (children stopped, leases released).
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.manager.unload_all().await;
        securellm_common::serve::finish(&mut self.server).await;
    }
}

/// How long a registry call may take before it counts as the registry being unreachable (a
/// loaded model then goes on answering from the last resolution; a new load is refused).
pub(crate) const REGISTRY_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// A channel to `addr` whose calls carry the internal token. HTTP/2 keepalive pings find a peer
/// that went silent (its network cut off: no reset ever comes) within seconds, so the next call
/// connects again instead of waiting on the dead connection; `call_timeout` bounds every call
/// (`None` for the scheduler, whose lease waits and event stream are long by design).
fn lazy_channel(
    addr: &str,
    cfg: &BackendConfig,
    call_timeout: Option<Duration>,
) -> Result<AuthChannel, StartError> {
    let tls = cfg.internal_tls.as_ref().map(|t| t.read()).transpose()?;
    let endpoint = securellm_common::mtls::endpoint(
        addr,
        tls.as_ref(),
        Some(Duration::from_secs(2)),
        call_timeout,
    )?;
    let channel = endpoint.connect_lazy();
    Ok(internal_auth::authenticated(
        channel,
        cfg.internal_token.as_ref(),
    ))
}

/// Start the manager with the llama.cpp backend and the Ollama / vLLM / TGI backends configured.
pub async fn start(cfg: &BackendConfig) -> Result<RunningManager, StartError> {
    securellm_common::tls::install_crypto_provider();
    let http = reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .build()
        .map_err(|e| StartError::Http(e.to_string()))?;
    cfg.validate_backends()
        .map_err(|(field, message)| StartError::Config(format!("backend.{field}: {message}")))?;
    let backends = backend::Backends::from_config(cfg, &http);
    tracing::info!("llama-server: {}", cfg.llama_server_path().display());
    if let Some(o) = &cfg.ollama {
        tracing::info!("Ollama daemon: {}", o.url);
    }
    for (name, e) in [("vLLM", &cfg.vllm), ("TGI", &cfg.tgi)] {
        if let Some(e) = e {
            match (&e.endpoint, &e.command) {
                (Some(ep), _) => tracing::info!("{name}: attached at {ep}"),
                (None, Some(c)) => tracing::info!("{name}: {}", c.join(" ")),
                (None, None) => tracing::info!("{name}: default command"),
            }
        }
    }
    let (events, _) = broadcast::channel(1024);
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        backends,
        http,
        scheduler: VramSchedulerClient::new(lazy_channel(&cfg.scheduler, cfg, None)?),
        registry: ModelRegistryClient::new(lazy_channel(
            &cfg.registry,
            cfg,
            Some(REGISTRY_CALL_TIMEOUT),
        )?),
        events,
    });
    let manager = Manager::new(shared);
    let metrics = match cfg.metrics_listen.as_deref() {
        Some(a) => {
            securellm_common::prometheus::recorder();
            metrics::describe();
            Some(
                securellm_common::prometheus::serve(
                    a,
                    "backend-manager",
                    Some(metrics::collect(manager.clone())),
                )
                .await?,
            )
        }
        None => None,
    };
    let listener = serve::bind(&cfg.listen).await?;
    let addr = listener.addr;
    let health = serve::health_service(&[securellm_proto::service_names::BACKEND]).await;
    let svc = grpc::BackendService::new(manager.clone()).into_server();
    let tls = cfg.internal_tls.as_ref().map(|t| t.read()).transpose()?;
    securellm_common::mtls::warn_if_plaintext("backend-manager", &cfg.listen, tls.as_ref());
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
            .layer(internal_auth::require(
                cfg.internal_token.as_ref(),
                "backend-manager",
            ))
            .add_service(health)
            .add_service(serve::reflection_v1()?)
            .add_service(serve::reflection_v1alpha()?)
            .add_service(svc)
            .serve_with_incoming_shutdown(listener.incoming(), async {
                let _ = stop_rx.await;
            }),
    );
    Ok(RunningManager {
        manager,
        addr,
        metrics,
        stop: Some(stop_tx),
        server,
    })
}
