"""The declarative device registry: which devices exist, what they measure and how to reach them.

Like Telegraf's and the ThingsBoard gateway's device configs, vendors' register maps, MQTT topics
and OPC-UA node ids live in a TOML file rather than in code, so a utility onboards a new meter
model by editing configuration. The registry is pure data: protocols read their connection
parameters from it, ingest syncs it into the database and resolves readings against it.
"""

from __future__ import annotations

import tomllib
from datetime import date
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Protocol = Literal["mqtt", "coap", "modbus", "opcua", "import"]
PayloadFormat = Literal["json", "binary-v1", "cbor"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class Dma(_Model):
    id: str
    name: str = ""
    timezone: str = "UTC"
    mains_km: float = 0.0
    service_connections: int = 0
    private_pipe_km: float = 0.0
    avg_pressure_m: float | None = None
    unmetered_households: int = 0
    unmetered_non_households: int = 0


class Channel(_Model):
    name: str
    quantity: str
    unit: str = ""
    kind: str = ""
    role: Literal["customer", "inlet", "outlet", "pressure_azp", "pump", "quality", ""] = ""
    min: float | None = None
    max: float | None = None
    params: dict[str, Any] = Field(default_factory=dict)


class MeterExchange(_Model):
    at: str
    old_register_final: float
    new_register_start: float = 0.0


class Meter(_Model):
    id: str | None = None
    account: str | None = None
    customer_type: Literal["household", "non_household"] = "household"
    dn: int = 15
    q3: float = 2.5
    q4: float | None = None
    register_digits: int = 5
    install_date: date | None = None
    exchanges: list[MeterExchange] = Field(default_factory=list)

    @model_validator(mode="after")
    def _q4_default(self) -> Meter:
        # ISO 4064 / OIML R49: Q4 = 1.25 * Q3 when the datasheet gives only Q3.
        if self.q4 is None:
            self.q4 = 1.25 * self.q3
        return self


class Vendor(_Model):
    id: str
    name: str = ""
    payload: PayloadFormat = "json"
    channels: list[Channel] = Field(default_factory=list, alias="channel")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Device(_Model):
    id: str
    vendor: str
    protocol: Protocol = "mqtt"
    dma: str | None = None
    gateway: str | None = None
    serial: int | None = None
    psk: str | None = None
    meter: Meter | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    channels: list[Channel] = Field(default_factory=list, alias="channel")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class MeterGroup(_Model):
    """Many alike customer meters in one stanza: ``id_format`` is expanded for i in range."""

    vendor: str
    dma: str
    count: int
    id_format: str
    start: int = 1
    protocol: Protocol = "mqtt"
    gateway: str | None = None
    account_format: str | None = None
    serial_start: int | None = None
    customer_type: Literal["household", "non_household"] = "household"
    dn: int = 15
    q3: float = 2.5
    register_digits: int = 5
    install_date: date | None = None

    def expand(self) -> list[Device]:
        devices = []
        for i in range(self.start, self.start + self.count):
            dev_id = self.id_format.format(i)
            devices.append(
                Device(
                    id=dev_id,
                    vendor=self.vendor,
                    protocol=self.protocol,
                    dma=self.dma,
                    gateway=self.gateway,
                    serial=None if self.serial_start is None else self.serial_start + i,
                    meter=Meter(
                        id=dev_id,
                        account=self.account_format.format(i) if self.account_format else None,
                        customer_type=self.customer_type,
                        dn=self.dn,
                        q3=self.q3,
                        register_digits=self.register_digits,
                        install_date=self.install_date,
                    ),
                )
            )
        return devices


class Registry(_Model):
    dmas: list[Dma] = Field(default_factory=list, alias="dma")
    vendors: list[Vendor] = Field(default_factory=list, alias="vendor")
    devices: list[Device] = Field(default_factory=list, alias="device")
    meter_groups: list[MeterGroup] = Field(default_factory=list, alias="meter_group")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _check_refs(self) -> Registry:
        vendors = {v.id for v in self.vendors}
        dmas = {d.id for d in self.dmas}
        seen: set[str] = set()
        for dev in self.all_devices():
            if dev.vendor not in vendors:
                raise ValueError(f"device {dev.id}: unknown vendor {dev.vendor!r}")
            if dev.dma is not None and dev.dma not in dmas:
                raise ValueError(f"device {dev.id}: unknown dma {dev.dma!r}")
            if dev.id in seen:
                raise ValueError(f"device {dev.id} is declared twice")
            seen.add(dev.id)
        return self

    def all_devices(self) -> list[Device]:
        devices = list(self.devices)
        for group in self.meter_groups:
            devices.extend(group.expand())
        return devices

    def vendor(self, vendor_id: str) -> Vendor:
        return next(v for v in self.vendors if v.id == vendor_id)

    def channels_of(self, device: Device) -> list[Channel]:
        """A device's own channels, else its vendor's channel template."""
        return device.channels or self.vendor(device.vendor).channels

    def devices_by_protocol(self, protocol: Protocol) -> list[Device]:
        return [d for d in self.all_devices() if d.protocol == protocol]


def load_registry(path: Path | str) -> Registry:
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    return Registry.model_validate(data)
