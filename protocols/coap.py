"""CoAP server for NB-IoT meter uplinks (aiocoap 0.4.17), optionally over DTLS with per-device keys.

Resource (``path`` defaults to ``up``)::

    POST|PUT coap://HOST:PORT/up              device named by the payload (``dev``, or a serial)
    POST|PUT coap://HOST:PORT/up/{device_id}  device_id is the default for payloads without ``dev``
    the same on coaps://HOST:PORT+1/...       DTLS-PSK; identity = device id, key from the
                                              device's ``psk_env`` / ``psk_file``

Payloads are the formats of :mod:`protocols.payloads`, chosen by the Content-Format option:
50 ``application/json``, 60 ``application/cbor``, 42 ``application/octet-stream`` (``binary-v1``);
no option (or 0 ``text/plain``) sniffs the payload. Any other option answers 4.15.

Why the response waits for the database: a meter keeps its readings until it sees 2.04, so the
server answers only once ingest reports every reading committed or quarantined
(:func:`protocols.uplink.submit_and_wait`). aiocoap sends an empty ACK after 0.1 s and the answer as
a separate confirmable response, so a slow commit costs the meter no retransmissions.

Response codes (bad input is always quarantined by ingest first, never dropped):

=====================  ==================================================================
2.04 Changed           all readings stored (empty payload), or some stored and some
                       quarantined (diagnostic ``accepted=N quarantined=M REASON=K ...``)
4.00 Bad Request       nothing stored: undecodable (MALFORMED, BAD_CRC, UNSUPPORTED_FORMAT, the
                       decoder's detail is the diagnostic) or every reading failed validation
4.03 Forbidden         UNAUTHORIZED: readings for a device other than the DTLS identity (or one
                       of the gateway's meters), or, over plain CoAP, for any device that is
                       not a CoAP device marked ``allow_plain_coap`` (see "Who may send")
4.04 Not Found         UNKNOWN_DEVICE / UNKNOWN_CHANNEL / INACTIVE_DEVICE; or another path
4.08 Incomplete        a Block1 block out of sequence (nothing reached ingest; restart upload)
4.13 Too Large         an upload over ``max_payload_bytes``, refused while its blocks arrive:
                       one OVERSIZE row per upload with the bytes received so far (or, when
                       only a Size1 option announced it, the declared size in the detail)
4.15 Unsupported CF    a Content-Format other than the four above
5.00 Internal Error    the write failed (WRITE_FAILED), or our handler raised: that request is
                       quarantined as PROCESSING_ERROR with its payload before the answer
5.03 Unavailable       ingest is saturated (its queue full in frames or bytes): answered at
                       once with Max-Age ``busy_max_age_s`` and *nothing* submitted, no row
=====================  ==================================================================

Why 5.03 writes no row: a meter keeps its readings until it sees 2.04 and retries after
Max-Age, so nothing is lost; writing a row (or blocking on a full queue) would add work exactly
when ingest is behind and defeat the back-pressure. Busy answers count in ``stats.busy`` and are
logged at most once per ``BUSY_LOG_EVERY_S`` with the count since the last line.

Nothing raised while rendering escapes to aiocoap (which would answer 5.00 and keep no trace):
the catch-all quarantines the request as PROCESSING_ERROR and answers 5.00. The address of a
row (``host:port/uri/path``) is always text of at most ``MAX_ADDRESS_CHARS`` characters (a
Uri-Path segment may hold a NUL, which the quarantine writer escapes). A Uri-Path that is not
valid UTF-8 never reaches this module: aiocoap 0.4.17 fails to decode the datagram, sends no
answer, and the server goes on serving (the meter's retransmissions time out).

Block-wise uploads (RFC 7959 Block1) of large concentrator batches are reassembled by aiocoap
before the resource sees them (2.31 Continue per block); a block out of sequence answers 4.08 and
counts ``stats.blockwise_incomplete`` (a client must not interleave two uploads to the same
resource from one endpoint without a Request-Tag: aiocoap keys the assembly on endpoint and
options). Retransmitted confirmable requests (a lost ACK) are answered from aiocoap's message-layer
de-duplication cache without a second render, and a meter that resends an uplink as a new request
stores nothing twice (ingest's ON CONFLICT).

Who may send (the identity rules; ingest enforces them per reading):

* over DTLS, the PSK identity is a device id; it may send its own readings and those of the
  devices whose ``gateway`` it is (checked here against the registry the server started with, and
  again by ingest against the live registry as the frame's ``peer``). A frame naming any other
  device is refused whole: UNAUTHORIZED with the claimed device and the proven identity.
* over plain CoAP nothing is proven, so only CoAP devices with ``allow_plain_coap = true`` (which
  cannot have a key) are accepted. Readings for any other device -- a keyed meter, an MQTT meter,
  a device added to the registry after this server started -- are quarantined UNAUTHORIZED with
  the claimed device and ``unauthenticated coap from <address>`` as the proven identity, and
  counted in ``stats.plain_refused``. A plain frame mixing both is split: the allowed devices'
  readings are stored, the others refused (2.04 with a diagnostic, like any partial uplink).

Keys are read from each device's ``psk_env``/``psk_file`` (:mod:`aquameter.secrets`) when the
server starts (so a rotated key takes effect at the next start); a missing one stops the start
with a one-line error naming the device and the variable or file. Keys are never logged.

DTLS (``aiocoap[tinydtls]``, the ``DTLSSocket`` package): PSK only; aiocoap binds it on ``port + 1``
and only to a specific address. tinydtls silently drops the records of a handshake made with a
wrong key (RFC 6347 allows it) and reports nothing, so a refused handshake is counted here: a key
lookup for a known identity that is not followed by an authenticated request within
``dtls_handshake_timeout_s`` counts once in ``stats.dtls_handshakes_refused`` (once per identity
and window; unknown identities in ``stats.dtls_unknown_identity``). Registry keys are documented
in ``protocols/coap.sample.toml``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import aiocoap
import aiocoap.resource as resource
from aiocoap.credentials import DTLS, CredentialsMap
from aiocoap.error import RenderableError
from aiocoap.numbers.codes import Code

from aquameter.backoff import Backoff
from aquameter.registry import Device, Registry
from aquameter.secrets import SecretError
from protocols.payloads import BAD_CRC, MALFORMED, UNSUPPORTED_FORMAT, decode
from protocols.uplink import (
    Frame,
    FrameOutcome,
    FrameSink,
    PayloadError,
    Uplink,
    sink_saturated,
    submit_and_wait,
)

log = logging.getLogger("aquameter.coap")

# Content-Format numbers (IANA CoRE registry) -> payload format; None means "sniff".
# IANA CoAP Content-Formats; 110/112 are application/senml+json and senml+cbor (RFC 8428), what
# LwM2M water meters send.
CONTENT_FORMATS: dict[int, str | None] = {
    0: None,
    42: "binary-v1",
    50: "json",
    60: "cbor",
    110: "senml-json",
    112: "senml-cbor",
}
FORMAT_CONTENT: dict[str, int] = {
    "binary-v1": 42,
    "json": 50,
    "cbor": 60,
    "senml-json": 110,
    "senml-cbor": 112,
}

# Quarantine reason codes (documented in ingest/validate.py; protocols/ does not import ingest).
DECODE_REASONS = frozenset({MALFORMED, BAD_CRC, UNSUPPORTED_FORMAT})
NOT_FOUND_REASONS = frozenset({"UNKNOWN_DEVICE", "UNKNOWN_CHANNEL", "INACTIVE_DEVICE"})
UNAUTHORIZED = "UNAUTHORIZED"
WRITE_FAILED = "WRITE_FAILED"

# The start of the authenticated_device given to ingest for readings over plain CoAP that plain
# CoAP may not send: "unauthenticated coap from <address>". It contains spaces, so no registry id
# equals it and ingest quarantines those readings as UNAUTHORIZED, naming it as the proven peer.
UNAUTHENTICATED = "unauthenticated coap"


def unauthenticated(address: str) -> str:
    """The proven identity of a plain CoAP request: nobody, seen from ``address``."""
    return f"{UNAUTHENTICATED} from {address}"


PROCESSING_ERROR = "PROCESSING_ERROR"
OVERSIZE = "OVERSIZE"

MAX_DIAGNOSTIC_BYTES = 200
MAX_ADDRESS_CHARS = 512  # a Frame.address is at most this (plus a cut marker)
OVERSIZE_KEEP_BYTES = 4096  # bytes of a refused upload handed to the quarantine
BUSY_LOG_EVERY_S = 10.0
MAX_ERROR_CHARS = 500  # exception text in a PROCESSING_ERROR detail


@dataclass
class CoapStats:
    """Counters of the CoAP adapter; all updated on the event loop thread."""

    requests: int = 0
    dtls_requests: int = 0
    changed: int = 0
    partial: int = 0
    bad_request: int = 0
    forbidden: int = 0
    not_found: int = 0
    unsupported_content_format: int = 0
    server_errors: int = 0
    unknown_path: int = 0
    blockwise_incomplete: int = 0
    too_large: int = 0
    busy: int = 0  # 5.03 answers while ingest was saturated (nothing submitted)
    processing_errors: int = 0  # exceptions in our handler, quarantined as PROCESSING_ERROR
    bind_failures: int = 0
    readings_accepted: int = 0
    readings_quarantined: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)
    dtls_handshakes_refused: int = 0
    dtls_unknown_identity: int = 0
    plain_refused: int = 0  # plain CoAP requests with readings for a device plain may not send


# --- pure parts: formats, authorisation, response codes ------------------------------------
def payload_format(content_format: int | None) -> tuple[str | None, bool]:
    """(format for :func:`protocols.payloads.decode`, supported?) of a Content-Format option."""
    if content_format is None:
        return None, True
    if content_format in CONTENT_FORMATS:
        return CONTENT_FORMATS[content_format], True
    return f"content-format {content_format}", False


def psk_bytes(psk: str) -> bytes:
    """A registry ``psk``: UTF-8 text, or ``hex:...`` for binary keys."""
    if psk.startswith("hex:"):
        return bytes.fromhex(psk[4:].replace(":", "").replace(" ", ""))
    return psk.encode()


@dataclass(frozen=True)
class Authorisation:
    """Who may send readings for whom: a DTLS identity sends its own readings, a gateway's
    identity also those of the meters whose ``gateway`` it is; over plain CoAP only the devices
    in ``plain_allowed`` (CoAP devices marked ``allow_plain_coap``). Default deny: a device this
    server does not know (added after it started, or unknown) is not plain-allowed."""

    keyed: frozenset[str]
    gateway_of: dict[str, str]
    aliases: dict[str, str]
    plain_allowed: frozenset[str] = frozenset()
    require_dtls_for_keyed: bool = True

    @classmethod
    def from_registry(
        cls, devices: list[Device], registry: Registry, require_dtls_for_keyed: bool = True
    ) -> Authorisation:
        """``devices``: the CoAP devices this server serves. ``require_dtls_for_keyed`` False
        (a migration aid only) also lets keyed devices send over plain CoAP."""
        everyone = registry.all_devices()
        coap = [d for d in devices if d.protocol == "coap"]
        plain = {d.id for d in coap if d.allow_plain_coap}
        if not require_dtls_for_keyed:
            plain |= {d.id for d in coap if d.keyed}
        return cls(
            keyed=frozenset(d.id for d in devices if d.keyed),
            gateway_of={d.id: d.gateway for d in everyone if d.gateway},
            aliases={f"serial:{d.serial}": d.id for d in everyone if d.serial is not None},
            plain_allowed=frozenset(plain),
            require_dtls_for_keyed=require_dtls_for_keyed,
        )

    def may_send(self, identity: str | None, device: str) -> bool:
        """May a request with DTLS ``identity`` (None: plain CoAP) send ``device``'s readings?"""
        dev = self.aliases.get(device, device)
        if identity is None:
            return dev in self.plain_allowed
        return dev == identity or self.gateway_of.get(dev) == identity

    def authenticated_device(
        self, identity: str | None, uplinks: list[Uplink], address: str = "?"
    ) -> str | None:
        """The ``Frame.authenticated_device`` for ingest: None when every reading is allowed,
        else the proven identity (the DTLS identity, or ``unauthenticated coap from ADDRESS``),
        which makes ingest refuse every reading of the frame as UNAUTHORIZED."""
        if all(self.may_send(identity, u.device) for u in uplinks):
            return None
        return identity if identity is not None else unauthenticated(address)

    def split(
        self, identity: str | None, uplinks: list[Uplink], address: str
    ) -> list[tuple[list[Uplink], str | None]]:
        """The uplinks as (group, authenticated_device) frames to submit.

        Over DTLS one group (a frame naming a device the identity may not send is refused
        whole: the identity tried to speak for someone else). Over plain CoAP the plain-allowed
        devices' uplinks (accepted from anyone anyway) are kept apart from the others, so one
        foreign or unknown meter in a concentrator batch does not take the rest down with it.
        """
        if identity is not None or not uplinks:
            return [(uplinks, self.authenticated_device(identity, uplinks, address))]
        allowed = [u for u in uplinks if self.may_send(None, u.device)]
        refused = [u for u in uplinks if not self.may_send(None, u.device)]
        groups: list[tuple[list[Uplink], str | None]] = []
        if allowed:
            groups.append((allowed, None))
        if refused:
            groups.append((refused, unauthenticated(address)))
        return groups


