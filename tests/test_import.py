"""Bulk import of history through the same validation, dedup and quarantine."""

import polars as pl
import psycopg

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
