"""Interval consumption from register reads: rollover, meter exchange, local time helpers."""

from __future__ import annotations

from datetime import UTC, date, datetime

import polars as pl
import pytest

from pipelines.consumption import (
    ConsumptionParams,
    interval_consumption,
    meter_timezones,
    with_local_midnight_utc,
    with_local_time,
)
from pipelines.schemas import INTERVALS, METER_EXCHANGES, METER_READS


def at(day: int, hour: int, minute: int = 0, second: int = 0) -> datetime:
    return datetime(2026, 1, day, hour, minute, second, tzinfo=UTC)


def reads(*rows: tuple[str, datetime, float]) -> pl.DataFrame:
    return pl.DataFrame([(m, ts, reg, 0) for m, ts, reg in rows], schema=METER_READS, orient="row")


def meters(**digits: int) -> pl.DataFrame:
    return pl.DataFrame(
        {"meter_id": list(digits), "register_digits": list(digits.values())},
        schema={"meter_id": pl.String, "register_digits": pl.Int32},
    )


def exchanges(*rows: tuple[str, datetime, float, float]) -> pl.DataFrame:
    return pl.DataFrame(list(rows), schema=METER_EXCHANGES, orient="row")


def test_volumes_are_differences_of_consecutive_reads():
    out = interval_consumption(
        reads(("m1", at(1, 0), 100.0), ("m1", at(1, 0, 15), 100.25), ("m1", at(1, 0, 30), 100.75))
    )
    # 100.25 − 100.00 = 0.25; 100.75 − 100.25 = 0.50. The first read only opens the series.
    assert out["volume"].to_list() == [0.25, 0.5]
    assert out["ts"].to_list() == [at(1, 0, 15), at(1, 0, 30)]
    assert out["prev_ts"].to_list() == [at(1, 0), at(1, 0, 15)]
    assert out["interval_s"].to_list() == [900.0, 900.0]
    assert out["flag"].to_list() == ["A", "A"]
    assert out["method"].to_list() == [None, None]
    for name, dtype in INTERVALS.items():
        assert out.schema[name] == dtype


def test_unsorted_input_and_duplicates_keep_first_read():
    out = interval_consumption(
        reads(
            ("m1", at(1, 0, 30), 10.5),
            ("m1", at(1, 0), 10.0),
            ("m1", at(1, 0, 15), 10.2),
            ("m1", at(1, 0, 15), 10.3),  # duplicate instant: the first (10.2) is kept
        )
    )
    # 10.2 − 10.0 = 0.2 and 10.5 − 10.2 = 0.3
    assert out["volume"].to_list() == pytest.approx([0.2, 0.3])


def test_rollover_of_a_five_and_a_four_digit_register():
    out = interval_consumption(
        reads(
            ("m5", at(1, 0), 99_999.5),
            ("m5", at(1, 0, 15), 0.7),
            ("m4", at(1, 0), 9_999.0),
            ("m4", at(1, 0, 15), 1.0),
        ),
        meters(m5=5, m4=4),
    ).sort("meter_id")
    # m4 wraps at 10^4: 1.0 + 10 000 − 9 999.0 = 2.0
    # m5 wraps at 10^5: 0.7 + 100 000 − 99 999.5 = 1.2
    assert out["meter_id"].to_list() == ["m4", "m5"]
    assert out["volume"].to_list() == pytest.approx([2.0, 1.2])
    assert out["rollover"].to_list() == [True, True]


def test_meter_without_digits_uses_the_default_register_size():
    out = interval_consumption(
        reads(("m1", at(1, 0), 999.9), ("m1", at(1, 0, 15), 0.4)),
        params=ConsumptionParams(default_register_digits=3),
    )
    # wraps at 10^3: 0.4 + 1000 − 999.9 = 0.5
    assert out["volume"].to_list() == pytest.approx([0.5])


def test_decrease_that_does_not_fit_a_wrap_stays_negative():
    out = interval_consumption(
        reads(("m1", at(1, 0), 50_000.0), ("m1", at(1, 0, 15), 100.0)), meters(m1=5)
    )
    # wrapped would be 100 + 100 000 − 50 000 = 50 100 m³ > 10 % of 100 000: not a rollover,
    # so the plain difference 100 − 50 000 = −49 900 is kept for VEE to flag.
    assert out["volume"].to_list() == [-49_900.0]
    assert out["rollover"].to_list() == [False]


