"""The ingest poison contract against a real PostgreSQL: no frame stops, wedges or poisons ingest.

Each test pins one way a single input or fault once broke ingest (issue 8's numbered cases)."""

from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import polars as pl
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.importer import import_file
from ingest.pipeline import IngestPipeline
from ingest.quarantine import quarantine_row
from ingest.validate import Rejection
from ingest.writer import Batch, BatchWriter, CopyStream
from protocols.uplink import Frame, FrameOutcome, Quality, Uplink

NOW = time.time()


def _json(obj: object) -> bytes:
    return json.dumps(obj).encode()


def _frame(obj: object, device: str = "AQN00001", **kw: object) -> Frame:
    return Frame(
        source="mqtt",
        address=f"aquameter/v1/aqualink/{device}/up",
        payload=obj if isinstance(obj, bytes) else _json(obj),
        payload_format="json",
        device_hint=device,
        **kw,  # type: ignore[arg-type]
    )


def _rows(url: str, sql: str, *args: object) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, args).fetchall()


def _reasons(url: str) -> dict[str, int]:
    return dict(_rows(url, "SELECT reason, count(*) FROM quarantine GROUP BY reason"))


# --- 2: the quarantine write cannot fail on content ------------------------------------------
_text = st.text(alphabet=st.characters(codec=None, min_codepoint=0), max_size=300) | st.binary(
    max_size=100
).map(lambda b: b.decode("utf-8", "surrogateescape"))


_rejection = st.tuples(
    _text,  # source
    _text,  # address
    st.builds(
        Rejection,
        reason=_text,
        detail=_text,
        device=st.none() | _text,
        raw=st.none() | st.binary(max_size=2_000),
    ),
)


def _identity(row: tuple) -> tuple:
    """A quarantine row's identity as migration 0015's digest has it: the detail counts only
    for a row without raw bytes."""
    return row if row[5] is None else (*row[:4], "", row[5])


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rejections=st.lists(_rejection, min_size=1, max_size=4),
    again=st.lists(st.integers(min_value=0, max_value=99), max_size=4),
    split=st.integers(min_value=0, max_value=8),
)
def test_quarantine_writer_stores_any_content(db_url, rejections, again, split):
    """Any text (NUL, lone surrogates, control characters) and any bytes, some rows repeated
    (within a batch and across two), beside a good reading in each batch: nothing fails, and the
    quarantine holds one row per distinct identity, as made safe to store, whose occurrences
    count how often it came; the counters split new rows from repeats."""
    rows = rejections + [rejections[k % len(rejections)] for k in again]
    cut = split % (len(rows) + 1)
    made = [quarantine_row(s, a, r) for s, a, r in rows]
    expected = Counter(_identity(row) for row in made)
    first_detail: dict[tuple, str] = {}
    for row in made:
        first_detail.setdefault(_identity(row), row[4])
    results = []
    with psycopg.connect(db_url) as conn:
        conn.execute("DELETE FROM quarantine")
        conn.execute("DELETE FROM readings")
        ch = conn.execute("SELECT id FROM channels WHERE device_id = 'AQN00001'").fetchone()[0]
        conn.commit()
        writer = BatchWriter(conn)
        for k, part in enumerate((rows[:cut], rows[cut:])):
            batch = Batch([ch], [NOW - 3_600 + k], [1.0 + k], [0], rejections=part)
            results.append(writer.write(batch))
        stored = conn.execute(
            "SELECT source, address, device_id, reason, detail, raw, occurrences FROM quarantine"
        ).fetchall()
        readings = conn.execute("SELECT count(*) FROM readings").fetchone()[0]
    got = {_identity((*r[:5], None if r[5] is None else bytes(r[5]))): r[6] for r in stored}
    assert len(stored) == len(got) == len(expected)
    assert got == dict(expected)
    kept = {_identity((*r[:5], None if r[5] is None else bytes(r[5]))): r[4] for r in stored}
    assert kept == first_detail  # a repeat keeps the first arrival's detail
    assert readings == 2 and [r.inserted for r in results] == [1, 1]
    new = sum(n for r in results for n in r.quarantined.values())
    repeats = sum(n for r in results for n in r.quarantine_repeats.values())
    assert (new, repeats) == (len(expected), len(rows) - len(expected))


def test_quarantine_row_cuts_long_fields_with_a_marker():
    row = quarantine_row(
        "s" * 100, "a" * 5_000, Rejection("R", "d" * 10_000, "\x00dev", b"x" * 10), 4
    )
    source, address, device, reason, detail, raw = row
    assert source.endswith("[cut 68 chars]") and address.endswith("[cut 4488 chars]")
    assert device == "\\x00dev" and reason == "R"
    assert "raw cut to the first 4 of 10 bytes" in detail and raw == b"xxxx"


