//! The lease table: every scheduling decision, as plain data and pure functions.
//!
//! Nothing here does I/O or reads a clock: time comes in as `now_ms` (unix milliseconds), and what
//! the outside world must hear about comes out as [`Event`]s (for `WatchEvents`) and
//! [`WaiterNotice`]s (for the callers waiting in the queue). The actor in `actor.rs` owns one table
//! and feeds it messages; unit and property tests drive it directly, without a runtime.
//!
//! The invariant, for every GPU after every decision the table makes:
//! `granted + foreign + reserve <= total` ([`check_invariant`]). Foreign use is observed, not
//! decided: when it grows past what was free, the GPU is *over-committed*, and the table makes no
//! grant on it until the invariant holds again.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

/// A granted lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub id: String,
    pub holder: String,
    pub label: String,
    pub gpu: u32,
    pub bytes: u64,
    pub priority: i32,
    pub ttl_ms: u64,
    pub granted_at_ms: u64,
    pub expires_at_ms: u64,
    pub pids: Vec<u32>,
    /// No request in flight and none waiting, as the holder last reported (renew). An idle lease
    /// yields to a waiting request of equal or higher priority.
    pub idle: bool,
    /// Set while an eviction notice is pending.
    pub evict_by_ms: Option<u64>,
    /// When the holder last reported it busy or became idle (least recently used goes first).
    #[serde(default)]
    pub last_used_ms: u64,
}

/// One GPU as the table sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub simulated: bool,
    pub total: u64,
    /// Never granted.
    pub reserve: u64,
    /// Used memory as NVML reports it (ignored for simulated GPUs).
    pub observed_used: u64,
    /// Per-process use as NVML reports it: `(pid, bytes)`. `None` when NVML could not list them.
    pub processes: Option<Vec<(u32, u64)>>,
    /// Simulated GPUs only: memory used by processes nobody leased.
    pub simulated_foreign: u64,
}

/// What one inventory refresh saw on one GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuObservation {
    pub index: u32,
    pub total: u64,
    pub used: u64,
    pub processes: Option<Vec<(u32, u64)>>,
}

/// The memory picture of one GPU at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuAccount {
    pub total: u64,
    pub reserve: u64,
    pub granted: u64,
    pub foreign: u64,
}

impl GpuAccount {
    /// Bytes that may still be granted (0 when over-committed).
    pub fn grantable(&self) -> u64 {
        self.total
            .saturating_sub(self.reserve)
            .saturating_sub(self.granted)
            .saturating_sub(self.foreign)
    }

    /// True when `granted + foreign + reserve > total`.
    pub fn overcommitted(&self) -> bool {
        check_invariant(self).is_err()
    }
}

/// The invariant was broken on a GPU.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "GPU over-committed: granted {granted} + foreign {foreign} + reserve {reserve} > total {total}"
)]
pub struct InvariantViolation {
    pub granted: u64,
    pub foreign: u64,
    pub reserve: u64,
    pub total: u64,
}

/// `granted + foreign + reserve <= total`, in arithmetic that cannot overflow.
pub fn check_invariant(a: &GpuAccount) -> Result<(), InvariantViolation> {
    let sum = u128::from(a.granted) + u128::from(a.foreign) + u128::from(a.reserve);
    if sum <= u128::from(a.total) {
        Ok(())
    } else {
        Err(InvariantViolation {
            granted: a.granted,
            foreign: a.foreign,
            reserve: a.reserve,
            total: a.total,
        })
    }
}

/// A decision rule: may `bytes` more be granted on a GPU with this account?
pub type FitRule = fn(&GpuAccount, u64) -> bool;

/// A decision rule: may a waiting request of priority `prio` (`busy_ok`: it waited long enough)
/// ask this lease to go? The real one is [`may_evict`].
pub type EvictRule = fn(&Lease, i32, bool) -> bool;

/// The real rule: only what is grantable, never on an over-committed GPU.
pub fn fits(a: &GpuAccount, bytes: u64) -> bool {
    !a.overcommitted() && a.grantable() >= bytes
}

/// Foreign use on a GPU given the leases on it.
///
/// - Simulated: what was set with `SetSimulatedForeignUsage`.
/// - NVML with per-process data: memory of processes no lease names, plus memory a leased
///   process uses beyond its lease, plus memory NVML counts as used but attributes to no process
///   (driver, other containers).
/// - NVML without per-process data: used minus leased.
pub fn foreign_bytes<'a>(gpu: &Gpu, leases: impl Iterator<Item = &'a Lease> + Clone) -> u64 {
    if gpu.simulated {
        return gpu.simulated_foreign;
    }
    let Some(procs) = &gpu.processes else {
        let leased: u64 = leases.map(|l| l.bytes).fold(0, u64::saturating_add);
        return gpu.observed_used.saturating_sub(leased);
    };
    let mut by_lease: HashMap<&str, u64> = HashMap::new();
    let mut owner: HashMap<u32, &Lease> = HashMap::new();
    for l in leases.clone() {
        for pid in &l.pids {
            owner.insert(*pid, l);
        }
    }
    let mut unleased = 0u64;
    let mut attributed = 0u64;
    for (pid, used) in procs {
        attributed = attributed.saturating_add(*used);
        match owner.get(pid) {
            Some(l) => {
                let e = by_lease.entry(l.id.as_str()).or_default();
                *e = e.saturating_add(*used);
            }
            None => unleased = unleased.saturating_add(*used),
        }
    }
    let overflow: u64 = leases
        .filter_map(|l| {
            by_lease
                .get(l.id.as_str())
                .map(|u| u.saturating_sub(l.bytes))
        })
        .fold(0, u64::saturating_add);
    let unattributed = gpu.observed_used.saturating_sub(attributed);
    unleased
        .saturating_add(overflow)
        .saturating_add(unattributed)
}

/// Limits the table enforces on requests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub max_ttl_ms: u64,
    pub max_wait_ms: u64,
    /// How long a holder has to release after an eviction notice.
    pub eviction_grace_ms: u64,
    /// A request that has waited this long may also evict *busy* leases of its own priority: the
    /// holder stops taking new work and releases once its current requests finish (they get
    /// `busy_drain_ms` to do so). 0 = never (busy leases yield only to higher priority).
    #[serde(default)]
    pub preempt_busy_after_ms: u64,
    /// Deadline of a notice to a busy lease of equal priority (see `preempt_busy_after_ms`).
    #[serde(default)]
    pub busy_drain_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_ttl_ms: 3_600_000,
            max_wait_ms: 3_600_000,
            eviction_grace_ms: 10_000,
            preempt_busy_after_ms: 30_000,
            busy_drain_ms: 120_000,
        }
    }
}

