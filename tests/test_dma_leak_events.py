"""Leak events (``dma.leak_events``): steps, ramps, stacking, repairs, cold start, bad input; the
simulated DMA-years of ``simulators.dma_year`` scored over seeds; the flow's writes to a real
PostgreSQL (``leak_events``, migration 0010, and one alert per event).

Hand series: a base of 10.0 m³/h plus a repeating pattern (+0.1, −0.1, 0.0, +0.05, −0.05) by
night index mod 5, on weekday nights only (``weekdays``), so every night is in the weekday group
and the night index is the position in the series. Night-to-night differences of that pattern
have a MAD-sigma of about 0.1 m³/h, so a 1 m³/h step is ~10 σ.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

import numpy as np
import polars as pl
import psycopg
import pytest

from dma.leak_events import ALERT_CODE, LEAK_EVENTS, LeakEventParams, leak_event_alerts, leak_events
from pipelines.schemas import ALERTS
from simulators.dma_year import DmaYearParams, score_events, simulate_dma_year

PATTERN = [0.1, -0.1, 0.0, 0.05, -0.05]
FIRST = date(2026, 1, 5)  # a Monday


def weekdays(n: int) -> list[date]:
    """n consecutive weekday dates from FIRST (weekend nights have their own offset and σ)."""
    out: list[date] = []
    d = FIRST
    while len(out) < n:
        if d.weekday() < 5:
            out.append(d)
        d += timedelta(days=1)
    return out


def frame(values: Sequence[float | None], dma: str = "D1") -> pl.DataFrame:
    nights = weekdays(len(values))
    return pl.DataFrame(
        {
            "dma_id": [dma] * len(values),
            "night_date": nights,
            "nnf_m3h": list(values),
            "mnf_start_ts": [datetime(d.year, d.month, d.day, 2, tzinfo=UTC) for d in nights],
        },
        schema={
            "dma_id": pl.String,
            "night_date": pl.Date,
            "nnf_m3h": pl.Float64,
            "mnf_start_ts": pl.Datetime("us", "UTC"),
        },
    )


def series(
    n: int, *changes: tuple[int, float], ramp: tuple[int, int, float] | None = None
) -> list[float]:
    """Base + pattern, plus steps (from night, size) and an optional ramp (from, nights, size)."""
    out = []
    for i in range(n):
        v = 10.0 + PATTERN[i % 5] + sum(s for at, s in changes if i >= at)
        if ramp is not None and i >= ramp[0]:
            v += ramp[2] * min((i - ramp[0] + 1) / ramp[1], 1.0)
        out.append(v)
    return out


def index(ev: dict[str, object], key: str) -> int:
    """Position of the event's night ``key`` in the weekday series."""
    return weekdays(400).index(ev[key])  # type: ignore[arg-type]


def test_a_step_is_one_event_dated_sized_and_confirmed() -> None:
    ev = leak_events(frame(series(60, (30, 2.0))))
    assert ev.height == 1
    e = ev.row(0, named=True)
    assert index(e, "onset_night") == 30
    assert 30 <= index(e, "alarm_night") <= 32
    assert e["kind"] == "step" and e["status"] == "confirmed"
    assert e["size_m3h"] == pytest.approx(2.0, abs=0.1)
    assert e["confidence"] > 0.99


def test_leaks_stack_each_sized_against_the_level_that_includes_the_others() -> None:
    """Three leaks, the second and third while the first is open: three events, each its own size
    (the single-episode CUSUM reported one alarm mixing them)."""
    ev = leak_events(frame(series(90, (20, 1.5), (40, 3.0), (60, 1.0))))
    assert ev.height == 3
    assert [index(e, "onset_night") for e in ev.iter_rows(named=True)] == [20, 40, 60]
    assert ev["size_m3h"].to_list() == pytest.approx([1.5, 3.0, 1.0], abs=0.15)
    assert ev["status"].to_list() == ["confirmed"] * 3
    assert ev["event_no"].to_list() == [1, 2, 3]


def test_a_repair_closes_the_event_it_matches_and_leaves_the_other_open() -> None:
    """Leaks of 1.5 (night 20) and 3.0 (night 40); the 3.0 one repaired at night 70."""
    ev = leak_events(frame(series(100, (20, 1.5), (40, 3.0), (70, -3.0))))
    assert ev.height == 2
    small, big = ev.row(0, named=True), ev.row(1, named=True)
    assert small["status"] == "confirmed" and small["end_night"] is None
    assert big["status"] == "closed" and index(big, "end_night") == 70


