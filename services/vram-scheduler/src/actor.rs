//! The scheduler actor: one task owns the [`LeaseTable`]; everyone else holds a cheap, cloneable
//! [`SchedulerHandle`] and talks to it by message.
//!
//! The actor also owns the timers (lease expiry, eviction deadlines, wait limits: it sleeps until
//! the table's next deadline), fans events out on a broadcast channel for `WatchEvents`, routes
//! queue-position updates and grants to the callers waiting for them, writes the lease
//! snapshot when something changed, and hands every event to the decision log
//! ([`crate::decisions`]) when there is one (a non-blocking queue: the actor never waits on disk).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use securellm_common::time::now_ms;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::decisions::DecisionLog;
use crate::persist;
use crate::table::{
    AcquireOutcome, AcquireRequest, Event, Gpu, GpuAccount, GpuObservation, Lease, LeaseTable,
    Reattached, TableError, Waiter, WaiterNotice,
};

/// The actor is gone (the scheduler is shutting down).
#[derive(Debug, Clone, thiserror::Error)]
#[error("the scheduler is shutting down")]
pub struct Stopped;

/// Errors a handle call can return.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    #[error(transparent)]
    Table(#[from] TableError),
    #[error(transparent)]
    Stopped(#[from] Stopped),
}

/// One GPU in a status answer.
#[derive(Clone, Debug)]
pub struct GpuView {
    pub gpu: Gpu,
    pub account: GpuAccount,
    pub overcommitted: bool,
}

/// A consistent picture of the whole table.
#[derive(Clone, Debug)]
pub struct StatusView {
    pub inventory: &'static str,
    pub gpus: Vec<GpuView>,
    pub leases: Vec<Lease>,
    pub queue: Vec<Waiter>,
}

type Reply<T> = oneshot::Sender<Result<T, TableError>>;

enum Msg {
    Acquire {
        req: AcquireRequest,
        trace_id: Option<String>,
        updates: mpsc::UnboundedSender<WaiterNotice>,
        reply: Reply<AcquireOutcome>,
    },
    Release {
        id: String,
        reply: Reply<Lease>,
    },
    Renew {
        id: String,
        ttl_ms: u64,
        pids: Vec<u32>,
        idle: bool,
        priority: Option<i32>,
        reply: Reply<Lease>,
    },
    Resize {
        id: String,
        bytes: u64,
        reply: Reply<Lease>,
    },
    Reattach {
        holder: String,
        leases: Vec<Lease>,
        reply: Reply<Reattached>,
    },
    SetForeign {
        gpu: u32,
        bytes: u64,
        reply: Reply<GpuView>,
    },
    Observe(Vec<GpuObservation>),
    Cancel {
        ticket: String,
    },
    Status {
        reply: oneshot::Sender<StatusView>,
    },
    Flush {
        reply: oneshot::Sender<()>,
    },
}

/// The scheduler's API for the rest of the process.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::Sender<Msg>,
    events: broadcast::Sender<Event>,
    decisions: Option<DecisionLog>,
}

/// Where and how often the actor persists its table.
#[derive(Clone, Debug)]
pub struct PersistOptions {
    pub path: PathBuf,
    pub interval: Duration,
}

/// Start the actor over `table`. `inventory` is reported by status ("nvml" / "simulated").
pub fn spawn(
    table: LeaseTable,
    inventory: &'static str,
    persist: Option<PersistOptions>,
) -> SchedulerHandle {
    spawn_with_decisions(table, inventory, persist, None)
}

/// [`spawn`], recording every decision in `decisions`.
pub fn spawn_with_decisions(
    table: LeaseTable,
    inventory: &'static str,
    persist: Option<PersistOptions>,
    decisions: Option<DecisionLog>,
) -> SchedulerHandle {
    let (tx, rx) = mpsc::channel(4096);
    let (events, _) = broadcast::channel(4096);
    let actor = Actor {
        table,
        inventory,
        waiters: HashMap::new(),
        events: events.clone(),
        persist,
        dirty: false,
        self_tx: tx.downgrade(),
        decisions: decisions.clone(),
    };
    tokio::spawn(actor.run(rx));
    SchedulerHandle {
        tx,
        events,
        decisions,
    }
}