/// May a waiting request of priority `prio` ask lease `l` to go?
///
/// - a lease of strictly lower priority: always (busy or not);
/// - a lease of the same priority: only while it is idle (no request in flight, none waiting), or
///   once the request has waited `preempt_busy_after_ms` (`busy_ok`);
/// - a lease of higher priority: never.
pub fn may_evict(l: &Lease, prio: i32, busy_ok: bool) -> bool {
    l.priority < prio || (l.priority == prio && (l.idle || busy_ok))
}

/// A request for memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcquireRequest {
    pub holder: String,
    pub label: String,
    pub bytes: u64,
    pub priority: i32,
    pub gpu: Option<u32>,
    pub ttl_ms: u64,
    pub wait_ms: u64,
}

/// A request waiting in the queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waiter {
    pub ticket: String,
    pub req: AcquireRequest,
    pub seq: u64,
    pub queued_at_ms: u64,
    pub wait_until_ms: u64,
    pub evictions_requested: bool,
    pub position: u32,
    /// Leases under eviction notice that this request counts on (noticed for it, or already
    /// noticed and counted as memory on its way). A notice nobody counts on is withdrawn.
    pub claimed: Vec<String>,
    /// It has waited `preempt_busy_after_ms`: busy leases of its own priority may yield to it.
    pub busy_ok: bool,
    /// The W3C trace id the acquire carried (32 lowercase hex digits), if any.
    pub trace_id: Option<String>,
}

impl Waiter {
    /// This request, as the cause of a decision.
    pub fn cause(&self) -> Cause {
        Cause {
            ticket: self.ticket.clone(),
            holder: self.req.holder.clone(),
            label: self.req.label.clone(),
            bytes: self.req.bytes,
            priority: self.req.priority,
            gpu: self.req.gpu,
            trace_id: self.trace_id.clone(),
        }
    }
}

/// The request a decision was made for: the request granted (`Granted`), queued (`Queued`) or
/// timed out (`WaitTimedOut`), or the waiting request that an eviction notice asked memory for
/// (`EvictionNotice`, and the `Revoked`, `EvictionWithdrawn`, `Released` or `Expired` that ends
/// that notice). "Who evicted my model, and why" is the cause of its eviction notice.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cause {
    /// The request's queue ticket (`q-…`).
    pub ticket: String,
    pub holder: String,
    /// What it wanted the memory for (the model).
    pub label: String,
    pub bytes: u64,
    pub priority: i32,
    /// The GPU it asked for (`None`: any).
    pub gpu: Option<u32>,
    /// The trace id of its acquire call, when the call carried a `traceparent`.
    pub trace_id: Option<String>,
}

/// Where a queued request stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuePos {
    pub ticket: String,
    pub position: u32,
    pub queue_length: u32,
    pub evictions_requested: bool,
}

/// The answer to an acquire that was accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AcquireOutcome {
    Granted(Lease),
    Queued(QueuePos),
}

/// What the table tells a waiting caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WaiterNotice {
    Position(QueuePos),
    Granted { ticket: String, lease: Lease },
    TimedOut { ticket: String },
}

impl WaiterNotice {
    pub fn ticket(&self) -> &str {
        match self {
            WaiterNotice::Position(p) => &p.ticket,
            WaiterNotice::Granted { ticket, .. } | WaiterNotice::TimedOut { ticket } => ticket,
        }
    }
}

/// What happened to a lease, for `WatchEvents`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Granted,
    Released,
    Expired,
    EvictionNotice,
    Revoked,
    Resized,
    Queued,
    WaitTimedOut,
    Reattached,
    Overcommitted,
    /// The request an eviction notice was for is gone (granted, withdrawn, timed out): the lease
    /// is no longer asked to go.
    EvictionWithdrawn,
}

/// One lease event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub lease: Lease,
    pub at_ms: u64,
    pub detail: String,
    /// The request this decision was made for (see [`Cause`]); `None` for decisions no request
    /// caused (a release or expiry without a pending notice, a re-attach, over-commitment).
    pub cause: Option<Cause>,
}

/// How a lease ended (kept for a while so a late caller gets a precise answer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    Released,
    Expired,
    Revoked,
}

impl EndReason {
    fn as_str(self) -> &'static str {
        match self {
            EndReason::Released => "released",
            EndReason::Expired => "expired (not renewed within its TTL)",
            EndReason::Revoked => "revoked (an eviction notice was not honoured in time)",
        }
    }
}

/// A request the table refused; nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("invalid `{field}`: {message}")]
    InvalidArgument {
        field: &'static str,
        message: String,
    },
    /// More memory than any eligible GPU could ever grant (`ErrorInfo` reason `NEVER_FITS`).
    #[error(
        "invalid `bytes`: {bytes} bytes can never fit: the largest eligible GPU can grant at most {capacity} bytes (total minus reserve)"
    )]
    NeverFits { bytes: u64, capacity: u64 },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    FailedPrecondition(String),
}

fn invalid(field: &'static str, message: impl Into<String>) -> TableError {
    TableError::InvalidArgument {
        field,
        message: message.into(),
    }
}

/// How many ended leases are remembered for precise error messages.
const ENDED_MEMORY: usize = 4096;
/// The longest holder name accepted.
pub const MAX_HOLDER_LEN: usize = 256;

/// The whole scheduling state.
pub struct LeaseTable {
    gpus: Vec<Gpu>,
    leases: BTreeMap<String, Lease>,
    /// Ordered by priority (high first), then arrival.
    queue: Vec<Waiter>,
    ended: HashMap<String, EndReason>,
    ended_order: VecDeque<String>,
    limits: Limits,
    fit_rule: FitRule,
    evict_rule: EvictRule,
    id_key: String,
    seq: u64,
    events: Vec<Event>,
    notices: Vec<WaiterNotice>,
    overcommitted: Vec<bool>,
    /// For each lease under an eviction notice: the request the notice was sent for.
    notice_cause: HashMap<String, Cause>,
}

