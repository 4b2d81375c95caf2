from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from aquameter.embedded import Broker, start_broker
from tests.servers import EXAMPLE_REGISTRY, DatabaseFactory, server_url
from tests.servers import broker as _broker
from tests.timescale_server import TimescaleDatabaseFactory, TimescaleUnavailable
from tests.timescale_server import server_url as timescale_server_url

BACKENDS = ("plain", "timescale")


def pytest_configure(config: pytest.Config) -> None:
    """Register ``only_backend`` here, beside the ``backend`` param it filters."""
    config.addinivalue_line(
        "markers",
        "only_backend(name): run this database test on one backend only (plain or timescale)",
    )


# Where the backend changes what is tested: the storage layer (migrations, hypertables, COPY,
# compression, retention, continuous aggregates, roles), what reads the rollups (flows, report)
# and what writes through the ingest writer in unusual ways (poison, import, reload).
# The adapters' tests (MQTT, CoAP, Modbus, OPC-UA, the demo) store through the same writer, so
# their TimescaleDB half runs with AQUAMETER_TEST_BACKENDS=all: the whole matrix took 20 minutes
# instead of 11 here, and CI also builds TimescaleDB, soaks and benchmarks.
TIMESCALE_FILES = frozenset(
    {
        "test_timescale.py",
        "test_writer.py",
        "test_migrations.py",
        "test_migrate_timescale_auto.py",
        "test_smoke_db.py",
        "test_db_roles.py",
        "test_ingest_poison.py",
        "test_import.py",
        "test_registry_reload.py",
        "test_flows.py",
        "test_flow_runs.py",
        "test_report.py",
        "test_secrets.py",
        "test_meter_classes.py",
        "test_dma_leak_events.py",
        "test_pipelines_billing.py",
        "test_holidays.py",
        "test_class_change.py",
        "test_class_change_sql.py",
    }
)


def _both_backends_everywhere() -> bool:
    return os.environ.get("AQUAMETER_TEST_BACKENDS", "").strip().lower() == "all"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the backend params an ``only_backend`` marker rules out, and the TimescaleDB half
    of files outside ``TIMESCALE_FILES`` unless ``AQUAMETER_TEST_BACKENDS=all``."""
    everywhere = _both_backends_everywhere()
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        marker = item.get_closest_marker("only_backend")
        callspec = getattr(item, "callspec", None)
        backend = callspec.params.get("backend") if callspec is not None else None
        in_storage_file = Path(str(item.fspath)).name in TIMESCALE_FILES
        if backend == "timescale" and not (everywhere or in_storage_file):
            dropped.append(item)
        elif marker is not None and backend is not None and backend not in marker.args:
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


class Factories:
    """One :class:`DatabaseFactory` per backend, made on first use, dropped at the end.

    ``plain``: the server of ``AQUAMETER_DATABASE_URL`` or an embedded PostgreSQL, migrated with
    ``timescale=auto`` (plain wherever TimescaleDB is not loaded). ``timescale``: the server of
    ``AQUAMETER_TIMESCALE_URL``; without one its tests skip, saying how to get one.
    """

    def __init__(self, tmp: pytest.TempPathFactory) -> None:
        self.tmp = tmp
        self.made: dict[str, DatabaseFactory] = {}
        self.unavailable: str | None = None

    def get(self, backend: str) -> DatabaseFactory:
        """The factory of ``backend``, made once; skips the test when TimescaleDB is missing
        (and remembers why, so the probe runs once a session)."""
        if backend == "timescale" and self.unavailable is not None:
            pytest.skip(self.unavailable)
        if backend not in self.made:
            if backend == "plain":
                self.made[backend] = DatabaseFactory(server_url(self.tmp.mktemp("pg")))
            else:
                try:
                    self.made[backend] = TimescaleDatabaseFactory(timescale_server_url())
                except TimescaleUnavailable as err:
                    self.unavailable = str(err)
                    pytest.skip(self.unavailable)
        return self.made[backend]

    def drop_all(self) -> None:
        """Drop every database the factories made (the end of the session)."""
        for factory in self.made.values():
            factory.drop_all()


@pytest.fixture(scope="session")
def db_factories(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Factories]:
    """Both backends' factories for the session, made lazily: a run that selects only plain
    tests never touches the TimescaleDB server."""
    factories = Factories(tmp_path_factory)
    yield factories
    factories.drop_all()


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The backend a database test runs on: every test that takes a database runs on both."""
    return str(request.param)


@pytest.fixture(scope="session")
def db_factory(db_factories: Factories, backend: str) -> DatabaseFactory:
    """The factory of the test's backend: what makes every database test run on both."""
    return db_factories.get(backend)


def _dropped_after(factory: DatabaseFactory, url: str) -> None:
    """Drop a test's database once the test is done: each TimescaleDB database keeps a scheduler
    (a background worker) while it exists, and the server has a few dozen of them."""
    name = conninfo_to_dict(url)["dbname"]
    try:
        factory._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except psycopg.Error:
        return  # dropped at the end of the session instead
    factory.created.remove(str(name))


@pytest.fixture
def db_url(db_factory: DatabaseFactory) -> Iterator[str]:
    """A fresh database, migrated, with the example registry synced, on each backend."""
    url = db_factory.new()
    yield url
    _dropped_after(db_factory, url)


@pytest.fixture
def empty_db_url(db_factory: DatabaseFactory) -> Iterator[str]:
    """A fresh empty database on each backend (``migrate`` with ``auto`` picks the backend's
    variant)."""
    url = db_factory.new(empty=True)
    yield url
    _dropped_after(db_factory, url)


@pytest.fixture
def plain_db_url(db_factories: Factories) -> Iterator[str]:
    """A fresh migrated database on plain PostgreSQL only, for comparisons across backends."""
    factory = db_factories.get("plain")
    url = factory.new()
    yield url
    _dropped_after(factory, url)


@pytest.fixture
def timescale_db_url(db_factories: Factories) -> Iterator[str]:
    """A fresh migrated database on TimescaleDB only (skips without a server)."""
    factory = db_factories.get("timescale")
    url = factory.new()
    yield url
    _dropped_after(factory, url)


@pytest.fixture(scope="session")
def mqtt_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from (url for url, _ in _broker(tmp_path_factory.mktemp("mqtt")))


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker only this test uses, so it may stop and restart it (outage tests)."""
    b = start_broker(tmp_path / "broker")
    yield b
    b.stop()


@pytest.fixture(scope="session")
def example_registry_path() -> Path:
    return EXAMPLE_REGISTRY


@pytest.fixture(scope="session", autouse=True)
def _quiet_env() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
