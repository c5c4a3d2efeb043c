//! The listeners. HTTP: plain or TLS (rustls, TLS 1.2 and 1.3, ALPN `h2` / `http/1.1`), HTTP/1.1 and
//! HTTP/2 on the same port, with the limits that keep slow or idle clients from exhausting the
//! gateway:
//!
//! - **connections**: at most `max_connections` at once; beyond that new connections wait in the
//!   kernel's accept queue (back-pressure) instead of costing a task and buffers each;
//! - **first bytes / TLS handshake**: must arrive (finish) within `header_read_timeout`;
//! - **idle connections** (HTTP/1.1 and HTTP/2, an unfinished HTTP/2 preface included): closed
//!   after `header_read_timeout` with no request in progress or started;
//! - **request headers** (HTTP/1.1): must arrive completely within `header_read_timeout` of the
//!   connection opening or of the previous response ending, so an idle keep-alive connection is
//!   closed after that long too (slowloris on headers, idle connections); at most
//!   `max_header_bytes` of them (431 / connection closed beyond);
//! - **HTTP/2**: header list at most `max_header_bytes`, at most 256 concurrent streams per
//!   connection, keep-alive pings every 30 s (a dead peer is dropped after 20 s without an answer);
//! - **request bodies**: `body_read_timeout` for the whole body (slowloris on bodies, see
//!   `app::router`), at most `max_body` bytes.
//!
//! gRPC: [`grpc_incoming`] caps the gRPC port's connections the same way and, with TLS
//! configured, turns them into TLS ones (same certificate, ALPN `h2`) before tonic sees them;
//! tonic itself limits streams per connection, header size and keeps connections alive by ping.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot};
use tower::ServiceExt;

/// `[gateway.tls]`: serve the HTTP API over TLS.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain (leaf first).
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

/// Why TLS cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("invalid `gateway.tls.cert_file` {path}: {message}")]
    Cert { path: PathBuf, message: String },
    #[error("invalid `gateway.tls.key_file` {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("invalid `gateway.tls`: {0}")]
    Config(String),
}

/// Load the certificate and key into a rustls server config (TLS 1.2+, ALPN h2 and http/1.1).
pub fn tls_config(c: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let cert_err = |m: String| TlsError::Cert {
        path: c.cert_file.clone(),
        message: m,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&c.cert_file)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(cert_err("no PEM certificate in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(&c.key_file).map_err(|e| TlsError::Key {
        path: c.key_file.clone(),
        message: e.to_string(),
    })?;
    let mut cfg = rustls::ServerConfig::builder_with_protocol_versions(&[
        &rustls::version::TLS13,
        &rustls::version::TLS12,
    ])
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Connection-level limits.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
}

/// The next connection, with `TCP_NODELAY` set. Accept errors (EMFILE and friends) back off
/// instead of spinning.
async fn accept(listener: &TcpListener) -> (tokio::net::TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((tcp, addr)) => {
                let _ = tcp.set_nodelay(true);
                return (tcp, addr);
            }
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serve `router` on `listener` until `stop` fires; then stop accepting, let requests in flight
/// finish (at most `drain` long) and return.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: Limits,
    stop: oneshot::Receiver<()>,
    drain: Duration,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // The read buffer bounds the request head; hyper answers 431 beyond it.
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let builder = Arc::new(builder);
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut stop = stop;
    loop {
        let permit = tokio::select! {
            _ = &mut stop => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (tcp, addr) = tokio::select! {
            _ = &mut stop => break,
            c = accept(&listener) => c,
        };
        let router = router.clone();
        let builder = builder.clone();
        let acceptor = acceptor.clone();
        let handshake = limits.header_read_timeout;
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let activity = Activity::new();
            let act = activity.clone();
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo::<SocketAddr>(addr));
                // Counted from the request until its response body is done (or dropped).
                let busy = Busy::new(act.clone());
                let answer = router.clone().oneshot(req);
                async move {
                    let r = answer.await?;
                    Ok::<_, std::convert::Infallible>(r.map(|b| {
                        axum::body::Body::new(Counted {
                            inner: b,
                            _busy: busy,
                        })
                    }))
                }
            });
            // The idle watchdog runs as its own task (it wakes only at its deadlines) and signals
            // through a oneshot, cheap to poll on every wake of the busy connection.
            let (idle_tx, idle_rx) = oneshot::channel::<()>();
            let watchdog = AbortOnDrop(tokio::spawn(async move {
                idle_for(activity, handshake).await;
                let _ = idle_tx.send(());
            }));
            let served = async move {
                match acceptor {
                    None => {
                        // The first bytes decide HTTP/1.1 vs HTTP/2 and hyper's header timer only
                        // starts after them: a connection that sends nothing at all is closed here.
                        let mut probe = [0u8; 1];
                        if !matches!(
                            tokio::time::timeout(handshake, tcp.peek(&mut probe)).await,
                            Ok(Ok(n)) if n > 0
                        ) {
                            return Ok(());
                        }
                        let conn = builder.serve_connection(TokioIo::new(tcp), svc);
                        watcher.watch(conn.into_owned()).await
                    }
                    Some(acceptor) => {
                        let stream =
                            match tokio::time::timeout(handshake, acceptor.accept(tcp)).await {
                                Ok(Ok(s)) => s,
                                Ok(Err(e)) => {
                                    tracing::debug!(%addr, "TLS handshake failed: {e}");
                                    return Ok(());
                                }
                                Err(_) => {
                                    tracing::debug!(%addr, "TLS handshake timed out");
                                    return Ok(());
                                }
                            };
                        let conn = builder.serve_connection(TokioIo::new(stream), svc);
                        watcher.watch(conn.into_owned()).await
                    }
                }
            };
            // A connection with no request in progress and none started for the idle time is
            // closed, whatever the protocol stage: an unfinished HTTP/2 preface, an idle HTTP/2
            // connection kept up by pings, an idle HTTP/1.1 keep-alive.
            let result = tokio::select! {
                biased;
                r = served => r,
                Ok(()) = idle_rx => {
                    tracing::debug!(%addr, "idle connection closed");
                    return;
                }
            };
            drop(watchdog);
            if let Err(e) = result {
                tracing::debug!(%addr, "connection ended: {e}");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("HTTP connections still open after {drain:?}; closing them");
    }
    Ok(())
}

