"""CJ/T 188 codec: frames as data in ``tests/cases/cjt188/<case>/`` (``frame.hex``,
``expected.json`` quoting where the frame comes from), and the encoder's round trip."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.cjt188 import encode_cjt188, parse_frames
from protocols.payloads import decode
from protocols.uplink import PayloadError, Quality

CASES = Path(__file__).parent / "cases" / "cjt188"


@pytest.mark.parametrize("case", sorted(p.name for p in CASES.iterdir()))
def test_case(case: str) -> None:
    spec = json.loads((CASES / case / "expected.json").read_text())
    assert spec["source"], "a case quotes where its frame comes from"
    frame = bytes.fromhex((CASES / case / "frame.hex").read_text())
    if "error" in spec["expected"]:
        with pytest.raises(PayloadError) as err:
            decode(frame, "cjt188", None)
        assert err.value.reason == spec["expected"]["error"], err.value.detail
        return
    got = [
        {
            "device": u.device,
            "channel": u.channel,
            "unit": u.unit,
            "ts": u.ts,
            "values": u.values,
            "status": u.status,
        }
        for u in decode(frame, "cjt188", None)
    ]
    assert got == spec["expected"]["uplinks"]


def test_status_and_settlement_are_parsed() -> None:
    frame = encode_cjt188(7, 5.0, 1767225600, settlement_m3=4.25, valve=3)
    (f,) = parse_frames(frame)
    assert (f.valve, f.battery_low, f.settlement_m3, f.di_order) == (
        "abnormal",
        False,
        4.25,
        "2004",
    )


@settings(max_examples=150, deadline=None)
@given(
    address=st.integers(min_value=0, max_value=10**14 - 1),
    hundredths=st.integers(min_value=0, max_value=10**8 - 1),
    settlement=st.integers(min_value=0, max_value=10**8 - 1),
    t=st.integers(min_value=946_684_800, max_value=4_102_444_799 - 9 * 3600),
    edition=st.sampled_from(["2004", "2018"]),
    meter_type=st.sampled_from([0x10, 0x11, 0x12, 0x13]),
    battery=st.booleans(),
    valve=st.integers(min_value=0, max_value=3),
    preamble=st.integers(min_value=0, max_value=4),
)
def test_round_trip(
    address: int,
    hundredths: int,
    settlement: int,
    t: int,
    edition: str,
    meter_type: int,
    battery: bool,
    valve: int,
    preamble: int,
) -> None:
    frame = encode_cjt188(
        address,
        hundredths / 100,
        t,
        settlement_m3=settlement / 100,
        edition=edition,
        meter_type=meter_type,
        battery_low=battery,
        valve=valve,
        preamble=preamble,
    )
    (f,) = parse_frames(frame)
    assert (f.address, f.meter_type, f.di_order) == (f"{address:014d}", meter_type, edition)
    assert round(f.volume_m3 * 100) == hundredths and round(f.settlement_m3 * 100) == settlement
    assert f.meter_time == t and f.battery_low is battery
    (up,) = decode(frame, "cjt188", None)
    assert up.device == f"serial:{address}" and up.status == (
        int(Quality.LOW_BATTERY) if battery else 0
    )


# --- the TCP listener, over a real socket into the real database ------------------------------
LISTENER_REGISTRY = """
[[dma]]
id = "DMA-CN"

[[vendor]]
id = "cjt188-water"
payload = "cjt188"
  [[vendor.channel]]
  name = "register"
  quantity = "volume"
  unit = "m3"
  kind = "register"

