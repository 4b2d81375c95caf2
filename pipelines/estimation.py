"""Estimation: filling gaps of the 15-minute interval series (the first E of VEE).

A gap is an interval longer than the reporting interval: the reads inside it are missing, but the
reads that bound it are known, so the *total* volume across the gap is known exactly (register
difference, with rollover and exchange already accounted for in ``pipelines.consumption``). What is
estimated is only how that total is spread over the missing quarter hours, and every method here
reconciles exactly to the bounding reads: the estimated intervals of a gap sum to the gap's volume.

Method codes (column ``method``, with flag ``E``):

========= ==========================================================================================
LINEAR    gap up to ``linear_max_gap_s`` (2 h): linear interpolation of the register between the
          two bounding reads, i.e. volume proportional to each slot's duration.
PROFILE   longer gap: the meter's own mean volume per (local weekday, local quarter hour) over the
          history given, scaled so the slots sum to the gap volume. A public holiday of the
          meter's DMA counts as a Sunday, in the history and in the gap: a holiday's water use
          looks like a Sunday's, not like the weekday it falls on.
FLAT      longer gap without a usable profile (a slot never observed, or a profile that is zero
          across the whole gap while the register moved): spread evenly over time, as LINEAR.
========= ==========================================================================================

Nothing is invented outside known reads: time after a meter's last read (or before its first)
has no bounding read and is reported in ``unestimable`` instead of filled; so is an interval that
validation FAILED (its reads contradict each other, only a manual edit can settle it).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import polars as pl

from pipelines.consumption import (
    FLAG_ACTUAL,
    FLAG_ESTIMATED,
    meter_timezones,
    sort_by_meter_time,
    with_meter_local_time,
)
from pipelines.schemas import INTERVALS, UTC_TS
from protocols.uplink import Quality

METHOD_LINEAR = "LINEAR"
METHOD_PROFILE = "PROFILE"
METHOD_FLAT = "FLAT"
METHODS = (METHOD_LINEAR, METHOD_PROFILE, METHOD_FLAT)

# The complete interval series: INTERVALS plus each slot's start and length (billing pro-rates a
# slot cut by a period boundary) and the validation status of the read that closes it.
SERIES = {
    **INTERVALS,
    "prev_ts": UTC_TS,
    "interval_s": pl.Float64,
    "vee_status": pl.String,
}

UNESTIMABLE = {
    "meter_id": pl.String,
    "gap_start": UTC_TS,
    "gap_end": UTC_TS,
    "intervals": pl.Int64,
    # NO_CLOSING_READ: after the last read up to ``until``; NO_OPENING_READ: from ``since`` to
    # the first read; NO_READS: a meter of ``meters`` with fewer than two reads (no interval);
    # VALIDATION_FAILED: an interval whose bounding reads contradict each other.
    "reason": pl.String,
}

NO_CLOSING_READ = "NO_CLOSING_READ"
NO_OPENING_READ = "NO_OPENING_READ"
NO_READS = "NO_READS"
VALIDATION_FAILED = "VALIDATION_FAILED"


@dataclass(frozen=True, slots=True)
class EstimationParams:
    """How gaps are filled.

    Attributes:
        interval_s: the reporting interval the series is rebuilt on (15 minutes).
        gap_tolerance_s: an interval up to this much longer than ``interval_s`` is a late read,
            not a gap (the late seconds stay in that interval).
        linear_max_gap_s: gaps up to this length (time between the bounding reads) are LINEAR;
            longer gaps use the profile. 2 h = eight 15-minute intervals.
        profile_min_samples: observations a (weekday, quarter hour) cell needs before the profile
            is trusted for it; a gap touching a cell with fewer falls back to FLAT.
        default_timezone: zone for weekday/time-of-day when a meter has none (meters' own
            ``timezone`` column, else its DMA's).
    """

    interval_s: int = 900
    gap_tolerance_s: int = 60
    linear_max_gap_s: int = 7200
    profile_min_samples: int = 1
    default_timezone: str = "UTC"

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or 86400 % self.interval_s:
            raise ValueError("interval_s must be a positive divisor of a day")
        if self.profile_min_samples < 1:
            raise ValueError("profile_min_samples must be >= 1")


@dataclass(frozen=True, slots=True)
class EstimationResult:
    """The filled series (``SERIES``) and the spans that could not be filled (``UNESTIMABLE``)."""

    intervals: pl.DataFrame
    unestimable: pl.DataFrame


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _series(frame: pl.DataFrame) -> pl.DataFrame:
    """Any interval frame with ``prev_ts`` or ``interval_s`` (or both), projected on SERIES."""
    cols = frame.columns
    if "prev_ts" not in cols and "interval_s" not in cols:
        raise ValueError("intervals need prev_ts or interval_s (see pipelines.consumption)")
    if "interval_s" not in cols:
        frame = frame.with_columns(
            interval_s=(pl.col("ts") - pl.col("prev_ts")).dt.total_seconds(fractional=True)
        )
    if "vee_status" not in cols:
        frame = frame.with_columns(vee_status=pl.lit(None, dtype=pl.String))
    if "prev_ts" not in cols:
        frame = frame.with_columns(
            prev_ts=pl.col("ts")
            - pl.duration(microseconds=(pl.col("interval_s") * 1e6).cast(pl.Int64))
        )
    return frame.select(list(SERIES)).cast(SERIES)  # type: ignore[arg-type]


_US_PER_DAY = 86_400_000_000
_ORDER_SPAN = 1 << 24  # more slots than any gap can have (a gap of 476 years at 15 minutes)


def meter_holidays(meters: pl.DataFrame | None, dmas: pl.DataFrame | None) -> pl.DataFrame:
    """(meter_id, day): each meter's DMA's public holidays as days since 1970-01-01, from the
    ``holidays`` list column a DMA frame may carry (``flows.load.load_dmas`` adds it from the
    registry's calendars). Empty when either frame lacks what it needs."""
    empty = pl.DataFrame(schema={"meter_id": pl.String, "day": pl.Int64})
    if (
        meters is None
        or dmas is None
        or "dma_id" not in meters.columns
        or not {"dma_id", "holidays"} <= set(dmas.columns)
    ):
        return empty
    days = (
        dmas.select(pl.col("dma_id").cast(pl.String), pl.col("holidays").cast(pl.List(pl.Date)))
        .explode("holidays")
        .drop_nulls()
        .select("dma_id", day=pl.col("holidays").cast(pl.Int32).cast(pl.Int64))
        .unique()
    )
    if days.height == 0:
        return empty
    return (
        meters.select(pl.col("meter_id").cast(pl.String), pl.col("dma_id").cast(pl.String))
        .unique()
        .join(days, on="dma_id")
        .select("meter_id", "day")
    )


def _local_slot(
    frame: pl.DataFrame,
    start_col: str,
    timezones: pl.DataFrame,
    p: EstimationParams,
    holidays: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Add local ``weekday`` (1 = Monday, 7 = Sunday or a holiday of ``holidays``: meter_id,
    day) and quarter-hour ``slot`` of the slot starting at ``start_col``, by integer arithmetic
    on local microseconds (calendar field extraction costs several times more on tens of
    millions of rows). Row order is kept."""
    local = with_meter_local_time(frame, start_col, timezones, "_local", p.default_timezone)
    us = pl.col("_local").cast(pl.Int64)
    day = us // _US_PER_DAY  # days since 1970-01-01, a Thursday
    second_of_day = (us - day * _US_PER_DAY) // 1_000_000
    out = local.with_columns(
        weekday=((day + 3) % 7 + 1).cast(pl.Int8),
        slot=(second_of_day // p.interval_s).cast(pl.Int32),
    )
    if holidays is not None and holidays.height:
        out = (
            out.with_columns(day.alias("_day"))
            .join(
                holidays.select("meter_id", pl.col("day").alias("_day"), _hol=pl.lit(True)),
                on=["meter_id", "_day"],
                how="left",
                maintain_order="left",
            )
            .with_columns(
                weekday=pl.when(pl.col("_hol")).then(pl.lit(7, pl.Int8)).otherwise("weekday")
            )
            .drop("_day", "_hol")
        )
    return out.drop("_local")


def weekday_profile(
    intervals: pl.DataFrame,
    timezones: pl.DataFrame,
    params: EstimationParams | None = None,
    holidays: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Mean actual volume per (meter, local weekday, local quarter hour), with sample counts;
    a holiday in ``holidays`` (meter_id, day: see :func:`meter_holidays`) counts as a Sunday.

    Only actual, regular intervals count: estimated or edited values would feed the profile with
    itself, and a long interval's volume belongs to many quarter hours. The means are two
    ``numpy.bincount`` passes over a dense (meter, weekday, slot) index instead of a hash group-by.
    """
    p = params or EstimationParams()
    step = p.interval_s
    per_day = 86400 // step
    cells = 7 * per_day
    regular = sort_by_meter_time(
        intervals.filter(
            (pl.col("flag") == FLAG_ACTUAL)
            & pl.col("volume").is_not_null()
            & (pl.col("interval_s") <= step + p.gap_tolerance_s)
        ).select("meter_id", "ts", "prev_ts", "volume")
    )
    schema = {
        "meter_id": pl.String,
        "weekday": pl.Int8,
        "slot": pl.Int32,
        "profile_m3": pl.Float64,
        "samples": pl.Int64,
    }
    if regular.height == 0:
        return pl.DataFrame(schema=schema)
    keyed = _local_slot(regular, "prev_ts", timezones, p, holidays).select(
        "meter_id",
        pl.col("meter_id").rle_id().cast(pl.Int64).alias("run"),
        ((pl.col("weekday").cast(pl.Int64) - 1) * per_day + pl.col("slot")).alias("cell"),
        "volume",
    )
    runs = keyed.filter(pl.col("run") != pl.col("run").shift(1).fill_null(-1)).get_column(
        "meter_id"
    )
    key = (keyed.get_column("run") * cells + keyed.get_column("cell")).to_numpy()
    size = runs.len() * cells
    sums = np.bincount(key, weights=keyed.get_column("volume").to_numpy(), minlength=size)
    counts = np.bincount(key, minlength=size)
    hit = np.flatnonzero(counts)
    cell = hit % cells
    return pl.DataFrame(
        {
            "meter_id": runs.gather(hit // cells),
            "weekday": cell // per_day + 1,
            "slot": cell % per_day,
            "profile_m3": sums[hit] / counts[hit],
            "samples": counts[hit],
        }
    ).cast(schema)  # type: ignore[arg-type]


def estimate(
    intervals: pl.DataFrame,
    meters: pl.DataFrame | None = None,
    *,
    dmas: pl.DataFrame | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    params: EstimationParams | None = None,
) -> EstimationResult:
    """Fill the gaps of a validated interval series (``pipelines.vee.validated_intervals``).

    Regular intervals pass through unchanged. Each gap interval (prev_ts, ts] with known volume V is
    replaced by n = round(length / interval_s) slots ending at prev_ts + k·interval_s (the last
    ends at ts, so a few seconds of jitter stay in it), flag E, with volumes that sum to V.
    ``since``/``until`` bound the period of interest: spans between them and a meter's first/last
    read are reported as unestimable, never filled.
    """
    p = params or EstimationParams()
    step = p.interval_s
    iv = sort_by_meter_time(_series(intervals))
    is_gap = (pl.col("interval_s") > step + p.gap_tolerance_s) & pl.col("volume").is_not_null()

    # Each slot's place in the output is (position of the interval it came from, k): both parts
    # stay ordered by it, so they are merged in one pass instead of re-sorted on (meter_id, ts).
    iv = iv.with_row_index("_pos").with_columns(_order=pl.col("_pos").cast(pl.Int64) * _ORDER_SPAN)
    keep = iv.filter(~is_gap)
    gaps = iv.filter(is_gap).with_row_index("gap_id")

    slots = (
        gaps.with_columns(
            n=(pl.col("interval_s") / step).round(0).cast(pl.Int64).clip(lower_bound=1),
            linear=pl.col("interval_s") <= p.linear_max_gap_s,
        )
        .with_columns(k=pl.int_ranges(1, pl.col("n") + 1))
        .explode("k")
        .with_columns(
            slot_prev=pl.col("prev_ts") + pl.duration(seconds=(pl.col("k") - 1) * step),
            slot_ts=pl.when(pl.col("k") == pl.col("n"))
            .then(pl.col("ts"))
            .otherwise(pl.col("prev_ts") + pl.duration(seconds=pl.col("k") * step)),
        )
        .with_columns(
            slot_s=(pl.col("slot_ts") - pl.col("slot_prev")).dt.total_seconds(fractional=True)
        )
    )

    # Profile weights, only for meters that have a long gap (the profile is the costly part).
    long_slots = slots.filter(~pl.col("linear"))
    if long_slots.height:
        tz = (
            meter_timezones(meters, dmas, p.default_timezone)
            if meters is not None
            else pl.DataFrame(schema={"meter_id": pl.String, "timezone": pl.String})
        )
        history = iv.join(long_slots.select("meter_id").unique(), on="meter_id", how="semi")
        hol = meter_holidays(meters, dmas)
        profile = weekday_profile(history, tz, p, hol)
        located = _local_slot(long_slots, "slot_prev", tz, p, hol).join(
            profile, on=["meter_id", "weekday", "slot"], how="left"
        )
        cell_ok = pl.col("samples").fill_null(0) >= p.profile_min_samples
        shaped = pl.col("profile_m3").fill_null(0.0).clip(lower_bound=0.0) * pl.col("slot_s") / step
        located = located.with_columns(shape=shaped).with_columns(
            usable=(cell_ok.all() & (pl.col("shape").sum() > 0)).over("gap_id")
        )
        weights = located.select(
            "gap_id",
            "k",
            pl.when("usable").then(pl.col("shape")).otherwise(pl.col("slot_s")).alias("w"),
            pl.when("usable")
            .then(pl.lit(METHOD_PROFILE))
            .otherwise(pl.lit(METHOD_FLAT))
            .alias("est_method"),
        )
        slots = slots.join(weights, on=["gap_id", "k"], how="left", maintain_order="left")
    else:
        slots = slots.with_columns(
            w=pl.lit(None, dtype=pl.Float64), est_method=pl.lit(None, dtype=pl.String)
        )

    slots = (
        slots.with_columns(
            w=pl.when("linear").then(pl.col("slot_s")).otherwise(pl.col("w")),
            est_method=pl.when("linear")
            .then(pl.lit(METHOD_LINEAR))
            .otherwise(pl.col("est_method")),
        )
        .sort("gap_id", "k")
        .with_columns(cw=pl.col("w").cum_sum().over("gap_id"))
        # Cumulative share of the gap volume reaches exactly 1 at the last slot, so the slots
        # telescope to V: the estimate reconciles with the bounding reads.
        .with_columns(cv=pl.col("volume") * pl.col("cw") / pl.col("cw").last().over("gap_id"))
        .with_columns(slot_v=pl.col("cv") - pl.col("cv").shift(1).over("gap_id").fill_null(0.0))
    )
    est_bit = int(Quality.ESTIMATED)
    filled = slots.select(
        "meter_id",
        pl.col("slot_ts").alias("ts"),
        pl.col("slot_v").alias("volume"),
        pl.when(pl.col("k") == pl.col("n"))
        .then(pl.col("quality").cast(pl.Int32) | est_bit)
        .otherwise(pl.lit(est_bit))
        .cast(pl.Int16)
        .alias("quality"),
        pl.lit(FLAG_ESTIMATED).alias("flag"),
        pl.col("est_method").alias("method"),
        pl.col("slot_prev").alias("prev_ts"),
        pl.col("slot_s").alias("interval_s"),
        "vee_status",
        (pl.col("_order") + pl.col("k")).alias("_order"),
    )
    columns = [*SERIES, "_order"]
    series = (
        keep.select(columns)
        .merge_sorted(filled.cast(SERIES).select(columns), key="_order")  # type: ignore[arg-type]
        .drop("_order")
    )
    return EstimationResult(series, _unestimable(iv, meters, since, until, p))


def _unestimable(
    iv: pl.DataFrame,
    meters: pl.DataFrame | None,
    since: datetime | None,
    until: datetime | None,
    p: EstimationParams,
) -> pl.DataFrame:
    step = p.interval_s
    count = (pl.col("gap_end") - pl.col("gap_start")).dt.total_seconds(fractional=True) / step
    out = [
        iv.filter(pl.col("volume").is_null()).select(
            "meter_id",
            pl.col("prev_ts").alias("gap_start"),
            pl.col("ts").alias("gap_end"),
            pl.lit(0).alias("intervals"),
            pl.lit(VALIDATION_FAILED).alias("reason"),
        )
    ]
    if since is None and until is None:
        bounds = pl.DataFrame(
            schema={"meter_id": pl.String, "first_read": UTC_TS, "last_read": UTC_TS}
        )
    else:
        bounds = iv.group_by("meter_id").agg(
            pl.col("prev_ts").min().alias("first_read"), pl.col("ts").max().alias("last_read")
        )
    long = pl.col("seconds") > step + p.gap_tolerance_s
    if until is not None:
        end = pl.lit(_utc(until), dtype=UTC_TS)
        out.append(
            bounds.select(
                "meter_id",
                pl.col("last_read").alias("gap_start"),
                end.alias("gap_end"),
                pl.lit(0).alias("intervals"),
                pl.lit(NO_CLOSING_READ).alias("reason"),
                (end - pl.col("last_read")).dt.total_seconds(fractional=True).alias("seconds"),
            )
            .filter(long)
            .drop("seconds")
        )
    if since is not None:
        start = pl.lit(_utc(since), dtype=UTC_TS)
        out.append(
            bounds.select(
                "meter_id",
                start.alias("gap_start"),
                pl.col("first_read").alias("gap_end"),
                pl.lit(0).alias("intervals"),
                pl.lit(NO_OPENING_READ).alias("reason"),
                (pl.col("first_read") - start).dt.total_seconds(fractional=True).alias("seconds"),
            )
            .filter(long)
            .drop("seconds")
        )
    if since is not None and until is not None and meters is not None:
        silent = meters.select(pl.col("meter_id").cast(pl.String)).join(
            bounds, on="meter_id", how="anti"
        )
        out.append(
            silent.select(
                "meter_id",
                pl.lit(_utc(since), dtype=UTC_TS).alias("gap_start"),
                pl.lit(_utc(until), dtype=UTC_TS).alias("gap_end"),
                pl.lit(0).alias("intervals"),
                pl.lit(NO_READS).alias("reason"),
            )
        )
    return (
        pl.concat([f.cast(UNESTIMABLE) for f in out], how="vertical")  # type: ignore[arg-type]
        .with_columns(intervals=count.round(0).cast(pl.Int64))
        .filter(pl.col("gap_end") > pl.col("gap_start"))
        .sort("meter_id", "gap_start")
    )
