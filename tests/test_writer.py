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


def _quarantine(conn: psycopg.Connection) -> dict[tuple, tuple[int, bool]]:
    """(source, address, device_id, reason, detail, raw) → (occurrences, repeated later)."""
    rows = conn.execute(
        "SELECT source, address, device_id, reason, detail, raw, occurrences, "
        "last_received_at > received_at FROM quarantine"
    ).fetchall()
    return {
        (s, a, d, r, t, bytes(raw) if raw is not None else None): (n, later)
        for s, a, d, r, t, raw, n, later in rows
    }


def test_the_same_rejected_input_again_is_one_row_counted(db_url):
    """A redelivered bad message (or a device retrying its bad frame) adds to its row's
    occurrences instead of a second row, in the batch write and in the streamed one, and
    within one batch, even when its detail differs (a detail measured against the time of
    receipt); another raw, reason or topic is another row, and so is another detail of input
    without raw bytes; the good readings of both batches are all stored."""
    topic = "aquameter/v1/aqualink/AQN00001/up"
    bad = Rejection("MALFORMED", "cannot parse", "AQN00001", b"\xff\x00bad")
    other_raw = Rejection("MALFORMED", "cannot parse", "AQN00001", b"\xff\x00bae")
    other_reason = Rejection("UNKNOWN_DEVICE", "cannot parse", "AQN00001", b"\xff\x00bad")
    other_detail = Rejection("MALFORMED", "cannot parse!", "AQN00001", b"\xff\x00bad")
    no_device = Rejection("MALFORMED", "cannot parse", None, b"\xff\x00bad")
    no_raw = Rejection("PROCESSING_ERROR", "boom", "AQN00001", None)
    no_raw_other_detail = Rejection("PROCESSING_ERROR", "bang", "AQN00001", None)
    with psycopg.connect(db_url) as conn:
        ch = conn.execute("SELECT id FROM channels WHERE device_id = 'AQN00001'").fetchone()[0]
        conn.commit()
        writer = BatchWriter(conn)
        first = _batch(ch, datetime(2026, 3, 2, 1, tzinfo=UTC), datetime(2026, 3, 2, 2, tzinfo=UTC))
        first.rejections = [("mqtt", topic, bad), ("mqtt", topic, bad)]  # twice in one batch
        one = writer.write(first)
        stream = CopyStream(writer)
        t3 = datetime(2026, 3, 2, 3, tzinfo=UTC).timestamp()
        stream.add([ch], [t3], [3.0], [0])
        two = stream.commit(
            [
                ("mqtt", topic, bad),
                ("mqtt", topic, other_raw),
                ("mqtt", topic, other_reason),
                ("mqtt", topic, other_detail),
                ("mqtt", topic, no_device),
                ("mqtt", topic + "x", bad),
                ("mqtt", topic, no_raw),
                ("mqtt", topic, no_raw_other_detail),
                ("mqtt", topic, no_raw),
            ]
        )
        rows = _quarantine(conn)
        readings = conn.execute("SELECT count(*) FROM readings").fetchone()
    assert (one.inserted, one.quarantined, one.quarantine_repeats) == (
        2,
        {"MALFORMED": 1},
        {"MALFORMED": 1},
    )
    assert (two.inserted, two.quarantined, two.quarantine_repeats) == (
        1,
        {"MALFORMED": 3, "UNKNOWN_DEVICE": 1, "PROCESSING_ERROR": 2},
        {"MALFORMED": 2, "PROCESSING_ERROR": 1},
    )
    assert readings == (3,)
    key = ("mqtt", topic, "AQN00001", "MALFORMED", "cannot parse", b"\xff\x00bad")
    assert rows.pop(key) == (4, True)  # the first time, again later, and with another detail
    assert rows.pop(("mqtt", topic, "AQN00001", "PROCESSING_ERROR", "boom", None)) == (2, False)
    assert sorted(rows.values()) == [(1, False)] * 5


def test_a_conflicting_redelivery_again_is_one_row_counted(db_url):
    """A reading redelivered with another value than the stored one is one CONFLICTING_DUPLICATE
    row, however often it comes: twice in one batch (two redeliveries queued together) and once
    more later."""
    t = datetime(2026, 1, 12, tzinfo=UTC)
    with psycopg.connect(db_url) as conn:
        ch = conn.execute("SELECT id FROM channels WHERE device_id = 'AQN00001'").fetchone()[0]
        conn.commit()  # idle between batches, as the pipeline's: each write commits
        writer = BatchWriter(conn)
        writer.write(_batch(ch, t))
        twice = _batch(ch, t, t)
        twice.values = [2.0, 2.0]
        second = writer.write(twice)
        once = _batch(ch, t)
        once.values = [2.0]
        third = writer.write(once)
        rows = conn.execute(
            "SELECT reason, occurrences FROM quarantine WHERE reason = 'CONFLICTING_DUPLICATE'"
        ).fetchall()
        stored = conn.execute("SELECT value FROM readings").fetchall()
    assert (second.inserted, second.duplicates) == (0, 0)
    assert (second.quarantined, second.quarantine_repeats) == (
        {"CONFLICTING_DUPLICATE": 1},
        {"CONFLICTING_DUPLICATE": 1},
    )
    assert (third.quarantined, third.quarantine_repeats) == ({}, {"CONFLICTING_DUPLICATE": 1})
    assert rows == [("CONFLICTING_DUPLICATE", 3)]
    assert stored == [(1.0,)]
