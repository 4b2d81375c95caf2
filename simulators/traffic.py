"""Simulated readings as MQTT traffic: topics, encoded payloads, and transport faults.

Topic scheme (the MQTT ingest adapter subscribes to the same; ``root`` defaults to
``Settings.mqtt_topic_root`` = ``aquameter/v1``)::

    {root}/{vendor}/{device_id}/up          one device's uplink
    {root}/{vendor}/gw/{gateway_id}/batch   a concentrator's batch of its meters' uplinks

The vendor segment names the registry vendor, whose ``payload`` format says how to decode:

* ``json``  ``{"dev": id, "t0": epoch_s, "step": 900, "reg": [m³ with ≤ 3 decimals], "unit": "m3"}``
  plus ``"status": int`` (``protocols.uplink.Quality`` vendor bits) when any bit is set;
* ``cbor``  the same object in CBOR;
* ``binary-v1``  ``protocols.payloads.encode_binary_v1(serial, t0, step, litres, status)``: the
  frame names the meter by serial only (``serial:N``), so ``device.serial`` must be set;
* ``senml-json`` / ``senml-cbor``  an LwM2M water meter's SenML pack (RFC 8428) on its device
  topic: base time ``bt`` = first read, ``t`` offsets, resource ``/3424/0/1`` (the register, m3),
  status flags as the object's boolean resources (10 leak, 11 reverse flow, 13 tamper);
* ``wmbus`` / ``wmbus-hex``  wireless M-Bus/OMS meters heard by a gateway: one encrypted mode 5
  telegram per read (``protocols.wmbus.encode_wmbus``, volume in litres, the read's time as the
  date/time record, low battery as the power-low status bit), several meters' telegrams per
  message on the gateway's batch topic, binary back to back or hex one per line. Each meter's
  AES key is :func:`wmbus_key` (seeded, never in the registry): :func:`write_wmbus_keys` writes
  the key file ingest reads (``AQUAMETER_WMBUS_KEYS_FILE``);
* ``cjt188`` meters are not on MQTT: their DTUs push frames over TCP (``simulators.dtu``);
* concentrator batches of JSON/CBOR meters are JSON: ``{"gw": id, "readings": [<json objects>]}``;
* DMA instruments: ``{"dev": id, "ch": "flow", "t0": …, "step": …, "v": [...], "unit": "L/s"}``,
  values in the channel's configured unit (``unit`` of the registry channel).

NB-IoT meters log every interval but transmit a few times a day to save battery: by default 4
uplinks a day, so 24 reads per uplink (``reads_per_message`` overrides, e.g. 1 or 96 for
benchmarks). An uplink never spans a gap or a change of status bits: those start a new object,
because a ``t0``/``step`` list cannot express either. Meters with a gateway whose vendor speaks
JSON/CBOR are read through their concentrator (``concentrators=True``); binary-frame meters
always send their own frames.

Transport faults are injected on top and counted in :class:`TrafficCounts` (the manifest's
``traffic`` section): malformed frames (garbage, truncated JSON, binary frames with a bad CRC),
exact duplicate publishes, out-of-order delivery (shuffles within a window) and late delivery (a
``COMMS_LOSS`` with ``delivery="late"``: the gap's reads arrive when the gap ends).
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import cbor2
import msgspec
import numpy as np
import polars as pl

from aquameter.registry import Device, Registry
from protocols.payloads import BAD_CRC, MALFORMED, encode_binary_v1
from protocols.uplink import Quality, wall_clock_to_utc
from protocols.wmbus import KEYS_FILE_ENV, encode_wmbus
from simulators.fleet import FleetData, customer_meters, meter_id_of

DEFAULT_ROOT = "aquameter/v1"
_json = msgspec.json.Encoder()


def device_topic(root: str, vendor: str, device_id: str) -> str:
    """Topic of one device's uplinks; the vendor segment tells ingest the payload format."""
    return f"{root}/{vendor}/{device_id}/up"


