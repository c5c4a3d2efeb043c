//! The HTTP application: the request path as one visible stack, then the handlers.
//!
//! ```text
//! trace → body size limit → body deadline → timeout → authenticate → in-flight caps → authorize
//!   → rate-limit → redact → audit → route → forward
//! ```
//! `trace`, `body size limit`, `body deadline`, `timeout`, `authenticate` and the in-flight caps
//! are tower layers (see [`router`]): a request is authenticated and admitted on its headers,
//! before any of its body is read;
//! authorize, rate-limit, redact and audit need the parsed body (the model, the prompt), so they are
//! steps of [`crate::pipeline::infer`] (shared with the gRPC API), each a call into its own module
//! (`auth`, `limits`, `redact`, `audit`). This file only turns HTTP into pipeline calls and
//! answers back into HTTP (SSE for streams).

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use securellm_common::telemetry;
use tower_http::timeout::TimeoutLayer;
use tracing::Instrument;

pub mod admin;
pub mod ui;

use crate::error::ApiError;
use crate::listener::BodyTimedOut;
use crate::pipeline::{self, Mode, Reply};
use crate::upstream::{Endpoint, StreamItem};

pub use crate::state::{AppState, Shared};

pub use crate::pipeline::Caller;

/// The router with the whole stack. `body_read_timeout` bounds the time to read a whole request
/// body, counted from the arrival of the request head (not the gaps between its bytes). The
/// management API (`/admin/v1/…`, [`admin`]) authenticates each call itself (admin token, not an
/// API key) through `management`, the one implementation it shares with the gRPC admin service.
pub fn router(
    state: Shared,
    management: crate::management::Management,
    max_body: usize,
    body_read_timeout: Duration,
) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate));
    let router = Router::new()
        .merge(api)
        .nest("/admin/v1", admin::router(management))
        .merge(ui::router())
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
        .layer(middleware::from_fn_with_state(
            body_read_timeout,
            body_deadline,
        ));
    // The request span layer exists only when spans are exported (decided once, at start): with
    // export off a request pays nothing for it, not even the middleware's boxing.
    let router = if securellm_common::telemetry::enabled() {
        router.layer(middleware::from_fn(trace))
    } else {
        router
    };
    router.with_state(state)
}

fn client_addr(req: &Request) -> String {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_default()
}

fn request_id(headers: &HeaderMap) -> String {
    pipeline::request_id(headers.get("x-request-id").and_then(|v| v.to_str().ok()))
}

/// Authenticate: `Authorization: Bearer <api key or JWT>` (see [`pipeline::authenticate`]), then
/// take a place among the requests in progress of the key and of the address (429 at once when
/// either is full), all on the headers, before any of the body is read. The place is held until
/// the response body has ended.
async fn authenticate(State(st): State<Shared>, mut req: Request, next: Next) -> Response {
    let client = client_addr(&req);
    let rid = request_id(req.headers());
    let authz = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let path = req.uri().path().to_string();
    let trace_id = telemetry::trace_id(Some(req.headers()));
    match pipeline::authenticate(&st, &client, &rid, &path, authz, trace_id) {
        Ok(caller) => {
            let slot = match crate::limits::inflight::admit(&st, &caller, &rid, &path) {
                Ok(slot) => slot,
                Err(e) => return e.into_response(),
            };
            req.extensions_mut().insert(caller);
            next.run(req)
                .await
                .map(|b| Body::new(crate::listener::Guarded::new(b, slot)))
        }
        Err(e) => e.into_response(),
    }
}

/// The route a path is served by, as the span's `http.route` (a closed set, never the raw path).
pub fn route_of(path: &str) -> &'static str {
    match path {
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/completions" => "/v1/completions",
        "/v1/embeddings" => "/v1/embeddings",
        "/v1/models" => "/v1/models",
        "/health" => "/health",
        "/ready" => "/ready",
        p if p.starts_with("/admin/v1/") => "/admin/v1",
        p if p == "/ui" || p.starts_with("/ui/") => "/ui",
        _ => "other",
    }
}

