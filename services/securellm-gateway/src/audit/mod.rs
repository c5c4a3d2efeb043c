//! Tamper-evident audit log: one row per request, allowed or denied, in an append-only SQLite
//! table whose rows form a SHA-256 hash chain.
//!
//! # What a row holds
//! Time (unix ms), request id, subject, key id (never the key), client address, endpoint, model,
//! upstream, HTTP status, error code (empty when none), prompt / completion tokens, latency (µs),
//! redaction count and whether the response was streamed. Prompt text is never stored. Each text
//! field is cut to [`MAX_FIELD_BYTES`] (at a character boundary), so a caller-controlled value such
//! as a model name cannot bloat the log; a time or latency above `i64::MAX` is stored as
//! `i64::MAX` (SQLite integers are signed 64-bit). An entry with `time_ms == 0` gets the time it is queued.
//!
//! # The chain and its canonical encoding
//! Row `n` (ids are consecutive from 1) stores `prev_hash` — row `n-1`'s `row_hash`, or 64 zeros
//! for row 1 — and
//!
//! ```text
//! row_hash = lowercase_hex(SHA-256(P || E))
//! P = the 32 bytes that prev_hash (64 lowercase hex digits) decodes to
//! E = "SLAUDIT1"                    (8 ASCII bytes: format tag, version 1)
//!     || i64(time_ms) || s(request_id) || s(subject) || s(key_id) || s(client_addr)
//!     || s(endpoint) || s(model) || s(upstream) || i64(status) || s(error_code)
//!     || i64(prompt_tokens) || i64(completion_tokens) || i64(latency_us)
//!     || i64(redactions) || i64(streamed: 1 or 0)
//! i64(x) = x as 8 bytes, big-endian two's complement (the value exactly as SQLite stores it)
//! s(x)   = the UTF-8 byte length of x as 8 bytes, big-endian, then those bytes
//! ```
//!
//! Fields come in this fixed order with fixed widths or length prefixes, so no two different rows
//! encode to the same bytes (no field-boundary confusion: `("ab", "c")` and `("a", "bc")` differ
//! in their length prefixes). The row id is not hashed: the chain itself fixes each row's
//! position (row `n` is the `n`-th link), and `verify` checks that ids run 1, 2, 3, … .
//! [`canonical_encoding`] and [`chain_hash`] expose the computation for outside verifiers.
//!
//! The table also has triggers that refuse `UPDATE` and `DELETE`; they stop mistakes, not someone
//! who can write the file (who can drop them). Detection is the chain's job.
//!
//! # Verification
//! [`AuditLog::verify`] and [`verify_file`] read every row in id order inside one read
//! transaction (one consistent snapshot, also against a live writer) and report the first
//! problem: a gap in the ids (`Deleted`), a row whose stored hash does not match its content
//! (`Edited`), a row that the next row's `prev_hash` skips (`Inserted`), a broken link between
//! two individually valid rows (reported as `Deleted` at the later row: rows between them were
//! removed and the rest renumbered — or the earlier row was rewritten together with a recomputed
//! hash; the two are indistinguishable without a secret, and the detail says so). A separate head
//! record (table `audit_head`: last id + last hash, updated in the same transaction as every
//! batch) catches what a shorter but valid chain would hide: rows removed from the end
//! (`Truncated`), rows appended around the writer (`Inserted`), a rewritten last row (`Edited`).
//! The chain is unkeyed: someone who can write the file can rebuild all of it, head included.
//! Against that, copy [`AuditLog::head`] (or [`VerifyReport::last_hash`]) somewhere they cannot
//! write; a later verify whose chain no longer passes through that hash exposes the rewrite.
//!
//! # Durability and group commit
//! One writer task owns the write connection (WAL mode, `synchronous = FULL`: every commit is
//! fsynced before it returns). Callers send entries over a bounded channel; the writer takes
//! whatever is queued (up to [`AuditOptions::max_batch`], by default 256) as one batch and writes
//! it in ONE `BEGIN IMMEDIATE` transaction: it reads the head, chains the rows in order, updates
//! the head, commits (one fsync), and only then acknowledges each entry with its row id. While one
//! batch's fsync runs, the next batch accumulates, so no timer is needed to batch under load
//! ([`AuditOptions::linger`] can add one) and an idle log commits a lone entry at once. Reading the
//! head inside the write transaction also means two writers on one file (say a restarted gateway
//! whose old writer is still draining) extend the same chain instead of forking it.
//!
//! What a crash (`kill -9`, power loss) can lose: exactly the entries not yet acknowledged — those
//! still in the channel and those in the batch being written. An entry whose [`AuditLog::append`]
//! returned `Ok(id)` (or whose [`AppendPermit::send`] future did) is committed and fsynced and
//! survives both. Entries given to [`AuditLog::append_nowait`] are only as safe as the next
//! commit: a crash before it loses them (at most the queue, [`AuditOptions::queue_capacity`], plus
//! one batch); [`AuditLog::flush`] waits for them. The gateway queues a request's row without
//! waiting when it answers, unless `audit_mode = "sync"`: so by default a response can reach its
//! client before its row is committed, and a crash loses the rows of the requests answered in
//! about the last commit interval (linger + one fsync; longer if the disk stalls and the queue
//! fills); with `sync` no 2xx leaves (no stream ends) before its row is committed.
//!
//! # Refused credentials are aggregated
//! Requests without a valid credential could otherwise write a row each, as fast as they can be
//! sent, without any key. [`AuditLog::append_auth_failure`] writes the first such refusal from a
//! source (an IPv4 address, an IPv6 /64) in a window ([`AuditOptions::auth_failure_window`],
//! 60 s) as a row of its own and only counts the next ones; when the window ends (or at
//! [`AuditLog::flush`] / [`AuditLog::close`]) ONE summary row records them: error code
//! [`AUTH_FAILURES_AGGREGATED`], `request_id` `count:<n>` (the number of refusals it stands for),
//! `client_addr` the source, endpoint and status of the last one. So a source costs at most two
//! rows per window; at most [`MAX_AUTH_FAILURE_SOURCES`] sources are tracked at once, beyond which
//! refusals share one source `*`. `append_nowait` never blocks: with the queue full (the disk stalled) it drops
//! the entry, counts it in [`AuditStats::dropped`] and logs a warning; `append` waits instead.
//! A batch is all-or-nothing: a crash never leaves half a batch or a head that disagrees with the
//! rows. Dropping every handle lets the writer commit what is queued and stop; a dropped `append`
//! future does not withdraw its entry. (`synchronous = FULL` relies on the OS and disk honouring
//! fsync; on macOS SQLite would also need `fullfsync`.)

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{Connection, QueryBuilder, Row, Sqlite};
use tokio::sync::{mpsc, oneshot};

use securellm_common::time::now_ms;

/// `prev_hash` of row 1: 64 zeros.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// First bytes of every canonical encoding (format tag and version).
pub const ENCODING_TAG: &[u8; 8] = b"SLAUDIT1";

/// Longest stored text field, in bytes; longer values are cut at a character boundary.
pub const MAX_FIELD_BYTES: usize = 1024;

/// Most rows one [`AuditLog::query`] returns.
pub const MAX_QUERY_LIMIT: u32 = 10_001;

/// Rows a [`AuditLog::query`] returns when its filter names no limit.
pub const DEFAULT_QUERY_LIMIT: u32 = 100;

/// The error code of a summary row of aggregated authentication failures (see the module doc).
pub const AUTH_FAILURES_AGGREGATED: &str = "auth_failures_aggregated";

/// Sources of authentication failures tracked at once; beyond, they share the source `*`.
pub const MAX_AUTH_FAILURE_SOURCES: usize = 4096;

/// Most rows per INSERT statement inside a batch (a power of two).
const ROWS_PER_INSERT: usize = 64;

/// The next INSERT's row count: the largest power of two ≤ `left`, at most [`ROWS_PER_INSERT`].
fn chunk_len(left: usize) -> usize {
    if left >= ROWS_PER_INSERT {
        ROWS_PER_INSERT
    } else {
        1 << (usize::BITS - 1 - left.leading_zeros())
    }
}

const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

const COLUMNS: &str = "id, time_ms, request_id, subject, key_id, client_addr, endpoint, model, \
     upstream, status, error_code, prompt_tokens, completion_tokens, latency_us, redactions, \
     streamed, prev_hash, row_hash";

/// Audit log errors.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("audit database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The batch carrying this entry failed; nothing of it was acknowledged.
    #[error("audit entry not committed: {0}")]
    NotCommitted(String),
    /// The writer has stopped ([`AuditLog::close`] or the runtime shut down).
    #[error("the audit writer has stopped")]
    Closed,
    #[error("corrupt audit log: {0}")]
    Corrupt(String),
}

