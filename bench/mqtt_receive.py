"""How fast can one Python process receive MQTT at one reading per message? (messages/s)

Side by side on a private mosquitto with the backlog preloaded for a persistent session:

(1) bare paho-mqtt, manual PUBACK in the callback, MQTT 5 and MQTT 3.1.1 — the ceiling;
(2) ``MqttIngest`` (topic routing, the frame, PUBACK once "durable") into a sink that is durable
    at once and decodes nothing — the adapter's own cost, without ingest or the database;
(3) the whole path in one process: ``MqttIngest`` into ``IngestPipeline`` into PostgreSQL
    (decode, validate, COPY, commit, PUBACK after the commit), counted as readings stored.

Each row also reports the CPU every thread of this process spent per message (from
``/proc/self/task``), which is where the time goes; the database's and broker's own CPU is not
in it. (3) is the issue-12 target: at least 80 % of (1) MQTT 5.
Run: ``.venv/bin/python bench/mqtt_receive.py [--messages 30000] [--repeat 3]``
(a database from ``AQUAMETER_DATABASE_URL``, else an embedded PostgreSQL).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from rich.console import Console
from rich.table import Table

from aquameter.embedded import start_broker
from bench.ingest import registry
from ingest.pipeline import IngestPipeline
from ingest.registry_sync import sync_registry
from protocols.mqtt import MqttIngest, uplink_topic
from protocols.uplink import DurableCallback, Frame, FrameOutcome, FrameSink
from sql.migrate import migrate
from tests.mqtt_helpers import create_session
from tests.servers import DatabaseFactory, server_url

ROOT = "bench/v1"
METERS = 1000
# Readings end two days before now, 15 minutes apart per meter: live, inside every window.
T0 = (int(time.time()) // 86_400 - 2) * 86_400 - 30 * 900


def message(i: int) -> tuple[str, bytes]:
    """Message ``i``: one register read of meter ``i % METERS``, each (meter, time) once."""
    dev = f"M{i % METERS:06d}"
    t = T0 + (i // METERS) * 900
    body = f'{{"dev":"{dev}","t0":{t},"step":900,"reg":[{10 + i * 0.001:.3f}]}}'
    return uplink_topic(ROOT, "v", dev), body.encode()


def preload(port: int, n: int) -> None:
    p = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4()}"
    )
    p.max_inflight_messages_set(1000)
    p.connect("127.0.0.1", port)
    p.loop_start()
    infos = [p.publish(*message(i), qos=1) for i in range(n)]
    for info in infos:
        info.wait_for_publish(120)
    p.disconnect()
    p.loop_stop()


def bare_paho(port: int, n: int, v5: bool) -> Result:
    cid = f"bare-{uuid.uuid4().hex[:6]}"
    topic = f"{ROOT}/+/+/up"
    if v5:
        create_session(f"mqtt://127.0.0.1:{port}", cid, [topic])
    else:  # a 3.1.1 persistent session: clean_session=False
        c = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=cid,
            protocol=mqtt.MQTTv311,
            clean_session=False,
        )
        done = threading.Event()
        c.on_subscribe = lambda *a: done.set()
        c.connect("127.0.0.1", port)
        c.loop_start()
        c.subscribe(topic, 1)
        done.wait(10)
        c.disconnect()
        c.loop_stop()
    preload(port, n)
    got = [0]
    finished = threading.Event()

    def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        client.ack(msg.mid, msg.qos)
        got[0] += 1
        if got[0] >= n:
            finished.set()

    c = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=cid,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        manual_ack=True,
        **({} if v5 else {"clean_session": False}),  # type: ignore[arg-type]
    )
    c.on_message = on_message
    t = time.perf_counter()
    if v5:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        props.ReceiveMaximum = 20_000
        c.connect("127.0.0.1", port, clean_start=False, properties=props)
    else:
        c.connect("127.0.0.1", port)
    cpu = ThreadCpu()
    c.loop_start()
    finished.wait(300)
    elapsed = time.perf_counter() - t
    per_thread = cpu.per_message(n)
    c.disconnect()
    c.loop_stop()
    return Result(n / elapsed, per_thread)


class _DurableAtOnce:
    """A sink that acknowledges on the spot: what is left is the adapter's own work."""

    def __init__(self) -> None:
        self.frames = 0

    def submit(self, frame: Frame, on_durable: DurableCallback) -> None:
        self.frames += 1
        on_durable(FrameOutcome(accepted=1, quarantined=0, reasons=[]))


def _receive(
    port: int,
    n: int,
    sink: FrameSink,
    done: Callable[[], bool],
    poll_s: float,
    drain: Callable[[], None] | None = None,
) -> Result:
    """A new session with ``n`` one-reading messages queued, read by ``MqttIngest`` into ``sink``
    until ``done()``: messages per second and CPU per message by thread. The client is then shut
    down, running ``drain`` (e.g. the pipeline's close) before it disconnects."""
    cid = f"recv-{uuid.uuid4().hex[:6]}"
    create_session(f"mqtt://127.0.0.1:{port}", cid, [f"{ROOT}/+/+/up"])
    preload(port, n)
    t = time.perf_counter()
    cpu = ThreadCpu()
    client = MqttIngest(
        f"mqtt://127.0.0.1:{port}",
        sink,
        {"v": "json"},
        topic_root=ROOT,
        shared_group=None,
        client_id=cid,
    ).start()
    while not done():
        time.sleep(poll_s)
    elapsed = time.perf_counter() - t
    per_thread = cpu.per_message(n)
    client.shutdown(drain)
    return Result(n / elapsed, per_thread)


