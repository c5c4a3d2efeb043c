//! GGUF model files for SecureLLM: a header reader that is safe on hostile input, model facts
//! for scheduling and cataloguing, a writer, and deterministic test models.
//!
//! * [`GgufHeader`] reads GGUF v2/v3 metadata and tensor infos (never tensor data), bounding
//!   every allocation by what the file can hold; see the [`reader`] module docs.
//! * [`ModelInfo`] distils architecture, shape, quantization, vocabulary and per-layer tensor
//!   bytes from a header.
//! * [`GgufWriter`] writes GGUF v3 files.
//! * [`testmodels`] generates a tiny random llama that llama.cpp loads, and small files with
//!   realistic headers for benchmarks.
//!
//! ```
//! use securellm_gguf::{GgufHeader, ModelInfo, testmodels};
//!
//! let bytes = testmodels::tiny_llama(&testmodels::TinyLlamaOptions::default()).unwrap();
//! let header = GgufHeader::from_bytes(&bytes).unwrap();
//! let info = ModelInfo::from_header(&header).unwrap();
//! assert_eq!(info.architecture.as_deref(), Some("llama"));
//! assert_eq!(info.block_count, Some(2));
//! assert_eq!(info.vocab_size, Some(512));
//! ```

pub mod error;
pub mod info;
pub mod reader;
pub mod testmodels;
pub mod types;
pub mod writer;

pub use error::GgufError;
pub use info::{MAX_LAYERS, ModelInfo, SplitInfo};
pub use reader::{DEFAULT_ALIGNMENT, GgufHeader, ReadLimits, TensorInfo};
pub use types::{GgmlType, MetadataArray, MetadataValue, ValueType, file_type_name};
pub use writer::GgufWriter;
