//! What a control plane needs to know about a model, distilled from its GGUF header.
//!
//! [`ModelInfo::from_header`] reads the well-known `general.*`, `{arch}.*`, `tokenizer.*` and
//! `split.*` keys and sums tensor sizes, per layer and overall, so that a scheduler can
//! estimate memory (weights on a GPU for `n` offloaded layers, KV cache per token) and a
//! catalogue can show architecture, size and quantization without loading the model.
//!
//! Missing keys become `None`/empty; a key that is present with the wrong type or an
//! impossible value (a per-layer array of the wrong length, a block count above
//! [`MAX_LAYERS`]) is an error naming the key, because silently guessing would give wrong
//! memory estimates.

use crate::error::GgufError;
use crate::reader::GgufHeader;
use crate::types::{GgmlType, MetadataValue, file_type_name};

/// Most layers a model may declare (real models have at most a few hundred).
pub const MAX_LAYERS: u64 = 4096;

/// Where a shard sits in a split model (`split.*` keys, written by `llama-gguf-split`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitInfo {
    /// Zero-based shard index (`split.no`).
    pub index: u64,
    /// Number of shards (`split.count`).
    pub count: u64,
    /// Tensors across all shards (`split.tensors.count`), if given.
    pub total_tensors: Option<u64>,
}

/// A model's shape, size and tokenizer facts, from its GGUF header.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// `general.architecture`, e.g. "llama", "qwen2", "gemma3".
    pub architecture: Option<String>,
    /// `general.name`.
    pub name: Option<String>,
    /// `general.size_label`, e.g. "7B", "8x7B".
    pub size_label: Option<String>,
    /// Sum of all tensors' element counts in this file (for a split shard: this shard only).
    pub parameter_count: u64,
    /// `general.file_type` (llama.cpp `llama_ftype` id).
    pub file_type: Option<u64>,
    /// Name of `file_type`, e.g. "Q4_K_M", "F16".
    pub file_type_name: Option<&'static str>,
    /// The tensor type holding the most bytes (a fallback when `file_type` is missing).
    pub dominant_tensor_type: Option<GgmlType>,
    /// `{arch}.context_length`: the trained context.
    pub context_length: Option<u64>,
    /// `{arch}.block_count`: number of repeating layers.
    pub block_count: Option<u64>,
    /// `{arch}.embedding_length` (n_embd).
    pub embedding_length: Option<u64>,
    /// `{arch}.feed_forward_length`; the largest value if given per layer.
    pub feed_forward_length: Option<u64>,
    /// `{arch}.attention.head_count`; the largest value if given per layer.
    pub head_count: Option<u64>,
    /// Attention heads per layer (one entry per layer; a single entry if the block count is
    /// unknown; empty if the key is missing).
    pub head_count_per_layer: Vec<u64>,
    /// `{arch}.attention.head_count_kv` per layer (scalar values are repeated for each
    /// layer; a single entry if the block count is unknown; empty if the key is missing).
    pub head_count_kv: Vec<u64>,
    /// `{arch}.attention.key_length`, else embedding length / head count.
    pub key_length: Option<u64>,
    /// `{arch}.attention.value_length`, else embedding length / head count.
    pub value_length: Option<u64>,
    /// `{arch}.attention.sliding_window` (tokens), if the model uses sliding-window attention.
    pub sliding_window: Option<u64>,
    /// Which layers use the sliding window, from `{arch}.attention.sliding_window_pattern`:
    /// a per-layer array of bools or 0/1 integers, or an integer `n` read as llama.cpp's
    /// default `set_swa_pattern(n)` ("the last of every `n` layers is full attention"; a few
    /// architectures use a dense-first variant that the file does not record). Empty when the
    /// file does not say (many architectures hard-code the pattern in llama.cpp).
    pub sliding_window_layers: Vec<bool>,
    /// `{arch}.expert_count` (mixture of experts).
    pub expert_count: Option<u64>,
    /// `{arch}.expert_used_count`.
    pub expert_used_count: Option<u64>,
    /// Length of `tokenizer.ggml.tokens`, else `{arch}.vocab_size`.
    pub vocab_size: Option<u64>,
    /// Whether `tokenizer.chat_template` is present.
    pub has_chat_template: bool,
    /// Number of tensors in this file.
    pub tensor_count: u64,
    /// Sum of tensor data bytes in this file.
    pub total_tensor_bytes: u64,
    /// Tensor bytes of each repeating layer (`blk.N.*`), indexed by N. At least
    /// `block_count` entries when that is known.
    pub layer_tensor_bytes: Vec<u64>,
    /// Bytes of tensors not in a `blk.N.*` layer (embeddings, output, norms, ...).
    pub non_layer_tensor_bytes: u64,
    /// Bytes of `token_embd.*` (llama.cpp keeps the input embedding on the CPU).
    pub token_embd_bytes: u64,
    /// Bytes of `output.*` and `output_norm.*` (offloaded only when all layers are).
    pub output_bytes: u64,
    /// Split shard information, if this file is one shard of a split model.
    pub split: Option<SplitInfo>,
}

