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

Poison messages: no message can stop the receive thread. paho runs ``on_message`` on its one
network thread, and an exception escaping it ends that thread: nothing is read or acknowledged
any more, the unacknowledged message comes back on every reconnect and kills the next thread
too. So ``_on_message`` never raises:

- a topic under our root that fits neither scheme (``{root}/{vendor}/gw/up``, which the
  ``+/+/up`` filter delivers) is submitted as a refused frame, ``UNKNOWN_TOPIC``, and
  acknowledged once that quarantine row is committed (counted in ``stats.ignored_topics``);
- any exception while handling a message is logged (one line: topic, exception), counted in
  ``stats.errors``, and the message is submitted as a refused ``PROCESSING_ERROR`` frame with its
  payload, acknowledged when durable like any other;
- if even that submit raises, the message is acknowledged without a row (``stats.unprocessable``,
  logged as lost): redelivering it could only fail the same way, forever.

:meth:`MqttIngest.alive` tells whether paho's network thread still runs; the process
supervisors (``ingest.workers``, ``aquameter ingest``) exit non-zero when it does not, so the
process is restarted instead of reporting healthy while it reads nothing.
"""

from __future__ import annotations

import itertools
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


# Reason codes of frames this transport refuses itself (documented in ingest/validate.py;
# protocols/ does not import ingest).
UNKNOWN_TOPIC = "UNKNOWN_TOPIC"
PROCESSING_ERROR = "PROCESSING_ERROR"

# Longest exception text carried in a PROCESSING_ERROR detail or log line.
MAX_ERROR_TEXT = 500


@dataclass
class MqttStats:
    """Counters of the MQTT adapter, bumped from paho's network thread and the ack thread."""

    messages: int = 0
    acked: int = 0
    ignored_topics: int = 0
    errors: int = 0  # exceptions while handling a message (quarantined as PROCESSING_ERROR)
    unprocessable: int = 0  # not even that could be submitted: acknowledged and lost (logged)
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
        self.client_id = client_id
        self.stats = MqttStats()
        self.connected = threading.Event()
        self._thread: threading.Thread | None = None  # paho's network thread, once started
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
        self._thread = getattr(self.client, "_thread", None)
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
        self._thread = None  # stopped on purpose: no longer a problem for the supervisor
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
        """paho's message callback: hand the message to the sink; never raise (see the module
        docstring: an exception here would end paho's network thread)."""
        self.stats.bump("messages")
        ack = _AckOnce(self, msg.mid, msg.qos)
        try:
            # Blocks while ingest is full: the network thread stops reading, the broker holds
            # the rest.
            self.sink.submit(self._frame(msg), ack)
        except Exception as exc:
            self._poisoned(msg, exc, ack)

    def _frame(self, msg: mqtt.MQTTMessage) -> Frame:
        """The frame for ``msg``: a routed uplink, or a refused UNKNOWN_TOPIC frame."""
        topic = _topic_text(msg)
        route = parse_topic(topic, self.topic_root)
        if route is None:
            self.stats.bump("ignored_topics")
            root = self.topic_root
            detail = (
                f"topic {topic!r} does not match {root}/{{vendor}}/{{device}}/up "
                f"or {root}/{{vendor}}/gw/{{gateway}}/batch"
            )
            log.warning("MQTT message on unknown topic %r quarantined (UNKNOWN_TOPIC)", topic)
            return Frame(
                source="mqtt",
                address=topic,
                payload=bytes(msg.payload),
                rejection=(UNKNOWN_TOPIC, detail),
            )
        return Frame(
            source="mqtt",
            address=topic,
            payload=bytes(msg.payload),
            payload_format=self.vendor_formats.get(route.vendor),
            device_hint=route.device,
        )

    def _poisoned(self, msg: mqtt.MQTTMessage, exc: Exception, ack: _AckOnce) -> None:
        """An exception while handling ``msg``: quarantine it as PROCESSING_ERROR, or, when
        even that fails, acknowledge it so the broker stops redelivering a poison message.

        Both frames of one message share ``ack``, which sends at most one PUBACK: had the sink
        queued the first frame before raising, a second PUBACK for the same packet id could
        acknowledge a newer message the broker sent under the reused id."""
        self.stats.bump("errors")
        topic = _topic_text(msg)
        text = _error_text(exc)
        log.error("MQTT message on %r: %s; quarantined as PROCESSING_ERROR", topic, text)
        try:
            frame = Frame(
                source="mqtt",
                address=topic,
                payload=bytes(msg.payload),
                rejection=(PROCESSING_ERROR, text),
            )
            self.sink.submit(frame, ack)
        except Exception as again:
            self.stats.bump("unprocessable")
            log.error(
                "MQTT message on %r cannot be processed (%s) nor quarantined (%s): acknowledged "
                "so the broker stops redelivering it; this message is lost",
                topic,
                text,
                _error_text(again),
            )
            try:
                ack(None)
            except Exception as err:  # a closed socket: the broker redelivers, we try again
                log.error("MQTT acknowledgement failed: %s", _error_text(err))

    def _ack(self, mid: int, qos: int) -> None:
        if qos > 0:
            self.client.ack(mid, qos)
        self.stats.bump("acked")

    # --- health ------------------------------------------------------------------------------
    def alive(self) -> bool:
        """True while paho's network thread runs (started and neither stopped nor died).

        paho 2.x keeps the thread of ``loop_start`` in ``Client._thread`` and sets it back to
        None when ``loop_forever`` returns or raises (an exception escaping a callback ends it
        without any other sign: ``connected`` would stay set). We keep our own reference too,
        so a thread that died is seen as dead whatever paho's attribute says."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return False
        return getattr(self.client, "_thread", thread) is thread

    def problem(self) -> str | None:
        """None while healthy; else what is wrong, for a supervisor's log line and exit."""
        if self._thread is None:
            return None  # not started (or stopped on purpose): nothing to supervise
        if not self.alive():
            return (
                f"MQTT network thread (paho) of {self.client_id} is not running: nothing is "
                "read or acknowledged any more (see the traceback above)"
            )
        return None


class _AckOnce:
    """The ``on_durable`` of one message: sends its PUBACK once, however often it is called."""

    __slots__ = ("_calls", "_ingest", "_mid", "_qos")

    def __init__(self, ingest: MqttIngest, mid: int, qos: int) -> None:
        self._ingest = ingest
        self._mid = mid
        self._qos = qos
        self._calls = itertools.count()

    def __call__(self, outcome: FrameOutcome | None) -> None:
        if next(self._calls) == 0:  # atomic under the GIL: one caller wins
            self._ingest._ack(self._mid, self._qos)


def _topic_text(msg: mqtt.MQTTMessage) -> str:
    """The message's topic as text, even when it is not valid UTF-8 (paho's ``topic`` raises)."""
    try:
        return str(msg.topic)
    except Exception:
        raw = getattr(msg, "_topic", b"")
        return bytes(raw).decode("utf-8", "backslashreplace")


def _error_text(exc: BaseException) -> str:
    """``Type: message`` of an exception, bounded (a RecursionError's text can be huge)."""
    try:
        text = f"{type(exc).__name__}: {exc}"
    except Exception:
        text = type(exc).__name__
    if len(text) > MAX_ERROR_TEXT:
        text = f"{text[:MAX_ERROR_TEXT]}…[cut {len(text) - MAX_ERROR_TEXT} chars]"
    return text


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
