"""A year of one DMA's minimum night flow with known leaks, and a score for a leak detector.

Harder than a flat series plus a step: the night flow has a slow seasonal swing, weekend and
holiday nights with their own (higher, noisier) night use, night use that varies from night to
night, logger noise proportional to the flow, the odd exceptional night (a pool filled, a hydrant
flushed), missing nights and runs of them, and about 20 leak onsets of 3–30 % of the DMA's base
MNF, abrupt (a step) or slowly growing (a ramp over days to weeks), several running at once, some
repaired (the flow steps back down by the leak's size). Pure numpy, seeded: the same seed gives
the same year.

``score_events`` matches detected events (the frame of ``dma.leak_events.leak_events``) to the
injected onsets and counts recall within the delay targets, false alarms, delays and size errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, timedelta

import numpy as np
import polars as pl


@dataclass(frozen=True)
class DmaYearParams:
    """Shape of the simulated year (relative quantities are fractions of the base MNF).

    nights: length of the series. leaks: onsets injected. size_rel: leak size range.
    ramp_share: share of slowly growing leaks; ramp_nights: their growth time range.
    repair_share: share repaired; repair_after: nights from onset to repair (range).
    night_use_rel: σ of night-to-night variation of night use; logger_rel: σ of logger noise.
    weekend_rel: extra night use on weekend and holiday nights (range of the DMA's mean), with
    its own night-to-night σ ``weekend_sigma_rel``. seasonal_rel: amplitude of the yearly swing.
    half_year_rel: amplitude of a half-year harmonic on top (a season that is not one sine
    wave; its phase follows the yearly one, so the rest of the year draws the same).
    outlier_prob, outlier_rel: exceptional nights and their size range.
    missing_prob: single missing nights; gap_prob, gap_nights: runs of missing nights.
    holidays: number of weekday holidays (one of them a 3-day block).
    first_onset: the first leak's onset night (a cold start); min_gap: nights between an onset
    and the end of the previous leak's growth (two onsets closer than that are one rise in any
    night-flow series); a repair is never planned within ``min_gap`` nights of an onset (a
    repair and a new leak the same night cancel in the night flow), and with
    ``repair_clear_of_growth`` not while a ramp grows nor within ``min_gap`` nights after it
    either: such a repair is put off to the first night clear of them (a leak that grows while
    another is repaired shows in the night flow as a smaller ramp, its size not readable from
    the nights). ``False`` keeps the earlier years, where such repairs were planned.
    """

    nights: int = 365
    start: date = date(2025, 1, 1)
    base_mnf_m3h: tuple[float, float] = (15.0, 80.0)
    leaks: int = 20
    size_rel: tuple[float, float] = (0.03, 0.30)
    ramp_share: float = 0.35
    ramp_nights: tuple[int, int] = (4, 14)
    repair_share: float = 0.4
    repair_after: tuple[int, int] = (20, 90)
    night_use_rel: float = 0.007
    logger_rel: float = 0.003
    weekend_rel: tuple[float, float] = (0.02, 0.08)
    weekend_sigma_rel: float = 0.01
    seasonal_rel: float = 0.04
    half_year_rel: float = 0.0
    outlier_prob: float = 0.02
    outlier_rel: tuple[float, float] = (0.03, 0.15)
    missing_prob: float = 0.03
    gap_prob: float = 0.01
    gap_nights: tuple[int, int] = (2, 5)
    holidays: int = 10
    first_onset: int = 5
    min_gap: int = 5
    repair_clear_of_growth: bool = True


@dataclass(frozen=True)
class LeakTruth:
    """One injected leak: onset night index, kind, final size (m³/h), growth nights, repair."""

    onset: int
    kind: str
    size_m3h: float
    growth_nights: int
    repair: int | None


@dataclass(frozen=True)
class DmaYear:
    """The simulated series (``dma_id, night_date, nnf_m3h``) and what was injected."""

    series: pl.DataFrame
    leaks: list[LeakTruth]
    holidays: tuple[date, ...]
    base_mnf_m3h: float
    nights: list[date] = field(default_factory=list)


def _onsets(rng: np.random.Generator, p: DmaYearParams) -> list[tuple[int, bool, int]]:
    """Onset nights (the first at ``first_onset``: a cold start), kind and growth nights, each
    onset at least ``min_gap`` nights after the previous one has finished growing."""
    while True:
        kinds = [bool(r < p.ramp_share) for r in rng.random(p.leaks).tolist()]
        growth = [
            int(rng.integers(p.ramp_nights[0], p.ramp_nights[1] + 1)) if r else 0 for r in kinds
        ]
        slack = p.nights - 10 - p.first_onset - sum(g + p.min_gap for g in growth[:-1])
        if slack > 0:
            break
    cuts = np.sort(rng.integers(0, slack, size=p.leaks - 1))
    gaps = np.diff(np.concatenate([[0], cuts]))
    out = [(p.first_onset, bool(kinds[0]), growth[0])]
    for j in range(1, p.leaks):
        prev_on, _, prev_g = out[-1]
        out.append((prev_on + prev_g + p.min_gap + int(gaps[j - 1]), bool(kinds[j]), growth[j]))
    return out


def _clear_of_growth(night: int, plan: list[tuple[int, bool, int]], gap: int) -> int:
    """The first night from ``night`` on that is not within ``gap`` nights of an onset or of a
    leak's growth (draws nothing from the generator, so the rest of the year is unchanged)."""
    for _ in range(len(plan) + 1):
        hit = [o + g + gap for o, _, g in plan if o - gap <= night <= o + g + gap]
        if not hit:
            break
        night = max(hit) + 1
    return night