impl LeaseTable {
    /// A table over `gpus`. Lease ids are `l-<32 hex digits>`, a keyed hash of a counter: give each
    /// process start a fresh random `id_key` and ids are unguessable (an id is a capability to
    /// release memory) and never repeat across restarts.
    pub fn new(gpus: Vec<Gpu>, limits: Limits, id_key: impl Into<String>) -> Self {
        let n = gpus.len();
        Self {
            gpus,
            leases: BTreeMap::new(),
            queue: Vec::new(),
            ended: HashMap::new(),
            ended_order: VecDeque::new(),
            limits,
            fit_rule: fits,
            evict_rule: may_evict,
            id_key: id_key.into(),
            seq: 0,
            events: Vec::new(),
            notices: Vec::new(),
            overcommitted: vec![false; n],
            notice_cause: HashMap::new(),
        }
    }

    /// Replace the decision rule. Only tests do this, to prove the invariant checks can fail.
    #[doc(hidden)]
    pub fn with_fit_rule(mut self, rule: FitRule) -> Self {
        self.fit_rule = rule;
        self
    }

    /// Replace the eviction rule. Only tests do this, to prove the notice checks can fail.
    #[doc(hidden)]
    pub fn with_evict_rule(mut self, rule: EvictRule) -> Self {
        self.evict_rule = rule;
        self
    }

