"""Least-privilege roles (migration 0006, sql/roles.py) against a real server.

Each test connects as a LOGIN made here (random name, member of one group role, dropped at the
end) and shows what that role can and cannot do, through the code that runs as it in production
(the batch writer, the ingest pipeline, flows.store) where there is such code. Every refusal is
asserted as InsufficientPrivilege, so a test cannot pass on an unrelated error.

Every test runs on both backends (conftest's ``backend``): plain PostgreSQL on the test server
(``AQUAMETER_DATABASE_URL`` or the embedded one) and TimescaleDB on the server named by
``AQUAMETER_TIMESCALE_URL`` (skipped, saying so, without one).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import psycopg
import pytest
from psycopg import sql

from flows.store import upsert_alerts
from ingest.importer import import_file
from ingest.pipeline import IngestPipeline
from ingest.validate import CONFLICTING_DUPLICATE, UNKNOWN_DEVICE, Rejection
from ingest.writer import Batch, BatchWriter, CopyStream
from protocols.uplink import Frame, Uplink
from sql import migrate as mig
from sql.roles import (
    ANALYTICS,
    BILLING,
    INGEST,
    ROLES,
    RoleError,
    create_login,
    drop_login,
    role_url,
)
from sql.rollups import refresh_rollups

Denied = psycopg.errors.InsufficientPrivilege


# --- where the checks run ------------------------------------------------------------------
@dataclass
class Target:
    url: str  # the owner's (the user that migrated)
    backend: str


@pytest.fixture
def target(db_url: str, backend: str) -> Target:
    """The test's database on each backend (conftest's ``backend`` param)."""
    return Target(db_url, backend)


@dataclass
class Logins:
    """One login per group role on ``target``, and how to connect as each."""

    target: Target
    names: dict[str, str]

    def url(self, role: str) -> str:
        return role_url(self.target.url, self.names[role], None)

    def connect(self, role: str, *, autocommit: bool = True) -> psycopg.Connection:
        conn = psycopg.connect(self.url(role), autocommit=autocommit)
        row = conn.execute("SELECT current_user").fetchone()
        assert row == (self.names[role],), "the server did not log in as the requested user"
        return conn


@pytest.fixture
def logins(target: Target) -> Iterator[Logins]:
    suffix = uuid.uuid4().hex[:8]
    names = {role: f"aqt_{role.removeprefix('aquameter_')}_{suffix}" for role in ROLES}
    with psycopg.connect(target.url) as conn:
        for role, login in names.items():
            create_login(conn, role, login, None)
    try:
        yield Logins(target, names)
    finally:
        with psycopg.connect(target.url, autocommit=True) as conn:
            for login in names.values():  # sessions this test left (pipeline threads)
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                    (login,),
                )
        with psycopg.connect(target.url) as conn:
            for login in names.values():
                drop_login(conn, login)


def _owner(target: Target) -> psycopg.Connection:
    return psycopg.connect(target.url, autocommit=True)


def _channel(conn: psycopg.Connection, device: str, name: str) -> int:
    row = conn.execute(
        "SELECT id FROM channels WHERE device_id = %s AND name = %s", (device, name)
    ).fetchone()
    assert row is not None, (device, name)
    return int(row[0])


def _batch(ch: int, ts: list[datetime], values: list[float]) -> Batch:
    return Batch(
        channel_ids=[ch] * len(ts),
        ts=[t.timestamp() for t in ts],
        values=values,
        quality=[0] * len(ts),
    )


def _denied(conn: psycopg.Connection, statement: str) -> None:
    with pytest.raises(Denied):
        conn.execute(statement)  # type: ignore[arg-type]


# --- the migration itself ------------------------------------------------------------------
def test_migration_grants_by_name_and_is_idempotent(empty_db_url: str) -> None:
    """Run twice on a fresh database while the roles already exist on the server (made by the
    template's migration): nothing fails, and the database-level grants are recorded by name
    (``CREATE DATABASE … TEMPLATE`` does not copy them, so the cloned test databases rely on
    PUBLIC's default CONNECT and TEMPORARY instead)."""
    with psycopg.connect(empty_db_url) as conn:
        first = mig.migrate(conn, timescale="off")
        second = mig.migrate(conn, timescale="off")
        acl = conn.execute(
            "SELECT datacl::text[] FROM pg_database WHERE datname = current_database()"
        ).fetchone()
        functions = conn.execute(
            "SELECT proname, prosecdef, proconfig, "
            "       has_function_privilege('public', oid, 'EXECUTE'), "
            "       has_function_privilege(%s, oid, 'EXECUTE'), "
            "       has_function_privilege(%s, oid, 'EXECUTE'), "
            "       has_function_privilege(%s, oid, 'EXECUTE') "
            "FROM pg_proc WHERE proname IN ('aq_ensure_partitions', 'aq_refresh_rollups') "
            "ORDER BY 1",
            ROLES,
        ).fetchall()
        schema = conn.execute("SELECT current_schema()").fetchone()
    assert "0006_roles.plain.sql" in first.applied and second.applied == []
    assert acl is not None and schema is not None
    entries = {e.split("/")[0] for e in acl[0]}
    assert {f"{INGEST}=Tc", f"{ANALYTICS}=Tc", f"{BILLING}=c"} <= entries
    path = [f"search_path={schema[0]}, pg_temp"]
    assert functions == [
        ("aq_ensure_partitions", True, path, False, True, False, False),
        ("aq_refresh_rollups", True, path, False, False, True, False),
    ]


# The privileges each role holds on every relation, from the catalog: what the behaviour tests
# below show statement by statement, here for every table at once. (r SELECT, a INSERT,
# w UPDATE, d DELETE; "" nothing.)
ANALYTICS_TABLES = (
    "dma_daily alerts billing_volumes water_balance water_balance_summary read_rates "
    "meter_edits analysis_marks leak_events"
).split()
EXPECTED = {
    INGEST: {
        "readings": "ra",
        "quarantine": "a",
        "ingest_days": "raw",
        "channels": "r",
        "devices": "r",
        "meters": "r",
        "registry_version": "r",
        "readings_backend": "r",
        "readings_partitioning": "r",
    },
    ANALYTICS: {
        **{
            t: "r" for t in "readings quarantine ingest_days readings_hourly readings_daily".split()
        },
        **{t: "r" for t in "dmas vendors devices meters meter_exchanges sensors channels".split()},
        **{t: "r" for t in "readings_backend schema_backend schema_migrations".split()},
        **{t: "r" for t in "billing_export readings_partitioning rollup_state".split()},
        "meter_classes": "r",  # migration 0011: the registry's classes, read by the flows
        "holiday_calendars": "r",  # migration 0012: the registry's holiday calendars
        "flow_runs": "ra",  # migration 0009: each flow run records itself, never rewrites
        **{t: "rawd" for t in ANALYTICS_TABLES},
    },
    BILLING: {"billing_export": "r"},
}


def test_grant_matrix(target: Target) -> None:
    with _owner(target) as conn:
        relations = [
            r[0]
            for r in conn.execute(
                "SELECT c.relname FROM pg_class c LEFT JOIN pg_inherits i ON i.inhrelid = c.oid "
                "WHERE c.relnamespace = current_schema()::regnamespace "
                "AND c.relkind IN ('r', 'p', 'v', 'm') AND i.inhrelid IS NULL ORDER BY 1"
            )
        ]
        for role, expected in EXPECTED.items():
            held = {}
            for rel in relations:
                flags = "".join(
                    f
                    for f, priv in zip(
                        "rawd", ("SELECT", "INSERT", "UPDATE", "DELETE"), strict=True
                    )
                    if conn.execute(
                        "SELECT has_table_privilege(%s, %s::regclass, %s)", (role, rel, priv)
                    ).fetchone()
                    == (True,)
                )
                if flags:
                    held[rel] = flags
            want = {k: v for k, v in expected.items() if k in relations}
            assert held == want, role


def test_concurrent_role_creation_in_two_databases(db_url: str) -> None:
    """The role-creating block of the migration, run by two sessions at once (two databases
    migrating on one server): the second waits for the first, then takes the role as it finds it.
    Run with fresh role names so that the real roles are not touched."""
    text = (mig.MIGRATIONS_DIR / "0006_roles.plain.sql").read_text()
    block = text[text.index("DO $$") : text.index("END $$;") + len("END $$;")]
    names = [f"aqt_race_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    original = "ARRAY['aquameter_ingest', 'aquameter_analytics', 'aquameter_billing']"
    assert original in block
    block = block.replace(original, "ARRAY[" + ", ".join(f"'{n}'" for n in names) + "]")
    errors: list[BaseException] = []
    first = psycopg.connect(db_url)
    second = psycopg.connect(db_url)
    try:
        first.execute(block)  # type: ignore[arg-type]  # created, not committed yet
        pid = second.info.backend_pid

        def run_second() -> None:
            try:
                second.execute(block)  # type: ignore[arg-type]
                second.commit()
            except BaseException as err:  # noqa: BLE001 - reported to the test thread
                errors.append(err)

        thread = threading.Thread(target=run_second)
        thread.start()
        with psycopg.connect(db_url, autocommit=True) as watch:
            for _ in range(100):  # until the second session waits on the first one's role
                row = watch.execute(
                    "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)
                ).fetchone()
                if row == ("Lock",):
                    break
                time.sleep(0.05)
            else:
                pytest.fail("the second migration did not wait for the first")
        first.commit()
        thread.join(30)
        assert not thread.is_alive() and errors == []
        with psycopg.connect(db_url) as conn:
            found = conn.execute(
                "SELECT count(*) FROM pg_roles WHERE rolname = ANY(%s) AND NOT rolcanlogin",
                (names,),
            ).fetchone()
            conn.execute(block)  # type: ignore[arg-type]  # a third run: nothing to do
        assert found == (2,)
    finally:
        first.close()
        second.close()
        with psycopg.connect(db_url, autocommit=True) as conn:
            for n in names:
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(n)))


# --- ingest --------------------------------------------------------------------------------
def test_ingest_writes_through_the_writer_into_a_new_week(target: Target, logins: Logins) -> None:
    """The real writer as ingest: a week without a partition (made by the SECURITY DEFINER
    function, owned by the owner, not the login), the same batch again with one value changed
    (staging table, ON CONFLICT, the CONFLICTING_DUPLICATE join), a quarantined rejection, and a
    streamed COPY crossing into further new weeks; analytics then reads all of it through the
    parent table."""
    week = datetime(2031, 3, 3, 6, tzinfo=UTC)  # a Monday no partition covers yet
    ts = [week + timedelta(minutes=15 * i) for i in range(4)]
    address = f"roles-{uuid.uuid4().hex[:8]}"
    with logins.connect(INGEST, autocommit=False) as conn:
        ch = _channel(conn, "AQN00001", "register")
        conn.commit()
        writer = BatchWriter(conn)
        first = writer.write(_batch(ch, ts, [1.0, 2.0, 3.0, 4.0]))
        again = _batch(ch, ts, [1.0, 2.0, 3.0, 9.0])
        again.rejections = [("test", address, Rejection("MALFORMED", "x", None, b"raw"))]
        second = writer.write(again)
        later = [week + timedelta(days=7 * k) for k in (2, 3)]
        stream = CopyStream(writer)
        stream.add([ch] * 2, [t.timestamp() for t in later], [5.0, 6.0], [0, 0])
        streamed = stream.commit([]).inserted
        version = conn.execute("SELECT version FROM registry_version").fetchone()
    assert first.inserted == 4
    assert (second.inserted, second.duplicates) == (0, 3)
    assert second.quarantined == {CONFLICTING_DUPLICATE: 1, "MALFORMED": 1}
    assert streamed == 2 and version is not None

    with _owner(target) as conn:
        owners = conn.execute(
            "SELECT DISTINCT pg_get_userbyid(c.relowner) = current_user "
            "FROM readings r JOIN pg_class c ON c.oid = r.tableoid "
            "WHERE r.channel_id = %s AND r.ts >= %s",
            (ch, week),
        ).fetchall()
        quarantined = conn.execute(
            "SELECT count(*) FROM quarantine WHERE address = %s "
            "OR (reason = %s AND detail LIKE %s)",
            (address, CONFLICTING_DUPLICATE, f"channel {ch} at 2031-%"),
        ).fetchone()
        days = conn.execute(
            "SELECT count(*) FROM ingest_days WHERE channel_id = %s AND day >= %s",
            (ch, week.date()),
        ).fetchone()
    assert owners == [(True,)]
    assert quarantined == (2,) and days == (3,)

    with logins.connect(ANALYTICS) as conn:
        read = conn.execute(
            "SELECT value FROM readings WHERE channel_id = %s AND ts >= %s ORDER BY ts",
            (ch, week),
        ).fetchall()
    assert [r[0] for r in read] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


INGEST_DENIED = [
    "DROP TABLE readings",
    "ALTER TABLE readings ADD COLUMN x integer",
    "CREATE TABLE aqt_intruder (a integer)",
    "TRUNCATE readings",
    "DELETE FROM readings",
    "UPDATE readings SET value = 0",
    "DELETE FROM ingest_days",
    "SELECT * FROM quarantine",
    "SELECT raw, detail FROM quarantine",
    "UPDATE quarantine SET reason = 'x'",
    "DELETE FROM quarantine",
    "SELECT * FROM dma_daily",
    "SELECT * FROM alerts",
    "SELECT * FROM billing_volumes",
    "SELECT * FROM billing_export",
    "INSERT INTO alerts (code, subject_id, start_ts, status, severity) "
    "VALUES ('x', 'y', now(), 'open', 'low')",
    "SELECT aq_refresh_rollups()",
    "UPDATE channels SET unit = 'L'",
]


@pytest.mark.parametrize("statement", INGEST_DENIED)
def test_ingest_cannot(target: Target, logins: Logins, statement: str) -> None:
    with logins.connect(INGEST) as conn:
        _denied(conn, statement)


def test_partitions_made_later_need_no_grants_of_their_own(target: Target, logins: Logins) -> None:
    """Access goes through the parent, where the grants are, so no ALTER DEFAULT PRIVILEGES.

    Plain PostgreSQL: a partition made later by aq_ensure_partitions carries no grants and is not
    reachable by name. TimescaleDB: a chunk copies the hypertable's grants when it is made, so
    by name it allows exactly what the parent allows (ingest reads and appends, never deletes).
    """
    week = datetime(2032, 5, 3, tzinfo=UTC)
    with logins.connect(INGEST, autocommit=False) as conn:
        ch = _channel(conn, "AQN00001", "register")
        conn.commit()
        BatchWriter(conn).write(_batch(ch, [week], [1.0]))
    with _owner(target) as conn:
        row = conn.execute(
            "SELECT c.oid::regclass::text, c.relacl::text[], p.relacl::text[] "
            "FROM readings r JOIN pg_class c ON c.oid = r.tableoid, pg_class p "
            "WHERE r.channel_id = %s AND r.ts = %s AND p.oid = 'readings'::regclass",
            (ch, week),
        ).fetchone()
    assert row is not None and row[0] != "readings"
    part, part_acl, parent_acl = row
    for role in (INGEST, ANALYTICS):
        with logins.connect(role) as conn:
            assert conn.execute(
                "SELECT count(*) FROM readings WHERE channel_id = %s AND ts = %s", (ch, week)
            ).fetchone() == (1,)
            if target.backend == "plain":
                _denied(conn, f"SELECT * FROM {part}")
            _denied(conn, f"DELETE FROM {part}")
    if target.backend == "plain":
        assert part_acl is None
    else:
        assert sorted(part_acl) == sorted(parent_acl)


@pytest.mark.only_backend("timescale")
def test_ingest_writes_into_a_compressed_chunk(target: Target, logins: Logins) -> None:
    """TimescaleDB only: late data for a compressed chunk, redelivered and new, as ingest."""
    lo = datetime(2025, 6, 2, tzinfo=UTC)
    ts = [lo + timedelta(minutes=15 * i) for i in range(8)]
    with logins.connect(INGEST, autocommit=False) as conn:
        ch = _channel(conn, "INLET-NORTH", "flow")
        conn.commit()
        writer = BatchWriter(conn)
        assert writer.write(_batch(ch, ts, [1.0] * 8)).inserted == 8
        with _owner(target) as owner:
            chunk = owner.execute(
                "SELECT tableoid::regclass::text FROM readings WHERE channel_id = %s AND ts = %s",
                (ch, lo),
            ).fetchone()
            assert chunk is not None
            owner.execute("SELECT compress_chunk(%s::regclass)", chunk)
            compressed = owner.execute(
                "SELECT is_compressed FROM timescaledb_information.chunks "
                "WHERE hypertable_name = 'readings' AND range_start <= %s AND range_end > %s",
                (lo, lo),
            ).fetchall()
        again = writer.write(_batch(ch, ts, [1.0] * 7 + [2.0]))
        later = writer.write(_batch(ch, [t + timedelta(minutes=5) for t in ts], [3.0] * 8))
        n = conn.execute(
            "SELECT count(*) FROM readings WHERE channel_id = %s AND ts >= %s AND ts < %s",
            (ch, lo, lo + timedelta(days=1)),
        ).fetchone()
    assert compressed == [(True,)]
    assert (again.inserted, again.duplicates, again.quarantined) == (
        0,
        7,
        {CONFLICTING_DUPLICATE: 1},
    )
    assert later.inserted == 8 and n == (16,)


def test_ingest_pipeline_end_to_end_as_ingest(target: Target, logins: Logins) -> None:
    base = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=2)
    t = [(base + timedelta(minutes=i)).timestamp() for i in range(3)]
    tag = uuid.uuid4().hex[:8]
    frames = [
        Frame("test", f"a-{tag}", uplinks=[Uplink("INLET-SOUTH", "flow", t, [10.0, 12.5, 11.0])]),
        Frame("test", f"c-{tag}", uplinks=[Uplink("NO-SUCH-DEVICE", "flow", t[:1], [1.0])]),
    ]
    pipeline = IngestPipeline(logins.url(INGEST), batch_seconds=0.05, registry_poll_s=None)
    with pipeline:
        first = pipeline.submit_many(frames)
        again = pipeline.submit_many(frames)  # redelivery: the de-duplicating path
    assert pipeline.failure is None
    assert sorted(o.accepted for o in first) == [0, 3]
    assert sorted(o.accepted for o in again) == [0, 3]
    assert (pipeline.counters.stored, pipeline.counters.duplicates) == (3, 3)
    assert pipeline.counters.quarantined == {UNKNOWN_DEVICE: 1}
    assert pipeline.counters.quarantine_repeats == {UNKNOWN_DEVICE: 1}
    with _owner(target) as conn:
        flow = _channel(conn, "INLET-SOUTH", "flow")
        stored = conn.execute(
            "SELECT value FROM readings WHERE channel_id = %s AND ts >= %s AND ts < %s ORDER BY ts",
            (flow, base, base + timedelta(minutes=3)),
        ).fetchall()
        quarantined = conn.execute(
            "SELECT count(*), sum(occurrences) FROM quarantine WHERE address = %s AND reason = %s",
            (f"c-{tag}", UNKNOWN_DEVICE),
        ).fetchone()
    assert [r[0] for r in stored] == pytest.approx([36.0, 45.0, 39.6])  # L/s stored as m3/h
    assert quarantined == (1, 2)  # the redelivered frame counted on its row (migration 0015)


