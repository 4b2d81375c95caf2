"""The analytics flows under Prefect against a real PostgreSQL filled through the real ingest path.

A simulated fleet (the example registry: 100 meters in two DMAs, two weeks, a DMA leak and meter
faults) is written into ``readings`` by ``IngestPipeline`` — which also maintains ``ingest_days``
— with some readings held back. Then: every flow writes its tables; a second run changes no row
(full table contents compared); held-back readings arriving late, and a manual edit, make the flows
recompute exactly the units whose inputs changed (rows compared, ``computed_at`` included).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, cast

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import polars as pl
import psycopg
import pytest

from aquameter.registry import load_registry
from flows.export import export_billing, parse_period
from flows.late_data import local_days
from flows.load import (
    load_alerts,
    load_dma_boundary,
    load_dmas,
    load_exchanges,
    load_meter_reads,
    load_meters,
)
from flows.overrides import OverrideError, apply_overrides, parse_assignments
from flows.runner import DEFAULT_SCHEDULES, FLOWS, deployments, run_flow
from ingest.pipeline import IngestPipeline
from pipelines.schemas import ALERTS, DMA_PRESSURE, DMAS, METER_EXCHANGES, METER_READS, METERS
from protocols.uplink import Frame, Uplink
from simulators.faults import Fault
from simulators.fleet import FleetData, simulate_fleet
from tests.servers import EXAMPLE_REGISTRY, DatabaseFactory

# A recent Monday, so every reading is in the past for ingest's future-timestamp check.
_TODAY = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
START = _TODAY - timedelta(days=35 + _TODAY.weekday())
DAYS = 14
UNTIL = START + timedelta(days=DAYS)
BILL_START, BILL_END = (START + timedelta(days=1)).date(), (START + timedelta(days=12)).date()

LATE_METER = "AQN00010"  # DMA-NORTH (Europe/London)
LATE_METER_DAY = START + timedelta(days=5)
LATE_INLET_DAY = START + timedelta(days=9)
EDITED_METER = "KMS00020"  # DMA-SOUTH (Asia/Shanghai)

RESULT_TABLES = {
    "dma_daily": "dma_id, day",
    "alerts": "code, subject_id, start_ts",
    "billing_volumes": "meter_id, period_start, period_end, version",
    "water_balance": "dma_id, period, component",
    "water_balance_summary": "dma_id, period",
    "read_rates": "day, dma_id, gateway, vendor_id",
    "analysis_marks": "flow, subject_id, day",
    "meter_edits": "id",
}


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One temporary Prefect home and API server for the whole test session."""
    from prefect.settings import PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings({PREFECT_HOME: tmp_path_factory.mktemp("prefect_home")}):
        with prefect_test_harness(server_startup_timeout=90):
            yield


@pytest.fixture(scope="module")
def fleet() -> FleetData:
    registry = load_registry(EXAMPLE_REGISTRY)
    faults = [
        Fault("LEAK_CONTINUOUS", "AQN00001", START + timedelta(days=3, hours=5), None),
        Fault("TAMPER", "KMS00004", START + timedelta(days=3, hours=5), None),
        Fault("BURST", "AQN00002", START + timedelta(days=4, hours=6), None),
        Fault("DMA_LEAK", "DMA-SOUTH", START + timedelta(days=11, hours=13), None,
              {"rate_m3h": 3.0}),
    ]  # fmt: skip
    return simulate_fleet(registry, START, DAYS, seed=11, faults=faults)


def _late_reads(reads: pl.DataFrame) -> pl.Expr:
    lo, hi = LATE_METER_DAY + timedelta(hours=6), LATE_METER_DAY + timedelta(hours=10)
    return (pl.col("meter_id") == LATE_METER) & (pl.col("ts") > lo) & (pl.col("ts") <= hi)


def _late_inlet() -> pl.Expr:
    lo, hi = LATE_INLET_DAY + timedelta(hours=2), LATE_INLET_DAY + timedelta(hours=8)
    return (
        (pl.col("device_id") == "INLET-SOUTH")
        & (pl.col("channel") == "flow")
        & (pl.col("ts") >= lo)
        & (pl.col("ts") < hi)
    )