impl SchedulerHandle {
    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Msg) -> Result<T, CallError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| Stopped)?;
        Ok(rx.await.map_err(|_| Stopped)??)
    }

    /// Ask for memory. When queued, `updates` receives positions and finally the grant or the
    /// time-out; drop it to withdraw (the actor notices on its next send).
    pub async fn acquire(
        &self,
        req: AcquireRequest,
        updates: mpsc::UnboundedSender<WaiterNotice>,
    ) -> Result<AcquireOutcome, CallError> {
        self.acquire_traced(req, None, updates).await
    }

    /// [`acquire`](Self::acquire) for a call that carried a trace: the decisions made for it
    /// name `trace_id` in the decision log.
    pub async fn acquire_traced(
        &self,
        req: AcquireRequest,
        trace_id: Option<String>,
        updates: mpsc::UnboundedSender<WaiterNotice>,
    ) -> Result<AcquireOutcome, CallError> {
        self.call(|reply| Msg::Acquire {
            req,
            trace_id,
            updates,
            reply,
        })
        .await
    }

    pub async fn release(&self, id: String) -> Result<Lease, CallError> {
        self.call(|reply| Msg::Release { id, reply }).await
    }

    pub async fn renew(
        &self,
        id: String,
        ttl_ms: u64,
        pids: Vec<u32>,
        idle: bool,
        priority: Option<i32>,
    ) -> Result<Lease, CallError> {
        self.call(|reply| Msg::Renew {
            id,
            ttl_ms,
            pids,
            idle,
            priority,
            reply,
        })
        .await
    }

    pub async fn resize(&self, id: String, bytes: u64) -> Result<Lease, CallError> {
        self.call(|reply| Msg::Resize { id, bytes, reply }).await
    }

    pub async fn reattach(
        &self,
        holder: String,
        leases: Vec<Lease>,
    ) -> Result<Reattached, CallError> {
        self.call(|reply| Msg::Reattach {
            holder,
            leases,
            reply,
        })
        .await
    }

    pub async fn set_simulated_foreign(&self, gpu: u32, bytes: u64) -> Result<GpuView, CallError> {
        self.call(|reply| Msg::SetForeign { gpu, bytes, reply })
            .await
    }

    /// Withdraw a queued request.
    pub async fn cancel(&self, ticket: String) {
        let _ = self.tx.send(Msg::Cancel { ticket }).await;
    }

    /// Feed an inventory reading.
    pub async fn observe(&self, obs: Vec<GpuObservation>) -> Result<(), Stopped> {
        self.tx.send(Msg::Observe(obs)).await.map_err(|_| Stopped)
    }

    pub async fn status(&self) -> Result<StatusView, Stopped> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Status { reply })
            .await
            .map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }

    /// Write the snapshot now, and wait until every decision made so far is in the decision log
    /// (used at shutdown, and by tests that read the log).
    pub async fn flush(&self) -> Result<(), Stopped> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Flush { reply })
            .await
            .map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)?;
        if let Some(d) = &self.decisions {
            d.flush().await;
        }
        Ok(())
    }

    /// The decision log, when the scheduler keeps one.
    pub fn decisions(&self) -> Option<&DecisionLog> {
        self.decisions.as_ref()
    }

    /// Follow every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }
}

