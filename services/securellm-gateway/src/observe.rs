//! What the request path tells an operator: Prometheus metrics (the `securellm_gateway_*`
//! catalogue in `docs/metrics.md`) and the spans of a request.
//!
//! Metrics are recorded only once [`enable`] has run (the gateway serves `/metrics`); before, every
//! function here returns at its first branch, so an in-process gateway without a metrics listener
//! (tests, the benchmark's baseline) does no metrics work at all. Labels come from closed sets:
//! the mapping functions below ([`endpoint_label`], [`transport_label`], [`upstream_error_class`],
//! [`model_label`]) turn request data into them and are unit-tested. A model name becomes a label
//! only once an upstream has listed it or answered a request for it successfully; any other name
//! is `_other` (a client sending random names creates no series), a request naming none `_none`.
//!
//! Spans are created only while traces are exported ([`req_span!`]); otherwise a request carries
//! `Span::none()` and recording its fields costs a branch.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use metrics::SharedString;

use crate::audit::AuditEntry;

pub const REQUESTS: &str = "securellm_gateway_requests_total";
pub const REQUEST_DURATION: &str = "securellm_gateway_request_duration_seconds";
pub const TTFB: &str = "securellm_gateway_time_to_first_byte_seconds";
pub const TOKENS: &str = "securellm_gateway_tokens_total";
pub const RATE_LIMITED: &str = "securellm_gateway_rate_limited_total";
pub const AUTH_FAILURES: &str = "securellm_gateway_auth_failures_total";
pub const REDACTIONS: &str = "securellm_gateway_redactions_total";
pub const AUDIT_WRITTEN: &str = "securellm_gateway_audit_rows_written_total";
pub const AUDIT_QUEUE: &str = "securellm_gateway_audit_queue_depth";
pub const AUDIT_DROPPED: &str = "securellm_gateway_audit_rows_dropped_total";
pub const UPSTREAM_ERRORS: &str = "securellm_gateway_upstream_errors_total";
pub const CONNECTIONS: &str = "securellm_gateway_connections";
pub const LIMIT_STORE_UNAVAILABLE: &str = "securellm_gateway_limit_store_unavailable_total";
pub const AUDIT_CHECKPOINTS: &str = "securellm_gateway_audit_checkpoints_total";

/// Most model names that become labels; beyond, new names are `_other`.
pub const MAX_MODEL_LABELS: usize = 1024;

static ON: AtomicBool = AtomicBool::new(false);

/// Start recording (the process serves `/metrics`); describes the metrics once.
pub fn enable() {
    if ON.swap(true, Ordering::Relaxed) {
        return;
    }
    // The process-wide recorder first, or what follows would go nowhere.
    let _ = securellm_common::prometheus::recorder();
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        REQUESTS,
        "Requests by endpoint, model, status class and transport."
    );
    describe_histogram!(
        REQUEST_DURATION,
        metrics::Unit::Seconds,
        "From the request to its last byte."
    );
    describe_histogram!(
        TTFB,
        metrics::Unit::Seconds,
        "From the request to the first body byte (streams: the first event)."
    );
    describe_counter!(
        TOKENS,
        "Tokens by model and direction (prompt, completion)."
    );
    describe_counter!(
        RATE_LIMITED,
        "Requests refused with 429, by the limit that tripped."
    );
    describe_counter!(AUTH_FAILURES, "Refused credentials, by reason.");
    describe_counter!(
        LIMIT_STORE_UNAVAILABLE,
        "Rate-limit decisions made without the shared PostgreSQL store (it could not be reached): local limits at limit / live replicas, or 503 when fail-closed."
    );
    describe_counter!(
        AUDIT_CHECKPOINTS,
        "Signed checkpoints over every audit chain's head written by this gateway."
    );
    describe_counter!(
        REDACTIONS,
        "Secrets found in prompts bound for cloud upstreams, by what was done with them."
    );
    describe_counter!(AUDIT_WRITTEN, "Audit rows committed.");
    describe_gauge!(AUDIT_QUEUE, "Audit rows waiting for the writer.");
    describe_counter!(
        AUDIT_DROPPED,
        "Audit rows lost (the queue was full); must stay 0."
    );
    describe_counter!(
        UPSTREAM_ERRORS,
        "Upstream failures by upstream kind and class."
    );
    describe_gauge!(CONNECTIONS, "Open connections by listener.");
    // Every series of a closed label set exists from the start (at 0), so a rate or an alert
    // over it has data before the first event.
    for reason in ["missing", "invalid", "revoked", "expired", "jwt"] {
        metrics::counter!(AUTH_FAILURES, "reason" => reason).increment(0);
    }
    for limit in [
        "requests",
        "tokens",
        "concurrency",
        "in_progress",
        "auth_failures",
    ] {
        metrics::counter!(RATE_LIMITED, "limit" => limit).increment(0);
    }
    for action in ["redacted", "counted", "blocked"] {
        metrics::counter!(REDACTIONS, "action" => action).increment(0);
    }
    for upstream in ["local", "cloud"] {
        for class in ["connect", "timeout", "status_4xx", "status_5xx", "protocol"] {
            metrics::counter!(UPSTREAM_ERRORS, "upstream" => upstream, "class" => class)
                .increment(0);
        }
    }
    for listener in ["http", "grpc"] {
        metrics::gauge!(CONNECTIONS, "listener" => listener).increment(0.0);
    }
    metrics::counter!(AUDIT_WRITTEN).increment(0);
    metrics::counter!(AUDIT_DROPPED).increment(0);
    metrics::counter!(LIMIT_STORE_UNAVAILABLE).increment(0);
    metrics::counter!(AUDIT_CHECKPOINTS).increment(0);
    metrics::gauge!(AUDIT_QUEUE).set(0.0);
}

