//! Rust bindings for the SecureLLM gRPC contracts.
//!
//! The `.proto` files in `proto/securellm/v1/` are the source of truth; this crate only compiles
//! them (see `build.rs`) so that every service and client shares one set of generated types.

#![allow(clippy::all, clippy::pedantic)]

/// Package `securellm.v1`: the scheduler, registry, backend manager and gateway contracts.
pub mod v1 {
    tonic::include_proto!("securellm.v1");
}

/// Encoded `FileDescriptorSet` of every contract, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/securellm_descriptor.bin"));

/// Fully-qualified gRPC service names, as health checks and reflection know them.
pub mod service_names {
    pub const SCHEDULER: &str = "securellm.v1.VramScheduler";
    pub const REGISTRY: &str = "securellm.v1.ModelRegistry";
    pub const BACKEND: &str = "securellm.v1.BackendManager";
    pub const GATEWAY: &str = "securellm.v1.Gateway";
    pub const GATEWAY_ADMIN: &str = "securellm.v1.GatewayAdmin";
}
