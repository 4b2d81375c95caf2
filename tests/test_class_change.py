"""A meter's class change (or a change of its class's ``[[meter_class]]`` settings) synced from the
registry makes exactly the affected meters stale: the next incremental ``meter_anomalies`` run
recomputes those meters and no other, their alerts follow the new class's rules, and the next
incremental ``billing_export`` run refreshes their bills' holds, all without ``--full``.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import polars as pl
import psycopg

from aquameter.registry import MeterClass, Registry, load_registry
from flows.billing_export import BillingExportSettings, compute_billing_chunk, plan_billing
from flows.meter_anomalies import MeterAnomaliesSettings, compute_meter_chunk, plan_meter_days
from ingest.pipeline import IngestPipeline
from ingest.registry_sync import sync_registry
from simulators.faults import Fault
from simulators.fleet import simulate_fleet
from tests.servers import EXAMPLE_REGISTRY
from tests.test_meter_classes import register_frames

_TODAY = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
START = _TODAY - timedelta(days=10)
DAYS = 8
LEAKY = "AQN00001"
INGESTED = [LEAKY, "AQN00002", "KMS00001"]


def _ingest(url: str, registry: Registry) -> None:
    fault = Fault("LEAK_CONTINUOUS", LEAKY, START + timedelta(days=2, hours=5), None)
    fleet = simulate_fleet(registry, START, DAYS, seed=5, faults=[fault])
    reads = fleet.reads.filter(pl.col("meter_id").is_in(INGESTED))
    frames = register_frames(reads)
    with IngestPipeline(url, batch_seconds=0.05) as pipeline:
        assert sum(o.accepted for o in pipeline.submit_many(frames)) == reads.height


def _anomalies_run(url: str, as_of: datetime) -> set[str]:
    """One incremental meter_anomalies run (its tasks); the meters it recomputed."""
    settings = MeterAnomaliesSettings()
    since, until = START, START + timedelta(days=DAYS)
    chunks = plan_meter_days.fn(url, since, until, as_of, False, settings)
    for chunk in chunks:
        compute_meter_chunk.fn(url, chunk, since, as_of, settings)
    return {m for c in chunks for m in c.meter_ids}


def _billing_run(url: str, as_of: datetime) -> set[str]:
    settings = BillingExportSettings()
    ps, pe = (START + timedelta(days=1)).date(), (START + timedelta(days=DAYS - 2)).date()
    _, chunks = plan_billing.fn(url, ps, pe, as_of, False, settings)
    for chunk in chunks:
        compute_billing_chunk.fn(url, chunk, ps, pe, as_of, settings)
    return {m for c in chunks for m in c.meter_ids}


def _state(url: str) -> tuple[set[str], bool]:
    """(open alert codes of the leaky meter, whether its latest bill is held)."""
    with psycopg.connect(url) as conn:
        codes = {
            r[0]
            for r in conn.execute(
                "SELECT code FROM alerts WHERE subject_id = %s AND status = 'open'", (LEAKY,)
            ).fetchall()
        }
        row = conn.execute("SELECT hold FROM billing_export WHERE meter_id = %s", (LEAKY,))
        held = row.fetchone()
    assert held is not None
    return codes, bool(held[0])


def test_class_change_recomputes_exactly_its_meters(db_url: str) -> None:
    registry = load_registry(EXAMPLE_REGISTRY)
    north = next(g for g in registry.meter_groups if g.id_format.startswith("AQN"))
    north_ids = {d.id for d in north.expand()}
    _ingest(db_url, registry)
    as_of = datetime.now(UTC)

    first = _anomalies_run(db_url, as_of)
    assert north_ids <= first
    _billing_run(db_url, as_of)
    assert _anomalies_run(db_url, as_of) == set() and _billing_run(db_url, as_of) == set()
    codes, held = _state(db_url)
    assert "LEAK_CONTINUOUS" in codes and held  # a single dwelling's flow that never stops

    # The north group serves buildings: its meters take the multi-dwelling class.
    north.meter_class = "multi_dwelling"
    with psycopg.connect(db_url) as conn:
        result = sync_registry(conn, registry)
    assert result.invalidated is not None
    assert result.invalidated["meter_anomalies"] == len(north_ids)
    assert _anomalies_run(db_url, as_of) == north_ids  # exactly those meters, no other
    codes, _ = _state(db_url)
    # Judged against its own night floor: a floor that was high from its first nights has no
    # new sustained rise, so the building raises nothing.
    assert "LEAK_CONTINUOUS" not in codes
    assert _billing_run(db_url, as_of) >= {LEAKY}
    assert _state(db_url)[1] is False
    assert _anomalies_run(db_url, as_of) == set() and _billing_run(db_url, as_of) == set()

    # A change of the class's settings in [[meter_class]] invalidates the meters of that class:
    # back to the single-dwelling rule, the leak is raised again and holds the bill again.
    registry.meter_classes = [MeterClass(id="multi_dwelling", anomaly={"leak_rule": "no_zero"})]
    with psycopg.connect(db_url) as conn:
        result = sync_registry(conn, registry)
    assert result.invalidated == {"meter_anomalies": len(north_ids), "dma_night_flow": 0}
    assert _anomalies_run(db_url, as_of) == north_ids
    assert "LEAK_CONTINUOUS" in _state(db_url)[0]
    assert _billing_run(db_url, as_of) >= {LEAKY}
    assert _state(db_url)[1] is True
