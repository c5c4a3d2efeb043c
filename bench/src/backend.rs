//! Backend manager overhead, in one run against the real llama-server:
//! (a) request latency through the manager (gRPC `Chat`) vs directly to the same llama-server
//!     (HTTP), same body, `max_tokens` 1, interleaved so drift hits both equally;
//! (b) cold start: a streaming request for an unloaded model until its first chunk, vs a raw
//!     llama-server started by the benchmark itself with the same flags until its first chunk.
//!
//! The services run as deployed, with the internal token; the direct requests carry the engine's
//! own API key (the manager's child: read from its environment, as only its user can).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use backend_manager::backend::llamacpp::LlamaCpp;
use backend_manager::backend::{Backend, StartSpec};
use securellm_gguf::testmodels::{TinyLlamaOptions, write_tiny_llama};
use securellm_proto::v1 as pb;
use securellm_testkit::Stack;
use tokio_stream::StreamExt;

use crate::stats::Samples;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Requests per side for the latency comparison.
    #[arg(long, default_value_t = 300)]
    requests: usize,
    /// Cold starts per side.
    #[arg(long, default_value_t = 5)]
    cold: usize,
    /// The llama-server binary (else $LLAMA_SERVER, else scripts/install-llama-server.sh).
    #[arg(long, env = "LLAMA_SERVER")]
    llama_server: Option<PathBuf>,
}

/// `given`, else the testkit's llama-server (the installer's cached build, or what
/// `scripts/install-llama-server.sh` prints, building it if needed).
pub(crate) fn find_llama_server(given: Option<&PathBuf>) -> anyhow::Result<PathBuf> {
    match given {
        Some(p) => Ok(p.clone()),
        None => securellm_testkit::try_llama_server().map_err(anyhow::Error::msg),
    }
}

/// A raw llama-server started by the benchmark itself with the flags the manager uses (one slot,
/// f16 cache, one thread), for `model_path` served as `alias`: the time from the process start to
/// the first chunk of the streaming chat `body`. The stream is read to its end and the server
/// stopped before this returns.
pub(crate) async fn raw_cold_start(
    llama: &Path,
    http: &reqwest::Client,
    model_path: &Path,
    alias: &str,
    context: u64,
    body: String,
) -> anyhow::Result<Duration> {
    let raw = LlamaCpp {
        binary: llama.to_path_buf(),
        threads: 1,
        stall_timeout: Duration::from_secs(30),
        http: http.clone(),
    };
    let spec = StartSpec {
        model_path: model_path.to_path_buf(),
        alias: alias.into(),
        context,
        parallel: 1,
        cache_type: "f16",
        gpu_layers: None,
        embeddings: false,
        flash_attention: None,
        gpu: None,
        lease_bytes: 0,
        gpu_total: 0,
        start_timeout: Duration::from_secs(60),
    };
    let t = Instant::now();
    let started = raw.start(&spec).await?;
    // The backend gave the child a key of its own.
    let mut r = http.post(format!("{}/v1/chat/completions", started.endpoint));
    if let Some(k) = &started.api_key {
        r = r.bearer_auth(k);
    }
    let r = r
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await?;
    anyhow::ensure!(r.status().is_success(), "raw llama-server: {}", r.status());
    let mut s = r.bytes_stream();
    s.next().await;
    let took = t.elapsed();
    while s.next().await.is_some() {}
    if let Some(p) = &started.process {
        p.stop(Duration::from_secs(2)).await;
    }
    Ok(took)
}

const BODY: &str =
    r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":1,"temperature":0}"#;

