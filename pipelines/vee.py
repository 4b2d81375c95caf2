"""Validation of meter reads and intervals (the V of VEE), and the validated interval series.

Each rule failure is one row of ``VEE_FAILURES``: which meter, which read (``ts``), the rule code, a
number (``value``) and a human-readable detail. Rule codes:

==================== ====== =======================================================================
code                 hard   meaning (``value``)
==================== ====== =======================================================================
GAP                  no     intervals missing before the read at ``ts`` (count of missing reads);
                            a trailing gap up to ``as_of`` is reported at ``as_of``
DUPLICATE_TS         cond.  several reads at the same instant (count); hard only if they disagree
FUTURE_TS            yes    read later than ``as_of`` + tolerance (seconds ahead)
BEFORE_INSTALL       yes    read before the local install date (seconds before)
REGISTER_DECREASE    yes    negative interval volume, neither a rollover nor an exchange (m³);
                            soft when the closing read carries the vendor REVERSE_FLOW bit
OVER_Q4              yes    interval volume above Q4 × interval hours (m³)
ZERO_CONSUMPTION     no     zero volume for ≥ N days on an active account (days); at the run's end
SPIKE                no     volume above k × the meter's own trailing high percentile (m³ / 15 min)
STATUS_LEAK          no     vendor status bit LEAK (1) on the read (quality)
STATUS_REVERSE_FLOW  no     vendor status bit REVERSE_FLOW (2)
STATUS_TAMPER        no     vendor status bit TAMPER (4), magnetic interference included
STATUS_LOW_BATTERY   no     vendor status bit LOW_BATTERY (8)
==================== ====== =======================================================================

Hard failures mark the *read* at ``ts`` as unusable. Register data make this the only sound choice:
an interval volume is the difference of two reads, so a corrupt read damages both intervals next to
it, and "estimating" a bad interval between the same two reads would reproduce the bad value.
Dropping the read instead merges its two intervals into one gap bounded by good reads, which
estimation then fills so that it reconciles with those reads. A spike between two good reads is
really on the register, so SPIKE is soft by default: estimating it away would only move the same
volume to other quarter hours.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl

from pipelines.consumption import (
    CONSUMPTION,
    ConsumptionParams,
    clean_reads,
    interval_consumption,
    interval_volumes,
    meter_blocks,
    meter_slices,
    meter_timezones,
    repeated_keys,
    sort_by_meter_time,
    with_local_midnight_utc,
)
from pipelines.schemas import UTC_TS
from protocols.uplink import Quality

VEE_FAILURES = {
    "meter_id": pl.String,
    "ts": UTC_TS,
    "rule": pl.String,
    "hard": pl.Boolean,
    "value": pl.Float64,
    "detail": pl.String,
}

# Validated intervals: consumption plus the outcome of validation for the interval's closing read.
VALIDATED_INTERVALS = {
    **CONSUMPTION,
    "vee_status": pl.String,  # VALID | SUSPECT (soft rules only) | FAILED (volume set to null)
    "vee_rules": pl.List(pl.String),
}

GAP = "GAP"
DUPLICATE_TS = "DUPLICATE_TS"
FUTURE_TS = "FUTURE_TS"
BEFORE_INSTALL = "BEFORE_INSTALL"
REGISTER_DECREASE = "REGISTER_DECREASE"
OVER_Q4 = "OVER_Q4"
ZERO_CONSUMPTION = "ZERO_CONSUMPTION"
SPIKE = "SPIKE"
STATUS_RULES: dict[str, Quality] = {
    "STATUS_LEAK": Quality.LEAK,
    "STATUS_REVERSE_FLOW": Quality.REVERSE_FLOW,
    "STATUS_TAMPER": Quality.TAMPER,
    "STATUS_LOW_BATTERY": Quality.LOW_BATTERY,
}
RULES = (
    GAP,
    DUPLICATE_TS,
    FUTURE_TS,
    BEFORE_INSTALL,
    REGISTER_DECREASE,
    OVER_Q4,
    ZERO_CONSUMPTION,
    SPIKE,
    *STATUS_RULES,
)

STATUS_VALID = "VALID"
STATUS_SUSPECT = "SUSPECT"
STATUS_FAILED = "FAILED"


@dataclass(frozen=True, slots=True)
class VeeParams:
    """Thresholds of the validation rules.

    Attributes:
        interval_s: expected reporting interval (15-minute reads).
        gap_tolerance_s: lateness of a read that is clock jitter, not a missing interval.
        future_tolerance_s: how far past ``as_of`` a read may lie (clock skew of the device; the
            same 300 s the ingest path allows).
        decrease_tolerance_m3: negative volumes down to minus this are register jitter, not a
            decrease (0: any decrease counts).
        reverse_flag_explains_decrease: a decrease whose closing read carries the vendor's
            REVERSE_FLOW bit is water that really flowed back through the meter (the register
            counted backwards), not a corrupt read: it is reported but kept as a negative volume,
            so reverse-flow detection and the balances see it.
        q4_factor: multiplier on Q4 × interval hours before OVER_Q4 fires (1.0 = the ISO 4064
            maximum flow itself).
        q4_per_q3: Q4/Q3 used when a meter has Q3 but no Q4 (ISO 4064 / OIML R49: Q4 = 1.25 Q3).
        zero_days: length of a zero-consumption run on an active account that is reported.
        zero_tolerance_m3: volumes at or below this count as zero (register resolution).
        spike_k: a spike is above ``spike_k`` × the trailing percentile.
        spike_quantile: the trailing high percentile (0.95 = P95).
        spike_window: trailing window of the percentile (14 days), current interval excluded.
        spike_min_samples: intervals needed in the window before a percentile is trusted (one day
            of 15-minute intervals).
        spike_floor_m3: a spike must also exceed this volume per 15 minutes, so that a meter that
            is almost always idle (P95 ≈ 0) does not flag every shower (50 L per quarter hour).
        hard_rules: rules whose failing read is dropped from the validated series.
        consumption: rollover detection used when differencing reads.
    """

    interval_s: int = 900
    gap_tolerance_s: int = 60
    future_tolerance_s: float = 300.0
    decrease_tolerance_m3: float = 0.0
    reverse_flag_explains_decrease: bool = True
    q4_factor: float = 1.0
    q4_per_q3: float = 1.25
    zero_days: float = 7.0
    zero_tolerance_m3: float = 0.0
    spike_k: float = 5.0
    spike_quantile: float = 0.95
    spike_window: timedelta = timedelta(days=14)
    spike_min_samples: int = 96
    spike_floor_m3: float = 0.05
    hard_rules: frozenset[str] = frozenset(
        {DUPLICATE_TS, FUTURE_TS, BEFORE_INSTALL, REGISTER_DECREASE, OVER_Q4}
    )
    consumption: ConsumptionParams = field(default_factory=ConsumptionParams)

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ValueError("interval_s must be positive")
        if not 0.0 < self.spike_quantile < 1.0:
            raise ValueError("spike_quantile must be in (0, 1)")
        unknown = set(self.hard_rules) - set(RULES)
        if unknown:
            raise ValueError(f"unknown rule codes in hard_rules: {sorted(unknown)}")


def _reverse_flagged(p: VeeParams) -> pl.Expr:
    """The closing read says the water flowed back (when that is allowed to explain a decrease)."""
    if not p.reverse_flag_explains_decrease:
        return pl.lit(False)
    bit = int(Quality.REVERSE_FLOW)
    return ((pl.col("quality").cast(pl.Int32).fill_null(0) & bit) != 0).fill_null(False)


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _text(ts: pl.Expr) -> pl.Expr:
    return ts.dt.to_string("%Y-%m-%d %H:%M UTC")


def _rows(
    frame: pl.DataFrame, rule: str, hard: bool | pl.Expr, value: pl.Expr, detail: pl.Expr
) -> pl.DataFrame:
    """Shape one rule's hits as VEE_FAILURES rows.

    The hits are rechunked first: ``pl.format`` on a float column split in chunks panics in
    polars 2.1 (``assertion failed: i < self.len()``), and a filter of a chunked frame gives one.
    """
    return frame.rechunk().select(
        "meter_id",
        "ts",
        pl.lit(rule).alias("rule"),
        (hard if isinstance(hard, pl.Expr) else pl.lit(hard)).alias("hard"),
        value.cast(pl.Float64).alias("value"),
        detail.alias("detail"),
    )


def _meter_attributes(meters: pl.DataFrame | None, params: VeeParams) -> pl.DataFrame:
    """Per meter: Q4 (or 1.25·Q3), install date and whether its account is active."""
    schema = {
        "meter_id": pl.String,
        "q4_eff": pl.Float64,
        "install_date": pl.Date,
        "active_account": pl.Boolean,
    }
    if meters is None:
        return pl.DataFrame(schema=schema)
    cols = meters.columns

    def col(name: str, dtype: pl.DataType | type[pl.DataType]) -> pl.Expr:
        return (pl.col(name) if name in cols else pl.lit(None)).cast(dtype)

    has_account = (
        col("account", pl.String).is_not_null()
        & (col("account", pl.String).str.strip_chars() != "")
        if "account" in cols
        else pl.lit(True)
    )
    active = col("active", pl.Boolean).fill_null(True) if "active" in cols else pl.lit(True)
    return meters.select(
        pl.col("meter_id").cast(pl.String),
        pl.coalesce(col("q4", pl.Float64), col("q3", pl.Float64) * params.q4_per_q3).alias(
            "q4_eff"
        ),
        col("install_date", pl.Date).alias("install_date"),
        (has_account & active).alias("active_account"),
    ).unique(subset="meter_id", keep="first", maintain_order=True)


def _per_row(blocks: pl.Series, heads: pl.DataFrame, table: pl.DataFrame, column: str) -> pl.Series:
    """``column`` of ``table`` (one row per ``meter_id``) for each row of a frame grouped by meter,
    given the frame's :func:`~pipelines.consumption.meter_blocks`."""
    small = heads.join(
        table.select("meter_id", column), on="meter_id", how="left", maintain_order="left"
    )
    return small.get_column(column).gather(blocks)


