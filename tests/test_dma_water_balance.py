"""IWA/AWWA water balance, UARL and ILI by hand; SIV and metered volumes over local periods."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import polars as pl
import pytest

from dma.water_balance import (
    WaterBalanceParams,
    metered_consumption,
    period_bounds,
    system_input_volume,
    water_balance,
)
from pipelines.schemas import DMAS, INTERVALS, METERS


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def dmas_frame(rows: list[tuple[str, str, float, int, float, float]]) -> pl.DataFrame:
    """(dma_id, timezone, mains_km, service_connections, private_pipe_km, avg_pressure_m)."""
    return pl.DataFrame(
        [(d, tz, lm, nc, lp, p, 0, 0) for d, tz, lm, nc, lp, p in rows], schema=DMAS, orient="row"
    )


def balance_inputs(**extra: list[object]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "dma_id": ["A"],
            "period": ["2026-04"],
            "period_days": [30.0],
            "siv_m3": [30_000.0],
            "billed_metered_m3": [19_300.0],
            **extra,
        }
    )


def test_water_balance_arithmetic_uarl_and_ili() -> None:
    """Lm = 10 km, Nc = 1000, Lp = 2 km, P = 40 m, 30 days.

    SIV 30 000; billed metered 19 300; billed unmetered 500; unbilled metered 300.
    unbilled unmetered  = 1.25 % × 30 000 = 375
    billed authorized   = 19 300 + 500 = 19 800
    unbilled authorized = 300 + 375 = 675
    authorized          = 19 800 + 675 = 20 475
    water losses        = 30 000 − 20 475 = 9 525
    unauthorized        = 0.25 % × 30 000 = 75
    meter inaccuracies  = (19 300 + 300) × 2 / 98 = 19 600 / 49 = 400
    data handling       = 0.25 % × 19 300 = 48.25
    apparent losses     = 75 + 400 + 48.25 = 523.25
    CARL                = 9 525 − 523.25 = 9 001.75
    NRW                 = 30 000 − 19 800 = 10 200;  NRW % = 10 200 / 30 000 = 34 %
    UARL                = (18·10 + 0.8·1000 + 25·2) · 40 = (180 + 800 + 50) · 40 = 41 200 L/day
                        = 41.2 m³/day × 30 = 1 236 m³
    ILI                 = 9 001.75 / 1 236 = 7.28297…
    CARL per connection = 9 001.75 m³ × 1000 / 1000 conn / 30 d = 300.058 L/conn/day
    """
    dmas = dmas_frame([("A", "Europe/London", 10.0, 1000, 2.0, 40.0)])
    inputs = balance_inputs(billed_unmetered_m3=[500.0], unbilled_metered_m3=[300.0])
    wb = water_balance(inputs, dmas)
    comp = {
        r["component"]: (r["value_m3"], r["source"]) for r in wb.components.iter_rows(named=True)
    }
    expected = {
        "system_input_volume": (30_000.0, "measured"),
        "billed_metered_consumption": (19_300.0, "measured"),
        "billed_unmetered_consumption": (500.0, "estimated"),
        "billed_authorized_consumption": (19_800.0, "estimated"),
        "unbilled_metered_consumption": (300.0, "measured"),
        "unbilled_unmetered_consumption": (375.0, "estimated"),
        "unbilled_authorized_consumption": (675.0, "estimated"),
        "authorized_consumption": (20_475.0, "estimated"),
        "water_losses": (9_525.0, "estimated"),
        # No per-DMA figure: the three apparent components are the defaults, and say so.
        "unauthorized_consumption": (75.0, "default"),
        "customer_metering_inaccuracies": (400.0, "default"),
        "systematic_data_handling_errors": (48.25, "default"),
        "apparent_losses": (523.25, "default"),
        "real_losses": (9_001.75, "default"),
        "revenue_water": (19_800.0, "estimated"),
        "non_revenue_water": (10_200.0, "estimated"),
    }
    assert set(comp) == set(expected)
    for name, (value, source) in expected.items():
        assert comp[name][0] == pytest.approx(value), name
        assert comp[name][1] == source, name
    assert wb.components["component"].to_list()[0] == "system_input_volume"

    s = wb.summary.row(0, named=True)
    assert s["siv_m3"] == pytest.approx(30_000.0)
    assert s["nrw_m3"] == pytest.approx(10_200.0)
    assert s["nrw_pct"] == pytest.approx(34.0)
    assert s["carl_m3"] == pytest.approx(9_001.75)
    assert s["uarl_l_per_day"] == pytest.approx(41_200.0)
    assert s["uarl_m3"] == pytest.approx(1_236.0)
    assert s["ili"] == pytest.approx(9_001.75 / 1_236.0)
    assert s["ili"] == pytest.approx(7.28297, abs=1e-5)
    assert s["carl_l_per_connection_day"] == pytest.approx(300.058, abs=1e-3)
    assert s["uarl_within_validity"] is False  # 1000 connections < 3000


def test_all_measured_inputs_make_nrw_measured_and_pressure_override() -> None:
    """No billed/unbilled unmetered columns: they are 0 and measured, so NRW = SIV − billed
    metered = 30 000 − 19 300 = 10 700 is measured; CARL rests on default apparent losses.

    Override P = 50 m and a larger DMA (Lm 100 km, Nc 5000, Lp 10 km):
    UARL = (1800 + 4000 + 250) · 50 = 302 500 L/day → × 30 d = 9 075 m³.
    unbilled unmetered 375, unauthorized 75, inaccuracies 19 300 × 2/98 = 393.877551…,
    data handling 48.25 → CARL = 30 000 − 19 300 − 375 − 75 − 393.877551 − 48.25 = 9 807.872449
    ILI = 9 807.872449 / 9 075 = 1.080757…; 5000 > 3000, 50 conn/km > 20, 50 m > 25 → valid.
    """
    dmas = dmas_frame([("A", "Europe/London", 100.0, 5000, 10.0, 40.0)])
    wb = water_balance(balance_inputs(avg_pressure_m=[50.0]), dmas)
    comp = {
        r["component"]: (r["value_m3"], r["source"]) for r in wb.components.iter_rows(named=True)
    }
    assert comp["non_revenue_water"] == (pytest.approx(10_700.0), "measured")
    assert comp["billed_unmetered_consumption"] == (0.0, "measured")
    assert comp["real_losses"][1] == "default"
    s = wb.summary.row(0, named=True)
    assert s["avg_pressure_m"] == 50.0
    assert s["uarl_m3"] == pytest.approx(9_075.0)
    assert s["carl_m3"] == pytest.approx(9_807.872449, abs=1e-6)
    assert s["ili"] == pytest.approx(1.080757, abs=1e-6)
    assert s["uarl_within_validity"] is True


def test_source_columns_and_parameters_are_honoured() -> None:
    """An estimated SIV makes NRW estimated; all estimate percentages at 0 make CARL equal the
    water losses: 30 000 − 19 300 = 10 700."""
    dmas = dmas_frame([("A", "Europe/London", 10.0, 1000, 2.0, 40.0)])
    zero = WaterBalanceParams(
        unbilled_unmetered_pct_of_siv=0.0,
        unauthorized_pct_of_siv=0.0,
        meter_under_registration_pct=0.0,
        data_handling_pct_of_billed_metered=0.0,
    )
    wb = water_balance(balance_inputs(siv_source=["estimated"]), dmas, zero)
    comp = {
        r["component"]: (r["value_m3"], r["source"]) for r in wb.components.iter_rows(named=True)
    }
    assert comp["system_input_volume"][1] == "estimated"
    assert comp["non_revenue_water"][1] == "estimated"
    assert comp["real_losses"][0] == pytest.approx(10_700.0)


def test_period_bounds_and_siv_over_a_dst_day() -> None:
    """Local day 2026-03-29 in London is 23 h: 00:00 GMT → 00:00 BST (23:00 UTC).
    Constant 10 m³/h → SIV = 230 m³, period_days = 23/24. Shanghai 2026-01-15 is
    2026-01-14 16:00 → 2026-01-15 16:00 UTC: 24 × 10 = 240 m³."""
    dmas = dmas_frame(
        [
            ("L", "Europe/London", 10.0, 1000, 2.0, 40.0),
            ("S", "Asia/Shanghai", 10.0, 1000, 2.0, 40.0),
        ]
    )
    periods = pl.DataFrame(
        {
            "dma_id": ["L", "S"],
            "period": ["d", "d"],
            "start_date": [date(2026, 3, 29), date(2026, 1, 15)],
            "end_date": [date(2026, 3, 30), date(2026, 1, 16)],
        }
    )
    b = {r["dma_id"]: r for r in period_bounds(periods, dmas).iter_rows(named=True)}
    assert (b["L"]["start_ts"], b["L"]["end_ts"]) == (utc(2026, 3, 29, 0), utc(2026, 3, 29, 23))
    assert (b["S"]["start_ts"], b["S"]["end_ts"]) == (utc(2026, 1, 14, 16), utc(2026, 1, 15, 16))

    def constant(dma: str, start: datetime, hours: int) -> list[tuple[str, datetime, float]]:
        return [(dma, start + timedelta(minutes=15 * i), 10.0) for i in range(hours * 4)]

    flow = pl.DataFrame(
        constant("L", utc(2026, 3, 28, 12), 48) + constant("S", utc(2026, 1, 14, 0), 48),
        schema={"dma_id": pl.String, "ts": pl.Datetime("us", "UTC"), "flow_m3h": pl.Float64},
        orient="row",
    )
    siv = {r["dma_id"]: r for r in system_input_volume(flow, periods, dmas).iter_rows(named=True)}
    assert siv["L"]["siv_m3"] == pytest.approx(230.0)
    assert siv["L"]["period_days"] == pytest.approx(23 / 24)
    assert siv["L"]["siv_source"] == "measured"
    assert siv["S"]["siv_m3"] == pytest.approx(240.0)
    # Half the day missing: coverage 0.5 < 0.9 → SIV null.
    sparse = flow.filter(pl.col("ts").dt.minute() < 30)
    siv = {r["dma_id"]: r for r in system_input_volume(sparse, periods, dmas).iter_rows(named=True)}
    assert siv["L"]["siv_m3"] is None
    assert siv["L"]["siv_coverage"] == pytest.approx(0.5)


def test_metered_consumption_splits_billed_and_unbilled_by_local_period() -> None:
    """Shanghai local midnight 2026-01-16 = 2026-01-15 16:00 UTC.
    billed meter b: 1.0 ending 16:00 UTC (→ day 15), 2.0 ending 16:15 (→ day 16),
                    4.0 ending 2026-01-15 02:00 UTC (10:00 local → day 15)
    unbilled meter u (no account): 0.5 ending 12:00 UTC on the 15th (→ day 15)
    day 15: billed 1.0 + 4.0 = 5.0, unbilled 0.5; day 16: billed 2.0, unbilled 0.
    """
    dmas = dmas_frame([("S", "Asia/Shanghai", 10.0, 1000, 2.0, 40.0)])
    periods = pl.DataFrame(
        {
            "period": ["d15", "d16"],
            "start_date": [date(2026, 1, 15), date(2026, 1, 16)],
            "end_date": [date(2026, 1, 16), date(2026, 1, 17)],
        }
    )
    meters = pl.DataFrame(
        [
            ("b", "S", "acc-1", "household", 15, 2.5, 3.125, 5, date(2020, 1, 1), "gw"),
            ("u", "S", None, "non_household", 15, 2.5, 3.125, 5, date(2020, 1, 1), "gw"),
        ],
        schema=METERS,
        orient="row",
    )
    intervals = pl.DataFrame(
        [
            ("b", utc(2026, 1, 15, 16, 0), 1.0, 0, "A", None),
            ("b", utc(2026, 1, 15, 16, 15), 2.0, 0, "A", None),
            ("b", utc(2026, 1, 15, 2, 0), 4.0, 0, "A", None),
            ("u", utc(2026, 1, 15, 12, 0), 0.5, 0, "A", None),
        ],
        schema=INTERVALS,
        orient="row",
    )
    out = {
        r["period"]: r
        for r in metered_consumption(intervals, meters, periods, dmas).iter_rows(named=True)
    }
    assert out["d15"]["billed_metered_m3"] == pytest.approx(5.0)
    assert out["d15"]["unbilled_metered_m3"] == pytest.approx(0.5)
    assert out["d16"]["billed_metered_m3"] == pytest.approx(2.0)
    assert out["d16"]["unbilled_metered_m3"] == pytest.approx(0.0)


def test_defaults_that_push_real_losses_below_zero_are_data_inconsistent() -> None:
    """A leak-free DMA: SIV 20 000, billed metered 19 500 → water losses 20 000 − 19 500 − 250
    (unbilled unmetered 1.25 %) = 250. Default apparent losses: unauthorized 50, inaccuracies
    19 500 × 2/98 = 397.959…, data handling 48.75 → 496.709…, CARL = −246.709… < 0:
    DATA_INCONSISTENT, no ILI, range −246.709 .. 250 (defaults at zero).

    The same DMA with its own measured under-registration of 0.5 % (estimated source) and a
    measured unauthorized volume of 10 m³: 19 500 × 0.5/99.5 = 97.98995; apparent
    10 + 97.98995 + 48.75 (default) = 156.73995, CARL 93.26005 ≥ 0: VALID, range up to
    250 − 10 − 97.98995 = 142.01005.
    """
    dmas = dmas_frame([("A", "Europe/London", 10.0, 1000, 2.0, 40.0)])
    inputs = balance_inputs(siv_m3=[20_000.0], billed_metered_m3=[19_500.0])
    s = water_balance(inputs, dmas).summary.row(0, named=True)
    assert s["validity"] == "DATA_INCONSISTENT"
    assert s["carl_m3"] == pytest.approx(250.0 - 50.0 - 19_500 * 2 / 98 - 48.75)
    assert s["carl_low_m3"] == pytest.approx(s["carl_m3"])
    assert s["carl_high_m3"] == pytest.approx(250.0)
    assert s["ili"] is None

    own = dmas.with_columns(meter_under_registration_pct=pl.lit(0.5))
    given = inputs.with_columns(
        unauthorized_m3=pl.lit(10.0), unauthorized_source=pl.lit("measured")
    )
    wb = water_balance(given, own)
    s = wb.summary.row(0, named=True)
    comp = {
        r["component"]: (r["value_m3"], r["source"]) for r in wb.components.iter_rows(named=True)
    }
    assert comp["unauthorized_consumption"] == (10.0, "measured")
    assert comp["customer_metering_inaccuracies"] == (
        pytest.approx(19_500 * 0.5 / 99.5),
        "estimated",
    )
    assert comp["systematic_data_handling_errors"] == (pytest.approx(48.75), "default")
    assert s["validity"] == "VALID"
    assert s["carl_m3"] == pytest.approx(250.0 - 10.0 - 19_500 * 0.5 / 99.5 - 48.75)
    assert s["carl_high_m3"] == pytest.approx(250.0 - 10.0 - 19_500 * 0.5 / 99.5)
    assert s["ili"] is not None and s["ili"] > 0
