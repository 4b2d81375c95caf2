"""OPC-UA value changes per second through the real write path.

The water-quality station simulator runs in its own process (as a field server is its own
machine) with ``--variables`` fast random walks, each changing every ``--tick`` seconds; the
subscriber (protocols/opcua.py) takes them into the ingest pipeline and PostgreSQL. Reported:
changes the server produced (from its start, so before the subscription too), data changes
received, rows stored, rates over the span of stored timestamps, and completeness: stored rows
over variables × scans seen (every scan changes every variable), i.e. nothing lost in between.

    AQUAMETER_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres \\
        .venv/bin/python bench/opcua.py --variables 200 --tick 0.1 --seconds 10

Without AQUAMETER_DATABASE_URL an embedded PostgreSQL starts. A throwaway database is created
and dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aquameter.embedded import embedded_postgres_url, free_port, wait_port  # noqa: E402
from aquameter.registry import Registry  # noqa: E402
from ingest.pipeline import IngestPipeline  # noqa: E402
from ingest.registry_sync import sync_registry  # noqa: E402
from protocols.opcua import OpcUaSubscriber  # noqa: E402
from sql.migrate import migrate  # noqa: E402
from tests.servers import with_database  # noqa: E402

STATION = "WQB"


def _registry(endpoint: str, variables: int, publishing_ms: float) -> Registry:
    channels = [
        {
            "name": f"v{i:04d}",
            "quantity": "level",
            "unit": "m",
            "params": {"node_id": f"ns=2;s={STATION}.Bench.V{i:04d}"},
        }
        for i in range(variables)
    ]
    return Registry.model_validate(
        {
            "vendor": [{"id": "bench"}],
            "device": [
                {
                    "id": "BENCH-OPCUA",
                    "vendor": "bench",
                    "protocol": "opcua",
                    "params": {
                        "endpoint": f"{endpoint}",
                        "publishing_interval": publishing_ms,
                        "queue_size": 50,
                    },
                    "channel": channels,
                }
            ],
        }
    )


def _station(port: int, variables: int, tick: float, seconds: float, manifest: Path) -> str:
    return (
        "from pathlib import Path\n"
        "from simulators.wq_station import main\n"
        f"main(port={port}, station={STATION!r}, tick_s={tick}, pump=False, "
        f"extra_variables={variables}, duration_s={seconds}, "
        f"manifest_path=Path({str(manifest)!r}))\n"
    )


def run(
    server_url: str, variables: int, tick: float, seconds: float, publishing_ms: float
) -> dict[str, float]:
    db = f"aq_bench_opcua_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')  # type: ignore[arg-type]
    url = with_database(server_url, db)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            port = free_port()
            endpoint = f"opc.tcp://127.0.0.1:{port}/aquameter/wq/"
            reg = _registry(endpoint, variables, publishing_ms)
            with psycopg.connect(url) as conn:
                migrate(conn, partitions_ahead=2)
                sync_registry(conn, reg)
                conn.commit()
            manifest_path = Path(tmp) / "manifest.json"
            # The station serves `seconds` of changes after its (slow, ~3 s) start.
            station = subprocess.Popen(
                [sys.executable, "-c", _station(port, variables, tick, seconds, manifest_path)],
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            try:
                wait_port("127.0.0.1", port, timeout=60)
                pipeline = IngestPipeline(url).start()
                try:
                    stats = asyncio.run(_subscribe(reg, pipeline, station))
                finally:
                    pipeline.close()
            finally:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    station.wait(30)
                if station.poll() is None:
                    station.kill()
            manifest = json.loads(manifest_path.read_text())
        produced = sum(v["samples"] for k, v in manifest["variables"].items() if "Bench" in k)
        with psycopg.connect(url) as conn:
            # Every variable changes at every scan and a scan stamps all of them alike, so the
            # distinct timestamps are the scans seen; rows / (variables × scans) is completeness.
            row = conn.execute(
                "SELECT count(*), extract(epoch FROM max(ts) - min(ts)), count(DISTINCT ts) "
                "FROM readings"
            ).fetchone()
        assert row is not None
        stored, span, scans = int(row[0]), float(row[1] or 0.0), int(row[2])
        return {
            "variables": variables,
            "tick_s": tick,
            "offered_per_s": variables / tick,
            "produced": produced,
            "received": stats["notifications"],
            "stored": stored,
            "span_s": span,
            "produced_per_s": produced / span if span else 0.0,
            "stored_per_s": stored / span if span else 0.0,
            "complete_pct": 100.0 * stored / max(1, variables * scans),
            "frames": stats["frames"],
            "readings_per_frame": stats["notifications"] / max(1, stats["frames"]),
            "overflows": stats["overflows"],
            "losses": stats["losses"],
        }
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')  # type: ignore[arg-type]


async def _subscribe(
    reg: Registry, pipeline: IngestPipeline, station: subprocess.Popen[bytes]
) -> dict[str, float]:
    sub = OpcUaSubscriber(reg.all_devices(), reg, pipeline, reconnect_min_s=0.2)
    task = asyncio.create_task(sub.run())
    try:
        while station.poll() is None:  # until the station has served its time and exited
            await asyncio.sleep(0.2)
        await sub.drain()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    s = sub.stats
    return {
        "notifications": s.notifications,
        "frames": s.frames,
        "overflows": s.queue_overflows,
        "losses": max(0, s.connection_losses - 1),  # the station's own exit ends the last one
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--variables", type=int, nargs="+", default=[200])
    ap.add_argument("--tick", type=float, default=0.1, help="seconds between changes")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--publishing-interval", type=float, default=100.0, help="ms")
    ap.add_argument("--database-url", default=os.environ.get("AQUAMETER_DATABASE_URL"))
    args = ap.parse_args()
    server_url = args.database_url
    if not server_url:
        server_url = embedded_postgres_url(Path(tempfile.gettempdir()) / "aq-bench-pg", "postgres")
    header = (
        f"{'vars':>5} {'tick s':>6} {'offered/s':>9} {'produced':>9} {'received':>9} "
        f"{'stored':>9} {'span s':>6} {'produced/s':>10} {'stored/s':>9} {'per frame':>9} "
        f"{'complete':>8} {'overflow':>8} {'losses':>6}"
    )
    print(header)
    for n in args.variables:
        t0 = time.monotonic()
        r = run(server_url, n, args.tick, args.seconds, args.publishing_interval)
        print(
            f"{r['variables']:>5} {r['tick_s']:>6.3f} {r['offered_per_s']:>9.0f} "
            f"{r['produced']:>9.0f} {r['received']:>9.0f} {r['stored']:>9.0f} "
            f"{r['span_s']:>6.1f} {r['produced_per_s']:>10.0f} {r['stored_per_s']:>9.0f} "
            f"{r['readings_per_frame']:>9.1f} {r['complete_pct']:>7.2f}% "
            f"{r['overflows']:>8.0f} {r['losses']:>6.0f}"
            f"   ({time.monotonic() - t0:.0f} s wall)"
        )


if __name__ == "__main__":
    main()