def _positions(
    frame: pl.DataFrame,
    keys: pl.DataFrame,
    blocks: tuple[pl.Series, pl.DataFrame] | None = None,
) -> pl.DataFrame:
    """Row positions in ``frame`` (sorted by meter and time, one row per key) of the
    ``(meter_id, ts)`` rows of ``keys`` that it holds: ``_row`` (frame) and ``_key_row`` (keys).

    Each row gets the number ``block × span + ts`` (span longer than all times), increasing down
    the frame, so a binary search finds the few keys instead of a hash join over all rows.
    ``blocks`` is the frame's :func:`~pipelines.consumption.meter_blocks` when already known.
    """
    empty = pl.DataFrame(schema={"_row": pl.UInt32, "_key_row": pl.UInt32})
    if frame.height == 0 or keys.height == 0:
        return empty
    b, heads = blocks if blocks is not None else meter_blocks(frame)
    us = frame.get_column("ts").dt.epoch("us")
    lo, hi = us.min(), us.max()
    assert isinstance(lo, int) and isinstance(hi, int)
    span = hi - lo + 1
    numbered = b.cast(pl.Int64) * span + (us - lo)
    step = numbered.diff().min()
    if isinstance(step, int) and step <= 0:
        raise ValueError("frame must be sorted by meter_id and ts with one row per key")
    wanted = (
        keys.select(
            pl.int_range(pl.len(), dtype=pl.UInt32).alias("_key_row"),
            pl.col("meter_id").cast(pl.String),
            pl.col("ts").cast(UTC_TS).dt.epoch("us").alias("_us"),
        )
        .filter(pl.col("_us").is_between(lo, hi))
        .join(heads, on="meter_id", how="inner")
        .with_columns(_n=pl.col("_b").cast(pl.Int64) * span + (pl.col("_us") - lo))
    )
    if wanted.height == 0:
        return empty
    found = numbered.search_sorted(wanted.get_column("_n"), side="left")
    at = found.clip(upper_bound=frame.height - 1)
    hit = (found < frame.height) & (numbered.gather(at) == wanted.get_column("_n"))
    return pl.DataFrame(
        {"_row": at.cast(pl.UInt32), "_key_row": wanted.get_column("_key_row")}
    ).filter(hit)


