"""``aquameter check --poll DEVICE`` and ``--listen SECONDS``: live traffic, decoded, never written.

Why: a registry can be valid and still wrong — a register map off by one, a node id of the wrong
station, a vendor whose meters send litres where the registry says m³. Those show only in the
values, and finding them through the database means storing weeks of wrong numbers first. Like
Telegraf's ``--test``, these commands take the real path — the adapter's own connect, read and
decode code, then ingest's :class:`~ingest.validate.Validator` — and print the canonical readings
(UTC time, meter or sensor, channel, value, canonical unit, quality) and every rejected frame
with its reason code, without a database connection at all.

The validator needs the channel index ingest loads from the database after ``devices sync``;
here it is built from the registry file itself (:func:`registry_index`, the same mapping as
``ingest.registry_sync``), so a check works before the first sync and on a machine that cannot
reach the database.

``--listen`` subscribes on its own, *not* on ingest's shared subscription: a shared subscription
would hand it messages that ingest then never stores. Its own subscription gets a copy of every
message, and its session ends when it disconnects (session expiry 0), so the broker keeps nothing
queued for it afterwards.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import os
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from datetime import time as dtime
from typing import TextIO

from aquameter.registry import Device, Registry
from aquameter.settings import Settings
from ingest.channels import ChannelIndex, ChannelInfo
from ingest.quarantine import bound_rejections
from ingest.units import CANONICAL, DEFAULT_RANGES
from ingest.validate import PROCESSING_ERROR, Prepared, Rejection, Validator, frame_raw
from protocols.uplink import DurableCallback, Frame, FrameOutcome, Quality

POLLED = ("modbus", "opcua")
REFUSED = "aquameter check --listen: printed, not stored; send again"


@dataclass(frozen=True, slots=True)
class ChannelLabel:
    """How a channel is named in the output: its device, name, and the meter or sensor it
    measures (as ``devices sync`` would store it), with the canonical unit of its values."""

    device: str
    channel: str
    subject: str
    unit: str


def registry_index(registry: Registry) -> tuple[ChannelIndex, dict[int, ChannelLabel]]:
    """The channel index ingest would load after ``devices sync`` of ``registry``, built without
    a database, and a label per channel id for printing.

    Mirrors ``ingest.registry_sync.sync_registry``: physical range from the channel or the
    quantity's default, device unit from the channel (else canonical), meter channels are a
    meter's ``register``/unnamed kinds, the meter's install date bounds its readings."""
    infos: list[ChannelInfo] = []
    labels: dict[int, ChannelLabel] = {}
    aliases: dict[str, str] = {}
    vendors: dict[str, str] = {}
    gateways: dict[str, str] = {}
    for dev in registry.all_devices():
        vendors[dev.id] = dev.vendor
        if dev.gateway:
            gateways[dev.id] = dev.gateway
        if dev.serial is not None:
            aliases[f"serial:{dev.serial}"] = dev.id
        meter_id = (dev.meter.id or dev.id) if dev.meter is not None else None
        install = None
        if dev.meter is not None and dev.meter.install_date is not None:
            install = datetime.combine(dev.meter.install_date, dtime(0), UTC).timestamp()
        for ch in registry.channels_of(dev):
            canonical = CANONICAL.get(ch.quantity, ch.unit)
            lo, hi = DEFAULT_RANGES.get(ch.quantity, (float("-inf"), float("inf")))
            is_meter = meter_id is not None and ch.kind in ("register", "")
            info = ChannelInfo(
                id=len(infos) + 1,
                device_id=dev.id,
                name=ch.name,
                quantity=ch.quantity,
                unit=canonical,
                device_unit=ch.unit or canonical,
                min_value=lo if ch.min is None else ch.min,
                max_value=hi if ch.max is None else ch.max,
                install_epoch=install if is_meter else None,
                active=True,
            )
            infos.append(info)
            subject = f"meter {meter_id}" if is_meter else f"sensor {dev.id}:{ch.name}"
            labels[info.id] = ChannelLabel(dev.id, ch.name, subject, canonical)
    return ChannelIndex(infos, aliases, vendors, gateways), labels


def validator_for(index: ChannelIndex, settings: Settings) -> Validator:
    """Ingest's validator with the settings ingest would run with (tolerances, limits)."""
    return Validator(
        lambda: index,
        future_tolerance_s=settings.future_tolerance_s,
        earliest_epoch=settings.earliest_timestamp.timestamp(),
        max_payload_bytes=settings.max_payload_bytes,
        max_readings_per_frame=settings.max_readings_per_frame,
        max_payload_depth=settings.max_payload_depth,
        clock_skew_s=settings.clock_skew_s,
        clock_skew_action=settings.clock_skew_action,
        live_window_days=settings.live_window_days,
    )


