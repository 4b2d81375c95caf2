"""The operator report: one self-contained HTML page with PNG charts beside it.

Every number and every curve comes from the database (``readings``/``readings_hourly`` of the DMA
boundary channels, ``dma_daily``, ``alerts``, ``water_balance``, ``read_rates``,
``billing_export``, and ``flow_runs`` for each analytics flow's latest outcome), never from the
simulator's memory: the page shows what the system stored and
computed, so the same page can be rebuilt later (``aquameter report``) and a broken pipeline shows
as a gap instead of being papered over by the truth. The simulator's fault manifest is optional
and only *annotates*: injected onsets on the charts, and an injected-vs-detected table that checks
each detection's start against the onset (a stated tolerance per fault kind) and counts false
alerts. Everything except :func:`load_report_frames` and :func:`write_report` is pure on frames;
the page uses no external URL, so it opens offline and in a sandboxed browser.

A flow whose latest run over the window failed gets a red banner at the top of the page (flow,
when, its one-line error): a missed fault or an empty chart may only mean that the flow which
should have filled it did not run, and a reader must see that before trusting any figure. A
database migrated before ``flow_runs`` existed (migration 0009) still gets its report, with a line
saying flow outcomes are unavailable.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402

UTC_US = pl.Datetime("us", "UTC")

# Net inflow per DMA and hour: inlets minus outlets. Hourly rollups where they exist, the raw
# readings for the hours the rollups do not hold yet (nothing refreshes them in a demo run, and
# the live day is never rolled up when the report runs), so the curve is complete either way.
_INFLOW_SQL = """
WITH ch AS (
    SELECT id, dma_id, CASE role WHEN 'inlet' THEN 1.0 ELSE -1.0 END AS sign
    FROM channels
    WHERE dma_id IS NOT NULL AND quantity = 'flow' AND role IN ('inlet', 'outlet')
), h AS (
    SELECT channel_id, bucket, vavg FROM readings_hourly
    WHERE channel_id IN (SELECT id FROM ch) AND bucket >= %(since)s AND bucket < %(until)s
), r AS (
    SELECT channel_id, date_bin('1 hour', ts, timestamptz '2000-01-03 00:00+00') AS bucket,
           avg(value) AS vavg
    FROM readings
    WHERE channel_id IN (SELECT id FROM ch) AND ts >= %(since)s AND ts < %(until)s
    GROUP BY 1, 2
), u AS (
    SELECT * FROM h
    UNION ALL
    SELECT * FROM r
    WHERE NOT EXISTS (SELECT 1 FROM h WHERE h.channel_id = r.channel_id AND h.bucket = r.bucket)
)
SELECT ch.dma_id, u.bucket AS ts, sum(ch.sign * u.vavg) AS flow_m3h
FROM u JOIN ch ON ch.id = u.channel_id
GROUP BY 1, 2 ORDER BY 1, 2
"""

_QUERIES: dict[str, tuple[str, dict[str, Any]]] = {
    "dmas": ("SELECT id FROM dmas ORDER BY id", {"dma_id": pl.String}),
    "inflow": (_INFLOW_SQL, {"dma_id": pl.String, "ts": UTC_US, "flow_m3h": pl.Float64}),
    "alerts": (
        "SELECT code, subject_id, start_ts, end_ts, status, severity, evidence::text FROM alerts "
        "WHERE start_ts < %(until)s AND (end_ts IS NULL OR end_ts >= %(since)s) ORDER BY start_ts",
        {"code": pl.String, "subject_id": pl.String, "start_ts": UTC_US, "end_ts": UTC_US,
         "status": pl.String, "severity": pl.String, "evidence": pl.String},
    ),
    "dma_daily": (
        "SELECT dma_id, day, mnf_m3h, mnf_start_ts, nnf_m3h, inflow_m3 FROM dma_daily "
        "WHERE day >= %(since)s::date - 1 AND day <= %(until)s::date ORDER BY dma_id, day",
        {"dma_id": pl.String, "day": pl.Date, "mnf_m3h": pl.Float64, "mnf_start_ts": UTC_US,
         "nnf_m3h": pl.Float64, "inflow_m3": pl.Float64},
    ),
    "water_balance": (
        "SELECT dma_id, period, component, value_m3, source FROM water_balance "
        "ORDER BY dma_id, period",
        {"dma_id": pl.String, "period": pl.String, "component": pl.String,
         "value_m3": pl.Float64, "source": pl.String},
    ),
    "water_balance_summary": (
        "SELECT dma_id, period, siv_m3, billed_authorized_m3, nrw_m3, nrw_pct, carl_m3, ili "
        "FROM water_balance_summary ORDER BY dma_id, period",
        {"dma_id": pl.String, "period": pl.String, "siv_m3": pl.Float64,
         "billed_authorized_m3": pl.Float64, "nrw_m3": pl.Float64, "nrw_pct": pl.Float64,
         "carl_m3": pl.Float64, "ili": pl.Float64},
    ),
    "read_rates": (
        "SELECT day, dma_id, gateway, vendor_id, expected_reads, received_reads, rate "
        "FROM read_rates WHERE day >= %(since)s::date - 1 AND day <= %(until)s::date "
        "ORDER BY day",
        {"day": pl.Date, "dma_id": pl.String, "gateway": pl.String, "vendor_id": pl.String,
         "expected_reads": pl.Int64, "received_reads": pl.Int64, "rate": pl.Float64},
    ),
    "billing": (
        "SELECT period_start, period_end, count(*), "
        "round(sum(volume)::numeric, 3)::float8, round(sum(estimated_m3)::numeric, 3)::float8, "
        "count(*) FILTER (WHERE hold), count(*) FILTER (WHERE is_replacement), "
        "count(*) FILTER (WHERE vee_status <> 'VALID') "
        "FROM billing_export "
        "WHERE period_end >= %(since)s::date AND period_start <= %(until)s::date "
        "GROUP BY 1, 2 ORDER BY 1, 2",
        {"period_start": pl.Date, "period_end": pl.Date, "meters": pl.Int64,
         "volume_m3": pl.Float64, "estimated_m3": pl.Float64, "on_hold": pl.Int64,
         "replacements": pl.Int64, "not_valid": pl.Int64},
    ),
    "meters": (
        "SELECT id, dma_id FROM meters ORDER BY id",
        {"meter_id": pl.String, "dma_id": pl.String},
    ),
}  # fmt: skip


# The latest run of each flow that concerns the window: its computed window overlaps the report's,
# or (a run recorded without any window) it finished after the window began. A run over other
# days says nothing about this page's figures.
FLOW_RUNS_SQL = """
SELECT DISTINCT ON (flow) flow, status, started_at, finished_at,
       extract(epoch FROM finished_at - started_at)::float8, error
