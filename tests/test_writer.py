"""The COPY write path on its own: partitions, dedup, conflicts."""

from datetime import UTC, datetime

import psycopg
import pytest

from ingest.validate import Rejection
from ingest.writer import Batch, BatchWriter, CopyStream


def _batch(ch: int, *days: datetime) -> Batch:
    return Batch(
        channel_ids=[ch] * len(days),
        ts=[d.timestamp() for d in days],
        values=[1.0] * len(days),
        quality=[0] * len(days),
    )


def test_weekend_then_weekday_of_the_same_partition(db_url):
    """Partitions start on Mondays; a Saturday batch must not hide the next week's partition."""
    with psycopg.connect(db_url) as conn:
        ch = conn.execute("SELECT id FROM channels WHERE device_id = 'AQN00001'").fetchone()[0]
        writer = BatchWriter(conn)
        sat = writer.write(_batch(ch, datetime(2026, 10, 10, 12, tzinfo=UTC)))
        mon = writer.write(_batch(ch, datetime(2026, 10, 12, 12, tzinfo=UTC)))
        assert (sat.inserted, mon.inserted) == (1, 1)
        assert conn.execute("SELECT count(*) FROM readings").fetchone() == (2,)


def test_duplicates_conflicts_and_quarantine_in_one_transaction(db_url):
    t = datetime(2026, 1, 5, tzinfo=UTC)
    with psycopg.connect(db_url) as conn:
        ch = conn.execute("SELECT id FROM channels WHERE device_id = 'AQN00001'").fetchone()[0]
        writer = BatchWriter(conn)
        first = writer.write(_batch(ch, t))
        again = _batch(ch, t, t)
        again.values = [1.0, 2.0]  # one plain duplicate, one with another value
        again.rejections = [("test", "addr", Rejection("MALFORMED", "x", None, b"raw"))]
        second = writer.write(again)
        reasons = sorted(r[0] for r in conn.execute("SELECT reason FROM quarantine"))
        days = conn.execute("SELECT day FROM ingest_days WHERE channel_id = %s", (ch,)).fetchall()
    assert first.inserted == 1
    assert (second.inserted, second.duplicates) == (0, 1)
    assert second.quarantined == {"CONFLICTING_DUPLICATE": 1, "MALFORMED": 1}
    assert reasons == ["CONFLICTING_DUPLICATE", "MALFORMED"]
    assert [d[0].isoformat() for d in days] == ["2026-01-05"]


def _stream_into(conn: psycopg.Connection, writer: BatchWriter, parts: list[Batch]) -> int:
    stream = CopyStream(writer)
    for part in parts:
        stream.add(part.channel_ids, part.ts, part.values, part.quality)
        stream.flush()
    return stream.commit([]).inserted


def test_stream_crossing_into_weeks_without_partitions(db_url):
    """A new week mid-stream ends the COPY, creates the partition and carries on in one commit."""
    weeks = [datetime(2027, 3, 1 + 7 * k, 6, tzinfo=UTC) for k in range(4)]
    with psycopg.connect(db_url) as conn:
        ch = conn.execute("SELECT id FROM channels WHERE device_id = 'AQN00001'").fetchone()[0]
        writer = BatchWriter(conn)
        inserted = _stream_into(conn, writer, [_batch(ch, w) for w in weeks])
        stored = conn.execute("SELECT ts FROM readings ORDER BY ts").fetchall()
        marked = conn.execute("SELECT count(*) FROM ingest_days").fetchone()
    assert inserted == 4
    assert [r[0] for r in stored] == weeks
    assert marked == (4,)


def test_stream_meeting_stored_rows_rolls_back_whole(db_url):
    """A redelivered row fails the streamed COPY at its end: nothing of that transaction stays,
    and the pipeline writes the frames again through the de-duplicating path."""
    t = datetime(2026, 2, 2, tzinfo=UTC)
    with psycopg.connect(db_url) as conn:
        ch = conn.execute("SELECT id FROM channels WHERE device_id = 'AQN00001'").fetchone()[0]
        conn.commit()  # the pipeline's connection is idle between batches; so is this one
        writer = BatchWriter(conn)
        writer.write(_batch(ch, t))
        stream = CopyStream(writer)
        fresh = _batch(ch, datetime(2026, 2, 3, tzinfo=UTC))
        again = _batch(ch, t)
        for part in (fresh, again):
            stream.add(part.channel_ids, part.ts, part.values, part.quality)
            stream.flush()
        with pytest.raises(psycopg.errors.UniqueViolation):
            stream.commit([])
        stream.abort()
        assert conn.execute("SELECT count(*) FROM readings").fetchone() == (1,)
        redo = writer.write(_batch(ch, datetime(2026, 2, 3, tzinfo=UTC), t))
        assert (redo.inserted, redo.duplicates) == (1, 1)
