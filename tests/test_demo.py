"""``aquameter demo`` end to end at small scale: real PostgreSQL, broker, CoAP and OPC-UA servers,
flows under Prefect. Every injected fault must come back as an alert of the right code, and the
report must open in a real browser (headless Chromium)."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import psycopg
import pytest

from aquameter.demo import run_demo
from aquameter.settings import Settings

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def demo(
    db_factory: Any, mqtt_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[dict[str, Any], Path, str]]:
    from prefect.settings import PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    url = db_factory.new(empty=True)
    root = tmp_path_factory.mktemp("demo")
    tag = uuid.uuid4().hex[:8]
    settings = Settings(
        database_url=url,
        mqtt_url=mqtt_url,
        data_dir=root / "data",
        # A topic root and client of its own: the session broker is shared with other tests.
        mqtt_topic_root=f"aqdemo-{tag}/v1",
        mqtt_client_id=f"aquameter-demo-{tag}",
        mqtt_shared_group=None,
    )
    report = root / "report"
    # Prefect's temporary API server is stopped here, before pytest closes its output streams.
    with temporary_settings({PREFECT_HOME: root / "prefect"}):
        with prefect_test_harness(server_startup_timeout=90):
            summary = run_demo(settings, duration_s=30.0, days=16, meters=240, report_dir=report)
    yield summary, report, url


def test_every_injected_fault_is_detected_with_its_code(
    demo: tuple[dict[str, Any], Path, str],
) -> None:
    summary, report, url = demo
    manifest = json.loads((report / "manifest.json").read_text())
    expected = {(f["alert"], f["subject"]) for f in manifest["faults"]}
    expected.add(("WQ_LIMIT", "WQ-HILL-RESERVOIR:turbidity"))
    assert {f["code"] for f in manifest["faults"]} >= {
        "DMA_LEAK", "LEAK_CONTINUOUS", "STUCK_METER", "REVERSE_FLOW", "COMMS_LOSS",
    }  # fmt: skip
    with psycopg.connect(url) as conn:
        found = set(conn.execute("SELECT code, subject_id FROM alerts").fetchall())
    assert expected <= found, f"missed: {sorted(expected - found)}"
    outcomes = {(r["expected"], r["subject"]): r["outcome"] for r in summary["faults"]}
    assert all(outcomes[k] == "detected" for k in expected)
    assert not summary["interrupted"]


STANDARD_KINDS = ("senml-json", "senml-cbor", "wmbus", "wmbus-hex", "cjt188")


def test_a_mixed_estate_every_kind_stored_and_its_faults_found(
    demo: tuple[dict[str, Any], Path, str],
) -> None:
    """Meters of every payload format sent their live day through their own protocol (SenML and
    wM-Bus gateways over MQTT, CJ/T 188 DTUs over TCP) and every reading of it was stored; the
    faults injected on the standards' meters were found like the others."""
    summary, report, url = demo
    by = summary["by_format"]
    sent = summary["live"]["sent_by_format"]
    assert set(by) >= {"json", "binary-v1", *STANDARD_KINDS}
    for fmt in STANDARD_KINDS:
        assert by[fmt]["meters"] > 0 and by[fmt]["stored"] > 0, (fmt, by[fmt])
        assert sent[fmt] > 0 and by[fmt]["stored_live"] == sent[fmt], (fmt, by[fmt], sent[fmt])
    with psycopg.connect(url) as conn:
        reasons = dict(
            conn.execute("SELECT reason, count(*) FROM quarantine GROUP BY reason").fetchall()
        )
        vendor_of = dict(conn.execute("SELECT id, vendor_id FROM devices").fetchall())
    assert "DECRYPT_FAILED" not in reasons and "UNKNOWN_DEVICE" not in reasons, reasons
    manifest = json.loads((report / "manifest.json").read_text())
    family = {
        "oms-wmbus": "wM-Bus", "oms-wmbus-hex": "wM-Bus", "cjt188-dtu": "CJ/T 188",
        "lwm2m-senml": "SenML", "lwm2m-senml-cbor": "SenML",
    }  # fmt: skip
    on = {f["subject"]: family.get(vendor_of.get(f["subject"]) or "") for f in manifest["faults"]}
    assert {"wM-Bus", "CJ/T 188", "SenML"} <= set(on.values()), on
    outcomes = {r["subject"]: r["outcome"] for r in summary["faults"]}
    for subject, kind in on.items():
        if kind:
            assert outcomes[subject] == "detected", (kind, subject)


def test_every_flow_completed_and_the_report_says_so(
    demo: tuple[dict[str, Any], Path, str],
) -> None:
    summary, report, url = demo
    assert summary["failed_flows"] == [] and summary["failed"] == []
    assert summary["missed_faults"] == []
    with psycopg.connect(url) as conn:
        runs: dict[str, str] = dict(
            conn.execute(
                "SELECT DISTINCT ON (flow) flow, status FROM flow_runs "
                "ORDER BY flow, finished_at DESC"
            ).fetchall()
        )
    assert set(runs) == set(summary["flows"]) and set(runs.values()) == {"completed"}
    page = (report / "index.html").read_text()
    assert "class='failures'" not in page
    assert "<h2>Analytics flows (latest run)</h2>" in page
    assert page.count('<td class="detected">completed</td>') == len(runs)


