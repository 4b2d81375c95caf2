import shutil

import psycopg
import pytest

from ingest.validate import Rejection
from ingest.writer import Batch, BatchWriter
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


def test_quarantine_dedup_merges_the_identical_rows_it_finds(empty_db_url, tmp_path, monkeypatch):
    """0015 on a quarantine written before it: identical rows become the first one, counting
    them and when the last came; so do rows that differ only in their detail (how an input was
    judged, not what came); rows that differ in anything else (raw, NULL vs empty device or
    raw) stay apart, and so do rows without raw bytes whose details differ; then a repeat
    counts on the merged row."""
    before = tmp_path / "migrations"
    shutil.copytree(mig.MIGRATIONS_DIR, before)
    (before / "0015_quarantine_dedup.sql").unlink()
    insert = (
        "INSERT INTO quarantine (received_at, source, address, device_id, reason, detail, raw) "
        "VALUES (%s, 'mqtt', 't', %s, 'MALFORMED', %s, %s)"
    )
    rows = [
        ("2026-03-02 00:00+00", "AQN1", "d", b"\x00x"),
        ("2026-03-01 00:00+00", "AQN1", "d", b"\x00x"),  # the first of three
        ("2026-03-03 00:00+00", "AQN1", "d", b"\x00x"),
        ("2026-03-01 00:00+00", None, "d", b"\x00x"),
        ("2026-03-01 00:00+00", "", "d", b"\x00x"),
        ("2026-03-01 00:00+00", "AQN1", "d", None),
        ("2026-03-01 00:00+00", "AQN1", "d", b""),
        ("2026-03-01 00:00+00", "AQN1", "d2", b"\x00x"),
        ("2026-03-04 00:00+00", "AQN1", "d2", b"\x00x"),
        ("2026-03-01 00:00+00", "AQN1", "d2", None),
    ]
    with psycopg.connect(empty_db_url) as conn:
        monkeypatch.setattr(mig.discover, "__defaults__", (before,))
        mig.migrate(conn, timescale="auto")
        for row in rows:
            conn.execute(insert, row)
        conn.commit()
        monkeypatch.setattr(mig.discover, "__defaults__", (mig.MIGRATIONS_DIR,))
        applied = mig.migrate(conn, timescale="auto").applied
        got = conn.execute(
            "SELECT device_id, detail, raw, occurrences, received_at::date::text, "
            "last_received_at::date::text FROM quarantine ORDER BY id"
        ).fetchall()
        with pytest.raises(psycopg.errors.UniqueViolation):  # a plain INSERT of a repeat
            conn.execute(insert, ("2026-03-05 00:00+00", "AQN1", "d", b"\x00x"))
        conn.rollback()
        repeat = BatchWriter(conn).write(
            Batch(rejections=[("mqtt", "t", Rejection("MALFORMED", "d", "AQN1", b"\x00x"))])
        )
        merged = conn.execute(
            "SELECT occurrences FROM quarantine WHERE device_id = 'AQN1' AND detail = 'd' "
            "AND raw = '\\x0078'"
        ).fetchall()
    assert repeat.quarantine_repeats == {"MALFORMED": 1} and merged == [(6,)]
    assert applied == ["0015_quarantine_dedup.sql"]
    assert [(d, t, None if r is None else bytes(r), n, a, b) for d, t, r, n, a, b in got] == [
        ("AQN1", "d", b"\x00x", 5, "2026-03-01", "2026-03-04"),
        (None, "d", b"\x00x", 1, "2026-03-01", "2026-03-01"),
        ("", "d", b"\x00x", 1, "2026-03-01", "2026-03-01"),
        ("AQN1", "d", None, 1, "2026-03-01", "2026-03-01"),
        ("AQN1", "d", b"", 1, "2026-03-01", "2026-03-01"),
        ("AQN1", "d2", None, 1, "2026-03-01", "2026-03-01"),
    ]
