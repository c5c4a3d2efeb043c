//! The request path after the transport, shared by HTTP ([`crate::http`]) and gRPC
//! ([`crate::grpc`]):
//!
//! ```text
//! authenticate → authorize → validate → rate-limit → redact → audit → route → forward
//! ```
//! Each step is a call into its own module (`auth`, `validate`, `limits`, `redact`, `audit`) or,
//! to forward, into the [`crate::upstream::Upstream`] the routing table picks; this file only
//! orders them. Every request, allowed or denied, leaves exactly one audit row ([`AuditGuard`]
//! writes it on drop, also when the client goes away mid-stream). `tests.rs` drives the path
//! through an in-memory upstream.

use std::pin::Pin;
use std::time::Instant;

use axum::http::StatusCode;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use securellm_common::time::now_ms;
use serde_json::Value;
use tracing::Instrument;

use crate::audit::AuditEntry;
use crate::auth::keys::KeyRecord;
use crate::error::ApiError;
use crate::limits::ratelimit::{Admission, Limits, estimate_prompt_tokens};
use crate::state::{AppState, Shared};
pub use crate::upstream::ModelEntry;
use crate::upstream::{
    Endpoint, ItemStream, Reach, StreamAnswer, StreamItem, UpstreamRequest, Usage,
};

/// Who is calling.
#[derive(Clone, Debug)]
pub struct Caller {
    pub key: KeyRecord,
    /// The client's IP address (rate limits on failed authentication, audit).
    pub client: String,
    /// The trace the request belongs to (32 hex digits), for its audit row; empty if none.
    pub trace_id: String,
}

/// The request id a client sent, if usable (1..=128 printable ASCII bytes), else a new one.
pub fn request_id(given: Option<&str>) -> String {
    given
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(new_request_id)
}

