"""The ingest exporter (ingest.metrics) against a real pipeline, database, broker and Prometheus.

Every value is checked against what really happened: rows in the database, messages the broker
delivered. Readiness and liveness are made to fail for real (a stopped paho thread, a database
address nothing listens on), not by setting attributes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime
from pathlib import Path

import polars as pl
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from aquameter.embedded import free_port
from aquameter.registry import load_registry
from flows.store import write_marks
from ingest.metrics import MetricSources, MetricsServer, start_metrics
from ingest.pipeline import IngestPipeline
from ingest.service import vendor_formats
from protocols.mqtt import MqttIngest, uplink_topic
from protocols.uplink import Frame
from tests.mqtt_helpers import broker_v5, publish_all
from tests.servers import EXAMPLE_REGISTRY

ROOT = f"aqm-{uuid.uuid4().hex[:8]}/v1"
NOW = int(time.time()) // 900 * 900
T0 = NOW - 86400
METERS = 5
PER_MSG = 4
# Nothing listens on port 1 of the loopback: a real connection refusal.
DEAD_DB = "postgresql://postgres@127.0.0.1:1/postgres"


def _valid() -> list[tuple[str, bytes]]:
    out = []
    for i in range(1, METERS + 1):
        dev = f"AQN{i:05d}"
        body = {"dev": dev, "t0": T0, "step": 900, "reg": [10.0 + i + k for k in range(PER_MSG)]}
        out.append((uplink_topic(ROOT, "aqualink", dev), json.dumps(body).encode()))
    return out


INVALID = [
    (uplink_topic(ROOT, "aqualink", "AQN00001"), b'{"dev": "AQN00001", "reg": '),  # MALFORMED
    (
        uplink_topic(ROOT, "aqualink", "NOPE"),
        json.dumps({"dev": "NOPE", "ts": T0, "reg": 1.0}).encode(),
    ),  # UNKNOWN_DEVICE
]


def wait_for(what: str, check: Callable[[], object], timeout: float = 20.0) -> object:
    """Poll ``check`` until truthy; fail naming ``what`` and the last value seen."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def scrape(server: MetricsServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = get(f"{server.url}/metrics")
    assert status == 200, text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"{name}{labels} not exported; have {sorted({k[0] for k in samples})}"
    return samples[key]


@pytest.fixture
def ingest(mqtt_url: str, db_url: str) -> Iterator[tuple[IngestPipeline, MqttIngest]]:
    pipeline = IngestPipeline(db_url, batch_seconds=0.05).start()
    client = MqttIngest(
        mqtt_url,
        pipeline,
        vendor_formats(load_registry(EXAMPLE_REGISTRY)),
        client_id=f"metrics-{uuid.uuid4().hex[:8]}",
        shared_group=None,
        topic_root=ROOT,
        v5=broker_v5(mqtt_url),
    ).start()
    assert client.connected.wait(10), "MQTT ingest did not subscribe within 10 s"
    try:
        yield pipeline, client
    finally:
        client.shutdown()
        pipeline.close()


def _publish_and_settle(mqtt_url: str, client: MqttIngest) -> int:
    messages = _valid() + INVALID
    publish_all(mqtt_url, messages)
    wait_for(
        f"{len(messages)} messages durable and acknowledged",
        lambda: client.stats.acked >= len(messages),
    )
    return len(messages)