def _frames(reads: pl.DataFrame, instruments: pl.DataFrame) -> list[Frame]:
    """Uplinks as the adapters hand them to ingest: one per device, channel, status and day."""
    out = []
    r = reads.with_columns(
        pl.col("ts").dt.epoch("us").alias("e"), pl.col("ts").dt.date().alias("d")
    )
    for (meter, status, _), part in r.group_by(["meter_id", "quality", "d"], maintain_order=True):
        up = Uplink(str(meter), "register", (part["e"] / 1e6).to_list(),
                    part["register"].to_list(), status=int(status))  # fmt: skip
        out.append(Frame(source="test", address="fleet", uplinks=[up]))
    i = instruments.with_columns(
        pl.col("ts").dt.epoch("us").alias("e"), pl.col("ts").dt.date().alias("d")
    )
    for (dev, ch, unit, _), part in i.group_by(
        ["device_id", "channel", "unit", "d"], maintain_order=True
    ):
        up = Uplink(str(dev), str(ch), (part["e"] / 1e6).to_list(), part["value"].to_list(),
                    unit=str(unit))  # fmt: skip
        out.append(Frame(source="test", address="fleet", uplinks=[up]))
    return out


def _ingest(url: str, reads: pl.DataFrame, instruments: pl.DataFrame) -> int:
    with IngestPipeline(url, batch_seconds=0.05) as pipeline:
        outcomes = pipeline.submit_many(_frames(reads, instruments))
    assert sum(o.quarantined for o in outcomes) == 0
    return sum(o.accepted for o in outcomes)


@pytest.fixture(scope="module")
def db(db_factory: DatabaseFactory, fleet: FleetData) -> str:
    """A database with the fleet ingested, except the readings held back to arrive late."""
    url = db_factory.new()
    reads = fleet.reads.filter(~_late_reads(fleet.reads))
    inlet = fleet.inlet_values.filter(~_late_inlet())
    accepted = _ingest(url, reads, inlet)
    assert accepted == reads.height + inlet.height
    return url


def snapshot(url: str) -> dict[str, dict[tuple[Any, ...], str]]:
    """Every result table as {primary key: whole row as text}."""
    out: dict[str, dict[tuple[Any, ...], str]] = {}
    with psycopg.connect(url) as conn:
        for table, key in RESULT_TABLES.items():
            n = key.count(",") + 1
            rows = conn.execute(f"SELECT {key}, t::text FROM {table} t ORDER BY {key}").fetchall()
            out[table] = {tuple(r[:n]): r[n] for r in rows}
    return out


def changed(before: dict[tuple[Any, ...], str], after: dict[tuple[Any, ...], str]) -> set[Any]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def run(name: str, url: str, tmp: Path | None = None, **kw: Any) -> dict[str, Any]:
    if name == "billing_export":
        kw.setdefault("period_start", BILL_START)
        kw.setdefault("period_end", BILL_END)
        kw.setdefault("export_dir", str(tmp))
    if name == "water_balance":
        kw.setdefault("overrides", {"period": "window"})
    return run_flow(name, START, UNTIL, url, **kw)


def run_all(url: str, tmp: Path) -> dict[str, dict[str, Any]]:
    return {name: run(name, url, tmp) for name in FLOWS}


def window_days(tz: str, utc_day: datetime) -> set[date]:
    """Local days (of a zone) whose inputs include UTC day ``utc_day``: d−1, d, d+1, within the
    window's local days."""
    days = set(
        local_days(pl.DataFrame({"subject_id": ["x"], "timezone": [tz]}), START, UNTIL)["day"]
    )
    d = utc_day.date()
    return {d - timedelta(days=1), d, d + timedelta(days=1)} & days


# --- tests ------------------------------------------------------------------------------------


