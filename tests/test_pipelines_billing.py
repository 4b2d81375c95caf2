"""Billing determinants in local time, tiered charges with tariff changes, determinant versions."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta

import polars as pl
import pytest

from pipelines.billing import (
    BillingParams,
    billing_determinants,
    charge_preview,
    determinant_versions,
)
from pipelines.consumption import interval_consumption
from pipelines.editing import EDITS, apply_edits
from pipelines.estimation import estimate
from pipelines.schemas import ALERTS, METER_EXCHANGES, METER_READS, METERS
from pipelines.tariff import TariffVersion, TieredTariff, split_periods, tier_lines
from pipelines.vee import validate, validated_intervals, validated_reads

Q = timedelta(minutes=15)


def utc(*a: int) -> datetime:
    return datetime(*a, tzinfo=UTC)


def build_reads(
    meter: str,
    start: datetime,
    end: datetime,
    step: timedelta,
    use: Callable[[datetime], float],
    drop: Callable[[datetime], bool] = lambda ts: False,
    register0: float = 1000.0,
) -> pl.DataFrame:
    rows, reg, ts = [], register0, start
    while ts <= end:
        if not drop(ts):
            rows.append((meter, ts, round(reg, 9), 0))
        reg += use(ts)
        ts += step
    return pl.DataFrame(rows, schema=METER_READS, orient="row")


def meter_frame(meter: str = "m1", dma: str = "uk", **extra: object) -> pl.DataFrame:
    row = {
        "meter_id": meter,
        "dma_id": dma,
        "account": "ACC1",
        "customer_type": "household",
        "dn": 15,
        "q3": 2.5,
        "q4": 3.125,
        "register_digits": 5,
        "install_date": date(2020, 1, 1),
        "gateway": "gw",
        **extra,
    }
    return pl.DataFrame([row], schema=METERS)


AS_OF = datetime(2027, 1, 1, tzinfo=UTC)
DMAS = pl.DataFrame({"dma_id": ["uk", "utc"], "timezone": ["Europe/London", "UTC"]})


def run(
    reads: pl.DataFrame,
    meters: pl.DataFrame,
    periods: pl.DataFrame,
    *,
    exchanges: pl.DataFrame | None = None,
    alerts: pl.DataFrame | None = None,
    as_of: datetime = AS_OF,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The whole chain: validate, estimate, then determinants. Returns (determinants, series)."""
    f = validate(reads, meters, exchanges, as_of=as_of, dmas=DMAS)
    series = estimate(validated_intervals(reads, meters, exchanges, f), meters, dmas=DMAS).intervals
    d = billing_determinants(
        periods,
        series,
        validated_reads(reads, f),
        meters,
        dmas=DMAS,
        exchanges=exchanges,
        failures=f,
        alerts=alerts,
    )
    return d, series


def days(*pairs: tuple[date, date]) -> pl.DataFrame:
    return pl.DataFrame(
        {"period_start": [a for a, _ in pairs], "period_end": [b for _, b in pairs]},
        schema={"period_start": pl.Date, "period_end": pl.Date},
    )