/// The API key the manager gave its llama-server child (`LLAMA_API_KEY` in the child's
/// environment, readable by the same user only).
fn child_api_key(pid: u32) -> anyhow::Result<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ"))?;
    env.split(|b| *b == 0)
        .find_map(|v| v.strip_prefix(b"LLAMA_API_KEY="))
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .ok_or_else(|| anyhow::anyhow!("no LLAMA_API_KEY in the environment of {pid}"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let llama = find_llama_server(a.llama_server.as_ref())?;
    let model_llama = llama.clone();
    let stack = Stack::new()
        .gpu(8u64 << 30)
        .write_models(|models| {
            write_tiny_llama(models.join("tiny.gguf"), &TinyLlamaOptions::default())
                .expect("the tiny model");
        })
        .internal_token()
        .manager(move |c| c.llama_server = Some(model_llama))
        .start()
        .await;
    let model_path = stack.models_dir().join("tiny.gguf");
    let mut client = stack.backend_client().await;
    let http = reqwest::Client::new();
    let req = || pb::InferenceRequest {
        model: "tiny".into(),
        body_json: BODY.as_bytes().to_vec(),
        ..Default::default()
    };

    // (a) warm latency.
    client.chat(req()).await?;
    let inst = client
        .list_instances(pb::ListInstancesRequest::default())
        .await?
        .into_inner()
        .instances
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no instance"))?;
    let direct_url = format!("{}/v1/chat/completions", inst.endpoint);
    let key = child_api_key(inst.pid)?;
    for _ in 0..20 {
        http.post(&direct_url)
            .bearer_auth(&key)
            .body(BODY)
            .send()
            .await?
            .bytes()
            .await?;
        client.chat(req()).await?;
    }
    let (mut via, mut direct) = (Vec::new(), Vec::new());
    let t0 = Instant::now();
    for _ in 0..a.requests {
        let t = Instant::now();
        let r = http
            .post(&direct_url)
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(BODY)
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success());
        r.bytes().await?;
        direct.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        let r = client.chat(req()).await?.into_inner();
        anyhow::ensure!(r.http_status == 200);
        via.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let elapsed = t0.elapsed();
    let direct = Samples::new(direct, elapsed);
    let via = Samples::new(via, elapsed);
    println!(
        "warm request (max_tokens 1), {} each: direct p50 {:.0} us p99 {:.0} us | via manager p50 {:.0} us p99 {:.0} us",
        a.requests,
        direct.percentile(50.0),
        direct.percentile(99.0),
        via.percentile(50.0),
        via.percentile(99.0)
    );

    // (b) cold start through the manager: unload, then stream until the first chunk.
    let mut cold_mgr = Vec::new();
    for _ in 0..a.cold {
        client
            .unload(pb::UnloadRequest {
                model: "tiny".into(),
                ..Default::default()
            })
            .await?;
        let t = Instant::now();
        let mut s = client.chat_stream(req()).await?.into_inner();
        loop {
            let c = s
                .next()
                .await
                .ok_or_else(|| anyhow::anyhow!("stream ended"))??;
            if !c.data_json.is_empty() {
                break;
            }
        }
        cold_mgr.push(t.elapsed().as_secs_f64() * 1e6);
        while s.next().await.is_some() {}
    }
    client
        .unload(pb::UnloadRequest {
            model: "tiny".into(),
            ..Default::default()
        })
        .await?;

    // Raw llama-server, same flags, started by us.
    let mut cold_raw = Vec::new();
    for _ in 0..a.cold {
        let body = BODY.replace("\"max_tokens\":1", "\"max_tokens\":1,\"stream\":true");
        let took = raw_cold_start(&llama, &http, &model_path, "tiny", 512, body).await?;
        cold_raw.push(took.as_secs_f64() * 1e6);
    }
    let (cm, cr) = (median(cold_mgr), median(cold_raw));
    println!(
        "cold start to first chunk, median of {}: via manager {:.1} ms | raw llama-server {:.1} ms",
        a.cold,
        cm / 1e3,
        cr / 1e3
    );
    stack.shutdown().await;
    println!(
        "RESULT added_p50_us={:.0} added_p99_us={:.0} direct_p50_us={:.0} manager_p50_us={:.0} cold_start_overhead_us={:.0} cold_manager_us={:.0} cold_raw_us={:.0}",
        via.percentile(50.0) - direct.percentile(50.0),
        via.percentile(99.0) - direct.percentile(99.0),
        direct.percentile(50.0),
        via.percentile(50.0),
        cm - cr,
        cm,
        cr
    );
    Ok(())
}
