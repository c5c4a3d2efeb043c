//! The life cycle driven by hand, without processes or a runtime: each test is a sequence of
//! events and the actions they must (and must not) cause. At the end, random event sequences
//! against a model of the outside world (scheduler, child, tickets), with invariants checked after
//! every step, and proof that the check catches a broken step.

use std::collections::BTreeSet;

use super::*;

fn params() -> Params {
    Params {
        model: "tiny".into(),
        priority: 0,
        idle_ttl_ms: 10_000,
        lease_ttl_ms: 30_000,
        lease_wait_ms: 60_000,
        drain_timeout_ms: 5_000,
        stop_grace_ms: 1_000,
        backoff_ms: 1_000,
        max_backoff_ms: 8_000,
    }
}

fn lease(id: &str) -> LeaseInfo {
    LeaseInfo {
        id: id.into(),
        bytes: 100,
        gpu: 0,
    }
}

/// A machine and the time.
struct T {
    life: Lifecycle,
    now: u64,
}

impl T {
    fn new() -> Self {
        Self {
            life: Lifecycle::new(params()),
            now: 1_000,
        }
    }

    fn ev(&mut self, e: Event) -> Vec<Action> {
        let (life, actions) = step(self.life.clone(), e, self.now);
        self.life = life;
        actions
    }

    fn acquire(&mut self, waiter: u64) -> Vec<Action> {
        self.ev(Event::Acquire {
            waiter,
            deadline_ms: self.now + 60_000,
            priority: None,
        })
    }

    fn granted(&mut self, id: &str) -> Vec<Action> {
        let generation = self.life.generation;
        self.ev(Event::LeaseGranted {
            generation,
            lease: lease(id),
            estimated: 100,
        })
    }

    fn child_ready(&mut self, id: &str) -> Vec<Action> {
        let generation = self.life.generation;
        self.ev(Event::ChildReady {
            generation,
            lease_id: id.into(),
            lease_bytes: 80,
            measured: Some(80),
        })
    }

    /// Waiter 1 loads the instance under lease `l1`; it holds one ticket afterwards.
    fn ready(&mut self) {
        self.acquire(1);
        self.granted("l1");
        self.child_ready("l1");
        self.answer_renewals(None);
        assert_eq!(self.life.state, State::Ready);
        assert_eq!(self.life.in_flight, 1);
    }

    /// Answer the renewal in flight (if any).
    fn answer_renewals(&mut self, evict_by_ms: Option<u64>) -> Vec<Action> {
        if !self.life.renewing {
            return Vec::new();
        }
        let lease_id = self.life.lease.as_ref().map(|l| l.id.clone()).unwrap();
        let seq = self.life.renew_seq;
        self.ev(Event::Renewed {
            lease_id,
            seq,
            result: Renewal::Renewed { evict_by_ms },
        })
    }

    fn done(&mut self) -> Vec<Action> {
        let generation = self.life.generation;
        self.ev(Event::Done { generation })
    }
}

fn has(actions: &[Action], f: impl Fn(&Action) -> bool) -> bool {
    actions.iter().any(f)
}

fn stops(actions: &[Action]) -> Vec<(bool, Option<String>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Stop { kill, release, .. } => Some((*kill, release.clone())),
            _ => None,
        })
        .collect()
}

fn grants(actions: &[Action]) -> Vec<(u64, u64)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Grant {
                waiter,
                load_wait_ms,
                ..
            } => Some((*waiter, *load_wait_ms)),
            _ => None,
        })
        .collect()
}

fn state_changes(actions: &[Action]) -> Vec<pb::InstanceState> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Publish {
                kind: pb::InstanceEventKind::StateChanged,
                state,
                ..
            } => Some(*state),
            _ => None,
        })
        .collect()
}

#[test]
fn a_request_leases_starts_and_every_waiter_gets_a_ticket_from_one_load() {
    let mut t = T::new();
    let a = t.acquire(1);
    assert_eq!(t.life.state, State::Leasing);
    assert!(has(&a, |a| matches!(
        a,
        Action::AcquireLease {
            generation: 1,
            priority: 0,
            deadline_ms: 61_000
        }
    )));
    assert_eq!(state_changes(&a), [pb::InstanceState::Leasing]);
    // A second request waits for the same load (single flight) and raises nothing yet.
    let a = t.ev(Event::Acquire {
        waiter: 2,
        deadline_ms: 30_000,
        priority: Some(5),
    });
    assert!(a.is_empty(), "{a:?}");
    assert_eq!(t.life.waiters.len(), 2);
    // Queued: waiting requests hear where they stand.
    let q = pb::QueuePosition {
        position: 1,
        queue_length: 2,
        ..Default::default()
    };
    let a = t.ev(Event::LeaseQueued {
        generation: 1,
        position: q,
    });
    assert!(has(&a, |a| matches!(
        a,
        Action::Progress {
            phase: pb::load_progress::Phase::Queued,
            queue: Some(p)
        } if p.position == 1
    )));
    // Granted: start the child under that lease; the lease is renewed (busy: requests wait).
    let a = t.granted("l1");
    assert_eq!(t.life.state, State::Starting);
    assert!(has(&a, |a| matches!(
        a,
        Action::StartChild { generation: 1, lease, deadline_ms: 61_000 } if lease.id == "l1"
    )));
    assert!(has(&a, |a| matches!(
        a,
        Action::Renew { lease_id, idle: false, .. } if lease_id == "l1"
    )));
    // Ready: both waiters get tickets, with the time they waited; the lease is settled and
    // raised to the priority of its highest caller.
    t.now += 500;
    let a = t.child_ready("l1");
    assert_eq!(t.life.state, State::Ready);
    assert_eq!(a.first(), Some(&Action::ChildUp { generation: 1 }));
    assert_eq!(grants(&a), [(1, 500), (2, 500)]);
    assert!(has(&a, |a| matches!(
        a,
        Action::Publish {
            kind: pb::InstanceEventKind::LeaseSettled,
            ..
        }
    )));
    assert_eq!(t.life.in_flight, 2);
    assert_eq!(t.life.lease.as_ref().unwrap().bytes, 80);
    assert_eq!(t.life.lease_priority, 5);
    assert_eq!(t.life.state_pb(), pb::InstanceState::Busy);
    // A request to a ready instance gets its ticket at once.
    let a = t.acquire(3);
    assert_eq!(grants(&a), [(3, 0)]);
    assert_eq!(t.life.requests_total, 3);
}

