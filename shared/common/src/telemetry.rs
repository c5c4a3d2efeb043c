//! Logging and traces.
//!
//! - **Logs**: human-readable lines on stderr, filtered by `RUST_LOG` (default `info`). stdout is
//!   reserved for the one `ready <service> ...` line and command output, so that tests and
//!   supervisors can read it without parsing logs.
//! - **Traces** (OpenTelemetry, off by default): [`init_service`] with an OTLP/gRPC endpoint (the
//!   `[telemetry]` config section or the standard `OTEL_EXPORTER_OTLP_ENDPOINT` /
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) turns every `tracing` span of SecureLLM's own crates
//!   into an OpenTelemetry span (`tracing-opentelemetry`), exported in batches by one background
//!   thread. A collector that is down or slow never slows a request: finished spans go into a
//!   bounded queue; when it is full they are dropped and counted
//!   (`securellm_trace_spans_dropped_total`), with one warning, and failed exports are counted
//!   (`securellm_trace_export_failures_total`) with one warning per outage.
//! - **Context propagation** (W3C `traceparent` / `tracestate`): servers continue the caller's
//!   trace ([`GrpcTraceLayer`] on every gRPC server, [`extract_http`] on the gateway's HTTP
//!   requests); clients send theirs ([`inject_grpc`] in the internal-token interceptor every
//!   internal client uses, [`inject_http`] for cloud upstreams). With export off all of this is a
//!   branch on one flag: no span is built for propagation, nothing is sent.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter, SpanProcessor};
use serde::{Deserialize, Serialize};
use tonic::codegen::http;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Set once traces are exported: every propagation helper checks it first.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are being exported (and contexts propagated).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Install the global subscriber: logs only (the CLI and tools). Safe to call more than once
/// (later calls do nothing).
pub fn init(default_filter: &str) {
    let _ = tracing_subscriber::registry()
        .with(fmt_layer(default_filter))
        .try_init();
}

fn fmt_layer<S>(default_filter: &str) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .with_filter(filter)
}

/// `[telemetry]` in the config file (every service reads the same section). The standard
/// `OTEL_*` environment variables win over it.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP/gRPC collector, e.g. `http://127.0.0.1:4317`. Unset (and no `OTEL_EXPORTER_OTLP_*`
    /// endpoint in the environment) = no export.
    pub otlp_endpoint: Option<String>,
    /// `service.name` (default: the binary's name); `OTEL_SERVICE_NAME` wins.
    pub service_name: Option<String>,
    /// `always_on`, `always_off`, `traceidratio`, `parentbased_always_on` (default),
    /// `parentbased_always_off`, `parentbased_traceidratio`; `OTEL_TRACES_SAMPLER` wins.
    pub sampler: Option<String>,
    /// The ratio for the `*traceidratio` samplers; `OTEL_TRACES_SAMPLER_ARG` wins.
    pub sampler_arg: Option<f64>,
    /// Finished spans waiting for export; beyond this they are dropped and counted (default 4096).
    pub queue_size: Option<usize>,
    /// One export's deadline in milliseconds (default 5000).
    pub export_timeout_ms: Option<u64>,
}

/// What [`TelemetryConfig::resolve`] decided.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportSettings {
    pub endpoint: String,
    pub service_name: String,
    pub sampler: SamplerChoice,
    pub queue_size: usize,
    pub export_timeout: Duration,
}

/// The sampler, parsed.
#[derive(Clone, Debug, PartialEq)]
pub enum SamplerChoice {
    AlwaysOn,
    AlwaysOff,
    Ratio(f64),
    ParentBased(Box<SamplerChoice>),
}

impl SamplerChoice {
    fn build(&self) -> Sampler {
        match self {
            Self::AlwaysOn => Sampler::AlwaysOn,
            Self::AlwaysOff => Sampler::AlwaysOff,
            Self::Ratio(r) => Sampler::TraceIdRatioBased(*r),
            Self::ParentBased(root) => Sampler::ParentBased(Box::new(root.build())),
        }
    }
}

