//! Serving a gRPC service the same way in every binary.
//!
//! Every service binds its listener first (so `--listen 127.0.0.1:0` works and the real port is
//! known), registers `grpc.health.v1` and server reflection (v1 and v1alpha) for the SecureLLM
//! contracts, prints exactly one `ready <service> grpc=HOST:PORT` line on stdout once it accepts
//! connections, and stops gracefully on Ctrl-C or SIGTERM.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

/// Errors while setting a server up.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("reflection service: {0}")]
    Reflection(String),
}

/// A bound listener and its resolved address.
pub struct BoundListener {
    pub addr: SocketAddr,
    listener: TcpListenerStream,
}

impl BoundListener {
    /// The listener itself, for callers that accept connections their own way (e.g. TLS).
    pub fn into_listener(self) -> TcpListener {
        self.listener.into_inner()
    }

    /// The accepted connections, with `TCP_NODELAY` set (without it, small gRPC frames wait for
    /// delayed ACKs: 40 ms stalls).
    pub fn incoming(
        self,
    ) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> + Send + 'static
    {
        use tokio_stream::StreamExt;
        self.listener.map(|conn| {
            if let Ok(c) = &conn {
                let _ = c.set_nodelay(true);
            }
            conn
        })
    }
}

/// Bind `addr` (`HOST:PORT`, port 0 picks a free one).
pub async fn bind(addr: &str) -> Result<BoundListener, ServeError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: addr.to_string(),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: addr.to_string(),
        source,
    })?;
    Ok(BoundListener {
        addr: local,
        listener: TcpListenerStream::new(listener),
    })
}

/// The standard health service with the given services (and the server as a whole, "") marked
/// SERVING.
pub async fn health_service(
    serving: &[&str],
) -> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health> {
    let (reporter, service) = tonic_health::server::health_reporter();
    for name in serving.iter().copied().chain([""]) {
        reporter
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
    }
    service
}

/// Server reflection (v1) over every SecureLLM contract.
pub fn reflection_v1() -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    ServeError,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(securellm_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))
}

/// Server reflection (v1alpha), which older tools (grpcurl before 1.9) still ask for.
pub fn reflection_v1alpha() -> Result<
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
    ServeError,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(securellm_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ServeError::Reflection(e.to_string()))
}

/// Print the readiness line supervisors and tests wait for:
/// `ready <service> grpc=HOST:PORT [http=HOST:PORT] [metrics=HOST:PORT]`.
pub fn announce_ready(
    service: &str,
    grpc: SocketAddr,
    http: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
) {
    use std::io::Write;
    let mut line = format!("ready {service} grpc={grpc}");
    if let Some(h) = http {
        line.push_str(&format!(" http={h}"));
    }
    if let Some(m) = metrics {
        line.push_str(&format!(" metrics={m}"));
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown requested");
}

/// How long a stopping server waits for open connections and streams (watchers, idle clients)
/// before it closes them.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Wait for a server task that was told to stop; long-lived streams (event watchers) would keep a
/// graceful shutdown waiting forever, so after [`SHUTDOWN_GRACE`] the task is aborted.
pub async fn finish<T>(server: &mut tokio::task::JoinHandle<T>) {
    finish_within(server, SHUTDOWN_GRACE).await;
}

/// [`finish`] with another grace period (for servers that drain long requests first).
pub async fn finish_within<T>(server: &mut tokio::task::JoinHandle<T>, grace: std::time::Duration) {
    if tokio::time::timeout(grace, &mut *server).await.is_err() {
        server.abort();
        let _ = server.await;
    }
}