#[test]
fn idle_after_the_ttl_unloads_kills_the_child_and_releases_the_lease() {
    let mut t = T::new();
    t.ready();
    t.now += 1_000;
    t.done();
    assert_eq!(t.life.in_flight, 0);
    assert_eq!(t.life.unload_at_ms(), Some(t.now + 10_000));
    t.answer_renewals(None);
    let idle_since = t.now;
    t.now = idle_since + 9_999;
    let a = t.ev(Event::Tick);
    assert!(stops(&a).is_empty());
    t.now = idle_since + 10_000;
    let a = t.ev(Event::Tick);
    assert_eq!(t.life.state, State::Draining);
    assert_eq!(stops(&a), [(true, Some("l1".into()))]);
    assert!(t.life.lease.is_none() && t.life.child.is_none() && t.life.stopping);
    let a = t.ev(Event::StopDone);
    assert_eq!(t.life.state, State::Stopped);
    assert_eq!(state_changes(&a), [pb::InstanceState::Stopped]);
    // A late ticket of the old child changes nothing.
    t.ev(Event::Done { generation: 1 });
    assert_eq!(t.life.in_flight, 0);
    // The next request loads again.
    let a = t.acquire(2);
    assert!(has(&a, |a| matches!(a, Action::AcquireLease { .. })));
}

#[test]
fn a_request_during_an_unload_waits_and_loads_again_once_stopped() {
    let mut t = T::new();
    t.ready();
    let a = t.ev(Event::Unload {
        reply: Some(9),
        drain_timeout_ms: 0,
        force: true,
        reason: "unload requested".into(),
    });
    assert!(has(&a, |a| matches!(a, Action::Abort(_))));
    assert_eq!(stops(&a), [(true, Some("l1".into()))]);
    let a = t.acquire(2);
    assert!(a.is_empty(), "waits for the stop: {a:?}");
    let a = t.ev(Event::StopDone);
    assert!(has(&a, |a| *a
        == Action::UnloadAnswered {
            reply: 9,
            was_loaded: true
        }));
    assert_eq!(t.life.state, State::Leasing);
    assert!(has(&a, |a| matches!(a, Action::AcquireLease { .. })));
    // The exit of the child that was stopped is not a crash.
    let a = t.ev(Event::ChildExited {
        generation: 1,
        exit: "signal 15".into(),
        tail: String::new(),
    });
    assert!(a.is_empty() && t.life.crash_count == 0, "{a:?}");
}

#[test]
fn an_unload_of_an_unloaded_instance_answers_false_at_once() {
    let mut t = T::new();
    let a = t.ev(Event::Unload {
        reply: Some(4),
        drain_timeout_ms: 0,
        force: false,
        reason: "unload requested".into(),
    });
    assert_eq!(
        a,
        [Action::UnloadAnswered {
            reply: 4,
            was_loaded: false
        }]
    );
}

#[test]
fn an_eviction_notice_on_an_idle_instance_stops_it_at_once() {
    let mut t = T::new();
    t.ready();
    t.done();
    t.answer_renewals(None);
    let deadline = t.now + 10_000;
    let a = t.ev(Event::EvictionNotice {
        lease_id: "l1".into(),
        deadline_ms: deadline,
    });
    assert!(has(&a, |a| matches!(
        a,
        Action::Publish {
            kind: pb::InstanceEventKind::EvictionNotice,
            ..
        }
    )));
    assert_eq!(t.life.state, State::Draining);
    assert_eq!(stops(&a), [(true, Some("l1".into()))]);
    assert_eq!(t.life.evict_by_ms, Some(deadline));
    // A notice for some other lease is not ours.
    let mut u = T::new();
    u.ready();
    let a = u.ev(Event::EvictionNotice {
        lease_id: "other".into(),
        deadline_ms: deadline,
    });
    assert!(a.is_empty() && u.life.state == State::Ready);
}

