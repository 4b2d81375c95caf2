-- The same rejected input seen again is one quarantine row that counts, not a second row.
-- MQTT redelivers a message it has no PUBACK for (QoS 1 after a reconnect, a worker killed between
-- its commit and the PUBACK, the catch-up session handing a message twice) and devices retry the
-- same bad frame: each used to add an identical row, and the quarantine showed one fault as many.
-- Now a row's identity is what it holds (source, address, device_id, reason and the raw bytes,
-- exactly; the detail only for a row without raw bytes); a repeat adds to `occurrences` and moves
-- `last_received_at`, so a repetition stays visible while `received_at` keeps the first time it
-- came. The detail is how the input was judged when it came, and some details are measured
-- against the time of receipt (FUTURE_TIMESTAMP's "…s ahead", CLOCK_SKEW, OUTSIDE_WINDOW): in the
-- identity they would make every redelivery of such a message a row of its own. The row keeps
-- the first arrival's detail. A reading refused on its own carries its own raw bytes (the
-- reading as JSON), so two readings of one frame are still two rows.
--
-- Race-free across ingest workers: `digest` (SHA-256 of the identity, a generated column, so no
-- writer can forget or forge it) has a unique index, and ingest writes with INSERT ... ON CONFLICT
-- (digest) DO UPDATE (ingest/writer.py). 0008 avoided a unique index because a duplicate would
-- fail a whole batch's COPY, and one duplicate must never cost other rows: ON CONFLICT never fails
-- on a duplicate, and the writer folds a batch's identical rows into one before the insert (an
-- upsert may not touch the same row twice in one statement).
--
-- The identity's bytes: the text fields in UTF-8, each followed by a NUL (text cannot hold one, so
-- the fields cannot run into each other); device_id and raw each start with a byte that tells a
-- NULL (1) from a value (2), so NULL and '' (or empty raw) differ; the detail's bytes are empty
-- when there are raw bytes. convert_to() is STABLE only
-- because encoding conversions could in principle be redefined; a database's conversion to UTF-8
-- does not change, which is why the function may be declared IMMUTABLE (a generated column needs
-- that).
CREATE FUNCTION aq_quarantine_digest(
    source text, address text, device_id text, reason text, detail text, raw bytea
) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT sha256(
        convert_to(source, 'UTF8') || '\x00'::bytea
        || convert_to(address, 'UTF8') || '\x00'::bytea
        || coalesce('\x02'::bytea || convert_to(device_id, 'UTF8'), '\x01'::bytea) || '\x00'::bytea
        || convert_to(reason, 'UTF8') || '\x00'::bytea
        || CASE WHEN raw IS NULL THEN convert_to(detail, 'UTF8') ELSE ''::bytea END
        || '\x00'::bytea
        || coalesce('\x02'::bytea || raw, '\x01'::bytea))
$$;

ALTER TABLE quarantine
    ADD COLUMN occurrences bigint NOT NULL DEFAULT 1,
    ADD COLUMN last_received_at timestamptz,
    ADD COLUMN digest bytea NOT NULL
        GENERATED ALWAYS AS (aq_quarantine_digest(source, address, device_id, reason, detail, raw))
        STORED;
UPDATE quarantine SET last_received_at = received_at;
ALTER TABLE quarantine
    ALTER COLUMN last_received_at SET DEFAULT now(),
    ALTER COLUMN last_received_at SET NOT NULL;

-- Rows from before this migration: identical ones are merged as ingest would have recorded them
-- had it de-duplicated then. The first one received stays (its id and received_at), holding how
-- many there were and when the last came; the others are deleted. Nothing is lost that told
-- them apart: they were identical but for their id and received_at. (Keeping them with a NULL
-- digest under a partial unique index was the alternative; then a repeat of an old poison
-- message would start a second row beside the old ones, and every report would have to count
-- old rows and new occurrences differently.)
WITH ranked AS (
    SELECT id,
           row_number() OVER (PARTITION BY digest ORDER BY received_at, id) AS n,
           sum(occurrences) OVER (PARTITION BY digest) AS total,
           max(last_received_at) OVER (PARTITION BY digest) AS last
    FROM quarantine
), kept AS (
    UPDATE quarantine q SET occurrences = r.total, last_received_at = r.last
    FROM ranked r
    WHERE q.id = r.id AND r.n = 1 AND r.total > 1
)
DELETE FROM quarantine q USING ranked r WHERE q.id = r.id AND r.n > 1;

CREATE UNIQUE INDEX quarantine_digest ON quarantine (digest);

-- Ingest: ON CONFLICT (digest) DO UPDATE needs SELECT on the arbiter column and on the columns
-- the update reads, and UPDATE on those it sets. So ingest can change a row's count (as it could
-- always add rows), never what a row holds; detail, raw and device_id stay write-only for it.
-- The importer also looks up which rows an earlier import of the same file already quarantined
-- (ingest/importer.py, by source, address and reason): before this grant that lookup failed for
-- an ingest login (`aquameter import` connects as ingest).
GRANT SELECT (digest, occurrences, last_received_at, source, address, reason),
    UPDATE (occurrences, last_received_at)
    ON quarantine TO aquameter_ingest;
