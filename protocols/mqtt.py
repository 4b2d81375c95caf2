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

Broker restarts and shared subscriptions (measured on mosquitto 2.0.11, Debian's): a broker
restarted from its persistence file restores a ``$share`` session (CONNACK says session present, the
messages queued before the restart come back) but *not its shared subscriptions*: until a worker
subscribes again, a message matches no subscription and the broker drops it, although it
acknowledged it to its publisher (the quick soak lost ~200 readings, ~1 s of traffic, per restart:
publishers reconnect as fast as the workers do). Plain persistent subscriptions are restored. So
each worker on a shared subscription also holds a *catch-up* session (``{client_id}-catchup``,
``catch_up=True``): the same filters, not shared, persistent. It acknowledges what it receives
without processing it, except in a window after each of its (re)connects: then it hands its messages
to the sink like the shared subscription does, until a *fence* it publishes itself
(``{root}/_catchup/{client_id}``, QoS 1) comes back. The fence is published only once the worker's
shared subscription is acknowledged after the catch-up session's last disconnect (when that
session alone reconnected, the worker subscribes again for a fresh SUBACK; re-subscribing
replaces a subscription without interrupting it), and a session's messages arrive in order, so
everything published while no shared subscription existed reaches the sink before the window
closes. What arrives twice in the window (also through the shared subscription) is harmless:
readings are de-duplicated on their key, and a quarantined message's row counts it once more
(``occurrences``) instead of being written twice. The cost: every message crosses the network
to each worker once more (acknowledged unread), and a reconnect replays what the catch-up session
queued while the worker was away. ``connected`` (ready) is set only once the window is closed,
the first one included (the catch-up session may connect after the shared subscription is in
place). A broker ACL must let the ingest user write ``{root}/_catchup/#`` (and read it, as all of
``{root}/#``): a refused fence is logged and disables the catch-up session's windows (a broker
restart may then lose what it lost before).

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

