"""Modbus TCP polling throughput through the real write path (registers/s and readings/s).

The pump stations are ``simulators/pump_station.py`` in a separate process (its own interpreter, so
server and poller do not share a GIL), one pymodbus TCP server per station on consecutive loopback
ports, each with the station PLC (unit 1) and the inlet meter (unit 2). This process runs
:class:`protocols.modbus.ModbusPoller` (one task and one connection per device) into
:class:`ingest.pipeline.IngestPipeline`, so every figure is end to end: request → response →
decode → frame → validate → COPY → commit. ``--sink null`` swaps the pipeline for a sink that
acknowledges at once, to show the Modbus side alone. Each row starts from a fresh database.
Run: ``.venv/bin/python bench/modbus.py [--quick] [--sink null]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would shadow the
# ``protocols`` package: put the repository root there instead.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import asyncio
import json
import os
import signal
import socket
import tempfile
import time
from typing import Any

import psycopg
from rich.console import Console
from rich.table import Table

from aquameter.embedded import free_port, wait_port
from aquameter.registry import load_registry
from ingest.pipeline import IngestPipeline
from ingest.registry_sync import sync_registry
from protocols.modbus import ModbusOptions, ModbusPoller
from protocols.uplink import DurableCallback, Frame, FrameOutcome
from simulators.pump_station import PumpStation, PumpStationConfig
from sql.migrate import migrate
from tests.servers import DatabaseFactory, server_url

ROOT = Path(__file__).resolve().parent.parent
console = Console(width=150)

# (stations, pumps per station, poll interval s): a realistic 1 s cadence, then as fast as the
# stations answer (0.005 s) with small and large register blocks.
CONFIGS = [
    (32, 3, 1.0),
    (8, 3, 0.005),
    (32, 3, 0.005),
    (8, 10, 0.005),
]


class NullSink:
    """Acknowledges every frame at once (the Modbus side's own ceiling)."""

    def submit(self, frame: Frame, on_durable: DurableCallback) -> None:
        n = sum(len(u.values) for u in frame.uplinks or [])
        on_durable(FrameOutcome(accepted=n))


def _inline(d: dict[str, Any]) -> str:
    return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in d.items()) + " }"


def registry_text(stations: int, pumps: int, port: int, interval: float) -> str:
    rows = PumpStation(PumpStationConfig(pumps=pumps)).register_map()
    parts = ['[[dma]]\nid = "D1"\n']
    for vendor, unit_id in (("station", 1), ("inlet", 2)):
        chans = []
        for r in (r for r in rows if r["unit_id"] == unit_id):
            params: dict[str, Any] = {"table": r["table"], "address": r["address"]}
            if r["table"] in ("holding", "input"):
                params["type"] = r["type"]
            if "bit" in r:
                params["bit"] = r["bit"]
            if r["scale"] != 1.0:
                params["scale"] = r["scale"]
            chans.append(
                f'  {{ name = "{r["channel"]}", quantity = "{r["quantity"]}", '
                f'unit = "{r["unit"]}", params = {_inline(params)} }},'
            )
        parts.append(f'[[vendor]]\nid = "{vendor}"\nchannel = [\n' + "\n".join(chans) + "\n]\n")
    for k in range(stations):
        common = (
            f'host = "127.0.0.1", port = {port + k}, poll_interval_s = {interval}, timeout_s = 2.0'
        )
        for vendor, unit_id, suffix in (("station", 1, ""), ("inlet", 2, "-IN")):
            parts.append(
                f'[[device]]\nid = "PS{k + 1:03d}{suffix}"\nvendor = "{vendor}"\n'
                f'protocol = "modbus"\ndma = "D1"\n'
                f"params = {{ {common}, unit_id = {unit_id} }}\n"
            )
    return "\n".join(parts)


def free_port_run(n: int) -> int:
    """A first port with ``n`` free consecutive ports after it (loopback)."""
    for _ in range(50):
        base = free_port()
        try:
            for p in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no run of free ports")


