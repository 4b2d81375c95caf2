"""Local wall-clock time per DMA, computed from UTC timestamps and the DMA's IANA time zone.

Night windows, local days and billing periods are defined in local clock time, while every stored
timestamp is UTC. polars converts time zones per column (one zone per call), so frames that mix
DMAs from several zones are converted zone by zone and the local time is kept as a *naive*
datetime: that way rows from Europe/London and Asia/Shanghai can live in one column.

A naive local time is ambiguous in the repeated hour of a fall-back night; wherever the instant
matters, callers keep the UTC ``ts`` next to it.
"""

from __future__ import annotations

from datetime import timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import polars as pl

LOCAL_NAIVE = pl.Datetime("us")


def _is_valid_zone(name: str | None) -> bool:
    if not name:
        return False
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def dma_timezones(dmas: pl.DataFrame) -> pl.DataFrame:
    """``dma_id → timezone`` for DMAs whose zone name is a valid IANA zone.

    A DMA without a valid zone cannot have local nights or days; it is left out here, and so
    every analytic silently omits it rather than guessing UTC (the flows log missing DMAs).
    """
    zones = dmas.select("dma_id", "timezone").unique(subset="dma_id", keep="first")
    valid = {z: _is_valid_zone(z) for z in zones["timezone"].unique().to_list()}
    ok = [z for z, good in valid.items() if good]
    return zones.filter(pl.col("timezone").is_in(ok))


def attach_timezone(frame: pl.DataFrame, dmas: pl.DataFrame) -> pl.DataFrame:
    """Inner-join the DMA's time zone onto ``frame`` (rows of unknown DMAs are dropped)."""
    return frame.join(dma_timezones(dmas), on="dma_id", how="inner")


def to_local(frame: pl.DataFrame, ts_col: str, out_col: str) -> pl.DataFrame:
    """Add ``out_col``: the naive local wall-clock time of the UTC instant in ``ts_col``.

    ``frame`` must carry a ``timezone`` column. The wall clock of a real instant always exists,
    so this conversion never fails, even across daylight-saving transitions.
    """
    if frame.height == 0:
        return frame.with_columns(pl.lit(None, dtype=LOCAL_NAIVE).alias(out_col))
    parts = []
    for zone in frame["timezone"].unique().to_list():
        part = frame.filter(pl.col("timezone") == zone)
        parts.append(
            part.with_columns(
                pl.col(ts_col).dt.convert_time_zone(zone).dt.replace_time_zone(None).alias(out_col)
            )
        )
    return pl.concat(parts, how="vertical")


def from_local(frame: pl.DataFrame, naive_col: str, out_col: str) -> pl.DataFrame:
    """Add ``out_col``: the UTC instant at which the local wall clock shows ``naive_col``.

    Conventions for the two daylight-saving cases, so a local boundary always maps to one instant:
    an ambiguous time (fall back) takes its *earliest* occurrence, so a local day or night that
    starts in the repeated hour includes both passes; a non-existent time (spring forward) maps to
    the first instant after the gap, i.e. the instant at which the clock shows ``naive + 1 h``
    (every real-world gap at a day or night boundary is one hour).
    """
    if frame.height == 0:
        return frame.with_columns(pl.lit(None, dtype=pl.Datetime("us", "UTC")).alias(out_col))
    parts = []
    for zone in frame["timezone"].unique().to_list():
        part = frame.filter(pl.col("timezone") == zone)

        def localize(expr: pl.Expr, zone: str = zone) -> pl.Expr:
            return expr.dt.replace_time_zone(
                zone, ambiguous="earliest", non_existent="null"
            ).dt.convert_time_zone("UTC")

        parts.append(
            part.with_columns(
                pl.coalesce(
                    localize(pl.col(naive_col)),
                    localize(pl.col(naive_col) + timedelta(hours=1)),
                ).alias(out_col)
            )
        )
    return pl.concat(parts, how="vertical")


def local_day_bounds(frame: pl.DataFrame, date_col: str = "local_date") -> pl.DataFrame:
    """Add ``day_start_ts``, ``day_end_ts`` (UTC) and ``day_hours`` for the date in ``date_col``.

    ``day_hours`` is 24 on ordinary days and 23 or 25 on daylight-saving days: daily volumes and
    the FAVAD night-day factor must integrate over the hours that really exist.
    ``frame`` must carry a ``timezone`` column.
    """
    with_naive = frame.with_columns(
        pl.col(date_col).cast(LOCAL_NAIVE).alias("_day_open"),
        (pl.col(date_col).cast(LOCAL_NAIVE) + timedelta(days=1)).alias("_day_close"),
    )
    bounded = from_local(
        from_local(with_naive, "_day_open", "day_start_ts"), "_day_close", "day_end_ts"
    )
    return bounded.drop("_day_open", "_day_close").with_columns(
        ((pl.col("day_end_ts") - pl.col("day_start_ts")).dt.total_seconds() / 3600.0).alias(
            "day_hours"
        )
    )