def _read_rules(
    reads: pl.DataFrame,
    meters: pl.DataFrame | None,
    dmas: pl.DataFrame | None,
    as_of: datetime,
    p: VeeParams,
) -> tuple[pl.DataFrame, pl.DataFrame, pl.Series]:
    """Rules that judge a single read: duplicates, future, before install, status bits.

    Returns the failures, the reads with keys sorted by meter and time, and which of those repeat
    the key of the row before (the reads without them are what the later steps start from). The
    rules filter the few rows they report straight from the sorted reads with that flag, so no
    copy of all reads is made here.
    """
    r = reads.select(
        pl.col("meter_id").cast(pl.String),
        pl.col("ts").cast(UTC_TS),
        pl.col("register").cast(pl.Float64),
        pl.col("quality").cast(pl.Int16).fill_null(0),
    ).filter(pl.col("meter_id").is_not_null() & pl.col("ts").is_not_null())
    r = sort_by_meter_time(r)
    flags = repeated_keys(r)
    keyed = r.with_columns(flags)
    repeat = pl.col("_repeat")
    out: list[pl.DataFrame] = []

    # Duplicates are adjacent after the sort: only those few rows are grouped.
    dup = (
        keyed.filter(repeat | repeat.shift(-1).fill_null(False))
        .group_by("meter_id", "ts")
        .agg(
            pl.len().alias("n"),
            pl.col("register").n_unique().alias("distinct"),
            pl.col("register").min().alias("lo"),
            pl.col("register").max().alias("hi"),
        )
    )
    conflicting = pl.col("distinct") > 1
    out.append(
        _rows(
            dup,
            DUPLICATE_TS,
            conflicting & pl.lit(DUPLICATE_TS in p.hard_rules),
            pl.col("n"),
            pl.format("{} reads at the same instant, registers {}..{}", "n", "lo", "hi"),
        )
    )

    limit = _utc(as_of) + timedelta(seconds=p.future_tolerance_s)
    future = keyed.filter(~repeat & (pl.col("ts") > pl.lit(limit, dtype=UTC_TS)))
    out.append(
        _rows(
            future,
            FUTURE_TS,
            FUTURE_TS in p.hard_rules,
            (pl.col("ts") - pl.lit(_utc(as_of), dtype=UTC_TS)).dt.total_seconds(fractional=True),
            pl.format("read is after as_of {}", pl.lit(_utc(as_of).isoformat())),
        )
    )

    attrs = _meter_attributes(meters, p).filter(pl.col("install_date").is_not_null())
    if attrs.height and meters is not None:
        tz = meter_timezones(meters, dmas)
        installs = with_local_midnight_utc(
            attrs.join(tz, on="meter_id", how="left"), "install_date", "timezone", "install_utc"
        ).select("meter_id", "install_date", "install_utc")
        # Only reads before the latest install instant can be early: the join then sees those few.
        latest = installs.get_column("install_utc").max()
        early = (
            keyed.filter(~repeat & (pl.col("ts") < pl.lit(latest, dtype=UTC_TS)))
            .join(installs, on="meter_id", how="inner")
            .filter(pl.col("ts") < pl.col("install_utc"))
        )
        out.append(
            _rows(
                early,
                BEFORE_INSTALL,
                BEFORE_INSTALL in p.hard_rules,
                (pl.col("install_utc") - pl.col("ts")).dt.total_seconds(fractional=True),
                pl.format("read before install date {}", "install_date"),
            )
        )

    # One pass over all reads for any status bit, then one filter per bit on the few flagged.
    any_bit = sum(int(bit) for bit in STATUS_RULES.values())
    flagged = keyed.filter(~repeat & ((pl.col("quality").cast(pl.Int32) & any_bit) != 0))
    for rule, bit in STATUS_RULES.items():
        hit = flagged.filter((pl.col("quality").cast(pl.Int32) & int(bit)) != 0)
        out.append(
            _rows(
                hit,
                rule,
                rule in p.hard_rules,
                pl.col("quality"),
                pl.lit(f"vendor status bit {bit.name} set"),
            )
        )
    return pl.concat(out, how="vertical"), r, flags


