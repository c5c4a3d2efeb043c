//! A GGUF v3 writer, used to build test models and fixtures.
//!
//! [`GgufWriter`] collects metadata and tensors in memory and then writes a little-endian
//! GGUF v3 file laid out the way llama.cpp expects: tensor data offsets are contiguous,
//! each tensor is padded to the alignment (32 unless [`GgufWriter::set_alignment`] says
//! otherwise, in which case `general.alignment` is written too), and the data section starts
//! at the aligned end of the header.
//!
//! Tensors can carry their bytes, or be declared all-zero with
//! [`GgufWriter::add_tensor_zeroed`]: such tensors cost no memory, and
//! [`GgufWriter::write_file`] leaves them as holes in a sparse file, so a header with
//! real-sized tensor shapes (gigabytes of declared weights) costs almost no disk.

use std::fs::File;
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::path::Path;

use crate::error::GgufError;
use crate::reader::{DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_DIMS};
use crate::types::{GgmlType, MetadataValue, f32_to_f16_bits};

/// GGUF version the writer produces.
pub const WRITER_VERSION: u32 = 3;

enum TensorData {
    Bytes(Vec<u8>),
    Zeroed,
}

struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ggml_type: GgmlType,
    n_bytes: u64,
    data: TensorData,
}

/// Builds a GGUF v3 file from metadata and tensors.
pub struct GgufWriter {
    alignment: u64,
    metadata: Vec<(String, MetadataValue)>,
    tensors: Vec<PendingTensor>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

fn invalid(reason: impl Into<String>) -> GgufError {
    GgufError::InvalidInput {
        reason: reason.into(),
    }
}

impl GgufWriter {
    /// An empty writer with the default alignment (32).
    pub fn new() -> Self {
        Self {
            alignment: DEFAULT_ALIGNMENT,
            metadata: Vec::new(),
            tensors: Vec::new(),
        }
    }

    /// Sets the data alignment (a power of two) and records it as `general.alignment` (u32).
    pub fn set_alignment(&mut self, alignment: u32) -> Result<&mut Self, GgufError> {
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(invalid(format!(
                "alignment {alignment} is not a power of two"
            )));
        }
        self.alignment = u64::from(alignment);
        self.put("general.alignment", MetadataValue::U32(alignment));
        Ok(self)
    }