def test_loaders_return_schema_frames(db: str, fleet: FleetData) -> None:
    with psycopg.connect(db) as conn:
        meters = load_meters(conn)
        dmas = load_dmas(conn)
        reads = load_meter_reads(conn, meters, START, UNTIL + timedelta(seconds=1))
        flow, pressure = load_dma_boundary(conn, ["DMA-NORTH", "DMA-SOUTH"], START, UNTIL)
        exchanges = load_exchanges(conn)
        alerts = load_alerts(conn)
    assert meters.select(list(METERS)).schema == pl.Schema(cast(Any, METERS))
    assert dmas.select(list(DMAS)).schema == pl.Schema(cast(Any, DMAS))
    assert dmas.schema["holidays"] == pl.List(pl.Date)  # estimation profiles them as Sundays
    assert reads.schema == pl.Schema(cast(Any, METER_READS))
    assert pressure.schema == pl.Schema(cast(Any, DMA_PRESSURE))
    assert exchanges.schema == pl.Schema(cast(Any, METER_EXCHANGES))
    assert alerts.schema == pl.Schema(cast(Any, ALERTS))
    assert meters.height == 100 and meters["channel_id"].null_count() == 0
    assert set(meters.filter(pl.col("dma_id") == "DMA-SOUTH")["timezone"]) == {"Asia/Shanghai"}
    # Everything ingested comes back, exact to the microsecond and to the litre.
    expected = fleet.reads.filter(~_late_reads(fleet.reads)).sort("meter_id", "ts")
    assert reads.height == expected.height
    assert (reads["ts"] == expected["ts"]).all()
    assert (reads["register"] - expected["register"]).abs().max() < 1e-9  # type: ignore[operator]
    # L/s at the device, m³/h in the database.
    north = flow.filter(pl.col("dma_id") == "DMA-NORTH").sort("ts")
    sim = fleet.inlet_values.filter(
        (pl.col("device_id") == "INLET-NORTH") & (pl.col("channel") == "flow")
    ).sort("ts")
    assert north.height == sim.height
    assert (north["flow_m3h"] - sim["value"] * 3.6).abs().max() < 1e-9  # type: ignore[operator]


