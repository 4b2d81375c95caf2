"""OPC-UA DataValue → reading: the converter half of the OPC-UA adapter, free of sockets.

Which timestamp a reading carries matters more than anything else here: the SourceTimestamp is
when the analyser measured, the ServerTimestamp when the server last touched the value, and the
receive time only when we heard of it. Rollups, flatline detection and the dedup key (channel,
ts) all depend on the measurement time, so the source wins and the others are fallbacks.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from asyncua import ua

from protocols.uplink import Quality, Uplink

# Bits 30–31 of a StatusCode are its severity (OPC 10000-4 §7.39): 00 Good, 01 Uncertain,
# 10 Bad, 11 reserved (treated as Bad, like asyncua's StatusCode.is_bad()).
_SEVERITY_MASK = 0xC000_0000
_UNCERTAIN = 0x4000_0000

# OPC-UA encodes "no timestamp" as 0 (1601-01-01); anything before this is not a real clock.
_EARLIEST_REAL_TIME = datetime(1971, 1, 1, tzinfo=UTC)

NO_VALUE = "no_value"
NOT_NUMERIC = "not_numeric"


class NotNumeric(ValueError):
    """A data change that cannot become a reading; ``reason`` is a stats counter name."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Sample:
    ts: float
    value: float
    quality: int
    ts_source: str  # "source" | "server" | "received": which clock ``ts`` came from


def status_quality(status: ua.StatusCode | int | None) -> int:
    """Map a StatusCode's severity to the quality bits stored with the reading."""
    if status is None:
        return 0
    code = status if isinstance(status, int) else int(status.value)
    severity = code & _SEVERITY_MASK
    if severity == 0:
        return 0
    if severity == _UNCERTAIN:
        return int(Quality.UNCERTAIN)
    return int(Quality.BAD)


def _epoch(dt: datetime | None) -> float | None:
    if dt is None:
        return None
    if dt.tzinfo is None:  # asyncua decodes UTC-aware datetimes; a naive one is UTC too
        dt = dt.replace(tzinfo=UTC)
    if dt < _EARLIEST_REAL_TIME:
        return None
    return dt.timestamp()


def sample_timestamp(dv: ua.DataValue, received_at: float) -> tuple[float, str]:
    """Source timestamp, else server timestamp, else the receive time (and which one it was)."""
    src = _epoch(dv.SourceTimestamp)
    if src is not None:
        return src, "source"
    srv = _epoch(dv.ServerTimestamp)
    if srv is not None:
        return srv, "server"
    return received_at, "received"


def numeric_value(value: object) -> float:
    """A scalar number (bool pump states become 1.0/0.0); anything else raises NotNumeric."""
    if value is None:
        raise NotNumeric(NO_VALUE, "data change without a value")
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        return float(value)
    raise NotNumeric(NOT_NUMERIC, f"{type(value).__name__} value is not a scalar number")


def convert_datavalue(dv: ua.DataValue, received_at: float) -> Sample:
    """One data change → one sample; raises :class:`NotNumeric` when there is nothing to store
    (a Bad status usually comes without a value)."""
    variant = dv.Value
    raw = variant.Value if variant is not None else None
    value = numeric_value(raw)
    ts, which = sample_timestamp(dv, received_at)
    return Sample(ts=ts, value=value, quality=status_quality(dv.StatusCode), ts_source=which)


def build_uplinks(device: str, samples: list[tuple[str, Sample]]) -> list[Uplink]:
    """Group (channel, sample) pairs into Uplinks, one per channel and quality (an Uplink has a
    single status), keeping the arrival order of samples within each group."""
    groups: dict[tuple[str, int], Uplink] = {}
    for channel, s in samples:
        up = groups.get((channel, s.quality))
        if up is None:
            up = Uplink(device=device, channel=channel, ts=[], values=[], status=s.quality)
            groups[(channel, s.quality)] = up
        up.ts.append(s.ts)
        up.values.append(s.value)
    return list(groups.values())


def convert_batch(
    device: str, items: list[tuple[str, ua.DataValue]], received_at: float
) -> tuple[list[Uplink], dict[str, int]]:
    """A publish batch of (channel, DataValue) → Uplinks, and what was skipped by reason."""
    samples: list[tuple[str, Sample]] = []
    skipped: dict[str, int] = {}
    for channel, dv in items:
        try:
            samples.append((channel, convert_datavalue(dv, received_at)))
        except NotNumeric as err:
            skipped[err.reason] = skipped.get(err.reason, 0) + 1
    return build_uplinks(device, samples), skipped
