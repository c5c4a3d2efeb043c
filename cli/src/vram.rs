//! `securellm vram`: what the scheduler knows, as bars and tables; `securellm vram watch` follows
//! its events.

use clap::Subcommand;
use securellm_client::connect_internal;
use securellm_client::vram::render_status;
use securellm_common::format_bytes;
use securellm_common::internal_auth::InternalToken;
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

pub async fn run(
    endpoint: &str,
    token: &InternalToken,
    action: Option<VramAction>,
) -> anyhow::Result<()> {
    let mut c = VramSchedulerClient::new(
        connect_internal("vram-scheduler", endpoint, Some(token), None).await?,
    );
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
