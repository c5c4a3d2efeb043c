//! The listeners. HTTP: plain or TLS (rustls, TLS 1.2 and 1.3, ALPN `h2` / `http/1.1`), HTTP/1.1 and
//! HTTP/2 on the same port, with the limits that keep slow or idle clients from exhausting the
//! gateway:
//!
//! - **connections**: at most `max_connections` at once; beyond that new connections wait in the
//!   kernel's accept queue (back-pressure) instead of costing a task and buffers each;
//! - **first bytes / TLS handshake**: must arrive (finish) within `header_read_timeout`;
//! - **request headers** (HTTP/1.1): must arrive completely within `header_read_timeout` of the
//!   connection opening or of the previous response ending, so an idle keep-alive connection is
//!   closed after that long too (slowloris on headers, idle connections); at most
//!   `max_header_bytes` of them (431 / connection closed beyond);
//! - **HTTP/2**: header list at most `max_header_bytes`, at most 256 concurrent streams per
//!   connection, keep-alive pings every 30 s (a dead peer is dropped after 20 s without an answer);
//! - **request bodies**: `body_read_timeout` for the whole body (slowloris on bodies, see
//!   `app::router`), at most `max_body` bytes.
//!
//! gRPC: with TLS configured, [`tls_incoming`] turns the gRPC port's TCP connections into TLS
//! ones (same certificate, ALPN `h2`) before tonic sees them.

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
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo::<SocketAddr>(addr));
                router.clone().oneshot(req)
            });
            let result = match acceptor {
                None => {
                    // The first bytes decide HTTP/1.1 vs HTTP/2 and hyper's header timer only
                    // starts after them: a connection that sends nothing at all is closed here.
                    let mut probe = [0u8; 1];
                    if !matches!(
                        tokio::time::timeout(handshake, tcp.peek(&mut probe)).await,
                        Ok(Ok(n)) if n > 0
                    ) {
                        return;
                    }
                    let conn = builder.serve_connection(TokioIo::new(tcp), svc);
                    watcher.watch(conn.into_owned()).await
                }
                Some(acceptor) => {
                    let stream = match tokio::time::timeout(handshake, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%addr, "TLS handshake failed: {e}");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%addr, "TLS handshake timed out");
                            return;
                        }
                    };
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    watcher.watch(conn.into_owned()).await
                }
            };
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

/// A TLS connection for tonic (the gRPC port), carrying the peer address like a TCP one.
pub struct TlsConn {
    stream: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    info: tonic::transport::server::TcpConnectInfo,
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl tokio::io::AsyncRead for TlsConn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsConn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// TLS connections accepted on `listener` for the gRPC server (ALPN `h2`). Handshakes run in
/// their own tasks with `handshake` as their time limit, so a slow client never holds up the
/// accept loop; failed handshakes are dropped. The accept task ends when the stream is dropped.
pub fn tls_incoming(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    handshake: Duration,
) -> impl futures::Stream<Item = std::io::Result<TlsConn>> + Send + 'static {
    let mut cfg = (*tls).clone();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<TlsConn>>(64);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                _ = tx.closed() => return,
                c = accept(&listener) => c,
            };
            let local = tcp.local_addr().ok();
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(handshake, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let info = tonic::transport::server::TcpConnectInfo {
                            local_addr: local,
                            remote_addr: Some(remote),
                        };
                        let _ = tx.send(Ok(TlsConn { stream, info })).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%remote, "gRPC TLS handshake failed: {e}"),
                    Err(_) => tracing::debug!(%remote, "gRPC TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
