"""The demo report: one self-contained HTML page with PNG charts beside it.

Built from the analytics tables (``dma_daily``, ``alerts``, ``water_balance``, ``read_rates``) and
the simulator's ground-truth manifest, so a reader sees both what the system computed and whether
it found what was injected. Everything except :func:`load_report_frames` is pure on frames; the
page uses no external URL, so it opens offline and in a sandboxed browser.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402

UTC_US = pl.Datetime("us", "UTC")

_QUERIES: dict[str, tuple[str, dict[str, Any]]] = {
    "alerts": (
        "SELECT code, subject_id, start_ts, end_ts, status, severity FROM alerts "
        "WHERE start_ts < %(until)s AND (end_ts IS NULL OR end_ts >= %(since)s) ORDER BY start_ts",
        {"code": pl.String, "subject_id": pl.String, "start_ts": UTC_US, "end_ts": UTC_US,
         "status": pl.String, "severity": pl.String},
    ),
    "dma_daily": (
        "SELECT dma_id, day, mnf_m3h, mnf_start_ts, nnf_m3h, inflow_m3 FROM dma_daily "
        "ORDER BY dma_id, day",
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
        "FROM read_rates ORDER BY day",
        {"day": pl.Date, "dma_id": pl.String, "gateway": pl.String, "vendor_id": pl.String,
         "expected_reads": pl.Int64, "received_reads": pl.Int64, "rate": pl.Float64},
    ),
    "meters": (
        "SELECT id, dma_id FROM meters ORDER BY id",
        {"meter_id": pl.String, "dma_id": pl.String},
    ),
}  # fmt: skip


def load_report_frames(url: str, since: datetime, until: datetime) -> dict[str, pl.DataFrame]:
    """The report's inputs from the database (the only I/O of this module besides writing)."""
    from sql.connect import connect

    out: dict[str, pl.DataFrame] = {}
    with connect(url) as conn:
        for name, (sql, schema) in _QUERIES.items():
            rows = conn.execute(sql, {"since": since, "until": until}).fetchall()  # type: ignore[arg-type]
            out[name] = pl.DataFrame(rows, schema=schema, orient="row")
    return out


def compare_faults(
    faults: Sequence[Mapping[str, Any]], alerts: pl.DataFrame, meters: pl.DataFrame
) -> pl.DataFrame:
    """Injected faults against detected alerts: one row per fault (``detected`` when an alert
    of the expected code names its subject, else ``missed``), then one row per alert code with
    alerts on subjects nothing was injected into (``false``, with their count)."""
    found = {(c, s) for c, s in alerts.select("code", "subject_id").iter_rows()}
    rows = []
    expected: set[tuple[str, str]] = set()
    for f in faults:
        key = (str(f["alert"]), str(f["subject"]))
        expected.add(key)
        rows.append(
            {
                "fault": str(f["code"]),
                "subject": key[1],
                "expected": key[0],
                "start": f.get("start") or "",
                "outcome": "detected" if key in found else "missed",
                "count": 1,
            }
        )
    false = (
        alerts.filter(
            ~pl.struct("code", "subject_id").is_in(
                [{"code": c, "subject_id": s} for c, s in expected]
            )
        )
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
                "outcome": "false",
                "count": int(count),
            }
        )
    return pl.DataFrame(
        rows,
        schema={
            "fault": pl.String,
            "subject": pl.String,
            "expected": pl.String,
            "start": pl.String,
            "outcome": pl.String,
            "count": pl.Int64,
        },  # fmt: skip
    )


# --- charts --------------------------------------------------------------------------------------


def _leak_onsets(manifest: Mapping[str, Any], dma_id: str) -> list[datetime]:
    return [
        datetime.fromisoformat(str(f["start"]).replace("Z", "+00:00"))
        for f in manifest.get("faults", [])
        if f["code"] == "DMA_LEAK" and f["subject"] == dma_id
    ]


