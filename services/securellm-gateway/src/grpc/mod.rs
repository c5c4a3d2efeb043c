//! The `securellm.v1.Gateway` gRPC service: the OpenAI API for gRPC clients. Bodies are the same
//! OpenAI JSON the HTTP API takes and answers; every call goes through the same
//! [`crate::pipeline`] as HTTP (authenticate → authorize → rate-limit → redact → audit → route →
//! forward), so the two transports cannot drift apart. Errors are gRPC statuses carrying the HTTP
//! status and the exact OpenAI error body in trailers (see `proto/securellm/v1/gateway.proto`).

pub mod admin;

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use axum::http::StatusCode;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use securellm_proto::v1 as pb;
use securellm_proto::v1::gateway_server::{Gateway, GatewayServer};
use tonic::metadata::{BinaryMetadataValue, MetadataMap, MetadataValue};
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;

use crate::error::ApiError;
use crate::pipeline::{self, Caller, Mode, Reply};
use crate::state::Shared;
use crate::upstream::{Endpoint, StreamItem, Usage};

pub struct GatewayService {
    state: Shared,
    max_body: usize,
}

impl GatewayService {
    /// The service; messages up to twice `max_body` are decoded so that an over-limit body gets
    /// the gateway's own (audited) 413 answer rather than a transport error.
    pub fn new(state: Shared, max_body: usize) -> AuthFirst<GatewayServer<Self>> {
        AuthFirst {
            inner: GatewayServer::new(Self {
                state: state.clone(),
                max_body,
            })
            .max_decoding_message_size(max_body.saturating_mul(2).saturating_add(64 << 10)),
            state,
        }
    }
}

/// Authenticates a call from its headers before its message is read or decoded, so a caller
/// without a valid credential cannot make the gateway buffer request bodies. A refusal is answered
/// (and audited, and counted against the address) exactly as the handler would have. An accepted
/// call then takes a place among the requests in progress of its key and address (429 /
/// `RESOURCE_EXHAUSTED` at once when either is full, held until the response ends), and its
/// message must arrive within `body_read_timeout_ms` of its headers (408 / `DEADLINE_EXCEEDED`,
/// audited); then it goes on to the handler, which runs the whole pipeline.
#[derive(Clone)]
pub struct AuthFirst<S> {
    inner: S,
    state: Shared,
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for AuthFirst<S> {
    const NAME: &'static str = S::NAME;
}

type HttpReq = axum::http::Request<tonic::body::Body>;
type HttpResp = axum::http::Response<tonic::body::Body>;

impl<S> tower::Service<HttpReq> for AuthFirst<S>
where
    S: tower::Service<HttpReq, Response = HttpResp, Error = std::convert::Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = HttpResp;
    type Error = std::convert::Infallible;
    type Future = Pin<
        Box<dyn std::future::Future<Output = Result<HttpResp, std::convert::Infallible>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: HttpReq) -> Self::Future {
        // The request span: a child of the `grpc.server` span of `GrpcTraceLayer` (which
        // continued the caller's trace), open until the response body ends.
        let span = crate::request_span!(
            "internal",
            req.uri().path().trim_start_matches('/'),
            rpc.system = "grpc",
        );
        let _enter = span.enter();
        let trace_id = securellm_common::telemetry::trace_id(Some(req.headers()));
        let header = |k: &str| req.headers().get(k).and_then(|v| v.to_str().ok());
        let rid = pipeline::request_id(header("x-request-id"));
        let client = req
            .extensions()
            .get::<tonic::transport::server::TcpConnectInfo>()
            .and_then(|i| i.remote_addr)
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        let label = format!("grpc:{}", req.uri().path());
        match pipeline::authenticate(
            &self.state,
            &client,
            &rid,
            &label,
            header("authorization"),
            trace_id,
        ) {
            Err(e) => {
                let mut st = status_of(&e);
                if let Ok(v) = MetadataValue::try_from(rid.as_str()) {
                    st.metadata_mut().insert("x-request-id", v);
                }
                Box::pin(async move { Ok(st.into_http()) })
            }
            Ok(caller) => {
                let slot = match crate::limits::inflight::admit(&self.state, &caller, &rid, &label)
                {
                    Ok(slot) => slot,
                    Err(e) => {
                        let mut st = status_of(&e);
                        if let Ok(v) = MetadataValue::try_from(rid.as_str()) {
                            st.metadata_mut().insert("x-request-id", v);
                        }
                        return Box::pin(async move { Ok(st.into_http()) });
                    }
                };
                // A message that does not arrive in time: the call fails with the 408 status
                // (tonic answers the body's error) and is audited here, as the handler never runs.
                let (audit, entry) = (
                    self.state.audit.clone(),
                    crate::audit::AuditEntry {
                        time_ms: securellm_common::time::now_ms(),
                        request_id: rid.clone(),
                        subject: caller.key.subject.clone(),
                        key_id: caller.key.id.clone(),
                        client_addr: caller.client.clone(),
                        endpoint: label.clone(),
                        status: 408,
                        error_code: "request_timeout".into(),
                        trace_id: caller.trace_id.clone(),
                        ..Default::default()
                    },
                );
                let on_timeout = Box::new(move || {
                    crate::observe::request(&entry);
                    audit.append_nowait(entry);
                    let e = ApiError::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "invalid_request_error",
                        "The request body did not arrive in time.",
                    )
                    .code("request_timeout");
                    Box::new(status_of(&e)) as Box<dyn std::error::Error + Send + Sync>
                });
                let total = self.state.body_read_timeout;
                // The handler takes the caller from here instead of authenticating again.
                let mut req = req.map(|b| {
                    tonic::body::Body::new(crate::listener::DeadlineBody::new(
                        b,
                        total,
                        Some(on_timeout),
                    ))
                });
                req.extensions_mut().insert(caller);
                // The clone that was made ready is the one that serves (tower's rule).
                let clone = self.inner.clone();
                let mut ready = std::mem::replace(&mut self.inner, clone);
                let answer = ready.call(req);
                drop(_enter);
                if span.is_none() {
                    return Box::pin(async move {
                        let r = answer.await?;
                        Ok(r.map(|b| {
                            tonic::body::Body::new(crate::listener::Guarded::new(b, slot))
                        }))
                    });
                }
                Box::pin(
                    async move {
                        let r = answer.await?;
                        let span = tracing::Span::current();
                        Ok(r.map(|b| {
                            tonic::body::Body::new(crate::listener::InSpan::new(
                                crate::listener::Guarded::new(b, slot),
                                span,
                            ))
                        }))
                    }
                    .instrument(span.clone()),
                )
            }
        }
    }
}

