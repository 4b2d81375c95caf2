"""CJ/T 188 codec: frames as data in ``tests/cases/cjt188/<case>/`` (``frame.hex``,
``expected.json`` quoting where the frame comes from), and the encoder's round trip."""

from __future__ import annotations

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
