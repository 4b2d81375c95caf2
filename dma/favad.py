"""FAVAD night-day factor (NDF): from a night leakage rate to a daily leakage volume.

Leakage follows pressure, L ∝ P^N1 (Fixed and Variable Area Discharge). Night pressure is the
highest of the day (demand and head loss are lowest), so NNF × 24 would overstate daily losses.
NDF = Σ_h (P_h / P_night)^N1 over the hours of the local day, in hours/day, with P_h the mean
average-zone-point pressure of local hour h and P_night the mean pressure during the MNF window;
daily real losses ≈ NNF × NDF.

Local hours are real hours: on a spring-forward day there are 23, on a fall-back day 25 (local
01:00 occurs twice and both occurrences are summed), which is why hours are keyed by the UTC
instant at which the local hour starts rather than by the clock hour number.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from dma.local_time import attach_timezone, local_day_bounds, to_local

NDF_SCHEMA: dict[str, pl.DataType] = {
    "dma_id": pl.String(),
    "night_date": pl.Date(),
    "day_hours": pl.Float64(),
    "pressure_hours": pl.UInt32(),
    "p_night_m": pl.Float64(),
    "ndf_h": pl.Float64(),
    "ndf_source": pl.String(),
}


@dataclass(frozen=True)
class FavadParams:
    """FAVAD conventions.

    n1: leakage exponent; 0.5 rigid pipes with fixed-area holes, 1.5 flexible pipes with
        pressure-dependent areas, 1.0 the usual default for a mixed network.
    no_pressure_ndf_h: NDF used when there is no usable pressure for the day (24 h/day: as if
        pressure were constant).
    default_follows_day_length: scale that default by day_hours / 24 (23 or 25 on DST days),
        which is what constant pressure would give with the formula.
    min_hour_share: share of the local day's hours that must have pressure; with fewer the
        default is used. Between that and complete, the sum is scaled by day_hours / hours seen
        (mean ratio × day hours), which equals the plain sum on a complete day.
    """

    n1: float = 1.0
    no_pressure_ndf_h: float = 24.0
    default_follows_day_length: bool = True
    min_hour_share: float = 0.75


def night_day_factor(
    pressure: pl.DataFrame,
    mnf: pl.DataFrame,
    dmas: pl.DataFrame,
    params: FavadParams | None = None,
) -> pl.DataFrame:
    """NDF per DMA and night (``NDF_SCHEMA``), one row per row of ``mnf``.

    ``pressure`` is ``DMA_PRESSURE``; ``mnf`` needs ``dma_id, night_date, mnf_start_ts,
    mnf_end_ts``. The night's local date is the local day whose hours are summed. Negative
    pressure (below atmospheric) drives no outflow and is clipped to 0; a non-positive P_night
    makes the ratio meaningless and the default is used. ``ndf_source`` says which it was.
    """
    p = params or FavadParams()
    nights = attach_timezone(mnf.select("dma_id", "night_date", "mnf_start_ts", "mnf_end_ts"), dmas)
    nights = local_day_bounds(nights, "night_date")

    samples = pressure.select("dma_id", "ts", "pressure_m").filter(
        pl.col("ts").is_not_null()
        & pl.col("pressure_m").is_not_null()
        & pl.col("pressure_m").is_finite()
    )
    samples = samples.with_columns(pl.col("pressure_m").clip(lower_bound=0.0))
    samples = to_local(attach_timezone(samples, dmas), "ts", "_local")
    hour_start = pl.col("ts") - (pl.col("_local") - pl.col("_local").dt.truncate("1h"))
    hourly = (
        samples.with_columns(pl.col("_local").dt.date().alias("night_date"), hour_start.alias("_h"))
        .group_by("dma_id", "night_date", "_h")
        .agg(pl.col("pressure_m").mean().alias("_p_h"))
    )

    in_window = (
        samples.select("dma_id", "ts", "pressure_m")
        .sort("ts")
        .join_asof(
            nights.select("dma_id", "night_date", "mnf_start_ts", "mnf_end_ts").sort(
                "mnf_start_ts"
            ),
            left_on="ts",
            right_on="mnf_start_ts",
            by="dma_id",
            strategy="backward",
            check_sortedness=False,  # sorted globally by the key; groups inherit it
        )
        .filter(pl.col("night_date").is_not_null() & (pl.col("ts") < pl.col("mnf_end_ts")))
        .group_by("dma_id", "night_date")
        .agg(pl.col("pressure_m").mean().alias("p_night_m"))
    )

    ratios = (
        hourly.join(in_window, on=["dma_id", "night_date"], how="inner")
        .filter(pl.col("p_night_m") > 0)
        .with_columns(((pl.col("_p_h") / pl.col("p_night_m")) ** p.n1).alias("_r"))
        .group_by("dma_id", "night_date")
        .agg(pl.col("_r").mean().alias("_mean_r"), pl.len().cast(pl.UInt32).alias("pressure_hours"))
    )

    default = pl.lit(p.no_pressure_ndf_h)
    if p.default_follows_day_length:
        default = default * pl.col("day_hours") / 24.0
    enough = pl.col("pressure_hours").fill_null(0) >= p.min_hour_share * pl.col("day_hours")
    out = (
        nights.join(in_window, on=["dma_id", "night_date"], how="left")
        .join(ratios, on=["dma_id", "night_date"], how="left")
        .with_columns(
            pl.when(enough)
            .then(pl.col("_mean_r") * pl.col("day_hours"))
            .otherwise(default)
            .alias("ndf_h"),
            pl.when(enough)
            .then(pl.lit("pressure"))
            .otherwise(pl.lit("default"))
            .alias("ndf_source"),
            pl.col("pressure_hours").fill_null(0),
        )
    )
    return out.select([pl.col(c).cast(t) for c, t in NDF_SCHEMA.items()]).sort(
        "dma_id", "night_date"
    )


def daily_real_losses(nnf_m3h: pl.Expr, ndf_h: pl.Expr, clip_negative: bool = True) -> pl.Expr:
    """Daily real losses (m³/day) ≈ NNF (m³/h) × NDF (h/day).

    A negative NNF (LNU allowances above the measured minimum) is no physical loss; with
    ``clip_negative`` the estimate is floored at 0 while NNF itself stays unclipped.
    """
    losses = nnf_m3h * ndf_h
    return losses.clip(lower_bound=0.0) if clip_negative else losses
