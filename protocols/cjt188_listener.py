"""An asyncio TCP listener for DTUs and concentrators that push CJ/T 188 frames over a socket.

Why a listener and not a poller: the DTUs and concentrators Chinese utilities deploy dial out to
the head-end (over GPRS/4G) and push the meters' 901FH answers, one or many per TCP segment, cut
anywhere. The listener reassembles frames from the byte stream, resolves each frame's 14-digit
address to a registry device, and submits one :class:`Frame` per CJ/T 188 frame to ingest.

What never becomes a reading goes to the quarantine with its reason, as a frame the transport
already refused (``Frame.rejection``): bytes that are no frame (MALFORMED), a wrong checksum
(BAD_CRC), a meter type or DI this codec does not read (UNSUPPORTED_FORMAT) and an address the
registry does not know (UNKNOWN_DEVICE). A connection that sends nothing for ``idle_timeout_s``
is closed; the DTU dials again.

The listener knows nothing of the database: it is given the address -> device map (see
:func:`cjt188_addresses`) and a :class:`FrameSink`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from protocols.cjt188 import END, FORMAT, PREAMBLE, START, frame_uplink, parse_frames
from protocols.payloads import MALFORMED
from protocols.uplink import Frame, FrameOutcome, FrameSink, PayloadError

log = logging.getLogger(__name__)

UNKNOWN_DEVICE = "UNKNOWN_DEVICE"  # ingest.validate's reason code of the same name
SOURCE = "cjt188"
MAX_JUNK = 4096  # bytes of non-frame data kept together in one quarantine row


def cjt188_addresses(registry: Any) -> dict[int, str]:
    """Registry devices whose vendor payload is ``cjt188``, by address (the device ``serial``).

    Why from the registry: the address in a frame is the meter's identity; a DTU cannot prove
    anything else, so only registered addresses are accepted.
    """
    cjt = {v.id for v in registry.vendors if getattr(v, "payload", None) == FORMAT}
    return {
        d.serial: d.id
        for d in registry.all_devices()
        if d.vendor in cjt and getattr(d, "serial", None) is not None
    }


class Cjt188Listener:
    """Accept DTU connections on ``host:port`` and submit what they push to ``sink``."""

    def __init__(
        self,
        addresses: dict[int, str],
        sink: FrameSink,
        *,
        host: str = "127.0.0.1",
        port: int = 9188,
        idle_timeout_s: float = 600.0,
        in_flight: int = 256,
    ) -> None:
        self.addresses = dict(addresses)
        self.sink = sink
        self.host = host
        self.port = port
        self.idle_timeout_s = idle_timeout_s
        self.in_flight = in_flight
        self.bound_port: int | None = None
        self.ready = asyncio.Event()
        self.frames = 0
        self.rejected = 0

    async def run(self) -> None:
        """Serve until cancelled (an ingest adapter's ``run``)."""
        server = await asyncio.start_server(self._serve, self.host, self.port)
        self.bound_port = server.sockets[0].getsockname()[1]
        log.info("CJ/T 188 listener on %s:%s", self.host, self.bound_port)
        self.ready.set()
        async with server:
            await server.serve_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        where = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        buf = bytearray()
        window = _Window(self.in_flight)
        try:
            while True:
                try:
                    data = await asyncio.wait_for(reader.read(4096), self.idle_timeout_s)
                except TimeoutError:
                    log.info("CJ/T 188 %s idle for %ss: closed", where, self.idle_timeout_s)
                    break
                if not data:
                    break
                buf += data
                for raw, rejection in split_stream(buf, final=False):
                    await self._submit(where, raw, rejection, window)
            for raw, rejection in split_stream(buf, final=True):
                await self._submit(where, raw, rejection, window)
        except (ConnectionError, OSError) as exc:
            log.info("CJ/T 188 %s: %s", where, exc)
        finally:
            await window.drain()
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    async def _submit(
        self, where: str, raw: bytes, rejection: tuple[str, str] | None, window: _Window
    ) -> None:
        frame = Frame(source=SOURCE, address=where, payload=raw, payload_format=FORMAT)
        if rejection is None:
            try:
                (parsed,) = parse_frames(raw)
            except PayloadError as err:
                rejection = (err.reason, err.detail)
                frame.device_hint = err.device
            else:
                device = self.addresses.get(int(parsed.address))
                if device is None:
                    rejection = (UNKNOWN_DEVICE, f"CJ/T 188 address {parsed.address} unknown")
                    frame.device_hint = parsed.device
                else:
                    up = frame_uplink(parsed)
                    up.device = device
                    frame.uplinks = [up]
                    frame.device_hint = frame.peer = device
        frame.rejection = rejection
        self.frames += 1
        self.rejected += rejection is not None
        await window.submit(self.sink, frame)


class _Window:
    """At most ``size`` frames of one connection submitted and not yet durable.

    Why not one frame at a time: a DTU pushes a day of its meters' frames in one session, and
    waiting for each frame's commit (a batch interval) would cap a connection at a few frames a
    second; why bounded: a DTU must not queue more than ingest has taken on.
    """

    def __init__(self, size: int) -> None:
        self._slots = asyncio.Semaphore(max(1, size))
        self._pending: set[asyncio.Future[FrameOutcome]] = set()

    async def submit(self, sink: FrameSink, frame: Frame) -> None:
        await self._slots.acquire()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[FrameOutcome] = loop.create_future()
        self._pending.add(future)

        def resolve(outcome: FrameOutcome) -> None:
            if not future.done():
                future.set_result(outcome)
            self._pending.discard(future)
            self._slots.release()

        def done(outcome: FrameOutcome) -> None:
            loop.call_soon_threadsafe(resolve, outcome)

        try:
            await loop.run_in_executor(None, sink.submit, frame, done)
        except BaseException:
            self._pending.discard(future)
            self._slots.release()
            raise

    async def drain(self) -> None:
        """Wait until every frame of the connection is durable (the session's end)."""
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)


