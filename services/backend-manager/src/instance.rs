//! One actor per model instance: the state machine
//! `Unloaded → Leasing → Starting → Ready ⇄ Busy → Draining → Stopped`, with `Failed` on a crash or
//! a failed start.
//!
//! - **Single flight**: requests for an instance that is not ready queue as waiters; the first one
//!   starts the only load; all are answered when it finishes.
//! - **Lease first**: estimate (registry) → lease (scheduler, may queue) → start → settle the lease
//!   to what the engine says it allocated → renew every TTL/3. The lease is released only after
//!   the process has exited.
//! - **Idle unload**: the TTL counts from the end of the last request. A request that arrives while
//!   an unload is under way waits for it, then the instance loads again (never an error, never a
//!   deadlock: the stop and the reload are both driven by this one actor).
//! - **Eviction / unload**: stop taking new work, let in-flight requests finish up to the deadline,
//!   then abort them, stop the process, release.
//! - **Crash**: the child's exit is seen at once; in-flight requests are aborted with a clear error,
//!   the lease is released, and the next request restarts it after an exponential backoff.
//!
//! Long steps (load, stop) run in tasks that report back with a message, so the actor always
//! answers.

use std::sync::Arc;
use std::time::Duration;

use securellm_common::internal_auth::AuthChannel;
use securellm_common::time::now_ms;
use securellm_proto::v1 as pb;
use securellm_proto::v1::model_registry_client::ModelRegistryClient;
use securellm_proto::v1::vram_scheduler_client::VramSchedulerClient;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_stream::StreamExt;

use crate::backend::{Backend, Backends, Measured, StartSpec, Started};
use crate::config::{BackendConfig, Effective};

/// What every instance shares.
pub struct Shared {
    pub cfg: BackendConfig,
    /// Every configured backend; each instance holds the one chosen for its model.
    pub backends: Backends,
    pub http: reqwest::Client,
    pub scheduler: VramSchedulerClient<AuthChannel>,
    pub registry: ModelRegistryClient<AuthChannel>,
    pub events: broadcast::Sender<pb::InstanceEvent>,
}

/// The model an instance serves.
#[derive(Clone, Debug)]
pub struct ModelRef {
    pub id: String,
    pub name: String,
    pub path: std::path::PathBuf,
    /// The name the engine knows the model by (Ollama's `name:tag`; else the registry name).
    pub served_name: String,
}

/// Why a request could not be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InstanceError {
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    NotFound(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Unloaded,
    Leasing,
    Starting,
    Ready,
    Draining,
    Stopped,
    Failed,
}

/// Permission to send one request to the upstream. Dropping it ends the request's accounting.
pub struct Ticket {
    pub endpoint: String,
    /// The engine's per-instance API key, sent with the request (never logged).
    pub api_key: Option<Arc<str>>,
    pub model_id: String,
    pub served_name: String,
    pub instance_id: String,
    pub load_wait_ms: u64,
    /// Becomes `Some(reason)` when the request must be aborted (crash, eviction deadline).
    pub abort: watch::Receiver<Option<String>>,
    done: Option<(mpsc::UnboundedSender<Msg>, u64)>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some((tx, generation)) = self.done.take() {
            let _ = tx.send(Msg::Done { generation });
        }
    }
}

struct Lease {
    id: String,
    bytes: u64,
    gpu: u32,
}

/// What a successful load hands back.
struct Loaded {
    started: Started,
    lease: Option<Lease>,
    estimated: u64,
}

/// A request waiting for the instance to be ready.
struct Waiter {
    deadline_ms: u64,
    /// The request's priority (its caller's, else the model's).
    priority: i32,
    reply: oneshot::Sender<Result<Ticket, InstanceError>>,
}

enum Msg {
    Acquire {
        deadline_ms: u64,
        priority: Option<i32>,
        reply: oneshot::Sender<Result<Ticket, InstanceError>>,
    },
    Done {
        generation: u64,
    },
    LoadDone(Result<Loaded, InstanceError>),
    Exited(String),
    StopDone,
    Unload {
        drain_timeout_ms: u64,
        force: bool,
        reason: String,
        reply: Option<oneshot::Sender<bool>>,
    },
    Evict {
        lease_id: String,
        deadline_ms: u64,
    },
    /// A re-attach this instance asked for confirmed or restored lease `0`.
    Reattached(String),
    /// The scheduler withdrew its eviction notice for this lease.
    EvictionWithdrawn {
        lease_id: String,
    },
    /// The scheduler no longer has our lease (expired, revoked, lost in a restart).
    LeaseLost {
        lease_id: String,
        reason: String,
    },
    /// The answer to renewal number `seq` of lease `lease_id` (a late answer about an older lease
    /// is ignored): whether an eviction notice stands on it.
    Renewed {
        lease_id: String,
        seq: u64,
        result: Result<Option<u64>, tonic::Code>,
    },
    /// The load's place in the scheduler's queue changed.
    Queued(pb::QueuePosition),
    /// The lease was granted (the process is starting): from now on it is renewed, and eviction
    /// notices for it reach this instance.
    Granted {
        id: String,
        bytes: u64,
        gpu: u32,
    },
    View(oneshot::Sender<pb::BackendInstance>),
    LeaseId(oneshot::Sender<Option<HeldLease>>),
    /// Retire if idle and unloaded (answers whether it did): later acquires are refused so the
    /// manager can replace this instance with one of other settings.
    Retire(oneshot::Sender<bool>),
    Tick,
}

/// A lease an instance holds, as the manager presents it when re-attaching.
#[derive(Clone, Debug)]
pub struct HeldLease {
    pub id: String,
    pub bytes: u64,
    pub gpu: u32,
    pub priority: i32,
    pub pids: Vec<u32>,
}

/// The cloneable API of one instance.
#[derive(Clone)]
pub struct InstanceHandle {
    pub id: String,
    pub model: ModelRef,
    /// The settings the instance was created with (fixed for its life).
    pub settings: Effective,
    tx: mpsc::UnboundedSender<Msg>,
    progress: watch::Receiver<pb::LoadProgress>,
}

