//! Unit tests of the pure lease logic: no runtime, no clock, time passed in by hand.

use vram_scheduler::inventory::simulated;
use vram_scheduler::table::*;

const GIB: u64 = 1 << 30;

fn table(sizes: &[u64]) -> LeaseTable {
    LeaseTable::new(simulated(sizes, 0), Limits::default(), "t")
}

fn req(holder: &str, bytes: u64, priority: i32) -> AcquireRequest {
    AcquireRequest {
        holder: holder.into(),
        label: String::new(),
        bytes,
        priority,
        gpu: None,
        ttl_ms: 10_000,
        wait_ms: 0,
    }
}

fn waiting(holder: &str, bytes: u64, priority: i32) -> AcquireRequest {
    AcquireRequest {
        wait_ms: 60_000,
        ..req(holder, bytes, priority)
    }
}

fn granted(out: Result<AcquireOutcome, TableError>) -> Lease {
    match out {
        Ok(AcquireOutcome::Granted(l)) => l,
        other => panic!("expected a grant, got {other:?}"),
    }
}

fn queued(out: Result<AcquireOutcome, TableError>) -> QueuePos {
    match out {
        Ok(AcquireOutcome::Queued(p)) => p,
        other => panic!("expected to be queued, got {other:?}"),
    }
}

fn kinds(t: &mut LeaseTable) -> Vec<EventKind> {
    t.take_events().into_iter().map(|e| e.kind).collect()
}

#[test]
fn grants_when_it_fits_and_picks_the_best_fitting_gpu() {
    let mut t = table(&[24 * GIB, 8 * GIB]);
    let l = granted(t.acquire(req("a", 6 * GIB, 0), 0));
    assert_eq!(l.gpu, 1, "best fit: the 8 GiB GPU leaves the smaller hole");
    assert_eq!(l.expires_at_ms, 10_000);
    let l2 = granted(t.acquire(req("b", 6 * GIB, 0), 0));
    assert_eq!(l2.gpu, 0);
    assert_eq!(t.account(0).granted, 6 * GIB);
    assert_eq!(t.account(1).grantable(), 2 * GIB);
    assert_eq!(kinds(&mut t), vec![EventKind::Granted, EventKind::Granted]);
}

#[test]
fn bad_input_is_refused_with_the_field_named_and_nothing_changes() {
    let mut t = table(&[8 * GIB]);
    granted(t.acquire(req("a", GIB, 0), 0));
    let before = t.snapshot();
    let cases: Vec<(AcquireRequest, &str)> = vec![
        (req("", GIB, 0), "holder"),
        (req(&"x".repeat(300), GIB, 0), "holder"),
        (req("b", 0, 0), "bytes"),
        (req("b", 9 * GIB, 0), "bytes"),
        (
            AcquireRequest {
                ttl_ms: 0,
                ..req("b", GIB, 0)
            },
            "ttl_ms",
        ),
        (
            AcquireRequest {
                ttl_ms: u64::MAX,
                ..req("b", GIB, 0)
            },
            "ttl_ms",
        ),
        (
            AcquireRequest {
                wait_ms: u64::MAX,
                ..req("b", GIB, 0)
            },
            "wait_ms",
        ),
        (
            AcquireRequest {
                gpu: Some(7),
                ..req("b", GIB, 0)
            },
            "gpu_index",
        ),
    ];
    for (r, field) in cases {
        let e = t.acquire(r, 5).unwrap_err();
        assert!(e.to_string().contains(field), "{e} should name {field}");
    }
    assert!(matches!(
        t.acquire(
            AcquireRequest {
                gpu: Some(7),
                ..req("b", GIB, 0)
            },
            5
        ),
        Err(TableError::NotFound(_))
    ));
    assert!(matches!(t.release("nope", 5), Err(TableError::NotFound(_))));
    assert!(matches!(
        t.renew("nope", 0, vec![], false, 5),
        Err(TableError::NotFound(_))
    ));
    assert!(matches!(
        t.resize("nope", 5, 5),
        Err(TableError::NotFound(_))
    ));
    let id = t.leases().next().unwrap().id.clone();
    assert!(
        t.resize(&id, 0, 5)
            .unwrap_err()
            .to_string()
            .contains("bytes")
    );
    assert!(
        t.renew(&id, u64::MAX, vec![], false, 5)
            .unwrap_err()
            .to_string()
            .contains("ttl_ms")
    );
    assert!(
        t.set_simulated_foreign(0, 9 * GIB, 5)
            .unwrap_err()
            .to_string()
            .contains("foreign_bytes")
    );
    assert_eq!(
        t.snapshot(),
        before,
        "refused requests must not change state"
    );
    assert!(t.queue().is_empty());
}

#[test]
fn no_wait_request_that_does_not_fit_is_resource_exhausted() {
    let mut t = table(&[8 * GIB]);
    granted(t.acquire(req("a", 6 * GIB, 0), 0));
    let e = t.acquire(req("b", 4 * GIB, 0), 0).unwrap_err();
    assert!(matches!(e, TableError::ResourceExhausted(_)), "{e:?}");
    assert!(t.queue().is_empty());
}

