//! One actor per model instance. The decisions are [`crate::lifecycle`]'s (a pure state machine:
//! `step(state, event, now) → (state, actions)`); this actor only performs them and turns what
//! happens (replies, task results, the child's exit, the timer) back into events.
//!
//! - **Commands** from [`InstanceHandle`]s arrive on a bounded channel ([`COMMAND_QUEUE`]): a
//!   caller waits for room (an acquire within its deadline), it is never dropped silently.
//! - **Reports** from the actor's own tasks (lease, start, stop, renewals) and from its tickets
//!   come on a second channel, unbounded but bounded in practice by the work the actor itself
//!   started (one message per task, one per ticket).
//! - **Long steps** (lease, start, stop) run in tasks that report back, so the actor always
//!   answers; a request during an unload waits and triggers the reload (no lock is held across
//!   the stop).
//! - **The child** ([`Started`]) lives here, not in the state machine; the machine knows which
//!   generation runs. Each ticket and each exit watcher carries its generation as a typed field.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use securellm_common::internal_auth::AuthChannel;
use securellm_common::time::now_ms;
use securellm_proto::v1 as pb;
use securellm_proto::v1::model_registry_client::ModelRegistryClient;
use securellm_proto::v1::vram_scheduler_client::VramSchedulerClient;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_stream::StreamExt;
use tracing::Instrument;

use crate::backend::{Backend, Backends, Measured, StartSpec, Started};
use crate::config::{BackendConfig, Effective};
use crate::lifecycle::{Action, Event, LeaseInfo, Lifecycle, Params, Renewal};

/// How many commands may wait for an instance actor before senders wait for room.
pub const COMMAND_QUEUE: usize = 256;

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
    /// No model by that reference in the registry (reason `MODEL_NOT_FOUND` on the wire).
    #[error("{0}")]
    ModelNotFound(String),
}

impl InstanceError {
    /// A short, closed name of the error's kind (`error.type` on spans).
    pub fn kind(&self) -> &'static str {
        match self {
            InstanceError::Unavailable(_) => "unavailable",
            InstanceError::ResourceExhausted(_) => "resource_exhausted",
            InstanceError::DeadlineExceeded(_) => "deadline_exceeded",
            InstanceError::Aborted(_) => "aborted",
            InstanceError::InvalidArgument(_) => "invalid_argument",
            InstanceError::FailedPrecondition(_) => "failed_precondition",
            InstanceError::NotFound(_) => "not_found",
            InstanceError::ModelNotFound(_) => "model_not_found",
        }
    }
}

/// Permission to send one request to the upstream. Dropping it ends the request's accounting.
pub struct Ticket {
    pub endpoint: String,
    /// The engine's per-instance API key, sent with the request (never logged).
    pub api_key: Option<Arc<str>>,
    pub model_id: String,
    /// The model's name as the registry knows it (the `model` label of metrics).
    pub model_name: String,
    pub served_name: String,
    pub instance_id: String,
    pub load_wait_ms: u64,
    /// Becomes `Some(reason)` when the request must be aborted (crash, eviction deadline).
    pub abort: watch::Receiver<Option<String>>,
    done: Option<(mpsc::UnboundedSender<Report>, u64)>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some((tx, generation)) = self.done.take() {
            let _ = tx.send(Report::Event(Event::Done { generation }));
        }
    }
}

/// What a handle asks of the actor.
enum Command {
    Acquire {
        deadline_ms: u64,
        priority: Option<i32>,
        reply: oneshot::Sender<Result<Ticket, InstanceError>>,
        /// The caller's span: a load this request causes is traced under it.
        span: tracing::Span,
    },
    Unload {
        drain_timeout_ms: u64,
        force: bool,
        reply: oneshot::Sender<bool>,
        /// The life cycle's words for it (`unload requested`, `shutdown`).
        reason: &'static str,
    },
    Evict {
        lease_id: String,
        deadline_ms: u64,
    },
    EvictionWithdrawn {
        lease_id: String,
    },
    LeaseLost {
        lease_id: String,
        reason: String,
    },
    View(oneshot::Sender<pb::BackendInstance>),
    Lease(oneshot::Sender<Option<HeldLease>>),
    /// Retire if idle and unloaded (answers whether it did): later acquires are refused so the
    /// manager can replace this instance with one of other settings.
    Retire(oneshot::Sender<bool>),
}

/// What the actor's own tasks and tickets report.
enum Report {
    Event(Event),
    /// The start task of `generation` ended: the child (and the settled lease size), or why not.
    Started {
        generation: u64,
        lease_id: String,
        result: Result<(Started, u64), InstanceError>,
    },
    /// The child of `generation` exited.
    Exited {
        generation: u64,
        exit: String,
    },
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
    tx: mpsc::Sender<Command>,
    progress: watch::Receiver<pb::LoadProgress>,
}

