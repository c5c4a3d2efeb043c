//! Walking the chain: every row in id order inside one read transaction, the first problem
//! reported (see the module doc of [`super`], "Verification").

use std::path::Path;

use futures::TryStreamExt;
use sqlx::Connection;
use sqlx::Row;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};

use super::encoding::{Fields, GENESIS_HASH, is_hash};
use super::{AuditError, AuditHead, BUSY_TIMEOUT, TamperKind, VerifyReport, read_head};

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

pub(super) async fn verify_conn(conn: &mut SqliteConnection) -> Result<VerifyReport, AuditError> {
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

/// Every column: a log written before `trace_id` existed, opened read-only without migrating,
/// has no such column (its rows read as having no trace id).
const SELECT_CHAIN: &str = "SELECT * FROM audit ORDER BY id";

/// A row as read for verification; undecodable columns make the row fail its content check.
pub(super) struct RawRow {
    id: i64,
    prev_hash: String,
    row_hash: String,
    fields: Result<Fields, String>,
}

impl RawRow {
    /// From a SQLite or PostgreSQL row with an `id` column (a chain's `seq` on PostgreSQL).
    pub(super) fn read<R>(r: &R) -> Result<Self, AuditError>
    where
        R: Row,
        for<'a> &'a str: sqlx::ColumnIndex<R>,
        for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
        for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    {
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

pub(super) struct Walker {
    rows_checked: u64,
    next_id: i64,
    /// row_hash of the last good row (genesis before row 1).
    last_hash: String,
    /// prev_hash of the last good row (None before row 1).
    before_last_hash: Option<String>,
    pending: Option<Pending>,
}

impl Walker {
    pub(super) fn new() -> Self {
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
            chains: 1,
            ..VerifyReport::default()
        }
    }

    /// Feed the next row (ascending id); `Some` once the first problem is known.
    pub(super) fn push(&mut self, row: RawRow) -> Option<VerifyReport> {
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
    pub(super) fn finish(mut self, head: Result<AuditHead, String>) -> VerifyReport {
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
            chains: 1,
            ..VerifyReport::default()
        }
    }
}
