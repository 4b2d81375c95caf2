"""Meter analytics: polars (``pipelines``, ``dma``) against plain pandas (bench/pandas_reference).

Stages, on N meters × D days of 15-minute register reads from ``simulators.fleet`` (synthetic
registry, a few DMAs in different time zones, injected faults plus a few duplicate and lowered
reads so that every rule has something to find):

1. ``consumption`` — interval volumes with rollover;
2. ``vee.validate`` — all read and interval rules;
3. ``vee.validated_intervals`` — the series after validation (VALID / SUSPECT / FAILED);
4. ``anomalies`` — LEAK_CONTINUOUS, BURST, REVERSE_FLOW, STUCK_METER, TAMPER, OVER_CAPACITY as
   episodes, on the interval consumption of stage 1 (estimation is not part of this benchmark);
5. ``mnf`` — minimum night flow per DMA and local night.

Data generation, the polars side, the pandas side and the comparison each run in their own fresh
subprocess, so the peak RSS (``ru_maxrss``) of a side is that side's alone. Results are written to
parquet and asserted equal (same rows after sorting, floats within a tight tolerance); any
difference fails the run with the rows that differ. ``--chunk-meters K`` adds a second polars side
that loads, processes and writes the meters in chunks of K, the way a flow runs them (MNF needs
only DMA flows); its results are compared with pandas too.

The polars side chains the stages as a flow does: the reads are loaded as one chunk (as pandas
holds them), cleaned once (``clean_reads``, timed as part of stage 1) and the clean reads handed
to stages 1-3; each result is written as soon as it is complete and then dropped (the validated
series slice by slice of meters as ``validated_interval_slices`` makes it), and the stages run in
the order that holds the fewest large frames at once (validation, the validated series, then the
intervals, after which the clean reads go, and the anomalies). Times are per stage whatever the
order; writing is not timed.

Run: ``.venv/bin/python bench/analytics.py [--meters 10000 --days 30] [--quick]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, and bench/ingest.py there would
# shadow the ``ingest`` package: put the repository root there instead.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import gc
import json
import resource
import subprocess
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from itertools import count
from typing import Any

import numpy as np
import polars as pl
from rich.console import Console
from rich.table import Table

console = Console(width=120)
START = datetime(2026, 3, 2, tzinfo=UTC)  # spans the European/US spring-forward nights
STAGES = ("consumption", "vee.validate", "vee.validated_intervals", "anomalies", "mnf")
FLOAT_TOL = 1e-6  # evidence is rounded to 6 decimals by pipelines.episodes


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --- data ------------------------------------------------------------------------------------


def generate(out: Path, meters: int, days: int, dmas: int, seed: int) -> dict[str, Any]:
    """Simulate the fleet, add duplicate and lowered reads, write the inputs as parquet."""
    from simulators.faults import random_faults
    from simulators.fleet import customer_meters, meter_id_of, simulate_fleet, synthetic_registry

    registry = synthetic_registry(meters, dmas=dmas)
    ids = [meter_id_of(d) for d, _ in customer_meters(registry)]
    per = max(1, meters // 500)
    codes = ("LEAK_CONTINUOUS", "BURST", "REVERSE_FLOW", "STUCK_METER", "TAMPER")
    counts = {c: per for c in codes} | {"OVER_CAPACITY": per, "LOW_BATTERY": 1, "COMMS_LOSS": per}
    counts["DMA_LEAK"] = 1
    faults = random_faults(ids, [d.id for d in registry.dmas], START, days, seed, counts)
    fleet = simulate_fleet(
        registry, START, days, seed=seed, faults=faults, params=_fleet_params(ids, per)
    )
    reads = fleet.reads
    rng = np.random.default_rng(seed)
    n = reads.height
    # Duplicate reads (half of them disagreeing) and lowered registers: DUPLICATE_TS and
    # REGISTER_DECREASE have something to find, and the hard rules remove reads.
    dup_rows = np.sort(rng.choice(n, size=max(4, n // 5000), replace=False))
    dups = reads[dup_rows].with_columns(
        pl.when(pl.int_range(pl.len()) % 2 == 0)
        .then(pl.col("register") + 0.001)
        .otherwise(pl.col("register"))
        .alias("register")
    )
    low = np.zeros(n, dtype=bool)
    low[rng.choice(n, size=max(4, n // 20000), replace=False)] = True
    reads = reads.with_columns(
        pl.when(pl.lit(low)).then(pl.col("register") - 0.5).otherwise(pl.col("register"))
    )
    reads = pl.concat([reads, dups]).sort("meter_id", "ts", maintain_order=True)
    meters_frame = fleet.meters.join(
        fleet.dmas.select("dma_id", "timezone"), on="dma_id", how="left"
    )
    out.mkdir(parents=True, exist_ok=True)
    reads.write_parquet(out / "reads.parquet")
    meters_frame.write_parquet(out / "meters.parquet")
    fleet.dmas.write_parquet(out / "dmas.parquet")
    fleet.dma_flow.write_parquet(out / "dma_flow.parquet")
    meta = {"as_of": fleet.end.isoformat(), "reads": reads.height, "faults": len(faults)}
    (out / "meta.json").write_text(json.dumps(meta))
    return meta


def _fleet_params(ids: list[str], per: int) -> Any:
    from simulators.fleet import FleetParams

    # A few registers wrap inside the window, so rollover handling is exercised.
    return FleetParams(rollover_meters=tuple(ids[-per:]))


# --- sides ---------------------------------------------------------------------------------------


class Timer:
    def __init__(self) -> None:
        self.stages: dict[str, float] = {}

    def run(self, stage: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        result = fn()
        self.stages[stage] = self.stages.get(stage, 0.0) + time.perf_counter() - t
        return result


def run_polars(data: Path, out: Path, chunk_meters: int, prefix: str) -> dict[str, Any]:
    """Stages 1-5 with polars. With ``chunk_meters`` the reads of each chunk of meters are loaded,
    processed and written before the next chunk, as a flow does: nothing of the whole estate but
    its meter list is held at once."""
    from dma.night_flow import minimum_night_flow
    from pipelines import anomalies as an
    from pipelines.consumption import clean_reads, interval_consumption
    from pipelines.vee import validate, validated_interval_slices

    meters = pl.read_parquet(data / "meters.parquet")
    dmas = pl.read_parquet(data / "dmas.parquet")
    flow = pl.read_parquet(data / "dma_flow.parquet")
    as_of = datetime.fromisoformat(json.loads((data / "meta.json").read_text())["as_of"])
    p = an.MeterAnomalyParams()
    detectors = (
        an.leak_continuous,
        an.burst,
        an.reverse_flow,
        an.stuck_meter,
        an.tamper,
        an.over_capacity,
    )
    ids = meters.get_column("meter_id").sort()
    size = chunk_meters if 0 < chunk_meters < ids.len() else max(1, ids.len())
    # Loaded as one chunk, as pandas holds its columns: the parquet reader hands back one chunk
    # per row group, and clean_reads would otherwise make the copy inside the timed stage.
    reads_all = pl.read_parquet(data / "reads.parquet").rechunk() if size >= ids.len() else None
    loaded_mb = peak_rss_mb()
    timer = Timer()
    for k, lo in enumerate(range(0, ids.len(), size)):
        if reads_all is not None:
            r, m = reads_all, meters
            reads_all = None  # held by ``r`` only, so it goes when validation is done with it
        else:
            chunk = ids.slice(lo, size).implode()
            scan = pl.scan_parquet(data / "reads.parquet")
            r = scan.filter(pl.col("meter_id").is_in(chunk)).collect().rechunk()
            m = meters.filter(pl.col("meter_id").is_in(chunk))

        def write(
            name: str, frame: pl.DataFrame, *columns: str | pl.Expr, k: int = k, part: int = 0
        ) -> None:
            # In slices of rows: selecting and encoding tens of millions of rows at once would
            # hold the encoder's buffers for all of them (``_load`` reads the files as one).
            step = 2_000_000
            for j, at in enumerate(range(0, max(frame.height, 1), step)):
                rows = frame.slice(at, step).select(columns)
                rows.write_parquet(out / f"{prefix}_{name}_{k:04d}_{part:03d}_{j:03d}.parquet")

        # As a flow chaining the stages does: the reads are cleaned once and the clean reads
        # handed to every stage, and each result is written (and dropped) as soon as it is
        # complete. The stages run in the order that holds the fewest large frames at once:
        # the raw reads go after validation, the clean reads after the intervals are made from
        # them, so the anomalies see only the intervals.
        clean = timer.run("consumption", partial(clean_reads, r))
        fail = timer.run(
            "vee.validate", partial(validate, r, m, as_of=as_of, dmas=dmas, clean=clean)
        )
        del r  # only validate reads the raw reads (duplicates, future and early reads)
        write("fail", fail, "meter_id", "ts", "rule", "hard", "value")
        # The validated series is written slice by slice of meters as it is made (only the
        # making is timed), so the whole series is never held next to the clean reads.
        slices = validated_interval_slices(None, m, None, fail, clean=clean)
        for j in count():
            valid = timer.run("vee.validated_intervals", partial(next, slices, None))
            if valid is None:
                break
            write(
                "valid",
                valid,
                "meter_id",
                "ts",
                "volume",
                "interval_s",
                "vee_status",
                pl.col("vee_rules").list.join(","),
                part=j,
            )
            del valid
        del fail, slices
        iv = timer.run("consumption", partial(interval_consumption, clean, m, cleaned=True))
        del clean
        write("iv", iv, "meter_id", "ts", "volume", "interval_s", "rollover")
        # The detectors read these columns of the intervals; the rest would only be held.
        iv = iv.select("meter_id", "ts", "volume", "quality", "flag")
        alerts = timer.run("anomalies", partial(_detect, iv, m, p, detectors))
        del iv
        write("alerts", alerts, "code", "subject_id", "start_ts", "end_ts", "status", "evidence")
        del m, alerts
    mnf = timer.run("mnf", lambda: minimum_night_flow(flow, dmas))
    peak = peak_rss_mb()
    mnf.select(
        "dma_id", "night_date", "mnf_m3h", "mnf_start_ts", "mnf_end_ts", "mnf_hour", "windows"
    ).write_parquet(out / f"{prefix}_mnf_0000_000_000.parquet")
    return {"stages": timer.stages, "peak_mb": peak, "loaded_mb": loaded_mb}


def _detect(
    iv: pl.DataFrame, m: pl.DataFrame, p: Any, detectors: tuple[Callable[..., pl.DataFrame], ...]
) -> pl.DataFrame:
    from pipelines import anomalies as an

    prepared = an.prepare_intervals(iv, m, p)
    return pl.concat([d(prepared, m, p) for d in detectors]).sort("code", "subject_id", "start_ts")


def run_pandas(data: Path, out: Path) -> dict[str, Any]:
    import pandas as pd

    from bench import pandas_reference as ref

    reads = pd.read_parquet(data / "reads.parquet")
    reads["meter_id"] = reads["meter_id"].astype("category")
    meters = pd.read_parquet(data / "meters.parquet")
    dmas = pd.read_parquet(data / "dmas.parquet")
    flow = pd.read_parquet(data / "dma_flow.parquet")
    as_of = datetime.fromisoformat(json.loads((data / "meta.json").read_text())["as_of"])
    loaded_mb = peak_rss_mb()
    timer = Timer()
    # As the polars side: the reads are cleaned once (timed as part of consumption) and the
    # clean reads handed to every stage.
    clean = timer.run("consumption", lambda: ref.clean_reads(reads))
    iv = timer.run("consumption", partial(ref.interval_consumption, clean, meters, cleaned=True))
    fail = timer.run(
        "vee.validate", partial(ref.validate, reads, meters, dmas, as_of=as_of, clean=clean)
    )
    valid = timer.run(
        "vee.validated_intervals",
        partial(ref.validated_intervals, reads, meters, dmas, fail, clean=clean),
    )
    del clean
    alerts = timer.run("anomalies", lambda: ref.detect_meter_anomalies(iv, meters))
    mnf = timer.run("mnf", lambda: ref.minimum_night_flow(flow, dmas))
    peak = peak_rss_mb()
    iv[["meter_id", "ts", "volume", "interval_s", "rollover"]].to_parquet(out / "pandas_iv.parquet")
    fail.to_parquet(out / "pandas_fail.parquet")
    valid.to_parquet(out / "pandas_valid.parquet")
    alerts.to_parquet(out / "pandas_alerts.parquet")
    mnf.to_parquet(out / "pandas_mnf.parquet")
    return {"stages": timer.stages, "peak_mb": peak, "loaded_mb": loaded_mb}


# --- comparison ----------------------------------------------------------------------------------


def _load(path: Path) -> pl.DataFrame:
    frame = pl.read_parquet(path)  # a glob pattern reads all chunk files
    casts: list[pl.Expr] = []
    for name, dtype in frame.schema.items():
        if isinstance(dtype, pl.Categorical | pl.Enum):
            casts.append(pl.col(name).cast(pl.String))
        elif isinstance(dtype, pl.Datetime):
            casts.append(pl.col(name).cast(pl.Datetime("us", "UTC")))
    return frame.with_columns(casts)


def _diff(name: str, a: pl.DataFrame, b: pl.DataFrame, keys: list[str]) -> list[str]:
    """Rows only on one side, and rows whose non-key values differ (floats within tolerance)."""
    problems: list[str] = []
    a = a.sort(keys)
    b = b.sort(keys)
    only_a = a.join(b.select(keys), on=keys, how="anti", nulls_equal=True)
    only_b = b.join(a.select(keys), on=keys, how="anti", nulls_equal=True)
    if only_a.height:
        problems.append(f"{name}: {only_a.height} rows only in polars:\n{only_a.head(8)}")
    if only_b.height:
        problems.append(f"{name}: {only_b.height} rows only in pandas:\n{only_b.head(8)}")
    if a.select(keys).is_duplicated().any() or b.select(keys).is_duplicated().any():
        problems.append(f"{name}: duplicate keys {keys}")
    both = a.join(b, on=keys, how="inner", suffix="_pd", nulls_equal=True)
    for col in a.columns:
        if col in keys or f"{col}_pd" not in both.columns:
            continue
        x, y = pl.col(col), pl.col(f"{col}_pd")
        if a.schema[col].is_float():
            y = y.cast(pl.Float64)
            same = (
                (x.is_null() & y.is_null())
                | (x.is_nan() & y.is_nan())
                | ((x - y).abs() <= FLOAT_TOL + 1e-9 * y.abs())
            )
        else:
            y = y.cast(a.schema[col])
            same = (x.is_null() & y.is_null()) | (x == y)
        bad = both.filter(~same.fill_null(False))
        if bad.height:
            problems.append(
                f"{name}.{col}: {bad.height} differing rows:\n"
                f"{bad.select(*keys, col, f'{col}_pd').head(8)}"
            )
    return problems


def compare(out: Path, prefix: str) -> dict[str, Any]:
    problems: list[str] = []
    counts: dict[str, int] = {}
    specs = {
        "iv": ["meter_id", "ts"],
        "fail": ["meter_id", "ts", "rule"],
        "valid": ["meter_id", "ts"],
        "mnf": ["dma_id", "night_date"],
    }
    for name, keys in specs.items():
        a, b = _load(out / f"{prefix}_{name}_*.parquet"), _load(out / f"pandas_{name}.parquet")
        counts[name] = a.height
        if a.height != b.height:
            problems.append(f"{name}: {a.height} polars rows vs {b.height} pandas rows")
        problems += _diff(name, a, b.select(a.columns), keys)
        del a, b
        gc.collect()
    a, b = _load(out / f"{prefix}_alerts_*.parquet"), _load(out / "pandas_alerts.parquet")
    counts["alerts"] = a.height
    ev_cols = [c for c in b.columns if c.startswith("ev_")]
    parsed = [json.loads(e) for e in a.get_column("evidence").to_list()]
    a = a.drop("evidence").with_columns(
        pl.Series(c, [row.get(c[3:]) for row in parsed], dtype=pl.Float64) for c in ev_cols
    )
    keys = ["code", "subject_id", "start_ts"]
    if a.height != b.height:
        problems.append(f"alerts: {a.height} polars rows vs {b.height} pandas rows")
    problems += _diff("alerts", a, b.select(a.columns), keys)
    per_code = dict(a.group_by("code").len().sort("code").iter_rows())
    return {"problems": problems, "counts": counts, "alerts_per_code": per_code}


# --- orchestration -------------------------------------------------------------------------------


def _child(role: str, data: Path, args: argparse.Namespace, chunk: int = 0) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--role",
        role,
        "--data",
        str(data),
        "--meters",
        str(args.meters),
        "--days",
        str(args.days),
        "--dmas",
        str(args.dmas),
        "--seed",
        str(args.seed),
        "--chunk-meters",
        str(chunk),
    ]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        console.print(proc.stdout[-4000:], proc.stderr[-6000:])
        raise SystemExit(f"{role} failed with exit code {proc.returncode}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - t
    return result


def _report(args: argparse.Namespace, meta: dict[str, Any], sides: dict[str, Any]) -> None:
    names = list(sides)
    title = f"Meter analytics: {args.meters:,} meters × {args.days} days ({meta['reads']:,} reads)"
    if args.chunk_meters:
        title += f"; polars-chunked: {args.chunk_meters:,} meters per chunk"
    if args.repeat > 1:
        title += f"; best of {args.repeat}"
    table = Table(title=title)
    table.add_column("stage")
    for name in names:
        table.add_column(f"{name} s", justify="right")
    pd_ = sides.get("pandas")
    ratios = [n for n in names if n != "pandas"] if pd_ else []
    for name in ratios:
        table.add_column(f"pandas / {name}", justify="right")

    def row(label: str, values: dict[str, float], fmt: str, style: str | None = None) -> None:
        cells = [format(values[n], fmt) for n in names]
        cells += [f"{values['pandas'] / values[n]:.1f}×" if values[n] else "-" for n in ratios]
        table.add_row(label, *cells, style=style)

    for stage in STAGES:
        row(stage, {n: sides[n]["stages"][stage] for n in names}, ".2f")
    row("total", {n: sum(sides[n]["stages"].values()) for n in names}, ".2f", "bold")
    row("peak RSS MB", {n: sides[n]["peak_mb"] for n in names}, ",.0f")
    row("RSS after load MB", {n: sides[n]["loaded_mb"] for n in names}, ",.0f")
    console.print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--meters", type=int, default=10_000)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="500 meters × 7 days (CI smoke run)")
    ap.add_argument("--dmas", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument(
        "--chunk-meters", type=int, default=0, help="run polars stages 1-4 per chunk of meters"
    )
    ap.add_argument("--skip-pandas", action="store_true", help="polars side only, no comparison")
    ap.add_argument("--timeout", type=float, default=3600.0, help="per subprocess, seconds")
    ap.add_argument(
        "--repeat", type=int, default=1, help="runs per side; best time per stage is reported"
    )
    ap.add_argument(
        "--role",
        choices=("generate", "polars", "polars-chunked", "pandas", "compare", "compare-chunked"),
        default=None,
    )
    ap.add_argument("--data", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.meters, args.days = 500, 7

    if args.role is not None:
        data: Path = args.data
        if args.role == "generate":
            result = generate(data, args.meters, args.days, args.dmas, args.seed)
        elif args.role in ("polars", "polars-chunked"):
            result = run_polars(data, data, args.chunk_meters, args.role.replace("-", "_"))
        elif args.role == "pandas":
            result = run_pandas(data, data)
        else:
            result = compare(data, "polars_chunked" if args.role.endswith("chunked") else "polars")
        print(json.dumps(result, default=str))
        return

    with tempfile.TemporaryDirectory(prefix="aq-bench-") as tmp:
        data = Path(tmp)
        console.print(f"generating {args.meters:,} meters × {args.days} days …")
        meta = _child("generate", data, args)
        console.print(
            f"  {meta['reads']:,} reads, {meta['faults']} faults ({meta['wall_s']:.1f} s)"
        )
        sides: dict[str, dict[str, Any]] = {}
        roles = ["polars"] + (["polars-chunked"] if args.chunk_meters else [])
        roles += [] if args.skip_pandas else ["pandas"]
        for role in roles:
            for i in range(args.repeat):
                console.print(f"{role} side, run {i + 1}/{args.repeat} …")
                run = _child(role, data, args, args.chunk_meters if "chunked" in role else 0)
                sides[role] = _best(sides.get(role), run)
        checks: dict[str, dict[str, Any]] = {}
        if not args.skip_pandas:
            for role in roles[:-1]:
                console.print(f"comparing {role} with pandas …")
                checks[role] = _child(role.replace("polars", "compare"), data, args)
    _report(args, meta, sides)
    failed = False
    for role, cmp in checks.items():
        console.print(f"{role}: rows compared {cmp['counts']}; alerts {cmp['alerts_per_code']}")
        for problem in cmp["problems"]:
            console.print(f"[red]MISMATCH[/red] {role}: {problem}")
            failed = True
    if failed:
        raise SystemExit(1)
    if checks:
        console.print("[green]results equal[/green] (same rows; floats within 1e-6)")


def _best(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """Fastest time per stage over repeated runs, highest peak memory."""
    if old is None:
        return new
    return {
        "stages": {k: min(v, old["stages"][k]) for k, v in new["stages"].items()},
        "peak_mb": max(new["peak_mb"], old["peak_mb"]),
        "loaded_mb": max(new["loaded_mb"], old["loaded_mb"]),
    }


if __name__ == "__main__":
    main()