impl InstanceHandle {
    /// Get a ticket: at once if ready, else after the (single) load, within `deadline_ms`.
    /// `priority` is the caller's (None: the model's); a load it triggers leases memory at that
    /// priority, and a loaded instance it uses is raised to it. A full command queue makes the
    /// caller wait for room, within the same deadline.
    pub async fn acquire(
        &self,
        deadline_ms: u64,
        priority: Option<i32>,
    ) -> Result<Ticket, InstanceError> {
        let (reply, rx) = oneshot::channel();
        let wait = Duration::from_millis(deadline_ms.saturating_sub(now_ms()));
        let asked = async {
            self.tx
                .send(Command::Acquire {
                    deadline_ms,
                    priority,
                    reply,
                    span: tracing::Span::current(),
                })
                .await
                .map_err(|_| {
                    InstanceError::Unavailable("the backend manager is shutting down".into())
                })?;
            match rx.await {
                Ok(r) => r,
                Err(_) => Err(InstanceError::Unavailable("the instance stopped".into())),
            }
        };
        match tokio::time::timeout(wait, asked).await {
            Ok(r) => r,
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
        let _ = self.tx.send(Command::Retire(reply)).await;
        rx.await.unwrap_or(true)
    }

    /// Unload; resolves to whether it was loaded, after the lease was released.
    pub async fn unload(&self, drain_timeout_ms: u64, force: bool) -> bool {
        self.unload_because(drain_timeout_ms, force, "unload requested")
            .await
    }

    /// [`Self::unload`] because the manager shuts down.
    pub async fn shutdown(&self, drain_timeout_ms: u64) -> bool {
        self.unload_because(drain_timeout_ms, false, "shutdown")
            .await
    }

    async fn unload_because(
        &self,
        drain_timeout_ms: u64,
        force: bool,
        reason: &'static str,
    ) -> bool {
        let (reply, rx) = oneshot::channel();
        let _ = self
            .tx
            .send(Command::Unload {
                drain_timeout_ms,
                force,
                reply,
                reason,
            })
            .await;
        rx.await.unwrap_or(false)
    }

    pub async fn evict(&self, lease_id: String, deadline_ms: u64) {
        let _ = self
            .tx
            .send(Command::Evict {
                lease_id,
                deadline_ms,
            })
            .await;
    }

    pub async fn eviction_withdrawn(&self, lease_id: String) {
        let _ = self.tx.send(Command::EvictionWithdrawn { lease_id }).await;
    }

    pub async fn lease_lost(&self, lease_id: String, reason: String) {
        let _ = self.tx.send(Command::LeaseLost { lease_id, reason }).await;
    }

    pub async fn view(&self) -> Option<pb::BackendInstance> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::View(tx)).await.ok()?;
        rx.await.ok()
    }

    /// The lease held now.
    pub async fn lease(&self) -> Option<HeldLease> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::Lease(tx)).await.ok()?;
        rx.await.ok().flatten()
    }
}

/// The actor: the state machine and the I/O handles it cannot hold (replies, the child, watch
/// channels).
struct Actor {
    id: String,
    model: ModelRef,
    backend: Arc<dyn Backend>,
    settings: Effective,
    shared: Arc<Shared>,
    life: Lifecycle,
    /// Where tasks and tickets report.
    me: mpsc::UnboundedSender<Report>,
    next_reply: u64,
    /// Waiting requests: the reply, and the caller's span (a load is traced under the newest
    /// waiter's; held only while the request waits).
    waiters: HashMap<
        u64,
        (
            oneshot::Sender<Result<Ticket, InstanceError>>,
            tracing::Span,
        ),
    >,
    unloads: HashMap<u64, oneshot::Sender<bool>>,
    retire: Option<oneshot::Sender<bool>>,
    /// The child serving now (generation `life.child`).
    started: Option<Started>,
    /// A child whose start succeeded, until the machine adopts or discards it.
    pending: Option<(u64, Started)>,
    abort: watch::Sender<Option<String>>,
    /// What waiting requests are told (see [`InstanceHandle::progress`]).
    progress: watch::Sender<pb::LoadProgress>,
    /// The span of the request that started the load under way (until its child is started or
    /// the load ends).
    load_cause: tracing::Span,
    /// Why the instance was last asked to go (an unload, an eviction notice, a lost lease), for
    /// an unload whose drain does not say (`unloads_total{reason}`).
    asked_to_go: Option<&'static str>,
    /// The reason of the drain under way.
    drain_reason: Option<&'static str>,
}

