"""The night-floor rule (LEAK_CONTINUOUS of building meters) and public holidays: a block of
holiday nights with residents at home is no floor rise, holiday nights stay out of the baseline,
and a real rise keeps its run across a holiday.

Building meters here have a steady night floor of about 0.1 m³/h (±3 % from night to night) and
day use of 0.6 m³/h, in Asia/Shanghai (night window 00-05 h local = 16-21 h UTC the day before,
so a night's date is not its UTC date). Holidays are declared for the meter's DMA and reach the
rule as ``pipelines.estimation.meter_holidays`` gives them, as the flow passes them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from dataclasses import replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import numpy as np
import polars as pl
import psycopg
import pytest

from aquameter.registry import load_registry
from flows.meter_anomalies import MeterAnomaliesSettings, compute_meter_chunk, plan_meter_days
from ingest.pipeline import IngestPipeline
from ingest.registry_sync import sync_registry
from pipelines.anomalies import (
    LEAK_CONTINUOUS,
    MULTI_DWELLING,
    MeterAnomalyParams,
    detect_meter_anomalies,
    night_floors,
)
from pipelines.estimation import meter_holidays
from pipelines.schemas import INTERVALS, METERS
from tests.servers import EXAMPLE_REGISTRY
from tests.test_meter_classes import register_frames

TZ = "Asia/Shanghai"
FIRST = date(2025, 12, 1)  # a Monday
DMA = "DMA-1"
HOURLY = MeterAnomalyParams(interval=timedelta(hours=1))


def local_hour(day: date, hour: int, tz: str = TZ) -> datetime:
    return datetime.combine(day, time(hour), tzinfo=ZoneInfo(tz)).astimezone(UTC)


def night_flow(
    day: date,
    level: float,
    *,
    high: Collection[date],
    factor: float,
    leak_from: date | None,
    leak_m3h: float,
) -> float:
    """Night flow (m³/h) of local night ``day``: the floor, higher on the ``high`` nights
    (residents at home), plus a leak from ``leak_from`` on."""
    flow = level * (factor if day in high else 1.0)
    return flow + (leak_m3h if leak_from is not None and day >= leak_from else 0.0)


def building(
    days: int,
    *,
    high: Collection[date] = (),
    factor: float = 1.4,
    leak_from: date | None = None,
    leak_m3h: float = 0.05,
    drop_nights: Collection[date] = (),
    meter: str = "BLD1",
    seed: int = 1,
) -> pl.DataFrame:
    """Hourly INTERVALS of one building meter from local FIRST 00:00, ``days`` local days: each
    night (00-05 h local) at its floor, ``factor`` x it on the ``high`` nights, a leak of
    ``leak_m3h`` from local ``leak_from`` 00:00 on. The night hours of ``drop_nights`` have no
    data (the same floors otherwise: the noise is drawn for every night)."""
    rng = np.random.default_rng(seed)
    ts: list[datetime] = []
    vol: list[float] = []
    for d in range(days):
        day = FIRST + timedelta(days=d)
        level = 0.10 * (1.0 + rng.uniform(-0.03, 0.03))
        night = night_flow(
            day, level, high=high, factor=factor, leak_from=leak_from, leak_m3h=leak_m3h
        )
        for h in range(24):
            if h < 5 and day in drop_nights:
                continue
            # The floor is the 02-03 h hour; the others of the night are a little higher.
            flow = night * (1.0 if h == 2 else 1.2) if h < 5 else 0.6
            if h >= 5 and leak_from is not None and day >= leak_from:
                flow += leak_m3h
            ts.append(local_hour(day, h) + timedelta(hours=1))
            vol.append(flow)
    n = len(ts)
    return pl.DataFrame(
        {
            "meter_id": [meter] * n,
            "ts": ts,
            "volume": vol,
            "quality": [0] * n,
            "flag": ["A"] * n,
            "method": [None] * n,
        },
        schema=INTERVALS,
    )


def building_meters(meter: str = "BLD1") -> pl.DataFrame:
    row = {
        "meter_id": meter,
        "dma_id": DMA,
        "account": "ACC",
        "customer_type": "non_household",
        "dn": 40,
        "q3": 10.0,
        "q4": 12.5,
        "register_digits": 6,
        "install_date": date(2022, 1, 1),
        "gateway": "GW",
    }
    return pl.DataFrame([row], schema=METERS).with_columns(
        meter_class=pl.lit(MULTI_DWELLING), timezone=pl.lit(TZ)
    )


def dma_holidays(meters: pl.DataFrame, days: Collection[date]) -> pl.DataFrame:
    """The meters' holidays as the flow builds them: the DMA's list, per meter."""
    dmas = pl.DataFrame(
        {"dma_id": [DMA], "timezone": [TZ], "holidays": [sorted(days)]},
        schema={"dma_id": pl.String, "timezone": pl.String, "holidays": pl.List(pl.Date)},
    )
    return meter_holidays(meters, dmas)


def leaks(alerts: pl.DataFrame) -> pl.DataFrame:
    return alerts.filter(pl.col("code") == LEAK_CONTINUOUS).sort("start_ts")


def dates(first: date, n: int) -> list[date]:
    return [first + timedelta(days=k) for k in range(n)]


def test_holiday_block_at_home_is_no_floor_rise_when_declared() -> None:
    """Four holiday nights at 40 % more night use: a floor rise on today's rule, none once the
    DMA's holidays reach it."""
    christmas = dates(date(2025, 12, 24), 4)
    iv, m = building(35, high=christmas), building_meters()
    undeclared = leaks(detect_meter_anomalies(iv, m, HOURLY))
    assert undeclared.height == 1
    # Dated at the first holiday night (local 00:00 of the 24th), closed by the next ordinary one.
    assert undeclared.item(0, "start_ts") == local_hour(christmas[0], 0)
    assert undeclared.item(0, "status") == "closed"
    declared = detect_meter_anomalies(iv, m, HOURLY, holidays=dma_holidays(m, christmas))
    assert leaks(declared).height == 0
    # A holidays frame with plain dates (not day numbers) is read the same way.
    as_dates = pl.DataFrame({"meter_id": ["BLD1"] * 4, "day": christmas})
    assert leaks(detect_meter_anomalies(iv, m, HOURLY, holidays=as_dates)).height == 0
    # Another DMA's holidays are not this meter's.
    elsewhere = pl.DataFrame({"meter_id": ["BLD2"] * 4, "day": christmas})
    assert leaks(detect_meter_anomalies(iv, m, HOURLY, holidays=elsewhere)).height == 1


