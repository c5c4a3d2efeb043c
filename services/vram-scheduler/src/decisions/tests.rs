//! The encoding's test vector, the verifier against each kind of tampering, and the writer.

use super::*;

/// Row 1 of the test vector: an eviction notice caused by a traced request.
fn row1() -> Decision {
    Decision {
        time_ms: 1_700_000_000_123,
        kind: DecisionKind::EvictionNotice,
        lease: "l-0123456789abcdef".into(),
        holder: "backend-manager".into(),
        model: "qwen".into(),
        gpu: Some(0),
        bytes: 4 << 30,
        priority: 0,
        evict_by_ms: Some(1_700_000_010_123),
        detail: "needed by a priority 10 request of 6442450944 bytes".into(),
        dropped: 0,
        cause: Some(Cause {
            ticket: "q-fedcba9876543210".into(),
            holder: "backend-manager".into(),
            label: "llama".into(),
            bytes: 6 << 30,
            priority: 10,
            gpu: None,
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
        }),
    }
}

/// Row 2: a gap row, no GPU, no cause, a negative priority, non-ASCII text.
fn row2() -> Decision {
    Decision {
        time_ms: 1_700_000_000_456,
        kind: DecisionKind::Gap,
        lease: String::new(),
        holder: String::new(),
        model: "modèle-π".into(),
        gpu: None,
        bytes: 0,
        priority: -5,
        evict_by_ms: None,
        detail: String::new(),
        dropped: 3,
        cause: None,
    }
}

// Computed once by an independent implementation of the module doc's format (Python, hashlib).
const ROW1_ENCODING: &str = "534c47505544433100000000000000010000018bcfe5687b000000000000000f65\
    76696374696f6e2d6e6f7469636500000000000000126c2d30313233343536373839616263646566000000000000\
    000f6261636b656e642d6d616e6167657200000000000000047177656e0100000000000000000000000100000000\
    0000000000000000010000018bcfe58f8b00000000000000336e65656465642062792061207072696f7269747920\
    31302072657175657374206f6620363434323435303934342062797465730000000000000000010000000000000012\
    712d66656463626139383736353433323130000000000000000f6261636b656e642d6d616e616765720000000000\
    0000056c6c616d610000000180000000000000000000000a00010000000000000020346266393266333537376233\
    3464613661336365393239643065306534373336";
const ROW1_HASH: &str = "5cb67e898a95360732a69626c3aefe624fb344d1dec50cac87bb46d847af8c62";
const ROW2_HASH: &str = "8afd42a8614704a60442a350d5046b166410548e57cc6774f8edf90558e10475";

#[test]
fn a_fixed_row_encodes_and_hashes_to_the_written_down_bytes() {
    let e = row1().canonical_encoding(1);
    assert_eq!(e.len(), 330);
    assert_eq!(&e[..8], ENCODING_TAG);
    assert_eq!(hex::encode(&e), ROW1_ENCODING);
    assert_eq!(
        row1().chain_hash(1, GENESIS_HASH).as_deref(),
        Some(ROW1_HASH)
    );
    assert_eq!(row2().chain_hash(2, ROW1_HASH).as_deref(), Some(ROW2_HASH));
    // The sequence number and the previous hash are part of the input.
    assert_ne!(row2().chain_hash(3, ROW1_HASH).as_deref(), Some(ROW2_HASH));
    assert_ne!(
        row2().chain_hash(2, GENESIS_HASH).as_deref(),
        Some(ROW2_HASH)
    );
    // A previous hash that is not 64 lowercase hex digits is refused.
    assert_eq!(row2().chain_hash(2, &ROW1_HASH.to_uppercase()), None);
    assert_eq!(row2().chain_hash(2, "00"), None);
}

#[test]
fn a_row_survives_its_json_line_exactly() {
    let r = Row::chained(1, GENESIS_HASH, row1());
    let line = r.line();
    assert!(line.ends_with(b"\n"));
    let back: Row = serde_json::from_slice(&line).unwrap();
    assert_eq!(back, r);
    assert!(back.content_ok());
    // An extra field is not part of the hash, so it is not accepted either.
    let mut v: serde_json::Value = serde_json::from_slice(&line).unwrap();
    v["decision"]["note"] = "hello".into();
    assert!(serde_json::from_value::<Row>(v).is_err());
}

