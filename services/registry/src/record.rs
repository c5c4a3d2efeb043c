//! A model as the registry knows it, and how a discovery [`Candidate`] becomes one.
//!
//! Parsing reads headers only (GGUF through `securellm-gguf`, safetensors JSON headers and
//! `config.json`). A candidate that cannot be parsed still becomes a record, with status `Error`
//! and the reason, so the user sees it; a split model with parts missing is `Incomplete`.

use std::path::{Path, PathBuf};

use securellm_gguf::{GgufHeader, ModelInfo};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::discover::{Candidate, FileStamp};
use crate::fence::Fence;
use crate::safetensors;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Format {
    Gguf,
    GgufSplit,
    Ollama,
    Safetensors,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Ok,
    Incomplete,
    Error,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Weights,
    Projector,
    Manifest,
    Config,
    Index,
    Other,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordFile {
    pub path: PathBuf,
    pub role: Role,
    pub size: u64,
    pub mtime_ms: u64,
}

/// Facts parsed from the headers. Everything is optional: files say what they say.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub architecture: Option<String>,
    pub general_name: Option<String>,
    pub size_label: Option<String>,
    pub parameter_count: Option<u64>,
    pub quantization: Option<String>,
    pub file_type: Option<u32>,
    pub gguf_version: Option<u32>,
    pub context_length: Option<u64>,
    pub block_count: Option<u32>,
    pub embedding_length: Option<u64>,
    pub feed_forward_length: Option<u64>,
    pub head_count: Option<u32>,
    pub head_count_per_layer: Vec<u32>,
    /// One entry per layer when the file has a per-layer array, else empty (see `head_count_kv`).
    pub head_count_kv_per_layer: Vec<u32>,
    pub head_count_kv: Option<u32>,
    pub key_length: Option<u32>,
    pub value_length: Option<u32>,
    pub sliding_window: Option<u32>,
    /// Per layer: does it use the sliding window? Empty = unknown (all layers when a window is set).
    pub sliding_window_layers: Vec<bool>,
    pub expert_count: Option<u32>,
    pub expert_used_count: Option<u32>,
    pub vocab_size: Option<u64>,
    pub chat_template: bool,
    pub tensor_count: Option<u64>,
    pub tensor_bytes: Option<u64>,
    /// Tensor bytes per transformer block (`blk.N.*`).
    pub layer_bytes: Vec<u64>,
    /// `token_embd.*`: llama.cpp keeps it in host memory.
    pub token_embd_bytes: u64,
    /// Tensors outside the blocks other than the token embedding (output, output_norm, ...).
    pub output_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitRec {
    pub count: u32,
    pub present: u32,
    pub missing: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OllamaRec {
    pub name_tag: String,
    pub host: String,
    pub namespace: String,
    pub manifest_path: PathBuf,
    pub model_digest: String,
    pub projector_digests: Vec<String>,
    pub other_layer_media_types: Vec<String>,
}

/// One model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelRecord {
    pub id: String,
    pub name: String,
    /// Filled from config when answering; never stored.
    #[serde(default, skip_serializing)]
    pub aliases: Vec<String>,
    pub format: Format,
    pub status: Status,
    pub status_reason: String,
    pub path: PathBuf,
    pub root: PathBuf,
    pub files: Vec<RecordFile>,
    pub size_bytes: u64,
    pub mtime_ms: u64,
    pub first_seen_ms: u64,
    pub parsed_at_ms: u64,
    /// (path, size, mtime) of every file discovery saw for it: equal fingerprints = unchanged.
    pub fingerprint: String,
    pub meta: Meta,
    pub split: Option<SplitRec>,
    pub ollama: Option<OllamaRec>,
    pub has_projector: bool,
}

/// `[a-z0-9-]` slug of a name, at most 40 bytes.
fn slug(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let out = out.trim_matches('-');
    let mut out: String = out.chars().take(40).collect();
    while out.ends_with('-') {
        out.pop();
    }
    if out.is_empty() { "model".into() } else { out }
}

/// Stable id: readable slug + 10 hex of SHA-256 over the format and the root-relative location.
pub fn model_id(name: &str, format: Format, root: &Path, location: &Path) -> String {
    let rel = location.strip_prefix(root).unwrap_or(location);
    let mut h = Sha256::new();
    h.update(format!("{format:?}").as_bytes());
    h.update([0]);
    h.update(root.as_os_str().as_encoded_bytes());
    h.update([0]);
    h.update(rel.as_os_str().as_encoded_bytes());
    let d = h.finalize();
    let hex: String = d[..5].iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{hex}", slug(name))
}

/// The fingerprint of a candidate: what discovery saw, not what parsing found.
pub fn fingerprint(c: &Candidate) -> String {
    let mut s = String::new();
    for st in c.stamps() {
        s.push_str(&format!(
            "{}|{}|{};",
            st.path.display(),
            st.size,
            st.mtime_ms
        ));
    }
    s
}

fn file(st: &FileStamp, role: Role) -> RecordFile {
    RecordFile {
        path: st.path.clone(),
        role,
        size: st.size,
        mtime_ms: st.mtime_ms,
    }
}

/// Tensor statistics of one or more headers (split parts).
fn tensor_stats(headers: &[&GgufHeader], meta: &mut Meta) {
    let mut count = 0u64;
    let mut bytes = 0u64;
    let mut params = 0u64;
    let mut layers: Vec<u64> = Vec::new();
    for h in headers {
        for t in h.tensors() {
            count += 1;
            bytes = bytes.saturating_add(t.n_bytes);
            params = params.saturating_add(t.n_elements);
            if let Some(rest) = t.name.strip_prefix("blk.")
                && let Some((n, _)) = rest.split_once('.')
                && let Ok(n) = n.parse::<usize>()
                && n < securellm_gguf::MAX_LAYERS as usize
            {
                if layers.len() <= n {
                    layers.resize(n + 1, 0);
                }
                layers[n] = layers[n].saturating_add(t.n_bytes);
            } else if t.name.starts_with("token_embd.") {
                meta.token_embd_bytes = meta.token_embd_bytes.saturating_add(t.n_bytes);
            } else {
                meta.output_bytes = meta.output_bytes.saturating_add(t.n_bytes);
            }
        }
    }
    meta.tensor_count = Some(count);
    meta.tensor_bytes = Some(bytes);
    meta.parameter_count = Some(params);
    meta.layer_bytes = layers;
}

fn u32_of(v: Option<u64>) -> Option<u32> {
    v.and_then(|x| u32::try_from(x).ok())
}

/// Metadata from a parsed GGUF header.
pub fn gguf_meta(header: &GgufHeader) -> Result<Meta, String> {
    let info = ModelInfo::from_header(header).map_err(|e| e.to_string())?;
    let mut m = Meta {
        architecture: info.architecture.clone(),
        general_name: info.name.clone(),
        size_label: info.size_label.clone(),
        parameter_count: None,
        quantization: info.quantization().map(str::to_string),
        file_type: u32_of(info.file_type),
        gguf_version: Some(header.version()),
        context_length: info.context_length,
        block_count: u32_of(info.block_count),
        embedding_length: info.embedding_length,
        feed_forward_length: info.feed_forward_length,
        head_count: u32_of(info.head_count),
        head_count_per_layer: info
            .head_count_per_layer
            .iter()
            .filter_map(|&x| u32::try_from(x).ok())
            .collect(),
        head_count_kv_per_layer: if info.head_count_kv.len() > 1 {
            info.head_count_kv
                .iter()
                .filter_map(|&x| u32::try_from(x).ok())
                .collect()
        } else {
            Vec::new()
        },
        head_count_kv: u32_of(info.head_count_kv.iter().copied().max()),
        key_length: u32_of(info.key_length),
        value_length: u32_of(info.value_length),
        sliding_window: u32_of(info.sliding_window),
        sliding_window_layers: info.sliding_window_layers.clone(),
        expert_count: u32_of(info.expert_count),
        expert_used_count: u32_of(info.expert_used_count),
        vocab_size: info.vocab_size,
        chat_template: info.has_chat_template,
        ..Meta::default()
    };
    tensor_stats(&[header], &mut m);
    Ok(m)
}

/// Parse the GGUF header of `path`, opened through the fence. A refusal names the file; a parse
/// error is the parser's message.
fn gguf_header(fence: &Fence, path: &Path) -> Result<GgufHeader, String> {
    let f = fence
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    GgufHeader::read(f).map_err(|e| e.to_string())
}

/// [`gguf_header`] with the file named in every error (split parts).
fn gguf_part_header(fence: &Fence, path: &Path) -> Result<GgufHeader, String> {
    let f = fence.open(path).map_err(|e| e.to_string());
    f.and_then(|f| GgufHeader::read(f).map_err(|e| e.to_string()))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Turn a candidate into a record (parsing its headers). Never fails: problems become an `Error`
/// or `Incomplete` status with the reason. Every file is opened through `fence`: only regular
/// files under the model roots.
pub fn build(c: &Candidate, fence: &Fence, now_ms: u64) -> ModelRecord {
    let fp = fingerprint(c);
    match c {
        Candidate::Gguf {
            root,
            file: f,
            projectors,
        } => {
            let name = f
                .path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let mut files = vec![file(f, Role::Weights)];
            files.extend(projectors.iter().map(|p| file(p, Role::Projector)));
            let mut r = base(
                &name,
                Format::Gguf,
                root,
                &f.path,
                &f.path,
                files,
                f.size,
                fp,
                now_ms,
            );
            r.has_projector = !projectors.is_empty();
            match gguf_header(fence, &f.path).and_then(|h| gguf_meta(&h)) {
                Ok(m) => r.meta = m,
                Err(e) => fail(&mut r, e),
            }
            r
        }
        Candidate::GgufSplit {
            root,
            stem,
            count,
            parts,
        } => {
            let first = parts
                .values()
                .next()
                .map(|p| p.path.clone())
                .unwrap_or_default();
            let files: Vec<RecordFile> = parts.values().map(|p| file(p, Role::Weights)).collect();
            let size = parts.values().map(|p| p.size).sum();
            let location = first.with_file_name(stem);
            let mut r = base(
                stem,
                Format::GgufSplit,
                root,
                &location,
                &first,
                files,
                size,
                fp,
                now_ms,
            );
            let missing: Vec<u32> = (1..=*count).filter(|i| !parts.contains_key(i)).collect();
            r.split = Some(SplitRec {
                count: *count,
                present: parts.len() as u32,
                missing: missing.clone(),
            });
            let mut headers = Vec::new();
            for p in parts.values() {
                match gguf_part_header(fence, &p.path) {
                    Ok(h) => headers.push(h),
                    Err(e) => {
                        fail(&mut r, e);
                        return r;
                    }
                }
            }
            match parts.get(&1).and(headers.first()).map(gguf_meta) {
                Some(Ok(mut m)) => {
                    let refs: Vec<&GgufHeader> = headers.iter().collect();
                    m.token_embd_bytes = 0;
                    m.output_bytes = 0;
                    tensor_stats(&refs, &mut m);
                    r.meta = m;
                }
                Some(Err(e)) => fail(&mut r, e),
                None => {}
            }
            if !missing.is_empty() && r.status == Status::Ok {
                r.status = Status::Incomplete;
                r.status_reason = format!(
                    "split model: {} of {} parts present; missing part(s) {}",
                    parts.len(),
                    count,
                    missing
                        .iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            r
        }
        Candidate::Ollama {
            root,
            store,
            manifest,
        } => ollama(fence, root, store, manifest, fp, now_ms),
        Candidate::Safetensors {
            root,
            dir,
            files,
            refused,
        } => safetensors_record(fence, root, dir, files, refused, fp, now_ms),
    }
}

#[allow(clippy::too_many_arguments)]
fn base(
    name: &str,
    format: Format,
    root: &Path,
    location: &Path,
    path: &Path,
    files: Vec<RecordFile>,
    size: u64,
    fingerprint: String,
    now_ms: u64,
) -> ModelRecord {
    let mtime_ms = files.iter().map(|f| f.mtime_ms).max().unwrap_or(0);
    ModelRecord {
        id: model_id(name, format, root, location),
        name: name.to_string(),
        aliases: Vec::new(),
        format,
        status: Status::Ok,
        status_reason: String::new(),
        path: path.to_path_buf(),
        root: root.to_path_buf(),
        files,
        size_bytes: size,
        mtime_ms,
        first_seen_ms: now_ms,
        parsed_at_ms: now_ms,
        fingerprint,
        meta: Meta::default(),
        split: None,
        ollama: None,
        has_projector: false,
    }
}

fn fail(r: &mut ModelRecord, why: impl Into<String>) {
    r.status = Status::Error;
    r.status_reason = why.into();
    r.meta = Meta::default();
}

const OLLAMA_MODEL: &str = "application/vnd.ollama.image.model";
const OLLAMA_PROJECTOR: &str = "application/vnd.ollama.image.projector";

/// The blob file of a digest (`sha256:<hex>` → `blobs/sha256-<hex>`), refusing anything that is not
/// a plain hex digest (a hostile manifest must not point outside the store).
fn blob_path(store: &Path, digest: &str) -> Option<PathBuf> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| store.join("blobs").join(format!("sha256-{hex}")))
}

fn ollama(
    fence: &Fence,
    root: &Path,
    store: &Path,
    m: &crate::discover::OllamaCandidate,
    fp: String,
    now_ms: u64,
) -> ModelRecord {
    let short = m.host == "registry.ollama.ai" && m.namespace == "library";
    let name_tag = if short {
        format!("{}:{}", m.model, m.tag)
    } else {
        format!("{}/{}/{}:{}", m.host, m.namespace, m.model, m.tag)
    };
    let location = m.manifest.path.clone();
    let mut r = base(
        &name_tag,
        Format::Ollama,
        root,
        &location,
        &location,
        vec![file(&m.manifest, Role::Manifest)],
        0,
        fp,
        now_ms,
    );
    let mut rec = OllamaRec {
        name_tag,
        host: m.host.clone(),
        namespace: m.namespace.clone(),
        manifest_path: m.manifest.path.clone(),
        model_digest: String::new(),
        projector_digests: Vec::new(),
        other_layer_media_types: Vec::new(),
    };
    let parsed = (|| -> Result<(), String> {
        if m.manifest.size > 4 << 20 {
            return Err("manifest larger than 4 MiB".into());
        }
        let bytes = fence
            .read(&m.manifest.path, 4 << 20)
            .map_err(|e| format!("cannot read manifest: {e}"))?;
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| format!("manifest is not JSON: {e}"))?;
        let layers = v
            .get("layers")
            .and_then(|l| l.as_array())
            .ok_or("manifest has no layers")?;
        for l in layers {
            let media = l.get("mediaType").and_then(|x| x.as_str()).unwrap_or("");
            let digest = l.get("digest").and_then(|x| x.as_str()).unwrap_or("");
            match media {
                OLLAMA_MODEL => rec.model_digest = digest.to_string(),
                OLLAMA_PROJECTOR => rec.projector_digests.push(digest.to_string()),
                other => rec.other_layer_media_types.push(other.to_string()),
            }
        }
        if rec.model_digest.is_empty() {
            return Err("manifest has no model layer".into());
        }
        let blob = blob_path(store, &rec.model_digest).ok_or_else(|| {
            format!(
                "model layer digest {:?} is not sha256:<64 hex>",
                rec.model_digest
            )
        })?;
        // The blob is opened (and its stamp listed) only if it is a regular file under a root.
        let blob_err = |e: crate::fence::FenceError| {
            if e.is_not_found() {
                format!("model blob {} missing: {e}", blob.display())
            } else {
                format!("model blob {}: {e}", blob.display())
            }
        };
        let st = crate::discover::stamp(fence, &blob).map_err(blob_err)?;
        let f = fence.open(&blob).map_err(blob_err)?;
        r.path = blob.clone();
        r.size_bytes = st.size;
        r.files.insert(0, file(&st, Role::Weights));
        for d in &rec.projector_digests {
            if let Some(p) = blob_path(store, d)
                && let Ok(st) = crate::discover::stamp(fence, &p)
            {
                r.files.push(file(&st, Role::Projector));
            }
        }
        r.mtime_ms = r.files.iter().map(|f| f.mtime_ms).max().unwrap_or(0);
        let h = GgufHeader::read(f).map_err(|e| format!("model blob: {e}"))?;
        r.meta = gguf_meta(&h)?;
        Ok(())
    })();
    r.has_projector = !rec.projector_digests.is_empty();
    r.ollama = Some(rec);
    if let Err(e) = parsed {
        fail(&mut r, e);
    }
    r
}

#[allow(clippy::too_many_arguments)]
fn safetensors_record(
    fence: &Fence,
    root: &Path,
    dir: &Path,
    stamps: &[FileStamp],
    refused: &[(PathBuf, String)],
    fp: String,
    now_ms: u64,
) -> ModelRecord {
    let name = dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let role = |p: &Path| match p.file_name().and_then(|n| n.to_str()).unwrap_or("") {
        n if n.ends_with(".safetensors") => Role::Weights,
        "config.json" => Role::Config,
        "model.safetensors.index.json" => Role::Index,
        _ => Role::Other,
    };
    let files: Vec<RecordFile> = stamps.iter().map(|s| file(s, role(&s.path))).collect();
    let size = files
        .iter()
        .filter(|f| f.role == Role::Weights)
        .map(|f| f.size)
        .sum();
    let mut r = base(
        &name,
        Format::Safetensors,
        root,
        dir,
        dir,
        files,
        size,
        fp,
        now_ms,
    );
    let result = (|| -> Result<(), String> {
        if let Some((p, why)) = refused.first() {
            return Err(format!("{}: {why}", p.display()));
        }
        let read = |p: &Path, limit: u64| {
            fence
                .read(p, limit)
                .map_err(|e| format!("{}: {e}", p.display()))
        };
        let config = dir.join("config.json");
        let cfg = safetensors::parse_config(&config, &read(&config, safetensors::MAX_CONFIG)?)
            .map_err(|e| e.to_string())?;
        let index = dir.join("model.safetensors.index.json");
        let shards: Vec<PathBuf> = if std::fs::symlink_metadata(&index).is_ok() {
            let names = safetensors::parse_index(&index, &read(&index, safetensors::MAX_INDEX)?)
                .map_err(|e| e.to_string())?;
            let mut present = Vec::new();
            let mut missing = Vec::new();
            for (i, n) in names.iter().enumerate() {
                let p = dir.join(n);
                match fence.check(&p) {
                    Ok(_) => present.push(p),
                    Err(e) if e.is_not_found() => missing.push(i as u32 + 1),
                    Err(e) => return Err(format!("{}: {e}", p.display())),
                }
            }
            r.split = Some(SplitRec {
                count: names.len() as u32,
                present: (names.len() - missing.len()) as u32,
                missing: missing.clone(),
            });
            if !missing.is_empty() {
                r.status = Status::Incomplete;
                r.status_reason = format!("{} of {} shards missing", missing.len(), names.len());
            }
            present
        } else {
            r.files
                .iter()
                .filter(|f| f.role == Role::Weights)
                .map(|f| f.path.clone())
                .collect()
        };
        let mut totals = safetensors::TensorTotals::default();
        for s in &shards {
            let f = fence.open(s).map_err(|e| format!("{}: {e}", s.display()))?;
            totals.merge(&safetensors::read_header(s, f).map_err(|e| e.to_string())?);
        }
        let heads = cfg.num_attention_heads;
        r.meta = Meta {
            architecture: cfg.model_type.clone(),
            parameter_count: Some(totals.parameters),
            quantization: cfg
                .quantization
                .clone()
                .or_else(|| totals.dominant_dtype.clone())
                .or(cfg.torch_dtype.clone()),
            context_length: cfg.max_position_embeddings,
            block_count: u32_of(cfg.num_hidden_layers),
            embedding_length: cfg.hidden_size,
            feed_forward_length: cfg.intermediate_size,
            head_count: u32_of(heads),
            head_count_kv: u32_of(cfg.num_key_value_heads),
            key_length: u32_of(
                cfg.head_dim
                    .or_else(|| Some(cfg.hidden_size? / heads.filter(|&h| h > 0)?)),
            ),
            value_length: u32_of(
                cfg.head_dim
                    .or_else(|| Some(cfg.hidden_size? / heads.filter(|&h| h > 0)?)),
            ),
            sliding_window: u32_of(cfg.sliding_window),
            expert_count: u32_of(cfg.num_experts),
            expert_used_count: u32_of(cfg.num_experts_per_tok),
            vocab_size: cfg.vocab_size,
            chat_template: fence
                .read(&dir.join("tokenizer_config.json"), safetensors::MAX_CONFIG)
                .is_ok_and(|b| b.windows(13).any(|w| w == b"chat_template")),
            tensor_count: Some(totals.tensors),
            tensor_bytes: Some(totals.bytes),
            ..Meta::default()
        };
        Ok(())
    })();
    if let Err(e) = result {
        fail(&mut r, e);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_slugged_and_location_dependent() {
        let a = model_id(
            "Llama 3.1 8B!",
            Format::Gguf,
            Path::new("/m"),
            Path::new("/m/a/llama.gguf"),
        );
        let b = model_id(
            "Llama 3.1 8B!",
            Format::Gguf,
            Path::new("/m"),
            Path::new("/m/a/llama.gguf"),
        );
        let c = model_id(
            "Llama 3.1 8B!",
            Format::Gguf,
            Path::new("/m"),
            Path::new("/m/b/llama.gguf"),
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.starts_with("llama-3-1-8b-"), "{a}");
        assert!(
            a.len() <= 64
                && a.bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        );
    }

    #[test]
    fn blob_paths_refuse_traversal() {
        let s = Path::new("/store");
        assert!(blob_path(s, "sha256:../../etc/passwd").is_none());
        assert!(blob_path(s, &format!("sha256:{}", "a".repeat(64))).is_some());
        assert!(blob_path(s, "md5:abc").is_none());
    }
}
