//! The management operations, once, behind both admin transports: the `GatewayAdmin` gRPC
//! service ([`crate::grpc::admin`]) and the HTTP management API under `/admin/v1/`
//! ([`crate::http::admin`]).
//!
//! Each operation here authenticates the caller (the admin token, or a JWT whose `scope` includes
//! `admin`; API keys never), does the work, and writes exactly one audit row (who, the key
//! concerned, the outcome). The transports only decode their request into the plain types below,
//! call one function, and encode the answer; a failure is an [`AdminError`], turned into a gRPC
//! status ([`AdminError::status`]) or an HTTP error ([`AdminError::http_status`]) at the edge.
//!
//! Keys and the audit log are the gateway's own; the stack's state (GPUs, leases, the queue, the
//! catalogue, instances, load / unload) is asked of the scheduler, the registry and the backend
//! manager over their gRPC APIs with the internal token, each call bounded by [`CALL_TIMEOUT`]
//! (a load by the request timeout).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use securellm_common::internal_auth::AuthChannel;
use securellm_proto::v1 as pb;
use securellm_proto::v1::backend_manager_client::BackendManagerClient;
use securellm_proto::v1::model_registry_client::ModelRegistryClient;
use securellm_proto::v1::vram_scheduler_client::VramSchedulerClient;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::audit::{AuditEntry, AuditFilter, AuditRow};
use crate::auth::keys::{KeyError, KeyRecord, KeyUpdate, NewKey};
use crate::state::Shared;

/// Every call to another service for the stack's state gives up after this.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The context the catalogue's estimates are computed for (one slot, f16 KV cache, every layer
/// on the GPU), as `securellm models` shows them.
pub const ESTIMATE_CONTEXT: i64 = 4096;

/// The range a key's priority may take.
pub const PRIORITY_RANGE: std::ops::RangeInclusive<i32> = -1000..=1000;

/// Most audit rows one query returns.
pub const MAX_AUDIT_LIMIT: u32 = 10_000;

/// Why a management call failed. The transports map it once: [`AdminError::status`] for gRPC,
/// [`AdminError::http_status`] for HTTP and for the audit row.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No credential, or one that is not the admin token nor a valid JWT.
    #[error("{0}")]
    Unauthenticated(String),
    /// A valid JWT without the `admin` scope.
    #[error("{0}")]
    PermissionDenied(String),
    /// Too many failed attempts from this address; retry after this many seconds.
    #[error("too many failed authentication attempts")]
    TooManyFailures { retry_after_s: u64 },
    /// Bad input, the field named.
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Key(#[from] KeyError),
    /// `audit_mode = "sync"` and the call's audit row could not be committed.
    #[error("the audit row could not be committed: {0}")]
    AuditCommit(String),
    /// The gateway's own failure (the audit store, a task that died).
    #[error("{0}")]
    Internal(String),
    /// Another service answered with an error, or did not answer.
    #[error("{service}: {}", .status.message())]
    Upstream {
        service: &'static str,
        status: tonic::Status,
    },
    /// A failure already in gRPC terms (from the gRPC edge).
    #[error("{}", .0.message())]
    Status(tonic::Status),
    /// Input the HTTP edge could not decode (a body that is not the documented JSON, a bad
    /// query), with the HTTP status it answered.
    #[error("{message}")]
    Rejected { http_status: u16, message: String },
}

