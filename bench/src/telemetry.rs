//! What observability costs the gateway: the same mock upstream and load generator as the
//! `gateway` benchmark, through nginx (the baseline hop) and through three gateway processes that
//! differ only in telemetry:
//! - **bare**: no metrics listener (the `metrics` facade has no recorder: every record is a
//!   no-op) and no trace export;
//! - **metrics**: the default — Prometheus recorder installed, `/metrics` served, scraped once a
//!   second during the runs as Prometheus would; trace export off;
//! - **export**: metrics as above plus OTLP trace export of every request (sampler
//!   `always_on`) to a real OTLP/gRPC receiver in this process.
//!
//! Runs are interleaved (round-robin over the targets, several rounds, median per target) so that
//! a busy neighbour on a 2-core machine hurts all of them alike. Targets: export on costs at most
//! 5 % of throughput at concurrency 64 (`export_vs_metrics_x >= 0.95`); metrics and export-off
//! cost nothing measurable (`metrics_vs_bare_x` within the run-to-run noise, printed beside it).

use std::time::Duration;

use crate::gateway::{
    Nginx, Run, Target, bench_key, measured, run_load, spawn_gateway, start_mock,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds per measured run.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Rounds over the four targets (the median run per target counts).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Concurrency.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// The export gateway's sampler (`always_on` measures the worst case: every request traced).
    #[arg(long, default_value = "always_on")]
    sampler: String,
    /// The ratio for a `*traceidratio` sampler.
    #[arg(long, default_value_t = 1.0)]
    sampler_arg: f64,
}

struct Gateway {
    child: tokio::process::Child,
    http: String,
    metrics: Option<String>,
    key: String,
    _dir: tempfile::TempDir,
}

async fn start_gateway(mock: std::net::SocketAddr, extra: &str) -> anyhow::Result<Gateway> {
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("securellm.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n{extra}\n[gateway.upstreams.mock]\nbase_url = \"http://{mock}/v1\"\nmodels = [\"mock-model\"]\nredaction = \"allow\"\n"
        ),
    )?;
    let data = dir.path().join("data");
    let (child, ready) = spawn_gateway(&cfg, &data, &[]).await?;
    let word = |k: &str| {
        ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .map(str::to_string)
    };
    let grpc = word("grpc=").ok_or_else(|| anyhow::anyhow!("no grpc= in {ready:?}"))?;
    let http = word("http=").ok_or_else(|| anyhow::anyhow!("no http= in {ready:?}"))?;
    let key = bench_key(&grpc, &data).await?;
    Ok(Gateway {
        child,
        http,
        metrics: word("metrics="),
        key,
        _dir: dir,
    })
}