def test_ingest_imports_and_reimports_as_ingest(
    target: Target, logins: Logins, tmp_path: Path
) -> None:
    """``aquameter import`` connects as ingest: a re-import looks up which rows an earlier import
    already quarantined, which needs SELECT on those columns of quarantine (0015)."""
    csv = tmp_path / "history.csv"
    csv.write_text(
        "device,ts,value\n"
        "AQN00001,2026-03-02T00:00:00Z,1.5\n"
        "AQN00001,not a date,2.0\n"
        "NO-SUCH-DEVICE,2026-03-02T01:00:00Z,2.5\n"
    )
    results = []
    for _ in range(2):
        with IngestPipeline(logins.url(INGEST), registry_poll_s=None) as pipeline:
            results.append(import_file(csv, pipeline))
        assert pipeline.failure is None
    first, again = results
    assert (first.stored, first.quarantined, first.already_quarantined) == (1, 2, 0)
    assert (again.stored, again.quarantined, again.already_quarantined) == (0, 0, 2)
    with _owner(target) as conn:
        rows = conn.execute(
            "SELECT reason, occurrences FROM quarantine WHERE source = 'import' ORDER BY 1"
        ).fetchall()
    assert rows == [("MALFORMED", 1), (UNKNOWN_DEVICE, 1)]