#[test]
fn queued_request_is_granted_when_memory_frees() {
    let mut t = table(&[8 * GIB]);
    let a = granted(t.acquire(req("a", 6 * GIB, 0), 0));
    let p = queued(t.acquire(waiting("b", 4 * GIB, 0), 1));
    assert_eq!(p.position, 0);
    assert_eq!(p.queue_length, 1);
    t.take_notices();
    t.release(&a.id, 2).unwrap();
    let notices = t.take_notices();
    assert!(
        matches!(&notices[..], [WaiterNotice::Granted { ticket, lease }] if *ticket == p.ticket && lease.bytes == 4 * GIB),
        "{notices:?}"
    );
    assert!(t.queue().is_empty());
    assert_eq!(t.account(0).granted, 4 * GIB);
}

#[test]
fn queue_is_priority_then_fifo_and_positions_are_reported() {
    let mut t = table(&[8 * GIB]);
    let a = granted(t.acquire(req("a", 8 * GIB, 9), 0));
    let low1 = queued(t.acquire(waiting("low1", 2 * GIB, 0), 1));
    let low2 = queued(t.acquire(waiting("low2", 2 * GIB, 0), 2));
    assert_eq!((low1.position, low2.position), (0, 1));
    t.take_notices();
    let high = queued(t.acquire(waiting("high", 7 * GIB, 5), 3));
    assert_eq!(high.position, 0, "higher priority goes first");
    let notices = t.take_notices();
    assert!(notices.contains(&WaiterNotice::Position(QueuePos {
        ticket: low1.ticket.clone(),
        position: 1,
        queue_length: 3,
        evictions_requested: false,
    })));
    t.release(&a.id, 4).unwrap();
    // 8 GiB free: high (7) first; then 1 GiB left, lows (2 each) must wait.
    let holders: Vec<String> = t.leases().map(|l| l.holder.clone()).collect();
    assert_eq!(holders, vec!["high".to_string()]);
    let high_lease = t.leases().next().unwrap().id.clone();
    t.release(&high_lease, 5).unwrap();
    let mut holders: Vec<String> = t.leases().map(|l| l.holder.clone()).collect();
    holders.sort();
    assert_eq!(holders, vec!["low1".to_string(), "low2".to_string()]);
}

#[test]
fn a_blocked_big_request_is_not_starved_by_smaller_later_ones() {
    let mut t = table(&[8 * GIB]);
    let a = granted(t.acquire(req("a", 6 * GIB, 0), 0));
    queued(t.acquire(waiting("big", 6 * GIB, 0), 1));
    // 2 GiB are free, but "big" is ahead in line: a small one must queue behind it.
    queued(t.acquire(waiting("small", GIB, 0), 2));
    t.release(&a.id, 3).unwrap();
    let holders: Vec<String> = t.leases().map(|l| l.holder.clone()).collect();
    assert!(holders.contains(&"big".to_string()) && holders.contains(&"small".to_string()));
}

#[test]
fn unrenewed_lease_expires_and_renewal_extends() {
    let mut t = table(&[8 * GIB]);
    let a = granted(t.acquire(req("a", 4 * GIB, 0), 0));
    let b = granted(t.acquire(req("b", 4 * GIB, 0), 0));
    t.take_events();
    assert_eq!(t.next_deadline(), Some(10_000));
    t.renew(&b.id, 0, vec![42], true, 9_000).unwrap();
    t.tick(10_000);
    assert_eq!(kinds(&mut t), vec![EventKind::Expired]);
    assert!(t.lease(&a.id).is_none());
    assert_eq!(t.lease(&b.id).unwrap().pids, vec![42]);
    let e = t.renew(&a.id, 0, vec![], false, 10_001).unwrap_err();
    assert!(
        matches!(e, TableError::FailedPrecondition(ref m) if m.contains("expired")),
        "{e:?}"
    );
    let e = t.release(&a.id, 10_001).unwrap_err();
    assert!(matches!(e, TableError::FailedPrecondition(_)));
    t.tick(18_999);
    assert!(t.lease(&b.id).is_some(), "renewed at 9000 with a 10 s TTL");
    t.tick(19_000);
    assert!(t.lease(&b.id).is_none());
}

#[test]
fn waiter_times_out_at_its_deadline() {
    let mut t = table(&[8 * GIB]);
    granted(t.acquire(req("a", 8 * GIB, 0), 0));
    let p = queued(t.acquire(
        AcquireRequest {
            wait_ms: 500,
            ..req("b", GIB, 0)
        },
        0,
    ));
    t.take_notices();
    t.tick(499);
    assert_eq!(t.queue().len(), 1);
    t.tick(500);
    assert!(t.queue().is_empty());
    assert_eq!(
        t.take_notices(),
        vec![WaiterNotice::TimedOut { ticket: p.ticket }]
    );
}

#[test]
fn preemption_notifies_idle_lower_priority_first_then_grants_on_release() {
    let mut t = table(&[16 * GIB]);
    let busy = granted(t.acquire(req("busy", 6 * GIB, 1), 0));
    let idle = granted(t.acquire(req("idle", 6 * GIB, 1), 0));
    t.renew(&idle.id, 0, vec![], true, 0).unwrap();
    t.take_events();
    let p = queued(t.acquire(waiting("high", 8 * GIB, 5), 1));
    assert!(p.evictions_requested);
    let ev = t.take_events();
    let notices: Vec<&Event> = ev
        .iter()
        .filter(|e| e.kind == EventKind::EvictionNotice)
        .collect();
    assert_eq!(notices.len(), 1, "{ev:?}");
    assert_eq!(notices[0].lease.id, idle.id, "idle lease goes first");
    assert_eq!(
        notices[0].lease.evict_by_ms,
        Some(1 + Limits::default().eviction_grace_ms)
    );
    assert!(t.lease(&busy.id).unwrap().evict_by_ms.is_none());
    // Asking again does not pile on more notices.
    t.tick(2);
    assert!(
        t.take_events()
            .iter()
            .all(|e| e.kind != EventKind::EvictionNotice)
    );
    t.take_notices();
    t.release(&idle.id, 3).unwrap();
    assert!(
        matches!(&t.take_notices()[..], [WaiterNotice::Granted { lease, .. }] if lease.holder == "high")
    );
}

