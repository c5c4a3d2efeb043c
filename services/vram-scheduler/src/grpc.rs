//! The gRPC edge: decode, call the [`SchedulerHandle`], encode. Errors are mapped to gRPC status
//! codes here and nowhere else.

use std::pin::Pin;
use std::time::Instant;

use futures::Stream;
use securellm_common::errors::{self, Reason};
use securellm_proto::v1 as pb;
use securellm_proto::v1::vram_scheduler_server::{VramScheduler, VramSchedulerServer};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{BroadcastStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status};
use tracing::Instrument;
use tracing::field::Empty;

use crate::actor::{CallError, GpuView, SchedulerHandle, StatusView};
use crate::metrics::{self as m, AcquireOutcomeLabel as Outcome};
use crate::table::{
    AcquireOutcome, AcquireRequest, Event, EventKind, Lease, QueuePos, TableError, WaiterNotice,
};

/// The `securellm.v1.VramScheduler` service.
#[derive(Clone)]
pub struct SchedulerService {
    handle: SchedulerHandle,
}

impl SchedulerService {
    pub fn new(handle: SchedulerHandle) -> Self {
        Self { handle }
    }

    pub fn into_server(self) -> VramSchedulerServer<Self> {
        VramSchedulerServer::new(self)
    }
}

fn status_of(e: CallError) -> Status {
    match e {
        CallError::Stopped(s) => Status::unavailable(s.to_string()),
        CallError::Table(t) => match &t {
            TableError::InvalidArgument { .. } => Status::invalid_argument(t.to_string()),
            TableError::NeverFits { .. } => errors::status(Reason::NeverFits, t.to_string()),
            TableError::NotFound(m) => Status::not_found(m.clone()),
            TableError::ResourceExhausted(m) => {
                errors::status(Reason::InsufficientGpuMemory, m.clone())
            }
            TableError::FailedPrecondition(m) => Status::failed_precondition(m.clone()),
        },
    }
}

/// Proto view of a lease.
pub fn lease_to_pb(l: &Lease) -> pb::Lease {
    pb::Lease {
        id: l.id.clone(),
        holder: l.holder.clone(),
        label: l.label.clone(),
        gpu_index: l.gpu,
        bytes: l.bytes,
        priority: l.priority,
        ttl_ms: l.ttl_ms,
        granted_at_ms: l.granted_at_ms,
        expires_at_ms: l.expires_at_ms,
        pids: l.pids.clone(),
        idle: l.idle,
        evict_by_ms: l.evict_by_ms,
        last_used_ms: l.last_used_ms,
    }
}

/// Lease from its proto view (for `Reattach`).
pub fn lease_from_pb(l: pb::Lease) -> Lease {
    Lease {
        id: l.id,
        holder: l.holder,
        label: l.label,
        gpu: l.gpu_index,
        bytes: l.bytes,
        priority: l.priority,
        ttl_ms: l.ttl_ms,
        granted_at_ms: l.granted_at_ms,
        expires_at_ms: l.expires_at_ms,
        pids: l.pids,
        idle: l.idle,
        evict_by_ms: l.evict_by_ms,
        last_used_ms: l.last_used_ms,
    }
}

fn pos_to_pb(p: &QueuePos) -> pb::QueuePosition {
    pb::QueuePosition {
        ticket: p.ticket.clone(),
        position: p.position,
        queue_length: p.queue_length,
        evictions_requested: p.evictions_requested,
    }
}

fn gpu_to_pb(v: &GpuView) -> pb::GpuStatus {
    let g = &v.gpu;
    let a = &v.account;
    let used = if g.simulated {
        a.granted.saturating_add(a.foreign).min(g.total)
    } else {
        g.observed_used
    };
    pb::GpuStatus {
        index: g.index,
        uuid: g.uuid.clone(),
        name: g.name.clone(),
        simulated: g.simulated,
        total_bytes: g.total,
        used_bytes: used,
        free_bytes: g.total.saturating_sub(used),
        leased_bytes: a.granted,
        foreign_bytes: a.foreign,
        reserve_bytes: a.reserve,
        grantable_bytes: a.grantable(),
        processes: g
            .processes
            .iter()
            .flatten()
            .map(|(pid, used)| pb::GpuProcess {
                pid: *pid,
                used_bytes: *used,
                lease_id: String::new(),
            })
            .collect(),
        overcommitted: v.overcommitted,
    }
}

