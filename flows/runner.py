"""Running the analytics flows once (``aquameter flow run``) or on schedules (``flow serve``).

Each flow is a Prefect flow; ``run_flow`` calls it in this process against the one Prefect API of
``aquameter.prefect_api`` (``PREFECT_API_URL``, else a local server Aquameter starts, reuses and
stops; never Prefect's own 20-second temporary server), and turns a failure into ``FlowFailed``:
one line naming the flow, the error and, when known, the fix. ``serve_all`` registers one
deployment per flow with its schedule and runs them until interrupted. Scheduled runs get no
window and no database URL as parameters: each flow looks back from now, and the URL comes from
``AQUAMETER_DATABASE_URL`` in the serving process's environment (never stored as a deployment
parameter, where a password would end up in the orchestrator's database).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from typing import Any

from prefect import Flow, serve
from prefect.deployments.runner import RunnerDeployment
from prefect.types.entrypoint import EntrypointType

from aquameter.prefect_api import PrefectApiError, prefect_api
from flows.billing_export import billing_export
from flows.dma_night_flow import dma_night_flow
from flows.ingest_health import ingest_health
from flows.meter_anomalies import meter_anomalies
from flows.water_balance import water_balance_flow
from flows.water_quality import water_quality

FLOWS: dict[str, Flow[..., dict[str, Any]]] = {
    "dma_night_flow": dma_night_flow,
    "meter_anomalies": meter_anomalies,
    "water_balance": water_balance_flow,
    "billing_export": billing_export,
    "ingest_health": ingest_health,
    "water_quality": water_quality,
}

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
    **options: Any,
) -> dict[str, Any]:
    """Run flow ``name`` once over [since, until) and return its summary.

    ``overrides`` sets thresholds by dotted name (see ``flows.overrides``); ``full`` recomputes
    every unit of the window instead of only stale ones; ``options`` are flow-specific
    (``billing_export``: ``period_start``, ``period_end``, ``export_dir``).

    Raises ``FlowFailed`` when the flow (or the Prefect API it needs) fails: a caller must never
    mistake a failed flow for one that found nothing.
    """
    if name not in FLOWS:
        raise ValueError(f"unknown flow {name!r}; known: {', '.join(FLOWS)}")
    window = {
        key: (datetime.combine(value, datetime.min.time()) if type(value) is date else value)
        for key, value in (("since", since), ("until", until))
    }
    try:
        with prefect_api():  # re-entrant: reuses the API of an enclosing prefect_api()
            result: dict[str, Any] = FLOWS[name](
                database_url=database_url,
                since=window["since"],
                until=window["until"],
                overrides=dict(overrides) if overrides else None,
                full=full,
                **options,
            )
    except Exception as exc:
        raise FlowFailed(name, exc) from exc
    return result


def deployments(
    schedules: Mapping[str, str | None] | None = None,
    *,
    names: Sequence[str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[RunnerDeployment]:
    """One deployment per flow (``names``, default all) with its cron schedule: ``schedules``
    replaces defaults per flow, ``None`` for a flow means no schedule (run on demand only).
    ``overrides`` maps a flow name to its threshold overrides."""
    chosen = list(names) if names is not None else list(FLOWS)
    cron = {**DEFAULT_SCHEDULES, **(schedules or {})}
    out: list[RunnerDeployment] = []
    for name in chosen:
        if name not in FLOWS:
            raise ValueError(f"unknown flow {name!r}; known: {', '.join(FLOWS)}")
        params: dict[str, Any] = {}
        if overrides and overrides.get(name):
            params["overrides"] = dict(overrides[name])
        deployment = FLOWS[name].to_deployment(
            name=f"aquameter-{name}",
            cron=cron.get(name),
            parameters=params,
            tags=["aquameter"],
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        # to_deployment is sync-compatible: called from sync code it returns the deployment.
        assert isinstance(deployment, RunnerDeployment)
        out.append(deployment)
    return out


def serve_all(
    database_url: str | None = None,
    *,
    schedules: Mapping[str, str | None] | None = None,
    names: Sequence[str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    limit: int | None = None,
) -> None:
    """Serve every flow on its schedule until interrupted (``aquameter flow serve``).

    Flow runs start in subprocesses of this one; they find the database through
    ``AQUAMETER_DATABASE_URL``, which is set here from ``database_url`` when given, and the
    Prefect API through ``PREFECT_API_URL``: a local server with its scheduler, kept for this
    process's lifetime (and reused by `aquameter flow run` meanwhile), unless one is configured.
    """
    if database_url:
        os.environ["AQUAMETER_DATABASE_URL"] = database_url
    with prefect_api(services=True):
        serve(*deployments(schedules, names=names, overrides=overrides), limit=limit)