def test_nul_in_address_neither_wedges_the_writer_nor_loses_later_frames(db_url):
    """Case 2: a frame whose address holds a NUL once wedged the writer for every protocol."""
    with IngestPipeline(db_url, registry_poll_s=None) as p:
        bad = Frame(source="coap", address="/up/AQN\x00\udcff", payload=b"\x00\xff garbage")
        good = _frame({"dev": "AQN00001", "ts": NOW - 60, "reg": 1.5})
        outcomes = p.submit_many([bad, good])
    assert [o.accepted for o in outcomes] == [0, 1]
    assert p.healthy()
    rows = _rows(db_url, "SELECT address, reason FROM quarantine")
    assert rows == [("/up/AQN\\x00\\udcff", "UNSUPPORTED_FORMAT")]
    assert _rows(db_url, "SELECT value FROM readings") == [(1.5,)]


def test_the_same_bad_frame_again_is_one_row_counted_through_the_pipeline(db_url):
    """A device retrying its bad frame, or the broker redelivering it, makes one quarantine row
    with occurrences 2, not two rows; another payload or reason is a row of its own; the good
    frames of both rounds are stored; the counters count the repeat apart from new rows."""
    bad = _frame(b"\xff\xfe garbage")
    other = _frame(b"\xff\xfe garbage!")  # another raw: another row
    unknown = _frame({"dev": "NO-SUCH", "ts": NOW - 60, "reg": 1.0}, device="NO-SUCH")
    with IngestPipeline(db_url, registry_poll_s=None) as p:
        first = p.submit_many([bad, _frame({"dev": "AQN00001", "ts": NOW - 120, "reg": 1.5})])
        again = p.submit_many(
            [bad, other, unknown, _frame({"dev": "AQN00001", "ts": NOW - 60, "reg": 1.6})]
        )
    assert [o.reasons for o in first + again].count(["MALFORMED"]) == 3
    rows = _rows(
        db_url,
        "SELECT reason, raw, occurrences, last_received_at > received_at FROM quarantine "
        "ORDER BY id",
    )
    assert [(r, bytes(raw), n, later) for r, raw, n, later in rows] == [
        ("MALFORMED", b"\xff\xfe garbage", 2, True),
        ("MALFORMED", b"\xff\xfe garbage!", 1, False),
        ("UNKNOWN_DEVICE", unknown.payload, 1, False),
    ]
    assert _rows(db_url, "SELECT value FROM readings ORDER BY ts") == [(1.5,), (1.6,)]
    assert p.counters.quarantined == {"MALFORMED": 2, "UNKNOWN_DEVICE": 1}
    assert p.counters.quarantine_repeats == {"MALFORMED": 1}
    assert "quarantined=3 (MALFORMED=2, UNKNOWN_DEVICE=1)" in p.counters.line()
    assert p.counters.line().endswith(" quarantine_repeats=1")


def test_a_redelivered_future_reading_is_one_row_though_its_detail_differs(db_url):
    """FUTURE_TIMESTAMP's detail says how far ahead of *receipt* the reading is, so the same
    message redelivered a minute later is judged with another detail; it is still the same input
    and one row (occurrences 2, the first arrival's detail), not two."""
    future = {"dev": "AQN00001", "ts": NOW + 30 * 86_400, "reg": 2.0}
    with IngestPipeline(db_url, registry_poll_s=None) as p:
        first = p.submit_many([_frame(future, received_at=NOW)])
        again = p.submit_many([_frame(future, received_at=NOW + 60)])
    assert [o.reasons for o in first + again] == [["FUTURE_TIMESTAMP"], ["FUTURE_TIMESTAMP"]]
    rows = _rows(db_url, "SELECT reason, detail, occurrences FROM quarantine")
    assert len(rows) == 1
    reason, detail, n = rows[0]
    assert (reason, n) == ("FUTURE_TIMESTAMP", 2)
    assert detail.endswith(f"is {30 * 86_400:.0f}s ahead")  # measured at the first arrival
    assert p.counters.quarantined == {"FUTURE_TIMESTAMP": 1}
    assert p.counters.quarantine_repeats == {"FUTURE_TIMESTAMP": 1}


# --- 3: a rolled-back batch must not leave the writer's caches believing what it undid ------
def _history(start: datetime, days: int, value0: float = 0.0) -> pl.DataFrame:
    ts = [start + timedelta(hours=h) for h in range(days * 24)]
    return pl.DataFrame(
        {
            "device": ["AQN00001"] * len(ts),
            "ts": [t.isoformat() for t in ts],
            "value": [value0 + i * 0.01 for i in range(len(ts))],
        }
    )