/// Whether metrics are recorded.
#[inline]
pub fn on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// `chat`, `completions`, `embeddings`, `models` or `other`, from the endpoint an audit row names
/// (`/v1/chat/completions`, `grpc:/securellm.v1.Gateway/ChatCompletionsStream`, ...).
pub fn endpoint_label(endpoint: &str) -> &'static str {
    let method = endpoint.strip_prefix("grpc:/securellm.v1.Gateway/");
    match (endpoint, method) {
        ("/v1/chat/completions", _) | (_, Some("ChatCompletions" | "ChatCompletionsStream")) => {
            "chat"
        }
        ("/v1/completions", _) | (_, Some("Completions" | "CompletionsStream")) => "completions",
        ("/v1/embeddings", _) | (_, Some("Embeddings")) => "embeddings",
        ("/v1/models", _) | (_, Some("ListModels")) => "models",
        _ => "other",
    }
}

/// `grpc` for an endpoint named `grpc:/...`, else `http`.
pub fn transport_label(endpoint: &str) -> &'static str {
    if endpoint.starts_with("grpc:") {
        "grpc"
    } else {
        "http"
    }
}

/// The class of an upstream failure: `connect` (unreachable), `timeout`, `status_4xx`,
/// `status_5xx`, or `protocol` (an answer that is not one: a broken or malformed stream).
pub fn upstream_error_class(status: u16, code: Option<&str>) -> &'static str {
    match (code, status) {
        (Some("upstream_unreachable"), _) => "connect",
        (Some("timeout"), _) | (_, 504 | 408) => "timeout",
        (_, 400..=499) => "status_4xx",
        (_, 500..=599) => "status_5xx",
        _ => "protocol",
    }
}

fn known() -> &'static RwLock<HashSet<Arc<str>>> {
    static KNOWN: OnceLock<RwLock<HashSet<Arc<str>>>> = OnceLock::new();
    KNOWN.get_or_init(|| RwLock::new(HashSet::new()))
}

/// `name` may become a label from now on (an upstream listed it or served it).
pub fn learn_model(name: &str) {
    // Only names that look like model names, short ones: a client that can reach a permissive
    // route must not turn megabytes of text into label values.
    let plausible = name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:/-@+".contains(&b));
    if !on() || name.is_empty() || !plausible {
        return;
    }
    if known().read().is_ok_and(|k| k.contains(name)) {
        return;
    }
    if let Ok(mut k) = known().write()
        && k.len() < MAX_MODEL_LABELS
    {
        k.insert(Arc::from(name));
    }
}

/// The `model` label of a request for `name`: the name once known, `_none` for none, else
/// `_other`.
pub fn model_label(name: &str) -> SharedString {
    if name.is_empty() {
        return SharedString::const_str("_none");
    }
    match known().read().ok().and_then(|k| k.get(name).cloned()) {
        Some(n) => SharedString::from(n),
        None => SharedString::const_str("_other"),
    }
}