/// Start an instance actor.
pub fn spawn(
    id: String,
    model: ModelRef,
    settings: Effective,
    backend: Arc<dyn Backend>,
    shared: Arc<Shared>,
) -> InstanceHandle {
    let (tx, commands) = mpsc::channel(COMMAND_QUEUE);
    let (me, reports) = mpsc::unbounded_channel();
    let (abort, _) = watch::channel(None);
    let (progress, progress_rx) = watch::channel(pb::LoadProgress {
        phase: pb::load_progress::Phase::Leasing as i32,
        model: model.name.clone(),
        ..Default::default()
    });
    let cfg = &shared.cfg;
    let params = Params {
        model: model.name.clone(),
        priority: settings.priority,
        idle_ttl_ms: settings.idle_ttl_ms,
        lease_ttl_ms: cfg.lease_ttl_ms,
        lease_wait_ms: cfg.lease_wait_ms,
        drain_timeout_ms: cfg.drain_timeout_ms,
        stop_grace_ms: cfg.stop_grace_ms,
        backoff_ms: cfg.backoff_ms,
        max_backoff_ms: cfg.max_backoff_ms,
    };
    let actor = Actor {
        id: id.clone(),
        model: model.clone(),
        backend,
        settings: settings.clone(),
        shared,
        life: Lifecycle::new(params),
        me,
        next_reply: 0,
        waiters: HashMap::new(),
        unloads: HashMap::new(),
        retire: None,
        started: None,
        pending: None,
        abort,
        progress,
        load_cause: tracing::Span::none(),
        asked_to_go: None,
        drain_reason: None,
    };
    tokio::spawn(actor.run(commands, reports));
    InstanceHandle {
        id,
        model,
        settings,
        tx,
        progress: progress_rx,
    }
}

fn cache_type_pb(cache_type: &str) -> pb::KvCacheType {
    match cache_type {
        "q8_0" => pb::KvCacheType::Q80,
        "q4_0" => pb::KvCacheType::Q40,
        _ => pb::KvCacheType::F16,
    }
}