#[test]
fn preemption_picks_the_smallest_lease_that_frees_enough() {
    let mut t = table(&[16 * GIB]);
    let big = granted(t.acquire(req("big", 8 * GIB, 0), 0));
    let mid = granted(t.acquire(req("mid", 4 * GIB, 0), 0));
    let small = granted(t.acquire(req("small", 2 * GIB, 0), 0));
    t.take_events();
    // 2 GiB free; needs 5 GiB: 3 more. "mid" (4) is the smallest that covers it.
    queued(t.acquire(waiting("high", 5 * GIB, 3), 1));
    let evicted: Vec<String> = t
        .take_events()
        .into_iter()
        .filter(|e| e.kind == EventKind::EvictionNotice)
        .map(|e| e.lease.id)
        .collect();
    assert_eq!(evicted, vec![mid.id]);
    let _ = (big, small);
}

#[test]
fn never_preempts_equal_or_higher_priority() {
    let mut t = table(&[8 * GIB]);
    granted(t.acquire(req("same", 4 * GIB, 5), 0));
    granted(t.acquire(req("higher", 4 * GIB, 9), 0));
    t.take_events();
    let p = queued(t.acquire(waiting("x", 4 * GIB, 5), 1));
    assert!(!p.evictions_requested);
    assert!(
        t.take_events()
            .iter()
            .all(|e| e.kind != EventKind::EvictionNotice)
    );
    assert!(t.leases().all(|l| l.evict_by_ms.is_none()));
}

#[test]
fn ignored_notice_is_revoked_at_the_deadline() {
    let mut t = table(&[8 * GIB]);
    let low = granted(t.acquire(
        AcquireRequest {
            ttl_ms: 3_600_000,
            ..req("low", 6 * GIB, 0)
        },
        0,
    ));
    queued(t.acquire(waiting("high", 6 * GIB, 5), 0));
    let deadline = t.lease(&low.id).unwrap().evict_by_ms.unwrap();
    t.renew(&low.id, 0, vec![], false, deadline - 1).unwrap();
    t.tick(deadline - 1);
    assert!(t.lease(&low.id).is_some());
    t.take_events();
    t.take_notices();
    t.tick(deadline);
    let ev = kinds(&mut t);
    assert!(ev.contains(&EventKind::Revoked), "{ev:?}");
    assert!(ev.contains(&EventKind::Granted), "{ev:?}");
    let e = t.release(&low.id, deadline + 1).unwrap_err();
    assert!(e.to_string().contains("revoked"), "{e}");
}

#[test]
fn resize_shrinks_always_and_grows_only_if_it_fits() {
    let mut t = table(&[8 * GIB]);
    let a = granted(t.acquire(req("a", 4 * GIB, 0), 0));
    granted(t.acquire(req("b", 3 * GIB, 0), 0));
    assert_eq!(t.resize(&a.id, 2 * GIB, 1).unwrap().bytes, 2 * GIB);
    assert_eq!(t.resize(&a.id, 5 * GIB, 1).unwrap().bytes, 5 * GIB);
    let e = t.resize(&a.id, 6 * GIB, 1).unwrap_err();
    assert!(matches!(e, TableError::ResourceExhausted(_)), "{e:?}");
    assert_eq!(t.lease(&a.id).unwrap().bytes, 5 * GIB);
}

#[test]
fn shrinking_grants_to_waiters() {
    let mut t = table(&[8 * GIB]);
    let a = granted(t.acquire(req("a", 8 * GIB, 0), 0));
    queued(t.acquire(waiting("b", 3 * GIB, 0), 0));
    t.take_notices();
    t.resize(&a.id, 5 * GIB, 1).unwrap();
    assert!(matches!(
        &t.take_notices()[..],
        [WaiterNotice::Granted { .. }]
    ));
}

#[test]
fn simulated_foreign_use_is_not_grantable_and_overcommit_blocks_grants() {
    let mut t = table(&[8 * GIB]);
    t.set_simulated_foreign(0, 3 * GIB, 0).unwrap();
    assert_eq!(t.account(0).grantable(), 5 * GIB);
    assert!(t.acquire(req("a", 6 * GIB, 0), 0).is_err());
    let a = granted(t.acquire(req("a", 5 * GIB, 0), 0));
    t.take_events();
    // A foreign process grows past what was free: over-committed, reported, no grants.
    t.set_simulated_foreign(0, 4 * GIB, 1).unwrap();
    assert!(t.is_overcommitted(0));
    assert_eq!(kinds(&mut t), vec![EventKind::Overcommitted]);
    assert!(t.acquire(req("b", 1, 0), 2).is_err());
    t.release(&a.id, 3).unwrap();
    assert!(!t.is_overcommitted(0));
    granted(t.acquire(req("b", 4 * GIB, 0), 4));
}

#[test]
fn reserve_is_never_granted() {
    let mut t = LeaseTable::new(simulated(&[8 * GIB], GIB), Limits::default(), "t");
    let e = t.acquire(req("a", 8 * GIB, 0), 0).unwrap_err();
    assert!(e.to_string().contains("bytes"), "{e}");
    granted(t.acquire(req("a", 7 * GIB, 0), 0));
    assert!(t.acquire(req("b", 1, 0), 0).is_err());
}

