"""Payload codecs for meter uplinks: JSON (single, multi-interval, concentrator batch), CBOR
with the same shape, and the compact binary vendor frame ``binary-v1``.

JSON and CBOR objects (documented in ``docs/topics.md``)::

    {"dev": "AQN00001", "ts": 1767225600, "reg": 123.456, "unit": "m3", "status": ["leak"]}
    {"dev": "AQN00001", "t0": 1767225600, "step": 900, "reg": [..96 values..], "unit": "L"}
    {"dev": "PS1", "ch": "pressure", "ts": "2026-01-01T00:00:00Z", "v": 4.1, "unit": "bar"}
    {"gw": "GW-N1", "readings": [ <any of the above>, ... ]}

``binary-v1`` (big-endian, what battery meters send to save airtime)::

    0   u8      version = 1
    1   u32     meter serial
    5   u32     first timestamp, unix seconds UTC
    9   u16     interval seconds
    11  u8      status bits: 1 leak, 2 reverse flow, 4 tamper, 8 low battery
    12  u8      count N (1..255)
    13  N*u32   register in litres
    13+4N u16   CRC-16/MODBUS of bytes 0..13+4N-1, little-endian (as Modbus sends it)
"""

from __future__ import annotations

import struct
from datetime import datetime
from typing import Any

import cbor2
import msgspec

from protocols.uplink import STATUS_NAMES, PayloadError, Uplink

MALFORMED = "MALFORMED"
BAD_CRC = "BAD_CRC"
UNSUPPORTED_FORMAT = "UNSUPPORTED_FORMAT"

_HEADER = struct.Struct(">BIIHBB")
BINARY_VERSION = 1


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc_table()


def crc16_modbus(data: bytes) -> int:
    crc = 0xFFFF
    table = _CRC_TABLE
    for b in data:
        crc = (crc >> 8) ^ table[(crc ^ b) & 0xFF]
    return crc


def encode_binary_v1(
    serial: int, t0: int, step: int, registers_litres: list[int], status: int = 0
) -> bytes:
    if not 1 <= len(registers_litres) <= 255:
        raise ValueError("binary-v1 carries 1..255 registers")
    body = _HEADER.pack(BINARY_VERSION, serial, t0, step, status & 0xFF, len(registers_litres))
    body += struct.pack(f">{len(registers_litres)}I", *registers_litres)
    return body + struct.pack("<H", crc16_modbus(body))


def decode_binary_v1(payload: bytes) -> list[Uplink]:
    if len(payload) < _HEADER.size + 2:
        raise PayloadError(MALFORMED, f"binary-v1 frame too short ({len(payload)} bytes)")
    version, serial, t0, step, status, count = _HEADER.unpack_from(payload)
    if version != BINARY_VERSION:
        raise PayloadError(UNSUPPORTED_FORMAT, f"binary frame version {version}")
    expected = _HEADER.size + 4 * count + 2
    if count == 0 or len(payload) != expected:
        raise PayloadError(
            MALFORMED, f"binary-v1 length {len(payload)} != {expected} for {count} registers"
        )
    (crc,) = struct.unpack_from("<H", payload, expected - 2)
    if crc != crc16_modbus(payload[: expected - 2]):
        raise PayloadError(BAD_CRC, f"CRC {crc:04x} does not match", device=f"serial:{serial}")
    regs = struct.unpack_from(f">{count}I", payload, _HEADER.size)
    return [
        Uplink(
            device=f"serial:{serial}",
            channel="register",
            ts=[float(t0 + i * step) for i in range(count)],
            values=[r / 1000.0 for r in regs],
            unit="m3",
            status=status,
        )
    ]


_json_decoder = msgspec.json.Decoder()


def _ts(value: Any) -> float:
    if isinstance(value, bool):
        raise PayloadError(MALFORMED, f"timestamp {value!r}")
    if isinstance(value, int | float):
        # Milliseconds are common from gateways; seconds never exceed 1e11 before year 5000.
        return float(value) / 1000.0 if value > 1e11 else float(value)
    if isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            raise PayloadError(MALFORMED, f"timestamp {value!r}") from exc
        if dt.tzinfo is None:
            raise PayloadError(MALFORMED, f"timestamp {value!r} has no UTC offset")
        return dt.timestamp()
    raise PayloadError(MALFORMED, f"timestamp {value!r}")


def _status(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, int) and not isinstance(value, bool):
        return value & 0xFF
    if isinstance(value, list):
        bits = 0
        for name in value:
            flag = STATUS_NAMES.get(str(name).lower())
            if flag is None:
                raise PayloadError(MALFORMED, f"unknown status flag {name!r}")
            bits |= flag
        return bits
    raise PayloadError(MALFORMED, f"status {value!r}")