def test_overlapping_reimport_with_new_weeks_stores_every_new_reading(db_url, tmp_path):
    """Case 3: an import overlapping stored history plus two new weeks once stored 0 of 504 new
    readings: the streamed COPY made the new weeks' partitions, hit the stored rows, rolled back,
    and the writer still believed the partitions existed."""
    start = datetime(2026, 3, 2, tzinfo=UTC)  # a Monday
    first = tmp_path / "first.csv"
    _history(start, 14).write_csv(first)
    second = tmp_path / "second.csv"
    _history(start, 35).write_csv(second)  # the first two weeks again, plus three new ones
    with IngestPipeline(db_url, registry_poll_s=None) as p:
        a = import_file(first, p)
        b = import_file(second, p)
    assert (a.rows, a.accepted, a.quarantined) == (336, 336, 0)
    assert (b.rows, b.accepted, b.quarantined) == (840, 840, 0)
    assert (b.stored, b.duplicates, b.reasons) == (504, 336, {})
    assert _rows(db_url, "SELECT count(*), count(DISTINCT ts) FROM readings") == [(840, 840)]
    assert _reasons(db_url) == {}
    assert p.counters.stored == 840 and p.counters.duplicates == 336


def test_writer_forgets_partitions_a_rolled_back_stream_made(db_url):
    with psycopg.connect(db_url, autocommit=True) as conn:
        ch = conn.execute("SELECT id FROM channels WHERE device_id = 'AQN00001'").fetchone()[0]
        writer = BatchWriter(conn)
        old = datetime(2026, 2, 2, tzinfo=UTC).timestamp()
        writer.write(Batch([ch], [old], [1.0], [0]))
        new = datetime(2026, 5, 4, tzinfo=UTC).timestamp()
        stream = CopyStream(writer)
        stream.add([ch, ch], [new, old], [2.0, 1.0], [0, 0])  # new week, then a stored row
        stream.flush()
        with pytest.raises(psycopg.errors.UniqueViolation):
            stream.commit([])
        stream.abort()
        result = writer.write(Batch([ch, ch], [new, old], [2.0, 1.0], [0, 0]))
        assert (result.inserted, result.duplicates) == (1, 1)


# --- 4: values, time and status ----------------------------------------------------------------
def test_nan_anywhere_in_an_interval_list_is_quarantined_and_the_rest_stored(db_url):
    """Case 4: min/max skip a NaN that is not first, so the fast path once stored it."""
    t0 = NOW - 3_600
    frame = Frame(
        source="modbus",
        address="ps1",
        uplinks=[Uplink("INLET-NORTH", "flow", [t0, t0 + 60, t0 + 120], [1.0, math.nan, math.inf])],
    )
    bad_ts = Frame(
        source="modbus",
        address="ps1",
        uplinks=[Uplink("INLET-NORTH", "flow", [t0 + 180, math.nan], [1.0, 2.0])],
    )
    with IngestPipeline(db_url, registry_poll_s=None) as p:
        outcomes = p.submit_many([frame, bad_ts])
    assert [(o.accepted, o.quarantined) for o in outcomes] == [(1, 2), (1, 1)]
    assert _reasons(db_url) == {"NOT_A_NUMBER": 2, "MALFORMED": 1}
    assert _rows(db_url, "SELECT count(*) FROM readings WHERE value = 'NaN'") == [(0,)]


def test_device_status_never_sets_system_quality_bits(db_url):
    with IngestPipeline(db_url, registry_poll_s=None) as p:
        p.submit_many([_frame({"dev": "AQN00001", "ts": NOW - 60, "reg": 2.0, "status": 255})])
    [(q,)] = _rows(db_url, "SELECT quality FROM readings")
    assert q & ~0x0F == 0, "ESTIMATED/EDITED/BAD/UNCERTAIN must not come from a device"


def test_live_readings_far_behind_receipt_are_flagged_clock_skew_imports_are_not(db_url, tmp_path):
    old = NOW - 30 * 86_400
    with IngestPipeline(db_url, registry_poll_s=None) as p:
        p.submit_many([_frame({"dev": "AQN00001", "ts": old, "reg": 3.0})])
        csv = tmp_path / "h.csv"
        pl.DataFrame(
            {
                "device": ["AQN00002"],
                "ts": [datetime.fromtimestamp(old, UTC).isoformat()],
                "value": [4.0],
            }
        ).write_csv(csv)
        import_file(csv, p)
    rows = dict(
        _rows(
            db_url,
            "SELECT c.device_id, r.quality FROM readings r JOIN channels c ON c.id = r.channel_id",
        )
    )
    assert rows["AQN00001"] & Quality.CLOCK_SKEW
    assert rows["AQN00002"] == 0


