//! Cloud upstreams: OpenAI-compatible HTTP(S) endpoints (`[gateway.upstreams.<name>]`), chosen by
//! model name. The key comes from an environment variable or a file and is never logged. Prompts
//! pass through the redactor with the upstream's policy before they leave (see `redact.rs`).
//! Answers are relayed byte for byte; streams are split into their SSE `data:` payloads as they
//! arrive (never buffered beyond one event) so that the usage chunk can be counted in the audit
//! row and the rate limiter, and each transport re-frames them (SSE for HTTP, messages for gRPC).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderValue, Uri, header};
use bytes::Bytes;
use futures::stream::BoxStream;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use crate::auth::keys::glob;
use crate::error::ApiError;
use crate::redact::Policy;
use crate::upstream::{
    Answer, BoxFuture, Endpoint, ItemStream, ModelEntry, Reach, StreamAnswer, StreamItem, Upstream,
    UpstreamRequest, Usage,
};
use futures::StreamExt;

/// `[gateway.upstreams.<name>]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CloudConfig {
    /// e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// Environment variable holding the API key.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// File holding the API key.
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// Model names (or `*` patterns) served by this upstream.
    pub models: Vec<String>,
    /// What to do with secrets found in prompts: `redact` (default), `block`, `allow`.
    #[serde(default)]
    pub redaction: Policy,
}

impl CloudConfig {
    /// What can be checked without the key: the URL, the models, one key source at most.
    pub fn check(&self, name: &str) -> Result<(), CloudConfigError> {
        let err = |m: String| CloudConfigError {
            name: name.to_string(),
            message: m,
        };
        if !(self.base_url.starts_with("http://") || self.base_url.starts_with("https://")) {
            return Err(err(format!(
                "base_url {:?} must start with http:// or https://",
                self.base_url
            )));
        }
        if self.models.is_empty() {
            return Err(err(
                "models must list at least one model name or pattern".into()
            ));
        }
        if self.api_key_env.is_some() && self.api_key_file.is_some() {
            return Err(err("set api_key_env or api_key_file, not both".into()));
        }
        reqwest::Url::parse(self.base_url.trim_end_matches('/')).map_err(|e| {
            err(format!(
                "base_url {:?} is not a valid URL: {e}",
                self.base_url
            ))
        })?;
        Ok(())
    }
}

/// Why an upstream's configuration is unusable.
#[derive(Debug, thiserror::Error)]
#[error("invalid `gateway.upstreams.{name}`: {message}")]
pub struct CloudConfigError {
    pub name: String,
    pub message: String,
}

/// A configured cloud upstream.
pub struct Cloud {
    pub name: String,
    base_url: String,
    /// `base_url` + `/chat/completions`, `/completions`, `/embeddings`, parsed once.
    urls: [Uri; 3],
    /// `Bearer <key>`, marked sensitive (never logged).
    auth: Option<HeaderValue>,
    pub models: Vec<String>,
    pub policy: Policy,
    http: Transport,
}

/// The hyper client of the cloud upstreams: HTTP/1.1 (or HTTP/2 where TLS negotiates it) over a
/// keep-alive pool of `TCP_NODELAY` connections, TLS by rustls with the platform's roots (the
/// verifier reqwest used).
type HyperClient =
    hyper_util::client::legacy::Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// How requests reach the upstreams: a bare hyper client (no per-request middleware), or reqwest
/// when a proxy is configured in the environment (`HTTPS_PROXY`, `ALL_PROXY`, ...), which reqwest
/// honours (with `NO_PROXY`).
#[derive(Clone)]
enum Transport {
    Hyper(Box<HyperClient>),
    Reqwest(reqwest::Client),
}

/// Environment variables naming a proxy for reqwest.
const PROXY_VARS: [&str; 6] = [
    "http_proxy",
    "HTTP_PROXY",
    "https_proxy",
    "HTTPS_PROXY",
    "all_proxy",
    "ALL_PROXY",
];

/// The hyper client shared by all cloud upstreams (one pool).
fn hyper_client() -> Result<HyperClient, String> {
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
    let verifier = rustls_platform_verifier::Verifier::new(provider.clone())
        .map_err(|e| format!("cannot load the platform's root certificates: {e}"))?;
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_keepalive(Some(Duration::from_secs(60)));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(tcp);
    Ok(
        hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(usize::MAX)
            .build(connector),
    )
}

