//! Internal authentication: the credential every call between SecureLLM's own processes carries,
//! so that nobody on the machine walks around the gateway (its keys, limits and audit) by calling
//! an internal service directly.
//!
//! - The **internal token** is a random 256-bit secret (64 hex characters) in a file readable only
//!   by the service user: `--internal-token-file` / `SECURELLM_INTERNAL_TOKEN_FILE`, default
//!   `<data dir>/internal-token`. The first service to start creates it ([`load_or_create`]:
//!   written to a temporary file with mode 0600, then hard-linked into place, so a concurrent
//!   starter never reads a half-written file; the directory is created 0700); the others and the
//!   clients read it ([`load`]). A token file that other users may read is refused.
//! - **Servers** (vram-scheduler, registry, backend-manager) wrap their whole gRPC server in
//!   [`require`]: every call needs `authorization: Bearer <token>` (compared in constant time),
//!   else `UNAUTHENTICATED`. Only `grpc.health.v1.Health` stays open, so that container and
//!   supervisor probes work without the secret (it tells whether a service is serving, nothing
//!   else). Reflection is behind the token like everything else.
//! - **Clients** (backend-manager → scheduler and registry; gateway → backend-manager and
//!   registry; the CLI, the MCP server, the e2e kit) wrap their channel with [`authenticated`].
//!
//! `None` as the token means *open*: no check, no header. Only in-process tests start services
//! that way (the `start` functions take the token in their config); every binary resolves a token
//! from its file before it serves, and [`require`] logs a warning when it is open.

use std::fmt;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use subtle::ConstantTimeEq;
use tonic::codegen::http;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The token file's name in a data directory.
pub const TOKEN_FILE: &str = "internal-token";

/// The environment variable every service and client reads the token file's path from.
pub const TOKEN_FILE_ENV: &str = "SECURELLM_INTERNAL_TOKEN_FILE";

/// Calls to this gRPC service need no token (health probes).
pub const OPEN_PREFIX: &str = "/grpc.health.v1.Health/";

/// The shortest token accepted from a file (128 bits as hex).
const MIN_LEN: usize = 32;

/// The largest token file read.
const MAX_FILE: u64 = 4096;

/// `<data dir>/internal-token`.
pub fn default_path(data_dir: &Path) -> PathBuf {
    data_dir.join(TOKEN_FILE)
}

/// `n` random bytes from the operating system, as lowercase hex.
pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).expect("the operating system's random number generator failed");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The internal token. Its `Debug` never shows the secret, and its memory is wiped when the last
/// copy is dropped (`secrecy`).
#[derive(Clone)]
pub struct InternalToken(Arc<secrecy::SecretString>);

impl fmt::Debug for InternalToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("InternalToken(<redacted>)")
    }
}

impl InternalToken {
    /// A new random token (256 bits).
    pub fn generate() -> Self {
        Self(Arc::new(random_hex(32).into()))
    }

    /// A token from text (surrounding whitespace ignored): at least 32 visible ASCII characters,
    /// no spaces (it travels in a header).
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        if t.len() < MIN_LEN {
            return Err(format!(
                "is too short ({} characters; at least {MIN_LEN})",
                t.len()
            ));
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("must be visible ASCII characters without spaces".into());
        }
        Ok(Self(Arc::new(t.into())))
    }

    /// The secret itself (to write it to a file or a header; never log it).
    pub fn expose(&self) -> &str {
        secrecy::ExposeSecret::expose_secret(&*self.0)
    }

    /// Is `given` this token? (Constant time in the token's content.)
    pub fn verify(&self, given: &[u8]) -> bool {
        bool::from(self.expose().as_bytes().ct_eq(given))
    }
}

/// A token file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read the internal token {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create the internal token {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the internal token {path} {problem}")]
    Invalid { path: PathBuf, problem: String },
}

