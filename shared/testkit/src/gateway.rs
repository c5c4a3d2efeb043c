//! The gateway's side of the tests: a gateway with no backends, its audit rows, API keys, and
//! reading raw connections.

use std::path::Path;
use std::time::{Duration, Instant};

use securellm_gateway::RunningGateway;
use securellm_gateway::config::GatewayConfig;
use securellm_gateway::keys::{KeyStore, NewKey};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// A gateway on its own (both listeners on loopback, data directory `data`) whose backend
/// manager and registry addresses lead nowhere (`127.0.0.1:1`), unless `tweak` says otherwise.
pub async fn standalone_gateway(
    data: &Path,
    tweak: impl FnOnce(&mut GatewayConfig),
) -> RunningGateway {
    securellm_common::tls::install_crypto_provider();
    let mut cfg = GatewayConfig {
        listen: "127.0.0.1:0".into(),
        http_listen: "127.0.0.1:0".into(),
        data_dir: Some(data.to_path_buf()),
        // Nothing listens there.
        backend: "127.0.0.1:1".into(),
        registry: "127.0.0.1:1".into(),
        scheduler: "127.0.0.1:1".into(),
        ..Default::default()
    };
    tweak(&mut cfg);
    securellm_gateway::start(&cfg)
        .await
        .expect("the gateway starts")
}

/// Every audit row so far (after flushing the writer), oldest first.
pub async fn audit_rows(g: &RunningGateway) -> Vec<securellm_gateway::audit::AuditRow> {
    g.state.audit.flush().await;
    g.state
        .audit
        .query(securellm_gateway::audit::AuditFilter {
            limit: Some(10_000),
            ..Default::default()
        })
        .await
        .expect("the audit query")
}

/// A new API key for `models` (patterns) with an optional per-minute limit: (secret, key id).
pub async fn create_key(
    keys: &KeyStore,
    name: &str,
    models: &[&str],
    rpm: Option<u32>,
) -> (String, String) {
    let (secret, rec) = keys
        .create(NewKey {
            name: name.into(),
            models: models.iter().map(|m| m.to_string()).collect(),
            rpm,
            ..Default::default()
        })
        .await
        .expect("the key is created");
    (secret, rec.id)
}

/// Read until the server closes the connection; returns what arrived and when it closed (`None`:
/// still open after `limit`).
pub async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (String, Option<Duration>) {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(limit.saturating_sub(start.elapsed()), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return (
                    String::from_utf8_lossy(&got).into_owned(),
                    Some(start.elapsed()),
                );
            }
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), None),
        }
    }
}
