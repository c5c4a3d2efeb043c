//! The decision log: every GPU-memory decision the scheduler makes, in its own hash-chained,
//! verifiable file, so "who evicted my model, and why" has an answer that can be proven.
//!
//! # What is recorded
//!
//! Every [`Event`] the [`LeaseTable`](crate::table::LeaseTable) emits becomes one row: grants,
//! releases, expiries, eviction notices, withdrawn notices, revocations, resizes, queueing and
//! wait time-outs, re-attaches, over-commitment. A row names the lease (id, holder, model label,
//! GPU, bytes, priority, eviction deadline) and, where a request caused the decision, that request
//! ([`Cause`]: holder, model, bytes, priority, and the trace id of its `AcquireLease` call when the
//! call carried a W3C `traceparent`). An eviction notice's cause is the waiting request that asked
//! for the memory; the revocation, withdrawal, release or expiry that ends that notice names the
//! same request. The log also records its own life: `started` (each scheduler start), `gap`
//! (decisions dropped, see below) and `recovered` (a torn last line cut off after a crash).
//!
//! # The file
//!
//! `<scheduler data dir>/scheduler-decisions.jsonl` ([`decisions_path`]; with `make run`,
//! `<stack data dir>/scheduler/scheduler-decisions.jsonl`), mode 0600, append-only, one JSON
//! object per line: `{"seq":n,"prev_hash":…,"row_hash":…,"decision":{…}}` ([`Row`],
//! [`Decision`]). Sequence numbers run 1, 2, 3, … across restarts (the writer continues the chain
//! from the file's last row). Without a data directory there is no decision file.
//!
//! # The chain
//!
//! ```text
//! row_hash = lowercase_hex(SHA-256(P || E))
//! P = the 32 bytes prev_hash (64 lowercase hex digits) decodes to; 32 zero bytes for row 1
//! E = "SLGPUDC1"                       (8 ASCII bytes: format tag, version 1)
//!     || u64(seq) || u64(time_ms) || s(kind) || s(lease) || s(holder) || s(model)
//!     || opt(gpu, u64) || u64(bytes) || i64(priority) || opt(evict_by_ms, u64) || s(detail)
//!     || u64(dropped)
//!     || cause: 0x00 | 0x01 || s(ticket) || s(holder) || s(model) || u64(bytes)
//!                         || i64(priority) || opt(gpu, u64) || opt(trace_id, s)
//! u64(x), i64(x) = 8 bytes, big-endian (two's complement for i64)
//! s(x)           = the UTF-8 byte length of x as u64, then those bytes
//! opt(x, f)      = 0x00 when absent, else 0x01 || f(x)
//! kind           = the kebab-case name ("eviction-notice", …)
//! ```
//!
//! Fixed order, fixed widths and length prefixes: no two different rows encode alike. Unlike the
//! gateway's audit chain the sequence number *is* hashed, so [`verify_bytes`] can tell a deleted
//! row (a jump in `seq`) from a reordered one (a `seq` that turns up later) from an inserted one
//! (a row that is not part of the chain, or a repeated `seq`) from an edited one (content that no
//! longer matches its hash). The test vector at the end of this file pins the format (computed
//! independently with Python's `hashlib`).
//!
//! The gateway's chain (SQLite, `services/securellm-gateway/src/audit/encoding.rs`) has another
//! row shape and storage; what the two share — SHA-256 over `prev || length-prefixed fields` — is a
//! dozen lines, so this file has its own encoding instead of a shared abstraction over both.
//!
//! # Writing without blocking the actor, and never losing a row silently
//!
//! The actor calls [`DecisionLog::record`], which only puts the row on a bounded queue
//! ([`QUEUE_ROWS`]); one writer thread takes whatever is queued, chains it, appends it with one
//! `write` and one `fdatasync` per batch. If the queue is full (the disk stalled), the row is
//! dropped and counted, one warning is logged per burst, and before the next row the writer
//! appends a `gap` row saying how many were dropped: the chain stays verifiable and
//! [`verify_bytes`] reports every gap. A failed append is cut back off the file (so no half row is
//! left) and counted as dropped the same way.
//!
//! # The head file
//!
//! A chain alone cannot show rows cut off its end. After each synced batch the writer rewrites
//! `scheduler-decisions.head` ([`head_path`], [`Head`]: the last row's `seq` and `row_hash`;
//! temporary file, sync, rename), so the head is never ahead of the synced rows. [`verify_file`]
//! requires the chain to reach the head's row with the head's hash: rows removed from the end
//! (`truncated`) or a chain rewritten with recomputed hashes (`edited`) are caught; rows after
//! the head are fine (appended before the head was rewritten); a missing head on a non-empty log
//! is reported (removal from the end cannot be ruled out).
//!
//! # Limits
//!
//! A hash chain without a key is evidence against edits, not against someone who can rewrite
//! both files consistently (chain and head). Record [`VerifyReport::last_hash`] elsewhere (as with
//! the gateway's chain) to detect that. The log is not rotated.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::table::{Cause, Event, EventKind};

