"""Customer-meter anomaly alerts (domain reference, "Meter anomaly alerts").

Each detector turns interval consumption (``schemas.INTERVALS``) and meter attributes
(``schemas.METERS``) into a per-meter condition series and hands it to :mod:`pipelines.episodes`,
which opens, continues and closes one alert per episode and merges with stored alerts. Conditions
are chosen so the episode starts at the *onset* of the problem, within one interval (or one
reporting period for ``COMMS_LOSS``): e.g. a leak is a stretch of non-zero intervals that is only
*confirmed* after 24 h, but it starts where the stretch starts.

All work is column-wise polars over the whole estate at once (10 000 meters x 30 days of 15-minute
intervals is 28.8 M rows); per-meter Python loops would not finish in a flow's time budget. Meters
that never meet a condition drop out before any per-episode work.

Every threshold is a field of :class:`MeterAnomalyParams`; a utility tunes them there, not here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timedelta
from typing import Any, Final, Literal

import numpy as np
import polars as pl

from pipelines.consumption import meter_timezones, with_meter_local_time
from pipelines.episodes import (
    EpisodeParams,
    Evidence,
    sorted_by_subject,
    update_episodes,
)
from pipelines.schemas import UTC_TS

# Vendor status bits as stored in ``readings.quality`` (protocols.uplink.Quality); repeated here as
# plain ints because pipelines stay free of transport imports.
QUALITY_LEAK = 1
QUALITY_REVERSE_FLOW = 2
QUALITY_TAMPER = 4
QUALITY_LOW_BATTERY = 8

LEAK_CONTINUOUS = "LEAK_CONTINUOUS"
BURST = "BURST"
REVERSE_FLOW = "REVERSE_FLOW"
STUCK_METER = "STUCK_METER"
TAMPER = "TAMPER"
LOW_BATTERY = "LOW_BATTERY"
COMMS_LOSS = "COMMS_LOSS"
OVER_CAPACITY = "OVER_CAPACITY"
METER_AGE = "METER_AGE"
_VEE_OVER_Q4 = "OVER_Q4"  # pipelines.vee.OVER_Q4 (not imported: vee depends on transport codes)
METER_CODES = (
    LEAK_CONTINUOUS,
    BURST,
    REVERSE_FLOW,
    STUCK_METER,
    TAMPER,
    LOW_BATTERY,
    COMMS_LOSS,
    OVER_CAPACITY,
    METER_AGE,
)

# Meter classes (registry ``meter_class``; METERS may carry it as an optional ``meter_class``
# column). A class changes what is normal for a meter: a building's flow never stops, so "no zero
# interval for 24 h" says nothing about a leak there.
RESIDENTIAL = "residential"
MULTI_DWELLING = "multi_dwelling"
COMMERCIAL = "commercial"
INDUSTRIAL = "industrial"
BULK = "bulk"
METER_CLASSES = (RESIDENTIAL, MULTI_DWELLING, COMMERCIAL, INDUSTRIAL, BULK)
DEFAULT_METER_CLASS = RESIDENTIAL

LEAK_RULE_NO_ZERO: Final = "no_zero"
LEAK_RULE_FLOOR_RISE: Final = "floor_rise"
LeakRule = Literal["no_zero", "floor_rise"]


def _default_class_overrides() -> dict[str, dict[str, Any]]:
    """Per-class changes to :class:`MeterAnomalyParams`; a class not listed uses the defaults.

    Single dwellings keep the domain rule (no zero interval for 24 h): their night has zero
    intervals, and that rule's recall is what the scenario tests measure. Every other class is
    judged against its own night floor. Industrial and bulk night use follows shifts and
    processes, so their floor must rise by half before it counts.
    """
    rise = {"leak_rule": LEAK_RULE_FLOOR_RISE}
    return {
        RESIDENTIAL: {},
        MULTI_DWELLING: dict(rise),
        COMMERCIAL: dict(rise),
        INDUSTRIAL: {**rise, "floor_rise_rel": 0.5},
        BULK: {**rise, "floor_rise_rel": 0.5},
    }


DEFAULT_SEVERITY: dict[str, str] = {
    LEAK_CONTINUOUS: "warning",
    BURST: "critical",
    REVERSE_FLOW: "warning",
    STUCK_METER: "warning",
    TAMPER: "major",
    LOW_BATTERY: "info",
    COMMS_LOSS: "warning",
    OVER_CAPACITY: "warning",
    METER_AGE: "info",
}


@dataclass(frozen=True)
class MeterAnomalyParams:
    """Thresholds of the meter anomaly rules, with the reasoning behind each default."""

    # --- interval geometry ------------------------------------------------------------------
    interval: timedelta = timedelta(minutes=15)
    """Nominal interval length; used for a meter's first interval and after a data gap."""
    max_interval: timedelta = timedelta(hours=1)
    """A longer step between interval ends is a gap in the data, not one long interval."""
    zero_volume_m3: float = 1e-6
    """|volume| at or below this is "no flow": an unchanged register differences to exactly 0, the
    tolerance only absorbs float noise from unit conversion."""
    timezone: str = "Asia/Shanghai"
    """Zone for night windows when ``meters`` has no ``timezone`` column (join it from DMAS)."""
    night_start_hour: int = 0
    night_end_hour: int = 5
    """Night window in local time, [start, end) by interval start (domain MNF window 00-05 h)."""

    # --- LEAK_CONTINUOUS --------------------------------------------------------------------
    leak_min_duration: timedelta = timedelta(hours=24)
    """Domain rule: no interval with zero flow for at least 24 h."""
    leak_quiet_time: timedelta = timedelta(hours=1)
    """Zero flow this long ends a leak episode; one zero interval may be register resolution."""
    leak_night_floor_m3h: float = 0.004
    """Minimum night interval flow for a leak: 4 L/h is one litre per 15-min interval, the smallest
    flow a 1-litre register shows in every interval."""
    leak_use_estimated: bool = False
    """Estimated intervals (flag E) are not evidence of flow: interpolating a register across a long
    gap makes a constant non-zero flow that would look like a leak. They count as "no flow seen", so
    they also break a stretch: dropping them instead let the episode bridge the gap, and a data gap
    of a day or more then counted towards the 24 h without a zero interval."""

    leak_rule: LeakRule = LEAK_RULE_NO_ZERO
    """``no_zero``: the domain rule above. ``floor_rise``: the meter against its own history — a
    new, sustained rise of its night floor (the lowest hourly flow of each night) above the
    baseline of its previous nights; for meters whose flow never stops (see :func:`floor_rise`)."""
    floor_baseline_nights: int = 14
    """Nights of history the baseline floor is the median of (two weeks: both weekend types)."""
    floor_min_baseline_nights: int = 5
    """No judgement before this many baseline nights: a meter's first nights are its baseline."""
    floor_rise_nights: int = 3
    """Consecutive nights above baseline + threshold that make a rise sustained (one busy night,
    a filled pool or a night shift, is not a leak)."""
    floor_rise_min_m3h: float = 0.02
    """Smallest rise that counts: 20 L/h is a running toilet cistern, the typical hidden leak."""
    floor_rise_rel: float = 0.25
    """...and at least this share of the baseline floor: a building's floor moves with occupancy."""
    floor_rise_mad_k: float = 3.0
    """...and at least k robust standard deviations (1.4826 x MAD) of the baseline nights."""
    floor_min_coverage: float = 0.5
    """A night counts only when actual (not estimated) intervals cover this share of the window."""

    # --- BURST ------------------------------------------------------------------------------
    burst_k: float = 5.0
    """Flow must be at least k x the meter's baseline (its mean flow over the previous days)."""
    burst_q3_fraction: float = 0.6
    """...and at least this share of the permanent flow Q3 ("near Q3"): 1.5 m³/h for a DN15 R160
    meter, above a shower or garden hose."""
    burst_baseline_days: int = 7
    """Days before the interval's day that form the baseline; without any, the meter's median daily
    mean flow over the input is used."""
    burst_min_duration: timedelta = timedelta(hours=1)
    """Sustained: at least one hour (four 15-min intervals)."""
    burst_quiet_time: timedelta = timedelta(minutes=30)

    # --- REVERSE_FLOW -----------------------------------------------------------------------
    reverse_volume_m3: float = 1e-6
    """A negative interval volume larger than this (float noise) is reverse flow."""
    reverse_quiet_time: timedelta = timedelta(hours=1)

    # --- STUCK_METER ------------------------------------------------------------------------
    stuck_min_duration: timedelta = timedelta(days=7)
    """Zero consumption this long on an active account (the VEE "N days"); a week so that a
    weekend away does not raise it."""
    stuck_prior_use_m3: float = 0.01
    """The meter must have registered this much before in the input ("used water before")."""

    # --- TAMPER / LOW_BATTERY ---------------------------------------------------------------
    status_quiet_time: timedelta = timedelta(hours=6)
    """Vendor bits repeat in every uplink while set; a whole reporting period clear closes."""
    low_battery_voltage_v: float | None = 3.3
    """Battery voltage below this is low (3.6 V lithium thionyl chloride cells end near 3.3 V);
    only used when voltages are given; None disables it."""

    # --- COMMS_LOSS -------------------------------------------------------------------------
    reporting_period: timedelta = timedelta(hours=6)
    """Expected uplink period: NB-IoT meters default to 4 uplinks a day."""
    comms_missed_periods: float = 2.0
    """Domain rule: no uplink for more than 2 expected reporting periods."""

    # --- OVER_CAPACITY ----------------------------------------------------------------------
    over_capacity_factor: float = 1.0
    """Interval volume above factor x Q4 x interval hours (ISO 4064 overload flow Q4)."""

    # --- METER_AGE --------------------------------------------------------------------------
    service_life_years: int = 6
    """JJG 162: residential meters up to DN25 are replaced after 6 years."""
    service_life_max_dn: int = 25
    service_life_customer_types: tuple[str, ...] = ("household",)

    severity: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_SEVERITY))

    classes: Mapping[str, Mapping[str, Any]] = field(default_factory=_default_class_overrides)
    """Per meter class, the fields above that differ for it (see :func:`with_class_overrides`)."""

    def for_class(self, meter_class: str | None) -> MeterAnomalyParams:
        """These parameters with ``meter_class``'s changes applied (unknown class: unchanged),
        so every detector reads one flat parameter set."""
        changes = self.classes.get(meter_class or DEFAULT_METER_CLASS, {})
        return replace(self, **changes) if changes else self

    def episode_params(self, code: str) -> EpisodeParams:
        """Opening and closing rule of each code."""
        rules = {
            LEAK_CONTINUOUS: EpisodeParams(self.leak_min_duration, self.leak_quiet_time),
            BURST: EpisodeParams(self.burst_min_duration, self.burst_quiet_time),
            REVERSE_FLOW: EpisodeParams(timedelta(0), self.reverse_quiet_time),
            STUCK_METER: EpisodeParams(self.stuck_min_duration, timedelta(0)),
            TAMPER: EpisodeParams(timedelta(0), self.status_quiet_time),
            LOW_BATTERY: EpisodeParams(timedelta(0), self.status_quiet_time),
            COMMS_LOSS: EpisodeParams(timedelta(0), timedelta(0)),
            OVER_CAPACITY: EpisodeParams(timedelta(0), timedelta(0)),
            METER_AGE: EpisodeParams(timedelta(0), timedelta(0)),
        }
        return rules[code]


