"""``aquameter demo``: the whole system on embedded defaults, on real servers it starts itself.

A newcomer should see a living utility in about three minutes: the demo estate
(``examples/estate.toml``) is synced into PostgreSQL, ingest listens on MQTT, CoAP, OPC-UA and
Modbus, a water-quality station serves OPC-UA and a pump station Modbus TCP, and a simulated fleet
with injected faults supplies 30 days of history: older days through the bulk importer, the last
day through the real protocols while the stations stream live. Then every analytics flow runs
under Prefect, and the report compares what was injected with what was detected, so the demo is
also an end-to-end check of detection.

Time is compressed in one place only: the station's turbidity excursion lasts under a minute, so
the water-quality limit's minimum duration is shortened for the demo (``DemoParams``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import polars as pl
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from aquameter.embedded import free_port
from aquameter.registry import Registry, load_registry
from aquameter.runtime import broker, database_url
from aquameter.settings import Settings

log = logging.getLogger("aquameter.demo")

ESTATE = Path(__file__).resolve().parent.parent / "examples" / "estate.toml"
SENML = ("senml-json", "senml-cbor")
# The standards' payload formats: their meters send the live day through their own protocol
# (SenML and wM-Bus gateways over MQTT, CJ/T 188 DTUs over TCP), counted sent and stored.
STANDARD_FORMATS = (*SENML, "wmbus", "wmbus-hex", "cjt188")
WQ_DEVICE = "WQ-HILL-RESERVOIR"
T = TypeVar("T")


@dataclass(frozen=True)
class DemoParams:
    """The demo's knobs beyond the CLI options, each with its default.

    dma_leak_m3h_per_meter: size of the injected DMA leak per customer meter of the DMA (at night
        pressure), so the leak stays visible against night use at any ``meters`` scale;
        at least ``dma_leak_min_m3h`` (the night-flow CUSUM decides at 3 m³/h·nights).
    live_days: most recent days sent through MQTT/CoAP instead of the bulk importer.
    publish_slices: the live MQTT traffic is spread over the live phase in this many slices.
    wq_excursion: the station's fault, in ``simulators.wq_station.parse_fault`` syntax (seconds
        after the station starts).
    wq_limit_min_duration_s: WQ_LIMIT minimum episode length (production default 15 min; the
        demo's excursion is compressed to under a minute).
    drain_timeout_s: how long to wait, after the last publish, for ingest to acknowledge every
        live MQTT message (it acknowledges only what it committed). Generous because it ends as
        soon as they are all in: on a loaded machine the broker may still hold a backlog.
    coap_timeout_s: how long the live CoAP uplinks may take in all (each request has 30 s).
    """

    dma_leak_m3h_per_meter: float = 0.004
    dma_leak_min_m3h: float = 3.0
    live_days: int = 1
    publish_slices: int = 8
    wq_excursion: str = "excursion:Turbidity:start=8:duration=40:level=2.5"
    wq_limit_min_duration_s: float = 20.0
    drain_timeout_s: float = 180.0
    coap_timeout_s: float = 300.0
    faults_extra: dict[str, Any] = field(default_factory=dict)


# --- estate ------------------------------------------------------------------------------------


def demo_registry(
    meters: int | None, opcua_port: int, modbus_port: int = 5020, path: Path = ESTATE
) -> Registry:
    """The estate with meter-group counts scaled to ``meters`` (None: as written), service
    connections following the meters, the OPC-UA endpoint on ``opcua_port`` and the Modbus
    pump station on ``modbus_port``."""
    reg = load_registry(path)
    if meters is not None:
        total = sum(g.count for g in reg.meter_groups)
        scale = meters / total
        per_dma: dict[str, int] = {}
        for g in reg.meter_groups:
            g.count = max(2, round(g.count * scale))
            per_dma[g.dma] = per_dma.get(g.dma, 0) + g.count
        for d in reg.dmas:
            d.service_connections = per_dma.get(d.id, 0) + d.unmetered_households
            d.mains_km = round(d.mains_km * scale, 3) or 0.5
            d.private_pipe_km = round(d.private_pipe_km * scale, 3)
    for dev in reg.devices:
        if dev.protocol == "opcua":
            dev.params["endpoint"] = f"opc.tcp://127.0.0.1:{opcua_port}/aquameter/wq/"
        elif dev.protocol == "modbus":
            dev.params["port"] = modbus_port
    return reg


def demo_faults(registry: Registry, start: datetime, days: int, params: DemoParams) -> list[Any]:
    """The injected faults: one DMA leak late enough for a night-flow baseline, two customer
    leaks, a stuck meter, a reverse flow and a comms outage, on MQTT meters of the estate; and
    one fault on a meter of each standard's kind the estate has (a leak on a wM-Bus meter, a
    stuck CJ/T 188 meter, a leak on a SenML meter)."""
    from simulators.faults import Fault
    from simulators.fleet import customer_meters, meter_id_of

    mqtt = [meter_id_of(d) for d, m in customer_meters(registry)
            if d.protocol == "mqtt" and m.customer_type == "household"]  # fmt: skip
    by_prefix: dict[str, list[str]] = {}
    for mid in mqtt:
        by_prefix.setdefault(mid[:2], []).append(mid)
    pick = iter(sorted(by_prefix.get("HJ", []))[3::7] + sorted(by_prefix.get("VB", []))[5::7])

    def kind(fmt: tuple[str, ...]) -> list[str]:
        return sorted(
            meter_id_of(d)
            for d, m in customer_meters(registry)
            if registry.vendor(d.vendor).payload in fmt and m.customer_type == "household"
        )

    # One fault on a meter of each standard's kind: the encoders must carry what detects it.
    wmb, cjt, senml = kind(("wmbus", "wmbus-hex")), kind(("cjt188",)), kind(SENML)
    leak_dma = registry.dmas[1]
    n_leak_dma = sum(1 for d, _ in customer_meters(registry) if d.dma == leak_dma.id)
    onset_day = max(min(12, days - 4), days - 10)
    d = timedelta(days=1)
    leak_rate = max(params.dma_leak_min_m3h, params.dma_leak_m3h_per_meter * n_leak_dma)
    return [
        Fault("DMA_LEAK", leak_dma.id, start + onset_day * d + timedelta(hours=13), None,
              {"rate_m3h": leak_rate}),
        Fault("LEAK_CONTINUOUS", next(pick), start + 3 * d + timedelta(hours=5), None),
        Fault("LEAK_CONTINUOUS", next(pick), start + 4 * d + timedelta(hours=2), None,
              {"rate_lph": 35.0}),
        Fault("STUCK_METER", next(pick), start + 2 * d + timedelta(hours=9), None),
        Fault("REVERSE_FLOW", next(pick), start + 5 * d + timedelta(hours=20),
              start + 6 * d + timedelta(hours=2)),
        Fault("COMMS_LOSS", next(pick), start + 6 * d, start + 8 * d + timedelta(hours=6)),
    ] + [
        f for f in (
            Fault("LEAK_CONTINUOUS", wmb[1], start + 3 * d + timedelta(hours=7), None,
                  {"rate_lph": 30.0}) if wmb else None,
            Fault("STUCK_METER", cjt[1], start + 2 * d + timedelta(hours=11), None)
            if cjt else None,
            Fault("LEAK_CONTINUOUS", senml[1], start + 4 * d + timedelta(hours=4), None)
            if senml else None,
        ) if f is not None
    ]  # fmt: skip


# --- asyncio side: adapters, station, CoAP meters ----------------------------------------------


class _Loop:
    """One asyncio loop on a thread for the adapters and the simulated station, so the main
    thread stays free for progress bars, publishing and Ctrl-C."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="demo-asyncio")
        self.thread.daemon = True
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