/// The decision file inside the scheduler's data directory.
pub const FILE_NAME: &str = "scheduler-decisions.jsonl";

/// `prev_hash` of row 1: 64 zeros.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// First bytes of every canonical encoding (format tag and version).
pub const ENCODING_TAG: &[u8; 8] = b"SLGPUDC1";

/// Rows the queue between the actor and the writer holds before rows are dropped (and counted).
pub const QUEUE_ROWS: usize = 16_384;

/// The decision file in `data_dir`.
pub fn decisions_path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE_NAME)
}

/// Errors opening, reading or verifying the decision file.
#[derive(Debug, thiserror::Error)]
pub enum DecisionError {
    #[error("decision log {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the decision writer: {0}")]
    Thread(std::io::Error),
}

/// What kind of decision a row records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DecisionKind {
    Started,
    Granted,
    Released,
    Expired,
    EvictionNotice,
    EvictionWithdrawn,
    Revoked,
    Resized,
    Queued,
    WaitTimedOut,
    Reattached,
    Overcommitted,
    /// Decisions were dropped before this row (`dropped` says how many).
    Gap,
    /// The writer repaired the file at start (a torn last line cut off).
    Recovered,
    /// At start the log did not end where its head file said (rows cut off the end, the chain
    /// rewritten, the head removed) or could not be continued at all: the history before this
    /// row cannot be trusted. Verification reports it (kind `deleted`) for as long as the row
    /// exists, so a restart never launders a cut log into a clean one.
    Discontinuity,
}

impl DecisionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Started => "started",
            Self::Granted => "granted",
            Self::Released => "released",
            Self::Expired => "expired",
            Self::EvictionNotice => "eviction-notice",
            Self::EvictionWithdrawn => "eviction-withdrawn",
            Self::Revoked => "revoked",
            Self::Resized => "resized",
            Self::Queued => "queued",
            Self::WaitTimedOut => "wait-timed-out",
            Self::Reattached => "reattached",
            Self::Overcommitted => "overcommitted",
            Self::Gap => "gap",
            Self::Recovered => "recovered",
            Self::Discontinuity => "discontinuity",
        }
    }
}

impl From<EventKind> for DecisionKind {
    fn from(k: EventKind) -> Self {
        match k {
            EventKind::Granted => Self::Granted,
            EventKind::Released => Self::Released,
            EventKind::Expired => Self::Expired,
            EventKind::EvictionNotice => Self::EvictionNotice,
            EventKind::Revoked => Self::Revoked,
            EventKind::Resized => Self::Resized,
            EventKind::Queued => Self::Queued,
            EventKind::WaitTimedOut => Self::WaitTimedOut,
            EventKind::Reattached => Self::Reattached,
            EventKind::Overcommitted => Self::Overcommitted,
            EventKind::EvictionWithdrawn => Self::EvictionWithdrawn,
        }
    }
}