_CLASS_FIELDS = frozenset(f.name for f in fields(MeterAnomalyParams)) - {"classes", "severity"}


def with_class_overrides(
    params: MeterAnomalyParams, overrides: Mapping[str, Mapping[str, Any]]
) -> MeterAnomalyParams:
    """``params`` with per-class field changes (e.g. from the registry) merged over the defaults.

    Raises ValueError on an unknown class or field, so a misspelt key in the registry is refused
    instead of silently leaving the default in force.
    """
    merged = {k: dict(v) for k, v in params.classes.items()}
    for cls, changes in overrides.items():
        if cls not in METER_CLASSES:
            raise ValueError(f"unknown meter class {cls!r} (one of {', '.join(METER_CLASSES)})")
        unknown = set(changes) - _CLASS_FIELDS
        if unknown:
            raise ValueError(f"meter class {cls}: unknown anomaly parameter(s) {sorted(unknown)}")
        if changes.get("leak_rule", LEAK_RULE_NO_ZERO) not in (
            LEAK_RULE_NO_ZERO,
            LEAK_RULE_FLOOR_RISE,
        ):
            raise ValueError(f"meter class {cls}: leak_rule must be no_zero or floor_rise")
        merged.setdefault(cls, {}).update(changes)
    return replace(params, classes=merged)


def meter_classes_of(meters: pl.DataFrame) -> pl.DataFrame:
    """``meter_id, meter_class`` for every meter; a missing column or null is the default."""
    cls = (
        pl.col("meter_class").fill_null(DEFAULT_METER_CLASS)
        if "meter_class" in meters.columns
        else pl.lit(DEFAULT_METER_CLASS)
    )
    return meters.select("meter_id", cls.alias("meter_class"))


