"""Modbus TCP poller for pump stations and bulk meters behind PLCs (pymodbus 3.16 asyncio client).

Register maps live in the registry (``protocols/modbus.sample.toml`` documents every key): a
device's ``params`` say where it is (``host``, ``port``, ``unit_id``) and how often to poll it;
each channel's ``params`` say where its value sits (``table``, 0-based PDU ``address``, ``type``,
``byte_order``, ``word_order``, ``scale``, ``offset``). The channel ``unit`` is the unit the
device sends; ingest converts it to the canonical unit, exactly as for every other transport.

How a poll works, and what a utility engineer sees when a station misbehaves:

* Every device has its own asyncio task and its own TCP connection, with a short ``timeout_s``: a
  dead station only ever delays itself, never its neighbours.
* Channels of one table are read in as few requests as the 125-register / 2000-bit limits and
  ``max_gap`` allow (:func:`protocols.modbus_decode.plan_blocks`). One poll becomes one
  :class:`Frame`; every value in it carries the poll's wall-clock time (taken when the first request
  goes out), so values read together are stored together.
* A read that fails stores **nothing** for its channels: no made-up value, no zero, no repeat of
  the last value. The gap in ``readings`` is the honest record (COMMS_LOSS and the VEE gap rules
  work from gaps). The failure is counted in :class:`ModbusStats`, and the channel's outage start
  is kept in ``stats.devices[dev].bad_since`` / ``failed_channels``.
* The first value a channel delivers after an outage carries ``Quality.UNCERTAIN``: a PLC that has
  just rebooted may serve defaults for a poll or two, and a totaliser's first delta after a gap
  spans the whole outage. Later values carry quality 0 again.
* Timeouts, refused connections and dropped connections are connection failures: the socket is
  closed (so a late answer can never be matched to the next request) and the device is retried
  after an exponential backoff from ``backoff_min_s`` doubling up to ``backoff_max_s`` (±10 %
  jitter, so a fleet does not reconnect in lockstep after a network blip). The device's poll
  cadence resumes after the first good poll.
* A Modbus exception response (the device answered "no") is not a connection failure. The block is
  re-read point by point in the same poll, so one bad address does not blank its neighbours; after
  exception 02/03 (illegal address/value: the map asks for something the device does not have)
  the split is kept for the life of the poller. Codes are counted per code.
* Frames go to the sink with :func:`submit_and_wait`; at most ``max_inflight`` frames per device
  wait for durability, after which polling pauses (backpressure) and missed ticks are counted as
  ``skipped_polls`` instead of being caught up in a burst.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from aquameter.backoff import backoff_delay
from aquameter.registry import Device, Registry
from protocols.modbus_decode import (
    BIT_TABLES,
    Block,
    ModbusConfigError,
    Point,
    decode_point,
    parse_point,
    plan_blocks,
)
from protocols.params import ModbusDeviceParams, ParamsError, validate_params
from protocols.uplink import Frame, FrameOutcome, FrameSink, Quality, Uplink, submit_and_wait

log = logging.getLogger("aquameter.modbus")

SOURCE = "modbus"
# Exception codes that mean "this map asks for what the device does not have": keep a split.
STRUCTURAL_EXCEPTIONS = frozenset({2, 3})


@dataclass(frozen=True)
class ModbusOptions:
    """Defaults for device params the registry leaves out (each key can be set per device)."""

    port: int = 502
    unit_id: int = 1
    poll_interval_s: float = 10.0
    timeout_s: float = 1.0
    max_gap: int = 16
    backoff_min_s: float = 1.0
    backoff_max_s: float = 60.0
    max_inflight: int = 4
    uncertain_after_outage: bool = True
    drain_s: float = 5.0  # on cancel, wait this long for submitted frames to become durable


@dataclass(frozen=True)
class DevicePlan:
    """A device's validated connection settings and read blocks."""

    device: str
    host: str
    port: int
    unit_id: int
    poll_interval_s: float
    timeout_s: float
    max_gap: int
    backoff_min_s: float
    backoff_max_s: float
    points: tuple[Point, ...]
    blocks: tuple[Block, ...]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}#{self.unit_id}"