/// The gRPC code the proto documents for each HTTP status.
pub fn code_for(status: StatusCode) -> Code {
    securellm_common::errors::code_for_http(status.as_u16())
}

/// An OpenAI error as a gRPC status: message, `x-http-status`, `x-openai-error-bin` and the
/// error's headers (`retry-after`, `x-ratelimit-*`) as trailers.
pub fn status_of(e: &ApiError) -> Status {
    let body = serde_json::to_vec(&e.body()).unwrap_or_default();
    refusal(e.status, &body, &e.message, &e.headers, "")
}

fn refusal(
    status: StatusCode,
    body: &[u8],
    message: &str,
    headers: &[(&'static str, String)],
    request_id: &str,
) -> Status {
    let mut md = MetadataMap::new();
    md.insert("x-http-status", MetadataValue::from(status.as_u16()));
    md.insert_bin("x-openai-error-bin", BinaryMetadataValue::from_bytes(body));
    if let Ok(v) = MetadataValue::try_from(request_id)
        && !request_id.is_empty()
    {
        md.insert("x-request-id", v);
    }
    put_headers(&mut md, headers);
    Status::with_metadata(code_for(status), message, md)
}

fn put_headers(md: &mut MetadataMap, headers: &[(&'static str, String)]) {
    for (k, v) in headers {
        if let Ok(v) = MetadataValue::try_from(v.as_str()) {
            md.insert(*k, v);
        }
    }
}

/// The message of an OpenAI error body, or a generic one.
fn error_message(body: &[u8], status: u16) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| format!("the upstream answered HTTP {status}"))
}

fn usage_pb(u: Usage) -> Option<pb::TokenUsage> {
    (u != Usage::default()).then(|| pb::TokenUsage {
        prompt_tokens: u.prompt,
        completion_tokens: u.completion,
        total_tokens: u.prompt.saturating_add(u.completion),
    })
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::GatewayStreamChunk, Status>> + Send>>;

impl GatewayService {
    fn caller<T>(&self, r: &Request<T>, method: &str) -> Result<(Caller, String, String), Status> {
        let rid = pipeline::request_id(
            r.metadata()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok()),
        );
        let client = r
            .remote_addr()
            .map(|a: SocketAddr| a.ip().to_string())
            .unwrap_or_default();
        let label = format!("grpc:/securellm.v1.Gateway/{method}");
        // Authenticated already by [`AuthFirst`] (which runs before the message is decoded).
        if let Some(caller) = r.extensions().get::<Caller>() {
            return Ok((caller.clone(), rid, label));
        }
        let authz = r
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        // (Not reached through the server, whose `AuthFirst` authenticates every call.)
        let caller = pipeline::authenticate(&self.state, &client, &rid, &label, authz, None)
            .map_err(|e| status_of(&e))?;
        Ok((caller, rid, label))
    }

    async fn run(
        &self,
        r: Request<pb::GatewayInferenceRequest>,
        method: &str,
        endpoint: Endpoint,
        mode: Mode,
    ) -> Result<(pipeline::Answer, String), Status> {
        let (caller, rid, label) = self.caller(&r, method)?;
        let body = r.into_inner().body_json;
        let body = if body.len() > self.max_body {
            Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!(
                    "The request body is too large ({} bytes; the limit is {}).",
                    body.len(),
                    self.max_body
                ),
            )
            .code("request_too_large"))
        } else {
            Ok(Bytes::from(body))
        };
        // The whole request (a model load included) until the answer starts, as over HTTP.
        let limit = self.state.request_timeout + Duration::from_secs(5);
        let answer = tokio::time::timeout(
            limit,
            pipeline::infer(&self.state, &caller, &rid, &label, body, endpoint, mode),
        )
        .await
        .map_err(|_| {
            status_of(&ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "server_error",
                "the request timed out",
            ))
        })?
        .map_err(|e| {
            let mut s = status_of(&e);
            if let Ok(v) = MetadataValue::try_from(rid.as_str()) {
                s.metadata_mut().insert("x-request-id", v);
            }
            s
        })?;
        Ok((answer, rid))
    }

    async fn complete(
        &self,
        r: Request<pb::GatewayInferenceRequest>,
        method: &str,
        endpoint: Endpoint,
    ) -> Result<Response<pb::GatewayInferenceResponse>, Status> {
        let (a, rid) = self.run(r, method, endpoint, Mode::Complete).await?;
        let Reply::Complete {
            status,
            body,
            usage,
        } = a.reply
        else {
            return Err(Status::internal("a stream answered a non-streaming call"));
        };
        if status >= 400 {
            let st = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            return Err(refusal(
                st,
                &body,
                &error_message(&body, status),
                &a.headers,
                &rid,
            ));
        }
        let mut resp = Response::new(pb::GatewayInferenceResponse {
            body_json: body.to_vec(),
            usage: usage_pb(usage),
            request_id: rid.clone(),
            model: a.model,
            upstream: a.upstream,
        });
        put_headers(resp.metadata_mut(), &a.headers);
        if let Ok(v) = MetadataValue::try_from(rid.as_str()) {
            resp.metadata_mut().insert("x-request-id", v);
        }
        Ok(resp)
    }

    async fn stream(
        &self,
        r: Request<pb::GatewayInferenceRequest>,
        method: &str,
        endpoint: Endpoint,
    ) -> Result<Response<ChunkStream>, Status> {
        let (a, rid) = self.run(r, method, endpoint, Mode::Stream).await?;
        let items = match a.reply {
            Reply::Stream(items) => items,
            Reply::Complete { status, body, .. } => {
                // Refused before the stream started.
                let st = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
                return Err(refusal(
                    st,
                    &body,
                    &error_message(&body, status),
                    &a.headers,
                    &rid,
                ));
            }
        };
        // A usage item comes just before the payload that carried it (if that payload is relayed):
        // it rides on that message; if never relayed, it ends the stream as a usage-only message.
        let first_rid = rid.clone();
        let chunks = futures::stream::unfold(
            (Some(items), None::<Usage>, Some(first_rid)),
            |(items, mut pending, mut rid)| async move {
                let mut items = items?;
                loop {
                    match items.next().await {
                        Some(Ok(StreamItem::Usage(u))) => pending = Some(u),
                        // gRPC callers get no progress comments (the proto has no place for them).
                        Some(Ok(StreamItem::Comment(_))) => {}
                        Some(Ok(StreamItem::Data(d))) => {
                            let chunk = pb::GatewayStreamChunk {
                                data_json: d.to_vec(),
                                usage: pending.take().and_then(usage_pb),
                                request_id: rid.take().unwrap_or_default(),
                            };
                            return Some((Ok(chunk), (Some(items), None, rid)));
                        }
                        Some(Err(e)) => return Some((Err(status_of(&e)), (None, None, rid))),
                        None => {
                            let u = pending.take()?;
                            let chunk = pb::GatewayStreamChunk {
                                data_json: Vec::new(),
                                usage: usage_pb(u).or(Some(pb::TokenUsage::default())),
                                request_id: rid.take().unwrap_or_default(),
                            };
                            return Some((Ok(chunk), (None, None, rid)));
                        }
                    }
                }
            },
        );
        let mut resp = Response::new(Box::pin(chunks) as ChunkStream);
        put_headers(resp.metadata_mut(), &a.headers);
        if let Ok(v) = MetadataValue::try_from(rid.as_str()) {
            resp.metadata_mut().insert("x-request-id", v);
        }
        Ok(resp)
    }
}