/// A chain of `n` rows as file bytes.
fn chain(n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let mut hash = GENESIS_HASH.to_string();
    for seq in 1..=n {
        let mut d = row1();
        d.time_ms += seq;
        d.lease = format!("l-{seq}");
        if seq == 3 {
            d = row2();
        }
        let r = Row::chained(seq, &hash, d);
        hash = r.row_hash.clone();
        out.extend_from_slice(&r.line());
    }
    out
}

/// The head file the writer would have left after writing `bytes` (its last complete row).
fn write_head(path: &Path, bytes: &[u8]) {
    let last = bytes
        .split(|b| *b == b'\n')
        .rev()
        .find_map(|l| serde_json::from_slice::<Row>(l).ok())
        .unwrap();
    let head = Head {
        seq: last.seq,
        row_hash: last.row_hash,
    };
    std::fs::write(head_path(path), serde_json::to_vec(&head).unwrap()).unwrap();
}

fn lines(bytes: &[u8]) -> Vec<Vec<u8>> {
    bytes
        .strip_suffix(b"\n")
        .unwrap()
        .split(|b| *b == b'\n')
        .map(<[u8]>::to_vec)
        .collect()
}

fn join(lines: &[Vec<u8>]) -> Vec<u8> {
    let mut out = lines.join(&b'\n');
    out.push(b'\n');
    out
}

fn row_at(lines: &[Vec<u8>], i: usize) -> Row {
    serde_json::from_slice(&lines[i]).unwrap()
}

fn set_row(lines: &mut [Vec<u8>], i: usize, r: &Row) {
    lines[i] = serde_json::to_vec(r).unwrap();
}

#[track_caller]
fn broken(bytes: &[u8], kind: TamperKind, line: u64) -> VerifyReport {
    let r = verify_bytes(bytes);
    assert!(!r.ok, "{r:?}");
    assert_eq!(r.kind, Some(kind), "{r:?}");
    assert_eq!(r.first_bad_line, Some(line), "{r:?}");
    r
}

#[test]
fn an_intact_chain_verifies_and_reports_its_gaps() {
    let r = verify_bytes(&chain(6));
    assert!(r.ok, "{r:?}");
    assert_eq!(r.rows_checked, 6);
    assert_eq!(r.gaps, vec![(3, 3)], "row 3 is the gap row of the chain");
    assert_eq!(r.dropped(), 3);
    assert!(
        r.detail.contains("3 decision(s) were dropped"),
        "{}",
        r.detail
    );
    let empty = verify_bytes(b"");
    assert!(empty.ok && empty.rows_checked == 0 && empty.last_hash == GENESIS_HASH);
}

#[test]
fn an_edited_row_is_named() {
    let mut l = lines(&chain(6));
    let mut r = row_at(&l, 3);
    r.decision.holder = "someone-else".into();
    set_row(&mut l, 3, &r);
    let rep = broken(&join(&l), TamperKind::Edited, 4);
    assert_eq!(rep.first_bad_seq, Some(4));
    assert_eq!(rep.rows_checked, 3);

    // One byte of the raw line (inside a string value) changed.
    let mut l = lines(&chain(6));
    let at = l[1].windows(4).position(|w| w == b"qwen").unwrap();
    l[1][at] = b'Q';
    broken(&join(&l), TamperKind::Edited, 2);

    // Rewritten together with a recomputed hash: the next row's link shows it.
    let mut l = lines(&chain(6));
    let mut r = row_at(&l, 1);
    r.decision.bytes = 1;
    r = Row::chained(r.seq, &r.prev_hash, r.decision);
    set_row(&mut l, 1, &r);
    let rep = broken(&join(&l), TamperKind::Edited, 2);
    assert_eq!(rep.first_bad_seq, Some(2));

    // A line that is not a row at all.
    let mut l = lines(&chain(6));
    l[2] = b"{\"seq\": 3}".to_vec();
    broken(&join(&l), TamperKind::Edited, 3);
}

#[test]
fn a_deleted_row_is_named() {
    let mut l = lines(&chain(6));
    l.remove(2);
    let rep = broken(&join(&l), TamperKind::Deleted, 3);
    assert_eq!(rep.first_bad_seq, Some(3));
    assert!(rep.detail.contains("row 3 is missing"), "{}", rep.detail);
    let mut l = lines(&chain(6));
    l.drain(1..3);
    let rep = broken(&join(&l), TamperKind::Deleted, 2);
    assert!(
        rep.detail.contains("rows 2 to 3 are missing"),
        "{}",
        rep.detail
    );
    // The first row.
    let mut l = lines(&chain(6));
    l.remove(0);
    broken(&join(&l), TamperKind::Deleted, 1);
}