def _number(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise PayloadError(MALFORMED, f"value {value!r} is not a number")


def _from_object(obj: Any, default_device: str | None) -> Uplink:
    if not isinstance(obj, dict):
        raise PayloadError(MALFORMED, "reading is not an object")
    device = obj.get("dev", default_device)
    if not isinstance(device, str) or not device:
        raise PayloadError(MALFORMED, "reading has no device id ('dev')")
    channel: Any
    if "reg" in obj:
        channel, raw = "register", obj["reg"]
    elif "v" in obj:
        channel, raw = obj.get("ch"), obj["v"]
        if not isinstance(channel, str):
            raise PayloadError(MALFORMED, "reading with 'v' needs a channel name ('ch')", device)
    else:
        raise PayloadError(MALFORMED, "reading has no value ('reg' or 'v')", device)
    unit = obj.get("unit")
    if unit is not None and not isinstance(unit, str):
        raise PayloadError(MALFORMED, f"unit {unit!r}", device)
    status = _status(obj.get("status"))
    if isinstance(raw, list):
        if "t0" not in obj or "step" not in obj:
            raise PayloadError(MALFORMED, "a list of values needs 't0' and 'step'", device)
        t0, step = _ts(obj["t0"]), _number(obj["step"])
        values = [_number(v) for v in raw]
        if not values:
            raise PayloadError(MALFORMED, "empty list of values", device)
        ts = [t0 + i * step for i in range(len(values))]
    else:
        if "ts" not in obj:
            raise PayloadError(MALFORMED, "reading has no timestamp ('ts')", device)
        ts, values = [_ts(obj["ts"])], [_number(raw)]
    return Uplink(device=device, channel=channel, ts=ts, values=values, unit=unit, status=status)


def _from_document(doc: Any, default_device: str | None) -> list[Uplink]:
    if isinstance(doc, dict) and "readings" in doc:
        items = doc["readings"]
        if not isinstance(items, list):
            raise PayloadError(MALFORMED, "'readings' is not a list")
        return [_from_object(item, default_device) for item in items]
    return [_from_object(doc, default_device)]


class _Series(msgspec.Struct):
    """The usual single-meter uplink, ``{"dev", "t0", "step", "reg": [...]}``, typed.

    Why: decoding straight into floats skips a Python-level check per reading, which is most of
    the decode cost of a 96-reading message. Anything else (batches, ISO timestamps, scalar
    readings, wrong types) fails this schema and takes the general path, which owns the error
    messages.
    """

    dev: str
    t0: float
    step: float
    reg: list[float]
    unit: str | None = None
    status: int | None = None


_series_decoder = msgspec.json.Decoder(_Series)


def _series(payload: bytes) -> list[Uplink] | None:
    try:
        s = _series_decoder.decode(payload)
    except msgspec.DecodeError:  # ValidationError included: not this shape, or not valid
        return None
    n = len(s.reg)
    if not n or not s.dev:
        return None
    t0 = s.t0 / 1000.0 if s.t0 > 1e11 else s.t0
    step = s.step
    return [
        Uplink(
            device=s.dev,
            channel="register",
            ts=[t0 + i * step for i in range(n)],
            values=s.reg,
            unit=s.unit,
            status=_status(s.status),
        )
    ]


def decode_json(payload: bytes, default_device: str | None = None) -> list[Uplink]:
    fast = _series(payload)
    if fast is not None:
        return fast
    try:
        doc = _json_decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise PayloadError(MALFORMED, f"invalid JSON: {exc}") from exc
    return _from_document(doc, default_device)


def decode_cbor(payload: bytes, default_device: str | None = None) -> list[Uplink]:
    try:
        doc = cbor2.loads(payload)
    except Exception as exc:  # cbor2 raises several unrelated exception types
        raise PayloadError(MALFORMED, f"invalid CBOR: {exc}") from exc
    return _from_document(doc, default_device)


def sniff_format(payload: bytes) -> str:
    """Guess a payload's format: JSON starts with ``{``/``[``, binary-v1 with its version byte."""
    head = payload[:1]
    if head in (b"{", b"["):
        return "json"
    if head == bytes([BINARY_VERSION]):
        return "binary-v1"
    if head and 0xA0 <= head[0] <= 0xBF:  # CBOR major type 5 (map)
        return "cbor"
    return "unknown"


def decode(
    payload: bytes, fmt: str | None = None, default_device: str | None = None
) -> list[Uplink]:
    """Decode a payload in ``fmt`` (sniffed when None) into uplinks, or raise PayloadError."""
    fmt = fmt or sniff_format(payload)
    if fmt == "json":
        return decode_json(payload, default_device)
    if fmt == "binary-v1":
        return decode_binary_v1(payload)
    if fmt == "cbor":
        return decode_cbor(payload, default_device)
    raise PayloadError(UNSUPPORTED_FORMAT, f"cannot tell the payload format of {payload[:8]!r}")
