"""Hostile payloads: whatever the bytes, ``decode`` returns uplinks or raises PayloadError.

Why property-based: what killed the MQTT thread (RecursionError on deep JSON, OverflowError on
a long integer) and what let a meter set system quality bits came from inputs nobody listed.
The generators build documents of the real shape with hostile leaves, so they reach the field
checks rather than stopping at the parser. Regression cases as data live in
``tests/cases/payloads/<case>/`` (``frame.<json|cbor|bin>`` and ``expected.json``).
"""

from __future__ import annotations

import json
import math
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ingest.channels import ChannelIndex, ChannelInfo
from ingest.validate import NOT_A_NUMBER, Validator
from protocols import payloads
from protocols.payloads import (
    BAD_CRC,
    MALFORMED,
    PROCESSING_ERROR,
    TOO_DEEP,
    UNSUPPORTED_FORMAT,
    VENDOR_STATUS_BITS,
    crc16_modbus,
    decode,
    encode_binary_v1,
)
from protocols.uplink import VENDOR_STATUS_MASK, Frame, PayloadError, Quality, Uplink

T0 = 1_767_225_600
FORMATS = ["json", "cbor", "binary-v1", None]
CASES = Path(__file__).parent / "cases" / "payloads"
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def outcome(payload: bytes, fmt: str | None, **kw: Any) -> list[Uplink] | PayloadError:
    """The contract, checked on every call: uplinks that ingest can store, or a PayloadError
    from the codecs themselves (PROCESSING_ERROR would mean the last-resort guard caught a bug).
    """
    try:
        ups = decode(payload, fmt, "DFLT", **kw)
    except PayloadError as err:
        assert err.reason != PROCESSING_ERROR, err.detail
        assert len(err.detail) <= payloads.MAX_DETAIL
        return err
    assert isinstance(ups, list) and ups
    for up in ups:
        check_uplink(up)
    return ups


def check_uplink(up: Uplink) -> None:
    assert isinstance(up, Uplink)
    assert len(up.ts) == len(up.values) and len(up.ts) + len(up.not_finite) >= 1
    assert all(type(t) is float and math.isfinite(t) for t in up.ts)
    # a reading is always a finite float; anything else waits in not_finite for its own row
    assert all(type(v) is float and math.isfinite(v) for v in up.values)
    assert all(math.isfinite(t) and not math.isfinite(v) for t, v in up.not_finite)
    assert type(up.status) is int and up.status & ~VENDOR_STATUS_MASK == 0
    assert type(up.device) is str and 0 < len(up.device) <= 128 and up.device.isprintable()
    assert type(up.channel) is str and up.channel


def error(payload: bytes, fmt: str | None = None, **kw: Any) -> PayloadError:
    result = outcome(payload, fmt, **kw)
    assert isinstance(result, PayloadError), result
    return result


def ok(payload: bytes, fmt: str | None = None, **kw: Any) -> list[Uplink]:
    result = outcome(payload, fmt, **kw)
    assert not isinstance(result, PayloadError), result
    return result


# Older cbor2 (before 6) lacks strict map keys and semantic decoders: the codec then relies on
# its own walk and key checks, which these runs keep honest.
LEGACY = pytest.mark.parametrize("legacy", [False, True], ids=["cbor2", "cbor2-bare"])


@contextmanager
def cbor2_bare(legacy: bool) -> Iterator[None]:
    if not legacy:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(payloads, "_CBOR_OPTIONS", {})
        mp.setattr(payloads, "_CBOR_BOUNDED", False)
        mp.setattr(payloads, "_CBOR_TEXT_KEYS", False)
        yield


