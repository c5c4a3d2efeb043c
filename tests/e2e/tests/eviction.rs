//! Scenario 4: two models that do not fit together on one simulated GPU. Requests alternate
//! between them through the gateway; the scheduler's invariant holds throughout (GetStatus after
//! every step, and sampled continuously in the background); the lower-priority model is evicted
//! by the higher one and reloaded when its turn comes (it waits in the scheduler's queue until the
//! higher one goes idle and unloads); no request fails.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use securellm_e2e::v1 as pb;
use securellm_e2e::{LeaseEvents, MIB, ModelSpec, Options, Stack, check_invariant, wait_until};

const GPU: u64 = 6 * MIB;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_models_that_do_not_fit_together_alternate_by_eviction_and_no_request_fails() {
    let s = Stack::start(Options {
        models: vec![ModelSpec::tiny("low"), ModelSpec::tiny("high")],
        gpus: vec!["6MiB".into()],
        eviction_grace_ms: 5_000,
        // `low` never unloads by itself (it must be evicted); `high` goes idle after 1.5 s.
        extra_toml: "[backend.models.high]\npriority = 10\nidle_ttl_ms = 1500\n".into(),
        ..Default::default()
    })
    .await;
    // Each fits alone, both do not.
    let (low, high) = (s.estimate("low", 512).await, s.estimate("high", 512).await);
    assert!(
        low.gpu_bytes <= GPU && high.gpu_bytes <= GPU && low.gpu_bytes + high.gpu_bytes > GPU,
        "the test needs two models that fit alone but not together on {GPU} bytes: {} + {}",
        low.gpu_bytes,
        high.gpu_bytes
    );
    let events = LeaseEvents::follow(s.scheduler.grpc).await;

    // Sample the scheduler all along.
    let violations = Arc::new(Mutex::new(Vec::<String>::new()));
    let samples = Arc::new(Mutex::new(0u32));
    let sampler = {
        let (violations, samples) = (violations.clone(), samples.clone());
        let mut c = s.scheduler_client().await;
        tokio::spawn(async move {
            loop {
                if let Ok(st) = c.get_status(pb::GetStatusRequest {}).await {
                    let st = st.into_inner();
                    let mut v = violations.lock().unwrap();
                    if let Err(e) = check_invariant(&st) {
                        v.push(e);
                    }
                    let labels: Vec<&str> = st.leases.iter().map(|l| l.label.as_str()).collect();
                    if labels.contains(&"low") && labels.contains(&"high") {
                        v.push(format!("both leased at once: {:?}", st.leases));
                    }
                    *samples.lock().unwrap() += 1;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let order = ["low", "high", "low", "high", "low", "high"];
    for (step, model) in order.iter().enumerate() {
        let other = if *model == "low" { "high" } else { "low" };
        let r = s
            .chat(&s.api_key, model, 4, &format!("evict-{step}-{model}"))
            .await;
        assert_eq!(r.status, 200, "step {step} ({model}) failed: {r:?}");
        assert_eq!(r.body["model"], *model);
        let st = s.status().await;
        check_invariant(&st).unwrap_or_else(|e| panic!("after step {step}: {e}"));
        let labels: Vec<&str> = st.leases.iter().map(|l| l.label.as_str()).collect();
        assert!(
            labels.contains(model) && !labels.contains(&other),
            "after step {step} ({model}): leases {:?}",
            st.leases
        );
    }
    sampler.abort();
    let violations = violations.lock().unwrap().clone();
    assert!(violations.is_empty(), "{violations:?}");
    assert!(*samples.lock().unwrap() >= 20, "the sampler ran");

    use pb::lease_event::Kind;
    // The last events may still be on their way.
    wait_until("the last GRANTED event", Duration::from_secs(2), || async {
        (events.of(Kind::Granted, "high").len() >= 3).then_some(())
    })
    .await;
    // `high` evicted `low` each time it came (3 times); `low` never evicted `high` (lower
    // priority: it waited in the queue until `high` unloaded when idle).
    assert_eq!(
        events.of(Kind::EvictionNotice, "low").len(),
        3,
        "{:?}",
        events.all()
    );
    assert!(events.of(Kind::EvictionNotice, "high").is_empty());
    assert!(
        events.of(Kind::Queued, "low").len() >= 2,
        "low waited for high: {:?}",
        events.all()
    );
    // Each load took a new lease: `low` was reloaded after every eviction.
    assert_eq!(events.of(Kind::Granted, "low").len(), 3);
    assert_eq!(events.of(Kind::Granted, "high").len(), 3);
    // Evicted leases were released in time, never revoked; nothing expired.
    for k in [Kind::Revoked, Kind::Expired] {
        assert!(
            events.all().iter().all(|e| e.kind != k as i32),
            "{k:?}: {:?}",
            events.all()
        );
    }
    for (m, n) in [("low", 3), ("high", 3)] {
        let i = s.instance(m).await.unwrap();
        assert_eq!((i.requests_total, i.crash_count), (n, 0), "{i:?}");
    }
    // Every request was audited as a success.
    let ids: Vec<String> = order
        .iter()
        .enumerate()
        .map(|(i, m)| format!("evict-{i}-{m}"))
        .collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    assert!(s.audited(&ids).await.iter().all(|r| r.status == 200));
}