def test_flows_write_rerun_and_recompute_only_late_data(
    db: str, fleet: FleetData, prefect_api: None, tmp_path: Path
) -> None:
    # --- first run: every table gets its results ----------------------------------------------
    first = run_all(db, tmp_path / "run1")
    s1 = snapshot(db)
    assert set(s1["dma_daily"]) == {
        (dma, d)
        for dma, tz in (("DMA-NORTH", "Europe/London"), ("DMA-SOUTH", "Asia/Shanghai"))
        for d in local_days(pl.DataFrame({"subject_id": ["x"], "timezone": [tz]}), START, UNTIL)[
            "day"
        ]
    }
    assert first["dma_night_flow"]["days"] == len(s1["dma_daily"])
    codes = {(k[0], k[1]) for k in s1["alerts"]}
    assert ("TAMPER", "KMS00004") in codes
    assert ("LEAK_CONTINUOUS", "AQN00001") in codes
    assert len(s1["billing_volumes"]) == 100  # one version 1 per meter
    assert {k[3] for k in s1["billing_volumes"]} == {1}
    assert len(s1["water_balance"]) == 2 * 16 and len(s1["water_balance_summary"]) == 2
    assert {(k[1], k[2], k[3]) for k in s1["read_rates"]} == {
        ("DMA-NORTH", "GW-NORTH-1", "aqualink"),
        ("DMA-SOUTH", "GW-SOUTH-1", "kamstrup-nb"),
    }
    export1 = first["billing_export"]["export_path"]
    assert export1 and pl.read_csv(export1).height == 100
    with psycopg.connect(db) as conn:
        held = conn.execute(
            "SELECT estimated_m3 > 0, vee_status FROM billing_volumes WHERE meter_id = %s",
            (LATE_METER,),
        ).fetchone()
        rate_late_day = conn.execute(
            "SELECT received_reads, expected_reads FROM read_rates "
            "WHERE day = %s AND gateway = 'GW-NORTH-1'",
            (LATE_METER_DAY.date(),),
        ).fetchone()
    assert held == (True, "VALID")  # the held-back reads are a gap that VEE filled
    assert rate_late_day is not None and rate_late_day[0] == rate_late_day[1] - 16

    # Prefect ran them: flow runs and the mapped per-DMA tasks are recorded as completed.
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        # This test's runs: the API is the session's, other tests' runs (some fail on purpose)
        # are there too.
        runs = [r for r in client.read_flow_runs() if r.parameters.get("database_url") == db]
        tasks = client.read_task_runs()
    assert len(runs) >= len(FLOWS) and all(r.state and r.state.is_completed() for r in runs)
    assert sum(1 for t in tasks if t.name.startswith("compute_dma")) >= 2

    # --- second run, no new data: nothing is recomputed, no row changes -----------------------
    second = run_all(db, tmp_path / "run2")
    assert snapshot(db) == s1
    assert second["dma_night_flow"]["days"] == 0
    assert second["meter_anomalies"]["meters"] == 0
    assert (
        second["billing_export"]["versions"] == 0
        and second["billing_export"]["export_path"] is None
    )
    assert second["ingest_health"]["days"] == 0

    # --- late readings of one meter on one day --------------------------------------------------
    late = fleet.reads.filter(_late_reads(fleet.reads))
    assert late.height == 16
    _ingest(db, late, fleet.inlet_values.clear())
    third = run_all(db, tmp_path / "run3")
    s3 = snapshot(db)
    north_days = window_days("Europe/London", LATE_METER_DAY)
    assert changed(s1["dma_daily"], s3["dma_daily"]) == {("DMA-NORTH", d) for d in north_days}
    night = ("DMA-NORTH", LATE_METER_DAY.date())
    assert s1["dma_daily"][night] != s3["dma_daily"][night]
    assert changed(s1["read_rates"], s3["read_rates"]) == {
        (d, "DMA-NORTH", "GW-NORTH-1", "aqualink") for d in north_days
    }
    marks = changed(s1["analysis_marks"], s3["analysis_marks"])
    assert {k for k in marks if k[0] == "meter_anomalies"} == {
        ("meter_anomalies", LATE_METER, d) for d in north_days
    }
    assert {k[1] for k in marks if k[0].startswith("billing_export")} == {LATE_METER}
    assert {k[1] for k in marks if k[0].startswith("water_balance")} == {"DMA-NORTH"}
    assert {k[0] for k in changed(s1["water_balance_summary"], s3["water_balance_summary"])} == {
        "DMA-NORTH"
    }
    # Meter alerts of other meters are untouched.
    assert {k[1] for k in changed(s1["alerts"], s3["alerts"]) if k[0] != "DMA_NIGHT_FLOW_RISE"} <= {
        LATE_METER
    }
    # Billing: one new version for that meter only, replacing version 1 because reads arrived.
    new_versions = changed(s1["billing_volumes"], s3["billing_volumes"])
    assert new_versions == {(LATE_METER, BILL_START, BILL_END, 2)}
    assert third["billing_export"]["replacements"] == 1
    exported = pl.read_csv(third["billing_export"]["export_path"])
    assert exported.select(
        "meter_id", "version", "is_replacement", "replaces_version", "reason"
    ).rows() == [(LATE_METER, 2, True, 1, "LATE_READS")]
    with psycopg.connect(db) as conn:
        v2 = conn.execute(
            "SELECT estimated_m3, reason FROM billing_export WHERE meter_id = %s", (LATE_METER,)
        ).fetchone()
    assert v2 == (0.0, "LATE_READS")

    # --- late inlet flow of one DMA: only that DMA's days and balance are recomputed ------------
    inlet = fleet.inlet_values.filter(_late_inlet())
    assert inlet.height == 24
    _ingest(db, fleet.reads.clear(), inlet)
    run("dma_night_flow", db)
    run("water_balance", db)
    s4 = snapshot(db)
    south_days = window_days("Asia/Shanghai", LATE_INLET_DAY)
    assert changed(s3["dma_daily"], s4["dma_daily"]) == {("DMA-SOUTH", d) for d in south_days}
    with psycopg.connect(db) as conn:
        cov = conn.execute(
            "SELECT inflow_coverage FROM dma_daily WHERE dma_id = 'DMA-SOUTH' AND day = %s",
            (LATE_INLET_DAY.date(),),
        ).fetchone()
    assert cov is not None and cov[0] > 0.99
    assert {k[0] for k in changed(s3["water_balance"], s4["water_balance"])} == {"DMA-SOUTH"}

    # --- a manual edit: a correction version for that meter, with its audit --------------------
    edit_ts = START + timedelta(days=3, hours=12)
    with psycopg.connect(db) as conn:
        conn.execute(
            "INSERT INTO meter_edits (meter_id, ts, new_volume, edited_by, reason) "
            "VALUES (%s, %s, 0.5, 'clerk7', 'customer reading photo')",
            (EDITED_METER, edit_ts),
        )
    fifth = run_all(db, tmp_path / "run5")["billing_export"]
    s5 = snapshot(db)
    assert changed(s4["billing_volumes"], s5["billing_volumes"]) == {
        (EDITED_METER, BILL_START, BILL_END, 2)
    }
    assert fifth["versions"] == 1
    edit_days = window_days("Asia/Shanghai", edit_ts)
    assert changed(s4["dma_daily"], s5["dma_daily"]) == {("DMA-SOUTH", d) for d in edit_days}
    assert not changed(s4["read_rates"], s5["read_rates"])  # an edit is no reading
    with psycopg.connect(db) as conn:
        audit = conn.execute(
            "SELECT status, old_volume IS NOT NULL, old_flag FROM meter_edits"
        ).fetchone()
        corrected = conn.execute(
            "SELECT reason, edited_m3, 'M' = ANY(flags) FROM billing_export WHERE meter_id = %s",
            (EDITED_METER,),
        ).fetchone()
    assert audit == ("applied", True, "A")
    assert corrected == ("CORRECTION", 0.5, True)

    # --- an alert closed after billing ran: the hold is refreshed in place, not reissued -------
    with psycopg.connect(db) as conn:
        assert conn.execute(
            "SELECT hold, hold_codes FROM billing_export WHERE meter_id = 'AQN00001'"
        ).fetchone() == (True, ["LEAK_CONTINUOUS"])
        conn.execute(
            "UPDATE alerts SET status = 'closed', end_ts = start_ts + interval '1 hour', "
            "updated_at = now() WHERE code = 'LEAK_CONTINUOUS' AND subject_id = 'AQN00001'"
        )
    s6 = snapshot(db)
    assert run("billing_export", db, tmp_path / "run6")["versions"] == 0
    with psycopg.connect(db) as conn:
        assert conn.execute(
            "SELECT hold, hold_codes FROM billing_export WHERE meter_id = 'AQN00001'"
        ).fetchone() == (False, [])
    assert changed(s6["billing_volumes"], snapshot(db)["billing_volumes"]) == {
        ("AQN00001", BILL_START, BILL_END, 1)
    }
    s5 = snapshot(db)

    # --- and once more: quiet ------------------------------------------------------------------
    run_all(db, tmp_path / "run7")
    assert snapshot(db) == s5

    # The CLI's export of the period: the latest version of every meter, replacements flagged.
    result = export_billing(db, f"{BILL_START}..{BILL_END}", "parquet", tmp_path / "all.parquet")
    frame = pl.read_parquet(result.path)
    assert result.rows == frame.height == 100 and result.replacements == 2
    assert frame.filter(pl.col("is_replacement"))["meter_id"].sort().to_list() == [
        LATE_METER,
        EDITED_METER,
    ]

    # A changed threshold recomputes what was computed with the old one, once.
    days = len(s5["dma_daily"])
    assert run("dma_night_flow", db, overrides={"daily.favad.n1": 1.2})["days"] == days
    assert run("dma_night_flow", db, overrides={"daily.favad.n1": "1.2"})["days"] == 0


