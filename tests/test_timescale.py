"""The TimescaleDB branch of the schema against the real extension.

The server is the one named by ``AQUAMETER_TIMESCALE_URL`` (``.ci/timescale-cluster start`` makes
one: PostgreSQL 15 with TimescaleDB 2.28 preloaded); without it every test here skips and says
how to get one. The module's tests share one database, migrated once from empty; each writes its
own channel and time range, so they do not depend on each other's data. The scheduler test has a
database of its own, since it lets the background scheduler run the policies.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import numpy as np
import psycopg
import pytest

from aquameter.registry import load_registry
from ingest.pipeline import IngestPipeline
from ingest.registry_sync import SyncResult, sync_registry
from ingest.validate import CONFLICTING_DUPLICATE, UNKNOWN_DEVICE, Rejection
from ingest.writer import Batch, BatchWriter, CopyStream
from protocols.uplink import Frame, Uplink
from sql.migrate import (
    CAGG_POLICIES,
    MIGRATIONS_DIR,
    MigrateResult,
    choose_backend,
    migrate,
    timescale_loaded,
)
from sql.rollups import refresh_rollups
from tests.servers import EXAMPLE_REGISTRY
from tests.timescale_server import (
    TimescaleUnavailable,
    drop_database,
    fresh_database,
    server_url,
    start_scheduler,
)

pytestmark = [pytest.mark.timescale, pytest.mark.timeout(300)]

ORIGIN = datetime(2000, 1, 3, tzinfo=UTC)  # aq_bucket's origin on both backends


def timescale_migrations() -> list[str]:
    """The files a TimescaleDB database applies, read off sql/migrations independently of the
    migrate code: one per version, the ``.timescale`` variant where there are two."""
    by_version: dict[str, str] = {}
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        m = re.fullmatch(r"(\d{4})_.+?(\.timescale|\.plain)?\.sql", path.name)
        assert m is not None, path.name
        if m.group(2) != ".plain":
            by_version[m.group(1)] = path.name
    return [by_version[v] for v in sorted(by_version)]


@pytest.fixture(scope="module")
def server() -> str:
    try:
        return server_url()
    except TimescaleUnavailable as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def tsdb_url(server: str) -> Iterator[str]:
    """A database of this module's own on the TimescaleDB server, empty until ``migrated``."""
    url, name = fresh_database(server)
    yield url
    drop_database(server, name)


@pytest.fixture(scope="module")
def migrated(tsdb_url: str) -> tuple[MigrateResult, SyncResult]:
    with psycopg.connect(tsdb_url) as conn:
        result = migrate(conn)
        synced = sync_registry(conn, load_registry(EXAMPLE_REGISTRY))
        conn.commit()
    return result, synced


@pytest.fixture
def conn(tsdb_url: str, migrated: object) -> Iterator[psycopg.Connection]:
    with psycopg.connect(tsdb_url, autocommit=True) as c:
        yield c


def channel_id(conn: psycopg.Connection, device: str, name: str) -> int:
    row = conn.execute(
        "SELECT id FROM channels WHERE device_id = %s AND name = %s", (device, name)
    ).fetchone()
    assert row is not None, (device, name)
    return int(row[0])


def grid(start: datetime, step: timedelta, n: int) -> list[float]:
    return [(start + i * step).timestamp() for i in range(n)]


def batch_of(ch: int, ts: list[float], values: list[float], quality: int = 0) -> Batch:
    return Batch(
        channel_ids=[ch] * len(ts), ts=list(ts), values=list(values), quality=[quality] * len(ts)
    )


def stored(conn: psycopg.Connection, ch: int, lo: datetime, hi: datetime) -> list[tuple]:
    return conn.execute(
        "SELECT ts, value, quality FROM readings WHERE channel_id = %s AND ts >= %s AND ts < %s "
        "ORDER BY ts",
        (ch, lo, hi),
    ).fetchall()


