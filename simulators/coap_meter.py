"""CoAP NB-IoT meter clients: N meters POST their register reads to a CoAP uplink server.

Each meter sends ``uplinks_per_meter`` uplinks of ``readings_per_uplink`` interval reads in its
vendor's format (JSON, CBOR or ``binary-v1``; see :mod:`protocols.payloads`) with the matching
Content-Format, over plain CoAP or, when the meter has a key, over DTLS-PSK (identity = device id).
The register model is deliberately tiny and deterministic (a per-meter base and constant rate in
whole litres), so the ground truth is exact: every value survives JSON, CBOR and the litre-based
binary frame unchanged.

Injectable faults, each on distinct meters chosen with ``seed``:

* ``malformed``: the first uplink is corrupted (JSON/CBOR truncated, binary register flipped so the
  CRC fails); expected: 4.00 and one quarantine row.
* ``duplicate``: the first uplink is sent again as a new request (a meter that retries after a
  reboot); expected: 2.04 twice, stored once.
* ``lost_ack``: the meter talks through :class:`LossyUdpRelay`, which loses the first reply to every
  confirmable request, so the client retransmits the same message; expected: stored once.
* ``wrong_key``: a DTLS meter uses a wrong key; expected: the handshake is refused, nothing stored.

The returned manifest (JSON-safe) says what was produced, what was injected, the expected rows and
quarantine reasons, and what the server answered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
from aiocoap.credentials import DTLS
from aiocoap.numbers.constants import Reliable, Unreliable

from aquameter.registry import Registry, load_registry
from protocols.coap import FORMAT_CONTENT, psk_bytes
from protocols.payloads import BAD_CRC, MALFORMED, encode_binary_v1

TIMEOUT = "timeout"


@dataclass(frozen=True)
class SimMeter:
    device: str
    fmt: str = "json"
    serial: int | None = None
    psk: str | None = None


@dataclass
class CoapFaults:
    malformed: int = 0
    duplicate: int = 0
    lost_ack: int = 0
    wrong_key: int = 0


@dataclass
class CoapMeterParams:
    host: str = "127.0.0.1"
    port: int = 5683
    dtls_port: int | None = None  # default: port + 1 (where aiocoap serves coaps)
    path: str = "up"
    path_device: bool = False  # POST to /up/{device} and leave "dev" out of JSON/CBOR
    uplinks_per_meter: int = 1
    readings_per_uplink: int = 4
    step_s: int = 900
    t0: int | None = None  # first read; default: the last read is the last full step before now
    content_format: bool = True  # False: send no Content-Format and let the server sniff
    confirmable: bool = True
    concurrency: int = 16
    ack_timeout_s: float = 2.0
    request_timeout_s: float = 60.0
    dtls_timeout_s: float = 10.0  # a wrong key is never answered: give up after this
    seed: int = 1
    faults: CoapFaults = field(default_factory=CoapFaults)


# --- the register model and payloads (pure) --------------------------------------------------
def register_litres(meter_index: int, k: int) -> int:
    """Read ``k`` of meter ``meter_index``: a per-meter base plus a constant rate, in litres."""
    base = 10_000 * (meter_index + 1) + 137 * meter_index
    rate = 3 + (7 * meter_index) % 13  # litres per step
    return base + rate * k


def encode_uplink(
    meter: SimMeter, t0: int, step: int, litres: list[int], *, with_device: bool = True
) -> bytes:
    if meter.fmt == "binary-v1":
        if meter.serial is None:
            raise ValueError(f"{meter.device}: binary-v1 meters need a serial")
        return encode_binary_v1(meter.serial, t0, step, litres)
    doc: dict[str, Any] = {"dev": meter.device} if with_device else {}
    values = [v / 1000.0 for v in litres]
    if len(values) == 1:
        doc.update(ts=t0, reg=values[0], unit="m3")
    else:
        doc.update(t0=t0, step=step, reg=values, unit="m3")
    if meter.fmt == "json":
        return json.dumps(doc).encode()
    if meter.fmt == "cbor":
        return bytes(cbor2.dumps(doc))
    raise ValueError(f"{meter.device}: unknown format {meter.fmt!r}")


def corrupt(meter: SimMeter, payload: bytes) -> tuple[bytes, str]:
    """A broken copy of an uplink and the quarantine reason ingest will give it."""
    if meter.fmt == "binary-v1":
        broken = bytearray(payload)
        broken[13] ^= 0x5A  # first register byte: the CRC no longer matches
        return bytes(broken), BAD_CRC
    return payload[: max(1, len(payload) - 5)], MALFORMED


@dataclass
class _Send:
    meter: SimMeter
    index: int
    uplink: int
    payload: bytes
    readings: list[tuple[float, float]]
    expect: str  # "stored" or a quarantine reason or "refused"


def plan_uplinks(
    meters: Sequence[SimMeter], params: CoapMeterParams
) -> tuple[list[_Send], dict[str, list[dict[str, Any]]]]:
    """Every uplink to send (with faults applied) and the injected-fault record."""
    n_reads = params.uplinks_per_meter * params.readings_per_uplink
    step = params.step_s
    t0 = params.t0
    if t0 is None:
        t0 = (int(time.time()) // step - n_reads) * step
    rng = random.Random(params.seed)
    order = list(range(len(meters)))
    rng.shuffle(order)
    f = params.faults
    keyed = [i for i in order if meters[i].psk]
    plain = [i for i in order if not meters[i].psk]
    wrong_key = set(keyed[: f.wrong_key])
    lost_ack = set(plain[: f.lost_ack])
    rest = [i for i in order if i not in wrong_key and i not in lost_ack]
    malformed = set(rest[: f.malformed])
    duplicate = set(rest[f.malformed : f.malformed + f.duplicate])
    wanted = (f.wrong_key, f.lost_ack, f.malformed + f.duplicate)
    if (len(wrong_key), len(lost_ack), len(malformed) + len(duplicate)) != wanted:
        raise ValueError(f"not enough (keyed/plain) meters for faults {f}")
    sends: list[_Send] = []
    injected: dict[str, list[dict[str, Any]]] = {
        "malformed": [],
        "duplicate": [],
        "lost_ack": [],
        "wrong_key": [],
    }
    for i, meter in enumerate(meters):
        for u in range(params.uplinks_per_meter):
            ks = range(u * params.readings_per_uplink, (u + 1) * params.readings_per_uplink)
            litres = [register_litres(i, k) for k in ks]
            first = t0 + ks[0] * step
            payload = encode_uplink(meter, first, step, litres, with_device=not params.path_device)
            readings = [(float(first + j * step), v / 1000.0) for j, v in enumerate(litres)]
            expect = "refused" if i in wrong_key else "stored"
            if u == 0 and i in malformed:
                payload, expect = corrupt(meter, payload)
                injected["malformed"].append({"device": meter.device, "reason": expect})
            sends.append(_Send(meter, i, u, payload, readings, expect))
            if u == 0 and i in duplicate:
                sends.append(_Send(meter, i, u, payload, readings, "duplicate"))
                injected["duplicate"].append({"device": meter.device, "readings": len(readings)})
        if i in lost_ack:
            injected["lost_ack"].append({"device": meter.device})
        if i in wrong_key:
            injected["wrong_key"].append({"device": meter.device})
    return sends, injected


# --- a lossy link -----------------------------------------------------------------------------
class _Downstream(asyncio.DatagramProtocol):
    def __init__(self, relay: LossyUdpRelay) -> None:
        self.relay = relay

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        self.relay._from_client(data, addr)


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, relay: LossyUdpRelay, client: tuple[str, int]) -> None:
        self.relay = relay
        self.client = client

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        self.relay._from_server(data, self.client)


class LossyUdpRelay:
    """A UDP relay in front of a CoAP server that loses the first acknowledgement of every
    confirmable request (an NB-IoT downlink lost in the cell), so the client retransmits the same
    message and the server sees a duplicate. Counts what it forwarded, dropped and saw again;
    with ``lose_first_ack=False`` it only counts (e.g. the blocks of a block-wise upload)."""

    def __init__(
        self,
        target: tuple[str, int],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        lose_first_ack: bool = True,
    ) -> None:
        self.target = target
        self.host = host
        self.port = port
        self.lose_first_ack = lose_first_ack
        self.client_datagrams = 0
        self.client_requests = 0  # datagrams carrying a request (each block of a block-wise one)
        self.forwarded = 0
        self.dropped = 0
        self.retransmissions = 0
        self._listener: asyncio.DatagramTransport | None = None
        self._upstreams: dict[tuple[str, int], asyncio.DatagramTransport] = {}
        self._pending: dict[tuple[str, int], asyncio.Future[asyncio.DatagramTransport]] = {}
        self._seen: set[tuple[tuple[str, int], int]] = set()
        self._to_drop: set[tuple[tuple[str, int], int]] = set()

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Downstream(self), local_addr=(self.host, self.port)
        )
        self._listener = transport
        self.port = int(transport.get_extra_info("sockname")[1])
        return self.port

    async def stop(self) -> None:
        for up in self._upstreams.values():
            up.close()
        self._upstreams.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    async def __aenter__(self) -> LossyUdpRelay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _from_client(self, data: bytes, client: tuple[str, int]) -> None:
        self.client_datagrams += 1
        is_request = len(data) >= 4 and 1 <= data[1] <= 31
        self.client_requests += is_request
        if is_request and (data[0] >> 4) & 3 == 0:  # CON request
            key = (client, int.from_bytes(data[2:4], "big"))
            if key in self._seen:
                self.retransmissions += 1
            else:
                self._seen.add(key)
                if self.lose_first_ack:
                    self._to_drop.add(key)
        up = self._upstreams.get(client)
        if up is not None:
            self.forwarded += 1
            up.sendto(data)
            return
        asyncio.ensure_future(self._open_and_send(client, data))

    async def _open_and_send(self, client: tuple[str, int], data: bytes) -> None:
        pending = self._pending.get(client)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = loop.create_future()
            self._pending[client] = pending
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Upstream(self, client), remote_addr=self.target
            )
            self._upstreams[client] = transport
            pending.set_result(transport)
        up = await pending
        self.forwarded += 1
        up.sendto(data)

    def _from_server(self, data: bytes, client: tuple[str, int]) -> None:
        if len(data) >= 4 and (data[0] >> 4) & 3 == 2:  # ACK (empty or piggybacked)
            key = (client, int.from_bytes(data[2:4], "big"))
            if key in self._to_drop:
                self._to_drop.discard(key)
                self.dropped += 1
                return
        if self._listener is not None:
            self.forwarded += 1
            self._listener.sendto(data, client)


# --- sending ----------------------------------------------------------------------------------
def _tuning(params: CoapMeterParams) -> aiocoap.numbers.constants.TransportTuning:
    base = Reliable if params.confirmable else Unreliable
    return type("SimTuning", (base,), {"ACK_TIMEOUT": params.ack_timeout_s})()


async def _post(
    ctx: aiocoap.Context, uri: str, payload: bytes, cf: int | None, tuning: Any, timeout: float
) -> str:
    msg = aiocoap.Message(
        code=aiocoap.POST, uri=uri, payload=payload, content_format=cf, transport_tuning=tuning
    )
    try:
        response = await asyncio.wait_for(ctx.request(msg).response, timeout)
    except (TimeoutError, aiocoap.error.Error) as exc:
        return f"{TIMEOUT}: {type(exc).__name__}"
    return str(response.code)


async def simulate(meters: Sequence[SimMeter], params: CoapMeterParams) -> dict[str, Any]:
    """Send every meter's uplinks to the server and return the ground-truth manifest."""
    sends, injected = plan_uplinks(meters, params)
    lossy = {d["device"] for d in injected["lost_ack"]}
    wrong = {d["device"] for d in injected["wrong_key"]}
    dtls_port = params.dtls_port or params.port + 1
    path = params.path.strip("/")
    tuning = _tuning(params)
    results: list[tuple[_Send, str]] = []
    contexts: list[aiocoap.Context] = []
    relay: LossyUdpRelay | None = None
    sem = asyncio.Semaphore(params.concurrency)
    try:
        # aiocoap keeps one exchange in flight per remote (NSTART = 1), as a real meter does.
        # Plain meters share ``concurrency`` client endpoints (each its own source port), and a
        # meter holds its endpoint for its whole session: two uploads interleaved on one endpoint
        # would mix their Block1 blocks at the server.
        pool: asyncio.Queue[aiocoap.Context] = asyncio.Queue()
        for _ in range(max(1, min(params.concurrency, len(meters)))):
            ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
            contexts.append(ctx)
            pool.put_nowait(ctx)
        relay_port = params.port
        if lossy:
            relay = LossyUdpRelay((params.host, params.port), host=params.host)
            relay_port = await relay.start()

        async def session(
            ctx: aiocoap.Context, uri: str, meter: SimMeter, mine: list[_Send]
        ) -> None:
            cf = FORMAT_CONTENT[meter.fmt] if params.content_format else None
            timeout = params.dtls_timeout_s if meter.psk else params.request_timeout_s
            for send in mine:
                code = await _post(ctx, uri, send.payload, cf, tuning, timeout)
                results.append((send, code))
                if code.startswith(TIMEOUT) and meter.psk:
                    break  # the handshake failed: the meter gives up this session

        async def meter_task(meter: SimMeter, mine: list[_Send]) -> None:
            if meter.psk:
                base = f"coaps://{params.host}:{dtls_port}"
            elif meter.device in lossy:
                base = f"coap://{params.host}:{relay_port}"
            else:
                base = f"coap://{params.host}:{params.port}"
            uri = f"{base}/{path}/{meter.device}" if params.path_device else f"{base}/{path}"
            async with sem:
                if not meter.psk and meter.device not in lossy:
                    ctx = await pool.get()
                    try:
                        await session(ctx, uri, meter, mine)
                    finally:
                        pool.put_nowait(ctx)
                    return
                # its own endpoint: a DTLS session, or one behind the lossy relay
                transports = ["tinydtls"] if meter.psk else ["udp6"]
                ctx = await aiocoap.Context.create_client_context(transports=transports)
                contexts.append(ctx)
                if meter.psk:
                    key = psk_bytes(meter.psk)
                    if meter.device in wrong:
                        key = bytes(b ^ 0x55 for b in key)
                    ctx.client_credentials[f"{base}/*"] = DTLS(
                        psk=key, client_identity=meter.device.encode()
                    )
                await session(ctx, uri, meter, mine)

        by_meter: dict[str, list[_Send]] = {}
        for send in sends:
            by_meter.setdefault(send.meter.device, []).append(send)
        started = time.perf_counter()
        await asyncio.gather(*(meter_task(m, by_meter.get(m.device, [])) for m in meters))
        elapsed = time.perf_counter() - started
    finally:
        for ctx in contexts:
            await ctx.shutdown()
        if relay is not None:
            await relay.stop()
    manifest = _manifest(meters, params, sends, injected, results, relay)
    manifest["elapsed_s"] = round(elapsed, 4)
    return manifest


