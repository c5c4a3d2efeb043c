-- The audit log shared by every gateway on this database (see src/audit/pg.rs): one hash chain
-- per writer. Each gateway replica writes its own chain (`chain_id`, `[storage] replica_id`);
-- within a chain, rows are numbered 1, 2, 3, … (`seq`) and hashed exactly as the SQLite log's
-- rows (src/audit/encoding.rs). Prompt text is never stored.
CREATE TABLE IF NOT EXISTS audit (
    chain_id          TEXT   NOT NULL,
    seq               BIGINT NOT NULL,
    time_ms           BIGINT NOT NULL,
    request_id        TEXT   NOT NULL,
    subject           TEXT   NOT NULL,
    key_id            TEXT   NOT NULL,
    client_addr       TEXT   NOT NULL,
    endpoint          TEXT   NOT NULL,
    model             TEXT   NOT NULL,
    upstream          TEXT   NOT NULL,
    status            BIGINT NOT NULL,
    error_code        TEXT   NOT NULL,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    latency_us        BIGINT NOT NULL,
    redactions        BIGINT NOT NULL,
    streamed          BIGINT NOT NULL,
    trace_id          TEXT   NOT NULL DEFAULT '',
    prev_hash         TEXT   NOT NULL,
    row_hash          TEXT   NOT NULL,
    PRIMARY KEY (chain_id, seq)
);

CREATE INDEX IF NOT EXISTS audit_time ON audit (time_ms);
CREATE INDEX IF NOT EXISTS audit_subject ON audit (subject, time_ms);
CREATE INDEX IF NOT EXISTS audit_key ON audit (key_id, time_ms);

-- Each chain's head: last committed seq and hash, moved in the same transaction as each batch
-- (and locked by it: two writers naming one chain extend it in turn instead of forking it).
CREATE TABLE IF NOT EXISTS audit_heads (
    chain_id   TEXT   PRIMARY KEY NOT NULL,
    last_id    BIGINT NOT NULL,
    last_hash  TEXT   NOT NULL,
    updated_ms BIGINT NOT NULL
);

-- Signed checkpoints: an Ed25519 signature over every chain's head at one moment (the signed
-- message is documented in src/audit/checkpoint.rs). A chain whose tail was cut, or which was
-- rewritten with valid hashes, no longer passes through the heads a checkpoint signed.
CREATE TABLE IF NOT EXISTS audit_checkpoints (
    id         BIGSERIAL PRIMARY KEY,
    time_ms    BIGINT NOT NULL,
    signer     TEXT   NOT NULL,
    public_key TEXT   NOT NULL,
    heads      TEXT   NOT NULL,
    signature  TEXT   NOT NULL
);

-- Append-only at the SQL level too. These stop mistakes, not someone with the rights to drop
-- them; detection is the chains' and the checkpoints' job.
CREATE OR REPLACE FUNCTION securellm_audit_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only';
END $$;

CREATE OR REPLACE FUNCTION securellm_audit_head_forward_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.last_id < OLD.last_id THEN
        RAISE EXCEPTION 'an audit head only moves forward';
    END IF;
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS audit_append_only ON audit;
CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION securellm_audit_append_only();

DROP TRIGGER IF EXISTS audit_checkpoints_append_only ON audit_checkpoints;
CREATE TRIGGER audit_checkpoints_append_only BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION securellm_audit_append_only();

DROP TRIGGER IF EXISTS audit_heads_no_delete ON audit_heads;
CREATE TRIGGER audit_heads_no_delete BEFORE DELETE ON audit_heads
    FOR EACH ROW EXECUTE FUNCTION securellm_audit_append_only();

DROP TRIGGER IF EXISTS audit_heads_forward_only ON audit_heads;
CREATE TRIGGER audit_heads_forward_only BEFORE UPDATE ON audit_heads
    FOR EACH ROW EXECUTE FUNCTION securellm_audit_head_forward_only();
