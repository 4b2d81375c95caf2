"""Episode model: opening, hysteresis, closing, evidence and merging with stored alerts.

Conditions are hand-built hourly spans starting at T0 = 2024-05-01 00:00 UTC; ``hours(a, b)`` marks
the spans [a, b) hours after T0 as active. Every expected value is worked out in the comments.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import polars as pl

from pipelines.episodes import (
    EpisodeParams,
    Evidence,
    find_episodes,
    update_episodes,
    with_spans,
)
from pipelines.schemas import ALERTS, UTC_TS

T0 = datetime(2024, 5, 1, tzinfo=UTC)
H = timedelta(hours=1)


def at(hours: float) -> datetime:
    return T0 + hours * H


def conditions(
    subject: str, first: int, last: int, active: set[int], value: dict[int, float] | None = None
) -> pl.DataFrame:
    """Hourly spans [h, h+1) for h in first..last-1; ``value`` per hour (default 1.0)."""
    hrs = list(range(first, last))
    vals = value or {}
    return pl.DataFrame(
        {
            "subject_id": [subject] * len(hrs),
            "start": [at(h) for h in hrs],
            "end": [at(h + 1) for h in hrs],
            "active": [h in active for h in hrs],
            "v": [vals.get(h, 1.0) for h in hrs],
        },
        schema={
            "subject_id": pl.String,
            "start": UTC_TS,
            "end": UTC_TS,
            "active": pl.Boolean,
            "v": pl.Float64,
        },
    )


def hours(a: int, b: int) -> set[int]:
    return set(range(a, b))


def test_opens_at_onset_after_min_duration_and_closes_after_quiet_time():
    # Active hours 3..8 (spans 03:00-09:00 = 6 h >= 4 h minimum), then quiet 09:00-12:00
    # (3 h >= 2 h quiet time).
    cond = conditions("S", 0, 12, hours(3, 9))
    eps = find_episodes(cond, EpisodeParams(min_duration=4 * H, quiet_time=2 * H))
    assert eps.height == 1
    row = eps.row(0, named=True)
    assert row["start_ts"] == at(3)  # the onset, not the moment 4 h later when it was confirmed
    assert row["last_active_ts"] == at(9)  # end of the last active span
    assert row["closed"] is True


def test_short_condition_never_opens():
    # 3 active hours < 4 h minimum.
    cond = conditions("S", 0, 12, hours(3, 6))
    assert find_episodes(cond, EpisodeParams(min_duration=4 * H, quiet_time=H)).height == 0


def test_short_gap_is_bridged_long_gap_splits():
    # Active 0-4, quiet 4-5 (1 h < 2 h quiet time: bridged), active 5-7, quiet 7-10 (3 h: closes),
    # active 10-11 (a new stretch of 1 h >= 1 h minimum), then quiet 11-14 (3 h: closes).
    cond = conditions("S", 0, 14, hours(0, 4) | hours(5, 7) | hours(10, 11))
    eps = find_episodes(cond, EpisodeParams(min_duration=H, quiet_time=2 * H)).sort("start_ts")
    assert eps.select("start_ts", "last_active_ts", "closed").rows() == [
        (at(0), at(7), True),
        (at(10), at(11), True),
    ]


def test_flapping_condition_shorter_than_minimum_never_opens():
    # 1 h on / 1 h off for 12 hours: no stretch reaches the 2 h minimum, gaps are bridged but there
    # is nothing open to bridge.
    cond = conditions("S", 0, 12, {0, 2, 4, 6, 8, 10})
    assert find_episodes(cond, EpisodeParams(min_duration=2 * H, quiet_time=3 * H)).height == 0


def test_trailing_quiet_shorter_than_quiet_time_stays_open():
    # Active 2-6, then only 1 h of data without the condition (quiet time 2 h): still open.
    cond = conditions("S", 0, 7, hours(2, 6))
    eps = find_episodes(cond, EpisodeParams(quiet_time=2 * H))
    assert eps.select("start_ts", "last_active_ts", "closed").rows() == [(at(2), at(6), False)]


def test_evidence_reduces_active_rows_only():
    # Active hours 1..4 with v = 5, 7, 2, 4; inactive hours carry v = 100 and must not count.
    vals = {0: 100.0, 1: 5.0, 2: 7.0, 3: 2.0, 4: 4.0, 5: 100.0}
    cond = conditions("S", 0, 6, hours(1, 5), vals)
    ev = [
        Evidence("sum_v", "v", "sum"),  # 5 + 7 + 2 + 4 = 18
        Evidence("max_v", "v", "max"),  # 7
        Evidence("min_v", "v", "min"),  # 2
        Evidence("first_v", "v", "first"),  # 5
        Evidence("last_v", "v", "last"),  # 4
    ]
    out = update_episodes(cond, code="X", params=EpisodeParams(), evidence=ev)
    assert out.height == 1
    evidence = json.loads(out.item(0, "evidence"))
    assert evidence["sum_v"] == 18.0
    assert evidence["max_v"] == 7.0
    assert evidence["min_v"] == 2.0
    assert evidence["first_v"] == 5.0
    assert evidence["last_v"] == 4.0
    assert evidence["last_active"] == "2024-05-01T05:00:00Z"  # end of hour 4
    assert evidence["duration_h"] == 4.0  # 01:00 -> 05:00
    assert out.item(0, "status") == "closed"  # quiet time 0: the inactive hour 5 closes it
    assert out.item(0, "end_ts") == at(5)
    assert out.schema == pl.Schema(ALERTS)


def test_rerun_with_own_output_is_identical():
    cond = pl.concat(
        [
            conditions("A", 0, 24, hours(2, 8) | hours(12, 20)),
            conditions("B", 0, 24, hours(20, 24)),
        ]
    )
    ev = [Evidence("sum_v", "v", "sum")]
    params = EpisodeParams(min_duration=2 * H, quiet_time=2 * H)
    first = update_episodes(cond, code="X", params=params, evidence=ev)
    # A: 02-08 and 12-20 (quiet 08-12 = 4 h closes the first); B: 20-24 open at the end of data.
    assert first.select("subject_id", "start_ts", "status").rows() == [
        ("A", at(2), "closed"),
        ("A", at(12), "closed"),
        ("B", at(20), "open"),
    ]
    second = update_episodes(cond, code="X", params=params, evidence=ev, previous=first)
    assert second.equals(first)


def test_open_episode_is_updated_by_a_later_window_not_duplicated():
    ev = [Evidence("sum_v", "v", "sum")]
    params = EpisodeParams(min_duration=2 * H, quiet_time=2 * H)
    # Run 1 sees 00:00-12:00, condition from 06:00: open, sum_v = 6 hours x 1.0 = 6.
    run1 = update_episodes(
        conditions("S", 0, 12, hours(6, 12)), code="X", params=params, evidence=ev
    )
    assert run1.select("start_ts", "status").rows() == [(at(6), "open")]
    assert json.loads(run1.item(0, "evidence"))["sum_v"] == 6.0

    # Run 2 sees 10:00-24:00 (2 h overlap): active until 18:00, then quiet 18-24 (6 h >= 2 h).
    window2 = conditions("S", 10, 24, hours(10, 18))
    run2 = update_episodes(window2, code="X", params=params, evidence=ev, previous=run1)
    assert run2.height == 1  # updated, not a second alert
    row = run2.row(0, named=True)
    assert row["start_ts"] == at(6)  # the stored identity
    assert row["status"] == "closed"
    assert row["end_ts"] == at(18)
    evidence = json.loads(row["evidence"])
    # Rows ending after the stored last_active (12:00) are new: hours 12..17 = 6; 6 + 6 = 12,
    # one per active hour 06:00-18:00; the overlap hours 10 and 11 are not counted twice.
    assert evidence["sum_v"] == 12.0
    assert evidence["duration_h"] == 12.0

    # Running window 2 again with its own result changes nothing.
    run3 = update_episodes(window2, code="X", params=params, evidence=ev, previous=run2)
    assert run3.equals(run2)


def test_carried_episode_closes_when_window_starts_quiet():
    params = EpisodeParams(quiet_time=2 * H)
    run1 = update_episodes(conditions("S", 0, 6, hours(3, 6)), code="X", params=params)
    assert run1.select("start_ts", "status").rows() == [(at(3), "open")]
    # Next window 06:00-12:00 shows no condition at all: 6 h quiet >= 2 h. The alert closes at
    # its stored last activity (06:00), which is also where this window starts.
    run2 = update_episodes(conditions("S", 6, 12, set()), code="X", params=params, previous=run1)
    assert run2.select("start_ts", "status", "end_ts").rows() == [(at(3), "closed", at(6))]


def test_carried_episode_stays_open_through_a_short_quiet_window():
    params = EpisodeParams(quiet_time=3 * H)
    run1 = update_episodes(conditions("S", 0, 6, hours(3, 6)), code="X", params=params)
    # Window 06:00-08:00 quiet for 2 h only (< 3 h): unchanged, still open.
    run2 = update_episodes(conditions("S", 6, 8, set()), code="X", params=params, previous=run1)
    assert run2.equals(run1)


def test_stored_closed_alert_is_not_reopened_by_a_short_window_after_it():
    params = EpisodeParams(quiet_time=2 * H)
    # Active 02-05, quiet 05-08 (3 h >= 2 h): closed at 05:00.
    run1 = update_episodes(conditions("S", 0, 8, hours(2, 5)), code="X", params=params)
    assert run1.select("start_ts", "status", "end_ts").rows() == [(at(2), "closed", at(5))]
    # A window starting exactly at that end, quiet for only 1 h: too short to prove quiet on its
    # own, but nothing new happened, so the alert stays as stored.
    run2 = update_episodes(conditions("S", 5, 6, set()), code="X", params=params, previous=run1)
    assert run2.equals(run1)
    # Activity again right after (05-07) within the quiet time continues the same episode.
    run3 = update_episodes(conditions("S", 5, 7, {5, 6}), code="X", params=params, previous=run1)
    assert run3.select("start_ts", "status", "end_ts").rows() == [(at(2), "open", None)]


def test_recomputed_episode_keeps_stored_identity_when_late_data_moves_onset():
    params = EpisodeParams(quiet_time=H)
    # Stored: an open alert from 05:00 (computed before hours 3-4 arrived).
    stored = update_episodes(conditions("S", 0, 8, hours(5, 8)), code="X", params=params)
    assert stored.select("start_ts").to_series().to_list() == [at(5)]
    # Late data: the condition really began at 03:00. The recomputed episode 03:00-08:00 overlaps
    # the stored one and keeps its identity (start 05:00) so upserts do not create a duplicate.
    late = update_episodes(
        conditions("S", 0, 10, hours(3, 8)), code="X", params=params, previous=stored
    )
    assert late.select("start_ts", "status", "end_ts").rows() == [(at(5), "closed", at(8))]


def test_stored_open_alert_without_support_is_closed_and_other_subjects_untouched():
    params = EpisodeParams(quiet_time=H)
    stored = update_episodes(
        pl.concat([conditions("S", 0, 8, hours(5, 8)), conditions("U", 0, 8, hours(1, 8))]),
        code="X",
        params=params,
    )
    # Revised data for S shows no condition; U is not in this window at all.
    out = update_episodes(conditions("S", 0, 10, set()), code="X", params=params, previous=stored)
    assert out.select("subject_id", "start_ts", "status", "end_ts").rows() == [
        ("S", at(5), "closed", at(8)),  # closed at its stored last activity
        ("U", at(1), "open", None),  # returned unchanged
    ]


def test_previous_alerts_of_other_codes_are_ignored():
    params = EpisodeParams()
    other = update_episodes(conditions("S", 0, 4, hours(0, 4)), code="OTHER", params=params)
    out = update_episodes(conditions("S", 0, 4, set()), code="X", params=params, previous=other)
    assert out.height == 0


def test_with_spans_end_marks_use_previous_step_and_nominal_after_gaps():
    ts = [at(0), at(0.25), at(0.5), at(3.0)]  # 15-min steps, then a 2.5 h gap
    frame = pl.DataFrame(
        {"subject_id": ["S"] * 4, "ts": ts}, schema={"subject_id": pl.String, "ts": UTC_TS}
    )
    spans = with_spans(frame, nominal_step=timedelta(minutes=15), max_step=H)
    # First row: no previous sample, so the next step (15 min); last row: the 2.5 h step exceeds
    # max_step (1 h), a gap, so the nominal 15 min.
    assert spans.get_column("start").to_list() == [at(-0.25), at(0), at(0.25), at(2.75)]
    assert spans.get_column("end").to_list() == ts
