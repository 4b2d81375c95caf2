"""Faults the simulator injects, and how each one changes what meters and DMAs see.

Fault codes are the alert codes of the domain reference (``LEAK_CONTINUOUS``, ``BURST``, …) so a
test compares detected alerts with the manifest by code and subject. The one exception is
``DMA_LEAK``: it is the *cause* (a new leak in the network), and ``DMA_NIGHT_FLOW_RISE`` is the
alert that must find it; :data:`EXPECTED_ALERT` maps each fault to the alert code to expect.

Meter faults act on two arrays of interval volumes in litres, shape (meters, intervals):
``true_l`` (water that really went through the meter, negative when it flows back) and
``registered_l`` (what the register counted). Their difference is meter under-registration, an
apparent loss in the water balance. Status faults set vendor bits (``protocols.uplink.Quality``)
on the reads; communication faults decide which reads arrive and when.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import numpy as np

from protocols.uplink import Quality

FaultCode = Literal[
    "LEAK_CONTINUOUS",
    "BURST",
    "REVERSE_FLOW",
    "STUCK_METER",
    "TAMPER",
    "LOW_BATTERY",
    "COMMS_LOSS",
    "OVER_CAPACITY",
    "DMA_LEAK",
]

METER_FAULTS: frozenset[str] = frozenset(
    {
        "LEAK_CONTINUOUS",
        "BURST",
        "REVERSE_FLOW",
        "STUCK_METER",
        "TAMPER",
        "LOW_BATTERY",
        "COMMS_LOSS",
        "OVER_CAPACITY",
    }
)
DMA_FAULTS: frozenset[str] = frozenset({"DMA_LEAK"})

EXPECTED_ALERT: dict[str, str] = {code: code for code in METER_FAULTS} | {
    "DMA_LEAK": "DMA_NIGHT_FLOW_RISE"
}

# Default parameters per code; a fault's own ``params`` override them.
DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "LEAK_CONTINUOUS": {"rate_lph": 20.0, "vendor_flag": False},
    "BURST": {"q3_fraction": 0.8},
    "REVERSE_FLOW": {"rate_lph": 30.0},
    "STUCK_METER": {},
    "TAMPER": {"under_registration": 0.0},
    "LOW_BATTERY": {},
    "COMMS_LOSS": {"delivery": "lost", "late_delay_s": 0.0},
    "OVER_CAPACITY": {"q4_factor": 1.3},
    "DMA_LEAK": {"rate_m3h": 1.0},
}


@dataclass(frozen=True)
class Fault:
    """One injected fault. ``subject`` is a meter id (meter faults) or a DMA id (``DMA_LEAK``);
    ``end`` None means it lasts to the end of the window."""

    code: FaultCode
    subject: str
    start: datetime
    end: datetime | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.code not in DEFAULT_PARAMS:
            raise ValueError(f"unknown fault code {self.code!r}")
        if self.start.tzinfo is None or (self.end is not None and self.end.tzinfo is None):
            raise ValueError(f"fault {self.code} on {self.subject}: times must be timezone-aware")
        if self.end is not None and self.end <= self.start:
            raise ValueError(f"fault {self.code} on {self.subject}: end must be after start")
        unknown = set(self.params) - set(DEFAULT_PARAMS[self.code])
        if unknown:
            raise ValueError(f"fault {self.code}: unknown parameters {sorted(unknown)}")

    def param(self, name: str) -> Any:
        """The effective value: the fault's own, else the documented default."""
        return self.params.get(name, DEFAULT_PARAMS[self.code][name])

    @property
    def is_meter_fault(self) -> bool:
        return self.code in METER_FAULTS

    def to_json(self) -> dict[str, Any]:
        """The manifest entry: effective parameters (defaults filled in) so a reader never has to
        know this module's defaults to interpret the truth."""
        return {
            "code": self.code,
            "alert": EXPECTED_ALERT[self.code],
            "subject": self.subject,
            "start": _iso(self.start),
            "end": None if self.end is None else _iso(self.end),
            "params": DEFAULT_PARAMS[self.code] | self.params,
        }


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class Grid:
    """The simulation time grid: interval k covers (t0 + k·step, t0 + (k+1)·step]; read j is the
    register at t0 + j·step (j = 0..n), so read j+1 closes interval j."""

    t0: float  # epoch seconds
    step: int
    n: int

    @property
    def end(self) -> float:
        return self.t0 + self.n * self.step

    def overlap(self, start: datetime, end: datetime | None) -> np.ndarray:
        """Share (0..1) of each interval inside [start, end): partial first and last intervals
        get a partial volume, so truth volumes equal rate × duration exactly."""
        a = start.timestamp()
        b = self.end if end is None else min(end.timestamp(), self.end)
        lo = self.t0 + np.arange(self.n, dtype=np.float64) * self.step
        return np.clip((np.minimum(lo + self.step, b) - np.maximum(lo, a)) / self.step, 0.0, 1.0)

    def read_mask(self, start: datetime, end: datetime | None) -> np.ndarray:
        """Reads whose timestamp lies in [start, end)."""
        ts = self.t0 + np.arange(self.n + 1, dtype=np.float64) * self.step
        b = np.inf if end is None else end.timestamp()
        return (ts >= start.timestamp()) & (ts < b)


