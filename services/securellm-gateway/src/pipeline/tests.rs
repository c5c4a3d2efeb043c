//! The request path through an in-memory [`Upstream`]: no backend manager, no llama-server, no
//! network. Each test drives [`authenticate`] / [`infer`] / [`list_models`] as the transports do
//! and checks what the upstream saw and what the audit log recorded.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};

use super::*;
use crate::audit::{AuditFilter, AuditLog, AuditRow};
use crate::auth::keys::{KeyStore, NewKey};
use crate::error::ApiError;
use crate::redact::{Policy, Redactor};
use crate::state::AppState;
use crate::upstream::{Answer as Upstreamed, BoxFuture, Reach, Upstream, Upstreams};

/// What the in-memory upstream answers, scripted per call.
enum Script {
    Complete(u16, &'static str, Usage),
    Fail(ApiError),
    /// A stream of these items (`Waiting` with this queue position when `Some`).
    Stream(Vec<Result<StreamItem, ApiError>>, Option<Option<u32>>),
    Refused(u16, &'static str),
    /// Never answers.
    Hang,
}

/// What the upstream was given.
#[derive(Clone, Debug)]
struct Seen {
    endpoint: Endpoint,
    model: String,
    body: Value,
    request_id: String,
    caller: String,
    streamed: bool,
    relay_usage: bool,
}

struct Memory {
    name: &'static str,
    reach: Reach,
    patterns: Vec<&'static str>,
    models: Vec<&'static str>,
    script: Mutex<VecDeque<Script>>,
    seen: Mutex<Vec<Seen>>,
}

impl Memory {
    fn new(name: &'static str, reach: Reach, patterns: &[&'static str]) -> Arc<Self> {
        Arc::new(Self {
            name,
            reach,
            patterns: patterns.to_vec(),
            models: patterns.to_vec(),
            script: Mutex::new(VecDeque::new()),
            seen: Mutex::new(Vec::new()),
        })
    }

    fn then(&self, s: Script) {
        self.script.lock().unwrap().push_back(s);
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn record(&self, r: &UpstreamRequest<'_>, streamed: bool) -> Script {
        self.seen.lock().unwrap().push(Seen {
            endpoint: r.endpoint,
            model: r.model.to_string(),
            body: serde_json::from_slice(&r.body).unwrap(),
            request_id: r.request_id.to_string(),
            caller: r.caller.to_string(),
            streamed,
            relay_usage: r.relay_usage,
        });
        self.script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Script::Complete(200, r#"{"ok":true}"#, Usage::default()))
    }
}

impl Upstream for Memory {
    fn name(&self) -> &str {
        self.name
    }

    fn reach(&self) -> Reach {
        self.reach
    }

    fn serves(&self, model: &str) -> bool {
        self.patterns
            .iter()
            .any(|p| crate::auth::keys::glob(p, model))
    }

    fn complete<'a>(
        &'a self,
        r: UpstreamRequest<'a>,
    ) -> BoxFuture<'a, Result<Upstreamed, ApiError>> {
        let script = self.record(&r, false);
        Box::pin(async move {
            match script {
                Script::Complete(status, body, usage) => Ok(Upstreamed {
                    status,
                    body: Bytes::from_static(body.as_bytes()),
                    usage,
                }),
                Script::Fail(e) => Err(e),
                Script::Hang => std::future::pending().await,
                _ => panic!("a stream was scripted for a complete call"),
            }
        })
    }

    fn stream<'a>(
        &'a self,
        r: UpstreamRequest<'a>,
    ) -> BoxFuture<'a, Result<StreamAnswer, ApiError>> {
        let script = self.record(&r, true);
        Box::pin(async move {
            match script {
                Script::Stream(items, None) => Ok(StreamAnswer::Streaming(Box::pin(
                    futures::stream::iter(items),
                ))),
                Script::Stream(items, Some(queue_position)) => Ok(StreamAnswer::Waiting {
                    items: Box::pin(futures::stream::iter(items)),
                    queue_position,
                }),
                Script::Refused(status, body) => Ok(StreamAnswer::Refused {
                    status,
                    body: Bytes::from_static(body.as_bytes()),
                    usage: Usage::default(),
                }),
                Script::Fail(e) => Err(e),
                Script::Hang => std::future::pending().await,
                Script::Complete(..) => panic!("a complete answer was scripted for a stream"),
            }
        })
    }

    fn models(&self) -> BoxFuture<'_, Result<Vec<ModelEntry>, ApiError>> {
        let out = self
            .models
            .iter()
            .filter(|m| !m.contains('*'))
            .map(|m| ModelEntry {
                id: m.to_string(),
                owned_by: self.name.to_string(),
                created: 0,
                upstream: self.name.to_string(),
                registry_id: String::new(),
            })
            .collect();
        Box::pin(async move { Ok(out) })
    }
}

