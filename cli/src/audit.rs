//! `securellm audit verify` / `securellm audit tail`: the gateway's audit log, read straight from
//! its SQLite file (no running gateway needed; verifying while it runs is safe: WAL readers).

use std::path::{Path, PathBuf};

use clap::Subcommand;
use securellm_gateway::audit::{self, AuditFilter};

#[derive(Debug, Subcommand)]
pub enum AuditAction {
    /// Walk the hash chain; report the first edited, inserted or deleted row (exit code 1).
    Verify,
    /// The newest rows.
    Tail {
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: u32,
    },
}

/// The audit database: `<stack data dir>/gateway/gateway-audit.db` (as `make run` lays it out),
/// or `<dir>/gateway-audit.db` when `dir` is the gateway's own data directory.
fn db(data_dir: &Path) -> PathBuf {
    securellm_client::gateway_file(data_dir, "gateway-audit.db")
}

pub async fn run(data_dir: &Path, action: AuditAction) -> anyhow::Result<()> {
    let path = db(data_dir);
    anyhow::ensure!(
        path.is_file(),
        "no audit log at {} (set --data-dir)",
        path.display()
    );
    match action {
        AuditAction::Verify => {
            let r = audit::verify_file(&path).await?;
            if r.ok {
                println!("audit chain OK: {} rows verified", r.rows_checked);
                Ok(())
            } else {
                println!(
                    "audit chain BROKEN at row {}: {:?} ({})",
                    r.first_bad_row_id.map_or("-".into(), |i| i.to_string()),
                    r.kind,
                    r.detail
                );
                std::process::exit(1);
            }
        }
        AuditAction::Tail { lines } => {
            let log = audit::AuditLog::open(&path).await?;
            let mut rows = log
                .query(AuditFilter {
                    limit: Some(lines),
                    newest_first: true,
                    ..Default::default()
                })
                .await?;
            rows.reverse();
            for r in rows {
                let e = &r.entry;
                println!(
                    "{:>6} {} {:<3} {:<22} {:<16} {:<20} key={} client={} tokens={}/{} {}us{}",
                    r.id,
                    e.time_ms,
                    e.status,
                    e.endpoint,
                    e.model,
                    e.subject,
                    e.key_id,
                    e.client_addr,
                    e.prompt_tokens,
                    e.completion_tokens,
                    e.latency_us,
                    if e.error_code.is_empty() {
                        String::new()
                    } else {
                        format!(" error={}", e.error_code)
                    }
                );
            }
            log.close().await;
            Ok(())
        }
    }
}
