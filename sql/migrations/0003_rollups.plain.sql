-- Hourly and daily (UTC) rollups per channel as tables, refreshed incrementally from ingest_days.
-- Same columns as the TimescaleDB continuous aggregates, so queries have one code path.

CREATE TABLE readings_hourly (
    channel_id  integer NOT NULL,
    bucket      timestamptz NOT NULL,
    n           bigint NOT NULL,
    vmin        double precision,
    vmax        double precision,
    vavg        double precision,
    vfirst      double precision,
    vlast       double precision,
    PRIMARY KEY (channel_id, bucket)
);

CREATE TABLE readings_daily (LIKE readings_hourly INCLUDING ALL);

CREATE TABLE rollup_state (
    refreshed_until timestamptz NOT NULL
);
INSERT INTO rollup_state VALUES ('-infinity');

-- Recompute every channel-day whose data changed since the last refresh. The watermark trails
-- now() by p_margin so that ingest transactions still open when we read ingest_days are seen next
-- time; recomputing a day twice is harmless.
CREATE FUNCTION aq_refresh_rollups(p_margin interval DEFAULT interval '5 minutes') RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    since   timestamptz;
    ndays   integer;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('aq_refresh_rollups'));
    SELECT refreshed_until INTO since FROM rollup_state;
    CREATE TEMP TABLE IF NOT EXISTS aq_dirty (channel_id integer, lo timestamptz, hi timestamptz)
        ON COMMIT DROP;
    TRUNCATE aq_dirty;
    INSERT INTO aq_dirty
        SELECT channel_id, day::timestamp AT TIME ZONE 'UTC', (day + 1)::timestamp AT TIME ZONE 'UTC'
        FROM ingest_days WHERE updated_at > since;
    GET DIAGNOSTICS ndays = ROW_COUNT;

    DELETE FROM readings_hourly h USING aq_dirty d
        WHERE h.channel_id = d.channel_id AND h.bucket >= d.lo AND h.bucket < d.hi;
    INSERT INTO readings_hourly
        SELECT r.channel_id, aq_bucket(interval '1 hour', r.ts), count(*), min(r.value),
               max(r.value), avg(r.value), (array_agg(r.value ORDER BY r.ts))[1],
               (array_agg(r.value ORDER BY r.ts DESC))[1]
        FROM readings r JOIN aq_dirty d
          ON r.channel_id = d.channel_id AND r.ts >= d.lo AND r.ts < d.hi
        GROUP BY 1, 2;

    DELETE FROM readings_daily h USING aq_dirty d
        WHERE h.channel_id = d.channel_id AND h.bucket = d.lo;
    INSERT INTO readings_daily
        SELECT h.channel_id, d.lo, sum(h.n), min(h.vmin), max(h.vmax),
               sum(h.vavg * h.n) / sum(h.n), (array_agg(h.vfirst ORDER BY h.bucket))[1],
               (array_agg(h.vlast ORDER BY h.bucket DESC))[1]
        FROM readings_hourly h JOIN aq_dirty d
          ON h.channel_id = d.channel_id AND h.bucket >= d.lo AND h.bucket < d.hi
        GROUP BY 1, 2;

    UPDATE rollup_state SET refreshed_until = now() - p_margin;
    RETURN ndays;
END $$;
