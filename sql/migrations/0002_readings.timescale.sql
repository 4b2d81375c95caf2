-- Readings on TimescaleDB: a hypertable compressed by channel, with a retention policy.

CREATE TABLE readings (
    channel_id  integer NOT NULL,
    ts          timestamptz NOT NULL,
    value       double precision NOT NULL,
    quality     smallint NOT NULL DEFAULT 0,
    CONSTRAINT readings_channel_ts UNIQUE (channel_id, ts)
);
SELECT create_hypertable('readings', 'ts', chunk_time_interval => interval '7 days');

ALTER TABLE readings SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'channel_id',
    timescaledb.compress_orderby = 'ts'
);

-- Timescale manages chunks itself; the function exists so callers have one code path.
CREATE FUNCTION aq_ensure_partitions(p_from timestamptz, p_to timestamptz) RETURNS integer
LANGUAGE sql AS $$ SELECT 0 $$;

CREATE FUNCTION aq_bucket(width interval, ts timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
$$ SELECT time_bucket(width, ts, timestamptz '2000-01-03 00:00+00') $$;

CREATE VIEW readings_backend AS SELECT 'timescale'::text AS backend;
