-- API keys shared by every gateway on this database (the SQLite table's columns).
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY NOT NULL, hash BYTEA NOT NULL UNIQUE, name TEXT NOT NULL,
    prefix TEXT NOT NULL, subject TEXT NOT NULL, models TEXT NOT NULL,
    rpm BIGINT, tpm BIGINT, concurrent BIGINT,
    created_ms BIGINT NOT NULL, expires_ms BIGINT, revoked_ms BIGINT,
    max_tokens BIGINT, priority BIGINT);
