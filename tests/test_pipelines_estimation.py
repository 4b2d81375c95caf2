"""Gap estimation: linear vs profile, exact reconciliation, DST, gaps that must stay open."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta

import polars as pl
import pytest

from pipelines.consumption import interval_consumption
from pipelines.estimation import EstimationParams, estimate
from pipelines.schemas import METER_READS
from pipelines.vee import validate, validated_intervals

Q = timedelta(minutes=15)


def build_reads(
    meter: str,
    start: datetime,
    end: datetime,
    use: Callable[[datetime], float],
    drop: Callable[[datetime], bool] = lambda ts: False,
    register0: float = 100.0,
) -> pl.DataFrame:
    """15-minute reads from start to end; ``use(slot_start)`` is the volume of each quarter hour."""
    rows, reg, ts = [], register0, start
    while ts <= end:
        if not drop(ts):
            rows.append((meter, ts, reg, 0))
        reg += use(ts)
        ts += Q
    return pl.DataFrame(rows, schema=METER_READS, orient="row")


def gap_rows(result: pl.DataFrame, start: datetime, end: datetime) -> pl.DataFrame:
    return result.filter((pl.col("ts") > start) & (pl.col("ts") <= end)).sort("ts")


def register_at(r: pl.DataFrame, ts: datetime) -> float:
    return r.filter(pl.col("ts") == ts)["register"].item()


def utc(*a: int) -> datetime:
    return datetime(*a, tzinfo=UTC)


def test_short_gap_is_linear_and_reconciles_to_bounding_reads():
    r = pl.DataFrame(
        [("m1", utc(2026, 1, 5, 0), 10.0, 0), ("m1", utc(2026, 1, 5, 0, 15), 10.1, 0)]
        + [("m1", utc(2026, 1, 5, 1), 10.7, 0)],
        schema=METER_READS,
        orient="row",
    )
    out = estimate(interval_consumption(r)).intervals
    # 00:15 → 01:00 is 45 minutes: three quarter hours share 10.7 − 10.1 = 0.6 → 0.2 each
    est = out.filter(pl.col("flag") == "E")
    assert est["ts"].to_list() == [
        utc(2026, 1, 5, 0, 30),
        utc(2026, 1, 5, 0, 45),
        utc(2026, 1, 5, 1),
    ]
    assert est["volume"].to_list() == pytest.approx([0.2, 0.2, 0.2])
    assert est["method"].to_list() == ["LINEAR"] * 3
    assert est["quality"].to_list() == [64, 64, 64]  # Quality.ESTIMATED
    assert est["volume"].sum() == pytest.approx(10.7 - 10.1, abs=1e-12)
    assert out.filter(pl.col("flag") == "A")["volume"].to_list() == pytest.approx([0.1])


def test_jittered_closing_read_keeps_its_seconds_in_the_last_slot():
    r = pl.DataFrame(
        [("m1", utc(2026, 1, 5, 0), 0.0, 0), ("m1", utc(2026, 1, 5, 0, 45, 30), 0.91, 0)],
        schema=METER_READS,
        orient="row",
    )
    est = estimate(interval_consumption(r)).intervals
    # 2730 s → round(2730 / 900) = 3 slots of 900, 900 and 930 s; linear: 0.91 × len / 2730
    assert est["interval_s"].to_list() == [900.0, 900.0, 930.0]
    assert est["volume"].to_list() == pytest.approx([0.3, 0.3, 0.31])
    assert est["ts"][-1] == utc(2026, 1, 5, 0, 45, 30)


def test_two_hour_gap_is_still_linear_longer_is_not():
    # Mondays-only history is irrelevant here: the first meter has a 2 h gap, the second 2 h 15.
    r = pl.concat(
        [
            build_reads(
                "two",
                utc(2026, 1, 5, 0),
                utc(2026, 1, 5, 4),
                lambda ts: 0.01,
                drop=lambda ts: utc(2026, 1, 5, 1) < ts < utc(2026, 1, 5, 3),
            ),
            build_reads(
                "more",
                utc(2026, 1, 5, 0),
                utc(2026, 1, 5, 4),
                lambda ts: 0.01,
                drop=lambda ts: utc(2026, 1, 5, 1) < ts < utc(2026, 1, 5, 3, 15),
            ),
        ]
    )
    out = estimate(interval_consumption(r)).intervals
    est = out.filter(pl.col("flag") == "E")
    two = est.filter(pl.col("meter_id") == "two")
    more = est.filter(pl.col("meter_id") == "more")
    # 01:00 → 03:00 = 8 slots × 0.01; 01:00 → 03:15 = 9 slots, longer than 2 h → profile or flat
    assert two["method"].unique().to_list() == ["LINEAR"]
    assert two.height == 8
    assert set(more["method"].to_list()) <= {"PROFILE", "FLAT"}
    assert more.height == 9
    assert more["volume"].sum() == pytest.approx(0.09, abs=1e-12)


def test_long_gap_follows_the_same_weekday_profile_scaled_to_the_register():
    mon = [utc(2026, 1, 5), utc(2026, 1, 12), utc(2026, 1, 19)]  # three Mondays

    def use(ts: datetime) -> float:
        # Mondays only, UTC meter: 07:00-07:15 uses 0.02 on the 5th and 0.04 on the 12th (mean
        # 0.03); 07:15-07:30 uses 0.01 on both. The 19th, in the gap, really uses 0.05 + 0.03.
        day = ts.replace(hour=0, minute=0)
        if day not in mon:
            return 0.0
        if (ts.hour, ts.minute) == (7, 0):
            return {0: 0.02, 1: 0.04, 2: 0.05}[mon.index(day)]
        if (ts.hour, ts.minute) == (7, 15):
            return 0.03 if day == mon[2] else 0.01
        return 0.0

    gap_start, gap_end = utc(2026, 1, 19, 6), utc(2026, 1, 19, 9)
    r = build_reads(
        "m1",
        utc(2026, 1, 5),
        utc(2026, 1, 20),
        use,
        drop=lambda ts: gap_start < ts < gap_end,
    )
    out = estimate(interval_consumption(r)).intervals
    est = gap_rows(out, gap_start, gap_end)
    v = register_at(r, gap_end) - register_at(r, gap_start)  # 0.05 + 0.03 = 0.08
    assert v == pytest.approx(0.08)
    # profile on Mondays: mean(07:00) = (0.02 + 0.04) / 2 = 0.03, mean(07:15) = 0.01, else 0
    # → shares 0.75 and 0.25 of 0.08: 0.06 at the slot ending 07:15 and 0.02 ending 07:30
    assert est.height == 12  # 3 hours
    assert est["method"].unique().to_list() == ["PROFILE"]
    expected = [0.0] * 12
    expected[4], expected[5] = 0.06, 0.02  # slots ending 07:15 and 07:30
    assert est["volume"].to_list() == pytest.approx(expected, abs=1e-12)
    assert est["volume"].sum() == pytest.approx(v, abs=1e-12)


def test_long_gap_without_history_falls_back_to_flat():
    gap_start, gap_end = utc(2026, 1, 5, 1), utc(2026, 1, 5, 4)
    r = build_reads(
        "m1",
        utc(2026, 1, 5),
        utc(2026, 1, 5, 6),
        lambda ts: 0.004,
        drop=lambda ts: gap_start < ts < gap_end,
    )
    out = estimate(interval_consumption(r)).intervals
    est = gap_rows(out, gap_start, gap_end)
    # No earlier Monday: 12 slots share 12 × 0.004 = 0.048 evenly → 0.004 each
    assert est["method"].unique().to_list() == ["FLAT"]
    assert est["volume"].to_list() == pytest.approx([0.004] * 12)


def test_zero_profile_across_a_moving_register_falls_back_to_flat():
    # History: Monday 5th used water only at 12:00. On Monday 12th the gap 00:00-03:00 moved the
    # register by 0.06 although the profile is zero there: spreading flat is the only honest shape.
    def use(ts: datetime) -> float:
        if ts == utc(2026, 1, 5, 12):
            return 0.5
        if utc(2026, 1, 12, 0) <= ts < utc(2026, 1, 12, 3):
            return 0.005
        return 0.0

    gap_start, gap_end = utc(2026, 1, 12, 0), utc(2026, 1, 12, 3)
    r = build_reads(
        "m1", utc(2026, 1, 5), utc(2026, 1, 12, 4), use, drop=lambda t: gap_start < t < gap_end
    )
    est = gap_rows(estimate(interval_consumption(r)).intervals, gap_start, gap_end)
    assert est["method"].unique().to_list() == ["FLAT"]
    assert est["volume"].to_list() == pytest.approx([0.06 / 12] * 12)


def test_profile_uses_local_time_on_the_25_hour_day():
    # Europe/London, Sundays: 0.05 m³ in the quarter hour from 01:00 local. On Sundays 11 and
    # 18 October (BST, UTC+1) that is 00:00 UTC. On Sunday 25 October local 01:00-02:00 happens
    # twice (00:00 UTC in BST, 01:00 UTC in GMT), so both quarter hours 00:00 and 01:00 UTC carry
    # the profile weight 0.05 and split the gap volume in halves.
    sundays = {utc(2026, 10, 11, 0), utc(2026, 10, 18, 0)}

    def use(ts: datetime) -> float:
        if ts in sundays:
            return 0.05
        if ts in (utc(2026, 10, 25, 0), utc(2026, 10, 25, 1, 30)):
            return 0.06
        return 0.0

    gap_start, gap_end = utc(2026, 10, 24, 23), utc(2026, 10, 25, 3)  # local 00:00 to 03:00
    r = build_reads(
        "m1",
        utc(2026, 10, 10),
        utc(2026, 10, 25, 6),
        use,
        drop=lambda ts: gap_start < ts < gap_end,
    )
    meters = pl.DataFrame({"meter_id": ["m1"], "dma_id": ["uk"]})
    dmas = pl.DataFrame({"dma_id": ["uk"], "timezone": ["Europe/London"]})
    est = gap_rows(
        estimate(interval_consumption(r), meters, dmas=dmas).intervals, gap_start, gap_end
    )
    # 4 UTC hours = 16 slots for 3 local wall-clock hours; V = 0.06 + 0.06 = 0.12
    assert est.height == 16
    assert est["method"].unique().to_list() == ["PROFILE"]
    by_end = dict(zip(est["ts"].to_list(), est["volume"].to_list(), strict=True))
    assert by_end[utc(2026, 10, 25, 0, 15)] == pytest.approx(0.06)  # 01:00 BST
    assert by_end[utc(2026, 10, 25, 1, 15)] == pytest.approx(0.06)  # 01:00 GMT
    assert est["volume"].sum() == pytest.approx(0.12, abs=1e-12)
    # The same data read as UTC would put the Sunday weight at 00:00 UTC only.
    est_utc = gap_rows(estimate(interval_consumption(r)).intervals, gap_start, gap_end)
    assert est_utc.filter(pl.col("ts") == utc(2026, 10, 25, 0, 15))["volume"].item() == (
        pytest.approx(0.12)
    )


def test_profile_uses_local_time_on_the_23_hour_day():
    # Sundays 15 and 22 March (GMT): 0.04 m³ from 02:00 local = 02:00 UTC. On Sunday 29 March
    # clocks jump from 01:00 to 02:00 at 01:00 UTC, so local 02:00 (BST) is 01:00 UTC.
    sundays = {utc(2026, 3, 15, 2), utc(2026, 3, 22, 2)}

    def use(ts: datetime) -> float:
        return 0.04 if ts in sundays or ts == utc(2026, 3, 29, 3) else 0.0

    gap_start, gap_end = utc(2026, 3, 29, 0), utc(2026, 3, 29, 4)
    r = build_reads(
        "m1", utc(2026, 3, 14), utc(2026, 3, 29, 6), use, drop=lambda t: gap_start < t < gap_end
    )
    meters = pl.DataFrame({"meter_id": ["m1"], "timezone": ["Europe/London"]})
    est = gap_rows(estimate(interval_consumption(r), meters).intervals, gap_start, gap_end)
    # the whole gap volume 0.04 goes to the slot starting 01:00 UTC (= 02:00 BST)
    nonzero = est.filter(pl.col("volume") > 1e-12)
    assert nonzero["ts"].to_list() == [utc(2026, 3, 29, 1, 15)]
    assert nonzero["volume"].to_list() == pytest.approx([0.04])


def test_rollover_inside_a_gap_is_spread_as_consumption():
    r = pl.DataFrame(
        [("m1", utc(2026, 1, 5, 0), 99_999.9, 0), ("m1", utc(2026, 1, 5, 1), 0.3, 0)],
        schema=METER_READS,
        orient="row",
    )
    est = estimate(interval_consumption(r)).intervals
    # 0.3 + 100 000 − 99 999.9 = 0.4 over four quarter hours → 0.1 each
    assert est["volume"].to_list() == pytest.approx([0.1] * 4)


def test_open_ends_are_reported_not_invented():
    r = build_reads("m1", utc(2026, 1, 5, 1), utc(2026, 1, 5, 3), lambda ts: 0.01)
    meters = pl.DataFrame({"meter_id": ["m1", "silent"]})
    res = estimate(
        interval_consumption(r),
        meters,
        since=utc(2026, 1, 5, 0),
        until=utc(2026, 1, 5, 6),
    )
    # nothing before the first read (01:00) or after the last (03:00)
    assert res.intervals["ts"].min() == utc(2026, 1, 5, 1, 15)
    assert res.intervals["ts"].max() == utc(2026, 1, 5, 3)
    un = res.unestimable.sort("meter_id", "gap_start")
    assert un.select("meter_id", "gap_start", "gap_end", "intervals", "reason").rows() == [
        ("m1", utc(2026, 1, 5, 0), utc(2026, 1, 5, 1), 4, "NO_OPENING_READ"),  # 1 h = 4 slots
        ("m1", utc(2026, 1, 5, 3), utc(2026, 1, 5, 6), 12, "NO_CLOSING_READ"),  # 3 h = 12 slots
        ("silent", utc(2026, 1, 5, 0), utc(2026, 1, 5, 6), 24, "NO_READS"),
    ]


def test_failed_interval_is_left_for_editing():
    r = pl.DataFrame(
        [("m1", utc(2026, 1, 5, 0, 15 * i), reg, 0) for i, reg in enumerate([100.0, 100.1])]
        + [("m1", utc(2026, 1, 5, 0, 30), 5.0, 0), ("m1", utc(2026, 1, 5, 1), 5.1, 0)],
        schema=METER_READS,
        orient="row",
    )
    m = pl.DataFrame({"meter_id": ["m1"], "q4": [3.125], "account": ["A"]})
    f = validate(r, m, as_of=utc(2026, 1, 5, 1))
    res = estimate(validated_intervals(r, m, None, f))
    # 5.0 at 00:30 is dropped; 100.1 → 5.1 over 45 minutes still decreases: not estimated
    failed = res.intervals.filter(pl.col("vee_status") == "FAILED")
    assert failed["volume"].to_list() == [None]
    assert failed["flag"].to_list() == ["A"]
    assert res.intervals.filter(pl.col("flag") == "E").height == 0
    assert res.unestimable.select("gap_start", "gap_end", "intervals", "reason").rows() == [
        (utc(2026, 1, 5, 0, 15), utc(2026, 1, 5, 1), 3, "VALIDATION_FAILED")
    ]


def test_profile_needs_the_configured_number_of_samples():
    # One earlier Monday observed; requiring two samples per cell turns PROFILE into FLAT.
    def use(ts: datetime) -> float:
        return 0.02 if ts.hour == 7 and ts.minute == 0 else 0.0

    gap_start, gap_end = utc(2026, 1, 12, 6), utc(2026, 1, 12, 9)
    r = build_reads(
        "m1", utc(2026, 1, 5), utc(2026, 1, 12, 10), use, drop=lambda t: gap_start < t < gap_end
    )
    iv = interval_consumption(r)
    one = gap_rows(estimate(iv).intervals, gap_start, gap_end)
    two = gap_rows(
        estimate(iv, params=EstimationParams(profile_min_samples=2)).intervals, gap_start, gap_end
    )
    assert one["method"].unique().to_list() == ["PROFILE"]
    assert two["method"].unique().to_list() == ["FLAT"]
    # either way the gap holds exactly the 0.02 of the register difference
    assert one["volume"].sum() == pytest.approx(0.02, abs=1e-12)
    assert two["volume"].to_list() == pytest.approx([0.02 / 12] * 12)


def test_a_holiday_gap_follows_the_sunday_profile_when_the_dma_declares_it():
    # Weekdays: the morning peak at 07:00 UTC; Sundays and holidays: at 10:00. Thursday 25 and
    # Friday 26 December 2025 are holidays of the DMA; the history holds Thursday 18 December
    # (a working day) and Christmas day itself (a holiday), and the meter goes silent all of
    # Friday 26th.
    holidays = [date(2025, 12, 25), date(2025, 12, 26)]

    def use(start: datetime) -> float:
        sunday_like = start.weekday() == 6 or start.date() in holidays
        return 0.2 if start.hour == (10 if sunday_like else 7) else 0.001

    gap_start, gap_end = utc(2025, 12, 26), utc(2025, 12, 27)
    r = build_reads(
        "m1", utc(2025, 12, 1), utc(2025, 12, 28), use, drop=lambda t: gap_start < t < gap_end
    )
    meters = pl.DataFrame({"meter_id": ["m1", "m2"], "dma_id": ["d1", "d1"]})
    declared = pl.DataFrame(
        {"dma_id": ["d1"], "timezone": ["UTC"], "holidays": [holidays]},
        schema={"dma_id": pl.String, "timezone": pl.String, "holidays": pl.List(pl.Date)},
    )

    def peak_hour(dmas: pl.DataFrame) -> int:
        result = estimate(interval_consumption(r), meters, dmas=dmas).intervals
        est = gap_rows(result, gap_start, gap_end)
        assert est["method"].unique().to_list() == ["PROFILE"]
        assert est["volume"].sum() == pytest.approx(0.2 * 4 + 0.001 * 92, abs=1e-9)
        top = est.sort("volume", descending=True)["ts"][0]
        return (top - timedelta(minutes=15)).hour  # rows are stamped at their slot's end

    assert peak_hour(declared.drop("holidays")) == 7  # read as a Friday
    assert peak_hour(declared) == 10  # read as a Sunday: the 25th and the Sundays taught it