def _manifest(
    meters: Sequence[SimMeter],
    params: CoapMeterParams,
    sends: list[_Send],
    injected: dict[str, list[dict[str, Any]]],
    results: list[tuple[_Send, str]],
    relay: LossyUdpRelay | None,
) -> dict[str, Any]:
    rows = sorted(
        (s.meter.device, t, v) for s in sends if s.expect == "stored" for t, v in s.readings
    )
    quarantined = Counter(s.expect for s in sends if s.expect in (MALFORMED, BAD_CRC))
    responses = Counter(code for _, code in results)
    return {
        "simulator": "coap_meter",
        "target": {
            "coap": f"coap://{params.host}:{params.port}/{params.path.strip('/')}",
            "coaps_port": params.dtls_port or params.port + 1,
        },
        "params": asdict(params),
        "meters": [asdict(m) | {"psk": None, "dtls": m.psk is not None} for m in meters],
        "produced": {
            "uplinks": len({(s.meter.device, s.uplink) for s in sends}),
            "requests": len(sends),
            "readings": sum(len(s.readings) for s in sends if s.expect != "duplicate"),
        },
        "injected": injected,
        "expected": {
            "stored_readings": len(rows),
            "rows": [list(r) for r in rows],
            "quarantined": dict(quarantined),
            "duplicate_readings": sum(len(s.readings) for s in sends if s.expect == "duplicate"),
            "refused_uplinks": sum(1 for s in sends if s.expect == "refused"),
        },
        "responses": dict(responses),
        "sent": [
            {"device": s.meter.device, "uplink": s.uplink, "expect": s.expect, "response": code}
            for s, code in results
        ],
        "relay": None
        if relay is None
        else {
            "forwarded": relay.forwarded,
            "dropped": relay.dropped,
            "retransmissions": relay.retransmissions,
        },
    }