async def _create_tasks(coros: list[Coroutine[Any, Any, Any]]) -> list[asyncio.Task[Any]]:
    return [asyncio.create_task(c) for c in coros]


async def _cancel(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel the adapters and wait for their own clean-up (sessions closed before the
    station goes away, so nothing logs a lost connection)."""
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _post_coap(port: int, payloads: list[bytes], concurrency: int = 16) -> dict[str, int]:
    import aiocoap

    from protocols.coap import FORMAT_CONTENT

    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    codes: dict[str, int] = {}
    sem = asyncio.Semaphore(concurrency)

    async def one(payload: bytes) -> None:
        async with sem:
            msg = aiocoap.Message(
                code=aiocoap.POST,
                uri=f"coap://127.0.0.1:{port}/up",
                payload=payload,
                content_format=FORMAT_CONTENT["json"],
            )
            try:
                resp = await asyncio.wait_for(ctx.request(msg).response, 30.0)
                code = str(resp.code)
            except (TimeoutError, aiocoap.error.Error) as exc:
                code = f"error:{type(exc).__name__}"
            codes[code] = codes.get(code, 0) + 1

    try:
        await asyncio.gather(*(one(p) for p in payloads))
    finally:
        await ctx.shutdown()
    return codes


def coap_payloads(reads: pl.DataFrame, step_s: int, reads_per_uplink: int = 24) -> list[bytes]:
    """JSON uplinks (``simulators.coap_meter.encode_uplink``) of CoAP meters' reads: runs of
    consecutive reads, ``reads_per_uplink`` per uplink, registers in whole litres."""
    from simulators.coap_meter import SimMeter, encode_uplink

    out: list[bytes] = []
    for (meter,), part in reads.sort("meter_id", "ts").group_by(["meter_id"], maintain_order=True):
        ts = (part["ts"].dt.epoch("us") // 1_000_000).to_list()
        litres = [round(v * 1000.0) for v in part["register"].to_list()]
        i = 0
        while i < len(ts):
            j = i + 1
            while j < len(ts) and j - i < reads_per_uplink and ts[j] - ts[j - 1] == step_s:
                j += 1
            out.append(encode_uplink(SimMeter(str(meter)), int(ts[i]), step_s, litres[i:j]))
            i = j
    return out


# --- history through the bulk importer ----------------------------------------------------------


def history_table(reads: pl.DataFrame, inlets: pl.DataFrame) -> pl.DataFrame:
    """Reads and inlet logger values in the importer's columns."""
    meters = reads.select(
        pl.col("meter_id").alias("device"),
        pl.lit("register").alias("channel"),
        "ts",
        pl.col("register").alias("value"),
        pl.lit(None, dtype=pl.String).alias("unit"),
        pl.col("quality").cast(pl.Int64).alias("status"),
    )
    inst = inlets.select(
        pl.col("device_id").alias("device"),
        "channel",
        "ts",
        "value",
        "unit",
        pl.lit(0, dtype=pl.Int64).alias("status"),
    )
    return pl.concat([meters, inst])


# --- the demo -----------------------------------------------------------------------------------


def _progress(console: Console) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


@contextlib.contextmanager
def _quiet_prefect() -> Iterator[None]:
    """Prefect's own INFO lines would scroll the progress bars away; warnings still show."""
    saved = os.environ.get("PREFECT_LOGGING_LEVEL")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("PREFECT_LOGGING_LEVEL", None)


def run_demo(
    settings: Settings,
    *,
    duration_s: float = 90.0,
    days: int = 30,
    meters: int | None = None,
    report_dir: Path = Path("demo-report"),
    seed: int = 7,
    params: DemoParams | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the demo; returns the summary (also written to ``report_dir/summary.json``).

    ``duration_s`` bounds the live phase: live traffic flows from the end of the history import
    until ``duration_s`` after the demo started (at least until the last day's traffic is sent
    and the station's excursion has run its course, see :func:`wq_fault_over_s`).
    Ctrl-C ends the live phase early; the flows and the report still run on what arrived.

    A failed analytics flow is never silent: ``summary["failed_flows"]`` lists one line per
    failed flow and the report shows them in a red banner (read back from ``flow_runs``), since a
    missed fault may only mean the flow that should have found it did not run.
    ``summary["missed_faults"]`` names each injected fault no alert detected, and
    ``summary["failed"]`` is one line per reason the demo failed (failed flows, missed faults):
    the CLI exits non-zero when it is not empty. False alerts are counted, not a failure.
    """
    p = params or DemoParams()
    con = console or Console()
    t0 = time.monotonic()
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    with _quiet_prefect():
        return _run(settings, p, con, t0, duration_s, days, meters, report_dir, seed)


def _run(
    settings: Settings,
    p: DemoParams,
    con: Console,
    t0: float,
    duration_s: float,
    days: int,
    meters: int | None,
    report_dir: Path,
    seed: int,
) -> dict[str, Any]:
    from ingest.importer import import_file
    from ingest.registry_sync import sync_registry
    from ingest.service import build_async_adapters, make_pipeline, start_mqtt
    from simulators.fleet import simulate_fleet, write_manifest
    from simulators.pump_station import PumpStation, PumpStationConfig
    from simulators.wq_station import WqStation, WqStationConfig, parse_fault
    from sql.connect import connect
    from sql.migrate import migrate

    opcua_port, coap_port, modbus_port = free_port(), free_port(), free_port()
    cjt188_port = free_port()
    registry = demo_registry(meters, opcua_port, modbus_port)
    url = database_url(settings)
    con.rule("[bold cyan]Aquameter demo")
    with con.status("migrating the database and syncing the estate"):
        with connect(url) as conn:
            migrate(conn, timescale=settings.timescale, partitions_ahead=settings.partitions_ahead)
            sync_registry(conn, registry)
            conn.commit()
    n_meters = sum(g.count for g in registry.meter_groups)
    con.print(
        f"estate: {len(registry.dmas)} DMAs, {n_meters:,} customer meters, database {_safe(url)}"
    )

    now = datetime.now(UTC)
    end = now.replace(minute=now.minute - now.minute % 15, second=0, microsecond=0)
    start = end - timedelta(days=days)
    faults = demo_faults(registry, start, days, p)
    summary: dict[str, Any] = {"window": [start.isoformat(), end.isoformat()], "meters": n_meters}
    loop = _Loop()
    station: WqStation | None = None
    pumps: PumpStation | None = None
    adapter_tasks: list[asyncio.Task[Any]] = []
    interrupted = False
    keys = wmbus_keys(registry, settings.data_path("demo"), seed)
    with broker(settings) as (mqtt_url, v5), keys:
        pipeline = make_pipeline(settings, url)
        mqtt = None
        try:
            mqtt = start_mqtt(settings, registry, pipeline, mqtt_url, v5)
            station = WqStation(
                WqStationConfig(
                    port=opcua_port, station="WQ1", pump=False, seed=seed,
                    faults=(parse_fault(p.wq_excursion),), record_history=False,
                )
            )  # fmt: skip
            loop.run(station.start())
            live_end = max(t0 + duration_s, time.monotonic() + wq_fault_over_s(p))
            pumps = PumpStation(PumpStationConfig(name="PS-HILL", port=modbus_port, seed=seed))
            loop.run(pumps.start())
            adapters = build_async_adapters(
                registry, pipeline, {"coap", "opcua", "modbus", "cjt188"},
                {"coap": {"port": coap_port}, "cjt188": {"port": cjt188_port}},
            )  # fmt: skip
            adapter_tasks = loop.run(_create_tasks([a.run() for a in adapters.values()]))
            con.print(
                f"servers: PostgreSQL, MQTT {mqtt_url}, CoAP :{coap_port}, "
                f"OPC-UA station :{opcua_port}, Modbus pump station :{modbus_port}, "
                f"CJ/T 188 listener :{cjt188_port}"
            )
            with con.status(f"simulating {n_meters:,} meters x {days} days with faults"):
                fleet = simulate_fleet(registry, start, days, seed=seed, faults=faults)
            write_manifest(fleet.manifest, report_dir / "manifest.json")
            cut = end - timedelta(days=p.live_days)
            hist = history_table(
                fleet.reads.filter(pl.col("ts") <= cut),
                fleet.inlet_values.filter(pl.col("ts") < cut),
            )
            live_reads = fleet.reads.filter(pl.col("ts") > cut)
            live_inlets = fleet.inlet_values.filter(pl.col("ts") >= cut)
            parquet = settings.data_path("demo") / "history.parquet"
            hist.write_parquet(parquet)
            with _progress(con) as bar:
                task = bar.add_task("bulk import (Parquet)", total=hist.height)
                result = import_file(parquet, pipeline, progress=lambda n: bar.advance(task, n))
            summary["imported"] = dataclasses.asdict(result)
            interrupted = _live(
                con, p, registry, fleet, live_reads, live_inlets, mqtt_url, coap_port,
                loop, settings, live_end, pipeline, mqtt, summary, cjt188_port, seed,
            )  # fmt: skip
        except KeyboardInterrupt:
            interrupted = True
            con.print("[yellow]interrupted: stopping the live phase")
        finally:
            with con.status("stopping ingest and simulators"):
                with contextlib.suppress(Exception):
                    loop.run(_cancel(adapter_tasks), timeout=15)
                if station is not None:
                    with contextlib.suppress(Exception):
                        loop.run(station.stop(), timeout=10)
                if pumps is not None:
                    with contextlib.suppress(Exception):
                        loop.run(pumps.close(), timeout=10)
                if mqtt is not None:
                    mqtt.shutdown(pipeline.close)
                pipeline.close()
                loop.close()
        summary["ingest"] = pipeline.counters.snapshot()
    summary["interrupted"] = interrupted
    summary["by_format"] = stored_by_format(url, registry, end - timedelta(days=p.live_days))
    _analyse(con, settings, p, url, registry, fleet, start, end, report_dir, summary)
    summary["elapsed_s"] = round(time.monotonic() - t0, 1)
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _print_summary(con, summary, report_dir)
    return summary


@contextlib.contextmanager
def wmbus_keys(registry: Registry, folder: Path, seed: int) -> Iterator[Path]:
    """The estate's wM-Bus keys in a key file ingest reads (``AQUAMETER_WMBUS_KEYS_FILE``) for
    the demo's length: keys come from a file, as a utility's do, never from the database."""
    from protocols import wmbus
    from simulators.traffic import write_wmbus_keys

    folder.mkdir(parents=True, exist_ok=True)
    path = write_wmbus_keys(folder / "wmbus.keys", registry, seed)
    before = os.environ.get(wmbus.KEYS_FILE_ENV)
    os.environ[wmbus.KEYS_FILE_ENV] = str(path)
    wmbus.set_keyring(wmbus.KeyRing())
    try:
        yield path
    finally:
        if before is None:
            os.environ.pop(wmbus.KEYS_FILE_ENV, None)
        else:
            os.environ[wmbus.KEYS_FILE_ENV] = before
        wmbus.set_keyring(wmbus.KeyRing())


def stored_by_format(url: str, registry: Registry, live_from: datetime) -> dict[str, Any]:
    """Customer meters, readings stored, and readings stored in the live phase (through the
    protocols, not the importer), per vendor payload format: the mixed estate, in numbers."""
    from simulators.fleet import customer_meters
    from sql.connect import connect

    fmt_of = {d.id: registry.vendor(d.vendor).payload for d, _ in customer_meters(registry)}
    out: dict[str, dict[str, int]] = {}
    for fmt in fmt_of.values():
        out.setdefault(fmt, {"meters": 0, "stored": 0, "stored_live": 0})["meters"] += 1
    with connect(url) as conn:
        rows = conn.execute(
            "SELECT c.device_id, count(*), count(*) FILTER (WHERE r.ts > %s) "
            "FROM readings r JOIN channels c ON c.id = r.channel_id "
            "WHERE c.name = 'register' GROUP BY c.device_id",
            (live_from,),
        ).fetchall()
    for device, n, live in rows:
        kind = fmt_of.get(device)
        if kind is not None:
            out[kind]["stored"] += int(n)
            out[kind]["stored_live"] += int(live)
    return dict(sorted(out.items()))


def _safe(url: str) -> str:
    return url.split("@")[-1]


def _live(
    con: Console,
    p: DemoParams,
    registry: Registry,
    fleet: Any,
    live_reads: pl.DataFrame,
    live_inlets: pl.DataFrame,
    mqtt_url: str,
    coap_port: int,
    loop: _Loop,
    settings: Settings,
    deadline: float,
    pipeline: Any,
    mqtt: Any,
    summary: dict[str, Any],
    cjt188_port: int,
    seed: int,
) -> bool:
    """The live phase, until ``deadline`` (monotonic): the last day over MQTT (in slices),
    CoAP and the CJ/T 188 DTUs' TCP pushes while the station streams."""
    from simulators.dtu import cjt188_frames, push_all
    from simulators.publish import publish
    from simulators.traffic import TrafficParams, build_traffic

    coap_ids = {d.id for d in registry.devices_by_protocol("coap")}
    mqtt_reads = live_reads.filter(~pl.col("meter_id").is_in(list(coap_ids)))
    coap_reads = live_reads.filter(pl.col("meter_id").is_in(list(coap_ids)))
    live = dataclasses.replace(
        fleet, reads=mqtt_reads, inlet_values=live_inlets, late=fleet.late.clear()
    )
    traffic = build_traffic(
        live, registry, TrafficParams(root=settings.mqtt_topic_root, key_seed=seed)
    )
    pubs = traffic.publishes
    coap = coap_payloads(coap_reads, fleet.interval_s)
    dtus = cjt188_frames(live, registry)
    n_cjt = sum(len(f) for f in dtus.values())
    n = max(1, p.publish_slices)
    slices = [pubs[i * len(pubs) // n : (i + 1) * len(pubs) // n] for i in range(n)]
    stored0 = pipeline.counters.stored
    acked0 = mqtt.stats.acked
    summary["live"] = {
        "mqtt_publishes": len(pubs),
        "coap_uplinks": len(coap),
        "cjt188_frames": n_cjt,
        "sent_by_format": traffic.counts.by_format | ({"cjt188": n_cjt} if n_cjt else {}),
    }
    try:
        with _progress(con) as bar:
            t_pub = bar.add_task("live MQTT publishes", total=len(pubs))
            t_coap = bar.add_task("live CoAP uplinks", total=len(coap))
            t_live = bar.add_task("live phase (s)", total=max(1.0, deadline - time.monotonic()))
            t_cjt = bar.add_task("live CJ/T 188 frames (DTU TCP push)", total=n_cjt)
            coap_fut = loop.spawn(_post_coap(coap_port, coap))
            cjt_fut = loop.spawn(push_all("127.0.0.1", cjt188_port, dtus))
            started = time.monotonic()
            for i, chunk in enumerate(slices):
                if chunk:
                    publish(mqtt_url, chunk, client_id=f"aquameter-demo-{i}", progress=False)
                bar.advance(t_pub, len(chunk))
                # Spread the slices over the live phase: a head-end's day, compressed.
                pause = (deadline - time.monotonic()) / max(1, n - i) * 0.5
                _sleep_ticking(bar, t_live, started, min(max(0.0, pause), 10.0))
            try:
                codes = coap_fut.result(p.coap_timeout_s)
            except FutureTimeout:  # a loaded machine: go on with what was stored, say so
                coap_fut.cancel()
                codes = {"error:demo timeout": len(coap)}
                con.print(f"[yellow]CoAP uplinks unanswered after {p.coap_timeout_s:.0f} s[/]")
            bar.update(t_coap, completed=len(coap))
            try:
                cjt_fut.result(p.coap_timeout_s)
            except FutureTimeout:
                cjt_fut.cancel()
                con.print(f"[yellow]CJ/T 188 push unfinished after {p.coap_timeout_s:.0f} s[/]")
            bar.update(t_cjt, completed=n_cjt)
            summary["live"]["coap_responses"] = codes
            while time.monotonic() < deadline:
                _sleep_ticking(bar, t_live, started, min(1.0, deadline - time.monotonic()))
            missing = _drain(lambda: len(pubs) - (mqtt.stats.acked - acked0), p.drain_timeout_s)
            summary["live"]["unacknowledged"] = missing
            if missing > 0:
                con.print(
                    f"[yellow]{missing:,} live MQTT message(s) not yet stored after "
                    f"{p.drain_timeout_s:.0f} s: the analytics run without them[/]"
                )
            bar.update(t_live, completed=bar.tasks[t_live].total)
    except KeyboardInterrupt:
        con.print("[yellow]interrupted: ending the live phase early")
        return True
    finally:
        summary["live"]["stored"] = pipeline.counters.stored - stored0
    return False


def wq_fault_over_s(p: DemoParams) -> float:
    """Seconds after the station starts until its excursion has run its course and raised
    WQ_LIMIT: the excursion's end (its episode opened ``wq_limit_min_duration_s`` after its
    start) plus 5 s for the last samples to be stored. The live phase lasts at least this long:
    a demo that stopped the station earlier (a short ``--duration`` after a quick import) would
    miss its own injected fault."""
    from simulators.wq_station import parse_fault

    fault = parse_fault(p.wq_excursion)
    return max(fault.start_s + fault.duration_s, fault.start_s + p.wq_limit_min_duration_s) + 5.0


def _sleep_ticking(bar: Progress, task: Any, started: float, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(min(0.25, max(0.0, end - time.monotonic())))
        bar.update(task, completed=time.monotonic() - started)


def _drain(outstanding: Callable[[], int], timeout_s: float) -> int:
    """Wait until ``outstanding()`` (live MQTT messages published but not yet acknowledged,
    i.e. not yet committed) is zero, at most ``timeout_s``; returns what is still outstanding.

    Why not "until nothing new is stored for a second": the stations stream all the time, so
    that never held, and on a loaded machine a pause in commits does not mean the broker is
    empty."""
    end = time.monotonic() + timeout_s
    while (left := outstanding()) > 0 and time.monotonic() < end:
        time.sleep(0.2)
    return max(0, left)


# --- analytics, report, summary -----------------------------------------------------------------


def _flow_options(
    name: str, p: DemoParams, bill_start: Any, bill_end: Any, report_dir: Path
) -> dict[str, Any]:
    """Per-flow options for the demo's compressed time (see ``DemoParams``)."""
    kw: dict[str, Any] = {}
    if name == "water_balance":
        kw["overrides"] = {"period": "window"}
    if name == "water_quality":
        # The station streams once a second for a minute or two, not for days: the
        # limits' minimum duration and the sampling assumptions scale down with it.
        d = p.wq_limit_min_duration_s
        kw["overrides"] = {"wq": {"limit_min_duration": d, "limit_quiet_time": d,
                                  "sample_period": 1, "max_gap": 30}}  # fmt: skip
    if name == "billing_export":
        kw.update(period_start=bill_start, period_end=bill_end,
                  export_dir=str(report_dir.resolve()))  # fmt: skip
    return kw


def _analyse(
    con: Console,
    settings: Settings,
    p: DemoParams,
    url: str,
    registry: Registry,
    fleet: Any,
    start: datetime,
    end: datetime,
    report_dir: Path,
    summary: dict[str, Any],
) -> None:
    from aquameter.prefect_api import PrefectApiError, prefect_api
    from flows.runner import FlowFailed, flow_names, run_flow

    until = datetime.now(UTC) + timedelta(minutes=1)
    bill_start = (start + timedelta(days=1)).date()
    bill_end = (end - timedelta(days=1)).date()
    results: dict[str, Any] = {}
    failures: list[str] = []
    names = flow_names()
    try:
        # One Prefect API for all flows, started here and stopped after the last one.
        with prefect_api(settings), _progress(con) as bar:
            task = bar.add_task("analytics flows (Prefect)", total=len(names))
            for name in names:
                bar.update(task, description=f"flow {name}")
                try:
                    results[name] = run_flow(name, start, until, url, full=True,
                                             **_flow_options(name, p, bill_start, bill_end,
                                                             report_dir))  # fmt: skip
                except FlowFailed as exc:  # reported loudly; the other flows still run
                    log.debug("flow %s failed", name, exc_info=exc.error)
                    failures.append(exc.line)
                    results[name] = {"status": "FAILED", "error": exc.line}
                    con.print(f"[bold red]{escape(exc.line)}[/]", soft_wrap=True)
                bar.advance(task)
    except PrefectApiError as exc:  # no flow could run at all
        for name in names:
            if name not in results:
                line = FlowFailed(name, exc).line
                failures.append(line)
                results[name] = {"status": "FAILED", "error": line}
        con.print(f"[bold red]analytics flows not run: {escape(str(exc))}[/]", soft_wrap=True)
    summary["failed_flows"] = failures
    summary["flows"] = {k: _jsonable(v) for k, v in results.items()}
    summary["billing_export"] = results.get("billing_export", {}).get("export_path")

    from aquameter.report import build_report, compare_faults, load_report_frames

    frames = load_report_frames(url, start, until)
    wq_truth = [{"code": "WQ_LIMIT", "alert": "WQ_LIMIT", "subject": f"{WQ_DEVICE}:turbidity",
                 "start": None, "end": None, "params": {"fault": p.wq_excursion}}]  # fmt: skip
    faults = list(fleet.manifest["faults"]) + wq_truth
    table = compare_faults(faults, frames["alerts"], frames["meters"])
    summary["faults"] = table.to_dicts()
    summary["missed_faults"] = [
        f"{r['fault']} on {r['subject']} (expected {r['expected']})"
        for r in summary["faults"]
        if r["outcome"] == "missed"
    ]
    summary["false_alerts"] = sum(r["count"] for r in summary["faults"] if r["outcome"] == "false")
    summary["failed"] = demo_failures(summary)
    summary["alerts_by_code"] = dict(
        frames["alerts"].group_by("code").len().sort("code").iter_rows()
    )
    with con.status("building the report"):
        summary["report"] = str(
            build_report(
                frames, fleet.dma_flow, fleet.manifest, table, report_dir, failures=failures
            )
        )


def demo_failures(summary: dict[str, Any]) -> list[str]:
    """Why the demo failed, one line per reason (empty: it passed). The demo is an end-to-end
    check of detection, so a missed fault fails it as a failed flow does; the two are named
    apart because a missed fault after a failed flow is most likely that flow's doing."""
    out = list(summary.get("failed_flows") or [])
    out += [f"missed fault: {m}" for m in summary.get("missed_faults") or []]
    out += [f"mixed estate: {m}" for m in kind_failures(summary)]
    return out


def kind_failures(summary: dict[str, Any]) -> list[str]:
    """Each payload format of the estate that did not arrive whole, one line per format.

    Why a failure and not a count: the mixed estate exists to prove every codec carries its
    meters end to end; a format whose meters stored nothing, or (for the standards' formats,
    which go live through their own protocol) whose live readings stored differ from those
    sent, is a broken codec or adapter, however many faults the other meters let us find.
    An interrupted run sent less than it meant to, so only the first check applies then.
    """
    by = summary.get("by_format") or {}
    sent = (summary.get("live") or {}).get("sent_by_format") or {}
    out: list[str] = []
    for fmt, c in by.items():
        if c["meters"] and not c["stored"]:
            out.append(f"{fmt}: {c['meters']} meters, no reading stored")
    if summary.get("interrupted"):
        return out
    for fmt in STANDARD_FORMATS:
        if fmt not in by or not by[fmt]["meters"]:
            continue
        n = int(sent.get(fmt, 0))
        if n == 0 or by[fmt]["stored_live"] != n:
            out.append(f"{fmt}: {n:,} live readings sent, {by[fmt]['stored_live']:,} stored")
    return out


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


def _print_summary(con: Console, s: dict[str, Any], report_dir: Path) -> None:
    ing = s.get("ingest", {})
    t = Table(title="Aquameter demo: what it found", show_lines=False)
    t.add_column("")
    t.add_column("value", justify="right")
    t.add_row("customer meters", f"{s['meters']:,}")
    t.add_row("readings stored", f"{ing.get('stored', 0):,}")
    t.add_row("duplicates ignored", f"{ing.get('duplicates', 0):,}")
    q = ing.get("quarantined", {})
    t.add_row("quarantined", f"{sum(q.values()):,} {q or ''}")
    again = ing.get("quarantine_repeats") or {}
    if again:  # the same rejected input again: counted on its row, not a new row
        t.add_row("quarantine repeats", f"{sum(again.values()):,} {again}")
    t.add_row(
        "live readings (MQTT/CoAP/OPC-UA/CJ/T 188)", f"{s.get('live', {}).get('stored', 0):,}"
    )
    sent = s.get("live", {}).get("sent_by_format") or {}
    for fmt, c in (s.get("by_format") or {}).items():
        live = f"{c['stored_live']:,}"
        if fmt in STANDARD_FORMATS:  # JSON's live day also comes over CoAP, not counted sent
            live += f" of {sent.get(fmt, 0):,} sent"
        t.add_row(
            f"{fmt} meters: readings stored (live)",
            f"{c['meters']:,} meters: {c['stored']:,} ({live})",
        )
    for code, n in s.get("alerts_by_code", {}).items():
        t.add_row(f"alerts {code}", str(n))
    con.print(t)
    f = Table(title="injected faults vs detected alerts")
    for col in ("fault", "subject", "expected alert", "outcome"):
        f.add_column(col)
    for row in s.get("faults", []):
        colour = {"detected": "green", "missed": "red", "false": "yellow"}[row["outcome"]]
        f.add_row(row["fault"], row["subject"], row["expected"], f"[{colour}]{row['outcome']}")
    con.print(f)
    con.print(
        f"report: {report_dir / 'index.html'}  billing export: {s.get('billing_export')}  "
        f"({s.get('elapsed_s')} s)"
    )
    flows = s.get("flows") or {}
    if flows:
        ok = [
            n for n, r in flows.items() if not (isinstance(r, dict) and r.get("status") == "FAILED")
        ]
        con.print(f"flows completed: {', '.join(ok) or 'none'}")
    con.print(f"false alerts: {s.get('false_alerts', 0):,}")
    failed = s.get("failed") or []
    for line in failed:
        con.print(f"[bold red]{escape(line)}[/]", soft_wrap=True)
    if failed:
        n_flows, n_missed = len(s.get("failed_flows") or []), len(s.get("missed_faults") or [])
        why = [f"{n_flows} analytics flow(s) failed"] if n_flows else []
        why += [f"{n_missed} injected fault(s) missed"] if n_missed else []
        kinds = {line.split(":")[1] for line in failed if line.startswith("mixed estate: ")}
        n_kinds = len(kinds)
        why += [f"{n_kinds} payload format(s) not stored whole"] if n_kinds else []
        hint = "; alerts the failed flows should have raised are missing" if n_flows else ""
        con.print(f"[bold red]demo FAILED: {', '.join(why)}{hint}[/]", soft_wrap=True)
    else:
        con.print(
            "[bold green]demo OK: every flow completed, every injected fault detected, "
            "every payload format stored[/]"
        )
