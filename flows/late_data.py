"""Which results are stale: late data, edits, and days computed before they were over.

Ingest records every (channel, UTC day) that received readings in ``ingest_days`` with the time it
last did. A flow's unit of work is a (subject, local day) — a DMA night, a meter day — or a
(subject, period). Its *inputs* are the ``ingest_days`` rows (and manual edits) of the subject's
channels over the UTC days the unit can depend on: for a local day d that is UTC days d−1..d+1,
because any zone's local day lies within them (conservative on purpose), widened by the flow for
context such as a billing period's neighbouring reads.

A unit is recomputed when

* it was never computed (no ``analysis_marks`` row), or
* its inputs fingerprint changed: the count of input rows and the exact sum of their ``updated_at``
  epochs. Ingest only ever inserts rows or moves ``updated_at`` forward, so any landing of data
  changes the fingerprint; and since the fingerprint is read in the same snapshot as the data, an
  ingest transaction that commits while a flow runs is simply seen next time — no clock margin, no
  race between ``now()`` of two transactions; or
* it was computed while its day was not over yet (``as_of`` before the day's end) and the flow now
  runs for a later ``as_of``: a silent meter produces no rows, yet its day still has to be judged
  once it is complete (COMMS_LOSS), and a partial day's totals are not final.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import polars as pl
import psycopg

from dma.local_time import local_day_bounds
from flows.load import copy_frame, days_since_1970

log = logging.getLogger("aquameter.flows")

# Channels whose data a subject's results depend on, per kind of subject.
SUBJECT_CHANNELS: dict[str, str] = {
    # A DMA: its boundary flow and zone pressure, and every customer meter in it (night use).
    "dma": """
        SELECT c.dma_id AS subject_id, c.id AS channel_id FROM channels c
        WHERE c.dma_id IS NOT NULL AND c.role IN ('inlet', 'outlet', 'pressure_azp')
        UNION ALL
        SELECT m.dma_id, c.id FROM channels c JOIN meters m ON m.id = c.meter_id
        WHERE m.dma_id IS NOT NULL AND c.kind IN ('register', '')""",
    # A customer meter: its register channel.
    "meter": """
        SELECT c.meter_id AS subject_id, c.id AS channel_id FROM channels c
        WHERE c.meter_id IS NOT NULL AND c.kind IN ('register', '')""",
    # A read-rate group: the meters of one DMA behind one gateway of one vendor.
    "read_group": """
        SELECT concat_ws('|', coalesce(m.dma_id, ''), coalesce(d.gateway, 'direct'), d.vendor_id)
                   AS subject_id, c.id AS channel_id
        FROM channels c JOIN meters m ON m.id = c.meter_id JOIN devices d ON d.id = m.device_id
        WHERE c.kind IN ('register', '')""",
}

# Kinds whose results use interval volumes, which manual edits change (read rates do not).
EDITED_KINDS = ("dma", "meter")
_EDIT_INPUTS = """
                UNION ALL
                SELECT s.subject_id, (e.ts AT TIME ZONE 'UTC')::date, count(*),
                       sum(extract(epoch FROM e.edited_at))
                FROM meter_edits e JOIN channels c ON c.meter_id = e.meter_id
                JOIN s ON s.channel_id = c.id
                WHERE e.ts >= %(lo)s::timestamp AT TIME ZONE 'UTC'
                  AND e.ts < (%(hi)s::date + 1)::timestamp AT TIME ZONE 'UTC'
                GROUP BY 1, 2"""

UNITS: dict[str, Any] = {
    "subject_id": pl.String,
    "day": pl.Date,
    "lo": pl.Date,
    "hi": pl.Date,
    "complete_at": pl.Datetime("us", "UTC"),
}


def with_valid_zones(subjects: pl.DataFrame) -> pl.DataFrame:
    """Subjects whose time zone is a valid IANA name (null means UTC); the others cannot have
    local days and are left out with a warning instead of failing the whole run."""
    zones = subjects["timezone"].fill_null("UTC").unique().to_list()
    bad = []
    for zone in zones:
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            bad.append(zone)
    if not bad:
        return subjects
    dropped = subjects.filter(pl.col("timezone").is_in(bad))
    log.warning(
        "%d subject(s) skipped, unknown time zone(s) %s: %s",
        dropped.height,
        sorted(bad),
        ", ".join(dropped["subject_id"].head(10).to_list()),
    )
    return subjects.filter(~pl.col("timezone").is_in(bad) | pl.col("timezone").is_null())


def local_days(subjects: pl.DataFrame, since: datetime, until: datetime) -> pl.DataFrame:
    """(subject_id, day, complete_at) for every local day of each subject's zone that overlaps
    [since, until); ``complete_at`` is the UTC instant the local day ends."""
    subj = subjects.select("subject_id", pl.col("timezone").fill_null("UTC"))
    last_instant = until - timedelta(microseconds=1)
    parts = []
    for zone in subj["timezone"].unique().sort().to_list():
        tz = ZoneInfo(zone)
        first, last = since.astimezone(tz).date(), last_instant.astimezone(tz).date()
        if last < first:
            continue
        # A zone's day ends are the same for all its subjects: computed once per zone and day,
        # then crossed with the subjects (a year of 10,000 meters is 3.65 M units).
        days = pl.date_range(first, last, "1d", eager=True).alias("day").to_frame()
        ends = local_day_bounds(days.with_columns(pl.lit(zone).alias("timezone")), "day").select(
            "day", pl.col("day_end_ts").alias("complete_at")
        )
        parts.append(
            subj.filter(pl.col("timezone") == zone).select("subject_id").join(ends, how="cross")
        )
    if not parts:
        return pl.DataFrame(
            schema={"subject_id": pl.String, "day": pl.Date, "complete_at": UNITS["complete_at"]}
        )
    return pl.concat(parts).sort("subject_id", "day")


def day_units(days: pl.DataFrame, before: int = 1, after: int = 1) -> pl.DataFrame:
    """Units for local days: inputs are the UTC days ``day − before`` .. ``day + after``."""
    return days.select(
        "subject_id",
        "day",
        (pl.col("day") - timedelta(days=before)).alias("lo"),
        (pl.col("day") + timedelta(days=after)).alias("hi"),
        "complete_at",
    )


def marked_days(conn: psycopg.Connection, flow: str, first: date, before: date) -> pl.DataFrame:
    """(subject_id, day) of ``flow`` computed before, with first <= day < before: the days late
    data may still reach after the flow's window has moved on."""
    return copy_frame(
        conn,
        f"""SELECT subject_id, {days_since_1970("day")} FROM analysis_marks
            WHERE flow = %s AND day >= %s AND day < %s""",
        (flow, first, before),
        {"subject_id": pl.String, "day": pl.Date},
    )