def test_london_dst_days_have_23_and_25_hours_of_volume():
    # 0.01 m³ every quarter hour, reads all the way through both DST nights.
    reads = pl.concat(
        [
            build_reads("m1", utc(2026, 3, 28), utc(2026, 3, 31), Q, lambda ts: 0.01),
            build_reads(
                "m1", utc(2026, 10, 24), utc(2026, 10, 27), Q, lambda ts: 0.01, register0=5000.0
            ),
        ]
    )
    d, _ = run(
        reads,
        meter_frame(),
        days((date(2026, 3, 29), date(2026, 3, 29)), (date(2026, 10, 25), date(2026, 10, 25))),
    )
    # 29 March: 00:00 GMT (00:00 UTC) → 00:00 BST next day (23:00 UTC) = 23 h = 92 × 0.01
    # 25 October: 00:00 BST (24th 23:00 UTC) → 00:00 GMT (26th 00:00 UTC) = 25 h = 100 × 0.01
    assert d["period_hours"].to_list() == [23.0, 25.0]
    assert d["start_utc"].to_list() == [utc(2026, 3, 29), utc(2026, 10, 24, 23)]
    assert d["end_utc"].to_list() == [utc(2026, 3, 29, 23), utc(2026, 10, 26)]
    assert d["volume_m3"].to_list() == pytest.approx([0.92, 1.00])
    # opening = 1000 + 96 quarter hours of the 28th × 0.01 = 1000.96, closing = + 0.92
    # October: 5000 + 23 h × 4 × 0.01 (24th 00:00 → 23:00 UTC) = 5000.92, closing + 1.00
    assert d["opening_register"].to_list() == pytest.approx([1000.96, 5000.92])
    assert d["closing_register"].to_list() == pytest.approx([1001.88, 5001.92])
    assert d["opening_read_type"].to_list() == ["ACTUAL", "ACTUAL"]
    assert d["closing_read_type"].to_list() == ["ACTUAL", "ACTUAL"]
    assert d["flags"].to_list() == [["A"], ["A"]]
    assert d["estimated_share"].to_list() == [0.0, 0.0]
    assert d["vee_status"].to_list() == ["VALID", "VALID"]
    assert d["hold"].to_list() == [False, False]
    assert d["period_days"].to_list() == [1, 1]


def test_missing_boundary_read_gives_an_estimated_opening_consistent_with_the_volume():
    # UTC meter; reads at 23:45, 00:00 and 00:15 around 1 April are missing (a 1 h gap, linear).
    gap = (utc(2026, 3, 31, 23, 30), utc(2026, 4, 1, 0, 30))
    reads = build_reads(
        "m1",
        utc(2026, 3, 31, 12),
        utc(2026, 4, 2, 1),
        Q,
        lambda ts: 0.01,
        drop=lambda ts: gap[0] < ts < gap[1],
    )
    d, _ = run(reads, meter_frame(dma="utc"), days((date(2026, 4, 1), date(2026, 4, 1))))
    row = d.row(0, named=True)
    # register at 23:30 = 1000 + 46 quarter hours × 0.01 = 1000.46; linear to 00:30 (+0.04):
    # at 00:00 → 1000.46 + 0.02 = 1000.48 (estimated); closing at 2 Apr 00:00 (actual) =
    # 1000 + 144 × 0.01 = 1001.44; volume 96 × 0.01 = 0.96, of which the two estimated
    # quarter hours after midnight hold 0.02 → share 0.02 / 0.96
    assert row["opening_register"] == pytest.approx(1000.48)
    assert row["opening_read_type"] == "ESTIMATED"
    assert row["closing_register"] == pytest.approx(1001.44)
    assert row["closing_read_type"] == "ACTUAL"
    assert row["volume_m3"] == pytest.approx(0.96)
    assert row["closing_register"] - row["opening_register"] == pytest.approx(row["volume_m3"])
    assert row["estimated_m3"] == pytest.approx(0.02)
    assert row["estimated_share"] == pytest.approx(0.02 / 0.96)
    assert row["flags"] == ["A", "E"]
    assert row["methods"] == ["LINEAR"]
    assert row["vee_rules"] == ["GAP"]
    assert row["vee_status"] == "VALID"  # a filled gap alone does not make the period suspect


def test_estimated_opening_register_wraps_like_the_meter():
    gap = (utc(2026, 3, 31, 23, 30), utc(2026, 4, 1, 0, 30))
    reads = pl.DataFrame(
        [
            ("m1", utc(2026, 3, 31, 23, 15), 99_999.98, 0),
            ("m1", gap[0], 99_999.99, 0),
            ("m1", gap[1], 0.07, 0),
            ("m1", utc(2026, 4, 2), 1.07, 0),
        ],
        schema=METER_READS,
        orient="row",
    )
    d, _ = run(reads, meter_frame(dma="utc"), days((date(2026, 4, 1), date(2026, 4, 1))))
    # gap volume 0.07 + 100 000 − 99 999.99 = 0.08 over 4 quarter hours, 0.02 each:
    # register at 00:00 = 99 999.99 + 0.04 = 100 000.03 → shows 0.03 on a 5-digit register
    assert d["opening_register"][0] == pytest.approx(0.03, abs=1e-6)
    assert d["opening_read_type"][0] == "ESTIMATED"


