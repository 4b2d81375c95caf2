"""``aquameter check``: everything ``devices sync`` would load, validated before it bites.

Why: a registry mistake used to surface late and quietly — a misspelt Modbus key stored wrong
numbers for weeks, a unit that is not a unit of the channel's quantity quarantined every reading,
a time zone typo broke a night-flow window at 3 a.m. This module finds them all at once and
reports each as ``FILE:LINE: message`` (an editor and CI can jump to it), so ``devices sync`` can
refuse a bad registry and write nothing.

tomllib gives no positions, so lines are found by searching the text: the line of the entry's
``id = "..."`` (or a channel's ``name = "..."``), then of the offending key within that entry.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ValidationError

from aquameter.registry import (
    Calendar,
    Channel,
    Device,
    Dma,
    MeterClass,
    MeterGroup,
    Registry,
    Vendor,
)
from ingest.units import UnknownUnit, conversion
from protocols.params import (
    CHANNEL_PARAMS,
    DEVICE_PARAMS,
    ModbusPointParams,
    OpcUaChannelParams,
    OpcUaDeviceParams,
    ParamsError,
    validate_params,
)

# The registry's arrays of tables, their models, and the key that names an entry.
SECTIONS: dict[str, tuple[type[BaseModel], str]] = {
    "dma": (Dma, "id"),
    "vendor": (Vendor, "id"),
    "device": (Device, "id"),
    "meter_group": (MeterGroup, "id_format"),
    "meter_class": (MeterClass, "id"),
    "calendar": (Calendar, "id"),
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the registry, where it is and what to do."""

    file: str
    line: int
    message: str
    col: int | None = None

    def __str__(self) -> str:
        col = f"{self.col}:" if self.col is not None else ""
        return f"{self.file}:{self.line}:{col} {self.message}"


@dataclass(frozen=True)
class Summary:
    dmas: int
    devices: int
    channels: int

    def __str__(self) -> str:
        return (
            f"registry OK: {self.dmas:,} DMAs, {self.devices:,} devices, {self.channels:,} channels"
        )


class _Locator:
    """Lines of entries and keys in the TOML text (1-based)."""

    _HEADER = re.compile(r"^\s*\[\[\s*([A-Za-z_]+)\s*\]\]")
    _ANY_HEADER = re.compile(r"^\s*\[")

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        # section -> [(start, end)] of each [[section]] entry (0-based, end exclusive)
        self.entries: dict[str, list[tuple[int, int]]] = {}
        starts: list[tuple[str, int]] = []
        for i, line in enumerate(self.lines):
            m = self._HEADER.match(line)
            if m:
                starts.append((m.group(1), i))
        for n, (section, start) in enumerate(starts):
            end = starts[n + 1][1] if n + 1 < len(starts) else len(self.lines)
            self.entries.setdefault(section, []).append((start, end))

    def entry(self, section: str, index: int) -> tuple[int, int] | None:
        spans = self.entries.get(section, [])
        return spans[index] if 0 <= index < len(spans) else None

    def find(self, key: str, lo: int, hi: int, value: str | None = None) -> int | None:
        """0-based line of ``key =`` (with ``value`` when given) between lo and hi."""
        if value is None:
            pat = re.compile(rf"(^|[\s{{,]){re.escape(key)}\s*=")
        else:
            pat = re.compile(rf"(^|[\s{{,]){re.escape(key)}\s*=\s*[\"']{re.escape(value)}[\"']")
        for i in range(lo, min(hi, len(self.lines))):
            if pat.search(self.lines[i].split("#", 1)[0]):
                return i
        return None

    def line(
        self,
        section: str,
        index: int,
        keys: tuple[str, ...] = (),
        channel: str | None = None,
    ) -> int:
        """1-based line of ``keys`` (most specific found) in entry ``index`` of ``section``."""
        span = self.entry(section, index)
        if span is None:
            return 1
        lo, hi = span
        best = lo
        name = self.find(SECTIONS.get(section, (None, "id"))[1], lo, hi)
        if name is not None:
            best = name
        if channel is not None:
            ch = self.find("name", lo, hi, channel)
            if ch is not None:
                best = lo = ch
                inline = "{" in self.lines[ch]
                hi = ch + 1 if inline else self._block_end(ch, hi)
        for key in keys:
            found = self.find(key, lo, hi)
            if found is not None:
                best = lo = found
        return best + 1

    def _block_end(self, start: int, hi: int) -> int:
        for i in range(start + 1, hi):
            if self._ANY_HEADER.match(self.lines[i]) and "params" not in self.lines[i]:
                return i
        return hi

    def device_line(self, device_id: str, keys: tuple[str, ...] = ()) -> int:
        for n, (lo, hi) in enumerate(self.entries.get("device", [])):
            if self.find("id", lo, hi, device_id) is not None:
                return self.line("device", n, keys)
        return 1


