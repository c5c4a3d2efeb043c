//! The decision log of a real scheduler over real gRPC: a grant, an eviction caused by a traced
//! higher-priority request, a release, an expiry and a revocation land in the data directory's
//! decision file, in order, with holders, bytes and causes; the chain verifies; an edited byte
//! makes verification fail naming the row; a restart continues the chain.

use std::time::Duration;

use securellm_common::internal_auth::{AuthChannel, authenticated};
use securellm_proto::v1 as pb;
use securellm_proto::v1::acquire_lease_update::Update;
use securellm_proto::v1::vram_scheduler_client::VramSchedulerClient;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use vram_scheduler::config::{InventoryMode, SchedulerConfig};
use vram_scheduler::decisions::{self, DecisionKind, Row, TamperKind};

const GIB: u64 = 1 << 30;
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

fn config(dir: &std::path::Path) -> SchedulerConfig {
    SchedulerConfig {
        listen: "127.0.0.1:0".into(),
        inventory: InventoryMode::Simulated,
        simulate_gpus: vec![securellm_common::ByteSize(24 * GIB)],
        eviction_grace_ms: 300,
        data_dir: Some(dir.to_path_buf()),
        ..SchedulerConfig::default()
    }
}

async fn start(
    dir: &std::path::Path,
) -> (
    vram_scheduler::RunningScheduler,
    VramSchedulerClient<AuthChannel>,
) {
    let s = vram_scheduler::start(&config(dir)).await.unwrap();
    let ch = Channel::from_shared(format!("http://{}", s.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (s, VramSchedulerClient::new(authenticated(ch, None)))
}

fn acq(
    holder: &str,
    model: &str,
    bytes: u64,
    priority: i32,
    ttl_ms: u64,
) -> pb::AcquireLeaseRequest {
    pb::AcquireLeaseRequest {
        holder: holder.into(),
        bytes,
        priority,
        gpu_index: None,
        ttl_ms,
        wait_ms: 30_000,
        label: model.into(),
    }
}

/// Acquire (optionally with a `traceparent`) and wait for the grant.
async fn lease(
    mut c: VramSchedulerClient<AuthChannel>,
    r: pb::AcquireLeaseRequest,
    trace: Option<&str>,
) -> pb::Lease {
    let mut req = tonic::Request::new(r);
    if let Some(t) = trace {
        req.metadata_mut().insert(
            "traceparent",
            format!("00-{t}-00f067aa0ba902b7-01").parse().unwrap(),
        );
    }
    let mut s = c.acquire_lease(req).await.unwrap().into_inner();
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(u) = s.next().await {
            if let Update::Granted(l) = u.unwrap().update.unwrap() {
                return l;
            }
        }
        panic!("stream ended without a grant");
    })
    .await
    .expect("granted in time")
}