def test_no_closing_read_leaves_the_period_incomplete_and_held():
    reads = build_reads("m1", utc(2026, 4, 1), utc(2026, 4, 1, 12), Q, lambda ts: 0.01)
    d, _ = run(reads, meter_frame(dma="utc"), days((date(2026, 4, 1), date(2026, 4, 1))))
    row = d.row(0, named=True)
    assert row["opening_read_type"] == "ACTUAL"
    assert row["opening_register"] == pytest.approx(1000.0)
    assert row["closing_read_type"] == "MISSING"
    assert row["closing_register"] is None
    assert row["volume_m3"] is None
    assert row["vee_status"] == "INCOMPLETE"
    assert row["hold"] is True


def test_period_before_the_first_read_is_missing_not_extrapolated():
    reads = build_reads("m1", utc(2026, 4, 1, 6), utc(2026, 4, 3), Q, lambda ts: 0.01)
    d, _ = run(reads, meter_frame(dma="utc"), days((date(2026, 4, 1), date(2026, 4, 1))))
    assert d["opening_read_type"].to_list() == ["MISSING"]
    assert d["volume_m3"].to_list() == [None]


def test_open_hold_alerts_hold_the_bill():
    reads = build_reads("m1", utc(2026, 4, 1), utc(2026, 4, 2), Q, lambda ts: 0.01)
    alerts = pl.DataFrame(
        [
            ("LEAK_CONTINUOUS", "m1", utc(2026, 3, 20), None, "open", "high", "{}"),
            ("BURST", "m1", utc(2026, 4, 1, 3), utc(2026, 4, 1, 5), "closed", "high", "{}"),
            ("LOW_BATTERY", "m1", utc(2026, 3, 1), None, "open", "low", "{}"),  # not a hold code
            ("TAMPER", "m1", utc(2026, 4, 5), None, "open", "high", "{}"),  # after the period
            ("TAMPER", "other", utc(2026, 4, 1), None, "open", "high", "{}"),  # other meter
        ],
        schema=ALERTS,
        orient="row",
    )
    period = days((date(2026, 4, 1), date(2026, 4, 1)))
    d, _ = run(reads, meter_frame(dma="utc"), period, alerts=alerts)
    assert d["hold_codes"].to_list() == [["LEAK_CONTINUOUS"]]
    assert d["hold"].to_list() == [True]
    assert d["volume_m3"].to_list() == pytest.approx([0.96])


def test_hold_codes_are_a_parameter():
    reads = build_reads("m1", utc(2026, 4, 1), utc(2026, 4, 2), Q, lambda ts: 0.01)
    alerts = pl.DataFrame(
        [("LOW_BATTERY", "m1", utc(2026, 3, 1), None, "open", "low", "{}")],
        schema=ALERTS,
        orient="row",
    )
    f = validate(reads, meter_frame(dma="utc"), as_of=utc(2027, 1, 1))
    series = interval_consumption(reads)
    d = billing_determinants(
        days((date(2026, 4, 1), date(2026, 4, 1))),
        series,
        reads,
        meter_frame(dma="utc"),
        dmas=DMAS,
        failures=f,
        alerts=alerts,
        params=BillingParams(hold_codes=frozenset({"LOW_BATTERY"})),
    )
    assert d["hold_codes"].to_list() == [["LOW_BATTERY"]]