def test_ingest_column_rights_on_quarantine(target: Target) -> None:
    """What the upsert of 0015 needs and nothing more: ingest reads the digest, the counts and
    the importer's key, updates only the counts, and can read neither raw bytes nor details."""
    with _owner(target) as conn:
        held = {
            priv: [
                col
                for col in ("source", "address", "device_id", "reason", "detail", "raw")
                + ("digest", "occurrences", "received_at", "last_received_at")
                if conn.execute(
                    "SELECT has_column_privilege(%s, 'quarantine', %s, %s)", (INGEST, col, priv)
                ).fetchone()
                == (True,)
            ]
            for priv in ("SELECT", "UPDATE")
        }
    assert held == {
        "SELECT": ["source", "address", "reason", "digest", "occurrences", "last_received_at"],
        "UPDATE": ["occurrences", "last_received_at"],
    }


# --- analytics -----------------------------------------------------------------------------
def test_analytics_reads_and_writes_its_tables(target: Target, logins: Logins) -> None:
    week = datetime(2033, 1, 3, tzinfo=UTC)
    with logins.connect(INGEST, autocommit=False) as conn:
        ch = _channel(conn, "AQN00002", "register")
        conn.commit()
        BatchWriter(conn).write(_batch(ch, [week, week + timedelta(hours=1)], [1.0, 2.0]))
    subject = f"aqt-{uuid.uuid4().hex[:8]}"
    alerts = pl.DataFrame(
        {
            "code": ["LEAK"],
            "subject_id": [subject],
            "start_ts": [week],
            "end_ts": [None],
            "status": ["open"],
            "severity": ["high"],
            "evidence": ['{"why": "test"}'],
        },
        schema_overrides={"end_ts": pl.Datetime("us", "UTC")},
    )
    with logins.connect(ANALYTICS, autocommit=False) as conn:
        n = conn.execute(
            "SELECT count(*) FROM readings WHERE channel_id = %s AND ts >= %s", (ch, week)
        ).fetchone()
        days = conn.execute(
            "SELECT count(*) FROM ingest_days WHERE channel_id = %s AND day = %s",
            (ch, week.date()),
        ).fetchone()
        conn.execute("SELECT count(*) FROM quarantine").fetchone()
        with conn.transaction(), conn.cursor() as cur:  # flows.store: temp stage + upsert
            inserted, _ = upsert_alerts(cur, alerts)
        with conn.transaction(), conn.cursor() as cur:
            inserted_again, updated = upsert_alerts(
                cur, alerts.with_columns(status=pl.lit("closed"))
            )
        conn.execute("DELETE FROM alerts WHERE subject_id = %s", (subject,))
        conn.commit()
        if target.backend == "plain":  # the SECURITY DEFINER function recomputes them
            refresh_rollups(conn, week, week + timedelta(days=1))
        else:  # the refresh policies do it as the owner; on demand needs the owner too
            with pytest.raises(Denied, match="must be owner"):
                refresh_rollups(conn, week, week + timedelta(days=1))
    if target.backend == "timescale":
        with _owner(target) as owner:
            refresh_rollups(owner, week, week + timedelta(days=1))
    with logins.connect(ANALYTICS) as conn:
        hourly = conn.execute(
            "SELECT count(*) FROM readings_hourly WHERE channel_id = %s AND bucket >= %s",
            (ch, week),
        ).fetchone()
        daily = conn.execute(
            "SELECT n FROM readings_daily WHERE channel_id = %s AND bucket >= %s", (ch, week)
        ).fetchall()
    assert n == (2,) and days == (1,)
    assert (inserted, inserted_again, updated) == (1, 0, 1)
    assert hourly == (2,) and daily == [(2,)]


