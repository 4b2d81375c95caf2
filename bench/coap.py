"""CoAP uplink throughput through the real write path (uplinks/s and readings/s).

Our CoAP server (protocols.coap.CoapIngest) and the ingest pipeline run in this process; the meters
are ``simulators/coap_meter.py`` in a separate process (its own interpreter, so client and server
do not share a GIL), ``--concurrency`` client endpoints with one confirmable exchange in flight each
(CoAP NSTART = 1, like that many meters). Every uplink is answered only after its readings are
committed, so the figure is end to end: UDP → decode → validate → COPY → commit → 2.04.
Each row of the table starts from a fresh database.
Run: ``.venv/bin/python bench/coap.py [--quick]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would shadow the
# ``ingest`` package: put the repository root there instead.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import asyncio
import json
import os
import tempfile
import time

import psycopg
from rich.console import Console
from rich.table import Table

from aquameter.embedded import free_port
from aquameter.registry import load_registry
from ingest.pipeline import IngestPipeline
from ingest.registry_sync import sync_registry
from protocols.coap import CoapIngest
from sql.migrate import migrate
from tests.servers import DatabaseFactory, server_url

ROOT = Path(__file__).resolve().parent.parent
console = Console(width=110)

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
protocol = "coap"
id_format = "BM{{:05d}}"
count = {n}
serial_start = 60000000
install_date = "2020-01-01"
"""

# (payload format, readings per uplink): 1 read, a day of 15-min reads, five days (block-wise).
CONFIGS = [
    ("json", 1),
    ("json", 96),
    ("cbor", 96),
    ("binary-v1", 96),
    ("json", 480),
]


async def _serve_and_send(
    db: str, registry_path: Path, args: argparse.Namespace, readings: int
) -> dict:
    registry = load_registry(registry_path)
    pipeline = IngestPipeline(db, batch_seconds=args.batch_seconds).start()
    port = free_port()
    server = CoapIngest(registry.devices_by_protocol("coap"), registry, pipeline, port=port)
    task = asyncio.create_task(server.run())
    try:
        await asyncio.wait_for(server.ready.wait(), 10)
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
            manifest_path = Path(fh.name)
        cmd = [
            sys.executable, "-m", "simulators.coap_meter",
            "--registry", str(registry_path), "--port", str(port),
            "--uplinks", str(args.uplinks), "--readings", str(readings),
            "--concurrency", str(args.concurrency), "--manifest", str(manifest_path),
        ]  # fmt: skip
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *cmd, cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, env=dict(os.environ)
        )
        await asyncio.wait_for(proc.wait(), 600)
        wall = time.perf_counter() - started
        manifest = json.loads(manifest_path.read_text())
        manifest_path.unlink()
        return {"manifest": manifest, "wall_s": wall, "stats": server.stats}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.to_thread(pipeline.close)


def run_one(factory: DatabaseFactory, fmt: str, readings: int, args: argparse.Namespace) -> dict:
    db = factory.new(empty=True)
    with tempfile.TemporaryDirectory() as tmp:
        reg_path = Path(tmp) / "registry.toml"
        reg_path.write_text(REGISTRY.format(fmt=fmt, n=args.meters))
        with psycopg.connect(db) as conn:
            migrate(conn, partitions_ahead=1)
            # The weeks the uplinks cover exist up front, as after `db migrate` on a live system:
            # the writer's on-demand partition cache misses Mondays (reported to the lead).
            conn.execute("SELECT aq_ensure_partitions(now() - interval '90 days', now())")
            sync_registry(conn, load_registry(reg_path))
            conn.commit()
        result = asyncio.run(_serve_and_send(db, reg_path, args, readings))
    with psycopg.connect(db) as conn:
        row = conn.execute("SELECT count(*) FROM readings").fetchone()
        result["rows"] = int(row[0]) if row else 0
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--meters", type=int, default=200)
    ap.add_argument("--uplinks", type=int, default=5, help="uplinks per meter")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--batch-seconds", type=float, default=0.25, help="ingest batch window")
    ap.add_argument("--quick", action="store_true", help="50 meters x 2 uplinks")
    args = ap.parse_args()
    if args.quick:
        args.meters, args.uplinks = 50, 2
    factory = DatabaseFactory(server_url(Path(tempfile.mkdtemp(prefix="aq-bench-"))))
    table = Table(
        title=f"CoAP uplinks → committed rows ({args.meters} meters x {args.uplinks} uplinks, "
        f"{args.concurrency} endpoints, batch window {args.batch_seconds}s)"
    )
    for col in ("format", "reads/uplink", "bytes/uplink", "uplinks", "rows", "s", "uplinks/s",
                "readings/s"):  # fmt: skip
        table.add_column(col, justify="right")
    try:
        for fmt, readings in CONFIGS:
            r = run_one(factory, fmt, readings, args)
            m = r["manifest"]
            uplinks = m["produced"]["uplinks"]
            ok = m["responses"].get("2.04 Changed", 0)
            if ok != uplinks or r["rows"] != m["expected"]["stored_readings"]:
                console.print(f"[red]{fmt}/{readings}: {m['responses']} rows={r['rows']}")
            elapsed = m["elapsed_s"]
            size = _uplink_bytes(fmt, readings)
            table.add_row(
                fmt, str(readings), str(size), str(uplinks), str(r["rows"]), f"{elapsed:.2f}",
                f"{uplinks / elapsed:,.0f}", f"{r['rows'] / elapsed:,.0f}",
            )  # fmt: skip
    finally:
        factory.drop_all()
    console.print(table)


def _uplink_bytes(fmt: str, readings: int) -> int:
    from simulators.coap_meter import SimMeter, encode_uplink, register_litres

    meter = SimMeter("BM00001", fmt, serial=60000001)
    litres = [register_litres(1, k) for k in range(readings)]
    return len(encode_uplink(meter, 1767225600, 900, litres))


if __name__ == "__main__":
    main()
