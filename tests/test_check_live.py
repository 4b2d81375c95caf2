"""``aquameter check --poll`` / ``--listen`` against real servers on 127.0.0.1: a pymodbus station
(our pump-station simulator), an asyncua water-quality station, the real broker. Printed values
are compared with each server's own ground truth, and the database the registry was synced into
must hold no reading and no quarantine row afterwards."""

from __future__ import annotations

import asyncio
import io
import json
import math
import re
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

import psycopg
import pytest

from aquameter.check_live import registry_index, run_listen, run_poll
from aquameter.embedded import free_port
from aquameter.registry import Registry, load_registry
from aquameter.runtime import speaks_mqtt5
from aquameter.settings import Settings
from ingest.registry_sync import sync_registry
from protocols.mqtt import uplink_topic
from protocols.payloads import encode_binary_v1
from simulators.pump_station import PumpStation
from simulators.wq_station import WqStation, WqStationConfig
from sql.migrate import migrate
from tests.mqtt_helpers import publish_all
from tests.servers import EXAMPLE_REGISTRY
from tests.test_opcua import WQ_CHANNELS, _device, _registry_toml

ROOT = Path(__file__).resolve().parent.parent
MODBUS_SAMPLE = ROOT / "protocols" / "modbus.sample.toml"
MORNING = 1_768_462_200.0  # 2026-01-15 07:30 UTC: morning peak, pumps run
# Device unit -> canonical factor, written out (docs/domain.md), not ingest's own table.
FACTORS = {"bar": 10.197, "L/s": 3.6, "L": 1e-3, "s": 1 / 3600}


def sample_registry(tmp_path: Path, port: int) -> Path:
    """The shipped Modbus sample, pointed at our simulator."""
    path = tmp_path / "registry.toml"
    path.write_text(MODBUS_SAMPLE.read_text().replace("port = 5020", f"port = {port}"))
    return path


def setup_db(url: str, path: Path) -> Registry:
    """Migrate ``url`` and sync the registry at ``path`` into it (so ingest *could* store)."""
    registry = load_registry(path)
    with psycopg.connect(url) as conn:
        migrate(conn, partitions_ahead=2)
        sync_registry(conn, registry)
        conn.commit()
    return registry


LINE = re.compile(
    r"^(?P<ts>\S+Z)  (?P<kind>meter|sensor) (?P<subject>\S+)  (?P<channel>\S+)  "
    r"(?P<value>\S+) (?P<unit>\S+)  quality=(?P<quality>\d+)"
)


def _readings(text: str) -> dict[tuple[str, str], list[tuple[str, float, str, int]]]:
    """(subject, channel) -> [(ts, value, unit, quality)] of every printed reading line."""
    out: dict[tuple[str, str], list[tuple[str, float, str, int]]] = {}
    for line in text.splitlines():
        m = LINE.match(line)
        if m:
            out.setdefault((m["subject"], m["channel"]), []).append(
                (m["ts"], float(m["value"]), m["unit"], int(m["quality"]))
            )
    return out


def _stored(url: str) -> tuple[int, int]:
    with psycopg.connect(url) as conn:
        readings = conn.execute("SELECT count(*) FROM readings").fetchone()
        quarantine = conn.execute("SELECT count(*) FROM quarantine").fetchone()
    assert readings is not None and quarantine is not None
    return int(readings[0]), int(quarantine[0])


def _settings(**kw: object) -> Settings:
    return Settings(**kw)  # type: ignore[arg-type]