impl std::fmt::Debug for Cloud {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Cloud")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .finish()
    }
}

/// Build the upstreams from config.
pub fn from_config(
    cfg: &BTreeMap<String, CloudConfig>,
    http: &reqwest::Client,
) -> Result<Vec<Cloud>, CloudConfigError> {
    let mut out = Vec::new();
    let proxied = PROXY_VARS
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()));
    let mut transport: Option<Transport> = None;
    for (name, c) in cfg {
        let err = |m: String| CloudConfigError {
            name: name.clone(),
            message: m,
        };
        c.check(name)?;
        // The key is held as a secret (never printed, wiped when dropped) until it becomes the
        // sensitive Authorization header value.
        let key: Option<secrecy::SecretString> = match (&c.api_key_env, &c.api_key_file) {
            // (Both set is refused by `check`.)
            (Some(v), _) => Some(
                std::env::var(v)
                    .map_err(|_| err(format!("environment variable {v} is not set")))?
                    .into(),
            ),
            (None, Some(p)) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| err(format!("cannot read api_key_file {}: {e}", p.display())))?
                    .trim()
                    .into(),
            ),
            (None, None) => None,
        };
        let base_url = c.base_url.trim_end_matches('/').to_string();
        let url = |e: Endpoint| {
            let path = e.path().trim_start_matches("/v1");
            let s = format!("{base_url}{path}");
            let bad = |e: String| err(format!("base_url {:?} is not a valid URL: {e}", c.base_url));
            reqwest::Url::parse(&s).map_err(|e| bad(e.to_string()))?;
            s.parse::<Uri>().map_err(|e| bad(e.to_string()))
        };
        let urls = [
            url(Endpoint::Chat)?,
            url(Endpoint::Completions)?,
            url(Endpoint::Embeddings)?,
        ];
        let auth = key
            .map(|k| {
                use secrecy::ExposeSecret;
                let mut v = HeaderValue::try_from(format!("Bearer {}", k.expose_secret()))
                    .map_err(
                        |_| err("the API key has characters not allowed in a header".into()),
                    )?;
                v.set_sensitive(true);
                Ok(v)
            })
            .transpose()?;
        let http = match &transport {
            Some(t) => t.clone(),
            None => {
                let t = if proxied {
                    Transport::Reqwest(http.clone())
                } else {
                    Transport::Hyper(Box::new(hyper_client().map_err(err)?))
                };
                transport = Some(t.clone());
                t
            }
        };
        out.push(Cloud {
            name: name.clone(),
            urls,
            base_url,
            auth,
            models: c.models.clone(),
            policy: c.redaction,
            http,
        });
    }
    Ok(out)
}

/// The upstream serving `model`, if a cloud one does.
pub fn route<'a>(clouds: &'a [Cloud], model: &str) -> Option<&'a Cloud> {
    clouds.iter().find(|c| c.serves_model(model))
}

/// A cloud answer.
pub enum CloudAnswer {
    Complete {
        status: u16,
        body: Bytes,
        usage: Usage,
    },
    Stream {
        status: u16,
        items: ItemStream,
    },
}

/// The one SSE splitter (shared with the backend manager's stream forwarder).
pub use securellm_common::sse::{EventTooLarge, MAX_EVENT_BYTES, SseSplitter};

