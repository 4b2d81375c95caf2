"""Interval consumption from cumulative register reads, and the meters' local time base.

Meters report a cumulative register; what billing and analytics need is the volume used in each
interval. A plain difference is wrong in two well-known places, and both are handled here so that no
later step ever sees an invented negative or huge volume:

* **rollover** — an N-digit register wraps at 10^N m³ (99 999 → 0). A decrease whose wrapped value
  is small compared with the register's range is consumption across the wrap;
* **meter exchange** — the registry records, at the exchange instant, the old register's final value
  and the new register's start value. The interval spanning the exchange is
  ``(old_final − previous read) + (read − new_start)``; reads at or after ``exchanged_at`` belong to
  the new register.

A decrease that fits neither stays negative on purpose: VEE reports it as ``REGISTER_DECREASE``
instead of this module guessing.

The module also holds the conversion between UTC instants and the meters' local wall time, because
every later step (install dates, weekday profiles, billing periods) needs the same conversion and
polars takes one time zone per expression, not one per row.
"""

from __future__ import annotations

import zoneinfo
from dataclasses import dataclass

import numpy as np
import polars as pl

from pipelines.schemas import INTERVALS, UTC_TS

# INTERVALS plus what later steps need to reason about an interval: where it starts, how long it
# is, the register read that closes it, and whether a rollover or an exchange was crossed.
CONSUMPTION = {
    **INTERVALS,
    "prev_ts": UTC_TS,
    "interval_s": pl.Float64,
    "register": pl.Float64,
    "rollover": pl.Boolean,
    "exchange": pl.Boolean,
}

FLAG_ACTUAL = "A"
FLAG_ESTIMATED = "E"
FLAG_EDITED = "M"


@dataclass(frozen=True, slots=True)
class ConsumptionParams:
    """How register differences become interval volumes.

    Attributes:
        default_register_digits: digits assumed when a meter has no ``register_digits`` (the
            ``meters.register_digits`` column defaults to 5 in the schema, so the same here).
        rollover_max_fraction: a decrease ``d < 0`` is a rollover when the wrapped volume
            ``d + 10^N`` is at most this fraction of the register range ``10^N``. 0.1 accepts
            99 990 → 5 on a 5-digit register (15 m³) but rejects 50 000 → 100 (50 100 m³, half the
            range, which is a reset or a bad read, not a wrap).
    """

    default_register_digits: int = 5
    rollover_max_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.default_register_digits < 1:
            raise ValueError("default_register_digits must be >= 1")
        if not 0.0 < self.rollover_max_fraction < 1.0:
            raise ValueError("rollover_max_fraction must be in (0, 1)")


