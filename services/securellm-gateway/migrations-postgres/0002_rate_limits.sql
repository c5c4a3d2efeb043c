-- Rate limits shared by every gateway (services/securellm-gateway/src/limits/shared.rs).
-- Soft state: UNLOGGED (a database crash forgets recent admissions; keys get a fresh allowance).
CREATE UNLOGGED TABLE IF NOT EXISTS rate_limits (
        subject TEXT PRIMARY KEY NOT NULL,
        rpm_tat_ms DOUBLE PRECISION NOT NULL DEFAULT 0,
        tpm_level DOUBLE PRECISION NOT NULL DEFAULT 0,
        at_ms BIGINT NOT NULL DEFAULT 0);
CREATE UNLOGGED TABLE IF NOT EXISTS concurrency_slots (
        id BIGSERIAL PRIMARY KEY, subject TEXT NOT NULL, expires_ms BIGINT NOT NULL);
CREATE INDEX IF NOT EXISTS concurrency_slots_subject ON concurrency_slots (subject);
CREATE TABLE IF NOT EXISTS gateway_replicas (
        id TEXT PRIMARY KEY NOT NULL, seen_ms BIGINT NOT NULL);

-- securellm_admit: `decide` (limits/shared.rs) operation for operation, run atomically in one
-- statement; tests/postgres.rs holds the two bit-identical on random inputs.
CREATE OR REPLACE FUNCTION securellm_admit(
    p_subject TEXT, p_now BIGINT, p_rpm BIGINT, p_tpm BIGINT, p_conc BIGINT, p_est BIGINT,
    p_slot_expires BIGINT)
RETURNS TABLE (admitted BOOLEAN, which TEXT, retry_ms DOUBLE PRECISION, slot BIGINT,
               remaining BIGINT)
LANGUAGE plpgsql AS $fn$
DECLARE
    s rate_limits%ROWTYPE;
    now_ms BIGINT;
    in_flight BIGINT := 0;
    lvl DOUBLE PRECISION;
    over DOUBLE PRECISION;
    t DOUBLE PRECISION;
    tat DOUBLE PRECISION;
    new_level DOUBLE PRECISION;
    new_at BIGINT;
    new_tat DOUBLE PRECISION;
    rem BIGINT := NULL;
    sid BIGINT := NULL;
BEGIN
    -- The row lock without writing a new row version (one write per admission: the UPDATE).
    SELECT * INTO s FROM rate_limits WHERE subject = p_subject FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO rate_limits (subject) VALUES (p_subject) ON CONFLICT (subject) DO NOTHING;
        SELECT * INTO s FROM rate_limits WHERE subject = p_subject FOR UPDATE;
    END IF;
    now_ms := GREATEST(p_now, s.at_ms);
    IF p_conc > 0 THEN
        DELETE FROM concurrency_slots WHERE subject = p_subject AND expires_ms <= p_now;
        SELECT count(*) INTO in_flight FROM concurrency_slots WHERE subject = p_subject;
        IF in_flight >= p_conc THEN
            RETURN QUERY SELECT false, 'concurrency'::text, 1000.0::float8, NULL::bigint, NULL::bigint;
            RETURN;
        END IF;
    END IF;
    new_level := s.tpm_level;
    new_at := s.at_ms;
    IF p_tpm > 0 THEN
        IF p_est > p_tpm THEN
            RETURN QUERY SELECT false, 'tpm'::text, 60000.0::float8, NULL::bigint, NULL::bigint;
            RETURN;
        END IF;
        lvl := GREATEST(s.tpm_level - (now_ms - s.at_ms)::float8 * p_tpm::float8 / 60000.0::float8, 0.0::float8);
        over := lvl + p_est::float8 - p_tpm::float8;
        IF over > 0.0 THEN
            RETURN QUERY SELECT false, 'tpm'::text, over * 60000.0::float8 / p_tpm::float8, NULL::bigint, NULL::bigint;
            RETURN;
        END IF;
        new_level := lvl + p_est::float8;
        new_at := now_ms;
    END IF;
    new_tat := s.rpm_tat_ms;
    IF p_rpm > 0 THEN
        t := 60000.0::float8 / p_rpm::float8;
        tat := GREATEST(s.rpm_tat_ms, now_ms::float8) + t;
        over := tat - now_ms::float8 - 60000.0::float8;
        IF over > 1e-6 THEN
            RETURN QUERY SELECT false, 'rpm'::text, over, NULL::bigint, NULL::bigint;
            RETURN;
        END IF;
        new_tat := tat;
        rem := GREATEST(floor((60000.0::float8 - (tat - now_ms::float8)) / t + 1e-9::float8), 0.0::float8)::bigint;
    END IF;
    UPDATE rate_limits SET rpm_tat_ms = new_tat, tpm_level = new_level, at_ms = new_at
        WHERE subject = p_subject;
    IF p_conc > 0 THEN
        INSERT INTO concurrency_slots (subject, expires_ms) VALUES (p_subject, p_slot_expires)
            RETURNING id INTO sid;
    END IF;
    RETURN QUERY SELECT true, NULL::text, 0.0::float8, sid, rem;
END
$fn$;

-- securellm_settle: `settle` as one UPDATE.
CREATE OR REPLACE FUNCTION securellm_settle(
    p_subject TEXT, p_now BIGINT, p_tpm BIGINT, p_est BIGINT, p_actual BIGINT)
RETURNS VOID LANGUAGE sql AS $fn$
    UPDATE rate_limits SET
        tpm_level = GREATEST(
            GREATEST(tpm_level - (GREATEST(p_now, at_ms) - at_ms)::float8 * p_tpm::float8 / 60000.0::float8, 0.0::float8)
            + p_actual::float8 - p_est::float8, 0.0::float8),
        at_ms = GREATEST(p_now, at_ms)
    WHERE subject = p_subject
$fn$;