ANALYTICS_DENIED = [
    "INSERT INTO readings VALUES (1, now(), 1, 0)",
    "UPDATE readings SET value = 0",
    "DELETE FROM readings",
    "TRUNCATE readings",
    "INSERT INTO quarantine (source, reason) VALUES ('x', 'y')",
    "DELETE FROM ingest_days",
    "UPDATE channels SET unit = 'L'",
    "DROP TABLE alerts",
    "CREATE TABLE aqt_intruder (a integer)",
    "SELECT aq_ensure_partitions(now(), now())",
]


@pytest.mark.parametrize("statement", ANALYTICS_DENIED)
def test_analytics_cannot(target: Target, logins: Logins, statement: str) -> None:
    with logins.connect(ANALYTICS) as conn:
        _denied(conn, statement)


def test_analytics_cannot_write_rollups_directly(target: Target, logins: Logins) -> None:
    """Plain rollups are tables only aq_refresh_rollups writes (as its owner); TimescaleDB's
    are continuous aggregates, views nobody writes."""
    refused = Denied if target.backend == "plain" else psycopg.errors.ObjectNotInPrerequisiteState
    with logins.connect(ANALYTICS) as conn:
        for statement in ("DELETE FROM readings_hourly", "DELETE FROM readings_daily"):
            with pytest.raises(refused):
                conn.execute(statement)  # type: ignore[arg-type]


