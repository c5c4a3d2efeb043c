//! Where a request for a model should run when the gateway fronts several GPU machines (node
//! agents): a pure function of the gateway's soft view of each node, driven by tests without a
//! runtime (as the scheduler's `LeaseTable` is). GPU memory stays leased by each node's own
//! scheduler; this only chooses the node (and says why), the node's scheduler still decides.
//!
//! The order (issue 17):
//! 1. **Warm**: a node where the model is loaded and ready — the one with the fewest requests in
//!    flight for it (then the lowest name, so replicas agree).
//! 2. **Fits**: a node whose catalogue has the model and one of whose GPUs can grant the estimate
//!    now — best fit: the GPU left with the least grantable memory after it.
//! 3. **Evict**: a node where evicting leases of strictly lower priority (least important first,
//!    then least recently used) frees enough on one GPU — the plan that evicts the least
//!    important leases, then the fewest bytes.
//! 4. **Wait**: the queue of the node whose largest GPU could ever hold the model (total minus
//!    reserve), preferring one whose idle leases of equal priority would make room (its
//!    scheduler lets those yield), then the shortest queue.
//! 5. **Nowhere**: no live node has the model, or none could ever hold it.
//!
//! Invariant (property-tested): a `Load` is never on a GPU whose grantable memory is below the
//! estimate, and an `Evict` plan names only leases of strictly lower priority on that GPU whose
//! bytes, added to what is grantable, cover the estimate; nothing is placed on a node that is
//! down.

use std::cmp::Reverse;

/// One GPU of a node as last seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuView {
    pub index: u32,
    pub total: u64,
    pub reserve: u64,
    /// Leased bytes.
    pub granted: u64,
    /// Used by processes nobody leased.
    pub foreign: u64,
}

impl GpuView {
    /// What the node's scheduler could grant now.
    pub fn grantable(&self) -> u64 {
        self.total
            .saturating_sub(self.reserve)
            .saturating_sub(self.granted)
            .saturating_sub(self.foreign)
    }

    /// The most this GPU could ever grant (nothing leased, nothing foreign).
    pub fn capacity(&self) -> u64 {
        self.total.saturating_sub(self.reserve)
    }
}

/// A lease on a node, as last seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseView {
    pub id: String,
    pub gpu: u32,
    pub bytes: u64,
    pub priority: i32,
    /// No request in flight (an equal-priority request may make it yield).
    pub idle: bool,
    pub last_used_ms: u64,
}

/// A model loaded on a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadyModel {
    pub model: String,
    pub in_flight: u32,
}

/// One node agent as the gateway last saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    /// Answered within the last heartbeat.
    pub up: bool,
    pub gpus: Vec<GpuView>,
    pub leases: Vec<LeaseView>,
    pub ready: Vec<ReadyModel>,
    /// Models its registry has on disk.
    pub catalogue: Vec<String>,
    /// Requests waiting in its scheduler's queue.
    pub queued: u32,
}

impl NodeView {
    fn has(&self, model: &str) -> bool {
        self.catalogue.iter().any(|m| m == model)
    }
}

/// What is to be placed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Want<'a> {
    pub model: &'a str,
    /// The registry's estimate of the GPU memory it needs (on one GPU).
    pub bytes: u64,
    pub priority: i32,
}

/// The decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Already loaded there.
    Warm { node: String },
    /// Load there now, on this GPU.
    Load { node: String, gpu: u32 },
    /// Load there after these leases (strictly lower priority) are evicted from this GPU.
    Evict {
        node: String,
        gpu: u32,
        victims: Vec<String>,
    },
    /// Wait in that node's queue (its scheduler decides when).
    Wait { node: String },
    /// No live node can serve it; the reason, for the client.
    Nowhere { reason: String },
}

