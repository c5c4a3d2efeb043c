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
//! # The chain
//! Each row stores `prev_hash` (the previous row's `row_hash`, 64 zeros for row 1) and its own
//! `row_hash`, SHA-256 over the previous hash and the row's canonical encoding: the format, the
//! one an outside verifier ports, is documented in `encoding.rs` ([`encoding`]) with a test
//! vector. The writer (`writer.rs`) chains and commits batches; `verify.rs` walks the chain.
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

use serde::{Deserialize, Serialize};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{Connection, QueryBuilder, Row, Sqlite};
use tokio::sync::{mpsc, oneshot};

use securellm_common::time::now_ms;

pub mod checkpoint;
pub mod encoding;
pub mod pg;
mod verify;
mod writer;

pub use encoding::{ENCODING_TAG, GENESIS_HASH, MAX_FIELD_BYTES, canonical_encoding, chain_hash};
use encoding::{Fields, clamp_i64};
pub use pg::{PgAuditOptions, read_export, verify_url};
pub use verify::verify_file;

/// Most rows one [`AuditLog::query`] returns.
pub const MAX_QUERY_LIMIT: u32 = 10_001;

/// Rows a [`AuditLog::query`] returns when its filter names no limit.
pub const DEFAULT_QUERY_LIMIT: u32 = 100;

/// The error code of a summary row of aggregated authentication failures (see the module doc).
pub const AUTH_FAILURES_AGGREGATED: &str = "auth_failures_aggregated";

/// Sources of authentication failures tracked at once; beyond, they share the source `*`.
pub const MAX_AUTH_FAILURE_SOURCES: usize = 4096;

pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Every column of a row, `id` first (the PostgreSQL log selects `seq AS` + these).
pub(crate) const COLUMNS: &str = "id, time_ms, request_id, subject, key_id, client_addr, endpoint, model, \
     upstream, status, error_code, prompt_tokens, completion_tokens, latency_us, redactions, \
     streamed, trace_id, prev_hash, row_hash";

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
    /// The request's trace (W3C trace id, 32 lowercase hex digits), empty when none.
    #[serde(default)]
    pub trace_id: String,
}

/// A stored row: the entry plus its place in the chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRow {
    /// The writer's chain on a shared (PostgreSQL) log; empty for a gateway's own SQLite log.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub chain_id: String,
    /// The row's place in its chain (1, 2, 3, …).
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
    /// Only this writer's chain (a shared log; ignored by a gateway's own SQLite log).
    pub chain_id: Option<String>,
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

/// The result of walking the chain (every chain and checkpoint of a shared log).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    /// later rewrite of the whole chain. Empty for a shared log (its checkpoints do that).
    pub last_hash: String,
    /// The chain the problem is in (a shared log).
    #[serde(default)]
    pub chain_id: Option<String>,
    /// Chains walked (1 for a gateway's own log).
    #[serde(default)]
    pub chains: u64,
    /// Signed checkpoints verified (a shared log).
    #[serde(default)]
    pub checkpoints_checked: u64,
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
pub(crate) struct Counters {
    pub(crate) batches: AtomicU64,
    pub(crate) rows: AtomicU64,
    pub(crate) failed_batches: AtomicU64,
    pub(crate) dropped: AtomicU64,
}

pub(crate) type Ack = oneshot::Sender<Result<i64, AuditError>>;

pub(crate) enum Cmd {
    Append(Box<Fields>, Option<Ack>),
    Flush(oneshot::Sender<Result<(), AuditError>>),
    Close(oneshot::Sender<()>),
}

struct Shared {
    tx: mpsc::Sender<Cmd>,
    store: Store,
    counters: Arc<Counters>,
    failures: std::sync::Mutex<Failures>,
}

