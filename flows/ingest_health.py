"""``ingest_health``: read rate (抄表率) per local day, DMA, gateway and vendor.

Expected reads come from the registry (installed, active meters × the day's real hours ÷ the
reporting interval, so a 23-hour DST day expects 92 quarter hours), received reads from the
readings table. A meter counts at most what it was expected to send, so one chatty meter cannot
hide a silent one. A day that is not over yet is judged on the hours elapsed up to ``as_of`` and
recomputed once it is complete.

It also reports each analytics flow's latest run from ``flow_runs`` (``last_run.<flow>``), and
lists the flows whose latest run failed (``failed_flows``, each also logged as an error): a flow
that failed must not look like one that found nothing to do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

import polars as pl
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from dma.local_time import local_day_bounds
from flows.late_data import plan_days
from flows.load import copy_frame, days_since_1970, load_meters
from flows.overrides import apply_overrides, settings_digest
from flows.runner import FLOW_PATHS
from flows.store import lock, replace_keyed, write_marks
from flows.window import resolve_database_url, resolve_window, utc
from sql.connect import connect

FLOW = "ingest_health"
NO_GATEWAY = "direct"

READ_RATES = {
    "day": pl.Date,
    "dma_id": pl.String,
    "gateway": pl.String,
    "vendor_id": pl.String,
    "meters": pl.Int32,
    "meters_silent": pl.Int32,
    "expected_reads": pl.Int64,
    "received_reads": pl.Int64,
    "rate": pl.Float64,
}


def _no_overrides() -> dict[str, int]:
    return {}


@dataclass(frozen=True)
class ReadRateParams:
    """interval_s: expected reporting interval of a meter (15-minute reads).
    vendor_interval_s: per-vendor intervals where a vendor reports otherwise (e.g. hourly)."""

    interval_s: int = 900
    vendor_interval_s: Mapping[str, int] = field(default_factory=_no_overrides)


@dataclass(frozen=True)
class IngestHealthSettings:
    read_rate: ReadRateParams = field(default_factory=ReadRateParams)
    lookback_days: float = 3.0
    late_horizon_days: int = 62


def group_key(dma_id: pl.Expr, gateway: pl.Expr, vendor_id: pl.Expr) -> pl.Expr:
    """The read-group subject id, the same as ``flows.late_data.SUBJECT_CHANNELS['read_group']``."""
    return pl.concat_str(
        [dma_id.fill_null(""), gateway.fill_null(NO_GATEWAY), vendor_id], separator="|"
    )


def read_rates(
    meters: pl.DataFrame,
    received: pl.DataFrame,
    days: pl.DataFrame,
    as_of: datetime,
    params: ReadRateParams | None = None,
) -> pl.DataFrame:
    """``READ_RATES`` rows for ``days`` (``subject_id`` = read group, ``day``).

    ``meters`` is METERS plus ``timezone``, ``active``, ``vendor_id``; ``received`` has
    ``meter_id, day, reads`` (reads received per local day). Groups without an expected meter on a
    day get no row.
    """
    p = params or ReadRateParams()
    m = meters.with_columns(
        group_key(pl.col("dma_id"), pl.col("gateway"), pl.col("vendor_id")).alias("subject_id"),
        pl.col("timezone").fill_null("UTC"),
        pl.col("vendor_id")
        .replace_strict(dict(p.vendor_interval_s), default=p.interval_s, return_dtype=pl.Int64)
        .alias("_interval_s"),
    ).filter(pl.col("active").fill_null(True))
    per_meter = m.join(days.select("subject_id", "day"), on="subject_id", how="inner").filter(
        pl.col("install_date").is_null() | (pl.col("install_date") <= pl.col("day"))
    )
    bounded = local_day_bounds(per_meter, "day")
    at = pl.lit(as_of).cast(pl.Datetime("us", "UTC"))
    hours = (
        (pl.min_horizontal(pl.col("day_end_ts"), at) - pl.col("day_start_ts")).dt.total_seconds()
        / 3600.0
    ).clip(lower_bound=0.0)
    per_meter = bounded.with_columns(
        (hours * 3600.0 / pl.col("_interval_s")).floor().cast(pl.Int64).alias("_expected")
    ).join(received.select("meter_id", "day", "reads"), on=["meter_id", "day"], how="left")
    per_meter = per_meter.with_columns(pl.col("reads").fill_null(0))
    out = per_meter.group_by("day", "dma_id", "gateway", "vendor_id").agg(
        pl.len().alias("meters"),
        (pl.col("reads") == 0).sum().alias("meters_silent"),
        pl.col("_expected").sum().alias("expected_reads"),
        pl.min_horizontal("reads", "_expected").sum().alias("received_reads"),
    )
    return (
        out.with_columns(
            pl.col("dma_id").fill_null(""),
            pl.col("gateway").fill_null(NO_GATEWAY),
            pl.when(pl.col("expected_reads") > 0)
            .then(pl.col("received_reads") / pl.col("expected_reads"))
            .alias("rate"),
        )
        .select(list(READ_RATES))
        .cast(READ_RATES)  # type: ignore[arg-type]
        .sort("day", "dma_id", "gateway", "vendor_id")
    )


def _received(conn: Any, meters: pl.DataFrame, lo: datetime, hi: datetime) -> pl.DataFrame:
    """Reads per meter and local day (its DMA's zone), counted in the database."""
    chans = meters.filter(pl.col("channel_id").is_not_null())
    return copy_frame(
        conn,
        f"""SELECT u.meter_id, {days_since_1970("(r.ts AT TIME ZONE u.tz)::date")}, count(*)
            FROM readings r
            JOIN unnest(%s::int[], %s::text[], %s::text[]) AS u(channel_id, meter_id, tz)
              ON u.channel_id = r.channel_id
            WHERE r.ts >= %s AND r.ts < %s
            GROUP BY 1, 2""",
        (
            chans["channel_id"].to_list(),
            chans["meter_id"].to_list(),
            chans["timezone"].fill_null("UTC").to_list(),
            lo,
            hi,
        ),
        {"meter_id": pl.String, "day": pl.Date, "reads": pl.Int64},
    )


@task(cache_policy=NO_CACHE)
def compute_read_rates(
    database_url: str,
    since: datetime,
    until: datetime,
    as_of: datetime,
    full: bool,
    settings: IngestHealthSettings,
) -> dict[str, Any]:
    with connect(database_url, autocommit=True) as conn:
        meters = load_meters(conn).with_columns(
            group_key(pl.col("dma_id"), pl.col("gateway"), pl.col("vendor_id")).alias("subject_id")
        )
        subjects = meters.select("subject_id", "timezone").unique("subject_id", keep="first")
        stale = plan_days(
            conn,
            FLOW,
            "read_group",
            subjects,
            since,
            until,
            as_of,
            late_horizon_days=settings.late_horizon_days,
            full=full,
            salt=settings_digest(settings),
        )
        if stale.height == 0:
            return {"groups": 0, "days": 0, "rows": 0}
        involved = meters.join(stale.select("subject_id").unique(), on="subject_id", how="semi")
        first, last = stale["day"].min(), stale["day"].max()
        assert isinstance(first, date) and isinstance(last, date)
        received = _received(
            conn,
            involved,
            utc(first - timedelta(days=1)),
            min(utc(last + timedelta(days=2)), as_of + timedelta(microseconds=1)),
        )
        rates = read_rates(involved, received, stale, as_of, settings.read_rate)
        # Replace exactly the recomputed (group, day) units: split the group key back.
        parts = stale.select("day", pl.col("subject_id").str.split_exact("|", 2).alias("k")).unnest(
            "k"
        )
        with conn.transaction(), conn.cursor() as cur:
            lock(cur, FLOW)
            deleted, inserted = replace_keyed(
                cur,
                "read_rates",
                {
                    "day": parts["day"].to_list(),
                    "dma_id": parts["field_0"].to_list(),
                    "gateway": parts["field_1"].to_list(),
                    "vendor_id": parts["field_2"].to_list(),
                },
                {"day": "date", "dma_id": "text", "gateway": "text", "vendor_id": "text"},
                rates,
            )
            write_marks(cur, FLOW, stale, as_of)
    return {
        "groups": stale["subject_id"].n_unique(),
        "days": stale.height,
        "rows": inserted,
        "replaced": deleted,
    }


LATEST_RUNS_SQL = """
    SELECT DISTINCT ON (flow) flow, status, finished_at,
           extract(epoch FROM finished_at - started_at), error
    FROM flow_runs ORDER BY flow, finished_at DESC, id DESC"""


def describe_latest_runs(
    rows: list[tuple[str, str, datetime, float, str | None]], known: list[str]
) -> tuple[dict[str, str], list[str]]:
    """(``last_run.<flow>`` entries, names of flows whose latest run failed) from the latest
    ``flow_runs`` row of each flow (flow, status, finished_at, seconds, error). Every flow of
    ``known`` gets an entry, "never run" when it has no row: a flow that is not running at all
    is worth seeing too."""
    entries: dict[str, str] = {}
    failed: list[str] = []
    seen: dict[str, str] = {}
    for name, status, finished_at, seconds, error in rows:
        at = utc(finished_at).isoformat(timespec="seconds").replace("+00:00", "Z")
        if status == "failed":
            failed.append(name)
            seen[name] = f"FAILED at {at} after {seconds:.1f} s: {error or '(no message)'}"
        else:
            seen[name] = f"completed at {at} in {seconds:.1f} s"
    for name in [*known, *sorted(set(seen) - set(known))]:
        entries[f"last_run.{name}"] = seen.get(name, "never run")
    return entries, sorted(failed)


@task(cache_policy=NO_CACHE)
def latest_flow_runs(database_url: str) -> list[tuple[str, str, datetime, float, str | None]]:
    """The latest ``flow_runs`` row of each flow (see ``LATEST_RUNS_SQL``)."""
    with connect(database_url, autocommit=True) as conn:
        return [
            (str(name), str(status), at, float(seconds), error)
            for name, status, at, seconds, error in conn.execute(LATEST_RUNS_SQL).fetchall()
        ]


@flow(name=FLOW, validate_parameters=False)
def ingest_health(
    database_url: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    overrides: dict[str, Any] | None = None,
    full: bool = False,
) -> dict[str, Any]:
    """Read rates per local day × DMA × gateway × vendor for the stale days of [since, until)."""
    log = get_run_logger()
    settings = apply_overrides(IngestHealthSettings(), overrides)
    url = resolve_database_url(database_url)
    win = resolve_window(since, until, settings.lookback_days)
    result = compute_read_rates(url, win.since, win.until, win.as_of, full, settings)
    log.info("read rates: %s", result)
    runs, failed = describe_latest_runs(latest_flow_runs(url), list(FLOW_PATHS))
    for name in failed:
        log.error("flow %s: latest run %s", name, runs[f"last_run.{name}"])
    return {
        "flow": FLOW,
        "since": win.since.isoformat(),
        "until": win.until.isoformat(),
        **result,
        "failed_flows": failed,
        **runs,
    }
