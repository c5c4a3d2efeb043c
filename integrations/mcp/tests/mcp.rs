//! The real `securellm-mcp` binary driven by the official rmcp client, over stdio (a child
//! process) and over streamable HTTP, against real in-process services: a vram-scheduler with a
//! simulated GPU, a registry over a generated GGUF, and a gateway whose cloud upstream is a fake
//! OpenAI server on loopback (no llama-server needed).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use rmcp::model::CallToolRequestParams;
use rmcp::service::RunningService;
use rmcp::transport::{ConfigureCommandExt, StreamableHttpClientTransport, TokioChildProcess};
use rmcp::{RoleClient, ServiceExt};
use securellm_testkit::gateway::{create_key, standalone_gateway};
use securellm_testkit::{Stack, dead_addr};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_securellm-mcp");

/// Every tool the server must offer.
const TOOLS: [&str; 8] = [
    "audit_verify",
    "chat",
    "list_models",
    "load_model",
    "loaded_models",
    "show_model",
    "unload_model",
    "vram_status",
];

type Client = RunningService<RoleClient, ()>;

/// The binary with `args`, in an environment of its own (an empty HOME, no SECURELLM_* from the
/// caller), so that defaults never reach a real stack.
fn command(home: &Path, args: &[String]) -> tokio::process::Command {
    tokio::process::Command::new(BIN).configure(|c| {
        c.args(args)
            .env_clear()
            .env("HOME", home)
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn");
    })
}

/// Spawn the server over stdio and complete the MCP handshake.
async fn stdio_client(home: &Path, args: &[String]) -> Client {
    let (transport, _stderr) = TokioChildProcess::builder(command(home, args))
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    ().serve(transport).await.expect("initialize")
}

/// Call `tool`; the result's text and whether it is a tool error.
async fn call(c: &Client, tool: &str, args: Value) -> (bool, String) {
    let mut p = CallToolRequestParams::new(tool.to_string());
    if let Value::Object(m) = args {
        p = p.with_arguments(m);
    }
    let r = c
        .call_tool(p)
        .await
        .unwrap_or_else(|e| panic!("{tool}: protocol error {e}"));
    let text = r
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect::<Vec<_>>()
        .join("\n");
    (r.is_error == Some(true), text)
}

async fn ok(c: &Client, tool: &str, args: Value) -> String {
    let (err, text) = call(c, tool, args).await;
    assert!(!err, "{tool} failed: {text}");
    text
}

async fn tool_error(c: &Client, tool: &str, args: Value) -> String {
    let (err, text) = call(c, tool, args).await;
    assert!(err, "{tool} should have failed: {text}");
    text
}

fn flags(pairs: &[(&str, &str)]) -> Vec<String> {
    pairs
        .iter()
        .flat_map(|(k, v)| [format!("--{k}"), v.to_string()])
        .collect()
}

