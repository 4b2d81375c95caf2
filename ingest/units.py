"""Canonical units per quantity and the conversions vendors need (see docs/domain.md).

Stored values are always canonical: m³ for volumes, m³/h for flow, metres of head for pressure,
so analytics never guess a unit. An unknown unit for a quantity is a quarantine reason, not a guess.
"""

from __future__ import annotations

CANONICAL: dict[str, str] = {
    "volume": "m3",
    "flow": "m3/h",
    "pressure": "m",
    "level": "m",
    "turbidity": "NTU",
    "chlorine": "mg/L",
    "dissolved_oxygen": "mg/L",
    "conductivity": "uS/cm",
    "temperature": "degC",
    "ph": "pH",
    "power": "kW",
    "energy": "kWh",
    "state": "state",
    "count": "count",
    "hours": "h",
    "voltage": "V",
}

# unit -> (factor, offset): canonical = value * factor + offset
CONVERSIONS: dict[str, dict[str, tuple[float, float]]] = {
    "volume": {
        "m3": (1.0, 0.0),
        "L": (1e-3, 0.0),
        "l": (1e-3, 0.0),
        "dL": (1e-4, 0.0),  # 0.1 L pulses
        "pulse_0.1L": (1e-4, 0.0),
        "m3x1000": (1e-3, 0.0),
        "gal": (3.785411784e-3, 0.0),
    },
    "flow": {
        "m3/h": (1.0, 0.0),
        "L/s": (3.6, 0.0),
        "l/s": (3.6, 0.0),
        "L/h": (1e-3, 0.0),
        "L/min": (0.06, 0.0),
        "m3/s": (3600.0, 0.0),
    },
    "pressure": {
        "m": (1.0, 0.0),
        "bar": (10.197, 0.0),
        "kPa": (0.10197, 0.0),
        "psi": (0.7031, 0.0),
        "MPa": (101.97, 0.0),
    },
    "level": {"m": (1.0, 0.0), "cm": (0.01, 0.0), "mm": (0.001, 0.0)},
    "conductivity": {"uS/cm": (1.0, 0.0), "µS/cm": (1.0, 0.0), "mS/cm": (1000.0, 0.0)},
    "temperature": {"degC": (1.0, 0.0), "C": (1.0, 0.0), "°C": (1.0, 0.0), "K": (1.0, -273.15)},
    "power": {"kW": (1.0, 0.0), "W": (1e-3, 0.0)},
    "energy": {"kWh": (1.0, 0.0), "Wh": (1e-3, 0.0), "MWh": (1000.0, 0.0)},
    "hours": {"h": (1.0, 0.0), "s": (1 / 3600, 0.0), "min": (1 / 60, 0.0)},
    "voltage": {"V": (1.0, 0.0), "mV": (1e-3, 0.0)},
}

# Physically possible ranges in canonical units; a channel may narrow them in the registry.
DEFAULT_RANGES: dict[str, tuple[float, float]] = {
    "volume": (0.0, 1e9),
    "flow": (-1e5, 1e5),
    "pressure": (-10.0, 300.0),
    "level": (-100.0, 1000.0),
    "turbidity": (0.0, 4000.0),
    "chlorine": (0.0, 20.0),
    "dissolved_oxygen": (0.0, 25.0),
    "conductivity": (0.0, 200000.0),
    "temperature": (-40.0, 80.0),
    "ph": (0.0, 14.0),
    "power": (-1e5, 1e5),
    "energy": (0.0, 1e12),
    "state": (0.0, 1.0),
    "count": (0.0, 1e12),
    "hours": (0.0, 1e7),
    "voltage": (0.0, 1000.0),
}


class UnknownUnit(ValueError):
    pass


def conversion(quantity: str, unit: str) -> tuple[float, float]:
    """(factor, offset) that turn ``unit`` into the quantity's canonical unit."""
    canonical = CANONICAL.get(quantity)
    if canonical is None:
        raise UnknownUnit(f"unknown quantity {quantity!r}")
    if unit == canonical or unit == "":
        return (1.0, 0.0)
    table = CONVERSIONS.get(quantity, {})
    if unit not in table:
        raise UnknownUnit(f"{unit!r} is not a unit of {quantity}")
    return table[unit]