def test_clock_skew_can_quarantine_instead(db_url):
    with IngestPipeline(db_url, registry_poll_s=None, clock_skew_action="quarantine") as p:
        [o] = p.submit_many([_frame({"dev": "AQN00001", "ts": NOW - 30 * 86_400, "reg": 3.0})])
    assert (o.accepted, o.reasons) == (0, ["CLOCK_SKEW"])


# --- 5: one frame may not make a thousand partitions -----------------------------------------
def _partitions(url: str) -> int:
    return _rows(url, "SELECT count(*) FROM pg_inherits WHERE inhparent = 'readings'::regclass")[0][
        0
    ]


def test_one_frame_spanning_decades_makes_no_partition_storm(db_url):
    """Case 5: a 71-byte message with readings in 2000 and 2026 once made 1,399 partitions."""
    if _rows(db_url, "SELECT backend FROM readings_backend")[0][0] != "plain":
        pytest.skip("partitions are TimescaleDB's own business there")
    before = _partitions(db_url)
    t2000 = datetime(2000, 6, 5, tzinfo=UTC).timestamp()
    live = Frame(
        source="mqtt",
        address="aquameter/v1/bulk-inlet/INLET-NORTH/up",
        uplinks=[Uplink("INLET-NORTH", "flow", [t2000, NOW - 60], [1.0, 2.0])],
    )
    history = Frame(
        source="import",
        address="legacy.csv",
        uplinks=[Uplink("INLET-NORTH", "flow", [t2000 + 3_600, NOW - 120], [1.0, 2.0])],
    )
    with IngestPipeline(db_url, registry_poll_s=None) as p:
        outcomes = p.submit_many([live, history])
    assert [o.reasons for o in outcomes] == [["OUTSIDE_WINDOW"], []]
    # the import may make the week of 2000 it really holds data for; nothing in between
    assert _partitions(db_url) - before <= 2
    assert _rows(db_url, "SELECT count(*) FROM readings") == [(3,)]


# --- 7: limits: payload bytes, readings per frame, rows per frame, queue bytes ---------------
def test_oversize_payload_keeps_its_first_bytes(db_url):
    payload = b'{"dev":"AQN00001","pad":"' + b"x" * 2_000_000 + b'"}'
    with IngestPipeline(db_url, registry_poll_s=None) as p:
        [o] = p.submit_many([_frame(payload)])
    assert o.reasons == ["OVERSIZE"]
    [(raw, detail)] = _rows(db_url, "SELECT raw, detail FROM quarantine")
    assert bytes(raw) == payload[:4096] and "2000027 bytes" in detail


def test_too_many_readings_is_one_row_holding_the_frame(db_url):
    doc = {"dev": "AQN00001", "t0": NOW - 86_400, "step": 1, "reg": [1.0] * 2_000}
    with IngestPipeline(db_url, registry_poll_s=None, max_readings_per_frame=1_000) as p:
        [o] = p.submit_many([_frame(doc)])
    assert (o.accepted, o.quarantined, o.reasons) == (0, 2_000, ["TOO_MANY_READINGS"])
    assert _rows(db_url, "SELECT count(*) FROM quarantine") == [(1,)]


def test_a_frame_of_bad_readings_makes_bounded_rows_and_counts_every_reading(db_url):
    """Case 7: one 1 MB message once made 100,000 quarantine rows."""
    doc = {"dev": "AQN00001", "t0": NOW - 86_400, "step": 1, "reg": [-5.0] * 5_000}
    with IngestPipeline(db_url, registry_poll_s=None) as p:
        [o] = p.submit_many([_frame(doc)])
    assert (o.accepted, o.quarantined) == (0, 5_000)
    rows = _rows(db_url, "SELECT reason, count(*) FROM quarantine GROUP BY reason")
    assert rows == [("OUT_OF_RANGE", 101)]
    assert p.counters.quarantined["OUT_OF_RANGE"] == 5_000


