//! `securellm vram`: what the scheduler knows, as bars and tables; `securellm vram watch` follows
//! its events.

use anyhow::Context;
use clap::Subcommand;
use securellm_common::format_bytes;
use securellm_common::time::now_ms;
use securellm_proto::v1 as pb;
use securellm_proto::v1::vram_scheduler_client::VramSchedulerClient;
use tokio_stream::StreamExt;

#[derive(Debug, Subcommand)]
pub enum VramAction {
    /// Follow lease events (granted, released, expired, eviction notices, ...).
    Watch {
        /// Only this holder's events.
        #[arg(long)]
        holder: Option<String>,
    },
}

pub async fn run(endpoint: &str, action: Option<VramAction>) -> anyhow::Result<()> {
    let mut c = VramSchedulerClient::connect(endpoint.to_string())
        .await
        .with_context(|| format!("cannot reach the vram-scheduler at {endpoint}"))?;
    match action {
        None => {
            let st = c.get_status(pb::GetStatusRequest {}).await?.into_inner();
            print!("{}", render_status(&st, now_ms()));
        }
        Some(VramAction::Watch { holder }) => {
            let mut s = c
                .watch_events(pb::WatchEventsRequest {
                    holder: holder.unwrap_or_default(),
                })
                .await?
                .into_inner();
            while let Some(e) = s.next().await {
                println!("{}", render_event(&e?));
            }
        }
    }
    Ok(())
}

const BAR: usize = 40;

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
    let s = now.saturating_sub(at) / 1000;
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m", s / 60)
    } else {
        format!("{}h", s / 3600)
    }
}

fn until(now: u64, at: u64) -> String {
    let ms = at.saturating_sub(now);
    if ms < 10_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        format!("{}s", ms / 1000)
    }
}

/// The whole status as text.
pub fn render_status(st: &pb::SchedulerStatus, now: u64) -> String {
    let mut out = format!("inventory: {}\n\n", st.inventory);
    for g in &st.gpus {
        out += &format!(
            "GPU {} {}{}\n  {} total {}  leased {}  foreign {}  reserve {}  grantable {}{}\n",
            g.index,
            g.name,
            if g.simulated { " (simulated)" } else { "" },
            bar(g),
            format_bytes(g.total_bytes),
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
                None if l.idle => "idle".into(),
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
                q.holder,
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

/// One event as a line.
pub fn render_event(e: &pb::LeaseEvent) -> String {
    let kind = pb::lease_event::Kind::try_from(e.kind)
        .map(|k| k.as_str_name().to_string())
        .unwrap_or_else(|_| format!("KIND_{}", e.kind));
    let l = e.lease.clone().unwrap_or_default();
    let mut s = format!(
        "{} {:<16} {} holder={} gpu={} bytes={} prio={}",
        e.at_ms,
        kind,
        l.id,
        l.holder,
        l.gpu_index,
        format_bytes(l.bytes),
        l.priority
    );
    if !e.detail.is_empty() {
        s += &format!(" ({})", e.detail);
    }
    s
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
    fn status_lists_leases_and_queue() {
        let st = pb::SchedulerStatus {
            inventory: "simulated".into(),
            gpus: vec![pb::GpuStatus {
                index: 0,
                name: "Sim".into(),
                simulated: true,
                total_bytes: 1 << 30,
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
                && s.contains("512 MiB"),
            "{s}"
        );
    }
}
