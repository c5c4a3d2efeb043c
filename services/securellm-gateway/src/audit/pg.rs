//! The audit log on PostgreSQL, shared by every gateway on one database (`[storage] url`): one
//! hash chain per writer, plus signed checkpoints over all chain heads.
//!
//! # Chains
//! Each gateway replica writes its own chain, named by `[storage] replica_id` (by default
//! `<hostname>:<HTTP port>`, so a restarted replica continues its chain). Within a chain rows
//! are numbered 1, 2, 3, … (`seq`) and hashed exactly as the SQLite log's rows (`encoding.rs`);
//! the chain's head (`audit_heads`) moves in the same transaction as each batch, and the writer
//! locks it (`SELECT … FOR UPDATE`) for that transaction, so two processes naming one chain (a
//! restarted gateway whose old writer is still draining) extend it in turn instead of forking it.
//! The group-commit writer (`writer.rs`) is the SQLite one; only its batch statement differs.
//!
//! # Checkpoints
//! A gateway with a signing key (`[storage] audit_signing_key_file`) signs every chain's head
//! every `checkpoint_interval_ms` (and once when it stops) and writes the checkpoint to
//! `audit_checkpoints`; with `checkpoint_export_file` it also appends it as one JSON line to that
//! file (fsynced) and logs it (journald keeps it where the database's owner cannot rewrite it).
//! The signed message and the checks are in `checkpoint.rs`.
//!
//! # Verification ([`verify`])
//! In one REPEATABLE READ snapshot: every chain is walked as the SQLite log is (the same walker:
//! edited, inserted, deleted rows; a head record that disagrees with the chain's end), then every
//! checkpoint — in the database and, if given, in an export file — must carry a valid signature
//! (against the pinned public key when one is configured) and every head it signed must still
//! be in its chain with the same hash. So a chain whose tail was deleted together with its head
//! record, a chain rewritten whole with valid hashes, a chain deleted entirely, or a checkpoint
//! deleted from the database (when an export file is given) are each named.
//!
//! # When the database is away
//! A batch that fails for a connection-class reason (the server restarting, the network) is
//! retried with backoff, up to [`MAX_OUTAGE`]; entries queue behind it meanwhile (an
//! `append_nowait` beyond the queue's capacity is dropped and counted, as with a stalled disk).
//! Nothing acknowledged is lost; the log catches up when the database is back. A commit whose
//! acknowledgement was lost with the connection may be written twice (two rows, both chained).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Postgres, QueryBuilder, Row};

use securellm_common::time::now_ms;

use super::checkpoint::{self, ChainHead, Checkpoint, SigningKey};
use super::encoding::{Fields, GENESIS_HASH, clamp_i64};
use super::verify::{RawRow, Walker};
use super::writer::{chain_links, chunk_len};
use super::{
    Ack, AuditError, AuditFilter, AuditHead, AuditRow, COLUMNS, TamperKind, VerifyReport,
    audit_row, effective_limit,
};

/// How long a batch is retried while the database is unreachable before it is given up (its
/// entries then fail with `NotCommitted`, counted and logged).
pub const MAX_OUTAGE: Duration = Duration::from_secs(300);

/// What the PostgreSQL audit needs besides the URL.
#[derive(Debug, Default)]
pub struct PgAuditOptions {
    /// This replica's chain.
    pub chain_id: String,
    /// Signs the checkpoints; `None`: this replica signs none.
    pub signing_key: Option<SigningKey>,
    /// The public key [`verify`] pins; `None`: the signing key's, if any, else each
    /// checkpoint's stated key (weaker, and the report says so).
    pub trusted_key: Option<[u8; 32]>,
    /// How often to sign a checkpoint (zero: only when the log is closed).
    pub checkpoint_interval: Duration,
    /// Also append each checkpoint to this file (one JSON line, fsynced).
    pub export_file: Option<PathBuf>,
}

/// The database side of one replica's audit log.
pub(crate) struct PgStore {
    pub(crate) pool: PgPool,
    pub(crate) chain_id: String,
    signing_key: Option<SigningKey>,
    trusted_key: Option<[u8; 32]>,
    export_file: Option<PathBuf>,
    /// Serializes checkpoint writes to the export file.
    export_lock: tokio::sync::Mutex<()>,
}

