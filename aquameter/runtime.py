"""Resolving the servers a command talks to: configured URLs, else embedded ones.

An embedded broker started by one command records its URL in the data dir, so that a second
command (``aquameter simulate fleet`` next to ``aquameter ingest``) finds the same broker.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from aquameter.embedded import Broker, embedded_postgres_url, start_broker
from aquameter.settings import Settings

DbRole = Literal["owner", "ingest", "analytics", "billing"]


def database_url(settings: Settings, role: DbRole = "owner") -> str:
    """The URL ``role``'s work connects with: its own login when configured, else the owner's
    (or the embedded server's)."""
    own = {
        "ingest": settings.database_url_ingest,
        "analytics": settings.database_url_analytics,
        "billing": settings.database_url_billing,
    }.get(role)
    if own:
        return own
    if settings.database_url:
        return settings.database_url
    return embedded_postgres_url(settings.data_path("postgres"))


def _alive(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 1883), 0.5):
            return True
    except OSError:
        return False


def _broker_file(settings: Settings) -> Path:
    return settings.data_path("broker") / "broker.url"


def known_broker(settings: Settings) -> tuple[str, bool] | None:
    """(url, speaks_v5) of the configured broker or of a running embedded one."""
    if settings.mqtt_url:
        return settings.mqtt_url, True
    path = _broker_file(settings)
    if path.exists():
        url, _, v5 = path.read_text().strip().partition(" ")
        if _alive(url):
            return url, v5 == "v5"
    return None


@contextlib.contextmanager
def broker(settings: Settings) -> Iterator[tuple[str, bool]]:
    """Yield (url, speaks_v5): the configured or running broker, else one started for the block."""
    found = known_broker(settings)
    if found is not None:
        yield found
        return
    started: Broker = start_broker(settings.data_path("broker", "mosquitto"))
    path = _broker_file(settings)
    path.write_text(f"{started.url} {'v5' if started.v5 else 'v311'}")
    try:
        yield started.url, started.v5
    finally:
        started.stop()
        path.unlink(missing_ok=True)
