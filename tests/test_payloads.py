import json

import cbor2
import pytest

from protocols import payloads
from protocols.payloads import (
    BAD_CRC,
    MALFORMED,
    UNSUPPORTED_FORMAT,
    crc16_modbus,
    decode,
    encode_binary_v1,
    sniff_format,
)
from protocols.uplink import PayloadError, Quality


def test_crc16_modbus_known_vector():
    # The standard check value of CRC-16/MODBUS for "123456789" is 0x4B37.
    assert crc16_modbus(b"123456789") == 0x4B37


def test_binary_round_trip_converts_litres_to_m3():
    frame = encode_binary_v1(
        12345678, 1_767_225_600, 900, [1000, 1250, 4_294_967_295], status=0b0101
    )
    [up] = decode(frame)
    assert up.device == "serial:12345678"
    assert up.ts == [1_767_225_600, 1_767_226_500, 1_767_227_400]
    assert up.values == [1.0, 1.25, 4_294_967.295]
    assert up.status == Quality.LEAK | Quality.TAMPER


def test_binary_bad_crc_and_length():
    frame = bytearray(encode_binary_v1(1, 1_767_225_600, 900, [1, 2]))
    frame[-3] ^= 0xFF
    with pytest.raises(PayloadError) as err:
        decode(bytes(frame), "binary-v1")
    assert err.value.reason == BAD_CRC
    with pytest.raises(PayloadError) as err:
        decode(bytes(frame[:-1]), "binary-v1")
    assert err.value.reason == MALFORMED


def test_json_shapes():
    single = json.dumps({"dev": "A", "ts": "2026-01-01T00:00:00Z", "reg": 1.5, "status": ["leak"]})
    [up] = decode(single.encode())
    assert (up.ts, up.values, up.status) == ([1_767_225_600.0], [1.5], Quality.LEAK)
    multi = {"dev": "A", "t0_ms": 1_767_225_600_000, "step": 900, "reg": [1, 2]}
    [up] = decode(json.dumps(multi).encode())
    assert up.ts == [1_767_225_600.0, 1_767_226_500.0]
    # Milliseconds under "t0" are not guessed: they are seconds far in the future (quarantined
    # as FUTURE_TIMESTAMP by the validator), not a silent division.
    multi = {"dev": "A", "t0": 1_767_225_600_000, "step": 900, "reg": [1, 2]}
    [up] = decode(json.dumps(multi).encode())
    assert up.ts == [1_767_225_600_000.0, 1_767_225_600_900.0]
    batch = {
        "gw": "G",
        "readings": [
            {"dev": "A", "ts": 1, "reg": 1},
            {"dev": "B", "ch": "p", "ts": 2, "v": 3, "unit": "bar"},
        ],
    }
    ups = decode(json.dumps(batch).encode())
    assert [(u.device, u.channel, u.unit) for u in ups] == [
        ("A", "register", None),
        ("B", "p", "bar"),
    ]


def test_cbor_same_shape():
    payload = cbor2.dumps({"dev": "A", "ts": 1_767_225_600, "reg": 2.0})
    assert sniff_format(payload) == "cbor"
    [up] = decode(payload)
    assert up.values == [2.0]


@pytest.mark.parametrize(
    "payload",
    [
        b'{"dev": "A"}',
        b'{"dev": "A", "reg": [1, 2]}',
        b'{"dev": "A", "ts": "yesterday", "reg": 1}',
        b'{"dev": "A", "ts": "2026-01-01T00:00:00", "reg": 1}',
        b'{"dev": "A", "ts": 1, "reg": "12"}',
        b'{"dev": "A", "ts": 1, "reg": true}',
        b'{"dev": "A", "ts": 1, "reg": 1, "status": ["sparkles"]}',
        b'{"readings": 5}',
        b"[1, 2]",
        b'{"dev": "A", "ts": 1, "v": 1}',
    ],
)
def test_json_malformed(payload):
    with pytest.raises(PayloadError) as err:
        decode(payload)
    assert err.value.reason == MALFORMED


def test_unknown_format():
    with pytest.raises(PayloadError) as err:
        decode(b"\x99hello")
    assert err.value.reason == UNSUPPORTED_FORMAT


@pytest.mark.parametrize(
    "doc",
    [
        {"dev": "M1", "t0": 1767571200, "step": 900, "reg": [1, 2.5, 3]},
        {"dev": "M1", "t0": 1767571200000, "step": 900, "reg": [1.0], "unit": "L"},
        {"dev": "M1", "t0_ms": 1767571200123, "step": 900, "reg": [1.0, 2], "unit": "L"},
        {"dev": "M1", "t0": 1767571200, "step": 900, "reg": [1.0], "status": 0xFF},
        {"dev": "M1", "t0": 1767571200, "step": 900, "reg": [1.0], "unit": ""},
        {"dev": "M1", "t0": 1767571200.5, "step": 60, "reg": [0.0, 0.1], "status": 5},
        {"dev": "M1", "t0": 1767571200, "step": 900, "reg": [1.0], "extra": {"x": 1}},
        {"dev": "M1", "t0": 1767571200, "step": 900, "reg": [1.0], "status": ["leak"]},
        {"dev": "M1", "t0": "2026-01-05T00:00:00Z", "step": 900, "reg": [1.0]},
    ],
)
def test_typed_fast_path_decodes_like_the_general_path(doc):
    """The typed decoder for the common series shape must agree with the general one."""
    payload = json.dumps(doc).encode()
    general = payloads._from_document(payloads._json_decoder.decode(payload), None)
    assert payloads.decode_json(payload) == general


@pytest.mark.parametrize(
    "doc",
    [
        {"dev": "M1", "t0": 1767571200, "step": 900, "reg": [True]},
        {"dev": "M1", "t0": 1767571200, "step": 900, "reg": ["1.0"]},
        {"dev": "M1", "t0": 1767571200, "step": 900, "reg": []},
        {"dev": "", "t0": 1767571200, "step": 900, "reg": [1.0]},
        {"dev": "M1", "step": 900, "reg": [1.0]},
        {"dev": "M1", "t0": 1767571200, "t0_ms": 1767571200000, "step": 900, "reg": [1.0]},
        {"dev": "M1", "t0": None, "t0_ms": 1767571200000, "step": 900, "reg": [1.0]},
        {"dev": "M1", "t0": 1767571200, "step": 0, "reg": [1.0]},
        {"dev": "M1", "t0": 1767571200, "step": -900, "reg": [1.0]},
        {"dev": "M1", "t0": 1e300, "step": 900, "reg": [1.0]},
        {"dev": "M1", "t0": 1767571200, "step": 1e300, "reg": [1.0, 2.0]},
        {"dev": "M\x00", "t0": 1767571200, "step": 900, "reg": [1.0]},
        {"dev": "M" * 129, "t0": 1767571200, "step": 900, "reg": [1.0]},
        {"dev": "M1", "t0": 1767571200, "step": 900, "reg": [1.0], "unit": "m" * 33},
        {"dev": "M1", "t0": 1767571200, "step": 900, "reg": [1.0], "status": -1},
    ],
)
def test_typed_fast_path_leaves_bad_series_to_the_general_errors(doc):
    with pytest.raises(PayloadError) as err:
        payloads.decode_json(json.dumps(doc).encode())
    assert err.value.reason == "MALFORMED"
