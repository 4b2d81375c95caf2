"""Net inflow, MNF per local night (incl. DST nights and Asia/Shanghai), LNU/NNF and dma_daily.

All frames are built by hand; expected values are worked out in the comments.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta

import polars as pl
import pytest

from dma.daily import dma_daily
from dma.inflow import InflowParams, net_inflow
from dma.night_flow import NightFlowParams, minimum_night_flow
from dma.night_use import NightUseParams, legitimate_night_use
from pipelines.schemas import DMA_PRESSURE, DMAS, INTERVALS, METERS


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def flow_series(
    dma: str, start: datetime, end: datetime, base: float, overrides: dict[datetime, float]
) -> pl.DataFrame:
    """15-min net inflow from start (inclusive) to end (exclusive), base value with overrides."""
    rows = []
    t = start
    while t < end:
        rows.append((dma, t, overrides.get(t, base)))
        t += timedelta(minutes=15)
    return pl.DataFrame(
        rows,
        schema={"dma_id": pl.String, "ts": pl.Datetime("us", "UTC"), "flow_m3h": pl.Float64},
        orient="row",
    )


def dmas_frame(rows: list[tuple[str, str, int, int]]) -> pl.DataFrame:
    """(dma_id, timezone, unmetered_households, unmetered_non_households)."""
    return pl.DataFrame(
        [(d, tz, 10.0, 1000, 2.0, 40.0, hh, nh) for d, tz, hh, nh in rows],
        schema=DMAS,
        orient="row",
    )


def quarter_hours(start: datetime, n: int) -> dict[datetime, float]:
    return {start + timedelta(minutes=15 * i): 0.0 for i in range(n)}


def dip(start: datetime, n: int, value: float) -> dict[datetime, float]:
    return {t: value for t in quarter_hours(start, n)}


# ---------------------------------------------------------------- net inflow


def test_net_inflow_sums_inlets_minus_outlets_and_fills_short_gaps() -> None:
    ch = pl.DataFrame(
        [
            # inlet A: two samples in the first slot average to 10, then 10 flat
            ("D", "A", "inlet", utc(2026, 1, 15, 0, 0), 9.0),
            ("D", "A", "inlet", utc(2026, 1, 15, 0, 7), 11.0),
            *[
                ("D", "A", "inlet", utc(2026, 1, 15, 0, 0) + timedelta(minutes=15 * i), 10.0)
                for i in range(1, 6)
            ],
            # inlet B: 00:30 missing (one slot) -> interpolated between 6 and 10 = 8
            ("D", "B", "inlet", utc(2026, 1, 15, 0, 0), 4.0),
            ("D", "B", "inlet", utc(2026, 1, 15, 0, 15), 6.0),
            ("D", "B", "inlet", utc(2026, 1, 15, 0, 45), 10.0),
            ("D", "B", "inlet", utc(2026, 1, 15, 1, 0), 12.0),
            ("D", "B", "inlet", utc(2026, 1, 15, 1, 15), 14.0),
            # outlet C: 00:30 and 00:45 missing (30 min, the default limit) -> 3 and 4
            ("D", "C", "outlet", utc(2026, 1, 15, 0, 0), 1.0),
            ("D", "C", "outlet", utc(2026, 1, 15, 0, 15), 2.0),
            ("D", "C", "outlet", utc(2026, 1, 15, 1, 0), 5.0),
            ("D", "C", "outlet", utc(2026, 1, 15, 1, 15), 6.0),
            # rows with an unknown role or NaN are ignored
            ("D", "X", "bypass", utc(2026, 1, 15, 0, 0), 100.0),
            ("D", "A", "inlet", utc(2026, 1, 15, 0, 3), float("nan")),
        ],
        schema={
            "dma_id": pl.String,
            "channel_id": pl.String,
            "role": pl.String,
            "ts": pl.Datetime("us", "UTC"),
            "flow_m3h": pl.Float64,
        },
        orient="row",
    )
    net = net_inflow(ch)
    assert net.columns == ["dma_id", "ts", "flow_m3h"]
    got = dict(zip(net["ts"].to_list(), net["flow_m3h"].to_list(), strict=True))
    assert got == {
        utc(2026, 1, 15, 0, 0): pytest.approx(10 + 4 - 1),  # 13
        utc(2026, 1, 15, 0, 15): pytest.approx(10 + 6 - 2),  # 14
        utc(2026, 1, 15, 0, 30): pytest.approx(10 + 8 - 3),  # 15
        utc(2026, 1, 15, 0, 45): pytest.approx(10 + 10 - 4),  # 16
        utc(2026, 1, 15, 1, 0): pytest.approx(10 + 12 - 5),  # 17
        utc(2026, 1, 15, 1, 15): pytest.approx(10 + 14 - 6),  # 18
    }


def test_net_inflow_leaves_slots_missing_when_a_channel_has_a_long_gap() -> None:
    base = utc(2026, 1, 15, 0, 0)
    rows = [("D", "A", "inlet", base + timedelta(minutes=15 * i), 10.0) for i in range(5)]
    # outlet missing 00:15, 00:30, 00:45: 45 min > 30 min -> those slots have no net value
    rows += [("D", "C", "outlet", base, 1.0), ("D", "C", "outlet", base + timedelta(hours=1), 1.0)]
    ch = pl.DataFrame(
        rows,
        schema=["dma_id", "channel_id", "role", "ts", "flow_m3h"],
        orient="row",
    ).with_columns(pl.col("ts").dt.cast_time_unit("us"))
    net = net_inflow(ch, InflowParams(max_fill_gap=timedelta(minutes=30)))
    assert net["ts"].to_list() == [base, base + timedelta(hours=1)]
    assert net["flow_m3h"].to_list() == pytest.approx([9.0, 9.0])


def test_net_inflow_without_channel_id_sums_same_role_rows() -> None:
    t = utc(2026, 1, 15, 0, 0)
    ch = pl.DataFrame(
        {
            "dma_id": ["D", "D", "D"],
            "ts": [t, t, t],
            "flow_m3h": [7.0, 5.0, 2.0],
            "role": ["inlet", "inlet", "outlet"],
        }
    )
    net = net_inflow(ch)
    assert net["flow_m3h"].to_list() == pytest.approx([7 + 5 - 2])


# ---------------------------------------------------------------- MNF


def winter_london_flow() -> pl.DataFrame:
    """London in January is GMT (= UTC). Base 10 m³/h with:

    - 23:00–23:45 at 1.0 (before the night window: ignored),
    - 01:00 a single 0.0 (windows containing it average (10+10+10+0)/4 = 7.5 at best),
    - 02:00–02:45 at 4.0 (window 02:00–03:00 = 4.0: the MNF),
    - 05:00–05:45 at 1.0 (after the night window: ignored).
    """
    over = {utc(2026, 1, 15, 1, 0): 0.0}
    over |= dip(utc(2026, 1, 14, 23, 0), 4, 1.0)
    over |= dip(utc(2026, 1, 15, 2, 0), 4, 4.0)
    over |= dip(utc(2026, 1, 15, 5, 0), 4, 1.0)
    return flow_series("L", utc(2026, 1, 14, 22), utc(2026, 1, 15, 7), 10.0, over)


def test_mnf_value_and_hour_winter_night() -> None:
    dmas = dmas_frame([("L", "Europe/London", 0, 0)])
    mnf = minimum_night_flow(winter_london_flow(), dmas)
    assert mnf.height == 1
    row = mnf.row(0, named=True)
    assert row["night_date"] == date(2026, 1, 15)
    assert row["mnf_m3h"] == pytest.approx(4.0)
    assert row["mnf_start_ts"] == utc(2026, 1, 15, 2, 0)
    assert row["mnf_end_ts"] == utc(2026, 1, 15, 3, 0)
    assert row["mnf_local_start"] == time(2, 0)
    assert row["mnf_hour"] == 2
    # windows start at 00:00, 00:15, ..., 04:00 (the last that ends by 05:00): 17
    assert row["windows"] == 17


def test_mnf_window_needs_sample_coverage() -> None:
    """02:15 and 02:30 missing (and the 01:00 single zero put back to 10, to isolate the dip):
    windows starting 01:45 and 02:00 hold 2 of 4 samples (coverage 0.5 < 0.75).

    Remaining candidates: 01:30 → (10 + 10 + 4) / 3 = 8.0 (3 samples, coverage 0.75),
    02:45 → (4 + 10 + 10 + 10) / 4 = 8.5, 01:15 → (10 + 10 + 10 + 4) / 4 = 8.5.
    """
    flow = (
        winter_london_flow()
        .filter(~pl.col("ts").is_in([utc(2026, 1, 15, 2, 15), utc(2026, 1, 15, 2, 30)]))
        .with_columns(
            pl.when(pl.col("ts") == utc(2026, 1, 15, 1, 0))
            .then(10.0)
            .otherwise(pl.col("flow_m3h"))
            .alias("flow_m3h")
        )
    )
    dmas = dmas_frame([("L", "Europe/London", 0, 0)])
    row = minimum_night_flow(flow, dmas).row(0, named=True)
    assert row["mnf_m3h"] == pytest.approx(8.0)
    assert row["mnf_start_ts"] == utc(2026, 1, 15, 1, 30)
    assert row["mnf_hour"] == 1


def test_mnf_spring_forward_night_london() -> None:
    """2026-03-29: 01:00 GMT → 02:00 BST at 01:00 UTC. Night 00:00–05:00 local = 00:00–04:00 UTC.

    Dip 4.0 at 00:30–01:15 UTC (local 00:30, 00:45 GMT, 02:00, 02:15 BST): one real hour whose
    clock reads 00:30 → 02:30. A lower dip 1.0 at 04:00–04:45 UTC is 05:00–05:45 BST: outside.
    Valid windows start 00:00 … 03:00 UTC: 4 real hours → 4·4 − 3 = 13.
    """
    over = dip(utc(2026, 3, 29, 0, 30), 4, 4.0) | dip(utc(2026, 3, 29, 4, 0), 4, 1.0)
    flow = flow_series("L", utc(2026, 3, 28, 22), utc(2026, 3, 29, 6), 10.0, over)
    dmas = dmas_frame([("L", "Europe/London", 0, 0)])
    row = minimum_night_flow(flow, dmas).row(0, named=True)
    assert row["night_date"] == date(2026, 3, 29)
    assert row["mnf_m3h"] == pytest.approx(4.0)
    assert row["mnf_start_ts"] == utc(2026, 3, 29, 0, 30)
    assert row["mnf_end_ts"] == utc(2026, 3, 29, 1, 30)
    assert row["mnf_local_start"] == time(0, 30)
    assert row["mnf_hour"] == 0
    assert row["windows"] == 13


def test_mnf_fall_back_night_london() -> None:
    """2026-10-25: 02:00 BST → 01:00 GMT at 01:00 UTC. Night 00:00 BST (23:00 UTC on the 24th)
    to 05:00 GMT (05:00 UTC): 6 real hours → 6·4 − 3 = 21 windows.

    DMA A dips at 23:00 UTC on the 24th: local 00:00 of the 25th (a UTC-date night would file it
    under the 24th). B dips in the first 01:00 (00:00 UTC, BST), C in the repeated 01:00
    (01:00 UTC, GMT): both local hour 1, told apart by the UTC start.
    """
    start, end = utc(2026, 10, 24, 21), utc(2026, 10, 25, 7)
    flow = pl.concat(
        [
            flow_series("A", start, end, 10.0, dip(utc(2026, 10, 24, 23, 0), 4, 3.0)),
            flow_series("B", start, end, 10.0, dip(utc(2026, 10, 25, 0, 0), 4, 3.0)),
            flow_series("C", start, end, 10.0, dip(utc(2026, 10, 25, 1, 0), 4, 3.0)),
        ]
    )
    dmas = dmas_frame([(d, "Europe/London", 0, 0) for d in "ABC"])
    mnf = minimum_night_flow(flow, dmas)
    rows = {r["dma_id"]: r for r in mnf.iter_rows(named=True)}
    assert set(rows) == {"A", "B", "C"}
    assert all(r["night_date"] == date(2026, 10, 25) for r in rows.values())
    assert all(r["mnf_m3h"] == pytest.approx(3.0) for r in rows.values())
    assert all(r["windows"] == 21 for r in rows.values())
    assert (rows["A"]["mnf_start_ts"], rows["A"]["mnf_hour"]) == (utc(2026, 10, 24, 23), 0)
    assert (rows["B"]["mnf_start_ts"], rows["B"]["mnf_hour"]) == (utc(2026, 10, 25, 0), 1)
    assert (rows["C"]["mnf_start_ts"], rows["C"]["mnf_hour"]) == (utc(2026, 10, 25, 1), 1)


def test_mnf_asia_shanghai_night_is_local() -> None:
    """Asia/Shanghai is UTC+8 (no DST): night 2026-01-15 00:00–05:00 CST = 2026-01-14 16:00–21:00
    UTC. Dip 2.0 at 18:00–18:45 UTC = 02:00 local. A lower dip 0.5 at 2026-01-15 02:00 UTC is
    10:00 local (outside), though inside 00:00–05:00 *UTC*.
    """
    over = dip(utc(2026, 1, 14, 18, 0), 4, 2.0) | dip(utc(2026, 1, 15, 2, 0), 4, 0.5)
    flow = flow_series("S", utc(2026, 1, 14, 14), utc(2026, 1, 15, 6), 10.0, over)
    dmas = dmas_frame([("S", "Asia/Shanghai", 0, 0)])
    mnf = minimum_night_flow(flow, dmas)
    assert mnf.height == 1
    row = mnf.row(0, named=True)
    assert row["night_date"] == date(2026, 1, 15)
    assert row["mnf_m3h"] == pytest.approx(2.0)
    assert row["mnf_start_ts"] == utc(2026, 1, 14, 18, 0)
    assert row["mnf_hour"] == 2
    assert row["windows"] == 17


def test_mnf_night_window_spanning_midnight() -> None:
    """22:00–04:00 night: named by its morning. Dip 3.0 at 23:00–23:45 on the 14th → night of
    2026-01-15, local hour 23; 22:00 … 03:00 starts = 6·4 − 3 = 21 windows."""
    over = dip(utc(2026, 1, 14, 23, 0), 4, 3.0)
    flow = flow_series("L", utc(2026, 1, 14, 21), utc(2026, 1, 15, 5), 10.0, over)
    dmas = dmas_frame([("L", "Europe/London", 0, 0)])
    p = NightFlowParams(night_start=time(22, 0), night_end=time(4, 0))
    row = minimum_night_flow(flow, dmas, p).row(0, named=True)
    assert row["night_date"] == date(2026, 1, 15)
    assert row["mnf_hour"] == 23
    assert row["mnf_m3h"] == pytest.approx(3.0)
    assert row["windows"] == 21


def test_mnf_skips_dmas_without_valid_timezone() -> None:
    flow = winter_london_flow()
    dmas = dmas_frame([("L", "Mars/Olympus_Mons", 0, 0)])
    assert minimum_night_flow(flow, dmas).height == 0


# ---------------------------------------------------------------- LNU / NNF


def quarter_intervals(meter: str, values: dict[datetime, float], flags: dict[datetime, str]):
    return [(meter, t, v, 0, flags.get(t, "A"), None) for t, v in values.items()]


def meters_frame(rows: list[tuple[str, str, str | None, str, date]]) -> pl.DataFrame:
    """(meter_id, dma_id, account, customer_type, install_date)."""
    return pl.DataFrame(
        [(m, d, a, ct, 15, 2.5, 3.125, 5, inst, "gw") for m, d, a, ct, inst in rows],
        schema=METERS,
        orient="row",
    )


def lnu_fixture() -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """MNF window 02:00–03:00 UTC on 2026-01-15 (winter London, MNF 4.0).

    Intervals end at 01:30 … 03:15 every 15 min; those ending 02:15, 02:30, 02:45, 03:00 cover
    the window; the one ending 02:00 covers 01:45–02:00 (no overlap). Outside values are 0.5 so
    a wrong window would show.
    m1 household: 0.010 per in-window interval → 0.040
    m2 household: 0.005 per in-window interval → 0.020
    m3 non-household: 0.1 per interval, but the one ending 02:30 is estimated (E) → not reporting
    m4 household installed 2026-02-01 (after the night): not expected, its 1.0s are ignored
    m5 belongs to another DMA.
    """
    ends = [utc(2026, 1, 15, 1, 30) + timedelta(minutes=15 * i) for i in range(8)]
    inside = set(ends[3:7])  # 02:15, 02:30, 02:45, 03:00

    def vals(v_in: float, v_out: float = 0.5) -> dict[datetime, float]:
        return {t: (v_in if t in inside else v_out) for t in ends}

    rows = []
    rows += quarter_intervals("m1", vals(0.010), {})
    rows += quarter_intervals("m2", vals(0.005), {})
    rows += quarter_intervals("m3", vals(0.1), {utc(2026, 1, 15, 2, 30): "E"})
    rows += quarter_intervals("m4", vals(1.0), {})
    rows += quarter_intervals("m5", vals(1.0), {})
    intervals = pl.DataFrame(rows, schema=INTERVALS, orient="row")
    meters = meters_frame(
        [
            ("m1", "L", "a1", "household", date(2020, 1, 1)),
            ("m2", "L", "a2", "household", date(2020, 1, 1)),
            ("m3", "L", "a3", "non_household", date(2020, 1, 1)),
            ("m4", "L", "a4", "household", date(2026, 2, 1)),
            ("m5", "OTHER", "a5", "household", date(2020, 1, 1)),
        ]
    )
    dmas = dmas_frame([("L", "Europe/London", 100, 5), ("OTHER", "Europe/London", 0, 0)])
    mnf = minimum_night_flow(winter_london_flow(), dmas)
    return mnf, intervals, meters, dmas


def test_lnu_measured_plus_scaled_unreported_plus_unmetered_allowance() -> None:
    mnf, intervals, meters, dmas = lnu_fixture()
    out = legitimate_night_use(mnf, intervals, meters, dmas)
    row = out.filter(pl.col("dma_id") == "L").row(0, named=True)
    assert row["meters_expected"] == 3  # m1, m2, m3
    assert row["meters_reporting"] == 2  # m1, m2
    assert row["reporting_share"] == pytest.approx(2 / 3)
    # measured: 4 × 0.010 + 4 × 0.005 = 0.060 m³ in one hour = 0.060 m³/h
    assert row["lnu_measured_m3h"] == pytest.approx(0.060)
    # scale: 0.060 / (2/3) − 0.060 = 0.090 − 0.060 = 0.030
    assert row["lnu_unreported_m3h"] == pytest.approx(0.030)
    # unmetered: 100 × 1.7 L/h + 5 × 8 L/h = 170 + 40 = 210 L/h = 0.210 m³/h
    assert row["lnu_allowance_m3h"] == pytest.approx(0.210)
    assert row["lnu_m3h"] == pytest.approx(0.300)  # 0.060 + 0.030 + 0.210
    assert row["nnf_m3h"] == pytest.approx(3.700)  # 4.0 − 0.300


def test_lnu_allowance_for_silent_meters_and_estimated_intervals() -> None:
    mnf, intervals, meters, dmas = lnu_fixture()
    # silent m3 is non-household: 8 L/h = 0.008 m³/h
    # LNU = 0.060 + 0.008 + 0.210 = 0.278; NNF = 4.0 − 0.278 = 3.722
    out = legitimate_night_use(mnf, intervals, meters, dmas, NightUseParams(unreported="allowance"))
    row = out.row(0, named=True)
    assert row["lnu_unreported_m3h"] == pytest.approx(0.008)
    assert row["nnf_m3h"] == pytest.approx(3.722)
    # counting the estimate makes m3 report: 4 × 0.1 = 0.4 → measured 0.460, share 1,
    # LNU = 0.460 + 0 + 0.210 = 0.670
    out = legitimate_night_use(mnf, intervals, meters, dmas, NightUseParams(count_estimated=True))
    row = out.row(0, named=True)
    assert row["reporting_share"] == pytest.approx(1.0)
    assert row["lnu_measured_m3h"] == pytest.approx(0.460)
    assert row["lnu_m3h"] == pytest.approx(0.670)


def test_lnu_prorates_hourly_intervals_and_ignores_daily_reads() -> None:
    """Window 02:30–03:30. Hourly meter h1: interval (02:00, 03:00] = 0.2 m³ overlaps 30 min →
    0.1; (03:00, 04:00] = 0.4 overlaps 30 min → 0.2; measured 0.3 m³/h. Daily meter d1 (24 h
    intervals) cannot resolve the hour: not reporting. Share 1/2 ≥ 0.5 → scaled: 0.3 → LNU 0.6.
    """
    mnf = pl.DataFrame(
        {
            "dma_id": ["L"],
            "night_date": [date(2026, 1, 15)],
            "mnf_m3h": [5.0],
            "mnf_start_ts": [utc(2026, 1, 15, 2, 30)],
            "mnf_end_ts": [utc(2026, 1, 15, 3, 30)],
        }
    )
    rows = [
        ("h1", utc(2026, 1, 15, 2), 0.9, 0, "A", None),
        ("h1", utc(2026, 1, 15, 3), 0.2, 0, "A", None),
        ("h1", utc(2026, 1, 15, 4), 0.4, 0, "A", None),
        ("h1", utc(2026, 1, 15, 5), 0.9, 0, "A", None),
        ("d1", utc(2026, 1, 15, 0), 0.3, 0, "A", None),
        ("d1", utc(2026, 1, 16, 0), 0.3, 0, "A", None),
    ]
    intervals = pl.DataFrame(rows, schema=INTERVALS, orient="row")
    meters = meters_frame(
        [
            ("h1", "L", "a1", "household", date(2020, 1, 1)),
            ("d1", "L", "a2", "household", date(2020, 1, 1)),
        ]
    )
    dmas = dmas_frame([("L", "Europe/London", 0, 0)])
    row = legitimate_night_use(mnf, intervals, meters, dmas).row(0, named=True)
    assert row["lnu_measured_m3h"] == pytest.approx(0.3)
    assert row["meters_reporting"] == 1
    assert row["lnu_m3h"] == pytest.approx(0.6)
    assert row["nnf_m3h"] == pytest.approx(4.4)


# ---------------------------------------------------------------- dma_daily


def test_dma_daily_volumes_on_dst_days_and_losses() -> None:
    """No pressure, no meters: NDF defaults to the day's hours; LNU is the unmetered allowance.

    Spring 2026-03-29 (23 h): 23 × 10 = 230 m³, less 4 quarter-hours at 4 (−6 × 0.25 × 4 = −6)
    and 4 at 1 (−9 × 0.25 × 4 = −9) → 215 m³. MNF 4.0, LNU 0.21, NNF 3.79, NDF 23,
    loss 3.79 × 23 = 87.17 m³.
    Autumn 2026-10-25 (25 h): 25 × 10 = 250 m³ less 4 quarter-hours at 3 (−7) → 243 m³.
    MNF 3.0, NNF 2.79, NDF 25, loss 69.75 m³.
    """
    spring = flow_series(
        "L",
        utc(2026, 3, 28, 0),
        utc(2026, 3, 30, 0),
        10.0,
        dip(utc(2026, 3, 29, 0, 30), 4, 4.0) | dip(utc(2026, 3, 29, 4, 0), 4, 1.0),
    )
    autumn = flow_series(
        "L", utc(2026, 10, 24, 0), utc(2026, 10, 26, 0), 10.0, dip(utc(2026, 10, 24, 23), 4, 3.0)
    )
    dmas = dmas_frame([("L", "Europe/London", 100, 5)])
    daily = dma_daily(
        pl.concat([spring, autumn]),
        pl.DataFrame(schema=DMA_PRESSURE),
        pl.DataFrame(schema=INTERVALS),
        pl.DataFrame(schema=METERS),
        dmas,
    )
    rows = {r["local_date"]: r for r in daily.iter_rows(named=True)}
    s, a = rows[date(2026, 3, 29)], rows[date(2026, 10, 25)]
    assert s["day_hours"] == 23.0 and a["day_hours"] == 25.0
    assert s["inflow_m3"] == pytest.approx(215.0)
    assert a["inflow_m3"] == pytest.approx(243.0)
    assert s["inflow_coverage"] == pytest.approx(1.0)
    assert s["mnf_m3h"] == pytest.approx(4.0) and s["mnf_hour"] == 0
    assert s["lnu_allowance_m3h"] == pytest.approx(0.21)
    assert s["nnf_m3h"] == pytest.approx(3.79)
    assert s["ndf_h"] == pytest.approx(23.0) and s["ndf_source"] == "default"
    assert s["real_loss_m3"] == pytest.approx(87.17)
    assert a["real_loss_m3"] == pytest.approx(69.75)  # (3.0 − 0.21) × 25
    assert s["reporting_share"] is None  # no customer meters
    # 2026-03-28 (London, GMT) is complete: 24 × 10 = 240 m³
    assert rows[date(2026, 3, 28)]["inflow_m3"] == pytest.approx(240.0)
    # the series ends at 2026-10-26 00:00 UTC = 00:00 GMT: 2026-10-24 starts at 23:00 UTC on the
    # 23rd (BST) but data start at 00:00 UTC: 23 of 24 hours = 0.958 ≥ 0.9 → scaled to 240 m³
    d24 = rows[date(2026, 10, 24)]
    assert d24["inflow_coverage"] == pytest.approx(23 / 24)
    assert d24["inflow_m3"] == pytest.approx(240.0)
