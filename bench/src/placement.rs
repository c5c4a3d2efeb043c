//! `securellm-bench placement`: how long the gateway's placement decision
//! (`securellm_gateway::placement::place`, a pure function) takes over a realistic cluster view,
//! in process: 16 nodes × 8 GPUs, 12 leases per node, 200 models per catalogue (each model on
//! half the nodes), for the four kinds of answer (warm, cold fits, evict, wait). Baseline: the
//! same decision over ONE node (what a single-node gateway would weigh). Target (issue 17): p99 ≤
//! 50 µs at 16 nodes.
//!
//! Not measured (the multi-node request path does not exist yet): the end-to-end latency the
//! multi-node path adds over the single-node path (`multinode_added_p50_us`, target ≤ 0.3 ms).
//!
//! `RESULT placement_p99_us=… placement_p50_us=… one_node_p99_us=… nodes16_vs_1_x=… targets_met=…/1`

use std::hint::black_box;
use std::time::{Duration, Instant};

use securellm_gateway::placement::{
    GpuView, LeaseView, NodeView, Placement, ReadyModel, Want, place,
};

use crate::stats::Samples;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Decisions per scenario.
    #[arg(long, default_value_t = 20_000)]
    pub iterations: u32,
    #[arg(long, default_value_t = 16)]
    pub nodes: usize,
}

const GIB: u64 = 1 << 30;

fn cluster(nodes: usize) -> Vec<NodeView> {
    (0..nodes)
        .map(|n| NodeView {
            name: format!("gpu-node-{n:02}"),
            up: true,
            gpus: (0..8)
                .map(|g| GpuView {
                    index: g,
                    total: 80 * GIB,
                    reserve: GIB / 2,
                    granted: 60 * GIB + u64::from(g) * GIB,
                    foreign: GIB,
                })
                .collect(),
            leases: (0..12)
                .map(|l| LeaseView {
                    id: format!("n{n}-lease{l}"),
                    gpu: l % 8,
                    bytes: 30 * GIB,
                    priority: (l % 4) as i32,
                    idle: l % 3 == 0,
                    last_used_ms: u64::from(l),
                })
                .collect(),
            ready: (0..4)
                .map(|m| ReadyModel {
                    model: format!("model-{}", (n * 7 + m) % 200),
                    in_flight: (m as u32 + n as u32) % 5,
                })
                .collect(),
            catalogue: (0..200)
                .filter(|m| (m + n) % 2 == 0)
                .map(|m| format!("model-{m}"))
                .collect(),
            queued: (n % 3) as u32,
        })
        .collect()
}

/// Time `iterations` decisions of `want` over `nodes`.
fn measure(nodes: &[NodeView], want: &Want<'_>, iterations: u32) -> Samples {
    let start = Instant::now();
    let mut lat = Vec::with_capacity(iterations as usize);
    for _ in 0..iterations {
        let t = Instant::now();
        black_box(place(black_box(nodes), black_box(want)));
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Samples::new(lat, start.elapsed())
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let big = cluster(a.nodes.max(1));
    let one = cluster(1);
    // Models: warm somewhere; cold on disk with room (a 10 GiB model fits after the 60+ GiB
    // granted); needing an eviction (45 GiB: strictly lower-priority leases must go); waiting
    // (priority 0: nothing lower to evict).
    let warm = big[3].ready[0].model.clone();
    let cold = "model-150".to_string();
    let wants = [
        (
            "warm",
            Want {
                model: &warm,
                bytes: 10 * GIB,
                priority: 2,
            },
        ),
        (
            "cold",
            Want {
                model: &cold,
                bytes: 10 * GIB,
                priority: 2,
            },
        ),
        (
            "evict",
            Want {
                model: &cold,
                bytes: 45 * GIB,
                priority: 3,
            },
        ),
        (
            "wait",
            Want {
                model: &cold,
                bytes: 45 * GIB,
                priority: 0,
            },
        ),
    ];
    // Warm up, and check each scenario decides what it is named for.
    for (name, w) in &wants {
        let p = place(&big, w);
        let ok = matches!(
            (*name, &p),
            ("warm", Placement::Warm { .. })
                | ("cold", Placement::Load { .. })
                | ("evict", Placement::Evict { .. })
                | ("wait", Placement::Wait { .. })
        );
        anyhow::ensure!(ok, "scenario {name} decided {p:?}");
        measure(&big, w, 1000);
    }
    println!(
        "placement over {} nodes × 8 GPUs, 12 leases and 100 models on disk per node; {} decisions per scenario",
        big.len(),
        a.iterations
    );
    let mut all_big = Vec::new();
    let mut all_one = Vec::new();
    for (name, w) in &wants {
        let s = measure(&big, w, a.iterations);
        // The one-node baseline: the same request; the model is on disk there for the cold ones.
        let w1 = Want {
            model: if *name == "warm" {
                &one[0].ready[0].model
            } else {
                "model-150"
            },
            ..w.clone()
        };
        let s1 = measure(&one, &w1, a.iterations);
        println!(
            "{name:<6} {} nodes p50 {:>6.2} µs p99 {:>6.2} µs   1 node p50 {:>6.2} µs p99 {:>6.2} µs",
            big.len(),
            s.percentile(50.0),
            s.percentile(99.0),
            s1.percentile(50.0),
            s1.percentile(99.0)
        );
        all_big.extend(s.latencies_us);
        all_one.extend(s1.latencies_us);
    }
    let big_s = Samples::new(all_big, Duration::ZERO);
    let one_s = Samples::new(all_one, Duration::ZERO);
    let (p99, p50, one99) = (
        big_s.percentile(99.0),
        big_s.percentile(50.0),
        one_s.percentile(99.0),
    );
    let met = u32::from(p99 <= 50.0);
    println!(
        "RESULT placement_p99_us={p99:.2} placement_p50_us={p50:.2} one_node_p99_us={one99:.2} nodes16_vs_1_x={:.1} targets_met={met}/1",
        p99 / one99.max(1e-9)
    );
    Ok(())
}