/// One decision: the hashed content of a row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    pub time_ms: u64,
    pub kind: DecisionKind,
    /// The lease id (a queue ticket for `queued` / `wait-timed-out`; empty for GPU-wide rows).
    pub lease: String,
    pub holder: String,
    /// The lease's label: the model it holds memory for.
    pub model: String,
    pub gpu: Option<u32>,
    pub bytes: u64,
    pub priority: i32,
    /// The deadline of a pending eviction notice.
    pub evict_by_ms: Option<u64>,
    pub detail: String,
    /// `gap` rows: how many decisions were dropped before this row.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropped: u64,
    /// The request the decision was made for (see [`Cause`]).
    pub cause: Option<Cause>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl Decision {
    /// A row without a lease (the log's own rows).
    pub fn note(kind: DecisionKind, time_ms: u64, detail: impl Into<String>) -> Self {
        Self {
            time_ms,
            kind,
            lease: String::new(),
            holder: String::new(),
            model: String::new(),
            gpu: None,
            bytes: 0,
            priority: 0,
            evict_by_ms: None,
            detail: detail.into(),
            dropped: 0,
            cause: None,
        }
    }

    /// The row for a table event.
    pub fn from_event(e: &Event) -> Self {
        let l = &e.lease;
        Self {
            time_ms: e.at_ms,
            kind: e.kind.into(),
            lease: l.id.clone(),
            holder: l.holder.clone(),
            model: l.label.clone(),
            // A waiting request's view carries u32::MAX for "any GPU".
            gpu: (l.gpu != u32::MAX).then_some(l.gpu),
            bytes: l.bytes,
            priority: l.priority,
            evict_by_ms: l.evict_by_ms,
            detail: e.detail.clone(),
            dropped: 0,
            cause: e.cause.clone(),
        }
    }

    /// The canonical encoding `E` of this decision as row `seq` (see the module doc).
    pub fn canonical_encoding(&self, seq: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(ENCODING_TAG);
        u64_(&mut out, seq);
        u64_(&mut out, self.time_ms);
        text(&mut out, self.kind.as_str());
        text(&mut out, &self.lease);
        text(&mut out, &self.holder);
        text(&mut out, &self.model);
        opt(&mut out, self.gpu, |o, g| u64_(o, u64::from(g)));
        u64_(&mut out, self.bytes);
        i64_(&mut out, i64::from(self.priority));
        opt(&mut out, self.evict_by_ms, u64_);
        text(&mut out, &self.detail);
        u64_(&mut out, self.dropped);
        opt(&mut out, self.cause.as_ref(), |o, c| {
            text(o, &c.ticket);
            text(o, &c.holder);
            text(o, &c.label);
            u64_(o, c.bytes);
            i64_(o, i64::from(c.priority));
            opt(o, c.gpu, |o, g| u64_(o, u64::from(g)));
            opt(o, c.trace_id.as_deref(), text);
        });
        out
    }

    /// `row_hash` of this decision as row `seq` after a row whose hash is `prev_hash`; `None` if
    /// `prev_hash` is not 64 lowercase hex digits.
    pub fn chain_hash(&self, seq: u64, prev_hash: &str) -> Option<String> {
        if !is_hash(prev_hash) {
            return None;
        }
        let prev = hex::decode(prev_hash).ok()?;
        let mut h = Sha256::new();
        h.update(&prev);
        h.update(self.canonical_encoding(seq));
        Some(hex::encode(h.finalize()))
    }
}

fn u64_(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn i64_(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn text(out: &mut Vec<u8>, s: &str) {
    // usize -> u64 is lossless on every supported target.
    u64_(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn opt<T>(out: &mut Vec<u8>, v: Option<T>, f: impl FnOnce(&mut Vec<u8>, T)) {
    match v {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            f(out, v);
        }
    }
}

fn is_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// One line of the decision file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Row {
    pub seq: u64,
    pub prev_hash: String,
    pub row_hash: String,
    pub decision: Decision,
}

impl Row {
    /// Chain `decision` as row `seq` after `prev_hash` (a valid hash: the writer's own state).
    fn chained(seq: u64, prev_hash: &str, decision: Decision) -> Self {
        let row_hash = decision.chain_hash(seq, prev_hash).unwrap_or_default();
        Self {
            seq,
            prev_hash: prev_hash.to_string(),
            row_hash,
            decision,
        }
    }

    /// Does the stored `row_hash` match the content and the stored `prev_hash`?
    pub fn content_ok(&self) -> bool {
        is_hash(&self.row_hash)
            && self
                .decision
                .chain_hash(self.seq, &self.prev_hash)
                .as_deref()
                == Some(self.row_hash.as_str())
    }

    fn line(&self) -> Vec<u8> {
        // Serializing plain data with string keys cannot fail.
        let mut v = serde_json::to_vec(self).unwrap_or_default();
        v.push(b'\n');
        v
    }
}

/// How the chain is broken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TamperKind {
    /// A row's content no longer matches its hash, or a row was rewritten with a recomputed hash.
    Edited,
    /// A row that is not part of the chain.
    Inserted,
    /// Rows are missing.
    Deleted,
    /// Rows are out of order.
    Reordered,
    /// The last line is incomplete (bytes cut off, or a write in progress).
    Truncated,
}

impl std::fmt::Display for TamperKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Edited => "edited",
            Self::Inserted => "inserted",
            Self::Deleted => "deleted",
            Self::Reordered => "reordered",
            Self::Truncated => "truncated",
        })
    }
}

/// The result of walking the chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub ok: bool,
    /// Rows verified before the first problem (all of them when `ok`).
    pub rows_checked: u64,
    /// The line (1-based) where the first problem shows.
    pub first_bad_line: Option<u64>,
    /// The sequence number the chain expected there.
    pub first_bad_seq: Option<u64>,
    pub kind: Option<TamperKind>,
    pub detail: String,
    /// `row_hash` of the last verified row (64 zeros if none).
    pub last_hash: String,
    /// `(seq of the gap row, decisions dropped)` for every gap among the verified rows.
    pub gaps: Vec<(u64, u64)>,
}

impl VerifyReport {
    /// Decisions dropped (by the verified gap rows).
    pub fn dropped(&self) -> u64 {
        self.gaps.iter().map(|(_, n)| *n).sum()
    }
}