impl AdminError {
    /// The gRPC status (with `retry-after` metadata when there is one).
    pub fn status(&self) -> tonic::Status {
        use tonic::{Code, Status};
        match self {
            Self::Unauthenticated(m) => Status::unauthenticated(m.clone()),
            Self::PermissionDenied(m) => Status::permission_denied(m.clone()),
            Self::TooManyFailures { retry_after_s } => {
                let mut st = Status::resource_exhausted(self.to_string());
                if let Ok(v) = retry_after_s.max(&1).to_string().parse() {
                    st.metadata_mut().insert("retry-after", v);
                }
                st
            }
            Self::InvalidArgument(m) => Status::invalid_argument(m.clone()),
            Self::Key(e) => match e {
                KeyError::Invalid { .. } => Status::invalid_argument(e.to_string()),
                KeyError::NotFound(_) => Status::not_found(e.to_string()),
                KeyError::Revoked(_) => Status::failed_precondition(e.to_string()),
                other => Status::internal(other.to_string()),
            },
            Self::AuditCommit(_) => Status::unavailable(self.to_string()),
            Self::Internal(m) => Status::internal(m.clone()),
            Self::Upstream { status, .. } => match status.code() {
                // The other service's refusal of the gateway's own credentials or calls is
                // the gateway's failure, never the caller's.
                Code::Unauthenticated | Code::PermissionDenied => {
                    Status::internal(self.to_string())
                }
                c => Status::new(c, self.to_string()),
            },
            Self::Status(s) => s.clone(),
            Self::Rejected {
                http_status,
                message,
            } => Status::new(
                securellm_common::errors::code_for_http(*http_status),
                message.clone(),
            ),
        }
    }

    /// The HTTP status: the one table (`securellm_common::errors`), with another service's
    /// failure seen as a proxy sees its upstream's (502 failed, 503 unreachable, 504 too slow)
    /// unless it refused the caller's own input (404 unknown model, 400 bad settings).
    pub fn http_status(&self) -> u16 {
        use securellm_common::errors;
        match self {
            Self::Upstream { status, .. } => {
                if errors::is_connection_failure(status) {
                    503
                } else {
                    errors::upstream_http_status(status.code())
                }
            }
            Self::Rejected { http_status, .. } => *http_status,
            other => errors::http_status(other.status().code()),
        }
    }

    /// A short machine-readable code for the HTTP error body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthenticated(_) => "invalid_admin_token",
            Self::PermissionDenied(_) => "permission_denied",
            Self::TooManyFailures { .. } => "rate_limit_exceeded",
            Self::InvalidArgument(_) | Self::Key(KeyError::Invalid { .. }) => "invalid_value",
            Self::Key(KeyError::NotFound(_)) => "key_not_found",
            Self::Key(KeyError::Revoked(_)) => "key_revoked",
            Self::Upstream { status, .. } if status.code() == tonic::Code::NotFound => {
                "model_not_found"
            }
            Self::Upstream { status, .. }
                if securellm_common::errors::is_connection_failure(status) =>
            {
                "upstream_unreachable"
            }
            _ => "server_error",
        }
    }

    fn upstream(service: &'static str) -> impl Fn(tonic::Status) -> Self {
        move |status| Self::Upstream { service, status }
    }
}

/// Who calls and through which door: the credential as given (`Bearer` stripped), the client's
/// address, and the endpoint the audit row names.
#[derive(Clone, Debug)]
pub struct Caller {
    pub bearer: String,
    pub client: String,
    pub endpoint: String,
}

impl Caller {
    /// From an `authorization` header value (`Bearer <token>`; anything else is no credential).
    pub fn new(authorization: Option<&str>, client: String, endpoint: String) -> Self {
        let bearer = authorization
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("")
            .trim()
            .to_string();
        Self {
            bearer,
            client,
            endpoint,
        }
    }
}

/// An authenticated management call in progress (for its audit row).
pub struct Call {
    endpoint: String,
    subject: String,
    client: String,
    started: Instant,
}

/// A key's limits; absent = no limit.
#[derive(Clone, Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyLimits {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    pub max_concurrent: Option<u32>,
    /// Largest `max_tokens` a request may ask for (the gateway's cap bounds it too).
    pub max_tokens: Option<u32>,
}

/// A new API key.
#[derive(Clone, Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKeyRequest {
    /// 1 to 128 characters.
    pub name: String,
    /// Who the key's requests are audited as; default: the name.
    #[serde(default)]
    pub subject: Option<String>,
    /// Model patterns (`*` matches any run of characters); empty = every model.
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub limits: Option<KeyLimits>,
    /// The priority of the loads the key's requests trigger, -1000..=1000; absent = the model's.
    #[serde(default)]
    pub priority: Option<i32>,
    /// Unix milliseconds, in the future; absent = never.
    #[serde(default)]
    pub expires_at_ms: Option<u64>,
}

