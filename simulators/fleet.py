"""The meter fleet and its DMAs, simulated in one vectorised pass: the CI's data and its truth.

``simulate_fleet`` turns a registry into what the head-end would hold after a window of days —
register reads of every customer meter, net inflow and average-zone-point pressure of every DMA —
together with a *manifest* that says what really happened: which faults were injected where, and
each DMA's water balance (system input, billed, unmetered, real and apparent losses, NRW). Analytics
tests run on the frames and compare their findings with the manifest.

Conventions (also written into the manifest):

* Registers are read at t0, t0 + step, …, t0 + n·step (n + 1 reads per meter), so the register
  difference over the window is exactly the window's consumption; a customer interval is
  labelled by the read that closes it (its END), like ``pipelines.schemas.INTERVALS``.
* DMA flow and pressure at ts are means over [ts, ts + step), labelled by the slot START (the
  convention of ``dma.inflow``): the flow at t0 + k·step carries the customer interval that the
  read at t0 + (k+1)·step closes.
* The balance window is [t0, t0 + days]; SIV is the sum of the reported inlet flows over it.
* Registers count whole litres (floor of the true cumulative volume) and wrap at
  10^register_digits m³.
* Real losses follow FAVAD with N1 = 1: every leak flows ∝ pressure. Leak rates (background and
  ``DMA_LEAK``) are quoted at *night* pressure, as they are sized from minimum night flow.

Randomness comes from named child streams of one seed, so the same seed gives the same fleet,
and adding a fault does not change any other meter's demand.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from aquameter.registry import Channel, Device, Dma, Meter, MeterGroup, Registry, Vendor
from ingest.units import conversion
from pipelines.schemas import DMA_FLOW, DMA_PRESSURE, DMAS, METER_EXCHANGES, METER_READS, METERS
from simulators.demand import (
    DemandParams,
    LocalClock,
    draw_scales,
    draw_use_litres,
    expected_interval_m3,
    local_clock,
    profile_weights,
)
from simulators.faults import Fault, Grid, apply_meter_faults, dma_leak_flow

UTC_US = pl.Datetime("us", "UTC")


@dataclass(frozen=True)
class FleetParams:
    """Model knobs beyond demand, each with the default the CI uses."""

    demand: DemandParams = field(default_factory=DemandParams)
    # Background (undetected) leakage: ILI × UARL unless a DMA's night rate is given explicitly.
    leakage_ili: float = 2.0
    background_leak_m3h: Mapping[str, float] = field(default_factory=dict)
    # Average zone point pressure: the DMA's avg_pressure_m (or this default) as the daily mean,
    # minus a head loss that grows with the square of demand (peak hour loses the full swing).
    default_pressure_m: float = 42.0
    pressure_swing_m: float = 7.0
    pressure_noise_m: float = 0.15
    # Registers start at a random value below this, except ``rollover_meters``, which start just
    # below their wrap so that the register rolls over ``rollover_at`` into the window.
    register_start_max_m3: float = 2000.0
    rollover_meters: Sequence[str] = ()
    rollover_at: float = 0.3
    # Resolution of DMA instruments in their own unit (e.g. L/s with 4 decimals, bar with 3).
    flow_decimals: int = 4
    pressure_decimals: int = 3


@dataclass
class FleetData:
    """Frames in ``pipelines.schemas`` layouts plus the ground truth.

    ``reads`` holds every read the head-end ends up with (reads lost to COMMS_LOSS are absent,
    late ones present). ``late`` lists the reads that arrive late and when they are sent;
    ``inlet_values`` holds DMA instrument values in the devices' own units for traffic.
    """

    reads: pl.DataFrame
    dma_flow: pl.DataFrame
    dma_pressure: pl.DataFrame
    meters: pl.DataFrame
    dmas: pl.DataFrame
    exchanges: pl.DataFrame
    late: pl.DataFrame
    inlet_values: pl.DataFrame
    manifest: dict[str, Any]
    interval_s: int
    start: datetime
    end: datetime


@dataclass(frozen=True)
class _MeterInfo:
    device: Device
    meter: Meter
    meter_id: str


def customer_meters(registry: Registry) -> list[tuple[Device, Meter]]:
    """Devices with a meter and a ``register`` channel, in registry order."""
    found = []
    for dev in registry.all_devices():
        if dev.meter is None:
            continue
        if any(ch.name == "register" for ch in registry.channels_of(dev)):
            found.append((dev, dev.meter))
    return found


def meter_id_of(device: Device) -> str:
    """The meter id readings are stored under: the meter's own id, else its device's."""
    return device.meter.id if device.meter is not None and device.meter.id else device.id


def _utc(t: datetime) -> datetime:
    if t.tzinfo is None:
        raise ValueError("start must be timezone-aware (UTC)")
    return t.astimezone(UTC)


def _iso(t: datetime | float) -> str:
    if isinstance(t, float | int):
        t = datetime.fromtimestamp(t, UTC)
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def simulate_fleet(
    registry: Registry,
    start: datetime,
    days: int,
    *,
    interval_s: int = 900,
    seed: int = 0,
    faults: Sequence[Fault] = (),
    params: FleetParams | None = None,
) -> FleetData:
    """Simulate every customer meter and DMA of ``registry`` for ``days`` from ``start``."""
    params = params or FleetParams()
    start = _utc(start)
    if days <= 0 or interval_s <= 0 or 86400 % interval_s:
        raise ValueError("days must be positive and the interval must divide a day")
    if start.timestamp() % interval_s:
        raise ValueError(f"start {start} is not aligned to the {interval_s} s interval")
    grid = Grid(t0=start.timestamp(), step=interval_s, n=days * 86400 // interval_s)
    step_h = interval_s / 3600.0
    streams = {
        name: np.random.default_rng(np.random.SeedSequence([seed, i]))
        for i, name in enumerate(("scales", "use", "registers", "pressure"))
    }

    infos = [_MeterInfo(d, m, meter_id_of(d)) for d, m in customer_meters(registry)]
    index = {info.meter_id: i for i, info in enumerate(infos)}
    if len(index) != len(infos):
        raise ValueError("two customer meters share a meter id")
    n_m = len(infos)
    dmas = list(registry.dmas)
    dma_pos = {d.id: i for i, d in enumerate(dmas)}
    for f in faults:
        if f.code == "DMA_LEAK" and f.subject not in dma_pos:
            raise ValueError(f"DMA_LEAK: unknown DMA {f.subject!r}")

    # --- clocks and profiles per (DMA, customer type) --------------------------------------
    mid_us = ((grid.t0 + (np.arange(grid.n) + 0.5) * interval_s) * 1e6).astype(np.int64)
    zones = [d.timezone for d in dmas] + ["UTC"]  # last: meters without a DMA
    clocks = [local_clock(mid_us, tz) for tz in zones]
    types = ("household", "non_household")
    weights = np.stack(
        [profile_weights(params.demand, t, clk) for clk in clocks for t in types], axis=0
    )
    meter_dma = np.array(
        [dma_pos[i.device.dma] if i.device.dma is not None else len(dmas) for i in infos],
        dtype=np.int64,
    )
    non_household = np.array([i.meter.customer_type == "non_household" for i in infos], dtype=bool)
    group = meter_dma * 2 + non_household.astype(np.int64)
    # The day-to-day factor changes at local midnight of each meter's DMA; one day index suffices
    # (the factor is noise), so the first DMA's local calendar is used for all.
    day = clocks[0].day

    q3 = np.array([i.meter.q3 for i in infos], dtype=np.float64)
    q4 = np.array([i.meter.q4 or 1.25 * i.meter.q3 for i in infos], dtype=np.float64)
    cap_l = params.demand.max_q3_fraction * q3 * 1000.0 * step_h

    # --- customer use and faults -------------------------------------------------------------
    scales = draw_scales(streams["scales"], params.demand, non_household)
    true_l = draw_use_litres(
        streams["use"], params.demand, scales, weights, group, day, interval_s, cap_l
    )
    install_mask = _installed(infos, grid)
    if install_mask is not None:
        true_l *= install_mask
    registered_l = true_l.copy()
    quality = np.zeros((n_m, grid.n + 1), dtype=np.int16)
    effects = apply_meter_faults(faults, index, grid, true_l, registered_l, quality, q3, q4)

    # --- registers -------------------------------------------------------------------------
    digits = np.array([i.meter.register_digits for i in infos], dtype=np.int64)
    wrap_l = (10**digits) * 1000
    cum = np.zeros((n_m, grid.n + 1), dtype=np.float64)
    np.cumsum(registered_l, axis=1, out=cum[:, 1:])
    registered_m3 = registered_l.sum(axis=1) / 1000.0
    del registered_l  # the big arrays are reused in place below: 3,000 × 30 days stays < 1 GB
    reg_rng = streams["registers"]
    start_l = reg_rng.uniform(0.0, 1.0, n_m) * np.minimum(
        params.register_start_max_m3 * 1000.0, wrap_l * 0.5
    )
    j_roll = min(grid.n, max(1, int(round(params.rollover_at * grid.n))))
    for mid in params.rollover_meters:
        if mid not in index:
            raise ValueError(f"rollover meter {mid!r} is not a customer meter")
        m = index[mid]
        start_l[m] = wrap_l[m] - cum[m, j_roll] + reg_rng.uniform(0.0, 0.999)
    cum += start_l[:, None]
    unwrapped = np.floor(cum, out=cum)
    exchange_rows = _apply_exchanges(infos, grid, unwrapped)
    rollovers = _rollovers(infos, grid, unwrapped, wrap_l, exchange_rows)
    billed_l = unwrapped[:, -1] - unwrapped[:, 0]
    for ex in exchange_rows:
        billed_l[ex["row"]] = ex["consumption_l"]
    # Whole litres below the wrap, then m³ (integer-valued floats divide exactly like ints).
    register_m3 = np.mod(unwrapped, wrap_l[:, None].astype(np.float64), out=unwrapped)
    register_m3 /= 1000.0
    del unwrapped, cum

    # --- reads frame, communication faults ---------------------------------------------------
    n_reads = grid.n + 1
    read_ts_us = ((grid.t0 + np.arange(n_reads) * interval_s) * 1e6).astype(np.int64)
    keep = np.ones((n_m, n_reads), dtype=bool)
    if install_mask is not None:
        keep &= _read_installed(infos, grid)
    late_rows: list[tuple[str, int, int]] = []
    for f in faults:
        if f.code != "COMMS_LOSS":
            continue
        m = index[f.subject]
        mask = grid.read_mask(f.start, f.end) & keep[m]
        if f.param("delivery") == "late":
            end_s = grid.end if f.end is None else min(f.end.timestamp(), grid.end)
            deliver = int((end_s + float(f.param("late_delay_s"))) * 1e6)
            late_rows.extend((f.subject, int(t), deliver) for t in read_ts_us[mask])
        else:
            keep[m] &= ~mask
    ids = pl.Series("meter_id", [i.meter_id for i in infos], dtype=pl.String)
    reads = pl.select(
        meter_id=pl.lit(ids).gather(
            pl.lit(np.repeat(np.arange(n_m, dtype=np.uint32), n_reads), dtype=pl.UInt32)
        ),
        ts=pl.lit(np.tile(read_ts_us, n_m)).cast(UTC_US),
        register=pl.lit(register_m3.ravel()),
        quality=pl.lit(quality.ravel()),
    )
    del register_m3
    if not keep.all():
        reads = reads.filter(pl.lit(keep.ravel()))
    reads = reads.cast(METER_READS)  # type: ignore[arg-type]
    late = pl.DataFrame(
        late_rows,
        schema={"meter_id": pl.String, "ts": pl.Int64, "deliver_at": pl.Int64},
        orient="row",
    ).with_columns(pl.col("ts").cast(UTC_US), pl.col("deliver_at").cast(UTC_US))

    # --- DMAs --------------------------------------------------------------------------------
    dma_result = _simulate_dmas(
        registry, dmas, clocks, grid, params, streams["pressure"], faults, true_l, meter_dma, infos
    )

    # --- truth -------------------------------------------------------------------------------
    true_m3 = true_l.sum(axis=1) / 1000.0
    billed_m3 = billed_l / 1000.0
    del true_l
    dma_truth: dict[str, Any] = {}
    for d_i, dma in enumerate(dmas):
        sel = meter_dma == d_i
        dma_truth[dma.id] = _dma_balance(
            dma_result[dma.id],
            meters=int(sel.sum()),
            non_households=int((sel & non_household).sum()),
            true_m3=float(true_m3[sel].sum()),
            registered_m3=float(registered_m3[sel].sum()),
            billed_m3=float(billed_m3[sel].sum()),
        )
    fault_entries = []
    for f, eff in zip(faults, effects, strict=True):
        entry = f.to_json()
        if f.code == "DMA_LEAK":
            entry["effect"] = dma_result[f.subject]["leak_effects"][id(f)]
        else:
            entry["effect"] = {k: round(v, 6) for k, v in eff.items()}
        fault_entries.append(entry)
    for truth in dma_truth.values():
        truth.pop("leak_effects", None)

    end = start + timedelta(days=days)
    manifest: dict[str, Any] = {
        "seed": seed,
        "window": {"start": _iso(start), "end": _iso(end), "days": days},
        "interval_s": interval_s,
        "interval_label": {"meter_intervals": "end", "dma_flow": "start"},
        "meters": {
            "count": n_m,
            "non_households": int(non_household.sum()),
            "reads_expected": int(keep.sum()),
            "reads_lost": int((~keep).sum()) - _not_installed_reads(install_mask, infos, grid),
            "reads_late": len(late_rows),
        },
        "faults": fault_entries,
        "rollovers": rollovers,
        "exchanges": [{k: v for k, v in ex.items() if k != "row"} for ex in exchange_rows],
        "dmas": dma_truth,
        "model": {
            "demand": params.demand.to_json(),
            "leakage_ili": params.leakage_ili,
            "pressure_swing_m": params.pressure_swing_m,
            "favad_n1": 1.0,
        },
    }

    meters_frame = _meters_frame(infos)
    exchanges = pl.DataFrame(
        [
            (ex["meter"], datetime.fromisoformat(ex["at"].replace("Z", "+00:00")))
            + (ex["old_register_final"], ex["new_register_start"])
            for ex in exchange_rows
        ],
        schema=list(METER_EXCHANGES),
        orient="row",
    ).cast(METER_EXCHANGES)  # type: ignore[arg-type]
    return FleetData(
        reads=reads,
        dma_flow=dma_result_frame(dma_result, "flow", DMA_FLOW, read_ts_us[:-1]),
        dma_pressure=dma_result_frame(dma_result, "pressure", DMA_PRESSURE, read_ts_us[:-1]),
        meters=meters_frame,
        dmas=dmas_frame(registry),
        exchanges=exchanges,
        late=late,
        inlet_values=_inlet_frame(dma_result, read_ts_us[:-1]),
        manifest=manifest,
        interval_s=interval_s,
        start=start,
        end=end,
    )


def _install_ts(meter: Meter) -> float | None:
    if meter.install_date is None:
        return None
    return datetime.combine(meter.install_date, datetime.min.time(), UTC).timestamp()


def _installed(infos: Sequence[_MeterInfo], grid: Grid) -> np.ndarray | None:
    """1.0 for intervals after each meter's install date, None when all are installed before."""
    inst = [_install_ts(i.meter) for i in infos]
    if all(t is None or t <= grid.t0 for t in inst):
        return None
    lo = grid.t0 + np.arange(grid.n) * grid.step
    mask = np.ones((len(infos), grid.n), dtype=np.float64)
    for m, t in enumerate(inst):
        if t is not None and t > grid.t0:
            mask[m] = lo >= t
    return mask