/// One request as the audit log records it. Text fields are empty when not known (e.g. no key
/// id for a request that failed authentication).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Unix milliseconds; 0 means "when appended".
    pub time_ms: u64,
    pub request_id: String,
    pub subject: String,
    /// The API key's id (never the key or its hash).
    pub key_id: String,
    pub client_addr: String,
    pub endpoint: String,
    pub model: String,
    pub upstream: String,
    /// HTTP status sent to the client.
    pub status: u16,
    /// Error code sent to the client, empty on success.
    pub error_code: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub latency_us: u64,
    pub redactions: u32,
    pub streamed: bool,
}

/// A stored row: the entry plus its place in the chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRow {
    pub id: i64,
    #[serde(flatten)]
    pub entry: AuditEntry,
    pub prev_hash: String,
    pub row_hash: String,
}

/// Which rows [`AuditLog::query`] returns; every field is optional and they combine with AND.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AuditFilter {
    /// `time_ms >= since_ms`.
    pub since_ms: Option<u64>,
    /// `time_ms < until_ms`.
    pub until_ms: Option<u64>,
    pub subject: Option<String>,
    pub key_id: Option<String>,
    pub model: Option<String>,
    /// `status >= status_min`.
    pub status_min: Option<u16>,
    /// `status <= status_max`.
    pub status_max: Option<u16>,
    /// `id > after_id` (paging forwards).
    pub after_id: Option<i64>,
    /// `id < before_id` (paging backwards).
    pub before_id: Option<i64>,
    /// At most this many rows, capped at [`MAX_QUERY_LIMIT`]; [`DEFAULT_QUERY_LIMIT`] if `None`.
    pub limit: Option<u32>,
    /// Highest ids first (for `audit tail`); otherwise lowest first.
    pub newest_first: bool,
}

/// What [`AuditLog::verify`] found first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TamperKind {
    Edited,
    Inserted,
    Deleted,
    Truncated,
}

impl fmt::Display for TamperKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Edited => "edited",
            Self::Inserted => "inserted",
            Self::Deleted => "deleted",
            Self::Truncated => "truncated",
        })
    }
}

/// The result of walking the chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub ok: bool,
    /// Rows verified before the first problem (all rows when `ok`).
    pub rows_checked: u64,
    /// The first bad row (for `Deleted`, the first missing id; for `Truncated`, the first id
    /// past the end of the table); `None` when `ok` or when no row can be named.
    pub first_bad_row_id: Option<i64>,
    pub kind: Option<TamperKind>,
    pub detail: String,
    /// `row_hash` of the last verified row (64 zeros if none): record it elsewhere to detect a
    /// later rewrite of the whole chain.
    pub last_hash: String,
}

/// The head record: the last committed row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditHead {
    pub last_id: i64,
    pub last_hash: String,
}

/// Writer tuning.
#[derive(Clone, Debug)]
pub struct AuditOptions {
    /// Most entries per transaction (one fsync).
    pub max_batch: usize,
    /// How long the writer waits for more entries after the first of a batch. Zero (default):
    /// take what is queued and commit at once; under load the next batch fills during the fsync.
    pub linger: Duration,
    /// Entries that may wait in the channel; `append` waits for room, `append_nowait` drops
    /// (and counts) the entry.
    pub queue_capacity: usize,
    /// The window over which [`AuditLog::append_auth_failure`] aggregates a source's failures.
    pub auth_failure_window: Duration,
}

impl Default for AuditOptions {
    fn default() -> Self {
        Self {
            max_batch: 256,
            linger: Duration::ZERO,
            queue_capacity: 8192,
            auth_failure_window: Duration::from_secs(60),
        }
    }
}

/// Writer counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuditStats {
    /// Committed transactions (each one fsync).
    pub batches: u64,
    /// Committed rows.
    pub rows: u64,
    pub failed_batches: u64,
    /// Entries `append_nowait` dropped (queue full or writer stopped).
    pub dropped: u64,
    /// Entries waiting in the channel now.
    pub queued: usize,
}

#[derive(Default)]
struct Counters {
    batches: AtomicU64,
    rows: AtomicU64,
    failed_batches: AtomicU64,
    dropped: AtomicU64,
}

type Ack = oneshot::Sender<Result<i64, AuditError>>;

enum Cmd {
    Append(Box<Fields>, Option<Ack>),
    Flush(oneshot::Sender<Result<(), AuditError>>),
    Close(oneshot::Sender<()>),
}

struct Shared {
    tx: mpsc::Sender<Cmd>,
    pool: SqlitePool,
    counters: Arc<Counters>,
    path: PathBuf,
    failures: std::sync::Mutex<Failures>,
}

/// Authentication failures per source in the current window.
struct Failures {
    window: Duration,
    sources: std::collections::HashMap<String, FailureWindow>,
}

struct FailureWindow {
    started: tokio::time::Instant,
    /// Failures after the first (which has its own row).
    more: u64,
    /// The last of them.
    last: Option<AuditEntry>,
}

/// Where failures are counted: the address, or its /64 for IPv6 (one host usually holds a whole
/// /64); anything else as given.
fn failure_source(client: &str) -> String {
    match client.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_none() => {
            let s = v6.segments();
            let prefix = std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
            format!("{prefix}/64")
        }
        Ok(std::net::IpAddr::V6(v6)) => v6
            .to_ipv4_mapped()
            .map_or_else(|| client.to_string(), |v4| v4.to_string()),
        _ => client.to_string(),
    }
}

/// The summary row of a window, if it counted failures after its first.
fn failure_summary(source: &str, w: FailureWindow) -> Option<AuditEntry> {
    let last = w.last.filter(|_| w.more > 0)?;
    Some(AuditEntry {
        time_ms: now_ms(),
        request_id: format!("count:{}", w.more),
        client_addr: source.to_string(),
        endpoint: last.endpoint,
        status: last.status,
        error_code: AUTH_FAILURES_AGGREGATED.into(),
        ..AuditEntry::default()
    })
}

/// Room for one entry in the writer's queue (see [`AuditLog::reserve`]).
pub struct AppendPermit<'a> {
    permit: mpsc::Permit<'a, Cmd>,
}

impl AppendPermit<'_> {
    /// Queue `entry` (it will be written even if the returned future is dropped) and return a
    /// future that resolves with its row id once it is committed and fsynced.
    pub fn send(
        self,
        entry: AuditEntry,
    ) -> impl std::future::Future<Output = Result<i64, AuditError>> + Send + 'static {
        let (ack, done) = oneshot::channel();
        self.permit.send(Cmd::Append(prepare(entry), Some(ack)));
        async move { done.await.map_err(|_| AuditError::Closed)? }
    }
}