impl PgStore {
    /// Connect, migrate (under the migrator's lock) and make sure this chain has a head.
    pub(crate) async fn open(url: &str, o: PgAuditOptions) -> Result<Arc<Self>, AuditError> {
        if o.chain_id.is_empty() || o.chain_id.len() > 256 {
            return Err(AuditError::Corrupt(format!(
                "the audit chain id must be 1 to 256 bytes, not {:?}",
                o.chain_id
            )));
        }
        let pool = PgPoolOptions::new()
            .max_connections(3)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await?;
        crate::auth::keys::PG_MIGRATOR.run(&pool).await?;
        sqlx::query(
            "INSERT INTO audit_heads (chain_id, last_id, last_hash, updated_ms) \
             VALUES ($1, 0, $2, $3) ON CONFLICT (chain_id) DO NOTHING",
        )
        .bind(&o.chain_id)
        .bind(GENESIS_HASH)
        .bind(clamp_i64(now_ms()))
        .execute(&pool)
        .await?;
        let trusted_key = o
            .trusted_key
            .or_else(|| o.signing_key.as_ref().map(SigningKey::public_key));
        Ok(Arc::new(Self {
            pool,
            chain_id: o.chain_id,
            signing_key: o.signing_key,
            trusted_key,
            export_file: o.export_file,
            export_lock: Default::default(),
        }))
    }

    /// One transaction: lock the chain's head, insert the chained rows, move the head, commit.
    pub(crate) async fn write_batch(
        &self,
        batch: &[(Box<Fields>, Option<Ack>)],
    ) -> Result<Vec<i64>, AuditError> {
        let mut tx = self.pool.begin().await?;
        let head: Option<(i64, String)> = sqlx::query_as(
            "SELECT last_id, last_hash FROM audit_heads WHERE chain_id = $1 FOR UPDATE",
        )
        .bind(&self.chain_id)
        .fetch_optional(&mut *tx)
        .await?;
        let (last_id, last_hash) = head.ok_or_else(|| {
            AuditError::Corrupt(format!(
                "chain {:?} has no head record (audit_heads)",
                self.chain_id
            ))
        })?;
        let links = chain_links(last_id, last_hash, batch.iter().map(|(f, _)| &**f))?;
        let mut start = 0;
        while start < batch.len() {
            let n = chunk_len(batch.len() - start);
            let (rows, chain) = (&batch[start..start + n], &links[start..start + n]);
            start += n;
            let mut qb = QueryBuilder::<Postgres>::new(
                "INSERT INTO audit (chain_id, seq, time_ms, request_id, subject, key_id, \
                 client_addr, endpoint, model, upstream, status, error_code, prompt_tokens, \
                 completion_tokens, latency_us, redactions, streamed, trace_id, prev_hash, \
                 row_hash) ",
            );
            qb.push_values(
                rows.iter().zip(chain),
                |mut b, ((f, _), (id, prev, row_hash))| {
                    b.push_bind(&self.chain_id)
                        .push_bind(*id)
                        .push_bind(f.time_ms)
                        .push_bind(&f.request_id)
                        .push_bind(&f.subject)
                        .push_bind(&f.key_id)
                        .push_bind(&f.client_addr)
                        .push_bind(&f.endpoint)
                        .push_bind(&f.model)
                        .push_bind(&f.upstream)
                        .push_bind(f.status)
                        .push_bind(&f.error_code)
                        .push_bind(f.prompt_tokens)
                        .push_bind(f.completion_tokens)
                        .push_bind(f.latency_us)
                        .push_bind(f.redactions)
                        .push_bind(f.streamed)
                        .push_bind(&f.trace_id)
                        .push_bind(prev)
                        .push_bind(row_hash);
                },
            );
            qb.build().execute(&mut *tx).await?;
        }
        if let Some((id, _, hash)) = links.last() {
            sqlx::query(
                "UPDATE audit_heads SET last_id = $2, last_hash = $3, updated_ms = $4 \
                 WHERE chain_id = $1",
            )
            .bind(&self.chain_id)
            .bind(*id)
            .bind(hash)
            .bind(clamp_i64(now_ms()))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(links.iter().map(|(id, _, _)| *id).collect())
    }

    /// This replica's chain head.
    pub(crate) async fn head(&self) -> Result<AuditHead, AuditError> {
        let (last_id, last_hash): (i64, String) =
            sqlx::query_as("SELECT last_id, last_hash FROM audit_heads WHERE chain_id = $1")
                .bind(&self.chain_id)
                .fetch_optional(&self.pool)
                .await?
                .ok_or_else(|| {
                    AuditError::Corrupt(format!("chain {:?} has no head record", self.chain_id))
                })?;
        Ok(AuditHead { last_id, last_hash })
    }

    /// Rows of every chain matching `filter`, by time (then chain, then seq).
    pub(crate) async fn query(&self, filter: AuditFilter) -> Result<Vec<AuditRow>, AuditError> {
        query(&self.pool, filter).await
    }

    pub(crate) async fn verify(&self) -> Result<VerifyReport, AuditError> {
        verify(&self.pool, self.trusted_key.as_ref(), &[]).await
    }

    /// Sign every chain's head now, store the checkpoint (and export it); `None` without a key.
    pub(crate) async fn checkpoint(&self) -> Result<Option<Checkpoint>, AuditError> {
        let Some(key) = &self.signing_key else {
            return Ok(None);
        };
        let heads: Vec<ChainHead> = sqlx::query_as::<_, (String, i64, String)>(
            "SELECT chain_id, last_id, last_hash FROM audit_heads",
        )
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|(chain_id, last_id, last_hash)| ChainHead {
            chain_id,
            last_id,
            last_hash,
        })
        .collect();
        let time_ms = clamp_i64(now_ms());
        let mut cp = key.sign(time_ms, &self.chain_id, heads).ok_or_else(|| {
            AuditError::Corrupt("a chain head's hash is not 64 lowercase hex digits".into())
        })?;
        let heads_json = serde_json::to_string(&cp.heads)
            .map_err(|e| AuditError::Corrupt(format!("checkpoint heads: {e}")))?;
        cp.id = sqlx::query_scalar(
            "INSERT INTO audit_checkpoints (time_ms, signer, public_key, heads, signature) \
             VALUES ($1, $2, $3, $4, $5) RETURNING id",
        )
        .bind(cp.time_ms)
        .bind(&cp.signer)
        .bind(&cp.public_key)
        .bind(&heads_json)
        .bind(&cp.signature)
        .fetch_one(&self.pool)
        .await?;
        let line = serde_json::to_string(&cp)
            .map_err(|e| AuditError::Corrupt(format!("checkpoint: {e}")))?;
        tracing::info!(
            target: "securellm_gateway::audit::checkpoint",
            id = cp.id,
            chains = cp.heads.len(),
            checkpoint = %line,
            "signed audit checkpoint"
        );
        if let Some(path) = &self.export_file {
            let _g = self.export_lock.lock().await;
            append_line(path, &line).map_err(|e| {
                AuditError::Db(sqlx::Error::Io(std::io::Error::new(
                    e.kind(),
                    format!("checkpoint export {}: {e}", path.display()),
                )))
            })?;
        }
        crate::observe::audit_checkpoint();
        Ok(Some(cp))
    }
}

