//! The registry's `/metrics` over real HTTP: a registry started in-process with a metrics
//! listener over a temporary models directory, scraped as Prometheus would, and the scrape
//! checked by Prometheus' own `promtool` when it is installed.

use std::path::Path;

use registry::config::{RegistryConfig, RegistrySection};
use securellm_proto::v1 as pb;
use securellm_proto::v1::model_registry_client::ModelRegistryClient;
use securellm_testkit::models::{write_ollama, write_safetensors, write_tinies};
use securellm_testkit::prom::{get, promtool_check, sample, scrape, value as counter};
use tokio_stream::StreamExt;

fn models(text: &str, format: &str, status: &str) -> f64 {
    sample(
        text,
        "securellm_registry_models",
        &[("format", format), ("status", status)],
    )
    .unwrap_or_else(|| panic!("no models gauge for {format}/{status} in\n{text}"))
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