/// `req_` + a random per-process prefix + a counter: unique without a random draw per request.
fn new_request_id() -> String {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| {
        let mut b = [0u8; 8];
        if getrandom::fill(&mut b).is_err() {
            b = now_ms().to_le_bytes();
        }
        u64::from_le_bytes(b)
    });
    format!(
        "req_{prefix:016x}{:012x}",
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Authenticate `Authorization: Bearer <API key or JWT>`. A failure is audited (aggregated per
/// address and window: [`crate::audit::AuditLog::append_auth_failure`]) and counts against the
/// client address's failed-authentication limit. `trace_id`: the trace the request belongs to
/// (see [`securellm_common::telemetry::trace_id`]), recorded in its audit rows.
pub fn authenticate(
    st: &AppState,
    client: &str,
    request_id: &str,
    endpoint: &str,
    authorization: Option<&str>,
    trace_id: Option<String>,
) -> Result<Caller, ApiError> {
    let request_span = crate::observe::current_span();
    let span = crate::req_span!("authenticate");
    let _enter = span.enter();
    let deny = |e: ApiError, trace_id: Option<String>| {
        let entry = AuditEntry {
            time_ms: now_ms(),
            request_id: request_id.to_string(),
            client_addr: client.to_string(),
            endpoint: endpoint.to_string(),
            status: e.status.as_u16(),
            error_code: e.code.unwrap_or("").to_string(),
            trace_id: trace_id.unwrap_or_default(),
            ..AuditEntry::default()
        };
        crate::observe::request(&entry);
        request_span.record("error.type", e.code.unwrap_or(e.kind));
        st.audit.append_auth_failure(entry);
        e
    };
    // The credential first: a valid one is never locked out by someone else's failures from the
    // same address (on loopback every local process shares one); only failures are limited.
    let token = authorization
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .unwrap_or("");
    // The reason a credential is refused, as the `auth_failures_total` metric names it.
    let mut reason = "invalid";
    let verdict: Result<KeyRecord, ApiError> = if token.is_empty() {
        reason = "missing";
        Err(ApiError::unauthorized(
            "You didn't provide an API key. Send it as `Authorization: Bearer sk-...`.",
        ))
    } else {
        match (&st.jwt, st.keys.lookup(token)) {
            (_, Some(k)) => Ok(k),
            (Some(v), None) if crate::auth::jwt::JwtVerifier::looks_like_jwt(token) => {
                v.verify(token).map_err(|why| {
                    reason = "jwt";
                    ApiError::unauthorized(format!("Invalid bearer token: {why}."))
                })
            }
            _ => Err(ApiError::unauthorized("Incorrect API key provided.")),
        }
        .and_then(|k| {
            if k.active(now_ms()) {
                Ok(k)
            } else if k.revoked_ms.is_some() {
                reason = "revoked";
                Err(ApiError::unauthorized("This API key has been revoked."))
            } else {
                reason = "expired";
                Err(ApiError::unauthorized("This API key has expired."))
            }
        })
    };
    let key = match verdict {
        Ok(k) => k,
        Err(e) => {
            crate::observe::auth_failure(reason);
            if let Some(wait) = st.limits.auth_blocked(client) {
                crate::observe::rate_limited("auth_failures");
                return Err(deny(
                    ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "rate_limit_error",
                        "too many failed authentication attempts",
                    )
                    .code("rate_limit_exceeded")
                    .header("retry-after", wait.as_secs().max(1).to_string()),
                    trace_id,
                ));
            }
            st.limits.auth_failed(client);
            return Err(deny(e, trace_id));
        }
    };
    request_span.record("securellm.key_id", key.id.as_str());
    Ok(Caller {
        key,
        client: client.to_string(),
        trace_id: trace_id.unwrap_or_default(),
    })
}

/// The models `caller` may use: each upstream's in routing table order (local ones from the
/// registry, then configured cloud ones, exact names only; patterns are not listable). Audited.
pub async fn list_models(
    st: &Shared,
    caller: &Caller,
    request_id: &str,
    endpoint: &str,
) -> Result<Vec<ModelEntry>, ApiError> {
    let started = Instant::now();
    let out = async {
        let mut data = Vec::new();
        for u in st.upstreams.all() {
            data.extend(
                u.models()
                    .await?
                    .into_iter()
                    .filter(|m| caller.key.allows(&m.id)),
            );
        }
        Ok::<_, ApiError>(data)
    }
    .await;
    let entry = AuditEntry {
        time_ms: now_ms(),
        request_id: request_id.to_string(),
        subject: caller.key.subject.clone(),
        key_id: caller.key.id.clone(),
        client_addr: caller.client.clone(),
        endpoint: endpoint.to_string(),
        upstream: "registry".into(),
        status: out.as_ref().map_or_else(|e| e.status.as_u16(), |_| 200),
        latency_us: started.elapsed().as_micros() as u64,
        trace_id: caller.trace_id.clone(),
        ..AuditEntry::default()
    };
    if let Ok(ms) = &out {
        for m in ms {
            crate::observe::learn_model(&m.id);
        }
    }
    crate::observe::request(&entry);
    crate::observe::first_byte(endpoint, started.elapsed());
    if st.audit_sync && out.is_ok() {
        // Fail-closed: no answer before its row is committed.
        st.audit
            .append(entry)
            .await
            .map_err(|e| audit_unavailable(&e))?;
    } else {
        st.audit.append_nowait(entry);
    }
    out
}

/// The answer when `audit_mode = "sync"` cannot commit a row.
fn audit_unavailable(e: &crate::audit::AuditError) -> ApiError {
    tracing::error!("audit row not committed, answer withheld: {e}");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "The request could not be recorded in the audit log; its answer is withheld.",
    )
    .code("audit_unavailable")
}

/// `{"object": "list", "data": [...]}` as OpenAI answers `GET /v1/models`.
pub fn models_body(models: &[ModelEntry]) -> Value {
    let data: Vec<Value> = models
        .iter()
        .map(|m| serde_json::json!({"id": m.id, "object": "model", "created": m.created, "owned_by": m.owned_by}))
        .collect();
    serde_json::json!({"object": "list", "data": data})
}

