//! The registry over real files in temporary directories, a real SQLite file, and real gRPC on
//! loopback: every format, split and Ollama layouts, corrupt and hostile files, symlink loops,
//! incremental rescans, the filesystem watch, estimates and measurements, restart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use registry::config::{RegistryConfig, RegistrySection};
use securellm_gguf::testmodels::{TinyLlamaOptions, tiny_llama_writer, write_tiny_llama};
use securellm_gguf::{GgmlType, GgufWriter, MetadataValue};
use securellm_proto::v1 as pb;
use securellm_proto::v1::model_registry_client::ModelRegistryClient;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;

fn config(roots: Vec<PathBuf>, data: &Path, aliases: BTreeMap<String, String>) -> RegistryConfig {
    RegistryConfig {
        registry: RegistrySection {
            listen: "127.0.0.1:0".into(),
            watch_debounce_ms: 100,
            ..RegistrySection::default()
        },
        roots,
        aliases,
        data_dir: data.to_path_buf(),
    }
}

async fn start(cfg: &RegistryConfig) -> (registry::RunningRegistry, ModelRegistryClient<Channel>) {
    let r = registry::start(cfg).await.unwrap();
    let c = ModelRegistryClient::connect(format!("http://{}", r.addr))
        .await
        .unwrap();
    (r, c)
}

async fn list(c: &mut ModelRegistryClient<Channel>) -> Vec<pb::Model> {
    c.list_models(pb::ListModelsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .models
}

fn by_name<'a>(models: &'a [pb::Model], name: &str) -> &'a pb::Model {
    models.iter().find(|m| m.name == name).unwrap_or_else(|| {
        panic!(
            "no model {name} in {:?}",
            models.iter().map(|m| &m.name).collect::<Vec<_>>()
        )
    })
}

fn tiny(name: &str) -> TinyLlamaOptions {
    TinyLlamaOptions {
        name: name.into(),
        ..TinyLlamaOptions::default()
    }
}

/// A three-part split model with part `skip` left out (0 = none).
fn write_split(dir: &Path, stem: &str, skip: u32) {
    for part in 1..=3u32 {
        if part == skip {
            continue;
        }
        let mut w = if part == 1 {
            tiny_llama_writer(&tiny(stem)).unwrap()
        } else {
            GgufWriter::new()
        };
        w.add_metadata("split.no", MetadataValue::U16((part - 1) as u16))
            .unwrap();
        w.add_metadata("split.count", MetadataValue::U16(3))
            .unwrap();
        if part > 1 {
            w.add_tensor_zeroed(format!("blk.1.extra_{part}"), &[1024], GgmlType::F32)
                .unwrap();
        }
        w.write_file(dir.join(format!("{stem}-{part:05}-of-00003.gguf")))
            .unwrap();
    }
}

fn write_ollama(root: &Path, model: &str, tag: &str) -> String {
    let store = root.join("ollama");
    std::fs::create_dir_all(store.join("blobs")).unwrap();
    let bytes = securellm_gguf::testmodels::tiny_llama(&tiny(model)).unwrap();
    let hex = format!("{:064x}", bytes.len() as u128 * 7919 + model.len() as u128);
    std::fs::write(store.join("blobs").join(format!("sha256-{hex}")), &bytes).unwrap();
    let proj = format!("{:064x}", 42);
    std::fs::write(
        store.join("blobs").join(format!("sha256-{proj}")),
        b"projector",
    )
    .unwrap();
    let dir = store
        .join("manifests/registry.ollama.ai/library")
        .join(model);
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "layers": [
            {"mediaType": "application/vnd.ollama.image.model", "digest": format!("sha256:{hex}"), "size": bytes.len()},
            {"mediaType": "application/vnd.ollama.image.projector", "digest": format!("sha256:{proj}"), "size": 9},
            {"mediaType": "application/vnd.ollama.image.template", "digest": format!("sha256:{}", "b".repeat(64)), "size": 1}
        ]
    });
    std::fs::write(dir.join(tag), serde_json::to_vec(&manifest).unwrap()).unwrap();
    format!("{model}:{tag}")
}

