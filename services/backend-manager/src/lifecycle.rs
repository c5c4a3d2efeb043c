//! The life cycle of one model instance as a pure state machine: [`step`] takes the instance's
//! bookkeeping ([`Lifecycle`], whose phase is one [`State`]), one [`Event`] and the time, and
//! returns the new bookkeeping and the [`Action`]s to perform. No tokio, no I/O, no clock: the
//! instance actor (`instance.rs`) turns I/O results into events and performs the actions (leases,
//! child processes, tickets, timers, published events). Unit tests drive it without processes.
//!
//! ```text
//! Unloaded/Stopped ─request─► Leasing ─granted─► Starting ─child ready─► Ready ⇄ Busy
//!        ▲                      │ refused            │ start failed         │ idle TTL, Unload,
//!        │                      ▼                    ▼                      │ eviction notice,
//!        │                    Failed{restart_after} ◄── child exited ───────┤ lease lost
//!        │                      │ request after the backoff ─► Leasing      ▼
//!        └────── child stopped, then lease released ◄────────────────── Draining
//! ```
//!
//! - **Single flight**: requests that find the instance not ready wait as waiters; the first one
//!   starts the only load; all are answered when it ends.
//! - **Lease first**: [`Action::AcquireLease`] → [`Event::LeaseGranted`] → [`Action::StartChild`]
//!   → [`Event::ChildReady`]. A failed start gives its lease back before it reports.
//! - **Generations**: every load, crash and stop opens a new generation. Tickets, exit watchers and
//!   load steps carry the generation they belong to (a typed field), so a late message about an
//!   older child (a ticket of an aborted request, the exit of a child that was stopped) changes
//!   nothing.
//! - **Stop**: [`Action::Stop`] kills the child (if any), then releases the lease, and answers with
//!   [`Event::StopDone`]; until then `stopping` holds and no load starts.

use securellm_proto::v1 as pb;

use crate::instance::InstanceError;

/// The phase of an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Never loaded (or replaced).
    Unloaded,
    /// Waiting for the scheduler's lease (estimate, queue).
    Leasing,
    /// Lease held; the child is starting.
    Starting,
    /// Serving (Busy while requests are in flight).
    Ready,
    /// Taking no new work; stops when in-flight requests end or the drain deadline passes.
    Draining,
    /// The child was stopped and the lease released.
    Stopped,
    /// A load failed or the child crashed; the next load waits until `restart_after_ms`.
    Failed { restart_after_ms: u64 },
}

/// The settings the machine decides with (fixed for an instance's life).
#[derive(Clone, Debug)]
pub struct Params {
    /// The model's name (in messages).
    pub model: String,
    /// The model's priority (a request without its own leases at it).
    pub priority: i32,
    /// Unload after this long without requests (0: never).
    pub idle_ttl_ms: u64,
    pub lease_ttl_ms: u64,
    /// How long a load may wait for its lease when no request gives a deadline.
    pub lease_wait_ms: u64,
    /// Drain time of an unload that does not give its own.
    pub drain_timeout_ms: u64,
    pub stop_grace_ms: u64,
    pub backoff_ms: u64,
    pub max_backoff_ms: u64,
}

/// A lease as the instance holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseInfo {
    pub id: String,
    pub bytes: u64,
    pub gpu: u32,
}

/// A request waiting for the instance to be ready (its reply lives in the actor, under `id`).
#[derive(Clone, Debug)]
pub struct Waiter {
    pub id: u64,
    pub deadline_ms: u64,
    /// The request's priority (its caller's, else the model's).
    pub priority: i32,
}

/// The scheduler's answer to a renewal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Renewal {
    /// Renewed; `evict_by_ms` is set while an eviction notice stands on the lease.
    Renewed { evict_by_ms: Option<u64> },
    /// The scheduler never heard of the lease (it restarted without its snapshot): re-attach it.
    Unknown,
    /// The lease ended (expired, revoked, released).
    Ended,
    /// Any other failure (transient: the next renewal retries).
    Failed(String),
}

