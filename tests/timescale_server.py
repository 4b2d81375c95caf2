"""A TimescaleDB for tests: the configured one when ``AQUAMETER_TIMESCALE_URL`` is set, else the
PGlite WASM build served over the wire by ``tsdb/serve.mjs`` (see tsdb/README.md).

The served one is a single backend session shared by every connection: clients turn server-side
prepared statements off (``prepare_threshold=None``, or ``AQUAMETER_DATABASE_PREPARE=false`` for
code that uses sql.connect) and keep at most one transaction open at a time.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

ROOT = Path(__file__).resolve().parent.parent
TSDB_DIR = ROOT / "tsdb"
URL_ENV = "AQUAMETER_TIMESCALE_URL"


class TimescaleUnavailable(RuntimeError):
    """Node/npm are missing or the packages did not install: the caller skips with this reason."""


def ensure_packages(timeout: float = 300.0) -> None:
    """``npm ci`` in tsdb/ when its node_modules is missing (the lock file pins every package)."""
    if (TSDB_DIR / "node_modules" / "@electric-sql" / "pglite" / "package.json").exists():
        return
    npm = shutil.which("npm")
    if shutil.which("node") is None or npm is None:
        raise TimescaleUnavailable("node/npm not on PATH: cannot serve the PGlite TimescaleDB")
    try:
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=TSDB_DIR,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as err:
        raise TimescaleUnavailable(f"npm ci in tsdb/ took over {timeout:.0f}s") from err
    if done.returncode != 0:
        raise TimescaleUnavailable(f"npm ci in tsdb/ failed: {done.stderr.strip()[-500:]}")


@dataclass
class TimescaleServer:
    url: str
    process: subprocess.Popen[str]

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (the server flushes its data dir and exits), SIGKILL after ``timeout``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return int(self.process.returncode)


def start_server(data_dir: Path | None = None, timeout: float = 60.0) -> TimescaleServer:
    """Start ``tsdb/serve.mjs`` on a free loopback port and wait for its READY line.

    ``data_dir`` None keeps the database in memory.
    """
    ensure_packages()
    node = shutil.which("node")
    if node is None:
        raise TimescaleUnavailable("node not on PATH")
    data = "memory://" if data_dir is None else str(data_dir)
    proc = subprocess.Popen(
        [node, str(TSDB_DIR / "serve.mjs"), "--port", "0", "--data", data],
        cwd=TSDB_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:  # readline blocks: read in a thread so that the wait has a deadline
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.startswith("READY "):
                ready.set()
                return
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(timeout) or not lines or not lines[-1].startswith("READY "):
        server = TimescaleServer("", proc)
        server.stop()
        raise RuntimeError("tsdb/serve.mjs did not start:\n" + "\n".join(lines[-20:]))
    return TimescaleServer(lines[-1].split(" ", 1)[1], proc)


def connect(url: str, *, autocommit: bool = False) -> psycopg.Connection:
    """A connection that works on the shared-session server (no named prepared statements)."""
    return psycopg.connect(url, autocommit=autocommit, prepare_threshold=None)


def fresh_database(url: str) -> tuple[str, str | None]:
    """A new empty database on a real TimescaleDB server: (its URL, its name). On the PGlite
    server, where every connection lands in the one database the backend has open whatever it
    asks for, or where the role may not create databases: (``url`` itself, None)."""
    name = f"aqt_ts_{uuid.uuid4().hex[:10]}"
    try:
        with connect(url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    except psycopg.errors.InsufficientPrivilege:
        return url, None
    params = conninfo_to_dict(url)
    params["dbname"] = name
    candidate = make_conninfo(**params)  # type: ignore[arg-type]
    with connect(candidate) as conn:
        row = conn.execute("SELECT current_database()").fetchone()
    if row == (name,):
        return candidate, name
    drop_database(url, name)
    return url, None


def drop_database(url: str, name: str) -> None:
    with connect(url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


@dataclass
class TimescaleTarget:
    """Where the tests' TimescaleDB is. ``server`` is set when it is our PGlite server (started
    here, with its data in ``data_dir``), which :meth:`restart` can stop and start again."""

    url: str
    server: TimescaleServer | None = None
    data_dir: Path | None = None

    def restart(self) -> None:
        assert self.server is not None, "only the PGlite server started here can be restarted"
        self.server.stop()
        self.server = start_server(self.data_dir)
        self.url = self.server.url


def timescale_target(data_dir: Path) -> Iterator[TimescaleTarget]:
    """Yield a TimescaleDB to test against, and clean up after it.

    ``$AQUAMETER_TIMESCALE_URL`` when set (a fresh database on it where the server can make one,
    dropped afterwards; else the database must be empty), otherwise a PGlite server started here
    with its data in ``data_dir``. Raises TimescaleUnavailable when node/npm cannot serve one.
    """
    url = os.environ.get(URL_ENV)
    if url:
        db_url, created = fresh_database(url)
        try:
            yield TimescaleTarget(db_url)
        finally:
            if created is not None:
                drop_database(url, created)
        return
    server = start_server(data_dir)
    target = TimescaleTarget(server.url, server, data_dir)
    try:
        yield target
    finally:
        if target.server is not None:
            target.server.stop()
