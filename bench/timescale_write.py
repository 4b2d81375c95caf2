"""Write throughput of the real ingest write path (BatchWriter: binary COPY into a staging table,
``INSERT … ON CONFLICT DO NOTHING`` into the readings hypertable, ingest_days upsert) on the
TimescaleDB branch of the schema, in rows/s: once new rows, once the same rows again (all
duplicates).

By default the target is the PGlite TimescaleDB served by tsdb/serve.mjs (a WASM build: its figure
tells what the test server does, not what a TimescaleDB server does); ``--url`` names another.
Run: ``.venv/bin/python bench/timescale_write.py [--rows 200000] [--batch 20000] [--memory]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and bench/ingest.py would shadow the
# ``ingest`` package: put the repository root there instead.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import UTC, datetime  # noqa: E402

import numpy as np  # noqa: E402

from aquameter.registry import load_registry  # noqa: E402
from ingest.registry_sync import sync_registry  # noqa: E402
from ingest.writer import Batch, BatchWriter  # noqa: E402
from sql.migrate import migrate  # noqa: E402
from tests.servers import EXAMPLE_REGISTRY  # noqa: E402
from tests.timescale_server import connect, start_server  # noqa: E402


def batches(channels: list[int], rows: int, size: int) -> list[Batch]:
    """Rows of every channel at 15-minute steps from 2025-01-06, ordered by time like live
    traffic, cut into batches of ``size``."""
    start = datetime(2025, 1, 6, tzinfo=UTC).timestamp()
    i = np.arange(rows)
    ch = np.asarray(channels)[i % len(channels)]
    ts = start + (i // len(channels)) * 900.0
    values = np.round(np.random.default_rng(1).uniform(0, 100, rows), 3)
    return [
        Batch(
            channel_ids=ch[lo : lo + size].tolist(),
            ts=ts[lo : lo + size].tolist(),
            values=values[lo : lo + size].tolist(),
            quality=[0] * len(ch[lo : lo + size]),
        )
        for lo in range(0, rows, size)
    ]


def run(url: str, rows: int, size: int) -> None:
    with connect(url) as conn:
        result = migrate(conn)
        if result.backend != "timescale":
            sys.exit(f"{url} is not a TimescaleDB (backend {result.backend})")
        sync_registry(conn, load_registry(EXAMPLE_REGISTRY))
        conn.commit()
    with connect(url, autocommit=True) as conn:
        channels = [r[0] for r in conn.execute("SELECT id FROM channels ORDER BY id")]
        work = batches(channels, rows, size)
        writer = BatchWriter(conn)
        for label in ("new rows", "same rows again (duplicates)"):
            t0 = time.perf_counter()
            inserted = sum(writer.write(b).inserted for b in work)
            took = time.perf_counter() - t0
            print(
                f"{label:30s} {rows:>8d} rows in {took:6.2f} s = {rows / took:>9,.0f} rows/s "
                f"({inserted} inserted, batches of {size})"
            )
        chunks = conn.execute("SELECT count(*) FROM show_chunks('readings')").fetchone()
        print(f"readings hypertable: {chunks[0] if chunks else '?'} chunks")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=20_000, help="rows per transaction")
    ap.add_argument("--url", help="a TimescaleDB to use instead of the PGlite server")
    ap.add_argument("--memory", action="store_true", help="PGlite data in memory, not on disk")
    args = ap.parse_args()
    if args.url:
        run(args.url, args.rows, args.batch)
        return
    with tempfile.TemporaryDirectory(prefix="aq-tsdb-bench-") as tmp:
        server = start_server(None if args.memory else Path(tmp) / "data")
        try:
            print(f"PGlite TimescaleDB ({'memory' if args.memory else 'data dir on disk'})")
            run(server.url, args.rows, args.batch)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
