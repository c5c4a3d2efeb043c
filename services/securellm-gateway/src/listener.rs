//! The listeners. HTTP: plain or TLS (rustls, TLS 1.2 and 1.3, ALPN `h2` / `http/1.1`), HTTP/1.1 and
//! HTTP/2 on the same port, with the limits that keep slow or idle clients from exhausting the
//! gateway:
//!
//! - **connections**: at most `max_connections` at once. At the cap, a new connection takes the
//!   place of the one that has had no request in progress for longest, so idle connections cannot
//!   lock callers out; when every connection has a request in progress, new ones wait in the
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
//! - **request bodies**: `body_read_timeout` for the whole body, counted from the request head
//!   however the bytes trickle in (slowloris on bodies, see `http::router`), at most `max_body`
//!   bytes; per-key and per-address caps on requests in progress, checked on the headers before
//!   any body is read (`crate::limits::inflight`).
//!
//! gRPC: [`grpc_incoming`] gives the gRPC port the same connection rules (cap with shedding of
//! the longest-idle connection, the HTTP/2 preface and TLS handshake within
//! `header_read_timeout`, idle connections closed) and, with TLS configured, turns connections
//! into TLS ones (same certificate, ALPN `h2`) before tonic sees them; tonic itself limits streams
//! per connection, header size and keeps connections alive by ping.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
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
    let tracker = Tracker::new(limits.max_connections, "http");
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut stop = stop;
    loop {
        let (tcp, addr) = tokio::select! {
            _ = &mut stop => break,
            c = accept(&listener) => c,
        };
        let slot = tokio::select! {
            _ = &mut stop => break,
            s = tracker.admit() => s,
        };
        let (conn, mut closed) = tracker.register(addr, slot);
        let router = router.clone();
        let builder = builder.clone();
        let acceptor = acceptor.clone();
        let handshake = limits.header_read_timeout;
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let act = conn.activity().clone();
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo::<SocketAddr>(addr));
                // Counted from the request until its response body is done (or dropped).
                let busy = Busy::new(act.clone());
                let answer = router.clone().oneshot(req);
                async move {
                    let r = answer.await?;
                    Ok::<_, std::convert::Infallible>(
                        r.map(|b| axum::body::Body::new(Guarded::new(b, busy))),
                    )
                }
            });
            // The idle watchdog runs as its own task (it wakes only at its deadlines) and signals
            // through a oneshot, cheap to poll on every wake of the busy connection.
            let watchdog = conn.watchdog(handshake);
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
            // connection kept up by pings, an idle HTTP/1.1 keep-alive. So is an idle one shed to
            // make room for a new connection at the cap.
            let result = tokio::select! {
                biased;
                r = served => r,
                _ = &mut closed => {
                    tracing::debug!(%addr, "idle connection closed");
                    return;
                }
            };
            drop(watchdog);
            drop(conn);
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
/// its connection slot, given back when tonic drops it. When the port's tracker closes it (idle
/// too long, or shed at the cap), reads end and writes fail, so hyper ends the connection.
pub struct GrpcConn {
    io: Box<dyn Io>,
    info: tonic::transport::server::TcpConnectInfo,
    closed: Option<oneshot::Receiver<()>>,
    is_closed: bool,
    _watchdog: AbortOnDrop,
    _conn: Conn,
}

impl GrpcConn {
    /// Whether the tracker has closed this connection (registers the waker otherwise).
    fn poll_closed(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        if self.is_closed {
            return true;
        }
        if let Some(rx) = &mut self.closed {
            match std::pin::Pin::new(rx).poll(cx) {
                std::task::Poll::Ready(Ok(())) => {
                    self.is_closed = true;
                    self.closed = None;
                    return true;
                }
                std::task::Poll::Ready(Err(_)) => self.closed = None,
                std::task::Poll::Pending => {}
            }
        }
        false
    }
}

impl tonic::transport::server::Connected for GrpcConn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

fn closed_error() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "connection closed")
}