/// Append `line` and a newline to `path` (created 0600), fsynced.
fn append_line(path: &Path, line: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(format!("{line}\n").as_bytes())?;
    f.sync_data()
}

/// Checkpoints exported to `path` (one JSON object a line; blank lines and an unfinished last
/// line skipped).
pub fn read_export(path: &Path) -> Result<Vec<Checkpoint>, AuditError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        AuditError::Db(sqlx::Error::Io(std::io::Error::new(
            e.kind(),
            format!("{}: {e}", path.display()),
        )))
    })?;
    // A last line without its newline is a write cut short by a crash: not a checkpoint yet.
    let complete = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => "",
    };
    complete
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| {
                AuditError::Corrupt(format!(
                    "{} line {}: not a checkpoint: {e}",
                    path.display(),
                    i + 1
                ))
            })
        })
        .collect()
}

/// Whether a failed batch may succeed on retry (the connection, not the data, was at fault).
pub(crate) fn transient(e: &AuditError) -> bool {
    match e {
        AuditError::Db(e) => match e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(d) => d.code().is_some_and(|c| {
                // connection exception, operator intervention (shutdown, cannot connect now),
                // insufficient resources, serialization failure / deadlock.
                c.starts_with("08")
                    || c.starts_with("57P")
                    || c.starts_with("53")
                    || c == "40001"
                    || c == "40P01"
            }),
            _ => false,
        },
        _ => false,
    }
}

