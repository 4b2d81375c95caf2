"""deploy/: the Grafana dashboard's SQL runs against the real schema, the systemd units are sound.

A dashboard is code that nobody runs until production: a renamed column shows up as a red panel
on the control-room wall. So every panel's SQL is run here, after substituting Grafana's macros
the way its PostgreSQL datasource expands them.
"""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "aquameter.json"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
FROM, TO = datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 3, 8, tzinfo=UTC)

# The columns each panel must return (Grafana's time series format wants time/metric/value).
EXPECTED_COLUMNS = {
    "timeseries": ["time", "metric", "value"],
    "Open alerts (worklist)": ["subject", "code", "start", "end", "severity", "evidence"],
    "Silent meters yesterday": ["silent", "meters"],
}
_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _seconds(interval: str) -> int:
    m = re.fullmatch(r"'?(\d+)([smhd])'?", interval.strip())
    assert m, f"interval {interval!r}"
    return int(m.group(1)) * _UNITS_S[m.group(2)]


def expand_macros(sql: str, since: datetime, until: datetime) -> str:
    """Grafana PostgreSQL macros → plain SQL, as the datasource expands them."""
    lo, hi = f"'{since.isoformat()}'::timestamptz", f"'{until.isoformat()}'::timestamptz"

    def group(m: re.Match[str], alias: bool) -> str:
        col, interval = (p.strip() for p in m.group(1).rsplit(",", 1))
        s = _seconds(interval)
        expr = f"to_timestamp(floor(extract(epoch from {col}) / {s}) * {s})"
        return expr + (' AS "time"' if alias else "")

    sql = re.sub(
        r"\$__timeGroupAlias\(([^()]*(?:\([^()]*\))?[^()]*)\)", lambda m: group(m, True), sql
    )
    sql = re.sub(r"\$__timeGroup\(([^()]*(?:\([^()]*\))?[^()]*)\)", lambda m: group(m, False), sql)
    sql = re.sub(
        r"\$__timeFilter\(([^()]*(?:\([^()]*\))?[^()]*)\)",
        lambda m: f"{m.group(1)} BETWEEN {lo} AND {hi}",
        sql,
    )
    sql = sql.replace("$__timeFrom()", lo).replace("$__timeTo()", hi)
    assert "$__" not in sql and "${" not in sql, f"unexpanded macro in {sql}"
    return sql