def test_a_ramp_is_one_event_of_its_final_size() -> None:
    ev = leak_events(frame(series(80, ramp=(30, 8, 4.0))))
    assert ev.height == 1
    e = ev.row(0, named=True)
    assert e["kind"] == "ramp"
    assert 27 <= index(e, "onset_night") <= 34
    assert index(e, "alarm_night") <= 30 + 7
    assert e["size_m3h"] == pytest.approx(4.0, rel=0.1)


def test_leaks_on_a_seasonal_swing_are_sized_against_the_season() -> None:
    """A year of weekday nights whose level swings ±10 % with the seasons, four steps of
    0.5–0.8 m³/h (5–8 σ). Once the series spans 240 nights the refit's level has a yearly
    harmonic: each size within 5 %. The 120-night polyline alone (``refit_harmonics=0``, the
    earlier rule) misses one by more than 15 %: its corners lend the season to the leaks."""
    steps = [(40, 0.6), (100, 0.8), (150, 0.5), (210, 0.7)]
    nights = weekdays(260)
    values = [
        10.0
        + np.sin(2 * np.pi * (d - FIRST).days / 365.0)
        + PATTERN[i % 5]
        + sum(size for at, size in steps if i >= at)
        for i, d in enumerate(nights)
    ]

    def sizes(params: LeakEventParams) -> list[float]:
        found = {
            index(e, "onset_night"): e["size_m3h"]
            for e in leak_events(frame(values), params).iter_rows(named=True)
        }
        assert all(at in found for at, _ in steps), found
        return [abs(found[at] - size) / size for at, size in steps]

    assert max(sizes(LeakEventParams())) <= 0.05
    assert max(sizes(LeakEventParams(refit_harmonics=0))) > 0.15


def test_cold_start_detects_a_leak_three_nights_in() -> None:
    ev = leak_events(frame(series(30, (3, 3.0))))
    assert ev.height == 1
    e = ev.row(0, named=True)
    assert index(e, "onset_night") == 3
    assert index(e, "alarm_night") <= 6


def test_cold_start_thresholds_are_wider_than_later_ones() -> None:
    """The same +0.5 m³/h step (≈ 4.5 σ here) four nights into the data takes 3 nights to alarm,
    after 44 nights of history 1: the decision interval is h × (1 + 4 / differences seen) and σ
    starts at the prior (1.5 % of the level) until differences accumulate. A large step alarms as
    fast either way (``test_cold_start_detects_a_leak_three_nights_in``)."""
    early = leak_events(frame(series(30, (4, 0.5)))).row(0, named=True)
    late = leak_events(frame(series(70, (44, 0.5)))).row(0, named=True)
    assert index(early, "onset_night") == 4 and index(late, "onset_night") == 44
    assert index(early, "alarm_night") - 4 == 3
    assert index(late, "alarm_night") - 44 == 1
    # Without the widening (cold_h = 0) and with a tight σ prior the early step alarms sooner:
    # the cold-start caution is what holds it back, not the data.
    bare_p = LeakEventParams(cold_h=0.0, prior_sigma_rel=0.002, prior_sigma_m3h=0.01)
    bare = leak_events(frame(series(30, (4, 0.5))), bare_p).row(0, named=True)
    assert index(bare, "alarm_night") < index(early, "alarm_night")


def test_one_exceptional_night_raises_nothing() -> None:
    values = series(60)
    values[30] += 8.0
    assert leak_events(frame(values)).height == 0


def test_bad_input_never_crashes() -> None:
    values: list[float | None] = list(series(40, (25, 2.0)))
    values[10] = None
    values[11] = float("nan")
    values[26] = None
    values[5] = float("inf")
    values[6] = float("-inf")
    f = frame(values)
    ev = leak_events(pl.concat([f, f.reverse()]))  # duplicated and unsorted nights
    assert ev.height == 1 and index(ev.row(0, named=True), "onset_night") == 25
    assert leak_events(f.head(0)).height == 0
    assert leak_events(f.head(2)).height == 0
    assert leak_events(frame([None] * 20)).height == 0
    assert leak_events(f.head(0)).schema == pl.Schema(LEAK_EVENTS)


