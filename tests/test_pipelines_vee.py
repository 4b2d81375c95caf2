"""Validation rules, the validated interval series, and manual edits with their audit trail."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import polars as pl
import pytest

from pipelines.editing import EDITS, apply_edits
from pipelines.schemas import METER_READS, METERS
from pipelines.vee import (
    VeeParams,
    validate,
    validated_intervals,
    validated_reads,
)

T0 = datetime(2026, 1, 5, tzinfo=UTC)  # a Monday
AS_OF = datetime(2026, 2, 1, tzinfo=UTC)


def q(n: int) -> datetime:
    """The n-th quarter hour after T0."""
    return T0 + timedelta(minutes=15 * n)


def reads(*rows: tuple) -> pl.DataFrame:
    """Rows (meter, ts, register) or (meter, ts, register, quality)."""
    full = [(r[0], r[1], r[2], r[3] if len(r) > 3 else 0) for r in rows]
    return pl.DataFrame(full, schema=METER_READS, orient="row")


def series(meter: str, registers: list[float], start: int = 0) -> list[tuple]:
    return [(meter, q(start + i), reg) for i, reg in enumerate(registers)]


def meters(*rows: dict) -> pl.DataFrame:
    base = {
        "dma_id": "d1",
        "account": "ACC",
        "customer_type": "household",
        "dn": 15,
        "q3": 2.5,
        "q4": 3.125,
        "register_digits": 5,
        "install_date": date(2025, 1, 1),
        "gateway": "gw",
    }
    return pl.DataFrame([{**base, **r} for r in rows], schema=METERS)


def rules(failures: pl.DataFrame, rule: str) -> pl.DataFrame:
    return failures.filter(pl.col("rule") == rule).sort("meter_id", "ts")


def test_gap_counts_missing_intervals_and_open_gap_to_as_of():
    r = reads(("m1", q(0), 1.0), ("m1", q(1), 1.0), ("m1", q(4), 1.0))
    # as_of one hour after the last read
    f = validate(r, meters({"meter_id": "m1"}), as_of=q(8))
    gaps = rules(f, "GAP")
    # q(1) → q(4) is 45 minutes: reads at q(2) and q(3) are missing → 2 intervals.
    # q(4) → as_of q(8) is 60 minutes without reads: 3600 / 900 = 4 expected reads missing.
    assert gaps["ts"].to_list() == [q(4), q(8)]
    assert gaps["value"].to_list() == [2.0, 4.0]
    assert gaps["hard"].to_list() == [False, False]


def test_late_read_within_tolerance_is_not_a_gap():
    r = reads(("m1", q(0), 1.0), ("m1", q(1) + timedelta(seconds=30), 1.0))
    f = validate(r, meters({"meter_id": "m1"}), as_of=q(1) + timedelta(seconds=30))
    assert rules(f, "GAP").height == 0


def test_duplicates_are_hard_only_when_registers_disagree():
    r = reads(
        ("same", q(0), 1.0),
        ("same", q(0), 1.0),
        ("diff", q(0), 1.0),
        ("diff", q(0), 1.4),
        ("diff", q(1), 1.5),
    )
    f = validate(r, meters({"meter_id": "same"}, {"meter_id": "diff"}), as_of=AS_OF)
    dup = rules(f, "DUPLICATE_TS")
    assert dup["meter_id"].to_list() == ["diff", "same"]
    assert dup["value"].to_list() == [2.0, 2.0]
    assert dup["hard"].to_list() == [True, False]
    kept = validated_reads(r, f).sort("meter_id", "ts")
    # the identical pair collapses to one read, the conflicting instant is dropped entirely
    assert kept.select("meter_id", "ts").rows() == [("diff", q(1)), ("same", q(0))]


def test_future_reads_beyond_tolerance():
    now = q(10)
    r = reads(
        ("m1", q(9), 1.0),
        ("m1", now + timedelta(seconds=240), 1.1),  # 4 min ahead: inside the 300 s tolerance
        ("m1", now + timedelta(seconds=600), 1.2),  # 10 min ahead
    )
    f = validate(r, meters({"meter_id": "m1"}), as_of=now)
    fut = rules(f, "FUTURE_TS")
    assert fut["ts"].to_list() == [now + timedelta(seconds=600)]
    assert fut["value"].to_list() == [600.0]
    assert fut["hard"].to_list() == [True]


def test_before_install_uses_the_local_install_midnight():
    # Installed 2026-01-06 in Shanghai (UTC+8): local midnight is 2026-01-05 16:00 UTC.
    m = meters({"meter_id": "m1", "dma_id": "cn", "install_date": date(2026, 1, 6)})
    dmas = pl.DataFrame({"dma_id": ["cn"], "timezone": ["Asia/Shanghai"]})
    r = reads(
        ("m1", datetime(2026, 1, 5, 15, 45, tzinfo=UTC), 0.0),
        ("m1", datetime(2026, 1, 5, 16, 0, tzinfo=UTC), 0.0),
    )
    f = validate(r, m, as_of=AS_OF, dmas=dmas)
    early = rules(f, "BEFORE_INSTALL")
    assert early["ts"].to_list() == [datetime(2026, 1, 5, 15, 45, tzinfo=UTC)]
    assert early["value"].to_list() == [900.0]  # 15 minutes before install


def test_register_decrease_is_flagged_but_rollover_is_not():
    r = reads(*series("dec", [100.0, 99.5]), *series("wrap", [99_999.9, 0.1]))
    f = validate(r, meters({"meter_id": "dec"}, {"meter_id": "wrap"}), as_of=AS_OF)
    dec = rules(f, "REGISTER_DECREASE")
    # 99.5 − 100.0 = −0.5; the wrap is 0.1 + 100 000 − 99 999.9 = 0.2 m³ of consumption
    assert dec["meter_id"].to_list() == ["dec"]
    assert dec["value"].to_list() == [pytest.approx(-0.5)]


def test_over_q4_scales_with_interval_length_and_falls_back_to_q3():
    # Q4 = 3.125 m³/h: a 15-minute interval may hold 3.125 × 0.25 = 0.78125 m³.
    r = reads(
        *series("a", [0.0, 0.78, 1.58]),  # 0.78 ok, 0.80 too much
        ("b", q(0), 0.0),
        ("b", q(2), 1.5),  # 30 minutes: limit 1.5625, 1.5 ok
        *series("c", [0.0, 0.8]),  # no Q4, Q3 = 2.5 → Q4 = 1.25 × 2.5 = 3.125 → limit 0.78125
    )
    m = meters({"meter_id": "a"}, {"meter_id": "b"}, {"meter_id": "c", "q4": None})
    f = validate(r, m, as_of=AS_OF)
    over = rules(f, "OVER_Q4")
    assert over.select("meter_id", "ts").rows() == [("a", q(2)), ("c", q(1))]
    assert over["value"].to_list() == pytest.approx([0.8, 0.8])


def test_zero_consumption_for_seven_days_on_active_accounts_only():
    p = VeeParams(interval_s=6 * 3600)  # reads every 6 hours keep the frame small
    six_h = timedelta(hours=6)
    flat7 = [("full", T0 + six_h * i, 5.0) for i in range(29)]  # 28 intervals × 6 h = 7 days
    short = [("short", T0 + six_h * i, 5.0) for i in range(28)]  # 27 × 6 h = 6.75 days
    closed = [("closed", T0 + six_h * i, 5.0) for i in range(29)]  # no account
    m = meters({"meter_id": "full"}, {"meter_id": "short"}, {"meter_id": "closed", "account": None})
    f = validate(reads(*flat7, *short, *closed), m, as_of=T0 + six_h * 28, params=p)
    zero = rules(f, "ZERO_CONSUMPTION")
    assert zero["meter_id"].to_list() == ["full"]
    assert zero["ts"].to_list() == [T0 + six_h * 28]  # reported at the end of the run
    assert zero["value"].to_list() == [7.0]


def test_spike_against_trailing_percentile_and_absolute_floor():
    p = VeeParams(
        spike_window=timedelta(hours=2), spike_min_samples=4, spike_k=5.0, spike_floor_m3=0.05
    )

    def meter(steady: float, last: float) -> list[float]:
        regs = [0.0]
        for _ in range(8):
            regs.append(regs[-1] + steady)
        return [*regs, regs[-1] + last]

    # The interval ending q(9) is judged against the 2 h before it, [q(1), q(9)): eight intervals.
    # busy/calm: eight × 0.02 → P95 = 0.02 → threshold max(5 × 0.02, 0.05) = 0.10:
    #   0.2 is a spike, 0.09 is not.
    # idle/quiet: eight × 0.001 → 5 × 0.001 = 0.005 is below the floor 0.05:
    #   0.06 is a spike, 0.04 is not.
    r = reads(
        *series("busy", meter(0.02, 0.2)),
        *series("calm", meter(0.02, 0.09)),
        *series("idle", meter(0.001, 0.06)),
        *series("quiet", meter(0.001, 0.04)),
    )
    m = meters(*({"meter_id": x} for x in ("busy", "calm", "idle", "quiet")))
    f = validate(r, m, as_of=AS_OF, params=p)
    spikes = rules(f, "SPIKE")
    assert spikes.select("meter_id", "ts").rows() == [("busy", q(9)), ("idle", q(9))]
    assert spikes["value"].to_list() == pytest.approx([0.2, 0.06])
    assert spikes["hard"].to_list() == [False, False]


def test_status_bits_each_give_a_rule():
    r = reads(("m1", q(0), 1.0, 0), ("m1", q(1), 1.0, 1 | 4), ("m1", q(2), 1.0, 2 | 8))
    f = validate(r, meters({"meter_id": "m1"}), as_of=q(2))
    got = (
        f.filter(pl.col("rule").str.starts_with("STATUS_")).select("ts", "rule").sort("ts", "rule")
    )
    assert got.rows() == [
        (q(1), "STATUS_LEAK"),
        (q(1), "STATUS_TAMPER"),
        (q(2), "STATUS_LOW_BATTERY"),
        (q(2), "STATUS_REVERSE_FLOW"),
    ]


def test_corrupt_read_is_dropped_and_leaves_a_gap_between_good_reads():
    # 900.0 is a corrupt read between good ones
    r = reads(*series("m1", [100.0, 100.1, 900.0, 100.3, 100.4]))
    m = meters({"meter_id": "m1"})
    f = validate(r, m, as_of=AS_OF)
    hard = f.filter("hard").select("ts", "rule").sort("ts").rows()
    # 900.0 − 100.1 = 799.9 > 0.78125 (OVER_Q4 at q(2)); 100.3 − 900.0 < 0 (decrease at q(3))
    assert hard == [(q(2), "OVER_Q4"), (q(3), "REGISTER_DECREASE")]
    v = validated_intervals(r, m, None, f)
    # remaining reads q(0), q(1), q(4): 100.1 − 100.0 = 0.1; 100.4 − 100.1 = 0.3 over 45 minutes
    assert v["ts"].to_list() == [q(1), q(4)]
    assert v["volume"].to_list() == pytest.approx([0.1, 0.3])
    assert v["interval_s"].to_list() == [900.0, 2700.0]
    assert v["vee_status"].to_list() == ["VALID", "VALID"]


def test_reset_without_exchange_record_fails_and_is_not_estimable():
    r = reads(*series("m1", [100.0, 100.1, 5.0, 5.1]))
    m = meters({"meter_id": "m1"})
    f = validate(r, m, as_of=AS_OF)
    v = validated_intervals(r, m, None, f)
    # q(2) is dropped (decrease); 5.1 − 100.1 = −95.0 still decreases: FAILED with null volume
    assert v["ts"].to_list() == [q(1), q(3)]
    assert v["volume"].to_list() == [pytest.approx(0.1), None]
    assert v["vee_status"].to_list() == ["VALID", "FAILED"]
    assert v["vee_rules"].to_list() == [[], ["REGISTER_DECREASE"]]


def test_soft_failures_make_an_interval_suspect():
    r = reads(("m1", q(0), 1.0, 0), ("m1", q(1), 1.1, 8))
    m = meters({"meter_id": "m1"})
    f = validate(r, m, as_of=q(1))
    v = validated_intervals(r, m, None, f)
    assert v["vee_status"].to_list() == ["SUSPECT"]
    assert v["vee_rules"].to_list() == [["STATUS_LOW_BATTERY"]]
    assert v["volume"].to_list() == pytest.approx([0.1])


# --- editing ------------------------------------------------------------------------------------


def interval_frame() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "meter_id": ["m1", "m1", "m1"],
            "ts": [q(1), q(2), q(3)],
            "volume": [0.1, 0.2, None],
            "quality": [0, 64, 0],
            "flag": ["A", "E", "A"],
            "method": [None, "LINEAR", None],
        },
        schema_overrides={"quality": pl.Int16},
    )


def edits(*rows: tuple) -> pl.DataFrame:
    return pl.DataFrame(list(rows), schema=EDITS, orient="row")


def test_edit_sets_flag_m_keeps_original_and_audits_each_step():
    clerk1, clerk2 = datetime(2026, 2, 1, 9, tzinfo=UTC), datetime(2026, 2, 2, 9, tzinfo=UTC)
    res = apply_edits(
        interval_frame(),
        edits(
            ("m1", q(2), 0.5, "bob", clerk2, "customer dispute"),
            ("m1", q(2), 0.4, "ann", clerk1, "leak allowance"),
            ("m1", q(3), 0.05, "ann", clerk1, "register reset"),
        ),
    )
    out = res.intervals.sort("ts")
    assert out["volume"].to_list() == [0.1, 0.5, 0.05]  # the later edit of q(2) wins
    assert out["flag"].to_list() == ["A", "M", "M"]
    assert out["method"].to_list() == [None, None, None]
    assert out["original_volume"].to_list() == [None, 0.2, None]
    assert out["original_flag"].to_list() == [None, "E", "A"]
    assert out["original_method"].to_list() == [None, "LINEAR", None]
    assert out["quality"].to_list() == [0, 64 | 128, 128]
    audit = res.audit.sort("ts", "edited_at")
    # q(2): first 0.2 (E) → 0.4 by ann, then 0.4 (M) → 0.5 by bob; q(3): null → 0.05
    assert audit.select("ts", "user", "old_volume", "old_flag", "new_volume", "reason").rows() == [
        (q(2), "ann", 0.2, "E", 0.4, "leak allowance"),
        (q(2), "bob", 0.4, "M", 0.5, "customer dispute"),
        (q(3), "ann", None, "A", 0.05, "register reset"),
    ]
    assert res.rejected.height == 0


def test_bad_edits_are_rejected_with_a_reason():
    when = datetime(2026, 2, 1, tzinfo=UTC)
    res = apply_edits(
        interval_frame(),
        edits(
            ("m1", q(1), float("nan"), "ann", when, "x"),
            ("m1", q(1), 0.3, "", when, "x"),
            ("m1", q(9), 0.3, "ann", when, "x"),
        ),
    )
    assert sorted(res.rejected["reject_reason"].to_list()) == [
        "MISSING_FIELD",
        "NON_FINITE_VOLUME",
        "UNKNOWN_INTERVAL",
    ]
    assert res.audit.height == 0
    assert res.intervals["volume"].to_list() == [0.1, 0.2, None]


def test_re_editing_keeps_the_first_original_value():
    when = datetime(2026, 2, 1, tzinfo=UTC)
    first = apply_edits(interval_frame(), edits(("m1", q(1), 0.7, "ann", when, "a")))
    second = apply_edits(
        first.intervals, edits(("m1", q(1), 0.9, "bob", when + timedelta(days=1), "b"))
    )
    row = second.intervals.filter(pl.col("ts") == q(1))
    assert row["volume"].to_list() == [0.9]
    assert row["original_volume"].to_list() == [0.1]  # the actual value before any edit
    assert row["original_flag"].to_list() == ["A"]
    assert second.audit.select("old_volume", "old_flag").rows() == [(0.7, "M")]


# --- the same results however the work is split -----------------------------------------------


def random_estate(seed: int, n_meters: int = 5, n_reads: int = 300) -> pl.DataFrame:
    """Reads with duplicates (one disagreeing), a future read, a decrease, gaps of a few quarter
    hours and volumes from a small set of values, so that percentiles tie."""
    import random

    rng = random.Random(seed)
    rows: list[tuple] = []
    for m in range(n_meters):
        reg, k = 100.0 * m, 0
        for _ in range(n_reads):
            k += rng.choice([1, 1, 1, 1, 2, 3])
            reg += rng.choice([0.0, 0.0, 0.01, 0.02, 0.02, 0.04, 0.06, 0.3, 0.9])
            rows.append((f"m{m}", q(k), round(reg, 3), rng.choice([0, 0, 0, 0, 8])))
    rows += [
        rows[10],
        (*rows[20][:2], rows[20][2] + 0.5, 0),
        ("m1", AS_OF + timedelta(days=1), 1e4),
    ]
    rows[40] = (rows[40][0], rows[40][1], rows[40][2] - 0.5, 0)
    rng.shuffle(rows)
    return reads(*rows)


SPIKY = VeeParams(spike_window=timedelta(hours=6), spike_min_samples=8, spike_floor_m3=0.03)


def test_spikes_by_counting_match_the_rolling_quantile(monkeypatch):
    import pipelines.vee as vee

    r = random_estate(11)
    m = meters(*({"meter_id": f"m{i}"} for i in range(5)))
    rolling = vee._spikes_by_rolling_quantile
    calls: list[int] = []

    def spy(*args: object) -> pl.DataFrame:
        calls.append(1)
        return rolling(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(vee, "_spikes_by_rolling_quantile", spy)
    # However many intervals clear the floor, count per candidate...
    monkeypatch.setattr(vee, "_SPIKE_CANDIDATE_SHARE", 1.0)
    counted = rules(validate(r, m, as_of=AS_OF, params=SPIKY), "SPIKE")
    assert calls == []
    # ...or take the rolling quantile over every interval.
    monkeypatch.setattr(vee, "_SPIKE_CANDIDATE_SHARE", 0.0)
    rolled = rules(validate(r, m, as_of=AS_OF, params=SPIKY), "SPIKE")
    assert calls == [1]
    assert counted.height > 5
    assert counted.equals(rolled)


def test_clean_reads_handed_in_give_the_same_results():
    from pipelines.consumption import clean_reads

    r = random_estate(12)
    m = meters(*({"meter_id": f"m{i}"} for i in range(5)))
    f = validate(r, m, as_of=AS_OF, params=SPIKY)
    assert set(f["rule"]) >= {"DUPLICATE_TS", "FUTURE_TS", "REGISTER_DECREASE", "GAP", "SPIKE"}
    clean = clean_reads(r)
    assert validate(r, m, as_of=AS_OF, params=SPIKY, clean=clean).equals(f)
    assert validated_reads(None, f, clean=clean).equals(validated_reads(r, f))
    v = validated_intervals(r, m, None, f, SPIKY)
    assert validated_intervals(None, m, None, f, SPIKY, clean=clean).equals(v)
    assert set(v["vee_status"]) == {"VALID", "SUSPECT"}


def test_validation_in_slices_of_meters_matches_one_pass(monkeypatch):
    import pipelines.consumption as consumption

    r = random_estate(13)
    m = meters(*({"meter_id": f"m{i}"} for i in range(5)))
    f = validate(r, m, as_of=AS_OF, params=SPIKY)
    v = validated_intervals(r, m, None, f, SPIKY)
    monkeypatch.setattr(consumption, "SLICE_ROWS", 400)  # about one meter a slice
    assert validate(r, m, as_of=AS_OF, params=SPIKY).equals(f)
    assert validated_intervals(r, m, None, f, SPIKY).equals(v)


def test_validated_interval_slices_are_the_series_in_whole_meters(monkeypatch):
    import pipelines.consumption as consumption
    from pipelines.vee import validated_interval_slices

    r = random_estate(14)
    m = meters(*({"meter_id": f"m{i}"} for i in range(5)))
    f = validate(r, m, as_of=AS_OF, params=SPIKY)
    v = validated_intervals(r, m, None, f, SPIKY)
    monkeypatch.setattr(consumption, "SLICE_ROWS", 400)  # about one meter a slice
    parts = list(validated_interval_slices(r, m, None, f, SPIKY))
    assert len(parts) > 2
    assert pl.concat(parts).equals(v)
    owners = [set(part["meter_id"]) for part in parts]
    assert sum(len(o) for o in owners) == len(set().union(*owners))  # no meter split


def test_zero_runs_do_not_continue_into_the_next_meter():
    p = VeeParams(interval_s=6 * 3600)
    six_h = timedelta(hours=6)
    # "a" is flat for its last 4 days, "b" for its first 4: 8 days in a row, but two meters.
    a = [("a", T0 + six_h * i, 5.0 + (0.1 * i if i <= 12 else 1.2)) for i in range(29)]
    b = [("b", T0 + six_h * i, 7.0 + (0.1 * (i - 16) if i >= 16 else 0.0)) for i in range(29)]
    m = meters({"meter_id": "a"}, {"meter_id": "b"})
    f = validate(reads(*a, *b), m, as_of=T0 + six_h * 28, params=p)
    assert rules(f, "ZERO_CONSUMPTION").height == 0
    longer = VeeParams(interval_s=6 * 3600, zero_days=4.0)
    f4 = validate(reads(*a, *b), m, as_of=T0 + six_h * 28, params=longer)
    assert sorted(rules(f4, "ZERO_CONSUMPTION")["meter_id"]) == ["a", "b"]


def test_spike_percentile_rounds_a_half_rank_up_like_polars(monkeypatch):
    import pipelines.vee as vee

    # The last interval's window holds 11 intervals: q·(n−1) = 0.95 × 10 = 9.5, and the nearest
    # rank rounds up to 10, the largest value (0.5): 5 × 0.5 = 2.5 > 1.0, no spike. Rounding down
    # would take 0.1 (5 × 0.1 = 0.5 < 1.0) and call it one.
    volumes = [0.01 * i for i in range(1, 10)] + [0.1, 0.5, 1.0]
    regs = [0.0]
    for v in volumes:
        regs.append(regs[-1] + v)
    r = reads(*series("m1", regs))
    m = meters({"meter_id": "m1"})
    p = VeeParams(spike_window=timedelta(hours=3), spike_min_samples=11)
    for share in (1.0, 0.0):  # counting per candidate, then the rolling quantile
        monkeypatch.setattr(vee, "_SPIKE_CANDIDATE_SHARE", share)
        assert rules(validate(r, m, as_of=q(12), params=p), "SPIKE").height == 0
    # One litre less in the largest window value and it is a spike (5 × 0.19 < 1.0).
    regs2 = regs[:11] + [regs[10] + 0.19, regs[10] + 0.19 + 1.0]
    f = validate(reads(*series("m1", regs2)), m, as_of=q(12), params=p)
    assert rules(f, "SPIKE")["ts"].to_list() == [q(12)]