#[test]
fn a_notice_on_a_busy_instance_is_checked_then_waits_for_in_flight_requests() {
    let mut t = T::new();
    t.ready();
    let deadline = t.now + 30_000;
    let a = t.ev(Event::EvictionNotice {
        lease_id: "l1".into(),
        deadline_ms: deadline,
    });
    // Busy: ask the scheduler (a renewal saying busy) before draining.
    assert_eq!(t.life.state, State::Ready);
    assert!(has(&a, |a| matches!(a, Action::Renew { idle: false, .. })));
    assert!(stops(&a).is_empty());
    // It stands: drain, but the request in flight finishes first.
    let a = t.answer_renewals(Some(deadline));
    assert_eq!(t.life.state, State::Draining);
    assert!(stops(&a).is_empty());
    assert!(!has(&a, |a| matches!(a, Action::Abort(_))));
    assert_eq!(t.life.drain_deadline_ms, Some(deadline - 2_000));
    // A request that arrives while draining waits.
    assert!(t.acquire(2).is_empty());
    // The request ends: stop and release.
    let a = t.done();
    assert_eq!(stops(&a), [(true, Some("l1".into()))]);
}

#[test]
fn a_busy_drain_stops_at_its_deadline_and_aborts_what_still_runs() {
    let mut t = T::new();
    t.ready();
    let deadline = t.now + 30_000;
    t.ev(Event::EvictionNotice {
        lease_id: "l1".into(),
        deadline_ms: deadline,
    });
    t.answer_renewals(Some(deadline));
    assert_eq!(t.life.state, State::Draining);
    t.now = deadline - 2_000;
    let a = t.ev(Event::Tick);
    assert!(has(
        &a,
        |a| matches!(a, Action::Abort(m) if m.contains("was unloaded"))
    ));
    assert_eq!(stops(&a), [(true, Some("l1".into()))]);
    assert_eq!(t.life.in_flight, 0);
}

#[test]
fn a_notice_the_busy_check_finds_withdrawn_changes_nothing() {
    let mut t = T::new();
    t.ready();
    t.ev(Event::EvictionNotice {
        lease_id: "l1".into(),
        deadline_ms: t.now + 30_000,
    });
    let a = t.answer_renewals(None);
    assert!(a.is_empty(), "{a:?}");
    assert_eq!(t.life.state, State::Ready);
    assert_eq!(t.life.evict_by_ms, None);
}

#[test]
fn a_withdrawn_notice_calls_the_drain_off_and_serves_who_waited() {
    let mut t = T::new();
    t.ready();
    let deadline = t.now + 30_000;
    t.ev(Event::EvictionNotice {
        lease_id: "l1".into(),
        deadline_ms: deadline,
    });
    t.answer_renewals(Some(deadline));
    assert_eq!(t.life.state, State::Draining);
    t.acquire(2);
    let a = t.ev(Event::EvictionWithdrawn {
        lease_id: "l1".into(),
    });
    assert_eq!(t.life.state, State::Ready);
    assert_eq!(grants(&a), [(2, 0)]);
    assert!(stops(&a).is_empty());
    assert_eq!(t.life.in_flight, 2);
    assert_eq!(t.life.evict_by_ms, None);
    assert_eq!(t.life.drain_deadline_ms, None);
    // The drain's deadline no longer applies.
    t.now = deadline;
    assert!(stops(&t.ev(Event::Tick)).is_empty());
}

#[test]
fn a_withdrawn_notice_does_not_call_off_an_unload_someone_asked_for() {
    let mut t = T::new();
    t.ready();
    t.ev(Event::EvictionNotice {
        lease_id: "l1".into(),
        deadline_ms: t.now + 30_000,
    });
    t.answer_renewals(Some(t.now + 30_000));
    t.ev(Event::Unload {
        reply: Some(5),
        drain_timeout_ms: 0,
        force: false,
        reason: "unload requested".into(),
    });
    t.ev(Event::EvictionWithdrawn {
        lease_id: "l1".into(),
    });
    assert_eq!(t.life.state, State::Draining);
}