def batch_topic(root: str, vendor: str, gateway_id: str) -> str:
    """Topic of a concentrator's batches (always JSON, each reading names its device)."""
    return f"{root}/{vendor}/gw/{gateway_id}/batch"


@dataclass(frozen=True, slots=True)
class Publish:
    """One MQTT publish. ``readings`` counts the readings inside (0 for a malformed frame);
    ``kind`` is data | late | duplicate | malformed, so tests can reconcile what arrives."""

    topic: str
    payload: bytes
    qos: int = 1
    readings: int = 0
    kind: str = "data"


@dataclass(frozen=True)
class TrafficParams:
    """How the fleet talks. Transport-fault knobs default to off."""

    root: str = DEFAULT_ROOT
    qos: int = 1
    uplinks_per_day: int = 4
    reads_per_message: int | None = None  # overrides uplinks_per_day
    inlet_reads_per_message: int = 4  # DMA loggers send hourly at 15-minute logging
    concentrators: bool = True
    max_batch_readings: int = 5000  # split big concentrator batches (MQTT packet size)
    max_telegrams: int = 50  # wM-Bus telegrams per gateway message
    key_seed: int = 0  # per-meter wM-Bus keys: wmbus_key(meter_id, key_seed)
    uplink_jitter_s: float = 600.0  # meters do not all send at the same second
    seed: int = 0
    malformed: int = 0
    duplicate_fraction: float = 0.0
    reorder_window: int = 0  # 0: no shuffling; else shuffle each window of this many publishes


@dataclass
class TrafficCounts:
    """What the traffic holds, to reconcile against what ingest stored and quarantined.

    ``unique_readings`` is the number of rows ingest should store once (duplicates and
    redeliveries collapse); ``expected_quarantine`` maps reason codes to malformed frames.
    """

    messages: int = 0
    data_messages: int = 0
    readings: int = 0
    unique_readings: int = 0
    meter_readings: int = 0
    inlet_readings: int = 0
    duplicates: int = 0
    duplicate_readings: int = 0
    malformed: int = 0
    expected_quarantine: dict[str, int] = field(default_factory=dict)
    reordered: int = 0
    late_messages: int = 0
    late_readings: int = 0
    bytes: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    by_format: dict[str, int] = field(default_factory=dict)  # meter readings per payload format

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Traffic:
    publishes: list[Publish]
    counts: TrafficCounts
    params: TrafficParams

    def __iter__(self) -> Iterator[Publish]:
        return iter(self.publishes)

    def __len__(self) -> int:
        return len(self.publishes)

    def manifest(self) -> dict[str, Any]:
        """Counts plus the parameters that produced them, so a failed reconciliation can be
        replayed."""
        p = asdict(self.params)
        return {"params": p, **self.counts.to_json()}


def with_traffic(manifest: Mapping[str, Any], traffic: Traffic) -> dict[str, Any]:
    """The fleet manifest with a ``traffic`` section: the truth for ingest tests."""
    return dict(manifest) | {"traffic": traffic.manifest()}


@dataclass(frozen=True)
class _Route:
    device: Device
    fmt: str
    topic: str
    gateway_topic: str | None
    clock: tzinfo | None = None  # the meter's own clock zone (wM-Bus telegrams carry its time)


WMBUS_FORMATS = ("wmbus", "wmbus-hex")
SENML_FORMATS = ("senml-json", "senml-cbor")


def wmbus_key(meter_id: str, seed: int = 0) -> bytes:
    """The simulated AES-128 key of a wM-Bus meter: derived from its id and a seed, so the
    simulator and the key file agree without the key ever entering the registry."""
    return hashlib.sha256(f"aquameter-sim-wmbus:{seed}:{meter_id}".encode()).digest()[:16]


def wmbus_meters(registry: Registry) -> list[Device]:
    """Customer meters whose vendor speaks wireless M-Bus."""
    return [
        d
        for d, _ in customer_meters(registry)
        if registry.vendor(d.vendor).payload in WMBUS_FORMATS
    ]


