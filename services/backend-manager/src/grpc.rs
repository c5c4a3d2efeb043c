//! The gRPC edge of the backend manager. [`InstanceError`] and [`ForwardError`] become gRPC
//! statuses here and nowhere else.

use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use securellm_common::errors;
use securellm_common::time::now_ms;
use securellm_proto::v1 as pb;
use securellm_proto::v1::backend_manager_server::{BackendManager, BackendManagerServer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{BroadcastStream, ReceiverStream};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::config::ModelSettings;
use crate::forward::{self, Endpoint, ForwardError, Usage};
use crate::instance::{InstanceError, Ticket};
use crate::manager::Manager;
use crate::metrics;

/// A request without a deadline gets this long (load included).
const DEFAULT_DEADLINE_MS: u64 = 600_000;

#[derive(Clone)]
pub struct BackendService {
    manager: Manager,
}

impl BackendService {
    pub fn new(manager: Manager) -> Self {
        Self { manager }
    }

    pub fn into_server(self) -> BackendManagerServer<Self> {
        BackendManagerServer::new(self)
    }
}

fn status_of(e: InstanceError) -> Status {
    match e {
        InstanceError::Unavailable(m) => Status::unavailable(m),
        // No GPU memory for the model (now or ever): the gateway answers 503
        // `insufficient_gpu_memory` by this reason.
        InstanceError::ResourceExhausted(m) => {
            errors::status(errors::Reason::InsufficientGpuMemory, m)
        }
        InstanceError::DeadlineExceeded(m) => Status::deadline_exceeded(m),
        InstanceError::Aborted(m) => Status::aborted(m),
        InstanceError::InvalidArgument(m) => Status::invalid_argument(m),
        InstanceError::FailedPrecondition(m) => Status::failed_precondition(m),
        InstanceError::NotFound(m) => Status::not_found(m),
        InstanceError::ModelNotFound(m) => errors::status(errors::Reason::ModelNotFound, m),
    }
}

fn forward_status(e: ForwardError, ticket: &Ticket) -> Status {
    if let Some(reason) = ticket.abort.borrow().clone() {
        return Status::aborted(reason);
    }
    match e {
        ForwardError::InvalidBody(m) => Status::invalid_argument(m),
        ForwardError::Timeout => {
            Status::deadline_exceeded("the upstream did not answer before the deadline")
        }
        ForwardError::Unreachable(m) | ForwardError::Broken(m) => Status::aborted(format!(
            "the backend for {} failed during the request: {m}",
            ticket.served_name
        )),
    }
}

/// An upstream failure: if the child died, the exit watcher says so within milliseconds; wait a
/// moment for it so the caller learns *why* (a crash, an eviction) rather than "connection broke".
async fn upstream_failure(e: ForwardError, ticket: &Ticket) -> Status {
    if !matches!(e, ForwardError::InvalidBody(_) | ForwardError::Timeout)
        && ticket.abort.borrow().is_none()
    {
        let mut abort = ticket.abort.clone();
        let _ = tokio::time::timeout(Duration::from_millis(500), abort.changed()).await;
    }
    forward_status(e, ticket)
}

/// The span of one call to the engine (OpenTelemetry HTTP client and `gen_ai` conventions);
/// its context goes to the engine in `traceparent`.
fn forward_span(endpoint: Endpoint, t: &Ticket, stream: bool) -> tracing::Span {
    let operation = match endpoint {
        Endpoint::Chat => "chat",
        Endpoint::Completions => "text_completion",
        Endpoint::Embeddings => "embeddings",
    };
    tracing::info_span!(
        "backend.forward",
        otel.name = %format_args!("POST {}", endpoint.path()),
        otel.kind = "client",
        http.request.method = "POST",
        url.path = endpoint.path(),
        gen_ai.operation.name = operation,
        gen_ai.request.model = %t.model_name,
        backend.instance = %t.instance_id,
        backend.stream = stream,
        http.response.status_code = tracing::field::Empty,
        gen_ai.usage.input_tokens = tracing::field::Empty,
        gen_ai.usage.output_tokens = tracing::field::Empty,
        error.type = tracing::field::Empty,
    )
}

fn record_usage(span: &tracing::Span, u: Usage) {
    span.record("gen_ai.usage.input_tokens", u.prompt);
    span.record("gen_ai.usage.output_tokens", u.completion);
}

/// `error.type` of a failed call to the engine.
fn forward_error_type(e: &ForwardError) -> &'static str {
    match e {
        ForwardError::InvalidBody(_) => "invalid_body",
        ForwardError::Unreachable(_) => "unreachable",
        ForwardError::Timeout => "timeout",
        ForwardError::Broken(_) => "broken",
    }
}

