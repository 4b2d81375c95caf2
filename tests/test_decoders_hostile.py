"""Property-based tests for the decoders of the polled and subscribed protocols: any register
words (Modbus) and any OPC-UA data change give a float (finite or not: ingest quarantines NaN and
infinities per reading) or the decoder's own documented error, never another exception."""

from __future__ import annotations

import math
from datetime import UTC, datetime

from asyncua import ua
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.modbus_decode import TYPES, Block, decode_point, decode_words, parse_point
from protocols.opcua_decode import NotNumeric, convert_batch, numeric_value, status_quality
from protocols.uplink import Quality

WORD_TYPES = [t for t, (dt, _) in TYPES.items() if dt is not None]
word = st.integers(min_value=0, max_value=0xFFFF)
order = st.sampled_from(["big", "little"])


@settings(max_examples=400, deadline=None)
@given(type_=st.sampled_from(WORD_TYPES), words=st.lists(word, max_size=6), bo=order, wo=order)
def test_any_register_words_decode_to_a_float_or_a_width_error(type_, words, bo, wo):
    width = TYPES[type_][1]
    try:
        value = decode_words(words, type_, bo, wo)
    except ValueError as err:
        assert len(words) != width and "register" in str(err)
        return
    assert len(words) == width
    assert isinstance(value, float)


@settings(max_examples=200, deadline=None)
@given(
    type_=st.sampled_from(WORD_TYPES),
    data=st.lists(word, min_size=4, max_size=4),
    scale=st.floats(allow_nan=False, allow_infinity=False, width=32),
    offset=st.floats(allow_nan=False, allow_infinity=False, width=32),
)
def test_a_configured_point_decodes_any_words(type_, data, scale, offset):
    point = parse_point(
        "flow", "m3/h", {"address": 0, "type": type_, "scale": scale, "offset": offset}
    )
    value = decode_point(point, Block("holding", 0, 4, [point]), data)
    assert isinstance(value, float)  # NaN or inf is possible: ingest quarantines it


def test_float32_nan_and_inf_registers_reach_ingest_as_non_finite_values():
    assert math.isnan(decode_words([0x7FC0, 0x0000], "float32"))
    assert decode_words([0x7F80, 0x0000], "float32") == math.inf


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.lists(st.integers(), max_size=3)
)
stamps = st.none() | st.datetimes(
    min_value=datetime(1601, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
)


@settings(max_examples=300, deadline=None)
@given(value=scalars)
def test_numeric_value_is_a_float_or_not_numeric(value):
    try:
        x = numeric_value(value)
    except NotNumeric as err:
        assert err.reason in ("no_value", "not_numeric")
    else:
        assert isinstance(x, float)


@settings(max_examples=200, deadline=None)
@given(
    items=st.lists(
        st.tuples(
            st.sampled_from(["ph", "turbidity"]),
            scalars,
            stamps,
            stamps,
            st.integers(min_value=0, max_value=2**32 - 1),
        ),
        max_size=8,
    )
)
def test_any_data_change_batch_converts_to_uplinks_or_counted_skips(items):
    batch = []
    for channel, value, src, srv, status in items:
        try:  # only what asyncua itself can put on the wire
            variant = ua.Variant(value) if value is not None else None
        except (ua.UaError, OverflowError, ValueError):
            continue
        dv = ua.DataValue(
            Value=variant,
            StatusCode=ua.StatusCode(status),
            SourceTimestamp=src,
            ServerTimestamp=srv,
        )
        batch.append((channel, dv))
    uplinks, skipped = convert_batch("WQ1", batch, received_at=1_767_225_600.0)
    assert sum(len(u.ts) for u in uplinks) + sum(skipped.values()) == len(batch)
    for up in uplinks:
        assert len(up.ts) == len(up.values)
        assert all(math.isfinite(t) for t in up.ts)
        assert up.status & ~int(Quality.BAD | Quality.UNCERTAIN) == 0
    assert status_quality(None) == 0