@dataclass
class DeviceStatus:
    """Live state of one device; ``bad_since`` is the wall time of the first failed poll of the
    current outage (None while every channel reads)."""

    device: str
    address: str
    connected: bool = False
    bad_since: float | None = None
    last_ok: float | None = None
    consecutive_failures: int = 0
    retry_in_s: float = 0.0
    failed_channels: dict[str, float] = field(default_factory=dict)
    split_blocks: int = 0


@dataclass
class ModbusStats:
    polls: int = 0
    polls_ok: int = 0
    polls_partial: int = 0
    polls_failed: int = 0
    skipped_polls: int = 0
    requests: int = 0
    registers_read: int = 0
    bits_read: int = 0
    timeouts: int = 0
    exceptions: int = 0
    exception_codes: dict[int, int] = field(default_factory=dict)
    connects: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    short_responses: int = 0
    frames: int = 0
    readings: int = 0
    uncertain: int = 0
    accepted: int = 0
    quarantined: int = 0
    errors: int = 0
    config_errors: list[str] = field(default_factory=list)
    devices: dict[str, DeviceStatus] = field(default_factory=dict)


def _param(params: dict[str, Any], key: str, default: Any, cast: type, where: str) -> Any:
    value = params.get(key, default)
    try:
        return cast(value)
    except (TypeError, ValueError):
        raise ModbusConfigError(f"{where}: {key} = {value!r} is not a {cast.__name__}") from None


def plan_device(
    device: Device, registry: Registry, options: ModbusOptions | None = None
) -> tuple[DevicePlan, list[str]]:
    """Validate a device's params and its channels' register map.

    Raises :class:`ModbusConfigError` for a device that cannot be polled at all; a bad channel is
    left out and its error returned, so one typo does not silence a whole station.
    """
    opts = options or ModbusOptions()
    where = f"device {device.id}"
    p = device.params
    try:  # a misspelt key is an error, not a silent default
        validate_params(ModbusDeviceParams, p, where)
    except ParamsError as err:
        raise ModbusConfigError(str(err)) from None
    host = p.get("host")
    if not host:
        raise ModbusConfigError(f"{where}: params.host is required")
    port = _param(p, "port", opts.port, int, where)
    unit_id = _param(p, "unit_id", opts.unit_id, int, where)
    if not 0 <= unit_id <= 255:
        raise ModbusConfigError(f"{where}: unit_id must be 0..255")
    interval = _param(p, "poll_interval_s", opts.poll_interval_s, float, where)
    timeout = _param(p, "timeout_s", opts.timeout_s, float, where)
    if interval <= 0 or timeout <= 0:
        raise ModbusConfigError(f"{where}: poll_interval_s and timeout_s must be > 0")
    max_gap = _param(p, "max_gap", opts.max_gap, int, where)
    backoff_min = _param(p, "backoff_min_s", opts.backoff_min_s, float, where)
    backoff_max = max(backoff_min, _param(p, "backoff_max_s", opts.backoff_max_s, float, where))
    errors: list[str] = []
    points: list[Point] = []
    for ch in registry.channels_of(device):
        try:
            points.append(parse_point(ch.name, ch.unit, ch.params, f"{where} channel {ch.name}"))
        except ModbusConfigError as err:
            errors.append(str(err))
    if not points:
        raise ModbusConfigError(f"{where}: no channel has a usable register map")
    plan = DevicePlan(
        device=device.id,
        host=str(host),
        port=port,
        unit_id=unit_id,
        poll_interval_s=interval,
        timeout_s=timeout,
        max_gap=max_gap,
        backoff_min_s=backoff_min,
        backoff_max_s=backoff_max,
        points=tuple(points),
        blocks=tuple(plan_blocks(points, max_gap=max_gap)),
    )
    return plan, errors


@dataclass
class _PollResult:
    values: dict[str, float] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)
    connection_failed: bool = False


