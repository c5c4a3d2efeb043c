//! `securellm models`: the registry's catalogue as a table, one model in detail, and rescans with a
//! progress line.

use std::io::Write;

use clap::Subcommand;
use securellm_client::{connect_internal, models};
use securellm_common::internal_auth::{AuthChannel, InternalToken};
use securellm_proto::v1 as pb;
use securellm_proto::v1::model_registry_client::ModelRegistryClient;
use tokio_stream::StreamExt;

#[derive(Debug, Subcommand)]
pub enum ModelsAction {
    /// One model in detail, with estimates at a few context sizes.
    Show {
        /// Id, alias or name.
        name: String,
    },
    /// Scan the model roots now (progress bar).
    Rescan {
        /// Re-parse every file, even unchanged ones.
        #[arg(long)]
        full: bool,
    },
}

pub async fn run(
    endpoint: &str,
    token: &InternalToken,
    action: Option<ModelsAction>,
) -> anyhow::Result<()> {
    let mut c =
        ModelRegistryClient::new(connect_internal("registry", endpoint, Some(token), None).await?);
    match action {
        None => table(&mut c).await,
        Some(ModelsAction::Show { name }) => show(&mut c, &name).await,
        Some(ModelsAction::Rescan { full }) => rescan(&mut c, full).await,
    }
}

async fn table(c: &mut ModelRegistryClient<AuthChannel>) -> anyhow::Result<()> {
    print!("{}", models::table(c).await?);
    Ok(())
}

async fn show(c: &mut ModelRegistryClient<AuthChannel>, name: &str) -> anyhow::Result<()> {
    let text = models::detail(c, name)
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    print!("{text}");
    Ok(())
}

/// `[#####.....] 512/1000 files` on one line, redrawn.
pub fn progress_bar(done: u64, total: u64) -> String {
    const W: u64 = 30;
    let filled = (done.min(total) * W).checked_div(total).unwrap_or(W);
    format!(
        "[{}{}] {done}/{total} files",
        "#".repeat(filled as usize),
        ".".repeat((W - filled) as usize)
    )
}

async fn rescan(c: &mut ModelRegistryClient<AuthChannel>, full: bool) -> anyhow::Result<()> {
    let mut s = c
        .rescan(pb::RescanRequest {
            roots: Vec::new(),
            full,
        })
        .await?
        .into_inner();
    let mut out = std::io::stderr();
    while let Some(p) = s.next().await {
        let p = p?;
        for f in &p.failures {
            let _ = writeln!(out, "\r\x1b[Kfailed: {}: {}", f.path, f.reason);
        }
        let done = p.files_parsed + p.files_unchanged + p.files_failed;
        let _ = write!(
            out,
            "\r\x1b[K{}",
            progress_bar(done, p.files_total.unwrap_or(p.files_seen))
        );
        let _ = out.flush();
        if p.done {
            let _ = writeln!(out);
            println!(
                "scanned {} files: {} parsed, {} unchanged, {} failed; models +{} ~{} -{} in {} ms",
                p.files_seen,
                p.files_parsed,
                p.files_unchanged,
                p.files_failed,
                p.models_added,
                p.models_changed,
                p.models_removed,
                p.elapsed_ms
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_bar_fills_in_proportion() {
        assert_eq!(
            progress_bar(0, 10),
            format!("[{}] 0/10 files", ".".repeat(30))
        );
        assert_eq!(
            progress_bar(5, 10),
            format!("[{}{}] 5/10 files", "#".repeat(15), ".".repeat(15))
        );
        assert!(progress_bar(3, 0).starts_with(&format!("[{}]", "#".repeat(30))));
    }
}
