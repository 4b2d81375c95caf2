"""The COPY write path on its own: partitions, dedup, conflicts."""

from datetime import UTC, datetime

import psycopg

from ingest.validate import Rejection
from ingest.writer import Batch, BatchWriter


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
