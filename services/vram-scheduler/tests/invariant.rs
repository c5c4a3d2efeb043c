//! Property test of the scheduler's invariant over long random sequences of acquire / renew /
//! release / resize / cancel / time passing (expiry, revocation, wait time-outs) / foreign-usage
//! changes (simulated and NVML-observed).
//!
//! The property: `granted + foreign + reserve <= total` on every GPU after every step, except that
//! foreign use is observed, not decided — when it grows past what was free, the GPU may be
//! over-committed, and then the scheduler must not grant a single byte more on it until it fits
//! again. Without foreign-usage changes the invariant must hold strictly after every step.
//! Refused requests must leave the table unchanged.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use vram_scheduler::inventory::simulated;
use vram_scheduler::table::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

#[derive(Clone, Debug)]
enum Op {
    Acquire {
        holder: u8,
        bytes: u64,
        priority: i32,
        gpu: Option<u32>,
        ttl_ms: u64,
        wait_ms: u64,
    },
    Renew {
        pick: usize,
        ttl_ms: u64,
        idle: bool,
        pid: Option<u32>,
        priority: Option<i32>,
    },
    Release {
        pick: usize,
    },
    Resize {
        pick: usize,
        bytes: u64,
    },
    Cancel {
        pick: usize,
    },
    Advance {
        ms: u64,
    },
    SetForeign {
        gpu: u32,
        bytes: u64,
    },
    Observe {
        used: u64,
        procs: Vec<(u32, u64)>,
    },
}

impl Op {
    fn is_foreign(&self) -> bool {
        matches!(self, Op::SetForeign { .. } | Op::Observe { .. })
    }
}

fn op(with_foreign: bool) -> BoxedStrategy<Op> {
    let size = (0u64..40).prop_map(|n| n * 256 * MIB);
    let base = prop_oneof![
        4 => (0u8..4, size.clone(), 0i32..4, prop::option::of(0u32..4), 0u64..5_000, prop_oneof![Just(0u64), 1u64..3_000])
            .prop_map(|(holder, bytes, priority, gpu, ttl_ms, wait_ms)| Op::Acquire { holder, bytes, priority, gpu, ttl_ms, wait_ms }),
        3 => (any::<usize>(), 0u64..5_000, any::<bool>(), prop::option::of(1u32..6), prop::option::weighted(0.2, 0i32..4))
            .prop_map(|(pick, ttl_ms, idle, pid, priority)| Op::Renew { pick, ttl_ms, idle, pid, priority }),
        2 => any::<usize>().prop_map(|pick| Op::Release { pick }),
        1 => (any::<usize>(), size.clone()).prop_map(|(pick, bytes)| Op::Resize { pick, bytes }),
        1 => any::<usize>().prop_map(|pick| Op::Cancel { pick }),
        2 => (0u64..4_000).prop_map(|ms| Op::Advance { ms }),
    ];
    if !with_foreign {
        return base.boxed();
    }
    prop_oneof![
        10 => base,
        1 => (0u32..3, size.clone()).prop_map(|(gpu, bytes)| Op::SetForeign { gpu, bytes }),
        1 => (size.clone(), prop::collection::vec((1u32..6, size), 0..4))
            .prop_map(|(used, procs)| Op::Observe { used, procs }),
    ]
    .boxed()
}

/// Two simulated GPUs and one "NVML" GPU whose use is observed.
fn gpus() -> Vec<Gpu> {
    let mut g = simulated(&[8 * GIB, 4 * GIB], 512 * MIB);
    g.push(Gpu {
        index: 2,
        uuid: "GPU-nvml".into(),
        name: "Observed".into(),
        simulated: false,
        total: 6 * GIB,
        reserve: 256 * MIB,
        observed_used: 0,
        processes: Some(vec![]),
        simulated_foreign: 0,
    });
    g
}

fn pick<T: Clone>(items: &[T], n: usize) -> Option<T> {
    (!items.is_empty()).then(|| items[n % items.len()].clone())
}

/// Apply `ops` to a fresh table using `rule`; fail on the first step that breaks the property.
fn run(ops: &[Op], rule: FitRule, strict: bool) -> Result<(), TestCaseError> {
    run_with(ops, rule, may_evict, strict)
}