def test_meter_exchange_counts_old_and_new_register_parts():
    r = reads(
        ("m1", at(1, 10), 1234.0),
        ("m1", at(1, 10, 15), 0.5),
        ("m1", at(1, 10, 30), 0.9),
    )
    ex = exchanges(("m1", at(1, 10, 5), 1234.4, 0.2))
    out = interval_consumption(r, meters(m1=5), ex)
    # (old_final − prev) + (read − new_start) = (1234.4 − 1234.0) + (0.5 − 0.2) = 0.4 + 0.3 = 0.7
    # then the new register alone: 0.9 − 0.5 = 0.4
    assert out["volume"].to_list() == pytest.approx([0.7, 0.4])
    assert out["exchange"].to_list() == [True, False]
    # Without the exchange record the same reads would be a huge negative volume.
    plain = interval_consumption(r, meters(m1=5))
    assert plain["volume"][0] == pytest.approx(0.5 - 1234.0)


def test_read_at_the_exchange_instant_belongs_to_the_new_meter():
    out = interval_consumption(
        reads(("m1", at(1, 10), 500.0), ("m1", at(1, 10, 15), 0.2), ("m1", at(1, 10, 30), 0.3)),
        meters(m1=5),
        exchanges(("m1", at(1, 10, 15), 500.6, 0.2)),
    )
    # (500.6 − 500.0) + (0.2 − 0.2) = 0.6; then 0.3 − 0.2 = 0.1
    assert out["volume"].to_list() == pytest.approx([0.6, 0.1])
    assert out["exchange"].to_list() == [True, False]


def test_exchange_of_a_meter_that_rolled_over_before_removal():
    out = interval_consumption(
        reads(("m1", at(1, 0), 99_999.0), ("m1", at(1, 1), 1.0)),
        meters(m1=5),
        exchanges(("m1", at(1, 0, 30), 3.0, 0.0)),
    )
    # old part 3.0 − 99 999.0 is a wrap: 3 + 100 000 − 99 999 = 4.0; new part 1.0 − 0.0 = 1.0
    assert out["volume"].to_list() == pytest.approx([5.0])
    assert out["rollover"].to_list() == [True]


def test_two_exchanges_between_two_reads():
    out = interval_consumption(
        reads(("m1", at(1, 0), 500.0), ("m1", at(2, 0), 4.0)),
        meters(m1=5),
        exchanges(("m1", at(1, 6), 510.0, 0.0), ("m1", at(1, 18), 20.0, 1.0)),
    )
    # first meter 510 − 500 = 10, second meter 20 − 0 = 20, third meter 4 − 1 = 3: total 33
    assert out["volume"].to_list() == pytest.approx([33.0])


def test_exchange_of_one_meter_leaves_others_alone():
    out = interval_consumption(
        reads(
            ("a", at(1, 0), 10.0),
            ("a", at(1, 1), 12.0),
            ("b", at(1, 0), 700.0),
            ("b", at(1, 1), 0.5),
        ),
        meters(a=5, b=5),
        exchanges(("b", at(1, 0, 30), 700.25, 0.0)),
    ).sort("meter_id")
    # a: 12 − 10 = 2; b: (700.25 − 700) + (0.5 − 0) = 0.75
    assert out["volume"].to_list() == pytest.approx([2.0, 0.75])
    assert out["exchange"].to_list() == [False, True]


def test_non_finite_registers_are_not_differenced():
    out = interval_consumption(
        reads(("m1", at(1, 0), 1.0), ("m1", at(1, 0, 15), float("nan")), ("m1", at(1, 0, 30), 1.5))
    )
    # the NaN read is skipped: one interval of 30 minutes, 1.5 − 1.0 = 0.5
    assert out["volume"].to_list() == [0.5]
    assert out["interval_s"].to_list() == [1800.0]


def test_local_midnights_around_london_dst():
    days = pl.DataFrame(
        {
            "d": [date(2026, 3, 29), date(2026, 3, 30), date(2026, 10, 25), date(2026, 10, 26)],
            "tz": ["Europe/London"] * 4,
        }
    )
    out = with_local_midnight_utc(days, "d", "tz", "utc")["utc"].to_list()
    # GMT (UTC+0) until 2026-03-29 01:00 UTC, then BST (UTC+1) until 2026-10-25 01:00 UTC.
    assert out == [
        datetime(2026, 3, 29, 0, tzinfo=UTC),
        datetime(2026, 3, 29, 23, tzinfo=UTC),  # 23-hour day 29 March
        datetime(2026, 10, 24, 23, tzinfo=UTC),
        datetime(2026, 10, 26, 0, tzinfo=UTC),  # 25-hour day 25 October
    ]


def test_local_time_of_utc_instants_in_two_zones():
    frame = pl.DataFrame(
        {
            "ts": [
                datetime(2026, 3, 29, 1, 30, tzinfo=UTC),
                datetime(2026, 3, 29, 1, 30, tzinfo=UTC),
            ],
            "tz": ["Europe/London", "Asia/Shanghai"],
        }
    )
    out = with_local_time(frame, "ts", "tz", "local")["local"].to_list()
    # 01:30 UTC is 02:30 BST (just after the change) and 09:30 in China (UTC+8)
    assert out == [datetime(2026, 3, 29, 2, 30), datetime(2026, 3, 29, 9, 30)]


