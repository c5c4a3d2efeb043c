//! Gateway overhead: a fast mock OpenAI upstream (Rust, loopback) called directly vs through the
//! gateway binary (API-key auth, a rate limit high enough never to trigger, audit on), at
//! concurrency 1, 16 and 64; the gateway's RSS; and time to first byte of a 50-chunk stream.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use axum::routing::post;
use futures::StreamExt;
use securellm_proto::v1 as pb;
use securellm_proto::v1::gateway_admin_client::GatewayAdminClient;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::stats::Samples;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds per measured run.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
}

const REPLY: &str = r#"{"id":"chatcmpl-mock","object":"chat.completion","created":1,"model":"mock-model","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}"#;

async fn mock(body: String) -> axum::response::Response {
    use axum::response::IntoResponse;
    if body.contains("\"stream\":true") {
        let chunks = futures::stream::iter((0..50).map(|i| {
            Ok::<_, std::io::Error>(bytes::Bytes::from(format!(
                "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"t{i}\"}}}}]}}\n\n"
            )))
        }))
        .chain(futures::stream::once(async { Ok(bytes::Bytes::from_static(b"data: [DONE]\n\n")) }));
        return (
            [("content-type", "text/event-stream")],
            axum::body::Body::from_stream(chunks),
        )
            .into_response();
    }
    ([("content-type", "application/json")], REPLY).into_response()
}

async fn run_load(
    http: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    c: usize,
    dur: Duration,
) -> anyhow::Result<Samples> {
    let start = Instant::now();
    let deadline = start + dur;
    let mut tasks = Vec::new();
    for _ in 0..c {
        let http = http.clone();
        let url = url.to_string();
        let key = key.map(str::to_string);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                let mut r = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(r#"{"model":"mock-model","messages":[{"role":"user","content":"hi"}],"max_tokens":1}"#);
                if let Some(k) = &key {
                    r = r.bearer_auth(k);
                }
                let resp = r.send().await?;
                anyhow::ensure!(resp.status().is_success(), "status {}", resp.status());
                resp.bytes().await?;
                lat.push(t.elapsed().as_secs_f64() * 1e6);
            }
            anyhow::Ok(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(Samples::new(all, start.elapsed()))
}

async fn ttfb(http: &reqwest::Client, url: &str, key: Option<&str>) -> anyhow::Result<f64> {
    let mut v = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        let mut r = http
            .post(url)
            .header("content-type", "application/json")
            .body(r#"{"model":"mock-model","messages":[{"role":"user","content":"hi"}],"stream":true}"#);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        let resp = r.send().await?;
        let mut s = resp.bytes_stream();
        s.next().await;
        v.push(t.elapsed().as_secs_f64() * 1e6);
        while s.next().await.is_some() {}
    }
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(str::to_string)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Start the release gateway binary (beside this one) with `config`, `data_dir` and `extra`
/// flags; its `ready` line once it accepts connections (the child dies with the handle).
pub(crate) async fn spawn_gateway(
    config: &std::path::Path,
    data_dir: &std::path::Path,
    extra: &[std::ffi::OsString],
) -> anyhow::Result<(tokio::process::Child, String)> {
    let bin: PathBuf = std::env::current_exe()?.with_file_name("securellm-gateway");
    anyhow::ensure!(
        bin.is_file(),
        "{} missing: cargo build --release -p securellm-gateway",
        bin.display()
    );
    let mut child = tokio::process::Command::new(&bin)
        .arg("--config")
        .arg(config)
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(
        child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?,
    )
    .lines();
    let ready = lines
        .next_line()
        .await?
        .ok_or_else(|| anyhow::anyhow!("gateway exited"))?;
    Ok((child, ready))
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    // The mock upstream.
    let app = axum::Router::new().route("/v1/chat/completions", post(mock));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let mock_addr = l.local_addr()?;
    tokio::spawn(async move { axum::serve(l, app).await });

    // The gateway binary, configured with the mock as a cloud upstream.
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("securellm.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n[gateway.upstreams.mock]\nbase_url = \"http://{mock_addr}/v1\"\nmodels = [\"mock-model\"]\nredaction = \"allow\"\n"
        ),
    )?;
    let (mut child, ready) = spawn_gateway(&cfg, &dir.path().join("data"), &[]).await?;
    let grpc = ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("grpc="))
        .unwrap_or_default()
        .to_string();
    let http_addr = ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http="))
        .unwrap_or_default()
        .to_string();
    let pid = child.id().unwrap_or(0);

    // A key with limits far above what the benchmark can reach.
    let token = std::fs::read_to_string(dir.path().join("data/admin-token"))?
        .trim()
        .to_string();
    let ch = tonic::transport::Channel::from_shared(format!("http://{grpc}"))?
        .connect()
        .await?;
    let auth: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse()?;
    let mut admin = GatewayAdminClient::with_interceptor(ch, move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", auth.clone());
        Ok(r)
    });
    let key = admin
        .create_api_key(pb::CreateApiKeyRequest {
            name: "bench".into(),
            models: Some(pb::ApiKeyModelPatterns {
                patterns: vec!["*".into()],
            }),
            limits: Some(pb::ApiKeyLimits {
                requests_per_minute: Some(100_000_000),
                tokens_per_minute: Some(4_000_000_000),
                max_concurrent: Some(10_000),
                max_tokens: None,
            }),
            ..Default::default()
        })
        .await?
        .into_inner()
        .secret;

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
        .build()?;
    let direct = format!("http://{mock_addr}/v1/chat/completions");
    let via = format!("http://{http_addr}/v1/chat/completions");
    let dur = Duration::from_secs_f64(a.seconds);
    run_load(&http, &via, Some(&key), 8, Duration::from_millis(500)).await?;
    run_load(&http, &direct, None, 8, Duration::from_millis(500)).await?;
    let mut results = Vec::new();
    for c in [1usize, 16, 64] {
        let d = run_load(&http, &direct, None, c, dur).await?;
        let g = run_load(&http, &via, Some(&key), c, dur).await?;
        println!(
            "c={c:<3} direct {:>8.0} req/s p50 {:>7.0} us p99 {:>7.0} us | gateway {:>8.0} req/s p50 {:>7.0} us p99 {:>7.0} us",
            d.ops_per_s(),
            d.percentile(50.0),
            d.percentile(99.0),
            g.ops_per_s(),
            g.percentile(50.0),
            g.percentile(99.0)
        );
        results.push((c, d, g));
    }
    let rss = rss_mib(pid);
    let t_direct = ttfb(&http, &direct, None).await?;
    let t_via = ttfb(&http, &via, Some(&key)).await?;
    println!(
        "gateway RSS after the runs: {rss:.1} MiB; TTFB (50-chunk stream, median of 50): direct {t_direct:.0} us, gateway {t_via:.0} us"
    );
    let _ = child.start_kill();
    let (_, d16, g16) = &results[1];
    let (_, d64, g64) = &results[2];
    println!(
        "RESULT added_p99_us_c16={:.0} added_p50_us_c16={:.0} gateway_vs_direct_x={:.2} gateway_rps_c64={:.0} direct_rps_c64={:.0} gateway_rss_mib={:.1} ttfb_added_us={:.0}",
        g16.percentile(99.0) - d16.percentile(99.0),
        g16.percentile(50.0) - d16.percentile(50.0),
        g64.ops_per_s() / d64.ops_per_s().max(1e-9),
        g64.ops_per_s(),
        d64.ops_per_s(),
        rss,
        t_via - t_direct
    );
    Ok(())
}