def test_metrics_health_and_readiness(ingest, mqtt_url, db_url):
    pipeline, client = ingest
    sources = MetricSources(
        pipeline=pipeline, mqtt=client, flows_database_url=db_url, db_check_every_s=0.2
    )
    with psycopg.connect(db_url) as conn, conn.cursor() as cur:
        marks = pl.DataFrame({"subject_id": ["d1"], "day": [date(2026, 1, 1)], "inputs": ["x"]})
        write_marks(cur, "ingest_health", marks, datetime.now(UTC))
        # A billing mark's flow name carries its period; the label keeps only the flow.
        write_marks(cur, "billing_export:2026-01-01..2026-02-01", marks, datetime.now(UTC))
        # flow_runs: ingest_health completed (2 s), then failed (4 s); water_balance completed.
        cur.executemany(
            "INSERT INTO flow_runs (flow, started_at, finished_at, status, error) VALUES"
            " (%s, to_timestamp(%s), to_timestamp(%s), %s, %s)",
            [
                ("ingest_health", 1_700_000_000, 1_700_000_002, "completed", None),
                ("ingest_health", 1_700_000_100, 1_700_000_104, "failed", "flow ... FAILED: x"),
                ("water_balance", 1_700_000_050, 1_700_000_053.5, "completed", None),
            ],
        )
        conn.commit()
    with start_metrics("127.0.0.1", 0, sources) as server:
        n_messages = _publish_and_settle(mqtt_url, client)
        with psycopg.connect(db_url) as conn:
            stored = conn.execute("SELECT count(*) FROM readings").fetchone()[0]
            by_reason = dict(conn.execute("SELECT reason, count(*) FROM quarantine GROUP BY 1"))
            marked = conn.execute(
                "SELECT extract(epoch FROM max(computed_at)) FROM analysis_marks"
                " WHERE flow = 'ingest_health'"
            ).fetchone()[0]
        assert stored == METERS * PER_MSG
        assert by_reason == {"MALFORMED": 1, "UNKNOWN_DEVICE": 1}

        m = scrape(server)
        assert value(m, "aquameter_readings_stored_total") == stored
        assert value(m, "aquameter_frames_total") == n_messages
        assert value(m, "aquameter_readings_received_total") == stored + 2
        assert value(m, "aquameter_duplicates_total") == 0
        assert value(m, "aquameter_quarantined_total", reason="MALFORMED") == 1
        assert value(m, "aquameter_quarantined_total", reason="UNKNOWN_DEVICE") == 1
        assert value(m, "aquameter_adapter_up", adapter="mqtt") == 1
        assert value(m, "aquameter_broker_up") == 1
        assert value(m, "aquameter_database_up") == 1
        assert value(m, "aquameter_healthy") == 1
        assert value(m, "aquameter_mqtt_messages_total") == n_messages
        assert value(m, "aquameter_mqtt_acked_total") == n_messages
        assert value(m, "aquameter_mqtt_unacked_messages") == 0
        assert value(m, "aquameter_queue_frames") == 0
        assert value(m, "aquameter_queue_bytes") == 0
        assert value(m, "aquameter_queue_saturated") == 0
        batches = value(m, "aquameter_batches_total")
        assert batches >= 1
        # One observation per committed batch, through the pipeline's on_commit hook.
        assert value(m, "aquameter_commit_seconds_count") == batches
        assert value(m, "aquameter_commit_seconds_bucket", le="+Inf") == batches
        assert value(m, "aquameter_commit_seconds_sum") > 0
        last = value(m, "aquameter_flow_last_computed_timestamp_seconds", flow="ingest_health")
        assert last == pytest.approx(float(marked))
        assert (
            "aquameter_flow_last_computed_timestamp_seconds",
            (("flow", "billing_export"),),
        ) in m
        success = "aquameter_flow_last_success_timestamp_seconds"
        assert value(m, success, flow="ingest_health") == 1_700_000_002  # before the failure
        assert value(m, success, flow="water_balance") == 1_700_000_053.5
        duration = "aquameter_flow_last_run_duration_seconds"
        assert value(m, duration, flow="ingest_health") == 4  # the latest run, the failed one
        assert value(m, duration, flow="water_balance") == 3.5
        assert value(m, "aquameter_flow_last_run_failed", flow="ingest_health") == 1
        assert value(m, "aquameter_flow_last_run_failed", flow="water_balance") == 0

        assert get(f"{server.url}/healthz") == (200, "ok\n")
        assert get(f"{server.url}/readyz") == (200, "ok\n")
        assert get(f"{server.url}/nope")[0] == 404

        # paho's network thread ends behind the adapter's back: not alive (restart me), and
        # not ready either.
        client.client.loop_stop()
        status, body = get(f"{server.url}/healthz")
        assert status == 503 and "MQTT network thread (paho)" in body, body
        assert body.count("\n") == 1
        status, body = get(f"{server.url}/readyz")
        assert status == 503 and "MQTT network thread (paho)" in body, body
        assert value(scrape(server), "aquameter_healthy") == 0

        # Stopped on purpose: alive again, but not ready while the broker is not connected.
        client.shutdown()
        wait_for("MQTT disconnected", lambda: not client.connected.is_set(), 10)
        assert get(f"{server.url}/healthz") == (200, "ok\n")
        status, body = get(f"{server.url}/readyz")
        assert status == 503 and body.startswith("MQTT not connected/subscribed to"), body
        m = scrape(server)
        assert value(m, "aquameter_adapter_up", adapter="mqtt") == 0
        assert value(m, "aquameter_broker_up") == 0

        # The database goes away (a URL nothing listens on): not ready, with the reason.
        sources.mqtt = None
        sources.database_url = DEAD_DB
        time.sleep(0.3)  # past the cached result
        status, body = get(f"{server.url}/readyz")
        assert status == 503 and body.startswith("database unreachable: OperationalError"), body
        assert value(scrape(server), "aquameter_database_up") == 0
        assert get(f"{server.url}/healthz") == (200, "ok\n")
    # Stopping the exporter hands the pipeline its hook back.
    assert pipeline.on_commit is None