def test_meter_exchange_inside_the_period():
    # old meter reads up to 12:00 (register 1000 + 48 × 0.01 = 1000.48), exchange at 12:05 with
    # old final 1000.50 and new start 0.10, new meter reads 0.15 at 12:15 then +0.01 per slot.
    old = build_reads("m1", utc(2026, 4, 1), utc(2026, 4, 1, 12), Q, lambda ts: 0.01)
    new = build_reads(
        "m1", utc(2026, 4, 1, 12, 15), utc(2026, 4, 2), Q, lambda ts: 0.01, register0=0.15
    )
    ex = pl.DataFrame(
        [("m1", utc(2026, 4, 1, 12, 5), 1000.50, 0.10)], schema=METER_EXCHANGES, orient="row"
    )
    d, _ = run(
        pl.concat([old, new]),
        meter_frame(dma="utc"),
        days((date(2026, 4, 1), date(2026, 4, 1))),
        exchanges=ex,
    )
    row = d.row(0, named=True)
    # before: 48 × 0.01 = 0.48; across the swap (1000.50 − 1000.48) + (0.15 − 0.10) = 0.07;
    # after: 12:15 → 24:00 is 47 quarter hours × 0.01 = 0.47. Total 0.48 + 0.07 + 0.47 = 1.02
    assert row["volume_m3"] == pytest.approx(1.02)
    assert row["opening_register"] == pytest.approx(1000.0)
    assert row["closing_register"] == pytest.approx(0.62)  # 0.15 + 0.47, the new register
    assert row["exchanges"] == 1


def test_edited_intervals_are_counted_and_flagged():
    reads = build_reads("m1", utc(2026, 4, 1), utc(2026, 4, 2), Q, lambda ts: 0.01)
    series = interval_consumption(reads)
    edits = pl.DataFrame(
        [("m1", utc(2026, 4, 1, 12), 0.5, "ann", utc(2026, 4, 3), "meter test")],
        schema=EDITS,
        orient="row",
    )
    edited = apply_edits(series, edits).intervals
    d = billing_determinants(
        days((date(2026, 4, 1), date(2026, 4, 1))), edited, reads, meter_frame(dma="utc"), dmas=DMAS
    )
    # 95 actual quarter hours × 0.01 + one edited 0.5 = 0.95 + 0.5 = 1.45
    assert d["volume_m3"].to_list() == pytest.approx([1.45])
    assert d["edited_m3"].to_list() == pytest.approx([0.5])
    assert d["flags"].to_list() == [["A", "M"]]


# --- tariffs ------------------------------------------------------------------------------------

OLD = TariffVersion(date(2000, 1, 1), (180.0, 260.0), (3.00, 4.50, 9.00), code="2000")
NEW = TariffVersion(date(2026, 3, 16), (180.0, 260.0), (4.00, 6.00, 12.00), code="2026")


def test_monthly_bill_pro_rates_annual_tiers():
    seg = pl.DataFrame(
        {
            "period_start": [date(2026, 4, 1)],
            "period_end": [date(2026, 4, 30)],
            "volume_m3": [20.0],
        }
    )
    lines = tier_lines(split_periods(seg, TieredTariff(versions=(OLD,))), TieredTariff((OLD,)))
    t1, t2 = 180 * 30 / 365, 260 * 30 / 365  # 14.7945… and 21.3699… m³ for a 30-day April
    assert lines["tier_from_m3"].to_list() == pytest.approx([0.0, t1, t2])
    assert lines["tier_to_m3"].to_list()[:2] == pytest.approx([t1, t2])
    assert lines["tier_to_m3"].to_list()[2] is None
    # 20 m³: 14.7945 in tier 1, 20 − 14.7945 = 5.2055 in tier 2, nothing in tier 3
    assert lines["tier_volume_m3"].to_list() == pytest.approx([t1, 20.0 - t1, 0.0])
    assert lines["amount"].to_list() == pytest.approx(
        [round(t1 * 3.00, 2), round((20.0 - t1) * 4.50, 2), 0.0]
    )


