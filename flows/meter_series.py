"""The meter interval series every flow starts from: validate, estimate, apply manual edits.

Night use, anomalies, the water balance and billing must all see the same volumes, so they all get
them from this one chain of the pure VEE functions rather than each differencing registers itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import polars as pl

from pipelines.consumption import clean_reads
from pipelines.editing import apply_edits
from pipelines.estimation import EstimationParams, estimate
from pipelines.schemas import UTC_TS
from pipelines.vee import VeeParams, validate, validated_intervals, validated_reads


@dataclass(frozen=True)
class MeterSeriesParams:
    """Thresholds of validation and estimation (defaults: ``pipelines.vee``/``estimation``)."""

    vee: VeeParams = field(default_factory=VeeParams)
    estimation: EstimationParams = field(default_factory=EstimationParams)


@dataclass(frozen=True)
class MeterSeries:
    """``intervals``: the final series (``pipelines.estimation.SERIES``, edited where edits
    apply); ``reads``: validated reads (billing's register anchors); ``failures``: VEE failures;
    ``audit``/``rejected``: outcome of the manual edits; ``unestimable``: spans left unfilled."""

    intervals: pl.DataFrame
    reads: pl.DataFrame
    failures: pl.DataFrame
    audit: pl.DataFrame
    rejected: pl.DataFrame
    unestimable: pl.DataFrame


def meter_series(
    reads: pl.DataFrame,
    meters: pl.DataFrame,
    exchanges: pl.DataFrame,
    dmas: pl.DataFrame,
    *,
    as_of: datetime,
    since: datetime | None = None,
    until: datetime | None = None,
    edits: pl.DataFrame | None = None,
    params: MeterSeriesParams | None = None,
) -> MeterSeries:
    """Run VEE on ``reads`` (``METER_READS``) and return the series and its by-products."""
    p = params or MeterSeriesParams()
    clean = clean_reads(reads)  # once: the three VEE steps start from the same cleaned reads
    failures = validate(reads, meters, exchanges, as_of=as_of, dmas=dmas, params=p.vee, clean=clean)
    good = validated_reads(reads, failures, clean=clean)
    checked = validated_intervals(reads, meters, exchanges, failures, p.vee, clean=clean)
    filled = estimate(checked, meters, dmas=dmas, since=since, until=until, params=p.estimation)
    intervals = filled.intervals
    audit = pl.DataFrame()
    rejected = pl.DataFrame()
    if edits is not None and edits.height:
        edited = apply_edits(
            intervals,
            edits.select("meter_id", "ts", "new_volume", "user", "edited_at", "reason"),
        )
        intervals, audit, rejected = edited.intervals, edited.audit, edited.rejected
    return MeterSeries(
        intervals=intervals.with_columns(pl.col("ts").cast(UTC_TS)),
        reads=good,
        failures=failures,
        audit=audit,
        rejected=rejected,
        unestimable=filled.unestimable,
    )