def plot_inflow(
    dma_id: str,
    flow: pl.DataFrame,
    daily: pl.DataFrame,
    manifest: Mapping[str, Any],
    path: Path,
) -> Path:
    """Net inflow with each night's MNF point and the injected leak onset."""
    fig, ax = plt.subplots(figsize=(11, 3.2), dpi=90)
    f = flow.filter(pl.col("dma_id") == dma_id).sort("ts")
    ax.plot(f["ts"].to_list(), f["flow_m3h"].to_list(), lw=0.6, color="#3b7dd8", label="net inflow")
    d = daily.filter((pl.col("dma_id") == dma_id) & pl.col("mnf_start_ts").is_not_null())
    ax.scatter(d["mnf_start_ts"].to_list(), d["mnf_m3h"].to_list(), s=14, color="#d83b3b",
               zorder=3, label="MNF")  # fmt: skip
    for onset in _leak_onsets(manifest, dma_id):
        ax.axvline(onset, color="#222", ls="--", lw=1.2, label="leak onset (injected)")  # type: ignore[arg-type]
    ax.set_ylabel("m³/h")
    ax.set_title(f"{dma_id}: net inflow and minimum night flow")
    ax.legend(loc="upper left", fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_nnf(dma_id: str, daily: pl.DataFrame, manifest: Mapping[str, Any], path: Path) -> Path:
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
    codes = sorted(set(alerts["code"].to_list()))
    fig, ax = plt.subplots(figsize=(11, max(2.0, 0.45 * len(codes) + 1)), dpi=90)
    for i, code in enumerate(codes):
        a = alerts.filter(pl.col("code") == code)
        ax.scatter(a["start_ts"].to_list(), [i] * a.height, s=18)
    ax.set_yticks(range(len(codes)), codes)
    ax.set_title("Alert timeline (episode starts)")
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


_CSS = """body{font-family:sans-serif;margin:24px;color:#222}h1{margin-bottom:0}
table{border-collapse:collapse;margin:8px 0 20px}td,th{border:1px solid #ccc;padding:3px 8px;
font-size:13px}th{background:#eef}td.detected{background:#cfc}td.missed{background:#fcc}
td.false{background:#ffd}img{max-width:100%;display:block;margin:6px 0 18px}"""


def build_report(
    frames: Mapping[str, pl.DataFrame],
    dma_flow: pl.DataFrame,
    manifest: Mapping[str, Any],
    faults: pl.DataFrame,
    out_dir: Path,
) -> Path:
    """Write ``index.html`` and its PNGs into ``out_dir``; returns the page's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    daily = frames["dma_daily"]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Aquameter demo report</title>"
        f"<style>{_CSS}</style></head><body>",
        "<h1>Aquameter demo report</h1>",
        f"<p>Window {html.escape(str(manifest['window']['start']))} → "
        f"{html.escape(str(manifest['window']['end']))}, {manifest['meters']['count']:,} "
        "customer meters.</p>",
        "<h2>Injected faults vs detected alerts</h2>",
        _table(faults, {"detected": "detected", "missed": "missed", "false": "false"}),
    ]
    dma_ids = sorted(set(dma_flow["dma_id"].to_list()))
    for dma_id in dma_ids:
        parts.append(f"<h2>{html.escape(dma_id)}</h2>")
        a = plot_inflow(dma_id, dma_flow, daily, manifest, out_dir / f"inflow_{dma_id}.png")
        b = plot_nnf(dma_id, daily, manifest, out_dir / f"nnf_{dma_id}.png")
        parts += [f"<img src='{a.name}' alt='net inflow {dma_id}'>",
                  f"<img src='{b.name}' alt='NNF {dma_id}'>"]  # fmt: skip
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
    alerts = frames["alerts"]
    if alerts.height:
        parts.append(f"<img src='{plot_alerts(alerts, out_dir / 'alerts.png').name}' alt='alerts'>")
    parts.append(_table(alerts.group_by("code").len().sort("code")))
    parts.append("<h2>Read rates per gateway</h2>")
    rates = frames["read_rates"]
    if rates.height:
        img = plot_read_rates(rates, out_dir / "read_rates.png").name
        parts.append(f"<img src='{img}' alt='read rates'>")
    parts.append("</body></html>")
    page = out_dir / "index.html"
    page.write_text("\n".join(parts), encoding="utf-8")
    return page
