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
from flows.window import resolve_database_url, resolve_window, utc
from sql.connect import connect

FLOW = "water_balance"


@dataclass(frozen=True)
class WaterBalanceSettings:
    """balance/inflow/series: the pure functions' parameters.

    period: ``month`` (calendar months of local dates, cut to the window) or ``window``.
    estimated_share_limit: billed metered consumption counts as measured while at most this share
        of its volume was estimated by VEE (AWWA grades data quality; 5 % keeps a handful of
        filled gaps from downgrading a well-read month).
    Without ``since`` a run covers the previous calendar month and the current one to date.
    """

    balance: WaterBalanceParams = field(default_factory=WaterBalanceParams)
    inflow: InflowParams = field(default_factory=InflowParams)
    series: MeterSeriesParams = field(default_factory=MeterSeriesParams)
    period: Literal["month", "window"] = "month"
    estimated_share_limit: float = 0.05


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


def _estimated_share(
    intervals: pl.DataFrame, meters: pl.DataFrame, bounds: pl.DataFrame
) -> pl.DataFrame:
    """Share of billed metered volume per DMA and period that VEE estimated."""
    iv = intervals.select("meter_id", "ts", "volume", "flag").join(
        meters.select("meter_id", "dma_id", "account").filter(pl.col("account").is_not_null()),
        on="meter_id",
    )
    joined = iv.join(bounds.select("dma_id", "period", "start_ts", "end_ts"), on="dma_id").filter(
        (pl.col("ts") > pl.col("start_ts")) & (pl.col("ts") <= pl.col("end_ts"))
    )
    return joined.group_by("dma_id", "period").agg(
        pl.when(pl.col("volume").sum() > 0)
        .then(pl.col("volume").filter(pl.col("flag") == "E").sum() / pl.col("volume").sum())
        .otherwise(0.0)
        .alias("billed_metered_estimated_share")
    )


@task(cache_policy=NO_CACHE)
def compute_balance(
    database_url: str, work: DmaPeriods, as_of: datetime, settings: WaterBalanceSettings
) -> dict[str, Any]:
    first = min(p.start for p in work.periods)
    last = max(p.end for p in work.periods)
    lo = utc(first - timedelta(days=2))
    hi = min(utc(last + timedelta(days=2)), as_of + timedelta(microseconds=1))
    with connect(database_url, autocommit=True) as conn:
        dmas = load_dmas(conn)
        meters = load_meters(conn, dma_ids=[work.dma_id])
        boundary, pressure = load_dma_boundary(conn, [work.dma_id], lo, hi)
        reads = load_meter_reads(conn, meters, lo, hi)
        exchanges = load_exchanges(conn, meters["meter_id"].to_list())
        edits = load_edits(conn, meters["meter_id"].to_list(), lo, hi)
        series = meter_series(
            reads, meters, exchanges, dmas, as_of=as_of, edits=edits, params=settings.series
        )
        periods = pl.DataFrame(
            {
                "dma_id": [work.dma_id] * len(work.periods),
                "period": [p.label for p in work.periods],
                "start_date": [p.start for p in work.periods],
                "end_date": [p.end for p in work.periods],
            },
            schema={
                "dma_id": pl.String,
                "period": pl.String,
                "start_date": pl.Date,
                "end_date": pl.Date,
            },
        )
        flow_net = net_inflow(boundary, settings.inflow)
        siv = system_input_volume(flow_net, periods, dmas, settings.balance)
        metered = metered_consumption(series.intervals, meters, periods, dmas)
        bounds = period_bounds(periods, dmas)
        share = _estimated_share(series.intervals, meters, bounds)
        azp = (
            pressure.join(bounds.select("dma_id", "period", "start_ts", "end_ts"), on="dma_id")
            .filter((pl.col("ts") >= pl.col("start_ts")) & (pl.col("ts") < pl.col("end_ts")))
            .group_by("dma_id", "period")
            .agg(pl.col("pressure_m").mean().alias("avg_pressure_m"))
        )
        inputs = (
            siv.join(metered, on=["dma_id", "period"], how="left")
            .join(share, on=["dma_id", "period"], how="left")
            .join(azp, on=["dma_id", "period"], how="left")
            .with_columns(
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
        wb = water_balance(inputs, dmas, settings.balance)
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
        keys = {"dma_id": periods["dma_id"].to_list(), "period": periods["period"].to_list()}
        types = {"dma_id": "text", "period": "text"}
        with conn.transaction(), conn.cursor() as cur:
            lock(cur, FLOW, work.dma_id)
            replace_keyed(cur, "water_balance", keys, types, components)
            _, rows = replace_keyed(cur, "water_balance_summary", keys, types, summary)
            for period, inputs_fp in zip(work.periods, work.inputs, strict=True):
                write_marks(
                    cur,
                    mark_flow(period),
                    pl.DataFrame(
                        {"subject_id": [work.dma_id], "day": [period.start], "inputs": [inputs_fp]}
                    ),
                    as_of,
                )
    return {"dma_id": work.dma_id, "periods": rows}


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
    futures = compute_balance.map(unmapped(url), work, unmapped(win.as_of), unmapped(settings))
    results = [f.result() for f in futures]
    return {
        "flow": FLOW,
        "since": win.since.isoformat(),
        "until": win.until.isoformat(),
        "periods": [p.label for p in periods],
        "dmas": results,
    }
