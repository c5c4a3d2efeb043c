//! Model swaps on a full GPU, in one run against the real llama-server:
//! (a) SecureLLM: scheduler (one simulated GPU that holds one of two models), registry and
//!     backend manager in this process, the gateway binary in front; requests alternate A, B, A,
//!     B, … (streaming, `max_tokens` 4) and each swap is timed to its first SSE `data:` event; after
//!     each swap one more request to the same model is timed (warm: it must not reload);
//! (b) llama.cpp's own router mode (`llama-server --models-dir DIR --models-max 1`, the same
//!     binary, models, context and threads) doing the same alternation;
//! (c) a raw llama-server cold start (process start → first event) of the same model.
//!
//! All settings are the defaults a new user gets (priority 0, 5-minute idle TTL): a swap is an
//! idle model yielding to a request of equal priority.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use backend_manager::config::ModelSettings;
use futures::StreamExt;
use securellm_proto::v1 as pb;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Swaps per side.
    #[arg(long, default_value_t = 12)]
    swaps: usize,
    /// Raw cold starts.
    #[arg(long, default_value_t = 5)]
    cold: usize,
    /// The llama-server binary (else $LLAMA_SERVER, else scripts/install-llama-server.sh).
    #[arg(long, env = "LLAMA_SERVER")]
    llama_server: Option<PathBuf>,
}

const CONTEXT: u32 = 512;

fn body(model: &str) -> String {
    format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}],"max_tokens":4,"temperature":0,"stream":true}}"#
    )
}