def test_two_exporters_in_one_process_do_not_share_state(db_url):
    with (
        IngestPipeline(db_url, batch_seconds=0.05) as a,
        IngestPipeline(db_url, batch_seconds=0.05) as b,
    ):
        with (
            start_metrics("127.0.0.1", 0, MetricSources(pipeline=a)) as sa,
            start_metrics("127.0.0.1", 0, MetricSources(pipeline=b)) as sb,
        ):
            assert sa.port != sb.port
            a.counters.add(frames=3)
            assert value(scrape(sa), "aquameter_frames_total") == 3
            assert value(scrape(sb), "aquameter_frames_total") == 0
            # A process that is to consume MQTT is not ready before its client exists.
            sb.sources.broker_expected = True
            assert get(f"{sb.url}/readyz") == (503, "MQTT not started yet\n")
            assert get(f"{sa.url}/readyz") == (200, "ok\n")


def test_a_repeated_quarantined_input_counts_as_a_repeat_not_a_row(db_url):
    """The same bad message twice: one quarantine row, so aquameter_quarantined counts it once,
    and aquameter_quarantine_repeats the second time (as aquameter_duplicates for readings)."""
    topic, payload = INVALID[0]
    bad = Frame("mqtt", topic, payload=payload, payload_format="json", device_hint="AQN00001")
    with IngestPipeline(db_url, batch_seconds=0.05, registry_poll_s=None) as p:
        with start_metrics("127.0.0.1", 0, MetricSources(pipeline=p)) as server:
            p.submit_many([bad])
            p.submit_many([bad])
            m = scrape(server)
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT reason, occurrences FROM quarantine").fetchall()
    assert rows == [("MALFORMED", 2)]
    assert value(m, "aquameter_quarantined_total", reason="MALFORMED") == 1
    assert value(m, "aquameter_quarantine_repeats_total", reason="MALFORMED") == 1
    assert value(m, "aquameter_readings_received_total") == 2


def _query(prom: str, expr: str) -> list[dict]:
    url = f"{prom}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    status, body = get(url, timeout=5)
    if status != 200:
        return []
    data = json.loads(body)
    return data["data"]["result"] if data.get("status") == "success" else []


def test_real_prometheus_scrapes_the_exporter(ingest, mqtt_url, db_url, tmp_path: Path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not on PATH (Debian: apt-get install prometheus)")
    pipeline, client = ingest
    with start_metrics("127.0.0.1", 0, MetricSources(pipeline=pipeline, mqtt=client)) as server:
        _publish_and_settle(mqtt_url, client)
        expected = METERS * PER_MSG
        assert pipeline.counters.stored == expected
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: aquameter\n    metrics_path: /metrics\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{server.port}']\n"
        )
        log_path = tmp_path / "prometheus.log"
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
            )
            prom = f"http://127.0.0.1:{port}"
            try:

                def ready() -> bool:
                    if proc.poll() is not None:
                        raise AssertionError(
                            f"prometheus exited with {proc.returncode}: {log_path.read_text()}"
                        )
                    try:
                        return get(f"{prom}/-/ready", timeout=2)[0] == 200
                    except OSError:
                        return False

                wait_for("prometheus to be ready", ready, 30)
                result = wait_for(
                    "prometheus to have scraped aquameter_readings_stored_total",
                    lambda: _query(prom, "aquameter_readings_stored_total"),
                    30,
                )
                assert isinstance(result, list)
                (series,) = result
                assert series["metric"]["job"] == "aquameter"
                assert float(series["value"][1]) == expected
                (up,) = _query(prom, 'up{job="aquameter"}')
                assert float(up["value"][1]) == 1
                q = _query(prom, 'aquameter_quarantined_total{reason="MALFORMED"}')
                assert [float(s["value"][1]) for s in q] == [1.0]
                # Whatever Prometheus's own health view says about the target.
                targets = json.loads(get(f"{prom}/api/v1/targets")[1])["data"]["activeTargets"]
                assert [t["health"] for t in targets] == ["up"], targets
            finally:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
