"""Modbus TCP: register decoding, block planning, and the poller against real servers on 127.0.0.1
through the real ingest pipeline into PostgreSQL.

Peers: our pump-station simulator (pymodbus server), Debian ``mbpoll`` reading the simulator, and
PyPI ``pyModbusTCP``'s server read by our poller, so neither side is only checked against itself.
Expected canonical values use the conversion factors of docs/domain.md written out here, not
ingest's own table.
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
import re
import shutil
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from aquameter.embedded import free_port
from aquameter.registry import Device, Registry, load_registry
from ingest.pipeline import IngestPipeline
from ingest.registry_sync import sync_registry
from protocols.modbus import ModbusPoller, plan_device
from protocols.modbus_decode import (
    Block,
    ModbusConfigError,
    decode_point,
    decode_words,
    parse_point,
    plan_blocks,
)
from protocols.uplink import Quality
from simulators.pump_station import PumpStation
from sql.migrate import migrate

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "protocols" / "modbus.sample.toml"
CASES = Path(__file__).resolve().parent / "cases" / "modbus"

# Device unit -> canonical factor (docs/domain.md: 1 bar = 10.197 m, 1 L/s = 3.6 m3/h).
FACTORS = {"bar": 10.197, "L/s": 3.6, "L": 1e-3, "s": 1 / 3600}
MORNING = 1_768_462_200.0  # 2026-01-15 07:30 UTC: morning peak, several pumps run
UNCERTAIN = int(Quality.UNCERTAIN)


# --- decoding: every type x byte order x word order against hand-packed struct bytes --------------
STRUCT_FMT = {
    "int16": "h",
    "uint16": "H",
    "int32": "i",
    "uint32": "I",
    "float32": "f",
    "int64": "q",
    "uint64": "Q",
    "float64": "d",
}
SAMPLES: dict[str, list[Any]] = {
    "int16": [0, 1, -1, 258, 32767, -32768, -12345],
    "uint16": [0, 1, 258, 0x1234, 65535],
    "int32": [0, 1, -1, 0x01020304, 2**31 - 1, -(2**31), -100000],
    "uint32": [0, 1, 0x01020304, 2**31 + 1, 2**32 - 1],
    "float32": [0.0, 1.0, -7.25, 123.456, 3.4e38, -1.5e-38, 6.02e23],
    "int64": [0, -1, 0x0102030405060708, -(2**63), 2**63 - 1],
    "uint64": [0, 0x0102030405060708, 2**64 - 1],
    "float64": [0.0, -2.5, 1.0e300, 0.1],
}


def hand_pack(value: Any, type_: str, byte_order: str, word_order: str) -> list[int]:
    raw = struct.pack(">" + STRUCT_FMT[type_], value)  # ABCD…: the Modbus spec order
    words = [raw[i : i + 2] for i in range(0, len(raw), 2)]
    if word_order == "little":
        words.reverse()
    if byte_order == "little":
        words = [w[::-1] for w in words]
    return [int.from_bytes(w, "big") for w in words]


@pytest.mark.parametrize("word_order", ["big", "little"])
@pytest.mark.parametrize("byte_order", ["big", "little"])
@pytest.mark.parametrize("type_", list(STRUCT_FMT))
def test_decode_matches_hand_packed_bytes(type_, byte_order, word_order):
    for value in SAMPLES[type_]:
        regs = hand_pack(value, type_, byte_order, word_order)
        got = decode_words(regs, type_, byte_order, word_order)
        if type_ == "float32":
            value = struct.unpack(">f", struct.pack(">f", value))[0]
        assert got == float(value), (value, [hex(r) for r in regs])


def test_only_the_matching_order_decodes_a_float():
    regs = hand_pack(123.456, "float32", "big", "little")  # CDAB
    decoded = {
        (b, w): decode_words(regs, "float32", b, w)  # type: ignore[arg-type]
        for b in ("big", "little")
        for w in ("big", "little")
    }
    good = [k for k, v in decoded.items() if math.isclose(v, 123.456, rel_tol=1e-6)]
    assert good == [("big", "little")]


def test_decode_rejects_wrong_register_count():
    with pytest.raises(ValueError):
        decode_words([1], "float32")


# --- block planning ------------------------------------------------------------------------------
def _pt(name, **params):
    return parse_point(name, "", params)


def test_blocks_respect_the_125_register_limit():
    points = [_pt(f"r{i}", address=i) for i in range(200)]
    blocks = plan_blocks(points, max_gap=0)
    assert [(b.address, b.count) for b in blocks] == [(0, 125), (125, 75)]
    # a float32 that would cross the limit starts a new block instead of being cut in half
    points = [_pt("a", address=0), _pt("b", address=124, type="float32")]
    assert [(b.address, b.count) for b in plan_blocks(points, max_gap=200)] == [(0, 1), (124, 2)]


def test_blocks_respect_the_2000_bit_limit_and_gap():
    coils = [_pt(f"c{i}", table="coil", address=i) for i in range(2500)]
    assert [(b.address, b.count) for b in plan_blocks(coils)] == [(0, 2000), (2000, 500)]
    pts = [_pt("x", address=0), _pt("y", address=5)]  # gap of 4 registers
    assert len(plan_blocks(pts, max_gap=4)) == 1
    assert len(plan_blocks(pts, max_gap=3)) == 2


@pytest.mark.parametrize(
    "params, message",
    [
        ({"table": "holding"}, "address"),
        ({"address": "forty"}, "not an integer"),
        ({"address": 1, "table": "memory"}, "table"),
        ({"address": 1, "type": "float16"}, "type"),
        ({"address": 1, "table": "coil", "type": "uint16"}, "bits"),
        ({"address": 1, "type": "bool"}, "bit"),
        ({"address": 1, "type": "bool", "bit": 16}, "0..15"),
        ({"address": 65535, "type": "float32"}, "outside"),
        ({"address": 1, "word_order": "middle"}, "word_order"),
        ({"address": 1, "scale": "ten"}, "scale"),
    ],
)
def test_bad_channel_params_are_named(params, message):
    with pytest.raises(ModbusConfigError, match=message):
        parse_point("ch", "", params, "device X channel ch")


# --- regression cases as data --------------------------------------------------------------------
def _case_dirs(kind: str) -> list[Path]:
    return sorted(
        d
        for d in CASES.iterdir()
        if (d / "case.json").exists() and json.loads((d / "case.json").read_text())["kind"] == kind
    )


@pytest.mark.parametrize("case", _case_dirs("decode"), ids=lambda d: d.name)
def test_decode_case(case):
    spec = json.loads((case / "case.json").read_text())
    point = parse_point("ch", "", spec["params"])
    regs = [int(r, 16) for r in spec["registers"]]
    block = Block(point.table, point.address, len(regs), (point,))
    assert math.isclose(decode_point(point, block, regs), spec["expected"], rel_tol=1e-6)


@pytest.mark.parametrize("case", _case_dirs("plan"), ids=lambda d: d.name)
def test_plan_case(case):
    spec = json.loads((case / "case.json").read_text())
    points = [parse_point(p["channel"], "", p["params"]) for p in spec["points"]]
    got = [
        {
            "table": b.table,
            "address": b.address,
            "count": b.count,
            "channels": [p.channel for p in b.points],
        }
        for b in plan_blocks(points, max_gap=spec["max_gap"])
    ]
    assert got == spec["expected_blocks"]


def test_sample_registry_plans_cleanly():
    registry = load_registry(SAMPLE)
    for dev in registry.devices_by_protocol("modbus"):
        plan, errors = plan_device(dev, registry)
        assert errors == []
        assert len(plan.points) == len(registry.channels_of(dev))


def test_bad_devices_and_channels_are_reported_not_raised():
    registry = Registry.model_validate(
        {
            "vendor": [
                {
                    "id": "v",
                    "channel": [
                        {
                            "name": "ok",
                            "quantity": "flow",
                            "params": {"address": 0, "type": "float32"},
                        },
                        {"name": "typo", "quantity": "flow", "params": {"adress": 2}},
                    ],
                }
            ],
            "device": [
                {"id": "no-host", "vendor": "v", "protocol": "modbus", "params": {}},
                {
                    "id": "good",
                    "vendor": "v",
                    "protocol": "modbus",
                    "params": {"host": "127.0.0.1"},
                },
            ],
        }
    )
    poller = ModbusPoller(registry.devices_by_protocol("modbus"), registry, sink=None)  # type: ignore[arg-type]
    assert [p.device for p in poller.plans] == ["good"]
    assert [p.channel for p in poller.plans[0].points] == ["ok"]
    errors = " | ".join(poller.stats.config_errors)
    assert "no-host" in errors and "host" in errors
    assert "good channel typo" in errors and "address" in errors


# --- helpers for the integration tests -----------------------------------------------------------
def setup_db(url: str, registry_path: Path) -> Registry:
    registry = load_registry(registry_path)
    with psycopg.connect(url) as conn:
        migrate(conn, partitions_ahead=2)
        sync_registry(conn, registry)
        conn.commit()
    return registry


def sample_registry(tmp_path: Path, port: int, interval: float = 0.2) -> Path:
    """The shipped sample, pointed at our simulator and polled fast."""
    text = SAMPLE.read_text()
    text = text.replace("port = 5020", f"port = {port}")
    text = text.replace("poll_interval_s = 10.0", f"poll_interval_s = {interval}")
    path = tmp_path / "registry.toml"
    path.write_text(text)
    return path


def stations_registry(
    tmp_path: Path,
    stations: dict[str, int],
    *,
    interval: float = 0.15,
    timeout: float = 0.5,
    extra_station_channels: tuple[str, ...] = (),
) -> Path:
    """The sample's vendors (its register map) with one station + inlet device per port."""
    text = SAMPLE.read_text()
    head = text[: text.index("\n[[device]]\n")]
    if extra_station_channels:
        anchor = 'name = "Three-pump booster station PLC (Modbus TCP)"\nchannel = [\n'
        head = head.replace(anchor, anchor + "\n".join(extra_station_channels) + "\n")
    parts = [head]
    for name, port in stations.items():
        common = (
            f'host = "127.0.0.1", port = {port}, poll_interval_s = {interval}, '
            f"timeout_s = {timeout}, backoff_min_s = 0.1, backoff_max_s = 0.4"
        )
        parts.append(
            f'[[device]]\nid = "{name}"\nvendor = "ps3-plc"\nprotocol = "modbus"\n'
            f'dma = "DMA-NORTH"\nparams = {{ {common}, unit_id = 1 }}\n'
        )
        parts.append(
            f'[[device]]\nid = "{name}-INLET"\nvendor = "inlet-meter-modbus"\n'
            f'protocol = "modbus"\ndma = "DMA-NORTH"\n'
            f"params = {{ {common}, unit_id = 2 }}\n"
        )
    path = tmp_path / "stations.toml"
    path.write_text("\n".join(parts))
    return path