    fn put(&mut self, key: &str, value: MetadataValue) {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value,
            None => self.metadata.push((key.to_owned(), value)),
        }
    }

    /// Adds a metadata pair. Fails if the key is already present, or is `general.alignment`
    /// (use [`GgufWriter::set_alignment`]), or an array in `value` lacks its values.
    pub fn add_metadata(
        &mut self,
        key: impl Into<String>,
        value: impl Into<MetadataValue>,
    ) -> Result<&mut Self, GgufError> {
        let key = key.into();
        if key.is_empty() {
            return Err(invalid("metadata keys must not be empty"));
        }
        if key == "general.alignment" {
            return Err(invalid("set general.alignment with set_alignment"));
        }
        if self.metadata.iter().any(|(k, _)| *k == key) {
            return Err(invalid(format!("duplicate metadata key {key:?}")));
        }
        let value = value.into();
        check_writable(&key, &value)?;
        self.metadata.push((key, value));
        Ok(self)
    }

    /// Adds or replaces a metadata pair (for adjusting a generated model's metadata).
    pub fn set_metadata(
        &mut self,
        key: impl Into<String>,
        value: impl Into<MetadataValue>,
    ) -> Result<&mut Self, GgufError> {
        let key = key.into();
        if key.is_empty() {
            return Err(invalid("metadata keys must not be empty"));
        }
        if key == "general.alignment" {
            return Err(invalid("set general.alignment with set_alignment"));
        }
        let value = value.into();
        check_writable(&key, &value)?;
        self.put(&key, value);
        Ok(self)
    }

    /// Removes a metadata key; returns its value if it was present.
    pub fn remove_metadata(&mut self, key: &str) -> Option<MetadataValue> {
        let i = self.metadata.iter().position(|(k, _)| k == key)?;
        Some(self.metadata.remove(i).1)
    }

    fn check_tensor(
        &self,
        name: &str,
        dims: &[u64],
        ggml_type: GgmlType,
    ) -> Result<u64, GgufError> {
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(invalid(format!("duplicate tensor name {name:?}")));
        }
        if dims.len() > MAX_DIMS as usize {
            return Err(invalid(format!(
                "tensor {name:?} has {} dimensions, at most {MAX_DIMS} allowed",
                dims.len()
            )));
        }
        if dims.iter().any(|&d| d > i64::MAX as u64) {
            return Err(invalid(format!(
                "tensor {name:?} has a dimension above i64::MAX"
            )));
        }
        ggml_type.tensor_bytes(dims).ok_or_else(|| {
            invalid(format!(
                "tensor {name:?}: {ggml_type} {dims:?} is not a whole number of blocks or \
                 overflows"
            ))
        })
    }

    /// Adds a tensor with its raw data, which must be exactly the size its type and shape
    /// imply. `dims` is in ggml order (`dims[0]` contiguous).
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        ggml_type: GgmlType,
        data: Vec<u8>,
    ) -> Result<&mut Self, GgufError> {
        let name = name.into();
        let n_bytes = self.check_tensor(&name, dims, ggml_type)?;
        if data.len() as u64 != n_bytes {
            return Err(invalid(format!(
                "tensor {name:?}: {ggml_type} {dims:?} needs {n_bytes} bytes, got {}",
                data.len()
            )));
        }
        self.tensors.push(PendingTensor {
            name,
            dims: dims.to_vec(),
            ggml_type,
            n_bytes,
            data: TensorData::Bytes(data),
        });
        Ok(self)
    }

    /// Adds an F32 tensor from values.
    pub fn add_tensor_f32(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        values: &[f32],
    ) -> Result<&mut Self, GgufError> {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.add_tensor(name, dims, GgmlType::F32, data)
    }

    /// Adds an F16 tensor from `f32` values (rounded to nearest half).
    pub fn add_tensor_f16(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        values: &[f32],
    ) -> Result<&mut Self, GgufError> {
        let data = values
            .iter()
            .flat_map(|&v| f32_to_f16_bits(v).to_le_bytes())
            .collect();
        self.add_tensor(name, dims, GgmlType::F16, data)
    }

    /// Declares a tensor whose data is all zero bytes, of any type. It takes no memory here,
    /// and [`GgufWriter::write_file`] leaves it as a hole in a sparse file.
    pub fn add_tensor_zeroed(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        ggml_type: GgmlType,
    ) -> Result<&mut Self, GgufError> {
        let name = name.into();
        let n_bytes = self.check_tensor(&name, dims, ggml_type)?;
        self.tensors.push(PendingTensor {
            name,
            dims: dims.to_vec(),
            ggml_type,
            n_bytes,
            data: TensorData::Zeroed,
        });
        Ok(self)
    }

    /// Number of metadata pairs added so far.
    pub fn metadata_count(&self) -> usize {
        self.metadata.len()
    }

    /// Number of tensors added so far.
    pub fn tensor_count(&self) -> usize {
        self.tensors.len()
    }

    /// The header (magic to the aligned start of the data section) and each tensor's padded
    /// data size.
    fn layout(&self) -> Result<(Vec<u8>, Vec<u64>, u64), GgufError> {
        let mut h = Vec::new();
        h.extend_from_slice(&GGUF_MAGIC);
        h.extend_from_slice(&WRITER_VERSION.to_le_bytes());
        h.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        h.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_string(&mut h, key);
            h.extend_from_slice(&value.value_type().id().to_le_bytes());
            encode_value(&mut h, key, value)?;
        }
        let mut padded = Vec::with_capacity(self.tensors.len());
        let mut offset = 0u64;
        for t in &self.tensors {
            put_string(&mut h, &t.name);
            h.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                h.extend_from_slice(&d.to_le_bytes());
            }
            h.extend_from_slice(&t.ggml_type.id().to_le_bytes());
            h.extend_from_slice(&offset.to_le_bytes());
            let size = t
                .n_bytes
                .checked_next_multiple_of(self.alignment)
                .ok_or_else(|| invalid("tensor data size overflows"))?;
            padded.push(size);
            offset = offset
                .checked_add(size)
                .ok_or_else(|| invalid("tensor data size overflows"))?;
        }
        let header_len = (h.len() as u64).next_multiple_of(self.alignment);
        h.resize(header_len as usize, 0);
        let total = header_len
            .checked_add(offset)
            .ok_or_else(|| invalid("file size overflows"))?;
        Ok((h, padded, total))
    }

    /// Length of the file [`GgufWriter::write_to`] would write.
    pub fn file_len(&self) -> Result<u64, GgufError> {
        Ok(self.layout()?.2)
    }

    /// Writes the whole file to `w` (zeroed tensors as literal zeros); returns its length.
    pub fn write_to(&self, w: &mut impl Write) -> Result<u64, GgufError> {
        let (header, padded, total) = self.layout()?;
        w.write_all(&header)?;
        for (t, &size) in self.tensors.iter().zip(&padded) {
            match &t.data {
                TensorData::Bytes(b) => {
                    w.write_all(b)?;
                    write_zeros(w, size - t.n_bytes)?;
                }
                TensorData::Zeroed => write_zeros(w, size)?,
            }
        }
        Ok(total)
    }

    /// The whole file in memory.
    pub fn to_bytes(&self) -> Result<Vec<u8>, GgufError> {
        let total = self.file_len()?;
        let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
        self.write_to(&mut out)?;
        Ok(out)
    }

    /// Writes the file at `path` (created or truncated); zeroed tensors become holes on
    /// filesystems with sparse files. Returns the file's length.
    pub fn write_file(&self, path: impl AsRef<Path>) -> Result<u64, GgufError> {
        let (header, padded, total) = self.layout()?;
        let mut w = BufWriter::with_capacity(1 << 20, File::create(path)?);
        w.write_all(&header)?;
        for (t, &size) in self.tensors.iter().zip(&padded) {
            match &t.data {
                TensorData::Bytes(b) => {
                    w.write_all(b)?;
                    let pad = (size - t.n_bytes) as usize;
                    w.write_all(&vec![0u8; pad])?;
                }
                TensorData::Zeroed => {
                    let skip = i64::try_from(size).map_err(|_| invalid("tensor too large"))?;
                    w.seek(SeekFrom::Current(skip))?;
                }
            }
        }
        let file = w.into_inner().map_err(|e| GgufError::Io(e.into_error()))?;
        file.set_len(total)?;
        Ok(total)
    }
}