def jobs(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute(
        "SELECT job_id, proc_name, hypertable_name, config, schedule_interval "
        "FROM timescaledb_information.jobs WHERE hypertable_name IS NOT NULL ORDER BY job_id"
    ).fetchall()


def test_migrate_creates_timescale_backend(conn, migrated):
    result, synced = migrated
    assert result.backend == "timescale"
    assert result.applied == timescale_migrations()
    assert "0002_readings.timescale.sql" in result.applied
    assert timescale_loaded(conn)
    assert choose_backend(conn, "auto") == "timescale"
    assert conn.execute("SELECT backend FROM readings_backend").fetchone() == ("timescale",)

    hypertables = conn.execute(
        "SELECT hypertable_name, compression_enabled FROM timescaledb_information.hypertables"
    ).fetchall()
    assert ("readings", True) in hypertables
    assert conn.execute(
        "SELECT column_name, time_interval FROM timescaledb_information.dimensions "
        "WHERE hypertable_name = 'readings'"
    ).fetchall() == [("ts", timedelta(days=7))]
    assert conn.execute(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'readings_channel_ts'"
    ).fetchone() == ("UNIQUE (channel_id, ts)",)
    settings = conn.execute(
        "SELECT attname, segmentby_column_index, orderby_column_index, orderby_asc "
        "FROM timescaledb_information.compression_settings WHERE hypertable_name = 'readings'"
    ).fetchall()
    assert sorted(settings) == [("channel_id", 1, None, None), ("ts", None, 1, True)]

    # The rollups have the plain variant's columns and types, so queries have one code path.
    for view in ("readings_hourly", "readings_daily"):
        columns = conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = %s ORDER BY ordinal_position",
            (view,),
        ).fetchall()
        assert columns == [
            ("channel_id", "integer"),
            ("bucket", "timestamp with time zone"),
            ("n", "bigint"),
            *((c, "double precision") for c in ("vmin", "vmax", "vavg", "vfirst", "vlast")),
        ]
    caggs = conn.execute(
        "SELECT view_name, materialized_only FROM timescaledb_information.continuous_aggregates "
        "ORDER BY view_name"
    ).fetchall()
    assert caggs == [("readings_daily", False), ("readings_hourly", False)]

    registered = {(proc, rel): config for _, proc, rel, config, _ in jobs(conn)}
    assert registered[("policy_compression", "readings")]["compress_after"] == "7 days"
    assert registered[("policy_retention", "readings")]["drop_after"] == "3650 days"
    for view, start, end, _ in CAGG_POLICIES:
        config = registered[("policy_refresh_continuous_aggregate", view)]
        offsets = conn.execute(
            "SELECT %s::interval, %s::interval", (config["start_offset"], config["end_offset"])
        ).fetchone()
        assert offsets == (start, end)
    assert len(registered) == 4

    assert conn.execute("SELECT count(*) FROM channels").fetchone() == (synced.channels,)
    assert synced.channels > 100
    assert conn.execute(
        "SELECT aq_ensure_partitions(now(), now() + interval '1 year')"
    ).fetchone() == (0,)


def test_migrate_twice_changes_nothing(tsdb_url, migrated):
    with psycopg.connect(tsdb_url) as conn:
        before = (conn.execute("SELECT * FROM schema_migrations ORDER BY 1").fetchall(), jobs(conn))
        again = migrate(conn)
        after = (conn.execute("SELECT * FROM schema_migrations ORDER BY 1").fetchall(), jobs(conn))
        assert (
            again.applied == []
            and again.already == len(timescale_migrations())
            and again.backend == "timescale"
        )
        assert after == before

        # A changed setting replaces that policy only; back to the default restores it.
        migrate(conn, compress_after_days=14)
        changed = {(p, r): (i, c) for i, p, r, c, _ in jobs(conn)}
        migrate(conn)
        restored = {(p, r): (i, c) for i, p, r, c, _ in jobs(conn)}
    old = {(p, r): (i, c) for i, p, r, c, _ in before[1]}
    assert changed[("policy_compression", "readings")][1]["compress_after"] == "14 days"
    assert restored[("policy_compression", "readings")][1]["compress_after"] == "7 days"
    for key in old:
        if key != ("policy_compression", "readings"):
            assert changed[key] == old[key] == restored[key]


