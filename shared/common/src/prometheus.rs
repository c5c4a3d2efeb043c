//! Metrics: every service records with the `metrics` facade and serves `/metrics` in the
//! Prometheus text format on its own listener (`--metrics-listen`), off the request path.
//!
//! - [`recorder`] installs the process-wide recorder once (`metrics-exporter-prometheus`, no HTTP
//!   feature: we serve it ourselves) and returns its handle. Durations named `*_seconds` are
//!   histograms with [`SECONDS_BUCKETS`]; everything else is a counter or a gauge.
//! - [`serve`] binds the listener and answers `GET /metrics` (anything else: 404). Before each
//!   render it runs the service's `collect` hook (with a deadline), which sets the gauges that
//!   describe state (GPU bytes, instances by state, models by format) from the service's own
//!   source of truth, so a gauge is never stale and the request path records only counters.
//! - Labels never carry secrets, prompts or unbounded values (no request ids, no raw paths):
//!   callers pass values from closed sets (endpoint names, status classes, model names the
//!   registry knows).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tonic::codegen::http;

use crate::serve::ServeError;

/// Histogram buckets for every `*_seconds` metric: 1 ms to 5 min.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

/// The documented default metrics listeners (the binaries; in-process starts have none).
pub const DEFAULT_SCHEDULER: &str = "127.0.0.1:9451";
pub const DEFAULT_REGISTRY: &str = "127.0.0.1:9452";
pub const DEFAULT_BACKEND: &str = "127.0.0.1:9453";
pub const DEFAULT_GATEWAY: &str = "127.0.0.1:9454";

/// The content type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide recorder's handle (installed on first call). In a test process that starts
/// several services, they share it: every metric name carries its service's prefix.
pub fn recorder() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .expect("non-empty buckets")
                .build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first; ours is then unused.
            let _ = metrics::set_global_recorder(recorder);
            describe_common();
            handle
        })
        .clone()
}

fn describe_common() {
    metrics::describe_counter!(
        "securellm_trace_spans_exported_total",
        "Spans sent to the OTLP collector."
    );
    metrics::describe_counter!(
        "securellm_trace_spans_dropped_total",
        "Spans dropped: the export queue was full or the collector did not take them."
    );
    metrics::describe_counter!(
        "securellm_trace_export_failures_total",
        "OTLP export calls that failed or timed out."
    );
    for name in [
        "securellm_trace_spans_exported_total",
        "securellm_trace_spans_dropped_total",
        "securellm_trace_export_failures_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    metrics::describe_gauge!(
        "securellm_build_info",
        "Always 1; labels name the service and its version."
    );
}

/// A hook that refreshes state gauges just before a scrape renders.
pub type Collect = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// How long a scrape waits for the `collect` hook before it renders what it has.
const COLLECT_DEADLINE: Duration = Duration::from_secs(2);

/// Open connections the listener serves at once; beyond, new ones wait in the backlog.
const MAX_CONNECTIONS: usize = 16;

/// Histogram samples are folded into their buckets this often even when nobody scrapes (the
/// exporter keeps raw samples until upkeep runs).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// A running `/metrics` listener; stops when dropped.
pub struct MetricsServer {
    pub addr: SocketAddr,
    _task: tokio_util::task::AbortOnDropHandle<()>,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsServer")
            .field("addr", &self.addr)
            .finish()
    }
}

/// Serve `/metrics` for `service` on `addr` (`HOST:PORT`, port 0 picks a free one).
pub async fn serve(
    addr: &str,
    service: &'static str,
    collect: Option<Collect>,
) -> Result<MetricsServer, ServeError> {
    let handle = recorder();
    metrics::gauge!("securellm_build_info", "service" => service, "version" => env!("CARGO_PKG_VERSION"))
        .set(1.0);
    let bound = crate::serve::bind(addr).await?;
    let local = bound.addr;
    let listener = bound.into_listener();
    let upkeep = handle.clone();
    let task = tokio::spawn(async move {
        let _upkeep = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            let mut every = tokio::time::interval(UPKEEP_EVERY);
            loop {
                every.tick().await;
                upkeep.run_upkeep();
            }
        }));
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let collect = collect.map(|c| Arc::new(SingleFlight::new(c)));
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let handle = handle.clone();
            let collect = collect.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let handle = handle.clone();
                        let collect = collect.clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(answer(&req, &handle, collect).await)
                        }
                    });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(io, svc)
                    .await;
            });
        }
    });
    Ok(MetricsServer {
        addr: local,
        _task: tokio_util::task::AbortOnDropHandle::new(task),
    })
}