def simulate_dma_year(
    seed: int, params: DmaYearParams | None = None, dma_id: str = "SIM"
) -> DmaYear:
    """One seeded DMA-year of nightly MNF (column ``nnf_m3h`` so the detector reads it as is).

    Why MNF and not NNF: the detector must cope with night use that varies, by weekday and
    holiday, which NNF would partly have removed; it is the harder series.
    """
    p = params or DmaYearParams()
    rng = np.random.default_rng(seed)
    n = p.nights
    nights = [p.start + timedelta(days=i) for i in range(n)]
    base = float(rng.uniform(*p.base_mnf_m3h))
    weekdays = [i for i, d in enumerate(nights) if d.weekday() < 5]
    hol_idx = set(int(i) for i in rng.choice(weekdays, size=max(p.holidays - 2, 0), replace=False))
    block = int(rng.integers(0, n - 3))
    hol_idx.update(range(block, block + 3))
    holidays = tuple(sorted(nights[i] for i in hol_idx))
    weekend = np.array([d.weekday() >= 5 or i in hol_idx for i, d in enumerate(nights)])
    t = np.arange(n, dtype=np.float64)
    phase = rng.uniform(0, 2 * np.pi)
    level = base * (1.0 + p.seasonal_rel * np.sin(2 * np.pi * t / 365.0 + phase))
    if p.half_year_rel:
        level = level + base * p.half_year_rel * np.sin(4 * np.pi * t / 365.0 + 2 * phase + 1.0)
    use = rng.normal(0.0, p.night_use_rel * base, n)
    we_mean = rng.uniform(*p.weekend_rel) * base
    use[weekend] = we_mean + rng.normal(0.0, p.weekend_sigma_rel * base, int(weekend.sum()))
    leaks: list[LeakTruth] = []
    leak_flow = np.zeros(n)
    plan = _onsets(rng, p)
    for on, ramp, growth in plan:
        size = float(rng.uniform(*p.size_rel)) * base
        repair: int | None = None
        if rng.random() < p.repair_share:
            r = on + growth + int(rng.integers(p.repair_after[0], p.repair_after[1] + 1))
            if p.repair_clear_of_growth:
                r = _clear_of_growth(r, plan, p.min_gap)
                repair = r if r < n else None
            else:
                clash = any(abs(r - o) <= p.min_gap for o, _, _ in plan)
                repair = r if r < n and not clash else None
        shape = np.zeros(n)
        if ramp:
            shape[on:] = [min((k + 1) / growth, 1.0) for k in range(n - on)]
        else:
            shape[on:] = 1.0
        if repair is not None:
            shape[repair:] = 0.0
        leak_flow += size * shape
        leaks.append(LeakTruth(on, "ramp" if ramp else "step", size, growth, repair))
    outliers = rng.random(n) < p.outlier_prob
    use[outliers] += rng.uniform(*p.outlier_rel, int(outliers.sum())) * base
    flow = level + use + leak_flow
    flow = flow * (1.0 + rng.normal(0.0, p.logger_rel, n))
    missing = rng.random(n) < p.missing_prob
    for g in np.flatnonzero(rng.random(n) < p.gap_prob).tolist():
        missing[g : g + int(rng.integers(p.gap_nights[0], p.gap_nights[1] + 1))] = True
    values = [None if m else float(v) for v, m in zip(flow.tolist(), missing.tolist(), strict=True)]
    series = pl.DataFrame(
        {"dma_id": [dma_id] * n, "night_date": nights, "nnf_m3h": values},
        schema={"dma_id": pl.String, "night_date": pl.Date, "nnf_m3h": pl.Float64},
    )
    return DmaYear(series, leaks, holidays, base, nights)