def quality_text(quality: int) -> str:
    """``0`` or ``48 (BAD|UNCERTAIN)``: the stored number and what its bits mean."""
    if not quality:
        return "0"
    names = [f.name for f in Quality if f.name and quality & f.value]
    return f"{quality} ({'|'.join(names)})"


def reading_line(label: ChannelLabel, ts: float, value: float, quality: int) -> str:
    """One canonical reading as printed: UTC time, subject, channel, value, unit, quality."""
    ms = round(ts * 1000)  # rounded, not truncated: the stored timestamptz is µs-exact
    when = f"{datetime.fromtimestamp(ms // 1000, UTC):%Y-%m-%dT%H:%M:%S}.{ms % 1000:03d}Z"
    return (
        f"{when}  {label.subject}  {label.channel}  {value:.10g} {label.unit}  "
        f"quality={quality_text(quality)}"
    )


def rejection_line(rej: Rejection) -> str:
    """One rejected frame, uplink or reading as printed: reason code first, then what."""
    n = f" ({rej.readings} readings)" if rej.readings != 1 else ""
    return f"REJECTED {rej.reason}{n}  device={rej.device or '-'}  {rej.detail}"


class PrintingSink:
    """A :class:`~protocols.uplink.FrameSink` that validates each frame as ingest does and
    prints it instead of writing it; it counts frames, readings and rejections by reason.

    ``on_durable`` is called at once (MQTT then acknowledges our own copy of the message; it
    was never ingest's to acknowledge). Frames of a ``refuse`` source get an error outcome: a
    CoAP meter answered 2.04 would drop readings nobody stored, answered 5.00 it sends them
    again. Thread-safe: paho and the CoAP loop call ``submit`` from their threads."""

    def __init__(
        self,
        validator: Validator,
        labels: dict[int, ChannelLabel],
        out: TextIO,
        max_rejections_per_frame: int = 100,
        refuse: tuple[str, ...] = (),
    ) -> None:
        self.validator = validator
        self.refuse = refuse
        self.labels = labels
        self.out = out
        self.max_rejections_per_frame = max_rejections_per_frame
        self.frames = 0
        self.readings = 0
        self.rejected: Counter[str] = Counter()
        self.shown: list[tuple[ChannelLabel, float, float, int]] = []
        self._lock = threading.Lock()

    def prepare(self, frame: Frame) -> Prepared:
        """Validate ``frame``; never raises (an exception is its PROCESSING_ERROR, as in
        ingest)."""
        try:
            prepared = self.validator.prepare(frame)
        except Exception as err:
            prepared = Prepared(
                rejections=[
                    Rejection(
                        PROCESSING_ERROR,
                        f"{type(err).__name__}: {err}",
                        frame.device_hint,
                        frame_raw(frame),
                    )
                ]
            )
        if len(prepared.rejections) > self.max_rejections_per_frame:
            prepared.rejections = bound_rejections(
                prepared.rejections, self.max_rejections_per_frame, frame_raw(frame)
            )
        return prepared

    def submit(self, frame: Frame, on_durable: DurableCallback) -> None:
        """Validate, print and count ``frame``; report it done at once."""
        prepared = self.prepare(frame)
        lines: list[str] = []
        rows = zip(
            prepared.channel_ids, prepared.ts, prepared.values, prepared.quality, strict=True
        )
        shown = []
        for cid, ts, value, quality in sorted(rows, key=lambda r: (r[1], r[0])):
            label = self.labels[cid]
            shown.append((label, ts, value, quality))
            lines.append(reading_line(label, ts, value, quality))
        lines.extend(rejection_line(r) for r in prepared.rejections)
        quarantined = sum(r.readings for r in prepared.rejections)
        with self._lock:
            self.frames += 1
            self.readings += len(prepared)
            self.shown.extend(shown)
            for r in prepared.rejections:
                self.rejected[r.reason] += r.readings
            if lines:
                self.out.write("\n".join(lines) + "\n")
                self.out.flush()
        on_durable(
            FrameOutcome(
                accepted=len(prepared),
                quarantined=quarantined,
                reasons=[r.reason for r in prepared.rejections],
                error=REFUSED if frame.source in self.refuse else None,
            )
        )

    def summary(self) -> str:
        """``frames=F readings=R rejected=Q (REASON=n, ...)``: the count line printed last."""
        with self._lock:
            total = sum(self.rejected.values())
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.rejected.items()))
            by = f" ({reasons})" if reasons else ""
            return f"frames={self.frames} readings={self.readings} rejected={total}{by}"