/// The usage an SSE payload carries, and whether it is a usage-only chunk (empty `choices`).
fn payload_usage(d: &[u8]) -> Option<(Usage, bool)> {
    // Cheap test first: most chunks carry no usage.
    if !d.windows(7).any(|w| w == b"\"usage\"") {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(d).ok()?;
    let u = v.get("usage").filter(|u| u.is_object())?;
    let n = |k: &str| {
        u.get(k)
            .and_then(serde_json::Value::as_u64)
            .map_or(0, |x| x.min(u64::from(u32::MAX)) as u32)
    };
    let only = v
        .get("choices")
        .and_then(serde_json::Value::as_array)
        .is_some_and(Vec::is_empty);
    Some((
        Usage {
            prompt: n("prompt_tokens"),
            completion: n("completion_tokens"),
        },
        only,
    ))
}

/// Turn an upstream SSE response into stream items. `relay_usage`: the client asked for the
/// usage-only chunk (the gateway always asks the upstream for it, to count tokens).
/// How long a cloud stream may go without a byte once it has started.
const CLOUD_STALL: Duration = Duration::from_secs(60);

fn sse_items(
    name: String,
    bytes: BoxStream<'static, Result<Bytes, ()>>,
    relay_usage: bool,
    deadline: tokio::time::Instant,
) -> ItemStream {
    let fail = move |name: &str, why: &str| {
        Err(ApiError::new(
            axum::http::StatusCode::BAD_GATEWAY,
            "server_error",
            format!("upstream {name} {why}"),
        ))
    };
    let s = futures::stream::unfold(
        (
            bytes,
            SseSplitter::default(),
            std::collections::VecDeque::new(),
            false,
        ),
        move |(mut bytes, mut split, mut queue, ended)| {
            let name = name.clone();
            async move {
                loop {
                    if let Some(item) = queue.pop_front() {
                        return Some((item, (bytes, split, queue, ended)));
                    }
                    if ended || split.done() {
                        return None;
                    }
                    let next = tokio::time::timeout_at(
                        deadline.min(tokio::time::Instant::now() + CLOUD_STALL),
                        bytes.next(),
                    )
                    .await;
                    let why = match next {
                        Ok(Some(Ok(chunk))) => match split.push(&chunk) {
                            Ok(payloads) => {
                                for d in payloads {
                                    match payload_usage(&d) {
                                        Some((u, only)) => {
                                            queue.push_back(Ok(StreamItem::Usage(u)));
                                            if !only || relay_usage {
                                                queue.push_back(Ok(StreamItem::Data(d)));
                                            }
                                        }
                                        None => queue.push_back(Ok(StreamItem::Data(d))),
                                    }
                                }
                                continue;
                            }
                            Err(EventTooLarge) => "sent an event over the size limit",
                        },
                        Ok(Some(Err(_))) => "broke the connection mid-stream",
                        // A stream that ends without `[DONE]` was cut short.
                        Ok(None) => "ended the stream before [DONE]",
                        Err(_) if tokio::time::Instant::now() >= deadline => {
                            "did not finish the stream within the request timeout"
                        }
                        Err(_) => "sent nothing for 60 s mid-stream",
                    };
                    queue.push_back(fail(&name, why));
                    return queue.pop_front().map(|i| (i, (bytes, split, queue, true)));
                }
            }
        },
    );
    Box::pin(s)
}

/// The `usage` member of an OpenAI answer, read without building the whole document (only the
/// usage numbers are kept; everything else is skipped by the parser).
fn usage_of(body: &[u8]) -> Usage {
    #[derive(Deserialize)]
    struct Doc {
        usage: Option<Counts>,
    }
    #[derive(Deserialize)]
    struct Counts {
        #[serde(default)]
        prompt_tokens: u64,
        #[serde(default)]
        completion_tokens: u64,
    }
    let clamp = |x: u64| x.min(u64::from(u32::MAX)) as u32;
    match serde_json::from_slice::<Doc>(body) {
        Ok(Doc { usage: Some(c) }) => Usage {
            prompt: clamp(c.prompt_tokens),
            completion: clamp(c.completion_tokens),
        },
        _ => Usage::default(),
    }
}

impl Cloud {
    /// Forward a (redacted) body. `relay_usage` (streams): the client asked for the usage chunk.
    pub async fn call(
        &self,
        endpoint: Endpoint,
        body: Bytes,
        request_id: &str,
        stream: bool,
        relay_usage: bool,
        timeout: Duration,
    ) -> Result<CloudAnswer, ApiError> {
        let url = match endpoint {
            Endpoint::Chat => &self.urls[0],
            Endpoint::Completions => &self.urls[1],
            Endpoint::Embeddings => &self.urls[2],
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let unreachable = || {
            ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                format!("upstream {} is unreachable", self.name),
            )
            .code("upstream_unreachable")
            .header("retry-after", "1")
        };
        let timed_out = || {
            ApiError::new(
                axum::http::StatusCode::GATEWAY_TIMEOUT,
                "server_error",
                format!("upstream {} timed out", self.name),
            )
        };
        let resp = match &self.http {
            Transport::Hyper(client) => {
                let mut req = axum::http::Request::post(url.clone())
                    .header(header::CONTENT_TYPE, "application/json")
                    .header(header::ACCEPT, "*/*")
                    .header("x-request-id", request_id);
                if let Some(a) = &self.auth {
                    req = req.header(header::AUTHORIZATION, a.clone());
                }
                let mut req = req.body(Full::new(body)).map_err(|_| unreachable())?;
                // The request's trace continues at the provider (W3C `traceparent`).
                securellm_common::telemetry::inject_http(req.headers_mut());
                // Our trace id leaves the machine, the caller's vendor state does not.
                req.headers_mut().remove("tracestate");
                let sent = client.request(req);
                let resp = if stream {
                    sent.await
                } else {
                    tokio::time::timeout_at(deadline, sent)
                        .await
                        .map_err(|_| timed_out())?
                };
                Response::Hyper(resp.map_err(|_| unreachable())?)
            }
            Transport::Reqwest(client) => {
                let mut req = client
                    .post(url.to_string())
                    .header("content-type", "application/json")
                    .header("x-request-id", request_id)
                    .body(body);
                if let Some(a) = &self.auth {
                    req = req.header(header::AUTHORIZATION, a.clone());
                }
                if !stream {
                    req = req.timeout(timeout);
                }
                // What `send` does, with the trace context added in between.
                let mut req = req.build().map_err(|_| unreachable())?;
                securellm_common::telemetry::inject_http(req.headers_mut());
                // Our trace id leaves the machine, the caller's vendor state does not.
                req.headers_mut().remove("tracestate");
                let send = client.execute(req);
                Response::Reqwest(send.await.map_err(|e| {
                    if e.is_timeout() {
                        timed_out()
                    } else {
                        unreachable()
                    }
                })?)
            }
        };
        let status = resp.status();
        // The upstream refusing the *gateway's* credentials or quota is not the caller's 401 /
        // 429: say so in our words (its body may name the provider account).
        match status {
            401 | 403 | 407 => {
                return Err(ApiError::new(
                    axum::http::StatusCode::BAD_GATEWAY,
                    "server_error",
                    format!(
                        "upstream {} refused the gateway's credentials (HTTP {status})",
                        self.name
                    ),
                )
                .code("upstream_auth_failed"));
            }
            429 => {
                let retry = resp
                    .retry_after()
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(1);
                return Err(ApiError::new(
                    axum::http::StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    format!(
                        "upstream {} is rate-limiting the gateway; retry later",
                        self.name
                    ),
                )
                .code("upstream_rate_limited")
                .header("retry-after", retry.to_string()));
            }
            _ => {}
        }
        if stream && status < 400 {
            return Ok(CloudAnswer::Stream {
                status,
                items: sse_items(self.name.clone(), resp.into_stream(), relay_usage, deadline),
            });
        }
        let body = resp.collect(deadline).await.map_err(|_| {
            ApiError::new(
                axum::http::StatusCode::BAD_GATEWAY,
                "server_error",
                format!("upstream {} broke the connection", self.name),
            )
        })?;
        let usage = usage_of(&body);
        Ok(CloudAnswer::Complete {
            status,
            body,
            usage,
        })
    }
}

/// An upstream's answer, from either transport.
enum Response {
    Hyper(axum::http::Response<hyper::body::Incoming>),
    Reqwest(reqwest::Response),
}

impl Response {
    fn status(&self) -> u16 {
        match self {
            Response::Hyper(r) => r.status().as_u16(),
            Response::Reqwest(r) => r.status().as_u16(),
        }
    }

    fn retry_after(&self) -> Option<&HeaderValue> {
        match self {
            Response::Hyper(r) => r.headers().get(header::RETRY_AFTER),
            Response::Reqwest(r) => r.headers().get(header::RETRY_AFTER),
        }
    }

    /// The whole body, by `deadline` (hyper; reqwest's own timeout bounds its body).
    async fn collect(self, deadline: tokio::time::Instant) -> Result<Bytes, ()> {
        match self {
            Response::Hyper(r) => {
                match tokio::time::timeout_at(deadline, r.into_body().collect()).await {
                    Ok(Ok(b)) => Ok(b.to_bytes()),
                    _ => Err(()),
                }
            }
            Response::Reqwest(r) => r.bytes().await.map_err(|_| ()),
        }
    }

    /// The body's bytes as they arrive.
    fn into_stream(self) -> BoxStream<'static, Result<Bytes, ()>> {
        match self {
            Response::Hyper(r) => http_body_util::BodyDataStream::new(r.into_body())
                .map(|c| c.map_err(|_| ()))
                .boxed(),
            Response::Reqwest(r) => r.bytes_stream().map(|c| c.map_err(|_| ())).boxed(),
        }
    }
}