#[test]
fn a_crash_aborts_releases_backs_off_and_the_next_request_after_the_backoff_reloads() {
    let mut t = T::new();
    t.ready();
    t.now = 100_000;
    let a = t.ev(Event::ChildExited {
        generation: 1,
        exit: "signal 9".into(),
        tail: "last words".into(),
    });
    assert!(has(
        &a,
        |a| matches!(a, Action::Abort(m) if m.contains("crashed (signal 9)"))
    ));
    assert!(has(&a, |a| matches!(
        a,
        Action::Publish {
            kind: pb::InstanceEventKind::Crashed,
            state: pb::InstanceState::Busy,
            ..
        }
    )));
    assert_eq!(stops(&a), [(false, Some("l1".into()))]);
    assert_eq!(
        t.life.state,
        State::Failed {
            restart_after_ms: 101_000
        }
    );
    assert_eq!(t.life.crash_count, 1);
    assert!(t.life.last_error.contains("last words"));
    assert_eq!(t.life.in_flight, 0);
    // The aborted request's ticket changes nothing.
    t.ev(Event::Done { generation: 1 });
    assert_eq!(t.life.in_flight, 0);
    let a = t.ev(Event::StopDone);
    assert!(matches!(t.life.state, State::Failed { .. }));
    assert!(!has(&a, |a| matches!(a, Action::AcquireLease { .. })));
    // Within the backoff a request waits.
    t.now = 100_500;
    let a = t.acquire(2);
    assert!(!has(&a, |a| matches!(a, Action::AcquireLease { .. })));
    assert!(!has(&t.ev(Event::Tick), |a| matches!(
        a,
        Action::AcquireLease { .. }
    )));
    // After it, the tick loads again (one load).
    t.now = 101_000;
    let a = t.ev(Event::Tick);
    assert!(has(&a, |a| matches!(a, Action::AcquireLease { .. })));
    assert_eq!(t.life.state, State::Leasing);
    assert_eq!(t.life.restart_after_ms(), None);
    // A second crash soon after doubles the backoff.
    t.granted("l2");
    t.child_ready("l2");
    t.now = 102_000;
    let generation = t.life.generation;
    t.ev(Event::ChildExited {
        generation,
        exit: "signal 9".into(),
        tail: String::new(),
    });
    assert_eq!(t.life.restart_after_ms(), Some(104_000));
    // A request after the backoff reloads at once.
    t.ev(Event::StopDone);
    t.now = 104_000;
    let a = t.acquire(3);
    assert!(has(&a, |a| matches!(a, Action::AcquireLease { .. })));
}

#[test]
fn a_failed_start_forgets_the_lease_and_answers_the_waiters() {
    let mut t = T::new();
    t.acquire(1);
    t.acquire(2);
    t.granted("l1");
    let generation = t.life.generation;
    let error = InstanceError::Unavailable("could not start".into());
    let a = t.ev(Event::StartFailed {
        generation,
        error: error.clone(),
    });
    // (the start gave the lease back before it reported)
    assert!(!has(&a, |a| matches!(a, Action::ReleaseLease { .. })));
    let refused: Vec<u64> = a
        .iter()
        .filter_map(|a| match a {
            Action::Refuse { waiter, .. } => Some(*waiter),
            _ => None,
        })
        .collect();
    assert_eq!(refused, [1, 2]);
    assert!(matches!(t.life.state, State::Failed { .. }));
    assert!(t.life.lease.is_none() && !t.life.stopping);
}

#[test]
fn a_refused_lease_fails_the_load_and_the_unload_that_waited_for_it() {
    let mut t = T::new();
    t.acquire(1);
    t.ev(Event::Unload {
        reply: Some(8),
        drain_timeout_ms: 0,
        force: false,
        reason: "unload requested".into(),
    });
    let a = t.ev(Event::LeaseRefused {
        generation: 1,
        error: InstanceError::ResourceExhausted("no memory".into()),
    });
    assert!(has(&a, |a| matches!(
        a,
        Action::Refuse {
            waiter: 1,
            error: InstanceError::ResourceExhausted(_)
        }
    )));
    assert!(has(&a, |a| *a
        == Action::UnloadAnswered {
            reply: 8,
            was_loaded: false
        }));
    assert!(stops(&a).is_empty());
}

#[test]
fn an_unload_during_leasing_waits_for_the_load_then_drains_the_waiters_requests() {
    let mut t = T::new();
    t.acquire(1);
    let a = t.ev(Event::Unload {
        reply: Some(7),
        drain_timeout_ms: 0,
        force: false,
        reason: "unload requested".into(),
    });
    assert!(stops(&a).is_empty());
    assert_eq!(t.life.state, State::Leasing);
    t.granted("l1");
    let a = t.child_ready("l1");
    // The waiter is answered, then the drain begins (its request finishes first).
    assert_eq!(grants(&a), [(1, 0)]);
    assert_eq!(t.life.state, State::Draining);
    assert!(stops(&a).is_empty());
    let a = t.done();
    assert_eq!(stops(&a), [(true, Some("l1".into()))]);
    let a = t.ev(Event::StopDone);
    assert!(has(&a, |a| *a
        == Action::UnloadAnswered {
            reply: 7,
            was_loaded: true
        }));
    assert_eq!(t.life.state, State::Stopped);
}

#[test]
fn a_forced_unload_during_starting_kills_the_child_as_soon_as_it_is_up() {
    let mut t = T::new();
    t.acquire(1);
    t.granted("l1");
    t.ev(Event::Unload {
        reply: Some(7),
        drain_timeout_ms: 0,
        force: true,
        reason: "unload requested".into(),
    });
    assert_eq!(t.life.state, State::Starting);
    let a = t.child_ready("l1");
    assert_eq!(grants(&a), [(1, 0)]);
    assert!(has(&a, |a| matches!(a, Action::Abort(_))));
    assert_eq!(stops(&a), [(true, Some("l1".into()))]);
    let a = t.ev(Event::StopDone);
    assert!(has(&a, |a| matches!(
        a,
        Action::UnloadAnswered {
            reply: 7,
            was_loaded: true
        }
    )));
}

