"""Small test-side helpers: a plain paho publisher, a session made ahead, polling for rows, and
what the broker under test speaks (mosquitto: MQTT v5; the embedded amqtt of a machine without
mosquitto: 3.1.1 only)."""

from __future__ import annotations

import functools
import json
import threading
import time
import uuid
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from aquameter.runtime import speaks_mqtt5

NEEDS_V5 = (
    "needs MQTT v5 shared subscriptions ($share/...), which this broker does not speak "
    "(MQTT 3.1.1 only, e.g. the embedded amqtt started when mosquitto is not on PATH)"
)


@functools.cache
def broker_v5(url: str) -> bool:
    """Whether the broker at ``url`` speaks MQTT v5 (asked once per URL)."""
    return speaks_mqtt5(url)


def skip_unless_v5(url: str, reason: str = NEEDS_V5) -> None:
    """Skip the calling test on a 3.1.1-only broker: for tests whose subject is MQTT v5."""
    if not broker_v5(url):
        pytest.skip(reason)


def publish_all(url: str, messages: list[tuple[str, bytes]], timeout: float = 30.0) -> None:
    """Publish QoS 1 and wait until the broker acknowledged every message."""
    parsed = urlparse(url)
    client = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"test-pub-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv311,
    )
    client.max_inflight_messages_set(200)
    client.connect(parsed.hostname or "127.0.0.1", parsed.port or 1883)
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            assert info.is_published(), "broker did not acknowledge a publish in time"
    finally:
        client.disconnect()
        client.loop_stop()


def wait_count(db_url: str, sql: str, expected: int, timeout: float = 30.0) -> int:
    """Poll ``sql`` (a count) until it reaches ``expected`` or the timeout passes."""
    deadline = time.monotonic() + timeout
    n = -1
    while time.monotonic() < deadline:
        with psycopg.connect(db_url) as conn:
            row = conn.execute(sql).fetchone()  # type: ignore[arg-type]
            n = int(row[0]) if row else 0
        if n >= expected:
            # settle: make sure no extra rows follow
            time.sleep(0.3)
            with psycopg.connect(db_url) as conn:
                row = conn.execute(sql).fetchone()  # type: ignore[arg-type]
                return int(row[0]) if row else 0
        time.sleep(0.1)
    return n


def create_session(
    url: str, client_id: str, topic_filters: list[str], expiry_s: int = 3600
) -> None:
    """Subscribe with a persistent session and leave, as a subscriber that ran before: what is
    published next waits in the broker for that session (MQTT 5 with a session expiry, or
    3.1.1 with clean_session=False on a broker that speaks only that)."""
    parsed = urlparse(url)
    done = threading.Event()
    v5 = broker_v5(url)
    c = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        **({} if v5 else {"clean_session": False}),  # type: ignore[arg-type]
    )
    c.on_subscribe = lambda *a: done.set()
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 1883
    if v5:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = expiry_s
        c.connect(host, port, clean_start=False, properties=props)
    else:
        c.connect(host, port)
    c.loop_start()
    c.subscribe([(f, 1) for f in topic_filters])
    assert done.wait(10), "broker did not acknowledge the subscription"
    c.disconnect()
    c.loop_stop()


def register_messages(root: str, t0: int, first: int = 1, n: int = 40) -> list[tuple[str, bytes]]:
    """One JSON register reading of each example AQN meter ``first`` .. ``first + n - 1``."""
    from protocols.mqtt import uplink_topic

    return [
        (
            uplink_topic(root, "aqualink", f"AQN{i:05d}"),
            json.dumps({"dev": f"AQN{i:05d}", "t0": t0, "step": 900, "reg": [float(i)]}).encode(),
        )
        for i in range(first, first + n)
    ]


def shared_worker(url: str, sink: object, root: str) -> Any:
    """An MQTT v5 ingest worker on a shared subscription of its own group (so with a catch-up
    session), the example registry's vendors, not started."""
    from aquameter.registry import load_registry
    from ingest.service import vendor_formats
    from protocols.mqtt import MqttIngest
    from tests.servers import EXAMPLE_REGISTRY

    return MqttIngest(
        url,
        sink,  # type: ignore[arg-type]
        vendor_formats(load_registry(EXAMPLE_REGISTRY)),
        client_id=f"ingest-{uuid.uuid4().hex[:8]}",
        shared_group=f"g{uuid.uuid4().hex[:6]}",
        topic_root=root,
        v5=True,
    )
