//! Pieces every SecureLLM service and tool shares.
//!
//! - [`bytesize`]: human byte sizes (`24GiB`, `512MiB`) for flags, config and output.
//! - [`config`]: one TOML file with a section per service; flags override it, it overrides defaults.
//! - [`telemetry`]: logging to stderr (`RUST_LOG`), OpenTelemetry trace export and W3C context
//!   propagation.
//! - [`prometheus`]: the metrics recorder and every service's `/metrics` listener.
//! - [`openai`]: the OpenAI API's endpoints, shared by the gateway and the backend manager.
//! - [`serve`]: binding a gRPC listener, health + reflection, the `ready` line, graceful shutdown.
//! - [`errors`]: one table from gRPC codes to HTTP statuses, machine-readable reasons
//!   (`google.rpc.ErrorInfo`) across service boundaries.
//! - [`internal_auth`]: the internal token every call between SecureLLM's processes carries.
//! - [`mtls`]: mutual TLS on the internal hops (`[internal_tls]`).
//! - [`sse`]: the one server-sent-events splitter (incremental, bounded).
//! - [`time`]: unix milliseconds, the time unit of every contract.
//! - [`tls`]: the process-wide rustls crypto provider.

pub mod bytesize;
pub mod config;
pub mod errors;
pub mod internal_auth;
pub mod mtls;
pub mod openai;
pub mod prometheus;
pub mod serve;
pub mod sse;
pub mod telemetry;
pub mod time;
pub mod tls;

pub use bytesize::{ByteSize, format_bytes, parse_bytes};

/// A service address as a URL tonic connects to: `HOST:PORT` becomes `http://HOST:PORT`; a URL
/// (`http://…`, `https://…`) is kept as it is. The one place this is decided.
pub fn grpc_url(addr: &str) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn addresses_become_urls_and_urls_stay() {
        assert_eq!(super::grpc_url("127.0.0.1:1"), "http://127.0.0.1:1");
        assert_eq!(super::grpc_url("[::1]:2"), "http://[::1]:2");
        assert_eq!(super::grpc_url("https://h:2"), "https://h:2");
        assert_eq!(super::grpc_url("http://h:3/"), "http://h:3/");
    }
}
