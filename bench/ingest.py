"""Ingest throughput, side by side in one script (readings/s):

(a) end to end: MQTT (QoS 1, backlog held by the broker) → aquameter ingest → committed rows, for
    1 and for 96 readings per message; once in one process (``MqttIngest`` + ``IngestPipeline``)
    and once with 2 worker processes on an MQTT v5 shared subscription (``ingest.workers``, what
    ``aquameter ingest --mqtt-workers 2`` runs);
(b) the limit: a plain psycopg binary ``COPY`` of the same rows into the same table;
(c) the baseline users would write: a paho callback doing one INSERT per reading (autocommit);
(d) the backends side by side on one TimescaleDB server (``AQUAMETER_TIMESCALE_URL``, e.g. from
    ``.ci/timescale-cluster start``): plain PostgreSQL's weekly partitions (``timescale=off``), the
    hypertable, and the hypertable with its chunks compressed. A month of 15-minute register reads
    of the estate's 2,400 simulated meters (``simulators.fleet``) is loaded through the ingest
    writer (``BatchWriter``, 20,000-row batches in time order, as live traffic), then late reads
    (1 % redelivered, 1 % new between stored ones) go into the month — into compressed chunks in
    the third variant — and one month of daily consumption per meter is read through
    ``aq_bucket``; the hourly and daily rollups of the month are refreshed once after the load
    (``sql.rollups.refresh_rollups``: continuous aggregates, or plain's own tables). Reported:
    rows/s and ratios against the partitions, bytes per reading, and the compression ratio. The
    same server and settings hold all three databases, so only the schema differs.

The broker is a private mosquitto (unlimited queue) and each variant starts from an empty readings
table with the same indexes. Each (a) clock starts when the subscriber(s) begin to connect, their
pipelines and channel index already loaded (the workers wait at a start gate for that, so process
start-up is not counted), and stops when the committed count reaches the total (the workers
report their counters every 10 ms). Run: ``.venv/bin/python bench/ingest.py [--quick]
[--backends-only]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would shadow the
# ``ingest`` package: put the repository root there instead.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import json
import logging
import multiprocessing as mp
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import polars as pl
import psycopg
from rich.console import Console
from rich.table import Table

from aquameter.embedded import start_broker
from aquameter.registry import Device, Meter, Registry, load_registry
from aquameter.settings import Settings
from ingest.pipeline import IngestPipeline
from ingest.registry_sync import sync_registry
from ingest.workers import MqttWorkers, worker_client_id
from ingest.writer import Batch, BatchWriter
from protocols.mqtt import MqttIngest, uplink_topic
from simulators.fleet import simulate_fleet
from sql.migrate import migrate
from sql.rollups import refresh_rollups
from tests.mqtt_helpers import create_session
from tests.servers import ROOT as REPO
from tests.servers import DatabaseFactory, server_url
from tests.timescale_server import TimescaleUnavailable, drop_database, fresh_database
from tests.timescale_server import server_url as timescale_server_url

ROOT = "aquameter/v1"
console = Console(width=150)


def registry(n_meters: int) -> Registry:
    return Registry.model_validate(
        {
            "dma": [{"id": "D1", "timezone": "UTC"}],
            "vendor": [
                {
                    "id": "v",
                    "payload": "json",
                    "channel": [{"name": "register", "quantity": "volume", "kind": "register"}],
                }
            ],
            "device": [
                Device(id=f"M{i:06d}", vendor="v", dma="D1", meter=Meter()).model_dump(
                    by_alias=True
                )
                for i in range(n_meters)
            ],
        }
    )


def messages(n_meters: int, per_msg: int, total: int, t0: int) -> list[tuple[str, bytes]]:
    msgs = []
    per_meter = max(1, total // (n_meters * per_msg))
    for k in range(per_meter):
        for i in range(n_meters):
            start = t0 + k * per_msg * 900
            regs = [round(10 + i + 0.001 * (k * per_msg + j), 3) for j in range(per_msg)]
            body = {"dev": f"M{i:06d}", "t0": start, "step": 900, "reg": regs}
            msgs.append((uplink_topic(ROOT, "v", f"M{i:06d}"), json.dumps(body).encode()))
    return msgs


def _publish(url_port: int, msgs: list[tuple[str, bytes]]) -> None:
    client = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"bench-pub-{uuid.uuid4().hex[:6]}",
        protocol=mqtt.MQTTv311,
    )
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", url_port)
    client.loop_start()
    infos = [client.publish(t, p, qos=1) for t, p in msgs]
    for info in infos:
        info.wait_for_publish(120)
    client.disconnect()
    client.loop_stop()


def preload(port: int, msgs: list[tuple[str, bytes]], procs: int = 2) -> None:
    """Publish while the subscriber is offline: the broker queues everything for its session."""
    chunks = [msgs[i::procs] for i in range(procs)]
    ps = [mp.Process(target=_publish, args=(port, c)) for c in chunks]
    for p in ps:
        p.start()
    for p in ps:
        p.join()


def count(db: str) -> int:
    with psycopg.connect(db) as conn:
        row = conn.execute("SELECT count(*) FROM readings").fetchone()
        return int(row[0]) if row else 0


def reset(db: str) -> None:
    with psycopg.connect(db) as conn:
        conn.execute("TRUNCATE readings, ingest_days, quarantine")
        conn.commit()


def run_aquameter(broker_url: str, db: str, msgs: list[tuple[str, bytes]], n: int) -> float:
    reset(db)
    cid = f"aq-{uuid.uuid4().hex[:6]}"
    create_session(broker_url, cid, [f"{ROOT}/+/+/up"])
    preload(int(broker_url.rsplit(":", 1)[1]), msgs)
    pipeline = IngestPipeline(db).start()
    t = time.perf_counter()
    client = MqttIngest(broker_url, pipeline, {"v": "json"}, client_id=cid, shared_group=None)
    client.start()
    while pipeline.counters.stored < n:
        time.sleep(0.01)
    elapsed = time.perf_counter() - t
    client.shutdown(pipeline.close)
    assert count(db) == n
    return n / elapsed


def run_workers(
    broker_url: str, db: str, msgs: list[tuple[str, bytes]], n: int, workers: int = 2
) -> float:
    """(a) with ``workers`` processes of ``ingest.workers`` on one shared subscription.

    Every worker's session joins the share group before the preload, because mosquitto hands each
    queued message to one session of the group at publish time: a session created later would
    find nothing queued for it."""
    reset(db)
    tag = uuid.uuid4().hex[:6]
    settings = Settings(
        database_url=db,
        mqtt_url=broker_url,
        mqtt_topic_root=ROOT,
        mqtt_shared_group=f"bench{tag}",
        mqtt_client_id=f"aqw-{tag}",
        # the defaults of IngestPipeline and MqttIngest, as in run_aquameter
        batch_rows=20_000,
        batch_seconds=0.25,
        queue_frames=5_000,
        mqtt_receive_maximum=20_000,
        mqtt_session_expiry_s=3600,
    )
    for k in range(workers):
        create_session(
            broker_url,
            worker_client_id(settings.mqtt_client_id, k),
            [f"$share/{settings.mqtt_shared_group}/{ROOT}/+/+/up"],
        )
    preload(int(broker_url.rsplit(":", 1)[1]), msgs)
    pool = MqttWorkers(
        settings,
        db,
        broker_url,
        {"v": "json"},
        workers,
        report_every_s=0.01,
        hold=True,
        log_level=logging.ERROR,
    ).start()
    try:
        assert pool.wait_all("held", 120), "workers did not start"
        t = time.perf_counter()
        pool.release()
        while pool.counters().stored < n:
            time.sleep(0.01)
        elapsed = time.perf_counter() - t
    finally:
        pool.stop()
    assert count(db) == n
    rows = pool.rows()
    assert all(r.counters["stored"] > 0 for r in rows), [r.counters for r in rows]
    assert sum(r.counters["stored"] for r in rows) == n and pool.restarts() == 0
    return n / elapsed


def run_copy(db: str, msgs: list[tuple[str, bytes]], n: int) -> float:
    """psycopg's binary COPY of the same rows (prebuilt tuples) into the same table."""
    reset(db)
    with psycopg.connect(db) as conn:
        ids: dict[str, int] = dict(conn.execute("SELECT device_id, id FROM channels").fetchall())
        rows = []
        for _, payload in msgs:
            b = json.loads(payload)
            for j, v in enumerate(b["reg"]):
                rows.append((ids[b["dev"]], datetime.fromtimestamp(b["t0"] + 900 * j, UTC), v, 0))
        t = time.perf_counter()
        with (
            conn.cursor() as cur,
            cur.copy(
                "COPY readings (channel_id, ts, value, quality) FROM STDIN (FORMAT BINARY)"
            ) as copy,
        ):
            copy.set_types(["int4", "timestamptz", "float8", "int2"])
            for r in rows:
                copy.write_row(r)
        conn.commit()
        elapsed = time.perf_counter() - t
    assert count(db) == n
    return n / elapsed


