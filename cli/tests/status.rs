//! `securellm status`, the built binary against real services on loopback: nothing listening,
//! an in-process vram-scheduler (simulated GPU), an in-process gateway (its `/metrics`).

use std::process::Output;
use std::time::{Duration, Instant};

use securellm_proto::v1 as pb;
use securellm_proto::v1::acquire_lease_update::Update;
use securellm_testkit::gateway::standalone_gateway;
use securellm_testkit::{Stack, dead_addrs};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;

const GIB: u64 = 1 << 30;

/// Run `securellm --scheduler S --registry R --backend B status --gateway G [extra...]` with the
/// gateway's metrics at `metrics` (`$SECURELLM_GATEWAY_METRICS`) and no admin token anywhere.
async fn status(addrs: &[String], metrics: &str, extra: &[&str]) -> (Output, Duration) {
    let t = Instant::now();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_securellm"))
        .env_remove("SECURELLM_ADMIN_TOKEN")
        .env("SECURELLM_STACK_FILE", "/nonexistent/securellm-stack")
        .env("SECURELLM_GATEWAY_METRICS", metrics)
        .args(["--scheduler", &addrs[0]])
        .args(["--registry", &addrs[1]])
        .args(["--backend", &addrs[2]])
        .arg("status")
        .args(["--gateway", &addrs[3]])
        .args(extra)
        .output()
        .await
        .unwrap();
    (out, t.elapsed())
}

fn text(o: &Output) -> String {
    format!(
        "{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(o)))
}

fn line<'a>(s: &'a str, service: &str) -> &'a str {
    s.lines()
        .map(str::trim_start)
        .find(|l| l.starts_with(service))
        .unwrap_or_else(|| panic!("no line for {service} in\n{s}"))
}

const SERVICES: [&str; 4] = [
    "vram-scheduler",
    "registry",
    "backend-manager",
    "securellm-gateway",
];

#[tokio::test]
async fn nothing_listening_reports_every_service_down_and_exits_1_quickly() {
    let addrs = dead_addrs(5);
    let (addrs, metrics) = (&addrs[..4], addrs[4].clone());
    let (o, took) = status(addrs, &metrics, &[]).await;
    let s = text(&o);
    assert_eq!(o.status.code(), Some(1), "{s}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    for (name, addr) in SERVICES.iter().zip(addrs) {
        let l = line(&s, name);
        assert!(l.contains(addr.as_str()) && l.contains("down ("), "{l}");
    }
    assert!(s.contains("GPUS: unknown (vram-scheduler down)"), "{s}");
    assert!(s.contains("MODELS: unknown (backend-manager down)"), "{s}");
    // The reason names the metrics address it tried.
    assert!(
        s.contains(&format!("requests/s: unknown (metrics at {metrics}: ")),
        "{s}"
    );

    let (o, _) = status(addrs, &metrics, &["--json"]).await;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let v = json(&o);
    assert_eq!(v["up"], false);
    for name in SERVICES {
        assert_eq!(v["services"][name]["up"], false, "{v}");
        assert!(v["services"][name]["error"].is_string(), "{v}");
    }
    assert_eq!(v["gpus"], Value::Null);
    let why = v["unknown"]["requests"].as_str().unwrap_or_default();
    assert!(why.starts_with(&format!("metrics at {metrics}: ")), "{v}");
}