impl tokio::io::AsyncRead for GrpcConn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.poll_closed(cx) {
            // End of stream: hyper ends the connection.
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for GrpcConn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.poll_closed(cx) {
            return std::task::Poll::Ready(Err(closed_error()));
        }
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.poll_closed(cx) {
            return std::task::Poll::Ready(Err(closed_error()));
        }
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.poll_closed(cx) {
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.poll_closed(cx) {
            return std::task::Poll::Ready(Err(closed_error()));
        }
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Connections of the gRPC port for tonic, under the same rules as the HTTP port: at most
/// `max_connections` at once (at the cap the longest-idle connection is shed for a new one; with
/// all of them busy, new ones wait in the accept queue), TLS when configured (ALPN `h2`;
/// handshakes in their own tasks, each holding a slot, within `idle`), and a connection with no
/// call in progress for `idle` (one that never sent its HTTP/2 preface included) is closed. The
/// returned layer must wrap the gRPC services (`Server::builder().layer(..)`): it counts the calls
/// in progress on each connection, and gives every call's request messages `body_timeout` from
/// its headers to arrive (`DEADLINE_EXCEEDED` beyond; `securellm.v1.Gateway` calls get their own,
/// audited deadline once authenticated, see `grpc::AuthFirst`). The accept task ends when the
/// stream is dropped.
pub fn grpc_incoming(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    max_connections: usize,
    idle: Duration,
    body_timeout: Duration,
) -> (
    impl futures::Stream<Item = std::io::Result<GrpcConn>> + Send + 'static,
    ActiveCalls,
) {
    let acceptor = tls.map(|tls| {
        let mut cfg = (*tls).clone();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
    });
    let tracker = Tracker::new(max_connections, "grpc");
    let layer = ActiveCalls {
        tracker: tracker.clone(),
        body_timeout,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<GrpcConn>>(64);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                _ = tx.closed() => return,
                c = accept(&listener) => c,
            };
            let slot = tokio::select! {
                _ = tx.closed() => return,
                s = tracker.admit() => s,
            };
            let info = tonic::transport::server::TcpConnectInfo {
                local_addr: tcp.local_addr().ok(),
                remote_addr: Some(remote),
            };
            let (conn, mut closed) = tracker.register(remote, slot);
            let watchdog = conn.watchdog(idle);
            let Some(acceptor) = acceptor.clone() else {
                let conn = GrpcConn {
                    io: Box::new(tcp),
                    info,
                    closed: Some(closed),
                    is_closed: false,
                    _watchdog: watchdog,
                    _conn: conn,
                };
                if tx.send(Ok(conn)).await.is_err() {
                    return;
                }
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let handshake = tokio::select! {
                    r = tokio::time::timeout(idle, acceptor.accept(tcp)) => r,
                    _ = &mut closed => {
                        tracing::debug!(%remote, "gRPC TLS handshake shed");
                        return;
                    }
                };
                match handshake {
                    Ok(Ok(stream)) => {
                        let conn = GrpcConn {
                            io: Box::new(stream),
                            info,
                            closed: Some(closed),
                            is_closed: false,
                            _watchdog: watchdog,
                            _conn: conn,
                        };
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%remote, "gRPC TLS handshake failed: {e}"),
                    Err(_) => tracing::debug!(%remote, "gRPC TLS handshake timed out"),
                }
            });
        }
    });
    (tokio_stream::wrappers::ReceiverStream::new(rx), layer)
}

/// Tower layer for the gRPC server: counts each call as in progress on its connection (found by
/// the peer address tonic puts in the request) until its response body is done, so the idle
/// watchdog and shedding leave connections with calls in progress alone; and bounds the time a
/// call's request messages take to arrive.
#[derive(Clone)]
pub struct ActiveCalls {
    tracker: Arc<Tracker>,
    body_timeout: Duration,
}

impl<S> tower::Layer<S> for ActiveCalls {
    type Service = CountCalls<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CountCalls {
            inner,
            tracker: self.tracker.clone(),
            body_timeout: self.body_timeout,
        }
    }
}

/// See [`ActiveCalls`].
#[derive(Clone)]
pub struct CountCalls<S> {
    inner: S,
    tracker: Arc<Tracker>,
    body_timeout: Duration,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, R> tower::Service<hyper::Request<tonic::body::Body>> for CountCalls<S>
where
    S: tower::Service<hyper::Request<tonic::body::Body>, Response = hyper::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: hyper::body::Body + Unpin + Send + 'static,
{
    type Response = hyper::Response<Guarded<R, Busy>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: hyper::Request<tonic::body::Body>) -> Self::Future {
        // Gateway calls get the same deadline, audited, once authenticated (`grpc::AuthFirst`).
        let req = if req.uri().path().starts_with("/securellm.v1.Gateway/") {
            req
        } else {
            let total = self.body_timeout;
            req.map(|b| {
                tonic::body::Body::new(DeadlineBody::new(
                    b,
                    total,
                    Some(Box::new(|| {
                        Box::new(tonic::Status::deadline_exceeded(
                            "the request message did not arrive in time",
                        )) as Box<dyn std::error::Error + Send + Sync>
                    })),
                ))
            })
        };
        let busy = req
            .extensions()
            .get::<tonic::transport::server::TcpConnectInfo>()
            .and_then(|i| i.remote_addr)
            .and_then(|a| self.tracker.activity_of(&a))
            .map(Busy::new);
        let answer = self.inner.call(req);
        Box::pin(async move {
            let r = answer.await?;
            Ok(r.map(|b| Guarded {
                inner: b,
                guard: busy,
            }))
        })
    }
}