def _toml_position(err: tomllib.TOMLDecodeError) -> tuple[int, int]:
    m = re.search(r"at line (\d+), column (\d+)", str(err))
    return (int(m.group(1)), int(m.group(2))) if m else (1, 1)


def toml_problem(path: Path, err: tomllib.TOMLDecodeError) -> Problem:
    """A TOML syntax error as ``FILE:LINE:COL: message``."""
    line, col = _toml_position(err)
    msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(err))
    return Problem(str(path), line, f"TOML syntax error: {msg}", col)


def _error_message(what: str, err: dict[str, Any]) -> str:
    loc = [str(p) for p in err.get("loc", ())]
    kind = err.get("type", "")
    key = loc[-1] if loc else ""
    if kind == "extra_forbidden":
        return f"{what}: unknown key {key!r}"
    msg = str(err.get("msg", "")).removeprefix("Value error, ")
    where = ".".join(p for p in loc if not p.isdigit())
    return f"{what}: {where}: {msg}" if where else f"{what}: {msg}"


class _Checker:
    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.file = str(path)
        self.base = path.resolve().parent
        self.loc = _Locator(text)
        self.problems: list[Problem] = []

    def add(self, line: int, message: str) -> None:
        self.problems.append(Problem(self.file, line, message))

    # --- structure: each entry validated on its own, so one bad entry hides no other -------
    def entries(self, data: dict[str, Any]) -> dict[str, list[Any]]:
        good: dict[str, list[Any]] = {}
        for key in data:
            if key not in SECTIONS:
                self.add(1, f"unknown top-level table {key!r} (allowed: {', '.join(SECTIONS)})")
        for section, (model, name_key) in SECTIONS.items():
            items = data.get(section, [])
            if not isinstance(items, list):
                self.add(1, f"{section} must be an array of tables ([[{section}]])")
                continue
            for i, raw in enumerate(items):
                what = f"{section} {raw.get(name_key, i + 1) if isinstance(raw, dict) else i + 1}"
                try:
                    good.setdefault(section, []).append(model.model_validate(raw))
                except ValidationError as exc:
                    for err in exc.errors():
                        self._entry_error(section, i, what, raw, dict(err))
        return good

    def _entry_error(
        self, section: str, index: int, what: str, raw: Any, err: dict[str, Any]
    ) -> None:
        loc = [p for p in err.get("loc", ())]
        channel = None
        keys: list[str] = []
        if len(loc) >= 2 and loc[0] == "channel" and isinstance(loc[1], int):
            chans = raw.get("channel", []) if isinstance(raw, dict) else []
            if 0 <= loc[1] < len(chans) and isinstance(chans[loc[1]], dict):
                channel = str(chans[loc[1]].get("name", ""))
            keys = [str(p) for p in loc[2:3]]
        elif loc:
            keys = [str(loc[0])]
        line = self.loc.line(section, index, tuple(keys), channel)
        if channel:
            what = f"{what} channel {channel}"
            err = {**err, "loc": tuple(loc[2:])}
        self.add(line, _error_message(what, err))

    # --- meaning: what the models cannot know alone ----------------------------------------
    def dmas(self, dmas: list[Dma]) -> None:
        for i, dma in enumerate(dmas):
            try:
                ZoneInfo(dma.timezone)
            except (ZoneInfoNotFoundError, ValueError):
                self.add(
                    self.loc.line("dma", i, ("timezone",)),
                    f"dma {dma.id}: unknown time zone {dma.timezone!r} "
                    f"(an IANA name such as 'Europe/London' or 'UTC')",
                )

    def channel(self, ch: Channel, protocols: set[str], line: int, what: str) -> None:
        try:
            conversion(ch.quantity, ch.unit)
        except UnknownUnit as err:
            self.add(line, f"{what}: {err}{_unit_hint(ch.quantity)}")
        # One problem per (line, message): a template shared by MQTT and CoAP meters that holds a
        # key neither reads is one mistake, named once with both protocols.
        found: dict[tuple[int, str], list[str]] = {}
        for protocol in sorted(protocols):
            model = CHANNEL_PARAMS.get(protocol)
            if model is None:
                continue
            try:
                validate_params(model, ch.params, what)
                if model is ModbusPointParams:
                    from protocols.modbus_decode import parse_point

                    parse_point(ch.name, ch.unit, ch.params, what)
                elif model is OpcUaChannelParams:
                    from protocols.opcua import check_node_id

                    bad = check_node_id(str(ch.params["node_id"]))
                    if bad:
                        raise ParamsError(what, [("node_id", bad)])
            except ValueError as err:
                keys = [k for k, _ in err.problems] if isinstance(err, ParamsError) else []
                found.setdefault((self._key_line(line, keys), str(err)), []).append(protocol)
        for (bad_line, message), protos in found.items():
            self.add(bad_line, f"{message} ({', '.join(protos)} channel)")

    def _key_line(self, line: int, keys: list[str]) -> int:
        """Line of the first of ``keys`` written in the channel starting at ``line``: on its own
        line for an inline table, else up to the next table header (a key that is missing,
        like a required one, is not written: the next key, or the channel's line, is named)."""
        lo = line - 1
        if not 0 <= lo < len(self.loc.lines):
            return line
        hi = lo + 1 if "{" in self.loc.lines[lo] else self.loc._block_end(lo, len(self.loc.lines))
        for key in keys:
            found = self.loc.find(key, lo, hi)
            if found is not None:
                return found + 1
        return line

    def device(self, dev: Device, index: int | None, registry: Registry) -> None:
        where = f"device {dev.id}"
        line = self.loc.line("device", index) if index is not None else self.loc.device_line(dev.id)
        model = DEVICE_PARAMS.get(dev.protocol)
        if model is not None:
            try:
                params = validate_params(model, dev.params, where)
            except ParamsError as err:
                kl = line
                span = self.loc.entry("device", index) if index is not None else None
                if span is not None:  # the first key of the problems that is written there
                    written = (self.loc.find(k, span[0], span[1]) for k, _ in err.problems)
                    kl = next((f + 1 for f in written if f is not None), line)
                self.add(kl, f"{err} ({dev.protocol} device)")
            else:
                if isinstance(params, OpcUaDeviceParams) and index is not None:
                    self._opcua_files(params, index, where)
        for stem in ("psk_file", "password_file"):
            ref = getattr(dev, stem)
            if ref is not None:
                file = ref if ref.is_absolute() else self.base / ref
                if not file.is_file():
                    kl = self.loc.line("device", index, (stem,)) if index is not None else line
                    self.add(kl, f"{where}: {stem} {file} does not exist (relative to the file)")
        if dev.channels and index is not None:
            for ch in dev.channels:
                cl = self.loc.line("device", index, (), ch.name)
                self.channel(ch, {dev.protocol}, cl, f"{where} channel {ch.name}")

    def _opcua_files(self, p: OpcUaDeviceParams, index: int, where: str) -> None:
        files = {"server_certificate": p.server_certificate}
        if not p.generate_client_certificate:
            files["client_certificate"] = p.client_certificate
            files["client_private_key"] = p.client_private_key
        for key, value in files.items():
            if value is None:
                continue
            file = Path(value) if Path(value).is_absolute() else self.base / value
            if not file.is_file():
                self.add(
                    self.loc.line("device", index, (key,)),
                    f"{where}: {key} {file} does not exist",
                )
        if p.security_policy != "None" and not (p.client_certificate and p.client_private_key):
            self.add(
                self.loc.line("device", index, ("security_policy",)),
                f"{where}: security_policy {p.security_policy} needs client_certificate "
                f"and client_private_key",
            )
        if p.lifetime_count < 3 * p.keepalive_count:
            self.add(
                self.loc.line("device", index, ("lifetime_count",)),
                f"{where}: lifetime_count must be >= 3 * keepalive_count",
            )


