"""``water_balance``: the IWA/AWWA water balance per DMA and period (``dma.water_balance``).

System input comes from the DMA's net inflow, billed metered consumption from the same validated
and estimated meter series billing uses, the average pressure from the zone's AZP sensors when they
report. Each input carries its data quality: SIV is measured when the inflow covers the period,
billed metered consumption is ``estimated`` when more than ``estimated_share_limit`` of it was
estimated by VEE. Periods are calendar months of local dates (cut to the run's window, then named
``start/end``) or the window itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any, Literal

import polars as pl
import psycopg
from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE

from dma.inflow import InflowParams, net_inflow
from dma.local_time import attach_timezone, local_day_bounds
from dma.water_balance import (
    ESTIMATED,
    MEASURED,
    WaterBalanceParams,
    metered_consumption,
    period_bounds,
    system_input_volume,
    water_balance,
)
from flows.late_data import fingerprints, stale_units, with_salt
from flows.load import (
    load_apparent_loss_pcts,
    load_dma_boundary,
    load_dmas,
    load_edits,
    load_exchanges,
    load_meter_reads,
    load_meters,
)
from flows.meter_series import MeterSeriesParams, meter_series
from flows.overrides import apply_overrides, settings_digest
from flows.store import lock, replace_keyed, write_marks
from flows.window import resolve_database_url, resolve_window, utc, waves
from sql.connect import connect

FLOW = "water_balance"


@dataclass(frozen=True)
class WaterBalanceSettings:
    """balance/inflow/series: the pure functions' parameters.

    period: ``month`` (calendar months of local dates, cut to the window) or ``window``.
    estimated_share_limit: billed metered consumption counts as measured while at most this share
        of its volume was estimated by VEE (AWWA grades data quality; 5 % keeps a handful of
        filled gaps from downgrading a well-read month).
    chunk_meters, slice_days: the unit of work. Billed metered consumption is a sum over meters
        and over time, so it is computed for ``chunk_meters`` meters x ``slice_days`` days at a
        time (each slice with two days of reads on either side for the register differences and
        gap estimates) and added up: memory follows the unit, not the DMA or the window.
    parallel_chunks: DMAs in flight at once (``flows.window.waves``; 0: all).
    Without ``since`` a run covers the previous calendar month and the current one to date.
    """

    balance: WaterBalanceParams = field(default_factory=WaterBalanceParams)
    inflow: InflowParams = field(default_factory=InflowParams)
    series: MeterSeriesParams = field(default_factory=MeterSeriesParams)
    period: Literal["month", "window"] = "month"
    estimated_share_limit: float = 0.05
    chunk_meters: int = 1000
    slice_days: int = 31
    parallel_chunks: int = 1


@dataclass(frozen=True)
class Period:
    label: str
    start: date  # first local date
    end: date  # local date after the last day (exclusive)


@dataclass(frozen=True)
class DmaPeriods:
    dma_id: str
    periods: list[Period]
    inputs: list[str]


def _dates(since: datetime, until: datetime) -> tuple[date, date]:
    """The window as local dates [start, end): the calendar dates of since/until in UTC."""
    end = until.date() if until.time() == datetime.min.time() else until.date() + timedelta(1)
    return since.date(), end


def periods_of(since: datetime, until: datetime, mode: str) -> list[Period]:
    start, end = _dates(since, until)
    if mode == "window":
        return [Period(f"{start.isoformat()}/{end.isoformat()}", start, end)]
    if mode != "month":
        raise ValueError(f"period must be month or window, not {mode!r}")
    out = []
    month = start.replace(day=1)
    while month < end:
        nxt = (month + timedelta(days=32)).replace(day=1)
        s, e = max(month, start), min(nxt, end)
        # A month cut only at its end is month-to-date: same key, so it is replaced as it grows.
        label = month.strftime("%Y-%m") if s == month else f"{s}/{e}"
        out.append(Period(label, s, e))
        month = nxt
    return out


def mark_flow(period: Period) -> str:
    return f"{FLOW}:{period.label}"


@task(cache_policy=NO_CACHE)
def plan_balances(
    database_url: str,
    periods: list[Period],
    as_of: datetime,
    full: bool,
    settings: WaterBalanceSettings,
) -> list[DmaPeriods]:
    salt = settings_digest(settings)
    by_dma: dict[str, tuple[list[Period], list[str]]] = {}
    with connect(database_url, autocommit=True) as conn:
        dmas = load_dmas(conn)
        for period in periods:
            ends = local_day_bounds(
                attach_timezone(
                    dmas.select("dma_id").with_columns(pl.lit(period.end).alias("end_date")), dmas
                ),
                "end_date",
            )
            units = ends.select(
                pl.col("dma_id").alias("subject_id"),
                pl.lit(period.start).alias("day"),
                pl.lit(period.start - timedelta(days=1)).alias("lo"),
                pl.lit(period.end).alias("hi"),
                pl.col("day_start_ts").alias("complete_at"),
            )
            units = with_salt(fingerprints(conn, "dma", units), salt)
            stale = stale_units(conn, mark_flow(period), units, as_of, full=full)
            for row in stale.iter_rows(named=True):
                entry = by_dma.setdefault(row["subject_id"], ([], []))
                entry[0].append(period)
                entry[1].append(row["inputs"])
    return [DmaPeriods(k, v[0], v[1]) for k, v in sorted(by_dma.items())]


def _estimated_parts(
    intervals: pl.DataFrame, meters: pl.DataFrame, bounds: pl.DataFrame
) -> pl.DataFrame:
    """Billed metered volume per DMA and period, and the part of it VEE estimated: sums, so the
    parts of several meter chunks and time slices add up."""
    iv = intervals.select("meter_id", "ts", "volume", "flag").join(
        meters.select("meter_id", "dma_id", "account").filter(pl.col("account").is_not_null()),
        on="meter_id",
    )
    joined = iv.join(bounds.select("dma_id", "period", "start_ts", "end_ts"), on="dma_id").filter(
        (pl.col("ts") > pl.col("start_ts")) & (pl.col("ts") <= pl.col("end_ts"))
    )
    return joined.group_by("dma_id", "period").agg(
        pl.col("volume").sum().alias("_billed_m3"),
        pl.col("volume").filter(pl.col("flag") == "E").sum().alias("_estimated_m3"),
    )


def slices_of(period: Period, days: int) -> list[tuple[date, date]]:
    """``period`` cut into consecutive [start, end) local-date slices of at most ``days``."""
    out = []
    start = period.start
    while start < period.end:
        end = min(start + timedelta(days=max(days, 1)), period.end)
        out.append((start, end))
        start = end
    return out


def _period_frame(dma_id: str, label: str, start: date, end: date) -> pl.DataFrame:
    return pl.DataFrame(
        {"dma_id": [dma_id], "period": [label], "start_date": [start], "end_date": [end]},
        schema={
            "dma_id": pl.String,
            "period": pl.String,
            "start_date": pl.Date,
            "end_date": pl.Date,
        },
    )


def _metered(
    conn: psycopg.Connection,
    meters: pl.DataFrame,
    dmas: pl.DataFrame,
    dma_id: str,
    period: Period,
    as_of: datetime,
    settings: WaterBalanceSettings,
) -> pl.DataFrame:
    """Billed/unbilled metered consumption of one DMA x period, with its estimated share, summed
    over units of ``chunk_meters`` meters x ``slice_days`` days (only one unit's reads in memory).
    """
    ids = meters.get_column("meter_id").to_list()
    size = max(settings.chunk_meters, 1)
    parts: list[pl.DataFrame] = []
    for start, end in slices_of(period, settings.slice_days):
        frame = _period_frame(dma_id, period.label, start, end)
        bounds = period_bounds(frame, dmas)
        lo = utc(start - timedelta(days=2))
        hi = min(utc(end + timedelta(days=2)), as_of + timedelta(microseconds=1))
        for i in range(0, len(ids), size):
            chunk = ids[i : i + size]
            cm = meters.filter(pl.col("meter_id").is_in(chunk))
            reads = load_meter_reads(conn, cm, lo, hi)
            series = meter_series(
                reads,
                cm,
                load_exchanges(conn, chunk),
                dmas,
                as_of=min(as_of, hi),
                edits=load_edits(conn, chunk, lo, hi),
                params=settings.series,
            )
            metered = metered_consumption(series.intervals, cm, frame, dmas)
            parts.append(
                metered.join(
                    _estimated_parts(series.intervals, cm, bounds),
                    on=["dma_id", "period"],
                    how="left",
                )
            )
            del reads, series
    empty = _period_frame(dma_id, period.label, period.start, period.end).select("dma_id", "period")
    total = (
        pl.concat(parts, how="diagonal_relaxed")
        .group_by("dma_id", "period")
        .agg(
            pl.col("billed_metered_m3", "unbilled_metered_m3", "_billed_m3", "_estimated_m3").sum()
        )
        if parts
        else empty.with_columns(
            pl.lit(0.0).alias(c)
            for c in ("billed_metered_m3", "unbilled_metered_m3", "_billed_m3", "_estimated_m3")
        )
    )
    return total.select(
        "dma_id",
        "period",
        "billed_metered_m3",
        "unbilled_metered_m3",
        pl.when(pl.col("_billed_m3") > 0)
        .then(pl.col("_estimated_m3") / pl.col("_billed_m3"))
        .otherwise(0.0)
        .alias("billed_metered_estimated_share"),
    )


@task(cache_policy=NO_CACHE)
def compute_balance(
    database_url: str, work: DmaPeriods, as_of: datetime, settings: WaterBalanceSettings
) -> dict[str, Any]:
    """One DMA's stale periods, one period at a time (see ``WaterBalanceSettings.chunk_meters``
    for the unit of work within a period)."""
    rows = 0
    with connect(database_url, autocommit=True) as conn:
        dmas = load_dmas(conn)
        own = dmas.join(load_apparent_loss_pcts(conn, [work.dma_id]), on="dma_id", how="left")
        meters = load_meters(conn, dma_ids=[work.dma_id])
        for period, inputs_fp in zip(work.periods, work.inputs, strict=True):
            rows += _balance_period(
                conn, work.dma_id, period, inputs_fp, dmas, own, meters, as_of, settings
            )
    return {"dma_id": work.dma_id, "periods": rows}


def _balance_period(
    conn: psycopg.Connection,
    dma_id: str,
    period: Period,
    inputs_fp: str,
    dmas: pl.DataFrame,
    own: pl.DataFrame,
    meters: pl.DataFrame,
    as_of: datetime,
    settings: WaterBalanceSettings,
) -> int:
    """Compute and store the balance of one DMA x period; returns the summary rows written."""
    lo = utc(period.start - timedelta(days=2))
    hi = min(utc(period.end + timedelta(days=2)), as_of + timedelta(microseconds=1))
    periods = _period_frame(dma_id, period.label, period.start, period.end)
    boundary, pressure = load_dma_boundary(conn, [dma_id], lo, hi)
    flow_net = net_inflow(boundary, settings.inflow)
    siv = system_input_volume(flow_net, periods, dmas, settings.balance)
    metered = _metered(conn, meters, dmas, dma_id, period, as_of, settings)
    bounds = period_bounds(periods, dmas)
    azp = (
        pressure.join(bounds.select("dma_id", "period", "start_ts", "end_ts"), on="dma_id")
        .filter((pl.col("ts") >= pl.col("start_ts")) & (pl.col("ts") < pl.col("end_ts")))
        .group_by("dma_id", "period")
        .agg(pl.col("pressure_m").mean().alias("avg_pressure_m"))
    )
    inputs = (
        siv.join(metered, on=["dma_id", "period"], how="left")
        .join(azp, on=["dma_id", "period"], how="left")
        .with_columns(
            pl.col("billed_metered_m3", "unbilled_metered_m3").fill_null(0.0),
            pl.col("billed_metered_estimated_share").fill_null(0.0),
            pl.when(
                pl.col("billed_metered_estimated_share").fill_null(0.0)
                > settings.estimated_share_limit
            )
            .then(pl.lit(ESTIMATED))
            .otherwise(pl.lit(MEASURED))
            .alias("billed_metered_source"),
        )
    )
    wb = water_balance(inputs, own, settings.balance)
    dates = periods.select(
        "dma_id",
        "period",
        pl.col("start_date").alias("period_start"),
        pl.col("end_date").alias("period_end"),
    )
    components = wb.components.join(dates, on=["dma_id", "period"])
    summary = wb.summary.join(dates, on=["dma_id", "period"]).join(
        inputs.select("dma_id", "period", "siv_coverage", "billed_metered_estimated_share"),
        on=["dma_id", "period"],
    )
    keys = {"dma_id": [dma_id], "period": [period.label]}
    types = {"dma_id": "text", "period": "text"}
    with conn.transaction(), conn.cursor() as cur:
        lock(cur, FLOW, dma_id)
        replace_keyed(cur, "water_balance", keys, types, components)
        _, rows = replace_keyed(cur, "water_balance_summary", keys, types, summary)
        write_marks(
            cur,
            mark_flow(period),
            pl.DataFrame({"subject_id": [dma_id], "day": [period.start], "inputs": [inputs_fp]}),
            as_of,
        )
    return int(rows)


@flow(name=FLOW, validate_parameters=False)
def water_balance_flow(
    database_url: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    overrides: dict[str, Any] | None = None,
    full: bool = False,
) -> dict[str, Any]:
    """Water balance per DMA for the periods of [since, until) whose inputs changed."""
    log = get_run_logger()
    settings = apply_overrides(WaterBalanceSettings(), overrides)
    url = resolve_database_url(database_url)
    if since is None:
        end = utc(until) if until is not None else utc(datetime.now().astimezone())
        since = utc((end.date().replace(day=1) - timedelta(days=1)).replace(day=1))
    win = resolve_window(since, until, 0)
    periods = periods_of(win.since, win.until, settings.period)
    work = plan_balances(url, periods, win.as_of, full, settings)
    log.info("%d DMA(s) with stale periods", len(work))
    results = []
    for wave in waves(work, settings.parallel_chunks):
        futures = compute_balance.map(unmapped(url), wave, unmapped(win.as_of), unmapped(settings))
        results += [f.result() for f in futures]
    return {
        "flow": FLOW,
        "since": win.since.isoformat(),
        "until": win.until.isoformat(),
        "periods": [p.label for p in periods],
        "dmas": results,
    }
