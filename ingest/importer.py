"""Bulk import of historical readings (CSV or Parquet) through the same validation, dedup and
quarantine as live traffic: utilities migrate years of history from legacy systems, and a second
import of the same file must store nothing twice.

Columns: ``device`` (or ``channel_id``), optional ``channel`` (default ``register``), ``ts``
(ISO 8601 with offset, or unix seconds), ``value``, optional ``unit`` (default: the channel's unit),
optional ``status`` (quality bits).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from ingest.pipeline import IngestPipeline
from protocols.uplink import Frame, FrameOutcome, Uplink

CHUNK_ROWS = 200_000
FRAME_ROWS = 2_000


@dataclass
class ImportResult:
    """What one import did, in readings. ``stored`` and ``duplicates`` are the pipeline's counter
    deltas over the import (exact when nothing else writes through the same pipeline, as with
    ``aquameter import``): a re-import shows ``stored=0`` instead of pretending to add data."""

    rows: int
    accepted: int
    quarantined: int
    stored: int = 0
    duplicates: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


def _scan(path: Path) -> pl.LazyFrame:
    if path.suffix.lower() in (".parquet", ".pq"):
        return pl.scan_parquet(path)
    return pl.scan_csv(path, infer_schema_length=10_000, try_parse_dates=False)


def _normalise(df: pl.DataFrame, channel_names: dict[int, tuple[str, str]]) -> pl.DataFrame:
    if "channel_id" in df.columns and "device" not in df.columns:
        mapping = pl.DataFrame(
            {
                "channel_id": list(channel_names),
                "device": [v[0] for v in channel_names.values()],
                "channel": [v[1] for v in channel_names.values()],
            },
            schema={"channel_id": pl.Int64, "device": pl.String, "channel": pl.String},
        )
        df = df.with_columns(pl.col("channel_id").cast(pl.Int64)).join(
            mapping, on="channel_id", how="left"
        )
        df = df.with_columns(
            pl.col("device").fill_null("channel:" + pl.col("channel_id").cast(str))
        )
    if "channel" not in df.columns:
        df = df.with_columns(pl.lit("register").alias("channel"))
    if "unit" not in df.columns:
        df = df.with_columns(pl.lit(None, dtype=pl.String).alias("unit"))
    if "status" not in df.columns:
        df = df.with_columns(pl.lit(0, dtype=pl.Int64).alias("status"))
    ts = df.schema["ts"]
    if ts == pl.String:
        epoch = pl.col("ts").str.to_datetime(time_zone="UTC").dt.epoch("us") / 1e6
    elif isinstance(ts, pl.Datetime):
        col = pl.col("ts") if ts.time_zone else pl.col("ts").dt.replace_time_zone("UTC")
        epoch = col.dt.epoch("us") / 1e6
    else:
        epoch = pl.col("ts").cast(pl.Float64)
    return df.select(
        pl.col("device").cast(pl.String),
        pl.col("channel").cast(pl.String),
        epoch.alias("epoch"),
        pl.col("value").cast(pl.Float64, strict=False),
        pl.col("unit").cast(pl.String),
        pl.col("status").fill_null(0).cast(pl.Int64),
    )


def frames_from_table(df: pl.DataFrame, source: str) -> Iterator[Frame]:
    """Group rows into frames of one device channel each (at most FRAME_ROWS readings)."""
    bad = df.filter(
        pl.col("epoch").is_null() | pl.col("value").is_null() | pl.col("device").is_null()
    )
    for row in bad.iter_rows(named=True):
        # Unparseable rows still reach the quarantine, as a malformed one-reading frame.
        yield Frame(
            source="import", address=source, payload=repr(row).encode(), payload_format="json"
        )
    good = df.filter(
        pl.col("epoch").is_not_null()
        & pl.col("value").is_not_null()
        & pl.col("device").is_not_null()
    )
    for (device, channel, unit, status), group in good.group_by(
        ["device", "channel", "unit", "status"], maintain_order=True
    ):
        ts = group["epoch"].to_list()
        values = group["value"].to_list()
        for i in range(0, len(ts), FRAME_ROWS):
            yield Frame(
                source="import",
                address=source,
                uplinks=[
                    Uplink(
                        device=str(device),
                        channel=str(channel),
                        ts=ts[i : i + FRAME_ROWS],
                        values=values[i : i + FRAME_ROWS],
                        unit=None if unit is None else str(unit),
                        status=int(status),
                    )
                ],
            )


def import_file(
    path: Path,
    pipeline: IngestPipeline,
    *,
    progress: Callable[[int], None] | None = None,
) -> ImportResult:
    """Stream ``path`` into ``pipeline`` chunk by chunk; returns when everything is durable."""
    index = pipeline.index()
    channel_names = {c.id: (c.device_id, c.name) for c in index.by_key.values()}
    total = accepted = quarantined = 0
    before = pipeline.counters.snapshot()
    for chunk in _scan(path).collect_batches(chunk_size=CHUNK_ROWS):
        if chunk.height == 0:
            continue
        table = _normalise(chunk, channel_names)
        outcomes: list[FrameOutcome] = pipeline.submit_many(
            list(frames_from_table(table, str(path)))
        )
        total += chunk.height
        accepted += sum(o.accepted for o in outcomes)
        quarantined += sum(o.quarantined for o in outcomes)
        if progress is not None:
            progress(chunk.height)
    after = pipeline.counters.snapshot()
    return ImportResult(
        total,
        accepted,
        quarantined,
        stored=_delta(after, before, "stored"),
        duplicates=_delta(after, before, "duplicates"),
        reasons=_reason_delta(after, before),
    )


def _reason_delta(after: dict[str, object], before: dict[str, object]) -> dict[str, int]:
    a, b = after["quarantined"], before["quarantined"]
    assert isinstance(a, dict) and isinstance(b, dict)
    return {k: int(v) - int(b.get(k, 0)) for k, v in a.items() if int(v) != int(b.get(k, 0))}


def _delta(after: dict[str, object], before: dict[str, object], key: str) -> int:
    a, b = after[key], before[key]
    assert isinstance(a, int) and isinstance(b, int)
    return a - b
