"""``aquameter report`` and ``aquameter db serve``: looking at what a run left in the database.

Both exist because the demo's embedded PostgreSQL outlives the demo: the report can be rebuilt
from it at any time (after re-running a flow, or with another window), and ``db serve`` keeps the
server up so psql, Grafana or a BI tool can query the same tables. The lead registers these in
``aquameter.cli``; they use only settings, never the simulator.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from aquameter.runtime import database_url
from aquameter.secrets import mask_url
from aquameter.settings import Settings

console = Console()


def _when(value: str | None) -> datetime | None:
    """ISO date or date-time; naive means UTC (as everywhere on the command line)."""
    if value is None:
        return None
    t = datetime.fromisoformat(value)
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _manifest_window(manifest: dict[str, Any] | None) -> tuple[datetime | None, datetime | None]:
    w = (manifest or {}).get("window") or {}
    parse = lambda v: _when(str(v).replace("Z", "+00:00")) if v else None  # noqa: E731
    return parse(w.get("start")), parse(w.get("end"))


def report_cmd(
    since: Annotated[
        str | None, typer.Option(help="Window start (ISO, UTC); default: manifest or 30 d ago.")
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="Window end (ISO, UTC); default: manifest end or now.")
    ] = None,
    out: Annotated[Path, typer.Option(help="Directory for index.html and charts.")] = Path(
        "demo-report"
    ),
    manifest: Annotated[
        Path | None,
        typer.Option(help="Fault manifest (simulator ground truth); default OUT/manifest.json."),
    ] = None,
) -> None:
    """Rebuild the HTML report from the database (nothing is simulated or recomputed)."""
    from aquameter.report import write_report

    path = manifest or (out / "manifest.json")
    truth: dict[str, Any] | None = None
    if path.exists():
        truth = json.loads(path.read_text())
    elif manifest is not None:
        raise typer.BadParameter(f"manifest {manifest} does not exist", param_hint="--manifest")
    m_since, m_until = _manifest_window(truth)
    end = _when(until) or (m_until + timedelta(minutes=1) if m_until else datetime.now(UTC))
    start = _when(since) or m_since or end - timedelta(days=30)
    if end <= start:
        raise typer.BadParameter("--until must be after --since")
    url = database_url(Settings())
    written = write_report(url, out, start, end, manifest=truth)
    import polars as pl  # here, not at the top: `aquameter ingest` imports this module too

    outcomes = written.faults.group_by("outcome").agg(pl.col("count").sum()).sort("outcome").rows()
    console.print(
        f"report {written.page}: window {start:%Y-%m-%d %H:%M} → {end:%Y-%m-%d %H:%M} UTC, "
        f"database {mask_url(url)}"
        + ("" if truth is None else "; " + ", ".join(f"{o}={n}" for o, n in outcomes))
    )
    # The page's red banner, on the terminal too: the rebuild itself succeeded (exit 0), but
    # whoever reads its figures must know which flows did not produce theirs.
    for line in written.failed_flows:
        console.print(f"[bold red]{escape(line)}[/]", soft_wrap=True)
    if not written.flow_outcomes:
        console.print(
            "[yellow]flow outcomes unavailable: this database has no flow_runs table "
            "(run `aquameter db migrate`)",
            soft_wrap=True,
        )


def db_serve_cmd() -> None:
    """Keep the database up and print its URL until Ctrl-C (for psql, Grafana, BI tools).

    With ``AQUAMETER_DATABASE_URL`` unset this starts (or joins) the embedded PostgreSQL; it stops
    when the last process using it exits. A configured server is only printed: it is not ours."""
    s = Settings()
    embedded = not s.database_url
    url = database_url(s)
    console.print(f"database: {mask_url(url)}")
    if not embedded:
        console.print("AQUAMETER_DATABASE_URL is set: that server is not managed here.")
        return
    console.print(f"psql: psql '{mask_url(url)}'   (Ctrl-C to stop)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.print("stopping the embedded PostgreSQL")
