"""``dma_night_flow``: per DMA and local day, inflow, MNF, night use, NNF, NDF and real losses
(``dma.daily``), the DMA's leak events (``dma.leak_events``, table ``leak_events``) and one
``DMA_NIGHT_FLOW_RISE`` alert per event.

The flow plans which DMA-days are stale (``flows.late_data``) and maps one Prefect task per DMA,
``parallel_chunks`` DMAs at a time. A task gets only plain data (the database URL, a DMA id, its
days) and opens its own connection, so a distributed task runner (Dask, Ray) can run the DMAs on
other machines. Memory follows one DMA × ``span_days`` days: a long window of stale days is loaded
and computed in spans of at most that many days, never the whole window at once (issue 11: 120
days × 747 hourly meters peaked at 2.4 GB when a DMA's stale days were one span).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from typing import Any

import polars as pl
from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE

from dma.daily import DMA_DAILY, DmaDailyParams, dma_daily
from dma.inflow import InflowParams, net_inflow
from dma.leak_detection import ALERT_CODE, NightFlowRiseParams, night_flow_rise_alerts
from dma.leak_events import LeakEventParams, leak_event_alerts, leak_events
from flows.late_data import plan_days
from flows.load import (
    load_dma_boundary,
    load_dma_daily_nnf,
    load_dmas,
    load_edits,
    load_exchanges,
    load_meter_reads,
    load_meters,
)
from flows.meter_series import MeterSeriesParams, meter_series
from flows.overrides import apply_overrides, settings_digest
from flows.store import delete_alerts_except, lock, replace_keyed, upsert_alerts, write_marks
from flows.window import resolve_database_url, resolve_window, utc, waves
from sql.connect import connect

FLOW = "dma_night_flow"


@dataclass(frozen=True)
class DmaNightFlowSettings:
    """Thresholds (the pure functions' params) and how much the flow looks at.

    lookback_days: window of a run without ``since`` (late telemetry within it is picked up).
    late_horizon_days: days before the window whose late data still triggers a recompute.
    merge_gap_days: stale days of a DMA closer than this are loaded as one span.
    span_days: the most days loaded at once for one DMA (bounds memory, whatever the window).
    parallel_chunks: DMAs in flight at once (``flows.window.waves``; 0: all).
    detector: ``"events"`` (``dma.leak_events``: one event and alert per rise, stored in
        ``leak_events``) or ``"cusum"`` (the single-episode ``dma.leak_detection``, ``rise``).
    medium_m3h, high_m3h: event size from which its alert's severity is medium / high.
    """

    daily: DmaDailyParams = field(default_factory=DmaDailyParams)
    inflow: InflowParams = field(default_factory=InflowParams)
    rise: NightFlowRiseParams = field(default_factory=NightFlowRiseParams)
    events: LeakEventParams = field(default_factory=LeakEventParams)
    series: MeterSeriesParams = field(default_factory=MeterSeriesParams)
    lookback_days: float = 3.0
    late_horizon_days: int = 62
    merge_gap_days: int = 3
    span_days: int = 14
    parallel_chunks: int = 1
    detector: str = "events"
    medium_m3h: float = 1.0
    high_m3h: float = 3.6


@dataclass(frozen=True)
class DmaWork:
    """The stale days of one DMA with their input fingerprints (plain, picklable)."""

    dma_id: str
    days: list[date]
    inputs: list[str]


def _spans(days: list[date], gap: int, most: int = 0) -> list[list[date]]:
    """Stale days grouped into spans loaded together: days closer than ``gap`` share a span
    (one load instead of several), and no span covers more than ``most`` days (0: no limit)."""
    spans: list[list[date]] = []
    for d in sorted(days):
        if (
            spans
            and (d - spans[-1][-1]).days <= gap
            and (most <= 0 or (d - spans[-1][0]).days < most)
        ):
            spans[-1].append(d)
        else:
            spans.append([d])
    return spans


@task(cache_policy=NO_CACHE)
def plan_dma_days(
    database_url: str,
    since: datetime,
    until: datetime,
    as_of: datetime,
    full: bool,
    settings: DmaNightFlowSettings,
) -> list[DmaWork]:
    with connect(database_url, autocommit=True) as conn:
        dmas = load_dmas(conn)
        subjects = dmas.select(pl.col("dma_id").alias("subject_id"), "timezone")
        stale = plan_days(
            conn,
            FLOW,
            "dma",
            subjects,
            since,
            until,
            as_of,
            late_horizon_days=settings.late_horizon_days,
            full=full,
            salt=settings_digest(settings),
        )
    return [
        DmaWork(str(part["subject_id"][0]), part["day"].to_list(), part["inputs"].to_list())
        for part in stale.partition_by("subject_id", maintain_order=True)
    ]


@task(cache_policy=NO_CACHE)
def compute_dma(
    database_url: str, work: DmaWork, as_of: datetime, settings: DmaNightFlowSettings
) -> dict[str, Any]:
    """Recompute the DMA's stale days, replace them, refresh its rise alerts, record marks."""
    rows: list[pl.DataFrame] = []
    with connect(database_url, autocommit=True) as conn:
        dmas = load_dmas(conn, [work.dma_id])  # with its holidays (estimation, leak events)
        meters = load_meters(conn, dma_ids=[work.dma_id])
        exchanges = load_exchanges(conn, meters["meter_id"].to_list())
        for span in _spans(work.days, settings.merge_gap_days, settings.span_days):
            # Any zone's local day lies within UTC days d−1..d+1; one more day each side gives the
            # interpolation of boundary flows and the meter intervals around midnight.
            lo = utc(span[0] - timedelta(days=2))
            hi = min(utc(span[-1] + timedelta(days=3)), as_of + timedelta(microseconds=1))
            boundary, pressure = load_dma_boundary(conn, [work.dma_id], lo, hi)
            reads = load_meter_reads(conn, meters, lo, hi)
            edits = load_edits(conn, meters["meter_id"].to_list(), lo, hi)
            series = meter_series(
                reads,
                meters,
                exchanges,
                dmas,
                as_of=as_of,
                edits=edits,
                params=settings.series,
            )
            daily = dma_daily(
                net_inflow(boundary, settings.inflow),
                pressure,
                series.intervals,
                meters,
                dmas,
                settings.daily,
            )
            rows.append(daily.filter(pl.col("local_date").is_in(span)))
        result = pl.concat(rows) if rows else pl.DataFrame(schema=DMA_DAILY)
        table = result.rename({"local_date": "day"}).select(
            [c if c != "local_date" else "day" for c in DMA_DAILY]
        )
        units = pl.DataFrame(
            {"subject_id": [work.dma_id] * len(work.days), "day": work.days, "inputs": work.inputs},
            schema={"subject_id": pl.String, "day": pl.Date, "inputs": pl.String},
        )
        with conn.transaction(), conn.cursor() as cur:
            lock(cur, FLOW, work.dma_id)
            deleted, inserted = replace_keyed(
                cur,
                "dma_daily",
                {"dma_id": [work.dma_id] * len(work.days), "day": work.days},
                {"dma_id": "text", "day": "date"},
                table,
            )
            write_marks(cur, FLOW, units, as_of)
            nnf = load_dma_daily_nnf(conn, [work.dma_id])
            cusum = settings.detector == "cusum"
            # The DMA's public holidays (registry [[calendar]] / [[dma]] holidays) are judged
            # with weekend nights; without them a holiday's low-use night reads as a weekday
            # baseline and the next weekday as a rise.
            holidays = dmas["holidays"].explode().drop_nulls().to_list()
            events_params = replace(
                settings.events,
                holidays=tuple(sorted({*settings.events.holidays, *holidays})),
            )
            found = leak_events(nnf.head(0) if cusum else nnf, events_params)
            # The DMA's events as a unit (none with the single-episode detector: no stale rows).
            _, events = replace_keyed(
                cur, "leak_events", {"dma_id": [work.dma_id]}, {"dma_id": "text"}, found
            )
            if cusum:
                alerts = night_flow_rise_alerts(nnf, settings.rise)
            else:
                alerts = leak_event_alerts(found, nnf, settings.medium_m3h, settings.high_m3h)
            added, changed = upsert_alerts(cur, alerts)
            removed = delete_alerts_except(cur, ALERT_CODE, [work.dma_id], alerts)
    return {
        "dma_id": work.dma_id,
        "days": len(work.days),
        "rows": inserted,
        "replaced": deleted,
        "alerts_new": added,
        "alerts_updated": changed,
        "alerts_removed": removed,
        "leak_events": events,
    }


@flow(name=FLOW, validate_parameters=False)
def dma_night_flow(
    database_url: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    overrides: dict[str, Any] | None = None,
    full: bool = False,
) -> dict[str, Any]:
    """DMA nightly analytics for the stale DMA-days of [since, until)."""
    log = get_run_logger()
    settings = apply_overrides(DmaNightFlowSettings(), overrides)
    url = resolve_database_url(database_url)
    win = resolve_window(since, until, settings.lookback_days)
    work = plan_dma_days(url, win.since, win.until, win.as_of, full, settings)
    log.info("%d DMA(s) with %d stale day(s)", len(work), sum(len(w.days) for w in work))
    results: list[dict[str, Any]] = []
    for wave in waves(work, settings.parallel_chunks):
        futures = compute_dma.map(unmapped(url), wave, unmapped(win.as_of), unmapped(settings))
        results += [f.result() for f in futures]
    return {
        "flow": FLOW,
        "since": win.since.isoformat(),
        "until": win.until.isoformat(),
        "dmas": results,
        "days": sum(r["days"] for r in results),
    }