def test_rise_across_a_holiday_block_opens_dated_at_its_real_start() -> None:
    """A leak from two nights before a 3-night holiday block: the holiday nights neither count nor
    break the run, so it opens on the first ordinary night after them, dated at its first
    night, and its evidence counts only ordinary nights."""
    block = dates(date(2025, 12, 24), 3)
    onset = date(2025, 12, 22)
    iv = building(35, high=block, leak_from=onset)
    m = building_meters()
    hol = dma_holidays(m, block)
    # Up to the end of the block: two rising ordinary nights, not yet sustained.
    before = detect_meter_anomalies(iv, m, HOURLY, as_of=local_hour(block[-1], 6), holidays=hol)
    assert leaks(before).height == 0
    after = detect_meter_anomalies(
        iv, m, HOURLY, as_of=local_hour(date(2025, 12, 27), 6), holidays=hol
    )
    assert leaks(after).height == 1
    assert leaks(after).item(0, "start_ts") == local_hour(onset, 0)
    assert leaks(after).item(0, "status") == "open"
    whole = leaks(detect_meter_anomalies(iv, m, HOURLY, holidays=hol))
    assert whole.height == 1 and whole.item(0, "status") == "open"
    assert whole.item(0, "start_ts") == local_hour(onset, 0)
    ev = json.loads(whole.item(0, "evidence"))
    rising = (FIRST + timedelta(days=35) - onset).days - len(block)
    assert ev["nights"] == rising
    assert ev["sum_rise_m3h"] / ev["nights"] == pytest.approx(0.05, rel=0.15)