fn usage_pb(u: Usage) -> pb::TokenUsage {
    pb::TokenUsage {
        prompt_tokens: u.prompt,
        completion_tokens: u.completion,
        total_tokens: u.total,
    }
}

fn request_id(r: &pb::InferenceRequest) -> Result<String, Status> {
    if r.request_id.len() > 128 {
        return Err(Status::invalid_argument(
            "invalid `request_id`: longer than 128 bytes",
        ));
    }
    Ok(if r.request_id.is_empty() {
        format!("req-{}", uuid::Uuid::new_v4().simple())
    } else {
        r.request_id.clone()
    })
}

impl BackendService {
    /// Resolve the model and get a ticket (loading on demand), within the deadline.
    async fn ticket(
        &self,
        r: &pb::InferenceRequest,
        embeddings: bool,
    ) -> Result<(Ticket, u64), Status> {
        let (model, deadline) = target(r)?;
        let (_, t) = self
            .manager
            .acquire(
                &model,
                embeddings,
                &ModelSettings::default(),
                deadline,
                r.priority,
                None,
            )
            .await
            .map_err(status_of)?;
        Ok((t, deadline))
    }
}

/// The model a request names (field `model`, else the body's `model`).
fn model_of(r: &pb::InferenceRequest) -> Option<String> {
    if r.model.is_empty() {
        forward::body_model(&r.body_json)
    } else {
        Some(r.model.clone())
    }
}

/// The model a request names and its absolute deadline.
fn target(r: &pb::InferenceRequest) -> Result<(String, u64), Status> {
    let model = model_of(r).ok_or_else(|| {
        Status::invalid_argument(
            "invalid request: no `model` given (field `model` or the body's `model`)",
        )
    })?;
    let deadline = if r.deadline_ms == 0 {
        now_ms() + DEFAULT_DEADLINE_MS
    } else {
        r.deadline_ms
    };
    if deadline <= now_ms() {
        return Err(Status::deadline_exceeded(
            "the request's deadline has already passed",
        ));
    }
    Ok((model, deadline))
}

impl BackendService {
    async fn unary(
        &self,
        r: pb::InferenceRequest,
        endpoint: Endpoint,
    ) -> Result<Response<pb::InferenceResponse>, Status> {
        let mut call = metrics::Request::begin(endpoint);
        let rid = request_id(&r)?;
        // Validate the body (one parse) before loading anything.
        let (body, _) = forward::validate_body(&r.body_json, endpoint, false)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let embeddings = endpoint == Endpoint::Embeddings;
        let (mut t, deadline) = match self.ticket(&r, embeddings).await {
            Ok(x) => x,
            Err(e) => {
                // Not `target`: the deadline may have passed by now.
                if let Some(name) =
                    model_of(&r).and_then(|m| self.manager.known_name(&m, embeddings))
                {
                    call.model(&name);
                }
                return Err(e);
            }
        };
        call.model(&t.model_name);
        let span = forward_span(endpoint, &t, false);
        let body = body
            .finish(&t.served_name)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let started = Instant::now();
        let timeout = Duration::from_millis(deadline.saturating_sub(now_ms()));
        let http = self.manager.shared.http.clone();
        let mut abort = t.abort.clone();
        let post = forward::post(
            &http,
            &t.endpoint,
            t.api_key.as_deref(),
            endpoint,
            body,
            &rid,
            Some(timeout),
        )
        .instrument(span.clone());
        let answer = tokio::select! {
            a = post => match a {
                Ok(a) => a,
                Err(e) => {
                    span.record("error.type", forward_error_type(&e));
                    return Err(upstream_failure(e, &t).await);
                }
            },
            _ = abort.changed() => {
                span.record("error.type", "aborted");
                let reason = abort.borrow().clone().unwrap_or_else(|| "the backend stopped".into());
                return Err(Status::aborted(reason));
            }
        };
        t.abort = abort;
        span.record("http.response.status_code", answer.status);
        if answer.status < 400 {
            call.ok();
        } else {
            span.record("error.type", answer.status);
        }
        if let Some(u) = answer.usage {
            record_usage(&span, u);
            call.generated(u.completion);
        }
        Ok(Response::new(pb::InferenceResponse {
            request_id: rid,
            http_status: u32::from(answer.status),
            body_json: answer.body.to_vec(),
            usage: answer.usage.map(usage_pb),
            model_id: t.model_id.clone(),
            instance_id: t.instance_id.clone(),
            load_wait_ms: t.load_wait_ms,
            upstream_ms: started.elapsed().as_millis() as u64,
        }))
    }

