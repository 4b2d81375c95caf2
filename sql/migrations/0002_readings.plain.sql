-- Readings on plain PostgreSQL: native range partitions by time, created ahead by
-- aq_ensure_partitions() (called by `db migrate` and by ingest before it writes a new week).

CREATE TABLE readings (
    channel_id  integer NOT NULL,
    ts          timestamptz NOT NULL,
    value       double precision NOT NULL,
    quality     smallint NOT NULL DEFAULT 0,
    CONSTRAINT readings_channel_ts UNIQUE (channel_id, ts)
) PARTITION BY RANGE (ts);

CREATE INDEX readings_ts_brin ON readings USING brin (ts);

CREATE TABLE readings_partitioning (
    interval_days integer NOT NULL
);
INSERT INTO readings_partitioning VALUES (7);

-- Partitions are aligned on Mondays (2000-01-03) so every worker computes the same bounds.
CREATE FUNCTION aq_ensure_partitions(p_from timestamptz, p_to timestamptz) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    width  interval := make_interval(days => (SELECT interval_days FROM readings_partitioning));
    lo     timestamptz := date_bin(width, p_from, timestamptz '2000-01-03 00:00+00');
    made   integer := 0;
    pname  text;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('aq_ensure_partitions'));
    WHILE lo <= p_to LOOP
        pname := 'readings_p' || to_char(lo AT TIME ZONE 'UTC', 'YYYYMMDD');
        IF to_regclass(pname) IS NULL THEN
            EXECUTE format('CREATE TABLE %I PARTITION OF readings FOR VALUES FROM (%L) TO (%L)',
                           pname, lo, lo + width);
            made := made + 1;
        END IF;
        lo := lo + width;
    END LOOP;
    RETURN made;
END $$;

CREATE FUNCTION aq_bucket(width interval, ts timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
$$ SELECT date_bin(width, ts, timestamptz '2000-01-03 00:00+00') $$;

CREATE VIEW readings_backend AS SELECT 'plain'::text AS backend;