def _interval_rules(
    iv: pl.DataFrame,
    usable: pl.DataFrame,
    meters: pl.DataFrame | None,
    as_of: datetime | None,
    p: VeeParams,
) -> pl.DataFrame:
    """Rules that judge an interval (two consecutive reads), reported at the closing read.

    ``iv`` is sorted by meter and time (it comes from clean reads): per-meter attributes are
    spread to its rows by block position, and only the columns a rule needs are added, to the
    rows it looks at.
    """
    step = float(p.interval_s)
    blocks, heads = meter_blocks(iv)
    attrs = _meter_attributes(meters, p)
    out: list[pl.DataFrame] = []

    missing = (pl.col("interval_s") / step).round(0) - 1
    gaps = iv.filter(pl.col("interval_s") > step + p.gap_tolerance_s)
    out.append(
        _rows(
            gaps,
            GAP,
            GAP in p.hard_rules,
            missing.clip(lower_bound=1),
            pl.format(
                "{} missing interval(s), {} h without reads since {}",
                missing.clip(lower_bound=1).cast(pl.Int64),
                (pl.col("interval_s") / 3600).round(2),
                _text(pl.col("prev_ts")),
            ),
        )
    )
    if as_of is not None:
        # ``usable`` is sorted by meter and time: a meter's last read is the last row of its block.
        lengths = usable.get_column("meter_id").rle().struct.field("len").to_numpy()
        last = usable.select("meter_id", pl.col("ts").alias("last_ts"))[np.cumsum(lengths) - 1]
        open_s = (pl.lit(_utc(as_of), dtype=UTC_TS) - pl.col("last_ts")).dt.total_seconds(
            fractional=True
        )
        trailing = last.filter(open_s > step + p.gap_tolerance_s).with_columns(
            ts=pl.lit(_utc(as_of), dtype=UTC_TS)
        )
        out.append(
            _rows(
                trailing,
                GAP,
                GAP in p.hard_rules,
                (open_s / step).floor(),
                pl.format(
                    "open gap: no read since {} ({} h to as_of)",
                    _text(pl.col("last_ts")),
                    (open_s / 3600).round(2),
                ),
            )
        )

    decrease = iv.filter(pl.col("volume") < -p.decrease_tolerance_m3)
    out.append(
        _rows(
            decrease,
            REGISTER_DECREASE,
            pl.lit(REGISTER_DECREASE in p.hard_rules) & ~_reverse_flagged(p),
            pl.col("volume"),
            pl.format("register fell by {} m³ (not a rollover)", -pl.col("volume")),
        )
    )

    q4_limit = pl.col("q4_eff") * pl.col("interval_s") / 3600 * p.q4_factor
    over = iv.select(
        "meter_id", "ts", "volume", "interval_s", _per_row(blocks, heads, attrs, "q4_eff")
    ).filter(pl.col("volume") > q4_limit)
    out.append(
        _rows(
            over,
            OVER_Q4,
            OVER_Q4 in p.hard_rules,
            pl.col("volume"),
            pl.format("{} m³ above Q4 limit {} m³", pl.col("volume"), q4_limit.round(6)),
        )
    )

    out.append(_zero_runs(iv, blocks, _per_row(blocks, heads, attrs, "active_account"), p))
    out.append(_spikes(iv, blocks, p))
    return pl.concat(out, how="vertical")