def fingerprints(
    conn: psycopg.Connection,
    kind: str,
    units: pl.DataFrame,
    subject_ids: Sequence[str] | None = None,
) -> pl.DataFrame:
    """``units`` (``UNITS``) with an ``inputs`` fingerprint of their input rows added."""
    if units.height == 0:
        return units.with_columns(pl.lit(None, dtype=pl.String).alias("inputs"))
    subject_filter = "" if subject_ids is None else "WHERE subject_id = ANY(%(subjects)s)"
    edits = _EDIT_INPUTS if kind in EDITED_KINDS else ""
    lo, hi = units["lo"].min(), units["hi"].max()
    stats = copy_frame(
        conn,
        f"""WITH s AS (SELECT * FROM ({SUBJECT_CHANNELS[kind]}) x {subject_filter}),
            u AS (SELECT * FROM unnest(%(us)s::text[], %(ud)s::date[], %(ul)s::date[],
                                       %(uh)s::date[]) AS u(subject_id, day, lo, hi)),
            st AS (
                SELECT s.subject_id, i.day, count(*) AS n,
                       sum(extract(epoch FROM i.updated_at)) AS t
                FROM ingest_days i JOIN s ON s.channel_id = i.channel_id
                WHERE i.day BETWEEN %(lo)s AND %(hi)s
                GROUP BY 1, 2
                {edits})
            SELECT u.subject_id, {days_since_1970("u.day")},
                   coalesce(sum(st.n), 0)::text || ':' || coalesce(sum(st.t), 0)::text
            FROM u CROSS JOIN LATERAL generate_series(u.lo, u.hi, interval '1 day') AS g(d)
            LEFT JOIN st ON st.subject_id = u.subject_id AND st.day = g.d::date
            GROUP BY u.subject_id, u.day""",
        {
            "subjects": list(subject_ids) if subject_ids is not None else None,
            "us": units["subject_id"].to_list(),
            "ud": units["day"].to_list(),
            "ul": units["lo"].to_list(),
            "uh": units["hi"].to_list(),
            "lo": lo,
            "hi": hi,
        },
        {"subject_id": pl.String, "day": pl.Date, "inputs": pl.String},
    )
    return units.join(stats, on=["subject_id", "day"], how="left")