impl TokenError {
    /// The file does not exist.
    pub fn is_missing(&self) -> bool {
        matches!(self, TokenError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// Whether a token file with `mode` may be read by others. A systemd credential (a file under the
/// unit's `$CREDENTIALS_DIRECTORY`, from `LoadCredential=`) is root's with mode 0400 and an ACL for
/// the unit's user, so `stat` may show 0440, on a mount only the unit and root can read: its mode
/// bits say nothing about exposure there.
fn exposed(mode: u32, path: &Path, credentials_dir: Option<&std::ffi::OsStr>) -> bool {
    let credential = credentials_dir.is_some_and(|d| !d.is_empty() && path.starts_with(d));
    mode & 0o077 != 0 && !credential
}

/// Whether a secret file with `mode` may be read by other users ([`exposed`] with this
/// process's `$CREDENTIALS_DIRECTORY`).
pub fn may_be_read_by_others(mode: u32, path: &Path) -> bool {
    exposed(
        mode,
        path,
        std::env::var_os("CREDENTIALS_DIRECTORY").as_deref(),
    )
}

/// Read the token at `path`: a regular file, not readable or writable by group or others (a
/// systemd credential excepted, see [`exposed`]).
pub fn load(path: &Path) -> Result<InternalToken, TokenError> {
    let read = |source| TokenError::Read {
        path: path.to_path_buf(),
        source,
    };
    let invalid = |problem: String| TokenError::Invalid {
        path: path.to_path_buf(),
        problem,
    };
    let mut f = std::fs::File::open(path).map_err(read)?;
    let meta = f.metadata().map_err(read)?;
    if !meta.is_file() {
        return Err(invalid("is not a regular file".into()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if may_be_read_by_others(mode, path) {
        return Err(invalid(format!(
            "may be read or written by other users (mode {mode:04o}); `chmod 600` it"
        )));
    }
    let mut text = String::new();
    Read::by_ref(&mut f)
        .take(MAX_FILE)
        .read_to_string(&mut text)
        .map_err(read)?;
    InternalToken::parse(&text).map_err(invalid)
}

/// Read the token at `path`, or create it (random, mode 0600; missing directories 0700) when there
/// is none. Safe when several services start at once: the file appears complete or not at all,
/// and whoever loses the race reads the winner's token.
pub fn load_or_create(path: &Path) -> Result<InternalToken, TokenError> {
    match load(path) {
        Err(e) if e.is_missing() => {}
        other => return other,
    }
    let create = |source| TokenError::Create {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(create)?;
    let token = InternalToken::generate();
    let tmp = dir.join(format!(".{TOKEN_FILE}.{}.tmp", random_hex(8)));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(format!("{}\n", token.expose()).as_bytes())?;
        f.sync_all()?;
        // Complete on disk: publish it under its name, unless someone already did.
        std::fs::hard_link(&tmp, path)
    })();
    let _ = std::fs::remove_file(&tmp);
    match written {
        Ok(()) => {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
            tracing::info!("created the internal token {}", path.display());
            Ok(token)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load(path),
        Err(e) => Err(create(e)),
    }
}

/// For a service's configuration: the token from `file`, else from `<data dir>/internal-token`
/// (the default data directory when there is none), created when missing. The error names
/// `<section>.internal_token_file`.
pub fn for_service(
    file: Option<&Path>,
    data_dir: Option<&Path>,
    section: &str,
) -> Result<InternalToken, crate::config::ConfigError> {
    let path = match (file, data_dir) {
        (Some(f), _) => f.to_path_buf(),
        (None, Some(d)) => default_path(d),
        (None, None) => default_path(&crate::config::default_data_dir()),
    };
    load_or_create(&path).map_err(|e| crate::config::ConfigError::Field {
        field: format!("{section}.internal_token_file"),
        message: e.to_string(),
    })
}

// ------------------------------------------------------------------------------------------------
// Servers

/// The layer that makes a gRPC server refuse calls without the token (health excepted). Add it
/// with `Server::builder().layer(internal_auth::require(token, "registry"))`. `None` = open
/// (in-process tests only; logged as a warning).
pub fn require(token: Option<&InternalToken>, service: &str) -> RequireToken {
    if token.is_none() {
        tracing::warn!(
            "{service}: internal authentication is OFF (no internal token configured): any local \
             user can call this service"
        );
    }
    RequireToken {
        token: token.cloned(),
    }
}

/// See [`require`].
#[derive(Clone, Debug)]
pub struct RequireToken {
    token: Option<InternalToken>,
}

impl<S> tower::Layer<S> for RequireToken {
    type Service = RequireTokenService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequireTokenService {
            inner,
            token: self.token.clone(),
        }
    }
}

/// The service [`RequireToken`] wraps around a server's routes.
#[derive(Clone, Debug)]
pub struct RequireTokenService<S> {
    inner: S,
    token: Option<InternalToken>,
}

/// Does `headers` carry `authorization: Bearer <token>`?
pub fn authorized(token: &InternalToken, headers: &http::HeaderMap) -> bool {
    let Some(v) = headers.get(http::header::AUTHORIZATION) else {
        return false;
    };
    let v = v.as_bytes();
    match v.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => {
            token.verify(v[7..].trim_ascii())
        }
        _ => false,
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B> tower::Service<http::Request<B>> for RequireTokenService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let allowed = match &self.token {
            None => true,
            Some(t) => req.uri().path().starts_with(OPEN_PREFIX) || authorized(t, req.headers()),
        };
        if allowed {
            Box::pin(tower::Service::call(&mut self.inner, req))
        } else {
            tracing::debug!(
                path = req.uri().path(),
                "refused a call without the internal token"
            );
            let refusal = tonic::Status::unauthenticated(
                "this internal service needs the internal token: authorization: Bearer <the \
                 content of the internal-token file> (--internal-token-file or \
                 SECURELLM_INTERNAL_TOKEN_FILE)",
            )
            .into_http();
            Box::pin(std::future::ready(Ok(refusal)))
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Clients

/// Adds `authorization: Bearer <token>` to every call (nothing when there is no token), and the
/// caller's trace context (`traceparent`) when traces are exported: every internal client goes
/// through here, so every hop carries the trace.
#[derive(Clone, Debug)]
pub struct AttachToken(Option<MetadataValue<Ascii>>);

impl AttachToken {
    pub fn new(token: Option<&InternalToken>) -> Self {
        Self(token.map(|t| {
            let mut v: MetadataValue<Ascii> = format!("Bearer {}", t.expose())
                .parse()
                .expect("a parsed token is a valid header value");
            v.set_sensitive(true);
            v
        }))
    }
}

impl Interceptor for AttachToken {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            r.metadata_mut().insert("authorization", v.clone());
        }
        crate::telemetry::inject_grpc(r.metadata_mut());
        Ok(r)
    }
}

/// A channel whose calls carry the internal token.
pub type AuthChannel = InterceptedService<Channel, AttachToken>;

/// `channel`, with the token on every call.
pub fn authenticated(channel: Channel, token: Option<&InternalToken>) -> AuthChannel {
    InterceptedService::new(channel, AttachToken::new(token))
}

#[cfg(test)]
mod tests {

    #[test]
    fn only_a_systemd_credential_may_show_group_bits() {
        let dir = std::ffi::OsStr::new("/run/credentials/securellm-gateway.service");
        let cred = Path::new("/run/credentials/securellm-gateway.service/internal-token");
        let other = Path::new("/var/lib/securellm/internal-token");
        assert!(!exposed(0o600, other, None));
        assert!(exposed(0o640, other, None));
        assert!(exposed(0o640, other, Some(dir)));
        assert!(!exposed(0o440, cred, Some(dir)));
        assert!(
            exposed(0o440, cred, None),
            "no credentials directory: the mode counts"
        );
        assert!(exposed(0o440, cred, Some(std::ffi::OsStr::new(""))));
    }
    use super::*;

    #[test]
    fn tokens_are_random_hex_and_never_debug_printed() {
        let a = InternalToken::generate();
        let b = InternalToken::generate();
        assert_eq!(a.expose().len(), 64);
        assert!(a.expose().bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a.expose(), b.expose());
        assert!(!format!("{a:?}").contains(a.expose()));
        assert!(a.verify(a.expose().as_bytes()));
        assert!(!a.verify(b.expose().as_bytes()));
        assert!(!a.verify(b""));
        assert!(InternalToken::parse("short").is_err());
        assert!(InternalToken::parse(&format!("{} x", "a".repeat(40))).is_err());
        let t = InternalToken::parse(&format!("  {}\n", "k".repeat(40))).unwrap();
        assert_eq!(t.expose(), "k".repeat(40));
    }

    #[test]
    fn the_file_is_created_private_once_and_then_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new/sub/internal-token");
        let t = load_or_create(&path).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.path().join("new/sub")), 0o700);
        assert_eq!(mode(&dir.path().join("new")), 0o700);
        assert_eq!(load_or_create(&path).unwrap().expose(), t.expose());
        assert_eq!(load(&path).unwrap().expose(), t.expose());
        // No temporary file is left behind.
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
    }

    #[test]
    fn concurrent_starters_agree_on_one_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("internal-token");
        let got: Vec<String> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| s.spawn(|| load_or_create(&path).unwrap().expose().to_string()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(got.iter().all(|t| t == &got[0]), "{got:?}");
    }

    #[test]
    fn unsafe_or_broken_files_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("internal-token");
        assert!(load(&path).unwrap_err().is_missing());
        std::fs::write(&path, "a".repeat(64)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("other users") && e.contains("0644"), "{e}");
        // Creating never replaces an existing file, safe or not.
        assert!(load_or_create(&path).is_err());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(load(&path).is_ok());
        std::fs::write(&path, "tiny").unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("too short"), "{e}");
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }

    #[test]
    fn only_the_bearer_token_is_authorized() {
        let t = InternalToken::generate();
        let h = |v: &str| {
            let mut m = http::HeaderMap::new();
            m.insert(http::header::AUTHORIZATION, v.parse().unwrap());
            m
        };
        assert!(authorized(&t, &h(&format!("Bearer {}", t.expose()))));
        assert!(authorized(&t, &h(&format!("bearer {}", t.expose()))));
        assert!(!authorized(&t, &h(&format!("Basic {}", t.expose()))));
        assert!(!authorized(&t, &h(t.expose())));
        assert!(!authorized(&t, &h("Bearer ")));
        assert!(!authorized(
            &t,
            &h(&format!("Bearer {}", InternalToken::generate().expose()))
        ));
        assert!(!authorized(&t, &http::HeaderMap::new()));
    }
}
