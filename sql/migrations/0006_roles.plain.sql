-- Least-privilege group roles (plain PostgreSQL; 0006_roles.timescale.sql differs only in its
-- last section). The user that runs `aquameter db migrate` stays the owner of every object and
-- the only one with DDL; the services log in as members of these NOLOGIN groups (sql/roles.py):
--   aquameter_ingest     writes readings, quarantine and ingest_days; reads the registry
--   aquameter_analytics  reads everything ingest stores; writes the analytics tables
--   aquameter_billing    reads the billing_export view, nothing else
--
-- Roles are cluster-wide while migrations run per database: a role is created only when it does
-- not exist yet, and a second database migrating at the same instant (its CREATE ROLE waits for
-- ours, then fails on the unique index: unique_violation, or duplicate_object when it checks after
-- we committed) takes the role as it finds it. Creating a role needs CREATEROLE: a migrating user
-- without it gets a hint to have the roles made once by a superuser.
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['aquameter_ingest', 'aquameter_analytics', 'aquameter_billing'] LOOP
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION
                WHEN duplicate_object OR unique_violation THEN
                    NULL;  -- made by a concurrent migration of another database
                WHEN insufficient_privilege THEN
                    RAISE EXCEPTION 'cannot create role %: the migrating user lacks CREATEROLE', r
                        USING HINT = format('run once as a superuser: CREATE ROLE %I NOLOGIN; '
                                            'then migrate again', r);
            END;
        END IF;
    END LOOP;
END $$;

-- Database and schema. PUBLIC has CONNECT and TEMPORARY on a new database by default; granting
-- them by name keeps the roles working where an operator revoked that default. TEMPORARY lets a
-- session create tables in its own pg_temp schema only (ingest's aq_staging, the alert stage of
-- flows/store.py), dropped with the session: no DDL on the shared schema.
-- The PGlite TimescaleDB of the tests fails any GRANT ON DATABASE ("tuple concurrently deleted",
-- an internal error): there, and only where the roles hold the privileges through PUBLIC anyway,
-- that is a warning.
DO $$
BEGIN
    BEGIN
        EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO aquameter_ingest, '
                       'aquameter_analytics', current_database());
        EXECUTE format('GRANT CONNECT ON DATABASE %I TO aquameter_billing', current_database());
    EXCEPTION WHEN internal_error THEN
        IF NOT (has_database_privilege('aquameter_ingest', current_database(), 'CONNECT, TEMPORARY')
                AND has_database_privilege('aquameter_analytics', current_database(),
                                           'CONNECT, TEMPORARY')
                AND has_database_privilege('aquameter_billing', current_database(), 'CONNECT'))
        THEN
            RAISE;
        END IF;
        RAISE WARNING 'GRANT ON DATABASE % failed (%); the roles connect through PUBLIC''s grant',
            current_database(), SQLERRM;
    END;
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO aquameter_ingest, aquameter_analytics, '
                   'aquameter_billing', current_schema());
END $$;

-- Partitions are created by ingest as it meets a new week: the function runs with its owner's
-- rights (SECURITY DEFINER), so ingest needs no CREATE on the schema. Its search_path is pinned,
-- pg_temp last, so a caller's temp table named like one of ours cannot stand in for it. Only
-- ingest (and the owner) may call it: EXECUTE is PUBLIC's by default.
-- Partitions belong to the function owner and carry no grants of their own: access through the
-- parent (COPY/INSERT/SELECT on readings) is checked on the parent only, which is all the roles
-- use. No ALTER DEFAULT PRIVILEGES: it would grant on every table the owner makes from then on.
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION aq_ensure_partitions(timestamptz, timestamptz) '
                   'SECURITY DEFINER SET search_path = %I, pg_temp', current_schema());
    EXECUTE format('ALTER FUNCTION aq_refresh_rollups(interval) '
                   'SECURITY DEFINER SET search_path = %I, pg_temp', current_schema());
END $$;
REVOKE EXECUTE ON FUNCTION aq_ensure_partitions(timestamptz, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION aq_ensure_partitions(timestamptz, timestamptz) TO aquameter_ingest;
-- The rollups are derived from readings by this function alone: analytics may run it but not
-- write the rollup tables, which could otherwise be made to disagree with readings.
REVOKE EXECUTE ON FUNCTION aq_refresh_rollups(interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION aq_refresh_rollups(interval) TO aquameter_analytics;

-- Ingest: append readings (COPY, or INSERT ... ON CONFLICT DO NOTHING from its staging table;
-- SELECT because the CONFLICTING_DUPLICATE check joins readings), quarantine what it refuses,
-- upsert ingest_days (INSERT ... ON CONFLICT DO UPDATE needs UPDATE and SELECT), read the
-- registry (ingest.channels.ChannelIndex.load, ingest.registry_watch). Never UPDATE or DELETE on
-- readings, nothing of the analytics results.
GRANT SELECT, INSERT ON readings TO aquameter_ingest;
GRANT INSERT ON quarantine TO aquameter_ingest;
GRANT USAGE ON SEQUENCE quarantine_id_seq TO aquameter_ingest;
GRANT SELECT, INSERT, UPDATE ON ingest_days TO aquameter_ingest;
GRANT SELECT ON channels, devices, meters, registry_version, readings_backend
    TO aquameter_ingest;

-- Analytics: read readings, what ingest recorded about them and the reference data; write the
-- results of the flows (flows/store.py and the flows that call it; meter_edits is updated by the
-- billing flow when it applies an edit). schema_backend is read by sql.rollups (backend_of).
GRANT SELECT ON readings, quarantine, ingest_days, readings_hourly, readings_daily,
    dmas, vendors, devices, meters, meter_exchanges, sensors, channels, readings_backend,
    schema_backend, schema_migrations, billing_export
    TO aquameter_analytics;
GRANT SELECT, INSERT, UPDATE, DELETE ON dma_daily, alerts, billing_volumes, water_balance,
    water_balance_summary, read_rates, meter_edits, analysis_marks
    TO aquameter_analytics;
GRANT USAGE ON SEQUENCE alerts_id_seq, meter_edits_id_seq TO aquameter_analytics;

-- Billing: the view only. A view reads its tables with its owner's rights, so billing needs (and
-- has) nothing on billing_volumes itself.
GRANT SELECT ON billing_export TO aquameter_billing;

-- Plain PostgreSQL only: the partition width the writer aligns its weeks on, and the rollup
-- watermark (read by analytics; written by aq_refresh_rollups as its owner).
GRANT SELECT ON readings_partitioning TO aquameter_ingest, aquameter_analytics;
GRANT SELECT ON rollup_state TO aquameter_analytics;