def diagnostic(outcome: FrameOutcome) -> bytes:
    counts = Counter(outcome.reasons)
    parts = [f"accepted={outcome.accepted}", f"quarantined={outcome.quarantined}"]
    parts += [f"{reason}={n}" for reason, n in sorted(counts.items())]
    return " ".join(parts).encode()[:MAX_DIAGNOSTIC_BYTES]


def response_for(
    outcome: FrameOutcome, *, decode_detail: str | None = None, supported: bool = True
) -> tuple[Code, bytes]:
    """Map a durable frame outcome to a CoAP response code and diagnostic payload."""
    if outcome.error is not None:
        return Code.INTERNAL_SERVER_ERROR, outcome.error.encode()[:MAX_DIAGNOSTIC_BYTES]
    if outcome.accepted and not outcome.quarantined:
        return Code.CHANGED, b""
    if outcome.accepted:
        return Code.CHANGED, diagnostic(outcome)
    reasons = set(outcome.reasons)
    if not reasons:
        return Code.CHANGED, diagnostic(outcome)  # an empty batch: nothing to store
    if WRITE_FAILED in reasons:
        return Code.INTERNAL_SERVER_ERROR, diagnostic(outcome)
    if not supported:
        return Code.UNSUPPORTED_CONTENT_FORMAT, diagnostic(outcome)
    if reasons & DECODE_REASONS:
        detail = f"{outcome.reasons[0]}: {decode_detail}" if decode_detail else None
        body = detail.encode()[:MAX_DIAGNOSTIC_BYTES] if detail else diagnostic(outcome)
        return Code.BAD_REQUEST, body
    if UNAUTHORIZED in reasons:
        return Code.FORBIDDEN, diagnostic(outcome)
    if reasons & NOT_FOUND_REASONS:
        return Code.NOT_FOUND, diagnostic(outcome)
    return Code.BAD_REQUEST, diagnostic(outcome)