/// The open connections of one port: the cap, and which connection to shed when it is reached.
pub(crate) struct Tracker {
    slots: Arc<Semaphore>,
    conns: std::sync::Mutex<HashMap<u64, Arc<Entry>>>,
    /// The connection of each peer address (for gRPC calls, which carry only the address).
    by_addr: std::sync::Mutex<HashMap<SocketAddr, (u64, Arc<Activity>)>>,
    next: AtomicU64,
    /// `http` or `grpc` (the `connections` gauge's label).
    label: &'static str,
}

/// One open connection as the tracker sees it.
struct Entry {
    activity: Arc<Activity>,
    /// Fired to close the connection (idle watchdog, or shed at the cap).
    close: std::sync::Mutex<Option<oneshot::Sender<()>>>,
}

impl Entry {
    /// Close the connection; false if it was closed already.
    fn close(&self) -> bool {
        match self.close.lock().ok().and_then(|mut c| c.take()) {
            Some(tx) => {
                let _ = tx.send(());
                true
            }
            None => false,
        }
    }

    fn closing(&self) -> bool {
        self.close.lock().map(|c| c.is_none()).unwrap_or(true)
    }
}

impl Tracker {
    fn new(max_connections: usize, label: &'static str) -> Arc<Self> {
        Arc::new(Self {
            slots: Arc::new(Semaphore::new(max_connections.max(1))),
            conns: std::sync::Mutex::new(HashMap::new()),
            by_addr: std::sync::Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            label,
        })
    }

    /// A slot for a connection just accepted. At the cap, the connection that has had no request
    /// in progress for longest is closed to make room, so idle connections cannot lock new
    /// callers out; with every connection busy, this waits for one to end or to turn idle (the
    /// accept queue holds the rest).
    async fn admit(&self) -> OwnedSemaphorePermit {
        loop {
            if let Ok(p) = self.slots.clone().try_acquire_owned() {
                return p;
            }
            let wait = if self.shed_one() {
                Duration::from_secs(1)
            } else {
                Duration::from_millis(50)
            };
            if let Ok(Ok(p)) = tokio::time::timeout(wait, self.slots.clone().acquire_owned()).await
            {
                return p;
            }
        }
    }

    /// Close the connection idle for longest (a new one counts as idle since it opened, so it is
    /// the last candidate); false if every connection has a request in progress (or is closing
    /// already).
    fn shed_one(&self) -> bool {
        let Ok(conns) = self.conns.lock() else {
            return false;
        };
        let victim = conns
            .values()
            .filter(|e| e.activity.active.load(Ordering::SeqCst) == 0 && !e.closing())
            .min_by_key(|e| e.activity.since());
        match victim {
            Some(e) => {
                tracing::debug!("connection cap reached: closing the longest-idle connection");
                e.close()
            }
            None => false,
        }
    }

    /// Register a connection admitted with `slot`; the receiver fires when it is to be closed.
    fn register(
        self: &Arc<Self>,
        addr: SocketAddr,
        slot: OwnedSemaphorePermit,
    ) -> (Conn, oneshot::Receiver<()>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let entry = Arc::new(Entry {
            activity: Activity::new(),
            close: std::sync::Mutex::new(Some(tx)),
        });
        if let Ok(mut c) = self.conns.lock() {
            c.insert(id, entry.clone());
        }
        if let Ok(mut a) = self.by_addr.lock() {
            a.insert(addr, (id, entry.activity.clone()));
        }
        let counted = crate::observe::on();
        if counted {
            crate::observe::connection(self.label, true);
        }
        let conn = Conn {
            tracker: self.clone(),
            id,
            addr,
            entry,
            counted,
            _slot: slot,
        };
        (conn, rx)
    }

    fn activity_of(&self, addr: &SocketAddr) -> Option<Arc<Activity>> {
        self.by_addr
            .lock()
            .ok()
            .and_then(|a| a.get(addr).map(|(_, act)| act.clone()))
    }
}

/// One open connection: its slot and its place in the tracker, both given back when dropped.
pub(crate) struct Conn {
    tracker: Arc<Tracker>,
    id: u64,
    addr: SocketAddr,
    entry: Arc<Entry>,
    /// Counted in the `connections` gauge (metrics were on when it opened).
    counted: bool,
    _slot: OwnedSemaphorePermit,
}

