"""Payload codecs for meter uplinks: JSON (single, multi-interval, concentrator batch), CBOR
with the same shape, and the compact binary vendor frame ``binary-v1``.

JSON and CBOR objects (documented in ``docs/topics.md``)::

    {"dev": "AQN00001", "ts": 1767225600, "reg": 123.456, "unit": "m3", "status": ["leak"]}
    {"dev": "AQN00001", "t0": 1767225600, "step": 900, "reg": [..96 values..], "unit": "L"}
    {"dev": "AQN00001", "t0_ms": 1767225600000, "step": 900, "reg": [..], "status": 5}
    {"dev": "PS1", "ch": "pressure", "ts": "2026-01-01T00:00:00Z", "v": 4.1, "unit": "bar"}
    {"gw": "GW-N1", "readings": [ <any of the above>, ... ]}

Time has its unit in the key, never in the magnitude: ``ts`` and ``t0`` are unix seconds (int or
float) or ISO 8601 strings with an offset (CBOR: also a timezone-aware date/time tag 0 or 1);
``ts_ms`` and ``t0_ms`` are unix milliseconds. A reading carries exactly one of each pair. A
gateway that sends milliseconds under ``ts`` gets its readings quarantined as FUTURE_TIMESTAMP,
which is visible and fixable, instead of a guess that is silently wrong for some values. ``step``
is in seconds, finite and > 0.

Values are numbers; a number too large for a float (a long JSON integer, a CBOR bignum, decimal
fraction or rational) counts as ±inf, and like NaN it never comes out as a reading: ``decode``
sets it aside in ``Uplink.not_finite``, which ingest quarantines reading by reading as
NOT_A_NUMBER while it keeps the frame's others. A status is a list of
names (``STATUS_NAMES``) or an integer read through :data:`VENDOR_STATUS_BITS`.

Every input either decodes or raises :class:`PayloadError`: a document nested deeper than
``max_depth`` is TOO_DEEP (checked on the JSON bytes before parsing, bounded inside cbor2 and
walked iteratively after it), anything else unusable is MALFORMED with a short detail.

``binary-v1`` (big-endian, what battery meters send to save airtime)::

    0   u8      version = 1
    1   u32     meter serial
    5   u32     first timestamp, unix seconds UTC
    9   u16     interval seconds (> 0 when N > 1)
    11  u8      status bits: 1 leak, 2 reverse flow, 4 tamper, 8 low battery
    12  u8      count N (1..255)
    13  N*u32   register in litres
    13+4N u16   CRC-16/MODBUS of bytes 0..13+4N-1, little-endian (as Modbus sends it)
"""

from __future__ import annotations

import json
import logging
import math
import struct
from collections.abc import Callable, Iterable
from datetime import datetime
from decimal import Decimal
from fractions import Fraction
from typing import Any

import cbor2
import msgspec

from protocols.uplink import STATUS_NAMES, PayloadError, Quality, Uplink

log = logging.getLogger(__name__)

MALFORMED = "MALFORMED"
BAD_CRC = "BAD_CRC"
UNSUPPORTED_FORMAT = "UNSUPPORTED_FORMAT"
TOO_DEEP = "TOO_DEEP"
# Only for a decoder bug: :func:`decode` keeps even that with its frame (ingest's reason code).
PROCESSING_ERROR = "PROCESSING_ERROR"

DEFAULT_MAX_DEPTH = 32
MAX_DEVICE_ID = 128  # longer ids are no meter's; the id lands in quarantine rows and logs
MAX_CHANNEL = 128
MAX_UNIT = 32
MAX_DETAIL = 200  # quarantine.detail is for people: keep it to a line
_CUT = " ...[cut]"
# PostgreSQL's timestamptz ends in 294276 AD (about 9.2e12 s): beyond this no reading is storable
# and t0 + i * step could leave the floats, so such a timestamp is MALFORMED, not merely future.
MAX_ABS_TIMESTAMP = 1e13
_MAX_ISO = 64

