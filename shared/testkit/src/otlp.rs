//! A real OTLP/gRPC trace receiver for tests: the `opentelemetry.proto.collector.trace.v1.
//! TraceService/Export` server generated from the OpenTelemetry protocol definitions (the
//! `opentelemetry-proto` crate), on `127.0.0.1:0`. It keeps every span it receives (the
//! `service.name` of its resource, ids in lower-case hex, name, attributes) so that a test can
//! wait for one trace across several processes and check its parent links.
//!
//! ```text
//! let rx = OtlpReceiver::start().await;
//! // start the services with OTEL_EXPORTER_OTLP_ENDPOINT=rx.endpoint(), send a request...
//! let spans = rx.wait_for_services(trace_id, &["registry", "securellm-gateway"], 20 s).await?;
//! assert!(unlinked(&spans, Some(caller_span_id)).is_empty());
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};

/// One span as the receiver got it.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceivedSpan {
    /// `service.name` of the span's resource (empty when the resource has none).
    pub service: String,
    /// 32 lower-case hex digits.
    pub trace_id: String,
    /// 16 lower-case hex digits.
    pub span_id: String,
    /// 16 lower-case hex digits; `None` for a root span.
    pub parent_span_id: Option<String>,
    pub name: String,
    /// The OTLP span kind (1 internal, 2 server, 3 client, 4 producer, 5 consumer).
    pub kind: i32,
    /// The span's attributes, values rendered as text (arrays and maps as their debug form).
    pub attributes: BTreeMap<String, String>,
    /// The resource's attributes.
    pub resource: BTreeMap<String, String>,
}

impl ReceivedSpan {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

#[derive(Default)]
struct Collected {
    spans: Mutex<Vec<ReceivedSpan>>,
    exports: AtomicUsize,
}

struct Receiver(Arc<Collected>);

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(&kv.value)))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = Vec::new();
        for rs in request.into_inner().resource_spans {
            let resource = rs
                .resource
                .as_ref()
                .map(|r| attributes(&r.attributes))
                .unwrap_or_default();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.push(ReceivedSpan {
                        service: service.clone(),
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent_span_id: (!s.parent_span_id.is_empty()
                            && s.parent_span_id.iter().any(|b| *b != 0))
                        .then(|| hex(&s.parent_span_id)),
                        name: s.name,
                        kind: s.kind,
                        attributes: attributes(&s.attributes),
                        resource: resource.clone(),
                    });
                }
            }
        }
        self.0.spans.lock().unwrap().extend(got);
        self.0.exports.fetch_add(1, Ordering::SeqCst);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// The OTLP/gRPC trace receiver; stops when dropped.