/// Handle to an audit log: cheap to clone; the writer stops when the last handle is dropped
/// (after committing what is queued) or on [`AuditLog::close`].
#[derive(Clone)]
pub struct AuditLog {
    shared: Arc<Shared>,
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.shared.path)
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Open (creating and migrating) the log at `path` with default options and start its writer.
    /// Must be called inside a tokio runtime.
    pub async fn open(path: &Path) -> Result<Self, AuditError> {
        Self::open_with(path, AuditOptions::default()).await
    }

    /// [`AuditLog::open`] with explicit writer options. The file (and SQLite's `-wal` / `-shm`
    /// beside it) is made readable and writable by this user only (0600).
    pub async fn open_with(path: &Path, options: AuditOptions) -> Result<Self, AuditError> {
        crate::private_file(path).map_err(|e| {
            AuditError::Db(sqlx::Error::Io(std::io::Error::new(
                e.kind(),
                format!("{}: {e}", path.display()),
            )))
        })?;
        let write_opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT);
        let mut conn = SqliteConnection::connect_with(&write_opts).await?;
        sqlx::migrate!("./migrations").run(&mut conn).await?;
        let head = read_head(&mut conn)
            .await?
            .ok_or_else(|| AuditError::Corrupt("the head record (audit_head) is missing".into()))?;
        let read_opts = SqliteConnectOptions::new()
            .filename(path)
            .read_only(true)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .min_connections(0)
            .connect_lazy_with(read_opts);
        tracing::info!(
            path = %path.display(),
            last_id = head.last_id,
            last_hash = %head.last_hash,
            "audit log opened"
        );
        let (tx, rx) = mpsc::channel(options.queue_capacity.max(1));
        let counters = Arc::new(Counters::default());
        let window = options.auth_failure_window.max(Duration::from_millis(1));
        tokio::spawn(run_writer(conn, rx, options, Arc::clone(&counters)));
        let shared = Arc::new(Shared {
            tx,
            pool,
            counters,
            path: path.to_path_buf(),
            failures: std::sync::Mutex::new(Failures {
                window,
                sources: Default::default(),
            }),
        });
        // Writes the summaries of windows that ended; stops with the last handle.
        let weak = Arc::downgrade(&shared);
        let tick = (window / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(tick).await;
                let Some(shared) = weak.upgrade() else {
                    return;
                };
                AuditLog { shared }.end_failure_windows(false);
            }
        });
        Ok(Self { shared })
    }

    /// Record a request refused for want of a valid credential (no key id known), aggregated per
    /// source and window (see the module doc): the first in a window is queued as its own row,
    /// the next ones only counted, and the window's summary row is queued when it ends. Never
    /// blocks (as [`AuditLog::append_nowait`]).
    pub fn append_auth_failure(&self, entry: AuditEntry) {
        let source = failure_source(&entry.client_addr);
        let now = tokio::time::Instant::now();
        let mut summary = None;
        {
            let mut f = self
                .shared
                .failures
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let window = f.window;
            let key = if f.sources.len() >= MAX_AUTH_FAILURE_SOURCES
                && !f.sources.contains_key(&source)
            {
                "*".to_string()
            } else {
                source
            };
            if let Some(w) = f.sources.get_mut(&key)
                && now < w.started + window
            {
                w.more += 1;
                w.last = Some(entry);
                return;
            }
            if let Some(old) = f.sources.remove(&key) {
                summary = failure_summary(&key, old);
            }
            f.sources.insert(
                key,
                FailureWindow {
                    started: now,
                    more: 0,
                    last: None,
                },
            );
        }
        if let Some(s) = summary {
            self.append_nowait(s);
        }
        self.append_nowait(entry);
    }

    /// Queue the summaries of the failure windows that have ended (all of them with `all`).
    fn end_failure_windows(&self, all: bool) {
        let now = tokio::time::Instant::now();
        let ended: Vec<(String, FailureWindow)> = {
            let mut f = self
                .shared
                .failures
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let window = f.window;
            let keys: Vec<String> = f
                .sources
                .iter()
                .filter(|(_, w)| all || now >= w.started + window)
                .map(|(k, _)| k.clone())
                .collect();
            keys.into_iter()
                .filter_map(|k| f.sources.remove(&k).map(|w| (k, w)))
                .collect()
        };
        for (source, w) in ended {
            if let Some(s) = failure_summary(&source, w) {
                self.append_nowait(s);
            }
        }
    }

    /// Wait for room in the queue; the permit then queues an entry at once and hands back its
    /// acknowledgement. Dropping this future before it resolves queues nothing (cancel-safe).
    pub async fn reserve(&self) -> Result<AppendPermit<'_>, AuditError> {
        let permit = self
            .shared
            .tx
            .reserve()
            .await
            .map_err(|_| AuditError::Closed)?;
        Ok(AppendPermit { permit })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Queue `entry` and wait until the batch holding it is committed (fsynced); returns its row
    /// id. Waits for room if the queue is full. If this future is dropped after the entry was
    /// queued, the entry is still written.
    pub async fn append(&self, entry: AuditEntry) -> Result<i64, AuditError> {
        let (ack, done) = oneshot::channel();
        self.shared
            .tx
            .send(Cmd::Append(prepare(entry), Some(ack)))
            .await
            .map_err(|_| AuditError::Closed)?;
        done.await.map_err(|_| AuditError::Closed)?
    }

    /// Queue `entry` without waiting (never blocks, callable outside the runtime); it is
    /// committed with the next batch (see the module doc for what a crash can lose). If the
    /// queue is full or the writer has stopped, the entry is dropped, counted in
    /// [`AuditStats::dropped`] and logged (`warn`, throttled); use [`AuditLog::append`] where a lost row
    /// must fail the request.
    pub fn append_nowait(&self, entry: AuditEntry) {
        if let Err(e) = self.shared.tx.try_send(Cmd::Append(prepare(entry), None)) {
            let dropped = self.shared.counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            // Log the 1st, 2nd, 4th, 8th, ... drop: a stalled disk must not flood the log too.
            if dropped.is_power_of_two() {
                let why = match e {
                    mpsc::error::TrySendError::Full(_) => "the audit queue is full",
                    mpsc::error::TrySendError::Closed(_) => "the audit writer has stopped",
                };
                tracing::warn!(dropped_total = dropped, "audit entry dropped: {why}");
            }
        }
    }

    /// Wait until every entry queued before this call has been committed (or has failed, which
    /// the writer logs and counts in [`AuditStats::failed_batches`]); the authentication-failure
    /// windows are ended first, so their summaries are included. Returns at once if the writer
    /// has stopped.
    pub async fn flush(&self) {
        let _ = self.try_flush().await;
    }

    /// [`AuditLog::flush`] that reports: `Closed` if the writer has stopped, `NotCommitted` if
    /// the last batch (the one this flush rode on) failed. Individual `append` calls report
    /// their own failures.
    pub async fn try_flush(&self) -> Result<(), AuditError> {
        self.end_failure_windows(true);
        let (ack, done) = oneshot::channel();
        self.shared
            .tx
            .send(Cmd::Flush(ack))
            .await
            .map_err(|_| AuditError::Closed)?;
        done.await.map_err(|_| AuditError::Closed)?
    }

    /// Commit what is queued before this call, then stop the writer and close its connection.
    /// Later appends (from any clone) fail with [`AuditError::Closed`]; reads still work.
    pub async fn close(&self) {
        self.end_failure_windows(true);
        let (ack, done) = oneshot::channel();
        if self.shared.tx.send(Cmd::Close(ack)).await.is_ok() {
            let _ = done.await;
        }
    }

    /// Writer counters.
    pub fn stats(&self) -> AuditStats {
        let c = &self.shared.counters;
        AuditStats {
            batches: c.batches.load(Ordering::Relaxed),
            rows: c.rows.load(Ordering::Relaxed),
            failed_batches: c.failed_batches.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            queued: self
                .shared
                .tx
                .max_capacity()
                .saturating_sub(self.shared.tx.capacity()),
        }
    }

    /// The committed head (last id and hash).
    pub async fn head(&self) -> Result<AuditHead, AuditError> {
        let mut conn = self.shared.pool.acquire().await?;
        read_head(&mut conn)
            .await?
            .ok_or_else(|| AuditError::Corrupt("the head record (audit_head) is missing".into()))
    }

    /// Rows matching `filter`, ordered by id (see [`AuditFilter::newest_first`]).
    pub async fn query(&self, filter: AuditFilter) -> Result<Vec<AuditRow>, AuditError> {
        let mut qb =
            QueryBuilder::<Sqlite>::new(format!("SELECT {COLUMNS} FROM audit WHERE 1 = 1"));
        if let Some(v) = filter.since_ms {
            qb.push(" AND time_ms >= ").push_bind(clamp_i64(v));
        }
        if let Some(v) = filter.until_ms {
            qb.push(" AND time_ms < ").push_bind(clamp_i64(v));
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
            qb.push(" AND id > ").push_bind(v);
        }
        if let Some(v) = filter.before_id {
            qb.push(" AND id < ").push_bind(v);
        }
        qb.push(if filter.newest_first {
            " ORDER BY id DESC"
        } else {
            " ORDER BY id"
        });
        qb.push(" LIMIT ")
            .push_bind(i64::from(effective_limit(filter.limit)));
        let rows = qb.build().fetch_all(&self.shared.pool).await?;
        rows.iter().map(audit_row).collect()
    }

    /// Walk the whole chain (one consistent snapshot) and report the first problem.
    pub async fn verify(&self) -> Result<VerifyReport, AuditError> {
        let mut conn = self.shared.pool.acquire().await?;
        verify_conn(&mut conn).await
    }
}

/// Verify the log in `path` without a running gateway (read-only; the file must exist). Safe
/// to run against a log a gateway is writing.
pub async fn verify_file(path: &Path) -> Result<VerifyReport, AuditError> {
    let opts = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .busy_timeout(BUSY_TIMEOUT);
    let mut conn = SqliteConnection::connect_with(&opts).await?;
    let report = verify_conn(&mut conn).await;
    let _ = conn.close().await;
    report
}

/// The canonical encoding `E` of `entry` as it would be stored (text fields cut, counts
/// clamped); see the module doc.
pub fn canonical_encoding(entry: &AuditEntry) -> Vec<u8> {
    Fields::from_entry(entry.clone()).encode()
}

/// `row_hash` of `entry` stored after a row whose hash is `prev_hash`; `None` if `prev_hash` is
/// not 64 lowercase hex digits.
pub fn chain_hash(prev_hash: &str, entry: &AuditEntry) -> Option<String> {
    Fields::from_entry(entry.clone()).chain_hash(prev_hash)
}