def _zero_runs(
    iv: pl.DataFrame, blocks: pl.Series, active: pl.Series, p: VeeParams
) -> pl.DataFrame:
    """One row per run of zero intervals lasting ≥ zero_days on an active account.

    ``blocks`` numbers the meters of ``iv`` (sorted by meter and time); ``active`` says per row
    whether the meter's account is active (null: active).
    """
    volume = iv.get_column("volume").to_numpy()
    with np.errstate(invalid="ignore"):
        zero = np.abs(volume) <= p.zero_tolerance_m3  # a null volume (NaN here) is not zero
    # The account flag is the same on all rows of a meter, so the runs of zero intervals on active
    # accounts are the runs of this one flag within a meter.
    on = zero & active.fill_null(True).to_numpy()
    b = blocks.to_numpy()
    same = np.empty(b.size, dtype=bool)
    same[:1] = False
    np.equal(b[1:], b[:-1], out=same[1:])
    before = np.empty_like(on)
    before[:1] = False
    np.logical_and(on[:-1], same[1:], out=before[1:])
    after = np.empty_like(on)
    after[-1:] = False
    np.logical_and(on[1:], same[1:], out=after[:-1])
    starts = np.flatnonzero(on & ~before)
    ends = np.flatnonzero(on & ~after)
    # Most zero runs are a night or a few hours: a run's rows are consecutive, so its wall-clock
    # span (last ts - first prev_ts, which the interval seconds add up to) is read from its first
    # and last row, and only runs within a second of the threshold are summed exactly.
    first_us = iv.get_column("prev_ts").to_physical().to_numpy()[starts]
    last_us = iv.get_column("ts").to_physical().to_numpy()[ends]
    long = (last_us - first_us) >= (p.zero_days * 86400 - 1.0) * 1e6
    starts, ends = starts[long], ends[long]
    lengths = ends - starts + 1
    rows = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
    runs = (
        iv.select("meter_id", "prev_ts", "ts", "interval_s")[rows]
        .with_columns(run=pl.Series(np.repeat(np.arange(starts.size), lengths)))
        .group_by("run")
        .agg(
            pl.col("meter_id").first(),
            pl.col("prev_ts").min().alias("start"),
            pl.col("ts").max().alias("ts"),
            pl.col("interval_s").sum().alias("seconds"),
        )
        .filter(pl.col("seconds") >= p.zero_days * 86400)
        .sort("meter_id", "ts")
    )
    days = pl.col("seconds") / 86400
    return _rows(
        runs,
        ZERO_CONSUMPTION,
        ZERO_CONSUMPTION in p.hard_rules,
        days,
        pl.format("zero consumption for {} days since {}", days.round(2), _text(pl.col("start"))),
    )


