//! Upstreams behind one interface, the [`Upstream`] trait: what the request path
//! ([`crate::pipeline`]) needs from whoever answers a request. Implemented by the local backend
//! manager over gRPC ([`Local`]: OpenAI bodies as bytes, answers relayed byte for byte, streams
//! chunk by chunk) and by OpenAI-compatible cloud upstreams ([`crate::cloud::Cloud`]); later by
//! remote nodes. Tests put an in-memory one behind it. [`Upstreams`] is the routing table: the
//! first cloud upstream whose patterns match the model, else the local one.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use securellm_common::internal_auth::AuthChannel;
use securellm_proto::v1 as pb;
use securellm_proto::v1::backend_manager_client::BackendManagerClient;
use securellm_proto::v1::model_registry_client::ModelRegistryClient;
use serde_json::Value;

use crate::error::{ApiError, from_status};
use crate::redact::Policy;

/// A boxed future (what keeps [`Upstream`] object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where an upstream runs, which decides what the pipeline does to a request before forwarding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// On this machine (the backend manager): prompts stay here, nothing is redacted; the body is
    /// validated for a local engine (`max_tokens` filled in up to the cap).
    Local,
    /// Elsewhere (a cloud service): every string leaving the machine, the request id included,
    /// passes the redactor with this policy first; the body is validated for a cloud upstream.
    Remote(Policy),
}

/// One request as an upstream receives it: the body is validated, capped and (for a
/// [`Reach::Remote`] upstream) redacted already.
#[derive(Clone, Debug)]
pub struct UpstreamRequest<'a> {
    pub endpoint: Endpoint,
    pub model: &'a str,
    /// The OpenAI JSON body, re-serialised by the gateway.
    pub body: Bytes,
    /// The request id as this upstream may see it (redacted for a remote one).
    pub request_id: &'a str,
    /// The caller's subject (the backend manager schedules and logs by it).
    pub caller: &'a str,
    /// The key's scheduling priority, if it has one.
    pub priority: Option<i32>,
    /// Unix ms by which the answer must have started (now + `timeout`).
    pub deadline_ms: u64,
    /// The request timeout `deadline_ms` was computed from.
    pub timeout: Duration,
    /// Streams: the client asked for the usage chunk (it is counted either way).
    pub relay_usage: bool,
}

/// Whoever answers requests for a set of models. Decisions about the request (authorisation,
/// limits, validation, redaction, audit) are made by the pipeline before and after; an upstream
/// only forwards and reports what it got back.
pub trait Upstream: Send + Sync {
    /// The name in audit rows and `owned_by` (`local` for the backend manager).
    fn name(&self) -> &str;

    /// Where it runs (see [`Reach`]).
    fn reach(&self) -> Reach;

    /// Does it serve `model`? (Routing asks the remote upstreams in order; the local one takes
    /// the rest.)
    fn serves(&self, model: &str) -> bool;

    /// Adjust the validated body before it is serialised for this upstream (`stream`: the answer
    /// will be streamed). Nothing by default.
    fn prepare(&self, _endpoint: Endpoint, _body: &mut Value, _stream: bool) {}

    /// A whole answer.
    fn complete<'a>(&'a self, req: UpstreamRequest<'a>) -> BoxFuture<'a, Result<Answer, ApiError>>;

    /// Start a streamed answer.
    fn stream<'a>(
        &'a self,
        req: UpstreamRequest<'a>,
    ) -> BoxFuture<'a, Result<StreamAnswer, ApiError>>;

    /// The models it offers, for `/v1/models` (before the caller's scopes filter them).
    fn models(&self) -> BoxFuture<'_, Result<Vec<ModelEntry>, ApiError>>;

    /// Is it answering? `Err` names what is unreachable. Not probed by default (a cloud upstream
    /// would spend its quota on it).
    fn ready(&self) -> BoxFuture<'_, Result<(), Vec<&'static str>>> {
        Box::pin(async { Ok(()) })
    }
}