async def run_poller(poller: ModbusPoller, script: Callable[[], Awaitable[None]] | float) -> None:
    task = asyncio.create_task(poller.run())
    try:
        if callable(script):
            await script()
        else:
            await asyncio.sleep(script)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def serve_and_poll(
    stations: list[PumpStation],
    poller: ModbusPoller,
    script: Callable[[], Awaitable[None]] | float,
) -> None:
    """Frozen stations serve while the poller runs ``script``; they close after it stopped."""
    for st in stations:
        await st.start(clock=False)
    try:
        await run_poller(poller, script)
    finally:
        for st in stations:
            await st.close()


def fetch_rows(url: str) -> list[tuple[str, str, float, float, int]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            """SELECT c.device_id, c.name, extract(epoch FROM r.ts)::float8, r.value, r.quality
               FROM readings r JOIN channels c ON c.id = r.channel_id
               ORDER BY c.device_id, c.name, r.ts"""
        ).fetchall()


def fetch_quarantine(url: str) -> list[tuple[str, str, str]]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT device_id, reason, detail FROM quarantine").fetchall()


def by_channel(rows: list[tuple]) -> dict[tuple[str, str], list[tuple[float, float, int]]]:
    out: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
    for dev, ch, ts, value, quality in rows:
        out.setdefault((dev, ch), []).append((ts, value, quality))
    return out