impl Actor {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut reports: mpsc::UnboundedReceiver<Report>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // Reports first: a ticket dropped (or a task finished) before a command was sent
                // is seen before that command, as a caller expects (`Load` drops its ticket, then
                // asks for the view: the instance must no longer count it as busy). Reports are
                // at most one per task or ticket, so commands are never starved.
                biased;
                // Never closed: the actor holds a sender.
                Some(r) = reports.recv() => self.report(r),
                c = commands.recv() => match c {
                    Some(c) => self.command(c),
                    None => break,
                },
                _ = tick.tick() => {
                    // Waiters whose deadline passed have given up (their receiver is gone).
                    let gone: Vec<u64> = self
                        .waiters
                        .iter()
                        .filter(|(_, (r, _))| r.is_closed())
                        .map(|(id, _)| *id)
                        .collect();
                    if !gone.is_empty() {
                        for id in &gone {
                            self.waiters.remove(id);
                        }
                        self.apply(Event::WaitersGone(gone));
                    }
                    self.apply(Event::Tick);
                }
            }
            if self.life.retired {
                // Replaced: nothing to stop or release (it was idle); a late request sees the
                // channel closed and the manager looks the model up again.
                return;
            }
        }
        // Every handle is gone (the manager is going away): stop the backend, release the lease.
        if let Some(s) = self.started.take() {
            crate::metrics::unloaded("shutdown");
            self.backend
                .stop(&s, Duration::from_millis(self.shared.cfg.stop_grace_ms))
                .await;
        }
        if let Some(l) = self.life.lease.take() {
            release_lease(&self.shared, &self.id, l.id).await;
        }
    }

    fn reply_id(&mut self) -> u64 {
        self.next_reply += 1;
        self.next_reply
    }

    fn command(&mut self, c: Command) {
        match c {
            Command::Acquire {
                deadline_ms,
                priority,
                reply,
                span,
            } => {
                let waiter = self.reply_id();
                self.waiters.insert(waiter, (reply, span));
                self.apply(Event::Acquire {
                    waiter,
                    deadline_ms,
                    priority,
                });
            }
            Command::Unload {
                drain_timeout_ms,
                force,
                reply,
                reason,
            } => {
                let id = self.reply_id();
                self.unloads.insert(id, reply);
                self.asked_to_go = crate::metrics::unload_reason(reason);
                self.apply(Event::Unload {
                    reply: Some(id),
                    drain_timeout_ms,
                    force,
                    reason: reason.into(),
                });
            }
            Command::Evict {
                lease_id,
                deadline_ms,
            } => {
                self.asked_to_go = Some("evicted");
                self.apply(Event::EvictionNotice {
                    lease_id,
                    deadline_ms,
                })
            }
            Command::EvictionWithdrawn { lease_id } => {
                self.apply(Event::EvictionWithdrawn { lease_id })
            }
            Command::LeaseLost { lease_id, reason } => {
                self.asked_to_go = Some("lease_lost");
                self.apply(Event::LeaseLost { lease_id, reason })
            }
            Command::View(reply) => {
                let _ = reply.send(self.view(None));
            }
            Command::Lease(reply) => {
                let _ = reply.send(self.life.lease.as_ref().map(|l| HeldLease {
                    id: l.id.clone(),
                    bytes: l.bytes,
                    gpu: l.gpu,
                    priority: self.life.lease_priority,
                    pids: self.pids(),
                }));
            }
            Command::Retire(reply) => {
                self.retire = Some(reply);
                self.apply(Event::Retire);
            }
        }
    }

    fn report(&mut self, r: Report) {
        match r {
            Report::Event(e) => self.apply(e),
            Report::Started {
                generation,
                lease_id,
                result,
            } => match result {
                Ok((started, lease_bytes)) => {
                    let measured = started.measured.map(|m| m.total());
                    if let Some((_, old)) = self.pending.replace((generation, started)) {
                        self.discard(old);
                    }
                    self.apply(Event::ChildReady {
                        generation,
                        lease_id,
                        lease_bytes,
                        measured,
                    });
                }
                Err(error) => self.apply(Event::StartFailed { generation, error }),
            },
            Report::Exited { generation, exit } => {
                let tail = self
                    .started
                    .as_ref()
                    .and_then(|s| s.process.as_ref().map(|p| p.tail.last(5)))
                    .unwrap_or_default();
                self.apply(Event::ChildExited {
                    generation,
                    exit,
                    tail,
                });
            }
        }
    }

    /// One step of the state machine, then its actions.
    fn apply(&mut self, e: Event) {
        let actions = self.life.apply(e, now_ms());
        for a in actions {
            self.perform(a);
        }
        // A span is exported when it closes: hold the causing request's only while its load
        // runs (the load's own spans keep their parent as long as they need it).
        if !matches!(
            self.life.state,
            crate::lifecycle::State::Leasing | crate::lifecycle::State::Starting
        ) {
            self.load_cause = tracing::Span::none();
        }
    }

    fn pids(&self) -> Vec<u32> {
        self.started
            .as_ref()
            .and_then(|s| s.process.as_ref())
            .map(|p| vec![p.pid])
            .unwrap_or_default()
    }

    /// Stop a child nobody uses (in the background).
    fn discard(&self, s: Started) {
        let backend = self.backend.clone();
        let grace = Duration::from_millis(self.shared.cfg.stop_grace_ms);
        tokio::spawn(async move { backend.stop(&s, grace).await });
    }

    fn perform(&mut self, a: Action) {
        match a {
            Action::AcquireLease {
                generation,
                priority,
                deadline_ms,
            } => {
                let shared = self.shared.clone();
                let model = self.model.clone();
                let settings = self.settings.clone();
                let me = self.me.clone();
                // The load is traced under the request that caused it, so the registry's estimate
                // and the scheduler's acquire land in that request's trace.
                self.load_cause = self
                    .waiters
                    .iter()
                    .max_by_key(|(id, _)| **id)
                    .map_or_else(tracing::Span::none, |(_, (_, span))| span.clone());
                let span = tracing::info_span!(
                    parent: &self.load_cause,
                    "backend.lease_wait",
                    otel.name = "backend.lease_wait",
                    gen_ai.request.model = %model.name,
                    backend.instance = %self.id,
                    backend.lease.priority = priority,
                    backend.lease.bytes = tracing::field::Empty,
                    backend.lease.gpu = tracing::field::Empty,
                    backend.lease.queue_position = tracing::field::Empty,
                    backend.lease.queue_length = tracing::field::Empty,
                    error.type = tracing::field::Empty,
                );
                let task = async move {
                    let e = match lease(
                        &shared,
                        &model,
                        &settings,
                        priority,
                        deadline_ms,
                        &me,
                        generation,
                    )
                    .await
                    {
                        Ok((lease, estimated)) => {
                            let span = tracing::Span::current();
                            span.record("backend.lease.bytes", lease.bytes);
                            span.record("backend.lease.gpu", lease.gpu);
                            Event::LeaseGranted {
                                generation,
                                lease,
                                estimated,
                            }
                        }
                        Err(error) => {
                            tracing::Span::current().record("error.type", error.kind());
                            crate::metrics::load_done(&model.name, false, Duration::ZERO);
                            Event::LeaseRefused { generation, error }
                        }
                    };
                    let _ = me.send(Report::Event(e));
                };
                tokio::spawn(task.instrument(span));
            }
            Action::StartChild {
                generation,
                lease,
                deadline_ms,
            } => {
                let shared = self.shared.clone();
                let backend = self.backend.clone();
                let model = self.model.clone();
                let settings = self.settings.clone();
                let me = self.me.clone();
                let id = self.id.clone();
                let span = tracing::info_span!(
                    parent: &self.load_cause,
                    "backend.load",
                    otel.name = "backend.load",
                    gen_ai.request.model = %model.name,
                    backend.instance = %self.id,
                    backend.engine = backend.name(),
                    backend.lease.bytes = lease.bytes,
                    backend.lease.gpu = lease.gpu,
                    backend.pid = tracing::field::Empty,
                    error.type = tracing::field::Empty,
                );
                let task = async move {
                    let began = std::time::Instant::now();
                    let result = start(
                        &shared,
                        backend.as_ref(),
                        &model,
                        &settings,
                        &lease,
                        deadline_ms,
                    )
                    .await;
                    crate::metrics::load_done(&model.name, result.is_ok(), began.elapsed());
                    let span = tracing::Span::current();
                    match &result {
                        Ok((s, _)) => {
                            if let Some(p) = &s.process {
                                span.record("backend.pid", p.pid);
                            }
                        }
                        Err(e) => {
                            span.record("error.type", e.kind());
                        }
                    }
                    if result.is_err() {
                        // Nothing runs: the lease goes back before anyone hears of the failure.
                        release_lease(&shared, &id, lease.id.clone()).await;
                    }
                    let _ = me.send(Report::Started {
                        generation,
                        lease_id: lease.id,
                        result,
                    });
                };
                tokio::spawn(task.instrument(span));
                self.load_cause = tracing::Span::none();
            }
            Action::ChildUp { generation } => {
                let Some((_, started)) = self.pending.take_if(|(g, _)| *g == generation) else {
                    return;
                };
                // Fresh tickets get a fresh abort signal.
                let (abort, _) = watch::channel(None);
                self.abort = abort;
                // Notice the child's exit the moment it happens.
                if let Some(p) = &started.process {
                    let mut exit = p.exit.clone();
                    let me = self.me.clone();
                    tokio::spawn(async move {
                        loop {
                            if let Some(e) = exit.borrow_and_update().clone() {
                                let _ = me.send(Report::Exited {
                                    generation,
                                    exit: e.to_string(),
                                });
                                return;
                            }
                            if exit.changed().await.is_err() {
                                return;
                            }
                        }
                    });
                }
                if let Some(old) = self.started.replace(started) {
                    self.discard(old);
                }
            }
            Action::DiscardChild { generation } => {
                if let Some((_, s)) = self.pending.take_if(|(g, _)| *g == generation) {
                    self.discard(s);
                }
            }
            Action::Renew {
                lease_id,
                seq,
                idle,
                priority,
            } => {
                let mut c = self.shared.scheduler.clone();
                let req = pb::RenewLeaseRequest {
                    lease_id: lease_id.clone(),
                    ttl_ms: 0,
                    pids: self.pids(),
                    idle,
                    priority: Some(priority),
                };
                let me = self.me.clone();
                tokio::spawn(async move {
                    let r = tokio::time::timeout(Duration::from_secs(5), c.renew_lease(req)).await;
                    let result = match r {
                        Ok(Ok(l)) => Renewal::Renewed {
                            evict_by_ms: l.into_inner().evict_by_ms,
                        },
                        Ok(Err(s)) if s.code() == tonic::Code::NotFound => Renewal::Unknown,
                        Ok(Err(s)) if s.code() == tonic::Code::FailedPrecondition => Renewal::Ended,
                        Ok(Err(s)) => Renewal::Failed(format!("{:?}", s.code())),
                        Err(_) => Renewal::Failed(format!("{:?}", tonic::Code::DeadlineExceeded)),
                    };
                    let _ = me.send(Report::Event(Event::Renewed {
                        lease_id,
                        seq,
                        result,
                    }));
                });
            }
            Action::Reattach { lease, priority } => self.reattach(lease, priority),
            Action::ReleaseLease { lease_id } => {
                let shared = self.shared.clone();
                let id = self.id.clone();
                tokio::spawn(async move { release_lease(&shared, &id, lease_id).await });
            }
            Action::Stop {
                kill,
                release,
                reason,
            } => {
                tracing::info!(instance = %self.id, "stopping: {reason}");
                let why = crate::metrics::unload_reason(&reason)
                    .or(self.drain_reason.take())
                    .or(self.asked_to_go.take())
                    .unwrap_or("other");
                self.asked_to_go = None;
                if why != "crashed" {
                    crate::metrics::unloaded(why);
                }
                // Not killed: it exited by itself (a crash); just forget it.
                let started = self.started.take().filter(|_| kill);
                let shared = self.shared.clone();
                let backend = self.backend.clone();
                let me = self.me.clone();
                let id = self.id.clone();
                tokio::spawn(async move {
                    if let Some(s) = started {
                        backend
                            .stop(&s, Duration::from_millis(shared.cfg.stop_grace_ms))
                            .await;
                    }
                    // Only after the process has exited.
                    if let Some(l) = release {
                        release_lease(&shared, &id, l).await;
                    }
                    let _ = me.send(Report::Event(Event::StopDone));
                });
            }
            Action::Abort(why) => {
                let _ = self.abort.send(Some(why));
            }
            Action::Grant {
                waiter,
                generation,
                load_wait_ms,
            } => {
                let started = self.started.as_ref();
                let ticket = Ticket {
                    endpoint: started.map(|s| s.endpoint.clone()).unwrap_or_default(),
                    api_key: started.and_then(|s| s.api_key.clone()),
                    model_id: self.model.id.clone(),
                    model_name: self.model.name.clone(),
                    served_name: started
                        .map(|s| s.served_name.clone())
                        .unwrap_or_else(|| self.model.served_name.clone()),
                    instance_id: self.id.clone(),
                    load_wait_ms,
                    abort: self.abort.subscribe(),
                    done: Some((self.me.clone(), generation)),
                };
                // A waiter that left drops the ticket, which ends its accounting.
                if let Some((reply, _)) = self.waiters.remove(&waiter) {
                    let _ = reply.send(Ok(ticket));
                }
            }
            Action::Refuse { waiter, error } => {
                if let Some((reply, _)) = self.waiters.remove(&waiter) {
                    let _ = reply.send(Err(error));
                }
            }
            Action::UnloadAnswered { reply, was_loaded } => {
                if let Some(r) = self.unloads.remove(&reply) {
                    let _ = r.send(was_loaded);
                }
            }
            Action::Retired(done) => {
                if let Some(r) = self.retire.take() {
                    let _ = r.send(done);
                }
            }
            Action::Progress { phase, queue } => {
                let p = pb::LoadProgress {
                    phase: phase as i32,
                    model: self.model.name.clone(),
                    position: queue.as_ref().map_or(0, |q| q.position),
                    queue_length: queue.as_ref().map_or(0, |q| q.queue_length),
                    evictions_requested: queue.as_ref().is_some_and(|q| q.evictions_requested),
                };
                self.progress.send_if_modified(|cur| {
                    let changed = *cur != p;
                    *cur = p;
                    changed
                });
            }
            Action::Publish {
                kind,
                state,
                previous,
                detail,
            } => {
                if kind == pb::InstanceEventKind::StateChanged {
                    tracing::info!(instance = %self.id, from = ?previous, to = ?state, "{detail}");
                    if state == pb::InstanceState::Draining {
                        self.drain_reason =
                            crate::metrics::unload_reason(&detail).or(self.asked_to_go);
                    }
                }
                if kind == pb::InstanceEventKind::Crashed {
                    crate::metrics::crashed(&self.model.name);
                }
                let _ = self.shared.events.send(pb::InstanceEvent {
                    kind: kind as i32,
                    instance: Some(self.view(Some(state))),
                    previous_state: previous as i32,
                    at_ms: now_ms(),
                    detail,
                });
            }
            Action::Warn(why) => tracing::warn!(instance = %self.id, "{why}"),
        }
    }

    /// Present the lease held now on its own; a lease the scheduler reports lost stops the
    /// instance. Transient failures are left to the next renewal.
    fn reattach(&self, l: LeaseInfo, priority: i32) {
        let holder = self.shared.cfg.holder.clone();
        let lease = pb::Lease {
            id: l.id,
            holder: holder.clone(),
            label: self.model.name.clone(),
            gpu_index: l.gpu,
            bytes: l.bytes,
            priority,
            ttl_ms: self.shared.cfg.lease_ttl_ms,
            pids: self.pids(),
            ..Default::default()
        };
        let mut c = self.shared.scheduler.clone();
        let me = self.me.clone();
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
                        let _ = me.send(Report::Event(Event::LeaseLost {
                            lease_id: lost.lease_id,
                            reason: lost.reason,
                        }));
                    }
                    for l in r.confirmed.into_iter().chain(r.restored) {
                        let _ = me.send(Report::Event(Event::Reattached { lease_id: l.id }));
                    }
                }
                Err(e) => tracing::warn!(instance = %id, "re-attach failed: {}", e.message()),
            }
        });
    }

    /// The instance as the API shows it; `state` overrides the state (an event shows the state
    /// it happened in).
    fn view(&self, state: Option<pb::InstanceState>) -> pb::BackendInstance {
        let s = &self.settings;
        let l = &self.life;
        let started = self.started.as_ref();
        pb::BackendInstance {
            id: self.id.clone(),
            model_id: self.model.id.clone(),
            model_name: self.model.name.clone(),
            backend: self.backend.kind() as i32,
            state: state.unwrap_or_else(|| l.state_pb()) as i32,
            settings: Some(pb::InstanceSettings {
                context: Some(s.context as i64),
                parallel: Some(s.parallel as i32),
                cache_type: Some(cache_type_pb(s.cache_type) as i32),
                gpu_layers: s.gpu_layers,
                embeddings: Some(s.embeddings),
                flash_attention: s.flash_attention,
                priority: Some(s.priority),
                gpu_index: s.gpu_index,
                idle_ttl_ms: Some(s.idle_ttl_ms),
            }),
            lease_id: l.lease.as_ref().map(|l| l.id.clone()).unwrap_or_default(),
            gpu_index: l.lease.as_ref().map(|l| l.gpu),
            lease_bytes: l.lease.as_ref().map_or(0, |l| l.bytes),
            estimated_bytes: l.estimated,
            measured_bytes: l.measured,
            evict_by_ms: l.evict_by_ms,
            port: started.map_or(0, |s| u32::from(s.port)),
            pid: started
                .and_then(|s| s.process.as_ref())
                .map_or(0, |p| p.pid),
            endpoint: started.map(|s| s.endpoint.clone()).unwrap_or_default(),
            in_flight: l.in_flight,
            waiting: l.waiters.len() as u32,
            requests_total: l.requests_total,
            last_used_ms: l.last_used_ms,
            idle_ttl_ms: s.idle_ttl_ms,
            unload_at_ms: l.unload_at_ms(),
            started_at_ms: l.started_at_ms,
            ready_at_ms: l.ready_at_ms,
            crash_count: l.crash_count,
            last_error: l.last_error.clone(),
            last_error_at_ms: l.last_error_at_ms,
            restart_after_ms: l.restart_after_ms(),
            load_progress: (!l.waiters.is_empty()).then(|| self.progress.borrow().clone()),
        }
    }
}