/// Something that happened to the instance.
#[derive(Clone, Debug)]
pub enum Event {
    /// A request wants a ticket (`waiter` names its reply).
    Acquire {
        waiter: u64,
        deadline_ms: u64,
        priority: Option<i32>,
    },
    /// These waiters gave up (their deadline passed).
    WaitersGone(Vec<u64>),
    /// A ticket of generation `generation` was dropped (its request ended).
    Done { generation: u64 },
    /// The load's place in the scheduler's queue changed.
    LeaseQueued {
        generation: u64,
        position: pb::QueuePosition,
    },
    /// The scheduler granted the load's lease (`estimated`: the registry's estimate it asked for).
    LeaseGranted {
        generation: u64,
        lease: LeaseInfo,
        estimated: u64,
    },
    /// The estimate or the lease failed (nothing is held).
    LeaseRefused {
        generation: u64,
        error: InstanceError,
    },
    /// The child answers; the lease was settled to `lease_bytes`.
    ChildReady {
        generation: u64,
        lease_id: String,
        lease_bytes: u64,
        measured: Option<u64>,
    },
    /// The child could not be started: nothing runs, and the lease was given back.
    StartFailed {
        generation: u64,
        error: InstanceError,
    },
    /// The child of generation `generation` exited (`tail`: its last output).
    ChildExited {
        generation: u64,
        exit: String,
        tail: String,
    },
    /// An [`Action::Stop`] finished: the child is gone, the lease released.
    StopDone,
    /// Unload (`reply`: who waits for the answer).
    Unload {
        reply: Option<u64>,
        drain_timeout_ms: u64,
        force: bool,
        reason: String,
    },
    /// The scheduler asks for lease `lease_id` back by `deadline_ms`.
    EvictionNotice { lease_id: String, deadline_ms: u64 },
    /// The scheduler withdrew its notice.
    EvictionWithdrawn { lease_id: String },
    /// The scheduler no longer has the lease (expired, revoked, lost in a restart).
    LeaseLost { lease_id: String, reason: String },
    /// A re-attach confirmed or restored `lease_id`.
    Reattached { lease_id: String },
    /// The answer to renewal number `seq` of `lease_id`.
    Renewed {
        lease_id: String,
        seq: u64,
        result: Renewal,
    },
    /// Retire if idle and unloaded (the manager replaces the instance to change its settings).
    Retire,
    /// The periodic timer (idle TTL, drain deadline, backoff, renewal).
    Tick,
}

/// What the actor must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Estimate and lease (may queue); answers with `LeaseQueued` / `LeaseGranted` /
    /// `LeaseRefused`.
    AcquireLease {
        generation: u64,
        priority: i32,
        deadline_ms: u64,
    },
    /// Start the child under `lease` and settle the lease; answers with `ChildReady`, or gives
    /// the lease back and then answers `StartFailed` (so whoever hears of the failure finds the
    /// memory free, as when a load fails before its grant).
    StartChild {
        generation: u64,
        lease: LeaseInfo,
        deadline_ms: u64,
    },
    /// The started child is now the instance's: serve with it, watch its exit (reported with
    /// `generation`), and give new tickets a fresh abort signal.
    ChildUp { generation: u64 },
    /// A child started for a load that no longer stands: stop it.
    DiscardChild { generation: u64 },
    /// Renew the lease, telling the scheduler idleness and priority; answers with `Renewed`.
    Renew {
        lease_id: String,
        seq: u64,
        idle: bool,
        priority: i32,
    },
    /// Present the lease again (the scheduler forgot it); answers with `Reattached` / `LeaseLost`.
    Reattach { lease: LeaseInfo, priority: i32 },
    /// Give a lease back (no answer).
    ReleaseLease { lease_id: String },
    /// Stop the child if `kill` (else just forget it: it exited), then release `release`;
    /// answers with `StopDone`.
    Stop {
        kill: bool,
        release: Option<String>,
        reason: String,
    },
    /// Abort the requests in flight with this message.
    Abort(String),
    /// Give waiter `waiter` a ticket of generation `generation`.
    Grant {
        waiter: u64,
        generation: u64,
        load_wait_ms: u64,
    },
    /// Answer waiter `waiter` with an error.
    Refuse { waiter: u64, error: InstanceError },
    /// Answer an unload: whether the instance was loaded.
    UnloadAnswered { reply: u64, was_loaded: bool },
    /// Answer a retire request.
    Retired(bool),
    /// Tell waiting requests where they stand.
    Progress {
        phase: pb::load_progress::Phase,
        queue: Option<pb::QueuePosition>,
    },
    /// Publish an instance event; `state` / `previous` are the states at the moment it happened.
    Publish {
        kind: pb::InstanceEventKind,
        state: pb::InstanceState,
        previous: pb::InstanceState,
        detail: String,
    },
    /// Log a warning.
    Warn(String),
}

