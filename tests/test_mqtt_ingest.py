"""MQTT → ingest → PostgreSQL against a real broker and a real database."""

from __future__ import annotations

import json
import time
import uuid

import psycopg
import pytest

from aquameter.registry import load_registry
from ingest.pipeline import IngestPipeline
from ingest.service import vendor_formats
from protocols.mqtt import MqttIngest, batch_topic, parse_topic, uplink_topic
from protocols.payloads import encode_binary_v1
from tests.mqtt_helpers import broker_v5, publish_all, wait_count
from tests.servers import EXAMPLE_REGISTRY

# A topic root of this run's own: other clients of a shared broker cannot cross-talk.
ROOT = f"aqt-{uuid.uuid4().hex[:8]}/v1"
NOW = int(time.time()) // 900 * 900
T0 = NOW - 2 * 86400


def _ingest(url: str, db_url: str, **kw: object) -> tuple[IngestPipeline, MqttIngest]:
    pipeline = IngestPipeline(db_url, batch_seconds=0.05).start()
    client = MqttIngest(
        url,
        pipeline,
        vendor_formats(load_registry(EXAMPLE_REGISTRY)),
        client_id=f"ingest-{uuid.uuid4().hex[:8]}",
        shared_group=None,
        topic_root=ROOT,
        v5=broker_v5(url),
        **kw,  # type: ignore[arg-type]
    ).start()
    assert client.connected.wait(10)
    return pipeline, client


def _json_uplink(dev: str, t0: int, regs: list[float]) -> tuple[str, bytes]:
    body = {"dev": dev, "t0": t0, "step": 900, "reg": regs, "unit": "m3"}
    return uplink_topic(ROOT, "aqualink", dev), json.dumps(body).encode()


def _fleet_messages(n_meters: int, per_msg: int) -> tuple[list[tuple[str, bytes]], int]:
    msgs = []
    for i in range(1, n_meters + 1):
        dev = f"AQN{i:05d}"
        msgs.append(_json_uplink(dev, T0, [100 + i + 0.01 * k for k in range(per_msg)]))
    for i in range(1, n_meters + 1):
        serial = 70000000 + i
        regs = [5000 * i + 7 * k for k in range(per_msg)]
        msgs.append(
            (
                uplink_topic(ROOT, "kamstrup-nb", f"KMS{i:05d}"),
                encode_binary_v1(serial, T0, 900, regs),
            )
        )
    return msgs, 2 * n_meters * per_msg


def test_topic_scheme_round_trips():
    assert parse_topic(uplink_topic(ROOT, "v", "D1"), ROOT).device == "D1"
    route = parse_topic(batch_topic(ROOT, "v", "GW1"), ROOT)
    assert route is not None and route.gateway == "GW1" and route.device is None
    assert parse_topic("other/v/D1/up", ROOT) is None
    assert parse_topic(f"{ROOT}/v/D1/down", ROOT) is None


def test_n_readings_give_n_rows_and_redelivery_stores_nothing_twice(mqtt_url, db_url):
    pipeline, client = _ingest(mqtt_url, db_url)
    try:
        msgs, n = _fleet_messages(20, 24)
        publish_all(mqtt_url, msgs)
        assert wait_count(db_url, "SELECT count(*) FROM readings", n) == n
        publish_all(mqtt_url, msgs)  # the same batch again
        deadline = time.monotonic() + 20
        while pipeline.counters.duplicates < n and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pipeline.counters.duplicates == n
        assert wait_count(db_url, "SELECT count(*) FROM readings", n) == n
    finally:
        client.stop()
        pipeline.close()
    with psycopg.connect(db_url) as conn:
        # canonical values: binary frames carry litres, stored as m³
        v = conn.execute(
            "SELECT r.value FROM readings r JOIN channels c ON c.id = r.channel_id "
            "WHERE c.device_id = 'KMS00003' ORDER BY r.ts LIMIT 2"
        ).fetchall()
        assert [x[0] for x in v] == [15.0, 15.007]
        assert conn.execute("SELECT count(*) FROM quarantine").fetchone() == (0,)


def test_concentrator_batch(mqtt_url, db_url):
    pipeline, client = _ingest(mqtt_url, db_url)
    try:
        readings = [
            {"dev": f"AQN{i:05d}", "t0": T0, "step": 900, "reg": [1.0 + i, 1.5 + i]}
            for i in range(1, 31)
        ]
        payload = json.dumps({"gw": "GW-NORTH-1", "readings": readings}).encode()
        publish_all(mqtt_url, [(batch_topic(ROOT, "aqualink", "GW-NORTH-1"), payload)])
        assert wait_count(db_url, "SELECT count(*) FROM readings", 60) == 60
    finally:
        client.stop()
        pipeline.close()