fn effective_limit(limit: Option<u32>) -> u32 {
    limit.unwrap_or(DEFAULT_QUERY_LIMIT).min(MAX_QUERY_LIMIT)
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn clip(mut s: String) -> String {
    if s.len() > MAX_FIELD_BYTES {
        let mut cut = MAX_FIELD_BYTES;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

fn is_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn prepare(mut entry: AuditEntry) -> Box<Fields> {
    if entry.time_ms == 0 {
        entry.time_ms = now_ms();
    }
    Box::new(Fields::from_entry(entry))
}

/// A row's hashed fields exactly as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Fields {
    time_ms: i64,
    request_id: String,
    subject: String,
    key_id: String,
    client_addr: String,
    endpoint: String,
    model: String,
    upstream: String,
    status: i64,
    error_code: String,
    prompt_tokens: i64,
    completion_tokens: i64,
    latency_us: i64,
    redactions: i64,
    streamed: i64,
}

impl Fields {
    fn from_entry(e: AuditEntry) -> Self {
        Self {
            time_ms: clamp_i64(e.time_ms),
            request_id: clip(e.request_id),
            subject: clip(e.subject),
            key_id: clip(e.key_id),
            client_addr: clip(e.client_addr),
            endpoint: clip(e.endpoint),
            model: clip(e.model),
            upstream: clip(e.upstream),
            status: i64::from(e.status),
            error_code: clip(e.error_code),
            prompt_tokens: i64::from(e.prompt_tokens),
            completion_tokens: i64::from(e.completion_tokens),
            latency_us: clamp_i64(e.latency_us),
            redactions: i64::from(e.redactions),
            streamed: i64::from(e.streamed),
        }
    }

    fn from_row(r: &SqliteRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            time_ms: r.try_get("time_ms")?,
            request_id: r.try_get("request_id")?,
            subject: r.try_get("subject")?,
            key_id: r.try_get("key_id")?,
            client_addr: r.try_get("client_addr")?,
            endpoint: r.try_get("endpoint")?,
            model: r.try_get("model")?,
            upstream: r.try_get("upstream")?,
            status: r.try_get("status")?,
            error_code: r.try_get("error_code")?,
            prompt_tokens: r.try_get("prompt_tokens")?,
            completion_tokens: r.try_get("completion_tokens")?,
            latency_us: r.try_get("latency_us")?,
            redactions: r.try_get("redactions")?,
            streamed: r.try_get("streamed")?,
        })
    }

    fn into_entry(self, id: i64) -> Result<AuditEntry, AuditError> {
        fn conv<T: TryFrom<i64>>(id: i64, field: &str, v: i64) -> Result<T, AuditError> {
            T::try_from(v).map_err(|_| {
                AuditError::Corrupt(format!("row {id}: {field} = {v} is out of range"))
            })
        }
        let streamed = match self.streamed {
            0 => false,
            1 => true,
            v => {
                return Err(AuditError::Corrupt(format!(
                    "row {id}: streamed = {v} is not 0 or 1"
                )));
            }
        };
        Ok(AuditEntry {
            time_ms: conv(id, "time_ms", self.time_ms)?,
            request_id: self.request_id,
            subject: self.subject,
            key_id: self.key_id,
            client_addr: self.client_addr,
            endpoint: self.endpoint,
            model: self.model,
            upstream: self.upstream,
            status: conv(id, "status", self.status)?,
            error_code: self.error_code,
            prompt_tokens: conv(id, "prompt_tokens", self.prompt_tokens)?,
            completion_tokens: conv(id, "completion_tokens", self.completion_tokens)?,
            latency_us: conv(id, "latency_us", self.latency_us)?,
            redactions: conv(id, "redactions", self.redactions)?,
            streamed,
        })
    }

    fn encode(&self) -> Vec<u8> {
        fn int(out: &mut Vec<u8>, v: i64) {
            out.extend_from_slice(&v.to_be_bytes());
        }
        fn text(out: &mut Vec<u8>, s: &str) {
            // usize -> u64 is lossless on every supported target.
            out.extend_from_slice(&(s.len() as u64).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        let strings = [
            &self.request_id,
            &self.subject,
            &self.key_id,
            &self.client_addr,
            &self.endpoint,
            &self.model,
            &self.upstream,
            &self.error_code,
        ];
        let mut out =
            Vec::with_capacity(8 + 7 * 8 + strings.iter().map(|s| 8 + s.len()).sum::<usize>());
        out.extend_from_slice(ENCODING_TAG);
        int(&mut out, self.time_ms);
        text(&mut out, &self.request_id);
        text(&mut out, &self.subject);
        text(&mut out, &self.key_id);
        text(&mut out, &self.client_addr);
        text(&mut out, &self.endpoint);
        text(&mut out, &self.model);
        text(&mut out, &self.upstream);
        int(&mut out, self.status);
        text(&mut out, &self.error_code);
        int(&mut out, self.prompt_tokens);
        int(&mut out, self.completion_tokens);
        int(&mut out, self.latency_us);
        int(&mut out, self.redactions);
        int(&mut out, self.streamed);
        out
    }

    fn chain_hash(&self, prev_hash: &str) -> Option<String> {
        if !is_hash(prev_hash) {
            return None;
        }
        let prev = hex::decode(prev_hash).ok()?;
        let mut h = Sha256::new();
        h.update(&prev);
        h.update(self.encode());
        Some(hex::encode(h.finalize()))
    }
}

fn audit_row(r: &SqliteRow) -> Result<AuditRow, AuditError> {
    let id: i64 = r.try_get("id")?;
    Ok(AuditRow {
        id,
        entry: Fields::from_row(r)?.into_entry(id)?,
        prev_hash: r.try_get("prev_hash")?,
        row_hash: r.try_get("row_hash")?,
    })
}

async fn read_head(conn: &mut SqliteConnection) -> Result<Option<AuditHead>, AuditError> {
    let row = sqlx::query("SELECT last_id, last_hash FROM audit_head WHERE id = 1")
        .fetch_optional(&mut *conn)
        .await?;
    match row {
        None => Ok(None),
        Some(r) => Ok(Some(AuditHead {
            last_id: r.try_get("last_id")?,
            last_hash: r.try_get("last_hash")?,
        })),
    }
}

// ---------------------------------------------------------------------------------------------
// Writer

async fn run_writer(
    mut conn: SqliteConnection,
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
        let deadline = tokio::time::Instant::now() + options.linger;
        while !stop && batch.len() < max_batch {
            let cmd = match rx.try_recv() {
                Ok(cmd) => cmd,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    if options.linger.is_zero() {
                        break;
                    }
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(cmd)) => cmd,
                        Ok(None) | Err(_) => break,
                    }
                }
            };
            stop = accept(cmd, &mut batch, &mut flushes, &mut close);
        }
        let outcome = if batch.is_empty() {
            Ok(())
        } else {
            commit(&mut conn, &mut batch, &counters).await
        };
        for f in flushes.drain(..) {
            let _ = f.send(outcome.clone().map_err(AuditError::NotCommitted));
        }
        if let Some(done) = close.take() {
            // Entries queued after the close are dropped unacknowledged (their callers see
            // `Closed`).
            rx.close();
            let _ = conn.close().await;
            let _ = done.send(());
            tracing::info!("audit writer closed");
            return;
        }
    }
    let _ = conn.close().await;
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
    conn: &mut SqliteConnection,
    batch: &mut Vec<(Box<Fields>, Option<Ack>)>,
    counters: &Counters,
) -> Result<(), String> {
    match write_batch(conn, batch).await {
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

/// One transaction: read the head, insert the chained rows, move the head, commit (fsync).
async fn write_batch(
    conn: &mut SqliteConnection,
    batch: &[(Box<Fields>, Option<Ack>)],
) -> Result<Vec<i64>, AuditError> {
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    let head = read_head(&mut tx)
        .await?
        .ok_or_else(|| AuditError::Corrupt("the head record (audit_head) is missing".into()))?;
    let mut id = head.last_id;
    let mut hash = head.last_hash;
    // (id, prev_hash, row_hash) of each entry, chained in order.
    let mut links = Vec::with_capacity(batch.len());
    for (f, _) in batch {
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
    // Multi-row INSERTs (18 parameters a row, well under SQLite's 32766) of power-of-two sizes
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
             redactions, streamed, prev_hash, row_hash) ",
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
                    .push_bind(prev.clone())
                    .push_bind(row_hash.clone());
            },
        );
        qb.build().execute(&mut *tx).await?;
    }
    let ids = links.iter().map(|(id, _, _)| *id).collect();
    sqlx::query("UPDATE audit_head SET last_id = ?, last_hash = ? WHERE id = 1")
        .bind(id)
        .bind(&hash)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(ids)
}

// ---------------------------------------------------------------------------------------------
// Verification

async fn verify_conn(conn: &mut SqliteConnection) -> Result<VerifyReport, AuditError> {
    // One read transaction: the rows and the head come from the same snapshot.
    let mut tx = conn.begin().await?;
    let mut walker = Walker::new();
    let mut early = None;
    {
        let mut rows = sqlx::query(SELECT_CHAIN).fetch(&mut *tx);
        while let Some(r) = rows.try_next().await? {
            if let Some(report) = walker.push(RawRow::read(&r)?) {
                early = Some(report);
                break;
            }
        }
    }
    let report = match early {
        Some(report) => report,
        None => {
            let head = match read_head(&mut tx).await {
                Ok(Some(h)) => Ok(h),
                Ok(None) => Err("the head record (audit_head) is missing".to_string()),
                Err(e) => Err(format!("the head record cannot be read: {e}")),
            };
            walker.finish(head)
        }
    };
    tx.rollback().await?;
    Ok(report)
}

const SELECT_CHAIN: &str = "SELECT id, time_ms, request_id, subject, key_id, client_addr, endpoint, model, upstream, \
     status, error_code, prompt_tokens, completion_tokens, latency_us, redactions, streamed, \
     prev_hash, row_hash FROM audit ORDER BY id";

