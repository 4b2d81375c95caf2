"""``water_quality``: WQ_LIMIT, SENSOR_FLATLINE and SENSOR_DRIFT episodes of the water-quality
analysers (``pipelines.water_quality``), upserted by (code, subject_id, start_ts).

Analyser channels are few and dense (a handful per station, a value every few minutes), so a run
re-evaluates its whole window plus ``context_days`` of history (drift needs a week of daily
medians) instead of planning stale days like the meter flows. Detection is given the stored
episodes, so an open episode keeps its start and identity from run to run and a re-run over the
same data changes no row; readings that arrive late are simply part of the next run's window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import polars as pl
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.load import load_alerts, load_quality_values
from flows.overrides import apply_overrides
from flows.store import lock, upsert_alerts
from flows.window import resolve_database_url, resolve_window
from pipelines.water_quality import WQ_CODES, WaterQualityParams, detect_water_quality
from sql.connect import connect

FLOW = "water_quality"


@dataclass(frozen=True)
class WaterQualitySettings:
    """wq: thresholds of the pure functions (limits per quantity and location, flatline, drift).

    lookback_days: window of a run without ``since``.
    context_days: history loaded before the window; drift's slope needs ``drift_window_days``.
    location: where the analysers sit when the registry does not say (selects the limits).
    """

    wq: WaterQualityParams = field(default_factory=WaterQualityParams)
    lookback_days: float = 1.0
    context_days: int = 8
    location: str = "network"


@task(cache_policy=NO_CACHE)
def compute_water_quality(
    database_url: str,
    since: datetime,
    until: datetime,
    settings: WaterQualitySettings,
) -> dict[str, Any]:
    lo = since - timedelta(days=settings.context_days)
    with connect(database_url, autocommit=True) as conn:
        values = load_quality_values(conn, lo, until)
        subjects = values.select("sensor_id", "quantity").unique()
        if subjects.height == 0:
            return {"channels": 0, "values": 0, "alerts": 0, "inserted": 0, "updated": 0}
        previous = load_alerts(
            conn,
            codes=list(WQ_CODES),
            subject_ids=(subjects["sensor_id"] + ":" + subjects["quantity"]).to_list(),
        )
        sensors = subjects.select("sensor_id", location=pl.lit(settings.location)).unique()
        alerts = detect_water_quality(values, settings.wq, previous, sensors)
        # Episodes wholly before the window were settled by earlier runs; leave them be.
        alerts = alerts.filter(pl.col("end_ts").is_null() | (pl.col("end_ts") >= since))
        with conn.transaction(), conn.cursor() as cur:
            lock(cur, FLOW)
            inserted, updated = upsert_alerts(cur, alerts)
    return {
        "channels": subjects.height,
        "values": values.height,
        "alerts": alerts.height,
        "inserted": inserted,
        "updated": updated,
    }


@flow(name=FLOW, validate_parameters=False)
def water_quality(
    database_url: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    overrides: dict[str, Any] | None = None,
    full: bool = False,
) -> dict[str, Any]:
    """Water-quality alert episodes over [since, until) (``full`` changes nothing here: every
    run re-evaluates its whole window)."""
    log = get_run_logger()
    settings = apply_overrides(WaterQualitySettings(), overrides)
    url = resolve_database_url(database_url)
    win = resolve_window(since, until, settings.lookback_days)
    result = compute_water_quality(url, win.since, win.until, settings)
    log.info("water quality: %s", result)
    return {"flow": FLOW, "since": win.since.isoformat(), "until": win.until.isoformat(), **result}