# --- meters from a registry and the command line ---------------------------------------------
def meters_from_registry(registry: Registry, limit: int | None = None) -> list[SimMeter]:
    """The registry's CoAP devices as simulated meters, in their vendor's payload format."""
    formats = {v.id: v.payload for v in registry.vendors}
    out = [
        SimMeter(device=d.id, fmt=formats[d.vendor], serial=d.serial, psk=d.resolve_psk())
        for d in registry.devices_by_protocol("coap")
    ]
    return out[:limit] if limit is not None else out


def synthetic_meters(
    count: int, id_format: str = "CM{:05d}", serial_start: int = 90_000_000
) -> list[SimMeter]:
    """Meters without a registry: JSON, CBOR and binary-v1 in turn."""
    fmts = ("json", "cbor", "binary-v1")
    return [
        SimMeter(id_format.format(i), fmts[(i - 1) % 3], serial_start + i)
        for i in range(1, count + 1)
    ]


def run(meters: Sequence[SimMeter], params: CoapMeterParams) -> dict[str, Any]:
    """Synchronous entry point (``aquameter simulate coap``)."""
    return asyncio.run(simulate(meters, params))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="coap_meter", description=__doc__.split("\n")[0])
    ap.add_argument("--registry", type=Path, help="registry TOML (its protocol=coap devices)")
    ap.add_argument("--meters", type=int, default=None, help="number of meters (default: all)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5683)
    ap.add_argument("--path", default="up")
    ap.add_argument("--path-device", action="store_true")
    ap.add_argument("--uplinks", type=int, default=1)
    ap.add_argument("--readings", type=int, default=4)
    ap.add_argument("--step", type=int, default=900)
    ap.add_argument("--no-content-format", action="store_true")
    ap.add_argument("--non", action="store_true", help="send non-confirmable uplinks")
    ap.add_argument("--malformed", type=int, default=0)
    ap.add_argument("--duplicate", type=int, default=0)
    ap.add_argument("--lost-ack", type=int, default=0)
    ap.add_argument("--wrong-key", type=int, default=0)
    ap.add_argument("--concurrency", type=int, default=16, help="client endpoints in parallel")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--manifest", type=Path, help="write the manifest JSON here")
    args = ap.parse_args(argv)
    if args.registry:
        meters = meters_from_registry(load_registry(args.registry), args.meters)
    else:
        meters = synthetic_meters(args.meters or 10)
    params = CoapMeterParams(
        host=args.host,
        port=args.port,
        path=args.path,
        path_device=args.path_device,
        uplinks_per_meter=args.uplinks,
        readings_per_uplink=args.readings,
        step_s=args.step,
        content_format=not args.no_content_format,
        confirmable=not args.non,
        concurrency=args.concurrency,
        seed=args.seed,
        faults=CoapFaults(args.malformed, args.duplicate, args.lost_ack, args.wrong_key),
    )
    manifest = run(meters, params)
    if args.manifest:
        args.manifest.write_text(json.dumps(manifest, indent=1))
    summary = {k: manifest[k] for k in ("produced", "responses", "relay", "elapsed_s")}
    summary["expected"] = {k: v for k, v in manifest["expected"].items() if k != "rows"}
    json.dump(summary, sys.stdout, indent=1)
    print()
    return manifest


if __name__ == "__main__":
    main()