/// A row as read for verification; undecodable columns make the row fail its content check.
struct RawRow {
    id: i64,
    prev_hash: String,
    row_hash: String,
    fields: Result<Fields, String>,
}

impl RawRow {
    fn read(r: &SqliteRow) -> Result<Self, AuditError> {
        Ok(Self {
            id: r.try_get("id")?,
            prev_hash: r.try_get("prev_hash").unwrap_or_default(),
            row_hash: r.try_get("row_hash").unwrap_or_default(),
            fields: Fields::from_row(r).map_err(|e| e.to_string()),
        })
    }

    /// Ok if the stored row_hash matches the row's content and stored prev_hash.
    fn content_error(&self) -> Option<String> {
        let id = self.id;
        let fields = match &self.fields {
            Ok(f) => f,
            Err(e) => return Some(format!("row {id} cannot be decoded: {e}")),
        };
        if !is_hash(&self.prev_hash) {
            return Some(format!(
                "row {id}'s prev_hash {:?} is not 64 lowercase hex digits",
                self.prev_hash
            ));
        }
        if !is_hash(&self.row_hash) {
            return Some(format!(
                "row {id}'s row_hash {:?} is not 64 lowercase hex digits",
                self.row_hash
            ));
        }
        match fields.chain_hash(&self.prev_hash) {
            Some(h) if h == self.row_hash => None,
            Some(h) => Some(format!(
                "row {id}'s content does not match its row_hash (stored {}, computed {h})",
                self.row_hash
            )),
            None => Some(format!("row {id}'s prev_hash cannot be decoded")),
        }
    }
}

/// A failing row held until the next row shows whether it was inserted.
struct Pending {
    id: i64,
    content_error: Option<String>,
}

struct Walker {
    rows_checked: u64,
    next_id: i64,
    /// row_hash of the last good row (genesis before row 1).
    last_hash: String,
    /// prev_hash of the last good row (None before row 1).
    before_last_hash: Option<String>,
    pending: Option<Pending>,
}

impl Walker {
    fn new() -> Self {
        Self {
            rows_checked: 0,
            next_id: 1,
            last_hash: GENESIS_HASH.to_string(),
            before_last_hash: None,
            pending: None,
        }
    }

    fn bad(&self, id: Option<i64>, kind: TamperKind, detail: String) -> VerifyReport {
        VerifyReport {
            ok: false,
            rows_checked: self.rows_checked,
            first_bad_row_id: id,
            kind: Some(kind),
            detail,
            last_hash: self.last_hash.clone(),
        }
    }

    /// Feed the next row (ascending id); `Some` once the first problem is known.
    fn push(&mut self, row: RawRow) -> Option<VerifyReport> {
        if let Some(p) = self.pending.take() {
            return Some(self.resolve(p, Some(&row)));
        }
        let id = row.id;
        if id < self.next_id {
            return Some(self.bad(
                Some(id),
                TamperKind::Inserted,
                format!("row {id} has an id outside the chain (ids start at 1)"),
            ));
        }
        if id > self.next_id {
            let first = self.next_id;
            let detail = if id == first + 1 {
                format!("row {first} is missing")
            } else {
                format!("rows {first} to {} are missing", id - 1)
            };
            return Some(self.bad(Some(first), TamperKind::Deleted, detail));
        }
        let content_error = row.content_error();
        let link_ok = row.prev_hash == self.last_hash;
        if content_error.is_none() && link_ok {
            self.rows_checked += 1;
            self.next_id += 1;
            self.before_last_hash = Some(std::mem::replace(&mut self.last_hash, row.row_hash));
            return None;
        }
        if !link_ok && self.before_last_hash.as_deref() == Some(row.prev_hash.as_str()) {
            // This row links to the row before its predecessor: the predecessor is foreign,
            // though it was counted as good.
            let mut report = self.bad(
                Some(id - 1),
                TamperKind::Inserted,
                format!(
                    "row {id}'s prev_hash skips row {}: row {} was inserted",
                    id - 1,
                    id - 1
                ),
            );
            report.rows_checked = report.rows_checked.saturating_sub(1);
            report.last_hash = row.prev_hash;
            return Some(report);
        }
        self.pending = Some(Pending {
            id,
            content_error: if link_ok {
                content_error
            } else {
                content_error.map(|e| format!("{e}; its prev_hash does not match row {}", id - 1))
            },
        });
        None
    }

    /// Decide a failing row, given the row after it (if any).
    fn resolve(&self, p: Pending, next: Option<&RawRow>) -> VerifyReport {
        let id = p.id;
        if let Some(n) = next
            && n.id == id + 1
            && n.prev_hash == self.last_hash
        {
            let before = if id == 1 {
                "the genesis hash".to_string()
            } else {
                format!("row {}", id - 1)
            };
            return self.bad(
                Some(id),
                TamperKind::Inserted,
                format!(
                    "row {id} is not part of the chain: row {} links directly to {before}",
                    id + 1
                ),
            );
        }
        match p.content_error {
            Some(e) => self.bad(Some(id), TamperKind::Edited, e),
            None => self.bad(
                Some(id),
                TamperKind::Deleted,
                format!(
                    "row {id}'s prev_hash does not match row {}'s row_hash although both rows \
                     match their own hashes: rows before row {id} were deleted and the rest \
                     renumbered, or row {} was rewritten together with its hash",
                    id - 1,
                    id - 1
                ),
            ),
        }
    }

