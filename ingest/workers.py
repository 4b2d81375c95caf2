"""Several MQTT ingest worker *processes* on one MQTT v5 shared subscription.

One Python process tops out near 10k MQTT messages/s at one reading per message: paho's
per-message work runs under one GIL. The design scales out instead of up: N worker processes
join the same share group (``$share/{group}/…``), the broker spreads the messages over their
sessions, and each worker is a complete ingest of its own (its own :class:`IngestPipeline` with
its own database connection and writer thread, its own :class:`MqttIngest`), acknowledging only
what *it* committed. ``ON CONFLICT DO NOTHING`` keeps a redelivery from storing anything twice.

Worker ``k`` always uses the client id ``{mqtt_client_id}-{k}``: its persistent session, and with
it the QoS 1 messages the broker sent it but never got a PUBACK for and those the broker keeps
routing to it while it is down, come back when the worker (or its replacement after a crash)
reconnects under the same id. A random id would strand those messages in an orphaned session
until it expires. The same reason makes lowering N a deliberate act: the sessions of the indexes
no longer run still hold their queued messages (run them once more to drain, or they are dropped
when ``mqtt_session_expiry_s`` runs out).

The parent (:class:`MqttWorkers`) starts the workers, restarts one that dies with exponential
backoff (counted), gathers their counters for one combined line, and stops them with SIGTERM, on
which a worker stops reading, lets its pipeline commit what it holds, sends the PUBACKs, and
disconnects cleanly.

A worker that is dead inside exits instead of looking healthy: each report tick it asks
:func:`ingest.service.ingest_problem` whether paho's network thread still runs and whether its
pipeline reported ``failure``. On a problem it sends a ``failed`` report (not connected, the
problem named), stops as cleanly as it still can, and exits with :data:`EXIT_UNHEALTHY`; the
parent then counts and restarts it with the same backoff as a crash, and shows the problem in
:meth:`MqttWorkers.line` and :meth:`MqttWorkers.rows` meanwhile.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing import connection
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as MpEvent
from types import FrameType
from typing import Literal

from aquameter.backoff import backoff_delay
from aquameter.logs import setup_logging
from aquameter.settings import Settings
from ingest.counters import IngestCounters
from ingest.pipeline import pipeline_from_settings
from ingest.service import ingest_problem, mqtt_client
from protocols.mqtt import MqttIngest

log = logging.getLogger("aquameter.ingest.workers")

# Spawn, not fork: the parent may hold threads (paho, the writer, asyncio executors) and open
# sockets, which a forked child would inherit in whatever state they were in.
_CTX = mp.get_context("spawn")

COUNTER_FIELDS = ("frames", "readings_received", "stored", "duplicates", "batches", "db_errors")
MQTT_FIELDS = (
    "messages",
    "acked",
    "ignored_topics",
    "errors",
    "unprocessable",
    "connects",
    "disconnects",
    "catch_up",
    "catch_up_skipped",
    "fences",
    "resubscribes",
)

WorkerState = Literal["held", "running", "stopping", "stopped", "failed"]

# Exit status of a worker that found itself unable to ingest (dead MQTT thread, failed pipeline).
EXIT_UNHEALTHY = 3

# How long a failed worker waits for its pipeline to drain before exiting anyway: a pipeline
# whose writer gave up may never empty its queue.
FAILED_DRAIN_S = 15.0


def effective_workers(requested: int, *, v5: bool, shared_group: str | None) -> int:
    """How many MQTT workers can actually run: N > 1 only works on an MQTT v5 shared
    subscription. Without one every worker would get every message (N-fold work, and N sessions
    to keep), so fall back to the single in-process subscriber and say so."""
    if requested <= 1:
        return 1
    if not v5:
        log.warning(
            "--mqtt-workers %d needs MQTT v5 shared subscriptions; this broker speaks MQTT "
            "3.1.1 only (e.g. the embedded amqtt): running 1 worker",
            requested,
        )
        return 1
    if not shared_group:
        log.warning(
            "--mqtt-workers %d needs a shared-subscription group (AQUAMETER_MQTT_SHARED_GROUP "
            "is empty): running 1 worker",
            requested,
        )
        return 1
    return requested


def worker_client_id(base: str, index: int) -> str:
    """Stable per index, so a restarted worker resumes its own persistent session."""
    return f"{base}-{index}"


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """Everything a spawned worker needs, picklable (the child starts from a fresh interpreter)."""

    index: int
    incarnation: int
    settings: Settings
    database_url: str
    broker_url: str
    vendor_formats: dict[str, str]
    report_every_s: float
    log_level: int


@dataclass(frozen=True, slots=True)
class WorkerReport:
    """A worker's cumulative counters since it started (one incarnation), sent to the parent.

    Cumulative rather than deltas, so a lost or late report never skews the totals; a worker
    killed outright contributes what its last report said. ``connected`` is true only while
    paho's network thread runs and the subscription stands; ``problem`` names what made a
    ``failed`` worker give up."""

    index: int
    incarnation: int
    pid: int
    state: WorkerState
    connected: bool
    counters: dict[str, int]
    quarantined: dict[str, int]
    mqtt: dict[str, int]
    problem: str | None = None
    quarantine_repeats: dict[str, int] = field(default_factory=dict)


def _ints(snapshot: dict[str, object]) -> dict[str, int]:
    out: dict[str, int] = {}
    for k in COUNTER_FIELDS:
        v = snapshot[k]
        assert isinstance(v, int)
        out[k] = v
    return out


def _report(
    config: WorkerConfig,
    state: WorkerState,
    counters: IngestCounters,
    client: MqttIngest | None,
    problem: str | None = None,
) -> WorkerReport:
    snap = counters.snapshot()
    quarantined = snap["quarantined"]
    repeats = snap["quarantine_repeats"]
    assert isinstance(quarantined, dict) and isinstance(repeats, dict)
    return WorkerReport(
        index=config.index,
        incarnation=config.incarnation,
        pid=os.getpid(),
        state=state,
        connected=client is not None and client.alive() and client.connected.is_set(),
        counters=_ints(snap),
        quarantined={str(k): int(v) for k, v in quarantined.items()},
        mqtt={k: int(getattr(client.stats, k)) if client else 0 for k in MQTT_FIELDS},
        problem=problem,
        quarantine_repeats={str(k): int(v) for k, v in repeats.items()},
    )


def _send(conn: Connection, report: WorkerReport) -> None:
    try:
        conn.send(report)
    except (OSError, ValueError):  # the parent is gone; the worker still stops cleanly
        pass


def worker_main(config: WorkerConfig, conn: Connection, gate: MpEvent) -> None:
    """One worker process: pipeline + MQTT session until SIGTERM, then a clean stop.

    The stop order is what keeps it exact: first stop reading (no new messages enter), then let
    the pipeline commit everything it holds (its ``on_durable`` callbacks send the PUBACKs), then
    flush those and DISCONNECT. Whatever was read but not committed is simply never acknowledged
    and comes back to this session next time.

    Each report tick also checks health (:func:`ingest.service.ingest_problem`): a dead paho
    thread or a failed pipeline ends the worker with :data:`EXIT_UNHEALTHY`, so the parent
    restarts it rather than showing a worker that reads nothing as healthy.
    """
    stop = threading.Event()
    parent = os.getppid()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # Installed first: a SIGTERM during start-up must also end in a clean stop.
    signal.signal(signal.SIGTERM, on_signal)
    # Ctrl-C reaches the whole process group, but the parent owns the stop: it turns its SIGINT
    # into a SIGTERM for every worker. Stopping on our own copy would race its supervisor, which
    # would see a worker exit while it is not yet stopping and start a replacement.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A spawned child starts with bare logging: the same format as its parent (text or JSON
    # lines, Settings.log_format), its parent's level, each record tagged with the worker.
    setup_logging(fmt=config.settings.log_format, level=config.log_level, tag=f"w{config.index}")
    s = config.settings
    pipeline = pipeline_from_settings(config.database_url, s).start()
    client: MqttIngest | None = None
    problem: str | None = None
    try:
        _send(conn, _report(config, "held", pipeline.counters, None))
        while not gate.wait(0.05):
            if stop.is_set() or os.getppid() != parent:
                return
        if stop.is_set():
            return
        client_id = worker_client_id(s.mqtt_client_id, config.index)
        client = mqtt_client(
            s, config.vendor_formats, pipeline, config.broker_url, True, client_id
        ).start()
        _send(conn, _report(config, "running", pipeline.counters, client))
        while not stop.wait(config.report_every_s):
            if os.getppid() != parent:
                # The parent died without stopping us (SIGKILL, OOM): an orphan would fight its
                # replacement for the same client id, so stop cleanly instead.
                log.warning("MQTT worker %d: parent process is gone; stopping", config.index)
                break
            problem = ingest_problem(pipeline, client)
            if problem is not None:
                log.error(
                    "MQTT worker %d: %s; exiting with status %d so it is restarted",
                    config.index,
                    problem,
                    EXIT_UNHEALTHY,
                )
                _send(conn, _report(config, "failed", pipeline.counters, client, problem))
                break
            _send(conn, _report(config, "running", pipeline.counters, client))
    finally:
        if client is not None:

            def drain() -> None:
                state: WorkerState = "failed" if problem else "stopping"
                _send(conn, _report(config, state, pipeline.counters, client, problem))
                # A failed writer may never drain: close() waits at most its timeout, and what
                # is not committed by then is not acknowledged (redelivered after the restart).
                pipeline.close(60.0 if problem is None else FAILED_DRAIN_S)

            # Stop reading, commit and acknowledge what was read, DISCONNECT: the broker keeps
            # the session for the restart and redelivers nothing that was stored.
            client.shutdown(drain)
        else:
            pipeline.close()
        final: WorkerState = "failed" if problem else "stopped"
        _send(conn, _report(config, final, pipeline.counters, client, problem))
        conn.close()
    if problem is not None:
        sys.exit(EXIT_UNHEALTHY)


@dataclass
class WorkerRow:
    """One worker's line in the parent's table: totals over all its incarnations."""

    index: int
    pid: int | None
    alive: bool
    connected: bool
    healthy: bool  # alive, and its current incarnation has not reported a problem
    problem: str | None  # the current incarnation's problem, else the last one that restarted
    restarts: int
    last_exitcode: int | None
    counters: dict[str, int]
    quarantined: dict[str, int]
    mqtt: dict[str, int]
    quarantine_repeats: dict[str, int] = field(default_factory=dict)


@dataclass
class _Slot:
    index: int
    incarnation: int = 0
    process: BaseProcess | None = None
    conn: Connection | None = None
    started_at: float = 0.0
    restarts: int = 0
    failures_in_a_row: int = 0
    restart_at: float | None = None
    last_exitcode: int | None = None
    reports: dict[int, WorkerReport] = field(default_factory=dict)


class MqttWorkers:
    """Runs and supervises N MQTT ingest worker processes (see the module docstring).

    ``hold=True`` starts the workers up to the point of connecting (interpreter, imports,
    pipeline and channel index ready) and keeps them there until :meth:`release`, so that all
    sessions begin consuming at the same moment: a benchmark measures ingest, not process
    start-up, and one worker does not drain a shared backlog alone while another is importing.
    """

    def __init__(
        self,
        settings: Settings,
        database_url: str,
        broker_url: str,
        vendor_formats: dict[str, str],
        workers: int,
        *,
        report_every_s: float = 1.0,
        restart_min_s: float = 1.0,
        restart_max_s: float = 30.0,
        stable_after_s: float = 30.0,
        stop_timeout_s: float = 90.0,
        hold: bool = False,
        log_level: int | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.settings = settings
        self.database_url = database_url
        self.broker_url = broker_url
        self.vendor_formats = dict(vendor_formats)
        self.report_every_s = report_every_s
        self.restart_min_s = restart_min_s
        self.restart_max_s = restart_max_s
        self.stable_after_s = stable_after_s
        self.stop_timeout_s = stop_timeout_s
        self.log_level = logging.getLogger().getEffectiveLevel() if log_level is None else log_level
        self._slots = [_Slot(k) for k in range(workers)]
        self._gate = _CTX.Event()
        if not hold:
            self._gate.set()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> MqttWorkers:
        with self._lock:
            for slot in self._slots:
                self._spawn(slot)
        self._thread = threading.Thread(target=self._supervise, name="mqtt-workers", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Let held workers connect (no-op unless constructed with ``hold=True``)."""
        self._gate.set()

    def stop(self, timeout_s: float | None = None) -> None:
        """SIGTERM every worker and wait for their clean stop; SIGKILL only what overstays.

        The default timeout outlasts a worker's own drain (its pipeline waits up to 60 s for a
        database that is away), because a killed worker's uncommitted messages are redelivered
        later rather than lost, but a clean stop is cheaper."""
        timeout = self.stop_timeout_s if timeout_s is None else timeout_s
        with self._lock:  # the supervisor reaps under this lock: no signal to a reaped pid
            self._stopping = True
            for slot in self._slots:
                slot.restart_at = None
                if slot.process is not None and slot.process.is_alive():
                    slot.process.terminate()
        thread = self._thread
        if thread is None:
            return
        thread.join(timeout)  # it returns once every worker has exited and been read
        if thread.is_alive():
            with self._lock:
                for slot in self._slots:
                    if slot.process is not None and slot.process.is_alive():
                        log.warning(
                            "MQTT worker %d (pid %s) did not stop in %.0fs; killing it",
                            slot.index,
                            slot.process.pid,
                            timeout,
                        )
                        slot.process.kill()
            thread.join()
        self._thread = None

    def __enter__(self) -> MqttWorkers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what the parent shows -------------------------------------------------------------
    def rows(self) -> list[WorkerRow]:
        with self._lock:
            return [self._row(slot) for slot in self._slots]

    def counters(self, plus: IngestCounters | None = None) -> IngestCounters:
        """All workers' counters (all incarnations) summed, plus ``plus`` (the parent's own
        pipeline for the non-MQTT adapters), as one :class:`IngestCounters`."""
        total = IngestCounters()
        for row in self.rows():
            total.add(**row.counters)
            total.add_quarantined(row.quarantined)
            total.add_quarantine_repeats(row.quarantine_repeats)
        if plus is not None:
            snap = plus.snapshot()
            total.add(**_ints(snap))
            q = snap["quarantined"]
            repeats = snap["quarantine_repeats"]
            assert isinstance(q, dict) and isinstance(repeats, dict)
            total.add_quarantined(q)
            total.add_quarantine_repeats(repeats)
        return total

    def mqtt_totals(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for row in self.rows():
            total.update(row.mqtt)
        return {k: total[k] for k in MQTT_FIELDS}

    def restarts(self) -> int:
        return sum(row.restarts for row in self.rows())

    def pid(self, index: int) -> int | None:
        with self._lock:
            p = self._slots[index].process
            return p.pid if p is not None and p.is_alive() else None

    def line(self, plus: IngestCounters | None = None) -> str:
        rows = self.rows()
        mq = self.mqtt_totals()
        healthy = sum(r.healthy for r in rows)
        line = (
            f"{self.counters(plus).line()} | mqtt workers={healthy}/{len(rows)} "
            f"messages={mq['messages']} acked={mq['acked']} restarts={self.restarts()}"
        )
        if mq["errors"] or mq["unprocessable"]:
            line += f" errors={mq['errors']} unprocessable={mq['unprocessable']}"
        down = [
            f"w{r.index}: {r.problem or ('down' if not r.alive else 'starting')}"
            for r in rows
            if not r.healthy
        ]
        if down:
            line += " | unhealthy " + "; ".join(down)
        return line

    def wait_all(
        self, state: Literal["held", "running", "stopping", "connected"], timeout_s: float
    ) -> bool:
        """Wait until every worker's current incarnation is ``held`` at the gate, ``running``,
        ``stopping`` (reading no more, draining), or ``connected`` (subscribed): tests and
        benchmarks must not publish before the shared subscription exists, or the broker drops
        those messages."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                if all(self._satisfies(s, state) for s in self._slots):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)

    # --- internals -------------------------------------------------------------------------
    @staticmethod
    def _satisfies(slot: _Slot, what: str) -> bool:
        report = slot.reports.get(slot.incarnation)
        if report is None or slot.process is None or not slot.process.is_alive():
            return False
        if what == "connected":
            return report.connected
        return report.state == what

    def _row(self, slot: _Slot) -> WorkerRow:
        counters: Counter[str] = Counter()
        quarantined: Counter[str] = Counter()
        repeats: Counter[str] = Counter()
        mq: Counter[str] = Counter()
        for r in slot.reports.values():
            counters.update(r.counters)
            quarantined.update(r.quarantined)
            repeats.update(r.quarantine_repeats)
            mq.update(r.mqtt)
        alive = slot.process is not None and slot.process.is_alive()
        current = slot.reports.get(slot.incarnation)
        failed = current is not None and (current.state == "failed" or current.problem is not None)
        problems = [r.problem for _, r in sorted(slot.reports.items()) if r.problem]
        return WorkerRow(
            index=slot.index,
            pid=slot.process.pid if alive and slot.process is not None else None,
            alive=alive,
            connected=bool(alive and current is not None and current.connected),
            healthy=alive and not failed,
            problem=problems[-1] if problems else None,
            restarts=slot.restarts,
            last_exitcode=slot.last_exitcode,
            counters={k: counters[k] for k in COUNTER_FIELDS},
            quarantined=dict(quarantined),
            mqtt={k: mq[k] for k in MQTT_FIELDS},
            quarantine_repeats=dict(repeats),
        )

    def _spawn(self, slot: _Slot) -> None:
        """Start (or restart) a slot's worker; call with the lock held."""
        slot.incarnation += 1
        config = WorkerConfig(
            index=slot.index,
            incarnation=slot.incarnation,
            settings=self.settings,
            database_url=self.database_url,
            broker_url=self.broker_url,
            vendor_formats=self.vendor_formats,
            report_every_s=self.report_every_s,
            log_level=self.log_level,
        )
        # One pipe per worker rather than one shared Queue: a worker killed while holding a
        # Queue's shared write lock would silence every other worker's reports for good.
        reader, writer = _CTX.Pipe(duplex=False)
        process = _CTX.Process(
            target=worker_main,
            args=(config, writer, self._gate),
            name=f"aquameter-mqtt-{slot.index}",
            daemon=False,
        )
        process.start()
        writer.close()  # the child's copy remains: EOF on our end then means the child is gone
        slot.process = process
        slot.conn = reader
        slot.started_at = time.monotonic()
        slot.restart_at = None
        log.info("MQTT worker %d started (pid %s)", slot.index, process.pid)

    def _drain(self, slot: _Slot) -> None:
        """Read every report waiting in a slot's pipe; close it at EOF (the worker exited).

        A report is far below PIPE_BUF, so the pipe holds whole reports only, even from a
        worker killed while sending: ``recv`` after ``poll`` never waits for a missing tail."""
        conn = slot.conn
        if conn is None:
            return
        try:
            while conn.poll():
                report = conn.recv()
                if isinstance(report, WorkerReport):
                    slot.reports[report.incarnation] = report
        except (EOFError, OSError):
            conn.close()
            slot.conn = None
        except Exception:  # a garbled message from a worker killed mid-send
            log.exception("unreadable report from MQTT worker %d", slot.index)
            conn.close()
            slot.conn = None

    def _reap(self, slot: _Slot) -> None:
        """A worker exited: keep its last counters, and schedule a restart unless stopping."""
        process = slot.process
        assert process is not None
        process.join()
        self._drain(slot)
        if slot.conn is not None:
            slot.conn.close()
            slot.conn = None
        slot.process = None
        slot.last_exitcode = process.exitcode
        if self._stopping:
            return
        lived = time.monotonic() - slot.started_at
        slot.failures_in_a_row = 1 if lived >= self.stable_after_s else slot.failures_in_a_row + 1
        delay = backoff_delay(slot.failures_in_a_row, self.restart_min_s, self.restart_max_s)
        slot.restart_at = time.monotonic() + delay
        last = slot.reports.get(slot.incarnation)
        why = f" ({last.problem})" if last is not None and last.problem else ""
        log.warning(
            "MQTT worker %d (pid %s) exited with %s%s after %.1fs; restarting in %.1fs",
            slot.index,
            process.pid,
            process.exitcode,
            why,
            lived,
            delay,
        )

    def _supervise(self) -> None:
        """The parent's one thread: read reports, reap exits, restart when a backoff is due."""
        while True:
            with self._lock:
                conns = {s.conn: s for s in self._slots if s.conn is not None}
                sentinels = {s.process.sentinel: s for s in self._slots if s.process is not None}
                if self._stopping and not sentinels:
                    for slot in self._slots:
                        self._drain(slot)
                    self._changed.notify_all()
                    return
            if conns or sentinels:
                ready = connection.wait([*conns, *sentinels], timeout=0.1)
            else:  # every worker is waiting out its restart backoff
                time.sleep(0.1)
                ready = []
            with self._lock:
                for obj in ready:
                    if isinstance(obj, Connection):
                        self._drain(conns[obj])
                for obj in ready:
                    if isinstance(obj, int):
                        slot = sentinels[obj]
                        if slot.process is not None and not slot.process.is_alive():
                            self._reap(slot)
                now = time.monotonic()
                for slot in self._slots:
                    due = slot.restart_at is not None and now >= slot.restart_at
                    if due and slot.process is None and not self._stopping:
                        slot.restarts += 1
                        try:
                            self._spawn(slot)
                        except Exception:  # e.g. out of file descriptors: try again later
                            log.exception("could not restart MQTT worker %d", slot.index)
                            slot.failures_in_a_row += 1
                            slot.restart_at = now + backoff_delay(
                                slot.failures_in_a_row, self.restart_min_s, self.restart_max_s
                            )
                self._changed.notify_all()
