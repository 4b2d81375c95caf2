"""What every adapter hands to ingest.

A transport produces :class:`Frame` objects (raw bytes plus where they came from). Payload codecs
turn a frame into :class:`Uplink` groups: readings of one device channel with their timestamps. The
split mirrors the ThingsBoard gateway's connector/converter split, so a new vendor payload is a new
codec, not a new transport.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import IntFlag
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


class Quality(IntFlag):
    """Quality bits stored with each reading (``readings.quality``).

    The low four bits are the vendor status bits of NB-IoT meters; the others are set by transports
    (a Modbus timeout, an OPC-UA Bad/Uncertain StatusCode), by ingest (CLOCK_SKEW) or by VEE. A
    device can only ever set the bits in :data:`VENDOR_STATUS_MASK`: codecs map its status through
    an explicit table, and ingest masks once more, so no meter can mark its own reading ESTIMATED.
    """

    LEAK = 1
    REVERSE_FLOW = 2
    TAMPER = 4
    LOW_BATTERY = 8
    BAD = 16
    UNCERTAIN = 32
    ESTIMATED = 64
    EDITED = 128
    CLOCK_SKEW = 256  # reading far behind its receive time: a device clock to check


VENDOR_STATUS_MASK = int(Quality.LEAK | Quality.REVERSE_FLOW | Quality.TAMPER | Quality.LOW_BATTERY)


STATUS_NAMES: dict[str, Quality] = {
    "leak": Quality.LEAK,
    "reverse": Quality.REVERSE_FLOW,
    "reverse_flow": Quality.REVERSE_FLOW,
    "tamper": Quality.TAMPER,
    "magnetic": Quality.TAMPER,
    "low_battery": Quality.LOW_BATTERY,
    "battery": Quality.LOW_BATTERY,
}


class PayloadError(ValueError):
    """A frame that cannot be decoded; ``reason`` becomes the quarantine reason code."""

    def __init__(self, reason: str, detail: str, device: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.device = device


def wall_clock_to_utc(ts: list[float], zone: str, summer: bool | None = None) -> list[float]:
    """Unix seconds of wall-clock times written as if UTC (a device clock that carries no zone)
    read in the IANA ``zone``.

    Why here: ingest converts with the registry's zone of the device, the simulators' decoder
    the same way, and both must agree. A time that happens twice when clocks go back, or never
    when they go forward, is read with the offset the device said it was on (``summer``: the
    wM-Bus SU bit), else as the first occurrence / with the offset before the change (PEP 495
    ``fold=0``): no reading is lost or refused for it. A time no calendar holds (NaN, past year
    9999) or an unknown zone leaves ``ts`` as it is, for the validator's time checks to judge.
    """
    if zone == "UTC" or not ts:
        return ts
    try:
        tz = ZoneInfo(zone)  # ZoneInfo caches its instances
    except (ZoneInfoNotFoundError, ValueError):
        return ts
    out = []
    for t in ts:
        try:
            wall = datetime.fromtimestamp(t, UTC).replace(tzinfo=tz)
            first, second = wall.timestamp(), wall.replace(fold=1).timestamp()
            if first != second and summer is not None:
                # Of the two readings of the wall time, the one whose offset (summer or not)
                # the device named: fold=1 is the later offset of a repeated hour and the
                # offset after the change for a skipped one.
                first = second if bool(wall.replace(fold=1).dst()) == summer else first
            out.append(first)
        except (ValueError, OverflowError, OSError):
            out.append(t)
    return out


@dataclass(slots=True)
class Uplink:
    """Readings of one device channel. ``device`` is a device id, or ``serial:N`` for frames that
    carry only the vendor's numeric serial. ``unit`` None means the channel's configured unit."""

    device: str
    channel: str
    ts: list[float]
    values: list[float]
    unit: str | None = None
    status: int = 0
    raw: bytes | None = None
    # (timestamp, value) pairs whose value is not a finite number, set aside by
    # :meth:`set_aside_non_finite`: never a reading, each one a NOT_A_NUMBER quarantine row.
    not_finite: list[tuple[float, float]] = field(default_factory=list)
    # ``ts`` is the device's own wall-clock time written as if it were UTC (a wM-Bus date/time
    # record carries no zone): ingest converts it with the device's clock zone (its registry
    # ``clock``: its DMA's zone, or UTC) before any check.
    local_clock: bool = False
    # With ``local_clock``: whether the device said its clock was on summer time (the wM-Bus SU
    # bit), which settles the hour that repeats when clocks go back; None when it did not say.
    clock_summer: bool | None = None

    def set_aside_non_finite(self) -> Uplink:
        """This uplink with NaN and ±inf values moved from ``ts``/``values`` to ``not_finite``.

        Why one place: codecs (a 400-digit number, ``1e999``, a CBOR NaN) and polled devices (a
        float32 NaN register) all produce them, and each must end as its own quarantine row
        while the uplink's other readings are kept. Returns ``self`` when every value is finite
        (a sum is finite only if every term is; an overflowing sum of finite values just takes
        the exact pass), else a new uplink: the caller's object is never changed.
        """
        if math.isfinite(sum(self.values)):
            return self
        ts: list[float] = []
        values: list[float] = []
        aside = list(self.not_finite)
        for t, v in zip(self.ts, self.values, strict=True):
            if math.isfinite(v):
                ts.append(t)
                values.append(v)
            else:
                aside.append((t, v))
        return replace(self, ts=ts, values=values, not_finite=aside)


@dataclass(slots=True)
class Frame:
    """One unit of upstream traffic: an MQTT message, a CoAP request, a Modbus poll, an OPC-UA
    data-change batch. Acknowledge upstream when the sink calls ``on_durable``."""

    source: str
    address: str
    payload: bytes = b""
    payload_format: str | None = None
    device_hint: str | None = None
    received_at: float = field(default_factory=time.time)
    uplinks: list[Uplink] | None = None
    authenticated_device: str | None = None
    # The identity the transport proved — an MQTT topic's device or gateway (the broker's ACL
    # lets each client publish only under its own prefix), a DTLS-PSK identity — and, for a
    # device's own topic, its vendor. Ingest accepts readings only for that device or the meters
    # registered under that gateway; anything else is UNAUTHORIZED, claimed and proven named.
    peer: str | None = None
    peer_vendor: str | None = None
    # A frame the transport already refused (reason code, detail): ingest writes only its
    # quarantine row (with ``payload``) and acknowledges it like any other frame.
    rejection: tuple[str, str] | None = None

    @property
    def size(self) -> int:
        """Bytes this frame holds in memory, roughly: what the ingest queue bounds."""
        n = len(self.payload) + 200
        if self.uplinks is not None:
            n += sum(64 + 24 * len(u.ts) for u in self.uplinks)
        return n


DurableCallback = Callable[["FrameOutcome"], None]


@dataclass(slots=True)
class FrameOutcome:
    """What happened to a frame once it is durable: readings accepted (stored, or already stored
    before: redelivery is not an error) and quarantined with their reasons (CoAP maps the first
    reason to a response code)."""

    accepted: int = 0
    quarantined: int = 0
    reasons: list[str] = field(default_factory=list)
    error: str | None = None


class FrameSink(Protocol):
    """Where transports put frames. ``submit`` blocks while the sink is full (backpressure) and
    calls ``on_durable`` from another thread once every reading is committed or quarantined."""

    def submit(self, frame: Frame, on_durable: DurableCallback) -> None: ...


def sink_saturated(sink: FrameSink) -> bool:
    """True while ``sink`` would block a submit (its queue is full in frames or bytes).

    Transports that must answer at once instead of blocking (CoAP: 5.03 with Max-Age) ask this;
    a sink without the notion is never saturated.
    """
    check = getattr(sink, "saturated", None)
    return bool(check()) if callable(check) else False


async def submit_and_wait(sink: FrameSink, frame: Frame) -> FrameOutcome:
    """Submit from asyncio code and wait until the frame is durable.

    The blocking ``submit`` (backpressure) runs in the default executor so the event loop keeps
    serving other devices while the sink is full.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[FrameOutcome] = loop.create_future()

    def done(outcome: FrameOutcome) -> None:
        loop.call_soon_threadsafe(_resolve, future, outcome)

    await loop.run_in_executor(None, sink.submit, frame, done)
    return await future


def _resolve(future: asyncio.Future[FrameOutcome], outcome: FrameOutcome) -> None:
    if not future.done():
        future.set_result(outcome)
