"""Decode rate of the standards' codecs against ``binary-v1``, side by side on one core.

Each codec decodes the same number of frames of the shape its meters send (one current reading
each, as a meter uplink carries), through :func:`protocols.payloads.decode` exactly as ingest
calls it. The codecs run interleaved, round after round, pinned to one CPU, so a busy machine
slows all of them alike; the table gives each one's median frames/s and readings/s over the rounds
and its ratio to ``binary-v1`` in the same rounds. Every round asserts its reading count.

``--mqtt N``: end to end as well. N meters' messages (one telegram or frame each) are published
live to a real broker on a gateway's batch topic and received by ``MqttIngest`` into the real
pipeline and database (a fresh database per codec), ``wmbus-hex`` (mode 5) against
``binary-v1``; messages/s from the first publish until every reading is committed, rows counted
and asserted.

Run: ``.venv/bin/python bench/codecs.py [--frames N] [--rounds R] [--mqtt N]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import contextlib
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable

from rich.console import Console
from rich.table import Table

from protocols import wmbus
from protocols.cjt188 import encode_cjt188
from protocols.payloads import decode, encode_binary_v1
from protocols.senml import encode_senml
from protocols.uplink import Uplink
from protocols.wmbus import KeyRing, add_crcs, encode_wmbus

T0 = 1_767_225_600
KEY = bytes(range(16))


def corpora(n: int) -> dict[str, tuple[str, list[bytes], int]]:
    """name -> (format, frames, readings per frame)."""
    ids = [f"{10_000_000 + i:08d}" for i in range(n)]
    wmbus.set_keyring(KeyRing({i: KEY for i in ids}, from_env=False))
    ups = [Uplink(f"AQS{i:05d}", "register", [float(T0 + i)], [i / 1000], "m3") for i in range(n)]
    return {
        "binary-v1": ("binary-v1", [encode_binary_v1(i, T0 + i, 900, [i]) for i in range(n)], 1),
        "senml-json": ("senml-json", [encode_senml([u]) for u in ups], 1),
        "senml-cbor": ("senml-cbor", [encode_senml([u], cbor=True) for u in ups], 1),
        "wmbus (plain, CRC blocks)": (
            "wmbus",
            [add_crcs(encode_wmbus(m, i / 1000)) for i, m in enumerate(ids)],
            1,
        ),
        "wmbus (mode 5 AES)": (
            "wmbus",
            [encode_wmbus(m, i / 1000, key=KEY, access_number=i & 0xFF) for i, m in enumerate(ids)],
            1,
        ),
        "wmbus-hex (mode 5 AES)": (
            "wmbus-hex",
            [encode_wmbus(m, i / 1000, key=KEY).hex().encode() for i, m in enumerate(ids)],
            1,
        ),
        "cjt188": ("cjt188", [encode_cjt188(i + 1, i / 100, T0 + i) for i in range(n)], 1),
    }


def one_pass(fmt: str, frames: list[bytes]) -> tuple[float, int]:
    dec: Callable[..., list[Uplink]] = decode
    readings = 0
    start = time.perf_counter()
    for f in frames:
        for u in dec(f, fmt, None):
            readings += len(u.ts)
    return time.perf_counter() - start, readings


REGISTRY = """
[[dma]]
id = "D1"

[[vendor]]
id = "v"
payload = "{fmt}"
  [[vendor.channel]]
  name = "register"
  quantity = "volume"
  unit = "m3"
  kind = "register"

