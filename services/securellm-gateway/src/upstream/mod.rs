//! Upstreams behind one interface, the [`Upstream`] trait: what the request path
//! ([`crate::pipeline`]) needs from whoever answers a request. Implemented by the local backend
//! manager over gRPC ([`Local`], `local.rs`) and by OpenAI-compatible cloud upstreams
//! ([`cloud::Cloud`], `cloud.rs`); later by remote nodes. Tests put an in-memory one behind it. [`Upstreams`] is the routing table: the
//! first cloud upstream whose patterns match the model, else the local one.

pub mod cloud;
mod local;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use serde_json::Value;

use crate::error::ApiError;
use crate::redact::Policy;

pub use local::{Local, progress_comment};

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

/// Which OpenAI endpoint (shared with the backend manager).
pub use securellm_common::openai::Endpoint;

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