/// How long after a failed lease renewal the next one is tried (well inside any lease TTL).
pub const RENEW_RETRY_MS: u64 = 500;

/// Everything an instance knows about itself (the actor keeps only the I/O handles: replies,
/// the child, watch channels).
#[derive(Clone, Debug)]
pub struct Lifecycle {
    pub params: Params,
    pub state: State,
    /// Opened by every load, crash and stop (see the module doc).
    pub generation: u64,
    pub waiters: Vec<Waiter>,
    /// Replaced by an instance with other settings: acquires are refused.
    pub retired: bool,
    /// The generation whose child runs now.
    pub child: Option<u64>,
    pub lease: Option<LeaseInfo>,
    pub estimated: u64,
    pub measured: Option<u64>,
    pub in_flight: u32,
    pub requests_total: u64,
    pub last_used_ms: u64,
    pub started_at_ms: Option<u64>,
    pub ready_at_ms: Option<u64>,
    pub load_began_ms: u64,
    /// The deadline the load in flight works to.
    pub load_deadline_ms: u64,
    /// The estimate of the load in flight.
    pub load_estimate: u64,
    /// Draining: stop by then. Leasing / Starting: a drain to begin once the load ends.
    pub drain_deadline_ms: Option<u64>,
    /// The scheduler's deadline for an eviction notice that stands.
    pub evict_by_ms: Option<u64>,
    /// Unloads waiting for the stop.
    pub unloads: Vec<u64>,
    /// An [`Action::Stop`] is under way.
    pub stopping: bool,
    pub crash_count: u32,
    pub consecutive_crashes: u32,
    pub last_error: String,
    pub last_error_at_ms: Option<u64>,
    pub next_renew_ms: u64,
    /// No renewal before this (a failed one is retried after [`RENEW_RETRY_MS`], not at once).
    pub renew_retry_at_ms: u64,
    /// A renewal is under way (one at a time).
    pub renewing: bool,
    /// The priority of the lease held now (raised by the callers that use it).
    pub lease_priority: i32,
    /// What the scheduler was last told: idle, and the priority.
    pub reported: Option<(bool, i32)>,
    /// Renewals sent so far.
    pub renew_seq: u64,
    /// A notice arrived while busy: the first renewal numbered above this says whether it stands
    /// (a notice that only an idle lease had to honour is withdrawn once the scheduler hears it is
    /// busy).
    pub notice_check_after: Option<u64>,
}

/// One step: the new bookkeeping and what to do. Pure.
pub fn step(mut life: Lifecycle, event: Event, now_ms: u64) -> (Lifecycle, Vec<Action>) {
    let actions = life.apply(event, now_ms);
    (life, actions)
}

/// The state as the API shows it (Ready with requests in flight is Busy).
pub fn state_pb(s: State, in_flight: u32) -> pb::InstanceState {
    match s {
        State::Unloaded => pb::InstanceState::Unloaded,
        State::Leasing => pb::InstanceState::Leasing,
        State::Starting => pb::InstanceState::Starting,
        State::Ready if in_flight > 0 => pb::InstanceState::Busy,
        State::Ready => pb::InstanceState::Ready,
        State::Draining => pb::InstanceState::Draining,
        State::Stopped => pb::InstanceState::Stopped,
        State::Failed { .. } => pb::InstanceState::Failed,
    }
}

fn same_phase(a: State, b: State) -> bool {
    std::mem::discriminant(&a) == std::mem::discriminant(&b)
}