def run_naive(broker_url: str, db: str, msgs: list[tuple[str, bytes]], n: int) -> float:
    """What a first attempt looks like: decode in the callback, INSERT each reading, autocommit."""
    reset(db)
    cid = f"naive-{uuid.uuid4().hex[:6]}"
    create_session(broker_url, cid, [f"{ROOT}/+/+/up"])
    preload(int(broker_url.rsplit(":", 1)[1]), msgs)
    conn = psycopg.connect(db, autocommit=True)
    ids: dict[str, int] = dict(conn.execute("SELECT device_id, id FROM channels").fetchall())
    stored = [0]

    def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        b = json.loads(msg.payload)
        for j, v in enumerate(b["reg"]):
            conn.execute(
                "INSERT INTO readings (channel_id, ts, value) VALUES (%s, %s, %s) "
                "ON CONFLICT DO NOTHING",
                (ids[b["dev"]], datetime.fromtimestamp(b["t0"] + 900 * j, UTC), v),
            )
            stored[0] += 1

    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    c = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5
    )
    c.on_message = on_message
    t = time.perf_counter()
    c.connect("127.0.0.1", int(broker_url.rsplit(":", 1)[1]), clean_start=False, properties=props)
    c.loop_start()
    while stored[0] < n:
        time.sleep(0.01)
    elapsed = time.perf_counter() - t
    c.disconnect()
    c.loop_stop()
    conn.close()
    assert count(db) == n
    return n / elapsed


