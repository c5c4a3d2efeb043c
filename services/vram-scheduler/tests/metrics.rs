//! The scheduler's `/metrics` over real HTTP, against the real scheduler over real gRPC on
//! loopback: the GPU gauges equal what `GetStatus` says, and grants, releases, the queue, eviction
//! notices, revocations, expiries and acquire outcomes move what they should. The scrape also goes
//! through Prometheus' own checker (`promtool check metrics`) when it is installed.

use std::collections::HashMap;
use std::time::Duration;

use securellm_common::internal_auth::{AuthChannel, authenticated};
use securellm_proto::v1 as pb;
use securellm_proto::v1::acquire_lease_update::Update;
use securellm_proto::v1::vram_scheduler_client::VramSchedulerClient;
use securellm_testkit::prom::{get, promtool_check};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;
use vram_scheduler::config::{InventoryMode, SchedulerConfig};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

type Client = VramSchedulerClient<AuthChannel>;

async fn start(grace_ms: u64) -> (vram_scheduler::RunningScheduler, Client) {
    let cfg = SchedulerConfig {
        listen: "127.0.0.1:0".into(),
        metrics_listen: Some("127.0.0.1:0".into()),
        inventory: InventoryMode::Simulated,
        simulate_gpus: vec![
            securellm_common::ByteSize(8 * GIB),
            securellm_common::ByteSize(4 * GIB),
        ],
        reserve: securellm_common::ByteSize(256 * MIB),
        eviction_grace_ms: grace_ms,
        preempt_busy_after_ms: 0,
        ..SchedulerConfig::default()
    };
    let s = vram_scheduler::start(&cfg).await.unwrap();
    let ch = Channel::from_shared(format!("http://{}", s.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (s, VramSchedulerClient::new(authenticated(ch, None)))
}

fn acq(holder: &str, bytes: u64, priority: i32, gpu: u32, wait_ms: u64) -> pb::AcquireLeaseRequest {
    pb::AcquireLeaseRequest {
        holder: holder.into(),
        bytes,
        priority,
        gpu_index: Some(gpu),
        ttl_ms: 60_000,
        wait_ms,
        label: "test-model".into(),
    }
}

async fn lease(c: &mut Client, r: pb::AcquireLeaseRequest) -> pb::Lease {
    let mut s = c.acquire_lease(r).await.unwrap().into_inner();
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(u) = s.next().await {
            if let Update::Granted(l) = u.unwrap().update.unwrap() {
                return l;
            }
        }
        panic!("stream ended without a grant");
    })
    .await
    .expect("no grant within 10 s")
}

async fn status(c: &mut Client) -> pb::SchedulerStatus {
    c.get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// One scrape: the raw text and its samples by `name{labels}` (as rendered).
struct Scrape {
    text: String,
    samples: HashMap<String, f64>,
}

impl Scrape {
    /// The sample `name{k="v",…}` (labels in the order given), or `name` without labels.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let key = if labels.is_empty() {
            name.to_string()
        } else {
            let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            format!("{name}{{{}}}", l.join(","))
        };
        self.samples.get(&key).copied()
    }

    /// Like [`get`](Self::get), with a series that was never recorded reading 0.
    fn val(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }
}

async fn scrape(s: &vram_scheduler::RunningScheduler) -> Scrape {
    let addr = s.metrics.as_ref().expect("a metrics listener").addr;
    let (head, text) = get(addr, "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    let mut samples = HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (key, value) = line.rsplit_once(' ').expect("`name value`");
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("a number in {line:?}"));
        samples.insert(key.to_string(), v);
    }
    Scrape { text, samples }
}

