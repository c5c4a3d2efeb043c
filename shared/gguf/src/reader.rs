//! The GGUF header reader: metadata and tensor infos, never tensor data.
//!
//! Model files arrive from users and registries, so the reader treats every byte as hostile.
//! It learns the file length once at the start and checks every count, length and offset
//! against what the rest of the file could actually hold before it allocates or loops, so a
//! header claiming 2^60 tensors or a 2^40-byte string fails at once with an error naming the
//! field and its byte offset. Arithmetic is checked, array nesting is bounded, and large
//! arrays (the 32k–150k-entry token lists) are skipped with `BufReader::seek_relative` and kept
//! only as element type and length, so a header scan costs memory proportional to the small
//! metadata, not to the vocabulary.
//!
//! Format (GGUF v2/v3, little-endian): `"GGUF"`, `u32` version, `u64` tensor count, `u64`
//! metadata count, the key/value pairs (`u64`-length strings), the tensor infos (name, `u32`
//! dimension count, `u64` dims, `u32` ggml type, `u64` offset relative to the data section),
//! padding to `general.alignment` (default 32), then the tensor data. v1 used `u32` counts and
//! lengths and is rejected; v2 and v3 share one layout (v3 only allows big-endian files, which
//! are detected by their byte-swapped version and rejected).
//!
//! Text: metadata keys and tensor names must be valid UTF-8 (an error otherwise, since they
//! are looked up by name); string *values* are converted lossily (invalid bytes become U+FFFD)
//! so that a badly encoded model name does not make an otherwise loadable model unreadable.
//! Strings inside skipped arrays are not decoded at all.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use crate::error::GgufError;
use crate::types::{GgmlType, MetadataArray, MetadataValue, ValueType, removed_ggml_type_name};

/// The magic bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section and of each tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's `GGML_MAX_DIMS`: a tensor has at most this many dimensions.
pub const MAX_DIMS: u32 = 4;
/// Smallest encoding of one tensor info: name length, dim count, type, offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8;
/// Smallest encoding of one metadata pair: key length, value type, a one-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Largest `general.alignment` accepted (1 GiB).
const MAX_ALIGNMENT: u64 = 1 << 30;
/// Buffer size for file reading; big enough that skipping short token strings stays in it.
const BUF_CAPACITY: usize = 64 * 1024;

/// Bounds the reader applies on top of "must fit in the file". The defaults accept every real
/// model seen so far while keeping a hostile header's cost to a few megabytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadLimits {
    /// Most tensor infos accepted (real models have hundreds to a few thousand).
    pub max_tensors: u64,
    /// Most metadata pairs accepted (real models have tens).
    pub max_metadata: u64,
    /// Longest metadata key, in bytes.
    pub max_key_len: u64,
    /// Longest tensor name, in bytes (ggml itself allows 63).
    pub max_tensor_name_len: u64,
    /// Longest string value that is kept (chat templates are tens of kilobytes).
    pub max_string_len: u64,
    /// Deepest array nesting (an array of arrays is depth 2).
    pub max_array_depth: u32,
    /// Arrays of fixed-size elements (numbers, bools) up to this length are kept with their
    /// values (per-layer arrays); longer ones are skipped.
    pub keep_numeric_array_max: u64,
    /// Arrays of strings or arrays up to this length are kept; longer ones are skipped.
    pub keep_other_array_max: u64,
    /// Budget, in bytes, for all metadata kept in memory (values and string contents).
    pub max_kept_metadata_bytes: u64,
}

impl Default for ReadLimits {
    fn default() -> Self {
        Self {
            max_tensors: 1 << 20,
            max_metadata: 1 << 16,
            max_key_len: 1 << 16,
            max_tensor_name_len: 1024,
            max_string_len: 16 << 20,
            max_array_depth: 8,
            keep_numeric_array_max: 4096,
            keep_other_array_max: 64,
            max_kept_metadata_bytes: 64 << 20,
        }
    }
}

/// One tensor's description from the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in ggml order (`dims[0]` is contiguous); at most [`MAX_DIMS`].
    pub dims: Vec<u64>,
    /// Data type.
    pub ggml_type: GgmlType,
    /// Offset of the data relative to the start of the data section (as stored).
    pub offset: u64,
    /// Absolute offset of the data in the file.
    pub file_offset: u64,
    /// Number of elements (product of `dims`).
    pub n_elements: u64,
    /// Bytes of data, from the type's block size.
    pub n_bytes: u64,
}