#[test]
fn a_lease_lost_during_the_start_stops_the_child_with_nothing_to_release() {
    let mut t = T::new();
    t.acquire(1);
    t.granted("l1");
    t.ev(Event::LeaseLost {
        lease_id: "l1".into(),
        reason: "revoked".into(),
    });
    assert!(t.life.lease.is_none());
    let a = t.child_ready("l1");
    assert_eq!(stops(&a), [(true, None)]);
}

#[test]
fn a_renewal_the_scheduler_never_heard_of_reattaches_and_a_lease_nobody_holds_is_released() {
    let mut t = T::new();
    t.ready();
    // Idle: reported at once with a renewal.
    let a = t.done();
    assert!(
        has(&a, |a| matches!(a, Action::Renew { idle: true, .. })),
        "{a:?}"
    );
    let a = t.ev(Event::Renewed {
        lease_id: "l1".into(),
        seq: t.life.renew_seq,
        result: Renewal::Unknown,
    });
    assert!(has(
        &a,
        |a| matches!(a, Action::Reattach { lease, .. } if lease.id == "l1")
    ));
    let a = t.ev(Event::Reattached {
        lease_id: "l1".into(),
    });
    assert!(a.is_empty());
    let a = t.ev(Event::Reattached {
        lease_id: "l0".into(),
    });
    assert_eq!(
        a,
        [Action::ReleaseLease {
            lease_id: "l0".into()
        }]
    );
}

#[test]
fn a_renewal_that_finds_the_lease_ended_stops_the_instance() {
    let mut t = T::new();
    t.ready();
    t.done();
    let a = t.ev(Event::Renewed {
        lease_id: "l1".into(),
        seq: t.life.renew_seq,
        result: Renewal::Ended,
    });
    assert_eq!(stops(&a), [(true, None)]);
}

#[test]
fn only_an_idle_unloaded_instance_retires_and_a_retired_one_refuses_requests() {
    let mut t = T::new();
    t.ready();
    assert_eq!(t.ev(Event::Retire), [Action::Retired(false)]);
    t.done();
    t.ev(Event::Unload {
        reply: None,
        drain_timeout_ms: 0,
        force: false,
        reason: "unload requested".into(),
    });
    // Still stopping.
    assert_eq!(t.ev(Event::Retire), [Action::Retired(false)]);
    t.ev(Event::StopDone);
    assert_eq!(t.ev(Event::Retire), [Action::Retired(true)]);
    let a = t.acquire(2);
    assert!(matches!(
        a.as_slice(),
        [Action::Refuse {
            waiter: 2,
            error: InstanceError::Unavailable(m)
        }] if m.contains("replaced")
    ));
}

#[test]
fn a_waiter_that_gave_up_is_not_served() {
    let mut t = T::new();
    t.acquire(1);
    t.acquire(2);
    t.ev(Event::WaitersGone(vec![1]));
    t.granted("l1");
    let a = t.child_ready("l1");
    assert_eq!(grants(&a), [(2, 0)]);
}

// ---- random event sequences against a model of the world ----------------------------------

type Stepper = fn(&mut Lifecycle, Event, u64) -> Vec<Action>;

fn real_step(l: &mut Lifecycle, e: Event, now: u64) -> Vec<Action> {
    let (next, a) = step(l.clone(), e, now);
    *l = next;
    a
}

/// Broken on purpose: after a crash the lease is not released.
fn forgets_the_lease_after_a_crash(l: &mut Lifecycle, e: Event, now: u64) -> Vec<Action> {
    let mut a = real_step(l, e, now);
    for x in &mut a {
        if let Action::Stop {
            kill: false,
            release,
            ..
        } = x
        {
            *release = None;
        }
    }
    a
}