fn nvml_gpu(total: u64, used: u64, processes: Option<Vec<(u32, u64)>>) -> Gpu {
    Gpu {
        index: 0,
        uuid: "GPU-x".into(),
        name: "Real".into(),
        simulated: false,
        total,
        reserve: 0,
        observed_used: used,
        processes,
        simulated_foreign: 0,
    }
}

#[test]
fn nvml_foreign_use_counts_unleased_processes_overflow_and_unattributed_memory() {
    let lease = |id: &str, bytes: u64, pids: Vec<u32>| Lease {
        id: id.into(),
        holder: "h".into(),
        label: String::new(),
        gpu: 0,
        bytes,
        priority: 0,
        ttl_ms: 1,
        granted_at_ms: 0,
        expires_at_ms: 1,
        pids,
        idle: false,
        evict_by_ms: None,
        last_used_ms: 0,
    };
    // pid 1 leased (uses 3 of its 4), pid 2 leased (uses 5 of its 4: 1 overflow), pid 3 unleased
    // (2), and 1 used by no process (driver): foreign = 2 + 1 + 1.
    let gpu = nvml_gpu(
        24 * GIB,
        11 * GIB,
        Some(vec![(1, 3 * GIB), (2, 5 * GIB), (3, 2 * GIB)]),
    );
    let leases = [lease("a", 4 * GIB, vec![1]), lease("b", 4 * GIB, vec![2])];
    assert_eq!(foreign_bytes(&gpu, leases.iter()), 4 * GIB);
    // Without per-process data: used minus leased.
    let gpu = nvml_gpu(24 * GIB, 11 * GIB, None);
    assert_eq!(foreign_bytes(&gpu, leases.iter()), 3 * GIB);
}

#[test]
fn observed_nvml_usage_limits_grants() {
    let gpus = vec![nvml_gpu(16 * GIB, 0, Some(vec![]))];
    let mut t = LeaseTable::new(gpus, Limits::default(), "t");
    t.observe(
        &[GpuObservation {
            index: 0,
            total: 16 * GIB,
            used: 10 * GIB,
            processes: Some(vec![(77, 10 * GIB)]),
        }],
        0,
    );
    assert_eq!(t.account(0).foreign, 10 * GIB);
    assert!(t.acquire(req("a", 7 * GIB, 0), 0).is_err());
    let l = granted(t.acquire(req("a", 6 * GIB, 0), 0));
    // The holder starts its process and reports the pid: its memory is no longer foreign.
    t.observe(
        &[GpuObservation {
            index: 0,
            total: 16 * GIB,
            used: 15 * GIB,
            processes: Some(vec![(77, 10 * GIB), (88, 5 * GIB)]),
        }],
        1,
    );
    t.renew(&l.id, 0, vec![88], false, 1).unwrap();
    assert_eq!(t.account(0).foreign, 10 * GIB);
    assert!(t.check_all().is_ok());
    assert!(matches!(
        t.set_simulated_foreign(0, 1, 2),
        Err(TableError::FailedPrecondition(_))
    ));
}

#[test]
fn reattach_confirms_restores_or_reports_lost() {
    let mut t = table(&[8 * GIB]);
    let a = granted(t.acquire(req("mgr", 2 * GIB, 0), 0));
    let mut ghost = a.clone();
    ghost.id = "l-old-1".into();
    ghost.bytes = 3 * GIB;
    let mut too_big = a.clone();
    too_big.id = "l-old-2".into();
    too_big.bytes = 4 * GIB;
    let mut foreign_holder = a.clone();
    foreign_holder.id = "l-old-3".into();
    foreign_holder.holder = "someone-else".into();
    let out = t
        .reattach(
            "mgr",
            vec![a.clone(), ghost.clone(), too_big.clone(), foreign_holder],
            100,
        )
        .unwrap();
    assert_eq!(out.confirmed.len(), 1);
    assert_eq!(out.confirmed[0].expires_at_ms, 100 + a.ttl_ms);
    assert_eq!(out.restored.len(), 1);
    assert_eq!(out.restored[0].id, "l-old-1");
    let lost: Vec<&str> = out.lost.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(lost, vec!["l-old-2", "l-old-3"]);
    assert!(t.check_all().is_ok());
    assert_eq!(t.account(0).granted, 5 * GIB);
    assert!(t.reattach("", vec![], 0).is_err());
}

#[test]
fn snapshot_restore_keeps_leases_with_a_fresh_ttl() {
    let mut t = table(&[8 * GIB]);
    let a = granted(t.acquire(req("a", 3 * GIB, 0), 0));
    t.set_simulated_foreign(0, GIB, 0).unwrap();
    let snap = t.snapshot();
    let mut t2 = table(&[8 * GIB]);
    let dropped = t2.restore_snapshot(snap, 50_000);
    assert!(dropped.is_empty());
    assert_eq!(t2.lease(&a.id).unwrap().expires_at_ms, 60_000);
    assert_eq!(t2.account(0).foreign, GIB);
    // Smaller GPU after restart: what no longer fits is dropped, never over-committed.
    let mut t3 = table(&[2 * GIB]);
    assert_eq!(t3.restore_snapshot(t.snapshot(), 0).len(), 1);
    assert!(t3.check_all().is_ok());
}