def write_wmbus_keys(path: Path, registry: Registry, seed: int = 0) -> Path:
    """Write the key file of every wM-Bus meter (``<8-digit id> <32 hex>`` a line, mode 0600)
    for ingest's ``AQUAMETER_WMBUS_KEYS_FILE``: keys come from a file, never the database."""
    lines = [
        f"{d.serial:08d} {wmbus_key(f'{d.serial:08d}', seed).hex()}"
        for d in wmbus_meters(registry)
        if d.serial is not None
    ]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


WMBUS_KEYS_FILE_ENV = KEYS_FILE_ENV


def _routes(registry: Registry, params: TrafficParams) -> dict[str, _Route]:
    routes: dict[str, _Route] = {}
    for dev, _ in customer_meters(registry):
        if dev.protocol != "mqtt":
            continue
        fmt = registry.vendor(dev.vendor).payload
        if fmt == "cjt188":  # DTUs push these over TCP (simulators.dtu)
            continue
        if fmt in ("binary-v1", *WMBUS_FORMATS) and dev.serial is None:
            raise ValueError(f"{dev.id}: {fmt} meters need a serial")
        gw = None
        if params.concentrators and dev.gateway and fmt in ("json", "cbor"):
            gw = batch_topic(params.root, dev.vendor, dev.gateway)
        elif fmt in WMBUS_FORMATS:  # radio meters reach MQTT only through a gateway
            gw = batch_topic(params.root, dev.vendor, dev.gateway or f"WMB-{dev.dma}")
        routes[meter_id_of(dev)] = _Route(
            dev,
            fmt,
            device_topic(params.root, dev.vendor, dev.id),
            gw,
            ZoneInfo(registry.clock_zone(dev)) if fmt in WMBUS_FORMATS else None,
        )
    return routes


def _encode(fmt: str, obj: dict[str, Any]) -> bytes:
    return cbor2.dumps(obj) if fmt == "cbor" else _json.encode(obj)


# SenML labels as CBOR keys (RFC 8428 table 4) and LwM2M object 3424's status resources.
_SENML_CBOR = {"bn": -2, "bt": -3, "n": 0, "u": 1, "v": 2, "vb": 4, "t": 6}
_SENML_FLAGS = ((Quality.LEAK, "10"), (Quality.REVERSE_FLOW, "11"), (Quality.TAMPER, "13"))


def encode_senml_uplink(
    t_first: int, step: int, reg_m3: Sequence[float], status: int, *, cbor: bool = False
) -> bytes:
    """One LwM2M water meter uplink as a SenML pack: the register reads under ``/3424/0/1``
    (base time + offsets), set status flags as boolean resources at the first read's time."""
    pack: list[dict[str, Any]] = []
    for i, v in enumerate(reg_m3):
        rec: dict[str, Any] = {"n": "1", "t": i * step, "v": v, "u": "m3"}
        if i == 0:
            rec = {"bn": "/3424/0/", "bt": t_first} | rec
        pack.append(rec)
    pack += [{"n": res, "vb": True} for flag, res in _SENML_FLAGS if status & int(flag)]
    if cbor:
        return cbor2.dumps([{_SENML_CBOR[k]: v for k, v in r.items()} for r in pack])
    return _json.encode(pack)