fn status_err(what: &str, s: tonic::Status) -> InstanceError {
    // The scheduler says so by reason, not in words: no GPU could ever hold this model.
    if securellm_common::errors::reason_of(&s) == Some(securellm_common::errors::Reason::NeverFits)
    {
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

/// Estimate and lease (the load's first half): queue positions are reported as they come.
async fn lease(
    shared: &Shared,
    model: &ModelRef,
    s: &Effective,
    priority: i32,
    deadline_ms: u64,
    me: &mpsc::UnboundedSender<Report>,
    generation: u64,
) -> Result<(LeaseInfo, u64), InstanceError> {
    let mut registry = shared.registry.clone();
    let est = registry
        .estimate(pb::EstimateRequest {
            model: model.id.clone(),
            context: s.context as i64,
            parallel: s.parallel as i32,
            cache_type: cache_type_pb(s.cache_type) as i32,
            gpu_layers: s.gpu_layers,
        })
        .await
        .map_err(|e| status_err("registry estimate", e))?
        .into_inner();
    let bytes = est.gpu_bytes.max(est.total_bytes.min(1 << 20)).max(1);
    let wait_ms = deadline_ms
        .saturating_sub(now_ms())
        .min(shared.cfg.lease_wait_ms);
    let waiting = std::time::Instant::now();
    let granted = acquire(shared, model, s, priority, bytes, wait_ms, me, generation).await;
    crate::metrics::lease_waited(&model.name, waiting.elapsed());
    granted.map(|l| (l, bytes))
}

/// Ask the scheduler for `bytes` and wait for the grant.
#[allow(clippy::too_many_arguments)]
async fn acquire(
    shared: &Shared,
    model: &ModelRef,
    s: &Effective,
    priority: i32,
    bytes: u64,
    wait_ms: u64,
    me: &mpsc::UnboundedSender<Report>,
    generation: u64,
) -> Result<LeaseInfo, InstanceError> {
    let mut sched = shared.scheduler.clone();
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
    while let Some(u) = stream.next().await {
        match u
            .map_err(|e| status_err(&format!("lease for {bytes} bytes"), e))?
            .update
        {
            Some(pb::acquire_lease_update::Update::Granted(l)) => {
                let lease = LeaseInfo {
                    id: l.id,
                    bytes: l.bytes,
                    gpu: l.gpu_index,
                };
                return Ok(lease);
            }
            Some(pb::acquire_lease_update::Update::Queued(position)) => {
                tracing::info!(model = %model.name, position = position.position, "waiting for GPU memory");
                let span = tracing::Span::current();
                span.record("backend.lease.queue_position", position.position);
                span.record("backend.lease.queue_length", position.queue_length);
                let _ = me.send(Report::Event(Event::LeaseQueued {
                    generation,
                    position,
                }));
            }
            None => {}
        }
    }
    Err(InstanceError::Unavailable(
        "the scheduler ended the lease stream".into(),
    ))
}

/// Start the child under `lease` and settle the lease (the load's second half): the child and
/// the lease's settled size. On failure nothing runs (the caller gives the lease back).
async fn start(
    shared: &Shared,
    backend: &dyn Backend,
    model: &ModelRef,
    s: &Effective,
    lease: &LeaseInfo,
    deadline_ms: u64,
) -> Result<(Started, u64), InstanceError> {
    // Simulated GPU: run on the CPU. The total is for engines that take a fraction of the GPU.
    // If the scheduler cannot say, do not guess (a wrong guess would run a GPU lease on the CPU):
    // fail the start.
    let mut sched = shared.scheduler.clone();
    let gpu = sched
        .get_status(pb::GetStatusRequest {})
        .await
        .map_err(|e| status_err("scheduler status", e))?
        .into_inner()
        .gpus
        .into_iter()
        .find(|g| g.index == lease.gpu);
    let Some(gpu) = gpu else {
        return Err(InstanceError::Unavailable(format!(
            "the scheduler granted GPU {} but does not list it",
            lease.gpu
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
        gpu: (!simulated).then_some(lease.gpu),
        lease_bytes: lease.bytes,
        gpu_total,
        start_timeout: Duration::from_millis(shared.cfg.start_timeout_ms)
            .min(left.max(Duration::from_secs(1))),
    };
    let started = backend.start(&spec).await.map_err(|e| {
        InstanceError::Unavailable(format!(
            "{} could not start model {}: {e}",
            backend.name(),
            model.name
        ))
    })?;
    let mut lease_bytes = lease.bytes;
    if let Some(m) = started.measured {
        settle(shared, backend, model, s, &lease.id, &mut lease_bytes, m).await;
    }
    Ok((started, lease_bytes))
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
            cache_type: cache_type_pb(s.cache_type) as i32,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelSettings;

    /// An instance whose registry and scheduler cannot be reached (every load fails at its
    /// estimate).
    fn unreachable_instance() -> InstanceHandle {
        securellm_common::tls::install_crypto_provider();
        let cfg = BackendConfig {
            scheduler: "127.0.0.1:1".into(),
            registry: "127.0.0.1:1".into(),
            ..Default::default()
        };
        let http = reqwest::Client::new();
        let shared = Arc::new(Shared {
            backends: Backends::from_config(&cfg, &http),
            http,
            scheduler: VramSchedulerClient::new(
                crate::lazy_channel(&cfg.scheduler, &cfg, None).unwrap(),
            ),
            registry: ModelRegistryClient::new(
                crate::lazy_channel(&cfg.registry, &cfg, None).unwrap(),
            ),
            events: broadcast::channel(16).0,
            cfg,
        });
        let model = ModelRef {
            id: "m".into(),
            name: "tiny".into(),
            path: "/nonexistent.gguf".into(),
            served_name: "tiny".into(),
        };
        let backend = shared.backends.llamacpp.clone();
        let settings = Effective::from(&ModelSettings::default()).unwrap();
        spawn("m".into(), model, settings, backend, shared)
    }

    /// Far more callers than the command queue holds: the senders wait for room (nothing is
    /// dropped, nothing panics) and every caller gets an answer within its deadline.
    #[tokio::test(flavor = "current_thread")]
    async fn a_flood_of_requests_waits_for_room_in_the_bounded_queue_and_each_is_answered() {
        let h = unreachable_instance();
        let deadline = now_ms() + 5_000;
        let n = COMMAND_QUEUE * 4;
        let calls: Vec<_> = (0..n)
            .map(|_| {
                let h = h.clone();
                tokio::spawn(async move { h.acquire(deadline, None).await })
            })
            .collect();
        let mut unavailable = 0;
        for c in calls {
            match c.await.unwrap() {
                Err(InstanceError::Unavailable(m)) => {
                    assert!(m.contains("registry estimate"), "{m}");
                    unavailable += 1;
                }
                Err(InstanceError::DeadlineExceeded(_)) => {}
                Err(e) => panic!("unexpected error: {e}"),
                Ok(_) => panic!("a ticket from an instance that cannot load"),
            }
        }
        assert!(unavailable > 0);
        // The actor still answers.
        let v = h.view().await.unwrap();
        assert_eq!(v.state, pb::InstanceState::Failed as i32);
        assert!(!h.unload(0, true).await);
    }
}
