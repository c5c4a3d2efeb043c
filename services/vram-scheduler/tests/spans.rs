//! The scheduler's spans, over real gRPC on loopback: `scheduler.acquire` (holder, model, bytes,
//! priority; queued, queue position, eviction notices sent, queued time, outcome), `scheduler.renew`
//! and `scheduler.release` carry what an operator needs to answer "why did this load wait?".
//! A capturing `tracing` layer records every span's fields as it closes (the same spans the
//! OpenTelemetry layer exports when export is on).

use std::time::Duration;

use securellm_common::internal_auth::authenticated;
use securellm_proto::v1 as pb;
use securellm_proto::v1::acquire_lease_update::Update;
use securellm_proto::v1::vram_scheduler_client::VramSchedulerClient;
use securellm_testkit::spans::{Capture, field};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;
use tracing_subscriber::layer::SubscriberExt;
use vram_scheduler::config::{InventoryMode, SchedulerConfig};

const GIB: u64 = 1 << 30;

fn acq(holder: &str, bytes: u64, priority: i32, wait_ms: u64) -> pb::AcquireLeaseRequest {
    pb::AcquireLeaseRequest {
        holder: holder.into(),
        bytes,
        priority,
        gpu_index: None,
        ttl_ms: 60_000,
        wait_ms,
        label: format!("model-of-{holder}"),
    }
}

async fn granted(s: &mut tonic::Streaming<pb::AcquireLeaseUpdate>) -> pb::Lease {
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(u) = s.next().await {
            if let Update::Granted(l) = u.unwrap().update.unwrap() {
                return l;
            }
        }
        panic!("stream ended without a grant");
    })
    .await
    .expect("a grant within 10 s")
}

#[tokio::test]
async fn acquire_renew_and_release_spans_carry_their_attributes() {
    let capture = Capture::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(capture.clone()))
        .expect("the only subscriber in this test process");

    let cfg = SchedulerConfig {
        listen: "127.0.0.1:0".into(),
        inventory: InventoryMode::Simulated,
        simulate_gpus: vec![securellm_common::ByteSize(8 * GIB)],
        eviction_grace_ms: 300,
        preempt_busy_after_ms: 0,
        ..SchedulerConfig::default()
    };
    let s = vram_scheduler::start(&cfg).await.unwrap();
    let ch = Channel::from_shared(format!("http://{}", s.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = VramSchedulerClient::new(authenticated(ch, None));

    // Granted at once.
    let mut st = c
        .acquire_lease(acq("low", 6 * GIB, 1, 0))
        .await
        .unwrap()
        .into_inner();
    let low = granted(&mut st).await;
    let spans = capture
        .wait("scheduler.acquire", 1, |f| {
            f.get("securellm.lease.holder").map(String::as_str) == Some("low")
        })
        .await;
    let f = &spans[0];
    assert_eq!(field(f, "gen_ai.request.model"), "model-of-low");
    assert_eq!(field(f, "securellm.lease.bytes"), (6 * GIB).to_string());
    assert_eq!(field(f, "securellm.lease.priority"), "1");
    assert_eq!(field(f, "securellm.acquire.outcome"), "granted");
    assert_eq!(field(f, "securellm.acquire.queued"), "false");
    assert_eq!(field(f, "securellm.acquire.eviction_notices_sent"), "false");
    assert_eq!(field(f, "securellm.lease.gpu_granted"), "0");
    assert!(
        field(f, "securellm.acquire.queued_ms")
            .parse::<u64>()
            .is_ok()
    );
    assert!(!f.contains_key("error.type"), "{f:#?}");
    // No capability in a span: the lease id never appears.
    assert!(!f.values().any(|v| v.contains(&low.id)), "{f:#?}");

    // Queued behind a lower priority: eviction notices go out, the holder ignores them, the lease
    // is revoked after the grace and the request granted. The span stays open until then.
    let t0 = std::time::Instant::now();
    let mut st = c
        .acquire_lease(acq("high", 6 * GIB, 5, 30_000))
        .await
        .unwrap()
        .into_inner();
    let high = granted(&mut st).await;
    let waited = t0.elapsed();
    let spans = capture
        .wait("scheduler.acquire", 1, |f| {
            f.get("securellm.lease.holder").map(String::as_str) == Some("high")
        })
        .await;
    let f = &spans[0];
    assert_eq!(field(f, "securellm.acquire.outcome"), "granted");
    assert_eq!(field(f, "securellm.acquire.queued"), "true");
    assert_eq!(field(f, "securellm.acquire.queue_position_first"), "0");
    assert_eq!(field(f, "securellm.acquire.queue_position"), "0");
    assert_eq!(field(f, "securellm.acquire.eviction_notices_sent"), "true");
    let queued_ms: u64 = field(f, "securellm.acquire.queued_ms").parse().unwrap();
    assert!(
        queued_ms >= 250 && queued_ms as u128 <= waited.as_millis() + 50,
        "queued {queued_ms} ms, the caller waited {waited:?}"
    );

    // Renew: the lease's holder, model and size, and whether it is under notice.
    c.renew_lease(pb::RenewLeaseRequest {
        lease_id: high.id.clone(),
        idle: true,
        priority: Some(7),
        ..Default::default()
    })
    .await
    .unwrap();
    let spans = capture.wait("scheduler.renew", 1, |_| true).await;
    let f = &spans[0];
    assert_eq!(field(f, "securellm.lease.holder"), "high");
    assert_eq!(field(f, "gen_ai.request.model"), "model-of-high");
    assert_eq!(field(f, "securellm.lease.idle"), "true");
    assert_eq!(field(f, "securellm.lease.priority"), "7");
    assert_eq!(field(f, "securellm.lease.evicting"), "false");

    // A renew of a lease that does not exist: the span says why (the gRPC code's name).
    let e = c
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: "no-such-lease".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    capture
        .wait("scheduler.renew", 1, |f| {
            f.get("error.type").map(String::as_str) == Some("NOT_FOUND")
        })
        .await;

    // Release.
    c.release_lease(pb::ReleaseLeaseRequest {
        lease_id: high.id.clone(),
    })
    .await
    .unwrap();
    let spans = capture.wait("scheduler.release", 1, |_| true).await;
    let f = &spans[0];
    assert_eq!(field(f, "securellm.lease.holder"), "high");
    assert_eq!(field(f, "securellm.lease.bytes"), (6 * GIB).to_string());
    assert_eq!(field(f, "securellm.lease.priority"), "7");

    // Refused at once, and a wait that runs out.
    let e = c.acquire_lease(acq("bad", 0, 0, 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    capture
        .wait("scheduler.acquire", 1, |f| {
            f.get("securellm.acquire.outcome").map(String::as_str) == Some("rejected")
                && f.get("error.type").map(String::as_str) == Some("INVALID_ARGUMENT")
        })
        .await;
    let _hold = {
        let mut st = c
            .acquire_lease(acq("big", 8 * GIB, 9, 0))
            .await
            .unwrap()
            .into_inner();
        granted(&mut st).await
    };
    let mut late = c
        .acquire_lease(acq("late", GIB, 0, 200))
        .await
        .unwrap()
        .into_inner();
    while let Some(u) = late.next().await {
        if let Err(st) = u {
            assert_eq!(st.code(), Code::DeadlineExceeded);
            break;
        }
    }
    capture
        .wait("scheduler.acquire", 1, |f| {
            f.get("securellm.acquire.outcome").map(String::as_str) == Some("timeout")
                && f.get("securellm.lease.holder").map(String::as_str) == Some("late")
        })
        .await;
    s.shutdown().await;
}