impl InstanceHandle {
    /// Get a ticket: at once if ready, else after the (single) load, within `deadline_ms`.
    /// `priority` is the caller's (None: the model's); a load it triggers leases memory at that
    /// priority, and a loaded instance it uses is raised to it.
    pub async fn acquire(
        &self,
        deadline_ms: u64,
        priority: Option<i32>,
    ) -> Result<Ticket, InstanceError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Acquire {
                deadline_ms,
                priority,
                reply,
            })
            .map_err(|_| {
                InstanceError::Unavailable("the backend manager is shutting down".into())
            })?;
        let wait = Duration::from_millis(deadline_ms.saturating_sub(now_ms()));
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(InstanceError::Unavailable("the instance stopped".into())),
            Err(_) => Err(InstanceError::DeadlineExceeded(format!(
                "model {} was not ready before the deadline",
                self.model.name
            ))),
        }
    }

    /// Where a request that waits for this instance stands (phase READY when it is loaded).
    pub fn progress(&self) -> watch::Receiver<pb::LoadProgress> {
        self.progress.clone()
    }

    /// Do both handles lead to the same instance actor?
    pub fn same(&self, other: &InstanceHandle) -> bool {
        self.tx.same_channel(&other.tx)
    }

    /// Retire the instance if it is unloaded and nobody waits for it; true if it did.
    pub async fn retire(&self) -> bool {
        let (reply, rx) = oneshot::channel();
        let _ = self.tx.send(Msg::Retire(reply));
        rx.await.unwrap_or(true)
    }

    /// Unload; resolves to whether it was loaded, after the lease was released.
    pub async fn unload(&self, drain_timeout_ms: u64, force: bool) -> bool {
        let (reply, rx) = oneshot::channel();
        let _ = self.tx.send(Msg::Unload {
            drain_timeout_ms,
            force,
            reason: "unload requested".into(),
            reply: Some(reply),
        });
        rx.await.unwrap_or(false)
    }

    pub fn evict(&self, lease_id: String, deadline_ms: u64) {
        let _ = self.tx.send(Msg::Evict {
            lease_id,
            deadline_ms,
        });
    }

    pub fn eviction_withdrawn(&self, lease_id: String) {
        let _ = self.tx.send(Msg::EvictionWithdrawn { lease_id });
    }

    pub fn lease_lost(&self, lease_id: String, reason: String) {
        let _ = self.tx.send(Msg::LeaseLost { lease_id, reason });
    }

    pub async fn view(&self) -> Option<pb::BackendInstance> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Msg::View(tx)).ok()?;
        rx.await.ok()
    }

    /// The lease held now.
    pub async fn lease(&self) -> Option<HeldLease> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Msg::LeaseId(tx)).ok()?;
        rx.await.ok().flatten()
    }
}

struct Actor {
    id: String,
    model: ModelRef,
    backend: Arc<dyn Backend>,
    settings: Effective,
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Msg>,
    state: State,
    generation: u64,
    waiters: Vec<Waiter>,
    /// Replaced by an instance with other settings: acquires are refused.
    retired: bool,
    started: Option<Started>,
    lease: Option<Lease>,
    estimated: u64,
    measured: Option<u64>,
    in_flight: u32,
    requests_total: u64,
    last_used_ms: u64,
    started_at_ms: Option<u64>,
    ready_at_ms: Option<u64>,
    load_began_ms: u64,
    abort: watch::Sender<Option<String>>,
    drain_deadline_ms: Option<u64>,
    evict_by_ms: Option<u64>,
    unload_replies: Vec<oneshot::Sender<bool>>,
    stopping: bool,
    crash_count: u32,
    consecutive_crashes: u32,
    last_error: String,
    last_error_at_ms: Option<u64>,
    restart_after_ms: Option<u64>,
    next_renew_ms: u64,
    renewing: bool,
    /// The priority of the lease held now (raised by the callers that use it).
    lease_priority: i32,
    /// What the scheduler was last told: idle, and the priority.
    reported: Option<(bool, i32)>,
    /// Renewals sent so far.
    renew_seq: u64,
    /// A notice arrived while busy: the first renewal numbered above this says whether it stands
    /// (a notice that only an idle lease had to honour is withdrawn once the scheduler hears it is
    /// busy).
    notice_check_after: Option<u64>,
    /// What waiting requests are told (see [`InstanceHandle::progress`]).
    progress: watch::Sender<pb::LoadProgress>,
}

/// Start an instance actor.
pub fn spawn(
    id: String,
    model: ModelRef,
    settings: Effective,
    backend: Arc<dyn Backend>,
    shared: Arc<Shared>,
) -> InstanceHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let (abort, _) = watch::channel(None);
    let (progress, progress_rx) = watch::channel(pb::LoadProgress {
        phase: pb::load_progress::Phase::Leasing as i32,
        model: model.name.clone(),
        ..Default::default()
    });
    let actor = Actor {
        id: id.clone(),
        model: model.clone(),
        backend,
        settings,
        shared,
        tx: tx.clone(),
        state: State::Unloaded,
        generation: 0,
        waiters: Vec::new(),
        retired: false,
        started: None,
        lease: None,
        estimated: 0,
        measured: None,
        in_flight: 0,
        requests_total: 0,
        last_used_ms: 0,
        started_at_ms: None,
        ready_at_ms: None,
        load_began_ms: 0,
        abort,
        drain_deadline_ms: None,
        evict_by_ms: None,
        unload_replies: Vec::new(),
        stopping: false,
        crash_count: 0,
        consecutive_crashes: 0,
        last_error: String::new(),
        last_error_at_ms: None,
        restart_after_ms: None,
        next_renew_ms: 0,
        renewing: false,
        lease_priority: 0,
        reported: None,
        renew_seq: 0,
        notice_check_after: None,
        progress,
    };
    let fixed = actor.settings.clone();
    tokio::spawn(actor.run(rx));
    InstanceHandle {
        id,
        model,
        settings: fixed,
        tx,
        progress: progress_rx,
    }
}