    pub fn gpus(&self) -> &[Gpu] {
        &self.gpus
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    pub fn lease(&self, id: &str) -> Option<&Lease> {
        self.leases.get(id)
    }

    pub fn queue(&self) -> &[Waiter] {
        &self.queue
    }

    /// Events produced since the last call.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Notices for waiting callers produced since the last call.
    pub fn take_notices(&mut self) -> Vec<WaiterNotice> {
        std::mem::take(&mut self.notices)
    }

    /// The memory picture of GPU `index` (by position in the inventory).
    pub fn account(&self, pos: usize) -> GpuAccount {
        let gpu = &self.gpus[pos];
        let on_gpu = self.leases.values().filter(move |l| l.gpu == gpu.index);
        let granted = on_gpu.clone().map(|l| l.bytes).fold(0, u64::saturating_add);
        GpuAccount {
            total: gpu.total,
            reserve: gpu.reserve,
            granted,
            foreign: foreign_bytes(gpu, on_gpu),
        }
    }

    fn pos_of(&self, index: u32) -> Option<usize> {
        self.gpus.iter().position(|g| g.index == index)
    }

    /// Check the invariant on every GPU.
    pub fn check_all(&self) -> Result<(), (u32, InvariantViolation)> {
        for (pos, g) in self.gpus.iter().enumerate() {
            check_invariant(&self.account(pos)).map_err(|v| (g.index, v))?;
        }
        Ok(())
    }

    fn next_id(&mut self, kind: &str) -> String {
        use sha2::{Digest, Sha256};
        loop {
            self.seq += 1;
            let mut h = Sha256::new();
            h.update(self.id_key.as_bytes());
            h.update([0]);
            h.update(kind.as_bytes());
            h.update(self.seq.to_le_bytes());
            let digest = h.finalize();
            let id = format!("{kind}-{}", hex::encode(&digest[..16]));
            // Never reuse a live id (a re-attached lease may have taken any id).
            if !self.leases.contains_key(&id) && !self.queue.iter().any(|w| w.ticket == id) {
                return id;
            }
        }
    }

    fn remember_end(&mut self, id: &str, why: EndReason) {
        if self.ended.insert(id.to_string(), why).is_none() {
            self.ended_order.push_back(id.to_string());
        }
        while self.ended_order.len() > ENDED_MEMORY {
            if let Some(old) = self.ended_order.pop_front() {
                self.ended.remove(&old);
            }
        }
    }

    fn unknown_lease(&self, id: &str) -> TableError {
        match self.ended.get(id) {
            Some(why) => TableError::FailedPrecondition(format!(
                "lease {id} is no longer held: it was {}",
                why.as_str()
            )),
            None => TableError::NotFound(format!("no lease with id {id:?}")),
        }
    }

    fn emit(&mut self, kind: EventKind, lease: Lease, now_ms: u64, detail: impl Into<String>) {
        self.emit_for(kind, lease, now_ms, detail, None);
    }

    fn emit_for(
        &mut self,
        kind: EventKind,
        lease: Lease,
        now_ms: u64,
        detail: impl Into<String>,
        cause: Option<Cause>,
    ) {
        self.events.push(Event {
            kind,
            lease,
            at_ms: now_ms,
            detail: detail.into(),
            cause,
        });
    }

    /// Lease `id` leaves the table (released, expired, revoked): the request its pending notice
    /// was for, if it had one. A request still waiting that counts on the lease names itself;
    /// else the one the notice was first sent for.
    fn end_notice(&mut self, id: &str) -> Option<Cause> {
        let recorded = self.notice_cause.remove(id);
        self.queue
            .iter()
            .find(|w| w.claimed.iter().any(|c| c == id))
            .map(Waiter::cause)
            .or(recorded)
    }

    fn validate_ttl(&self, ttl_ms: u64) -> Result<(), TableError> {
        if ttl_ms == 0 {
            return Err(invalid("ttl_ms", "must be at least 1 ms"));
        }
        if ttl_ms > self.limits.max_ttl_ms {
            return Err(invalid(
                "ttl_ms",
                format!(
                    "{ttl_ms} ms is longer than the maximum of {} ms",
                    self.limits.max_ttl_ms
                ),
            ));
        }
        Ok(())
    }

    /// Positions of the GPUs a request may use.
    fn eligible(&self, gpu: Option<u32>) -> Vec<usize> {
        match gpu {
            Some(i) => self.pos_of(i).into_iter().collect(),
            None => (0..self.gpus.len()).collect(),
        }
    }

    /// Ask for memory. Granted at once if it fits and nobody ahead in the queue is waiting for the
    /// same GPU; queued if it may wait; refused otherwise. On error nothing changed.
    pub fn acquire(
        &mut self,
        req: AcquireRequest,
        now_ms: u64,
    ) -> Result<AcquireOutcome, TableError> {
        self.acquire_traced(req, None, now_ms)
    }

    /// [`acquire`](Self::acquire) for a call that carried a trace: the decisions made for this
    /// request (its grant, the eviction notices it causes) name `trace_id` in their [`Cause`]. A
    /// trace id that is not 32 lowercase hex digits is ignored (it is a label, never an error).
    pub fn acquire_traced(
        &mut self,
        req: AcquireRequest,
        trace_id: Option<String>,
        now_ms: u64,
    ) -> Result<AcquireOutcome, TableError> {
        let trace_id = trace_id
            .filter(|t| t.len() == 32 && t.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
        if req.holder.trim().is_empty() {
            return Err(invalid("holder", "must not be empty"));
        }
        if req.holder.len() > MAX_HOLDER_LEN {
            return Err(invalid(
                "holder",
                format!("longer than {MAX_HOLDER_LEN} bytes"),
            ));
        }
        if req.bytes == 0 {
            return Err(invalid("bytes", "must be greater than 0"));
        }
        self.validate_ttl(req.ttl_ms)?;
        if req.wait_ms > self.limits.max_wait_ms {
            return Err(invalid(
                "wait_ms",
                format!(
                    "{} ms is longer than the maximum of {} ms",
                    req.wait_ms, self.limits.max_wait_ms
                ),
            ));
        }
        if let Some(i) = req.gpu
            && self.pos_of(i).is_none()
        {
            return Err(TableError::NotFound(format!(
                "no GPU with index {i} (field `gpu_index`; GPUs: {})",
                self.gpus
                    .iter()
                    .map(|g| g.index.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let eligible = self.eligible(req.gpu);
        let capacity = eligible
            .iter()
            .map(|&p| self.gpus[p].total.saturating_sub(self.gpus[p].reserve))
            .max()
            .unwrap_or(0);
        if req.bytes > capacity {
            return Err(TableError::NeverFits {
                bytes: req.bytes,
                capacity,
            });
        }

        let ticket = self.next_id("q");
        let seq = self.seq;
        let waiter = Waiter {
            ticket: ticket.clone(),
            req,
            seq,
            queued_at_ms: now_ms,
            wait_until_ms: now_ms,
            evictions_requested: false,
            position: 0,
            claimed: Vec::new(),
            busy_ok: false,
            trace_id,
        };
        let wait_ms = waiter.req.wait_ms;
        self.enqueue(waiter);
        let granted = self.grant_pass(now_ms);
        if let Some(lease) = granted
            .into_iter()
            .find_map(|(t, l)| (t == ticket).then_some(l))
        {
            // This grant may have taken memory a waiter counted on: look for other memory for them.
            for i in 0..self.queue.len() {
                self.preempt_for(i, now_ms);
            }
            // The caller hears through the return value, not a notice.
            self.notices.retain(|n| n.ticket() != ticket);
            self.refresh_positions();
            return Ok(AcquireOutcome::Granted(lease));
        }
        let Some(idx) = self.queue.iter().position(|w| w.ticket == ticket) else {
            return Err(TableError::FailedPrecondition(
                "request vanished from the queue".into(),
            ));
        };
        if wait_ms == 0 {
            let w = self.queue.remove(idx);
            self.refresh_positions();
            self.notices.retain(|n| n.ticket() != ticket);
            return Err(TableError::ResourceExhausted(self.why_not_now(&w.req)));
        }
        self.queue[idx].wait_until_ms = now_ms.saturating_add(wait_ms);
        // Everyone waiting (not only this request): a grant just made may have taken memory a
        // waiter behind it counted on.
        for i in 0..self.queue.len() {
            self.preempt_for(i, now_ms);
        }
        self.refresh_positions();
        self.notices.retain(|n| n.ticket() != ticket);
        let w = &self.queue[idx];
        let view = self.waiter_view(w, now_ms);
        let cause = w.cause();
        let pos = self.queue_pos(idx);
        self.emit_for(
            EventKind::Queued,
            view,
            now_ms,
            format!("position {}", pos.position),
            Some(cause),
        );
        Ok(AcquireOutcome::Queued(pos))
    }

    fn why_not_now(&self, req: &AcquireRequest) -> String {
        let best = self
            .eligible(req.gpu)
            .into_iter()
            .map(|p| (self.gpus[p].index, self.account(p).grantable()))
            .max_by_key(|(_, g)| *g);
        match best {
            Some((i, g)) => format!(
                "{} bytes do not fit now (most grantable: {} bytes on GPU {}) and wait_ms is 0",
                req.bytes, g, i
            ),
            None => "no GPU".into(),
        }
    }

    fn enqueue(&mut self, w: Waiter) {
        let at = self
            .queue
            .iter()
            .position(|q| {
                (q.req.priority, std::cmp::Reverse(q.seq))
                    < (w.req.priority, std::cmp::Reverse(w.seq))
            })
            .unwrap_or(self.queue.len());
        self.queue.insert(at, w);
    }

    fn queue_pos(&self, idx: usize) -> QueuePos {
        let w = &self.queue[idx];
        QueuePos {
            ticket: w.ticket.clone(),
            position: idx as u32,
            queue_length: self.queue.len() as u32,
            evictions_requested: w.evictions_requested,
        }
    }

    /// A lease-shaped view of a waiting request, for events.
    fn waiter_view(&self, w: &Waiter, now_ms: u64) -> Lease {
        Lease {
            id: w.ticket.clone(),
            holder: w.req.holder.clone(),
            label: w.req.label.clone(),
            gpu: w.req.gpu.unwrap_or(u32::MAX),
            bytes: w.req.bytes,
            priority: w.req.priority,
            ttl_ms: w.req.ttl_ms,
            granted_at_ms: 0,
            expires_at_ms: now_ms,
            pids: Vec::new(),
            idle: false,
            evict_by_ms: None,
            last_used_ms: w.queued_at_ms,
        }
    }

    /// Send a position notice to every waiter whose position changed.
    fn refresh_positions(&mut self) {
        let len = self.queue.len() as u32;
        for i in 0..self.queue.len() {
            if self.queue[i].position != i as u32 {
                self.queue[i].position = i as u32;
                let w = &self.queue[i];
                self.notices.push(WaiterNotice::Position(QueuePos {
                    ticket: w.ticket.clone(),
                    position: i as u32,
                    queue_length: len,
                    evictions_requested: w.evictions_requested,
                }));
            }
        }
    }

    /// Grant every waiter that can be granted, in queue order. A waiter that cannot be granted
    /// holds back the GPUs it could ever fit on from everyone behind it, so big requests are not
    /// starved by a stream of small ones. Returns `(ticket, lease)` for each grant.
    fn grant_pass(&mut self, now_ms: u64) -> Vec<(String, Lease)> {
        let mut granted = Vec::new();
        let mut held_back = vec![false; self.gpus.len()];
        let mut accounts: Vec<GpuAccount> = (0..self.gpus.len()).map(|p| self.account(p)).collect();
        let mut i = 0;
        while i < self.queue.len() {
            let w = &self.queue[i];
            let eligible = self.eligible(w.req.gpu);
            // Best fit: the GPU left with the least grantable memory after the grant.
            let choice = eligible
                .iter()
                .copied()
                .filter(|&p| !held_back[p] && (self.fit_rule)(&accounts[p], w.req.bytes))
                .min_by_key(|&p| (accounts[p].grantable().saturating_sub(w.req.bytes), p));
            match choice {
                Some(p) => {
                    let w = self.queue.remove(i);
                    let cause = w.cause();
                    let id = self.next_id("l");
                    let lease = Lease {
                        id: id.clone(),
                        holder: w.req.holder,
                        label: w.req.label,
                        gpu: self.gpus[p].index,
                        bytes: w.req.bytes,
                        priority: w.req.priority,
                        ttl_ms: w.req.ttl_ms,
                        granted_at_ms: now_ms,
                        expires_at_ms: now_ms.saturating_add(w.req.ttl_ms),
                        pids: Vec::new(),
                        idle: false,
                        evict_by_ms: None,
                        last_used_ms: now_ms,
                    };
                    accounts[p].granted = accounts[p].granted.saturating_add(lease.bytes);
                    self.leases.insert(id, lease.clone());
                    self.emit_for(EventKind::Granted, lease.clone(), now_ms, "", Some(cause));
                    self.notices.push(WaiterNotice::Granted {
                        ticket: w.ticket.clone(),
                        lease: lease.clone(),
                    });
                    granted.push((w.ticket, lease));
                }
                None => {
                    for p in eligible {
                        let cap = self.gpus[p].total.saturating_sub(self.gpus[p].reserve);
                        if cap >= w.req.bytes {
                            held_back[p] = true;
                        }
                    }
                    i += 1;
                }
            }
        }
        granted
    }

    /// Send eviction notices on behalf of waiter `idx` if leases it may evict ([`may_evict`]) stand
    /// in its way.
    ///
    /// Per eligible GPU: the shortfall is what the waiter needs minus what is grantable minus what
    /// pending notices will already free. Victims are leases it may evict without a notice, chosen
    /// idle first (least recently used first), then lowest priority, then the smallest one that
    /// covers the rest of the shortfall (else the largest, and go on). The GPU needing the fewest
    /// bytes of victims wins. Returns true if notices were sent.
    fn preempt_for(&mut self, idx: usize, now_ms: u64) -> bool {
        let (prio, bytes, gpu_pref, busy_ok) = {
            let w = &self.queue[idx];
            (w.req.priority, w.req.bytes, w.req.gpu, w.busy_ok)
        };
        let may_evict = self.evict_rule;
        // (victim bytes, victims, pending notices counted on) of the best GPU.
        let mut best: Option<(u64, Vec<String>, Vec<String>)> = None;
        for p in self.eligible(gpu_pref) {
            let gpu = &self.gpus[p];
            if gpu.total.saturating_sub(gpu.reserve) < bytes {
                continue;
            }
            let acct = self.account(p);
            let deficit =
                (u128::from(acct.granted) + u128::from(acct.foreign) + u128::from(acct.reserve))
                    .saturating_sub(u128::from(acct.total));
            let need = (u128::from(bytes) + deficit).saturating_sub(u128::from(acct.grantable()));
            let noticed: Vec<(&String, u64)> = self
                .leases
                .values()
                .filter(|l| {
                    l.gpu == gpu.index && l.evict_by_ms.is_some() && may_evict(l, prio, busy_ok)
                })
                .map(|l| (&l.id, l.bytes))
                .collect();
            let pending: u128 = noticed.iter().map(|(_, b)| u128::from(*b)).sum();
            if need <= pending {
                // Already being freed (or fits): nothing more to ask.
                if need > 0 {
                    let ids: Vec<String> = noticed.iter().map(|(id, _)| (*id).clone()).collect();
                    let w = &mut self.queue[idx];
                    w.evictions_requested = true;
                    claim(&mut w.claimed, ids);
                }
                return false;
            }
            let pending_ids: Vec<String> = noticed.iter().map(|(id, _)| (*id).clone()).collect();
            let mut shortfall = need - pending;
            let mut candidates: Vec<&Lease> = self
                .leases
                .values()
                .filter(|l| {
                    l.gpu == gpu.index && l.evict_by_ms.is_none() && may_evict(l, prio, busy_ok)
                })
                .collect();
            let available: u128 = candidates.iter().map(|l| u128::from(l.bytes)).sum();
            if available < shortfall {
                continue;
            }
            let mut victims = Vec::new();
            let mut victim_bytes = 0u64;
            while shortfall > 0 && !candidates.is_empty() {
                // The best class: idle first, then lowest priority.
                let class = candidates
                    .iter()
                    .map(|l| (!l.idle, l.priority))
                    .min()
                    .unwrap_or((false, i32::MIN));
                let in_class = candidates
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| (!l.idle, l.priority) == class);
                let pick = if class.0 {
                    // Busy: the smallest lease that covers the rest, else the largest.
                    let covering = in_class
                        .clone()
                        .filter(|(_, l)| u128::from(l.bytes) >= shortfall)
                        .min_by_key(|(_, l)| l.bytes)
                        .map(|(i, _)| i);
                    covering.or_else(|| in_class.max_by_key(|(_, l)| l.bytes).map(|(i, _)| i))
                } else {
                    // Idle: least recently used first.
                    in_class
                        .min_by_key(|(_, l)| (l.last_used_ms, l.granted_at_ms))
                        .map(|(i, _)| i)
                };
                let Some(pick) = pick else { break };
                let l = candidates.swap_remove(pick);
                shortfall = shortfall.saturating_sub(u128::from(l.bytes));
                victim_bytes = victim_bytes.saturating_add(l.bytes);
                victims.push(l.id.clone());
            }
            if shortfall == 0 && best.as_ref().is_none_or(|(b, _, _)| victim_bytes < *b) {
                best = Some((victim_bytes, victims, pending_ids));
            }
        }
        let Some((_, victims, pending_ids)) = best else {
            return false;
        };
        let for_whom = format!("needed by a priority {} request of {} bytes", prio, bytes);
        let cause = self.queue[idx].cause();
        for id in &victims {
            if let Some(l) = self.leases.get_mut(id) {
                // A busy lease of the same priority lets its current requests finish.
                let busy_yield = l.priority >= prio && !l.idle;
                let grace = if busy_yield {
                    self.limits.busy_drain_ms.max(self.limits.eviction_grace_ms)
                } else {
                    self.limits.eviction_grace_ms
                };
                l.evict_by_ms = Some(now_ms.saturating_add(grace));
                let l = l.clone();
                let detail = if l.priority >= prio && l.idle {
                    format!("{for_whom} (idle lease yields)")
                } else if busy_yield {
                    format!("{for_whom} (waited past preempt_busy_after_ms)")
                } else {
                    for_whom.clone()
                };
                self.notice_cause.insert(l.id.clone(), cause.clone());
                self.emit_for(
                    EventKind::EvictionNotice,
                    l,
                    now_ms,
                    detail,
                    Some(cause.clone()),
                );
            }
        }
        let w = &mut self.queue[idx];
        w.evictions_requested = true;
        claim(&mut w.claimed, victims.into_iter().chain(pending_ids));
        true
    }

    /// After memory freed or the queue changed: grant what fits, then ask for evictions for those
    /// still waiting, then tell waiters their new positions.
    fn schedule(&mut self, now_ms: u64) {
        self.grant_pass(now_ms);
        self.withdraw_stale_notices(now_ms);
        for idx in 0..self.queue.len() {
            self.preempt_for(idx, now_ms);
        }
        self.refresh_positions();
        self.note_overcommit(now_ms);
    }

    /// A lease under an eviction notice keeps it only while some waiting request counts on it
    /// (its `claimed` list). When every request it was for is gone (granted, withdrawn, timed
    /// out), the notice is withdrawn, so the holder is not revoked for nothing.
    fn withdraw_stale_notices(&mut self, now_ms: u64) {
        let counted: std::collections::HashSet<&String> =
            self.queue.iter().flat_map(|w| w.claimed.iter()).collect();
        let stale: Vec<String> = self
            .leases
            .values()
            .filter(|l| l.evict_by_ms.is_some() && !counted.contains(&l.id))
            .map(|l| l.id.clone())
            .collect();
        for id in stale {
            if let Some(l) = self.leases.get_mut(&id) {
                l.evict_by_ms = None;
                let l = l.clone();
                let cause = self.notice_cause.remove(&id);
                self.emit_for(
                    EventKind::EvictionWithdrawn,
                    l,
                    now_ms,
                    "the request that needed the memory is gone",
                    cause,
                );
            }
        }
    }

    fn note_overcommit(&mut self, now_ms: u64) {
        for p in 0..self.gpus.len() {
            let over = self.account(p).overcommitted();
            if over && !self.overcommitted[p] {
                let a = self.account(p);
                let g = &self.gpus[p];
                let view = Lease {
                    id: String::new(),
                    holder: String::new(),
                    label: format!("gpu {}", g.index),
                    gpu: g.index,
                    bytes: a.foreign,
                    priority: 0,
                    ttl_ms: 0,
                    granted_at_ms: 0,
                    expires_at_ms: 0,
                    pids: Vec::new(),
                    idle: false,
                    evict_by_ms: None,
                    last_used_ms: 0,
                };
                self.emit(
                    EventKind::Overcommitted,
                    view,
                    now_ms,
                    format!(
                        "foreign use grew past what was free: granted {} + foreign {} + reserve {} > total {}; no grants on GPU {} until it fits",
                        a.granted, a.foreign, a.reserve, a.total, g.index
                    ),
                );
            }
            self.overcommitted[p] = over;
        }
    }

    /// Is GPU at position `pos` over-committed by foreign use?
    pub fn is_overcommitted(&self, pos: usize) -> bool {
        self.account(pos).overcommitted()
    }

    /// Give a lease back.
    pub fn release(&mut self, id: &str, now_ms: u64) -> Result<Lease, TableError> {
        let Some(lease) = self.leases.remove(id) else {
            return Err(self.unknown_lease(id));
        };
        self.remember_end(id, EndReason::Released);
        let cause = self.end_notice(id);
        let detail = if cause.is_some() {
            "released under an eviction notice"
        } else {
            ""
        };
        self.emit_for(EventKind::Released, lease.clone(), now_ms, detail, cause);
        self.schedule(now_ms);
        Ok(lease)
    }

    /// Heartbeat: extend the lease, record its processes and whether it is idle.
    pub fn renew(
        &mut self,
        id: &str,
        ttl_ms: u64,
        pids: Vec<u32>,
        idle: bool,
        now_ms: u64,
    ) -> Result<Lease, TableError> {
        self.renew_as(id, ttl_ms, pids, idle, None, now_ms)
    }

    /// [`renew`](Self::renew), optionally setting the lease's priority (a model now used by a
    /// caller of higher priority is protected as that caller's).
    ///
    /// Idleness and priority decide who may evict the lease: a lease that turns busy (or rises in
    /// priority) under a notice that only an idle (or lower) lease had to honour keeps its memory:
    /// the notice is withdrawn, and the waiting request looks for other memory.
    pub fn renew_as(
        &mut self,
        id: &str,
        ttl_ms: u64,
        pids: Vec<u32>,
        idle: bool,
        priority: Option<i32>,
        now_ms: u64,
    ) -> Result<Lease, TableError> {
        if ttl_ms != 0 {
            self.validate_ttl(ttl_ms)?;
        }
        let err = self.unknown_lease(id);
        let Some(l) = self.leases.get_mut(id) else {
            return Err(err);
        };
        if ttl_ms != 0 {
            l.ttl_ms = ttl_ms;
        }
        l.expires_at_ms = now_ms.saturating_add(l.ttl_ms);
        // New PIDs move their measured memory from "foreign" to this lease: what is grantable,
        // and so the waiters' plans, change.
        let pids_changed = !pids.is_empty() && pids != l.pids;
        if !pids.is_empty() {
            l.pids = pids;
        }
        if !idle || !l.idle {
            l.last_used_ms = now_ms;
        }
        let became_idle = idle && !l.idle;
        l.idle = idle;
        let lowered = priority.is_some_and(|p| p < l.priority);
        if let Some(p) = priority {
            l.priority = p;
        }
        let l = l.clone();
        let mut dropped = false;
        if l.evict_by_ms.is_some() {
            let may_evict = self.evict_rule;
            for w in &mut self.queue {
                if w.claimed.contains(&l.id) && !may_evict(&l, w.req.priority, w.busy_ok) {
                    w.claimed.retain(|c| c != &l.id);
                    dropped = true;
                }
            }
        }
        // Memory that may now be asked for (idle, lower priority, memory no longer foreign), or a
        // notice to call off.
        if dropped || ((became_idle || lowered || pids_changed) && !self.queue.is_empty()) {
            self.schedule(now_ms);
        }
        Ok(self.leases.get(id).cloned().unwrap_or(l))
    }

    /// Settle a lease's size. Shrinking always succeeds; growing only if the extra bytes fit now.
    pub fn resize(&mut self, id: &str, bytes: u64, now_ms: u64) -> Result<Lease, TableError> {
        if bytes == 0 {
            return Err(invalid(
                "bytes",
                "must be greater than 0 (release the lease instead)",
            ));
        }
        let Some(old) = self.leases.get(id).cloned() else {
            return Err(self.unknown_lease(id));
        };
        if bytes > old.bytes {
            let extra = bytes - old.bytes;
            let Some(p) = self.pos_of(old.gpu) else {
                return Err(TableError::FailedPrecondition(format!(
                    "lease {id} is on GPU {} which is no longer in the inventory",
                    old.gpu
                )));
            };
            // A waiter of higher priority that is blocked on this GPU keeps its claim.
            let blocked_higher = self
                .queue
                .iter()
                .any(|w| w.req.priority > old.priority && w.req.gpu.is_none_or(|g| g == old.gpu));
            if blocked_higher || !(self.fit_rule)(&self.account(p), extra) {
                return Err(TableError::ResourceExhausted(format!(
                    "cannot grow lease {id} from {} to {bytes} bytes: {} more bytes do not fit on GPU {} now ({} grantable{})",
                    old.bytes,
                    extra,
                    old.gpu,
                    self.account(p).grantable(),
                    if blocked_higher {
                        ", and a higher-priority request is waiting"
                    } else {
                        ""
                    }
                )));
            }
        }
        let Some(l) = self.leases.get_mut(id) else {
            return Err(self.unknown_lease(id));
        };
        l.bytes = bytes;
        let l = l.clone();
        self.emit(
            EventKind::Resized,
            l.clone(),
            now_ms,
            format!("{} -> {} bytes", old.bytes, bytes),
        );
        if bytes != old.bytes {
            self.schedule(now_ms);
        }
        Ok(l)
    }

    /// Withdraw a waiting request (its caller went away). Unknown tickets are ignored.
    pub fn cancel_waiter(&mut self, ticket: &str, now_ms: u64) -> bool {
        let Some(idx) = self.queue.iter().position(|w| w.ticket == ticket) else {
            return false;
        };
        self.queue.remove(idx);
        self.schedule(now_ms);
        true
    }

    /// Earliest moment something times out: a lease expiry, an eviction deadline or a wait limit.
    pub fn next_deadline(&self) -> Option<u64> {
        let leases = self
            .leases
            .values()
            .flat_map(|l| std::iter::once(l.expires_at_ms).chain(l.evict_by_ms));
        let waits = self.queue.iter().map(|w| w.wait_until_ms);
        let arm = self.limits.preempt_busy_after_ms;
        let arming = self
            .queue
            .iter()
            .filter(move |w| arm > 0 && !w.busy_ok)
            .map(move |w| w.queued_at_ms.saturating_add(arm));
        leases.chain(waits).chain(arming).min()
    }

    /// Expire unrenewed leases, revoke leases whose eviction deadline passed, time out waiters.
    /// Returns whether anything changed (a lease or a waiter timed out).
    pub fn tick(&mut self, now_ms: u64) -> bool {
        let mut changed = false;
        let expired: Vec<String> = self
            .leases
            .values()
            .filter(|l| l.expires_at_ms <= now_ms || l.evict_by_ms.is_some_and(|d| d <= now_ms))
            .map(|l| l.id.clone())
            .collect();
        for id in expired {
            if let Some(l) = self.leases.remove(&id) {
                let revoked =
                    l.evict_by_ms.is_some_and(|d| d <= now_ms) && l.expires_at_ms > now_ms;
                let (kind, why) = if revoked {
                    (EventKind::Revoked, EndReason::Revoked)
                } else {
                    (EventKind::Expired, EndReason::Expired)
                };
                self.remember_end(&id, why);
                let cause = self.end_notice(&id);
                self.emit_for(kind, l, now_ms, why.as_str(), cause);
                changed = true;
            }
        }
        let arm = self.limits.preempt_busy_after_ms;
        for w in &mut self.queue {
            if arm > 0 && !w.busy_ok && w.queued_at_ms.saturating_add(arm) <= now_ms {
                w.busy_ok = true;
                changed = true;
            }
        }
        let mut i = 0;
        while i < self.queue.len() {
            if self.queue[i].wait_until_ms <= now_ms {
                let w = self.queue.remove(i);
                let view = self.waiter_view(&w, now_ms);
                let cause = w.cause();
                self.emit_for(EventKind::WaitTimedOut, view, now_ms, "", Some(cause));
                self.notices
                    .push(WaiterNotice::TimedOut { ticket: w.ticket });
                changed = true;
            } else {
                i += 1;
            }
        }
        if changed {
            self.schedule(now_ms);
        }
        changed
    }

    /// Take in a fresh NVML reading. GPUs not in the reading keep their last values.
    pub fn observe(&mut self, obs: &[GpuObservation], now_ms: u64) {
        for o in obs {
            if let Some(p) = self.pos_of(o.index) {
                let g = &mut self.gpus[p];
                if !g.simulated {
                    g.total = o.total;
                    g.observed_used = o.used;
                    g.processes = o.processes.clone();
                }
            }
        }
        self.schedule(now_ms);
    }

    /// Simulated GPUs only: set the memory used by processes nobody leased.
    pub fn set_simulated_foreign(
        &mut self,
        index: u32,
        bytes: u64,
        now_ms: u64,
    ) -> Result<&Gpu, TableError> {
        let Some(p) = self.pos_of(index) else {
            return Err(TableError::NotFound(format!(
                "no GPU with index {index} (field `gpu_index`)"
            )));
        };
        if !self.gpus[p].simulated {
            return Err(TableError::FailedPrecondition(format!(
                "GPU {index} is a real NVML GPU: its foreign use is measured, not set"
            )));
        }
        if bytes > self.gpus[p].total {
            return Err(invalid(
                "foreign_bytes",
                format!(
                    "{bytes} is more than the GPU's total of {}",
                    self.gpus[p].total
                ),
            ));
        }
        self.gpus[p].simulated_foreign = bytes;
        self.schedule(now_ms);
        Ok(&self.gpus[p])
    }

    /// A holder presents the leases it believes it holds (after a scheduler restart or a
    /// reconnect). Known leases of this holder are confirmed and renewed; unknown ones are restored
    /// under their old id if they fit; the rest are reported lost with the reason.
    pub fn reattach(
        &mut self,
        holder: &str,
        presented: Vec<Lease>,
        now_ms: u64,
    ) -> Result<Reattached, TableError> {
        if holder.trim().is_empty() {
            return Err(invalid("holder", "must not be empty"));
        }
        let mut out = Reattached::default();
        for mut l in presented {
            if l.id.is_empty() || l.id.len() > 128 || !l.id.bytes().all(|b| b.is_ascii_graphic()) {
                out.lost
                    .push((l.id, "not a lease id (1-128 printable ASCII bytes)".into()));
                continue;
            }
            if let Some(known) = self.leases.get_mut(&l.id) {
                if known.holder != holder {
                    out.lost.push((l.id, format!("held by {:?}", known.holder)));
                    continue;
                }
                known.expires_at_ms = now_ms.saturating_add(known.ttl_ms);
                if !l.pids.is_empty() {
                    known.pids = l.pids;
                }
                out.confirmed.push(known.clone());
                continue;
            }
            if let Some(why) = self.ended.get(&l.id) {
                out.lost.push((l.id, format!("it was {}", why.as_str())));
                continue;
            }
            if l.holder != holder {
                out.lost.push((
                    l.id,
                    format!("presented by {holder:?} but held by {:?}", l.holder),
                ));
                continue;
            }
            let Some(p) = self.pos_of(l.gpu) else {
                out.lost
                    .push((l.id, format!("no GPU with index {}", l.gpu)));
                continue;
            };
            if l.bytes == 0 || l.ttl_ms == 0 || l.ttl_ms > self.limits.max_ttl_ms {
                out.lost.push((l.id, "invalid bytes or ttl_ms".to_string()));
                continue;
            }
            // Insert first, then check: the lease's own processes must count as leased, not as
            // foreign (they are using exactly this memory).
            l.expires_at_ms = now_ms.saturating_add(l.ttl_ms);
            l.evict_by_ms = None;
            self.leases.insert(l.id.clone(), l.clone());
            if !self.fits_after_insert(p, l.bytes) {
                self.leases.remove(&l.id);
                out.lost.push((
                    l.id,
                    format!(
                        "{} bytes no longer fit on GPU {} ({} grantable)",
                        l.bytes,
                        l.gpu,
                        self.account(p).grantable()
                    ),
                ));
                continue;
            }
            l.expires_at_ms = now_ms.saturating_add(l.ttl_ms);
            l.evict_by_ms = None;
            self.leases.insert(l.id.clone(), l.clone());
            self.emit(EventKind::Reattached, l.clone(), now_ms, "restored");
            out.restored.push(l);
        }
        for l in &out.confirmed {
            self.emit(EventKind::Reattached, l.clone(), now_ms, "confirmed");
        }
        self.note_overcommit(now_ms);
        Ok(out)
    }

    /// Load leases from a snapshot taken before a restart. Each is given a fresh TTL from now so
    /// its holder has time to reconnect and renew; those that no longer fit are dropped (returned).
    pub fn restore_snapshot(&mut self, snap: Snapshot, now_ms: u64) -> Vec<Lease> {
        let mut dropped = Vec::new();
        for g in &snap.simulated_foreign {
            if let Some(p) = self.pos_of(g.0)
                && self.gpus[p].simulated
            {
                self.gpus[p].simulated_foreign = g.1.min(self.gpus[p].total);
            }
        }
        for mut l in snap.leases {
            let Some(p) = self.pos_of(l.gpu) else {
                dropped.push(l);
                continue;
            };
            l.expires_at_ms = l.expires_at_ms.max(now_ms.saturating_add(l.ttl_ms));
            // The queue is not persisted: the requests these notices were for are gone.
            l.evict_by_ms = None;
            self.leases.insert(l.id.clone(), l.clone());
            if !self.fits_after_insert(p, l.bytes) {
                self.leases.remove(&l.id);
                dropped.push(l);
            }
        }
        dropped
    }

    /// With a lease of `bytes` just inserted on GPU `pos`: would the decision rule have granted it?
    /// Foreign use is computed *with* the lease present, so the lease's own processes count as
    /// leased, not as foreign (they use exactly this memory).
    fn fits_after_insert(&self, pos: usize, bytes: u64) -> bool {
        let with = self.account(pos);
        let without = GpuAccount {
            granted: with.granted.saturating_sub(bytes),
            ..with
        };
        (self.fit_rule)(&without, bytes)
    }

    /// What must survive a restart: the leases and simulated foreign use.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            leases: self.leases.values().cloned().collect(),
            simulated_foreign: self
                .gpus
                .iter()
                .filter(|g| g.simulated)
                .map(|g| (g.index, g.simulated_foreign))
                .collect(),
        }
    }
}

/// The result of a reattach.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reattached {
    pub confirmed: Vec<Lease>,
    pub restored: Vec<Lease>,
    pub lost: Vec<(String, String)>,
}

/// The persisted part of the table.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub leases: Vec<Lease>,
    pub simulated_foreign: Vec<(u32, u64)>,
}

/// Add lease ids to a waiter's claims (once each).
fn claim(claimed: &mut Vec<String>, ids: impl IntoIterator<Item = String>) {
    for id in ids {
        if !claimed.contains(&id) {
            claimed.push(id);
        }
    }
}
