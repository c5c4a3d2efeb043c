-- Models: one row per model, the full record as JSON (the catalogue is loaded into memory at
-- start; SQLite is its durable copy). The fingerprint decides whether a rescan re-parses.
CREATE TABLE IF NOT EXISTS models (
    id            TEXT PRIMARY KEY NOT NULL,
    name          TEXT NOT NULL,
    fingerprint   TEXT NOT NULL,
    first_seen_ms INTEGER NOT NULL,
    record        TEXT NOT NULL
);

-- Measured memory per configuration, reported by the backend manager.
CREATE TABLE IF NOT EXISTS measurements (
    model_id    TEXT NOT NULL,
    context     INTEGER NOT NULL,
    parallel    INTEGER NOT NULL,
    cache_type  TEXT NOT NULL,
    gpu_layers  INTEGER NOT NULL,
    terms       TEXT NOT NULL,
    source      TEXT NOT NULL,
    measured_ms INTEGER NOT NULL,
    PRIMARY KEY (model_id, context, parallel, cache_type, gpu_layers)
);
