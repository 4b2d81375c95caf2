"""Minimum night flow (MNF) per DMA and local night.

At night customer use is lowest, so the lowest sustained inflow is dominated by leakage. "Sustained"
means a rolling mean over one *real* hour (not one clock hour: on the spring-forward night the
window 00:30 GMT → 02:30 BST is one hour long). The night window itself is local clock time, so
it moves against UTC with daylight saving and differs per DMA time zone.

A night is named by the local date of its morning (for the default 00:00–05:00 window that is
simply the local date of the night's samples).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import time, timedelta

import polars as pl

from dma.inflow import sample_step
from dma.local_time import attach_timezone, to_local

MNF_SCHEMA: dict[str, pl.DataType] = {
    "dma_id": pl.String(),
    "night_date": pl.Date(),
    "mnf_m3h": pl.Float64(),
    "mnf_start_ts": pl.Datetime("us", "UTC"),
    "mnf_end_ts": pl.Datetime("us", "UTC"),
    "mnf_local_start": pl.Time(),
    "mnf_hour": pl.Int8(),
    "windows": pl.UInt32(),
}


@dataclass(frozen=True)
class NightFlowParams:
    """Night window and averaging for MNF.

    night_start, night_end: local clock times bounding the night (default 00:00–05:00, the usual
        UK/IWA practice). ``night_start > night_end`` means the night spans midnight; it is then
        named by the date of its morning.
    window: length of the rolling mean (1 h, the MNF definition); every window lies wholly
        inside the night.
    min_window_coverage: a window counts only if its samples cover at least this share of it
        (samples × the DMA's median step); 0.75 tolerates one missing 15-min sample per hour.
    """

    night_start: time = time(0, 0)
    night_end: time = time(5, 0)
    window: timedelta = timedelta(hours=1)
    min_window_coverage: float = 0.75


def _since_midnight(t: time) -> timedelta:
    return timedelta(hours=t.hour, minutes=t.minute, seconds=t.second, microseconds=t.microsecond)


def minimum_night_flow(
    flow: pl.DataFrame, dmas: pl.DataFrame, params: NightFlowParams | None = None
) -> pl.DataFrame:
    """One row per DMA and night with a valid window (``MNF_SCHEMA``).

    ``flow`` is ``DMA_FLOW`` (net inflow). Candidate windows start at every sample ``t`` and cover
    ``[t, t + window)``. A window is valid when its local start is at or after the night's start
    and the local wall clock at ``t + window`` is at or before the night's end (both compared as
    local date-times of that night), so DST nights simply have fewer (spring) or more (autumn)
    candidate windows. Ties go to the earliest window. Nights without a valid window are absent.
    """
    p = params or NightFlowParams()
    spans_midnight = p.night_start >= p.night_end
    samples = (
        flow.select("dma_id", "ts", "flow_m3h")
        .filter(
            pl.col("ts").is_not_null()
            & pl.col("flow_m3h").is_not_null()
            & pl.col("flow_m3h").is_finite()
        )
        .group_by("dma_id", "ts")
        .agg(pl.col("flow_m3h").mean())
    )
    samples = attach_timezone(samples, dmas).sort("dma_id", "ts")
    if samples.height == 0:
        return pl.DataFrame(schema=MNF_SCHEMA)

    windows = samples.rolling(
        index_column="ts", period=p.window, offset=timedelta(0), closed="left", group_by="dma_id"
    ).agg(pl.col("flow_m3h").mean().alias("mnf_m3h"), pl.len().alias("_n"))
    windows = windows.join(samples.select("dma_id", "timezone").unique(), on="dma_id").join(
        sample_step(samples), on="dma_id", how="left"
    )
    windows = windows.with_columns((pl.col("ts") + p.window).alias("mnf_end_ts"))
    windows = to_local(windows, "ts", "_local_start")
    windows = to_local(windows, "mnf_end_ts", "_local_end")

    start_off = _since_midnight(p.night_start)
    end_off = _since_midnight(p.night_end)
    local_day = pl.col("_local_start").dt.date()
    after_start = pl.col("_local_start").dt.time() >= pl.lit(p.night_start)
    night_date = (
        pl.when(after_start).then(local_day + timedelta(days=1)).otherwise(local_day)
        if spans_midnight
        else local_day
    )
    opening_day = timedelta(days=1) if spans_midnight else timedelta(0)
    night_open = pl.col("night_date").cast(pl.Datetime("us")) - opening_day + start_off
    night_close = pl.col("night_date").cast(pl.Datetime("us")) + end_off
    window_s = p.window.total_seconds()
    covered = pl.col("_n") * pl.col("step_s").fill_null(window_s) >= (
        p.min_window_coverage * window_s
    )

    valid = windows.with_columns(night_date.alias("night_date")).filter(
        (pl.col("_local_start") >= night_open) & (pl.col("_local_end") <= night_close) & covered
    )
    best = (
        valid.sort("dma_id", "night_date", "mnf_m3h", "ts")
        .group_by("dma_id", "night_date", maintain_order=True)
        .agg(
            pl.col("mnf_m3h").first(),
            pl.col("ts").first().alias("mnf_start_ts"),
            pl.col("mnf_end_ts").first(),
            pl.col("_local_start").first().dt.time().alias("mnf_local_start"),
            pl.col("_local_start").first().dt.hour().cast(pl.Int8).alias("mnf_hour"),
            pl.len().cast(pl.UInt32).alias("windows"),
        )
    )
    return best.select([pl.col(c).cast(t) for c, t in MNF_SCHEMA.items()]).sort(
        "dma_id", "night_date"
    )