/// A telemetry setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("telemetry.{field}: {message}")]
    Field {
        field: &'static str,
        message: String,
    },
    #[error("OTLP exporter: {0}")]
    Exporter(String),
}

impl TelemetryConfig {
    /// Merge the environment (`OTEL_*`, as an OpenTelemetry SDK reads it) over the section, and
    /// decide: `Ok(None)` = export off.
    pub fn resolve(
        &self,
        default_service: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<ExportSettings>, TelemetryError> {
        let env = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        if env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        let Some(endpoint) = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
            .or_else(|| self.otlp_endpoint.clone().filter(|e| !e.trim().is_empty()))
        else {
            return Ok(None);
        };
        let endpoint = endpoint.trim().to_string();
        if endpoint.starts_with("https://") {
            return Err(TelemetryError::Field {
                field: "otlp_endpoint",
                message: format!(
                    "{endpoint:?}: TLS to the collector is not built in; run a collector (or an \
                     OpenTelemetry Collector as a local relay) on a loopback or private address \
                     and use http://"
                ),
            });
        }
        if !endpoint.starts_with("http://") {
            return Err(TelemetryError::Field {
                field: "otlp_endpoint",
                message: format!("{endpoint:?} is not an http:// URL"),
            });
        }
        let service_name = env("OTEL_SERVICE_NAME")
            .or_else(|| self.service_name.clone())
            .unwrap_or_else(|| default_service.to_string());
        let arg = match env("OTEL_TRACES_SAMPLER_ARG") {
            Some(a) => Some(a.trim().parse::<f64>().map_err(|_| TelemetryError::Field {
                field: "sampler_arg",
                message: format!("OTEL_TRACES_SAMPLER_ARG={a:?} is not a number"),
            })?),
            None => self.sampler_arg,
        };
        let ratio = || -> Result<f64, TelemetryError> {
            let r = arg.unwrap_or(1.0);
            if (0.0..=1.0).contains(&r) {
                Ok(r)
            } else {
                Err(TelemetryError::Field {
                    field: "sampler_arg",
                    message: format!("{r} is not a ratio between 0 and 1"),
                })
            }
        };
        let name = env("OTEL_TRACES_SAMPLER")
            .or_else(|| self.sampler.clone())
            .unwrap_or_else(|| "parentbased_always_on".into());
        let sampler = match name.trim() {
            "always_on" => SamplerChoice::AlwaysOn,
            "always_off" => SamplerChoice::AlwaysOff,
            "traceidratio" => SamplerChoice::Ratio(ratio()?),
            "parentbased_always_on" => {
                SamplerChoice::ParentBased(Box::new(SamplerChoice::AlwaysOn))
            }
            "parentbased_always_off" => {
                SamplerChoice::ParentBased(Box::new(SamplerChoice::AlwaysOff))
            }
            "parentbased_traceidratio" => {
                SamplerChoice::ParentBased(Box::new(SamplerChoice::Ratio(ratio()?)))
            }
            other => {
                return Err(TelemetryError::Field {
                    field: "sampler",
                    message: format!(
                        "unknown sampler {other:?}; expected always_on, always_off, traceidratio, \
                         parentbased_always_on, parentbased_always_off or parentbased_traceidratio"
                    ),
                });
            }
        };
        let queue_size = self.queue_size.unwrap_or(4096);
        if queue_size == 0 {
            return Err(TelemetryError::Field {
                field: "queue_size",
                message: "must be greater than 0".into(),
            });
        }
        Ok(Some(ExportSettings {
            endpoint,
            service_name,
            sampler,
            queue_size,
            export_timeout: Duration::from_millis(self.export_timeout_ms.unwrap_or(5000).max(1)),
        }))
    }
}

/// Keeps the exporter running; dropping it flushes what is queued (bounded wait) and stops it.
#[must_use = "dropping the guard stops trace export"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            ENABLED.store(false, Ordering::Relaxed);
            let _ = p.shutdown_with_timeout(Duration::from_secs(3));
        }
    }
}

