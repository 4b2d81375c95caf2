"""The TimescaleDB server the tests use: the real extension in a PostgreSQL cluster that preloads
it, named by ``AQUAMETER_TIMESCALE_URL``.

``.ci/timescale-cluster start`` makes one on this machine (its own data directory and port; it
never touches the 5432 cluster) once TimescaleDB is installed into PostgreSQL 15 (``.ci/run``
builds it from the vendored source). Without the variable, or when the server named does not load
TimescaleDB, every TimescaleDB test skips with :data:`SKIP_REASON` or the reason found.
"""

from __future__ import annotations

import os
import time
import uuid

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from sql.migrate import timescale_loaded
from tests.servers import DatabaseFactory, with_database

URL_ENV = "AQUAMETER_TIMESCALE_URL"
SKIP_REASON = (
    f"no TimescaleDB server: set {URL_ENV} or run .ci/timescale-cluster start "
    "(with TimescaleDB installed into PostgreSQL 15, as .ci/run does)"
)


class TimescaleUnavailable(RuntimeError):
    """No usable TimescaleDB server: the message says why, and callers skip with it."""


def server_url() -> str:
    """The TimescaleDB server's URL, checked to load the extension, so that a test never runs
    the TimescaleDB branch on a server that would silently migrate as plain PostgreSQL."""
    url = os.environ.get(URL_ENV)
    if not url:
        raise TimescaleUnavailable(SKIP_REASON)
    try:
        with psycopg.connect(url, connect_timeout=10) as conn:
            loaded = timescale_loaded(conn)
    except psycopg.OperationalError as err:
        raise TimescaleUnavailable(f"{URL_ENV}={url} does not answer: {err}") from err
    if not loaded:
        raise TimescaleUnavailable(
            f"{URL_ENV}={url} does not preload timescaledb (shared_preload_libraries)"
        )
    return url


def fresh_database(url: str) -> tuple[str, str]:
    """A new empty database on the server at ``url``: (its URL, its name)."""
    name = f"aqt_ts_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    params = conninfo_to_dict(url)
    params["dbname"] = name
    return make_conninfo(**params), name  # type: ignore[arg-type]


def drop_database(url: str, name: str) -> None:
    """Drop ``name`` on the server at ``url``, ending its sessions (a scheduler's included)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


def start_scheduler(url: str) -> None:
    """Start the TimescaleDB job scheduler of the database at ``url`` now.

    The launcher starts one for every database it knows at server start and for a database
    where ``CREATE EXTENSION`` ran; a database cloned from a template gets one only after this
    (or a server restart), so tests that wait for policies run by the scheduler call it first.
    """
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT _timescaledb_functions.start_background_workers()")


class TimescaleDatabaseFactory(DatabaseFactory):
    """:class:`DatabaseFactory` on a TimescaleDB server: migrated as TimescaleDB (``auto`` finds
    the extension loaded) and checked to be, and with a template PostgreSQL can clone.

    CREATE DATABASE … TEMPLATE refuses a template with sessions, and TimescaleDB's scheduler keeps
    one on every database with the extension: the template stops taking connections and its
    scheduler is ended, so the launcher leaves it alone.
    """

    def __init__(self, server: str) -> None:
        super().__init__(server)
        with psycopg.connect(with_database(server, self.template)) as conn:
            row = conn.execute("SELECT backend FROM readings_backend").fetchone()
        if row != ("timescale",):
            raise TimescaleUnavailable(f"the template migrated as {row}, not as timescale")
        self._admin(f'ALTER DATABASE "{self.template}" ALLOW_CONNECTIONS false')
        self._admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{self.template}' AND pid <> pg_backend_pid()"
        )

    def new(self, *, empty: bool = False) -> str:
        """A clone of the template (or an empty database); retried while the template's
        scheduler, ended just before, is still leaving."""
        for attempt in range(50):
            try:
                return super().new(empty=empty)
            except psycopg.errors.ObjectInUse:
                if attempt == 49:
                    raise
                time.sleep(0.1)
        raise AssertionError("unreachable")
