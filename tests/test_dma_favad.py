"""FAVAD night-day factor on hand-built pressure profiles, incl. DST days and Asia/Shanghai."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import polars as pl
import pytest

from dma.favad import FavadParams, daily_real_losses, night_day_factor
from pipelines.schemas import DMA_PRESSURE, DMAS


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def dmas_frame(dma: str, tz: str) -> pl.DataFrame:
    return pl.DataFrame([(dma, tz, 10.0, 1000, 2.0, 40.0, 0, 0)], schema=DMAS, orient="row")


def pressure_series(
    dma: str, tz: str, start: datetime, end: datetime, profile: Callable[[datetime], float]
) -> pl.DataFrame:
    """15-min pressure from start to end (UTC); profile gets the *local* time of each sample."""
    zone = ZoneInfo(tz)
    rows = []
    t = start
    while t < end:
        rows.append((dma, t, profile(t.astimezone(zone))))
        t += timedelta(minutes=15)
    return pl.DataFrame(rows, schema=DMA_PRESSURE, orient="row")


def night_day_profile(local: datetime) -> float:
    """50 m in local hours 0–5 and 22–23 (the night), 40 m in hours 6–21, except hour 10 which
    alternates 38/42 (mean 40) so that the hourly mean is exercised."""
    h = local.hour
    if h == 10:
        return 38.0 if local.minute in (0, 30) else 42.0
    return 50.0 if (h <= 5 or h >= 22) else 40.0


def mnf_frame(dma: str, night: date, start: datetime) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "dma_id": [dma],
            "night_date": [night],
            "mnf_start_ts": [start],
            "mnf_end_ts": [start + timedelta(hours=1)],
        }
    )


def test_ndf_by_hand_for_a_day_night_profile() -> None:
    """London in January = UTC. P_night (02:00–03:00) = 50.
    N1 = 1:   8 hours × (50/50) + 16 hours × (40/50) = 8 + 12.8 = 20.8 h/day
    N1 = 1.5: 8 + 16 × 0.8^1.5 = 8 + 16 × 0.7155417528 = 19.4486680448
    N1 = 0.5: 8 + 16 × 0.8^0.5 = 8 + 16 × 0.8944271910 = 22.3108350560
    """
    pressure = pressure_series(
        "L", "Europe/London", utc(2026, 1, 15), utc(2026, 1, 16), night_day_profile
    )
    mnf = mnf_frame("L", date(2026, 1, 15), utc(2026, 1, 15, 2))
    dmas = dmas_frame("L", "Europe/London")
    row = night_day_factor(pressure, mnf, dmas).row(0, named=True)
    assert row["p_night_m"] == pytest.approx(50.0)
    assert row["day_hours"] == 24.0
    assert row["pressure_hours"] == 24
    assert row["ndf_source"] == "pressure"
    assert row["ndf_h"] == pytest.approx(20.8)
    ndf15 = night_day_factor(pressure, mnf, dmas, FavadParams(n1=1.5))["ndf_h"][0]
    assert ndf15 == pytest.approx(19.4486680448)
    ndf05 = night_day_factor(pressure, mnf, dmas, FavadParams(n1=0.5))["ndf_h"][0]
    assert ndf05 == pytest.approx(22.3108350560)


def test_ndf_spring_forward_day_sums_23_hours() -> None:
    """2026-03-29 London: local hours 00 (GMT), 02 … 23 (BST) = 23 hours.
    Night-pressure hours: 00, 02, 03, 04, 05, 22, 23 = 7; day hours 06–21 = 16.
    NDF = 7 + 16 × 0.8 = 19.8. Flat pressure gives exactly 23.
    MNF 02:00–03:00 UTC = 03:00–04:00 BST, P_night = 50.
    """
    start, end = utc(2026, 3, 29, 0), utc(2026, 3, 29, 23)  # local midnight to midnight
    dmas = dmas_frame("L", "Europe/London")
    mnf = mnf_frame("L", date(2026, 3, 29), utc(2026, 3, 29, 2))
    row = night_day_factor(
        pressure_series("L", "Europe/London", start, end, night_day_profile), mnf, dmas
    ).row(0, named=True)
    assert row["day_hours"] == 23.0
    assert row["pressure_hours"] == 23
    assert row["ndf_h"] == pytest.approx(19.8)
    flat = pressure_series("L", "Europe/London", start, end, lambda _: 45.0)
    assert night_day_factor(flat, mnf, dmas)["ndf_h"][0] == pytest.approx(23.0)


def test_ndf_fall_back_day_sums_25_hours() -> None:
    """2026-10-25 London: local 00 (BST), 01 (BST), 01 (GMT), 02 … 23 = 25 hours.
    Night-pressure hours: 00, 01, 01, 02, 03, 04, 05, 22, 23 = 9; day hours 06–21 = 16.
    NDF = 9 + 16 × 0.8 = 21.8. Flat pressure gives 25.
    """
    start, end = utc(2026, 10, 24, 23), utc(2026, 10, 26, 0)
    dmas = dmas_frame("L", "Europe/London")
    mnf = mnf_frame("L", date(2026, 10, 25), utc(2026, 10, 25, 3))
    row = night_day_factor(
        pressure_series("L", "Europe/London", start, end, night_day_profile), mnf, dmas
    ).row(0, named=True)
    assert row["day_hours"] == 25.0
    assert row["pressure_hours"] == 25
    assert row["ndf_h"] == pytest.approx(21.8)
    flat = pressure_series("L", "Europe/London", start, end, lambda _: 45.0)
    assert night_day_factor(flat, mnf, dmas)["ndf_h"][0] == pytest.approx(25.0)


def test_ndf_uses_local_hours_in_asia_shanghai() -> None:
    """Local day 2026-01-15 in Shanghai = 2026-01-14 16:00 → 2026-01-15 16:00 UTC; MNF at
    local 02:00 = 18:00 UTC on the 14th, P_night = 50. The day/night profile holds on local
    2026-01-15 only, the neighbouring local days are flat 50 m. Local hours → NDF 20.8.
    Grouping by UTC date instead would take local 08:00 on the 15th to 08:00 on the 16th:
    10 hours at 50 (22, 23 and eight on the 16th) + 14 at 40 → 10 + 11.2 = 21.2.
    """

    def profile(local: datetime) -> float:
        return night_day_profile(local) if local.date() == date(2026, 1, 15) else 50.0

    pressure = pressure_series(
        "S", "Asia/Shanghai", utc(2026, 1, 14, 0), utc(2026, 1, 17, 0), profile
    )
    mnf = mnf_frame("S", date(2026, 1, 15), utc(2026, 1, 14, 18))
    row = night_day_factor(pressure, mnf, dmas_frame("S", "Asia/Shanghai")).row(0, named=True)
    assert row["pressure_hours"] == 24
    assert row["p_night_m"] == pytest.approx(50.0)
    assert row["ndf_h"] == pytest.approx(20.8)


def test_ndf_partial_day_and_defaults() -> None:
    """Hours 00–19 only (20 of 24 ≥ 0.75 × 24 = 18): ratios 6 × 1.0 (00–05) + 14 × 0.8 (06–19,
    hour 10 averages 40) = 6 + 11.2 = 17.2 over 20 hours, mean 0.86 → NDF = 24 × 0.86 = 20.64.
    Hours 00–16 only (17 < 18): default 24. No pressure at all: default 24, or 23 on the spring
    day unless the default is told not to follow the day length.
    """
    dmas = dmas_frame("L", "Europe/London")
    mnf = mnf_frame("L", date(2026, 1, 15), utc(2026, 1, 15, 2))
    full = pressure_series(
        "L", "Europe/London", utc(2026, 1, 15), utc(2026, 1, 16), night_day_profile
    )
    twenty = full.filter(pl.col("ts") < utc(2026, 1, 15, 20))
    row = night_day_factor(twenty, mnf, dmas).row(0, named=True)
    assert row["pressure_hours"] == 20
    assert row["ndf_h"] == pytest.approx(20.64)
    seventeen = full.filter(pl.col("ts") < utc(2026, 1, 15, 17))
    row = night_day_factor(seventeen, mnf, dmas).row(0, named=True)
    assert (row["ndf_h"], row["ndf_source"]) == (24.0, "default")

    none = pl.DataFrame(schema=DMA_PRESSURE)
    row = night_day_factor(none, mnf, dmas).row(0, named=True)
    assert (row["ndf_h"], row["ndf_source"], row["p_night_m"]) == (24.0, "default", None)
    spring = mnf_frame("L", date(2026, 3, 29), utc(2026, 3, 29, 2))
    assert night_day_factor(none, spring, dmas)["ndf_h"][0] == pytest.approx(23.0)
    fixed = FavadParams(default_follows_day_length=False)
    assert night_day_factor(none, spring, dmas, fixed)["ndf_h"][0] == pytest.approx(24.0)


def test_daily_real_losses_is_nnf_times_ndf() -> None:
    frame = pl.DataFrame({"nnf": [3.7, -0.5, None], "ndf": [20.8, 24.0, 24.0]})
    out = frame.select(
        daily_real_losses(pl.col("nnf"), pl.col("ndf")).alias("clipped"),
        daily_real_losses(pl.col("nnf"), pl.col("ndf"), clip_negative=False).alias("raw"),
    )
    # 3.7 × 20.8 = 76.96 m³/day; −0.5 × 24 = −12 (clipped to 0)
    assert out["clipped"].to_list()[:2] == pytest.approx([76.96, 0.0])
    assert out["raw"].to_list()[:2] == pytest.approx([76.96, -12.0])
    assert out["clipped"][2] is None