async fn query(pool: &PgPool, filter: AuditFilter) -> Result<Vec<AuditRow>, AuditError> {
    let mut qb = QueryBuilder::<Postgres>::new(format!(
        "SELECT chain_id, seq AS {COLUMNS} FROM audit WHERE TRUE"
    ));
    if let Some(v) = filter.since_ms {
        qb.push(" AND time_ms >= ").push_bind(clamp_i64(v));
    }
    if let Some(v) = filter.until_ms {
        qb.push(" AND time_ms < ").push_bind(clamp_i64(v));
    }
    if let Some(v) = filter.chain_id {
        qb.push(" AND chain_id = ").push_bind(v);
    }
    if let Some(v) = filter.subject {
        qb.push(" AND subject = ").push_bind(v);
    }
    if let Some(v) = filter.key_id {
        qb.push(" AND key_id = ").push_bind(v);
    }
    if let Some(v) = filter.model {
        qb.push(" AND model = ").push_bind(v);
    }
    if let Some(v) = filter.status_min {
        qb.push(" AND status >= ").push_bind(i64::from(v));
    }
    if let Some(v) = filter.status_max {
        qb.push(" AND status <= ").push_bind(i64::from(v));
    }
    if let Some(v) = filter.after_id {
        qb.push(" AND seq > ").push_bind(v);
    }
    if let Some(v) = filter.before_id {
        qb.push(" AND seq < ").push_bind(v);
    }
    qb.push(if filter.newest_first {
        " ORDER BY time_ms DESC, chain_id DESC, seq DESC"
    } else {
        " ORDER BY time_ms, chain_id, seq"
    });
    qb.push(" LIMIT ")
        .push_bind(i64::from(effective_limit(filter.limit)));
    let rows = qb.build().fetch_all(pool).await?;
    rows.iter()
        .map(|r| {
            let mut row = audit_row(r)?;
            row.chain_id = r.try_get("chain_id")?;
            Ok(row)
        })
        .collect()
}

/// A read-only view of the shared log (what `securellm audit tail` reads).
pub struct Reader {
    pool: PgPool,
}

/// Connect to the shared log at `url` for reading.
pub async fn open_reader(url: &str) -> Result<Reader, AuditError> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await?;
    Ok(Reader { pool })
}

impl Reader {
    /// Rows of every chain matching `filter`, by time.
    pub async fn query(&self, filter: AuditFilter) -> Result<Vec<AuditRow>, AuditError> {
        query(&self.pool, filter).await
    }
}

/// Verify every chain and every checkpoint on the database at `url` (read-only), plus the
/// checkpoints of an export file; `trusted` pins the signers' public key.
pub async fn verify_url(
    url: &str,
    trusted: Option<&[u8; 32]>,
    exported: &[Checkpoint],
) -> Result<VerifyReport, AuditError> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await?;
    let r = verify(&pool, trusted, exported).await;
    pool.close().await;
    r
}

