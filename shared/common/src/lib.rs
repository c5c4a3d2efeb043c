//! Pieces every SecureLLM service and tool shares.
//!
//! - [`bytesize`]: human byte sizes (`24GiB`, `512MiB`) for flags, config and output.
//! - [`config`]: one TOML file with a section per service; flags override it, it overrides defaults.
//! - [`telemetry`]: logging to stderr, filtered by `RUST_LOG`.
//! - [`serve`]: binding a gRPC listener, health + reflection, the `ready` line, graceful shutdown.
//! - [`errors`]: one table from gRPC codes to HTTP statuses, machine-readable reasons
//!   (`google.rpc.ErrorInfo`) across service boundaries.
//! - [`internal_auth`]: the internal token every call between SecureLLM's processes carries.
//! - [`sse`]: the one server-sent-events splitter (incremental, bounded).
//! - [`time`]: unix milliseconds, the time unit of every contract.
//! - [`tls`]: the process-wide rustls crypto provider.

pub mod bytesize;
pub mod config;
pub mod errors;
pub mod internal_auth;
pub mod serve;
pub mod sse;
pub mod telemetry;
pub mod time;
pub mod tls;

pub use bytesize::{ByteSize, format_bytes, parse_bytes};
