-- Outcome of every analytics flow run (flows.runner.run_flow writes one row per run, failed ones
-- too), so that a failure is on record where operators and ingest_health look: the database, not
-- only Prefect's own state. error is the one line the CLI prints; summary is what the flow
-- returned (NULL for a failed run). The window is the one asked for (NULL: the flow's default
-- look-back from now).
CREATE TABLE flow_runs (
    id            bigserial PRIMARY KEY,
    flow          text NOT NULL,
    started_at    timestamptz NOT NULL,
    finished_at   timestamptz NOT NULL DEFAULT now(),
    status        text NOT NULL CHECK (status IN ('completed', 'failed')),
    error         text,
    window_since  timestamptz,
    window_until  timestamptz,
    summary       jsonb
);
-- "The latest run of each flow" (ingest_health, the metrics exporter).
CREATE INDEX flow_runs_latest ON flow_runs (flow, finished_at DESC);

-- The flows record their own runs as aquameter_analytics: append only (a run's record is never
-- rewritten or removed by the flows), read to report the latest run per flow.
GRANT SELECT, INSERT ON flow_runs TO aquameter_analytics;
GRANT USAGE ON SEQUENCE flow_runs_id_seq TO aquameter_analytics;
