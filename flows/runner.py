"""Running the analytics flows once (``aquameter flow run``) or on schedules (``flow serve``).

Each flow is a Prefect flow; ``run_flow`` calls it in this process against the one Prefect API of
``aquameter.prefect_api`` (``PREFECT_API_URL``, else a local server Aquameter starts, reuses and
stops; never Prefect's own 20-second temporary server), and turns a failure into ``FlowFailed``:
one line naming the flow, the error and, when known, the fix. ``serve_all`` registers one
deployment per flow with its schedule and runs them until interrupted. Scheduled runs get no
window and no database URL as parameters: each flow looks back from now, and the URL comes from
``AQUAMETER_DATABASE_URL`` in the serving process's environment (never stored as a deployment
parameter, where a password would end up in the orchestrator's database).

Every ``run_flow`` leaves exactly one row in ``flow_runs`` (migration 0009): completed with the
flow's summary, or failed with the same one line the CLI prints, so ``ingest_health`` and the
metrics exporter can tell a failed flow from one that found nothing. Served runs, which Prefect
starts in subprocesses without ``run_flow``, record theirs through the state hooks of
``recorded(name)``, the flow their deployment's entrypoint names. Flows are imported only
when first used (``FLOWS`` is lazy): ``flow run NAME`` pays for NAME's imports, not all six.
For a run against this process's local API (not an external ``PREFECT_API_URL``) Prefect's
flow-run heartbeats are off: they exist so that a server-side automation can mark runs of
crashed workers, there is none on a local API that lives only as long as its holders, and
stopping the heartbeat thread cost up to a second per run (it sleeps in 1-second steps).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

from aquameter.prefect_api import PrefectApi, PrefectApiError, prefect_api

if TYPE_CHECKING:
    from prefect import Flow
    from prefect.deployments.runner import RunnerDeployment

log = logging.getLogger("aquameter.flows")

# name -> (module, attribute) of each flow, imported on first use.
FLOW_PATHS: dict[str, tuple[str, str]] = {
    "dma_night_flow": ("flows.dma_night_flow", "dma_night_flow"),
    "meter_anomalies": ("flows.meter_anomalies", "meter_anomalies"),
    "water_balance": ("flows.water_balance", "water_balance_flow"),
    "billing_export": ("flows.billing_export", "billing_export"),
    "ingest_health": ("flows.ingest_health", "ingest_health"),
    "water_quality": ("flows.water_quality", "water_quality"),
}


class _LazyFlows(MutableMapping[str, "Flow[..., dict[str, Any]]"]):
    """The flows by name, each imported when first looked up. Why: importing all six costs a
    quarter second and more of CPU on every `flow run`, which runs one. Assignable (tests
    replace a flow with ``monkeypatch.setitem``); iteration order is ``FLOW_PATHS``'s."""

    def __init__(self, paths: Mapping[str, tuple[str, str]]) -> None:
        self._paths = dict(paths)
        self._loaded: dict[str, Flow[..., dict[str, Any]]] = {}

    def __getitem__(self, name: str) -> Flow[..., dict[str, Any]]:
        if name not in self._loaded:
            module, attribute = self._paths[name]  # KeyError for an unknown flow
            self._loaded[name] = getattr(importlib.import_module(module), attribute)
        return self._loaded[name]

    def __setitem__(self, name: str, value: Flow[..., dict[str, Any]]) -> None:
        self._paths.setdefault(name, ("", ""))
        self._loaded[name] = value

    def __delitem__(self, name: str) -> None:
        del self._paths[name]
        self._loaded.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    def __contains__(self, name: object) -> bool:
        return name in self._paths


FLOWS: MutableMapping[str, Flow[..., dict[str, Any]]] = _LazyFlows(FLOW_PATHS)

# Served runs (``flow serve``) start in subprocesses that load each flow from its deployment's
# entrypoint: ``flows.runner.recorded_<name>``, the flow with hooks that record its outcome.
RECORDED_PREFIX = "recorded_"
# ``flow serve --dask``: served runs start in Prefect's subprocesses, which inherit this.
SERVE_DASK_ENV = "AQUAMETER_FLOW_DASK"