    /// All rows read: settle a pending row, then compare the chain's end with the head record.
    fn finish(mut self, head: Result<AuditHead, String>) -> VerifyReport {
        if let Some(p) = self.pending.take() {
            return self.resolve(p, None);
        }
        let last = self.next_id - 1;
        let head = match head {
            Ok(h) => h,
            Err(e) => {
                return self.bad(
                    None,
                    TamperKind::Truncated,
                    format!("{e}: removal of rows from the end cannot be ruled out"),
                );
            }
        };
        if head.last_id > last {
            let detail = format!(
                "the head record says the log ends at row {} (hash {}), but the table ends at \
                 row {last}: rows {} to {} were removed",
                head.last_id,
                head.last_hash,
                last + 1,
                head.last_id
            );
            return self.bad(Some(last + 1), TamperKind::Truncated, detail);
        }
        if head.last_id < last {
            let detail = format!(
                "rows {} to {last} come after the head record's last row {}: they were \
                 appended around the audit writer",
                head.last_id + 1,
                head.last_id
            );
            return self.bad(Some(head.last_id + 1), TamperKind::Inserted, detail);
        }
        if head.last_hash != self.last_hash {
            let detail = format!(
                "the last row's hash {} differs from the head record's {}: the last row was \
                 rewritten with a recomputed hash (or the head record was edited)",
                self.last_hash, head.last_hash
            );
            return self.bad((last > 0).then_some(last), TamperKind::Edited, detail);
        }
        VerifyReport {
            ok: true,
            rows_checked: self.rows_checked,
            first_bad_row_id: None,
            kind: None,
            detail: format!("{} rows verified, chain intact", self.rows_checked),
            last_hash: self.last_hash,
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn insert_chunks_are_powers_of_two_covering_the_batch() {
        for total in 1..300 {
            let (mut left, mut sizes) = (total, Vec::new());
            while left > 0 {
                let n = chunk_len(left);
                assert!(n.is_power_of_two() && n <= ROWS_PER_INSERT && n <= left);
                sizes.push(n);
                left -= n;
            }
            assert_eq!(sizes.iter().sum::<usize>(), total);
        }
    }

    use super::*;
    use std::process::Stdio;
    use std::time::Instant;

    use sqlx::AssertSqlSafe;
    use tokio::io::{AsyncBufReadExt, BufReader};

    fn entry(n: u64) -> AuditEntry {
        AuditEntry {
            time_ms: 1_700_000_000_000 + n,
            request_id: format!("req-{n}"),
            subject: format!("user-{}", n % 3),
            key_id: format!("key-{}", n % 2),
            client_addr: "127.0.0.1:40000".into(),
            endpoint: "/v1/chat/completions".into(),
            model: if n.is_multiple_of(2) {
                "llama-3-8b"
            } else {
                "gpt-4o"
            }
            .into(),
            upstream: if n.is_multiple_of(2) {
                "local"
            } else {
                "openai"
            }
            .into(),
            status: if n.is_multiple_of(5) { 429 } else { 200 },
            error_code: if n.is_multiple_of(5) {
                "rate_limit_exceeded"
            } else {
                ""
            }
            .into(),
            prompt_tokens: u32::try_from(n).unwrap(),
            completion_tokens: u32::try_from(2 * n).unwrap(),
            latency_us: 1000 + n,
            redactions: u32::try_from(n % 3).unwrap(),
            streamed: n % 2 == 1,
        }
    }

    async fn fresh(n: u64) -> (tempfile::TempDir, PathBuf, AuditLog) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let log = AuditLog::open(&path).await.unwrap();
        for i in 1..=n {
            log.append_nowait(entry(i));
        }
        log.flush().await;
        (dir, path, log)
    }

    /// Run SQL on the file with a connection of its own, as an attacker with file access would
    /// (dropping the append-only triggers first).
    async fn tamper(path: &Path, sql: &str) {
        let mut conn = SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(path))
            .await
            .unwrap();
        sqlx::raw_sql(
            "DROP TRIGGER IF EXISTS audit_no_update; DROP TRIGGER IF EXISTS audit_no_delete; \
             DROP TRIGGER IF EXISTS audit_head_no_delete; \
             DROP TRIGGER IF EXISTS audit_head_forward_only;",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
    }

    async fn insert_raw(path: &Path, id: i64, e: &AuditEntry, prev: &str, hash: &str) {
        let mut conn = SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(path))
            .await
            .unwrap();
        let f = Fields::from_entry(e.clone());
        sqlx::query(
            "INSERT INTO audit (id, time_ms, request_id, subject, key_id, client_addr, endpoint, \
             model, upstream, status, error_code, prompt_tokens, completion_tokens, latency_us, \
             redactions, streamed, prev_hash, row_hash) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(id)
        .bind(f.time_ms)
        .bind(f.request_id)
        .bind(f.subject)
        .bind(f.key_id)
        .bind(f.client_addr)
        .bind(f.endpoint)
        .bind(f.model)
        .bind(f.upstream)
        .bind(f.status)
        .bind(f.error_code)
        .bind(f.prompt_tokens)
        .bind(f.completion_tokens)
        .bind(f.latency_us)
        .bind(f.redactions)
        .bind(f.streamed)
        .bind(prev)
        .bind(hash)
        .execute(&mut conn)
        .await
        .unwrap();
        conn.close().await.unwrap();
    }

    async fn row(log: &AuditLog, id: i64) -> AuditRow {
        let rows = log
            .query(AuditFilter {
                after_id: Some(id - 1),
                limit: Some(1),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(rows[0].id, id);
        rows[0].clone()
    }

    fn assert_bad(r: &VerifyReport, id: Option<i64>, kind: TamperKind) {
        assert!(!r.ok, "{r:?}");
        assert_eq!(r.first_bad_row_id, id, "{r:?}");
        assert_eq!(r.kind, Some(kind), "{r:?}");
    }

    #[test]
    fn encoding_is_length_prefixed_and_matches_the_documented_vector() {
        let a = AuditEntry {
            request_id: "ab".into(),
            subject: "c".into(),
            ..Default::default()
        };
        let b = AuditEntry {
            request_id: "a".into(),
            subject: "bc".into(),
            ..Default::default()
        };
        assert_ne!(canonical_encoding(&a), canonical_encoding(&b));
        assert_ne!(chain_hash(GENESIS_HASH, &a), chain_hash(GENESIS_HASH, &b));
        let enc = canonical_encoding(&AuditEntry::default());
        assert_eq!(enc.len(), 8 + 7 * 8 + 8 * 8);
        assert_eq!(&enc[..8], ENCODING_TAG);
        // Known-answer vector, computed independently (Python, from the module doc).
        let e = AuditEntry {
            time_ms: 1_700_000_000_123,
            request_id: "req-1".into(),
            subject: "alice".into(),
            key_id: "k1".into(),
            client_addr: "127.0.0.1:5000".into(),
            endpoint: "/v1/chat/completions".into(),
            model: "llama".into(),
            upstream: "local".into(),
            status: 200,
            error_code: String::new(),
            prompt_tokens: 12,
            completion_tokens: 34,
            latency_us: 5678,
            redactions: 1,
            streamed: true,
        };
        assert_eq!(
            chain_hash(GENESIS_HASH, &e).unwrap(),
            "67bfff7354f35a741a3eabc5a9bbd83d55e945bb3fb5a08241f82d625384078b"
        );
        assert_eq!(chain_hash("not hex", &e), None);
        // Cut at a character boundary.
        let long = AuditEntry {
            model: "é".repeat(MAX_FIELD_BYTES),
            ..Default::default()
        };
        let f = Fields::from_entry(long);
        assert_eq!(f.model.len(), MAX_FIELD_BYTES);
        assert_eq!(effective_limit(Some(50_000)), MAX_QUERY_LIMIT);
        assert_eq!(effective_limit(None), DEFAULT_QUERY_LIMIT);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_form_a_valid_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let log = AuditLog::open(&path).await.unwrap();
        let mut tasks = Vec::new();
        for t in 0..8u64 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..100u64 {
                    ids.push(log.append(entry(t * 1000 + i)).await.unwrap());
                }
                ids
            }));
        }
        let mut ids = Vec::new();
        for t in tasks {
            ids.extend(t.await.unwrap());
        }
        ids.sort_unstable();
        assert_eq!(ids, (1..=800).collect::<Vec<i64>>());
        let report = log.verify().await.unwrap();
        assert!(report.ok, "{report:?}");
        assert_eq!(report.rows_checked, 800);
        let head = log.head().await.unwrap();
        assert_eq!(head.last_id, 800);
        assert_eq!(head.last_hash, report.last_hash);
        let stats = log.stats();
        println!(
            "8 x 100 awaited appends: {} rows in {} batches",
            stats.rows, stats.batches
        );
        assert_eq!(stats.rows, 800);
        assert!(stats.batches < 800, "{stats:?}");
        assert_eq!(verify_file(&path).await.unwrap(), report);
        // Each row's prev_hash is its predecessor's row_hash.
        let rows = log
            .query(AuditFilter {
                limit: Some(1000),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(rows.len(), 800);
        assert_eq!(rows[0].prev_hash, GENESIS_HASH);
        for w in rows.windows(2) {
            assert_eq!(w[1].prev_hash, w[0].row_hash);
        }
    }

    #[tokio::test]
    async fn triggers_refuse_update_and_delete() {
        let (_dir, path, _log) = fresh(3).await;
        let mut conn = SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(&path))
            .await
            .unwrap();
        for sql in [
            "UPDATE audit SET status = 200 WHERE id = 2",
            "DELETE FROM audit WHERE id = 3",
            "DELETE FROM audit_head",
            "UPDATE audit_head SET last_id = 1",
        ] {
            assert!(
                sqlx::raw_sql(sql).execute(&mut conn).await.is_err(),
                "{sql}"
            );
        }
    }

    #[tokio::test]
    async fn edited_row_is_reported() {
        let (_dir, path, log) = fresh(20).await;
        assert!(log.verify().await.unwrap().ok);
        assert_eq!(row(&log, 5).await.entry.status, 429);
        tamper(&path, "UPDATE audit SET status = 200 WHERE id = 5").await;
        let r = log.verify().await.unwrap();
        assert_bad(&r, Some(5), TamperKind::Edited);
        assert_eq!(r.rows_checked, 4);
        println!("{}", r.detail);
        assert_eq!(verify_file(&path).await.unwrap(), r);
    }

    #[tokio::test]
    async fn edited_hash_column_is_reported() {
        let (_dir, path, log) = fresh(10).await;
        tamper(
            &path,
            "UPDATE audit SET row_hash = upper(row_hash) WHERE id = 3",
        )
        .await;
        assert_bad(&log.verify().await.unwrap(), Some(3), TamperKind::Edited);
    }

    #[tokio::test]
    async fn rewritten_row_with_recomputed_hash_is_reported() {
        let (_dir, path, log) = fresh(10).await;
        let r5 = row(&log, 5).await;
        let mut forged = r5.entry.clone();
        forged.status = 200;
        let hash = chain_hash(&r5.prev_hash, &forged).unwrap();
        tamper(
            &path,
            &format!("UPDATE audit SET status = 200, row_hash = '{hash}' WHERE id = 5"),
        )
        .await;
        let r = log.verify().await.unwrap();
        // Row 5 is self-consistent now; the break shows at row 6's link.
        assert_bad(&r, Some(6), TamperKind::Deleted);
        assert!(r.detail.contains("rewritten"), "{}", r.detail);
    }

    #[tokio::test]
    async fn deleted_row_is_reported() {
        let (_dir, path, log) = fresh(20).await;
        tamper(&path, "DELETE FROM audit WHERE id = 7").await;
        let r = log.verify().await.unwrap();
        assert_bad(&r, Some(7), TamperKind::Deleted);
        assert_eq!(r.rows_checked, 6);
        println!("{}", r.detail);
    }

    #[tokio::test]
    async fn deleted_and_renumbered_row_is_reported() {
        let (_dir, path, log) = fresh(20).await;
        tamper(
            &path,
            "DELETE FROM audit WHERE id = 7; UPDATE audit SET id = -id WHERE id > 7; \
             UPDATE audit SET id = -id - 1 WHERE id < 0; \
             UPDATE audit_head SET last_id = 19, \
               last_hash = (SELECT row_hash FROM audit WHERE id = 19);",
        )
        .await;
        let r = log.verify().await.unwrap();
        assert_bad(&r, Some(7), TamperKind::Deleted);
        println!("{}", r.detail);
    }

