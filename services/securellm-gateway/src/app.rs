//! The HTTP application: the request path as one visible stack, then the handlers.
//!
//! ```text
//! trace → body size limit → timeout → authenticate → authorize → rate-limit → redact → audit → route → forward
//! ```
//! `trace`, `body size limit`, `timeout` and `authenticate` are tower layers (see [`router`]);
//! authorize, rate-limit, redact and audit need the parsed body (the model, the prompt), so they are
//! steps of [`infer`], each a call into its own module (`keys`, `ratelimit`, `redact`, `audit`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use securellm_common::time::now_ms;
use securellm_proto::v1::model_registry_client::ModelRegistryClient;
use serde_json::Value;
use tonic::transport::Channel;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::audit::{AuditEntry, AuditLog};
use crate::error::ApiError;
use crate::keys::{KeyRecord, KeyStore};
use crate::ratelimit::{Admission, Limits, RateLimiter};
use crate::upstream::{Endpoint, Local, StreamAnswer, StreamItem, Usage};

/// Everything the handlers share.
pub struct AppState {
    pub keys: KeyStore,
    /// JWT verification, when configured.
    pub jwt: Option<crate::jwt::JwtVerifier>,
    /// Cloud upstreams (checked before the local backend, by model name).
    pub clouds: Vec<crate::cloud::Cloud>,
    pub redactor: crate::redact::Redactor,
    pub local: Local,
    pub registry: ModelRegistryClient<Channel>,
    pub audit: AuditLog,
    pub limits: RateLimiter,
    pub request_timeout: Duration,
}

pub type Shared = Arc<AppState>;

/// Who is calling (set by the authenticate layer).
#[derive(Clone, Debug)]
pub struct Caller {
    pub key: KeyRecord,
    pub client: String,
}

/// The router with the whole stack.
pub fn router(state: Shared, max_body: usize) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .merge(api)
        .route(
            "/health",
            get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/ready", get(ready))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "unknown endpoint",
            )
        })
        .layer(TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            state.request_timeout + Duration::from_secs(5),
        ))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

fn client_addr(req: &Request) -> String {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_default()
}

fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| format!("req_{}", uuid::Uuid::new_v4().simple()))
}

/// Authenticate: `Authorization: Bearer <api key>`. Failures are audited and rate-limited per
/// client address.
async fn authenticate(State(st): State<Shared>, mut req: Request, next: Next) -> Response {
    let client = client_addr(&req);
    let rid = request_id(req.headers());
    let path = req.uri().path().to_string();
    let deny = |st: &Shared, e: ApiError| {
        st.audit.append_nowait(AuditEntry {
            time_ms: now_ms(),
            request_id: rid.clone(),
            client_addr: client.clone(),
            endpoint: path.clone(),
            status: e.status.as_u16(),
            error_code: e.code.unwrap_or("").to_string(),
            ..AuditEntry::default()
        });
        e.into_response()
    };
    if let Some(wait) = st.limits.auth_blocked(&client) {
        return deny(
            &st,
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "too many failed authentication attempts",
            )
            .code("rate_limit_exceeded")
            .header("retry-after", wait.as_secs().max(1).to_string()),
        );
    }
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .unwrap_or("");
    if token.is_empty() {
        st.limits.auth_failed(&client);
        return deny(
            &st,
            ApiError::unauthorized(
                "You didn't provide an API key. Send it as `Authorization: Bearer sk-...`.",
            ),
        );
    }
    let key = match (&st.jwt, st.keys.lookup(token)) {
        (_, Some(k)) => k,
        (Some(v), None) if crate::jwt::JwtVerifier::looks_like_jwt(token) => {
            match v.verify(token) {
                Ok(k) => k,
                Err(why) => {
                    st.limits.auth_failed(&client);
                    return deny(
                        &st,
                        ApiError::unauthorized(format!("Invalid bearer token: {why}.")),
                    );
                }
            }
        }
        _ => {
            st.limits.auth_failed(&client);
            return deny(&st, ApiError::unauthorized("Incorrect API key provided."));
        }
    };
    if !key.active(now_ms()) {
        st.limits.auth_failed(&client);
        let why = if key.revoked_ms.is_some() {
            "This API key has been revoked."
        } else {
            "This API key has expired."
        };
        return deny(&st, ApiError::unauthorized(why));
    }
    req.extensions_mut().insert(Caller { key, client });
    next.run(req).await
}