BACKENDS = (
    ("weekly partitions (plain)", "off", False),
    ("hypertable", "on", False),
    ("hypertable, compressed", "on", True),
)
BATCH_ROWS = 20_000


def month_of_reads(quick: bool) -> tuple[Registry, pl.DataFrame]:
    """15-minute register reads: the estate's 2,400 meters for 30 days (quick: the example
    registry's 100 meters for 7 days), sorted by time as live traffic arrives."""
    registry = load_registry(REPO / "examples" / ("registry.toml" if quick else "estate.toml"))
    fleet = simulate_fleet(registry, datetime(2026, 1, 5, tzinfo=UTC), 7 if quick else 30)
    return registry, fleet.reads.sort("ts", "meter_id")


def as_batches(reads: pl.DataFrame, ids: dict[str, int]) -> list[Batch]:
    ch = reads["meter_id"].replace_strict(ids, return_dtype=pl.Int32).to_list()
    ts = (reads["ts"].dt.epoch("us") / 1e6).to_list()
    values = reads["register"].to_list()
    quality = reads["quality"].to_list()
    return [
        Batch(
            channel_ids=ch[i : i + BATCH_ROWS],
            ts=ts[i : i + BATCH_ROWS],
            values=values[i : i + BATCH_ROWS],
            quality=quality[i : i + BATCH_ROWS],
        )
        for i in range(0, len(ch), BATCH_ROWS)
    ]