# The documented binary-v1 status bits, and the only device bits that mean anything here. Other
# bits are vendor-specific (or noise); passed through they would land on the system's own
# quality bits (BAD, UNCERTAIN, ESTIMATED, EDITED), letting a meter mark its reading ESTIMATED.
VENDOR_STATUS_BITS: dict[int, Quality] = {
    1: Quality.LEAK,
    2: Quality.REVERSE_FLOW,
    4: Quality.TAMPER,
    8: Quality.LOW_BATTERY,
}

_HEADER = struct.Struct(">BIIHBB")
BINARY_VERSION = 1


def _fail(reason: str, detail: str, device: str | None = None) -> PayloadError:
    """A PayloadError whose detail fits a quarantine row, however long the input's text was."""
    if len(detail) > MAX_DETAIL:
        detail = detail[: MAX_DETAIL - len(_CUT)] + _CUT
    return PayloadError(reason, detail, device)


class Decoded(list[Uplink]):
    """The uplinks of one message, plus the parts of it a codec refused on their own.

    Why: a wM-Bus gateway forwards many meters' telegrams in one message; one telegram under a
    wrong key must cost that telegram only, not its neighbours. ``rejected`` holds each refused
    part's error and its raw bytes, so ingest can quarantine it as its own row. A codec raises
    PayloadError (as before) only when nothing in the message decodes.
    """

    __slots__ = ("rejected",)

    def __init__(
        self,
        uplinks: Iterable[Uplink] = (),
        rejected: Iterable[tuple[PayloadError, bytes]] = (),
    ) -> None:
        super().__init__(uplinks)
        self.rejected: list[tuple[PayloadError, bytes]] = list(rejected)


def _brief(value: Any) -> str:
    """A short, always-cheap description of an input value for an error detail (never ``repr``
    of a container or a huge integer: those can be megabytes, or refuse to print at all)."""
    t = type(value)
    if t is str or t is bytes or t is bytearray:
        return repr(value[:40]) + ("..." if len(value) > 40 else "")
    if t is int:
        bits = value.bit_length()
        return repr(value) if bits <= 64 else f"<{'-' if value < 0 else ''}{bits}-bit integer>"
    if t is float or t is bool or value is None:
        return repr(value)
    if t is list or t is dict or t is tuple:
        return f"<{t.__name__} of {len(value)}>"
    return f"<{t.__name__}>"


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


def _vendor_lut() -> tuple[tuple[int, ...], int]:
    """:data:`VENDOR_STATUS_BITS` as a lookup by the status bits it names (and their mask): one
    index per uplink instead of a loop over Quality flags, whose ``|`` runs in Python."""
    mask = 0
    for bit in VENDOR_STATUS_BITS:
        assert bit > 0 and bit & (bit - 1) == 0 and bit < 1 << 16, "one low bit per entry"
        mask |= bit
    lut = []
    for raw in range(mask + 1):
        bits = 0
        for bit, flag in VENDOR_STATUS_BITS.items():
            if raw & bit:
                bits |= int(flag)
        lut.append(bits)
    return tuple(lut), mask


_VENDOR_LUT, _VENDOR_IN = _vendor_lut()


def _vendor_bits(raw: int) -> int:
    """Quality bits of a device's integer status: only what the table names gets through."""
    return _VENDOR_LUT[raw & _VENDOR_IN]