/// A scheduler alone, with one simulated GPU of `gib` GiB.
async fn scheduler(gib: u64) -> Stack {
    Stack::new().gpu(gib << 30).scheduler_only().start().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_offers_every_tool_and_reports_the_simulated_gpu() {
    let home = tempfile::tempdir().unwrap();
    let s = scheduler(3).await;
    let addr = s.scheduler_addr().to_string();
    let c = stdio_client(home.path(), &flags(&[("scheduler", &addr)])).await;

    let info = c.peer_info().expect("server info");
    assert_eq!(
        info.server_info.as_ref().map(|i| i.name.as_str()),
        Some("securellm-mcp")
    );
    assert!(info.capabilities.tools.is_some());

    let tools = c.list_all_tools().await.unwrap();
    let mut names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    names.sort();
    assert_eq!(names, TOOLS);
    for t in &tools {
        assert!(
            t.description.as_ref().is_some_and(|d| d.len() > 20),
            "{} has no description",
            t.name
        );
        assert_eq!(t.input_schema["type"], "object", "{}", t.name);
        let required: Vec<&str> = t
            .input_schema
            .get("required")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let expected: &[&str] = match t.name.as_ref() {
            "show_model" | "load_model" | "unload_model" => &["name"],
            "chat" => &["model", "prompt"],
            _ => &[],
        };
        assert_eq!(required, expected, "{}", t.name);
    }
    let chat = tools.iter().find(|t| t.name == "chat").unwrap();
    assert_eq!(chat.input_schema["properties"]["max_tokens"]["minimum"], 1);

    let text = ok(&c, "vram_status", json!({})).await;
    assert!(
        text.contains("inventory: simulated")
            && text.contains("(simulated)")
            && text.contains("total 3 GiB")
            && text.contains("free 3 GiB")
            && text.contains("LEASES"),
        "{text}"
    );
    c.cancel().await.unwrap();
    s.shutdown().await;
}

/// The catalogue tools against a real registry over a generated GGUF, and the instance tools
/// against a real backend manager (whose llama-server does not exist: a load fails cleanly).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalogue_and_instance_tools_read_the_real_services() {
    use securellm_gguf::testmodels::{TinyLlamaOptions, write_tiny_llama};
    let home = tempfile::tempdir().unwrap();
    let no_llama = home.path().join("no-llama-server");
    let s = Stack::new()
        .write_models(|models| {
            write_tiny_llama(
                models.join("mcp-tiny.gguf"),
                &TinyLlamaOptions {
                    name: "mcp-tiny".into(),
                    ..Default::default()
                },
            )
            .unwrap();
        })
        .manager(move |c| {
            c.llama_server = Some(no_llama);
            c.defaults = Default::default();
        })
        .start()
        .await;
    let (reg, backend) = (s.registry_addr().to_string(), s.manager_addr().to_string());
    let c = stdio_client(
        home.path(),
        &flags(&[("registry", &reg), ("backend", &backend)]),
    )
    .await;

    let table = ok(&c, "list_models", json!({})).await;
    let row = table
        .lines()
        .find(|l| l.starts_with("mcp-tiny"))
        .unwrap_or_else(|| panic!("no mcp-tiny row:\n{table}"));
    assert!(row.contains("gguf") && row.ends_with(" ok"), "{row}");
    assert!(
        table.starts_with("NAME") && table.contains("EST@4096"),
        "{table}"
    );

    let detail = ok(&c, "show_model", json!({"name": "mcp-tiny"})).await;
    assert!(
        detail.contains("architecture  llama") && detail.contains("estimates"),
        "{detail}"
    );
    let missing = tool_error(&c, "show_model", json!({"name": "no-such-model"})).await;
    assert!(
        missing.starts_with("registry: NotFound") && missing.contains("no-such-model"),
        "{missing}"
    );

    assert_eq!(
        ok(&c, "loaded_models", json!({})).await,
        "no models loaded\n"
    );
    assert_eq!(
        ok(&c, "unload_model", json!({"name": "mcp-tiny"})).await,
        "mcp-tiny was not loaded"
    );
    let e = tool_error(&c, "load_model", json!({"name": "mcp-tiny"})).await;
    assert!(e.starts_with("cannot load mcp-tiny: "), "{e}");
    let e = tool_error(&c, "load_model", json!({"name": "no-such-model"})).await;
    assert!(e.starts_with("cannot load no-such-model: NotFound"), "{e}");
    c.cancel().await.unwrap();
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_and_stopped_services_are_tool_errors_and_the_server_keeps_working() {
    let home = tempfile::tempdir().unwrap();
    let s = scheduler(2).await;
    let (sched, dead) = (s.scheduler_addr().to_string(), dead_addr());
    let args = flags(&[
        ("scheduler", &sched),
        ("registry", &dead),
        ("backend", &dead),
        ("gateway", &dead),
        ("gateway-http", &dead),
    ]);
    let c = stdio_client(home.path(), &args).await;

    // Bad arguments: named in the error.
    let e = tool_error(&c, "show_model", json!({})).await;
    assert!(e.contains("missing field `name`"), "{e}");
    let e = tool_error(&c, "load_model", json!({"name": 5})).await;
    assert!(e.contains("invalid type"), "{e}");
    let e = tool_error(&c, "unload_model", json!({"name": "  "})).await;
    assert_eq!(e, "`name` must not be empty");
    let e = tool_error(
        &c,
        "chat",
        json!({"model": "m", "prompt": "hi", "max_tokens": 0}),
    )
    .await;
    assert_eq!(e, "`max_tokens` must be at least 1");
    let e = tool_error(&c, "chat", json!({"model": "m"})).await;
    assert!(e.contains("missing field `prompt`"), "{e}");

    // Services down: which one, where, and why.
    for (tool, args, service) in [
        ("list_models", json!({}), "registry"),
        ("show_model", json!({"name": "x"}), "registry"),
        ("loaded_models", json!({}), "backend manager"),
        ("load_model", json!({"name": "x"}), "backend manager"),
    ] {
        let e = tool_error(&c, tool, args).await;
        assert!(
            e.starts_with(&format!("cannot reach the {service} at http://{dead}: "))
                && e.contains("refused"),
            "{tool}: {e}"
        );
    }
    // No API key / admin token configured: says how to give one.
    let e = tool_error(&c, "chat", json!({"model": "m", "prompt": "hi"})).await;
    assert!(
        e.contains("no API key") && e.contains("--api-key-file"),
        "{e}"
    );
    let e = tool_error(&c, "audit_verify", json!({})).await;
    assert!(
        e.contains("admin token") && e.contains("--admin-token-file"),
        "{e}"
    );
    // An unknown tool is a protocol error, not a crash.
    let r = c
        .call_tool(CallToolRequestParams::new("no_such_tool"))
        .await;
    assert!(r.is_err(), "{r:?}");

    // Still serving.
    let text = ok(&c, "vram_status", json!({})).await;
    assert!(text.contains("total 2 GiB"), "{text}");

    // The scheduler stops: a tool error, and the same process keeps answering.
    s.shutdown().await;
    let e = tool_error(&c, "vram_status", json!({})).await;
    assert!(e.contains("vram-scheduler"), "{e}");
    assert_eq!(c.list_all_tools().await.unwrap().len(), TOOLS.len());
    c.cancel().await.unwrap();
}

/// A fake OpenAI upstream: records (authorization, body) and answers one canned completion.
async fn fake_upstream() -> (String, Arc<Mutex<Vec<(String, Value)>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let handler = move |headers: axum::http::HeaderMap, axum::Json(body): axum::Json<Value>| {
        let log = log.clone();
        async move {
            let auth = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            log.lock().unwrap().push((auth, body.clone()));
            axum::Json(json!({
                "id": "c-1", "object": "chat.completion", "created": 1, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "pong from upstream"}}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
            }))
        }
    };
    let app = axum::Router::new().route("/v1/chat/completions", axum::routing::post(handler));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    (format!("http://{addr}/v1"), seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_and_audit_verify_go_through_the_real_gateway() {
    let home = tempfile::tempdir().unwrap();
    let (base, seen) = fake_upstream().await;
    let upstream_key = home.path().join("upstream-key");
    std::fs::write(&upstream_key, "upstream-secret\n").unwrap();
    let data = home.path().join("gateway");
    let gw = standalone_gateway(&data, |c| {
        c.backend = dead_addr();
        c.registry = dead_addr();
        c.upstreams = [(
            "fake".to_string(),
            securellm_gateway::cloud::CloudConfig {
                base_url: base,
                api_key_env: None,
                api_key_file: Some(upstream_key),
                models: vec!["gpt-fake".into()],
                redaction: securellm_gateway::redact::Policy::Redact,
            },
        )]
        .into();
    })
    .await;
    let (key, _) = create_key(&gw.state.keys, "mcp", &["gpt-fake"], None).await;
    let key_file = home.path().join("api-key");
    std::fs::write(&key_file, "sk-slm-wrong\n").unwrap();
    let (grpc, http) = (gw.grpc_addr.to_string(), gw.http_addr.to_string());
    let token_file: PathBuf = data.join("admin-token");
    let args = flags(&[
        ("gateway", &grpc),
        ("gateway-http", &http),
        ("api-key-file", key_file.to_str().unwrap()),
        ("admin-token-file", token_file.to_str().unwrap()),
    ]);
    let c = stdio_client(home.path(), &args).await;

    // A wrong key: the gateway's 401, with its message. The key file is read per call.
    let e = tool_error(&c, "chat", json!({"model": "gpt-fake", "prompt": "ping"})).await;
    assert!(e.starts_with("the gateway answered 401"), "{e}");
    std::fs::write(&key_file, format!("{key}\n")).unwrap();

    let text = ok(
        &c,
        "chat",
        json!({"model": "gpt-fake", "prompt": "ping", "max_tokens": 7}),
    )
    .await;
    assert!(
        text.starts_with("pong from upstream")
            && text.contains("finish_reason stop")
            && text.contains("prompt 5, completion 3, total 8"),
        "{text}"
    );
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "the 401 never left the gateway");
        let (auth, body) = &seen[0];
        assert_eq!(auth, "Bearer upstream-secret");
        assert_eq!(body["messages"][0]["content"], "ping");
        assert_eq!(body["max_tokens"], 7);
    }
    // Outside the key's models: the gateway's 404, as OpenAI answers.
    let e = tool_error(&c, "chat", json!({"model": "gpt-other", "prompt": "ping"})).await;
    assert!(e.starts_with("the gateway answered 404"), "{e}");

    // Every request above left an audit row; the chain verifies through the admin API.
    gw.state.audit.flush().await;
    let text = ok(&c, "audit_verify", json!({})).await;
    let rows: u64 = text
        .strip_prefix("audit chain OK: ")
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    assert!(rows >= 3, "{text}");

    // A wrong admin token: the gateway refuses, and says so.
    std::fs::write(&token_file, "not-the-token").unwrap();
    let e = tool_error(&c, "audit_verify", json!({})).await;
    assert!(e.starts_with("gateway: Unauthenticated"), "{e}");
    c.cancel().await.unwrap();
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamable_http_serves_the_same_tools_at_mcp() {
    securellm_common::tls::install_crypto_provider();
    let home = tempfile::tempdir().unwrap();
    let s = scheduler(5).await;
    let addr = s.scheduler_addr().to_string();
    let mut args = flags(&[("scheduler", &addr), ("http", "127.0.0.1:0")]);
    args.push("--registry".into());
    args.push(dead_addr());
    let (mut child, ready) = securellm_testkit::spawn_ready(
        command(home.path(), &args),
        std::time::Duration::from_secs(20),
    )
    .await;
    let http = ready
        .strip_prefix("ready securellm-mcp http=")
        .unwrap_or_else(|| panic!("unexpected first line {ready:?}"))
        .to_string();

    let c = ()
        .serve(StreamableHttpClientTransport::from_uri(format!(
            "http://{http}/mcp"
        )))
        .await
        .expect("initialize over HTTP");
    let info = c.peer_info().unwrap();
    assert_eq!(
        info.server_info.as_ref().map(|i| i.name.as_str()),
        Some("securellm-mcp")
    );
    assert_eq!(c.list_all_tools().await.unwrap().len(), TOOLS.len());
    let text = ok(&c, "vram_status", json!({})).await;
    assert!(text.contains("total 5 GiB"), "{text}");
    let e = tool_error(&c, "list_models", json!({})).await;
    assert!(e.starts_with("cannot reach the registry"), "{e}");
    c.cancel().await.unwrap();

    // Other paths are not the MCP endpoint.
    let r = reqwest::Client::new()
        .post(format!("http://{http}/other"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    child.kill().await.unwrap();
    s.shutdown().await;
}

#[tokio::test]
async fn http_refuses_a_non_loopback_address() {
    let home = tempfile::tempdir().unwrap();
    let out = command(home.path(), &flags(&[("http", "0.0.0.0:0")]))
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("only a loopback address is allowed"), "{err}");
}

/// Against services that require the internal token, the tools present the one in
/// `--internal-token-file`; without it the call is refused and the tool error says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_present_the_internal_token() {
    let home = tempfile::tempdir().unwrap();
    let s = Stack::new().scheduler_only().internal_token().start().await;
    let file = s.token_file();
    let addr = s.scheduler_addr().to_string();
    let with = flags(&[
        ("scheduler", &addr),
        ("internal-token-file", file.to_str().unwrap()),
    ]);
    let c = stdio_client(home.path(), &with).await;
    let text = ok(&c, "vram_status", json!({})).await;
    assert!(text.contains("simulated"), "{text}");
    let without = flags(&[
        ("scheduler", &addr),
        ("internal-token-file", "/nonexistent/internal-token"),
    ]);
    let c = stdio_client(home.path(), &without).await;
    let text = tool_error(&c, "vram_status", json!({})).await;
    assert!(
        text.contains("Unauthenticated") && text.contains("internal token"),
        "{text}"
    );
    s.shutdown().await;
}

