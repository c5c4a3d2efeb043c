//! The local backend manager over gRPC: OpenAI bodies as bytes, answers relayed byte for byte,
//! streams chunk by chunk, progress of a request that waits for its model as comments. The model
//! registry lists the local models.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use securellm_common::internal_auth::AuthChannel;
use securellm_proto::v1 as pb;
use securellm_proto::v1::backend_manager_client::BackendManagerClient;
use securellm_proto::v1::model_registry_client::ModelRegistryClient;

use super::{
    Answer, BoxFuture, Endpoint, ModelEntry, Reach, StreamAnswer, StreamItem, Upstream,
    UpstreamRequest, Usage,
};
use crate::error::{ApiError, from_status};

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