fn median_rps(runs: &[Run]) -> f64 {
    let mut v: Vec<f64> = runs.iter().map(|r| r.s.ops_per_s()).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Relative spread (max - min) / median of a target's runs: the noise a difference must beat.
fn spread(runs: &[Run]) -> f64 {
    let v: Vec<f64> = runs.iter().map(|r| r.s.ops_per_s()).collect();
    let (lo, hi) = v
        .iter()
        .fold((f64::MAX, 0.0f64), |(l, h), &x| (l.min(x), h.max(x)));
    (hi - lo) / median_rps(runs).max(1e-9)
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(a.rounds >= 1, "--rounds must be at least 1");
    let mock_addr = start_mock().await?;

    let receiver = securellm_testkit::otlp::OtlpReceiver::start().await;
    let bare = start_gateway(mock_addr, "metrics_listen = \"off\"").await?;
    let metrics = start_gateway(mock_addr, "metrics_listen = \"127.0.0.1:0\"").await?;
    let export = start_gateway(
        mock_addr,
        &format!(
            "metrics_listen = \"127.0.0.1:0\"\n[telemetry]\notlp_endpoint = \"{}\"\nsampler = \"{}\"\nsampler_arg = {}",
            receiver.endpoint(),
            a.sampler,
            a.sampler_arg
        ),
    )
    .await?;
    anyhow::ensure!(bare.metrics.is_none(), "the bare gateway serves metrics");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let ngx_dir = tempfile::tempdir()?;
    let (nginx, ngx_port) = Nginx::start(ngx_dir.path(), mock_addr, cores).await?;

    let target = |name: &'static str, g: &Gateway| Target {
        name,
        url: format!("http://{}/v1/chat/completions", g.http),
        key: Some(g.key.clone()),
        pids: g.child.id().into_iter().collect(),
    };
    let targets = [
        Target {
            name: "nginx",
            url: format!("http://127.0.0.1:{ngx_port}/v1/chat/completions"),
            key: None,
            pids: nginx.pids(),
        },
        target("bare", &bare),
        target("metrics", &metrics),
        target("export", &export),
    ];
    // Prometheus' part: scrape the two metrics listeners once a second during the runs.
    let scrapes = [metrics.metrics.clone(), export.metrics.clone()];
    let scraper = tokio::spawn(async move {
        let http = reqwest::Client::new();
        loop {
            for m in scrapes.iter().flatten() {
                let _ = http.get(format!("http://{m}/metrics")).send().await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
        .build()?;
    let dur = Duration::from_secs_f64(a.seconds);
    println!(
        "{cores} cores; c={}; {} round(s) of {:.1} s per target, interleaved; export sampler {} ({})",
        a.concurrency, a.rounds, a.seconds, a.sampler, a.sampler_arg
    );
    for t in &targets {
        run_load(&http, t, 8, Duration::from_millis(500)).await?;
    }
    let spans_before = receiver.spans().len();
    let mut runs: Vec<Vec<Run>> = (0..targets.len()).map(|_| Vec::new()).collect();
    let mut export_requests = 0usize;
    for round in 0..a.rounds {
        for (i, t) in targets.iter().enumerate() {
            let r = measured(t, run_load(&http, t, a.concurrency, dur)).await?;
            println!(
                "round {round} {:<8} {:>8.0} req/s  p50 {:>6.0} us  p99 {:>6.0} us  proxy cpu {:>6.1} us/req",
                t.name,
                r.s.ops_per_s(),
                r.s.percentile(50.0),
                r.s.percentile(99.0),
                r.proxy_us()
            );
            if t.name == "export" {
                export_requests += r.s.latencies_us.len();
            }
            runs[i].push(r);
        }
    }
    scraper.abort();
    // Spans still queued leave within the exporter's batch delay.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut seen = usize::MAX;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let now = receiver.spans().len();
        if now == seen {
            break;
        }
        seen = now;
    }
    let spans = receiver.spans().len() - spans_before;
    let dropped = scrape_counter(
        export.metrics.as_deref(),
        "securellm_trace_spans_dropped_total",
    )
    .await;
    drop(nginx);

    let rps: Vec<f64> = runs.iter().map(|r| median_rps(r)).collect();
    let noise: Vec<f64> = runs.iter().map(|r| spread(r)).collect();
    let (n, b, m, e) = (rps[0], rps[1], rps[2], rps[3]);
    let metrics_vs_bare = m / b.max(1e-9);
    let export_vs_metrics = e / m.max(1e-9);
    let cpu = |i: usize| {
        let v: Vec<f64> = runs[i].iter().map(|r| r.proxy_us()).collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    println!(
        "median req/s at c={}: nginx {n:.0}, bare {b:.0}, metrics {m:.0}, export {e:.0} (run-to-run spread: bare {:.1} %, metrics {:.1} %, export {:.1} %)",
        a.concurrency,
        noise[1] * 100.0,
        noise[2] * 100.0,
        noise[3] * 100.0
    );
    println!(
        "gateway CPU per request: bare {:.1} us, metrics {:.1} us, export {:.1} us (nginx {:.1} us)",
        cpu(1),
        cpu(2),
        cpu(3),
        cpu(0)
    );
    println!(
        "spans received {spans} for {export_requests} exported requests ({:.1} per request); dropped by the gateway: {}",
        spans as f64 / export_requests.max(1) as f64,
        dropped.map_or("n/a".into(), |d| format!("{d:.0}"))
    );
    let export_met = export_vs_metrics >= 0.95;
    let metrics_met = (1.0 - metrics_vs_bare) <= noise[1].max(noise[2]).max(0.02);
    println!(
        "target: trace export on costs at most 5 % throughput: {} ({export_vs_metrics:.3} x export-off)",
        if export_met { "MET" } else { "NOT MET" }
    );
    println!(
        "target: metrics with export off cost nothing measurable: {} ({metrics_vs_bare:.3} x bare; noise {:.1} %)",
        if metrics_met { "MET" } else { "NOT MET" },
        noise[1].max(noise[2]).max(0.02) * 100.0
    );
    println!(
        "RESULT nginx_rps_c{c}={n:.0} bare_rps_c{c}={b:.0} metrics_rps_c{c}={m:.0} export_rps_c{c}={e:.0} metrics_vs_bare_x={metrics_vs_bare:.3} export_vs_metrics_x={export_vs_metrics:.3} metrics_vs_nginx_x={:.2} bare_cpu_us_per_req={:.1} metrics_cpu_us_per_req={:.1} export_cpu_us_per_req={:.1} spans_per_request={:.2} spans_dropped={} targets_met={}/2",
        m / n.max(1e-9),
        cpu(1),
        cpu(2),
        cpu(3),
        spans as f64 / export_requests.max(1) as f64,
        dropped.unwrap_or(-1.0),
        export_met as u8 + metrics_met as u8,
        c = a.concurrency,
    );
    Ok(())
}

/// One counter's value from a `/metrics` scrape (summed over its series).
async fn scrape_counter(addr: Option<&str>, name: &str) -> Option<f64> {
    let body = reqwest::get(format!("http://{}/metrics", addr?))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    Some(
        body.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}
