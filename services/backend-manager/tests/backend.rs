//! The backend manager with real parts: the real llama-server (`LLAMA_SERVER`, or the binary
//! `scripts/install-llama-server.sh` builds), the real scheduler and registry over loopback gRPC,
//! generated tiny GGUF models in temporary directories. The services require the internal token
//! (one per test, in its temporary directory), so every call the manager makes to the scheduler and
//! the registry shows it presents the token; the tests' own clients present it too.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use backend_manager::config::{BackendConfig, ModelSettings};
use securellm_common::internal_auth::{AuthChannel, InternalToken, authenticated};
use securellm_proto::v1 as pb;
use securellm_proto::v1::backend_manager_client::BackendManagerClient;
use securellm_proto::v1::vram_scheduler_client::VramSchedulerClient;
use securellm_testkit::models::tiny;
use securellm_testkit::{
    MIB, chat_request as chat, connect, instance, kill9, leases, llama_server, spawn_ready,
    stream_error, stream_start as start_of, wait_for_instance as wait_for,
};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;

/// The kit's stack with this file's clients: the manager's and the scheduler's.
struct Stack {
    kit: securellm_testkit::Stack,
    client: BackendManagerClient<AuthChannel>,
    sched: VramSchedulerClient<AuthChannel>,
}

/// Models `tiny` and `other`, one simulated GPU of `gpu` bytes, the internal token; the manager
/// with a 3 s lease TTL and a 2 s stop grace, then `tweak`.
async fn stack(
    gpu: u64,
    grace_ms: u64,
    tweak: impl FnOnce(&mut BackendConfig) + Send + 'static,
) -> Stack {
    let kit = securellm_testkit::Stack::new()
        .gpu(gpu)
        .eviction_grace_ms(grace_ms)
        .models(&["tiny", "other"])
        .internal_token()
        .manager(|c| {
            c.lease_ttl_ms = 3_000;
            c.stop_grace_ms = 2_000;
            tweak(c);
        })
        .start()
        .await;
    let client = kit.backend_client().await;
    let sched = kit.scheduler_client().await;
    Stack { kit, client, sched }
}

#[tokio::test]
async fn loads_on_demand_with_a_settled_lease_and_answers() {
    let mut s = stack(1 << 30, 10_000, |_| {}).await;
    assert!(leases(&mut s.sched).await.is_empty());
    let r = s.client.chat(chat("tiny", 8)).await.unwrap().into_inner();
    assert_eq!(r.http_status, 200);
    let v: serde_json::Value = serde_json::from_slice(&r.body_json).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "tiny");
    assert_eq!(r.usage.unwrap().completion_tokens, 8);
    assert!(r.load_wait_ms > 0);
    let l = leases(&mut s.sched).await;
    assert_eq!(l.len(), 1, "one lease while loaded");
    let i = instance(&mut s.client, "tiny").await;
    assert_eq!(i.state, pb::InstanceState::Ready as i32);
    assert!(i.pid > 0 && i.port > 0);
    assert!(i.estimated_bytes > 0);
    let measured = i.measured_bytes.expect("buffer sizes parsed from the log");
    assert_eq!(
        l[0].bytes, measured,
        "the lease was settled to the measured size"
    );
    // Second request: no load.
    let r2 = s.client.chat(chat("tiny", 4)).await.unwrap().into_inner();
    assert_eq!(r2.load_wait_ms, 0);
    // Unload releases the lease after the process exits.
    let pid = i.pid as i32;
    let u = s
        .client
        .unload(pb::UnloadRequest {
            model: "tiny".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(u.was_loaded);
    assert!(leases(&mut s.sched).await.is_empty());
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists() || is_zombie_free(pid));
}

fn is_zombie_free(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| !s.contains(") Z"))
}

