"""Validation and normalisation: every decoded reading is either accepted in canonical units or
rejected with a reason code. Nothing is dropped without a row in the quarantine.

Reason codes (``quarantine.reason``):

==========================  ==========================================================
MALFORMED                   payload does not parse or lacks required fields
BAD_CRC                     binary frame checksum mismatch
DECRYPT_FAILED              wM-Bus telegram without its key, or the key is wrong (2F2F / AFL MAC)
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
OUTSIDE_WINDOW              a live reading older than ``live_window_days`` before its receipt
OVERSIZE                    payload over ``max_payload_bytes`` (its first bytes are kept)
TOO_MANY_READINGS           frame over ``max_readings_per_frame`` (kept whole as raw)
TOO_DEEP                    JSON/CBOR nested deeper than ``max_payload_depth``
UNKNOWN_TOPIC               an MQTT topic under our root that fits no documented scheme
PROCESSING_ERROR            an unexpected exception while decoding or validating the frame
WRITE_FAILED                the database refused the frame's rows alone, after retries
==========================  ==========================================================

Live readings far behind their receive time are stored with the ``CLOCK_SKEW`` quality bit (or
quarantined as CLOCK_SKEW, per ``clock_skew_action``): a meter whose clock runs a year slow is a
fault to fix, and its readings should not pass as history. Imports are exempt: loading the past
is their purpose.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from ingest.channels import ChannelIndex, ChannelInfo, UnknownUnit
from protocols.payloads import decode
from protocols.uplink import VENDOR_STATUS_MASK, Frame, PayloadError, Quality, Uplink

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
OUTSIDE_WINDOW = "OUTSIDE_WINDOW"
OVERSIZE = "OVERSIZE"
TOO_MANY_READINGS = "TOO_MANY_READINGS"
TOO_DEEP = "TOO_DEEP"
UNKNOWN_TOPIC = "UNKNOWN_TOPIC"
PROCESSING_ERROR = "PROCESSING_ERROR"
WRITE_FAILED = "WRITE_FAILED"
CLOCK_SKEW = "CLOCK_SKEW"
MALFORMED = "MALFORMED"
DECRYPT_FAILED = "DECRYPT_FAILED"  # wM-Bus: no key or a wrong one (protocols/wmbus.py)

# Sources whose frames are history by intent (the bulk importer): no live window, no skew flag.
HISTORY_SOURCES = frozenset({"import"})


@dataclass(slots=True)
class Rejection:
    """One quarantine row: a reading, an uplink or a whole frame, and how many readings it holds
    (counters and summaries count readings, not rows)."""

    reason: str
    detail: str
    device: str | None
    raw: bytes | None
    readings: int = 1


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
    return _encode({"dev": device, "ch": channel, "ts": t, "v": _json_float(v), "unit": unit})


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
        max_payload_bytes: int = 1_048_576,
        max_readings_per_frame: int = 100_000,
        max_payload_depth: int = 32,
        oversize_keep_bytes: int = 4_096,
        clock_skew_s: float = 7 * 86_400.0,
        clock_skew_action: str = "flag",
        live_window_days: float = 400.0,
    ) -> None:
        self._index = index
        self.future_tolerance_s = future_tolerance_s
        self.earliest_epoch = earliest_epoch
        self._on_unknown_device = on_unknown_device
        self.max_payload_bytes = max_payload_bytes
        self.max_readings_per_frame = max_readings_per_frame
        self.max_payload_depth = max_payload_depth
        self.oversize_keep_bytes = oversize_keep_bytes
        self.clock_skew_s = clock_skew_s
        self.clock_skew_action = clock_skew_action
        self.live_window_s = live_window_days * 86_400.0

    def prepare(self, frame: Frame) -> Prepared:
        out = Prepared()
        if frame.rejection is not None:  # refused by the transport: its row only
            reason, detail = frame.rejection
            out.rejections.append(
                Rejection(reason, detail, frame.device_hint, self._kept(frame.payload))
            )
            return out
        if len(frame.payload) > self.max_payload_bytes:
            out.rejections.append(
                Rejection(
                    OVERSIZE,
                    f"{len(frame.payload)} bytes > max_payload_bytes {self.max_payload_bytes}; "
                    f"first {self.oversize_keep_bytes} bytes kept",
                    frame.device_hint,
                    frame.payload[: self.oversize_keep_bytes],
                )
            )
            return out
        uplinks = frame.uplinks
        decoded = uplinks is None
        if uplinks is None:
            try:
                uplinks = decode(
                    frame.payload,
                    frame.payload_format,
                    frame.device_hint,
                    max_depth=self.max_payload_depth,
                )
            except PayloadError as err:
                out.rejections.append(Rejection(err.reason, err.detail, err.device, frame.payload))
                return out
            # Parts the codec refused on their own (a wM-Bus telegram with a wrong key among good
            # ones): each its own row with its own bytes, the rest of the message goes on.
            for refused, raw in getattr(uplinks, "rejected", ()):
                out.rejections.append(
                    Rejection(refused.reason, refused.detail, refused.device, raw)
                )
            if not uplinks:
                return out
        n = sum(len(u.ts) for u in uplinks)
        if n > self.max_readings_per_frame:
            out.rejections.append(
                Rejection(
                    TOO_MANY_READINGS,
                    f"{n} readings > max_readings_per_frame {self.max_readings_per_frame}",
                    frame.device_hint,
                    frame.payload or self._kept(_uplinks_raw(uplinks)),
                    readings=n,
                )
            )
            return out
        horizon = frame.received_at + self.future_tolerance_s
        live = frame.source not in HISTORY_SOURCES
        skew_before = frame.received_at - self.clock_skew_s if live else float("-inf")
        window_lo = frame.received_at - self.live_window_s if live else float("-inf")
        whole = frame.payload if len(uplinks) == 1 else None
        for uplink in uplinks:
            if decoded:  # a device's own status never sets the system's quality bits
                uplink.status &= VENDOR_STATUS_MASK
            self._check_uplink(
                frame, uplink, horizon, out, whole, skew_before, window_lo, finite=decoded
            )
        return out

    def _kept(self, raw: bytes) -> bytes | None:
        return raw[: self.oversize_keep_bytes] if raw else None

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
        self,
        frame: Frame,
        up: Uplink,
        horizon: float,
        out: Prepared,
        whole: bytes | None,
        skew_before: float = float("-inf"),
        window_lo: float = float("-inf"),
        *,
        finite: bool = False,
    ) -> None:
        """``finite``: non-finite values are set aside already (``decode`` does it)."""
        dev, info, index = self._resolve(up.device, up.channel)
        if not finite:  # transports' uplinks may hold NaN or inf values
            up = up.set_aside_non_finite()
        n_all = len(up.ts) + len(up.not_finite)

        def reject_all(reason: str, detail: str) -> None:
            out.rejections.append(
                Rejection(reason, detail, dev, up.raw or whole or _uplink_raw(up), readings=n_all)
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
        if frame.peer is not None and not index.may_send(frame.peer, dev):
            reject_all(
                UNAUTHORIZED,
                f"{frame.source} peer {frame.peer!r} (proven) sent readings for {up.device!r} "
                f"(claimed), which is neither it nor registered under it",
            )
            return
        if (
            frame.peer_vendor is not None
            and frame.peer == dev
            and index.vendors.get(dev, frame.peer_vendor) != frame.peer_vendor
        ):
            reject_all(
                UNAUTHORIZED,
                f"{frame.source} topic vendor {frame.peer_vendor!r} (claimed) but {dev!r} is "
                f"registered with vendor {index.vendors.get(dev)!r}",
            )
            return
        if frame.authenticated_device is not None and frame.authenticated_device != dev:
            reject_all(
                UNAUTHORIZED, f"peer {frame.authenticated_device!r} sent readings for {dev!r}"
            )
            return
        for t, v in up.not_finite:
            out.rejections.append(
                Rejection(
                    NOT_A_NUMBER,
                    f"value {v!r}",
                    dev,
                    _reading_raw(dev, up.channel, t, v, up.unit),
                )
            )
        if not up.ts:
            return
        try:
            factor, offset = index.conversion(info, up.unit)
        except UnknownUnit as err:
            reject_all(BAD_UNIT, str(err))
            return
        ts, values = up.ts, up.values
        if up.local_clock:  # the device's wall clock: to UTC before the time checks
            ts = index.wall_to_utc(dev, ts, up.clock_summer)
        lo_ts = self.earliest_epoch
        if info.install_epoch is not None and info.install_epoch > lo_ts:
            lo_ts = info.install_epoch
        lo_ts = max(lo_ts, window_lo)
        if factor == 1.0 and offset == 0.0:
            conv = values
        else:
            conv = [v * factor + offset for v in values]
        n = len(ts)
        skewed = int(Quality.CLOCK_SKEW) if self.clock_skew_action == "flag" else 0
        # Fast path: the whole uplink is valid (the overwhelmingly common case). min/max skip
        # NaN unless it comes first, so finiteness is checked apart: a sum is NaN or inf as soon
        # as one term is (a sum that overflows only sends valid data down the slow path). The
        # values are finite already (set aside above); only a unit conversion can overflow.
        if n == 1 and len(conv) == 1:  # one reading per message, common in live traffic
            t, c = ts[0], conv[0]
            if (
                lo_ts <= t <= horizon
                and t >= skew_before
                and info.min_value <= c <= info.max_value
                and math.isfinite(t)
                and math.isfinite(c)
            ):
                out.channel_ids.append(info.id)
                out.ts.append(t)
                out.values.append(c)
                out.quality.append(up.status)
                return
        elif (  # anything else, lists of unequal length included, takes the general checks
            n
            and math.isfinite(sum(ts))
            and (conv is values or math.isfinite(sum(conv)))
            and min(ts) >= lo_ts
            and max(ts) <= horizon
            and min(conv) >= info.min_value
            and max(conv) <= info.max_value
            and min(ts) >= skew_before
        ):
            out.channel_ids.extend([info.id] * n)
            out.ts.extend(ts)
            out.values.extend(conv)
            out.quality.extend([up.status] * n)
            return
        for t, v, c in zip(ts, values, conv, strict=True):
            reason = None
            quality = up.status
            if not math.isfinite(t):
                reason, detail = MALFORMED, f"timestamp {t!r}"
            elif not math.isfinite(c):  # a finite value the unit conversion overflowed
                reason, detail = NOT_A_NUMBER, f"value {v!r} is {c!r} in {info.unit}"
            elif t > horizon:
                reason, detail = (
                    FUTURE_TIMESTAMP,
                    f"ts {t:.0f} is {t - frame.received_at:.0f}s ahead",
                )
            elif t < lo_ts:
                if (
                    t < window_lo
                    and t >= self.earliest_epoch
                    and (info.install_epoch is None or t >= info.install_epoch)
                ):
                    reason = OUTSIDE_WINDOW
                    detail = (
                        f"ts {t:.0f} is {(frame.received_at - t) / 86_400:.0f} days before "
                        f"receipt (live_window_days {self.live_window_s / 86_400:.0f})"
                    )
                elif info.install_epoch is not None and t >= self.earliest_epoch:
                    reason = BEFORE_INSTALL
                    detail = f"ts {t:.0f} before install {info.install_epoch:.0f}"
                else:
                    reason, detail = ANCIENT_TIMESTAMP, f"ts {t:.0f} before {lo_ts:.0f}"
            elif not info.min_value <= c <= info.max_value:
                reason = OUT_OF_RANGE
                detail = f"{c!r} {info.unit} outside [{info.min_value}, {info.max_value}]"
            elif t < skew_before:
                if skewed:
                    quality |= skewed
                else:
                    reason = CLOCK_SKEW
                    detail = f"ts {t:.0f} is {frame.received_at - t:.0f}s before receipt"
            if reason is not None:
                out.rejections.append(
                    Rejection(reason, detail, dev, _reading_raw(dev, up.channel, t, v, up.unit))
                )
                continue
            out.channel_ids.append(info.id)
            out.ts.append(t)
            out.values.append(c)
            out.quality.append(quality)


def _uplink_raw(up: Uplink) -> bytes:
    """An uplink as JSON: the raw bytes of frames that never had any (import, Modbus, OPC-UA)."""
    return _encode(_uplink_doc(up))


def _uplink_doc(up: Uplink) -> dict[str, object]:
    return {
        "dev": up.device,
        "ch": up.channel,
        "ts": [_json_float(t) for t in up.ts],
        "v": [_json_float(v) for v in up.values],
        "not_finite": [[_json_float(t), _json_float(v)] for t, v in up.not_finite],
        "unit": up.unit,
        "status": up.status,
    }


def _json_float(x: float) -> float | str:
    """JSON has no NaN or infinity; keep them as text so the row says what came in."""
    return x if math.isfinite(x) else repr(x)


def _uplinks_raw(uplinks: list[Uplink]) -> bytes:
    return _encode({"readings": [_uplink_doc(u) for u in uplinks]})


def frame_raw(frame: Frame) -> bytes | None:
    """What a quarantine row keeps of ``frame``: its bytes, or its canonical rows as JSON."""
    if frame.payload:
        return frame.payload
    if frame.uplinks:
        return _uplinks_raw(frame.uplinks)
    return None
