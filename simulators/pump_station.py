"""A pump station that speaks Modbus TCP: N pumps behind a PLC plus the DMA inlet meter it feeds.

A real pymodbus 3.16 TCP server (``SimDevice`` datastore, one per unit id) on a real socket, so
the poller, ``mbpoll`` or any SCADA driver can read it. The station's state evolves on its own
clock: demand follows a diurnal curve (night minimum around 03:00, peaks around 07:30 and 19:00),
duty pumps start and stop with demand and rotate lead every ``rotation_h`` hours, pressures follow a
pump curve, run time, trip counts, energy and the inlet totaliser accumulate. Faults are injected
on purpose: a pump trip, the station going silent (accepts requests, never answers), the station
going away (server closed, connections dropped, port refused) and exception responses for chosen
addresses. :meth:`PumpStation.manifest` is the ground truth: configuration, register map, what
was served and every fault injected, with a bounded history of served values.

Register map (PDU addresses, 0-based; ``mbpoll -r`` takes address + 1). 32-bit values are
big-endian bytes in the configured ``word_order``: ``"big"`` (default) is ABCD, high word first,
which is what ``mbpoll -B`` reads; ``"little"`` is CDAB.

Unit 1 (``unit_id``), station PLC — holding registers (fc 3), pump n = 1..N (N ≤ 10) at
base = 10·(n−1):

=========  ==================  =======  =======  ==============================================
address    value               type     unit     notes
=========  ==================  =======  =======  ==============================================
base+0     flow                float32  m3/h
base+2     discharge pressure  float32  bar      header pressure while the pump stands
base+4     suction pressure    int16    bar      scale 0.01
base+5     power               uint16   kW       scale 0.1
base+6     run time            uint32   s        while running
base+8     trip count          uint16   count
base+9     status word         uint16   bits     bit0 running, bit1 tripped, bit2 auto (always 1)
100        header pressure     float32  bar      station outlet
102        station flow        float32  m3/h
104        energy              uint32   kWh      scale 0.1
=========  ==================  =======  =======  ==============================================

Registers 10·N..99 are undefined: a read across them answers exception 02 (illegal address).
Coils (fc 1): coil n−1 = pump n running. Discrete inputs (fc 2): input n−1 = pump n tripped.

Unit 2 (``meter_unit_id``), the DMA inlet meter on the station's RS-485 line — input registers
(fc 4): 0 flow float32 L/s, 2 totaliser uint32 in litres (``totaliser_unit = "L"``, default) or
m³ (``"m3"``). ``protocols/modbus.sample.toml`` is this map as a registry fragment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import struct
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Literal

from pymodbus.client.mixin import ModbusClientMixin
from pymodbus.constants import ExcCodes
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

DT = ModbusClientMixin.DATATYPE
Order = Literal["big", "little"]

PUMP_BLOCK = 10
STATION_BASE = 100
FC_TABLE = {"coil": (1, 5, 15), "discrete": (2,), "holding": (3, 6, 16, 22, 23), "input": (4,)}


@dataclass
class PumpStationConfig:
    """Station physics and wiring; every number is a documented default."""

    name: str = "PS-1"
    host: str = "127.0.0.1"
    port: int = 5020
    unit_id: int = 1
    meter_unit_id: int = 2
    pumps: int = 3
    seed: int = 0
    word_order: Order = "big"
    totaliser_unit: Literal["L", "m3"] = "L"
    time_scale: float = 1.0  # simulated seconds per wall second (60: a day in 24 minutes)
    tick_s: float = 1.0  # wall seconds between state updates while the clock runs
    start_epoch: float | None = None  # simulated clock at start (None: wall clock)
    tz_offset_h: float = 0.0  # local time = UTC + offset, for the diurnal curve
    mean_demand_m3h: float = 260.0
    demand_noise: float = 0.03  # relative, AR(1)
    pump_capacity_m3h: float = 180.0
    shutoff_head_bar: float = 6.0
    suction_bar: float = 1.2
    efficiency: float = 0.72
    rotation_h: float = 6.0
    trip_rate_per_day: float = 0.0  # random trips per pump per simulated day
    trip_duration_s: float = 1800.0  # simulated seconds a random trip lasts
    history: int = 2000  # snapshots kept in the manifest


@dataclass
class PumpState:
    running: bool = False
    tripped: bool = False
    trip_until: float | None = None
    flow: float = 0.0
    discharge_bar: float = 0.0
    suction_bar: float = 0.0
    power_kw: float = 0.0
    run_s: float = 0.0
    trips: int = 0


@dataclass
class Served:
    requests: dict[int, int] = field(default_factory=dict)
    exceptions: dict[int, int] = field(default_factory=dict)
    dropped_responses: int = 0
    connections: int = 0


def diurnal(hour: float) -> float:
    """Demand multiplier by local hour (mean ≈ 1 over a day)."""
    h = hour % 24.0
    shape = (
        0.45
        + 1.05 * math.exp(-(((h - 7.5) / 1.8) ** 2))
        + 0.75 * math.exp(-(((h - 19.0) / 2.2) ** 2))
        + 0.35 * math.exp(-(((h - 13.0) / 3.0) ** 2))
    )
    return shape / 0.95


def _f32(value: float) -> float:
    return float(struct.unpack(">f", struct.pack(">f", value))[0])


class PumpStation:
    """One station: its state, its Modbus server and its fault switches."""

    def __init__(self, config: PumpStationConfig | None = None, **overrides: Any) -> None:
        self.config = config or PumpStationConfig()
        for k, v in overrides.items():
            setattr(self.config, k, v)
        c = self.config
        if not 1 <= c.pumps <= STATION_BASE // PUMP_BLOCK:  # pump blocks end below the station's
            raise ValueError(f"pumps must be 1..{STATION_BASE // PUMP_BLOCK}, not {c.pumps}")
        self.rng = random.Random(c.seed)
        self.sim_t = c.start_epoch if c.start_epoch is not None else time.time()
        self.pumps = [PumpState(suction_bar=c.suction_bar) for _ in range(c.pumps)]
        self.noise = 0.0
        self.energy_kwh = 0.0
        self.total_l = 0.0
        self.meter_flow_ls = 0.0
        self.header_bar = c.suction_bar
        self.station_flow = 0.0
        self.ticks = 0
        self.faults: list[dict[str, Any]] = []
        self.exceptions: dict[tuple[int, str, int], int] = {}
        self.silent = False
        self.served = Served()
        self.history: deque[dict[str, Any]] = deque(maxlen=c.history)
        self.hr: list[int] = [0] * (PUMP_BLOCK * c.pumps)
        self.station_hr: list[int] = [0] * 6
        self.coils: list[bool] = [False] * c.pumps
        self.di: list[bool] = [False] * c.pumps
        self.ir: list[int] = [0] * 4
        self._truth: dict[str, dict[str, float]] = {}
        self._server: ModbusTcpServer | None = None
        self._clock: asyncio.Task[None] | None = None
        self._step(0.0)

    # --- physics -----------------------------------------------------------------------------
    def advance(self, seconds: float) -> None:
        """Move the simulated clock (in sub-steps of at most a minute) and re-render registers."""
        remaining = seconds
        while remaining > 1e-9:
            dt = min(60.0, remaining)
            self._step(dt)
            remaining -= dt
        self.ticks += 1
        self.history.append({"wall": time.time(), "sim": self.sim_t, "values": self.truth()})

    def _demand(self) -> float:
        c = self.config
        hour = ((self.sim_t / 3600.0) + c.tz_offset_h) % 24.0
        return max(0.0, c.mean_demand_m3h * diurnal(hour) * (1.0 + self.noise))

    def _step(self, dt: float) -> None:
        c = self.config
        self.sim_t += dt
        if dt > 0:  # AR(1) with stationary sd = demand_noise
            self.noise = 0.9 * self.noise + self.rng.gauss(0.0, c.demand_noise * math.sqrt(0.19))
        if c.trip_rate_per_day > 0 and dt > 0:
            p_trip = c.trip_rate_per_day * dt / 86400.0
            for i, p in enumerate(self.pumps):
                if p.running and self.rng.random() < p_trip:
                    self._trip(i, c.trip_duration_s, kind="random_trip")
        for p in self.pumps:
            if p.tripped and p.trip_until is not None and self.sim_t >= p.trip_until:
                p.tripped, p.trip_until = False, None
        demand = self._demand()
        cap = c.pump_capacity_m3h
        running = [i for i, p in enumerate(self.pumps) if p.running]
        n = len(running)
        want = n
        if demand > n * cap * 0.9:
            want = min(len(self.pumps), math.ceil(demand / (cap * 0.9)))
        elif n > 1 and demand < (n - 1) * cap * 0.75:
            want = n - 1
        elif n == 0 and demand > 0:
            want = 1
        lead = int(self.sim_t // (c.rotation_h * 3600.0)) % len(self.pumps)
        order = [(lead + k) % len(self.pumps) for k in range(len(self.pumps))]
        keep = [i for i in order if self.pumps[i].running and not self.pumps[i].tripped][:want]
        for i in order:
            if len(keep) >= want:
                break
            if i not in keep and not self.pumps[i].tripped:
                keep.append(i)
        for i, p in enumerate(self.pumps):
            p.running = i in keep
        n = len(keep)
        level = 0.2 * math.sin(2 * math.pi * self.sim_t / 86400.0)
        suction = c.suction_bar + level - 0.03 * n
        flow_each = min(cap * 1.1, demand / n) if n else 0.0
        diff = c.shutoff_head_bar * (1.0 - 0.3 * (flow_each / cap) ** 2) if n else 0.0
        self.header_bar = suction + diff if n else suction
        self.station_flow = flow_each * n
        station_kw = 0.0
        for p in self.pumps:
            p.suction_bar = suction
            if p.running:
                p.flow = flow_each
                p.discharge_bar = self.header_bar
                p.power_kw = (flow_each / 3600.0) * diff * 1e5 / c.efficiency / 1000.0
                p.run_s += dt
                station_kw += p.power_kw
            else:
                p.flow = 0.0
                p.discharge_bar = self.header_bar
                p.power_kw = 0.0
        self.energy_kwh += station_kw * dt / 3600.0
        if dt > 0:  # the meter's own 0.2 % noise
            self.meter_flow_ls = self.station_flow / 3.6 * (1.0 + self.rng.gauss(0.0, 0.002))
        else:
            self.meter_flow_ls = self.station_flow / 3.6
        self.total_l += max(0.0, self.meter_flow_ls) * dt
        self._render()

    # --- registers ---------------------------------------------------------------------------
    def _enc(self, value: float | int, dt: Any) -> list[int]:
        return ModbusClientMixin.convert_to_registers(value, dt, word_order=self.config.word_order)

    def _render(self) -> None:
        """Encode the state into register images and record exactly what they decode to."""
        c = self.config
        station: dict[str, float] = {}
        for i, p in enumerate(self.pumps):
            n, base = i + 1, PUMP_BLOCK * i
            flow, disch = _f32(p.flow), _f32(p.discharge_bar)
            suction_raw = max(-32768, min(32767, round(p.suction_bar / 0.01)))
            power_raw = max(0, min(65535, round(p.power_kw / 0.1)))
            run_raw = int(p.run_s) % 2**32
            status = int(p.running) | (int(p.tripped) << 1) | (1 << 2)
            regs = (
                self._enc(flow, DT.FLOAT32)
                + self._enc(disch, DT.FLOAT32)
                + self._enc(suction_raw, DT.INT16)
                + self._enc(power_raw, DT.UINT16)
                + self._enc(run_raw, DT.UINT32)
                + self._enc(p.trips % 65536, DT.UINT16)
                + self._enc(status, DT.UINT16)
            )
            self.hr[base : base + PUMP_BLOCK] = regs
            self.coils[i] = p.running
            self.di[i] = p.tripped
            station.update(
                {
                    f"pump{n}_flow": flow,
                    f"pump{n}_discharge": disch,
                    f"pump{n}_suction": suction_raw * 0.01,
                    f"pump{n}_power": power_raw * 0.1,
                    f"pump{n}_run_time": float(run_raw),
                    f"pump{n}_trips": float(p.trips % 65536),
                    f"pump{n}_auto": 1.0,
                    f"pump{n}_running": float(p.running),
                    f"pump{n}_tripped": float(p.tripped),
                }
            )
        header, sflow = _f32(self.header_bar), _f32(self.station_flow)
        energy_raw = int(self.energy_kwh / 0.1) % 2**32
        self.station_hr = (
            self._enc(header, DT.FLOAT32)
            + self._enc(sflow, DT.FLOAT32)
            + self._enc(energy_raw, DT.UINT32)
        )
        station.update(
            {
                "header_pressure": header,
                "station_flow": sflow,
                "energy": energy_raw * 0.1,
            }
        )
        mflow = _f32(self.meter_flow_ls)
        total = self.total_l if c.totaliser_unit == "L" else self.total_l / 1000.0
        total_raw = int(total) % 2**32
        self.ir = self._enc(mflow, DT.FLOAT32) + self._enc(total_raw, DT.UINT32)
        self._truth = {
            "station": station,
            "meter": {"inlet_flow": mflow, "inlet_total": float(total_raw)},
        }

    def truth(self) -> dict[str, dict[str, float]]:
        """What the registers hold right now, decoded, in the device units of the map."""
        return {k: dict(v) for k, v in self._truth.items()}

    # --- faults ------------------------------------------------------------------------------
    def _log_fault(self, kind: str, **details: Any) -> None:
        self.faults.append({"kind": kind, "wall": time.time(), "sim": self.sim_t, **details})

    def _trip(self, i: int, duration_s: float | None, kind: str) -> None:
        p = self.pumps[i]
        p.running, p.tripped = False, True
        p.trips += 1
        p.trip_until = None if duration_s is None else self.sim_t + duration_s
        self._log_fault(kind, pump=i + 1, duration_s=duration_s)

    def trip(self, pump: int, duration_s: float | None = None) -> None:
        """Trip pump ``pump`` (1-based); it stays tripped ``duration_s`` simulated seconds or until
        :meth:`reset_trip`. Standby pumps take over on the next state update."""
        self._trip(pump - 1, duration_s, kind="trip")
        self._step(0.0)

    def reset_trip(self, pump: int) -> None:
        p = self.pumps[pump - 1]
        p.tripped, p.trip_until = False, None
        self._log_fault("reset_trip", pump=pump)
        self._step(0.0)

    def silence(self, on: bool = True) -> None:
        """Keep accepting connections and requests but never answer (a hung comms module)."""
        self.silent = on
        self._log_fault("silence", on=on)

    def inject_exception(
        self, table: Literal["holding", "input"], address: int, code: int = 4, unit: str = "station"
    ) -> None:
        """Answer any read covering ``address`` of ``table`` with exception ``code`` (default 04,
        device failure: a failed sensor module)."""
        unit_id = self.config.unit_id if unit == "station" else self.config.meter_unit_id
        self.exceptions[(unit_id, table, address)] = code
        self._log_fault("exception", unit_id=unit_id, table=table, address=address, code=code)

    def clear_exceptions(self) -> None:
        self.exceptions.clear()
        self._log_fault("clear_exceptions")

    # --- server ------------------------------------------------------------------------------
    async def _action(
        self,
        unit_id: int,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """Called by pymodbus for every access: serve the current image, or the injected fault."""
        table = next(t for t, fcs in FC_TABLE.items() if function_code in fcs)
        for a in range(address, address + count):
            code = self.exceptions.get((unit_id, table, a))
            if code is not None:
                return ExcCodes(code)
        if unit_id == self.config.unit_id:
            if table == "holding":
                registers[: len(self.hr)] = self.hr
                off = STATION_BASE - start_address
                registers[off : off + len(self.station_hr)] = self.station_hr
            elif table in ("coil", "discrete"):
                bits = self.coils if table == "coil" else self.di
                for r in range(math.ceil(len(bits) / 16)):
                    word = 0
                    for b, on in enumerate(bits[16 * r : 16 * r + 16]):
                        word |= int(on) << b
                    registers[r] = word
        elif table == "input":
            registers[: len(self.ir)] = self.ir
        return None

    def _devices(self) -> list[SimDevice]:
        c = self.config
        nbits = 16 * math.ceil(c.pumps / 16)
        station = SimDevice(
            id=c.unit_id,
            simdata=(
                [SimData(0, values=[False] * nbits, datatype=DataType.BITS, readonly=True)],
                [SimData(0, values=[False] * nbits, datatype=DataType.BITS, readonly=True)],
                [
                    SimData(
                        0, values=[0] * len(self.hr), datatype=DataType.REGISTERS, readonly=True
                    ),
                    SimData(
                        STATION_BASE,
                        values=[0] * len(self.station_hr),
                        datatype=DataType.REGISTERS,
                        readonly=True,
                    ),
                ],
                [SimData(0, values=[0], datatype=DataType.REGISTERS, readonly=True)],
            ),
            action=partial(self._action, c.unit_id),
        )
        meter = SimDevice(
            id=c.meter_unit_id,
            simdata=(
                [SimData(0, values=[False] * 16, datatype=DataType.BITS, readonly=True)],
                [SimData(0, values=[False] * 16, datatype=DataType.BITS, readonly=True)],
                [SimData(0, values=[0], datatype=DataType.REGISTERS, readonly=True)],
                [SimData(0, values=[0] * len(self.ir), datatype=DataType.REGISTERS, readonly=True)],
            ),
            action=partial(self._action, c.meter_unit_id),
        )
        return [station, meter]

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        if sending and self.silent:
            self.served.dropped_responses += 1
            return b""
        return data

    def _trace_pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending:
            fc = pdu.function_code
            self.served.requests[fc] = self.served.requests.get(fc, 0) + 1
        elif pdu.isError():
            code = int(pdu.exception_code)
            self.served.exceptions[code] = self.served.exceptions.get(code, 0) + 1
        return pdu

    def _trace_connect(self, connected: bool) -> None:
        if connected:
            self.served.connections += 1

    @property
    def port(self) -> int:
        return self.config.port

    @property
    def serving(self) -> bool:
        return self._server is not None

    async def serve(self) -> None:
        """Open the server (again, after :meth:`go_away`) on the configured port."""
        if self._server is not None:
            return
        server = ModbusTcpServer(
            self._devices(),
            address=(self.config.host, self.config.port),
            trace_packet=self._trace_packet,
            trace_pdu=self._trace_pdu,
            trace_connect=self._trace_connect,
        )
        await server.serve_forever(background=True)
        self._server = server

    async def go_away(self) -> None:
        """The station disappears: listener closed, open connections dropped, connects refused."""
        if self._server is None:
            return
        await self._server.shutdown()
        self._server = None
        self._log_fault("server_stop")

    async def come_back(self) -> None:
        await self.serve()
        self._log_fault("server_start")

    async def start(self, *, clock: bool = True) -> PumpStation:
        """Serve, and (``clock``) advance the state every ``tick_s`` wall seconds. Without the
        clock the state changes only by :meth:`advance` and faults (deterministic tests)."""
        await self.serve()
        if clock and self._clock is None:
            self._clock = asyncio.create_task(self._run_clock(), name=f"clock-{self.config.name}")
        return self

    async def _run_clock(self) -> None:
        c = self.config
        while True:
            await asyncio.sleep(c.tick_s)
            self.advance(c.tick_s * c.time_scale)

    async def close(self) -> None:
        if self._clock is not None:
            self._clock.cancel()
            await asyncio.gather(self._clock, return_exceptions=True)
            self._clock = None
        if self._server is not None:
            await self._server.shutdown()
            self._server = None

    async def __aenter__(self) -> PumpStation:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- ground truth ------------------------------------------------------------------------
    def register_map(self) -> list[dict[str, Any]]:
        """The documented map as data: one entry per value, with its registry channel name."""
        c = self.config
        wo = c.word_order
        rows: list[dict[str, Any]] = []

        def add(
            unit_id: int,
            channel: str,
            table: str,
            address: int,
            type_: str,
            unit: str,
            quantity: str,
            scale: float = 1.0,
            bit: int | None = None,
        ) -> None:
            row = {
                "unit_id": unit_id,
                "channel": channel,
                "table": table,
                "address": address,
                "type": type_,
                "unit": unit,
                "quantity": quantity,
                "scale": scale,
                "word_order": wo,
            }
            if bit is not None:
                row["bit"] = bit
            rows.append(row)

        for i in range(c.pumps):
            n, b, u = i + 1, PUMP_BLOCK * i, c.unit_id
            add(u, f"pump{n}_flow", "holding", b, "float32", "m3/h", "flow")
            add(u, f"pump{n}_discharge", "holding", b + 2, "float32", "bar", "pressure")
            add(u, f"pump{n}_suction", "holding", b + 4, "int16", "bar", "pressure", 0.01)
            add(u, f"pump{n}_power", "holding", b + 5, "uint16", "kW", "power", 0.1)
            add(u, f"pump{n}_run_time", "holding", b + 6, "uint32", "s", "hours")
            add(u, f"pump{n}_trips", "holding", b + 8, "uint16", "count", "count")
            add(u, f"pump{n}_auto", "holding", b + 9, "bool", "state", "state", bit=2)
            add(u, f"pump{n}_running", "coil", i, "bool", "state", "state")
            add(u, f"pump{n}_tripped", "discrete", i, "bool", "state", "state")
        add(c.unit_id, "header_pressure", "holding", STATION_BASE, "float32", "bar", "pressure")
        add(c.unit_id, "station_flow", "holding", STATION_BASE + 2, "float32", "m3/h", "flow")
        add(c.unit_id, "energy", "holding", STATION_BASE + 4, "uint32", "kWh", "energy", 0.1)
        add(c.meter_unit_id, "inlet_flow", "input", 0, "float32", "L/s", "flow")
        add(c.meter_unit_id, "inlet_total", "input", 2, "uint32", c.totaliser_unit, "volume")
        return rows

    def manifest(self) -> dict[str, Any]:
        """Ground truth: what this station is, what it served and every fault injected."""
        return {
            "station": self.config.name,
            "config": asdict(self.config),
            "register_map": self.register_map(),
            "sim_time": self.sim_t,
            "ticks": self.ticks,
            "pumps": [
                {
                    "pump": i + 1,
                    "run_s": p.run_s,
                    "trips": p.trips,
                    "running": p.running,
                    "tripped": p.tripped,
                }
                for i, p in enumerate(self.pumps)
            ],
            "energy_kwh": self.energy_kwh,
            "inlet_total_l": self.total_l,
            "truth": self.truth(),
            "faults": list(self.faults),
            "served": asdict(self.served),
            "history": list(self.history),
        }


async def run(
    host: str = "127.0.0.1",
    port: int = 5020,
    stations: int = 1,
    pumps: int = 3,
    time_scale: float = 60.0,
    tick_s: float = 1.0,
    seed: int = 0,
    word_order: Order = "big",
    duration_s: float | None = None,
    manifest_path: str | None = None,
) -> dict[str, Any]:
    """Serve ``stations`` stations on ``port``, ``port + 1``, … until ``duration_s`` elapses (or
    forever / until cancelled); returns (and writes to ``manifest_path``) their manifests."""
    fleet = [
        PumpStation(
            PumpStationConfig(
                name=f"PS-{k + 1}",
                host=host,
                port=port + k,
                pumps=pumps,
                seed=seed + k,
                time_scale=time_scale,
                tick_s=tick_s,
                word_order=word_order,
                history=200,
            )
        )
        for k in range(stations)
    ]
    try:
        for st in fleet:
            await st.start()
        if duration_s is None:
            await asyncio.Event().wait()
        else:
            await asyncio.sleep(duration_s)
    finally:
        for st in fleet:
            await st.close()
        manifest = {"stations": [st.manifest() for st in fleet]}
        if manifest_path:
            with open(manifest_path, "w") as fh:
                json.dump(manifest, fh, indent=1, default=str)
    return manifest


def main(
    host: str = "127.0.0.1",
    port: int = 5020,
    stations: int = 1,
    pumps: int = 3,
    time_scale: float = 60.0,
    tick_s: float = 1.0,
    seed: int = 0,
    word_order: Order = "big",
    duration_s: float | None = None,
    manifest_path: str | None = None,
) -> dict[str, Any]:
    """Blocking entry point (``aquameter simulate pump_station``)."""
    try:
        return asyncio.run(
            run(
                host,
                port,
                stations,
                pumps,
                time_scale,
                tick_s,
                seed,
                word_order,
                duration_s,
                manifest_path,
            )
        )
    except KeyboardInterrupt:
        return {}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5020)
    ap.add_argument("--stations", type=int, default=1)
    ap.add_argument("--pumps", type=int, default=3)
    ap.add_argument("--time-scale", type=float, default=60.0)
    ap.add_argument("--tick-s", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--word-order", choices=["big", "little"], default="big")
    ap.add_argument("--duration-s", type=float, default=None)
    ap.add_argument("--manifest", default=None)
    a = ap.parse_args()
    main(
        a.host,
        a.port,
        a.stations,
        a.pumps,
        a.time_scale,
        a.tick_s,
        a.seed,
        a.word_order,
        a.duration_s,
        a.manifest,
    )