struct Fixture {
    st: Shared,
    local: Arc<Memory>,
    cloud: Arc<Memory>,
    _dir: tempfile::TempDir,
}

async fn fixture(policy: Policy, timeout: Duration) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let local = Memory::new("local", Reach::Local, &["local-*", "tiny"]);
    let cloud = Memory::new("acme", Reach::Remote(policy), &["gpt-4o", "gpt-*"]);
    let st = Arc::new(AppState {
        keys: KeyStore::open(&dir.path().join("keys.db")).await.unwrap(),
        jwt: None,
        upstreams: Upstreams {
            remote: vec![cloud.clone() as Arc<dyn Upstream>],
            local: local.clone(),
        },
        redactor: Redactor::new(&[]).unwrap(),
        audit: AuditLog::open(&dir.path().join("audit.db")).await.unwrap(),
        limits: crate::limits::ratelimit::RateLimiter::new(),
        shared_limits: None,
        inflight: crate::limits::inflight::InFlight::new(64, 64),
        audit_sync: false,
        body_read_timeout: Duration::from_secs(5),
        request_timeout: timeout,
        max_tokens_cap: 512,
    });
    Fixture {
        st,
        local,
        cloud,
        _dir: dir,
    }
}

impl Fixture {
    async fn key(&self, k: NewKey) -> (String, Caller) {
        let (secret, _) = self.st.keys.create(k).await.unwrap();
        let caller = authenticate(
            &self.st,
            "10.0.0.7",
            "req-auth",
            "/v1/chat/completions",
            Some(&format!("Bearer {secret}")),
            None,
        )
        .unwrap();
        (secret, caller)
    }

    async fn caller(&self) -> Caller {
        self.key(NewKey {
            name: "k".into(),
            models: vec!["*".into()],
            ..Default::default()
        })
        .await
        .1
    }

    async fn chat(&self, caller: &Caller, rid: &str, body: Value) -> Result<Answer, ApiError> {
        infer(
            &self.st,
            caller,
            rid,
            "/v1/chat/completions",
            Ok(Bytes::from(body.to_string())),
            Endpoint::Chat,
            Mode::FromBody,
        )
        .await
    }

    async fn rows(&self) -> Vec<AuditRow> {
        self.st.audit.flush().await;
        self.st.audit.query(AuditFilter::default()).await.unwrap()
    }

    async fn row(&self, rid: &str) -> AuditRow {
        let rows = self.rows().await;
        let mut mine = rows.into_iter().filter(|r| r.entry.request_id == rid);
        let row = mine
            .next()
            .unwrap_or_else(|| panic!("no audit row for {rid}"));
        assert!(mine.next().is_none(), "more than one audit row for {rid}");
        row
    }
}

/// A whole answer's status and body.
fn whole(a: Answer) -> (u16, Bytes) {
    match a.reply {
        Reply::Complete { status, body, .. } => (status, body),
        Reply::Stream(_) => panic!("expected a complete answer"),
    }
}

/// Every item of a streamed answer.
async fn drain(a: Answer) -> Vec<Result<StreamItem, ApiError>> {
    match a.reply {
        Reply::Stream(s) => s.collect().await,
        Reply::Complete { status, .. } => panic!("expected a stream, got a complete {status}"),
    }
}

fn chat_body(model: &str, content: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": content}]})
}