impl Cloud {
    /// Does one of its model patterns match `model`?
    pub fn serves_model(&self, model: &str) -> bool {
        self.models.iter().any(|p| glob(p, model))
    }
}

impl Upstream for Cloud {
    fn name(&self) -> &str {
        &self.name
    }

    fn reach(&self) -> Reach {
        Reach::Remote(self.policy)
    }

    fn serves(&self, model: &str) -> bool {
        self.serves_model(model)
    }

    /// The body says whether to stream; a stream always asks for the usage chunk, to count
    /// tokens (relayed only when the client asked for it).
    fn prepare(&self, endpoint: Endpoint, body: &mut serde_json::Value, stream: bool) {
        if let serde_json::Value::Object(m) = body
            && endpoint != Endpoint::Embeddings
        {
            m.insert("stream".into(), serde_json::Value::Bool(stream));
            if stream {
                m.insert(
                    "stream_options".into(),
                    serde_json::json!({"include_usage": true}),
                );
            }
        }
    }

    fn complete<'a>(&'a self, r: UpstreamRequest<'a>) -> BoxFuture<'a, Result<Answer, ApiError>> {
        Box::pin(async move {
            match self
                .call(
                    r.endpoint,
                    r.body,
                    r.request_id,
                    false,
                    r.relay_usage,
                    r.timeout,
                )
                .await?
            {
                CloudAnswer::Complete {
                    status,
                    body,
                    usage,
                } => Ok(Answer {
                    status,
                    body,
                    usage,
                }),
                // `call` streams only when asked to.
                CloudAnswer::Stream { .. } => Err(ApiError::new(
                    axum::http::StatusCode::BAD_GATEWAY,
                    "server_error",
                    format!("upstream {} answered with a stream", self.name),
                )),
            }
        })
    }

