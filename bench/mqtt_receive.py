"""How fast can one Python process receive MQTT at one reading per message? (messages/s)

Side by side on a private mosquitto with the backlog preloaded for a persistent session:

(1) bare paho-mqtt, manual PUBACK in the callback, MQTT 5 and MQTT 3.1.1 — the ceiling;
(2) ``MqttIngest`` (topic routing, the frame, PUBACK once "durable") into a sink that is durable
    at once and decodes nothing — the adapter's own cost, without ingest or the database.

It explains bench/ingest.py's 1-reading/message row: the ceiling is paho's per-message work.
Run: ``.venv/bin/python bench/mqtt_receive.py [--messages 30000]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import tempfile
import threading
import time
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from rich.console import Console
from rich.table import Table

from aquameter.embedded import start_broker
from protocols.mqtt import MqttIngest, uplink_topic
from protocols.uplink import DurableCallback, Frame, FrameOutcome
from tests.mqtt_helpers import create_session

ROOT = "bench/v1"
PAYLOAD = b'{"dev":"M000001","t0":1767571200,"step":900,"reg":[12.345]}'


def preload(port: int, n: int) -> None:
    p = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4()}"
    )
    p.max_inflight_messages_set(1000)
    p.connect("127.0.0.1", port)
    p.loop_start()
    infos = [p.publish(uplink_topic(ROOT, "v", f"M{i % 1000:06d}"), PAYLOAD, 1) for i in range(n)]
    for info in infos:
        info.wait_for_publish(120)
    p.disconnect()
    p.loop_stop()


def bare_paho(port: int, n: int, v5: bool) -> float:
    cid = f"bare-{uuid.uuid4().hex[:6]}"
    topic = f"{ROOT}/+/+/up"
    if v5:
        create_session(f"mqtt://127.0.0.1:{port}", cid, [topic])
    else:  # a 3.1.1 persistent session: clean_session=False
        c = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=cid,
            protocol=mqtt.MQTTv311,
            clean_session=False,
        )
        done = threading.Event()
        c.on_subscribe = lambda *a: done.set()
        c.connect("127.0.0.1", port)
        c.loop_start()
        c.subscribe(topic, 1)
        done.wait(10)
        c.disconnect()
        c.loop_stop()
    preload(port, n)
    got = [0]
    finished = threading.Event()

    def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        client.ack(msg.mid, msg.qos)
        got[0] += 1
        if got[0] >= n:
            finished.set()

    c = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=cid,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        manual_ack=True,
        **({} if v5 else {"clean_session": False}),  # type: ignore[arg-type]
    )
    c.on_message = on_message
    t = time.perf_counter()
    if v5:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        props.ReceiveMaximum = 20_000
        c.connect("127.0.0.1", port, clean_start=False, properties=props)
    else:
        c.connect("127.0.0.1", port)
    c.loop_start()
    finished.wait(300)
    elapsed = time.perf_counter() - t
    c.disconnect()
    c.loop_stop()
    return n / elapsed


class _DurableAtOnce:
    """A sink that acknowledges on the spot: what is left is the adapter's own work."""

    def __init__(self) -> None:
        self.frames = 0

    def submit(self, frame: Frame, on_durable: DurableCallback) -> None:
        self.frames += 1
        on_durable(FrameOutcome(accepted=1, quarantined=0, reasons=[]))


def adapter(port: int, n: int) -> float:
    cid = f"adapter-{uuid.uuid4().hex[:6]}"
    create_session(f"mqtt://127.0.0.1:{port}", cid, [f"{ROOT}/+/+/up"])
    preload(port, n)
    sink = _DurableAtOnce()
    t = time.perf_counter()
    client = MqttIngest(
        f"mqtt://127.0.0.1:{port}",
        sink,
        {"v": "json"},
        topic_root=ROOT,
        shared_group=None,
        client_id=cid,
    ).start()
    while sink.frames < n:
        time.sleep(0.005)
    elapsed = time.perf_counter() - t
    client.shutdown()
    return n / elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=30_000)
    args = ap.parse_args()
    n = args.messages
    with tempfile.TemporaryDirectory() as tmp:
        broker = start_broker(Path(tmp))
        port = int(broker.url.rsplit(":", 1)[1])
        try:
            rows = [
                ("bare paho, MQTT 5, manual ack", bare_paho(port, n, True)),
                ("bare paho, MQTT 3.1.1, manual ack", bare_paho(port, n, False)),
                ("MqttIngest into a null sink (no decoding, no database)", adapter(port, n)),
            ]
        finally:
            broker.stop()
    table = Table("receiver", "messages/s", title=f"{n:,} messages of one reading")
    for name, rate in rows:
        table.add_row(name, f"{rate:,.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
