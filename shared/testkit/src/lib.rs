//! What SecureLLM's tests share, so that no test file builds its own stack or copies a helper:
//!
//! - [`Stack`]: the services in this process on loopback with real gRPC: a vram-scheduler with
//!   simulated GPUs, a registry over a models directory, a backend manager (the real llama-server
//!   unless the test configures another engine), and with the `gateway` feature the gateway.
//!   Everything lives in one temporary directory and stops when the stack is dropped.
//!
//!   ```text
//!   let s = Stack::new().gpu("1GiB").models(&["tiny", "other"]).internal_token().start().await;
//!   let mut c = s.backend_client().await;                 // presents the internal token
//!   c.chat(chat_request("tiny", 8)).await?;
//!   ```
//! - the engines and interpreters tests need ([`llama_server`], [`python`], [`fake`]);
//! - model writers ([`models`]), process helpers ([`kill9`], [`alive`]), polling ([`wait_until`]),
//!   backend-manager helpers ([`leases`], [`instance`], [`wait_for_instance`], [`stream_start`]);
//! - Prometheus scrapes and `promtool check metrics` ([`prom`]), a span-capturing `tracing` layer
//!   ([`spans`]);
//! - with the `gateway` feature, [`gateway`]: a gateway with no backends, audit rows, API keys.
//!
//! The process-based end-to-end kit (`tests/e2e`, the real binaries) builds on the same helpers.

pub mod models;
pub mod otlp;
mod paths;
pub mod postgres;
mod process;
pub mod prom;
pub mod spans;
mod stack;

#[cfg(feature = "gateway")]
pub mod gateway;

use std::future::Future;
use std::time::{Duration, Instant};

use securellm_common::internal_auth::{AuthChannel, InternalToken, authenticated};
use securellm_proto::v1 as pb;
use securellm_proto::v1::backend_manager_client::BackendManagerClient;
use securellm_proto::v1::vram_scheduler_client::VramSchedulerClient;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

pub use paths::{
    bin_dir, binary, cache_dir, fake, llama_server, python, run_python_client, try_llama_server,
    workspace_root,
};
pub use process::{
    alive, dead_addr, dead_addrs, in_process_table, kill9, ready_word, signal, spawn_ready,
};
pub use stack::{Size, Stack, StackBuilder};

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// A channel to `addr` (`host:port`) whose calls carry `token` (none: open services).
pub async fn connect(addr: impl std::fmt::Display, token: Option<&InternalToken>) -> AuthChannel {
    let ch = Channel::from_shared(format!("http://{addr}"))
        .expect("a gRPC address")
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    authenticated(ch, token)
}

/// Poll `f` every 50 ms until it returns `Some`, or panic naming `what` after `timeout`.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ------------------------------------------------------------------------------------------------
// The backend manager and the scheduler, through their gRPC clients.

/// A chat request for the backend manager: one user message, `max_tokens`, temperature 0.
pub fn chat_request(model: &str, max_tokens: u32) -> pb::InferenceRequest {
    pb::InferenceRequest {
        model: model.into(),
        body_json: serde_json::to_vec(&serde_json::json!({
            "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": max_tokens,
            "temperature": 0
        }))
        .expect("JSON"),
        ..Default::default()
    }
}

/// The scheduler's leases now.
pub async fn leases(s: &mut VramSchedulerClient<AuthChannel>) -> Vec<pb::Lease> {
    s.get_status(pb::GetStatusRequest {})
        .await
        .expect("GetStatus")
        .into_inner()
        .leases
}

/// Whether every lease is gone within about 2 s.
pub async fn no_lease_left(s: &mut VramSchedulerClient<AuthChannel>) -> bool {
    for _ in 0..100 {
        if leases(s).await.is_empty() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Every instance the manager lists.
pub async fn instances(c: &mut BackendManagerClient<AuthChannel>) -> Vec<pb::BackendInstance> {
    c.list_instances(pb::ListInstancesRequest::default())
        .await
        .expect("ListInstances")
        .into_inner()
        .instances
}

/// The instance of `model` (panics when there is none).
pub async fn instance(
    c: &mut BackendManagerClient<AuthChannel>,
    model: &str,
) -> pb::BackendInstance {
    instances(c)
        .await
        .into_iter()
        .find(|i| i.model_name == model)
        .expect("instance")
}

/// Poll the instance of `model` (every 50 ms, 10 s at most) until `f` holds; returns it.
pub async fn wait_for_instance<F: Fn(&pb::BackendInstance) -> bool>(
    c: &mut BackendManagerClient<AuthChannel>,
    model: &str,
    f: F,
) -> pb::BackendInstance {
    for _ in 0..200 {
        let i = instance(c, model).await;
        if f(&i) {
            return i;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "condition not reached for {model}: {:?}",
        instance(c, model).await
    );
}

/// Read a stream until it fails (within `within`): the error that ended it, `None` when it ended
/// without one.
pub async fn stream_error<T>(
    st: &mut tonic::Streaming<T>,
    within: Duration,
) -> Option<tonic::Status> {
    while let Some(c) = tokio::time::timeout(within, st.next())
        .await
        .expect("the stream ended in time")
    {
        if let Err(e) = c {
            return Some(e);
        }
    }
    None
}

/// A stream's `start`, after the `progress` messages a request that waits for its model gets.
pub async fn stream_start(
    st: &mut tonic::Streaming<pb::InferenceChunk>,
) -> (pb::InferenceStreamStart, Vec<pb::LoadProgress>) {
    let mut progress = Vec::new();
    loop {
        let m = st.next().await.expect("a message").expect("no error");
        match (m.start, m.progress) {
            (Some(s), _) => return (s, progress),
            (None, Some(p)) => progress.push(p),
            (None, None) => panic!("data before start"),
        }
    }
}
