//! The Ollama, vLLM and TGI backends through the whole manager (real scheduler and registry over
//! loopback gRPC), against fakes that speak the engines' real HTTP APIs and accept their command
//! lines (`tests/fakes/`): the real engines cannot run on this machine.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use backend_manager::config::{BackendConfig, EngineConfig, OllamaConfig};
use securellm_common::internal_auth::AuthChannel;
use securellm_proto::v1 as pb;
use securellm_proto::v1::backend_manager_client::BackendManagerClient;
use securellm_proto::v1::vram_scheduler_client::VramSchedulerClient;
use securellm_testkit::models::{write_ollama, write_safetensors};
use securellm_testkit::{
    MIB, alive as running, fake, instance, instances, kill9, leases, no_lease_left, spawn_ready,
    stream_error, stream_start as start_of, wait_for_instance as wait_for,
};
use serde_json::Value;
use tokio_stream::StreamExt;
use tonic::Code;

/// The kit's stack with this file's clients, and the simulated GPU's size.
struct Stack {
    kit: securellm_testkit::Stack,
    client: BackendManagerClient<AuthChannel>,
    sched: VramSchedulerClient<AuthChannel>,
    gpu: u64,
}

/// What the manager asks the scheduler for (as `instance.rs` computes it) from the estimate.
fn lease_size(e: &pb::MemoryEstimate) -> u64 {
    e.gpu_bytes.max(e.total_bytes.min(1 << 20)).max(1)
}

/// Models written by `write` under the registry's root; the simulated GPU is 1 GiB, or four times
/// the lease `size_for` needs (so a memory fraction lease / total is about 0.25, not clamped).
async fn stack(
    write: impl FnOnce(&Path) + Send + 'static,
    size_for: Option<&str>,
    tweak: impl FnOnce(&mut BackendConfig) + Send + 'static,
) -> Stack {
    let b = securellm_testkit::Stack::new()
        .write_models(write)
        .eviction_grace_ms(10_000)
        .manager(|c| {
            c.lease_ttl_ms = 3_000;
            c.stop_grace_ms = 2_000;
            c.start_timeout_ms = 20_000;
            tweak(c);
        });
    let kit = match size_for {
        Some(m) => b.gpu_for(m, |e| 4 * lease_size(e)),
        None => b.gpu(1u64 << 30),
    }
    .start()
    .await;
    let client = kit.backend_client().await;
    let sched = kit.scheduler_client().await;
    let gpu = kit.gpus()[0];
    Stack {
        kit,
        client,
        sched,
        gpu,
    }
}

fn chat(model: &str, max_tokens: u32) -> pb::InferenceRequest {
    pb::InferenceRequest {
        model: model.into(),
        body_json: serde_json::to_vec(&serde_json::json!({
            "model": "whatever-the-client-said",
            "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": max_tokens,
        }))
        .unwrap(),
        ..Default::default()
    }
}

/// Chat through the manager, non-streaming then streaming; returns the non-streaming body.
async fn chat_both_ways(c: &mut BackendManagerClient<AuthChannel>, model: &str) -> Value {
    let r = c.chat(chat(model, 5)).await.unwrap().into_inner();
    assert_eq!(
        r.http_status,
        200,
        "{}",
        String::from_utf8_lossy(&r.body_json)
    );
    let v: Value = serde_json::from_slice(&r.body_json).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "tok0 tok1 tok2 tok3 tok4 "
    );
    assert_eq!(r.usage.unwrap().completion_tokens, 5);

    let mut st = c.chat_stream(chat(model, 4)).await.unwrap().into_inner();
    assert_eq!(start_of(&mut st).await.0.http_status, 200);
    let (mut text, mut usage_only) = (String::new(), 0);
    while let Some(m) = st.next().await {
        let m = m.unwrap();
        if m.usage_only {
            usage_only += 1;
            assert_eq!(m.usage.unwrap().completion_tokens, 4);
            continue;
        }
        let d: Value = serde_json::from_slice(&m.data_json).unwrap();
        if let Some(t) = d["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
    }
    assert_eq!(text, "tok0 tok1 tok2 tok3 ");
    assert_eq!(
        usage_only, 1,
        "the usage chunk the manager asked for is marked"
    );
    v
}

/// The fake Ollama daemon on a free port; killed when dropped.
struct FakeOllama {
    _child: tokio::process::Child,
    url: String,
    http: reqwest::Client,
}

