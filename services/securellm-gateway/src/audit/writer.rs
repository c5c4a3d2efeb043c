//! The writer task: it owns the write connection, takes whatever entries are queued as one batch,
//! chains them onto the head and commits them in ONE transaction (one fsync), then acknowledges
//! each (see the module doc of [`super`], "Durability and group commit").

use std::sync::Arc;
use std::sync::atomic::Ordering;

use sqlx::sqlite::SqliteConnection;
use sqlx::{Connection, QueryBuilder, Sqlite};
use tokio::sync::{mpsc, oneshot};

use super::encoding::Fields;
use super::pg::{self, PgStore};
use super::{Ack, AuditError, AuditOptions, Cmd, Counters, read_head};

/// Where the writer commits: its own SQLite connection, or this replica's chain on PostgreSQL.
pub(super) enum Sink {
    Sqlite(SqliteConnection),
    Postgres(Arc<PgStore>),
}

impl Sink {
    async fn write_batch(
        &mut self,
        batch: &[(Box<Fields>, Option<Ack>)],
    ) -> Result<Vec<i64>, AuditError> {
        match self {
            Self::Sqlite(conn) => write_batch(conn, batch).await,
            Self::Postgres(store) => store.write_batch(batch).await,
        }
    }

    /// Whether a failed batch is worth retrying (see `pg.rs`, "When the database is away"); a
    /// local file's failures are not.
    fn retry(&self, e: &AuditError) -> bool {
        matches!(self, Self::Postgres(_)) && pg::transient(e)
    }

    async fn close(self) {
        match self {
            Self::Sqlite(conn) => {
                let _ = conn.close().await;
            }
            Self::Postgres(_) => {}
        }
    }
}

/// Chain `rows` onto the head (`last_id`, `last_hash`): each row's (id, prev_hash, row_hash).
pub(super) fn chain_links<'a>(
    last_id: i64,
    last_hash: String,
    rows: impl Iterator<Item = &'a Fields>,
) -> Result<Vec<(i64, String, String)>, AuditError> {
    let mut id = last_id;
    let mut hash = last_hash;
    let mut links = Vec::with_capacity(rows.size_hint().0);
    for f in rows {
        id = id
            .checked_add(1)
            .ok_or_else(|| AuditError::Corrupt("row id overflow".into()))?;
        let row_hash = f.chain_hash(&hash).ok_or_else(|| {
            AuditError::Corrupt(format!(
                "the head hash {hash:?} is not 64 lowercase hex digits"
            ))
        })?;
        links.push((id, std::mem::replace(&mut hash, row_hash.clone()), row_hash));
    }
    Ok(links)
}

/// Most rows per INSERT statement inside a batch (a power of two).
pub(super) const ROWS_PER_INSERT: usize = 64;

/// The next INSERT's row count: the largest power of two ≤ `left`, at most [`ROWS_PER_INSERT`].
pub(super) fn chunk_len(left: usize) -> usize {
    if left >= ROWS_PER_INSERT {
        ROWS_PER_INSERT
    } else {
        1 << (usize::BITS - 1 - left.leading_zeros())
    }
}

pub(super) async fn run_writer(
    mut sink: Sink,
    mut rx: mpsc::Receiver<Cmd>,
    options: AuditOptions,
    counters: Arc<Counters>,
) {
    let max_batch = options.max_batch.max(1);
    let mut batch: Vec<(Box<Fields>, Option<Ack>)> = Vec::with_capacity(max_batch);
    let mut flushes: Vec<oneshot::Sender<Result<(), AuditError>>> = Vec::new();
    let mut close: Option<oneshot::Sender<()>> = None;
    while let Some(first) = rx.recv().await {
        let mut stop = accept(first, &mut batch, &mut flushes, &mut close);
        // With a linger, the writer sleeps it out once and then takes what has queued: one
        // wake-up per batch, not one per row (a flush or close queued meanwhile waits at most the
        // linger).
        let mut lingered = options.linger.is_zero();
        while !stop && batch.len() < max_batch {
            let cmd = match rx.try_recv() {
                Ok(cmd) => cmd,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) if lingered => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    lingered = true;
                    tokio::time::sleep(options.linger).await;
                    continue;
                }
            };
            stop = accept(cmd, &mut batch, &mut flushes, &mut close);
        }
        let outcome = if batch.is_empty() {
            Ok(())
        } else {
            commit(&mut sink, &mut batch, &counters).await
        };
        for f in flushes.drain(..) {
            let _ = f.send(outcome.clone().map_err(AuditError::NotCommitted));
        }
        if let Some(done) = close.take() {
            // Entries queued after the close are dropped unacknowledged (their callers see
            // `Closed`).
            rx.close();
            sink.close().await;
            let _ = done.send(());
            tracing::info!("audit writer closed");
            return;
        }
    }
    sink.close().await;
    tracing::debug!("audit writer stopped: all handles dropped");
}