/// The invariant checker itself must catch a broken decision rule.
#[test]
fn a_fit_rule_that_ignores_foreign_use_is_caught_by_the_invariant_check() {
    fn ignores_foreign(a: &GpuAccount, bytes: u64) -> bool {
        a.total.saturating_sub(a.reserve).saturating_sub(a.granted) >= bytes
    }
    let mut t = table(&[8 * GIB]).with_fit_rule(ignores_foreign);
    t.set_simulated_foreign(0, 4 * GIB, 0).unwrap();
    assert!(t.check_all().is_ok());
    granted(t.acquire(req("a", 6 * GIB, 0), 0));
    let (gpu, v) = t.check_all().unwrap_err();
    assert_eq!(gpu, 0);
    assert_eq!((v.granted, v.foreign), (6 * GIB, 4 * GIB));
    // And the real rule refuses the same request.
    let mut t = table(&[8 * GIB]);
    t.set_simulated_foreign(0, 4 * GIB, 0).unwrap();
    assert!(t.acquire(req("a", 6 * GIB, 0), 0).is_err());
}

#[test]
fn a_restored_lease_counts_its_own_process_as_leased_not_foreign() {
    // 24 GiB GPU; the holder's process (pid 7) uses its whole 14 GiB lease.
    let gpus = vec![nvml_gpu(24 * GIB, 14 * GIB, Some(vec![(7, 14 * GIB)]))];
    let lease = Lease {
        id: "l-old-1".into(),
        holder: "mgr".into(),
        label: String::new(),
        gpu: 0,
        bytes: 14 * GIB,
        priority: 0,
        ttl_ms: 10_000,
        granted_at_ms: 0,
        expires_at_ms: 10_000,
        pids: vec![7],
        idle: false,
        evict_by_ms: None,
        last_used_ms: 0,
    };
    let mut t = LeaseTable::new(gpus.clone(), Limits::default(), "t");
    let out = t.reattach("mgr", vec![lease.clone()], 0).unwrap();
    assert_eq!(out.restored.len(), 1, "{:?}", out.lost);
    assert_eq!(t.account(0).foreign, 0);
    assert_eq!(t.account(0).grantable(), 10 * GIB);
    let mut t = LeaseTable::new(gpus, Limits::default(), "t");
    let snap = Snapshot {
        leases: vec![lease],
        simulated_foreign: vec![],
    };
    assert!(
        t.restore_snapshot(snap, 0).is_empty(),
        "kept after a restart"
    );
    assert!(t.check_all().is_ok());
}

#[test]
fn a_notice_is_withdrawn_when_the_request_it_was_for_goes_away() {
    for how in ["cancel", "timeout"] {
        let mut t = table(&[8 * GIB]);
        let low = granted(t.acquire(
            AcquireRequest {
                ttl_ms: 3_600_000,
                ..req("low", 6 * GIB, 0)
            },
            0,
        ));
        let pos = queued(t.acquire(
            AcquireRequest {
                wait_ms: 1_000,
                ..req("high", 6 * GIB, 5)
            },
            0,
        ));
        let deadline = t.lease(&low.id).unwrap().evict_by_ms.expect("noticed");
        t.take_events();
        if how == "cancel" {
            assert!(t.cancel_waiter(&pos.ticket, 10));
        } else {
            t.tick(1_000);
        }
        assert_eq!(t.lease(&low.id).unwrap().evict_by_ms, None, "{how}");
        assert!(
            kinds(&mut t).contains(&EventKind::EvictionWithdrawn),
            "{how}"
        );
        // Past the old deadline the holder keeps its lease.
        t.tick(deadline + 1);
        assert!(t.lease(&low.id).is_some(), "{how}");
    }
}

#[test]
fn a_notice_stays_while_another_waiter_still_needs_the_memory() {
    let mut t = table(&[8 * GIB]);
    let low = granted(t.acquire(
        AcquireRequest {
            ttl_ms: 3_600_000,
            ..req("low", 6 * GIB, 0)
        },
        0,
    ));
    let a = queued(t.acquire(waiting("a", 6 * GIB, 5), 0));
    queued(t.acquire(waiting("b", 6 * GIB, 5), 1));
    assert!(t.lease(&low.id).unwrap().evict_by_ms.is_some());
    assert!(t.cancel_waiter(&a.ticket, 2));
    assert!(
        t.lease(&low.id).unwrap().evict_by_ms.is_some(),
        "b still needs the memory"
    );
}

#[test]
fn a_restored_table_drops_notices_whose_requests_were_not_persisted() {
    let mut t = table(&[8 * GIB]);
    let low = granted(t.acquire(
        AcquireRequest {
            ttl_ms: 3_600_000,
            ..req("low", 6 * GIB, 0)
        },
        0,
    ));
    queued(t.acquire(waiting("high", 6 * GIB, 5), 0));
    assert!(t.lease(&low.id).unwrap().evict_by_ms.is_some());
    let mut fresh = table(&[8 * GIB]);
    let dropped = fresh.restore_snapshot(t.snapshot(), 10);
    assert!(dropped.is_empty());
    assert_eq!(fresh.lease(&low.id).unwrap().evict_by_ms, None);
    let deadline = t.lease(&low.id).unwrap().evict_by_ms.unwrap();
    fresh.tick(deadline + 1);
    assert!(
        fresh.lease(&low.id).is_some(),
        "not revoked for a request nobody remembers"
    );
}

