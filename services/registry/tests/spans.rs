//! The registry's spans, captured in-process by a `tracing` layer: `registry.scan` with what it
//! found, `registry.estimate` with the model and the bytes, `error.type` when refused.

use registry::config::{RegistryConfig, RegistrySection};
use securellm_proto::v1 as pb;
use securellm_proto::v1::model_registry_client::ModelRegistryClient;
use securellm_testkit::models::write_tinies;
use securellm_testkit::spans::Capture;
use tracing_subscriber::prelude::*;

#[tokio::test]
async fn scans_and_estimates_are_spans_with_their_results() {
    let capture = Capture::default();
    tracing_subscriber::registry().with(capture.clone()).init();
    let root = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    write_tinies(root.path(), &["one", "two"]);
    std::fs::write(root.path().join("garbage.gguf"), b"not a gguf file").unwrap();
    let reg = registry::start(&RegistryConfig {
        registry: RegistrySection {
            listen: "127.0.0.1:0".into(),
            watch: false,
            ..RegistrySection::default()
        },
        roots: vec![root.path().to_path_buf()],
        aliases: Default::default(),
        data_dir: data.path().to_path_buf(),
    })
    .await
    .unwrap();

    let scan = capture.one("registry.scan");
    assert_eq!(scan.fields["registry.scan.roots"], "1");
    assert_eq!(scan.fields["registry.scan.models_found"], "3", "{scan:?}");
    assert_eq!(scan.fields["registry.scan.files_parsed"], "3");
    assert_eq!(scan.fields["registry.scan.files_failed"], "1");
    assert!(scan.fields.contains_key("registry.scan.duration_ms"));
    assert!(!scan.fields.contains_key("error.type"));

    let mut c = ModelRegistryClient::connect(format!("http://{}", reg.addr))
        .await
        .unwrap();
    let est = |model: &str| pb::EstimateRequest {
        model: model.into(),
        context: 1024,
        parallel: 2,
        cache_type: pb::KvCacheType::F16 as i32,
        gpu_layers: None,
    };
    let answer = c.estimate(est("one")).await.unwrap().into_inner();
    let span = capture.one("registry.estimate");
    assert_eq!(span.fields["gen_ai.request.model"], "one");
    assert_eq!(span.fields["registry.model_id"], answer.model_id);
    assert_eq!(span.fields["registry.estimate.context"], "1024");
    assert_eq!(span.fields["registry.estimate.parallel"], "2");
    assert_eq!(
        span.fields["registry.estimate.gpu_bytes"],
        answer.gpu_bytes.to_string()
    );
    assert_eq!(
        span.fields["registry.estimate.total_bytes"],
        answer.total_bytes.to_string()
    );
    assert!(!span.fields.contains_key("error.type"));

    // Refused: a model nobody knows, a bad context.
    assert!(c.estimate(est("no-such-model")).await.is_err());
    let mut bad = est("one");
    bad.context = -1;
    assert!(c.estimate(bad).await.is_err());
    let spans = capture.named("registry.estimate");
    assert_eq!(spans.len(), 3);
    assert_eq!(spans[1].fields["error.type"], "not_found");
    assert_eq!(spans[2].fields["error.type"], "invalid_argument");
    reg.shutdown().await;
}
