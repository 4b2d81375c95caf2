"""``meter_anomalies``: customer-meter alert episodes (``pipelines.anomalies``), upserted by
(code, subject_id, start_ts).

Only meters with a stale day are recomputed. Their whole window is re-evaluated from the reads
(plus ``context_days`` of history for baselines, STUCK_METER's seven days and VEE's spike
percentile), merged with their stored alerts so an episode keeps its identity across runs. Meters
are mapped to Prefect tasks in chunks; a task takes plain data and opens its own connection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

import polars as pl
from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE

from flows.late_data import plan_days
from flows.load import (
    load_alerts,
    load_dmas,
    load_edits,
    load_exchanges,
    load_meter_classes,
    load_meter_reads,
    load_meters,
)
from flows.meter_series import MeterSeriesParams, meter_series
from flows.overrides import apply_overrides, settings_digest
from flows.store import lock, upsert_alerts, write_marks
from flows.window import resolve_database_url, resolve_window, utc, waves
from pipelines.anomalies import (
    METER_CODES,
    MeterAnomalyParams,
    detect_meter_anomalies,
    with_class_overrides,
)
from pipelines.estimation import meter_holidays
from sql.connect import connect

FLOW = "meter_anomalies"


@dataclass(frozen=True)
class MeterAnomaliesSettings:
    """anomalies/series: the pure functions' thresholds.

    lookback_days: window of a run without ``since``.
    context_days: history loaded before the window (burst baseline 7 d, stuck meter 7 d, VEE
        spike percentile over 14 d: 14 covers them all).
    late_horizon_days: days before the window whose late data still triggers a recompute.
    chunk_meters: meters per Prefect task.
    slice_days: a longer window is evaluated in slices of this many days, one after the other,
        so memory follows chunk_meters x (slice_days + context_days), not the window. 1,000 meters x
        28 days of 15-minute slots peaked at 1.5 GB (BENCHMARKS.md, "Flows end to end").
    parallel_chunks: chunks in flight at once (``flows.window.waves``; 0: all).
    """

    anomalies: MeterAnomalyParams = field(default_factory=MeterAnomalyParams)
    series: MeterSeriesParams = field(default_factory=MeterSeriesParams)
    lookback_days: float = 3.0
    context_days: int = 14
    late_horizon_days: int = 62
    chunk_meters: int = 1000
    slice_days: int = 14
    parallel_chunks: int = 1


@dataclass(frozen=True)
class MeterChunk:
    """One task's meters and their stale (meter, day) units with the inputs fingerprint.

    The units stay a polars frame (``subject_id``, ``day``, ``inputs``): as Python lists a year
    of 10,000 meters (3.65 M units) held ~1 GB in the flow's process for the whole run."""

    meter_ids: list[str]
    units: pl.DataFrame
    first_day: date

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, MeterChunk)
            and self.meter_ids == other.meter_ids
            and self.first_day == other.first_day
            and self.units.equals(other.units)
        )


def window_slices(start: datetime, end: datetime, days: int) -> list[tuple[datetime, datetime]]:
    """[start, end] as consecutive (from, to] slices of at most ``days`` days (at least one)."""
    out = []
    lo = start
    step = timedelta(days=max(days, 1))
    while True:
        hi = min(lo + step, end)
        out.append((lo, hi))
        if hi >= end:
            return out
        lo = hi


@task(cache_policy=NO_CACHE)
def plan_meter_days(
    database_url: str,
    since: datetime,
    until: datetime,
    as_of: datetime,
    full: bool,
    settings: MeterAnomaliesSettings,
) -> list[MeterChunk]:
    chunk_meters = max(settings.chunk_meters, 1)
    with connect(database_url, autocommit=True) as conn:
        meters = load_meters(conn)
        subjects = meters.filter(pl.col("channel_id").is_not_null()).select(
            pl.col("meter_id").alias("subject_id"), "timezone"
        )
        stale = plan_days(
            conn,
            FLOW,
            "meter",
            subjects,
            since,
            until,
            as_of,
            late_horizon_days=settings.late_horizon_days,
            full=full,
            salt=settings_digest(settings),
        )
    ids = stale["subject_id"].unique().sort().to_list()
    chunks = []
    for i in range(0, len(ids), chunk_meters):
        part = stale.filter(pl.col("subject_id").is_in(ids[i : i + chunk_meters]))
        first = part["day"].min()
        assert isinstance(first, date)
        chunks.append(
            MeterChunk(ids[i : i + chunk_meters], part.select("subject_id", "day", "inputs"), first)
        )
    del stale
    return chunks


