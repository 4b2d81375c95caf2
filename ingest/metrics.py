"""Prometheus exporter of a running ingest process: ``/metrics``, ``/healthz``, ``/readyz``.

Why a collector that reads the live objects at scrape time rather than counters bumped on the
hot path: the pipeline, the MQTT adapter and the worker supervisor already keep exact counters
(``IngestCounters``, ``MqttStats``, worker reports); copying them into Prometheus objects would
add a lock per frame and a second truth that could drift. The one thing only the writer thread
sees, how long a batch takes to commit, comes through the pipeline's ``on_commit`` hook into a
real histogram.

Every exporter has its own :class:`~prometheus_client.CollectorRegistry` (no global state): a
test process can run several pipelines, each with its exporter, on different ports.

Probes:

- ``/healthz``: 200 while this process's threads live (the pipeline's writer runs and has not
  given up, paho's network thread runs); 503 with a one-line reason otherwise. A failing liveness
  probe means "restart me": it does not look at the database or the broker, whose outages the
  process rides out by itself (back-pressure, reconnects).
- ``/readyz``: 200 when the database answers ``SELECT 1`` (checked at most every few seconds,
  with a short timeout, the result cached) and the broker connection is up (the MQTT
  subscription stands, or every MQTT worker process reports connected); 503 with the reasons.

Flow series, read from the database at scrape time (cached ``flows_every_s``). Why here: flows
have no long-running process of their own (``flow run`` is one-off; ``flow serve`` runs each in
a subprocess), every run records its outcome in ``flow_runs`` (``flows.runner.run_flow``), and
the ingest exporter is the endpoint operators already scrape; a textfile would need a node
exporter and would say nothing about runs made on another host.

- ``aquameter_flow_last_success_timestamp_seconds{flow}``: end of the last completed run (alert
  on its age);
- ``aquameter_flow_last_run_duration_seconds{flow}`` and ``aquameter_flow_last_run_failed{flow}``
  (1 when the latest run failed): the latest run, whatever its outcome;
- ``aquameter_flow_last_computed_timestamp_seconds{flow}``: the last time a flow committed
  computed units (``analysis_marks``); a run that found nothing stale writes no mark.

A database migrated before 0009 has no ``flow_runs``: then only the last series, and one warning.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import psycopg
from prometheus_client import CollectorRegistry, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sql.connect import connect

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment

    from ingest.pipeline import IngestPipeline
    from ingest.workers import MqttWorkers
    from protocols.mqtt import MqttIngest

log = logging.getLogger("aquameter.metrics")

__all__ = ["FlowSeries", "MetricSources", "MetricsServer", "start_metrics"]

# Commit latency spans a few milliseconds (a small batch on a local server) to minutes (retries
# through a database outage).
COMMIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# MqttStats fields exported as aquameter_mqtt_<field>_total, with why an operator cares.
MQTT_COUNTERS = {
    "messages": "MQTT messages received",
    "acked": "MQTT messages acknowledged (PUBACK) after their readings were durable",
    "ignored_topics": "MQTT messages on a topic outside the scheme (quarantined UNKNOWN_TOPIC)",
    "errors": "MQTT messages whose handling raised (quarantined PROCESSING_ERROR)",
    "unprocessable": "MQTT messages acknowledged without any row: lost (see the log)",
    "connects": "MQTT connections accepted by the broker",
    "disconnects": "MQTT disconnections",
}


@dataclass
class MetricSources:
    """What the exporter reads at scrape time; fields may be set after :func:`start_metrics`
    (``aquameter ingest`` connects MQTT and builds the async adapters after the exporter is up,
    so the probes answer while the process starts).

    ``database_url`` is what ``/readyz`` checks (default: the pipeline's); ``flows_database_url``
    is where ``flow_runs`` and ``analysis_marks`` are read (None: no flow series; the ingest login
    has no SELECT on them, the analytics login has)."""

    pipeline: IngestPipeline | None = None
    mqtt: MqttIngest | None = None
    workers: MqttWorkers | None = None
    adapters: dict[str, Any] = field(default_factory=dict)
    database_url: str | None = None
    flows_database_url: str | None = None
    # True when this process is to consume MQTT: until ``mqtt`` or ``workers`` is set, it is
    # not ready (it would otherwise look ready during the broker connect of its start-up).
    broker_expected: bool = False
    db_check_every_s: float = 5.0
    db_timeout_s: float = 2.0
    flows_every_s: float = 30.0


# Per flow: end of the last completed run, and the latest run's duration and outcome.
FLOW_RUNS_SQL = """
    SELECT flow,
           extract(epoch FROM max(finished_at) FILTER (WHERE status = 'completed')),
           (array_agg(extract(epoch FROM finished_at - started_at)
                      ORDER BY finished_at DESC, id DESC))[1],
           (array_agg(status ORDER BY finished_at DESC, id DESC))[1] = 'failed'
    FROM flow_runs GROUP BY flow"""


@dataclass
class FlowSeries:
    """What the flow series export, by flow name (Unix seconds, seconds, 0/1)."""

    computed: dict[str, float] = field(default_factory=dict)
    last_success: dict[str, float] = field(default_factory=dict)
    last_duration: dict[str, float] = field(default_factory=dict)
    last_failed: dict[str, float] = field(default_factory=dict)


class _Cached:
    """A value computed at most every ``every_s`` seconds, one computation at a time: scrapes
    and probes arrive concurrently and must not each open a database connection."""

    def __init__(self, every_s: float, compute: Callable[[], Any]) -> None:
        self.every_s = every_s
        self._compute = compute
        self._lock = threading.Lock()
        self._at = -math.inf
        self._value: Any = None

    def get(self) -> Any:
        with self._lock:
            now = time.monotonic()
            if now - self._at >= self.every_s:
                self._value = self._compute()
                self._at = time.monotonic()
            return self._value


class _Probes:
    """Liveness and readiness, shared by the HTTP probes and the gauges of the same name."""

    def __init__(self, sources: MetricSources) -> None:
        self.sources = sources
        self._db = _Cached(sources.db_check_every_s, self._check_db)
        self._flows = _Cached(sources.flows_every_s, self._read_flows)
        self._flows_warned = False

    def _db_url(self) -> str | None:
        s = self.sources
        if s.database_url is not None:
            return s.database_url
        return s.pipeline.database_url if s.pipeline is not None else None

    def _check_db(self) -> str | None:
        """None when the database answers; else why not. A fresh connection each time: a kept
        one to a server that vanished without a RST could block a probe far past its timeout."""
        url = self._db_url()
        if url is None:
            return None
        timeout = max(1, math.ceil(self.sources.db_timeout_s))  # libpq's minimum is whole seconds
        try:
            with connect(url, autocommit=True, connect_timeout=timeout) as conn:
                conn.execute(f"SET statement_timeout = {int(timeout * 1000)}")
                conn.execute("SELECT 1")
            return None
        except Exception as err:
            return f"database unreachable: {_one_line(err)}"

    def database_problem(self) -> str | None:
        problem: str | None = self._db.get()
        return problem

    def database_checked(self) -> bool:
        return self._db_url() is not None

    def _read_flows(self) -> FlowSeries | None:
        """The flow series (see the module docstring); None when unreadable. Marks: the part of
        a mark's flow name before ':', so billing periods do not each make a label value."""
        url = self.sources.flows_database_url
        if url is None:
            return None
        timeout = max(1, math.ceil(self.sources.db_timeout_s))
        series = FlowSeries()
        try:
            with connect(url, autocommit=True, connect_timeout=timeout) as conn:
                conn.execute(f"SET statement_timeout = {int(timeout * 1000)}")
                marks = conn.execute(
                    "SELECT split_part(flow, ':', 1), extract(epoch FROM max(computed_at))"
                    " FROM analysis_marks GROUP BY 1"
                ).fetchall()
                series.computed = {str(name): float(ts) for name, ts in marks}
                try:
                    runs = conn.execute(FLOW_RUNS_SQL).fetchall()
                except psycopg.errors.UndefinedTable as err:
                    self._warn_flows(f"no flow-run series (migrate to 0009): {_one_line(err)}")
                    return series
        except psycopg.Error as err:  # e.g. no SELECT on analysis_marks for this login
            self._warn_flows(f"flow series unavailable: {_one_line(err)}")
            return None
        for name, success_at, seconds, failed in runs:
            if success_at is not None:
                series.last_success[str(name)] = float(success_at)
            series.last_duration[str(name)] = float(seconds)
            series.last_failed[str(name)] = float(bool(failed))
        return series

    def _warn_flows(self, message: str) -> None:
        if not self._flows_warned:  # once: the exporter is scraped every few seconds
            log.warning("%s", message)
            self._flows_warned = True

    def flows(self) -> FlowSeries | None:
        flows: FlowSeries | None = self._flows.get()
        return flows

    def health_problems(self) -> list[str]:
        """What makes this process unable to ingest for good (restart it)."""
        s = self.sources
        problems: list[str] = []
        p = s.pipeline
        if p is not None and not p.healthy():
            problems.append(
                f"ingest pipeline failed: {p.failure}"
                if p.failure
                else "ingest writer thread is not running"
            )
        if s.mqtt is not None and (problem := s.mqtt.problem()) is not None:
            problems.append(problem)
        return problems

    def broker_problem(self) -> str | None:
        s = self.sources
        if s.workers is not None:
            rows = s.workers.rows()
            down = [f"w{r.index}" for r in rows if not r.connected]
            if down:
                return f"MQTT workers not connected to the broker: {', '.join(down)}"
            return None
        if s.mqtt is not None:
            if not (s.mqtt.alive() and s.mqtt.connected.is_set()):
                return f"MQTT not connected/subscribed to {s.mqtt.endpoint}"
            return None
        if s.broker_expected:
            return "MQTT not started yet"
        return None

    def ready_problems(self) -> list[str]:
        problems = self.health_problems()
        if (db := self.database_problem()) is not None:
            problems.append(db)
        if (broker := self.broker_problem()) is not None:
            problems.append(broker)
        return problems


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text[:300]}"


