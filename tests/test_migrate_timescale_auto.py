"""``db migrate`` when TimescaleDB is installed on the server but not loaded.

``timescale=auto`` migrates as plain PostgreSQL and warns once with the fix; ``timescale=on``
fails with the fix. The decision itself is tested without a server; the server tests need a
PostgreSQL that lists timescaledb in ``pg_available_extensions`` without preloading it (what
the TimescaleDB build of ``.ci/run`` leaves on a machine whose server was not restarted
with ``shared_preload_libraries=timescaledb``) and skip, saying why, anywhere else.
"""

from __future__ import annotations

import logging

import psycopg
import pytest

from sql import migrate as mig

# Its server half needs the extension installed and *not* loaded: the plain server of the
# tests, never the TimescaleDB one (conftest's ``backend`` param), which preloads it.
pytestmark = pytest.mark.only_backend("plain")

WARNING = (
    "TimescaleDB is installed but not loaded: add timescaledb to shared_preload_libraries and "
    "restart PostgreSQL to use it; migrating as plain PostgreSQL"
)


def _migrate_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "aquameter.migrate"]


# --- the decision, without a server ------------------------------------------------------
@pytest.mark.parametrize(
    ("mode", "available", "loaded", "backend"),
    [
        ("auto", False, False, "plain"),
        ("auto", True, False, "plain"),
        ("auto", True, True, "timescale"),
        ("on", True, True, "timescale"),
        ("off", True, True, "plain"),
        ("off", True, False, "plain"),
    ],
)
def test_decide_backend(mode, available, loaded, backend, caplog):
    caplog.set_level(logging.WARNING, logger="aquameter.migrate")
    assert mig.decide_backend(mode, available, loaded) == backend
    expected = [WARNING] if (mode, available, loaded) == ("auto", True, False) else []
    assert _migrate_warnings(caplog) == expected


def test_decide_on_installed_not_loaded_names_the_fix(caplog):
    with pytest.raises(mig.MigrationError, match="shared_preload_libraries") as err:
        mig.decide_backend("on", True, False)
    assert "\n" not in str(err.value)  # one line
    assert "restart PostgreSQL" in str(err.value)
    assert _migrate_warnings(caplog) == []  # refused, not warned


def test_decide_on_not_installed_is_refused():
    with pytest.raises(mig.MigrationError, match="not available"):
        mig.decide_backend("on", False, False)


# --- against a server with the extension installed and not preloaded -------------------
@pytest.fixture
def installed_not_loaded(empty_db_url: str) -> str:
    with psycopg.connect(empty_db_url) as conn:
        available = mig.timescale_available(conn)
        loaded = mig.timescale_loaded(conn)
    if not available:
        pytest.skip(
            "timescaledb is not in this server's pg_available_extensions (not installed): "
            "install it into this server's PostgreSQL (.ci/run builds it) to run this test"
        )
    if loaded:
        pytest.skip("this server preloads timescaledb; the test needs it installed, not loaded")
    return empty_db_url


def test_server_reports_available_but_not_loaded(installed_not_loaded):
    with psycopg.connect(installed_not_loaded) as conn:
        # A session setting with the loader's GUC name is a placeholder, not the loader.
        conn.execute("SET timescaledb.disable_load = 'off'")
        assert mig.timescale_available(conn) is True
        assert mig.timescale_loaded(conn) is False


def test_auto_migrates_as_plain_and_warns_once(installed_not_loaded, caplog):
    caplog.set_level(logging.WARNING, logger="aquameter.migrate")
    with psycopg.connect(installed_not_loaded) as conn:
        result = mig.migrate(conn, timescale="auto", partitions_ahead=1)
        again = mig.migrate(conn, timescale="auto", partitions_ahead=1)
        recorded = conn.execute("SELECT backend FROM schema_backend").fetchone()
        extension = conn.execute(
            "SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'"
        ).fetchone()
        partitioned = conn.execute(
            "SELECT relkind FROM pg_class WHERE relname = 'readings'"
        ).fetchone()
    assert result.backend == "plain" and again.backend == "plain"
    assert result.applied and again.applied == []
    assert recorded == ("plain",)
    assert extension == (0,)
    assert partitioned == ("p",)  # the plain variant: a declaratively partitioned table
    # Once: the second migrate reads the recorded backend and decides nothing.
    assert _migrate_warnings(caplog) == [WARNING]


def test_on_fails_with_the_fix_and_records_nothing(installed_not_loaded):
    with psycopg.connect(installed_not_loaded) as conn:
        with pytest.raises(mig.MigrationError, match="shared_preload_libraries") as err:
            mig.migrate(conn, timescale="on")
        conn.rollback()
        bootstrapped = conn.execute("SELECT to_regclass('schema_migrations')").fetchone()
    assert "\n" not in str(err.value)
    assert bootstrapped == (None,)
