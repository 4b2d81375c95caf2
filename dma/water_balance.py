"""IWA/AWWA water balance per DMA and period, with UARL and the infrastructure leakage index.

The balance (IWA 2000, AWWA M36):

    SIV = authorized consumption + water losses
    authorized = billed metered + billed unmetered + unbilled metered + unbilled unmetered
    water losses = SIV − authorized = apparent losses + real losses
    apparent = unauthorized consumption + customer metering inaccuracies + data handling errors
    real losses (CARL) = water losses − apparent losses
    NRW = SIV − billed authorized;   NRW % = NRW / SIV × 100
    UARL [L/day] = (18·Lm + 0.8·Nc + 25·Lp) · P;   ILI = CARL / UARL (same period)

Like the AWWA Free Water Audit Software, every component says whether it was ``measured`` or
``estimated``: a derived component is measured only if everything it is computed from is, so the
quality of CARL (always estimated, since apparent losses are) is visible next to its value.
Real losses are a remainder, so they carry every other component's error; reporting the parts
with their source is what makes an ILI defensible.

From data: ``system_input_volume(flow, periods, dmas).join(metered_consumption(intervals,
meters, periods, dmas), on=["dma_id", "period"])`` is a valid ``inputs`` frame for
:func:`water_balance` (add ``billed_unmetered_m3`` from the billing system if there is any).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import polars as pl

from dma.inflow import volume_between
from dma.local_time import LOCAL_NAIVE, attach_timezone, from_local

MEASURED = "measured"
ESTIMATED = "estimated"
DEFAULT = "default"
"""A component taken from a default percentage (WaterBalanceParams), not from this DMA's data:
the AWWA Free Water Audit Software grades such inputs lowest."""

VALID = "VALID"
DATA_INCONSISTENT = "DATA_INCONSISTENT"
"""Real losses come out below zero: the inputs cannot all be right. ``carl_low_m3`` /
``carl_high_m3`` give the range real losses take as the default-sourced apparent losses go from
their defaults to zero; a range that stays below zero says measured inputs are wrong too."""

# Apparent-loss components: (component, volume column, per-DMA percentage column).
APPARENT_COMPONENTS = (
    ("unauthorized_consumption", "unauthorized_m3", "unauthorized_pct_of_siv"),
    ("customer_metering_inaccuracies", "meter_inaccuracy_m3", "meter_under_registration_pct"),
    ("systematic_data_handling_errors", "data_handling_m3", "data_handling_pct_of_billed_metered"),
)

COMPONENTS: dict[str, pl.DataType] = {
    "dma_id": pl.String(),
    "period": pl.String(),
    "component": pl.String(),
    "value_m3": pl.Float64(),
    "source": pl.String(),
}

SUMMARY: dict[str, pl.DataType] = {
    "dma_id": pl.String(),
    "period": pl.String(),
    "period_days": pl.Float64(),
    "siv_m3": pl.Float64(),
    "billed_authorized_m3": pl.Float64(),
    "nrw_m3": pl.Float64(),
    "nrw_pct": pl.Float64(),
    "carl_m3": pl.Float64(),
    "carl_l_per_connection_day": pl.Float64(),
    "avg_pressure_m": pl.Float64(),
    "uarl_l_per_day": pl.Float64(),
    "uarl_m3": pl.Float64(),
    "ili": pl.Float64(),
    "uarl_within_validity": pl.Boolean(),
    "validity": pl.String(),
    "carl_low_m3": pl.Float64(),
    "carl_high_m3": pl.Float64(),
}


@dataclass(frozen=True)
class WaterBalanceParams:
    """Estimated components and UARL constants.

    Percentages default to the AWWA Free Water Audit Software (v5/v6) defaults where that tool has
    one; check them against the edition and regulator you report to.

    unbilled_unmetered_pct_of_siv: flushing, fire fighting, street cleaning (AWWA default 1.25 %).
    unauthorized_pct_of_siv: theft, illegal connections (AWWA default 0.25 %).
    meter_under_registration_pct: customer meters register this % less than passes; the lost
        volume is metered × pct / (100 − pct) because the meters saw only (100 − pct) % of the
        true use (AWWA method). No AWWA default exists; 2 % is a typical test-bench figure.
    data_handling_pct_of_billed_metered: billing/reading errors (AWWA default 0.25 %).
    billed_unmetered_source, unbilled_metered_source: source of these inputs when the input frame
        provides them without a ``*_source`` column. Billed unmetered volumes are flat-rate
        estimates in the billing system, hence ``estimated``.
    uarl_mains_l_per_km_day_m, uarl_connection_l_per_day_m, uarl_private_l_per_km_day_m: the
        Lambert et al. (IWA 1999) UARL coefficients 18, 0.8, 25.
    uarl_min_connections, uarl_min_density_per_km, uarl_min_pressure_m: the UARL formula was
        fitted on systems with > 3000 connections, > 20 connections/km and > 25 m (AWWA M36);
        outside them ILI is reported but flagged (``uarl_within_validity`` false).
    siv_min_coverage: a SIV from net inflow needs samples covering this share of the period.
    siv_measured_coverage: at or above this coverage SIV counts as measured; between the two it
        is scaled over the gaps and counts as estimated.
    """

    unbilled_unmetered_pct_of_siv: float = 1.25
    unauthorized_pct_of_siv: float = 0.25
    meter_under_registration_pct: float = 2.0
    data_handling_pct_of_billed_metered: float = 0.25
    billed_unmetered_source: str = ESTIMATED
    unbilled_metered_source: str = MEASURED
    uarl_mains_l_per_km_day_m: float = 18.0
    uarl_connection_l_per_day_m: float = 0.8
    uarl_private_l_per_km_day_m: float = 25.0
    uarl_min_connections: int = 3000
    uarl_min_density_per_km: float = 20.0
    uarl_min_pressure_m: float = 25.0
    siv_min_coverage: float = 0.9
    siv_measured_coverage: float = 0.99


class WaterBalance(NamedTuple):
    """``components``: a row per DMA × period × component; ``summary``: a row per DMA × period."""

    components: pl.DataFrame
    summary: pl.DataFrame


def period_bounds(periods: pl.DataFrame, dmas: pl.DataFrame) -> pl.DataFrame:
    """UTC bounds of local-date periods per DMA.

    ``periods`` has ``period, start_date, end_date`` (local dates, end exclusive) and optionally
    ``dma_id`` (otherwise every period applies to every DMA). Adds ``start_ts, end_ts`` (UTC at
    local midnight) and ``period_days`` = real elapsed hours / 24, since leakage runs through the
    23- and 25-hour days too.
    """
    if "dma_id" not in periods.columns:
        periods = dmas.select("dma_id").unique().join(periods, how="cross")
    framed = attach_timezone(periods, dmas).with_columns(
        pl.col("start_date").cast(LOCAL_NAIVE).alias("_open"),
        pl.col("end_date").cast(LOCAL_NAIVE).alias("_close"),
    )
    framed = from_local(from_local(framed, "_open", "start_ts"), "_close", "end_ts")
    return framed.drop("_open", "_close").with_columns(
        ((pl.col("end_ts") - pl.col("start_ts")).dt.total_seconds() / 86400.0).alias("period_days")
    )


def system_input_volume(
    flow: pl.DataFrame,
    periods: pl.DataFrame,
    dmas: pl.DataFrame,
    params: WaterBalanceParams | None = None,
) -> pl.DataFrame:
    """SIV per DMA and period from net inflow (``DMA_FLOW``).

    Returns ``dma_id, period, period_days, siv_m3, siv_coverage, siv_source``; SIV is null when
    coverage is below ``siv_min_coverage``.
    """
    p = params or WaterBalanceParams()
    bounds = period_bounds(periods, dmas)
    vol = volume_between(flow, bounds, p.siv_min_coverage)
    return vol.select(
        "dma_id",
        "period",
        "period_days",
        pl.col("volume_m3").alias("siv_m3"),
        pl.col("coverage").alias("siv_coverage"),
        pl.when(pl.col("coverage") >= p.siv_measured_coverage)
        .then(pl.lit(MEASURED))
        .otherwise(pl.lit(ESTIMATED))
        .alias("siv_source"),
    )


def metered_consumption(
    intervals: pl.DataFrame, meters: pl.DataFrame, periods: pl.DataFrame, dmas: pl.DataFrame
) -> pl.DataFrame:
    """Customer-meter volumes per DMA and period, split into billed and unbilled metered.

    An interval (volume ending at ``ts``) belongs to the period containing its end; a meter with
    no billing ``account`` (municipal buildings, metered hydrants) is unbilled metered.
    Returns ``dma_id, period, billed_metered_m3, unbilled_metered_m3``.
    """
    bounds = period_bounds(periods, dmas).select("dma_id", "period", "start_ts", "end_ts")
    iv = (
        intervals.select("meter_id", "ts", "volume")
        .filter(pl.col("volume").is_not_null() & pl.col("volume").is_finite())
        .join(meters.select("meter_id", "dma_id", "account"), on="meter_id", how="inner")
    )
    # Half-open (start, end]: an interval ending exactly at local midnight is the previous day's.
    matched = (
        iv.sort("ts")
        .join_asof(
            bounds.sort("start_ts"),
            left_on="ts",
            right_on="start_ts",
            by="dma_id",
            strategy="backward",
            check_sortedness=False,  # sorted globally by the key; groups inherit it
            allow_exact_matches=False,
        )
        .filter(pl.col("period").is_not_null() & (pl.col("ts") <= pl.col("end_ts")))
    )
    sums = matched.group_by("dma_id", "period").agg(
        pl.col("volume").filter(pl.col("account").is_not_null()).sum().alias("billed_metered_m3"),
        pl.col("volume").filter(pl.col("account").is_null()).sum().alias("unbilled_metered_m3"),
    )
    return (
        bounds.select("dma_id", "period")
        .join(sums, on=["dma_id", "period"], how="left")
        .with_columns(pl.col("billed_metered_m3", "unbilled_metered_m3").fill_null(0.0))
    )


def _src(*sources: pl.Expr) -> pl.Expr:
    """Measured only if every source it derives from is measured."""
    all_measured = pl.all_horizontal([s == MEASURED for s in sources])
    return pl.when(all_measured).then(pl.lit(MEASURED)).otherwise(pl.lit(ESTIMATED))


def _weakest(*sources: pl.Expr) -> pl.Expr:
    """The lowest grade among ``sources``: default < estimated < measured (AWWA data grading)."""
    any_default = pl.any_horizontal([s == DEFAULT for s in sources])
    all_measured = pl.all_horizontal([s == MEASURED for s in sources])
    return (
        pl.when(any_default)
        .then(pl.lit(DEFAULT))
        .when(all_measured)
        .then(pl.lit(MEASURED))
        .otherwise(pl.lit(ESTIMATED))
    )


def _apparent_components(
    frame: pl.DataFrame, dmas: pl.DataFrame, p: WaterBalanceParams
) -> pl.DataFrame:
    """The three apparent-loss volumes with their source, per DMA x period.

    In order of preference: a volume in the inputs (``unauthorized_m3``, ``meter_inaccuracy_m3``,
    ``data_handling_m3``, with ``<volume>_source``, default ``measured``: e.g. from a meter test
    programme or a billing audit); this DMA's percentage (the ``dmas`` columns of
    ``APPARENT_COMPONENTS``: ``estimated``); the default percentage of ``p`` (``default``).
    """
    siv, bm, um = pl.col("siv_m3"), pl.col("billed_metered_m3"), pl.col("unbilled_metered_m3")
    pct_cols = [pct for _, _, pct in APPARENT_COMPONENTS if pct in dmas.columns]
    if pct_cols:
        frame = frame.join(
            dmas.select("dma_id", *pct_cols).unique("dma_id", keep="first"),
            on="dma_id",
            how="left",
        )
    defaults = {
        "unauthorized_pct_of_siv": p.unauthorized_pct_of_siv,
        "meter_under_registration_pct": p.meter_under_registration_pct,
        "data_handling_pct_of_billed_metered": p.data_handling_pct_of_billed_metered,
    }

    def volume(pct_col: str, pct: pl.Expr) -> pl.Expr:
        if pct_col == "unauthorized_pct_of_siv":
            return siv * pct / 100.0
        if pct_col == "meter_under_registration_pct":
            # Meters saw only (100 - pct) % of the true use (AWWA method).
            return (bm + um) * pct / (100.0 - pct)
        return bm * pct / 100.0

    out = []
    for _, vol, pct_col in APPARENT_COMPONENTS:
        given = pl.col(vol) if vol in frame.columns else pl.lit(None, dtype=pl.Float64)
        given_src = (
            pl.col(f"{vol}_source").fill_null(MEASURED)
            if f"{vol}_source" in frame.columns
            else pl.lit(MEASURED)
        )
        own = pl.col(pct_col) if pct_col in frame.columns else pl.lit(None, dtype=pl.Float64)
        default = pl.lit(defaults[pct_col])
        out.append(
            pl.when(given.is_not_null())
            .then(given)
            .when(own.is_not_null())
            .then(volume(pct_col, own))
            .otherwise(volume(pct_col, default))
            .alias(vol)
        )
        out.append(
            pl.when(given.is_not_null())
            .then(given_src)
            .when(own.is_not_null())
            .then(pl.lit(ESTIMATED))
            .otherwise(pl.lit(DEFAULT))
            .alias(f"{vol}_source")
        )
    return frame.with_columns(out).drop(pct_cols)


def water_balance(
    inputs: pl.DataFrame, dmas: pl.DataFrame, params: WaterBalanceParams | None = None
) -> WaterBalance:
    """The balance for each row of ``inputs`` (one per DMA × period).

    ``inputs`` columns: ``dma_id, period, period_days, siv_m3, billed_metered_m3`` and optionally
    ``billed_unmetered_m3``, ``unbilled_metered_m3`` (absent = 0, measured: there is none),
    ``avg_pressure_m`` (overrides the DMA attribute, e.g. measured AZP pressure for the period) and
    ``siv_source``, ``billed_metered_source``, ``billed_unmetered_source``,
    ``unbilled_metered_source`` (``measured``/``estimated``). ``dmas`` supplies mains_km,
    service_connections, private_pipe_km, avg_pressure_m and optionally the per-DMA apparent-loss
    percentages (see :func:`_apparent_components`; inputs may give the volumes themselves).

    CARL may come out negative when the apparent losses exceed the losses; it is reported as is,
    the balance is graded ``DATA_INCONSISTENT`` in ``validity`` with the range real losses take
    without the default-sourced components (``carl_low_m3`` .. ``carl_high_m3``), and ILI is left
    empty: a negative ILI is not a performance figure.
    """
    p = params or WaterBalanceParams()
    frame = inputs
    defaults = {
        "siv_source": MEASURED,
        "billed_metered_source": MEASURED,
        "billed_unmetered_source": p.billed_unmetered_source,
        "unbilled_metered_source": p.unbilled_metered_source,
    }
    for volume in ("billed_unmetered_m3", "unbilled_metered_m3"):
        source = volume.removesuffix("_m3") + "_source"
        if volume not in frame.columns:
            frame = frame.with_columns(pl.lit(0.0).alias(volume), pl.lit(MEASURED).alias(source))
    for source, default in defaults.items():
        if source not in frame.columns:
            frame = frame.with_columns(pl.lit(default).alias(source))
        frame = frame.with_columns(pl.col(source).fill_null(default))

    attrs = dmas.select(
        "dma_id",
        "mains_km",
        "service_connections",
        "private_pipe_km",
        pl.col("avg_pressure_m").alias("_dma_pressure"),
    ).unique(subset="dma_id", keep="first")
    frame = frame.join(attrs, on="dma_id", how="left")
    pressure = (
        pl.coalesce(pl.col("avg_pressure_m"), pl.col("_dma_pressure"))
        if "avg_pressure_m" in frame.columns
        else pl.col("_dma_pressure")
    )
    siv, bm, bu, um = (
        pl.col("siv_m3"),
        pl.col("billed_metered_m3"),
        pl.col("billed_unmetered_m3"),
        pl.col("unbilled_metered_m3"),
    )
    w = frame.with_columns(pressure.alias("avg_pressure_m"))
    w = _apparent_components(w, dmas, p)
    w = w.with_columns(
        (siv * p.unbilled_unmetered_pct_of_siv / 100.0).alias("unbilled_unmetered_m3"),
        (bm + bu).alias("billed_authorized_m3"),
    )
    apparent_cols = [vol for _, vol, _ in APPARENT_COMPONENTS]
    from_data = [
        pl.when(pl.col(f"{vol}_source") != DEFAULT).then(pl.col(vol)).otherwise(0.0)
        for vol in apparent_cols
    ]
    w = (
        w.with_columns(
            (um + pl.col("unbilled_unmetered_m3")).alias("unbilled_authorized_m3"),
            pl.sum_horizontal(apparent_cols).alias("apparent_m3"),
            pl.sum_horizontal(from_data).alias("_apparent_from_data"),
        )
        .with_columns(
            (pl.col("billed_authorized_m3") + pl.col("unbilled_authorized_m3")).alias(
                "authorized_m3"
            ),
        )
        .with_columns(
            (siv - pl.col("authorized_m3")).alias("water_losses_m3"),
            (siv - pl.col("billed_authorized_m3")).alias("nrw_m3"),
        )
        .with_columns((pl.col("water_losses_m3") - pl.col("apparent_m3")).alias("carl_m3"))
        .with_columns(
            pl.col("carl_m3").alias("carl_low_m3"),
            (pl.col("water_losses_m3") - pl.col("_apparent_from_data")).alias("carl_high_m3"),
            pl.when(pl.col("carl_m3") < 0)
            .then(pl.lit(DATA_INCONSISTENT))
            .when(pl.col("carl_m3").is_not_null())
            .then(pl.lit(VALID))
            .alias("validity"),
        )
    )

    uarl_l_day = (
        p.uarl_mains_l_per_km_day_m * pl.col("mains_km")
        + p.uarl_connection_l_per_day_m * pl.col("service_connections").cast(pl.Float64)
        + p.uarl_private_l_per_km_day_m * pl.col("private_pipe_km")
    ) * pl.col("avg_pressure_m")
    w = w.with_columns(uarl_l_day.alias("uarl_l_per_day")).with_columns(
        (pl.col("uarl_l_per_day") * pl.col("period_days") / 1000.0).alias("uarl_m3")
    )

    s_siv, s_bm, s_bu, s_um = (
        pl.col("siv_source"),
        pl.col("billed_metered_source"),
        pl.col("billed_unmetered_source"),
        pl.col("unbilled_metered_source"),
    )
    est = pl.lit(ESTIMATED)
    apparent_sources = [pl.col(f"{vol}_source") for _, vol, _ in APPARENT_COMPONENTS]
    rows = [
        ("system_input_volume", siv, s_siv),
        ("billed_metered_consumption", bm, s_bm),
        ("billed_unmetered_consumption", bu, s_bu),
        ("billed_authorized_consumption", pl.col("billed_authorized_m3"), _src(s_bm, s_bu)),
        ("unbilled_metered_consumption", um, s_um),
        ("unbilled_unmetered_consumption", pl.col("unbilled_unmetered_m3"), est),
        ("unbilled_authorized_consumption", pl.col("unbilled_authorized_m3"), est),
        ("authorized_consumption", pl.col("authorized_m3"), est),
        ("water_losses", pl.col("water_losses_m3"), est),
        *[(name, pl.col(vol), pl.col(f"{vol}_source")) for name, vol, _ in APPARENT_COMPONENTS],
        ("apparent_losses", pl.col("apparent_m3"), _weakest(*apparent_sources)),
        ("real_losses", pl.col("carl_m3"), _weakest(est, *apparent_sources)),
        ("revenue_water", pl.col("billed_authorized_m3"), _src(s_bm, s_bu)),
        ("non_revenue_water", pl.col("nrw_m3"), _src(s_siv, s_bm, s_bu)),
    ]
    components = pl.concat(
        [
            w.select(
                "dma_id",
                "period",
                pl.lit(name).alias("component"),
                value.cast(pl.Float64).alias("value_m3"),
                source.alias("source"),
            )
            for name, value, source in rows
        ],
        how="vertical",
    )
    # Stable order: by DMA and period, components in balance order.
    order = {name: i for i, (name, _, _) in enumerate(rows)}
    components = (
        components.with_columns(
            pl.col("component").replace_strict(order, return_dtype=pl.Int32).alias("_o")
        )
        .sort("dma_id", "period", "_o")
        .drop("_o")
    )

    conns = pl.col("service_connections").cast(pl.Float64)
    within = (
        (pl.col("service_connections") > p.uarl_min_connections)
        & (conns / pl.col("mains_km") > p.uarl_min_density_per_km)
        & (pl.col("avg_pressure_m") > p.uarl_min_pressure_m)
    ).fill_null(False)
    summary = w.with_columns(
        pl.when(siv > 0).then(pl.col("nrw_m3") / siv * 100.0).otherwise(None).alias("nrw_pct"),
        # A negative real loss has no ILI: the balance is flagged DATA_INCONSISTENT instead.
        pl.when((pl.col("uarl_m3") > 0) & (pl.col("carl_m3") >= 0))
        .then(pl.col("carl_m3") / pl.col("uarl_m3"))
        .otherwise(None)
        .alias("ili"),
        pl.when((conns > 0) & (pl.col("period_days") > 0))
        .then(pl.col("carl_m3") * 1000.0 / conns / pl.col("period_days"))
        .otherwise(None)
        .alias("carl_l_per_connection_day"),
        within.alias("uarl_within_validity"),
    )
    summary = summary.select([pl.col(c).cast(t) for c, t in SUMMARY.items()]).sort(
        "dma_id", "period"
    )
    return WaterBalance(components.select(list(COMPONENTS)), summary)