def test_batch_writer_copies_and_deduplicates(conn):
    ch = channel_id(conn, "INLET-NORTH", "flow")
    lo = datetime(2025, 1, 6, tzinfo=UTC)
    ts = grid(lo, timedelta(minutes=15), 192)
    values = [round(20 + 5 * np.sin(i / 10), 6) for i in range(192)]
    batch = batch_of(ch, ts, values, quality=2)
    batch.rejections.append(
        ("test", "addr-1", Rejection("MALFORMED", "bad frame", "INLET-NORTH", b"\x00\xffraw"))
    )
    writer = BatchWriter(conn)

    first = writer.write(batch)
    assert (first.inserted, first.duplicates, first.quarantined) == (192, 0, {"MALFORMED": 1})
    rows = stored(conn, ch, lo, lo + timedelta(days=2))
    assert [r[0].timestamp() for r in rows] == ts
    assert [r[1] for r in rows] == values
    assert {r[2] for r in rows} == {2}
    assert conn.execute(
        "SELECT day FROM ingest_days WHERE channel_id = %s ORDER BY day", (ch,)
    ).fetchall() == [(lo.date(),), ((lo + timedelta(days=1)).date(),)]
    assert conn.execute(
        "SELECT source, address, device_id, reason, detail, raw FROM quarantine "
        "WHERE address = 'addr-1'"
    ).fetchall() == [("test", "addr-1", "INLET-NORTH", "MALFORMED", "bad frame", b"\x00\xffraw")]

    again = writer.write(batch_of(ch, ts, values, quality=2))
    assert (again.inserted, again.duplicates, again.quarantined) == (0, 192, {})
    assert len(stored(conn, ch, lo, lo + timedelta(days=2))) == 192

    conflict = writer.write(batch_of(ch, ts[:1], [values[0] + 1.0]))
    assert (conflict.inserted, conflict.duplicates) == (0, 0)
    assert conflict.quarantined == {CONFLICTING_DUPLICATE: 1}
    assert stored(conn, ch, lo, lo + timedelta(minutes=1))[0][1] == values[0]


def test_ingest_pipeline_end_to_end(tsdb_url, conn):
    flow = channel_id(conn, "INLET-SOUTH", "flow")
    pressure = channel_id(conn, "INLET-SOUTH", "pressure")
    base = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=2)
    t = [(base + timedelta(minutes=i)).timestamp() for i in range(3)]
    frames = [
        Frame("test", "a", uplinks=[Uplink("INLET-SOUTH", "flow", t, [10.0, 12.5, 11.0])]),
        Frame("test", "b", uplinks=[Uplink("INLET-SOUTH", "pressure", t[:2], [4.0, 4.1])]),
        Frame("test", "c", uplinks=[Uplink("NO-SUCH-DEVICE", "flow", t[:1], [1.0])]),
    ]
    with IngestPipeline(tsdb_url, batch_seconds=0.05) as pipeline:
        first = pipeline.submit_many(frames)
        redelivered = pipeline.submit_many(frames)
    counters = pipeline.counters
    by_address = {f.address: o for f, o in zip(frames, first, strict=True)}
    assert len(first) == len(redelivered) == 3
    assert (by_address["a"].accepted, by_address["b"].accepted) == (3, 2)
    assert by_address["c"].reasons == [UNKNOWN_DEVICE]
    assert (counters.stored, counters.duplicates) == (5, 5)
    assert counters.quarantined[UNKNOWN_DEVICE] == 1
    assert counters.quarantine_repeats[UNKNOWN_DEVICE] == 1

    hi = base + timedelta(minutes=3)
    assert [r[1] for r in stored(conn, flow, base, hi)] == pytest.approx([36.0, 45.0, 39.6])
    assert [r[1] for r in stored(conn, pressure, base, hi)] == pytest.approx([40.788, 41.8077])
    assert conn.execute(
        "SELECT count(*), sum(occurrences) FROM quarantine "
        "WHERE reason = %s AND source = 'test' AND address = 'c'",
        (UNKNOWN_DEVICE,),
    ).fetchone() == (1, 2)