def test_period_crossing_a_tariff_change_is_split_by_measured_consumption():
    # UTC meter, reads every 6 hours: 0.125 m³ per 6 h (0.5 m³/day) until 16 March,
    # 0.25 m³ per 6 h (1.0 m³/day) from 16 March.
    reads = build_reads(
        "m1",
        utc(2026, 2, 28),
        utc(2026, 4, 2),
        timedelta(hours=6),
        lambda ts: 0.125 if ts < utc(2026, 3, 16) else 0.25,
    )
    meters = meter_frame(dma="utc")
    series = interval_consumption(reads)
    d = billing_determinants(
        days((date(2026, 3, 1), date(2026, 3, 31))), series, reads, meters, dmas=DMAS
    )
    # 15 days × 0.5 + 16 days × 1.0 = 7.5 + 16 = 23.5 m³
    assert d["volume_m3"].to_list() == pytest.approx([23.5])
    tariff = TieredTariff(versions=(NEW, OLD))
    lines = charge_preview(d, series, tariff)
    assert lines["segment_start"].unique(maintain_order=True).to_list() == [
        date(2026, 3, 1),
        date(2026, 3, 16),
    ]
    assert lines["segment_days"].unique(maintain_order=True).to_list() == [15, 16]
    assert lines["tariff_code"].unique(maintain_order=True).to_list() == ["2000", "2026"]
    # first 15 days under the old prices: limits 180·15/365 = 7.3973, 260·15/365 = 10.6849;
    # 7.5 m³ → tier1 7.3973, tier2 0.1027, tier3 0
    a1 = 180 * 15 / 365  # 7.5 stays below a2 = 260 * 15 / 365
    # last 16 days under the new prices: limits 180·16/365 = 7.8904, 260·16/365 = 11.3973;
    # 16 m³ → tier1 7.8904, tier2 3.5068, tier3 4.6027
    b1, b2 = 180 * 16 / 365, 260 * 16 / 365
    assert lines["volume_m3"].to_list() == pytest.approx([7.5] * 3 + [16.0] * 3)
    assert lines["tier_volume_m3"].to_list() == pytest.approx(
        [a1, 7.5 - a1, 0.0, b1, b2 - b1, 16.0 - b2]
    )
    assert lines["price_per_m3"].to_list() == [3.0, 4.5, 9.0, 4.0, 6.0, 12.0]
    expected = [
        round(a1 * 3.0, 2),
        round((7.5 - a1) * 4.5, 2),
        0.0,
        round(b1 * 4.0, 2),
        round((b2 - b1) * 6.0, 2),
        round((16.0 - b2) * 12.0, 2),
    ]
    assert lines["amount"].to_list() == pytest.approx(expected)
    assert lines.filter(pl.col("tier") == 1)["volume_m3"].sum() == pytest.approx(23.5)


def test_period_before_any_tariff_has_no_charge_lines():
    seg = pl.DataFrame(
        {
            "period_start": [date(2026, 3, 10)],
            "period_end": [date(2026, 3, 20)],
            "volume_m3": [5.0],
        }
    )
    t = TieredTariff(versions=(NEW,))
    segs = split_periods(seg, t)
    # 10..15 March precede the only version (16 March): a segment without tariff, 6 days
    assert segs.select("segment_start", "segment_end", "segment_days", "tariff_code").rows() == [
        (date(2026, 3, 10), date(2026, 3, 15), 6, None),
        (date(2026, 3, 16), date(2026, 3, 20), 5, "2026"),
    ]
    lines = tier_lines(segs.with_columns(volume_m3=pl.lit(2.0)), t)
    assert lines["segment_start"].unique().to_list() == [date(2026, 3, 16)]


def test_tariff_rejects_inconsistent_tiers():
    with pytest.raises(ValueError):
        TariffVersion(date(2026, 1, 1), (180.0, 260.0), (3.0, 4.5))
    with pytest.raises(ValueError):
        TariffVersion(date(2026, 1, 1), (260.0, 180.0), (3.0, 4.5, 9.0))
    with pytest.raises(ValueError):
        TieredTariff(versions=(OLD, OLD))


# --- versions -----------------------------------------------------------------------------------