# --- no database ------------------------------------------------------------------------------


def test_overrides_coerce_to_the_defaults_types() -> None:
    from flows.dma_night_flow import DmaNightFlowSettings
    from flows.ingest_health import IngestHealthSettings

    s = apply_overrides(
        DmaNightFlowSettings(),
        parse_assignments(
            ["daily.night_flow.night_end=04:00", "daily.favad.n1=1.15", "inflow.interval=300",
             "rise.baseline=initial", "series.vee.hard_rules=FUTURE_TS,OVER_Q4"]
        ),
    )  # fmt: skip
    assert s.daily.night_flow.night_end.hour == 4 and s.daily.favad.n1 == 1.15
    assert s.inflow.interval == timedelta(minutes=5) and s.rise.baseline == "initial"
    assert s.series.vee.hard_rules == frozenset({"FUTURE_TS", "OVER_Q4"})
    assert DmaNightFlowSettings().daily.night_flow.night_end.hour == 5  # defaults untouched
    h = apply_overrides(IngestHealthSettings(), {"read_rate": {"vendor_interval_s": {"x": 3600}}})
    assert h.read_rate.vendor_interval_s == {"x": 3600}
    with pytest.raises(OverrideError):
        apply_overrides(DmaNightFlowSettings(), {"daily.night_flow.nigth_end": "04:00"})
    with pytest.raises(OverrideError):
        apply_overrides(DmaNightFlowSettings(), {"lookback_days": {"x": 1}})