/// Trace: while traces are exported, each request runs in a server span (HTTP semantic
/// conventions) that continues the caller's `traceparent` and stays open until the response body
/// has ended (a stream's last event); the pipeline's steps are its children. With export off this
/// is one branch.
async fn trace(req: Request, next: Next) -> Response {
    if !telemetry::enabled() {
        return next.run(req).await;
    }
    let route = route_of(req.uri().path());
    let span = crate::request_span!(
        "server",
        format_args!("{} {route}", req.method()),
        http.request.method = %req.method(),
        http.route = route,
        url.scheme = "http",
    );
    telemetry::continue_trace(&span, req.headers());
    let r = next.run(req).instrument(span.clone()).await;
    span.record("http.response.status_code", r.status().as_u16());
    r.map(|b| Body::new(crate::listener::InSpan::new(b, span)))
}

/// Gives the request body a deadline: `total` from now (the request head has arrived).
async fn body_deadline(State(total): State<Duration>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let body = Body::new(crate::listener::DeadlineBody::new(body, total, None));
    next.run(Request::from_parts(parts, body)).await
}

/// Ready when the registry and the backend manager both answer (within 2 s each); the error
/// names what is unreachable. Cloud upstreams are not probed (that would spend their quota).
async fn ready(State(st): State<Shared>) -> Response {
    match st.upstreams.local.ready().await {
        Ok(()) => axum::Json(serde_json::json!({"status": "ready"})).into_response(),
        Err(down) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            format!("not ready: {} unreachable", down.join(" and ")),
        )
        .into_response(),
    }
}

async fn models(
    State(st): State<Shared>,
    axum::Extension(caller): axum::Extension<Caller>,
    headers: HeaderMap,
) -> Response {
    match pipeline::list_models(&st, &caller, &request_id(&headers), "/v1/models").await {
        Ok(ms) => axum::Json(pipeline::models_body(&ms)).into_response(),
        Err(e) => e.into_response(),
    }
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

fn with_headers(mut r: Response, headers: &[(&'static str, String)]) -> Response {
    for (k, v) in headers {
        if let Ok(v) = HeaderValue::from_str(v) {
            r.headers_mut().insert(*k, v);
        }
    }
    r
}

/// A body the transport could not read, as the error the pipeline audits.
fn body_error(r: BytesRejection) -> ApiError {
    let mut source: Option<&dyn std::error::Error> = Some(&r);
    while let Some(e) = source {
        if e.is::<BodyTimedOut>() {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                "The request body did not arrive in time.",
            )
            .code("request_timeout");
        }
        source = e.source();
    }
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "The request body is too large.",
        )
        .code("request_too_large")
    } else {
        ApiError::bad_request(format!("could not read the request body: {r}"))
    }
}

async fn infer(
    State(st): State<Shared>,
    axum::Extension(caller): axum::Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
) -> Response {
    let rid = request_id(&headers);
    let answer = match pipeline::infer(
        &st,
        &caller,
        &rid,
        endpoint.path(),
        body.map_err(body_error),
        endpoint,
        Mode::FromBody,
    )
    .await
    {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    let mut r = match answer.reply {
        Reply::Complete { status, body, .. } => {
            let mut r = Response::new(Body::from(body));
            *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        Reply::Stream(items) => {
            // Each payload as one SSE event, as it arrives; `[DONE]` after a clean end; an error
            // after the start as an OpenAI error event. Dropping the body (client gone) drops the
            // upstream call, which cancels the request.
            let sse = futures::stream::unfold(Some(items), |items| async move {
                let mut items = items?;
                loop {
                    match items.next().await {
                        Some(Ok(StreamItem::Usage(_))) => continue,
                        Some(Ok(StreamItem::Comment(c))) => {
                            let frame = format!(": {}\n\n", c.replace(['\r', '\n'], " "));
                            return Some((Ok(Bytes::from(frame)), Some(items)));
                        }
                        Some(Ok(StreamItem::Data(d))) => {
                            let mut frame = Vec::with_capacity(d.len() + 8);
                            frame.extend_from_slice(b"data: ");
                            frame.extend_from_slice(&d);
                            frame.extend_from_slice(b"\n\n");
                            return Some((Ok::<Bytes, std::io::Error>(frame.into()), Some(items)));
                        }
                        Some(Err(e)) => {
                            let frame = format!("data: {}\n\n", e.body());
                            return Some((Ok(Bytes::from(frame)), None));
                        }
                        None => return Some((Ok(Bytes::from_static(b"data: [DONE]\n\n")), None)),
                    }
                }
            });
            let mut r = Response::new(Body::from_stream(sse));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            r
        }
    };
    if let Ok(v) = HeaderValue::from_str(&rid) {
        r.headers_mut().insert("x-request-id", v);
    }
    with_headers(r, &answer.headers)
}