impl Lifecycle {
    pub fn new(params: Params) -> Self {
        Self {
            params,
            state: State::Unloaded,
            generation: 0,
            waiters: Vec::new(),
            retired: false,
            child: None,
            lease: None,
            estimated: 0,
            measured: None,
            in_flight: 0,
            requests_total: 0,
            last_used_ms: 0,
            started_at_ms: None,
            ready_at_ms: None,
            load_began_ms: 0,
            load_deadline_ms: 0,
            load_estimate: 0,
            drain_deadline_ms: None,
            evict_by_ms: None,
            unloads: Vec::new(),
            stopping: false,
            crash_count: 0,
            consecutive_crashes: 0,
            last_error: String::new(),
            last_error_at_ms: None,
            next_renew_ms: 0,
            renew_retry_at_ms: 0,
            renewing: false,
            lease_priority: 0,
            reported: None,
            renew_seq: 0,
            notice_check_after: None,
        }
    }

    /// The state as the API shows it.
    pub fn state_pb(&self) -> pb::InstanceState {
        state_pb(self.state, self.in_flight)
    }

    /// When a failed instance may load again.
    pub fn restart_after_ms(&self) -> Option<u64> {
        match self.state {
            State::Failed { restart_after_ms } => Some(restart_after_ms),
            _ => None,
        }
    }

    /// When an idle ready instance unloads.
    pub fn unload_at_ms(&self) -> Option<u64> {
        (self.state == State::Ready && self.in_flight == 0 && self.params.idle_ttl_ms > 0)
            .then(|| self.last_used_ms + self.params.idle_ttl_ms)
    }

    /// Apply one event in place (what [`step`] does).
    pub fn apply(&mut self, event: Event, now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        self.handle(event, now, &mut out);
        self.report_changes(now, &mut out);
        out
    }

