"""The Prefect runtime of the flows (``aquameter.prefect_api``): one local API started once and
reused, nothing left listening afterwards, a failed flow is a non-zero exit with one line, and a
busy machine (two CPU hogs on two cores) still gets its flow run.

Prefect itself is under test here, so these run real flows against a real local server (one
data dir for the module: the first start pays Prefect's SQLite migrations once).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from aquameter.prefect_api import PrefectApi, _pid_alive, port_open, prefect_api
from aquameter.settings import Settings


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("aq-prefect")


@pytest.fixture(autouse=True)
def _no_external_api(monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> Iterator[None]:
    """No API from the environment nor from Prefect's active settings (another module's test
    harness may have set one for the session): these tests are about the API we start."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("AQUAMETER_DATA_DIR", str(data_dir))
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        yield


def _port(api: PrefectApi) -> int:
    return int(api.url.rsplit(":", 1)[1].split("/")[0])


def _probe_flow() -> Any:
    from prefect import flow
    from prefect.context import get_run_context
    from prefect.settings import PREFECT_API_URL

    @flow(name="aquameter-runtime-probe")
    def probe() -> tuple[str, str]:
        ctx = get_run_context()
        return str(PREFECT_API_URL.value()), str(ctx.flow_run.id)  # type: ignore[union-attr]

    return probe


def _flow_runs(name: str) -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[name])))
    return len(runs)


def _assert_stopped(api: PrefectApi, data_dir: Path) -> None:
    assert not port_open(_port(api)), f"something still listens on {api.url}"
    assert api.pid is not None and not _pid_alive(api.pid)
    assert not (data_dir / "prefect" / "api.json").exists()


def test_api_started_once_reused_by_two_flow_runs_then_closed(data_dir: Path) -> None:
    settings = Settings(data_dir=data_dir)
    probe = _probe_flow()
    with prefect_api(settings) as api:
        assert api.started and api.pid is not None
        assert api.home == data_dir / "prefect"
        first_url, first_run = probe()
        with prefect_api(settings) as inner:  # nested use shares the same server
            assert inner is api
            second_url, second_run = probe()
        assert first_url == second_url == api.url
        assert first_run != second_run
        assert _flow_runs("aquameter-runtime-probe") >= 2  # both recorded in this API
        assert port_open(_port(api))
    _assert_stopped(api, data_dir)
    assert (data_dir / "prefect" / "prefect.db").exists()  # Prefect's state is in our data dir


def test_failed_flow_exits_non_zero_with_one_line(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flows.runner
    from aquameter.cli import app
    from tests.test_flow_runs import _broken_flow

    broken = _broken_flow("ingest_health")
    monkeypatch.setitem(flows.runner.FLOWS, "ingest_health", broken)
    monkeypatch.setenv("AQUAMETER_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    result = CliRunner().invoke(app, ["flow", "run", "ingest_health"])
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if "FAILED:" in ln]
    assert lines == ["flow ingest_health FAILED: RuntimeError: injected failure"], result.output
    assert "FAILED" in result.output.split("flow ingest_health FAILED")[0]  # summary status
    assert not (data_dir / "prefect" / "api.json").exists()  # server stopped after the failure


@pytest.fixture
def cpu_hogs() -> Iterator[None]:
    """Two processes burning a core each for the duration of the test."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def test_flow_run_succeeds_beside_cpu_hogs(data_dir: Path, cpu_hogs: None) -> None:
    settings = Settings(data_dir=data_dir)
    probe = _probe_flow()
    with prefect_api(settings) as api:
        url, _ = probe()
        assert url == api.url
    _assert_stopped(api, data_dir)


def test_flow_run_imports_only_its_flow() -> None:
    """`flow run NAME` pays for NAME's imports only (a fresh interpreter, as the CLI is)."""
    code = (
        "import sys\n"
        "from flows.runner import FLOWS\n"
        "assert 'prefect' not in sys.modules, 'the runner alone imports Prefect'\n"
        "assert FLOWS['ingest_health'].name == 'ingest_health'\n"
        "others = [m for m in ('flows.billing_export', 'flows.dma_night_flow',\n"
        "          'flows.meter_anomalies', 'flows.water_balance') if m in sys.modules]\n"
        "assert not others, others\n"
        "assert list(FLOWS) == ['dma_night_flow', 'meter_anomalies', 'water_balance',\n"
        "                       'billing_export', 'ingest_health', 'water_quality']\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_no_heartbeat_thread_against_the_local_api(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Heartbeats serve server-side crash detection, which a local per-command API has not;
    stopping their thread cost up to a second per run. An external API keeps them."""
    from prefect import flow
    from prefect.settings import get_current_settings

    import flows.runner
    from flows.runner import run_flow

    @flow(name="ingest_health", validate_parameters=False)
    def probe(
        database_url: str | None = None,
        since: Any = None,
        until: Any = None,
        overrides: Any = None,
        full: bool = False,
    ) -> dict[str, Any]:
        return {"heartbeat": get_current_settings().flows.heartbeat_frequency}

    monkeypatch.setitem(flows.runner.FLOWS, "ingest_health", probe)
    monkeypatch.setenv("AQUAMETER_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    with prefect_api(Settings(data_dir=data_dir)) as api:
        assert api.pid is not None
        assert run_flow("ingest_health") == {"heartbeat": None}
        assert get_current_settings().flows.heartbeat_frequency is not None  # restored after