def j(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def c(doc: Any) -> bytes:
    return bytes(cbor2.dumps(doc))


# --- (a) any bytes ------------------------------------------------------------------------------
PREFIXES = [b"", b"{", b"[", b"\x01", b"\xa1", b"\xa3", b'{"dev": "A", "ts": 1, "reg": ']


@FAST
@given(
    prefix=st.sampled_from(PREFIXES),
    body=st.binary(max_size=300),
    fmt=st.sampled_from(FORMATS),
)
def test_any_bytes_decode_or_raise_payload_error(prefix: bytes, body: bytes, fmt: str | None):
    outcome(prefix + body, fmt)


# --- (b) structured JSON/CBOR documents ---------------------------------------------------------
KEYS = ["dev", "ts", "ts_ms", "t0", "t0_ms", "step", "reg", "v", "ch", "unit", "status"]
NAMES = st.sampled_from([*KEYS, "readings", "gw"]) | st.text(max_size=6)
TIMES = st.sampled_from(
    [T0, T0 * 1000, 1.7e12, -1.0, 0, 2**64, 10**400, "2026-01-01T00:00:00Z", "2026-01-01"]
)
NUMBERS = (
    st.integers()
    | st.integers(min_value=-(10**420), max_value=10**420)
    | st.floats()
    | st.sampled_from([0, 900, -900, 1e308, 10**400, -(10**400)])
)
LEAVES = (
    st.none()
    | st.booleans()
    | NUMBERS
    | TIMES
    | st.text(max_size=12)
    | st.sampled_from(["leak", "sparkles", "A\x00", "A" * 200, "m3", "", "[{", '\\"['])
)


def containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(children, max_size=5) | st.dictionaries(NAMES, children, max_size=5)


ANY_DOC = st.recursive(LEAVES, containers, max_leaves=30)
VALUES = NUMBERS | st.lists(NUMBERS, max_size=6) | ANY_DOC
READING = st.fixed_dictionaries(
    {},
    optional={
        "dev": st.sampled_from(["M1", "serial:7", "", "A\x00", "D" * 129]) | LEAVES,
        "ts": TIMES | NUMBERS | LEAVES,
        "ts_ms": TIMES | NUMBERS,
        "t0": TIMES | NUMBERS,
        "t0_ms": TIMES | NUMBERS,
        "step": NUMBERS,
        "reg": VALUES,
        "v": VALUES,
        "ch": LEAVES,
        "unit": LEAVES,
        "status": NUMBERS
        | st.lists(st.sampled_from(["leak", "tamper", "battery", "x"]) | LEAVES, max_size=3)
        | LEAVES,
    },
)
BATCH = st.fixed_dictionaries(
    {"readings": st.lists(READING | ANY_DOC, max_size=4) | LEAVES},
    optional={"gw": LEAVES},
)
DOCS = READING | BATCH | ANY_DOC

# CBOR has more kinds of leaf than JSON: NaN/inf are plain floats, bignums, decimal fractions,
# rationals, date/times, byte strings, unknown tags and simple values.
CBOR_LEAVES = (
    LEAVES
    | st.sampled_from([math.nan, math.inf, -math.inf, b"M1", Decimal("1e400"), Decimal("NaN")])
    | st.sampled_from([Decimal("sNaN"), Fraction(10**400, 3), Fraction(-1, 3)])
    | st.sampled_from([cbor2.CBORTag(999, 1), cbor2.CBORSimpleValue(99), cbor2.undefined])
    | st.sampled_from(
        [
            datetime(2026, 1, 1, tzinfo=UTC),
            datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=5))),
        ]
    )
)