[[device]]
id = "CN-0001"
vendor = "cjt188-water"
dma = "DMA-CN"
serial = 12345678901234
"""


def test_split_stream_waits_for_cut_frames_and_quarantines_junk() -> None:
    from protocols.cjt188_listener import split_stream

    good = encode_cjt188(1, 1.0, 1767225600)
    buf = bytearray(b"\x01\x02" + good[:9])
    first = split_stream(buf, final=False)
    assert [r for _, r in first] == [("MALFORMED", "bytes outside a CJ/T 188 frame")]
    assert split_stream(buf, final=False) == []  # the frame is cut: wait for the rest
    buf += good[9:]
    (frame,) = split_stream(buf, final=False)
    assert frame == (good.lstrip(b"\xfe"), None) and not buf


def test_listener_stores_frames_and_quarantines_the_rest(empty_db_url: str, tmp_path: Path) -> None:
    import time

    import psycopg

    from aquameter.registry import load_registry
    from ingest.pipeline import IngestPipeline
    from ingest.registry_sync import sync_registry
    from protocols.cjt188_listener import Cjt188Listener, cjt188_addresses
    from sql.migrate import migrate

    path = tmp_path / "registry.toml"
    path.write_text(LISTENER_REGISTRY)
    registry = load_registry(path)
    with psycopg.connect(empty_db_url) as conn:
        migrate(conn, partitions_ahead=1)
        sync_registry(conn, registry)
        conn.commit()
    addresses = cjt188_addresses(registry)  # the devices whose vendor's payload is "cjt188"
    assert addresses == {12345678901234: "CN-0001"}
    now = int(time.time()) - 120
    good = [
        encode_cjt188(12345678901234, 10.0 + i / 100, now + i, battery_low=i == 2) for i in range(3)
    ]
    bad_cs = bytearray(encode_cjt188(12345678901234, 11.0, now + 10))
    bad_cs[-2] ^= 1
    stranger = encode_cjt188(99, 1.0, now)
    stream = b"".join(good) + bytes(bad_cs) + stranger + b"\x00garbage"

    async def scenario() -> Cjt188Listener:
        pipeline = IngestPipeline(empty_db_url, batch_seconds=0.05).start()
        listener = Cjt188Listener(addresses, pipeline, port=0)
        task = asyncio.create_task(listener.run())
        try:
            await asyncio.wait_for(listener.ready.wait(), 30)
            _, writer = await asyncio.open_connection("127.0.0.1", listener.bound_port)
            for i in range(0, len(stream), 7):  # cut anywhere, as TCP may deliver it
                writer.write(stream[i : i + 7])
                await writer.drain()
            writer.close()
            await writer.wait_closed()
            for _ in range(600):
                if listener.frames == 6:
                    break
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await asyncio.to_thread(pipeline.close)
        return listener

    listener = asyncio.run(scenario())
    assert (listener.frames, listener.rejected) == (6, 3)
    with psycopg.connect(empty_db_url) as conn:
        got = conn.execute(
            "SELECT c.device_id, extract(epoch FROM r.ts)::float8, r.value, r.quality "
            "FROM readings r JOIN channels c ON c.id = r.channel_id ORDER BY 2"
        ).fetchall()
        reasons = [r for (r,) in conn.execute("SELECT reason FROM quarantine ORDER BY id")]
    assert [(d, int(t), float(v), q & 8) for d, t, v, q in got] == [
        ("CN-0001", now, 10.0, 0),
        ("CN-0001", now + 1, 10.01, 0),
        ("CN-0001", now + 2, 10.02, 8),
    ]
    assert sorted(reasons) == ["BAD_CRC", "MALFORMED", "UNKNOWN_DEVICE"]


def test_ingest_builds_the_listener_only_when_asked(tmp_path: Path) -> None:
    from aquameter.registry import load_registry
    from ingest.service import build_async_adapters
    from protocols.cjt188_listener import Cjt188Listener

    path = tmp_path / "registry.toml"
    path.write_text(LISTENER_REGISTRY)
    registry = load_registry(path)
    sink = object()
    assert "cjt188" not in build_async_adapters(registry, sink, options={})  # type: ignore[arg-type]
    adapters = build_async_adapters(
        registry,
        sink,  # type: ignore[arg-type]
        options={"cjt188": {"host": "127.0.0.1", "port": 0}},
    )
    assert isinstance(adapters["cjt188"], Cjt188Listener) and adapters["cjt188"].sink is sink