def channel_units(registry: Registry, device: Device) -> dict[str, str]:
    return {ch.name: ch.unit for ch in registry.channels_of(device)}


def expected_canonical(truth: dict[str, float], units: dict[str, str]) -> dict[str, float]:
    return {name: truth[name] * FACTORS.get(units[name], 1.0) for name in units}


# --- our poller against our simulator ------------------------------------------------------------
def test_poller_stores_simulator_values_in_canonical_units(empty_db_url, tmp_path):
    port = free_port()
    registry = setup_db(empty_db_url, sample_registry(tmp_path, port))
    pipeline = IngestPipeline(empty_db_url, batch_seconds=0.05).start()
    station = PumpStation(port=port, start_epoch=MORNING)
    poller = ModbusPoller(registry.devices_by_protocol("modbus"), registry, pipeline)

    async def scenario() -> None:
        await station.start(clock=False)  # frozen state: every poll must read the same values
        station.advance(1800)
        station.trip(2)
        try:
            await run_poller(poller, 1.3)
        finally:
            await station.close()

    try:
        asyncio.run(scenario())
    finally:
        pipeline.close()

    truth = station.truth()
    assert truth["station"]["pump2_tripped"] == 1.0 and truth["station"]["pump2_trips"] == 1.0
    assert sum(truth["station"][f"pump{n}_running"] for n in (1, 2, 3)) >= 1
    rows = by_channel(fetch_rows(empty_db_url))
    devices = {d.id: d for d in registry.devices_by_protocol("modbus")}
    for dev_id, part in (("PS-NORTH", "station"), ("PS-NORTH-INLET", "meter")):
        expected = expected_canonical(truth[part], channel_units(registry, devices[dev_id]))
        for name, value in expected.items():
            got = rows.get((dev_id, name), [])
            assert len(got) >= 3, (dev_id, name, got)
            for _, v, q in got:
                assert math.isclose(v, value, rel_tol=1e-9, abs_tol=1e-12), (name, v, value)
                assert q == 0
    # spot checks in plain numbers: bar -> m, L/s -> m3/h, L -> m3, s -> h
    pressure = rows[("PS-NORTH", "header_pressure")][0][1]
    assert math.isclose(pressure, truth["station"]["header_pressure"] * 10.197)
    assert 30 < pressure < 90  # a 3-6 bar booster station, in metres of head
    assert math.isclose(
        rows[("PS-NORTH", "pump2_run_time")][0][1], truth["station"]["pump2_run_time"] / 3600
    )
    s = poller.stats
    assert s.timeouts == s.exceptions == s.connect_failures == s.disconnects == s.errors == 0
    # Every poll made succeeded. How many ticks were skipped depends on the machine's load (a
    # device still polling skips its next tick by design), so it is not asserted here.
    assert s.connects == 2 and s.polls == s.polls_ok and s.polls_failed == s.polls_partial == 0
    assert s.accepted == len(fetch_rows(empty_db_url)) == s.readings
    assert s.registers_read > 0 and s.bits_read > 0
    assert fetch_quarantine(empty_db_url) == []
    served = station.manifest()["served"]["requests"]
    assert served.get(3, 0) >= 2 * 3 and served.get(1, 0) >= 3 and served.get(4, 0) >= 3