def decode_binary_v1(payload: bytes) -> list[Uplink]:
    if len(payload) < _HEADER.size + 2:
        raise _fail(MALFORMED, f"binary-v1 frame too short ({len(payload)} bytes)")
    version, serial, t0, step, status, count = _HEADER.unpack_from(payload)
    if version != BINARY_VERSION:
        raise _fail(UNSUPPORTED_FORMAT, f"binary frame version {version}")
    expected = _HEADER.size + 4 * count + 2
    if count == 0 or len(payload) != expected:
        raise _fail(
            MALFORMED, f"binary-v1 length {len(payload)} != {expected} for {count} registers"
        )
    device = f"serial:{serial}"
    (crc,) = struct.unpack_from("<H", payload, expected - 2)
    if crc != crc16_modbus(payload[: expected - 2]):
        raise _fail(BAD_CRC, f"CRC {crc:04x} does not match", device)
    if step == 0 and count > 1:  # N registers at one instant: no reading can be placed in time
        raise _fail(MALFORMED, f"binary-v1 interval 0 for {count} registers", device)
    regs = struct.unpack_from(f">{count}I", payload, _HEADER.size)
    return [
        Uplink(
            device=device,
            channel="register",
            ts=[float(t0 + i * step) for i in range(count)],
            values=[r / 1000.0 for r in regs],
            unit="m3",
            status=_vendor_bits(status),
        )
    ]


# --- fields of a JSON/CBOR reading --------------------------------------------------------------
def _text(value: Any, what: str, limit: int, device: str | None = None, *, least: int = 1) -> str:
    """A name that will be stored and looked up: text, short, printable (no NUL, no control
    characters or lone surrogates, which PostgreSQL text or the logs would choke on)."""
    if type(value) is not str:
        raise _fail(MALFORMED, f"{what} {_brief(value)} is not text", device)
    if not least <= len(value) <= limit:
        raise _fail(MALFORMED, f"{what} has {len(value)} characters ({least}..{limit})", device)
    if not value.isprintable():
        raise _fail(MALFORMED, f"{what} {_brief(value)} has unprintable characters", device)
    return value


def _instant(value: Any, key: str, scale: float, device: str) -> float:
    """Unix seconds of a timestamp field; ``scale`` 1000 for the ``*_ms`` keys (numbers only)."""
    t = type(value)
    if t is int or t is float:
        try:
            secs = float(value) / scale if scale != 1.0 else float(value)
        except OverflowError:
            raise _fail(MALFORMED, f"{key} {_brief(value)} is too large", device) from None
    elif scale == 1.0 and t is str:
        secs = _iso(value, key, device)
    elif scale == 1.0 and isinstance(value, datetime):  # CBOR tags 0 and 1
        if value.tzinfo is None:
            raise _fail(MALFORMED, f"{key} {value.isoformat()} has no UTC offset", device)
        secs = value.timestamp()
    else:
        raise _fail(MALFORMED, f"{key} {_brief(value)} is not a timestamp", device)
    if not -MAX_ABS_TIMESTAMP <= secs <= MAX_ABS_TIMESTAMP:  # also False for NaN
        raise _fail(MALFORMED, f"{key} {_brief(value)} is not a storable timestamp", device)
    return secs


def _iso(value: str, key: str, device: str) -> float:
    if len(value) > _MAX_ISO:
        raise _fail(MALFORMED, f"{key} {_brief(value)} is not an ISO 8601 timestamp", device)
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise _fail(
            MALFORMED, f"{key} {_brief(value)} is not an ISO 8601 timestamp", device
        ) from None
    if dt.tzinfo is None:
        raise _fail(MALFORMED, f"{key} {_brief(value)} has no UTC offset", device)
    try:
        return dt.timestamp()
    except (OverflowError, ValueError, OSError):
        raise _fail(MALFORMED, f"{key} {_brief(value)} is out of range", device) from None


def _timestamp(obj: dict[str, Any], key: str, device: str) -> float | None:
    """``key`` (seconds) or ``key_ms`` (milliseconds), whichever is present; None if neither."""
    key_ms = key + "_ms"
    if key in obj:
        if key_ms in obj:
            raise _fail(MALFORMED, f"both '{key}' and '{key_ms}': which unit?", device)
        return _instant(obj[key], key, 1.0, device)
    if key_ms in obj:
        return _instant(obj[key_ms], key_ms, 1000.0, device)
    return None