    async fn streaming(
        &self,
        r: pb::InferenceRequest,
        endpoint: Endpoint,
    ) -> Result<Response<ChunkStream>, Status> {
        let call = metrics::Request::begin(endpoint);
        let rid = request_id(&r)?;
        let (body, caller_wants_usage) = forward::validate_body(&r.body_json, endpoint, true)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let no_deadline = r.deadline_ms == 0;
        let (model, deadline) = target(&r)?;
        let reference = model.clone();
        // The ticket is fetched beside this call: a request that has to wait for its model tells
        // the caller where it stands (`progress` messages) before `start`.
        let (ptx, mut prx) = mpsc::unbounded_channel::<pb::LoadProgress>();
        let manager = self.manager.clone();
        let priority = r.priority;
        let mut acquiring = tokio::spawn(
            async move {
                manager
                    .acquire(
                        &model,
                        false,
                        &ModelSettings::default(),
                        deadline,
                        priority,
                        Some(&ptx),
                    )
                    .await
                    .map(|(_, t)| t)
                    .map_err(status_of)
            }
            .in_current_span(),
        );
        let joined = |j: Result<Result<Ticket, Status>, tokio::task::JoinError>| {
            j.unwrap_or_else(|_| Err(Status::internal("the load task failed")))
        };
        let stream = PendingStream {
            manager: self.manager.clone(),
            endpoint,
            body,
            rid,
            deadline,
            no_deadline,
            caller_wants_usage,
            call,
            reference,
        };
        let (tx, rx) = mpsc::channel::<Result<pb::InferenceChunk, Status>>(32);
        let first = tokio::select! {
            biased;
            j = &mut acquiring => Err(joined(j)),
            p = prx.recv() => Ok(p),
        };
        match first {
            // Ready at once (or failed at once): errors before the start are the call's status.
            Err(t) => match t {
                Ok(t) => stream.start(t, &tx).await?,
                Err(e) => return Err(stream.failed(e)),
            },
            Ok(p) => {
                let mut next = p;
                tokio::spawn(
                    async move {
                        let t = loop {
                            if let Some(p) = next.take() {
                                let chunk = pb::InferenceChunk {
                                    progress: Some(p),
                                    ..Default::default()
                                };
                                if tx.send(Ok(chunk)).await.is_err() {
                                    acquiring.abort();
                                    return;
                                }
                            }
                            tokio::select! {
                                biased;
                                j = &mut acquiring => break joined(j),
                                p = prx.recv() => match p {
                                    Some(p) => next = Some(p),
                                    None => break joined((&mut acquiring).await),
                                },
                                () = tx.closed() => { acquiring.abort(); return; }
                            }
                        };
                        let r = match t {
                            Ok(t) => stream.start(t, &tx).await,
                            Err(e) => Err(stream.failed(e)),
                        };
                        if let Err(e) = r {
                            let _ = tokio::time::timeout(FINAL_SEND, tx.send(Err(e))).await;
                        }
                    }
                    .in_current_span(),
                );
            }
        }
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// A streaming request once its model is chosen: post it to the engine with the ticket, send
/// `start`, then relay the engine's events.
struct PendingStream {
    manager: Manager,
    endpoint: Endpoint,
    body: forward::PreparedBody,
    rid: String,
    deadline: u64,
    no_deadline: bool,
    caller_wants_usage: bool,
    /// The call's metrics (counted when the stream ends).
    call: metrics::Request,
    /// The model reference the request named.
    reference: String,
}

impl PendingStream {
    /// The request could not get its model: counted (under the registry's name when it resolved)
    /// as it drops.
    fn failed(mut self, e: Status) -> Status {
        if let Some(name) = self.manager.known_name(&self.reference, false) {
            self.call.model(&name);
        }
        e
    }

    /// Errors before `start` are returned; later ones end the stream through `tx`.
    async fn start(
        self,
        t: Ticket,
        tx: &mpsc::Sender<Result<pb::InferenceChunk, Status>>,
    ) -> Result<(), Status> {
        let PendingStream {
            manager,
            endpoint,
            body,
            rid,
            deadline,
            no_deadline,
            caller_wants_usage,
            mut call,
            reference: _,
        } = self;
        call.model(&t.model_name);
        let span = forward_span(endpoint, &t, true);
        let tx = tx.clone();
        let body = body
            .finish(&t.served_name)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let http = manager.shared.http.clone();
        let first = Duration::from_millis(deadline.saturating_sub(now_ms()));
        let mut abort = t.abort.clone();
        let post = forward::post_stream(
            &http,
            &t.endpoint,
            t.api_key.as_deref(),
            endpoint,
            body,
            &rid,
            Some(first),
        )
        .instrument(span.clone());
        let answer = tokio::select! {
            a = post => match a {
                Ok(a) => a,
                Err(e) => {
                    span.record("error.type", forward_error_type(&e));
                    return Err(upstream_failure(e, &t).await);
                }
            },
            _ = abort.changed() => {
                span.record("error.type", "aborted");
                let reason = abort.borrow().clone().unwrap_or_else(|| "the backend stopped".into());
                return Err(Status::aborted(reason));
            }
        };
        span.record("http.response.status_code", answer.status);
        let upstream_ok = answer.status < 400;
        if !upstream_ok {
            span.record("error.type", answer.status);
        }
        let start = pb::InferenceChunk {
            start: Some(pb::InferenceStreamStart {
                request_id: rid,
                http_status: u32::from(answer.status),
                error_body_json: answer.error_body.map(|b| b.to_vec()).unwrap_or_default(),
                model_id: t.model_id.clone(),
                instance_id: t.instance_id.clone(),
                load_wait_ms: t.load_wait_ms,
            }),
            ..Default::default()
        };
        let _ = tx.send(Ok(start)).await;
        let mut events = answer.events;
        // After the first byte the stream still ends at the request's deadline, and when the
        // engine, once it has begun sending tokens, sends nothing for `stall_timeout_ms` (a
        // wedged child must not hold the caller, the in-flight slot and the lease forever).
        let stall = Duration::from_millis(manager.shared.cfg.stall_timeout_ms.max(1));
        // A request without a deadline (0: "the gRPC deadline only") keeps streaming as long as
        // tokens come; the default deadline bounded only its load and first byte.
        let end = tokio::time::Instant::now()
            + if no_deadline {
                Duration::from_secs(365 * 24 * 3600)
            } else {
                Duration::from_millis(deadline.saturating_sub(now_ms()))
            };
        let relay_span = span.clone();
        tokio::spawn(async move {
            let span = relay_span;
            let mut call = call;
            let t = t; // held until the stream ends: in-flight accounting
            let mut abort = t.abort.clone();
            let deadline = tokio::time::sleep_until(end);
            tokio::pin!(deadline);
            // The stall clock starts at the first token: prompt processing before it can take
            // long on a CPU and is bounded by the deadline alone.
            let mut streaming = false;
            loop {
                let quiet = tokio::time::sleep(stall);
                tokio::select! {
                    () = &mut deadline => {
                        let _ = tokio::time::timeout(FINAL_SEND, tx.send(Err(Status::deadline_exceeded(
                            "the request's deadline passed while the answer was streaming",
                        )))).await;
                        return;
                    }
                    () = quiet, if streaming => {
                        let _ = tokio::time::timeout(FINAL_SEND, tx.send(Err(Status::aborted(format!(
                            "model {} sent nothing for {} ms mid-stream",
                            t.served_name,
                            stall.as_millis()
                        ))))).await;
                        return;
                    }
                    ev = events.next() => match ev {
                        None => {
                            if upstream_ok {
                                call.ok();
                            }
                            return;
                        }
                        Some(Ok(data)) => {
                            streaming = true;
                            let v: Option<serde_json::Value> = serde_json::from_slice(&data).ok();
                            let usage = v.as_ref().and_then(forward::usage_of);
                            let no_choices = v.as_ref().and_then(|v| v.get("choices")).and_then(|c| c.as_array()).is_some_and(|c| c.is_empty());
                            let usage_only = !caller_wants_usage
                                && usage.is_some()
                                && no_choices;
                            if !no_choices
                                && let Some(ttft) = call.token()
                            {
                                tracing::info!(
                                    ttft_ms = ttft.as_millis() as u64,
                                    "first token"
                                );
                            }
                            if let Some(u) = usage {
                                record_usage(&span, u);
                                call.generated(u.completion);
                            }
                            let chunk = pb::InferenceChunk {
                                start: None,
                                data_json: data.to_vec(),
                                usage: usage.map(usage_pb),
                                usage_only,
                                progress: None,
                            };
                            // A caller that stops reading cannot hold the task (and the
                            // in-flight slot, and the lease) past the deadline or the stall
                            // time: the send is bounded by both.
                            let limit = (*deadline).deadline().min(tokio::time::Instant::now() + stall);
                            match tokio::time::timeout_at(limit, tx.send(Ok(chunk))).await {
                                Ok(Ok(())) => {}
                                // The caller went away (or stopped reading): dropping `events`
                                // cancels the upstream.
                                Ok(Err(_)) | Err(_) => return,
                            }
                        }
                        Some(Err(e)) => {
                            let _ = tokio::time::timeout(FINAL_SEND, tx.send(Err(upstream_failure(e, &t).await))).await;
                            return;
                        }
                    },
                    _ = abort.changed() => {
                        span.record("error.type", "aborted");
                        let reason = abort.borrow().clone().unwrap_or_else(|| "the backend stopped".into());
                        let _ = tokio::time::timeout(FINAL_SEND, tx.send(Err(Status::aborted(reason)))).await;
                        return;
                    }
                    () = tx.closed() => return,
                }
            }
        }.instrument(span));
        Ok(())
    }
}

/// How long a stream's final error may wait for a slow reader before it is given up.
const FINAL_SEND: Duration = Duration::from_secs(5);

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::InferenceChunk, Status>> + Send>>;

fn request_settings(s: Option<pb::InstanceSettings>) -> Result<ModelSettings, Status> {
    let Some(s) = s else {
        return Ok(ModelSettings::default());
    };
    let cache_type = match s.cache_type.map(pb::KvCacheType::try_from) {
        None => None,
        Some(Ok(pb::KvCacheType::Unspecified | pb::KvCacheType::F16)) => Some("f16".to_string()),
        Some(Ok(pb::KvCacheType::Q80)) => Some("q8_0".to_string()),
        Some(Ok(pb::KvCacheType::Q40)) => Some("q4_0".to_string()),
        Some(Err(_)) => return Err(Status::invalid_argument("invalid `settings.cache_type`")),
    };
    let context = match s.context {
        Some(c) if c <= 0 => {
            return Err(Status::invalid_argument(
                "invalid `settings.context`: must be > 0",
            ));
        }
        c => c.map(|c| c as u64),
    };
    let parallel = match s.parallel {
        Some(p) if p <= 0 => {
            return Err(Status::invalid_argument(
                "invalid `settings.parallel`: must be >= 1",
            ));
        }
        p => p.map(|p| p as u32),
    };
    Ok(ModelSettings {
        context,
        parallel,
        cache_type,
        gpu_layers: s.gpu_layers,
        embeddings: s.embeddings,
        flash_attention: s.flash_attention,
        priority: s.priority,
        gpu_index: s.gpu_index,
        idle_ttl_ms: s.idle_ttl_ms,
    })
}

#[tonic::async_trait]
impl BackendManager for BackendService {
    async fn chat(
        &self,
        request: Request<pb::InferenceRequest>,
    ) -> Result<Response<pb::InferenceResponse>, Status> {
        self.unary(request.into_inner(), Endpoint::Chat).await
    }

    async fn complete(
        &self,
        request: Request<pb::InferenceRequest>,
    ) -> Result<Response<pb::InferenceResponse>, Status> {
        self.unary(request.into_inner(), Endpoint::Completions)
            .await
    }

    async fn embed(
        &self,
        request: Request<pb::InferenceRequest>,
    ) -> Result<Response<pb::InferenceResponse>, Status> {
        self.unary(request.into_inner(), Endpoint::Embeddings).await
    }

    type ChatStreamStream = ChunkStream;

    async fn chat_stream(
        &self,
        request: Request<pb::InferenceRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        self.streaming(request.into_inner(), Endpoint::Chat).await
    }

    type CompleteStreamStream = ChunkStream;

    async fn complete_stream(
        &self,
        request: Request<pb::InferenceRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        self.streaming(request.into_inner(), Endpoint::Completions)
            .await
    }

    async fn load(
        &self,
        request: Request<pb::LoadRequest>,
    ) -> Result<Response<pb::BackendInstance>, Status> {
        let r = request.into_inner();
        let settings = request_settings(r.settings)?;
        let deadline = if r.deadline_ms == 0 {
            now_ms() + DEFAULT_DEADLINE_MS
        } else {
            r.deadline_ms
        };
        let (h, t) = self
            .manager
            .acquire(
                &r.model,
                settings.embeddings.unwrap_or(false),
                &settings,
                deadline,
                None,
                None,
            )
            .await
            .map_err(status_of)?;
        drop(t);
        let v = h
            .view()
            .await
            .ok_or_else(|| Status::unavailable("instance stopped"))?;
        Ok(Response::new(v))
    }

    async fn unload(
        &self,
        request: Request<pb::UnloadRequest>,
    ) -> Result<Response<pb::UnloadResponse>, Status> {
        let r = request.into_inner();
        if r.model.trim().is_empty() {
            return Err(Status::invalid_argument(
                "invalid `model`: must not be empty",
            ));
        }
        let mut hs = self.manager.find(&r.model);
        if hs.is_empty() {
            // Maybe an alias: resolve through the registry.
            let (m, _) = self.manager.resolve(&r.model).await.map_err(status_of)?;
            hs = self.manager.find(&m.id);
        }
        let mut was = false;
        let mut last = None;
        for h in hs {
            was |= h.unload(r.drain_timeout_ms, r.force).await;
            last = h.view().await;
        }
        Ok(Response::new(pb::UnloadResponse {
            instance: last,
            was_loaded: was,
        }))
    }

    async fn list_instances(
        &self,
        request: Request<pb::ListInstancesRequest>,
    ) -> Result<Response<pb::ListInstancesResponse>, Status> {
        let r = request.into_inner();
        let hs = if r.model.is_empty() {
            self.manager.handles()
        } else {
            self.manager.find(&r.model)
        };
        let mut out = Vec::new();
        for h in hs {
            if let Some(v) = h.view().await
                && (r.states.is_empty() || r.states.contains(&v.state))
            {
                out.push(v);
            }
        }
        Ok(Response::new(pb::ListInstancesResponse { instances: out }))
    }

    type WatchInstancesStream =
        Pin<Box<dyn Stream<Item = Result<pb::InstanceEvent, Status>> + Send>>;

    async fn watch_instances(
        &self,
        request: Request<pb::WatchInstancesRequest>,
    ) -> Result<Response<Self::WatchInstancesStream>, Status> {
        let r = request.into_inner();
        let filter = r.model.clone();
        let live =
            BroadcastStream::new(self.manager.shared.events.subscribe()).filter_map(move |e| {
                let keep = match &e {
                    Ok(ev) => {
                        filter.is_empty()
                            || ev.instance.as_ref().is_some_and(|i| {
                                i.model_id == filter || i.model_name == filter || i.id == filter
                            })
                    }
                    Err(_) => false,
                };
                futures::future::ready(if keep { e.ok().map(Ok) } else { None })
            });
        let mut first = Vec::new();
        if r.include_existing {
            for h in self.manager.handles() {
                if let Some(v) = h.view().await {
                    first.push(Ok(pb::InstanceEvent {
                        kind: pb::InstanceEventKind::Snapshot as i32,
                        previous_state: v.state,
                        instance: Some(v),
                        at_ms: now_ms(),
                        detail: String::new(),
                    }));
                }
            }
        }
        Ok(Response::new(Box::pin(
            tokio_stream::iter(first).chain(live),
        )))
    }
}