[[meter_group]]
vendor = "v"
dma = "D1"
gateway = "GW1"
id_format = "WM{{:06d}}"
start = 0
count = {n}
serial_start = 10000000
install_date = "2020-01-01"
"""


def end_to_end(fmt: str, n: int, url: str, factory: object) -> tuple[float, int]:
    """(messages/s, rows in the database) of ``n`` one-reading messages through MQTT."""
    import paho.mqtt.client as mqtt
    import psycopg

    from aquameter.registry import load_registry
    from ingest.pipeline import IngestPipeline
    from ingest.registry_sync import sync_registry
    from protocols.mqtt import MqttIngest, batch_topic
    from sql.migrate import migrate

    db = factory.new(empty=True)  # type: ignore[attr-defined]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "registry.toml"
        path.write_text(REGISTRY.format(n=n, fmt=fmt))
        with psycopg.connect(db) as conn:
            migrate(conn, partitions_ahead=1)
            sync_registry(conn, load_registry(path))
            conn.commit()
    wmbus.set_keyring(KeyRing({f"{10_000_000 + i:08d}": KEY for i in range(n)}, from_env=False))
    root = f"bench-{uuid.uuid4().hex[:6]}/v1"
    now = int(time.time()) - 60
    if fmt == "binary-v1":
        msgs = [encode_binary_v1(10_000_000 + i, now, 900, [i]) for i in range(n)]
    else:
        msgs = [
            encode_wmbus(f"{10_000_000 + i:08d}", i / 1000, key=KEY).hex().encode()
            for i in range(n)
        ]
    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
    pipeline = IngestPipeline(db).start()
    # Live, not a preloaded backlog: the broker keeps only 1,000 queued messages per session.
    cid = f"codecs-{uuid.uuid4().hex[:8]}"
    client = MqttIngest(
        url, pipeline, {"v": fmt}, topic_root=root, shared_group=None, client_id=cid
    ).start()
    pub = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
    pub.max_inflight_messages_set(100)
    pub.connect(host, int(port))
    pub.loop_start()
    topic = batch_topic(root, "v", "GW1")
    started = time.perf_counter()
    for info in [pub.publish(topic, m, 1) for m in msgs]:
        info.wait_for_publish(120)
    counters = pipeline.counters
    while counters.stored + counters.duplicates + sum(counters.quarantined.values()) < n:
        if time.perf_counter() - started > 600:
            break
        time.sleep(0.01)
    elapsed = time.perf_counter() - started
    pub.disconnect()
    pub.loop_stop()
    client.shutdown()
    pipeline.close()
    with psycopg.connect(db) as conn:
        row = conn.execute("SELECT count(*) FROM readings").fetchone()
    rows = int(row[0]) if row else 0
    assert rows == n, (fmt, rows, n)
    return n / elapsed, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mqtt", type=int, default=0, help="meters for the end-to-end run (0: none)")
    ap.add_argument("--mqtt-rounds", type=int, default=3)
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
    data = corpora(args.frames)
    rates: dict[str, list[float]] = {k: [] for k in data}
    ratios: dict[str, list[float]] = {k: [] for k in data}
    for _ in range(args.rounds):
        this: dict[str, float] = {}
        for name, (fmt, frames, per) in data.items():
            secs, readings = one_pass(fmt, frames)
            assert readings == per * len(frames), (name, readings, len(frames))
            this[name] = len(frames) / secs
            rates[name].append(this[name])
        for name in data:
            ratios[name].append(this[name] / this["binary-v1"])
    table = Table(title=f"decode rate, one core, {args.frames:,} frames x {args.rounds} rounds")
    for col in ("codec", "frames/s", "readings/s", "vs binary-v1"):
        table.add_column(col, justify="left" if col == "codec" else "right")
    for name, (_, _, per) in data.items():
        fps = statistics.median(rates[name])
        table.add_row(
            name, f"{fps:,.0f}", f"{fps * per:,.0f}", f"{statistics.median(ratios[name]):.2f}x"
        )
    Console().print(table)
    if args.mqtt:
        os.sched_setaffinity(0, os.sched_getaffinity(0) | set(range(os.cpu_count() or 1)))
        from tests.servers import DatabaseFactory, broker, server_url

        tmp = Path(tempfile.mkdtemp(prefix="aq-bench-"))
        factory = DatabaseFactory(server_url(tmp))
        e2e = Table(title=f"MQTT -> database, {args.mqtt:,} messages of one reading, via GW1")
        for col in ("codec", "messages/s", "rows", "vs binary-v1"):
            e2e.add_column(col, justify="left" if col == "codec" else "right")
        bases, rates = [], []
        try:
            with contextlib.contextmanager(broker)(tmp) as (url, _):
                for _ in range(args.mqtt_rounds):  # interleaved, like the decode rounds
                    bases.append(end_to_end("binary-v1", args.mqtt, url, factory)[0])
                    rates.append(end_to_end("wmbus-hex", args.mqtt, url, factory)[0])
        finally:
            factory.drop_all()
        base, rate = statistics.median(bases), statistics.median(rates)
        rows = f"{args.mqtt:,} x {args.mqtt_rounds}"
        e2e.add_row("binary-v1", f"{base:,.0f}", rows, "1.00x")
        e2e.add_row("wmbus-hex (mode 5)", f"{rate:,.0f}", rows, f"{rate / base:.2f}x")
        Console().print(e2e)


if __name__ == "__main__":
    main()
