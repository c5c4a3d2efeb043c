//! `securellm status [--json]`: the whole stack at a glance. Each of the four services is asked
//! `grpc.health.v1.Health/Check` (with its latency); the services that answer are then asked for
//! their state: the scheduler's GPUs and leases, the backend manager's instances, and the
//! gateway's requests: `securellm_gateway_requests_total` from its Prometheus `/metrics`, scraped
//! twice [`RATE_INTERVAL`] apart (requests since it started, and per second). No admin token is
//! needed and the audit log is not read. The metrics address is `$SECURELLM_GATEWAY_METRICS`, else
//! the one `make run` wrote to the stack file, else the documented default (127.0.0.1:9454).
//!
//! Every call gives up after [`CALL_TIMEOUT`]; a service that does not answer is reported
//! `down (reason)` and the others are still shown. Exit status 0 only when all four are up.

use std::time::{Duration, Instant};

use securellm_common::format_bytes;
use securellm_common::internal_auth::{InternalToken, authenticated};
use securellm_common::time::now_ms;
use securellm_proto::v1 as pb;
use securellm_proto::v1::backend_manager_client::BackendManagerClient;
use securellm_proto::v1::vram_scheduler_client::VramSchedulerClient;
use serde_json::{Value, json};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

use securellm_client::{connect, endpoint, instances, stack, status_text, vram};

use crate::health;

/// The limit for connecting and for each call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// The two scrapes of the gateway's metrics are this far apart.
pub const RATE_INTERVAL: Duration = Duration::from_secs(1);

/// The counter the rate is computed from (every API request, both transports).
const REQUESTS_TOTAL: &str = "securellm_gateway_requests_total";

/// The gateway's `/metrics` address when neither the environment nor the stack file names one.
const DEFAULT_GATEWAY_METRICS: &str = "127.0.0.1:9454";

/// The services' addresses (as given: `HOST:PORT` or a URL) and the internal token (health
/// checks need none; the scheduler's and the manager's state do).
pub struct Addresses {
    pub internal_token: Option<InternalToken>,
    pub scheduler: String,
    pub registry: String,
    pub backend: String,
    pub gateway: String,
    /// The gateway's `/metrics` listener (HOST:PORT), for requests/s.
    pub gateway_metrics: String,
}

/// One service's health: the check's latency, or why it is down.
#[derive(Debug)]
pub struct ServiceHealth {
    pub name: &'static str,
    pub address: String,
    pub up: Result<Duration, String>,
}

/// Requests at the gateway, or why they are unknown.
#[derive(Debug)]
pub enum Requests {
    /// `total`: requests since the gateway started (at the second scrape); `per_second`: the
    /// increase between the two scrapes over the time between them.
    Measured {
        metrics: String,
        total: u64,
        per_second: f64,
    },
    Unknown(String),
}

/// Everything `securellm status` shows.
#[derive(Debug)]
pub struct Report {
    pub services: Vec<ServiceHealth>,
    pub scheduler: Result<pb::SchedulerStatus, String>,
    pub models: Result<Vec<pb::BackendInstance>, String>,
    pub requests: Requests,
}

impl Report {
    pub fn all_up(&self) -> bool {
        self.services.iter().all(|s| s.up.is_ok())
    }
}

/// The innermost cause: "Connection refused (os error 111)" rather than "transport error".
fn reason(e: &anyhow::Error) -> String {
    e.root_cause().to_string()
}

fn status_reason(s: &tonic::Status) -> String {
    status_text(s, CALL_TIMEOUT)
}

/// Health-check the service at `addr`; when it is up, also ask `then` on the same channel.
/// `Err(reason)` in the second place when the service is down or `then` failed.
async fn probe<T, F, Fut>(
    name: &'static str,
    addr: &str,
    then: F,
) -> (ServiceHealth, Result<T, String>)
where
    F: FnOnce(Channel) -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let up = async {
        let ch = connect(&endpoint(addr), CALL_TIMEOUT, Some(CALL_TIMEOUT))
            .await
            .map_err(|e| reason(&e))?;
        let t = Instant::now();
        match health::check(ch.clone(), "").await {
            Ok(ServingStatus::Serving) => Ok((t.elapsed(), ch)),
            Ok(s) => Err(s.as_str_name().to_string()),
            Err(s) => Err(status_reason(&s)),
        }
    }
    .await;
    let (up, detail) = match up {
        Ok((latency, ch)) => (Ok(latency), then(ch).await),
        Err(e) => (Err(e), Err(format!("{name} down"))),
    };
    let health = ServiceHealth {
        name,
        address: addr.to_string(),
        up,
    };
    (health, detail)
}