def test_task_inputs_survive_pickling() -> None:
    """What a distributed task runner ships to workers: settings and work items."""
    from flows.billing_export import BillingChunk, BillingExportSettings
    from flows.dma_night_flow import DmaNightFlowSettings, DmaWork
    from flows.ingest_health import IngestHealthSettings
    from flows.meter_anomalies import MeterAnomaliesSettings, MeterChunk
    from flows.water_balance import DmaPeriods, Period, WaterBalanceSettings

    items: list[object] = [
        DmaNightFlowSettings(),
        MeterAnomaliesSettings(),
        WaterBalanceSettings(),
        BillingExportSettings(),
        IngestHealthSettings(),
        DmaWork("D", [date(2026, 1, 1)], ["1:2"]),
        MeterChunk(
            ["M"],
            pl.DataFrame({"subject_id": ["M"], "day": [date(2026, 1, 1)], "inputs": ["1:2"]}),
            date(2026, 1, 1),
        ),
        BillingChunk(["M"], ["1:2"]),
        DmaPeriods("D", [Period("2026-01", date(2026, 1, 1), date(2026, 2, 1))], ["1:2"]),
    ]
    for item in items:
        assert pickle.loads(pickle.dumps(item)) == item


def test_periods_and_schedules() -> None:
    assert parse_period("2026-02") == (date(2026, 2, 1), date(2026, 2, 28))
    assert parse_period("2026-03-05..2026-04-04") == (date(2026, 3, 5), date(2026, 4, 4))
    with pytest.raises(ValueError):
        parse_period("2026-04-04..2026-03-05")
    deps = deployments({"billing_export": None})
    assert [d.name for d in deps] == [f"aquameter-{n}" for n in FLOWS]
    crons = {d.name: [s.schedule.cron for s in d.schedules] for d in deps}  # type: ignore[union-attr]
    assert crons["aquameter-dma_night_flow"] == [DEFAULT_SCHEDULES["dma_night_flow"]]
    assert crons["aquameter-billing_export"] == []
    assert all("database_url" not in d.parameters for d in deps)