/// Scrape until `pred` holds (counters follow the actor's events asynchronously).
async fn scrape_until(
    s: &vram_scheduler::RunningScheduler,
    what: &str,
    pred: impl Fn(&Scrape) -> bool,
) -> Scrape {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = scrape(s).await;
        if pred(&m) {
            return m;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("{what}: not seen within 10 s; last scrape:\n{}", m.text);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every GPU gauge equals what `GetStatus` reports, and the lease/queue gauges match its lists.
fn assert_gauges_match(m: &Scrape, st: &pb::SchedulerStatus) {
    for g in &st.gpus {
        let gpu = g.index.to_string();
        let l = [("gpu", gpu.as_str())];
        let pairs = [
            ("securellm_scheduler_gpu_total_bytes", g.total_bytes),
            ("securellm_scheduler_gpu_leased_bytes", g.leased_bytes),
            ("securellm_scheduler_gpu_foreign_bytes", g.foreign_bytes),
            ("securellm_scheduler_gpu_reserve_bytes", g.reserve_bytes),
            ("securellm_scheduler_gpu_grantable_bytes", g.grantable_bytes),
            (
                "securellm_scheduler_gpu_overcommitted",
                u64::from(g.overcommitted),
            ),
        ];
        for (name, want) in pairs {
            assert_eq!(
                m.get(name, &l),
                Some(want as f64),
                "{name} on GPU {gpu}; scrape:\n{}",
                m.text
            );
        }
    }
    let leases: f64 = ["active", "idle", "evicting"]
        .iter()
        .map(|s| {
            m.get("securellm_scheduler_leases", &[("state", s)])
                .unwrap_or_else(|| panic!("leases{{state={s}}} missing:\n{}", m.text))
        })
        .sum();
    assert_eq!(leases, st.leases.len() as f64);
    assert_eq!(
        m.get("securellm_scheduler_queue_depth", &[]),
        Some(st.queue.len() as f64)
    );
}

const GRANTS: &str = "securellm_scheduler_grants_total";
const RELEASES: &str = "securellm_scheduler_releases_total";
const NOTICES: &str = "securellm_scheduler_eviction_notices_total";
const REVOCATIONS: &str = "securellm_scheduler_revocations_total";
const EXPIRIES: &str = "securellm_scheduler_expiries_total";
const WAIT_COUNT: &str = "securellm_scheduler_acquire_wait_seconds_count";

fn waits(m: &Scrape, outcome: &str) -> f64 {
    m.val(WAIT_COUNT, &[("outcome", outcome)])
}

#[tokio::test]
async fn metrics_follow_the_scheduler() {
    let (s, mut c) = start(1_500).await;

    // At rest: the gauges equal the status, nothing leased, nothing queued, every counter there.
    c.set_simulated_foreign_usage(pb::SetSimulatedForeignUsageRequest {
        gpu_index: 1,
        foreign_bytes: GIB,
    })
    .await
    .unwrap();
    let m0 = scrape(&s).await;
    let st = status(&mut c).await;
    assert_gauges_match(&m0, &st);
    assert_eq!(
        m0.get("securellm_scheduler_gpu_foreign_bytes", &[("gpu", "1")]),
        Some(GIB as f64)
    );
    assert_eq!(
        m0.get("securellm_scheduler_gpu_reserve_bytes", &[("gpu", "0")]),
        Some((256 * MIB) as f64)
    );
    for name in [RELEASES, NOTICES, REVOCATIONS, EXPIRIES] {
        assert!(m0.get(name, &[]).is_some(), "{name} missing:\n{}", m0.text);
    }
    assert_eq!(
        m0.get("securellm_scheduler_nvml_refresh_errors_total", &[]),
        Some(0.0)
    );
    assert!(
        m0.text
            .contains("securellm_build_info{service=\"vram-scheduler\""),
        "{}",
        m0.text
    );

    // A grant moves grants_total{priority} and the leased bytes.
    let a = lease(&mut c, acq("a", 5 * GIB, 0, 0, 0)).await;
    let m1 = scrape_until(&s, "the grant", |m| {
        m.val(GRANTS, &[("priority", "0")]) == m0.val(GRANTS, &[("priority", "0")]) + 1.0
    })
    .await;
    assert_eq!(
        m1.get("securellm_scheduler_gpu_leased_bytes", &[("gpu", "0")]),
        Some((5 * GIB) as f64)
    );
    assert_eq!(
        m1.get("securellm_scheduler_leases", &[("state", "active")]),
        Some(1.0)
    );
    assert_eq!(waits(&m1, "granted"), waits(&m0, "granted") + 1.0);
    assert_gauges_match(&m1, &status(&mut c).await);

    // A request that does not fit and may not evict (same priority, busy) waits: queue depth 1.
    let mut waiting = c
        .acquire_lease(acq("b", 4 * GIB, 0, 0, 30_000))
        .await
        .unwrap()
        .into_inner();
    match waiting.next().await.unwrap().unwrap().update.unwrap() {
        Update::Queued(p) => assert_eq!(p.position, 0),
        other => panic!("expected a queue position, got {other:?}"),
    }
    let m2 = scrape(&s).await;
    assert_eq!(m2.get("securellm_scheduler_queue_depth", &[]), Some(1.0));
    assert_gauges_match(&m2, &status(&mut c).await);
    // The caller goes away: the wait ends as `cancelled` and the queue empties.
    drop(waiting);
    let m3 = scrape_until(&s, "the cancelled wait", |m| {
        waits(m, "cancelled") == waits(&m0, "cancelled") + 1.0
            && m.get("securellm_scheduler_queue_depth", &[]) == Some(0.0)
    })
    .await;
    assert_gauges_match(&m3, &status(&mut c).await);

    // A release moves releases_total and frees the bytes.
    c.release_lease(pb::ReleaseLeaseRequest { lease_id: a.id })
        .await
        .unwrap();
    let m4 = scrape_until(&s, "the release", |m| {
        m.val(RELEASES, &[]) == m0.val(RELEASES, &[]) + 1.0
    })
    .await;
    assert_eq!(
        m4.get("securellm_scheduler_gpu_leased_bytes", &[("gpu", "0")]),
        Some(0.0)
    );

    // Eviction: a higher-priority request that needs the memory sends a notice (the lease shows
    // as evicting); ignored, the lease is revoked after the grace and the request granted.
    let low = lease(&mut c, acq("low", 6 * GIB, 1, 0, 0)).await;
    let mut high = c
        .acquire_lease(acq("high", 6 * GIB, 5, 0, 30_000))
        .await
        .unwrap()
        .into_inner();
    let m5 = scrape_until(&s, "the eviction notice", |m| {
        m.val(NOTICES, &[]) == m0.val(NOTICES, &[]) + 1.0
    })
    .await;
    assert_eq!(
        m5.get("securellm_scheduler_leases", &[("state", "evicting")]),
        Some(1.0),
        "{}",
        m5.text
    );
    assert_eq!(m5.get("securellm_scheduler_queue_depth", &[]), Some(1.0));
    let granted = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Update::Granted(l) = high.next().await.unwrap().unwrap().update.unwrap() {
                return l;
            }
        }
    })
    .await
    .expect("the high-priority request is granted after the grace");
    assert_eq!(granted.holder, "high");
    let m6 = scrape_until(&s, "the revocation and the priority-5 grant", |m| {
        m.val(REVOCATIONS, &[]) == m0.val(REVOCATIONS, &[]) + 1.0
            && m.val(GRANTS, &[("priority", "5")]) == m0.val(GRANTS, &[("priority", "5")]) + 1.0
    })
    .await;
    assert_eq!(waits(&m6, "granted"), waits(&m0, "granted") + 3.0);
    assert_eq!(
        m6.get("securellm_scheduler_leases", &[("state", "evicting")]),
        Some(0.0)
    );
    assert_gauges_match(&m6, &status(&mut c).await);
    let e = c
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: low.id,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);

    // A wait that runs out: `timeout`. A refused request: `rejected`.
    let mut late = c
        .acquire_lease(acq("late", 4 * GIB, 0, 0, 200))
        .await
        .unwrap()
        .into_inner();
    while let Some(u) = late.next().await {
        if let Err(st) = u {
            assert_eq!(st.code(), Code::DeadlineExceeded);
            break;
        }
    }
    let bad = c.acquire_lease(acq("bad", 0, 0, 0, 0)).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    scrape_until(&s, "the timeout and the rejection", |m| {
        waits(m, "timeout") == waits(&m0, "timeout") + 1.0
            && waits(m, "rejected") == waits(&m0, "rejected") + 1.0
    })
    .await;

    // A lease nobody renews expires. Priorities outside -10..=10 share one label value.
    lease(
        &mut c,
        pb::AcquireLeaseRequest {
            ttl_ms: 200,
            ..acq("short", GIB, 1000, 1, 0)
        },
    )
    .await;
    let m7 = scrape_until(&s, "the expiry", |m| {
        m.val(EXPIRIES, &[]) == m0.val(EXPIRIES, &[]) + 1.0
    })
    .await;
    assert_eq!(m7.get(GRANTS, &[("priority", "above_10")]), Some(1.0));
    assert!(!m7.text.contains("priority=\"1000\""), "{}", m7.text);
    assert_gauges_match(&m7, &status(&mut c).await);

    // Prometheus' own checker accepts the exposition.
    promtool_check(&m7.text);

    // Anything but /metrics is a 404.
    let (head, _) = get(s.metrics.as_ref().unwrap().addr, "/").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    s.shutdown().await;
}