def recorded(name: str) -> Flow[..., dict[str, Any]]:
    """Flow ``name`` with state hooks that write its ``flow_runs`` row: what ``flow serve``
    runs, since its runs do not go through ``run_flow`` (they start in Prefect's subprocesses)."""
    hook = _RecordHook(name)
    flow = FLOWS[name].with_options(on_completion=[hook], on_failure=[hook], on_crashed=[hook])
    dask = os.environ.get(SERVE_DASK_ENV)
    if dask:  # set by serve_all(dask=...) for the served runs it starts
        from flows.dask_runner import dask_task_runner

        flow = flow.with_options(task_runner=dask_task_runner(dask))
    return flow


def __getattr__(attribute: str) -> Any:
    """``recorded_<name>``: the deployment entrypoints (see ``recorded``)."""
    name = attribute.removeprefix(RECORDED_PREFIX)
    if attribute.startswith(RECORDED_PREFIX) and name in FLOWS:
        return recorded(name)
    raise AttributeError(f"module {__name__!r} has no attribute {attribute!r}")


class _RecordHook:
    """A Prefect flow-state hook (completed, failed, crashed) that records the run."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.__name__ = f"record_{name}_run"  # Prefect logs hooks by name

    def __call__(self, flow: Any, flow_run: Any, state: Any) -> None:
        params = dict(getattr(flow_run, "parameters", None) or {})
        started = getattr(flow_run, "start_time", None) or datetime.now(UTC)
        outcome = _state_outcome(state)
        summary = outcome if isinstance(outcome, Mapping) else None
        error = None
        if not state.is_completed():
            cause = outcome if isinstance(outcome, BaseException) else RuntimeError(state.message)
            error = FlowFailed(self.name, cause).line
        record_run(
            params.get("database_url"),
            self.name,
            started,
            summary if error is None else None,
            error,
            params.get("since"),
            params.get("until"),
        )


def _state_outcome(state: Any) -> Any:
    """The flow's return value, or the exception it failed with (None when unavailable)."""
    try:
        return state.result(raise_on_failure=False)
    except Exception as exc:  # a crashed run's state may hold no result at all
        return exc


# Flows that send their units in waves of ``parallel_chunks`` (memory on one machine); on Dask
# every unit is submitted and the cluster's worker slots bound what runs at once.
CHUNKED_FLOWS = frozenset({"dma_night_flow", "meter_anomalies", "water_balance", "billing_export"})

# Cron schedules (UTC). The hourly flows are cheap when nothing changed: only stale units run.
# Billing runs on the 2nd of the month for the previous month, after late uplinks had a day.
DEFAULT_SCHEDULES: dict[str, str] = {
    "ingest_health": "5 * * * *",
    "dma_night_flow": "15 * * * *",
    "meter_anomalies": "25 * * * *",
    "water_quality": "*/15 * * * *",
    "water_balance": "40 6 * * *",
    "billing_export": "0 7 2 * *",
}


def flow_names() -> list[str]:
    return list(FLOWS)


class FlowFailed(RuntimeError):
    """A flow run that did not complete. ``line`` is what an operator reads: the flow, the error
    and the fix when it is a known one (``str()`` of the exception is the same line)."""

    def __init__(self, name: str, error: BaseException) -> None:
        self.flow = name
        self.error = error
        detail = " ".join(str(error).split()) or "(no message)"
        if len(detail) > 300:
            detail = detail[:297] + "..."
        kind = "" if isinstance(error, PrefectApiError) else f"{type(error).__name__}: "
        hint = fix_for(error)
        self.line = f"flow {name} FAILED: {kind}{detail}" + (f" -- fix: {hint}" if hint else "")
        super().__init__(self.line)