def cbor_reading(leaf: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    values = leaf | st.lists(leaf, max_size=6)
    return st.fixed_dictionaries(
        {},
        optional={
            "dev": leaf,
            "ts": leaf,
            "ts_ms": leaf,
            "t0": leaf,
            "t0_ms": leaf,
            "step": leaf,
            "reg": values,
            "ch": leaf,
            "v": values,
            "unit": leaf,
            "status": leaf | st.lists(leaf, max_size=3),
        },
    )


CBOR_DOCS = (
    cbor_reading(CBOR_LEAVES)
    | st.fixed_dictionaries({"readings": st.lists(cbor_reading(CBOR_LEAVES), max_size=3)})
    | st.recursive(CBOR_LEAVES, containers, max_leaves=30)
)


def depth(doc: Any) -> int:
    """Nesting as the codecs count it: every container (and CBOR tag) is a level."""
    if isinstance(doc, cbor2.CBORTag):
        return 1 + depth(doc.value)
    if isinstance(doc, dict):
        return 1 + max((depth(v) for v in doc.values()), default=0)
    if isinstance(doc, list):
        return 1 + max((depth(v) for v in doc), default=0)
    return 0


@FAST
@given(doc=DOCS, max_depth=st.integers(1, 6))
def test_json_documents_decode_or_raise(doc: Any, max_depth: int):
    result = outcome(j(doc), "json", max_depth=max_depth)
    too_deep = isinstance(result, PayloadError) and result.reason == TOO_DEEP
    assert too_deep == (depth(doc) > max_depth)


@LEGACY
@FAST
@given(doc=CBOR_DOCS, max_depth=st.integers(1, 6))
def test_cbor_documents_decode_or_raise(legacy: bool, doc: Any, max_depth: int):
    with cbor2_bare(legacy):
        result = outcome(c(doc), "cbor", max_depth=max_depth)
    too_deep = isinstance(result, PayloadError) and result.reason == TOO_DEEP
    assert too_deep == (depth(doc) > max_depth)


@FAST
@given(doc=DOCS)
def test_json_and_cbor_of_one_document_agree(doc: Any):
    """One document, two encodings, one outcome (the JSON fast path included)."""
    try:
        as_json = outcome(json.dumps(doc, allow_nan=False).encode(), "json")
    except ValueError:  # NaN/inf: JSON cannot say it
        assume(False)
    as_cbor = outcome(c(doc), "cbor")
    if isinstance(as_json, PayloadError) or isinstance(as_cbor, PayloadError):
        assert isinstance(as_json, PayloadError) and isinstance(as_cbor, PayloadError)
        assert as_json.reason == as_cbor.reason
    else:
        assert _comparable(as_json) == _comparable(as_cbor)


def test_a_batch_that_also_looks_like_a_series_is_a_batch():
    """The JSON fast path must not read a batch's series-shaped top level (CBOR never did)."""
    doc = {
        "dev": "M1",
        "t0": T0,
        "step": 60,
        "reg": [1.0],
        "readings": [{"dev": "B", "ts": T0, "v": 2, "ch": "p"}],
    }
    for payload, fmt in ((j(doc), "json"), (c(doc), "cbor")):
        [up] = ok(payload, fmt)
        assert (up.device, up.channel, up.values) == ("B", "p", [2.0])


def _comparable(ups: list[Uplink]) -> list[tuple[Any, ...]]:
    return [(u.device, u.channel, u.ts, [repr(v) for v in u.values], u.unit, u.status) for u in ups]


@FAST
@given(doc=READING | BATCH, extra=st.integers(1, 40), wrap=st.sampled_from(["list", "dict"]))
def test_nesting_beyond_the_limit_is_too_deep(doc: Any, extra: int, wrap: str):
    for _ in range(payloads.DEFAULT_MAX_DEPTH + extra):
        doc = [doc] if wrap == "list" else {"x": doc}
    assert error(j(doc), "json").reason == TOO_DEEP
    assert error(c(doc), "cbor").reason == TOO_DEEP


# --- (c) binary-v1 frames, built and then mutated -----------------------------------------------
@FAST
@given(
    serial=st.integers(0, 2**32 - 1),
    t0=st.integers(0, 2**32 - 1),
    step=st.integers(0, 2**16 - 1),
    regs=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=12),
    status=st.integers(0, 255),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    resize=st.integers(-4, 4),
    fix_crc=st.booleans(),
)
def test_mutated_binary_v1_frames(serial, t0, step, regs, status, edits, resize, fix_crc):
    frame = bytearray(encode_binary_v1(serial, t0, step, regs, status))
    for pos, byte in edits:
        frame[pos % len(frame)] = byte
    if resize < 0:
        del frame[resize:]
    else:
        frame += bytes(resize)
    if fix_crc and len(frame) > 2:  # past the checksum, into the header and status checks
        frame[-2:] = struct.pack("<H", crc16_modbus(bytes(frame[:-2])))
    for fmt in ("binary-v1", None):
        result = outcome(bytes(frame), fmt)
        if not isinstance(result, PayloadError):
            assert result[0].device.startswith("serial:")


@FAST
@given(status=st.integers(0, 255))
def test_binary_v1_status_goes_through_the_table(status: int):
    [up] = ok(encode_binary_v1(1, T0, 900, [1], status))
    expected = 0
    for bit, flag in VENDOR_STATUS_BITS.items():
        if status & bit:
            expected |= flag
    assert up.status == expected == status & 0x0F


