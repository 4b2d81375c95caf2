"""Every flow on a two-worker Dask ``LocalCluster`` writes exactly the rows of the default runner.

Two databases get the same simulated fleet through the real ingest path; the flows run once on
each, one with Prefect's default task runner and one with ``--dask local:2`` (worker processes,
so the tasks really leave this process: pickled inputs, their own database connections). Every
result table is then compared row for row, without the columns that record *when* a row was
computed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import psycopg
import pytest

from flows.dask_runner import DaskSpecError, parse_dask_spec
from flows.runner import FLOWS, run_flow
from simulators.fleet import FleetData
from tests.servers import DatabaseFactory
from tests.test_flows import (
    BILL_END,
    BILL_START,
    RESULT_TABLES,
    START,
    UNTIL,
    _ingest,
    fleet,  # noqa: F401  (fixture)
    prefect_api,  # noqa: F401  (fixture)
)

pytest.importorskip("prefect_dask", reason="prefect-dask is in the flows extra")

# When a row was computed differs between two runs by design, and so does an input fingerprint
# (it holds the times the readings were ingested); everything else must not.
VOLATILE = {"computed_at", "created_at", "opened_at", "updated_at", "exported_at", "id", "inputs"}


def _rows(url: str) -> dict[str, list[tuple[Any, ...]]]:
    out: dict[str, list[tuple[Any, ...]]] = {}
    with psycopg.connect(url) as conn:
        for table in RESULT_TABLES:
            cols = [
                r[0]
                for r in conn.execute(
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_name = %s ORDER BY ordinal_position",
                    (table,),
                ).fetchall()
                if r[0] not in VOLATILE
            ]
            select = ", ".join(f"{c}::text" for c in cols)
            out[table] = conn.execute(f"SELECT {select} FROM {table} ORDER BY 1, 2, 3").fetchall()
    return out


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Equal rows; floats equal to 1e-9 relative (a sum's last bits depend on polars' threads)."""
    for x, y in zip(a, b, strict=True):
        if x == y:
            continue
        try:
            fx, fy = float(x), float(y)
        except (TypeError, ValueError):
            return False
        if abs(fx - fy) > 1e-9 * max(abs(fx), abs(fy), 1.0):
            return False
    return True


def _run_all(url: str, export_dir: Path, dask: str | None) -> dict[str, dict[str, Any]]:
    summaries = {}
    for name in FLOWS:
        kw: dict[str, Any] = {}
        if name == "billing_export":
            kw = {"period_start": BILL_START, "period_end": BILL_END, "export_dir": str(export_dir)}
        if name == "water_balance":
            kw["overrides"] = {"period": "window"}
        summaries[name] = run_flow(name, START, UNTIL, url, dask=dask, **kw)
    return summaries


def test_dask_spec_is_checked_before_any_cluster_starts() -> None:
    assert parse_dask_spec("local:2") == ("local", 2)
    assert parse_dask_spec(" tcp://scheduler:8786 ") == ("address", "tcp://scheduler:8786")
    for bad in ("local", "local:0", "local:x", "scheduler:8786", "tcp://host", "http://h:1"):
        with pytest.raises(DaskSpecError, match="--dask"):
            parse_dask_spec(bad)


@pytest.mark.timeout(900)
def test_every_flow_on_two_dask_workers_writes_the_default_runners_rows(
    db_factory: DatabaseFactory,
    fleet: FleetData,  # noqa: F811
    prefect_api: None,  # noqa: F811
    tmp_path: Path,
) -> None:
    plain, on_dask = db_factory.new(), db_factory.new()
    for url in (plain, on_dask):
        assert _ingest(url, fleet.reads, fleet.inlet_values) > 0
    expected = _run_all(plain, tmp_path / "plain", dask=None)
    got = _run_all(on_dask, tmp_path / "dask", dask="local:2")
    want, have = _rows(plain), _rows(on_dask)
    assert sum(len(v) for v in want.values()) > 100  # the flows did write something
    for table in RESULT_TABLES:
        assert len(have[table]) == len(want[table]), f"{table}: row count differs on Dask"
        for a, b in zip(have[table], want[table], strict=True):
            assert _same(a, b), f"{table} differs on Dask: {a} != {b}"
    assert set(got) == set(expected)
