"""OPC-UA adapter: converter cases and config (pure), the station simulator's model, and the
subscriber against real servers on 127.0.0.1 through the real ingest pipeline into PostgreSQL.

Two servers: our water-quality station simulator (asyncua), whose manifest records every sample
it wrote, and an independent node-opcua server (peers/node-opcua/server.mjs), which prints every
sample it publishes. Stored rows are compared with those ground truths value by value.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from asyncua import ua
from asyncua.crypto import cert_gen
from cryptography.x509.oid import ExtendedKeyUsageOID

from aquameter.embedded import free_port
from aquameter.registry import Device, Registry, load_registry
from ingest.pipeline import IngestPipeline
from ingest.registry_sync import sync_registry
from protocols.opcua import (
    DEFAULT_APPLICATION_URI,
    ConfigError,
    OpcUaSubscriber,
    device_config,
)
from protocols.opcua_decode import convert_batch, convert_datavalue, status_quality
from protocols.uplink import Quality
from simulators.wq_station import (
    WQ_VARIABLES,
    Fault,
    StationModel,
    WqStation,
    WqStationConfig,
    do_saturation,
    parse_fault,
)
from sql.migrate import migrate

ROOT = Path(__file__).resolve().parent.parent
CASES = Path(__file__).parent / "cases" / "opcua"
PEER_DIR = ROOT / "peers" / "node-opcua"

# Expected quality per status name, written out rather than computed by the code under test.
QUALITY = {
    "Good": 0,
    "UncertainSensorNotAccurate": 32,
    "UncertainLastUsableValue": 32,
    "BadSensorFailure": 16,
}
# registry channel -> (quantity, unit, simulator variable)
WQ_CHANNELS = {
    "ph": ("ph", "pH", "pH"),
    "turbidity": ("turbidity", "NTU", "Turbidity"),
    "free_chlorine": ("chlorine", "mg/L", "FreeChlorine"),
}


# --- converter: regression cases as data ------------------------------------------------------
def _datavalue(item: dict[str, Any]) -> ua.DataValue:
    value = item["value"]
    variant = (
        ua.Variant()
        if value is None
        else ua.Variant(value, getattr(ua.VariantType, item.get("variant", "Double")))
    )

    def ts(key: str) -> datetime | None:
        raw = item.get(key)
        return None if raw is None else datetime.fromisoformat(raw)

    return ua.DataValue(
        variant,
        StatusCode=ua.StatusCode(getattr(ua.StatusCodes, item["status"])),
        SourceTimestamp=ts("source_ts"),  # type: ignore[arg-type]
        ServerTimestamp=ts("server_ts"),  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("case", sorted(p.name for p in CASES.iterdir() if p.is_dir()))
def test_converter_case(case: str) -> None:
    given = json.loads((CASES / case / "input.json").read_text())
    expected = json.loads((CASES / case / "expected.json").read_text())
    items = [(it["channel"], _datavalue(it)) for it in given["items"]]
    uplinks, skipped = convert_batch("WQ1", items, given["received_at"])
    got = [
        {"channel": u.channel, "ts": u.ts, "values": u.values, "status": u.status} for u in uplinks
    ]
    assert got == expected["uplinks"]
    assert all(u.device == "WQ1" and u.unit is None for u in uplinks)
    assert skipped == expected["skipped"]
    sources = []
    for _, dv in items:
        with contextlib.suppress(ValueError):
            sources.append(convert_datavalue(dv, given["received_at"]).ts_source)
    assert sources == expected["ts_source"]


@pytest.mark.parametrize(
    ("code", "quality"),
    [
        (0x0000_0000, 0),
        (0x0096_0000, 0),  # GoodLocalOverride: sub-code bits do not matter
        (0x4000_0000, Quality.UNCERTAIN),
        (0x4093_0000, Quality.UNCERTAIN),
        (0x8000_0000, Quality.BAD),
        (0x8034_0000, Quality.BAD),  # BadNodeIdUnknown
        (0xC000_0000, Quality.BAD),  # reserved severity: not trusted
    ],
)
def test_status_quality_by_severity_bits(code: int, quality: int) -> None:
    assert status_quality(code) == quality
    assert status_quality(ua.StatusCode(ua.UInt32(code))) == quality


# --- device config ----------------------------------------------------------------------------
def _registry(params: dict[str, Any], channels: list[dict[str, Any]] | None = None) -> Registry:
    chans = channels or [
        {"name": "turbidity", "quantity": "turbidity", "params": {"node_id": "ns=2;s=X.T"}}
    ]
    return Registry.model_validate(
        {
            "vendor": [{"id": "v"}],
            "device": [
                {"id": "D1", "vendor": "v", "protocol": "opcua", "params": params, "channel": chans}
            ],
        }
    )


def test_device_config_reads_password_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AQ_TEST_OPCUA_PW", "s3cret")
    reg = _registry(
        {
            "endpoint": "opc.tcp://127.0.0.1:4840",
            "username": "op",
            "password_env": "AQ_TEST_OPCUA_PW",
            "publishing_interval": 250,
            "station": "WQ9",
        },
        [
            {
                "name": "ph",
                "quantity": "ph",
                "params": {
                    "node_id": "ns=2;s={station}.pH",
                    "sampling_interval": 100,
                    "queue_size": 4,
                },
            }
        ],
    )
    cfg, errors = device_config(reg.devices[0], reg)
    assert errors == []
    assert (cfg.username, cfg.password) == ("op", "s3cret")
    assert cfg.publishing_interval_ms == 250.0
    assert cfg.channels[0].node_id == "ns=2;s=WQ9.pH"
    assert (cfg.channels[0].sampling_interval_ms, cfg.channels[0].queue_size) == (100.0, 4)
    assert "s3cret" not in repr(cfg)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "endpoint"),
        ({"endpoint": "http://x"}, "endpoint"),
        ({"security_policy": "Basic128Rsa15"}, "security_policy"),
        ({"security_policy": "Basic256Sha256"}, "client_certificate"),
        (
            {
                "security_policy": "Basic256Sha256",
                "client_certificate": "/nonexistent/c.der",
                "client_private_key": "/nonexistent/k.pem",
            },
            "missing",
        ),
        ({"security_mode": "Encrypt"}, "security_mode"),
        ({"password_env": "AQ_TEST_SURELY_UNSET_VAR"}, "AQ_TEST_SURELY_UNSET_VAR"),
        ({"keepalive_count": 10, "lifetime_count": 20}, "lifetime_count"),
        ({"publishing_interval": "fast"}, "publishing_interval"),
        ({"trigger": "sometimes"}, "trigger"),
    ],
)
def test_device_config_errors(params: dict[str, Any], message: str) -> None:
    full = {"endpoint": "opc.tcp://127.0.0.1:4840", **params} if params else {}
    if "endpoint" in params:
        full = params
    reg = _registry(full)
    with pytest.raises(ConfigError, match=message):
        device_config(reg.devices[0], reg)


def test_bad_channel_is_reported_and_others_kept() -> None:
    reg = _registry(
        {"endpoint": "opc.tcp://127.0.0.1:4840"},
        [
            {"name": "ok", "quantity": "ph", "params": {"node_id": "ns=2;s=A.pH"}},
            {"name": "missing", "quantity": "ph", "params": {}},
            {"name": "garbled", "quantity": "ph", "params": {"node_id": "ns=x;q=1"}},
        ],
    )
    cfg, errors = device_config(reg.devices[0], reg)
    assert [c.channel for c in cfg.channels] == ["ok"]
    assert len(errors) == 2 and "missing" in errors[0] and "garbled" in errors[1]


def test_sample_registry_fragment_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    import tomllib

    data = tomllib.loads((ROOT / "protocols" / "opcua.sample.toml").read_text())
    data["dma"] = [{"id": "DMA-NORTH"}, {"id": "DMA-SOUTH"}]
    reg = Registry.model_validate(data)
    monkeypatch.setenv("AQUAMETER_WQ2_OPCUA_PASSWORD", "pw")
    devices = reg.devices_by_protocol("opcua")
    plain, _ = device_config(devices[0], reg)
    secure, _ = device_config(devices[1], reg)
    assert len(plain.channels) == 6 and plain.channels[1].node_id == "ns=2;s=WQ1.Turbidity"
    assert (secure.security_policy, secure.security_mode) == ("Basic256Sha256", "SignAndEncrypt")
    assert secure.password == "pw" and secure.channels[0].node_id == "ns=2;s=WQ2.pH"


# --- simulator model (no server) --------------------------------------------------------------
def test_station_model_faults_and_physics() -> None:
    t0 = 1_795_420_800.0
    faults = (
        parse_fault("excursion:Turbidity:start=10:duration=10:level=2.5"),
        parse_fault("flatline:pH:start=5:duration=20"),
        parse_fault("drift:FreeChlorine:start=10:duration=30:rate=360"),  # 0.1 mg/L per s
        Fault("bad", "Conductivity", 12.0, 3.0),
        Fault("uncertain", "Temperature", 14.0, 2.0),
    )
    faulty = StationModel(WQ_VARIABLES, faults, seed=7)
    clean = StationModel(WQ_VARIABLES, (), seed=7)
    rows = [(k, faulty.sample(t0 + k), clean.sample(t0 + k)) for k in range(40)]
    for k, f, c in rows:
        turb = f["Turbidity"][0]
        assert (turb > 1.0) == (10 <= k < 20), (k, turb)  # GB 5749: 1 NTU limit crossed
        if 10 <= k < 40:
            assert f["FreeChlorine"][0] - c["FreeChlorine"][0] == pytest.approx(
                0.1 * (k - 10), abs=0.011
            )
        else:
            assert f["FreeChlorine"][0] == c["FreeChlorine"][0]
        assert f["Conductivity"][1] == (
            ua.StatusCodes.BadSensorFailure if 12 <= k < 15 else ua.StatusCodes.Good
        )
        assert f["Temperature"][1] == (
            ua.StatusCodes.UncertainSensorNotAccurate if 14 <= k < 16 else ua.StatusCodes.Good
        )
        do, temp = f["DissolvedOxygen"][0], f["Temperature"][0]
        assert do == pytest.approx(0.92 * do_saturation(temp), abs=0.5)
    ph = [f["pH"][0] for _, f, _ in rows]
    assert set(ph[5:25]) == {ph[4]}  # frozen at the value before onset
    assert len(set(ph[25:])) > 1 and len(set(ph[:5])) > 1


# --- integration helpers ----------------------------------------------------------------------
def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))


def _registry_toml(devices: list[dict[str, Any]]) -> str:
    lines = ["[[dma]]", 'id = "DMA-WQ"', "", "[[vendor]]", 'id = "wq-panel"']
    for name, (quantity, unit, var) in WQ_CHANNELS.items():
        lines += [
            "  [[vendor.channel]]",
            f'  name = "{name}"',
            f'  quantity = "{quantity}"',
            f'  unit = "{unit}"',
            '  role = "quality"',
            f'  params = {{ node_id = "ns=2;s={{station}}.{var}" }}',
        ]
    for dev in devices:
        lines += [
            "",
            "[[device]]",
            f"id = {_toml(dev['id'])}",
            'vendor = "wq-panel"',
            'protocol = "opcua"',
            'dma = "DMA-WQ"',
        ]
        for ch in dev.get("channels", []):
            lines += ["  [[device.channel]]"]
            lines += [f"  {k} = {_toml(v)}" for k, v in ch.items() if k != "node_id"]
            lines += [f"  params = {{ node_id = {_toml(ch['node_id'])} }}"]
        lines += ["  [device.params]"]
        lines += [f"  {k} = {_toml(v)}" for k, v in dev["params"].items()]
    return "\n".join(lines) + "\n"


def _prepare(url: str, tmp_path: Path, devices: list[dict[str, Any]]) -> Registry:
    path = tmp_path / "registry.toml"
    path.write_text(_registry_toml(devices))
    reg = load_registry(path)
    with psycopg.connect(url) as conn:
        migrate(conn, partitions_ahead=2)
        sync_registry(conn, reg)
        conn.commit()
    return reg


Row = tuple[int, float, int]  # (ts in ms, value, quality)


def _rows(url: str) -> dict[tuple[str, str], set[Row]]:
    out: dict[tuple[str, str], set[Row]] = {}
    with psycopg.connect(url) as conn:
        for dev, ch, ts_ms, value, quality in conn.execute(
            """SELECT c.device_id, c.name, round(extract(epoch FROM r.ts) * 1000)::bigint,
                      r.value, r.quality
               FROM readings r JOIN channels c ON c.id = r.channel_id"""
        ):
            out.setdefault((dev, ch), set()).add((ts_ms, value, quality))
    return out


def _quarantine_count(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM quarantine").fetchone()
    return int(row[0]) if row else 0


def _history(manifest: dict[str, Any], var: str) -> list[tuple[float, Row]]:
    """(epoch s, row) of every sample the simulator published with a value for ``var``."""
    return [
        (t, (round(t * 1000), v, QUALITY[status]))
        for t, v, status in manifest["history"][var]
        if v is not None
    ]


def _nulls(manifest: dict[str, Any], var: str, since_ms: int) -> int:
    """Samples published without a value (Bad status) since ``since_ms``."""
    return sum(
        1 for t, v, _ in manifest["history"][var] if v is None and round(t * 1000) >= since_ms
    )


async def _wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.1)


@dataclass
class Harness:
    """The subscriber on a pipeline; ``run`` drives an async scenario with it running."""

    url: str
    registry: Registry
    devices: list[Device] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    sub: OpcUaSubscriber | None = None
    pipeline: IngestPipeline | None = None

    def run(
        self, scenario: Callable[[OpcUaSubscriber], Any], station: WqStation | None = None
    ) -> OpcUaSubscriber:
        self.pipeline = IngestPipeline(self.url, batch_seconds=0.1).start()
        devices = self.devices if self.devices is not None else self.registry.all_devices()
        opts = {"reconnect_min_s": 0.2, "reconnect_max_s": 1.0, **self.options}

        async def main() -> OpcUaSubscriber:
            if station is not None:
                await station.start()
            sub = OpcUaSubscriber(devices, self.registry, self.pipeline, **opts)  # type: ignore[arg-type]
            task = asyncio.create_task(sub.run())
            try:
                await scenario(sub)
                await sub.drain()
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                if station is not None:
                    await station.stop()
            return sub

        try:
            self.sub = asyncio.run(main())
        finally:
            self.pipeline.close()
        return self.sub


def _device(dev_id: str, endpoint: str, **params: Any) -> dict[str, Any]:
    return {"id": dev_id, "params": {"endpoint": endpoint, "publishing_interval": 200, **params}}


# --- our simulator ----------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_simulator_rows_carry_source_timestamps_and_quality(
    empty_db_url: str, tmp_path: Path
) -> None:
    station = WqStation(
        WqStationConfig(
            port=free_port(),
            tick_s=0.2,
            source_lag_s=1.5,  # source clearly older than the server and receive times
            pump=False,
            faults=(
                parse_fault("bad:FreeChlorine:start=1.5:duration=1"),
                parse_fault("uncertain:pH:start=2:duration=1"),
            ),
        )
    )
    reg = _prepare(empty_db_url, tmp_path, [_device("WQ1", station.config.endpoint)])
    harness = Harness(empty_db_url, reg)

    async def scenario(sub: OpcUaSubscriber) -> None:
        await _wait_until(lambda: sub.stats.connects == 1, 20, "first connect")
        await asyncio.sleep(3.5)
        await station.pause()  # nothing new after this: what was written must all arrive
        await asyncio.sleep(1.0)

    harness.run(scenario, station)
    sub = harness.sub
    assert sub is not None and harness.pipeline is not None
    manifest = station.manifest()
    rows = _rows(empty_db_url)
    for channel, (_, _, var) in WQ_CHANNELS.items():
        stored = rows.get(("WQ1", channel), set())
        assert len(stored) >= 10, channel
        first = min(ts for ts, _, _ in stored)
        expected = {row for _, row in _history(manifest, var) if row[0] >= first}
        # Exactly the samples written since the subscription began: same source timestamps
        # (1.5 s before the server wrote them), same values, quality from the StatusCode.
        assert stored == expected, channel
    qualities = {ch: {q for _, _, q in rows[("WQ1", ch)]} for ch in WQ_CHANNELS}
    assert qualities["ph"] == {0, Quality.UNCERTAIN}
    assert qualities["turbidity"] == qualities["free_chlorine"] == {0}
    # The Bad chlorine samples came without a value (asyncua nulls them): counted, not stored.
    # (A Bad sample that carries a value is stored with the BAD bit: see the node-opcua tests.)
    first_cl = min(ts for ts, _, _ in rows[("WQ1", "free_chlorine")])
    nulls = _nulls(manifest, "FreeChlorine", first_cl)
    assert nulls >= 3
    assert sub.stats.skipped == {"no_value": nulls}
    assert sub.stats.connects == 1 and sub.stats.connection_losses == 0
    assert sub.stats.readings_accepted == sum(len(r) for r in rows.values())
    assert _quarantine_count(empty_db_url) == 0


@pytest.mark.timeout(150)
def test_server_restart_reconnects_resubscribes_without_duplicates(
    empty_db_url: str, tmp_path: Path
) -> None:
    station = WqStation(WqStationConfig(port=free_port(), tick_s=0.2, pump=False))
    reg = _prepare(empty_db_url, tmp_path, [_device("WQ1", station.config.endpoint)])
    harness = Harness(empty_db_url, reg)

    async def scenario(sub: OpcUaSubscriber) -> None:
        await _wait_until(lambda: sub.stats.connects == 1, 20, "first connect")
        await asyncio.sleep(1.5)
        await station.stop()  # the server goes away with its sessions and subscriptions
        await asyncio.sleep(1.0)
        await station.start()
        await _wait_until(lambda: sub.stats.reconnects >= 1, 40, "reconnect")
        await asyncio.sleep(2.0)
        await station.pause()
        await asyncio.sleep(1.0)

    harness.run(scenario, station)
    sub, pipeline = harness.sub, harness.pipeline
    assert sub is not None and pipeline is not None
    manifest = station.manifest()
    stopped_at, restarted_at = manifest["stopped_at"][0], manifest["started_at"][1]
    assert sub.stats.connection_losses >= 1 and sub.stats.reconnects >= 1
    rows = _rows(empty_db_url)
    total = 0
    for channel, (_, _, var) in WQ_CHANNELS.items():
        stored = rows[("WQ1", channel)]
        total += len(stored)
        history = _history(manifest, var)
        assert stored <= {row for _, row in history}, "a row the server never sent"
        before = {row for t, row in history if t < stopped_at}
        after = {row for t, row in history if t >= restarted_at}
        first_before = min(ts for ts, _, _ in stored)
        # Before the stop: everything but the last publish interval, which dies with the server.
        assert {r for r in before if first_before <= r[0] <= (stopped_at - 0.5) * 1000} <= stored
        got_after = stored & after
        assert len(got_after) >= 5, f"{channel}: values after the restart did not arrive"
        first_after = min(ts for ts, _, _ in got_after)
        assert {r for r in after if r[0] >= first_after} <= stored, "lost after re-subscribe"
    # Nothing duplicated: every reading handed over was stored once; the repeats the server
    # resends on re-subscribe (current values) are at most one per channel and connect.
    counters = pipeline.counters
    assert counters.stored == total
    assert counters.readings_received == counters.stored + counters.duplicates
    assert counters.duplicates <= len(WQ_CHANNELS) * sub.stats.connects
    assert _quarantine_count(empty_db_url) == 0


@pytest.mark.timeout(120)
def test_bad_node_id_is_counted_and_other_channels_flow(empty_db_url: str, tmp_path: Path) -> None:
    station = WqStation(WqStationConfig(port=free_port(), tick_s=0.2, pump=False))
    endpoint = station.config.endpoint
    good = {
        "name": "turbidity",
        "quantity": "turbidity",
        "unit": "NTU",
        "node_id": "ns=2;s=WQ1.Turbidity",
    }
    ghost = {
        "name": "ghost",
        "quantity": "turbidity",
        "unit": "NTU",
        "node_id": "ns=2;s=WQ1.NoSuchProbe",
    }
    by_uri = {
        "name": "ph",
        "quantity": "ph",
        "unit": "pH",
        "node_id": "nsu=urn:aquameter:wq:WQ1;s=WQ1.pH",
    }
    lost_ns = {
        "name": "lost",
        "quantity": "ph",
        "unit": "pH",
        "node_id": "nsu=urn:nobody:here;s=WQ1.pH",
    }
    reg = _prepare(
        empty_db_url,
        tmp_path,
        [
            {**_device("WQ1", endpoint), "channels": [good, ghost, by_uri, lost_ns]},
            {"id": "BROKEN", "params": {"publishing_interval": 200}},  # no endpoint
        ],
    )
    harness = Harness(empty_db_url, reg)

    async def scenario(sub: OpcUaSubscriber) -> None:
        await _wait_until(lambda: sub.stats.connects == 1, 20, "first connect")
        await asyncio.sleep(1.5)

    harness.run(scenario, station)
    sub = harness.sub
    assert sub is not None
    assert sub.stats.bad_nodes == 2
    assert sub.stats.bad_node_ids == {
        "WQ1/ns=2;s=WQ1.NoSuchProbe": "BadNodeIdUnknown",
        "WQ1/nsu=urn:nobody:here;s=WQ1.pH": "BadNamespaceUnknown",
    }
    assert sub.stats.config_errors == 1  # BROKEN: logged and skipped, WQ1 unaffected
    assert sub.stats.connects == 1 and sub.stats.connection_losses == 0
    rows = _rows(empty_db_url)
    assert len(rows[("WQ1", "turbidity")]) >= 5
    assert len(rows[("WQ1", "ph")]) >= 5  # nsu= resolved to the server's namespace index
    assert ("WQ1", "ghost") not in rows and ("WQ1", "lost") not in rows


def _client_cert(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.der", directory / f"{name}.key.pem"
    asyncio.run(
        cert_gen.setup_self_signed_certificate(
            key,
            cert,
            DEFAULT_APPLICATION_URI,
            socket.gethostname(),
            [ExtendedKeyUsageOID.CLIENT_AUTH],
            {"organizationName": "Aquameter tests"},
        )
    )
    return cert, key


@pytest.mark.timeout(150)
def test_secure_station_basic256sha256_with_user(
    empty_db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = _client_cert(tmp_path, "client")
    # The stranger's pair does not exist yet: the subscriber makes it (generate_client_certificate),
    # and the station, which trusts only `cert`, must refuse it.
    stranger_cert, stranger_key = tmp_path / "gen" / "stranger.der", tmp_path / "gen" / "s.pem"
    server_pki = tmp_path / "server-pki"
    station = WqStation(
        WqStationConfig(
            port=free_port(),
            tick_s=0.2,
            pump=False,
            security=("Basic256Sha256_SignAndEncrypt",),
            cert_dir=server_pki,
            users={"operator": "wq-secret"},
            trusted_client_certificates=(cert,),
        )
    )
    monkeypatch.setenv("AQ_TEST_WQ_PASSWORD", "wq-secret")
    secure = {
        "security_policy": "Basic256Sha256",
        "security_mode": "SignAndEncrypt",
        "client_certificate": str(cert),
        "client_private_key": str(key),
        "server_certificate": str(server_pki / "server_cert.der"),
        "username": "operator",
        "password_env": "AQ_TEST_WQ_PASSWORD",
        "station": "WQ1",
    }
    endpoint = station.config.endpoint
    reg = _prepare(
        empty_db_url,
        tmp_path,
        [
            _device("WQS", endpoint, **secure),
            _device("WRONGPW", endpoint, **{**secure, "password_env": "", "password": "guess"}),
            _device(
                "STRANGER",
                endpoint,
                **{
                    **secure,
                    "client_certificate": str(stranger_cert),
                    "client_private_key": str(stranger_key),
                    "generate_client_certificate": True,
                },
            ),
            _device("PLAIN", endpoint, station="WQ1"),  # no None endpoint on this server
        ],
    )
    harness = Harness(empty_db_url, reg)

    async def scenario(sub: OpcUaSubscriber) -> None:
        await _wait_until(lambda: sub.stats.connects >= 1, 30, "secure connect")
        await _wait_until(lambda: sub.stats.connect_failures >= 6, 30, "refusals")
        # Under load the refusals can come before three values per channel are durable.
        await _wait_until(
            lambda: all(len(_rows(empty_db_url).get(("WQS", ch), ())) >= 3 for ch in WQ_CHANNELS),
            30,
            "three stored values per channel",
        )
        await station.pause()
        await asyncio.sleep(1.0)

    harness.run(scenario, station)
    sub = harness.sub
    assert sub is not None
    assert sub.stats.connects == 1  # only WQS got in
    assert stranger_cert.is_file() and stranger_key.is_file()
    rows = _rows(empty_db_url)
    assert {dev for dev, _ in rows} == {"WQS"}
    manifest = station.manifest()
    for channel, (_, _, var) in WQ_CHANNELS.items():
        stored = rows[("WQS", channel)]
        assert len(stored) >= 3
        first = min(ts for ts, _, _ in stored)
        assert stored == {row for _, row in _history(manifest, var) if row[0] >= first}


# --- independent peer: node-opcua -------------------------------------------------------------
@pytest.fixture(scope="module")
def node_opcua() -> Path:
    """peers/node-opcua with its node_modules, installed from the lock file when missing."""
    if (PEER_DIR / "node_modules" / "node-opcua" / "package.json").is_file():
        return PEER_DIR
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        pytest.skip("node-opcua peer: node/npm not found on PATH")
    proc = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=PEER_DIR,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        pytest.skip(f"node-opcua peer: `npm ci` failed ({proc.returncode}): {proc.stderr[-500:]}")
    return PEER_DIR


@dataclass
class Peer:
    proc: subprocess.Popen[str]
    ready: dict[str, Any]
    lines: list[dict[str, Any]]

    def samples(self, node: str) -> dict[int, tuple[float, int]]:
        return {
            d["ts"]: (d["v"], QUALITY[d["status"]])
            for d in list(self.lines)
            if d.get("node") == node
        }

    def sessions(self) -> list[dict[str, Any]]:
        return [d["session"] for d in list(self.lines) if "session" in d]


@contextlib.contextmanager
def _peer(directory: Path, pki: Path, **env: str) -> Iterator[Peer]:
    port = free_port()
    proc = subprocess.Popen(
        ["node", "server.mjs"],
        cwd=directory,
        env={**os.environ, "PEER_PORT": str(port), "PEER_PKI": str(pki), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines: list[dict[str, Any]] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("{"):
                lines.append(json.loads(line))
                if "ready" in lines[-1]:
                    ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not ready.wait(60):
            raise AssertionError(f"node-opcua peer did not start (exit code {proc.poll()})")
        yield Peer(proc, next(d for d in lines if "ready" in d), lines)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        reader.join(5)


PEER_CHANNELS = {"turbidity": "Turbidity", "ph": "pH", "free_chlorine": "FreeChlorine"}


def _peer_device(dev_id: str, endpoint: str, **params: Any) -> dict[str, Any]:
    channels = [
        {
            "name": ch,
            "quantity": WQ_CHANNELS[ch][0],
            "unit": WQ_CHANNELS[ch][1],
            "node_id": f"ns=1;s=PEER.{var}",
        }
        for ch, var in PEER_CHANNELS.items()
    ]
    return {**_device(dev_id, endpoint, **params), "channels": channels}


def _check_peer_rows(
    url: str, dev: str, peer: Peer, windows: list[tuple[int, int]], min_rows: int = 8
) -> dict[str, set[Row]]:
    """Every stored row is a sample the peer published, unchanged; within each (from, to) ms
    window, every sample from the first one stored to ``to`` is stored (nothing lost)."""
    rows = _rows(url)
    qualities: set[int] = set()
    for ch, var in PEER_CHANNELS.items():
        stored = rows[(dev, ch)]
        published = peer.samples(f"ns=1;s=PEER.{var}")
        assert len(stored) >= min_rows, ch
        for ts, value, quality in stored:
            assert published.get(ts) == (value, quality), (ch, ts, value, quality)
        stored_ts = {r[0] for r in stored}
        for lo, hi in windows:
            first = min(ts for ts in stored_ts if ts >= lo)
            missing = [ts for ts in published if first <= ts <= hi and ts not in stored_ts]
            assert missing == [], f"{ch}: published but not stored in window {lo}..{hi}"
        qualities |= {q for _, _, q in stored}
    assert qualities == {0, Quality.UNCERTAIN, Quality.BAD}
    return {ch: rows[(dev, ch)] for ch in PEER_CHANNELS}


@pytest.mark.timeout(150)
def test_node_opcua_peer_anonymous(node_opcua: Path, empty_db_url: str, tmp_path: Path) -> None:
    with _peer(node_opcua, tmp_path / "peer-pki") as peer:
        assert peer.ready["ns"] == 1
        endpoint = peer.ready["endpoint"]
        assert endpoint.startswith("opc.tcp://127.0.0.1:")
        reg = _prepare(empty_db_url, tmp_path, [_peer_device("PEER1", endpoint)])
        harness = Harness(empty_db_url, reg)
        stop_ms = 0

        async def scenario(sub: OpcUaSubscriber) -> None:
            nonlocal stop_ms
            await _wait_until(lambda: sub.stats.connects == 1, 30, "connect to node-opcua")
            await asyncio.sleep(3.0)
            stop_ms = int(time.time() * 1000)

        sub = harness.run(scenario)
        _check_peer_rows(empty_db_url, "PEER1", peer, [(0, stop_ms - 1000)])
        assert peer.sessions() == [
            {
                "user": None,
                "mode": "None",
                "policy": ("http://opcfoundation.org/UA/SecurityPolicy#None"),
            }
        ]
    assert sub.stats.connection_losses == 0 and sub.stats.bad_nodes == 0


@pytest.mark.timeout(150)
def test_node_opcua_peer_sign_and_encrypt_with_user(
    node_opcua: Path, empty_db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = _client_cert(tmp_path, "client")
    monkeypatch.setenv("AQ_TEST_PEER_PASSWORD", "peer-secret")
    env = {"PEER_USER": "aquameter", "PEER_PASSWORD": "peer-secret", "PEER_TRUST": str(cert)}
    with _peer(node_opcua, tmp_path / "peer-pki", **env) as peer:
        endpoint = peer.ready["endpoint"]
        params = {
            "security_policy": "Basic256Sha256",
            "security_mode": "SignAndEncrypt",
            "client_certificate": str(cert),
            "client_private_key": str(key),
            "username": "aquameter",
            "password_env": "AQ_TEST_PEER_PASSWORD",
        }
        reg = _prepare(empty_db_url, tmp_path, [_peer_device("PEER2", endpoint, **params)])
        harness = Harness(empty_db_url, reg)
        stop_ms = 0

        async def scenario(sub: OpcUaSubscriber) -> None:
            nonlocal stop_ms
            await _wait_until(lambda: sub.stats.connects == 1, 40, "secure connect to node-opcua")
            await asyncio.sleep(3.0)
            stop_ms = int(time.time() * 1000)

        harness.run(scenario)
        _check_peer_rows(empty_db_url, "PEER2", peer, [(0, stop_ms - 1000)])
        assert peer.sessions() == [
            {
                "user": "aquameter",
                "mode": "SignAndEncrypt",
                "policy": "http://opcfoundation.org/UA/SecurityPolicy#Basic256Sha256",
            }
        ]


@pytest.mark.timeout(150)
def test_frozen_server_detected_and_resubscribed(
    node_opcua: Path, empty_db_url: str, tmp_path: Path
) -> None:
    """A server that hangs with its TCP connection open (SIGSTOP): no socket error arrives, so
    only the health probe / keep-alive can tell. After SIGCONT the subscriber must be back."""
    with _peer(node_opcua, tmp_path / "peer-pki") as peer:
        reg = _prepare(empty_db_url, tmp_path, [_peer_device("PEER3", peer.ready["endpoint"])])
        harness = Harness(empty_db_url, reg, options={"watchdog_interval_s": 1.0})
        marks: dict[str, int] = {}

        async def scenario(sub: OpcUaSubscriber) -> None:
            await _wait_until(lambda: sub.stats.connects == 1, 30, "connect to node-opcua")
            await asyncio.sleep(2.0)
            marks["freeze"] = int(time.time() * 1000)
            peer.proc.send_signal(signal.SIGSTOP)
            try:
                await _wait_until(lambda: sub.stats.connection_losses >= 1, 20, "hang detected")
            finally:
                peer.proc.send_signal(signal.SIGCONT)
            marks["resume"] = int(time.time() * 1000)
            await _wait_until(lambda: sub.stats.reconnects >= 1, 60, "reconnect after resume")
            await asyncio.sleep(2.0)
            marks["stop"] = int(time.time() * 1000)

        sub = harness.run(scenario)
        rows = _check_peer_rows(
            empty_db_url,
            "PEER3",
            peer,
            [(0, marks["freeze"] - 1000), (marks["resume"], marks["stop"] - 1000)],
        )
    assert sub.stats.connection_losses >= 1 and sub.stats.reconnects >= 1
    for ch, stored in rows.items():
        assert any(ts > marks["resume"] for ts, _, _ in stored), f"{ch}: nothing after resume"
