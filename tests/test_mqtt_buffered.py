"""The MQTT adapter's two departures from stock paho, against a real broker.

- ``_BufferedClient`` reads the socket 64 KiB at a time and handles many packets per wake-up:
  every message of a preloaded burst must arrive whole and in order, small ones and ones larger
  than the buffer alike, and be acknowledged (a resumed session gets nothing back).
- With a sink that says when a batch of callbacks is done (``add_ack_flush``), PUBACKs are only
  recorded until the flush, then sent as one packet: nothing is acknowledged before, everything
  after (and a process that stops without the flush has its messages redelivered).
"""

from __future__ import annotations

import inspect
import threading
import time
import uuid
from collections.abc import Callable

import paho.mqtt.client as mqtt

from protocols.mqtt import MqttIngest, _BufferedClient, uplink_topic
from protocols.uplink import DurableCallback, Frame, FrameOutcome
from tests.mqtt_helpers import broker_v5, create_session, publish_all

ROOT = f"aqt-{uuid.uuid4().hex[:8]}/v1"


class _Recorder:
    """A sink that keeps frames and acknowledges at once (no batching)."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []

    def submit(self, frame: Frame, on_durable: DurableCallback) -> None:
        self.frames.append(frame)
        on_durable(FrameOutcome(accepted=1))


class _Batching:
    """A sink that holds the callbacks until told to run them, then flushes like the pipeline."""

    def __init__(self) -> None:
        self.callbacks: list[DurableCallback] = []
        self.flushes: list[Callable[[], None]] = []
        self.lock = threading.Lock()

    def add_ack_flush(self, flush: Callable[[], None]) -> None:
        self.flushes.append(flush)

    def submit(self, frame: Frame, on_durable: DurableCallback) -> None:
        with self.lock:
            self.callbacks.append(on_durable)

    def durable(self) -> None:
        with self.lock:
            callbacks, self.callbacks = self.callbacks, []
        for cb in callbacks:
            cb(FrameOutcome(accepted=1))
        for flush in self.flushes:
            flush()


def _client(url: str, sink: object, client_id: str) -> MqttIngest:
    return MqttIngest(
        url,
        sink,  # type: ignore[arg-type]
        {"v": "json"},
        client_id=client_id,
        shared_group=None,
        topic_root=ROOT,
        v5=broker_v5(url),
    )


def _wait(check: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.01)
    return check()


def _redelivered(url: str, client_id: str, wait_s: float = 1.5) -> int:
    """How many messages the broker still holds for ``client_id``'s session."""
    sink = _Recorder()
    client = _client(url, sink, client_id).start()
    try:
        time.sleep(wait_s)
        return len(sink.frames)
    finally:
        client.shutdown()


def test_paho_internals_relied_on_are_there():
    """paho 2.x private methods the buffered client and the batched PUBACKs use."""
    names = ("_sock_recv", "_packet_read", "_loop_rc_handle", "_packet_queue", "_handle_on_message")
    for name in names:
        assert callable(getattr(mqtt.Client, name, None)), name
    params = list(inspect.signature(mqtt.Client._packet_queue).parameters)
    assert params[:5] == ["self", "command", "packet", "mid", "qos"]
    assert issubclass(_BufferedClient, mqtt.Client)


def _queued(mqtt_url: str, prefix: str, msgs: list[tuple[str, bytes]]) -> str:
    """A new persistent session with ``msgs`` queued for it before it connects; its client id."""
    client_id = f"{prefix}-{uuid.uuid4().hex[:8]}"
    create_session(mqtt_url, client_id, [f"{ROOT}/+/+/up"])
    publish_all(mqtt_url, msgs)
    return client_id


def test_a_burst_of_small_and_large_messages_arrives_whole_in_order_and_acknowledged(mqtt_url):
    sizes = [60] * 300 + [70_000, 50, 200_000, 1, 65_536, 65_535] + [80] * 300
    msgs = [
        (uplink_topic(ROOT, "v", f"D{i % 7}"), (f"{i:06d}:".encode() + b"x" * size)[: max(7, size)])
        for i, size in enumerate(sizes)
    ]
    client_id = _queued(mqtt_url, "buf", msgs)  # it arrives as one burst
    sink = _Recorder()
    client = _client(mqtt_url, sink, client_id).start()
    try:
        assert _wait(lambda: len(sink.frames) >= len(msgs))
        assert [(f.address, f.payload) for f in sink.frames] == msgs
        assert _wait(lambda: client.stats.acked == len(msgs))
    finally:
        client.shutdown()
    assert _redelivered(mqtt_url, client_id) == 0


def test_batched_pubacks_go_out_only_at_the_flush(mqtt_url):
    msgs = [(uplink_topic(ROOT, "v", f"D{i}"), b"%d" % i) for i in range(500)]
    client_id = _queued(mqtt_url, "bat", msgs)
    sink = _Batching()
    client = _client(mqtt_url, sink, client_id).start()
    assert _wait(lambda: len(sink.callbacks) == len(msgs))
    assert client.stats.acked == 0
    sink.durable()  # what the pipeline's ack thread does after a commit
    assert client.stats.acked == len(msgs)
    client.shutdown()
    assert _redelivered(mqtt_url, client_id) == 0


def test_without_the_flush_nothing_is_acknowledged_and_all_comes_back(mqtt_url):
    msgs = [(uplink_topic(ROOT, "v", f"D{i}"), b"%d" % i) for i in range(200)]
    client_id = _queued(mqtt_url, "nof", msgs)
    sink = _Batching()
    client = _client(mqtt_url, sink, client_id).start()
    assert _wait(lambda: len(sink.callbacks) == len(msgs))
    for cb in sink.callbacks:  # durable, but the batch's flush never ran (a crash before it)
        cb(FrameOutcome(accepted=1))
    client.shutdown()
    assert client.stats.acked == 0
    assert _redelivered(mqtt_url, client_id) == len(msgs)