impl FakeOllama {
    async fn start(models: &[&str], size_vram: u64) -> Self {
        let mut cmd = tokio::process::Command::new("python3");
        cmd.arg(fake("fake_ollama.py")).args([
            "--port",
            "0",
            "--size-vram",
            &size_vram.to_string(),
        ]);
        for m in models {
            cmd.args(["--model", m]);
        }
        let (child, line) = spawn_ready(cmd, Duration::from_secs(30)).await;
        let url = line
            .strip_prefix("fake ollama listening on ")
            .unwrap()
            .to_string();
        securellm_common::tls::install_crypto_provider();
        Self {
            _child: child,
            url,
            http: reqwest::Client::new(),
        }
    }

    async fn get(&self, path: &str) -> Value {
        let r = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap();
        serde_json::from_slice(&r.bytes().await.unwrap()).unwrap()
    }

    async fn loaded(&self) -> Vec<String> {
        self.get("/api/ps").await["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap().to_string())
            .collect()
    }
}

#[tokio::test]
async fn ollama_loads_through_the_daemon_settles_the_lease_to_size_vram_and_unloads_with_keep_alive_0()
 {
    let size_vram = 200 * MIB + 12_345;
    let daemon = FakeOllama::start(&["llamette:3b"], size_vram).await;
    let url = daemon.url.clone();
    let mut s = stack(
        |r| {
            write_ollama(r, "llamette", "3b", 1);
        },
        None,
        |c| c.ollama = Some(OllamaConfig { url }),
    )
    .await;
    assert!(daemon.loaded().await.is_empty());

    let v = chat_both_ways(&mut s.client, "llamette:3b").await;
    assert_eq!(
        v["model"], "llamette:3b",
        "Ollama's name:tag is sent as `model`"
    );

    let i = instance(&mut s.client, "llamette:3b").await;
    assert_eq!(i.backend, pb::BackendKind::Ollama as i32);
    assert_eq!(i.state, pb::InstanceState::Ready as i32);
    assert_eq!(i.pid, 0, "nothing spawned");
    assert_eq!(i.endpoint, daemon.url);
    assert_eq!(
        i.port,
        daemon
            .url
            .rsplit(':')
            .next()
            .unwrap()
            .parse::<u32>()
            .unwrap()
    );
    assert_eq!(i.measured_bytes, Some(size_vram), "from /api/ps size_vram");
    let l = leases(&mut s.sched).await;
    assert_eq!(l.len(), 1);
    assert_eq!(
        l[0].bytes, size_vram,
        "the lease covers what Ollama reports"
    );
    assert_eq!(i.lease_bytes, size_vram);
    assert_eq!(daemon.loaded().await, vec!["llamette:3b".to_string()]);
    let log = daemon.get("/fake/log").await;
    assert_eq!(log.as_array().unwrap().len(), 1, "one load: {log}");
    assert_eq!(log[0]["keep_alive"], -1);
    assert_eq!(log[0]["prompt"], "");
    // The registry learnt what Ollama used.
    let e = s
        .kit
        .registry_client()
        .await
        .estimate(pb::EstimateRequest {
            model: "llamette:3b".into(),
            context: 512,
            parallel: 1,
            cache_type: pb::KvCacheType::F16 as i32,
            gpu_layers: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(e.from_measurement, "{e:?}");
    assert_eq!(e.gpu_bytes, size_vram);

    let u = s
        .client
        .unload(pb::UnloadRequest {
            model: "llamette:3b".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(u.was_loaded);
    assert!(daemon.loaded().await.is_empty(), "unloaded in Ollama");
    let log = daemon.get("/fake/log").await;
    assert_eq!(log[1]["keep_alive"], 0);
    assert_eq!(log[1]["model"], "llamette:3b");
    assert!(leases(&mut s.sched).await.is_empty(), "lease released");
    assert_eq!(
        instance(&mut s.client, "llamette:3b").await.state,
        pb::InstanceState::Stopped as i32
    );
    // The next request loads it again.
    let r = s
        .client
        .chat(chat("llamette:3b", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.http_status, 200);
    assert!(r.load_wait_ms > 0);
    assert_eq!(daemon.loaded().await.len(), 1);
}

#[tokio::test]
async fn ollama_missing_model_or_unreachable_daemon_is_a_clear_error_and_leaks_nothing() {
    // The daemon has one of the two models of the store.
    let daemon = FakeOllama::start(&["llamette:3b"], 100 * MIB).await;
    let url = daemon.url.clone();
    let mut s = stack(
        |r| {
            write_ollama(r, "llamette", "3b", 1);
            write_ollama(r, "absent", "7b", 2);
        },
        None,
        |c| c.ollama = Some(OllamaConfig { url }),
    )
    .await;
    let e = s.client.chat(chat("absent:7b", 2)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains("does not have model \"absent:7b\"")
            && e.message().contains("not found"),
        "{}",
        e.message()
    );
    assert!(no_lease_left(&mut s.sched).await);
    let i = instance(&mut s.client, "absent:7b").await;
    assert_eq!(i.state, pb::InstanceState::Failed as i32);
    assert!(i.last_error.contains("not found"), "{}", i.last_error);

    // A daemon that is not there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut s = stack(
        |r| {
            write_ollama(r, "llamette", "3b", 1);
        },
        None,
        move |c| {
            c.ollama = Some(OllamaConfig {
                url: format!("http://127.0.0.1:{port}"),
            })
        },
    )
    .await;
    let e = s.client.chat(chat("llamette:3b", 2)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message()
            .contains("the Ollama daemon at http://127.0.0.1:")
            && e.message().contains("unreachable"),
        "{}",
        e.message()
    );
    assert!(no_lease_left(&mut s.sched).await);
}

#[tokio::test]
async fn an_ollama_model_without_an_ollama_daemon_is_served_by_llama_cpp_from_its_blob() {
    let mut s = stack(
        |r| {
            write_ollama(r, "llamette", "3b", 1);
        },
        None,
        |_| {},
    )
    .await;
    let r = s
        .client
        .chat(chat("llamette:3b", 3))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.http_status,
        200,
        "{}",
        String::from_utf8_lossy(&r.body_json)
    );
    let i = instance(&mut s.client, "llamette:3b").await;
    assert_eq!(i.backend, pb::BackendKind::LlamaCpp as i32);
    assert!(i.pid > 0);
    assert!(i.measured_bytes.is_some());
}

/// `env VAR=FILE ... python3 fake_openai_engine.py <mode>`: the fake records what it got.
fn engine_command(dir: &Path, mode: &[&str], extra_env: &[&str]) -> Vec<String> {
    let mut c = vec![
        "env".to_string(),
        format!("FAKE_ENGINE_ARGS={}", dir.join("argv.json").display()),
        format!("FAKE_ENGINE_ENV={}", dir.join("env.json").display()),
    ];
    c.extend(extra_env.iter().map(|s| s.to_string()));
    c.push("python3".into());
    c.push(fake("fake_openai_engine.py").display().to_string());
    c.extend(mode.iter().map(|s| s.to_string()));
    c
}

fn recorded(dir: &Path) -> (Vec<String>, Value) {
    let argv: Vec<String> =
        serde_json::from_slice(&std::fs::read(dir.join("argv.json")).unwrap()).unwrap();
    let env: Value = serde_json::from_slice(&std::fs::read(dir.join("env.json")).unwrap()).unwrap();
    (argv, env)
}

/// A request straight to the engine's loopback port, without the manager's key: 401.
async fn refused_without_the_key(port: u32) {
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .json(&serde_json::json!({"model": "hf-model", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
}

fn flag<'a>(argv: &'a [String], name: &str) -> &'a str {
    let i = argv
        .iter()
        .position(|a| a == name)
        .unwrap_or_else(|| panic!("{name} missing from {argv:?}"));
    &argv[i + 1]
}

fn fraction(lease: u64, total: u64) -> String {
    format!(
        "{:.4}",
        ((lease as f64 / total as f64 * 10_000.0).floor() / 10_000.0).clamp(0.01, 0.99)
    )
}

#[tokio::test]
async fn vllm_is_spawned_with_its_memory_bounded_to_the_lease_and_a_crash_is_noticed() {
    let rec = tempfile::tempdir().unwrap();
    let cmd = engine_command(rec.path(), &["serve"], &["FAKE_ENGINE_TOKEN_MS=10"]);
    let mut s = stack(
        |r| write_safetensors(r, "hf-model"),
        Some("hf-model"),
        |c| {
            c.vllm = Some(EngineConfig {
                command: Some(cmd),
                endpoint: None,
            });
            // vLLM is preferred when both are configured.
            c.tgi = Some(EngineConfig {
                command: Some(vec!["false".into()]),
                endpoint: None,
            });
        },
    )
    .await;
    let v = chat_both_ways(&mut s.client, "hf-model").await;
    assert_eq!(v["model"], "hf-model", "served under the registry name");

    let i = instance(&mut s.client, "hf-model").await;
    assert_eq!(i.backend, pb::BackendKind::Vllm as i32);
    assert!(i.pid > 0 && i.port > 0);
    assert_eq!(
        i.measured_bytes, None,
        "vLLM reports no sizes: the lease stays"
    );
    let l = leases(&mut s.sched).await;
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].bytes, i.estimated_bytes);

    let (argv, env) = recorded(rec.path());
    assert_eq!(argv[0], "serve");
    let model_dir = s.kit.models_dir().join("hf-model");
    assert_eq!(Path::new(&argv[1]), model_dir, "{argv:?}");
    assert_eq!(flag(&argv, "--host"), "127.0.0.1");
    assert_eq!(flag(&argv, "--port"), i.port.to_string());
    assert_eq!(flag(&argv, "--served-model-name"), "hf-model");
    assert_eq!(flag(&argv, "--max-model-len"), "512");
    assert_eq!(flag(&argv, "--max-num-seqs"), "1");
    let f = flag(&argv, "--gpu-memory-utilization");
    assert_eq!(f, fraction(l[0].bytes, s.gpu), "lease / total");
    let fv: f64 = f.parse().unwrap();
    assert!((0.2..=0.25).contains(&fv), "{f}: not clamped");
    assert!(
        fv * s.gpu as f64 <= l[0].bytes as f64,
        "never more than the lease"
    );
    assert_eq!(
        env["CUDA_VISIBLE_DEVICES"], "",
        "simulated GPU: no GPU visible"
    );
    // The engine got a key of its own (in its environment, not on its command line), the manager
    // sends it, and nobody else gets in without it.
    assert_eq!(env["api_key_set"], true, "{env}");
    assert!(!argv.iter().any(|a| a == "--api-key"), "{argv:?}");
    refused_without_the_key(i.port).await;

    // The engine dies mid-request: noticed at once, the request fails with ABORTED, FAILED,
    // lease released; the next request restarts it.
    let pid = i.pid;
    let mut st = s
        .client
        .chat_stream(chat("hf-model", 500))
        .await
        .unwrap()
        .into_inner();
    st.next().await.unwrap().unwrap();
    st.next().await.unwrap().unwrap();
    kill9(pid);
    let err = stream_error(&mut st, Duration::from_secs(10))
        .await
        .expect("the stream must end with an error");
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert!(err.message().contains("crashed"), "{}", err.message());
    let i = wait_for(&mut s.client, "hf-model", |i| {
        i.state == pb::InstanceState::Failed as i32
    })
    .await;
    assert_eq!(i.crash_count, 1);
    assert!(i.last_error.contains("signal 9"), "{}", i.last_error);
    assert!(
        no_lease_left(&mut s.sched).await,
        "no lease leaked after the crash"
    );
    let r = s
        .client
        .chat(chat("hf-model", 2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.http_status, 200);
    let i = instance(&mut s.client, "hf-model").await;
    assert_eq!(i.state, pb::InstanceState::Ready as i32);
    assert!(i.pid > 0 && i.pid != pid);
    assert_eq!(leases(&mut s.sched).await.len(), 1);

    // Unload stops the child and releases the lease.
    let pid = i.pid;
    s.client
        .unload(pb::UnloadRequest {
            model: "hf-model".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!running(pid), "the engine was stopped");
    assert!(leases(&mut s.sched).await.is_empty());
}

#[tokio::test]
async fn tgi_is_spawned_with_a_cuda_memory_fraction_equal_to_lease_over_total() {
    let rec = tempfile::tempdir().unwrap();
    let cmd = engine_command(rec.path(), &[], &[]);
    let mut s = stack(
        |r| write_safetensors(r, "hf-model"),
        Some("hf-model"),
        |c| {
            c.tgi = Some(EngineConfig {
                command: Some(cmd),
                endpoint: None,
            })
        },
    )
    .await;
    chat_both_ways(&mut s.client, "hf-model").await;
    let i = instance(&mut s.client, "hf-model").await;
    assert_eq!(i.backend, pb::BackendKind::Tgi as i32);
    let l = leases(&mut s.sched).await;
    assert_eq!(l.len(), 1);

    let (argv, env) = recorded(rec.path());
    let model_dir = s.kit.models_dir().join("hf-model");
    assert_eq!(Path::new(flag(&argv, "--model-id")), model_dir);
    assert_eq!(flag(&argv, "--hostname"), "127.0.0.1");
    assert_eq!(flag(&argv, "--port"), i.port.to_string());
    assert_eq!(flag(&argv, "--max-total-tokens"), "512");
    assert_eq!(flag(&argv, "--max-concurrent-requests"), "1");
    let f = flag(&argv, "--cuda-memory-fraction");
    assert_eq!(f, fraction(l[0].bytes, s.gpu), "lease / total");
    assert!((0.2..=0.25).contains(&f.parse::<f64>().unwrap()), "{f}");
    assert!(flag(&argv, "--shard-uds-path").ends_with(&format!("securellm-tgi-{}", i.port)));
    assert_ne!(flag(&argv, "--master-port"), "29500");
    assert_eq!(env["CUDA_VISIBLE_DEVICES"], "");
    assert_eq!(env["api_key_set"], true, "{env}");
    refused_without_the_key(i.port).await;

    // Completions work too.
    let r = s
        .client
        .complete(pb::InferenceRequest {
            model: "hf-model".into(),
            body_json: br#"{"prompt": "one two", "max_tokens": 3}"#.to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.http_status, 200);
    assert_eq!(r.usage.unwrap().completion_tokens, 3);

    let pid = i.pid;
    s.client
        .unload(pb::UnloadRequest {
            model: "hf-model".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!running(pid));
    assert!(leases(&mut s.sched).await.is_empty());
}

#[tokio::test]
async fn an_engine_that_exits_during_start_fails_fast_with_its_output() {
    let rec = tempfile::tempdir().unwrap();
    let cmd = engine_command(
        rec.path(),
        &["serve"],
        &["FAKE_ENGINE_FAIL=torch.OutOfMemoryError: CUDA out of memory"],
    );
    let mut s = stack(
        |r| write_safetensors(r, "hf-model"),
        None,
        |c| {
            c.vllm = Some(EngineConfig {
                command: Some(cmd),
                endpoint: None,
            })
        },
    )
    .await;
    let t = std::time::Instant::now();
    let e = s.client.chat(chat("hf-model", 2)).await.unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(10), "failed fast");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains("vllm could not start model hf-model")
            && e.message().contains("exited during start")
            && e.message().contains("CUDA out of memory"),
        "{}",
        e.message()
    );
    assert!(no_lease_left(&mut s.sched).await);
    let i = instance(&mut s.client, "hf-model").await;
    assert_eq!(i.state, pb::InstanceState::Failed as i32);
    assert_eq!(i.pid, 0);
}

#[tokio::test]
async fn an_attached_vllm_endpoint_is_used_as_it_is() {
    // An engine someone else started (here: the fake, by hand).
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg(fake("fake_openai_engine.py"))
        .args([
            "serve",
            "/somewhere/else",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ])
        .args(["--served-model-name", "their-name"])
        .stderr(Stdio::null());
    let (mut child, line) = spawn_ready(cmd, Duration::from_secs(30)).await;
    let endpoint = line
        .strip_prefix("fake vllm listening on ")
        .unwrap()
        .to_string();
    let ep = endpoint.clone();
    let mut s = stack(
        |r| write_safetensors(r, "hf-model"),
        None,
        |c| {
            c.vllm = Some(EngineConfig {
                command: None,
                endpoint: Some(ep),
            })
        },
    )
    .await;
    let r = s
        .client
        .chat(chat("hf-model", 2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.http_status,
        200,
        "{}",
        String::from_utf8_lossy(&r.body_json)
    );
    let v: Value = serde_json::from_slice(&r.body_json).unwrap();
    assert_eq!(v["model"], "their-name", "the name its /v1/models lists");
    let i = instance(&mut s.client, "hf-model").await;
    assert_eq!((i.pid, i.endpoint.as_str()), (0, endpoint.as_str()));
    s.client
        .unload(pb::UnloadRequest {
            model: "hf-model".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(leases(&mut s.sched).await.is_empty());
    assert!(
        child.try_wait().unwrap().is_none(),
        "an attached engine is not ours to stop"
    );
}

#[tokio::test]
async fn a_safetensors_model_without_vllm_or_tgi_is_failed_precondition_naming_the_config() {
    let mut s = stack(|r| write_safetensors(r, "hf-model"), None, |_| {}).await;
    let e = s.client.chat(chat("hf-model", 2)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("[backend.vllm]") && e.message().contains("[backend.tgi]"),
        "{}",
        e.message()
    );
    assert!(leases(&mut s.sched).await.is_empty());
    assert!(
        instances(&mut s.client).await.is_empty(),
        "no instance made"
    );
}