    fn handle(&mut self, event: Event, now: u64, out: &mut Vec<Action>) {
        match event {
            Event::Acquire { waiter, .. } if self.retired => out.push(Action::Refuse {
                waiter,
                error: InstanceError::Unavailable(format!(
                    "model {} was replaced to change its settings; retry",
                    self.params.model
                )),
            }),
            Event::Acquire {
                waiter,
                deadline_ms,
                priority,
            } => {
                let priority = priority.unwrap_or(self.params.priority);
                self.acquire(
                    Waiter {
                        id: waiter,
                        deadline_ms,
                        priority,
                    },
                    now,
                    out,
                );
            }
            Event::WaitersGone(ids) => self.waiters.retain(|w| !ids.contains(&w.id)),
            Event::Retire => {
                let idle = matches!(
                    self.state,
                    State::Unloaded | State::Stopped | State::Failed { .. }
                ) && self.waiters.is_empty()
                    && self.in_flight == 0
                    && !self.stopping;
                if idle {
                    self.retired = true;
                }
                out.push(Action::Retired(idle));
            }
            Event::Done { generation } => {
                if generation == self.generation && self.in_flight > 0 {
                    self.in_flight -= 1;
                    self.last_used_ms = now;
                    if self.in_flight == 0 && self.state == State::Draining {
                        self.begin_stop("drained", out);
                    }
                }
            }
            Event::LeaseQueued {
                generation,
                position,
            } => {
                if generation == self.generation && self.state == State::Leasing {
                    out.push(Action::Progress {
                        phase: pb::load_progress::Phase::Queued,
                        queue: Some(position),
                    });
                }
            }
            Event::LeaseGranted {
                generation,
                lease,
                estimated,
            } => {
                if generation != self.generation || self.state != State::Leasing {
                    // Not asked for any more: nobody will use it.
                    out.push(Action::ReleaseLease { lease_id: lease.id });
                    return;
                }
                self.lease = Some(lease.clone());
                self.load_estimate = estimated;
                self.reported = None;
                self.next_renew_ms = now + self.params.lease_ttl_ms / 3;
                self.set_state(State::Starting, "lease granted; starting", out);
                out.push(Action::StartChild {
                    generation,
                    lease,
                    deadline_ms: self.load_deadline_ms,
                });
            }
            Event::LeaseRefused { generation, error } => {
                if generation == self.generation && self.state == State::Leasing {
                    self.load_failed(error, now, out);
                }
            }
            Event::StartFailed { generation, error } => {
                if generation == self.generation && self.state == State::Starting {
                    // Nothing runs, and the start gave the lease back.
                    self.load_failed(error, now, out);
                }
            }
            Event::ChildReady {
                generation,
                lease_id,
                lease_bytes,
                measured,
            } => {
                if generation != self.generation || self.state != State::Starting {
                    out.push(Action::DiscardChild { generation });
                    return;
                }
                self.child_ready(generation, &lease_id, lease_bytes, measured, now, out);
            }
            Event::ChildExited {
                generation,
                exit,
                tail,
            } => {
                if self.child == Some(generation) && generation == self.generation && !self.stopping
                {
                    self.crashed(&exit, &tail, now, out);
                }
            }
            Event::StopDone => self.stop_done(now, out),
            Event::Unload {
                reply,
                drain_timeout_ms,
                force,
                reason,
            } => {
                let loaded = matches!(
                    self.state,
                    State::Ready | State::Draining | State::Leasing | State::Starting
                );
                if let Some(r) = reply {
                    if loaded || self.stopping {
                        self.unloads.push(r);
                    } else {
                        out.push(Action::UnloadAnswered {
                            reply: r,
                            was_loaded: false,
                        });
                    }
                }
                if loaded {
                    let timeout = if drain_timeout_ms == 0 {
                        self.params.drain_timeout_ms
                    } else {
                        drain_timeout_ms
                    };
                    self.drain(now + if force { 0 } else { timeout }, &reason, now, out);
                }
            }
            Event::EvictionNotice {
                lease_id,
                deadline_ms,
            } => {
                if self.holds(&lease_id) {
                    self.evict_by_ms = Some(deadline_ms);
                    self.publish(
                        pb::InstanceEventKind::EvictionNotice,
                        self.state,
                        "eviction notice",
                        out,
                    );
                    if self.state == State::Ready && !self.idle_now() {
                        // Busy: the notice may have been for an idle lease (one of equal
                        // priority may only take idle memory). Tell the scheduler we are busy;
                        // its answer says whether the notice still stands.
                        self.notice_check_after = Some(self.renew_seq);
                        self.reported = None;
                    } else {
                        self.honour_notice(deadline_ms, now, out);
                    }
                }
            }
            Event::Reattached { lease_id } => {
                // The instance let the lease go meanwhile (stopped, released): the re-attach
                // brought back a lease nobody holds, so give it back at once.
                if !self.holds(&lease_id) {
                    out.push(Action::ReleaseLease { lease_id });
                }
            }
            Event::EvictionWithdrawn { lease_id } => {
                // Only a drain the notice caused is called off: not an unload someone asked
                // for, not a stop already under way.
                if self.holds(&lease_id) {
                    self.notice_check_after = None;
                }
                if self.holds(&lease_id)
                    && self.unloads.is_empty()
                    && !self.stopping
                    && self.evict_by_ms.take().is_some()
                {
                    match self.state {
                        State::Draining => {
                            self.drain_deadline_ms = None;
                            self.set_state(State::Ready, "eviction notice withdrawn", out);
                            for w in std::mem::take(&mut self.waiters) {
                                self.grant(w, 0, out);
                            }
                        }
                        State::Leasing | State::Starting => self.drain_deadline_ms = None,
                        _ => {}
                    }
                }
            }
            Event::LeaseLost { lease_id, reason } => self.lease_lost(&lease_id, &reason, now, out),
            Event::Renewed {
                lease_id,
                seq,
                result,
            } => {
                self.renewing = false;
                let current = self.holds(&lease_id);
                match result {
                    Renewal::Renewed { evict_by_ms } => {
                        if current
                            && let Some(after) = self.notice_check_after
                            && seq > after
                        {
                            self.notice_check_after = None;
                            match evict_by_ms {
                                Some(by) => self.honour_notice(by, now, out),
                                None => self.evict_by_ms = None,
                            }
                        }
                    }
                    Renewal::Unknown => {
                        self.reported = None;
                        // Never heard of: the scheduler restarted without its snapshot, and this
                        // renewal came before the manager's re-attach. Present the lease again
                        // (restored under its id if it still fits); lost only if that fails.
                        if let Some(l) = self.lease.as_ref().filter(|l| l.id == lease_id) {
                            out.push(Action::Reattach {
                                lease: l.clone(),
                                priority: self.lease_priority,
                            });
                        }
                    }
                    Renewal::Ended => {
                        self.reported = None;
                        // It ended (expired, revoked, released): lost if it is the one held now.
                        self.lease_lost(&lease_id, "the scheduler no longer knows it", now, out);
                    }
                    Renewal::Failed(why) => {
                        self.reported = None;
                        // Retry after a pause: a scheduler that is restarting refuses at once,
                        // and retrying at the next event would spin (hundreds of calls a second).
                        self.renew_retry_at_ms = now + RENEW_RETRY_MS;
                        self.next_renew_ms = self.renew_retry_at_ms;
                        out.push(Action::Warn(format!(
                            "lease renewal failed ({why}); retrying"
                        )));
                    }
                }
            }
            Event::Tick => self.tick(now, out),
        }
    }