    fn stream<'a>(
        &'a self,
        r: UpstreamRequest<'a>,
    ) -> BoxFuture<'a, Result<StreamAnswer, ApiError>> {
        Box::pin(async move {
            Ok(
                match self
                    .call(
                        r.endpoint,
                        r.body,
                        r.request_id,
                        true,
                        r.relay_usage,
                        r.timeout,
                    )
                    .await?
                {
                    CloudAnswer::Complete {
                        status,
                        body,
                        usage,
                    } => StreamAnswer::Refused {
                        status,
                        body,
                        usage,
                    },
                    CloudAnswer::Stream { items, .. } => StreamAnswer::Streaming(items),
                },
            )
        })
    }

    /// Its exact model names (patterns are not listable).
    fn models(&self) -> BoxFuture<'_, Result<Vec<ModelEntry>, ApiError>> {
        let models = self
            .models
            .iter()
            .filter(|m| !m.contains('*') && !m.contains('?'))
            .map(|m| ModelEntry {
                id: m.clone(),
                owned_by: self.name.clone(),
                created: 0,
                upstream: self.name.clone(),
                registry_id: String::new(),
            })
            .collect();
        Box::pin(async move { Ok(models) })
    }
}

#[cfg(test)]
mod sse_tests {
    use super::*;

    #[test]
    fn usage_is_found_in_usage_chunks_only() {
        assert_eq!(
            payload_usage(br#"{"choices":[{"delta":{"content":"usage"}}]}"#),
            None
        );
        assert_eq!(
            payload_usage(br#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}"#),
            Some((
                Usage {
                    prompt: 3,
                    completion: 5
                },
                true
            ))
        );
        assert_eq!(
            payload_usage(br#"{"choices":[{"delta":{}}],"usage":{"prompt_tokens":1}}"#),
            Some((
                Usage {
                    prompt: 1,
                    completion: 0
                },
                false
            ))
        );
        assert_eq!(payload_usage(br#"{"choices":[],"usage":null}"#), None);
    }
}
