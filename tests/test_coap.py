"""CoAP uplinks → ingest → PostgreSQL, over real UDP sockets on 127.0.0.1.

Peers: aiocoap clients (our simulator), and Debian libcoap3-bin's ``coap-client-notls`` /
``coap-client-openssl`` as the independent implementation (plain, block-wise and DTLS-PSK).
Regression cases live in ``tests/cases/coap/<case>/case.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import shutil
import socket
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
import psycopg
import pytest
from aiocoap.credentials import DTLS
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption

from aquameter.embedded import free_port
from aquameter.registry import Registry, load_registry
from ingest.pipeline import IngestPipeline
from ingest.registry_sync import sync_registry
from protocols.coap import (
    UNAUTHENTICATED,
    Authorisation,
    CoapIngest,
    HandshakeWatch,
    dtls_available,
    payload_format,
    psk_bytes,
    response_for,
)
from protocols.payloads import decode, encode_binary_v1
from protocols.uplink import FrameOutcome, Uplink
from simulators.coap_meter import (
    CoapFaults,
    CoapMeterParams,
    LossyUdpRelay,
    SimMeter,
    encode_uplink,
    meters_from_registry,
    plan_uplinks,
    simulate,
)
from sql.migrate import migrate

CASES = Path(__file__).parent / "cases" / "coap"
REGISTRY_PATH = CASES / "registry.toml"
T0 = 1767225600  # 2026-01-01T00:00Z
DTLS_MISSING = dtls_available()
NOTLS = shutil.which("coap-client-notls")
OPENSSL = shutil.which("coap-client-openssl")
NO_LIBCOAP = "Debian libcoap3-bin (coap-client-notls) is not installed"

ROWS_SQL = (
    "SELECT c.device_id, extract(epoch FROM r.ts)::float8, r.value FROM readings r "
    "JOIN channels c ON c.id = r.channel_id ORDER BY 1, 2"
)


# --- fixtures and helpers ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry(REGISTRY_PATH)


@pytest.fixture
def coap_db(empty_db_url: str, registry: Registry) -> str:
    with psycopg.connect(empty_db_url) as conn:
        migrate(conn, partitions_ahead=1)
        sync_registry(conn, registry)
        conn.commit()
    return empty_db_url


def udp_port_pair() -> int:
    """A port p with p and p + 1 free for UDP on 127.0.0.1 (aiocoap serves DTLS on p + 1)."""
    for _ in range(50):
        port = free_port()
        try:
            with (
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a,
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b,
            ):
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free UDP port pair")


@contextlib.asynccontextmanager
async def serving(
    db_url: str, registry: Registry, **options: Any
) -> AsyncIterator[tuple[CoapIngest, IngestPipeline]]:
    pipeline = IngestPipeline(db_url, batch_seconds=0.05).start()
    server = CoapIngest(
        registry.devices_by_protocol("coap"), registry, pipeline, port=udp_port_pair(), **options
    )
    task = asyncio.create_task(server.run())
    ready = asyncio.create_task(server.ready.wait())
    try:
        await asyncio.wait({task, ready}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # raises why the server did not start
        assert server.ready.is_set(), "CoAP server did not start"
        yield server, pipeline
    finally:
        ready.cancel()
        task.cancel()
        await asyncio.gather(task, ready, return_exceptions=True)
        await asyncio.to_thread(pipeline.close)


@contextlib.asynccontextmanager
async def client(transports: list[str] | None = None) -> AsyncIterator[aiocoap.Context]:
    ctx = await aiocoap.Context.create_client_context(transports=transports or ["udp6"])
    try:
        yield ctx
    finally:
        await ctx.shutdown()


async def request(
    ctx: aiocoap.Context,
    uri: str,
    payload: bytes,
    content_format: int | None = None,
    method: Code = Code.POST,
    timeout: float = 20.0,
) -> aiocoap.Message:
    msg = aiocoap.Message(code=method, uri=uri, payload=payload, content_format=content_format)
    return await asyncio.wait_for(ctx.request(msg).response, timeout)


def rows(db_url: str) -> list[tuple[str, float, float]]:
    with psycopg.connect(db_url) as conn:
        return [(d, float(t), float(v)) for d, t, v in conn.execute(ROWS_SQL).fetchall()]


def quarantine(db_url: str) -> list[tuple[str, str | None, str]]:
    with psycopg.connect(db_url) as conn:
        got = conn.execute("SELECT reason, device_id, source FROM quarantine ORDER BY id")
        return [(r, d, s) for r, d, s in got.fetchall()]


def assert_rows(got: list[tuple[str, float, float]], expected: list[list[Any]]) -> None:
    assert len(got) == len(expected), (got, expected)
    for (dev, ts, value), (edev, ets, evalue) in zip(
        got, sorted(map(tuple, expected)), strict=True
    ):
        assert (dev, ts) == (edev, float(ets))
        assert math.isclose(value, evalue, rel_tol=1e-12, abs_tol=1e-12), (dev, ts, value, evalue)


async def libcoap(*args: str, timeout: float = 40.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


async def eventually(check: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.05)


# --- pure parts -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "outcome, kwargs, code, body",
    [
        (FrameOutcome(accepted=3), {}, Code.CHANGED, b""),
        (
            FrameOutcome(2, 1, ["OUT_OF_RANGE"]),
            {},
            Code.CHANGED,
            b"accepted=2 quarantined=1 OUT_OF_RANGE=1",
        ),
        (FrameOutcome(0, 1, ["MALFORMED"]), {"decode_detail": "bad"}, Code.BAD_REQUEST, None),
        (FrameOutcome(0, 1, ["BAD_CRC"]), {}, Code.BAD_REQUEST, None),
        (FrameOutcome(0, 1, ["UNKNOWN_DEVICE"]), {}, Code.NOT_FOUND, None),
        (FrameOutcome(0, 1, ["INACTIVE_DEVICE"]), {}, Code.NOT_FOUND, None),
        (FrameOutcome(0, 2, ["UNAUTHORIZED", "UNKNOWN_DEVICE"]), {}, Code.FORBIDDEN, None),
        (FrameOutcome(0, 1, ["FUTURE_TIMESTAMP"]), {}, Code.BAD_REQUEST, None),
        (
            FrameOutcome(0, 1, ["UNSUPPORTED_FORMAT"]),
            {"supported": False},
            Code.UNSUPPORTED_CONTENT_FORMAT,
            None,
        ),
        (FrameOutcome(0, 1, ["WRITE_FAILED"]), {}, Code.INTERNAL_SERVER_ERROR, None),
        (FrameOutcome(0, 0, [], error="db down"), {}, Code.INTERNAL_SERVER_ERROR, b"db down"),
    ],
)
def test_response_codes_follow_the_durable_outcome(outcome, kwargs, code, body):
    got_code, got_body = response_for(outcome, **kwargs)
    assert got_code == code
    if body is not None:
        assert got_body == body
    if kwargs.get("decode_detail"):
        assert got_body == b"MALFORMED: bad"


def test_content_formats_map_to_codecs():
    assert payload_format(None) == (None, True)
    assert payload_format(0) == (None, True)
    assert payload_format(50) == ("json", True)
    assert payload_format(60) == ("cbor", True)
    assert payload_format(42) == ("binary-v1", True)
    assert payload_format(110) == ("senml-json", True)
    assert payload_format(112) == ("senml-cbor", True)
    assert payload_format(111)[1] is False  # sensml+json: streams are not readings packs
    assert psk_bytes("hex:00ff") == b"\x00\xff" and psk_bytes("abc") == b"abc"


def test_authorisation_of_identities_gateways_and_keyed_devices(registry):
    auth = Authorisation.from_registry(registry.devices_by_protocol("coap"), registry)

    def up(*devs: str) -> list[Uplink]:
        return [Uplink(d, "register", [T0], [1.0]) for d in devs]

    assert auth.authenticated_device(None, up("CJ001")) is None
    refused = auth.authenticated_device(None, up("CJ001", "CK001"), "10.0.0.9:5683/up")
    assert refused == f"{UNAUTHENTICATED} from 10.0.0.9:5683/up"
    assert auth.authenticated_device(None, up("GHOST")) is not None  # default deny
    assert auth.authenticated_device("CK001", up("CK001")) is None
    assert auth.authenticated_device("CK001", up("CJ001")) == "CK001"
    assert auth.authenticated_device("GW-C1", up("CG001", "CG002", "GW-C1")) is None
    assert auth.authenticated_device("GW-C1", up("CG001", "CJ001")) == "GW-C1"
    # plain: the allowed devices' uplinks go apart from the refused ones
    groups = auth.split(None, up("CJ001", "CK001", "CJ002"), "a")
    assert [([u.device for u in g], who) for g, who in groups] == [
        (["CJ001", "CJ002"], None),
        (["CK001"], f"{UNAUTHENTICATED} from a"),
    ]
    coap = registry.devices_by_protocol("coap")
    relaxed = Authorisation.from_registry(coap, registry, require_dtls_for_keyed=False)
    assert relaxed.authenticated_device(None, up("CK001")) is None


def test_sample_registry_fragment_loads():
    sample = load_registry(Path(__file__).parent.parent / "protocols" / "coap.sample.toml")
    auth = Authorisation.from_registry(sample.devices_by_protocol("coap"), sample)
    assert auth.keyed == {"NB000001", "CONC-7"}
    assert auth.gateway_of == {"NB000003": "CONC-7"}
    assert auth.aliases == {"serial:71000002": "NB000002"}


def test_handshake_watch_counts_each_unfinished_handshake_once():
    watch = HandshakeWatch(timeout_s=5)
    for _ in range(3):  # tinydtls looks the key up several times per handshake
        watch.key_lookup("CK001", True, now=0.0)
        watch.key_lookup("CK002", True, now=0.0)
    watch.authenticated("CK002")
    assert watch.expire(now=4.0) == []
    assert watch.expire(now=6.0) == ["CK001"]
    assert watch.expire(now=20.0) == []
    assert watch.key_lookup("NOBODY", False, now=0.0) is True
    assert watch.key_lookup("NOBODY", False, now=1.0) is False


def test_simulated_payloads_decode_to_the_manifest_values():
    meters = [
        SimMeter("A", "json"),
        SimMeter("B", "cbor"),
        SimMeter("C", "binary-v1", serial=7),
    ]
    params = CoapMeterParams(uplinks_per_meter=2, readings_per_uplink=3, t0=T0)
    sends, injected = plan_uplinks(meters, params)
    assert len(sends) == 6 and not any(injected.values())
    for send in sends:
        (uplink,) = decode(send.payload)
        assert uplink.ts == [t for t, _ in send.readings]
        assert uplink.values == [v for _, v in send.readings]
    one = encode_uplink(SimMeter("A"), T0, 900, [1500], with_device=False)
    assert json.loads(one) == {"ts": T0, "reg": 1.5, "unit": "m3"}


# --- regression cases over the real server ----------------------------------------------------
def _case_payload(spec: dict[str, Any]) -> bytes:
    if "json" in spec:
        return json.dumps(spec["json"]).encode()
    if "cbor" in spec:
        return bytes(cbor2.dumps(spec["cbor"]))
    if "binary_v1" in spec:
        b = spec["binary_v1"]
        frame = bytearray(encode_binary_v1(b["serial"], b["t0"], b["step"], b["litres"]))
        if "corrupt_byte" in b:
            frame[b["corrupt_byte"]] ^= 0xFF
        return bytes(frame)
    return str(spec["text"]).encode()


CASE_DIRS = sorted(p for p in CASES.iterdir() if (p / "case.json").exists())


@pytest.mark.parametrize("case_dir", CASE_DIRS, ids=[p.name for p in CASE_DIRS])
def test_uplink_case(case_dir: Path, coap_db: str, registry: Registry):
    case = json.loads((case_dir / "case.json").read_text())
    req, exp = case["request"], case["expected"]

    async def scenario() -> aiocoap.Message:
        async with serving(coap_db, registry) as (server, _), client() as ctx:
            uri = f"coap://127.0.0.1:{server.port}/{req['path']}"
            method = getattr(Code, req.get("method", "POST"))
            return await request(
                ctx, uri, _case_payload(req["payload"]), req["content_format"], method
            )

    response = asyncio.run(scenario())
    assert str(response.code).startswith(exp["code"]), (response.code, response.payload)
    if "payload" in exp:
        assert response.payload.decode() == exp["payload"]
    if "payload_contains" in exp:
        assert exp["payload_contains"] in response.payload.decode()
    assert_rows(rows(coap_db), exp["rows"])
    assert [(r, d) for r, d, _ in quarantine(coap_db)] == [tuple(q) for q in exp["quarantine"]]


# --- block-wise, retransmission, duplicates ---------------------------------------------------
def _batch(n: int, devices: list[str]) -> tuple[bytes, list[list[Any]]]:
    readings = [
        {"dev": devices[i % len(devices)], "ts": T0 + 900 * (i // len(devices)), "reg": 1 + i / 8}
        for i in range(n)
    ]
    expected = [[r["dev"], r["ts"], r["reg"]] for r in readings]
    return json.dumps({"gw": "GW-C1", "readings": readings}).encode(), expected


def test_blockwise_concentrator_batch_stores_every_reading(coap_db, registry):
    payload, expected = _batch(200, [f"CJ{i:03d}" for i in range(1, 21)])
    assert len(payload) > 8 * 1024

    async def scenario() -> tuple[aiocoap.Message, LossyUdpRelay, CoapIngest]:
        async with serving(coap_db, registry) as (server, _), client() as ctx:
            relay = LossyUdpRelay(("127.0.0.1", server.port), lose_first_ack=False)
            async with relay:  # only counts datagrams: the upload really is block-wise
                uri = f"coap://127.0.0.1:{relay.port}/up"
                return await request(ctx, uri, payload, 50), relay, server

    response, relay, server = asyncio.run(scenario())
    assert response.code == Code.CHANGED and response.payload == b""
    assert relay.client_requests == -(-len(payload) // 1024)  # one request per 1 KiB block
    assert server.stats.requests == 1  # reassembled by aiocoap: one uplink, not one per block
    assert_rows(rows(coap_db), expected)


def test_retransmitted_con_after_lost_ack_stores_once(coap_db, registry):
    meters = [SimMeter(f"CJ{i:03d}", "json") for i in range(1, 4)]
    params = CoapMeterParams(
        readings_per_uplink=6,
        t0=T0,
        ack_timeout_s=0.5,
        path_device=True,  # POST /up/{device}, payloads without "dev" ...
        content_format=False,  # ... and without Content-Format: the server sniffs
        faults=CoapFaults(lost_ack=3),
    )

    async def scenario() -> tuple[dict[str, Any], CoapIngest, IngestPipeline]:
        async with serving(coap_db, registry) as (server, pipeline):
            params.port = server.port
            return await simulate(meters, params), server, pipeline

    manifest, server, pipeline = asyncio.run(scenario())
    assert manifest["relay"]["dropped"] == 3
    assert manifest["relay"]["retransmissions"] >= 3  # each client sent its CON again
    assert manifest["responses"] == {"2.04 Changed": 3}
    assert server.stats.requests == 3  # aiocoap's de-duplication answered the retransmissions
    assert pipeline.counters.duplicates == 0
    assert_rows(rows(coap_db), manifest["expected"]["rows"])


def test_resent_uplink_as_new_request_stores_nothing_twice(coap_db, registry):
    payload = json.dumps({"dev": "CJ001", "t0": T0, "step": 900, "reg": [1.0, 2.0, 3.0]}).encode()

    async def scenario() -> tuple[list[aiocoap.Message], IngestPipeline]:
        async with serving(coap_db, registry) as (server, pipeline), client() as ctx:
            uri = f"coap://127.0.0.1:{server.port}/up/CJ001"
            got = [await request(ctx, uri, payload, 50) for _ in range(3)]
            return got, pipeline

    responses, pipeline = asyncio.run(scenario())
    assert [r.code for r in responses] == [Code.CHANGED] * 3
    assert pipeline.counters.stored == 3 and pipeline.counters.duplicates == 6
    assert_rows(rows(coap_db), [["CJ001", T0 + 900 * k, 1.0 + k] for k in range(3)])


def _raw_exchange(port: int, datagrams: list[bytes]) -> list[aiocoap.Message]:
    """Send each datagram from one UDP socket and read its (piggybacked) answer."""
    answers = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        for datagram in datagrams:
            sock.sendto(datagram, ("127.0.0.1", port))
            answers.append(aiocoap.Message.decode(sock.recv(2048)))
    return answers


def _block(mid: int, number: int, more: bool, chunk: bytes) -> bytes:
    msg = aiocoap.Message(code=Code.POST, uri_path=("up",), payload=chunk, content_format=50)
    msg.opt.block1 = BlockOption.BlockwiseTuple(number, more, 2)  # 64-byte blocks
    msg.mtype, msg.mid, msg.token = aiocoap.CON, mid, b"blk" + bytes([mid])
    return bytes(msg.encode())


def test_block_out_of_sequence_answers_408_and_is_counted(coap_db, registry):
    payload, _ = _batch(10, ["CJ001"])

    async def scenario() -> tuple[list[aiocoap.Message], CoapIngest]:
        async with serving(coap_db, registry) as (server, _):
            blocks = [_block(1, 0, True, payload[:64]), _block(2, 2, True, payload[128:192])]
            return await asyncio.to_thread(_raw_exchange, server.port, blocks), server

    answers, server = asyncio.run(scenario())
    assert [a.code for a in answers] == [Code.CONTINUE, Code.REQUEST_ENTITY_INCOMPLETE]
    assert server.stats.blockwise_incomplete == 1 and server.stats.requests == 0
    assert rows(coap_db) == [] and quarantine(coap_db) == []


def test_upload_over_the_size_limit_answers_413(coap_db, registry):
    payload, _ = _batch(100, ["CJ001"])
    assert len(payload) > 4096

    async def scenario() -> tuple[aiocoap.Message, CoapIngest]:
        async with serving(coap_db, registry, max_payload_bytes=2048) as (server, _):
            async with client() as ctx:
                uri = f"coap://127.0.0.1:{server.port}/up"
                return await request(ctx, uri, payload, 50), server

    response, server = asyncio.run(scenario())
    assert response.code == Code.REQUEST_ENTITY_TOO_LARGE and response.opt.size1 == 2048
    assert server.stats.too_large == 1 and server.stats.requests == 0
    # Refused, but not without a trace: one OVERSIZE row with the bytes that arrived.
    assert rows(coap_db) == [] and quarantine(coap_db) == [("OVERSIZE", None, "coap")]


def test_server_retries_binding_until_the_port_is_free(coap_db, registry):
    async def scenario() -> tuple[aiocoap.Message, CoapIngest]:
        port = udp_port_pair()
        pipeline = IngestPipeline(coap_db, batch_seconds=0.05).start()
        devices = registry.devices_by_protocol("coap")
        server = CoapIngest(devices, registry, pipeline, port=port, bind_retry_max_s=0.5)
        blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        blocker.bind(("127.0.0.1", port))
        task = asyncio.create_task(server.run())
        try:
            await eventually(lambda: server.stats.bind_failures >= 2, 10)
            assert not server.ready.is_set()
            blocker.close()
            await asyncio.wait_for(server.ready.wait(), 10)
            async with client() as ctx:
                uri = f"coap://127.0.0.1:{port}/up"
                return await request(ctx, uri, _json("CJ001", 2.0), 50), server
        finally:
            blocker.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await asyncio.to_thread(pipeline.close)

    response, server = asyncio.run(scenario())
    assert response.code == Code.CHANGED and server.stats.bind_failures >= 2
    assert_rows(rows(coap_db), [["CJ001", T0, 2.0]])


# --- DTLS -------------------------------------------------------------------------------------
async def _dtls_post(
    port: int, identity: str, key: bytes, payload: bytes, cf: int, timeout: float = 10.0
) -> aiocoap.Message | None:
    async with client(["tinydtls"]) as ctx:
        ctx.client_credentials[f"coaps://127.0.0.1:{port}/*"] = DTLS(
            psk=key, client_identity=identity.encode()
        )
        try:
            return await request(ctx, f"coaps://127.0.0.1:{port}/up", payload, cf, timeout=timeout)
        except (TimeoutError, aiocoap.error.Error):
            return None


def _json(dev: str, reg: float, ts: int = T0) -> bytes:
    return json.dumps({"dev": dev, "ts": ts, "reg": reg}).encode()


@pytest.mark.skipif(DTLS_MISSING is not None, reason=f"DTLS unavailable: {DTLS_MISSING}")
def test_dtls_psk_right_key_stores_wrong_key_is_refused_and_counted(coap_db, registry):
    async def scenario() -> tuple[list[aiocoap.Message | None], CoapIngest]:
        opts = {"dtls_handshake_timeout_s": 1.0, "sweep_every_s": 0.1}
        async with serving(coap_db, registry, **opts) as (server, _):
            assert server.dtls_port == server.port + 1
            p = server.dtls_port
            got = [
                await _dtls_post(p, "CK001", b"key-of-CK001", _json("CK001", 1.25), 50),
                await _dtls_post(
                    p,
                    "CK002",
                    psk_bytes("hex:00112233445566778899aabbccddeeff"),
                    bytes(cbor2.dumps({"ts": T0, "reg": 2.5, "dev": "CK002"})),
                    60,
                ),
                # the identity's key is right, the payload names another device
                await _dtls_post(p, "CK001", b"key-of-CK001", _json("CJ001", 3.0), 50),
                # a concentrator's identity may send its meters' readings
                await _dtls_post(
                    p,
                    "GW-C1",
                    b"key-of-GW-C1",
                    json.dumps(
                        {
                            "readings": [
                                json.loads(_json("CG001", 4.0)),
                                json.loads(_json("CG002", 5.0)),
                            ]
                        }
                    ).encode(),
                    50,
                ),
                await _dtls_post(p, "CK001", b"not-the-key", _json("CK001", 9.0, T0 + 900), 50, 3),
                await _dtls_post(p, "NOBODY", b"whatever", _json("CJ002", 9.0), 50, 3),
            ]
            await eventually(lambda: server.stats.dtls_handshakes_refused >= 1, 5)
            return got, server

    responses, server = asyncio.run(scenario())
    codes = [None if r is None else r.code for r in responses]
    assert codes == [Code.CHANGED, Code.CHANGED, Code.FORBIDDEN, Code.CHANGED, None, None]
    assert server.stats.dtls_handshakes_refused == 1
    assert server.stats.dtls_unknown_identity == 1
    assert server.stats.dtls_requests == 4
    assert_rows(
        rows(coap_db),
        [["CG001", T0, 4.0], ["CG002", T0, 5.0], ["CK001", T0, 1.25], ["CK002", T0, 2.5]],
    )
    assert quarantine(coap_db) == [("UNAUTHORIZED", "CJ001", "coaps")]


@pytest.mark.skipif(DTLS_MISSING is not None, reason=f"DTLS unavailable: {DTLS_MISSING}")
@pytest.mark.skipif(OPENSSL is None, reason="Debian libcoap3-bin (coap-client-openssl) missing")
def test_libcoap_openssl_dtls_psk_peer(coap_db, registry):
    async def scenario() -> CoapIngest:
        opts = {"dtls_handshake_timeout_s": 1.0, "sweep_every_s": 0.1}
        async with serving(coap_db, registry, **opts) as (server, _):
            uri = f"coaps://127.0.0.1:{server.dtls_port}/up"
            for key, reg, ts in (("key-of-CK001", 7.5, T0), ("wrong-key", 8.5, T0 + 900)):
                payload = _json("CK001", reg, ts).decode()
                await libcoap(
                    str(OPENSSL), "-m", "post", "-t", "json", "-e", payload,
                    "-u", "CK001", "-k", key, "-B", "5", uri,
                )  # fmt: skip
            await eventually(lambda: server.stats.dtls_handshakes_refused >= 1, 5)
            return server

    server = asyncio.run(scenario())
    assert server.stats.dtls_requests == 1
    assert server.stats.dtls_handshakes_refused == 1
    assert_rows(rows(coap_db), [["CK001", T0, 7.5]])


# --- the independent peer: libcoap's coap-client ----------------------------------------------
@pytest.mark.skipif(NOTLS is None, reason=NO_LIBCOAP)
def test_libcoap_client_posts_json_and_blockwise_batch(coap_db, registry, tmp_path):
    batch, expected = _batch(200, [f"CC{i:03d}" for i in range(1, 11)])
    batch_file = tmp_path / "batch.json"
    batch_file.write_bytes(batch)
    binary = tmp_path / "frame.bin"
    binary.write_bytes(encode_binary_v1(81000001, T0, 900, [1000, 2000, 3500]))

    async def scenario() -> tuple[list[tuple[int, str, str]], LossyUdpRelay, CoapIngest]:
        async with serving(coap_db, registry) as (server, _):
            relay = LossyUdpRelay(("127.0.0.1", server.port), lose_first_ack=False)
            async with relay:
                base = f"coap://127.0.0.1:{server.port}"
                results = [
                    await libcoap(
                        str(NOTLS), "-m", "post", "-t", "json",
                        "-e", _json("CJ001", 42.125).decode(), f"{base}/up",
                    ),
                    await libcoap(
                        str(NOTLS), "-m", "post", "-t", "json", "-b", "64", "-f", str(batch_file),
                        f"coap://127.0.0.1:{relay.port}/up",
                    ),
                    await libcoap(
                        str(NOTLS), "-m", "put", "-t", "octet-stream", "-f", str(binary),
                        f"{base}/up/CB001",
                    ),
                    await libcoap(
                        str(NOTLS), "-m", "post", "-t", "json", "-e", "{oops", f"{base}/up"
                    ),
                ]  # fmt: skip
            return results, relay, server

    results, relay, server = asyncio.run(scenario())
    assert [rc for rc, _, _ in results] == [0, 0, 0, 0], results
    assert "MALFORMED" in results[3][1] + results[3][2]  # libcoap prints the 4.00 diagnostic
    assert relay.client_requests == -(-len(batch) // 64)  # one request per 64-byte block
    assert server.stats.requests == 4 and server.stats.bad_request == 1
    assert_rows(
        rows(coap_db),
        expected
        + [["CJ001", T0, 42.125], ["CB001", T0, 1.0], ["CB001", T0 + 900, 2.0]]
        + [["CB001", T0 + 1800, 3.5]],
    )
    assert [(r, d) for r, d, _ in quarantine(coap_db)] == [("MALFORMED", None)]


@pytest.mark.skipif(NOTLS is None, reason=NO_LIBCOAP)
def test_libcoap_client_retransmitting_after_lost_ack_stores_once(coap_db, registry):
    async def scenario() -> tuple[tuple[int, str, str], LossyUdpRelay, CoapIngest, IngestPipeline]:
        async with serving(coap_db, registry) as (server, pipeline):
            async with LossyUdpRelay(("127.0.0.1", server.port)) as relay:
                uri = f"coap://127.0.0.1:{relay.port}/up"
                got = await libcoap(
                    str(NOTLS), "-m", "post", "-t", "json", "-e", _json("CJ002", 5.5).decode(), uri
                )
            return got, relay, server, pipeline

    result, relay, server, pipeline = asyncio.run(scenario())
    assert result[0] == 0, result
    assert relay.dropped == 1 and relay.retransmissions >= 1
    assert server.stats.requests == 1 and server.stats.changed == 1
    assert pipeline.counters.stored == 1 and pipeline.counters.duplicates == 0
    assert_rows(rows(coap_db), [["CJ002", T0, 5.5]])


# --- the simulated fleet with every fault: counted outcome, nothing lost or duplicated ----------
def test_simulated_fleet_with_faults_is_counted_exactly(coap_db, registry):
    meters = meters_from_registry(registry)
    wrong_key = 1
    if DTLS_MISSING is not None:  # without DTLS only the plain meters can talk
        meters, wrong_key = [m for m in meters if not m.psk], 0
    faults = CoapFaults(malformed=4, duplicate=3, lost_ack=2, wrong_key=wrong_key)
    params = CoapMeterParams(
        uplinks_per_meter=2,
        readings_per_uplink=8,
        t0=T0,
        ack_timeout_s=0.5,
        dtls_timeout_s=3.0,
        faults=faults,
    )

    async def scenario() -> tuple[dict[str, Any], CoapIngest, IngestPipeline]:
        opts = {"dtls_handshake_timeout_s": 1.0, "sweep_every_s": 0.1}
        async with serving(coap_db, registry, **opts) as (server, pipeline):
            params.port = server.port
            manifest = await simulate(meters, params)
            await eventually(lambda: server.stats.dtls_handshakes_refused >= wrong_key, 5)
            return manifest, server, pipeline

    manifest, server, pipeline = asyncio.run(scenario())
    expected = manifest["expected"]
    assert_rows(rows(coap_db), expected["rows"])
    got_q = Counter(r for r, _, _ in quarantine(coap_db))
    assert got_q == Counter(expected["quarantined"]) and sum(got_q.values()) == 4
    assert pipeline.counters.duplicates == expected["duplicate_readings"] == 3 * 8
    sent = manifest["sent"]
    answered = [s for s in sent if s["expect"] != "refused"]
    assert server.stats.requests == len(answered)  # lost-ACK retransmissions rendered once
    assert manifest["relay"]["dropped"] == 2 * 2 and manifest["relay"]["retransmissions"] >= 4
    for s in answered:
        want = "4.00 Bad Request" if s["expect"] in ("MALFORMED", "BAD_CRC") else "2.04 Changed"
        assert s["response"] == want, s
    refused = [s for s in sent if s["expect"] == "refused"]
    assert len(refused) == wrong_key and all(s["response"].startswith("timeout") for s in refused)
    assert server.stats.dtls_handshakes_refused == wrong_key
    assert server.stats.readings_accepted == expected["stored_readings"] + 3 * 8