def detect_meter_anomalies(
    intervals: pl.DataFrame,
    meters: pl.DataFrame,
    params: MeterAnomalyParams | None = None,
    as_of: datetime | None = None,
    previous_alerts: pl.DataFrame | None = None,
    *,
    uplinks: pl.DataFrame | None = None,
    voltages: pl.DataFrame | None = None,
    failures: pl.DataFrame | None = None,
    holidays: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Every meter code, each meter judged with its class's parameters (``meters.meter_class``,
    default residential); see :func:`detect_class_anomalies` for the arguments.

    The meters of each class present are detected on their own (their intervals, uplinks and
    stored alerts), so a building meter never meets the single-dwelling leak rule. Stored alerts
    of meters absent from ``meters`` go with the default class and come back unchanged.
    """
    p = params or MeterAnomalyParams()
    classes = meter_classes_of(meters)
    present = classes.get_column("meter_class").unique().sort().to_list()
    if len(present) <= 1:
        cls = present[0] if present else DEFAULT_METER_CLASS
        return detect_class_anomalies(
            intervals, meters, p.for_class(cls), as_of, previous_alerts,
            uplinks=uplinks, voltages=voltages, failures=failures, holidays=holidays,
        )  # fmt: skip
    if as_of is None:
        last = intervals.get_column("ts").max()
        as_of = last if isinstance(last, datetime) else datetime.now().astimezone()
    known = classes.get_column("meter_id").implode()
    if (
        DEFAULT_METER_CLASS not in present
        and previous_alerts is not None
        and previous_alerts.filter(~pl.col("subject_id").is_in(known)).height
    ):
        present.append(DEFAULT_METER_CLASS)  # orphans' stored alerts come back unchanged
    parts = []
    for cls in present:
        ids = classes.filter(pl.col("meter_class") == cls).get_column("meter_id")
        mine = pl.col("meter_id").is_in(ids.implode())
        prev = None
        if previous_alerts is not None:
            others = classes.filter(pl.col("meter_class") != cls).get_column("meter_id")
            keep = (
                ~pl.col("subject_id").is_in(others.implode())
                if cls == DEFAULT_METER_CLASS
                else pl.col("subject_id").is_in(ids.implode())
            )
            prev = previous_alerts.filter(keep)
        parts.append(
            detect_class_anomalies(
                intervals.filter(mine),
                meters.filter(mine),
                p.for_class(cls),
                as_of,
                prev,
                uplinks=None if uplinks is None else uplinks.filter(mine),
                voltages=None if voltages is None else voltages.filter(mine),
                failures=None if failures is None else failures.filter(mine),
                holidays=holidays,
            )
        )
    return pl.concat(parts, how="vertical").sort("code", "subject_id", "start_ts")


def detect_class_anomalies(
    intervals: pl.DataFrame,
    meters: pl.DataFrame,
    params: MeterAnomalyParams | None = None,
    as_of: datetime | None = None,
    previous_alerts: pl.DataFrame | None = None,
    *,
    uplinks: pl.DataFrame | None = None,
    voltages: pl.DataFrame | None = None,
    failures: pl.DataFrame | None = None,
    holidays: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Every meter code for the intervals up to ``as_of``, merged with ``previous_alerts``, all
    meters judged with the one parameter set ``params``.

    ``as_of`` (UTC) is the evaluation time: later intervals are ignored, COMMS_LOSS and METER_AGE
    are judged at it; it defaults to the last interval. ``uplinks`` (``meter_id, ts`` of received
    uplinks) makes COMMS_LOSS exact; without it actual intervals (flag A) stand in for uplinks.
    ``voltages`` (``meter_id, ts, voltage``) enables the LOW_BATTERY voltage rule. ``failures``
    (``pipelines.vee.VEE_FAILURES`` of the same reads) lets OVER_CAPACITY see the reads VEE dropped
    as over Q4: after VEE the series holds only their estimated replacement, which spreads the
    volume under Q4. ``holidays`` (``meter_id, day``: each meter's DMA's public holidays, see
    ``pipelines.estimation.meter_holidays``) are left out of the night-floor rule's nights (see
    :func:`floor_rise`); the other codes do not depend on the day. Returns the ALERTS state of the
    meter codes (stored alerts of other codes are not returned).
    """
    p = params or MeterAnomalyParams()
    if as_of is None:
        last = intervals.get_column("ts").max()
        as_of = last if isinstance(last, datetime) else datetime.now().astimezone()
    at = pl.lit(as_of).cast(UTC_TS)
    prepared = prepare_intervals(intervals.filter(pl.col("ts") <= at), meters, p)
    if uplinks is None:
        uplinks = prepared.filter(pl.col("flag") == "A").select(
            pl.col("subject_id").alias("meter_id"), "ts"
        )
    window_start = prepared.get_column("start").min()
    parts = [
        leak_continuous(prepared, meters, p, previous_alerts, holidays=holidays),
        burst(prepared, meters, p, previous_alerts),
        reverse_flow(prepared, meters, p, previous_alerts),
        stuck_meter(prepared, meters, p, previous_alerts),
        tamper(prepared, meters, p, previous_alerts),
        low_battery(prepared, meters, p, previous_alerts, voltages=voltages),
        comms_loss(
            uplinks,
            meters,
            p,
            as_of,
            previous_alerts,
            window_start=window_start if isinstance(window_start, datetime) else None,
        ),
        over_capacity(prepared, meters, p, previous_alerts, failures=failures),
        meter_age(meters, p, as_of, previous_alerts),
    ]
    return pl.concat(parts, how="vertical").sort("code", "subject_id", "start_ts")


def _episodes(
    cond: pl.DataFrame,
    code: str,
    evidence: list[Evidence],
    p: MeterAnomalyParams,
    previous_alerts: pl.DataFrame | None,
) -> pl.DataFrame:
    """Every meter detector ends the same way: its condition series become episodes with the
    code's own episode parameters and severity."""
    return update_episodes(
        cond,
        code=code,
        params=p.episode_params(code),
        evidence=evidence,
        previous=previous_alerts,
        severity=p.severity[code],
    )


def prepare_intervals(
    intervals: pl.DataFrame, meters: pl.DataFrame, params: MeterAnomalyParams
) -> pl.DataFrame:
    """Intervals sorted per meter with the columns every detector shares.

    Adds ``subject_id`` (the meter), ``start``/``end`` of the interval, ``hours``, ``rate`` (m³/h),
    ``zero`` and ``_sidx`` (an integer per meter, for cheap per-meter lookups and windows).
    Calling a detector on an already prepared frame skips this work, which is how
    :func:`detect_meter_anomalies` prepares once for all codes.
    """
    if "rate" in intervals.columns and "_sidx" in intervals.columns:
        return intervals
    del meters  # per-meter attributes are looked up by the detectors that need them
    frame = intervals.select(
        pl.col("meter_id").alias("subject_id"),
        pl.col("ts").cast(UTC_TS),
        pl.col("volume").cast(pl.Float64),
        pl.col("quality").cast(pl.Int16).fill_null(0),
        pl.col("flag").fill_null("A"),
    )
    frame = sorted_by_subject(frame, "ts")
    # ``episodes.with_spans(ts_marks="end")`` and the columns derived from it in one lazy pass:
    # the meter comparisons are made once and no intermediate frame is materialised.
    subj, t = pl.col("subject_id"), pl.col("ts")
    back = pl.when(pl.col("_same_prev")).then(t - t.shift(1))
    ahead = pl.when(pl.col("_same_prev").shift(-1)).then(t.shift(-1) - t)
    step = pl.coalesce(back, ahead)
    nominal = pl.lit(params.interval, dtype=pl.Duration("us"))
    step = (
        pl.when(step.is_null() | (step <= timedelta(0)) | (step > params.max_interval))
        .then(nominal)
        .otherwise(step)
    )
    hours = (pl.col("end") - pl.col("start")).dt.total_seconds(fractional=True) / 3600.0
    out = (
        frame.lazy()
        .with_columns(_same_prev=subj == subj.shift(1))
        .with_columns(_step=step)
        .with_columns(start=t - pl.col("_step"), end=t)
        .with_columns(hours=hours, _sidx=(~pl.col("_same_prev")).fill_null(True).cum_sum())
        .with_columns(
            rate=pl.col("volume") / pl.col("hours"),
            zero=pl.col("volume").abs() <= params.zero_volume_m3,
        )
        .drop("_same_prev", "_step")
        # In memory: the streaming engine hands back hundreds of chunks, and every detector
        # shifts and gathers down these columns.
        .collect(engine="in-memory")
    )
    # An input in many chunks is made one (a few, e.g. one per slice of meters, cost nothing).
    return out.rechunk() if max(out.n_chunks("all"), default=1) > 16 else out


