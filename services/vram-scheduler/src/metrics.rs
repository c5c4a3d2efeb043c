//! The scheduler's Prometheus metrics (the names are the contract in `docs/metrics.md`).
//!
//! - State gauges (per-GPU bytes, leases by state, queue depth) are set by [`collect`], which the
//!   `/metrics` listener runs before each scrape: it reads the actor's status snapshot, so a gauge
//!   is never stale and nothing on the lease path sets one.
//! - Counters (grants, eviction notices, revocations, expiries, releases) come from the actor's
//!   event broadcast ([`spawn_event_counter`]): the table's own record of what happened.
//! - The acquire wait histogram ([`record_acquire_wait`]) is recorded by the gRPC edge, which sees
//!   how a caller's wait ended; NVML refresh errors ([`nvml_refresh_error`]) by the refresh loop.
//!
//! Label values come from closed sets only: GPU indexes, a fixed set of lease states, priority
//! classes ([`priority_label`]) and acquire outcomes. Never a holder, label or lease id.

use std::sync::Arc;
use std::time::Duration;

use securellm_common::prometheus::Collect;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use crate::actor::{SchedulerHandle, StatusView};
use crate::table::{Event, EventKind, Lease};

pub const GPU_TOTAL: &str = "securellm_scheduler_gpu_total_bytes";
pub const GPU_LEASED: &str = "securellm_scheduler_gpu_leased_bytes";
pub const GPU_FOREIGN: &str = "securellm_scheduler_gpu_foreign_bytes";
pub const GPU_RESERVE: &str = "securellm_scheduler_gpu_reserve_bytes";
pub const GPU_GRANTABLE: &str = "securellm_scheduler_gpu_grantable_bytes";
pub const GPU_OVERCOMMITTED: &str = "securellm_scheduler_gpu_overcommitted";
pub const LEASES: &str = "securellm_scheduler_leases";
pub const QUEUE_DEPTH: &str = "securellm_scheduler_queue_depth";
pub const GRANTS: &str = "securellm_scheduler_grants_total";
pub const EVICTION_NOTICES: &str = "securellm_scheduler_eviction_notices_total";
pub const REVOCATIONS: &str = "securellm_scheduler_revocations_total";
pub const EXPIRIES: &str = "securellm_scheduler_expiries_total";
pub const RELEASES: &str = "securellm_scheduler_releases_total";
pub const ACQUIRE_WAIT: &str = "securellm_scheduler_acquire_wait_seconds";
pub const NVML_REFRESH_ERRORS: &str = "securellm_scheduler_nvml_refresh_errors_total";
pub const EVENTS_LAGGED: &str = "securellm_scheduler_metrics_events_lagged_total";
/// Decisions the hash-chained log could not write (queue full, failed write): must stay 0.
pub const DECISIONS_DROPPED: &str = "securellm_scheduler_decisions_dropped_total";

/// Every lease state the `securellm_scheduler_leases` gauge reports (each set every scrape, 0
/// included, so a state that empties reads 0 rather than its last value).
pub const LEASE_STATES: [&str; 3] = ["active", "idle", "evicting"];

/// A lease's state for the `state` label: `evicting` while an eviction notice is pending, else
/// `idle` (no request in flight, as its holder last reported) or `active`.
pub fn lease_state(l: &Lease) -> &'static str {
    if l.evict_by_ms.is_some() {
        "evicting"
    } else if l.idle {
        "idle"
    } else {
        "active"
    }
}

/// Priorities an operator uses day to day get their own label value; the rest fall into two open
/// ends, so a caller choosing arbitrary priorities cannot create unbounded series.
pub const PRIORITY_LABEL_RANGE: std::ops::RangeInclusive<i32> = -10..=10;

/// The `priority` label of a grant: the number for -10..=10, else `below_-10` / `above_10`.
pub fn priority_label(p: i32) -> String {
    if p < *PRIORITY_LABEL_RANGE.start() {
        format!("below_{}", PRIORITY_LABEL_RANGE.start())
    } else if p > *PRIORITY_LABEL_RANGE.end() {
        format!("above_{}", PRIORITY_LABEL_RANGE.end())
    } else {
        p.to_string()
    }
}

/// The counter an event moves, if any (grants carry a priority label; see [`record_event`]).
pub fn counter_for(kind: EventKind) -> Option<&'static str> {
    match kind {
        EventKind::Granted => Some(GRANTS),
        EventKind::EvictionNotice => Some(EVICTION_NOTICES),
        EventKind::Revoked => Some(REVOCATIONS),
        EventKind::Expired => Some(EXPIRIES),
        EventKind::Released => Some(RELEASES),
        EventKind::Resized
        | EventKind::Queued
        | EventKind::WaitTimedOut
        | EventKind::Reattached
        | EventKind::Overcommitted
        | EventKind::EvictionWithdrawn => None,
    }
}

