//! Forwarding OpenAI-shaped requests to an upstream over pooled HTTP connections.
//!
//! The body is parsed once to validate it and to set `model`, `stream` and (for streams)
//! `stream_options.include_usage`; everything else passes through. Responses come back byte for
//! byte. Streams are parsed as server-sent events and relayed one `data:` payload at a time, never
//! buffered. Dropping the returned future or stream drops the upstream request, which cancels it.
//! The engine's per-instance API key, when it has one, goes with every request as
//! `Authorization: Bearer`.

use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use securellm_common::sse::{EventTooLarge, MAX_EVENT_BYTES, SseSplitter};
use serde_json::{Map, Value};

/// The OpenAI endpoint a request is for (shared with the gateway).
pub use securellm_common::openai::Endpoint;

/// Why a request could not be forwarded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ForwardError {
    #[error("invalid request body: {0}")]
    InvalidBody(String),
    #[error("upstream unreachable: {0}")]
    Unreachable(String),
    #[error("upstream did not answer within the deadline")]
    Timeout,
    #[error("upstream connection broke: {0}")]
    Broken(String),
}

/// Token usage as OpenAI reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u32,
    pub completion: u32,
    pub total: u32,
}

/// `usage` of a response or chunk, if present.
pub fn usage_of(v: &Value) -> Option<Usage> {
    let u = v.get("usage")?.as_object()?;
    let n = |k: &str| {
        u.get(k)
            .and_then(Value::as_u64)
            .map(|x| x.min(u64::from(u32::MAX)) as u32)
    };
    Some(Usage {
        prompt: n("prompt_tokens").unwrap_or(0),
        completion: n("completion_tokens").unwrap_or(0),
        total: n("total_tokens").unwrap_or(0),
    })
}

/// The `model` member of a body, if it is a string.
pub fn body_model(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v.get("model")?.as_str().map(str::to_string)
}

/// A validated request body with `stream` / `stream_options` set, waiting for its `model`.
pub struct PreparedBody(Map<String, Value>);

impl PreparedBody {
    /// Set `model` to the name the upstream serves and serialise.
    pub fn finish(mut self, served_name: &str) -> Result<Bytes, ForwardError> {
        self.0
            .insert("model".into(), Value::String(served_name.to_string()));
        serde_json::to_vec(&Value::Object(self.0))
            .map(Bytes::from)
            .map_err(|e| ForwardError::InvalidBody(e.to_string()))
    }
}

/// Validate and rewrite a request body (one parse). Returns it, and whether the caller itself
/// asked for usage in the stream.
pub fn validate_body(
    body: &[u8],
    endpoint: Endpoint,
    stream: bool,
) -> Result<(PreparedBody, bool), ForwardError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ForwardError::InvalidBody(format!("not JSON: {e}")))?;
    let Value::Object(mut m) = v else {
        return Err(ForwardError::InvalidBody("must be a JSON object".into()));
    };
    let need = endpoint.required_member();
    match (endpoint, m.get(need)) {
        (_, None) => {
            return Err(ForwardError::InvalidBody(format!("`{need}` is required")));
        }
        (Endpoint::Chat, Some(v)) if !v.is_array() => {
            return Err(ForwardError::InvalidBody(
                "`messages` must be an array".into(),
            ));
        }
        (Endpoint::Completions | Endpoint::Embeddings, Some(v))
            if !(v.is_string() || v.is_array()) =>
        {
            return Err(ForwardError::InvalidBody(format!(
                "`{need}` must be a string or an array"
            )));
        }
        _ => {}
    }
    for (k, want) in [
        ("max_tokens", "a number"),
        ("temperature", "a number"),
        ("n", "a number"),
    ] {
        if let Some(v) = m.get(k)
            && !v.is_number()
            && !v.is_null()
        {
            return Err(ForwardError::InvalidBody(format!("`{k}` must be {want}")));
        }
    }
    let mut caller_wants_usage = false;
    if endpoint != Endpoint::Embeddings {
        m.insert("stream".into(), Value::Bool(stream));
        if stream {
            let opts = m
                .entry("stream_options")
                .or_insert_with(|| Value::Object(Map::new()));
            if !opts.is_object() {
                *opts = Value::Object(Map::new());
            }
            if let Value::Object(o) = opts {
                caller_wants_usage = o
                    .get("include_usage")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                o.insert("include_usage".into(), Value::Bool(true));
            }
        } else {
            m.remove("stream_options");
        }
    }
    Ok((PreparedBody(m), caller_wants_usage))
}

