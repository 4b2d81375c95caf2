"""Legitimate night use (LNU) and net night flow (NNF = MNF − LNU) per DMA and night.

With smart meters LNU is *measured*: the customers' own interval volumes in the very hour the MNF
occurred. Three parts are reported separately because their data quality differs:

- ``lnu_measured_m3h``: Σ of the reporting meters' volumes in the MNF window (m³/h);
- ``lnu_unreported_m3h``: a stand-in for installed meters that did not report the whole window;
- ``lnu_allowance_m3h``: unmetered properties at the UK *Managing Leakage* per-property rates.

Choice for unreported meters (``NightUseParams.unreported``): the default ``"scale"`` divides the
measured part by the reporting share, i.e. assumes silent meters use what the reporting ones use on
average. That is unbiased when reporting failures are unrelated to use (radio coverage, battery),
and it keeps large users in the picture, which a flat per-property allowance would understate.
When fewer than ``min_share_for_scaling`` of the meters report, one sample is too thin to scale
and the per-property allowance is used for the silent meters instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from typing import Literal

import polars as pl

from dma.local_time import dma_timezones

_US_PER_H = 3_600_000_000


@dataclass(frozen=True)
class NightUseParams:
    """Conventions for legitimate night use.

    household_allowance_l_per_h: night use per unmetered/unreported household property when not
        measured (UK *Managing Leakage*: 1.7 L/property/h).
    non_household_allowance_l_per_h: same for non-household properties (8 L/property/h).
    household_type: ``METERS.customer_type`` value that gets the household rate; every other
        type gets the non-household rate (the larger, so an unknown type does not inflate NNF).
    unreported: ``"scale"`` (measured ÷ reporting share), ``"allowance"`` (per-property rate for
        each silent meter) or ``"none"`` (silent meters add nothing).
    min_share_for_scaling: below this reporting share ``"scale"`` falls back to ``"allowance"``.
    max_interval: meter intervals longer than this (daily reads) say nothing about one night
        hour; such a meter counts as not reporting.
    min_meter_coverage: share of the MNF window a meter's usable intervals must cover for it to
        count as reporting (1.0 = the whole hour). Partly covering intervals are pro-rated by
        overlap assuming even use within the interval.
    count_estimated: whether VEE-estimated intervals (flag ``E``) count as measured. Default no:
        an estimate made from a profile is not a measurement of that night.
    """

    household_allowance_l_per_h: float = 1.7
    non_household_allowance_l_per_h: float = 8.0
    household_type: str = "household"
    unreported: Literal["scale", "allowance", "none"] = "scale"
    min_share_for_scaling: float = 0.5
    max_interval: timedelta = timedelta(hours=1)
    min_meter_coverage: float = 1.0
    count_estimated: bool = False


def _allowance_m3h(households: pl.Expr, non_households: pl.Expr, p: NightUseParams) -> pl.Expr:
    return (
        households.fill_null(0).cast(pl.Float64) * p.household_allowance_l_per_h
        + non_households.fill_null(0).cast(pl.Float64) * p.non_household_allowance_l_per_h
    ) / 1000.0


def _meter_window_volumes(
    windows: pl.DataFrame, intervals: pl.DataFrame, meters: pl.DataFrame, p: NightUseParams
) -> pl.DataFrame:
    """Per window and meter: volume pro-rated into the window and microseconds covered."""
    iv = (
        intervals.select("meter_id", "ts", "volume", "flag")
        .filter(pl.col("ts").is_not_null() & pl.col("meter_id").is_not_null())
        .sort("meter_id", "ts")
    )
    # Sorted by meter and time, neighbours are compared by shifting (much cheaper than
    # unique()/over() on millions of rows). Duplicate (meter, ts): the first row is kept.
    same_meter = pl.col("meter_id") == pl.col("meter_id").shift(1)
    iv = iv.filter(~(same_meter & (pl.col("ts") == pl.col("ts").shift(1))).fill_null(False))
    # Interval length from the previous read of the same meter (before dropping estimates, so an
    # estimated interval does not make the next actual one look long); the first interval of a
    # meter takes the length of its successor.
    gap = pl.col("ts").diff().dt.total_microseconds()
    iv = iv.with_columns(pl.when(same_meter).then(gap).alias("_len")).with_columns(
        pl.when(pl.col("_len").is_null() & (pl.col("meter_id") == pl.col("meter_id").shift(-1)))
        .then(pl.col("_len").shift(-1))
        .otherwise(pl.col("_len"))
        .alias("_len")
    )
    usable = (
        pl.col("volume").is_not_null()
        & pl.col("volume").is_finite()
        & (pl.col("_len") > 0)
        & (pl.col("_len") <= int(p.max_interval / timedelta(microseconds=1)))
    )
    if not p.count_estimated:
        usable = usable & (pl.col("flag").fill_null("A") != "E")
    iv = iv.filter(usable).join(
        meters.select("meter_id", "dma_id", "customer_type"), on="meter_id", how="inner"
    )
    matched = iv.sort("ts").join_asof(
        windows.select("dma_id", "night_date", "mnf_start_ts", "mnf_end_ts").sort("mnf_start_ts"),
        left_on="ts",
        right_on="mnf_start_ts",
        by="dma_id",
        strategy="backward",
        check_sortedness=False,  # sorted globally by the key; groups inherit it
    )
    iv_start = pl.col("ts") - pl.duration(microseconds=pl.col("_len"))
    overlap = (
        (
            pl.min_horizontal(pl.col("ts"), pl.col("mnf_end_ts"))
            - pl.max_horizontal(iv_start, pl.col("mnf_start_ts"))
        )
        .dt.total_microseconds()
        .clip(lower_bound=0)
    )
    return (
        matched.filter(pl.col("night_date").is_not_null())
        .with_columns(overlap.alias("_ov"))
        .filter(pl.col("_ov") > 0)
        .group_by("dma_id", "night_date", "meter_id", "customer_type")
        .agg(
            (pl.col("volume") * pl.col("_ov") / pl.col("_len")).sum().alias("_vol"),
            pl.col("_ov").sum().alias("_covered"),
        )
    )


def _expected_meters(windows: pl.DataFrame, meters: pl.DataFrame, hh: str) -> pl.DataFrame:
    """Per window: installed meters by class (household/other), from cumulative install counts."""
    cls = (pl.col("customer_type") == hh).fill_null(False)
    installed = (
        meters.select(
            "dma_id",
            cls.alias("_hh"),
            pl.col("install_date").fill_null(date(1, 1, 1)).alias("_installed"),
        )
        .group_by("dma_id", "_hh", "_installed")
        .len()
        .sort("_installed")
        .with_columns(pl.col("len").cum_sum().over("dma_id", "_hh").alias("_cum"))
    )
    grid = windows.select("dma_id", "night_date").join(
        installed.select("dma_id", "_hh").unique(), on="dma_id"
    )
    counted = grid.sort("night_date").join_asof(
        installed.select("dma_id", "_hh", "_installed", "_cum"),
        left_on="night_date",
        right_on="_installed",
        by=["dma_id", "_hh"],
        strategy="backward",
        check_sortedness=False,  # sorted globally by the key; groups inherit it
    )
    return counted.group_by("dma_id", "night_date").agg(
        pl.col("_cum").filter(pl.col("_hh")).sum().alias("_exp_hh"),
        pl.col("_cum").filter(~pl.col("_hh")).sum().alias("_exp_nh"),
    )


def legitimate_night_use(
    mnf: pl.DataFrame,
    intervals: pl.DataFrame,
    meters: pl.DataFrame,
    dmas: pl.DataFrame,
    params: NightUseParams | None = None,
) -> pl.DataFrame:
    """Add LNU parts, meter counts, reporting share and ``nnf_m3h`` to each MNF row.

    ``mnf`` comes from :func:`dma.night_flow.minimum_night_flow` (needs ``dma_id, night_date,
    mnf_m3h, mnf_start_ts, mnf_end_ts``); ``intervals`` is ``INTERVALS`` (volume per interval
    ending at ``ts``), ``meters`` is ``METERS``. Only meters installed on or before the night count
    as expected; a meter's intervals count only if it is expected. NNF may come out negative
    (noise, generous allowances): it is left so, since clipping would bias a trend detector.
    """
    p = params or NightUseParams()
    hh = p.household_type
    windows = mnf.filter(pl.col("mnf_start_ts").is_not_null())
    expected = _expected_meters(windows, meters, hh)
    per_meter = _meter_window_volumes(windows, intervals, meters, p)
    installed_by = meters.select(
        "meter_id", pl.col("install_date").fill_null(date(1, 1, 1)).alias("_installed")
    )
    window_us = (pl.col("mnf_end_ts") - pl.col("mnf_start_ts")).dt.total_microseconds()
    reporting = (
        per_meter.join(installed_by, on="meter_id", how="left")
        .filter(pl.col("_installed") <= pl.col("night_date"))
        .join(
            windows.select("dma_id", "night_date", "mnf_start_ts", "mnf_end_ts"),
            on=["dma_id", "night_date"],
        )
        .filter(pl.col("_covered") >= p.min_meter_coverage * window_us)
        .with_columns(
            (pl.col("_vol") / (pl.col("_covered") / _US_PER_H)).alias("_rate"),
            (pl.col("customer_type") == hh).fill_null(False).alias("_hh"),
        )
        .group_by("dma_id", "night_date")
        .agg(
            pl.col("_rate").sum().alias("lnu_measured_m3h"),
            pl.col("_hh").sum().alias("_rep_hh"),
            (~pl.col("_hh")).sum().alias("_rep_nh"),
        )
    )
    unmetered = dma_timezones(dmas).join(
        dmas.select("dma_id", "unmetered_households", "unmetered_non_households").unique(
            subset="dma_id", keep="first"
        ),
        on="dma_id",
    )
    out = (
        windows.join(expected, on=["dma_id", "night_date"], how="left")
        .join(reporting, on=["dma_id", "night_date"], how="left")
        .join(unmetered.drop("timezone"), on="dma_id", how="left")
        .with_columns(
            pl.col("_exp_hh", "_exp_nh", "_rep_hh", "_rep_nh").fill_null(0).cast(pl.Int64),
            pl.col("lnu_measured_m3h").fill_null(0.0),
        )
        .with_columns(
            (pl.col("_exp_hh") + pl.col("_exp_nh")).alias("meters_expected"),
            (pl.col("_rep_hh") + pl.col("_rep_nh")).alias("meters_reporting"),
        )
        .with_columns(
            pl.when(pl.col("meters_expected") > 0)
            .then(pl.col("meters_reporting") / pl.col("meters_expected"))
            .otherwise(None)
            .alias("reporting_share")
        )
    )
    silent_allowance = _allowance_m3h(
        pl.col("_exp_hh") - pl.col("_rep_hh"), pl.col("_exp_nh") - pl.col("_rep_nh"), p
    )
    if p.unreported == "none":
        unreported = pl.lit(0.0)
    elif p.unreported == "allowance":
        unreported = silent_allowance
    else:
        scaled = pl.col("lnu_measured_m3h") * (1.0 / pl.col("reporting_share") - 1.0)
        unreported = (
            pl.when(pl.col("meters_expected") == 0)
            .then(0.0)
            .when(
                (pl.col("reporting_share") >= p.min_share_for_scaling)
                & (pl.col("reporting_share") > 0)
            )
            .then(scaled)
            .otherwise(silent_allowance)
        )
    out = out.with_columns(
        unreported.alias("lnu_unreported_m3h"),
        _allowance_m3h(pl.col("unmetered_households"), pl.col("unmetered_non_households"), p).alias(
            "lnu_allowance_m3h"
        ),
    ).with_columns(
        (
            pl.col("lnu_measured_m3h") + pl.col("lnu_unreported_m3h") + pl.col("lnu_allowance_m3h")
        ).alias("lnu_m3h")
    )
    out = out.with_columns((pl.col("mnf_m3h") - pl.col("lnu_m3h")).alias("nnf_m3h"))
    return out.drop(
        "_exp_hh",
        "_exp_nh",
        "_rep_hh",
        "_rep_nh",
        "unmetered_households",
        "unmetered_non_households",
    ).sort("dma_id", "night_date")
