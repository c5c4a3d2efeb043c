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

use securellm_testkit::models::write_safetensors;

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
        // Only "no such model" carries the MODEL_NOT_FOUND reason.
        assert_eq!(
            securellm_common::errors::reason_of(&e)
                == Some(securellm_common::errors::Reason::ModelNotFound),
            code == Code::NotFound,
            "{e:?}"
        );
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

// ---- The fence around the model roots (issue 11): links out, FIFOs, names that are not UTF-8.

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(
        unsafe { libc::mkfifo(c.as_ptr(), 0o600) },
        0,
        "mkfifo {p:?}"
    );
}

fn non_utf8(dir: &Path, prefix: &[u8], suffix: &str) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let mut name = prefix.to_vec();
    name.extend_from_slice(b"\xff\xfe");
    name.extend_from_slice(suffix.as_bytes());
    dir.join(std::ffi::OsStr::from_bytes(&name))
}

/// An Ollama manifest `name:tag` in `store` whose model layer is blob `hex` (not written here).
fn write_manifest(store: &Path, model: &str, tag: &str, hex: &str) {
    std::fs::create_dir_all(store.join("blobs")).unwrap();
    let dir = store
        .join("manifests/registry.ollama.ai/library")
        .join(model);
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": format!("sha256:{hex}"), "size": 1}]
    });
    std::fs::write(dir.join(tag), serde_json::to_vec(&manifest).unwrap()).unwrap();
}

fn blob(store: &Path, hex: &str) -> PathBuf {
    store.join("blobs").join(format!("sha256-{hex}"))
}

/// Rescan everything; the final progress and every failure reported on the way.
async fn rescan_all(
    c: &mut ModelRegistryClient<Channel>,
) -> (pb::RescanProgress, Vec<pb::RescanFailure>) {
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
    (last.unwrap(), failures)
}