/// Proto view of the whole status.
pub fn status_to_pb(s: &StatusView) -> pb::SchedulerStatus {
    let mut gpus: Vec<pb::GpuStatus> = s.gpus.iter().map(gpu_to_pb).collect();
    for g in &mut gpus {
        for p in &mut g.processes {
            if let Some(l) = s
                .leases
                .iter()
                .find(|l| l.gpu == g.index && l.pids.contains(&p.pid))
            {
                p.lease_id = l.id.clone();
            }
        }
    }
    pb::SchedulerStatus {
        inventory: s.inventory.to_string(),
        gpus,
        leases: s.leases.iter().map(lease_to_pb).collect(),
        queue: s
            .queue
            .iter()
            .enumerate()
            .map(|(i, w)| pb::QueuedRequest {
                ticket: w.ticket.clone(),
                holder: w.req.holder.clone(),
                label: w.req.label.clone(),
                bytes: w.req.bytes,
                priority: w.req.priority,
                gpu_index: w.req.gpu,
                position: i as u32,
                queued_at_ms: w.queued_at_ms,
                wait_until_ms: w.wait_until_ms,
            })
            .collect(),
    }
}

fn kind_to_pb(k: EventKind) -> pb::lease_event::Kind {
    use pb::lease_event::Kind as K;
    match k {
        EventKind::Granted => K::Granted,
        EventKind::Released => K::Released,
        EventKind::Expired => K::Expired,
        EventKind::EvictionNotice => K::EvictionNotice,
        EventKind::Revoked => K::Revoked,
        EventKind::Resized => K::Resized,
        EventKind::Queued => K::Queued,
        EventKind::WaitTimedOut => K::WaitTimedOut,
        EventKind::Reattached => K::Reattached,
        EventKind::Overcommitted => K::Overcommitted,
        EventKind::EvictionWithdrawn => K::EvictionWithdrawn,
    }
}

fn event_to_pb(e: &Event) -> pb::LeaseEvent {
    pb::LeaseEvent {
        kind: kind_to_pb(e.kind) as i32,
        lease: Some(lease_to_pb(&e.lease)),
        at_ms: e.at_ms,
        detail: e.detail.clone(),
    }
}

