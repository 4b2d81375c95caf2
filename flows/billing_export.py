"""``billing_export``: versioned bill determinants per meter and period, and the export file.

For the meters whose inputs changed since the period was last computed (late reads, edits), the
determinants are recomputed (``pipelines.billing``) with a tariff charge preview, compared with the
latest issued version, and only a determinant that changes what is billed is written, as version
n+1 replacing n. A re-run therefore writes nothing, and the export file of a run lists exactly the
versions it added, each saying whether it replaces an earlier one. Manual edits are applied on the
way and their audit (old value, or why an edit could not apply) is written back to ``meter_edits``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import polars as pl
import psycopg
from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE

from flows.export import billing_export_frame, default_export_path, write_frame
from flows.late_data import fingerprints, stale_units, with_salt
from flows.load import (
    copy_frame,
    days_since_1970,
    load_alerts,
    load_dmas,
    load_edits,
    load_exchanges,
    load_meter_classes,
    load_meter_reads,
    load_meters,
)
from flows.meter_series import MeterSeries, MeterSeriesParams, meter_series
from flows.overrides import apply_overrides, settings_digest
from flows.store import copy_rows, lock, write_marks
from flows.window import resolve_database_url, utc, waves
from pipelines.billing import (
    BillingParams,
    all_hold_codes,
    billing_determinants,
    charge_preview,
    determinant_versions,
    with_class_hold_codes,
)
from pipelines.tariff import TieredTariff
from sql.connect import connect

FLOW = "billing_export"

BILLING_COLUMNS = (
    "meter_id", "period_start", "period_end", "version", "account", "dma_id", "timezone",
    "start_utc", "end_utc", "period_days", "period_hours", "opening_register",
    "opening_read_type", "closing_register", "closing_read_type", "volume", "unit",
    "estimated_m3", "edited_m3", "estimated_share", "flags", "methods", "exchanges", "vee_status",
    "vee_rules", "hold", "hold_codes", "charge_lines", "charge_total", "reason",
    "replaces_version", "changed_columns", "hold_reason",
)  # fmt: skip


@dataclass(frozen=True)
class BillingExportSettings:
    """billing/tariff/series: the pure functions' parameters.

    context_days: reads loaded on each side of the period, so a register at a boundary that falls
        in a gap is estimated from the reads around it.
    chunk_meters: meters per Prefect task.
    parallel_chunks: chunks in flight at once (``flows.window.waves``; 0: all).
    export_format: ``csv`` or ``parquet``.
    """

    billing: BillingParams = field(default_factory=BillingParams)
    tariff: TieredTariff = field(default_factory=TieredTariff)
    series: MeterSeriesParams = field(default_factory=MeterSeriesParams)
    context_days: int = 3
    chunk_meters: int = 1000
    parallel_chunks: int = 1
    export_format: Literal["csv", "parquet"] = "csv"


@dataclass(frozen=True)
class BillingChunk:
    meter_ids: list[str]
    inputs: list[str]


def mark_flow(period_start: date, period_end: date) -> str:
    return f"{FLOW}:{period_start.isoformat()}..{period_end.isoformat()}"


def resolve_period(
    period_start: date | None,
    period_end: date | None,
    since: datetime | None,
    until: datetime | None,
    now: datetime,
) -> tuple[date, date]:
    """Explicit dates, else the dates of [since, until), else the previous calendar month."""
    if period_start is not None and period_end is not None:
        return period_start, period_end
    if since is not None and until is not None:
        return utc(since).date(), (utc(until) - timedelta(microseconds=1)).date()
    first = now.date().replace(day=1)
    return (first - timedelta(days=1)).replace(day=1), first - timedelta(days=1)


@task(cache_policy=NO_CACHE)
def plan_billing(
    database_url: str,
    period_start: date,
    period_end: date,
    as_of: datetime,
    full: bool,
    settings: BillingExportSettings,
) -> tuple[datetime, list[BillingChunk]]:
    """(database time the run started, chunks of meters whose period inputs changed)."""
    ctx = timedelta(days=settings.context_days)
    with connect(database_url, autocommit=True) as conn:
        row = conn.execute("SELECT now()").fetchone()
        assert row is not None
        started: datetime = row[0]
        meters = load_meters(conn).filter(pl.col("channel_id").is_not_null())
        units = meters.select(
            pl.col("meter_id").alias("subject_id"),
            pl.lit(period_start).alias("day"),
            pl.lit(period_start - ctx - timedelta(days=1)).alias("lo"),
            pl.lit(period_end + ctx + timedelta(days=1)).alias("hi"),
            pl.lit(utc(period_end + ctx + timedelta(days=2))).alias("complete_at"),
        )
        inputs = fingerprints(conn, "meter", units).join(
            _hold_inputs(conn, settings, period_end), on="subject_id", how="left"
        )
        inputs = inputs.with_columns(
            pl.concat_str(["inputs", pl.col("holds").fill_null("-")], separator="|h").alias(
                "inputs"
            )
        ).drop("holds")
        inputs = with_salt(inputs, settings_digest(settings))
        stale = stale_units(
            conn, mark_flow(period_start, period_end), inputs, as_of, full=full
        ).sort("subject_id")
    size = max(settings.chunk_meters, 1)
    chunks = [
        BillingChunk(
            stale["subject_id"][i : i + size].to_list(), stale["inputs"][i : i + size].to_list()
        )
        for i in range(0, stale.height, size)
    ]
    return started, chunks


def _hold_inputs(
    conn: psycopg.Connection, settings: BillingExportSettings, period_end: date
) -> pl.DataFrame:
    """Per meter, a fingerprint of what decides its bill's hold: its class and that class's hold
    codes (a class change in the registry must refresh the hold without ``--full``) and the
    alerts that can hold it (an alert opened or closed by ``meter_anomalies`` after billing ran)."""
    return copy_frame(
        conn,
        """SELECT m.id, m.meter_class || ':' || coalesce(c.hold_codes::text, '') || ':'
                   || coalesce(a.holds, '-')
           FROM meters m
           LEFT JOIN meter_classes c ON c.id = m.meter_class
           LEFT JOIN (SELECT subject_id,
                             count(*)::text || ':' || sum(extract(epoch FROM updated_at))::text
                                 AS holds
                      FROM alerts WHERE code = ANY(%s) AND start_ts < %s
                      GROUP BY subject_id) a ON a.subject_id = m.id""",
        (all_hold_codes(_class_billing(conn, settings)), utc(period_end + timedelta(days=2))),
        {"subject_id": pl.String, "holds": pl.String},
    )


def _class_billing(conn: psycopg.Connection, settings: BillingExportSettings) -> BillingParams:
    """The billing parameters with the hold codes the registry sets per meter class."""
    classes = load_meter_classes(conn)
    return with_class_hold_codes(settings.billing, {c: v["hold_codes"] for c, v in classes.items()})


def _refresh_holds(cur: psycopg.Cursor, priced: pl.DataFrame) -> int:
    """Bring the hold of the current version up to date where no new version was written: a
    hold does not change what is billed, so it is updated in place rather than reissued."""
    if priced.height == 0:
        return 0
    cur.execute(
        """UPDATE billing_volumes b SET hold = u.hold,
               hold_codes = string_to_array(u.codes, ','), hold_reason = u.reason
           FROM unnest(%s::text[], %s::date[], %s::date[], %s::boolean[], %s::text[], %s::text[])
                AS u(meter_id, period_start, period_end, hold, codes, reason)
           WHERE b.meter_id = u.meter_id AND b.period_start = u.period_start
             AND b.period_end = u.period_end
             AND b.version = (SELECT max(version) FROM billing_volumes x
                              WHERE x.meter_id = b.meter_id AND x.period_start = b.period_start
                                AND x.period_end = b.period_end)
             AND (b.hold, b.hold_codes, b.hold_reason)
                 IS DISTINCT FROM (u.hold, string_to_array(u.codes, ','), u.reason)""",
        (
            priced["meter_id"].to_list(),
            priced["period_start"].to_list(),
            priced["period_end"].to_list(),
            priced["hold"].to_list(),
            priced["hold_codes"].list.join(",").to_list(),
            priced["hold_reason"].to_list(),
        ),
    )
    return cur.rowcount


def _issued(
    conn: psycopg.Connection, meter_ids: list[str], period_start: date, period_end: date
) -> pl.DataFrame:
    return copy_frame(
        conn,
        f"""SELECT meter_id, {days_since_1970("period_start")}, {days_since_1970("period_end")},
                   version, account, opening_register, opening_read_type, closing_register,
                   closing_read_type, volume, estimated_m3, edited_m3, vee_status
            FROM billing_volumes
            WHERE meter_id = ANY(%s) AND period_start = %s AND period_end = %s""",
        (meter_ids, period_start, period_end),
        {
            "meter_id": pl.String,
            "period_start": pl.Date,
            "period_end": pl.Date,
            "version": pl.Int32,
            "account": pl.String,
            "opening_register": pl.Float64,
            "opening_read_type": pl.String,
            "closing_register": pl.Float64,
            "closing_read_type": pl.String,
            "volume_m3": pl.Float64,
            "estimated_m3": pl.Float64,
            "edited_m3": pl.Float64,
            "vee_status": pl.String,
        },
    )


def _charges(lines: pl.DataFrame) -> pl.DataFrame:
    """Tier lines → per meter and period: ``charge_lines`` (JSON array) and ``charge_total``
    (null when any line has no amount, e.g. an unknown volume)."""
    key = ["meter_id", "period_start", "period_end"]
    line = pl.struct(
        pl.col("segment_start").cast(pl.String),
        pl.col("segment_end").cast(pl.String),
        "tariff_code",
        "tier",
        pl.col("tier_from_m3").round(6),
        pl.col("tier_to_m3").round(6),
        pl.col("tier_volume_m3").round(6),
        "price_per_m3",
        "amount",
    ).struct.json_encode()
    return lines.group_by(key, maintain_order=True).agg(
        pl.format("[{}]", line.str.join(",")).alias("charge_lines"),
        pl.when(pl.col("amount").null_count() == 0)
        .then(pl.col("amount").sum())
        .alias("charge_total"),
    )


def _write_edit_audit(cur: psycopg.Cursor, edits: pl.DataFrame, series: MeterSeries) -> int:
    """Record in ``meter_edits`` what each edit replaced, or why it was rejected."""
    if edits.height == 0:
        return 0
    key = ["meter_id", "ts", "user", "edited_at", "reason", "new_volume"]
    applied = edits.join(series.audit.select(*key, "old_volume", "old_flag", "old_method"), on=key)
    rejected = edits.join(series.rejected.select(*key, "reject_reason"), on=key)
    cur.execute(
        """UPDATE meter_edits e SET status = u.status, old_volume = u.old_volume,
               old_flag = u.old_flag, old_method = u.old_method,
               reject_reason = u.reject_reason, applied_at = now()
           FROM unnest(%s::bigint[], %s::text[], %s::float8[], %s::text[], %s::text[],
                       %s::text[]) AS u(id, status, old_volume, old_flag, old_method,
                                         reject_reason)
           WHERE e.id = u.id
             AND (e.status, e.old_volume, e.old_flag, e.old_method, e.reject_reason)
                 IS DISTINCT FROM (u.status, u.old_volume, u.old_flag, u.old_method,
                                   u.reject_reason)""",
        (
            applied["id"].to_list() + rejected["id"].to_list(),
            ["applied"] * applied.height + ["rejected"] * rejected.height,
            applied["old_volume"].to_list() + [None] * rejected.height,
            applied["old_flag"].to_list() + [None] * rejected.height,
            applied["old_method"].to_list() + [None] * rejected.height,
            [None] * applied.height + rejected["reject_reason"].to_list(),
        ),
    )
    return cur.rowcount


@task(cache_policy=NO_CACHE)
def compute_billing_chunk(
    database_url: str,
    chunk: BillingChunk,
    period_start: date,
    period_end: date,
    as_of: datetime,
    settings: BillingExportSettings,
) -> dict[str, Any]:
    ctx = timedelta(days=settings.context_days)
    lo = utc(period_start - ctx - timedelta(days=1))
    hi = min(utc(period_end + ctx + timedelta(days=2)), as_of + timedelta(microseconds=1))
    with connect(database_url, autocommit=True) as conn:
        dmas = load_dmas(conn)
        meters = load_meters(conn, meter_ids=chunk.meter_ids)
        reads = load_meter_reads(conn, meters, lo, hi)
        exchanges = load_exchanges(conn, chunk.meter_ids)
        edits = load_edits(conn, chunk.meter_ids, lo, hi)
        billing = _class_billing(conn, settings)
        alerts = load_alerts(conn, codes=all_hold_codes(billing), subject_ids=chunk.meter_ids)
        series = meter_series(
            reads,
            meters,
            exchanges,
            dmas,
            as_of=min(as_of, hi),
            edits=edits,
            params=settings.series,
        )
        periods = pl.DataFrame({"period_start": [period_start], "period_end": [period_end]})
        determinants = billing_determinants(
            periods,
            series.intervals,
            series.reads,
            meters,
            dmas=dmas,
            exchanges=exchanges,
            failures=series.failures,
            alerts=alerts,
            params=billing,
        )
        key = ["meter_id", "period_start", "period_end"]
        charges = _charges(
            charge_preview(determinants, series.intervals, settings.tariff, settings.billing)
        )
        priced = determinants.join(charges, on=key, how="left").with_columns(
            pl.col("charge_lines").fill_null("[]")
        )
        units = pl.DataFrame(
            {
                "subject_id": chunk.meter_ids,
                "day": [period_start] * len(chunk.meter_ids),
                "inputs": chunk.inputs,
            },
            schema={"subject_id": pl.String, "day": pl.Date, "inputs": pl.String},
        )
        with conn.transaction(), conn.cursor() as cur:
            # Versions are numbered from what is issued: read it under the period's lock.
            lock(cur, FLOW, period_start.isoformat(), period_end.isoformat())
            issued = _issued(conn, chunk.meter_ids, period_start, period_end)
            versions = determinant_versions(priced, issued, settings.billing)
            rows = versions.rename(
                {"volume_m3": "volume", "version_reason": "reason"}
            ).with_columns(pl.lit("m3").alias("unit"))
            written = copy_rows(cur, "billing_volumes", rows, BILLING_COLUMNS)
            holds = _refresh_holds(cur, priced)
            audited = _write_edit_audit(cur, edits, series)
            write_marks(cur, mark_flow(period_start, period_end), units, as_of)
    return {
        "meters": len(chunk.meter_ids),
        "versions": written,
        "replacements": int(rows["replaces_version"].is_not_null().sum()),
        "edits_audited": audited,
        "holds_refreshed": holds,
    }


@flow(name=FLOW, validate_parameters=False)
def billing_export(
    database_url: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    overrides: dict[str, Any] | None = None,
    full: bool = False,
    period_start: date | None = None,
    period_end: date | None = None,
    export_dir: str | None = None,
) -> dict[str, Any]:
    """Determinant versions for one billing period and an export file of the versions added.

    The period is ``period_start``..``period_end`` (local dates, inclusive), else the dates of
    [since, until), else the previous calendar month. The file goes to ``export_dir`` (default
    ``<data_dir>/exports``); a run that adds no version writes no file.
    """
    log = get_run_logger()
    settings = apply_overrides(BillingExportSettings(), overrides)
    url = resolve_database_url(database_url)
    now = datetime.now(UTC)
    start, end = resolve_period(period_start, period_end, since, until, now)
    as_of = min(now, utc(end + timedelta(days=settings.context_days + 2)))
    started, chunks = plan_billing(url, start, end, as_of, full, settings)
    log.info("%d meter(s) to bill for %s..%s", sum(len(c.meter_ids) for c in chunks), start, end)
    results = []
    for wave in waves(chunks, settings.parallel_chunks):
        futures = compute_billing_chunk.map(
            unmapped(url),
            wave,
            unmapped(start),
            unmapped(end),
            unmapped(as_of),
            unmapped(settings),
        )
        results += [f.result() for f in futures]
    versions = sum(r["versions"] for r in results)
    path: Path | None = None
    if versions:
        from aquameter.settings import get_settings

        directory = Path(export_dir) if export_dir else get_settings().data_path("exports")
        with connect(url, autocommit=True) as conn:
            frame = billing_export_frame(conn, start, end, computed_since=started)
        path = write_frame(
            frame,
            default_export_path(directory, start, end, settings.export_format, started),
            settings.export_format,
        )
        log.info("exported %d determinant(s) to %s", frame.height, path)
    return {
        "flow": FLOW,
        "period_start": start.isoformat(),
        "period_end": end.isoformat(),
        "meters": sum(r["meters"] for r in results),
        "versions": versions,
        "replacements": sum(r["replacements"] for r in results),
        "export_path": str(path) if path else None,
    }