fn run_with(
    ops: &[Op],
    rule: FitRule,
    evict: EvictRule,
    strict: bool,
) -> Result<(), TestCaseError> {
    let limits = Limits {
        max_ttl_ms: 4_000,
        max_wait_ms: 2_500,
        eviction_grace_ms: 700,
        preempt_busy_after_ms: 1_500,
        busy_drain_ms: 900,
    };
    let mut t = LeaseTable::new(gpus(), limits, "p")
        .with_fit_rule(rule)
        .with_evict_rule(evict);
    let mut now = 0u64;
    for (step, op) in ops.iter().enumerate() {
        let before: Vec<GpuAccount> = (0..t.gpus().len()).map(|p| t.account(p)).collect();
        let snap = t.snapshot();
        let queue_len = t.queue().len();
        let ids: Vec<String> = t.leases().map(|l| l.id.clone()).collect();
        let tickets: Vec<String> = t.queue().iter().map(|w| w.ticket.clone()).collect();
        let refused = match op.clone() {
            Op::Acquire {
                holder,
                bytes,
                priority,
                gpu,
                ttl_ms,
                wait_ms,
            } => t
                .acquire(
                    AcquireRequest {
                        holder: format!("h{holder}"),
                        label: String::new(),
                        bytes,
                        priority,
                        gpu,
                        ttl_ms,
                        wait_ms,
                    },
                    now,
                )
                .is_err(),
            Op::Renew {
                pick: p,
                ttl_ms,
                idle,
                pid,
                priority,
            } => match pick(&ids, p) {
                Some(id) => t
                    .renew_as(&id, ttl_ms, pid.into_iter().collect(), idle, priority, now)
                    .is_err(),
                None => false,
            },
            Op::Release { pick: p } => match pick(&ids, p) {
                Some(id) => t.release(&id, now).is_err(),
                None => false,
            },
            Op::Resize { pick: p, bytes } => match pick(&ids, p) {
                Some(id) => t.resize(&id, bytes, now).is_err(),
                None => false,
            },
            Op::Cancel { pick: p } => {
                if let Some(tk) = pick(&tickets, p) {
                    t.cancel_waiter(&tk, now);
                }
                false
            }
            Op::Advance { ms } => {
                now += ms;
                t.tick(now);
                false
            }
            Op::SetForeign { gpu, bytes } => t.set_simulated_foreign(gpu, bytes, now).is_err(),
            Op::Observe { used, procs } => {
                t.observe(
                    &[GpuObservation {
                        index: 2,
                        total: 6 * GIB,
                        used,
                        processes: Some(procs),
                    }],
                    now,
                );
                false
            }
        };
        if refused {
            prop_assert_eq!(
                &t.snapshot(),
                &snap,
                "step {}: refused {:?} changed leases",
                step,
                op
            );
            prop_assert_eq!(
                t.queue().len(),
                queue_len,
                "step {}: refused {:?} changed the queue",
                step,
                op
            );
        }
        for (p, b) in before.iter().enumerate() {
            let a = t.account(p);
            if let Err(v) = check_invariant(&a) {
                prop_assert!(
                    !strict,
                    "step {}: {:?} broke the invariant on GPU {}: {}",
                    step,
                    op,
                    p,
                    v
                );
                prop_assert!(
                    a.granted <= b.granted,
                    "step {}: {:?} granted on over-committed GPU {}: {} (granted {} -> {})",
                    step,
                    op,
                    p,
                    v,
                    b.granted,
                    a.granted
                );
                prop_assert!(
                    op.is_foreign()
                        || check_invariant(b).is_err()
                        || a.foreign > b.foreign
                        || a.granted < b.granted,
                    "step {}: {:?} over-committed GPU {} without any foreign change: {}",
                    step,
                    op,
                    p,
                    v
                );
            }
        }
        // The queue stays ordered by priority, then arrival.
        let q = t.queue();
        for w in q.windows(2) {
            prop_assert!(
                (w[0].req.priority, std::cmp::Reverse(w[0].seq))
                    > (w[1].req.priority, std::cmp::Reverse(w[1].seq)),
                "step {}: queue out of order",
                step
            );
        }
        check_notices(&t, step, op)?;
        t.take_events();
        t.take_notices();
    }
    Ok(())
}

