"""CUSUM on net night flow: fires on a persistent step, dates it, closes it, ignores noise.

Hand arithmetic shared by the step tests (default parameters):
NNF = 5.0 + a repeating offset pattern (+0.2, −0.1, 0.0, −0.2, +0.1) by night index mod 5.
Detection starts after 10 nights. For the nights before a step the trailing 14 nights hold
offsets {−0.2 ×2..3, −0.1 ×3, 0 ×3, +0.1 ×2..3, +0.2 ×2..3}: median 0 → baseline 5.0;
|offset| median 0.1 → MAD-sigma 0.14826 (≥ the std 0.1406), so
k = max(0.5, 0.148) + 1.2533 × 0.14826 / √14 = 0.5 + 0.0497 = 0.5497 m³/h,
h = max(3.0, 5 × 0.148) = 3.0, per-night increment capped at h / 2 = 1.5.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta

import numpy as np
import polars as pl

from dma.leak_detection import ALERT_CODE, NightFlowRiseParams, night_flow_rise_alerts
from pipelines.schemas import ALERTS

PATTERN = [0.2, -0.1, 0.0, -0.2, 0.1]
FIRST = date(2026, 1, 1)


def night_ts(i: int) -> datetime:
    """MNF window start of night i: 02:00 UTC on FIRST + i days."""
    d = FIRST + timedelta(days=i)
    return datetime(d.year, d.month, d.day, 2, 0, tzinfo=UTC)


def nnf_frame(dma: str, values: list[float | None]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "dma_id": [dma] * len(values),
            "night_date": [FIRST + timedelta(days=i) for i in range(len(values))],
            "nnf_m3h": values,
            "mnf_start_ts": [night_ts(i) for i in range(len(values))],
        },
        schema={
            "dma_id": pl.String,
            "night_date": pl.Date,
            "nnf_m3h": pl.Float64,
            "mnf_start_ts": pl.Datetime("us", "UTC"),
        },
    )


def patterned(n: int, step_from: int, step: float, step_to: int | None = None) -> list[float]:
    end = n if step_to is None else step_to
    return [5.0 + PATTERN[i % 5] + (step if step_from <= i < end else 0.0) for i in range(n)]


def test_step_rise_fires_with_start_at_the_change_night() -> None:
    """+2.0 m³/h from night 18 (2026-01-19).
    night 18: x = 7 − 0.2 = 6.8 → 6.8 − 5.0 − 0.5497 = 1.2503 → S = 1.2503 (run starts)
    night 19: x = 7.1 → 1.5503, capped 1.5 → S = 2.7503 < 3
    night 20: x = 7.2 → capped 1.5 → S = 4.2503 ≥ 3 → alarm; change point = night 18.
    Rise nights 18–29: x = 7 + offsets, median offset 0 → estimated rise 7.0 − 5.0 = 2.0
    (medium: 1.0 ≤ 2.0 < 3.6). Current = night 29 = 7 + 0.1 = 7.1.
    """
    alerts = night_flow_rise_alerts(nnf_frame("D1", patterned(30, 18, 2.0)))
    assert alerts.schema == pl.Schema(ALERTS)
    assert alerts.height == 1
    a = alerts.row(0, named=True)
    assert a["code"] == ALERT_CODE == "DMA_NIGHT_FLOW_RISE"
    assert a["subject_id"] == "D1"
    assert abs(a["start_ts"] - night_ts(18)) <= timedelta(days=1)  # the requirement
    assert a["start_ts"] == night_ts(18)  # and exactly, by the arithmetic above
    assert a["end_ts"] is None and a["status"] == "open"
    assert a["severity"] == "medium"
    ev = json.loads(a["evidence"])
    assert ev["start_night"] == "2026-01-19"
    assert ev["alarm_night"] == "2026-01-21"
    assert ev["baseline_nnf_m3h"] == 5.0
    assert ev["estimated_rise_m3h"] == 2.0
    assert ev["current_nnf_m3h"] == 7.1
    assert ev["slack_m3h"] == 0.5497
    assert ev["decision_m3h"] == 3.0
    assert ev["cusum_at_alarm_m3h"] == 4.2503


def test_missing_nights_are_skipped_not_zero() -> None:
    """Same series, night 19 null: S = 1.2503 (night 18), night 20 +1.5 → 2.7503, night 21
    x = 6.9 → 1.3503 → S = 4.1006 ≥ 3: alarm one night later, start still night 18."""
    values: list[float | None] = list(patterned(30, 18, 2.0))
    values[19] = None
    a = night_flow_rise_alerts(nnf_frame("D1", values)).row(0, named=True)
    assert a["start_ts"] == night_ts(18)
    assert json.loads(a["evidence"])["alarm_night"] == "2026-01-22"


def test_episode_closes_when_nnf_returns() -> None:
    """+4.0 m³/h on nights 15–21 only. Baseline 5.0, k 0.5497 (same arithmetic, nights 1–14).
    night 15: 9.2 − 5.5497 capped 1.5 → S = 1.5; night 16: +1.5 → S = 3.0 ≥ 3 → alarm.
    Nights 22, 23, 24 = 5.0, 4.8, 5.1 ≤ 5.5497: third one closes; end = night 22.
    Rise nights 15–21: 9 + offsets {+0.2, −0.1, 0, −0.2, +0.1, +0.2, −0.1}, median 9.0 → rise 4.0
    (high: ≥ 3.6). No second episode in nights 25–29.
    """
    alerts = night_flow_rise_alerts(nnf_frame("D2", patterned(30, 15, 4.0, step_to=22)))
    assert alerts.height == 1
    a = alerts.row(0, named=True)
    assert a["start_ts"] == night_ts(15)
    assert a["end_ts"] == night_ts(22)
    assert a["status"] == "closed"
    assert a["severity"] == "high"
    ev = json.loads(a["evidence"])
    assert ev["alarm_night"] == "2026-01-17"
    assert ev["end_night"] == "2026-01-23"
    assert ev["estimated_rise_m3h"] == 4.0
    assert ev["current_nnf_m3h"] == 8.9  # night 21: 9 − 0.1


def test_initial_baseline_mode_also_dates_the_step() -> None:
    """Baseline from nights 0–13: offsets median 0 → 5.0; same k, h → same dates as above."""
    p = NightFlowRiseParams(baseline="initial")
    a = night_flow_rise_alerts(nnf_frame("D1", patterned(30, 18, 2.0)), p).row(0, named=True)
    assert a["start_ts"] == night_ts(18)


def test_noise_only_never_fires() -> None:
    """Thirty nights of seeded Gaussian noise at several levels and scales, plus one DMA with a
    single exceptional night (+10 m³/h: capped at 1.5, then decays by ≥ 0.35 a night)."""
    rng = np.random.default_rng(20260101)
    frames = []
    for j, (level, sd) in enumerate([(2.0, 0.1), (5.0, 0.3), (12.0, 0.8), (30.0, 2.0), (8.0, 1.2)]):
        for rep in range(4):
            frames.append(nnf_frame(f"N{j}-{rep}", list(level + rng.normal(0.0, sd, 30))))
    spike = patterned(30, 0, 0.0)
    spike[17] += 10.0
    frames.append(nnf_frame("SPIKE", spike))
    alerts = night_flow_rise_alerts(pl.concat(frames))
    assert alerts.height == 0


def test_only_the_leaking_dma_fires_in_a_mixed_frame() -> None:
    rng = np.random.default_rng(7)
    frame = pl.concat(
        [
            nnf_frame("QUIET", list(6.0 + rng.normal(0.0, 0.3, 30))),
            nnf_frame("LEAK", patterned(30, 18, 2.0)),
        ]
    )
    alerts = night_flow_rise_alerts(frame)
    assert alerts["subject_id"].to_list() == ["LEAK"]
    assert night_flow_rise_alerts(frame.head(0)).height == 0
