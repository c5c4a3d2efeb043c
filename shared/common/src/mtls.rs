//! Mutual TLS on the internal hops (gateway → node services, backend manager → scheduler and
//! registry): `[internal_tls]` in the shared config file names a CA and this process's
//! certificate and key (PEM). With it, the scheduler, the registry and the backend manager
//! accept only TLS connections whose client certificate the CA signed, and every internal
//! client presents its own and verifies the server's against the same CA (the host name it dials
//! must be in the server certificate). Without it, internal gRPC is plain text, which is meant for
//! loopback only: a service listening elsewhere without it says so at start (see
//! [`warn_if_plaintext`]). `scripts/certs.sh` (`make certs`) makes a test CA and certificates.
//!
//! ```toml
//! [internal_tls]
//! ca_file = "/etc/securellm/tls/ca.pem"
//! cert_file = "/etc/securellm/tls/node-a.pem"   # this host's: server and client use
//! key_file = "/etc/securellm/tls/node-a.key"    # mode 0600
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

use crate::config::ConfigError;

/// `[internal_tls]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InternalTls {
    /// The CA that signs every internal certificate (PEM).
    pub ca_file: PathBuf,
    /// This process's certificate (PEM; its chain may follow).
    pub cert_file: PathBuf,
    /// Its private key (PEM), readable by this user only.
    pub key_file: PathBuf,
}

/// Why the internal TLS material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum MtlsError {
    #[error("internal_tls.{field} {path}: {message}")]
    File {
        field: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("internal TLS: {0}")]
    Tls(String),
}

/// The files read: what servers and clients are configured with.
#[derive(Clone, Debug)]
pub struct TlsMaterial {
    ca: Certificate,
    identity: Identity,
}

/// `[internal_tls]` of the config file at `path` (`None` when the section is absent); the paths
/// are not read here (`--check-config` reads no secret).
pub fn load(path: Option<&Path>) -> Result<Option<InternalTls>, ConfigError> {
    let t: Option<InternalTls> = crate::config::load_section(path, "internal_tls")?;
    Ok(t)
}

fn read(field: &'static str, path: &Path, private: bool) -> Result<Vec<u8>, MtlsError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |message: String| MtlsError::File {
        field,
        path: path.to_path_buf(),
        message,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if private {
        let mode = meta.permissions().mode() & 0o777;
        if crate::internal_auth::may_be_read_by_others(mode, path) {
            return Err(err(format!(
                "may be read by other users (mode {mode:04o}); `chmod 600` it"
            )));
        }
    }
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    if !String::from_utf8_lossy(&bytes).contains("-----BEGIN ") {
        return Err(err("is not PEM".into()));
    }
    Ok(bytes)
}

impl InternalTls {
    /// Read the CA, the certificate and the key (the key must be private).
    pub fn read(&self) -> Result<TlsMaterial, MtlsError> {
        let ca = read("ca_file", &self.ca_file, false)?;
        let cert = read("cert_file", &self.cert_file, false)?;
        let key = read("key_file", &self.key_file, true)?;
        Ok(TlsMaterial {
            ca: Certificate::from_pem(ca),
            identity: Identity::from_pem(cert, key),
        })
    }
}

impl TlsMaterial {
    /// A server that requires a client certificate signed by the CA.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .client_ca_root(self.ca.clone())
    }

    /// A client that presents this identity and trusts only the CA, for `host`.
    pub fn client(&self, host: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
            .domain_name(host.to_string())
    }
}

/// The host part of `HOST:PORT` or a URL (brackets of an IPv6 literal removed).
fn host_of(addr: &str) -> String {
    let rest = addr.split_once("://").map_or(addr, |(_, r)| r);
    let hostport = rest.split('/').next().unwrap_or(rest);
    let host = match hostport.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => hostport.rsplit_once(':').map_or(hostport, |(h, _)| h),
    };
    host.to_string()
}

/// The channel every internal client uses: `addr` (`HOST:PORT` or a URL) over TLS with this
/// process's certificate when `tls` is given (the URL becomes `https://`), else plain; HTTP/2
/// keepalive pings (5 s) so a peer whose network was cut off is noticed within seconds and the
/// next call connects again; `connect_timeout` / `call_timeout` when given.
pub fn endpoint(
    addr: &str,
    tls: Option<&TlsMaterial>,
    connect_timeout: Option<Duration>,
    call_timeout: Option<Duration>,
) -> Result<Endpoint, MtlsError> {
    let plain = crate::grpc_url(addr);
    let url = match tls {
        Some(_) => plain.replacen("http://", "https://", 1),
        None => plain,
    };
    let mut e = Endpoint::from_shared(url.clone())
        .map_err(|e| MtlsError::Tls(format!("address {url}: {e}")))?
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    if let Some(m) = tls {
        e = e
            .tls_config(m.client(&host_of(addr)))
            .map_err(|e| MtlsError::Tls(format!("{url}: {e}")))?;
    }
    if let Some(t) = connect_timeout {
        e = e.connect_timeout(t);
    }
    if let Some(t) = call_timeout {
        e = e.timeout(t);
    }
    Ok(e)
}

/// Log a warning when `service` listens for internal gRPC on `listen` beyond loopback without
/// mutual TLS (the internal token still guards every call, in plain text).
pub fn warn_if_plaintext(service: &str, listen: &str, tls: Option<&TlsMaterial>) {
    if tls.is_some() {
        return;
    }
    let host = host_of(listen);
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        tracing::warn!(
            "{service} listens on {listen} without [internal_tls]: internal gRPC (and the \
             internal token) travel in plain text; configure mutual TLS (`make certs`, README \
             \"Internal TLS\") on anything but loopback"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_taken_from_addresses_and_urls() {
        assert_eq!(host_of("node-a:50051"), "node-a");
        assert_eq!(host_of("https://node-a:50051"), "node-a");
        assert_eq!(host_of("http://127.0.0.1:1/x"), "127.0.0.1");
        assert_eq!(host_of("[::1]:50051"), "::1");
        assert_eq!(host_of("vram-scheduler"), "vram-scheduler");
    }

    #[test]
    fn the_section_is_optional_and_strict() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[scheduler]\n").unwrap();
        assert_eq!(load(Some(&p)).unwrap(), None);
        std::fs::write(
            &p,
            "[internal_tls]\nca_file = \"/a\"\ncert_file = \"/b\"\nkey_file = \"/c\"\n",
        )
        .unwrap();
        assert_eq!(
            load(Some(&p)).unwrap().unwrap().key_file,
            PathBuf::from("/c")
        );
        std::fs::write(&p, "[internal_tls]\nca_file = \"/a\"\ncert = \"/b\"\n").unwrap();
        let e = load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("cert"), "{e}");
    }

    #[test]
    fn a_key_others_can_read_is_refused_and_non_pem_is_named() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let pem = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n";
        for f in ["ca", "cert", "key"] {
            std::fs::write(dir.path().join(f), pem).unwrap();
        }
        let t = InternalTls {
            ca_file: dir.path().join("ca"),
            cert_file: dir.path().join("cert"),
            key_file: dir.path().join("key"),
        };
        std::fs::set_permissions(&t.key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = t.read().unwrap_err().to_string();
        assert!(
            e.contains("internal_tls.key_file") && e.contains("chmod 600"),
            "{e}"
        );
        std::fs::set_permissions(&t.key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        t.read().unwrap();
        std::fs::write(&t.ca_file, "nope").unwrap();
        assert!(t.read().unwrap_err().to_string().contains("not PEM"));
    }
}