FROM flow_runs
WHERE (window_since IS NULL OR window_since < %(until)s)
  AND (window_until IS NULL OR window_until > %(since)s)
  AND (window_since IS NOT NULL OR window_until IS NOT NULL OR finished_at >= %(since)s)
ORDER BY flow, finished_at DESC, id DESC
"""
FLOW_RUNS_SCHEMA: dict[str, Any] = {
    "flow": pl.String,
    "status": pl.String,
    "started_at": UTC_US,
    "finished_at": UTC_US,
    "seconds": pl.Float64,
    "error": pl.String,
}


def load_report_frames(url: str, since: datetime, until: datetime) -> dict[str, pl.DataFrame]:
    """The report's inputs from the database (the only reads of this module).

    Also ``window`` (one row: ``since``, ``until``) so the page states what it covers, and
    ``flow_runs`` (:data:`FLOW_RUNS_SQL`), left out when the database has no such table (migrated
    before 0009): the page then says flow outcomes are unavailable instead of failing."""
    from sql.connect import connect

    out: dict[str, pl.DataFrame] = {}
    params = {"since": since, "until": until}
    with connect(url) as conn:
        for name, (sql, schema) in _QUERIES.items():
            rows = conn.execute(sql, params).fetchall()  # type: ignore[arg-type]
            out[name] = pl.DataFrame(rows, schema=schema, orient="row")
        has_runs = conn.execute("SELECT to_regclass('flow_runs') IS NOT NULL").fetchone()
        if has_runs is not None and has_runs[0]:
            rows = conn.execute(FLOW_RUNS_SQL, params).fetchall()  # type: ignore[arg-type]
            out["flow_runs"] = pl.DataFrame(rows, schema=FLOW_RUNS_SCHEMA, orient="row")
    out["window"] = pl.DataFrame(
        {"since": [since], "until": [until]}, schema={"since": UTC_US, "until": UTC_US}
    )
    return out


# --- injected vs detected ------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    """How far a detection's start may lie from the injected onset and still count as finding it.

    ``before`` exists because some conditions legitimately start just ahead of the onset (a leak's
    run of non-zero intervals begins with the household's own use before it); ``after`` is the
    detector's documented delay (one interval for meter conditions, one reporting period for
    comms loss, the next night or two for a DMA leak, whose alert is stamped on a night's MNF)."""

    before: timedelta
    after: timedelta

    def label(self) -> str:
        return f"−{_span(self.before)} / +{_span(self.after)}"


def _span(d: timedelta) -> str:
    s = int(d.total_seconds())
    if s % 86400 == 0:
        return f"{s // 86400} d"
    if s % 3600 == 0:
        return f"{s // 3600} h"
    return f"{s // 60} min"


_H, _D = timedelta(hours=1), timedelta(days=1)
TOLERANCES: dict[str, Tolerance] = {
    "LEAK_CONTINUOUS": Tolerance(12 * _H, 2 * _H),
    "BURST": Tolerance(1 * _H, 2 * _H),
    "REVERSE_FLOW": Tolerance(1 * _H, 2 * _H),
    "STUCK_METER": Tolerance(12 * _H, 2 * _H),
    "TAMPER": Tolerance(1 * _H, 2 * _H),
    "LOW_BATTERY": Tolerance(1 * _H, 2 * _H),
    "COMMS_LOSS": Tolerance(1 * _H, 1 * _D),
    "OVER_CAPACITY": Tolerance(1 * _H, 2 * _H),
    "DMA_LEAK": Tolerance(1 * _H, 3 * _D),
}
DEFAULT_TOLERANCE = Tolerance(1 * _H, 1 * _D)

FAULT_COLUMNS: dict[str, Any] = {
    "fault": pl.String,
    "subject": pl.String,
    "expected": pl.String,
    "start": pl.String,
    "detected": pl.String,
    "delay": pl.String,
    "tolerance": pl.String,
    "outcome": pl.String,
    "count": pl.Int64,
}


def _ts(value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def _fmt_ts(t: datetime | None) -> str:
    return "" if t is None else t.astimezone(UTC).strftime("%Y-%m-%d %H:%M")


def _fmt_delay(d: timedelta) -> str:
    sign = "−" if d < timedelta(0) else "+"
    minutes = int(abs(d).total_seconds() // 60)
    return f"{sign}{minutes // 60} h {minutes % 60:02d} min"


def _window_of(f: Mapping[str, Any]) -> tuple[str, datetime | None, datetime | None, Tolerance]:
    tol = TOLERANCES.get(str(f["code"]), DEFAULT_TOLERANCE)
    return str(f["code"]), _ts(f.get("start")), _ts(f.get("end")), tol


def _belongs(f: Mapping[str, Any], code: str, subject: str, start: datetime) -> bool:
    """An alert belongs to fault ``f``: same expected code and subject, starting no earlier than
    the onset's tolerance and no later than the fault's end plus tolerance (later episodes of a
    long fault, e.g. a leak that paused, are the same fault, not false alerts)."""
    if (str(f["alert"]), str(f["subject"])) != (code, subject):
        return False
    _, onset, end, tol = _window_of(f)
    if onset is None:
        return True
    return start >= onset - tol.before and (end is None or start <= end + tol.after)


def alert_verdicts(faults: Sequence[Mapping[str, Any]], alerts: pl.DataFrame) -> pl.Series:
    """Per alert row: the injected fault it belongs to (``CODE on SUBJECT``) or ``false``."""
    out: list[str] = []
    for code, subject, start in alerts.select("code", "subject_id", "start_ts").iter_rows():
        match = next((f for f in faults if _belongs(f, code, subject, start)), None)
        out.append("false" if match is None else f"{match['code']} on {match['subject']}")
    return pl.Series("injected", out, dtype=pl.String)


def compare_faults(
    faults: Sequence[Mapping[str, Any]],
    alerts: pl.DataFrame,
    meters: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Injected faults against detected alerts.

    One row per fault: ``detected`` when an alert of the expected code on its subject starts
    within the fault kind's tolerance of the onset (:data:`TOLERANCES`, stated in the row), else
    ``missed`` (``detected``/``delay`` then show the nearest alert, if any, so a late or early
    detection is visible as such). A fault without an onset (``start`` null) is detected by any
    alert of its code on its subject. Then one ``false`` row per alert code with alerts that
    belong to no injected fault, with their count. ``meters`` is unused (kept for callers)."""
    del meters
    rows: list[dict[str, Any]] = []
    for f in faults:
        _, onset, _, tol = _window_of(f)
        key = (str(f["alert"]), str(f["subject"]))
        mine = alerts.filter((pl.col("code") == key[0]) & (pl.col("subject_id") == key[1]))
        starts: list[datetime] = mine["start_ts"].to_list()
        detected_at: datetime | None = None
        nearest: datetime | None = None
        if onset is None:
            detected_at = min(starts, default=None)
            nearest = detected_at
        else:
            ok = [s for s in starts if onset - tol.before <= s <= onset + tol.after]
            detected_at = min(ok, default=None)
            nearest = detected_at or min(starts, key=lambda s: abs(s - onset), default=None)
        rows.append(
            {
                "fault": str(f["code"]),
                "subject": key[1],
                "expected": key[0],
                "start": _fmt_ts(onset),
                "detected": _fmt_ts(nearest),
                "delay": "" if nearest is None or onset is None else _fmt_delay(nearest - onset),
                "tolerance": "any time" if onset is None else tol.label(),
                "outcome": "detected" if detected_at is not None else "missed",
                "count": 1,
            }
        )
    if alerts.height:
        verdicts = alerts.with_columns(alert_verdicts(faults, alerts))
        false = (
            verdicts.filter(pl.col("injected") == "false")
            .group_by("code")
            .agg(pl.len().alias("count"), pl.col("subject_id").n_unique().alias("subjects"))
            .sort("code")
        )
        for code, count, subjects in false.iter_rows():
            rows.append(
                {
                    "fault": "—",
                    "subject": f"{subjects} subject(s)",
                    "expected": str(code),
                    "start": "",
                    "detected": "",
                    "delay": "",
                    "tolerance": "",
                    "outcome": "false",
                    "count": int(count),
                }
            )
    return pl.DataFrame(rows, schema=FAULT_COLUMNS)


def manifest_faults(manifest: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The manifest's fault entries (``simulators.faults.Fault.to_json``), or none."""
    return [dict(f) for f in (manifest or {}).get("faults", [])]


# --- the alert worklist --------------------------------------------------------------------------

_SEVERITY_RANK = {"critical": 0, "major": 1, "high": 1, "warning": 2, "minor": 3, "info": 4}
WORKLIST_LIMIT = 500


def _evidence_text(raw: str | None, width: int = 160) -> str:
    """``{"rate_lph": 21.3, ...}`` → ``rate_lph=21.3, …``: readable in a table cell."""
    if not raw:
        return ""
    try:
        data = json.loads(raw)
    except ValueError:
        return raw[:width]
    if not isinstance(data, dict):
        return str(data)[:width]
    parts = []
    for k, v in data.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, dict | list):
            v = json.dumps(v, separators=(",", ":"))
        parts.append(f"{k}={v}")
    text = ", ".join(parts)
    return text if len(text) <= width else text[: width - 1] + "…"


def alert_worklist(
    alerts: pl.DataFrame, faults: Sequence[Mapping[str, Any]] | None = None
) -> pl.DataFrame:
    """Alerts as an operator works them: open ones first, then by severity and newest start;
    columns subject, code, start, end, severity, evidence (and ``injected`` when the truth is
    known, so a demo reader sees which alerts are false)."""
    rank = pl.col("severity").replace_strict(_SEVERITY_RANK, default=9, return_dtype=pl.Int32)
    ordered = alerts.sort(
        [pl.col("status") != "open", rank, pl.col("start_ts")], descending=[False, False, True]
    )
    out = ordered.select(
        pl.col("subject_id").alias("subject"),
        "code",
        pl.col("start_ts").dt.strftime("%Y-%m-%d %H:%M").alias("start"),
        pl.col("end_ts").dt.strftime("%Y-%m-%d %H:%M").fill_null("open").alias("end"),
        "severity",
        pl.col("evidence").map_elements(_evidence_text, return_dtype=pl.String).alias("evidence"),
    )
    if faults is not None:
        out = out.with_columns(alert_verdicts(faults, ordered))
    return out


# --- charts --------------------------------------------------------------------------------------


def _leak_onsets(manifest: Mapping[str, Any] | None, dma_id: str) -> list[datetime]:
    return [
        t
        for f in manifest_faults(manifest)
        if f["code"] == "DMA_LEAK" and f["subject"] == dma_id and (t := _ts(f.get("start")))
    ]


def plot_inflow(
    dma_id: str,
    inflow: pl.DataFrame,
    daily: pl.DataFrame,
    manifest: Mapping[str, Any] | None,
    path: Path,
) -> Path:
    """Hourly net inflow as stored (inlets − outlets), each night's MNF from ``dma_daily`` and,
    when known, the injected leak onset: the chart an operator reads a new leak from."""
    fig, ax = plt.subplots(figsize=(11, 3.2), dpi=90)
    f = inflow.filter(pl.col("dma_id") == dma_id).sort("ts")
    ax.plot(f["ts"].to_list(), f["flow_m3h"].to_list(), lw=0.7, color="#3b7dd8",
            label="net inflow (hourly mean, stored)")  # fmt: skip
    d = daily.filter((pl.col("dma_id") == dma_id) & pl.col("mnf_start_ts").is_not_null())
    ax.scatter(d["mnf_start_ts"].to_list(), d["mnf_m3h"].to_list(), s=14, color="#d83b3b",
               zorder=3, label="MNF (dma_daily)")  # fmt: skip
    for i, onset in enumerate(_leak_onsets(manifest, dma_id)):
        ax.axvline(onset, color="#222", ls="--", lw=1.2,  # type: ignore[arg-type]
                   label="leak onset (injected)" if i == 0 else None)  # fmt: skip
    if f.height == 0:
        ax.text(0.5, 0.5, "no boundary flow stored for this window", transform=ax.transAxes,
                ha="center", va="center", color="#a00")  # fmt: skip
    ax.set_ylabel("m³/h")
    ax.set_title(f"{dma_id}: net inflow and minimum night flow")
    ax.legend(loc="upper left", fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_nnf(
    dma_id: str, daily: pl.DataFrame, manifest: Mapping[str, Any] | None, path: Path
) -> Path:
    """Net night flow per night: a leak is a step in this line."""
    fig, ax = plt.subplots(figsize=(11, 2.6), dpi=90)
    d = daily.filter(pl.col("dma_id") == dma_id).sort("day")
    ax.plot(d["day"].to_list(), d["nnf_m3h"].to_list(), marker="o", ms=3, color="#7a3bd8")
    for onset in _leak_onsets(manifest, dma_id):
        ax.axvline(onset.date(), color="#222", ls="--", lw=1.2)  # type: ignore[arg-type]
    ax.set_ylabel("NNF m³/h")
    ax.set_title(f"{dma_id}: net night flow (MNF − legitimate night use)")
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_nrw(summary: pl.DataFrame, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3), dpi=90)
    ids = summary["dma_id"].to_list()
    ax.bar(ids, summary["nrw_pct"].fill_null(0).to_list(), color="#d8893b")
    ax.set_ylabel("NRW %")
    ax.set_title("Non-revenue water per DMA")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_alerts(alerts: pl.DataFrame, path: Path) -> Path:
    """Episodes as bars from start to end (open ones to the right edge), one row per code."""
    codes = sorted(set(alerts["code"].to_list()))
    fig, ax = plt.subplots(figsize=(11, max(2.0, 0.45 * len(codes) + 1)), dpi=90)
    right = alerts.select(pl.max_horizontal(pl.col("start_ts").max(), pl.col("end_ts").max()))
    edge = right.item()
    for i, code in enumerate(codes):
        a = alerts.filter(pl.col("code") == code)
        for start, end in a.select("start_ts", "end_ts").iter_rows():
            ax.plot([start, end or edge], [i, i], lw=4, alpha=0.5, solid_capstyle="butt")
        ax.scatter(a["start_ts"].to_list(), [i] * a.height, s=18, zorder=3)
    ax.set_yticks(range(len(codes)), codes)
    ax.set_title("Alert timeline (episodes; dots mark starts)")
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_read_rates(rates: pl.DataFrame, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(11, 3), dpi=90)
    for (dma, gw, vendor), part in rates.group_by(
        ["dma_id", "gateway", "vendor_id"], maintain_order=True
    ):
        p = part.sort("day")
        ax.plot(p["day"].to_list(), (p["rate"] * 100).to_list(), label=f"{dma} {gw} {vendor}")
    ax.set_ylabel("read rate %")
    ax.set_title("Read rate per gateway and vendor")
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# --- the page ------------------------------------------------------------------------------------


def _table(frame: pl.DataFrame, classes: Mapping[str, str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    body = []
    for row in frame.iter_rows():
        cells = []
        for v in row:
            text = f"{v:,.1f}" if isinstance(v, float) else ("" if v is None else str(v))
            cls = (classes or {}).get(text, "")
            cells.append(f'<td class="{cls}">{html.escape(text)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def failed_flow_lines(runs: pl.DataFrame | None, extra: Iterable[str] = ()) -> list[str]:
    """One line per failed flow for the banner: each flow whose latest run (``flow_runs`` frame)
    failed — flow, when, its one-line error — then the ``extra`` lines (failures the caller saw
    that left no row, e.g. flows never started because the Prefect API did not come up) that do
    not repeat a recorded error."""
    lines: list[str] = []
    recorded: set[str] = set()
    if runs is not None:
        failed = runs.filter(pl.col("status") == "failed").sort("flow")
        for flow, finished, seconds, error in failed.select(
            "flow", "finished_at", "seconds", "error"
        ).iter_rows():
            recorded.add(str(error or ""))
            # The recorded error is FlowFailed's line ("flow NAME FAILED: ..."): said once.
            detail = str(error or "(no message)").removeprefix(f"flow {flow} FAILED: ")
            lines.append(
                f"flow {flow} failed at {_fmt_ts(finished)} UTC after {seconds or 0.0:.1f} s: "
                f"{detail}"
            )
    lines += [str(x) for x in extra if str(x) not in recorded]
    return lines


def _failure_banner(failures: Iterable[str]) -> str:
    items = "".join(f"<li>{html.escape(str(f))}</li>" for f in failures)
    return (
        "<div class='failures' role='alert'><strong>Analytics flows failed: the figures below "
        f"may be incomplete or stale.</strong><ul>{items}</ul></div>"
    )


def flow_runs_table(runs: pl.DataFrame) -> pl.DataFrame:
    """Each flow's latest run as the page shows it: flow, status, finished (UTC), duration."""
    return runs.sort("flow").select(
        "flow",
        "status",
        pl.col("finished_at").dt.strftime("%Y-%m-%d %H:%M:%S").alias("finished"),
        pl.col("seconds").map_elements(lambda s: f"{s:.1f} s", return_dtype=pl.String)
        .alias("duration"),
    )  # fmt: skip


def _flow_runs_section(runs: pl.DataFrame | None) -> str:
    if runs is None:
        return (
            "<p class='note flows'>Flow outcomes are unavailable: this database has no "
            "<code>flow_runs</code> table (run <code>aquameter db migrate</code>).</p>"
        )
    if runs.height == 0:
        return "<p class='note flows'>No analytics flow run is recorded for this window.</p>"
    return "<h2>Analytics flows (latest run)</h2>" + _table(
        flow_runs_table(runs), {"failed": "missed", "completed": "detected"}
    )


_CSS = """body{font-family:sans-serif;margin:24px;color:#222}h1{margin-bottom:0}
table{border-collapse:collapse;margin:8px 0 20px}td,th{border:1px solid #ccc;padding:3px 8px;
font-size:13px}th{background:#eef}td.detected{background:#cfc}td.missed{background:#fcc}
td.false{background:#ffd}img{max-width:100%;display:block;margin:6px 0 18px}
.failures{background:#c62828;color:#fff;padding:10px 16px;margin:0 0 16px;border-radius:4px}
.failures ul{margin:6px 0 0}.note{color:#555;font-size:13px}"""


def _window_text(frames: Mapping[str, pl.DataFrame], manifest: Mapping[str, Any] | None) -> str:
    w = frames.get("window")
    if w is not None and w.height:
        since, until = w.row(0)
        return f"{_fmt_ts(since)} → {_fmt_ts(until)} UTC"
    if manifest and "window" in manifest:
        return f"{manifest['window']['start']} → {manifest['window']['end']}"
    return "whole database"


def build_report(
    frames: Mapping[str, pl.DataFrame],
    dma_flow: pl.DataFrame | None,
    manifest: Mapping[str, Any] | None,
    faults: pl.DataFrame | None,
    out_dir: Path,
    *,
    failures: list[str] | None = None,
) -> Path:
    """Write ``index.html`` and its PNGs into ``out_dir``; returns the page's path.

    ``frames`` come from :func:`load_report_frames`. ``dma_flow`` is ignored: it used to be the
    simulator's true inflow, and the report now draws only what the database holds (kept as a
    parameter so existing callers work; pass None). ``manifest`` (optional) annotates injected
    onsets and marks false alerts in the worklist; ``faults`` is :func:`compare_faults`' table
    (computed from the manifest when None). Every flow whose latest run in
    ``frames["flow_runs"]`` failed gets a line in a red banner on top, so nobody trusts a page
    built on half the analytics; ``failures`` adds lines for failures that left no row (a repeat
    of a recorded error is dropped).
    """
    del dma_flow
    out_dir.mkdir(parents=True, exist_ok=True)
    daily = frames["dma_daily"]
    alerts = frames["alerts"]
    truth = manifest_faults(manifest) if manifest is not None else None
    if faults is None and truth is not None:
        faults = compare_faults(truth, alerts)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Aquameter report</title>"
        f"<style>{_CSS}</style></head><body>",
    ]
    runs = frames.get("flow_runs")
    banner = failed_flow_lines(runs, failures or ())
    if banner:
        parts.append(_failure_banner(banner))
    parts += [
        "<h1>Aquameter report</h1>",
        f"<p>Window {html.escape(_window_text(frames, manifest))}, "
        f"{frames['meters'].height:,} customer meters. Every figure is read from the database."
        "</p>",
        _flow_runs_section(runs),
    ]
    if faults is not None and faults.height:
        parts += [
            "<h2>Injected faults vs detected alerts</h2>",
            "<p class='note'>A fault counts as detected when an alert of the expected code on "
            "its subject starts within the stated tolerance of the injected onset; "
            "<em>false</em> rows count alerts that belong to no injected fault.</p>",
            _table(faults, {"detected": "detected", "missed": "missed", "false": "false"}),
        ]
    inflow = frames.get("inflow", pl.DataFrame(schema=_QUERIES["inflow"][1]))
    dma_ids = frames["dmas"]["dma_id"].to_list() if "dmas" in frames else []
    for dma_id in dma_ids or sorted(set(inflow["dma_id"].to_list())):
        parts.append(f"<h2>{html.escape(dma_id)}</h2>")
        a = plot_inflow(dma_id, inflow, daily, manifest, out_dir / f"inflow_{dma_id}.png")
        b = plot_nnf(dma_id, daily, manifest, out_dir / f"nnf_{dma_id}.png")
        parts += [f"<img src='{a.name}' alt='net inflow {html.escape(dma_id)}'>",
                  f"<img src='{b.name}' alt='NNF {html.escape(dma_id)}'>"]  # fmt: skip
    parts.append("<h2>Water balance (IWA)</h2>")
    wb = frames["water_balance"]
    if wb.height:
        pivot = wb.pivot(
            on="dma_id", index="component", values="value_m3", aggregate_function="first"
        )
        parts.append(_table(pivot))
    summary = frames["water_balance_summary"]
    parts.append(_table(summary))
    if summary.height:
        parts.append(f"<img src='{plot_nrw(summary, out_dir / 'nrw.png').name}' alt='NRW'>")
    parts.append("<h2>Alerts</h2>")
    if alerts.height:
        parts.append(f"<img src='{plot_alerts(alerts, out_dir / 'alerts.png').name}' alt='alerts'>")
    work = alert_worklist(alerts, truth)
    shown = work.head(WORKLIST_LIMIT)
    parts.append(
        f"<p class='note'>{alerts.height:,} alert episode(s), "
        f"{alerts.filter(pl.col('status') == 'open').height:,} open"
        + (f"; the first {WORKLIST_LIMIT} shown" if work.height > WORKLIST_LIMIT else "")
        + ".</p>"
    )
    parts.append(_table(shown, {"false": "false"}))
    parts.append("<h2>Read rates per gateway</h2>")
    rates = frames["read_rates"]
    if rates.height:
        img = plot_read_rates(rates, out_dir / "read_rates.png").name
        parts.append(f"<img src='{img}' alt='read rates'>")
    parts.append("<h2>Billing determinants</h2>")
    billing = frames.get("billing")
    if billing is not None and billing.height:
        parts.append(_table(billing))
    else:
        parts.append("<p class='note'>No billing period computed in this window.</p>")
    parts.append("</body></html>")
    page = out_dir / "index.html"
    page.write_text("\n".join(parts), encoding="utf-8")
    return page


@dataclass(frozen=True)
class WrittenReport:
    """What :func:`write_report` wrote and found, for a caller that prints a summary.

    ``failed_flows`` are the banner's lines (empty: no banner); ``flow_outcomes`` is False when
    the database has no ``flow_runs`` table, so nothing is known about the flows."""

    page: Path
    faults: pl.DataFrame
    failed_flows: list[str]
    flow_outcomes: bool


def write_report(
    url: str,
    out_dir: Path,
    since: datetime,
    until: datetime,
    *,
    manifest: Mapping[str, Any] | None = None,
    extra_faults: Sequence[Mapping[str, Any]] = (),
    failures: list[str] | None = None,
) -> WrittenReport:
    """Load from the database, compare with the manifest (plus ``extra_faults``, truths the
    manifest does not hold, e.g. the demo's water-quality excursion) and write the page.
    The injected-vs-detected table is empty without a manifest."""
    frames = load_report_frames(url, since, until)
    truth = manifest_faults(manifest) + [dict(f) for f in extra_faults]
    table = (
        compare_faults(truth, frames["alerts"])
        if manifest is not None or extra_faults
        else pl.DataFrame(schema=FAULT_COLUMNS)
    )
    full = {**(manifest or {}), "faults": truth}
    page = build_report(frames, None, full if truth else manifest, table, out_dir,
                        failures=failures)  # fmt: skip
    runs = frames.get("flow_runs")
    return WrittenReport(page, table, failed_flow_lines(runs, failures or ()), runs is not None)