/// Where the gateway's metrics are: the flag (or `$SECURELLM_GATEWAY_METRICS`), the stack file,
/// the default.
pub fn gateway_metrics_addr(flag: Option<&str>) -> String {
    flag.map(str::to_string)
        .filter(|v| !v.trim().is_empty())
        .or_else(|| stack::get(stack::GATEWAY_METRICS))
        .unwrap_or_else(|| DEFAULT_GATEWAY_METRICS.to_string())
}

/// The sum of every series of `name` in a Prometheus text exposition; `None` if it has none.
pub fn counter_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // The name exactly: `name{...} v` or `name v` (not `name_bucket`, not a longer name).
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        let value = rest
            .rsplit_once('}')
            .map_or(rest, |(_, v)| v)
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok());
        if let Some(v) = value {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// `GET /metrics` at `addr` (`HOST:PORT`): the body of a 200 answer.
async fn scrape(addr: &str) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut conn = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("metrics at {addr}: {e}"))?;
        conn.write_all(
            format!("GET /metrics HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .map_err(|e| format!("metrics at {addr}: {e}"))?;
        let mut raw = Vec::new();
        // A scrape is a few kB; 16 MiB bounds a peer that is not a metrics listener.
        (&mut conn)
            .take(16 << 20)
            .read_to_end(&mut raw)
            .await
            .map_err(|e| format!("metrics at {addr}: {e}"))?;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("metrics at {addr}: not an HTTP answer"))?;
        let status = head.lines().next().unwrap_or_default();
        if !status.starts_with("HTTP/1.1 200") && !status.starts_with("HTTP/1.0 200") {
            return Err(format!("metrics at {addr}: {status}"));
        }
        if head.lines().any(|l| {
            l.to_ascii_lowercase()
                .starts_with("transfer-encoding: chunked")
        }) {
            return Ok(dechunk(body));
        }
        Ok(body.to_string())
    };
    tokio::time::timeout(CALL_TIMEOUT, fetch)
        .await
        .map_err(|_| format!("metrics at {addr}: no answer within {CALL_TIMEOUT:?}"))?
}

/// The payload of a chunked HTTP/1.1 body.
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].strip_prefix("\r\n").unwrap_or(&after[n..]);
    }
    out
}

/// The gateway's requests: two scrapes [`RATE_INTERVAL`] apart.
async fn requests(addr: &str) -> Requests {
    let total = |text: &str| counter_sum(text, REQUESTS_TOTAL).unwrap_or(0.0);
    let first = match scrape(addr).await {
        Ok(t) => total(&t),
        Err(e) => return Requests::Unknown(e),
    };
    let t = Instant::now();
    tokio::time::sleep(RATE_INTERVAL).await;
    let second = match scrape(addr).await {
        Ok(t) => total(&t),
        Err(e) => return Requests::Unknown(e),
    };
    let secs = t.elapsed().as_secs_f64().max(1e-3);
    Requests::Measured {
        metrics: addr.to_string(),
        total: second.max(0.0) as u64,
        per_second: ((second - first).max(0.0) / secs * 100.0).round() / 100.0,
    }
}

/// Ask all four services at once (request counts come from the gateway's metrics, not its audit
/// log: no admin token is needed).
pub async fn collect(addrs: &Addresses) -> Report {
    let internal = addrs.internal_token.as_ref();
    let scheduler = probe("vram-scheduler", &addrs.scheduler, |ch| async move {
        VramSchedulerClient::new(authenticated(ch, internal))
            .get_status(pb::GetStatusRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|s| status_reason(&s))
    });
    let registry = probe("registry", &addrs.registry, |_| async { Ok(()) });
    let backend = probe("backend-manager", &addrs.backend, |ch| async move {
        BackendManagerClient::new(authenticated(ch, internal))
            .list_instances(pb::ListInstancesRequest::default())
            .await
            .map(|r| r.into_inner().instances)
            .map_err(|s| status_reason(&s))
    });
    let gateway = probe("securellm-gateway", &addrs.gateway, |_| async { Ok(()) });
    let metrics = addrs.gateway_metrics.clone();
    let ((s, scheduler), (r, _), (b, models), (g, _), requests) =
        tokio::join!(scheduler, registry, backend, gateway, requests(&metrics));
    Report {
        services: vec![s, r, b, g],
        scheduler,
        models,
        requests,
    }
}

fn latency_ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