def _step(value: Any, device: str) -> float:
    t = type(value)
    if t is int or t is float:
        try:
            step = float(value)
        except OverflowError:
            step = math.inf
        if 0.0 < step <= MAX_ABS_TIMESTAMP:
            return step
    raise _fail(MALFORMED, f"step {_brief(value)} is not a finite number of seconds > 0", device)


def _number(value: Any) -> float:
    """A reading's value as a float. What is a number but does not fit becomes ±inf, for the
    validator to quarantine alone (NOT_A_NUMBER); what is not a number fails the frame."""
    t = type(value)
    if t is float:
        return value
    if t is int or t is Fraction:
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    if t is Decimal:
        try:
            return float(value)  # huge exponents give ±inf already
        except ValueError:  # a signalling NaN
            return math.nan
    raise _fail(MALFORMED, f"value {_brief(value)} is not a number")


_INT_FLOAT = frozenset({int, float})


def _numbers(raw: list[Any]) -> list[float]:
    kinds = set(map(type, raw))
    if kinds == {float}:
        return raw
    if kinds <= _INT_FLOAT:
        try:
            return list(map(float, raw))
        except OverflowError:
            pass
    return [_number(v) for v in raw]


def _status(value: Any, device: str | None = None) -> int:
    if value is None:
        return 0
    t = type(value)
    if t is int:
        if value < 0:
            raise _fail(MALFORMED, f"status {_brief(value)} is negative", device)
        return _vendor_bits(value)
    if t is list:
        bits = 0
        for name in value:
            flag = STATUS_NAMES.get(name.lower()) if type(name) is str else None
            if flag is None:
                raise _fail(MALFORMED, f"unknown status flag {_brief(name)}", device)
            bits |= int(flag)
        return bits
    raise _fail(MALFORMED, f"status {_brief(value)} is neither a list of names nor an integer")


_TEXT_ONLY = frozenset({str})


def _check_keys(obj: dict[Any, Any], what: str) -> None:
    if not _TEXT_ONLY.issuperset(map(type, obj)):
        bad = next(k for k in obj if type(k) is not str)
        raise _fail(MALFORMED, f"{what} has a key that is not text: {_brief(bad)}")


def _from_object(obj: Any, default_device: str | None) -> Uplink:
    if type(obj) is not dict:
        raise _fail(MALFORMED, f"a reading must be an object, not {_brief(obj)}")
    _check_keys(obj, "reading")
    if "dev" in obj or default_device is None:
        device = obj.get("dev")
        if device is None:
            raise _fail(MALFORMED, "reading has no device id ('dev')")
    else:
        device = default_device
    device = _text(device, "device id", MAX_DEVICE_ID)
    channel: str
    if "reg" in obj:
        channel, raw = "register", obj["reg"]
    elif "v" in obj:
        if "ch" not in obj:
            raise _fail(MALFORMED, "reading with 'v' needs a channel name ('ch')", device)
        channel, raw = _text(obj["ch"], "channel ('ch')", MAX_CHANNEL, device), obj["v"]
    else:
        raise _fail(MALFORMED, "reading has no value ('reg' or 'v')", device)
    unit = obj.get("unit")
    if unit is not None:
        unit = _text(unit, "unit", MAX_UNIT, device, least=0)  # "": the canonical unit
    status = _status(obj.get("status"), device)
    if type(raw) is list:
        t0 = _timestamp(obj, "t0", device)
        if t0 is None or "step" not in obj:
            raise _fail(MALFORMED, "a list of values needs 't0' (or 't0_ms') and 'step'", device)
        step = _step(obj["step"], device)
        n = len(raw)
        if not n:
            raise _fail(MALFORMED, "empty list of values", device)
        if not t0 + (n - 1) * step <= MAX_ABS_TIMESTAMP:
            raise _fail(MALFORMED, f"t0 + {n - 1} steps is not a storable timestamp", device)
        values = _numbers(raw)
        ts = [t0 + i * step for i in range(n)]
    else:
        t = _timestamp(obj, "ts", device)
        if t is None:
            raise _fail(MALFORMED, "reading has no timestamp ('ts' or 'ts_ms')", device)
        ts, values = [t], [_number(raw)]
    return Uplink(device=device, channel=channel, ts=ts, values=values, unit=unit, status=status)