class ModbusPoller:
    """Polls every Modbus device it is given into a :class:`FrameSink` until cancelled."""

    def __init__(
        self,
        devices: list[Device],
        registry: Registry,
        sink: FrameSink,
        *,
        options: ModbusOptions | None = None,
    ) -> None:
        self.options = options or ModbusOptions()
        self.sink = sink
        self.stats = ModbusStats()
        self.plans: list[DevicePlan] = []
        for dev in devices:
            try:
                plan, errors = plan_device(dev, registry, self.options)
            except ModbusConfigError as err:
                self.stats.config_errors.append(str(err))
                log.error("modbus: %s; device not polled", err)
                continue
            for e in errors:
                log.error("modbus: %s; channel not polled", e)
            self.stats.config_errors.extend(errors)
            self.plans.append(plan)
            self.stats.devices[plan.device] = DeviceStatus(plan.device, plan.address)

    async def run(self) -> None:
        """Poll every device, each in its own task, until cancelled."""
        tasks = [
            asyncio.create_task(_DevicePoller(self, plan).run(), name=f"modbus-{plan.device}")
            for plan in self.plans
        ]
        try:
            if tasks:
                await asyncio.gather(*tasks)
            else:
                await asyncio.Event().wait()
        finally:
            for t in tasks:  # gather's cancellation already reached them; never cut their drain
                if not t.done() and not t.cancelling():
                    t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