def test_running_station_values_evolve_and_each_was_served(empty_db_url, tmp_path):
    port = free_port()
    registry = setup_db(empty_db_url, sample_registry(tmp_path, port, interval=0.1))
    pipeline = IngestPipeline(empty_db_url, batch_seconds=0.05).start()
    # one wall second = one simulated hour
    station = PumpStation(port=port, start_epoch=MORNING, time_scale=3600.0, tick_s=0.1)
    poller = ModbusPoller(registry.devices_by_protocol("modbus"), registry, pipeline)

    served = set()

    async def scenario() -> None:
        await station.start()
        served.add(station.truth()["station"]["station_flow"])  # before the first tick
        try:
            await run_poller(poller, 1.5)
        finally:
            await station.close()

    try:
        asyncio.run(scenario())
    finally:
        pipeline.close()
    rows = by_channel(fetch_rows(empty_db_url))
    total = [v for _, v, _ in rows[("PS-NORTH-INLET", "inlet_total")]]
    assert len(total) >= 5 and total == sorted(total) and total[-1] > total[0]
    grew = 0
    for n in (1, 2, 3):
        series = [v for _, v, _ in rows[("PS-NORTH", f"pump{n}_run_time")]]
        assert series == sorted(series)  # run hours never go back
        grew += series[-1] > series[0]
    assert grew >= 1
    served.update(
        snap["values"]["station"]["station_flow"] for snap in station.manifest()["history"]
    )
    flows = [v for _, v, _ in rows[("PS-NORTH", "station_flow")]]
    assert len(set(flows)) >= 2  # demand moved over the simulated hour and a half
    for v in flows:
        assert v in served  # every stored value is one the station actually held