@task(cache_policy=NO_CACHE)
def compute_meter_chunk(
    database_url: str,
    chunk: MeterChunk,
    since: datetime,
    as_of: datetime,
    settings: MeterAnomaliesSettings,
) -> dict[str, Any]:
    start = min(since, utc(chunk.first_day - timedelta(days=1)))
    with connect(database_url, autocommit=True) as conn:
        dmas = load_dmas(conn)
        meters = load_meters(conn, meter_ids=chunk.meter_ids)
        alerts = load_alerts(conn, codes=list(METER_CODES), subject_ids=chunk.meter_ids)
        # Each meter is judged with its class's parameters (registry [[meter_class]] over the
        # defaults in code); meters carry their class from load_meters.
        params = with_class_overrides(
            settings.anomalies, {c: v["anomaly"] for c, v in load_meter_classes(conn).items()}
        )
        # Each meter's DMA's public holidays (registry [[calendar]] / [[dma]] holidays): the
        # night-floor rule leaves their nights out, so a Christmas at home is no floor rise.
        holidays = meter_holidays(meters, dmas)
        n_reads = 0
        # The window in slices, each evaluated as a run at its end would be: with context_days
        # of history and the alerts the slice before left (episodes carry across slices as they
        # do across daily runs), so only one slice of this chunk's reads is ever in memory.
        for lo_s, hi_s in window_slices(start, as_of, settings.slice_days):
            lo = lo_s - timedelta(days=settings.context_days)
            hi = hi_s + timedelta(microseconds=1)
            reads = load_meter_reads(conn, meters, lo, hi)
            exchanges = load_exchanges(conn, chunk.meter_ids)
            edits = load_edits(conn, chunk.meter_ids, lo, hi)
            series = meter_series(
                reads, meters, exchanges, dmas, as_of=hi_s, edits=edits, params=settings.series
            )
            alerts = detect_meter_anomalies(
                series.intervals,
                meters,
                params,
                as_of=hi_s,
                previous_alerts=alerts,
                uplinks=reads.select("meter_id", "ts"),
                failures=series.failures,
                holidays=holidays,
            )
            n_reads += reads.height
            del reads, series
        units = chunk.units.select(
            pl.col("subject_id").cast(pl.String),
            pl.col("day").cast(pl.Date),
            pl.col("inputs").cast(pl.String),
        )
        with conn.transaction(), conn.cursor() as cur:
            lock(cur, FLOW)
            added, changed = upsert_alerts(cur, alerts)
            # The alerts of these meters now say what was known at as_of: a run over a past
            # window must not leave later days marked as computed, so the next current run
            # brings their alerts back up to date.
            cur.execute(
                "DELETE FROM analysis_marks WHERE flow = %s AND subject_id = ANY(%s) "
                "AND as_of > %s",
                (FLOW, chunk.meter_ids, as_of),
            )
            write_marks(cur, FLOW, units, as_of)
    return {
        "meters": len(chunk.meter_ids),
        "reads": n_reads,
        "alerts": alerts.height,
        "alerts_new": added,
        "alerts_updated": changed,
    }


@flow(name=FLOW, validate_parameters=False)
def meter_anomalies(
    database_url: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    overrides: dict[str, Any] | None = None,
    full: bool = False,
) -> dict[str, Any]:
    """Meter anomaly episodes for the meters with stale days in [since, until)."""
    log = get_run_logger()
    settings = apply_overrides(MeterAnomaliesSettings(), overrides)
    url = resolve_database_url(database_url)
    win = resolve_window(since, until, settings.lookback_days)
    chunks = plan_meter_days(url, win.since, win.until, win.as_of, full, settings)
    log.info("%d meter(s) to evaluate", sum(len(c.meter_ids) for c in chunks))
    results = []
    for wave in waves(chunks, settings.parallel_chunks):
        futures = compute_meter_chunk.map(
            unmapped(url), wave, unmapped(win.since), unmapped(win.as_of), unmapped(settings)
        )
        results += [f.result() for f in futures]
    return {
        "flow": FLOW,
        "since": win.since.isoformat(),
        "until": win.until.isoformat(),
        "meters": sum(r["meters"] for r in results),
        "alerts_new": sum(r["alerts_new"] for r in results),
        "alerts_updated": sum(r["alerts_updated"] for r in results),
        "chunks": results,
    }