# --- --poll: Modbus ------------------------------------------------------------------------------
def test_poll_modbus_prints_canonical_values_and_writes_nothing(
    empty_db_url: str, tmp_path: Path
) -> None:
    port = free_port()
    path = sample_registry(tmp_path, port)
    registry = setup_db(empty_db_url, path)  # synced: ingest *could* store these channels
    station = PumpStation(port=port, start_epoch=MORNING)
    out, err = io.StringIO(), io.StringIO()

    async def scenario() -> int:
        await station.start(clock=False)  # frozen: the poll reads exactly the truth
        station.advance(1800)
        try:
            return await asyncio.to_thread(
                run_poll, registry, "PS-NORTH", _settings(), out=out, err=err
            )
        finally:
            await station.close()

    code = asyncio.run(scenario())
    assert code == 0, err.getvalue()
    printed = _readings(out.getvalue())
    dev = next(d for d in registry.all_devices() if d.id == "PS-NORTH")
    truth = station.truth()["station"]
    expected = {
        ch.name: truth[ch.name] * FACTORS.get(ch.unit, 1.0) for ch in registry.channels_of(dev)
    }
    assert len(expected) >= 5
    for name, value in expected.items():
        ((ts, got, unit, quality),) = printed[("PS-NORTH:" + name, name)]
        assert math.isclose(got, value, rel_tol=1e-9, abs_tol=1e-9), (name, got, value)
        assert quality == 0 and ts.endswith("Z")
    # bar -> m of head, as stored
    assert printed[("PS-NORTH:header_pressure", "header_pressure")][0][2] == "m"
    assert out.getvalue().splitlines()[-1] == f"frames=1 readings={len(expected)} rejected=0"
    assert station.manifest()["served"]["requests"].get(3, 0) >= 1  # a real request was served
    assert _stored(empty_db_url) == (0, 0)


def test_poll_names_a_channel_the_station_refuses_and_exits_1(tmp_path: Path) -> None:
    port = free_port()
    path = sample_registry(tmp_path, port)
    spare = (
        '  { name = "spare", quantity = "count", unit = "count", '
        'params = { table = "holding", address = 35, type = "uint16" } },'
    )
    anchor = 'name = "Three-pump booster station PLC (Modbus TCP)"\nchannel = [\n'
    path.write_text(path.read_text().replace(anchor, anchor + spare + "\n"))
    registry = load_registry(path)
    station = PumpStation(port=port, start_epoch=MORNING)
    out, err = io.StringIO(), io.StringIO()

    async def scenario() -> int:
        await station.start(clock=False)
        try:
            return await asyncio.to_thread(
                run_poll, registry, "PS-NORTH", _settings(), out=out, err=err
            )
        finally:
            await station.close()

    assert asyncio.run(scenario()) == 1
    assert "not read: device PS-NORTH channel spare" in err.getvalue()
    assert "answered Modbus exceptions (code: count) 2: " in err.getvalue()
    printed = _readings(out.getvalue())
    assert ("PS-NORTH:spare", "spare") not in printed
    assert ("PS-NORTH:pump1_flow", "pump1_flow") in printed  # its neighbours still read
    assert out.getvalue().splitlines()[-1] == f"frames=1 readings={len(printed)} rejected=0"


def test_registry_index_matches_what_ingest_loads_after_sync(db_url: str) -> None:
    """The index --poll/--listen validate with is the one ingest loads from the database after
    ``devices sync`` of the same file: same channels, units, ranges, install dates, aliases."""
    from ingest.channels import ChannelIndex

    mine, labels = registry_index(load_registry(EXAMPLE_REGISTRY))
    with psycopg.connect(db_url) as conn:
        loaded = ChannelIndex.load(conn)

    def key(index: ChannelIndex) -> dict[tuple[str, str], tuple[object, ...]]:
        return {
            k: (c.quantity, c.unit, c.device_unit, c.min_value, c.max_value, c.install_epoch)
            for k, c in index.by_key.items()
        }

    assert key(mine) == key(loaded) and len(mine) > 100
    assert mine.aliases == loaded.aliases and mine.aliases
    assert mine.vendors == loaded.vendors and mine.gateways == loaded.gateways
    assert labels[mine.by_key[("AQN00001", "register")].id].subject == "meter AQN00001"