/// A parsed GGUF header: version, metadata, tensor infos and the data layout.
///
/// Built only by the reader, so its invariants hold: keys and tensor names are unique, every
/// tensor's data lies inside the file, is aligned, and does not overlap another's.
#[derive(Debug, Clone)]
pub struct GgufHeader {
    version: u32,
    file_len: u64,
    alignment: u64,
    data_offset: u64,
    metadata: Vec<(String, MetadataValue)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl GgufHeader {
    /// Reads the header of the GGUF file at `path` with default limits.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        Self::open_with(path, &ReadLimits::default())
    }

    /// Reads the header of the GGUF file at `path`. Only a regular file is opened: a FIFO would
    /// block the open until some writer came, a device has no header. (Callers that must also
    /// confine the path, like the registry, open the file themselves and use [`GgufHeader::read`].)
    pub fn open_with(path: impl AsRef<Path>, limits: &ReadLimits) -> Result<Self, GgufError> {
        let path = path.as_ref();
        let not_regular = || {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file", path.display()),
            )
        };
        if !std::fs::metadata(path)?.is_file() {
            return Err(not_regular().into());
        }
        let file = File::open(path)?;
        let md = file.metadata()?;
        if !md.is_file() {
            return Err(not_regular().into());
        }
        let len = md.len();
        let mut source = BufReader::with_capacity(BUF_CAPACITY, file);
        parse(&mut source, len, limits)
    }

    /// Reads a header from `reader`, which must be positioned at the start of the GGUF data;
    /// offsets are relative to that position and the data is taken to run to the end of the
    /// stream (found with one seek to the end). The reader is wrapped in a `BufReader`.
    pub fn read(reader: impl Read + Seek) -> Result<Self, GgufError> {
        Self::read_with(reader, &ReadLimits::default())
    }

    /// [`GgufHeader::read`] with explicit limits.
    pub fn read_with(mut reader: impl Read + Seek, limits: &ReadLimits) -> Result<Self, GgufError> {
        let start = reader.stream_position()?;
        let end = reader.seek(SeekFrom::End(0))?;
        reader.seek(SeekFrom::Start(start))?;
        let len = end.saturating_sub(start);
        let mut source = BufReader::with_capacity(BUF_CAPACITY, reader);
        parse(&mut source, len, limits)
    }

    /// Reads a header from an in-memory file.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, GgufError> {
        Self::from_bytes_with(bytes, &ReadLimits::default())
    }

    /// [`GgufHeader::from_bytes`] with explicit limits.
    pub fn from_bytes_with(bytes: &[u8], limits: &ReadLimits) -> Result<Self, GgufError> {
        let mut source = SliceSource {
            data: bytes,
            pos: 0,
        };
        parse(&mut source, bytes.len() as u64, limits)
    }

    /// GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Length of the file (or stream, from the start position) in bytes.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Data alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute offset of the tensor data section (end of header, aligned up).
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// All metadata pairs in file order.
    pub fn metadata(&self) -> &[(String, MetadataValue)] {
        &self.metadata
    }

    /// The value of a metadata key.
    pub fn get(&self, key: &str) -> Option<&MetadataValue> {
        self.metadata_index
            .get(key)
            .and_then(|&i| self.metadata.get(i))
            .map(|(_, v)| v)
    }

    /// A string value, if the key exists and holds a string.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(MetadataValue::as_str)
    }

    /// A non-negative integer value of any width, if the key exists and holds one.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(MetadataValue::as_u64)
    }

    /// All tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor info with this name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index
            .get(name)
            .and_then(|&i| self.tensors.get(i))
    }

    /// Sum of all tensors' data bytes (what llama.cpp reports as model buffer size, when all
    /// weights go to one device). Never more than the file length.
    pub fn total_tensor_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.n_bytes).sum()
    }
}

/// Where the parser gets bytes from: a buffered file/stream or a byte slice.
trait Source {
    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()>;
    /// Skips `n` bytes; the caller has checked they exist.
    fn skip(&mut self, n: u64) -> io::Result<()>;
}

impl<R: Read + Seek> Source for BufReader<R> {
    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        Read::read_exact(self, buf)
    }

    fn skip(&mut self, n: u64) -> io::Result<()> {
        let n = i64::try_from(n).map_err(|_| io::Error::other("skip distance exceeds i64"))?;
        self.seek_relative(n)
    }
}