def test_compressed_chunk_keeps_rows_and_deduplicates(conn):
    ch = channel_id(conn, "INLET-NORTH", "pressure")
    lo = datetime(2025, 2, 3, tzinfo=UTC)
    hi = lo + timedelta(days=2)
    ts = grid(lo, timedelta(minutes=15), 192)
    values = [40.0 + (i % 17) * 0.25 for i in range(192)]
    writer = BatchWriter(conn)
    assert writer.write(batch_of(ch, ts, values)).inserted == 192

    (job,) = conn.execute(
        "SELECT job_id FROM timescaledb_information.jobs "
        "WHERE proc_name = 'policy_compression' AND hypertable_name = 'readings'"
    ).fetchone()
    conn.execute("CALL run_job(%s)", (job,))
    chunks = conn.execute(
        "SELECT is_compressed FROM timescaledb_information.chunks "
        "WHERE hypertable_name = 'readings' AND range_start <= %s AND range_end > %s",
        (lo, lo),
    ).fetchall()
    assert chunks == [(True,)]
    assert conn.execute(
        "SELECT count(*), sum(value) FROM readings WHERE channel_id = %s AND ts >= %s AND ts < %s",
        (ch, lo, hi),
    ).fetchone() == (192, pytest.approx(sum(values)))

    again = writer.write(batch_of(ch, ts, values))
    assert (again.inserted, again.duplicates) == (0, 192)
    conflict = writer.write(batch_of(ch, ts[5:6], [99.0]))
    assert conflict.quarantined == {CONFLICTING_DUPLICATE: 1}
    between = [t + 450 for t in ts]  # 7.5 minutes later: new rows in the compressed chunk
    assert writer.write(batch_of(ch, between, values)).inserted == 192
    rows = stored(conn, ch, lo, hi)
    assert len(rows) == 384
    assert len({r[0] for r in rows}) == 384
    assert dict((r[0].timestamp(), r[1]) for r in rows)[ts[5]] == values[5]  # conflict not stored


def test_rollups_match_direct_aggregates(conn):
    ch = channel_id(conn, "INLET-SOUTH", "pressure")
    lo = datetime(2025, 3, 3, tzinfo=UTC)
    rng = np.random.default_rng(7)
    # Irregular: every 7 minutes for two days, with hours 05:00-07:59 of the first day missing.
    ts = [
        t
        for t in grid(lo, timedelta(minutes=7), 411)
        if not 5 * 3600 <= t - lo.timestamp() < 8 * 3600
    ]
    values = [float(v) for v in np.round(rng.normal(40.0, 3.0, len(ts)), 3)]
    assert BatchWriter(conn).write(batch_of(ch, ts, values)).inserted == len(ts)

    assert refresh_rollups(conn) == -1
    for view, width in (("readings_hourly", 3600), ("readings_daily", 86_400)):
        expected = expected_rollup(ts, values, width)
        got = rollup(conn, view, ch, lo, lo + timedelta(days=3))
        assert [g[0] for g in got] == [e[0] for e in expected]
        for g, e in zip(got, expected, strict=True):
            assert g[1:4] == e[1:4] and g[5:] == e[5:]  # n, min, max, first, last exactly
            assert g[4] == pytest.approx(e[4], rel=1e-12)
    watermark = conn.execute(
        "SELECT _timescaledb_functions.to_timestamp(_timescaledb_functions.cagg_watermark("
        "  mat_hypertable_id)) FROM _timescaledb_catalog.continuous_agg "
        "WHERE user_view_name = 'readings_daily'"
    ).fetchone()
    assert watermark is not None and watermark[0] >= lo + timedelta(days=2)  # materialized

    # A late reading in an hour already materialized shows only after a refresh of its window.
    late = lo + timedelta(hours=10, minutes=3, seconds=30)
    hour = lo + timedelta(hours=10)
    before = rollup(conn, "readings_hourly", ch, hour, hour + timedelta(hours=1))
    BatchWriter(conn).write(batch_of(ch, [late.timestamp()], [1000.0]))
    assert rollup(conn, "readings_hourly", ch, hour, hour + timedelta(hours=1)) == before
    refresh_rollups(conn, late, late + timedelta(seconds=1))
    (hourly,) = rollup(conn, "readings_hourly", ch, hour, hour + timedelta(hours=1))
    (daily,) = rollup(conn, "readings_daily", ch, lo, lo + timedelta(days=1))
    assert (hourly[1], hourly[3]) == (before[0][1] + 1, 1000.0)
    assert (daily[1], daily[3]) == (expected_rollup(ts, values, 86_400)[0][1] + 1, 1000.0)


def expected_rollup(ts: list[float], values: list[float], width: int) -> list[tuple]:
    groups: dict[float, list[float]] = defaultdict(list)
    for t, v in sorted(zip(ts, values, strict=True)):
        groups[t - (t - ORIGIN.timestamp()) % width].append(v)
    return [
        (
            datetime.fromtimestamp(b, UTC),
            len(vs),
            min(vs),
            max(vs),
            sum(vs) / len(vs),
            vs[0],
            vs[-1],
        )
        for b, vs in sorted(groups.items())
    ]


