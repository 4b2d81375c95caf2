"""The operator report draws only from the database and judges detections against the truth.

The database gets a small, hand-made state (inlet readings, dma_daily, alerts, billing rows) so
every assertion can name the exact value it expects; the pure comparison is tested on frames.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import psycopg
import pytest

from aquameter.report import (
    TOLERANCES,
    alert_worklist,
    compare_faults,
    load_report_frames,
    write_report,
)

T0 = datetime(2026, 3, 2, tzinfo=UTC)
ALERT_SCHEMA: dict[str, Any] = {
    "code": pl.String, "subject_id": pl.String, "start_ts": pl.Datetime("us", "UTC"),
    "end_ts": pl.Datetime("us", "UTC"), "status": pl.String, "severity": pl.String,
    "evidence": pl.String,
}  # fmt: skip


def _alerts(rows: list[tuple[str, str, datetime, datetime | None]]) -> pl.DataFrame:
    return pl.DataFrame(
        [(c, s, a, b, "open" if b is None else "closed", "warning", "{}") for c, s, a, b in rows],
        schema=ALERT_SCHEMA,
        orient="row",
    )


def _fault(code: str, alert: str, subject: str, start: datetime | None) -> dict[str, object]:
    return {"code": code, "alert": alert, "subject": subject,
            "start": None if start is None else start.isoformat().replace("+00:00", "Z"),
            "end": None, "params": {}}  # fmt: skip


# --- pure comparison ---------------------------------------------------------------------------


def test_detection_must_start_near_the_onset_and_false_alerts_are_counted() -> None:
    onset = T0 + timedelta(days=3, hours=5)
    faults = [
        _fault("LEAK_CONTINUOUS", "LEAK_CONTINUOUS", "M1", onset),  # on time
        _fault("STUCK_METER", "STUCK_METER", "M2", onset),  # only a much earlier alert
        _fault("REVERSE_FLOW", "REVERSE_FLOW", "M3", onset),  # nothing at all
        _fault("DMA_LEAK", "DMA_NIGHT_FLOW_RISE", "DMA-NORTH", onset),  # next night
        _fault("WQ_LIMIT", "WQ_LIMIT", "WQ1:turbidity", None),  # no onset known: any time
    ]
    alerts = _alerts(
        [
            ("LEAK_CONTINUOUS", "M1", onset - timedelta(minutes=45), None),
            ("LEAK_CONTINUOUS", "M1", onset + timedelta(days=2), None),  # same leak, resumed
            ("STUCK_METER", "M2", onset - timedelta(days=2), onset - timedelta(days=1)),
            ("DMA_NIGHT_FLOW_RISE", "DMA-NORTH", onset + timedelta(hours=22), None),
            ("WQ_LIMIT", "WQ1:turbidity", T0 + timedelta(days=9), T0 + timedelta(days=9, hours=1)),
            ("LEAK_CONTINUOUS", "M9", onset, None),  # nothing injected on M9
            ("BURST", "M1", onset, onset + timedelta(hours=1)),  # right meter, wrong code
        ]
    )
    table = compare_faults(faults, alerts)
    rows = {(r["expected"], r["subject"]): r for r in table.to_dicts()}
    assert rows[("LEAK_CONTINUOUS", "M1")]["outcome"] == "detected"
    assert rows[("LEAK_CONTINUOUS", "M1")]["delay"] == "−0 h 45 min"
    assert rows[("LEAK_CONTINUOUS", "M1")]["tolerance"] == TOLERANCES["LEAK_CONTINUOUS"].label()
    stuck = rows[("STUCK_METER", "M2")]
    assert stuck["outcome"] == "missed" and stuck["delay"] == "−48 h 00 min"
    assert rows[("REVERSE_FLOW", "M3")]["outcome"] == "missed"
    assert rows[("REVERSE_FLOW", "M3")]["detected"] == ""
    assert rows[("DMA_NIGHT_FLOW_RISE", "DMA-NORTH")]["outcome"] == "detected"
    assert rows[("WQ_LIMIT", "WQ1:turbidity")]["tolerance"] == "any time"
    assert rows[("WQ_LIMIT", "WQ1:turbidity")]["outcome"] == "detected"
    false = {r["expected"]: r["count"] for r in table.to_dicts() if r["outcome"] == "false"}
    # The early STUCK_METER episode belongs to no fault; the resumed leak does.
    assert false == {"BURST": 1, "LEAK_CONTINUOUS": 1, "STUCK_METER": 1}
    assert set(table["outcome"].unique()) <= {"detected", "missed", "false"}


def test_worklist_lists_open_alerts_first_with_readable_evidence() -> None:
    alerts = _alerts(
        [
            ("BURST", "M1", T0, T0 + timedelta(hours=1)),
            ("LEAK_CONTINUOUS", "M2", T0 + timedelta(hours=3), None),
        ]
    ).with_columns(pl.Series("evidence", ['{"peak_lph": 812.25}', '{"rate_lph": 21.0}']))
    work = alert_worklist(alerts, [_fault("LEAK_CONTINUOUS", "LEAK_CONTINUOUS", "M2", T0)])
    assert work.columns == [
        "subject", "code", "start", "end", "severity", "evidence", "injected",
    ]  # fmt: skip
    assert work.row(0) == (
        "M2", "LEAK_CONTINUOUS", "2026-03-02 03:00", "open", "warning", "rate_lph=21",
        "LEAK_CONTINUOUS on M2",
    )  # fmt: skip
    assert work.row(1)[5] == "peak_lph=812.2" and work.row(1)[6] == "false"


# --- from the database ---------------------------------------------------------------------------


def _seed(url: str) -> int:
    """An hour of inlet flow on DMA-NORTH, two nights of dma_daily, alerts, a billing period."""
    with psycopg.connect(url) as conn:
        conn.execute("SELECT aq_ensure_partitions(%s, %s)", (T0, T0 + timedelta(days=5)))
        row = conn.execute(
            "SELECT id FROM channels WHERE dma_id = 'DMA-NORTH' AND role = 'inlet' "
            "AND quantity = 'flow' ORDER BY id LIMIT 1"
        ).fetchone()
        assert row is not None
        channel = int(row[0])
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO readings (channel_id, ts, value) VALUES (%s, %s, %s)",
                [(channel, T0 + timedelta(minutes=15 * i), 40.0 + (i % 4)) for i in range(96)],
            )
            cur.executemany(
                "INSERT INTO dma_daily (dma_id, day, day_hours, mnf_m3h, mnf_start_ts, nnf_m3h) "
                "VALUES ('DMA-NORTH', %s, 24, %s, %s, %s)",
                [(date(2026, 3, 2), 11.0, T0 + timedelta(hours=3), 2.0),
                 (date(2026, 3, 3), 15.5, T0 + timedelta(days=1, hours=3), 6.5)],
            )  # fmt: skip
            cur.executemany(
                "INSERT INTO alerts (code, subject_id, start_ts, end_ts, status, severity, "
                "evidence) VALUES (%s, %s, %s, %s, %s, 'warning', %s)",
                [("DMA_NIGHT_FLOW_RISE", "DMA-NORTH", T0 + timedelta(days=1, hours=3), None,
                  "open", '{"cusum": 4.2}'),
                 ("LOW_BATTERY", "AQN00007", T0 + timedelta(hours=7), T0 + timedelta(hours=9),
                  "closed", "{}")],
            )  # fmt: skip
            cur.execute(
                "INSERT INTO billing_volumes (meter_id, period_start, period_end, version, "
                "opening_read_type, closing_read_type, volume, vee_status, reason) VALUES "
                "('AQN00001', '2026-03-01', '2026-03-31', 1, 'ACTUAL', 'ACTUAL', 9.217, "
                "'VALID', 'INITIAL')"
            )
    return channel


@pytest.mark.only_backend("plain")  # it INSERTs into readings_hourly, a view on TimescaleDB
def test_report_is_built_from_the_database_with_worklist_and_banner(
    db_url: str, tmp_path: Path
) -> None:
    channel = _seed(db_url)
    since, until = T0 - timedelta(days=1), T0 + timedelta(days=4)
    frames = load_report_frames(db_url, since, until)
    inflow = frames["inflow"]
    # 96 quarter-hours of one inlet → 24 hourly means of 41.5 m³/h, nothing from elsewhere.
    assert inflow.height == 24 and set(inflow["dma_id"]) == {"DMA-NORTH"}
    assert inflow["flow_m3h"].to_list() == [41.5] * 24
    assert frames["billing"].row(0)[2:4] == (1, 9.217)

    # The rollup wins where it exists: a stale hourly row is what the chart shows for that hour.
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "INSERT INTO readings_hourly (channel_id, bucket, n, vavg) VALUES (%s, %s, 4, 99)",
            (channel, T0),
        )
    assert load_report_frames(db_url, since, until)["inflow"]["flow_m3h"][0] == 99.0

    onset = T0 + timedelta(hours=13)
    manifest = {
        "window": {"start": since.isoformat(), "end": until.isoformat()},
        "faults": [_fault("DMA_LEAK", "DMA_NIGHT_FLOW_RISE", "DMA-NORTH", onset)],
    }
    out = tmp_path / "report"
    written = write_report(
        db_url, out, since, until, manifest=manifest,
        failures=["flow water_balance: RuntimeError('boom <x>')"],
    )  # fmt: skip
    page, table = written.page, written.faults
    assert table.filter(pl.col("outcome") == "detected").height == 1
    assert table.filter(pl.col("outcome") == "false")["count"].to_list() == [1]
    text = page.read_text()
    assert text.index("class='failures'") < text.index("<h1>")
    assert "boom &lt;x&gt;" in text
    for header in ("subject", "code", "start", "end", "severity", "evidence"):
        assert f"<th>{header}</th>" in text
    assert "cusum=4.2" in text and "−1 h / +3 d" in text
    assert "http://" not in text and "https://" not in text
    assert {p.name for p in out.glob("inflow_*.png")} == {
        "inflow_DMA-NORTH.png",
        "inflow_DMA-SOUTH.png",
    }
    assert (out / "alerts.png").stat().st_size > 5_000

    # Without failures there is no banner; without a manifest no truth table.
    plain = write_report(db_url, tmp_path / "plain", since, until)
    assert "class='failures'" not in plain.page.read_text() and plain.faults.height == 0
    assert "Injected faults" not in plain.page.read_text()
    assert plain.failed_flows == [] and plain.flow_outcomes
    assert "No analytics flow run is recorded for this window" in plain.page.read_text()


# --- flow outcomes from flow_runs ----------------------------------------------------------------


def _record(url: str, name: str, error: Exception | None, since: datetime) -> str | None:
    """One flow_runs row written as run_flow writes it (its recorder, its one-line error)."""
    from flows.runner import FlowFailed, record_run

    line = None if error is None else FlowFailed(name, error).line
    summary = None if error is not None else {"flow": name, "rows": 3}
    started = datetime.now(UTC) - timedelta(seconds=2)
    assert record_run(url, name, started, summary, line, since, since + timedelta(days=1))
    return line


def test_failed_latest_run_is_a_red_banner_with_its_error(db_url: str, tmp_path: Path) -> None:
    since, until = T0 - timedelta(days=1), T0 + timedelta(days=4)
    # dma_night_flow failed, then completed: its latest run is fine, no banner for it.
    _record(db_url, "dma_night_flow", RuntimeError("early trouble"), T0)
    _record(db_url, "dma_night_flow", None, T0)
    line = _record(db_url, "water_balance", ValueError("no SIV for <DMA-NORTH>"), T0)
    # A failure over other days (last year) says nothing about this window's figures.
    _record(db_url, "meter_anomalies", RuntimeError("old"), T0 - timedelta(days=400))

    frames = load_report_frames(db_url, since, until)
    runs = frames["flow_runs"]
    assert dict(zip(runs["flow"], runs["status"], strict=True)) == {
        "dma_night_flow": "completed",
        "water_balance": "failed",
    }
    # The same failure seen by the caller (the demo's in-memory line) is not listed twice.
    written = write_report(db_url, tmp_path / "r", since, until, failures=[str(line)])
    assert len(written.failed_flows) == 1
    banner = written.failed_flows[0]
    assert banner.startswith("flow water_balance failed at ")
    assert banner.endswith("ValueError: no SIV for <DMA-NORTH>")
    text = written.page.read_text()
    top = text[: text.index("<h1>")]
    assert "class='failures'" in top
    assert "water_balance failed at" in top and "no SIV for &lt;DMA-NORTH&gt;" in top
    assert "early trouble" not in text and "RuntimeError: old" not in text
    # The table of latest runs: status, finished, duration per flow.
    assert "<h2>Analytics flows (latest run)</h2>" in text
    for header in ("flow", "status", "finished", "duration"):
        assert f"<th>{header}</th>" in text
    assert '<td class="missed">failed</td>' in text
    assert '<td class="detected">completed</td>' in text

    # Once water_balance completes again the banner is gone.
    _record(db_url, "water_balance", None, T0)
    again = write_report(db_url, tmp_path / "r2", since, until)
    assert again.failed_flows == [] and "class='failures'" not in again.page.read_text()


def test_report_cli_names_failed_flows(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer import Typer
    from typer.testing import CliRunner

    from aquameter.report_cli import report_cmd

    _record(db_url, "ingest_health", RuntimeError("read rates exploded"), T0)
    monkeypatch.setenv("AQUAMETER_DATABASE_URL", db_url)
    app = Typer()
    app.command()(report_cmd)
    out = tmp_path / "r"
    args = ["--out", str(out), "--since", "2026-03-01", "--until", "2026-03-06"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "flow ingest_health failed at" in result.output
    assert "RuntimeError: read rates exploded" in result.output


def test_database_without_flow_runs_still_gets_a_report(
    empty_db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database migrated only to 0008 (before flow_runs): report built, outcomes unavailable.
    (No registry sync: today's sync writes columns of later migrations.)"""
    import shutil

    import sql.migrate as migrate_mod

    old = tmp_path / "migrations"
    old.mkdir()
    for path in migrate_mod.MIGRATIONS_DIR.glob("*.sql"):
        if int(path.name[:4]) <= 8:
            shutil.copy(path, old / path.name)
    real = migrate_mod.discover
    monkeypatch.setattr(migrate_mod, "discover", lambda backend: real(backend, old))
    with psycopg.connect(empty_db_url) as conn:
        migrate_mod.migrate(conn)
        conn.commit()
        assert conn.execute("SELECT to_regclass('flow_runs')").fetchone() == (None,)
        assert conn.execute("SELECT max(version) FROM schema_migrations").fetchone() == (8,)

    since, until = T0 - timedelta(days=1), T0 + timedelta(days=4)
    assert "flow_runs" not in load_report_frames(empty_db_url, since, until)
    written = write_report(
        empty_db_url, tmp_path / "r", since, until, failures=["flow x FAILED: seen by the caller"]
    )
    assert not written.flow_outcomes
    text = written.page.read_text()
    assert "Flow outcomes are unavailable" in text
    # What the caller saw still makes the banner; nothing else is invented.
    assert written.failed_flows == ["flow x FAILED: seen by the caller"]
    assert "class='failures'" in text and "<h2>Water balance (IWA)</h2>" in text


def test_report_cli_rebuilds_from_database(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer import Typer
    from typer.testing import CliRunner

    from aquameter.report_cli import report_cmd

    _seed(db_url)
    monkeypatch.setenv("AQUAMETER_DATABASE_URL", db_url)
    out = tmp_path / "r"
    out.mkdir()
    (out / "manifest.json").write_text(
        json.dumps(
            {
                "window": {"start": "2026-03-01T00:00:00Z", "end": "2026-03-06T00:00:00Z"},
                "faults": [_fault("DMA_LEAK", "DMA_NIGHT_FLOW_RISE", "DMA-NORTH", T0)],
            }
        )
    )
    app = Typer()
    app.command()(report_cmd)
    result = CliRunner().invoke(app, ["--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "detected=1" in result.output and "false=1" in result.output
    assert (out / "index.html").exists()
    bad = CliRunner().invoke(app, ["--out", str(out), "--manifest", str(tmp_path / "nope")])
    assert bad.exit_code != 0