def build_traffic(
    fleet: FleetData, registry: Registry, params: TrafficParams | None = None
) -> Traffic:
    """All publishes for the fleet's window, in delivery order, with transport faults applied."""
    params = params or TrafficParams()
    step = fleet.interval_s
    per_day = 86400 // step
    rpm = params.reads_per_message or max(1, per_day // max(1, params.uplinks_per_day))
    routes = _routes(registry, params)
    if rpm > 255 and any(r.fmt == "binary-v1" for r in routes.values()):
        raise ValueError("binary-v1 carries at most 255 reads per frame")
    rng = np.random.default_rng(np.random.SeedSequence([params.seed, 0x7AFF1C]))
    counts = TrafficCounts()
    timed: list[tuple[float, int, Publish]] = []

    _meter_messages(fleet, routes, params, rpm, rng, counts, timed)
    _inlet_messages(fleet, registry, params, rng, counts, timed)
    counts.unique_readings = counts.meter_readings + counts.inlet_readings
    _duplicates(params, rng, counts, timed)
    _malformed(params, routes, rng, counts, timed)
    timed.sort(key=lambda x: (x[0], x[1]))
    publishes = [p for _, _, p in timed]
    if params.reorder_window > 1:
        publishes, counts.reordered = _reorder(publishes, params.reorder_window, rng)
    counts.messages = len(publishes)
    counts.bytes = sum(len(p.payload) for p in publishes)
    counts.readings = sum(p.readings for p in publishes)
    kinds = Counter(p.kind for p in publishes)
    counts.by_kind = dict(sorted(kinds.items()))
    counts.data_messages = kinds.get("data", 0) + kinds.get("late", 0)
    return Traffic(publishes, counts, params)


def _meter_messages(
    fleet: FleetData,
    routes: Mapping[str, _Route],
    params: TrafficParams,
    rpm: int,
    rng: np.random.Generator,
    counts: TrafficCounts,
    timed: list[tuple[float, int, Publish]],
) -> None:
    """Cut each meter's reads into uplinks and encode them (concentrator meters into batches)."""
    ids = list(routes)
    reads = fleet.reads
    if reads.is_empty() or not ids:
        return
    t0 = fleet.start.timestamp()
    step = fleet.interval_s
    # Meter ids to positions through an Enum cast: a hash lookup per distinct id, not per row.
    all_ids = reads["meter_id"].unique(maintain_order=True).to_list()
    known = set(ids)
    enum = pl.Enum(ids + [i for i in all_ids if i not in known])
    frame = reads.select(
        m=pl.col("meter_id").cast(enum).to_physical().cast(pl.Int64),
        k=(pl.col("ts").dt.epoch("us") - int(t0 * 1e6)) // (step * 1_000_000),
        reg=(pl.col("register") * 1000.0).round(0).cast(pl.Int64),
        q=pl.col("quality").cast(pl.Int64),
    ).filter(pl.col("m") < len(ids))
    m = frame["m"].to_numpy()
    k = frame["k"].to_numpy()
    reg = frame["reg"].to_numpy()
    q = frame["q"].to_numpy()
    in_order = (m[1:] > m[:-1]) | ((m[1:] == m[:-1]) & (k[1:] > k[:-1]))
    if not in_order.all():
        order = np.lexsort((k, m))
        m, k, reg, q = m[order], k[order], reg[order], q[order]
    deliver = np.full(len(m), -1.0)
    late = fleet.late.filter(pl.col("meter_id").is_in(ids))
    if not late.is_empty():
        width = int(k.max()) + 2
        key = m * width + k
        lm = late["meter_id"].cast(enum).to_physical().cast(pl.Int64).to_numpy()
        lk = (late["ts"].dt.epoch("us").to_numpy() - int(t0 * 1e6)) // (step * 1_000_000)
        at = np.searchsorted(key, lm * width + lk)
        found = (at < len(key)) & (key[np.minimum(at, len(key) - 1)] == lm * width + lk)
        deliver[at[found]] = late["deliver_at"].dt.epoch("us").to_numpy()[found] / 1e6
    slot = k // rpm
    brk = np.ones(len(m), dtype=bool)
    brk[1:] = (
        (m[1:] != m[:-1])
        | (slot[1:] != slot[:-1])
        | (k[1:] != k[:-1] + 1)
        | (q[1:] != q[:-1])
        | (deliver[1:] != deliver[:-1])
    )
    starts_a = np.flatnonzero(brk)
    ends_a = np.append(starts_a[1:], len(m))
    jitter = rng.uniform(0.0, params.uplink_jitter_s, len(ids)).tolist()
    gw_jitter: dict[str, float] = {}
    batches: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    batch_late: dict[tuple[str, float], bool] = {}
    seq = len(timed)
    reg_m3 = reg / 1000.0
    keys: dict[str, bytes] = {}
    telegrams: dict[tuple[str, float], list[bytes]] = {}
    by_format: Counter[str] = Counter()
    route_list = [routes[i] for i in ids]
    hex_vendors = {r.device.vendor for r in route_list if r.fmt == "wmbus-hex"}
    t0i = int(t0)
    qos = params.qos
    for a, b, mi, ka, kl, qa, da, sa in zip(
        starts_a.tolist(),
        ends_a.tolist(),
        m[starts_a].tolist(),
        k[starts_a].tolist(),
        k[ends_a - 1].tolist(),
        q[starts_a].tolist(),
        deliver[starts_a].tolist(),
        slot[starts_a].tolist(),
        strict=True,
    ):
        route = route_list[mi]
        n = b - a
        t_first = t0i + ka * step
        status = qa & 0xFF
        is_late = da >= 0
        counts.meter_readings += n
        if is_late:
            counts.late_readings += n
        if route.fmt in WMBUS_FORMATS:
            assert route.device.serial is not None and route.gateway_topic is not None
            # A binary gateway forwards what the radio received (format A CRC blocks kept),
            # a hex gateway has checked and stripped them: never both in one message.
            with_crc = route.fmt == "wmbus"
            ident = f"{route.device.serial:08d}"
            key = keys.get(ident)
            if key is None:
                key = keys[ident] = wmbus_key(ident, params.key_seed)
            low = 0x04 if status & int(Quality.LOW_BATTERY) else 0
            when = da if is_late else float(t0i + (sa + 1) * rpm * step)
            key2 = (route.gateway_topic, when)
            tgs = telegrams.setdefault(key2, [])
            for j in range(a, b):
                t_read = t0i + int(k[j]) * step
                tgs.append(
                    encode_wmbus(
                        ident, float(reg_m3[j]), key=key, meter_time=t_read,
                        clock=route.clock, access_number=int(k[j]) & 0xFF, status=low,
                        crc=with_crc,
                    )
                )  # fmt: skip
            batch_late[key2] = batch_late.get(key2, False) or is_late
            by_format[route.fmt] += n
            continue
        by_format[route.fmt] += n
        if route.fmt in SENML_FORMATS:
            payload = encode_senml_uplink(
                t_first, step, reg_m3[a:b].tolist(), status, cbor=route.fmt == "senml-cbor"
            )
        elif route.fmt == "binary-v1" and route.gateway_topic is None:
            assert route.device.serial is not None
            try:
                payload = encode_binary_v1(
                    route.device.serial, t_first, step, reg[a:b].tolist(), status
                )
            except struct.error as exc:  # a register beyond u32 litres: a registry mistake
                raise ValueError(
                    f"{route.device.id}: register does not fit binary-v1 (u32 litres)"
                ) from exc
        else:
            obj: dict[str, Any] = {
                "dev": route.device.id,
                "t0": t_first,
                "step": step,
                "reg": reg_m3[a:b].tolist(),
                "unit": "m3",
            }
            if status:
                obj["status"] = status
            if route.gateway_topic is not None:
                # A concentrator sends once per slot; a late backlog goes in a batch of its own
                # at its delivery time.
                when = da if is_late else float(t0i + (sa + 1) * rpm * step)
                key2 = (route.gateway_topic, when)
                batches[key2].append(obj)
                batch_late[key2] = batch_late.get(key2, False) or is_late
                continue
            payload = _encode(route.fmt, obj)
        send = (da if is_late else float(t0i + kl * step)) + jitter[mi]
        counts.late_messages += int(is_late)
        timed.append(
            (send, seq, Publish(route.topic, payload, qos, n, "late" if is_late else "data"))
        )
        seq += 1
    for (topic, when), tgs in telegrams.items():
        hex_text = topic.split("/")[-4] in hex_vendors
        gw = topic.rsplit("/", 2)[-2]
        if gw not in gw_jitter:
            gw_jitter[gw] = float(rng.uniform(0.0, params.uplink_jitter_s))
        kind = "late" if batch_late[(topic, when)] else "data"
        for i in range(0, len(tgs), max(1, params.max_telegrams)):
            part = tgs[i : i + max(1, params.max_telegrams)]
            payload = b"\n".join(t.hex().encode() for t in part) if hex_text else b"".join(part)
            counts.late_messages += int(kind == "late")
            timed.append(
                (when + gw_jitter[gw], seq, Publish(topic, payload, params.qos, len(part), kind))
            )
            seq += 1
    counts.by_format = dict(sorted(by_format.items()))
    for (topic, when), objs in batches.items():
        gw = topic.rsplit("/", 2)[-2]
        if gw not in gw_jitter:
            gw_jitter[gw] = float(rng.uniform(0.0, params.uplink_jitter_s))
        kind = "late" if batch_late[(topic, when)] else "data"
        for chunk in _chunks(objs, params.max_batch_readings):
            n = sum(len(o["reg"]) for o in chunk)
            payload = _json.encode({"gw": gw, "readings": chunk})
            counts.late_messages += int(kind == "late")
            timed.append((when + gw_jitter[gw], seq, Publish(topic, payload, params.qos, n, kind)))
            seq += 1


def _chunks(objs: list[dict[str, Any]], max_readings: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    size = 0
    for o in objs:
        n = len(o["reg"])
        if chunk and size + n > max_readings:
            yield chunk
            chunk, size = [], 0
        chunk.append(o)
        size += n
    if chunk:
        yield chunk


def _inlet_messages(
    fleet: FleetData,
    registry: Registry,
    params: TrafficParams,
    rng: np.random.Generator,
    counts: TrafficCounts,
    timed: list[tuple[float, int, Publish]],
) -> None:
    """DMA instruments: one message per channel and logger upload."""
    if fleet.inlet_values.is_empty():
        return
    devices = {d.id: d for d in registry.all_devices()}
    step = fleet.interval_s
    rpm = max(1, params.inlet_reads_per_message)
    seq = len(timed) + 10_000_000
    for (dev_id, channel, unit), part in fleet.inlet_values.group_by(
        ["device_id", "channel", "unit"], maintain_order=True
    ):
        dev = devices[str(dev_id)]
        if dev.protocol != "mqtt":
            continue
        topic = device_topic(params.root, dev.vendor, dev.id)
        ts = part["ts"].dt.epoch("s").to_numpy()
        values = part["value"].to_numpy()
        offset = float(rng.uniform(0.0, 60.0))
        for a in range(0, len(ts), rpm):
            b = min(a + rpm, len(ts))
            obj = {
                "dev": dev.id,
                "ch": channel,
                "t0": int(ts[a]),
                "step": step,
                "v": values[a:b].tolist(),
                "unit": unit,
            }
            counts.inlet_readings += b - a
            timed.append(
                (
                    float(ts[b - 1]) + step + offset,  # ts labels the slot start: send after it
                    seq,
                    Publish(topic, _json.encode(obj), params.qos, b - a, "data"),
                )
            )
            seq += 1


def _duplicates(
    params: TrafficParams,
    rng: np.random.Generator,
    counts: TrafficCounts,
    timed: list[tuple[float, int, Publish]],
) -> None:
    """Exact re-sends (a device that missed its PUBACK), shortly after the original."""
    n = int(round(params.duplicate_fraction * len(timed)))
    if n <= 0 or not timed:
        return
    picks = rng.choice(len(timed), size=min(n, len(timed)), replace=False)
    seq = max(s for _, s, _ in timed) + 1
    for i in sorted(picks.tolist()):
        send, _, pub = timed[i]
        dup = Publish(pub.topic, pub.payload, pub.qos, pub.readings, "duplicate")
        timed.append((send + float(rng.uniform(1.0, 120.0)), seq, dup))
        seq += 1
        counts.duplicates += 1
        counts.duplicate_readings += pub.readings


def _malformed(
    params: TrafficParams,
    routes: Mapping[str, _Route],
    rng: np.random.Generator,
    counts: TrafficCounts,
    timed: list[tuple[float, int, Publish]],
) -> None:
    """Broken frames on real device topics, each with the quarantine reason it must get."""
    if params.malformed <= 0 or not timed:
        return
    json_routes = [r for r in routes.values() if r.fmt == "json"]
    bin_routes = [r for r in routes.values() if r.fmt == "binary-v1"]
    json_payloads = [p for _, _, p in timed if p.payload[:1] == b"{"]
    kinds = ["garbage"]
    if json_payloads:
        kinds.append("truncated_json")
    if bin_routes:
        kinds.append("bad_crc")
    lo = min(t for t, _, _ in timed)
    hi = max(t for t, _, _ in timed)
    seq = max(s for _, s, _ in timed) + 1
    reasons: Counter[str] = Counter()
    for i in range(params.malformed):
        kind = kinds[i % len(kinds)]
        if kind == "garbage":
            pool = list(routes.values())
            route = pool[int(rng.integers(len(pool)))] if pool else None
            noise = rng.integers(0, 256, int(rng.integers(4, 40)), dtype=np.uint8).tobytes()
            if route is not None and route.fmt == "binary-v1":
                # Version byte right, length wrong: a torn radio frame.
                topic, payload = route.topic, b"\x01" + noise[:12]
            else:
                topic = route.topic if route is not None else device_topic(params.root, "x", "x")
                payload = b"{\x00" + noise
            reasons[MALFORMED] += 1
        elif kind == "truncated_json":
            src = json_payloads[int(rng.integers(len(json_payloads)))]
            cut = max(1, int(len(src.payload) * float(rng.uniform(0.2, 0.9))))
            payload = src.payload[:cut]
            topic = (
                json_routes[int(rng.integers(len(json_routes)))].topic
                if json_routes
                else device_topic(params.root, "x", "x")
            )
            reasons[MALFORMED] += 1
        else:
            route = bin_routes[int(rng.integers(len(bin_routes)))]
            assert route.device.serial is not None
            good = encode_binary_v1(route.device.serial, 1_700_000_000, 900, [1000, 1001], 0)
            payload = good[:-2] + bytes([good[-2] ^ 0xFF, good[-1] ^ 0x5A])
            topic = route.topic
            reasons[BAD_CRC] += 1
        timed.append(
            (float(rng.uniform(lo, hi)), seq, Publish(topic, payload, params.qos, 0, "malformed"))
        )
        seq += 1
        counts.malformed += 1
    counts.expected_quarantine = dict(sorted(reasons.items()))


def _reorder(
    publishes: Sequence[Publish], window: int, rng: np.random.Generator
) -> tuple[list[Publish], int]:
    """Shuffle within consecutive windows: what a broker bridge or a multipath network does."""
    order = np.arange(len(publishes))
    for a in range(0, len(order), window):
        rng.shuffle(order[a : a + window])
    moved = int((order != np.arange(len(order))).sum())
    return [publishes[i] for i in order.tolist()], moved


def decode_publish(pub: Publish, registry: Registry, root: str = DEFAULT_ROOT) -> list[Any]:
    """Decode a publish the way the ingest adapter does (format from the topic's vendor), for
    tests and debugging. Raises ``PayloadError`` for malformed frames."""
    from protocols.payloads import decode

    parts = pub.topic[len(root) + 1 :].split("/")
    vendor = registry.vendor(parts[0])
    if parts[1] == "gw":
        ups = decode(pub.payload, vendor.payload if vendor.payload in WMBUS_FORMATS else "json")
    else:
        ups = decode(pub.payload, vendor.payload, default_device=parts[1])
    by_serial: dict[str, Device] | None = None
    for up in ups:
        if up.local_clock:  # the meter's wall clock: read in its zone, as ingest does
            if by_serial is None:
                by_serial = {f"serial:{d.serial}": d for d in registry.all_devices() if d.serial}
            dev = by_serial.get(up.device)
            if dev is not None:
                up.ts = wall_clock_to_utc(up.ts, registry.clock_zone(dev), up.clock_summer)
                up.local_clock = False
    return ups
