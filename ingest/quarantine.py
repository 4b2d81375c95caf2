"""Rows for the quarantine that can always be written, and a bound on how many one frame makes.

The quarantine is where input goes when nothing else will take it, so its own write must not fail
on content: PostgreSQL text cannot hold a NUL byte, a device can send invalid UTF-8 in a CoAP
Uri-Path or an MQTT topic, and an exception text can be megabytes long. Each text field is
escaped (NUL and lone surrogates as backslash escapes) and cut to a length with a visible marker;
the raw bytes (``bytea``, which holds anything) are cut too, with the cut recorded in the detail.
"""

from __future__ import annotations

from collections import Counter

from ingest.validate import Rejection

# Lengths past which a field is cut (characters for text, bytes for raw).
MAX_SOURCE = 32
MAX_ADDRESS = 512
MAX_DEVICE = 128
MAX_REASON = 64
MAX_DETAIL = 2_000
MAX_RAW = 1_048_576


def safe_text(value: object, limit: int) -> str:
    """``value`` as text PostgreSQL accepts, at most ``limit`` characters plus a cut marker."""
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray | memoryview):
        text = bytes(value).decode("utf-8", "backslashreplace")
    else:
        text = value if isinstance(value, str) else repr(value)
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    # Lone surrogates (from a decoder's surrogateescape) cannot be encoded as UTF-8.
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > limit:
        text = f"{text[:limit]}…[cut {len(text) - limit} chars]"
    return text


def quarantine_row(
    source: object, address: object, rej: Rejection, max_raw: int = MAX_RAW
) -> tuple[str, str, str | None, str, str, bytes | None]:
    """(source, address, device_id, reason, detail, raw) ready for COPY, whatever ``rej`` holds."""
    raw = rej.raw
    detail = safe_text(rej.detail, MAX_DETAIL)
    if raw is not None and not isinstance(raw, bytes):
        raw = (
            bytes(raw)
            if isinstance(raw, bytearray | memoryview)
            else safe_text(raw, max_raw).encode()
        )
    if raw is not None and len(raw) > max_raw:
        detail = f"{detail} [raw cut to the first {max_raw} of {len(raw)} bytes]"
        raw = raw[:max_raw]
    device = None if rej.device is None else safe_text(rej.device, MAX_DEVICE)
    return (
        safe_text(source, MAX_SOURCE),
        safe_text(address, MAX_ADDRESS),
        device,
        safe_text(rej.reason, MAX_REASON) or "UNKNOWN",
        detail,
        raw,
    )


def bound_rejections(
    rejections: list[Rejection], limit: int, frame_raw: bytes | None
) -> list[Rejection]:
    """At most ``limit`` rows per frame, plus one summary row per reason that was cut.

    Why: one 1 MB message of bad readings once made 100,000 quarantine rows. The first ``limit``
    rows stay as they are (enough to see what is wrong); the rest of each reason is folded into
    one row that carries how many readings it stands for and the whole frame's raw bytes, so
    nothing is lost and the counters still count readings.
    """
    if len(rejections) <= limit:
        return rejections
    kept = rejections[:limit]
    rest: Counter[str] = Counter()
    devices: dict[str, str | None] = {}
    for rej in rejections[limit:]:
        rest[rej.reason] += rej.readings
        devices.setdefault(rej.reason, rej.device)
    for reason, readings in rest.items():
        kept.append(
            Rejection(
                reason,
                f"{readings} more readings of this frame with reason {reason} (summary row; "
                f"the frame's first {limit} rejections have rows of their own)",
                devices[reason],
                frame_raw,
                readings=readings,
            )
        )
    return kept
