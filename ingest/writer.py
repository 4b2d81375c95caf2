"""The write path: one transaction per batch. A batch is COPYed straight into readings inside a
savepoint; if any row already exists (redelivery), the savepoint rolls back and the batch goes
through a staging table and ``INSERT … ON CONFLICT DO NOTHING``, so redelivered data stores
nothing twice and live data pays no de-duplication toll.

Quarantine rows go through a staging table of their own and ``INSERT … ON CONFLICT (digest) DO
UPDATE`` (migration 0015): the same rejected input again (a redelivered poison message, a device
retrying its bad frame) adds to its row's ``occurrences`` instead of adding a row, race-free
across ingest workers, and never fails the batch.

The binary COPY stream is built with numpy in one go instead of row by row in Python: with it the
server, not the client, is what limits throughput (see BENCHMARKS.md).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
import psycopg

from ingest.quarantine import quarantine_row
from ingest.validate import CONFLICTING_DUPLICATE, Rejection
from sql.copy_format import COPY_HEADER, COPY_TRAILER, PG_EPOCH_S, READING_ROW

_PARTITION_ORIGIN_US = 2 * 86_400_000_000  # Monday 2000-01-03, microseconds after the PG epoch

STAGING_DDL = (
    "CREATE TEMP TABLE IF NOT EXISTS aq_staging "
    "(channel_id integer, ts timestamptz, value double precision, quality smallint) "
    "ON COMMIT DELETE ROWS"
)


COPY_READINGS = "COPY readings (channel_id, ts, value, quality) FROM STDIN (FORMAT BINARY)"

QUARANTINE_STAGING_DDL = (
    "CREATE TEMP TABLE IF NOT EXISTS aq_quarantine_staging "
    "(ord integer, source text, address text, device_id text, reason text, detail text, "
    "raw bytea, occurrences bigint) ON COMMIT DELETE ROWS"
)

# On a repeat: count it, keep the first received_at, move last_received_at.
_ON_REPEAT = (
    "ON CONFLICT (digest) DO UPDATE SET "
    "occurrences = quarantine.occurrences + EXCLUDED.occurrences, "
    "last_received_at = greatest(quarantine.last_received_at, EXCLUDED.last_received_at) "
    "RETURNING digest, occurrences"
)

# The staged rows (one per identity: the writer folded a batch's repeats into ``occurrences``)
# upserted in the order they arrived, so ids keep following arrival; answers the ``ord`` of each
# staged row whose identity was already stored. DISTINCT ON guards the upsert, which may not
# touch one row twice, whatever reached the stage. Two workers upserting the same two new
# identities in opposite orders at once would deadlock: PostgreSQL detects it, and the pipeline
# retries the batch (DeadlockDetected is an OperationalError).
UPSERT_QUARANTINE = (
    "WITH src AS ("
    "  SELECT DISTINCT ON (digest) *, sum(occurrences) OVER (PARTITION BY digest) AS n"
    "  FROM (SELECT s.*, aq_quarantine_digest(s.source, s.address, s.device_id, s.reason,"
    "                                         s.detail, s.raw) AS digest"
    "        FROM aq_quarantine_staging s) d"
    "  ORDER BY digest, ord"
    "), up AS ("
    "  INSERT INTO quarantine (source, address, device_id, reason, detail, raw, occurrences)"
    "  SELECT source, address, device_id, reason, detail, raw, n FROM src ORDER BY ord "
    f"  {_ON_REPEAT}"
    ") "
    "SELECT src.ord FROM src JOIN up USING (digest) WHERE up.occurrences > src.n"
)

# Redelivered readings whose value differs from the stored one: one CONFLICTING_DUPLICATE row per
# distinct (reading, stored value), ``n`` the times the batch held it. Answers the readings that
# made new rows and those that repeated a stored row (or an earlier reading of the batch).
UPSERT_CONFLICTS = (
    "WITH found AS ("
    "  SELECT c.device_id,"
    "    format('channel %%s at %%s: stored %%s, received %%s',"
    "           s.channel_id, s.ts, r.value, s.value) AS detail,"
    "    convert_to(json_build_object('channel_id', s.channel_id, 'ts', s.ts,"
    "      'value', s.value, 'quality', s.quality)::text, 'UTF8') AS raw,"
    "    count(*) AS n"
    "  FROM aq_staging s JOIN readings r ON r.channel_id = s.channel_id AND r.ts = s.ts"
    "  JOIN channels c ON c.id = s.channel_id"
    "  WHERE r.value IS DISTINCT FROM s.value"
    "  GROUP BY 1, 2, 3"
    "), src AS ("
    "  SELECT *, aq_quarantine_digest('ingest', '', device_id, %(reason)s, detail, raw) AS digest"
    "  FROM found"
    "), up AS ("
    "  INSERT INTO quarantine (source, device_id, reason, detail, raw, occurrences)"
    "  SELECT 'ingest', device_id, %(reason)s, detail, raw, n FROM src ORDER BY digest "
    f"  {_ON_REPEAT}"
    ") "
    "SELECT coalesce(sum(CASE WHEN up.occurrences = src.n THEN 1 ELSE 0 END), 0)::bigint,"
    "       coalesce(sum(CASE WHEN up.occurrences = src.n THEN src.n - 1 ELSE src.n END), 0)"
    "         ::bigint "
    "FROM src JOIN up USING (digest)"
)


def copy_binary(
    channel_ids: np.ndarray, ts_us: np.ndarray, values: np.ndarray, quality: np.ndarray
) -> bytes:
    """PostgreSQL binary COPY stream for (integer, timestamptz, float8, smallint) rows.

    ``ts_us`` are microseconds since the PostgreSQL epoch (2000-01-01 UTC).
    """
    return COPY_HEADER + copy_rows(channel_ids, ts_us, values, quality) + COPY_TRAILER


def copy_rows(
    channel_ids: np.ndarray, ts_us: np.ndarray, values: np.ndarray, quality: np.ndarray
) -> bytes:
    """The rows of a binary COPY stream, without its header and trailer."""
    rows = np.empty(len(channel_ids), dtype=READING_ROW)
    rows["nfields"] = 4
    rows["l_ch"] = 4
    rows["ch"] = channel_ids
    rows["l_ts"] = 8
    rows["ts"] = ts_us
    rows["l_v"] = 8
    rows["v"] = values
    rows["l_q"] = 2
    rows["q"] = quality
    return rows.tobytes()


def epoch_to_pg_us(ts: np.ndarray) -> np.ndarray:
    return np.rint((ts - PG_EPOCH_S) * 1e6).astype(np.int64)


def day_keys(ch: np.ndarray, ts_us: np.ndarray) -> np.ndarray:
    """(channel, UTC day since 1970) packed in one int64, for ingest_days."""
    return (ch.astype(np.int64) << 24) | (ts_us // 86_400_000_000 + 10_957)


@dataclass
class Batch:
    channel_ids: list[int] = field(default_factory=list)
    ts: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    quality: list[int] = field(default_factory=list)
    rejections: list[tuple[str, str, Rejection]] = field(default_factory=list)  # source, address

    def __len__(self) -> int:
        return len(self.channel_ids)


@dataclass
class WriteResult:
    """What one committed batch did, in readings. ``quarantined``: readings of rejected input
    that made a new quarantine row, by reason; ``quarantine_repeats``: readings of rejected input
    identical to a row already stored (or to an earlier one of the batch), which only added to
    that row's ``occurrences``. Like ``inserted`` and ``duplicates`` for readings, the two never
    overlap, so ``quarantined`` follows the rows of the quarantine table."""

    inserted: int = 0
    duplicates: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    quarantine_repeats: dict[str, int] = field(default_factory=dict)


class BatchWriter:
    """Writes batches on one connection. Call from one thread; every call is one transaction."""

    def __init__(
        self, conn: psycopg.Connection, *, mark_days: bool = True, careful_batches: int = 20
    ) -> None:
        self.conn = conn
        self.mark_days = mark_days
        self.careful_batches = careful_batches
        self._careful_left = 0
        # What is known to exist in the database. Only committed knowledge lives here: what the
        # open transaction created (partitions, the staging table) is held apart in ``_tx_*``
        # and merged by :meth:`committed`, or forgotten by :meth:`rolled_back` — a rolled-back
        # CREATE leaves nothing behind, and a cache that believed otherwise would make every
        # later write fail ("no partition of relation found").
        self._weeks: set[int] = set()
        self._tx_weeks: set[int] = set()
        self._width_us: int | None = None
        self._staging_ready = False
        self._tx_staging = False
        self._qstaging_ready = False
        self._tx_qstaging = False

    def _partition_width_us(self) -> int:
        """Partition width as aq_ensure_partitions uses it (plain backend), cached."""
        if self._width_us is None:
            days = 7  # TimescaleDB: chunks are its own business; any width works here
            exists = self.conn.execute(
                "SELECT to_regclass('readings_partitioning') IS NOT NULL"
            ).fetchone()
            if exists and exists[0]:
                row = self.conn.execute(
                    "SELECT interval_days FROM readings_partitioning"
                ).fetchone()
                days = int(row[0]) if row else days
            self._width_us = days * 86_400_000_000
        return self._width_us

    def _missing_weeks(self, ts_us: np.ndarray) -> list[int]:
        # Buckets aligned on Monday 2000-01-03, as aq_ensure_partitions aligns them: the PG epoch
        # (2000-01-01) is a Saturday, and a week counted from it would straddle two partitions.
        width = self._partition_width_us()
        lo = int((int(ts_us.min()) - _PARTITION_ORIGIN_US) // width)
        hi = int((int(ts_us.max()) - _PARTITION_ORIGIN_US) // width)
        if lo == hi:
            return [] if lo in self._weeks or lo in self._tx_weeks else [lo]
        weeks = np.unique((ts_us - _PARTITION_ORIGIN_US) // width)
        known = self._weeks | self._tx_weeks
        return [int(w) for w in weeks if int(w) not in known]

    def _ensure_partitions(self, ts_us: np.ndarray) -> None:
        """Create the partitions of exactly the weeks that hold rows, not the span between them.

        Why: one frame with a reading in 2000 and one today once made 1,399 weekly partitions
        (ingest stalled, planning slowed 40x). Consecutive missing weeks go in one call.
        """
        missing = self._missing_weeks(ts_us)
        if not missing:
            return
        width = self._partition_width_us()
        runs: list[tuple[int, int]] = []
        for w in sorted(missing):
            if runs and runs[-1][1] == w - 1:
                runs[-1] = (runs[-1][0], w)
            else:
                runs.append((w, w))
        starts = [(lo * width + _PARTITION_ORIGIN_US) / 1e6 + PG_EPOCH_S for lo, _ in runs]
        ends = [(hi * width + _PARTITION_ORIGIN_US) / 1e6 + PG_EPOCH_S for _, hi in runs]
        self.conn.execute(
            "SELECT sum(aq_ensure_partitions(to_timestamp(a), to_timestamp(b))) "
            "FROM unnest(%s::float8[], %s::float8[]) AS u(a, b)",
            (starts, ends),
        )
        self._tx_weeks.update(missing)

    def committed(self) -> None:
        """The open transaction committed: what it created exists from now on."""
        self._weeks |= self._tx_weeks
        self._tx_weeks.clear()
        self._staging_ready = self._staging_ready or self._tx_staging
        self._tx_staging = False
        self._qstaging_ready = self._qstaging_ready or self._tx_qstaging
        self._tx_qstaging = False

    def rolled_back(self) -> None:
        """The open transaction rolled back: forget what it created."""
        self._tx_weeks.clear()
        self._tx_staging = False
        self._tx_qstaging = False

    def write(self, batch: Batch) -> WriteResult:
        result = WriteResult()
        conn = self.conn
        try:
            with conn.transaction():
                if len(batch):
                    self._write_readings(batch, result)
                if batch.rejections:
                    self._write_quarantine(batch.rejections, result)
        except BaseException:
            self.rolled_back()
            raise
        self.committed()
        return result

    def _write_readings(self, batch: Batch, result: WriteResult) -> None:
        conn = self.conn
        ch = np.asarray(batch.channel_ids, dtype=np.int32)
        ts_us = epoch_to_pg_us(np.asarray(batch.ts, dtype=np.float64))
        vals = np.asarray(batch.values, dtype=np.float64)
        qual = np.asarray(batch.quality, dtype=np.int16)
        self._ensure_partitions(ts_us)
        stream = copy_binary(ch, ts_us, vals, qual)
        with conn.cursor() as cur:
            if not self._copy_direct(cur, stream):
                self._copy_deduplicated(cur, stream, len(ch), result)
            else:
                result.inserted = len(ch)
            if self.mark_days and result.inserted:
                self._mark_days(cur, day_keys(ch, ts_us))

    def _mark_days(self, cur: psycopg.Cursor, keys: np.ndarray) -> None:
        """Record which channel-days received data, so flows recompute exactly those."""
        keys = np.unique(keys)
        cur.execute(
            "INSERT INTO ingest_days (channel_id, day, updated_at) "
            "SELECT c, date '1970-01-01' + d, now() "
            "FROM unnest(%s::int[], %s::int[]) AS u(c, d) "
            "ON CONFLICT (channel_id, day) DO UPDATE SET updated_at = excluded.updated_at",
            ((keys >> 24).tolist(), (keys & 0xFFFFFF).tolist()),
        )

    @property
    def careful(self) -> bool:
        """True while recent batches repeated stored rows: write through staging directly."""
        return self._careful_left > 0

    def note_duplicates(self) -> None:
        """A streamed batch hit stored rows: the next batches take the de-duplicating path."""
        self._careful_left = self.careful_batches

    def _copy_direct(self, cur: psycopg.Cursor, stream: bytes) -> bool:
        """Optimistic path: COPY straight into readings inside a savepoint.

        Live traffic rarely repeats itself, and a plain COPY is the fastest way in (the staging
        round trip costs about half the throughput). A unique violation rolls the savepoint back
        and the batch takes the de-duplicating path; after one, the next ``_careful_batches``
        batches go that way directly, since redeliveries come in bursts (replays, reconnects).
        """
        if self._careful_left > 0:
            self._careful_left -= 1
            return False
        try:
            with self.conn.transaction():
                with cur.copy(COPY_READINGS) as copy:
                    copy.write(stream)
        except psycopg.errors.UniqueViolation:
            self._careful_left = self.careful_batches
            return False
        return True

    def _copy_deduplicated(
        self, cur: psycopg.Cursor, stream: bytes, n: int, result: WriteResult
    ) -> None:
        """COPY into a temp staging table, then ``INSERT … ON CONFLICT DO NOTHING``."""
        if not (self._staging_ready or self._tx_staging):
            self.conn.execute(STAGING_DDL)
            self._tx_staging = True
        with cur.copy(
            "COPY aq_staging (channel_id, ts, value, quality) FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.write(stream)
        cur.execute(
            "INSERT INTO readings (channel_id, ts, value, quality) "
            "SELECT channel_id, ts, value, quality FROM aq_staging "
            "ON CONFLICT (channel_id, ts) DO NOTHING"
        )
        result.inserted = cur.rowcount
        result.duplicates = n - cur.rowcount
        if result.duplicates:
            self._quarantine_conflicts(cur, result)

    def _quarantine_conflicts(self, cur: psycopg.Cursor, result: WriteResult) -> None:
        """A redelivered reading with the same value is a plain duplicate; with another value it
        is a conflict worth a person's look: the stored value stays, the new one is quarantined
        (once: the same conflict again adds to its row's ``occurrences``)."""
        cur.execute(UPSERT_CONFLICTS, {"reason": CONFLICTING_DUPLICATE})
        row = cur.fetchone()
        fresh, repeats = (int(row[0]), int(row[1])) if row else (0, 0)
        if fresh:
            _add(result.quarantined, CONFLICTING_DUPLICATE, fresh)
        if repeats:
            _add(result.quarantine_repeats, CONFLICTING_DUPLICATE, repeats)
        result.duplicates -= fresh + repeats

    def _write_quarantine(
        self, rejections: list[tuple[str, str, Rejection]], result: WriteResult
    ) -> None:
        """Upsert the rejections, each made safe to store first (:func:`quarantine_row`): the
        quarantine is the place of last resort, so its write must not fail on content, and a
        rejection identical to a stored row (or to an earlier one of the batch) only adds to
        that row's ``occurrences``."""
        rows, members = fold_quarantine_rows(rejections)
        if not (self._qstaging_ready or self._tx_qstaging):
            self.conn.execute(QUARANTINE_STAGING_DDL)
            self._tx_qstaging = True
        with self.conn.cursor() as cur:
            with cur.copy(
                "COPY aq_quarantine_staging "
                "(ord, source, address, device_id, reason, detail, raw, occurrences) FROM STDIN"
            ) as copy:
                for ord_, row in enumerate(rows):
                    copy.write_row((ord_, *row, len(members[ord_])))
            cur.execute(UPSERT_QUARANTINE)
            stored = {int(r[0]) for r in cur.fetchall()}
            # Emptied at commit anyway; a second call in one transaction must not count them again.
            cur.execute("DELETE FROM aq_quarantine_staging")
        for ord_, readings in enumerate(members):
            reason = rows[ord_][3]
            first, *again = readings
            if ord_ in stored:
                _add(result.quarantine_repeats, reason, first)
            else:
                _add(result.quarantined, reason, first)
            for n in again:
                _add(result.quarantine_repeats, reason, n)


QuarantineRow = tuple[str, str, str | None, str, str, bytes | None]


def fold_quarantine_rows(
    rejections: list[tuple[str, str, Rejection]],
) -> tuple[list[QuarantineRow], list[list[int]]]:
    """The distinct quarantine rows of ``rejections`` (made safe by :func:`quarantine_row`), in
    first-seen order, and for each the readings of every rejection that makes it (first first).
    Distinct as migration 0015's digest tells them apart: the detail counts only without raw
    bytes, and the first one's detail is kept.

    Why: an upsert may not touch one row twice in a statement, and a batch can hold the same
    input twice (a message redelivered before the first copy was acknowledged)."""
    index: dict[QuarantineRow, int] = {}
    rows: list[QuarantineRow] = []
    members: list[list[int]] = []
    for source, address, rej in rejections:
        row = quarantine_row(source, address, rej)
        key = row if row[5] is None else (*row[:4], "", row[5])  # as aq_quarantine_digest
        i = index.get(key)
        if i is None:
            index[key] = len(rows)
            rows.append(row)
            members.append([rej.readings])
        else:
            members[i].append(rej.readings)
    return rows, members


def _add(counts: dict[str, int], reason: str, n: int) -> None:
    counts[reason] = counts.get(reason, 0) + n


class CopyStream:
    """One transaction whose readings flow into a COPY while later frames are still arriving.

    Why: a batch written only once it is complete leaves the server idle while Python decodes,
    and Python idle while the server inserts. Streaming the rows as they come overlaps the two,
    the way a single raw COPY does, and halves the time per reading (BENCHMARKS.md). The frames
    stay with the caller until :meth:`commit`: if the COPY meets a stored row (a redelivery, seen
    only when the COPY ends) or anything else fails, the caller rolls back with :meth:`abort` and
    writes the same frames through :meth:`BatchWriter.write`, which de-duplicates.
    """

    def __init__(self, writer: BatchWriter) -> None:
        self._w = writer
        self._cur = writer.conn.cursor()
        self._copy: psycopg.Copy | None = None
        self._copy_cm = ExitStack()
        self._pending = Batch()
        self._keys: list[np.ndarray] = []
        self.rows = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(
        self, channel_ids: list[int], ts: list[float], values: list[float], q: list[int]
    ) -> None:
        p = self._pending
        p.channel_ids.extend(channel_ids)
        p.ts.extend(ts)
        p.values.extend(values)
        p.quality.extend(q)

    def flush(self) -> None:
        """Send the pending rows to the server (which inserts them while we go on)."""
        p = self._pending
        if not len(p):
            return
        ch = np.asarray(p.channel_ids, dtype=np.int32)
        ts_us = epoch_to_pg_us(np.asarray(p.ts, dtype=np.float64))
        vals = np.asarray(p.values, dtype=np.float64)
        qual = np.asarray(p.quality, dtype=np.int16)
        self._pending = Batch()
        if self._w._missing_weeks(ts_us):
            self._end_copy()  # no other statement may run inside a COPY
            self._w._ensure_partitions(ts_us)
        if self._copy is None:
            # Cursor.copy is a context manager spanning calls here: ExitStack holds it open.
            self._copy = self._copy_cm.enter_context(self._cur.copy(COPY_READINGS))
            self._copy.write(COPY_HEADER)
        self._copy.write(copy_rows(ch, ts_us, vals, qual))
        self.rows += len(ch)
        if self._w.mark_days:
            self._keys.append(day_keys(ch, ts_us))

    def _end_copy(self) -> None:
        if self._copy is not None:
            copy, self._copy = self._copy, None
            copy.write(COPY_TRAILER)
            self._copy_cm.close()  # waits for the server; raises on a unique violation

    def commit(self, rejections: list[tuple[str, str, Rejection]]) -> WriteResult:
        """End the COPY, mark ingest days, quarantine the rejections, commit."""
        self.flush()
        self._end_copy()
        result = WriteResult(inserted=self.rows)
        if self._keys:
            self._w._mark_days(self._cur, np.concatenate(self._keys))
        if rejections:
            self._w._write_quarantine(rejections, result)
        self._w.conn.commit()
        self._w.committed()
        self._cur.close()
        return result

    def abort(self) -> None:
        """Give the transaction up; the caller writes its frames another way."""
        copy, self._copy = self._copy, None
        try:
            if copy is not None:
                err = RuntimeError("aborted")
                self._copy_cm.__exit__(type(err), err, None)  # sends CopyFail
        except (psycopg.Error, RuntimeError):
            pass
        finally:
            self._w.rolled_back()
            try:
                self._w.conn.rollback()
            except psycopg.Error:
                pass
