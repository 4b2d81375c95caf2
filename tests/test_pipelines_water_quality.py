"""Water-quality alerts on hand-built analyser series (5-minute samples unless stated)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import polars as pl

from pipelines.schemas import SENSOR_VALUES
from pipelines.water_quality import (
    WaterQualityParams,
    detect_water_quality,
    drift,
    flatline,
    wq_limits,
)

T0 = datetime(2024, 5, 1, tzinfo=UTC)
M5 = timedelta(minutes=5)


def series(sensor: str, quantity: str, values: list[float], step: timedelta = M5) -> pl.DataFrame:
    n = len(values)
    return pl.DataFrame(
        {
            "sensor_id": [sensor] * n,
            "quantity": [quantity] * n,
            "ts": [T0 + i * step for i in range(n)],
            "value": values,
            "quality": [0] * n,
        },
        schema=SENSOR_VALUES,
    )


def evidence(alerts: pl.DataFrame, i: int = 0) -> dict:
    return json.loads(alerts.item(i, "evidence"))


def test_turbidity_excursion_opens_at_onset_and_closes_spike_ignored():
    # 25 samples 00:00-02:00. Sample 5 (00:25) is a lone 2.0 spike: 5 min < 15 min minimum.
    # Samples 13..18 (01:05-01:30) read 1.5 NTU > 1 NTU: each sample covers the 5 min before it, so
    # the excursion spans 01:00-01:30 (30 min >= 15 min) and starts at 01:00; 01:30-02:00 back
    # under the limit (30 min >= 30 min quiet time) closes it at 01:30.
    vals = [0.5] * 25
    vals[5] = 2.0
    for i in range(13, 19):
        vals[i] = 1.5
    out = wq_limits(series("WQ1", "turbidity", vals))
    assert out.select("code", "subject_id", "start_ts", "end_ts", "status").rows() == [
        (
            "WQ_LIMIT",
            "WQ1:turbidity",
            T0 + timedelta(hours=1),
            T0 + timedelta(hours=1, minutes=30),
            "closed",
        )
    ]
    ev = evidence(out)
    assert ev["max_value"] == 1.5
    assert ev["limit_high"] == 1.0
    assert ev["limit_low"] is None
    assert ev["samples"] == 6.0
    assert ev["location"] == "network"


def test_chlorine_limits_depend_on_location_and_ph_band():
    frame = pl.concat(
        [
            series("OUT", "chlorine", [0.2] * 13),  # plant outlet: 0.2 < 0.3 mg/L
            series("NET", "chlorine", [0.2] * 13),  # network: 0.2 >= 0.05 mg/L is fine
            series("NET", "ph", [7.5] * 6 + [8.7] * 7),  # 8.7 > 8.5 from sample 6 (00:30)
        ]
    )
    sensors = pl.DataFrame({"sensor_id": ["OUT"], "location": ["plant_outlet"]})
    out = wq_limits(frame, sensors=sensors)
    assert out.select("subject_id", "start_ts", "status").rows() == [
        ("NET:ph", T0 + timedelta(minutes=25), "open"),  # sample 6 covers 00:25-00:30
        # The first sample covers the nominal 5 min before it: the excursion predates the data.
        ("OUT:chlorine", T0 - M5, "open"),
    ]
    assert (evidence(out, 0)["limit_low"], evidence(out, 0)["limit_high"]) == (6.5, 8.5)
    assert (evidence(out, 1)["limit_low"], evidence(out, 1)["limit_high"]) == (0.3, 2.0)
    assert evidence(out, 1)["location"] == "plant_outlet"


def test_bad_quality_readings_are_ignored():
    frame = series("WQ1", "turbidity", [5.0] * 10).with_columns(quality=pl.lit(16, dtype=pl.Int16))
    assert wq_limits(frame).height == 0


def test_flatline_from_last_change_and_slow_trend_is_not_flat():
    # pH: moving (7.00..7.04) for samples 0..23, stuck at 7.20 for samples 24..120 (02:00-10:00),
    # moving again after. Samples 25..120 repeat the previous value; their spans run from 02:00
    # (sample 24, the last change) to 10:00: 8 h >= 6 h. Sample 121 moves: closed at 10:00.
    ph = [7.0 + 0.01 * (i % 5) for i in range(24)] + [7.2] * 97
    ph += [7.3 + 0.01 * (i % 5) for i in range(121, 145)]
    trend = [0.5 + 0.0005 * i for i in range(145)]  # steps 0.0005 <= 0.001, range 0.072 > 0.001
    state = [1.0] * 145  # a pump state may stand still: not a quantity expected to vary
    frame = pl.concat(
        [series("P", "ph", ph), series("C", "chlorine", trend), series("S", "state", state)]
    )
    out = flatline(frame)
    assert out.select("subject_id", "start_ts", "end_ts", "status").rows() == [
        ("P:ph", T0 + timedelta(hours=2), T0 + timedelta(hours=10), "closed")
    ]
    ev = evidence(out)
    assert ev["value"] == 7.2
    assert ev["samples"] == 96.0  # samples 25..120
    assert ev["duration_h"] == 8.0


def test_drift_of_daily_median():
    # Hourly pH, 26 days: 7.0 on days 0-9, rising 0.1/day on days 10-19 (7.1 .. 8.0), 8.0 after.
    def ph(day: int) -> float:
        return 7.0 if day <= 9 else (7.0 + 0.1 * (day - 9) if day <= 19 else 8.0)

    values = [ph(h // 24) for h in range(26 * 24)]
    params = WaterQualityParams(drift_slope_per_day={"ph": 0.06})
    out = drift(series("P", "ph", values, step=timedelta(hours=1)), params)
    # Slope over the 7 days (d-6..d), x centred at 3, sum (x-3)^2 = 28:
    #   day 12: medians 0,0,0,0,.1,.2,.3 above 7.0 -> (1x.1 + 2x.2 + 3x.3) / 28 = 1.4/28 = 0.05
    #   day 13: 0,0,0,.1,.2,.3,.4 -> (0x.1 + 1x.2 + 2x.3 + 3x.4) / 28 = 2.0/28 = 0.0714 > 0.06
    #   day 21: .6,.7,.8,.9,1,1,1 -> (-1.8 - 1.4 - 0.8 + 0 + 1 + 2 + 3) / 28 = 2.0/28 = 0.0714
    #   day 22: .7,.8,.9,1,1,1,1 -> (-2.1 - 1.6 - 0.9 + 1 + 2 + 3) / 28 = 1.4/28 = 0.05 (quiet)
    # Days 22-25 quiet (4 days >= 2): closed at the end of day 21.
    assert out.select("subject_id", "start_ts", "end_ts", "status").rows() == [
        ("P:ph", T0 + timedelta(days=13), T0 + timedelta(days=22), "closed")
    ]
    ev = evidence(out)
    assert ev["max_abs_slope_per_day"] == 0.1  # days 15-19: a straight 0.1/day line
    assert ev["last_slope_per_day"] == round(2.0 / 28, 6)
    assert ev["first_median"] == 7.4  # day 13
    assert ev["last_median"] == 8.0  # day 21
    assert ev["days"] == 9.0  # days 13..21


def test_detect_water_quality_rerun_is_idempotent():
    vals = [0.5] * 25
    for i in range(13, 25):
        vals[i] = 1.5
    frame = series("WQ1", "turbidity", vals)
    first = detect_water_quality(frame)
    assert first.select("code", "status").rows() == [("WQ_LIMIT", "open")]
    assert detect_water_quality(frame, previous_alerts=first).equals(first)