    fn holds(&self, lease_id: &str) -> bool {
        self.lease.as_ref().is_some_and(|l| l.id == lease_id)
    }

    fn publish(
        &self,
        kind: pb::InstanceEventKind,
        previous: State,
        detail: &str,
        out: &mut Vec<Action>,
    ) {
        out.push(Action::Publish {
            kind,
            state: self.state_pb(),
            previous: state_pb(previous, 0),
            detail: detail.to_string(),
        });
    }

    fn set_state(&mut self, s: State, detail: &str, out: &mut Vec<Action>) {
        use pb::load_progress::Phase;
        let phase = match s {
            State::Ready => Phase::Ready,
            State::Leasing => Phase::Leasing,
            State::Starting => Phase::Starting,
            State::Draining => Phase::Unloading,
            // The next request loads it again.
            State::Unloaded | State::Stopped | State::Failed { .. } => Phase::Leasing,
        };
        out.push(Action::Progress { phase, queue: None });
        let prev = self.state;
        self.state = s;
        if !same_phase(s, prev) {
            self.publish(pb::InstanceEventKind::StateChanged, prev, detail, out);
        }
    }

    /// Hand `w` a ticket (the instance is ready).
    fn grant(&mut self, w: Waiter, load_wait_ms: u64, out: &mut Vec<Action>) {
        if w.priority > self.lease_priority && self.lease.is_some() {
            // A caller of higher priority uses the model now: protect it as theirs.
            self.lease_priority = w.priority;
        }
        self.in_flight += 1;
        self.requests_total += 1;
        out.push(Action::Grant {
            waiter: w.id,
            generation: self.generation,
            load_wait_ms,
        });
    }

    fn acquire(&mut self, w: Waiter, now: u64, out: &mut Vec<Action>) {
        match self.state {
            State::Ready => self.grant(w, 0, out),
            State::Leasing | State::Starting | State::Draining => self.waiters.push(w),
            State::Unloaded | State::Stopped => {
                self.waiters.push(w);
                if !self.stopping {
                    self.begin_load(now, out);
                }
            }
            State::Failed { restart_after_ms } => {
                self.waiters.push(w);
                // Else restarted by the tick once the backoff has passed.
                if !self.stopping && restart_after_ms <= now {
                    self.begin_load(now, out);
                }
            }
        }
    }

    fn begin_load(&mut self, now: u64, out: &mut Vec<Action>) {
        self.generation += 1;
        self.load_began_ms = now;
        self.set_state(State::Leasing, "loading on demand", out);
        let deadline = self
            .waiters
            .iter()
            .map(|w| w.deadline_ms)
            .max()
            .unwrap_or(now + self.params.lease_wait_ms);
        // The memory is leased at the highest priority among the requests that wait for it.
        let priority = self
            .waiters
            .iter()
            .map(|w| w.priority)
            .max()
            .unwrap_or(self.params.priority);
        self.lease_priority = priority;
        self.load_deadline_ms = deadline;
        self.reported = None;
        self.notice_check_after = None;
        out.push(Action::AcquireLease {
            generation: self.generation,
            priority,
            deadline_ms: deadline,
        });
    }

