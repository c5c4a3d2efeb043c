//! The scheduler's view as text: one bar per GPU, the lease table, the queue (`securellm vram`,
//! the MCP `vram_status` tool).

use securellm_common::format_bytes;
use securellm_proto::v1 as pb;

use crate::age;

/// The width of [`bar`] between its brackets.
pub const BAR: usize = 40;

/// One GPU as a bar: `#` leased, `%` foreign, `r` reserve, `.` grantable.
pub fn bar(g: &pb::GpuStatus) -> String {
    let total = g.total_bytes.max(1) as f64;
    let cells = |b: u64| ((b as f64 / total) * BAR as f64).round() as usize;
    let leased = cells(g.leased_bytes).min(BAR);
    let foreign = cells(g.foreign_bytes).min(BAR - leased);
    let reserve = cells(g.reserve_bytes).min(BAR - leased - foreign);
    let free = BAR - leased - foreign - reserve;
    format!(
        "[{}{}{}{}]",
        "#".repeat(leased),
        "%".repeat(foreign),
        "r".repeat(reserve),
        ".".repeat(free)
    )
}

fn ago(now: u64, at: u64) -> String {
    if at == 0 {
        return "-".into();
    }
    age(now.saturating_sub(at))
}

fn until(now: u64, at: u64) -> String {
    let ms = at.saturating_sub(now);
    if ms < 10_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        format!("{}s", ms / 1000)
    }
}

/// The whole status as text: GPUs (total, used, free, leased, foreign, reserve, grantable), the
/// leases and the queue; `now` (unix ms) for ages and deadlines.
pub fn render_status(st: &pb::SchedulerStatus, now: u64) -> String {
    let mut out = format!("inventory: {}\n\n", st.inventory);
    for g in &st.gpus {
        out += &format!(
            "GPU {} {}{}\n  {} total {}  used {}  free {}  leased {}  foreign {}  reserve {}  grantable {}{}\n",
            g.index,
            g.name,
            if g.simulated { " (simulated)" } else { "" },
            bar(g),
            format_bytes(g.total_bytes),
            format_bytes(g.used_bytes),
            format_bytes(g.free_bytes),
            format_bytes(g.leased_bytes),
            format_bytes(g.foreign_bytes),
            format_bytes(g.reserve_bytes),
            format_bytes(g.grantable_bytes),
            if g.overcommitted {
                "  OVER-COMMITTED by foreign use"
            } else {
                ""
            },
        );
    }
    out += "  legend: # leased  % foreign  r reserve  . grantable\n\nLEASES\n";
    if st.leases.is_empty() {
        out += "  (none)\n";
    } else {
        out += &format!(
            "  {:<22} {:<28} {:>4} {:>10} {:>4} {:>6} {:>9} {}\n",
            "ID", "HOLDER", "GPU", "BYTES", "PRIO", "AGE", "EXPIRES", "STATE"
        );
        for l in &st.leases {
            let state = match l.evict_by_ms {
                Some(d) => format!("evicting (by {})", until(now, d)),
                None if l.idle && l.last_used_ms > 0 => {
                    format!(
                        "idle {} (yields to equal priority)",
                        ago(now, l.last_used_ms)
                    )
                }
                None if l.idle => "idle (yields to equal priority)".into(),
                None => "active".into(),
            };
            out += &format!(
                "  {:<22} {:<28} {:>4} {:>10} {:>4} {:>6} {:>9} {}\n",
                l.id,
                if l.label.is_empty() {
                    l.holder.clone()
                } else {
                    format!("{} ({})", l.holder, l.label)
                },
                l.gpu_index,
                format_bytes(l.bytes),
                l.priority,
                ago(now, l.granted_at_ms),
                until(now, l.expires_at_ms),
                state
            );
        }
    }
    out += "\nQUEUE\n";
    if st.queue.is_empty() {
        out += "  (empty)\n";
    } else {
        for q in &st.queue {
            out += &format!(
                "  #{} {:<28} {:>10} prio {:>3} gpu {:<4} waited {} (gives up in {})\n",
                q.position,
                if q.label.is_empty() {
                    q.holder.clone()
                } else {
                    format!("{} ({})", q.holder, q.label)
                },
                format_bytes(q.bytes),
                q.priority,
                q.gpu_index.map_or("any".to_string(), |g| g.to_string()),
                ago(now, q.queued_at_ms),
                until(now, q.wait_until_ms)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_shows_each_kind_of_memory_in_proportion() {
        let g = pb::GpuStatus {
            total_bytes: 40,
            leased_bytes: 10,
            foreign_bytes: 5,
            reserve_bytes: 5,
            ..Default::default()
        };
        let b = bar(&g);
        assert_eq!(b.len(), BAR + 2);
        assert_eq!(b.matches('#').count(), 10);
        assert_eq!(b.matches('%').count(), 5);
        assert_eq!(b.matches('r').count(), 5);
        assert_eq!(b.matches('.').count(), 20);
    }

    #[test]
    fn status_lists_gpus_leases_and_queue() {
        let st = pb::SchedulerStatus {
            inventory: "simulated".into(),
            gpus: vec![pb::GpuStatus {
                index: 0,
                name: "Sim".into(),
                simulated: true,
                total_bytes: 1 << 30,
                used_bytes: 1 << 20,
                free_bytes: (1 << 30) - (1 << 20),
                ..Default::default()
            }],
            leases: vec![pb::Lease {
                id: "l-1".into(),
                holder: "mgr".into(),
                bytes: 1 << 20,
                evict_by_ms: Some(5_000),
                ..Default::default()
            }],
            queue: vec![pb::QueuedRequest {
                holder: "waiter".into(),
                bytes: 1 << 29,
                ..Default::default()
            }],
        };
        let s = render_status(&st, 1_000);
        assert!(
            s.contains("l-1")
                && s.contains("evicting")
                && s.contains("waiter")
                && s.contains("512 MiB")
                && s.contains("total 1 GiB  used 1 MiB  free 1023 MiB"),
            "{s}"
        );
    }
}