# --- independent peer (a): Debian mbpoll reads the simulator ------------------------------------
MBPOLL = shutil.which("mbpoll")


async def mbpoll(port: int, unit: int, kind: str, ref: int, count: int, big: bool) -> list[float]:
    args = [
        MBPOLL,
        "-m",
        "tcp",
        "-a",
        str(unit),
        "-p",
        str(port),
        "-t",
        kind,
        "-r",
        str(ref),
        "-c",
        str(count),
        "-1",
        "-o",
        "2",
    ]
    if big:
        args.append("-B")
    proc = await asyncio.create_subprocess_exec(
        *args,
        "127.0.0.1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()
    values = dict(re.findall(r"^\[(\d+)\]:\s+(\S+)", out.decode(), re.M))
    return [float(values[str(ref + 2 * i)]) for i in range(count)]


@pytest.mark.skipif(MBPOLL is None, reason="Debian package mbpoll is not installed")
@pytest.mark.parametrize("word_order", ["big", "little"])
def test_mbpoll_reads_the_documented_map(word_order):
    port = free_port()
    station = PumpStation(port=port, start_epoch=MORNING, word_order=word_order)

    async def scenario() -> dict[str, list[float]]:
        await station.start(clock=False)
        station.advance(7200)
        big = word_order == "big"  # mbpoll -B reads high word first; without it, low word first
        try:
            return {
                # holding float32 at PDU 0 and 2: pump 1 flow, discharge (references 1 and 3)
                "pump1": await mbpoll(port, 1, "4:float", 1, 2, big),
                # holding uint32 at PDU 6: pump 1 run time in s (reference 7)
                "run": await mbpoll(port, 1, "4:int", 7, 1, big),
                # station header pressure, float32 at PDU 100 (reference 101)
                "header": await mbpoll(port, 1, "4:float", 101, 1, big),
                # inlet meter, unit 2, input registers: flow float32 @0, totaliser uint32 @2
                "meter_flow": await mbpoll(port, 2, "3:float", 1, 1, big),
                "meter_total": await mbpoll(port, 2, "3:int", 3, 1, big),
                "wrong_order": await mbpoll(port, 2, "3:float", 1, 1, not big),
            }
        finally:
            await station.close()

    got = asyncio.run(scenario())
    t = station.truth()
    s, m = t["station"], t["meter"]
    assert s["pump1_run_time"] > 0 and m["inlet_total"] > 0 and m["inlet_flow"] > 1
    assert got["pump1"][0] == pytest.approx(s["pump1_flow"], rel=1e-5)
    assert got["pump1"][1] == pytest.approx(s["pump1_discharge"], rel=1e-5)
    assert got["run"] == [s["pump1_run_time"]]
    assert got["header"][0] == pytest.approx(s["header_pressure"], rel=1e-5)
    assert got["meter_flow"][0] == pytest.approx(m["inlet_flow"], rel=1e-5)
    assert got["meter_total"] == [m["inlet_total"]]
    assert got["wrong_order"][0] != pytest.approx(m["inlet_flow"], rel=1e-3)


# --- independent peer (b): our poller reads pyModbusTCP's server ---------------------------------
def test_poller_reads_an_independent_slave(empty_db_url, tmp_path):
    server_mod = pytest.importorskip("pyModbusTCP.server", reason="pip install pyModbusTCP")
    case = CASES / "independent-slave-mixed-encodings"
    slave = json.loads((case / "slave.json").read_text())
    port = free_port()
    reg_path = tmp_path / "registry.toml"
    reg_path.write_text((case / "registry.toml").read_text().replace("{port}", str(port)))
    registry = setup_db(empty_db_url, reg_path)

    server = server_mod.ModbusServer(host="127.0.0.1", port=port, no_block=True)
    bank = server.data_bank
    for addr, words in slave["holding"].items():
        bank.set_holding_registers(int(addr), [int(w, 16) for w in words])
    for addr, words in slave["input"].items():
        bank.set_input_registers(int(addr), [int(w, 16) for w in words])
    for addr, bits in slave["coil"].items():
        bank.set_coils(int(addr), bits)
    for addr, bits in slave["discrete"].items():
        bank.set_discrete_inputs(int(addr), bits)
    server.start()
    pipeline = IngestPipeline(empty_db_url, batch_seconds=0.05).start()
    poller = ModbusPoller(registry.devices_by_protocol("modbus"), registry, pipeline)
    try:
        asyncio.run(run_poller(poller, 1.0))
    finally:
        pipeline.close()
        server.stop()

    rows = by_channel(fetch_rows(empty_db_url))
    quarantine = fetch_quarantine(empty_db_url)
    with open(case / "expected.csv") as fh:
        expected = list(csv.DictReader(fh))
    polls = poller.stats.polls
    assert polls >= 3 and poller.stats.timeouts == poller.stats.exceptions == 0
    for row in expected:
        got = rows.get(("PLC-T", row["channel"]), [])
        if row["outcome"] == "stored":
            assert len(got) == polls, row
            for _, v, q in got:
                assert v == pytest.approx(float(row["value"]), rel=1e-6), row
                assert q == 0
        else:
            assert got == [], row
    rejected = sorted(r["outcome"] for r in expected if r["outcome"] != "stored")
    assert sorted(reason for dev, reason, _ in quarantine if dev == "PLC-T") == sorted(
        rejected * polls
    )
    assert len(quarantine) == len(rejected) * polls


# --- faults: a station dies while another keeps flowing ------------------------------------------
@pytest.mark.parametrize("fault", ["go_away", "silence"])
def test_dead_station_does_not_stall_the_healthy_one(empty_db_url, tmp_path, fault):
    port_a, port_b = free_port(), free_port()
    registry = setup_db(empty_db_url, stations_registry(tmp_path, {"PS-A": port_a, "PS-B": port_b}))
    pipeline = IngestPipeline(empty_db_url, batch_seconds=0.05).start()
    a = PumpStation(name="A", port=port_a, start_epoch=MORNING)
    b = PumpStation(name="B", port=port_b, start_epoch=MORNING, seed=1)
    poller = ModbusPoller(registry.devices_by_protocol("modbus"), registry, pipeline)
    marks: dict[str, Any] = {}

    async def scenario() -> None:
        await asyncio.sleep(0.8)
        marks["fault"] = time.time()
        if fault == "go_away":
            await a.go_away()
        else:
            a.silence(True)
        await asyncio.sleep(1.6)
        status = poller.stats.devices["PS-A"]
        marks["during"] = (status.bad_since, dict(status.failed_channels), status.retry_in_s)
        marks["recover"] = time.time()
        if fault == "go_away":
            await a.come_back()
        else:
            a.silence(False)
        await asyncio.sleep(1.6)

    try:
        asyncio.run(serve_and_poll([a, b], poller, scenario))
    finally:
        pipeline.close()

    rows = fetch_rows(empty_db_url)
    t_fault, t_recover = marks["fault"], marks["recover"]
    b_ts = sorted({ts for dev, ch, ts, _, _ in rows if dev == "PS-B"})
    during_b = [t for t in b_ts if t_fault <= t <= t_recover]
    assert len(during_b) >= 4, "the healthy station kept being polled during the outage"
    assert max(y - x for x, y in zip(b_ts, b_ts[1:], strict=False)) < 1.5
    a_rows = [r for r in rows if r[0].startswith("PS-A")]
    # nothing invented during the outage (a poll stamped just before recovery may succeed)
    assert not [r for r in a_rows if t_fault < r[2] < t_recover - 0.2]
    after = by_channel([r for r in a_rows if r[2] > t_recover - 0.2])
    assert len(after) == 32, "every channel of the dead station is back"
    for (_dev, _ch), series in after.items():
        assert series[0][2] == UNCERTAIN and all(q == 0 for _, _, q in series[1:])
        assert len(series) >= 2
    bad_since, failed, retry = marks["during"]
    assert bad_since is not None and bad_since <= t_recover and len(failed) == 30
    assert 0.09 <= retry <= 0.45  # bounded backoff (0.1 s doubling to 0.4 s, ±10 %)
    status = poller.stats.devices["PS-A"]
    assert status.bad_since is None and status.failed_channels == {}
    s = poller.stats
    if fault == "go_away":
        assert s.disconnects >= 2  # both of A's connections were dropped by the station
        assert s.connect_failures >= 2  # and refused while it was away
    else:
        assert s.timeouts >= 2
        assert a.manifest()["served"]["dropped_responses"] >= 2
    assert s.connects >= 6  # 4 devices + A's two reconnecting at least once
    assert s.polls_failed >= 2
    # nothing lost, nothing twice: every submitted reading is one row
    assert s.accepted == s.readings == len(rows) and s.quarantined == 0
    assert len(rows) == len({(dev, ch, ts) for dev, ch, ts, _, _ in rows})
    assert fetch_quarantine(empty_db_url) == []
    assert [f["kind"] for f in a.manifest()["faults"]][:1] == (
        ["server_stop"] if fault == "go_away" else ["silence"]
    )


def test_station_that_never_answers_backs_off_without_frames(empty_db_url, tmp_path):
    port = free_port()  # nothing listens here
    registry = setup_db(empty_db_url, stations_registry(tmp_path, {"PS-X": port}, interval=0.1))
    pipeline = IngestPipeline(empty_db_url).start()
    poller = ModbusPoller(registry.devices_by_protocol("modbus"), registry, pipeline)
    try:
        asyncio.run(run_poller(poller, 1.2))
    finally:
        pipeline.close()
    s = poller.stats
    # backoff 0.1, 0.2, 0.4, 0.4 … : a handful of attempts per device, not one per 0.1 s poll
    assert 4 <= s.connect_failures <= 14
    assert s.frames == 0 and fetch_rows(empty_db_url) == []
    assert all(d.consecutive_failures >= 2 for d in s.devices.values())


# --- exception responses ------------------------------------------------------------------------
def test_exception_response_blanks_only_its_channel(empty_db_url, tmp_path):
    port = free_port()
    registry = setup_db(empty_db_url, stations_registry(tmp_path, {"PS-E": port}, interval=0.15))
    pipeline = IngestPipeline(empty_db_url, batch_seconds=0.05).start()
    station = PumpStation(port=port, start_epoch=MORNING)
    poller = ModbusPoller(registry.devices_by_protocol("modbus"), registry, pipeline)
    marks: dict[str, float] = {}

    async def scenario() -> None:
        await asyncio.sleep(0.5)
        marks["inject"] = time.time()
        station.inject_exception("holding", 12, code=4)  # pump 2 discharge: failed module
        await asyncio.sleep(1.0)
        marks["clear"] = time.time()
        station.clear_exceptions()
        await asyncio.sleep(0.8)

    try:
        asyncio.run(serve_and_poll([station], poller, scenario))
    finally:
        pipeline.close()
    rows = by_channel(fetch_rows(empty_db_url))
    t_inject, t_clear = marks["inject"], marks["clear"]
    bad = rows[("PS-E", "pump2_discharge")]
    # (a poll stamped just before the clear may be answered just after it)
    assert not [r for r in bad if t_inject < r[0] < t_clear - 0.2]
    later = [r for r in bad if r[0] > t_inject]  # the first value after the fault is UNCERTAIN
    assert len(later) >= 3 and later[-1][0] > t_clear
    assert later[0][2] == UNCERTAIN and all(q == 0 for _, _, q in later[1:])
    for neighbour in ("pump2_flow", "pump1_flow", "pump3_suction", "pump2_running"):
        during = [r for r in rows[("PS-E", neighbour)] if t_inject < r[0] <= t_clear]
        assert len(during) >= 4, neighbour
        assert all(q == 0 for _, _, q in rows[("PS-E", neighbour)])
    s = poller.stats
    # each poll in the fault: the merged block (refused) and then the single point (refused)
    assert s.exceptions >= 8 and set(s.exception_codes) == {4}
    assert s.exception_codes[4] == s.exceptions
    assert s.devices["PS-E"].split_blocks == 0  # device failure is transient: keep the block
    assert s.timeouts == s.disconnects == 0
    assert station.manifest()["served"]["exceptions"] == {4: s.exceptions}


def test_illegal_address_splits_the_block_for_good(empty_db_url, tmp_path):
    port = free_port()
    bogus = (
        '  { name = "spare", quantity = "count", unit = "count", '
        'params = { table = "holding", address = 35, type = "uint16" } },'
    )
    registry = setup_db(
        empty_db_url,
        stations_registry(tmp_path, {"PS-G": port}, interval=0.15, extra_station_channels=(bogus,)),
    )
    pipeline = IngestPipeline(empty_db_url, batch_seconds=0.05).start()
    station = PumpStation(port=port, start_epoch=MORNING)
    poller = ModbusPoller(registry.devices_by_protocol("modbus"), registry, pipeline)

    try:
        asyncio.run(serve_and_poll([station], poller, 1.2))
    finally:
        pipeline.close()
    rows = by_channel(fetch_rows(empty_db_url))
    assert ("PS-G", "spare") not in rows
    counts = {ch: len(v) for (dev, ch), v in rows.items() if dev == "PS-G"}
    assert len(counts) == 30 and min(counts.values()) >= 4
    s = poller.stats
    assert s.devices["PS-G"].split_blocks == 1
    assert s.exception_codes == {2: s.exceptions}
    # the merged read fails once; afterwards only the spare register's own read is refused
    polls_g = counts["pump1_flow"]
    assert polls_g <= s.exceptions <= polls_g + 2
    assert s.devices["PS-G"].failed_channels.keys() == {"spare"}