    fn child_ready(
        &mut self,
        generation: u64,
        lease_id: &str,
        lease_bytes: u64,
        measured: Option<u64>,
        now: u64,
        out: &mut Vec<Action>,
    ) {
        // If the lease was lost during the start, it stays lost (the pending drain below stops
        // the instance).
        if let Some(held) = self.lease.as_mut().filter(|l| l.id == lease_id) {
            held.bytes = lease_bytes;
        }
        self.estimated = self.load_estimate;
        self.measured = measured;
        self.started_at_ms = Some(self.load_began_ms);
        self.ready_at_ms = Some(now);
        self.last_used_ms = now;
        self.next_renew_ms = now + self.params.lease_ttl_ms / 3;
        self.child = Some(generation);
        out.push(Action::ChildUp { generation });
        if self.lease.is_some() && self.measured.is_some() {
            self.publish(
                pb::InstanceEventKind::LeaseSettled,
                self.state,
                "lease settled to measured size",
                out,
            );
        }
        self.set_state(State::Ready, "ready", out);
        let wait = now.saturating_sub(self.load_began_ms);
        for w in std::mem::take(&mut self.waiters) {
            self.grant(w, wait, out);
        }
        // An unload, eviction or lost lease that arrived during the load.
        if let Some(by) = self.drain_deadline_ms.take() {
            self.drain(by, "drain requested during load", now, out);
        }
    }

    /// The estimate, the lease or the start failed (nothing runs, nothing is held).
    fn load_failed(&mut self, error: InstanceError, now: u64, out: &mut Vec<Action>) {
        self.lease = None;
        self.drain_deadline_ms = None;
        self.evict_by_ms = None;
        self.fail(&error.to_string(), now, out);
        for w in std::mem::take(&mut self.waiters) {
            out.push(Action::Refuse {
                waiter: w.id,
                error: error.clone(),
            });
        }
        for r in std::mem::take(&mut self.unloads) {
            out.push(Action::UnloadAnswered {
                reply: r,
                was_loaded: false,
            });
        }
    }

    fn fail(&mut self, why: &str, now: u64, out: &mut Vec<Action>) {
        self.crash_count += 1;
        self.consecutive_crashes += 1;
        self.last_error = why.to_string();
        self.last_error_at_ms = Some(now);
        let p = &self.params;
        let backoff = p
            .backoff_ms
            .saturating_mul(1 << (self.consecutive_crashes.saturating_sub(1)).min(16))
            .min(p.max_backoff_ms);
        self.set_state(
            State::Failed {
                restart_after_ms: now + backoff,
            },
            why,
            out,
        );
    }

    /// The child exited on its own: abort what runs, release the lease, back off.
    fn crashed(&mut self, exit: &str, tail: &str, now: u64, out: &mut Vec<Action>) {
        let why = format!("the backend process crashed ({exit}); last output:\n{tail}");
        out.push(Action::Abort(format!(
            "the backend process for {} crashed ({exit})",
            self.params.model
        )));
        self.publish(pb::InstanceEventKind::Crashed, self.state, exit, out);
        let ready_for = now.saturating_sub(self.ready_at_ms.unwrap_or(0));
        if ready_for > 30_000 {
            self.consecutive_crashes = 0;
        }
        self.fail(&why, now, out);
        self.child = None;
        self.in_flight = 0;
        self.generation += 1;
        // Release the lease now (the process is gone).
        self.stopping = true;
        out.push(Action::Stop {
            kill: false,
            release: self.lease.take().map(|l| l.id),
            reason: "crashed".into(),
        });
    }

    fn lease_lost(&mut self, lease_id: &str, reason: &str, now: u64, out: &mut Vec<Action>) {
        if self.holds(lease_id) {
            out.push(Action::Warn(format!("lease lost: {reason}")));
            // The memory is not ours any more: stop now, nothing to release.
            self.lease = None;
            self.drain(now, &format!("lease lost: {reason}"), now, out);
        }
    }

    /// An eviction notice that stands: drain and release before the scheduler's deadline.
    fn honour_notice(&mut self, deadline_ms: u64, now: u64, out: &mut Vec<Action>) {
        self.evict_by_ms = Some(deadline_ms);
        // Leave time to stop the process (SIGTERM, then SIGKILL after the grace) and release
        // before the scheduler's deadline.
        let margin = self.params.stop_grace_ms + 1_000;
        let by = deadline_ms.saturating_sub(margin).max(now);
        self.drain(by, "eviction notice", now, out);
    }