def _spikes(iv: pl.DataFrame, blocks: pl.Series, p: VeeParams) -> pl.DataFrame:
    """Intervals far above the meter's own trailing high percentile, rate-normalised.

    Volumes are scaled to the nominal interval so that a long interval after a gap is compared as
    a rate, not as the sum of the missing quarter hours.
    """
    # The same operations in the same order as ``volume * interval_s / interval_s`` in polars.
    v = (
        iv.get_column("volume").to_numpy()
        * float(p.interval_s)
        / iv.get_column("interval_s").to_numpy()
    )
    # Each meter's times are moved to a block of their own, further from the previous meter's
    # block than the window reaches, so one increasing key serves every meter's windows.
    window_us = int(p.spike_window / timedelta(microseconds=1))
    us = iv.get_column("ts").to_physical().to_numpy()
    lo = int(us.min()) if us.size else 0
    block = (int(us.max()) - lo if us.size else 0) + window_us + 1
    key = (us - lo) + blocks.to_numpy().astype(np.int64) * block
    found = _spike_rows(v, key, window_us, p)
    if found is None:
        scored = iv.select("meter_id", "ts").with_columns(v=pl.Series(v), _key=pl.Series(key))
        hits = _spikes_by_rolling_quantile(scored, window_us, p)
    else:
        rows, pct = found
        hits = iv.select("meter_id", "ts")[rows].with_columns(
            v=pl.Series(v[rows]), pct=pl.Series(pct)
        )
    return _rows(
        hits,
        SPIKE,
        SPIKE in p.hard_rules,
        pl.col("v"),
        pl.format(
            "{} m³ per interval above {} × P{} {} m³",
            pl.col("v").round(6),
            pl.lit(p.spike_k),
            pl.lit(round(p.spike_quantile * 100)),
            pl.col("pct").round(6),
        ),
    )


def _spikes_by_rolling_quantile(scored: pl.DataFrame, window_us: int, p: VeeParams) -> pl.DataFrame:
    """SPIKE rows (``meter_id, ts, v, pct``) with the trailing percentile of every interval."""
    scored = scored.with_columns(
        pct=pl.col("v").rolling_quantile_by(
            "_key",
            window_size=f"{window_us}i",
            quantile=p.spike_quantile,
            min_samples=p.spike_min_samples,
            closed="left",
        )
    )
    limit = pl.max_horizontal(pl.col("pct") * p.spike_k, pl.lit(p.spike_floor_m3))
    return scored.filter(pl.col("pct").is_not_null() & (pl.col("v") > limit)).select(
        "meter_id", "ts", "v", "pct"
    )


# Above this share of intervals that clear the absolute floor, the per-candidate count costs more
# than one rolling quantile over every interval.
_SPIKE_CANDIDATE_SHARE = 0.125


def _spike_rows(
    v: np.ndarray, key: np.ndarray, window_us: int, p: VeeParams
) -> tuple[np.ndarray, np.ndarray] | None:
    """Rows of SPIKE and their percentile, found without a rolling quantile over every interval.

    A spike must clear the absolute floor, and few intervals do (showers, not the quarter hours
    between them), so the trailing window is examined only for those. For such an interval with
    rate ``x`` and ``n`` earlier values in its window, the "nearest" quantile is the window's
    ``i``-th smallest value with ``i = round(q·(n−1))`` (halves up, as polars rounds), and
    ``pct · k < x`` holds exactly when more than ``i`` window values ``w`` have ``w · k < x``
    (``w ↦ w · k`` is monotone in floating point too). Counting is one vectorised comparison per
    candidate; the percentile itself is selected only for the few spikes. ``key`` increases down
    the rows, meters apart by more than the window. Returns None when the count would cost more
    than the rolling quantile (a series where most intervals clear the floor) or the values are
    not all finite; the caller then takes the rolling quantile.
    """
    if v.size == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)
    cand = np.flatnonzero(v > p.spike_floor_m3)
    if cand.size > _SPIKE_CANDIDATE_SHARE * v.size or not np.isfinite(v).all():
        return None
    if cand.size and not (key[1:] > key[:-1]).all():
        return None
    # Window [t - w, t): from the first row at or after t - w up to the row itself.
    lo = np.searchsorted(key, key[cand] - window_us, side="left")
    n = cand - lo
    enough = n >= p.spike_min_samples
    cand, lo, n = cand[enough], lo[enough], n[enough]
    x = (n - 1) * p.spike_quantile
    whole = np.floor(x)
    nearest = (whole + (x - whole >= 0.5)).astype(np.int64)
    scaled = v * p.spike_k
    below = np.fromiter(
        (
            np.count_nonzero(scaled[a:b] < t)
            for a, b, t in zip(lo.tolist(), cand.tolist(), v[cand].tolist(), strict=True)
        ),
        dtype=np.int64,
        count=cand.size,
    )
    hit = below > nearest
    rows, lo, nearest = cand[hit], lo[hit], nearest[hit]
    pct = np.array(
        [
            np.partition(v[a:b], i)[i]
            for a, b, i in zip(lo.tolist(), rows.tolist(), nearest.tolist(), strict=True)
        ],
        dtype=np.float64,
    )
    return rows, pct


