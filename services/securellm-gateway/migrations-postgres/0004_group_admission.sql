-- Group admission (services/securellm-gateway/src/limits/shared.rs, "Batches"): the admissions
-- of one subject that queue in one gateway while its previous call is in flight are decided in
-- ONE call, under one row lock, one after another exactly as `decide` would decide them in that
-- order (each sees the state the previous one left, and the slots it took). tests/postgres.rs
-- holds it bit-identical to the Rust model on random batches.
--
-- Concurrency is counted per gateway, not per request: `concurrency_holds` has one row per
-- (subject, replica) with the slots that replica holds and an expiry that every admission
-- through it pushes to now + the longest a request may run (+ margin), so it covers all its
-- requests in flight. A crashed replica stops refreshing: its row expires and its slots come
-- back. Admission adds to the replica's row once per batch; ends subtract in batches. (Replaces
-- a row per request in `concurrency_slots`, whose insert/delete churn cost more than the rest.)
CREATE UNLOGGED TABLE IF NOT EXISTS concurrency_holds (
        subject TEXT NOT NULL, replica TEXT NOT NULL, held BIGINT NOT NULL,
        expires_ms BIGINT NOT NULL, PRIMARY KEY (subject, replica));

CREATE OR REPLACE FUNCTION securellm_admit_many(
    p_subject TEXT, p_now BIGINT, p_rpm BIGINT, p_tpm BIGINT, p_conc BIGINT, p_ests BIGINT[],
    p_slot_expires BIGINT, p_replica TEXT)
RETURNS TABLE (idx INT, admitted BOOLEAN, which TEXT, retry_ms DOUBLE PRECISION, slot BIGINT,
               remaining BIGINT)
LANGUAGE plpgsql AS $fn$
DECLARE
    s rate_limits%ROWTYPE;
    now_ms BIGINT;
    in_flight BIGINT := 0;
    est BIGINT;
    lvl DOUBLE PRECISION;
    over DOUBLE PRECISION;
    t DOUBLE PRECISION;
    tat DOUBLE PRECISION;
    new_level DOUBLE PRECISION;
    new_at BIGINT;
    new_tat DOUBLE PRECISION;
    rem BIGINT;
    took BIGINT := 0;
    changed BOOLEAN := false;
BEGIN
    SELECT * INTO s FROM rate_limits WHERE subject = p_subject FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO rate_limits (subject) VALUES (p_subject) ON CONFLICT (subject) DO NOTHING;
        SELECT * INTO s FROM rate_limits WHERE subject = p_subject FOR UPDATE;
    END IF;
    IF p_conc > 0 THEN
        SELECT coalesce(sum(held), 0) INTO in_flight FROM concurrency_holds
            WHERE subject = p_subject AND expires_ms > p_now;
    END IF;
    FOR i IN 1 .. coalesce(array_length(p_ests, 1), 0) LOOP
        idx := i;
        slot := NULL;
        remaining := NULL;
        est := p_ests[i];
        now_ms := GREATEST(p_now, s.at_ms);
        IF p_conc > 0 AND in_flight >= p_conc THEN
            admitted := false; which := 'concurrency'; retry_ms := 1000.0;
            RETURN NEXT;
            CONTINUE;
        END IF;
        new_level := s.tpm_level;
        new_at := s.at_ms;
        IF p_tpm > 0 THEN
            IF est > p_tpm THEN
                admitted := false; which := 'tpm'; retry_ms := 60000.0;
                RETURN NEXT;
                CONTINUE;
            END IF;
            lvl := GREATEST(s.tpm_level - (now_ms - s.at_ms)::float8 * p_tpm::float8 / 60000.0::float8, 0.0::float8);
            over := lvl + est::float8 - p_tpm::float8;
            IF over > 0.0 THEN
                admitted := false; which := 'tpm'; retry_ms := over * 60000.0::float8 / p_tpm::float8;
                RETURN NEXT;
                CONTINUE;
            END IF;
            new_level := lvl + est::float8;
            new_at := now_ms;
        END IF;
        new_tat := s.rpm_tat_ms;
        rem := NULL;
        IF p_rpm > 0 THEN
            t := 60000.0::float8 / p_rpm::float8;
            tat := GREATEST(s.rpm_tat_ms, now_ms::float8) + t;
            over := tat - now_ms::float8 - 60000.0::float8;
            IF over > 1e-6 THEN
                admitted := false; which := 'rpm'; retry_ms := over;
                RETURN NEXT;
                CONTINUE;
            END IF;
            new_tat := tat;
            rem := GREATEST(floor((60000.0::float8 - (tat - now_ms::float8)) / t + 1e-9::float8), 0.0::float8)::bigint;
        END IF;
        s.rpm_tat_ms := new_tat;
        s.tpm_level := new_level;
        s.at_ms := new_at;
        changed := true;
        IF p_conc > 0 THEN
            in_flight := in_flight + 1;
            took := took + 1;
            slot := 1;
        END IF;
        admitted := true; which := NULL; retry_ms := 0.0; remaining := rem;
        RETURN NEXT;
    END LOOP;
    IF changed THEN
        UPDATE rate_limits SET rpm_tat_ms = s.rpm_tat_ms, tpm_level = s.tpm_level, at_ms = s.at_ms
            WHERE subject = p_subject;
    END IF;
    IF took > 0 THEN
        INSERT INTO concurrency_holds AS h (subject, replica, held, expires_ms)
            VALUES (p_subject, p_replica, took, p_slot_expires)
            ON CONFLICT (subject, replica) DO UPDATE SET
                held = CASE WHEN h.expires_ms > p_now THEN h.held ELSE 0 END + EXCLUDED.held,
                expires_ms = GREATEST(h.expires_ms, EXCLUDED.expires_ms);
    END IF;
END
$fn$;

-- Requests that ended give their slots back: `p_counts[i]` slots of `p_subjects[i]` held by
-- `p_replica`.
CREATE OR REPLACE FUNCTION securellm_release_many(
    p_replica TEXT, p_subjects TEXT[], p_counts BIGINT[])
RETURNS VOID LANGUAGE sql AS $fn$
    UPDATE concurrency_holds h SET held = GREATEST(h.held - d.n, 0)
        FROM unnest(p_subjects, p_counts) AS d(subject, n)
        WHERE h.subject = d.subject AND h.replica = p_replica
$fn$;

-- Settlements queued in one gateway, applied in one call, in order (`settle` each).
CREATE OR REPLACE FUNCTION securellm_settle_many(
    p_now BIGINT, p_subjects TEXT[], p_tpms BIGINT[], p_ests BIGINT[], p_actuals BIGINT[])
RETURNS VOID LANGUAGE plpgsql AS $fn$
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_subjects, 1), 0) LOOP
        PERFORM securellm_settle(p_subjects[i], p_now, p_tpms[i], p_ests[i], p_actuals[i]);
    END LOOP;
END
$fn$;