impl ModelInfo {
    /// Extracts model facts from a parsed header.
    pub fn from_header(header: &GgufHeader) -> Result<Self, GgufError> {
        let architecture = opt_str(header, "general.architecture")?;
        let arch_key = |suffix: &str| architecture.as_ref().map(|a| format!("{a}.{suffix}"));
        let arch_u64 = |suffix: &str| -> Result<Option<u64>, GgufError> {
            match arch_key(suffix) {
                Some(k) => opt_u64(header, &k),
                None => Ok(None),
            }
        };

        let block_count = arch_u64("block_count")?;
        if let Some(n) = block_count
            && n > MAX_LAYERS
        {
            return Err(GgufError::InvalidMetadata {
                key: arch_key("block_count").unwrap_or_default(),
                reason: format!("{n} layers is above the supported maximum of {MAX_LAYERS}"),
            });
        }
        let per_layer = |suffix: &str| -> Result<Vec<u64>, GgufError> {
            match arch_key(suffix) {
                Some(k) => per_layer_u64(header, &k, block_count),
                None => Ok(Vec::new()),
            }
        };

        let embedding_length = arch_u64("embedding_length")?;
        let feed_forward_length = per_layer("feed_forward_length")?.into_iter().max();
        let head_count_per_layer = per_layer("attention.head_count")?;
        let head_count = head_count_per_layer.iter().copied().max();
        let head_count_kv = per_layer("attention.head_count_kv")?;
        let default_head_len = match (embedding_length, head_count) {
            (Some(e), Some(h)) if h > 0 => Some(e / h),
            _ => None,
        };
        let key_length = arch_u64("attention.key_length")?.or(default_head_len);
        let value_length = arch_u64("attention.value_length")?.or(default_head_len);
        let sliding_window = arch_u64("attention.sliding_window")?;
        let sliding_window_layers = match arch_key("attention.sliding_window_pattern") {
            Some(k) => swa_pattern(header, &k, block_count)?,
            None => Vec::new(),
        };

        let vocab_size = match header.get("tokenizer.ggml.tokens") {
            Some(MetadataValue::Array(a)) => Some(a.len()),
            Some(other) => {
                return Err(wrong_type("tokenizer.ggml.tokens", "an array", other));
            }
            None => arch_u64("vocab_size")?,
        };

        let file_type = opt_u64(header, "general.file_type")?;
        let split = match opt_u64(header, "split.count")? {
            Some(count) => Some(SplitInfo {
                index: opt_u64(header, "split.no")?.unwrap_or(0),
                count,
                total_tensors: opt_u64(header, "split.tensors.count")?,
            }),
            None => None,
        };

        // Tensor sizes, overall and per layer.
        let mut layer_tensor_bytes: Vec<u64> = Vec::new();
        let mut non_layer_tensor_bytes = 0u64;
        let mut token_embd_bytes = 0u64;
        let mut output_bytes = 0u64;
        let mut by_type: Vec<(GgmlType, u64)> = Vec::new();
        for t in header.tensors() {
            match layer_index(&t.name) {
                Some(n) => {
                    if layer_tensor_bytes.len() <= n {
                        layer_tensor_bytes.resize(n + 1, 0);
                    }
                    layer_tensor_bytes[n] += t.n_bytes;
                }
                None => {
                    non_layer_tensor_bytes += t.n_bytes;
                    if t.name.starts_with("token_embd.") {
                        token_embd_bytes += t.n_bytes;
                    } else if t.name.starts_with("output.") || t.name.starts_with("output_norm.") {
                        output_bytes += t.n_bytes;
                    }
                }
            }
            match by_type.iter_mut().find(|(ty, _)| *ty == t.ggml_type) {
                Some((_, b)) => *b += t.n_bytes,
                None => by_type.push((t.ggml_type, t.n_bytes)),
            }
        }
        if let Some(n) = block_count {
            // n <= MAX_LAYERS, checked above.
            let n = n as usize;
            if layer_tensor_bytes.len() < n {
                layer_tensor_bytes.resize(n, 0);
            }
        }
        let dominant_tensor_type = by_type
            .iter()
            .max_by_key(|(ty, bytes)| (*bytes, std::cmp::Reverse(ty.id())))
            .map(|(ty, _)| *ty);

        Ok(ModelInfo {
            name: opt_str(header, "general.name")?,
            size_label: opt_str(header, "general.size_label")?,
            parameter_count: header.tensors().iter().map(|t| t.n_elements).sum(),
            file_type,
            file_type_name: file_type.and_then(file_type_name),
            dominant_tensor_type,
            context_length: arch_u64("context_length")?,
            block_count,
            embedding_length,
            feed_forward_length,
            head_count,
            head_count_per_layer,
            head_count_kv,
            key_length,
            value_length,
            sliding_window,
            sliding_window_layers,
            expert_count: arch_u64("expert_count")?,
            expert_used_count: arch_u64("expert_used_count")?,
            vocab_size,
            has_chat_template: header.get("tokenizer.chat_template").is_some(),
            tensor_count: header.tensors().len() as u64,
            total_tensor_bytes: header.total_tensor_bytes(),
            layer_tensor_bytes,
            non_layer_tensor_bytes,
            token_embd_bytes,
            output_bytes,
            split,
            architecture,
        })
    }