/// One finished request, from its audit row (every API request leaves exactly one): counts it,
/// its duration and its tokens.
pub fn request(e: &AuditEntry) {
    if !on() {
        return;
    }
    let endpoint = endpoint_label(&e.endpoint);
    let transport = transport_label(&e.endpoint);
    let model = model_label(&e.model);
    let status = securellm_common::prometheus::status_class(e.status);
    metrics::counter!(REQUESTS, "endpoint" => endpoint, "model" => model.clone(), "status" => status, "transport" => transport).increment(1);
    metrics::histogram!(REQUEST_DURATION, "endpoint" => endpoint, "transport" => transport)
        .record(Duration::from_micros(e.latency_us).as_secs_f64());
    if e.prompt_tokens > 0 {
        metrics::counter!(TOKENS, "model" => model.clone(), "direction" => "prompt")
            .increment(u64::from(e.prompt_tokens));
    }
    if e.completion_tokens > 0 {
        metrics::counter!(TOKENS, "model" => model, "direction" => "completion")
            .increment(u64::from(e.completion_tokens));
    }
}

/// The first byte of an answer to a request to `endpoint` leaves `elapsed` after it arrived.
pub fn first_byte(endpoint: &str, elapsed: Duration) {
    if !on() {
        return;
    }
    metrics::histogram!(TTFB, "endpoint" => endpoint_label(endpoint), "transport" => transport_label(endpoint))
        .record(elapsed.as_secs_f64());
}

/// A 429 because of `limit` (`requests`, `tokens`, `concurrency`, `in_progress`, `auth_failures`).
pub fn rate_limited(limit: &'static str) {
    if on() {
        metrics::counter!(RATE_LIMITED, "limit" => limit).increment(1);
    }
}

/// A rate-limit decision the shared store could not make (it was unreachable).
pub fn limit_store_unavailable() {
    if on() {
        metrics::counter!(LIMIT_STORE_UNAVAILABLE).increment(1);
    }
}

/// A signed audit checkpoint written (a shared PostgreSQL audit log with a signing key).
pub fn audit_checkpoint() {
    if on() {
        metrics::counter!(AUDIT_CHECKPOINTS).increment(1);
    }
}

/// A refused credential (`missing`, `invalid`, `revoked`, `expired`, `jwt`).
pub fn auth_failure(reason: &'static str) {
    if on() {
        metrics::counter!(AUTH_FAILURES, "reason" => reason).increment(1);
    }
}

/// `n` secrets found in a prompt and `action` taken (`counted`, `redacted`, `blocked`).
pub fn redactions(action: &'static str, n: usize) {
    if on() && n > 0 {
        metrics::counter!(REDACTIONS, "action" => action).increment(n as u64);
    }
}

/// An upstream failure.
pub fn upstream_error(upstream: &'static str, class: &'static str) {
    if on() {
        metrics::counter!(UPSTREAM_ERRORS, "upstream" => upstream, "class" => class).increment(1);
    }
}

/// A connection opened (`+1`) or closed (`-1`) on `listener` (`http`, `grpc`).
pub fn connection(listener: &'static str, opened: bool) {
    if !on() {
        return;
    }
    let g = metrics::gauge!(CONNECTIONS, "listener" => listener);
    if opened {
        g.increment(1.0);
    } else {
        g.decrement(1.0);
    }
}

/// The audit writer's state, set before each scrape: rows written and dropped (counters that
/// mirror the writer's own), and the queue depth.
pub fn audit_state(s: crate::audit::AuditStats) {
    if !on() {
        return;
    }
    metrics::counter!(AUDIT_WRITTEN).absolute(s.rows);
    metrics::counter!(AUDIT_DROPPED).absolute(s.dropped);
    metrics::gauge!(AUDIT_QUEUE).set(s.queued as f64);
}

/// The current span while traces are exported (the request's, to record its attributes into),
/// else `Span::none()` without looking.
#[inline]
pub fn current_span() -> tracing::Span {
    if securellm_common::telemetry::enabled() {
        tracing::Span::current()
    } else {
        tracing::Span::none()
    }
}