/// The eviction rules, after every step:
/// - every notice stands for a waiting request that may evict that lease ([`may_evict`]): never a
///   lease of higher priority, and a lease of *equal* priority only while it is idle or once the
///   request has waited `preempt_busy_after_ms` — so no lease with a request in flight is noticed
///   for an equal-priority request that has not waited that long;
/// - an idle lease never blocks a waiter that would fit after evicting it: a waiter that fits on no
///   eligible GPU, but would fit on one after evicting every lease it may evict there, has memory
///   on its way (grantable + noticed leases cover it on some eligible GPU).
fn check_notices(t: &LeaseTable, step: usize, op: &Op) -> Result<(), TestCaseError> {
    for l in t.leases().filter(|l| l.evict_by_ms.is_some()) {
        let justified = t
            .queue()
            .iter()
            .any(|w| w.claimed.contains(&l.id) && may_evict(l, w.req.priority, w.busy_ok));
        prop_assert!(
            justified,
            "step {}: {:?}: lease {} (priority {}, idle {}) is under notice for no waiter that may evict it: {:?}",
            step,
            op,
            l.id,
            l.priority,
            l.idle,
            t.queue()
                .iter()
                .map(|w| (w.req.priority, w.busy_ok, w.claimed.clone()))
                .collect::<Vec<_>>()
        );
    }
    for w in t.queue() {
        let eligible: Vec<usize> = (0..t.gpus().len())
            .filter(|&p| w.req.gpu.is_none_or(|g| t.gpus()[p].index == g))
            .collect();
        if eligible.iter().any(|&p| fits(&t.account(p), w.req.bytes)) {
            continue; // held back behind an earlier waiter, or granted at the next pass
        }
        // What `bytes` needs freed on GPU `p`: over an over-committed GPU's deficit too (evicting
        // there is a valid plan once it covers the deficit, and may be the cheapest one).
        let need = |p: usize| -> u128 {
            let a = t.account(p);
            let deficit = (u128::from(a.granted) + u128::from(a.foreign) + u128::from(a.reserve))
                .saturating_sub(u128::from(a.total));
            (u128::from(w.req.bytes) + deficit).saturating_sub(u128::from(a.grantable()))
        };
        let could = eligible.iter().any(|&p| {
            let g = &t.gpus()[p];
            let evictable: u128 = t
                .leases()
                .filter(|l| l.gpu == g.index && may_evict(l, w.req.priority, w.busy_ok))
                .map(|l| u128::from(l.bytes))
                .sum();
            g.total.saturating_sub(g.reserve) >= w.req.bytes && evictable >= need(p)
        });
        if !could {
            continue;
        }
        let on_its_way = eligible.iter().any(|&p| {
            let noticed: u128 = t
                .leases()
                .filter(|l| l.gpu == t.gpus()[p].index && l.evict_by_ms.is_some())
                .map(|l| u128::from(l.bytes))
                .sum();
            noticed >= need(p)
        });
        prop_assert!(
            on_its_way,
            "step {}: {:?}: waiter {} (priority {}, {} bytes) could fit by evicting leases it may evict, but no memory is on its way",
            step,
            op,
            w.ticket,
            w.req.priority,
            w.req.bytes
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(Config { cases: 256, ..Config::default() })]

    #[test]
    fn never_overcommits_without_foreign_changes(ops in prop::collection::vec(op(false), 1..300)) {
        run(&ops, fits, true)?;
    }

    #[test]
    fn never_grants_into_an_overcommitted_gpu(ops in prop::collection::vec(op(true), 1..300)) {
        run(&ops, fits, false)?;
    }
}

/// The property test must be able to fail: with a rule that ignores foreign use (or the reserve),
/// random sequences find a violation.
#[test]
fn the_property_catches_broken_fit_rules() {
    fn ignores_foreign(a: &GpuAccount, bytes: u64) -> bool {
        a.total.saturating_sub(a.reserve).saturating_sub(a.granted) >= bytes
    }
    fn ignores_reserve(a: &GpuAccount, bytes: u64) -> bool {
        a.total.saturating_sub(a.granted).saturating_sub(a.foreign) >= bytes
    }
    for (name, rule, strict) in [
        ("ignores foreign", ignores_foreign as FitRule, false),
        ("ignores reserve", ignores_reserve as FitRule, true),
    ] {
        let mut runner = TestRunner::new(Config {
            cases: 512,
            failure_persistence: None,
            ..Config::default()
        });
        let found = runner.run(&prop::collection::vec(op(!strict), 1..300), |ops| {
            run(&ops, rule, strict)
        });
        assert!(
            found.is_err(),
            "the property test did not catch a rule that {name}"
        );
    }
}

/// The notice checks must be able to fail: an eviction rule that ignores idleness (busy leases of
/// equal priority evicted at once) or priority (higher-priority idle leases evicted) is caught.
#[test]
fn the_property_catches_broken_eviction_rules() {
    fn ignores_idleness(l: &Lease, prio: i32, _busy_ok: bool) -> bool {
        l.priority <= prio
    }
    fn ignores_priority(l: &Lease, prio: i32, busy_ok: bool) -> bool {
        l.idle || l.priority < prio || busy_ok
    }
    // The rule before idle leases yielded: an idle model blocked a request of its own priority.
    fn strictly_lower_only(l: &Lease, prio: i32, _busy_ok: bool) -> bool {
        l.priority < prio
    }
    for (name, rule) in [
        ("ignores idleness", ignores_idleness as EvictRule),
        ("ignores priority", ignores_priority as EvictRule),
        (
            "never lets idle leases of equal priority yield",
            strictly_lower_only as EvictRule,
        ),
    ] {
        let mut runner = TestRunner::new(Config {
            cases: 512,
            failure_persistence: None,
            ..Config::default()
        });
        let found = runner
            .run(&prop::collection::vec(op(false), 1..300), |ops| {
                run_with(&ops, fits, rule, true)
            })
            .is_err();
        assert!(found, "a rule that {name} was not caught");
    }
}
