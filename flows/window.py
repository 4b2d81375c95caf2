"""The time window and database a flow run works on.

A scheduled run is given neither: it looks back ``lookback_days`` from now, which is what lets a
late uplink or a gateway replay be picked up by the next run; an operator's run names the window.
The database URL comes from the caller or from the settings (``AQUAMETER_DATABASE_URL``), never
from deployment parameters, so a password is not stored in the orchestrator's database.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import TypeVar

from aquameter.settings import get_settings

T = TypeVar("T")


def waves(items: Sequence[T], size: int) -> Iterator[list[T]]:
    """``items`` in consecutive groups of ``size`` (all at once when ``size`` <= 0).

    A flow maps one wave of units onto its task runner and waits for it before the next: with
    the default thread runner every mapped task runs at once in this process, so its peak memory
    would be the sum of all units instead of ``size`` units. On Dask (separate worker processes)
    set the flow's ``parallel_chunks`` to the number of workers, or 0.
    """
    step = size if size > 0 else max(len(items), 1)
    for i in range(0, len(items), step):
        yield list(items[i : i + step])


def utc(moment: datetime | date) -> datetime:
    """A UTC datetime; a naive datetime is taken as UTC, a date as its UTC midnight."""
    if not isinstance(moment, datetime):
        return datetime.combine(moment, time(0), UTC)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@dataclass(frozen=True)
class Window:
    """[since, until) of the run and ``as_of``: the instant results are judged at (the end of the
    window, but never later than now: data from the future does not exist yet)."""

    since: datetime
    until: datetime
    as_of: datetime


def resolve_window(
    since: datetime | date | None,
    until: datetime | date | None,
    lookback_days: float,
    now: datetime | None = None,
) -> Window:
    current = utc(now) if now is not None else datetime.now(UTC)
    end = utc(until) if until is not None else current
    start = utc(since) if since is not None else end - timedelta(days=lookback_days)
    if end <= start:
        raise ValueError(f"empty window: since {start.isoformat()} is not before {end.isoformat()}")
    return Window(start, end, min(end, current))


def resolve_database_url(database_url: str | None) -> str:
    if database_url:
        return database_url
    settings = get_settings()
    url = settings.database_url_analytics or settings.database_url
    if not url:
        raise ValueError(
            "no database URL: pass database_url or set AQUAMETER_DATABASE_URL for the flow process"
        )
    return url