@dataclass
class MeterEffects:
    """What the meter faults did, for the manifest: litres per fault, in injection order."""

    volumes_l: list[dict[str, float]] = field(default_factory=list)


def apply_meter_faults(
    faults: Sequence[Fault],
    index: dict[str, int],
    grid: Grid,
    true_l: np.ndarray,
    registered_l: np.ndarray,
    quality: np.ndarray,
    q3: np.ndarray,
    q4: np.ndarray,
) -> list[dict[str, float]]:
    """Apply meter faults in place; return per-fault effect volumes (same order as ``faults``,
    DMA faults get an empty dict).

    Order matters and is fixed: flow faults first (they add water that goes through the meter),
    then registration faults (stuck, tamper) which decide how much of it the register counts.
    """
    step_h = grid.step / 3600.0
    effects: list[dict[str, float]] = [{} for _ in faults]
    order = sorted(
        range(len(faults)),
        key=lambda i: 1 if faults[i].code in ("STUCK_METER", "TAMPER") else 0,
    )
    for i in order:
        f = faults[i]
        if not f.is_meter_fault:
            continue
        if f.subject not in index:
            raise ValueError(f"fault {f.code}: unknown meter {f.subject!r}")
        m = index[f.subject]
        share = grid.overlap(f.start, f.end)
        reads = grid.read_mask(f.start, f.end)
        if f.code == "LEAK_CONTINUOUS":
            extra = float(f.param("rate_lph")) * step_h * share
            true_l[m] += extra
            registered_l[m] += extra
            effects[i] = {"leak_l": float(extra.sum())}
            if f.param("vendor_flag"):
                quality[m, reads] |= Quality.LEAK
        elif f.code in ("BURST", "OVER_CAPACITY"):
            if f.code == "BURST":
                rate_m3h = float(f.param("q3_fraction")) * q3[m]
            else:
                rate_m3h = float(f.param("q4_factor")) * q4[m]
            # The customer's own use continues underneath a burst; the pipe cannot pass more
            # than the burst rate on top of it, so the interval is the larger of the two.
            target = rate_m3h * 1000.0 * step_h * share
            before = true_l[m].copy()
            np.maximum(true_l[m], target, out=true_l[m], where=share > 0)
            added = true_l[m] - before
            registered_l[m] += added
            effects[i] = {"extra_l": float(added.sum()), "rate_m3h": rate_m3h}
        elif f.code == "REVERSE_FLOW":
            # Backflow happens when the customer side is at higher pressure: no use meanwhile.
            back = float(f.param("rate_lph")) * step_h * share
            removed = true_l[m] * share
            true_l[m] -= removed + back
            registered_l[m] -= removed + back
            quality[m, _closing_reads(share)] |= Quality.REVERSE_FLOW
            effects[i] = {"reverse_l": float(back.sum()), "suppressed_use_l": float(removed.sum())}
        elif f.code == "STUCK_METER":
            missed = registered_l[m] * share
            registered_l[m] -= missed
            effects[i] = {"unregistered_l": float(missed.sum())}
        elif f.code == "TAMPER":
            under = float(f.param("under_registration"))
            missed = registered_l[m] * share * under
            registered_l[m] -= missed
            quality[m, reads] |= Quality.TAMPER
            effects[i] = {"unregistered_l": float(missed.sum())}
        elif f.code == "LOW_BATTERY":
            quality[m, reads] |= Quality.LOW_BATTERY
        elif f.code == "COMMS_LOSS":
            effects[i] = {"reads_affected": float(reads.sum())}
    return effects