/// A model no GPU could ever hold: refused at once, by reason (the scheduler's NEVER_FITS, read by
/// the manager without looking at words) and with the reason the gateway maps to
/// `insufficient_gpu_memory`; nothing is leased, nothing spawned.
#[tokio::test]
async fn a_model_bigger_than_any_gpu_is_refused_at_once_by_reason() {
    use securellm_common::errors::{Reason, reason_of};
    let mut s = stack(MIB, 10_000, |_| {}).await;
    let t = std::time::Instant::now();
    let e = s.client.chat(chat("tiny", 2)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert_eq!(reason_of(&e), Some(Reason::InsufficientGpuMemory), "{e:?}");
    assert!(e.message().contains("can never fit"), "{e:?}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    assert!(leases(&mut s.sched).await.is_empty());
}

/// `Load` answers the instance as it is once the load's own hold is gone: ready, nothing in
/// flight (the actor sees the dropped ticket before the view it is asked for; this raced).
#[tokio::test]
async fn load_answers_ready_with_nothing_in_flight() {
    let mut s = stack(1 << 30, 10_000, |_| {}).await;
    for _ in 0..20 {
        let i = s
            .client
            .load(pb::LoadRequest {
                model: "tiny".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(i.state, pb::InstanceState::Ready as i32, "{i:?}");
        assert_eq!(i.in_flight, 0, "{i:?}");
    }
}

#[tokio::test]
async fn fifty_concurrent_first_requests_cause_one_load() {
    let mut s = stack(1 << 30, 10_000, |_| {}).await;
    let mut events = s
        .client
        .watch_instances(pb::WatchInstancesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let mut c = s.client.clone();
        tasks.push(tokio::spawn(async move { c.chat(chat("tiny", 2)).await }));
    }
    for t in tasks {
        let r = t.await.unwrap().unwrap().into_inner();
        assert_eq!(
            r.http_status,
            200,
            "{}",
            String::from_utf8_lossy(&r.body_json)
        );
    }
    let i = instance(&mut s.client, "tiny").await;
    assert_eq!(i.requests_total, 50);
    assert_eq!(i.crash_count, 0);
    let mut leasing = 0;
    while let Ok(Some(Ok(e))) =
        tokio::time::timeout(Duration::from_millis(300), events.next()).await
    {
        if e.kind == pb::InstanceEventKind::StateChanged as i32
            && e.instance.as_ref().unwrap().state == pb::InstanceState::Leasing as i32
        {
            leasing += 1;
        }
    }
    assert_eq!(leasing, 1, "exactly one load");
    assert_eq!(leases(&mut s.sched).await.len(), 1);
}

#[tokio::test]
async fn streams_token_by_token() {
    let mut s = stack(1 << 30, 10_000, |_| {}).await;
    let mut st = s
        .client
        .chat_stream(chat("tiny", 16))
        .await
        .unwrap()
        .into_inner();
    // A cold model: the request hears where it stands while it waits (leasing, starting).
    let (start, progress) = start_of(&mut st).await;
    assert_eq!(start.http_status, 200);
    let phases: Vec<i32> = progress.iter().map(|p| p.phase).collect();
    assert!(
        phases.contains(&(pb::load_progress::Phase::Starting as i32)),
        "{progress:?}"
    );
    assert!(progress.iter().all(|p| p.model == "tiny"));
    let mut chunks = 0;
    let mut usage_only = 0;
    let mut text = String::new();
    while let Some(c) = st.next().await {
        let c = c.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&c.data_json).unwrap();
        if c.usage_only {
            usage_only += 1;
            assert_eq!(c.usage.unwrap().completion_tokens, 16);
            continue;
        }
        chunks += 1;
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
    }
    assert!(chunks >= 10, "token by token: {chunks} chunks");
    assert_eq!(usage_only, 1, "the manager's own usage chunk is marked");
    assert!(!text.is_empty());
}

#[tokio::test]
async fn idle_unload_then_reload_and_a_request_during_unload_waits() {
    let mut s = stack(1 << 30, 10_000, |c| {
        c.defaults.idle_ttl_ms = Some(300);
        c.stop_grace_ms = 2_000;
    })
    .await;
    s.client.chat(chat("tiny", 2)).await.unwrap();
    let i = wait_for(&mut s.client, "tiny", |i| {
        i.state == pb::InstanceState::Stopped as i32
    })
    .await;
    assert_eq!(i.lease_id, "");
    assert!(
        leases(&mut s.sched).await.is_empty(),
        "idle unload released the lease"
    );
    // Reload on the next request.
    let r = s.client.chat(chat("tiny", 2)).await.unwrap().into_inner();
    assert_eq!(r.http_status, 200);
    assert!(r.load_wait_ms > 0);
    // A request racing an unload: start the unload, then ask at once.
    let mut c2 = s.client.clone();
    let unload = tokio::spawn(async move {
        c2.unload(pb::UnloadRequest {
            model: "tiny".into(),
            ..Default::default()
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(5)).await;
    let r = s.client.chat(chat("tiny", 2)).await.unwrap().into_inner();
    assert_eq!(
        r.http_status, 200,
        "a request during an unload waits and reloads"
    );
    unload.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_crashed_child_fails_in_flight_requests_and_the_next_request_restarts_it() {
    let mut s = stack(1 << 30, 10_000, |_| {}).await;
    s.client.chat(chat("tiny", 2)).await.unwrap();
    let pid = instance(&mut s.client, "tiny").await.pid as i32;
    let mut st = s
        .client
        .chat_stream(chat("tiny", 100_000))
        .await
        .unwrap()
        .into_inner();
    st.next().await.unwrap().unwrap();
    st.next().await.unwrap().unwrap();
    kill9(pid as u32);
    let err = stream_error(&mut st, Duration::from_secs(10))
        .await
        .expect("the stream must end with an error");
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert!(err.message().contains("crashed"), "{}", err.message());
    let i = wait_for(&mut s.client, "tiny", |i| {
        i.state == pb::InstanceState::Failed as i32
    })
    .await;
    assert_eq!(i.crash_count, 1);
    assert!(i.last_error.contains("signal 9"), "{}", i.last_error);
    // The lease was released with the crash; the next request restarts it.
    for _ in 0..50 {
        if leases(&mut s.sched).await.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        leases(&mut s.sched).await.is_empty(),
        "no lease leaked after the crash"
    );
    let r = s.client.chat(chat("tiny", 2)).await.unwrap().into_inner();
    assert_eq!(r.http_status, 200);
    assert_eq!(leases(&mut s.sched).await.len(), 1);
}

#[tokio::test]
async fn a_higher_priority_lease_evicts_the_instance_which_drains_and_stops() {
    let mut s = stack(256 * MIB, 5_000, |_| {}).await;
    s.client.chat(chat("tiny", 2)).await.unwrap();
    let before = leases(&mut s.sched).await;
    assert_eq!(before.len(), 1);
    // Someone with priority 10 wants more than is left.
    let mut stream = s
        .sched
        .acquire_lease(pb::AcquireLeaseRequest {
            holder: "important".into(),
            bytes: 255 * MIB,
            priority: 10,
            gpu_index: None,
            ttl_ms: 60_000,
            wait_ms: 20_000,
            label: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let granted = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(u) = stream.next().await {
            if let Some(pb::acquire_lease_update::Update::Granted(l)) = u.unwrap().update {
                return l;
            }
        }
        panic!("no grant");
    })
    .await
    .unwrap();
    assert_eq!(granted.holder, "important");
    let i = wait_for(&mut s.client, "tiny", |i| {
        i.state == pb::InstanceState::Stopped as i32
    })
    .await;
    assert_eq!(i.lease_id, "");
    let l = leases(&mut s.sched).await;
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].holder, "important", "the lease moved");
}

#[tokio::test]
async fn bad_input_gets_clear_errors_and_leaks_nothing() {
    let mut s = stack(1 << 30, 10_000, |_| {}).await;
    let e = s.client.chat(chat("no-such-model", 2)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    // The registry's reason crosses the manager: a program reads "no such model" without words.
    assert_eq!(
        securellm_common::errors::reason_of(&e),
        Some(securellm_common::errors::Reason::ModelNotFound),
        "{e:?}"
    );
    let mut bad = chat("tiny", 2);
    bad.body_json = b"{\"messages\": \"not a list\"}".to_vec();
    let e = s.client.chat(bad).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("messages"));
    // A GGUF our parser accepts but llama.cpp refuses (unknown tokenizer).
    let mut w = securellm_gguf::testmodels::tiny_llama_writer(&tiny("weird", 3)).unwrap();
    w.set_metadata(
        "tokenizer.ggml.model",
        securellm_gguf::MetadataValue::String("nosuchtokenizer".into()),
    )
    .unwrap();
    w.write_file(s.kit.models_dir().join("weird.gguf")).unwrap();
    let mut reg = s.kit.registry_client().await;
    let mut r = reg
        .rescan(pb::RescanRequest::default())
        .await
        .unwrap()
        .into_inner();
    while r.next().await.is_some() {}
    let e = s.client.chat(chat("weird", 2)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("could not start"), "{}", e.message());
    assert!(
        leases(&mut s.sched).await.is_empty(),
        "the lease was released after the failed start"
    );
    let i = instance(&mut s.client, "weird").await;
    assert_eq!(i.state, pb::InstanceState::Failed as i32);
    assert_eq!(i.pid, 0);
}

#[tokio::test]
async fn two_models_that_do_not_fit_together_wait_or_evict_by_priority() {
    let mut s = stack(1 << 30, 2_000, |c| {
        c.models.insert(
            "other".into(),
            ModelSettings {
                priority: Some(5),
                ..Default::default()
            },
        );
    })
    .await;
    s.client.chat(chat("tiny", 2)).await.unwrap();
    // Leave room for half of "other" only: it cannot load beside "tiny", but can once "tiny" is
    // evicted.
    let mut reg = s.kit.registry_client().await;
    let need = reg
        .estimate(pb::EstimateRequest {
            model: "other".into(),
            context: 512,
            parallel: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .gpu_bytes;
    let l = leases(&mut s.sched).await[0].bytes;
    assert!(
        l >= need / 2,
        "tiny's lease {l} must free enough for other's {need}"
    );
    s.sched
        .set_simulated_foreign_usage(pb::SetSimulatedForeignUsageRequest {
            gpu_index: 0,
            foreign_bytes: (1 << 30) - l - need / 2,
        })
        .await
        .unwrap();
    // "other" has a higher priority: "tiny" is evicted, "other" answers.
    let r = s.client.chat(chat("other", 2)).await.unwrap().into_inner();
    assert_eq!(r.http_status, 200);
    wait_for(&mut s.client, "tiny", |i| {
        i.state == pb::InstanceState::Stopped as i32
    })
    .await;
    // "tiny" (priority 0) cannot evict "other": with a short deadline it runs out of time.
    let mut req = chat("tiny", 2);
    req.deadline_ms = securellm_common::time::now_ms() + 1_500;
    let e = s.client.chat(req).await.unwrap_err();
    assert!(
        matches!(e.code(), Code::ResourceExhausted | Code::DeadlineExceeded),
        "{e:?}"
    );
    let l = leases(&mut s.sched).await;
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].label, "other");
    let st = s
        .sched
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let g = &st.gpus[0];
    assert!(g.leased_bytes + g.foreign_bytes + g.reserve_bytes <= g.total_bytes);
}

#[tokio::test]
async fn a_manager_killed_with_sigkill_leaves_no_child_running() {
    let s = stack(1 << 30, 10_000, |_| {}).await;
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_backend-manager"));
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--scheduler",
        &s.kit.scheduler_addr().to_string(),
    ])
    .arg("--internal-token-file")
    .arg(s.kit.token_file())
    .args(["--registry", &s.kit.registry_addr().to_string()])
    .arg("--llama-server")
    .arg(llama_server())
    .stderr(Stdio::null());
    let (mut child, line) = spawn_ready(cmd, Duration::from_secs(60)).await;
    // `ready backend-manager grpc=HOST:PORT metrics=HOST:PORT`
    assert!(line.starts_with("ready backend-manager "), "{line}");
    let addr = securellm_testkit::ready_word(&line, "grpc=");
    let mut c = BackendManagerClient::new(connect(&addr, s.kit.token()).await);
    c.chat(chat("tiny", 2)).await.unwrap();
    let pid = instance(&mut c, "tiny").await.pid;
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let mut gone = false;
    for _ in 0..100 {
        if !Path::new(&format!("/proc/{pid}")).exists() || !is_zombie_free(pid as i32) {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "llama-server {pid} outlived its manager");
    drop(s.kit);
}

async fn spawn_scheduler(
    listen: &str,
    data_dir: &Path,
    token_file: &Path,
) -> (tokio::process::Child, String) {
    let mut cmd = tokio::process::Command::new(securellm_testkit::binary("vram-scheduler"));
    cmd.args(["--listen", listen, "--simulate-gpu", "1GiB", "--data-dir"])
        .arg(data_dir)
        .arg("--internal-token-file")
        .arg(token_file)
        .stderr(Stdio::null());
    let (child, line) = spawn_ready(cmd, Duration::from_secs(20)).await;
    // `ready vram-scheduler grpc=HOST:PORT metrics=HOST:PORT`
    assert!(line.starts_with("ready vram-scheduler "), "{line}");
    let addr = securellm_testkit::ready_word(&line, "grpc=");
    (child, addr)
}

#[tokio::test]
async fn after_a_scheduler_restart_the_manager_reattaches_and_nothing_is_double_booked() {
    // A real scheduler process (so that killing it really drops every connection).
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("internal-token");
    let token = securellm_common::internal_auth::load_or_create(&token_file).unwrap();
    let (mut sched_proc, addr) =
        spawn_scheduler("127.0.0.1:0", &dir.path().join("sched-a"), &token_file).await;
    let kit = securellm_testkit::Stack::new()
        .models(&["tiny"])
        .with_token(token.clone())
        .external_scheduler(&addr)
        .manager(|c| c.lease_ttl_ms = 3_000)
        .start()
        .await;
    let mut client = kit.backend_client().await;
    client.chat(chat("tiny", 2)).await.unwrap();
    let mut c = VramSchedulerClient::new(connect(&addr, Some(&token)).await);
    let before = leases(&mut c).await;
    assert_eq!(before.len(), 1);
    // kill -9 the scheduler and start a fresh one on the same port with an empty data dir: it
    // knows nothing of the lease.
    sched_proc.start_kill().unwrap();
    sched_proc.wait().await.unwrap();
    let (_sched2, _) = spawn_scheduler(&addr, &dir.path().join("sched-b"), &token_file).await;
    let mut c = VramSchedulerClient::new(connect(&addr, Some(&token)).await);
    let mut after = Vec::new();
    for _ in 0..100 {
        after = leases(&mut c).await;
        if !after.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(after.len(), 1, "the manager re-attached its lease");
    assert_eq!(after[0].id, before[0].id);
    assert_eq!(after[0].bytes, before[0].bytes);
    // Nobody else can take that memory: it is booked once, for the manager.
    let st = c
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.gpus[0].leased_bytes, before[0].bytes);
    // The model keeps answering without a reload.
    let r = client.chat(chat("tiny", 2)).await.unwrap().into_inner();
    assert_eq!(r.http_status, 200);
    assert_eq!(r.load_wait_ms, 0, "no reload");
    kit.shutdown().await;
}

#[tokio::test]
async fn a_load_with_other_settings_is_refused_until_the_model_is_unloaded() {
    let mut s = stack(1 << 30, 10_000, |_| {}).await;
    let load = |ctx: i64| pb::LoadRequest {
        model: "tiny".into(),
        settings: Some(pb::InstanceSettings {
            context: Some(ctx),
            ..Default::default()
        }),
        deadline_ms: 0,
    };
    // The configured default context is 512: asking for it explicitly is the same instance.
    s.client.load(load(512)).await.unwrap();
    s.client.load(load(512)).await.unwrap();
    let e = s.client.load(load(1024)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("context 512 → 1024"), "{e:?}");
    assert!(e.message().contains("unload it first"), "{e:?}");
    // A plain request (no explicit settings) uses what is loaded.
    // Nothing changed: it still answers, on one lease.
    let r = s.client.chat(chat("tiny", 2)).await.unwrap().into_inner();
    assert_eq!(r.http_status, 200);
    assert_eq!(leases(&mut s.sched).await.len(), 1);
    // After an unload the new settings apply.
    s.client
        .unload(pb::UnloadRequest {
            model: "tiny".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let i = s.client.load(load(1024)).await.unwrap().into_inner();
    assert_eq!(i.settings.unwrap().context, Some(1024));
    assert_eq!(
        leases(&mut s.sched).await.len(),
        1,
        "one instance, one lease"
    );
    let r = s.client.chat(chat("tiny", 2)).await.unwrap().into_inner();
    assert_eq!(r.http_status, 200);
    let all = s
        .client
        .list_instances(pb::ListInstancesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .instances;
    assert_eq!(all.len(), 1, "the replaced instance is gone: {all:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawn_eviction_notice_calls_the_drain_off_and_the_model_stays() {
    let mut s = stack(1 << 30, 30_000, |c| {
        c.defaults.context = Some(8192);
    })
    .await;
    // A long request keeps the instance busy (draining waits for it).
    let mut body: serde_json::Value =
        serde_json::from_slice(&chat("tiny", 6000).body_json).unwrap();
    body["ignore_eos"] = true.into();
    let mut st = s
        .client
        .chat_stream(pb::InferenceRequest {
            model: "tiny".into(),
            body_json: serde_json::to_vec(&body).unwrap(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(start_of(&mut st).await.0.http_status, 200);
    let lease = leases(&mut s.sched).await.pop().expect("a lease");
    let gpu = s
        .sched
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .gpus
        .remove(0);
    // A higher-priority request that fits only if the instance goes; it gives up after 0.3 s.
    let mut want = s
        .sched
        .acquire_lease(pb::AcquireLeaseRequest {
            holder: "other".into(),
            bytes: gpu.free_bytes + lease.bytes / 2,
            priority: 10,
            gpu_index: None,
            ttl_ms: 60_000,
            wait_ms: 300,
            label: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    wait_for(&mut s.client, "tiny", |i| {
        i.state == pb::InstanceState::Draining as i32
    })
    .await;
    // The request times out at the scheduler; the notice is withdrawn; the instance is ready again.
    while let Some(Ok(_)) = want.next().await {}
    let i = wait_for(&mut s.client, "tiny", |i| {
        i.state == pb::InstanceState::Ready as i32 || i.state == pb::InstanceState::Busy as i32
    })
    .await;
    assert_eq!(i.lease_id, lease.id, "same lease, never released");
    let mut tokens = 0;
    while let Some(c) = st.next().await {
        let c = c.expect("the in-flight request finishes");
        if let Some(u) = c.usage {
            tokens = u.completion_tokens;
        }
    }
    assert!(tokens > 0);
    assert_eq!(leases(&mut s.sched).await.len(), 1);
    let r = s.client.chat(chat("tiny", 2)).await.unwrap().into_inner();
    assert_eq!((r.http_status, r.load_wait_ms), (200, 0), "still loaded");
}

/// A long streaming request for `tiny` (≈ 2 s of tokens here) with an absolute deadline.
fn long_stream(deadline_ms: u64) -> pb::InferenceRequest {
    let mut body: serde_json::Value =
        serde_json::from_slice(&chat("tiny", 12000).body_json).unwrap();
    body["ignore_eos"] = true.into();
    pb::InferenceRequest {
        model: "tiny".into(),
        body_json: serde_json::to_vec(&body).unwrap(),
        deadline_ms,
        ..Default::default()
    }
}

/// Read a stream to its end: (data chunks, the error that ended it).
async fn drain_stream(
    st: &mut tonic::Streaming<pb::InferenceChunk>,
) -> (usize, Option<tonic::Status>) {
    let mut n = 0;
    while let Some(c) = st.next().await {
        match c {
            Ok(_) => n += 1,
            Err(e) => return (n, Some(e)),
        }
    }
    (n, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_at_its_deadline_and_when_the_engine_stalls() {
    let mut s = stack(1 << 30, 10_000, |c| {
        c.defaults.context = Some(16384);
        c.stall_timeout_ms = 800;
    })
    .await;
    s.client
        .load(pb::LoadRequest {
            model: "tiny".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // The deadline passes mid-stream: DEADLINE_EXCEEDED after some tokens, the slot is freed.
    let now = securellm_common::time::now_ms();
    let mut st = s
        .client
        .chat_stream(long_stream(now + 1000))
        .await
        .unwrap()
        .into_inner();
    let (chunks, end) = drain_stream(&mut st).await;
    let e = end.expect("ended by the deadline");
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(chunks > 1, "it had started streaming");
    wait_for(&mut s.client, "tiny", |i| {
        i.in_flight == 0 && i.state == pb::InstanceState::Ready as i32
    })
    .await;
    // The engine stops producing (SIGSTOP): ABORTED after the stall timeout, not a hang.
    let pid = instance(&mut s.client, "tiny").await.pid as i32;
    let mut st = s
        .client
        .chat_stream(long_stream(0))
        .await
        .unwrap()
        .into_inner();
    // Wait for the first token: the stall clock starts there (prompt processing before it is
    // bounded by the deadline alone).
    loop {
        let c = st.next().await.unwrap().unwrap();
        if !c.data_json.is_empty() {
            break;
        }
    }
    let _ = std::process::Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status();
    let started = std::time::Instant::now();
    let (_, end) = tokio::time::timeout(Duration::from_secs(20), drain_stream(&mut st))
        .await
        .expect("the stall is noticed");
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &pid.to_string()])
        .status();
    let e = end.expect("ended by the stall");
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    assert!(e.message().contains("sent nothing"), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// Nobody walks around the gateway: the manager refuses every call without the internal token (and
/// loads nothing for it), and its llama-server child refuses requests without the child's own API
/// key, which is in the child's environment, never on its command line.
#[tokio::test]
async fn callers_without_the_token_or_the_childs_key_are_refused() {
    let mut s = stack(1 << 30, 10_000, |_| {}).await;
    let ch = Channel::from_shared(format!("http://{}", s.kit.manager_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let wrong = InternalToken::generate();
    for (what, t) in [("no token", None), ("a wrong token", Some(&wrong))] {
        let mut c = BackendManagerClient::new(authenticated(ch.clone(), t));
        let e = c.chat(chat("tiny", 2)).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{what}: {e:?}");
        let e = c.chat_stream(chat("tiny", 2)).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{what}: {e:?}");
        let e = c
            .load(pb::LoadRequest {
                model: "tiny".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{what}: {e:?}");
        let e = c
            .list_instances(pb::ListInstancesRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{what}: {e:?}");
    }
    assert!(
        leases(&mut s.sched).await.is_empty(),
        "nothing was loaded for the refused calls"
    );

    // With the token the model loads; its child wants a key of its own.
    s.client.chat(chat("tiny", 2)).await.unwrap();
    let i = instance(&mut s.client, "tiny").await;
    let base = format!("http://127.0.0.1:{}", i.port);
    let http = reqwest::Client::new();
    let body = serde_json::json!({
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2
    });
    let post = |path: &str, key: Option<&str>| {
        let r = http.post(format!("{base}{path}")).json(&body);
        match key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    };
    for (what, key) in [
        ("no key", None),
        ("a wrong key", Some(wrong.expose())),
        ("the internal token", Some(s.kit.token().unwrap().expose())),
    ] {
        for path in ["/v1/chat/completions", "/completion", "/slots"] {
            let r = post(path, key).send().await.unwrap();
            assert_eq!(r.status().as_u16(), 401, "{path} with {what}");
        }
    }
    let r = http.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200, "health checks stay open");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", i.pid)).unwrap();
    let environ = std::fs::read(format!("/proc/{}/environ", i.pid)).unwrap();
    let key = environ
        .split(|b| *b == 0)
        .find_map(|v| v.strip_prefix(b"LLAMA_API_KEY="))
        .map(|k| String::from_utf8(k.to_vec()).unwrap())
        .expect("the key is in the child's environment");
    assert_eq!(key.len(), 64);
    assert!(
        !cmdline.windows(key.len()).any(|w| w == key.as_bytes()),
        "the key is not on the command line (every local user can read it)"
    );
    let r = post("/v1/chat/completions", Some(&key))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        200,
        "the child's own key is the one it checks"
    );
}
