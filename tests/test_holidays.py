"""Holiday calendars (registry ``[[calendar]]``, ``[[dma]] calendar``/``holidays``, migration
0012): parsed and refused with the line, synced, read by ``dma_night_flow`` and passed to the
leak-event detector, so a holiday night's weekend-like night use raises no leak event; and a sync
that changes a DMA's holidays makes its next incremental run recompute its events.
"""

from __future__ import annotations

import os
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import numpy as np
import psycopg
import pytest
from pydantic import ValidationError

from aquameter.check import check_registry_text
from aquameter.registry import Calendar, Registry, load_registry
from flows.dma_night_flow import DmaNightFlowSettings, DmaWork, compute_dma, plan_dma_days
from flows.load import load_dma_holidays
from ingest.registry_sync import sync_registry
from tests.servers import EXAMPLE_REGISTRY

DMA = "DMA-NORTH"
# UK bank holidays of Christmas 2025: Thursday and Friday, then the weekend.
CHRISTMAS = (date(2025, 12, 25), date(2025, 12, 26))


def _registry_text(extra_dma: str = "", calendars: str = "") -> str:
    text = EXAMPLE_REGISTRY.read_text()
    marker = 'id = "DMA-NORTH"'
    assert marker in text
    return text.replace(marker, marker + "\n" + extra_dma, 1) + "\n" + calendars


def test_calendars_parse_and_resolve_per_dma(tmp_path: Path) -> None:
    path = tmp_path / "registry.toml"
    path.write_text(
        _registry_text(
            'calendar = "england"\nholidays = [2026-06-01]\n',
            '[[calendar]]\nid = "england"\nholidays = ["2025-12-25", 2025-12-26]\n'
            '[[calendar]]\nid = "default"\nholidays = ["2026-01-01"]\n',
        )
    )
    reg = load_registry(path)
    north = next(d for d in reg.dmas if d.id == DMA)
    south = next(d for d in reg.dmas if d.id != DMA)
    # Its own calendar and its own date; the other DMA names none and gets the default one.
    assert reg.holidays_of(north) == [*CHRISTMAS, date(2026, 6, 1)]
    assert reg.holidays_of(south) == [date(2026, 1, 1)]


def test_bad_holidays_are_refused() -> None:
    base = load_registry(EXAMPLE_REGISTRY).model_dump(by_alias=True, exclude_none=True)
    with pytest.raises(ValidationError, match="unknown calendar 'scotland'"):
        dmas = [{**base["dma"][0], "calendar": "scotland"}, *base["dma"][1:]]
        Registry.model_validate({**base, "dma": dmas})
    twice = [{"id": "x"}, {"id": "x"}]
    with pytest.raises(ValidationError, match="a calendar is declared twice"):
        Registry.model_validate({**base, "calendar": twice})
    with pytest.raises(ValidationError):
        Calendar.model_validate({"id": "x", "holidays": ["2025-13-01"]})


def test_check_gives_the_line_of_a_bad_holiday(tmp_path: Path) -> None:
    """``devices check`` names file:line of a DMA's malformed holiday date (``[[dma]]`` is one
    of the sections it locates; ``[[calendar]]`` needs its entry in aquameter.check.SECTIONS)."""
    text = _registry_text('holidays = ["2025-12-32"]\n')
    problems, summary = check_registry_text(tmp_path / "r.toml", text)
    line = text.splitlines().index('holidays = ["2025-12-32"]') + 1
    assert summary is None
    assert [p.line for p in problems] == [line], [str(p) for p in problems]
    assert "holidays" in problems[0].message


def test_sync_round_trip(db_url: str) -> None:
    reg = load_registry(EXAMPLE_REGISTRY)
    reg.calendars = [Calendar(id="england", holidays=list(CHRISTMAS))]
    north = next(d for d in reg.dmas if d.id == DMA)
    north.calendar = "england"
    north.holidays = [date(2026, 6, 1)]
    with psycopg.connect(db_url) as conn:
        sync_registry(conn, reg)
        got = load_dma_holidays(conn)
        rows = conn.execute("SELECT id, holidays FROM holiday_calendars").fetchall()
    assert rows == [("england", list(CHRISTMAS))]
    assert got[DMA] == (*CHRISTMAS, date(2026, 6, 1))
    assert all(v == () for k, v in got.items() if k != DMA)
    # The registry is the whole truth: a calendar removed from it is gone after the next sync.
    north.calendar, north.holidays, reg.calendars = None, [], []
    with psycopg.connect(db_url) as conn:
        sync_registry(conn, reg)
        assert conn.execute("SELECT count(*) FROM holiday_calendars").fetchone() == (0,)
        assert load_dma_holidays(conn, [DMA]) == {DMA: ()}