/// A change to a key; absent fields stay as they are.
#[derive(Clone, Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyChange {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// Present limits replace all of them (an absent member = no limit).
    #[serde(default)]
    pub limits: Option<KeyLimits>,
    #[serde(default)]
    pub priority: Option<i32>,
    /// Back to the model's priority (not together with `priority`).
    #[serde(default)]
    pub clear_priority: bool,
    /// New expiry in unix ms; 0 = never.
    #[serde(default)]
    pub expires_at_ms: Option<u64>,
}

/// Which audit rows to return (every field optional; they combine with AND).
#[derive(Clone, Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// `time_ms >= since_ms`.
    pub since_ms: Option<u64>,
    /// `time_ms <= until_ms`.
    pub until_ms: Option<u64>,
    pub subject: Option<String>,
    pub key_id: Option<String>,
    pub model: Option<String>,
    /// `status >= status_min`.
    pub status_min: Option<u32>,
    /// `status <= status_max`.
    pub status_max: Option<u32>,
    /// Rows after this id (paging forwards).
    pub after_id: Option<u64>,
    /// At most this many rows (1..=10000; default 100).
    pub limit: Option<u32>,
}

/// Rows of the audit log, oldest first; `truncated` when more match.
pub struct AuditPage {
    pub rows: Vec<AuditRow>,
    pub truncated: bool,
}

/// One service as the management API saw it: how long its state took, or why it is unknown.
pub struct ServiceState {
    pub name: &'static str,
    pub address: String,
    pub up: Result<Duration, String>,
}

/// The stack at a glance: each internal service's state, the scheduler's GPUs, leases and
/// queue, the backend manager's instances, and how many models the registry found.
pub struct StackStatus {
    pub services: Vec<ServiceState>,
    pub scheduler: Result<pb::SchedulerStatus, String>,
    pub instances: Result<Vec<pb::BackendInstance>, String>,
    pub models_found: Result<usize, String>,
}

/// A model of the catalogue and the registry's estimate at [`ESTIMATE_CONTEXT`] (absent when
/// it cannot estimate, e.g. a model that failed to parse).
pub struct CatalogueEntry {
    pub model: pb::Model,
    pub estimate: Option<pb::MemoryEstimate>,
}

/// The addresses of the services the management API asks (for the status).
#[derive(Clone, Debug)]
pub struct Addresses {
    pub scheduler: String,
    pub registry: String,
    pub backend: String,
}

struct Inner {
    state: Shared,
    /// Never printed, wiped when dropped (`secrecy`).
    token: SecretString,
    scheduler: VramSchedulerClient<AuthChannel>,
    registry: ModelRegistryClient<AuthChannel>,
    backend: BackendManagerClient<AuthChannel>,
    addresses: Addresses,
}

/// The management operations (cheap to clone).
#[derive(Clone)]
pub struct Management {
    inner: Arc<Inner>,
}

/// Run to completion (change, reload, audit row) even if the caller goes away meanwhile: a
/// half-done key change would leave the key table and its in-memory copy apart.
async fn to_completion<T: Send + 'static>(
    work: impl Future<Output = Result<T, AdminError>> + Send + 'static,
) -> Result<T, AdminError> {
    tokio::spawn(work)
        .await
        .unwrap_or_else(|e| Err(AdminError::Internal(format!("admin call failed: {e}"))))
}

fn check_priority(p: Option<i32>) -> Result<Option<i32>, AdminError> {
    match p {
        Some(v) if !PRIORITY_RANGE.contains(&v) => Err(AdminError::InvalidArgument(format!(
            "invalid `priority`: {v} is outside {}..={}",
            PRIORITY_RANGE.start(),
            PRIORITY_RANGE.end()
        ))),
        p => Ok(p),
    }
}