fn opts() -> (Policy, Duration) {
    (Policy::Redact, Duration::from_secs(30))
}

#[tokio::test]
async fn a_refused_credential_is_audited_and_never_reaches_an_upstream() {
    let (p, t) = opts();
    let f = fixture(p, t).await;
    let e = authenticate(
        &f.st,
        "10.0.0.9",
        "req-bad-key",
        "/v1/chat/completions",
        Some("Bearer sk-not-a-key"),
        None,
    )
    .unwrap_err();
    assert_eq!(e.status, StatusCode::UNAUTHORIZED);
    assert_eq!(e.code, Some("invalid_api_key"));
    let e = authenticate(&f.st, "10.0.0.9", "req-no-key", "/v1/models", None, None).unwrap_err();
    assert_eq!(e.status, StatusCode::UNAUTHORIZED);
    let row = f.row("req-bad-key").await;
    assert_eq!(
        (
            row.entry.status,
            row.entry.key_id.as_str(),
            row.entry.client_addr.as_str()
        ),
        (401, "", "10.0.0.9")
    );
    assert_eq!(row.entry.error_code, "invalid_api_key");
    assert!(f.local.seen().is_empty() && f.cloud.seen().is_empty());
}

#[tokio::test]
async fn a_model_outside_the_key_scope_is_not_found_and_never_forwarded() {
    let (p, t) = opts();
    let f = fixture(p, t).await;
    let (_, caller) = f
        .key(NewKey {
            name: "narrow".into(),
            models: vec!["local-*".into()],
            ..Default::default()
        })
        .await;
    let e = f
        .chat(&caller, "req-scope", chat_body("gpt-4o", "hi"))
        .await
        .err()
        .unwrap();
    assert_eq!(e.status, StatusCode::NOT_FOUND);
    let row = f.row("req-scope").await;
    assert_eq!(row.entry.status, 404);
    assert_eq!(row.entry.model, "gpt-4o");
    assert!(f.cloud.seen().is_empty() && f.local.seen().is_empty());
}

#[tokio::test]
async fn the_rate_limit_refuses_before_the_upstream() {
    let (p, t) = opts();
    let f = fixture(p, t).await;
    let (_, caller) = f
        .key(NewKey {
            name: "slow".into(),
            models: vec!["*".into()],
            rpm: Some(1),
            ..Default::default()
        })
        .await;
    let a = f
        .chat(&caller, "req-first", chat_body("local-a", "hi"))
        .await
        .unwrap();
    assert_eq!(whole(a).0, 200);
    let e = f
        .chat(&caller, "req-second", chat_body("local-a", "hi"))
        .await
        .err()
        .unwrap();
    assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(e.code, Some("rate_limit_exceeded"));
    assert!(e.headers.iter().any(|(k, _)| *k == "retry-after"));
    assert_eq!(
        f.local.seen().len(),
        1,
        "only the first request was forwarded"
    );
    let row = f.row("req-second").await;
    assert_eq!(
        (row.entry.status, row.entry.error_code.as_str()),
        (429, "rate_limit_exceeded")
    );
    assert_eq!(f.row("req-first").await.entry.status, 200);
}

#[tokio::test]
async fn a_remote_upstream_sees_redacted_prompts_and_request_ids_the_local_one_does_not() {
    let (p, t) = opts();
    let f = fixture(p, t).await;
    let caller = f.caller().await;
    let secret = format!("sk-{}", "Ab3".repeat(16));
    let prompt = format!("my key is {secret}");
    f.chat(&caller, &secret, chat_body("gpt-4o", &prompt))
        .await
        .unwrap();
    let seen = f.cloud.seen();
    assert_eq!(seen.len(), 1);
    let sent = seen[0].body.to_string();
    assert!(
        !sent.contains(&secret),
        "the secret left the machine: {sent}"
    );
    assert_eq!(
        seen[0].body["messages"][0]["content"],
        "my key is [REDACTED:openai_api_key]"
    );
    assert!(!seen[0].request_id.contains(&secret));
    let row = f.row(&secret).await;
    assert_eq!(
        (row.entry.upstream.as_str(), row.entry.redactions),
        ("acme", 2)
    );

    // The local backend manager is on this machine: the prompt goes as it is.
    f.chat(&caller, "req-local", chat_body("local-a", &prompt))
        .await
        .unwrap();
    let seen = f.local.seen();
    assert_eq!(seen[0].body["messages"][0]["content"], prompt.as_str());
    assert_eq!(seen[0].request_id, "req-local");
    let row = f.row("req-local").await;
    assert_eq!(
        (row.entry.upstream.as_str(), row.entry.redactions),
        ("local", 0)
    );
}

