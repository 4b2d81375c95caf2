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

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from aquameter.secrets import SecretError, resolve_secret

Protocol = Literal["mqtt", "coap", "modbus", "opcua", "import"]
PayloadFormat = Literal[
    "json", "binary-v1", "cbor", "senml-json", "senml-cbor", "wmbus", "wmbus-hex", "cjt188"
]
# What a customer meter serves (pipelines.anomalies.METER_CLASSES): sets its anomaly rules and
# which open alerts hold its bill.
MeterClassName = Literal["residential", "multi_dwelling", "commercial", "industrial", "bulk"]


class _Model(BaseModel):
    # hide_input_in_errors: a validation error must not echo an inline key (``psk = "..."``,
    # refused below) to the terminal or a CI log.
    model_config = ConfigDict(extra="forbid", frozen=False, hide_input_in_errors=True)


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
    # Apparent-loss components of this DMA's water balance (None: WaterBalanceParams' default);
    # give the figure of an audit or meter test here and the balance reports it as estimated.
    unauthorized_pct_of_siv: float | None = Field(default=None, ge=0, lt=100)
    meter_under_registration_pct: float | None = Field(default=None, ge=0, lt=100)
    data_handling_pct_of_billed_metered: float | None = Field(default=None, ge=0, lt=100)
    # Public holidays (issue 11): their nights are judged with weekend nights by the leak-event
    # detector. ``calendar`` names a [[calendar]] shared by the DMAs of one region (None: the
    # calendar with id "default", if declared); ``holidays`` adds this DMA's own dates (a local
    # festival, a regional holiday the shared calendar lacks).
    calendar: str | None = None
    holidays: list[date] = Field(default_factory=list)


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
    meter_class: MeterClassName = "residential"
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


# Keys that once held a secret inline; now refused with a pointer to the *_env / *_file keys.
INLINE_SECRETS = {"psk": "psk", "password": "password"}


def _refuse_inline_secrets(data: Any, what: str) -> None:
    if not isinstance(data, dict):
        return
    for key, stem in INLINE_SECRETS.items():
        if key in data:
            raise ValueError(
                f"{what}: inline {key} is not accepted (secrets are never kept in the registry);"
                f' move it to {stem}_env = "VARIABLE" or {stem}_file = "path"'
            )


class Device(_Model):
    """One device. Secrets are *referenced*, never held: ``psk_env``/``psk_file`` name where the
    DTLS pre-shared key is (read by the CoAP server when it starts), ``password_env``/
    ``password_file`` where an MQTT password is. A relative ``*_file`` is relative to the registry
    file's directory (:func:`load_registry` makes it absolute).

    ``allow_plain_coap``: this CoAP device may send over plain (unauthenticated) CoAP. Off by
    default because over plain CoAP anyone who can reach the port can claim to be any device;
    only meters that cannot do DTLS should be marked, and they can never have a key."""

    id: str
    vendor: str
    protocol: Protocol = "mqtt"
    dma: str | None = None
    gateway: str | None = None
    serial: int | None = None
    psk_env: str | None = None
    psk_file: Path | None = None
    password_env: str | None = None
    password_file: Path | None = None
    allow_plain_coap: bool = False
    # How the device's own clock keeps time when its frames carry a wall-clock time without a
    # zone (wM-Bus date/time records): "local" = its DMA's zone (OMS meters are set to local
    # time), "utc" = a device set to UTC.
    clock: Literal["local", "utc"] = "local"
    meter: Meter | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    channels: list[Channel] = Field(default_factory=list, alias="channel")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secrets(cls, data: Any) -> Any:
        what = f"device {data.get('id', '?')}" if isinstance(data, dict) else "device"
        _refuse_inline_secrets(data, what)
        return data

    @model_validator(mode="after")
    def _check_secrets(self) -> Device:
        for stem in ("psk", "password"):
            if getattr(self, f"{stem}_env") and getattr(self, f"{stem}_file"):
                raise ValueError(f"device {self.id}: give {stem}_env or {stem}_file, not both")
        if self.allow_plain_coap and self.protocol != "coap":
            raise ValueError(f"device {self.id}: allow_plain_coap is only for protocol coap")
        if self.allow_plain_coap and self.keyed:
            raise ValueError(
                f"device {self.id}: a device with a psk must use DTLS; drop allow_plain_coap"
            )
        return self

    @property
    def keyed(self) -> bool:
        """Has a DTLS key (referenced): its readings are accepted only over DTLS."""
        return bool(self.psk_env or self.psk_file)

    def resolve_psk(self) -> str | None:
        """The DTLS key, read now from its variable or file (None: the device has none).
        Raises :class:`~aquameter.secrets.SecretError` naming the device and where it looked."""
        return _resolve(self.id, "psk", self.psk_env, self.psk_file)

    def resolve_password(self) -> str | None:
        """The MQTT password, read now from its variable or file (None: none configured)."""
        return _resolve(self.id, "password", self.password_env, self.password_file)

    @property
    def psk(self) -> str | None:
        """Deprecated alias of :meth:`resolve_psk` for code written when the key was inline
        (the CoAP meter simulator): reads the variable or file on every access."""
        return self.resolve_psk()

    def secret_refs(self) -> dict[str, str]:
        """Where this device's secrets live (variable names, file paths): what may be stored."""
        refs = {
            "psk_env": self.psk_env,
            "psk_file": None if self.psk_file is None else str(self.psk_file),
            "password_env": self.password_env,
            "password_file": None if self.password_file is None else str(self.password_file),
        }
        return {k: v for k, v in refs.items() if v}