class _DevicePoller:
    """One device's loop: connect, poll on its cadence, back off on failure."""

    def __init__(self, owner: ModbusPoller, plan: DevicePlan) -> None:
        self.owner = owner
        self.plan = plan
        self.stats = owner.stats
        self.status = owner.stats.devices[plan.device]
        self.blocks: list[Block] = list(plan.blocks)
        self.client: AsyncModbusTcpClient | None = None
        self.inflight = asyncio.Semaphore(owner.options.max_inflight)
        self.pending: set[asyncio.Task[None]] = set()

    # --- loop ------------------------------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.plan.poll_interval_s
        next_due = loop.time()
        try:
            me = asyncio.current_task()
            while True:
                # Python 3.11's asyncio.wait_for (used inside pymodbus) can swallow a cancellation
                # that races with I/O completion; the request stays recorded on the task.
                if me is not None and me.cancelling():
                    raise asyncio.CancelledError
                delay = next_due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                try:
                    ok = await self._cycle()
                except asyncio.CancelledError:
                    raise
                except Exception:  # a bug or an unforeseen peer reply must not end the loop
                    self.stats.errors += 1
                    log.exception("modbus %s: poll failed unexpectedly", self.plan.device)
                    self._drop_client()
                    ok = False
                now = loop.time()
                if ok:
                    self.status.consecutive_failures = 0
                    self.status.retry_in_s = 0.0
                    next_due += interval
                    if next_due <= now:  # poll or sink slower than the cadence: skip, no burst
                        missed = int((now - next_due) // interval) + 1
                        self.stats.skipped_polls += missed
                        next_due += missed * interval
                else:
                    self.status.consecutive_failures += 1
                    n = self.status.consecutive_failures
                    backoff = backoff_delay(
                        n, self.plan.backoff_min_s, self.plan.backoff_max_s, jitter=0.1
                    )
                    self.status.retry_in_s = backoff
                    next_due = now + backoff
        finally:
            self._drop_client()
            if self.pending:  # frames already handed over: let them become durable (bounded)
                await asyncio.wait(set(self.pending), timeout=self.owner.options.drain_s)
            for t in list(self.pending):
                t.cancel()

    async def _cycle(self) -> bool:
        """Connect if needed and poll once. False on a connection failure (back off)."""
        if self.client is None or not self.client.connected:
            self._drop_client()
            if not await self._connect():
                everything = {p.channel for p in self.plan.points}
                self._record(time.time(), _PollResult(failed=everything, connection_failed=True))
                return False
        assert self.client is not None
        t_poll = time.time()
        result = await self._poll(self.client)
        if result.connection_failed:
            self._drop_client()
        await self._submit(self._record(t_poll, result))
        return not result.connection_failed

    async def _connect(self) -> bool:
        plan = self.plan
        client = AsyncModbusTcpClient(
            plan.host,
            port=plan.port,
            name=f"modbus-{plan.device}",
            timeout=plan.timeout_s,
            retries=0,
            reconnect_delay=0,  # reconnecting is ours: bounded backoff, counted
            trace_connect=self._on_connection_change,
        )
        try:
            ok = await client.connect()
        except (OSError, ModbusException) as err:
            log.debug("modbus %s: connect error %s", plan.device, err)
            ok = False
        if not ok:
            client.close()
            self.stats.connect_failures += 1
            if self.status.consecutive_failures == 0:
                log.warning("modbus %s: cannot connect to %s", plan.device, plan.address)
            return False
        self.client = client
        self.status.connected = True
        self.stats.connects += 1
        return True

    def _on_connection_change(self, connected: bool) -> None:
        # pymodbus reports only peer-initiated disconnects here (our own close() is silent).
        if not connected:
            self.stats.disconnects += 1
            self.status.connected = False
            log.warning("modbus %s: connection lost", self.plan.device)

    def _drop_client(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        self.status.connected = False

    # --- one poll ----------------------------------------------------------------------------
    async def _poll(self, client: AsyncModbusTcpClient) -> _PollResult:
        result = _PollResult()
        for block in list(self.blocks):
            if result.connection_failed:
                result.failed.update(p.channel for p in block.points)
                continue
            code = await self._read_block(client, block, result)
            if code is None or len(block.points) == 1:
                continue
            # Exception on a multi-point block: read its points one by one in this same poll.
            singles = plan_blocks(block.points, max_gap=-1)
            if code in STRUCTURAL_EXCEPTIONS:
                idx = self.blocks.index(block)
                self.blocks[idx : idx + 1] = singles
                self.status.split_blocks += 1
                log.warning(
                    "modbus %s: %s block at %d answered exception %d; reading its %d "
                    "points separately from now on",
                    self.plan.device,
                    block.table,
                    block.address,
                    code,
                    len(singles),
                )
            for single in singles:
                if result.connection_failed:
                    result.failed.update(p.channel for p in single.points)
                    continue
                await self._read_block(client, single, result)
        return result

    async def _read_block(
        self, client: AsyncModbusTcpClient, block: Block, result: _PollResult
    ) -> int | None:
        """Read one block into ``result``; returns the exception code if the device refused."""
        names = [p.channel for p in block.points]
        self.stats.requests += 1
        try:
            response = await self._request(client, block)
        except ModbusIOException:
            self.stats.timeouts += 1
            result.connection_failed = True
            result.failed.update(names)
            return None
        except (ConnectionException, OSError):
            result.connection_failed = True
            result.failed.update(names)
            return None
        if response.isError():
            code = int(response.exception_code)
            self.stats.exceptions += 1
            self.stats.exception_codes[code] = self.stats.exception_codes.get(code, 0) + 1
            result.failed.update(names)
            return code
        data: Sequence[int] | Sequence[bool]
        if block.table in BIT_TABLES:
            data = list(response.bits)[: block.count]
            self.stats.bits_read += len(data)
        else:
            data = list(response.registers)
            self.stats.registers_read += len(data)
        if len(data) < block.count:
            self.stats.short_responses += 1
            result.failed.update(names)
            return None
        for p in block.points:
            try:
                result.values[p.channel] = decode_point(p, block, data)
                result.failed.discard(p.channel)
            except (ValueError, IndexError) as err:
                self.stats.errors += 1
                result.failed.add(p.channel)
                log.warning("modbus %s: cannot decode %s: %s", self.plan.device, p.channel, err)
        return None

    def _request(self, client: AsyncModbusTcpClient, block: Block) -> Any:
        kw: dict[str, Any] = {"count": block.count, "device_id": self.plan.unit_id}
        if block.table == "holding":
            return client.read_holding_registers(block.address, **kw)
        if block.table == "input":
            return client.read_input_registers(block.address, **kw)
        if block.table == "coil":
            return client.read_coils(block.address, **kw)
        return client.read_discrete_inputs(block.address, **kw)

    # --- outcome -----------------------------------------------------------------------------
    def _record(self, t_poll: float, result: _PollResult) -> list[Uplink]:
        """Update outage state and counters; the uplinks of the values read."""
        st = self.status
        stats = self.stats
        stats.polls += 1
        if not result.values:
            stats.polls_failed += 1
        elif result.failed:
            stats.polls_partial += 1
        else:
            stats.polls_ok += 1
        for name in result.failed:
            st.failed_channels.setdefault(name, t_poll)
        if result.failed:
            if st.bad_since is None:
                st.bad_since = t_poll
                log.warning(
                    "modbus %s: %d channel(s) not read (%s)",
                    self.plan.device,
                    len(result.failed),
                    "connection" if result.connection_failed else "exception response",
                )
        if result.values:
            st.last_ok = t_poll
        uplinks: list[Uplink] = []
        units = {p.channel: p.unit for p in self.plan.points}
        mark = self.owner.options.uncertain_after_outage
        for name, value in result.values.items():
            status = 0
            if st.failed_channels.pop(name, None) is not None and mark:
                status = int(Quality.UNCERTAIN)
                stats.uncertain += 1
            uplinks.append(
                Uplink(self.plan.device, name, [t_poll], [value], units[name] or None, status)
            )
        if not st.failed_channels and st.bad_since is not None:
            log.info(
                "modbus %s: all channels read again after %.1fs",
                self.plan.device,
                t_poll - st.bad_since,
            )
            st.bad_since = None
        return uplinks

    async def _submit(self, uplinks: list[Uplink]) -> None:
        if not uplinks:
            return
        frame = Frame(
            source=SOURCE,
            address=self.plan.address,
            device_hint=self.plan.device,
            uplinks=uplinks,
        )
        self.stats.frames += 1
        self.stats.readings += len(uplinks)
        await self.inflight.acquire()  # backpressure: the sink is behind, stop polling
        task = asyncio.create_task(self._deliver(frame))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _deliver(self, frame: Frame) -> None:
        try:
            outcome: FrameOutcome = await submit_and_wait(self.owner.sink, frame)
            self.stats.accepted += outcome.accepted
            self.stats.quarantined += outcome.quarantined
        except Exception:
            self.stats.errors += 1
            log.exception("modbus %s: sink rejected a frame", self.plan.device)
        finally:
            self.inflight.release()


@dataclass
class OnePoll:
    """One poll of one device (``aquameter check --poll``): the uplinks of the values read, the
    channels not read, and the channels left out for a bad register map."""

    plan: DevicePlan
    uplinks: list[Uplink]
    failed: set[str]
    config_errors: list[str]
    exception_codes: dict[int, int]


class _NoSink:
    """The sink of a one-shot poll: nothing may be submitted (the caller prints, never writes)."""

    def submit(self, frame: Frame, on_durable: Any) -> None:
        raise RuntimeError("a one-shot Modbus poll submits nothing")


async def poll_once(
    device: Device, registry: Registry, options: ModbusOptions | None = None
) -> OnePoll:
    """Connect to ``device``, read its whole register map once, disconnect.

    Why the poller's own code path (its connect, block reads, exception splitting and decoding)
    rather than a separate reader: what an operator sees with ``aquameter check --poll`` is then
    exactly what ingest would store. Raises :class:`ModbusConfigError` for a device that cannot
    be polled and :class:`ConnectionError` (naming host:port and the timeout) when the station
    does not answer the connect within ``timeout_s``."""
    plan, errors = plan_device(device, registry, options)
    poller = ModbusPoller([], registry, _NoSink(), options=options)
    poller.stats.devices[plan.device] = DeviceStatus(plan.device, plan.address)
    dp = _DevicePoller(poller, plan)
    # The caller reports a failed connect itself, in one line: no poller warning beside it.
    dp.status.consecutive_failures = 1
    try:
        if not await dp._connect():
            raise ConnectionError(
                f"modbus {plan.device}: cannot connect to {plan.host}:{plan.port} "
                f"(unit {plan.unit_id}, connect timeout timeout_s = {plan.timeout_s:g} s)"
            )
        assert dp.client is not None
        t_poll = time.time()
        result = await dp._poll(dp.client)
        uplinks = dp._record(t_poll, result)
    finally:
        dp._drop_client()
    return OnePoll(plan, uplinks, result.failed, errors, dict(poller.stats.exception_codes))