pub struct OtlpReceiver {
    addr: SocketAddr,
    collected: Arc<Collected>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl OtlpReceiver {
    /// Bind `127.0.0.1:0` and serve `TraceService/Export` (listening when this returns).
    pub async fn start() -> OtlpReceiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the OTLP receiver");
        let addr = listener.local_addr().unwrap();
        let collected = Arc::new(Collected::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // An exporter may gzip its batches (as OTLP allows): accept it, as a collector does.
        let svc = TraceServiceServer::new(Receiver(collected.clone()))
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await;
        });
        OtlpReceiver {
            addr,
            collected,
            stop: Some(stop),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`: the value for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far, in arrival order.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.collected.spans.lock().unwrap().clone()
    }

    /// How many `Export` calls arrived (an empty export counts too).
    pub fn exports(&self) -> usize {
        self.collected.exports.load(Ordering::SeqCst)
    }

    /// The spans of one trace (`trace_id` in hex, any case).
    pub fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        let id = trace_id.to_ascii_lowercase();
        self.spans()
            .into_iter()
            .filter(|s| s.trace_id == id)
            .collect()
    }

    /// The service names with at least one span in the trace.
    pub fn services_in(&self, trace_id: &str) -> BTreeSet<String> {
        self.trace(trace_id)
            .into_iter()
            .map(|s| s.service)
            .collect()
    }

    /// Wait (polling every 50 ms, at most `timeout`) until the trace has spans from every one of
    /// `services`; then its spans. `Err` names the services still missing at the deadline, with
    /// the spans received for the trace so far.
    pub async fn wait_for_services(
        &self,
        trace_id: &str,
        services: &[&str],
        timeout: Duration,
    ) -> Result<Vec<ReceivedSpan>, (Vec<String>, Vec<ReceivedSpan>)> {
        let deadline = Instant::now() + timeout;
        loop {
            let have = self.services_in(trace_id);
            let missing: Vec<String> = services
                .iter()
                .filter(|s| !have.contains(**s))
                .map(|s| s.to_string())
                .collect();
            if missing.is_empty() {
                return Ok(self.trace(trace_id));
            }
            if Instant::now() >= deadline {
                return Err((missing, self.trace(trace_id)));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Wait (at most `timeout`) until some trace has spans from at least `n` distinct services;
    /// its trace id.
    pub async fn wait_for_shared_trace(&self, n: usize, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut by_trace: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for s in self.spans() {
                by_trace.entry(s.trace_id).or_default().insert(s.service);
            }
            if let Some((id, _)) = by_trace.into_iter().find(|(_, svcs)| svcs.len() >= n) {
                return Some(id);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The spans of one trace whose parent is neither `root_parent` (the caller's span id, when the
/// trace was continued from a `traceparent`) nor another span of `spans`: broken parent links.
/// A root span (no parent) counts as broken when `root_parent` is given (the trace should have
/// continued the caller's).
pub fn unlinked<'a>(spans: &'a [ReceivedSpan], root_parent: Option<&str>) -> Vec<&'a ReceivedSpan> {
    let ids: BTreeSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    spans
        .iter()
        .filter(|s| match s.parent_span_id.as_deref() {
            None => root_parent.is_some(),
            Some(p) => !ids.contains(p) && Some(p) != root_parent,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

    fn kv(k: &str, v: &str) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(v.into())),
            }),
            ..Default::default()
        }
    }

    fn span(trace: u8, id: u8, parent: Option<u8>, name: &str) -> Span {
        Span {
            trace_id: vec![trace; 16],
            span_id: vec![id; 8],
            parent_span_id: parent.map(|p| vec![p; 8]).unwrap_or_default(),
            name: name.into(),
            kind: 2,
            attributes: vec![kv("rpc.system", "grpc")],
            ..Default::default()
        }
    }

    fn batch(service: &str, spans: Vec<Span>) -> ResourceSpans {
        ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", service)],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn receives_spans_over_grpc_and_groups_them_by_trace() {
        let rx = OtlpReceiver::start().await;
        let mut c = TraceServiceClient::connect(rx.endpoint())
            .await
            .unwrap()
            .send_compressed(tonic::codec::CompressionEncoding::Gzip);
        assert_eq!(rx.wait_for_shared_trace(1, Duration::ZERO).await, None);
        c.export(ExportTraceServiceRequest {
            resource_spans: vec![
                batch("a", vec![span(1, 0x10, Some(0x99), "root")]),
                batch(
                    "b",
                    vec![span(1, 0x11, Some(0x10), "child"), span(2, 0x20, None, "x")],
                ),
            ],
        })
        .await
        .unwrap();
        assert_eq!(rx.exports(), 1);
        let t1 = "01".repeat(16);
        let spans = rx
            .wait_for_services(&t1, &["a", "b"], Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(spans.len(), 2);
        assert_eq!(spans[0].service, "a");
        assert_eq!(spans[0].span_id, "10".repeat(8));
        assert_eq!(
            spans[1].parent_span_id.as_deref(),
            Some("10".repeat(8).as_str())
        );
        assert_eq!(spans[1].attr("rpc.system"), Some("grpc"));
        assert_eq!(spans[1].resource["service.name"], "b");
        // Parent links: the root's parent is the caller's span; anything else is unlinked.
        let caller = "99".repeat(8);
        assert!(unlinked(&spans, Some(&caller)).is_empty());
        assert_eq!(unlinked(&spans, Some("00000000000000ff")).len(), 1);
        assert_eq!(unlinked(&spans[1..], None).len(), 1);
        // A trace with one service: never "shared" by two.
        let (missing, got) = rx
            .wait_for_services(&"02".repeat(16), &["a", "b"], Duration::from_millis(100))
            .await
            .unwrap_err();
        assert_eq!(missing, vec!["a".to_string()]);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].parent_span_id, None);
        assert_eq!(
            rx.wait_for_shared_trace(2, Duration::from_secs(1)).await,
            Some(t1)
        );
        assert_eq!(rx.wait_for_shared_trace(3, Duration::ZERO).await, None);
    }
}