def _resolve(device: str, stem: str, env: str | None, file: Path | None) -> str | None:
    try:
        return resolve_secret(env, file)
    except SecretError as err:
        where = f"{stem}_env {env}" if env else f"{stem}_file {file}"
        raise SecretError(f"device {device}: {where}: {err}") from None


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
    meter_class: MeterClassName = "residential"
    dn: int = 15
    q3: float = 2.5
    register_digits: int = 5
    install_date: date | None = None
    allow_plain_coap: bool = False  # see Device.allow_plain_coap
    clock: Literal["local", "utc"] = "local"  # see Device.clock

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secrets(cls, data: Any) -> Any:
        what = f"meter_group {data.get('id_format', '?')}" if isinstance(data, dict) else "group"
        _refuse_inline_secrets(data, what)
        return data

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
                    allow_plain_coap=self.allow_plain_coap,
                    clock=self.clock,
                    meter=Meter(
                        id=dev_id,
                        account=self.account_format.format(i) if self.account_format else None,
                        customer_type=self.customer_type,
                        meter_class=self.meter_class,
                        dn=self.dn,
                        q3=self.q3,
                        register_digits=self.register_digits,
                        install_date=self.install_date,
                    ),
                )
            )
        return devices


class MeterClass(_Model):
    """Settings of one meter class that differ from the defaults in code.

    ``anomaly`` holds fields of ``pipelines.anomalies.MeterAnomalyParams`` (e.g. ``leak_rule``,
    ``floor_rise_min_m3h``, ``floor_rise_nights``); durations are not accepted here. Unknown keys
    are refused when the flows build the parameters, and at sync. ``hold_codes``: the open alert
    codes that hold this class's bills (None: the class default in ``pipelines.billing``).
    """

    id: MeterClassName
    anomaly: dict[str, float | int | str | bool] = Field(default_factory=dict)
    hold_codes: list[str] | None = None


class Calendar(_Model):
    """A named holiday calendar: the dates whose nights behave like weekend nights.

    Dates are listed, not computed from a rule set: a utility's holidays are set by government
    notice (moved and one-off days included), and a list in the registry is reviewable and stored
    as it was judged. DMAs share a calendar by name (one per region); the calendar with id
    ``"default"`` applies to every DMA that names none.
    """

    id: str
    name: str = ""
    holidays: list[date] = Field(default_factory=list)


DEFAULT_CALENDAR = "default"


class Registry(_Model):
    dmas: list[Dma] = Field(default_factory=list, alias="dma")
    vendors: list[Vendor] = Field(default_factory=list, alias="vendor")
    devices: list[Device] = Field(default_factory=list, alias="device")
    meter_groups: list[MeterGroup] = Field(default_factory=list, alias="meter_group")
    meter_classes: list[MeterClass] = Field(default_factory=list, alias="meter_class")
    calendars: list[Calendar] = Field(default_factory=list, alias="calendar")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    # The directory of the file this registry was loaded from (None: built in code); relative
    # secret files were resolved against it by load_registry.
    _source_dir: Path | None = PrivateAttr(default=None)

    @property
    def source_dir(self) -> Path | None:
        return self._source_dir

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
        classes = [c.id for c in self.meter_classes]
        if len(classes) != len(set(classes)):
            raise ValueError("a meter_class is declared twice")
        calendars = [c.id for c in self.calendars]
        if len(calendars) != len(set(calendars)):
            raise ValueError("a calendar is declared twice")
        for dma in self.dmas:
            if dma.calendar is not None and dma.calendar not in calendars:
                raise ValueError(f"dma {dma.id}: unknown calendar {dma.calendar!r}")
        return self

    def holidays_of(self, dma: Dma) -> list[date]:
        """The DMA's holidays: its calendar's (or the default calendar's) and its own, sorted."""
        name = dma.calendar or DEFAULT_CALENDAR
        days = set(dma.holidays)
        for cal in self.calendars:
            if cal.id == name:
                days.update(cal.holidays)
        return sorted(days)

    def clock_zone(self, device: Device) -> str:
        """The zone of ``device``'s own clock (see ``Device.clock``): its DMA's, or UTC for a
        device set to UTC or without a DMA. Ingest reads zone-less device times in it."""
        if device.clock == "utc" or device.dma is None:
            return "UTC"
        return next((d.timezone for d in self.dmas if d.id == device.dma), "UTC")

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
    """Parse and validate a registry file. Relative ``psk_file``/``password_file`` paths are
    made absolute against the file's directory, so the registry works from any working directory
    and the path stored by ``devices sync`` says exactly which file holds the key."""
    path = Path(path)
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    registry = Registry.model_validate(data)
    base = path.resolve().parent
    registry._source_dir = base
    for dev in registry.devices:
        if dev.psk_file is not None and not dev.psk_file.is_absolute():
            dev.psk_file = base / dev.psk_file
        if dev.password_file is not None and not dev.password_file.is_absolute():
            dev.password_file = base / dev.password_file
    return registry
