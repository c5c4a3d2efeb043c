//! The gateway's spans as an OpenTelemetry collector receives them: export on (a real OTLP/gRPC
//! receiver from the test kit), the real stack in-process (scheduler, registry, backend manager
//! with the real llama-server) and an OpenAI-compatible HTTP server on loopback as a cloud
//! upstream. One request is one trace that continues the caller's `traceparent`, with the
//! pipeline's steps as children, the attributes an operator needs, its audit row naming the
//! trace, and the cloud upstream receiving the trace context.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use securellm_common::telemetry::{self, TelemetryConfig};
use securellm_testkit::Stack;
use securellm_testkit::gateway::{audit_rows, create_key};
use securellm_testkit::otlp::{OtlpReceiver, ReceivedSpan};

/// A chat-completions server that records the `traceparent` of each request.
async fn cloud() -> (String, Arc<Mutex<Vec<String>>>) {
    use axum::routing::post;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        post(
            move |headers: axum::http::HeaderMap, body: axum::Json<serde_json::Value>| {
                let seen = s2.clone();
                async move {
                    let tp = headers
                        .get("traceparent")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    seen.lock().unwrap().push(tp);
                    axum::Json(serde_json::json!({
                        "id": "chatcmpl-1", "object": "chat.completion", "created": 1,
                        "model": body.0["model"],
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                            "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
                    }))
                }
            },
        ),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    (format!("http://{addr}/v1"), seen)
}

