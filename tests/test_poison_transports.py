"""Poison input at the transports: no message or request stops a receive loop, each gets its
quarantine row and its acknowledgement, and a process that is dead inside says so and exits.

Real broker, real PostgreSQL, real CoAP clients over UDP (aiocoap, Debian's
``coap-client-notls``, hand-built RFC 7252 datagrams). The only stand-ins are sinks that raise
or report saturation, to reach the transports' own last-resort paths, and an adapter whose
``run()`` raises.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import struct
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import aiocoap
import psycopg
import pytest
from aiocoap.numbers.codes import Code

from aquameter.registry import Registry, load_registry
from ingest.pipeline import IngestPipeline
from ingest.registry_sync import sync_registry
from ingest.service import IngestFailed, ingest_problem, run_adapters, vendor_formats
from ingest.workers import MqttWorkers
from protocols.coap import CoapIngest
from protocols.mqtt import MqttIngest, batch_topic, uplink_topic
from protocols.uplink import DurableCallback, Frame
from sql.migrate import migrate
from tests.mqtt_helpers import broker_v5, publish_all, skip_unless_v5, wait_count
from tests.servers import EXAMPLE_REGISTRY
from tests.test_coap import NO_LIBCOAP, NOTLS, REGISTRY_PATH, client, request, rows, serving
from tests.test_coap import T0 as COAP_T0

RUN = uuid.uuid4().hex[:8]
ROOT = f"aqp-{RUN}/v1"
NOW = int(time.time()) // 900 * 900
T0 = NOW - 2 * 86400
FORMATS = vendor_formats(load_registry(EXAMPLE_REGISTRY))
READINGS = "SELECT count(*) FROM readings"
QUARANTINE = "SELECT count(*) FROM quarantine"


# --- helpers ------------------------------------------------------------------------------------
def _valid(i: int) -> tuple[str, bytes]:
    dev = f"AQN{i:05d}"
    body = {"dev": dev, "t0": T0, "step": 900, "reg": [100.0 + i, 100.5 + i], "unit": "m3"}
    return uplink_topic(ROOT, "aqualink", dev), json.dumps(body).encode()


def _poison() -> list[tuple[str, str, bytes]]:
    """(expected reason, topic, payload) of each poison message; ``A|B``: either reason."""
    up = uplink_topic(ROOT, "aqualink", "AQN00050")
    deep = b'{"dev": "AQN00050", "ts": %d, "reg": ' % T0 + b"[" * 10_000 + b"]" * 10_000 + b"}"
    huge = b'{"dev": "AQN00050", "ts": %d, "reg": %s}' % (T0, b"9" * 400)
    nul = json.dumps({"dev": "AQN\x0000050", "ts": T0, "reg": 1.0}).encode()
    return [
        ("TOO_DEEP", up, deep),
        ("MALFORMED|OUT_OF_RANGE|NOT_A_NUMBER", up, huge),  # the decoder decides which
        ("MALFORMED", up, b"\xff\xfe\x00\x80garbage\xc3\x28"),
        ("UNKNOWN_TOPIC", f"{ROOT}/aqualink/gw/up", b'{"dev": "AQN00050"}'),
        ("MALFORMED", up, nul),  # the codec refuses unprintable device ids
        ("MALFORMED", up, b""),
    ]


def _reasons_match(got: list[str], expected: list[str]) -> bool:
    """Every expected reason (``A|B``: one of them) matched by exactly one row."""
    left = list(got)
    for want in sorted(expected, key=lambda w: w.count("|")):
        hit = next((r for r in left if r in want.split("|")), None)
        if hit is None:
            return False
        left.remove(hit)
    return not left


def _interleaved(valid: list[tuple[str, bytes]], poison: list[tuple[str, bytes]]) -> list:
    out: list[tuple[str, bytes]] = []
    step = max(1, len(valid) // (len(poison) + 1))
    queue = list(poison)
    for k, msg in enumerate(valid):
        out.append(msg)
        if queue and (k + 1) % step == 0:
            out.append(queue.pop(0))
    return out + queue


def _mqtt(url: str, sink: Any, client_id: str) -> MqttIngest:
    client = MqttIngest(
        url,
        sink,
        FORMATS,
        client_id=client_id,
        shared_group=None,
        topic_root=ROOT,
        session_expiry_s=120,
        v5=broker_v5(url),
    ).start()
    assert client.connected.wait(10)
    return client


def _wait(predicate: Any, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def _quarantine(db_url: str) -> list[tuple[str, str, str | None, str, bytes | None]]:
    with psycopg.connect(db_url) as conn:
        got = conn.execute(
            "SELECT reason, address, device_id, detail, raw FROM quarantine ORDER BY id"
        ).fetchall()
    return [(r, a, d, t, bytes(raw) if raw is not None else None) for r, a, d, t, raw in got]


def _nothing_redelivered(url: str, db_url: str, client_id: str) -> int:
    """Reconnect under ``client_id`` (same persistent session) and count what comes back."""
    pipeline = IngestPipeline(db_url, batch_seconds=0.05).start()
    client = _mqtt(url, pipeline, client_id)
    try:
        time.sleep(1.5)
    finally:
        client.shutdown(pipeline.close)
    return client.stats.messages


class RaisingSink:
    """The real pipeline behind a sink that raises on frames whose payload holds ``marker``:
    the bug the transport must survive. ``rejections_too`` makes the quarantine submit raise
    as well (the last resort: acknowledge and log the loss)."""

    def __init__(
        self,
        pipeline: IngestPipeline,
        marker: bytes,
        exc: type[Exception] = RecursionError,
        rejections_too: bool = False,
    ) -> None:
        self.pipeline = pipeline
        self.marker = marker
        self.exc = exc
        self.rejections_too = rejections_too

    def submit(self, frame: Frame, on_durable: DurableCallback) -> None:
        if self.marker in frame.payload and (frame.rejection is None or self.rejections_too):
            raise self.exc("maximum recursion depth exceeded (a decoder bug)")
        self.pipeline.submit(frame, on_durable)


# --- MQTT, one process ----------------------------------------------------------------------
def test_poison_messages_are_quarantined_acknowledged_and_the_thread_lives(mqtt_url, db_url):
    poison = _poison()
    valid = [_valid(i) for i in range(1, 41)]
    msgs = _interleaved(valid, [(t, p) for _, t, p in poison])
    client_id = f"aqp-{RUN}-single"
    pipeline = IngestPipeline(db_url, batch_seconds=0.05).start()
    client = _mqtt(mqtt_url, pipeline, client_id)
    try:
        publish_all(mqtt_url, msgs)
        assert wait_count(db_url, QUARANTINE, len(poison)) == len(poison)
        assert wait_count(db_url, READINGS, 80) == 80
        assert _wait(lambda: client.stats.acked == len(msgs))
        assert client.alive() and client.problem() is None
        assert ingest_problem(pipeline, client) is None
    finally:
        client.shutdown(pipeline.close)
    stats = client.stats
    assert (stats.messages, stats.acked) == (len(msgs), len(msgs))
    assert (stats.ignored_topics, stats.errors, stats.unprocessable) == (1, 0, 0)
    assert pipeline.counters.stored == 80 and pipeline.counters.duplicates == 0
    assert pipeline.counters.frames == len(msgs)
    got = _quarantine(db_url)
    assert _reasons_match([r[0] for r in got], [r for r, _, _ in poison]), got
    by_reason = {r[0]: r for r in got}
    assert by_reason["UNKNOWN_TOPIC"][1] == f"{ROOT}/aqualink/gw/up"
    assert "does not match" in by_reason["UNKNOWN_TOPIC"][3]
    [nul_row] = [r for r in got if r[4] and b"\\u0000" in r[4]]
    assert "AQN\\x0000050" in nul_row[3]  # the NUL, escaped in the detail; raw kept as sent
    assert by_reason["TOO_DEEP"][4]  # the raw bytes are kept for a person to look at
    assert _nothing_redelivered(mqtt_url, db_url, client_id) == 0
    assert wait_count(db_url, READINGS, 80) == 80  # each valid reading once


class CommitWithoutAck:
    """The real pipeline, but the PUBACKs never leave: a worker killed between its commit and
    its acknowledgements. ``durable`` counts the frames committed."""

    def __init__(self, pipeline: IngestPipeline) -> None:
        self.pipeline = pipeline
        self.durable = 0

    def submit(self, frame: Frame, on_durable: DurableCallback) -> None:
        def committed(_outcome: object) -> None:
            self.durable += 1

        self.pipeline.submit(frame, committed)


def test_a_redelivered_poison_message_is_one_row_counted_again(mqtt_url, db_url):
    """QoS 1 redelivery of a poison message committed before its PUBACK was lost: the resumed
    session gets it again and its quarantine row counts it (occurrences 2) instead of a second
    row; a device sending the same bad frame once more counts a third time. The valid messages
    around them are stored once."""
    garbage = (uplink_topic(ROOT, "aqualink", "AQN00050"), b"\xff\xfe\x00\x80garbage")
    stray = (f"{ROOT}/aqualink/gw/up", b'{"dev": "AQN00050"}')
    msgs = [_valid(1), garbage, _valid(2), stray, _valid(3)]
    client_id = f"aqp-{RUN}-redeliver"
    first = IngestPipeline(db_url, batch_seconds=0.05).start()
    sink = CommitWithoutAck(first)
    crashed = _mqtt(mqtt_url, sink, client_id)
    publish_all(mqtt_url, msgs)
    assert _wait(lambda: sink.durable == len(msgs))
    crashed.client.loop_stop()
    crashed.client.socket().close()  # abrupt: no DISCONNECT, and no PUBACK was sent
    first.close()
    assert wait_count(db_url, QUARANTINE, 2) == 2 and wait_count(db_url, READINGS, 6) == 6

    pipeline = IngestPipeline(db_url, batch_seconds=0.05).start()
    client = _mqtt(mqtt_url, pipeline, client_id)  # resumes the session: all five come again
    try:
        occurrences = "SELECT coalesce(sum(occurrences), 0) FROM quarantine"
        assert wait_count(db_url, occurrences, 4) == 4
        publish_all(mqtt_url, [garbage])  # the device retries its bad frame
        assert wait_count(db_url, occurrences, 5) == 5
        assert _wait(lambda: client.stats.acked == len(msgs) + 1)
    finally:
        client.shutdown(pipeline.close)
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT reason, address, raw, occurrences FROM quarantine ORDER BY id"
        ).fetchall()
    assert [(r, a, bytes(raw), n) for r, a, raw, n in rows] == [
        ("MALFORMED", garbage[0], garbage[1], 3),
        ("UNKNOWN_TOPIC", stray[0], stray[1], 2),
    ]
    assert wait_count(db_url, READINGS, 6) == 6
    assert pipeline.counters.duplicates == 6 and pipeline.counters.stored == 0
    assert pipeline.counters.quarantined == {}
    assert pipeline.counters.quarantine_repeats == {"MALFORMED": 2, "UNKNOWN_TOPIC": 1}
    assert first.counters.quarantined == {"MALFORMED": 1, "UNKNOWN_TOPIC": 1}


def test_an_exception_in_the_handler_becomes_a_processing_error_row(mqtt_url, db_url):
    client_id = f"aqp-{RUN}-raise"
    pipeline = IngestPipeline(db_url, batch_seconds=0.05).start()
    client = _mqtt(mqtt_url, RaisingSink(pipeline, b"EXPLODE"), client_id)
    bad = (uplink_topic(ROOT, "aqualink", "AQN00007"), b'{"dev": "EXPLODE"}')
    msgs = [_valid(1), bad, _valid(2), bad, _valid(3)]
    try:
        publish_all(mqtt_url, msgs)
        assert wait_count(db_url, "SELECT coalesce(sum(occurrences), 0) FROM quarantine", 2) == 2
        assert wait_count(db_url, READINGS, 6) == 6
        assert _wait(lambda: client.stats.acked == len(msgs))
        assert client.alive()
    finally:
        client.shutdown(pipeline.close)
    assert (client.stats.errors, client.stats.unprocessable) == (2, 0)
    got = _quarantine(db_url)
    assert [r[0] for r in got] == ["PROCESSING_ERROR"]  # the same message twice: one row, 2 times
    assert all("RecursionError" in r[3] and r[4] == bad[1] for r in got)
    assert _nothing_redelivered(mqtt_url, db_url, client_id) == 0


def test_a_message_that_cannot_even_be_quarantined_is_acknowledged(mqtt_url, db_url, caplog):
    caplog.set_level(logging.ERROR, logger="aquameter.mqtt")
    client_id = f"aqp-{RUN}-lost"
    pipeline = IngestPipeline(db_url, batch_seconds=0.05).start()
    sink = RaisingSink(pipeline, b"EXPLODE", MemoryError, rejections_too=True)
    client = _mqtt(mqtt_url, sink, client_id)
    msgs = [_valid(1), (uplink_topic(ROOT, "aqualink", "AQN00007"), b"EXPLODE"), _valid(2)]
    try:
        publish_all(mqtt_url, msgs)
        assert wait_count(db_url, READINGS, 4) == 4
        assert _wait(lambda: client.stats.acked == len(msgs))
        assert client.alive()
    finally:
        client.shutdown(pipeline.close)
    assert (client.stats.errors, client.stats.unprocessable) == (1, 1)
    assert wait_count(db_url, QUARANTINE, 0) == 0
    assert any("this message is lost" in r.getMessage() for r in caplog.records)
    # Acknowledged: the broker does not hand the poison message back on every reconnect.
    assert _nothing_redelivered(mqtt_url, db_url, client_id) == 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_alive_reports_a_stopped_or_dead_network_thread(mqtt_url, db_url):
    pipeline = IngestPipeline(db_url, batch_seconds=0.05).start()
    try:
        stopped = _mqtt(mqtt_url, pipeline, f"aqp-{RUN}-stopped")
        assert stopped.alive() and ingest_problem(pipeline, stopped) is None
        stopped.client.loop_stop()
        assert not stopped.alive()
        problem = ingest_problem(pipeline, stopped)
        assert problem is not None and "not running" in problem
        stopped.shutdown()
        assert stopped.problem() is None  # stopped on purpose is not a failure

        # The original bug: an exception escaping paho's on_message ends its thread, and
        # `connected` stays set. alive() sees it.
        dying = _mqtt(mqtt_url, pipeline, f"aqp-{RUN}-dying")

        def explode(*_: object) -> None:
            raise RecursionError("maximum recursion depth exceeded")

        dying.client.on_message = explode
        publish_all(mqtt_url, [_valid(1)])
        assert _wait(lambda: not dying.alive(), 10)
        assert dying.connected.is_set()  # what a health check on `connected` alone would see
        assert dying.problem() is not None
        dying.shutdown()
    finally:
        pipeline.close()


# --- MQTT workers -----------------------------------------------------------------------------
def _workers(db_url: str, mqtt_url: str, name: str) -> MqttWorkers:
    from aquameter.settings import Settings

    settings = Settings(
        database_url=db_url,
        mqtt_url=mqtt_url,
        mqtt_topic_root=ROOT,
        mqtt_shared_group=f"aqp{RUN}{name}",
        mqtt_client_id=f"aqp-{RUN}-{name}",
        mqtt_session_expiry_s=120,
        batch_seconds=0.05,
    )
    return MqttWorkers(
        settings,
        db_url,
        mqtt_url,
        FORMATS,
        2,
        report_every_s=0.05,
        restart_min_s=0.5,
        stop_timeout_s=30,
        log_level=logging.WARNING,
    )


def test_two_workers_poison_does_not_strand_valid_messages(mqtt_url, db_url):
    skip_unless_v5(mqtt_url)
    poison = _poison()
    valid = [_valid(i) for i in range(1, 41)]
    msgs = _interleaved(valid, [(t, p) for _, t, p in poison])
    workers = _workers(db_url, mqtt_url, "poison").start()
    try:
        assert workers.wait_all("connected", 30)
        publish_all(mqtt_url, msgs)
        assert wait_count(db_url, READINGS, 80) == 80
        assert wait_count(db_url, QUARANTINE, len(poison)) == len(poison)
        assert _wait(lambda: workers.mqtt_totals()["acked"] == len(msgs))
        assert all(r.healthy and r.connected for r in workers.rows())
        assert "mqtt workers=2/2" in workers.line() and "unhealthy" not in workers.line()
    finally:
        workers.stop()
    rows_ = workers.rows()
    assert [r.restarts for r in rows_] == [0, 0]
    totals = workers.mqtt_totals()
    assert totals["messages"] == totals["acked"] == len(msgs)
    assert totals["ignored_topics"] == 1
    assert totals["errors"] == 0
    got = [r[0] for r in _quarantine(db_url)]
    assert _reasons_match(got, [r for r, _, _ in poison]), got


def test_a_dead_worker_is_reported_and_restarted(mqtt_url, db_url):
    skip_unless_v5(mqtt_url)
    workers = _workers(db_url, mqtt_url, "dead").start()
    try:
        assert workers.wait_all("connected", 30)
        victim = workers.pid(0)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        assert _wait(lambda: not workers.rows()[0].healthy, 10)
        row = workers.rows()[0]
        assert not row.alive and not row.connected
        line = workers.line()
        assert "mqtt workers=1/2" in line and "unhealthy w0" in line, line
        assert _wait(lambda: workers.rows()[0].restarts == 1, 20)
        assert workers.wait_all("connected", 30)
        assert workers.rows()[0].healthy and workers.pid(0) not in (None, victim)
        publish_all(mqtt_url, [_valid(i) for i in range(1, 11)])
        assert wait_count(db_url, READINGS, 20) == 20
    finally:
        workers.stop()
    assert workers.rows()[0].last_exitcode == 0  # the restarted incarnation stopped cleanly


# --- the async adapters' supervisor -----------------------------------------------------------
class _BrokenAdapter:
    async def run(self) -> None:
        await asyncio.sleep(0.05)
        raise RuntimeError("adapter bug")


class _IdleAdapter:
    cancelled = False

    async def run(self) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            _IdleAdapter.cancelled = True


def test_an_adapter_that_dies_stops_ingest_with_the_reason():
    from aquameter.cli import _until

    adapters = {"broken": _BrokenAdapter(), "idle": _IdleAdapter()}
    problem = asyncio.run(_until(threading.Event(), 30, adapters, lambda: None, 10.0))
    assert problem is not None and "adapter-broken" in problem and "adapter bug" in problem
    assert _IdleAdapter.cancelled  # the healthy one was stopped (and drained), not left behind

    async def checked() -> None:
        await run_adapters({}, 30, check=lambda: "MQTT network thread is not running")

    with pytest.raises(IngestFailed, match="not running"):
        asyncio.run(asyncio.wait_for(checked(), 10))


# --- CoAP -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def coap_registry() -> Registry:
    return load_registry(REGISTRY_PATH)


@pytest.fixture
def coap_db(empty_db_url: str, coap_registry: Registry) -> str:
    with psycopg.connect(empty_db_url) as conn:
        migrate(conn, partitions_ahead=1)
        sync_registry(conn, coap_registry)
        conn.commit()
    return empty_db_url


def _jbody(dev: str | None, reg: float, ts: int = COAP_T0) -> bytes:
    body: dict[str, Any] = {"ts": ts, "reg": reg}
    if dev is not None:
        body["dev"] = dev
    return json.dumps(body).encode()


def _big_batch(n: int) -> bytes:
    readings = [{"dev": "CJ001", "ts": COAP_T0 + 900 * i, "reg": 1 + i / 8} for i in range(n)]
    return json.dumps({"gw": "GW-C1", "readings": readings}).encode()


def test_coap_upload_over_the_limit_is_413_and_an_oversize_row(coap_db, coap_registry):
    payload = _big_batch(100)
    assert len(payload) > 4096

    async def scenario() -> tuple[aiocoap.Message, aiocoap.Message, CoapIngest]:
        async with serving(coap_db, coap_registry, max_payload_bytes=2048) as (server, _):
            async with client() as ctx:
                uri = f"coap://127.0.0.1:{server.port}/up"
                big = await request(ctx, uri, payload, 50)
                ok = await request(ctx, uri, _jbody("CJ002", 3.0), 50)
                return big, ok, server

    big, ok, server = asyncio.run(scenario())
    assert big.code == Code.REQUEST_ENTITY_TOO_LARGE and big.opt.size1 == 2048
    assert ok.code == Code.CHANGED
    assert server.stats.too_large == 1 and server.stats.quarantined["OVERSIZE"] == 1
    [(reason, address, _, detail, raw)] = _quarantine(coap_db)
    assert reason == "OVERSIZE" and address.endswith("/up")
    assert raw and payload.startswith(raw) and len(raw) >= 1024  # the bytes that did arrive
    assert "2048" in detail
    assert rows(coap_db) == [("CJ002", float(COAP_T0), 3.0)]


@pytest.mark.skipif(NOTLS is None, reason=NO_LIBCOAP)
def test_coap_libcoap_oversize_upload_leaves_an_oversize_row(coap_db, coap_registry, tmp_path):
    from tests.test_coap import libcoap

    payload = _big_batch(100)
    batch: Path = tmp_path / "batch.json"
    batch.write_bytes(payload)

    async def scenario() -> tuple[tuple[int, str, str], CoapIngest]:
        async with serving(coap_db, coap_registry, max_payload_bytes=2048) as (server, _):
            uri = f"coap://127.0.0.1:{server.port}/up"
            args = ("-m", "post", "-t", "json", "-b", "256", "-f", str(batch), uri)
            return await libcoap(str(NOTLS), *args), server

    (rc, out, err), server = asyncio.run(scenario())
    assert "4.13" in out + err or server.stats.too_large >= 1, (rc, out, err)
    assert server.stats.too_large >= 1
    got = _quarantine(coap_db)
    assert [r[0] for r in got] == ["OVERSIZE"]  # one row for the upload, not one per block
    assert got[0][4] and payload.startswith(got[0][4]), got
    assert rows(coap_db) == []


def test_coap_blockwise_upload_without_size1_keeps_what_arrived(coap_db, coap_registry):
    """No Size1: the limit is crossed mid-upload, and the row holds the blocks received so far
    (aiocoap's Block1 spool) plus the crossing block."""
    from tests.test_coap import _block, _raw_exchange

    payload = _big_batch(20)
    blocks = [_block(k + 1, k, True, payload[64 * k : 64 * k + 64]) for k in range(6)]

    async def scenario() -> tuple[list[aiocoap.Message], CoapIngest]:
        async with serving(coap_db, coap_registry, max_payload_bytes=256) as (server, _):
            return await asyncio.to_thread(_raw_exchange, server.port, blocks), server

    answers, server = asyncio.run(scenario())
    too_large = Code.REQUEST_ENTITY_TOO_LARGE
    # A client that goes on after the 4.13 is refused again, without a second row.
    assert [a.code for a in answers] == [Code.CONTINUE] * 4 + [too_large, too_large]
    assert server.stats.too_large == 2
    [(reason, _, _, detail, raw)] = _quarantine(coap_db)
    assert reason == "OVERSIZE" and "refused at 320 bytes" in detail
    assert raw == payload[:320]


def _datagram(mid: int, path: list[bytes], payload: bytes, content_format: int = 50) -> bytes:
    """A confirmable POST per RFC 7252 section 3, built byte by byte (so a Uri-Path segment
    may hold what no client library would encode)."""
    out = bytes([0x40 | 2, Code.POST]) + struct.pack("!H", mid) + b"pt"
    previous = 0
    options = [(11, seg) for seg in path] + [(12, bytes([content_format]))]
    for number, value in options:
        delta, length = number - previous, len(value)
        assert delta < 13 and length < 269
        if length < 13:
            out += bytes([(delta << 4) | length]) + value
        else:
            out += bytes([(delta << 4) | 13, length - 13]) + value
        previous = number
    return out + b"\xff" + payload


def _send_raw(port: int, datagram: bytes, timeout: float = 3.0) -> aiocoap.Message | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(datagram, ("127.0.0.1", port))
        try:
            return aiocoap.Message.decode(sock.recv(2048))
        except TimeoutError:
            return None


def test_coap_uri_path_with_nul_or_invalid_text(coap_db, coap_registry, caplog):
    caplog.set_level(logging.CRITICAL, logger="asyncio")  # aiocoap's traceback for the bad UTF-8
    long_segment = "CJ" + "x" * 250

    async def scenario() -> tuple[list[Any], CoapIngest]:
        async with serving(coap_db, coap_registry) as (server, _):
            answers: list[Any] = []
            async with client() as ctx:
                uri = f"coap://127.0.0.1:{server.port}/up"
                msg = aiocoap.Message(code=Code.POST, uri=uri, payload=_jbody(None, 1.0))
                msg.opt.uri_path = ("up", "CJ\x00001")
                msg.opt.content_format = 50
                answers.append(await asyncio.wait_for(ctx.request(msg).response, 20))
                answers.append(await request(ctx, uri, _jbody("CJ003", 2.0), 50))
            # Raw datagrams: a NUL and a 252-character segment, then a segment that is not
            # UTF-8 (aiocoap cannot decode the message: no answer, but the server lives on).
            raw = [
                _datagram(0x101, [b"up", b"CJ\x00002"], _jbody(None, 3.0)),
                _datagram(0x102, [b"up", long_segment.encode()], _jbody(None, 4.0)),
                _datagram(0x103, [b"up", b"CJ\xff\xfe"], _jbody(None, 5.0)),
            ]
            for datagram in raw:
                answers.append(await asyncio.to_thread(_send_raw, server.port, datagram))
            async with client() as ctx:
                uri = f"coap://127.0.0.1:{server.port}/up/CJ004"
                answers.append(await request(ctx, uri, _jbody(None, 6.0), 50))
            return answers, server

    answers, server = asyncio.run(scenario())
    codes = [a.code if a is not None else None for a in answers]
    bad = Code.BAD_REQUEST
    assert codes == [bad, Code.CHANGED, bad, bad, None, Code.CHANGED]  # None: bad UTF-8, no answer
    assert rows(coap_db) == [
        ("CJ003", float(COAP_T0), 2.0),
        ("CJ004", float(COAP_T0), 6.0),
    ]
    got = _quarantine(coap_db)
    assert [r[0] for r in got] == ["MALFORMED"] * 3
    assert got[0][1].endswith("/up/CJ\\x00001") and "unprintable" in got[0][3]
    assert got[1][1].endswith("/up/CJ\\x00002")
    assert "252 characters" in got[2][3] and got[2][1].endswith(long_segment)
    assert all(isinstance(r[1], str) and len(r[1]) <= 600 for r in got)
    assert server.stats.server_errors == 0


class SaturatedSink:
    """A sink whose queue is always full: what CoAP sees while ingest is behind."""

    def __init__(self) -> None:
        self.submitted: list[Frame] = []

    def saturated(self) -> bool:
        return True

    def submit(self, frame: Frame, on_durable: DurableCallback) -> None:
        self.submitted.append(frame)  # pragma: no cover - must not happen


def test_coap_saturated_sink_answers_503_with_max_age_and_submits_nothing(coap_db, coap_registry):
    from tests.test_coap import udp_port_pair

    async def scenario() -> tuple[list[aiocoap.Message], CoapIngest, SaturatedSink]:
        sink = SaturatedSink()
        devices = coap_registry.devices_by_protocol("coap")
        server = CoapIngest(devices, coap_registry, sink, port=udp_port_pair(), busy_max_age_s=7)
        task = asyncio.create_task(server.run())
        try:
            await asyncio.wait_for(server.ready.wait(), 15)
            async with client() as ctx:
                uri = f"coap://127.0.0.1:{server.port}/up"
                answers = [await request(ctx, uri, _jbody("CJ001", float(k)), 50) for k in (1, 2)]
            return answers, server, sink
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    answers, server, sink = asyncio.run(scenario())
    assert [a.code for a in answers] == [Code.SERVICE_UNAVAILABLE] * 2
    assert all(a.opt.max_age == 7 for a in answers)
    assert server.stats.busy == 2 and server.stats.requests == 0
    assert sink.submitted == []
    assert rows(coap_db) == [] and _quarantine(coap_db) == []


def test_coap_exception_in_the_handler_is_a_processing_error_row_and_500(coap_db, coap_registry):
    async def scenario() -> tuple[list[aiocoap.Message], CoapIngest]:
        async with serving(coap_db, coap_registry) as (server, pipeline):
            server.sink = RaisingSink(pipeline, b"EXPLODE", ValueError)
            async with client() as ctx:
                uri = f"coap://127.0.0.1:{server.port}/up"
                bad = b'{"dev": "EXPLODE", "ts": %d, "reg": 1.0}' % COAP_T0
                answers = [
                    await request(ctx, uri, bad, 50),
                    await request(ctx, uri, _jbody("CJ005", 5.0), 50),
                ]
            return answers, server

    answers, server = asyncio.run(scenario())
    assert [a.code for a in answers] == [Code.INTERNAL_SERVER_ERROR, Code.CHANGED]
    assert server.stats.processing_errors == 1
    [(reason, address, _, detail, raw)] = _quarantine(coap_db)
    assert reason == "PROCESSING_ERROR" and "ValueError" in detail
    assert raw is not None and b"EXPLODE" in raw and address.endswith("/up")
    assert rows(coap_db) == [("CJ005", float(COAP_T0), 5.0)]


def test_batch_topic_still_routes():
    # The UNKNOWN_TOPIC path must not swallow the documented gateway topic.
    from protocols.mqtt import parse_topic

    assert parse_topic(batch_topic(ROOT, "v", "G1"), ROOT) is not None
    assert parse_topic(f"{ROOT}/v/gw/up", ROOT) is None


def test_coap_request_address_is_bounded_text():
    from protocols.coap import MAX_ADDRESS_CHARS, request_address

    msg = aiocoap.Message(code=Code.POST, uri_path=("up", "a\x00" * 200, "b" * 250, "c" * 250))
    address = request_address(msg)  # no remote on a message built here: "?" for the host
    assert isinstance(address, str) and address.startswith("?/up/a\x00")
    assert len(address) <= MAX_ADDRESS_CHARS + 40 and address.endswith("chars]")