/// The routing table.
#[derive(Clone)]
pub struct Upstreams {
    /// Asked in order; the first that serves a model gets it.
    pub remote: Vec<Arc<dyn Upstream>>,
    /// The rest.
    pub local: Arc<dyn Upstream>,
}

impl Upstreams {
    /// The upstream for `model`: a remote one that serves it, else the local one.
    pub fn route(&self, model: &str) -> &dyn Upstream {
        self.remote
            .iter()
            .find(|u| u.serves(model))
            .unwrap_or(&self.local)
            .as_ref()
    }

    /// The local one first, then the remote ones in routing order.
    pub fn all(&self) -> impl Iterator<Item = &dyn Upstream> {
        std::iter::once(self.local.as_ref()).chain(self.remote.iter().map(AsRef::as_ref))
    }
}

/// One model an upstream offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelEntry {
    pub id: String,
    pub owned_by: String,
    pub created: u64,
    /// "local" or the cloud upstream's name.
    pub upstream: String,
    /// Registry id for local models.
    pub registry_id: String,
}

/// Which OpenAI endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
    Embeddings,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Embeddings => "/v1/embeddings",
        }
    }
}

/// Token counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u32,
    pub completion: u32,
}

/// A complete answer.
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
    pub usage: Usage,
}

/// One streamed item: an SSE payload to relay, usage to account (not relayed), or where a request
/// that waits for its model stands (an SSE comment line, ignored by OpenAI clients).
pub enum StreamItem {
    Data(Bytes),
    Usage(Usage),
    Comment(String),
}

pub type ItemStream = Pin<Box<dyn Stream<Item = Result<StreamItem, ApiError>> + Send>>;

/// The start of a streamed answer.
pub enum StreamAnswer {
    /// The request waits for its model; `items` begin with comments saying where it stands
    /// (`queue_position`: its first place in the scheduler's queue, if it queued).
    Waiting {
        items: ItemStream,
        queue_position: Option<u32>,
    },
    /// The upstream refused (status ≥ 400) with this body.
    Refused {
        status: u16,
        body: Bytes,
        usage: Usage,
    },
    Streaming(ItemStream),
}

/// The backend manager (and the model registry, which lists the local models).
#[derive(Clone)]
pub struct Local {
    client: BackendManagerClient<AuthChannel>,
    registry: ModelRegistryClient<AuthChannel>,
}

fn usage_of(u: Option<pb::TokenUsage>) -> Usage {
    u.map(|u| Usage {
        prompt: u.prompt_tokens,
        completion: u.completion_tokens,
    })
    .unwrap_or_default()
}

impl Local {
    /// The manager over `channel` and the registry over `registry`, whose calls carry the
    /// internal token.
    pub fn new(channel: AuthChannel, registry: AuthChannel) -> Self {
        Self {
            client: BackendManagerClient::new(channel),
            registry: ModelRegistryClient::new(registry),
        }
    }

