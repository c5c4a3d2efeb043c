//! Scenario 5: faults across process boundaries.
//! (a) `kill -9` of the llama-server child mid-stream: the streaming client gets a clean error
//!     (an error event, then the end of the stream; the official client raises), the lease is
//!     released, the next request works;
//! (b) `kill -9` of the backend manager: its children die with it, its leases expire in the
//!     scheduler within their TTL, a manager restarted on the same port serves again;
//! (c) `kill -9` and restart of the scheduler on the same port (with its snapshot, then without):
//!     the manager re-attaches its leases, nothing is booked twice, models answer without a reload;
//! (d) the registry stopped: loaded models still answer, a model that is not loaded fails with a
//!     clear 503, and it loads once the registry is back.

use std::time::{Duration, Instant};

use securellm_e2e::v1 as pb;
use securellm_e2e::{
    LeaseEvents, ModelSpec, Options, Stack, alive, check_invariant, kill9, now_ms, python,
    read_sse, script, wait_until,
};
use tokio::io::AsyncBufReadExt;
use tokio_stream::StreamExt;

async fn leases_of(s: &Stack, model: &str) -> Vec<pb::Lease> {
    s.leases()
        .await
        .into_iter()
        .filter(|l| l.label == model)
        .collect()
}

/// Wait until `model` holds no lease (the crash released it): nothing leaked.
async fn no_lease_for(s: &Stack, model: &str) {
    wait_until(
        &format!("the lease of {model} released"),
        Duration::from_secs(5),
        || async { leases_of(s, model).await.is_empty().then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_llama_server_killed_mid_stream_ends_the_stream_cleanly_and_the_next_request_works() {
    // The bigger model with a long context: a stream runs for seconds, so the kill lands in it.
    let s = Stack::start(Options {
        models: vec![ModelSpec::bigger("big")],
        extra_toml: "[backend.models.big]\ncontext = 2048\n".into(),
        ..Default::default()
    })
    .await;
    let r = s.chat(&s.api_key, "big", 2, "kill-warm").await;
    assert_eq!(r.status, 200, "{r:?}");
    let pid = s.instance("big").await.unwrap().pid;
    assert!(alive(pid));
    assert_eq!(leases_of(&s, "big").await.len(), 1);

    // Raw SSE: kill the child as soon as the first chunk arrives.
    // (Within the gateway's default max_tokens_cap; the context ends the stream before it.)
    let resp = s.chat_stream(&s.api_key, "big", 4_000, "kill-sse").await;
    assert_eq!(resp.status(), 200);
    let started = Instant::now();
    let out = read_sse(resp, Duration::from_secs(30), |i| {
        if i == 0 {
            kill9(pid);
        }
    })
    .await;
    assert!(!out.timed_out, "the stream hung after the crash: {out:?}");
    assert!(out.transport_error.is_none(), "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!out.done(), "a crashed stream must not end with [DONE]");
    let json = out.json();
    let last = json.last().expect("events");
    assert!(json.len() >= 2, "some chunks, then the error: {json:?}");
    let msg = last["error"]["message"].as_str().unwrap_or_else(|| {
        panic!("the last event must be an error object: {last}");
    });
    assert!(msg.contains("crashed"), "{msg}");
    assert!(
        json[..json.len() - 1]
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk"),
        "chunks before the error"
    );
    no_lease_for(&s, "big").await;
    let i = s.instance("big").await.unwrap();
    assert_eq!(i.crash_count, 1, "{i:?}");
    assert!(i.last_error.contains("signal 9"), "{}", i.last_error);
    check_invariant(&s.status().await).unwrap();

    // The next request restarts the model.
    let r = s.chat(&s.api_key, "big", 2, "kill-after-sse").await;
    assert_eq!(r.status, 200, "{r:?}");
    let pid2 = s.instance("big").await.unwrap().pid;
    assert_ne!(pid2, pid);
    assert_eq!(leases_of(&s, "big").await.len(), 1);

    // The same with the official client: it raises, it does not hang.
    let mut child = tokio::process::Command::new(python())
        .arg(script("stream_kill.py"))
        .env("BASE_URL", s.base_url())
        .env("API_KEY", &s.api_key)
        .env("MODEL", "big")
        .env("RID", "kill-py")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("python started streaming")
        .unwrap();
    assert_eq!(first.as_deref(), Some("FIRST"));
    kill9(pid2);
    let last = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("the official client hung after the crash")
        .unwrap()
        .unwrap_or_default();
    assert!(
        last.starts_with("ERROR APIError") && last.contains("crashed"),
        "the openai client must raise: {last}"
    );
    child.wait().await.unwrap();
    no_lease_for(&s, "big").await;
    let r = s.chat(&s.api_key, "big", 2, "kill-after-py").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(s.instance("big").await.unwrap().crash_count, 2);
    assert_eq!(leases_of(&s, "big").await.len(), 1);
    check_invariant(&s.status().await).unwrap();

    // The broken streams are audited as upstream failures.
    let rows = s.audited(&["kill-sse", "kill-py", "kill-after-py"]).await;
    for r in &rows[..2] {
        assert!(r.streamed && r.status == 502, "{r:?}");
        assert!(!r.error_code.is_empty(), "{r:?}");
    }
    assert_eq!(rows[2].status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_backend_manager_loses_its_leases_within_their_ttl_and_a_restarted_one_serves() {
    const TTL: u64 = 1_500;
    let mut s = Stack::start(Options {
        lease_ttl_ms: TTL,
        ..Default::default()
    })
    .await;
    let events = LeaseEvents::follow(s.scheduler.grpc).await;
    assert_eq!(s.chat(&s.api_key, "tiny", 2, "mgr-1").await.status, 200);
    let child = s.instance("tiny").await.unwrap().pid;
    let lease = leases_of(&s, "tiny").await.remove(0);

    s.backend.kill9();
    let killed = Instant::now();
    let killed_ms = now_ms();
    // Its llama-server dies with it (PR_SET_PDEATHSIG).
    wait_until(
        "llama-server died with its manager",
        Duration::from_secs(5),
        || async { (!alive(child)).then_some(()) },
    )
    .await;
    // Meanwhile the gateway answers a clear error, at once. (The first call on the broken
    // connection fails as a transport error, 502; from then on the manager is unreachable, 503.)
    let r = s.chat(&s.api_key, "tiny", 2, "mgr-broken").await;
    assert!(matches!(r.status, 502 | 503), "{r:?}");
    assert_eq!(r.body["error"]["type"], "server_error", "{r:?}");
    let r = s.chat(&s.api_key, "tiny", 2, "mgr-down").await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.body["error"]["type"], "server_error", "{r:?}");
    // The lease is not renewed any more: it expires within one TTL of the kill.
    wait_until(
        "the dead manager's lease expired",
        Duration::from_millis(TTL + 3_000),
        || async { s.leases().await.is_empty().then_some(()) },
    )
    .await;
    let gone_after = killed.elapsed();
    assert!(
        gone_after <= Duration::from_millis(TTL + 1_000),
        "expired {gone_after:?} after the kill (TTL {TTL} ms)"
    );
    // (The event may arrive just after the status that no longer lists the lease.)
    let expired = wait_until("an EXPIRED event", Duration::from_secs(2), || async {
        let e = events.of(pb::lease_event::Kind::Expired, "tiny");
        (!e.is_empty()).then_some(e)
    })
    .await;
    assert_eq!(expired.len(), 1, "{:?}", events.all());
    let e = &expired[0];
    let l = e.lease.as_ref().unwrap();
    assert_eq!(l.id, lease.id);
    // Its last renewal came before the kill: it was due within one TTL of it, and the scheduler
    // expired it on time.
    assert!(
        l.expires_at_ms <= killed_ms + TTL + 50,
        "{e:?} (killed at {killed_ms})"
    );
    assert!(
        e.at_ms >= l.expires_at_ms && e.at_ms <= l.expires_at_ms + 500,
        "{e:?}"
    );

    // A manager restarted on the same port serves again (the gateway reconnects by itself).
    s.backend.restart().await;
    let r = s.chat(&s.api_key, "tiny", 2, "mgr-2").await;
    assert_eq!(r.status, 200, "{r:?}");
    let l = leases_of(&s, "tiny").await;
    assert_eq!(l.len(), 1);
    assert_ne!(l[0].id, lease.id, "a new lease");
    check_invariant(&s.status().await).unwrap();
    let rows = s
        .audited(&["mgr-1", "mgr-broken", "mgr-down", "mgr-2"])
        .await;
    let statuses: Vec<u32> = rows.iter().map(|r| r.status).collect();
    assert_eq!(statuses[0], 200);
    assert_eq!(statuses[2..], [503, 200]);
}

/// Acquire a lease directly (another holder), without waiting.
async fn acquire_now(s: &Stack, bytes: u64) -> Result<pb::Lease, tonic::Status> {
    let mut c = s.scheduler_client().await;
    let mut stream = c
        .acquire_lease(pb::AcquireLeaseRequest {
            holder: "e2e-probe".into(),
            bytes,
            priority: 0,
            gpu_index: Some(0),
            ttl_ms: 60_000,
            wait_ms: 0,
            label: "probe".into(),
        })
        .await?
        .into_inner();
    while let Some(u) = stream.next().await {
        if let Some(pb::acquire_lease_update::Update::Granted(l)) = u?.update {
            return Ok(l);
        }
    }
    Err(tonic::Status::unknown("the stream ended without a grant"))
}

/// The manager's leases are booked exactly once: the rest of the GPU can be leased, one byte
/// more cannot.
async fn booked_once(s: &Stack, want: &[(String, u64)]) {
    let st = s.status().await;
    check_invariant(&st).unwrap();
    let mut have: Vec<(String, u64)> = st.leases.iter().map(|l| (l.id.clone(), l.bytes)).collect();
    have.sort();
    assert_eq!(have, want, "the same leases, once each");
    let g = &st.gpus[0];
    let used: u64 = want.iter().map(|(_, b)| b).sum();
    assert_eq!(g.leased_bytes, used);
    let rest = g.total_bytes - used - g.foreign_bytes - g.reserve_bytes;
    let probe = acquire_now(s, rest)
        .await
        .unwrap_or_else(|e| panic!("the free rest ({rest} bytes) must be grantable: {e:?}"));
    let e = acquire_now(s, 1).await.expect_err("one byte over");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    s.scheduler_client()
        .await
        .release_lease(pb::ReleaseLeaseRequest { lease_id: probe.id })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_scheduler_gets_the_managers_leases_back_and_books_nothing_twice() {
    const TTL: u64 = 1_500;
    let mut s = Stack::start(Options {
        lease_ttl_ms: TTL,
        ..Default::default()
    })
    .await;
    for m in ["tiny", "other"] {
        assert_eq!(
            s.chat(&s.api_key, m, 2, &format!("sched-{m}")).await.status,
            200
        );
    }
    let mut before: Vec<(String, u64)> = s
        .leases()
        .await
        .iter()
        .map(|l| (l.id.clone(), l.bytes))
        .collect();
    before.sort();
    assert_eq!(before.len(), 2);
    let pids: Vec<u32> = s.instances().await.iter().map(|i| i.pid).collect();
    // Let the snapshot catch up (written at most every 100 ms).
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 1. kill -9, restart on the same port with the snapshot: the leases are held for their holder,
    //    and the manager keeps them alive (past their TTL from the restart) by re-attaching.
    s.scheduler.kill9();
    s.scheduler.restart().await;
    tokio::time::sleep(Duration::from_millis(2 * TTL)).await;
    booked_once(&s, &before).await;

    // 2. kill -9, restart without the snapshot (lost): only the manager's re-attach can bring the
    //    leases back, under their old ids.
    s.scheduler.kill9();
    let snapshot = s.root().join("scheduler/scheduler-leases.json");
    assert!(snapshot.is_file(), "{} missing", snapshot.display());
    std::fs::remove_file(&snapshot).unwrap();
    s.scheduler.restart().await;
    let events = LeaseEvents::follow(s.scheduler.grpc).await;
    wait_until(
        "the manager re-attached both leases",
        Duration::from_secs(10),
        || async { (s.leases().await.len() == 2).then_some(()) },
    )
    .await;
    booked_once(&s, &before).await;
    tokio::time::sleep(Duration::from_millis(2 * TTL)).await;
    booked_once(&s, &before).await;
    assert!(
        events
            .all()
            .iter()
            .all(|e| e.kind != pb::lease_event::Kind::Expired as i32),
        "{:?}",
        events.all()
    );

    // The models answer without a reload: the same processes.
    for m in ["tiny", "other"] {
        let r = s.chat(&s.api_key, m, 2, &format!("sched-after-{m}")).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    let after: Vec<u32> = s.instances().await.iter().map(|i| i.pid).collect();
    assert_eq!(after, pids, "no reload");
    assert!(s.instances().await.iter().all(|i| i.crash_count == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_registry_loaded_models_answer_and_new_loads_fail_with_503() {
    let mut s = Stack::start(Default::default()).await;
    assert_eq!(s.chat(&s.api_key, "tiny", 2, "reg-1").await.status, 200);
    let loaded_at = Instant::now();
    let st = s
        .registry
        .stop()
        .await
        .expect("the registry stops on SIGTERM");
    assert!(st.success(), "{st}");
    // Past the manager's cache of resolved model names (10 s): the registry is really needed to
    // resolve now.
    tokio::time::sleep(Duration::from_millis(10_500).saturating_sub(loaded_at.elapsed())).await;

    let r = s.chat(&s.api_key, "tiny", 2, "reg-loaded").await;
    assert_eq!(r.status, 200, "a loaded model keeps answering: {r:?}");
    let r = s.chat(&s.api_key, "other", 2, "reg-new").await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.body["error"]["type"], "server_error", "{r:?}");
    assert!(
        r.error_message().contains("registry"),
        "the message names the registry: {r:?}"
    );
    assert!(r.header("retry-after").is_some(), "{r:?}");
    assert!(
        s.instance("other")
            .await
            .is_none_or(|i| i.lease_id.is_empty())
    );
    assert_eq!(leases_of(&s, "other").await.len(), 0, "nothing leased");

    // The registry comes back on the same port: the model loads.
    s.registry.restart().await;
    let r = s.chat(&s.api_key, "other", 2, "reg-back").await;
    assert_eq!(r.status, 200, "{r:?}");
    check_invariant(&s.status().await).unwrap();
    let rows = s
        .audited(&["reg-1", "reg-loaded", "reg-new", "reg-back"])
        .await;
    let statuses: Vec<u32> = rows.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 200, 503, 200]);
}
