-- Hourly and daily (UTC) continuous aggregates; daily is built on hourly (hierarchical).

CREATE MATERIALIZED VIEW readings_hourly
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT channel_id,
       time_bucket(interval '1 hour', ts) AS bucket,
       count(*) AS n,
       min(value) AS vmin,
       max(value) AS vmax,
       avg(value) AS vavg,
       first(value, ts) AS vfirst,
       last(value, ts) AS vlast
FROM readings
GROUP BY channel_id, time_bucket(interval '1 hour', ts)
WITH NO DATA;

CREATE MATERIALIZED VIEW readings_daily
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT channel_id,
       time_bucket(interval '1 day', bucket) AS bucket,
       sum(n)::bigint AS n,
       min(vmin) AS vmin,
       max(vmax) AS vmax,
       sum(vavg * n) / sum(n) AS vavg,
       first(vfirst, bucket) AS vfirst,
       last(vlast, bucket) AS vlast
FROM readings_hourly
GROUP BY channel_id, time_bucket(interval '1 day', bucket)
WITH NO DATA;

-- Continuous aggregates refresh from their own policies; the function keeps one call for callers.
CREATE FUNCTION aq_refresh_rollups(p_margin interval DEFAULT interval '5 minutes') RETURNS integer
LANGUAGE sql AS $$ SELECT 0 $$;