/// Crates whose spans become OpenTelemetry spans. The transport's own crates (tonic, hyper, h2)
/// are left out: their spans would trace the exporter's own calls.
const TRACED_TARGETS: &[&str] = &[
    "securellm_common",
    "securellm_client",
    "vram_scheduler",
    "registry",
    "backend_manager",
    "securellm_gateway",
];

/// Install logs and, when configured, trace export for a service. Call once, early in `main`,
/// inside the tokio runtime; keep the guard until the service has stopped.
pub fn init_service(
    service: &str,
    default_filter: &str,
    cfg: &TelemetryConfig,
) -> Result<TelemetryGuard, TelemetryError> {
    let settings = cfg.resolve(service, |k| std::env::var(k).ok())?;
    let Some(settings) = settings else {
        init(default_filter);
        return Ok(TelemetryGuard { provider: None });
    };
    let provider = provider(&settings)?;
    let tracer = provider.tracer(service.to_string());
    let targets = TRACED_TARGETS
        .iter()
        .fold(tracing_subscriber::filter::Targets::new(), |t, name| {
            t.with_target(*name, tracing::Level::INFO)
        });
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        // Per span: no busy/idle timing, thread, source location or target attributes (each
        // costs allocations on every request; the span name and our attributes say enough), and
        // no OTel context activation on enter (we read contexts from spans, not from the
        // thread-local current context).
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_location(false)
        .with_target(false)
        .with_context_activation(false)
        .with_filter(targets);
    let installed = tracing_subscriber::registry()
        .with(fmt_layer(default_filter))
        .with(otel)
        .try_init()
        .is_ok();
    if !installed {
        // Another subscriber was installed first (a test process): no export from here.
        let _ = provider.shutdown_with_timeout(Duration::from_millis(100));
        return Ok(TelemetryGuard { provider: None });
    }
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    ENABLED.store(true, Ordering::Relaxed);
    tracing::info!(
        endpoint = %settings.endpoint,
        service = %settings.service_name,
        sampler = ?settings.sampler,
        "exporting traces over OTLP/gRPC"
    );
    Ok(TelemetryGuard {
        provider: Some(provider),
    })
}

fn provider(settings: &ExportSettings) -> Result<SdkTracerProvider, TelemetryError> {
    let resource = opentelemetry_sdk::Resource::builder_empty()
        .with_service_name(settings.service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    let processor = QueueProcessor::start(settings, resource.clone())?;
    Ok(SdkTracerProvider::builder()
        .with_sampler(settings.sampler.build())
        .with_resource(resource)
        .with_span_processor(processor)
        .build())
}

enum Msg {
    Span(Box<SpanData>),
    Flush(std::sync::mpsc::Sender<()>),
    /// Export what is queued, then stop.
    Shutdown,
}

/// Finished spans into a bounded queue; one thread exports them in batches. Never blocks the
/// thread that ends a span.
#[derive(Debug)]
struct QueueProcessor {
    /// Shared by every thread that ends a span, without a lock (`SyncSender` is `Sync`).
    tx: SyncSender<Msg>,
    closed: AtomicBool,
    warned_full: AtomicBool,
    done: Mutex<Option<Receiver<()>>>,
}

const BATCH: usize = 512;
const BATCH_DELAY: Duration = Duration::from_millis(500);

impl QueueProcessor {
    fn start(
        settings: &ExportSettings,
        resource: opentelemetry_sdk::Resource,
    ) -> Result<Self, TelemetryError> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Msg>(settings.queue_size);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let (built_tx, built_rx) = std::sync::mpsc::channel();
        let endpoint = settings.endpoint.clone();
        let timeout = settings.export_timeout;
        std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = built_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let exporter = rt.block_on(async {
                    use opentelemetry_otlp::WithExportConfig;
                    opentelemetry_otlp::SpanExporter::builder()
                        .with_tonic()
                        .with_endpoint(endpoint)
                        .with_timeout(timeout)
                        .build()
                });
                let mut exporter = match exporter {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = built_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                exporter.set_resource(&resource);
                let _ = built_tx.send(Ok(()));
                export_loop(&rt, &exporter, &rx, timeout);
                let _ = exporter.shutdown();
                let _ = done_tx.send(());
            })
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        match built_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(TelemetryError::Exporter(e)),
            Err(_) => return Err(TelemetryError::Exporter("export thread died".into())),
        }
        Ok(Self {
            tx,
            closed: AtomicBool::new(false),
            warned_full: AtomicBool::new(false),
            done: Mutex::new(Some(done_rx)),
        })
    }
}