async fn ready(State(st): State<Shared>) -> Response {
    let mut reg = st.registry.clone();
    match tokio::time::timeout(
        Duration::from_secs(2),
        reg.list_models(securellm_proto::v1::ListModelsRequest::default()),
    )
    .await
    {
        Ok(Ok(_)) => axum::Json(serde_json::json!({"status": "ready"})).into_response(),
        _ => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the model registry is unreachable",
        )
        .into_response(),
    }
}

async fn models(
    State(st): State<Shared>,
    axum::Extension(caller): axum::Extension<Caller>,
    headers: HeaderMap,
) -> Response {
    let started = Instant::now();
    let mut reg = st.registry.clone();
    let (status, response) = match Local::models(&mut reg).await {
        Ok(ms) => {
            let mut data: Vec<Value> = ms
                .iter()
                .filter(|m| caller.key.allows(&m.name))
                .map(|m| {
                    serde_json::json!({"id": m.name, "object": "model", "created": m.first_seen_ms / 1000, "owned_by": "securellm"})
                })
                .collect();
            for c in &st.clouds {
                for m in c
                    .models
                    .iter()
                    .filter(|m| !m.contains('*') && caller.key.allows(m))
                {
                    data.push(serde_json::json!({"id": m, "object": "model", "created": 0, "owned_by": c.name}));
                }
            }
            (
                200,
                axum::Json(serde_json::json!({"object": "list", "data": data})).into_response(),
            )
        }
        Err(e) => (e.status.as_u16(), e.into_response()),
    };
    st.audit.append_nowait(AuditEntry {
        time_ms: now_ms(),
        request_id: request_id(&headers),
        subject: caller.key.subject.clone(),
        key_id: caller.key.id.clone(),
        client_addr: caller.client.clone(),
        endpoint: "/v1/models".into(),
        upstream: "registry".into(),
        status,
        latency_us: started.elapsed().as_micros() as u64,
        ..AuditEntry::default()
    });
    response
}

async fn chat(
    st: State<Shared>,
    c: axum::Extension<Caller>,
    h: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    infer(st, c, h, b, Endpoint::Chat).await
}

async fn completions(
    st: State<Shared>,
    c: axum::Extension<Caller>,
    h: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    infer(st, c, h, b, Endpoint::Completions).await
}

async fn embeddings(
    st: State<Shared>,
    c: axum::Extension<Caller>,
    h: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    infer(st, c, h, b, Endpoint::Embeddings).await
}

/// One audit row in the making; written on drop, so every exit path (including a client that
/// disconnects mid-stream) leaves exactly one row.
struct AuditGuard {
    st: Shared,
    entry: AuditEntry,
    started: Instant,
}

impl AuditGuard {
    fn fail(&mut self, e: &ApiError) {
        self.entry.status = e.status.as_u16();
        self.entry.error_code = e.code.unwrap_or(e.kind).to_string();
    }
}

impl Drop for AuditGuard {
    fn drop(&mut self) {
        self.entry.latency_us = self.started.elapsed().as_micros() as u64;
        self.st.audit.append_nowait(std::mem::take(&mut self.entry));
    }
}

/// Rough prompt size in tokens (bytes / 4) for the tokens-per-minute limit before the real count.
fn estimate_prompt_tokens(v: &Value) -> u32 {
    let n = ["messages", "prompt", "input"]
        .iter()
        .filter_map(|k| v.get(*k))
        .map(|x| x.to_string().len())
        .sum::<usize>();
    u32::try_from(n / 4).unwrap_or(u32::MAX).max(1)
}

