//! Hugging Face safetensors folders: the JSON header of each `*.safetensors` file (dtypes and
//! shapes; never the tensor data) and `config.json` (layers, heads, hidden size, context, dtype,
//! quantization).
//!
//! A safetensors file starts with a little-endian u64 `N` and `N` bytes of JSON. `N` is bounded by
//! the file size and by [`MAX_HEADER`], so a lying header cannot make us allocate gigabytes.
//!
//! Nothing here opens a file: the caller opens it through the [`crate::fence::Fence`] (regular
//! files under the model roots only) and hands over the open file or its bytes.

use std::io::Read;
use std::path::Path;

use serde_json::Value;

/// The largest header accepted (real ones are well under 10 MiB).
pub const MAX_HEADER: u64 = 64 << 20;
/// The largest `config.json` (or `tokenizer_config.json`) read.
pub const MAX_CONFIG: u64 = 16 << 20;
/// The largest `model.safetensors.index.json` read.
pub const MAX_INDEX: u64 = 64 << 20;

/// Why a safetensors folder could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
}

fn invalid(path: &Path, reason: impl Into<String>) -> SafetensorsError {
    SafetensorsError::Invalid {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Tensor totals of one or more safetensors files.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TensorTotals {
    pub tensors: u64,
    pub parameters: u64,
    pub bytes: u64,
    /// The dtype holding the most bytes ("BF16", "F16", ...).
    pub dominant_dtype: Option<String>,
    dtype_bytes: Vec<(String, u64)>,
}

impl TensorTotals {
    fn add_dtype(&mut self, dtype: &str, bytes: u64) {
        match self.dtype_bytes.iter_mut().find(|(d, _)| d == dtype) {
            Some((_, b)) => *b = b.saturating_add(bytes),
            None => self.dtype_bytes.push((dtype.to_string(), bytes)),
        }
        self.dominant_dtype = self
            .dtype_bytes
            .iter()
            .max_by_key(|(_, b)| *b)
            .map(|(d, _)| d.clone());
    }

    pub fn merge(&mut self, other: &TensorTotals) {
        self.tensors += other.tensors;
        self.parameters = self.parameters.saturating_add(other.parameters);
        self.bytes = self.bytes.saturating_add(other.bytes);
        for (d, b) in &other.dtype_bytes {
            self.add_dtype(d, *b);
        }
    }
}

fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "I64" | "U64" | "F64" => 8,
        _ => return None,
    })
}

/// Read one file's header (`f`, opened from `path`) and total its tensors.
pub fn read_header(path: &Path, mut f: std::fs::File) -> Result<TensorTotals, SafetensorsError> {
    let io = |source| SafetensorsError::Io {
        path: path.display().to_string(),
        source,
    };
    let file_len = f.metadata().map_err(io)?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| invalid(path, "shorter than the 8-byte header length"))?;
    let n = u64::from_le_bytes(len);
    if n > file_len.saturating_sub(8) || n > MAX_HEADER {
        return Err(invalid(
            path,
            format!("header claims {n} bytes but the file holds {file_len} (limit {MAX_HEADER})"),
        ));
    }
    let mut buf = vec![0u8; n as usize];
    f.read_exact(&mut buf).map_err(io)?;
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&buf)
        .map_err(|e| invalid(path, format!("header is not a JSON object: {e}")))?;
    let data_len = file_len - 8 - n;
    let mut t = TensorTotals::default();
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        let dtype = v
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid(path, format!("tensor {name}: no dtype")))?;
        let shape = v
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid(path, format!("tensor {name}: no shape")))?;
        let mut elems: u64 = 1;
        for d in shape {
            let d = d
                .as_u64()
                .ok_or_else(|| invalid(path, format!("tensor {name}: bad dimension")))?;
            elems = elems
                .checked_mul(d)
                .ok_or_else(|| invalid(path, format!("tensor {name}: shape overflows")))?;
        }
        let offsets = v
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 2)
            .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
            .ok_or_else(|| invalid(path, format!("tensor {name}: bad data_offsets")))?;
        if offsets.0 > offsets.1 || offsets.1 > data_len {
            return Err(invalid(
                path,
                format!("tensor {name}: data_offsets {offsets:?} outside the {data_len}-byte data"),
            ));
        }
        let bytes = offsets.1 - offsets.0;
        if let Some(sz) = dtype_size(dtype)
            && elems.checked_mul(sz) != Some(bytes)
        {
            return Err(invalid(
                path,
                format!("tensor {name}: {elems} x {dtype} does not match its {bytes} data bytes"),
            ));
        }
        t.tensors += 1;
        t.parameters = t.parameters.saturating_add(elems);
        t.bytes = t.bytes.saturating_add(bytes);
        t.add_dtype(dtype, bytes);
    }
    Ok(t)
}

