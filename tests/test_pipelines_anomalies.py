"""Meter anomaly codes on hand-built 15-minute interval frames.

A household day (``DAY``) has 96 intervals; interval k of a day ends at 00:15 + k x 15 min. Use is
4 x 0.01 m³ in 07:00-08:00 (k = 28..31) and 5 x 0.02 m³ in the evening (k = 76, 78, 80, 82, 84),
0.14 m³ a day; every other interval, the whole night included, is zero. Unless a test says
otherwise, night windows are taken in UTC so the hours in comments are the timestamps.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta

import polars as pl

from pipelines.anomalies import (
    MeterAnomalyParams,
    comms_loss,
    detect_meter_anomalies,
    meter_age,
)
from pipelines.schemas import ALERTS, INTERVALS, METERS

T0 = datetime(2024, 5, 1, tzinfo=UTC)
Q = timedelta(minutes=15)
D = timedelta(days=1)
UTC_NIGHTS = MeterAnomalyParams(timezone="UTC")

DAY = [0.0] * 96
for _k in (28, 29, 30, 31):
    DAY[_k] = 0.01
for _k in (76, 78, 80, 82, 84):
    DAY[_k] = 0.02


def ends(k: int, start: datetime = T0) -> datetime:
    """End of interval k counted from ``start``."""
    return start + (k + 1) * Q


def intervals(
    meter: str,
    volumes: list[float],
    *,
    start: datetime = T0,
    quality: dict[int, int] | None = None,
    flags: dict[int, str] | None = None,
) -> pl.DataFrame:
    q = quality or {}
    f = flags or {}
    n = len(volumes)
    return pl.DataFrame(
        {
            "meter_id": [meter] * n,
            "ts": [ends(k, start) for k in range(n)],
            "volume": volumes,
            "quality": [q.get(k, 0) for k in range(n)],
            "flag": [f.get(k, "A") for k in range(n)],
            "method": [None] * n,
        },
        schema=INTERVALS,
    )


def meters(*rows: dict) -> pl.DataFrame:
    base = {
        "dma_id": "DMA-1",
        "account": "ACC",
        "customer_type": "household",
        "dn": 15,
        "q3": 2.5,
        "q4": 3.125,
        "register_digits": 5,
        "install_date": date(2022, 1, 1),
        "gateway": "GW",
    }
    return pl.DataFrame([{**base, **r} for r in rows], schema=METERS)


def evidence(alerts: pl.DataFrame, i: int = 0) -> dict:
    return json.loads(alerts.item(i, "evidence"))


def only(alerts: pl.DataFrame, code: str) -> pl.DataFrame:
    return alerts.filter(pl.col("code") == code)


def test_clean_household_raises_nothing_in_30_days():
    # Default parameters (Asia/Shanghai nights); the day pattern laid out in local time, starting at
    # local midnight 2024-05-01 00:00+08:00 = 2024-04-30 16:00 UTC. All reads actual, every 15 min.
    start = datetime(2024, 4, 30, 16, tzinfo=UTC)
    frame = pl.concat(
        [
            intervals("H1", DAY * 30, start=start),
            # A second household using water at other times, with a weekly lie-in and zero days.
            intervals(
                "H2",
                ([0.0] * 40 + [0.03] * 6 + [0.0] * 50) * 5 + [0.0] * 192 + DAY * 23,
                start=start,
            ),
        ]
    )
    as_of = start + 30 * D
    out = detect_meter_anomalies(frame, meters({"meter_id": "H1"}, {"meter_id": "H2"}), as_of=as_of)
    assert out.height == 0, out
    assert out.schema == pl.Schema(ALERTS)


def test_leak_starts_at_onset_closes_at_repair_with_evidence():
    # 10 days; leak of 0.002 m³ per interval (8 L/h) added from interval 432 (day 4 k=48, the one
    # ending 12:15, so the leak starts at 12:00) to interval 719 (ends day 7 12:00): 288 intervals.
    vols = DAY * 10
    for k in range(432, 720):
        vols[k] += 0.002
    m = meters({"meter_id": "L"})
    out = detect_meter_anomalies(intervals("L", vols), m, UTC_NIGHTS, as_of=T0 + 10 * D)
    leak = only(out, "LEAK_CONTINUOUS")
    assert leak.height == 1
    assert leak.item(0, "start_ts") == T0 + 4 * D + timedelta(hours=12)
    # After the repair, day 7 k=48..75 (12:00-19:00) are zero: 7 h >= 1 h quiet time, so closed at
    # the end of the last leaking interval.
    assert leak.item(0, "status") == "closed"
    assert leak.item(0, "end_ts") == T0 + 7 * D + timedelta(hours=12)
    ev = evidence(leak)
    assert ev["min_night_flow_m3h"] == 0.008  # 0.002 m³ / 0.25 h
    assert ev["max_flow_m3h"] == 0.088  # (0.02 + 0.002) / 0.25 h
    assert ev["intervals"] == 288.0
    # 288 x 0.002 = 0.576 leaked + household use in those 72 h: day 4 evening 0.10 + days 5 and 6
    # 2 x 0.14 + day 7 morning 0.04 = 0.42; total 0.996.
    assert abs(ev["volume_m3"] - 0.996) < 1e-9
    assert ev["duration_h"] == 72.0
    assert set(out.get_column("code")) == {"LEAK_CONTINUOUS"}


def test_leak_still_running_is_open_and_small_flow_under_floor_is_not_a_leak():
    vols = DAY * 10
    for k in range(432, 960):
        vols[k] += 0.002
    trickle = [v + 0.0005 for v in DAY * 10]  # 0.0005 m³ / 0.25 h = 0.002 m³/h < 0.004 floor
    frame = pl.concat([intervals("L", vols), intervals("T", trickle)])
    m = meters({"meter_id": "L"}, {"meter_id": "T"})
    out = only(detect_meter_anomalies(frame, m, UTC_NIGHTS, as_of=T0 + 10 * D), "LEAK_CONTINUOUS")
    assert out.select("subject_id", "start_ts", "status", "end_ts").rows() == [
        ("L", T0 + 4 * D + timedelta(hours=12), "open", None)
    ]


def test_leak_update_across_runs_is_one_alert():
    vols = DAY * 12
    for k in range(432, 1008):  # day 4 12:00 to day 10 12:00
        vols[k] += 0.002
    frame = intervals("L", vols)
    m = meters({"meter_id": "L"})
    # Run 1 at day 6: leak open. Run 2 sees only days 5..12 (the onset is before its window).
    run1 = detect_meter_anomalies(
        frame.filter(pl.col("ts") <= T0 + 6 * D), m, UTC_NIGHTS, as_of=T0 + 6 * D
    )
    window2 = frame.filter(pl.col("ts") > T0 + 5 * D)
    run2 = detect_meter_anomalies(window2, m, UTC_NIGHTS, as_of=T0 + 12 * D, previous_alerts=run1)
    leak = only(run2, "LEAK_CONTINUOUS")
    assert leak.select("start_ts", "status", "end_ts").rows() == [
        (T0 + 4 * D + timedelta(hours=12), "closed", T0 + 10 * D + timedelta(hours=12))
    ]
    # Each leaking interval counted once: run 1 stored day 4 12:00 -> day 6 00:00 = 36 h = 144;
    # run 2 adds those ending after that stored last activity, up to day 10 12:00: 108 h = 432;
    # 144 + 432 = 576 = all intervals 432..1007.
    assert evidence(leak)["intervals"] == 576.0
    assert detect_meter_anomalies(
        window2, m, UTC_NIGHTS, as_of=T0 + 12 * D, previous_alerts=run2
    ).equals(run2)


def test_night_window_follows_the_meter_time_zone_column():
    # Flow never stops for 3 days: 0.01 m³ per interval (0.04 m³/h), except 0.002 (0.008 m³/h)
    # in 16:00-21:00 UTC, which is 00:00-05:00 in Asia/Shanghai (UTC+8). The meter's zone comes
    # from a ``timezone`` column and overrides the UTC default of the parameters.
    vols = [0.002 if 64 <= k % 96 < 84 else 0.01 for k in range(3 * 96)]
    m = meters({"meter_id": "Z"}).with_columns(timezone=pl.lit("Asia/Shanghai"))
    out = only(
        detect_meter_anomalies(intervals("Z", vols), m, UTC_NIGHTS, as_of=T0 + 3 * D),
        "LEAK_CONTINUOUS",
    )
    assert out.select("start_ts", "status").rows() == [(T0, "open")]  # first interval 00:00-00:15
    assert evidence(out)["min_night_flow_m3h"] == 0.008  # 0.002 / 0.25 h, local night only
    assert evidence(out)["max_flow_m3h"] == 0.04


def test_burst_near_q3_and_far_above_baseline():
    # Day 8, k = 40..47 (10:00-12:00): 0.5 m³ per 15 min = 2.0 m³/h.
    vols = DAY * 10
    for k in range(8 * 96 + 40, 8 * 96 + 48):
        vols[k] = 0.5
    frame = pl.concat([intervals("B", vols), intervals("BIG", vols)])
    m = meters({"meter_id": "B"}, {"meter_id": "BIG", "dn": 50, "q3": 25.0, "q4": 31.25})
    out = detect_meter_anomalies(frame, m, UTC_NIGHTS, as_of=T0 + 10 * D)
    burst = only(out, "BURST")
    # B: 2.0 >= 0.6 x 2.5 = 1.5 (near Q3) and >= 5 x baseline. BIG: 2.0 < 0.6 x 25 = 15: no burst.
    assert burst.get_column("subject_id").to_list() == ["B"]
    assert burst.item(0, "start_ts") == T0 + 8 * D + timedelta(hours=10)
    assert burst.item(0, "end_ts") == T0 + 8 * D + timedelta(hours=12)
    assert burst.item(0, "status") == "closed"
    ev = evidence(burst)
    assert ev["max_flow_m3h"] == 2.0
    assert ev["volume_m3"] == 4.0  # 8 x 0.5
    assert ev["q3_m3h"] == 2.5
    # Baseline: mean flow of days 1..7, each 0.14 m³ over 24 h = 0.0058333 m³/h (6 digits).
    assert ev["baseline_m3h"] == round(0.14 / 24, 6)
    # 0.5 m³ per interval < Q4 x 0.25 h = 0.78125: not over capacity; nothing else either.
    assert set(out.get_column("code")) == {"BURST"}


def test_reverse_flow_negative_volume_and_status_bit():
    vols = DAY * 2
    vols[100] = -0.003  # day 1 k=4: 01:00-01:15
    out = detect_meter_anomalies(
        intervals("R", vols, quality={150: 2}),  # day 1 k=54: 13:30-13:45, bit 2 = REVERSE_FLOW
        meters({"meter_id": "R"}),
        UTC_NIGHTS,
        as_of=T0 + 2 * D,
    )
    rev = only(out, "REVERSE_FLOW")
    assert rev.select("start_ts", "end_ts", "status").rows() == [
        (T0 + D + timedelta(hours=1), T0 + D + timedelta(hours=1, minutes=15), "closed"),
        (
            T0 + D + timedelta(hours=13, minutes=30),
            T0 + D + timedelta(hours=13, minutes=45),
            "closed",
        ),
    ]
    assert evidence(rev, 0)["reverse_volume_m3"] == 0.003
    assert evidence(rev, 0)["flagged_intervals"] == 0.0
    assert evidence(rev, 1)["flagged_intervals"] == 1.0
    assert evidence(rev, 1)["reverse_volume_m3"] == 0.0


def test_stuck_meter_after_use_on_active_account():
    # Use on days 0-3, nothing on days 4-8, use again from day 9.
    vols = DAY * 4 + [0.0] * 96 * 5 + DAY * 2
    params = MeterAnomalyParams(timezone="UTC", stuck_min_duration=3 * D)
    frame = pl.concat(
        [
            intervals("S", vols),
            intervals("NOACC", vols),  # same data, no account: not an active account
            intervals("NEVER", [0.0] * 96 * 11),  # never used water in the input
        ]
    )
    m = meters({"meter_id": "S"}, {"meter_id": "NOACC", "account": None}, {"meter_id": "NEVER"})
    out = only(detect_meter_anomalies(frame, m, params, as_of=T0 + 11 * D), "STUCK_METER")
    assert out.get_column("subject_id").to_list() == ["S"]
    # Last use: day 3 k=84, ending 21:15; the zero stretch starts there. First use again: day 9
    # k=28 (07:00-07:15), so the last zero interval ends day 9 07:00.
    assert out.item(0, "start_ts") == T0 + 3 * D + timedelta(hours=21, minutes=15)
    assert out.item(0, "end_ts") == T0 + 9 * D + timedelta(hours=7)
    ev = evidence(out)
    # 21:15 day 3 -> 07:00 day 9 = 5 d 9.75 h = 129.75 h = 519 intervals.
    assert ev["zero_intervals"] == 519.0
    assert ev["duration_h"] == 129.75
    assert abs(ev["used_before_m3"] - 0.56) < 1e-9  # 4 days x 0.14 m³


def test_tamper_flaps_into_one_episode():
    # Tamper bit on k=40..43 (10:00-11:00) and k=52..53 (13:00-13:30): the 2 h gap is under the 6 h
    # quiet time, so one episode; then clear until 24:00 (10.5 h) closes it.
    q = {k: 4 for k in (40, 41, 42, 43, 52, 53)}
    out = detect_meter_anomalies(
        intervals("T", DAY, quality=q), meters({"meter_id": "T"}), UTC_NIGHTS, as_of=T0 + D
    )
    tam = only(out, "TAMPER")
    assert tam.select("start_ts", "end_ts", "status").rows() == [
        (T0 + timedelta(hours=10), T0 + timedelta(hours=13, minutes=30), "closed")
    ]
    assert evidence(tam)["flagged_intervals"] == 6.0


def test_low_battery_bit_and_voltage():
    frame = pl.concat(
        [intervals("V", DAY, quality={10: 8}), intervals("W", DAY)]  # k=10: 02:30-02:45
    )
    volts = pl.DataFrame(
        {
            "meter_id": ["W", "W"],
            "ts": [T0 + timedelta(hours=1), T0 + timedelta(hours=12)],
            "voltage": [3.5, 3.2],
        },
        schema={"meter_id": pl.String, "ts": pl.Datetime("us", "UTC"), "voltage": pl.Float64},
    )
    out = detect_meter_anomalies(
        frame,
        meters({"meter_id": "V"}, {"meter_id": "W"}),
        UTC_NIGHTS,
        as_of=T0 + D,
        voltages=volts,
    )
    low = only(out, "LOW_BATTERY")
    assert low.select("subject_id", "start_ts", "end_ts", "status").rows() == [
        ("V", T0 + timedelta(hours=2, minutes=30), T0 + timedelta(hours=2, minutes=45), "closed"),
        # 3.2 V < 3.3 V reported at 12:00: the interval ending 12:00 (11:45-12:00) is the first
        # to carry it; still low at the end of data.
        ("W", T0 + timedelta(hours=11, minutes=45), None, "open"),
    ]
    assert evidence(low, 1)["min_voltage_v"] == 3.2


def test_comms_loss_from_uplinks():
    six = timedelta(hours=6)
    c1 = [T0 + i * six for i in range(9) if i not in (2, 3, 4)]  # 06:00 day 0 -> 06:00 day 1
    c2 = [T0 + i * six for i in range(5)]  # last uplink day 1 00:00
    c3 = [T0 + i * six for i in range(5)] + [T0 + D + timedelta(hours=1)]  # last day 1 01:00
    rows = [("C1", t) for t in c1] + [("C2", t) for t in c2] + [("C3", t) for t in c3]
    uplinks = pl.DataFrame(
        rows, schema={"meter_id": pl.String, "ts": pl.Datetime("us", "UTC")}, orient="row"
    )
    m = meters({"meter_id": "C1"}, {"meter_id": "C2"}, {"meter_id": "C3"}, {"meter_id": "C4"})
    as_of = T0 + D + timedelta(hours=13)
    out = comms_loss(uplinks, m, UTC_NIGHTS, as_of, window_start=T0)
    assert out.select("subject_id", "start_ts", "end_ts", "status").rows() == [
        # 24 h without uplink > 2 x 6 h; ends with the uplink that came back.
        ("C1", T0 + six, T0 + D + six, "closed"),
        # Silent 13 h at as_of (> 12 h): open from the last uplink.
        ("C2", T0 + D, None, "open"),
        # C3: silent exactly 12 h (not more than 2 periods): nothing.
        # C4: no uplink at all since the window start: 37 h.
        ("C4", T0, None, "open"),
    ]
    assert evidence(out, 0)["silent_h"] == 24.0
    assert evidence(out, 0)["missed_periods"] == 4.0  # floor(24 / 6)
    assert evidence(out, 1)["silent_h"] == 13.0


def test_comms_loss_from_actual_intervals_ignores_estimated_ones():
    # Intervals k=10..70 were estimated after the fact: no read arrived between the interval
    # ending 02:30 (k=9) and the one ending 18:00 (k=71): 15.5 h > 12 h.
    flags = {k: "E" for k in range(10, 71)}
    out = detect_meter_anomalies(
        intervals("E1", DAY, flags=flags), meters({"meter_id": "E1"}), UTC_NIGHTS, as_of=T0 + D
    )
    assert only(out, "COMMS_LOSS").select("start_ts", "end_ts").rows() == [
        (T0 + timedelta(hours=2, minutes=30), T0 + timedelta(hours=18))
    ]


def test_over_capacity_above_q4_times_interval():
    vols = list(DAY)
    vols[40] = 0.8  # 10:00-10:15; limit Q4 x 0.25 h = 3.125 x 0.25 = 0.78125 m³
    vols[60] = 0.78  # under the limit
    out = detect_meter_anomalies(
        intervals("O", vols), meters({"meter_id": "O"}), UTC_NIGHTS, as_of=T0 + D
    )
    over = only(out, "OVER_CAPACITY")
    assert over.select("start_ts", "end_ts", "status").rows() == [
        (T0 + timedelta(hours=10), T0 + timedelta(hours=10, minutes=15), "closed")
    ]
    ev = evidence(over)
    assert ev["max_volume_m3"] == 0.8
    assert ev["max_flow_m3h"] == 3.2  # 0.8 / 0.25 h
    assert ev["q4_m3h"] == 3.125
    assert only(out, "BURST").height == 0  # one interval is not sustained


def test_meter_age_jjg162_and_exchange_closes():
    as_of = datetime(2024, 6, 1, tzinfo=UTC)
    m = meters(
        {"meter_id": "A", "install_date": date(2018, 3, 1)},  # due 2024-03-01
        {"meter_id": "B", "install_date": date(2010, 1, 1), "dn": 40},  # > DN25
        {"meter_id": "C", "install_date": date(2010, 1, 1), "customer_type": "non_household"},
        {"meter_id": "D", "install_date": date(2019, 1, 1), "dn": 25},  # due 2025-01-01
        {"meter_id": "E", "install_date": date(2018, 6, 1), "dn": 25},  # due on as_of itself
    )
    out = meter_age(m, UTC_NIGHTS, as_of)
    assert out.select("subject_id", "start_ts", "status").rows() == [
        ("A", datetime(2024, 3, 1, tzinfo=UTC), "open"),
        ("E", datetime(2024, 6, 1, tzinfo=UTC), "open"),
    ]
    ev = evidence(out, 0)
    assert ev["install_date"] == "2018-03-01"
    # 2018-03-01 -> 2024-06-01: 6 x 365 + 2 leap days + 92 (Mar-May) = 2284 d / 365.25 = 6.253
    assert ev["age_years"] == 6.25
    # A is exchanged on 2024-05-01: the stored alert closes there, E continues unchanged.
    exchanged = m.with_columns(
        pl.when(pl.col("meter_id") == "A")
        .then(pl.lit(date(2024, 5, 1)))
        .otherwise(pl.col("install_date"))
        .alias("install_date")
    )
    later = meter_age(exchanged, UTC_NIGHTS, as_of, previous_alerts=out)
    assert later.select("subject_id", "start_ts", "status", "end_ts").rows() == [
        ("A", datetime(2024, 3, 1, tzinfo=UTC), "closed", datetime(2024, 5, 1, tzinfo=UTC)),
        ("E", datetime(2024, 6, 1, tzinfo=UTC), "open", None),
    ]


def test_detect_is_idempotent_and_keeps_identity():
    vols = DAY * 6
    for k in range(200, 576):
        vols[k] += 0.002
    frame = pl.concat(
        [
            intervals("L", vols),
            intervals("T", DAY * 6, quality={k: 4 for k in range(300, 310)}),
        ]
    )
    m = meters({"meter_id": "L"}, {"meter_id": "T"})
    first = detect_meter_anomalies(frame, m, UTC_NIGHTS, as_of=T0 + 6 * D)
    assert set(first.get_column("code")) == {"LEAK_CONTINUOUS", "TAMPER"}
    again = detect_meter_anomalies(frame, m, UTC_NIGHTS, as_of=T0 + 6 * D, previous_alerts=first)
    assert again.equals(first)


def test_stored_alert_of_a_meter_that_cannot_open_one_is_still_closed():
    # Run 1 ends while the tamper bit is set: an open alert. Run 2's window has no bit at all, so
    # the meter could not open an episode there, and it must still be looked at: a whole day
    # clear (over the 6 h quiet time) closes the stored alert at its last active interval.
    q = {k: 4 for k in range(88, 96)}
    run1 = detect_meter_anomalies(
        intervals("T", DAY, quality=q), meters({"meter_id": "T"}), UTC_NIGHTS, as_of=T0 + D
    )
    assert only(run1, "TAMPER")["status"].to_list() == ["open"]
    day2 = intervals("T", DAY, start=T0 + D)
    run2 = detect_meter_anomalies(
        day2, meters({"meter_id": "T"}), UTC_NIGHTS, as_of=T0 + 2 * D, previous_alerts=run1
    )
    tam = only(run2, "TAMPER")
    assert tam.select("start_ts", "status", "end_ts").rows() == [(T0 + 88 * Q, "closed", T0 + D)]


def test_meters_that_cannot_raise_a_code_do_not_change_the_others_alerts():
    # The same leaking and tampered meters alone, and among households that raise nothing.
    vols = DAY * 4
    for k in range(100, 300):
        vols[k] += 0.002
    noisy = [intervals("L", vols), intervals("T", DAY * 4, quality={k: 4 for k in range(10, 14)})]
    # Households with flow most hours (never 24 h without a zero) and one reverse interval each.
    busy = [0.01 if k % 8 else 0.0 for k in range(96)]
    quiet = [intervals(f"H{i}", busy * 3 + DAY, flags={200 + i: "E"}) for i in range(5)]
    ids = ("L", "T", "H0", "H1", "H2", "H3", "H4")
    m = meters(*({"meter_id": x} for x in ids))
    alone = detect_meter_anomalies(
        pl.concat(noisy),
        m.filter(pl.col("meter_id").is_in(["L", "T"])),
        UTC_NIGHTS,
        as_of=T0 + 4 * D,
    )
    among = detect_meter_anomalies(pl.concat(quiet + noisy), m, UTC_NIGHTS, as_of=T0 + 4 * D)
    assert set(alone["code"]) == {"LEAK_CONTINUOUS", "TAMPER"}
    assert among.filter(pl.col("subject_id").is_in(["L", "T"])).equals(alone)
