//! Upstreams behind one interface. Today: the local backend manager over gRPC (OpenAI bodies as
//! bytes, answers relayed byte for byte, streams chunk by chunk). Cloud upstreams (OpenAI-compatible
//! HTTP) are the next file here.

use std::pin::Pin;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use securellm_proto::v1 as pb;
use securellm_proto::v1::backend_manager_client::BackendManagerClient;
use tonic::transport::Channel;

use crate::error::{ApiError, from_status};

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

/// One streamed item: an SSE payload to relay, or usage to account (not relayed).
pub enum StreamItem {
    Data(Bytes),
    Usage(Usage),
}

pub type ItemStream = Pin<Box<dyn Stream<Item = Result<StreamItem, ApiError>> + Send>>;

/// The start of a streamed answer.
pub enum StreamAnswer {
    /// The upstream refused (status ≥ 400) with this body.
    Refused {
        status: u16,
        body: Bytes,
    },
    Streaming(ItemStream),
}

/// The backend manager.
#[derive(Clone)]
pub struct Local {
    client: BackendManagerClient<Channel>,
}

fn usage_of(u: Option<pb::TokenUsage>) -> Usage {
    u.map(|u| Usage {
        prompt: u.prompt_tokens,
        completion: u.completion_tokens,
    })
    .unwrap_or_default()
}

impl Local {
    pub fn new(channel: Channel) -> Self {
        Self {
            client: BackendManagerClient::new(channel),
        }
    }

    fn request(
        model: &str,
        body: Bytes,
        request_id: &str,
        caller: &str,
        deadline_ms: u64,
    ) -> pb::InferenceRequest {
        pb::InferenceRequest {
            request_id: request_id.to_string(),
            model: model.to_string(),
            body_json: body.to_vec(),
            deadline_ms,
            caller: caller.to_string(),
            priority: None,
        }
    }

    pub async fn call(
        &self,
        endpoint: Endpoint,
        model: &str,
        body: Bytes,
        request_id: &str,
        caller: &str,
        deadline_ms: u64,
    ) -> Result<Answer, ApiError> {
        let mut c = self.client.clone();
        let req = Self::request(model, body, request_id, caller, deadline_ms);
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
    pub async fn stream(
        &self,
        endpoint: Endpoint,
        model: &str,
        body: Bytes,
        request_id: &str,
        caller: &str,
        deadline_ms: u64,
        relay_usage: bool,
    ) -> Result<StreamAnswer, ApiError> {
        let mut c = self.client.clone();
        let req = Self::request(model, body, request_id, caller, deadline_ms);
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
        if let Some(start) = first.start
            && start.http_status >= 400
        {
            return Ok(StreamAnswer::Refused {
                status: u16::try_from(start.http_status).unwrap_or(502),
                body: Bytes::from(start.error_body_json),
            });
        }
        let items = s.flat_map(move |chunk| {
            let out: Vec<Result<StreamItem, ApiError>> = match chunk {
                Err(st) => vec![Err(from_status(&st))],
                Ok(c) => {
                    let mut v = Vec::new();
                    if let Some(u) = c.usage {
                        v.push(Ok(StreamItem::Usage(usage_of(Some(u)))));
                    }
                    if !c.data_json.is_empty() && (!c.usage_only || relay_usage) {
                        v.push(Ok(StreamItem::Data(Bytes::from(c.data_json))));
                    }
                    v
                }
            };
            futures::stream::iter(out)
        });
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
    pub async fn models(
        registry: &mut securellm_proto::v1::model_registry_client::ModelRegistryClient<Channel>,
    ) -> Result<Vec<pb::Model>, ApiError> {
        let r = registry
            .list_models(pb::ListModelsRequest {
                status: pb::ModelStatus::Ok as i32,
                ..Default::default()
            })
            .await
            .map_err(|s| from_status(&s))?;
        Ok(r.into_inner().models)
    }
}
