"""SenML (RFC 8428) packs, JSON and CBOR, as payload codecs ``senml-json`` and ``senml-cbor``.

Why a codec of its own: NB-IoT and LwM2M meters report as SenML, where a pack is a list of
records and each record's fields are *resolved* against the base fields before it (RFC 8428
§4.6): the name is ``bn + n``, the time ``bt + t``, the unit ``u`` or else ``bu``, the value
``bv + v`` (or ``bs + s`` for a sum). Base fields carry over to later records until replaced.

Names to channels: a resolved name ``<bn><n>`` is split into a device and a resource. With a
device known from the transport (MQTT topic, CoAP path, LwM2M endpoint) the whole name is the
resource; otherwise the base name is the device (its trailing ``:``/``/`` dropped, as in
``urn:dev:imei:...:``) and ``n`` the resource; with no base name the name is the device and the
channel is ``value`` (RFC 8428 §5.1.1). A resource is mapped to a channel through
:data:`LWM2M_WATER_METER` (uCIFI/OMA object 3424: ``3424/<i>/1`` cumulated volume in m3; the
boolean resources 10 leak, 11 back flow, 13 fraud become quality bits of that device's
readings) and otherwise taken as the channel name itself, so a vendor's registry channels can
simply be named like its SenML resources.

Time: absolute unix seconds; RFC 8428 times below 2**28 are relative to "now", which here is
the moment of decoding (a transport decodes on receipt). String, data and other boolean values
are not readings and are skipped; a pack with no numeric record at all is MALFORMED.

CBOR packs use the integer labels of RFC 8428 §6. Because integer map keys can be chosen to
collide in one hash bucket (see :mod:`protocols.payloads`), a CBOR pack is limited to
:data:`MAX_CBOR_BYTES` before it is parsed.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import cbor2

from protocols.payloads import (
    MALFORMED,
    MAX_ABS_TIMESTAMP,
    MAX_CHANNEL,
    MAX_DEVICE_ID,
    MAX_UNIT,
    TOO_DEEP,
    _brief,
    _cbor_options,
    _fail,
)
from protocols.uplink import Quality, Uplink

FORMAT_JSON = "senml-json"
FORMAT_CBOR = "senml-cbor"
MAX_RECORDS = 10_000
MAX_CBOR_BYTES = 32 * 1024
UNNAMED_CHANNEL = "value"  # a record named by its base name alone
RELATIVE_LIMIT = 2**28  # RFC 8428 §4.5.3: a time below this is relative to now

# RFC 8428 §6 CBOR labels -> JSON labels
CBOR_LABELS: dict[int, str] = {
    -1: "bver",
    -2: "bn",
    -3: "bt",
    -4: "bu",
    -5: "bv",
    -6: "bs",
    0: "n",
    1: "u",
    2: "v",
    3: "vs",
    4: "vb",
    5: "s",
    6: "t",
    7: "ut",
    8: "vd",
}
# protocols.payloads' cbor2 hardening (no shared values, regexes, MIME) but integer map keys,
# which SenML's labels are (the size limit above bounds what colliding keys could cost).
_CBOR_SENML_OPTIONS = {k: v for k, v in _cbor_options()[0].items() if k != "strict_hashable_types"}
_JSON_TO_CBOR = {v: k for k, v in CBOR_LABELS.items()}
_KNOWN = frozenset(CBOR_LABELS.values())

# uCIFI water meter, LwM2M object 3424 (OMA LwM2M registry 3424.xml): resource -> channel/flag
LWM2M_WATER_METER_OBJECT = "3424"
LWM2M_WATER_METER: dict[str, str] = {"1": "register", "4": "pulses"}
LWM2M_WATER_METER_FLAGS: dict[str, Quality] = {
    "10": Quality.LEAK,
    "11": Quality.REVERSE_FLOW,
    "13": Quality.TAMPER,
}


def _channel_of(resource: str) -> tuple[str | None, Quality | None]:
    """(channel, None) for a value resource, (None, flag) for a 3424 status flag."""
    parts = [p for p in resource.split("/") if p]
    if len(parts) == 3 and parts[0] == LWM2M_WATER_METER_OBJECT:
        flag = LWM2M_WATER_METER_FLAGS.get(parts[2])
        if flag is not None:
            return None, flag
        channel = LWM2M_WATER_METER.get(parts[2])
        if channel is not None:
            return channel, None
    return resource, None


def _str(value: Any, what: str, limit: int) -> str:
    if type(value) is not str or len(value) > limit or not value.isprintable():
        raise _fail(MALFORMED, f"SenML {what} {_brief(value)} is not a short printable text")
    return value


def _num(value: Any, what: str) -> float:
    t = type(value)
    if t is bool or t not in (int, float):
        raise _fail(MALFORMED, f"SenML {what} {_brief(value)} is not a number")
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def resolve(records: Any, now: float | None = None) -> list[dict[str, Any]]:
    """Resolved records (RFC 8428 §4.6) of a pack already parsed into a list of dicts with JSON
    labels: each with ``n``, ``t`` (absolute), and any of ``u``, ``v``, ``vb``.

    Why public: the CBOR and JSON codecs share it, and a test can check resolution alone.
    """
    if type(records) is not list:
        raise _fail(MALFORMED, f"a SenML pack is an array, not {_brief(records)}")
    if not records:
        raise _fail(MALFORMED, "empty SenML pack")
    if len(records) > MAX_RECORDS:
        raise _fail(MALFORMED, f"SenML pack of {len(records)} records > {MAX_RECORDS}")
    now = time.time() if now is None else now
    bn, bt, bu, bv, bs = "", 0.0, None, 0.0, 0.0
    out: list[dict[str, Any]] = []
    for rec in records:
        if type(rec) is not dict:
            raise _fail(MALFORMED, f"a SenML record is an object, not {_brief(rec)}")
        for key in rec:
            if type(key) is not str or (key not in _KNOWN and not key.endswith("_")):
                continue  # RFC 8428 §4.4: unknown fields ignored, unless they end in "_"
            if key.endswith("_"):
                raise _fail(MALFORMED, f"SenML must-understand field {_brief(key)}")
        if "bn" in rec:
            bn = _str(rec["bn"], "base name", MAX_DEVICE_ID + MAX_CHANNEL)
        if "bt" in rec:
            bt = _num(rec["bt"], "base time")
        if "bu" in rec:
            bu = _str(rec["bu"], "base unit", MAX_UNIT)
        if "bv" in rec:
            bv = _num(rec["bv"], "base value")
        if "bs" in rec:
            bs = _num(rec["bs"], "base sum")
        if "bver" in rec and (type(rec["bver"]) is not int or rec["bver"] > 10):
            raise _fail(MALFORMED, f"SenML version {_brief(rec['bver'])} is not supported")
        n = _str(rec.get("n", ""), "name", MAX_CHANNEL)
        name = bn + n
        if not name:
            raise _fail(MALFORMED, "SenML record without a name (bn + n is empty)")
        t = bt + (_num(rec["t"], "time") if "t" in rec else 0.0)
        if not math.isfinite(t):
            raise _fail(MALFORMED, f"SenML time {_brief(rec.get('t'))} is not finite")
        if t < RELATIVE_LIMIT:
            t += now
        if not -MAX_ABS_TIMESTAMP <= t <= MAX_ABS_TIMESTAMP:  # as payloads refuses them
            raise _fail(MALFORMED, f"SenML time {_brief(t)} is not a storable timestamp")
        resolved: dict[str, Any] = {"bn": bn, "n": n, "name": name, "t": t}
        unit = rec.get("u", bu)
        if unit is not None:
            resolved["u"] = _str(unit, "unit", MAX_UNIT)
        if "v" in rec:
            resolved["v"] = bv + _num(rec["v"], "value")
        elif "s" in rec:
            resolved["v"] = bs + _num(rec["s"], "sum")
        elif "vb" in rec:
            if type(rec["vb"]) is not bool:
                raise _fail(MALFORMED, f"SenML boolean value {_brief(rec['vb'])}")
            resolved["vb"] = rec["vb"]
        elif not ("vs" in rec or "vd" in rec):
            raise _fail(MALFORMED, f"SenML record {_brief(name)} has no value")
        out.append(resolved)
    return out


def _uplinks(records: list[dict[str, Any]], default_device: str | None) -> list[Uplink]:
    groups: dict[tuple[str, str, str | None], Uplink] = {}
    flags: dict[str, int] = {}
    for rec in records:
        if default_device is not None:
            device, resource = default_device, rec["name"]
        elif rec["bn"].rstrip(":/"):
            device, resource = rec["bn"].rstrip(":/"), rec["n"]
        else:  # no base name: the name is the device's (RFC 8428 §5.1.1)
            device, resource = rec["name"], ""
        if len(device) > MAX_DEVICE_ID:
            raise _fail(MALFORMED, f"SenML device {_brief(device)} is too long")
        channel, flag = _channel_of(resource) if resource else (UNNAMED_CHANNEL, None)
        if flag is not None:
            if rec.get("vb"):
                flags[device] = flags.get(device, 0) | int(flag)
            continue
        if "v" not in rec or channel is None:
            continue
        key = (device, channel, rec.get("u"))
        up = groups.get(key)
        if up is None:
            up = groups[key] = Uplink(device=device, channel=channel, ts=[], values=[])
            up.unit = rec.get("u")
        up.ts.append(rec["t"])
        up.values.append(rec["v"])
    if not groups:
        raise _fail(MALFORMED, "SenML pack has no numeric record")
    for up in groups.values():
        up.status = flags.get(up.device, 0)
    return list(groups.values())


def decode_senml_json(
    payload: bytes, default_device: str | None = None, *, now: float | None = None
) -> list[Uplink]:
    """Uplinks of a SenML JSON pack (``application/senml+json``), or PayloadError.

    Why no depth scan: a SenML pack is exactly two levels; anything deeper fails as a value
    that is not a number, and Python's json stops at its recursion limit (caught as TOO_DEEP).
    """
    try:
        doc = json.loads(payload)
    except RecursionError:
        raise _fail(TOO_DEEP, "SenML JSON nested too deep") from None
    except (ValueError, TypeError) as exc:
        raise _fail(MALFORMED, f"invalid JSON: {exc}") from None
    return _uplinks(resolve(doc, now), default_device)


def decode_senml_cbor(
    payload: bytes, default_device: str | None = None, *, now: float | None = None
) -> list[Uplink]:
    """Uplinks of a SenML CBOR pack (``application/senml+cbor``, integer labels), or
    PayloadError."""
    if len(payload) > MAX_CBOR_BYTES:
        raise _fail(MALFORMED, f"SenML CBOR pack of {len(payload)} bytes > {MAX_CBOR_BYTES}")
    try:
        doc = cbor2.loads(payload, max_depth=4, **_CBOR_SENML_OPTIONS)
    except Exception as exc:  # cbor2 raises several unrelated exception types
        if isinstance(exc, RecursionError) or "nesting depth" in str(exc):
            raise _fail(TOO_DEEP, "SenML CBOR nested too deep") from None
        raise _fail(MALFORMED, f"invalid CBOR: {exc}") from None
    if type(doc) is not list:
        raise _fail(MALFORMED, f"a SenML pack is an array, not {_brief(doc)}")
    records: list[Any] = []
    for rec in doc:
        if type(rec) is not dict:
            raise _fail(MALFORMED, f"a SenML record is a map, not {_brief(rec)}")
        records.append(
            {CBOR_LABELS.get(k, "?") if type(k) is int else k: v for k, v in rec.items()}
        )
    return _uplinks(resolve(records, now), default_device)


def encode_senml(uplinks: list[Uplink], *, cbor: bool = False) -> bytes:
    """A SenML pack of ``uplinks`` (one base name per uplink: ``<device>:``, names = channels).

    Why: the fleet simulator and the tests need packs a real LwM2M/NB-IoT meter would send; a
    round trip through :func:`decode_senml_json`/:func:`decode_senml_cbor` gives them back.
    """
    pack: list[dict[Any, Any]] = []
    for up in uplinks:
        first = True
        for t, v in zip(up.ts, up.values, strict=True):
            rec: dict[str, Any] = {"n": up.channel, "t": t, "v": v}
            if first:
                rec["bn"] = up.device + ":"
                first = False
            if up.unit is not None:
                rec["u"] = up.unit
            pack.append(rec)
    if cbor:
        return cbor2.dumps([{_JSON_TO_CBOR[k]: v for k, v in r.items()} for r in pack])
    return json.dumps(pack, separators=(",", ":")).encode()