#[test]
fn a_notice_stays_exactly_while_a_waiting_request_counts_on_it() {
    // Two GPUs, a low-priority lease on each; a request pinned to each GPU notices its lease.
    let mut t = table(&[8 * GIB, 8 * GIB]);
    let pinned = |holder: &str, gpu: u32, prio: i32| AcquireRequest {
        gpu: Some(gpu),
        ttl_ms: 3_600_000,
        ..waiting(holder, 6 * GIB, prio)
    };
    let l0 = granted(t.acquire(pinned("l0", 0, 0), 0));
    let l1 = granted(t.acquire(pinned("l1", 1, 0), 0));
    let a = queued(t.acquire(pinned("a", 0, 10), 1));
    let b = queued(t.acquire(pinned("b", 1, 10), 2));
    assert!(t.lease(&l0.id).unwrap().evict_by_ms.is_some());
    assert!(t.lease(&l1.id).unwrap().evict_by_ms.is_some());
    // A third request on any GPU counts on GPU 0's notice (memory already on its way).
    let c = queued(t.acquire(
        AcquireRequest {
            ttl_ms: 3_600_000,
            ..waiting("c", 6 * GIB, 10)
        },
        3,
    ));
    assert!(t.cancel_waiter(&b.ticket, 4));
    assert_eq!(
        t.lease(&l1.id).unwrap().evict_by_ms,
        None,
        "nobody counts on l1"
    );
    assert!(t.cancel_waiter(&a.ticket, 5));
    assert!(
        t.lease(&l0.id).unwrap().evict_by_ms.is_some(),
        "c still counts on l0"
    );
    assert!(t.cancel_waiter(&c.ticket, 6));
    assert_eq!(t.lease(&l0.id).unwrap().evict_by_ms, None);
}

// ---- idle leases yield (equal priority), busy ones do not; per-caller priority ----------------

fn notices(t: &mut LeaseTable) -> Vec<Event> {
    t.take_events()
        .into_iter()
        .filter(|e| e.kind == EventKind::EvictionNotice)
        .collect()
}

#[test]
fn an_idle_lease_yields_to_a_request_of_equal_priority_and_the_swap_completes() {
    let mut t = table(&[8 * GIB]);
    let a = granted(t.acquire(req("model-a", 6 * GIB, 0), 0));
    t.renew(&a.id, 0, vec![], true, 10).unwrap();
    t.take_events();
    let p = queued(t.acquire(waiting("model-b", 6 * GIB, 0), 20));
    assert!(p.evictions_requested);
    let n = notices(&mut t);
    assert_eq!(n.len(), 1);
    assert_eq!(n[0].lease.id, a.id);
    assert!(n[0].detail.contains("idle lease yields"), "{}", n[0].detail);
    t.release(&a.id, 30).unwrap();
    let g = t.take_notices();
    assert!(
        g.iter()
            .any(|n| matches!(n, WaiterNotice::Granted { ticket, .. } if *ticket == p.ticket)),
        "{g:?}"
    );
}

#[test]
fn a_busy_lease_is_not_noticed_for_equal_priority_until_it_turns_idle() {
    let mut t = table(&[8 * GIB]);
    let a = granted(t.acquire(req("model-a", 6 * GIB, 0), 0));
    t.renew(&a.id, 0, vec![], false, 10).unwrap();
    t.take_events();
    queued(t.acquire(waiting("model-b", 6 * GIB, 0), 20));
    assert!(notices(&mut t).is_empty(), "busy lease noticed");
    assert!(t.lease(&a.id).unwrap().evict_by_ms.is_none());
    // Its last request ends: the waiting request may now have the memory.
    t.renew(&a.id, 0, vec![], true, 500).unwrap();
    let n = notices(&mut t);
    assert_eq!(n.len(), 1);
    assert_eq!(n[0].lease.id, a.id);
}

#[test]
fn a_notice_to_an_idle_lease_is_withdrawn_when_it_turns_busy() {
    let mut t = table(&[8 * GIB]);
    let a = granted(t.acquire(req("model-a", 6 * GIB, 0), 0));
    t.renew(&a.id, 0, vec![], true, 10).unwrap();
    queued(t.acquire(waiting("model-b", 6 * GIB, 0), 20));
    assert!(t.lease(&a.id).unwrap().evict_by_ms.is_some());
    t.take_events();
    // A request reached the model before it stopped: it keeps its memory.
    let l = t.renew(&a.id, 0, vec![], false, 30).unwrap();
    assert!(
        l.evict_by_ms.is_none(),
        "the renew answer still carries the notice"
    );
    assert!(kinds(&mut t).contains(&EventKind::EvictionWithdrawn));
    // A higher-priority request's notice is not withdrawn by a busy report.
    let mut t = table(&[8 * GIB]);
    let a = granted(t.acquire(req("model-a", 6 * GIB, 0), 0));
    queued(t.acquire(waiting("urgent", 6 * GIB, 5), 20));
    assert!(t.lease(&a.id).unwrap().evict_by_ms.is_some());
    let l = t.renew(&a.id, 0, vec![], false, 30).unwrap();
    assert!(l.evict_by_ms.is_some());
}

#[test]
fn the_least_recently_used_idle_lease_yields_first() {
    let mut t = table(&[8 * GIB]);
    let old = granted(t.acquire(req("old", 3 * GIB, 0), 0));
    let recent = granted(t.acquire(req("recent", 3 * GIB, 0), 0));
    t.renew(&old.id, 0, vec![], false, 100).unwrap();
    t.renew(&old.id, 0, vec![], true, 200).unwrap();
    t.renew(&recent.id, 0, vec![], false, 300).unwrap();
    t.renew(&recent.id, 0, vec![], true, 400).unwrap();
    t.take_events();
    queued(t.acquire(waiting("new", 4 * GIB, 0), 500));
    let n = notices(&mut t);
    assert_eq!(n.len(), 1, "one 3 GiB lease frees enough");
    assert_eq!(n[0].lease.id, old.id);
}

