"""One Prefect API for the analytics flows, started by Aquameter and stopped when it is done.

Why: without ``PREFECT_API_URL`` every Prefect process starts its own temporary API server and
gives up after 20 s, which on a loaded machine failed 3 runs in 4, left a server listening after
the process exited, wrote state to ``~/.prefect`` and logged telemetry errors when offline.

What this does instead (``prefect_api()``, a context manager):

* ``PREFECT_API_URL`` set (environment or active Prefect settings): that API is used as is.
* otherwise a local Prefect server (uvicorn on Prefect's app, a subprocess) is started on
  127.0.0.1 and a free port, with ``PREFECT_HOME`` under the Aquameter data dir, analytics and
  telemetry off, and a generous start timeout (``AQUAMETER_PREFECT_API_START_TIMEOUT_S``,
  default 120 s) ending in one clear error. A server recorded in the data dir that is alive and
  answers is reused instead (e.g. the one of a running ``aquameter flow serve``).

Every process using the local server holds a lease (a file named by its pid). On leaving the
context the last holder stops the server and waits until its port is closed; the server also
watches the leases itself and exits once no holder is alive, so a killed CLI leaves nothing
listening either. ``flow serve`` simply holds its lease for its lifetime.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aquameter.embedded import free_port, port_open

if TYPE_CHECKING:
    from aquameter.settings import Settings

DEFAULT_START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0
_SERVER_MODULE = "aquameter.prefect_api"

# Settings that keep Prefect quiet and local: no analytics or telemetry (offline hosts log an
# error per attempt otherwise), nothing written to ~/.prefect.
QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
    "DO_NOT_TRACK": "1",
}


class PrefectApiError(RuntimeError):
    """The Prefect API could not be started or reached; the message says what to do."""


@dataclass(frozen=True)
class PrefectApi:
    """The API the flows of this process talk to.

    url: ``http://127.0.0.1:PORT/api`` (or the external ``PREFECT_API_URL``).
    pid: the local server's process id; None for an external API.
    started: True when this process started the server (False: reused or external).
    home: the ``PREFECT_HOME`` in use (None for an external API).
    """

    url: str
    pid: int | None
    started: bool
    home: Path | None
    startup_s: float = 0.0


# Re-entrant use within one process: the outer context owns the lease, inner ones share it.
_lock = threading.Lock()
_depth = 0
_current: PrefectApi | None = None


def start_timeout_s(settings: Settings | None = None) -> float:
    """The start timeout: ``Settings.prefect_api_start_timeout_s`` when that field exists, else
    ``AQUAMETER_PREFECT_API_START_TIMEOUT_S``, else 120 s (a busy machine needs far more than
    Prefect's own 20 s)."""
    value = getattr(settings, "prefect_api_start_timeout_s", None) if settings else None
    if value is None:
        value = os.environ.get("AQUAMETER_PREFECT_API_START_TIMEOUT_S")
    return float(value) if value not in (None, "") else DEFAULT_START_TIMEOUT_S


def external_api_url() -> str | None:
    """``PREFECT_API_URL`` from the environment or, when Prefect is already imported, from its
    active settings (``prefect_test_harness`` and ``temporary_settings`` set it there)."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return url
    if "prefect.settings" in sys.modules:
        from prefect.settings import get_current_settings

        configured = get_current_settings().api.url
        return str(configured) if configured else None
    return None


@contextlib.contextmanager
def prefect_api(
    settings: Settings | None = None,
    *,
    services: bool = False,
    timeout_s: float | None = None,
    warmup: Callable[[], object] | None = None,
) -> Iterator[PrefectApi]:
    """Point Prefect at one API for the duration of the block (see the module docstring).

    ``services``: run Prefect's background services (scheduler, …) in the server, which
    ``flow serve`` needs for schedules; a one-off flow run does not, and starts faster without.
    ``warmup``: called while a new server starts (e.g. importing the flows), so the two
    ~3-second Python start-ups overlap on two cores instead of adding up.
    """
    global _depth, _current
    with _lock:
        if _depth > 0 and _current is not None:
            _depth += 1
            nested = _current
        else:
            nested = None
    if nested is not None:
        try:
            yield nested
        finally:
            with _lock:
                _depth -= 1
        return

    external = external_api_url()
    if external:
        api = PrefectApi(external, None, False, None)
        with _entered(api):
            yield api
        return

    if settings is None:
        from aquameter.settings import Settings

        settings = Settings()
    home = settings.data_path("prefect")
    server = _LocalServer(home, services=services)
    with _environment(home):
        timeout = timeout_s if timeout_s is not None else start_timeout_s(settings)
        api = server.acquire(timeout, warmup)
        try:
            with _api_settings(home, api.url), _entered(api):
                try:
                    yield api
                finally:
                    _drain_prefect_workers()
        finally:
            server.release()


def _drain_prefect_workers() -> None:
    """Send the logs and events Prefect still queues before the server goes away (otherwise
    they end in "Error logging to API" at interpreter exit)."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=10)


@contextlib.contextmanager
def _entered(api: PrefectApi) -> Iterator[None]:
    global _depth, _current
    with _lock:
        _depth, _current = 1, api
    try:
        yield
    finally:
        with _lock:
            _depth, _current = 0, None


@contextlib.contextmanager
def _environment(home: Path) -> Iterator[None]:
    """``PREFECT_HOME`` and the quiet settings in the environment, before Prefect is imported
    (it reads them once at import, and creates ``~/.prefect`` unless told otherwise)."""
    wanted = {"PREFECT_HOME": str(home), **QUIET_ENV}
    saved = {key: os.environ.get(key) for key in (*wanted, "PREFECT_API_URL")}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _api_settings(home: Path, url: str) -> Iterator[None]:
    """The API URL in the environment (for subprocesses: served flow runs) and in Prefect's
    settings (for this process, whose settings were read when Prefect was imported)."""
    # Import Prefect before PREFECT_API_URL is in the environment: its root settings are read
    # at import and would otherwise keep pointing at this server after it stopped.
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        temporary_settings,
    )

    os.environ["PREFECT_API_URL"] = url
    with temporary_settings(
        {PREFECT_API_URL: url, PREFECT_HOME: home, PREFECT_SERVER_ANALYTICS_ENABLED: False}
    ):
        yield