# --- DTLS keys and refused-handshake accounting ----------------------------------------------
class HandshakeWatch:
    """Notices DTLS handshakes that looked a key up but never authenticated a request."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._pending: dict[str, float] = {}
        self._unknown: dict[str, float] = {}

    def key_lookup(self, identity: str, known: bool, now: float) -> bool:
        """Record a lookup; True when it is a new unknown identity (to be counted)."""
        if known:
            self._pending.setdefault(identity, now)
            return False
        if identity in self._unknown:
            return False
        self._unknown[identity] = now
        return True

    def authenticated(self, identity: str) -> None:
        self._pending.pop(identity, None)

    def expire(self, now: float) -> list[str]:
        """Identities whose handshake did not complete within the timeout (wrong key)."""
        failed = [i for i, t in self._pending.items() if now - t > self.timeout_s]
        for identity in failed:
            del self._pending[identity]
        for identity in [i for i, t in self._unknown.items() if now - t > self.timeout_s]:
            del self._unknown[identity]
        return failed


class PskCredentials(CredentialsMap):
    """The server's DTLS keys (identity = device id) with an O(1) lookup that reports every
    lookup, so refused handshakes can be counted (tinydtls itself reports none)."""

    def __init__(self, keys: dict[str, bytes], on_lookup: Any = None) -> None:
        super().__init__()
        self._by_identity: dict[bytes, tuple[bytes, str]] = {}
        for device_id, key in keys.items():
            identity = device_id.encode()
            self[device_id] = DTLS(psk=key, client_identity=identity)
            self._by_identity[identity] = (key, device_id)
        self._on_lookup = on_lookup

    def find_dtls_psk(self, identity: bytes) -> tuple[bytes, str]:
        found = self._by_identity.get(bytes(identity))
        if self._on_lookup is not None:
            self._on_lookup(bytes(identity), found is not None)
        if found is None:
            raise KeyError(identity)
        return found


def dtls_available() -> str | None:
    """None when DTLS can run here, else why not."""
    try:
        from DTLSSocket import dtls  # noqa: F401
    except ImportError as exc:
        return f"DTLSSocket not importable ({exc}); pip install 'aiocoap[tinydtls]'"
    return None


# --- the server -------------------------------------------------------------------------------
class _UplinkEndpoint(resource.Resource, resource.PathCapable):  # type: ignore[misc]
    """Root resource: parses the path itself so ``/up`` and ``/up/{device}`` share one handler."""

    def __init__(self, adapter: CoapIngest) -> None:
        super().__init__()
        self._adapter = adapter

    async def render_to_pipe(self, pipe: Any) -> None:
        """Every message (each Block1 block too) passes here. Nothing raised here escapes to
        aiocoap except its own renderable errors (2.31 Continue, 4.08 of the Block1 spool)."""
        answered = False
        try:
            request = pipe.request
            # A DTLS request proves its handshake.
            self._adapter._note_request(request)
            if await self._refuse_oversize(pipe):
                answered = True
                return
            try:
                await super().render_to_pipe(pipe)
                answered = True
            except ValueError:
                # aiocoap's Block1 spool raises a bare ValueError for a block that does not
                # continue the upload it has for this endpoint and resource (a lost block, or
                # two uploads interleaved without Request-Tag). Nothing reached ingest: the
                # client must restart.
                self._adapter.stats.blockwise_incomplete += 1
                log.warning("Block1 upload from %s out of sequence", request.remote.hostinfo)
                pipe.add_response(
                    aiocoap.Message(
                        code=Code.REQUEST_ENTITY_INCOMPLETE, payload=b"block out of sequence"
                    ),
                    is_last=True,
                )
                answered = True
        except RenderableError:
            raise  # aiocoap's own answers (2.31 Continue, 4.08 from the Block1 spool)
        except Exception as exc:
            if answered:
                log.exception("CoAP: error after the response was sent")
                return
            response = await self._adapter.processing_error(pipe.request, exc)
            pipe.add_response(response, is_last=True)

    async def _refuse_oversize(self, pipe: Any) -> bool:
        """Answer 4.13 to an upload over the limit (while its blocks arrive, so the Block1
        spool cannot grow without bound); True when refused."""
        adapter = self._adapter
        request = pipe.request
        limit = adapter.max_payload_bytes
        block1 = request.opt.block1
        start = block1.start if block1 is not None else 0
        size = start + len(request.payload)
        declared = request.opt.size1 or 0
        if size <= limit and declared <= limit:
            return False
        adapter.stats.too_large += 1
        log.warning("upload from %s over %d bytes refused", request.remote.hostinfo, limit)
        response = aiocoap.Message(
            code=Code.REQUEST_ENTITY_TOO_LARGE, payload=f"max {limit} bytes".encode()
        )
        response.opt.size1 = limit
        # One row per upload: the block that crosses the limit (or the first block, when
        # Size1 announced too much). Later blocks of a refused upload are refused silently.
        first = start == 0 or start <= limit < size
        if first and sink_saturated(adapter.sink):
            response = adapter.busy(request)
        elif first:
            received = self._received_so_far(request)
            await adapter.oversize(request, received, size, declared, limit)
        self._forget_upload(request)
        pipe.add_response(response, is_last=True)
        return True

    def _received_so_far(self, request: aiocoap.Message) -> bytes:
        """The first bytes of the upload: the Block1 spool's assembly plus this block.

        The spool is aiocoap-internal (0.4.17: ``Resource._block1._assemblies``, a TimeoutDict
        keyed by ``blockwise._extract_block_key``); when it is not there, this block is what
        we have."""
        head = b""
        block1 = request.opt.block1
        if block1 is not None and block1.block_number > 0:
            try:
                from aiocoap.blockwise import _extract_block_key

                assembly = self._block1._assemblies[_extract_block_key(request)]
                head = bytes(assembly.payload)[: block1.start]
            except Exception:  # no assembly (or aiocoap internals changed): this block only
                head = b""
        return (head + bytes(request.payload))[:OVERSIZE_KEEP_BYTES]

    def _forget_upload(self, request: aiocoap.Message) -> None:
        """Drop a refused upload's partial assembly now rather than at the spool's timeout."""
        try:
            from aiocoap.blockwise import _extract_block_key

            self._block1._assemblies._items.pop(_extract_block_key(request), None)
        except Exception:  # aiocoap internals changed: the spool's own timeout frees it
            pass

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        return await self._adapter.handle(request)

    async def render_put(self, request: aiocoap.Message) -> aiocoap.Message:
        return await self._adapter.handle(request)


class CoapIngest:
    """CoAP (and CoAPS) uplink server feeding a :class:`FrameSink`; answers when durable."""

    def __init__(
        self,
        devices: list[Device],
        registry: Registry,
        sink: FrameSink,
        *,
        host: str = "127.0.0.1",
        port: int = 5683,
        path: str = "up",
        dtls: bool | None = None,
        require_dtls_for_keyed: bool = True,
        dtls_handshake_timeout_s: float = 30.0,
        sweep_every_s: float = 1.0,
        max_payload_bytes: int = 1 << 20,
        bind_retry_max_s: float = 30.0,
        busy_max_age_s: int = 30,
    ) -> None:
        """``dtls`` None: serve coaps on ``port + 1`` when a device has a ``psk`` and DTLSSocket
        is installed; True: required (run() raises without DTLSSocket); False: plain CoAP only.
        ``host`` must be a specific address when DTLS runs (an aiocoap limitation).
        ``max_payload_bytes`` bounds a (block-wise) upload: larger ones get 4.13 while they
        arrive, so a client cannot make the Block1 spool grow without limit. While the ports
        cannot be bound, run() retries with backoff up to ``bind_retry_max_s`` apart.
        ``busy_max_age_s`` is the Max-Age of a 5.03 while ingest is saturated: how long a meter
        waits before it retries (long enough for the queue to drain, short enough that a
        meter's buffer does not fill)."""
        self.devices = devices
        self.registry = registry
        self.sink = sink
        self.host = host
        self.port = port
        self.path = tuple(p for p in path.strip("/").split("/") if p)
        self.stats = CoapStats()
        self.auth = Authorisation.from_registry(devices, registry, require_dtls_for_keyed)
        self.keys: dict[str, bytes] = {}  # read from psk_env / psk_file by start()
        self.dtls = bool(self.auth.keyed) if dtls is None else dtls
        self._dtls_required = dtls is True
        self.dtls_port: int | None = port + 1 if self.dtls else None
        self.sweep_every_s = sweep_every_s
        self.max_payload_bytes = max_payload_bytes
        self.bind_retry_max_s = bind_retry_max_s
        self.busy_max_age_s = busy_max_age_s
        self._busy_logged_at = -BUSY_LOG_EVERY_S
        self._busy_unlogged = 0
        self.watch = HandshakeWatch(dtls_handshake_timeout_s)
        self.ready = asyncio.Event()
        self._context: Any = None

    # --- lifecycle ---------------------------------------------------------------------------
    def load_keys(self) -> dict[str, bytes]:
        """Every keyed device's DTLS key, read now from its ``psk_env`` / ``psk_file``.

        Why at start and not at registry load: the key then lives only in this process's
        memory, a rotated key is picked up by a restart, and a missing key stops the server
        with a one-line :class:`~aquameter.secrets.SecretError` naming the device and the
        variable or file (never the key) instead of refusing that meter's handshakes silently.
        """
        keys: dict[str, bytes] = {}
        for dev in self.devices:
            if not dev.keyed:
                continue
            psk = dev.resolve_psk()
            assert psk is not None
            try:
                keys[dev.id] = psk_bytes(psk)
            except ValueError:
                raise SecretError(
                    f"device {dev.id}: its psk starts with hex: but is not hex"
                ) from None
        return keys

    async def start(self) -> None:
        self.keys = self.load_keys()
        transports = ["udp6"]
        if self.dtls:
            missing = dtls_available()
            if missing is not None:
                if self._dtls_required:
                    raise RuntimeError(f"DTLS requested but unavailable: {missing}")
                log.error("DTLS disabled, keyed devices will be refused: %s", missing)
                self.dtls, self.dtls_port = False, None
            else:
                transports.append("tinydtls_server")
        # aiocoap leaks the transports it bound when a later one fails (and udp6 binds with
        # SO_REUSEPORT, so a leaked socket would quietly share the port): check both first.
        _check_bindable(self.host, self.port)
        if self.dtls_port is not None:
            _check_bindable(self.host, self.dtls_port)
        credentials = PskCredentials(self.keys, self._key_lookup)
        self._context = await aiocoap.Context.create_server_context(
            _UplinkEndpoint(self),
            bind=(self.host, self.port),
            loggername="aquameter.coap.aiocoap",
            server_credentials=credentials,
            transports=transports,
        )
        log.info(
            "CoAP uplinks on coap://%s:%d/%s%s",
            self.host,
            self.port,
            "/".join(self.path),
            f" and coaps port {self.dtls_port}" if self.dtls_port else "",
        )
        self.ready.set()

    async def stop(self) -> None:
        if self._context is not None:
            await self._context.shutdown()
            self._context = None
        self.ready.clear()

    async def run(self) -> None:
        """Serve until cancelled."""
        backoff = Backoff(0.5, self.bind_retry_max_s)
        while True:
            try:
                await self.start()
                break
            except OSError as err:  # the port is still held, the address not up yet, ...
                self.stats.bind_failures += 1
                delay = backoff.failed()
                ports = f"{self.port}" + (f"/{self.dtls_port}" if self.dtls_port else "")
                log.error(
                    "CoAP cannot bind %s:%s (%s); retry in %.1fs", self.host, ports, err, delay
                )
                await asyncio.sleep(delay)
        try:
            while True:
                await asyncio.sleep(self.sweep_every_s)
                self._sweep()
        finally:
            await self.stop()

    # --- DTLS accounting ---------------------------------------------------------------------
    def _key_lookup(self, identity: bytes, known: bool) -> None:
        name = identity.decode(errors="replace")
        if self.watch.key_lookup(name, known, time.monotonic()):
            self.stats.dtls_unknown_identity += 1
            log.warning("DTLS handshake with unknown PSK identity %r refused", name)

    def _note_request(self, request: aiocoap.Message) -> None:
        identity = _identity(request)
        if identity is not None:
            self.watch.authenticated(identity)

    def _sweep(self) -> None:
        for identity in self.watch.expire(time.monotonic()):
            self.stats.dtls_handshakes_refused += 1
            log.warning(
                "DTLS handshake of %r did not complete within %.0fs: wrong key, refused",
                identity,
                self.watch.timeout_s,
            )

    # --- requests ----------------------------------------------------------------------------
    async def handle(self, request: aiocoap.Message) -> aiocoap.Message:
        """Answer one (reassembled) uplink request; never raises (see the module docstring)."""
        try:
            return await self._handle(request)
        except Exception as exc:  # never let one request take the server down
            return await self.processing_error(request, exc)

    async def processing_error(self, request: aiocoap.Message, exc: Exception) -> aiocoap.Message:
        """Our handler raised: quarantine the request as PROCESSING_ERROR, answer 5.00.

        The meter retries a 5.00, so the row may repeat; it is still better than a request
        that failed without a trace. Never raises: if even the row fails, 5.00 alone."""
        self.stats.server_errors += 1
        self.stats.processing_errors += 1
        text = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
        log.error("CoAP uplink failed: %s", text, exc_info=exc)
        try:
            frame = Frame(
                source=_source(request),
                address=request_address(request),
                payload=bytes(request.payload),
                rejection=(PROCESSING_ERROR, text),
            )
            await submit_and_wait(self.sink, frame)
        except Exception:
            log.exception("CoAP: could not quarantine the failed request either")
        return aiocoap.Message(
            code=Code.INTERNAL_SERVER_ERROR, payload=text.encode()[:MAX_DIAGNOSTIC_BYTES]
        )

    def busy(self, request: aiocoap.Message) -> aiocoap.Message:
        """5.03 with Max-Age: ingest is saturated. Nothing is submitted (see the module
        docstring); counted, and logged at most once per ``BUSY_LOG_EVERY_S``."""
        self.stats.busy += 1
        self._busy_unlogged += 1
        now = time.monotonic()
        if now - self._busy_logged_at >= BUSY_LOG_EVERY_S:
            log.warning(
                "ingest saturated: %d CoAP request(s) answered 5.03 (Max-Age %ds) since the "
                "last line, latest from %s",
                self._busy_unlogged,
                self.busy_max_age_s,
                request_address(request),
            )
            self._busy_logged_at = now
            self._busy_unlogged = 0
        response = aiocoap.Message(code=Code.SERVICE_UNAVAILABLE, payload=b"busy, retry later")
        response.opt.max_age = self.busy_max_age_s
        return response

    async def oversize(
        self, request: aiocoap.Message, received: bytes, size: int, declared: int, limit: int
    ) -> None:
        """Quarantine a refused upload as OVERSIZE with the bytes that arrived so far."""
        if received:
            detail = (
                f"upload over max_payload_bytes {limit}: refused at {size} bytes"
                + (f" (Size1 declared {declared})" if declared else "")
                + f"; first {len(received)} bytes kept"
            )
        else:
            detail = f"upload over max_payload_bytes {limit}: Size1 declared {declared} bytes"
        frame = Frame(
            source=_source(request),
            address=request_address(request),
            payload=received,
            rejection=(OVERSIZE, detail),
        )
        outcome = await submit_and_wait(self.sink, frame)
        self.stats.readings_quarantined += outcome.quarantined
        self.stats.quarantined.update(outcome.reasons)

    async def _handle(self, request: aiocoap.Message) -> aiocoap.Message:
        path = tuple(request.opt.uri_path)
        n = len(self.path)
        if path[:n] != self.path or len(path) > n + 1 or (len(path) == n + 1 and not path[n]):
            self.stats.unknown_path += 1
            return aiocoap.Message(code=Code.NOT_FOUND, payload=b"no such resource")
        # Not cut: the codec refuses a device id over 128 characters with its real length.
        hint = path[n] if len(path) == n + 1 else None
        if sink_saturated(self.sink):
            return self.busy(request)
        identity = _identity(request)
        self.stats.requests += 1
        self.stats.dtls_requests += identity is not None
        cf = request.opt.content_format
        fmt, supported = payload_format(None if cf is None else int(cf))
        frame = Frame(
            source=_source(request),
            address=request_address(request),
            payload=bytes(request.payload),
            payload_format=fmt,
            device_hint=hint,
            peer=identity,  # ingest checks the DTLS identity again, against the live registry
        )
        decode_detail = None
        frames = [frame]
        if supported:
            try:
                uplinks = decode(frame.payload, fmt, hint)
            except PayloadError as err:
                decode_detail = err.detail  # ingest decodes again and quarantines the payload
            else:
                frames = self._authorise(frame, identity, uplinks)
        outcome = FrameOutcome()
        for part in frames:
            got = await submit_and_wait(self.sink, part)
            outcome.accepted += got.accepted
            outcome.quarantined += got.quarantined
            outcome.reasons += got.reasons
            outcome.error = outcome.error or got.error
        code, body = response_for(outcome, decode_detail=decode_detail, supported=supported)
        self._count(code, outcome)
        if code != Code.CHANGED or body:
            log.info("CoAP %s from %s: %s %s", path, frame.address, code, body.decode())
        return aiocoap.Message(code=code, payload=body)

    def _authorise(self, frame: Frame, identity: str | None, uplinks: list[Uplink]) -> list[Frame]:
        """``frame`` as the frames to submit, each with its ``authenticated_device``
        (:meth:`Authorisation.split`); a plain request with refused readings is counted and
        logged with the claimed devices and the address (never a key)."""
        groups = self.auth.split(identity, uplinks, frame.address)
        frames = []
        for i, (group, authenticated) in enumerate(groups):
            part = frame if i == 0 else replace(frame)
            part.uplinks = group
            part.authenticated_device = authenticated
            frames.append(part)
            if identity is None and authenticated is not None:
                self.stats.plain_refused += 1
                claimed = sorted({u.device for u in group})
                log.warning(
                    "plain CoAP from %s for %s refused: not allow_plain_coap (use DTLS)",
                    frame.address,
                    ", ".join(claimed[:5])
                    + (f" (+{len(claimed) - 5})" if len(claimed) > 5 else ""),
                )
        return frames

    def _count(self, code: Code, outcome: FrameOutcome) -> None:
        s = self.stats
        s.readings_accepted += outcome.accepted
        s.readings_quarantined += outcome.quarantined
        s.quarantined.update(outcome.reasons)
        if code == Code.CHANGED:
            if outcome.quarantined:
                s.partial += 1
            else:
                s.changed += 1
        elif code == Code.BAD_REQUEST:
            s.bad_request += 1
        elif code == Code.FORBIDDEN:
            s.forbidden += 1
        elif code == Code.NOT_FOUND:
            s.not_found += 1
        elif code == Code.UNSUPPORTED_CONTENT_FORMAT:
            s.unsupported_content_format += 1
        else:
            s.server_errors += 1


def _check_bindable(host: str, port: int) -> None:
    """Raise OSError when (host, port) cannot be bound for UDP right now."""
    family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind(addr)


def request_address(request: aiocoap.Message) -> str:
    """``host:port/uri/path`` of a request as text of bounded length, whatever it holds."""
    try:
        host = str(request.remote.hostinfo)
    except Exception:
        host = "?"
    try:
        path = "/".join(str(p) for p in request.opt.uri_path)
    except Exception:
        path = "?"
    return _bounded(f"{host}/{path}", MAX_ADDRESS_CHARS)


def _bounded(text: str, limit: int) -> str:
    if len(text) > limit:
        return f"{text[:limit]}…[cut {len(text) - limit} chars]"
    return text


def _source(request: aiocoap.Message) -> str:
    try:
        return "coaps" if _identity(request) is not None else "coap"
    except Exception:
        return "coap"


def _identity(request: aiocoap.Message) -> str | None:
    """The DTLS PSK identity (our credentials name entries by device id), None over plain UDP."""
    claims = getattr(request.remote, "authenticated_claims", None) or ()
    for claim in claims:
        if isinstance(claim, str):
            return claim
    return None