def test_water_quality_flow_raises_each_episode_once(
    db_factory: DatabaseFactory, prefect_api: None
) -> None:
    """A turbidity excursion and a frozen pH probe on the estate's analyser panel: the flow
    raises WQ_LIMIT and SENSOR_FLATLINE with the right subjects and starts; clean channels raise
    nothing; a second run changes no row."""
    from aquameter.registry import load_registry as load
    from ingest.registry_sync import sync_registry
    from pipelines.water_quality import WQ_CODES
    from sql.migrate import migrate

    url = db_factory.new(empty=True)
    with psycopg.connect(url) as conn:
        migrate(conn, partitions_ahead=2)
        sync_registry(conn, load(Path(__file__).parent.parent / "examples" / "estate.toml"))
        conn.commit()
    step = 300
    ts = [(START + timedelta(seconds=step * k)).timestamp() for k in range(2 * 288)]
    excursion = (START + timedelta(hours=10), START + timedelta(hours=11))
    frozen = (START + timedelta(days=1, hours=2), START + timedelta(days=1, hours=10))

    def inside(t: float, span: tuple[datetime, datetime]) -> bool:
        return span[0].timestamp() <= t < span[1].timestamp()

    series = {
        "turbidity": [1.6 if inside(t, excursion) else 0.3 + 0.01 * (k % 7)
                      for k, t in enumerate(ts)],
        "ph": [7.4 if inside(t, frozen) else 7.2 + 0.01 * (k % 5) for k, t in enumerate(ts)],
        "free_chlorine": [0.6 + 0.01 * (k % 3) for k in range(len(ts))],
        "temperature": [12.0 + 0.1 * (k % 4) for k in range(len(ts))],
    }  # fmt: skip
    frames = [
        Frame(source="test", address="wq", uplinks=[Uplink("WQ-HILL-RESERVOIR", ch, ts, vals)])
        for ch, vals in series.items()
    ]
    with IngestPipeline(url, batch_seconds=0.05) as pipeline:
        assert sum(o.accepted for o in pipeline.submit_many(frames)) == 4 * len(ts)

    until = START + timedelta(days=2)
    first = run_flow("water_quality", START, until, url)
    with psycopg.connect(url) as conn:
        alerts = load_alerts(conn, codes=list(WQ_CODES))
    found = {(r["code"], r["subject_id"]): r["start_ts"] for r in alerts.iter_rows(named=True)}
    assert set(found) == {
        ("WQ_LIMIT", "WQ-HILL-RESERVOIR:turbidity"),
        ("SENSOR_FLATLINE", "WQ-HILL-RESERVOIR:ph"),
    }
    # A sample speaks for the time since the previous one: starts are within one sample period.
    limit_start = found[("WQ_LIMIT", "WQ-HILL-RESERVOIR:turbidity")]
    flat_start = found[("SENSOR_FLATLINE", "WQ-HILL-RESERVOIR:ph")]
    assert timedelta(0) <= excursion[0] - limit_start <= timedelta(seconds=step)
    assert abs(flat_start - frozen[0]) <= timedelta(seconds=step)
    assert first["inserted"] == 2 and first["channels"] == 4

    second = run_flow("water_quality", START, until, url)
    with psycopg.connect(url) as conn:
        again = load_alerts(conn, codes=list(WQ_CODES))
    assert again.equals(alerts)
    assert (second["inserted"], second["updated"]) == (0, 0)


def test_meter_anomalies_in_slices_find_the_episodes_of_one_pass(
    db_factory: DatabaseFactory, fleet: FleetData
) -> None:
    """The same window evaluated in 4-day slices (alerts carried from slice to slice, as between
    daily runs) or in one pass: the same episodes (code, meter, start, status), so slicing bounds
    memory without changing what is found."""
    from flows.meter_anomalies import MeterAnomaliesSettings, MeterChunk, compute_meter_chunk

    ids = sorted(fleet.meters["meter_id"].to_list())
    units = pl.DataFrame({"subject_id": ids, "day": [START.date()] * len(ids), "inputs": "t"})
    chunk = MeterChunk(ids, units, START.date())
    found = []
    for days in (31, 4):
        url = db_factory.new()
        _ingest(url, fleet.reads, fleet.inlet_values)
        settings = MeterAnomaliesSettings(slice_days=days)
        compute_meter_chunk.fn(url, chunk, START, UNTIL, settings)
        with psycopg.connect(url) as conn:
            found.append(
                conn.execute(
                    "SELECT code, subject_id, start_ts, status FROM alerts ORDER BY 1, 2, 3"
                ).fetchall()
            )
    assert {r[0] for r in found[0]} >= {"LEAK_CONTINUOUS", "TAMPER", "BURST"}
    assert found[1] == found[0]


def test_plan_in_batches_of_subjects_equals_one_query(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The planner fingerprints units in batches of whole subjects (bounded memory): any batch
    size gives the same stale units as one query for the whole estate."""
    import flows.late_data as late_data

    with psycopg.connect(db, autocommit=True) as conn:
        subjects = load_meters(conn).select(pl.col("meter_id").alias("subject_id"), "timezone")

        def plan(batch: int) -> pl.DataFrame:
            monkeypatch.setattr(late_data, "PLAN_BATCH_UNITS", batch)
            return late_data.plan_days(
                conn, "batch_probe", "meter", subjects, START, UNTIL, UNTIL,
                late_horizon_days=3, salt="s",
            )  # fmt: skip

        whole = plan(10**9)
        # A flow that never ran: every local day of every meter is stale.
        assert whole.height == local_days(subjects, START, UNTIL).height > 0
        assert whole["inputs"].null_count() == 0
        assert whole["inputs"].str.ends_with("|ss").all()
        assert len(list(late_data.subject_batches(whole, 7))) > 10
        for batch in (1, 7, 250):
            assert plan(batch).equals(whole), batch
