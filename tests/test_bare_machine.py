"""A machine with only Python: no mosquitto, so the embedded amqtt broker (MQTT 3.1.1 only).

These tests start that broker themselves (``AQUAMETER_EMBEDDED_BROKER=amqtt``), whatever is
installed, and check what ingest relies on from it: the broker's protocol is recognised, a
persistent ``clean_session=False`` session keeps QoS 1 messages while ingest is away, and a
message ingest has not acknowledged is never dropped, however long it stays unacknowledged
(amqtt as shipped forgets it after 5 s; ``aquameter/amqtt_broker.py`` fixes that).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from aquameter.embedded import Broker, start_broker
from aquameter.runtime import broker, known_broker, speaks_mqtt5
from aquameter.settings import Settings
from ingest.pipeline import IngestPipeline
from ingest.workers import effective_workers
from protocols.mqtt import MqttIngest, uplink_topic
from tests.mqtt_helpers import create_session, publish_all, wait_count

ROOT = f"aqbare-{uuid.uuid4().hex[:8]}/v1"
FORMATS = {"aqualink": "json"}
T0 = int(time.time()) // 900 * 900 - 86400
READINGS = "SELECT count(*) FROM readings"


@pytest.fixture
def amqtt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Broker]:
    monkeypatch.setenv("AQUAMETER_EMBEDDED_BROKER", "amqtt")
    b = start_broker(tmp_path / "broker")
    yield b
    b.stop()


def _messages(n: int) -> list[tuple[str, bytes]]:
    """``n`` uplinks of one reading each, of distinct (meter, time) pairs."""
    out = []
    for i in range(n):
        dev = f"AQN{i % 8 + 1:05d}"
        body = {"dev": dev, "t0": T0 + 900 * i, "step": 900, "reg": [100.0 + i], "unit": "m3"}
        out.append((uplink_topic(ROOT, "aqualink", dev), json.dumps(body).encode()))
    return out


class _HoldingSink:
    """Accepts frames and never reports them durable: an ingest stuck on its database."""

    def __init__(self) -> None:
        self.frames = 0

    def submit(self, frame: object, on_durable: object) -> None:
        self.frames += 1


def _ingest(url: str, sink: object, client_id: str) -> MqttIngest:
    client = MqttIngest(
        url, sink, FORMATS, client_id=client_id, shared_group=None, topic_root=ROOT, v5=False
    ).start()  # type: ignore[arg-type]
    assert client.connected.wait(10)
    return client


def test_without_mosquitto_the_embedded_broker_is_amqtt_speaking_311(amqtt, tmp_path):
    assert not amqtt.v5
    assert speaks_mqtt5(amqtt.url) is False
    # A configured broker is asked what it speaks rather than assumed to be v5.
    settings = Settings(mqtt_url=amqtt.url, data_dir=tmp_path / "data")
    assert known_broker(settings) == (amqtt.url, False)
    assert effective_workers(4, v5=False, shared_group="aquameter") == 1


def test_runtime_starts_and_records_the_embedded_broker(tmp_path, monkeypatch):
    monkeypatch.setenv("AQUAMETER_EMBEDDED_BROKER", "amqtt")
    settings = Settings(mqtt_url=None, data_dir=tmp_path / "data")
    with broker(settings) as (url, v5):
        assert v5 is False
        assert known_broker(settings) == (url, False)  # a second command finds the same one
    assert known_broker(settings) is None


def test_unknown_embedded_broker_choice_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("AQUAMETER_EMBEDDED_BROKER", "hivemq")
    with pytest.raises(ValueError, match="AQUAMETER_EMBEDDED_BROKER"):
        start_broker(tmp_path / "b")


def test_persistent_session_keeps_messages_while_ingest_is_away(amqtt, db_url):
    """Anonymous clients too: amqtt would drop an anonymous client's session on disconnect."""
    client_id = f"ingest-{uuid.uuid4().hex[:8]}"
    create_session(amqtt.url, client_id, [f"{ROOT}/+/+/up", f"{ROOT}/+/gw/+/batch"])
    msgs = _messages(30)
    publish_all(amqtt.url, msgs)
    pipeline = IngestPipeline(db_url, batch_seconds=0.05).start()
    client = _ingest(amqtt.url, pipeline, client_id)
    try:
        assert wait_count(db_url, READINGS, len(msgs)) == len(msgs)
    finally:
        client.shutdown(pipeline.close)


def test_a_message_unacknowledged_for_long_is_redelivered_after_a_crash(amqtt, db_url):
    """Held past amqtt's own 5 s PUBACK timeout, then the ingest crashes: nothing is lost."""
    client_id = f"ingest-{uuid.uuid4().hex[:8]}"
    holder = _HoldingSink()
    crashed = _ingest(amqtt.url, holder, client_id)
    msgs = _messages(20)
    publish_all(amqtt.url, msgs)
    deadline = time.monotonic() + 10
    while holder.frames < len(msgs) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert holder.frames == len(msgs)
    time.sleep(6.5)  # longer than amqtt's PUBACK timeout
    crashed.client.loop_stop()
    sock = crashed.client.socket()
    assert sock is not None
    sock.close()  # abrupt: no DISCONNECT, no PUBACK
    pipeline = IngestPipeline(db_url, batch_seconds=0.05).start()
    resumed = _ingest(amqtt.url, pipeline, client_id)
    try:
        assert wait_count(db_url, READINGS, len(msgs)) == len(msgs)
        assert pipeline.counters.duplicates == 0
    finally:
        resumed.shutdown(pipeline.close)
    # Everything was acknowledged once committed: a third connection gets nothing back.
    again = IngestPipeline(db_url, batch_seconds=0.05).start()
    third = _ingest(amqtt.url, again, client_id)
    time.sleep(1.5)
    third.shutdown(again.close)
    assert third.stats.messages == 0