def test_versions_only_when_numbers_change():
    gap = (utc(2026, 3, 31, 23, 30), utc(2026, 4, 1, 0, 30))
    full = build_reads("m1", utc(2026, 3, 31, 12), utc(2026, 4, 2, 1), Q, lambda ts: 0.01)
    early = full.filter(~((pl.col("ts") > gap[0]) & (pl.col("ts") < gap[1])))
    period = days((date(2026, 4, 1), date(2026, 4, 1)))
    meters = meter_frame(dma="utc")

    first, _ = run(early, meters, period)
    issued = determinant_versions(first, pl.DataFrame())
    assert issued.select("version", "replaces_version", "version_reason").rows() == [
        (1, None, "INITIAL")
    ]

    # recomputing the same data issues nothing
    again, _ = run(early, meters, period)
    assert determinant_versions(again, issued).height == 0

    # a new hold alert changes no number: still nothing to issue
    alerts = pl.DataFrame(
        [("TAMPER", "m1", utc(2026, 4, 1), None, "open", "high", "{}")], schema=ALERTS, orient="row"
    )
    held, _ = run(early, meters, period, alerts=alerts)
    assert held["hold"].to_list() == [True]
    assert determinant_versions(held, issued).height == 0

    # the late reads arrive: opening becomes ACTUAL with the same value 1000.48 (linear was right
    # for a steady 0.01 per quarter hour) and nothing is estimated any more
    late, _ = run(full, meters, period)
    v2 = determinant_versions(late, issued)
    assert v2.select("version", "replaces_version", "version_reason").rows() == [
        (2, 1, "LATE_READS")
    ]
    assert v2["changed_columns"].to_list() == [["estimated_m3", "opening_read_type"]]

    # a correction of the volume on top of version 2
    history = pl.concat([issued, v2], how="vertical_relaxed")
    corrected = late.with_columns(
        volume_m3=pl.col("volume_m3") + 0.5, closing_register=pl.col("closing_register") + 0.5
    )
    v3 = determinant_versions(corrected, history)
    assert v3.select("version", "replaces_version", "version_reason").rows() == [
        (3, 2, "CORRECTION")
    ]
    assert v3["changed_columns"].to_list() == [["closing_register", "volume_m3"]]

    # float noise below the tolerance is not a change
    noisy = late.with_columns(volume_m3=pl.col("volume_m3") + 1e-9)
    assert determinant_versions(noisy, history).height == 0


def test_boundary_inside_a_long_interval_is_pro_rated():
    # Series straight from consumption (no estimation): hourly-or-longer irregular intervals.
    reads = pl.DataFrame(
        [
            ("m1", utc(2026, 3, 31, 23), 1000.0, 0),
            ("m1", utc(2026, 4, 1, 1), 1000.8, 0),
            ("m1", utc(2026, 4, 1, 23, 30), 1002.0, 0),
            ("m1", utc(2026, 4, 2, 0, 30), 1002.4, 0),
        ],
        schema=METER_READS,
        orient="row",
    )
    d = billing_determinants(
        days((date(2026, 4, 1), date(2026, 4, 1))),
        interval_consumption(reads),
        reads,
        meter_frame(dma="utc"),
        dmas=DMAS,
    )
    row = d.row(0, named=True)
    # opening: midnight is half-way through 23:00 → 01:00 (0.8 m³): 1000.0 + 0.4 = 1000.4
    # closing: half-way through 23:30 → 00:30 (0.4 m³): 1002.0 + 0.2 = 1002.2
    # volume: 0.4 + (1002.0 − 1000.8 = 1.2) + 0.2 = 1.8
    assert row["opening_register"] == pytest.approx(1000.4)
    assert row["closing_register"] == pytest.approx(1002.2)
    assert (row["opening_read_type"], row["closing_read_type"]) == ("ESTIMATED", "ESTIMATED")
    assert row["volume_m3"] == pytest.approx(1.8)
    assert row["estimated_m3"] == pytest.approx(0.0)  # actual intervals, only split by the date