/// Wait until the scheduler shows a lease under an eviction notice.
async fn until_noticed(c: &mut VramSchedulerClient<AuthChannel>, id: &str) {
    for _ in 0..200 {
        let st = c
            .get_status(pb::GetStatusRequest::default())
            .await
            .unwrap()
            .into_inner();
        if st
            .leases
            .iter()
            .any(|l| l.id == id && l.evict_by_ms.is_some())
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("lease {id} never got an eviction notice");
}

fn find<'a>(rows: &'a [Row], kind: DecisionKind, model: &str) -> (usize, &'a Row) {
    rows.iter()
        .enumerate()
        .find(|(_, r)| r.decision.kind == kind && r.decision.model == model)
        .unwrap_or_else(|| panic!("no {kind:?} of {model} in {rows:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_evictions_releases_expiries_and_revocations_are_chained_and_verifiable() {
    let dir = tempfile::tempdir().unwrap();
    let path = decisions::decisions_path(dir.path());
    let (s, mut c) = start(dir.path()).await;

    // A grant.
    let qwen = lease(
        c.clone(),
        acq("backend-manager", "qwen", 16 * GIB, 0, 60_000),
        None,
    )
    .await;
    // A traced higher-priority request that does not fit: qwen is asked to go.
    let llama = tokio::spawn(lease(
        c.clone(),
        acq("gateway-user", "llama", 12 * GIB, 10, 60_000),
        Some(TRACE),
    ));
    until_noticed(&mut c, &qwen.id).await;
    // qwen honours the notice: llama is granted.
    c.release_lease(pb::ReleaseLeaseRequest {
        lease_id: qwen.id.clone(),
    })
    .await
    .unwrap();
    let llama = llama.await.unwrap();
    // A lease nobody renews expires.
    let tiny = lease(c.clone(), acq("janitor", "tiny", GIB, 0, 200), None).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    // A lease that ignores its notice is revoked.
    let phi = lease(c.clone(), acq("stubborn", "phi", 10 * GIB, 0, 60_000), None).await;
    let mistral = tokio::spawn(lease(
        c.clone(),
        acq("gateway-user", "mistral", 8 * GIB, 10, 60_000),
        None,
    ));
    until_noticed(&mut c, &phi.id).await;
    let mistral = mistral.await.unwrap();
    s.handle.flush().await.unwrap();

    let rows = decisions::read_rows(&path).unwrap();
    assert_eq!(rows[0].decision.kind, DecisionKind::Started);
    assert!(
        rows[0].decision.detail.contains("simulated"),
        "{:?}",
        rows[0]
    );
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r.seq, i as u64 + 1);
    }

    let (g_qwen, r) = find(&rows, DecisionKind::Granted, "qwen");
    assert_eq!(r.decision.lease, qwen.id);
    assert_eq!(
        (
            r.decision.holder.as_str(),
            r.decision.bytes,
            r.decision.gpu,
            r.decision.priority
        ),
        ("backend-manager", 16 * GIB, Some(0), 0)
    );
    let (n_qwen, notice) = find(&rows, DecisionKind::EvictionNotice, "qwen");
    assert_eq!(notice.decision.lease, qwen.id);
    assert!(notice.decision.evict_by_ms.is_some());
    let cause = notice
        .decision
        .cause
        .as_ref()
        .expect("the notice names its cause");
    assert_eq!(
        (
            cause.holder.as_str(),
            cause.label.as_str(),
            cause.bytes,
            cause.priority,
            cause.trace_id.as_deref()
        ),
        ("gateway-user", "llama", 12 * GIB, 10, Some(TRACE)),
        "who evicted qwen, and why"
    );
    let (rel_qwen, released) = find(&rows, DecisionKind::Released, "qwen");
    assert_eq!(released.decision.cause.as_ref(), Some(cause));
    let (g_llama, granted) = find(&rows, DecisionKind::Granted, "llama");
    assert_eq!(granted.decision.lease, llama.id);
    assert_eq!(
        granted
            .decision
            .cause
            .as_ref()
            .and_then(|c| c.trace_id.as_deref()),
        Some(TRACE)
    );
    let (exp_tiny, expired) = find(&rows, DecisionKind::Expired, "tiny");
    assert_eq!(
        (expired.decision.lease.as_str(), expired.decision.bytes),
        (tiny.id.as_str(), GIB)
    );
    let (n_phi, n) = find(&rows, DecisionKind::EvictionNotice, "phi");
    assert_eq!(
        n.decision.cause.as_ref().map(|c| c.label.as_str()),
        Some("mistral")
    );
    assert_eq!(
        n.decision.cause.as_ref().and_then(|c| c.trace_id.as_ref()),
        None
    );
    let (rev_phi, revoked) = find(&rows, DecisionKind::Revoked, "phi");
    assert_eq!(
        (
            revoked.decision.lease.as_str(),
            revoked.decision.holder.as_str()
        ),
        (phi.id.as_str(), "stubborn")
    );
    assert_eq!(
        revoked.decision.cause.as_ref().map(|c| c.holder.as_str()),
        Some("gateway-user")
    );
    let (g_mistral, g) = find(&rows, DecisionKind::Granted, "mistral");
    assert_eq!(g.decision.lease, mistral.id);
    assert!(
        g_qwen < n_qwen
            && n_qwen < rel_qwen
            && rel_qwen < g_llama
            && g_llama < exp_tiny
            && exp_tiny < rev_phi
            && n_phi < rev_phi
            && rev_phi < g_mistral,
        "{rows:#?}"
    );

    let rep = decisions::verify_file(&path).unwrap();
    assert!(rep.ok, "{rep:?}");
    assert_eq!(rep.rows_checked, rows.len() as u64);
    assert_eq!(rep.last_hash, rows.last().unwrap().row_hash);

    // A restart continues the chain.
    s.shutdown().await;
    let (s, _c) = start(dir.path()).await;
    s.handle.flush().await.unwrap();
    let after = decisions::read_rows(&path).unwrap();
    assert_eq!(after.len(), rows.len() + 1);
    assert_eq!(after[rows.len()].decision.kind, DecisionKind::Started);
    assert!(decisions::verify_file(&path).unwrap().ok);
    s.shutdown().await;

    // One edited byte (the evicted model's name in the notice) is found and named.
    let mut bytes = std::fs::read(&path).unwrap();
    let line_start = bytes
        .split_inclusive(|b| *b == b'\n')
        .take(n_qwen)
        .map(<[u8]>::len)
        .sum::<usize>();
    let at = line_start
        + bytes[line_start..]
            .windows(6)
            .position(|w| w == b"\"qwen\"")
            .unwrap()
        + 4;
    bytes[at] = b'x';
    std::fs::write(&path, &bytes).unwrap();
    let rep = decisions::verify_file(&path).unwrap();
    assert!(!rep.ok);
    assert_eq!(rep.kind, Some(TamperKind::Edited), "{rep:?}");
    assert_eq!(rep.first_bad_line, Some(n_qwen as u64 + 1), "{rep:?}");
    assert_eq!(rep.first_bad_seq, Some(notice.seq), "{rep:?}");
    assert_eq!(rep.rows_checked, n_qwen as u64);
}

#[tokio::test]
async fn without_a_data_dir_there_is_no_decision_file() {
    let cfg = SchedulerConfig {
        data_dir: None,
        ..config(std::path::Path::new("/nonexistent"))
    };
    let s = vram_scheduler::start(&cfg).await.unwrap();
    assert!(s.handle.decisions().is_none());
    s.shutdown().await;
}
