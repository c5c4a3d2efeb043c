//! The backend manager's Prometheus metrics (`securellm_backend_*`, catalogued in
//! `docs/metrics.md`).
//!
//! - Loads, lease waits, crashes and unloads are recorded by the instance actor from the life
//!   cycle's actions and its own tasks' results (the state machine itself stays pure).
//! - Inference calls are counted by a [`Request`] guard that lives as long as the call (in-flight
//!   gauge, result on drop: a call that ends early without saying it succeeded is an error).
//! - Instances by state are set by [`collect`] just before each scrape from the instances
//!   themselves.
//!
//! Labels come from closed sets: states, reasons, kinds, and model names the registry knows
//! (`_other` when a request never resolved to one).

use std::sync::Arc;
use std::time::{Duration, Instant};

use securellm_common::prometheus::Collect;
use securellm_proto::v1 as pb;

use crate::forward::Endpoint;
use crate::manager::Manager;

pub const INSTANCES: &str = "securellm_backend_instances";
pub const LOADS: &str = "securellm_backend_loads_total";
pub const LOAD_DURATION: &str = "securellm_backend_load_duration_seconds";
pub const LEASE_WAIT: &str = "securellm_backend_lease_wait_seconds";
pub const CRASHES: &str = "securellm_backend_crashes_total";
pub const UNLOADS: &str = "securellm_backend_unloads_total";
pub const IN_FLIGHT: &str = "securellm_backend_requests_in_flight";
pub const REQUESTS: &str = "securellm_backend_requests_total";
pub const TTFT: &str = "securellm_backend_time_to_first_token_seconds";
pub const GENERATED_TOKENS: &str = "securellm_backend_generated_tokens_total";

/// The `model` label of a request that never resolved to a model the registry knows.
pub const OTHER_MODEL: &str = "_other";

/// Every instance state, for the gauge (0 when no instance is in it).
pub const STATES: [pb::InstanceState; 8] = [
    pb::InstanceState::Unloaded,
    pb::InstanceState::Leasing,
    pb::InstanceState::Starting,
    pb::InstanceState::Ready,
    pb::InstanceState::Busy,
    pb::InstanceState::Draining,
    pb::InstanceState::Stopped,
    pb::InstanceState::Failed,
];

/// The `state` label of an instance state.
pub fn state_label(s: pb::InstanceState) -> &'static str {
    match s {
        pb::InstanceState::Unspecified => "unspecified",
        pb::InstanceState::Unloaded => "unloaded",
        pb::InstanceState::Leasing => "leasing",
        pb::InstanceState::Starting => "starting",
        pb::InstanceState::Ready => "ready",
        pb::InstanceState::Busy => "busy",
        pb::InstanceState::Draining => "draining",
        pb::InstanceState::Stopped => "stopped",
        pb::InstanceState::Failed => "failed",
    }
}

/// The `kind` label of an endpoint.
pub fn kind_label(e: Endpoint) -> &'static str {
    match e {
        Endpoint::Chat => "chat",
        Endpoint::Completions => "completion",
        Endpoint::Embeddings => "embedding",
    }
}

/// Why an instance was unloaded, from the reason the life cycle gives a drain or a stop (its
/// words are fixed strings; a lease lost carries the scheduler's detail after a prefix). `None`
/// for words that only say how a drain ended (`drained`, `drain deadline`, a drain deferred
/// during a load): the reason is then the drain's own.
pub fn unload_reason(words: &str) -> Option<&'static str> {
    match words {
        "idle ttl" => Some("idle"),
        "eviction notice" => Some("evicted"),
        "unload requested" => Some("requested"),
        "shutdown" => Some("shutdown"),
        "crashed" => Some("crashed"),
        w if w.starts_with("lease lost") => Some("lease_lost"),
        _ => None,
    }
}

/// Describe the manager's metrics (help text in the scrape).
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(INSTANCES, "Model instances by state.");
    describe_counter!(LOADS, "Model loads by model and result (ok, failed).");
    describe_histogram!(
        LOAD_DURATION,
        Unit::Seconds,
        "Load time per model: engine spawn to ready."
    );
    describe_histogram!(
        LEASE_WAIT,
        Unit::Seconds,
        "Time a load waited for the scheduler's answer to its lease."
    );
    describe_counter!(CRASHES, "Engine exits nobody asked for, by model.");
    describe_counter!(
        UNLOADS,
        "Unloads by reason (idle, evicted, requested, shutdown, lease_lost)."
    );
    describe_gauge!(
        IN_FLIGHT,
        "Inference calls being served (load wait included)."
    );
    describe_counter!(
        REQUESTS,
        "Inference calls by model, kind (chat, completion, embedding) and result (ok, error)."
    );
    describe_histogram!(
        TTFT,
        Unit::Seconds,
        "Streamed calls: request to the first streamed token (load wait included)."
    );
    describe_counter!(GENERATED_TOKENS, "Completion tokens generated, by model.");
    // Counters exist at 0 from the start (per model: from its first load), so `increase()` and
    // the alert rules see their first event.
    for reason in UNLOAD_REASONS {
        metrics::counter!(UNLOADS, "reason" => reason).increment(0);
    }
}

