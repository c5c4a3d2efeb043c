//! The registry's Prometheus metrics (`securellm_registry_*`, catalogued in `docs/metrics.md`).
//!
//! Counters and the scan histogram are recorded where things happen (the scanner, the estimate);
//! the catalogue gauge is set by [`collect`] just before each scrape from the catalogue itself,
//! so it is never stale. Labels come from closed sets (formats, statuses); never paths or names.

use std::sync::Arc;
use std::time::Duration;

use securellm_common::prometheus::Collect;

use crate::catalog::{Catalog, ListFilter};
use crate::record::{Format, Status};

pub const MODELS: &str = "securellm_registry_models";
pub const SCANS: &str = "securellm_registry_scans_total";
pub const SCAN_DURATION: &str = "securellm_registry_scan_duration_seconds";
pub const PARSE_FAILURES: &str = "securellm_registry_parse_failures_total";
pub const ESTIMATES: &str = "securellm_registry_estimates_total";

/// Every format, for gauges that must show 0 for what is absent.
pub const FORMATS: [Format; 4] = [
    Format::Gguf,
    Format::GgufSplit,
    Format::Ollama,
    Format::Safetensors,
];
/// Every status.
pub const STATUSES: [Status; 3] = [Status::Ok, Status::Incomplete, Status::Error];

/// The `format` label of a model format.
pub fn format_label(f: Format) -> &'static str {
    match f {
        Format::Gguf => "gguf",
        Format::GgufSplit => "gguf_split",
        Format::Ollama => "ollama",
        Format::Safetensors => "safetensors",
    }
}

/// The `status` label of a model status.
pub fn status_label(s: Status) -> &'static str {
    match s {
        Status::Ok => "ok",
        Status::Incomplete => "incomplete",
        Status::Error => "error",
    }
}

/// Describe the registry's metrics (help text in the scrape).
pub fn describe() {
    metrics::describe_gauge!(MODELS, "Models in the catalogue by format and status.");
    metrics::describe_counter!(
        SCANS,
        "Scans of the model roots run (first scan, watch, Rescan)."
    );
    metrics::describe_histogram!(
        SCAN_DURATION,
        metrics::Unit::Seconds,
        "Duration of one scan of the model roots."
    );
    metrics::describe_counter!(
        PARSE_FAILURES,
        "Model files that could not be parsed, by format (counted when parsed, not per scan)."
    );
    metrics::describe_counter!(ESTIMATES, "Memory estimates answered.");
    // Counters exist at 0 from the start, so `increase()` sees their first event.
    for f in FORMATS {
        metrics::counter!(PARSE_FAILURES, "format" => format_label(f)).increment(0);
    }
    metrics::counter!(SCANS).increment(0);
    metrics::counter!(ESTIMATES).increment(0);
}

/// Record one finished scan.
pub fn scan_done(elapsed: Duration) {
    metrics::counter!(SCANS).increment(1);
    metrics::histogram!(SCAN_DURATION).record(elapsed.as_secs_f64());
}

/// Record a model whose files could not be parsed.
pub fn parse_failure(f: Format) {
    metrics::counter!(PARSE_FAILURES, "format" => format_label(f)).increment(1);
}

/// Record an estimate answered.
pub fn estimate_answered() {
    metrics::counter!(ESTIMATES).increment(1);
}

/// Models by (format, status), every combination present (0 when none).
pub fn census(models: impl IntoIterator<Item = (Format, Status)>) -> Vec<(Format, Status, u64)> {
    let mut out: Vec<(Format, Status, u64)> = FORMATS
        .iter()
        .flat_map(|f| STATUSES.iter().map(move |s| (*f, *s, 0)))
        .collect();
    for (f, s) in models {
        if let Some(slot) = out.iter_mut().find(|(a, b, _)| *a == f && *b == s) {
            slot.2 += 1;
        }
    }
    out
}

/// The scrape hook: set the catalogue gauge from the catalogue.
pub fn collect(catalog: Catalog) -> Collect {
    Arc::new(move || {
        let catalog = catalog.clone();
        Box::pin(async move {
            // A stopped catalogue leaves the last values (the scrape still answers).
            let Ok(models) = catalog.list(ListFilter::default()).await else {
                return;
            };
            for (f, s, n) in census(models.iter().map(|m| (m.format, m.status))) {
                metrics::gauge!(MODELS, "format" => format_label(f), "status" => status_label(s))
                    .set(n as f64);
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn census_has_every_combination_and_counts_each_model_once() {
        let c = census([
            (Format::Gguf, Status::Ok),
            (Format::Gguf, Status::Ok),
            (Format::Ollama, Status::Error),
        ]);
        assert_eq!(c.len(), FORMATS.len() * STATUSES.len());
        let n = |f, s| c.iter().find(|(a, b, _)| *a == f && *b == s).unwrap().2;
        assert_eq!(n(Format::Gguf, Status::Ok), 2);
        assert_eq!(n(Format::Ollama, Status::Error), 1);
        assert_eq!(n(Format::Safetensors, Status::Ok), 0);
        assert_eq!(c.iter().map(|x| x.2).sum::<u64>(), 3);
    }
}