def _from_document(doc: Any, default_device: str | None) -> list[Uplink]:
    if type(doc) is dict and "readings" in doc:
        _check_keys(doc, "batch")
        items = doc["readings"]
        if type(items) is not list:
            raise _fail(MALFORMED, f"'readings' must be a list, not {_brief(items)}")
        if not items:
            raise _fail(MALFORMED, "'readings' is empty")
        out = []
        for i, item in enumerate(items):
            try:
                out.append(_from_object(item, default_device))
            except PayloadError as err:  # say which reading: batches hold hundreds
                raise _fail(err.reason, f"readings[{i}]: {err.detail}", err.device) from None
        return out
    return [_from_object(doc, default_device)]


# --- JSON ---------------------------------------------------------------------------------------
_json_decoder = msgspec.json.Decoder()

_NOT_QUOTE_OR_BRACKET = bytes(b for b in range(256) if b not in b'"[]{}')
_ONE_BRACKET_KIND = bytes.maketrans(b"{}", b"[]")


def _json_too_deep(payload: bytes, max_depth: int) -> bool:
    """Whether brackets outside strings nest deeper than ``max_depth``, decided before parsing.

    Why on the bytes: the parser recurses per level, so a deep document must never reach it.
    Everything here runs in C but the loop, which runs at most ``max_depth`` times. Escaped
    backslashes, then escaped quotes, go first (pairs, left to right, as JSON reads them); then
    only quotes and brackets are kept, and what lies between a quote and the next is a string's
    and dropped (adjacent quote pairs first: removing them keeps every later quote's parity).
    Each round then removes the innermost ``[]`` pairs, so a balanced document empties in
    exactly its depth in rounds.
    """
    if payload.count(b"[") + payload.count(b"{") <= max_depth:
        return False
    s = payload.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_QUOTE_OR_BRACKET)
    s = s.replace(b'""', b"")  # strings without brackets (keys, ids) need no more than that
    if b'"' in s:
        s = b"".join(s.split(b'"')[::2])
    s = s.translate(_ONE_BRACKET_KIND)
    if b"[" * (max_depth + 1) in s:
        return True
    rounds = 0
    while s:
        if rounds >= max_depth:
            return True
        shorter = s.replace(b"[]", b"")
        if len(shorter) == len(s):  # unbalanced (invalid JSON): "]]..[[" is all that is left
            return rounds + s.count(b"[") > max_depth
        s = shorter
        rounds += 1
    return False


def _wide_int(digits: str) -> int | float:
    # Over 308 digits no int fits a float; float() of the text gives ±inf without int's limit
    # on digits (4300), which would refuse the frame.
    return int(digits) if len(digits) <= 308 else float(digits)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_wide(payload: bytes) -> Any:
    """Python's json, for the rare document msgspec refuses over a number out of float (or int)
    range: it hands over the digits, so that value becomes ±inf instead of failing the frame.
    Depth is already bounded, so its recursion is too."""
    try:
        return json.loads(
            bytes(payload).decode("utf-8"), parse_int=_wide_int, parse_constant=_no_constant
        )
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError included
        raise _fail(MALFORMED, f"invalid JSON: {exc}") from None