/// What `config.json` says, as far as memory estimates and listings care.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct HfConfig {
    pub model_type: Option<String>,
    pub num_hidden_layers: Option<u64>,
    pub num_attention_heads: Option<u64>,
    pub num_key_value_heads: Option<u64>,
    pub hidden_size: Option<u64>,
    pub intermediate_size: Option<u64>,
    pub max_position_embeddings: Option<u64>,
    pub vocab_size: Option<u64>,
    pub head_dim: Option<u64>,
    pub sliding_window: Option<u64>,
    pub torch_dtype: Option<String>,
    /// e.g. "awq-4bit", "gptq-8bit", "fp8".
    pub quantization: Option<String>,
    pub num_experts: Option<u64>,
    pub num_experts_per_tok: Option<u64>,
}

/// Parse `config.json` (the bytes of `path`, read with a [`MAX_CONFIG`] bound). Multimodal configs
/// nest the language model under `text_config`; its values are used when the top level lacks
/// them.
pub fn parse_config(path: &Path, bytes: &[u8]) -> Result<HfConfig, SafetensorsError> {
    let v: Value =
        serde_json::from_slice(bytes).map_err(|e| invalid(path, format!("not JSON: {e}")))?;
    let text = v.get("text_config");
    let u = |k: &str| {
        v.get(k)
            .and_then(Value::as_u64)
            .or_else(|| text.and_then(|t| t.get(k)).and_then(Value::as_u64))
    };
    let s = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .or_else(|| text.and_then(|t| t.get(k)).and_then(Value::as_str))
            .map(str::to_string)
    };
    let quantization = v.get("quantization_config").map(|q| {
        let method = q
            .get("quant_method")
            .and_then(Value::as_str)
            .unwrap_or("quantized");
        match q.get("bits").and_then(Value::as_u64) {
            Some(b) => format!("{method}-{b}bit"),
            None => method.to_string(),
        }
    });
    Ok(HfConfig {
        model_type: s("model_type"),
        num_hidden_layers: u("num_hidden_layers"),
        num_attention_heads: u("num_attention_heads"),
        num_key_value_heads: u("num_key_value_heads").or_else(|| u("num_attention_heads")),
        hidden_size: u("hidden_size"),
        intermediate_size: u("intermediate_size"),
        max_position_embeddings: u("max_position_embeddings"),
        vocab_size: u("vocab_size"),
        head_dim: u("head_dim"),
        sliding_window: u("sliding_window"),
        torch_dtype: s("torch_dtype").or_else(|| s("dtype")),
        quantization,
        num_experts: u("num_local_experts").or_else(|| u("num_experts")),
        num_experts_per_tok: u("num_experts_per_tok"),
    })
}

/// Shard file names listed by `model.safetensors.index.json` (`weight_map` values, from the bytes
/// of `path`, read with a [`MAX_INDEX`] bound), deduplicated.
pub fn parse_index(path: &Path, bytes: &[u8]) -> Result<Vec<String>, SafetensorsError> {
    let v: Value =
        serde_json::from_slice(bytes).map_err(|e| invalid(path, format!("not JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| invalid(path, "no weight_map"))?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect();
    files.sort();
    files.dedup();
    for f in &files {
        if f.is_empty()
            || f.contains('/')
            || f.contains('\\')
            || f.contains('\0')
            || f.starts_with('.')
        {
            return Err(invalid(
                path,
                format!("shard name {f:?} is not a plain file name"),
            ));
        }
    }
    Ok(files)
}

/// Write a minimal valid safetensors file (tests and benchmarks).
pub fn write_test_file(path: &Path, tensors: &[(&str, &str, &[u64])]) -> std::io::Result<()> {
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, dtype, shape) in tensors {
        let n: u64 = shape.iter().product::<u64>() * dtype_size(dtype).unwrap_or(1);
        header.insert(
            (*name).to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let json = serde_json::to_vec(&header)?;
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.resize(out.len() + offset as usize, 0);
    std::fs::write(path, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_header_and_rejects_lies() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.safetensors");
        write_test_file(&p, &[("a", "BF16", &[4, 8]), ("b", "F32", &[8])]).unwrap();
        let t = read_header(&p, std::fs::File::open(&p).unwrap()).unwrap();
        assert_eq!((t.tensors, t.parameters, t.bytes), (2, 40, 96));
        assert_eq!(t.dominant_dtype.as_deref(), Some("BF16"));

        let mut bytes = std::fs::read(&p).unwrap();
        bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        std::fs::write(&p, &bytes).unwrap();
        assert!(
            read_header(&p, std::fs::File::open(&p).unwrap())
                .unwrap_err()
                .to_string()
                .contains("header claims")
        );

        std::fs::write(&p, [1, 2, 3]).unwrap();
        assert!(read_header(&p, std::fs::File::open(&p).unwrap()).is_err());
        std::fs::write(&p, b"\x02\x00\x00\x00\x00\x00\x00\x00[]").unwrap();
        assert!(
            read_header(&p, std::fs::File::open(&p).unwrap())
                .unwrap_err()
                .to_string()
                .contains("JSON object")
        );
    }
}