# --- (d) each item of the contract, pinned ------------------------------------------------------
@pytest.mark.parametrize(
    "payload, fmt",
    [
        (b'{"a":' * 10_000 + b"1" + b"}" * 10_000, None),
        (b"[" * 10_000 + b"]" * 10_000, None),
        (b"[" * 10_000, None),
        (b'{"dev": "A", "x": ' + b"[" * 10_000 + b"]" * 10_000 + b', "ts": 1, "reg": 1}', None),
        (b"\xa1\x61a" * 10_000 + b"\x01", None),
        (b"\x81" * 10_000 + b"\x01", "cbor"),
        (b"\xd8\x63" * 10_000 + b"\x01", "cbor"),  # tags nest too
    ],
)
@LEGACY
def test_depth_10000_is_too_deep(legacy: bool, payload: bytes, fmt: str | None):
    with cbor2_bare(legacy):
        assert error(payload, fmt).reason == TOO_DEEP


def test_depth_limit_is_exact_and_configurable():
    reading = {"dev": "A", "ts": T0, "reg": 1}
    doc: Any = reading
    for _ in range(31):
        doc = [doc]
    # 32 levels: the reading and 31 lists around it; a list is not a document, so MALFORMED.
    assert error(j(doc)).reason == MALFORMED
    assert error(c(doc), "cbor").reason == MALFORMED
    assert error(j([doc])).reason == TOO_DEEP
    assert error(c([doc]), "cbor").reason == TOO_DEEP
    assert error(j(reading), max_depth=0).reason == TOO_DEEP
    batch = {"readings": [reading]}  # three levels: object, list, object
    assert ok(j(batch), max_depth=3) and ok(c(batch), "cbor", max_depth=3)
    assert error(j(batch), max_depth=2).reason == TOO_DEEP
    assert error(c(batch), "cbor", max_depth=2).reason == TOO_DEEP
    # Brackets inside strings are text: 40 of them in a device id and an extra field.
    doc = {"dev": "[" * 40, "ts": T0, "reg": 1, "x": '\\"' + "{" * 40}
    assert ok(j(doc), max_depth=1)[0].device == "[" * 40


def test_400_digit_value_is_inf_and_the_batch_keeps_its_other_readings():
    big = 10**400
    payload = (
        b'{"readings": [{"dev": "A", "ts": %d, "reg": %d}, {"dev": "B", "ts": %d, "reg": 2.5}]}'
        % (T0, big, T0)
    )
    a, b = ok(payload)
    assert (a.values, a.not_finite, b.values) == ([], [(T0, math.inf)], [2.5])
    a, b = ok(
        c({"readings": [{"dev": "A", "ts": T0, "reg": -big}, {"dev": "B", "ts": T0, "reg": 2.5}]})
    )
    assert (a.values, a.not_finite, b.values) == ([], [(T0, -math.inf)], [2.5])
    # and the validator quarantines only that reading
    index = ChannelIndex(
        [
            ChannelInfo(i, dev, "register", "volume", "m3", "m3", 0.0, 1e9, None, True)
            for i, dev in enumerate(["A", "B"], 1)
        ],
        {},
    )
    validator = Validator(lambda: index, future_tolerance_s=3600, earliest_epoch=0.0)
    prepared = validator.prepare(Frame("mqtt", "t", payload, "json", received_at=T0 + 60))
    assert prepared.values == [2.5]
    assert [r.reason for r in prepared.rejections] == [NOT_A_NUMBER]


@pytest.mark.parametrize(
    "raw, expected",
    [
        (10**400, math.inf),
        (-(10**5000), -math.inf),
        (Decimal("1e400"), math.inf),
        (Decimal("-1e999999"), -math.inf),
        (Fraction(10**400, 3), math.inf),
        (Fraction(-(10**400), 7), -math.inf),
        (Fraction(1, 3), 1 / 3),
        (Decimal("2.5"), 2.5),
    ],
    ids=["int400", "int5000", "dec400", "dec999999", "frac400", "frac-400", "third", "2.5"],
)
def test_cbor_numbers_beyond_float_range_are_inf(raw: Any, expected: float):
    [up] = ok(c({"dev": "A", "ts": T0, "reg": raw}))
    if math.isfinite(expected):
        assert (up.values, up.not_finite) == ([expected], [])
    else:
        assert (up.values, up.not_finite) == ([], [(T0, expected)])


