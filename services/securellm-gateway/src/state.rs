//! What the request path shares: the stores, the limiters, the audit log, the upstreams and the
//! settings. Built once by [`crate::start`]; both transports ([`crate::http`], [`crate::grpc`])
//! and the [`crate::pipeline`] take it by reference.

use std::sync::Arc;
use std::time::Duration;

use crate::audit::AuditLog;
use crate::auth::keys::KeyStore;
use crate::limits::ratelimit::RateLimiter;
use crate::upstream::Upstreams;

/// Everything the handlers share.
pub struct AppState {
    pub keys: KeyStore,
    /// JWT verification, when configured.
    pub jwt: Option<crate::auth::jwt::JwtVerifier>,
    /// Where requests go: the cloud upstreams (checked first, by model name), then the local
    /// backend manager.
    pub upstreams: Upstreams,
    pub redactor: crate::redact::Redactor,
    pub audit: AuditLog,
    pub limits: RateLimiter,
    /// With `[storage] url`: the per-key limits held across every gateway on the database (the
    /// in-process limiter then only applies while the database is unreachable, at limit ÷ live
    /// replicas).
    pub shared_limits: Option<Arc<crate::limits::shared::SharedLimiter>>,
    /// Requests in progress per key and per address (checked before the body is read).
    pub inflight: crate::limits::inflight::InFlight,
    /// `audit_mode = "sync"`: no 2xx is given (no stream ends) before its audit row is committed;
    /// a row that cannot be committed turns the answer into a 503.
    pub audit_sync: bool,
    /// A request body must arrive completely within this of its head (HTTP and gRPC).
    pub body_read_timeout: Duration,
    pub request_timeout: Duration,
    /// The largest `max_tokens` a request may ask for; filled in for local models when absent.
    pub max_tokens_cap: u32,
}

pub type Shared = Arc<AppState>;