def _unit_hint(quantity: str) -> str:
    from ingest.units import CANONICAL, CONVERSIONS

    if quantity not in CANONICAL:
        return f" (known quantities: {', '.join(sorted(CANONICAL))})"
    units = sorted(CONVERSIONS.get(quantity, {CANONICAL[quantity]: (1.0, 0.0)}))
    return f" (units of {quantity}: {', '.join(units)})"


def check_registry_text(path: Path, text: str) -> tuple[list[Problem], Summary | None]:
    """Problems of the registry ``text`` read from ``path`` (paths resolve relative to it)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        return [toml_problem(path, err)], None
    c = _Checker(path, text)
    good = c.entries(data)
    dmas: list[Dma] = good.get("dma", [])
    vendors: list[Vendor] = good.get("vendor", [])
    if c.problems:  # the cross-references need every entry
        return c.problems, None
    c.dmas(dmas)
    try:
        registry = Registry.model_validate(data)
    except ValidationError as exc:
        for detail in exc.errors():
            msg = str(detail.get("msg", "")).removeprefix("Value error, ")
            m = re.match(r"device (\S+)", msg)
            d = re.match(r"dma (\S+): unknown calendar", msg)
            dma_ids = [x.id for x in dmas]
            if m:
                line = c.loc.device_line(m.group(1), ("vendor", "dma"))
            elif d and d.group(1) in dma_ids:
                line = c.loc.line("dma", dma_ids.index(d.group(1)), ("calendar",))
            else:
                line = 1
            c.add(line, msg)
        return c.problems, None
    registry._source_dir = path.resolve().parent
    devices = registry.all_devices()
    protocols_of: dict[str, set[str]] = {}
    for dev in devices:
        if not dev.channels:
            protocols_of.setdefault(dev.vendor, set()).add(dev.protocol)
    for vi, vendor in enumerate(vendors):
        for ch in vendor.channels:
            line = c.loc.line("vendor", vi, (), ch.name)
            c.channel(
                ch,
                protocols_of.get(vendor.id, set()),
                line,
                f"vendor {vendor.id} channel {ch.name}",
            )
    for di, dev in enumerate(registry.devices):
        c.device(dev, di, registry)
    channels = sum(len(registry.channels_of(d)) for d in devices)
    summary = Summary(len(registry.dmas), len(devices), channels)
    return c.problems, (None if c.problems else summary)


def check_registry(path: Path | str) -> list[Problem]:
    """Every problem ``devices sync`` would run into with the registry at ``path``; empty when
    it is fit to load. Never raises for the file's content (a missing file is one problem)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        return [Problem(str(path), 0, f"cannot read the registry: {err.strerror or err}")]
    except UnicodeDecodeError as err:
        return [Problem(str(path), 1, f"not UTF-8 text: {err}")]
    return check_registry_text(path, text)[0]


def check_url(url: str, schemes: tuple[str, ...], what: str) -> str | None:
    """Why ``url`` cannot work (no scheme, or not one of ``schemes``), else None."""
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme:
        return f"{what} {url!r} has no scheme: write {schemes[0]}://host:port"
    if scheme not in schemes:
        return f"{what} {url!r}: scheme {scheme}:// is not one of {', '.join(schemes)}"
    if not rest or rest.startswith(("/", ":")):
        return f"{what} {url!r} has no host"
    return None