def rollup(conn: psycopg.Connection, view: str, ch: int, lo: datetime, hi: datetime) -> list:
    return conn.execute(
        f"SELECT bucket, n, vmin, vmax, vavg, vfirst, vlast FROM {view} "
        "WHERE channel_id = %s AND bucket >= %s AND bucket < %s ORDER BY bucket",
        (ch, lo, hi),
    ).fetchall()


def test_time_bucket_gapfill(conn):
    ch = channel_id(conn, "INLET-SOUTH", "flow")
    lo = datetime(2025, 4, 7, tzinfo=UTC)
    hours = [0, 1, 4]
    ts = [(lo + timedelta(hours=h, minutes=m)).timestamp() for h in hours for m in (0, 30)]
    values = [v for h in hours for v in (10.0 * (h + 1) - 1, 10.0 * (h + 1) + 1)]
    BatchWriter(conn).write(batch_of(ch, ts, values))
    rows = conn.execute(
        "SELECT time_bucket_gapfill('1 hour', ts) AS b, avg(value), locf(avg(value)), "
        "       interpolate(avg(value)) "
        "FROM readings WHERE channel_id = %s AND ts >= %s AND ts < %s GROUP BY b ORDER BY b",
        (ch, lo, lo + timedelta(hours=6)),
    ).fetchall()
    assert [r[0] for r in rows] == [lo + timedelta(hours=h) for h in range(6)]
    assert [r[1] for r in rows] == [10.0, 20.0, None, None, 50.0, None]
    assert [r[2] for r in rows] == [10.0, 20.0, 20.0, 20.0, 50.0, 50.0]
    assert [r[3] for r in rows] == pytest.approx([10.0, 20.0, 30.0, 40.0, 50.0, None])


def test_aq_bucket_matches_plain_postgresql(conn, plain_db_url):
    widths = [
        timedelta(minutes=15),
        timedelta(hours=1),
        timedelta(minutes=90),
        timedelta(days=1),
        timedelta(days=7),
    ]
    moments = [
        datetime(1999, 12, 30, 13, 37, 11, tzinfo=UTC),
        ORIGIN,
        datetime(2024, 3, 31, 1, 30, tzinfo=UTC),
        datetime(2025, 6, 15, 23, 59, 59, 999_999, tzinfo=UTC),
        datetime(2025, 10, 26, 0, 45, 30, tzinfo=UTC),
    ]
    query = (
        "SELECT aq_bucket(w, t) FROM unnest(%s::interval[]) WITH ORDINALITY AS a(w, i), "
        "unnest(%s::timestamptz[]) WITH ORDINALITY AS b(t, j) ORDER BY i, j"
    )
    timescale = [r[0] for r in conn.execute(query, (widths, moments)).fetchall()]
    with psycopg.connect(plain_db_url) as plain_conn:
        assert plain_conn.execute("SELECT backend FROM readings_backend").fetchone() == ("plain",)
        plain = [r[0] for r in plain_conn.execute(query, (widths, moments)).fetchall()]
    floor = [m - (m - ORIGIN) % w for w in widths for m in moments]
    assert timescale == plain == floor


