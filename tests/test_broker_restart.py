"""A broker restart loses nothing: persistent sessions (subscriptions, messages queued while the
subscriber was away, messages sent but not acknowledged) survive a restart of each embedded
broker, mosquitto (``persistence true``) and amqtt (its state file, :mod:`aquameter.amqtt_broker`).

Plain paho clients over real sockets, MQTT 3.1.1 with ``clean_session=False`` (both brokers speak
it); no Aquameter ingest involved, so a failure here is the broker's.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from aquameter.amqtt_broker import STATE_FILE
from aquameter.embedded import Broker, find_mosquitto, start_broker, wait_port
from tests.mqtt_helpers import create_session, publish_all

TOPIC = "restart-test/{}/up"


@pytest.fixture(params=["mosquitto", "amqtt"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Broker]:
    """A private broker of each kind this machine can run, for this test alone."""
    kind = str(request.param)
    if kind == "mosquitto" and find_mosquitto() is None:
        pytest.skip("no mosquitto binary on this machine")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AQUAMETER_EMBEDDED_BROKER", kind)
        b = start_broker(tmp_path / "broker", prefer=kind)
    yield b
    b.stop()


class Subscriber:
    """A persistent-session subscriber that records what it receives and acknowledges only when
    told to (paho's manual acknowledgement, as ingest does)."""

    def __init__(self, url: str, client_id: str, ack: bool) -> None:
        port = int(url.rsplit(":", 1)[1])
        self.received: queue.Queue[tuple[bytes, bool]] = queue.Queue()
        self.ack = ack
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=False,
            manual_ack=True,
        )
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        self.received.put((bytes(msg.payload), bool(msg.dup)))
        if self.ack:
            client.ack(msg.mid, msg.qos)

    def collect(self, n: int, timeout: float = 30.0) -> list[tuple[bytes, bool]]:
        """The next ``n`` messages (fewer if they do not come within ``timeout``)."""
        out = []
        try:
            for _ in range(n):
                out.append(self.received.get(timeout=timeout))
        except queue.Empty:
            pass
        return out

    def close(self) -> None:
        """Drop the connection without acknowledging anything still unacknowledged."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()  # abrupt: unacknowledged messages stay with the broker


def _messages(tag: str, n: int) -> list[tuple[str, bytes]]:
    return [(TOPIC.format(tag), f"{tag}-{i}".encode()) for i in range(n)]


def test_queued_messages_survive_a_restart(broker: Broker) -> None:
    """Published while the subscriber is away, before and after the restart: all delivered
    once it reconnects to its resumed session."""
    client_id = f"sub-{uuid.uuid4().hex[:8]}"
    create_session(broker.url, client_id, [TOPIC.format("+")])
    before, after = _messages("before", 50), _messages("after", 50)
    publish_all(broker.url, before)
    broker.restart()
    publish_all(broker.url, after)
    sub = Subscriber(broker.url, client_id, ack=True)
    try:
        got = sub.collect(100)
        assert sorted(p for p, _ in got) == sorted(p for _, p in before + after)
    finally:
        sub.close()


def test_unacknowledged_messages_come_back_with_dup(broker: Broker) -> None:
    """Delivered but never acknowledged (an ingest that could not commit): after the restart
    the resumed session gets every one of them again, flagged DUP."""
    client_id = f"sub-{uuid.uuid4().hex[:8]}"
    create_session(broker.url, client_id, [TOPIC.format("+")])
    sent = _messages("held", 30)
    sub = Subscriber(broker.url, client_id, ack=False)
    try:
        publish_all(broker.url, sent)
        assert len(sub.collect(30)) == 30
    finally:
        sub.close()
    broker.restart()
    again = Subscriber(broker.url, client_id, ack=True)
    try:
        got = again.collect(30)
        assert sorted(p for p, _ in got) == sorted(p for _, p in sent)
        assert all(dup for _, dup in got)
    finally:
        again.close()


def test_amqtt_state_saved_while_running_survives_sigkill(tmp_path: Path) -> None:
    """The amqtt broker also saves while it runs (not only on SIGTERM), so a SIGKILL after the
    state file caught up loses nothing."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AQUAMETER_EMBEDDED_BROKER", "amqtt")
        b = start_broker(tmp_path / "broker", prefer="amqtt")
    try:
        assert b.workdir is not None and b.process is not None
        client_id = f"sub-{uuid.uuid4().hex[:8]}"
        create_session(b.url, client_id, [TOPIC.format("+")])
        sent = _messages("killed", 40)
        publish_all(b.url, sent)
        state = b.workdir / STATE_FILE
        _wait_for(lambda: _queued(state, client_id) == len(sent))
        os.kill(b.process.pid, signal.SIGKILL)
        b.process.wait()
        b.restart()
        wait_port("127.0.0.1", b.port)
        sub = Subscriber(b.url, client_id, ack=True)
        try:
            got = sub.collect(40)
            assert sorted(p for p, _ in got) == sorted(p for _, p in sent)
        finally:
            sub.close()
    finally:
        b.stop()


def _queued(state: Path, client_id: str) -> int:
    """How many messages the saved state queues for ``client_id`` (-1: not saved yet)."""
    try:
        saved = json.loads(state.read_text())
    except (FileNotFoundError, ValueError):
        return -1
    for session in saved["sessions"]:
        if session["client_id"] == client_id:
            return len(session["queued"])
    return -1


def _wait_for(condition: Callable[[], bool], attempts: int = 600) -> None:
    """Poll ``condition`` until true; fails after ``attempts`` tries 0.05 s apart."""
    for _ in range(attempts):
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition never became true")


def test_shared_subscription_restart_loses_nothing(tmp_path: Path, db_url: str) -> None:
    """mosquitto 2.0.11 does not restore ``$share`` subscriptions from its persistence file:
    what is published after a restart, before a worker subscribed again, matches nothing and
    is dropped. Published right after the restart (before ingest's reconnect delay ran out),
    every reading still arrives: through the catch-up session (protocols/mqtt.py)."""
    if find_mosquitto() is None or os.environ.get("AQUAMETER_EMBEDDED_BROKER") == "amqtt":
        pytest.skip("needs mosquitto (MQTT v5 shared subscriptions)")
    from ingest.pipeline import IngestPipeline
    from tests.mqtt_helpers import register_messages, shared_worker, wait_count

    b = start_broker(tmp_path / "broker", prefer="mosquitto")
    root = f"aqr-{uuid.uuid4().hex[:8]}/v1"
    msgs = register_messages(root, int(time.time()) // 900 * 900 - 2 * 86400)
    pipeline = IngestPipeline(db_url, batch_seconds=0.05).start()
    client = shared_worker(b.url, pipeline, root).start()
    try:
        assert client.connected.wait(10)
        publish_all(b.url, msgs[:20])
        b.restart()
        publish_all(b.url, msgs[20:])  # before ingest's reconnect: no shared subscription yet
        assert wait_count(db_url, "SELECT count(*) FROM readings", 40, timeout=60) == 40
        _wait_for(lambda: client.stats.fences >= 2)  # a window after the start and the restart
    finally:
        client.stop()
        pipeline.close()
        b.stop()
