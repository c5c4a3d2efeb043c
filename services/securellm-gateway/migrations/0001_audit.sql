-- Tamper-evident audit log (see src/audit.rs for the hash chain and its canonical encoding).
--
-- One row per request. Ids are assigned by the audit writer (head.last_id + 1), consecutive
-- from 1; `prev_hash` is the previous row's `row_hash` (64 zeros for row 1) and
-- row_hash = hex(sha256(prev_hash_bytes || canonical_encoding(row))). Prompt text is never stored.
CREATE TABLE IF NOT EXISTS audit (
    id                INTEGER PRIMARY KEY NOT NULL,
    time_ms           INTEGER NOT NULL,
    request_id        TEXT    NOT NULL,
    subject           TEXT    NOT NULL,
    key_id            TEXT    NOT NULL,
    client_addr       TEXT    NOT NULL,
    endpoint          TEXT    NOT NULL,
    model             TEXT    NOT NULL,
    upstream          TEXT    NOT NULL,
    status            INTEGER NOT NULL,
    error_code        TEXT    NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    latency_us        INTEGER NOT NULL,
    redactions        INTEGER NOT NULL,
    streamed          INTEGER NOT NULL,
    prev_hash         TEXT    NOT NULL,
    row_hash          TEXT    NOT NULL
) STRICT;

CREATE INDEX IF NOT EXISTS audit_time ON audit (time_ms);
CREATE INDEX IF NOT EXISTS audit_subject ON audit (subject, id);
CREATE INDEX IF NOT EXISTS audit_key ON audit (key_id, id);

-- The head: last committed id and hash, updated in the same transaction as each batch, so that
-- removing rows from the end of the chain (which leaves a valid, shorter chain) is detected.
CREATE TABLE IF NOT EXISTS audit_head (
    id        INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    last_id   INTEGER NOT NULL,
    last_hash TEXT    NOT NULL
) STRICT;

INSERT OR IGNORE INTO audit_head (id, last_id, last_hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');

-- Append-only at the SQL level too. These stop mistakes, not an attacker who can write the file
-- (they can drop the triggers); the hash chain and the head are what detect tampering.
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END;

CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END;

CREATE TRIGGER IF NOT EXISTS audit_head_no_delete BEFORE DELETE ON audit_head
BEGIN
    SELECT RAISE(ABORT, 'the audit head cannot be deleted');
END;

CREATE TRIGGER IF NOT EXISTS audit_head_forward_only BEFORE UPDATE ON audit_head
WHEN NEW.last_id < OLD.last_id
BEGIN
    SELECT RAISE(ABORT, 'the audit head only moves forward');
END;
