"""No byte string makes the SenML, wM-Bus or CJ/T 188 decoders raise anything but PayloadError.

Why property-based: each decoder walks length fields and nested records that an attacker (or a
noisy radio) controls. Generators start from valid frames and mutate them, so they get past the
first check into the record walkers, plus raw bytes for everything else.
"""

from __future__ import annotations

import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols import wmbus
from protocols.cjt188 import encode_cjt188
from protocols.payloads import PROCESSING_ERROR, decode
from protocols.uplink import VENDOR_STATUS_MASK, PayloadError
from protocols.wmbus import KeyRing, add_crcs, encode_wmbus

FORMATS = ["senml-json", "senml-cbor", "wmbus", "wmbus-hex", "cjt188"]
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEY = bytes(range(16))
wmbus.set_keyring(KeyRing({"12345678": KEY}, from_env=False))

SEEDS = {
    "wmbus": [
        encode_wmbus("12345678", 12.5, key=KEY),
        add_crcs(encode_wmbus("12345678", 12.5, key=KEY)),
        encode_wmbus("12345678", 12.5, key=KEY, mode=7, counter=9),
        bytes.fromhex("1844AE4C4455223368077A55000000041389E20100023B0000"),
    ],
    "cjt188": [encode_cjt188(12345678901234, 123.45, 1767225600)],
    "senml-json": [
        json.dumps([{"bn": "m:", "bt": 1767225600, "n": "register", "v": 1.5, "u": "m3"}]).encode()
    ],
    "senml-cbor": [
        bytes.fromhex("81a421626d3a221a6955b9000068726567697374657202fb3ff8000000000000")
    ],
}


def check(payload: bytes, fmt: str) -> None:
    try:
        ups = decode(payload, fmt, None)
    except PayloadError as err:
        assert err.reason != PROCESSING_ERROR, err.detail
        assert len(err.detail) <= 200
        return
    for up in ups:
        assert len(up.ts) == len(up.values) and up.device and up.channel
        assert all(math.isfinite(t) for t in up.ts)
        assert all(math.isfinite(v) for v in up.values)
        assert up.status & ~VENDOR_STATUS_MASK == 0


@SETTINGS
@given(payload=st.binary(max_size=300), fmt=st.sampled_from(FORMATS))
def test_any_bytes(payload: bytes, fmt: str) -> None:
    check(payload, fmt)


@SETTINGS
@given(
    fmt=st.sampled_from(["wmbus", "cjt188", "senml-json", "senml-cbor"]),
    seed=st.integers(min_value=0, max_value=3),
    edits=st.lists(
        st.tuples(st.integers(min_value=0, max_value=400), st.integers(0, 255)), max_size=6
    ),
    cut=st.integers(min_value=0, max_value=400),
)
def test_mutated_valid_frames(fmt: str, seed: int, edits: list[tuple[int, int]], cut: int) -> None:
    seeds = SEEDS[fmt]
    frame = bytearray(seeds[seed % len(seeds)])
    for at, value in edits:
        frame[at % len(frame)] = value
    check(bytes(frame[: max(1, len(frame) - cut % len(frame))]), fmt)
    if fmt == "wmbus":
        check(bytes(frame).hex().encode(), "wmbus-hex")


@SETTINGS
@given(
    records=st.lists(
        st.dictionaries(
            st.sampled_from(
                ["bn", "bt", "bu", "bv", "bs", "bver", "n", "u", "v", "s", "vb", "vs", "t", "x_"]
            ),
            st.one_of(
                st.none(),
                st.booleans(),
                st.integers(),
                st.floats(),
                st.text(max_size=5),
                st.lists(st.integers(), max_size=2),
            ),
        ),
        max_size=5,
    ),
)
def test_senml_shaped_documents(records: list[dict[str, object]]) -> None:
    check(json.dumps(records).encode(), "senml-json")


def check_parts(payload: bytes, fmt: str) -> None:
    """``check``, plus: what a codec refused part by part is a PayloadError with bytes."""
    check(payload, fmt)
    try:
        ups = decode(payload, fmt, None)
    except PayloadError:
        return
    for err, raw in ups.rejected:
        assert isinstance(err, PayloadError) and err.reason != PROCESSING_ERROR
        assert isinstance(raw, bytes) and raw


@SETTINGS
@given(
    picks=st.lists(st.integers(min_value=0, max_value=2), min_size=2, max_size=5),
    victim=st.integers(min_value=0, max_value=4),
    edits=st.lists(
        st.tuples(st.integers(min_value=0, max_value=400), st.integers(0, 255)), max_size=4
    ),
    hexed=st.booleans(),
)
def test_gateway_messages_of_many_telegrams(
    picks: list[int], victim: int, edits: list[tuple[int, int]], hexed: bool
) -> None:
    """A gateway message of several telegrams, one of them mutated: decode raises nothing but
    PayloadError, refused parts carry their error and bytes, and when the mutation left the
    other telegrams intact (hex: one per line) they all still decode."""
    wmbus.set_keyring(KeyRing({"12345678": KEY}, from_env=False))  # other modules reset it
    tgs = [bytearray(SEEDS["wmbus"][i]) for i in picks]
    hit = tgs[victim % len(tgs)]
    for at, value in edits:
        hit[at % len(hit)] = value
    if hexed:
        payload = b"\n".join(bytes(t).hex().encode() for t in tgs)
        check_parts(payload, "wmbus-hex")
        clean = [t for t in tgs if t is not hit]
        ups = decode(payload, "wmbus-hex", None) if clean else None
        if ups is not None:
            assert len(ups) >= len(clean)
    else:
        check_parts(b"".join(bytes(t) for t in tgs), "wmbus")
