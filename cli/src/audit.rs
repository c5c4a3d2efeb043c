//! `securellm audit verify` / `tail` / `gpu`: the stack's two tamper-evident logs, read straight
//! from their files (no running service needed; reading while they are written is safe):
//!
//! - the gateway's audit log (SQLite, `<data dir>/gateway/gateway-audit.db`): one row per request;
//! - the scheduler's GPU decision log (`<data dir>/scheduler/scheduler-decisions.jsonl`, see
//!   `vram_scheduler::decisions`): every grant, eviction notice (with the request that caused it),
//!   withdrawal, revocation, expiry and release.
//!
//! `verify` checks both chains and exits 1 if either is broken; a log that is not there is
//! reported, not an error (unless neither is).

use std::path::{Path, PathBuf};

use clap::Subcommand;
use securellm_gateway::audit::{self, AuditFilter};
use vram_scheduler::decisions::{self, FILE_NAME as DECISIONS_FILE};

#[derive(Debug, Subcommand)]
pub enum AuditAction {
    /// Walk both hash chains (the gateway's audit log and the scheduler's GPU decisions); report
    /// the first edited, inserted, deleted or reordered row of each (exit code 1 if either is
    /// broken). With a database URL, the shared log of several gateways instead of the local
    /// file: every chain and every signed checkpoint.
    Verify {
        #[command(flatten)]
        shared: SharedLog,
        /// The signer's Ed25519 public key (64 hex digits, or a file holding them): checkpoints
        /// signed by another key are reported as forged.
        #[arg(long, value_name = "HEX|FILE")]
        public_key: Option<String>,
        /// Checkpoints a gateway exported (`[storage] checkpoint_export_file`): each must still
        /// be in the database and hold.
        #[arg(long, value_name = "FILE")]
        checkpoints: Option<PathBuf>,
    },
    /// The newest rows of the gateway's audit log.
    Tail {
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: u32,
        #[command(flatten)]
        shared: SharedLog,
    },
    /// Make an Ed25519 signing key for the shared log's checkpoints (`[storage]
    /// audit_signing_key_file`): writes the seed (mode 0600) and prints the public key to pin.
    Keygen {
        /// Where to write the key (must not exist).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// The newest GPU decisions: grants, eviction notices and the request (and trace) that caused
    /// each, withdrawals, revocations, expiries, releases.
    Gpu {
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: u32,
        /// Only decisions about this model (the lease's label, or the requesting model).
        #[arg(long)]
        model: Option<String>,
    },
}

/// The shared audit log of several gateways (`[storage] url`).
#[derive(Debug, clap::Args)]
pub struct SharedLog {
    /// `postgres://…`: the gateways' shared database instead of the local audit file.
    #[arg(long, env = "SECURELLM_DATABASE_URL", value_name = "URL")]
    database_url: Option<String>,
}

/// The audit database: `<stack data dir>/gateway/gateway-audit.db` (as `make run` lays it out),
/// or `<dir>/gateway-audit.db` when `dir` is the gateway's own data directory.
fn db(data_dir: &Path) -> PathBuf {
    securellm_client::gateway_file(data_dir, "gateway-audit.db")
}

/// The scheduler's decision log: `<stack data dir>/scheduler/<file>` (as `make run` lays it
/// out), else `<dir>/<file>` when `dir` is the scheduler's own data directory, else
/// `<dir>/../scheduler/<file>` when `dir` is the stack's gateway directory.
fn decisions_file(data_dir: &Path) -> PathBuf {
    let nested = data_dir.join("scheduler").join(DECISIONS_FILE);
    if nested.exists() {
        return nested;
    }
    let flat = data_dir.join(DECISIONS_FILE);
    if flat.exists() {
        return flat;
    }
    if data_dir.file_name().is_some_and(|n| n == "gateway")
        && let Some(sibling) = data_dir
            .parent()
            .map(|p| p.join("scheduler").join(DECISIONS_FILE))
            .filter(|p| p.exists())
    {
        return sibling;
    }
    nested
}

pub async fn run(data_dir: &Path, action: AuditAction) -> anyhow::Result<()> {
    match action {
        AuditAction::Verify {
            shared: SharedLog {
                database_url: Some(url),
            },
            public_key,
            checkpoints,
        } => {
            if !verify_shared(&url, public_key.as_deref(), checkpoints.as_deref()).await? {
                std::process::exit(1);
            }
            Ok(())
        }
        AuditAction::Verify { .. } => {
            if !verify(data_dir).await? {
                std::process::exit(1);
            }
            Ok(())
        }
        AuditAction::Tail { lines, shared } => match shared.database_url {
            Some(url) => {
                let log = audit::pg::open_reader(&url).await?;
                print_rows(log.query(newest(lines)).await?);
                Ok(())
            }
            None => tail(&db(data_dir), lines).await,
        },
        AuditAction::Keygen { out } => keygen(&out),
        AuditAction::Gpu { lines, model } => gpu(&decisions_file(data_dir), lines, model),
    }
}

/// Verify both chains, print one result line each; false if either is broken.
async fn verify(data_dir: &Path) -> anyhow::Result<bool> {
    let gw = db(data_dir);
    let dec = decisions_file(data_dir);
    anyhow::ensure!(
        gw.is_file() || dec.is_file(),
        "no audit log at {} and no GPU decision log at {} (set --data-dir)",
        gw.display(),
        dec.display()
    );
    let mut ok = true;
    if gw.is_file() {
        let r = audit::verify_file(&gw).await?;
        if r.ok {
            println!("audit chain OK: {} rows verified", r.rows_checked);
        } else {
            ok = false;
            println!(
                "audit chain BROKEN at row {}: {:?} ({})",
                r.first_bad_row_id.map_or("-".into(), |i| i.to_string()),
                r.kind,
                r.detail
            );
        }
    } else {
        println!("audit chain: no gateway audit log at {}", gw.display());
    }
    if dec.is_file() {
        let r = decisions::verify_file(&dec)?;
        if r.ok {
            println!(
                "GPU decision chain OK: {} rows verified{} ({})",
                r.rows_checked,
                if r.gaps.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; {} decision(s) were dropped (gap rows at {})",
                        r.dropped(),
                        r.gaps
                            .iter()
                            .map(|(s, _)| format!("#{s}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                },
                dec.display()
            );
        } else {
            ok = false;
            println!(
                "GPU decision chain BROKEN at decision {} (line {}): {} ({}) in {}",
                r.first_bad_seq.map_or("-".into(), |i| i.to_string()),
                r.first_bad_line.map_or("-".into(), |i| i.to_string()),
                r.kind.map_or("-".into(), |k| k.to_string()),
                r.detail,
                dec.display()
            );
        }
    } else {
        println!(
            "GPU decision chain: no decision log at {} (not verified)",
            dec.display()
        );
    }
    Ok(ok)
}

/// Verify the shared log: every chain, every checkpoint (and the exported ones); one line.
async fn verify_shared(
    url: &str,
    public_key: Option<&str>,
    export: Option<&Path>,
) -> anyhow::Result<bool> {
    let trusted = public_key
        .map(audit::checkpoint::parse_public_key)
        .transpose()?;
    let exported = export
        .map(audit::read_export)
        .transpose()?
        .unwrap_or_default();
    let r = audit::verify_url(url, trusted.as_ref(), &exported).await?;
    if r.ok {
        println!("shared audit OK: {}", r.detail);
    } else {
        println!(
            "shared audit BROKEN{}{}: {} ({})",
            r.chain_id
                .as_deref()
                .map_or(String::new(), |c| format!(" in chain {c:?}")),
            r.first_bad_row_id
                .map_or(String::new(), |i| format!(" at row {i}")),
            r.kind.map_or("-".into(), |k| k.to_string()),
            r.detail
        );
    }
    Ok(r.ok)
}

fn keygen(out: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let (key, seed) = audit::checkpoint::SigningKey::generate()?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
    f.write_all(format!("{}\n", hex::encode(seed)).as_bytes())?;
    f.sync_all()?;
    eprintln!(
        "wrote the signing key to {} (set [storage] audit_signing_key_file); its public key:",
        out.display()
    );
    println!("{}", key.public_key_hex());
    Ok(())
}

fn newest(lines: u32) -> AuditFilter {
    AuditFilter {
        limit: Some(lines),
        newest_first: true,
        ..Default::default()
    }
}

async fn tail(path: &Path, lines: u32) -> anyhow::Result<()> {
    anyhow::ensure!(
        path.is_file(),
        "no audit log at {} (set --data-dir)",
        path.display()
    );
    let log = audit::AuditLog::open(path).await?;
    print_rows(log.query(newest(lines)).await?);
    log.close().await;
    Ok(())
}

/// Rows given newest first, printed oldest first (with their chain on a shared log).
fn print_rows(mut rows: Vec<audit::AuditRow>) {
    rows.reverse();
    for r in rows {
        let e = &r.entry;
        let id = if r.chain_id.is_empty() {
            r.id.to_string()
        } else {
            format!("{}#{}", r.chain_id, r.id)
        };
        println!(
            "{:>6} {} {:<3} {:<22} {:<16} {:<20} key={} client={} tokens={}/{} {}us{}{}",
            id,
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
            },
            if e.trace_id.is_empty() {
                String::new()
            } else {
                format!(" trace={}", e.trace_id)
            }
        );
    }
}

/// The newest `lines` decisions (about `model`, if given), oldest first, one readable line each;
/// a warning on stderr when the chain does not verify.
fn gpu(path: &Path, lines: u32, model: Option<String>) -> anyhow::Result<()> {
    anyhow::ensure!(
        path.is_file(),
        "no GPU decision log at {} (set --data-dir; the scheduler keeps one when it has a data \
         directory)",
        path.display()
    );
    let rows = decisions::read_rows(path)?;
    let matching: Vec<&decisions::Row> = rows
        .iter()
        .filter(|r| {
            model.as_deref().is_none_or(|m| {
                r.decision.model == m || r.decision.cause.as_ref().is_some_and(|c| c.label == m)
            })
        })
        .collect();
    let skip = matching.len().saturating_sub(lines as usize);
    for r in &matching[skip..] {
        println!("{}", decisions::describe(r));
    }
    let v = decisions::verify_file(path)?;
    if !v.ok {
        eprintln!(
            "warning: the GPU decision chain does not verify: {} (see `securellm audit verify`)",
            v.detail
        );
    }
    Ok(())
}