/// The head file next to the decision file: the last row the writer appended (`seq`,
/// `row_hash`), rewritten (atomically, after the rows are synced) with every batch. It lets
/// [`verify_file`] see rows cut off the end of the log, which the chain alone cannot.
pub fn head_path(decisions: &Path) -> PathBuf {
    decisions.with_extension("head")
}

/// The content of the head file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Head {
    pub seq: u64,
    pub row_hash: String,
}

/// Verify the decision file at `path` (read-only; safe while the scheduler writes it): the chain
/// ([`verify_bytes`]), then its end against the head file ([`check_head`]).
pub fn verify_file(path: &Path) -> Result<VerifyReport, DecisionError> {
    // The head first: the writer updates it only after the rows it names are synced, so rows
    // read afterwards always reach it.
    let head_file = head_path(path);
    let head = match std::fs::read(&head_file) {
        Ok(b) => Some(serde_json::from_slice::<Head>(&b).map_err(|e| e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(DecisionError::Io {
                path: head_file,
                source,
            });
        }
    };
    let bytes = std::fs::read(path).map_err(|source| DecisionError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut rep = verify_bytes(&bytes);
    // An incomplete last line past the head's row is a write in progress (the scheduler is
    // running): the complete rows are what counts, and they must still reach the head.
    if rep.kind == Some(TamperKind::Truncated)
        && matches!(&head, Some(Ok(h)) if h.seq <= rep.rows_checked)
    {
        rep.ok = true;
        rep.kind = None;
        rep.first_bad_line = None;
        rep.first_bad_seq = None;
        rep.detail = "the last line is still being written".into();
    }
    Ok(check_head(rep, &bytes, head, &head_file))
}

/// An intact chain must reach the head file's row, and that row must have the head's hash. Rows
/// after the head are fine (appended after the head was last written). A missing head file on a
/// non-empty log means removal of rows from the end cannot be ruled out.
pub fn check_head(
    rep: VerifyReport,
    bytes: &[u8],
    head: Option<Result<Head, String>>,
    head_file: &Path,
) -> VerifyReport {
    if !rep.ok {
        return rep;
    }
    let n = rep.rows_checked;
    let bad = |kind: TamperKind, seq: u64, detail: String| VerifyReport {
        ok: false,
        first_bad_line: Some(seq),
        first_bad_seq: Some(seq),
        kind: Some(kind),
        detail,
        ..rep.clone()
    };
    let head = match head {
        None if n == 0 => return rep,
        None => {
            return bad(
                TamperKind::Truncated,
                n + 1,
                format!(
                    "the head file {} is missing: removal of rows from the end cannot be ruled                      out",
                    head_file.display()
                ),
            );
        }
        Some(Err(e)) => {
            return bad(
                TamperKind::Edited,
                n,
                format!("the head file {} cannot be read: {e}", head_file.display()),
            );
        }
        Some(Ok(h)) => h,
    };
    if head.seq > n {
        let detail = if head.seq == n + 1 {
            format!(
                "the head file says the log reaches row {}, but it ends at row {n}: row {} was removed",
                head.seq, head.seq
            )
        } else {
            format!(
                "the head file says the log reaches row {}, but it ends at row {n}: rows {} to {} were removed",
                head.seq,
                n + 1,
                head.seq
            )
        };
        return bad(TamperKind::Truncated, n + 1, detail);
    }
    if head.seq == 0 {
        return rep;
    }
    let (rows, _) = parse_lines(bytes);
    let at = rows
        .get(head.seq as usize - 1)
        .and_then(|r| r.as_ref().ok())
        .map(|r| r.row_hash.clone());
    if at.as_deref() != Some(head.row_hash.as_str()) {
        return bad(
            TamperKind::Edited,
            head.seq,
            format!(
                "row {}'s hash differs from the head file's {}: the chain was rewritten with \
                 recomputed hashes (or the head file was edited)",
                head.seq, head.row_hash
            ),
        );
    }
    rep
}

/// A line as read: a row, or why it is not one.
type Parsed = Result<Row, String>;

fn parse_lines(bytes: &[u8]) -> (Vec<Parsed>, bool) {
    let complete = bytes.is_empty() || bytes.ends_with(b"\n");
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    if body.is_empty() && complete {
        return (Vec::new(), true);
    }
    let rows = body
        .split(|b| *b == b'\n')
        .map(|l| serde_json::from_slice::<Row>(l).map_err(|e| e.to_string()))
        .collect();
    (rows, complete)
}

/// Walk the chain in `bytes` (the file's content) and report the first problem.
pub fn verify_bytes(bytes: &[u8]) -> VerifyReport {
    let (rows, complete) = parse_lines(bytes);
    let n = rows.len();
    let mut rep = VerifyReport {
        ok: true,
        rows_checked: 0,
        first_bad_line: None,
        first_bad_seq: None,
        kind: None,
        detail: String::new(),
        last_hash: GENESIS_HASH.to_string(),
        gaps: Vec::new(),
    };
    let mut before_last: Option<String> = None;
    for (i, parsed) in rows.iter().enumerate() {
        let line = i as u64 + 1;
        let expected = rep.rows_checked + 1;
        let bad = |kind: TamperKind, detail: String| {
            let mut r = rep.clone();
            r.ok = false;
            r.first_bad_line = Some(line);
            r.first_bad_seq = Some(expected);
            r.kind = Some(kind);
            r.detail = detail;
            r
        };
        let row = match parsed {
            Ok(r) => r,
            Err(e) if i + 1 == n && !complete => {
                return bad(
                    TamperKind::Truncated,
                    format!(
                        "line {line} (row {expected}) is incomplete: bytes were cut off the end \
                         of the file, or a write was in progress ({e})"
                    ),
                );
            }
            Err(e) => {
                return bad(
                    TamperKind::Edited,
                    format!("line {line} is not a decision row: {e}"),
                );
            }
        };
        let content_ok = row.content_ok();
        let link_ok = row.prev_hash == rep.last_hash;
        if content_ok && link_ok && row.seq == expected {
            if row.decision.kind == DecisionKind::Discontinuity {
                return bad(
                    TamperKind::Deleted,
                    format!(
                        "row {expected} records a discontinuity found when the scheduler \
                         started: {}",
                        row.decision.detail
                    ),
                );
            }
            rep.rows_checked += 1;
            before_last = Some(std::mem::replace(&mut rep.last_hash, row.row_hash.clone()));
            if row.decision.kind == DecisionKind::Gap {
                rep.gaps.push((row.seq, row.decision.dropped));
            }
            continue;
        }
        let seq_at = |s: u64| {
            rows.iter()
                .enumerate()
                .find(|(_, r)| r.as_ref().is_ok_and(|r| r.seq == s))
                .map(|(j, _)| j as u64 + 1)
        };
        if content_ok && row.seq != expected {
            if row.seq + 1 == expected && before_last.as_deref() == Some(row.prev_hash.as_str()) {
                // The genuine row `seq` follows a row that took its place.
                let mut r = bad(
                    TamperKind::Inserted,
                    format!(
                        "line {} is not part of the chain: row {} on line {line} links to the row \
                         before it",
                        line - 1,
                        row.seq
                    ),
                );
                r.first_bad_line = Some(line - 1);
                r.first_bad_seq = Some(row.seq);
                r.rows_checked = r.rows_checked.saturating_sub(1);
                return r;
            }
            if row.seq > expected {
                return match seq_at(expected) {
                    Some(at) => bad(
                        TamperKind::Reordered,
                        format!(
                            "row {expected} is out of order: line {line} holds row {}, row \
                             {expected} is on line {at}",
                            row.seq
                        ),
                    ),
                    None if row.seq == expected + 1 => {
                        bad(TamperKind::Deleted, format!("row {expected} is missing"))
                    }
                    None => bad(
                        TamperKind::Deleted,
                        format!("rows {expected} to {} are missing", row.seq - 1),
                    ),
                };
            }
            return bad(
                TamperKind::Reordered,
                format!(
                    "line {line} holds row {} after row {}: rows are out of order or repeated",
                    row.seq,
                    expected - 1
                ),
            );
        }
        if !content_ok {
            // Inserted: the next line carries on the chain as if this one were not there.
            if let Some(Ok(next)) = rows.get(i + 1)
                && next.seq == expected
                && next.prev_hash == rep.last_hash
                && next.content_ok()
            {
                return bad(
                    TamperKind::Inserted,
                    format!(
                        "line {line} is not part of the chain: line {} (row {expected}) links \
                         directly to the row before it",
                        line + 1
                    ),
                );
            }
            return bad(
                TamperKind::Edited,
                format!(
                    "row {} on line {line}: its content does not match its row_hash",
                    row.seq
                ),
            );
        }
        // Content and seq fine, the link is not: the previous row was rewritten together with
        // its hash (or the chain was spliced).
        let prev = expected - 1;
        let mut r = bad(
            TamperKind::Edited,
            format!(
                "row {expected}'s prev_hash does not match row {prev}'s row_hash: row {prev} was \
                 rewritten with a recomputed hash"
            ),
        );
        if prev > 0 {
            r.first_bad_line = Some(line - 1);
            r.first_bad_seq = Some(prev);
            r.rows_checked -= 1;
        }
        return r;
    }
    rep.detail = format!("{} rows verified, chain intact", rep.rows_checked);
    if !rep.gaps.is_empty() {
        rep.detail.push_str(&format!(
            "; {} decision(s) were dropped while the writer fell behind (gap rows {})",
            rep.dropped(),
            rep.gaps
                .iter()
                .map(|(s, _)| s.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    rep
}

/// The rows of the decision file, oldest first; lines that are not rows are skipped (use
/// [`verify_file`] to find out why).
pub fn read_rows(path: &Path) -> Result<Vec<Row>, DecisionError> {
    let bytes = std::fs::read(path).map_err(|source| DecisionError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(parse_lines(&bytes).0.into_iter().flatten().collect())
}

enum Cmd {
    Row(Box<Decision>),
    Flush(oneshot::Sender<()>),
}

struct Shared {
    /// Dropped since the last gap row.
    dropped: AtomicU64,
    dropped_total: AtomicU64,
    warned: AtomicBool,
    path: PathBuf,
}

/// The writing end of the decision file (cheap to clone). See the module doc.
#[derive(Clone)]
pub struct DecisionLog {
    tx: mpsc::Sender<Cmd>,
    shared: Arc<Shared>,
}

impl DecisionLog {
    /// Open (or create) the decision file at `path`, continue its chain, and start the writer
    /// thread. A torn last line (a crash mid-write) is cut off and noted in a `recovered` row; a
    /// last row that cannot be read (the file was edited) cannot be continued: the file is moved
    /// aside (`….broken-<ms>`, kept as evidence) and a new chain starts with a `recovered` row
    /// naming it.
    pub fn open(path: &Path, now_ms: u64) -> Result<Self, DecisionError> {
        let io = |source| DecisionError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut notes = Vec::new();
        let mut cut: Option<String> = None;
        let (mut file, mut seq, mut last_hash) = open_file(path).map_err(io)?;
        let (base, mut content) = read_tail(&mut file).map_err(io)?;
        if !content.is_empty() && !content.ends_with(b"\n") {
            let keep = content
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |p| p + 1);
            let torn = content.len() - keep;
            file.set_len(base + keep as u64).map_err(io)?;
            content.truncate(keep);
            notes.push(format!(
                "a torn last line of {torn} bytes (a crash mid-write) was cut off"
            ));
        }
        if let Some(last) = content
            .strip_suffix(b"\n")
            .and_then(|b| b.split(|c| *c == b'\n').next_back())
        {
            match serde_json::from_slice::<Row>(last) {
                Ok(r) if is_hash(&r.row_hash) && r.content_ok() => {
                    seq = r.seq;
                    last_hash = r.row_hash;
                    if let Some(why) = head_mismatch(path, seq, &last_hash) {
                        tracing::error!("decision log {}: {why}", path.display());
                        cut = Some(why);
                    }
                }
                _ => {
                    drop(file);
                    let aside = path.with_extension(format!("jsonl.broken-{now_ms}"));
                    std::fs::rename(path, &aside).map_err(io)?;
                    let head = head_path(path);
                    if head.exists() {
                        std::fs::rename(
                            &head,
                            head.with_extension(format!("head.broken-{now_ms}")),
                        )
                        .map_err(io)?;
                    }
                    tracing::error!(
                        "decision log {}: the last row cannot be read, so its chain cannot be \
                         continued; moved to {} and starting a new chain",
                        path.display(),
                        aside.display()
                    );
                    cut = Some(format!(
                        "the previous decision file's last row could not be read (or its \
                         content does not match its hash); it was kept as {}",
                        aside.display()
                    ));
                    (file, seq, last_hash) = open_file(path).map_err(io)?;
                }
            }
        }
        file.seek(std::io::SeekFrom::End(0)).map_err(io)?;
        let (tx, rx) = mpsc::channel(QUEUE_ROWS);
        let shared = Arc::new(Shared {
            dropped: AtomicU64::new(0),
            dropped_total: AtomicU64::new(0),
            warned: AtomicBool::new(false),
            path: path.to_path_buf(),
        });
        let writer = Writer {
            file,
            seq,
            last_hash,
            shared: shared.clone(),
        };
        std::thread::Builder::new()
            .name("decision-log".into())
            .spawn(move || writer.run(rx))
            .map_err(DecisionError::Thread)?;
        let log = Self { tx, shared };
        if let Some(why) = cut {
            log.record(Decision::note(DecisionKind::Discontinuity, now_ms, why));
        }
        for n in notes {
            log.record(Decision::note(DecisionKind::Recovered, now_ms, n));
        }
        Ok(log)
    }

    /// Queue a decision; never blocks. When the queue is full the decision is dropped, counted,
    /// and a `gap` row saying how many precedes the next row written.
    pub fn record(&self, d: Decision) {
        if self.tx.try_send(Cmd::Row(Box::new(d))).is_err() {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            self.shared.dropped_total.fetch_add(1, Ordering::Relaxed);
            if !self.shared.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "decision log {}: the writer is behind ({QUEUE_ROWS} rows queued); dropping \
                     decisions (a gap row will say how many)",
                    self.shared.path.display()
                );
            }
        }
    }

    /// Queue the row for a table event.
    pub fn record_event(&self, e: &Event) {
        self.record(Decision::from_event(e));
    }

    /// Wait until everything queued so far is written and synced.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Cmd::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Decisions dropped since start (queue full or a failed write).
    pub fn dropped_total(&self) -> u64 {
        self.shared.dropped_total.load(Ordering::Relaxed)
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }
}

/// The end of the file from the start of its last complete line (and any torn bytes after it):
/// `(offset of those bytes, the bytes)`. Reads a window from the end that grows until it holds a
/// whole line, so a start stays cheap however long the log is.
fn read_tail(file: &mut std::fs::File) -> std::io::Result<(u64, Vec<u8>)> {
    let len = file.metadata()?.len();
    let mut window = 64 * 1024u64;
    loop {
        let start = len.saturating_sub(window);
        file.seek(std::io::SeekFrom::Start(start))?;
        let mut buf = Vec::new();
        Read::by_ref(file).take(len - start).read_to_end(&mut buf)?;
        let newlines: Vec<usize> = buf
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .map(|(i, _)| i)
            .rev()
            .take(2)
            .collect();
        // The last complete line starts after the newline before it.
        let cut = match newlines.as_slice() {
            [_, before, ..] => Some(before + 1),
            _ if start == 0 => Some(0),
            _ => None,
        };
        if let Some(cut) = cut {
            return Ok((start + cut as u64, buf.split_off(cut)));
        }
        window = window.saturating_mul(2);
    }
}

/// Open for reading and appending (mode 0600); an empty file starts at the genesis.
/// Why a log whose last row is `seq` / `last_hash` does not end where its head file says, if it
/// does not. Rows after the head are fine (the head is rewritten only after the rows it names
/// are synced, so a crash leaves it behind, never ahead).
fn head_mismatch(path: &Path, seq: u64, last_hash: &str) -> Option<String> {
    let head_file = head_path(path);
    let head = match std::fs::read(&head_file) {
        Ok(b) => serde_json::from_slice::<Head>(&b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Some(format!(
                "the head file {} is missing beside a log of {seq} rows: rows cut off the end \
                 cannot be ruled out",
                head_file.display()
            ));
        }
        Err(e) => {
            return Some(format!(
                "the head file {} cannot be read: {e}",
                head_file.display()
            ));
        }
    };
    match head {
        Err(e) => Some(format!(
            "the head file {} is not valid: {e}",
            head_file.display()
        )),
        Ok(h) if h.seq > seq => Some(format!(
            "the log ends at row {seq} but its head file names row {}: rows were cut off the end",
            h.seq
        )),
        Ok(h) if h.seq == seq && h.row_hash != last_hash => Some(format!(
            "row {seq} does not have the hash the head file names: the chain was rewritten"
        )),
        Ok(_) => None,
    }
}

fn open_file(path: &Path) -> std::io::Result<(std::fs::File, u64, String)> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    Ok((f, 0, GENESIS_HASH.to_string()))
}

struct Writer {
    file: std::fs::File,
    seq: u64,
    last_hash: String,
    shared: Arc<Shared>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        while let Some(first) = rx.blocking_recv() {
            let mut decisions = Vec::new();
            let mut flushes = Vec::new();
            let mut next = Some(first);
            while let Some(c) = next.take() {
                match c {
                    Cmd::Row(d) => decisions.push(*d),
                    Cmd::Flush(f) => flushes.push(f),
                }
                if decisions.len() < 1024 {
                    next = rx.try_recv().ok();
                }
            }
            self.write(decisions);
            for f in flushes {
                let _ = f.send(());
            }
        }
    }

    fn write(&mut self, decisions: Vec<Decision>) {
        let dropped = self.shared.dropped.swap(0, Ordering::Relaxed);
        if decisions.is_empty() && dropped == 0 {
            return;
        }
        let (mut seq, mut hash) = (self.seq, self.last_hash.clone());
        let mut buf = Vec::new();
        let mut push = |d: Decision| {
            seq += 1;
            let row = Row::chained(seq, &hash, d);
            hash = row.row_hash.clone();
            buf.extend_from_slice(&row.line());
        };
        if dropped > 0 {
            self.shared.warned.store(false, Ordering::Relaxed);
            let mut gap = Decision::note(
                DecisionKind::Gap,
                securellm_common::time::now_ms(),
                format!(
                    "{dropped} decision(s) were dropped here: the writer fell behind or a write \
                     failed"
                ),
            );
            gap.dropped = dropped;
            push(gap);
        }
        let n = decisions.len() as u64;
        for d in decisions {
            push(d);
        }
        match self.append(&buf) {
            Ok(()) => {
                self.seq = seq;
                self.last_hash = hash;
                if let Err(e) = self.write_head() {
                    tracing::warn!(
                        "decision log {}: cannot update the head file: {e}",
                        self.shared.path.display()
                    );
                }
            }
            Err(e) => {
                tracing::warn!(
                    "decision log {}: cannot append: {e}",
                    self.shared.path.display()
                );
                // Counted, so the next successful write starts with a gap row.
                self.shared
                    .dropped
                    .fetch_add(dropped + n, Ordering::Relaxed);
                self.shared.dropped_total.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// Rewrite the head file (temporary file, sync, rename): never ahead of the synced rows.
    fn write_head(&self) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let head = head_path(&self.shared.path);
        let tmp = head.with_extension("head.tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        let h = Head {
            seq: self.seq,
            row_hash: self.last_hash.clone(),
        };
        f.write_all(&serde_json::to_vec(&h).unwrap_or_default())?;
        f.sync_data()?;
        drop(f);
        std::fs::rename(&tmp, &head)
    }

    /// Append `buf` and sync; on failure, cut the file back to where it was (no half row).
    fn append(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let before = self.file.metadata()?.len();
        let r = self
            .file
            .write_all(buf)
            .and_then(|()| self.file.sync_data());
        if r.is_err() {
            let _ = self.file.set_len(before);
        }
        r
    }
}

/// Open the decision log in the scheduler's data directory at start, and record the start (the
/// inventory and its GPUs).
pub fn open_at_start(
    data_dir: &Path,
    inventory: &str,
    gpus: &[crate::table::Gpu],
) -> Result<DecisionLog, DecisionError> {
    let now = securellm_common::time::now_ms();
    let log = DecisionLog::open(&decisions_path(data_dir), now)?;
    let gpus = gpus
        .iter()
        .map(|g| {
            format!(
                "GPU{} {} (reserve {})",
                g.index,
                securellm_common::format_bytes(g.total),
                securellm_common::format_bytes(g.reserve)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    log.record(Decision::note(
        DecisionKind::Started,
        now,
        format!("scheduler started; inventory {inventory}: {gpus}"),
    ));
    Ok(log)
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of a unix time in milliseconds.
pub fn utc_time(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// One readable line for a row, e.g. `2026-12-03 12:03:01 #12 eviction-notice lease l-… holder
/// backend-manager model qwen 4 GiB GPU0 prio 0 — for request: holder gateway model llama
/// prio 10 needs 6 GiB trace 4bf9…`.
pub fn describe(r: &Row) -> String {
    use securellm_common::format_bytes;
    let d = &r.decision;
    let mut s = format!("{} #{} {}", utc_time(d.time_ms), r.seq, d.kind.as_str());
    match d.kind {
        DecisionKind::Started | DecisionKind::Recovered | DecisionKind::Discontinuity => {
            if !d.detail.is_empty() {
                s.push_str(&format!(" {}", d.detail));
            }
        }
        DecisionKind::Gap => s.push_str(&format!(" {} decision(s) dropped", d.dropped)),
        _ => {
            if !d.lease.is_empty() {
                s.push_str(&format!(" lease {}", d.lease));
            }
            if !d.holder.is_empty() {
                s.push_str(&format!(" holder {}", d.holder));
            }
            if !d.model.is_empty() {
                s.push_str(&format!(" model {}", d.model));
            }
            s.push_str(&format!(" {}", format_bytes(d.bytes)));
            match d.gpu {
                Some(g) => s.push_str(&format!(" GPU{g}")),
                None => s.push_str(" any GPU"),
            }
            s.push_str(&format!(" prio {}", d.priority));
        }
    }
    if let Some(c) = &d.cause {
        let what = if matches!(
            d.kind,
            DecisionKind::Granted | DecisionKind::Queued | DecisionKind::WaitTimedOut
        ) {
            "request"
        } else {
            "for request"
        };
        s.push_str(&format!(" — {what}: holder {}", c.holder));
        if !c.label.is_empty() {
            s.push_str(&format!(" model {}", c.label));
        }
        s.push_str(&format!(
            " prio {} needs {}",
            c.priority,
            format_bytes(c.bytes)
        ));
        if let Some(g) = c.gpu {
            s.push_str(&format!(" on GPU{g}"));
        }
        if let Some(t) = &c.trace_id {
            s.push_str(&format!(" trace {t}"));
        }
    }
    if !d.detail.is_empty() {
        s.push_str(&format!(" ({})", d.detail));
    }
    s
}

#[cfg(test)]
mod tests;
