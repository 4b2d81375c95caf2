"""The in-memory index ingest resolves readings against: (device, channel name) -> channel.

Loaded from the database (the registry after ``devices sync``), so every ingest worker on every
machine resolves the same way. Replaced atomically on reload; readers never lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, time

import psycopg

from ingest.units import UnknownUnit, conversion
from protocols.uplink import wall_clock_to_utc


@dataclass(frozen=True, slots=True)
class ChannelInfo:
    id: int
    device_id: str
    name: str
    quantity: str
    unit: str
    device_unit: str
    min_value: float
    max_value: float
    install_epoch: float | None
    active: bool


class ChannelIndex:
    def __init__(
        self,
        channels: list[ChannelInfo],
        aliases: dict[str, str],
        vendors: dict[str, str] | None = None,
        gateways: dict[str, str] | None = None,
        clock_zones: dict[str, str] | None = None,
    ) -> None:
        self.by_key = {(c.device_id, c.name): c for c in channels}
        self.devices = {c.device_id for c in channels}
        self.aliases = aliases
        self.vendors = vendors or {}
        self.gateways = gateways or {}
        self.clock_zones = clock_zones or {}
        self._conv: dict[tuple[str, str], tuple[float, float]] = {}

    def __len__(self) -> int:
        return len(self.by_key)

    def device_id(self, device: str) -> str:
        return self.aliases.get(device, device)

    def get(self, device: str, channel: str) -> ChannelInfo | None:
        return self.by_key.get((device, channel))

    def may_send(self, peer: str, device: str) -> bool:
        """A proven identity speaks for itself and for the meters registered under it."""
        return device == peer or self.gateways.get(device) == peer

    def conversion(self, info: ChannelInfo, unit: str | None) -> tuple[float, float]:
        """Cached (factor, offset) from ``unit`` (None: the channel's device unit) to canonical."""
        key = (info.quantity, info.device_unit if unit is None else unit)
        conv = self._conv.get(key)
        if conv is None:
            conv = conversion(*key)  # raises UnknownUnit
            self._conv[key] = conv
        return conv

    def wall_to_utc(self, device: str, ts: list[float], summer: bool | None = None) -> list[float]:
        """``ts`` (``device``'s wall clock written as if UTC) in UTC, read in the device's clock
        zone (``clock_zones``; UTC when it has none): see :func:`wall_clock_to_utc`."""
        return wall_clock_to_utc(ts, self.clock_zones.get(device, "UTC"), summer)

    @classmethod
    def load(cls, conn: psycopg.Connection) -> ChannelIndex:
        rows = conn.execute(
            """SELECT c.id, c.device_id, c.name, c.quantity, c.unit,
                      coalesce(c.params->>'unit', c.unit), c.min_value, c.max_value,
                      m.install_date, d.active
               FROM channels c JOIN devices d ON d.id = c.device_id
               LEFT JOIN meters m ON m.id = c.meter_id"""
        ).fetchall()
        channels = [
            ChannelInfo(
                id=r[0],
                device_id=r[1],
                name=r[2],
                quantity=r[3],
                unit=r[4],
                device_unit=r[5],
                min_value=r[6] if r[6] is not None else float("-inf"),
                max_value=r[7] if r[7] is not None else float("inf"),
                install_epoch=(datetime.combine(r[8], time(0), UTC).timestamp() if r[8] else None),
                active=r[9],
            )
            for r in rows
        ]
        aliases = {
            f"serial:{serial}": dev
            for dev, serial in conn.execute(
                "SELECT id, serial FROM devices WHERE serial IS NOT NULL"
            ).fetchall()
        }
        vendors, gateways, zones = {}, {}, {}
        for dev, vendor, gateway, zone in conn.execute(
            """SELECT d.id, d.vendor_id, d.gateway,
                      CASE WHEN d.clock = 'utc' THEN 'UTC' ELSE coalesce(z.timezone, 'UTC') END
               FROM devices d LEFT JOIN dmas z ON z.id = d.dma_id"""
        ).fetchall():
            vendors[dev] = vendor
            if gateway:
                gateways[dev] = gateway
            if zone != "UTC":
                zones[dev] = zone
        conn.commit()
        return cls(channels, aliases, vendors, gateways, zones)


__all__ = ["ChannelIndex", "ChannelInfo", "UnknownUnit"]