    #[tokio::test]
    async fn inserted_rows_are_reported() {
        // A forged row with a correctly computed hash, linked to row 4, later rows renumbered.
        let (_dir, path, log) = fresh(20).await;
        let r4 = row(&log, 4).await;
        let mut forged = entry(999);
        forged.subject = "nobody".into();
        let forged_hash = chain_hash(&r4.row_hash, &forged).unwrap();
        tamper(
            &path,
            "UPDATE audit SET id = -id WHERE id >= 5; UPDATE audit SET id = -id + 1 WHERE id < 0;",
        )
        .await;
        insert_raw(&path, 5, &forged, &r4.row_hash, &forged_hash).await;
        let r = log.verify().await.unwrap();
        assert_bad(&r, Some(5), TamperKind::Inserted);
        assert_eq!(r.rows_checked, 4);
        println!("{}", r.detail);

        // A forged row with made-up hashes.
        let (_dir2, path2, log2) = fresh(20).await;
        tamper(
            &path2,
            "UPDATE audit SET id = -id WHERE id >= 5; UPDATE audit SET id = -id + 1 WHERE id < 0;",
        )
        .await;
        insert_raw(&path2, 5, &entry(999), &"ab".repeat(32), &"cd".repeat(32)).await;
        assert_bad(&log2.verify().await.unwrap(), Some(5), TamperKind::Inserted);

        // A forged first row.
        let (_dir3, path3, log3) = fresh(5).await;
        tamper(
            &path3,
            "UPDATE audit SET id = -id; UPDATE audit SET id = -id + 1 WHERE id < 0;",
        )
        .await;
        let h = chain_hash(GENESIS_HASH, &entry(999)).unwrap();
        insert_raw(&path3, 1, &entry(999), GENESIS_HASH, &h).await;
        assert_bad(&log3.verify().await.unwrap(), Some(1), TamperKind::Inserted);

        // A row appended around the writer (valid link, head not moved).
        let (_dir4, path4, log4) = fresh(5).await;
        let r5 = row(&log4, 5).await;
        let h = chain_hash(&r5.row_hash, &entry(6)).unwrap();
        insert_raw(&path4, 6, &entry(6), &r5.row_hash, &h).await;
        assert_bad(&log4.verify().await.unwrap(), Some(6), TamperKind::Inserted);

        // A row with id 0.
        let (_dir5, path5, log5) = fresh(5).await;
        insert_raw(&path5, 0, &entry(0), GENESIS_HASH, GENESIS_HASH).await;
        assert_bad(&log5.verify().await.unwrap(), Some(0), TamperKind::Inserted);
    }

    #[tokio::test]
    async fn truncation_is_reported_and_the_writer_does_not_heal_it() {
        let (_dir, path, log) = fresh(20).await;
        tamper(&path, "DELETE FROM audit WHERE id > 17").await;
        let r = log.verify().await.unwrap();
        assert_bad(&r, Some(18), TamperKind::Truncated);
        assert_eq!(r.rows_checked, 17);
        println!("{}", r.detail);
        // New rows continue from the head (21), leaving the hole visible as a deletion.
        assert_eq!(log.append(entry(21)).await.unwrap(), 21);
        assert_bad(&log.verify().await.unwrap(), Some(18), TamperKind::Deleted);
    }

    #[tokio::test]
    async fn rewritten_last_row_and_missing_head_are_reported() {
        let (_dir, path, log) = fresh(5).await;
        let r5 = row(&log, 5).await;
        let mut forged = r5.entry.clone();
        forged.status = 500;
        let hash = chain_hash(&r5.prev_hash, &forged).unwrap();
        tamper(
            &path,
            &format!("UPDATE audit SET status = 500, row_hash = '{hash}' WHERE id = 5"),
        )
        .await;
        assert_bad(&log.verify().await.unwrap(), Some(5), TamperKind::Edited);

        let (_dir2, path2, log2) = fresh(5).await;
        tamper(&path2, "DELETE FROM audit_head").await;
        let r = log2.verify().await.unwrap();
        assert_bad(&r, None, TamperKind::Truncated);
        // The writer refuses to extend a chain whose head is gone.
        assert!(matches!(
            log2.append(entry(6)).await,
            Err(AuditError::NotCommitted(_))
        ));
        assert_eq!(log2.stats().failed_batches, 1);
    }

    #[tokio::test]
    async fn reopen_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let log = AuditLog::open(&path).await.unwrap();
        for i in 1..=10 {
            assert_eq!(
                log.append(entry(i)).await.unwrap(),
                i64::try_from(i).unwrap()
            );
        }
        let head = log.head().await.unwrap();
        drop(log);