struct SliceSource<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Source for SliceSource<'_> {
    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let end = self
            .pos
            .checked_add(buf.len())
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(&self.data[self.pos..end]);
        self.pos = end;
        Ok(())
    }

    fn skip(&mut self, n: u64) -> io::Result<()> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.pos.checked_add(n))
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        self.pos = end;
        Ok(())
    }
}

/// Cursor over a [`Source`] that knows the file length and its own position.
struct Parser<'a, S: Source> {
    src: &'a mut S,
    pos: u64,
    len: u64,
    limits: &'a ReadLimits,
    kept_bytes: u64,
}

impl<S: Source> Parser<'_, S> {
    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn need(&self, n: u64, what: &'static str) -> Result<(), GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                what,
                offset: self.pos,
                needed: n,
                file_len: self.len,
            });
        }
        Ok(())
    }

    fn map_io(&self, e: io::Error, what: &'static str, needed: u64) -> GgufError {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            // The file shrank under us, or the stream was shorter than its seek end.
            GgufError::Truncated {
                what,
                offset: self.pos,
                needed,
                file_len: self.len,
            }
        } else {
            GgufError::Io(e)
        }
    }

    fn bytes<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        self.need(N as u64, what)?;
        let mut buf = [0u8; N];
        self.src
            .read_exact(&mut buf)
            .map_err(|e| self.map_io(e, what, N as u64))?;
        self.pos += N as u64;
        Ok(buf)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }

    fn skip(&mut self, n: u64, what: &'static str) -> Result<(), GgufError> {
        self.need(n, what)?;
        self.src.skip(n).map_err(|e| self.map_io(e, what, n))?;
        self.pos += n;
        Ok(())
    }

    /// Reads `n` bytes that the caller has bounded by a limit.
    fn vec(&mut self, n: u64, what: &'static str) -> Result<Vec<u8>, GgufError> {
        self.need(n, what)?;
        let size = usize::try_from(n).map_err(|_| GgufError::Truncated {
            what,
            offset: self.pos,
            needed: n,
            file_len: self.len,
        })?;
        let mut buf = vec![0u8; size];
        self.src
            .read_exact(&mut buf)
            .map_err(|e| self.map_io(e, what, n))?;
        self.pos += n;
        Ok(buf)
    }

    fn charge(&mut self, bytes: u64, what: &'static str) -> Result<(), GgufError> {
        let total = self.kept_bytes.saturating_add(bytes);
        if total > self.limits.max_kept_metadata_bytes {
            return Err(GgufError::LimitExceeded {
                what,
                offset: self.pos,
                value: total,
                limit: self.limits.max_kept_metadata_bytes,
            });
        }
        self.kept_bytes = total;
        Ok(())
    }

    fn check_count(
        &self,
        count: u64,
        min_each: u64,
        what: &'static str,
        offset: u64,
    ) -> Result<(), GgufError> {
        let max_possible = self.remaining() / min_each.max(1);
        if count > max_possible {
            return Err(GgufError::CountTooLarge {
                what,
                offset,
                count,
                remaining: self.remaining(),
                max_possible,
            });
        }
        Ok(())
    }

    /// Reads a length-prefixed string's raw bytes, bounded by `max_len`.
    fn string_bytes(
        &mut self,
        max_len: u64,
        what: &'static str,
    ) -> Result<(Vec<u8>, u64), GgufError> {
        let len_offset = self.pos;
        let len = self.u64(what)?;
        if len > max_len {
            return Err(GgufError::LimitExceeded {
                what,
                offset: len_offset,
                value: len,
                limit: max_len,
            });
        }
        let data_offset = self.pos;
        Ok((self.vec(len, what)?, data_offset))
    }

    /// A key or tensor name: must be valid UTF-8.
    fn name(&mut self, max_len: u64, what: &'static str) -> Result<String, GgufError> {
        let (bytes, offset) = self.string_bytes(max_len, what)?;
        String::from_utf8(bytes).map_err(|_| GgufError::InvalidUtf8 { what, offset })
    }

    /// A string value: invalid UTF-8 is replaced.
    fn value_string(&mut self) -> Result<String, GgufError> {
        let (bytes, _) = self.string_bytes(self.limits.max_string_len, "string value")?;
        self.charge(bytes.len() as u64, "kept metadata bytes")?;
        Ok(match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    fn value_type(&mut self, what: &'static str) -> Result<ValueType, GgufError> {
        let offset = self.pos;
        let id = self.u32(what)?;
        ValueType::from_id(id).ok_or(GgufError::UnknownValueType {
            type_id: id,
            offset,
        })
    }

    /// Reads one value of type `ty`; `depth` is the array nesting level of the value.
    fn value(&mut self, ty: ValueType, depth: u32) -> Result<MetadataValue, GgufError> {
        Ok(match ty {
            ValueType::U8 => MetadataValue::U8(u8::from_le_bytes(self.bytes("u8 value")?)),
            ValueType::I8 => MetadataValue::I8(i8::from_le_bytes(self.bytes("i8 value")?)),
            ValueType::U16 => MetadataValue::U16(u16::from_le_bytes(self.bytes("u16 value")?)),
            ValueType::I16 => MetadataValue::I16(i16::from_le_bytes(self.bytes("i16 value")?)),
            ValueType::U32 => MetadataValue::U32(u32::from_le_bytes(self.bytes("u32 value")?)),
            ValueType::I32 => MetadataValue::I32(i32::from_le_bytes(self.bytes("i32 value")?)),
            ValueType::F32 => MetadataValue::F32(f32::from_le_bytes(self.bytes("f32 value")?)),
            ValueType::U64 => MetadataValue::U64(u64::from_le_bytes(self.bytes("u64 value")?)),
            ValueType::I64 => MetadataValue::I64(i64::from_le_bytes(self.bytes("i64 value")?)),
            ValueType::F64 => MetadataValue::F64(f64::from_le_bytes(self.bytes("f64 value")?)),
            // Any non-zero byte is true (llama.cpp does not check either).
            ValueType::Bool => MetadataValue::Bool(self.bytes::<1>("bool value")?[0] != 0),
            ValueType::String => MetadataValue::String(self.value_string()?),
            ValueType::Array => MetadataValue::Array(self.array(depth + 1)?),
        })
    }

    /// Reads an array at nesting level `depth` (1 for a top-level array value).
    fn array(&mut self, depth: u32) -> Result<MetadataArray, GgufError> {
        let start = self.pos;
        if depth > self.limits.max_array_depth {
            return Err(GgufError::NestingTooDeep {
                offset: start,
                limit: self.limits.max_array_depth,
            });
        }
        let (elem, n) = self.array_prefix()?;
        let keep_max = if elem.fixed_size().is_some() {
            self.limits.keep_numeric_array_max
        } else {
            self.limits.keep_other_array_max
        };
        if n > keep_max {
            self.skip_values(elem, n, depth)?;
            return Ok(MetadataArray::skipped(elem, n));
        }
        let value_size = std::mem::size_of::<MetadataValue>() as u64;
        self.charge(n.saturating_mul(value_size), "kept metadata bytes")?;
        // n <= keep_max and n fits in the file: the allocation is bounded.
        let mut values = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
        for _ in 0..n {
            values.push(self.value(elem, depth)?);
        }
        Ok(MetadataArray::from_parts(elem, n, Some(values)))
    }

    /// Reads an array's element type and length and checks the length fits in the file.
    fn array_prefix(&mut self) -> Result<(ValueType, u64), GgufError> {
        let elem = self.value_type("array element type")?;
        let len_offset = self.pos;
        let n = self.u64("array length")?;
        self.check_count(n, elem.min_encoded_size(), "array length", len_offset)?;
        Ok((elem, n))
    }

    /// Skips `n` values of type `elem` that belong to an array at nesting level `depth`.
    fn skip_values(&mut self, elem: ValueType, n: u64, depth: u32) -> Result<(), GgufError> {
        if let Some(size) = elem.fixed_size() {
            // check_count already showed n * size fits in the file.
            let total = n.checked_mul(size).ok_or(GgufError::Truncated {
                what: "skipped array",
                offset: self.pos,
                needed: u64::MAX,
                file_len: self.len,
            })?;
            return self.skip(total, "skipped array values");
        }
        for _ in 0..n {
            match elem {
                ValueType::String => {
                    let len = self.u64("string length in skipped array")?;
                    self.skip(len, "string in skipped array")?;
                }
                _ => {
                    let start = self.pos;
                    if depth + 1 > self.limits.max_array_depth {
                        return Err(GgufError::NestingTooDeep {
                            offset: start,
                            limit: self.limits.max_array_depth,
                        });
                    }
                    let (inner, inner_n) = self.array_prefix()?;
                    self.skip_values(inner, inner_n, depth + 1)?;
                }
            }
        }
        Ok(())
    }

    fn tensor_info(&mut self, alignment: u64) -> Result<(TensorInfo, u64), GgufError> {
        let start = self.pos;
        let name = self.name(self.limits.max_tensor_name_len, "tensor name")?;
        let invalid = |reason: String| GgufError::InvalidTensor {
            name: name.clone(),
            offset: start,
            reason,
        };
        let n_dims = self.u32("tensor dimension count")?;
        if n_dims > MAX_DIMS {
            return Err(invalid(format!(
                "{n_dims} dimensions, ggml allows at most {MAX_DIMS}"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for i in 0..n_dims {
            let d = self.u64("tensor dimension")?;
            if d > i64::MAX as u64 {
                return Err(invalid(format!("dimension {i} is {d}, above i64::MAX")));
            }
            dims.push(d);
        }
        let n_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| invalid(format!("element count of shape {dims:?} overflows")))?;
        let type_offset = self.pos;
        let type_id = self.u32("tensor type")?;
        let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownGgmlType {
            name: name.clone(),
            offset: type_offset,
            type_id,
            reason: match removed_ggml_type_name(type_id) {
                Some(old) => format!("ggml type id {type_id} ({old}), which ggml has removed"),
                None => format!("unknown ggml type id {type_id}"),
            },
        })?;
        let block = ggml_type.block_size();
        if dims.first().copied().unwrap_or(1) % block != 0 {
            return Err(invalid(format!(
                "first dimension of shape {dims:?} is not a multiple of the {ggml_type} block \
                 size {block}"
            )));
        }
        let n_bytes = ggml_type
            .tensor_bytes(&dims)
            .ok_or_else(|| invalid(format!("byte size of {ggml_type} {dims:?} overflows")))?;
        let offset = self.u64("tensor data offset")?;
        if offset % alignment != 0 {
            return Err(invalid(format!(
                "data offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        Ok((
            TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
                file_offset: 0,
                n_elements,
                n_bytes,
            },
            start,
        ))
    }
}

fn parse<S: Source>(src: &mut S, len: u64, limits: &ReadLimits) -> Result<GgufHeader, GgufError> {
    let mut p = Parser {
        src,
        pos: 0,
        len,
        limits,
        kept_bytes: 0,
    };

    // Magic and version.
    if len < 4 {
        let mut found = vec![0u8; len as usize];
        p.src.read_exact(&mut found)?;
        return Err(GgufError::BadMagic { found });
    }
    let magic: [u8; 4] = p.bytes("magic")?;
    if magic != GGUF_MAGIC {
        return Err(GgufError::BadMagic {
            found: magic.to_vec(),
        });
    }
    let version = p.u32("version")?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(GgufError::UnsupportedVersion {
                version,
                reason: "GGUF v1 (32-bit counts and lengths) is obsolete; re-convert the model \
                         with a current llama.cpp",
            });
        }
        v if v & 0xffff == 0 && v != 0 => {
            return Err(GgufError::BigEndian {
                version: v.swap_bytes(),
            });
        }
        _ => {
            return Err(GgufError::UnsupportedVersion {
                version,
                reason: "only versions 2 and 3 are known",
            });
        }
    }

    // Counts, each bounded by what the rest of the file can hold.
    let tensor_count_offset = p.pos;
    let tensor_count = p.u64("tensor count")?;
    let kv_count_offset = p.pos;
    let kv_count = p.u64("metadata count")?;
    if tensor_count > limits.max_tensors {
        return Err(GgufError::LimitExceeded {
            what: "tensor count",
            offset: tensor_count_offset,
            value: tensor_count,
            limit: limits.max_tensors,
        });
    }
    if kv_count > limits.max_metadata {
        return Err(GgufError::LimitExceeded {
            what: "metadata count",
            offset: kv_count_offset,
            value: kv_count,
            limit: limits.max_metadata,
        });
    }
    p.check_count(kv_count, MIN_KV_BYTES, "metadata count", kv_count_offset)?;
    p.check_count(
        tensor_count,
        MIN_TENSOR_INFO_BYTES,
        "tensor count",
        tensor_count_offset,
    )?;
    let min_rest = kv_count
        .saturating_mul(MIN_KV_BYTES)
        .saturating_add(tensor_count.saturating_mul(MIN_TENSOR_INFO_BYTES));
    if min_rest > p.remaining() {
        return Err(GgufError::CountTooLarge {
            what: "metadata and tensor counts together",
            offset: tensor_count_offset,
            count: kv_count.saturating_add(tensor_count),
            remaining: p.remaining(),
            max_possible: p.remaining() / MIN_KV_BYTES,
        });
    }

    // Metadata.
    let cap = |n: u64| usize::try_from(n.min(1024)).unwrap_or(0);
    let mut metadata = Vec::with_capacity(cap(kv_count));
    let mut metadata_index = HashMap::with_capacity(cap(kv_count));
    for _ in 0..kv_count {
        let start = p.pos;
        let key = p.name(limits.max_key_len, "metadata key")?;
        if key.is_empty() {
            return Err(GgufError::InvalidMetadata {
                key,
                reason: format!("empty key at offset {start}"),
            });
        }
        let ty = p.value_type("metadata value type")?;
        let value = p.value(ty, 0)?;
        if metadata_index.contains_key(&key) {
            return Err(GgufError::DuplicateKey { key, offset: start });
        }
        metadata_index.insert(key.clone(), metadata.len());
        metadata.push((key, value));
    }

    let alignment = match metadata_index
        .get("general.alignment")
        .and_then(|&i| metadata.get(i))
    {
        None => DEFAULT_ALIGNMENT,
        Some((_, v)) => {
            // llama.cpp accepts only u32 here; so do we, to agree on what loads.
            let a = match v {
                MetadataValue::U32(a) => u64::from(*a),
                other => {
                    return Err(GgufError::InvalidAlignment {
                        reason: format!("expected a u32, found {}", other.value_type()),
                    });
                }
            };
            if a == 0 || !a.is_power_of_two() || a > MAX_ALIGNMENT {
                return Err(GgufError::InvalidAlignment {
                    reason: format!("{a} is not a power of two between 1 and {MAX_ALIGNMENT}"),
                });
            }
            a
        }
    };

    // Tensor infos.
    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(cap(tensor_count));
    let mut info_offsets: Vec<u64> = Vec::with_capacity(cap(tensor_count));
    let mut tensor_index = HashMap::with_capacity(cap(tensor_count));
    for _ in 0..tensor_count {
        let (info, start) = p.tensor_info(alignment)?;
        if tensor_index.contains_key(&info.name) {
            return Err(GgufError::DuplicateTensor {
                name: info.name,
                offset: start,
            });
        }
        tensor_index.insert(info.name.clone(), tensors.len());
        tensors.push(info);
        info_offsets.push(start);
    }

    // Data layout: every tensor inside the file, and no two overlapping.
    let data_offset =
        p.pos
            .checked_next_multiple_of(alignment)
            .ok_or(GgufError::InvalidAlignment {
                reason: "data section offset overflows".to_owned(),
            })?;
    for (t, &start) in tensors.iter_mut().zip(&info_offsets) {
        let end = data_offset
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.n_bytes));
        match end {
            Some(end) if end <= len => t.file_offset = data_offset + t.offset,
            _ => {
                return Err(GgufError::InvalidTensor {
                    name: t.name.clone(),
                    offset: start,
                    reason: format!(
                        "data ({} bytes at data offset {} + {}) lies beyond the end of the \
                         {len}-byte file",
                        t.n_bytes, data_offset, t.offset
                    ),
                });
            }
        }
    }
    let mut order: Vec<usize> = (0..tensors.len())
        .filter(|&i| tensors[i].n_bytes > 0)
        .collect();
    order.sort_by_key(|&i| tensors[i].file_offset);
    for pair in order.windows(2) {
        let (a, b) = (&tensors[pair[0]], &tensors[pair[1]]);
        if a.file_offset + a.n_bytes > b.file_offset {
            return Err(GgufError::InvalidTensor {
                name: b.name.clone(),
                offset: info_offsets[pair[1]],
                reason: format!("data overlaps that of tensor {:?}", a.name),
            });
        }
    }

    Ok(GgufHeader {
        version,
        file_len: len,
        alignment,
        data_offset,
        metadata,
        metadata_index,
        tensors,
        tensor_index,
    })
}