def test_failed_interval_makes_the_period_incomplete_until_edited():
    # a register reset at 12:00 without an exchange record: 1000.48 → 3.0
    reads = build_reads(
        "m1",
        utc(2026, 4, 1),
        utc(2026, 4, 2),
        Q,
        lambda ts: 0.01,
    ).with_columns(
        register=pl.when(pl.col("ts") >= utc(2026, 4, 1, 12))
        .then(pl.col("register") - 997.48)
        .otherwise(pl.col("register"))
    )
    meters = meter_frame(dma="utc")
    period = days((date(2026, 4, 1), date(2026, 4, 1)))
    d, series = run(reads, meters, period)
    assert d["vee_status"].to_list() == ["INCOMPLETE"]
    assert d["volume_m3"].to_list() == [None]
    assert d["hold"].to_list() == [True]
    assert d["vee_rules"].to_list() == [["REGISTER_DECREASE"]]
    # 12:00 is dropped, so 11:45 → 12:15 is the failed interval; a clerk sets it to 0.02
    failed = series.filter(pl.col("vee_status") == "FAILED")
    assert failed.select("prev_ts", "ts").rows() == [
        (utc(2026, 4, 1, 11, 45), utc(2026, 4, 1, 12, 15))
    ]
    edits = pl.DataFrame(
        [
            (
                "m1",
                utc(2026, 4, 1, 12, 15),
                0.02,
                "ann",
                utc(2026, 4, 3),
                "reset, no exchange record",
            )
        ],
        schema=EDITS,
        orient="row",
    )
    fixed = apply_edits(series, edits).intervals
    f = validate(reads, meters, as_of=AS_OF, dmas=DMAS)
    d2 = billing_determinants(
        period, fixed, validated_reads(reads, f), meters, dmas=DMAS, failures=f
    )
    # 94 actual quarter hours × 0.01 + the edited 0.02 = 0.96
    assert d2["volume_m3"].to_list() == pytest.approx([0.96])
    assert d2["edited_m3"].to_list() == pytest.approx([0.02])
    assert d2["vee_status"].to_list() == ["SUSPECT"]  # the decrease is still on record
    assert d2["flags"].to_list() == [["A", "M"]]


# --- the export file (flows.export) ------------------------------------------------------------


def _bill(conn: object, meter: str, opening: float, closing: float) -> None:
    conn.execute(  # type: ignore[attr-defined]
        "INSERT INTO billing_volumes (meter_id, period_start, period_end, version, "
        "opening_register, opening_read_type, closing_register, closing_read_type, volume, "
        "estimated_m3, vee_status, reason) VALUES (%s, '2026-10-01', '2026-10-31', 1, %s, "
        "'ACTUAL', %s, 'ACTUAL', %s, 0.0, 'VALID', 'INITIAL')",
        (meter, opening, closing, closing - opening),
    )


def test_export_volumes_are_exact_decimals_at_register_resolution(
    db_url: str, tmp_path: object
) -> None:
    """``closing − opening`` in doubles is 9.216999999999985; the file says 9.217 (1 L), or the
    meter's own resolution when its register channel declares one."""
    from decimal import Decimal
    from pathlib import Path

    import psycopg

    from flows.export import export_billing

    assert 1234.567 - 1225.35 == pytest.approx(9.217) and str(1234.567 - 1225.35) != "9.217"
    with psycopg.connect(db_url) as conn:
        _bill(conn, "AQN00001", 1225.35, 1234.567)
        _bill(conn, "AQN00002", 10.0, 20.0)
        _bill(conn, "AQN00003", 0.0, 1.23456)
        conn.execute(
            'UPDATE channels SET params = params || \'{"resolution": "0.01"}\' '
            "WHERE meter_id = 'AQN00003' AND kind = 'register'"
        )
    out = Path(str(tmp_path))
    csv = export_billing(db_url, "2026-10", "csv", out / "b.csv")
    assert csv.rows == 3
    lines = (out / "b.csv").read_text().splitlines()
    header = lines[0].split(",")
    col = header.index("volume")
    vols = {ln.split(",")[0]: ln.split(",")[col] for ln in lines[1:]}
    assert vols == {"AQN00001": "9.217", "AQN00002": "10.000", "AQN00003": "1.230"}
    opening = lines[1].split(",")[header.index("opening_register")]
    assert opening == "1225.350"
    export_billing(db_url, "2026-10", "parquet", out / "b.parquet")
    frame = pl.read_parquet(out / "b.parquet")
    assert frame.schema["volume"] == pl.Decimal(38, 3)
    assert frame.sort("meter_id")["volume"].to_list() == [
        Decimal("9.217"), Decimal("10.000"), Decimal("1.230"),
    ]  # fmt: skip