BAD_FRAMES = [
    ("MALFORMED", uplink_topic(ROOT, "aqualink", "AQN00010"), b'{"dev": "AQN00010", "reg": '),
    ("MALFORMED", uplink_topic(ROOT, "aqualink", "AQN00010"), b'{"dev": "AQN00010", "reg": 5}'),
    (
        "BAD_CRC",
        uplink_topic(ROOT, "kamstrup-nb", "KMS00001"),
        encode_binary_v1(70000001, T0, 900, [1, 2, 3])[:-1] + b"\x00",
    ),
    ("UNSUPPORTED_FORMAT", uplink_topic(ROOT, "kamstrup-nb", "KMS00001"), b"\x07" + bytes(20)),
    (
        "UNKNOWN_DEVICE",
        uplink_topic(ROOT, "aqualink", "NOPE"),
        json.dumps({"dev": "NOPE", "ts": T0, "reg": 1.0}).encode(),
    ),
    (
        "UNKNOWN_CHANNEL",
        uplink_topic(ROOT, "aqualink", "AQN00010"),
        json.dumps({"dev": "AQN00010", "ch": "temperature", "ts": T0, "v": 1.0}).encode(),
    ),
    (
        "FUTURE_TIMESTAMP",
        uplink_topic(ROOT, "aqualink", "AQN00010"),
        json.dumps({"dev": "AQN00010", "ts": NOW + 86400, "reg": 1.0}).encode(),
    ),
    (
        "BEFORE_INSTALL",
        uplink_topic(ROOT, "aqualink", "AQN00010"),
        json.dumps({"dev": "AQN00010", "ts": "2019-01-01T00:00:00Z", "reg": 1.0}).encode(),
    ),
    (
        "ANCIENT_TIMESTAMP",
        uplink_topic(ROOT, "aqualink", "AQN00010"),
        json.dumps({"dev": "AQN00010", "ts": 1000, "reg": 1.0}).encode(),
    ),
    (
        "OUT_OF_RANGE",
        uplink_topic(ROOT, "aqualink", "AQN00010"),
        json.dumps({"dev": "AQN00010", "ts": T0, "reg": -5.0}).encode(),
    ),
    (
        "BAD_UNIT",
        uplink_topic(ROOT, "aqualink", "AQN00010"),
        json.dumps({"dev": "AQN00010", "ts": T0, "reg": 1.0, "unit": "bar"}).encode(),
    ),
]


@pytest.mark.parametrize(
    "reason,topic,payload", BAD_FRAMES, ids=[b[0] + str(i) for i, b in enumerate(BAD_FRAMES)]
)
def test_each_malformed_frame_is_one_quarantine_row(mqtt_url, db_url, reason, topic, payload):
    pipeline, client = _ingest(mqtt_url, db_url)
    try:
        good_before = _json_uplink("AQN00001", T0, [1.0, 2.0, 3.0])
        good_after = _json_uplink("AQN00002", T0, [4.0, 5.0])
        publish_all(mqtt_url, [good_before, (topic, payload), good_after])
        assert wait_count(db_url, "SELECT count(*) FROM quarantine", 1) == 1
        assert wait_count(db_url, "SELECT count(*) FROM readings", 5) == 5
    finally:
        client.stop()
        pipeline.close()
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT reason, source, address, raw FROM quarantine").fetchone()
    assert row is not None
    assert row[0] == reason
    assert (row[1], row[2]) == ("mqtt", topic)
    assert row[3]  # the raw input is kept for a person to look at


def test_mixed_batch_keeps_good_readings(mqtt_url, db_url):
    """One bad reading inside a concentrator batch does not take its neighbours down."""
    pipeline, client = _ingest(mqtt_url, db_url)
    try:
        readings = [
            {"dev": "AQN00001", "ts": T0, "reg": 1.0},
            {"dev": "AQN00002", "ts": T0, "reg": 2.0, "unit": "furlongs"},
            {"dev": "GHOST", "ts": T0, "reg": 2.0},
            {"dev": "AQN00003", "t0": T0, "step": 900, "reg": [3.0, 3.1, 1e12]},
        ]
        payload = json.dumps({"gw": "GW-NORTH-1", "readings": readings}).encode()
        publish_all(mqtt_url, [(batch_topic(ROOT, "aqualink", "GW-NORTH-1"), payload)])
        assert wait_count(db_url, "SELECT count(*) FROM quarantine", 3) == 3
        assert wait_count(db_url, "SELECT count(*) FROM readings", 3) == 3
    finally:
        client.stop()
        pipeline.close()
    with psycopg.connect(db_url) as conn:
        reasons = sorted(r[0] for r in conn.execute("SELECT reason FROM quarantine"))
    assert reasons == ["BAD_UNIT", "OUT_OF_RANGE", "UNKNOWN_DEVICE"]


