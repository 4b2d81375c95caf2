"""Leak *events* from a DMA's nightly flow series: each rise is its own event, and events stack.

The input is one value per night (MNF or net night flow, m³/h). Each rise of the level — a step
(a burst, abrupt) or a ramp (a leak that grows over days) — becomes an event with an onset night
estimate, a size in m³/h, a confidence and a status ``open`` → ``confirmed`` → ``closed`` (the
level stepped back down by about the event's size: a repair).

Method: Page's cumulative sum (E. S. Page, "Continuous inspection schemes", Biometrika 41, 1954)
run as a *re-armed* scheme — after each detected change the level is re-estimated from the nights
since the change point and both sums restart, so a second leak while the first is still running
is judged against the level that already includes the first (see also D. M. Hawkins & D. H.
Olwell, "Cumulative Sum Charts and Charting for Quality Improvement", 1998, ch. 6 on re-starting
after a signal). Per night:

- **Noise scale** σ from the data: 1.4826 × MAD of night-to-night differences / √2, weekday and
  weekend nights apart (a weekend or holiday night is compared with the previous such night).
  Differences do not see the level, so a step or a slow drift barely moves them, and the MAD
  ignores the odd filling-pool night. **Cold start**: σ² is shrunk towards a prior
  (``prior_sigma_rel`` of the level, ``prior_weight`` pseudo-differences), and the decision
  interval is widened by ``1 + cold_h / n`` for n differences seen, so detection runs from
  ``min_nights`` nights on with wide thresholds that tighten as history grows.
- **Local level**: the median of the last ``window_nights`` in-control nights of the current
  segment (weekend and holiday nights minus their own median offset from it). The offset learns
  only from weekend nights that turned out in control: one inside a run that alarmed was measured
  against the level before a change, and with some 20 changes a year those residuals biased the
  offset by the leak, so weekend nights raised false rises and drops and wrongly dated onsets
  (after ``we_hold_max`` such nights in a row it learns from them anyway, so an offset that is
  wrong cannot keep itself out of control). Nights of a CUSUM
  run that has not (yet) died out do not join the level, so a ramp cannot hide in its own
  reference. The slack grows by the standard error of that median (1.2533 σ/√n).
- **Two upward CUSUMs** on the standardised residual: a fast one (small ``fast_h``: a large step
  alarms within one or two nights) and a slow one (small slack, larger interval: small steps and
  ramps), each night's increment capped so no single night alarms alone. Downward CUSUMs with the
  same settings detect drops. The onset is the maximum-likelihood change point inside the run
  that alarmed (argmin of the partial sums of z − δ/2 for the shift δ seen at its end): the run
  start, unless the run crept up before the step.
- **Ramps**: an upward run that starts within ``ramp_next_nights`` of the last alarm of the open
  event whose segment is current, or within ``ramp_join_nights`` when one straight line explains
  the nights since that event's onset better than two levels (Bayesian information criterion),
  is the same leak still growing, not a new one: the event becomes a ``ramp`` and its size is the
  level it reached (median of the latest ``window_nights`` in-control nights).
- **Size** of a step while the walk runs: median of the event's segment (at most ``size_nights``
  nights) minus the level before the onset (median of up to ``size_nights`` nights before it), in
  m³/h. Once the walk is over every event is sized again by one robust regression of the whole
  series (``_refit``), after dropping the downward alarms the series does not support
  (``_prune_drops``).
  **Confidence**: erf(z/√2) with z = size / (σ √(1/n_before + 1/n_after)): the probability,
  under Gaussian noise, that the shift is not noise.
- **Repairs**: a downward alarm of size d closes the open event whose size is nearest d if they
  agree within ``repair_match_rel`` (or 3 standard errors); otherwise the drop is a change of level
  (demand, season) and closes nothing.

The recursion walks one DMA's nights in order (numpy and Python floats, O(nights × window)).
Pure: no I/O; the flow persists the frame ``leak_events`` returns.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, cast

import numpy as np
import polars as pl

from pipelines.schemas import ALERTS

ALERT_CODE = "DMA_NIGHT_FLOW_RISE"
_MAD_TO_SIGMA = 1.4826
_MEDIAN_SE = 1.2533

LEAK_EVENTS: dict[str, Any] = {
    "dma_id": pl.String,
    "event_no": pl.Int32,
    "kind": pl.String,
    "status": pl.String,
    "onset_night": pl.Date,
    "alarm_night": pl.Date,
    "confirmed_night": pl.Date,
    "end_night": pl.Date,
    "size_m3h": pl.Float64,
    "confidence": pl.Float64,
    "level_before_m3h": pl.Float64,
    "sigma_m3h": pl.Float64,
    "detector": pl.String,
}


@dataclass(frozen=True)
class LeakEventParams:
    """Settings of the re-armed CUSUM (k and h in units of σ).

    window_nights: in-control nights in the local level median.
    min_nights: nights before detection starts (cold start).
    fast_k, fast_h, fast_cap: slack, decision interval and per-night cap of the fast CUSUM.
    slow_k, slow_h, slow_cap: the same for the slow CUSUM (small steps, ramps).
    prior_sigma_rel, prior_sigma_m3h, prior_weight: σ prior (relative to the level, absolute
        floor) and its weight in pseudo-differences; shrinks the cold-start estimate.
    cold_h: the decision interval is multiplied by 1 + cold_h / (differences seen).
    confirm_nights: nights after the onset an open event must last to become ``confirmed``.
    ramp_next_nights, ramp_join_nights, ramp_margin: an upward run starting within
        ``ramp_next_nights`` of the open event's last alarm extends it (a ramp); within
        ``ramp_join_nights`` it does when one line beats two levels by the BIC (plus the margin).
    size_nights: nights before/after the onset used for the size.
    drop_chi2: a downward alarm stays a free step of the final refit only while its Wald χ²
        reaches this (0 keeps every one).
    final_sizes: once the walk is over, size each event again between its neighbouring changes.
    repair_match_rel: a drop closes the event whose size it matches within this fraction.
    we_hold_max: the weekend offset learns only from weekend nights that turned out in control,
        unless this many in a row did not (0: from every weekend night, the earlier rule).
    drop_loo_nights: a drop this close after an onset must stand without any one night between.
    refit_positive: the refit's profile takes no shape that would size its event ≤ 0.
    refit_pair_nights: events whose onsets lie this close are profiled jointly (0: never).
    refit_knot_nights: the refit's level is a polyline with knots this many nights apart,
    refit_harmonics, refit_season_min_nights, refit_season_knot_nights: or, once the series
        spans ``refit_season_min_nights``, a polyline with knots ``refit_season_knot_nights``
        apart plus ``refit_harmonics`` yearly harmonics (sine and cosine pairs; 0: none).
    holidays: dates whose nights behave like weekend nights.
    """

    window_nights: int = 14
    min_nights: int = 3
    fast_k: float = 1.25
    fast_h: float = 3.0
    fast_cap: float = 1.75
    slow_k: float = 0.75
    slow_h: float = 14.0
    slow_cap: float = 2.0
    prior_sigma_rel: float = 0.015
    prior_sigma_m3h: float = 0.05
    prior_weight: float = 3.0
    cold_h: float = 4.0
    sigma_diffs: int = 100000
    sigma_trim: float = 2.5
    confirm_nights: int = 5
    ramp_next_nights: int = 2
    ramp_join_nights: int = 5
    ramp_margin: float = 0.0
    ramp_jump_z: float = float("inf")
    split_nights: int = 5
    split_pre: int = 14
    split_chi2: float = 25.0
    merge_chi2: float = 9.0
    merge_nights: int = 30
    drop_chi2: float = 16.0
    final_sizes: bool = True
    refit: bool = True
    refit_knot_nights: float = 120.0
    refit_harmonics: int = 1
    refit_season_min_nights: float = 240.0
    refit_season_knot_nights: float = 365.0
    refit_huber: float = 1.345
    refit_rounds: int = 3
    refit_onset_back: int = 8
    refit_onset_fwd: int = 3
    refit_max_growth: int = 30
    drop_loo_nights: int = 2
    refit_positive: bool = True
    refit_pair_nights: int = 15
    we_hold_max: int = 4
    size_nights: int = 28
    repair_match_rel: float = 0.35
    holidays: tuple[date, ...] = field(default_factory=tuple)


@dataclass
class LeakEvent:
    """One detected rise (indices are positions in the DMA's night series)."""

    onset: int
    alarm: int
    level_before: float
    n_before: int
    sigma: float
    detector: str
    kind: str = "step"
    size: float = 0.0
    n_after: int = 0
    confirmed: int | None = None
    end: int | None = None
    last_alarm: int = 0
    seg_start: int = 0
    size_se: float = 0.0
    growth_nights: int = 1

    @property
    def status(self) -> str:
        """``closed`` once repaired, ``confirmed`` once it lasted, else ``open``."""
        if self.end is not None:
            return "closed"
        return "confirmed" if self.confirmed is not None else "open"

    @property
    def confidence(self) -> float:
        """erf(z/√2), z = size over its standard error (Gaussian noise assumed)."""
        if self.size_se > 0:
            se = self.size_se
        elif self.sigma <= 0 or self.n_after == 0:
            return 0.0
        else:
            se = self.sigma * math.sqrt(1.0 / max(self.n_before, 1) + 1.0 / self.n_after)
        return math.erf(max(self.size, 0.0) / se / math.sqrt(2.0))


def _mad_sigma(diffs: list[float], trim: float = 0.0) -> float:
    """σ of one night from night-to-night differences: 1.4826 × MAD / √2, then (``trim`` > 0)
    re-estimated as the standard deviation of the differences within ``trim`` MAD-σ of their
    median, corrected for the truncation — a one-step trimmed estimate (Huber, "Robust
    Statistics", 1981, §5), because leak steps and exceptional nights contaminate about one
    difference in ten and inflate the MAD by some 15 %."""
    if not diffs:
        return 0.0
    a = np.asarray(diffs)
    med = float(np.median(a))
    s = _MAD_TO_SIGMA * float(np.median(np.abs(a - med)))
    if trim > 0 and s > 0 and len(a) >= 8:
        for _ in range(2):
            kept = a[np.abs(a - med) <= trim * s]
            if len(kept) < 4:
                break
            var_factor = 1.0 - 2.0 * trim * _phi(trim) / math.erf(trim / math.sqrt(2.0))
            s = float(np.sqrt(np.mean((kept - med) ** 2) / var_factor))
    return s / math.sqrt(2.0)


def _phi(z: float) -> float:
    return math.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


@dataclass
class _Cusum:
    k: float
    h: float
    cap: float
    s: float = 0.0
    start: int = -1

    def step(self, z: float, i: int, k_extra: float, h_mult: float) -> bool:
        inc = min(z - self.k - k_extra, self.cap * h_mult)
        new = max(0.0, self.s + inc)
        if new > 0.0 and self.s == 0.0:
            self.start = i
        self.s = new
        return self.s >= self.h * h_mult

    def reset(self) -> None:
        self.s, self.start = 0.0, -1


def detect_leak_events(
    values: np.ndarray, nights: Sequence[date], params: LeakEventParams | None = None
) -> list[LeakEvent]:
    """Walk one DMA's nightly series (NaN or ±inf = no value) and return its events in onset order.

    Why a walk and not a batch fit: each decision uses only nights up to that night, so the
    alarm night is what a daily run would have reported, and a rerun over the same history
    reproduces it exactly.
    """
    p = params or LeakEventParams()
    holidays = set(p.holidays)
    weekend = [d.weekday() >= 5 or d in holidays for d in nights]
    day_no = np.asarray([d.toordinal() for d in nights], dtype=np.float64)
    x = np.asarray(values, dtype=np.float64)
    diffs: dict[bool, list[float]] = {False: [], True: []}
    last: dict[bool, tuple[float, float] | None] = {False: None, True: None}
    we_resid: list[float] = []
    pend_we: list[float] = []
    we_dropped = 0
    sig_group: dict[bool, float] = {False: 0.0, True: 0.0}  # latest σ of weekday, weekend nights
    seg: list[tuple[int, float]] = []  # in-control (index, adjusted value) of the current segment
    pending: list[tuple[int, float]] = []
    ups = [_Cusum(p.fast_k, p.fast_h, p.fast_cap), _Cusum(p.slow_k, p.slow_h, p.slow_cap)]
    downs = [_Cusum(p.fast_k, p.fast_h, p.fast_cap), _Cusum(p.slow_k, p.slow_h, p.slow_cap)]
    names = ["fast", "slow"]
    events: list[LeakEvent] = []
    drops: list[int] = []
    splits: list[tuple[LeakEvent, int, int]] = []  # ramp extensions still to be tested
    sigma = 0.0
    hist: list[tuple[int, float]] = []  # every night's value, weekend offset removed
    seen = 0
    for i in range(len(x)):
        xi = float(x[i])
        if not math.isfinite(xi):
            continue
        g = weekend[i]
        prev = last[g]
        if prev is not None and day_no[i] - prev[0] <= 7:
            diffs[g].append(xi - prev[1])
        last[g] = (day_no[i], xi)
        seen += 1
        hist.append((i, xi - (float(np.median(we_resid[-8:])) if g and we_resid else 0.0)))
        ctrl = [v for _, v in seg[-p.window_nights :]]
        level = float(np.median(ctrl)) if ctrl else None
        if g:
            if level is None:
                continue
            if len(we_resid) < 2:
                we_resid.append(xi - level)
                continue
            adj = xi - float(np.median(we_resid[-8:]))
        else:
            adj = xi
        if level is None or seen <= p.min_nights or len(ctrl) < 2:
            seg.append((i, adj))
            continue
        n_diff = len(diffs[g])
        prior = max(p.prior_sigma_m3h, p.prior_sigma_rel * abs(level))
        mad = _mad_sigma(diffs[g][-p.sigma_diffs :], p.sigma_trim)
        sigma = math.sqrt((p.prior_weight * prior**2 + n_diff * mad**2) / (p.prior_weight + n_diff))
        sigma = max(sigma, 1e-9)
        sig_group[g] = sigma
        z = (adj - level) / sigma
        k_extra = _MEDIAN_SE / math.sqrt(len(ctrl))
        h_mult = 1.0 + p.cold_h / max(n_diff, 1)
        up_hit = [c.step(z, i, k_extra, h_mult) for c in ups]
        down_hit = [c.step(-z, i, k_extra, h_mult) for c in downs]
        held = g and we_dropped < p.we_hold_max
        if g and not held:
            we_resid.append(xi - level)
            we_dropped = 0
        if any(up_hit) or any(down_hit):
            upward = any(up_hit)
            cs = ups if upward else downs
            which = (up_hit if upward else down_hit).index(True)
            start = cs[which].start
            run = [(j, v) for j, v in pending + [(i, adj)] if j >= start]
            cut = _change_point([v for _, v in run], level, sigma, upward)
            seg.extend(run[:cut])
            run = run[cut:]
            new_level = float(np.median([v for _, v in run]))
            before = [v for _, v in seg[-p.size_nights :]]
            if upward:
                joined = _on_rise(
                    events, run, seg, hist, before, level, sigma, names[which], i, p, day_no
                )
                if joined and p.split_nights > 0:
                    splits.append((events[-1], run[0][0], i))
            else:
                drops.append(run[0][0])
                _on_drop(events, level - new_level, sigma, len(before), run, i, p)
            seg = run
            pending = []
            we_dropped += len(pend_we) + int(held)
            pend_we = []
            for c in ups + downs:
                c.reset()
        elif any(c.s > 0 for c in ups + downs):
            pending.append((i, adj))
            if held:
                pend_we.append(xi - level)
        else:
            seg.extend(pending)
            seg.append((i, adj))
            pending = []
            if held:
                pend_we.append(xi - level)
            if pend_we:
                we_resid.extend(pend_we)
                we_dropped = 0
                pend_we = []
        _update_current(events, seg, pending, i, p)
        splits = _check_splits(splits, events, hist, i, sig_group, weekend, day_no, p)
    if p.final_sizes and p.refit:
        sigmas = {g: _mad_sigma(diffs[g][-p.sigma_diffs :], p.sigma_trim) for g in (False, True)}
        _refit(events, drops, x, weekend, day_no, sigmas, p)
    elif p.final_sizes:
        _final_sizes(events, hist, p)
    return events


def _refit(
    events: list[LeakEvent],
    drops: list[int],
    x: np.ndarray,
    weekend: list[bool],
    day_no: np.ndarray,
    sigmas: dict[bool, float],
    p: LeakEventParams,
) -> None:
    """Size every event again once the walk is over, all at once, by a robust joint regression.

    Why: the walk sizes an event from the nights between its onset and the next change, against a
    running median, so a leak followed soon by another, a ramp still growing when the next one
    began, or a season drifting under it all bias the size. Here the whole series is one
    least-squares model (as in segmented / intervention regression, G. E. P. Box & G. C. Tiao,
    "Intervention analysis with applications to economic and environmental problems", JASA 70,
    1975): a smooth level (a polyline; a yearly harmonic as well once the series spans eight
    months), a weekend/holiday offset, one column per event — a ramp clip((t − onset + 1)/g, 0, 1),
    g = 1 a step — and one free downward step per detected drop (a repair or a change of demand, so
    a drop attributed to the wrong event at alarm time does not bias either event). Outlying nights
    (a pool filled) are down-weighted by Huber's M-estimator (P. J. Huber, "Robust estimation of a
    location parameter", Ann. Math. Statist. 35, 1964) by iteratively reweighted least squares,
    weekday and weekend nights weighted by their own σ. Each event's onset and growth nights g are
    profiled (the column that explains most of the event's partial residual), so a ramp's size is
    the level it reached, not its first step. The event's size is its coefficient and the size's
    standard error comes from the same fit.
    """
    obs = np.flatnonzero(np.isfinite(x))
    if len(obs) < 4 or not events:
        return
    y = x[obs]
    t = day_no[obs] - day_no[obs[0]]
    we = np.asarray([weekend[i] for i in obs], dtype=np.float64)
    sig = np.where(we > 0, sigmas[True] or sigmas[False], sigmas[False] or sigmas[True])
    sig = np.maximum(sig, 1e-9)
    # The level. Night flow follows the year (garden watering, temperature), and a 120-night
    # polyline's corners misfit a seasonal swing by up to half its amplitude (h²f''/8), a misfit
    # the leaks' columns took into their sizes. From eight months of nights on it is a yearly
    # polyline plus a yearly harmonic, as many terms (the season-trend model of BFAST: J.
    # Verbesselt, R. Hyndman, G. Newnham, D. Culvenor, "Detecting trend and seasonal changes in
    # satellite image time series", Remote Sens. Environ. 114, 2010). On a shorter series a
    # yearly harmonic is barely told apart from a smooth trend: the polyline stays.
    span = float(t[-1]) if len(t) else 0.0
    if p.refit_harmonics > 0 and span >= p.refit_season_min_nights:
        trend = _level_basis(t, day_no[obs], p.refit_season_knot_nights, p.refit_harmonics)
    else:
        trend = _level_basis(t, day_no[obs], p.refit_knot_nights, 0)
    weekend_col = [we[:, None]] if we.any() and not we.all() else []
    base_cols = [trend, *weekend_col]
    shapes = [
        (e.onset, 1 if e.kind == "step" else max(1, e.last_alarm - e.onset + 1)) for e in events
    ]

    free = sorted(set(drops))

    def column(onset: int, g: int) -> np.ndarray:
        return np.clip((t - (day_no[onset] - day_no[obs[0]]) + 1.0) / g, 0.0, 1.0)

    def drop_cols(ds: list[int]) -> list[np.ndarray]:
        return [-(obs >= d).astype(np.float64)[:, None] for d in ds]

    free = _prune_drops(
        free,
        base_cols,
        drop_cols,
        [column(o, g)[:, None] for o, g in shapes],
        y,
        sig,
        p,
        obs,
        [o for o, _ in shapes],
    )
    # A repair is a drop the whole series supports: an event the walk closed at a drop pruned
    # here (a weekend swing, an exceptional night) is still running, and reads open again.
    for e in events:
        if e.end is not None and e.end not in free:
            e.end = None
    fixed = np.hstack(base_cols + drop_cols(free))
    n_fixed = fixed.shape[1]

    def fit_shapes(u0: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        d = np.hstack([fixed] + [column(o, g)[:, None] for o, g in shapes])
        b, u1 = _irls(d, y, sig, u0, p.refit_huber)
        return d, b, u1

    design, beta, u = fit_shapes(np.ones(len(y)))
    it = merges = 0
    while it < p.refit_rounds - 1:
        w = u / sig**2
        fit = design @ beta
        for k, e in enumerate(events):
            o, g = shapes[k]
            # The event's column is profiled with its neighbours' refitted beside it (not held
            # at their old coefficients), so a ramp cannot swallow the next leak just because
            # that one's coefficient was still small.
            near = [j for j in (k - 1, k + 1) if 0 <= j < len(events)]
            partial = y - fit
            for j in [k, *near]:
                partial = partial + beta[n_fixed + j] * design[:, n_fixed + j]
            # The neighbours as profiled so far this round (Gauss-Seidel): with the previous
            # event still at its old, longer shape, this one would be shaped to make up for it
            # (a step after a ramp moved back onto the ramp's tail, then merged into it).
            nb = design[:, [n_fixed + j for j in near]]
            if near:
                nb = np.column_stack([column(*shapes[j]) for j in near])
            nwn = nb.T @ (nb * w[:, None])
            nwr = nb.T @ (w * partial)
            best = (-math.inf, o, g)
            for o2 in _onset_candidates(e, x, p):
                # A ramp is taken to have stopped growing by the next event's onset: past it
                # the two cannot be told apart and the first would swallow the second.
                g_max = p.refit_max_growth
                if k + 1 < len(shapes):
                    g_max = min(g_max, max(1, int(day_no[shapes[k + 1][0]] - day_no[o2])))
                for g2 in range(1, g_max + 1):
                    c = column(o2, g2)
                    wc = w * c
                    a = np.empty((len(near) + 1, len(near) + 1))
                    a[0, 0] = float(np.sum(wc * c))
                    a[0, 1:] = a[1:, 0] = nb.T @ wc
                    a[1:, 1:] = nwn
                    rhs = np.concatenate([[float(np.sum(wc * partial))], nwr])
                    try:
                        sol = np.linalg.solve(a, rhs)
                    except np.linalg.LinAlgError:
                        continue
                    if p.refit_positive and sol[0] <= 0.0:
                        continue
                    gain = float(rhs @ sol)
                    if gain > best[0]:
                        best = (gain, o2, g2)
            shapes[k] = (best[1], best[2])
        # Columns in onset order: when an event's profiled onset moved before its predecessor's,
        # the two had swapped roles (the earlier event kept a sliver, the later one the leak),
        # and the event dated first is the one an operator reads as that leak.
        order = sorted(range(len(shapes)), key=lambda j: shapes[j][0])
        shapes[:] = [shapes[j] for j in order]
        # The merge test reads the fit of the shapes just profiled (the fit from before them
        # would add an event's new column back against its old one); the next round starts
        # from it too.
        design, beta, u = fit_shapes(u)
        w = u / sig**2
        if p.refit_pair_nights > 0 and _profile_pairs(
            events, shapes, y - design @ beta, beta, n_fixed, w, day_no, x, column, p
        ):
            design, beta, u = fit_shapes(u)
            w = u / sig**2
        if merges < len(events) and _merge_split_ramps(
            events, shapes, free, y, design @ beta, beta, n_fixed, w, column, p
        ):
            merges += 1
        else:
            it += 1
        # Four more Huber iterations on the same shapes before the next round: the results are
        # tuned with them (dropping them moves a few knife-edge decisions of the profile).
        design, beta, u = fit_shapes(u)
    w = u / sig**2
    xtwx = design.T @ (design * w[:, None])
    try:
        cov = np.linalg.pinv(xtwx)
    except np.linalg.LinAlgError:
        return
    for k, e in enumerate(events):
        j = n_fixed + k
        e.size = float(beta[j])
        e.size_se = float(math.sqrt(max(cov[j, j], 0.0)))
        e.growth_nights = shapes[k][1]
        before = np.flatnonzero(obs < shapes[k][0])
        if len(before):
            row = design[before[-1]].copy()
            if len(base_cols) > 1:
                row[trend.shape[1]] = 0.0  # the weekday level
            e.level_before = float(row @ beta)


def _level_basis(t: np.ndarray, days: np.ndarray, spacing: float, harmonics: int) -> np.ndarray:
    """The refit's smooth level: piecewise-linear hat functions with knots ``spacing`` nights
    apart over ``t`` (nights since the first), then ``harmonics`` yearly sine/cosine pairs of the
    day number ``days``."""
    span = float(t[-1]) if len(t) else 0.0
    n_knots = max(2, int(round(span / spacing)) + 1)
    knots = np.linspace(0.0, max(span, 1.0), n_knots)
    h = knots[1] - knots[0]
    cols = [np.maximum(0.0, 1.0 - np.abs(t[:, None] - knots[None, :]) / h)]
    for k in range(1, harmonics + 1):
        ang = 2.0 * np.pi * k * (days % 365.25) / 365.25
        cols.append(np.column_stack([np.sin(ang), np.cos(ang)]))
    return np.hstack(cols)


def _onset_candidates(e: LeakEvent, x: np.ndarray, p: LeakEventParams) -> list[int]:
    """The nights the refit's profile may move an event's onset to: ``refit_onset_back`` before
    the walk's onset to ``refit_onset_fwd`` after it, nights with a value only (the walk's own
    onset always)."""
    lo = max(e.onset - p.refit_onset_back, 0)
    hi = min(e.onset + p.refit_onset_fwd, len(x) - 1)
    return [o for o in range(lo, hi + 1) if o == e.onset or math.isfinite(float(x[o]))]


def _profile_pairs(
    events: list[LeakEvent],
    shapes: list[tuple[int, int]],
    resid: np.ndarray,
    beta: np.ndarray,
    n_fixed: int,
    w: np.ndarray,
    day_no: np.ndarray,
    x: np.ndarray,
    column: Callable[..., np.ndarray],
    p: LeakEventParams,
) -> bool:
    """Profile two close events' shapes jointly (one grid over both onsets and growths).

    Why: one event at a time, the shape of a leak a few nights after another is chosen with the
    first one held at its own shape, so a step and the ramp that follows can settle as one long
    ramp and a sliver (a coordinate-wise search stuck in a corner of the joint profile).
    """
    changed = False
    for k in range(len(shapes) - 1):
        if day_no[shapes[k + 1][0]] - day_no[shapes[k][0]] > p.refit_pair_nights:
            continue
        partial = (
            resid
            + beta[n_fixed + k] * column(*shapes[k])
            + beta[n_fixed + k + 1] * column(*shapes[k + 1])
        )
        cand: list[list[tuple[int, int]]] = [[], []]
        cols: list[list[np.ndarray]] = [[], []]
        for side in (0, 1):
            e = events[k + side]
            g_cap = p.refit_max_growth
            if side == 1 and k + 2 < len(shapes):
                g_cap = max(1, int(day_no[shapes[k + 2][0]] - day_no[shapes[k + 1][0]]))
            for o2 in _onset_candidates(e, x, p):
                for g2 in range(1, g_cap + 1):
                    cand[side].append((o2, g2))
                    cols[side].append(column(o2, g2))
        if not cand[0] or not cand[1]:
            continue
        ca = np.column_stack(cols[0])
        cb = np.column_stack(cols[1])
        wa = ca * w[:, None]
        aa = np.sum(wa * ca, axis=0)
        bb = np.sum(cb * cb * w[:, None], axis=0)
        ab = wa.T @ cb
        ra = wa.T @ partial
        rb = (cb * w[:, None]).T @ partial
        det = aa[:, None] * bb[None, :] - ab**2
        ok = det > 1e-9 * aa[:, None] * bb[None, :]
        det = np.where(ok, det, 1.0)
        sa = (bb[None, :] * ra[:, None] - ab * rb[None, :]) / det
        sb = (aa[:, None] * rb[None, :] - ab * ra[:, None]) / det
        gain = ra[:, None] * sa + rb[None, :] * sb
        oa = np.asarray([day_no[o] + g for o, g in cand[0]])
        ob = np.asarray([day_no[o] for o, _ in cand[1]])
        ok &= (sa > 0) & (sb > 0) & (oa[:, None] <= ob[None, :])
        if not ok.any():
            continue
        gain = np.where(ok, gain, -np.inf)
        i, j = np.unravel_index(int(np.argmax(gain)), gain.shape)
        if (cand[0][i], cand[1][j]) != (shapes[k], shapes[k + 1]):
            shapes[k] = cand[0][i]
            shapes[k + 1] = cand[1][j]
            changed = True
    return changed


def _prune_drops(
    free: list[int],
    base_cols: list[np.ndarray],
    drop_cols: Any,
    event_cols: list[np.ndarray],
    y: np.ndarray,
    sig: np.ndarray,
    p: LeakEventParams,
    obs: np.ndarray,
    onsets: Sequence[int],
) -> list[int]:
    """The walk's downward alarms that the whole series still supports as changes of level.

    Why: a drop alarmed on a weekend-to-weekday swing or after an exceptional night can sit a
    night or two from a rise, and two near-collinear columns share that rise between them at
    random, so the event is sized short by what the phantom drop took. Backward elimination: the
    drop with the smallest Wald χ² (β² / var β, Huber weights) goes while it is below
    ``drop_chi2``, refitting after each removal; a repair is a large, lasting drop and stays.
    A drop at most ``drop_loo_nights`` nights with data after an event's onset makes, with that
    onset, a pulse of those nights, which fits an exceptional night on the onset exactly (the
    walk's level after such an onset is too high, so the next ordinary night alarms as a drop);
    its χ² is therefore also taken with each pulse night left out in turn, and the smallest
    counts: a real burst repaired that fast still shows without any one of its nights.
    """
    free = list(free)
    n_base = sum(c.shape[1] for c in base_cols)
    while free and p.drop_chi2 > 0:
        design = np.hstack(base_cols + drop_cols(free) + event_cols)
        beta, u = _irls(design, y, sig, np.ones(len(y)), p.refit_huber)
        cov = np.linalg.pinv(design.T @ (design * (u / sig**2)[:, None]))
        chi2 = [
            float(beta[n_base + j] ** 2 / max(cov[n_base + j, n_base + j], 1e-300))
            for j in range(len(free))
        ]
        if p.drop_loo_nights > 0:
            for j, d in enumerate(free):
                before = [o for o in onsets if o < d]
                if not before:
                    continue
                pulse = np.flatnonzero((obs >= max(before)) & (obs < d))
                if not 0 < len(pulse) <= p.drop_loo_nights:
                    continue
                for m in pulse:
                    s2 = sig.copy()
                    s2[m] = 1e12
                    b2, u2 = _irls(design, y, s2, np.ones(len(y)), p.refit_huber)
                    c2 = np.linalg.pinv(design.T @ (design * (u2 / s2**2)[:, None]))
                    v = float(b2[n_base + j] ** 2 / max(c2[n_base + j, n_base + j], 1e-300))
                    chi2[j] = min(chi2[j], v)
        j = int(np.argmin(chi2))
        if chi2[j] >= p.drop_chi2:
            break
        del free[j]
    return free


def _final_sizes(
    events: list[LeakEvent], hist: list[tuple[int, float]], p: LeakEventParams
) -> None:
    """Size every event again once the walk is over, between its neighbouring changes: the nights
    from its onset (a ramp: after its last alarm, when it had about stopped growing) to the next
    change (another onset or a repair), against the nights since the change before it. The walk
    froze a size when the next event began, sometimes after only a few nights."""
    if not events:
        return
    idx = np.asarray([j for j, _ in hist])
    val = np.asarray([v for _, v in hist])
    for e in events:
        start = e.onset if e.kind == "step" else e.last_alarm + 1
        cuts = [o.onset for o in events if o is not e] + [
            o.end for o in events if o.end is not None
        ]
        after_end = min([c for c in cuts if c > e.onset] + [int(idx[-1]) + 1])
        if e.end is not None:
            after_end = min(after_end, e.end)
        prior = [
            o.last_alarm + 1 if o.kind == "ramp" else o.onset for o in events if o.onset < e.onset
        ]
        prior += [o.end for o in events if o.end is not None and o.end <= e.onset]
        before_start = max(prior + [-1])
        after = val[(idx >= start) & (idx < after_end)]
        # A step's first nights after the onset; a ramp's latest ones (it may still have grown).
        after = after[: p.size_nights] if e.kind == "step" else after[-p.window_nights :]
        before = val[(idx >= before_start) & (idx < e.onset)][-p.size_nights :]
        if len(after) and len(before):
            e.level_before = float(np.median(before))
            e.size = float(np.median(after)) - e.level_before
            e.n_before, e.n_after = len(before), len(after)


def _check_splits(
    splits: list[tuple[LeakEvent, int, int]],
    events: list[LeakEvent],
    hist: list[tuple[int, float]],
    i: int,
    sig_group: dict[bool, float],
    weekend: list[bool],
    day_no: np.ndarray,
    p: LeakEventParams,
) -> list[tuple[LeakEvent, int, int]]:
    """Re-test, night by night, each alarm that was read as a ramp still growing: once the
    nights since the ramp's onset are better explained by the ramp (its growth nights profiled)
    plus a step at the alarmed run's onset than by the ramp alone — a likelihood-ratio test of
    nested linear models, gain in σ² above ``split_chi2`` — the run is a new leak, an event of
    its own alarmed *tonight* (the night the split became visible, so the alarm stays what a
    daily run would have reported). Candidates older than ``split_nights`` are the same ramp.
    Each night counts with its own group's σ (weekend and holiday nights are noisier, and their
    offset is an estimate): one σ for all, tonight's, made the test change with the weekday."""
    wd = sig_group[False] or sig_group[True]
    we = sig_group[True] or sig_group[False]
    if not splits or wd <= 0:
        return splits
    keep: list[tuple[LeakEvent, int, int]] = []
    for ev, run_onset, alarm in splits:
        if day_no[i] - day_no[alarm] > p.split_nights or ev.end is not None:
            continue
        lo = ev.onset - p.split_pre
        others = [float(day_no[o.onset]) for o in events if o is not ev and lo < o.onset < ev.onset]
        near = [(j, v) for j, v in hist if lo <= j <= i]
        pts = [(float(day_no[j]), v) for j, v in near]
        sig = np.asarray([we if weekend[j] else wd for j, _ in near])
        gain = _split_gain(pts, float(day_no[ev.onset]), float(day_no[run_onset]), sig, p, others)
        if gain < p.split_chi2:
            keep.append((ev, run_onset, alarm))
            continue
        before = [v for t, v in pts if t < day_no[run_onset]][-p.size_nights :]
        base = float(np.median(before)) if before else 0.0
        new = LeakEvent(
            onset=run_onset,
            alarm=i,
            level_before=base,
            n_before=max(len(before), 1),
            sigma=wd,
            detector="split",
            last_alarm=i,
            seg_start=ev.seg_start,
        )
        events.append(new)
        events.sort(key=lambda e: e.onset)
        if events[-1] is not new:  # keep the current event last for _update_current
            events.remove(new)
            events.append(new)
        keep = [k for k in keep if k[0] is not ev]
        return keep + [k for k in splits if k[0] is not ev and k not in keep]
    return keep


def _split_gain(
    pts: list[tuple[float, float]],
    t1: float,
    t2: float,
    sigma: float | np.ndarray,
    p: LeakEventParams,
    others: Sequence[float] = (),
) -> float:
    """χ² gain (in σ²) of a ramp from ``t1`` plus a step at ``t2`` over the ramp alone, each
    with its best growth time; earlier events' onsets inside the window (``others``) are steps in
    both models. Huber weights so one exceptional night does not split a ramp."""
    t = np.asarray([a for a, _ in pts])
    y = np.asarray([v for _, v in pts])
    if len(y) < 6 or not np.any(t >= t2) or not np.any(t < t1):
        return 0.0
    n_after2 = int(np.sum(t >= t2))
    if n_after2 < 1:
        return 0.0
    sig = np.broadcast_to(np.asarray(sigma, dtype=np.float64), y.shape)
    step2 = (t >= t2).astype(np.float64)
    prior = [(t >= o).astype(np.float64) for o in others]
    best1 = best2 = math.inf
    for g in range(1, int(max(t[-1] - t1, 1.0)) + 2):
        ramp = np.clip((t - t1 + 1.0) / g, 0.0, 1.0)
        for k, cols in enumerate(((np.ones_like(t), ramp), (np.ones_like(t), ramp, step2))):
            design = np.column_stack([*cols, *prior])
            beta, u = _irls(design, y, sig, np.ones(len(y)), p.refit_huber)
            r = (y - design @ beta) / sig
            rho = float(
                np.sum(
                    np.where(
                        np.abs(r) <= p.refit_huber,
                        0.5 * r * r,
                        p.refit_huber * np.abs(r) - 0.5 * p.refit_huber**2,
                    )
                )
            )
            if k == 0:
                best1 = min(best1, rho)
            elif beta[2] > 0:
                best2 = min(best2, rho)
        if g > p.refit_max_growth:
            break
    if not math.isfinite(best2):
        return 0.0
    return 2.0 * (best1 - best2)


def _merge_split_ramps(
    events: list[LeakEvent],
    shapes: list[tuple[int, int]],
    drops: list[int],
    y: np.ndarray,
    fit: np.ndarray,
    beta: np.ndarray,
    n_fixed: int,
    w: np.ndarray,
    column: Any,
    p: LeakEventParams,
) -> bool:
    """Join two consecutive events into one ramp when, with the whole series seen, one ramp
    column from the first onset (growth nights profiled) explains their nights within
    ``merge_chi2`` (σ²) of two columns: a ramp the walk alarmed twice, not two leaks. The later
    event is removed; the earlier keeps its onset and alarm. True when one pair was joined.
    ``drops`` are the refit's (the walk's downward alarms the series supports): one between the
    two onsets keeps them apart, a pruned one does not."""
    if p.merge_chi2 <= 0:
        return False
    for k in range(len(events) - 1):
        a, b = events[k], events[k + 1]
        # A ramp the walk closed at a drop after the next alarm may still be that ramp alarmed
        # twice: the refit reads repairs as its own free drops, so only a repair dated before
        # the later onset keeps the two apart.
        if (a.end is not None and a.end <= b.onset) or b.onset - a.onset > p.merge_nights:
            continue
        if any(a.onset < d <= b.onset for d in drops):
            continue
        ca = column(*shapes[k])
        cb = column(*shapes[k + 1])
        r = y - fit + beta[n_fixed + k] * ca + beta[n_fixed + k + 1] * cb
        two = np.column_stack([ca, cb])
        sw = np.sqrt(w)
        coef = np.linalg.lstsq(two * sw[:, None], r * sw, rcond=None)[0]
        gain2 = float(np.sum(w * r * r) - np.sum(w * (r - two @ coef) ** 2))
        gain1, g1 = -1.0, shapes[k][1]
        for g in range(1, p.refit_max_growth + 1):
            c = column(shapes[k][0], g)
            den = float(np.sum(w * c * c))
            if den > 0:
                gain = float(np.sum(w * r * c)) ** 2 / den
                if gain > gain1:
                    gain1, g1 = gain, g
        if gain2 - gain1 < p.merge_chi2:
            a.kind = "ramp"
            a.last_alarm = max(a.last_alarm, b.last_alarm)
            a.end = min([v for v in (a.end, b.end) if v is not None], default=None)
            del events[k + 1]
            del shapes[k + 1]
            # The merged ramp's column runs on (repairs are the refit's free drops): ending it
            # at the walk's repair night for the later event, a drop the refit may have pruned
            # as noise, cut the ramp short there and handed its size to the next rise.
            shapes[k] = (shapes[k][0], g1)
            return True
    return False


def _irls(
    design: np.ndarray, y: np.ndarray, sig: np.ndarray, u: np.ndarray, huber: float
) -> tuple[np.ndarray, np.ndarray]:
    """Huber M-estimate of a linear model by iteratively reweighted least squares (weights
    u / σ²: u = min(1, c/|r|) for the standardised residual r)."""
    beta = np.zeros(design.shape[1])
    for _ in range(4):
        sw = np.sqrt(u) / sig
        beta = np.linalg.lstsq(design * sw[:, None], y * sw, rcond=None)[0]
        r = (y - design @ beta) / sig
        u = np.minimum(1.0, huber / np.maximum(np.abs(r), 1e-12))
    return beta, u


def _change_point(vals: list[float], level: float, sigma: float, upward: bool) -> int:
    """Where in an alarmed run the shift began: the maximum-likelihood change point of a mean
    shift of the size seen at the run's end (argmin of the partial sums of z − δ/2), which is
    later than the CUSUM's own estimate (the run start) when a run crept up before the step."""
    z = (np.asarray(vals) - level) / sigma * (1.0 if upward else -1.0)
    delta = float(np.median(z[-3:]))
    if len(z) < 2 or delta <= 0:
        return 0
    partial = np.concatenate([[0.0], np.cumsum(z - delta / 2.0)])[:-1]
    return int(np.argmin(partial))


def _on_rise(
    events: list[LeakEvent],
    run: list[tuple[int, float]],
    seg: list[tuple[int, float]],
    hist: list[tuple[int, float]],
    before: list[float],
    level: float,
    sigma: float,
    detector: str,
    i: int,
    p: LeakEventParams,
    day_no: np.ndarray,
) -> bool:
    """Open a new event for an upward alarm, or extend the current one (a ramp still growing);
    True when it extended."""
    onset = run[0][0]
    cur = events[-1] if events else None
    if cur is not None and cur.end is None and cur.seg_start == seg[0][0]:
        gap = day_no[onset] - day_no[cur.last_alarm]
        since = [(float(day_no[j]), v) for j, v in hist if j >= cur.onset]
        if (
            gap <= p.ramp_next_nights
            or (
                gap <= p.ramp_join_nights
                and _line_beats_steps(since, float(day_no[onset]), p.ramp_margin)
            )
        ) and _jump_z(since, float(day_no[onset]), [v for _, v in run], sigma) < p.ramp_jump_z:
            # The level kept rising since the last alarm: the same leak growing.
            cur.kind = "ramp"
            cur.last_alarm = i
            cur.seg_start = onset
            return True
    base = float(np.median(before)) if before else level
    events.append(
        LeakEvent(
            onset=onset,
            alarm=i,
            level_before=base,
            n_before=max(len(before), 1),
            sigma=sigma,
            detector=detector,
            last_alarm=i,
            seg_start=onset,
        )
    )
    return False


def _jump_z(
    points: list[tuple[float, float]], second: float, run: list[float], sigma: float
) -> float:
    """How far (in standard errors) the alarmed run's nights stand above the straight line of
    the open event's nights before the run, extrapolated: a ramp still growing continues its
    line, a new leak on top of it jumps off it (the test of a level shift against a local
    linear trend, as in the Chow test, G. C. Chow, Econometrica 28, 1960)."""
    t = np.asarray([a for a, _ in points if a < second])
    y = np.asarray([v for a, v in points if a < second])
    if len(y) < 2 or not run:
        return 0.0
    if len(y) >= 4:
        slope, icpt = np.polyfit(t, y, 1)
        slope = max(float(slope), 0.0)
        icpt = float(np.median(y - slope * t))
    else:
        slope, icpt = 0.0, float(np.median(y))
    run_t = np.asarray([a for a, _ in points if a >= second][: len(run)])
    if len(run_t) == 0:
        return 0.0
    excess = float(np.median(np.asarray(run[: len(run_t)]) - (icpt + slope * run_t)))
    se = _MEDIAN_SE * sigma * math.sqrt(1.0 / len(run_t) + 1.0 / len(y))
    return excess / max(se, 1e-12)


def _line_beats_steps(points: list[tuple[float, float]], second: float, margin: float) -> bool:
    """Whether the nights since an open event's onset are better explained by one straight line
    (a leak still growing) than by two levels with the best split at or after the middle of them
    (a second leak), by the Bayesian information criterion (line: 2 parameters, two levels: 3);
    ``margin`` is added to the line's criterion (positive favours a second leak)."""
    t = np.asarray([a for a, _ in points])
    y = np.asarray([v for _, v in points])
    n = len(y)
    if n < 5 or not np.any(t >= second):
        return True
    line = np.polyval(np.polyfit(t, y, 1), t)
    sse_line = max(float(np.sum((y - line) ** 2)), 1e-12)
    sse_steps = min(
        float(np.sum((y[:c] - y[:c].mean()) ** 2) + np.sum((y[c:] - y[c:].mean()) ** 2))
        for c in range(max(2, n // 3), n - 1)
    )
    sse_steps = max(sse_steps, 1e-12)
    bic_line = n * math.log(sse_line / n) + 2 * math.log(n)
    bic_steps = n * math.log(sse_steps / n) + 3 * math.log(n)
    return bic_line + margin < bic_steps


def _on_drop(
    events: list[LeakEvent],
    drop: float,
    sigma: float,
    n_before: int,
    run: list[tuple[int, float]],
    i: int,
    p: LeakEventParams,
) -> None:
    open_ = [e for e in events if e.end is None]
    if not open_ or drop <= 0:
        return
    best = min(open_, key=lambda e: abs(e.size - drop))
    tol = max(p.repair_match_rel * best.size, 3.0 * sigma * math.sqrt(1 / n_before + 1 / len(run)))
    if abs(best.size - drop) <= tol:
        best.end = run[0][0]


def _update_current(
    events: list[LeakEvent],
    seg: list[tuple[int, float]],
    pending: list[tuple[int, float]],
    i: int,
    p: LeakEventParams,
) -> None:
    """Refresh the size of the event whose segment is current; confirm events that lasted."""
    for e in events:
        if e.end is None and e.confirmed is None and i - e.onset >= p.confirm_nights:
            e.confirmed = i
    if not events:
        return
    cur = events[-1]
    if cur.end is not None or not seg or seg[0][0] != cur.seg_start:
        return
    vals = [v for _, v in (seg + pending)[: p.size_nights]] if cur.kind == "step" else None
    if vals is None:  # a ramp: the level it has reached (latest nights of its last segment)
        vals = [v for _, v in seg[-p.window_nights :]]
    cur.size = float(np.median(vals)) - cur.level_before
    cur.n_after = len(vals)


def leak_events(series: pl.DataFrame, params: LeakEventParams | None = None) -> pl.DataFrame:
    """The ``LEAK_EVENTS`` frame of every DMA in ``series`` (``dma_id, night_date, nnf_m3h``).

    Nights with a null, NaN or infinite value are skipped, not read as zero; a DMA with fewer than
    ``min_nights`` values has no events. ``event_no`` counts a DMA's events from 1 in onset order,
    so (dma_id, onset_night) and (dma_id, event_no) both identify an event.
    """
    p = params or LeakEventParams()
    rows: list[dict[str, Any]] = []
    frame = (
        series.select("dma_id", "night_date", "nnf_m3h")
        .filter(pl.col("dma_id").is_not_null() & pl.col("night_date").is_not_null())
        .unique(subset=["dma_id", "night_date"], keep="first")
        .sort("dma_id", "night_date")
    )
    for part in frame.partition_by("dma_id", maintain_order=True):
        dma_id = str(part["dma_id"][0])
        values = part["nnf_m3h"].cast(pl.Float64).fill_null(float("nan")).to_numpy()
        nights: list[date] = part["night_date"].to_list()
        evs = sorted(detect_leak_events(values, nights, p), key=lambda e: e.onset)
        for no, e in enumerate(evs, start=1):
            rows.append(
                {
                    "dma_id": dma_id,
                    "event_no": no,
                    "kind": e.kind,
                    "status": e.status,
                    "onset_night": nights[e.onset],
                    "alarm_night": nights[e.alarm],
                    "confirmed_night": nights[e.confirmed] if e.confirmed is not None else None,
                    "end_night": nights[e.end] if e.end is not None else None,
                    "size_m3h": round(e.size, 4),
                    "confidence": round(e.confidence, 4),
                    "level_before_m3h": round(e.level_before, 4),
                    "sigma_m3h": round(e.sigma, 4),
                    "detector": e.detector,
                }
            )
    return pl.DataFrame(rows, schema=pl.Schema(LEAK_EVENTS))


def _severity(size: float, medium_m3h: float, high_m3h: float) -> str:
    if size >= high_m3h:
        return "high"
    return "medium" if size >= medium_m3h else "low"


def _stamp(keyed: dict[tuple[str, date], datetime | None], dma: str, night: date) -> datetime:
    """The night's MNF window start, else its UTC midnight (an alert is never dropped)."""
    ts = keyed.get((dma, night))
    return ts if ts is not None else datetime(night.year, night.month, night.day, tzinfo=UTC)


def leak_event_alerts(
    events: pl.DataFrame,
    stamps: pl.DataFrame,
    medium_m3h: float = 1.0,
    high_m3h: float = 3.6,
) -> pl.DataFrame:
    """One ``DMA_NIGHT_FLOW_RISE`` alert per event, in the ``ALERTS`` schema.

    ``stamps`` (``dma_id, night_date, mnf_start_ts``) dates the alert at the onset night's MNF
    window and closes it at the repair night's. The alerts table knows only open/closed, so a
    confirmed event is an open alert; the evidence carries the event's own status, id, onset,
    size and confidence so the worklist shows them.
    """
    keyed = {
        (str(r["dma_id"]), r["night_date"]): r["mnf_start_ts"]
        for r in stamps.select("dma_id", "night_date", "mnf_start_ts").iter_rows(named=True)
    }
    rows: list[dict[str, Any]] = []
    for e in events.iter_rows(named=True):
        dma, onset, end = str(e["dma_id"]), e["onset_night"], e["end_night"]
        start_ts = _stamp(keyed, dma, onset)
        evidence = {
            "event_id": f"{dma}:{onset.isoformat()}",
            "event_no": e["event_no"],
            "kind": e["kind"],
            "event_status": e["status"],
            "onset_night": onset.isoformat(),
            "alarm_night": e["alarm_night"].isoformat(),
            "confirmed_night": e["confirmed_night"].isoformat() if e["confirmed_night"] else None,
            "end_night": end.isoformat() if end else None,
            "size_m3h": e["size_m3h"],
            "confidence": e["confidence"],
            "level_before_m3h": e["level_before_m3h"],
            "sigma_m3h": e["sigma_m3h"],
            "detector": e["detector"],
        }
        rows.append(
            {
                "code": ALERT_CODE,
                "subject_id": dma,
                "start_ts": start_ts,
                "end_ts": _stamp(keyed, dma, end) if end else None,
                "status": "closed" if e["status"] == "closed" else "open",
                "severity": _severity(float(e["size_m3h"]), medium_m3h, high_m3h),
                "evidence": json.dumps(evidence, sort_keys=True),
            }
        )
    return pl.DataFrame(rows, schema=pl.Schema(cast(Any, ALERTS)))
