"""Ordered, checksummed migrations with a TimescaleDB and a plain-PostgreSQL variant.

Files are ``NNNN_name.sql`` (for every backend) or ``NNNN_name.timescale.sql`` /
``NNNN_name.plain.sql`` (one of the two, chosen once at the first migrate and recorded). Each
applied file is recorded with its SHA-256: editing a migration that already ran is an error rather
than a silent drift between databases.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import psycopg
from psycopg import sql

log = logging.getLogger("aquameter.migrate")

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+?)(?:\.(timescale|plain))?\.sql$")

Backend = Literal["timescale", "plain"]


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    variant: str | None
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text()

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


@dataclass
class MigrateResult:
    backend: Backend
    applied: list[str]
    already: int
    partitions_created: int


def discover(backend: Backend, directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    chosen: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        m = _NAME.match(path.name)
        if not m:
            raise MigrationError(f"migration file name not understood: {path.name}")
        version, name, variant = int(m.group(1)), m.group(2), m.group(3)
        if variant not in (None, backend):
            continue
        if version in chosen:
            raise MigrationError(f"two migrations numbered {version:04d}")
        chosen[version] = Migration(version, name, variant, path)
    return [chosen[v] for v in sorted(chosen)]


def timescale_available(conn: psycopg.Connection) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'"
    ).fetchone()
    return bool(row and row[0])


def timescale_loaded(conn: psycopg.Connection) -> bool:
    """Whether the TimescaleDB loader runs in this session (``shared_preload_libraries``, or
    ``LOAD``). Its settings exist only then: a placeholder for a
    setting that postgresql.conf names without loading the library has type ``string``."""
    row = conn.execute(
        "SELECT count(*) FROM pg_settings "
        "WHERE name = 'timescaledb.disable_load' AND vartype = 'bool'"
    ).fetchone()
    return bool(row and row[0])


def recorded_backend(conn: psycopg.Connection) -> Backend | None:
    exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return None
    row = conn.execute("SELECT backend FROM schema_backend").fetchone()
    return row[0] if row else None


NOT_LOADED_FIX = "add timescaledb to shared_preload_libraries and restart PostgreSQL to use it"


def choose_backend(conn: psycopg.Connection, mode: str) -> Backend:
    """The backend a database uses: the recorded one once migrated, else decided now.

    ``auto`` takes TimescaleDB when the extension is installed on the server *and* loaded, plain
    PostgreSQL otherwise. Installed but not loaded (missing from ``shared_preload_libraries``) is
    common right after ``apt install``: ``auto`` then migrates as plain PostgreSQL and logs one
    warning naming the fix, because an operator who asked for "whatever is there" should get a
    working database rather than an aborted migrate. The choice is recorded (``schema_backend``):
    preloading TimescaleDB later does not convert a database migrated as plain. ``on`` is an
    explicit request and fails with the fix.
    """
    if mode not in ("auto", "on", "off"):
        raise MigrationError(f"timescale mode must be auto, on or off, not {mode!r}")
    recorded = recorded_backend(conn)
    if recorded is not None:
        if mode == "on" and recorded != "timescale":
            raise MigrationError("database was migrated as plain PostgreSQL; timescale=on refused")
        return recorded
    if mode == "off":
        return "plain"
    available = timescale_available(conn)
    return decide_backend(mode, available, available and timescale_loaded(conn))


def decide_backend(mode: str, available: bool, loaded: bool) -> Backend:
    """The decision of :func:`choose_backend` for a database not yet migrated, without a server:
    ``mode`` and what the server reports (extension installed, loader running)."""
    if mode == "off":
        return "plain"
    if not available:
        if mode == "on":
            raise MigrationError("timescale=on but the timescaledb extension is not available")
        return "plain"
    if not loaded:
        if mode == "on":
            raise MigrationError(
                f"timescale=on but TimescaleDB is installed and not loaded: {NOT_LOADED_FIX}"
            )
        log.warning(
            "TimescaleDB is installed but not loaded: %s; migrating as plain PostgreSQL",
            NOT_LOADED_FIX,
        )
        return "plain"
    return "timescale"


def _bootstrap(conn: psycopg.Connection, backend: Backend) -> None:
    conn.execute(
        """CREATE TABLE IF NOT EXISTS schema_migrations (
               version integer PRIMARY KEY, name text NOT NULL, variant text,
               checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"""
    )
    conn.execute("CREATE TABLE IF NOT EXISTS schema_backend (backend text NOT NULL)")
    if conn.execute("SELECT count(*) FROM schema_backend").fetchone() == (0,):
        conn.execute("INSERT INTO schema_backend VALUES (%s)", (backend,))
    if backend == "timescale":
        conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")


def migrate(
    conn: psycopg.Connection,
    *,
    timescale: str = "auto",
    partition_days: int = 7,
    partitions_ahead: int = 4,
    compress_after_days: int = 7,
    retention_days: int = 3650,
) -> MigrateResult:
    """Apply pending migrations, then (re)apply policies and make partitions ahead. Idempotent."""
    backend = choose_backend(conn, timescale)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('aquameter_migrate'))")
        _bootstrap(conn, backend)
    applied_rows = conn.execute("SELECT version, name, checksum FROM schema_migrations").fetchall()
    applied = {r[0]: (r[1], r[2]) for r in applied_rows}
    done: list[str] = []
    for mig in discover(backend):
        if mig.version in applied:
            name, checksum = applied[mig.version]
            if checksum != mig.checksum:
                raise MigrationError(
                    f"migration {mig.path.name} was edited after it was applied "
                    f"(recorded {checksum[:12]}, file {mig.checksum[:12]}); add a new migration"
                )
            continue
        with conn.transaction():
            conn.execute(mig.sql)  # type: ignore[arg-type]
            if mig.version == 2 and backend == "plain":
                conn.execute(
                    "UPDATE readings_partitioning SET interval_days = %s", (partition_days,)
                )
            if mig.version == 2 and backend == "timescale":
                conn.execute(
                    "SELECT set_chunk_time_interval('readings', %s::interval)",
                    (timedelta(days=partition_days),),
                )
            conn.execute(
                "INSERT INTO schema_migrations (version, name, variant, checksum) "
                "VALUES (%s, %s, %s, %s)",
                (mig.version, mig.name, mig.variant, mig.checksum),
            )
        done.append(mig.path.name)
    made = ensure_partitions_ahead(conn, partition_days * partitions_ahead)
    if backend == "timescale":
        apply_timescale_policies(conn, compress_after_days, retention_days)
    conn.commit()
    return MigrateResult(backend, done, len(applied), made)


def ensure_partitions_ahead(conn: psycopg.Connection, days_ahead: int) -> int:
    now = datetime.now(UTC)
    with conn.transaction():
        row = conn.execute(
            "SELECT aq_ensure_partitions(%s, %s)",
            (now - timedelta(days=1), now + timedelta(days=days_ahead)),
        ).fetchone()
    return int(row[0]) if row else 0


# Continuous-aggregate refresh policies: (view, start_offset, end_offset, schedule_interval).
# The hourly view re-reads three days (late NB-IoT uplinks), the daily one ten.
CAGG_POLICIES = (
    ("readings_hourly", timedelta(days=3), timedelta(hours=1), timedelta(minutes=30)),
    ("readings_daily", timedelta(days=10), timedelta(days=1), timedelta(hours=1)),
)


def _policy_is(
    conn: psycopg.Connection,
    proc: str,
    relation: str,
    config: dict[str, timedelta],
    schedule: timedelta | None = None,
) -> bool:
    """Whether exactly one ``proc`` job exists on ``relation`` with these interval settings."""
    same = [
        sql.SQL("(config->>{})::interval = {}").format(sql.Literal(key), sql.Placeholder())
        for key in config
    ]
    params: list[timedelta] = list(config.values())
    if schedule is not None:
        same.append(sql.SQL("schedule_interval = {}").format(sql.Placeholder()))
        params.append(schedule)
    query = sql.SQL(
        "SELECT count(*), count(*) FILTER (WHERE {}) FROM timescaledb_information.jobs "
        "WHERE proc_name = {} AND hypertable_schema = current_schema() AND hypertable_name = {}"
    ).format(sql.SQL(" AND ").join(same), sql.Literal(proc), sql.Literal(relation))
    row = conn.execute(query, params).fetchone()
    return row == (1, 1)


def apply_timescale_policies(
    conn: psycopg.Connection, compress_after_days: int, retention_days: int
) -> None:
    """Make the compression, retention and refresh policies match the settings.

    Runs on every migrate so that changed settings take effect; a policy that already matches is
    left alone, so a repeated migrate changes nothing (same jobs, schedules and run history).
    """
    compress_after = timedelta(days=compress_after_days)
    retention = timedelta(days=retention_days)
    with conn.transaction():
        if not _policy_is(
            conn, "policy_compression", "readings", {"compress_after": compress_after}
        ):
            conn.execute("SELECT remove_compression_policy('readings', if_exists => true)")
            conn.execute(
                "SELECT add_compression_policy('readings', %s::interval)", (compress_after,)
            )
        if not _policy_is(conn, "policy_retention", "readings", {"drop_after": retention}):
            conn.execute("SELECT remove_retention_policy('readings', if_exists => true)")
            conn.execute("SELECT add_retention_policy('readings', %s::interval)", (retention,))
        for view, start, end, every in CAGG_POLICIES:
            offsets = {"start_offset": start, "end_offset": end}
            if _policy_is(conn, "policy_refresh_continuous_aggregate", view, offsets, every):
                continue
            conn.execute(
                "SELECT remove_continuous_aggregate_policy(%s::regclass, if_exists => true)",
                (view,),
            )
            conn.execute(
                "SELECT add_continuous_aggregate_policy(%s::regclass, "
                "start_offset => %s::interval, end_offset => %s::interval, "
                "schedule_interval => %s::interval)",
                (view, start, end, every),
            )


def backend_of(conn: psycopg.Connection) -> Backend:
    backend = recorded_backend(conn)
    if backend is None:
        raise MigrationError("database is not migrated: run `aquameter db migrate`")
    return backend