/// Move the counter `e` stands for.
pub fn record_event(e: &Event) {
    match counter_for(e.kind) {
        Some(GRANTS) => {
            metrics::counter!(GRANTS, "priority" => priority_label(e.lease.priority)).increment(1)
        }
        Some(name) => metrics::counter!(name).increment(1),
        None => {}
    }
}

/// Turn the actor's events into counters until the actor stops. A receiver that falls behind
/// (its buffer overflowed) counts the events it missed in
/// `securellm_scheduler_metrics_events_lagged_total` and carries on.
pub fn spawn_event_counter(mut events: broadcast::Receiver<Event>) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(e) => record_event(&e),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!("metrics: fell behind the scheduler's events by {n}");
                    metrics::counter!(EVENTS_LAGGED).increment(n);
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    })
}

/// Set every state gauge from one consistent status snapshot.
pub fn set_gauges(view: &StatusView) {
    for g in &view.gpus {
        let gpu = g.gpu.index.to_string();
        let a = &g.account;
        metrics::gauge!(GPU_TOTAL, "gpu" => gpu.clone()).set(g.gpu.total as f64);
        metrics::gauge!(GPU_LEASED, "gpu" => gpu.clone()).set(a.granted as f64);
        metrics::gauge!(GPU_FOREIGN, "gpu" => gpu.clone()).set(a.foreign as f64);
        metrics::gauge!(GPU_RESERVE, "gpu" => gpu.clone()).set(a.reserve as f64);
        metrics::gauge!(GPU_GRANTABLE, "gpu" => gpu.clone()).set(a.grantable() as f64);
        metrics::gauge!(GPU_OVERCOMMITTED, "gpu" => gpu).set(if g.overcommitted {
            1.0
        } else {
            0.0
        });
    }
    for (state, n) in leases_by_state(&view.leases) {
        metrics::gauge!(LEASES, "state" => state).set(n as f64);
    }
    metrics::gauge!(QUEUE_DEPTH).set(view.queue.len() as f64);
}

/// How many leases are in each of [`LEASE_STATES`] (every state listed, 0 included).
pub fn leases_by_state(leases: &[Lease]) -> [(&'static str, usize); 3] {
    LEASE_STATES.map(|s| (s, leases.iter().filter(|l| lease_state(l) == s).count()))
}

/// The `/metrics` hook: read the actor's status and set the gauges. A stopped actor leaves them
/// as they were (the scrape still answers).
pub fn collect(handle: SchedulerHandle) -> Collect {
    Arc::new(move || {
        let handle = handle.clone();
        Box::pin(async move {
            if let Ok(view) = handle.status().await {
                set_gauges(&view);
            }
            if let Some(log) = handle.decisions() {
                metrics::counter!(DECISIONS_DROPPED).absolute(log.dropped_total());
            }
        })
    })
}

/// How a caller's acquire ended, for the wait histogram's `outcome` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcquireOutcomeLabel {
    /// A lease was delivered (at once or after queueing).
    Granted,
    /// Refused (invalid, never fits, no room and no wait, the scheduler stopping).
    Rejected,
    /// Still queued when `wait_ms` ran out.
    Timeout,
    /// The caller went away while queued (or before its grant could be delivered).
    Cancelled,
}

impl AcquireOutcomeLabel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Granted => "granted",
            Self::Rejected => "rejected",
            Self::Timeout => "timeout",
            Self::Cancelled => "cancelled",
        }
    }
}

/// Record one acquire's wait, from the call to its answer.
pub fn record_acquire_wait(outcome: AcquireOutcomeLabel, waited: Duration) {
    metrics::histogram!(ACQUIRE_WAIT, "outcome" => outcome.as_str()).record(waited.as_secs_f64());
}

/// One failed NVML read.
pub fn nvml_refresh_error() {
    metrics::counter!(NVML_REFRESH_ERRORS).increment(1);
}