    /// Stop taking new work; stop once in-flight requests finish or `by_ms` passes.
    fn drain(&mut self, by_ms: u64, reason: &str, now: u64, out: &mut Vec<Action>) {
        match self.state {
            State::Ready => {
                self.drain_deadline_ms = Some(by_ms);
                self.set_state(State::Draining, reason, out);
                if self.in_flight == 0 || by_ms <= now {
                    self.begin_stop(reason, out);
                }
            }
            State::Draining => {
                self.drain_deadline_ms =
                    Some(self.drain_deadline_ms.map_or(by_ms, |d| d.min(by_ms)));
                if by_ms <= now {
                    self.begin_stop(reason, out);
                }
            }
            // A load in flight finishes first; then it is drained (by the sooner deadline: a
            // lost lease's immediate stop is not put off by a later unload).
            State::Leasing | State::Starting => {
                self.drain_deadline_ms =
                    Some(self.drain_deadline_ms.map_or(by_ms, |d| d.min(by_ms)));
            }
            _ => {}
        }
    }

    fn begin_stop(&mut self, reason: &str, out: &mut Vec<Action>) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        if self.in_flight > 0 {
            out.push(Action::Abort(format!(
                "model {} was unloaded ({reason}) while this request ran",
                self.params.model
            )));
        }
        self.in_flight = 0;
        self.generation += 1;
        out.push(Action::Stop {
            kill: self.child.take().is_some(),
            release: self.lease.take().map(|l| l.id),
            reason: reason.to_string(),
        });
    }

    fn stop_done(&mut self, now: u64, out: &mut Vec<Action>) {
        if !self.stopping {
            return;
        }
        self.stopping = false;
        self.started_at_ms = None;
        self.ready_at_ms = None;
        self.drain_deadline_ms = None;
        self.evict_by_ms = None;
        let failed = matches!(self.state, State::Failed { .. });
        if !failed {
            self.set_state(State::Stopped, "stopped", out);
        }
        for r in std::mem::take(&mut self.unloads) {
            out.push(Action::UnloadAnswered {
                reply: r,
                was_loaded: true,
            });
        }
        // Requests that arrived during the unload: load again for them.
        if !self.waiters.is_empty() && !failed {
            self.begin_load(now, out);
        }
    }

    fn tick(&mut self, now: u64, out: &mut Vec<Action>) {
        match self.state {
            State::Ready => {
                if let Some(by) = self.drain_deadline_ms {
                    // A drain requested while loading.
                    self.drain(by, "drain requested during load", now, out);
                } else if self.in_flight == 0
                    && self.params.idle_ttl_ms > 0
                    && now.saturating_sub(self.last_used_ms) >= self.params.idle_ttl_ms
                {
                    self.drain(now, "idle ttl", now, out);
                }
            }
            State::Draining if self.drain_deadline_ms.is_some_and(|d| d <= now) => {
                self.begin_stop("drain deadline", out);
            }
            State::Failed { restart_after_ms }
                if !self.waiters.is_empty() && !self.stopping && restart_after_ms <= now =>
            {
                self.begin_load(now, out);
            }
            _ => {}
        }
        if now >= self.next_renew_ms {
            self.renew(now, out);
        }
    }

    /// Idle as the scheduler should see it: nothing in flight and nobody waiting, or draining
    /// (going away anyway: a busy report must not call off the drain's notice).
    pub fn idle_now(&self) -> bool {
        match self.state {
            State::Ready => self.in_flight == 0 && self.waiters.is_empty(),
            State::Draining => true,
            _ => false,
        }
    }

    /// Tell the scheduler at once when the lease turns idle or busy or its priority rises: an idle
    /// lease yields to a request of equal priority, a busy one does not.
    fn report_changes(&mut self, now: u64, out: &mut Vec<Action>) {
        if self.reported != Some((self.idle_now(), self.lease_priority)) {
            self.renew(now, out);
        }
    }

    /// Renew the lease now (one renewal at a time; a change seen meanwhile is sent after it).
    fn renew(&mut self, now: u64, out: &mut Vec<Action>) {
        let Some(l) = &self.lease else { return };
        if self.renewing
            || now < self.renew_retry_at_ms
            || !matches!(self.state, State::Starting | State::Ready | State::Draining)
        {
            return;
        }
        let lease_id = l.id.clone();
        self.renewing = true;
        self.renew_seq += 1;
        self.next_renew_ms = now + self.params.lease_ttl_ms / 3;
        let idle = self.idle_now();
        self.reported = Some((idle, self.lease_priority));
        out.push(Action::Renew {
            lease_id,
            seq: self.renew_seq,
            idle,
            priority: self.lease_priority,
        });
    }
}

#[cfg(test)]
mod tests;