#[tokio::test]
async fn an_in_process_scheduler_shows_its_simulated_gpu_and_leases() {
    let scheduler = Stack::new().gpu(8 * GIB).scheduler_only().start().await;
    let mut c = scheduler.scheduler_client().await;
    let mut grant = c
        .acquire_lease(pb::AcquireLeaseRequest {
            holder: "status-test".into(),
            bytes: GIB,
            priority: 5,
            gpu_index: None,
            ttl_ms: 60_000,
            wait_ms: 0,
            label: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    loop {
        let u = grant.next().await.expect("no grant").unwrap();
        if let Some(Update::Granted(_)) = u.update {
            break;
        }
    }
    let mut addrs = dead_addrs(4);
    let metrics = addrs.pop().unwrap();
    addrs.insert(0, scheduler.scheduler_addr().to_string());

    let (o, took) = status(&addrs, &metrics, &[]).await;
    let s = text(&o);
    assert_eq!(o.status.code(), Some(1), "{s}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(line(&s, "vram-scheduler").contains("up ("), "{s}");
    assert!(line(&s, "registry").contains("down ("), "{s}");
    assert!(
        s.contains("GPUS (inventory: simulated)") && s.contains("(simulated)"),
        "{s}"
    );
    assert!(
        s.contains("total 8 GiB") && s.contains("leased 1 GiB"),
        "{s}"
    );
    let lease = line(s.split("LEASES\n").nth(1).unwrap(), "status-test");
    assert!(lease.contains("1 GiB") && lease.contains(" 5 "), "{lease}");

    let (o, _) = status(&addrs, &metrics, &["--json"]).await;
    let v = json(&o);
    assert_eq!(v["services"]["vram-scheduler"]["up"], true, "{v}");
    assert!(v["services"]["vram-scheduler"]["latency_ms"].is_number());
    assert_eq!(v["gpus"][0]["simulated"], true);
    assert_eq!(v["gpus"][0]["total_bytes"], 8 * GIB);
    assert_eq!(v["gpus"][0]["leased_bytes"], GIB);
    assert_eq!(v["leases"][0]["holder"], "status-test");
    assert_eq!(v["leases"][0]["priority"], 5);
    scheduler.shutdown().await;
}

/// One request over HTTP/1.1 (no credential: answered 401); the status line.
async fn unauthenticated(addr: std::net::SocketAddr) -> String {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await.unwrap();
    answer.lines().next().unwrap_or_default().to_string()
}

#[tokio::test]
async fn an_in_process_gateway_reports_requests_from_its_metrics_without_any_token() {
    let dir = tempfile::tempdir().unwrap();
    let dead = dead_addrs(4);
    let gateway = standalone_gateway(dir.path(), |c| {
        c.backend = dead[2].clone();
        c.registry = dead[1].clone();
        c.metrics_listen = Some("127.0.0.1:0".into());
    })
    .await;
    let metrics = gateway.metrics.as_ref().expect("a metrics listener").addr;
    let metrics = metrics.to_string();
    // One unauthenticated request: answered 401 and counted.
    assert!(
        unauthenticated(gateway.http_addr)
            .await
            .starts_with("HTTP/1.1 401")
    );

    let mut addrs = dead[..3].to_vec();
    addrs.push(gateway.grpc_addr.to_string());
    // No admin token at all: the counts come from the metrics, not the audit log.
    let (o, took) = status(&addrs, &metrics, &["--json"]).await;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let v = json(&o);
    assert_eq!(v["services"]["securellm-gateway"]["up"], true, "{v}");
    assert_eq!(v["requests"]["total"], 1, "{v}");
    assert_eq!(v["requests"]["per_second"], 0.0, "{v}");
    assert_eq!(v["requests"]["metrics"], metrics.as_str(), "{v}");
    assert_eq!(v["unknown"]["requests"], Value::Null, "{v}");

    // Requests during the two scrapes show as a rate: keep sending while status runs.
    let http = gateway.http_addr;
    let load = tokio::spawn(async move {
        let t = Instant::now();
        let mut n = 0u32;
        while t.elapsed() < Duration::from_secs(4) {
            unauthenticated(http).await;
            n += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        n
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (o, _) = status(&addrs, &metrics, &[]).await;
    let s = text(&o);
    assert!(line(&s, "securellm-gateway").contains("up ("), "{s}");
    let rate: f64 = s
        .split("requests/s: ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no rate in\n{s}"));
    assert!(rate > 1.0, "{s}");
    assert!(s.contains("since the gateway started)"), "{s}");
    let sent = load.await.unwrap();
    assert!(sent > 10, "{sent}");
    gateway.shutdown().await;
}