    /// The quantization to show: the `general.file_type` name, else the name of the tensor
    /// type holding the most bytes.
    pub fn quantization(&self) -> Option<&'static str> {
        self.file_type_name
            .or_else(|| self.dominant_tensor_type.map(GgmlType::name))
    }

    /// Weight bytes of the last `n_gpu_layers` repeating layers: what llama.cpp's
    /// `-ngl n_gpu_layers` puts on the GPU from the layers (it offloads the last layers
    /// first). When `n_gpu_layers` exceeds the layer count, llama.cpp also offloads the output
    /// layer; add [`ModelInfo::output_bytes`] for that.
    pub fn offloaded_layer_bytes(&self, n_gpu_layers: u64) -> u64 {
        let n = usize::try_from(n_gpu_layers).unwrap_or(usize::MAX);
        self.layer_tensor_bytes.iter().rev().take(n).sum()
    }

    /// KV-cache elements per token over all layers: Σ over layers of
    /// `head_count_kv × (key_length + value_length)` (multiply by cells and bytes per element,
    /// e.g. 2 for f16). `None` when the needed keys are missing.
    pub fn kv_elements_per_token(&self) -> Option<u64> {
        let per_head = self.key_length?.checked_add(self.value_length?)?;
        let layers = self.block_count?;
        match self.head_count_kv.as_slice() {
            [] => None,
            [one] if layers != 1 => one.checked_mul(per_head)?.checked_mul(layers),
            many => many
                .iter()
                .try_fold(0u64, |acc, &h| acc.checked_add(h.checked_mul(per_head)?)),
        }
    }
}

/// `N` for a tensor named `blk.N.…`, if N is a plausible layer index.
fn layer_index(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("blk.")?;
    let (num, _) = rest.split_once('.')?;
    if num.is_empty() || num.len() > 6 || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    if n >= MAX_LAYERS {
        return None;
    }
    usize::try_from(n).ok()
}