/// Take one command into the batch; true if the batch should be committed now.
fn accept(
    cmd: Cmd,
    batch: &mut Vec<(Box<Fields>, Option<Ack>)>,
    flushes: &mut Vec<oneshot::Sender<Result<(), AuditError>>>,
    close: &mut Option<oneshot::Sender<()>>,
) -> bool {
    match cmd {
        Cmd::Append(fields, ack) => {
            batch.push((fields, ack));
            false
        }
        Cmd::Flush(ack) => {
            flushes.push(ack);
            true
        }
        Cmd::Close(ack) => {
            *close = Some(ack);
            true
        }
    }
}

/// Write and commit the batch, then acknowledge each entry; the batch is empty afterwards.
async fn commit(
    sink: &mut Sink,
    batch: &mut Vec<(Box<Fields>, Option<Ack>)>,
    counters: &Counters,
) -> Result<(), String> {
    match write_with_retry(sink, batch).await {
        Ok(ids) => {
            counters.batches.fetch_add(1, Ordering::Relaxed);
            counters.rows.fetch_add(ids.len() as u64, Ordering::Relaxed);
            for ((_, ack), id) in batch.drain(..).zip(ids) {
                if let Some(ack) = ack {
                    let _ = ack.send(Ok(id));
                }
            }
            Ok(())
        }
        Err(e) => {
            counters.failed_batches.fetch_add(1, Ordering::Relaxed);
            let message = e.to_string();
            tracing::error!(entries = batch.len(), error = %message, "audit batch not committed");
            for (_, ack) in batch.drain(..) {
                if let Some(ack) = ack {
                    let _ = ack.send(Err(AuditError::NotCommitted(message.clone())));
                }
            }
            Err(message)
        }
    }
}

/// Write the batch; a transient failure is retried with backoff (100 ms doubling to 2 s) for up
/// to [`pg::MAX_OUTAGE`], with one warning when the outage starts and one line when it ends.
async fn write_with_retry(
    sink: &mut Sink,
    batch: &[(Box<Fields>, Option<Ack>)],
) -> Result<Vec<i64>, AuditError> {
    let started = tokio::time::Instant::now();
    let mut delay = std::time::Duration::from_millis(100);
    let mut warned = false;
    loop {
        match sink.write_batch(batch).await {
            Ok(ids) => {
                if warned {
                    tracing::info!(
                        entries = batch.len(),
                        after_ms = started.elapsed().as_millis() as u64,
                        "audit database reachable again; the queued rows are being written"
                    );
                }
                return Ok(ids);
            }
            Err(e) if sink.retry(&e) && started.elapsed() < pg::MAX_OUTAGE => {
                if !warned {
                    warned = true;
                    tracing::warn!(
                        entries = batch.len(),
                        error = %e,
                        "audit database unreachable; retrying the batch (rows queue meanwhile)"
                    );
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
}

/// One transaction: read the head, insert the chained rows, move the head, commit (fsync).
async fn write_batch(
    conn: &mut SqliteConnection,
    batch: &[(Box<Fields>, Option<Ack>)],
) -> Result<Vec<i64>, AuditError> {
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    let head = read_head(&mut tx)
        .await?
        .ok_or_else(|| AuditError::Corrupt("the head record (audit_head) is missing".into()))?;
    let links = chain_links(
        head.last_id,
        head.last_hash,
        batch.iter().map(|(f, _)| &**f),
    )?;
    // Multi-row INSERTs (19 parameters a row, well under SQLite's 32766) of power-of-two sizes
    // up to ROWS_PER_INSERT: at most seven distinct statements, so each is prepared once and then
    // comes from the connection's statement cache (a statement per batch size would be prepared
    // on almost every batch).
    let mut start = 0;
    while start < batch.len() {
        let n = chunk_len(batch.len() - start);
        let (rows, chain) = (&batch[start..start + n], &links[start..start + n]);
        start += n;
        let mut qb = QueryBuilder::<Sqlite>::new(
            "INSERT INTO audit (id, time_ms, request_id, subject, key_id, client_addr, endpoint, \
             model, upstream, status, error_code, prompt_tokens, completion_tokens, latency_us, \
             redactions, streamed, trace_id, prev_hash, row_hash) ",
        );
        qb.push_values(
            rows.iter().zip(chain),
            |mut b, ((f, _), (id, prev, row_hash))| {
                b.push_bind(*id)
                    .push_bind(f.time_ms)
                    .push_bind(f.request_id.clone())
                    .push_bind(f.subject.clone())
                    .push_bind(f.key_id.clone())
                    .push_bind(f.client_addr.clone())
                    .push_bind(f.endpoint.clone())
                    .push_bind(f.model.clone())
                    .push_bind(f.upstream.clone())
                    .push_bind(f.status)
                    .push_bind(f.error_code.clone())
                    .push_bind(f.prompt_tokens)
                    .push_bind(f.completion_tokens)
                    .push_bind(f.latency_us)
                    .push_bind(f.redactions)
                    .push_bind(f.streamed)
                    .push_bind(f.trace_id.clone())
                    .push_bind(prev.clone())
                    .push_bind(row_hash.clone());
            },
        );
        qb.build().execute(&mut *tx).await?;
    }
    let ids = links.iter().map(|(id, _, _)| *id).collect();
    if let Some((id, _, hash)) = links.last() {
        sqlx::query("UPDATE audit_head SET last_id = ?, last_hash = ? WHERE id = 1")
            .bind(id)
            .bind(hash)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(ids)
}