fn with_headers(mut r: Response, headers: &[(&'static str, String)]) -> Response {
    for (k, v) in headers {
        if let Ok(v) = HeaderValue::from_str(v) {
            r.headers_mut().insert(*k, v);
        }
    }
    r
}

async fn infer(
    State(st): State<Shared>,
    axum::Extension(caller): axum::Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
) -> Response {
    let rid = request_id(&headers);
    let mut audit = AuditGuard {
        st: st.clone(),
        entry: AuditEntry {
            time_ms: now_ms(),
            request_id: rid.clone(),
            subject: caller.key.subject.clone(),
            key_id: caller.key.id.clone(),
            client_addr: caller.client.clone(),
            endpoint: endpoint.path().to_string(),
            upstream: "local".into(),
            status: 200,
            ..AuditEntry::default()
        },
        started: Instant::now(),
    };
    let fail = |audit: &mut AuditGuard, e: ApiError| {
        audit.fail(&e);
        e.into_response()
    };
    // Parse.
    let body = match body {
        Ok(b) => b,
        Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return fail(
                &mut audit,
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request_error",
                    "The request body is too large.",
                )
                .code("request_too_large"),
            );
        }
        Err(r) => {
            return fail(
                &mut audit,
                ApiError::bad_request(format!("could not read the request body: {r}")),
            );
        }
    };
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => {
            return fail(
                &mut audit,
                ApiError::bad_request("The request body must be a JSON object."),
            );
        }
        Err(e) => {
            return fail(
                &mut audit,
                ApiError::bad_request(format!(
                    "We could not parse the JSON body of your request: {e}"
                )),
            );
        }
    };
    let Some(model) = v.get("model").and_then(Value::as_str).map(str::to_string) else {
        return fail(
            &mut audit,
            ApiError::bad_request("you must provide a model parameter").param("model"),
        );
    };
    audit.entry.model = model.clone();
    // Authorize.
    if !caller.key.allows(&model) {
        return fail(&mut audit, ApiError::model_not_found(&model));
    }
    let stream = endpoint != Endpoint::Embeddings
        && v.get("stream").and_then(Value::as_bool).unwrap_or(false);
    // Rate-limit.
    let limits = Limits {
        rpm: caller.key.rpm,
        tpm: caller.key.tpm,
        concurrent: caller.key.concurrent,
    };
    let estimate = estimate_prompt_tokens(&v);
    let (permit, rl_headers) = match st.limits.admit(&caller.key.subject, &limits, estimate) {
        Admission::Allowed { permit, headers } => (permit, headers),
        Admission::Limited {
            retry_after,
            which,
            headers,
        } => {
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
            return fail(&mut audit, e);
        }
    };
    // Route: a cloud upstream if one serves the model, else the local backend manager.
    if let Some(cloud) = crate::cloud::route(&st.clouds, &model) {
        audit.entry.upstream = cloud.name.clone();
        // Redact: prompts leaving the machine pass the upstream's policy first.
        let mut v = v;
        match st.redactor.apply_to_request(&mut v, cloud.policy) {
            Ok(n) => audit.entry.redactions = u32::try_from(n).unwrap_or(u32::MAX),
            Err(blocked) => {
                return fail(
                    &mut audit,
                    ApiError::bad_request(format!(
                        "The request was blocked: it contains secrets ({}) and upstream {} does not accept them.",
                        blocked.kinds.join(", "),
                        cloud.name
                    ))
                    .code("secret_detected"),
                );
            }
        }
        let body = Bytes::from(serde_json::to_vec(&v).unwrap_or_default());
        return match cloud
            .call(endpoint, body, &rid, stream, st.request_timeout)
            .await
        {
            Ok(crate::cloud::CloudAnswer::Complete {
                status,
                body,
                usage,
            }) => {
                audit.entry.status = status;
                audit.entry.prompt_tokens = usage.prompt;
                audit.entry.completion_tokens = usage.completion;
                st.limits.reconcile(
                    &caller.key.subject,
                    &limits,
                    estimate,
                    usage.prompt.saturating_add(usage.completion),
                );
                drop(permit);
                let mut r = Response::new(Body::from(body));
                *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                with_headers(r, &rl_headers)
            }
            Ok(crate::cloud::CloudAnswer::Stream { status, body }) => {
                audit.entry.status = status;
                audit.entry.streamed = true;
                // Passed through as it arrives; the guard and permit live as long as the stream.
                let guard = (audit, permit);
                let bytes = body.bytes_stream().map(move |c| {
                    let _ = &guard;
                    c.map_err(std::io::Error::other)
                });
                let mut r = Response::new(Body::from_stream(bytes));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/event-stream"),
                );
                with_headers(r, &rl_headers)
            }
            Err(e) => fail(&mut audit, e),
        };
    }
    // Route and forward.
    let deadline = now_ms() + st.request_timeout.as_millis() as u64;
    let caller_name = caller.key.subject.clone();
    if !stream {
        match st
            .local
            .call(endpoint, &model, body, &rid, &caller_name, deadline)
            .await
        {
            Ok(a) => {
                audit.entry.status = a.status;
                audit.entry.prompt_tokens = a.usage.prompt;
                audit.entry.completion_tokens = a.usage.completion;
                st.limits.reconcile(
                    &caller.key.subject,
                    &limits,
                    estimate,
                    a.usage.prompt.saturating_add(a.usage.completion),
                );
                drop(permit);
                let mut r = Response::new(Body::from(a.body));
                *r.status_mut() = StatusCode::from_u16(a.status).unwrap_or(StatusCode::BAD_GATEWAY);
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                r.headers_mut().insert(
                    "x-request-id",
                    HeaderValue::from_str(&rid).unwrap_or(HeaderValue::from_static("-")),
                );
                with_headers(r, &rl_headers)
            }
            Err(e) => fail(&mut audit, e),
        }
    } else {
        let relay_usage = v
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        match st
            .local
            .stream(
                endpoint,
                &model,
                body,
                &rid,
                &caller_name,
                deadline,
                relay_usage,
            )
            .await
        {
            Ok(StreamAnswer::Refused { status, body }) => {
                audit.entry.status = status;
                let mut r = Response::new(Body::from(body));
                *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                r
            }
            Ok(StreamAnswer::Streaming(items)) => {
                audit.entry.streamed = true;
                let st2 = st.clone();
                let subject = caller.key.subject.clone();
                // The guard and the permit live as long as the stream; dropping the stream (client
                // gone) drops the gRPC call, which cancels the upstream request.
                let state = (
                    audit,
                    permit,
                    Usage::default(),
                    false,
                    st2,
                    subject,
                    limits,
                    estimate,
                );
                let sse = futures::stream::unfold(
                    (items, Some(state)),
                    |(mut items, state)| async move {
                        let mut state = state?;
                        loop {
                            match items.next().await {
                                Some(Ok(StreamItem::Usage(u))) => state.2 = u,
                                Some(Ok(StreamItem::Data(d))) => {
                                    let mut frame = Vec::with_capacity(d.len() + 8);
                                    frame.extend_from_slice(b"data: ");
                                    frame.extend_from_slice(&d);
                                    frame.extend_from_slice(b"\n\n");
                                    return Some((
                                        Ok::<Bytes, std::io::Error>(Bytes::from(frame)),
                                        (items, Some(state)),
                                    ));
                                }
                                Some(Err(e)) => {
                                    state.0.fail(&e);
                                    let frame = format!("data: {}\n\n", e.body());
                                    return Some((Ok(Bytes::from(frame)), (items, None)));
                                }
                                None => {
                                    let (
                                        mut audit,
                                        _permit,
                                        usage,
                                        _,
                                        st2,
                                        subject,
                                        limits,
                                        estimate,
                                    ) = state;
                                    audit.entry.prompt_tokens = usage.prompt;
                                    audit.entry.completion_tokens = usage.completion;
                                    st2.limits.reconcile(
                                        &subject,
                                        &limits,
                                        estimate,
                                        usage.prompt.saturating_add(usage.completion),
                                    );
                                    return Some((
                                        Ok(Bytes::from_static(b"data: [DONE]\n\n")),
                                        (items, None),
                                    ));
                                }
                            }
                        }
                    },
                );
                let mut r = Response::new(Body::from_stream(sse));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/event-stream"),
                );
                r.headers_mut()
                    .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                r.headers_mut().insert(
                    "x-request-id",
                    HeaderValue::from_str(&rid).unwrap_or(HeaderValue::from_static("-")),
                );
                with_headers(r, &rl_headers)
            }
            Err(e) => fail(&mut audit, e),
        }
    }
}
