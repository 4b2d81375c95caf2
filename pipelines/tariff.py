"""Tiered residential water tariffs (阶梯水价): tariff versions, period splitting, tier charges.

Chinese residential water is priced in tiers of *annual* household volume (e.g. up to 180 m³/year,
180–260, above; prices about 1 : 1.5 : 3). A monthly or bi-monthly bill applies the annual tiers
pro rata: each threshold × period days / 365. Tariffs change on an effective date, so a billing
period that spans one is cut into segments, each priced with its own version and with thresholds
pro-rated by its own days; the caller supplies each segment's volume (billing apportions the
period's volume by the consumption measured on each side of the date).

This module only does tariff arithmetic on volumes; it knows nothing about meters or time zones.
Dates are local calendar dates and period ends are inclusive (a March bill is 03-01..03-31).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import date, timedelta

import polars as pl


@dataclass(frozen=True, slots=True)
class TariffVersion:
    """One version of a tiered tariff, valid from ``effective_from`` until the next version.

    Attributes:
        effective_from: first local date the version applies to.
        tier_limits_m3_per_year: upper limits of all tiers but the last, in m³ per year.
        prices_per_m3: price of each tier (one more than limits), currency per m³.
        code: label printed on tier lines.
    """

    effective_from: date
    tier_limits_m3_per_year: tuple[float, ...] = (180.0, 260.0)
    prices_per_m3: tuple[float, ...] = (3.00, 4.50, 9.00)
    code: str = ""

    def __post_init__(self) -> None:
        limits = self.tier_limits_m3_per_year
        if len(self.prices_per_m3) != len(limits) + 1:
            raise ValueError("prices_per_m3 needs exactly one price more than tier limits")
        if any(b <= a for a, b in zip((0.0, *limits), limits, strict=False)):
            raise ValueError("tier limits must be positive and strictly increasing")
        if any(not math.isfinite(x) or x < 0 for x in self.prices_per_m3):
            raise ValueError("prices must be finite and non-negative")


def _default_versions() -> tuple[TariffVersion, ...]:
    return (TariffVersion(effective_from=date(2000, 1, 1), code="DEFAULT"),)


@dataclass(frozen=True, slots=True)
class TieredTariff:
    """A tiered tariff as a series of versions.

    Attributes:
        versions: versions with distinct effective dates (any order); dates before the earliest
            have no tariff and get null charges.
        days_per_year: divisor of the pro-rating (365: a 30-day bill gets 30/365 of each limit).
        amount_decimals: rounding of each tier line's amount (currency minor units).
    """

    versions: tuple[TariffVersion, ...] = field(default_factory=_default_versions)
    days_per_year: float = 365.0
    amount_decimals: int = 2

    def __post_init__(self) -> None:
        if not self.versions:
            raise ValueError("a tariff needs at least one version")
        dates = [v.effective_from for v in self.versions]
        if len(set(dates)) != len(dates):
            raise ValueError("tariff versions need distinct effective dates")
        if self.days_per_year <= 0:
            raise ValueError("days_per_year must be positive")

    def version_table(self) -> pl.DataFrame:
        """(effective_from, effective_to inclusive or null, tariff_code) sorted by date."""
        ordered = sorted(self.versions, key=lambda v: v.effective_from)
        ends: list[date | None] = [
            nxt.effective_from - timedelta(days=1) for nxt in ordered[1:]
        ] + [None]
        return pl.DataFrame(
            {
                "effective_from": [v.effective_from for v in ordered],
                "effective_to": ends,
                "tariff_code": [v.code or v.effective_from.isoformat() for v in ordered],
            },
            schema={"effective_from": pl.Date, "effective_to": pl.Date, "tariff_code": pl.String},
        )

    def tier_table(self) -> pl.DataFrame:
        """One row per version and tier: annual lower/upper limit (upper null = open) and price."""
        rows: dict[str, list[object]] = {
            "effective_from": [],
            "tier": [],
            "annual_from_m3": [],
            "annual_to_m3": [],
            "price_per_m3": [],
        }
        for v in self.versions:
            lowers = (0.0, *v.tier_limits_m3_per_year)
            uppers: tuple[float | None, ...] = (*v.tier_limits_m3_per_year, None)
            for i, (lo, hi, price) in enumerate(
                zip(lowers, uppers, v.prices_per_m3, strict=True), start=1
            ):
                rows["effective_from"].append(v.effective_from)
                rows["tier"].append(i)
                rows["annual_from_m3"].append(lo)
                rows["annual_to_m3"].append(hi)
                rows["price_per_m3"].append(price)
        return pl.DataFrame(
            rows,
            schema={
                "effective_from": pl.Date,
                "tier": pl.Int32,
                "annual_from_m3": pl.Float64,
                "annual_to_m3": pl.Float64,
                "price_per_m3": pl.Float64,
            },
        )


def split_periods(periods: pl.DataFrame, tariff: TieredTariff) -> pl.DataFrame:
    """Cut each period (``period_start``..``period_end`` inclusive) at tariff effective dates.

    Returns every input column plus ``segment_start``, ``segment_end`` (inclusive),
    ``segment_days``, ``effective_from`` and ``tariff_code`` of the version in force. A period, or
    the part of it, before the first version comes back as one segment with null version.
    """
    versions = tariff.version_table()
    first = versions.get_column("effective_from").min()
    keyed = periods.with_row_index("_period")
    covered = (
        keyed.join(versions, how="cross")
        .filter(
            (pl.col("effective_from") <= pl.col("period_end"))
            & (
                pl.col("effective_to").is_null()
                | (pl.col("effective_to") >= pl.col("period_start"))
            )
        )
        .with_columns(
            segment_start=pl.max_horizontal("period_start", "effective_from"),
            segment_end=pl.min_horizontal("period_end", pl.col("effective_to")),
        )
        .drop("effective_to")
    )
    before = (
        keyed.filter(pl.col("period_start") < pl.lit(first, dtype=pl.Date))
        .with_columns(
            effective_from=pl.lit(None, dtype=pl.Date),
            tariff_code=pl.lit(None, dtype=pl.String),
            segment_start=pl.col("period_start"),
            segment_end=pl.min_horizontal(
                "period_end", pl.lit(first, dtype=pl.Date) - pl.duration(days=1)
            ),
        )
        .select(covered.columns)
    )
    return (
        pl.concat([covered, before], how="vertical")
        .with_columns(
            segment_days=(
                (pl.col("segment_end") - pl.col("segment_start")).dt.total_days() + 1
            ).cast(pl.Int32)
        )
        .sort("_period", "segment_start")
        .drop("_period")
    )


def tier_lines(segments: pl.DataFrame, tariff: TieredTariff) -> pl.DataFrame:
    """Charge lines per segment and tier, from ``segment_days`` and ``volume_m3`` per segment.

    Each annual limit is pro-rated: limit × segment_days / days_per_year; a tier holds
    clamp(volume − lower, 0, upper − lower). Returns the segment columns plus ``tier``,
    ``tier_from_m3``, ``tier_to_m3`` (null for the open last tier), ``tier_volume_m3``,
    ``price_per_m3`` and ``amount`` (rounded). A null volume gives null tier volumes and amounts, a
    segment without a tariff version gives no lines.
    """
    share = pl.col("segment_days").cast(pl.Float64) / tariff.days_per_year
    lines = (
        segments.with_row_index("_segment")
        .join(tariff.tier_table(), on="effective_from", how="inner")
        .with_columns(
            tier_from_m3=pl.col("annual_from_m3") * share,
            tier_to_m3=pl.col("annual_to_m3") * share,
        )
    )
    above_lower = (pl.col("volume_m3") - pl.col("tier_from_m3")).clip(lower_bound=0.0)
    width = pl.col("tier_to_m3") - pl.col("tier_from_m3")
    in_tier = (
        pl.when(pl.col("tier_to_m3").is_null())
        .then(above_lower)
        .otherwise(pl.min_horizontal(above_lower, width))
    )
    in_tier = pl.when(pl.col("volume_m3").is_null()).then(None).otherwise(in_tier)
    return (
        lines.with_columns(tier_volume_m3=in_tier)
        .with_columns(
            amount=(pl.col("tier_volume_m3") * pl.col("price_per_m3")).round(tariff.amount_decimals)
        )
        .sort("_segment", "tier")
        .select(
            *segments.columns,
            "tier",
            "tier_from_m3",
            "tier_to_m3",
            "tier_volume_m3",
            "price_per_m3",
            "amount",
        )
    )