fn tpm(t: Option<u64>) -> Option<u32> {
    t.map(|t| u32::try_from(t).unwrap_or(u32::MAX))
}

/// The audit filter a query asks for, or the first field that is out of range.
pub fn audit_filter(q: AuditQuery) -> Result<(AuditFilter, u32), AdminError> {
    let limit = match q.limit {
        None | Some(0) => 100,
        Some(l) if l > MAX_AUDIT_LIMIT => {
            return Err(AdminError::InvalidArgument(format!(
                "invalid `limit`: at most {MAX_AUDIT_LIMIT}"
            )));
        }
        Some(l) => l,
    };
    if let (Some(a), Some(b)) = (q.since_ms, q.until_ms)
        && a > b
    {
        return Err(AdminError::InvalidArgument(
            "invalid `since_ms`: after `until_ms`".into(),
        ));
    }
    if let (Some(a), Some(b)) = (q.status_min, q.status_max)
        && a > b
    {
        return Err(AdminError::InvalidArgument(
            "invalid `status_min`: above `status_max`".into(),
        ));
    }
    let nonempty = |s: Option<String>| s.filter(|s| !s.is_empty());
    let filter = AuditFilter {
        since_ms: q.since_ms,
        until_ms: q.until_ms.map(|u| u.saturating_add(1)),
        subject: nonempty(q.subject),
        key_id: nonempty(q.key_id),
        model: nonempty(q.model),
        status_min: q.status_min.map(|s| s.min(u32::from(u16::MAX)) as u16),
        status_max: q.status_max.map(|s| s.min(u32::from(u16::MAX)) as u16),
        after_id: q.after_id.map(|a| i64::try_from(a).unwrap_or(i64::MAX)),
        // One row more than asked tells whether there are more.
        limit: Some(limit + 1),
        ..Default::default()
    };
    Ok((filter, limit))
}

/// An answer with the time it took, or why there is none.
fn timed<T>(r: Result<T, tonic::Status>, since: Instant) -> Result<(T, Duration), String> {
    r.map(|v| (v, since.elapsed()))
        .map_err(|s| s.message().to_string())
}

/// How long an answer took, or why there is none.
fn latency<T>(r: &Result<(T, Duration), String>) -> Result<Duration, String> {
    r.as_ref().map(|v| v.1).map_err(Clone::clone)
}

/// `call` bounded by `limit`; a call that runs out is `DEADLINE_EXCEEDED`.
async fn bounded<T>(
    limit: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(limit, call).await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "no answer within {} ms",
            limit.as_millis()
        ))),
    }
}

