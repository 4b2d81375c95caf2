"""Validation and normalisation: every decoded reading is either accepted in canonical units or
rejected with a reason code. Nothing is dropped without a row in the quarantine.

Reason codes (``quarantine.reason``):

==========================  ==========================================================
MALFORMED                   payload does not parse or lacks required fields
BAD_CRC                     binary frame checksum mismatch
UNSUPPORTED_FORMAT          unknown payload format or version
UNKNOWN_DEVICE              device (or serial) not in the registry
UNKNOWN_CHANNEL             device known, channel name not configured for it
INACTIVE_DEVICE             device removed from the registry (marked inactive)
UNAUTHORIZED                authenticated peer sent readings for another device
BAD_UNIT                    unit is not a unit of the channel's quantity
NOT_A_NUMBER                NaN or infinite value
OUT_OF_RANGE                value outside the channel's physical range
FUTURE_TIMESTAMP            more than ``future_tolerance_s`` ahead of the receive time
BEFORE_INSTALL              earlier than the meter's install date
ANCIENT_TIMESTAMP           earlier than ``earliest_timestamp``
CONFLICTING_DUPLICATE       same channel and time already stored with another value
==========================  ==========================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from ingest.channels import ChannelIndex, ChannelInfo, UnknownUnit
from protocols.payloads import decode
from protocols.uplink import Frame, PayloadError, Uplink

UNKNOWN_DEVICE = "UNKNOWN_DEVICE"
UNKNOWN_CHANNEL = "UNKNOWN_CHANNEL"
INACTIVE_DEVICE = "INACTIVE_DEVICE"
UNAUTHORIZED = "UNAUTHORIZED"
BAD_UNIT = "BAD_UNIT"
NOT_A_NUMBER = "NOT_A_NUMBER"
OUT_OF_RANGE = "OUT_OF_RANGE"
FUTURE_TIMESTAMP = "FUTURE_TIMESTAMP"
BEFORE_INSTALL = "BEFORE_INSTALL"
ANCIENT_TIMESTAMP = "ANCIENT_TIMESTAMP"
CONFLICTING_DUPLICATE = "CONFLICTING_DUPLICATE"


@dataclass(slots=True)
class Rejection:
    reason: str
    detail: str
    device: str | None
    raw: bytes | None


@dataclass(slots=True)
class Prepared:
    """A frame after validation: accepted rows as columns, and its rejections."""

    channel_ids: list[int] = field(default_factory=list)
    ts: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    quality: list[int] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.channel_ids)


_encode = msgspec.json.Encoder().encode


def _reading_raw(device: str, channel: str, t: float, v: float, unit: str | None) -> bytes:
    return _encode({"dev": device, "ch": channel, "ts": t, "v": v, "unit": unit})


class Validator:
    """Turns frames into :class:`Prepared` rows. ``index`` is a callable so that a reload of the
    channel index is picked up by the next frame without locks."""

    def __init__(
        self,
        index: Callable[[], ChannelIndex],
        *,
        future_tolerance_s: float,
        earliest_epoch: float,
        on_unknown_device: Callable[[], bool] | None = None,
    ) -> None:
        self._index = index
        self.future_tolerance_s = future_tolerance_s
        self.earliest_epoch = earliest_epoch
        self._on_unknown_device = on_unknown_device

    def prepare(self, frame: Frame) -> Prepared:
        out = Prepared()
        uplinks = frame.uplinks
        if uplinks is None:
            try:
                uplinks = decode(frame.payload, frame.payload_format, frame.device_hint)
            except PayloadError as err:
                out.rejections.append(Rejection(err.reason, err.detail, err.device, frame.payload))
                return out
        horizon = frame.received_at + self.future_tolerance_s
        whole = frame.payload if len(uplinks) == 1 else None
        for uplink in uplinks:
            self._check_uplink(frame, uplink, horizon, out, whole)
        return out

    def _resolve(self, device: str, channel: str) -> tuple[str, ChannelInfo | None, ChannelIndex]:
        index = self._index()
        dev = index.device_id(device)
        info = index.get(dev, channel)
        if info is None and dev not in index.devices and self._on_unknown_device is not None:
            # The registry may have been synced since we loaded it: reload (rate-limited) once.
            if self._on_unknown_device():
                index = self._index()
                dev = index.device_id(device)
                info = index.get(dev, channel)
        return dev, info, index

    def _check_uplink(
        self, frame: Frame, up: Uplink, horizon: float, out: Prepared, whole: bytes | None
    ) -> None:
        dev, info, index = self._resolve(up.device, up.channel)

        def reject_all(reason: str, detail: str) -> None:
            out.rejections.append(
                Rejection(reason, detail, dev, up.raw or whole or _uplink_raw(up))
            )

        if info is None:
            if dev not in index.devices:
                reject_all(UNKNOWN_DEVICE, f"device {up.device!r} is not in the registry")
            else:
                reject_all(UNKNOWN_CHANNEL, f"device {dev!r} has no channel {up.channel!r}")
            return
        if not info.active:
            reject_all(INACTIVE_DEVICE, f"device {dev!r} is inactive in the registry")
            return
        if frame.authenticated_device is not None and frame.authenticated_device != dev:
            reject_all(
                UNAUTHORIZED, f"peer {frame.authenticated_device!r} sent readings for {dev!r}"
            )
            return
        try:
            factor, offset = index.conversion(info, up.unit)
        except UnknownUnit as err:
            reject_all(BAD_UNIT, str(err))
            return
        ts, values = up.ts, up.values
        lo_ts = self.earliest_epoch
        if info.install_epoch is not None and info.install_epoch > lo_ts:
            lo_ts = info.install_epoch
        if factor == 1.0 and offset == 0.0:
            conv = values
        else:
            conv = [v * factor + offset for v in values]
        n = len(ts)
        # Fast path: the whole uplink is valid (the overwhelmingly common case).
        if (
            n
            and min(ts) >= lo_ts
            and max(ts) <= horizon
            and min(conv) >= info.min_value
            and max(conv) <= info.max_value
        ):
            out.channel_ids.extend([info.id] * n)
            out.ts.extend(ts)
            out.values.extend(conv)
            out.quality.extend([up.status] * n)
            return
        for t, v, c in zip(ts, values, conv, strict=True):
            reason = None
            if math.isnan(c) or math.isinf(c):
                reason, detail = NOT_A_NUMBER, f"value {v!r}"
            elif t > horizon:
                reason, detail = (
                    FUTURE_TIMESTAMP,
                    f"ts {t:.0f} is {t - frame.received_at:.0f}s ahead",
                )
            elif t < lo_ts:
                if info.install_epoch is not None and t >= self.earliest_epoch:
                    reason, detail = BEFORE_INSTALL, f"ts {t:.0f} before install {lo_ts:.0f}"
                else:
                    reason, detail = ANCIENT_TIMESTAMP, f"ts {t:.0f} before {lo_ts:.0f}"
            elif not info.min_value <= c <= info.max_value:
                reason = OUT_OF_RANGE
                detail = f"{c!r} {info.unit} outside [{info.min_value}, {info.max_value}]"
            if reason is not None:
                out.rejections.append(
                    Rejection(reason, detail, dev, _reading_raw(dev, up.channel, t, v, up.unit))
                )
                continue
            out.channel_ids.append(info.id)
            out.ts.append(t)
            out.values.append(c)
            out.quality.append(up.status)


def _uplink_raw(up: Uplink) -> bytes:
    return _encode(
        {"dev": up.device, "ch": up.channel, "ts": up.ts, "v": up.values, "unit": up.unit}
    )