def test_one_alert_per_event_with_its_identity_in_the_evidence() -> None:
    f = frame(series(100, (20, 1.5), (40, 3.0), (70, -3.0)))
    ev = leak_events(f)
    alerts = leak_event_alerts(ev, f)
    assert alerts.schema == pl.Schema(ALERTS)  # type: ignore[arg-type]
    assert alerts.height == 2
    assert set(alerts["code"]) == {ALERT_CODE}
    assert alerts["status"].to_list() == ["open", "closed"]
    evidence = [json.loads(e) for e in alerts["evidence"]]
    assert [e["event_status"] for e in evidence] == ["confirmed", "closed"]
    assert evidence[1]["event_id"] == f"D1:{weekdays(41)[40].isoformat()}"
    assert evidence[1]["size_m3h"] == pytest.approx(3.0, abs=0.15)
    assert alerts["start_ts"][1] == datetime(2026, 3, 2, 2, tzinfo=UTC)  # night 40


# --- simulated DMA-years ----------------------------------------------------------------------

SEEDS = range(20)  # the detector's settings were tuned on seeds 100–199, never on these


def test_the_simulator_is_seeded_and_injects_what_it_says() -> None:
    a, b = simulate_dma_year(3), simulate_dma_year(3)
    assert a.series.equals(b.series) and a.leaks == b.leaks
    assert not a.series.equals(simulate_dma_year(4).series)
    assert len(a.leaks) == 20 and a.series.height == 365
    rel = [leak.size_m3h / a.base_mnf_m3h for leak in a.leaks]
    assert min(rel) >= 0.03 and max(rel) <= 0.30
    assert {leak.kind for leak in a.leaks} == {"step", "ramp"}
    assert any(leak.repair is not None for leak in a.leaks)
    assert a.series["nnf_m3h"].null_count() > 0
    assert a.leaks[0].onset == DmaYearParams().first_onset


def test_no_repair_while_a_leak_grows_unless_the_earlier_years_are_asked_for() -> None:
    """A repair during a ramp's growth (or within ``min_gap`` nights of it) shows in the night
    flow as a smaller ramp, so the simulator plans none there by default; the flag restores the
    earlier years, where such repairs happen, for the benchmark's comparison row."""
    p = DmaYearParams()

    def clashes(params: DmaYearParams) -> int:
        n = 0
        for seed in range(40):
            year = simulate_dma_year(seed, params)
            for r in (leak.repair for leak in year.leaks if leak.repair is not None):
                n += any(
                    leak.onset - p.min_gap <= r <= leak.onset + leak.growth_nights + p.min_gap
                    for leak in year.leaks
                )
        return n

    assert clashes(p) == 0
    assert clashes(replace(p, repair_clear_of_growth=False)) > 0


def test_targets_over_simulated_dma_years() -> None:
    """Pooled over 20 DMA-years (400 onsets). Issue 11's targets: ≥ 90 % of onsets detected,
    abrupt ones within 2 nights and ramps within 7, ≤ 1 false alarm per DMA-year, size within
    15 %. Measured on these seeds (``bench/leak_events.py --first 0 --seeds 20``; never tuned on):
    97.2 % detected, 91.0 % in time (nights with data), 0.25 false alarms and 0.15 duplicate
    events per DMA-year, median size error 3.5 %, 92.8 % of sizes within 15 %. Closed events:
    106 end within 3 nights of a real repair, 2 at none (7 before the refit reopened events
    closed at a drop it pruned). The asserts hold that level with a small margin, so a change
    that loses ground fails; BENCHMARKS.md has the same figures on held-out seeds."""
    scores = []
    closed_at_repair = closed_at_none = 0
    for seed in SEEDS:
        year = simulate_dma_year(seed)
        events = leak_events(year.series, LeakEventParams(holidays=year.holidays))
        scores.append(score_events(events, year))
        repairs = [leak.repair for leak in year.leaks if leak.repair is not None]
        for end in events["end_night"].drop_nulls():
            night = (end - year.nights[0]).days
            if any(abs(night - r) <= 3 for r in repairs):
                closed_at_repair += 1
            else:
                closed_at_none += 1
    assert closed_at_repair >= 100
    assert closed_at_none <= 4
    onsets = sum(s.onsets for s in scores)
    assert onsets == 20 * len(SEEDS)
    assert sum(s.detected for s in scores) / onsets >= 0.96
    assert sum(s.in_time for s in scores) / onsets >= 0.89
    assert sum(s.false_alarms for s in scores) / len(scores) <= 0.6
    assert sum(s.duplicates for s in scores) / len(scores) <= 0.5
    errors = np.asarray([e for s in scores for _, e in s.size_errors])
    assert float(np.median(errors)) <= 0.05
    assert float(np.mean(errors <= 0.15)) >= 0.90
    step_delays = [d for s in scores for k, d in s.data_delays if k == "step"]
    assert float(np.median(step_delays)) <= 1