def split_stream(buf: bytearray, *, final: bool) -> list[tuple[bytes, tuple[str, str] | None]]:
    """Complete frames (and junk, with its rejection) taken off the front of ``buf``.

    A frame is ``68 ... L ... CS 16``: its length is known from L once 11 bytes are in, so a
    frame cut across TCP segments waits for the rest. Bytes before a 68H that are not FE, and a
    "frame" whose end byte is not 16H, are junk up to the next 68H. ``final``: the connection
    closed, so what is left is junk too.
    """
    out: list[tuple[bytes, tuple[str, str] | None]] = []
    while buf:
        start = 0
        while start < len(buf) and buf[start] == PREAMBLE:
            start += 1
        if start == len(buf):
            del buf[:]  # wake-up bytes only
            break
        if buf[start] != START:
            nxt = buf.find(START, start)
            if nxt < 0 and not final and len(buf) < MAX_JUNK:
                break
            cut = len(buf) if nxt < 0 else nxt
            cut = min(cut, start + MAX_JUNK)
            out.append((bytes(buf[start:cut]), (MALFORMED, "bytes outside a CJ/T 188 frame")))
            del buf[:cut]
            continue
        if len(buf) - start < 11:
            if final:
                out.append((bytes(buf[start:]), (MALFORMED, "CJ/T 188 frame cut short")))
                del buf[:]
            break
        end = start + 11 + buf[start + 10] + 2
        if len(buf) < end:
            if final:
                out.append((bytes(buf[start:]), (MALFORMED, "CJ/T 188 frame cut short")))
                del buf[:]
            break
        if buf[end - 1] != END:
            nxt = buf.find(START, start + 1)
            cut = len(buf) if nxt < 0 else nxt
            out.append((bytes(buf[start:cut]), (MALFORMED, "CJ/T 188 frame without its end byte")))
            del buf[:cut]
            continue
        out.append((bytes(buf[start:end]), None))
        del buf[:end]
    return out