#[tokio::test]
async fn a_block_policy_refuses_secrets_before_the_upstream() {
    let f = fixture(Policy::Block, Duration::from_secs(30)).await;
    let caller = f.caller().await;
    let prompt = format!("my key is sk-{}", "Ab3".repeat(16));
    let e = f
        .chat(&caller, "req-block", chat_body("gpt-4o", &prompt))
        .await
        .err()
        .unwrap();
    assert_eq!(e.status, StatusCode::BAD_REQUEST);
    assert_eq!(e.code, Some("secret_detected"));
    assert!(!e.message.contains("Ab3Ab3"), "the error names kinds only");
    assert!(f.cloud.seen().is_empty());
    let row = f.row("req-block").await;
    assert_eq!(
        (row.entry.status, row.entry.error_code.as_str()),
        (400, "secret_detected")
    );
}

#[tokio::test]
async fn the_upstream_gets_the_validated_body_with_the_local_max_tokens_cap() {
    let (p, t) = opts();
    let f = fixture(p, t).await;
    let caller = f.caller().await;
    f.chat(&caller, "req-cap", chat_body("tiny", "hi"))
        .await
        .unwrap();
    f.chat(&caller, "req-cap-cloud", chat_body("gpt-4o", "hi"))
        .await
        .unwrap();
    let local = &f.local.seen()[0];
    assert_eq!(
        (local.endpoint, local.model.as_str(), local.caller.as_str()),
        (Endpoint::Chat, "tiny", caller.key.subject.as_str())
    );
    assert_eq!(local.body["max_tokens"], 512, "filled in for a local model");
    assert!(!local.streamed);
    let cloud = &f.cloud.seen()[0];
    assert!(
        cloud.body.get("max_tokens").is_none(),
        "not filled in for a cloud one"
    );
    // A body the schema refuses never leaves.
    let e = f
        .chat(
            &caller,
            "req-invalid",
            json!({"model": "tiny", "messages": "hi"}),
        )
        .await
        .err()
        .unwrap();
    assert_eq!(e.status, StatusCode::BAD_REQUEST);
    assert_eq!(f.local.seen().len(), 1);
    assert_eq!(f.row("req-invalid").await.entry.status, 400);
}

#[tokio::test]
async fn upstream_errors_keep_their_status_in_the_answer_and_the_audit_row() {
    let (p, t) = opts();
    let f = fixture(p, t).await;
    let caller = f.caller().await;
    f.local.then(Script::Fail(
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the backend manager is unreachable",
        )
        .code("upstream_unreachable"),
    ));
    let e = f
        .chat(&caller, "req-down", chat_body("local-a", "hi"))
        .await
        .err()
        .unwrap();
    assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
    let row = f.row("req-down").await;
    assert_eq!(
        (row.entry.status, row.entry.error_code.as_str()),
        (503, "upstream_unreachable")
    );

    // An answer with an error status is relayed as it is, and audited as an upstream error.
    f.local.then(Script::Complete(
        500,
        r#"{"error":{"message":"engine failed"}}"#,
        Usage::default(),
    ));
    let a = f
        .chat(&caller, "req-500", chat_body("local-a", "hi"))
        .await
        .unwrap();
    let (status, body) = whole(a);
    assert_eq!(status, 500);
    assert_eq!(&body[..], br#"{"error":{"message":"engine failed"}}"#);
    let row = f.row("req-500").await;
    assert_eq!(
        (row.entry.status, row.entry.error_code.as_str()),
        (500, "upstream_error")
    );

    // A stream refused at its start is a complete answer with the refusal's status.
    f.local.then(Script::Refused(
        404,
        r#"{"error":{"message":"no such model"}}"#,
    ));
    let mut body = chat_body("local-a", "hi");
    body["stream"] = json!(true);
    let a = f.chat(&caller, "req-refused", body).await.unwrap();
    assert_eq!(whole(a).0, 404);
    let row = f.row("req-refused").await;
    assert_eq!((row.entry.status, row.entry.streamed), (404, false));
}

