"""Resolving the servers a command talks to: configured URLs, else embedded ones.

An embedded broker started by one command records its URL in the data dir, so that a second
command (``aquameter simulate fleet`` next to ``aquameter ingest``) finds the same broker.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import uuid
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


def speaks_mqtt5(url: str, timeout_s: float = 5.0) -> bool:
    """Whether the broker at ``url`` accepts MQTT v5, asked with one v5 CONNECT.

    The probe sends no credentials: a v5 broker answers any CONNECT with a v5 CONNACK (success,
    or a refusal such as "not authorized", both with a properties field), a 3.1.1-only broker
    (amqtt, many utilities' brokers) with a 3.1.1 CONNACK "unacceptable protocol version"
    (remaining length 2) or by closing the connection. A broker that cannot be asked (down,
    TLS with a client certificate required) is taken to speak v5, as before this probe: the
    adapter then reports the real failure when it connects."""
    parsed = urlparse(url)
    tls = parsed.scheme in ("mqtts", "ssl")
    host = parsed.hostname or "127.0.0.1"
    port = parsed.port or (8883 if tls else 1883)
    client_id = f"aquameter-probe-{uuid.uuid4().hex[:12]}".encode()
    body = b"\x00\x04MQTT\x05\x02" + struct.pack(">H", 10) + b"\x00"  # v5, clean start
    body += struct.pack(">H", len(client_id)) + client_id
    connect = b"\x10" + bytes([len(body)]) + body
    try:
        with socket.create_connection((host, port), timeout_s) as raw:
            sock: socket.socket = raw
            if tls:
                # Only this probe: it carries no secret, so it need not verify the broker.
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                sock = context.wrap_socket(raw, server_hostname=host)
            sock.settimeout(timeout_s)
            sock.sendall(connect)
            answer = b""
            while len(answer) < 2:
                chunk = sock.recv(2 - len(answer))
                if not chunk:
                    return False  # closed on a v5 CONNECT: not a v5 broker
                answer += chunk
            if answer[0] >> 4 != 2:
                return True  # not a CONNACK: nothing we can conclude
            v5 = answer[1] >= 3  # v5 CONNACK: flags, reason code, properties
            with contextlib.suppress(OSError):
                sock.sendall(b"\xe0\x00")  # DISCONNECT
            return v5
    except OSError:
        return True


def known_broker(settings: Settings) -> tuple[str, bool] | None:
    """(url, speaks_v5) of the configured broker (asked: many utilities run 3.1.1 brokers) or
    of a running embedded one (as recorded when it started)."""
    if settings.mqtt_url:
        return settings.mqtt_url, speaks_mqtt5(settings.mqtt_url)
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