#[test]
fn a_request_that_waited_long_enough_drains_a_busy_lease_of_its_priority() {
    let limits = Limits {
        preempt_busy_after_ms: 5_000,
        busy_drain_ms: 60_000,
        ..Limits::default()
    };
    let mut t = LeaseTable::new(simulated(&[8 * GIB], 0), limits, "t");
    let a = granted(t.acquire(req("model-a", 6 * GIB, 0), 0));
    t.renew(&a.id, 0, vec![], false, 10).unwrap();
    queued(t.acquire(waiting("model-b", 6 * GIB, 0), 1_000));
    assert!(notices(&mut t).is_empty());
    assert_eq!(
        t.next_deadline(),
        Some(6_000),
        "the table wakes when the wait arms"
    );
    t.tick(5_999);
    assert!(notices(&mut t).is_empty());
    t.renew(&a.id, 0, vec![], false, 5_999).unwrap();
    t.tick(6_000);
    let n = notices(&mut t);
    assert_eq!(n.len(), 1);
    assert_eq!(
        n[0].lease.evict_by_ms,
        Some(66_000),
        "busy_drain_ms to finish"
    );
    // A busy report does not call this one off.
    let l = t.renew(&a.id, 0, vec![], false, 6_100).unwrap();
    assert!(l.evict_by_ms.is_some());
    // With 0 (never), a busy lease never yields to its own priority.
    let limits = Limits {
        preempt_busy_after_ms: 0,
        ..Limits::default()
    };
    let mut t = LeaseTable::new(simulated(&[8 * GIB], 0), limits, "t");
    let a = granted(t.acquire(req("model-a", 6 * GIB, 0), 0));
    t.renew(&a.id, 0, vec![], false, 10).unwrap();
    queued(t.acquire(waiting("model-b", 6 * GIB, 0), 1_000));
    t.tick(50_000);
    assert!(notices(&mut t).is_empty());
}

#[test]
fn a_lower_priority_caller_never_evicts_a_higher_priority_model_even_idle() {
    let mut t = table(&[8 * GIB]);
    let interactive = granted(t.acquire(req("interactive", 6 * GIB, 10), 0));
    t.renew(&interactive.id, 0, vec![], true, 10).unwrap();
    t.take_events();
    queued(t.acquire(waiting("batch", 6 * GIB, -5), 20));
    assert!(notices(&mut t).is_empty());
    // ... and an interactive request evicts a batch model even while it is busy.
    let mut t = table(&[8 * GIB]);
    let batch = granted(t.acquire(req("batch", 6 * GIB, -5), 0));
    t.renew(&batch.id, 0, vec![], false, 10).unwrap();
    t.take_events();
    queued(t.acquire(waiting("interactive", 6 * GIB, 10), 20));
    let n = notices(&mut t);
    assert_eq!(n.len(), 1);
    assert_eq!(n[0].lease.id, batch.id);
}

#[test]
fn raising_a_lease_priority_calls_off_a_notice_it_no_longer_has_to_honour() {
    let mut t = table(&[8 * GIB]);
    let a = granted(t.acquire(req("model-a", 6 * GIB, -5), 0));
    t.renew(&a.id, 0, vec![], true, 10).unwrap();
    queued(t.acquire(waiting("batch-b", 6 * GIB, -5), 20));
    assert!(t.lease(&a.id).unwrap().evict_by_ms.is_some());
    t.take_events();
    // An interactive caller now uses model A (the holder raises the lease).
    let l = t.renew_as(&a.id, 0, vec![], true, Some(10), 30).unwrap();
    assert_eq!(l.priority, 10);
    assert!(l.evict_by_ms.is_none());
    assert!(kinds(&mut t).contains(&EventKind::EvictionWithdrawn));
}

#[test]
fn lease_ids_are_unguessable_and_never_reused() {
    let mut t1 = LeaseTable::new(simulated(&[8 * GIB], 0), Limits::default(), "key-one");
    let mut t2 = LeaseTable::new(simulated(&[8 * GIB], 0), Limits::default(), "key-two");
    let a1 = granted(t1.acquire(req("a", GIB, 0), 0));
    let a2 = granted(t2.acquire(req("a", GIB, 0), 0));
    assert_ne!(a1.id, a2.id, "ids depend on the table's secret key");
    assert_eq!(a1.id.len(), 2 + 32, "{}", a1.id);
    // A holder re-attaches an id chosen to collide with what the table would issue next: the
    // table never issues it again, so two holders never share one id.
    let mut probe = LeaseTable::new(simulated(&[8 * GIB], 0), Limits::default(), "key-one");
    granted(probe.acquire(req("a", GIB, 0), 0));
    let next = granted(probe.acquire(req("b", GIB, 0), 0)).id;
    let mut forged = a1.clone();
    forged.id = next.clone();
    forged.holder = "attacker".into();
    let r = t1.reattach("attacker", vec![forged], 5).unwrap();
    assert_eq!(r.restored.len(), 1);
    let b = granted(t1.acquire(req("b", GIB, 0), 6));
    assert_ne!(
        b.id, next,
        "an id held by a re-attached lease was issued again"
    );
    assert_eq!(t1.leases().filter(|l| l.id == next).count(), 1);
    // Malformed ids are refused; a live id of another holder is refused.
    let mut bad = a1.clone();
    bad.id = String::new();
    let mut taken = a1.clone();
    taken.holder = "attacker".into();
    let r = t1.reattach("attacker", vec![bad, taken], 7).unwrap();
    assert_eq!(r.lost.len(), 2, "{r:?}");
    assert_eq!(t1.lease(&a1.id).unwrap().holder, "a");
}

