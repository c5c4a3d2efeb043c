//! Thin clients of the SecureLLM services, shared by the `securellm` CLI and the `securellm-mcp`
//! server so that both find the services the same way and show the same text:
//!
//! - the services' default addresses and their flags ([`ServiceArgs`], [`admin::GatewayArgs`]),
//! - channels with connect and call timeouts ([`connect`], [`connect_to`]) and readable errors
//!   ([`status_text`]),
//! - the internal token the vram-scheduler, the registry and the backend manager require
//!   ([`ServiceArgs::internal_token`], [`connect_internal`]; health checks need none),
//! - the gateway's admin token and an authenticated admin client ([`admin`]),
//! - the text of GPUs and leases ([`vram`]), loaded models ([`instances`]) and the model catalogue
//!   ([`models`]),
//! - the stack `make run` started, found without flags ([`stack`]).

pub mod admin;
pub mod instances;
pub mod models;
pub mod stack;
pub mod vram;

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use securellm_common::internal_auth::{self, AuthChannel, InternalToken};
use tonic::transport::Channel;

/// The loopback ports `make run` uses.
pub const DEFAULT_SCHEDULER: &str = "127.0.0.1:50051";
pub const DEFAULT_REGISTRY: &str = "127.0.0.1:50052";
pub const DEFAULT_BACKEND: &str = "127.0.0.1:50053";
pub const DEFAULT_GATEWAY: &str = "127.0.0.1:50054";
pub const DEFAULT_GATEWAY_HTTP: &str = "127.0.0.1:8088";

/// How long [`connect_to`] waits for a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The internal services' gRPC addresses (`HOST:PORT` or a URL) and the stack's data directory,
/// from flags or the environment, else from the running stack's file ([`stack`]), else the
/// defaults `make run` uses.
#[derive(Debug, Clone, Args)]
pub struct ServiceArgs {
    /// The vram-scheduler's gRPC address [default: the running stack's, else 127.0.0.1:50051].
    #[arg(long, global = true, env = "SECURELLM_SCHEDULER")]
    pub scheduler: Option<String>,
    /// The registry's gRPC address [default: the running stack's, else 127.0.0.1:50052].
    #[arg(long, global = true, env = "SECURELLM_REGISTRY")]
    pub registry: Option<String>,
    /// The backend manager's gRPC address [default: the running stack's, else 127.0.0.1:50053].
    #[arg(long, global = true, env = "SECURELLM_BACKEND")]
    pub backend: Option<String>,
    /// The stack's data directory (`make run`'s DATA_DIR) [default: the running stack's, else
    /// ~/.local/share/securellm].
    #[arg(long, global = true, env = stack::DATA_DIR)]
    pub data_dir: Option<PathBuf>,
    /// The internal token those three services require [default: the running stack's, else
    /// <data dir>/internal-token].
    #[arg(long, global = true, env = internal_auth::TOKEN_FILE_ENV)]
    pub internal_token_file: Option<PathBuf>,
}

impl ServiceArgs {
    pub fn scheduler(&self) -> String {
        flag_stack_default(&self.scheduler, stack::SCHEDULER, DEFAULT_SCHEDULER)
    }

    pub fn registry(&self) -> String {
        flag_stack_default(&self.registry, stack::REGISTRY, DEFAULT_REGISTRY)
    }

    pub fn backend(&self) -> String {
        flag_stack_default(&self.backend, stack::BACKEND, DEFAULT_BACKEND)
    }

    /// `--data-dir` / `$SECURELLM_DATA_DIR`, else the running stack's, else the default.
    pub fn data_dir(&self) -> PathBuf {
        data_dir(self.data_dir.clone())
    }

    /// The internal token file: `--internal-token-file`, else `<--data-dir>/internal-token` when
    /// a data directory was given, else the running stack's, else `<default data dir>/internal-token`.
    pub fn internal_token_path(&self) -> PathBuf {
        if let Some(f) = &self.internal_token_file {
            return f.clone();
        }
        if let Some(d) = &self.data_dir {
            return internal_auth::default_path(d);
        }
        internal_token_path(None)
    }

    /// The internal token, read from [`Self::internal_token_path`] (never created here).
    pub fn internal_token(&self) -> anyhow::Result<InternalToken> {
        read_internal_token(&self.internal_token_path())
    }
}

/// `flag` (which clap fills from the flag or its environment variable), else `key` in the
/// running stack's file, else `default`.
pub(crate) fn flag_stack_default(flag: &Option<String>, key: &str, default: &str) -> String {
    flag.clone()
        .or_else(|| stack::get(key))
        .unwrap_or_else(|| default.to_string())
}

/// `dir`, else the running stack's data directory, else the default one
/// (`~/.local/share/securellm`).
pub fn data_dir(dir: Option<PathBuf>) -> PathBuf {
    dir.or_else(|| {
        std::env::var_os(stack::DATA_DIR)
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
    })
    .or_else(|| stack::get(stack::DATA_DIR).map(PathBuf::from))
    .unwrap_or_else(securellm_common::config::default_data_dir)
}

/// A file the gateway keeps in its data directory (`admin-token`, `gateway-audit.db`), given the
/// stack's data directory: `<dir>/gateway/<name>` (where `make run` puts the gateway), else
/// `<dir>/<name>` when only that exists (`dir` is the gateway's own data directory, or a gateway
/// started without `--data-dir`).
pub fn gateway_file(dir: &std::path::Path, name: &str) -> PathBuf {
    let nested = dir.join("gateway").join(name);
    let flat = dir.join(name);
    if !nested.exists() && flat.exists() {
        flat
    } else {
        nested
    }
}