impl Conn {
    fn activity(&self) -> &Arc<Activity> {
        &self.entry.activity
    }

    /// A task that closes the connection once it has had no request in progress for `limit`.
    fn watchdog(&self, limit: Duration) -> AbortOnDrop {
        let entry = self.entry.clone();
        AbortOnDrop::new(tokio::spawn(async move {
            idle_for(entry.activity.clone(), limit).await;
            entry.close();
        }))
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.counted {
            crate::observe::connection(self.tracker.label, false);
        }
        if let Ok(mut c) = self.tracker.conns.lock() {
            c.remove(&self.id);
        }
        if let Ok(mut a) = self.tracker.by_addr.lock()
            && a.get(&self.addr).is_some_and(|(id, _)| *id == self.id)
        {
            a.remove(&self.addr);
        }
    }
}

/// Requests in progress on one connection and when that count last changed.
pub(crate) struct Activity {
    active: AtomicUsize,
    changed: std::sync::Mutex<tokio::time::Instant>,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            active: AtomicUsize::new(0),
            changed: std::sync::Mutex::new(tokio::time::Instant::now()),
        })
    }

    fn touch(&self) {
        if let Ok(mut t) = self.changed.lock() {
            *t = tokio::time::Instant::now();
        }
    }

    fn since(&self) -> tokio::time::Instant {
        self.changed
            .lock()
            .map(|t| *t)
            .unwrap_or_else(|_| tokio::time::Instant::now())
    }
}

/// One request in progress (from its head to the end of its response body).
pub struct Busy(Arc<Activity>);

impl Busy {
    fn new(a: Arc<Activity>) -> Self {
        a.active.fetch_add(1, Ordering::SeqCst);
        a.touch();
        Self(a)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that holds `guard` (a request counted as in progress, an in-flight slot)
/// until it is done or dropped.
pub struct Guarded<B, G> {
    inner: B,
    guard: Option<G>,
}

impl<B, G> Guarded<B, G> {
    pub fn new(inner: B, guard: G) -> Self {
        Self {
            inner,
            guard: Some(guard),
        }
    }
}

impl<B, G> hyper::body::Body for Guarded<B, G>
where
    B: hyper::body::Body + Unpin,
    G: Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(r, std::task::Poll::Ready(None)) {
            self.guard = None;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A response body polled inside `span`, which it holds open until the body has ended or is
/// dropped (a stream's request span covers the whole stream).
pub struct InSpan<B> {
    inner: B,
    span: tracing::Span,
}

impl<B> InSpan<B> {
    pub fn new(inner: B, span: tracing::Span) -> Self {
        Self { inner, span }
    }
}

impl<B> hyper::body::Body for InSpan<B>
where
    B: hyper::body::Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let _enter = this.span.enter();
        std::pin::Pin::new(&mut this.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The error of a body that did not arrive by its deadline.
#[derive(Debug)]
pub struct BodyTimedOut;

impl std::fmt::Display for BodyTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body did not arrive in time")
    }
}

impl std::error::Error for BodyTimedOut {}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body that must arrive completely by a fixed deadline, however its bytes trickle in
/// (a gap timer alone lets a client send a byte every few seconds forever). Data that is ready is
/// always delivered; the deadline only ends a wait. On expiry it fails with `on_timeout()` (or
/// [`BodyTimedOut`]).
pub struct DeadlineBody<B> {
    inner: B,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    on_timeout: Option<Box<dyn FnOnce() -> BoxError + Send>>,
}

impl<B> DeadlineBody<B> {
    pub fn new(
        inner: B,
        total: Duration,
        on_timeout: Option<Box<dyn FnOnce() -> BoxError + Send>>,
    ) -> Self {
        Self {
            inner,
            deadline: Box::pin(tokio::time::sleep(total)),
            on_timeout,
        }
    }
}

impl<B> hyper::body::Body for DeadlineBody<B>
where
    B: hyper::body::Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        use std::future::Future;
        use std::task::Poll;
        match std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(f) => Poll::Ready(f.map(|r| r.map_err(Into::into))),
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    let e = match self.on_timeout.take() {
                        Some(f) => f(),
                        None => Box::new(BodyTimedOut),
                    };
                    Poll::Ready(Some(Err(e)))
                }
                Poll::Pending => Poll::Pending,
            },
        }
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
        let deadline = a.since() + limit;
        if a.active.load(Ordering::SeqCst) == 0 && tokio::time::Instant::now() >= deadline {
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
pub(crate) type AbortOnDrop = tokio_util::task::AbortOnDropHandle<()>;
