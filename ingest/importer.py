"""Bulk import of historical readings (CSV or Parquet) through the same validation, dedup and
quarantine as live traffic: utilities migrate years of history from legacy systems, and a second
import of the same file must store nothing twice.

Columns: ``device`` (or ``channel_id``), optional ``channel`` (default ``register``), ``ts``
(ISO 8601 with offset, or unix seconds), ``value``, optional ``unit`` (default: the channel's unit),
optional ``status`` (quality bits).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from aquameter.errors import MissingColumns
from ingest.pipeline import IngestPipeline
from ingest.validate import MALFORMED, Prepared
from protocols.uplink import Frame, FrameOutcome, Uplink
from sql.connect import connect

CHUNK_ROWS = 200_000
FRAME_ROWS = 2_000
SOURCE = "import"
# Read as text whatever they hold: a type inferred from the first rows must not make row
# 2,000,001 ("n/a", a date in another format) abort the whole file.
_TEXT_COLUMNS = ("ts", "value", "status", "unit", "device", "channel")


@dataclass
class ImportResult:
    """What one import did, in readings. ``stored`` and ``duplicates`` are the pipeline's counter
    deltas over the import (exact when nothing else writes through the same pipeline, as with
    ``aquameter import``): a re-import shows ``stored=0`` instead of pretending to add data.
    ``already_quarantined``: rejected rows whose quarantine row an earlier import of the same
    file already wrote (not written twice)."""

    rows: int
    accepted: int
    quarantined: int
    stored: int = 0
    duplicates: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    already_quarantined: int = 0


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in (".parquet", ".pq")


def _scan(path: Path) -> pl.LazyFrame:
    if _is_parquet(path):
        return pl.scan_parquet(path)
    header = pl.scan_csv(path, n_rows=0).collect_schema().names()
    overrides = {c: pl.String for c in _TEXT_COLUMNS if c in header}
    return pl.scan_csv(
        path, infer_schema_length=10_000, try_parse_dates=False, schema_overrides=overrides
    )


def check_columns(path: Path) -> list[str]:
    """The file's columns; :class:`MissingColumns` (listing the required ones) when it lacks
    one, so a file from another system fails in one line before anything is written."""
    names = _scan(path).collect_schema().names()
    missing = [c for c in ("ts", "value") if c not in names]
    if "device" not in names and "channel_id" not in names:
        missing.insert(0, "device (or channel_id)")
    if missing:
        raise MissingColumns(path, missing, names)
    return names


def count_rows(path: Path) -> int:
    """Rows of ``path`` (for progress), without reading the values."""
    return int(_scan(path).select(pl.len()).collect().item())


def row_address(path: str, row: int) -> str:
    """The stable key of an imported row in the quarantine: resolved file path and 1-based row
    number (a frame's address is that of its first row)."""
    return f"{path}#{row}"


def _epoch(df: pl.DataFrame) -> pl.Expr:
    """ts as epoch seconds; an unparseable one becomes null (its row is quarantined MALFORMED)
    instead of raising for the whole file."""
    ts = df.schema["ts"]
    if ts == pl.String:
        number = pl.col("ts").str.strip_chars().cast(pl.Float64, strict=False)
        text = pl.when(number.is_null()).then(pl.col("ts").str.strip_chars())
        parsed = text.str.to_datetime(time_zone="UTC", strict=False).dt.epoch("us") / 1e6
        return pl.coalesce(number, parsed)
    if isinstance(ts, pl.Datetime):
        col = pl.col("ts") if ts.time_zone else pl.col("ts").dt.replace_time_zone("UTC")
        return col.dt.epoch("us") / 1e6
    return pl.col("ts").cast(pl.Float64, strict=False)


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
        df = df.with_columns(pl.col("channel_id").cast(pl.Int64, strict=False)).join(
            mapping, on="channel_id", how="left", maintain_order="left"
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
    if "_row" not in df.columns:
        df = df.with_row_index("_row", offset=1)
    value = pl.col("value")
    if df.schema["value"] == pl.String:
        value = value.str.strip_chars()
    return df.select(
        pl.col("_row").cast(pl.Int64),
        pl.col("device").cast(pl.String),
        pl.col("channel").cast(pl.String).fill_null("register"),
        _epoch(df).alias("epoch"),
        value.cast(pl.Float64, strict=False).alias("value"),
        pl.col("unit").cast(pl.String),
        pl.col("status").cast(pl.Int64, strict=False).fill_null(0),
    )


def _why_malformed(row: dict[str, object]) -> str:
    bad = [k for k in ("device", "epoch", "value") if row.get(k) is None]
    names = {"epoch": "ts", "device": "device"}
    return "unparseable or missing " + ", ".join(names.get(k, k) for k in bad)


def frames_from_table(
    df: pl.DataFrame, source: str, original: pl.DataFrame | None = None
) -> Iterator[Frame]:
    """The frames of :func:`_frames_with_rows`, without their row numbers."""
    for frame, _ in _frames_with_rows(df, source, original):
        yield frame


def _frames_with_rows(
    df: pl.DataFrame, source: str, original: pl.DataFrame | None = None
) -> Iterator[tuple[Frame, list[int] | None]]:
    """Frames of one device channel each (at most FRAME_ROWS readings), and one MALFORMED
    frame per row that does not parse, carrying the original row as its raw bytes.

    ``source`` is the file (its rows' stable key in the quarantine); ``original`` the rows as
    read, keyed by ``_row`` (default: ``df`` itself)."""
    bad = df.filter(
        pl.col("epoch").is_null() | pl.col("value").is_null() | pl.col("device").is_null()
    )
    if bad.height:
        orig = original if original is not None else df
        raw_rows = {
            int(r["_row"]): r
            for r in orig.filter(pl.col("_row").is_in(bad["_row"].implode())).iter_rows(named=True)
        }
        for row in bad.iter_rows(named=True):
            n = int(row["_row"])
            raw = {k: v for k, v in raw_rows.get(n, row).items() if k != "_row"}
            yield (
                Frame(
                    source=SOURCE,
                    address=row_address(source, n),
                    payload=json.dumps({"row": n, **raw}, default=str).encode(),
                    payload_format="json",
                    device_hint=row["device"],
                    rejection=(MALFORMED, f"row {n}: {_why_malformed(row)}"),
                ),
                None,
            )
    good = df.filter(
        pl.col("epoch").is_not_null()
        & pl.col("value").is_not_null()
        & pl.col("device").is_not_null()
    )
    for (device, channel, unit, status), group in good.group_by(
        ["device", "channel", "unit", "status"], maintain_order=True
    ):
        rows = group["_row"].to_list()
        ts = group["epoch"].to_list()
        values = group["value"].to_list()
        for i in range(0, len(ts), FRAME_ROWS):
            part = rows[i : i + FRAME_ROWS]
            uplink = Uplink(
                str(device),
                str(channel),
                ts[i : i + FRAME_ROWS],
                values[i : i + FRAME_ROWS],
                unit=None if unit is None else str(unit),
                status=int(status),
            )
            frame = Frame(
                source=SOURCE,
                address=row_address(source, part[0]),
                uplinks=[uplink],
                device_hint=str(device),
            )
            yield frame, part


class _Planner:
    """Decides, before submitting, which frames' quarantine rows an earlier import of the same
    file already wrote, so a re-import quarantines nothing twice.

    A frame the validator rejects whole is keyed by its first row; a frame with only some bad
    readings is split into its good readings (one frame) and one frame per bad reading, keyed
    by that reading's row. Keys are looked up with one SELECT per chunk.

    Kept beside the quarantine's own de-duplication (migration 0015), which would take a
    re-import's rows as repeats and count each again: a second import of the same file is the
    operator's retry, not the data arriving twice, so it leaves the quarantine as it was.
    """

    def __init__(self, pipeline: IngestPipeline) -> None:
        self.pipeline = pipeline
        self.skipped = 0

    def plan(
        self, frames: list[tuple[Frame, list[int] | None]]
    ) -> tuple[list[Frame], list[Prepared | None]]:
        """The frames to submit, each with its validation where the plan already made it (the
        pipeline then does not validate it again)."""
        prepare = self.pipeline.prepare
        # frame, what prepare made of it, reason it will be quarantined for
        out: list[tuple[Frame, Prepared | None, str | None]] = []
        for frame, rows in frames:
            if frame.rejection is not None or rows is None or frame.uplinks is None:
                out.append((frame, None, frame.rejection[0] if frame.rejection else None))
                continue
            prepared = prepare(frame)
            if not prepared.rejections:
                out.append((frame, prepared, None))
                continue
            if len(prepared) == 0 and len(prepared.rejections) == 1:
                out.append((frame, prepared, prepared.rejections[0].reason))
                continue
            out.extend(self._split(frame, rows))
        keys = {(f.address, r) for f, _, r in out if r is not None}
        existing = self._existing(keys)
        kept: list[Frame] = []
        kept_prepared: list[Prepared | None] = []
        for frame, made, reason in out:
            if reason is not None and (frame.address, reason) in existing:
                self.skipped += 1
                continue
            kept.append(frame)
            kept_prepared.append(made)
        return kept, kept_prepared

    def _split(
        self, frame: Frame, rows: list[int]
    ) -> list[tuple[Frame, Prepared | None, str | None]]:
        assert frame.uplinks is not None
        up = frame.uplinks[0]
        source = frame.address.rsplit("#", 1)[0]
        good: list[int] = []
        out: list[tuple[Frame, Prepared | None, str | None]] = []
        for i, row in enumerate(rows):
            single = Frame(
                source=SOURCE,
                address=row_address(source, row),
                uplinks=[
                    Uplink(up.device, up.channel, [up.ts[i]], [up.values[i]], up.unit, up.status)
                ],
                device_hint=up.device,
            )
            p = self.pipeline.prepare(single)
            if p.rejections:
                out.append((single, p, p.rejections[0].reason))
            else:
                good.append(i)
        if good:
            rest = Frame(
                source=SOURCE,
                address=row_address(source, rows[good[0]]),
                uplinks=[
                    Uplink(
                        up.device,
                        up.channel,
                        [up.ts[i] for i in good],
                        [up.values[i] for i in good],
                        up.unit,
                        up.status,
                    )
                ],
                device_hint=up.device,
            )
            out.insert(0, (rest, None, None))
        return out

    def _existing(self, keys: set[tuple[str, str]]) -> set[tuple[str, str]]:
        if not keys:
            return set()
        addresses = sorted({a for a, _ in keys})
        with connect(self.pipeline.database_url) as conn:
            rows = conn.execute(
                "SELECT address, reason FROM quarantine WHERE source = %s AND address = ANY(%s)",
                (SOURCE, addresses),
            ).fetchall()
        return {(str(a), str(r)) for a, r in rows} & keys


def import_file(
    path: Path,
    pipeline: IngestPipeline,
    *,
    progress: Callable[[int], None] | None = None,
) -> ImportResult:
    """Stream ``path`` into ``pipeline`` chunk by chunk; returns when everything is durable.

    Never aborts on a row: an unparseable date or value is that row's MALFORMED quarantine row.
    A file without the required columns raises :class:`MissingColumns` before anything is
    written. A second import of the same file stores no reading and no quarantine row twice."""
    check_columns(path)
    source = str(path.resolve())
    index = pipeline.index()
    channel_names = {c.id: (c.device_id, c.name) for c in index.by_key.values()}
    total = accepted = quarantined = 0
    planner = _Planner(pipeline)
    before = pipeline.counters.snapshot()
    for chunk in _scan(path).collect_batches(chunk_size=CHUNK_ROWS):
        if chunk.height == 0:
            continue
        chunk = chunk.with_row_index("_row", offset=total + 1)
        table = _normalise(chunk, channel_names)
        frames, prepared = planner.plan(list(_frames_with_rows(table, source, chunk)))
        outcomes: list[FrameOutcome] = pipeline.submit_many(frames, prepared)
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
        already_quarantined=planner.skipped,
    )


def _reason_delta(after: dict[str, object], before: dict[str, object]) -> dict[str, int]:
    a, b = after["quarantined"], before["quarantined"]
    assert isinstance(a, dict) and isinstance(b, dict)
    return {k: int(v) - int(b.get(k, 0)) for k, v in a.items() if int(v) != int(b.get(k, 0))}


def _delta(after: dict[str, object], before: dict[str, object], key: str) -> int:
    a, b = after[key], before[key]
    assert isinstance(a, int) and isinstance(b, int)
    return a - b