#[test]
fn an_inserted_row_is_named() {
    // A forged row that does not match its hash, between rows 2 and 3.
    let mut l = lines(&chain(6));
    let mut forged = row_at(&l, 2);
    forged.decision.holder = "forged".into();
    l.insert(2, serde_json::to_vec(&forged).unwrap());
    broken(&join(&l), TamperKind::Inserted, 3);

    // A forged row with a correct hash, linked to row 2 and numbered 3: the real row 3 follows.
    let mut l = lines(&chain(6));
    let two = row_at(&l, 1);
    let forged = Row::chained(3, &two.row_hash, row1());
    l.insert(2, serde_json::to_vec(&forged).unwrap());
    let rep = broken(&join(&l), TamperKind::Inserted, 3);
    assert_eq!(rep.rows_checked, 2);
}

#[test]
fn reordered_rows_are_named() {
    let mut l = lines(&chain(6));
    l.swap(2, 3);
    let rep = broken(&join(&l), TamperKind::Reordered, 3);
    assert!(rep.detail.contains("row 3 is on line 4"), "{}", rep.detail);
    // A row moved to the end.
    let mut l = lines(&chain(6));
    let r = l.remove(1);
    l.push(r);
    broken(&join(&l), TamperKind::Reordered, 2);
}

#[test]
fn a_truncated_last_line_is_named() {
    let mut b = chain(6);
    b.truncate(b.len() - 20);
    let rep = broken(&b, TamperKind::Truncated, 6);
    assert_eq!(rep.rows_checked, 5);
    // Only the newline lost: the row is whole and verifies.
    let mut b = chain(6);
    b.pop();
    assert!(verify_bytes(&b).ok);
}

#[test]
fn the_time_is_printed_in_utc() {
    assert_eq!(utc_time(0), "1970-01-01 00:00:00");
    assert_eq!(utc_time(1_700_000_000_123), "2023-11-14 22:13:20");
    assert_eq!(utc_time(951_782_400_000), "2000-02-29 00:00:00");
}

#[test]
fn a_row_reads_as_who_why_and_for_whom() {
    let r = Row::chained(12, GENESIS_HASH, row1());
    let s = describe(&r);
    assert!(
        s.starts_with(
            "2023-11-14 22:13:20 #12 eviction-notice lease l-0123456789abcdef holder \
             backend-manager model qwen 4 GiB GPU0 prio 0 — for request: holder \
             backend-manager model llama prio 10 needs 6 GiB trace \
             4bf92f3577b34da6a3ce929d0e0e4736"
        ),
        "{s}"
    );
    let g = describe(&Row::chained(2, GENESIS_HASH, row2()));
    assert!(g.contains("gap 3 decision(s) dropped"), "{g}");
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn the_writer_appends_a_chain_that_continues_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let path = decisions_path(dir.path());
    rt().block_on(async {
        let log = DecisionLog::open(&path, 1).unwrap();
        log.record(row1());
        log.record(row2());
        log.flush().await;
    });
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let rows = read_rows(&path).unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].row_hash, ROW1_HASH, "the writer writes the format");
    assert_eq!(rows[1].row_hash, ROW2_HASH);
    // Reopened: the chain goes on from row 2.
    rt().block_on(async {
        let log = DecisionLog::open(&path, 2).unwrap();
        log.record(row1());
        log.flush().await;
    });
    let rep = verify_file(&path).unwrap();
    assert!(rep.ok && rep.rows_checked == 3, "{rep:?}");
    assert_eq!(read_rows(&path).unwrap()[2].prev_hash, ROW2_HASH);
}

#[test]
fn a_torn_last_line_is_cut_off_and_noted_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = decisions_path(dir.path());
    let mut b = chain(4);
    write_head(&path, &b);
    b.extend_from_slice(b"{\"seq\":5,\"prev");
    std::fs::write(&path, &b).unwrap();
    // Past the head's row, a torn line reads as a write in progress; the chain alone calls it
    // truncated.
    let rep = verify_file(&path).unwrap();
    assert!(rep.ok && rep.detail.contains("being written"), "{rep:?}");
    assert_eq!(verify_bytes(&b).kind, Some(TamperKind::Truncated));
    rt().block_on(async {
        let log = DecisionLog::open(&path, 7).unwrap();
        log.flush().await;
    });
    let rep = verify_file(&path).unwrap();
    assert!(rep.ok && rep.rows_checked == 5, "{rep:?}");
    let rows = read_rows(&path).unwrap();
    assert_eq!(rows[4].decision.kind, DecisionKind::Recovered);
    assert!(
        rows[4]
            .decision
            .detail
            .contains("torn last line of 14 bytes"),
        "{:?}",
        rows[4].decision
    );
}