/// The report as text.
pub fn render_text(r: &Report) -> String {
    let mut out = format!("{:<18} {:<22} {}\n", "SERVICE", "ADDRESS", "STATE");
    for s in &r.services {
        let state = match &s.up {
            Ok(d) => format!("up ({:.1} ms)", latency_ms(*d)),
            Err(e) => format!("down ({e})"),
        };
        out += &format!("{:<18} {:<22} {}\n", s.name, s.address, state);
    }
    out += "\n";
    match &r.scheduler {
        Ok(st) => {
            out += &format!("GPUS (inventory: {})\n", st.inventory);
            for g in &st.gpus {
                out += &format!(
                    "  GPU {} {}{} {}\n    total {}  used {}  leased {}  foreign {}  free {}  grantable {}{}\n",
                    g.index,
                    g.name,
                    if g.simulated { " (simulated)" } else { "" },
                    vram::bar(g),
                    format_bytes(g.total_bytes),
                    format_bytes(g.used_bytes),
                    format_bytes(g.leased_bytes),
                    format_bytes(g.foreign_bytes),
                    format_bytes(g.free_bytes),
                    format_bytes(g.grantable_bytes),
                    if g.overcommitted {
                        "  OVER-COMMITTED"
                    } else {
                        ""
                    },
                );
            }
            out += "LEASES\n";
            if st.leases.is_empty() {
                out += "  (none)\n";
            } else {
                out += &format!(
                    "  {:<32} {:>10} {:>5} {:>4}\n",
                    "HOLDER", "SIZE", "PRIO", "GPU"
                );
                for l in &st.leases {
                    let holder = if l.label.is_empty() {
                        l.holder.clone()
                    } else {
                        format!("{} ({})", l.holder, l.label)
                    };
                    out += &format!(
                        "  {:<32} {:>10} {:>5} {:>4}\n",
                        holder,
                        format_bytes(l.bytes),
                        l.priority,
                        l.gpu_index
                    );
                }
            }
            if !st.queue.is_empty() {
                out += &format!("  {} request(s) waiting in the queue\n", st.queue.len());
            }
        }
        Err(e) => out += &format!("GPUS: unknown ({e})\n"),
    }
    out += "\n";
    match &r.models {
        Ok(instances) => out += &format!("MODELS\n{}", instances::render(instances, now_ms())),
        Err(e) => out += &format!("MODELS: unknown ({e})\n"),
    }
    out += "\n";
    out += &match &r.requests {
        Requests::Measured {
            total, per_second, ..
        } => format!(
            "requests/s: {per_second:.2} (over {} s; {total} since the gateway started)\n",
            RATE_INTERVAL.as_secs()
        ),
        Requests::Unknown(e) => format!("requests/s: unknown ({e})\n"),
    };
    out
}

/// The report as one JSON object (byte counts in bytes, latencies in milliseconds; a part that
/// could not be asked is `null`, with the reason under `unknown`).
pub fn render_json(r: &Report) -> Value {
    let mut unknown = serde_json::Map::new();
    let services: serde_json::Map<String, Value> = r
        .services
        .iter()
        .map(|s| {
            let v = match &s.up {
                Ok(d) => json!({"address": s.address, "up": true, "latency_ms": latency_ms(*d)}),
                Err(e) => json!({"address": s.address, "up": false, "error": e}),
            };
            (s.name.to_string(), v)
        })
        .collect();
    let (inventory, gpus, leases, queued) = match &r.scheduler {
        Ok(st) => (
            json!(st.inventory),
            st.gpus
                .iter()
                .map(|g| {
                    json!({
                        "index": g.index,
                        "uuid": g.uuid,
                        "name": g.name,
                        "simulated": g.simulated,
                        "total_bytes": g.total_bytes,
                        "used_bytes": g.used_bytes,
                        "leased_bytes": g.leased_bytes,
                        "foreign_bytes": g.foreign_bytes,
                        "reserve_bytes": g.reserve_bytes,
                        "free_bytes": g.free_bytes,
                        "grantable_bytes": g.grantable_bytes,
                        "overcommitted": g.overcommitted,
                    })
                })
                .collect(),
            st.leases
                .iter()
                .map(|l| {
                    json!({
                        "id": l.id,
                        "holder": l.holder,
                        "label": l.label,
                        "gpu_index": l.gpu_index,
                        "bytes": l.bytes,
                        "priority": l.priority,
                        "idle": l.idle,
                        "evicting": l.evict_by_ms.is_some(),
                    })
                })
                .collect(),
            json!(st.queue.len()),
        ),
        Err(e) => {
            unknown.insert("gpus".into(), json!(e));
            (Value::Null, Value::Null, Value::Null, Value::Null)
        }
    };
    let models = match &r.models {
        Ok(instances) => instances
            .iter()
            .map(|i| {
                json!({
                    "id": i.id,
                    "model_name": i.model_name,
                    "state": instances::state(i.state),
                    "gpu_index": i.gpu_index,
                    "lease_bytes": i.lease_bytes,
                    "measured_bytes": i.measured_bytes,
                    "pid": i.pid,
                    "in_flight": i.in_flight,
                    "last_used_ms": i.last_used_ms,
                    "crash_count": i.crash_count,
                    "last_error": i.last_error,
                })
            })
            .collect(),
        Err(e) => {
            unknown.insert("models".into(), json!(e));
            Value::Null
        }
    };
    let requests = match &r.requests {
        Requests::Measured {
            metrics,
            total,
            per_second,
        } => json!({
            "per_second": per_second,
            "total": total,
            "interval_s": RATE_INTERVAL.as_secs_f64(),
            "metrics": metrics,
        }),
        Requests::Unknown(e) => {
            unknown.insert("requests".into(), json!(e));
            Value::Null
        }
    };
    json!({
        "up": r.all_up(),
        "services": services,
        "inventory": inventory,
        "gpus": gpus,
        "leases": leases,
        "queued": queued,
        "models": models,
        "requests": requests,
        "unknown": unknown,
    })
}

