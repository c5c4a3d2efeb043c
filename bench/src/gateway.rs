//! Gateway overhead: a fast mock OpenAI upstream (Rust, loopback) called directly, through nginx
//! as a zero-work reverse proxy (the ceiling of any proxy hop on this benchmark), and through the
//! gateway binary (API-key auth, a rate limit high enough never to trigger, redaction scan, audit
//! on), at concurrency 1, 16 and 64 with the same load generator; 50-chunk streams at
//! concurrency 16 (streams/s, time to first byte); each proxy's CPU per request; the gateway's RSS.

use std::path::{Path, PathBuf};
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
    /// Record a `perf` profile of the gateway process during its concurrency-64 run into this
    /// file, and of its streaming run into this file + `.stream` (needs `perf` on PATH).
    #[arg(long)]
    perf_record: Option<PathBuf>,
    /// `perf record --call-graph` mode for `--perf-record` (`fp`, `dwarf,8192`, ...).
    #[arg(long, default_value = "dwarf,8192")]
    perf_call_graph: String,
}

const REPLY: &str = r#"{"id":"chatcmpl-mock","object":"chat.completion","created":1,"model":"mock-model","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}"#;
const BODY: &str =
    r#"{"model":"mock-model","messages":[{"role":"user","content":"hi"}],"max_tokens":1}"#;
const STREAM_BODY: &str =
    r#"{"model":"mock-model","messages":[{"role":"user","content":"hi"}],"stream":true}"#;