/// One audit row in the making; written on drop, so every exit path (including a client that
/// disconnects mid-stream) leaves exactly one row. It starts as 499 `client_closed_request`: a
/// request whose future is dropped before an answer (the caller went away) is recorded as such,
/// never as a success.
pub struct AuditGuard {
    st: Shared,
    pub entry: AuditEntry,
    started: Instant,
    /// Committed already (`audit_mode = "sync"`).
    written: bool,
    /// The request's span (`Span::none()` unless traces are exported).
    span: tracing::Span,
    /// `local` or `cloud` (the `upstream_errors_total` label).
    upstream_kind: &'static str,
}

const CLIENT_CLOSED: u16 = 499;

impl AuditGuard {
    fn succeed(&mut self, status: u16) {
        self.entry.status = status;
        self.entry.error_code = if status < 400 {
            String::new()
        } else {
            "upstream_error".into()
        };
    }

    fn fail(&mut self, e: &ApiError) {
        self.entry.status = e.status.as_u16();
        self.entry.error_code = e.code.unwrap_or(e.kind).to_string();
    }

    /// The row is final: its latency, the request's metrics and span attributes.
    fn finalize(&mut self) {
        self.entry.latency_us = self.started.elapsed().as_micros() as u64;
        crate::observe::request(&self.entry);
        if !self.span.is_none() {
            let e = &self.entry;
            self.span.record("http.response.status_code", e.status);
            self.span
                .record("gen_ai.usage.input_tokens", e.prompt_tokens);
            self.span
                .record("gen_ai.usage.output_tokens", e.completion_tokens);
            if e.status >= 400 {
                self.span.record("error.type", e.error_code.as_str());
            }
        }
    }
}

impl AuditGuard {
    /// With `audit_mode = "sync"`: commit the row now and wait for it (the drop then writes
    /// nothing). If this is cancelled before the row is queued, the drop still queues it.
    async fn commit_if_sync(&mut self) -> Result<(), ApiError> {
        if !self.st.audit_sync || self.written {
            return Ok(());
        }
        let st = self.st.clone();
        let permit = st
            .audit
            .reserve()
            .await
            .map_err(|e| audit_unavailable(&e))?;
        self.finalize();
        self.written = true;
        permit
            .send(std::mem::take(&mut self.entry))
            .await
            .map(|_| ())
            .map_err(|e| audit_unavailable(&e))
    }
}

impl Drop for AuditGuard {
    fn drop(&mut self) {
        if self.written {
            return;
        }
        self.finalize();
        self.st.audit.append_nowait(std::mem::take(&mut self.entry));
    }
}

/// Streaming or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// As the body's `stream` member says (HTTP).
    FromBody,
    /// Forced (gRPC: the method decides; the body's `stream` member is ignored).
    Complete,
    Stream,
}

/// Stream items as the transports relay them; the stream ends after an error.
pub type RelayStream = Pin<Box<dyn Stream<Item = Result<StreamItem, ApiError>> + Send>>;

/// What the upstream answered.
pub enum Reply {
    /// A whole answer (also an upstream's refusal before a stream started: status ≥ 400).
    Complete {
        status: u16,
        body: Bytes,
        usage: Usage,
    },
    /// Payloads as they arrive. Dropping the stream cancels the upstream request.
    Stream(RelayStream),
}