/// Every `reason` label of the unloads counter.
pub const UNLOAD_REASONS: [&str; 7] = [
    "idle",
    "evicted",
    "requested",
    "shutdown",
    "crashed",
    "lease_lost",
    "other",
];

/// A load ended: `ok` with its duration (spawn → ready), or failed.
pub fn load_done(model: &str, ok: bool, took: Duration) {
    metrics::counter!(CRASHES, "model" => model.to_string()).increment(0);
    let result = if ok { "ok" } else { "failed" };
    metrics::counter!(LOADS, "model" => model.to_string(), "result" => result).increment(1);
    if ok {
        metrics::histogram!(LOAD_DURATION, "model" => model.to_string()).record(took.as_secs_f64());
    }
}

/// A load's lease wait ended (granted or not).
pub fn lease_waited(model: &str, took: Duration) {
    metrics::histogram!(LEASE_WAIT, "model" => model.to_string()).record(took.as_secs_f64());
}

pub fn crashed(model: &str) {
    metrics::counter!(CRASHES, "model" => model.to_string()).increment(1);
}

pub fn unloaded(reason: &'static str) {
    metrics::counter!(UNLOADS, "reason" => reason).increment(1);
}

/// Instances by state, every state present (0 when none).
pub fn census(states: impl IntoIterator<Item = pb::InstanceState>) -> Vec<(&'static str, u64)> {
    let mut out: Vec<(&'static str, u64)> = STATES.iter().map(|s| (state_label(*s), 0)).collect();
    for s in states {
        let l = state_label(s);
        if let Some(slot) = out.iter_mut().find(|(n, _)| *n == l) {
            slot.1 += 1;
        }
    }
    out
}

/// The scrape hook: set the instances gauge from the instances.
pub fn collect(manager: Manager) -> Collect {
    Arc::new(move || {
        let manager = manager.clone();
        Box::pin(async move {
            let mut states = Vec::new();
            for h in manager.handles() {
                if let Some(v) = h.view().await {
                    states.push(
                        pb::InstanceState::try_from(v.state)
                            .unwrap_or(pb::InstanceState::Unspecified),
                    );
                }
            }
            for (state, n) in census(states) {
                metrics::gauge!(INSTANCES, "state" => state).set(n as f64);
            }
        })
    })
}

/// One inference call, from its arrival to its end: in flight while it lives; counted once,
/// when dropped, as `ok` only if [`Request::ok`] was called.
pub struct Request {
    kind: &'static str,
    model: String,
    began: Instant,
    ok: bool,
    first_token: bool,
    generated: u32,
}

impl Request {
    pub fn begin(endpoint: Endpoint) -> Self {
        metrics::gauge!(IN_FLIGHT).increment(1.0);
        Self {
            kind: kind_label(endpoint),
            model: OTHER_MODEL.to_string(),
            began: Instant::now(),
            ok: false,
            first_token: false,
            generated: 0,
        }
    }

    /// The model the call is served by (a name the registry knows).
    pub fn model(&mut self, name: &str) {
        self.model = name.to_string();
    }

    /// The call succeeded.
    pub fn ok(&mut self) {
        self.ok = true;
    }

    /// A streamed token arrived; the first one is timed. Returns the time to it, once.
    pub fn token(&mut self) -> Option<Duration> {
        if self.first_token {
            return None;
        }
        self.first_token = true;
        let took = self.began.elapsed();
        metrics::histogram!(TTFT, "model" => self.model.clone()).record(took.as_secs_f64());
        Some(took)
    }

    /// Completion tokens the engine reports for this call (the last report counts, once, when
    /// the call ends).
    pub fn generated(&mut self, tokens: u32) {
        self.generated = tokens;
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        metrics::gauge!(IN_FLIGHT).decrement(1.0);
        if self.generated > 0 {
            metrics::counter!(GENERATED_TOKENS, "model" => self.model.clone())
                .increment(u64::from(self.generated));
        }
        let result = if self.ok { "ok" } else { "error" };
        metrics::counter!(
            REQUESTS,
            "model" => std::mem::take(&mut self.model),
            "kind" => self.kind,
            "result" => result
        )
        .increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unload_reasons_come_from_the_life_cycles_words() {
        assert_eq!(unload_reason("idle ttl"), Some("idle"));
        assert_eq!(unload_reason("eviction notice"), Some("evicted"));
        assert_eq!(unload_reason("unload requested"), Some("requested"));
        assert_eq!(unload_reason("shutdown"), Some("shutdown"));
        assert_eq!(
            unload_reason("lease lost: the scheduler no longer knows it"),
            Some("lease_lost")
        );
        for how in ["drained", "drain deadline", "drain requested during load"] {
            assert_eq!(unload_reason(how), None, "{how}");
        }
    }

    #[test]
    fn census_lists_every_state_once_and_counts_instances() {
        let c = census([
            pb::InstanceState::Ready,
            pb::InstanceState::Ready,
            pb::InstanceState::Failed,
        ]);
        assert_eq!(c.len(), STATES.len());
        let n = |l: &str| c.iter().find(|(s, _)| *s == l).unwrap().1;
        assert_eq!(n("ready"), 2);
        assert_eq!(n("failed"), 1);
        assert_eq!(n("busy"), 0);
    }
}
