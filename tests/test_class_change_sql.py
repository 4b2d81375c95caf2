"""A meter's class changed by hand in SQL, not by ``devices sync``, is caught by the trigger of
migration 0013: the next incremental ``meter_anomalies`` run recomputes exactly those meters, and
the next ``billing_export`` run refreshes their bills' holds.
"""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg

from aquameter.registry import load_registry
from tests.servers import EXAMPLE_REGISTRY
from tests.test_class_change import LEAKY, _anomalies_run, _billing_run, _ingest, _state


def test_class_change_by_sql_recomputes_exactly_its_meters(db_url: str) -> None:
    registry = load_registry(EXAMPLE_REGISTRY)
    groups = [g for g in registry.meter_groups if g.id_format.startswith("AQN")]
    north_ids = {d.id for g in groups for d in g.expand()}  # the north group's meters
    _ingest(db_url, registry)
    as_of = datetime.now(UTC)

    assert north_ids <= _anomalies_run(db_url, as_of)
    _billing_run(db_url, as_of)
    assert _anomalies_run(db_url, as_of) == set() and _billing_run(db_url, as_of) == set()
    codes, held = _state(db_url)
    assert "LEAK_CONTINUOUS" in codes and held

    with psycopg.connect(db_url) as conn:
        moved = conn.execute(
            "UPDATE meters SET meter_class = 'multi_dwelling' WHERE id = ANY(%s)",
            (sorted(north_ids),),
        ).rowcount
        # Setting a meter's class to the one it has already is no change: nothing goes stale.
        conn.execute(
            "UPDATE meters SET meter_class = meter_class WHERE NOT (id = ANY(%s))",
            (sorted(north_ids),),
        )
    assert moved == len(north_ids)
    assert _anomalies_run(db_url, as_of) == north_ids  # exactly those meters, no other
    assert "LEAK_CONTINUOUS" not in _state(db_url)[0]
    assert _billing_run(db_url, as_of) >= {LEAKY}
    assert _state(db_url)[1] is False
    assert _anomalies_run(db_url, as_of) == set() and _billing_run(db_url, as_of) == set()

    # A class the schema does not know is refused, as before the trigger.
    with psycopg.connect(db_url) as conn:
        try:
            conn.execute("UPDATE meters SET meter_class = 'castle' WHERE id = %s", (LEAKY,))
        except psycopg.errors.CheckViolation:
            pass
        else:
            raise AssertionError("an unknown meter class was accepted")