def test_poll_unreachable_modbus_is_one_line_with_address_and_timeout(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    registry = load_registry(sample_registry(tmp_path, port))
    out, err = io.StringIO(), io.StringIO()
    code = run_poll(registry, "PS-NORTH", _settings(), out=out, err=err)
    assert code == 1 and out.getvalue() == ""
    (line,) = err.getvalue().splitlines()
    assert f"127.0.0.1:{port}" in line and "timeout_s = 1 s" in line


# --- --poll: OPC-UA ------------------------------------------------------------------------------
def test_poll_opcua_prints_the_station_values_with_source_time(
    empty_db_url: str, tmp_path: Path
) -> None:
    station = WqStation(WqStationConfig(port=free_port(), tick_s=0.2, pump=False, source_lag_s=1))
    path = tmp_path / "registry.toml"
    path.write_text(_registry_toml([_device("WQ1", station.config.endpoint)]))
    registry = setup_db(empty_db_url, path)
    out, err = io.StringIO(), io.StringIO()

    async def scenario() -> int:
        await station.start()
        await asyncio.sleep(0.5)
        await station.pause()  # values frozen: the last sample written is what a read returns
        try:
            return await asyncio.to_thread(run_poll, registry, "WQ1", _settings(), out=out, err=err)
        finally:
            await station.stop()

    code = asyncio.run(scenario())
    assert code == 0, err.getvalue()
    printed = _readings(out.getvalue())
    history = station.manifest()["history"]
    for channel, (_, unit, var) in WQ_CHANNELS.items():
        t, value, _status = history[var][-1]
        ((ts, got, got_unit, quality),) = printed[(f"WQ1:{channel}", channel)]
        assert got == pytest.approx(value, rel=1e-9) and quality == 0
        assert got_unit == unit  # pH, NTU and mg/L are canonical already
        # the analyser's SourceTimestamp (1 s before the server wrote it), to the millisecond
        printed_ms = round(datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() * 1000)
        assert printed_ms == round(t * 1000)
    assert out.getvalue().splitlines()[-1] == f"frames=1 readings={len(WQ_CHANNELS)} rejected=0"
    assert _stored(empty_db_url) == (0, 0)


def test_poll_unreachable_opcua_is_one_line(tmp_path: Path) -> None:
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}/nothing/"
    path = tmp_path / "registry.toml"
    path.write_text(_registry_toml([_device("WQ1", endpoint)]))
    err = io.StringIO()
    code = run_poll(load_registry(path), "WQ1", _settings(), err=err, connect_timeout_s=2)
    assert code == 1
    (line,) = err.getvalue().splitlines()
    assert endpoint in line and "connect timeout 2 s" in line


# --- --poll: what cannot be polled ---------------------------------------------------------------
def test_poll_unknown_device_names_the_known_ones(tmp_path: Path) -> None:
    registry = load_registry(sample_registry(tmp_path, 5020))
    err = io.StringIO()
    assert run_poll(registry, "PS-NORHT", _settings(), err=err) == 2
    (line,) = err.getvalue().splitlines()
    assert "unknown device 'PS-NORHT'" in line and "did you mean 'PS-NORTH'?" in line
    assert "PS-NORTH-INLET" in line


def test_poll_of_a_push_device_points_to_listen() -> None:
    err = io.StringIO()
    assert run_poll(load_registry(EXAMPLE_REGISTRY), "AQN00001", _settings(), err=err) == 2
    assert "--listen" in err.getvalue() and len(err.getvalue().splitlines()) == 1