def test_summary_names_failed_flows_and_missed_faults_in_red() -> None:
    from rich.console import Console

    from aquameter.demo import _print_summary, demo_failures

    line = "flow water_balance FAILED: RuntimeError: boom"
    summary: dict[str, Any] = {
        "meters": 10,
        "failed_flows": [line],
        "missed_faults": ["DMA_LEAK on DMA-NORTH (expected DMA_NIGHT_FLOW_RISE)"],
        "flows": {"water_balance": {"status": "FAILED", "error": line}, "dma_night_flow": {}},
        "faults": [],
    }
    summary["failed"] = demo_failures(summary)
    assert summary["failed"] == [
        line, "missed fault: DMA_LEAK on DMA-NORTH (expected DMA_NIGHT_FLOW_RISE)",
    ]  # fmt: skip
    con = Console(record=True, width=200, force_terminal=True, color_system="truecolor")
    _print_summary(con, summary, Path("r"))
    text = con.export_text(clear=False)
    assert "demo FAILED: 1 analytics flow(s) failed, 1 injected fault(s) missed" in text
    assert "flows completed: dma_night_flow" in text
    styled = con.export_html(inline_styles=True)
    # The failure lines are drawn in red (rich's "red" is #800000 in its HTML export).
    assert styled.count("color: #800000") >= 3 and "boom" in styled
    assert demo_failures({"failed_flows": [], "missed_faults": []}) == []


def test_a_payload_format_not_stored_whole_fails_the_demo() -> None:
    """``make demo`` exits 1 (``summary["failed"]``) when a kind of meter stored nothing, or a
    standard's live readings stored differ from those sent; a whole estate passes."""
    from rich.console import Console

    from aquameter.demo import _print_summary, demo_failures

    ok: dict[str, Any] = {
        "meters": 30,
        "failed_flows": [],
        "missed_faults": [],
        "faults": [],
        "by_format": {
            "json": {"meters": 10, "stored": 500, "stored_live": 90},
            "wmbus": {"meters": 10, "stored": 400, "stored_live": 96},
            "cjt188": {"meters": 10, "stored": 300, "stored_live": 24},
        },
        "live": {"sent_by_format": {"json": 90, "wmbus": 96, "cjt188": 24}},
    }
    assert demo_failures(ok) == []
    short = json.loads(json.dumps(ok))
    short["by_format"]["wmbus"]["stored_live"] = 95
    short["by_format"]["cjt188"] = {"meters": 10, "stored": 0, "stored_live": 0}
    short["failed"] = demo_failures(short)
    assert short["failed"] == [
        "mixed estate: cjt188: 10 meters, no reading stored",
        "mixed estate: wmbus: 96 live readings sent, 95 stored",
        "mixed estate: cjt188: 24 live readings sent, 0 stored",
    ]
    con = Console(record=True, width=200)
    _print_summary(con, short, Path("r"))
    text = con.export_text()
    assert "demo FAILED: 2 payload format(s) not stored whole" in text
    assert "95 of 96 sent" in text


def test_all_protocols_delivered_and_nothing_quarantined(
    demo: tuple[dict[str, Any], Path, str],
) -> None:
    summary, _, url = demo
    assert summary["ingest"]["quarantined"] == {}
    assert summary["imported"]["quarantined"] == 0
    assert summary["live"]["coap_responses"] == {"2.04 Changed": summary["live"]["coap_uplinks"]}
    assert summary["live"]["unacknowledged"] == 0  # every live MQTT message stored before flows
    with psycopg.connect(url) as conn:
        by_role: dict[str, int] = dict(
            conn.execute(
                "SELECT c.role, count(*) FROM readings r JOIN channels c ON c.id = r.channel_id "
                "GROUP BY c.role"
            ).fetchall()
        )
        coap_rows = conn.execute(
            "SELECT count(*) FROM readings r JOIN channels c ON c.id = r.channel_id "
            "JOIN devices d ON d.id = c.device_id WHERE d.protocol = 'coap' "
            "AND r.ts > now() - interval '1 day'"
        ).fetchone()
    assert by_role.get("quality", 0) > 0  # OPC-UA station streamed
    assert by_role.get("pump", 0) > 0  # Modbus pump station polled
    assert coap_rows is not None and coap_rows[0] > 0
    assert by_role["customer"] >= summary["imported"]["accepted"] // 2


def test_report_and_billing_export_written(demo: tuple[dict[str, Any], Path, str]) -> None:
    summary, report, _ = demo
    page = (report / "index.html").read_text()
    assert "http://" not in page and "https://" not in page
    for name in ("nrw.png", "alerts.png", "read_rates.png"):
        assert (report / name).stat().st_size > 5_000, name
    assert len(list(report.glob("inflow_*.png"))) == 3
    export = Path(summary["billing_export"])
    assert export.parent == report.resolve()
    assert pl.read_csv(export).height == summary["meters"]


def test_report_renders_in_headless_chromium(
    demo: tuple[dict[str, Any], Path, str], tmp_path: Path
) -> None:
    if shutil.which(CHROMIUM) is None:
        pytest.skip("Chromium not installed (Debian package `chromium`)")
    _, report, _ = demo
    shot = tmp_path / "report.png"
    proc = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1400,3000",
            "--enable-logging=stderr",
            "--v=0",
            (report / "index.html").resolve().as_uri(),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Uncaught" not in proc.stderr and "ERR_FILE_NOT_FOUND" not in proc.stderr
    assert shot.stat().st_size > 50_000
    shutil.copy(shot, report / "screenshot.png")