/// `file`, else the running stack's internal token file, else `<data dir>/internal-token` (the
/// data dir being `$SECURELLM_DATA_DIR` when set, as `make run` sets it, else the default one).
pub fn internal_token_path(file: Option<PathBuf>) -> PathBuf {
    file.or_else(|| {
        std::env::var_os(internal_auth::TOKEN_FILE_ENV)
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
    })
    .or_else(|| {
        // An explicit data directory in the environment names its own token.
        std::env::var_os(stack::DATA_DIR)
            .filter(|d| !d.is_empty())
            .map(|d| internal_auth::default_path(std::path::Path::new(&d)))
    })
    .or_else(|| stack::get(stack::INTERNAL_TOKEN_FILE).map(PathBuf::from))
    .unwrap_or_else(|| internal_auth::default_path(&data_dir(None)))
}

/// The internal token at `path`; the error names the file, why, and how to point at another.
pub fn read_internal_token(path: &std::path::Path) -> anyhow::Result<InternalToken> {
    internal_auth::load(path).map_err(|e| {
        anyhow::anyhow!(
            "{e} (the SecureLLM services require it; set --internal-token-file or {})",
            internal_auth::TOKEN_FILE_ENV
        )
    })
}

/// `HOST:PORT` → `http://HOST:PORT`; a URL is kept as it is ([`securellm_common::grpc_url`]).
pub fn endpoint(addr: &str) -> String {
    securellm_common::grpc_url(addr)
}

/// A channel to `endpoint` (a URL) that gives up connecting after `connect_timeout` and fails
/// every call that takes longer than `call_timeout` (`None`: no limit, for streams).
pub async fn connect(
    endpoint: &str,
    connect_timeout: Duration,
    call_timeout: Option<Duration>,
) -> anyhow::Result<Channel> {
    let mut e = tonic::transport::Endpoint::from_shared(endpoint.to_string())?
        .connect_timeout(connect_timeout);
    if let Some(t) = call_timeout {
        e = e.timeout(t);
    }
    Ok(e.connect().await?)
}

/// [`connect`] to `service` at `addr` (`HOST:PORT` or a URL) within [`CONNECT_TIMEOUT`]; the error
/// names the service, the address and the innermost cause ("Connection refused ...").
pub async fn connect_to(
    service: &str,
    addr: &str,
    call_timeout: Option<Duration>,
) -> anyhow::Result<Channel> {
    let url = endpoint(addr);
    connect(&url, CONNECT_TIMEOUT, call_timeout)
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the {service} at {url}: {}", e.root_cause()))
}

/// [`read_internal_token`], but `None` when the file does not exist (yet): the services then
/// refuse the calls that need it with `UNAUTHENTICATED`, saying so.
pub fn read_internal_token_if_present(
    path: &std::path::Path,
) -> anyhow::Result<Option<InternalToken>> {
    match internal_auth::load(path) {
        Err(e) if e.is_missing() => Ok(None),
        _ => read_internal_token(path).map(Some),
    }
}

/// [`connect_to`] an internal service (vram-scheduler, registry, backend manager): every call
/// carries `token` (`None`: nothing, for services started open in tests).
pub async fn connect_internal(
    service: &str,
    addr: &str,
    token: Option<&InternalToken>,
    call_timeout: Option<Duration>,
) -> anyhow::Result<AuthChannel> {
    let ch = connect_to(service, addr, call_timeout).await?;
    Ok(internal_auth::authenticated(ch, token))
}

/// A gRPC error as a person reads it: "no answer within 5 s" for a call that ran past
/// `timeout`, else the code and the service's message ("NotFound: no model named x").
pub fn status_text(s: &tonic::Status, timeout: Duration) -> String {
    let timed_out = s.code() == tonic::Code::DeadlineExceeded
        || (s.code() == tonic::Code::Cancelled && s.message().contains("Timeout"));
    if timed_out {
        format!("no answer within {}", seconds(timeout))
    } else if s.message().is_empty() {
        format!("{:?}", s.code())
    } else {
        format!("{:?}: {}", s.code(), s.message())
    }
}

/// `2 s`, `0.5 s`.
fn seconds(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} s", d.as_secs_f64())
    }
}

/// An age or a wait in whole units: `42s`, `3m`, `2h`.
pub fn age(ms: u64) -> String {
    let s = ms / 1000;
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m", s / 60)
    } else {
        format!("{}h", s / 3600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_become_urls() {
        assert_eq!(endpoint("127.0.0.1:1"), "http://127.0.0.1:1");
        assert_eq!(endpoint("https://h:2"), "https://h:2");
    }

    #[test]
    fn errors_read_like_sentences() {
        let t = Duration::from_secs(2);
        assert_eq!(
            status_text(&tonic::Status::deadline_exceeded("x"), t),
            "no answer within 2 s"
        );
        assert_eq!(
            status_text(
                &tonic::Status::cancelled("Timeout expired"),
                Duration::from_millis(500)
            ),
            "no answer within 0.5 s"
        );
        assert_eq!(
            status_text(&tonic::Status::not_found("no model named x"), t),
            "NotFound: no model named x"
        );
        assert_eq!(
            status_text(&tonic::Status::unavailable(""), t),
            "Unavailable"
        );
    }

    #[tokio::test]
    async fn a_closed_port_is_named_with_its_cause() {
        let e = connect_to("registry", "127.0.0.1:1", None)
            .await
            .unwrap_err();
        let s = e.to_string();
        assert!(
            s.starts_with("cannot reach the registry at http://127.0.0.1:1: ")
                && s.contains("refused"),
            "{s}"
        );
    }

    #[test]
    fn ages_use_whole_units() {
        assert_eq!(age(42_000), "42s");
        assert_eq!(age(180_000), "3m");
        assert_eq!(age(7_200_000), "2h");
    }
}