def _closing_reads(share: np.ndarray) -> np.ndarray:
    """Reads that close an affected interval: read j+1 closes interval j."""
    mask = np.zeros(len(share) + 1, dtype=bool)
    mask[1:] = share > 0
    return mask


def dma_leak_flow(fault: Fault, grid: Grid, pressure_ratio: np.ndarray) -> np.ndarray:
    """A DMA leak's flow per interval (m³/h). ``rate_m3h`` is the rate at night pressure (how
    leaks are sized from minimum night flow); by FAVAD with N1 = 1 it falls as pressure drops by
    day, which is what the night-day factor accounts for."""
    return float(fault.param("rate_m3h")) * pressure_ratio * grid.overlap(fault.start, fault.end)


def random_faults(
    meter_ids: Sequence[str],
    dma_ids: Sequence[str],
    start: datetime,
    days: int,
    seed: int,
    counts: dict[str, int] | None = None,
) -> list[Fault]:
    """A reproducible mix of faults on distinct meters, each starting early enough in the window
    that a detector with default thresholds can see it (a few days of evidence).

    ``counts`` maps fault codes to how many to inject; the default is one of each meter fault
    and one DMA leak, when the window and fleet are large enough.
    """
    counts = (
        counts
        if counts is not None
        else {
            "LEAK_CONTINUOUS": 1,
            "BURST": 1,
            "REVERSE_FLOW": 1,
            "STUCK_METER": 1,
            "TAMPER": 1,
            "LOW_BATTERY": 1,
            "COMMS_LOSS": 1,
            "DMA_LEAK": 1 if dma_ids else 0,
        }
    )
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xFA017]))
    n_meter_faults = sum(v for k, v in counts.items() if k in METER_FAULTS)
    if n_meter_faults > len(meter_ids):
        raise ValueError(f"{n_meter_faults} meter faults need as many meters")
    chosen = iter(rng.choice(len(meter_ids), size=n_meter_faults, replace=False).tolist())
    first_half = max(1, days // 2)
    faults: list[Fault] = []
    for code in sorted(counts):
        for _ in range(counts[code]):
            day = int(rng.integers(1, first_half + 1)) if days > 1 else 0
            hour = int(rng.integers(0, 24))
            t = start + timedelta(days=day, hours=hour)
            if code == "DMA_LEAK":
                subject = dma_ids[int(rng.integers(len(dma_ids)))]
                rate = round(float(rng.uniform(0.5, 3.0)), 2)
                faults.append(Fault("DMA_LEAK", subject, t, None, {"rate_m3h": rate}))
                continue
            meter = meter_ids[next(chosen)]
            if code == "LEAK_CONTINUOUS":
                rate = round(float(rng.uniform(10.0, 40.0)), 1)
                faults.append(Fault("LEAK_CONTINUOUS", meter, t, None, {"rate_lph": rate}))
            elif code == "BURST":
                faults.append(Fault("BURST", meter, t, t + timedelta(hours=4)))
            elif code == "OVER_CAPACITY":
                faults.append(Fault("OVER_CAPACITY", meter, t, t + timedelta(minutes=30)))
            elif code == "REVERSE_FLOW":
                faults.append(Fault("REVERSE_FLOW", meter, t, t + timedelta(hours=2)))
            elif code == "STUCK_METER":
                faults.append(Fault("STUCK_METER", meter, t, None))
            elif code == "COMMS_LOSS":
                faults.append(Fault("COMMS_LOSS", meter, t, t + timedelta(days=2)))
            else:
                faults.append(Fault(code, meter, t, None))  # type: ignore[arg-type]
    return faults