pub(crate) async fn mock(body: String) -> axum::response::Response {
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

/// The mock upstream on a free loopback port (its address), serving until the process ends.
/// TCP_NODELAY as every server here sets it (the gateway, nginx on keep-alive connections):
/// without it a 50-chunk stream waits on Nagle + delayed ACKs (~40 ms a stream), which caps
/// streams/s for all proxies alike and hides what they cost.
pub(crate) async fn start_mock() -> anyhow::Result<std::net::SocketAddr> {
    let app = axum::Router::new().route("/v1/chat/completions", post(mock));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let l = axum::serve::ListenerExt::tap_io(l, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move { axum::serve(l, app).await });
    Ok(addr)
}

/// One way to reach the mock: its URL, the API key it wants, and the processes whose CPU time
/// counts as that hop's cost (none for direct).
pub(crate) struct Target {
    pub(crate) name: &'static str,
    pub(crate) url: String,
    pub(crate) key: Option<String>,
    pub(crate) pids: Vec<u32>,
}

/// One measured run: latencies (or times to first byte, for streams), and the CPU time the
/// proxy's processes and the benchmark process (load generator + mock) spent during it.
pub(crate) struct Run {
    pub(crate) s: Samples,
    proxy_cpu_s: f64,
    bench_cpu_s: f64,
}

impl Run {
    /// CPU microseconds per request (or stream) of the proxy / of the benchmark process.
    pub(crate) fn proxy_us(&self) -> f64 {
        self.proxy_cpu_s * 1e6 / (self.s.latencies_us.len() as f64).max(1.0)
    }
    fn bench_us(&self) -> f64 {
        self.bench_cpu_s * 1e6 / (self.s.latencies_us.len() as f64).max(1.0)
    }
}

/// utime + stime of `pid` (all its threads, live and exited) in seconds.
pub(crate) fn cpu_s(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start at field 3 (state);
    // utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(14) + ticks(15)) / 100.0 // USER_HZ is 100 on Linux
}

fn cpu_sum(pids: &[u32]) -> f64 {
    pids.iter().map(|&p| cpu_s(p)).sum()
}

pub(crate) async fn measured<F: Future<Output = anyhow::Result<Samples>>>(
    t: &Target,
    f: F,
) -> anyhow::Result<Run> {
    let me = std::process::id();
    let (p0, b0) = (cpu_sum(&t.pids), cpu_s(me));
    let s = f.await?;
    Ok(Run {
        s,
        proxy_cpu_s: cpu_sum(&t.pids) - p0,
        bench_cpu_s: cpu_s(me) - b0,
    })
}

fn request(http: &reqwest::Client, t: &Target, body: &'static str) -> reqwest::RequestBuilder {
    let r = http
        .post(&t.url)
        .header("content-type", "application/json")
        .body(body);
    match &t.key {
        Some(k) => r.bearer_auth(k),
        None => r,
    }
}

/// `c` clients, each sending non-streaming requests back to back for `dur`; per-request latency.
pub(crate) async fn run_load(
    http: &reqwest::Client,
    t: &Target,
    c: usize,
    dur: Duration,
) -> anyhow::Result<Samples> {
    let start = Instant::now();
    let deadline = start + dur;
    let mut tasks = Vec::new();
    for _ in 0..c {
        let r = request(http, t, BODY);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                let resp = r
                    .try_clone()
                    .ok_or_else(|| anyhow::anyhow!("request not clonable"))?
                    .send()
                    .await?;
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

/// `c` clients, each reading 50-chunk streams to the end back to back for `dur`; per-stream time
/// to first byte (the samples) — streams/s is the samples' rate.
async fn run_streams(
    http: &reqwest::Client,
    t: &Target,
    c: usize,
    dur: Duration,
) -> anyhow::Result<Samples> {
    let start = Instant::now();
    let deadline = start + dur;
    let mut tasks = Vec::new();
    for _ in 0..c {
        let r = request(http, t, STREAM_BODY);
        tasks.push(tokio::spawn(async move {
            let mut ttfb = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                let resp = r
                    .try_clone()
                    .ok_or_else(|| anyhow::anyhow!("request not clonable"))?
                    .send()
                    .await?;
                anyhow::ensure!(resp.status().is_success(), "status {}", resp.status());
                let mut s = resp.bytes_stream();
                let first = s.next().await.transpose()?.unwrap_or_default();
                ttfb.push(t.elapsed().as_secs_f64() * 1e6);
                // `[DONE]` may come in the first read (a proxy that coalesces events) or straddle
                // two reads: search each read with the previous one's last bytes.
                let mut tail: Vec<u8> = first.to_vec();
                let mut done = tail.windows(6).any(|w| w == b"[DONE]");
                while let Some(chunk) = s.next().await {
                    tail.extend_from_slice(&chunk?);
                    done |= tail.windows(6).any(|w| w == b"[DONE]");
                    tail.drain(..tail.len().saturating_sub(5));
                }
                anyhow::ensure!(done, "stream ended without [DONE]");
            }
            anyhow::Ok(ttfb)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(Samples::new(all, start.elapsed()))
}

/// Median time to first byte of 50 streams one after the other (no other load).
async fn ttfb(http: &reqwest::Client, t: &Target) -> anyhow::Result<f64> {
    let mut v = Vec::new();
    for _ in 0..50 {
        let start = Instant::now();
        let resp = request(http, t, STREAM_BODY).send().await?;
        let mut s = resp.bytes_stream();
        s.next().await;
        v.push(start.elapsed().as_secs_f64() * 1e6);
        while s.next().await.is_some() {}
    }
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

pub(crate) fn rss_mib(pid: u32) -> f64 {
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

/// An API key on the gateway at `grpc` (its admin token in `data_dir`) with limits far above what
/// a benchmark can reach.
pub(crate) async fn bench_key(grpc: &str, data_dir: &Path) -> anyhow::Result<String> {
    bench_key_with(grpc, data_dir, Some(10_000)).await
}

/// [`bench_key`] with `max_concurrent` (None: no concurrency limit).
pub(crate) async fn bench_key_with(
    grpc: &str,
    data_dir: &Path,
    max_concurrent: Option<u32>,
) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(data_dir.join("admin-token"))?
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
    Ok(admin
        .create_api_key(pb::CreateApiKeyRequest {
            name: "bench".into(),
            models: Some(pb::ApiKeyModelPatterns {
                patterns: vec!["*".into()],
            }),
            limits: Some(pb::ApiKeyLimits {
                requests_per_minute: Some(100_000_000),
                tokens_per_minute: Some(4_000_000_000),
                max_concurrent,
                max_tokens: None,
            }),
            ..Default::default()
        })
        .await?
        .into_inner()
        .secret)
}

/// The nginx binary: `SECURELLM_BENCH_NGINX`, else `/usr/sbin/nginx`, else `nginx` on PATH.
fn find_nginx() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("SECURELLM_BENCH_NGINX") {
        return Ok(p.into());
    }
    let sbin = PathBuf::from("/usr/sbin/nginx");
    if sbin.is_file() {
        return Ok(sbin);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "nginx not found (the baseline proxy): apt-get install nginx, or set SECURELLM_BENCH_NGINX"
            )
        })
}

/// nginx as a zero-work reverse proxy in front of the mock, from a generated config in `dir`:
/// one worker process per core (what the gateway's tokio runtime runs by default), HTTP/1.1 to
/// a keep-alive upstream pool, no access log, no response buffering (streams pass chunk by
/// chunk, like the gateway's). Killed (master and workers) when dropped.
pub(crate) struct Nginx {
    child: std::process::Child,
    workers: Vec<u32>,
}

impl Nginx {
    pub(crate) async fn start(
        dir: &Path,
        upstream: std::net::SocketAddr,
        workers: usize,
    ) -> anyhow::Result<(Self, u16)> {
        let bin = find_nginx()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let d = dir.display();
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                r#"daemon off;
master_process on;
worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 75s;
    upstream mock {{
        server {upstream};
        keepalive 256;
        keepalive_requests 100000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"#
            ),
        )?;
        let child = std::process::Command::new(&bin)
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| anyhow::anyhow!("{}: {e}", bin.display()))?;
        let mut n = Nginx {
            child,
            workers: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = n.child.try_wait()? {
                let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
                anyhow::bail!("nginx exited ({st}): {log}");
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                n.workers = children_of(n.child.id());
                if n.workers.len() >= workers {
                    break;
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "nginx did not start listening");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok((n, port))
    }

    pub(crate) fn pids(&self) -> Vec<u32> {
        std::iter::once(self.child.id())
            .chain(self.workers.iter().copied())
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM to the master: it stops its workers and exits.
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for w in &self.workers {
            let _ = std::process::Command::new("kill")
                .arg("-KILL")
                .arg(w.to_string())
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok())
                })
                == Some(pid)
        })
        .collect()
}

/// `perf record` attached to `pid` until stopped (SIGINT, so it writes its file).
struct Perf(std::process::Child);

impl Perf {
    fn start(pid: u32, out: &Path, call_graph: &str) -> anyhow::Result<Self> {
        let child = std::process::Command::new("perf")
            .args(["record", "-F", "499", "--call-graph", call_graph, "-p"])
            .arg(pid.to_string())
            .arg("-o")
            .arg(out)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| anyhow::anyhow!("perf: {e}"))?;
        // Give it time to attach before the load starts.
        std::thread::sleep(Duration::from_millis(500));
        Ok(Perf(child))
    }

    fn stop(mut self) -> anyhow::Result<()> {
        std::process::Command::new("kill")
            .arg("-INT")
            .arg(self.0.id().to_string())
            .status()?;
        self.0.wait()?;
        Ok(())
    }
}

fn row(name: &str, r: &Run) -> String {
    format!(
        "{name:<8} {:>8.0} req/s p50 {:>6.0} us p99 {:>6.0} us | cpu/req: proxy {:>5.1} us, client+mock {:>5.1} us",
        r.s.ops_per_s(),
        r.s.percentile(50.0),
        r.s.percentile(99.0),
        r.proxy_us(),
        r.bench_us()
    )
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let mock_addr = start_mock().await?;

    // The gateway binary, configured with the mock as a cloud upstream.
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("securellm.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\n[gateway.upstreams.mock]\nbase_url = \"http://{mock_addr}/v1\"\nmodels = [\"mock-model\"]\nredaction = \"allow\"\n"
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

    // nginx with as many workers as the gateway has runtime threads (its default: one per core).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let ngx_dir = tempfile::tempdir()?;
    let (nginx, ngx_port) = Nginx::start(ngx_dir.path(), mock_addr, cores).await?;

    // A key with limits far above what the benchmark can reach.
    let key = bench_key(&grpc, &dir.path().join("data")).await?;

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
        .build()?;
    let targets = [
        Target {
            name: "direct",
            url: format!("http://{mock_addr}/v1/chat/completions"),
            key: None,
            pids: Vec::new(),
        },
        Target {
            name: "nginx",
            url: format!("http://127.0.0.1:{ngx_port}/v1/chat/completions"),
            key: None,
            pids: nginx.pids(),
        },
        Target {
            name: "gateway",
            url: format!("http://{http_addr}/v1/chat/completions"),
            key: Some(key),
            pids: vec![pid],
        },
    ];
    let dur = Duration::from_secs_f64(a.seconds);
    println!(
        "{cores} cores; {:.1} s per run; nginx {} worker(s); the same mock and load generator for all three",
        a.seconds, cores
    );
    for t in &targets {
        run_load(&http, t, 8, Duration::from_millis(500)).await?;
    }
    // results[c][target]
    let mut results: Vec<Vec<Run>> = Vec::new();
    for c in [1usize, 16, 64] {
        let mut runs = Vec::new();
        for t in &targets {
            let perf = match (&a.perf_record, t.name, c) {
                (Some(out), "gateway", 64) => Some(Perf::start(pid, out, &a.perf_call_graph)?),
                _ => None,
            };
            let r = measured(t, run_load(&http, t, c, dur)).await?;
            if let Some(p) = perf {
                p.stop()?;
            }
            println!("c={c:<3} {}", row(t.name, &r));
            runs.push(r);
        }
        results.push(runs);
    }
    let mut streams = Vec::new();
    for t in &targets {
        let perf = match (&a.perf_record, t.name) {
            (Some(out), "gateway") => {
                let mut f = out.clone().into_os_string();
                f.push(".stream");
                Some(Perf::start(pid, Path::new(&f), &a.perf_call_graph)?)
            }
            _ => None,
        };
        let r = measured(t, run_streams(&http, t, 16, dur)).await?;
        if let Some(p) = perf {
            p.stop()?;
        }
        println!(
            "stream c=16 {:<8} {:>7.0} streams/s ttfb p50 {:>6.0} us p99 {:>6.0} us | cpu/stream: proxy {:>6.1} us, client+mock {:>6.1} us",
            t.name,
            r.s.ops_per_s(),
            r.s.percentile(50.0),
            r.s.percentile(99.0),
            r.proxy_us(),
            r.bench_us()
        );
        streams.push(r);
    }
    let rss = rss_mib(pid);
    let mut seq_ttfb = Vec::new();
    for t in &targets {
        seq_ttfb.push(ttfb(&http, t).await?);
    }
    println!(
        "gateway RSS after the runs: {rss:.1} MiB; TTFB (50-chunk stream, one at a time, median of 50): direct {:.0} us, nginx {:.0} us, gateway {:.0} us",
        seq_ttfb[0], seq_ttfb[1], seq_ttfb[2]
    );
    let _ = child.start_kill();
    drop(nginx);

    let p99 = |c: usize, t: usize| results[c][t].s.percentile(99.0);
    let p50 = |c: usize, t: usize| results[c][t].s.percentile(50.0);
    let rps = |c: usize, t: usize| results[c][t].s.ops_per_s();
    let (d, n, g) = (0, 1, 2);
    let gateway_vs_direct = rps(2, g) / rps(2, d).max(1e-9);
    let gateway_vs_nginx = rps(2, g) / rps(2, n).max(1e-9);
    let nginx_vs_direct = rps(2, n) / rps(2, d).max(1e-9);
    let added_p99 = p99(1, g) - p99(1, d);
    let nginx_added_p99 = p99(1, n) - p99(1, d);
    let sps = |t: usize| streams[t].s.ops_per_s();
    let sttfb = |t: usize| streams[t].s.percentile(50.0);
    let stream_vs_nginx = sps(g) / sps(n).max(1e-9);
    let ttfb_vs_nginx = sttfb(g) - sttfb(n);
    let targets_met = [
        gateway_vs_nginx >= 0.8,
        added_p99 - nginx_added_p99 <= 500.0,
        stream_vs_nginx >= 0.8,
        ttfb_vs_nginx <= 300.0,
    ];
    println!(
        "target: throughput at c=64 >= 0.8 x nginx's: {} ({gateway_vs_nginx:.2} x; nginx itself {nginx_vs_direct:.2} x direct, the gateway {gateway_vs_direct:.2} x)",
        met(targets_met[0])
    );
    println!(
        "target: added p99 at c=16 within 0.5 ms of nginx's: {} (gateway +{added_p99:.0} us, nginx +{nginx_added_p99:.0} us over direct)",
        met(targets_met[1])
    );
    println!(
        "target: streams/s at c=16 >= 0.8 x nginx's: {} ({stream_vs_nginx:.2} x; nginx {:.2} x direct)",
        met(targets_met[2]),
        sps(n) / sps(d).max(1e-9)
    );
    println!(
        "target: stream TTFB (p50 at c=16) within 0.3 ms of nginx's: {} (gateway {:.0} us, nginx {:.0} us, direct {:.0} us)",
        met(targets_met[3]),
        sttfb(g),
        sttfb(n),
        sttfb(d)
    );
    println!(
        "gateway CPU per request at c=64: {:.1} us (nginx {:.1} us; client+mock in the direct run {:.1} us)",
        results[2][g].proxy_us(),
        results[2][n].proxy_us(),
        results[2][d].bench_us()
    );
    println!(
        "RESULT added_p99_us_c16={added_p99:.0} added_p50_us_c16={:.0} gateway_vs_direct_x={gateway_vs_direct:.2} gateway_rps_c64={:.0} direct_rps_c64={:.0} gateway_rss_mib={rss:.1} ttfb_added_us={:.0} gateway_vs_nginx_x={gateway_vs_nginx:.2} nginx_vs_direct_x={nginx_vs_direct:.2} nginx_rps_c64={:.0} nginx_added_p99_us_c16={nginx_added_p99:.0} stream_gateway_vs_nginx_x={stream_vs_nginx:.2} stream_nginx_vs_direct_x={:.2} gateway_streams_per_s_c16={:.0} ttfb_added_vs_nginx_us={ttfb_vs_nginx:.0} gateway_cpu_us_per_req_c64={:.1} nginx_cpu_us_per_req_c64={:.1} targets_met={}/4",
        p50(1, g) - p50(1, d),
        rps(2, g),
        rps(2, d),
        seq_ttfb[2] - seq_ttfb[0],
        rps(2, n),
        sps(n) / sps(d).max(1e-9),
        sps(g),
        results[2][g].proxy_us(),
        results[2][n].proxy_us(),
        targets_met.iter().filter(|&&m| m).count()
    );
    Ok(())
}