fn labelled(holder: &str, label: &str, bytes: u64, priority: i32) -> AcquireRequest {
    AcquireRequest {
        label: label.into(),
        ..waiting(holder, bytes, priority)
    }
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

fn event(events: &[Event], kind: EventKind) -> &Event {
    events
        .iter()
        .find(|e| e.kind == kind)
        .unwrap_or_else(|| panic!("no {kind:?} in {events:?}"))
}

#[test]
fn an_eviction_notice_names_the_request_that_caused_it_and_so_does_its_end() {
    let mut t = table(&[24 * GIB]);
    let qwen = granted(t.acquire(labelled("bm", "qwen", 16 * GIB, 0), 0));
    let e = t.take_events();
    let grant = event(&e, EventKind::Granted);
    let own = grant.cause.as_ref().expect("a grant names its request");
    assert_eq!((own.label.as_str(), own.trace_id.as_ref()), ("qwen", None));

    let pos =
        queued(t.acquire_traced(labelled("gw", "llama", 12 * GIB, 10), Some(TRACE.into()), 5));
    let e = t.take_events();
    let notice = event(&e, EventKind::EvictionNotice);
    assert_eq!(notice.lease.id, qwen.id);
    let cause = notice.cause.as_ref().expect("a notice names its cause");
    assert_eq!(
        cause,
        &Cause {
            ticket: pos.ticket.clone(),
            holder: "gw".into(),
            label: "llama".into(),
            bytes: 12 * GIB,
            priority: 10,
            gpu: None,
            trace_id: Some(TRACE.into()),
        }
    );
    assert_eq!(event(&e, EventKind::Queued).cause.as_ref(), Some(cause));

    // The holder honours the notice: its release names the same request; the grant too.
    t.release(&qwen.id, 9).unwrap();
    let e = t.take_events();
    let released = event(&e, EventKind::Released);
    assert_eq!(released.cause.as_ref(), Some(cause));
    assert_eq!(released.detail, "released under an eviction notice");
    let grant = event(&e, EventKind::Granted);
    assert_eq!(grant.lease.label, "llama");
    assert_eq!(grant.cause.as_ref(), Some(cause));

    // A release nobody asked for names no cause.
    let other = granted(t.acquire(req("x", GIB, 0), 10));
    t.take_events();
    t.release(&other.id, 11).unwrap();
    let e = t.take_events();
    assert_eq!(event(&e, EventKind::Released).cause, None);
}

#[test]
fn a_revocation_and_a_withdrawal_name_the_request_the_notice_was_for() {
    let grace = Limits::default().eviction_grace_ms;
    let mut t = table(&[24 * GIB]);
    let long = AcquireRequest {
        ttl_ms: 10 * grace,
        ..labelled("bm", "qwen", 16 * GIB, 0)
    };
    let qwen = granted(t.acquire(long, 0));
    let pos =
        queued(t.acquire_traced(labelled("gw", "llama", 12 * GIB, 10), Some(TRACE.into()), 0));
    t.take_events();
    // Not honoured in time: revoked, for that request.
    t.tick(grace + 1);
    let e = t.take_events();
    let revoked = event(&e, EventKind::Revoked);
    assert_eq!(revoked.lease.id, qwen.id);
    let cause = revoked
        .cause
        .as_ref()
        .expect("a revocation names its cause");
    assert_eq!(cause.ticket, pos.ticket);
    assert_eq!(cause.trace_id.as_deref(), Some(TRACE));

    // Withdrawn: the request went away before the holder released.
    let mut t = table(&[24 * GIB]);
    let qwen = granted(t.acquire(labelled("bm", "qwen", 16 * GIB, 0), 0));
    let pos = queued(t.acquire(labelled("gw", "llama", 12 * GIB, 10), 0));
    t.take_events();
    assert!(t.cancel_waiter(&pos.ticket, 1));
    let e = t.take_events();
    let withdrawn = event(&e, EventKind::EvictionWithdrawn);
    assert_eq!(withdrawn.lease.id, qwen.id);
    let cause = withdrawn
        .cause
        .as_ref()
        .expect("a withdrawal names its cause");
    assert_eq!(
        (cause.ticket.as_str(), cause.trace_id.as_ref()),
        (pos.ticket.as_str(), None)
    );
    // Withdrawn notices are forgotten: a later expiry names no cause.
    t.tick(20_000);
    let e = t.take_events();
    assert_eq!(event(&e, EventKind::Expired).cause, None);
}

#[test]
fn a_malformed_trace_id_is_ignored_not_recorded() {
    let mut t = table(&[24 * GIB]);
    for bad in ["XYZ", "4BF92F3577B34DA6A3CE929D0E0E4736", "4bf92f35", ""] {
        granted(t.acquire_traced(req("a", GIB, 0), Some(bad.into()), 0));
        let e = t.take_events();
        let c = event(&e, EventKind::Granted).cause.as_ref().unwrap();
        assert_eq!(c.trace_id, None, "{bad:?}");
    }
}