async def _poll(
    db: str | None,
    reg_path: Path,
    stations: int,
    pumps: int,
    port: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    duration = args.duration
    registry = load_registry(reg_path)
    pipeline = None if db is None else IngestPipeline(db, batch_seconds=args.batch_seconds).start()
    sink = pipeline if pipeline is not None else NullSink()
    manifest_path = reg_path.with_suffix(".manifest.json")
    sim = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "simulators.pump_station", "--stations", str(stations),
        "--pumps", str(pumps), "--port", str(port), "--time-scale", "60", "--tick-s", "1",
        "--manifest", str(manifest_path),
        cwd=ROOT, env=dict(os.environ), stdout=asyncio.subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C here must not skip its manifest
    )  # fmt: skip
    task: asyncio.Task[None] | None = None
    try:
        for k in range(stations):
            await asyncio.to_thread(wait_port, "127.0.0.1", port + k, 20.0)
        options = ModbusOptions(max_inflight=args.max_inflight)
        devices = registry.devices_by_protocol("modbus")
        poller = ModbusPoller(devices, registry, sink, options=options)
        cpu0, t0 = time.process_time(), time.perf_counter()
        task = asyncio.create_task(poller.run())
        await asyncio.sleep(duration)
        wall = time.perf_counter() - t0
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if pipeline is not None:
            await asyncio.to_thread(pipeline.close)
        cpu = time.process_time() - cpu0  # includes the drain of the last frames
        sim.send_signal(signal.SIGINT)  # the simulator writes its manifest and exits
        await asyncio.wait_for(sim.wait(), 30)
        manifest = json.loads(manifest_path.read_text())
        return {"stats": poller.stats, "wall_s": wall, "cpu_s": cpu, "manifest": manifest}
    finally:
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if pipeline is not None:
            await asyncio.to_thread(pipeline.close)
        if sim.returncode is None:
            sim.kill()
            await sim.wait()


def run_one(
    factory: DatabaseFactory | None,
    stations: int,
    pumps: int,
    interval: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    port = free_port_run(stations)
    db = None if factory is None else factory.new(empty=True)
    with tempfile.TemporaryDirectory() as tmp:
        reg_path = Path(tmp) / "registry.toml"
        reg_path.write_text(registry_text(stations, pumps, port, interval))
        if db is not None:
            with psycopg.connect(db) as conn:
                migrate(conn, partitions_ahead=1)
                sync_registry(conn, load_registry(reg_path))
                conn.commit()
        result = asyncio.run(_poll(db, reg_path, stations, pumps, port, args))
    result["rows"] = None
    if db is not None:
        with psycopg.connect(db) as conn:
            row = conn.execute("SELECT count(*) FROM readings").fetchone()
            result["rows"] = int(row[0]) if row else 0
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of polling per row")
    ap.add_argument("--batch-seconds", type=float, default=0.25, help="ingest batch window")
    ap.add_argument("--sink", choices=["db", "null"], default="db")
    ap.add_argument(
        "--max-inflight",
        type=int,
        default=16,
        help="frames per device waiting for durability before polling pauses",
    )
    ap.add_argument("--quick", action="store_true", help="4 s per row, first three configs")
    args = ap.parse_args()
    configs = CONFIGS[:3] if args.quick else CONFIGS
    if args.quick:
        args.duration = 4.0
    factory = None
    if args.sink == "db":
        factory = DatabaseFactory(server_url(Path(tempfile.mkdtemp(prefix="aq-bench-"))))
    table = Table(
        title=f"Modbus TCP polls → {'committed rows' if factory else 'null sink'} "
        f"({args.duration:.0f} s per row, loopback, simulator in its own process)"
    )
    for col in ("stations", "pumps", "devices", "interval s", "polls/s", "requests/s",
                "registers/s", "readings/s", "rows", "timeouts", "skipped", "CPU %"):  # fmt: skip
        table.add_column(col, justify="right")
    try:
        for stations, pumps, interval in configs:
            r = run_one(factory, stations, pumps, interval, args)
            s, wall = r["stats"], r["wall_s"]
            served = sum(sum(st["served"]["requests"].values()) for st in r["manifest"]["stations"])
            if served < s.requests - 2 * stations:
                console.print(f"[red]station served {served} requests, poller sent {s.requests}")
            if r["rows"] is not None and r["rows"] != s.accepted:
                console.print(f"[red]rows {r['rows']} != accepted {s.accepted}")
            table.add_row(
                str(stations), str(pumps), str(len(s.devices)), f"{interval:g}",
                f"{s.polls / wall:,.0f}", f"{s.requests / wall:,.0f}",
                f"{(s.registers_read + s.bits_read) / wall:,.0f}",
                f"{s.accepted / wall:,.0f}", "-" if r["rows"] is None else f"{r['rows']:,}",
                str(s.timeouts), str(s.skipped_polls), f"{100 * r['cpu_s'] / wall:.0f}",
            )  # fmt: skip
    finally:
        if factory is not None:
            factory.drop_all()
    console.print(table)


if __name__ == "__main__":
    main()