def test_streamed_copy_into_the_hypertable(conn):
    """CopyStream, ingest's fast path: one COPY across several weeks' chunks, committed; a stream
    that meets stored rows fails at its end, rolls back whole, and the batch writer then stores
    only the new rows and quarantines the one that conflicts."""
    ch = channel_id(conn, "INLET-NORTH", "flow")
    lo = datetime(2025, 5, 5, tzinfo=UTC)
    ts = grid(lo, timedelta(minutes=15), 96 * 21)  # three weeks: several chunks
    values = [float(i % 97) for i in range(len(ts))]
    writer = BatchWriter(conn)
    conn.autocommit = False
    stream = CopyStream(writer)
    for i in range(0, len(ts), 500):  # frames arriving while the COPY is open
        n = len(ts[i : i + 500])
        stream.add([ch] * n, ts[i : i + 500], values[i : i + 500], [0] * n)
        stream.flush()
    assert stream.commit([]).inserted == len(ts)
    assert len(stored(conn, ch, lo, lo + timedelta(days=21))) == len(ts)
    chunks = conn.execute(
        "SELECT count(DISTINCT tableoid) FROM readings WHERE channel_id = %s AND ts >= %s "
        "AND ts < %s",
        (ch, lo, lo + timedelta(days=21)),
    ).fetchone()
    assert (
        chunks is not None and chunks[0] >= 3
    )  # 7-day chunks, aligned on TimescaleDB's own origin

    again = CopyStream(writer)
    later = [t + 21 * 86_400 for t in ts[:10]]
    again.add([ch] * 12, ts[:1] + later + ts[1:2], [99.5] + values[:10] + [values[1]], [0] * 12)
    with pytest.raises(psycopg.errors.UniqueViolation):
        again.commit([])
    again.abort()
    assert len(stored(conn, ch, lo, lo + timedelta(days=22))) == len(ts)  # rolled back whole
    redo = writer.write(batch_of(ch, ts[:1] + later + ts[1:2], [99.5] + values[:10] + [values[1]]))
    conn.commit()
    conn.autocommit = True
    assert (redo.inserted, redo.duplicates) == (10, 1)
    assert redo.quarantined == {CONFLICTING_DUPLICATE: 1}  # ts[0] with 99.5
    assert len(stored(conn, ch, lo, lo + timedelta(days=22))) == len(ts) + 10


def job_id(conn: psycopg.Connection, proc: str, relation: str) -> int:
    row = conn.execute(
        "SELECT job_id FROM timescaledb_information.jobs "
        "WHERE proc_name = %s AND hypertable_name = %s",
        (proc, relation),
    ).fetchone()
    assert row is not None, (proc, relation)
    return int(row[0])


def test_retention_policy_drops_old_chunks_only(conn):
    ch = channel_id(conn, "INLET-SOUTH", "flow")
    old = datetime(2011, 3, 7, tzinfo=UTC)  # older than the 3650-day retention
    recent = datetime(2025, 7, 7, tzinfo=UTC)
    writer = BatchWriter(conn)
    assert writer.write(batch_of(ch, grid(old, timedelta(hours=1), 48), [1.0] * 48)).inserted == 48
    assert writer.write(batch_of(ch, grid(recent, timedelta(hours=1), 48), [2.0] * 48)).inserted
    conn.execute("CALL run_job(%s)", (job_id(conn, "policy_retention", "readings"),))
    assert stored(conn, ch, old, old + timedelta(days=2)) == []
    assert len(stored(conn, ch, recent, recent + timedelta(days=2))) == 48
    assert conn.execute(
        "SELECT count(*) FROM timescaledb_information.chunks "
        "WHERE hypertable_name = 'readings' AND range_end <= now() - interval '3650 days'"
    ).fetchone() == (0,)


def materialized(conn: psycopg.Connection, view: str, ch: int) -> list[tuple]:
    """The rows of the last 5 days a continuous aggregate has *materialized* for a channel (the
    view itself also shows real-time rows, which would hide whether a refresh ran)."""
    row = conn.execute(
        "SELECT format('%%I.%%I', materialization_hypertable_schema, "
        "materialization_hypertable_name) FROM timescaledb_information.continuous_aggregates "
        "WHERE view_name = %s",
        (view,),
    ).fetchone()
    assert row is not None
    return conn.execute(
        f"SELECT bucket, n, vmin, vmax FROM {row[0]} "
        "WHERE channel_id = %s AND bucket >= now() - interval '5 days' ORDER BY bucket",
        (ch,),
    ).fetchall()


def recent_readings(conn: psycopg.Connection, device: str) -> tuple[int, list[float], datetime]:
    """Hourly readings from 3 days 1 hour to 2 hours ago, inside both refresh policies' windows:
    (channel, timestamps, the first whole day among them)."""
    ch = channel_id(conn, device, "pressure")
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    ts = grid(now - timedelta(days=2, hours=23), timedelta(minutes=30), 2 * 70)
    assert BatchWriter(conn).write(batch_of(ch, ts, [3.0] * len(ts))).inserted == len(ts)
    day = now.replace(hour=0) - timedelta(days=2)
    return ch, ts, day