    fn request(
        model: &str,
        body: Bytes,
        request_id: &str,
        caller: &str,
        deadline_ms: u64,
        priority: Option<i32>,
    ) -> pb::InferenceRequest {
        pb::InferenceRequest {
            request_id: request_id.to_string(),
            model: model.to_string(),
            body_json: body.to_vec(),
            deadline_ms,
            caller: caller.to_string(),
            priority,
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn call(
        &self,
        endpoint: Endpoint,
        model: &str,
        body: Bytes,
        request_id: &str,
        caller: &str,
        deadline_ms: u64,
        priority: Option<i32>,
    ) -> Result<Answer, ApiError> {
        let mut c = self.client.clone();
        let req = Self::request(model, body, request_id, caller, deadline_ms, priority);
        let r = match endpoint {
            Endpoint::Chat => c.chat(req).await,
            Endpoint::Completions => c.complete(req).await,
            Endpoint::Embeddings => c.embed(req).await,
        }
        .map_err(|s| from_status(&s))?
        .into_inner();
        Ok(Answer {
            status: u16::try_from(r.http_status).unwrap_or(502),
            body: Bytes::from(r.body_json),
            usage: usage_of(r.usage),
        })
    }

    /// Start a stream. `relay_usage`: the client asked for the usage chunk.
    #[allow(clippy::too_many_arguments)]
    pub async fn call_stream(
        &self,
        endpoint: Endpoint,
        model: &str,
        body: Bytes,
        request_id: &str,
        caller: &str,
        deadline_ms: u64,
        relay_usage: bool,
        priority: Option<i32>,
    ) -> Result<StreamAnswer, ApiError> {
        let mut c = self.client.clone();
        let req = Self::request(model, body, request_id, caller, deadline_ms, priority);
        let mut s = match endpoint {
            Endpoint::Completions => c.complete_stream(req).await,
            _ => c.chat_stream(req).await,
        }
        .map_err(|s| from_status(&s))?
        .into_inner();
        let first = s
            .next()
            .await
            .ok_or_else(|| {
                from_status(&tonic::Status::unavailable(
                    "the stream ended before it started",
                ))
            })?
            .map_err(|s| from_status(&s))?;
        if let Some(start) = &first.start
            && start.http_status >= 400
        {
            return Ok(StreamAnswer::Refused {
                status: u16::try_from(start.http_status).unwrap_or(502),
                body: Bytes::from(start.error_body_json.clone()),
                usage: Usage::default(),
            });
        }
        // The request waits for its model: the answer starts now (200) so the caller hears where
        // it stands; a failure after this point is an error event in the stream.
        let waiting = first.start.is_none() && first.progress.is_some();
        // Its place in the scheduler's queue when the answer starts (0 when it waits for a load
        // with nobody ahead of it).
        let queue_position = first.progress.as_ref().map(|p| {
            if p.phase == pb::load_progress::Phase::Queued as i32 {
                p.position
            } else {
                0
            }
        });
        let lead = futures::stream::iter(map_chunk(Ok(first), relay_usage));
        let items = lead
            .chain(s.flat_map(move |chunk| futures::stream::iter(map_chunk(chunk, relay_usage))));
        if waiting {
            return Ok(StreamAnswer::Waiting {
                items: Box::pin(items),
                queue_position,
            });
        }
        Ok(StreamAnswer::Streaming(Box::pin(items)))
    }

    /// Is the backend manager answering? (For `/ready`.)
    pub async fn ping(&self) -> Result<(), tonic::Status> {
        let mut c = self.client.clone();
        c.list_instances(pb::ListInstancesRequest {
            model: String::new(),
            states: vec![pb::InstanceState::Ready as i32],
        })
        .await
        .map(|_| ())
    }

    /// Local models from the registry, for `/v1/models`.
    pub async fn registry_models(&self) -> Result<Vec<pb::Model>, ApiError> {
        let mut registry = self.registry.clone();
        let r = registry
            .list_models(pb::ListModelsRequest {
                status: pb::ModelStatus::Ok as i32,
                ..Default::default()
            })
            .await
            .map_err(|s| from_status(&s))?;
        Ok(r.into_inner().models)
    }

    /// Are the registry and the backend manager both answering (within 2 s each)?
    pub async fn probe(&self) -> Result<(), Vec<&'static str>> {
        let limit = Duration::from_secs(2);
        let mut reg = self.registry.clone();
        let (registry, backend) = tokio::join!(
            tokio::time::timeout(limit, reg.list_models(pb::ListModelsRequest::default())),
            tokio::time::timeout(limit, self.ping()),
        );
        let mut down = Vec::new();
        if !matches!(registry, Ok(Ok(_))) {
            down.push("the model registry");
        }
        if !matches!(backend, Ok(Ok(()))) {
            down.push("the backend manager");
        }
        if down.is_empty() { Ok(()) } else { Err(down) }
    }
}

impl Upstream for Local {
    fn name(&self) -> &str {
        "local"
    }

    fn reach(&self) -> Reach {
        Reach::Local
    }

