//! The registry's `/metrics` over real HTTP: a registry started in-process with a metrics
//! listener over a temporary models directory, scraped as Prometheus would, and the scrape
//! checked by Prometheus' own `promtool` when it is installed.

use std::path::Path;
use std::time::Duration;

use registry::config::{RegistryConfig, RegistrySection};
use securellm_proto::v1 as pb;
use securellm_proto::v1::model_registry_client::ModelRegistryClient;
use securellm_testkit::models::{write_ollama, write_safetensors, write_tinies};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;

/// `GET path` on `addr` over a fresh HTTP/1.1 connection: the status line and the body.
async fn get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("the scrape answers within 10 s")
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    (
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    )
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    let (status, body) = get(addr, "/metrics").await;
    assert!(status.contains(" 200 "), "{status}");
    body
}

/// The value of sample `name` whose labels are exactly `labels` (any order).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, ls) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if n != name {
            continue;
        }
        let have: Vec<(String, String)> = ls
            .split(',')
            .filter(|p| !p.is_empty())
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
            .collect();
        if have.len() == labels.len()
            && labels
                .iter()
                .all(|(k, v)| have.iter().any(|(hk, hv)| hk == k && hv == v))
        {
            return value.parse().ok();
        }
    }
    None
}

fn models(text: &str, format: &str, status: &str) -> f64 {
    sample(
        text,
        "securellm_registry_models",
        &[("format", format), ("status", status)],
    )
    .unwrap_or_else(|| panic!("no models gauge for {format}/{status} in\n{text}"))
}

fn counter(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(text, name, labels).unwrap_or(0.0)
}

/// `promtool check metrics` on a scrape, when promtool is installed.
fn promtool_check(text: &str) {
    use std::io::Write;
    let Ok(mut child) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        println!("promtool is not installed: `promtool check metrics` skipped");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\non\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn rescan(c: &mut ModelRegistryClient<tonic::transport::Channel>) -> pb::RescanProgress {
    let mut st = c
        .rescan(pb::RescanRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(p) = st.next().await {
        last = Some(p.unwrap());
    }
    last.expect("a final progress message")
}

fn config(root: &Path, data: &Path) -> RegistryConfig {
    RegistryConfig {
        registry: RegistrySection {
            listen: "127.0.0.1:0".into(),
            metrics_listen: Some("127.0.0.1:0".into()),
            watch: false,
            ..RegistrySection::default()
        },
        roots: vec![root.to_path_buf()],
        aliases: Default::default(),
        data_dir: data.to_path_buf(),
    }
}

#[tokio::test]
async fn metrics_show_the_catalogue_by_format_and_count_scans_parse_failures_and_estimates() {
    let root = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let r = root.path();
    write_tinies(r, &["one", "two"]);
    write_ollama(r, "llamette", "3b", 7);
    write_safetensors(r, "hf-model");
    let reg = registry::start(&config(r, data.path())).await.unwrap();
    let maddr = reg.metrics.as_ref().expect("a metrics listener").addr;
    let mut c = ModelRegistryClient::connect(format!("http://{}", reg.addr))
        .await
        .unwrap();

    // The first scan ran at start.
    let t = scrape(maddr).await;
    assert_eq!(models(&t, "gguf", "ok"), 2.0, "{t}");
    assert_eq!(models(&t, "ollama", "ok"), 1.0);
    assert_eq!(models(&t, "safetensors", "ok"), 1.0);
    assert_eq!(models(&t, "gguf_split", "ok"), 0.0);
    assert_eq!(models(&t, "gguf", "error"), 0.0);
    assert_eq!(counter(&t, "securellm_registry_scans_total", &[]), 1.0);
    assert_eq!(
        counter(&t, "securellm_registry_scan_duration_seconds_count", &[]),
        1.0
    );
    assert_eq!(
        counter(
            &t,
            "securellm_registry_parse_failures_total",
            &[("format", "gguf")]
        ),
        0.0
    );
    assert_eq!(
        sample(
            &t,
            "securellm_build_info",
            &[
                ("service", "registry"),
                ("version", env!("CARGO_PKG_VERSION"))
            ]
        ),
        Some(1.0)
    );
    promtool_check(&t);

    // A corrupt file and a rescan: one more scan, one parse failure, one model in error.
    std::fs::write(r.join("garbage.gguf"), b"this is not a gguf file at all").unwrap();
    let p = rescan(&mut c).await;
    assert_eq!(p.files_failed, 1, "{p:?}");
    let t = scrape(maddr).await;
    assert_eq!(counter(&t, "securellm_registry_scans_total", &[]), 2.0);
    assert_eq!(
        counter(&t, "securellm_registry_scan_duration_seconds_count", &[]),
        2.0
    );
    assert_eq!(
        counter(
            &t,
            "securellm_registry_parse_failures_total",
            &[("format", "gguf")]
        ),
        1.0,
        "{t}"
    );
    assert_eq!(models(&t, "gguf", "error"), 1.0);
    assert_eq!(models(&t, "gguf", "ok"), 2.0);

    // An unchanged corrupt file is not parsed again, so not counted again; a removed model
    // leaves the gauge.
    std::fs::remove_file(r.join("two.gguf")).unwrap();
    rescan(&mut c).await;
    let t = scrape(maddr).await;
    assert_eq!(counter(&t, "securellm_registry_scans_total", &[]), 3.0);
    assert_eq!(
        counter(
            &t,
            "securellm_registry_parse_failures_total",
            &[("format", "gguf")]
        ),
        1.0
    );
    assert_eq!(models(&t, "gguf", "ok"), 1.0);

    // Estimates answered are counted; a refused one is not.
    assert_eq!(counter(&t, "securellm_registry_estimates_total", &[]), 0.0);
    let est = |model: &str| pb::EstimateRequest {
        model: model.into(),
        context: 512,
        parallel: 1,
        cache_type: pb::KvCacheType::F16 as i32,
        gpu_layers: None,
    };
    c.estimate(est("one")).await.unwrap();
    c.estimate(est("one")).await.unwrap();
    assert!(c.estimate(est("no-such-model")).await.is_err());
    let t = scrape(maddr).await;
    assert_eq!(counter(&t, "securellm_registry_estimates_total", &[]), 2.0);
    promtool_check(&t);

    // Anything but /metrics is not found.
    let (status, _) = get(maddr, "/other").await;
    assert!(status.contains(" 404 "), "{status}");
    reg.shutdown().await;
}