def test_holiday_nights_stay_out_of_the_baseline() -> None:
    """A two-night holiday block at 60 % more (too short to open anything) then a leak whose
    baseline spans it: declared, the baseline is the one of the same data without those nights;
    undeclared, the high nights lift it."""
    block = dates(date(2025, 12, 15), 2)
    onset = date(2025, 12, 24)
    m = building_meters()
    hol = dma_holidays(m, block)
    full = building(35, high=block, factor=1.6, leak_from=onset)
    without = building(35, high=block, factor=1.6, leak_from=onset, drop_nights=block)
    p = HOURLY.for_class(MULTI_DWELLING)
    assert night_floors(full, m, p, holidays=hol).equals(night_floors(without, m, p))

    def baseline(iv: pl.DataFrame, holidays: pl.DataFrame | None) -> float:
        found = leaks(detect_meter_anomalies(iv, m, HOURLY, holidays=holidays))
        assert found.height == 1 and found.item(0, "start_ts") == local_hour(onset, 0)
        return float(json.loads(found.item(0, "evidence"))["baseline_floor_m3h"])

    declared = baseline(full, hol)
    assert declared == baseline(without, None)
    assert baseline(full, None) > declared


def test_without_holidays_floors_are_unchanged() -> None:
    iv, m = building(20, high=dates(date(2025, 12, 8), 3)), building_meters()
    p = HOURLY.for_class(MULTI_DWELLING)
    plain = night_floors(iv, m, p)
    assert plain.height == 20
    assert night_floors(iv, m, p, holidays=dma_holidays(m, [])).equals(plain)
    assert night_floors(iv, m, p, holidays=None).equals(plain)


def test_a_night_across_midnight_is_named_by_its_morning() -> None:
    """With a 22-05 h window the holiday's night is the one from 22 h the evening before, as the
    DMA night flow names nights."""
    iv, m = building(10), building_meters()
    p = replace(HOURLY.for_class(MULTI_DWELLING), night_start_hour=22)
    plain = night_floors(iv, m, p)
    left = night_floors(iv, m, p, holidays=dma_holidays(m, [date(2025, 12, 5)]))
    gone = plain.join(left, on=["subject_id", "night_start"], how="anti")
    assert gone.get_column("night_start").to_list() == [local_hour(date(2025, 12, 4), 22)]


# --- through the flow, against PostgreSQL -------------------------------------------------------

_TODAY = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
FLOW_DAYS = 20
FLOW_START = _TODAY - timedelta(days=FLOW_DAYS + 2)
BUILDING = "AQN00001"  # in DMA-NORTH, Europe/London


def _register_reads(block: Collection[date]) -> pl.DataFrame:
    """15-minute register reads of BUILDING: the building above in London time (stepped in UTC,
    so a daylight-saving day has its 92 or 100 quarter hours)."""
    rng = np.random.default_rng(7)
    tz = ZoneInfo("Europe/London")
    t0 = local_hour(FLOW_START.date(), 0, "Europe/London")
    levels: dict[date, float] = {}
    ts: list[datetime] = []
    reg: list[float] = []
    register = 100.0
    for k in range(FLOW_DAYS * 96):
        local = (t0 + timedelta(minutes=15 * k)).astimezone(tz)
        day, h = local.date(), local.hour
        level = levels.setdefault(day, 0.10 * (1.0 + rng.uniform(-0.03, 0.03)))
        night = night_flow(day, level, high=block, factor=1.4, leak_from=None, leak_m3h=0.0)
        register += (night * (1.0 if h == 2 else 1.2) if h < 5 else 0.6) / 4
        ts.append(t0 + timedelta(minutes=15 * (k + 1)))
        reg.append(round(register, 4))
    return pl.DataFrame(
        {"meter_id": [BUILDING] * len(ts), "ts": ts, "register": reg},
        schema={"meter_id": pl.String, "ts": pl.Datetime("us", "UTC"), "register": pl.Float64},
    )


