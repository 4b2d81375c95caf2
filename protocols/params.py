"""Typed models of what a device's or channel's ``params`` may hold, one per protocol.

Why: ``params`` is free-form TOML, and the adapters used to ``.get()`` what they know and ignore
the rest, so a misspelt key was silently a default: Modbus ``typ = "float32"`` was read as
uint16 and stored plausible, wrong numbers. Every model here forbids unknown keys, and
:func:`validate_params` turns pydantic's errors into one line per problem that names the key,
the allowed keys and, when the key looks like a typo, the one that was probably meant.

The keys and their meaning are documented in ``protocols/*.sample.toml``; range and
cross-field rules that need the whole point (a ``bit`` only on a bool register, an address
plus width within 0..65535) stay with the adapter that knows them (``parse_point``).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

Table = Literal["holding", "input", "coil", "discrete"]
Order = Literal["big", "little"]
ModbusType = Literal[
    "int16", "uint16", "int32", "uint32", "float32", "int64", "uint64", "float64", "bool"
]


class _Params(BaseModel):
    # hide_input_in_errors: an error must never echo a value that might be a secret.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


class ModbusPointParams(_Params):
    """A Modbus channel: where its value sits in the device's register map."""

    table: Table = "holding"
    address: int = Field(ge=0, le=65535)
    type: ModbusType | None = None  # default: bool on coil/discrete, else uint16
    byte_order: Order = "big"
    word_order: Order = "big"
    scale: float = 1.0
    offset: float = 0.0
    bit: int | None = None  # 0..15, checked by parse_point with the table and type

    _case = field_validator("table", "type", "byte_order", "word_order", mode="before")(_lower)


class ModbusDeviceParams(_Params):
    """A Modbus TCP device: how to reach it and how often to poll it."""

    host: str = Field(min_length=1)
    port: int = Field(default=502, ge=1, le=65535)
    unit_id: int = Field(default=1, ge=0, le=255)
    poll_interval_s: float = Field(default=10.0, gt=0)
    timeout_s: float = Field(default=1.0, gt=0)
    max_gap: int = Field(default=16, ge=0)
    backoff_min_s: float = Field(default=1.0, ge=0)
    backoff_max_s: float = Field(default=60.0, ge=0)

    @field_validator("host")
    @classmethod
    def _not_a_url(cls, value: str) -> str:
        if "://" in value:
            raise ValueError("host is a host name or address, not a URL (port goes in port)")
        return value


class OpcUaChannelParams(_Params):
    """An OPC-UA channel: one monitored item."""

    node_id: str = Field(min_length=1)
    sampling_interval: float | None = Field(default=None, ge=0)
    queue_size: int | None = Field(default=None, ge=0)


class OpcUaDeviceParams(_Params):
    """An OPC-UA device: one session to one server (see protocols/opcua.sample.toml)."""

    endpoint: str
    station: str | None = None
    publishing_interval: float = Field(default=1000.0, gt=0)
    keepalive_count: int = Field(default=10, ge=1)
    lifetime_count: int = 100
    session_timeout: int = 60_000
    request_timeout: float = 4.0
    trigger: Literal["status", "status_value", "status_value_timestamp"] = "status_value_timestamp"
    sampling_interval: float = Field(default=0.0, ge=0)
    queue_size: int = Field(default=10, ge=0)
    security_policy: Literal["None", "Basic256Sha256"] = "None"
    security_mode: Literal["Sign", "SignAndEncrypt"] = "SignAndEncrypt"
    client_certificate: str | None = None
    client_private_key: str | None = None
    generate_client_certificate: bool = False
    server_certificate: str | None = None
    application_uri: str = "urn:aquameter:opcua:subscriber"
    username: str | None = None
    password_env: str | None = None

    @field_validator("endpoint")
    @classmethod
    def _opc_tcp(cls, value: str) -> str:
        if not value.startswith("opc.tcp://") or len(value) <= len("opc.tcp://"):
            raise ValueError(f"endpoint must be an opc.tcp://host:port URL, not {value!r}")
        return value


class NoParams(_Params):
    """MQTT, CoAP and import devices and channels read nothing from ``params``: any key there
    is a mistake (or belongs to another protocol)."""


DEVICE_PARAMS: dict[str, type[_Params]] = {
    "modbus": ModbusDeviceParams,
    "opcua": OpcUaDeviceParams,
    "mqtt": NoParams,
    "coap": NoParams,
    "import": NoParams,
}
CHANNEL_PARAMS: dict[str, type[_Params]] = {
    "modbus": ModbusPointParams,
    "opcua": OpcUaChannelParams,
    "mqtt": NoParams,
    "coap": NoParams,
    "import": NoParams,
}

M = TypeVar("M", bound=_Params)


class ParamsError(ValueError):
    """``params`` that a protocol cannot use; ``problems`` holds one (key, message) each."""

    def __init__(self, where: str, problems: list[tuple[str, str]]) -> None:
        self.where = where
        self.problems = problems
        text = "; ".join(msg for _, msg in problems)
        super().__init__(f"{where}: {text}" if where else text)


def _describe(model: type[_Params], err: Any) -> tuple[str, str]:
    loc = err.get("loc") or ()
    key = str(loc[0]) if loc else ""
    allowed = sorted(model.model_fields)
    kind = err.get("type", "")
    value = err.get("input")
    if kind == "extra_forbidden":
        if not allowed:
            return key, f"params.{key} is not a key this protocol reads (it takes no params)"
        near = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
        hint = f"did you mean {near[0]!r}? " if near else ""
        return key, f"unknown params key {key!r}: {hint}allowed: {', '.join(allowed)}"
    if kind == "missing":
        return key, f"params.{key} is required"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return key, f"params.{key} = {value!r} is not an integer"
    if kind in ("float_parsing", "float_type"):
        return key, f"params.{key} = {value!r} is not a number"
    if kind in ("bool_parsing", "bool_type"):
        return key, f"params.{key} = {value!r} is not true or false"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return key, f"params.{key} must be one of {expected}, not {value!r}"
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    return key, f"params.{key}: {msg}"


def validate_params(model: type[M], params: Mapping[str, Any], where: str = "") -> M:
    """``params`` as ``model``, or :class:`ParamsError` naming every bad key."""
    try:
        return model.model_validate(dict(params))
    except ValidationError as exc:
        raise ParamsError(where, [_describe(model, e) for e in exc.errors()]) from None
