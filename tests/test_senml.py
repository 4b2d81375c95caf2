"""SenML (RFC 8428) codec: resolution of base fields, names to channels, JSON and CBOR packs.

Published examples and pinned behaviours are data in ``tests/cases/senml/<case>/`` (``frame.json``
and ``expected.json``, which quotes its source); the decoder is reached through
:func:`protocols.payloads.decode`, as a vendor with ``payload = "senml-json"`` would reach it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.payloads import MALFORMED, decode
from protocols.senml import CBOR_LABELS, decode_senml_cbor, decode_senml_json, encode_senml
from protocols.uplink import PayloadError, Quality, Uplink

CASES = Path(__file__).parent / "cases" / "senml"
_LABELS = {v: k for k, v in CBOR_LABELS.items()}


def _as_dicts(ups: list[Uplink]) -> list[dict[str, Any]]:
    return [
        {
            "device": u.device,
            "channel": u.channel,
            "unit": u.unit,
            "ts": u.ts,
            "values": u.values,
            "status": u.status,
        }
        for u in ups
    ]


def _same(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert {k: g[k] for k in ("device", "channel", "unit", "status")} == {
            k: w[k] for k in ("device", "channel", "unit", "status")
        }
        assert g["ts"] == pytest.approx(w["ts"], abs=1e-3)
        assert g["values"] == pytest.approx(w["values"], rel=1e-12)


@pytest.mark.parametrize("case", sorted(p.name for p in CASES.iterdir()))
def test_case(case: str) -> None:
    folder = CASES / case
    spec = json.loads((folder / "expected.json").read_text())
    assert spec["source"], "a case quotes where its example comes from"
    payload = (folder / "frame.json").read_bytes()
    dev = spec.get("default_device")
    # the same pack as CBOR (integer labels) decodes to the same uplinks
    as_cbor = cbor2.dumps(
        [{_LABELS[k] if k in _LABELS else k: v for k, v in r.items()} for r in json.loads(payload)]
    )
    for data, fmt in ((payload, spec["format"]), (as_cbor, "senml-cbor")):
        if "error" in spec["expected"]:
            with pytest.raises(PayloadError) as err:
                decode(data, fmt, dev)
            assert err.value.reason == spec["expected"]["error"]
        else:
            _same(_as_dicts(decode(data, fmt, dev)), spec["expected"]["uplinks"])


def test_relative_time_is_relative_to_the_receiver_now() -> None:
    pack = b'[{"bn":"m1:","n":"register","v":5,"t":-60},{"n":"register","v":6}]'
    (up,) = decode_senml_json(pack, now=2_000_000_000.0)
    assert up.ts == [2_000_000_000.0 - 60, 2_000_000_000.0]


def test_base_value_and_sum_are_added() -> None:
    pack = (
        b'[{"bn":"m1:","bt":1767225600,"bv":100,"n":"register","v":0.5},{"n":"total","s":7,"bs":3}]'
    )
    ups = {u.channel: u for u in decode_senml_json(pack)}
    assert ups["register"].values == [100.5]
    assert ups["total"].values == [10.0]


def test_backflow_and_fraud_flags() -> None:
    pack = [
        {"bn": "/3424/0/", "bt": 1767225600, "n": "1", "v": 1.0},
        {"n": "11", "vb": True},
        {"n": "13", "vb": True},
    ]
    (up,) = decode_senml_cbor(
        cbor2.dumps([{_LABELS[k]: v for k, v in r.items()} for r in pack]), "M1"
    )
    assert up.status == int(Quality.REVERSE_FLOW | Quality.TAMPER)
    assert up.channel == "register"


@pytest.mark.parametrize(
    "pack",
    [
        b"{}",
        b"[]",
        b'[{"n":"x","v":"1"}]',
        b'[{"n":"x","v":true}]',
        b'[{"n":"x"}]',
        b'[{"n":"x","vs":"only text"}]',
        b'[{"v":1}]',
        b'[{"n":"x","v":1,"t":1e999}]',
        b'[{"bn":"m:","n":"x","v":1,"t":1e300}]',
        b'[{"bn":"m:","n":"x","v":1,"t":-1e300}]',
        b"[" * 5000,
    ],
)
def test_unusable_packs_are_payload_errors(pack: bytes) -> None:
    for fmt in ("senml-json",):
        with pytest.raises(PayloadError):
            decode(pack, fmt, None)


def test_oversized_cbor_pack_is_refused_before_parsing() -> None:
    big = cbor2.dumps([{0: "x", 2: 1.0, 6: 1767225600 + i} for i in range(3000)])
    with pytest.raises(PayloadError) as err:
        decode(big, "senml-cbor", "M1")
    assert err.value.reason == MALFORMED


_finite = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12)


@settings(max_examples=100, deadline=None)
@given(
    values=st.lists(_finite, min_size=1, max_size=20),
    t0=st.integers(min_value=2**28, max_value=4_000_000_000),
    cbor=st.booleans(),
)
def test_round_trip(values: list[float], t0: int, cbor: bool) -> None:
    up = Uplink("AQS1", "register", [float(t0 + 900 * i) for i in range(len(values))], values, "m3")
    payload = encode_senml([up], cbor=cbor)
    (back,) = decode(payload, "senml-cbor" if cbor else "senml-json", None)
    assert (back.device, back.channel, back.unit) == ("AQS1", "register", "m3")
    assert back.ts == up.ts
    assert back.values == values


@pytest.mark.parametrize("name", ["senml", "wmbus", "cjt188"])
def test_sample_registry_fragment_loads(name: str, tmp_path: Path) -> None:
    """The fragment beside each codec is a valid registry that selects its codec."""
    from aquameter.registry import load_registry

    path = Path(__file__).parent.parent / "protocols" / f"{name}.sample.toml"
    reg = load_registry(path)
    formats = {"senml": "senml-json", "wmbus": "wmbus-hex", "cjt188": "cjt188"}
    assert reg.vendors and reg.all_devices()
    assert formats[name] in {v.payload for v in reg.vendors}