#[test]
fn an_unreadable_last_row_moves_the_file_aside_and_starts_a_new_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = decisions_path(dir.path());
    let mut b = chain(2);
    b.extend_from_slice(b"not a row\n");
    std::fs::write(&path, &b).unwrap();
    rt().block_on(async {
        let log = DecisionLog::open(&path, 42).unwrap();
        log.flush().await;
    });
    let aside = dir.path().join(format!("{FILE_NAME}.broken-42"));
    assert_eq!(std::fs::read(&aside).unwrap(), b, "the evidence is kept");
    // The new chain says so, and verification keeps reporting it: a restart never turns a
    // broken log into a clean one.
    let rep = verify_file(&path).unwrap();
    assert!(!rep.ok && rep.kind == Some(TamperKind::Deleted), "{rep:?}");
    assert!(rep.detail.contains(".broken-42"), "{rep:?}");
    let rows = read_rows(&path).unwrap();
    assert_eq!(rows[0].decision.kind, DecisionKind::Discontinuity);
    assert!(rows[0].decision.detail.contains(".broken-42"));
}

#[test]
fn rows_cut_off_the_end_before_a_restart_stay_visible_to_verify() {
    let dir = tempfile::tempdir().unwrap();
    let path = decisions_path(dir.path());
    // A real log of a few rows with its head file.
    rt().block_on(async {
        let log = DecisionLog::open(&path, 1).unwrap();
        for t in 2..6 {
            log.record(Decision::note(DecisionKind::Gap, t, "x"));
        }
        log.flush().await;
    });
    assert!(verify_file(&path).unwrap().ok);
    // Cut the last two rows, then restart the writer: it must not continue as if nothing
    // happened.
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let kept = lines[..lines.len() - 2].join("\n") + "\n";
    std::fs::write(&path, kept).unwrap();
    rt().block_on(async {
        let log = DecisionLog::open(&path, 9).unwrap();
        log.flush().await;
    });
    let rep = verify_file(&path).unwrap();
    assert!(!rep.ok && rep.kind == Some(TamperKind::Deleted), "{rep:?}");
    assert!(rep.detail.contains("cut off the end"), "{rep:?}");
    // A clean restart (nothing cut) stays clean.
    let dir2 = tempfile::tempdir().unwrap();
    let p2 = decisions_path(dir2.path());
    for t in 0..2 {
        rt().block_on(async {
            let log = DecisionLog::open(&p2, t).unwrap();
            log.record(Decision::note(DecisionKind::Gap, t, "y"));
            log.flush().await;
        });
    }
    let rep = verify_file(&p2).unwrap();
    assert!(rep.ok, "{rep:?}");
}

#[test]
fn dropped_decisions_become_a_gap_row_before_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = decisions_path(dir.path());
    // A writer that is not running yet: fill its queue, then overflow it by two.
    let (tx, rx) = mpsc::channel(2);
    let shared = Arc::new(Shared {
        dropped: AtomicU64::new(0),
        dropped_total: AtomicU64::new(0),
        warned: AtomicBool::new(false),
        path: path.clone(),
    });
    let log = DecisionLog {
        tx,
        shared: shared.clone(),
    };
    for _ in 0..4 {
        log.record(row1());
    }
    assert_eq!(log.dropped_total(), 2);
    let (file, seq, last_hash) = open_file(&path).unwrap();
    let writer = Writer {
        file,
        seq,
        last_hash,
        shared,
    };
    drop(log);
    writer.run(rx);
    let rows = read_rows(&path).unwrap();
    let kinds: Vec<DecisionKind> = rows.iter().map(|r| r.decision.kind).collect();
    assert_eq!(
        kinds,
        vec![
            DecisionKind::Gap,
            DecisionKind::EvictionNotice,
            DecisionKind::EvictionNotice
        ]
    );
    assert_eq!(rows[0].decision.dropped, 2);
    let rep = verify_file(&path).unwrap();
    assert!(rep.ok, "{rep:?}");
    assert_eq!(rep.gaps, vec![(1, 2)]);
}