fn export_loop(
    rt: &tokio::runtime::Runtime,
    exporter: &opentelemetry_otlp::SpanExporter,
    rx: &Receiver<Msg>,
    timeout: Duration,
) {
    let mut failing = false;
    let mut batch = Vec::with_capacity(BATCH);
    let mut flushes = Vec::new();
    loop {
        let deadline = Instant::now() + BATCH_DELAY;
        let mut closed = false;
        while batch.len() < BATCH {
            let wait = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(Msg::Span(s)) => batch.push(*s),
                Ok(Msg::Flush(ack)) => {
                    flushes.push(ack);
                    break;
                }
                Ok(Msg::Shutdown) => {
                    closed = true;
                    break;
                }
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        if !batch.is_empty() {
            let n = batch.len() as u64;
            let sent = rt.block_on(async {
                tokio::time::timeout(timeout, exporter.export(std::mem::take(&mut batch))).await
            });
            let ok = matches!(sent, Ok(Ok(())));
            if ok {
                metrics::counter!("securellm_trace_spans_exported_total").increment(n);
                if failing {
                    failing = false;
                    tracing::info!("trace export works again");
                }
            } else {
                metrics::counter!("securellm_trace_export_failures_total").increment(1);
                metrics::counter!("securellm_trace_spans_dropped_total").increment(n);
                if !failing {
                    failing = true;
                    let why = match sent {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer within {timeout:?}"),
                    };
                    tracing::warn!(
                        "trace export failed ({why}); spans are dropped until the collector answers (counted in securellm_trace_spans_dropped_total)"
                    );
                }
            }
        }
        for ack in flushes.drain(..) {
            let _ = ack.send(());
        }
        if closed {
            return;
        }
    }
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.closed.load(Ordering::Relaxed) {
            return;
        }
        match self.tx.try_send(Msg::Span(Box::new(span))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                metrics::counter!("securellm_trace_spans_dropped_total").increment(1);
                if !self.warned_full.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "the trace export queue is full (collector slow or down): spans are dropped and counted in securellm_trace_spans_dropped_total"
                    );
                }
            }
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        let (ack, wait) = std::sync::mpsc::channel();
        let sent =
            !self.closed.load(Ordering::Relaxed) && self.tx.try_send(Msg::Flush(ack)).is_ok();
        if sent && wait.recv_timeout(Duration::from_secs(5)).is_err() {
            return Err(OTelSdkError::Timeout(Duration::from_secs(5)));
        }
        Ok(())
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        // The thread exports what is queued before the stop message, then stops. Sending waits
        // for room only while the thread drains the queue (bounded by the wait below).
        if self.closed.swap(true, Ordering::Relaxed) {
            return Err(OTelSdkError::AlreadyShutdown);
        }
        let tx = self.tx.clone();
        std::thread::spawn(move || {
            let _ = tx.send(Msg::Shutdown);
        });
        let done = self.done.lock().unwrap_or_else(|p| p.into_inner()).take();
        match done {
            Some(d) => match d.recv_timeout(timeout) {
                Ok(()) | Err(RecvTimeoutError::Disconnected) => Ok(()),
                Err(RecvTimeoutError::Timeout) => Err(OTelSdkError::Timeout(timeout)),
            },
            None => Err(OTelSdkError::AlreadyShutdown),
        }
    }
}

// ---- propagation ----