        let log = AuditLog::open(&path).await.unwrap();
        assert_eq!(log.head().await.unwrap(), head);
        assert_eq!(log.append(entry(11)).await.unwrap(), 11);
        let r11 = row(&log, 11).await;
        assert_eq!(r11.prev_hash, head.last_hash);
        // Entries queued with append_nowait are committed when the last handle is dropped.
        for i in 12..=20 {
            log.append_nowait(entry(i));
        }
        drop(log);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = verify_file(&path).await.unwrap();
            assert!(r.ok, "{r:?}");
            if r.rows_checked == 20 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "queued entries were not committed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let log = AuditLog::open(&path).await.unwrap();
        assert_eq!(log.append(entry(21)).await.unwrap(), 21);
        assert!(log.verify().await.unwrap().ok);
    }

    #[tokio::test]
    async fn close_stops_the_writer_after_committing() {
        let (_dir, path, log) = fresh(0).await;
        let other = log.clone();
        log.append_nowait(entry(1));
        log.close().await;
        assert!(matches!(
            other.append(entry(2)).await,
            Err(AuditError::Closed)
        ));
        other.append_nowait(entry(2));
        assert_eq!(other.stats().dropped, 1);
        assert!(matches!(other.try_flush().await, Err(AuditError::Closed)));
        other.flush().await;
        assert_eq!(verify_file(&path).await.unwrap().rows_checked, 1);
        assert_eq!(log.query(AuditFilter::default()).await.unwrap().len(), 1);
        // Once every connection is gone SQLite removes the -wal and -shm files; the read-only
        // verify_file must still open the database.
        log.shared.pool.close().await;
        drop((log, other));
        let mut conn = SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(&path))
            .await
            .unwrap();
        sqlx::query("SELECT count(*) FROM audit")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        assert!(!path.with_extension("db-wal").exists());
        let r = verify_file(&path).await.unwrap();
        assert!(r.ok && r.rows_checked == 1, "{r:?}");
        assert!(verify_file(&path.with_extension("missing")).await.is_err());
    }

    #[tokio::test]
    async fn acknowledged_rows_are_visible_to_another_connection() {
        let (_dir, path, log) = fresh(0).await;
        for i in 1..=5u64 {
            let e = entry(i);
            let id = log.append(e.clone()).await.unwrap();
            // A fresh connection, not the log's pool.
            let mut conn =
                SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(&path))
                    .await
                    .unwrap();
            let r = sqlx::query("SELECT * FROM audit WHERE id = ?")
                .bind(id)
                .fetch_one(&mut conn)
                .await
                .unwrap();
            assert_eq!(audit_row(&r).unwrap().entry, e);
            conn.close().await.unwrap();
        }
        log.append_nowait(entry(6));
        log.flush().await;
        let mut conn = SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(&path))
            .await
            .unwrap();
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM audit")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(n, 6);
        // Fresh connections see the WAL mode and the log was opened with synchronous = FULL.
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn thousand_appends_are_group_committed() {
        let (_dir, _path, log) = fresh(0).await;
        // Baseline: sequential awaited appends, each its own transaction and fsync.
        let t = Instant::now();
        for i in 0..20 {
            log.append(entry(i)).await.unwrap();
        }
        let per_commit = t.elapsed() / 20;
        let before = log.stats();

        // 1,000 concurrent awaited appends.
        let t = Instant::now();
        let tasks: Vec<_> = (0..1000u64)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move { log.append(entry(i)).await })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        let awaited = t.elapsed();
        let mid = log.stats();

        // 1,000 fire-and-forget appends and a flush.
        let t = Instant::now();
        for i in 0..1000u64 {
            log.append_nowait(entry(i));
        }
        log.flush().await;
        let nowait = t.elapsed();
        let after = log.stats();

        let awaited_batches = mid.batches - before.batches;
        let nowait_batches = after.batches - mid.batches;
        println!(
            "one commit (fsync) alone: {per_commit:?}; 1,000 concurrent appends: {awaited:?} in \
             {awaited_batches} batches; 1,000 append_nowait + flush: {nowait:?} in \
             {nowait_batches} batches; 1,000 separate commits would take ~{:?}",
            per_commit * 1000
        );
        assert!(awaited < Duration::from_secs(5), "{awaited:?}");
        assert!(nowait < Duration::from_secs(5), "{nowait:?}");
        assert!(awaited_batches <= 250, "{awaited_batches} batches");
        assert!(nowait_batches <= 50, "{nowait_batches} batches");
        assert_eq!(after.rows, 2020);
        let r = log.verify().await.unwrap();
        assert!(r.ok && r.rows_checked == 2020, "{r:?}");
    }

    #[tokio::test]
    async fn query_filters() {
        let (_dir, _path, log) = fresh(30).await;
        let q = |f: AuditFilter| {
            let log = log.clone();
            async move { log.query(f).await.unwrap() }
        };
        let all = q(AuditFilter::default()).await;
        assert_eq!(all.len(), 30);
        assert_eq!(all[0].entry, entry(1));

        let rows = q(AuditFilter {
            subject: Some("user-1".into()),
            ..Default::default()
        })
        .await;
        assert_eq!(rows.len(), 10);
        assert!(rows.iter().all(|r| r.entry.subject == "user-1"));

        let rows = q(AuditFilter {
            key_id: Some("key-0".into()),
            model: Some("llama-3-8b".into()),
            ..Default::default()
        })
        .await;
        assert_eq!(rows.len(), 15);

        let rows = q(AuditFilter {
            status_min: Some(400),
            status_max: Some(499),
            ..Default::default()
        })
        .await;
        assert_eq!(
            rows.iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![5, 10, 15, 20, 25, 30]
        );

        let rows = q(AuditFilter {
            since_ms: Some(1_700_000_000_010),
            until_ms: Some(1_700_000_000_020),
            ..Default::default()
        })
        .await;
        assert_eq!(rows.len(), 10);
        assert_eq!(rows[0].id, 10);

        let rows = q(AuditFilter {
            after_id: Some(25),
            limit: Some(3),
            ..Default::default()
        })
        .await;
        assert_eq!(
            rows.iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![26, 27, 28]
        );

        let rows = q(AuditFilter {
            newest_first: true,
            before_id: Some(30),
            limit: Some(2),
            ..Default::default()
        })
        .await;
        assert_eq!(rows.iter().map(|r| r.id).collect::<Vec<_>>(), vec![29, 28]);

        assert!(
            q(AuditFilter {
                limit: Some(0),
                ..Default::default()
            })
            .await
            .is_empty()
        );
        // time_ms = 0 is stamped on append.
        let before = now_ms();
        let id = log.append(AuditEntry::default()).await.unwrap();
        assert!(row(&log, id).await.entry.time_ms >= before);
    }

    const KILL9_ENV: &str = "SECURELLM_AUDIT_KILL9_DB";

    /// Child half of `acknowledged_rows_survive_kill9`: a no-op unless the parent set the
    /// variable; then appends from 4 tasks and prints every acknowledged id until killed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kill9_child_writer() {
        let Some(path) = std::env::var_os(KILL9_ENV) else {
            return;
        };
        let log = AuditLog::open(Path::new(&path)).await.unwrap();
        for t in 0..4u64 {
            let log = log.clone();
            tokio::spawn(async move {
                let mut i = 0u64;
                loop {
                    i += 1;
                    let id = log.append(entry(t * 1_000_000 + i)).await.unwrap();
                    println!("ACK {id}");
                }
            });
        }
        // Safety net if the parent never kills us.
        tokio::time::sleep(Duration::from_secs(60)).await;
    }

    #[tokio::test]
    async fn acknowledged_rows_survive_kill9() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "audit::tests::kill9_child_writer",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(KILL9_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut acked = Vec::new();
        while acked.len() < 400 {
            let line = tokio::time::timeout_at(deadline, lines.next_line())
                .await
                .expect("child too slow")
                .unwrap()
                .expect("child exited");
            if let Some(id) = line.strip_prefix("ACK ") {
                acked.push(id.trim().parse::<i64>().unwrap());
            }
        }
        child.start_kill().unwrap(); // SIGKILL, mid-stream: batches are in flight
        let status = child.wait().await.unwrap();
        assert!(!status.success());

        let report = verify_file(&path).await.unwrap();
        assert!(report.ok, "{report:?}");
        let max = *acked.iter().max().unwrap();
        assert!(
            report.rows_checked >= u64::try_from(max).unwrap(),
            "{report:?}"
        );
        let log = AuditLog::open(&path).await.unwrap();
        let mut present = std::collections::HashSet::new();
        let mut after = 0;
        loop {
            let rows = log
                .query(AuditFilter {
                    after_id: Some(after),
                    limit: Some(MAX_QUERY_LIMIT),
                    ..Default::default()
                })
                .await
                .unwrap();
            let Some(last) = rows.last() else { break };
            after = last.id;
            present.extend(rows.iter().map(|r| r.id));
        }
        assert!(acked.iter().all(|id| present.contains(id)));
        println!(
            "kill -9 after {} acknowledged rows: {} rows on disk, chain intact",
            acked.len(),
            report.rows_checked
        );
        // The restarted writer links to the surviving head.
        let id = log.append(entry(0)).await.unwrap();
        assert_eq!(id, i64::try_from(report.rows_checked).unwrap() + 1);
        assert!(log.verify().await.unwrap().ok);
    }

    fn refused(client: &str, n: u32) -> AuditEntry {
        AuditEntry {
            request_id: format!("r{n}"),
            client_addr: client.into(),
            endpoint: "/v1/chat/completions".into(),
            status: 401,
            error_code: "invalid_api_key".into(),
            ..AuditEntry::default()
        }
    }

    #[test]
    fn failure_sources_are_addresses_and_ipv6_slash_64s() {
        assert_eq!(failure_source("10.1.2.3"), "10.1.2.3");
        assert_eq!(failure_source("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64");
        assert_eq!(failure_source("2001:db8:1:2:bbbb::9"), "2001:db8:1:2::/64");
        assert_eq!(failure_source("::ffff:10.1.2.3"), "10.1.2.3");
        assert_eq!(failure_source(""), "");
    }

    #[tokio::test]
    async fn auth_failures_are_one_row_then_one_summary_per_source_and_window() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        let log = AuditLog::open_with(
            &path,
            AuditOptions {
                auth_failure_window: Duration::from_millis(300),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        for n in 0..50 {
            log.append_auth_failure(refused("10.0.0.1", n));
        }
        for n in 0..3 {
            log.append_auth_failure(refused("2001:db8::1", n));
            log.append_auth_failure(refused("2001:db8::2", n));
        }
        // The window ends on its own (no flush): the summaries are written by the sweeper.
        let mut rows = Vec::new();
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            rows = log.query(AuditFilter::default()).await.unwrap();
            if rows.len() >= 4 {
                break;
            }
        }
        let got: Vec<(String, String, String)> = rows
            .iter()
            .map(|r| {
                (
                    r.entry.client_addr.clone(),
                    r.entry.request_id.clone(),
                    r.entry.error_code.clone(),
                )
            })
            .collect();
        let want = |a: &str, r: &str, c: &str| (a.to_string(), r.to_string(), c.to_string());
        assert_eq!(got.len(), 4, "{got:?}");
        assert!(got.contains(&want("10.0.0.1", "r0", "invalid_api_key")));
        assert!(got.contains(&want("2001:db8::1", "r0", "invalid_api_key")));
        assert!(got.contains(&want("10.0.0.1", "count:49", AUTH_FAILURES_AGGREGATED)));
        assert!(got.contains(&want("2001:db8::/64", "count:5", AUTH_FAILURES_AGGREGATED)));
        // A later failure opens a new window with a row of its own; a lone one needs no summary.
        log.append_auth_failure(refused("10.0.0.1", 99));
        log.flush().await;
        let rows = log.query(AuditFilter::default()).await.unwrap();
        assert_eq!(rows.len(), 5);
        assert_eq!(rows[4].entry.request_id, "r99");
        // Past the tracked sources, failures share the source `*` instead of a window each.
        let log = AuditLog::open(&dir.path().join("b.db")).await.unwrap();
        for n in 0..(MAX_AUTH_FAILURE_SOURCES as u32 + 100) {
            log.append_auth_failure(refused(
                &format!("10.{}.{}.{}", n >> 16, (n >> 8) & 255, n & 255),
                n,
            ));
        }
        log.flush().await;
        let rows = log
            .query(AuditFilter {
                limit: Some(MAX_QUERY_LIMIT),
                ..Default::default()
            })
            .await
            .unwrap();
        let star: Vec<_> = rows.iter().filter(|r| r.entry.client_addr == "*").collect();
        assert_eq!(star.len(), 1, "the overflow source's summary");
        assert_eq!(star[0].entry.request_id, "count:99");
        assert!(log.verify().await.unwrap().ok);
    }

    #[tokio::test]
    async fn a_reserved_append_is_acknowledged_once_committed_and_cancel_safe() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        let log = AuditLog::open(&path).await.unwrap();
        let permit = log.reserve().await.unwrap();
        let acked = permit.send(entry(1));
        let id = acked.await.unwrap();
        assert_eq!(row(&log, id).await.entry, entry(1));
        // Sent but never awaited: still written.
        let permit = log.reserve().await.unwrap();
        drop(permit.send(entry(2)));
        // Reserved but never sent: nothing written, room given back.
        drop(log.reserve().await.unwrap());
        log.flush().await;
        assert_eq!(log.head().await.unwrap().last_id, 2);
        log.close().await;
        assert!(matches!(log.reserve().await, Err(AuditError::Closed)));
    }
}
