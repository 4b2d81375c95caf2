from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from aquameter.embedded import Broker, start_broker
from tests.servers import EXAMPLE_REGISTRY, DatabaseFactory, server_url
from tests.servers import broker as _broker


@pytest.fixture(scope="session")
def db_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DatabaseFactory]:
    factory = DatabaseFactory(server_url(tmp_path_factory.mktemp("pg")))
    yield factory
    factory.drop_all()


@pytest.fixture
def db_url(db_factory: DatabaseFactory) -> str:
    """A fresh database, migrated, with the example registry synced."""
    return db_factory.new()


@pytest.fixture
def empty_db_url(db_factory: DatabaseFactory) -> str:
    return db_factory.new(empty=True)


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