/// [`validate_body`] and [`PreparedBody::finish`] in one step.
pub fn prepare_body(
    body: &[u8],
    endpoint: Endpoint,
    served_name: &str,
    stream: bool,
) -> Result<(Bytes, bool), ForwardError> {
    let (b, usage) = validate_body(body, endpoint, stream)?;
    Ok((b.finish(served_name)?, usage))
}

fn send_error(e: reqwest::Error) -> ForwardError {
    if e.is_timeout() {
        ForwardError::Timeout
    } else if e.is_connect() {
        ForwardError::Unreachable(e.to_string())
    } else {
        ForwardError::Broken(e.to_string())
    }
}

/// A complete (non-streaming) answer.
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
    pub usage: Option<Usage>,
}

/// `POST base+path` with the engine's API key, if any, and the current span's trace context.
fn request(
    http: &reqwest::Client,
    base: &str,
    api_key: Option<&str>,
    endpoint: Endpoint,
) -> reqwest::RequestBuilder {
    // The trace goes on to the engine (a traced engine continues it).
    let mut headers = reqwest::header::HeaderMap::new();
    securellm_common::telemetry::inject_http(&mut headers);
    let req = http
        .post(format!("{base}{}", endpoint.path()))
        .headers(headers);
    match api_key {
        Some(k) => req.bearer_auth(k),
        None => req,
    }
}

/// POST and wait for the whole answer.
pub async fn post(
    http: &reqwest::Client,
    base: &str,
    api_key: Option<&str>,
    endpoint: Endpoint,
    body: Bytes,
    request_id: &str,
    timeout: Option<Duration>,
) -> Result<Answer, ForwardError> {
    let mut req = request(http, base, api_key, endpoint)
        .header("content-type", "application/json")
        .header("x-request-id", request_id)
        .body(body);
    if let Some(t) = timeout {
        req = req.timeout(t);
    }
    let resp = req.send().await.map_err(send_error)?;
    let status = resp.status().as_u16();
    let body = resp.bytes().await.map_err(send_error)?;
    let usage = serde_json::from_slice::<Value>(&body)
        .ok()
        .as_ref()
        .and_then(usage_of);
    Ok(Answer {
        status,
        body,
        usage,
    })
}

/// A streaming answer: the status, and either the error body or the SSE payloads.
pub struct StreamAnswer {
    pub status: u16,
    pub error_body: Option<Bytes>,
    pub events: std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, ForwardError>> + Send>>,
}

/// POST with `stream: true` and relay `data:` payloads as they arrive (`[DONE]` ends the stream
/// and is not yielded).
pub async fn post_stream(
    http: &reqwest::Client,
    base: &str,
    api_key: Option<&str>,
    endpoint: Endpoint,
    body: Bytes,
    request_id: &str,
    first_byte_timeout: Option<Duration>,
) -> Result<StreamAnswer, ForwardError> {
    let req = request(http, base, api_key, endpoint)
        .header("content-type", "application/json")
        .header("accept", "text/event-stream")
        .header("x-request-id", request_id)
        .body(body);
    let send = req.send();
    let resp = match first_byte_timeout {
        Some(t) => tokio::time::timeout(t, send)
            .await
            .map_err(|_| ForwardError::Timeout)?,
        None => send.await,
    }
    .map_err(send_error)?;
    let status = resp.status().as_u16();
    if status >= 400 {
        let body = resp.bytes().await.map_err(send_error)?;
        return Ok(StreamAnswer {
            status,
            error_body: Some(body),
            events: Box::pin(futures::stream::empty()),
        });
    }
    let mut bytes = resp.bytes_stream();
    let events = async_stream(move |tx| async move {
        let mut splitter = SseSplitter::default();
        while let Some(chunk) = bytes.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    let _ = tx.send(Err(ForwardError::Broken(e.to_string()))).await;
                    return;
                }
            };
            let payloads = match splitter.push(&chunk) {
                Ok(p) => p,
                Err(EventTooLarge) => {
                    let _ = tx
                        .send(Err(ForwardError::Broken(format!(
                            "the engine sent an event over {MAX_EVENT_BYTES} bytes"
                        ))))
                        .await;
                    return;
                }
            };
            for d in payloads {
                if tx.send(Ok(d)).await.is_err() {
                    return;
                }
            }
            if splitter.done() {
                return;
            }
        }
        let _ = tx
            .send(Err(ForwardError::Broken(
                "the stream ended before [DONE]".into(),
            )))
            .await;
    });
    Ok(StreamAnswer {
        status,
        error_body: None,
        events,
    })
}