/// Anything a gRPC connection can run over (TCP, TLS over TCP).
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

/// A connection of the gRPC port: plain or TLS, carrying the peer address like a TCP one and
/// a connection slot that is given back when tonic drops it.
pub struct GrpcConn {
    io: Box<dyn Io>,
    info: tonic::transport::server::TcpConnectInfo,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl tonic::transport::server::Connected for GrpcConn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl tokio::io::AsyncRead for GrpcConn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for GrpcConn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Connections of the gRPC port for tonic: at most `max_connections` at once (more wait in the
/// accept queue), TLS when configured (ALPN `h2`; handshakes in their own tasks, each holding a
/// slot, within `handshake`). The accept task ends when the stream is dropped.
pub fn grpc_incoming(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    max_connections: usize,
    handshake: Duration,
) -> impl futures::Stream<Item = std::io::Result<GrpcConn>> + Send + 'static {
    let acceptor = tls.map(|tls| {
        let mut cfg = (*tls).clone();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
    });
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<GrpcConn>>(64);
    tokio::spawn(async move {
        loop {
            let slot = tokio::select! {
                _ = tx.closed() => return,
                s = slots.clone().acquire_owned() => match s {
                    Ok(s) => s,
                    Err(_) => return,
                },
            };
            let (tcp, remote) = tokio::select! {
                _ = tx.closed() => return,
                c = accept(&listener) => c,
            };
            let info = tonic::transport::server::TcpConnectInfo {
                local_addr: tcp.local_addr().ok(),
                remote_addr: Some(remote),
            };
            let Some(acceptor) = acceptor.clone() else {
                let conn = GrpcConn {
                    io: Box::new(tcp),
                    info,
                    _slot: slot,
                };
                if tx.send(Ok(conn)).await.is_err() {
                    return;
                }
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(handshake, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let conn = GrpcConn {
                            io: Box::new(stream),
                            info,
                            _slot: slot,
                        };
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%remote, "gRPC TLS handshake failed: {e}"),
                    Err(_) => tracing::debug!(%remote, "gRPC TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Requests in progress on one connection and when that count last changed.
struct Activity {
    active: std::sync::atomic::AtomicUsize,
    changed: std::sync::Mutex<tokio::time::Instant>,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            active: std::sync::atomic::AtomicUsize::new(0),
            changed: std::sync::Mutex::new(tokio::time::Instant::now()),
        })
    }

    fn touch(&self) {
        if let Ok(mut t) = self.changed.lock() {
            *t = tokio::time::Instant::now();
        }
    }
}

/// One request in progress (from its head to the end of its response body).
struct Busy(Arc<Activity>);

impl Busy {
    fn new(a: Arc<Activity>) -> Self {
        a.active.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        a.touch();
        Self(a)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0
            .active
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A response body that keeps its request counted as in progress until it is done.
struct Counted {
    inner: axum::body::Body,
    _busy: Busy,
}

impl hyper::body::Body for Counted {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Resolves once the connection has had no request in progress for `limit`.
async fn idle_for(a: Arc<Activity>, limit: Duration) {
    loop {
        let since = a
            .changed
            .lock()
            .map(|t| *t)
            .unwrap_or_else(|_| tokio::time::Instant::now());
        let deadline = since + limit;
        if a.active.load(std::sync::atomic::Ordering::SeqCst) == 0
            && tokio::time::Instant::now() >= deadline
        {
            return;
        }
        let next = if tokio::time::Instant::now() >= deadline {
            tokio::time::Instant::now() + limit
        } else {
            deadline
        };
        tokio::time::sleep_until(next).await;
    }
}

/// Aborts the task when dropped (a connection's watchdog ends with the connection).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
