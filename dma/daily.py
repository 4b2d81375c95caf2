"""The ``dma_daily`` result: one row per DMA and local day, joining inflow, MNF, LNU, NNF and NDF.

Everything that an operator reads off a DMA each morning, in one frame so that the flow writes it
in one statement and dashboards never recombine the parts with different day conventions. The
night belongs to the local day it falls in (00:00–05:00 local of that date), and the daily real
loss of day D is NNF(night D) × NDF(day D).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

from dma.favad import FavadParams, daily_real_losses, night_day_factor
from dma.inflow import volume_between
from dma.local_time import attach_timezone, local_day_bounds, to_local
from dma.night_flow import NightFlowParams, minimum_night_flow
from dma.night_use import NightUseParams, legitimate_night_use

DMA_DAILY: dict[str, pl.DataType] = {
    "dma_id": pl.String(),
    "local_date": pl.Date(),
    "day_hours": pl.Float64(),
    "inflow_m3": pl.Float64(),
    "inflow_coverage": pl.Float64(),
    "mnf_m3h": pl.Float64(),
    "mnf_hour": pl.Int8(),
    "mnf_start_ts": pl.Datetime("us", "UTC"),
    "lnu_measured_m3h": pl.Float64(),
    "lnu_unreported_m3h": pl.Float64(),
    "lnu_allowance_m3h": pl.Float64(),
    "lnu_m3h": pl.Float64(),
    "nnf_m3h": pl.Float64(),
    "ndf_h": pl.Float64(),
    "ndf_source": pl.String(),
    "real_loss_m3": pl.Float64(),
    "meters_expected": pl.Int64(),
    "meters_reporting": pl.Int64(),
    "reporting_share": pl.Float64(),
}


@dataclass(frozen=True)
class DmaDailyParams:
    """Parameters of every step, plus the daily-volume rules.

    min_day_coverage: share of the local day the net inflow samples must cover for a daily
        volume (below it the volume is null; between it and 1 the mean rate is scaled to the day).
    clip_negative_losses: floor the daily real loss estimate at 0 (NNF itself is never clipped).
    """

    night_flow: NightFlowParams = field(default_factory=NightFlowParams)
    night_use: NightUseParams = field(default_factory=NightUseParams)
    favad: FavadParams = field(default_factory=FavadParams)
    min_day_coverage: float = 0.9
    clip_negative_losses: bool = True


def dma_daily(
    flow: pl.DataFrame,
    pressure: pl.DataFrame,
    intervals: pl.DataFrame,
    meters: pl.DataFrame,
    dmas: pl.DataFrame,
    params: DmaDailyParams | None = None,
) -> pl.DataFrame:
    """``DMA_DAILY`` rows for every DMA and local day that has net inflow samples.

    Inputs are ``DMA_FLOW``, ``DMA_PRESSURE``, ``INTERVALS``, ``METERS`` and ``DMAS``. Days
    without a valid night window keep their inflow volume and have null night columns.
    ``inflow_m3`` integrates over the real length of the local day (23/24/25 h).
    """
    p = params or DmaDailyParams()
    days = to_local(attach_timezone(flow.select("dma_id", "ts"), dmas), "ts", "_local")
    days = days.select(
        "dma_id", "timezone", pl.col("_local").dt.date().alias("local_date")
    ).unique()
    days = local_day_bounds(days, "local_date").rename(
        {"day_start_ts": "start_ts", "day_end_ts": "end_ts"}
    )
    volumes = volume_between(flow, days, p.min_day_coverage).select(
        "dma_id",
        "local_date",
        "day_hours",
        pl.col("volume_m3").alias("inflow_m3"),
        pl.col("coverage").alias("inflow_coverage"),
    )

    mnf = minimum_night_flow(flow, dmas, p.night_flow)
    lnu = legitimate_night_use(mnf, intervals, meters, dmas, p.night_use)
    ndf = night_day_factor(pressure, mnf, dmas, p.favad).drop("day_hours")
    nights = lnu.join(ndf, on=["dma_id", "night_date"], how="left").rename(
        {"night_date": "local_date"}
    )
    out = volumes.join(nights, on=["dma_id", "local_date"], how="left").with_columns(
        daily_real_losses(pl.col("nnf_m3h"), pl.col("ndf_h"), p.clip_negative_losses).alias(
            "real_loss_m3"
        )
    )
    return out.select([pl.col(c).cast(t) for c, t in DMA_DAILY.items()]).sort(
        "dma_id", "local_date"
    )