def sort_by_meter_time(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` ordered by (meter_id, ts), stable; frames already in order are returned as is.

    Every step needs this order and most inputs already have it (the database returns them so,
    and each step here returns them so): checking is one vectorised pass, sorting 29M rows on a
    string key is many.
    """
    if frame.height < 2:
        return frame
    # Each row against the row before: the frame and itself one row down, as zero-copy slices
    # (a shifted string column would be a copy of millions of ids).
    (m1, m0), (t1, t0) = _consecutive(frame, "meter_id"), _consecutive(frame, "ts")
    in_order = ((m1 > m0) | ((m1 == m0) & (t1 >= t0))).all()
    return frame if in_order else frame.sort("meter_id", "ts", maintain_order=True)


def _consecutive(frame: pl.DataFrame, name: str) -> tuple[pl.Series, pl.Series]:
    """Column ``name`` from the second row on, and the same column up to the last row but one."""
    col = frame.get_column(name)
    n = max(frame.height - 1, 0)
    return col.slice(1, n), col.slice(0, n)


def repeated_keys(frame: pl.DataFrame) -> pl.Series:
    """``same_key_as_previous`` of a (meter_id, ts)-sorted frame, as a Series, without copies."""
    if frame.height == 0:
        return pl.Series("_repeat", [], dtype=pl.Boolean)
    (m1, m0), (t1, t0) = _consecutive(frame, "meter_id"), _consecutive(frame, "ts")
    later = ((m1 == m0) & (t1 == t0)).fill_null(False)
    return pl.concat([pl.Series([False]), later]).rechunk().alias("_repeat")


def same_key_as_previous() -> pl.Expr:
    """True where a row of a (meter_id, ts)-sorted frame repeats the previous row's key."""
    return (
        (pl.col("meter_id") == pl.col("meter_id").shift(1))
        & (pl.col("ts") == pl.col("ts").shift(1))
    ).fill_null(False)


def clean_reads(reads: pl.DataFrame) -> pl.DataFrame:
    """Reads usable for differencing: keys present, register finite, one read per (meter, ts).

    Duplicates keep the first occurrence in input order, so the result is deterministic; VEE reports
    them (``DUPLICATE_TS``) and its validated reads drop conflicting duplicates before this runs.
    The result can be handed to :func:`interval_consumption` (``cleaned=True``) and to
    ``pipelines.vee`` (``clean=``) so that a chain of steps cleans the reads once.
    """
    r = (
        reads.lazy()
        .select(
            pl.col("meter_id").cast(pl.String),
            pl.col("ts").cast(UTC_TS),
            pl.col("register").cast(pl.Float64),
            pl.col("quality").cast(pl.Int16).fill_null(0),
        )
        .filter(
            pl.col("meter_id").is_not_null()
            & pl.col("ts").is_not_null()
            & pl.col("register").is_finite()
        )
        .collect(engine="in-memory")
        # One chunk: reads come in many (parquet row groups, database batches), and shifts,
        # gathers and searches down millions of rows are much slower across chunks.
        .rechunk()
    )
    r = sort_by_meter_time(r)
    repeat = repeated_keys(r)
    return r.filter(~repeat) if repeat.any() else r


def meter_blocks(frame: pl.DataFrame) -> tuple[pl.Series, pl.DataFrame]:
    """Block number of each row (a block is a run of rows of one meter) and the blocks' meters.

    On a frame grouped by meter, per-meter values are looked up once per block and spread to the
    rows by position (``gather``): hashing millions of meter ids in a join costs far more.
    Returns ``_b`` (UInt32, one per row) and a frame ``_b, meter_id`` with one row per block.
    """
    runs = frame.get_column("meter_id").rle()
    lengths = runs.struct.field("len").to_numpy()
    numbers = np.arange(lengths.size, dtype=np.uint32)
    blocks = pl.Series("_b", np.repeat(numbers, lengths), dtype=pl.UInt32)
    heads = pl.DataFrame({"_b": numbers, "meter_id": runs.struct.field("value")})
    return blocks, heads


# Validation works on this many rows at a time (whole meters): every rule looks at one meter's
# rows only, and done on tens of millions of rows at once the intermediate frames of its steps
# would all be held together (gigabytes for a 10,000-meter month). A chunk of meters as the
# flows load them (a few thousand meters, a month) stays one slice, and so one chunk of memory:
# polars shifts and gathers across chunks at up to twice the cost.
SLICE_ROWS = 8_000_000


def meter_slices(frame: pl.DataFrame, rows: int | None = None) -> list[pl.DataFrame]:
    """``frame`` (grouped by meter, e.g. sorted by meter and time) as zero-copy slices of whole
    meters of about ``rows`` rows each (default ``SLICE_ROWS``); one slice when it is not
    larger than that."""
    rows = SLICE_ROWS if rows is None else max(rows, 1)
    if frame.height <= rows:
        return [frame]
    lengths = frame.get_column("meter_id").rle().struct.field("len").to_numpy()
    ends = np.cumsum(lengths)
    cuts = np.unique(np.searchsorted(ends, np.arange(rows, frame.height, rows)))
    bounds = [0, *ends[cuts[cuts < lengths.size - 1]].tolist(), frame.height]
    return [frame.slice(a, b - a) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def register_capacity(meters: pl.DataFrame | None, params: ConsumptionParams) -> pl.DataFrame:
    """(meter_id, capacity): the value 10^digits at which each meter's register wraps."""
    if meters is None or "register_digits" not in meters.columns:
        return pl.DataFrame(schema={"meter_id": pl.String, "capacity": pl.Float64})
    return meters.select(
        pl.col("meter_id").cast(pl.String),
        pl.lit(10.0).pow(pl.col("register_digits").cast(pl.Float64)).alias("capacity"),
    ).unique(subset="meter_id", keep="first", maintain_order=True)


def _with_capacity(
    frame: pl.DataFrame, meters: pl.DataFrame | None, params: ConsumptionParams
) -> pl.DataFrame:
    default_cap = 10.0**params.default_register_digits
    caps = register_capacity(meters, params).with_columns(pl.col("capacity").fill_null(default_cap))
    if caps.get_column("capacity").is_in([default_cap]).all():
        return frame.with_columns(capacity=pl.lit(default_cap))
    return frame.join(caps, on="meter_id", how="left", maintain_order="left").with_columns(
        pl.col("capacity").fill_null(default_cap)
    )


def _unwrap(diff: pl.Expr, capacity: pl.Expr, params: ConsumptionParams) -> pl.Expr:
    """A negative difference that fits a register wrap, turned into the consumption it is."""
    wrapped = diff + capacity
    return (
        pl.when((diff < 0) & (wrapped <= capacity * params.rollover_max_fraction))
        .then(wrapped)
        .otherwise(diff)
    )


def _is_wrap(diff: pl.Expr, capacity: pl.Expr, params: ConsumptionParams) -> pl.Expr:
    return ((diff < 0) & (diff + capacity <= capacity * params.rollover_max_fraction)).fill_null(
        False
    )


def _exchange_table(exchanges: pl.DataFrame | None) -> pl.DataFrame:
    """Exchanges numbered per meter with the running sum of (old_final − new_start).

    The running sum makes any number of exchanges between two reads cheap: the volume across them is
    ``read − prev + Σ(old_final − new_start)``, corrected for wraps on the first and last segment.
    """
    schema: dict[str, pl.DataType | type[pl.DataType]] = {
        "meter_id": pl.String,
        "exchanged_at": UTC_TS,
        "old_register_final": pl.Float64,
        "new_register_start": pl.Float64,
    }
    if exchanges is None or exchanges.height == 0:
        ex = pl.DataFrame(schema=schema)
    else:
        ex = exchanges.select(
            pl.col(name).cast(dtype) for name, dtype in schema.items()
        ).drop_nulls(["meter_id", "exchanged_at", "old_register_final"])
    return (
        ex.with_columns(pl.col("new_register_start").fill_null(0.0))
        .sort("meter_id", "exchanged_at")
        .unique(subset=["meter_id", "exchanged_at"], keep="last", maintain_order=True)
        .with_columns(
            ex_n=pl.int_range(1, pl.len() + 1).over("meter_id"),
            ex_offset=(pl.col("old_register_final") - pl.col("new_register_start"))
            .cum_sum()
            .over("meter_id"),
        )
    )


def interval_consumption(
    reads: pl.DataFrame,
    meters: pl.DataFrame | None = None,
    exchanges: pl.DataFrame | None = None,
    params: ConsumptionParams | None = None,
    *,
    cleaned: bool = False,
) -> pl.DataFrame:
    """Volume of each interval between consecutive reads of a meter (frame ``CONSUMPTION``).

    One row per read that has a previous read: ``ts`` ends the interval, ``prev_ts`` starts it,
    ``interval_s`` is its length (a gap shows as a long interval; estimation splits it later),
    ``quality`` is the closing read's vendor status, flag ``A`` and method null. Volumes include
    rollovers and exchanges; an unexplained decrease stays negative for VEE to report.

    ``cleaned=True`` says ``reads`` is already the output of :func:`clean_reads` (or a row subset
    of it), so the cleaning pass is skipped; on anything else the result is undefined.
    """
    p = params or ConsumptionParams()
    r = reads if cleaned else clean_reads(reads)
    ex = _exchange_table(exchanges)
    if ex.height == 0:
        return _plain_intervals(r, meters, p)
    return _intervals_across_exchanges(_with_capacity(r, meters, p), ex, p)


def interval_volumes(
    clean: pl.DataFrame,
    meters: pl.DataFrame | None = None,
    exchanges: pl.DataFrame | None = None,
    params: ConsumptionParams | None = None,
) -> pl.DataFrame:
    """``meter_id, ts, volume, quality, prev_ts, interval_s`` of :func:`interval_consumption` on
    reads already cleaned (:func:`clean_reads`, or a row subset of it).

    What validation's interval rules read. Building the whole CONSUMPTION frame only to drop most
    of it would cost as much memory again on tens of millions of intervals: its constant ``flag``
    column alone takes 16 bytes a row.
    """
    p = params or ConsumptionParams()
    if _exchange_table(exchanges).height == 0:
        return _plain_intervals(clean, meters, p, full=False)
    return interval_consumption(clean, meters, exchanges, p, cleaned=True).select(
        "meter_id", "ts", "volume", "quality", "prev_ts", "interval_s"
    )


def _capacities(
    r: pl.DataFrame, meters: pl.DataFrame | None, params: ConsumptionParams
) -> float | pl.Series:
    """Register capacity per row of clean reads ``r``, or one number when all meters share it."""
    default_cap = 10.0**params.default_register_digits
    caps = register_capacity(meters, params).with_columns(pl.col("capacity").fill_null(default_cap))
    if caps.get_column("capacity").is_in([default_cap]).all():
        return default_cap
    blocks, heads = meter_blocks(r)
    small = heads.join(caps, on="meter_id", how="left", maintain_order="left")
    return small.get_column("capacity").fill_null(default_cap).gather(blocks)


def _plain_intervals(
    r: pl.DataFrame, meters: pl.DataFrame | None, params: ConsumptionParams, *, full: bool = True
) -> pl.DataFrame:
    """Intervals of clean reads when no exchange is recorded: each read with the one before it.

    The read before is the same frame one row up (zero-copy slices), and the only full-size
    copies are the columns of the result, each filtered on its own to drop the meters' first
    reads: a filter of the paired frame would copy every column at once, the previous register
    (needed for the volume only) included. (Eager on purpose: the lazy engine returns the frame
    in dozens of chunks, which makes every later shift and gather slower.) ``full=False`` gives
    the :func:`interval_volumes` columns only.
    """
    cap_all = _capacities(r, meters, params)
    n = max(r.height - 1, 0)
    cur, prev = r.slice(1, n), r.slice(0, n)
    same_meter = cur.get_column("meter_id") == prev.get_column("meter_id")

    def kept(column: pl.Series) -> pl.Series:
        return column.filter(same_meter)

    registers = [kept(cur.get_column("register")), kept(prev.get_column("register"))]
    if isinstance(cap_all, pl.Series):
        registers.append(kept(cap_all.slice(1, n)).alias("_cap"))
        cap: pl.Expr = pl.col("_cap")
    else:
        cap = pl.lit(cap_all)
    plain = pl.col("register") - pl.col("_prev_register")
    wrapped = [_unwrap(plain, cap, params).alias("volume")]
    if full:
        wrapped += [_is_wrap(plain, cap, params).alias("rollover"), pl.col("register")]
    volumes = pl.DataFrame(
        [registers[0], registers[1].alias("_prev_register"), *registers[2:]]
    ).select(wrapped)
    del registers
    times = pl.DataFrame(
        [
            kept(cur.get_column("meter_id")),
            kept(cur.get_column("ts")),
            kept(prev.get_column("ts")).alias("prev_ts"),
        ]
    )
    interval_s = (pl.col("ts") - pl.col("prev_ts")).dt.total_seconds(fractional=True)
    quality = kept(cur.get_column("quality"))
    if not full:
        return times.select(
            "meter_id",
            "ts",
            volumes.get_column("volume"),
            quality,
            "prev_ts",
            interval_s.alias("interval_s"),
        )
    return times.select(
        "meter_id",
        "ts",
        volumes.get_column("volume"),
        quality,
        pl.lit(FLAG_ACTUAL).alias("flag"),
        pl.lit(None, dtype=pl.String).alias("method"),
        "prev_ts",
        interval_s.alias("interval_s"),
        volumes.get_column("register"),
        volumes.get_column("rollover"),
        pl.lit(False).alias("exchange"),
    ).cast(CONSUMPTION)  # type: ignore[arg-type]


def _intervals_across_exchanges(
    r: pl.DataFrame, ex: pl.DataFrame, p: ConsumptionParams
) -> pl.DataFrame:
    """Intervals of clean reads (with ``capacity``) when exchanges are recorded."""
    same_meter = pl.col("meter_id") == pl.col("meter_id").shift(1)

    def prev(name: str) -> pl.Expr:
        return pl.when(same_meter).then(pl.col(name).shift(1))

    # Each read learns the last exchange at or before it (its register belongs to that meter).
    r = r.join_asof(
        ex.select("meter_id", "exchanged_at", "new_register_start", "ex_n", "ex_offset"),
        left_on="ts",
        right_on="exchanged_at",
        by="meter_id",
        strategy="backward",
        check_sortedness=False,
    ).with_columns(pl.col("ex_n").fill_null(0), pl.col("ex_offset").fill_null(0.0))
    r = r.with_columns(
        prev_ts=prev("ts"),
        prev_register=prev("register"),
        prev_ex_n=prev("ex_n"),
        prev_ex_offset=prev("ex_offset"),
    ).filter(pl.col("prev_ts").is_not_null())
    # The first exchange inside (prev_ts, ts] gives the old register's final value.
    first_ex = ex.select(
        "meter_id",
        (pl.col("ex_n") - 1).alias("prev_ex_n"),
        pl.col("old_register_final").alias("first_old_final"),
    )
    r = r.join(first_ex, on=["meter_id", "prev_ex_n"], how="left", maintain_order="left")

    crossed = pl.col("ex_n") > pl.col("prev_ex_n")
    cap = pl.col("capacity")
    plain = pl.col("register") - pl.col("prev_register")
    head = pl.col("first_old_final") - pl.col("prev_register")
    tail = pl.col("register") - pl.col("new_register_start")
    # Between the first and last exchange of the interval: Σ(old_final − new_start) minus the parts
    # already counted in head and tail (zero when a single exchange was crossed).
    middle = (pl.col("ex_offset") - pl.col("prev_ex_offset")) - (
        pl.col("first_old_final") - pl.col("new_register_start")
    )
    volume = (
        pl.when(crossed)
        .then(_unwrap(head, cap, p) + middle + _unwrap(tail, cap, p))
        .otherwise(_unwrap(plain, cap, p))
    )
    rollover = (
        pl.when(crossed)
        .then(_is_wrap(head, cap, p) | _is_wrap(tail, cap, p))
        .otherwise(_is_wrap(plain, cap, p))
    )
    return r.select(
        "meter_id",
        "ts",
        volume.alias("volume"),
        "quality",
        pl.lit(FLAG_ACTUAL).alias("flag"),
        pl.lit(None, dtype=pl.String).alias("method"),
        "prev_ts",
        (pl.col("ts") - pl.col("prev_ts")).dt.total_seconds(fractional=True).alias("interval_s"),
        "register",
        rollover.alias("rollover"),
        crossed.alias("exchange"),
    ).cast(CONSUMPTION)  # type: ignore[arg-type]


# --- local time -----------------------------------------------------------------------------------


def meter_timezones(
    meters: pl.DataFrame, dmas: pl.DataFrame | None = None, default: str = "UTC"
) -> pl.DataFrame:
    """(meter_id, timezone): the meter's own ``timezone`` column, else its DMA's, else default.

    The IANA zone of the DMA decides night windows, weekday profiles and billing days.
    """
    m = meters.select(
        pl.col("meter_id").cast(pl.String),
        (pl.col("timezone") if "timezone" in meters.columns else pl.lit(None))
        .cast(pl.String)
        .alias("tz_own"),
        (pl.col("dma_id") if "dma_id" in meters.columns else pl.lit(None))
        .cast(pl.String)
        .alias("dma_id"),
    )
    if dmas is not None and {"dma_id", "timezone"} <= set(dmas.columns):
        m = m.join(
            dmas.select(
                pl.col("dma_id").cast(pl.String), pl.col("timezone").cast(pl.String).alias("tz_dma")
            ).unique(subset="dma_id", keep="first"),
            on="dma_id",
            how="left",
            maintain_order="left",
        )
    else:
        m = m.with_columns(tz_dma=pl.lit(None, dtype=pl.String))
    return m.select(
        "meter_id",
        pl.coalesce("tz_own", "tz_dma", pl.lit(default)).alias("timezone"),
    ).unique(subset="meter_id", keep="first", maintain_order=True)


def _zones(frame: pl.DataFrame, tz_col: str) -> list[str]:
    zones = sorted(z for z in frame.get_column(tz_col).unique().to_list() if z is not None)
    for z in zones:
        try:
            zoneinfo.ZoneInfo(z)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown IANA time zone {z!r}") from exc
    return zones


def with_local_time(frame: pl.DataFrame, ts_col: str, tz_col: str, out_col: str) -> pl.DataFrame:
    """Add ``out_col``: the UTC instant ``ts_col`` as naive local wall time in zone ``tz_col``.

    Naive, because rows of different zones must share one column; wall time is what weekday,
    time-of-day and calendar-day logic needs (a DST day then simply has 92 or 100 quarter hours).
    """
    zones = _zones(frame, tz_col)
    naive = pl.Datetime("us")
    if not zones:
        return frame.with_columns(pl.lit(None, dtype=naive).alias(out_col))
    branches = [
        pl.when(pl.col(tz_col) == z).then(
            pl.col(ts_col).dt.convert_time_zone(z).dt.replace_time_zone(None)
        )
        for z in zones
    ]
    return frame.with_columns(pl.coalesce(branches).cast(naive).alias(out_col))


def with_meter_local_time(
    frame: pl.DataFrame,
    ts_col: str,
    timezones: pl.DataFrame,
    out_col: str,
    default: str = "UTC",
) -> pl.DataFrame:
    """``with_local_time`` for a frame keyed by ``meter_id``, zones given per meter.

    Most deployments have one zone: then no per-row zone column is built and joined (on tens of
    millions of intervals that join costs more than the conversion itself).
    """
    known = timezones.select("meter_id", pl.col("timezone").fill_null(default))
    zones = set(known.get_column("timezone").unique().to_list())
    covered = (
        frame.height == 0
        or frame.select(
            pl.col("meter_id").is_in(known.get_column("meter_id").implode()).all()
        ).item()
    )
    if not covered:
        zones.add(default)
    if len(zones) <= 1:
        zone = zones.pop() if zones else default
        _zones(pl.DataFrame({"timezone": [zone]}), "timezone")
        return frame.with_columns(
            pl.col(ts_col).dt.convert_time_zone(zone).dt.replace_time_zone(None).alias(out_col)
        )
    joined = frame.join(
        known.rename({"timezone": "_tz"}), on="meter_id", how="left", maintain_order="left"
    ).with_columns(pl.col("_tz").fill_null(default))
    return with_local_time(joined, ts_col, "_tz", out_col).drop("_tz")


def with_local_midnight_utc(
    frame: pl.DataFrame, date_col: str, tz_col: str, out_col: str
) -> pl.DataFrame:
    """Add ``out_col``: the UTC instant at which local calendar day ``date_col`` begins.

    Where a zone skips midnight (DST starting at 00:00, e.g. America/Santiago) the day begins at
    the first existing instant, one hour later; an ambiguous midnight takes the earlier instant.
    """
    zones = _zones(frame, tz_col)
    if not zones:
        return frame.with_columns(pl.lit(None, dtype=UTC_TS).alias(out_col))
    midnight = pl.col(date_col).cast(pl.Datetime("us"))

    def to_utc(local: pl.Expr, z: str) -> pl.Expr:
        return (
            local.dt.replace_time_zone(z, ambiguous="earliest", non_existent="null")
            .dt.convert_time_zone("UTC")
            .cast(UTC_TS)
        )

    branches = [
        pl.when(pl.col(tz_col) == z).then(
            pl.coalesce(to_utc(midnight, z), to_utc(midnight + pl.duration(hours=1), z))
        )
        for z in zones
    ]
    return frame.with_columns(pl.coalesce(branches).alias(out_col))