def with_salt(units: pl.DataFrame, salt: str) -> pl.DataFrame:
    """Append ``salt`` (the flow's settings digest) to every fingerprint."""
    if not salt:
        return units
    return units.with_columns(pl.concat_str([pl.col("inputs"), pl.lit(salt)], separator="|s"))


def stale_units(
    conn: psycopg.Connection,
    flow: str,
    units: pl.DataFrame,
    as_of: datetime,
    *,
    full: bool = False,
) -> pl.DataFrame:
    """The units (with ``inputs``) that must be recomputed; ``full`` takes all of them."""
    if full or units.height == 0:
        return units
    marks = copy_frame(
        conn,
        f"""SELECT m.subject_id, {days_since_1970("m.day")}, m.inputs,
                   (extract(epoch FROM m.as_of) * 1000000)::bigint
            FROM analysis_marks m
            JOIN unnest(%s::text[], %s::date[]) AS u(subject_id, day)
              ON u.subject_id = m.subject_id AND u.day = m.day
            WHERE m.flow = %s""",
        (units["subject_id"].to_list(), units["day"].to_list(), flow),
        {
            "subject_id": pl.String,
            "day": pl.Date,
            "old_inputs": pl.String,
            "old_as_of": pl.Datetime("us", "UTC"),
        },
    )
    at = pl.lit(as_of).cast(pl.Datetime("us", "UTC"))
    joined = units.join(marks, on=["subject_id", "day"], how="left")
    stale = (
        pl.col("old_inputs").is_null()
        | (pl.col("old_inputs") != pl.col("inputs"))
        | ((pl.col("old_as_of") < pl.col("complete_at")) & (pl.col("old_as_of") < at))
    )
    return joined.filter(stale).drop("old_inputs", "old_as_of")


def plan_days(
    conn: psycopg.Connection,
    flow: str,
    kind: str,
    subjects: pl.DataFrame,
    since: datetime,
    until: datetime,
    as_of: datetime,
    *,
    late_horizon_days: int,
    full: bool = False,
    salt: str = "",
) -> pl.DataFrame:
    """Stale (subject, local day) units of a day-based flow: the window's days plus earlier days
    computed within ``late_horizon_days`` before it. Returns ``UNITS`` + ``inputs``."""
    subjects = with_valid_zones(subjects)
    window = local_days(subjects, since, until)
    if window.height:
        first = window["day"].min()
        assert isinstance(first, date)
        old = marked_days(conn, flow, first - timedelta(days=late_horizon_days), first).join(
            subjects.select("subject_id", "timezone"), on="subject_id", how="inner"
        )
        if old.height:
            old = local_day_bounds(
                old.rename({"day": "local_date"}).with_columns(pl.col("timezone").fill_null("UTC")),
                "local_date",
            ).select(
                "subject_id",
                pl.col("local_date").alias("day"),
                pl.col("day_end_ts").alias("complete_at"),
            )
            window = pl.concat([old, window]).unique(["subject_id", "day"], keep="last")
    units = day_units(window)
    parts = [
        stale_units(
            conn,
            flow,
            with_salt(
                fingerprints(conn, kind, batch, batch["subject_id"].unique().to_list()), salt
            ),
            as_of,
            full=full,
        )
        for batch in subject_batches(units, PLAN_BATCH_UNITS)
    ]
    if not parts:  # no days in the window: the empty frame, with its columns
        return with_salt(fingerprints(conn, kind, units), salt)
    return pl.concat(parts).sort("subject_id", "day")


# Units fingerprinted per query. Why: the units travel to the server as arrays built from Python
# lists, and a year of 10,000 meters (3.65 M meter-days) in one query cost ~2 GB in the flow's
# process; in batches of whole subjects the cost is bounded whatever the window and the estate.
PLAN_BATCH_UNITS = 100_000


def subject_batches(units: pl.DataFrame, most: int) -> Iterator[pl.DataFrame]:
    """``units`` split into frames of whole subjects, each of about ``most`` rows or fewer (a
    subject with more units than ``most`` is a batch of its own), one at a time."""
    if units.height == 0:
        return
    per_subject = units.group_by("subject_id", maintain_order=True).len().sort("subject_id")
    batches: list[list[str]] = [[]]
    rows = 0
    for subject, n in per_subject.iter_rows():
        if batches[-1] and rows + n > most:
            batches.append([])
            rows = 0
        batches[-1].append(subject)
        rows += n
    for ids in batches:
        yield units.filter(pl.col("subject_id").is_in(ids))