/// The fields every request span declares (HTTP and gRPC), recorded as the request goes. `kind`:
/// `server` over HTTP (the span the caller's trace continues in); `internal` over gRPC, where
/// it is the child of the transport's `grpc.server` span.
#[macro_export]
macro_rules! request_span {
    ($kind:literal, $name:expr, $($t:tt)*) => {
        $crate::req_span!(
            "gateway.request",
            otel.name = $name,
            otel.kind = $kind,
            gen_ai.operation.name = tracing::field::Empty,
            gen_ai.request.model = tracing::field::Empty,
            gen_ai.usage.input_tokens = tracing::field::Empty,
            gen_ai.usage.output_tokens = tracing::field::Empty,
            securellm.key_id = tracing::field::Empty,
            securellm.upstream = tracing::field::Empty,
            http.response.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
            $($t)*
        )
    };
}

/// A span of the request path, only while traces are exported (else `Span::none()`, which
/// costs nothing to carry, enter or record into).
#[macro_export]
macro_rules! req_span {
    ($($t:tt)*) => {
        if securellm_common::telemetry::enabled() {
            tracing::info_span!($($t)*)
        } else {
            tracing::Span::none()
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_map_to_a_closed_set_over_both_transports() {
        for (e, want, t) in [
            ("/v1/chat/completions", "chat", "http"),
            ("/v1/completions", "completions", "http"),
            ("/v1/embeddings", "embeddings", "http"),
            ("/v1/models", "models", "http"),
            ("/v1/models/../../etc", "other", "http"),
            ("/anything/else", "other", "http"),
            ("grpc:/securellm.v1.Gateway/ChatCompletions", "chat", "grpc"),
            (
                "grpc:/securellm.v1.Gateway/ChatCompletionsStream",
                "chat",
                "grpc",
            ),
            (
                "grpc:/securellm.v1.Gateway/Completions",
                "completions",
                "grpc",
            ),
            (
                "grpc:/securellm.v1.Gateway/CompletionsStream",
                "completions",
                "grpc",
            ),
            (
                "grpc:/securellm.v1.Gateway/Embeddings",
                "embeddings",
                "grpc",
            ),
            ("grpc:/securellm.v1.Gateway/ListModels", "models", "grpc"),
            ("grpc:/securellm.v1.Gateway/Nope", "other", "grpc"),
            ("grpc:/other.Service/ChatCompletions", "other", "grpc"),
        ] {
            assert_eq!(endpoint_label(e), want, "{e}");
            assert_eq!(transport_label(e), t, "{e}");
        }
    }

    #[test]
    fn upstream_failures_are_classed() {
        assert_eq!(
            upstream_error_class(503, Some("upstream_unreachable")),
            "connect"
        );
        assert_eq!(upstream_error_class(504, None), "timeout");
        assert_eq!(upstream_error_class(504, Some("timeout")), "timeout");
        assert_eq!(
            upstream_error_class(404, Some("model_not_found")),
            "status_4xx"
        );
        assert_eq!(
            upstream_error_class(429, Some("upstream_rate_limited")),
            "status_4xx"
        );
        assert_eq!(
            upstream_error_class(502, Some("upstream_auth_failed")),
            "status_5xx"
        );
        assert_eq!(upstream_error_class(500, None), "status_5xx");
        // A failure with a success status (an error event after the stream started).
        assert_eq!(upstream_error_class(200, None), "protocol");
    }

    #[test]
    fn only_known_models_become_labels() {
        enable();
        assert_eq!(model_label("").as_ref() as &str, "_none");
        assert_eq!(model_label("never-seen-model-x").as_ref() as &str, "_other");
        learn_model("served-model-y");
        assert_eq!(
            model_label("served-model-y").as_ref() as &str,
            "served-model-y"
        );
        // The set is bounded: past the cap, new names stay `_other`.
        for i in 0..MAX_MODEL_LABELS + 10 {
            learn_model(&format!("m{i}"));
        }
        assert!(known().read().unwrap().len() <= MAX_MODEL_LABELS);
        assert_eq!(
            model_label(&format!("m{}", MAX_MODEL_LABELS + 5)).as_ref() as &str,
            "_other"
        );
        assert_eq!(
            model_label("served-model-y").as_ref() as &str,
            "served-model-y"
        );
    }
}