/// Where the rows are read from: the gateway's own SQLite file, or a shared PostgreSQL log.
enum Store {
    Sqlite { pool: SqlitePool, path: PathBuf },
    Postgres(Arc<pg::PgStore>),
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
            .field("path", &self.path())
            .field("chain", &self.chain_id())
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
        Ok(Self::start(
            writer::Sink::Sqlite(conn),
            Store::Sqlite {
                pool,
                path: path.to_path_buf(),
            },
            options,
        ))
    }

    /// The audit log shared by every gateway on the PostgreSQL database at `url`: this
    /// replica writes its own chain (`pg.chain_id`) and, with a signing key, signs a checkpoint
    /// over every chain's head every `pg.checkpoint_interval` (see `pg.rs`).
    pub async fn open_postgres(
        url: &str,
        pg: PgAuditOptions,
        options: AuditOptions,
    ) -> Result<Self, AuditError> {
        let interval = pg.checkpoint_interval;
        let store = pg::PgStore::open(url, pg).await?;
        let head = store.head().await?;
        tracing::info!(
            chain = %store.chain_id,
            last_id = head.last_id,
            last_hash = %head.last_hash,
            "shared audit log opened (PostgreSQL)"
        );
        let log = Self::start(
            writer::Sink::Postgres(store.clone()),
            Store::Postgres(store),
            options,
        );
        if !interval.is_zero() {
            let weak = Arc::downgrade(&log.shared);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(interval).await;
                    let Some(shared) = weak.upgrade() else {
                        return;
                    };
                    if let Err(e) = (AuditLog { shared }).checkpoint().await {
                        tracing::warn!("audit checkpoint not written: {e}");
                    }
                }
            });
        }
        Ok(log)
    }

    /// Spawn the writer over `sink` and the task that ends authentication-failure windows.
    fn start(sink: writer::Sink, store: Store, options: AuditOptions) -> Self {
        let (tx, rx) = mpsc::channel(options.queue_capacity.max(1));
        let counters = Arc::new(Counters::default());
        let window = options.auth_failure_window.max(Duration::from_millis(1));
        tokio::spawn(writer::run_writer(sink, rx, options, Arc::clone(&counters)));
        let shared = Arc::new(Shared {
            tx,
            store,
            counters,
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
        Self { shared }
    }

    /// Sign a checkpoint over every chain's head now (a shared log with a signing key; `None`
    /// otherwise). Runs by itself every `checkpoint_interval` and when the log is closed.
    pub async fn checkpoint(&self) -> Result<Option<checkpoint::Checkpoint>, AuditError> {
        match &self.shared.store {
            Store::Postgres(store) => store.checkpoint().await,
            Store::Sqlite { .. } => Ok(None),
        }
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

    /// The database file (`None` for a shared PostgreSQL log).
    pub fn path(&self) -> Option<&Path> {
        match &self.shared.store {
            Store::Sqlite { path, .. } => Some(path),
            Store::Postgres(_) => None,
        }
    }

    /// This writer's chain on a shared log (`None` for a gateway's own SQLite log).
    pub fn chain_id(&self) -> Option<&str> {
        match &self.shared.store {
            Store::Sqlite { .. } => None,
            Store::Postgres(store) => Some(&store.chain_id),
        }
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
            // A shared log signs the heads it leaves behind.
            if let Err(e) = self.checkpoint().await {
                tracing::warn!("final audit checkpoint not written: {e}");
            }
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

    /// The committed head (last id and hash) of this writer's chain.
    pub async fn head(&self) -> Result<AuditHead, AuditError> {
        let pool = match &self.shared.store {
            Store::Sqlite { pool, .. } => pool,
            Store::Postgres(store) => return store.head().await,
        };
        let mut conn = pool.acquire().await?;
        read_head(&mut conn)
            .await?
            .ok_or_else(|| AuditError::Corrupt("the head record (audit_head) is missing".into()))
    }

    /// Rows matching `filter`, ordered by id (see [`AuditFilter::newest_first`]); on a shared
    /// log, rows of every chain ordered by time.
    pub async fn query(&self, filter: AuditFilter) -> Result<Vec<AuditRow>, AuditError> {
        let pool = match &self.shared.store {
            Store::Sqlite { pool, .. } => pool,
            Store::Postgres(store) => return store.query(filter).await,
        };
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
        let rows = qb.build().fetch_all(pool).await?;
        rows.iter().map(audit_row).collect()
    }

    /// Walk the whole chain (one consistent snapshot) and report the first problem; on a shared
    /// log every chain and every checkpoint (see `pg.rs`).
    pub async fn verify(&self) -> Result<VerifyReport, AuditError> {
        let pool = match &self.shared.store {
            Store::Sqlite { pool, .. } => pool,
            Store::Postgres(store) => return store.verify().await,
        };
        let mut conn = pool.acquire().await?;
        verify::verify_conn(&mut conn).await
    }
}

pub(crate) fn effective_limit(limit: Option<u32>) -> u32 {
    limit.unwrap_or(DEFAULT_QUERY_LIMIT).min(MAX_QUERY_LIMIT)
}

fn prepare(mut entry: AuditEntry) -> Box<Fields> {
    if entry.time_ms == 0 {
        entry.time_ms = now_ms();
    }
    Box::new(Fields::from_entry(entry))
}

/// Reading stored rows back (SQLite or PostgreSQL).
impl Fields {
    fn from_row<R>(r: &R) -> Result<Self, sqlx::Error>
    where
        R: Row,
        for<'a> &'a str: sqlx::ColumnIndex<R>,
        for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
        for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    {
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
            // A log written before the column existed and read without migrating it
            // (`verify_file`): no trace ids.
            trace_id: match r.try_get("trace_id") {
                Ok(t) => t,
                Err(sqlx::Error::ColumnNotFound(_)) => String::new(),
                Err(e) => return Err(e),
            },
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
            trace_id: self.trace_id,
        })
    }
}

pub(crate) fn audit_row<R>(r: &R) -> Result<AuditRow, AuditError>
where
    R: Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let id: i64 = r.try_get("id")?;
    Ok(AuditRow {
        chain_id: String::new(),
        id,
        entry: Fields::from_row(r)?.into_entry(id)?,
        prev_hash: r.try_get("prev_hash")?,
        row_hash: r.try_get("row_hash")?,
    })
}

pub(crate) async fn read_head(
    conn: &mut SqliteConnection,
) -> Result<Option<AuditHead>, AuditError> {
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

#[cfg(test)]
mod tests;
