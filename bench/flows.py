"""Analytics flows end to end from the database: wall time and peak RSS per flow.

Issue 11 asks that a flow's memory follow its unit of work (one DMA x period, one meter chunk x
slice), not the window; this benchmark is how that is checked. It

1. creates a throwaway database on the server (``--admin-url``, default
   ``$AQUAMETER_DATABASE_URL``), migrates it and syncs a synthetic registry of N meters;
2. generates D days of *hourly* register reads with ``simulators.fleet`` (one DMA x
   ``--gen-meters`` meters at a time, so generation never holds the whole estate) and loads them
   through the project's bulk importer (``ingest.importer.import_file``: validation, dedup,
   COPY), in its own subprocess;
3. runs each flow through ``flows.runner.run_flow`` (Prefect, as ``aquameter flow run`` does), each
   in a fresh subprocess, so the peak RSS (``ru_maxrss`` of that process; the Prefect API server
   is a separate process and not counted) is that flow's alone;
4. asserts the row counts: every generated reading stored, one billing line per meter, one
   balance per DMA and period, and prints the table (``--json`` writes it).

Only the first meter slice of each DMA carries the DMA inlet's flow (a slice simulates its own
inlet; importing several would only be deduplicated), so balances are not meaningful here, only
the work and memory of computing them.

Run: ``.venv/bin/python bench/flows.py --meters 1000 --days 30`` (``--keep`` leaves the database).
``--runners default,local:1,local:2`` runs each flow on Prefect's default runner and on Dask
LocalClusters of 1 and 2 workers side by side (issue 12), with meter-days per second per worker;
peak RSS is the flow process's own, not the Dask workers'.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, and bench/ingest.py there would
# shadow the ``ingest`` package: put the repository root there instead.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import json
import os
import resource
import subprocess
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from rich.console import Console
from rich.table import Table

console = Console(width=120)
FLOWS = ("water_balance", "meter_anomalies", "billing_export")
HERE = Path(__file__).resolve()


def with_database(url: str, dbname: str) -> str:
    """``url`` pointing at database ``dbname``."""
    return make_conninfo("", **{**conninfo_to_dict(url), "dbname": dbname})


def window(days: int) -> tuple[datetime, datetime]:
    """[start, end) of the generated data: ``days`` whole UTC days ending two days ago, so no
    read is in the future and a month boundary is usually inside."""
    end = (datetime.now(UTC) - timedelta(days=2)).replace(hour=0, minute=0, second=0, microsecond=0)
    return end - timedelta(days=days), end


def rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --- children ------------------------------------------------------------------------------------


def child_import(url: str, meters: int, dmas: int, days: int, gen_meters: int, seed: int) -> None:
    """Generate and import, one DMA x ``gen_meters`` slice at a time; prints a JSON line."""
    from aquameter.demo import history_table
    from aquameter.registry import Registry
    from ingest.importer import import_file
    from ingest.pipeline import IngestPipeline
    from simulators.fleet import simulate_fleet, synthetic_registry

    reg = synthetic_registry(meters, dmas=dmas)
    start, _ = window(days)
    t0 = time.perf_counter()
    generated = accepted = 0
    gen_s = 0.0
    with IngestPipeline(url, batch_rows=50_000) as pipeline, tempfile.TemporaryDirectory() as tmp:
        for dma in reg.dmas:
            groups = [g for g in reg.meter_groups if g.dma == dma.id]
            inlet = [d for d in reg.devices if d.dma == dma.id]
            first = True
            for group in groups:
                for lo in range(0, group.count, gen_meters):
                    part = group.model_copy(
                        update={
                            "start": group.start + lo,
                            "count": min(gen_meters, group.count - lo),
                        }
                    )
                    sub = Registry(dma=[dma], vendor=reg.vendors, device=inlet, meter_group=[part])
                    g0 = time.perf_counter()
                    fleet = simulate_fleet(sub, start, days, interval_s=3600, seed=seed + lo)
                    inlets = fleet.inlet_values if first else fleet.inlet_values.clear()
                    table = history_table(fleet.reads, inlets)
                    path = Path(tmp) / "part.parquet"
                    table.write_parquet(path)
                    gen_s += time.perf_counter() - g0
                    generated += table.height
                    del fleet, table
                    accepted += import_file(path, pipeline).accepted
                    first = False
    print(
        json.dumps(
            {
                "wall_s": time.perf_counter() - t0,
                "generate_s": gen_s,
                "rss_mb": rss_mb(),
                "generated": generated,
                "accepted": accepted,
            }
        )
    )


def hourly_overrides(name: str) -> dict[str, Any]:
    """Settings of a deployment whose meters report hourly: the series is rebuilt on hourly
    slots (the defaults are 15-minute slots, which makes four series rows of every hourly read)
    and a day of history is 24 intervals."""
    series = {
        "series.vee.interval_s": 3600,
        "series.vee.spike_min_samples": 24,
        "series.estimation.interval_s": 3600,
    }
    if name == "meter_anomalies":
        return {**series, "anomalies.interval": 3600}
    return series


def child_flow(
    url: str,
    name: str,
    since: str,
    until: str,
    overrides: str | None,
    hourly: bool,
    dask: str | None = None,
) -> None:
    """Run one flow over [since, until) through ``run_flow``; prints a JSON line."""
    from flows.runner import run_flow

    kw: dict[str, Any] = {"overrides": hourly_overrides(name)} if hourly else {}
    s, u = datetime.fromisoformat(since), datetime.fromisoformat(until)
    if name == "billing_export":
        # One bill per meter for the last 30 days of the window: a billing period (a month or
        # two) is billing's unit of work, whatever the window.
        kw |= {
            "period_start": max(s, u - timedelta(days=30)).date(),
            "period_end": (u - timedelta(days=1)).date(),
            "export_dir": tempfile.mkdtemp(prefix="aq_bench_bills_"),
        }
    if name == "water_balance":
        kw["overrides"] = {**kw.get("overrides", {}), "period": "window"}
    if overrides:
        kw["overrides"] = {**kw.get("overrides", {}), **json.loads(overrides)}
    t0 = time.perf_counter()
    run_flow(name, s, u, url, full=True, dask=dask, **kw)
    print(json.dumps({"wall_s": time.perf_counter() - t0, "rss_mb": rss_mb()}))


# --- parent --------------------------------------------------------------------------------------


def run_child(args: list[str]) -> dict[str, Any]:
    """Run this file with ``args`` in a fresh interpreter; its last stdout line is JSON."""
    out = subprocess.run(
        [sys.executable, str(HERE), *args], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        console.print(out.stdout[-3000:], out.stderr[-6000:])
        raise SystemExit(f"child {args[:2]} failed with exit code {out.returncode}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _set_rows(flows: dict[str, Any], name: str, rows: int) -> None:
    """The rows a flow left (every runner recomputes the same rows: ``full=True``)."""
    for key, run in flows.items():
        if key.split(" (")[0] == name:
            run["rows"] = rows


def count(url: str, sql: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(sql).fetchone()  # type: ignore[arg-type]
    return int(row[0]) if row else 0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, set the database up, import, run the flows, assert and print."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--meters", type=int, default=1000)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--dmas", type=int, default=0, help="default: one per 2,500 meters")
    ap.add_argument("--gen-meters", type=int, default=1000, help="meters simulated at once")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--flows", default=",".join(FLOWS))
    ap.add_argument("--overrides", default=None, help='JSON, e.g. {"chunk_meters": 1000}')
    ap.add_argument(
        "--hourly", action="store_true", help="flows set up for hourly meters (hourly slots)"
    )
    ap.add_argument(
        "--admin-url",
        default=os.environ.get(
            "AQUAMETER_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    ap.add_argument("--url", default=None, help="use this (already imported) database")
    ap.add_argument("--keep", action="store_true", help="do not drop the database at the end")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--runners",
        default="default",
        help="task runners side by side, e.g. default,local:1,local:2 (Dask LocalClusters)",
    )
    # Children (internal).
    ap.add_argument("--child", choices=["import", "flow"], default=None)
    ap.add_argument("--flow", default=None)
    ap.add_argument("--since", default=None)
    ap.add_argument("--until", default=None)
    ap.add_argument("--dask", default=None)
    a = ap.parse_args(argv)
    dmas = a.dmas or max(1, -(-a.meters // 2500))
    if a.child == "import":
        child_import(a.url, a.meters, dmas, a.days, a.gen_meters, a.seed)
        return {}
    if a.child == "flow":
        child_flow(a.url, a.flow, a.since, a.until, a.overrides, a.hourly, a.dask)
        return {}

    from ingest.registry_sync import sync_registry
    from simulators.fleet import synthetic_registry
    from sql.migrate import migrate

    start, end = window(a.days)
    name = f"aq_bench_flows_{uuid.uuid4().hex[:8]}"
    url = a.url
    created = url is None
    results: dict[str, Any] = {
        "meters": a.meters,
        "days": a.days,
        "dmas": dmas,
        "since": start.isoformat(),
        "until": end.isoformat(),
        "hourly": a.hourly,
        "flows": {},
    }
    if created:
        with psycopg.connect(a.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
        url = with_database(a.admin_url, name)
    try:
        if created:
            with psycopg.connect(url) as conn:
                migrate(conn, partitions_ahead=2)
                sync_registry(conn, synthetic_registry(a.meters, dmas=dmas))
                conn.commit()
            console.print(f"importing {a.meters:,} meters x {a.days} days of hourly reads ...")
            imp = run_child(
                ["--child", "import", "--url", url, "--meters", str(a.meters),
                 "--dmas", str(dmas), "--days", str(a.days), "--gen-meters", str(a.gen_meters),
                 "--seed", str(a.seed)]
            )  # fmt: skip
            results["import"] = imp
            stored = count(url, "SELECT count(*) FROM readings r JOIN channels c "
                           "ON c.id = r.channel_id WHERE c.meter_id IS NOT NULL")  # fmt: skip
            results["readings"] = stored
            assert imp["accepted"] == imp["generated"], imp
            # Every meter read hourly: the window plus the read at its end, less nothing.
            assert stored >= a.meters * a.days * 24, (stored, a.meters * a.days * 24)
        assert url is not None
        runners = [r for r in a.runners.split(",") if r]
        for flow in [f for f in a.flows.split(",") if f]:
            for runner in runners:
                console.print(f"running {flow} ({runner}) ...")
                args = ["--child", "flow", "--url", url, "--flow", flow,
                        "--since", start.isoformat(), "--until", end.isoformat()]  # fmt: skip
                if a.overrides:
                    args += ["--overrides", a.overrides]
                if a.hourly:
                    args.append("--hourly")
                if runner != "default":
                    args += ["--dask", runner]
                run = run_child(args)
                run["workers"] = int(runner.split(":")[1]) if runner.startswith("local:") else 1
                run["runner"] = runner
                key = flow if runners == ["default"] else f"{flow} ({runner})"
                results["flows"][key] = run
        ran = {key.split(" (")[0] for key in results["flows"]}
        if "billing_export" in ran:
            bills = count(url, "SELECT count(DISTINCT meter_id) FROM billing_volumes")
            _set_rows(results["flows"], "billing_export", bills)
            assert bills == a.meters, (bills, a.meters)
        if "water_balance" in ran:
            balances = count(url, "SELECT count(*) FROM water_balance_summary")
            _set_rows(results["flows"], "water_balance", balances)
            assert balances == dmas, (balances, dmas)
        if "meter_anomalies" in ran:
            alerts = count(url, "SELECT count(*) FROM alerts WHERE subject_id NOT LIKE 'DMA%%'")
            _set_rows(results["flows"], "meter_anomalies", alerts)
    finally:
        if created and not a.keep:
            with psycopg.connect(a.admin_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]
        elif created:
            console.print(f"kept database {name}")

    slots = "hourly slots" if a.hourly else "15-minute slots (defaults)"
    table = Table(
        title=f"{a.meters:,} meters x {a.days} days of hourly reads ({dmas} DMA(s)), {slots}"
    )
    for col in ("step", "wall s", "peak RSS MiB", "rows", "meter-days/s per worker"):
        table.add_column(col, justify="right" if col != "step" else "left")
    if "import" in results:
        imp = results["import"]
        table.add_row(
            f"import (generate {imp['generate_s']:.0f} s)",
            f"{imp['wall_s']:.1f}",
            f"{imp['rss_mb']:.0f}",
            f"{results['readings']:,} readings",
            "",
        )
    for flow, r in results["flows"].items():
        per_worker = a.meters * a.days / r["wall_s"] / r["workers"]
        table.add_row(
            flow,
            f"{r['wall_s']:.1f}",
            f"{r['rss_mb']:.0f}",
            f"{r.get('rows', '')}",
            f"{per_worker:,.0f}",
        )
    console.print(table)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