/// Collects the progress notifications the server sends.
#[derive(Clone, Default)]
struct ProgressSink(Arc<Mutex<Vec<String>>>);

impl rmcp::ClientHandler for ProgressSink {
    async fn on_progress(
        &self,
        params: rmcp::model::ProgressNotificationParam,
        _context: rmcp::service::NotificationContext<RoleClient>,
    ) {
        self.0
            .lock()
            .unwrap()
            .push(params.message.unwrap_or_default());
    }
}

/// `load_model` of a model that has to wait for GPU memory tells the client where it stands
/// (MCP progress notifications), with the real llama-server: one simulated GPU that holds one of
/// two models, the first one busy (its engine stopped mid-request), so the second one waits in
/// the scheduler's queue until the first one's request ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_model_reports_its_place_in_the_queue_as_progress() {
    use securellm_proto::v1 as pb;
    use tokio_stream::StreamExt;
    let home = tempfile::tempdir().unwrap();
    // Holds one model, not two.
    let s = Stack::new()
        .models(&["mcp-a", "mcp-b"])
        .gpu_for("mcp-a", |e| e.gpu_bytes + e.gpu_bytes / 2)
        .manager(|c| c.defaults.idle_ttl_ms = None)
        .start()
        .await;
    let mut backend = s.backend_client().await;
    // A holds memory and serves a request that does not end while its engine is stopped.
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200});
    let mut st = backend
        .chat_stream(pb::InferenceRequest {
            model: "mcp-a".into(),
            body_json: serde_json::to_vec(&body).unwrap(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    loop {
        let c = st.next().await.unwrap().unwrap();
        if !c.data_json.is_empty() {
            break;
        }
    }
    let pid = backend
        .list_instances(pb::ListInstancesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .instances
        .into_iter()
        .find(|i| i.model_name == "mcp-a")
        .unwrap()
        .pid as i32;
    unsafe { libc::kill(pid, libc::SIGSTOP) };

    let sink = ProgressSink::default();
    let (transport, _stderr) = TokioChildProcess::builder(command(
        home.path(),
        &flags(&[
            ("registry", &s.registry_addr().to_string()),
            ("backend", &s.manager_addr().to_string()),
        ]),
    ))
    .stderr(Stdio::inherit())
    .spawn()
    .unwrap();
    let c = sink.clone().serve(transport).await.expect("initialize");
    let mut p = CallToolRequestParams::new("load_model");
    p = p.with_arguments(json!({"name": "mcp-b"}).as_object().unwrap().clone());
    let mut meta = rmcp::model::RequestMetaObject::default();
    meta.set_progress_token(rmcp::model::ProgressToken(
        rmcp::model::NumberOrString::Number(7),
    ));
    p.meta = Some(meta);
    let peer = c.peer().clone();
    let call = tokio::spawn(async move { peer.call_tool(p).await });
    // B waits behind the busy A, and the client hears so.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let seen = sink.0.lock().unwrap().clone();
        if seen
            .iter()
            .any(|m| m.starts_with("mcp-b: queued for GPU memory, position 1"))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no queue progress: {seen:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(!call.is_finished(), "B did not wait");
    // A's request ends; A is idle and yields; B loads.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    while st.next().await.is_some() {}
    let r2 = tokio::time::timeout(std::time::Duration::from_secs(30), call)
        .await
        .expect("load_model returned")
        .unwrap()
        .unwrap();
    let text: String = r2
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect();
    assert!(r2.is_error != Some(true), "{text}");
    assert!(text.starts_with("mcp-b ready"), "{text}");
    c.cancel().await.unwrap();
    s.shutdown().await;
}