def _openable(
    frame: pl.DataFrame,
    active: pl.Expr,
    code: str,
    params: MeterAnomalyParams,
    previous_alerts: pl.DataFrame | None,
    also: pl.Series | None = None,
) -> pl.DataFrame:
    """The rows of the meters of prepared ``frame`` that can have a ``code`` episode.

    An episode opens only on a run of consecutive rows whose condition held for the code's minimum
    duration; ``active`` is that condition or one it implies (a superset is enough). Meters with a
    stored alert of the code, and those in ``also``, are kept as well: the episode machinery
    continues or closes their alerts. Every other meter would go through the machinery only to
    come out empty, so the detectors build their conditions and evidence on these rows alone
    (whole meters, in order, so per-meter windows and sums are unchanged).
    """
    if frame.height == 0:
        return frame
    # Run bounds from flat arrays: a run of the condition starts where it holds and did not on
    # the row before of the same meter, and ends where it does not on the row after.
    on = frame.select(active.fill_null(False)).to_series().to_numpy()
    sidx = frame.get_column("_sidx").to_numpy()
    same = np.concatenate(([False], sidx[1:] == sidx[:-1]))
    before = np.concatenate(([False], on[:-1])) & same
    after = np.concatenate((on[1:], [False])) & np.concatenate((same[1:], [False]))
    starts = np.flatnonzero(on & ~before)
    ends = np.flatnonzero(on & ~after)
    start_us = frame.get_column("start").to_physical().to_numpy()
    end_us = frame.get_column("end").to_physical().to_numpy()
    min_us = params.episode_params(code).min_duration // timedelta(microseconds=1)
    keep = sidx[starts[end_us[ends] - start_us[starts] >= min_us]]
    subjects = _subjects_of(previous_alerts, code)
    if also is not None:
        subjects = pl.concat([subjects, also.cast(pl.String)])
    heads = np.flatnonzero(~same)
    if subjects.len():
        stored = frame.get_column("subject_id").gather(heads).is_in(subjects.implode())
        keep = np.concatenate((keep, sidx[heads[stored.to_numpy()]]))
    # Whole meters: the rows from each kept meter's first row up to the next meter's.
    bounds = np.append(heads, frame.height)
    which = np.searchsorted(sidx[heads], np.unique(keep))
    rows = [np.arange(bounds[k], bounds[k + 1]) for k in which.tolist()]
    return frame[np.concatenate(rows) if rows else np.empty(0, dtype=np.int64)]


# --- per-code detectors ------------------------------------------------------------------------