#[tokio::test]
async fn usage_of_a_complete_answer_is_recorded() {
    let (p, t) = opts();
    let f = fixture(p, t).await;
    let caller = f.caller().await;
    f.local.then(Script::Complete(
        200,
        r#"{"choices":[]}"#,
        Usage {
            prompt: 7,
            completion: 5,
        },
    ));
    let a = f
        .chat(&caller, "req-usage", chat_body("local-a", "hi"))
        .await
        .unwrap();
    assert_eq!(
        (a.model.as_str(), a.upstream.as_str()),
        ("local-a", "local")
    );
    let (status, body) = whole(a);
    assert_eq!((status, &body[..]), (200, &br#"{"choices":[]}"#[..]));
    let row = f.row("req-usage").await;
    assert_eq!(
        (
            row.entry.status,
            row.entry.prompt_tokens,
            row.entry.completion_tokens,
            row.entry.streamed
        ),
        (200, 7, 5, false)
    );
    assert_eq!(row.entry.subject, caller.key.subject);
    assert_eq!(row.entry.key_id, caller.key.id);
    assert_eq!(row.entry.endpoint, "/v1/chat/completions");
}

#[tokio::test]
async fn a_stream_relays_progress_comments_and_chunks_then_records_its_usage() {
    let (p, t) = opts();
    let f = fixture(p, t).await;
    let caller = f.caller().await;
    f.local.then(Script::Stream(
        vec![
            Ok(StreamItem::Comment(
                "queued position=2 queue_length=3 model=local-a".into(),
            )),
            Ok(StreamItem::Comment(
                "loading model=local-a phase=starting".into(),
            )),
            Ok(StreamItem::Data(Bytes::from_static(b"{\"n\":1}"))),
            Ok(StreamItem::Data(Bytes::from_static(b"{\"n\":2}"))),
            Ok(StreamItem::Usage(Usage {
                prompt: 3,
                completion: 2,
            })),
        ],
        Some(Some(2)),
    ));
    let mut body = chat_body("local-a", "hi");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let a = f.chat(&caller, "req-stream", body).await.unwrap();
    assert!(
        a.headers
            .iter()
            .any(|(k, v)| *k == "x-securellm-queue-position" && v == "2")
    );
    let items = drain(a).await;
    let shown: Vec<String> = items
        .iter()
        .map(|i| match i {
            Ok(StreamItem::Comment(c)) => format!(": {c}"),
            Ok(StreamItem::Data(d)) => String::from_utf8_lossy(d).into_owned(),
            Ok(StreamItem::Usage(u)) => format!("usage {} {}", u.prompt, u.completion),
            Err(e) => format!("error {}", e.status),
        })
        .collect();
    assert_eq!(
        shown,
        [
            ": queued position=2 queue_length=3 model=local-a",
            ": loading model=local-a phase=starting",
            "{\"n\":1}",
            "{\"n\":2}",
            "usage 3 2"
        ]
    );
    let seen = &f.local.seen()[0];
    assert!(seen.streamed && seen.relay_usage);
    let row = f.row("req-stream").await;
    assert_eq!(
        (
            row.entry.status,
            row.entry.streamed,
            row.entry.prompt_tokens,
            row.entry.completion_tokens
        ),
        (200, true, 3, 2)
    );
    assert_eq!(row.entry.error_code, "");
}

#[tokio::test]
async fn an_error_mid_stream_ends_it_and_is_audited_with_its_status() {
    let (p, t) = opts();
    let f = fixture(p, t).await;
    let caller = f.caller().await;
    f.local.then(Script::Stream(
        vec![
            Ok(StreamItem::Data(Bytes::from_static(b"{\"n\":1}"))),
            Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "server_error",
                "the engine went away",
            )),
            Ok(StreamItem::Data(Bytes::from_static(b"{\"n\":2}"))),
        ],
        None,
    ));
    let mut body = chat_body("local-a", "hi");
    body["stream"] = json!(true);
    let items = drain(f.chat(&caller, "req-cut", body).await.unwrap()).await;
    assert_eq!(items.len(), 2, "nothing after the error");
    assert!(matches!(&items[1], Err(e) if e.status == StatusCode::BAD_GATEWAY));
    let row = f.row("req-cut").await;
    assert_eq!(
        (
            row.entry.status,
            row.entry.error_code.as_str(),
            row.entry.streamed
        ),
        (502, "server_error", true)
    );
}