def validate(
    reads: pl.DataFrame,
    meters: pl.DataFrame | None = None,
    exchanges: pl.DataFrame | None = None,
    *,
    as_of: datetime,
    dmas: pl.DataFrame | None = None,
    params: VeeParams | None = None,
    clean: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """All rule failures of ``reads`` (METER_READS) as ``VEE_FAILURES``, sorted by meter and time.

    ``as_of`` is the instant the data were loaded for: later reads are FUTURE_TS and the time since
    a meter's last read up to it is a trailing GAP. Interval rules run on the reads that pass the
    hard single-read rules, so one future-dated read does not also produce a gap and a decrease.
    ``clean`` is ``pipelines.consumption.clean_reads(reads)`` when the caller has it already.
    """
    p = params or VeeParams()
    single, keyed, repeats = _read_rules(reads, meters, dmas, as_of, p)
    if clean is None:
        # clean_reads drops non-finite registers before it drops repeated keys; with none to drop
        # the sorted reads without repeats are the clean reads.
        if keyed.select(pl.col("register").is_finite().all()).item():
            clean = keyed.filter(~repeats).rechunk()
        else:
            clean = clean_reads(reads)
    paired = []
    for batch in meter_slices(clean):
        usable = validated_reads(None, _of_meters(single, batch), clean=batch)
        iv = interval_volumes(usable, meters, exchanges, p.consumption)
        paired.append(_interval_rules(iv, usable, meters, as_of, p))
        del usable, iv
    return (
        pl.concat([single, *paired], how="vertical")
        .cast(VEE_FAILURES)  # type: ignore[arg-type]
        .sort("meter_id", "ts", "rule")
    )


def _of_meters(frame: pl.DataFrame, batch: pl.DataFrame) -> pl.DataFrame:
    """Rows of ``frame`` whose meter is in the range of ``batch`` (sorted by meter)."""
    if batch.height == 0:
        return frame.clear()
    first, last = batch.get_column("meter_id").item(0), batch.get_column("meter_id").item(-1)
    return frame.filter(pl.col("meter_id").cast(pl.String).is_between(pl.lit(first), pl.lit(last)))


def validated_reads(
    reads: pl.DataFrame | None, failures: pl.DataFrame, *, clean: pl.DataFrame | None = None
) -> pl.DataFrame:
    """Reads minus those a hard rule failed, one per (meter, ts): the input of billing anchors.

    ``clean`` is ``pipelines.consumption.clean_reads(reads)`` when the caller has it already
    (``reads`` is then not looked at and may be None).
    """
    bad = failures.filter(pl.col("hard")).select("meter_id", "ts").unique()
    if clean is None:
        if reads is None:
            raise ValueError("validated_reads needs reads or clean")
        clean = clean_reads(reads)
    if bad.height == 0:
        return clean
    rows = _positions(clean, bad).get_column("_row")
    keep = pl.repeat(True, clean.height, dtype=pl.Boolean, eager=True)
    return clean.filter(keep.scatter(rows, False))


def validated_intervals(
    reads: pl.DataFrame | None,
    meters: pl.DataFrame | None,
    exchanges: pl.DataFrame | None,
    failures: pl.DataFrame,
    params: VeeParams | None = None,
    *,
    clean: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """The interval series after validation (``VALIDATED_INTERVALS``), ready for estimation.

    Reads failed by a hard rule are dropped and intervals recomputed, so each dropped read leaves
    a longer interval between good reads — a gap that estimation fills and reconciles. An interval
    that still decreases or exceeds Q4 between two reads that passed (a register reset without an
    exchange record, a real jump) cannot be reconciled by estimation: its volume becomes null with
    status FAILED, and it waits for a manual edit. Soft failures at the closing read give status
    SUSPECT; all failure codes at that read are listed in ``vee_rules``. ``clean`` is
    ``pipelines.consumption.clean_reads(reads)`` when the caller has it already (``reads`` is
    then not looked at and may be None).
    """
    parts = list(validated_interval_slices(reads, meters, exchanges, failures, params, clean=clean))
    return parts[0] if len(parts) == 1 else pl.concat(parts, how="vertical")


def validated_interval_slices(
    reads: pl.DataFrame | None,
    meters: pl.DataFrame | None,
    exchanges: pl.DataFrame | None,
    failures: pl.DataFrame,
    params: VeeParams | None = None,
    *,
    clean: pl.DataFrame | None = None,
) -> Iterator[pl.DataFrame]:
    """:func:`validated_intervals` one slice of whole meters at a time, in meter order.

    A caller that writes the series out, or works through it meter by meter, then holds one
    slice and not the whole series: 13 columns of every interval come to over 2 GB for 10,000
    meters over a month, on top of the reads they are made from.
    """
    p = params or VeeParams()
    if clean is None:
        if reads is None:
            raise ValueError("validated_intervals needs reads or clean")
        clean = clean_reads(reads)
    for batch in meter_slices(clean):
        yield _validated_batch(batch, meters, exchanges, _of_meters(failures, batch), p)


def _validated_batch(
    clean: pl.DataFrame,
    meters: pl.DataFrame | None,
    exchanges: pl.DataFrame | None,
    failures: pl.DataFrame,
    p: VeeParams,
) -> pl.DataFrame:
    """:func:`validated_intervals` of clean reads of whole meters and those meters' failures."""
    usable = validated_reads(None, failures, clean=clean)
    iv = interval_consumption(usable, meters, exchanges, p.consumption, cleaned=True)
    del usable
    blocks = meter_blocks(iv)
    attrs = _meter_attributes(meters, p)
    q4_limit = pl.col("q4_eff") * pl.col("interval_s") / 3600 * p.q4_factor
    decrease = (
        (pl.col("volume") < -p.decrease_tolerance_m3)
        & pl.lit(REGISTER_DECREASE in p.hard_rules)
        & ~_reverse_flagged(p)
    )
    over = (pl.col("volume") > q4_limit) & pl.lit(OVER_Q4 in p.hard_rules)
    # The rule name is written on the few intervals that fail, not as a column of all of them.
    hard = (
        iv.select(
            "meter_id", "ts", "volume", "interval_s", "quality", _per_row(*blocks, attrs, "q4_eff")
        )
        .filter((decrease | over).fill_null(False))
        .select(
            "meter_id",
            "ts",
            pl.when(decrease)
            .then(pl.lit(REGISTER_DECREASE))
            .otherwise(pl.lit(OVER_Q4))
            .alias("rule"),
        )
    )
    # Rule lists and statuses are built on the few flagged intervals and put in place by row
    # position: list work or a join on every one of millions of intervals would cost more than
    # all the rules together.
    flagged = (
        pl.concat(
            [
                failures.filter(~pl.col("hard")).select(
                    "meter_id", "ts", "rule", pl.lit(False).alias("recheck")
                ),
                hard.select("meter_id", "ts", "rule", pl.lit(True).alias("recheck")),
            ],
            how="vertical",
        )
        .group_by("meter_id", "ts")
        .agg(
            pl.col("rule").unique().sort().alias("vee_rules"),
            pl.col("recheck").any().alias("_failed"),
            (pl.col("rule") != GAP).any().alias("_suspect"),
        )
        .with_columns(
            vee_status=pl.when(pl.col("_failed"))
            .then(pl.lit(STATUS_FAILED))
            .when(pl.col("_suspect"))
            .then(pl.lit(STATUS_SUSPECT))
            .otherwise(pl.lit(STATUS_VALID))
        )
    )
    at = _positions(iv, flagged, blocks)
    found = flagged[at.get_column("_key_row")]
    # Entry 0 of each lookup is an unflagged interval's value; entry j + 1 the j-th flagged one.
    lookup = pl.repeat(0, iv.height, dtype=pl.UInt32, eager=True).scatter(
        at.get_column("_row"), pl.int_range(1, found.height + 1, dtype=pl.UInt32, eager=True)
    )
    # (Rechunked: a gather from a list column of two chunks is two orders of magnitude slower.)
    rules = (
        pl.concat([pl.Series([[]], dtype=pl.List(pl.String)), found.get_column("vee_rules")])
        .rechunk()
        .gather(lookup)
    )
    status = (
        pl.concat([pl.Series([STATUS_VALID]), found.get_column("vee_status")])
        .rechunk()
        .gather(lookup)
    )
    failed_rows = at.get_column("_row").filter(found.get_column("_failed"))
    volume = iv.get_column("volume").scatter(failed_rows, None)
    return (
        iv.with_columns(volume, rules.alias("vee_rules"), status.alias("vee_status"))
        .select(list(VALIDATED_INTERVALS))
        .cast(VALIDATED_INTERVALS)  # type: ignore[arg-type]
    )