def _panels() -> list[dict[str, Any]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for p in dash["panels"]:
        out.extend(p.get("panels", [p]))  # rows may nest panels
    return out


def test_dashboard_is_a_postgres_dashboard_over_the_analytics_tables() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"]
    panels = _panels()
    assert len({p["id"] for p in panels}) == len(panels)
    sql = " ".join(t["rawSql"] for p in panels for t in p["targets"])
    for table in ("readings_hourly", "dma_daily", "alerts", "read_rates"):
        assert re.search(rf"\b{table}\b", sql), table
    for p in panels:
        for t in p["targets"]:
            assert t["rawQuery"] and t["datasource"]["type"] == "grafana-postgresql-datasource"


def _seed(url: str) -> None:
    """One row in each table the dashboard reads, so the queries return data, not just columns."""
    from sql.migrate import backend_of
    from sql.rollups import refresh_rollups
    from tests.test_report import _seed as seed_report

    channel = seed_report(url)
    with psycopg.connect(url) as conn:
        if backend_of(conn) == "plain":
            conn.execute(
                "INSERT INTO readings_hourly (channel_id, bucket, n, vavg) VALUES (%s, %s, 4, 40)",
                (channel, FROM + timedelta(days=2)),
            )
        else:  # a continuous aggregate: rolled up from the seeded readings, not written
            refresh_rollups(conn, FROM, TO)
        conn.execute(
            "INSERT INTO read_rates (day, dma_id, gateway, vendor_id, meters, meters_silent, "
            "expected_reads, received_reads, rate) "
            "VALUES ('2026-03-03', 'DMA-NORTH', 'GW1', 'aqualink', 10, 1, 960, 900, 0.9375)"
        )


@pytest.mark.parametrize("panel", _panels(), ids=lambda p: p["title"])
def test_every_panel_query_runs_and_returns_its_columns(db_url: str, panel: dict[str, Any]) -> None:
    _seed(db_url)
    for target in panel["targets"]:
        sql = expand_macros(target["rawSql"], FROM, TO)
        with psycopg.connect(db_url) as conn:
            cur = conn.execute(sql)  # type: ignore[call-overload]
            rows = cur.fetchall()
            columns = [d.name for d in cur.description or []]
        expected = EXPECTED_COLUMNS.get(panel["title"]) or EXPECTED_COLUMNS[panel["type"]]
        assert columns == expected, panel["title"]
        assert rows, f"{panel['title']}: no rows from the seeded database"
        if target["format"] == "time_series":
            assert all(isinstance(r[0], datetime) for r in rows)
            assert all(isinstance(r[2], int | float) for r in rows)


def test_macro_expansion() -> None:
    query = "SELECT $__timeGroupAlias(start_ts, 1d) WHERE $__timeFilter(day::timestamptz)"
    sql = expand_macros(query, FROM, TO)
    assert 'extract(epoch from start_ts) / 86400) * 86400) AS "time"' in sql
    assert "day::timestamptz BETWEEN '2026-03-01T00:00:00+00:00'::timestamptz" in sql


# --- systemd -------------------------------------------------------------------------------------


def _unit(path: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


def test_units_are_present_and_run_aquameter() -> None:
    names = {u.name for u in UNITS}
    assert names == {"aquameter-ingest@.service", "aquameter-flows.service"}
    commands = {}
    for path in UNITS:
        unit = _unit(path)
        assert {"Unit", "Service", "Install"} <= set(unit.sections()), path.name
        exec_start = unit["Service"]["ExecStart"].split()
        assert Path(exec_start[0]).name == "aquameter", exec_start
        assert "\nEnvironmentFile=/etc/aquameter/aquameter.env\n" in path.read_text()
        assert unit["Service"].get("Restart") == "on-failure"
        commands[path.name] = exec_start[1:]
    assert commands["aquameter-ingest@.service"][0] == "ingest"
    assert commands["aquameter-flows.service"][:2] == ["flow", "serve"]
    assert "%i" in (DEPLOY / "systemd" / "aquameter-ingest@.service").read_text()


def test_units_commands_exist_in_the_cli() -> None:
    """The subcommands the units start are real ``aquameter`` commands (their --help works)."""
    from typer.testing import CliRunner

    from aquameter.cli import app

    for args in (["ingest", "--help"], ["flow", "serve", "--help"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, (args, result.output)
    assert "--mqtt-workers" in CliRunner().invoke(app, ["ingest", "--help"]).output


def test_env_example_holds_no_secret() -> None:
    text = (DEPLOY / "aquameter.env.example").read_text()
    pairs = dict(
        line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    assert "AQUAMETER_MQTT_PASSWORD" not in pairs and "PGPASSWORD" not in pairs
    for key, value in pairs.items():
        assert not re.search(r"://[^/@\s]*:[^/@\s]*@", value), f"{key} has a password in its URL"
    assert pairs["AQUAMETER_MQTT_PASSWORD_FILE"].startswith("/")
    assert pairs["PGPASSFILE"].startswith("/")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` with ExecStart pointed at this checkout's ``aquameter`` (it
    checks the binary exists) and the ingest template instantiated."""
    exe = Path(sys.executable).parent / "aquameter"
    if not exe.exists():
        pytest.skip("no aquameter entry point in this environment")
    paths = []
    for path in UNITS:
        text = path.read_text().replace("/opt/aquameter/.venv/bin/aquameter", str(exe))
        name = path.name.replace("@.service", "@1.service")
        (tmp_path / path.name).write_text(text)
        paths.append(tmp_path / name if name != path.name else tmp_path / path.name)
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    problems = [
        line
        for line in (proc.stderr + proc.stdout).splitlines()
        if "aquameter" in line
        and not re.search(r"(postgresql|mosquitto|network-online)\.(service|target)", line)
    ]
    assert proc.returncode == 0 or not problems, proc.stderr
    assert not problems, problems