fn wrong_type(key: &str, expected: &str, found: &MetadataValue) -> GgufError {
    GgufError::InvalidMetadata {
        key: key.to_owned(),
        reason: format!("expected {expected}, found {}", found.value_type()),
    }
}

fn opt_str(header: &GgufHeader, key: &str) -> Result<Option<String>, GgufError> {
    match header.get(key) {
        None => Ok(None),
        Some(MetadataValue::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(wrong_type(key, "a string", other)),
    }
}

fn opt_u64(header: &GgufHeader, key: &str) -> Result<Option<u64>, GgufError> {
    match header.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| wrong_type(key, "a non-negative integer", v)),
    }
}

/// A value given either once for all layers or as a per-layer array.
fn per_layer_u64(
    header: &GgufHeader,
    key: &str,
    block_count: Option<u64>,
) -> Result<Vec<u64>, GgufError> {
    let Some(v) = header.get(key) else {
        return Ok(Vec::new());
    };
    if let Some(x) = v.as_u64() {
        // block_count <= MAX_LAYERS, checked by the caller.
        let n = block_count.map_or(1, |n| n as usize);
        return Ok(vec![x; n]);
    }
    let arr = v
        .as_array()
        .ok_or_else(|| wrong_type(key, "an integer or an array of integers", v))?;
    let values = arr.to_u64_vec().ok_or_else(|| GgufError::InvalidMetadata {
        key: key.to_owned(),
        reason: format!(
            "expected a per-layer array of non-negative integers, found {} {} values{}",
            arr.len(),
            arr.element_type(),
            if arr.values().is_none() {
                " (too many to keep)"
            } else {
                ""
            }
        ),
    })?;
    check_layer_len(key, values.len(), block_count)?;
    Ok(values)
}

fn check_layer_len(key: &str, len: usize, block_count: Option<u64>) -> Result<(), GgufError> {
    if let Some(n) = block_count
        && len as u64 != n
    {
        return Err(GgufError::InvalidMetadata {
            key: key.to_owned(),
            reason: format!("per-layer array has {len} entries but the model has {n} layers"),
        });
    }
    Ok(())
}

fn swa_pattern(
    header: &GgufHeader,
    key: &str,
    block_count: Option<u64>,
) -> Result<Vec<bool>, GgufError> {
    let Some(v) = header.get(key) else {
        return Ok(Vec::new());
    };
    if let Some(period) = v.as_u64() {
        let Some(n) = block_count else {
            return Ok(Vec::new());
        };
        // Same rule as llama.cpp's `set_swa_pattern`: every `period`-th layer is dense.
        return Ok((0..n)
            .map(|il| period == 0 || il % period < period - 1)
            .collect());
    }
    // Per-layer flags: bools, or integers (llama.cpp's own saver writes u32 0/1).
    let flag = |x: &MetadataValue| x.as_bool().or_else(|| x.as_u64().map(|n| n != 0));
    let mut values = v
        .as_array()
        .and_then(|a| a.values())
        .and_then(|vals| vals.iter().map(flag).collect::<Option<Vec<_>>>())
        .ok_or_else(|| wrong_type(key, "an integer or a per-layer array of flags", v))?;
    // The array may also cover extra (e.g. next-token-prediction) layers after the blocks.
    if let Some(n) = block_count {
        let n = n as usize;
        if values.len() < n {
            return Err(GgufError::InvalidMetadata {
                key: key.to_owned(),
                reason: format!(
                    "per-layer array has {} entries but the model has {n} layers",
                    values.len()
                ),
            });
        }
        values.truncate(n);
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_index_parses_only_plausible_layers() {
        assert_eq!(layer_index("blk.0.attn_q.weight"), Some(0));
        assert_eq!(layer_index("blk.31.ffn_up.weight"), Some(31));
        assert_eq!(layer_index("blk.4096.x"), None);
        assert_eq!(layer_index("blk.99999999999999999999.x"), None);
        assert_eq!(layer_index("blk.-1.x"), None);
        assert_eq!(layer_index("blk..x"), None);
        assert_eq!(layer_index("blk.3"), None);
        assert_eq!(layer_index("output.weight"), None);
    }
}