/// The gRPC code's name for `error.type` (a closed set, as the RPC conventions want).
fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match c {
        C::Ok => "OK",
        C::Cancelled => "CANCELLED",
        C::Unknown => "UNKNOWN",
        C::InvalidArgument => "INVALID_ARGUMENT",
        C::DeadlineExceeded => "DEADLINE_EXCEEDED",
        C::NotFound => "NOT_FOUND",
        C::AlreadyExists => "ALREADY_EXISTS",
        C::PermissionDenied => "PERMISSION_DENIED",
        C::ResourceExhausted => "RESOURCE_EXHAUSTED",
        C::FailedPrecondition => "FAILED_PRECONDITION",
        C::Aborted => "ABORTED",
        C::OutOfRange => "OUT_OF_RANGE",
        C::Unimplemented => "UNIMPLEMENTED",
        C::Internal => "INTERNAL",
        C::Unavailable => "UNAVAILABLE",
        C::DataLoss => "DATA_LOSS",
        C::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// An acquire's answer: its outcome and queued time on the span, its wait in the histogram.
fn finish_acquire(span: &tracing::Span, started: Instant, outcome: Outcome) {
    let waited = started.elapsed();
    span.record("securellm.acquire.outcome", outcome.as_str());
    span.record(
        "securellm.acquire.queued_ms",
        u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
    );
    m::record_acquire_wait(outcome, waited);
}

/// A queue position reached: the latest position, and whether notices went out for it.
fn record_position(span: &tracing::Span, p: &QueuePos) {
    span.record("securellm.acquire.queue_position", p.position);
    if p.evictions_requested {
        span.record("securellm.acquire.eviction_notices_sent", true);
    }
}

/// A lease call's answer on its span: who and what on success, the code on failure.
fn lease_result(span: &tracing::Span, out: Result<Lease, CallError>) -> Result<Lease, Status> {
    match out {
        Ok(l) => {
            span.record("securellm.lease.holder", l.holder.as_str());
            span.record("gen_ai.request.model", l.label.as_str());
            span.record("securellm.lease.bytes", l.bytes);
            Ok(l)
        }
        Err(e) => {
            let st = status_of(e);
            span.record("error.type", code_name(st.code()));
            Err(st)
        }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn granted(l: &Lease) -> pb::AcquireLeaseUpdate {
    pb::AcquireLeaseUpdate {
        update: Some(pb::acquire_lease_update::Update::Granted(lease_to_pb(l))),
    }
}

#[tonic::async_trait]
impl VramScheduler for SchedulerService {
    type AcquireLeaseStream = BoxStream<pb::AcquireLeaseUpdate>;

    async fn acquire_lease(
        &self,
        request: Request<pb::AcquireLeaseRequest>,
    ) -> Result<Response<Self::AcquireLeaseStream>, Status> {
        let started = Instant::now();
        // Named in the decision log by the grant and the eviction notices this request causes.
        let trace_id =
            securellm_common::telemetry::trace_id(Some(&request.metadata().clone().into_headers()));
        let r = request.into_inner();
        let span = tracing::info_span!(
            "scheduler.acquire",
            otel.name = "scheduler.acquire",
            securellm.lease.holder = %r.holder,
            gen_ai.request.model = %r.label,
            securellm.lease.bytes = r.bytes,
            securellm.lease.priority = r.priority,
            securellm.lease.gpu = r.gpu_index.map(i64::from).unwrap_or(-1),
            securellm.acquire.wait_ms = r.wait_ms,
            securellm.acquire.outcome = Empty,
            securellm.acquire.queued = false,
            securellm.acquire.queued_ms = Empty,
            securellm.acquire.queue_position_first = Empty,
            securellm.acquire.queue_position = Empty,
            securellm.acquire.eviction_notices_sent = false,
            securellm.lease.gpu_granted = Empty,
            error.type = Empty,
        );
        let req = AcquireRequest {
            holder: r.holder,
            label: r.label,
            bytes: r.bytes,
            priority: r.priority,
            gpu: r.gpu_index,
            ttl_ms: r.ttl_ms,
            wait_ms: r.wait_ms,
        };
        let (utx, mut urx) = mpsc::unbounded_channel();
        let outcome = match self
            .handle
            .acquire_traced(req, trace_id, utx)
            .instrument(span.clone())
            .await
        {
            Ok(o) => o,
            Err(e) => {
                let st = status_of(e);
                finish_acquire(&span, started, Outcome::Rejected);
                span.record("error.type", code_name(st.code()));
                return Err(st);
            }
        };
        match outcome {
            AcquireOutcome::Granted(l) => {
                span.record("securellm.lease.gpu_granted", l.gpu);
                finish_acquire(&span, started, Outcome::Granted);
                let s = tokio_stream::once(Ok(granted(&l)));
                Ok(Response::new(Box::pin(s)))
            }
            AcquireOutcome::Queued(pos) => {
                span.record("securellm.acquire.queued", true);
                span.record("securellm.acquire.queue_position_first", pos.position);
                record_position(&span, &pos);
                let (tx, rx) = mpsc::unbounded_channel::<Result<pb::AcquireLeaseUpdate, Status>>();
                let first = pb::AcquireLeaseUpdate {
                    update: Some(pb::acquire_lease_update::Update::Queued(pos_to_pb(&pos))),
                };
                let _ = tx.send(Ok(first));
                let handle = self.handle.clone();
                let ticket = pos.ticket.clone();
                let task_span = span.clone();
                tokio::spawn(async move {
                    let span = tracing::Span::current();
                    loop {
                        tokio::select! {
                            () = tx.closed() => {
                                // The caller went away while queued. A grant may have raced
                                // with it: release that lease rather than leak it.
                                handle.cancel(ticket).await;
                                // Closed: a grant sent after this fails to deliver, and the actor
                                // releases it; one already delivered is released here.
                                urx.close();
                                while let Ok(n) = urx.try_recv() {
                                    if let WaiterNotice::Granted { lease, .. } = n {
                                        let _ = handle.release(lease.id).await;
                                    }
                                }
                                finish_acquire(&span, started, Outcome::Cancelled);
                                return;
                            }
                            n = urx.recv() => {
                                let Some(n) = n else {
                                    // The actor stopped (shutdown): the caller's stream ends.
                                    finish_acquire(&span, started, Outcome::Rejected);
                                    span.record("error.type", "scheduler_stopped");
                                    return;
                                };
                                match n {
                                    WaiterNotice::Position(p) => {
                                        record_position(&span, &p);
                                        let u = pb::AcquireLeaseUpdate {
                                            update: Some(pb::acquire_lease_update::Update::Queued(pos_to_pb(&p))),
                                        };
                                        let _ = tx.send(Ok(u));
                                    }
                                    WaiterNotice::Granted { lease, .. } => {
                                        span.record("securellm.lease.gpu_granted", lease.gpu);
                                        if tx.send(Ok(granted(&lease))).is_err() {
                                            let _ = handle.release(lease.id).await;
                                            finish_acquire(&span, started, Outcome::Cancelled);
                                        } else {
                                            finish_acquire(&span, started, Outcome::Granted);
                                        }
                                        return;
                                    }
                                    WaiterNotice::TimedOut { .. } => {
                                        let _ = tx.send(Err(Status::deadline_exceeded(
                                            "still queued when wait_ms ran out",
                                        )));
                                        finish_acquire(&span, started, Outcome::Timeout);
                                        span.record("error.type", "timeout");
                                        return;
                                    }
                                }
                            }
                        }
                    }
                }.instrument(task_span));
                Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
            }
        }
    }

    async fn renew_lease(
        &self,
        request: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        let r = request.into_inner();
        let span = tracing::info_span!(
            "scheduler.renew",
            otel.name = "scheduler.renew",
            securellm.lease.ttl_ms = r.ttl_ms,
            securellm.lease.idle = r.idle,
            securellm.lease.priority = Empty,
            securellm.lease.holder = Empty,
            gen_ai.request.model = Empty,
            securellm.lease.bytes = Empty,
            securellm.lease.evicting = Empty,
            error.type = Empty,
        );
        if let Some(p) = r.priority {
            span.record("securellm.lease.priority", p);
        }
        let out = self
            .handle
            .renew(r.lease_id, r.ttl_ms, r.pids, r.idle, r.priority)
            .instrument(span.clone())
            .await;
        let l = lease_result(&span, out)?;
        span.record("securellm.lease.evicting", l.evict_by_ms.is_some());
        Ok(Response::new(lease_to_pb(&l)))
    }

    async fn release_lease(
        &self,
        request: Request<pb::ReleaseLeaseRequest>,
    ) -> Result<Response<pb::ReleaseLeaseResponse>, Status> {
        let span = tracing::info_span!(
            "scheduler.release",
            otel.name = "scheduler.release",
            securellm.lease.holder = Empty,
            gen_ai.request.model = Empty,
            securellm.lease.bytes = Empty,
            securellm.lease.priority = Empty,
            error.type = Empty,
        );
        let out = self
            .handle
            .release(request.into_inner().lease_id)
            .instrument(span.clone())
            .await;
        let l = lease_result(&span, out)?;
        span.record("securellm.lease.priority", l.priority);
        Ok(Response::new(pb::ReleaseLeaseResponse {
            lease: Some(lease_to_pb(&l)),
        }))
    }

    async fn resize_lease(
        &self,
        request: Request<pb::ResizeLeaseRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        let r = request.into_inner();
        let l = self
            .handle
            .resize(r.lease_id, r.bytes)
            .await
            .map_err(status_of)?;
        Ok(Response::new(lease_to_pb(&l)))
    }

    async fn reattach(
        &self,
        request: Request<pb::ReattachRequest>,
    ) -> Result<Response<pb::ReattachResponse>, Status> {
        let r = request.into_inner();
        let leases = r.leases.into_iter().map(lease_from_pb).collect();
        let out = self
            .handle
            .reattach(r.holder, leases)
            .await
            .map_err(status_of)?;
        Ok(Response::new(pb::ReattachResponse {
            confirmed: out.confirmed.iter().map(lease_to_pb).collect(),
            restored: out.restored.iter().map(lease_to_pb).collect(),
            lost: out
                .lost
                .into_iter()
                .map(|(lease_id, reason)| pb::LostLease { lease_id, reason })
                .collect(),
        }))
    }

    async fn get_status(
        &self,
        _request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::SchedulerStatus>, Status> {
        let s = self
            .handle
            .status()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(status_to_pb(&s)))
    }

    type WatchEventsStream = BoxStream<pb::LeaseEvent>;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let holder = request.into_inner().holder;
        // A client too slow to keep up (its events no longer fit the buffer) gets DATA_LOSS and
        // the end of the stream rather than a silent gap: it should re-read GetStatus (or
        // Reattach) and watch again.
        let events = BroadcastStream::new(self.handle.subscribe());
        let s = futures::stream::unfold(Some(events), move |events| {
            let holder = holder.clone();
            async move {
                let mut events = events?;
                loop {
                    match events.next().await? {
                        Ok(e) if holder.is_empty() || e.lease.holder == holder => {
                            return Some((Ok(event_to_pb(&e)), Some(events)));
                        }
                        Ok(_) => {}
                        Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(
                            n,
                        )) => {
                            tracing::warn!("a WatchEvents client fell behind by {n} events");
                            let st = Status::data_loss(format!(
                                "this watcher fell behind and {n} events were dropped; re-read \
                                 GetStatus and watch again"
                            ));
                            return Some((Err(st), None));
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(s)))
    }

    async fn set_simulated_foreign_usage(
        &self,
        request: Request<pb::SetSimulatedForeignUsageRequest>,
    ) -> Result<Response<pb::GpuStatus>, Status> {
        let r = request.into_inner();
        let v = self
            .handle
            .set_simulated_foreign(r.gpu_index, r.foreign_bytes)
            .await
            .map_err(status_of)?;
        Ok(Response::new(gpu_to_pb(&v)))
    }
}