/// What the bug did: a reader blocked forever in `open` on a FIFO. Open writers on the FIFOs (in a
/// loop, as the scan may block on one after another) so the blocked scan ends, keep the files, and
/// fail the test instead of hanging it.
fn unwedge_and_fail(fifos: Vec<PathBuf>, keep: Vec<tempfile::TempDir>, what: &str) -> ! {
    use std::os::unix::fs::OpenOptionsExt;
    std::thread::spawn(move || {
        loop {
            for f in &fifos {
                let _ = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(f);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    std::mem::forget(keep);
    panic!("{what} wedged on a FIFO");
}

#[tokio::test]
async fn links_out_of_the_roots_are_never_listed_or_opened() {
    let root = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let r = root.path();
    let o = outside.path();
    write_tiny_llama(o.join("elsewhere.gguf"), &tiny("elsewhere")).unwrap();
    write_safetensors(o, "hf-outside");

    // Ollama: blobs that are links to /etc/passwd, to a GGUF outside, and (allowed) into the root.
    let store = r.join("ollama");
    let (h_passwd, h_out, h_in) = ("a".repeat(64), "b".repeat(64), "c".repeat(64));
    write_manifest(&store, "passwd", "latest", &h_passwd);
    write_manifest(&store, "elsewhere", "latest", &h_out);
    write_manifest(&store, "inside", "latest", &h_in);
    std::os::unix::fs::symlink("/etc/passwd", blob(&store, &h_passwd)).unwrap();
    std::os::unix::fs::symlink(o.join("elsewhere.gguf"), blob(&store, &h_out)).unwrap();
    write_tiny_llama(r.join("inside.gguf"), &tiny("inside")).unwrap();
    std::os::unix::fs::symlink(r.join("inside.gguf"), blob(&store, &h_in)).unwrap();

    // Safetensors: config.json out; the only shard out; an indexed shard out.
    write_safetensors(r, "hf-config-out");
    std::fs::remove_file(r.join("hf-config-out/config.json")).unwrap();
    std::os::unix::fs::symlink(
        o.join("hf-outside/config.json"),
        r.join("hf-config-out/config.json"),
    )
    .unwrap();
    write_safetensors(r, "hf-shard-out");
    std::fs::remove_file(r.join("hf-shard-out/model.safetensors")).unwrap();
    std::os::unix::fs::symlink(
        o.join("hf-outside/model.safetensors"),
        r.join("hf-shard-out/model.safetensors"),
    )
    .unwrap();
    write_safetensors(r, "hf-index-out");
    let d = r.join("hf-index-out");
    std::fs::rename(d.join("model.safetensors"), d.join("part-1.safetensors")).unwrap();
    std::os::unix::fs::symlink(
        o.join("hf-outside/model.safetensors"),
        d.join("part-2.safetensors"),
    )
    .unwrap();
    std::fs::write(
        d.join("model.safetensors.index.json"),
        serde_json::to_vec(&serde_json::json!({"weight_map": {
            "model.embed_tokens.weight": "part-1.safetensors", "lm_head.weight": "part-2.safetensors"
        }}))
        .unwrap(),
    )
    .unwrap();
    write_safetensors(r, "hf-fine");

    let mut cfg = config(vec![r.to_path_buf()], data.path(), BTreeMap::new());
    cfg.registry.watch = false;
    let (_reg, mut c) = start(&cfg).await;
    let models = list(&mut c).await;
    let croot = r.canonicalize().unwrap();

    assert_eq!(
        by_name(&models, "inside:latest").status,
        pb::ModelStatus::Ok as i32,
        "a blob linked to a file under the root is fine"
    );
    assert_eq!(
        by_name(&models, "hf-fine").status,
        pb::ModelStatus::Ok as i32
    );
    for name in [
        "passwd:latest",
        "elsewhere:latest",
        "hf-config-out",
        "hf-shard-out",
        "hf-index-out",
    ] {
        let m = by_name(&models, name);
        assert_eq!(m.status, pb::ModelStatus::Error as i32, "{name}: {m:?}");
        assert!(
            m.status_reason.contains("outside the model roots"),
            "{name}: {}",
            m.status_reason
        );
        assert!(
            m.architecture.is_empty() && m.tensor_bytes.is_none(),
            "{name}: nothing parsed"
        );
    }
    // Every path listed is under the root after resolving links, and no size of a file outside
    // is listed.
    let passwd_len = std::fs::metadata("/etc/passwd").unwrap().len();
    for m in &models {
        for p in std::iter::once(&m.path).chain(m.files.iter().map(|f| &f.path)) {
            let real = Path::new(p).canonicalize().unwrap();
            assert!(
                real.starts_with(&croot),
                "{} lists {p} → {}",
                m.name,
                real.display()
            );
        }
        if m.name == "passwd:latest" {
            assert!(m.files.iter().all(|f| f.size_bytes != passwd_len), "{m:?}");
        }
    }
}

#[tokio::test]
async fn fifos_never_wedge_scan_or_watch() {
    let root = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let r = root.path();
    let mut fifos = Vec::new();
    let mut fifo = |p: PathBuf| {
        mkfifo(&p);
        fifos.push(p);
    };
    write_tiny_llama(r.join("good.gguf"), &tiny("good")).unwrap();
    fifo(r.join("pipe.gguf"));
    std::os::unix::fs::symlink(r.join("pipe.gguf"), r.join("link-to-pipe.gguf")).unwrap();
    // An Ollama model blob that is a FIFO (the reported wedge).
    let store = r.join("ollama");
    let hex = "d".repeat(64);
    write_manifest(&store, "piped", "latest", &hex);
    fifo(blob(&store, &hex));
    fifo(store.join("manifests/registry.ollama.ai/library/piped/fifo-tag"));
    // Safetensors: config.json a FIFO; an indexed shard a FIFO; tokenizer_config.json a FIFO.
    write_safetensors(r, "hf-config-fifo");
    std::fs::remove_file(r.join("hf-config-fifo/config.json")).unwrap();
    fifo(r.join("hf-config-fifo/config.json"));
    write_safetensors(r, "hf-shard-fifo");
    let d = r.join("hf-shard-fifo");
    std::fs::rename(d.join("model.safetensors"), d.join("part-1.safetensors")).unwrap();
    fifo(d.join("part-2.safetensors"));
    std::fs::write(
        d.join("model.safetensors.index.json"),
        serde_json::to_vec(&serde_json::json!({"weight_map": {
            "a": "part-1.safetensors", "b": "part-2.safetensors"
        }}))
        .unwrap(),
    )
    .unwrap();
    write_safetensors(r, "hf-tokenizer-fifo");
    fifo(r.join("hf-tokenizer-fifo/tokenizer_config.json"));

    let cfg = config(vec![r.to_path_buf()], data.path(), BTreeMap::new());
    let started = tokio::time::timeout(Duration::from_secs(20), registry::start(&cfg)).await;
    let Ok(reg) = started else {
        unwedge_and_fail(fifos, vec![root, data], "the first scan");
    };
    let reg = reg.unwrap();
    let mut c = ModelRegistryClient::connect(format!("http://{}", reg.addr))
        .await
        .unwrap();
    let models = list(&mut c).await;
    assert_eq!(by_name(&models, "good").status, pb::ModelStatus::Ok as i32);
    let hf = by_name(&models, "hf-tokenizer-fifo");
    assert_eq!(
        hf.status,
        pb::ModelStatus::Ok as i32,
        "{}",
        hf.status_reason
    );
    for name in ["piped:latest", "hf-config-fifo", "hf-shard-fifo"] {
        let m = by_name(&models, name);
        assert_eq!(m.status, pb::ModelStatus::Error as i32, "{name}");
        assert!(
            m.status_reason.contains("FIFO"),
            "{name}: {}",
            m.status_reason
        );
    }
    assert!(
        models
            .iter()
            .all(|m| m.name != "pipe" && m.name != "link-to-pipe")
    );

    let Ok((last, failures)) =
        tokio::time::timeout(Duration::from_secs(20), rescan_all(&mut c)).await
    else {
        unwedge_and_fail(fifos, vec![root, data], "Rescan");
    };
    assert!(last.done);
    for f in [
        "pipe.gguf",
        "link-to-pipe.gguf",
        "fifo-tag",
        "tokenizer_config.json",
    ] {
        assert!(
            failures
                .iter()
                .any(|x| x.path.ends_with(f) && x.reason.contains("FIFO")),
            "{f}: {failures:?}"
        );
    }

    // The watch still works: a model added now is found.
    let tmp = data.path().join("later.tmp");
    write_tiny_llama(&tmp, &tiny("later")).unwrap();
    std::fs::rename(&tmp, r.join("later.gguf")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !list(&mut c).await.iter().any(|m| m.name == "later") {
        if std::time::Instant::now() > deadline {
            unwedge_and_fail(fifos, vec![root, data], "the watch");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    reg.shutdown().await;
}

#[tokio::test]
async fn names_that_are_not_utf8_are_reported_and_skipped() {
    let root = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let r = root.path();
    write_tiny_llama(r.join("good.gguf"), &tiny("good")).unwrap();
    write_tiny_llama(non_utf8(r, b"bad", ".gguf"), &tiny("bad")).unwrap();
    let odd_dir = non_utf8(r, b"dir", "");
    std::fs::create_dir(&odd_dir).unwrap();
    write_tiny_llama(odd_dir.join("inner.gguf"), &tiny("inner")).unwrap();

    let mut cfg = config(vec![r.to_path_buf()], data.path(), BTreeMap::new());
    cfg.registry.watch = false;
    // Before the fix the registry did not start at all.
    let (_reg, mut c) = start(&cfg).await;
    let models = list(&mut c).await;
    assert_eq!(
        models.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
        vec!["good"]
    );

    // Added at runtime: a GGUF, an Ollama tag, a safetensors folder, a split part. Rescan goes on.
    write_tiny_llama(non_utf8(r, b"late", ".gguf"), &tiny("late")).unwrap();
    let store = r.join("ollama");
    write_ollama(r, "llamette", "3b");
    let manifest = store.join("manifests/registry.ollama.ai/library/llamette/3b");
    std::fs::copy(&manifest, non_utf8(manifest.parent().unwrap(), b"tag", "")).unwrap();
    write_safetensors(r, "hf");
    std::fs::rename(r.join("hf"), non_utf8(r, b"hf", "")).unwrap();
    std::fs::create_dir(r.join("splits")).unwrap();
    write_split(&r.join("splits"), "big", 0);
    std::fs::rename(
        r.join("splits/big-00002-of-00003.gguf"),
        non_utf8(&r.join("splits"), b"big-00002-of-00003", ".gguf"),
    )
    .unwrap();
    let (last, failures) = rescan_all(&mut c).await;
    assert!(last.done);
    let utf8_failures = failures
        .iter()
        .filter(|f| f.reason.contains("not valid UTF-8"))
        .count();
    assert_eq!(utf8_failures, 6, "{failures:?}");
    let models = list(&mut c).await;
    let mut names: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
    names.sort();
    assert_eq!(names, vec!["big", "good", "llamette:3b"]);
    assert_eq!(
        by_name(&models, "big").status,
        pb::ModelStatus::Incomplete as i32
    );
}

/// With an internal token configured, every call without it (or with another one) is refused
/// before it reaches the catalogue; health checks stay open; the token works.
#[tokio::test]
async fn calls_without_the_internal_token_are_refused() {
    use securellm_common::internal_auth::{InternalToken, authenticated};

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("models");
    std::fs::create_dir_all(&root).unwrap();
    write_tiny_llama(root.join("a.gguf"), &tiny("a")).unwrap();
    let token = InternalToken::generate();
    let mut cfg = config(vec![root], &dir.path().join("data"), BTreeMap::new());
    cfg.registry.internal_token = Some(token.clone());
    let r = registry::start(&cfg).await.unwrap();
    let ch = Channel::from_shared(format!("http://{}", r.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let wrong = InternalToken::generate();
    for (what, t) in [("no token", None), ("a wrong token", Some(&wrong))] {
        let mut c = ModelRegistryClient::new(authenticated(ch.clone(), t));
        let e = c
            .list_models(pb::ListModelsRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{what}: {e:?}");
        let e = c.rescan(pb::RescanRequest::default()).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{what}: {e:?}");
    }
    let h = tonic_health::pb::health_client::HealthClient::new(ch.clone())
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        h.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let models = ModelRegistryClient::new(authenticated(ch, Some(&token)))
        .list_models(pb::ListModelsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .models;
    by_name(&models, "a");
    r.shutdown().await;
}