@pytest.mark.parametrize(
    "payload",
    [
        b'{"dev": "A", "ts": %d, "reg": 1e999}' % T0,
        b'{"dev": "A", "ts": %d, "reg": -' % T0 + b"9" * 5000 + b"}",
        b'{"dev": "A", "t0": %d, "step": 1, "reg": [1, 1e999, 3]}' % T0,
    ],
)
def test_json_numbers_beyond_float_range_are_inf(payload: bytes):
    [up] = ok(payload)
    assert any(math.isinf(v) for _, v in up.not_finite)
    assert all(math.isfinite(v) for v in up.values) and len(up.values) == len(up.ts)


def test_nan_in_the_middle_of_a_cbor_interval_list_is_set_aside_with_its_timestamp():
    [up] = ok(c({"dev": "A", "t0": T0, "step": 900, "reg": [1.0, math.nan, math.inf, 4.0]}))
    assert (up.ts, up.values) == ([T0, T0 + 2700], [1.0, 4.0])
    [(t1, nan), (t2, inf)] = up.not_finite
    assert (t1, t2, inf) == (T0 + 900, T0 + 1800, math.inf) and math.isnan(nan)
    [up] = ok(c({"dev": "A", "t0": T0, "step": 900, "reg": [Decimal("sNaN"), 1]}))
    assert up.values == [1.0] and math.isnan(up.not_finite[0][1])


@pytest.mark.parametrize(
    "doc",
    [
        {"dev": "A", "ts": math.nan, "reg": 1},
        {"dev": "A", "ts": math.inf, "reg": 1},
        {"dev": "A", "ts_ms": -math.inf, "reg": 1},
        {"dev": "A", "t0": math.nan, "step": 900, "reg": [1]},
        {"dev": "A", "t0_ms": math.nan, "step": 900, "reg": [1]},
        {"dev": "A", "t0": T0, "step": math.nan, "reg": [1]},
        {"dev": "A", "t0": T0, "step": math.inf, "reg": [1]},
        {"dev": "A", "ts": 10**400, "reg": 1},
        {"dev": "A", "ts": 1e300, "reg": 1},
        {"dev": "A", "ts_ms": 10**400, "reg": 1},
        {"dev": "A", "t0": T0, "step": 10**400, "reg": [1, 2]},
        {"dev": "A", "t0": 9e12, "step": 1e12, "reg": [1, 2, 3]},  # ends past 1e13 s
        {"dev": "A", "ts": True, "reg": 1},
        {"dev": "A", "ts": Decimal(T0), "reg": 1},
        {"dev": "A", "ts_ms": "2026-01-01T00:00:00Z", "reg": 1},
        {"dev": "A", "ts": "2026-01-01T00:00:00", "reg": 1},
        {"dev": "A", "ts": "2026-01-01T00:00:00Z" + " " * 100, "reg": 1},
    ],
)
def test_unusable_timestamps_are_malformed(doc: dict[str, Any]):
    assert error(c(doc), "cbor").reason == MALFORMED
    if not any(isinstance(v, Decimal) for v in doc.values()):  # JSON has no decimals
        assert error(j(doc), "json").reason == MALFORMED  # NaN/Infinity: not JSON at all


@pytest.mark.parametrize("step", [0, -900, 0.0, -1e-9, False, True, "900", None])
def test_step_must_be_a_positive_number(step: Any):
    doc = {"dev": "A", "t0": T0, "step": step, "reg": [1.0, 2.0]}
    assert error(j(doc)).reason == MALFORMED  # the fast path must not accept it either
    assert error(c(doc), "cbor").reason == MALFORMED


