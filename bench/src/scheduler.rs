//! Lease round trips: `AcquireLease` (until granted) + `ReleaseLease` over gRPC on loopback, at
//! concurrency 1 and 64, against the same loop run directly on the in-process actor handle.
//!
//! The scheduler runs in this process (real tonic server, real loopback TCP, one simulated 1 TiB
//! GPU so every request fits); clients spread over `--connections` HTTP/2 connections.

use std::time::{Duration, Instant};

use securellm_common::internal_auth::{AuthChannel, InternalToken, authenticated};
use securellm_proto::v1 as pb;
use securellm_proto::v1::acquire_lease_update::Update;
use securellm_proto::v1::vram_scheduler_client::VramSchedulerClient;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use vram_scheduler::actor::SchedulerHandle;
use vram_scheduler::config::{InventoryMode, SchedulerConfig};
use vram_scheduler::table::{AcquireOutcome, AcquireRequest};

use crate::stats::Samples;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds per measured run.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// HTTP/2 connections the gRPC clients share.
    #[arg(long, default_value_t = 4)]
    connections: usize,
}

async fn grpc_round_trip(c: &mut VramSchedulerClient<AuthChannel>, i: usize) -> anyhow::Result<()> {
    let mut s = c
        .acquire_lease(pb::AcquireLeaseRequest {
            holder: format!("bench-{i}"),
            bytes: 1 << 20,
            priority: 0,
            gpu_index: None,
            ttl_ms: 60_000,
            wait_ms: 0,
            label: String::new(),
        })
        .await?
        .into_inner();
    let mut id = None;
    while let Some(u) = s.next().await {
        if let Some(Update::Granted(l)) = u?.update {
            id = Some(l.id);
        }
    }
    let id = id.ok_or_else(|| anyhow::anyhow!("no grant"))?;
    c.release_lease(pb::ReleaseLeaseRequest { lease_id: id })
        .await?;
    Ok(())
}

async fn inproc_round_trip(h: &SchedulerHandle, i: usize) -> anyhow::Result<()> {
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let out = h
        .acquire(
            AcquireRequest {
                holder: format!("bench-{i}"),
                label: String::new(),
                bytes: 1 << 20,
                priority: 0,
                gpu: None,
                ttl_ms: 60_000,
                wait_ms: 0,
            },
            tx,
        )
        .await?;
    let AcquireOutcome::Granted(l) = out else {
        anyhow::bail!("not granted");
    };
    h.release(l.id).await?;
    Ok(())
}

/// Run `concurrency` loops of `op` for `dur`; collect every round trip's latency.
async fn measure<F, Fut>(concurrency: usize, dur: Duration, op: F) -> anyhow::Result<Samples>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let start = Instant::now();
    let deadline = start + dur;
    let mut tasks = Vec::new();
    for i in 0..concurrency {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                op(i).await?;
                lat.push(t.elapsed().as_secs_f64() * 1e6);
            }
            anyhow::Ok(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(Samples::new(all, start.elapsed()))
}

fn row(name: &str, c: usize, s: &Samples) {
    println!(
        "{name:<10} c={c:<3} ops={:<8} ops/s={:<10.0} p50={:<8.1}us p99={:<8.1}us",
        s.latencies_us.len(),
        s.ops_per_s(),
        s.percentile(50.0),
        s.percentile(99.0)
    );
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    // As deployed: every call carries the internal token and the server checks it.
    let token = InternalToken::generate();
    let cfg = SchedulerConfig {
        listen: "127.0.0.1:0".into(),
        inventory: InventoryMode::Simulated,
        simulate_gpus: vec![securellm_common::ByteSize(1 << 40)],
        internal_token: Some(token.clone()),
        ..SchedulerConfig::default()
    };
    let server = vram_scheduler::start(&cfg).await?;
    let url = format!("http://{}", server.addr);
    let mut clients = Vec::new();
    for _ in 0..a.connections.max(1) {
        clients.push(VramSchedulerClient::new(authenticated(
            Channel::from_shared(url.clone())?
                .tcp_nodelay(true)
                .connect()
                .await?,
            Some(&token),
        )));
    }
    let dur = Duration::from_secs_f64(a.seconds);
    let grpc = |clients: Vec<VramSchedulerClient<AuthChannel>>| {
        move |i: usize| {
            let mut c = clients[i % clients.len()].clone();
            async move { grpc_round_trip(&mut c, i).await }
        }
    };
    println!(
        "scheduler benchmark: acquire+release round trips, {} s per run, {} connection(s)",
        a.seconds,
        clients.len()
    );
    // Warm up connections and the actor.
    measure(8, Duration::from_millis(300), grpc(clients.clone())).await?;
    let g1 = measure(1, dur, grpc(clients.clone())).await?;
    row("grpc", 1, &g1);
    let g64 = measure(64, dur, grpc(clients.clone())).await?;
    row("grpc", 64, &g64);
    let h = server.handle.clone();
    let inproc = move |i: usize| {
        let h = h.clone();
        async move { inproc_round_trip(&h, i).await }
    };
    let i1 = measure(1, dur, inproc.clone()).await?;
    row("in-proc", 1, &i1);
    let i64 = measure(64, dur, inproc).await?;
    row("in-proc", 64, &i64);
    let st = server.handle.status().await?;
    anyhow::ensure!(
        st.leases.is_empty(),
        "benchmark leaked {} lease(s)",
        st.leases.len()
    );
    server.shutdown().await;
    println!(
        "RESULT grpc_p50_us={:.1} grpc_p99_us={:.1} grpc_ops_per_s={:.0} inproc_ops_per_s={:.0} grpc_c1_p50_us={:.1} grpc_c1_p99_us={:.1} inproc_p99_us={:.1} inproc_vs_grpc_x={:.1}",
        g64.percentile(50.0),
        g64.percentile(99.0),
        g64.ops_per_s(),
        i64.ops_per_s(),
        g1.percentile(50.0),
        g1.percentile(99.0),
        i64.percentile(99.0),
        i64.ops_per_s() / g64.ops_per_s().max(1e-9)
    );
    Ok(())
}
