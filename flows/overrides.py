"""Threshold overrides for flows, given as plain data (CLI ``--set``, deployment parameters).

Every threshold lives in a params dataclass of the pure function that uses it, with its documented
default. Flows must be runnable from a schedule or a command line, where only JSON-like values
exist, so an override names a field by its dotted path (``night_flow.night_end``) and its value is
coerced to the type of the default it replaces: seconds or ``HH:MM[:SS]`` for a timedelta,
``HH:MM`` for a time of day, ISO text for a date, a list for a tuple or frozenset, a mapping for a
nested dataclass (or a tuple of them). An unknown name is an error, not a silent no-op.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Set
from datetime import date, datetime, time, timedelta
from typing import Any, TypeVar

T = TypeVar("T")


class OverrideError(ValueError):
    pass


def _duration(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float):
        return timedelta(seconds=float(value))
    if isinstance(value, str):
        parts = value.split(":")
        if len(parts) in (2, 3):
            h, m, *s = (float(p) for p in parts)
            return timedelta(hours=h, minutes=m, seconds=s[0] if s else 0.0)
        return timedelta(seconds=float(value))
    raise OverrideError(f"cannot read {value!r} as a duration")


def coerce(current: Any, value: Any) -> Any:
    """``value`` converted to the type of ``current`` (the default it overrides)."""
    if dataclasses.is_dataclass(current) and not isinstance(current, type):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return value
        if not isinstance(value, Mapping):
            raise OverrideError(f"{type(current).__name__} needs a mapping, got {value!r}")
        return apply_overrides(current, value)
    if isinstance(current, bool):
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise OverrideError(f"cannot read {value!r} as a boolean")
        return bool(value)
    if isinstance(current, timedelta):
        return _duration(value)
    if isinstance(current, datetime):
        return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    if isinstance(current, date):
        return value if isinstance(value, date) else date.fromisoformat(str(value))
    if isinstance(current, time):
        return value if isinstance(value, time) else time.fromisoformat(str(value))
    if isinstance(current, int) and not isinstance(value, bool):
        return int(value)
    if isinstance(current, float):
        return float(value)
    if isinstance(current, frozenset | tuple | list):
        items = [value] if isinstance(value, str) else list(value)
        sample = next(iter(current), None)
        if sample is not None and dataclasses.is_dataclass(sample):
            items = [coerce(sample, v) for v in items]
        elif sample is not None and not isinstance(sample, str):
            items = [coerce(sample, v) for v in items]
        return type(current)(items)
    if isinstance(current, Mapping):
        return dict(value)
    if current is None or isinstance(current, str):
        return value
    return value


def _nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1, "a": {"c": 2}}`` → ``{"a": {"b": 1, "c": 2}}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        head, _, rest = key.partition(".")
        if rest:
            out.setdefault(head, {})
            if not isinstance(out[head], dict):
                raise OverrideError(f"{head} is given both as a value and as a group")
            out[head][rest] = value
        elif isinstance(value, Mapping) and isinstance(out.get(head), dict):
            out[head].update(value)
        else:
            out[head] = value
    return out


def apply_overrides(params: T, overrides: Mapping[str, Any] | None) -> T:
    """A copy of the dataclass ``params`` with ``overrides`` applied (dotted names allowed)."""
    if not overrides:
        return params
    if not dataclasses.is_dataclass(params) or isinstance(params, type):
        raise OverrideError(f"{params!r} is not a dataclass instance")
    names = {f.name for f in dataclasses.fields(params)}
    changes: dict[str, Any] = {}
    for name, value in _nested(overrides).items():
        if name not in names:
            known = ", ".join(sorted(names))
            raise OverrideError(f"{type(params).__name__} has no setting {name!r} (known: {known})")
        current = getattr(params, name)
        if isinstance(value, Mapping) and not (
            dataclasses.is_dataclass(current) or isinstance(current, Mapping)
        ):
            raise OverrideError(f"{name} is a single value, not a group")
        try:
            changes[name] = coerce(current, value)
        except (TypeError, ValueError) as err:
            raise OverrideError(f"{type(params).__name__}.{name}: {err}") from err
    return dataclasses.replace(params, **changes)  # type: ignore[type-var]


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """``["a.b=3", "c=x"]`` (CLI ``--set``) → ``{"a.b": "3", "c": "x"}``; values stay text and are
    coerced against the defaults by :func:`apply_overrides`. Comma-separated text becomes a list
    only where the default is a collection."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise OverrideError(f"expected NAME=VALUE, got {item!r}")
        out[key.strip()] = value.split(",") if "," in value else value
    return out


# Settings that only say how much a run looks at or how it splits work, not what a result is.
OPERATIONAL = frozenset(
    {"lookback_days", "late_horizon_days", "merge_gap_days", "chunk_meters", "export_format"}
)


def _plain(value: Any) -> Any:
    if isinstance(value, Set):
        return sorted(_plain(v) for v in value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, date | time):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


def settings_digest(settings: Any) -> str:
    """A stable digest of the settings that shape results (all but :data:`OPERATIONAL`).

    Flows add it to every unit's inputs fingerprint, so a changed threshold recomputes what was
    computed with the old one instead of leaving those results behind. Canonical JSON (sets
    sorted), not ``repr``: set order varies between processes.
    """
    fields = {
        f.name: _plain(getattr(settings, f.name))
        for f in dataclasses.fields(settings)
        if f.name not in OPERATIONAL
    }
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
