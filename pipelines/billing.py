"""Billing determinants per meter and billing period, charge preview, and determinant versions.

A billing determinant is what a meter-data-management system hands to billing for one service point
(the meter) and one period: opening and closing register with their read types, the validated
volume, how much of it is estimated or edited, the VEE outcome, and the open anomalies that should
hold the bill. Periods are local calendar dates of the meter's DMA (inclusive end), so a period runs
from local midnight of ``period_start`` to local midnight after ``period_end``; on DST days this is
23 or 25 hours, which ``period_hours`` shows.

The volume is the sum of the final interval series (actual, estimated and edited slots) over the
period, a slot cut by a boundary counted pro rata. Registers come from reads: ``ACTUAL`` when a read
lies at the boundary; otherwise ``ESTIMATED`` as the last read (or meter exchange) before the
boundary plus the interval volumes up to it — the same volumes the bill uses, so that closing −
opening equals the billed volume whenever no exchange lies between; ``MISSING`` when no read or no
complete interval series reaches the boundary. Nothing is extrapolated past the last read.

Read types: ACTUAL | ESTIMATED | MISSING. VEE status: VALID (no rule failed in the period),
SUSPECT (some rule other than GAP failed; ``vee_rules`` lists them) or INCOMPLETE (the volume is
unknown: a boundary outside the series, a hole, or an interval that failed validation and was not
edited). ``hold`` is set by INCOMPLETE or by any open alert whose code holds bills of the meter's
class (``BillingParams.class_hold_codes``; METERS may carry ``meter_class``, default residential),
and ``hold_reason`` says why in words on the bill line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta

import polars as pl

from pipelines.consumption import (
    FLAG_ACTUAL,
    FLAG_EDITED,
    FLAG_ESTIMATED,
    ConsumptionParams,
    clean_reads,
    meter_timezones,
    register_capacity,
    sort_by_meter_time,
    with_local_midnight_utc,
)
from pipelines.estimation import METHODS
from pipelines.schemas import UTC_TS
from pipelines.tariff import TieredTariff, split_periods, tier_lines
from pipelines.vee import GAP

READ_ACTUAL = "ACTUAL"
READ_ESTIMATED = "ESTIMATED"
READ_MISSING = "MISSING"

VEE_VALID = "VALID"
VEE_SUSPECT = "SUSPECT"
VEE_INCOMPLETE = "INCOMPLETE"

REASON_INITIAL = "INITIAL"
REASON_LATE_READS = "LATE_READS"
REASON_CORRECTION = "CORRECTION"

_STRINGS = pl.List(pl.String)

DETERMINANTS = {
    "meter_id": pl.String,  # service point
    "account": pl.String,
    "dma_id": pl.String,
    "timezone": pl.String,
    "period_start": pl.Date,  # local date, inclusive
    "period_end": pl.Date,  # local date, inclusive
    "start_utc": UTC_TS,
    "end_utc": UTC_TS,  # exclusive
    "period_days": pl.Int32,
    "period_hours": pl.Float64,
    "opening_register": pl.Float64,
    "opening_read_type": pl.String,
    "closing_register": pl.Float64,
    "closing_read_type": pl.String,
    "volume_m3": pl.Float64,
    "estimated_m3": pl.Float64,
    "edited_m3": pl.Float64,
    "estimated_share": pl.Float64,
    "flags": _STRINGS,
    "methods": _STRINGS,
    "exchanges": pl.Int32,
    "vee_status": pl.String,
    "vee_rules": _STRINGS,
    "hold_codes": _STRINGS,
    "hold": pl.Boolean,
    "hold_reason": pl.String,
}

VERSION_COLUMNS = {
    "version": pl.Int32,
    "replaces_version": pl.Int32,
    "version_reason": pl.String,
    "changed_columns": _STRINGS,
}

_KEY = ["meter_id", "period_start", "period_end"]
_FLAGS = (FLAG_ACTUAL, FLAG_ESTIMATED, FLAG_EDITED)


def _default_hold_codes() -> frozenset[str]:
    return frozenset({"LEAK_CONTINUOUS", "BURST", "REVERSE_FLOW", "STUCK_METER", "TAMPER"})


def _default_class_hold_codes() -> dict[str, frozenset[str]]:
    """Dwellings and businesses hold on ``hold_codes`` (every code that puts the billed volume in
    doubt). Industrial and bulk customers only on codes that say the meter itself is wrong
    (backflow, tamper, stopped): a leak or burst behind their meter is their water, billed as
    registered, and their bills are too large to delay for a customer-side problem."""
    meter_wrong = frozenset({"REVERSE_FLOW", "STUCK_METER", "TAMPER"})
    return {"industrial": meter_wrong, "bulk": meter_wrong}


@dataclass(frozen=True, slots=True)
class BillingParams:
    """Settings of determinant computation and versioning.

    Attributes:
        hold_codes: alert codes that hold a bill while open (a bill for a leaking or tampered
            meter is reviewed before it goes out), for a meter whose class has no entry in
            ``class_hold_codes``.
        class_hold_codes: per meter class, the codes that hold its bills (only those: an open
            alert of another code never holds); a class not listed holds on ``hold_codes``.
        boundary_read_tolerance_s: a read this close to a period boundary counts as an actual
            read at the boundary (0: only a read exactly at local midnight).
        continuity_tolerance_s: a slot starting later than the previous one ended by more than
            this leaves a hole in the series.
        default_timezone: zone of meters whose DMA has none.
        consumption: register digits, for wrapping estimated registers at 10^digits.
        version_tolerance: numbers closer than this are unchanged (m³ and register units).
        version_numeric_columns / version_text_columns: what a new version is judged on; flags,
            rules and holds are left out because they do not change what is billed.
    """

    hold_codes: frozenset[str] = field(default_factory=_default_hold_codes)
    class_hold_codes: Mapping[str, frozenset[str]] = field(
        default_factory=_default_class_hold_codes
    )
    boundary_read_tolerance_s: float = 0.0
    continuity_tolerance_s: float = 1.0
    default_timezone: str = "UTC"
    consumption: ConsumptionParams = field(default_factory=ConsumptionParams)
    version_tolerance: float = 1e-6
    version_numeric_columns: tuple[str, ...] = (
        "opening_register",
        "closing_register",
        "volume_m3",
        "estimated_m3",
        "edited_m3",
    )
    version_text_columns: tuple[str, ...] = ("account", "opening_read_type", "closing_read_type")


# --- periods ----------------------------------------------------------------------------------


def _periods(
    periods: pl.DataFrame, meters: pl.DataFrame, dmas: pl.DataFrame | None, p: BillingParams
) -> pl.DataFrame:
    """Periods per meter with account, DMA, zone, register capacity and UTC bounds."""
    per = periods.select(
        *([pl.col("meter_id").cast(pl.String)] if "meter_id" in periods.columns else []),
        pl.col("period_start").cast(pl.Date),
        pl.col("period_end").cast(pl.Date),
    )
    bad = per.filter(
        pl.col("period_start").is_null()
        | pl.col("period_end").is_null()
        | (pl.col("period_end") < pl.col("period_start"))
    )
    if bad.height:
        raise ValueError(f"{bad.height} billing period(s) without dates or ending before start")
    if "meter_id" not in per.columns:
        per = meters.select(pl.col("meter_id").cast(pl.String)).join(per, how="cross")
    attrs = meters.select(
        pl.col("meter_id").cast(pl.String),
        (pl.col("account") if "account" in meters.columns else pl.lit(None))
        .cast(pl.String)
        .alias("account"),
        (pl.col("dma_id") if "dma_id" in meters.columns else pl.lit(None))
        .cast(pl.String)
        .alias("dma_id"),
    ).unique(subset="meter_id", keep="first")
    cap = register_capacity(meters, p.consumption)
    tz = meter_timezones(meters, dmas, p.default_timezone)
    per = (
        per.with_row_index("_row")
        .join(attrs, on="meter_id", how="left")
        .join(cap, on="meter_id", how="left")
        .join(tz, on="meter_id", how="left")
        .with_columns(
            pl.col("timezone").fill_null(p.default_timezone),
            pl.col("capacity").fill_null(10.0**p.consumption.default_register_digits),
            _next_day=pl.col("period_end").dt.offset_by("1d"),
        )
    )
    per = with_local_midnight_utc(per, "period_start", "timezone", "start_utc")
    per = with_local_midnight_utc(per, "_next_day", "timezone", "end_utc")
    return per.drop("_next_day").sort("_row")


# --- the cumulative series --------------------------------------------------------------------


def _cumulative(series: pl.DataFrame, p: BillingParams) -> pl.DataFrame:
    """Per-slot contributions and their running sums per meter.

    Any quantity over (a, b] is then a difference of two running sums, found by one as-of join
    per boundary instead of a join of every period with every slot.
    """
    s = series.select(
        pl.col("meter_id").cast(pl.String),
        pl.col("ts").cast(UTC_TS),
        pl.col("prev_ts").cast(UTC_TS),
        pl.col("volume").cast(pl.Float64),
        pl.col("flag").cast(pl.String),
        pl.col("method").cast(pl.String),
    )
    s = sort_by_meter_time(s)
    same = pl.col("meter_id") == pl.col("meter_id").shift(1)
    late = (pl.col("prev_ts") - pl.col("ts").shift(1)).dt.total_seconds(fractional=True)
    v = pl.col("volume").fill_null(0.0)
    span = (pl.col("ts") - pl.col("prev_ts")).dt.total_seconds(fractional=True)
    contrib = {
        "vol": v,
        "est": pl.when(pl.col("flag") == FLAG_ESTIMATED).then(v).otherwise(0.0),
        "edit": pl.when(pl.col("flag") == FLAG_EDITED).then(v).otherwise(0.0),
        "est_s": pl.when(pl.col("flag") == FLAG_ESTIMATED).then(span).otherwise(0.0),
    }
    counts = {
        "unknown": pl.col("volume").is_null() & (pl.col("flag") != FLAG_EDITED),
        "hole": (same & (late > p.continuity_tolerance_s)).fill_null(False),
        **{f"flag_{f}": pl.col("flag") == f for f in _FLAGS},
        **{f"method_{m}": pl.col("method") == m for m in METHODS},
    }
    s = s.with_columns(
        span=span,
        **{f"x_{k}": e for k, e in contrib.items()},
        **{f"x_{k}": e.fill_null(False).cast(pl.Int32) for k, e in counts.items()},
    )
    names = [*contrib, *counts]
    # One running sum over all meters (no per-meter window): every use is a difference of two
    # points of the same meter, in which the earlier meters' totals cancel.
    return s.with_columns(pl.col(f"x_{k}").cum_sum().alias(f"c_{k}") for k in names).drop(
        "volume", "flag", "method"
    )


_CONTINUOUS = ("vol", "est", "edit", "est_s")


def _count_names() -> list[str]:
    return ["unknown", "hole", *(f"flag_{f}" for f in _FLAGS), *(f"method_{m}" for m in METHODS)]


def _state_at(cum: pl.DataFrame, points: pl.DataFrame, prefix: str) -> pl.DataFrame:
    """Running sums at instant ``_t`` of each point (key column first, ``meter_id``, ``_t``).

    The slot containing ``_t`` is the first slot ending at or after it; a slot cut by ``_t``
    contributes pro rata (continuous quantities) or, for counts, is inside on the upper side and
    not yet passed on the lower side. ``covered`` is false outside the series.
    """
    j = points.sort("meter_id", "_t").join_asof(
        cum,
        left_on="_t",
        right_on="ts",
        by="meter_id",
        strategy="forward",
        check_sortedness=False,
    )
    frac = pl.when(pl.col("span") > 0).then(
        (pl.col("ts") - pl.col("_t")).dt.total_seconds(fractional=True) / pl.col("span")
    )
    cut = frac.fill_null(0.0) > 0
    cols: list[pl.Expr] = [
        (pl.col("ts").is_not_null() & (pl.col("prev_ts") <= pl.col("_t")))
        .fill_null(False)
        .alias(f"{prefix}covered")
    ]
    for k in _CONTINUOUS:
        cols.append(
            (pl.col(f"c_{k}") - pl.col(f"x_{k}") * frac.fill_null(0.0)).alias(f"{prefix}{k}")
        )
    for k in _count_names():
        cols.append(pl.col(f"c_{k}").alias(f"{prefix}{k}_hi"))
        # A hole lies before its slot's start, so a cut slot's hole is already passed.
        passed = pl.lit(0) if k == "hole" else pl.when(cut).then(pl.col(f"x_{k}")).otherwise(0)
        cols.append((pl.col(f"c_{k}") - passed).alias(f"{prefix}{k}_lo"))
    return j.select(points.columns[0], *cols)


# --- determinants -----------------------------------------------------------------------------


def _anchors(reads: pl.DataFrame, exchanges: pl.DataFrame | None) -> pl.DataFrame:
    """Known register values: actual reads and, at each exchange, the new meter's start value.

    At one instant an actual read beats the registry's start value of a new meter.
    """
    actual = reads.select("meter_id", pl.col("ts").alias("_read_ts"), "register")
    if exchanges is None or exchanges.height == 0:
        return actual
    starts = exchanges.select(
        pl.col("meter_id").cast(pl.String),
        pl.col("exchanged_at").cast(UTC_TS).alias("_read_ts"),
        pl.col("new_register_start").cast(pl.Float64).fill_null(0.0).alias("register"),
    ).drop_nulls(["meter_id", "_read_ts"])
    starts = starts.join(actual, on=["meter_id", "_read_ts"], how="anti")
    return pl.concat([actual, starts], how="vertical").sort("meter_id", "_read_ts")


def _registers(
    pts: pl.DataFrame,
    at_t: pl.DataFrame,
    reads: pl.DataFrame,
    anchor: pl.DataFrame,
    cum: pl.DataFrame,
    p: BillingParams,
) -> pl.DataFrame:
    """(_pid, register, read_type) at each boundary point (``_pid``, meter_id, ``_t``, capacity).

    ``at_t`` is the series state at the points (prefix ``t_``), computed once for all of them.
    """
    pts = pts.sort("meter_id", "_t")
    exact = pts.join_asof(
        reads.select("meter_id", pl.col("ts").alias("_read_ts"), "register"),
        left_on="_t",
        right_on="_read_ts",
        by="meter_id",
        strategy="nearest",
        tolerance=timedelta(seconds=p.boundary_read_tolerance_s),
        check_sortedness=False,
    ).select("_pid", pl.col("register").alias("_exact"))
    with_anchor = pts.join_asof(
        anchor.select("meter_id", "_read_ts", pl.col("register").alias("_anchor_reg")),
        left_on="_t",
        right_on="_read_ts",
        by="meter_id",
        strategy="backward",
        check_sortedness=False,
    )
    at_anchor = _state_at(
        cum,
        with_anchor.select("_pid", "meter_id", pl.col("_read_ts").alias("_t")).filter(
            pl.col("_t").is_not_null()
        ),
        "a_",
    )
    j = (
        with_anchor.join(exact, on="_pid", how="left")
        .join(at_t, on="_pid", how="left")
        .join(at_anchor, on="_pid", how="left")
    )
    complete = (
        pl.col("_anchor_reg").is_not_null()
        & pl.col("t_covered")
        & pl.col("a_covered").fill_null(False)
        & (pl.col("t_unknown_hi") - pl.col("a_unknown_lo") == 0)
        & (pl.col("t_hole_hi") - pl.col("a_hole_lo") == 0)
    ).fill_null(False)
    raw = pl.col("_anchor_reg") + pl.col("t_vol") - pl.col("a_vol")
    wrapped = raw - pl.col("capacity") * (raw / pl.col("capacity")).floor()
    return j.select(
        "_pid",
        pl.when(pl.col("_exact").is_not_null())
        .then(pl.col("_exact"))
        .when(complete)
        .then(wrapped)
        .alias("register"),
        pl.when(pl.col("_exact").is_not_null())
        .then(pl.lit(READ_ACTUAL))
        .when(complete)
        .then(pl.lit(READ_ESTIMATED))
        .otherwise(pl.lit(READ_MISSING))
        .alias("read_type"),
    )


def _in_period(per: pl.DataFrame, events: pl.DataFrame, ts: str) -> pl.DataFrame:
    """Events of each period's meter with ``start_utc < ts ≤ end_utc``, keyed by ``_row``."""
    return (
        per.select("_row", "meter_id", "start_utc", "end_utc")
        .join(events, on="meter_id", how="inner")
        .filter((pl.col(ts) > pl.col("start_utc")) & (pl.col(ts) <= pl.col("end_utc")))
    )