# --- billing -------------------------------------------------------------------------------
def test_billing_reads_the_view_only(target: Target, logins: Logins) -> None:
    meter = f"aqt-{uuid.uuid4().hex[:8]}"
    with _owner(target) as conn:
        for version in (1, 2):
            conn.execute(
                "INSERT INTO billing_volumes (meter_id, period_start, period_end, version, "
                "opening_read_type, closing_read_type, vee_status, reason, volume) "
                "VALUES (%s, '2026-01-01', '2026-01-31', %s, 'ACTUAL', 'ACTUAL', 'VALID', "
                "'INITIAL', %s)",
                (meter, version, 10.0 * version),
            )
    with logins.connect(BILLING) as conn:
        rows = conn.execute(
            "SELECT version, volume FROM billing_export WHERE meter_id = %s", (meter,)
        ).fetchall()
        for statement in (
            "SELECT * FROM billing_volumes",
            "SELECT * FROM readings",
            "SELECT * FROM quarantine",
            "SELECT * FROM devices",
            "SELECT * FROM readings_daily",
            "SELECT * FROM alerts",
            "DELETE FROM billing_volumes",
            "SELECT aq_ensure_partitions(now(), now())",
            "CREATE TABLE aqt_intruder (a integer)",
        ):
            _denied(conn, statement)
    # The view reads billing_volumes with its owner's rights: the latest version comes back.
    assert rows == [(2, 20.0)]