@dataclass(frozen=True)
class LeakScore:
    """Outcome of one (or several pooled) DMA-years.

    onsets: injected; detected: matched to an event at all; in_time: matched and alarmed within
    the delay target (abrupt 2 nights, ramps 7) counted in nights *with data* after the onset (no
    detector can alarm on a night the logger did not deliver); false_alarms: events in no leak's
    matching window (an alarm without a leak); duplicates: events in the window of a leak another
    event already matched (a second alert for a real leak, e.g. a ramp split in two); delays:
    (kind, alarm night − onset night in calendar nights) per matched onset; data_delays: the same
    in nights with data; size_errors: (kind, |est − true| / true) per matched onset, the estimate
    as reported at the end of the series; matched: (kind, true size / base MNF, delay in nights
    with data, size error) per matched onset; truth: (kind, size / base MNF) per onset.
    """

    onsets: int
    detected: int
    in_time: int
    false_alarms: int
    duplicates: int
    events: int
    delays: list[tuple[str, int]]
    data_delays: list[tuple[str, int]]
    size_errors: list[tuple[str, float]]
    matched: list[tuple[str, float, int, float]] = field(default_factory=list)
    truth: list[tuple[str, float]] = field(default_factory=list)


def score_events(
    events: pl.DataFrame,
    year: DmaYear,
    step_delay: int = 2,
    ramp_delay: int = 7,
    onset_tolerance: int = 3,
    prefer_in_time: bool = True,
) -> LeakScore:
    """Match events to injected onsets, one to one: pairs alarmed within the delay target
    first (``prefer_in_time``), then nearest onset first.

    Why in-time pairs first: when one leak raised two events (a ramp alarmed early and again
    later), the operator was alerted by the first; matching the later one only because its onset
    estimate is nearer would call a leak late that was alarmed in time (the other event still
    counts, as a duplicate, against precision). ``prefer_in_time=False`` is the earlier rule
    (nearest onset only).

    An event matches a step whose onset is within ``onset_tolerance`` nights of its onset
    estimate, or a ramp whose onset lies between ``onset_tolerance`` + 7 nights before the
    estimate and the end of its growth; it must have alarmed no earlier than
    ``onset_tolerance`` nights before the true onset.
    """
    start = year.nights[0]
    ev = [
        (
            (r["onset_night"] - start).days,
            (r["alarm_night"] - start).days,
            float(r["size_m3h"]),
        )
        for r in events.iter_rows(named=True)
    ]
    observed = np.cumsum(year.series["nnf_m3h"].is_not_null().to_numpy())

    def data_delay(leak: LeakTruth, alarm_night: int) -> int:
        """Nights with data from the onset to the alarm (0: alarmed on the onset night)."""
        alarm = min(max(alarm_night, 0), len(observed) - 1)
        before = observed[leak.onset - 1] if leak.onset > 0 else 0
        seen = int(observed[alarm] - before) - 1
        return max(seen, 0) if alarm >= leak.onset else alarm_night - leak.onset

    def limit(leak: LeakTruth) -> int:
        return ramp_delay if leak.kind == "ramp" else step_delay

    pairs: list[tuple[int, int, int, int]] = []
    in_window: set[int] = set()
    for li, leak in enumerate(year.leaks):
        for ei, (on, alarm, _) in enumerate(ev):
            if alarm < leak.onset - onset_tolerance:
                continue
            lo = leak.onset - onset_tolerance - (7 if leak.kind == "ramp" else 0)
            hi = leak.onset + onset_tolerance + leak.growth_nights
            if lo <= on <= hi:
                late = int(prefer_in_time and data_delay(leak, alarm) > limit(leak))
                pairs.append((late, abs(on - leak.onset), li, ei))
                in_window.add(ei)
    used_l: set[int] = set()
    used_e: set[int] = set()
    delays: list[tuple[str, int]] = []
    errors: list[tuple[str, float]] = []
    data_delays: list[tuple[str, int]] = []
    in_time = 0
    matched: list[tuple[str, float, int, float]] = []
    for _, _, li, ei in sorted(pairs):
        if li in used_l or ei in used_e:
            continue
        used_l.add(li)
        used_e.add(ei)
        leak = year.leaks[li]
        delays.append((leak.kind, ev[ei][1] - leak.onset))
        data_delays.append((leak.kind, data_delay(leak, ev[ei][1])))
        errors.append((leak.kind, abs(ev[ei][2] - leak.size_m3h) / leak.size_m3h))
        rel = leak.size_m3h / year.base_mnf_m3h
        matched.append((leak.kind, rel, data_delays[-1][1], errors[-1][1]))
        if data_delays[-1][1] <= limit(leak):
            in_time += 1
    return LeakScore(
        onsets=len(year.leaks),
        detected=len(used_l),
        in_time=in_time,
        false_alarms=len(set(range(len(ev))) - used_e - in_window),
        duplicates=len(in_window - used_e),
        events=len(ev),
        delays=delays,
        data_delays=data_delays,
        size_errors=errors,
        matched=matched,
        truth=[(leak.kind, leak.size_m3h / year.base_mnf_m3h) for leak in year.leaks],
    )
