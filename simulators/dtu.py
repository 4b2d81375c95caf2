"""CJ/T 188 meters of the simulated fleet, as their DTUs deliver them: frames pushed over TCP.

Why TCP and not MQTT: the DTUs and concentrators Chinese utilities deploy dial out to the
head-end and push the meters' 901FH answers over a plain socket (``protocols.cjt188_listener``
is the receiving side). Each read of a meter is one frame carrying the meter's own clock
(China time, UTC+8), its cumulative volume (0.01 m3 resolution, as the register has) and the
battery bit; a DTU sends its meters' frames over one connection, in time order, in segments cut
anywhere (as TCP delivers them), with FE wake-up bytes on every other frame.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import polars as pl

from aquameter.registry import Device, Registry
from protocols.cjt188 import FORMAT, encode_cjt188
from protocols.uplink import Quality
from simulators.fleet import FleetData, customer_meters, meter_id_of


def cjt188_meters(registry: Registry) -> list[Device]:
    """Customer meters whose vendor speaks CJ/T 188 (each needs its address as ``serial``)."""
    out = []
    for dev, _ in customer_meters(registry):
        if registry.vendor(dev.vendor).payload == FORMAT:
            if dev.serial is None:
                raise ValueError(f"{dev.id}: a CJ/T 188 meter needs its address as serial")
            out.append(dev)
    return out


def dtu_of(device: Device) -> str:
    """The DTU a meter is wired to: its gateway, else one DTU per DMA."""
    return device.gateway or f"DTU-{device.dma}"


def cjt188_frames(fleet: FleetData, registry: Registry) -> dict[str, list[bytes]]:
    """Every read of the fleet's CJ/T 188 meters as one 901FH frame, by DTU, in time order."""
    meters = {meter_id_of(d): d for d in cjt188_meters(registry)}
    if not meters or fleet.reads.is_empty():
        return {}
    reads = fleet.reads.filter(pl.col("meter_id").is_in(list(meters))).sort("ts", "meter_id")
    out: dict[str, list[bytes]] = {}
    ids = reads["meter_id"].to_list()
    ts = (reads["ts"].dt.epoch("us") // 1_000_000).to_list()
    reg = reads["register"].to_list()
    q = reads["quality"].to_list()
    for i, (mid, t, r, qual) in enumerate(zip(ids, ts, reg, q, strict=True)):
        dev = meters[mid]
        assert dev.serial is not None
        frame = encode_cjt188(
            dev.serial,
            float(r),
            float(t),
            battery_low=bool(int(qual) & int(Quality.LOW_BATTERY)),
            preamble=2 if i % 2 else 0,
        )
        out.setdefault(dtu_of(dev), []).append(frame)
    return out


async def push_frames(
    host: str, port: int, frames: list[bytes], *, segment: int = 700, timeout_s: float = 60.0
) -> int:
    """One DTU's session: connect, send ``frames`` in ``segment``-byte writes (cut anywhere),
    close. Returns the bytes sent."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    data = b"".join(frames)
    try:
        for i in range(0, len(data), segment):
            writer.write(data[i : i + segment])
            await asyncio.wait_for(writer.drain(), timeout_s)
    finally:
        writer.close()
        await writer.wait_closed()
    return len(data)


async def push_all(host: str, port: int, by_dtu: Mapping[str, list[bytes]]) -> int:
    """Every DTU's session at once (each its own connection); the frames pushed in all."""
    await asyncio.gather(*(push_frames(host, port, f) for f in by_dtu.values() if f))
    return sum(len(f) for f in by_dtu.values())