fn write_safetensors(root: &Path, name: &str) {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec(&serde_json::json!({
            "model_type": "mistral", "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "hidden_size": 64, "intermediate_size": 128,
            "max_position_embeddings": 4096, "vocab_size": 1000, "torch_dtype": "bfloat16"
        }))
        .unwrap(),
    )
    .unwrap();
    registry::safetensors::write_test_file(
        &dir.join("model.safetensors"),
        &[
            ("model.embed_tokens.weight", "BF16", &[1000, 64]),
            ("lm_head.weight", "BF16", &[1000, 64]),
        ],
    )
    .unwrap();
}

#[tokio::test]
async fn finds_every_format_and_records_bad_files_without_stopping() {
    let root = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let r = root.path();
    write_tiny_llama(r.join("tiny.gguf"), &tiny("tiny")).unwrap();
    std::fs::create_dir_all(r.join("splits")).unwrap();
    write_split(&r.join("splits"), "big", 0);
    write_split(&r.join("splits"), "broken", 2);
    let name_tag = write_ollama(r, "llamette", "3b");
    write_safetensors(r, "hf-model");
    std::fs::write(r.join("garbage.gguf"), b"this is not a gguf file at all").unwrap();
    // A header that claims 2^60 tensors.
    let mut hostile = b"GGUF".to_vec();
    hostile.extend_from_slice(&3u32.to_le_bytes());
    hostile.extend_from_slice(&(1u64 << 60).to_le_bytes());
    hostile.extend_from_slice(&0u64.to_le_bytes());
    std::fs::write(r.join("hostile.gguf"), &hostile).unwrap();
    // A directory symlink loop and a link leaving the root.
    std::os::unix::fs::symlink(r, r.join("loop")).unwrap();
    let outside = tempfile::tempdir().unwrap();
    write_tiny_llama(outside.path().join("secret.gguf"), &tiny("secret")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret.gguf"), r.join("escape.gguf")).unwrap();

    let (_reg, mut c) = start(&config(vec![r.to_path_buf()], data.path(), BTreeMap::new())).await;
    let models = list(&mut c).await;

    let t = by_name(&models, "tiny");
    assert_eq!(t.format, pb::ModelFormat::Gguf as i32);
    assert_eq!(t.status, pb::ModelStatus::Ok as i32);
    assert_eq!(t.architecture, "llama");
    assert_eq!(
        (
            t.block_count,
            t.embedding_length,
            t.head_count,
            t.vocab_size
        ),
        (Some(2), Some(64), Some(4), Some(512))
    );
    assert!(t.chat_template_present);
    assert_eq!(t.context_length, Some(2048));
    assert!(t.tensor_bytes.unwrap() > 0 && t.parameter_count.unwrap() > 0);

    let big = by_name(&models, "big");
    assert_eq!(big.format, pb::ModelFormat::GgufSplit as i32);
    assert_eq!(
        big.status,
        pb::ModelStatus::Ok as i32,
        "{}",
        big.status_reason
    );
    assert_eq!(big.files.len(), 3);
    assert_eq!(
        big.size_bytes,
        big.files.iter().map(|f| f.size_bytes).sum::<u64>()
    );
    assert!(
        big.tensor_bytes.unwrap() > t.tensor_bytes.unwrap(),
        "parts' tensors are summed"
    );
    let broken = by_name(&models, "broken");
    assert_eq!(broken.status, pb::ModelStatus::Incomplete as i32);
    assert_eq!(broken.split.as_ref().unwrap().missing, vec![2]);

    let o = by_name(&models, &name_tag);
    assert_eq!(o.format, pb::ModelFormat::Ollama as i32);
    assert_eq!(o.status, pb::ModelStatus::Ok as i32, "{}", o.status_reason);
    assert!(o.has_projector);
    assert!(o.path.contains("blobs/sha256-"));
    assert_eq!(o.ollama.as_ref().unwrap().name_tag, "llamette:3b");

    let hf = by_name(&models, "hf-model");
    assert_eq!(hf.format, pb::ModelFormat::Safetensors as i32);
    assert_eq!(
        (hf.block_count, hf.head_count_kv, hf.parameter_count),
        (Some(2), Some(2), Some(128_000))
    );
    assert_eq!(hf.architecture, "mistral");

    for bad in ["garbage", "hostile"] {
        let m = by_name(&models, bad);
        assert_eq!(m.status, pb::ModelStatus::Error as i32);
        assert!(!m.status_reason.is_empty());
    }
    assert!(
        models.iter().all(|m| m.name != "secret"),
        "a link out of the root must not be followed"
    );
    assert!(models.iter().all(|m| {
        m.path
            .starts_with(&r.canonicalize().unwrap().display().to_string())
    }));

    // Filters.
    let only = c
        .list_models(pb::ListModelsRequest {
            format: pb::ModelFormat::Ollama as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(only.len(), 1);
    let errs = c
        .list_models(pb::ListModelsRequest {
            status: pb::ModelStatus::Error as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(errs.len(), 2);
    let named = c
        .list_models(pb::ListModelsRequest {
            name_contains: "TIN".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(named.len(), 1);
}

#[tokio::test]
async fn rescans_are_incremental_and_stream_progress() {
    let root = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    for i in 0..5 {
        write_tiny_llama(
            root.path().join(format!("m{i}.gguf")),
            &tiny(&format!("m{i}")),
        )
        .unwrap();
    }
    let mut cfg = config(
        vec![root.path().to_path_buf()],
        data.path(),
        BTreeMap::new(),
    );
    cfg.registry.watch = false;
    let (_reg, mut c) = start(&cfg).await;
    let mut s = c
        .rescan(pb::RescanRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(p) = s.next().await {
        last = Some(p.unwrap());
    }
    let last = last.unwrap();
    assert!(last.done);
    assert_eq!(
        (last.files_seen, last.files_parsed, last.files_unchanged),
        (5, 0, 5)
    );

    std::fs::write(root.path().join("m3.gguf"), b"truncated").unwrap();
    std::fs::remove_file(root.path().join("m4.gguf")).unwrap();
    let mut s = c
        .rescan(pb::RescanRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    let mut failures = Vec::new();
    while let Some(p) = s.next().await {
        let p = p.unwrap();
        failures.extend(p.failures.clone());
        last = Some(p);
    }
    let last = last.unwrap();
    assert_eq!(
        (
            last.files_parsed,
            last.files_failed,
            last.models_changed,
            last.models_removed
        ),
        (1, 1, 1, 1)
    );
    assert!(
        failures.iter().any(|f| f.path.ends_with("m3.gguf")),
        "{failures:?}"
    );

    let e = c
        .rescan(pb::RescanRequest {
            roots: vec!["/etc".into()],
            full: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn the_watch_sees_added_and_removed_files() {
    let root = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let (_reg, mut c) = start(&config(
        vec![root.path().to_path_buf()],
        data.path(),
        BTreeMap::new(),
    ))
    .await;
    let mut w = c
        .watch_models(pb::WatchModelsRequest {
            include_existing: true,
        })
        .await
        .unwrap()
        .into_inner();
    let first = w.next().await.unwrap().unwrap();
    assert_eq!(first.kind, pb::ModelEventKind::SnapshotEnd as i32);
    let path = root.path().join("fresh.gguf");
    // Written elsewhere, then renamed in: the watch must not see a half-written file.
    let tmp = data.path().join("fresh.tmp");
    write_tiny_llama(&tmp, &tiny("fresh")).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let e = tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("no event for a new file")
        .unwrap()
        .unwrap();
    assert_eq!(e.kind, pb::ModelEventKind::Added as i32);
    assert_eq!(e.model.unwrap().name, "fresh");
    std::fs::remove_file(&path).unwrap();
    let e = tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("no event for a removal")
        .unwrap()
        .unwrap();
    assert_eq!(e.kind, pb::ModelEventKind::Removed as i32);
    assert!(list(&mut c).await.is_empty());
}

#[tokio::test]
async fn estimates_measurements_aliases_and_bad_input() {
    let root = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    write_tiny_llama(root.path().join("tiny.gguf"), &tiny("tiny")).unwrap();
    std::fs::write(root.path().join("junk.gguf"), b"junk").unwrap();
    let aliases = BTreeMap::from([
        ("coder".to_string(), "tiny.gguf".to_string()),
        ("ghost".to_string(), "nothing".to_string()),
    ]);
    let (_reg, mut c) = start(&config(
        vec![root.path().to_path_buf()],
        data.path(),
        aliases,
    ))
    .await;

    let m = c
        .get_model(pb::GetModelRequest {
            model: "coder".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.name, "tiny");
    assert_eq!(m.aliases, vec!["coder".to_string()]);
    let by_id = c
        .get_model(pb::GetModelRequest {
            model: m.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_id.id, m.id);

    let req = |ctx: i64, parallel: i32| pb::EstimateRequest {
        model: "tiny".into(),
        context: ctx,
        parallel,
        cache_type: pb::KvCacheType::F16 as i32,
        gpu_layers: None,
    };
    let e1 = c.estimate(req(1000, 1)).await.unwrap().into_inner();
    // 2 layers × 1024 cells × (16 + 16) × 4 kv heads × 2 bytes.
    assert_eq!(e1.kv_cache_bytes, 2 * 1024 * 32 * 4 * 2);
    assert_eq!(
        e1.weights_gpu_bytes + e1.weights_host_bytes,
        m.tensor_bytes.unwrap()
    );
    assert_eq!(
        e1.total_bytes,
        e1.weights_gpu_bytes
            + e1.weights_host_bytes
            + e1.kv_cache_bytes
            + e1.compute_buffer_bytes
            + e1.runtime_overhead_bytes
    );
    assert!(!e1.from_measurement);
    let e2 = c.estimate(req(1000, 2)).await.unwrap().into_inner();
    assert_eq!(e2.kv_cache_bytes, 2 * e1.kv_cache_bytes);

    for (bad, code, field) in [
        (req(0, 1), Code::InvalidArgument, "context"),
        (req(-5, 1), Code::InvalidArgument, "context"),
        (req(100, -1), Code::InvalidArgument, "parallel"),
        (
            pb::EstimateRequest {
                cache_type: 99,
                ..req(100, 1)
            },
            Code::InvalidArgument,
            "cache_type",
        ),
        (
            pb::EstimateRequest {
                model: "nope".into(),
                ..req(100, 1)
            },
            Code::NotFound,
            "nope",
        ),
        (
            pb::EstimateRequest {
                model: "junk".into(),
                ..req(100, 1)
            },
            Code::FailedPrecondition,
            "Error",
        ),
        (
            pb::EstimateRequest {
                model: "ghost".into(),
                ..req(100, 1)
            },
            Code::NotFound,
            "ghost",
        ),
    ] {
        let e = c.estimate(bad).await.unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
        assert!(
            e.message().contains(field),
            "{} should mention {field}",
            e.message()
        );
    }

    let rec = pb::RecordMeasurementRequest {
        model: "tiny".into(),
        context: 1000,
        parallel: 1,
        cache_type: pb::KvCacheType::F16 as i32,
        gpu_layers: None,
        kv_cache_bytes: Some(12345),
        compute_buffer_bytes: Some(777),
        source: "test".into(),
        ..Default::default()
    };
    let e = c
        .record_measurement(pb::RecordMeasurementRequest {
            kv_cache_bytes: None,
            compute_buffer_bytes: None,
            ..rec.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let r = c
        .record_measurement(rec.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(!r.replaced);
    let got = c.estimate(req(1000, 1)).await.unwrap().into_inner();
    assert!(got.from_measurement);
    assert_eq!((got.kv_cache_bytes, got.compute_buffer_bytes), (12345, 777));
    assert_eq!(
        got.weights_host_bytes + got.weights_gpu_bytes,
        e1.weights_gpu_bytes + e1.weights_host_bytes
    );
    // Another configuration is still computed.
    assert!(
        !c.estimate(req(2000, 1))
            .await
            .unwrap()
            .into_inner()
            .from_measurement
    );
    assert!(
        c.record_measurement(rec)
            .await
            .unwrap()
            .into_inner()
            .replaced
    );
}

#[tokio::test]
async fn the_catalogue_and_measurements_survive_a_restart() {
    let root = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    write_tiny_llama(root.path().join("tiny.gguf"), &tiny("tiny")).unwrap();
    let mut cfg = config(
        vec![root.path().to_path_buf()],
        data.path(),
        BTreeMap::new(),
    );
    cfg.registry.watch = false;
    let (reg, mut c) = start(&cfg).await;
    let id = list(&mut c).await[0].id.clone();
    c.record_measurement(pb::RecordMeasurementRequest {
        model: id.clone(),
        context: 512,
        parallel: 1,
        kv_cache_bytes: Some(1),
        ..Default::default()
    })
    .await
    .unwrap();
    reg.shutdown().await;
    let (_reg, mut c) = start(&cfg).await;
    let models = list(&mut c).await;
    assert_eq!(models.len(), 1);
    assert_eq!(models[0].id, id, "ids are stable across restarts");
    let e = c
        .estimate(pb::EstimateRequest {
            model: id,
            context: 512,
            parallel: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(e.from_measurement);
    assert!(data.path().join("registry.db").is_file());
}