# --- --listen ------------------------------------------------------------------------------------
def test_listen_prints_decoded_readings_and_rejections_and_writes_nothing(
    mqtt_url: str, db_url: str
) -> None:
    registry = load_registry(EXAMPLE_REGISTRY)  # db_url has it synced
    root = f"aqt-{uuid.uuid4().hex[:8]}/v1"  # this test's own topics on a shared broker
    t0 = int(time.time()) // 900 * 900 - 3600
    messages = [
        (
            uplink_topic(root, "aqualink", "AQN00001"),
            json.dumps({"dev": "AQN00001", "t0": t0, "step": 900, "reg": [12.5, 12.75]}).encode(),
        ),
        (uplink_topic(root, "kamstrup-nb", "KMS00002"), encode_binary_v1(70000002, t0, 900, [7])),
        (
            uplink_topic(root, "aqualink", "NOPE"),
            json.dumps({"dev": "NOPE", "ts": t0, "reg": 1.0}).encode(),
        ),
        (uplink_topic(root, "aqualink", "AQN00003"), b"{not json"),
        (f"{root}/aqualink/gw/up", b"{}"),
    ]
    out, err = io.StringIO(), io.StringIO()
    ready = threading.Event()
    settings = _settings(mqtt_url=mqtt_url, mqtt_topic_root=root)
    result: list[int] = []
    listener = threading.Thread(
        target=lambda: result.append(
            run_listen(
                registry,
                4.0,
                settings,
                (mqtt_url, speaks_mqtt5(mqtt_url)),
                out=out,
                err=err,
                ready=ready,
            )
        )
    )
    listener.start()
    try:
        assert ready.wait(30), err.getvalue()
        publish_all(mqtt_url, messages)
    finally:
        listener.join(60)
    assert result == [0], err.getvalue()
    text = out.getvalue()
    printed = _readings(text)
    assert [(v, u) for _, v, u, _ in printed[("AQN00001", "register")]] == [
        (12.5, "m3"),
        (12.75, "m3"),
    ]
    ((_, value, unit, _),) = printed[("KMS00002", "register")]
    # binary-v1 registers count litres (protocols/payloads.py); printed in canonical m3
    assert unit == "m3" and value == pytest.approx(0.007)
    assert "REJECTED UNKNOWN_DEVICE" in text and "REJECTED MALFORMED" in text
    assert "REJECTED UNKNOWN_TOPIC" in text
    assert text.splitlines()[-1] == (
        "frames=5 readings=3 rejected=3 (MALFORMED=1, UNKNOWN_DEVICE=1, UNKNOWN_TOPIC=1)"
    )
    assert _stored(db_url) == (0, 0)


def test_listen_without_a_reachable_broker_is_one_line() -> None:
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    err = io.StringIO()
    code = run_listen(
        Registry(), 1.0, _settings(mqtt_url=url), (url, True), err=err, connect_timeout_s=1
    )
    assert code == 1
    (line,) = err.getvalue().splitlines()
    assert f"127.0.0.1:{port}" in line and "connect timeout 1 s" in line


COAP_REGISTRY = """\
[[dma]]
id = "D1"

[[vendor]]
id = "acme-nb"
payload = "json"
channel = [{ name = "register", quantity = "volume", unit = "m3", kind = "register" }]

[[device]]
id = "NB9"
vendor = "acme-nb"
protocol = "coap"
dma = "D1"
allow_plain_coap = true
  [device.meter]
  id = "NB9"
"""


def test_listen_serves_coap_too_and_answers_5_00_so_the_meter_sends_again(
    mqtt_url: str, tmp_path: Path
) -> None:
    import aiocoap
    from aiocoap.numbers.codes import Code

    path = tmp_path / "coap.toml"
    path.write_text(COAP_REGISTRY)
    registry = load_registry(path)
    port = free_port()
    settings = _settings(
        mqtt_url=mqtt_url, mqtt_topic_root=f"aqt-{uuid.uuid4().hex[:8]}/v1", coap_port=port
    )
    t0 = int(time.time()) // 900 * 900 - 900
    out, err = io.StringIO(), io.StringIO()
    ready = threading.Event()
    result: list[int] = []
    listener = threading.Thread(
        target=lambda: result.append(
            run_listen(
                registry,
                3.0,
                settings,
                (mqtt_url, speaks_mqtt5(mqtt_url)),
                out=out,
                err=err,
                ready=ready,
            )
        )
    )

    async def post() -> aiocoap.Message:
        ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
        try:
            msg = aiocoap.Message(
                code=Code.POST,
                uri=f"coap://127.0.0.1:{port}/up",
                payload=json.dumps({"dev": "NB9", "ts": t0, "reg": 41.25}).encode(),
                content_format=50,
            )
            return await asyncio.wait_for(ctx.request(msg).response, 20)
        finally:
            await ctx.shutdown()

    listener.start()
    try:
        assert ready.wait(30), err.getvalue()
        assert "CoAP coap://127.0.0.1" in err.getvalue()
        response = asyncio.run(post())
    finally:
        listener.join(60)
    assert result == [0], err.getvalue()
    assert response.code == Code.INTERNAL_SERVER_ERROR  # not 2.04: the meter keeps its reading
    assert b"not stored" in response.payload
    ((_, value, unit, quality),) = _readings(out.getvalue())[("NB9", "register")]
    assert (value, unit, quality) == (41.25, "m3", 0)
    assert out.getvalue().splitlines()[-1] == "frames=1 readings=1 rejected=0"