def _known_devices_line(registry: Registry, device_id: str, path: str) -> str:
    devices = registry.all_devices()
    polled = sorted(d.id for d in devices if d.protocol in POLLED)
    near = difflib.get_close_matches(device_id, [d.id for d in devices], n=1, cutoff=0.6)
    hint = f"did you mean {near[0]!r}? " if near else ""
    others = len(devices) - len(polled)
    listed = ", ".join(polled) if polled else "none"
    return (
        f"check --poll: unknown device {device_id!r} in {path}; {hint}"
        f"devices that can be polled: {listed} (and {others} push devices)"
    )


def find_device(registry: Registry, device_id: str) -> Device | None:
    """The registry's device ``device_id`` (group members too), or None."""
    return next((d for d in registry.all_devices() if d.id == device_id), None)


def run_poll(
    registry: Registry,
    device_id: str,
    settings: Settings,
    *,
    registry_path: str = "the registry",
    out: TextIO | None = None,
    err: TextIO | None = None,
    connect_timeout_s: float = 10.0,
) -> int:
    """One real poll of ``device_id`` through its adapter, printed, nothing written.

    Returns the exit code: 0 when every channel was read and accepted, 1 when the device could
    not be polled or reached or any reading was rejected or not read, 2 for a device that is
    unknown or pushes its readings (MQTT, CoAP: ``--listen`` is the way to watch them)."""
    out = out or sys.stdout
    err = err or sys.stderr
    dev = find_device(registry, device_id)
    if dev is None:
        print(_known_devices_line(registry, device_id, registry_path), file=err)
        return 2
    if dev.protocol == "import":
        print(
            f"check --poll: device {dev.id} is loaded from files (`aquameter import`): there "
            "is nothing to poll",
            file=err,
        )
        return 2
    if dev.protocol not in POLLED:
        how = "publishes over MQTT" if dev.protocol == "mqtt" else "posts over CoAP"
        print(
            f"check --poll: device {dev.id} {how}: there is nothing to poll; watch its traffic "
            f"with `aquameter check --listen SECONDS`",
            file=err,
        )
        return 2
    index, labels = registry_index(registry)
    sink = PrintingSink(validator_for(index, settings), labels, out)
    if dev.protocol == "modbus":
        problems = _poll_modbus(dev, registry, sink, err)
    else:
        problems = _poll_opcua(dev, registry, sink, err, connect_timeout_s)
    if problems is None:
        return 1
    print(sink.summary(), file=out)
    clean = not problems and not sink.rejected and sink.readings > 0
    return 0 if clean else 1


