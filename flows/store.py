"""Idempotent writers for analytics results: a re-run replaces, it never adds a second copy.

Results keyed by (subject, day or period) are replaced as a unit: delete the keys that were
recomputed, then COPY the new rows, in the caller's transaction, so readers never see a half
written day and a dirty unit that no longer produces a row leaves no stale row behind. Alerts are
upserted on their episode identity instead, because they carry an id and an opening time that
must survive recomputation; a row is only touched when something in it changed, so ``updated_at``
means what it says.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import polars as pl
import psycopg
from psycopg import sql


def lock(cur: psycopg.Cursor, *parts: str) -> None:
    """Serialise writers of the same result unit until the transaction ends: two runs replacing
    the same keys at once would otherwise both insert after both deleted."""
    cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("aquameter:" + ":".join(parts),))


def copy_rows(
    cur: psycopg.Cursor, table: str, frame: pl.DataFrame, columns: Sequence[str] | None = None
) -> int:
    """COPY ``frame`` (columns named like the table's) into ``table``; returns rows written."""
    cols = list(columns or frame.columns)
    if frame.height == 0:
        return 0
    stmt = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(table), sql.SQL(", ").join(sql.Identifier(c) for c in cols)
    )
    with cur.copy(stmt) as copy:
        for row in frame.select(cols).iter_rows():
            copy.write_row(row)
    return frame.height


def replace_keyed(
    cur: psycopg.Cursor,
    table: str,
    keys: Mapping[str, Sequence[Any]],
    key_types: Mapping[str, str],
    frame: pl.DataFrame,
    columns: Sequence[str] | None = None,
) -> tuple[int, int]:
    """Delete the rows of ``table`` whose key tuple is in ``keys`` (parallel lists), then COPY
    ``frame``. Returns (deleted, inserted)."""
    names = list(keys)
    n = len(next(iter(keys.values()))) if keys else 0
    deleted = 0
    if n:
        unnest = sql.SQL(", ").join(
            sql.SQL("{}::{}[]").format(sql.Placeholder(), sql.SQL(key_types[k])) for k in names
        )
        match = sql.SQL(" AND ").join(
            sql.SQL("t.{c} = k.{c}").format(c=sql.Identifier(k)) for k in names
        )
        cur.execute(
            sql.SQL("DELETE FROM {} t USING unnest({}) AS k({}) WHERE {}").format(
                sql.Identifier(table),
                unnest,
                sql.SQL(", ").join(sql.Identifier(k) for k in names),
                match,
            ),
            [list(keys[k]) for k in names],
        )
        deleted = cur.rowcount
    inserted = copy_rows(cur, table, frame, columns)
    return deleted, inserted


ALERT_COLUMNS = ("code", "subject_id", "start_ts", "end_ts", "status", "severity", "evidence")


def upsert_alerts(cur: psycopg.Cursor, alerts: pl.DataFrame) -> tuple[int, int]:
    """Insert new episodes and update changed ones by (code, subject_id, start_ts).

    Returns (inserted, updated); unchanged rows are not written at all.
    """
    if alerts.height == 0:
        return 0, 0
    cur.execute(
        "CREATE TEMP TABLE IF NOT EXISTS aq_alert_stage "
        "(code text, subject_id text, start_ts timestamptz, end_ts timestamptz, status text, "
        "severity text, evidence text) ON COMMIT DELETE ROWS"
    )
    cur.execute("DELETE FROM aq_alert_stage")
    frame = alerts.select(ALERT_COLUMNS).unique(
        subset=["code", "subject_id", "start_ts"], keep="last", maintain_order=True
    )
    copy_rows(cur, "aq_alert_stage", frame)
    cur.execute(
        """INSERT INTO alerts AS a (code, subject_id, start_ts, end_ts, status, severity, evidence)
           SELECT code, subject_id, start_ts, end_ts, status, severity,
                  coalesce(evidence, '{}')::jsonb
           FROM aq_alert_stage
           ON CONFLICT (code, subject_id, start_ts) DO UPDATE SET
               end_ts = excluded.end_ts, status = excluded.status,
               severity = excluded.severity, evidence = excluded.evidence, updated_at = now()
           WHERE (a.end_ts, a.status, a.severity, a.evidence)
                 IS DISTINCT FROM (excluded.end_ts, excluded.status, excluded.severity,
                                   excluded.evidence)
           RETURNING (xmax = 0)"""
    )
    flags = [r[0] for r in cur.fetchall()]
    return sum(flags), len(flags) - sum(flags)


def delete_alerts_except(
    cur: psycopg.Cursor, code: str, subject_ids: Sequence[str], keep: pl.DataFrame
) -> int:
    """Delete stored ``code`` alerts of ``subject_ids`` that are not in ``keep`` (an ALERTS frame):
    for detectors that recompute a subject's whole episode history from stored results."""
    if not subject_ids:
        return 0
    kept = keep.filter(pl.col("code") == code)
    cur.execute(
        """DELETE FROM alerts a
           WHERE a.code = %s AND a.subject_id = ANY(%s)
             AND NOT EXISTS (
                 SELECT 1 FROM unnest(%s::text[], %s::timestamptz[]) AS k(subject_id, start_ts)
                 WHERE k.subject_id = a.subject_id AND k.start_ts = a.start_ts)""",
        (
            code,
            list(subject_ids),
            kept["subject_id"].to_list(),
            kept["start_ts"].to_list(),
        ),
    )
    return cur.rowcount


def write_marks(cur: psycopg.Cursor, flow: str, units: pl.DataFrame, as_of: datetime) -> int:
    """Record that ``units`` (``subject_id, day, inputs``) of ``flow`` were computed now, from
    data up to ``as_of``."""
    if units.height == 0:
        return 0
    cur.execute(
        """INSERT INTO analysis_marks (flow, subject_id, day, computed_at, as_of, inputs)
           SELECT %s, s, d, now(), %s, i
           FROM unnest(%s::text[], %s::date[], %s::text[]) AS u(s, d, i)
           ON CONFLICT (flow, subject_id, day) DO UPDATE SET
               computed_at = excluded.computed_at, as_of = excluded.as_of,
               inputs = excluded.inputs""",
        (
            flow,
            as_of,
            units["subject_id"].to_list(),
            units["day"].to_list(),
            units["inputs"].to_list(),
        ),
    )
    return cur.rowcount