def adapter(port: int, n: int) -> Result:
    sink = _DurableAtOnce()
    return _receive(port, n, sink, lambda: sink.frames >= n, 0.005)


def database(tmp: Path) -> tuple[DatabaseFactory, str]:
    """A migrated database with the 1,000 meters of the messages registered."""
    factory = DatabaseFactory(server_url(tmp))
    db = factory.new(empty=True)
    reg = registry(METERS)
    with psycopg.connect(db) as conn:
        migrate(conn, partitions_ahead=1)
        sync_registry(conn, reg)
        conn.execute(
            "SELECT aq_ensure_partitions(to_timestamp(%s), now() + interval '1 day')",
            (T0 - 86_400,),
        )
        conn.commit()
    return factory, db


def whole_path(port: int, n: int, db: str) -> Result:
    """MqttIngest into IngestPipeline into PostgreSQL: readings stored per second."""
    with psycopg.connect(db) as conn:
        conn.execute("TRUNCATE readings, ingest_days, quarantine")
        conn.commit()
    pipeline = IngestPipeline(db, registry_poll_s=None).start()

    def stored_all() -> bool:
        return pipeline.counters.stored >= n

    result = _receive(port, n, pipeline, stored_all, 0.002, drain=pipeline.close)
    with psycopg.connect(db) as conn:
        row = conn.execute("SELECT count(*), count(DISTINCT value) FROM readings").fetchone()
        q = conn.execute("SELECT count(*) FROM quarantine").fetchone()
    assert row is not None and row[0] == n and row[1] == n, row
    assert q is not None and q[0] == 0, q
    return result


class Result:
    """A rate and the CPU microseconds per message each thread of this process spent."""

    def __init__(self, rate: float, per_thread: dict[str, float]) -> None:
        self.rate = rate
        self.per_thread = per_thread

    def cpu_text(self) -> str:
        total = sum(self.per_thread.values())
        parts = ", ".join(
            f"{name} {us:.1f}"
            for name, us in sorted(self.per_thread.items(), key=lambda kv: -kv[1])
            if us >= 0.5
        )
        return f"{total:.1f} ({parts})"


class ThreadCpu:
    """CPU time of every thread of this process from now on, by thread name.

    Threads started later count from zero; read it before they stop (their clocks go with
    them)."""

    def __init__(self) -> None:
        self._start = self._now()

    @staticmethod
    def _now() -> dict[int, tuple[str, float]]:
        out = {}
        for t in threading.enumerate():
            if t.ident is None:
                continue
            try:
                clock = time.pthread_getcpuclockid(t.ident)
                out[t.ident] = (_role(t.name), time.clock_gettime(clock))
            except (OSError, ProcessLookupError):
                continue
        return out

    def per_message(self, n: int) -> dict[str, float]:
        """Microseconds of CPU per message, summed by thread role."""
        now = self._now()
        by_role: dict[str, float] = {}
        for ident, (role, cpu) in now.items():
            spent = cpu - self._start.get(ident, (role, 0.0))[1]
            by_role[role] = by_role.get(role, 0.0) + spent * 1e6 / n
        return by_role


def _role(name: str) -> str:
    if name.startswith("paho-mqtt-client"):
        return "paho"
    if name == "MainThread":
        return "main"
    return name.removeprefix("aquameter-")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=30_000)
    ap.add_argument("--repeat", type=int, default=1, help="runs of all variants, side by side")
    args = ap.parse_args()
    n = args.messages
    console = Console(width=160)
    with tempfile.TemporaryDirectory() as tmp:
        factory, db = database(Path(tmp))
        broker = start_broker(Path(tmp) / "broker")
        port = int(broker.url.rsplit(":", 1)[1])
        try:
            for run in range(1, args.repeat + 1):
                rows = [
                    ("bare paho, MQTT 5, manual ack", bare_paho(port, n, True)),
                    ("bare paho, MQTT 3.1.1, manual ack", bare_paho(port, n, False)),
                    ("MqttIngest into a null sink (no decoding, no database)", adapter(port, n)),
                    (
                        "whole path: MqttIngest → IngestPipeline → PostgreSQL",
                        whole_path(port, n, db),
                    ),
                ]
                load = os.getloadavg()[0]
                table = Table(
                    "receiver",
                    "messages/s",
                    "of bare MQTT 5",
                    "CPU µs/msg in this process (by thread)",
                    title=f"run {run}: {n:,} messages of one reading, load average {load:.2f}",
                )
                ceiling = rows[0][1].rate
                for name, result in rows:
                    table.add_row(
                        name,
                        f"{result.rate:,.0f}",
                        f"{result.rate / ceiling:.0%}",
                        result.cpu_text(),
                    )
                console.print(table)
        finally:
            broker.stop()
            factory.drop_all()


if __name__ == "__main__":
    main()