/// See the module doc, "Verification".
pub(crate) async fn verify(
    pool: &PgPool,
    trusted: Option<&[u8; 32]>,
    exported: &[Checkpoint],
) -> Result<VerifyReport, AuditError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let chains: Vec<String> = sqlx::query_scalar(
        "SELECT chain_id FROM audit_heads UNION SELECT DISTINCT chain_id FROM audit ORDER BY 1",
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut rows_checked = 0u64;
    let mut ends: HashMap<String, i64> = HashMap::new();
    for chain in &chains {
        let mut walker = Walker::new();
        let mut early = None;
        {
            let mut rows =
                sqlx::query("SELECT seq AS id, * FROM audit WHERE chain_id = $1 ORDER BY seq")
                    .bind(chain)
                    .fetch(&mut *tx);
            while let Some(r) = rows.try_next().await? {
                if let Some(report) = walker.push(RawRow::read(&r)?) {
                    early = Some(report);
                    break;
                }
            }
        }
        let report = match early {
            Some(r) => r,
            None => {
                let head: Option<(i64, String)> = sqlx::query_as(
                    "SELECT last_id, last_hash FROM audit_heads WHERE chain_id = $1",
                )
                .bind(chain)
                .fetch_optional(&mut *tx)
                .await?;
                walker.finish(
                    head.map(|(last_id, last_hash)| AuditHead { last_id, last_hash })
                        .ok_or_else(|| format!("chain {chain:?} has no head record")),
                )
            }
        };
        if !report.ok {
            tx.rollback().await?;
            return Ok(VerifyReport {
                detail: format!("chain {chain:?}: {}", report.detail),
                rows_checked: rows_checked + report.rows_checked,
                chain_id: Some(chain.clone()),
                chains: chains.len() as u64,
                ..report
            });
        }
        rows_checked += report.rows_checked;
        ends.insert(chain.clone(), report.rows_checked as i64);
    }

    let stored: Vec<(i64, i64, String, String, String, String)> = sqlx::query_as(
        "SELECT id, time_ms, signer, public_key, heads, signature FROM audit_checkpoints \
         ORDER BY id",
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut checkpoints = Vec::with_capacity(stored.len() + exported.len());
    let broken = |chain_id: Option<String>, kind, detail: String| VerifyReport {
        ok: false,
        rows_checked,
        first_bad_row_id: None,
        kind: Some(kind),
        detail,
        last_hash: String::new(),
        chain_id,
        chains: chains.len() as u64,
        checkpoints_checked: 0,
    };
    for (id, time_ms, signer, public_key, heads, signature) in stored {
        let Ok(heads) = serde_json::from_str::<Vec<ChainHead>>(&heads) else {
            tx.rollback().await?;
            return Ok(broken(
                None,
                TamperKind::Edited,
                format!("checkpoint #{id}: its chain heads cannot be read: it was edited"),
            ));
        };
        checkpoints.push(Checkpoint {
            id,
            time_ms,
            signer,
            public_key,
            heads,
            signature,
        });
    }
    let in_db: HashSet<&str> = checkpoints.iter().map(|c| c.signature.as_str()).collect();
    for cp in exported {
        if !in_db.contains(cp.signature.as_str()) {
            tx.rollback().await?;
            return Ok(broken(
                None,
                TamperKind::Deleted,
                format!(
                    "the exported checkpoint signed by {} at {} ms is not in the database: \
                     checkpoints were deleted",
                    cp.signer, cp.time_ms
                ),
            ));
        }
    }
    // An exported checkpoint found in the database is that same checkpoint (the signature
    // covers its content), so it is checked there.
    let all: Vec<&Checkpoint> = checkpoints.iter().collect();
    for cp in &all {
        if let Err(e) = checkpoint::check_signature(cp, trusted) {
            tx.rollback().await?;
            let what = if cp.id > 0 {
                format!("checkpoint #{}", cp.id)
            } else {
                format!("the exported checkpoint of {} ms", cp.time_ms)
            };
            return Ok(broken(
                None,
                TamperKind::Edited,
                format!("{what}: {e}: it was edited or forged"),
            ));
        }
    }
    // The stored hash of every row a checkpoint signed, in one statement.
    let mut want_chain = Vec::new();
    let mut want_seq = Vec::new();
    for cp in &all {
        for h in cp.heads.iter().filter(|h| h.last_id > 0) {
            want_chain.push(h.chain_id.clone());
            want_seq.push(h.last_id);
        }
    }
    let found: HashMap<(String, i64), String> = sqlx::query_as::<_, (String, i64, String)>(
        "SELECT a.chain_id, a.seq, a.row_hash FROM audit a \
         JOIN (SELECT DISTINCT * FROM unnest($1::text[], $2::bigint[]) AS w(chain_id, seq)) w \
         ON a.chain_id = w.chain_id AND a.seq = w.seq",
    )
    .bind(&want_chain)
    .bind(&want_seq)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|(c, s, h)| ((c, s), h))
    .collect();
    tx.rollback().await?;
    for cp in &all {
        let lookup = |c: &str, s: i64| found.get(&(c.to_string(), s)).cloned();
        let end = |c: &str| ends.get(c).copied().unwrap_or(0);
        if let Some(b) = checkpoint::check_claims(cp, lookup, end) {
            let mut r = broken(Some(b.chain_id), b.kind, b.detail);
            r.first_bad_row_id = Some(b.row);
            return Ok(r);
        }
    }
    let mut notes = Vec::new();
    if all.is_empty() && rows_checked > 0 {
        notes.push(
            "no signed checkpoint yet: a cut tail or a chain rewritten whole cannot be ruled out"
                .to_string(),
        );
    } else if trusted.is_none() && !all.is_empty() {
        notes.push(
            "signatures checked against the keys the checkpoints state (pin the signer's public \
             key to rule out a re-signed forgery)"
                .to_string(),
        );
    }
    Ok(VerifyReport {
        ok: true,
        rows_checked,
        first_bad_row_id: None,
        kind: None,
        detail: format!(
            "{} chain(s), {rows_checked} rows, {} checkpoint(s) verified{}",
            chains.len(),
            all.len(),
            notes.iter().map(|n| format!("; {n}")).collect::<String>()
        ),
        last_hash: String::new(),
        chain_id: None,
        chains: chains.len() as u64,
        checkpoints_checked: all.len() as u64,
    })
}