def leak_continuous(
    intervals: pl.DataFrame,
    meters: pl.DataFrame,
    params: MeterAnomalyParams | None = None,
    previous_alerts: pl.DataFrame | None = None,
    *,
    holidays: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """LEAK_CONTINUOUS: a stretch of at least 24 h without a zero-flow interval, whose night flow
    never falls under the floor.

    The condition is simply "this interval had flow"; the episode machinery's minimum duration
    turns it into "no zero interval for 24 h" and dates the alert from the first interval of the
    stretch. Any 24 h stretch contains a whole night window, so the night floor can be judged on
    the episode (evidence ``min_night_flow_m3h``). With ``leak_rule = "floor_rise"`` (meter classes
    whose flow never stops) the code is raised by :func:`floor_rise` instead, which leaves out the
    meters' ``holidays`` nights; the domain rule has no use for them (a holiday's night at home
    still has its zero intervals).
    """
    p = params or MeterAnomalyParams()
    if p.leak_rule == LEAK_RULE_FLOOR_RISE:
        return floor_rise(intervals, meters, p, previous_alerts, holidays=holidays)
    frame = prepare_intervals(intervals, meters, p)
    seen = pl.lit(True) if p.leak_use_estimated else pl.col("flag") != "E"
    frame = _openable(frame, ~pl.col("zero") & seen, LEAK_CONTINUOUS, p, previous_alerts)
    frame, night = _night_mask(frame, meters, p)
    cond = frame.select(
        "subject_id",
        "start",
        "end",
        (~pl.col("zero") & seen).alias("active"),
        pl.when(night & seen).then(pl.col("rate")).alias("night_rate"),
        pl.when(seen).then(pl.col("rate")).alias("rate"),
        pl.when(seen).then(pl.col("volume")).alias("volume"),
        pl.lit(1.0).alias("one"),
    )
    evidence = [
        Evidence("min_night_flow_m3h", "night_rate", "min"),
        Evidence("min_flow_m3h", "rate", "min"),
        Evidence("max_flow_m3h", "rate", "max"),
        Evidence("volume_m3", "volume", "sum"),
        Evidence("intervals", "one", "sum", digits=0),
    ]
    return update_episodes(
        cond,
        code=LEAK_CONTINUOUS,
        params=p.episode_params(LEAK_CONTINUOUS),
        evidence=evidence,
        previous=previous_alerts,
        severity=p.severity[LEAK_CONTINUOUS],
        accept=pl.col("min_night_flow_m3h") >= p.leak_night_floor_m3h,
    )


NIGHT_FLOORS = {
    "subject_id": pl.String,
    "night_start": UTC_TS,
    "night_end": UTC_TS,
    "floor_m3h": pl.Float64,
}


def night_floors(
    intervals: pl.DataFrame,
    meters: pl.DataFrame,
    params: MeterAnomalyParams | None = None,
    *,
    holidays: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Each meter's night floor (``NIGHT_FLOORS``): the lowest hourly flow of each local night.

    Hourly, not per interval: a building's 15-minute flow can touch zero between two draws while
    its hourly flow shows the water that never stops. Estimated intervals are not evidence; a
    night whose actual intervals cover less than ``floor_min_coverage`` of the window is left
    out. Night rows of a meter less than six hours apart are one night, so a window that crosses
    UTC midnight stays one night.

    The nights of the meter's public holidays (``holidays``: ``meter_id, day``, the day a date or
    days since 1970-01-01 as ``pipelines.estimation.meter_holidays`` gives them) are left out
    too, like a night without data: residents at home use water later into the night, so such a
    night's floor says nothing about the building's normal floor. A night is named by the local
    date of its morning, as the DMA night flow names it (for the default 00-05 h window, the date
    of its samples): Christmas Day's night is the one that ends on the morning of the 25th.
    """
    p = params or MeterAnomalyParams()
    frame = prepare_intervals(intervals, meters, p)
    frame, night = _night_mask(frame, meters, p)
    window_h = (p.night_end_hour - p.night_start_hour) % 24 or 24
    rows = frame.filter(night & (pl.col("flag") != "E")).select(
        "subject_id", "start", "end", "volume", "hours"
    )
    subj, start = pl.col("subject_id"), pl.col("start")
    new_night = (subj != subj.shift(1)) | ((start - start.shift(1)) > timedelta(hours=6))
    hourly = (
        rows.with_columns(_night=new_night.fill_null(True).cum_sum())
        .group_by("subject_id", "_night", start.dt.truncate("1h").alias("_hour"))
        .agg(pl.col("volume").sum(), pl.col("hours").sum(), start.min(), pl.col("end").max())
    )
    return (
        hourly.group_by("subject_id", "_night")
        .agg(
            pl.col("start").min().alias("night_start"),
            pl.col("end").max().alias("night_end"),
            (pl.col("volume") / pl.col("hours")).min().alias("floor_m3h"),
            pl.col("hours").sum().alias("_covered"),
        )
        .filter(pl.col("_covered") >= p.floor_min_coverage * window_h)
        .select(list(NIGHT_FLOORS))
        .pipe(_without_holidays, meters, holidays, p)
        .sort("subject_id", "night_start")
    )


def _holiday_days(holidays: pl.DataFrame | None) -> pl.DataFrame:
    """``meter_id, day`` (days since 1970-01-01, Int64) of a holidays frame whose ``day`` is a
    date or already a day number; empty without one."""
    empty = pl.DataFrame(schema={"meter_id": pl.String, "day": pl.Int64})
    if holidays is None or holidays.height == 0:
        return empty
    day = pl.col("day")
    if holidays.schema["day"] == pl.Date:
        day = day.cast(pl.Int32)
    return holidays.select(pl.col("meter_id").cast(pl.String), day.cast(pl.Int64)).unique()


def _without_holidays(
    floors: pl.DataFrame,
    meters: pl.DataFrame,
    holidays: pl.DataFrame | None,
    p: MeterAnomalyParams,
) -> pl.DataFrame:
    """``floors`` less the nights whose morning is one of the meter's holidays.

    The night's date is taken from its first row in the meter's own zone (``meters.timezone``,
    else ``p.timezone``, as the night window itself): the local date of that row, or the next
    date when the window crosses midnight and the row is before it."""
    days = _holiday_days(holidays)
    if days.height == 0 or floors.height == 0:
        return floors
    zones = meter_timezones(meters, None, p.timezone)
    local = with_meter_local_time(
        floors.with_columns(pl.col("subject_id").alias("meter_id")),
        "night_start",
        zones,
        "_local",
        p.timezone,
    )
    day = pl.col("_local").dt.date().cast(pl.Int32).cast(pl.Int64)
    if p.night_start_hour > p.night_end_hour:  # e.g. 22-05 h: the evening's night is tomorrow's
        day = day + (pl.col("_local").dt.hour() >= p.night_start_hour).cast(pl.Int64)
    return (
        local.with_columns(_day=day)
        .join(days, left_on=["subject_id", "_day"], right_on=["meter_id", "day"], how="anti")
        .select(list(NIGHT_FLOORS))
    )


def floor_rise(
    intervals: pl.DataFrame,
    meters: pl.DataFrame,
    params: MeterAnomalyParams | None = None,
    previous_alerts: pl.DataFrame | None = None,
    *,
    holidays: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """LEAK_CONTINUOUS judged against the meter's own history: a new, sustained rise of its
    night floor.

    A building meter's flow never stops, so the domain rule (no zero interval for 24 h) holds
    every day; what a leak changes is the floor under which its night flow no longer falls. Each
    night's floor (:func:`night_floors`) is compared with the median floor of the previous
    ``floor_baseline_nights`` normal nights; it is above when it exceeds that median by the
    largest of ``floor_rise_min_m3h``, ``floor_rise_rel`` x median and ``floor_rise_mad_k``
    robust standard deviations. ``floor_rise_nights`` consecutive nights above open the episode
    at the first of them; the baseline is then frozen (leak nights never become normal) until a
    floor falls back under median + half the threshold (a repair), which ends it. An open stored
    alert that began before the window resumes with its stored baseline, so a leak older than the
    loaded history stays open. The sequential scan runs only on meters whose floor could rise at
    all (a superset found column-wise) and those with a stored alert.

    Public holidays (``holidays``: each meter's DMA's, ``meter_id, day``) are skipped. A block of
    them (Christmas, a holiday next to a weekend) is three or more nights in a row with residents
    at home and up late, which is exactly what a sustained rise looks like; and a holiday night
    in the baseline would lift it. So a holiday night is treated as a night without data
    (:func:`night_floors` leaves it out): it neither counts towards the consecutive nights nor
    enters the baseline, and it does not break a run either: a leak that starts two nights before
    Christmas keeps its run across the holiday, opens on the next ordinary night and is dated at
    its first night. While a rise is open, a holiday night neither closes it nor adds to its
    evidence. Weekend nights are judged like any other, unlike in the DMA leak-event detector
    (which judges every single night against a noise of about 1 % of MNF, so a weekend's
    different night would read as a step there): this rule takes a building's *lowest* hour of
    the night, which people at home late on a Saturday barely move; a weekend is two nights,
    fewer than ``floor_rise_nights``; and the baseline is a median of two weeks, so its four
    weekend nights cannot shift it. Skipping them would drop two nights in seven of a leak's
    evidence and date a leak that starts on a Friday night at the Monday. (A class that sets
    ``floor_rise_nights`` to 2 should keep that in mind.)
    """
    p = params or MeterAnomalyParams()
    floors = night_floors(intervals, meters, p, holidays=holidays)
    stored = _stored_floor_baselines(previous_alerts, floors)
    # Superset: the rolling median of the previous nights (unfrozen) plus the two fixed parts of
    # the threshold; the MAD part can only raise it.
    base = (
        pl.col("floor_m3h")
        .shift(1)
        .rolling_median(p.floor_baseline_nights, min_samples=p.floor_min_baseline_nights)
        .over("subject_id")
    )
    above = pl.col("floor_m3h") > base + pl.max_horizontal(
        pl.lit(p.floor_rise_min_m3h), p.floor_rise_rel * base
    )
    candidates = floors.filter(above.fill_null(False)).get_column("subject_id").unique().to_list()
    scan = set(candidates) | set(stored) | set(_subjects_of(previous_alerts, LEAK_CONTINUOUS))
    sub = floors.filter(pl.col("subject_id").is_in(sorted(scan)))
    state = _scan_floors(sub, stored, p)
    cond = sub.with_columns(state).select(
        "subject_id",
        pl.col("night_start").alias("start"),
        pl.col("night_end").alias("end"),
        pl.col("_active").alias("active"),
        "floor_m3h",
        pl.col("_baseline").alias("baseline"),
        (pl.col("floor_m3h") - pl.col("_baseline")).alias("rise"),
        pl.lit(1.0).alias("one"),
        pl.lit(LEAK_RULE_FLOOR_RISE).alias("rule"),
    )
    if cond.height == 0:
        cond = cond.with_columns(pl.col("start").cast(UTC_TS), pl.col("end").cast(UTC_TS))
    evidence = [
        Evidence("rule", "rule", "first", dtype=pl.String),
        Evidence("baseline_floor_m3h", "baseline", "first"),
        Evidence("min_night_floor_m3h", "floor_m3h", "min"),
        Evidence("max_night_floor_m3h", "floor_m3h", "max"),
        Evidence("min_rise_m3h", "rise", "min"),
        Evidence("sum_rise_m3h", "rise", "sum"),  # / nights: the leak's size
        Evidence("nights", "one", "sum", digits=0),
    ]
    # Episodes are whole nights and already sustained: no further minimum duration.
    return update_episodes(
        cond,
        code=LEAK_CONTINUOUS,
        params=EpisodeParams(timedelta(0), timedelta(0)),
        evidence=evidence,
        previous=previous_alerts,
        severity=p.severity[LEAK_CONTINUOUS],
    )


def _stored_floor_baselines(
    previous_alerts: pl.DataFrame | None, floors: pl.DataFrame
) -> dict[str, float]:
    """Baseline floor of each open floor-rise alert that began before the meter's first night.

    ``floors`` are the nights the scan sees (holidays already left out), so "before" agrees with
    the episode machinery, whose window starts at the same first night."""
    if previous_alerts is None or previous_alerts.height == 0 or floors.height == 0:
        return {}
    first = floors.group_by("subject_id").agg(pl.col("night_start").min().alias("_first"))
    ev = pl.col("evidence")
    rows = (
        previous_alerts.filter(
            (pl.col("code") == LEAK_CONTINUOUS)
            & (pl.col("status") == "open")
            & (ev.str.json_path_match("$.rule") == LEAK_RULE_FLOOR_RISE)
        )
        .join(first, on="subject_id", how="inner")
        .filter(pl.col("start_ts") < pl.col("_first"))
        .select(
            "subject_id",
            ev.str.json_path_match("$.baseline_floor_m3h")
            .cast(pl.Float64, strict=False)
            .alias("b"),
        )
        .drop_nulls()
    )
    return dict(zip(rows["subject_id"].to_list(), rows["b"].to_list(), strict=True))


def _scan_floors(
    floors: pl.DataFrame, stored: Mapping[str, float], p: MeterAnomalyParams
) -> list[pl.Series]:
    """Per night of ``floors`` (sorted by meter, night): ``_active`` and the ``_baseline`` used.

    Sequential per meter because the baseline freezes while a rise is open; run only on the few
    meters :func:`floor_rise` selects.
    """
    n = floors.height
    active = np.zeros(n, dtype=bool)
    baseline = np.full(n, np.nan)
    ids = floors.get_column("subject_id").to_list()
    vals = floors.get_column("floor_m3h").to_numpy()
    i = 0
    while i < n:
        j = i
        while j < n and ids[j] == ids[i]:
            j += 1
        _scan_meter(vals[i:j], stored.get(ids[i]), p, active[i:j], baseline[i:j])
        i = j
    return [
        pl.Series("_active", active, dtype=pl.Boolean),
        pl.Series("_baseline", baseline, dtype=pl.Float64, nan_to_null=True),
    ]


def _scan_meter(
    vals: np.ndarray,
    resume: float | None,
    p: MeterAnomalyParams,
    active: np.ndarray,
    baseline: np.ndarray,
) -> None:
    """One meter's nights; fills ``active`` and ``baseline`` in place."""
    hist: list[float] = []
    pending: list[int] = []
    frozen: tuple[float, float] | None = None  # (median, threshold) while a rise is open
    if resume is not None:
        frozen = (resume, max(p.floor_rise_min_m3h, p.floor_rise_rel * resume))
    for k, f in enumerate(vals.tolist()):
        if frozen is not None:
            med, thr = frozen
            if f > med + thr / 2:
                active[k], baseline[k] = True, med
                continue
            frozen = None  # repaired: this night is normal again
            hist.append(f)
            continue
        if len(hist) < p.floor_min_baseline_nights:
            hist.append(f)
            continue
        window = np.asarray(hist[-p.floor_baseline_nights :])
        med = float(np.median(window))
        mad = 1.4826 * float(np.median(np.abs(window - med)))
        thr = max(p.floor_rise_min_m3h, p.floor_rise_rel * med, p.floor_rise_mad_k * mad)
        baseline[k] = med
        if f > med + thr:
            pending.append(k)
            if len(pending) >= p.floor_rise_nights:
                active[pending] = True
                baseline[pending] = med
                pending = []
                frozen = (med, thr)
            continue
        hist.extend(float(vals[q]) for q in pending)
        pending = []
        hist.append(f)


def burst(
    intervals: pl.DataFrame,
    meters: pl.DataFrame,
    params: MeterAnomalyParams | None = None,
    previous_alerts: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """BURST: flow of at least k x the meter's own baseline and at least a share of Q3, sustained.

    "Near Q3" is checked first because it is cheap and rare; the baseline (daily mean flow over the
    previous days, so a burst does not raise its own baseline) is computed only for the few meters
    that pass it. A meter without Q3 in METERS cannot be judged and raises nothing.
    """
    p = params or MeterAnomalyParams()
    frame = prepare_intervals(intervals, meters, p)
    frame = _with_meter_attrs(frame, meters, {"q3": "_q3"})
    # A burst is near Q3 throughout, so only meters near Q3 for the minimum duration can have one.
    near_q3 = pl.col("rate") >= p.burst_q3_fraction * pl.col("_q3")
    sub = _openable(frame, near_q3, BURST, p, previous_alerts)

    daily = (
        sub.group_by("subject_id", pl.col("end").dt.date().alias("day"))
        .agg(pl.col("volume").sum(), pl.col("hours").sum())
        .with_columns(day_rate=pl.col("volume") / pl.col("hours"))
        .sort("subject_id", "day")
    )
    daily = daily.with_columns(
        _trail=pl.col("day_rate")
        .rolling_mean_by("day", window_size=f"{p.burst_baseline_days}d", closed="left")
        .over("subject_id"),
        _median=pl.col("day_rate").median().over("subject_id"),
    ).select("subject_id", "day", pl.coalesce("_trail", "_median").alias("baseline"))
    sub = sub.with_columns(day=pl.col("end").dt.date()).join(
        daily, on=["subject_id", "day"], how="left", maintain_order="left"
    )
    active = (
        (pl.col("rate") >= p.burst_q3_fraction * pl.col("_q3"))
        & (pl.col("rate") >= p.burst_k * pl.col("baseline"))
    ).fill_null(False)
    cond = sub.select(
        "subject_id",
        "start",
        "end",
        active.alias("active"),
        "rate",
        "volume",
        "baseline",
        pl.col("_q3").alias("q3"),
        pl.lit(1.0).alias("one"),
    )
    evidence = [
        Evidence("max_flow_m3h", "rate", "max"),
        Evidence("volume_m3", "volume", "sum"),
        Evidence("baseline_m3h", "baseline", "first"),
        Evidence("q3_m3h", "q3", "first"),
        Evidence("intervals", "one", "sum", digits=0),
    ]
    return _episodes(cond, BURST, evidence, p, previous_alerts)


def reverse_flow(
    intervals: pl.DataFrame,
    meters: pl.DataFrame,
    params: MeterAnomalyParams | None = None,
    previous_alerts: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """REVERSE_FLOW: a negative interval volume or the vendor's reverse-flow bit."""
    p = params or MeterAnomalyParams()
    frame = prepare_intervals(intervals, meters, p)
    negative = pl.col("volume") < -p.reverse_volume_m3
    flagged = _bit(QUALITY_REVERSE_FLOW)
    frame = _openable(frame, negative | flagged, REVERSE_FLOW, p, previous_alerts)
    cond = frame.select(
        "subject_id",
        "start",
        "end",
        (negative | flagged).fill_null(False).alias("active"),
        (-pl.col("volume")).clip(lower_bound=0.0).alias("reverse_volume"),
        "volume",
        flagged.cast(pl.Float64).alias("flagged"),
        pl.lit(1.0).alias("one"),
    )
    evidence = [
        Evidence("reverse_volume_m3", "reverse_volume", "sum"),
        Evidence("min_volume_m3", "volume", "min"),
        Evidence("flagged_intervals", "flagged", "sum", digits=0),
        Evidence("intervals", "one", "sum", digits=0),
    ]
    return _episodes(cond, REVERSE_FLOW, evidence, p, previous_alerts)


def stuck_meter(
    intervals: pl.DataFrame,
    meters: pl.DataFrame,
    params: MeterAnomalyParams | None = None,
    previous_alerts: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """STUCK_METER: zero consumption for N days on an active account that used water before.

    An account is active when METERS has an account for the meter (and ``active`` is not false,
    when that column is given). "Used water before" means the meter registered at least
    ``stuck_prior_use_m3`` earlier in the input, so an empty flat never raises it; the episode
    starts at the first zero interval after the last use.
    """
    p = params or MeterAnomalyParams()
    frame = prepare_intervals(intervals, meters, p)
    # One flag per meter, spread to its rows (not the account strings themselves).
    account = pl.col("account").is_not_null()
    if "active" in meters.columns:
        account = account & pl.col("active").fill_null(True)
    flags = meters.select("meter_id", account.alias("_active_account"))
    frame = _with_meter_attrs(frame, flags, {"_active_account": "_active_account"})
    active_account = pl.col("_active_account").fill_null(False)
    # Zero flow on an active account for the minimum duration is necessary; the running total
    # is then needed on those meters only.
    frame = _openable(frame, pl.col("zero") & active_account, STUCK_METER, p, previous_alerts)
    used = pl.col("volume").clip(lower_bound=0.0).fill_null(0.0).cum_sum().over("_sidx")
    cond = frame.select(
        "subject_id",
        "start",
        "end",
        (pl.col("zero") & (used >= p.stuck_prior_use_m3) & active_account)
        .fill_null(False)
        .alias("active"),
        used.alias("used_before"),
        pl.lit(1.0).alias("one"),
    )
    evidence = [
        Evidence("used_before_m3", "used_before", "first"),
        Evidence("zero_intervals", "one", "sum", digits=0),
    ]
    return _episodes(cond, STUCK_METER, evidence, p, previous_alerts)


def tamper(
    intervals: pl.DataFrame,
    meters: pl.DataFrame,
    params: MeterAnomalyParams | None = None,
    previous_alerts: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """TAMPER: the vendor's tamper / magnetic-interference bit."""
    p = params or MeterAnomalyParams()
    return _status_bit(
        prepare_intervals(intervals, meters, p), TAMPER, QUALITY_TAMPER, p, previous_alerts
    )


def low_battery(
    intervals: pl.DataFrame,
    meters: pl.DataFrame,
    params: MeterAnomalyParams | None = None,
    previous_alerts: pl.DataFrame | None = None,
    *,
    voltages: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """LOW_BATTERY: the vendor's low-battery bit, or the last reported voltage under the threshold.

    ``voltages`` (``meter_id, ts, voltage``) is matched to each interval as the latest voltage
    reported at or before the interval's end.
    """
    p = params or MeterAnomalyParams()
    frame = prepare_intervals(intervals, meters, p)
    low_voltage: pl.Expr = pl.lit(False)
    if voltages is not None and voltages.height and p.low_battery_voltage_v is not None:
        volts = voltages.select(
            pl.col("meter_id").alias("subject_id"),
            pl.col("ts").cast(UTC_TS).alias("end"),
            pl.col("voltage").cast(pl.Float64),
        ).sort("end")
        with_v = frame.filter(pl.col("subject_id").is_in(volts.get_column("subject_id").implode()))
        without_v = frame.filter(
            ~pl.col("subject_id").is_in(volts.get_column("subject_id").implode())
        )
        with_v = with_v.sort("end").join_asof(
            volts, on="end", by="subject_id", strategy="backward", check_sortedness=False
        )
        frame = pl.concat(
            [with_v, without_v.with_columns(voltage=pl.lit(None, dtype=pl.Float64))],
            how="vertical",
        ).sort("subject_id", "end")
        low_voltage = (pl.col("voltage") < p.low_battery_voltage_v).fill_null(False)
    else:
        frame = frame.with_columns(voltage=pl.lit(None, dtype=pl.Float64))
    flagged = _bit(QUALITY_LOW_BATTERY)
    cond = frame.select(
        "subject_id",
        "start",
        "end",
        (flagged | low_voltage).alias("active"),
        flagged.cast(pl.Float64).alias("flagged"),
        "voltage",
    )
    evidence = [
        Evidence("flagged_intervals", "flagged", "sum", digits=0),
        Evidence("min_voltage_v", "voltage", "min", digits=3),
    ]
    return _episodes(cond, LOW_BATTERY, evidence, p, previous_alerts)


def comms_loss(
    reads: pl.DataFrame,
    meters: pl.DataFrame,
    params: MeterAnomalyParams | None = None,
    as_of: datetime | None = None,
    previous_alerts: pl.DataFrame | None = None,
    *,
    window_start: datetime | None = None,
) -> pl.DataFrame:
    """COMMS_LOSS: no uplink for more than ``comms_missed_periods`` expected reporting periods.

    ``reads`` holds ``meter_id, ts`` of received uplinks (or actual reads). Each silence between two
    uplinks, and the silence from the last uplink up to ``as_of``, is a span; a span longer than the
    limit is an episode from the last uplink (within one period of the first missed one) to the
    uplink that ended it, or open while the meter is still silent. A meter of ``meters`` with no
    read at all is silent since ``window_start`` (default: the earliest read in ``reads``).
    """
    p = params or MeterAnomalyParams()
    frame = reads.select(pl.col("meter_id").alias("subject_id"), pl.col("ts").cast(UTC_TS))
    if as_of is None:
        last = frame.get_column("ts").max()
        if not isinstance(last, datetime):
            return update_episodes(
                _empty_conditions(), code=COMMS_LOSS, params=p.episode_params(COMMS_LOSS)
            )
        as_of = last
    at = pl.lit(as_of).cast(UTC_TS)
    frame = sorted_by_subject(frame.filter(pl.col("ts") <= at), "ts")
    subj, ts = pl.col("subject_id"), pl.col("ts")
    frame = frame.filter(((subj != subj.shift(1)) | (ts != ts.shift(1))).fill_null(True))
    if window_start is None:
        first = frame.get_column("ts").min()
        window_start = first if isinstance(first, datetime) else None
    silent = meters.select(pl.col("meter_id").alias("subject_id")).join(
        frame.select("subject_id").unique(), on="subject_id", how="anti"
    )
    spans = frame.select(
        "subject_id",
        pl.col("ts").alias("start"),
        pl.when(subj == subj.shift(-1)).then(ts.shift(-1)).otherwise(at).alias("end"),
    )
    if window_start is not None and silent.height:
        spans = pl.concat(
            [
                spans,
                silent.select(
                    "subject_id",
                    pl.lit(window_start).cast(UTC_TS).alias("start"),
                    at.alias("end"),
                ).filter(pl.col("start") <= pl.col("end")),
            ],
            how="vertical",
        )
    limit = p.reporting_period * p.comms_missed_periods
    period_h = p.reporting_period.total_seconds() / 3600.0
    silent_h = (pl.col("end") - pl.col("start")).dt.total_seconds(fractional=True) / 3600.0
    cond = spans.select(
        "subject_id",
        "start",
        "end",
        ((pl.col("end") - pl.col("start")) > limit).alias("active"),
        silent_h.alias("silent_h"),
        (silent_h / period_h).floor().alias("missed"),
        pl.lit(period_h).alias("period_h"),
    )
    evidence = [
        Evidence("silent_h", "silent_h", "max", digits=3),
        Evidence("missed_periods", "missed", "max", digits=0),
        Evidence("expected_period_h", "period_h", "first", digits=3),
    ]
    return _episodes(cond, COMMS_LOSS, evidence, p, previous_alerts)


def over_capacity(
    intervals: pl.DataFrame,
    meters: pl.DataFrame,
    params: MeterAnomalyParams | None = None,
    previous_alerts: pl.DataFrame | None = None,
    *,
    failures: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """OVER_CAPACITY: interval volume above Q4 x interval hours (meter beyond its overload flow).

    With ``failures`` (VEE_FAILURES), an interval whose closing read VEE failed as ``OVER_Q4`` is
    over capacity too, whatever volume estimation later put in its place; its evidence volume is
    the one VEE saw.
    """
    p = params or MeterAnomalyParams()
    frame = prepare_intervals(intervals, meters, p)
    frame = _with_meter_attrs(frame, meters, {"q4": "_q4"})
    q4 = pl.col("_q4")
    limit = p.over_capacity_factor * q4 * pl.col("hours")
    volume = pl.col("volume")
    over = volume > limit
    dropped = None
    if failures is not None and failures.height:
        dropped = (
            failures.filter(pl.col("rule") == _VEE_OVER_Q4)
            .group_by(
                pl.col("meter_id").alias("subject_id"), pl.col("ts").cast(UTC_TS).alias("end")
            )
            .agg(pl.col("value").max().alias("_vee_volume"))
        )
    also = None if dropped is None else dropped.get_column("subject_id")
    frame = _openable(frame, over, OVER_CAPACITY, p, previous_alerts, also=also)
    if dropped is not None:
        frame = frame.join(dropped, on=["subject_id", "end"], how="left", maintain_order="left")
        over = over | pl.col("_vee_volume").is_not_null()
        volume = pl.coalesce("_vee_volume", "volume")
    cond = frame.select(
        "subject_id",
        "start",
        "end",
        over.fill_null(False).alias("active"),
        volume.alias("volume"),
        (volume / pl.col("hours")).alias("rate"),
        q4.alias("q4"),
        pl.lit(1.0).alias("one"),
    )
    evidence = [
        Evidence("max_volume_m3", "volume", "max"),
        Evidence("max_flow_m3h", "rate", "max"),
        Evidence("q4_m3h", "q4", "first"),
        Evidence("intervals", "one", "sum", digits=0),
    ]
    return _episodes(cond, OVER_CAPACITY, evidence, p, previous_alerts)


def meter_age(
    meters: pl.DataFrame,
    params: MeterAnomalyParams | None = None,
    as_of: datetime | None = None,
    previous_alerts: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """METER_AGE: a residential meter of DN25 or less older than its service life at ``as_of``.

    The episode starts on the due date (install date + service life, midnight UTC), so its identity
    does not move from run to run; when the meter is exchanged (a new install date) the stored
    alert closes.
    """
    p = params or MeterAnomalyParams()
    at_dt = as_of or datetime.now().astimezone()
    at = pl.lit(at_dt).cast(UTC_TS)
    installed = pl.col("install_date").cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    due = (
        pl.col("install_date")
        .dt.offset_by(f"{p.service_life_years}y")
        .cast(pl.Datetime("us"))
        .dt.replace_time_zone("UTC")
    )
    eligible = (
        pl.col("customer_type").is_in(list(p.service_life_customer_types))
        & (pl.col("dn") <= p.service_life_max_dn)
    ).fill_null(False)
    is_due = eligible & (due <= at)
    age_years = (at - installed).dt.total_seconds(fractional=True) / (365.25 * 86400.0)
    cond = (
        meters.filter(pl.col("install_date").is_not_null())
        .select(
            pl.col("meter_id").alias("subject_id"),
            pl.when(is_due).then(due).otherwise(installed).alias("start"),
            at.alias("end"),
            is_due.alias("active"),
            pl.col("install_date").dt.to_string("%Y-%m-%d").alias("install_date"),
            age_years.alias("age_years"),
            pl.col("dn").cast(pl.Float64).alias("dn"),
            pl.lit(float(p.service_life_years)).alias("life"),
        )
        .filter(pl.col("start") <= pl.col("end"))
    )
    evidence = [
        Evidence("install_date", "install_date", "first", dtype=pl.String),
        Evidence("age_years", "age_years", "max", digits=2),
        Evidence("dn", "dn", "first", digits=0),
        Evidence("service_life_years", "life", "first", digits=0),
    ]
    return _episodes(cond, METER_AGE, evidence, p, previous_alerts)


# --- internals ---------------------------------------------------------------------------------


def _bit(mask: int) -> pl.Expr:
    return (pl.col("quality").cast(pl.Int32) & mask) != 0


def _status_bit(
    frame: pl.DataFrame,
    code: str,
    mask: int,
    p: MeterAnomalyParams,
    previous_alerts: pl.DataFrame | None,
) -> pl.DataFrame:
    frame = _openable(frame, _bit(mask), code, p, previous_alerts)
    cond = frame.select(
        "subject_id", "start", "end", _bit(mask).alias("active"), pl.lit(1.0).alias("one")
    )
    return update_episodes(
        cond,
        code=code,
        params=p.episode_params(code),
        evidence=[Evidence("flagged_intervals", "one", "sum", digits=0)],
        previous=previous_alerts,
        severity=p.severity[code],
    )


def _with_meter_attrs(
    frame: pl.DataFrame, meters: pl.DataFrame, columns: Mapping[str, str]
) -> pl.DataFrame:
    """Add METERS columns (``{meters column: new name}``) to prepared intervals.

    Looked up once per meter and spread to its rows by position (``_sidx``), instead of hashing
    28 M meter ids in a join.
    """
    first_rows = pl.col("_sidx") != pl.col("_sidx").shift(1)
    heads = frame.filter(first_rows.fill_null(True)).select("_sidx", "subject_id")
    table = meters.select("meter_id", *columns).unique("meter_id", keep="last")
    small = heads.join(
        table, left_on="subject_id", right_on="meter_id", how="left", maintain_order="left"
    )
    size = int(heads.select(pl.col("_sidx").max().fill_null(0)).item()) + 1
    positions = small.get_column("_sidx")
    index = frame.get_column("_sidx")
    added = []
    for source, name in columns.items():
        lookup = pl.Series(name, [None] * size, dtype=meters.schema[source])
        lookup = lookup.scatter(positions, small.get_column(source))
        added.append(lookup.gather(index).alias(name))
    return frame.with_columns(added)


def _night_mask(
    frame: pl.DataFrame, meters: pl.DataFrame, p: MeterAnomalyParams
) -> tuple[pl.DataFrame, pl.Expr]:
    """Interval starts within the local night window, per meter time zone."""

    def hour_in(tz: str) -> pl.Expr:
        hour = pl.col("start").dt.convert_time_zone(tz).dt.hour()
        if p.night_start_hour <= p.night_end_hour:
            return (hour >= p.night_start_hour) & (hour < p.night_end_hour)
        return (hour >= p.night_start_hour) | (hour < p.night_end_hour)

    if "timezone" not in meters.columns:
        return frame, hour_in(p.timezone)
    zones = sorted({z for z in meters.get_column("timezone").unique().to_list() if z})
    # Each row's local hour in its own zone only: a when/then chain over the zones would convert
    # every row to every zone (time-zone conversion is the dearest step of this detector). Rows
    # get their meter's zone as a small number (no string per row); the rows of each zone (and
    # the default zone for meters without one) are converted on their own and put back by
    # position.
    codes = meters.select(
        "meter_id",
        pl.col("timezone")
        .replace_strict(zones, list(range(len(zones))), default=None, return_dtype=pl.Int32)
        .alias("_zc"),
    )
    rows = _with_meter_attrs(frame.select("_sidx", "subject_id"), codes, {"_zc": "_zc"}).select(
        pl.int_range(pl.len(), dtype=pl.UInt32).alias("_i"), "_zc", frame.get_column("start")
    )
    parts = [
        rows.filter(pl.col("_zc") == k).select("_i", hour_in(zone).alias("_night"))
        for k, zone in enumerate(zones)
    ]
    parts.append(
        rows.filter(pl.col("_zc").is_null()).select("_i", hour_in(p.timezone).alias("_night"))
    )
    hits = pl.concat(parts, how="vertical")
    night = pl.repeat(None, frame.height, dtype=pl.Boolean, eager=True).alias("_night")
    night = night.scatter(hits.get_column("_i"), hits.get_column("_night"))
    return frame.with_columns(night), pl.col("_night")


def _subjects_of(previous: pl.DataFrame | None, code: str) -> pl.Series:
    if previous is None or previous.height == 0:
        return pl.Series("subject_id", [], dtype=pl.String)
    return previous.filter(pl.col("code") == code).get_column("subject_id").unique()


def _empty_conditions() -> pl.DataFrame:
    return pl.DataFrame(
        schema={"subject_id": pl.String, "start": UTC_TS, "end": UTC_TS, "active": pl.Boolean}
    )