@pytest.mark.parametrize("status", [0xFF, 0xFFFF_FFFF, 2**200 + 0x0F, 0xF0 | 0x0F])
def test_integer_status_keeps_only_the_vendor_bits(status: int):
    for payload, fmt in [
        (j({"dev": "A", "ts": T0, "reg": 1, "status": status}), None),
        (j({"dev": "A", "t0": T0, "step": 900, "reg": [1], "status": status}), None),
        (c({"dev": "A", "ts": T0, "reg": 1, "status": status}), None),
    ]:
        [up] = ok(payload, fmt)
        assert up.status == 0x0F
    [up] = ok(encode_binary_v1(1, T0, 900, [1], 0xFF))
    assert up.status == 0x0F


def test_status_bits_outside_the_table_are_ignored():
    quality_bits = int(Quality.BAD | Quality.UNCERTAIN | Quality.ESTIMATED | Quality.EDITED)
    [up] = ok(j({"dev": "A", "ts": T0, "reg": 1, "status": quality_bits | 1}))
    assert up.status == Quality.LEAK
    [up] = ok(encode_binary_v1(1, T0, 900, [1], quality_bits))
    assert up.status == 0


@pytest.mark.parametrize(
    "status", [-1, True, 1.0, "leak", ["sparkles"], [1], [["leak"]], {"leak": True}]
)
def test_bad_status_is_malformed(status: Any):
    assert error(j({"dev": "A", "ts": T0, "reg": 1, "status": status})).reason == MALFORMED


def test_named_status_uses_status_names():
    [up] = ok(j({"dev": "A", "ts": T0, "reg": 1, "status": ["LEAK", "magnetic", "battery"]}))
    assert up.status == Quality.LEAK | Quality.TAMPER | Quality.LOW_BATTERY


def test_units_of_time_come_from_the_key_never_the_magnitude():
    [up] = ok(j({"dev": "A", "ts": 1.7e12, "reg": 1}))
    assert up.ts == [1.7e12]
    [up] = ok(j({"dev": "A", "t0": 1.7e12, "step": 900, "reg": [1, 2]}))  # fast path
    assert up.ts == [1.7e12, 1.7e12 + 900]
    [up] = ok(c({"dev": "A", "t0": 1.7e12, "step": 900, "reg": [1, 2]}))
    assert up.ts == [1.7e12, 1.7e12 + 900]
    [up] = ok(j({"dev": "A", "ts_ms": 1_767_225_600_250, "reg": 1}))
    assert up.ts == [1_767_225_600.25]
    [up] = ok(j({"dev": "A", "t0_ms": 1_767_225_600_000, "step": 60, "reg": [1, 2]}))
    assert up.ts == [T0, T0 + 60]
    [up] = ok(c({"dev": "A", "t0_ms": 1_767_225_600_000, "step": 60, "reg": [1, 2]}))
    assert up.ts == [T0, T0 + 60]
    [up] = ok(j({"dev": "A", "t0_ms": 1_767_225_600_000, "step": 60, "reg": [1], "status": 1}))
    assert (up.ts, up.status) == ([T0], Quality.LEAK)
    for both in (
        {"dev": "A", "ts": T0, "ts_ms": T0 * 1000, "reg": 1},
        {"dev": "A", "t0": T0, "t0_ms": T0 * 1000, "step": 60, "reg": [1]},
    ):
        assert error(j(both)).reason == MALFORMED
        assert error(c(both), "cbor").reason == MALFORMED


def test_cbor_datetimes_are_timestamps_when_they_have_an_offset():
    aware = datetime(2026, 1, 1, 5, tzinfo=timezone(timedelta(hours=5)))
    [up] = ok(c({"dev": "A", "ts": aware, "reg": 1}))
    assert up.ts == [T0]
    [up] = ok(c({"dev": "A", "t0": aware, "step": 60, "reg": [1, 2]}))
    assert up.ts == [T0, T0 + 60]
    naive_tag0 = b"\xa3\x63dev\x61A\x62ts\xc0\x73" + b"2026-01-01T00:00:00" + b"\x63reg\x01"
    assert error(naive_tag0, "cbor").reason == MALFORMED


