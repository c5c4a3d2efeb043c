//! The one error type of this crate.
//!
//! Reading untrusted GGUF files is the main source of errors, so the variants say what was
//! wrong and, where it is known, at which byte offset of the file, so that a scan report can
//! point at the bad field.

use std::io;

/// Everything that can go wrong reading or writing a GGUF file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    /// The underlying reader or writer failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),

    /// The file does not start with `GGUF`.
    #[error("not a GGUF file: the first bytes are {found:02x?}, expected \"GGUF\" (47 47 55 46)")]
    BadMagic {
        /// The first four bytes (fewer if the file is shorter).
        found: Vec<u8>,
    },

    /// The version field is byte-swapped: the file was written big-endian.
    #[error(
        "big-endian GGUF (version {version} stored byte-swapped at offset 4) is not supported; \
         only little-endian files can be read"
    )]
    BigEndian {
        /// The version as read big-endian.
        version: u32,
    },

    /// A version this reader does not handle (v1, or a future one).
    #[error("unsupported GGUF version {version} at offset 4: {reason}")]
    UnsupportedVersion {
        /// The version read little-endian.
        version: u32,
        /// Why it is not supported.
        reason: &'static str,
    },

    /// The file ends before a field it declares.
    #[error(
        "truncated file: {what} at offset {offset} needs {needed} bytes but the file is \
         {file_len} bytes long"
    )]
    Truncated {
        /// The field being read.
        what: &'static str,
        /// Where it starts.
        offset: u64,
        /// Bytes it needs.
        needed: u64,
        /// The file's length.
        file_len: u64,
    },

    /// A count field claims more items than the rest of the file could hold.
    #[error(
        "{what} at offset {offset} claims {count} entries, but the {remaining} bytes left in \
         the file can hold at most {max_possible}"
    )]
    CountTooLarge {
        /// The count field.
        what: &'static str,
        /// Where it is.
        offset: u64,
        /// The claimed count.
        count: u64,
        /// Bytes left after the field.
        remaining: u64,
        /// The most entries that fit.
        max_possible: u64,
    },

    /// A value exceeds a configured [`crate::ReadLimits`] bound.
    #[error("{what} at offset {offset} is {value}, above the limit of {limit}")]
    LimitExceeded {
        /// The field.
        what: &'static str,
        /// Where it is.
        offset: u64,
        /// Its value.
        value: u64,
        /// The limit.
        limit: u64,
    },

    /// A metadata key or tensor name is not valid UTF-8.
    #[error("{what} at offset {offset} is not valid UTF-8")]
    InvalidUtf8 {
        /// The field.
        what: &'static str,
        /// Where the string's bytes start.
        offset: u64,
    },

    /// A metadata value type id that gguf does not define.
    #[error("unknown metadata value type id {type_id} at offset {offset}")]
    UnknownValueType {
        /// The id read.
        type_id: u32,
        /// Where it is.
        offset: u64,
    },

    /// Arrays nested deeper than the limit.
    #[error("arrays nested deeper than {limit} levels at offset {offset}")]
    NestingTooDeep {
        /// Where the too-deep array starts.
        offset: u64,
        /// The limit.
        limit: u32,
    },

    /// The same metadata key appears twice.
    #[error("duplicate metadata key {key:?} at offset {offset}")]
    DuplicateKey {
        /// The key.
        key: String,
        /// Where the second occurrence starts.
        offset: u64,
    },

    /// The same tensor name appears twice.
    #[error("duplicate tensor name {name:?} at offset {offset}")]
    DuplicateTensor {
        /// The name.
        name: String,
        /// Where the second tensor info starts.
        offset: u64,
    },

    /// A tensor's type id is unknown or was removed from ggml.
    #[error("tensor {name:?} (info at offset {offset}) has {reason}")]
    UnknownGgmlType {
        /// The tensor.
        name: String,
        /// Where its type id is.
        offset: u64,
        /// The id read.
        type_id: u32,
        /// E.g. "unknown ggml type id 77".
        reason: String,
    },

    /// A tensor info is inconsistent (too many dims, bad shape, misaligned, outside the file).
    #[error("tensor {name:?} (info at offset {offset}): {reason}")]
    InvalidTensor {
        /// The tensor.
        name: String,
        /// Where its info starts.
        offset: u64,
        /// What is wrong.
        reason: String,
    },

    /// `general.alignment` is not a usable alignment.
    #[error("invalid general.alignment: {reason}")]
    InvalidAlignment {
        /// What is wrong.
        reason: String,
    },

    /// A metadata key exists but its value has the wrong type or an impossible value.
    #[error("metadata key {key:?}: {reason}")]
    InvalidMetadata {
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },

    /// The writer or a test-model generator was given inconsistent input.
    #[error("invalid input: {reason}")]
    InvalidInput {
        /// What is wrong.
        reason: String,
    },
}