fn state_pb(s: State, in_flight: u32) -> pb::InstanceState {
    match s {
        State::Unloaded => pb::InstanceState::Unloaded,
        State::Leasing => pb::InstanceState::Leasing,
        State::Starting => pb::InstanceState::Starting,
        State::Ready if in_flight > 0 => pb::InstanceState::Busy,
        State::Ready => pb::InstanceState::Ready,
        State::Draining => pb::InstanceState::Draining,
        State::Stopped => pb::InstanceState::Stopped,
        State::Failed => pb::InstanceState::Failed,
    }
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let msg = tokio::select! {
                m = rx.recv() => match m { Some(m) => m, None => break },
                _ = tick.tick() => Msg::Tick,
            };
            self.handle(msg);
            self.report_changes();
            if self.retired {
                // Replaced: nothing to stop or release (it was idle); a late request sees the
                // channel closed and the manager looks the model up again.
                return;
            }
        }
        // The manager is going away: stop the backend and release the lease.
        if let Some(s) = self.started.take() {
            self.backend
                .stop(&s, Duration::from_millis(self.shared.cfg.stop_grace_ms))
                .await;
        }
        if let Some(l) = self.lease.take() {
            release_lease(&self.shared, &self.id, l.id).await;
        }
    }

    fn emit(&self, kind: pb::InstanceEventKind, previous: State, detail: &str) {
        let _ = self.shared.events.send(pb::InstanceEvent {
            kind: kind as i32,
            instance: Some(self.view()),
            previous_state: state_pb(previous, 0) as i32,
            at_ms: now_ms(),
            detail: detail.to_string(),
        });
    }

    /// Tell waiting requests where they stand.
    fn set_progress(&self, phase: pb::load_progress::Phase, queue: Option<&pb::QueuePosition>) {
        let p = pb::LoadProgress {
            phase: phase as i32,
            model: self.model.name.clone(),
            position: queue.map_or(0, |q| q.position),
            queue_length: queue.map_or(0, |q| q.queue_length),
            evictions_requested: queue.is_some_and(|q| q.evictions_requested),
        };
        self.progress.send_if_modified(|cur| {
            let changed = *cur != p;
            *cur = p;
            changed
        });
    }

    fn set_state(&mut self, s: State, detail: &str) {
        use pb::load_progress::Phase;
        let phase = match s {
            State::Ready => Phase::Ready,
            State::Leasing => Phase::Leasing,
            State::Starting => Phase::Starting,
            State::Draining => Phase::Unloading,
            // The next request loads it again.
            State::Unloaded | State::Stopped | State::Failed => Phase::Leasing,
        };
        self.set_progress(phase, None);
        if s != self.state {
            let prev = self.state;
            self.state = s;
            tracing::info!(instance = %self.id, from = ?prev, to = ?s, "{detail}");
            self.emit(pb::InstanceEventKind::StateChanged, prev, detail);
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Acquire { reply, .. } if self.retired => {
                let _ = reply.send(Err(InstanceError::Unavailable(format!(
                    "model {} was replaced to change its settings; retry",
                    self.model.name
                ))));
            }
            Msg::Acquire {
                deadline_ms,
                priority,
                reply,
            } => {
                let priority = priority.unwrap_or(self.settings.priority);
                self.acquire(deadline_ms, priority, reply)
            }
            Msg::Retire(reply) => {
                let idle = matches!(self.state, State::Unloaded | State::Stopped | State::Failed)
                    && self.waiters.is_empty()
                    && self.in_flight == 0
                    && !self.stopping;
                if idle {
                    self.retired = true;
                }
                let _ = reply.send(idle);
            }
            Msg::Done { generation } => {
                if generation == self.generation && self.in_flight > 0 {
                    self.in_flight -= 1;
                    self.last_used_ms = now_ms();
                    if self.in_flight == 0 && self.state == State::Draining {
                        self.begin_stop("drained");
                    }
                }
            }
            Msg::LoadDone(r) => self.load_done(r),
            Msg::Exited(exit) => self.exited(exit),
            Msg::StopDone => self.stop_done(),
            Msg::Unload {
                drain_timeout_ms,
                force,
                reason,
                reply,
            } => {
                let loaded = matches!(
                    self.state,
                    State::Ready | State::Draining | State::Leasing | State::Starting
                );
                if let Some(r) = reply {
                    if loaded || self.stopping {
                        self.unload_replies.push(r);
                    } else {
                        let _ = r.send(false);
                    }
                }
                if loaded {
                    let timeout = if drain_timeout_ms == 0 {
                        self.shared.cfg.drain_timeout_ms
                    } else {
                        drain_timeout_ms
                    };
                    self.drain(now_ms() + if force { 0 } else { timeout }, &reason);
                }
            }
            Msg::Evict {
                lease_id,
                deadline_ms,
            } => {
                if self.lease.as_ref().is_some_and(|l| l.id == lease_id) {
                    self.evict_by_ms = Some(deadline_ms);
                    self.emit(
                        pb::InstanceEventKind::EvictionNotice,
                        self.state,
                        "eviction notice",
                    );
                    if self.state == State::Ready && !self.idle_now() {
                        // Busy: the notice may have been for an idle lease (one of equal
                        // priority may only take idle memory). Tell the scheduler we are busy;
                        // its answer says whether the notice still stands.
                        self.notice_check_after = Some(self.renew_seq);
                        self.reported = None;
                    } else {
                        self.honour_notice(deadline_ms);
                    }
                }
            }
            Msg::Reattached(lease_id) => {
                // The instance let the lease go meanwhile (stopped, released): the re-attach
                // brought back a lease nobody holds, so give it back at once.
                if self.lease.as_ref().is_none_or(|l| l.id != lease_id) {
                    let shared = self.shared.clone();
                    let id = self.id.clone();
                    tokio::spawn(async move { release_lease(&shared, &id, lease_id).await });
                }
            }
            Msg::EvictionWithdrawn { lease_id } => {
                // Only a drain the notice caused is called off: not an unload someone asked
                // for, not a stop already under way.
                if self.lease.as_ref().is_some_and(|l| l.id == lease_id) {
                    self.notice_check_after = None;
                }
                if self.lease.as_ref().is_some_and(|l| l.id == lease_id)
                    && self.unload_replies.is_empty()
                    && !self.stopping
                    && self.evict_by_ms.take().is_some()
                {
                    match self.state {
                        State::Draining => {
                            self.drain_deadline_ms = None;
                            self.set_state(State::Ready, "eviction notice withdrawn");
                            for w in std::mem::take(&mut self.waiters) {
                                let t = self.ticket(w.priority);
                                if let Err(Ok(t)) = w.reply.send(Ok(t)) {
                                    drop(t);
                                }
                            }
                        }
                        State::Leasing | State::Starting => self.drain_deadline_ms = None,
                        _ => {}
                    }
                }
            }
            Msg::LeaseLost { lease_id, reason } => {
                if self.lease.as_ref().is_some_and(|l| l.id == lease_id) {
                    tracing::warn!(instance = %self.id, "lease lost: {reason}");
                    // The memory is not ours any more: stop now, nothing to release.
                    self.lease = None;
                    self.drain(now_ms(), &format!("lease lost: {reason}"));
                }
            }
            Msg::Renewed {
                lease_id,
                seq,
                result,
            } => {
                self.renewing = false;
                if result.is_err() {
                    self.reported = None;
                }
                let current = self.lease.as_ref().is_some_and(|l| l.id == lease_id);
                match result {
                    Ok(evict_by) => {
                        if current
                            && let Some(after) = self.notice_check_after
                            && seq > after
                        {
                            self.notice_check_after = None;
                            match evict_by {
                                Some(by) => self.honour_notice(by),
                                None => self.evict_by_ms = None,
                            }
                        }
                    }
                    Err(tonic::Code::NotFound) => {
                        // Never heard of: the scheduler restarted without its snapshot, and this
                        // renewal came before the manager's re-attach. Present the lease again
                        // (restored under its id if it still fits); lost only if that fails.
                        self.reattach(lease_id);
                    }
                    Err(tonic::Code::FailedPrecondition) => {
                        // It ended (expired, revoked, released). LeaseLost ignores it unless it is
                        // the lease held now.
                        self.handle(Msg::LeaseLost {
                            lease_id,
                            reason: "the scheduler no longer knows it".into(),
                        });
                    }
                    Err(code) => {
                        tracing::warn!(instance = %self.id, ?code, "lease renewal failed; retrying")
                    }
                }
            }
            Msg::View(reply) => {
                let _ = reply.send(self.view());
            }
            Msg::LeaseId(reply) => {
                let pids = self
                    .started
                    .as_ref()
                    .and_then(|s| s.process.as_ref())
                    .map(|p| vec![p.pid])
                    .unwrap_or_default();
                let _ = reply.send(self.lease.as_ref().map(|l| HeldLease {
                    id: l.id.clone(),
                    bytes: l.bytes,
                    gpu: l.gpu,
                    priority: self.lease_priority,
                    pids,
                }));
            }
            Msg::Tick => self.tick(),
            Msg::Queued(q) => {
                if self.state == State::Leasing {
                    self.set_progress(pb::load_progress::Phase::Queued, Some(&q));
                }
            }
            Msg::Granted { id, bytes, gpu } => {
                self.lease = Some(Lease { id, bytes, gpu });
                self.reported = None;
                self.next_renew_ms = now_ms() + self.shared.cfg.lease_ttl_ms / 3;
                if self.state == State::Leasing {
                    self.set_state(State::Starting, "lease granted; starting");
                }
            }
        }
    }

    fn ticket(&mut self, priority: i32) -> Ticket {
        if priority > self.lease_priority && self.lease.is_some() {
            // A caller of higher priority uses the model now: protect it as theirs.
            self.lease_priority = priority;
        }
        self.in_flight += 1;
        self.requests_total += 1;
        let started = self.started.as_ref();
        Ticket {
            endpoint: started.map(|s| s.endpoint.clone()).unwrap_or_default(),
            api_key: started.and_then(|s| s.api_key.clone()),
            model_id: self.model.id.clone(),
            served_name: started
                .map(|s| s.served_name.clone())
                .unwrap_or_else(|| self.model.served_name.clone()),
            instance_id: self.id.clone(),
            load_wait_ms: 0,
            abort: self.abort.subscribe(),
            done: Some((self.tx.clone(), self.generation)),
        }
    }

    fn acquire(
        &mut self,
        deadline_ms: u64,
        priority: i32,
        reply: oneshot::Sender<Result<Ticket, InstanceError>>,
    ) {
        let waiter = Waiter {
            deadline_ms,
            priority,
            reply,
        };
        match self.state {
            State::Ready => {
                let t = self.ticket(priority);
                if let Err(Ok(t)) = waiter.reply.send(Ok(t)) {
                    drop(t);
                }
            }
            State::Leasing | State::Starting | State::Draining => self.waiters.push(waiter),
            State::Unloaded | State::Stopped => {
                self.waiters.push(waiter);
                if !self.stopping {
                    self.begin_load();
                }
            }
            State::Failed => {
                self.waiters.push(waiter);
                // Restarted by tick once the backoff has passed.
                if !self.stopping && self.restart_after_ms.is_none_or(|t| t <= now_ms()) {
                    self.begin_load();
                }
            }
        }
    }

    fn begin_load(&mut self) {
        self.generation += 1;
        self.load_began_ms = now_ms();
        self.restart_after_ms = None;
        self.set_state(State::Leasing, "loading on demand");
        let shared = self.shared.clone();
        let backend = self.backend.clone();
        let model = self.model.clone();
        let settings = self.settings.clone();
        let tx = self.tx.clone();
        let deadline = self
            .waiters
            .iter()
            .map(|w| w.deadline_ms)
            .max()
            .unwrap_or(now_ms() + shared.cfg.lease_wait_ms);
        // The memory is leased at the highest priority among the requests that wait for it.
        let priority = self
            .waiters
            .iter()
            .map(|w| w.priority)
            .max()
            .unwrap_or(settings.priority);
        self.lease_priority = priority;
        self.reported = None;
        self.notice_check_after = None;
        let me = self.tx.clone();
        tokio::spawn(async move {
            let r = load(
                &shared,
                backend.as_ref(),
                &model,
                &settings,
                priority,
                deadline,
                &me,
            )
            .await;
            let _ = tx.send(Msg::LoadDone(r));
        });
    }

    fn load_done(&mut self, r: Result<Loaded, InstanceError>) {
        match r {
            Ok(loaded) => {
                // `Granted` came first; if the lease was lost during the start, it stays lost
                // (the pending drain below stops the instance).
                if let (Some(held), Some(l)) = (&mut self.lease, loaded.lease)
                    && held.id == l.id
                {
                    held.bytes = l.bytes;
                }
                self.estimated = loaded.estimated;
                self.measured = loaded.started.measured.map(|m| m.total());
                let now = now_ms();
                self.started_at_ms = Some(self.load_began_ms);
                self.ready_at_ms = Some(now);
                self.last_used_ms = now;
                self.next_renew_ms = now + self.shared.cfg.lease_ttl_ms / 3;
                let (abort, _) = watch::channel(None);
                self.abort = abort;
                // Notice the child's exit the moment it happens.
                if let Some(p) = &loaded.started.process {
                    let mut exit = p.exit.clone();
                    let tx = self.tx.clone();
                    let generation = self.generation;
                    tokio::spawn(async move {
                        loop {
                            if let Some(e) = exit.borrow_and_update().clone() {
                                let _ = tx.send(Msg::Exited(format!("{generation}:{e}")));
                                return;
                            }
                            if exit.changed().await.is_err() {
                                return;
                            }
                        }
                    });
                }
                self.started = Some(loaded.started);
                if self.lease.is_some() && self.measured.is_some() {
                    self.emit(
                        pb::InstanceEventKind::LeaseSettled,
                        self.state,
                        "lease settled to measured size",
                    );
                }
                self.set_state(State::Ready, "ready");
                let wait = now.saturating_sub(self.load_began_ms);
                for w in std::mem::take(&mut self.waiters) {
                    let mut t = self.ticket(w.priority);
                    t.load_wait_ms = wait;
                    if let Err(Ok(t)) = w.reply.send(Ok(t)) {
                        drop(t);
                    }
                }
                // An unload, eviction or lost lease that arrived during the load.
                if let Some(by) = self.drain_deadline_ms.take() {
                    self.drain(by, "drain requested during load");
                }
            }
            Err(e) => {
                // The load released its lease itself.
                self.lease = None;
                self.drain_deadline_ms = None;
                self.evict_by_ms = None;
                self.fail(&e.to_string());
                for w in std::mem::take(&mut self.waiters) {
                    let _ = w.reply.send(Err(e.clone()));
                }
                for r in std::mem::take(&mut self.unload_replies) {
                    let _ = r.send(false);
                }
            }
        }
    }

    fn fail(&mut self, why: &str) {
        self.crash_count += 1;
        self.consecutive_crashes += 1;
        self.last_error = why.to_string();
        self.last_error_at_ms = Some(now_ms());
        let cfg = &self.shared.cfg;
        let backoff = cfg
            .backoff_ms
            .saturating_mul(1 << (self.consecutive_crashes.saturating_sub(1)).min(16))
            .min(cfg.max_backoff_ms);
        self.restart_after_ms = Some(now_ms() + backoff);
        self.set_state(State::Failed, why);
    }

    fn exited(&mut self, msg: String) {
        let (generation, exit) = msg.split_once(':').unwrap_or(("0", &msg));
        if generation.parse::<u64>().ok() != Some(self.generation) || self.stopping {
            return;
        }
        // Unexpected: a crash.
        let tail = self
            .started
            .as_ref()
            .and_then(|s| s.process.as_ref().map(|p| p.tail.last(5)))
            .unwrap_or_default();
        let why = format!("the backend process crashed ({exit}); last output:\n{tail}");
        let _ = self.abort.send(Some(format!(
            "the backend process for {} crashed ({exit})",
            self.model.name
        )));
        self.emit(pb::InstanceEventKind::Crashed, self.state, exit);
        let ready_for = now_ms().saturating_sub(self.ready_at_ms.unwrap_or(0));
        if ready_for > 30_000 {
            self.consecutive_crashes = 0;
        }
        self.fail(&why);
        self.started = None;
        self.in_flight = 0;
        self.generation += 1;
        // Release the lease now (the process is gone).
        self.stopping = true;
        let shared = self.shared.clone();
        let lease = self.lease.take();
        let tx = self.tx.clone();
        let id = self.id.clone();
        tokio::spawn(async move {
            if let Some(l) = lease {
                release_lease(&shared, &id, l.id).await;
            }
            let _ = tx.send(Msg::StopDone);
        });
    }

    /// Stop taking new work; stop once in-flight requests finish or `by_ms` passes.
    fn drain(&mut self, by_ms: u64, reason: &str) {
        match self.state {
            State::Ready => {
                self.drain_deadline_ms = Some(by_ms);
                self.set_state(State::Draining, reason);
                if self.in_flight == 0 || by_ms <= now_ms() {
                    self.begin_stop(reason);
                }
            }
            State::Draining => {
                self.drain_deadline_ms =
                    Some(self.drain_deadline_ms.map_or(by_ms, |d| d.min(by_ms)));
                if by_ms <= now_ms() {
                    self.begin_stop(reason);
                }
            }
            // A load in flight finishes first; then it is drained by the next tick.
            State::Leasing | State::Starting => self.drain_deadline_ms = Some(by_ms),
            _ => {}
        }
    }

    fn begin_stop(&mut self, reason: &str) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        if self.in_flight > 0 {
            let _ = self.abort.send(Some(format!(
                "model {} was unloaded ({reason}) while this request ran",
                self.model.name
            )));
        }
        self.in_flight = 0;
        self.generation += 1;
        let started = self.started.take();
        let lease = self.lease.take();
        let shared = self.shared.clone();
        let backend = self.backend.clone();
        let tx = self.tx.clone();
        let id = self.id.clone();
        tracing::info!(instance = %self.id, "stopping: {reason}");
        tokio::spawn(async move {
            if let Some(s) = started {
                backend
                    .stop(&s, Duration::from_millis(shared.cfg.stop_grace_ms))
                    .await;
            }
            // Only after the process has exited.
            if let Some(l) = lease {
                release_lease(&shared, &id, l.id).await;
            }
            let _ = tx.send(Msg::StopDone);
        });
    }

    fn stop_done(&mut self) {
        self.stopping = false;
        self.started_at_ms = None;
        self.ready_at_ms = None;
        self.drain_deadline_ms = None;
        self.evict_by_ms = None;
        if self.state != State::Failed {
            self.set_state(State::Stopped, "stopped");
        }
        for r in std::mem::take(&mut self.unload_replies) {
            let _ = r.send(true);
        }
        // Requests that arrived during the unload: load again for them.
        if !self.waiters.is_empty() && self.state != State::Failed {
            self.begin_load();
        }
    }

    fn tick(&mut self) {
        let now = now_ms();
        // Waiters whose deadline passed have given up (their receiver is gone).
        self.waiters.retain(|w| !w.reply.is_closed());
        match self.state {
            State::Ready => {
                if let Some(by) = self.drain_deadline_ms {
                    // A drain requested while loading.
                    self.drain(by, "drain requested during load");
                } else if self.in_flight == 0
                    && self.settings.idle_ttl_ms > 0
                    && now.saturating_sub(self.last_used_ms) >= self.settings.idle_ttl_ms
                {
                    self.drain(now, "idle ttl");
                }
            }
            State::Draining if self.drain_deadline_ms.is_some_and(|d| d <= now) => {
                self.begin_stop("drain deadline");
            }
            State::Failed
                if !self.waiters.is_empty()
                    && !self.stopping
                    && self.restart_after_ms.is_none_or(|t| t <= now) =>
            {
                self.begin_load();
            }
            _ => {}
        }
        if now >= self.next_renew_ms {
            self.renew();
        }
    }

    /// Idle as the scheduler should see it: nothing in flight and nobody waiting, or draining
    /// (going away anyway: a busy report must not call off the drain's notice).
    fn idle_now(&self) -> bool {
        match self.state {
            State::Ready => self.in_flight == 0 && self.waiters.is_empty(),
            State::Draining => true,
            _ => false,
        }
    }

    /// Tell the scheduler at once when the lease turns idle or busy or its priority rises: an idle
    /// lease yields to a request of equal priority, a busy one does not.
    fn report_changes(&mut self) {
        if self.reported != Some((self.idle_now(), self.lease_priority)) {
            self.renew();
        }
    }

    /// Renew the lease now (one renewal at a time; a change seen meanwhile is sent after it).
    fn renew(&mut self) {
        let Some(l) = &self.lease else { return };
        if self.renewing || !matches!(self.state, State::Starting | State::Ready | State::Draining)
        {
            return;
        }
        self.renewing = true;
        self.renew_seq += 1;
        self.next_renew_ms = now_ms() + self.shared.cfg.lease_ttl_ms / 3;
        let idle = self.idle_now();
        self.reported = Some((idle, self.lease_priority));
        let mut c = self.shared.scheduler.clone();
        let req = pb::RenewLeaseRequest {
            lease_id: l.id.clone(),
            ttl_ms: 0,
            pids: self
                .started
                .as_ref()
                .and_then(|s| s.process.as_ref())
                .map(|p| vec![p.pid])
                .unwrap_or_default(),
            idle,
            priority: Some(self.lease_priority),
        };
        let tx = self.tx.clone();
        let lease_id = l.id.clone();
        let seq = self.renew_seq;
        tokio::spawn(async move {
            let r = tokio::time::timeout(Duration::from_secs(5), c.renew_lease(req)).await;
            let result = match r {
                Ok(Ok(l)) => Ok(l.into_inner().evict_by_ms),
                Ok(Err(s)) => Err(s.code()),
                Err(_) => Err(tonic::Code::DeadlineExceeded),
            };
            let _ = tx.send(Msg::Renewed {
                lease_id,
                seq,
                result,
            });
        });
    }

    /// An eviction notice that stands: drain and release before the scheduler's deadline.
    fn honour_notice(&mut self, deadline_ms: u64) {
        self.evict_by_ms = Some(deadline_ms);
        // Leave time to stop the process (SIGTERM, then SIGKILL after the grace) and release
        // before the scheduler's deadline.
        let margin = self.shared.cfg.stop_grace_ms + 1_000;
        let by = deadline_ms.saturating_sub(margin).max(now_ms());
        self.drain(by, "eviction notice");
    }

    /// Re-attach the lease held now (`lease_id`) on its own; a lease the scheduler reports lost
    /// stops the instance. Transient failures are left to the next renewal.
    fn reattach(&mut self, lease_id: String) {
        let Some(l) = self.lease.as_ref().filter(|l| l.id == lease_id) else {
            return;
        };
        let holder = self.shared.cfg.holder.clone();
        let lease = pb::Lease {
            id: l.id.clone(),
            holder: holder.clone(),
            label: self.model.name.clone(),
            gpu_index: l.gpu,
            bytes: l.bytes,
            priority: self.lease_priority,
            ttl_ms: self.shared.cfg.lease_ttl_ms,
            pids: self
                .started
                .as_ref()
                .and_then(|s| s.process.as_ref())
                .map(|p| vec![p.pid])
                .unwrap_or_default(),
            ..Default::default()
        };
        let mut c = self.shared.scheduler.clone();
        let tx = self.tx.clone();
        let id = self.id.clone();
        tokio::spawn(async move {
            match c
                .reattach(pb::ReattachRequest {
                    holder,
                    leases: vec![lease],
                })
                .await
            {
                Ok(r) => {
                    let r = r.into_inner();
                    for lost in r.lost {
                        let _ = tx.send(Msg::LeaseLost {
                            lease_id: lost.lease_id,
                            reason: lost.reason,
                        });
                    }
                    for l in r.confirmed.into_iter().chain(r.restored) {
                        let _ = tx.send(Msg::Reattached(l.id));
                    }
                }
                Err(e) => tracing::warn!(instance = %id, "re-attach failed: {}", e.message()),
            }
        });
    }

    fn view(&self) -> pb::BackendInstance {
        let s = &self.settings;
        let started = self.started.as_ref();
        let unload_at = (self.state == State::Ready && self.in_flight == 0 && s.idle_ttl_ms > 0)
            .then(|| self.last_used_ms + s.idle_ttl_ms);
        pb::BackendInstance {
            id: self.id.clone(),
            model_id: self.model.id.clone(),
            model_name: self.model.name.clone(),
            backend: self.backend.kind() as i32,
            state: state_pb(self.state, self.in_flight) as i32,
            settings: Some(pb::InstanceSettings {
                context: Some(s.context as i64),
                parallel: Some(s.parallel as i32),
                cache_type: Some(match s.cache_type {
                    "q8_0" => pb::KvCacheType::Q80,
                    "q4_0" => pb::KvCacheType::Q40,
                    _ => pb::KvCacheType::F16,
                } as i32),
                gpu_layers: s.gpu_layers,
                embeddings: Some(s.embeddings),
                flash_attention: s.flash_attention,
                priority: Some(s.priority),
                gpu_index: s.gpu_index,
                idle_ttl_ms: Some(s.idle_ttl_ms),
            }),
            lease_id: self
                .lease
                .as_ref()
                .map(|l| l.id.clone())
                .unwrap_or_default(),
            gpu_index: self.lease.as_ref().map(|l| l.gpu),
            lease_bytes: self.lease.as_ref().map_or(0, |l| l.bytes),
            estimated_bytes: self.estimated,
            measured_bytes: self.measured,
            evict_by_ms: self.evict_by_ms,
            port: started.map_or(0, |s| u32::from(s.port)),
            pid: started
                .and_then(|s| s.process.as_ref())
                .map_or(0, |p| p.pid),
            endpoint: started.map(|s| s.endpoint.clone()).unwrap_or_default(),
            in_flight: self.in_flight,
            waiting: self.waiters.len() as u32,
            requests_total: self.requests_total,
            last_used_ms: self.last_used_ms,
            idle_ttl_ms: s.idle_ttl_ms,
            unload_at_ms: unload_at,
            started_at_ms: self.started_at_ms,
            ready_at_ms: self.ready_at_ms,
            crash_count: self.crash_count,
            last_error: self.last_error.clone(),
            last_error_at_ms: self.last_error_at_ms,
            restart_after_ms: if self.state == State::Failed {
                self.restart_after_ms
            } else {
                None
            },
            load_progress: (!self.waiters.is_empty()).then(|| self.progress.borrow().clone()),
        }
    }
}