fn write_zeros(w: &mut impl Write, mut n: u64) -> io::Result<()> {
    let zeros = [0u8; 8 * 1024];
    while n > 0 {
        let k = n.min(zeros.len() as u64) as usize;
        w.write_all(&zeros[..k])?;
        n -= k as u64;
    }
    Ok(())
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn check_writable(key: &str, value: &MetadataValue) -> Result<(), GgufError> {
    if let MetadataValue::Array(a) = value {
        let values = a.values().ok_or_else(|| {
            invalid(format!(
                "metadata {key:?}: array values were skipped by the reader and cannot be written"
            ))
        })?;
        for v in values {
            check_writable(key, v)?;
        }
    }
    Ok(())
}

fn encode_value(out: &mut Vec<u8>, key: &str, v: &MetadataValue) -> Result<(), GgufError> {
    match v {
        MetadataValue::U8(x) => out.push(*x),
        MetadataValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetadataValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetadataValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetadataValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetadataValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetadataValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetadataValue::Bool(x) => out.push(u8::from(*x)),
        MetadataValue::String(s) => put_string(out, s),
        MetadataValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetadataValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetadataValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetadataValue::Array(a) => {
            let values = a.values().ok_or_else(|| {
                invalid(format!("metadata {key:?}: array values are not available"))
            })?;
            out.extend_from_slice(&a.element_type().id().to_le_bytes());
            out.extend_from_slice(&(values.len() as u64).to_le_bytes());
            for x in values {
                if x.value_type() != a.element_type() {
                    return Err(invalid(format!("metadata {key:?}: mixed-type array")));
                }
                encode_value(out, key, x)?;
            }
        }
    }
    Ok(())
}