struct HeaderCarrier<'a>(&'a http::HeaderMap);

impl Extractor for HeaderCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            http::header::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// The caller's trace context from request headers (`traceparent`, `tracestate`); an empty
/// context when there is none or export is off.
pub fn extract_http(headers: &http::HeaderMap) -> opentelemetry::Context {
    if !enabled() {
        return opentelemetry::Context::new();
    }
    TraceContextPropagator::new().extract(&HeaderCarrier(headers))
}

/// Make `span` continue the caller's trace from `headers` (no-op with export off).
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    if enabled() {
        let _ = span.set_parent(extract_http(headers));
    }
}

/// Write the current span's context into outgoing HTTP headers (no-op with export off).
pub fn inject_http(headers: &mut http::HeaderMap) {
    if !enabled() {
        return;
    }
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
}

/// Write the current span's context into outgoing gRPC metadata (no-op with export off).
pub fn inject_grpc(metadata: &mut tonic::metadata::MetadataMap) {
    if !enabled() {
        return;
    }
    struct Meta<'a>(&'a mut tonic::metadata::MetadataMap);
    impl Injector for Meta<'_> {
        fn set(&mut self, key: &str, value: String) {
            if let (Ok(k), Ok(v)) = (
                tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
                tonic::metadata::MetadataValue::try_from(value.as_str()),
            ) {
                self.0.insert(k, v);
            }
        }
    }
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut Meta(metadata));
}

/// The current trace's id (32 lowercase hex digits) when spans are exported, else the trace id
/// of a `traceparent` in `headers` (so an audit row names the caller's trace even with export
/// off), else `None`.
pub fn trace_id(headers: Option<&http::HeaderMap>) -> Option<String> {
    if enabled() {
        let cx = tracing::Span::current().context();
        let sc = cx.span().span_context().clone();
        if sc.is_valid() {
            return Some(sc.trace_id().to_string());
        }
    }
    let tp = headers?.get("traceparent")?.to_str().ok()?;
    parse_traceparent(tp)
}

/// A client-supplied value cut to at most `max` bytes (on a character boundary) before it becomes
/// a span attribute: spans are queued by count, so one huge attribute must not cost megabytes or
/// push a whole export batch past a collector's message limit.
pub fn clip_attr(value: &str, max: usize) -> &str {
    if value.len() <= max {
        return value;
    }
    let mut end = max;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    &value[..end]
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), if well formed and not
/// all zeros.
pub fn parse_traceparent(value: &str) -> Option<String> {
    let mut parts = value.trim().split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex(version, 2) || version == "ff" || !hex(trace, 32) || !hex(parent, 16) || !hex(flags, 2)
    {
        return None;
    }
    if trace.bytes().all(|b| b == b'0') || parent.bytes().all(|b| b == b'0') {
        return None;
    }
    Some(trace.to_ascii_lowercase())
}

/// A tower layer for gRPC servers: each call runs in a `grpc.server` span (RPC semantic
/// conventions: `rpc.system`, `rpc.service`, `rpc.method`) that continues the caller's trace.
/// With export off it only forwards the call.
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcTraceLayer;

impl<S> tower::Layer<S> for GrpcTraceLayer {
    type Service = GrpcTrace<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcTrace { inner }
    }
}

#[derive(Clone, Debug)]
pub struct GrpcTrace<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for GrpcTrace<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures_util_boxed::BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if !enabled() {
            return Box::pin(self.inner.call(req));
        }
        let path = req.uri().path();
        // The path is the caller's (the gateway's gRPC port is public): only a well-formed,
        // short `/package.Service/Method` names the span.
        let well_formed = path.len() <= 128
            && path.bytes().filter(|b| *b == b'/').count() == 2
            && path
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'/' || b == b'.' || b == b'_');
        let path = if well_formed {
            path
        } else {
            "/unknown/unknown"
        };
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or((path, ""));
        let span = tracing::info_span!(
            "grpc.server",
            otel.name = %path.trim_start_matches('/'),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
        );
        continue_trace(&span, req.headers());
        let fut = {
            let _enter = span.enter();
            self.inner.call(req)
        };
        use tracing::Instrument;
        Box::pin(fut.instrument(span))
    }
}