#[test]
fn a_long_log_is_continued_from_its_tail_even_when_the_last_row_is_longer_than_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let path = decisions_path(dir.path());
    // Well over the 64 KiB first window, ending with a row longer than that window.
    let mut b = chain(300);
    let last = row_at(&lines(&b), 299);
    let mut long = row1();
    long.detail = "x".repeat(200 * 1024);
    b.extend_from_slice(&Row::chained(301, &last.row_hash, long).line());
    assert!(b.len() > 300 * 1024);
    std::fs::write(&path, &b).unwrap();
    // A torn line after it, too.
    let mut torn = b.clone();
    torn.extend_from_slice(b"{\"seq\":302");
    std::fs::write(&path, &torn).unwrap();
    write_head(&path, &b);
    rt().block_on(async {
        let log = DecisionLog::open(&path, 9).unwrap();
        log.record(row2());
        log.flush().await;
    });
    let rep = verify_file(&path).unwrap();
    assert!(rep.ok, "{rep:?}");
    assert_eq!(
        rep.rows_checked, 303,
        "301 rows, the recovery note, the new row"
    );
    let rows = read_rows(&path).unwrap();
    assert_eq!(rows[301].decision.kind, DecisionKind::Recovered);
    assert_eq!(rows[302].prev_hash, rows[301].row_hash);
    assert!(std::fs::read(&path).unwrap().starts_with(&b));
}

#[test]
fn the_head_file_catches_rows_cut_off_the_end_and_a_rewritten_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = decisions_path(dir.path());
    rt().block_on(async {
        let log = DecisionLog::open(&path, 1).unwrap();
        for _ in 0..3 {
            log.record(row1());
        }
        log.flush().await;
    });
    let head: Head = serde_json::from_slice(&std::fs::read(head_path(&path)).unwrap()).unwrap();
    let rows = read_rows(&path).unwrap();
    assert_eq!((head.seq, &head.row_hash), (3, &rows[2].row_hash));
    let good = std::fs::read(&path).unwrap();
    assert!(verify_file(&path).unwrap().ok);

    // The last row cut off (a whole line: the chain alone cannot tell).
    let l = lines(&good);
    std::fs::write(&path, join(&l[..2])).unwrap();
    assert!(verify_bytes(&std::fs::read(&path).unwrap()).ok);
    let rep = verify_file(&path).unwrap();
    assert_eq!(rep.kind, Some(TamperKind::Truncated), "{rep:?}");
    assert_eq!(rep.first_bad_seq, Some(3));
    assert!(rep.detail.contains("row 3 was removed"), "{}", rep.detail);

    // The whole chain rewritten with recomputed hashes.
    let mut hash = GENESIS_HASH.to_string();
    let mut forged = Vec::new();
    for seq in 1..=3 {
        let r = Row::chained(seq, &hash, row2());
        hash = r.row_hash.clone();
        forged.extend_from_slice(&r.line());
    }
    std::fs::write(&path, &forged).unwrap();
    let rep = verify_file(&path).unwrap();
    assert_eq!(rep.kind, Some(TamperKind::Edited), "{rep:?}");
    assert_eq!(rep.first_bad_seq, Some(3));

    // A row chained after the head (appended before the head was rewritten) is fine.
    let mut more = good.clone();
    more.extend_from_slice(&Row::chained(4, &rows[2].row_hash, row2()).line());
    std::fs::write(&path, &more).unwrap();
    assert!(verify_file(&path).unwrap().ok);

    // Without the head file, removal from the end cannot be ruled out.
    std::fs::remove_file(head_path(&path)).unwrap();
    let rep = verify_file(&path).unwrap();
    assert_eq!(rep.kind, Some(TamperKind::Truncated), "{rep:?}");
    assert!(rep.detail.contains("missing"), "{}", rep.detail);
}

#[test]
fn a_row_being_written_past_the_head_is_not_a_break_but_a_cut_before_the_head_is() {
    let dir = tempfile::tempdir().unwrap();
    let path = decisions_path(dir.path());
    let b = chain(4);
    write_head(&path, &b);
    // A write in progress: the head names row 4, row 5 is half there.
    let mut w = b.clone();
    w.extend_from_slice(b"{\"seq\":5,\"prev");
    std::fs::write(&path, &w).unwrap();
    let rep = verify_file(&path).unwrap();
    assert!(rep.ok && rep.rows_checked == 4, "{rep:?}");
    // Row 4 itself cut in half: the head names a row that is not complete.
    let l = lines(&b);
    let mut cut: Vec<u8> = l[..3]
        .iter()
        .flat_map(|x| x.iter().copied().chain([b'\n']))
        .collect();
    cut.extend_from_slice(&l[3][..10]);
    std::fs::write(&path, &cut).unwrap();
    let rep = verify_file(&path).unwrap();
    assert!(!rep.ok, "{rep:?}");
}