def test_export_of_a_period_never_computed_is_an_error_and_writes_nothing(
    db_url: str, tmp_path: object
) -> None:
    from pathlib import Path

    import psycopg

    from flows.export import PeriodNotComputedError, export_billing

    target = Path(str(tmp_path)) / "none.csv"
    with pytest.raises(PeriodNotComputedError, match=r"2026-11-01\.\.2026-11-30.*never computed"):
        export_billing(db_url, "2026-11", "csv", target)
    assert not target.exists()
    with psycopg.connect(db_url) as conn:
        _bill(conn, "AQN00001", 1.0, 2.0)
    with pytest.raises(PeriodNotComputedError, match=r"computed periods: 2026-10-01\.\.2026-10-31"):
        export_billing(db_url, "2026-11", "csv", target)
    # A computed period with nothing changed since a time is a real (empty) answer.
    r = export_billing(
        db_url, "2026-10", "csv", target, changed_since=datetime(2100, 1, 1, tzinfo=UTC)
    )
    assert r.rows == 0 and target.exists()


def test_holds_follow_the_meter_class_and_say_why():
    """A bulk meter's bill is not held by a customer-side leak (not a hold code of its class) but
    is by a tamper; a residential one is held by the leak, and the bill line says which alert
    since when."""
    reads = pl.concat(
        [build_reads(m, utc(2026, 4, 1), utc(2026, 4, 2), Q, lambda ts: 0.01) for m in ("m1", "m2")]
    )
    meters = pl.concat([meter_frame("m1", dma="utc"), meter_frame("m2", dma="utc")]).with_columns(
        meter_class=pl.Series(["residential", "bulk"])
    )
    alerts = pl.DataFrame(
        [
            ("LEAK_CONTINUOUS", "m1", utc(2026, 3, 30), None, "open", "warning", "{}"),
            ("LEAK_CONTINUOUS", "m2", utc(2026, 3, 30), None, "open", "warning", "{}"),
        ],
        schema=ALERTS,
        orient="row",
    )
    f = validate(reads, meters, as_of=utc(2027, 1, 1))
    d = billing_determinants(
        days((date(2026, 4, 1), date(2026, 4, 1))),
        interval_consumption(reads),
        reads,
        meters,
        dmas=DMAS,
        failures=f,
        alerts=alerts,
    ).sort("meter_id")
    assert d["hold"].to_list() == [True, False]
    assert d["hold_codes"].to_list() == [["LEAK_CONTINUOUS"], []]
    assert d["hold_reason"].to_list() == [
        "LEAK_CONTINUOUS open since 2026-03-30 00:00Z (holds residential bills)",
        None,
    ]
    tamper = alerts.with_columns(code=pl.lit("TAMPER"))
    d = billing_determinants(
        days((date(2026, 4, 1), date(2026, 4, 1))),
        interval_consumption(reads),
        reads,
        meters,
        dmas=DMAS,
        failures=f,
        alerts=tamper,
        params=BillingParams(class_hold_codes={"bulk": frozenset({"TAMPER"})}),
    ).sort("meter_id")
    assert d["hold"].to_list() == [True, True]
    assert d["hold_reason"][1] == "TAMPER open since 2026-03-30 00:00Z (holds bulk bills)"