/// Broken on purpose: a drain requested during a load is forgotten.
fn forgets_an_unload_during_the_load(l: &mut Lifecycle, e: Event, now: u64) -> Vec<Action> {
    if matches!(e, Event::ChildReady { .. }) {
        l.drain_deadline_ms = None;
    }
    real_step(l, e, now)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The outside world as the actor would see it.
struct World {
    stepper: Stepper,
    life: Lifecycle,
    now: u64,
    next_id: u64,
    /// A lease asked for (generation).
    leasing: Option<u64>,
    /// A child starting (generation, lease).
    starting: Option<(u64, String)>,
    /// A stop under way (kill?, lease to release).
    stop: Option<(bool, Option<String>)>,
    renewals: Vec<(String, u64)>,
    reattaches: Vec<String>,
    /// Leases the scheduler counts as this instance's.
    held: BTreeSet<String>,
    /// The generation whose child runs.
    running: Option<u64>,
    /// Live tickets (their generations).
    tickets: Vec<u64>,
    waiters: BTreeSet<u64>,
    gone: BTreeSet<u64>,
    unloads: BTreeSet<u64>,
    log: Vec<String>,
    /// What the walk went through (so the test can tell it covered the life cycle).
    seen: BTreeSet<String>,
}

impl World {
    fn new(stepper: Stepper) -> Self {
        Self {
            stepper,
            life: Lifecycle::new(params()),
            now: 1_000,
            next_id: 1,
            leasing: None,
            starting: None,
            stop: None,
            renewals: Vec::new(),
            reattaches: Vec::new(),
            held: BTreeSet::new(),
            running: None,
            tickets: Vec::new(),
            waiters: BTreeSet::new(),
            gone: BTreeSet::new(),
            unloads: BTreeSet::new(),
            log: Vec::new(),
            seen: BTreeSet::new(),
        }
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn fail(&self, why: String) -> String {
        let tail: Vec<&String> = self.log.iter().rev().take(12).collect();
        format!(
            "{why}\nstate: {:?}\nlast events (newest first): {tail:#?}",
            self.life.state
        )
    }

    fn send(&mut self, e: Event) -> Result<(), String> {
        self.log.push(format!("t={} {e:?}", self.now));
        let actions = (self.stepper)(&mut self.life, e, self.now);
        for a in actions {
            self.perform(a)?;
        }
        self.check()
    }

    fn perform(&mut self, a: Action) -> Result<(), String> {
        match &a {
            Action::Publish { kind, state, .. } => {
                self.seen.insert(format!("{kind:?} {state:?}"));
            }
            Action::Stop { kill, release, .. } => {
                self.seen
                    .insert(format!("stop kill={kill} release={}", release.is_some()));
            }
            _ => {}
        }
        match a {
            Action::AcquireLease { generation, .. } => {
                if self.leasing.is_some() || self.starting.is_some() {
                    return Err(self.fail("a second load while one is under way".into()));
                }
                self.leasing = Some(generation);
            }
            Action::StartChild {
                generation, lease, ..
            } => {
                if !self.held.contains(&lease.id) {
                    return Err(self.fail(format!("a child started without lease {}", lease.id)));
                }
                self.starting = Some((generation, lease.id));
            }
            Action::ChildUp { generation } => {
                if self.running.is_some() {
                    return Err(self.fail("two children at once".into()));
                }
                self.running = Some(generation);
            }
            Action::DiscardChild { .. } => {}
            Action::Renew { lease_id, seq, .. } => {
                if !self.held.contains(&lease_id) {
                    return Err(self.fail(format!("renewing {lease_id}, which is not held")));
                }
                self.renewals.push((lease_id, seq));
            }
            Action::Reattach { lease, .. } => self.reattaches.push(lease.id),
            Action::ReleaseLease { lease_id } => {
                self.held.remove(&lease_id);
            }
            Action::Stop { kill, release, .. } => {
                if self.stop.is_some() {
                    return Err(self.fail("two stops at once".into()));
                }
                self.stop = Some((kill, release));
            }
            Action::Abort(_) => {}
            Action::Grant {
                waiter, generation, ..
            } => {
                if !self.waiters.remove(&waiter) {
                    return Err(
                        self.fail(format!("waiter {waiter} answered twice or after it left"))
                    );
                }
                self.tickets.push(generation);
            }
            Action::Refuse { waiter, .. } => {
                if !self.waiters.remove(&waiter) {
                    return Err(
                        self.fail(format!("waiter {waiter} answered twice or after it left"))
                    );
                }
            }
            Action::UnloadAnswered { reply, .. } => {
                if !self.unloads.remove(&reply) {
                    return Err(self.fail(format!("unload {reply} answered twice")));
                }
            }
            Action::Retired(_) | Action::Progress { .. } | Action::Publish { .. } => {}
            Action::Warn(_) => {}
        }
        Ok(())
    }

    fn quiescent(&self) -> bool {
        matches!(
            self.life.state,
            State::Unloaded | State::Stopped | State::Failed { .. }
        ) && self.stop.is_none()
            && self.leasing.is_none()
            && self.starting.is_none()
    }

    fn check(&self) -> Result<(), String> {
        let l = &self.life;
        if let Some(lease) = &l.lease
            && !self.held.contains(&lease.id)
        {
            return Err(self.fail(format!(
                "the machine uses lease {}, which it lost",
                lease.id
            )));
        }
        if self.running.is_some() && l.lease.is_none() && self.stop.is_none() {
            return Err(self.fail("a child runs without a lease and no stop is under way".into()));
        }
        if l.stopping != self.stop.is_some() {
            return Err(self.fail("`stopping` does not match the stop under way".into()));
        }
        let live = self.tickets.iter().filter(|g| **g == l.generation).count();
        if l.in_flight as usize != live {
            return Err(self.fail(format!(
                "in_flight {} but {live} live tickets of this generation",
                l.in_flight
            )));
        }
        if l.waiters.iter().any(|w| !self.waiters.contains(&w.id)) {
            return Err(self.fail("the machine keeps a waiter that left or was answered".into()));
        }
        if !l.unloads.is_empty() && l.state == State::Ready {
            return Err(self.fail("serving while an unload waits".into()));
        }
        if self.quiescent() && (!self.held.is_empty() || self.running.is_some()) {
            return Err(self.fail(format!(
                "unloaded but still holding {:?} (child running: {:?})",
                self.held, self.running
            )));
        }
        Ok(())
    }

    /// One random event the world could send now.
    fn random_event(&mut self, rng: &mut Rng) -> Result<(), String> {
        let lease_id = self.life.lease.as_ref().map(|l| l.id.clone());
        match rng.below(15) {
            0 | 1 => {
                let waiter = self.id();
                self.waiters.insert(waiter);
                let priority = (rng.below(3) == 0).then(|| rng.below(10) as i32);
                let deadline_ms = self.now + rng.below(60_000);
                self.send(Event::Acquire {
                    waiter,
                    deadline_ms,
                    priority,
                })
            }
            2 => {
                let Some(&w) = self.waiters.iter().next() else {
                    return Ok(());
                };
                self.waiters.remove(&w);
                self.gone.insert(w);
                self.send(Event::WaitersGone(vec![w]))
            }
            3 => {
                if self.tickets.is_empty() {
                    return Ok(());
                }
                let i = rng.below(self.tickets.len() as u64) as usize;
                let generation = self.tickets.swap_remove(i);
                self.send(Event::Done { generation })
            }
            4 => {
                let Some(generation) = self.leasing else {
                    return Ok(());
                };
                match rng.below(5) {
                    0 => {
                        self.leasing = None;
                        self.send(Event::LeaseRefused {
                            generation,
                            error: InstanceError::ResourceExhausted("no memory".into()),
                        })
                    }
                    1 => self.send(Event::LeaseQueued {
                        generation,
                        position: pb::QueuePosition::default(),
                    }),
                    _ => {
                        self.leasing = None;
                        let id = format!("l{}", self.id());
                        self.held.insert(id.clone());
                        self.send(Event::LeaseGranted {
                            generation,
                            lease: lease(&id),
                            estimated: 100,
                        })
                    }
                }
            }
            5 => {
                let Some((generation, lease_id)) = self.starting.take() else {
                    return Ok(());
                };
                if rng.below(4) == 0 {
                    // The start gives its lease back before it reports.
                    self.held.remove(&lease_id);
                    self.send(Event::StartFailed {
                        generation,
                        error: InstanceError::Unavailable("start failed".into()),
                    })
                } else {
                    self.send(Event::ChildReady {
                        generation,
                        lease_id,
                        lease_bytes: 80,
                        measured: Some(80),
                    })
                }
            }
            6 => {
                // The child dies (crash).
                let Some(generation) = self.running.take() else {
                    return Ok(());
                };
                self.send(Event::ChildExited {
                    generation,
                    exit: "signal 9".into(),
                    tail: String::new(),
                })
            }
            7 => self.finish_stop(),
            8 => {
                let reply = (rng.below(2) == 0).then(|| self.id());
                if let Some(r) = reply {
                    self.unloads.insert(r);
                }
                self.send(Event::Unload {
                    reply,
                    drain_timeout_ms: rng.below(3) * 2_000,
                    force: rng.below(3) == 0,
                    reason: "unload requested".into(),
                })
            }
            9 => {
                let lease_id = lease_id.unwrap_or_else(|| "l-stale".into());
                let deadline_ms = self.now + rng.below(20_000);
                self.send(Event::EvictionNotice {
                    lease_id,
                    deadline_ms,
                })
            }
            10 => {
                let lease_id = lease_id.unwrap_or_else(|| "l-stale".into());
                self.send(Event::EvictionWithdrawn { lease_id })
            }
            11 => {
                let Some(lease_id) = lease_id else {
                    return Ok(());
                };
                self.held.remove(&lease_id);
                self.send(Event::LeaseLost {
                    lease_id,
                    reason: "revoked".into(),
                })
            }
            12 => {
                if self.renewals.is_empty() {
                    return Ok(());
                }
                let (lease_id, seq) = self.renewals.remove(0);
                let result = if !self.held.contains(&lease_id) {
                    Renewal::Ended
                } else {
                    match rng.below(6) {
                        0 => Renewal::Unknown,
                        1 => Renewal::Failed("unavailable".into()),
                        2 => Renewal::Renewed {
                            evict_by_ms: Some(self.now + rng.below(20_000)),
                        },
                        _ => Renewal::Renewed { evict_by_ms: None },
                    }
                };
                self.send(Event::Renewed {
                    lease_id,
                    seq,
                    result,
                })
            }
            13 => {
                if self.reattaches.is_empty() {
                    return Ok(());
                }
                // Restored under its id (even one the instance let go meanwhile).
                let lease_id = self.reattaches.remove(0);
                self.held.insert(lease_id.clone());
                self.send(Event::Reattached { lease_id })
            }
            _ => {
                if rng.below(10) == 0 {
                    self.send(Event::Retire)?;
                }
                self.now += rng.below(4_000);
                self.send(Event::Tick)
            }
        }
    }

    fn finish_stop(&mut self) -> Result<(), String> {
        let Some((kill, _)) = self.stop else {
            return Ok(());
        };
        if kill && let Some(generation) = self.running.take() {
            // The child we stopped exits (before the stop reports back): not a crash.
            self.send(Event::ChildExited {
                generation,
                exit: "signal 15".into(),
                tail: String::new(),
            })?;
        }
        if let Some((_, Some(r))) = self.stop.take() {
            self.held.remove(&r);
        }
        self.send(Event::StopDone)
    }

    /// Let everything finish, end every request, unload: nothing may be left held or running,
    /// and every request and unload must have had its answer.
    fn wind_down(&mut self) -> Result<(), String> {
        for _ in 0..200 {
            while let Some((lease_id, seq)) = self.renewals.pop() {
                let result = if self.held.contains(&lease_id) {
                    Renewal::Renewed { evict_by_ms: None }
                } else {
                    Renewal::Ended
                };
                self.send(Event::Renewed {
                    lease_id,
                    seq,
                    result,
                })?;
            }
            self.reattaches.clear();
            if let Some(generation) = self.leasing.take() {
                let id = format!("l{}", self.id());
                self.held.insert(id.clone());
                self.send(Event::LeaseGranted {
                    generation,
                    lease: lease(&id),
                    estimated: 100,
                })?;
            } else if let Some((generation, lease_id)) = self.starting.take() {
                self.send(Event::ChildReady {
                    generation,
                    lease_id,
                    lease_bytes: 80,
                    measured: None,
                })?;
            } else if self.stop.is_some() {
                self.finish_stop()?;
            } else if let Some(generation) = self.tickets.pop() {
                self.send(Event::Done { generation })?;
            } else if !self.quiescent() {
                self.send(Event::Unload {
                    reply: None,
                    drain_timeout_ms: 0,
                    force: false,
                    reason: "wind down".into(),
                })?;
                self.now += 1_000;
                self.send(Event::Tick)?;
            } else if !self.life.waiters.is_empty() {
                self.now += 10_000;
                self.send(Event::Tick)?;
            } else {
                break;
            }
        }
        if !self.quiescent() {
            return Err(self.fail("did not come to rest".into()));
        }
        if !self.waiters.is_empty() || !self.unloads.is_empty() {
            return Err(self.fail(format!(
                "unanswered: waiters {:?}, unloads {:?}",
                self.waiters, self.unloads
            )));
        }
        self.check()
    }
}

fn walk(seed: u64, steps: usize, stepper: Stepper) -> Result<BTreeSet<String>, String> {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut w = World::new(stepper);
    for _ in 0..steps {
        w.random_event(&mut rng)
            .map_err(|e| format!("seed {seed}: {e}"))?;
    }
    w.wind_down().map_err(|e| format!("seed {seed}: {e}"))?;
    Ok(w.seen)
}

#[test]
fn random_event_sequences_keep_the_invariants() {
    let mut seen = BTreeSet::new();
    for seed in 0..2_000 {
        match walk(seed, 300, real_step) {
            Ok(s) => seen.extend(s),
            Err(e) => panic!("{e}"),
        }
    }
    // The walks went everywhere that matters.
    for want in [
        "StateChanged Busy",
        "StateChanged Ready",
        "StateChanged Draining",
        "StateChanged Failed",
        "StateChanged Stopped",
        "Crashed Busy",
        "EvictionNotice Ready",
        "LeaseSettled Starting",
        "stop kill=true release=true",
        "stop kill=true release=false",
        "stop kill=false release=true",
    ] {
        assert!(seen.contains(want), "never saw {want:?}: {seen:#?}");
    }
}

#[test]
fn the_random_sequences_catch_a_step_that_forgets_the_lease_after_a_crash() {
    let caught = (0..2_000).find_map(|seed| walk(seed, 300, forgets_the_lease_after_a_crash).err());
    let e = caught.expect("a broken step went unnoticed");
    assert!(e.contains("still holding"), "{e}");
}

#[test]
fn the_random_sequences_catch_a_step_that_forgets_an_unload_during_the_load() {
    let caught =
        (0..2_000).find_map(|seed| walk(seed, 300, forgets_an_unload_during_the_load).err());
    let e = caught.expect("a broken step went unnoticed");
    assert!(
        e.contains("serving while an unload waits") || e.contains("without a lease"),
        "{e}"
    );
}

#[test]
fn a_failed_renewal_is_retried_after_a_pause_not_at_once() {
    let mut t = T::new();
    t.ready();
    // Idle: reported at once with a renewal, which fails (the scheduler is restarting).
    let a = t.done();
    assert!(has(&a, |a| matches!(a, Action::Renew { .. })), "{a:?}");
    let a = t.ev(Event::Renewed {
        lease_id: "l1".into(),
        seq: t.life.renew_seq,
        result: Renewal::Failed("Unavailable".into()),
    });
    assert!(
        !has(&a, |a| matches!(a, Action::Renew { .. })),
        "retried at once: {a:?}"
    );
    // Events and ticks within the pause send nothing.
    t.now += RENEW_RETRY_MS / 2;
    let a = t.ev(Event::Tick);
    assert!(
        !has(&a, |a| matches!(a, Action::Renew { .. })),
        "retried within the pause: {a:?}"
    );
    t.acquire(2);
    let a = t.done();
    assert!(
        !has(&a, |a| matches!(a, Action::Renew { .. })),
        "retried within the pause: {a:?}"
    );
    // After it: retried, with the current state.
    t.now += RENEW_RETRY_MS / 2;
    let a = t.ev(Event::Tick);
    assert!(
        has(&a, |a| matches!(a, Action::Renew { idle: true, .. })),
        "not retried after the pause: {a:?}"
    );
}