/// Register help texts (shown as `# HELP` in the scrape) and make the counters appear at 0 before
/// their first event, so a rate() over them has a start.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(GPU_TOTAL, metrics::Unit::Bytes, "GPU memory.");
    describe_gauge!(
        GPU_LEASED,
        metrics::Unit::Bytes,
        "GPU memory held by leases."
    );
    describe_gauge!(
        GPU_FOREIGN,
        metrics::Unit::Bytes,
        "GPU memory used outside any lease."
    );
    describe_gauge!(
        GPU_RESERVE,
        metrics::Unit::Bytes,
        "GPU memory never granted."
    );
    describe_gauge!(
        GPU_GRANTABLE,
        metrics::Unit::Bytes,
        "GPU memory a new lease could get now."
    );
    describe_gauge!(
        GPU_OVERCOMMITTED,
        "1 when leased + foreign + reserve exceed the GPU's total."
    );
    describe_gauge!(LEASES, "Leases by state.");
    describe_gauge!(QUEUE_DEPTH, "Acquire requests waiting in the queue.");
    describe_counter!(GRANTS, "Leases granted.");
    describe_counter!(EVICTION_NOTICES, "Eviction notices sent to lease holders.");
    describe_counter!(REVOCATIONS, "Leases revoked after the eviction grace.");
    describe_counter!(EXPIRIES, "Leases that expired (not renewed in time).");
    describe_counter!(RELEASES, "Leases released by their holder.");
    describe_histogram!(
        ACQUIRE_WAIT,
        metrics::Unit::Seconds,
        "From an acquire call to its answer, by outcome."
    );
    describe_counter!(NVML_REFRESH_ERRORS, "Failed NVML reads.");
    describe_counter!(
        EVENTS_LAGGED,
        "Scheduler events the metrics counter missed (it fell behind the event buffer)."
    );
    describe_counter!(
        DECISIONS_DROPPED,
        "GPU decisions the hash-chained decision log could not write (each leaves a gap row)."
    );
    for name in [
        DECISIONS_DROPPED,
        EVICTION_NOTICES,
        REVOCATIONS,
        EXPIRIES,
        RELEASES,
        NVML_REFRESH_ERRORS,
        EVENTS_LAGGED,
    ] {
        metrics::counter!(name).increment(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(idle: bool, evict_by_ms: Option<u64>) -> Lease {
        Lease {
            id: "l".into(),
            holder: "h".into(),
            label: String::new(),
            gpu: 0,
            bytes: 1,
            priority: 0,
            ttl_ms: 1000,
            granted_at_ms: 0,
            expires_at_ms: 1000,
            pids: vec![],
            idle,
            evict_by_ms,
            last_used_ms: 0,
        }
    }

    #[test]
    fn lease_states() {
        assert_eq!(lease_state(&lease(false, None)), "active");
        assert_eq!(lease_state(&lease(true, None)), "idle");
        // A pending notice wins over idle/busy: the lease is on its way out either way.
        assert_eq!(lease_state(&lease(true, Some(5))), "evicting");
        assert_eq!(lease_state(&lease(false, Some(5))), "evicting");
        let all = [
            lease(false, None),
            lease(false, None),
            lease(true, None),
            lease(true, Some(1)),
        ];
        assert_eq!(
            leases_by_state(&all),
            [("active", 2), ("idle", 1), ("evicting", 1)]
        );
        // Every state is reported, even with no leases.
        assert_eq!(
            leases_by_state(&[]),
            [("active", 0), ("idle", 0), ("evicting", 0)]
        );
    }

    #[test]
    fn priority_labels_are_bounded() {
        assert_eq!(priority_label(0), "0");
        assert_eq!(priority_label(10), "10");
        assert_eq!(priority_label(-10), "-10");
        assert_eq!(priority_label(11), "above_10");
        assert_eq!(priority_label(i32::MAX), "above_10");
        assert_eq!(priority_label(-11), "below_-10");
        assert_eq!(priority_label(i32::MIN), "below_-10");
        let distinct: std::collections::HashSet<String> =
            (-100_000..=100_000).map(priority_label).collect();
        assert_eq!(distinct.len(), 23);
    }

    #[test]
    fn events_map_to_their_counters() {
        assert_eq!(counter_for(EventKind::Granted), Some(GRANTS));
        assert_eq!(
            counter_for(EventKind::EvictionNotice),
            Some(EVICTION_NOTICES)
        );
        assert_eq!(counter_for(EventKind::Revoked), Some(REVOCATIONS));
        assert_eq!(counter_for(EventKind::Expired), Some(EXPIRIES));
        assert_eq!(counter_for(EventKind::Released), Some(RELEASES));
        for k in [
            EventKind::Resized,
            EventKind::Queued,
            EventKind::WaitTimedOut,
            EventKind::Reattached,
            EventKind::Overcommitted,
            EventKind::EvictionWithdrawn,
        ] {
            assert_eq!(counter_for(k), None, "{k:?}");
        }
    }

    #[test]
    fn outcome_labels() {
        use AcquireOutcomeLabel::*;
        let labels: Vec<_> = [Granted, Rejected, Timeout, Cancelled]
            .iter()
            .map(|o| o.as_str())
            .collect();
        assert_eq!(labels, ["granted", "rejected", "timeout", "cancelled"]);
    }
}