def _poll_modbus(
    dev: Device, registry: Registry, sink: PrintingSink, err: TextIO
) -> list[str] | None:
    from protocols.modbus import poll_once
    from protocols.modbus_decode import ModbusConfigError

    try:
        one = asyncio.run(poll_once(dev, registry))
    except ModbusConfigError as exc:
        print(f"check --poll: {exc}; run `aquameter check` for every problem", file=err)
        return None
    except ConnectionError as exc:
        print(f"check --poll: {exc}", file=err)
        return None
    problems = [f"not polled: {e}" for e in one.config_errors]
    for name in sorted(one.failed):
        problems.append(f"not read: device {dev.id} channel {name}")
    if one.exception_codes:
        codes = ", ".join(f"{c}: {n}" for c, n in sorted(one.exception_codes.items()))
        problems.append(f"device {dev.id} answered Modbus exceptions (code: count) {codes}")
    if one.uplinks:
        sink.submit(
            Frame(
                source="modbus",
                address=one.plan.address,
                device_hint=dev.id,
                uplinks=one.uplinks,
            ),
            lambda outcome: None,
        )
    for line in problems:
        print(line, file=err)
    return problems


def _poll_opcua(
    dev: Device, registry: Registry, sink: PrintingSink, err: TextIO, timeout_s: float
) -> list[str] | None:
    from protocols.opcua import ConfigError, device_config, read_once

    try:
        cfg, errors = device_config(dev, registry)
    except ConfigError as exc:
        print(f"check --poll: {exc}; run `aquameter check` for every problem", file=err)
        return None
    try:
        got = asyncio.run(
            asyncio.wait_for(read_once(cfg, connect_timeout_s=timeout_s), timeout_s * 2)
        )
    except (OSError, TimeoutError) as exc:
        why = f": {exc}" if str(exc) else ""
        print(
            f"check --poll: opcua {dev.id}: cannot reach {cfg.endpoint} "
            f"(connect timeout {timeout_s:g} s)"
            f"{why}",
            file=err,
        )
        return None
    except Exception as exc:  # the server answered but refused (session, security, login)
        print(
            f"check --poll: opcua {dev.id}: {cfg.endpoint} refused the session: "
            f"{type(exc).__name__}: {exc}",
            file=err,
        )
        return None
    problems = [f"not polled: {e}" for e in errors]
    for name, status in sorted(got.refused.items()):
        problems.append(f"not read: device {dev.id} channel {name}: {status}")
    for reason, n in sorted(got.skipped.items()):
        problems.append(f"device {dev.id}: {n} value(s) skipped ({reason})")
    if got.uplinks:
        sink.submit(
            Frame(
                source="opcua",
                address=cfg.endpoint,
                device_hint=dev.id,
                received_at=got.received_at,
                uplinks=got.uplinks,
            ),
            lambda outcome: None,
        )
    for line in problems:
        print(line, file=err)
    return problems