/// Decide where `want` runs (see the module doc).
pub fn place(nodes: &[NodeView], want: &Want<'_>) -> Placement {
    let live = || nodes.iter().filter(|n| n.up);

    // 1. Warm.
    if let Some((n, _)) = live()
        .filter_map(|n| {
            n.ready
                .iter()
                .find(|r| r.model == want.model)
                .map(|r| (n, r.in_flight))
        })
        .min_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.name.cmp(&b.0.name)))
    {
        return Placement::Warm {
            node: n.name.clone(),
        };
    }

    let holders: Vec<&NodeView> = live().filter(|n| n.has(want.model)).collect();
    if holders.is_empty() {
        let reason = if nodes.iter().any(|n| n.has(want.model)) {
            format!("every node that has model {:?} is down", want.model)
        } else {
            format!("no node has model {:?}", want.model)
        };
        return Placement::Nowhere { reason };
    }

    // 2. Fits now: best fit over every GPU of every holder.
    if let Some((n, g)) = holders
        .iter()
        .flat_map(|n| n.gpus.iter().map(move |g| (*n, g)))
        .filter(|(_, g)| g.grantable() >= want.bytes)
        .min_by(|a, b| {
            (a.1.grantable() - want.bytes)
                .cmp(&(b.1.grantable() - want.bytes))
                .then_with(|| a.0.name.cmp(&b.0.name))
                .then_with(|| a.1.index.cmp(&b.1.index))
        })
    {
        return Placement::Load {
            node: n.name.clone(),
            gpu: g.index,
        };
    }

    // 3. Evict strictly lower priority.
    let mut best: Option<(Plan, &NodeView)> = None;
    for n in &holders {
        for g in &n.gpus {
            if let Some(plan) = eviction_plan(n, g, want) {
                let better = best.as_ref().is_none_or(|(b, bn)| {
                    (plan.rank(), &n.name, g.index) < (b.rank(), &bn.name, b.gpu)
                });
                if better {
                    best = Some((plan, n));
                }
            }
        }
    }
    if let Some((plan, n)) = best {
        return Placement::Evict {
            node: n.name.clone(),
            gpu: plan.gpu,
            victims: plan.victims,
        };
    }

    // 4. Wait where it could ever fit.
    let wait = holders
        .iter()
        .filter(|n| n.gpus.iter().any(|g| g.capacity() >= want.bytes))
        .min_by_key(|n| {
            let idle_room = n.gpus.iter().any(|g| {
                let idle: u64 = n
                    .leases
                    .iter()
                    .filter(|l| l.gpu == g.index && l.priority <= want.priority && l.idle)
                    .map(|l| l.bytes)
                    .sum();
                g.grantable().saturating_add(idle) >= want.bytes
            });
            (Reverse(idle_room), n.queued, n.name.clone())
        });
    match wait {
        Some(n) => Placement::Wait {
            node: n.name.clone(),
        },
        None => Placement::Nowhere {
            reason: format!(
                "model {:?} needs {} bytes on one GPU; no live node that has it has a GPU that \
                 large",
                want.model, want.bytes
            ),
        },
    }
}

/// Evicting these leases from `gpu` makes room.
struct Plan {
    gpu: u32,
    victims: Vec<String>,
    /// The highest priority among the victims, and the bytes freed.
    worst: i32,
    freed: u64,
}

impl Plan {
    /// Lower is better: evict the least important leases, then the fewest bytes, then fewest.
    fn rank(&self) -> (i32, u64, usize) {
        (self.worst, self.freed, self.victims.len())
    }
}