#[tokio::test]
async fn a_client_that_leaves_is_recorded_as_499() {
    let (p, t) = opts();
    let f = fixture(p, t).await;
    let caller = f.caller().await;
    // Mid-stream: the stream is dropped after its first chunk.
    f.local.then(Script::Stream(
        vec![
            Ok(StreamItem::Data(Bytes::from_static(b"{\"n\":1}"))),
            Ok(StreamItem::Data(Bytes::from_static(b"{\"n\":2}"))),
        ],
        None,
    ));
    let mut body = chat_body("local-a", "hi");
    body["stream"] = json!(true);
    let a = f.chat(&caller, "req-gone", body).await.unwrap();
    let Reply::Stream(mut s) = a.reply else {
        panic!("expected a stream")
    };
    assert!(matches!(s.next().await, Some(Ok(StreamItem::Data(_)))));
    drop(s);
    let row = f.row("req-gone").await;
    assert_eq!(
        (
            row.entry.status,
            row.entry.error_code.as_str(),
            row.entry.streamed
        ),
        (499, "client_closed_request", true)
    );

    // Before the answer: the request's future is dropped while the upstream works.
    f.local.then(Script::Hang);
    let pending = f.chat(&caller, "req-gone-early", chat_body("local-a", "hi"));
    assert!(
        tokio::time::timeout(Duration::from_millis(50), pending)
            .await
            .is_err()
    );
    let row = f.row("req-gone-early").await;
    assert_eq!(
        (
            row.entry.status,
            row.entry.error_code.as_str(),
            row.entry.streamed
        ),
        (499, "client_closed_request", false)
    );
}

#[tokio::test]
async fn an_upstream_that_does_not_answer_in_time_is_a_504() {
    let f = fixture(Policy::Redact, Duration::from_millis(100)).await;
    let caller = f.caller().await;
    f.local.then(Script::Hang);
    let e = f
        .chat(&caller, "req-slow", chat_body("local-a", "hi"))
        .await
        .err()
        .unwrap();
    assert_eq!(
        (e.status, e.code),
        (StatusCode::GATEWAY_TIMEOUT, Some("timeout"))
    );
    let row = f.row("req-slow").await;
    assert_eq!(
        (row.entry.status, row.entry.error_code.as_str()),
        (504, "timeout")
    );
}

#[tokio::test]
async fn models_are_listed_per_upstream_within_the_key_scope() {
    let (p, t) = opts();
    let f = fixture(p, t).await;
    let (_, caller) = f
        .key(NewKey {
            name: "some".into(),
            models: vec!["tiny".into(), "gpt-*".into()],
            ..Default::default()
        })
        .await;
    let ms = list_models(&f.st, &caller, "req-models", "/v1/models")
        .await
        .unwrap();
    let ids: Vec<(&str, &str)> = ms
        .iter()
        .map(|m| (m.id.as_str(), m.upstream.as_str()))
        .collect();
    // Patterns are not listable; `local-*` is outside the key's scope anyway.
    assert_eq!(ids, [("tiny", "local"), ("gpt-4o", "acme")]);
    let body = models_body(&ms);
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"][1]["owned_by"], "acme");
    let row = f.row("req-models").await;
    assert_eq!(
        (row.entry.status, row.entry.upstream.as_str()),
        (200, "registry")
    );
}
