"""Flow-run outcomes in ``flow_runs`` (migration 0009): every ``run_flow`` leaves one row,
completed or failed, written as the analytics login the flows use; ``ingest_health`` reports each
flow's latest run, a failed one as a failed entry; ``flow run`` of a failed flow still exits 1.

Real PostgreSQL, a real local Prefect API (one data dir for the module, so Prefect's SQLite
migrations run once), real flows; only the failing flow is a stand-in that raises.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from typer.testing import CliRunner

from aquameter.prefect_api import prefect_api
from aquameter.settings import Settings
from flows.runner import FlowFailed, record_run, run_flow
from sql.roles import create_login, drop_login, role_url

SINCE = datetime(2020, 1, 1, tzinfo=UTC)
UNTIL = datetime(2020, 1, 2, tzinfo=UTC)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("aq-flow-runs")


@pytest.fixture(autouse=True)
def _local_api(monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("AQUAMETER_DATA_DIR", str(data_dir))


@pytest.fixture
def analytics_url(db_url: str) -> Iterator[str]:
    """A login in aquameter_analytics only: what `flow run` uses in a deployment."""
    login = f"aqt_flowruns_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(db_url) as conn:
        create_login(conn, "aquameter_analytics", login, None)
    yield role_url(db_url, login, None)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (login,)
        )
    with psycopg.connect(db_url) as conn:
        drop_login(conn, login)


def _rows(url: str) -> list[dict[str, Any]]:
    with psycopg.connect(url) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute("SELECT * FROM flow_runs ORDER BY id").fetchall()


def _broken_flow(name: str) -> Any:
    from prefect import flow

    @flow(name=name, validate_parameters=False)
    def broken(
        database_url: str | None = None,
        since: Any = None,
        until: Any = None,
        overrides: Any = None,
        full: bool = False,
    ) -> dict[str, Any]:
        raise RuntimeError("injected failure")

    return broken


def test_completed_and_failed_runs_each_leave_their_row_and_ingest_health_shows_them(
    db_url: str, analytics_url: str, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flows.runner

    with prefect_api(Settings(data_dir=data_dir)):
        first = run_flow("ingest_health", SINCE, UNTIL, analytics_url)
        monkeypatch.setitem(flows.runner.FLOWS, "water_quality", _broken_flow("water_quality"))
        with pytest.raises(FlowFailed) as failed:
            run_flow("water_quality", SINCE, UNTIL, analytics_url)
        monkeypatch.undo()
        health = run_flow("ingest_health", None, None, analytics_url)

    rows = _rows(db_url)
    assert [(r["flow"], r["status"]) for r in rows] == [
        ("ingest_health", "completed"),
        ("water_quality", "failed"),
        ("ingest_health", "completed"),
    ]
    done, bad, last = rows
    assert done["error"] is None and done["summary"]["rows"] == first["rows"]
    assert (done["window_since"], done["window_until"]) == (SINCE, UNTIL)
    assert done["started_at"] <= done["finished_at"]
    assert bad["summary"] is None
    assert bad["error"] == failed.value.line
    assert bad["error"] == "flow water_quality FAILED: RuntimeError: injected failure"
    assert (bad["window_since"], bad["window_until"]) == (SINCE, UNTIL)
    # No window asked: the row carries the one the flow resolved (its look-back from now).
    assert last["window_since"] is not None and last["window_until"] > last["window_since"]

    assert health["failed_flows"] == ["water_quality"]
    assert health["last_run.water_quality"].startswith("FAILED at ")
    assert health["last_run.water_quality"].endswith(failed.value.line)
    assert health["last_run.ingest_health"].startswith("completed at ")
    assert health["last_run.dma_night_flow"] == "never run"


def test_failed_flow_run_exits_1_and_is_recorded(
    db_url: str, analytics_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flows.runner
    from aquameter.cli import app

    monkeypatch.setitem(flows.runner.FLOWS, "meter_anomalies", _broken_flow("meter_anomalies"))
    monkeypatch.setenv("AQUAMETER_DATABASE_URL", db_url)
    monkeypatch.setenv("AQUAMETER_DATABASE_URL_ANALYTICS", analytics_url)
    result = CliRunner().invoke(app, ["flow", "run", "meter_anomalies"])
    assert result.exit_code == 1, result.output
    line = "flow meter_anomalies FAILED: RuntimeError: injected failure"
    assert [ln for ln in result.output.splitlines() if "FAILED:" in ln] == [line]
    assert [(r["flow"], r["status"], r["error"]) for r in _rows(db_url)] == [
        ("meter_anomalies", "failed", line)
    ]


def test_unrecordable_run_keeps_its_own_failure(caplog: pytest.LogCaptureFixture) -> None:
    """The database is down: the row cannot be written, which is logged, never an exception
    that would replace the flow's own failure line (and, for a failed run, below WARNING: the
    CLI shows that run's one line, not a second one about the same outage)."""
    import logging

    caplog.set_level(logging.INFO, logger="aquameter.flows")
    down = "postgresql://nobody@127.0.0.1:1/none"
    started = datetime.now(UTC)
    assert record_run(down, "ingest_health", started, None, "flow ingest_health FAILED: x") is False
    assert record_run(down, "ingest_health", started, {"rows": 0}, None) is False
    levels = [(r.levelname, r.getMessage().split(" not recorded")[0]) for r in caplog.records]
    assert levels == [
        ("INFO", "flow ingest_health (failed)"),
        ("WARNING", "flow ingest_health (completed)"),
    ]


def test_served_flows_record_their_runs(
    db_url: str, analytics_url: str, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`flow serve` runs each flow in a Prefect subprocess that loads it from its deployment's
    entrypoint, not through run_flow: that entrypoint is the variant whose state hooks record
    the run. Loaded here the way Prefect's engine loads it, and run."""
    from prefect.flows import load_flow_from_entrypoint

    import flows.runner
    from flows.runner import deployments

    (deployment,) = deployments(names=["ingest_health"])
    assert deployment.entrypoint == "flows.runner.recorded_ingest_health"
    monkeypatch.setitem(flows.runner.FLOWS, "water_quality", _broken_flow("water_quality"))
    assert deployment.entrypoint is not None
    with prefect_api(Settings(data_dir=data_dir)):
        served: Any = load_flow_from_entrypoint(deployment.entrypoint)
        result = served(database_url=analytics_url, since=SINCE, until=UNTIL)
        broken: Any = load_flow_from_entrypoint("flows.runner.recorded_water_quality")
        with pytest.raises(RuntimeError, match="injected failure"):
            broken(database_url=analytics_url, since=SINCE, until=UNTIL)
    rows = _rows(db_url)
    assert [(r["flow"], r["status"]) for r in rows] == [
        ("ingest_health", "completed"),
        ("water_quality", "failed"),
    ]
    assert rows[0]["summary"]["rows"] == result["rows"]
    assert (rows[0]["window_since"], rows[0]["window_until"]) == (SINCE, UNTIL)
    assert rows[1]["error"] == "flow water_quality FAILED: RuntimeError: injected failure"