@pytest.mark.parametrize(
    "doc, detail",
    [
        ([1, 2], "must be an object"),
        ({"readings": [{"dev": "A", "ts": T0, "reg": 1}, 5]}, "readings[1]"),
        ({"readings": [{"dev": "A", "ts": T0, "reg": 1}, [1]]}, "readings[1]"),
        ({"readings": []}, "empty"),
        ({"readings": {"dev": "A"}}, "must be a list"),
        ({"dev": "A", "t0": T0, "step": 60, "reg": []}, "empty"),
        ({"dev": 5, "ts": T0, "reg": 1}, "device id"),
        ({"dev": None, "ts": T0, "reg": 1}, "device id"),
        ({"dev": ["A"], "ts": T0, "reg": 1}, "device id"),
        ({"dev": "D" * 129, "ts": T0, "reg": 1}, "device id"),
        ({"dev": "A\x00B", "ts": T0, "reg": 1}, "unprintable"),
        ({"dev": "A\nB", "ts": T0, "reg": 1}, "unprintable"),
        ({"dev": "A", "ch": 5, "ts": T0, "v": 1}, "channel"),
        ({"dev": "A", "ch": "c" * 500, "ts": T0, "v": 1}, "channel"),
        ({"dev": "A", "ts": T0, "reg": 1, "unit": 3}, "unit"),
        ({"dev": "A", "ts": T0, "reg": "12"}, "not a number"),
        ({"dev": "A", "ts": T0, "reg": True}, "not a number"),
        ({"dev": "A", "ts": T0, "reg": None}, "not a number"),
        ({"dev": "A", "ts": T0, "reg": {"x": 1}}, "not a number"),
        ({"dev": "A", "t0": T0, "step": 60, "reg": [1, False]}, "not a number"),
        ({"dev": "A", "t0": T0, "step": 60, "reg": [1, "2"]}, "not a number"),
        ({"dev": "A", "t0": T0, "step": 60, "reg": [1, [2]]}, "not a number"),
        ({"dev": "A", "ts": T0, "reg": [1]}, "'t0'"),
        ({"dev": "A", "reg": 1}, "timestamp"),
    ],
)
def test_hostile_shapes_are_malformed_with_a_useful_detail(doc: Any, detail: str):
    for payload, fmt in ((j(doc), "json"), (c(doc), "cbor")):
        err = error(payload, fmt)
        assert err.reason == MALFORMED
        assert detail in err.detail, err.detail


@pytest.mark.parametrize(
    "payload",
    [
        c({"dev": "A", "ts": T0, "reg": cbor2.CBORTag(999, 1)}),
        c({"dev": "A", "ts": T0, "reg": cbor2.CBORSimpleValue(99)}),
        c({"dev": "A", "ts": T0, "reg": cbor2.undefined}),
        c({"dev": "A", "ts": T0, "reg": b"\x01"}),
        c({"dev": b"A", "ts": T0, "reg": 1}),
        c({"dev": "A", "ts": T0, "reg": 1, b"k": 1}),
        c({"readings": [{"dev": "A", "ts": T0, "reg": 1}], 7: 1}),
        c({"dev": "A", "ts": T0, "reg": 1, (1, 2): 1}),
        b"\xa3\x63dev\x61A\x62ts\x01\x63reg\xd8\x23\x61a",  # tag 35: a regular expression
        b"\xa3\x63dev\x61A\x62ts\x01\x63reg\xd8\x24\x61a",  # tag 36: a MIME message
        b"\xa3\x63dev\x61A\x62ts\x01\x63reg\xd8\x1c\x81\xd8\x1d\x00",  # a list holding itself
    ],
)
@LEGACY
def test_cbor_oddities_are_malformed(legacy: bool, payload: bytes):
    with cbor2_bare(legacy):
        assert error(payload, "cbor").reason == MALFORMED


@LEGACY
def test_cbor_exponential_shared_references_are_refused_fast(legacy: bool):
    # 28(x) marks x shareable (numbered in order of appearance), 29(i) refers to number i. Level
    # k holds level k-1 twice: from 300 bytes, 2**30 nodes for a walk that follows references.
    levels = 30

    def level(k: int) -> bytes:
        if k == 0:
            return b"\xd8\x1c\x82\x01\x01"
        return b"\xd8\x1c\x82" + level(k - 1) + b"\xd8\x1d" + cbor2.dumps(levels - (k - 1))

    [up] = ok(c({"dev": "A", "ts": T0, "reg": 1}))  # the frame is fine without the field
    started = time.perf_counter()
    payload = b"\xa4\x63dev\x61A\x62ts\x01\x63reg\x01\x61x" + level(levels)
    with cbor2_bare(legacy):
        err = error(payload, "cbor", max_depth=64)
    assert err.reason == MALFORMED and "shared" in err.detail
    assert time.perf_counter() - started < 1.0


