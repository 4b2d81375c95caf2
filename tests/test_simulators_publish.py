"""The publisher against real brokers: what is published is what a subscriber receives."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
import pytest

from aquameter.embedded import start_broker
from aquameter.registry import load_registry
from protocols.uplink import PayloadError
from simulators.faults import Fault
from simulators.fleet import simulate_fleet
from simulators.publish import publish
from simulators.traffic import Publish, TrafficParams, build_traffic, decode_publish
from tests.mqtt_helpers import broker_v5

START = datetime(2026, 3, 2, tzinfo=UTC)


class Subscriber:
    """A plain paho client that records every (topic, payload) it receives under ``root``."""

    def __init__(self, url: str, root: str, protocol: int | None = None) -> None:
        u = urlparse(url)
        if protocol is None:  # v5 where the broker speaks it, else 3.1.1 (embedded amqtt)
            protocol = mqtt.MQTTv5 if broker_v5(url) else mqtt.MQTTv311
        self.received: Counter[tuple[str, bytes]] = Counter()
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"sub-{uuid.uuid4().hex[:8]}",
            protocol=protocol,  # type: ignore[arg-type]
        )
        self.client.on_connect = lambda c, *_: c.subscribe(f"{root}/#", qos=1)
        self.client.on_subscribe = lambda *_: self.ready.set()
        self.client.on_message = self._on_message
        self.client.connect(u.hostname or "127.0.0.1", u.port or 1883)
        self.client.loop_start()
        assert self.ready.wait(10), "subscription not confirmed"

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            self.received[(msg.topic, msg.payload)] += 1

    def wait_for(self, n: int, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                got = sum(self.received.values())
            if got >= n:
                time.sleep(0.2)  # nothing extra may follow
                break
            time.sleep(0.05)
        with self.lock:
            return sum(self.received.values())

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def traffic_and_registry(example_registry_path):
    reg = load_registry(example_registry_path)
    t = START + timedelta(hours=30)
    faults = [
        Fault("COMMS_LOSS", "KMS00002", t, t + timedelta(hours=13), {"delivery": "late"}),
        Fault("TAMPER", "AQN00003", t, None),
    ]
    fleet = simulate_fleet(reg, START, 2, seed=21, faults=faults)
    root = f"test-{uuid.uuid4().hex[:8]}/v1"
    params = TrafficParams(
        root=root, malformed=6, duplicate_fraction=0.03, reorder_window=12, seed=2
    )
    return build_traffic(fleet, reg, params), reg, root


def test_everything_published_arrives(mqtt_url, traffic_and_registry):
    traffic, reg, root = traffic_and_registry
    sub = Subscriber(mqtt_url, root)
    try:
        stats = publish(
            mqtt_url,
            traffic.publishes,
            client_id=f"pub-{uuid.uuid4().hex[:8]}",
            max_inflight=20,
            progress=False,
        )
        assert stats.sent == stats.acked == len(traffic.publishes)
        assert (stats.unacked, stats.failed, stats.timed_out) == (0, 0, False)
        assert stats.readings == traffic.counts.readings
        assert sub.wait_for(len(traffic.publishes)) == len(traffic.publishes)
    finally:
        sub.close()
    sent = Counter((p.topic, p.payload) for p in traffic.publishes)
    assert sub.received == sent
    # What arrived decodes to the traffic's readings; the malformed frames fail as counted.
    readings = 0
    reasons: Counter[str] = Counter()
    for (topic, payload), n in sub.received.items():
        try:
            ups = decode_publish(Publish(topic, payload), reg, root)
        except PayloadError as err:
            reasons[err.reason] += n
            continue
        readings += n * sum(len(u.values) for u in ups)
    assert readings == traffic.counts.readings
    assert dict(reasons) == traffic.counts.expected_quarantine


def test_falls_back_to_mqtt311_on_a_broker_without_v5(tmp_path):
    broker = start_broker(tmp_path / "amqtt", prefer="amqtt")
    try:
        assert not broker.v5
        root = f"fb-{uuid.uuid4().hex[:6]}"
        pubs = [Publish(f"{root}/v/D{i}/up", f'{{"n":{i}}}'.encode(), 1, 1) for i in range(150)]
        sub = Subscriber(broker.url, root, protocol=mqtt.MQTTv311)
        try:
            stats = publish(broker.url, pubs, client_id="fallback", progress=False)
            assert stats.protocol == "MQTTv311"
            assert stats.acked == 150 and stats.unacked == 0
            assert sub.wait_for(150) == 150
        finally:
            sub.close()
        assert sub.received == Counter((p.topic, p.payload) for p in pubs)
    finally:
        broker.stop()


def test_prefers_mqtt5_and_survives_a_broker_restart(own_broker):
    n = 3000
    restarted = threading.Event()

    def stream() -> Iterator[Publish]:
        for i in range(n):
            if i == n // 2:
                own_broker.restart()  # the broker goes away with messages in flight
                restarted.set()
            yield Publish(f"rs/v/D{i % 50}/up", b"x" * 64, 1, 1)

    stats = publish(
        own_broker.url,
        stream(),
        client_id=f"restart-{uuid.uuid4().hex[:6]}",
        max_inflight=50,
        progress=False,
        ack_timeout_s=20,
        total=n,
    )
    assert restarted.is_set()
    assert stats.protocol == ("MQTTv5" if own_broker.v5 else "MQTTv311")
    assert stats.sent == n and stats.acked == n and stats.unacked == 0
    assert stats.reconnects >= 1 and not stats.timed_out


def test_unreachable_broker_is_an_error():
    from aquameter.embedded import free_port

    with pytest.raises(ConnectionError):
        publish(
            f"mqtt://127.0.0.1:{free_port()}",
            [Publish("a/b", b"1")],
            client_id="nobody",
            progress=False,
            connect_timeout_s=1.0,
        )