    fn serves(&self, _model: &str) -> bool {
        true
    }

    fn complete<'a>(&'a self, r: UpstreamRequest<'a>) -> BoxFuture<'a, Result<Answer, ApiError>> {
        Box::pin(self.call(
            r.endpoint,
            r.model,
            r.body,
            r.request_id,
            r.caller,
            r.deadline_ms,
            r.priority,
        ))
    }

    fn stream<'a>(
        &'a self,
        r: UpstreamRequest<'a>,
    ) -> BoxFuture<'a, Result<StreamAnswer, ApiError>> {
        Box::pin(self.call_stream(
            r.endpoint,
            r.model,
            r.body,
            r.request_id,
            r.caller,
            r.deadline_ms,
            r.relay_usage,
            r.priority,
        ))
    }

    fn models(&self) -> BoxFuture<'_, Result<Vec<ModelEntry>, ApiError>> {
        Box::pin(async move {
            Ok(self
                .registry_models()
                .await?
                .into_iter()
                .map(|m| ModelEntry {
                    id: m.name,
                    owned_by: "securellm".into(),
                    created: m.first_seen_ms / 1000,
                    upstream: "local".into(),
                    registry_id: m.id,
                })
                .collect())
        })
    }

    fn ready(&self) -> BoxFuture<'_, Result<(), Vec<&'static str>>> {
        Box::pin(self.probe())
    }
}

/// One message of the backend manager's stream as the items the gateway relays: progress as a
/// comment, a late refused start (after progress) as an error, payloads and usage as they come.
fn map_chunk(
    chunk: Result<pb::InferenceChunk, tonic::Status>,
    relay_usage: bool,
) -> Vec<Result<StreamItem, ApiError>> {
    let c = match chunk {
        Err(st) => return vec![Err(from_status(&st))],
        Ok(c) => c,
    };
    let mut v = Vec::new();
    if let Some(p) = &c.progress {
        v.push(Ok(StreamItem::Comment(progress_comment(p))));
    }
    if let Some(start) = &c.start
        && start.http_status >= 400
    {
        v.push(Err(refused_error(
            u16::try_from(start.http_status).unwrap_or(502),
            &start.error_body_json,
        )));
        return v;
    }
    if let Some(u) = c.usage {
        v.push(Ok(StreamItem::Usage(usage_of(Some(u)))));
    }
    if !c.data_json.is_empty() && (!c.usage_only || relay_usage) {
        v.push(Ok(StreamItem::Data(Bytes::from(c.data_json))));
    }
    v
}

/// `queued position=2 queue_length=3 model=…` / `loading model=… phase=starting`: the text of the
/// SSE comment a waiting request gets.
pub fn progress_comment(p: &pb::LoadProgress) -> String {
    use pb::load_progress::Phase;
    match Phase::try_from(p.phase).unwrap_or(Phase::Unspecified) {
        Phase::Queued => format!(
            "queued position={} queue_length={} model={}{}",
            p.position,
            p.queue_length,
            p.model,
            if p.evictions_requested {
                " evicting=true"
            } else {
                ""
            }
        ),
        Phase::Unloading => format!("loading model={} phase=waiting_for_unload", p.model),
        Phase::Leasing => format!("loading model={} phase=leasing", p.model),
        Phase::Starting => format!("loading model={} phase=starting", p.model),
        Phase::Ready => format!("loading model={} phase=ready", p.model),
        Phase::Unspecified => format!("loading model={}", p.model),
    }
}

/// An upstream's refusal after the stream had started, in OpenAI's error shape (its own message
/// and code when it sent JSON).
fn refused_error(status: u16, body: &[u8]) -> ApiError {
    let status =
        axum::http::StatusCode::from_u16(status).unwrap_or(axum::http::StatusCode::BAD_GATEWAY);
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let message = v["error"]["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(500).collect());
    let kind = if status.is_client_error() {
        "invalid_request_error"
    } else {
        "server_error"
    };
    ApiError::new(status, kind, message)
}