#[tonic::async_trait]
impl Gateway for GatewayService {
    async fn chat_completions(
        &self,
        request: Request<pb::GatewayInferenceRequest>,
    ) -> Result<Response<pb::GatewayInferenceResponse>, Status> {
        self.complete(request, "ChatCompletions", Endpoint::Chat)
            .await
    }

    type ChatCompletionsStreamStream = ChunkStream;

    async fn chat_completions_stream(
        &self,
        request: Request<pb::GatewayInferenceRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        self.stream(request, "ChatCompletionsStream", Endpoint::Chat)
            .await
    }

    async fn completions(
        &self,
        request: Request<pb::GatewayInferenceRequest>,
    ) -> Result<Response<pb::GatewayInferenceResponse>, Status> {
        self.complete(request, "Completions", Endpoint::Completions)
            .await
    }

    type CompletionsStreamStream = ChunkStream;

    async fn completions_stream(
        &self,
        request: Request<pb::GatewayInferenceRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        self.stream(request, "CompletionsStream", Endpoint::Completions)
            .await
    }

    async fn embeddings(
        &self,
        request: Request<pb::GatewayInferenceRequest>,
    ) -> Result<Response<pb::GatewayInferenceResponse>, Status> {
        self.complete(request, "Embeddings", Endpoint::Embeddings)
            .await
    }