class _Series(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The usual single-meter uplink, ``{"dev", "t0" or "t0_ms", "step", "reg": [...]}``, typed.

    Why: decoding straight into floats skips a Python-level check per reading, which is most of
    the decode cost of a 96-reading message. Anything else (batches, ISO timestamps, scalar
    readings, wrong types, a value out of range, any other key, any doubt below) fails this
    schema or the checks in :func:`_series` and takes the general path, which owns the error
    messages. With no other key allowed the shape is two levels deep, known without a scan.
    """

    # In the order devices send them: msgspec matches each key against the next field first.
    dev: str
    t0: float | msgspec.UnsetType = msgspec.UNSET
    step: float
    reg: list[float]
    unit: str | None = None
    status: int | None = None
    t0_ms: float | msgspec.UnsetType = msgspec.UNSET


_series_decoder = msgspec.json.Decoder(_Series)
_SERIES_DEPTH = 2  # the object and its list of registers


def _series(payload: bytes) -> list[Uplink] | None:
    try:
        s = _series_decoder.decode(payload)
    except msgspec.DecodeError:  # ValidationError included: not this shape, or not valid
        return None
    n = len(s.reg)
    t0 = s.t0
    if isinstance(t0, msgspec.UnsetType):
        if isinstance(s.t0_ms, msgspec.UnsetType):
            return None
        t0 = s.t0_ms / 1000.0
    elif not isinstance(s.t0_ms, msgspec.UnsetType):
        return None
    step, dev, unit = s.step, s.dev, s.unit
    if (
        not n
        or not 0 < len(dev) <= MAX_DEVICE_ID
        or not dev.isprintable()
        or (unit is not None and not (len(unit) <= MAX_UNIT and unit.isprintable()))
        or not 0.0 < step <= MAX_ABS_TIMESTAMP
        or not -MAX_ABS_TIMESTAMP <= t0 <= MAX_ABS_TIMESTAMP
        or not t0 + (n - 1) * step <= MAX_ABS_TIMESTAMP
    ):
        return None
    return [
        Uplink(
            device=dev,
            channel="register",
            ts=[t0 + i * step for i in range(n)],
            values=s.reg,
            unit=unit,
            status=_status(s.status, dev),
        )
    ]


def decode_json(
    payload: bytes, default_device: str | None = None, *, max_depth: int = DEFAULT_MAX_DEPTH
) -> list[Uplink]:
    if max_depth >= _SERIES_DEPTH:
        fast = _series(payload)
        if fast is not None:
            return fast
    # The counts are the whole check for most other uplinks (no call, no scan).
    if payload.count(b"[") + payload.count(b"{") > max_depth and _json_too_deep(payload, max_depth):
        raise _fail(TOO_DEEP, f"JSON nested deeper than {max_depth} levels")
    try:
        doc = _json_decoder.decode(payload)
    except msgspec.ValidationError as exc:  # only "out of range" numbers without a type
        if "out of range" not in str(exc):
            raise _fail(MALFORMED, f"invalid JSON: {exc}") from None
        doc = _json_wide(payload)
    except msgspec.DecodeError as exc:
        raise _fail(MALFORMED, f"invalid JSON: {exc}") from None
    except RecursionError:  # the byte scan should have caught it; a second line all the same
        raise _fail(TOO_DEEP, f"JSON nested deeper than {max_depth} levels") from None
    return _from_document(doc, default_device)


# --- CBOR ---------------------------------------------------------------------------------------
def _refuse(what: str) -> Callable[..., Any]:
    def refuse(*_: object) -> Any:
        raise ValueError(f"{what} is not accepted in a meter payload")

    return refuse


def _cbor_options() -> tuple[dict[str, Any], bool]:
    """cbor2's hardening options that the installed release has (older ones lack some), and
    whether it takes ``max_depth``.

    Why each: ``strict_hashable_types`` admits only text/bytes map keys, since integer keys can
    be chosen to collide in one hash bucket (390 kB took 9 s to decode); tag 28 (shared value)
    lets a few bytes build cycles, or a DAG exponential to walk; tags 35 (regular expression)
    and 36 (MIME message) would compile and parse attacker text. None can be part of a reading.
    ``max_depth`` stops deep nesting inside cbor2, before it builds anything.
    """
    wanted: dict[str, Any] = {
        "strict_hashable_types": True,
        "semantic_decoders": {
            28: _refuse("a shared value (tag 28)"),
            35: _refuse("a regular expression (tag 35)"),
            36: _refuse("a MIME message (tag 36)"),
        },
    }
    options: dict[str, Any] = {}
    for key, value in wanted.items():
        try:
            cbor2.loads(b"\xa0", **{key: value})
        except TypeError:
            continue
        options[key] = value
    try:
        cbor2.loads(b"\x80", max_depth=1)
    except TypeError:
        return options, False
    return options, True


_CBOR_OPTIONS, _CBOR_HAS_MAX_DEPTH = _cbor_options()
_CBOR_TEXT_KEYS = "strict_hashable_types" in _CBOR_OPTIONS  # map keys: only str and bytes
# cbor2 bounds the depth itself and no value can be shared: the walk is needed near the limit only
_CBOR_BOUNDED = _CBOR_HAS_MAX_DEPTH and "semantic_decoders" in _CBOR_OPTIONS
# cbor2 counts tags and the arrays inside decimal fractions as levels; the walk below is exact.
_CBOR_DEPTH_SLACK = 4
_FROZENDICT = type(next(iter(cbor2.loads(b"\xa1\xa0\x00"))))  # a map used as a map key
_NESTED = frozenset({list, dict, tuple, set, frozenset, _FROZENDICT, cbor2.CBORTag})


def _is_depth_error(exc: BaseException) -> bool:
    if isinstance(exc, RecursionError) or "nesting depth" in str(exc):
        return True
    return isinstance(exc.__cause__ or exc.__context__, RecursionError)


def _check_nesting(doc: Any, max_depth: int) -> None:
    """Depth of a decoded CBOR document, without recursion (a tag counts as a level).

    Also refuses a container met twice: only CBOR's shared references (tags 28/29) make one,
    and they let a few bytes build cycles or a DAG that is exponential to traverse. Only
    non-empty containers are walked (and remembered): an empty one may be a shared singleton
    such as ``()``, holds nothing, and a million of them then cost one pass over their parent.
    """
    if type(doc) not in _NESTED:
        return
    too_deep = f"CBOR nested deeper than {max_depth} levels"
    if max_depth < 1:
        raise _fail(TOO_DEEP, too_deep)
    nested, tag, seen = _NESTED, cbor2.CBORTag, set()
    stack: list[tuple[Any, int]] = [(doc, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        node, depth = pop()  # depth <= max_depth: checked before the push
        t = type(node)
        children: Any
        if t is dict:
            children = node.values() if _CBOR_TEXT_KEYS else (*node, *node.values())
        elif t is tag:
            children = (node.value,)
        elif t is _FROZENDICT:
            children = (*node, *node.values())
        else:
            children = node
        key = id(node)
        if key in seen:
            raise _fail(MALFORMED, "CBOR shared references (tags 28/29) are not accepted")
        seen.add(key)
        if children is node and nested.isdisjoint(map(type, node)):  # numbers: one pass in C
            continue
        below = depth + 1
        for c in children:
            tc = type(c)
            if tc in nested:
                if below > max_depth:
                    raise _fail(TOO_DEEP, too_deep)
                if tc is tag or c:
                    push((c, below))


def decode_cbor(
    payload: bytes, default_device: str | None = None, *, max_depth: int = DEFAULT_MAX_DEPTH
) -> list[Uplink]:
    try:
        doc, exact = _cbor_loads(payload, max_depth)
    except Exception as exc:  # cbor2 raises several unrelated exception types
        if _is_depth_error(exc):
            raise _fail(TOO_DEEP, f"CBOR nested deeper than {max_depth} levels") from None
        why = f" ({exc.__cause__})" if exc.__cause__ is not None else ""
        raise _fail(MALFORMED, f"invalid CBOR: {exc}{why}") from None
    if not exact:
        _check_nesting(doc, max_depth)
    return _from_document(doc, default_device)


def _cbor_loads(payload: bytes, max_depth: int) -> tuple[Any, bool]:
    """The decoded document, and whether its depth is already known to be within the limit.

    cbor2 counts an item's enclosing containers and tags, which is never less than our count
    minus one (an innermost empty container), so ``max_depth - 1`` in cbor2 proves ours. Only
    a document near the limit (or beyond it), or an older cbor2, needs the walk.
    """
    if _CBOR_BOUNDED and max_depth >= 1:
        try:
            return cbor2.loads(payload, max_depth=max_depth - 1, **_CBOR_OPTIONS), True
        except Exception as exc:
            if not _is_depth_error(exc):
                raise
    if _CBOR_HAS_MAX_DEPTH:
        limit = max(max_depth, 0) + _CBOR_DEPTH_SLACK
        return cbor2.loads(payload, max_depth=limit, **_CBOR_OPTIONS), False
    return cbor2.loads(payload, **_CBOR_OPTIONS), False


# --- the standards' codecs (their own modules, imported on first use: they import this one) ---
_STANDARD_CODECS: dict[str, tuple[str, str]] = {
    "senml-json": ("protocols.senml", "decode_senml_json"),
    "senml-cbor": ("protocols.senml", "decode_senml_cbor"),
    "wmbus": ("protocols.wmbus", "decode_wmbus"),
    "wmbus-hex": ("protocols.wmbus", "decode_wmbus_hex"),
    "cjt188": ("protocols.cjt188", "decode_cjt188"),
}


def _standard_codec(fmt: str) -> Callable[[bytes, str | None], list[Uplink]]:
    """The decoder of a standard format (SenML, wireless M-Bus, CJ/T 188) by its registry name.

    Why lazily: those modules build on this one's helpers, and a deployment without
    ``cryptography`` still decodes everything but encrypted wM-Bus.
    """
    import importlib

    module, name = _STANDARD_CODECS[fmt]
    decoder: Callable[[bytes, str | None], list[Uplink]] = getattr(
        importlib.import_module(module), name
    )
    return decoder


# --- any format ---------------------------------------------------------------------------------
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
    payload: bytes,
    fmt: str | None = None,
    default_device: str | None = None,
    *,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> Decoded:
    """Decode a payload in ``fmt`` (sniffed when None) into uplinks, or raise PayloadError.

    The result's ``rejected`` lists the parts a codec refused one by one (a wM-Bus telegram of
    many under a wrong key); PayloadError means nothing in the payload decoded.

    Nothing else escapes, whatever the bytes: transports call this on their network thread,
    where any other exception would stop reading for every device. An exception the codecs did
    not foresee is a bug; it is logged and still stays with its frame, as PROCESSING_ERROR.
    """
    fmt = fmt or sniff_format(payload)
    try:
        if fmt == "json":
            uplinks = decode_json(payload, default_device, max_depth=max_depth)
        elif fmt == "binary-v1":
            uplinks = decode_binary_v1(payload)
        elif fmt == "cbor":
            uplinks = decode_cbor(payload, default_device, max_depth=max_depth)
        elif fmt in _STANDARD_CODECS:
            uplinks = _standard_codec(fmt)(payload, default_device)
        else:
            uplinks = None
        if uplinks is not None:
            return Decoded(
                [u.set_aside_non_finite() for u in uplinks], getattr(uplinks, "rejected", ())
            )
    except PayloadError:
        raise
    except RecursionError:
        raise _fail(TOO_DEEP, f"{fmt} nested deeper than {max_depth} levels") from None
    except Exception as exc:
        log.warning("decoding a %s payload: %s", fmt, type(exc).__name__, exc_info=True)
        raise _fail(PROCESSING_ERROR, f"{type(exc).__name__} while decoding {fmt}") from exc
    raise _fail(UNSUPPORTED_FORMAT, f"cannot tell the payload format of {bytes(payload[:8])!r}")
