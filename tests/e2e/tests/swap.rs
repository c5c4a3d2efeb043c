//! Swapping on a full GPU with default settings (issue: "idle models yield"): one simulated GPU
//! that holds one of two models; requests alternate A, B, A, … through the gateway. Every request
//! succeeds, each swap takes a fraction of a second, the idle model yields (an eviction notice to
//! an equal-priority lease), a repeated request to the loaded model does not reload it — and a
//! model that is *serving* is not drained for a request of its own priority.

use std::time::{Duration, Instant};

use securellm_e2e::v1 as pb;
use securellm_e2e::{LeaseEvents, MIB, ModelSpec, Options, Stack, check_invariant, read_sse};

const GPU: u64 = 6 * MIB;

/// Two tiny models that fit the GPU alone but not together, all settings at their defaults
/// (priority 0, the 5-minute idle TTL).
async fn full_gpu_stack() -> Stack {
    let s = Stack::start(Options {
        models: vec![ModelSpec::tiny("model-a"), ModelSpec::tiny("model-b")],
        gpus: vec!["6MiB".into()],
        idle_ttl_ms: 300_000,
        ..Default::default()
    })
    .await;
    let (a, b) = (
        s.estimate("model-a", 512).await,
        s.estimate("model-b", 512).await,
    );
    assert!(
        a.gpu_bytes <= GPU && b.gpu_bytes <= GPU && a.gpu_bytes + b.gpu_bytes > GPU,
        "the test needs two models that fit alone but not together on {GPU} bytes: {} + {}",
        a.gpu_bytes,
        b.gpu_bytes
    );
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_models_swap_on_a_full_gpu_with_default_settings() {
    let s = full_gpu_stack().await;
    let events = LeaseEvents::follow(s.scheduler.grpc).await;
    let order = ["model-a", "model-b", "model-a", "model-b", "model-a"];
    let mut swaps = Vec::new();
    for (step, model) in order.iter().enumerate() {
        let other = if *model == "model-a" {
            "model-b"
        } else {
            "model-a"
        };
        let t = Instant::now();
        let r = s.chat(&s.api_key, model, 4, &format!("swap-{step}")).await;
        let took = t.elapsed();
        assert_eq!(r.status, 200, "step {step} ({model}): {r:?}");
        assert_eq!(r.body["model"], *model);
        if step > 0 {
            swaps.push(took);
        }
        let st = s.status().await;
        check_invariant(&st).unwrap_or_else(|e| panic!("after step {step}: {e}"));
        let labels: Vec<&str> = st.leases.iter().map(|l| l.label.as_str()).collect();
        assert_eq!(
            labels,
            vec![*model],
            "after step {step}: only {model} holds memory"
        );
        assert!(!labels.contains(&other));
    }
    eprintln!("swap times: {swaps:?}");
    // "Within a few hundred ms" on an idle machine; generous here (2 cores shared with the build).
    for (i, t) in swaps.iter().enumerate() {
        assert!(*t < Duration::from_secs(5), "swap {i} took {t:?}");
    }
    // A warm request does not reload.
    let grants = |m: &str| events.of(pb::lease_event::Kind::Granted, m).len();
    let before = grants("model-a");
    let r = s.chat(&s.api_key, "model-a", 4, "warm").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        grants("model-a"),
        before,
        "a warm request reloaded the model"
    );
    // Each swap was an idle model yielding: notices, releases, never a revocation or an expiry.
    use pb::lease_event::Kind;
    let notices: Vec<_> = events
        .all()
        .into_iter()
        .filter(|e| e.kind == Kind::EvictionNotice as i32)
        .collect();
    assert_eq!(notices.len(), 4, "{:?}", events.all());
    assert!(
        notices
            .iter()
            .all(|e| e.detail.contains("idle lease yields"))
    );
    for k in [Kind::Revoked, Kind::Expired] {
        assert!(events.all().iter().all(|e| e.kind != k as i32), "{k:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_model_is_not_drained_for_a_request_of_its_own_priority() {
    let s = full_gpu_stack().await;
    let events = LeaseEvents::follow(s.scheduler.grpc).await;
    // Load A, then hold one of its requests in flight: stop its engine after the first token.
    let r = s.chat(&s.api_key, "model-a", 4, "load-a").await;
    assert_eq!(r.status, 200);
    let a = s.instance("model-a").await.unwrap();
    assert!(a.pid > 0);
    let resp = s.chat_stream(&s.api_key, "model-a", 200, "long-a").await;
    assert_eq!(resp.status(), 200);
    let pid = a.pid as i32;
    let stream = tokio::spawn(read_sse(resp, Duration::from_secs(60), move |i| {
        if i == 0 {
            unsafe { libc::kill(pid, libc::SIGSTOP) };
        }
    }));
    // B, of the same priority, waits: A is serving.
    let s = std::sync::Arc::new(s);
    let b = {
        let s = s.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            let r = s.chat(&s.api_key, "model-b", 4, "wait-b").await;
            (r, t.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    use pb::lease_event::Kind;
    assert!(
        events.of(Kind::EvictionNotice, "model-a").is_empty(),
        "a busy model was noticed for an equal-priority request: {:?}",
        events.all()
    );
    assert!(!b.is_finished(), "B did not wait for A");
    assert!(
        events.of(Kind::Queued, "model-b").len() == 1,
        "B waits in the scheduler's queue: {:?}",
        events.all()
    );
    let st = s.status().await;
    assert_eq!(st.leases.len(), 1);
    assert_eq!(st.leases[0].label, "model-a");
    // A's request finishes; then A is idle and yields to B at once.
    let resumed = Instant::now();
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let out = stream.await.unwrap();
    assert!(out.done(), "A's stream was cut: {out:?}");
    let (r, _) = b.await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    eprintln!("B served {:?} after A resumed", resumed.elapsed());
    assert!(resumed.elapsed() < Duration::from_secs(10));
    let n = events.of(Kind::EvictionNotice, "model-a");
    assert_eq!(n.len(), 1, "{:?}", events.all());
    assert!(n[0].detail.contains("idle lease yields"), "{}", n[0].detail);
}