def _gauge(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> Metric:
    if labels is None:
        return GaugeMetricFamily(name, doc, value=value)
    g = GaugeMetricFamily(name, doc, labels=list(labels))
    g.add_metric(list(labels.values()), value)
    return g


def _counter(name: str, doc: str, value: float) -> Metric:
    return CounterMetricFamily(name, doc, value=value)


class _IngestCollector(Collector):
    """Reads the pipeline, MQTT adapter, workers and async adapters at each scrape."""

    def __init__(self, sources: MetricSources, probes: _Probes) -> None:
        self.sources = sources
        self.probes = probes

    def collect(self) -> Iterable[Metric]:
        try:
            yield from self._collect()
        except Exception:  # a scrape must not take the exporter down; say why in the log
            log.exception("metrics collection failed")
            raise

    def _collect(self) -> Iterator[Metric]:
        s = self.sources
        yield from self._counters()
        p = s.pipeline
        if p is not None:
            # Frames waiting for the writer; bytes held by frames submitted and not yet
            # committed (the bound on which transports block).
            yield _gauge(
                "aquameter_queue_frames", "Frames waiting for the ingest writer", p.queued_frames
            )
            yield _gauge(
                "aquameter_queue_bytes",
                "Bytes held by frames submitted and not yet committed",
                p.queued_bytes,
            )
            yield _gauge(
                "aquameter_queue_bytes_limit", "Bound on aquameter_queue_bytes", p.queue_bytes
            )
            yield _gauge(
                "aquameter_queue_saturated",
                "1 while a submit would block (transports are being pushed back)",
                float(p.saturated()),
            )
            yield _counter(
                "aquameter_writer_restarts",
                "Ingest writer thread restarts after an unexpected exception",
                p.writer_restarts,
            )
        yield _gauge(
            "aquameter_healthy",
            "1 while this process's ingest threads live (what /healthz answers)",
            float(not self.probes.health_problems()),
        )
        if self.probes.database_checked():
            yield _gauge(
                "aquameter_database_up",
                "1 when the database answered SELECT 1 (checked every few seconds)",
                float(self.probes.database_problem() is None),
            )
        yield from self._mqtt()
        yield from self._adapters()
        yield from self._flows()

    def _counters(self) -> Iterator[Metric]:
        s = self.sources
        if s.workers is not None:
            counters = s.workers.counters(plus=s.pipeline.counters if s.pipeline else None)
        elif s.pipeline is not None:
            counters = s.pipeline.counters
        else:
            return
        snap = counters.snapshot()
        for key, name, doc in (
            ("frames", "aquameter_frames", "Frames (messages, requests, polls) submitted"),
            ("readings_received", "aquameter_readings_received", "Readings received"),
            ("stored", "aquameter_readings_stored", "Readings committed to the readings table"),
            ("duplicates", "aquameter_duplicates", "Readings already stored (redeliveries)"),
            ("batches", "aquameter_batches", "Batches committed"),
            ("db_errors", "aquameter_db_errors", "Failed database writes (retried)"),
            ("processing_errors", "aquameter_processing_errors", "Frames whose decoding raised"),
        ):
            value = snap.get(key, 0)
            assert isinstance(value, int)
            yield _counter(name, doc, value)
        # As aquameter_duplicates to aquameter_readings_stored: the same rejected input again (a
        # redelivered poison message, a retried bad frame) counts in the second, not as a new row.
        for key, name, doc in (
            (
                "quarantined",
                "aquameter_quarantined",
                "Readings quarantined into a new quarantine row, by reason",
            ),
            (
                "quarantine_repeats",
                "aquameter_quarantine_repeats",
                "Readings of rejected input already in the quarantine (its row counted again), "
                "by reason",
            ),
        ):
            family = CounterMetricFamily(name, doc, labels=["reason"])
            counts = snap[key]
            assert isinstance(counts, dict)
            for reason, n in sorted(counts.items()):
                family.add_metric([str(reason)], n)
            yield family

    def _mqtt(self) -> Iterator[Metric]:
        s = self.sources
        if s.workers is not None:
            rows = s.workers.rows()
            totals = s.workers.mqtt_totals()
            connected = sum(r.connected for r in rows)
            yield _gauge("aquameter_mqtt_workers", "MQTT worker processes configured", len(rows))
            yield _gauge(
                "aquameter_mqtt_workers_alive",
                "MQTT worker processes running",
                sum(r.alive for r in rows),
            )
            yield _gauge(
                "aquameter_mqtt_workers_healthy",
                "MQTT worker processes running without a reported problem",
                sum(r.healthy for r in rows),
            )
            yield _gauge(
                "aquameter_mqtt_workers_connected",
                "MQTT worker processes connected and subscribed",
                connected,
            )
            yield _counter(
                "aquameter_mqtt_worker_restarts",
                "MQTT worker process restarts (crash or unhealthy exit)",
                s.workers.restarts(),
            )
            up = bool(rows) and connected == len(rows)
            yield _gauge(*_ADAPTER_UP, float(up), {"adapter": "mqtt"})
            yield _gauge(*_BROKER_UP, float(connected > 0))
        elif s.mqtt is not None:
            m = s.mqtt
            up = m.alive() and m.connected.is_set()
            totals = {k: int(getattr(m.stats, k)) for k in MQTT_COUNTERS}
            yield _gauge(*_ADAPTER_UP, float(up), {"adapter": "mqtt"})
            yield _gauge(*_BROKER_UP, float(up))
            # Acknowledgement lag: messages read and not yet acknowledged (in the queue, being
            # committed, or waiting for the ack thread). Worker processes restart with fresh
            # counters, so this is only exact for the in-process adapter.
            yield _gauge(
                "aquameter_mqtt_unacked_messages",
                "MQTT messages received and not yet acknowledged (acknowledgement lag)",
                max(0, totals["messages"] - totals["acked"]),
            )
        else:
            return
        for key, doc in MQTT_COUNTERS.items():
            yield _counter(f"aquameter_mqtt_{key}", doc, totals.get(key, 0))

    def _adapters(self) -> Iterator[Metric]:
        for name, adapter in sorted(self.sources.adapters.items()):
            state = _adapter_state(name, adapter)
            if state is None:
                continue
            up, devices, connected = state
            yield _gauge(*_ADAPTER_UP, float(up), {"adapter": name})
            if devices is not None:
                yield _gauge(
                    "aquameter_adapter_devices",
                    "Devices an adapter polls or subscribes to",
                    devices,
                    {"adapter": name},
                )
                yield _gauge(
                    "aquameter_adapter_devices_connected",
                    "Devices an adapter is connected to now",
                    connected,
                    {"adapter": name},
                )

    def _flows(self) -> Iterator[Metric]:
        flows = self.probes.flows()
        if flows is None:
            return
        for name, doc, values in (
            (
                "aquameter_flow_last_computed_timestamp_seconds",
                "Last time (Unix s) a flow committed computed units (analysis_marks.computed_at)",
                flows.computed,
            ),
            (
                "aquameter_flow_last_success_timestamp_seconds",
                "End (Unix s) of the flow's last completed run (flow_runs)",
                flows.last_success,
            ),
            (
                "aquameter_flow_last_run_duration_seconds",
                "Duration of the flow's latest run, completed or failed (flow_runs)",
                flows.last_duration,
            ),
            (
                "aquameter_flow_last_run_failed",
                "1 when the flow's latest run failed (flow_runs.error has its one line)",
                flows.last_failed,
            ),
        ):
            g = GaugeMetricFamily(name, doc, labels=["flow"])
            for flow, v in sorted(values.items()):
                g.add_metric([flow], v)
            yield g


_ADAPTER_UP = ("aquameter_adapter_up", "1 while an adapter is connected (or bound, for CoAP)")
_BROKER_UP = ("aquameter_broker_up", "1 while the MQTT broker connection is up")


def _adapter_state(name: str, adapter: Any) -> tuple[bool, int | None, int] | None:
    """(up, devices, devices connected) of an async adapter, from what each keeps.

    CoAP serves: up while its server context is bound. Modbus and OPC-UA connect to devices: up
    while every device is connected, with the counts beside it (one device down is not the
    whole adapter down, but it is worth an alert)."""
    if name == "coap":
        return getattr(adapter, "_context", None) is not None, None, 0
    if name == "modbus":
        devices = getattr(adapter.stats, "devices", {})
        n = sum(1 for d in devices.values() if d.connected)
        return bool(devices) and n == len(devices), len(devices), n
    if name == "opcua":
        total = len(getattr(adapter, "devices", None) or getattr(adapter, "connected", {}))
        n = sum(1 for v in getattr(adapter, "connected", {}).values() if v)
        return total > 0 and n == total, total, n
    return None


class _Server(ThreadingMixIn, WSGIServer):
    """One thread per request, so a slow database check never holds up a liveness probe."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape on stderr (every 15 s, forever)."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


class MetricsServer:
    """The running exporter: ``url`` is its base (``http://host:port``), ``stop()`` ends it."""

    def __init__(self, host: str, port: int, sources: MetricSources) -> None:
        self.sources = sources
        self.registry = CollectorRegistry(auto_describe=False)
        self.probes = _Probes(sources)
        self.commit_seconds = Histogram(
            "aquameter_commit_seconds",
            "Seconds from a batch being closed to its commit (retries included)",
            buckets=COMMIT_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_IngestCollector(sources, self.probes))
        self._metrics_app = make_wsgi_app(self.registry)
        self._hooked: IngestPipeline | None = None
        self._previous_hook: Callable[[float], None] | None = None
        self._hook_pipeline()
        self._server = make_server(host, port, self._app, _Server, _QuietHandler)
        self.host = host
        self.port = int(self._server.server_port)
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="aquameter-metrics", daemon=True
        )
        self._thread.start()

    def _hook_pipeline(self) -> None:
        """Observe commit latency through the pipeline's hook, chaining one already set."""
        p = self.sources.pipeline
        if p is None:
            return
        previous = p.on_commit
        observe = self.commit_seconds.observe

        def on_commit(seconds: float) -> None:
            observe(seconds)
            if previous is not None:
                previous(seconds)

        p.on_commit = on_commit
        self._hooked, self._previous_hook = p, previous

    def _app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            return _probe(start_response, self.probes.health_problems())
        if path == "/readyz":
            return _probe(start_response, self.probes.ready_problems())
        if path == "/metrics":
            return self._metrics_app(environ, start_response)
        if path == "/":
            body = json.dumps({"endpoints": ["/metrics", "/healthz", "/readyz"]}).encode()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: try /metrics, /healthz or /readyz\n"]

    def stop(self) -> None:
        """Stop serving and give the pipeline its previous commit hook back."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)
        if self._hooked is not None:
            self._hooked.on_commit = self._previous_hook
            self._hooked = None

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _probe(start_response: StartResponse, problems: list[str]) -> list[bytes]:
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")]
    if not problems:
        start_response("200 OK", headers)
        return [b"ok\n"]
    start_response("503 Service Unavailable", headers)
    return [("; ".join(problems) + "\n").encode()]


def start_metrics(host: str, port: int, sources: MetricSources) -> MetricsServer:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` (0: a free port) from a
    daemon thread; the returned server's ``url`` says where, ``stop()`` ends it."""
    server = MetricsServer(host, port, sources)
    log.info("metrics on %s/metrics", server.url)
    return server