def late_reads(reads: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """1 % of the month redelivered unchanged and 1 % new reads 7.5 minutes after stored ones,
    spread over the month: (the frame, how many of it are new)."""
    rng = np.random.default_rng(12)
    pick = rng.choice(reads.height, size=(2, max(1, reads.height // 100)), replace=False)
    again = reads[pick[0]]
    new = reads[pick[1]].with_columns(pl.col("ts") + pl.duration(seconds=450))
    return pl.concat([again, new]).sort("ts", "meter_id"), new.height


def write_all(url: str, batches: list[Batch]) -> tuple[float, int, int]:
    """Write ``batches`` through the ingest writer, one commit each: (seconds, inserted, dups)."""
    inserted = duplicates = 0
    with psycopg.connect(url, autocommit=True) as conn:
        writer = BatchWriter(conn)
        t = time.perf_counter()
        for b in batches:
            r = writer.write(b)
            inserted += r.inserted
            duplicates += r.duplicates
        elapsed = time.perf_counter() - t
    return elapsed, inserted, duplicates


def readings_bytes(conn: psycopg.Connection, hypertable: bool) -> int:
    query = (
        "SELECT hypertable_size('readings')"
        if hypertable
        else "SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree('readings')"
    )
    row = conn.execute(query).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def run_backend(
    server: str, mode: str, compress: bool, registry: Registry, reads: pl.DataFrame
) -> dict[str, float]:
    """One variant of (d) in a database of its own on ``server``."""
    url, name = fresh_database(server)
    try:
        with psycopg.connect(url) as conn:
            result = migrate(conn, timescale=mode, partitions_ahead=1)
            assert result.backend == ("timescale" if mode == "on" else "plain")
            sync_registry(conn, registry)
            conn.commit()
            ids: dict[str, int] = dict(
                conn.execute(
                    "SELECT meter_id, id FROM channels WHERE kind = 'register' "
                    "AND meter_id IS NOT NULL"
                ).fetchall()
            )
        out: dict[str, float] = {}
        load_s, inserted, _ = write_all(url, as_batches(reads, ids))
        assert inserted == reads.height, (inserted, reads.height)
        out["load"] = reads.height / load_s
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE readings")
            out["bytes"] = readings_bytes(conn, mode == "on")
            t = time.perf_counter()
            refresh_rollups(conn)  # the whole month: hourly then daily rollups
            out["refresh"] = reads.height / (time.perf_counter() - t)
            hours = conn.execute("SELECT count(*) FROM readings_hourly").fetchone()
            assert hours is not None and hours[0] >= reads.height // 4 * 0.9, hours
            if compress:
                (job,) = conn.execute(
                    "SELECT job_id FROM timescaledb_information.jobs "
                    "WHERE proc_name = 'policy_compression' AND hypertable_name = 'readings'"
                ).fetchone() or (None,)
                t = time.perf_counter()
                conn.execute("CALL run_job(%s)", (job,))
                out["compress"] = reads.height / (time.perf_counter() - t)
                before, after = conn.execute(
                    "SELECT sum(before_compression_total_bytes), "
                    "sum(after_compression_total_bytes) FROM hypertable_compression_stats("
                    "'readings')"
                ).fetchone() or (0, 0)
                out["ratio"] = float(before) / float(after)
                out["bytes"] = readings_bytes(conn, True)
                chunks = conn.execute(
                    "SELECT count(*), count(*) FILTER (WHERE is_compressed) "
                    "FROM timescaledb_information.chunks WHERE hypertable_name = 'readings'"
                ).fetchone()
                assert chunks is not None and chunks[0] == chunks[1] > 0, chunks
        late, n_new = late_reads(reads)
        late_s, inserted, duplicates = write_all(url, as_batches(late, ids))
        assert (inserted, duplicates) == (n_new, late.height - n_new), (inserted, duplicates)
        out["late"] = late.height / late_s
        with psycopg.connect(url, autocommit=True) as conn:
            assert count(url) == reads.height + n_new
            t = time.perf_counter()
            rows = conn.execute(
                "SELECT channel_id, aq_bucket('1 day', ts) AS day, max(value) - min(value) "
                "FROM readings GROUP BY 1, 2"
            ).fetchall()
            out["query"] = reads.height / (time.perf_counter() - t)
            assert len(rows) >= len(ids)
        out["rows"] = reads.height
        return out
    finally:
        drop_database(server, name)


def run_backends(quick: bool) -> None:
    """(d): the three variants side by side, printed as one table with ratios."""
    try:
        server = timescale_server_url()
    except TimescaleUnavailable as err:
        console.print(f"(d) backends skipped: {err}")
        return
    registry, reads = month_of_reads(quick)
    console.print(
        f"(d) backends: {reads.height:,} reads of {reads['meter_id'].n_unique():,} meters"
    )
    results = {}
    for label, mode, compress in BACKENDS:
        console.print(f"(d) {label}")
        results[label] = run_backend(server, mode, compress, registry, reads)
    base = results[BACKENDS[0][0]]
    table = Table(
        "backend",
        "load rows/s",
        "late rows/s",
        "rollup refresh rows/s",
        "aq_bucket daily query rows/s",
        "bytes/reading",
        title=f"(d) backends, {reads.height:,} 15-minute reads (ratios vs partitions)",
    )
    for label, r in results.items():
        table.add_row(
            label,
            f"{r['load']:,.0f} ({r['load'] / base['load']:.2f}×)",
            f"{r['late']:,.0f} ({r['late'] / base['late']:.2f}×)",
            f"{r['refresh']:,.0f} ({r['refresh'] / base['refresh']:.2f}×)",
            f"{r['query']:,.0f} ({r['query'] / base['query']:.2f}×)",
            f"{r['bytes'] / r['rows']:.1f} ({r['bytes'] / base['bytes']:.2f}×)",
        )
    console.print(table)
    compressed = results[BACKENDS[2][0]]
    console.print(
        f"compression: {compressed['ratio']:.1f}× (hypertable_compression_stats), "
        f"compress job {compressed['compress']:,.0f} rows/s"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller volumes (CI smoke run)")
    ap.add_argument("--backends-only", action="store_true", help="only (d), the backends")
    args = ap.parse_args()
    if args.backends_only:
        run_backends(args.quick)
        return
    scale = 0.1 if args.quick else 1.0
    n_meters = 1000
    t0 = int(datetime(2026, 1, 5, tzinfo=UTC).timestamp())
    with tempfile.TemporaryDirectory() as tmp:
        factory = DatabaseFactory(server_url(Path(tmp)))
        try:
            db = factory.new(empty=True)
            with psycopg.connect(db) as conn:
                migrate(conn, partitions_ahead=1)
                sync_registry(conn, registry(n_meters))
                conn.execute("SELECT aq_ensure_partitions('2026-01-01', '2026-03-01')")
                conn.commit()
            broker = start_broker(Path(tmp) / "broker")
            try:
                big = messages(n_meters, 96, int(480_000 * scale), t0)
                n_big = sum(len(json.loads(p)["reg"]) for _, p in big)
                one = messages(n_meters, 1, int(50_000 * scale), t0)
                n_one = len(one)
                naive = messages(n_meters, 1, int(5_000 * scale), t0)
                results = {}
                console.print(f"(a) 96/msg: {len(big):,} messages, {n_big:,} readings")
                results["a96"] = run_aquameter(broker.url, db, big, n_big)
                console.print(f"(a) 1/msg: {n_one:,} messages")
                results["a1"] = run_aquameter(broker.url, db, one, n_one)
                console.print("(a) 96/msg, 2 worker processes")
                results["w96"] = run_workers(broker.url, db, big, n_big)
                console.print("(a) 1/msg, 2 worker processes")
                results["w1"] = run_workers(broker.url, db, one, n_one)
                console.print("(b) raw COPY")
                results["b"] = run_copy(db, big, n_big)
                console.print(f"(c) naive INSERT per reading: {len(naive):,} messages")
                results["c"] = run_naive(broker.url, db, naive, len(naive))
            finally:
                broker.stop()
        finally:
            factory.drop_all()
    table = Table("variant", "readings/s", "ratio", title="ingest throughput")
    table.add_row(
        "(a) MQTT → rows, 96 readings/msg",
        f"{results['a96']:,.0f}",
        f"{results['a96'] / results['b']:.0%} of (b)",
    )
    table.add_row(
        "(a) MQTT → rows, 1 reading/msg",
        f"{results['a1']:,.0f}",
        f"{results['a1'] / results['c']:.1f}× (c)",
    )
    table.add_row(
        "(a) MQTT → rows, 2 workers, 96 readings/msg",
        f"{results['w96']:,.0f}",
        f"{results['w96'] / results['b']:.0%} of (b)",
    )
    table.add_row(
        "(a) MQTT → rows, 2 workers, 1 reading/msg",
        f"{results['w1']:,.0f}",
        f"{results['w1'] / results['c']:.1f}× (c)",
    )
    table.add_row("(b) raw binary COPY, same rows", f"{results['b']:,.0f}", "limit")
    table.add_row("(c) naive paho + INSERT per reading", f"{results['c']:,.0f}", "baseline")
    console.print(table)
    run_backends(args.quick)


if __name__ == "__main__":
    main()