impl Management {
    /// `token`: the admin token (empty = only admin-scoped JWTs); the channels carry the internal
    /// token.
    pub fn new(
        state: Shared,
        token: SecretString,
        scheduler: AuthChannel,
        registry: AuthChannel,
        backend: AuthChannel,
        addresses: Addresses,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                state,
                token,
                scheduler: VramSchedulerClient::new(scheduler),
                registry: ModelRegistryClient::new(registry),
                backend: BackendManagerClient::new(backend),
                addresses,
            }),
        }
    }

    fn state(&self) -> &Shared {
        &self.inner.state
    }

    /// Authenticate a management call: the admin token (constant time), or a JWT whose `scope`
    /// includes `admin`. A refusal is audited and counts against the client address's
    /// failed-authentication limit.
    pub fn begin(&self, who: &Caller) -> Result<Call, AdminError> {
        let mut call = Call {
            endpoint: who.endpoint.clone(),
            subject: String::new(),
            client: who.client.clone(),
            started: Instant::now(),
        };
        let given = who.bearer.as_str();
        let token = self.inner.token.expose_secret();
        let refused = if given.is_empty() {
            Some(AdminError::Unauthenticated(
                "an admin token is required (authorization: Bearer <admin token>)".into(),
            ))
        } else if !token.is_empty() && bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
            call.subject = "admin".into();
            None
        } else {
            match &self.state().jwt {
                Some(v) if crate::auth::jwt::JwtVerifier::looks_like_jwt(given) => {
                    match v.verify(given) {
                        Ok(k) if k.admin => {
                            call.subject = k.subject;
                            None
                        }
                        Ok(k) => {
                            call.subject = k.subject;
                            Some(AdminError::PermissionDenied(
                                "this token's scope does not include `admin`".into(),
                            ))
                        }
                        Err(why) => Some(AdminError::Unauthenticated(format!(
                            "invalid bearer token: {why}"
                        ))),
                    }
                }
                _ => Some(AdminError::Unauthenticated("invalid admin token".into())),
            }
        };
        let Some(err) = refused else {
            return Ok(call);
        };
        // Failed attempts from an address past its limit: refused without saying why.
        let err = match self.state().limits.auth_blocked(&call.client) {
            Some(wait) => AdminError::TooManyFailures {
                retry_after_s: wait.as_secs().max(1),
            },
            None => {
                if matches!(err, AdminError::Unauthenticated(_)) {
                    self.state().limits.auth_failed(&call.client);
                }
                err
            }
        };
        self.finish(&call, "", Err(&err));
        Err(err)
    }

    /// Audit a call, then give its outcome. With `audit_mode = "sync"` a successful call waits
    /// for its row's commit ([`AdminError::AuditCommit`] if the row cannot be committed).
    pub async fn done<T>(
        &self,
        call: &Call,
        key_id: &str,
        out: Result<T, AdminError>,
    ) -> Result<T, AdminError> {
        if self.state().audit_sync && out.is_ok() {
            let entry = Self::entry(call, key_id, Ok(()));
            self.state()
                .audit
                .append(entry)
                .await
                .map_err(|e| AdminError::AuditCommit(e.to_string()))?;
            return out;
        }
        self.finish(call, key_id, out.as_ref().map(|_| ()));
        out
    }

    /// Queue the audit row of a call. A refusal before any caller was known (no valid token) is
    /// aggregated per address and window, as for the API.
    fn finish(&self, call: &Call, key_id: &str, outcome: Result<(), &AdminError>) {
        let anonymous = outcome.is_err() && call.subject.is_empty();
        let entry = Self::entry(call, key_id, outcome);
        if anonymous {
            self.state().audit.append_auth_failure(entry);
        } else {
            self.state().audit.append_nowait(entry);
        }
    }

    /// The audit row of a call (the key concerned, never a secret).
    fn entry(call: &Call, key_id: &str, outcome: Result<(), &AdminError>) -> AuditEntry {
        let (status, code) = match outcome {
            Ok(()) => (200, String::new()),
            Err(e) => (e.http_status(), format!("{:?}", e.status().code())),
        };
        AuditEntry {
            time_ms: securellm_common::time::now_ms(),
            request_id: String::new(),
            subject: call.subject.clone(),
            key_id: key_id.to_string(),
            client_addr: call.client.clone(),
            endpoint: call.endpoint.clone(),
            upstream: "admin".into(),
            status,
            error_code: code,
            latency_us: call.started.elapsed().as_micros() as u64,
            ..AuditEntry::default()
        }
    }

    /// A call whose input the transport could not decode: authenticated and audited like any
    /// other (so a wrong token is a 401 before any 400), then refused with `why`.
    pub async fn refuse(&self, who: &Caller, why: AdminError) -> AdminError {
        match self.begin(who) {
            Ok(call) => match self.done::<()>(&call, "", Err(why)).await {
                Err(e) => e,
                Ok(()) => AdminError::Internal("a refusal was not refused".into()),
            },
            Err(e) => e,
        }
    }

    /// Authenticate, run `work`, audit (with the key id `work` names).
    async fn run<T, Fut>(
        &self,
        who: &Caller,
        work: impl FnOnce(Self) -> Fut,
    ) -> Result<T, AdminError>
    where
        Fut: Future<Output = (String, Result<T, AdminError>)>,
    {
        let call = self.begin(who)?;
        let (key_id, out) = work(self.clone()).await;
        self.done(&call, &key_id, out).await
    }

    /// Create an API key; its secret is returned once, never stored.
    pub async fn create_key(
        &self,
        who: Caller,
        r: NewKeyRequest,
    ) -> Result<(String, KeyRecord), AdminError> {
        let me = self.clone();
        to_completion(async move {
            me.run(&who, |m| async move {
                let out = m.create_key_now(r).await;
                let id = out.as_ref().map(|(_, k)| k.id.clone()).unwrap_or_default();
                (id, out)
            })
            .await
        })
        .await
    }

    async fn create_key_now(&self, r: NewKeyRequest) -> Result<(String, KeyRecord), AdminError> {
        let now = securellm_common::time::now_ms();
        if r.expires_at_ms.is_some_and(|e| e <= now) {
            return Err(AdminError::InvalidArgument(
                "invalid `expires_at_ms`: in the past".into(),
            ));
        }
        let limits = r.limits.unwrap_or_default();
        Ok(self
            .state()
            .keys
            .create(NewKey {
                name: r.name,
                subject: r.subject.filter(|s| !s.is_empty()),
                models: r.models,
                rpm: limits.requests_per_minute,
                tpm: tpm(limits.tokens_per_minute),
                concurrent: limits.max_concurrent,
                max_tokens: limits.max_tokens,
                priority: check_priority(r.priority)?,
                expires_ms: r.expires_at_ms,
            })
            .await?)
    }

    /// The keys, newest first; revoked and expired ones only with `include_inactive`.
    pub async fn list_keys(
        &self,
        who: Caller,
        include_inactive: bool,
    ) -> Result<Vec<KeyRecord>, AdminError> {
        self.run(&who, |m| async move {
            let now = securellm_common::time::now_ms();
            let mut keys: Vec<KeyRecord> = m
                .state()
                .keys
                .list()
                .into_iter()
                .filter(|k| include_inactive || k.active(now))
                .collect();
            keys.reverse();
            (String::new(), Ok(keys))
        })
        .await
    }

    /// Revoke a key (effective for its next request).
    pub async fn revoke_key(&self, who: Caller, id: String) -> Result<KeyRecord, AdminError> {
        let me = self.clone();
        to_completion(async move {
            me.run(&who, |m| async move {
                let out = m.state().keys.revoke(&id).await.map_err(AdminError::from);
                (id, out)
            })
            .await
        })
        .await
    }

    /// Change a key's name, patterns, limits, priority or expiry.
    pub async fn update_key(
        &self,
        who: Caller,
        id: String,
        r: KeyChange,
    ) -> Result<KeyRecord, AdminError> {
        let me = self.clone();
        to_completion(async move {
            me.run(&who, |m| async move {
                let out = m.update_key_now(&id, r).await;
                (id, out)
            })
            .await
        })
        .await
    }

    async fn update_key_now(&self, id: &str, r: KeyChange) -> Result<KeyRecord, AdminError> {
        // Present limits replace all of them, `max_tokens` included (absent = none).
        let max_tokens = r.limits.as_ref().map(|l| l.max_tokens.unwrap_or(0));
        let priority = match (r.priority, r.clear_priority) {
            (Some(_), true) => {
                return Err(AdminError::InvalidArgument(
                    "invalid `clear_priority`: give either `priority` or `clear_priority`".into(),
                ));
            }
            (Some(p), false) => Some(check_priority(Some(p))?),
            (None, true) => Some(None),
            (None, false) => None,
        };
        Ok(self
            .state()
            .keys
            .update(
                id,
                KeyUpdate {
                    name: r.name,
                    models: r.models,
                    limits: r.limits.map(|l| {
                        (
                            l.requests_per_minute,
                            tpm(l.tokens_per_minute),
                            l.max_concurrent,
                        )
                    }),
                    max_tokens,
                    priority,
                    expires_ms: r.expires_at_ms,
                },
            )
            .await?)
    }

    /// Rows of the audit log that match `q`.
    pub async fn query_audit(&self, who: Caller, q: AuditQuery) -> Result<AuditPage, AdminError> {
        self.run(&who, |m| async move {
            let out = async {
                let (filter, limit) = audit_filter(q)?;
                let mut rows = m
                    .state()
                    .audit
                    .query(filter)
                    .await
                    .map_err(|e| AdminError::Internal(e.to_string()))?;
                let truncated = rows.len() > limit as usize;
                rows.truncate(limit as usize);
                Ok(AuditPage { rows, truncated })
            }
            .await;
            (String::new(), out)
        })
        .await
    }

    /// The stack at a glance. Never fails for a service that is down: its part is unknown, with
    /// the reason.
    pub async fn status(&self, who: Caller) -> Result<StackStatus, AdminError> {
        self.run(&who, |m| async move {
            let mut sched = m.inner.scheduler.clone();
            let mut reg = m.inner.registry.clone();
            let mut back = m.inner.backend.clone();
            let t = Instant::now();
            let (s, r, b) = tokio::join!(
                async {
                    let r = bounded(CALL_TIMEOUT, sched.get_status(pb::GetStatusRequest {})).await;
                    timed(r, t)
                },
                async {
                    let r = bounded(
                        CALL_TIMEOUT,
                        reg.list_models(pb::ListModelsRequest::default()),
                    )
                    .await;
                    timed(r.map(|l| l.models.len()), t)
                },
                async {
                    let r = bounded(
                        CALL_TIMEOUT,
                        back.list_instances(pb::ListInstancesRequest::default()),
                    )
                    .await;
                    timed(r.map(|l| l.instances), t)
                },
            );
            let a = &m.inner.addresses;
            let services = vec![
                ServiceState {
                    name: "vram-scheduler",
                    address: a.scheduler.clone(),
                    up: latency(&s),
                },
                ServiceState {
                    name: "registry",
                    address: a.registry.clone(),
                    up: latency(&r),
                },
                ServiceState {
                    name: "backend-manager",
                    address: a.backend.clone(),
                    up: latency(&b),
                },
            ];
            let status = StackStatus {
                services,
                scheduler: s.map(|v| v.0),
                models_found: r.map(|v| v.0),
                instances: b.map(|v| v.0),
            };
            (String::new(), Ok(status))
        })
        .await
    }

    /// The registry's catalogue, each model with its estimate at [`ESTIMATE_CONTEXT`].
    pub async fn models(&self, who: Caller) -> Result<Vec<CatalogueEntry>, AdminError> {
        self.run(&who, |m| async move {
            let out = async {
                let mut reg = m.inner.registry.clone();
                let models = bounded(
                    CALL_TIMEOUT,
                    reg.list_models(pb::ListModelsRequest::default()),
                )
                .await
                .map_err(AdminError::upstream("registry"))?
                .models;
                let estimates = futures::future::join_all(models.iter().map(|model| {
                    let mut reg = m.inner.registry.clone();
                    async move {
                        bounded(
                            CALL_TIMEOUT,
                            reg.estimate(pb::EstimateRequest {
                                model: model.id.clone(),
                                context: ESTIMATE_CONTEXT,
                                parallel: 1,
                                cache_type: pb::KvCacheType::F16 as i32,
                                gpu_layers: None,
                            }),
                        )
                        .await
                        .ok()
                    }
                }))
                .await;
                Ok(models
                    .into_iter()
                    .zip(estimates)
                    .map(|(model, estimate)| CatalogueEntry { model, estimate })
                    .collect())
            }
            .await;
            (String::new(), out)
        })
        .await
    }

    /// The backend manager's instances.
    pub async fn instances(&self, who: Caller) -> Result<Vec<pb::BackendInstance>, AdminError> {
        self.run(&who, |m| async move {
            let mut back = m.inner.backend.clone();
            let out = bounded(
                CALL_TIMEOUT,
                back.list_instances(pb::ListInstancesRequest::default()),
            )
            .await
            .map(|l| l.instances)
            .map_err(AdminError::upstream("backend-manager"));
            (String::new(), out)
        })
        .await
    }

    /// Load a model (registry id, alias or name) with its configured settings; waits until it
    /// is ready, at most the gateway's request timeout.
    pub async fn load(
        &self,
        who: Caller,
        model: String,
    ) -> Result<pb::BackendInstance, AdminError> {
        self.run(&who, |m| async move {
            let out = async {
                let model = check_model(model)?;
                let limit = m.state().request_timeout;
                let deadline_ms = securellm_common::time::now_ms()
                    .saturating_add(u64::try_from(limit.as_millis()).unwrap_or(u64::MAX));
                let mut back = m.inner.backend.clone();
                bounded(
                    limit,
                    back.load(pb::LoadRequest {
                        model,
                        settings: None,
                        deadline_ms,
                    }),
                )
                .await
                .map_err(AdminError::upstream("backend-manager"))
            }
            .await;
            (String::new(), out)
        })
        .await
    }

    /// Unload a model (its requests in flight drain first, as the manager's default says).
    pub async fn unload(
        &self,
        who: Caller,
        model: String,
    ) -> Result<pb::UnloadResponse, AdminError> {
        self.run(&who, |m| async move {
            let out = async {
                let model = check_model(model)?;
                let mut back = m.inner.backend.clone();
                bounded(
                    m.state().request_timeout,
                    back.unload(pb::UnloadRequest {
                        model,
                        drain_timeout_ms: 0,
                        force: false,
                    }),
                )
                .await
                .map_err(AdminError::upstream("backend-manager"))
            }
            .await;
            (String::new(), out)
        })
        .await
    }
}