/// An answer with what the transports put in headers / metadata.
pub struct Answer {
    pub reply: Reply,
    /// Rate-limit headers (`x-ratelimit-*`).
    pub headers: Vec<(&'static str, String)>,
    pub model: String,
    pub upstream: String,
}

/// Run one inference request through the path. `body` is the raw body or the transport's reason
/// for not having one (too large, unreadable), which is audited like every other failure.
pub async fn infer(
    st: &Shared,
    caller: &Caller,
    rid: &str,
    endpoint_label: &str,
    body: Result<Bytes, ApiError>,
    endpoint: Endpoint,
    mode: Mode,
) -> Result<Answer, ApiError> {
    let span = crate::observe::current_span();
    span.record(
        "gen_ai.operation.name",
        match endpoint {
            Endpoint::Chat => "chat",
            Endpoint::Completions => "text_completion",
            Endpoint::Embeddings => "embeddings",
        },
    );
    let mut audit = AuditGuard {
        st: st.clone(),
        entry: AuditEntry {
            time_ms: now_ms(),
            request_id: rid.to_string(),
            subject: caller.key.subject.clone(),
            key_id: caller.key.id.clone(),
            client_addr: caller.client.clone(),
            endpoint: endpoint_label.to_string(),
            upstream: "local".into(),
            status: CLIENT_CLOSED,
            error_code: "client_closed_request".into(),
            trace_id: caller.trace_id.clone(),
            ..AuditEntry::default()
        },
        started: Instant::now(),
        written: false,
        span,
        upstream_kind: "local",
    };
    // The whole request until its answer starts (a model load included) is bounded here, so a
    // time-out is audited as the 504 the caller gets.
    let out = match tokio::time::timeout(
        st.request_timeout,
        infer_inner(st, caller, rid, body, endpoint, mode, &mut audit),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "server_error",
            format!(
                "The request timed out: no answer within {} s.",
                st.request_timeout.as_secs()
            ),
        )
        .code("timeout")),
    };
    match out {
        Ok((reply, headers, mut finish)) => {
            let model = audit.entry.model.clone();
            let upstream = audit.entry.upstream.clone();
            let reply = match reply {
                Reply::Stream(items) => {
                    crate::observe::learn_model(&model);
                    Reply::Stream(account(items, audit, finish))
                }
                complete => {
                    if let Reply::Complete { status, usage, .. } = &complete {
                        if *status < 400 {
                            crate::observe::learn_model(&model);
                        }
                        crate::observe::first_byte(&audit.entry.endpoint, audit.started.elapsed());
                        audit.succeed(*status);
                        audit.entry.prompt_tokens = usage.prompt;
                        audit.entry.completion_tokens = usage.completion;
                        finish.settle(*usage);
                    }
                    // Fail-closed mode: the answer waits for its row.
                    audit.commit_if_sync().await?;
                    complete
                }
            };
            Ok(Answer {
                reply,
                headers,
                model,
                upstream,
            })
        }
        Err(e) => {
            audit.fail(&e);
            Err(e)
        }
    }
}

/// Rate-limit one request: with a shared store, one atomic decision there (the in-process
/// limiter only hands out its permit and headers, unlimited); while the store is unreachable,
/// the in-process limiter at limit ÷ live replicas, or 503 when fail-closed. Without one, the
/// in-process limiter.
async fn admit(
    st: &Shared,
    subject: &str,
    limits: &Limits,
    estimate: u32,
) -> Result<(Option<crate::limits::shared::Ticket>, Admission), ApiError> {
    use crate::limits::shared::{Shared as Decided, Unreachable, divided};
    let Some(sh) = st.shared_limits.as_ref().filter(|_| !limits.is_unlimited()) else {
        return Ok((None, st.limits.admit(subject, limits, estimate)));
    };
    match sh.admit(subject, limits, estimate).await {
        Decided::Allowed { ticket, headers } => {
            let admission = match st.limits.admit(subject, &Limits::default(), estimate) {
                Admission::Allowed { permit, .. } => Admission::Allowed { permit, headers },
                limited => limited,
            };
            Ok((Some(ticket), admission))
        }
        Decided::Limited {
            which,
            retry_after,
            headers,
        } => Ok((
            None,
            Admission::Limited {
                retry_after,
                which,
                headers,
            },
        )),
        Decided::Unreachable => match sh.when_unreachable {
            Unreachable::Local => Ok((
                None,
                st.limits
                    .admit(subject, &divided(limits, sh.replicas()), estimate),
            )),
            Unreachable::Closed => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "The rate-limit store is unreachable and this gateway is configured to fail \
                 closed; try again shortly."
                    .to_string(),
            )
            .code("limit_store_unavailable")),
        },
    }
}

