"""Small test-side helpers: a plain paho publisher, a session made ahead, polling for rows."""

from __future__ import annotations

import threading
import time
import uuid
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


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
    """Subscribe with a persistent MQTT 5 session and leave, as a subscriber that ran before:
    what is published next waits in the broker for that session."""
    parsed = urlparse(url)
    done = threading.Event()
    c = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
    )
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = expiry_s
    c.on_subscribe = lambda *a: done.set()
    c.connect(
        parsed.hostname or "127.0.0.1", parsed.port or 1883, clean_start=False, properties=props
    )
    c.loop_start()
    c.subscribe([(f, 1) for f in topic_filters])
    assert done.wait(10), "broker did not acknowledge the subscription"
    c.disconnect()
    c.loop_stop()
