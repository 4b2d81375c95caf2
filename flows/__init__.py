"""Analytics flows: load from PostgreSQL, call the pure functions of ``pipelines`` and ``dma``,
write results idempotently, recompute only what late data made stale.

Flows (``flows.runner.FLOWS``, each imported on first use): ``dma_night_flow``,
``meter_anomalies``, ``water_balance``, ``billing_export``, ``ingest_health``, ``water_quality``.
Run one with ``flows.runner.run_flow``, serve all on their schedules with
``flows.runner.serve_all``, export bills with ``flows.export.export_billing``. Every run, one-off
or served, leaves its outcome in ``flow_runs``.
"""