def _store_nights(db_url: str, first: date, nights: int, seed: int) -> list[date]:
    """A DMA's stored night series (dma_daily): 20 m³/h on weekday nights, 1.6 m³/h more on
    weekend and Christmas nights (the night use of a holiday), σ 0.08; no leak."""
    rng = np.random.default_rng(seed)
    days = [first + timedelta(days=i) for i in range(nights)]
    rows = [
        (DMA, d, 24.0, 20.0 + (1.6 if d.weekday() >= 5 or d in CHRISTMAS else 0.0)
         + float(rng.normal(0.0, 0.08)))
        for d in days
    ]  # fmt: skip
    with psycopg.connect(db_url) as conn:
        conn.execute("DELETE FROM dma_daily WHERE dma_id = %s", (DMA,))
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO dma_daily (dma_id, day, day_hours, nnf_m3h) VALUES (%s, %s, %s, %s)",
                rows,
            )
    return days


def _events_after_run(db_url: str, holidays: list[date]) -> list[tuple[date, str]]:
    reg = load_registry(EXAMPLE_REGISTRY)
    next(d for d in reg.dmas if d.id == DMA).holidays = holidays
    with psycopg.connect(db_url) as conn:
        sync_registry(conn, reg)
    # The task of the flow, for a day after the stored nights: it loads the DMA's whole stored
    # series and its holidays from the database and writes its events and alerts.
    work = DmaWork(DMA, [date(2026, 2, 10)], ["t"])
    compute_dma.fn(db_url, work, datetime(2026, 2, 12, tzinfo=UTC), DmaNightFlowSettings())
    with psycopg.connect(db_url) as conn:
        events = conn.execute(
            "SELECT onset_night, status FROM leak_events WHERE dma_id = %s ORDER BY onset_night",
            (DMA,),
        ).fetchall()
        alerts = conn.execute(
            "SELECT count(*) FROM alerts WHERE code = 'DMA_NIGHT_FLOW_RISE' AND subject_id = %s",
            (DMA,),
        ).fetchone()
    assert alerts == (len(events),)
    return [(r[0], r[1]) for r in events]


@pytest.mark.parametrize("seed", [3, 7])
def test_holiday_night_raises_no_leak_event_when_declared(db_url: str, seed: int) -> None:
    _store_nights(db_url, date(2025, 10, 1), 120, seed)
    undeclared = _events_after_run(db_url, [])
    assert [d for d, _ in undeclared] == [CHRISTMAS[0]], undeclared
    assert _events_after_run(db_url, list(CHRISTMAS)) == []


def test_holiday_change_makes_the_next_incremental_run_recompute_events(db_url: str) -> None:
    """A sync that changes a DMA's holidays leaves its marks unmatched: the next incremental plan
    has exactly that DMA (its latest marked day), and none after it ran."""
    since = datetime(2025, 12, 20, tzinfo=UTC)
    until = datetime(2025, 12, 30, tzinfo=UTC)
    as_of = datetime(2026, 1, 2, tzinfo=UTC)
    settings = DmaNightFlowSettings(late_horizon_days=0)

    def plan() -> list[DmaWork]:
        return plan_dma_days.fn(db_url, since, until, as_of, False, settings)

    for work in plan():
        compute_dma.fn(db_url, work, as_of, settings)
    assert plan() == []
    reg = load_registry(EXAMPLE_REGISTRY)
    next(d for d in reg.dmas if d.id == DMA).holidays = list(CHRISTMAS)
    with psycopg.connect(db_url) as conn:
        result = sync_registry(conn, reg)
    assert result.invalidated is not None and result.invalidated["dma_night_flow"] == 1
    stale = plan()
    assert [(w.dma_id, len(w.days)) for w in stale] == [(DMA, 1)]
    for work in stale:
        compute_dma.fn(db_url, work, as_of, settings)
    assert plan() == []
    # Syncing the same registry again changes nothing and invalidates nothing.
    with psycopg.connect(db_url) as conn:
        assert sync_registry(conn, reg).invalidated == {"meter_anomalies": 0, "dma_night_flow": 0}
    assert plan() == []