def test_cbor_colliding_integer_keys_are_refused_fast():
    prime = (1 << 61) - 1  # hash(k * prime) == 0 for every k: one bucket for all keys
    n = 20_000
    body = b"".join(cbor2.dumps(k * prime) + b"\x00" for k in range(1, n + 1))
    started = time.perf_counter()
    assert error(b"\xba" + n.to_bytes(4, "big") + body, "cbor").reason == MALFORMED
    assert time.perf_counter() - started < 1.0


def test_details_are_capped():
    name = "x" * 10_000
    err = error(j({"dev": "A", "ts": T0, "reg": 1, "status": [name]}))
    assert len(err.detail) <= payloads.MAX_DETAIL
    err = error(j({"readings": [{"dev": "A", "ts": T0, "reg": 1}] * 5 + [{"dev": "A" * 10**5}]}))
    assert err.detail.startswith("readings[5]") and len(err.detail) <= payloads.MAX_DETAIL
    long = payloads._fail(MALFORMED, "y" * 1000)
    assert len(long.detail) == payloads.MAX_DETAIL and long.detail.endswith("[cut]")


def test_binary_v1_errors_still_name_their_reason():
    frame = bytearray(encode_binary_v1(1, T0, 900, [1, 2]))
    frame[-1] ^= 0xFF
    assert error(bytes(frame)).reason == BAD_CRC
    assert error(bytes([2]) + bytes(20), "binary-v1").reason == UNSUPPORTED_FORMAT
    assert error(b"\x99hello").reason == UNSUPPORTED_FORMAT
    body = struct.pack(">BIIHBB", 1, 1, T0, 0, 0, 2) + struct.pack(">2I", 1, 2)
    assert error(body + struct.pack("<H", crc16_modbus(body))).reason == MALFORMED
    body = struct.pack(">BIIHBB", 1, 1, T0, 0, 0, 1) + struct.pack(">I", 1)
    assert ok(body + struct.pack("<H", crc16_modbus(body)))[0].ts == [T0]


def test_an_unforeseen_exception_stays_with_its_frame(monkeypatch: pytest.MonkeyPatch):
    def broken(*_: object) -> None:
        raise KeyError("bug")

    monkeypatch.setattr(payloads, "_from_document", broken)
    with pytest.raises(PayloadError) as err:
        decode(j({"dev": "A", "ts": T0, "reg": 1}))
    assert err.value.reason == PROCESSING_ERROR and "KeyError" in err.value.detail


# --- regression cases as data -------------------------------------------------------------------
def _float(x: Any) -> float:
    return float(x)  # "nan", "inf", "-inf" are strings in expected.json (JSON has no NaN)


CASE_DIRS = sorted(p for p in CASES.iterdir() if (p / "expected.json").exists())


@pytest.mark.parametrize("case", CASE_DIRS, ids=[p.name for p in CASE_DIRS])
def test_payload_case(case: Path):
    spec = json.loads((case / "expected.json").read_text())
    [frame] = case.glob("frame.*")
    result = outcome(frame.read_bytes(), spec["format"])
    expected = spec["expected"]
    if "error" in expected:
        assert isinstance(result, PayloadError), result
        assert result.reason == expected["error"]
        assert expected.get("detail_contains", "") in result.detail
        return
    assert not isinstance(result, PayloadError), result
    got = [
        {
            "device": u.device,
            "channel": u.channel,
            "ts": u.ts,
            "values": [repr(v) for v in u.values],
            "not_finite": [[t, repr(v)] for t, v in u.not_finite],
            "unit": u.unit,
            "status": u.status,
        }
        for u in result
    ]
    want = [
        {
            **u,
            "values": [repr(_float(v)) for v in u["values"]],
            "not_finite": [[t, repr(_float(v))] for t, v in u.get("not_finite", [])],
        }
        for u in expected["uplinks"]
    ]
    assert got == want
