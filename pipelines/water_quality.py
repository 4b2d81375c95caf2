"""Water-quality alerts from online analysers: limit excursions, stuck probes and drifting probes.

Three questions an operator asks of an analyser, each answered as alert episodes (one alert per
episode, via :mod:`pipelines.episodes`) from ``schemas.SENSOR_VALUES``:

* ``WQ_LIMIT`` - is the water outside the GB 5749-2022 limits? Limits depend on the quantity and on
  where the analyser sits (free chlorine has a 0.3-2 mg/L band at the plant outlet but only a
  0.05 mg/L floor in the network), so each limit is a :class:`QualityLimit` keyed by quantity and
  location.
* ``SENSOR_FLATLINE`` - has the probe stopped moving? Real chlorine, pH or turbidity always jitters;
  a value that does not change for hours is a frozen probe or a frozen data path, and its readings
  must not be trusted as "compliant".
* ``SENSOR_DRIFT`` - is the probe creeping? A steady slope of the daily median over a week is more
  often a fouled or uncalibrated probe than the water changing; it asks for a calibration visit.

A sensor channel is identified per quantity (one sonde reports several), so the alert subject is
``"<sensor_id>:<quantity>"`` (:func:`subject_of`). Readings with the BAD quality bit are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta

import polars as pl

from pipelines.episodes import EpisodeParams, Evidence, update_episodes, with_spans
from pipelines.schemas import UTC_TS

WQ_LIMIT = "WQ_LIMIT"
SENSOR_FLATLINE = "SENSOR_FLATLINE"
SENSOR_DRIFT = "SENSOR_DRIFT"
WQ_CODES = (WQ_LIMIT, SENSOR_FLATLINE, SENSOR_DRIFT)

QUALITY_BAD = 16  # protocols.uplink.Quality.BAD


@dataclass(frozen=True)
class QualityLimit:
    """Allowed range of one quantity at one kind of location (``"*"``: any location).

    A limit for the sensor's own location wins over the ``"*"`` one. ``None`` means no bound.
    """

    quantity: str
    location: str = "*"
    low: float | None = None
    high: float | None = None


#: GB 5749-2022 (Standards for drinking water quality), the online-measurable indicators: turbidity
#: at most 1 NTU, pH 6.5-8.5, free chlorine (quantity ``chlorine``) 0.3-2 mg/L leaving the plant and
#: at least 0.05 mg/L at the network's far end.
GB5749_LIMITS: tuple[QualityLimit, ...] = (
    QualityLimit("turbidity", "*", None, 1.0),
    QualityLimit("ph", "*", 6.5, 8.5),
    QualityLimit("chlorine", "plant_outlet", 0.3, 2.0),
    QualityLimit("chlorine", "network", 0.05, None),
)


def _default_flat_tolerance() -> dict[str, float]:
    # Display resolution of common analysers: a live probe changes by more than this within hours.
    return {"turbidity": 0.001, "ph": 0.001, "chlorine": 0.001, "conductivity": 0.1}


def _default_drift_slopes() -> dict[str, float]:
    # Per day; about a tenth of each quantity's working band moving in a day without cause.
    return {"turbidity": 0.1, "ph": 0.05, "chlorine": 0.05, "conductivity": 20.0}


@dataclass(frozen=True)
class WaterQualityParams:
    """Thresholds of the water-quality rules, with why each default is what it is."""

    limits: tuple[QualityLimit, ...] = GB5749_LIMITS
    default_location: str = "network"
    """Location of a sensor absent from the ``sensors`` frame: the stricter network floor would
    miss an outlet over-dose, but most analysers are in the network."""
    sample_period: timedelta = timedelta(minutes=5)
    """Nominal analyser sampling period (for a sensor's first sample and after a gap)."""
    max_gap: timedelta = timedelta(hours=1)
    """Samples further apart are a data gap, not one long sample."""

    limit_min_duration: timedelta = timedelta(minutes=15)
    """An excursion must last this long: a single spike is often an air bubble in the cell."""
    limit_quiet_time: timedelta = timedelta(minutes=30)

    flatline_window: timedelta = timedelta(hours=6)
    """No change for six hours: long enough for slow-moving chlorine to have moved."""
    flatline_tolerance: Mapping[str, float] = field(default_factory=_default_flat_tolerance)
    """Per quantity, the largest step (and range over the episode) still counted as "no change"."""
    flatline_default_tolerance: float = 1e-9
    flatline_quantities: tuple[str, ...] = (
        "turbidity",
        "ph",
        "chlorine",
        "conductivity",
        "temperature",
        "dissolved_oxygen",
    )
    """Quantities expected to vary; states, set-points and counters may legitimately stay flat."""

    drift_window_days: int = 7
    """Slope of the daily median over this many days."""
    drift_min_days: int = 5
    """Days with a median needed in the window to fit a slope."""
    drift_min_samples_per_day: int = 12
    """A day with fewer samples has no reliable median."""
    drift_slope_per_day: Mapping[str, float] = field(default_factory=_default_drift_slopes)
    """Absolute slope (unit per day) above which a quantity is drifting; unlisted: not checked."""
    drift_quiet_time: timedelta = timedelta(days=2)
    """Two days back under the slope threshold end a drift episode."""

    severity: Mapping[str, str] = field(
        default_factory=lambda: {
            WQ_LIMIT: "major",
            SENSOR_FLATLINE: "warning",
            SENSOR_DRIFT: "info",
        }
    )


def subject_of(sensor_id: pl.Expr, quantity: pl.Expr) -> pl.Expr:
    """Alert subject of a sensor channel: ``"<sensor_id>:<quantity>"``."""
    return pl.concat_str([sensor_id, pl.lit(":"), quantity])


def detect_water_quality(
    values: pl.DataFrame,
    params: WaterQualityParams | None = None,
    previous_alerts: pl.DataFrame | None = None,
    sensors: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """All water-quality codes; ``sensors`` (``sensor_id, location``) places each analyser."""
    p = params or WaterQualityParams()
    parts = [
        wq_limits(values, p, previous_alerts, sensors),
        flatline(values, p, previous_alerts),
        drift(values, p, previous_alerts),
    ]
    return pl.concat(parts, how="vertical").sort("code", "subject_id", "start_ts")


def wq_limits(
    values: pl.DataFrame,
    params: WaterQualityParams | None = None,
    previous_alerts: pl.DataFrame | None = None,
    sensors: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """WQ_LIMIT: readings outside the limit of their quantity and location, sustained."""
    p = params or WaterQualityParams()
    frame = _prepared(values, p)
    if sensors is not None and "location" in sensors.columns:
        loc = sensors.select("sensor_id", "location").unique("sensor_id", keep="last")
        frame = frame.join(loc, on="sensor_id", how="left", maintain_order="left")
        frame = frame.with_columns(pl.col("location").fill_null(p.default_location))
    else:
        frame = frame.with_columns(location=pl.lit(p.default_location))
    limits = pl.DataFrame(
        [(lim.quantity, lim.location, lim.low, lim.high) for lim in p.limits],
        schema={
            "quantity": pl.String,
            "location": pl.String,
            "low": pl.Float64,
            "high": pl.Float64,
        },
        orient="row",
    )
    specific = limits.filter(pl.col("location") != "*").with_columns(_specific=pl.lit(True))
    generic = limits.filter(pl.col("location") == "*").drop("location")
    frame = (
        frame.join(specific, on=["quantity", "location"], how="left", maintain_order="left")
        .join(generic, on="quantity", how="left", suffix="_any", maintain_order="left")
        .with_columns(
            pl.when(pl.col("_specific")).then("low").otherwise("low_any").alias("low"),
            pl.when(pl.col("_specific")).then("high").otherwise("high_any").alias("high"),
        )
    )
    outside = (pl.col("value") < pl.col("low")).fill_null(False) | (
        pl.col("value") > pl.col("high")
    ).fill_null(False)
    cond = frame.select(
        "subject_id",
        "start",
        "end",
        outside.alias("active"),
        "value",
        "low",
        "high",
        "location",
        pl.lit(1.0).alias("one"),
    )
    evidence = [
        Evidence("max_value", "value", "max"),
        Evidence("min_value", "value", "min"),
        Evidence("limit_low", "low", "first"),
        Evidence("limit_high", "high", "first"),
        Evidence("location", "location", "first", dtype=pl.String),
        Evidence("samples", "one", "sum", digits=0),
    ]
    return update_episodes(
        cond,
        code=WQ_LIMIT,
        params=EpisodeParams(p.limit_min_duration, p.limit_quiet_time),
        evidence=evidence,
        previous=previous_alerts,
        severity=p.severity[WQ_LIMIT],
    )


def flatline(
    values: pl.DataFrame,
    params: WaterQualityParams | None = None,
    previous_alerts: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """SENSOR_FLATLINE: no change beyond the tolerance for at least ``flatline_window``.

    A sample is "unchanged" when it is within the tolerance of the previous one; its span runs from
    the previous sample, so a stretch of unchanged samples starts at the last sample that moved and
    its duration is how long the value stood still. The episode is kept only if the whole stretch
    stays within the tolerance (small steps adding up to a slow real trend are not a flatline).
    """
    p = params or WaterQualityParams()
    frame = _prepared(values, p).filter(pl.col("quantity").is_in(list(p.flatline_quantities)))
    tol = pl.col("quantity").replace_strict(
        list(p.flatline_tolerance.keys()),
        list(p.flatline_tolerance.values()),
        default=p.flatline_default_tolerance,
        return_dtype=pl.Float64,
    )
    step = (pl.col("value") - pl.col("value").shift(1).over("subject_id")).abs()
    cond = frame.with_columns(tol=tol).select(
        "subject_id",
        "start",
        "end",
        (step <= pl.col("tol")).fill_null(False).alias("active"),
        "value",
        "tol",
        pl.lit(1.0).alias("one"),
    )
    evidence = [
        Evidence("value", "value", "last"),
        Evidence("min_value", "value", "min"),
        Evidence("max_value", "value", "max"),
        Evidence("tolerance", "tol", "first", digits=9),
        Evidence("samples", "one", "sum", digits=0),
    ]
    return update_episodes(
        cond,
        code=SENSOR_FLATLINE,
        params=EpisodeParams(p.flatline_window, timedelta(0)),
        evidence=evidence,
        previous=previous_alerts,
        severity=p.severity[SENSOR_FLATLINE],
        accept=(pl.col("max_value") - pl.col("min_value")) <= pl.col("tolerance"),
    )


def daily_medians(values: pl.DataFrame, params: WaterQualityParams | None = None) -> pl.DataFrame:
    """Median and sample count per sensor channel and UTC day (the drift detector's input).

    A daily median shrugs off the spikes and dips of normal operation, so what is left moving over
    days is the probe or the water; UTC days suffice because only the trend matters here.
    """
    p = params or WaterQualityParams()
    return (
        _prepared(values, p)
        .group_by("subject_id", "quantity", pl.col("ts").dt.date().alias("day"))
        .agg(pl.col("value").median().alias("median"), pl.len().alias("samples"))
        .filter(pl.col("samples") >= p.drift_min_samples_per_day)
        .sort("subject_id", "day")
    )


def drift(
    values: pl.DataFrame,
    params: WaterQualityParams | None = None,
    previous_alerts: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """SENSOR_DRIFT: least-squares slope of the daily median over ``drift_window_days`` too steep.

    The slope for day d uses the medians of days (d - window, d]; rolling sums give it for every
    day at once. Each day is a span [00:00, 24:00) UTC, so the episode starts on the first day whose
    window shows the drift.
    """
    p = params or WaterQualityParams()
    med = daily_medians(values, p).filter(
        pl.col("quantity").is_in(list(p.drift_slope_per_day.keys()))
    )
    # x in days since each channel's first day keeps the sums small (no cancellation).
    x = (pl.col("day") - pl.col("day").min().over("subject_id")).dt.total_days().cast(pl.Float64)
    med = med.with_columns(_x=x, _y=pl.col("median"))
    window = f"{p.drift_window_days}d"

    def rsum(expr: pl.Expr) -> pl.Expr:
        return expr.rolling_sum_by("day", window_size=window).over("subject_id")

    med = med.with_columns(
        _n=rsum(pl.col("_y").is_not_null().cast(pl.Float64)),
        _sx=rsum(pl.col("_x")),
        _sy=rsum(pl.col("_y")),
        _sxy=rsum(pl.col("_x") * pl.col("_y")),
        _sxx=rsum(pl.col("_x") * pl.col("_x")),
    )
    denom = pl.col("_n") * pl.col("_sxx") - pl.col("_sx") * pl.col("_sx")
    slope = (pl.col("_n") * pl.col("_sxy") - pl.col("_sx") * pl.col("_sy")) / denom
    med = med.with_columns(
        slope=pl.when((pl.col("_n") >= p.drift_min_days) & (denom > 0)).then(slope),
        limit=pl.col("quantity").replace_strict(
            list(p.drift_slope_per_day.keys()),
            list(p.drift_slope_per_day.values()),
            return_dtype=pl.Float64,
        ),
    )
    start = pl.col("day").cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    cond = med.select(
        "subject_id",
        start.alias("start"),
        (start + pl.duration(days=1)).alias("end"),
        (pl.col("slope").abs() > pl.col("limit")).fill_null(False).alias("active"),
        pl.col("slope").abs().alias("abs_slope"),
        "slope",
        "median",
        pl.lit(1.0).alias("one"),
    )
    evidence = [
        Evidence("max_abs_slope_per_day", "abs_slope", "max"),
        Evidence("last_slope_per_day", "slope", "last"),
        Evidence("first_median", "median", "first"),
        Evidence("last_median", "median", "last"),
        Evidence("days", "one", "sum", digits=0),
    ]
    return update_episodes(
        cond,
        code=SENSOR_DRIFT,
        params=EpisodeParams(timedelta(0), p.drift_quiet_time),
        evidence=evidence,
        previous=previous_alerts,
        severity=p.severity[SENSOR_DRIFT],
    )


def _prepared(values: pl.DataFrame, p: WaterQualityParams) -> pl.DataFrame:
    """Good readings sorted per channel, with the alert subject and sample spans."""
    quality = pl.col("quality").cast(pl.Int32).fill_null(0)
    frame = (
        values.select(
            pl.col("sensor_id"),
            pl.col("quantity"),
            pl.col("ts").cast(UTC_TS),
            pl.col("value").cast(pl.Float64),
            quality.alias("quality"),
        )
        .filter(((pl.col("quality") & QUALITY_BAD) == 0) & pl.col("value").is_finite())
        .with_columns(subject_id=subject_of(pl.col("sensor_id"), pl.col("quantity")))
        .sort("subject_id", "ts")
    )
    return with_spans(frame, nominal_step=p.sample_period, max_step=p.max_gap, ts_marks="end")