# --- the local server ---------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def _is_our_server(pid: int) -> bool:
    """Guard against a recycled pid: the process must be this module's server."""
    try:
        return _SERVER_MODULE.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return _pid_alive(pid)


def healthy(url: str, timeout_s: float = 5.0) -> bool:
    """Whether the API at ``url`` answers its health check."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as resp:  # noqa: S310
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _prefect_version() -> str:
    from importlib.metadata import version

    return version("prefect")


class _LocalServer:
    """The recorded server in ``home`` (``api.json``), its leases and its lock."""

    def __init__(self, home: Path, *, services: bool) -> None:
        self.home = home
        self.services = services
        self.record = home / "api.json"
        self.leases = home / "api-leases"
        self.lock_path = home / "api.lock"
        self.log_path = home / "api-server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.leases.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.lock_path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _lease(self) -> Path:
        return self.leases / str(os.getpid())

    def _other_live_leases(self) -> list[int]:
        live: list[int] = []
        for path in self.leases.iterdir():
            if not path.name.isdigit():
                continue
            pid = int(path.name)
            if pid == os.getpid():
                continue
            if _pid_alive(pid):
                live.append(pid)
            else:
                path.unlink(missing_ok=True)
        return live

    def _read_record(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.record.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def acquire(self, timeout_s: float, warmup: Callable[[], object] | None = None) -> PrefectApi:
        t0 = time.monotonic()
        with self._locked():
            self._lease().write_text(str(time.time()))
            try:
                rec = self._read_record()
                if rec is not None:
                    pid, url = int(rec["pid"]), str(rec["url"])
                    if _pid_alive(pid) and _is_our_server(pid) and healthy(url, 10.0):
                        if self.services and not rec.get("services"):
                            raise PrefectApiError(
                                f"the local Prefect API {url} (pid {pid}) runs without the "
                                "scheduler; end the `aquameter flow run` using it, or set "
                                "PREFECT_API_URL to a full Prefect server"
                            )
                        if warmup is not None:
                            warmup()
                        return PrefectApi(url, pid, False, self.home, time.monotonic() - t0)
                    self._stop_pid(pid)
                    self.record.unlink(missing_ok=True)
                pid, url = self._start(timeout_s, warmup)
                self.record.write_text(
                    json.dumps({"pid": pid, "url": url, "services": self.services,
                                "owner": os.getpid(), "prefect": _prefect_version()})
                )  # fmt: skip
                return PrefectApi(url, pid, True, self.home, time.monotonic() - t0)
            except BaseException:
                self._lease().unlink(missing_ok=True)
                raise

    def release(self) -> None:
        """Drop this process's lease; the last holder stops the server and waits until its
        port is closed."""
        with self._locked():
            self._lease().unlink(missing_ok=True)
            if self._other_live_leases():
                return
            rec = self._read_record()
            if rec is not None:
                self._stop_pid(int(rec["pid"]), port=_port_of(str(rec["url"])))
                self.record.unlink(missing_ok=True)
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(1.0)

    def _stop_pid(self, pid: int, port: int | None = None) -> None:
        if self.process is not None and self.process.pid == pid:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5.0)
        elif _pid_alive(pid) and _is_our_server(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if port is not None:
            deadline = time.monotonic() + 5.0
            while port_open(port) and time.monotonic() < deadline:
                time.sleep(0.1)

    def _start(
        self, timeout_s: float, warmup: Callable[[], object] | None = None
    ) -> tuple[int, str]:
        version = _prefect_version()
        blocks_marker = self.home / f"api-blocks-registered-{version}"
        env = {
            **os.environ,
            **QUIET_ENV,
            "PREFECT_HOME": str(self.home),
            # Block types are registered once per Prefect version; checking them costs ~4 s.
            "PREFECT_API_BLOCKS_REGISTER_ON_START": "false" if blocks_marker.exists() else "true",
        }
        env.pop("PREFECT_API_URL", None)
        if not self.services:
            env.update({"PREFECT__SERVER_EPHEMERAL": "1", "PREFECT_UI_ENABLED": "false"})
        deadline = time.monotonic() + timeout_s
        for _attempt in range(3):
            port = free_port()
            url = f"http://127.0.0.1:{port}/api"
            with open(self.log_path, "wb") as log:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", _SERVER_MODULE, "--port", str(port),
                     "--leases", str(self.leases)],
                    env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True,  # Ctrl-C reaches the CLI, which stops the server
                )  # fmt: skip
            proc = self.process
            if warmup is not None:
                warmup()
                warmup = None
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    break
                if healthy(url, 2.0):
                    blocks_marker.touch()
                    return proc.pid, url
                time.sleep(0.05)  # an answer is seen within 50 ms, not 200
            if proc.poll() is None:  # timed out
                self._stop_pid(proc.pid)
                raise PrefectApiError(
                    f"the local Prefect API did not answer on {url} within {timeout_s:.0f} s "
                    f"(log: {self.log_path}); raise AQUAMETER_PREFECT_API_START_TIMEOUT_S or "
                    "set PREFECT_API_URL to a running Prefect server"
                )
            if b"address already in use" not in self._log_tail().lower():
                break
        code = self.process.returncode if self.process else "?"
        raise PrefectApiError(
            f"the local Prefect API exited with code {code} "
            f"while starting: {self._log_tail().decode(errors='replace').strip()[-300:]} "
            f"(log: {self.log_path})"
        )

    def _log_tail(self) -> bytes:
        try:
            return self.log_path.read_bytes()[-4000:]
        except OSError:
            return b""


def _port_of(url: str) -> int | None:
    from urllib.parse import urlparse

    return urlparse(url).port


# --- the server process -------------------------------------------------------------------------


def _watch_leases(leases: Path, grace_s: float = 2.0) -> None:
    """Exit once no lease holder is alive (its CLI was killed, or forgot to stop us)."""
    idle_since: float | None = None
    while True:
        time.sleep(0.5)
        alive = any(
            p.name.isdigit() and _pid_alive(int(p.name)) for p in leases.iterdir()
        ) if leases.exists() else False  # fmt: skip
        if alive:
            idle_since = None
            continue
        idle_since = idle_since or time.monotonic()
        if time.monotonic() - idle_since >= grace_s:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(STOP_TIMEOUT_S)
            os._exit(1)


def _serve(argv: list[str]) -> None:
    """``python -m aquameter.prefect_api --port N --leases DIR``: Prefect's API app on uvicorn."""
    import argparse

    parser = argparse.ArgumentParser(prog=_SERVER_MODULE)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--leases", type=Path, required=True)
    args = parser.parse_args(argv)
    threading.Thread(target=_watch_leases, args=(args.leases,), daemon=True).start()
    import uvicorn

    uvicorn.run(
        "prefect.server.api.server:create_app",
        factory=True,
        host="127.0.0.1",
        port=args.port,
        log_level="error",
        lifespan="on",
    )


if __name__ == "__main__":
    _serve(sys.argv[1:])
