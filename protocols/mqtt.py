"""MQTT transport for NB-IoT meters and concentrators (paho-mqtt 2.x).

Topic scheme (``root`` defaults to ``aquameter/v1``)::

    {root}/{vendor}/{device_id}/up        one meter's uplink (single or multi-interval reads)
    {root}/{vendor}/gw/{gateway_id}/batch a concentrator's batch of many meters

The vendor segment selects the payload format declared for that vendor in the registry
(``json``, ``binary-v1``, ``cbor``); the device segment is the default device of payloads that do
not name one. Several ingest workers share the load through an MQTT v5 shared subscription
(``$share/{group}/…``) on a clustered broker.

Delivery guarantees: QoS 1 on a persistent session (``clean_start=False`` with a session expiry),
and *manual* acknowledgement: a PUBACK is sent only when ingest reports that every reading of the
message is committed or quarantined. A crash or a database outage therefore leaves unacknowledged
messages with the broker, which redelivers them; ingest's ``ON CONFLICT DO NOTHING`` makes the
redelivery harmless.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from protocols.uplink import Frame, FrameOutcome, FrameSink

log = logging.getLogger("aquameter.mqtt")


@dataclass
class MqttStats:
    messages: int = 0
    acked: int = 0
    ignored_topics: int = 0
    connects: int = 0
    disconnects: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def bump(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)


@dataclass(frozen=True)
class TopicRoute:
    vendor: str
    device: str | None
    gateway: str | None


def parse_topic(topic: str, root: str) -> TopicRoute | None:
    """Map a topic of the documented scheme to its vendor and device/gateway; None otherwise."""
    prefix = root.rstrip("/") + "/"
    if not topic.startswith(prefix):
        return None
    parts = topic[len(prefix) :].split("/")
    if len(parts) == 3 and parts[2] == "up" and parts[1] != "gw":
        return TopicRoute(parts[0], parts[1], None)
    if len(parts) == 4 and parts[1] == "gw" and parts[3] == "batch":
        return TopicRoute(parts[0], None, parts[2])
    return None


def uplink_topic(root: str, vendor: str, device: str) -> str:
    return f"{root}/{vendor}/{device}/up"


def batch_topic(root: str, vendor: str, gateway: str) -> str:
    return f"{root}/{vendor}/gw/{gateway}/batch"


class MqttIngest:
    """Subscribes to meter traffic and feeds a :class:`FrameSink`, acknowledging when durable."""

    def __init__(
        self,
        url: str,
        sink: FrameSink,
        vendor_formats: dict[str, str],
        *,
        topic_root: str = "aquameter/v1",
        shared_group: str | None = "aquameter",
        client_id: str = "aquameter-ingest",
        session_expiry_s: int = 3600,
        qos: int = 1,
        receive_maximum: int = 20_000,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        v5: bool = True,
    ) -> None:
        parsed = urlparse(url)
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 1883
        self.username = parsed.username
        self.password = parsed.password
        self.sink = sink
        self.vendor_formats = vendor_formats
        self.topic_root = topic_root.rstrip("/")
        self.shared_group = shared_group if v5 else None
        self.qos = qos
        self.session_expiry_s = session_expiry_s
        self.receive_maximum = receive_maximum
        self.v5 = v5
        self.stats = MqttStats()
        self.connected = threading.Event()
        protocol = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
        kwargs: dict[str, object] = {}
        if not v5:
            kwargs["clean_session"] = False
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            manual_ack=True,
            **kwargs,  # type: ignore[arg-type]
        )
        if self.username:
            self.client.username_pw_set(self.username, self.password)
        if parsed.scheme in ("mqtts", "ssl"):
            self.client.tls_set()
        self.client.reconnect_delay_set(int(max(1, reconnect_min_s)), int(reconnect_max_s))
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    # --- lifecycle -------------------------------------------------------------------------
    def start(self, wait_s: float = 10.0) -> MqttIngest:
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry_s
            props.ReceiveMaximum = self.receive_maximum
            self.client.connect_async(
                self.host, self.port, keepalive=60, clean_start=False, properties=props
            )
        else:
            self.client.connect_async(self.host, self.port, keepalive=60)
        self.client.loop_start()
        if not self.connected.wait(wait_s):
            log.warning("MQTT broker %s:%s not reachable yet; retrying", self.host, self.port)
        return self

    def stop(self) -> None:
        self.shutdown()

    def shutdown(self, drain: Callable[[], None] | None = None, timeout_s: float = 10.0) -> None:
        """Stop without causing redeliveries: stop reading, run ``drain`` (the sink commits what
        was read, and its acknowledgements go straight to the socket since no network thread
        runs any more), flush them, DISCONNECT, and close the socket only after the broker has.
        Whatever was read but not committed is never acknowledged and comes back next time."""
        self.client.loop_stop()
        if drain is not None:
            drain()
        _flush_writes(self.client, timeout_s)
        self.client.on_socket_close = _lingering_close
        self.client.disconnect()

    def subscriptions(self) -> list[str]:
        filters = [f"{self.topic_root}/+/+/up", f"{self.topic_root}/+/gw/+/batch"]
        if self.shared_group:
            filters = [f"$share/{self.shared_group}/{f}" for f in filters]
        return filters

    # --- paho callbacks (network thread) ---------------------------------------------------
    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: mqtt.ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            log.error("MQTT connect refused: %s", reason_code)
            return
        self.stats.bump("connects")
        # Re-subscribing is harmless on a resumed session and needed on a new one. `connected`
        # is set on SUBACK, not here: until the broker has the subscription, a publish made
        # right now would not reach us, and "ready" must mean ready to receive.
        client.subscribe([(f, self.qos) for f in self.subscriptions()])
        log.info(
            "MQTT connected to %s:%s (session present: %s)",
            self.host,
            self.port,
            flags.session_present,
        )

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_codes: list[mqtt.ReasonCode],
        properties: Properties | None,
    ) -> None:
        refused = [rc for rc in reason_codes if rc.is_failure]
        if refused:
            log.error("MQTT subscription refused: %s", ", ".join(str(rc) for rc in refused))
            return
        self.connected.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason_code: mqtt.ReasonCode,
        properties: Properties | None,
    ) -> None:
        self.connected.clear()
        self.stats.bump("disconnects")
        level = logging.WARNING if reason_code.is_failure else logging.INFO
        log.log(level, "MQTT disconnected: %s", reason_code)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        self.stats.bump("messages")
        route = parse_topic(msg.topic, self.topic_root)
        if route is None:
            # Not ours; acknowledge so the broker does not redeliver it forever.
            self.stats.bump("ignored_topics")
            self._ack(msg.mid, msg.qos)
            return
        frame = Frame(
            source="mqtt",
            address=msg.topic,
            payload=bytes(msg.payload),
            payload_format=self.vendor_formats.get(route.vendor),
            device_hint=route.device,
        )
        mid, qos = msg.mid, msg.qos

        def durable(outcome: FrameOutcome) -> None:
            self._ack(mid, qos)

        # Blocks while ingest is full: the network thread stops reading, the broker holds the rest.
        self.sink.submit(frame, durable)

    def _ack(self, mid: int, qos: int) -> None:
        if qos > 0:
            self.client.ack(mid, qos)
        self.stats.bump("acked")


def _flush_writes(client: mqtt.Client, timeout_s: float = 10.0) -> None:
    """Write out what paho still holds (PUBACKs) now that no network thread does it for us."""
    deadline = time.monotonic() + timeout_s
    while client.want_write() and time.monotonic() < deadline:
        sock = client.socket()
        if sock is None:
            return
        select.select([], [sock], [], max(0.0, min(0.5, deadline - time.monotonic())))
        if client.loop_write() != mqtt.MQTT_ERR_SUCCESS:
            return


def _lingering_close(client: mqtt.Client, userdata: object, sock: object) -> None:
    """paho's ``on_socket_close`` for the final DISCONNECT: close only once the broker has.

    The broker refills the Receive Maximum window as soon as our PUBACKs arrive, so when we
    disconnect there are unread messages in our receive buffer. Closing a TCP socket with unread
    data sends a RST, and a RST makes the broker's kernel drop what it had not read yet: our last
    PUBACKs, whose messages it then delivers again. So send FIN after the DISCONNECT and read
    (and drop) until the broker closes its side, which it does after handling both."""
    if not isinstance(sock, socket.socket):
        return
    deadline = time.monotonic() + 5.0
    try:
        sock.shutdown(socket.SHUT_WR)
        while (remaining := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([sock], [], [], remaining)
            if not readable:
                return
            try:
                if not sock.recv(65536):
                    return  # EOF: the broker handled everything we sent and closed
            except BlockingIOError:
                continue
    except OSError:
        return