# --- sql.roles -----------------------------------------------------------------------------
def test_create_login_is_idempotent_and_refuses_what_defeats_it(db_url: str) -> None:
    login = f"aqt_login_{uuid.uuid4().hex[:8]}"
    try:
        with psycopg.connect(db_url) as conn:
            create_login(conn, INGEST, login, "s3cret 'pw'")
            create_login(conn, INGEST, login, None)  # again: kept, password untouched
            row = conn.execute(
                "SELECT rolcanlogin, rolpassword LIKE 'SCRAM-SHA-256$%%' OR rolpassword LIKE "
                "'md5%%', pg_has_role(%s, %s, 'USAGE') "
                "FROM pg_authid WHERE rolname = %s",
                (login, INGEST, login),
            ).fetchone()
            with pytest.raises(RoleError):
                create_login(conn, "postgres", login, None)
            with pytest.raises(RoleError):
                create_login(conn, INGEST, ANALYTICS, None)
            superuser = conn.execute("SELECT current_user").fetchone()
            assert superuser is not None
            with pytest.raises(RoleError):
                create_login(conn, INGEST, superuser[0], None)
        assert row == (True, True, True)
    finally:
        with psycopg.connect(db_url) as conn:
            drop_login(conn, login)


@pytest.mark.parametrize(
    ("base", "password", "expected"),
    [
        (
            "postgresql://owner:pw@db.example:5432/aq?sslmode=require&user=x",
            "p@ss/w:rd",
            "postgresql://aq_ingest:p%40ss%2Fw%3Ard@db.example:5432/aq?sslmode=require",
        ),
        ("postgres://db.example/aq", None, "postgres://aq_ingest@db.example/aq"),
        (
            "postgresql://owner@h1:5432,h2:5433/aq",
            None,
            "postgresql://aq_ingest@h1:5432,h2:5433/aq",
        ),
    ],
)
def test_role_url(base: str, password: str | None, expected: str) -> None:
    assert role_url(base, "aq_ingest", password) == expected


def test_role_url_keyword_conninfo() -> None:
    out = role_url("host=db port=5433 dbname=aq user=owner password=x", "aq_ingest", None)
    assert psycopg.conninfo.conninfo_to_dict(out) == {
        "host": "db",
        "port": "5433",
        "dbname": "aq",
        "user": "aq_ingest",
    }


def test_migrations_dir_has_both_variants() -> None:
    """Both backends get the roles: a plain-only migration would leave TimescaleDB open."""
    names = {p.name for p in Path(mig.MIGRATIONS_DIR).glob("0006_*.sql")}
    assert names == {"0006_roles.plain.sql", "0006_roles.timescale.sql"}