# --- the flow's writes against a real PostgreSQL ---------------------------------------------


@pytest.fixture
def leak_db(plain_db_url: str) -> Iterator[str]:
    """A migrated plain-PostgreSQL database with one DMA and 90 nights of stored NNF: leaks of
    1.5 and 3.0 m³/h (nights 20, 40), the 3.0 one repaired at night 70."""
    values = series(100, (20, 1.5), (40, 3.0), (70, -3.0))
    nights = weekdays(len(values))
    with psycopg.connect(plain_db_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO dmas (id, timezone) VALUES ('DMA-LEAKS', 'UTC') ON CONFLICT DO NOTHING"
        )
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO dma_daily (dma_id, day, day_hours, nnf_m3h, mnf_start_ts)"
                " VALUES ('DMA-LEAKS', %s, 24, %s, %s)",
                [
                    (d, v, datetime(d.year, d.month, d.day, 2, tzinfo=UTC))
                    for d, v in zip(nights, values, strict=True)
                ],
            )
    yield plain_db_url


def test_flow_writes_events_and_their_alerts_idempotently(leak_db: str) -> None:
    from flows.dma_night_flow import DmaNightFlowSettings, DmaWork, compute_dma

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    work = DmaWork("DMA-LEAKS", [], [])
    now = datetime.now(UTC)
    first = compute_dma.fn(leak_db, work, now, DmaNightFlowSettings())
    assert first["leak_events"] == 2 and first["alerts_new"] == 2
    second = compute_dma.fn(leak_db, work, now, DmaNightFlowSettings())
    assert second["leak_events"] == 2
    assert (second["alerts_new"], second["alerts_updated"], second["alerts_removed"]) == (0, 0, 0)
    with psycopg.connect(leak_db) as conn:
        rows = conn.execute(
            "SELECT event_no, status, size_m3h, end_night FROM leak_events"
            " WHERE dma_id = 'DMA-LEAKS' ORDER BY event_no"
        ).fetchall()
        alerts = conn.execute(
            "SELECT status, evidence->>'event_status', (evidence->>'size_m3h')::float FROM alerts"
            " WHERE code = %s AND subject_id = 'DMA-LEAKS' ORDER BY start_ts",
            (ALERT_CODE,),
        ).fetchall()
    assert [(r[0], r[1]) for r in rows] == [(1, "confirmed"), (2, "closed")]
    assert rows[0][2] == pytest.approx(1.5, abs=0.15) and rows[1][3] == weekdays(71)[70]
    assert [(a[0], a[1]) for a in alerts] == [("open", "confirmed"), ("closed", "closed")]
    # The single-episode detector instead: no event rows left behind, its own alerts only.
    legacy = compute_dma.fn(leak_db, work, now, DmaNightFlowSettings(detector="cusum"))
    assert legacy["leak_events"] == 0
    with psycopg.connect(leak_db) as conn:
        assert conn.execute("SELECT count(*) FROM leak_events").fetchone() == (0,)
        kinds = conn.execute(
            "SELECT evidence ? 'estimated_rise_m3h', evidence ? 'event_id' FROM alerts"
            " WHERE code = %s AND subject_id = 'DMA-LEAKS'",
            (ALERT_CODE,),
        ).fetchall()
    assert kinds and set(kinds) == {(True, False)}


def test_the_analytics_role_rewrites_leak_events(leak_db: str) -> None:
    """Migration 0010 grants the table to aquameter_analytics, the role flows run as."""
    from flows.store import replace_keyed

    events = leak_events(
        pl.DataFrame(
            {
                "dma_id": ["DMA-LEAKS"] * 60,
                "night_date": weekdays(60),
                "nnf_m3h": series(60, (30, 2.0)),
            }
        )
    )
    with psycopg.connect(leak_db) as conn, conn.cursor() as cur:
        cur.execute("SET ROLE aquameter_analytics")
        for _ in range(2):
            deleted, inserted = replace_keyed(
                cur, "leak_events", {"dma_id": ["DMA-LEAKS"]}, {"dma_id": "text"}, events
            )
        assert (deleted, inserted) == (1, 1)
        cur.execute("SELECT size_m3h FROM leak_events WHERE dma_id = 'DMA-LEAKS'")
        assert cur.fetchone()[0] == pytest.approx(2.0, abs=0.1)  # type: ignore[index]
        cur.execute("SET ROLE aquameter_ingest")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            cur.execute("DELETE FROM leak_events")
