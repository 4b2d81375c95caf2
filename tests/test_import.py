"""Bulk import of history through the same validation, dedup and quarantine."""

import polars as pl
import psycopg
import pytest

from aquameter.errors import MissingColumns
from ingest.importer import import_file
from ingest.pipeline import IngestPipeline


def _history() -> pl.DataFrame:
    ts = [f"2026-01-0{d}T0{h}:00:00Z" for d in range(1, 4) for h in range(0, 8)]
    rows = {
        "device": ["AQN00001"] * len(ts) + ["KMS00001"] * len(ts),
        "ts": ts * 2,
        "value": [float(i) for i in range(len(ts))] + [1000.0 * i for i in range(len(ts))],
        "unit": ["m3"] * len(ts) + ["L"] * len(ts),
    }
    return pl.DataFrame(rows)


def test_csv_and_parquet_import_dedup_and_quarantine(db_url, tmp_path):
    good = _history()
    bad = pl.DataFrame(
        {
            "device": ["NOPE", "AQN00001", "AQN00001"],
            "ts": ["2026-01-01T00:00:00Z", "2026-01-05T00:00:00Z", "2026-01-06T00:00:00Z"],
            "value": [1.0, -3.0, 5.0],
            "unit": ["m3", "m3", "gallons-ish"],
        }
    )
    csv = tmp_path / "history.csv"
    pl.concat([good, bad]).write_csv(csv)
    parquet = tmp_path / "history.parquet"
    good.write_parquet(parquet)

    with IngestPipeline(db_url) as pipeline:
        first = import_file(csv, pipeline)
        again = import_file(parquet, pipeline)  # the same good rows, other format
    assert (first.rows, first.accepted, first.quarantined) == (51, 48, 3)
    assert (again.rows, again.accepted, again.quarantined) == (48, 48, 0)
    assert pipeline.counters.stored == 48
    assert pipeline.counters.duplicates == 48
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM readings").fetchone() == (48,)
        reasons = sorted(r[0] for r in conn.execute("SELECT reason FROM quarantine"))
        assert reasons == ["BAD_UNIT", "OUT_OF_RANGE", "UNKNOWN_DEVICE"]
        # litres were converted to m³
        v = conn.execute(
            "SELECT max(value) FROM readings r JOIN channels c ON c.id = r.channel_id "
            "WHERE c.device_id = 'KMS00001'"
        ).fetchone()
        assert v == (23.0,)


def test_bad_dates_are_quarantined_per_row_and_reimport_adds_nothing(db_url, tmp_path):
    csv = tmp_path / "legacy.csv"
    csv.write_text(
        "device,ts,value,unit\n"
        "AQN00001,2026-01-01T00:00:00Z,1.0,m3\n"
        "AQN00001,31/02/2026 25:00,2.0,m3\n"  # a date no parser accepts: this row only
        "AQN00001,2026-01-01T02:00:00Z,n/a,m3\n"  # not a number
        "AQN00001,2026-01-01T03:00:00Z,-3.0,m3\n"  # out of range, in a frame with good rows
        "NOPE,2026-01-01T03:00:00Z,1.0,m3\n"
        "AQN00001,1767229200,4.0,m3\n"  # unix seconds
    )
    with IngestPipeline(db_url) as pipeline:
        first = import_file(csv, pipeline)
        again = import_file(csv, pipeline)
    assert (first.rows, first.accepted, first.quarantined) == (6, 2, 4)
    assert first.reasons == {"MALFORMED": 2, "OUT_OF_RANGE": 1, "UNKNOWN_DEVICE": 1}
    assert (again.rows, again.accepted, again.quarantined, again.stored) == (6, 2, 0, 0)
    assert again.already_quarantined == 4
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT address, reason, raw FROM quarantine WHERE source = 'import' ORDER BY address"
        ).fetchall()
        assert conn.execute("SELECT count(*) FROM readings").fetchone() == (2,)
    base = str(csv.resolve())
    assert [(a, r) for a, r, _ in rows] == [
        (f"{base}#2", "MALFORMED"),
        (f"{base}#3", "MALFORMED"),
        (f"{base}#4", "OUT_OF_RANGE"),
        (f"{base}#5", "UNKNOWN_DEVICE"),
    ]
    assert b"31/02/2026 25:00" in bytes(rows[0][2])  # the original row is kept


def test_missing_columns_fail_before_anything_is_written(db_url, tmp_path):
    csv = tmp_path / "other-system.csv"
    csv.write_text("meter,time,reading\nAQN00001,2026-01-01T00:00:00Z,1.0\n")
    with IngestPipeline(db_url) as pipeline, pytest.raises(MissingColumns) as err:
        import_file(csv, pipeline)
    assert "device (or channel_id), ts, value" in str(err.value)
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM quarantine").fetchone() == (0,)