/// Wait until the trace has a span named each of `names`; its spans.
async fn wait_for(rx: &OtlpReceiver, trace: &str, names: &[&str]) -> Vec<ReceivedSpan> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let spans = rx.trace(trace);
        if names.iter().all(|n| spans.iter().any(|s| s.name == *n)) {
            return spans;
        }
        assert!(
            Instant::now() < deadline,
            "trace {trace} lacks some of {names:?}: {:#?}",
            spans.iter().map(|s| &s.name).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The gateway's request span: the server span of `POST /v1/chat/completions` (the backend
/// manager's call to its engine is a client span of the same name).
fn request(spans: &[ReceivedSpan]) -> &ReceivedSpan {
    let mut server = spans
        .iter()
        .filter(|s| s.name == "POST /v1/chat/completions" && s.kind == 2);
    let r = server.next().expect("a request span");
    assert!(server.next().is_none(), "one request span");
    r
}

fn named<'a>(spans: &'a [ReceivedSpan], name: &str) -> &'a ReceivedSpan {
    spans
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no span {name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_one_trace_that_continues_the_callers_and_reaches_the_cloud() {
    let rx = OtlpReceiver::start().await;
    let _guard = telemetry::init_service(
        "securellm-gateway",
        "warn",
        &TelemetryConfig {
            otlp_endpoint: Some(rx.endpoint()),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(telemetry::enabled(), "export is on in this process");
    let (base, seen) = cloud().await;
    let s = Stack::new()
        .models(&["tiny"])
        .gateway_with(move |cfg| {
            cfg.upstreams = std::collections::BTreeMap::from([(
                "cloudy".to_string(),
                securellm_gateway::cloud::CloudConfig {
                    base_url: base,
                    api_key_env: None,
                    api_key_file: None,
                    models: vec!["gpt-fake".into()],
                    redaction: securellm_gateway::redact::Policy::Redact,
                },
            )]);
        })
        .start()
        .await;
    let g = s.gateway();
    let (key, key_id) = create_key(&g.state.keys, "traced", &["*"], None).await;
    let http = reqwest::Client::new();
    let url = format!("http://{}/v1/chat/completions", g.http_addr);

    // A local model, in the caller's trace.
    let (trace, caller_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let r = http
        .post(&url)
        .bearer_auth(&key)
        .header("traceparent", format!("00-{trace}-{caller_span}-01"))
        .header("x-request-id", "local-traced")
        .json(
            &serde_json::json!({"model": "tiny", "max_tokens": 4, "stream": true,
            "messages": [{"role": "user", "content": "Say hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().ends_with("data: [DONE]\n\n"));

    let spans = wait_for(
        &rx,
        trace,
        &[
            "POST /v1/chat/completions",
            "authenticate",
            "route",
            "rate_limit",
            "upstream",
        ],
    )
    .await;
    let req = request(&spans);
    assert_eq!(req.parent_span_id.as_deref(), Some(caller_span));
    for (k, v) in [
        ("http.request.method", "POST"),
        ("http.route", "/v1/chat/completions"),
        ("http.response.status_code", "200"),
        ("gen_ai.operation.name", "chat"),
        ("gen_ai.request.model", "tiny"),
        ("securellm.key_id", key_id.as_str()),
        ("securellm.upstream", "local"),
    ] {
        assert_eq!(req.attr(k), Some(v), "{k} of {req:#?}");
    }
    // The caller's x-request-id is free text the redactor may have to scrub: it is not an
    // attribute (the audit row, found by its trace id, has it).
    assert_eq!(req.attr("securellm.request_id"), None, "{req:#?}");
    // The stream's span closed after its last event: the usage is on it.
    let out: u64 = req
        .attr("gen_ai.usage.output_tokens")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(out >= 1, "{req:#?}");
    for child in ["authenticate", "route", "rate_limit", "upstream"] {
        assert_eq!(
            named(&spans, child).parent_span_id.as_deref(),
            Some(req.span_id.as_str()),
            "{child} is a child of the request span"
        );
    }
    assert_eq!(named(&spans, "upstream").kind, 3, "a client span");
    // The backend manager's side of the call joined the trace under the upstream span (the
    // internal gRPC hop carries the context).
    assert!(
        spans
            .iter()
            .any(|s| s.name.starts_with("securellm.v1.BackendManager/")
                && s.parent_span_id.as_deref() == Some(named(&spans, "upstream").span_id.as_str())),
        "{:#?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    // Never the secret.
    for s in rx.spans() {
        assert!(
            s.attributes.values().all(|v| !v.contains(&key)),
            "the key in {s:#?}"
        );
    }

    // A cloud model: the provider receives the trace context of the gateway's upstream span.
    let (trace2, caller2) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let r = http
        .post(&url)
        .bearer_auth(&key)
        .header("traceparent", format!("00-{trace2}-{caller2}-01"))
        .header("x-request-id", "cloud-traced")
        .json(&serde_json::json!({"model": "gpt-fake",
            "messages": [{"role": "user", "content": "Say hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let spans2 = wait_for(
        &rx,
        trace2,
        &["POST /v1/chat/completions", "upstream", "redact"],
    )
    .await;
    let upstream = named(&spans2, "upstream");
    assert_eq!(upstream.attr("securellm.upstream"), Some("cloudy"));
    let sent = seen.lock().unwrap().clone();
    assert_eq!(
        sent,
        vec![format!("00-{trace2}-{}-01", upstream.span_id)],
        "the cloud upstream continues the trace under the gateway's upstream span"
    );
    let req2 = request(&spans2);
    assert_eq!(req2.attr("securellm.upstream"), Some("cloudy"));
    assert_eq!(req2.attr("gen_ai.usage.input_tokens"), Some("5"));

    // The audit rows lead to their traces.
    let rows = audit_rows(g).await;
    let row = |rid: &str| {
        rows.iter()
            .find(|r| r.entry.request_id == rid)
            .unwrap_or_else(|| panic!("no row for {rid}"))
            .entry
            .trace_id
            .clone()
    };
    assert_eq!(row("local-traced"), trace);
    assert_eq!(row("cloud-traced"), trace2);

    // Without a caller's trace the gateway starts one, and its row names it.
    let r = http
        .post(&url)
        .bearer_auth(&key)
        .header("x-request-id", "own-trace")
        .json(&serde_json::json!({"model": "gpt-fake",
            "messages": [{"role": "user", "content": "Say hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rows = audit_rows(g).await;
    let own = rows
        .iter()
        .find(|r| r.entry.request_id == "own-trace")
        .expect("a row")
        .entry
        .trace_id
        .clone();
    assert_eq!(own.len(), 32, "{own:?}");
    let spans3 = wait_for(&rx, &own, &["POST /v1/chat/completions"]).await;
    assert_eq!(request(&spans3).parent_span_id, None, "a root span");

    // gRPC: the gateway's request span is the child of the transport's `grpc.server` span,
    // which continues the caller's trace; authenticate is the request span's child.
    let (trace4, caller4) = ("5bf92f3577b34da6a3ce929d0e0e4737", "a1b2c3d4e5f60718");
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", g.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut req = tonic::Request::new(securellm_proto::v1::GatewayListModelsRequest {});
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace4}-{caller4}-01").parse().unwrap(),
    );
    req.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    securellm_proto::v1::gateway_client::GatewayClient::new(ch)
        .list_models(req)
        .await
        .unwrap();
    let spans4 = wait_for(&rx, trace4, &["authenticate"]).await;
    let method = "securellm.v1.Gateway/ListModels";
    let server = spans4
        .iter()
        .find(|s| s.name == method && s.kind == 2)
        .expect("the grpc.server span");
    assert_eq!(server.parent_span_id.as_deref(), Some(caller4));
    let inner = spans4
        .iter()
        .find(|s| s.name == method && s.kind == 1)
        .expect("the gateway's request span");
    assert_eq!(
        inner.parent_span_id.as_deref(),
        Some(server.span_id.as_str())
    );
    assert_eq!(inner.attr("securellm.key_id"), Some(key_id.as_str()));
    assert_eq!(
        named(&spans4, "authenticate").parent_span_id.as_deref(),
        Some(inner.span_id.as_str())
    );
    s.shutdown().await;
}