mod futures_util_boxed {
    pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn export_is_off_without_an_endpoint() {
        let c = TelemetryConfig::default();
        assert_eq!(c.resolve("x", env(&[])).unwrap(), None);
    }

    #[test]
    fn the_environment_wins_over_the_section() {
        let c = TelemetryConfig {
            otlp_endpoint: Some("http://file:4317".into()),
            service_name: Some("from-file".into()),
            sampler: Some("always_off".into()),
            ..Default::default()
        };
        let s = c
            .resolve(
                "registry",
                env(&[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4317"),
                    ("OTEL_SERVICE_NAME", "reg-a"),
                    ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                    ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
                ]),
            )
            .unwrap()
            .unwrap();
        assert_eq!(s.endpoint, "http://env:4317");
        assert_eq!(s.service_name, "reg-a");
        assert_eq!(
            s.sampler,
            SamplerChoice::ParentBased(Box::new(SamplerChoice::Ratio(0.25)))
        );
        let s = c.resolve("registry", env(&[])).unwrap().unwrap();
        assert_eq!(s.endpoint, "http://file:4317");
        assert_eq!(s.service_name, "from-file");
        assert_eq!(s.sampler, SamplerChoice::AlwaysOff);
        // The traces-specific endpoint wins over the generic one; the SDK switch turns it off.
        let s = c
            .resolve(
                "registry",
                env(&[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4317"),
                    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317"),
                ]),
            )
            .unwrap()
            .unwrap();
        assert_eq!(s.endpoint, "http://traces:4317");
        assert_eq!(
            c.resolve("r", env(&[("OTEL_SDK_DISABLED", "true")]))
                .unwrap(),
            None
        );
    }

    #[test]
    fn bad_settings_name_the_field() {
        let bad = |c: TelemetryConfig, e: &[(&str, &str)]| {
            c.resolve("x", env(e)).unwrap_err().to_string()
        };
        let on = TelemetryConfig {
            otlp_endpoint: Some("http://c:4317".into()),
            ..Default::default()
        };
        assert!(bad(on.clone(), &[("OTEL_TRACES_SAMPLER", "sometimes")]).contains("sampler"));
        assert!(
            bad(
                on.clone(),
                &[
                    ("OTEL_TRACES_SAMPLER", "traceidratio"),
                    ("OTEL_TRACES_SAMPLER_ARG", "2")
                ]
            )
            .contains("sampler_arg")
        );
        assert!(bad(on.clone(), &[("OTEL_TRACES_SAMPLER_ARG", "half")]).contains("sampler_arg"));
        let e = bad(
            TelemetryConfig {
                otlp_endpoint: Some("collector:4317".into()),
                ..Default::default()
            },
            &[],
        );
        assert!(e.contains("otlp_endpoint"), "{e}");
        let e = bad(
            TelemetryConfig {
                queue_size: Some(0),
                ..on
            },
            &[],
        );
        assert!(e.contains("queue_size"), "{e}");
    }

    #[test]
    fn attributes_are_clipped_on_a_char_boundary() {
        assert_eq!(clip_attr("short", 10), "short");
        assert_eq!(clip_attr("abcdef", 3), "abc");
        assert_eq!(clip_attr("ééé", 3), "é");
        let https = TelemetryConfig {
            otlp_endpoint: Some("https://collector:4317".into()),
            ..Default::default()
        };
        let e = https.resolve("x", env(&[])).unwrap_err().to_string();
        assert!(e.contains("otlp_endpoint") && e.contains("http://"), "{e}");
    }

    #[test]
    fn traceparent_parsing() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            parse_traceparent(ok).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
        let mut h = http::HeaderMap::new();
        h.insert("traceparent", ok.parse().unwrap());
        assert_eq!(
            trace_id(Some(&h)).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id(None), None);
    }
}