def billing_determinants(
    periods: pl.DataFrame,
    intervals: pl.DataFrame,
    reads: pl.DataFrame,
    meters: pl.DataFrame,
    *,
    dmas: pl.DataFrame | None = None,
    exchanges: pl.DataFrame | None = None,
    failures: pl.DataFrame | None = None,
    alerts: pl.DataFrame | None = None,
    params: BillingParams | None = None,
) -> pl.DataFrame:
    """One determinant (``DETERMINANTS``) per meter and billing period.

    Args:
        periods: ``period_start``/``period_end`` local dates (inclusive), with ``meter_id`` for
            per-meter cycles or without it to bill every meter in ``meters`` for the same dates.
        intervals: the final series (``pipelines.estimation.SERIES``, possibly edited).
        reads: validated reads (``pipelines.vee.validated_reads``): register anchors.
        meters: METERS, optionally with a ``timezone`` column; ``dmas`` supplies zones otherwise.
        exchanges: METER_EXCHANGES; a new meter's start register anchors estimated reads.
        failures: VEE_FAILURES, summarised as ``vee_rules``.
        alerts: ALERTS; open ones with a hold code on the meter hold the bill.
    """
    p = params or BillingParams()
    per = _periods(periods, meters, dmas, p)
    cum = _cumulative(intervals, p)
    good_reads = clean_reads(reads)

    # Both boundaries of every period as points: one as-of pass over the series for all of them.
    pid = pl.col("_row").cast(pl.Int64) * 2
    pts = pl.concat(
        [
            per.select(pid.alias("_pid"), "meter_id", pl.col("start_utc").alias("_t"), "capacity"),
            per.select(
                (pid + 1).alias("_pid"), "meter_id", pl.col("end_utc").alias("_t"), "capacity"
            ),
        ]
    )
    at_t = _state_at(cum, pts.select("_pid", "meter_id", "_t"), "t_")
    regs = _registers(pts, at_t, good_reads, _anchors(good_reads, exchanges), cum, p)
    states = at_t.join(regs, on="_pid")

    def side(odd: int, prefix: str, name: str) -> pl.DataFrame:
        part = states.filter(pl.col("_pid") % 2 == odd)
        return part.select(
            (pl.col("_pid") // 2).cast(pl.UInt32).alias("_row"),
            *[pl.col(c).alias(prefix + c[2:]) for c in at_t.columns if c.startswith("t_")],
            pl.col("register").alias(f"{name}_register"),
            pl.col("read_type").alias(f"{name}_read_type"),
        )

    d = per.join(side(0, "s_", "opening"), on="_row", how="left").join(
        side(1, "e_", "closing"), on="_row", how="left"
    )

    def between(name: str) -> pl.Expr:
        return pl.col(f"e_{name}_hi") - pl.col(f"s_{name}_lo")

    complete = (
        pl.col("s_covered")
        & pl.col("e_covered")
        & (between("unknown") == 0)
        & (between("hole") == 0)
    ).fill_null(False)
    volume = pl.when(complete).then(pl.col("e_vol") - pl.col("s_vol"))
    estimated = pl.when(complete).then(pl.col("e_est") - pl.col("s_est"))
    seconds = (pl.col("end_utc") - pl.col("start_utc")).dt.total_seconds(fractional=True)
    d = d.with_columns(
        volume_m3=volume,
        estimated_m3=estimated,
        edited_m3=pl.when(complete).then(pl.col("e_edit") - pl.col("s_edit")),
        estimated_share=pl.when(complete).then(
            pl.when(volume > 0)
            .then(estimated / volume)
            .otherwise((pl.col("e_est_s") - pl.col("s_est_s")) / seconds)
        ),
        flags=pl.concat_list(
            [pl.when(between(f"flag_{f}") > 0).then(pl.lit(f)) for f in _FLAGS]
        ).list.drop_nulls(),
        methods=pl.concat_list(
            [pl.when(between(f"method_{m}") > 0).then(pl.lit(m)) for m in METHODS]
        ).list.drop_nulls(),
        period_days=(pl.col("period_end") - pl.col("period_start")).dt.total_days() + 1,
        period_hours=seconds / 3600,
        _complete=complete,
    )

    empty_list = pl.lit([], dtype=_STRINGS)
    if failures is not None and failures.height:
        rules = (
            _in_period(per, failures.select("meter_id", "ts", "rule"), "ts")
            .group_by("_row")
            .agg(pl.col("rule").unique().sort().alias("vee_rules"))
        )
        d = d.join(rules, on="_row", how="left")
    else:
        d = d.with_columns(vee_rules=empty_list)
    if exchanges is not None and exchanges.height:
        swaps = (
            _in_period(
                per,
                exchanges.select(
                    pl.col("meter_id").cast(pl.String), pl.col("exchanged_at").cast(UTC_TS)
                ),
                "exchanged_at",
            )
            .group_by("_row")
            .agg(pl.len().alias("exchanges"))
        )
        d = d.join(swaps, on="_row", how="left")
    else:
        d = d.with_columns(exchanges=pl.lit(0))
    d = d.join(_holds(per, alerts, p, meters), on="_row", how="left")

    suspect = pl.col("vee_rules").list.set_difference([GAP]).list.len() > 0
    d = (
        d.with_columns(
            pl.col("vee_rules").fill_null(empty_list),
            pl.col("hold_codes").fill_null(empty_list),
            pl.col("exchanges").fill_null(0),
        )
        .with_columns(
            vee_status=pl.when(~pl.col("_complete"))
            .then(pl.lit(VEE_INCOMPLETE))
            .when(suspect)
            .then(pl.lit(VEE_SUSPECT))
            .otherwise(pl.lit(VEE_VALID)),
            hold=(pl.col("hold_codes").list.len() > 0) | ~pl.col("_complete"),
            hold_reason=pl.concat_str(
                [
                    pl.col("_hold_reason"),
                    pl.when(~pl.col("_complete")).then(pl.lit("INCOMPLETE volume (VEE)")),
                ],
                separator="; ",
                ignore_nulls=True,
            ),
        )
        .with_columns(
            hold_reason=pl.when(pl.col("hold")).then(pl.col("hold_reason")),
        )
    )
    return d.sort("_row").select(list(DETERMINANTS)).cast(DETERMINANTS)  # type: ignore[arg-type]


def with_class_hold_codes(
    p: BillingParams, overrides: Mapping[str, Sequence[str] | None]
) -> BillingParams:
    """``p`` with the hold codes the registry gives per class (None: keep the class default)."""
    merged = dict(p.class_hold_codes)
    merged.update({c: frozenset(codes) for c, codes in overrides.items() if codes is not None})
    return replace(p, class_hold_codes=merged)


def all_hold_codes(p: BillingParams) -> list[str]:
    """Every code that can hold some class's bill: the alerts a billing run must load."""
    return sorted(p.hold_codes.union(*p.class_hold_codes.values()))


def class_hold_table(p: BillingParams) -> pl.DataFrame:
    """``meter_class, code`` pairs of the classes listed in ``class_hold_codes``."""
    pairs = [(c, code) for c, codes in p.class_hold_codes.items() for code in sorted(codes)]
    return pl.DataFrame(
        {"meter_class": [c for c, _ in pairs], "code": [k for _, k in pairs]},
        schema={"meter_class": pl.String, "code": pl.String},
    )


def _holds(
    per: pl.DataFrame, alerts: pl.DataFrame | None, p: BillingParams, meters: pl.DataFrame
) -> pl.DataFrame:
    """(_row, hold_codes, _hold_reason): open alerts on the meter that began before the period
    end and whose code holds bills of the meter's class; the reason names each with its start,
    e.g. ``LEAK_CONTINUOUS open since 2024-05-02 (holds multi_dwelling bills)``."""
    schema: dict[str, pl.DataType | type[pl.DataType]] = {
        "_row": pl.UInt32,
        "hold_codes": _STRINGS,
        "_hold_reason": pl.String,
    }
    if alerts is None or alerts.height == 0:
        return pl.DataFrame(schema=schema)
    cls = (
        pl.col("meter_class").fill_null("residential")
        if "meter_class" in meters.columns
        else pl.lit("residential")
    )
    classes = meters.select("meter_id", cls.alias("meter_class")).unique("meter_id")
    table = class_hold_table(p)
    open_alerts = alerts.filter(
        pl.when(pl.col("status").is_not_null())
        .then(pl.col("status") == "open")
        .otherwise(pl.col("end_ts").is_null())
    ).select(pl.col("subject_id").alias("meter_id"), "code", pl.col("start_ts").cast(UTC_TS))
    held = (
        open_alerts.join(classes, on="meter_id", how="left")
        .with_columns(pl.col("meter_class").fill_null("residential"))
        .join(
            # A class without an entry holds on the general hold_codes.
            pl.concat(
                [
                    table,
                    pl.DataFrame(
                        {"meter_class": "_other", "code": sorted(p.hold_codes)},
                        schema={"meter_class": pl.String, "code": pl.String},
                    ),
                ]
            ),
            left_on=[
                pl.when(pl.col("meter_class").is_in(list(p.class_hold_codes)))
                .then(pl.col("meter_class"))
                .otherwise(pl.lit("_other")),
                "code",
            ],
            right_on=["meter_class", "code"],
            how="semi",
        )
    )
    return (
        per.select("_row", "meter_id", "end_utc")
        .join(held, on="meter_id", how="inner")
        .filter(pl.col("start_ts") < pl.col("end_utc"))
        .sort("_row", "code", "start_ts")
        .group_by("_row", maintain_order=True)
        .agg(
            pl.col("code").unique().sort().alias("hold_codes"),
            pl.concat_str(
                [
                    pl.col("code"),
                    pl.lit(" open since "),
                    pl.col("start_ts").dt.strftime("%Y-%m-%d %H:%MZ"),
                    pl.lit(" (holds "),
                    pl.col("meter_class"),
                    pl.lit(" bills)"),
                ]
            )
            .str.join("; ")
            .alias("_hold_reason"),
        )
    )


# --- charges ----------------------------------------------------------------------------------


def charge_preview(
    determinants: pl.DataFrame,
    intervals: pl.DataFrame,
    tariff: TieredTariff | None = None,
    params: BillingParams | None = None,
) -> pl.DataFrame:
    """Tier lines (see ``pipelines.tariff.tier_lines``) for each determinant.

    A period spanning a tariff change is split at the effective date; each side's volume is the
    consumption measured on that side (the same interval sums as the period volume, so the sides
    add up to it). If a side cannot be measured while the period volume is known, the period
    volume is apportioned by days.
    """
    t = tariff or TieredTariff()
    p = params or BillingParams()
    per = determinants.select(
        "meter_id", "account", "timezone", "period_start", "period_end", "volume_m3"
    ).with_row_index("_det")
    segs = split_periods(per, t).with_row_index("_row")
    segs = with_local_midnight_utc(segs, "segment_start", "timezone", "seg_start_utc")
    segs = with_local_midnight_utc(
        segs.with_columns(_next=pl.col("segment_end").dt.offset_by("1d")),
        "_next",
        "timezone",
        "seg_end_utc",
    ).drop("_next")
    cum = _cumulative(intervals, p)
    pid = pl.col("_row").cast(pl.Int64) * 2
    states = _state_at(
        cum,
        pl.concat(
            [
                segs.select(pid.alias("_pid"), "meter_id", pl.col("seg_start_utc").alias("_t")),
                segs.select((pid + 1).alias("_pid"), "meter_id", pl.col("seg_end_utc").alias("_t")),
            ]
        ),
        "t_",
    )

    def side(odd: int, prefix: str) -> pl.DataFrame:
        return states.filter(pl.col("_pid") % 2 == odd).select(
            (pl.col("_pid") // 2).cast(pl.UInt32).alias("_row"),
            *[pl.col(c).alias(prefix + c[2:]) for c in states.columns if c.startswith("t_")],
        )

    segs = segs.join(side(0, "s_"), on="_row", how="left").join(
        side(1, "e_"), on="_row", how="left"
    )
    measured_ok = (
        pl.col("s_covered")
        & pl.col("e_covered")
        & (pl.col("e_unknown_hi") - pl.col("s_unknown_lo") == 0)
        & (pl.col("e_hole_hi") - pl.col("s_hole_lo") == 0)
    ).fill_null(False)
    n_segments = pl.len().over("_det")
    period_days = (pl.col("period_end") - pl.col("period_start")).dt.total_days() + 1
    all_measured = measured_ok.all().over("_det")
    segs = segs.with_columns(
        period_volume_m3=pl.col("volume_m3"),
        volume_m3=pl.when(n_segments == 1)
        .then(pl.col("volume_m3"))
        .when(all_measured)
        .then(pl.col("e_vol") - pl.col("s_vol"))
        .otherwise(pl.col("volume_m3") * pl.col("segment_days") / period_days),
    )
    keep = [
        "meter_id",
        "account",
        "period_start",
        "period_end",
        "period_volume_m3",
        "segment_start",
        "segment_end",
        "segment_days",
        "effective_from",
        "tariff_code",
        "volume_m3",
    ]
    return tier_lines(segs.sort("_row").select(keep), t)


# --- versions ---------------------------------------------------------------------------------


def determinant_versions(
    new: pl.DataFrame, issued: pl.DataFrame, params: BillingParams | None = None
) -> pl.DataFrame:
    """Rows to write: new determinants that differ from the latest issued version of their key.

    ``issued`` holds previously issued determinants with an integer ``version`` (several versions
    per meter and period allowed; the highest is current). A key never issued gets version 1,
    reason INITIAL. A key whose compared numbers or read types are unchanged yields nothing, so
    recomputing a period never reissues a bill. A changed one gets version = current + 1,
    ``replaces_version`` = current (billing cancels that one and rebills) and a reason:
    LATE_READS when reads arrived since (less estimated volume, a read type became ACTUAL, or the
    period was INCOMPLETE and no longer is), otherwise CORRECTION (edits, exchange records,
    reprocessing). ``changed_columns`` names what differs.
    """
    p = params or BillingParams()
    numeric = list(p.version_numeric_columns)
    text = list(p.version_text_columns)
    compared = numeric + text
    extra = [c for c in ("vee_status",) if c in issued.columns and c in new.columns]
    missing = [c for c in [*_KEY, "version", *compared] if c not in issued.columns]
    if missing and issued.height:
        raise ValueError(f"issued determinants lack columns {missing}")
    if issued.height:
        current = (
            issued.sort("version")
            .unique(subset=_KEY, keep="last")
            .select(
                *_KEY,
                pl.col("version").cast(pl.Int32).alias("_old_version"),
                *[pl.col(c).alias(f"_old_{c}") for c in [*compared, *extra]],
            )
        )
    else:
        current = pl.DataFrame(
            schema={
                "meter_id": pl.String,
                "period_start": pl.Date,
                "period_end": pl.Date,
                "_old_version": pl.Int32,
                **{f"_old_{c}": new.schema[c] for c in [*compared, *extra]},
            }
        )
    j = new.with_row_index("_row").join(current, on=_KEY, how="left")
    tol = p.version_tolerance

    def differs_num(c: str) -> pl.Expr:
        a, b = pl.col(c), pl.col(f"_old_{c}")
        return (
            pl.when(a.is_null() & b.is_null())
            .then(False)
            .when(a.is_null() | b.is_null())
            .then(True)
            .otherwise((a - b).abs() > tol)
        )

    def differs_text(c: str) -> pl.Expr:
        return pl.col(c).cast(pl.String).ne_missing(pl.col(f"_old_{c}").cast(pl.String))

    flags = [differs_num(c).alias(f"_chg_{c}") for c in numeric] + [
        differs_text(c).alias(f"_chg_{c}") for c in text
    ]
    j = j.with_columns(flags).with_columns(
        changed_columns=pl.concat_list(
            [pl.when(pl.col(f"_chg_{c}")).then(pl.lit(c)) for c in compared]
        ).list.drop_nulls()
    )
    first = pl.col("_old_version").is_null()
    improved_type = pl.lit(False)
    for side in ("opening", "closing"):
        col = f"{side}_read_type"
        if col in text:
            improved_type = improved_type | (
                (pl.col(col) == READ_ACTUAL) & (pl.col(f"_old_{col}") != READ_ACTUAL)
            ).fill_null(False)
    less_estimated = (
        (pl.col("estimated_m3") < pl.col("_old_estimated_m3") - tol).fill_null(False)
        if "estimated_m3" in numeric
        else pl.lit(False)
    )
    completed = (
        (
            (pl.col("_old_vee_status") == VEE_INCOMPLETE) & (pl.col("vee_status") != VEE_INCOMPLETE)
        ).fill_null(False)
        if extra
        else pl.lit(False)
    )
    reason = (
        pl.when(first)
        .then(pl.lit(REASON_INITIAL))
        .when(improved_type | less_estimated | completed)
        .then(pl.lit(REASON_LATE_READS))
        .otherwise(pl.lit(REASON_CORRECTION))
    )
    out = j.filter(first | (pl.col("changed_columns").list.len() > 0)).with_columns(
        version=pl.when(first).then(1).otherwise(pl.col("_old_version") + 1),
        replaces_version=pl.col("_old_version"),
        version_reason=reason,
        changed_columns=pl.when(first)
        .then(pl.lit([], dtype=_STRINGS))
        .otherwise(pl.col("changed_columns")),
    )
    return (
        out.sort("_row").select(*new.columns, *VERSION_COLUMNS).cast(VERSION_COLUMNS)  # type: ignore[arg-type]
    )
