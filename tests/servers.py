"""Real servers for tests: the configured ones when their URL is set, else started here.

``AQUAMETER_DATABASE_URL`` names a PostgreSQL server the tests may create databases on;
``AQUAMETER_MQTT_URL`` a broker. Unset, an embedded PostgreSQL and a mosquitto/amqtt broker start.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from aquameter.embedded import Broker, embedded_postgres_url, start_broker
from aquameter.registry import load_registry
from ingest.registry_sync import sync_registry
from sql.migrate import migrate

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_REGISTRY = ROOT / "examples" / "registry.toml"


def server_url(tmp_root: Path) -> str:
    url = os.environ.get("AQUAMETER_DATABASE_URL")
    if url:
        return url
    return embedded_postgres_url(tmp_root / "pgdata", database="postgres")


def with_database(url: str, dbname: str) -> str:
    params = conninfo_to_dict(url)
    params["dbname"] = dbname
    return make_conninfo(**params)  # type: ignore[arg-type]


class DatabaseFactory:
    """Creates throwaway databases: migrated and synced once into a template, then cloned."""

    def __init__(self, server: str) -> None:
        self.server = server
        self.template = f"aqt_tpl_{uuid.uuid4().hex[:8]}"
        self.created: list[str] = [self.template]
        self._admin(f'CREATE DATABASE "{self.template}"')
        with psycopg.connect(with_database(server, self.template)) as conn:
            migrate(conn, partitions_ahead=2)
            sync_registry(conn, load_registry(EXAMPLE_REGISTRY))
            conn.commit()

    def _admin(self, sql: str) -> None:
        with psycopg.connect(self.server, autocommit=True) as conn:
            conn.execute(sql)  # type: ignore[arg-type]

    def new(self, *, empty: bool = False) -> str:
        name = f"aqt_{uuid.uuid4().hex[:12]}"
        if empty:
            self._admin(f'CREATE DATABASE "{name}"')
        else:
            self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
        self.created.append(name)
        return with_database(self.server, name)

    def drop_all(self) -> None:
        for name in reversed(self.created):
            try:
                self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except psycopg.Error:
                pass


def broker(tmp_root: Path) -> Iterator[tuple[str, Broker | None]]:
    url = os.environ.get("AQUAMETER_MQTT_URL")
    if url:
        yield url, None
        return
    b = start_broker(tmp_root / "broker")
    try:
        yield b.url, b
    finally:
        b.stop()