/// A stream fed by a task (the task stops when the stream is dropped).
fn async_stream<F, Fut>(
    f: F,
) -> std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, ForwardError>> + Send>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Bytes, ForwardError>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let task = tokio::spawn(f(tx));
    let guard = tokio_util::task::AbortOnDropHandle::new(task);
    Box::pin(
        tokio_stream::wrappers::ReceiverStream::new(rx).map(move |x| {
            let _ = &guard;
            x
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What llama-server sends (keep-alive comments, CRLF, multi-line data, `[DONE]`) comes
    /// through the shared splitter as the forwarder reads it.
    #[test]
    fn engine_streams_split_into_payloads_and_end_at_done() {
        let mut p = SseSplitter::default();
        let mut all = Vec::new();
        for part in [
            &b": keep-alive\n\nda"[..],
            b"ta: {\"a\":1}\r\n\r\ndata: x\ndata: y\n\n",
            b"data: [DONE]\n\n",
        ] {
            all.extend(p.push(part).unwrap());
        }
        assert_eq!(
            all,
            vec![
                Bytes::from_static(b"{\"a\":1}"),
                Bytes::from_static(b"x\ny"),
            ]
        );
        assert!(p.done());
    }

    /// With trace export on, a forward carries the current span's context to the engine as a W3C
    /// `traceparent` of the same trace (so a traced engine continues it).
    #[tokio::test]
    async fn a_forward_sends_the_current_trace_to_the_engine() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tracing::Instrument;
        // A collector nobody runs: spans are dropped, requests never wait for it.
        let _guard = securellm_common::telemetry::init_service(
            "backend-manager-test",
            "warn",
            &securellm_common::telemetry::TelemetryConfig {
                otlp_endpoint: Some("http://127.0.0.1:1".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(securellm_common::telemetry::enabled());
        // An engine that records the request head and answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let engine = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "the request ended early");
                head.extend_from_slice(&buf[..n]);
            }
            let body = br#"{"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#;
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            s.write_all(answer.as_bytes()).await.unwrap();
            s.write_all(body).await.unwrap();
            String::from_utf8_lossy(&head).to_lowercase()
        });
        let span = tracing::info_span!(target: "backend_manager", "test.forward");
        let want = span
            .in_scope(|| securellm_common::telemetry::trace_id(None))
            .expect("the span has a trace id");
        securellm_common::tls::install_crypto_provider();
        let http = reqwest::Client::new();
        let (body, _) = prepare_body(br#"{"messages":[]}"#, Endpoint::Chat, "tiny", false).unwrap();
        let a = post(&http, &base, None, Endpoint::Chat, body, "req-1", None)
            .instrument(span)
            .await
            .unwrap();
        assert_eq!(a.status, 200);
        assert_eq!(a.usage.unwrap().completion, 2);
        let head = engine.await.unwrap();
        let tp = head
            .lines()
            .find_map(|l| l.strip_prefix("traceparent: "))
            .unwrap_or_else(|| panic!("no traceparent in\n{head}"));
        assert_eq!(
            securellm_common::telemetry::parse_traceparent(tp).as_deref(),
            Some(want.as_str()),
            "{tp}"
        );
    }

    #[test]
    fn body_is_validated_and_rewritten() {
        let (b, wants) = prepare_body(
            br#"{"model":"x","messages":[],"temperature":0}"#,
            Endpoint::Chat,
            "tiny",
            true,
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["model"], "tiny");
        assert_eq!(v["stream"], true);
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["temperature"], 0);
        assert!(!wants);
        let (_, wants) = prepare_body(
            br#"{"messages":[],"stream_options":{"include_usage":true}}"#,
            Endpoint::Chat,
            "t",
            true,
        )
        .unwrap();
        assert!(wants);
        for (bad, why) in [
            (&b"not json"[..], "not JSON"),
            (b"[1,2]", "object"),
            (b"{}", "`messages` is required"),
            (br#"{"messages":"hi"}"#, "array"),
            (br#"{"messages":[],"max_tokens":"ten"}"#, "max_tokens"),
        ] {
            let e = prepare_body(bad, Endpoint::Chat, "t", false)
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{e}");
        }
        assert!(prepare_body(br#"{"input":"hello"}"#, Endpoint::Embeddings, "t", false).is_ok());
        assert!(prepare_body(br#"{"prompt":5}"#, Endpoint::Completions, "t", false).is_err());
    }
}