fn status_err(what: &str, s: tonic::Status) -> InstanceError {
    if s.code() == tonic::Code::InvalidArgument && s.message().contains("can never fit") {
        return InstanceError::ResourceExhausted(format!("{what}: {}", s.message()));
    }
    match s.code() {
        tonic::Code::NotFound => InstanceError::NotFound(format!("{what}: {}", s.message())),
        tonic::Code::InvalidArgument => {
            InstanceError::InvalidArgument(format!("{what}: {}", s.message()))
        }
        tonic::Code::FailedPrecondition => {
            InstanceError::FailedPrecondition(format!("{what}: {}", s.message()))
        }
        tonic::Code::ResourceExhausted => {
            InstanceError::ResourceExhausted(format!("{what}: {}", s.message()))
        }
        tonic::Code::DeadlineExceeded => InstanceError::ResourceExhausted(format!(
            "{what}: no GPU memory became free before the deadline ({})",
            s.message()
        )),
        _ => InstanceError::Unavailable(format!("{what}: {}", s.message())),
    }
}

/// Estimate → lease → start → settle. On any failure after the grant, the lease is released.
async fn load(
    shared: &Shared,
    backend: &dyn Backend,
    model: &ModelRef,
    s: &Effective,
    priority: i32,
    deadline_ms: u64,
    me: &mpsc::UnboundedSender<Msg>,
) -> Result<Loaded, InstanceError> {
    let mut registry = shared.registry.clone();
    let est = registry
        .estimate(pb::EstimateRequest {
            model: model.id.clone(),
            context: s.context as i64,
            parallel: s.parallel as i32,
            cache_type: match s.cache_type {
                "q8_0" => pb::KvCacheType::Q80,
                "q4_0" => pb::KvCacheType::Q40,
                _ => pb::KvCacheType::F16,
            } as i32,
            gpu_layers: s.gpu_layers,
        })
        .await
        .map_err(|e| status_err("registry estimate", e))?
        .into_inner();
    let bytes = est.gpu_bytes.max(est.total_bytes.min(1 << 20)).max(1);
    let mut sched = shared.scheduler.clone();
    let wait_ms = deadline_ms
        .saturating_sub(now_ms())
        .min(shared.cfg.lease_wait_ms);
    let mut stream = sched
        .acquire_lease(pb::AcquireLeaseRequest {
            holder: shared.cfg.holder.clone(),
            bytes,
            priority,
            gpu_index: s.gpu_index,
            ttl_ms: shared.cfg.lease_ttl_ms,
            wait_ms,
            label: model.name.clone(),
        })
        .await
        .map_err(|e| status_err("scheduler lease", e))?
        .into_inner();
    let mut granted = None;
    while let Some(u) = stream.next().await {
        match u
            .map_err(|e| status_err(&format!("lease for {bytes} bytes"), e))?
            .update
        {
            Some(pb::acquire_lease_update::Update::Granted(l)) => {
                granted = Some(l);
                break;
            }
            Some(pb::acquire_lease_update::Update::Queued(p)) => {
                tracing::info!(model = %model.name, position = p.position, "waiting for GPU memory");
                let _ = me.send(Msg::Queued(p));
            }
            None => {}
        }
    }
    let lease = granted
        .ok_or_else(|| InstanceError::Unavailable("the scheduler ended the lease stream".into()))?;
    let release = |id: String| {
        let mut c = shared.scheduler.clone();
        async move {
            let _ = c
                .release_lease(pb::ReleaseLeaseRequest { lease_id: id })
                .await;
        }
    };
    let _ = me.send(Msg::Granted {
        id: lease.id.clone(),
        bytes: lease.bytes,
        gpu: lease.gpu_index,
    });
    // Simulated GPU: run on the CPU. The total is for engines that take a fraction of the GPU.
    // If the scheduler cannot say, do not guess (a wrong guess would run a GPU lease on the CPU):
    // give the lease back and fail the load.
    let gpu = match sched.get_status(pb::GetStatusRequest {}).await {
        Ok(st) => st
            .into_inner()
            .gpus
            .into_iter()
            .find(|g| g.index == lease.gpu_index),
        Err(e) => {
            release(lease.id.clone()).await;
            return Err(status_err("scheduler status", e));
        }
    };
    let Some(gpu) = gpu else {
        release(lease.id.clone()).await;
        return Err(InstanceError::Unavailable(format!(
            "the scheduler granted GPU {} but does not list it",
            lease.gpu_index
        )));
    };
    let (simulated, gpu_total) = (gpu.simulated, gpu.total_bytes);
    let left = Duration::from_millis(deadline_ms.saturating_sub(now_ms()));
    let spec = StartSpec {
        model_path: model.path.clone(),
        alias: model.served_name.clone(),
        context: s.context,
        parallel: s.parallel,
        cache_type: s.cache_type,
        gpu_layers: s.gpu_layers,
        embeddings: s.embeddings,
        flash_attention: s.flash_attention,
        gpu: (!simulated).then_some(lease.gpu_index),
        lease_bytes: lease.bytes,
        gpu_total,
        start_timeout: Duration::from_millis(shared.cfg.start_timeout_ms)
            .min(left.max(Duration::from_secs(1))),
    };
    let started = match backend.start(&spec).await {
        Ok(s) => s,
        Err(e) => {
            release(lease.id.clone()).await;
            return Err(InstanceError::Unavailable(format!(
                "{} could not start model {}: {e}",
                backend.name(),
                model.name
            )));
        }
    };
    let mut lease_bytes = lease.bytes;
    if let Some(m) = started.measured {
        settle(shared, backend, model, s, &lease.id, &mut lease_bytes, m).await;
    }
    Ok(Loaded {
        started,
        lease: Some(Lease {
            id: lease.id,
            bytes: lease_bytes,
            gpu: lease.gpu_index,
        }),
        estimated: bytes,
    })
}