/// What to settle when the answer is complete: the token count against the estimate, and the
/// concurrency permit (held until then).
struct Finish {
    st: Shared,
    subject: String,
    limits: Limits,
    /// Tokens reserved at admission (prompt estimate + generation bound).
    estimate: u32,
    prompt_estimate: u32,
    /// Admitted by the shared (PostgreSQL) limiter: the usage is settled there.
    shared: bool,
    /// The shared limiter's concurrency slot, freed on drop.
    _ticket: Option<crate::limits::shared::Ticket>,
    _permit: crate::limits::ratelimit::Permit,
    settled: bool,
    /// Payloads relayed so far (a stream cut short is charged about one token each).
    relayed: u32,
}

impl Finish {
    fn settle(&mut self, u: Usage) {
        self.settled = true;
        if self.shared
            && let Some(sh) = &self.st.shared_limits
        {
            sh.reconcile(
                &self.subject,
                &self.limits,
                self.estimate,
                u.prompt.saturating_add(u.completion),
            );
            return;
        }
        self.st.limits.reconcile(
            &self.subject,
            &self.limits,
            self.estimate,
            u.prompt.saturating_add(u.completion),
        );
    }
}

impl Drop for Finish {
    /// A caller that leaves before the usage arrives still pays for what it got: the prompt
    /// estimate plus about a token per relayed payload.
    fn drop(&mut self) {
        if !self.settled {
            let u = Usage {
                prompt: self.prompt_estimate,
                completion: self.relayed,
            };
            self.settle(u);
        }
    }
}

/// The audit row and the permit live as long as the stream; the row gets the usage (or the error)
/// at the end.
fn account(items: ItemStream, audit: AuditGuard, finish: Finish) -> RelayStream {
    let mut audit = audit;
    audit.entry.streamed = true;
    // Until the stream ends one way or the other, a drop means the caller left mid-stream.
    audit.entry.status = CLIENT_CLOSED;
    audit.entry.error_code = "client_closed_request".into();
    let state = (audit, finish, Usage::default());
    Box::pin(futures::stream::unfold(
        (items, Some(state)),
        |(mut items, state)| async move {
            let (mut audit, mut finish, mut usage) = state?;
            match items.next().await {
                Some(Ok(StreamItem::Usage(u))) => {
                    usage = u;
                    Some((
                        Ok(StreamItem::Usage(u)),
                        (items, Some((audit, finish, usage))),
                    ))
                }
                Some(Ok(StreamItem::Comment(c))) => Some((
                    Ok(StreamItem::Comment(c)),
                    (items, Some((audit, finish, usage))),
                )),
                Some(Ok(d)) => {
                    if finish.relayed == 0 {
                        crate::observe::first_byte(&audit.entry.endpoint, audit.started.elapsed());
                    }
                    finish.relayed = finish.relayed.saturating_add(1);
                    Some((Ok(d), (items, Some((audit, finish, usage)))))
                }
                Some(Err(e)) => {
                    crate::observe::upstream_error(
                        audit.upstream_kind,
                        crate::observe::upstream_error_class(e.status.as_u16(), e.code),
                    );
                    audit.fail(&e);
                    audit.entry.prompt_tokens = usage.prompt;
                    audit.entry.completion_tokens = usage.completion;
                    if usage != Usage::default() {
                        finish.settle(usage);
                    }
                    Some((Err(e), (items, None)))
                }
                None => {
                    audit.succeed(200);
                    audit.entry.prompt_tokens = usage.prompt;
                    audit.entry.completion_tokens = usage.completion;
                    finish.settle(usage);
                    // Fail-closed mode: the stream ends cleanly only once its row is committed.
                    match audit.commit_if_sync().await {
                        Ok(()) => None,
                        Err(e) => Some((Err(e), (items, None))),
                    }
                }
            }
        },
    ))
}