/// A model name as a load or unload takes it: not empty, at most 256 bytes.
fn check_model(model: String) -> Result<String, AdminError> {
    let m = model.trim();
    if m.is_empty() || m.len() > 256 {
        return Err(AdminError::InvalidArgument(
            "invalid `model`: give a registry id, alias or name (1 to 256 characters)".into(),
        ));
    }
    Ok(m.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_queries_out_of_range_are_refused_naming_the_field() {
        let bad = |q: AuditQuery| match audit_filter(q) {
            Err(AdminError::InvalidArgument(m)) => m,
            other => panic!("{:?}", other.map(|_| ())),
        };
        assert!(
            bad(AuditQuery {
                limit: Some(10_001),
                ..Default::default()
            })
            .contains("`limit`")
        );
        assert!(
            bad(AuditQuery {
                since_ms: Some(2),
                until_ms: Some(1),
                ..Default::default()
            })
            .contains("`since_ms`")
        );
        assert!(
            bad(AuditQuery {
                status_min: Some(500),
                status_max: Some(400),
                ..Default::default()
            })
            .contains("`status_min`")
        );
        let (f, limit) = audit_filter(AuditQuery::default()).unwrap();
        assert_eq!((limit, f.limit), (100, Some(101)));
    }

    #[test]
    fn errors_map_to_one_status_on_both_transports() {
        assert_eq!(AdminError::Unauthenticated("x".into()).http_status(), 401);
        assert_eq!(AdminError::PermissionDenied("x".into()).http_status(), 403);
        assert_eq!(AdminError::InvalidArgument("x".into()).http_status(), 400);
        assert_eq!(
            AdminError::Key(KeyError::NotFound("k".into())).http_status(),
            404
        );
        let e = AdminError::Upstream {
            service: "backend-manager",
            status: tonic::Status::not_found("no model `x`"),
        };
        assert_eq!((e.http_status(), e.code()), (404, "model_not_found"));
        // The other service refusing the gateway's internal token is not the caller's 401.
        let e = AdminError::Upstream {
            service: "registry",
            status: tonic::Status::unauthenticated("bad internal token"),
        };
        assert_ne!(e.http_status(), 401);
        assert_eq!(e.status().code(), tonic::Code::Internal);
        assert!(check_model("  ".into()).is_err());
        assert_eq!(check_model(" tiny ".into()).unwrap(), "tiny");
    }
}