    async fn list_models(
        &self,
        request: Request<pb::GatewayListModelsRequest>,
    ) -> Result<Response<pb::GatewayListModelsResponse>, Status> {
        let (caller, rid, label) = self.caller(&request, "ListModels")?;
        let models = pipeline::list_models(&self.state, &caller, &rid, &label)
            .await
            .map_err(|e| status_of(&e))?;
        let body = serde_json::to_vec(&pipeline::models_body(&models)).unwrap_or_default();
        Ok(Response::new(pb::GatewayListModelsResponse {
            body_json: body,
            models: models
                .into_iter()
                .map(|m| pb::GatewayModel {
                    id: m.id,
                    owned_by: m.owned_by,
                    created: m.created,
                    upstream: m.upstream,
                    registry_id: m.registry_id,
                })
                .collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_as_the_proto_documents() {
        for (http, code) in [
            (400, Code::InvalidArgument),
            (401, Code::Unauthenticated),
            (403, Code::PermissionDenied),
            (404, Code::NotFound),
            (413, Code::ResourceExhausted),
            (429, Code::ResourceExhausted),
            (500, Code::Internal),
            (502, Code::Unavailable),
            (503, Code::Unavailable),
            (504, Code::DeadlineExceeded),
        ] {
            assert_eq!(
                code_for(StatusCode::from_u16(http).unwrap()),
                code,
                "{http}"
            );
        }
    }

    #[test]
    fn an_error_carries_its_http_status_body_and_headers_as_trailers() {
        let e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "slow down",
        )
        .code("rate_limit_exceeded")
        .header("retry-after", "7");
        let s = status_of(&e);
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(s.message(), "slow down");
        assert_eq!(s.metadata().get("x-http-status").unwrap(), "429");
        assert_eq!(s.metadata().get("retry-after").unwrap(), "7");
        let body = s
            .metadata()
            .get_bin("x-openai-error-bin")
            .unwrap()
            .to_bytes()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        assert_eq!(v["error"]["type"], "rate_limit_error");
    }
}