def _read_installed(infos: Sequence[_MeterInfo], grid: Grid) -> np.ndarray:
    ts = grid.t0 + np.arange(grid.n + 1) * grid.step
    mask = np.ones((len(infos), grid.n + 1), dtype=bool)
    for m, info in enumerate(infos):
        t = _install_ts(info.meter)
        if t is not None and t > grid.t0:
            mask[m] = ts >= t
    return mask


def _not_installed_reads(
    install_mask: np.ndarray | None, infos: Sequence[_MeterInfo], grid: Grid
) -> int:
    if install_mask is None:
        return 0
    return int((~_read_installed(infos, grid)).sum())


def _apply_exchanges(
    infos: Sequence[_MeterInfo], grid: Grid, unwrapped: np.ndarray
) -> list[dict[str, Any]]:
    """Meter exchanges of the registry that fall inside the window: the old register reads
    ``old_register_final`` at the exchange and the new one counts on from ``new_register_start``,
    so VEE sees exactly the jump the registry documents. Changes ``unwrapped`` in place."""
    rows: list[dict[str, Any]] = []
    ts = grid.t0 + np.arange(grid.n + 1) * grid.step
    for m, info in enumerate(infos):
        for ex in info.meter.exchanges:
            at = datetime.fromisoformat(ex.at.replace("Z", "+00:00"))
            if at.tzinfo is None:
                at = at.replace(tzinfo=UTC)
            j = int(np.searchsorted(ts, at.timestamp(), side="left"))
            if j <= 0 or j > grid.n:
                continue
            row = unwrapped[m]
            consumption = float(row[-1] - row[0])
            old_final = round(ex.old_register_final * 1000.0)
            new_start = round(ex.new_register_start * 1000.0)
            at_value = row[j]
            row[:j] = old_final - (at_value - row[:j])
            row[j:] = new_start + (row[j:] - at_value)
            rows.append(
                {
                    "row": m,
                    "meter": info.meter_id,
                    "at": _iso(float(ts[j])),
                    "old_register_final": old_final / 1000.0,
                    "new_register_start": new_start / 1000.0,
                    "consumption_l": consumption,
                }
            )
    return rows


