-- The trace a request belongs to (W3C trace id, 32 lowercase hex digits; '' when none). Rows
-- written before this column existed read as ''; an empty trace id is not part of a row's
-- canonical encoding, so their hashes still verify (see src/audit/encoding.rs).
ALTER TABLE audit ADD COLUMN trace_id TEXT NOT NULL DEFAULT '';