struct Actor {
    table: LeaseTable,
    inventory: &'static str,
    waiters: HashMap<String, mpsc::UnboundedSender<WaiterNotice>>,
    events: broadcast::Sender<Event>,
    persist: Option<PersistOptions>,
    dirty: bool,
    self_tx: mpsc::WeakSender<Msg>,
    decisions: Option<DecisionLog>,
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let persist_every = self
            .persist
            .as_ref()
            .map_or(Duration::from_secs(3600), |p| p.interval);
        let mut persist_tick = tokio::time::interval(persist_every);
        persist_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let sleep_for = self
                .table
                .next_deadline()
                .map(|d| Duration::from_millis(d.saturating_sub(now_ms())))
                .unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                msg = rx.recv() => {
                    let Some(msg) = msg else { break };
                    self.handle(msg);
                    // Drain what else is already queued before dispatching, to batch work.
                    while let Ok(msg) = rx.try_recv() {
                        self.handle(msg);
                    }
                }
                () = tokio::time::sleep(sleep_for) => {
                    self.table.tick(now_ms());
                    self.dirty = true;
                }
                _ = persist_tick.tick(), if self.dirty => self.save(),
            }
            self.dispatch();
        }
        self.save();
    }

    fn save(&mut self) {
        if let Some(p) = &self.persist {
            match persist::save(&p.path, &self.table.snapshot()) {
                Ok(()) => self.dirty = false,
                Err(e) => tracing::warn!("{e}"),
            }
        }
    }

    fn view(&self, pos: usize) -> GpuView {
        GpuView {
            gpu: self.table.gpus()[pos].clone(),
            account: self.table.account(pos),
            overcommitted: self.table.is_overcommitted(pos),
        }
    }

    fn handle(&mut self, msg: Msg) {
        let now = now_ms();
        // Time-outs first, so nothing past its deadline can be renewed or counted. An expiry
        // marks the snapshot dirty even when the message itself (a status read) changes nothing.
        if self.table.tick(now) {
            self.dirty = true;
        }
        match msg {
            Msg::Acquire {
                req,
                trace_id,
                updates,
                reply,
            } => {
                let out = self.table.acquire_traced(req, trace_id, now);
                if let Ok(AcquireOutcome::Queued(pos)) = &out {
                    self.waiters.insert(pos.ticket.clone(), updates);
                }
                let _ = reply.send(out);
            }
            Msg::Release { id, reply } => {
                let _ = reply.send(self.table.release(&id, now));
            }
            Msg::Renew {
                id,
                ttl_ms,
                pids,
                idle,
                priority,
                reply,
            } => {
                let _ = reply.send(self.table.renew_as(&id, ttl_ms, pids, idle, priority, now));
            }
            Msg::Resize { id, bytes, reply } => {
                let _ = reply.send(self.table.resize(&id, bytes, now));
            }
            Msg::Reattach {
                holder,
                leases,
                reply,
            } => {
                let _ = reply.send(self.table.reattach(&holder, leases, now));
            }
            Msg::SetForeign { gpu, bytes, reply } => {
                let out = self
                    .table
                    .set_simulated_foreign(gpu, bytes, now)
                    .map(|g| g.index);
                let out = out.map(|index| {
                    let pos = self
                        .table
                        .gpus()
                        .iter()
                        .position(|g| g.index == index)
                        .unwrap_or(0);
                    self.view(pos)
                });
                let _ = reply.send(out);
            }
            Msg::Observe(obs) => self.table.observe(&obs, now),
            Msg::Cancel { ticket } => {
                self.waiters.remove(&ticket);
                self.table.cancel_waiter(&ticket, now);
            }
            Msg::Status { reply } => {
                let view = StatusView {
                    inventory: self.inventory,
                    gpus: (0..self.table.gpus().len()).map(|p| self.view(p)).collect(),
                    leases: self.table.leases().cloned().collect(),
                    queue: self.table.queue().to_vec(),
                };
                let _ = reply.send(view);
                return;
            }
            Msg::Flush { reply } => {
                // Decisions made so far go to the log queue before the reply, so a flush of the
                // log after this one covers them.
                self.publish_events();
                self.save();
                let _ = reply.send(());
                return;
            }
        }
        self.dirty = true;
    }

    /// Record events in the decision log and publish them to `WatchEvents`.
    fn publish_events(&mut self) {
        for e in self.table.take_events() {
            if let Some(d) = &self.decisions {
                d.record_event(&e);
            }
            let _ = self.events.send(e);
        }
    }

    /// Publish events and route notices to waiting callers. A caller that went away gets its
    /// request withdrawn, or its fresh lease released.
    fn dispatch(&mut self) {
        self.publish_events();
        let mut gone_waiting = Vec::new();
        let mut gone_granted = Vec::new();
        for n in self.table.take_notices() {
            let ticket = n.ticket().to_string();
            let last = !matches!(n, WaiterNotice::Position(_));
            let granted = match &n {
                WaiterNotice::Granted { lease, .. } => Some(lease.id.clone()),
                _ => None,
            };
            let delivered = match self.waiters.get(&ticket) {
                Some(tx) => tx.send(n).is_ok(),
                None => false,
            };
            if last {
                self.waiters.remove(&ticket);
            }
            match (delivered, granted) {
                (false, Some(lease)) => gone_granted.push(lease),
                (false, None) if !last => gone_waiting.push(ticket),
                _ => {}
            }
        }
        if gone_waiting.is_empty() && gone_granted.is_empty() {
            return;
        }
        let now = now_ms();
        for t in gone_waiting {
            self.waiters.remove(&t);
            self.table.cancel_waiter(&t, now);
        }
        for id in gone_granted {
            tracing::info!(lease = %id, "caller left before its grant arrived; releasing");
            let _ = self.table.release(&id, now);
        }
        self.dirty = true;
        // Releasing may grant to others: route those notices too.
        if let Some(tx) = self.self_tx.upgrade() {
            let _ = tx.try_send(Msg::Observe(Vec::new()));
        }
    }
}