def test_queue_is_bounded_in_bytes_and_drains_when_the_database_returns(db_url):
    """Case 7: six 11 MB messages during an outage once took RSS from 79 MB to 742 MB. The
    writer is held by a lock on readings (a real stall); submits block once the bound is met."""
    frames = [
        _frame({"dev": f"AQN{i:05d}", "t0": NOW - 7_200, "step": 1, "reg": [1.0] * 3_000})
        for i in range(1, 41)
    ]
    submitted = 0
    done = threading.Semaphore(0)
    p = IngestPipeline(db_url, registry_poll_s=None, queue_bytes=1_048_576).start()
    locker = psycopg.connect(db_url)
    locker.execute("LOCK TABLE readings IN ACCESS EXCLUSIVE MODE")
    peak = 0

    def feed() -> None:
        nonlocal submitted
        for f in frames:
            p.submit(f, lambda _o: done.release())
            submitted += 1

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not p.saturated():
        time.sleep(0.05)
    for _ in range(20):
        peak = max(peak, p.queued_bytes)
        time.sleep(0.05)
    assert p.saturated(), "the byte bound was never reached"
    assert submitted < len(frames), "submit did not block"
    assert peak <= 1_048_576 + max(f.size for f in frames) + 40 * 3_000
    locker.rollback()
    locker.close()
    for _ in frames:
        assert done.acquire(timeout=60)
    p.close()
    assert _rows(db_url, "SELECT count(*) FROM readings") == [(120_000,)]
    assert p.queued_bytes == 0


# --- the poison contract: exceptions while validating or writing stay with their frame -------
def test_an_exception_while_validating_becomes_that_frames_row(db_url):
    broken = Frame(  # ts and values of different lengths: a transport bug, not the data's
        source="opcua", address="wq1", uplinks=[Uplink("INLET-NORTH", "flow", [NOW - 60], [])]
    )
    good = Frame(
        source="opcua", address="wq1", uplinks=[Uplink("INLET-NORTH", "flow", [NOW - 30], [7.0])]
    )
    with IngestPipeline(db_url, registry_poll_s=None) as p:
        outcomes = p.submit_many([broken, good])
    assert [o.reasons for o in outcomes] == [["PROCESSING_ERROR"], []]
    [(raw, detail)] = _rows(db_url, "SELECT raw, detail FROM quarantine")
    assert json.loads(bytes(raw))["readings"][0]["dev"] == "INLET-NORTH"
    assert "ValueError" in detail
    assert p.counters.processing_errors == 1


def test_a_frame_the_database_refuses_is_isolated_and_quarantined_with_its_rows(db_url):
    """One frame's rows fail in the database (a trigger refuses 666 L/s, i.e. 2397.6 m³/h): the
    63 other frames of its batch are stored, the poison frame becomes one WRITE_FAILED row with
    its rows as JSON (import, Modbus and OPC-UA frames have no bytes of their own), and every
    frame is acked."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION refuse_666() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.value BETWEEN 2397 AND 2398 THEN RAISE EXCEPTION 'value 666 refused'; END IF; "
            "RETURN NEW; END $$"
        )
        conn.execute(
            "CREATE TRIGGER refuse_666 BEFORE INSERT ON readings FOR EACH ROW "
            "EXECUTE FUNCTION refuse_666()"
        )
    frames = [
        Frame(
            source="modbus",
            address="ps1",
            uplinks=[Uplink("INLET-NORTH", "flow", [NOW - 600 + i], [666.0 if i == 17 else i])],
        )
        for i in range(64)
    ]
    outcomes: list[FrameOutcome] = []
    with IngestPipeline(db_url, registry_poll_s=None, retry_max_s=0.2) as p:
        outcomes = p.submit_many(frames)
    assert len(outcomes) == 64
    assert p.healthy()
    assert _rows(db_url, "SELECT count(*) FROM readings") == [(63,)]
    [(reason, raw, detail)] = _rows(db_url, "SELECT reason, raw, detail FROM quarantine")
    assert reason == "WRITE_FAILED" and "value 666 refused" in detail
    assert json.loads(bytes(raw))["readings"][0]["v"] == [666.0]


def test_csv_with_nan_inf_and_huge_values_quarantines_them_and_stores_the_rest(db_url, tmp_path):
    csv = tmp_path / "odd.csv"
    csv.write_text(
        "device,ts,value\n"
        "AQN00001,2026-03-02T00:00:00Z,1.5\n"
        "AQN00001,2026-03-02T01:00:00Z,NaN\n"
        "AQN00001,2026-03-02T02:00:00Z,inf\n"
        "AQN00001,2026-03-02T03:00:00Z,1e999\n"
        "AQN00001,2026-03-02T04:00:00Z,2.5\n"
    )
    with IngestPipeline(db_url, registry_poll_s=None) as p:
        r = import_file(csv, p)
    assert (r.rows, r.stored, r.quarantined, r.reasons) == (5, 2, 3, {"NOT_A_NUMBER": 3})