/// Resize the lease to what the engine allocated and tell the registry.
async fn settle(
    shared: &Shared,
    backend: &dyn Backend,
    model: &ModelRef,
    s: &Effective,
    lease_id: &str,
    lease_bytes: &mut u64,
    m: Measured,
) {
    let measured = m.total().max(1);
    let mut sched = shared.scheduler.clone();
    match sched
        .resize_lease(pb::ResizeLeaseRequest {
            lease_id: lease_id.to_string(),
            bytes: measured,
        })
        .await
    {
        Ok(l) => *lease_bytes = l.into_inner().bytes,
        Err(e) => {
            tracing::warn!(model = %model.name, "could not settle the lease to {measured} bytes: {}", e.message())
        }
    }
    let mut registry = shared.registry.clone();
    let r = registry
        .record_measurement(pb::RecordMeasurementRequest {
            model: model.id.clone(),
            context: s.context as i64,
            parallel: s.parallel as i32,
            cache_type: match s.cache_type {
                "q8_0" => pb::KvCacheType::Q80,
                "q4_0" => pb::KvCacheType::Q40,
                _ => pb::KvCacheType::F16,
            } as i32,
            gpu_layers: s.gpu_layers,
            weights_gpu_bytes: None,
            weights_host_bytes: None,
            // One total (Ollama): the GPU memory used; the registry keeps its own terms.
            kv_cache_bytes: (!m.total_only).then_some(m.kv),
            kv_cache_gpu_bytes: None,
            compute_buffer_bytes: (!m.total_only).then_some(m.compute + m.output),
            gpu_used_bytes: m.total_only.then_some(m.total()),
            source: backend.name().to_string(),
        })
        .await;
    if let Err(e) = r {
        tracing::debug!("could not record the measurement: {}", e.message());
    }
}

/// Give a lease back. A lease the scheduler no longer knows is already free; any other failure
/// is logged: the lease then ends by its TTL.
async fn release_lease(shared: &Shared, instance: &str, lease_id: String) {
    let mut c = shared.scheduler.clone();
    match c
        .release_lease(pb::ReleaseLeaseRequest {
            lease_id: lease_id.clone(),
        })
        .await
    {
        Ok(_) => tracing::debug!(%instance, lease = %lease_id, "lease released"),
        Err(s) if s.code() == tonic::Code::NotFound => {
            tracing::debug!(%instance, lease = %lease_id, "lease already gone")
        }
        Err(s) => tracing::warn!(
            %instance,
            lease = %lease_id,
            "could not release the lease ({}); it ends by its TTL",
            s.message()
        ),
    }
}