/// One `collect` at a time; scrapes that arrived while one was waiting to run share the next
/// (a collect that started after a scrape arrived is fresh enough for it), so a scrape flood never
/// turns into a flood of status calls on the service's actors.
struct SingleFlight {
    collect: Collect,
    /// When the last finished collect started.
    last: tokio::sync::Mutex<Option<tokio::time::Instant>>,
}

impl SingleFlight {
    fn new(collect: Collect) -> Self {
        Self {
            collect,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// Run the hook unless one that started after this scrape arrived has finished; `false`
    /// when it missed its deadline.
    async fn run(&self) -> bool {
        let arrived = tokio::time::Instant::now();
        let mut last = self.last.lock().await;
        if last.is_some_and(|started| started >= arrived) {
            return true;
        }
        let started = tokio::time::Instant::now();
        let done = tokio::time::timeout(COLLECT_DEADLINE, (self.collect)())
            .await
            .is_ok();
        *last = Some(started);
        done
    }
}

async fn answer<B>(
    req: &http::Request<B>,
    handle: &PrometheusHandle,
    collect: Option<Arc<SingleFlight>>,
) -> http::Response<Full<Bytes>> {
    let plain = |status: http::StatusCode, body: &'static str| {
        http::Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .expect("static response")
    };
    if req.uri().path() != "/metrics" {
        return plain(
            http::StatusCode::NOT_FOUND,
            "not found: metrics are at /metrics\n",
        );
    }
    if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
        return plain(http::StatusCode::METHOD_NOT_ALLOWED, "use GET /metrics\n");
    }
    if let Some(c) = collect
        && !c.run().await
    {
        tracing::warn!(
            "metrics: the state collector did not answer within {COLLECT_DEADLINE:?}; gauges may be stale"
        );
    }
    handle.run_upkeep();
    http::Response::builder()
        .header(http::header::CONTENT_TYPE, CONTENT_TYPE)
        .body(Full::new(Bytes::from(handle.render())))
        .expect("metrics response")
}

/// Where a service's metrics listener goes: `None` in the section = the documented default
/// (`default`), an empty string or `off` = no listener.
pub fn listen_addr(configured: Option<&str>, default: &str) -> Option<String> {
    match configured.map(str::trim) {
        None => Some(default.to_string()),
        Some("") | Some("off") => None,
        Some(a) => Some(a.to_string()),
    }
}

/// A status class label (`2xx`, `4xx`, …) from an HTTP status: bounded, unlike the code.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_the_text_format_and_runs_the_collector() {
        let collect: Collect = Arc::new(|| {
            Box::pin(async {
                metrics::gauge!("securellm_test_state_bytes", "gpu" => "0").set(42.0);
            })
        });
        let m = serve("127.0.0.1:0", "test", Some(collect)).await.unwrap();
        metrics::counter!("securellm_test_things_total", "kind" => "a").increment(3);
        metrics::histogram!("securellm_test_wait_seconds").record(0.2);
        let body = get(m.addr, "/metrics").await;
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains("text/plain; version=0.0.4"), "{body}");
        assert!(
            body.contains("securellm_test_things_total{kind=\"a\"} 3"),
            "{body}"
        );
        assert!(
            body.contains("securellm_test_state_bytes{gpu=\"0\"} 42"),
            "{body}"
        );
        assert!(
            body.contains("securellm_test_wait_seconds_bucket{le=\"0.25\"} 1"),
            "{body}"
        );
        assert!(
            body.contains("securellm_build_info{service=\"test\""),
            "{body}"
        );
        assert!(get(m.addr, "/").await.starts_with("HTTP/1.1 404"));
    }

    #[test]
    fn listen_defaults_and_off() {
        assert_eq!(
            listen_addr(None, "127.0.0.1:9451").as_deref(),
            Some("127.0.0.1:9451")
        );
        assert_eq!(listen_addr(Some("off"), "d"), None);
        assert_eq!(listen_addr(Some(""), "d"), None);
        assert_eq!(
            listen_addr(Some("0.0.0.0:1"), "d").as_deref(),
            Some("0.0.0.0:1")
        );
        assert_eq!(status_class(429), "4xx");
        assert_eq!(status_class(503), "5xx");
    }
}