/// The leases of strictly lower priority on `g` to evict (least important first, then least
/// recently used) until the estimate fits; `None` if all of them are not enough.
fn eviction_plan(n: &NodeView, g: &GpuView, want: &Want<'_>) -> Option<Plan> {
    let mut candidates: Vec<&LeaseView> = n
        .leases
        .iter()
        .filter(|l| l.gpu == g.index && l.priority < want.priority)
        .collect();
    candidates.sort_by(|a, b| {
        a.priority
            .cmp(&b.priority)
            .then(a.last_used_ms.cmp(&b.last_used_ms))
            .then_with(|| a.id.cmp(&b.id))
    });
    let mut room = g.grantable();
    let mut plan = Plan {
        gpu: g.index,
        victims: Vec::new(),
        worst: i32::MIN,
        freed: 0,
    };
    for l in candidates {
        if room >= want.bytes {
            break;
        }
        // Freed memory cannot exceed what the lease itself holds of `granted`.
        room = room
            .saturating_add(l.bytes)
            .min(g.capacity().saturating_sub(g.foreign));
        plan.victims.push(l.id.clone());
        plan.worst = plan.worst.max(l.priority);
        plan.freed += l.bytes;
    }
    (room >= want.bytes && !plan.victims.is_empty()).then_some(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GIB: u64 = 1 << 30;

    fn node(name: &str, gpus: &[(u64, u64)], models: &[&str]) -> NodeView {
        NodeView {
            name: name.into(),
            up: true,
            gpus: gpus
                .iter()
                .enumerate()
                .map(|(i, &(total, granted))| GpuView {
                    index: i as u32,
                    total,
                    reserve: 0,
                    granted,
                    foreign: 0,
                })
                .collect(),
            leases: vec![],
            ready: vec![],
            catalogue: models.iter().map(|m| m.to_string()).collect(),
            queued: 0,
        }
    }

    fn want(model: &str, bytes: u64, priority: i32) -> Want<'_> {
        Want {
            model,
            bytes,
            priority,
        }
    }

    #[test]
    fn warm_wins_and_the_least_busy_warm_node_is_chosen() {
        let mut a = node("a", &[(24 * GIB, 20 * GIB)], &["m"]);
        let mut b = node("b", &[(24 * GIB, 20 * GIB)], &["m"]);
        let c = node("c", &[(80 * GIB, 0)], &["m"]);
        a.ready.push(ReadyModel {
            model: "m".into(),
            in_flight: 3,
        });
        b.ready.push(ReadyModel {
            model: "m".into(),
            in_flight: 1,
        });
        let p = place(&[a.clone(), b.clone(), c.clone()], &want("m", 8 * GIB, 0));
        assert_eq!(p, Placement::Warm { node: "b".into() });
        b.up = false;
        let p = place(&[a, b, c], &want("m", 8 * GIB, 0));
        assert_eq!(
            p,
            Placement::Warm { node: "a".into() },
            "a down node is skipped"
        );
    }

    #[test]
    fn a_cold_model_goes_where_it_fits_best_and_only_where_it_is_on_disk() {
        let a = node("a", &[(24 * GIB, 0)], &["m"]);
        let b = node("b", &[(24 * GIB, 14 * GIB), (80 * GIB, 0)], &["m"]);
        let c = node("c", &[(16 * GIB, 6 * GIB)], &["other"]);
        // 8 GiB: b's first GPU leaves 2 GiB, a leaves 16, b's second 72; c lacks the model.
        assert_eq!(
            place(&[a.clone(), b.clone(), c.clone()], &want("m", 8 * GIB, 0)),
            Placement::Load {
                node: "b".into(),
                gpu: 0
            }
        );
        assert_eq!(
            place(&[a, b, c], &want("other", 8 * GIB, 0)),
            Placement::Load {
                node: "c".into(),
                gpu: 0
            },
            "a model found only on one node's disk goes there"
        );
    }

    #[test]
    fn eviction_only_of_lower_priority_then_wait_then_nowhere() {
        let mut a = node("a", &[(24 * GIB, 20 * GIB)], &["m"]);
        a.leases = vec![
            LeaseView {
                id: "low".into(),
                gpu: 0,
                bytes: 12 * GIB,
                priority: 1,
                idle: false,
                last_used_ms: 5,
            },
            LeaseView {
                id: "high".into(),
                gpu: 0,
                bytes: 8 * GIB,
                priority: 9,
                idle: true,
                last_used_ms: 1,
            },
        ];
        assert_eq!(
            place(std::slice::from_ref(&a), &want("m", 10 * GIB, 5)),
            Placement::Evict {
                node: "a".into(),
                gpu: 0,
                victims: vec!["low".into()]
            }
        );
        // Priority 1: nothing strictly lower; the node could hold it: wait there.
        assert_eq!(
            place(std::slice::from_ref(&a), &want("m", 10 * GIB, 1)),
            Placement::Wait { node: "a".into() }
        );
        assert!(matches!(
            place(std::slice::from_ref(&a), &want("m", 30 * GIB, 5)),
            Placement::Nowhere { .. }
        ));
        assert!(matches!(
            place(&[a], &want("nope", GIB, 5)),
            Placement::Nowhere { reason } if reason.contains("no node has")
        ));
    }

    #[test]
    fn waiting_prefers_a_node_whose_idle_equal_priority_lease_can_yield() {
        let mut a = node("a", &[(24 * GIB, 20 * GIB)], &["m"]);
        let mut b = node("b", &[(24 * GIB, 20 * GIB)], &["m"]);
        let lease = |idle| LeaseView {
            id: "x".into(),
            gpu: 0,
            bytes: 20 * GIB,
            priority: 3,
            idle,
            last_used_ms: 0,
        };
        a.leases = vec![lease(false)];
        a.queued = 0;
        b.leases = vec![lease(true)];
        b.queued = 5;
        assert_eq!(
            place(&[a, b], &want("m", 10 * GIB, 3)),
            Placement::Wait { node: "b".into() }
        );
    }

    fn arb_node(i: usize) -> impl Strategy<Value = NodeView> {
        let gpus = prop::collection::vec((1u64..=80, 0u64..=4, 0u64..=80, 0u64..=8), 1..4);
        (
            gpus,
            prop::collection::vec((0u32..4, 1u64..=40, -2i32..=6, any::<bool>()), 0..6),
            any::<bool>(),
            prop::collection::vec(0usize..4, 0..4),
            prop::option::of(0u32..5),
            0u32..4,
        )
            .prop_map(move |(gpus, leases, up, models, ready, queued)| {
                let gpus: Vec<GpuView> = gpus
                    .into_iter()
                    .enumerate()
                    .map(|(j, (total, reserve, granted, foreign))| GpuView {
                        index: j as u32,
                        total: total * GIB,
                        reserve: reserve * GIB,
                        granted: granted.min(total) * GIB,
                        foreign: foreign * GIB,
                    })
                    .collect();
                let n = gpus.len() as u32;
                let leases = leases
                    .into_iter()
                    .enumerate()
                    .map(|(k, (g, bytes, priority, idle))| LeaseView {
                        id: format!("n{i}-l{k}"),
                        gpu: g % n,
                        bytes: bytes * GIB,
                        priority,
                        idle,
                        last_used_ms: k as u64,
                    })
                    .collect();
                let catalogue: Vec<String> = models.iter().map(|m| format!("m{m}")).collect();
                let ready = match (ready, catalogue.first()) {
                    (Some(f), Some(m)) => vec![ReadyModel {
                        model: m.clone(),
                        in_flight: f,
                    }],
                    _ => vec![],
                };
                NodeView {
                    name: format!("node-{i}"),
                    up,
                    gpus,
                    leases,
                    ready,
                    catalogue,
                    queued,
                }
            })
    }

    fn arb_nodes() -> impl Strategy<Value = Vec<NodeView>> {
        (1usize..6).prop_flat_map(|n| (0..n).map(arb_node).collect::<Vec<_>>())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn never_over_grantable_without_a_lower_priority_plan(
            nodes in arb_nodes(),
            model in 0usize..4,
            gib in 1u64..60,
            priority in -2i32..=6,
        ) {
            let model = format!("m{model}");
            let w = want(&model, gib * GIB, priority);
            let p = place(&nodes, &w);
            let find = |name: &str| nodes.iter().find(|n| n.name == name).unwrap();
            match &p {
                Placement::Warm { node } => {
                    let n = find(node);
                    prop_assert!(n.up);
                    prop_assert!(n.ready.iter().any(|r| r.model == model));
                }
                Placement::Load { node, gpu } => {
                    let n = find(node);
                    prop_assert!(n.up && n.has(&model));
                    let g = n.gpus.iter().find(|g| g.index == *gpu).unwrap();
                    prop_assert!(g.grantable() >= w.bytes, "loaded over grantable: {g:?}");
                }
                Placement::Evict { node, gpu, victims } => {
                    let n = find(node);
                    prop_assert!(n.up && n.has(&model));
                    let g = n.gpus.iter().find(|g| g.index == *gpu).unwrap();
                    prop_assert!(g.grantable() < w.bytes, "evicting although it fits");
                    let mut freed = 0;
                    for v in victims {
                        let l = n.leases.iter().find(|l| &l.id == v).unwrap();
                        prop_assert!(l.gpu == *gpu);
                        prop_assert!(l.priority < priority, "evicts priority {} for {}", l.priority, priority);
                        freed += l.bytes;
                    }
                    prop_assert!(g.grantable() + freed >= w.bytes, "the plan does not make room");
                    // No live holder could take it without evicting.
                    prop_assert!(!nodes.iter().filter(|n| n.up && n.has(&model))
                        .flat_map(|n| &n.gpus).any(|g| g.grantable() >= w.bytes));
                }
                Placement::Wait { node } => {
                    let n = find(node);
                    prop_assert!(n.up && n.has(&model));
                    prop_assert!(n.gpus.iter().any(|g| g.capacity() >= w.bytes));
                }
                Placement::Nowhere { .. } => {
                    // Then no live node that has the model has a GPU that could ever hold it,
                    // and it is warm nowhere.
                    prop_assert!(!nodes.iter().filter(|n| n.up).any(|n| n.ready.iter().any(|r| r.model == model)));
                    prop_assert!(!nodes.iter().filter(|n| n.up && n.has(&model))
                        .flat_map(|n| &n.gpus).any(|g| g.capacity() >= w.bytes));
                }
            }
            // Deterministic: the same view, the same answer (replicas agree).
            prop_assert_eq!(place(&nodes, &w), p);
        }
    }
}