class CoapListener:
    """The CoAP uplink server on its own thread and loop for ``aquameter check --listen``.

    Only when the registry has CoAP devices and the port is free (a running ingest holds it: a
    meter's POST then goes to ingest, and there is no copy to listen to). Plain CoAP only: the
    DTLS keys stay unread. Every uplink is answered 5.00 by :class:`PrintingSink`, so a meter
    keeps its readings and sends them again to the real ingest."""

    def __init__(self, registry: Registry, sink: PrintingSink, settings: Settings) -> None:
        self.registry = registry
        self.sink = sink
        self.settings = settings
        self.devices = registry.devices_by_protocol("coap")
        self.started = threading.Event()
        self.stop = threading.Event()
        self.problem: str | None = None
        self.endpoint = f"coap://{settings.coap_host}:{settings.coap_port}/{settings.coap_path}"
        self._thread = threading.Thread(target=self._run, name="check-coap", daemon=True)

    @property
    def listening(self) -> bool:
        """True once the server is bound and answering."""
        return self.started.is_set() and self.problem is None

    def start(self, timeout_s: float) -> CoapListener:
        """Bind the server (bounded by ``timeout_s``); ``problem`` says why it did not."""
        if not self.devices:
            return self
        self._thread.start()
        if not self.started.wait(timeout_s):
            self.problem = f"not bound within {timeout_s:g} s"
        return self

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop serving and wait (bounded) for the thread."""
        self.stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        from protocols.coap import CoapIngest

        s = self.settings
        try:
            adapter = CoapIngest(
                self.devices,
                self.registry,
                self.sink,
                host=s.coap_host,
                port=s.coap_port,
                path=s.coap_path,
                dtls=False,
                max_payload_bytes=s.max_payload_bytes,
            )
            await adapter.start()
        except Exception as exc:  # port in use, a key file missing: one line, MQTT goes on
            self.problem = f"{type(exc).__name__}: {exc}"
            self.started.set()
            return
        self.started.set()
        try:
            while not self.stop.is_set():
                await asyncio.sleep(0.05)
        finally:
            await adapter.stop()


def run_listen(
    registry: Registry,
    seconds: float,
    settings: Settings,
    broker: tuple[str, bool] | None,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    connect_timeout_s: float = 10.0,
    ready: threading.Event | None = None,
    coap: bool = True,
) -> int:
    """Subscribe to the broker for ``seconds`` with ingest's topic layout and payload decoding,
    print every canonical reading and rejection, write nothing, then print the count summary.
    With ``coap`` and CoAP devices in the registry, the CoAP uplink server listens too when its
    port is free (see :class:`CoapListener`).

    ``broker`` is (url, speaks MQTT 5) as ``aquameter.runtime.known_broker`` finds it. Returns
    0 after a listen, 1 when the broker cannot be reached within ``connect_timeout_s``, 2 when
    no broker is configured. ``ready`` is set once everything listens (tests publish after)."""
    from ingest.service import mqtt_client, vendor_formats
    from protocols.mqtt import safe_url

    out = out or sys.stdout
    err = err or sys.stderr
    if broker is None:
        print("check --listen: no broker: set AQUAMETER_MQTT_URL (mqtt://host:port)", file=err)
        return 2
    url, v5 = broker
    index, labels = registry_index(registry)
    sink = PrintingSink(validator_for(index, settings), labels, out, refuse=("coap", "coaps"))
    # Our own subscription (no shared group) and a session that ends with the connection.
    mine = settings.model_copy(update={"mqtt_shared_group": None})
    client_id = f"aquameter-check-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    mqtt = mqtt_client(mine, vendor_formats(registry), sink, url, v5, client_id, persistent=False)
    coap_listener = CoapListener(registry, sink, settings)
    # The adapter logs every retry; here the one line below says it all, once.
    mqtt_log = logging.getLogger("aquameter.mqtt")
    level = mqtt_log.level
    mqtt_log.setLevel(logging.CRITICAL)
    try:
        mqtt.start(wait_s=0)
        deadline = time.monotonic() + connect_timeout_s
        while not mqtt.connected.is_set() and time.monotonic() < deadline:
            if mqtt.stats.connect_failures or mqtt.stats.refused:
                break  # refused or unreachable now: waiting for paho's retry shows nothing new
            time.sleep(0.05)
    finally:
        mqtt_log.setLevel(level)
    try:
        if not mqtt.connected.is_set():
            if mqtt.stats.refused:
                why = ": the broker refused the connection (login or ACL: see AQUAMETER_MQTT_*)"
            else:
                detail = mqtt.last_connect_error  # the one line names the cause
                why = f": {detail}" if detail else ""
            print(
                f"check --listen: cannot reach the MQTT broker {mqtt.host}:{mqtt.port} "
                f"({safe_url(url)}, connect timeout {connect_timeout_s:g} s){why}",
                file=err,
            )
            return 1
        where = [f"{mqtt.endpoint} to {', '.join(mqtt.subscriptions())}"]
        if coap and coap_listener.start(connect_timeout_s).devices:
            if coap_listener.listening:
                where.append(f"CoAP {coap_listener.endpoint} (answered 5.00: sent again later)")
            else:
                print(
                    f"check --listen: CoAP not listened on {coap_listener.endpoint}: "
                    f"{coap_listener.problem} (a running ingest holds the port: its meters "
                    f"post there)",
                    file=err,
                )
        print(f"listening on {' and '.join(where)} for {seconds:g} s; nothing is written", file=err)
        if ready is not None:
            ready.set()
        deadline = time.monotonic() + seconds
        try:
            while (left := deadline - time.monotonic()) > 0:
                time.sleep(min(left, 0.2))
        except KeyboardInterrupt:
            print("interrupted", file=err)
    finally:
        coap_listener.close()
        mqtt.shutdown(timeout_s=2.0)
    print(sink.summary(), file=out)
    return 0
