"""Tell a running ingest that ``devices sync`` changed the registry, within seconds.

Ingest resolves readings against an in-memory :class:`~ingest.channels.ChannelIndex`. Without a
signal it would keep a deactivated device or a channel's old unit until something unrelated made
it reload, silently storing 123.456 m3 as 0.123456. ``sync_registry`` therefore bumps the one-row
``registry_version`` table and sends ``NOTIFY aquameter_registry`` in its transaction; this
watch listens for that on a connection of its own and also polls the version every ``poll_s``.

Why both: a notify is instant but is lost while the listening connection is down (a notify goes
only to sessions listening at commit) and is not delivered at all through some proxies and
poolers. The version row is the truth; the notify only makes noticing it fast. Comparing versions
also means a sync missed during an outage is caught on reconnect.

The watch is a daemon thread that never raises: database outages are retried with a capped
backoff and logged once per outage, and a failing ``on_change`` is logged and retried at the next
poll (the version it failed for is not taken as seen), so a reload that hit a transient error is
not lost either.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import psycopg

from aquameter.backoff import Backoff
from ingest.registry_sync import REGISTRY_CHANNEL
from sql.connect import connect

log = logging.getLogger("aquameter.registry_watch")

CHANNEL = REGISTRY_CHANNEL

# How long one wait for a notify lasts: bounds how quickly ``stop()`` is noticed.
_SLICE_S = 0.5


class RegistryWatch:
    """Calls ``on_change()`` (from its own thread) when the registry version in the database
    changes: at once on ``NOTIFY aquameter_registry``, else at the next poll of
    ``registry_version`` (every ``poll_s``).

    ``listen=False`` polls only (for servers or poolers that do not deliver notifies, and to test
    the poll path). ``version`` is the last version seen, None until the first read.
    """

    def __init__(
        self,
        database_url: str,
        on_change: Callable[[], None],
        *,
        poll_s: float = 2.0,
        listen: bool = True,
        max_backoff_s: float = 10.0,
        ready_timeout_s: float = 5.0,
    ) -> None:
        if poll_s <= 0:
            raise ValueError("poll_s must be positive")
        self.database_url = database_url
        self.on_change = on_change
        self.poll_s = poll_s
        self.listen = listen
        self.max_backoff_s = max_backoff_s
        self.ready_timeout_s = ready_timeout_s
        self.version: int | None = None
        self.changes = 0  # on_change calls that returned normally
        self.reconnects = 0  # connections opened after the first one
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._has_table: bool | None = None  # None: not checked on this connection yet
        self._warned_no_table = False
        self._failed_for: int | None = None  # version whose on_change raised (logged once)
        self._baseline_taken = False
        self._outage_since: float | None = None  # monotonic start of the current outage
        self._backoff = Backoff(0.5, max_backoff_s)
        self._outage_before_baseline = False

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> RegistryWatch:
        """Start the thread and wait (at most ``ready_timeout_s``) until it listens and has read
        the current version, so that a sync committed after ``start()`` returns is seen as a
        change. A database that is down does not block: the thread keeps retrying."""
        if self._thread is not None:
            return self
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name="aquameter-registry-watch", daemon=True
        )
        self._thread.start()
        self._ready.wait(self.ready_timeout_s)
        return self

    def stop(self) -> None:
        """Stop the thread; returns within about half a second (a connect or query hanging on a
        dead network is left to its daemon thread after ``poll_s + 0.5`` s)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.poll_s + 0.5)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> RegistryWatch:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the thread ------------------------------------------------------------------------
    def _run(self) -> None:
        connected_before = False
        while not self._stop.is_set():
            try:
                conn = connect(self.database_url, autocommit=True, connect_timeout=5)
            except Exception as err:
                self._failed(err)
                self._ready.set()  # do not hold start() up while the database is down
                continue
            try:
                if connected_before:
                    self.reconnects += 1
                connected_before = True
                self._serve(conn)
            except Exception as err:
                self._failed(err)
            finally:
                try:
                    conn.close()
                except Exception:  # closing a broken connection must not end the watch
                    pass
        self._ready.set()

    def _failed(self, err: BaseException) -> None:
        """Note a failure, then wait the backoff (doubling, capped at ``max_backoff_s``)."""
        self._outage_since = self._outage(self._outage_since, err)
        self._stop.wait(self._backoff.failed())

    def _recovered(self) -> None:
        """Listening and the version read: the outage, if any, is over. Only here, not at
        connect, so a connection that opens and then fails at once stays one outage."""
        if self._outage_since is not None:
            log.info(
                "registry watch: database back after %.1f s", time.monotonic() - self._outage_since
            )
            self._outage_since = None
        self._backoff.succeeded()

    def _outage(self, since: float | None, err: BaseException) -> float:
        """Log the first failure of an outage as a warning, the rest at debug level."""
        if not self._baseline_taken:
            self._outage_before_baseline = True  # the caller's state may predate what we read
        if since is None:
            log.warning(
                "registry watch: database unreachable (%s: %s); retrying, registry changes are "
                "picked up on reconnect",
                type(err).__name__,
                str(err).strip(),
            )
            return time.monotonic()
        log.debug("registry watch: still unreachable: %s", err)
        return since

    def _serve(self, conn: psycopg.Connection) -> None:
        """Listen and poll on one connection until stopped or the connection fails (raises)."""
        self._has_table = None
        if self.listen:
            conn.execute(f"LISTEN {CHANNEL}")  # before the first read: no gap between the two
        self._check(conn, None, initial=True)
        self._recovered()
        self._ready.set()
        next_poll = time.monotonic() + self.poll_s
        while not self._stop.is_set():
            wait = max(0.0, min(_SLICE_S, next_poll - time.monotonic()))
            payload: str | None = None
            if self.listen:
                for notify in conn.notifies(timeout=wait, stop_after=1):
                    payload = notify.payload
            else:
                self._stop.wait(wait)
            if self._stop.is_set():
                return
            if payload is not None or time.monotonic() >= next_poll:
                self._check(conn, payload)
                next_poll = time.monotonic() + self.poll_s

    def _check(self, conn: psycopg.Connection, payload: str | None, initial: bool = False) -> None:
        """Read the version (the table, else a notify's payload) and react to a change.

        The first read on the first connection is the baseline: the caller loaded its state
        before starting the watch. Any later read that differs (on a notify, a poll, or after a
        reconnect, which covers notifies lost while disconnected) calls ``on_change``."""
        current = self._read_version(conn)
        if current is None and payload is not None:
            try:
                current = int(payload)
            except ValueError:  # a notify we cannot order: reload to be safe
                self._changed(None)
                return
        if current is None:
            return
        if initial and not self._baseline_taken and not self._outage_before_baseline:
            self._baseline_taken = True
            self.version = current
            return
        self._baseline_taken = True
        if current != self.version:
            self._changed(current)

    def _read_version(self, conn: psycopg.Connection) -> int | None:
        if self._has_table is not True:
            row = conn.execute("SELECT to_regclass('registry_version') IS NOT NULL").fetchone()
            self._has_table = bool(row and row[0])
            if not self._has_table:
                if not self._warned_no_table:
                    self._warned_no_table = True
                    log.warning(
                        "registry watch: table registry_version missing (database not migrated "
                        "to 0005: run `aquameter db migrate`); %s",
                        "relying on NOTIFY only" if self.listen else "registry changes unseen",
                    )
                return None
        row = conn.execute("SELECT version FROM registry_version").fetchone()
        return int(row[0]) if row else None

    def _changed(self, current: int | None) -> None:
        try:
            self.on_change()
        except Exception:  # the callback's failure must not end the watch; retried next poll
            if self._failed_for != current or current is None:
                log.exception("registry watch: on_change failed for registry version %s", current)
            else:
                log.debug("registry watch: on_change failed again for version %s", current)
            self._failed_for = current
            return
        self._failed_for = None
        self.changes += 1
        if current is not None:
            self.version = current
        log.info("registry watch: registry version %s taken", current)


__all__ = ["CHANNEL", "RegistryWatch"]