class _HoldingSink:
    """Accepts frames but never reports them durable, like an ingest that crashed mid-write."""

    def __init__(self) -> None:
        self.frames = 0

    def submit(self, frame, on_durable) -> None:
        self.frames += 1


def test_unacknowledged_messages_are_redelivered_after_a_crash(mqtt_url, db_url):
    client_id = f"ingest-{uuid.uuid4().hex[:8]}"
    fmts = vendor_formats(load_registry(EXAMPLE_REGISTRY))
    # First: register the persistent session, then "crash" while holding everything.
    holder = _HoldingSink()
    crashed = MqttIngest(
        mqtt_url,
        holder,
        fmts,
        client_id=client_id,
        shared_group=None,
        topic_root=ROOT,
        v5=broker_v5(mqtt_url),
    ).start()
    assert crashed.connected.wait(10)
    msgs, n = _fleet_messages(10, 4)
    publish_all(mqtt_url, msgs)
    deadline = time.monotonic() + 10
    while holder.frames < len(msgs) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert holder.frames == len(msgs)
    crashed.client.loop_stop()
    crashed.client.socket().close()  # abrupt: no DISCONNECT, no PUBACKs were sent
    # A new worker with the same identity resumes the session and gets everything again.
    pipeline = IngestPipeline(db_url, batch_seconds=0.05).start()
    resumed = MqttIngest(
        mqtt_url,
        pipeline,
        fmts,
        client_id=client_id,
        shared_group=None,
        topic_root=ROOT,
        v5=broker_v5(mqtt_url),
    ).start()
    try:
        assert wait_count(db_url, "SELECT count(*) FROM readings", n) == n
    finally:
        resumed.stop()
        pipeline.close()


def test_broker_restart_mid_run_loses_nothing(own_broker, db_url):
    pipeline, client = _ingest(own_broker.url, db_url)
    try:
        msgs, n = _fleet_messages(40, 24)
        half = len(msgs) // 2
        publish_all(own_broker.url, msgs[:half])
        own_broker.restart()  # ingest is still consuming the first half
        assert client.connected.wait(20) or _wait_connected(client)
        publish_all(own_broker.url, msgs[half:])
        assert wait_count(db_url, "SELECT count(*) FROM readings", n, timeout=60) == n
        assert client.stats.disconnects >= 1
    finally:
        client.stop()
        pipeline.close()


def _wait_connected(client: MqttIngest, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.connected.is_set():
            return True
        time.sleep(0.1)
    return False


def test_database_outage_loses_nothing(mqtt_url, db_url):
    """Kill the writer's connection mid-run: it reconnects, retries, and acks only then."""
    pipeline, client = _ingest(mqtt_url, db_url)
    try:
        msgs, n = _fleet_messages(40, 24)
        publish_all(mqtt_url, msgs[:20])
        dbname = psycopg.conninfo.conninfo_to_dict(db_url)["dbname"]
        with psycopg.connect(db_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (dbname,),
            )
        publish_all(mqtt_url, msgs[20:])
        assert wait_count(db_url, "SELECT count(*) FROM readings", n, timeout=60) == n
    finally:
        client.stop()
        pipeline.close()


def test_clean_shutdown_acknowledges_everything_it_stored(mqtt_url, db_url):
    """Stop mid-stream: what was read is committed and acknowledged before DISCONNECT, so the
    resumed session gets only the unread rest — nothing twice, nothing lost."""
    client_id = f"ingest-{uuid.uuid4().hex[:8]}"
    fmts = vendor_formats(load_registry(EXAMPLE_REGISTRY))
    msgs, n = _fleet_messages(40, 24)
    pipeline = IngestPipeline(db_url, batch_seconds=0.05).start()
    first = MqttIngest(
        mqtt_url,
        pipeline,
        fmts,
        client_id=client_id,
        shared_group=None,
        topic_root=ROOT,
        v5=broker_v5(mqtt_url),
    ).start()
    assert first.connected.wait(10)
    publish_all(mqtt_url, msgs)
    deadline = time.monotonic() + 10
    while first.stats.messages == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    first.shutdown(pipeline.close)
    read_first = first.stats.messages
    assert first.stats.acked == read_first
    second_pipe = IngestPipeline(db_url, batch_seconds=0.05).start()
    second = MqttIngest(
        mqtt_url,
        second_pipe,
        fmts,
        client_id=client_id,
        shared_group=None,
        topic_root=ROOT,
        v5=broker_v5(mqtt_url),
    ).start()
    try:
        assert wait_count(db_url, "SELECT count(*) FROM readings", n) == n
        time.sleep(0.5)
        assert second.stats.messages == len(msgs) - read_first
        assert second_pipe.counters.duplicates == 0
    finally:
        second.shutdown(second_pipe.close)
