//! The audit log's tests: the writer, the chain, verification, tampering.

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

use super::writer::{ROWS_PER_INSERT, chunk_len};
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
        // Most rows belong to a trace; every fourth has none (hashed as format version 1).
        trace_id: if n.is_multiple_of(4) {
            String::new()
        } else {
            format!("{:032x}", 0xabc0_0000 + n)
        },
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
    // Without a trace id, the columns of the first schema (also a log that never migrated).
    let sql = if f.trace_id.is_empty() {
        "INSERT INTO audit (id, time_ms, request_id, subject, key_id, client_addr, endpoint, \
         model, upstream, status, error_code, prompt_tokens, completion_tokens, latency_us, \
         redactions, streamed, prev_hash, row_hash) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    } else {
        "INSERT INTO audit (id, time_ms, request_id, subject, key_id, client_addr, endpoint, \
         model, upstream, status, error_code, prompt_tokens, completion_tokens, latency_us, \
         redactions, streamed, prev_hash, row_hash, trace_id) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    };
    let q = sqlx::query(sql)
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
        .bind(hash);
    let q = if f.trace_id.is_empty() {
        q
    } else {
        q.bind(f.trace_id)
    };
    q.execute(&mut conn).await.unwrap();
    conn.close().await.unwrap();
}

#[tokio::test]
async fn a_log_written_before_trace_ids_verifies_before_and_after_the_migration() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    // The first schema only, as a gateway without trace ids left it, and a chain of its rows
    // hashed in format version 1 (no trace id).
    let mut conn = SqliteConnection::connect_with(
        &SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true),
    )
    .await
    .unwrap();
    sqlx::raw_sql(include_str!("../../migrations/0001_audit.sql"))
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    let mut prev = GENESIS_HASH.to_string();
    for id in 1..=5 {
        let mut e = entry(id);
        e.trace_id = String::new();
        let hash = chain_hash(&prev, &e).unwrap();
        insert_raw(&path, id as i64, &e, &prev, &hash).await;
        prev = hash;
    }
    tamper(
        &path,
        &format!("UPDATE audit_head SET last_id = 5, last_hash = '{prev}' WHERE id = 1"),
    )
    .await;
    // Read-only, without migrating: the old file verifies.
    let r = verify_file(&path).await.unwrap();
    assert!(r.ok, "{r:?}");
    assert_eq!(r.rows_checked, 5);
    // Opened by this gateway (migrated: a trace_id column), the old rows still verify, read as
    // having no trace id, and new rows with trace ids extend the same chain.
    let log = AuditLog::open(&path).await.unwrap();
    assert_eq!(row(&log, 3).await.entry.trace_id, "");
    let mut traced = entry(6);
    traced.trace_id = "4bf92f3577b34da6a3ce929d0e0e4736".into();
    log.append(traced).await.unwrap();
    log.append(entry(7)).await.unwrap();
    let r = log.verify().await.unwrap();
    assert!(r.ok, "{r:?}");
    assert_eq!(r.rows_checked, 7);
    assert_eq!(
        row(&log, 6).await.entry.trace_id,
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    assert_eq!(row(&log, 6).await.prev_hash, prev);
    assert_eq!(verify_file(&path).await.unwrap(), r);
}

#[tokio::test]
async fn an_edited_trace_id_breaks_the_chain() {
    let (_dir, path, log) = fresh(10).await;
    assert!(log.verify().await.unwrap().ok);
    assert_eq!(
        row(&log, 3).await.entry.trace_id,
        format!("{:032x}", 0xabc0_0003u64)
    );
    tamper(
        &path,
        "UPDATE audit SET trace_id = '00000000000000000000000000000001' WHERE id = 3",
    )
    .await;
    assert_bad(&log.verify().await.unwrap(), Some(3), TamperKind::Edited);

    // A trace id added to a row that had none, and one removed, are edits too.
    let (_dir, path, log) = fresh(10).await;
    assert_eq!(row(&log, 4).await.entry.trace_id, "");
    tamper(
        &path,
        "UPDATE audit SET trace_id = '4bf92f3577b34da6a3ce929d0e0e4736' WHERE id = 4",
    )
    .await;
    assert_bad(&log.verify().await.unwrap(), Some(4), TamperKind::Edited);
    let (_dir, path, log) = fresh(10).await;
    tamper(&path, "UPDATE audit SET trace_id = '' WHERE id = 2").await;
    assert_bad(&log.verify().await.unwrap(), Some(2), TamperKind::Edited);
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
        trace_id: String::new(),
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
    if let Store::Sqlite { pool, .. } = &log.shared.store {
        pool.close().await;
    }
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
        let mut conn = SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(&path))
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