Identity: the topic names who sent a message, and with the broker's ACL (``aquameter mqtt acl``:
each meter may write only ``{root}/{vendor}/{device}/up``, each concentrator only
``{root}/+/gw/{gateway}/batch``) the topic is *proven*. Frames carry it as ``peer`` (the device or
gateway) and ``peer_vendor`` (a meter's topic vendor); ingest refuses, as UNAUTHORIZED, readings
of a device other than the topic's, of a device registered with another vendor, or in a batch of
a meter not registered under that gateway. ``trust_topic=False`` (a broker without such an ACL,
where a topic proves nothing) keeps only the first check: a payload contradicting its own
single-device topic is refused in any case.

Broker security: TLS (``mqtts://``, port 8883 by default) with a CA file, an optional client
certificate, a minimum TLS version; username and password given apart from the URL (a password
file, ``AQUAMETER_MQTT_PASSWORD``), so the URL can be printed. No log line carries a secret:
connect, refusal and failure lines name host:port and the user only (:func:`safe_url` masks a
URL's password for printing).
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import select
import socket
import ssl
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse, urlunparse

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from protocols.uplink import Frame, FrameOutcome, FrameSink

log = logging.getLogger("aquameter.mqtt")


# Reason codes of frames this transport refuses itself (documented in ingest/validate.py;
# protocols/ does not import ingest).
UNKNOWN_TOPIC = "UNKNOWN_TOPIC"
PROCESSING_ERROR = "PROCESSING_ERROR"

# Topics whose route is remembered (a meter's topic repeats with each of its messages).
_ROUTE_CACHE = 16_384

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
    refused: int = 0  # CONNACK with a failure reason (bad credentials, not authorised)
    catch_up: int = 0  # received by the catch-up session in its window: handed to the sink
    catch_up_skipped: int = 0  # received by it outside the window: acknowledged unread
    fences: int = 0  # catch-up windows closed by their fence
    resubscribes: int = 0  # shared subscription renewed after the catch-up session alone dropped
    connect_failures: int = 0  # no CONNACK at all: TCP refused, TLS handshake failed
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


TLS_SCHEMES = ("mqtts", "ssl")
TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def safe_url(url: str) -> str:
    """``url`` with its password masked (``mqtt://user:***@host:port``), for output and logs.

    A URL may still carry a password (it works), but it must never reach a log line or a
    terminal; anything not parseable as a URL with a password is returned unchanged."""
    try:
        parsed = urlparse(url)
        if parsed.password is None:
            return url
        host = parsed.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{parsed.username or ''}:***@{host}"
        if parsed.port is not None:
            netloc += f":{parsed.port}"
        return urlunparse(parsed._replace(netloc=netloc))
    except ValueError:  # a malformed port: mask everything between scheme and host
        scheme, sep, rest = url.partition("://")
        return f"{scheme}{sep}***@{rest.rpartition('@')[2]}" if "@" in rest else url


def read_secret_file(path: str | os.PathLike[str]) -> str:
    """The secret in ``path``: its first line without the newline (editors add one).

    An empty file is an error rather than an empty password, which a broker configured with
    ``allow_anonymous`` could silently accept."""
    text = Path(path).read_text(encoding="utf-8")
    secret = text.splitlines()[0] if text else ""
    if not secret:
        raise ValueError(f"MQTT password file {path} is empty")
    return secret


def tls_context(
    ca_file: str | os.PathLike[str] | None = None,
    cert_file: str | os.PathLike[str] | None = None,
    key_file: str | os.PathLike[str] | None = None,
    tls_version: str | None = None,
) -> ssl.SSLContext:
    """The client TLS context: verify the broker against ``ca_file`` (else the system CAs)
    including its host name, present ``cert_file``/``key_file`` when given.

    This is what paho's ``tls_set(ca_certs, certfile, keyfile, tls_version)`` builds, except
    that ``tls_version`` is a *minimum* (``ssl.TLSVersion``) rather than one of the deprecated
    fixed-version ``ssl.PROTOCOL_TLSv1_x`` constants paho would take."""
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=None if ca_file is None else os.fspath(ca_file)
    )
    if tls_version is not None:
        try:
            context.minimum_version = TLS_VERSIONS[tls_version]
        except KeyError:
            raise ValueError(
                f"MQTT TLS version {tls_version!r}: expected one of {', '.join(TLS_VERSIONS)}"
            ) from None
    if cert_file is not None:
        context.load_cert_chain(
            os.fspath(cert_file), None if key_file is None else os.fspath(key_file)
        )
    elif key_file is not None:
        raise ValueError("MQTT client key given without a client certificate")
    return context


def _refused(reason_codes: list[mqtt.ReasonCode], what: str) -> bool:
    """Log a SUBACK's refused filters (one line) and say whether there were any."""
    refused = [rc for rc in reason_codes if rc.is_failure]
    if refused:
        log.error("MQTT %s refused: %s", what, ", ".join(map(str, refused)))
    return bool(refused)


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
        username: str | None = None,
        password: str | None = None,
        password_file: str | os.PathLike[str] | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        cert_file: str | os.PathLike[str] | None = None,
        key_file: str | os.PathLike[str] | None = None,
        tls_version: str | None = None,
        trust_topic: bool = True,
        catch_up: bool = True,
        persistent: bool = True,
    ) -> None:
        """``catch_up`` (with a shared subscription on MQTT v5 only) adds the catch-up session
        of the module docstring, so a broker restart loses nothing. ``persistent=False`` is for
        one-off listeners (``aquameter check --listen``): a session that ends with the
        connection (clean start, no expiry), so nothing is left queued at the broker.

        ``username``/``password`` (or ``password_file``) take precedence over the URL's;
        the TLS options need an ``mqtts://`` URL: configured certificates with a plain-text
        URL would send the password in clear, so that is an error, not a guess."""
        parsed = urlparse(url)
        tls = parsed.scheme in TLS_SCHEMES
        if not tls and any(f is not None for f in (ca_file, cert_file, key_file, tls_version)):
            raise ValueError(
                f"MQTT TLS options are set but {safe_url(url)} is not mqtts://: refusing to "
                "connect in plain text"
            )
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or (8883 if tls else 1883)
        self.tls = tls
        self.username = username or (unquote(parsed.username) if parsed.username else None)
        if password is None and password_file is not None:
            password = read_secret_file(password_file)
        if password is None and parsed.password is not None:
            password = unquote(parsed.password)
        self._password = password
        if self._password is not None and not self.username:
            raise ValueError("an MQTT password needs a username")
        self.trust_topic = trust_topic
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
        self.persistent = persistent
        if not persistent:
            self.session_expiry_s = 0
        if not v5:
            kwargs["clean_session"] = not persistent
        tls_ctx = tls_context(ca_file, cert_file, key_file, tls_version) if tls else None

        def new_client(cid: str) -> mqtt.Client:
            c = _BufferedClient(
                callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                client_id=cid,
                protocol=protocol,
                manual_ack=True,
                **kwargs,  # type: ignore[arg-type]
            )
            if self.username:
                c.username_pw_set(self.username, self._password)
            if tls_ctx is not None:
                c.tls_set_context(tls_ctx)
            c.reconnect_delay_set(int(max(1, reconnect_min_s)), int(reconnect_max_s))
            return c

        self.client = new_client(client_id)
        # PUBACKs in batches (see flush_acks): with a sink that says when a batch of its
        # callbacks is done, a QoS 1 acknowledgement only records the packet id here.
        self._routes: dict[str, TopicRoute] = {}  # parse_topic's answers, by topic
        self._acks_main: collections.deque[int] = collections.deque()
        self._acks_cu: collections.deque[int] = collections.deque()
        self._flush_lock = threading.Lock()
        register = getattr(sink, "add_ack_flush", None)
        self._batch_acks = False
        if callable(register):
            try:
                register(self.flush_acks)
                self._batch_acks = True
            except AttributeError:  # a sink not set up for it (never started): ack one by one
                pass
        self._last_connect_error: str | None = None
        self._wrap_reconnect()
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        # The catch-up session (module docstring): only beside a shared subscription.
        self.catch_up: mqtt.Client | None = None
        self.fence_topic = f"{self.topic_root}/_catchup/{client_id.replace('/', '_')}"
        self._cu_lock = threading.Lock()
        self._cu_window = False  # hand messages to the sink until the fence comes back
        self._cu_fence: str | None = None  # the fence published for the current window
        self._cu_subscribed = False
        self._cu_disconnected_at = 0.0  # monotonic time of the catch-up session's last loss
        self._shared_subacked_at = -1.0  # monotonic time of the last shared SUBACK
        self._cu_thread: threading.Thread | None = None
        self._shared_ok = False  # the shared subscription acknowledged on this connection
        self._cu_disabled = False  # the broker refused the fence: no more windows
        if catch_up and self.shared_group and persistent:
            # Not ready before the catch-up session's first window has closed: a worker that
            # reported ready while that session was still connecting would open the window
            # under live traffic and hand every message to the sink twice until its fence.
            self._cu_window = True
            self.catch_up = new_client(f"{client_id}-catchup")
            self.catch_up.on_connect = self._cu_on_connect
            self.catch_up.on_subscribe = self._cu_on_subscribe
            self.catch_up.on_disconnect = self._cu_on_disconnect
            self.catch_up.on_message = self._cu_on_message
            self.catch_up.on_publish = self._cu_on_publish

    @property
    def endpoint(self) -> str:
        """Where and as whom we connect, for log lines: host:port, TLS, user; never a secret."""
        who = f" as {self.username!r}" if self.username else ""
        return f"{self.host}:{self.port}{' (TLS)' if self.tls else ''}{who}"

    def _wrap_reconnect(self) -> None:
        """Remember why a connection attempt failed (paho's network thread swallows the
        OSError — refused TCP, a failed TLS handshake — and reports only that it failed)."""
        original = self.client.reconnect

        def reconnect() -> mqtt.MQTTErrorCode:
            try:
                return original()
            except OSError as exc:
                self._last_connect_error = _error_text(exc)
                raise

        self.client.reconnect = reconnect  # type: ignore[method-assign]

    @property
    def last_connect_error(self) -> str | None:
        """Why the latest connection attempt failed (socket or TLS error), for one-line reports."""
        return self._last_connect_error

    # --- lifecycle -------------------------------------------------------------------------
    def start(self, wait_s: float = 10.0) -> MqttIngest:
        """Connect (in the background) and wait up to ``wait_s`` for the subscription."""
        for c in (self.client, self.catch_up):
            if c is None:
                continue
            if self.v5:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = self.session_expiry_s
                props.ReceiveMaximum = self.receive_maximum
                c.connect_async(
                    self.host,
                    self.port,
                    keepalive=60,
                    clean_start=not self.persistent,
                    properties=props,
                )
            else:
                c.connect_async(self.host, self.port, keepalive=60)
            c.loop_start()
        self._thread = getattr(self.client, "_thread", None)
        if self.catch_up is not None:
            self._cu_thread = getattr(self.catch_up, "_thread", None)
        if not self.connected.wait(wait_s):
            log.warning("MQTT broker %s not reachable yet; retrying", self.endpoint)
        return self

    def stop(self) -> None:
        self.shutdown()

    def shutdown(self, drain: Callable[[], None] | None = None, timeout_s: float = 10.0) -> None:
        """Stop without causing redeliveries: stop reading, run ``drain`` (the sink commits what
        was read, and its acknowledgements go straight to the socket since no network thread
        runs any more), flush them, DISCONNECT, and close the socket only after the broker has.
        Whatever was read but not committed is never acknowledged and comes back next time."""
        self._thread = None  # stopped on purpose: no longer a problem for the supervisor
        self._cu_thread = None
        clients = [c for c in (self.client, self.catch_up) if c is not None]
        for c in clients:
            c.loop_stop()
        if drain is not None:
            drain()
        for c in clients:
            _flush_writes(c, timeout_s)
            c.on_socket_close = _lingering_close
            c.disconnect()

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
            self.stats.bump("refused")
            log.error("MQTT connect to %s refused: %s", self.endpoint, reason_code)
            return
        self.stats.bump("connects")
        # Re-subscribing is harmless on a resumed session and needed on a new one. `connected`
        # is set on SUBACK, not here: until the broker has the subscription, a publish made
        # right now would not reach us, and "ready" must mean ready to receive.
        client.subscribe([(f, self.qos) for f in self.subscriptions()])
        log.info("MQTT connected to %s (session present: %s)", self.endpoint, flags.session_present)

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        """No CONNACK at all (TCP refused, TLS handshake failed); paho retries after a delay."""
        self.stats.bump("connect_failures")
        log.warning(
            "MQTT connection to %s failed: %s; retrying",
            self.endpoint,
            self._last_connect_error or "no detail",
        )

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_codes: list[mqtt.ReasonCode],
        properties: Properties | None,
    ) -> None:
        if _refused(reason_codes, "subscription"):
            return
        with self._cu_lock:
            self._shared_subacked_at = time.monotonic()
            self._shared_ok = True
        self._maybe_fence()
        self._update_ready()

    def _update_ready(self) -> None:
        """Set ``connected`` (ready to receive) once the shared subscription is acknowledged
        and no catch-up window is open: until the fence is back, a message could be handled
        twice (through both sessions), which is harmless for readings but not what "ready"
        promises."""
        with self._cu_lock:
            ready = self._shared_ok and (self.catch_up is None or not self._cu_window)
        if ready:
            self.connected.set()

    # --- the catch-up session (its own network thread; see the module docstring) -----------
    def _cu_on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: mqtt.ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            log.error("MQTT catch-up connect to %s refused: %s", self.endpoint, reason_code)
            with self._cu_lock:  # no window to wait for: readiness must not hang on it
                self._cu_window = False
            self._update_ready()
            return
        with self._cu_lock:
            self._cu_window = not self._cu_disabled
            self._cu_fence = None
            self._cu_subscribed = False
            resubscribe = self._shared_ok and self._shared_subacked_at <= self._cu_disconnected_at
        plain = [f.split("/", 2)[2] for f in self.subscriptions()]  # without $share/group/
        client.subscribe([(f, self.qos) for f in [*plain, self.fence_topic]])
        if resubscribe and self.client.is_connected():
            # The catch-up session lost its connection alone: the shared subscription was never
            # lost, so no new SUBACK would ever come and the window would stay open, handing
            # every message to the sink twice. Subscribing again replaces the subscription
            # without interrupting its flow (MQTT 5.0 §3.8.4) and its SUBACK, newer than this
            # session's loss, lets the fence go out. After a broker restart the main session is
            # down too (no SUBACK on a dead socket) and its own reconnect subscribes as before.
            self.stats.bump("resubscribes")
            self.client.subscribe([(f, self.qos) for f in self.subscriptions()])

    def _cu_on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_codes: list[mqtt.ReasonCode],
        properties: Properties | None,
    ) -> None:
        if _refused(reason_codes, "catch-up subscription"):
            return
        with self._cu_lock:
            self._cu_subscribed = True
        self._maybe_fence()

    def _cu_on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason_code: mqtt.ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._cu_lock:
            self._cu_subscribed = False
            self._cu_disconnected_at = time.monotonic()

    def _maybe_fence(self) -> None:
        """Publish the fence that closes the catch-up window, once both subscriptions are in
        place and the shared one was acknowledged after the catch-up session last lost its
        broker (a shared SUBACK from before a broker restart proves nothing)."""
        catch_up = self.catch_up
        if catch_up is None:
            return
        with self._cu_lock:
            if not (self._cu_window and self._cu_subscribed and self._cu_fence is None):
                return
            if self._shared_subacked_at <= self._cu_disconnected_at:
                return
            self._cu_fence = fence = uuid.uuid4().hex
        catch_up.publish(self.fence_topic, fence.encode(), qos=1)

    def _cu_on_publish(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_code: mqtt.ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            # Without a fence the window would stay open and every message be handled twice;
            # give up catching up instead (what a broker restart loses is as before).
            log.error(
                "MQTT catch-up fence on %s refused (%s): catch-up disabled, a broker restart may "
                "lose what arrives before the shared subscription is back; the broker's ACL must "
                "let the ingest user write %s",
                self.fence_topic,
                reason_code,
                self.fence_topic,
            )
            with self._cu_lock:
                self._cu_window = False
                self._cu_disabled = True
            self._update_ready()

    def _cu_on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        """In the window: handle like a shared-subscription message; outside it, acknowledge
        unread (the shared subscription has it). Never raises, like :meth:`_on_message`."""
        try:
            if _topic_text(msg) == self.fence_topic:
                with self._cu_lock:
                    closed = (
                        self._cu_window and msg.payload.decode(errors="replace") == self._cu_fence
                    )
                    if closed:
                        self._cu_window = False
                if closed:
                    self.stats.bump("fences")
                    log.info("MQTT catch-up window closed (%d caught up)", self.stats.catch_up)
                    self._update_ready()
                client.ack(msg.mid, msg.qos)
                return
            with self._cu_lock:
                window = self._cu_window
            if not window:
                self.stats.bump("catch_up_skipped")
                client.ack(msg.mid, msg.qos)
                return
        except Exception as exc:  # an ack on a closed socket: the broker sends it again
            log.error("MQTT catch-up message: %s", _error_text(exc))
            return
        self.stats.bump("catch_up")
        ack = _AckOnce(self, msg.mid, msg.qos, client)
        try:
            self.sink.submit(self._frame(msg), ack)
        except Exception as exc:
            self._poisoned(msg, exc, ack)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason_code: mqtt.ReasonCode,
        properties: Properties | None,
    ) -> None:
        self.connected.clear()
        with self._cu_lock:
            self._shared_ok = False
        self.stats.bump("disconnects")
        level = logging.WARNING if reason_code.is_failure else logging.INFO
        log.log(level, "MQTT disconnected: %s", reason_code)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        """paho's message callback: hand the message to the sink; never raise (see the module
        docstring: an exception here would end paho's network thread)."""
        # Only this thread writes ``messages``: no lock needed (it costs one per message).
        self.stats.messages += 1
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
        route = self._routes.get(topic)
        if route is None:
            route = parse_topic(topic, self.topic_root)
            if route is not None:
                if len(self._routes) >= _ROUTE_CACHE:  # topics are chosen by the sender
                    self._routes.clear()
                self._routes[topic] = route
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
        # The identity the topic proves (see the module docstring); without trust in the topic
        # only a single meter's own topic still binds its payload to that meter.
        peer: str | None = route.device
        peer_vendor: str | None = None
        if route.device is not None:
            peer_vendor = route.vendor if self.trust_topic else None
        elif self.trust_topic:
            peer = route.gateway
        return Frame(
            source="mqtt",
            address=topic,
            payload=bytes(msg.payload),
            payload_format=self.vendor_formats.get(route.vendor),
            device_hint=route.device,
            peer=peer,
            peer_vendor=peer_vendor,
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
                self.flush_acks()  # no batch of the sink's will carry this one
            except Exception as err:  # a closed socket: the broker redelivers, we try again
                log.error("MQTT acknowledgement failed: %s", _error_text(err))

    def _ack(self, mid: int, qos: int, client: mqtt.Client | None = None) -> None:
        main = client is None or client is self.client
        if qos == 1 and self._batch_acks:
            (self._acks_main if main else self._acks_cu).append(mid)
            return  # sent by flush_acks, which counts them
        if qos > 0:
            (client or self.client).ack(mid, qos)
        if main:
            self.stats.bump("acked")

    def flush_acks(self) -> None:
        """Send the PUBACKs recorded since the last call, in order, as one write per session.

        Why: paho's ``ack()`` queues one 4-byte packet and writes a byte to its socket pair to
        wake the network thread, per message; from another thread that is a wake-up, a
        ``select`` and a ``send`` each. The sink calls this once per committed batch (its
        callbacks ran, in arrival order), so the PUBACKs of the batch go to paho as one packet
        of back-to-back PUBACKs (MQTT allows several control packets per write; the order is
        the arrival order, as MQTT requires). Called from the sink's acknowledgement thread;
        appends come from the same thread, so the ids taken here are exactly those queued."""
        with self._flush_lock:
            for client, pending in (
                (self.client, self._acks_main),
                (self.catch_up, self._acks_cu),
            ):
                n = len(pending)
                if not n or client is None:
                    continue
                mids = [pending.popleft() for _ in range(n)]
                try:
                    _send_pubacks(client, mids)
                except Exception as err:  # a closed socket: the broker redelivers, we ack again
                    log.error("MQTT acknowledgement failed: %s", _error_text(err))
                if client is self.client:
                    self.stats.bump("acked", n)

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
        cu_thread = self._cu_thread
        if self.catch_up is not None and cu_thread is not None:
            if not cu_thread.is_alive() or getattr(self.catch_up, "_thread", None) is not cu_thread:
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


class _BufferedClient(mqtt.Client):
    """paho's client, reading its socket in 64 KiB chunks and many packets per wake-up.

    Why: paho 2.x reads a packet with three ``recv`` calls (command byte, length byte, body)
    and handles one packet per ``select``: at one reading per message that is five system
    calls (each giving up the GIL) and a pass through the loop per message, most of paho's
    cost. Here ``_sock_recv`` serves paho's small reads from a buffer filled by one large
    ``recv``, and ``loop_read`` handles every complete packet the buffer holds (at least
    ``_READ_BATCH`` packets, more while the buffer still has bytes, since ``select`` cannot
    see them). paho's own parsing is unchanged; this uses its private methods ``_sock_recv``,
    ``_packet_read``, ``_loop_rc_handle`` and ``_handle_on_message``, pinned by
    tests/test_mqtt_buffered.py."""

    _READ_BATCH = 256

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._rbuf = b""
        self._rpos = 0

    def _sock_recv(self, bufsize: int) -> bytes:
        pos = self._rpos
        buf = self._rbuf
        if pos >= len(buf):
            buf = super()._sock_recv(65536)  # raises BlockingIOError when nothing is there
            if len(buf) <= bufsize:
                self._rbuf, self._rpos = b"", 0
                return buf  # b"" (EOF) included: paho sees the lost connection
            self._rbuf, pos = buf, 0
        end = pos + bufsize
        self._rpos = end
        return buf[pos:end]

    def _buffered(self) -> int:
        return len(self._rbuf) - self._rpos

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        if self._sock is None:
            return mqtt.MQTTErrorCode.MQTT_ERR_NO_CONN
        n = 0
        while True:
            if self._sock is None:
                return mqtt.MQTTErrorCode.MQTT_ERR_NO_CONN
            rc = self._packet_read()
            if rc > 0:
                return self._loop_rc_handle(rc)
            if rc == mqtt.MQTTErrorCode.MQTT_ERR_AGAIN:
                return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
            n += 1
            if n >= self._READ_BATCH and not self._buffered():
                return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS

    def reconnect(self) -> mqtt.MQTTErrorCode:
        self._rbuf, self._rpos = b"", 0  # bytes of the old connection are not the new one's
        return super().reconnect()

    _filtered = False  # message_callback_add was used: paho's own dispatch is needed

    def message_callback_add(self, sub: str, callback: mqtt.CallbackOnMessage) -> None:
        self._filtered = True
        super().message_callback_add(sub, callback)

    def _handle_on_message(self, message: mqtt.MQTTMessage) -> None:
        """``on_message`` straight away: paho first matches the topic against per-filter
        callbacks under a lock (1.4 µs a message), which ingest does not use. An exception
        escaping the callback still ends the network thread, as with paho's dispatch."""
        on_message = self.on_message
        if self._filtered or on_message is None:
            super()._handle_on_message(message)
            return
        with self._in_callback_mutex:
            try:
                on_message(self, self._userdata, message)
            except Exception as err:
                self._easy_log(mqtt.MQTT_LOG_ERR, "Caught exception in on_message: %s", err)
                if not self.suppress_exceptions:
                    raise


class _AckOnce:
    """The ``on_durable`` of one message: sends its PUBACK once, however often it is called."""

    __slots__ = ("_calls", "_client", "_ingest", "_mid", "_qos")

    def __init__(
        self, ingest: MqttIngest, mid: int, qos: int, client: mqtt.Client | None = None
    ) -> None:
        self._ingest = ingest
        self._mid = mid
        self._qos = qos
        self._client = client  # the catch-up session's client, else the main one
        self._calls = itertools.count()

    def __call__(self, outcome: FrameOutcome | None) -> None:
        if next(self._calls) == 0:  # atomic under the GIL: one caller wins
            self._ingest._ack(self._mid, self._qos, self._client)


_PUBACK_HEAD = 0x4002 << 16  # PUBACK, remaining length 2, then the packet id


def _send_pubacks(client: mqtt.Client, mids: list[int]) -> None:
    """Queue the PUBACKs of ``mids`` with paho as one outgoing packet (one wake-up, one send).

    paho 2.x writes its outgoing queue in order whatever a packet holds; a paho without the
    ``_packet_queue`` this relies on gets one ``ack()`` per message instead."""
    queue_packet = getattr(client, "_packet_queue", None)
    if queue_packet is None:
        for mid in mids:
            client.ack(mid, 1)
        return
    blob = struct.pack(f"!{len(mids)}I", *[_PUBACK_HEAD | mid for mid in mids])
    queue_packet(mqtt.PUBACK, blob, 0, 1)


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
