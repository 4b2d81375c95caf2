"""Fanning a flow's tasks out on Dask (``aquameter flow run NAME --dask local:N | tcp://…``).

The flows already split their work into independent tasks — one per DMA × period, one per meter
chunk × period (``Task.map``) — so running them on more cores or machines is a matter of the task
runner, not of the flows: ``prefect-dask``'s ``DaskTaskRunner`` on a ``distributed`` cluster.
Nothing here changes what a flow computes; ``tests/test_flows_dask.py`` checks that a flow on a
two-worker ``LocalCluster`` writes exactly the rows of the default runner.

Two forms, the two a utility uses:

* ``local:N`` — a ``LocalCluster`` of N single-threaded worker *processes* on this machine, made
  for the run and torn down after it (the polars work holds the GIL in places, so processes, not
  threads, use the cores).
* ``tcp://host:port`` — an existing scheduler (``dask scheduler`` + ``dask worker`` on other
  machines); the workers must have Aquameter installed and reach the database and the Prefect API.

Task runs report to the Prefect API from the worker processes, so its URL must be in their
environment: :func:`exported_api_url` puts it there from Prefect's active settings for the run
(a remote cluster's workers must be started with it).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from typing import Any

_LOCAL = re.compile(r"^local:(\d+)$")
_REMOTE = re.compile(r"^(tcp|tls)://[^\s:/]+:\d+$")
MAX_LOCAL_WORKERS = 64


class DaskSpecError(ValueError):
    """A ``--dask`` value that names no cluster: the message says what is accepted."""


def parse_dask_spec(spec: str) -> tuple[str, int | str]:
    """``("local", N)`` or ``("address", "tcp://host:port")``; anything else is one clear error.

    Checked before any cluster starts, so a typo costs nothing and says what to write instead.
    """
    value = spec.strip()
    local = _LOCAL.match(value)
    if local:
        workers = int(local.group(1))
        if not 1 <= workers <= MAX_LOCAL_WORKERS:
            raise DaskSpecError(
                f"--dask {spec!r}: local workers must be 1..{MAX_LOCAL_WORKERS}, got {workers}"
            )
        return "local", workers
    if _REMOTE.match(value):
        return "address", value
    raise DaskSpecError(
        f"--dask {spec!r}: expected local:N (a LocalCluster of N workers) or "
        "tcp://host:port (a running Dask scheduler)"
    )


@contextlib.contextmanager
def exported_api_url() -> Iterator[None]:
    """The active ``PREFECT_API_URL`` in the environment while a flow runs on a LocalCluster
    (its worker processes read it there), and the environment as it was afterwards."""
    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if url:
        os.environ["PREFECT_API_URL"] = str(url)
    try:
        yield
    finally:
        if url:
            os.environ.pop("PREFECT_API_URL", None)


def dask_task_runner(spec: str) -> Any:
    """A ``DaskTaskRunner`` for ``spec`` (see :func:`parse_dask_spec`).

    Typed ``Any`` because ``prefect-dask`` is an optional extra: it is imported only when asked
    for, and a missing install is one line naming the package.
    """
    kind, value = parse_dask_spec(spec)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:  # pragma: no cover - the flows extra installs it
        raise DaskSpecError(
            "--dask needs prefect-dask and distributed: pip install 'aquameter[flows]'"
        ) from exc
    if kind == "local":
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={
                "n_workers": value,
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": None,
            },
        )
    return DaskTaskRunner(address=str(value))