def _rollovers(
    infos: Sequence[_MeterInfo],
    grid: Grid,
    unwrapped: np.ndarray,
    wrap_l: np.ndarray,
    exchange_rows: Sequence[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Reads where the register wrapped (forward past 10^digits, or backward below zero under
    reverse flow), so VEE tests know which decreases are legitimate."""
    wrap = wrap_l.astype(np.float64)
    # Only rows that leave [0, wrap) somewhere can wrap; the rest need no per-read work.
    lo = np.floor_divide(unwrapped.min(axis=1), wrap)
    hi = np.floor_divide(unwrapped.max(axis=1), wrap)
    skip = {ex["row"] for ex in exchange_rows}
    out = []
    for m in np.flatnonzero(lo != hi).tolist():
        if m in skip:
            continue
        turns = np.floor_divide(unwrapped[m], wrap[m])
        for j in np.flatnonzero(turns[1:] != turns[:-1]) + 1:
            out.append(
                {
                    "meter": infos[m].meter_id,
                    "ts": _iso(float(grid.t0 + j * grid.step)),
                    "direction": "forward" if turns[j] > turns[j - 1] else "backward",
                }
            )
    return out


def _uarl_l_day(dma: Dma, connections: int, pressure_m: float) -> float:
    """UARL (litres/day) = (18·Lm + 0.8·Nc + 25·Lp)·P (Lambert et al., IWA 1999)."""
    nc = dma.service_connections or connections
    return (18.0 * dma.mains_km + 0.8 * nc + 25.0 * dma.private_pipe_km) * pressure_m


def _simulate_dmas(
    registry: Registry,
    dmas: Sequence[Dma],
    clocks: Sequence[LocalClock],
    grid: Grid,
    params: FleetParams,
    rng: np.random.Generator,
    faults: Sequence[Fault],
    true_l: np.ndarray,
    meter_dma: np.ndarray,
    infos: Sequence[_MeterInfo],
) -> dict[str, dict[str, Any]]:
    """Net inflow and AZP pressure of each DMA, in canonical units and in each instrument's
    own unit (quantised to its resolution): the canonical series are the converted instrument
    values, exactly what ingest will store."""
    step_h = grid.step / 3600.0
    n_d = len(dmas)
    # Σ customer use per DMA and interval: one sparse-free matmul over the (meters, T) matrix.
    onehot = np.zeros((n_d + 1, len(meter_dma)), dtype=np.float64)
    onehot[meter_dma, np.arange(len(meter_dma))] = 1.0
    cust_m3 = (onehot @ true_l)[:n_d] / 1000.0
    devices = registry.all_devices()
    out: dict[str, dict[str, Any]] = {}
    for d_i, dma in enumerate(dmas):
        clk = clocks[d_i]
        hh = expected_interval_m3(params.demand, "household", clk, grid.step)
        nh = expected_interval_m3(params.demand, "non_household", clk, grid.step)
        unmetered_m3 = dma.unmetered_households * hh + dma.unmetered_non_households * nh
        # Head loss grows with the square of demand; the household profile sets its timing.
        w = profile_weights(params.demand, "household", clk)
        shape = (w / w.max()) ** 2
        avg_p = dma.avg_pressure_m if dma.avg_pressure_m is not None else params.default_pressure_m
        p_night = avg_p + params.pressure_swing_m * float(shape.mean())
        pressure = p_night - params.pressure_swing_m * shape
        pressure = pressure + rng.normal(0.0, params.pressure_noise_m, grid.n)
        ratio = pressure / p_night
        n_conn = int((meter_dma == d_i).sum()) + dma.unmetered_households
        n_conn += dma.unmetered_non_households
        uarl = _uarl_l_day(dma, n_conn, float(pressure.mean()))
        if dma.id in params.background_leak_m3h:
            bg_night = float(params.background_leak_m3h[dma.id])
        else:
            carl_m3_day = params.leakage_ili * uarl / 1000.0
            bg_night = carl_m3_day / (24.0 * float(ratio.mean()))
        background = bg_night * ratio
        leak_flow = np.zeros(grid.n)
        leak_effects: dict[int, dict[str, Any]] = {}
        leaks: list[dict[str, Any]] = []
        for f in faults:
            if f.code == "DMA_LEAK" and f.subject == dma.id:
                q = dma_leak_flow(f, grid, ratio)
                leak_flow += q
                active = q > 0
                effect = {
                    "volume_m3": float(q.sum() * step_h),
                    "mean_rate_m3h": float(q[active].mean()) if active.any() else 0.0,
                    "night_rate_m3h": float(f.param("rate_m3h")),
                }
                leak_effects[id(f)] = effect
                leaks.append(
                    {"onset": _iso(f.start), "end": None if f.end is None else _iso(f.end)} | effect
                )
        flow = (cust_m3[d_i] + unmetered_m3) / step_h + background + leak_flow
        flow_rep, pres_rep, instruments = _instruments(
            registry, devices, dma, flow, pressure, params
        )
        out[dma.id] = {
            "siv_m3": float(flow_rep.sum() * step_h),
            "leaks": leaks,
            "flow": flow_rep,
            "pressure": pres_rep,
            "instruments": instruments,
            "customer_m3": float(cust_m3[d_i].sum()),
            "unmetered_m3": float(unmetered_m3.sum()),
            "background_m3": float(background.sum() * step_h),
            "leak_m3": float(leak_flow.sum() * step_h),
            "background_night_m3h": bg_night,
            "pressure_night_m": p_night,
            "pressure_mean_m": float(pressure.mean()),
            "ndf_hours": 24.0 * float(ratio.mean()),
            "uarl_l_day": uarl,
            "connections": n_conn,
            "days": grid.n * grid.step / 86400.0,
            "leak_effects": leak_effects,
        }
    return out


def _instruments(
    registry: Registry,
    devices: Sequence[Device],
    dma: Dma,
    flow_m3h: np.ndarray,
    pressure_m: np.ndarray,
    params: FleetParams,
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str, str, np.ndarray]]]:
    """Split the inflow over the DMA's inlet meters and report pressure on every AZP channel,
    each in its channel's unit at its resolution. Returns the canonical series as ingest would
    store them (Σ inlets; mean of pressure channels) and (device, channel, unit, values)."""
    inlets: list[tuple[Device, Channel]] = []
    gauges: list[tuple[Device, Channel]] = []
    for dev in devices:
        if dev.dma != dma.id or dev.meter is not None:
            continue
        for ch in registry.channels_of(dev):
            if ch.role == "inlet":
                inlets.append((dev, ch))
            elif ch.role == "pressure_azp":
                gauges.append((dev, ch))
    instruments: list[tuple[str, str, str, np.ndarray]] = []
    flow_rep = flow_m3h if not inlets else np.zeros_like(flow_m3h)
    for dev, ch in inlets:
        factor, offset = conversion("flow", ch.unit)
        own = np.round((flow_m3h / len(inlets) - offset) / factor, params.flow_decimals)
        instruments.append((dev.id, ch.name, ch.unit, own))
        flow_rep = flow_rep + (own * factor + offset)
    pres_rep = pressure_m if not gauges else np.zeros_like(pressure_m)
    for dev, ch in gauges:
        factor, offset = conversion("pressure", ch.unit)
        own = np.round((pressure_m - offset) / factor, params.pressure_decimals)
        instruments.append((dev.id, ch.name, ch.unit, own))
        pres_rep = pres_rep + (own * factor + offset) / len(gauges)
    return flow_rep, pres_rep, instruments


def _dma_balance(
    sim: dict[str, Any],
    *,
    meters: int,
    non_households: int,
    true_m3: float,
    registered_m3: float,
    billed_m3: float,
) -> dict[str, Any]:
    """The IWA water balance of one DMA over the window (all volumes m³)."""
    siv = float(sim["siv_m3"])
    unmetered = sim["unmetered_m3"]
    real = sim["background_m3"] + sim["leak_m3"]
    apparent = true_m3 - billed_m3
    nrw = siv - billed_m3
    days = sim["days"]
    carl_l_day = real * 1000.0 / days
    return {
        "meters": meters,
        "non_households": non_households,
        "connections": sim["connections"],
        "siv_m3": siv,
        "billed_metered_m3": billed_m3,
        "registered_m3": registered_m3,
        "true_customer_m3": true_m3,
        "unmetered_m3": unmetered,
        "authorised_m3": billed_m3 + unmetered,
        "real_losses_m3": real,
        "background_losses_m3": sim["background_m3"],
        "dma_leak_m3": sim["leak_m3"],
        "apparent_losses_m3": apparent,
        "water_losses_m3": siv - billed_m3 - unmetered,
        "nrw_m3": nrw,
        "nrw_fraction": nrw / siv if siv else float("nan"),
        "nrw_pct": 100.0 * nrw / siv if siv else float("nan"),
        "balance_residual_m3": siv - (true_m3 + unmetered + real),
        "background_night_m3h": sim["background_night_m3h"],
        "pressure_night_m": sim["pressure_night_m"],
        "pressure_mean_m": sim["pressure_mean_m"],
        "ndf_hours": sim["ndf_hours"],
        "uarl_l_day": sim["uarl_l_day"],
        "carl_l_day": carl_l_day,
        "ili": carl_l_day / sim["uarl_l_day"] if sim["uarl_l_day"] else float("nan"),
        "leaks": sim["leaks"],
        "leak_effects": sim["leak_effects"],
    }


def dma_result_frame(
    result: Mapping[str, Mapping[str, Any]],
    key: str,
    schema: Mapping[str, Any],
    ts_us: np.ndarray,
) -> pl.DataFrame:
    """One long frame (dma_id, ts, value) from the per-DMA series."""
    value_col = [c for c in schema if c not in ("dma_id", "ts")][0]
    frames = [
        pl.DataFrame(
            {
                "dma_id": pl.Series([dma_id] * len(ts_us), dtype=pl.String),
                "ts": pl.Series(ts_us).cast(UTC_US),
                value_col: np.asarray(sim[key], dtype=np.float64),
            }
        )
        for dma_id, sim in result.items()
    ]
    if not frames:
        return pl.DataFrame(schema=dict(schema))
    return pl.concat(frames).cast(dict(schema))  # type: ignore[arg-type]


def _inlet_frame(result: Mapping[str, Mapping[str, Any]], ts_us: np.ndarray) -> pl.DataFrame:
    frames = [
        pl.DataFrame(
            {
                "device_id": pl.Series([dev] * len(ts_us), dtype=pl.String),
                "channel": pl.Series([ch] * len(ts_us), dtype=pl.String),
                "unit": pl.Series([unit] * len(ts_us), dtype=pl.String),
                "ts": pl.Series(ts_us).cast(UTC_US),
                "value": np.asarray(values, dtype=np.float64),
            }
        )
        for sim in result.values()
        for dev, ch, unit, values in sim["instruments"]
    ]
    schema: dict[str, Any] = {
        "device_id": pl.String,
        "channel": pl.String,
        "unit": pl.String,
        "ts": UTC_US,
        "value": pl.Float64,
    }
    return pl.concat(frames) if frames else pl.DataFrame(schema=schema)


def _meters_frame(infos: Sequence[_MeterInfo]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "meter_id": [i.meter_id for i in infos],
            "dma_id": [i.device.dma for i in infos],
            "account": [i.meter.account for i in infos],
            "customer_type": [i.meter.customer_type for i in infos],
            "dn": [i.meter.dn for i in infos],
            "q3": [i.meter.q3 for i in infos],
            "q4": [i.meter.q4 for i in infos],
            "register_digits": [i.meter.register_digits for i in infos],
            "install_date": [i.meter.install_date for i in infos],
            "gateway": [i.device.gateway for i in infos],
        },
        schema=METERS,  # type: ignore[arg-type]
    )


def dmas_frame(registry: Registry) -> pl.DataFrame:
    """The registry's DMAs in the ``DMAS`` layout."""
    return pl.DataFrame(
        {
            "dma_id": [d.id for d in registry.dmas],
            "timezone": [d.timezone for d in registry.dmas],
            "mains_km": [d.mains_km for d in registry.dmas],
            "service_connections": [d.service_connections for d in registry.dmas],
            "private_pipe_km": [d.private_pipe_km for d in registry.dmas],
            "avg_pressure_m": [d.avg_pressure_m for d in registry.dmas],
            "unmetered_households": [d.unmetered_households for d in registry.dmas],
            "unmetered_non_households": [d.unmetered_non_households for d in registry.dmas],
        },
        schema=DMAS,  # type: ignore[arg-type]
    )


def write_manifest(manifest: Mapping[str, Any], path: Path | str) -> Path:
    """Write the ground truth as indented JSON (NaN written as null) for CI artefacts."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(manifest), indent=2, sort_keys=True) + "\n")
    return path


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return _json_safe(float(value))
    return value


def synthetic_registry(
    meters: int,
    *,
    dmas: int = 3,
    non_household_share: float = 0.08,
    install_date: date = date(2022, 1, 1),
) -> Registry:
    """A registry of ``meters`` customer meters spread over ``dmas`` DMAs in different time zones,
    half on a JSON vendor behind a concentrator and half on the binary-frame vendor, plus one
    inlet device per DMA: the shape of ``examples/registry.toml`` at any scale, for benchmarks
    and scale tests."""
    zones = ["Europe/London", "Asia/Shanghai", "America/New_York", "Europe/Berlin"]
    dma_list = [
        Dma(
            id=f"DMA-{i + 1:02d}",
            name=f"Zone {i + 1}",
            timezone=zones[i % len(zones)],
            mains_km=max(1.0, meters / dmas * 0.012),
            service_connections=0,
            private_pipe_km=meters / dmas * 0.0012,
            avg_pressure_m=40.0 + 3.0 * (i % 3),
            unmetered_households=max(1, meters // dmas // 100),
        )
        for i in range(dmas)
    ]
    register = Channel(
        name="register", quantity="volume", unit="m3", kind="register", role="customer"
    )
    vendors = [
        Vendor(id="aqualink", name="JSON NB-IoT", payload="json", channel=[register]),
        Vendor(id="kamstrup-nb", name="binary NB-IoT", payload="binary-v1", channel=[register]),
        Vendor(
            id="bulk-inlet",
            name="DMA inlet",
            payload="json",
            channel=[
                Channel(name="flow", quantity="flow", unit="L/s", kind="flow", role="inlet"),
                Channel(
                    name="pressure",
                    quantity="pressure",
                    unit="bar",
                    kind="pressure",
                    role="pressure_azp",
                ),
            ],
        ),
    ]
    groups: list[MeterGroup] = []
    per_dma = [meters // dmas + (1 if i < meters % dmas else 0) for i in range(dmas)]
    start = 1
    for i, (dma, n) in enumerate(zip(dma_list, per_dma, strict=True)):
        n_nh = int(round(n * non_household_share))
        n_json = (n - n_nh) // 2
        n_bin = n - n_nh - n_json
        for vendor, count, ctype in (
            ("aqualink", n_json, "household"),
            ("kamstrup-nb", n_bin, "household"),
            ("aqualink", n_nh, "non_household"),
        ):
            if count <= 0:
                continue
            groups.append(
                MeterGroup(
                    vendor=vendor,
                    dma=dma.id,
                    count=count,
                    start=start,
                    id_format="SM{:07d}",
                    account_format="ACC{:07d}",
                    gateway=f"GW-{i + 1:02d}" if vendor == "aqualink" else None,
                    serial_start=80_000_000 if vendor == "kamstrup-nb" else None,
                    customer_type=ctype,  # type: ignore[arg-type]
                    q3=2.5 if ctype == "household" else 6.3,
                    dn=15 if ctype == "household" else 25,
                    install_date=install_date,
                )
            )
            start += count
    inlets = [Device(id=f"INLET-{d.id}", vendor="bulk-inlet", dma=d.id) for d in dma_list]
    return Registry(dma=dma_list, vendor=vendors, device=inlets, meter_group=groups)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m simulators.fleet --meters 3000 --days 30``: time a simulation and optionally
    write its manifest."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--meters", type=int, default=3000)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--dmas", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--start", default="2026-01-05T00:00:00+00:00")
    ap.add_argument("--manifest", type=Path, default=None)
    args = ap.parse_args(argv)
    from simulators.faults import random_faults

    registry = synthetic_registry(args.meters, dmas=args.dmas)
    start = datetime.fromisoformat(args.start)
    ids = [meter_id_of(d) for d, _ in customer_meters(registry)]
    faults = random_faults(ids, [d.id for d in registry.dmas], start, args.days, args.seed)
    t = time.perf_counter()
    fleet = simulate_fleet(registry, start, args.days, seed=args.seed, faults=faults)
    elapsed = time.perf_counter() - t
    print(
        f"{args.meters} meters x {args.days} days: {fleet.reads.height:,} reads, "
        f"{fleet.dma_flow.height:,} DMA flow rows in {elapsed:.2f} s "
        f"({fleet.reads.height / elapsed:,.0f} reads/s)"
    )
    for dma_id, truth in fleet.manifest["dmas"].items():
        print(
            f"  {dma_id}: SIV {truth['siv_m3']:.1f} m³, billed {truth['billed_metered_m3']:.1f}, "
            f"real losses {truth['real_losses_m3']:.1f}, NRW {truth['nrw_pct']:.1f} %"
        )
    if args.manifest:
        write_manifest(fleet.manifest, args.manifest)


if __name__ == "__main__":
    main()