/// POST a streaming chat; milliseconds until the first `data:` event, then drain the stream.
async fn first_event_ms(
    http: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    model: &str,
) -> anyhow::Result<f64> {
    let t = Instant::now();
    let mut rq = http
        .post(url)
        .header("content-type", "application/json")
        .body(body(model));
    if let Some(k) = key {
        rq = rq.bearer_auth(k);
    }
    let r = rq.send().await?;
    anyhow::ensure!(
        r.status().is_success(),
        "{model}: HTTP {} {}",
        r.status(),
        r.text().await.unwrap_or_default()
    );
    let mut s = r.bytes_stream();
    let mut buf = Vec::new();
    let mut first = None;
    while let Some(chunk) = s.next().await {
        buf.extend_from_slice(&chunk?);
        if first.is_none() && buf.windows(5).any(|w| w == b"data:") {
            first = Some(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let text = String::from_utf8_lossy(&buf);
    anyhow::ensure!(
        text.contains("[DONE]") && !text.contains("\"error\""),
        "{model}: stream did not end cleanly: {text}"
    );
    first.ok_or_else(|| anyhow::anyhow!("{model}: no data event"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(a.swaps >= 2 && a.cold >= 1, "--swaps >= 2, --cold >= 1");
    let llama = crate::backend::find_llama_server(a.llama_server.as_ref())?;
    let dir = tempfile::tempdir()?;
    // Two tiny llamas (seeds 1, 2) and one simulated GPU sized from the registry's estimate so
    // that it holds exactly one of them; the manager with default settings (idle TTL included)
    // but the benchmark's context.
    let llama_for_manager = llama.clone();
    let kit = securellm_testkit::Stack::new()
        .models(&["model-a", "model-b"])
        .gpu_for("model-a", |e| e.gpu_bytes.max(1) + e.gpu_bytes.max(1) / 2)
        .manager(move |c| {
            c.llama_server = Some(llama_for_manager);
            c.defaults = ModelSettings {
                context: Some(u64::from(CONTEXT)),
                ..Default::default()
            };
        })
        .start()
        .await;
    let models = kit.models_dir().to_path_buf();

    // The gateway binary in front.
    let gw_cfg = dir.path().join("securellm.toml");
    std::fs::write(
        &gw_cfg,
        "[gateway]\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\n",
    )?;
    let key_file = dir.path().join("api-key");
    let flag = |s: &str| std::ffi::OsString::from(s);
    let (child, ready) = crate::gateway::spawn_gateway(
        &gw_cfg,
        &dir.path().join("gateway"),
        &[
            flag("--backend"),
            flag(&kit.manager_addr().to_string()),
            flag("--registry"),
            flag(&kit.registry_addr().to_string()),
            flag("--bootstrap-key-file"),
            key_file.clone().into_os_string(),
        ],
    )
    .await?;
    let http_addr = ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http="))
        .unwrap_or_default()
        .to_string();
    let key = std::fs::read_to_string(&key_file)?.trim().to_string();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()?;
    let via = format!("http://{http_addr}/v1/chat/completions");

    // (a) SecureLLM: the first load is not a swap.
    first_event_ms(&http, &via, Some(&key), "model-a").await?;
    let (mut swaps, mut warm) = (Vec::new(), Vec::new());
    for i in 0..a.swaps {
        let m = if i % 2 == 0 { "model-b" } else { "model-a" };
        swaps.push(first_event_ms(&http, &via, Some(&key), m).await?);
        warm.push(first_event_ms(&http, &via, Some(&key), m).await?);
    }
    let mut sc = kit.scheduler_client().await;
    let leases = sc
        .get_status(pb::GetStatusRequest {})
        .await?
        .into_inner()
        .leases;
    anyhow::ensure!(leases.len() == 1, "one model on the GPU: {leases:?}");
    drop(child);
    // The manager (and its llama-server) stops; the kit's directory, with the models the router
    // reads, stays until the end.
    let mut kit = kit;
    kit.take_manager().shutdown().await;

    // (b) llama.cpp's router mode, same binary, models and flags.
    let port = free_port()?;
    let mut router = tokio::process::Command::new(&llama)
        .arg("--models-dir")
        .arg(&models)
        .arg("--models-max")
        .arg("1")
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["-c", &CONTEXT.to_string(), "-np", "1", "-t", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let router_url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let health = format!("http://127.0.0.1:{port}/health");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if http
            .get(&health)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "router mode did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first_event_ms(&http, &router_url, None, "model-a").await?;
    let (mut r_swaps, mut r_warm) = (Vec::new(), Vec::new());
    for i in 0..a.swaps {
        let m = if i % 2 == 0 { "model-b" } else { "model-a" };
        r_swaps.push(first_event_ms(&http, &router_url, None, m).await?);
        r_warm.push(first_event_ms(&http, &router_url, None, m).await?);
    }
    let _ = router.kill().await;

    // (c) raw cold start of the same model, same flags.
    let mut cold = Vec::new();
    for _ in 0..a.cold {
        let model_path = models.join("model-a.gguf");
        let took = crate::backend::raw_cold_start(
            &llama,
            &http,
            &model_path,
            "model-a",
            u64::from(CONTEXT),
            body("model-a"),
        )
        .await?;
        cold.push(took.as_secs_f64() * 1e3);
    }

    let (sw, rsw, wm, rwm, cm) = (
        median(swaps.clone()),
        median(r_swaps.clone()),
        median(warm),
        median(r_warm),
        median(cold),
    );
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!("securellm swaps (ms): {}", fmt(&swaps));
    println!("router    swaps (ms): {}", fmt(&r_swaps));
    println!(
        "swap to first event, median of {}: securellm {sw:.1} ms | llama.cpp router {rsw:.1} ms | raw cold start {cm:.1} ms; warm: securellm {wm:.1} ms | router {rwm:.1} ms",
        a.swaps
    );
    println!(
        "RESULT swap_p50_ms={sw:.1} router_swap_p50_ms={rsw:.1} swap_vs_router_x={:.2} raw_cold_ms={cm:.1} warm_p50_ms={wm:.1} router_warm_p50_ms={rwm:.1}",
        sw / rsw
    );
    kit.shutdown().await;
    Ok(())
}