def test_meter_timezone_prefers_own_column_then_dma_then_default():
    m = pl.DataFrame(
        {
            "meter_id": ["a", "b", "c"],
            "dma_id": ["d1", "d1", "d9"],
            "timezone": ["Asia/Shanghai", None, None],
        }
    )
    dmas = pl.DataFrame({"dma_id": ["d1"], "timezone": ["Europe/London"]})
    out = meter_timezones(m, dmas, default="UTC").sort("meter_id")
    assert out["timezone"].to_list() == ["Asia/Shanghai", "Europe/London", "UTC"]


def test_unknown_zone_is_an_error_not_a_silent_utc():
    frame = pl.DataFrame({"d": [date(2026, 1, 1)], "tz": ["Mars/Olympus"]})
    with pytest.raises(ValueError, match="Mars/Olympus"):
        with_local_midnight_utc(frame, "d", "tz", "utc")


def test_day_whose_midnight_does_not_exist_starts_at_the_jump():
    # Chile moves clocks from 00:00 to 01:00 on 6 September 2026 (UTC−4 → UTC−3): the day
    # begins at 01:00 local = 04:00 UTC, which is also 5 September 00:00 (UTC−4) + 24 h.
    frame = pl.DataFrame(
        {"d": [date(2026, 9, 5), date(2026, 9, 6)], "tz": ["America/Santiago"] * 2}
    )
    out = with_local_midnight_utc(frame, "d", "tz", "utc")["utc"].to_list()
    assert out == [datetime(2026, 9, 5, 4, tzinfo=UTC), datetime(2026, 9, 6, 4, tzinfo=UTC)]


def estate(seed: int, n_meters: int = 6, n_reads: int = 40) -> pl.DataFrame:
    """Reads of a few meters with duplicates, a NaN, a wrap and the rows shuffled."""
    import random

    rng = random.Random(seed)
    rows = []
    for m in range(n_meters):
        reg = 99_999.95 if m == 0 else 10.0 * m
        for k in range(n_reads):
            reg = (reg + rng.choice([0.0, 0.0, 0.01, 0.05, 0.3])) % 100_000.0
            rows.append((f"m{m}", at(1, 0) + k * (at(1, 0, 15) - at(1, 0)), reg))
    rows += [
        rows[5],
        (rows[9][0], rows[9][1], rows[9][2] + 1.0),
        (rows[50][0], at(3, 0), float("nan")),
    ]
    rng.shuffle(rows)
    return reads(*rows)


def test_cleaned_reads_give_the_same_intervals_as_raw_reads():
    from pipelines.consumption import clean_reads

    r = estate(1)
    m = meters(**{f"m{i}": 5 for i in range(6)})
    whole = interval_consumption(r, m)
    assert whole.height == 6 * 39  # one interval per read after the first, duplicates dropped
    assert whole["rollover"].sum() >= 1
    assert interval_consumption(clean_reads(r), m, cleaned=True).equals(whole)


def test_reads_in_many_chunks_give_the_same_intervals_as_one_chunk():
    from pipelines.consumption import clean_reads

    r = estate(2)
    chunked = pl.concat([r.slice(i, 7) for i in range(0, r.height, 7)], rechunk=False)
    assert chunked.n_chunks() > 1
    assert clean_reads(chunked).n_chunks() == 1
    assert interval_consumption(chunked, meters(m0=5)).equals(interval_consumption(r, meters(m0=5)))


def test_interval_volumes_are_the_consumption_columns_validation_reads():
    from pipelines.consumption import clean_reads, interval_volumes

    r = estate(3)
    m = meters(**{f"m{i}": 4 + i % 2 for i in range(6)})  # two register sizes: per-meter capacity
    cols = ["meter_id", "ts", "volume", "quality", "prev_ts", "interval_s"]
    clean = clean_reads(r)
    assert interval_volumes(clean, m).equals(interval_consumption(r, m).select(cols))
    ex = exchanges(("m2", at(1, 2, 5), 30.0, 0.0))
    assert interval_volumes(clean, m, ex).equals(interval_consumption(r, m, ex).select(cols))


def test_meter_slices_keep_meters_whole():
    from pipelines.consumption import clean_reads, meter_slices

    clean = clean_reads(estate(4))
    parts = meter_slices(clean, 50)
    assert len(parts) > 1
    assert pl.concat(parts).equals(clean)
    ids = [set(p["meter_id"].unique()) for p in parts]
    assert all(not (a & b) for i, a in enumerate(ids) for b in ids[i + 1 :])
    assert meter_slices(clean, clean.height) == [clean]
