//! The backend manager's `/metrics` over real HTTP, with the real llama-server, scheduler and
//! registry (the kit's stack): loads, requests, tokens, time to first token, unloads by reason,
//! a crash (SIGKILL to the engine) and instances by state, checked by Prometheus' `promtool` when
//! it is installed.

use std::net::SocketAddr;
use std::time::Duration;

use backend_manager::config::ModelSettings;
use securellm_proto::v1 as pb;
use securellm_testkit::prom::{scrape, value};
use securellm_testkit::{chat_request as chat, instance, kill9, wait_for_instance as wait_for};
use tokio_stream::StreamExt;
use tonic::Code;

fn instances(text: &str, state: &str) -> f64 {
    value(text, "securellm_backend_instances", &[("state", state)])
}

/// The families this service exports (and those every service does): the kit runs the registry
/// and the scheduler in this process too, and they share the process-wide recorder.
fn ours(text: &str) -> String {
    let mine = |name: &str| {
        [
            "securellm_backend_",
            "securellm_build_info",
            "securellm_trace_",
        ]
        .iter()
        .any(|p| name.starts_with(p))
    };
    text.lines()
        .filter(|l| {
            let name = l
                .strip_prefix("# HELP ")
                .or_else(|| l.strip_prefix("# TYPE "))
                .unwrap_or(l);
            l.trim().is_empty() || mine(name)
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// `promtool check metrics` on this service's families of a scrape, when promtool is installed.
fn promtool_check(text: &str) {
    let text = &ours(text);
    assert!(text.contains("securellm_backend_instances"), "{text}");
    securellm_testkit::prom::promtool_check(text);
}

/// Scrape until `f` holds (the actor records some things just after the call answers).
async fn until(addr: SocketAddr, what: &str, f: impl Fn(&str) -> bool) -> String {
    for _ in 0..100 {
        let t = scrape(addr).await;
        if f(&t) {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} never showed in\n{}", scrape(addr).await);
}

#[tokio::test]
async fn metrics_follow_loads_requests_tokens_unloads_crashes_and_instance_states() {
    let kit = securellm_testkit::Stack::new()
        .gpu(1u64 << 30)
        .models(&["tiny", "other"])
        .internal_token()
        .manager(|c| {
            c.metrics_listen = Some("127.0.0.1:0".into());
            c.lease_ttl_ms = 3_000;
            c.stop_grace_ms = 2_000;
            // `other` unloads itself when idle.
            c.models.insert(
                "other".into(),
                ModelSettings {
                    idle_ttl_ms: Some(300),
                    ..Default::default()
                },
            );
        })
        .start()
        .await;
    let mut client = kit.backend_client().await;
    let maddr = kit
        .manager()
        .metrics
        .as_ref()
        .expect("a metrics listener")
        .addr;
    let tiny = [("model", "tiny")];

    // Nothing loaded: every state is listed at 0.
    let t = scrape(maddr).await;
    for state in ["ready", "busy", "leasing", "starting", "failed", "stopped"] {
        assert_eq!(instances(&t, state), 0.0, "{state}: {t}");
    }
    assert!(
        t.contains("securellm_backend_instances{state=\"ready\"} 0"),
        "{t}"
    );
    assert_eq!(
        value(
            &t,
            "securellm_backend_loads_total",
            &[("model", "tiny"), ("result", "ok")]
        ),
        0.0
    );

    // A chat loads the model and is counted with its tokens.
    let r = client.chat(chat("tiny", 8)).await.unwrap().into_inner();
    assert_eq!(r.http_status, 200);
    let t = scrape(maddr).await;
    assert_eq!(
        value(
            &t,
            "securellm_backend_loads_total",
            &[("model", "tiny"), ("result", "ok")]
        ),
        1.0,
        "{t}"
    );
    assert_eq!(
        value(&t, "securellm_backend_load_duration_seconds_count", &tiny),
        1.0
    );
    assert!(value(&t, "securellm_backend_load_duration_seconds_sum", &tiny) > 0.0);
    assert_eq!(
        value(&t, "securellm_backend_lease_wait_seconds_count", &tiny),
        1.0
    );
    assert_eq!(
        value(
            &t,
            "securellm_backend_requests_total",
            &[("model", "tiny"), ("kind", "chat"), ("result", "ok")]
        ),
        1.0
    );
    assert_eq!(
        value(&t, "securellm_backend_generated_tokens_total", &tiny),
        8.0
    );
    assert_eq!(value(&t, "securellm_backend_requests_in_flight", &[]), 0.0);
    assert_eq!(instances(&t, "ready"), 1.0);
    assert_eq!(instances(&t, "stopped"), 0.0);

    // A stream: time to first token, its tokens; no second load.
    let mut st = client
        .chat_stream(chat("tiny", 16))
        .await
        .unwrap()
        .into_inner();
    while let Some(c) = st.next().await {
        c.unwrap();
    }
    let t = until(maddr, "the stream's request", |t| {
        value(
            t,
            "securellm_backend_requests_total",
            &[("model", "tiny"), ("kind", "chat"), ("result", "ok")],
        ) == 2.0
    })
    .await;
    assert_eq!(
        value(
            &t,
            "securellm_backend_time_to_first_token_seconds_count",
            &tiny
        ),
        1.0,
        "{t}"
    );
    assert!(
        value(
            &t,
            "securellm_backend_time_to_first_token_seconds_sum",
            &tiny
        ) > 0.0
    );
    assert_eq!(
        value(&t, "securellm_backend_generated_tokens_total", &tiny),
        24.0
    );
    assert_eq!(
        value(
            &t,
            "securellm_backend_loads_total",
            &[("model", "tiny"), ("result", "ok")]
        ),
        1.0
    );
    assert_eq!(value(&t, "securellm_backend_requests_in_flight", &[]), 0.0);

    // A model nobody knows: an error under `_other` (no series named after the request).
    let e = client.chat(chat("no-such-model", 4)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let t = scrape(maddr).await;
    assert_eq!(
        value(
            &t,
            "securellm_backend_requests_total",
            &[("model", "_other"), ("kind", "chat"), ("result", "error")]
        ),
        1.0,
        "{t}"
    );
    assert!(!t.contains("no-such-model"), "{t}");
    promtool_check(&t);

    // An unload on request.
    client
        .unload(pb::UnloadRequest {
            model: "tiny".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let t = until(maddr, "the requested unload", |t| {
        value(
            t,
            "securellm_backend_unloads_total",
            &[("reason", "requested")],
        ) == 1.0
    })
    .await;
    assert_eq!(instances(&t, "ready"), 0.0);
    assert_eq!(instances(&t, "stopped"), 1.0);

    // The idle TTL unloads `other` by itself.
    client.chat(chat("other", 2)).await.unwrap();
    wait_for(&mut client, "other", |i| {
        i.state == pb::InstanceState::Stopped as i32
    })
    .await;
    let t = until(maddr, "the idle unload", |t| {
        value(t, "securellm_backend_unloads_total", &[("reason", "idle")]) == 1.0
    })
    .await;
    assert_eq!(
        value(
            &t,
            "securellm_backend_loads_total",
            &[("model", "other"), ("result", "ok")]
        ),
        1.0
    );
    assert_eq!(instances(&t, "stopped"), 2.0);

    // Reload `tiny`, then kill its engine: a crash, not an unload.
    client.chat(chat("tiny", 2)).await.unwrap();
    let pid = instance(&mut client, "tiny").await.pid;
    assert!(pid > 0);
    let t = scrape(maddr).await;
    assert_eq!(
        value(
            &t,
            "securellm_backend_loads_total",
            &[("model", "tiny"), ("result", "ok")]
        ),
        2.0
    );
    assert_eq!(instances(&t, "ready"), 1.0);
    kill9(pid);
    wait_for(&mut client, "tiny", |i| {
        i.state == pb::InstanceState::Failed as i32
    })
    .await;
    let t = until(maddr, "the crash", |t| {
        value(t, "securellm_backend_crashes_total", &tiny) == 1.0
    })
    .await;
    assert_eq!(instances(&t, "failed"), 1.0);
    assert_eq!(instances(&t, "ready"), 0.0);
    assert_eq!(
        value(
            &t,
            "securellm_backend_unloads_total",
            &[("reason", "requested")]
        ),
        1.0,
        "a crash is not an unload"
    );
    assert_eq!(
        value(
            &t,
            "securellm_backend_loads_total",
            &[("model", "tiny"), ("result", "failed")]
        ),
        0.0
    );
    promtool_check(&t);
}

#[tokio::test]
async fn an_eviction_a_load_that_cannot_fit_and_a_shutdown_are_counted_by_reason() {
    const MIB: u64 = 1 << 20;
    let kit = securellm_testkit::Stack::new()
        .gpu(256 * MIB)
        .eviction_grace_ms(5_000)
        .models(&["tiny"])
        .internal_token()
        .manager(|c| {
            c.metrics_listen = Some("127.0.0.1:0".into());
            c.lease_ttl_ms = 3_000;
            c.stop_grace_ms = 2_000;
        })
        .start()
        .await;
    let mut client = kit.backend_client().await;
    let mut sched = kit.scheduler_client().await;
    let maddr = kit.manager().metrics.as_ref().unwrap().addr;
    client.chat(chat("tiny", 2)).await.unwrap();

    // Someone with priority 10 wants more than is left: the instance is evicted.
    let mut stream = sched
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
    let t = until(maddr, "the eviction", |t| {
        value(
            t,
            "securellm_backend_unloads_total",
            &[("reason", "evicted")],
        ) == 1.0
    })
    .await;
    assert_eq!(instances(&t, "stopped"), 1.0, "{t}");
    assert_eq!(
        value(
            &t,
            "securellm_backend_unloads_total",
            &[("reason", "requested")]
        ),
        0.0
    );

    // Now the model cannot get memory before its deadline: a failed load, and the request is an
    // error counted under the model's name.
    let mut req = chat("tiny", 2);
    req.deadline_ms = securellm_common::time::now_ms() + 1_500;
    let e = client.chat(req).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    let t = until(maddr, "the failed load", |t| {
        value(
            t,
            "securellm_backend_loads_total",
            &[("model", "tiny"), ("result", "failed")],
        ) == 1.0
    })
    .await;
    assert_eq!(
        value(
            &t,
            "securellm_backend_requests_total",
            &[("model", "tiny"), ("kind", "chat"), ("result", "error")]
        ),
        1.0,
        "{t}"
    );
    assert_eq!(
        value(
            &t,
            "securellm_backend_lease_wait_seconds_count",
            &[("model", "tiny")]
        ),
        2.0
    );
    assert!(
        value(
            &t,
            "securellm_backend_lease_wait_seconds_sum",
            &[("model", "tiny")]
        ) >= 1.0
    );

    // The memory comes back; a shutdown unloads what is loaded.
    sched
        .release_lease(pb::ReleaseLeaseRequest {
            lease_id: granted.id,
        })
        .await
        .unwrap();
    let mut loaded = false;
    for _ in 0..50 {
        // The failed load's backoff may refuse the first tries.
        if client.chat(chat("tiny", 2)).await.is_ok() {
            loaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(loaded, "tiny loads once the memory is back");
    kit.manager().manager.unload_all().await;
    let t = scrape(maddr).await;
    assert_eq!(
        value(
            &t,
            "securellm_backend_unloads_total",
            &[("reason", "shutdown")]
        ),
        1.0,
        "{t}"
    );
    assert_eq!(instances(&t, "ready"), 0.0);
    promtool_check(&t);
}