/// Print the report; `Ok(true)` when all four services are up.
pub async fn run(addrs: &Addresses, as_json: bool) -> anyhow::Result<bool> {
    let r = collect(addrs).await;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&render_json(&r))?);
    } else {
        print!("{}", render_text(&r));
    }
    use std::io::Write;
    std::io::stdout().flush()?;
    Ok(r.all_up())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        Report {
            services: vec![
                ServiceHealth {
                    name: "vram-scheduler",
                    address: "127.0.0.1:1".into(),
                    up: Ok(Duration::from_micros(1_300)),
                },
                ServiceHealth {
                    name: "registry",
                    address: "127.0.0.1:2".into(),
                    up: Err("Connection refused (os error 111)".into()),
                },
            ],
            scheduler: Ok(pb::SchedulerStatus {
                inventory: "simulated".into(),
                gpus: vec![pb::GpuStatus {
                    name: "Sim".into(),
                    simulated: true,
                    total_bytes: 8 << 30,
                    used_bytes: 1 << 30,
                    leased_bytes: 1 << 30,
                    free_bytes: 7 << 30,
                    ..Default::default()
                }],
                leases: vec![pb::Lease {
                    holder: "mgr".into(),
                    label: "tiny".into(),
                    bytes: 1 << 30,
                    priority: 7,
                    ..Default::default()
                }],
                queue: vec![],
            }),
            models: Err("backend-manager down".into()),
            requests: Requests::Measured {
                metrics: "127.0.0.1:9454".into(),
                total: 1234,
                per_second: 0.5,
            },
        }
    }

    #[test]
    fn text_shows_services_gpus_leases_models_and_rate() {
        let r = report();
        assert!(!r.all_up());
        let s = render_text(&r);
        for want in [
            "vram-scheduler     127.0.0.1:1",
            "up (1.3 ms)",
            "down (Connection refused (os error 111))",
            "GPU 0 Sim (simulated)",
            "total 8 GiB  used 1 GiB  leased 1 GiB  foreign 0 B  free 7 GiB",
            "mgr (tiny)",
            "MODELS: unknown (backend-manager down)",
            "requests/s: 0.50 (over 1 s; 1234 since the gateway started)",
        ] {
            assert!(s.contains(want), "{want:?} missing in\n{s}");
        }
    }

    #[test]
    fn json_has_the_same_facts() {
        let v = render_json(&report());
        assert_eq!(v["up"], false);
        assert_eq!(v["services"]["vram-scheduler"]["latency_ms"], 1.3);
        assert_eq!(v["services"]["registry"]["up"], false);
        assert_eq!(v["gpus"][0]["free_bytes"], 7u64 << 30);
        assert_eq!(v["leases"][0]["priority"], 7);
        assert_eq!(v["models"], Value::Null);
        assert_eq!(v["unknown"]["models"], "backend-manager down");
        assert_eq!(v["requests"]["per_second"], 0.5);
        assert_eq!(v["requests"]["total"], 1234);
    }

    #[test]
    fn counters_are_summed_over_their_series_only() {
        let text = "# HELP securellm_gateway_requests_total Requests.\n\
            # TYPE securellm_gateway_requests_total counter\n\
            securellm_gateway_requests_total{endpoint=\"chat\",model=\"a b}\",status=\"2xx\",transport=\"http\"} 3\n\
            securellm_gateway_requests_total{endpoint=\"models\",model=\"_none\",status=\"4xx\",transport=\"grpc\"} 4\n\
            securellm_gateway_requests_total_other 100\n\
            securellm_gateway_request_duration_seconds_bucket{le=\"1\"} 50\n";
        assert_eq!(counter_sum(text, REQUESTS_TOTAL), Some(7.0));
        assert_eq!(
            counter_sum("securellm_gateway_requests_total 2\n", REQUESTS_TOTAL),
            Some(2.0)
        );
        assert_eq!(counter_sum("", REQUESTS_TOTAL), None);
        assert_eq!(
            counter_sum(
                "securellm_gateway_requests_total{a=\"b\"} x\n",
                REQUESTS_TOTAL
            ),
            None
        );
    }

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            "hello world"
        );
        assert_eq!(dechunk("zz\r\n"), "");
    }
}