type Inner = (Reply, Vec<(&'static str, String)>, Finish);

async fn infer_inner(
    st: &Shared,
    caller: &Caller,
    rid: &str,
    body: Result<Bytes, ApiError>,
    endpoint: Endpoint,
    mode: Mode,
    audit: &mut AuditGuard,
) -> Result<Inner, ApiError> {
    // Parse.
    let body = body?;
    let mut v: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => {
            return Err(ApiError::bad_request(
                "The request body must be a JSON object.",
            ));
        }
        Err(e) => {
            return Err(ApiError::bad_request(format!(
                "We could not parse the JSON body of your request: {e}"
            )));
        }
    };
    let model = match v.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(Value::String(_)) | None => {
            return Err(ApiError::bad_request("you must provide a model parameter").param("model"));
        }
        Some(_) => {
            return Err(ApiError::bad_request("`model` must be a string").param("model"));
        }
    };
    audit.entry.model = model.clone();
    audit.span.record(
        "gen_ai.request.model",
        securellm_common::telemetry::clip_attr(&model, 256),
    );
    // Authorize: a model outside the key's scopes is answered like an unknown one (as OpenAI does).
    if !caller.key.allows(&model) {
        return Err(ApiError::model_not_found(&model));
    }
    let stream = endpoint != Endpoint::Embeddings
        && match mode {
            Mode::FromBody => match v.get("stream") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(ApiError::bad_request("`stream` must be a boolean").param("stream"));
                }
            },
            Mode::Complete => false,
            Mode::Stream => true,
        };
    let relay_usage = v
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    // Route: a cloud upstream if one serves the model, else the local backend manager (a pure
    // lookup; nothing is sent yet).
    let upstream = {
        let _route = crate::req_span!("route").entered();
        st.upstreams.route(&model)
    };
    let reach = upstream.reach();
    if matches!(reach, Reach::Remote(_)) {
        audit.upstream_kind = "cloud";
    }
    audit.span.record("securellm.upstream", upstream.name());
    // Validate: the OpenAI schema, and the `max_tokens` cap (filled in for local models).
    let cap = crate::validate::cap(st.max_tokens_cap, caller.key.max_tokens);
    let remote = matches!(reach, Reach::Remote(_));
    let checked = crate::validate::check(endpoint, &mut v, &model, remote, cap)?;
    // Rate-limit: the state belongs to the key (its id), never to its free-text name or subject.
    // The token reservation covers the generation bound; the real usage is settled at the end.
    let limits = Limits {
        rpm: caller.key.rpm,
        tpm: caller.key.tpm,
        concurrent: caller.key.concurrent,
    };
    let prompt_estimate = estimate_prompt_tokens(&v);
    let estimate = checked.reservation(prompt_estimate, limits.tpm);
    let (ticket, admission) = {
        let span = crate::req_span!("rate_limit");
        admit(st, &caller.key.id, &limits, estimate)
            .instrument(span)
            .await?
    };
    let (permit, mut rl_headers) = match admission {
        Admission::Allowed { permit, headers } => (permit, headers),
        Admission::Limited {
            retry_after,
            which,
            headers,
        } => {
            crate::observe::rate_limited(match which {
                crate::limits::ratelimit::LimitKind::Rpm => "requests",
                crate::limits::ratelimit::LimitKind::Tpm => "tokens",
                crate::limits::ratelimit::LimitKind::Concurrency => "concurrency",
            });
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                format!(
                    "Rate limit reached for {} ({which:?}). Please try again in {}s.",
                    caller.key.subject,
                    retry_after.as_secs().max(1)
                ),
            )
            .code("rate_limit_exceeded");
            // The limiter's headers carry retry-after, retry-after-ms and x-ratelimit-*.
            e.headers.extend(headers);
            return Err(e);
        }
    };
    let finish = Finish {
        st: st.clone(),
        subject: caller.key.id.clone(),
        limits,
        estimate,
        prompt_estimate,
        shared: ticket.is_some(),
        _ticket: ticket,
        _permit: permit,
        settled: false,
        relayed: 0,
    };
    if upstream.name() != audit.entry.upstream {
        audit.entry.upstream = upstream.name().to_string();
    }
    // Redact: every string leaving the machine (the body's, and the request id it is sent with)
    // passes the upstream's policy first.
    let redacted_rid;
    let upstream_rid = match reach {
        Reach::Local => rid,
        Reach::Remote(policy) => {
            let mut r = rid.to_string();
            let _redact = crate::req_span!("redact").entered();
            match st.redactor.apply_to_upstream(&mut v, &mut r, policy) {
                Ok(n) => {
                    crate::observe::redactions(
                        if policy == crate::redact::Policy::Allow {
                            "counted"
                        } else {
                            "redacted"
                        },
                        n,
                    );
                    audit.entry.redactions = u32::try_from(n).unwrap_or(u32::MAX)
                }
                Err(blocked) => {
                    crate::observe::redactions("blocked", blocked.kinds.len());
                    return Err(ApiError::bad_request(format!(
                        "The request was blocked: it contains secrets ({}) and upstream {} does not accept them.",
                        blocked.kinds.join(", "),
                        upstream.name()
                    ))
                    .code("secret_detected"));
                }
            }
            redacted_rid = r;
            &redacted_rid
        }
    };
    upstream.prepare(endpoint, &mut v, stream);
    // Forward: the validated body, re-serialised, so that no parser difference (duplicate
    // keys...) reaches the engine.
    let request = UpstreamRequest {
        endpoint,
        model: &model,
        body: Bytes::from(serde_json::to_vec(&v).unwrap_or_default()),
        request_id: upstream_rid,
        caller: &caller.key.subject,
        priority: caller.key.priority,
        deadline_ms: now_ms() + st.request_timeout.as_millis() as u64,
        timeout: st.request_timeout,
        relay_usage,
    };
    let upstream_kind = audit.upstream_kind;
    let call = crate::req_span!(
        "upstream",
        otel.kind = "client",
        securellm.upstream = upstream.name(),
        http.response.status_code = tracing::field::Empty,
    );
    let failed = |e: ApiError| {
        crate::observe::upstream_error(
            upstream_kind,
            crate::observe::upstream_error_class(e.status.as_u16(), e.code),
        );
        e
    };
    let reply = if !stream {
        let a = upstream
            .complete(request)
            .instrument(call.clone())
            .await
            .map_err(failed)?;
        Reply::Complete {
            status: a.status,
            body: a.body,
            usage: a.usage,
        }
    } else {
        match upstream
            .stream(request)
            .instrument(call.clone())
            .await
            .map_err(failed)?
        {
            StreamAnswer::Refused {
                status,
                body,
                usage,
            } => Reply::Complete {
                status,
                body,
                usage,
            },
            StreamAnswer::Streaming(items) => Reply::Stream(items),
            StreamAnswer::Waiting {
                items,
                queue_position,
            } => {
                if let Some(p) = queue_position {
                    rl_headers.push(("x-securellm-queue-position", p.to_string()));
                }
                Reply::Stream(items)
            }
        }
    };
    if let Reply::Complete { status, .. } = &reply {
        call.record("http.response.status_code", *status);
        if *status >= 400 {
            crate::observe::upstream_error(
                upstream_kind,
                crate::observe::upstream_error_class(*status, None),
            );
        }
    }
    Ok((reply, rl_headers, finish))
}

#[cfg(test)]
mod tests;
