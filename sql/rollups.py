"""Refreshing the hourly/daily rollups, whichever backend holds them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg

from sql.migrate import backend_of

# The continuous aggregates and their bucket widths, in refresh order: the daily view is built on
# the hourly one, so the hourly one must be current first.
CONTINUOUS_AGGREGATES = (
    ("readings_hourly", timedelta(hours=1)),
    ("readings_daily", timedelta(days=1)),
)
_ORIGIN = datetime(2000, 1, 3, tzinfo=UTC)  # the buckets' origin, as aq_bucket and time_bucket


def refresh_rollups(
    conn: psycopg.Connection, start: datetime | None = None, end: datetime | None = None
) -> int:
    """Bring readings_hourly/readings_daily up to date.

    Plain PostgreSQL recomputes the channel-days that ingest marked changed and returns how many.
    TimescaleDB refreshes its continuous aggregates over [start, end) (an open side: the whole
    history on that side) and returns -1. TimescaleDB refreshes only the buckets a window covers
    whole, so the window is widened to bucket bounds for each view: data anywhere in [start, end)
    is rolled up. ``CALL refresh_continuous_aggregate`` cannot run inside a transaction: whatever
    the connection has open is committed first, and the calls run in autocommit mode.
    """
    if backend_of(conn) == "plain":
        with conn.transaction():
            row = conn.execute("SELECT aq_refresh_rollups()").fetchone()
        return int(row[0]) if row else 0
    autocommit = conn.autocommit
    conn.commit()
    conn.autocommit = True
    try:
        for view, width in CONTINUOUS_AGGREGATES:
            conn.execute(
                "CALL refresh_continuous_aggregate(%s::regclass, %s::timestamptz, %s::timestamptz)",
                (view, _floor(start, width), _ceil(end, width)),
            )
    finally:
        conn.autocommit = autocommit
    return -1


def _utc(ts: datetime) -> datetime:
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)  # naive means UTC, as stored


def _floor(ts: datetime | None, width: timedelta) -> datetime | None:
    if ts is None:
        return None
    return _utc(ts) - (_utc(ts) - _ORIGIN) % width


def _ceil(ts: datetime | None, width: timedelta) -> datetime | None:
    floor = _floor(ts, width)
    if ts is None or floor is None or floor == _utc(ts):
        return floor
    return floor + width
