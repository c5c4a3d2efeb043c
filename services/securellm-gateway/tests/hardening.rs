//! What an adversarial run broke, each as a regression test against the real gateway (no backends
//! needed): idle connections on either port, slow bodies and one key's many uploads, the audit
//! log's promise under `kill -9`, unauthenticated requests filling the audit log, file modes.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use securellm_gateway::config::AuditMode;
use securellm_proto::v1 as pb;
use securellm_testkit::gateway::{audit_rows, create_key, read_until_closed, standalone_gateway};
use securellm_testkit::{ready_word, spawn_ready};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A key for every model: (secret, id).
async fn key(gw: &securellm_gateway::RunningGateway, name: &str) -> (String, String) {
    create_key(&gw.state.keys, name, &["*"], None).await
}

/// Read until a whole HTTP/1.1 response head has arrived (or `limit`); returns what arrived.
async fn read_head(s: &mut TcpStream, limit: Duration) -> String {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(limit.saturating_sub(start.elapsed()), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// A raw gRPC health check over HTTP/2 (a real call through tonic's server).
async fn grpc_health(addr: std::net::SocketAddr) -> bool {
    let c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let Ok(r) = c
        .post(format!("http://{addr}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        // HealthCheckRequest { service: "" } is zero bytes.
        .body(vec![0u8, 0, 0, 0, 0])
        .send()
        .await
    else {
        return false;
    };
    // HealthCheckResponse { status: SERVING (1) }.
    r.status() == 200
        && r.bytes()
            .await
            .is_ok_and(|b| b[..] == [0u8, 0, 0, 0, 2, 8, 1])
}

fn admin_token(gw_dir: &Path) -> String {
    std::fs::read_to_string(gw_dir.join("admin-token"))
        .unwrap()
        .trim()
        .to_string()
}

/// `GatewayAdmin.ListApiKeys` with `token`, over a fresh connection.
async fn list_keys(
    addr: std::net::SocketAddr,
    token: &str,
) -> Result<pb::ListApiKeysResponse, tonic::Status> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut c = pb::gateway_admin_client::GatewayAdminClient::new(ch);
    let mut r = tonic::Request::new(pb::ListApiKeysRequest::default());
    if let Ok(v) = format!("Bearer {token}").parse() {
        r.metadata_mut().insert("authorization", v);
    }
    c.list_api_keys(r).await.map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_never_lock_callers_out_of_either_port() {
    let dir = tempfile::tempdir().unwrap();
    // A long idle timeout: only shedding at the cap can explain a prompt answer below.
    let gw = standalone_gateway(&dir.path().join("gw"), |c| {
        c.max_connections = 16;
        c.header_read_timeout_ms = 30_000;
    })
    .await;
    let token = admin_token(&dir.path().join("gw"));

    // gRPC port: three times the cap in connections that never send the HTTP/2 preface.
    let mut silent = Vec::new();
    for _ in 0..48 {
        silent.push(TcpStream::connect(gw.grpc_addr).await.unwrap());
    }
    let t = Instant::now();
    let healthy = tokio::time::timeout(Duration::from_secs(10), grpc_health(gw.grpc_addr)).await;
    assert!(
        matches!(healthy, Ok(true)),
        "a gRPC health check behind 48 silent connections failed or waited ({:?})",
        t.elapsed()
    );
    let keys = tokio::time::timeout(Duration::from_secs(10), list_keys(gw.grpc_addr, &token))
        .await
        .expect("a gRPC call behind silent connections waited")
        .expect("a gRPC call behind silent connections failed");
    assert!(keys.keys.is_empty());
    // The gateway closed the silent connections it shed (the oldest first).
    let mut closed = 0;
    for s in silent.iter_mut().take(32) {
        if read_until_closed(s, Duration::from_millis(200))
            .await
            .1
            .is_some()
        {
            closed += 1;
        }
    }
    assert!(closed >= 32 - 4, "only {closed} of the 32 oldest were shed");
    drop(silent);

    // The HTTP port, likewise.
    let mut silent = Vec::new();
    for _ in 0..48 {
        silent.push(TcpStream::connect(gw.http_addr).await.unwrap());
    }
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        reqwest::get(format!("http://{}/health", gw.http_addr)),
    )
    .await
    .expect("an HTTP request behind silent connections waited")
    .unwrap();
    assert_eq!(r.status(), 200);
    drop(silent);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_connections_without_a_call_in_progress_are_closed_and_slow_messages_cut() {
    let dir = tempfile::tempdir().unwrap();
    let gw = standalone_gateway(&dir.path().join("gw"), |c| {
        c.header_read_timeout_ms = 500;
        c.body_read_timeout_ms = 3_000;
    })
    .await;
    let limit = Duration::from_secs(8);
    // Nothing at all → closed.
    let mut s = TcpStream::connect(gw.grpc_addr).await.unwrap();
    assert!(
        read_until_closed(&mut s, limit).await.1.is_some(),
        "a silent gRPC connection stays open"
    );
    // Half an HTTP/2 preface → closed.
    let mut s = TcpStream::connect(gw.grpc_addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    assert!(
        read_until_closed(&mut s, limit).await.1.is_some(),
        "a stalled preface stays open"
    );
    // A whole preface and SETTINGS, then no call → closed.
    let mut s = TcpStream::connect(gw.grpc_addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    assert!(
        read_until_closed(&mut s, limit).await.1.is_some(),
        "an idle HTTP/2 connection stays open"
    );

    // A call whose message trickles in (one byte every 2 s, each gap under the old gap timer):
    // the connection is not idle (it is not closed after 500 ms), the call ends at the body
    // deadline with 408 / DEADLINE_EXCEEDED, audited. The same for a call that is authenticated
    // only after its message (GatewayAdmin), here without any credential.
    let (secret, _) = key(&gw, "slow").await;
    let ((api, api_took), (admin, admin_took)) = tokio::join!(
        grpc_trickle(
            gw.grpc_addr,
            "/securellm.v1.Gateway/ChatCompletions",
            Some(&secret),
        ),
        grpc_trickle(gw.grpc_addr, "/securellm.v1.GatewayAdmin/ListApiKeys", None),
    );
    let h = |r: &reqwest::Response, k: &str| {
        r.headers()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(h(&api, "grpc-status"), "4", "{:?}", api.headers());
    assert_eq!(h(&api, "x-http-status"), "408", "{:?}", api.headers());
    assert!(
        api_took >= Duration::from_millis(2_500),
        "cut early: {api_took:?}"
    );
    assert_eq!(h(&admin, "grpc-status"), "4", "{:?}", admin.headers());
    assert!(admin_took >= Duration::from_millis(2_500), "{admin_took:?}");
    let rows = audit_rows(&gw).await;
    assert!(
        rows.iter()
            .any(|r| r.entry.request_id == "grpc-trickle" && r.entry.status == 408),
        "the cut call has its audit row"
    );
    gw.shutdown().await;
}

/// A gRPC call to `path` whose message announces 100 bytes and then trickles one byte every 2 s;
/// the response and how long it took.
async fn grpc_trickle(
    addr: std::net::SocketAddr,
    path: &str,
    key: Option<&str>,
) -> (reqwest::Response, Duration) {
    let trickle = futures::stream::unfold(0u32, |i| async move {
        if i == 0 {
            return Some((Ok::<_, std::io::Error>(vec![0u8, 0, 0, 0, 100]), 1));
        }
        if i > 60 {
            return None;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        Some((Ok(b"{".to_vec()), i + 1))
    });
    let c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let mut req = c
        .post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-request-id", "grpc-trickle");
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let t = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(15),
        req.body(reqwest::Body::wrap_stream(trickle)).send(),
    )
    .await
    .unwrap_or_else(|_| panic!("a trickling gRPC message to {path} is never cut off"))
    .unwrap();
    (r, t.elapsed())
}

/// A POST head with `Content-Length: 100` and the first body byte, for `key`.
fn slow_upload_head(key: &str, rid: &str) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: 100\r\nX-Request-Id: {rid}\r\n\r\n{{"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_is_cut_at_the_total_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let gw = standalone_gateway(&dir.path().join("gw"), |c| c.body_read_timeout_ms = 3_000).await;
    let (secret, _) = key(&gw, "slow").await;
    let mut s = TcpStream::connect(gw.http_addr).await.unwrap();
    s.write_all(slow_upload_head(&secret, "http-trickle").as_bytes())
        .await
        .unwrap();
    let t = Instant::now();
    let (mut rd, mut wr) = s.into_split();
    // One byte every 2 s: every gap is under the 3 s limit, the total is not.
    let writer = tokio::spawn(async move {
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            if wr.write_all(b" ").await.is_err() {
                return;
            }
        }
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(15).saturating_sub(t.elapsed()), async {
            rd.read(&mut buf).await
        })
        .await
        {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    writer.abort();
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 408"),
        "a body trickled a byte every 2 s was not cut: {text:?} after {:?}",
        t.elapsed()
    );
    assert!(
        t.elapsed() >= Duration::from_millis(2_500),
        "{:?}",
        t.elapsed()
    );
    let rows = audit_rows(&gw).await;
    assert!(
        rows.iter()
            .any(|r| r.entry.request_id == "http-trickle" && r.entry.status == 408)
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_with_many_slow_uploads_cannot_starve_another() {
    let dir = tempfile::tempdir().unwrap();
    let gw = standalone_gateway(&dir.path().join("gw"), |c| {
        c.max_connections = 6;
        c.max_inflight_per_key = 3;
        c.header_read_timeout_ms = 30_000;
        c.body_read_timeout_ms = 30_000;
    })
    .await;
    let (a, a_id) = key(&gw, "a").await;
    let (b, _) = key(&gw, "b").await;
    // Key A: three uploads that stall after the first byte take its three places...
    let mut stalled = Vec::new();
    for i in 0..3 {
        let mut s = TcpStream::connect(gw.http_addr).await.unwrap();
        s.write_all(slow_upload_head(&a, &format!("a-stalled-{i}")).as_bytes())
            .await
            .unwrap();
        stalled.push(s);
    }
    for _ in 0..200 {
        if gw.state.inflight.of_key(&a_id) == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(gw.state.inflight.of_key(&a_id), 3);
    // ... and every further one is refused at once on its headers, its body never read.
    for i in 0..8 {
        let mut s = TcpStream::connect(gw.http_addr).await.unwrap();
        s.write_all(slow_upload_head(&a, &format!("a-over-{i}")).as_bytes())
            .await
            .unwrap();
        let head = read_head(&mut s, Duration::from_secs(10)).await;
        assert!(head.starts_with("HTTP/1.1 429"), "upload {i}: {head:?}");
    }
    // Over gRPC too (the same cap, before the message is read).
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", gw.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut g = pb::gateway_client::GatewayClient::new(ch);
    let mut req = tonic::Request::new(pb::GatewayInferenceRequest {
        body_json: br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#.to_vec(),
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {a}").parse().unwrap());
    let e = g.chat_completions(req).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    // Key B is served at once, although A's uploads fill the connection cap with theirs.
    let http = reqwest::Client::new();
    let t = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        http.get(format!("http://{}/v1/models", gw.http_addr))
            .bearer_auth(&b)
            .send(),
    )
    .await
    .expect("key B waited behind key A's uploads")
    .unwrap();
    // No registry runs: 503, but answered, and not refused for A's sake.
    assert_eq!(r.status(), 503, "after {:?}", t.elapsed());
    // The refusals are audited with A's key.
    let rows = audit_rows(&gw).await;
    let refused = rows
        .iter()
        .filter(|r| r.entry.key_id == a_id && r.entry.status == 429)
        .count();
    assert_eq!(refused, 9, "eight HTTP uploads and one gRPC call refused");
    // A's places come back when its uploads end.
    drop(stalled);
    for _ in 0..200 {
        if gw.state.inflight.of_key(&a_id) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(gw.state.inflight.of_key(&a_id), 0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_requests_cost_two_audit_rows_per_address_and_window() {
    use securellm_gateway::audit::AUTH_FAILURES_AGGREGATED;
    let dir = tempfile::tempdir().unwrap();
    let gw = standalone_gateway(&dir.path().join("gw"), |_| {}).await;
    let http = reqwest::Client::new();
    let url = format!("http://{}/v1/chat/completions", gw.http_addr);
    for i in 0..300 {
        let r = http
            .post(&url)
            .bearer_auth("sk-slm-wrong")
            .header("x-request-id", format!("bad-{i}"))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert!(matches!(r.status().as_u16(), 401 | 429));
    }
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", gw.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut g = pb::gateway_client::GatewayClient::new(ch);
    for _ in 0..30 {
        assert!(
            g.list_models(pb::GatewayListModelsRequest {})
                .await
                .is_err()
        );
    }
    for _ in 0..10 {
        assert!(list_keys(gw.grpc_addr, "not-the-token").await.is_err());
    }
    let rows = audit_rows(&gw).await;
    let anonymous: Vec<_> = rows.iter().filter(|r| r.entry.key_id.is_empty()).collect();
    assert_eq!(anonymous.len(), 2, "{anonymous:#?}");
    assert_eq!(anonymous[0].entry.request_id, "bad-0");
    assert_eq!(anonymous[0].entry.status, 401);
    assert_eq!(anonymous[1].entry.error_code, AUTH_FAILURES_AGGREGATED);
    assert_eq!(anonymous[1].entry.request_id, "count:339");
    assert_eq!(anonymous[1].entry.client_addr, "127.0.0.1");
    // A valid key from the same address is served and audited as usual.
    let (secret, id) = key(&gw, "good").await;
    let r = http
        .get(format!("http://{}/v1/models", gw.http_addr))
        .bearer_auth(&secret)
        .send()
        .await
        .unwrap();
    assert_ne!(r.status(), 401);
    // The next failure opens a new window: its own row again.
    let _ = http.post(&url).bearer_auth("sk-slm-wrong").send().await;
    let rows = audit_rows(&gw).await;
    assert!(rows.iter().any(|r| r.entry.key_id == id));
    assert_eq!(rows.iter().filter(|r| r.entry.key_id.is_empty()).count(), 3);
    assert!(
        securellm_gateway::audit::verify_file(gw.state.audit.path().unwrap())
            .await
            .unwrap()
            .ok
    );
    gw.shutdown().await;
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// The gateway's own files in `gw`, as (path, mode).
fn private_files(gw: &Path) -> Vec<(std::path::PathBuf, u32)> {
    std::fs::read_dir(gw)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            let m = mode(&p);
            (p, m)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_and_audit_files_are_private_to_the_service() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gw");
    let bootstrap = dir.path().join("secrets/first-key");
    let boot = bootstrap.clone();
    let gw = standalone_gateway(&dir.path().join("gw"), move |c| {
        c.bootstrap_key_file = Some(boot)
    })
    .await;
    let _ = audit_rows(&gw).await;
    assert_eq!(mode(&data), 0o700, "data directory");
    let files = private_files(&data);
    for name in ["gateway-keys.db", "gateway-audit.db", "admin-token"] {
        assert!(
            files.iter().any(|(p, _)| p.ends_with(name)),
            "{name} missing"
        );
    }
    for (p, m) in &files {
        assert_eq!(*m, 0o600, "{}", p.display());
    }
    assert_eq!(mode(&bootstrap), 0o600);
    assert_eq!(mode(bootstrap.parent().unwrap()), 0o700);
    gw.shutdown().await;

    // Files left readable by an older version (or a careless copy) are tightened at start.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    for (p, _) in private_files(&data) {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let gw = standalone_gateway(&dir.path().join("gw"), |_| {}).await;
    assert_eq!(mode(&data), 0o700);
    for (p, m) in private_files(&data) {
        assert_eq!(m, 0o600, "{}", p.display());
    }
    gw.shutdown().await;
}

/// A fake OpenAI-compatible upstream: a chat completion, or an SSE stream of two chunks.
async fn fake_openai() -> String {
    use axum::response::IntoResponse;
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(|body: axum::Json<serde_json::Value>| async move {
            if body.0["stream"] == true {
                let mut sse = String::new();
                for word in ["hi ", "there"] {
                    sse += &format!(
                        "data: {}\n\n",
                        serde_json::json!({"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": word}}]})
                    );
                }
                sse += "data: [DONE]\n\n";
                return ([("content-type", "text/event-stream")], sse).into_response();
            }
            axum::Json(serde_json::json!({
                "id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": body.0["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
            }))
            .into_response()
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    format!("http://{addr}/v1")
}

fn chat(stream: bool) -> serde_json::Value {
    serde_json::json!({"model": "fake", "stream": stream, "max_tokens": 4,
        "messages": [{"role": "user", "content": "hello"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_audit_mode_answers_only_after_the_row_is_committed() {
    let base = fake_openai().await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("cloud-key");
    std::fs::write(&key_file, "k\n").unwrap();
    let upstreams = std::collections::BTreeMap::from([(
        "fake".to_string(),
        securellm_gateway::cloud::CloudConfig {
            base_url: base,
            api_key_env: None,
            api_key_file: Some(key_file),
            models: vec!["fake".into()],
            redaction: securellm_gateway::redact::Policy::Allow,
        },
    )]);
    let gw = standalone_gateway(&dir.path().join("gw"), |c| {
        c.audit_mode = AuditMode::Sync;
        c.upstreams = upstreams;
    })
    .await;
    let (secret, _) = key(&gw, "k").await;
    let http = reqwest::Client::new();
    let url = format!("http://{}/v1/chat/completions", gw.http_addr);
    // Read straight from the committed database, without flushing the writer.
    let committed = |rid: &'static str| {
        let audit = gw.state.audit.clone();
        async move {
            audit
                .query(Default::default())
                .await
                .unwrap()
                .into_iter()
                .find(|r| r.entry.request_id == rid)
        }
    };
    let r = http
        .post(&url)
        .bearer_auth(&secret)
        .header("x-request-id", "sync-complete")
        .json(&chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let row = committed("sync-complete")
        .await
        .expect("answered before its row");
    assert_eq!(row.entry.status, 200);
    let r = http
        .post(&url)
        .bearer_auth(&secret)
        .header("x-request-id", "sync-stream")
        .json(&chat(true))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let row = committed("sync-stream")
        .await
        .expect("stream ended before its row");
    assert!(row.entry.streamed);
    assert_eq!(row.entry.status, 200);
    // An admin call's answer waits for its row too.
    let token = admin_token(&dir.path().join("gw"));
    list_keys(gw.grpc_addr, &token).await.unwrap();
    let rows = gw.state.audit.query(Default::default()).await.unwrap();
    assert!(
        rows.iter()
            .any(|r| r.entry.endpoint.ends_with("/ListApiKeys") && r.entry.status == 200)
    );

    // Fail-closed: with the audit log unable to commit, no 2xx leaves.
    gw.state.audit.close().await;
    let r = http
        .post(&url)
        .bearer_auth(&secret)
        .json(&chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "audit_unavailable", "{v}");
    let r = http
        .post(&url)
        .bearer_auth(&secret)
        .json(&chat(true))
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    assert!(!text.contains("[DONE]"), "{text}");
    assert!(text.contains("audit_unavailable"), "{text}");
    assert!(list_keys(gw.grpc_addr, &token).await.is_err());
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_sync_audit_every_2xx_survives_kill_9() {
    securellm_common::tls::install_crypto_provider();
    let base = fake_openai().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gw");
    let key_file = dir.path().join("cloud-key");
    std::fs::write(&key_file, "k\n").unwrap();
    let config = dir.path().join("securellm.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\naudit_mode = \"sync\"\n[gateway.upstreams.fake]\nbase_url = \"{base}\"\napi_key_file = \"{}\"\nmodels = [\"fake\"]\nredaction = \"allow\"\n",
            key_file.display()
        ),
    )
    .unwrap();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_securellm-gateway"));
    cmd.args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .args(["--backend", "127.0.0.1:1", "--registry", "127.0.0.1:1"])
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(&data)
        .arg("--bootstrap-key-file")
        .arg(data.join("api-key"))
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::null());
    let (mut child, ready) = spawn_ready(cmd, Duration::from_secs(30)).await;
    let http_addr = ready_word(&ready, "http=");
    let secret = std::fs::read_to_string(data.join("api-key"))
        .unwrap()
        .trim()
        .to_string();
    let url = format!("http://{http_addr}/v1/chat/completions");
    let acknowledged = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let flood: Vec<_> = (0..8)
        .map(|t| {
            let (url, secret, ack) = (url.clone(), secret.clone(), acknowledged.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                for i in 0..100_000 {
                    let rid = format!("flood-{t}-{i}");
                    let Ok(r) = http
                        .post(&url)
                        .bearer_auth(&secret)
                        .header("x-request-id", &rid)
                        .json(&chat(i % 2 == 0))
                        .send()
                        .await
                    else {
                        return;
                    };
                    // Acknowledged: a 2xx whose answer has been read to its end.
                    if r.status().is_success() && r.bytes().await.is_ok() {
                        ack.lock().unwrap().push(rid);
                    }
                }
            })
        })
        .collect();
    // Under load for a while, then kill -9 in the middle of it.
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if acknowledged.lock().unwrap().len() >= 200 {
            break;
        }
    }
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    for f in flood {
        let _ = f.await;
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() >= 50,
        "too little load: {}",
        acknowledged.len()
    );
    let db = data.join("gateway-audit.db");
    let v = securellm_gateway::audit::verify_file(&db).await.unwrap();
    assert!(v.ok, "{v:?}");
    let conn = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", db.display()))
        .await
        .unwrap();
    let stored: std::collections::HashSet<String> =
        sqlx::query_scalar("SELECT request_id FROM audit WHERE status = 200")
            .fetch_all(&conn)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let missing: Vec<_> = acknowledged
        .iter()
        .filter(|r| !stored.contains(*r))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged requests have no audit row: {missing:?}",
        missing.len(),
        acknowledged.len()
    );
}
