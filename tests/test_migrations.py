import shutil

import psycopg
import pytest

from sql import migrate as mig


def test_fresh_migrate_records_checksums_and_backend(empty_db_url):
    with psycopg.connect(empty_db_url) as conn:
        first = mig.migrate(conn, timescale="off")
        second = mig.migrate(conn, timescale="off")
        rows = conn.execute("SELECT version, checksum FROM schema_migrations ORDER BY 1").fetchall()
    assert first.backend == "plain"
    assert first.applied[0] == "0001_core.sql"
    assert second.applied == [] and second.partitions_created == 0
    assert [r[0] for r in rows] == [m.version for m in mig.discover("plain")]
    assert all(len(r[1]) == 64 for r in rows)


def test_edited_applied_migration_is_an_error(empty_db_url, tmp_path, monkeypatch):
    copy = tmp_path / "migrations"
    shutil.copytree(mig.MIGRATIONS_DIR, copy)
    monkeypatch.setattr(mig, "MIGRATIONS_DIR", copy)
    monkeypatch.setattr(mig.discover, "__defaults__", (copy,))
    with psycopg.connect(empty_db_url) as conn:
        mig.migrate(conn, timescale="off")
        edited = copy / "0001_core.sql"
        edited.write_text(edited.read_text() + "\n-- a sneaky edit\n")
        with pytest.raises(mig.MigrationError, match="edited after it was applied"):
            mig.migrate(conn, timescale="off")


def test_timescale_on_without_extension_is_refused(empty_db_url):
    with psycopg.connect(empty_db_url) as conn:
        if mig.timescale_loaded(conn):  # installed but not preloaded is refused too
            pytest.skip("this server loads TimescaleDB")
        with pytest.raises(mig.MigrationError):
            mig.migrate(conn, timescale="on")


@pytest.mark.only_backend("plain")  # TimescaleDB makes its chunks itself (test_timescale.py)
def test_partitions_are_created_for_incoming_weeks(db_url):
    with psycopg.connect(db_url) as conn:
        before = conn.execute(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'readings'::regclass"
        ).fetchone()[0]
        made = conn.execute("SELECT aq_ensure_partitions('2024-01-01', '2024-01-20')").fetchone()[0]
        again = conn.execute("SELECT aq_ensure_partitions('2024-01-01', '2024-01-20')").fetchone()[
            0
        ]
        after = conn.execute(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'readings'::regclass"
        ).fetchone()[0]
    # 2024-01-01 is a Monday: the weeks starting 01-01, 01-08, 01-15 cover the range.
    assert (made, again, after - before) == (3, 0, 3)


@pytest.mark.only_backend("plain")  # continuous aggregates there: test_timescale.py
def test_rollups_refresh_incrementally(db_url):
    with psycopg.connect(db_url) as conn:
        ch = conn.execute("SELECT id FROM channels WHERE device_id = 'AQN00001'").fetchone()[0]
        conn.execute("SELECT aq_ensure_partitions('2026-01-01', '2026-01-03')")
        conn.execute(
            "INSERT INTO readings SELECT %s, t, extract(epoch FROM t - '2026-01-01') / 900, 0 "
            "FROM generate_series(timestamptz '2026-01-01', '2026-01-01 23:45', '15 min') t",
            (ch,),
        )
        conn.execute(
            "INSERT INTO ingest_days VALUES (%s, '2026-01-01', now() - interval '1 hour')", (ch,)
        )
        assert conn.execute("SELECT aq_refresh_rollups(interval '0')").fetchone() == (1,)
        hourly = conn.execute(
            "SELECT n, vmin, vmax, vfirst, vlast FROM readings_hourly WHERE channel_id = %s "
            "AND bucket = '2026-01-01 01:00+00'",
            (ch,),
        ).fetchone()
        daily = conn.execute(
            "SELECT n, vmin, vmax, vfirst, vlast FROM readings_daily WHERE channel_id = %s", (ch,)
        ).fetchone()
        # Nothing changed since: the next refresh recomputes no day.
        assert conn.execute("SELECT aq_refresh_rollups(interval '0')").fetchone() == (0,)
    assert hourly == (4, 4.0, 7.0, 4.0, 7.0)
    assert daily == (96, 0.0, 95.0, 0.0, 95.0)