def fix_for(error: BaseException) -> str | None:
    """The fix for errors whose cause is known (the database, the schema, a permission)."""
    import psycopg

    if isinstance(error, psycopg.errors.UndefinedTable | psycopg.errors.UndefinedColumn):
        return "run `aquameter db migrate` against this database"
    if isinstance(error, psycopg.errors.InsufficientPrivilege):
        return (
            "run `aquameter db migrate` (it grants the analytics role) or check "
            "AQUAMETER_DATABASE_URL_ANALYTICS"
        )
    if isinstance(error, psycopg.OperationalError):
        return "check that PostgreSQL runs and AQUAMETER_DATABASE_URL points at it"
    if isinstance(error, ValueError) and "database URL" in str(error):
        return "set AQUAMETER_DATABASE_URL"
    return None


def run_flow(
    name: str,
    since: datetime | date | None = None,
    until: datetime | date | None = None,
    database_url: str | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    full: bool = False,
    dask: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Run flow ``name`` once over [since, until) and return its summary.

    ``overrides`` sets thresholds by dotted name (see ``flows.overrides``); ``full`` recomputes
    every unit of the window instead of only stale ones; ``dask`` (``local:N`` or
    ``tcp://host:port``, see ``flows.dask_runner``) fans the flow's tasks out on a Dask cluster;
    ``options`` are flow-specific (``billing_export``: ``period_start``, ``period_end``,
    ``export_dir``).

    Raises ``FlowFailed`` when the flow (or the Prefect API it needs) fails: a caller must never
    mistake a failed flow for one that found nothing. Either way the run leaves one
    ``flow_runs`` row (see ``record_run``).
    """
    if name not in FLOWS:
        raise ValueError(f"unknown flow {name!r}; known: {', '.join(FLOWS)}")
    window = {"since": _moment(since), "until": _moment(until)}
    started = datetime.now(UTC)
    try:
        with (
            prefect_api() as api,  # re-entrant: reuses an outer API
            _heartbeats_off(api),
            contextlib.ExitStack() as stack,
        ):
            flow = FLOWS[name]
            if dask:
                from flows.dask_runner import dask_task_runner, exported_api_url

                stack.enter_context(exported_api_url())
                flow = flow.with_options(task_runner=dask_task_runner(dask))
                if name in CHUNKED_FLOWS:  # the workers bound what runs at once, not waves
                    overrides = {"parallel_chunks": 0, **(overrides or {})}
            result: dict[str, Any] = flow(
                database_url=database_url,
                since=window["since"],
                until=window["until"],
                overrides=dict(overrides) if overrides else None,
                full=full,
                **options,
            )
    except Exception as exc:
        failed = FlowFailed(name, exc)
        record_run(database_url, name, started, None, failed.line, window["since"], window["until"])
        raise failed from exc
    record_run(database_url, name, started, result, None, window["since"], window["until"])
    return result


def _moment(value: datetime | date | None) -> datetime | None:
    """A date as its midnight (the flows take it as UTC); datetimes and None as they are."""
    if value is None or isinstance(value, datetime):
        return value
    return datetime.combine(value, datetime.min.time())


@contextlib.contextmanager
def _heartbeats_off(api: PrefectApi) -> Iterator[None]:
    """No flow-run heartbeats against this process's local API (see the module docstring); an
    external API keeps them, its operators may have automations that rely on them."""
    if api.pid is None:
        yield
        return
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def _window_end(summary: Mapping[str, Any] | None, key: str, asked: object) -> datetime | None:
    """The window bound the flow reports (it resolves the default look-back), else the one
    asked for: a datetime, a date or an ISO string (a served run's parameters), naive = UTC as
    everywhere in the flows."""
    for candidate in (summary.get(key) if summary else None, asked):
        if isinstance(candidate, str):
            with contextlib.suppress(ValueError):
                candidate = datetime.fromisoformat(candidate)
        if isinstance(candidate, datetime | date):
            moment = _moment(candidate)
            assert moment is not None
            return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return None


def record_run(
    database_url: str | None,
    name: str,
    started_at: datetime,
    summary: Mapping[str, Any] | None,
    error: str | None,
    since: datetime | date | str | None = None,
    until: datetime | date | str | None = None,
) -> bool:
    """Insert the run's ``flow_runs`` row: completed with ``summary``, or failed with ``error``
    (the one line). Why in the database: Prefect's own record lives in a local API that is
    stopped after the run, and operators look at PostgreSQL (``ingest_health``, the exporter).

    Never raises: a run that failed because the database is down cannot be recorded there, and
    must still fail with its own line, not this one. Returns whether the row was written; the log
    says why not: a warning for a completed run, only INFO for a failed one, whose own one line
    is what the operator acts on (and most often the same cause)."""
    from flows.window import resolve_database_url
    from sql.connect import connect

    status = "failed" if error is not None else "completed"
    try:
        url = resolve_database_url(database_url)
        with connect(url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(
                "INSERT INTO flow_runs (flow, started_at, finished_at, status, error,"
                " window_since, window_until, summary)"
                " VALUES (%s, %s, now(), %s, %s, %s, %s, %s::jsonb)",
                (
                    name,
                    started_at,
                    status,
                    error,
                    _window_end(summary, "since", since),
                    _window_end(summary, "until", until),
                    None if summary is None else json.dumps(dict(summary), default=str),
                ),
            )
    except Exception as exc:
        detail = " ".join(str(exc).split())[:300]
        level = logging.INFO if error is not None else logging.WARNING
        log.log(level, "flow %s (%s) not recorded in flow_runs: %s", name, status, detail)
        return False
    return True


def deployments(
    schedules: Mapping[str, str | None] | None = None,
    *,
    names: Sequence[str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[RunnerDeployment]:
    """One deployment per flow (``names``, default all) with its cron schedule: ``schedules``
    replaces defaults per flow, ``None`` for a flow means no schedule (run on demand only).
    ``overrides`` maps a flow name to its threshold overrides."""
    from prefect.deployments.runner import RunnerDeployment
    from prefect.types.entrypoint import EntrypointType

    chosen = list(names) if names is not None else list(FLOWS)
    cron = {**DEFAULT_SCHEDULES, **(schedules or {})}
    out: list[RunnerDeployment] = []
    for name in chosen:
        if name not in FLOWS:
            raise ValueError(f"unknown flow {name!r}; known: {', '.join(FLOWS)}")
        params: dict[str, Any] = {}
        if overrides and overrides.get(name):
            params["overrides"] = dict(overrides[name])
        deployment = recorded(name).to_deployment(
            name=f"aquameter-{name}",
            cron=cron.get(name),
            parameters=params,
            tags=["aquameter"],
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        # to_deployment is sync-compatible: called from sync code it returns the deployment.
        assert isinstance(deployment, RunnerDeployment)
        # Served runs load the flow from here: the variant that records its runs.
        deployment.entrypoint = f"{__name__}.{RECORDED_PREFIX}{name}"
        out.append(deployment)
    return out


def serve_all(
    database_url: str | None = None,
    *,
    schedules: Mapping[str, str | None] | None = None,
    names: Sequence[str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    limit: int | None = None,
    dask: str | None = None,
) -> None:
    """Serve every flow on its schedule until interrupted (``aquameter flow serve``).

    ``dask`` runs every served flow's tasks on that cluster (``tcp://host:port`` shares one
    scheduler between runs; ``local:N`` makes a cluster per run).

    Flow runs start in subprocesses of this one; they find the database through
    ``AQUAMETER_DATABASE_URL``, which is set here from ``database_url`` when given, and the
    Prefect API through ``PREFECT_API_URL``: a local server with its scheduler, kept for this
    process's lifetime (and reused by `aquameter flow run` meanwhile), unless one is configured.
    """
    from prefect import serve

    if database_url:
        os.environ["AQUAMETER_DATABASE_URL"] = database_url
    if dask:
        from flows.dask_runner import parse_dask_spec

        parse_dask_spec(dask)  # a typo fails here, not in every served run
        os.environ[SERVE_DASK_ENV] = dask
        given = dict(overrides or {})
        overrides = given | {
            n: {"parallel_chunks": 0, **(given.get(n) or {})} for n in CHUNKED_FLOWS
        }
    with prefect_api(services=True):
        serve(*deployments(schedules, names=names, overrides=overrides), limit=limit)