def _building_with_a_holiday_block(db_url: str, declared: bool) -> tuple[list[date], Any]:
    """BUILDING a multi-dwelling meter with a 4-night holiday block of high night use, its
    registry synced (the block declared as DMA-NORTH's holidays or not) and its reads stored."""
    block = dates(FLOW_START.date() + timedelta(days=12), 4)
    registry = load_registry(EXAMPLE_REGISTRY)
    north = next(g for g in registry.meter_groups if g.id_format.startswith("AQN"))
    north.meter_class = MULTI_DWELLING
    if declared:
        next(d for d in registry.dmas if d.id == "DMA-NORTH").holidays = list(block)
    reads = _register_reads(block)
    with psycopg.connect(db_url) as conn:
        sync_registry(conn, registry)
    with IngestPipeline(db_url, batch_seconds=0.05) as pipeline:
        assert sum(o.accepted for o in pipeline.submit_many(register_frames(reads))) == reads.height
    return block, registry


@pytest.mark.parametrize("declared", [False, True])
def test_flow_passes_the_dmas_holidays_to_the_floor_rule(db_url: str, declared: bool) -> None:
    """meter_anomalies on a multi-dwelling meter with a 4-night holiday block: the DMA's holidays
    synced from the registry keep it from raising LEAK_CONTINUOUS; undeclared, it raises one."""
    block, _ = _building_with_a_holiday_block(db_url, declared)
    settings = MeterAnomaliesSettings()
    since, until, as_of = FLOW_START, FLOW_START + timedelta(days=FLOW_DAYS), datetime.now(UTC)
    for chunk in plan_meter_days.fn(db_url, since, until, as_of, False, settings):
        compute_meter_chunk.fn(db_url, chunk, since, as_of, settings)
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT start_ts FROM alerts WHERE code = %s AND subject_id = %s",
            (LEAK_CONTINUOUS, BUILDING),
        ).fetchall()
    if declared:
        assert rows == []
    else:
        assert rows == [(local_hour(block[0], 0, "Europe/London"),)]


def test_declaring_the_holidays_later_recomputes_the_meters_alerts(db_url: str) -> None:
    """The registry gains the holidays after the flow has run: the sync marks the DMA's meters
    stale (their analysis is judged by their DMA's holidays), the next incremental plan holds
    the building, and after it ran no LEAK_CONTINUOUS is left open; syncing the same registry
    again invalidates nothing."""
    block, registry = _building_with_a_holiday_block(db_url, declared=False)
    settings = MeterAnomaliesSettings()
    since, until, as_of = FLOW_START, FLOW_START + timedelta(days=FLOW_DAYS), datetime.now(UTC)

    def plan() -> list[Any]:
        return plan_meter_days.fn(db_url, since, until, as_of, False, settings)

    def open_alerts() -> list[tuple[Any, ...]]:
        with psycopg.connect(db_url) as conn:
            return conn.execute(
                "SELECT start_ts FROM alerts WHERE code = %s AND subject_id = %s "
                "AND status = 'open'",
                (LEAK_CONTINUOUS, BUILDING),
            ).fetchall()

    for chunk in plan():
        compute_meter_chunk.fn(db_url, chunk, since, as_of, settings)
    assert plan() == []
    with psycopg.connect(db_url) as conn:
        alerts = conn.execute(
            "SELECT count(*) FROM alerts WHERE code = %s AND subject_id = %s",
            (LEAK_CONTINUOUS, BUILDING),
        ).fetchone()
        in_dma = conn.execute("SELECT count(*) FROM meters WHERE dma_id = 'DMA-NORTH'").fetchone()
    assert alerts == (1,)  # the undeclared block raised one

    next(d for d in registry.dmas if d.id == "DMA-NORTH").holidays = list(block)
    with psycopg.connect(db_url) as conn:
        result = sync_registry(conn, registry)
    assert in_dma is not None and result.invalidated is not None
    assert result.invalidated["meter_anomalies"] == in_dma[0] > 0
    stale = plan()
    assert BUILDING in {m for chunk in stale for m in chunk.meter_ids}
    for chunk in stale:
        compute_meter_chunk.fn(db_url, chunk, since, as_of, settings)
    assert plan() == []
    assert open_alerts() == []
    with psycopg.connect(db_url) as conn:
        again = sync_registry(conn, registry).invalidated
    assert again is not None and again["meter_anomalies"] == 0