def test_refresh_policies_by_run_job(conn):
    ch, ts, day = recent_readings(conn, "INLET-NORTH")
    assert materialized(conn, "readings_hourly", ch) == []
    for view, *_ in CAGG_POLICIES:
        conn.execute(
            "CALL run_job(%s)", (job_id(conn, "policy_refresh_continuous_aggregate", view),)
        )
    hourly = materialized(conn, "readings_hourly", ch)
    end = datetime.now(UTC) - timedelta(hours=1)  # the hourly policy's end_offset
    assert len(hourly) >= 60
    assert all(n == 2 and vmin == vmax == 3.0 for _, n, vmin, vmax in hourly)
    assert all(b + timedelta(hours=1) <= end for b, *_ in hourly)
    daily = dict((b, n) for b, n, *_ in materialized(conn, "readings_daily", ch))
    assert daily[day] == 48  # a whole day inside the daily window, from the hourly rows


def run_by_scheduler(conn: psycopg.Connection, job: int) -> tuple:
    """Move ``job``'s next start to now and wait until the background scheduler has run it once
    more; returns its (last_run_status, total_failures). The wait is bounded only so that a
    scheduler that never runs it fails the test with what it saw, rather than hanging."""
    query = (
        "SELECT total_runs, job_status, last_run_status, total_failures "
        "FROM timescaledb_information.job_stats WHERE job_id = %s"
    )
    before = conn.execute(query, (job,)).fetchone()
    runs = before[0] if before is not None and before[0] is not None else 0
    conn.execute("SELECT alter_job(%s, next_start => now())", (job,))
    row = before
    for _ in range(1200):
        row = conn.execute(query, (job,)).fetchone()
        # total_runs counts a run when it starts; last_run_status is NULL until it finishes
        if row is not None and row[0] is not None and row[0] > runs and row[2] is not None:
            return row[2], row[3]
        time.sleep(0.1)
    pytest.fail(f"job {job} was not run by the scheduler: {row}")


def test_refresh_policies_by_the_scheduler(timescale_db_url):
    """The background scheduler runs the refresh policies by itself (the vendored build carries
    the fix that lets its runs end 'Success' on PostgreSQL 15.20), hourly first, then the daily
    view built on it."""
    start_scheduler(timescale_db_url)  # a database cloned from a template has none yet
    with psycopg.connect(timescale_db_url, autocommit=True) as c:
        ch, ts, day = recent_readings(c, "INLET-SOUTH")
        assert materialized(c, "readings_hourly", ch) == []
        for view, *_ in CAGG_POLICIES:
            job = job_id(c, "policy_refresh_continuous_aggregate", view)
            assert run_by_scheduler(c, job) == ("Success", 0)
        errors = c.execute("SELECT job_id, err_message FROM timescaledb_information.job_errors")
        assert errors.fetchall() == []
        assert len(materialized(c, "readings_hourly", ch)) >= 60
        assert dict((b, n) for b, n, *_ in materialized(c, "readings_daily", ch))[day] == 48


def test_queries_through_aq_bucket_on_the_hypertable(conn):
    """aq_bucket is the one bucketing call for queries on both backends: on TimescaleDB it is
    time_bucket with the Monday origin, and a query through it matches the rollup."""
    ch = channel_id(conn, "INLET-NORTH", "pressure")
    lo = datetime(2025, 8, 4, 0, 0, tzinfo=UTC)
    ts = grid(lo + timedelta(minutes=5), timedelta(minutes=10), 6 * 48)
    values = [float(i % 11) for i in range(len(ts))]
    BatchWriter(conn).write(batch_of(ch, ts, values))
    for width in (timedelta(minutes=90), timedelta(days=1), timedelta(days=7)):
        got = conn.execute(
            "SELECT aq_bucket(%s, ts) AS b, count(*), min(value), max(value) FROM readings "
            "WHERE channel_id = %s AND ts >= %s AND ts < %s GROUP BY b ORDER BY b",
            (width, ch, lo, lo + timedelta(days=2)),
        ).fetchall()
        expected = expected_rollup(ts, values, int(width.total_seconds()))
        assert [g[:4] for g in got] == [e[:4] for e in expected]
    plan = conn.execute(
        "EXPLAIN SELECT aq_bucket('1 day', ts), count(*) FROM readings "
        "WHERE ts >= '2025-08-04' AND ts < '2025-08-06' GROUP BY 1"
    ).fetchall()
    text = "\n".join(r[0] for r in plan)
    assert "time_bucket" in text  # inlined: TimescaleDB's planner sees its own function
