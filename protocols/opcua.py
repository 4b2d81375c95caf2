"""OPC-UA subscriber for water-quality analysers and stations (asyncua 2.1).

One task per registry device holds one session to the device's server and one subscription
with a monitored item per channel. Data changes are batched per publish (everything that arrived
together) into a :class:`Frame` of :class:`Uplink` objects and handed to the ingest sink.

Why our own reconnect loop instead of asyncua's ``auto_reconnect``: after a server restart the
server-side session and subscription are gone, so a fresh client, session and subscription is
the only thing that works; rebuilding everything ourselves gives a bounded exponential backoff,
one place to count losses and reconnects, and a re-check of node ids that were bad before. Loss
is detected three ways: the transport closing, asyncua's supervisor probe failing (it probes
``ServerStatus.State`` every ``watchdog_interval_s``), and the subscription falling silent for
longer than its keep-alive allows.

Nothing is acknowledged upstream here (OPC-UA publish acknowledgements are asyncua's business),
so a loss can drop the changes between the last publish and the restart. After a re-subscribe
the server sends every item's current value again; when that value was stored already the
database's unique (channel, ts) makes the repeat a counted duplicate, not a second row.

Device and channel keys (``params`` in the registry) are documented in ``opcua.sample.toml``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from asyncua import Client, ua
from asyncua.common.subscription import (
    DataChangeEvent,
    OverflowPolicy,
    StatusChangeEvent,
    Subscription,
)
from asyncua.crypto import security_policies
from cryptography.x509.oid import ExtendedKeyUsageOID

from aquameter.backoff import Backoff
from aquameter.registry import Device, Registry
from protocols.opcua_decode import convert_batch
from protocols.params import (
    OpcUaChannelParams,
    OpcUaDeviceParams,
    ParamsError,
    validate_params,
)
from protocols.uplink import Frame, FrameSink, Uplink, submit_and_wait

log = logging.getLogger("aquameter.opcua")

SOURCE = "opcua"
DEFAULT_APPLICATION_URI = "urn:aquameter:opcua:subscriber"

SecurityPolicyName = Literal["None", "Basic256Sha256"]
SecurityModeName = Literal["Sign", "SignAndEncrypt"]
TriggerName = Literal["status", "status_value", "status_value_timestamp"]

_TRIGGERS: dict[str, ua.DataChangeTrigger] = {
    "status": ua.DataChangeTrigger.Status,
    "status_value": ua.DataChangeTrigger.StatusValue,
    "status_value_timestamp": ua.DataChangeTrigger.StatusValueTimestamp,
}


class ConfigError(ValueError):
    """A device or channel whose params cannot work; the device or channel is skipped."""


@dataclass
class OpcUaStats:
    """Counters of the whole adapter (all devices); one asyncio loop updates them."""

    connects: int = 0
    reconnects: int = 0
    connection_losses: int = 0
    connect_failures: int = 0
    notifications: int = 0
    frames: int = 0
    readings_accepted: int = 0
    readings_quarantined: int = 0
    bad_nodes: int = 0
    status_changes: int = 0
    queue_overflows: int = 0
    config_errors: int = 0
    submit_errors: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    bad_node_ids: dict[str, str] = field(default_factory=dict)

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n


@dataclass(frozen=True)
class ChannelConfig:
    channel: str
    node_id: str
    sampling_interval_ms: float
    queue_size: int


@dataclass(frozen=True)
class DeviceConfig:
    device: str
    endpoint: str
    channels: tuple[ChannelConfig, ...]
    security_policy: SecurityPolicyName = "None"
    security_mode: SecurityModeName = "SignAndEncrypt"
    client_certificate: str | None = None
    client_private_key: str | None = None
    generate_client_certificate: bool = False
    server_certificate: str | None = None
    application_uri: str = DEFAULT_APPLICATION_URI
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    publishing_interval_ms: float = 1000.0
    keepalive_count: int = 10
    lifetime_count: int = 100
    session_timeout_ms: int = 60_000
    request_timeout_s: float = 4.0
    trigger: TriggerName = "status_value_timestamp"


def channel_config(
    channel_name: str, params: dict[str, Any], device: Device, where: str = ""
) -> ChannelConfig:
    """``node_id`` may say ``{station}``: replaced by device param ``station`` (else the device id),
    so one vendor channel template serves many alike stations. ``params`` go through
    :class:`OpcUaChannelParams` first, so a misspelt key is refused, not silently a default."""
    what = where or f"channel {channel_name}"
    try:
        p = validate_params(OpcUaChannelParams, params, what)
    except ParamsError as err:
        raise ConfigError(str(err)) from None
    station = str(device.params.get("station") or device.id)
    node_id = p.node_id.replace("{station}", station)
    try:
        ua.NodeId.from_string(node_id)
    except Exception as err:  # asyncua raises UaStringParsingError and friends
        raise ConfigError(f"{what}: node_id {node_id!r} does not parse") from err
    default_sampling = device.params.get("sampling_interval", 0.0)
    default_queue = device.params.get("queue_size", 10)
    sampling = p.sampling_interval if p.sampling_interval is not None else default_sampling
    queue_size = p.queue_size if p.queue_size is not None else default_queue
    return ChannelConfig(channel_name, node_id, float(sampling), int(queue_size))


def check_node_id(node_id: str) -> str | None:
    """Why ``node_id`` (a channel template: ``{station}`` allowed) cannot parse, else None.

    For ``aquameter check``, which validates vendor templates before any device fills them."""
    try:
        ua.NodeId.from_string(node_id.replace("{station}", "STATION"))
    except Exception as err:  # asyncua raises UaStringParsingError and friends
        return f"node_id {node_id!r} does not parse ({type(err).__name__})"
    return None


def device_config(device: Device, registry: Registry) -> tuple[DeviceConfig, list[str]]:
    """Typed settings of one device, and the errors of channels that were skipped.

    The device's ``params`` go through :class:`OpcUaDeviceParams` (unknown keys refused, with the
    key probably meant), each channel's through :class:`OpcUaChannelParams`. Raises
    :class:`ConfigError` when the device itself cannot work (bad params, bad security settings,
    a password env var that is not set)."""
    where = f"device {device.id}"
    try:
        p = validate_params(OpcUaDeviceParams, device.params, where)
    except ParamsError as err:
        raise ConfigError(str(err)) from None
    channels: list[ChannelConfig] = []
    errors: list[str] = []
    for ch in registry.channels_of(device):
        try:
            channels.append(
                channel_config(ch.name, ch.params, device, f"{where} channel {ch.name}")
            )
        except ConfigError as err:
            errors.append(str(err))
    cert, key = p.client_certificate, p.client_private_key
    if p.security_policy != "None":
        if not cert or not key:
            raise ConfigError(
                f"{where}: {p.security_policy} needs client_certificate and client_private_key"
            )
        if not p.generate_client_certificate and not (Path(cert).is_file() and Path(key).is_file()):
            raise ConfigError(f"{where}: client certificate or key file missing")
    password = None
    if p.password_env:
        password = os.environ.get(p.password_env)
        if password is None:
            raise ConfigError(f"{where}: environment variable {p.password_env} not set")
    if p.lifetime_count < 3 * p.keepalive_count:  # OPC 10000-4 §5.13.2
        raise ConfigError(f"{where}: lifetime_count must be >= 3 * keepalive_count")
    cfg = DeviceConfig(
        device=device.id,
        endpoint=p.endpoint,
        channels=tuple(channels),
        security_policy=p.security_policy,
        security_mode=p.security_mode,
        client_certificate=cert,
        client_private_key=key,
        generate_client_certificate=p.generate_client_certificate,
        server_certificate=p.server_certificate,
        application_uri=p.application_uri,
        username=p.username,
        password=password,
        publishing_interval_ms=p.publishing_interval,
        keepalive_count=p.keepalive_count,
        lifetime_count=p.lifetime_count,
        session_timeout_ms=p.session_timeout,
        request_timeout_s=p.request_timeout,
        trigger=p.trigger,
    )
    return cfg, errors


async def new_client(cfg: DeviceConfig, *, watchdog_interval_s: float = 5.0) -> Client:
    """An asyncua client set up for ``cfg`` (identity, login, security), not yet connected.

    One place for it, so the subscriber and ``aquameter check --poll`` reach a server exactly
    the same way (same certificate handling, same login)."""
    client = Client(
        cfg.endpoint, timeout=cfg.request_timeout_s, watchdog_intervall=watchdog_interval_s
    )
    client.name = client.description = "Aquameter OPC-UA subscriber"
    client.application_uri = cfg.application_uri
    client.session_timeout = cfg.session_timeout_ms
    if cfg.username:
        client.set_user(cfg.username)
    if cfg.password is not None:
        client.set_password(cfg.password)
    if cfg.security_policy != "None":
        await _set_security(client, cfg)
    return client


async def _set_security(client: Client, cfg: DeviceConfig) -> None:
    assert cfg.client_certificate and cfg.client_private_key
    cert, key = Path(cfg.client_certificate), Path(cfg.client_private_key)
    if cfg.generate_client_certificate:
        # Creates the pair when missing (or invalid for this application URI), else reuses it:
        # the server's trust list holds this certificate, so it must survive restarts.
        await client.setup_self_signed_certificate(
            key,
            cert,
            extended=[ExtendedKeyUsageOID.CLIENT_AUTH],
            host_name=socket.gethostname(),
        )
    mode = getattr(ua.MessageSecurityMode, cfg.security_mode)
    # Without a pinned server_certificate, asyncua takes the one the endpoint advertises.
    await client.set_security(
        security_policies.SecurityPolicyBasic256Sha256,
        certificate=str(cert),
        private_key=str(key),
        server_certificate=cfg.server_certificate,
        mode=mode,
    )


async def resolve_node_id(client: Client, node_id: str) -> ua.NodeId:
    """``node_id`` for this server: an ``nsu=`` URI becomes the server's namespace index (it may
    differ between servers and restarts); raises ValueError for a URI the server lacks."""
    nid = ua.NodeId.from_string(node_id)
    uri = getattr(nid, "NamespaceUri", None)
    if uri:
        index = await client.get_namespace_index(uri)
        return ua.NodeId(nid.Identifier, ua.Int16(index), nid.NodeIdType)
    return nid


@dataclass
class ReadOnce:
    """One read of every channel of a device: its uplinks, data changes that were not numbers
    (by reason) and channels the server refused (channel -> status name)."""

    uplinks: list[Uplink]
    skipped: dict[str, int]
    refused: dict[str, str]
    received_at: float


async def read_once(cfg: DeviceConfig, *, connect_timeout_s: float = 10.0) -> ReadOnce:
    """Connect, read each channel's current Value (with source and server timestamps) once,
    and disconnect: what ``aquameter check --poll`` shows of an OPC-UA device.

    A plain Read, not a subscription: one answer, no publish cadence to wait for. The values go
    through the subscriber's own converter, so they read exactly as ingest would store them.
    Raises ``OSError``/``TimeoutError`` when the server cannot be reached within the timeout."""
    client = await new_client(cfg, watchdog_interval_s=max(connect_timeout_s, 1.0))
    await asyncio.wait_for(client.connect(), connect_timeout_s)
    try:
        refused: dict[str, str] = {}
        nodes: list[ua.ReadValueId] = []
        names: list[str] = []
        for ch in cfg.channels:
            try:
                nid = await resolve_node_id(client, ch.node_id)
            except ValueError:
                refused[ch.channel] = "BadNamespaceUnknown"
                continue
            nodes.append(ua.ReadValueId(NodeId=nid, AttributeId=ua.AttributeIds.Value))
            names.append(ch.channel)
        params = ua.ReadParameters()
        params.NodesToRead = nodes
        params.TimestampsToReturn = ua.TimestampsToReturn.Both
        received_at = time.time()
        values = await client.uaclient.read(params) if nodes else []
        items: list[tuple[str, ua.DataValue]] = []
        for name, dv in zip(names, values, strict=True):
            status = dv.StatusCode
            empty = dv.Value is None or dv.Value.Value is None
            if status is not None and status.is_bad() and empty:
                refused[name] = status.name
            else:
                items.append((name, dv))
        uplinks, skipped = convert_batch(cfg.device, items, received_at)
        return ReadOnce(uplinks, skipped, refused, received_at)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.disconnect(), 2.0)


class _Session:
    """One connected client + subscription of one device; thrown away on any loss."""

    def __init__(self, cfg: DeviceConfig, owner: OpcUaSubscriber) -> None:
        self.cfg = cfg
        self.owner = owner
        self.client: Client | None = None
        self.sub: Subscription | None = None
        self.channel_by_handle: dict[int, str] = {}
        self.lost: str | None = None
        self.subscribed_at = 0.0

    # --- connect ---------------------------------------------------------------------------
    async def open(self) -> None:
        cfg, o = self.cfg, self.owner
        client = await new_client(cfg, watchdog_interval_s=o.watchdog_interval_s)
        self.client = client
        client.connection_lost_callback = self._on_connection_lost
        await asyncio.wait_for(client.connect(), o.connect_timeout_s)
        await self._subscribe(client)

    async def _resolve(self, client: Client, node_id: str) -> ua.NodeId:
        return await resolve_node_id(client, node_id)

    async def _subscribe(self, client: Client) -> None:
        cfg, o = self.cfg, self.owner
        params = ua.CreateSubscriptionParameters()
        params.RequestedPublishingInterval = cfg.publishing_interval_ms
        params.RequestedMaxKeepAliveCount = cfg.keepalive_count
        params.RequestedLifetimeCount = cfg.lifetime_count
        params.MaxNotificationsPerPublish = 0  # no limit; the server sends what it has
        params.PublishingEnabled = True
        params.Priority = 0
        sub = await client.create_subscription(
            params, handler=None, queue_maxsize=o.queue_maxsize, overflow=OverflowPolicy.DISCONNECT
        )
        sub.set_overflow_disconnect_handler(self._on_overflow)
        self.sub = sub
        trigger = ua.DataChangeFilter(Trigger=_TRIGGERS[cfg.trigger])
        requests: list[ua.MonitoredItemCreateRequest] = []
        handles: list[tuple[int, ChannelConfig]] = []
        for handle, ch in enumerate(cfg.channels, start=1):
            try:
                nid = await self._resolve(client, ch.node_id)
            except ValueError:  # an unknown namespace URI makes a bad node id too
                self._bad_node(ch, "BadNamespaceUnknown")
                continue
            rv = ua.ReadValueId(NodeId=nid, AttributeId=ua.AttributeIds.Value)
            mp = ua.MonitoringParameters(
                ClientHandle=handle,
                SamplingInterval=ch.sampling_interval_ms,
                Filter=trigger,
                QueueSize=ch.queue_size,
                DiscardOldest=True,
            )
            requests.append(
                ua.MonitoredItemCreateRequest(
                    ItemToMonitor=rv,
                    MonitoringMode=ua.MonitoringMode.Reporting,
                    RequestedParameters=mp,
                )
            )
            handles.append((handle, ch))
        self.subscribed_at = time.monotonic()
        if not requests:
            return
        results = await sub.create_monitored_items(requests)
        for (handle, ch), result in zip(handles, results, strict=True):
            if isinstance(result, ua.StatusCode):
                self._bad_node(ch, result.name)
            else:
                self.channel_by_handle[handle] = ch.channel
                o.stats.bad_node_ids.pop(f"{self.cfg.device}/{ch.node_id}", None)

    def _bad_node(self, ch: ChannelConfig, why: str) -> None:
        o = self.owner
        o.stats.bad_nodes += 1
        o.stats.bad_node_ids[f"{self.cfg.device}/{ch.node_id}"] = why
        log.warning(
            "opcua %s: channel %s node %s refused: %s", self.cfg.device, ch.channel, ch.node_id, why
        )

    # --- loss signals ----------------------------------------------------------------------
    async def _on_connection_lost(self, exc: Exception) -> None:
        self.lost = self.lost or f"connection lost ({exc!r})"

    def _on_overflow(self) -> None:
        self.owner.stats.queue_overflows += 1
        self.lost = self.lost or "notification queue overflow"

    def _stale(self) -> bool:
        sub = self.sub
        if sub is None:
            return False
        last = sub.last_publish_at or self.subscribed_at
        period_s = sub.parameters.RequestedPublishingInterval / 1000.0
        keepalive = max(int(sub.parameters.RequestedMaxKeepAliveCount or 1), 1)
        allowed = (
            period_s * keepalive * self.owner.keepalive_margin + self.owner.watchdog_interval_s
        )
        return time.monotonic() - last > allowed

    # --- receive ---------------------------------------------------------------------------
    async def pump(self) -> str:
        """Turn notifications into frames until the connection is lost; returns why."""
        assert self.sub is not None
        sub, o = self.sub, self.owner
        while True:
            if self.lost:
                return self.lost
            try:
                first = await sub.next_event(timeout=o.poll_s)
            except StopAsyncIteration:
                return "subscription closed"
            if first is None:
                if self._stale():
                    return "subscription silent beyond its keep-alive"
                continue
            events = [first]
            queue = sub._event_queue  # drain what arrived with it: one frame per publish batch
            while queue is not None and len(events) < o.max_frame_readings:
                try:
                    ev = queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if ev is None:
                    break
                events.append(ev)
            await self._handle(events)

    async def _handle(self, events: list[Any]) -> None:
        o = self.owner
        received_at = time.time()
        items: list[tuple[str, ua.DataValue]] = []
        for ev in events:
            if isinstance(ev, DataChangeEvent):
                o.stats.notifications += 1
                item = ev.data.monitored_item
                channel = self.channel_by_handle.get(item.ClientHandle)
                if channel is None:
                    o.stats.skip("unknown_handle")
                else:
                    items.append((channel, item.Value))
            elif isinstance(ev, StatusChangeEvent):
                o.stats.status_changes += 1
                status = ev.notification.Status
                log.warning("opcua %s: subscription status %s", self.cfg.device, status.name)
                if not status.is_good():
                    self.lost = self.lost or f"subscription status {status.name}"
        if not items:
            return
        uplinks, skipped = convert_batch(self.cfg.device, items, received_at)
        for reason, n in skipped.items():
            o.stats.skip(reason, n)
            log.debug("opcua %s: %d data changes skipped (%s)", self.cfg.device, n, reason)
        if uplinks:
            frame = Frame(
                source=SOURCE,
                address=self.cfg.endpoint,
                device_hint=self.cfg.device,
                received_at=received_at,
                uplinks=uplinks,
            )
            await o.hand_over(frame)

    # --- teardown --------------------------------------------------------------------------
    async def close(self) -> None:
        client = self.client
        if client is None:
            return
        self.client = None
        try:
            if self.lost is None:
                await asyncio.wait_for(client.disconnect(), self.owner.close_timeout_s)
            else:
                # The server is gone or unusable: do not wait for a CloseSession answer.
                await asyncio.wait_for(client.close_session(), self.owner.close_timeout_s)
        except Exception as err:  # teardown of a dead peer fails in many ways; none matters
            log.debug("opcua %s: close: %r", self.cfg.device, err)
        finally:
            client.disconnect_socket()
            protocol = client.uaclient.protocol
            if protocol is not None and not protocol.is_closed:
                # asyncua skips closing when it already marked itself disconnected (a loss seen
                # by its probe while the socket stayed open): close it ourselves, no leak.
                protocol.disconnect_socket()


class OpcUaSubscriber:
    """Subscribes to every OPC-UA device of the registry and feeds the sink.

    ``run()`` never raises for a device or peer problem: bad config is counted and the device
    skipped, unreachable servers are retried with exponential backoff (``reconnect_min_s`` doubling
    up to ``reconnect_max_s``, ±20 % jitter), refused node ids are counted and logged.
    """

    def __init__(
        self,
        devices: list[Device],
        registry: Registry,
        sink: FrameSink,
        *,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        connect_timeout_s: float = 15.0,
        close_timeout_s: float = 2.0,
        watchdog_interval_s: float = 5.0,
        keepalive_margin: float = 2.0,
        poll_s: float = 0.25,
        queue_maxsize: int = 100_000,
        max_frame_readings: int = 20_000,
        max_inflight_frames: int = 8,
    ) -> None:
        self.devices = [d for d in devices if d.protocol == "opcua"]
        self.registry = registry
        self.sink = sink
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.connect_timeout_s = connect_timeout_s
        self.close_timeout_s = close_timeout_s
        self.watchdog_interval_s = watchdog_interval_s
        self.keepalive_margin = keepalive_margin
        self.poll_s = poll_s
        self.queue_maxsize = queue_maxsize
        self.max_frame_readings = max_frame_readings
        self.stats = OpcUaStats()
        self.connected: dict[str, bool] = {}
        self._inflight = asyncio.Semaphore(max_inflight_frames)
        self._tasks: set[asyncio.Task[None]] = set()

    # --- run -------------------------------------------------------------------------------
    async def run(self) -> None:
        configs: list[DeviceConfig] = []
        for dev in self.devices:
            try:
                cfg, errors = device_config(dev, self.registry)
            except ConfigError as err:
                self.stats.config_errors += 1
                log.error("opcua: %s; device not started", err)
                continue
            for e in errors:
                self.stats.config_errors += 1
                log.error("opcua: %s; channel skipped", e)
            configs.append(cfg)
        try:
            await asyncio.gather(*(self._device_loop(cfg) for cfg in configs))
        finally:
            await self.drain()

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Wait for frames already handed to the sink to become durable."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)

    async def _device_loop(self, cfg: DeviceConfig) -> None:
        backoff = Backoff(self.reconnect_min_s, self.reconnect_max_s, jitter=0.2)
        had_session = False
        while True:
            session = _Session(cfg, self)
            try:
                await session.open()
            except asyncio.CancelledError:
                await asyncio.shield(session.close())
                raise
            except Exception as err:  # every failure to connect is retried, none is fatal
                self.stats.connect_failures += 1
                log.warning("opcua %s: connect to %s failed: %r", cfg.device, cfg.endpoint, err)
                session.lost = "connect failed"
                await session.close()
                await asyncio.sleep(backoff.failed())
                continue
            self.stats.connects += 1
            if had_session:
                self.stats.reconnects += 1
                log.info("opcua %s: reconnected and re-subscribed", cfg.device)
            had_session = True
            backoff.succeeded()
            self.connected[cfg.device] = True
            try:
                why = await session.pump()
            except asyncio.CancelledError:
                self.connected[cfg.device] = False
                await asyncio.shield(session.close())
                raise
            except Exception as err:  # a bug in handling must not end the device task
                log.exception("opcua %s: receive loop failed", cfg.device)
                why = f"receive loop failed ({err!r})"
                session.lost = why
            self.connected[cfg.device] = False
            self.stats.connection_losses += 1
            log.warning("opcua %s: %s; reconnecting", cfg.device, why)
            await session.close()
            await asyncio.sleep(backoff.failed())

    # --- hand-over to ingest ---------------------------------------------------------------
    async def hand_over(self, frame: Frame) -> None:
        """Submit without waiting for durability, at most ``max_inflight_frames`` at a time, so
        the next publish batch is read while the writer commits the previous one."""
        await self._inflight.acquire()
        self.stats.frames += 1
        task = asyncio.create_task(self._submit(frame))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _submit(self, frame: Frame) -> None:
        try:
            outcome = await submit_and_wait(self.sink, frame)
        except Exception:
            self.stats.submit_errors += 1
            log.exception("opcua %s: submit failed", frame.device_hint)
        else:
            self.stats.readings_accepted += outcome.accepted
            self.stats.readings_quarantined += outcome.quarantined
        finally:
            self._inflight.release()
