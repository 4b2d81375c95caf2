"""Manual edits of interval volumes (the E of VEE that a person does), with an audit trail.

An edit replaces the volume of one existing interval: a billing clerk settles an interval that
validation failed, or sets a leak allowance. The interval gets flag ``M``; its value before the edit
stays in ``original_volume``/``original_flag``/``original_method`` so a later review can undo it,
and every accepted edit yields an audit row (who, when, why, old, new). Several edits of the same
interval apply in ``edited_at`` order; each audit row's old value is what the previous edit left.

An edited volume is deliberately not reconciled with the register: overriding the register is the
point of an edit. Edits that cannot apply are returned in ``rejected`` with a reason, never dropped
silently: ``MISSING_FIELD`` (meter, ts, user, edited_at or reason empty), ``NON_FINITE_VOLUME``
(null, NaN or infinite new volume) and ``UNKNOWN_INTERVAL`` (no interval of that meter ends at ts —
edits correct intervals, they do not create new ones that could overlap existing slots).
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from pipelines.consumption import FLAG_EDITED
from pipelines.schemas import UTC_TS
from protocols.uplink import Quality

EDITS: dict[str, pl.DataType | type[pl.DataType]] = {
    "meter_id": pl.String,
    "ts": UTC_TS,
    "new_volume": pl.Float64,
    "user": pl.String,
    "edited_at": UTC_TS,
    "reason": pl.String,
}

EDIT_AUDIT = {
    "meter_id": pl.String,
    "ts": UTC_TS,
    "user": pl.String,
    "edited_at": UTC_TS,
    "reason": pl.String,
    "old_volume": pl.Float64,
    "old_flag": pl.String,
    "old_method": pl.String,
    "new_volume": pl.Float64,
}

REJECTED_EDITS = {**EDITS, "reject_reason": pl.String}

MISSING_FIELD = "MISSING_FIELD"
NON_FINITE_VOLUME = "NON_FINITE_VOLUME"
UNKNOWN_INTERVAL = "UNKNOWN_INTERVAL"


@dataclass(frozen=True, slots=True)
class EditResult:
    """Edited series (input columns + ``original_*``), audit rows and rejected edits."""

    intervals: pl.DataFrame
    audit: pl.DataFrame
    rejected: pl.DataFrame


def _blank(name: str) -> pl.Expr:
    col = pl.col(name)
    return col.is_null() | (col.cast(pl.String).str.strip_chars() == "")


def apply_edits(intervals: pl.DataFrame, edits: pl.DataFrame) -> EditResult:
    """Apply ``edits`` (frame ``EDITS``) to an interval series (``SERIES`` or ``INTERVALS``).

    The latest edit of an interval wins; its quality gets the EDITED bit; ``method`` becomes null
    because the value no longer comes from an estimation method.
    """
    e = edits.select(pl.col(name).cast(dtype) for name, dtype in EDITS.items())
    missing = _blank("meter_id") | _blank("ts") | _blank("user") | _blank("edited_at")
    missing = missing | _blank("reason")
    bad_volume = ~pl.col("new_volume").is_finite().fill_null(False)
    e = e.with_columns(
        reject_reason=pl.when(missing)
        .then(pl.lit(MISSING_FIELD))
        .when(bad_volume)
        .then(pl.lit(NON_FINITE_VOLUME))
    )
    keys = intervals.select("meter_id", "ts").unique().with_columns(_known=pl.lit(True))
    e = (
        e.join(keys, on=["meter_id", "ts"], how="left", maintain_order="left")
        .with_columns(
            reject_reason=pl.coalesce(
                "reject_reason",
                pl.when(pl.col("_known").is_null()).then(pl.lit(UNKNOWN_INTERVAL)),
            )
        )
        .drop("_known")
    )
    rejected = e.filter(pl.col("reject_reason").is_not_null()).cast(REJECTED_EDITS)  # type: ignore[arg-type]
    ok = e.filter(pl.col("reject_reason").is_null()).drop("reject_reason")

    current = intervals.select(
        "meter_id",
        "ts",
        pl.col("volume").alias("base_volume"),
        pl.col("flag").alias("base_flag"),
        pl.col("method").alias("base_method"),
    )
    # Chain edits of one interval in time order: each one's old value is the previous one's new.
    audit = (
        ok.join(current, on=["meter_id", "ts"], how="left")
        .sort("meter_id", "ts", "edited_at", maintain_order=True)
        .with_columns(
            prev_new=pl.col("new_volume").shift(1).over("meter_id", "ts"),
            first=pl.int_range(pl.len()).over("meter_id", "ts") == 0,
        )
        .select(
            "meter_id",
            "ts",
            "user",
            "edited_at",
            "reason",
            pl.when("first")
            .then(pl.col("base_volume"))
            .otherwise(pl.col("prev_new"))
            .alias("old_volume"),
            pl.when("first")
            .then(pl.col("base_flag"))
            .otherwise(pl.lit(FLAG_EDITED))
            .alias("old_flag"),
            pl.when("first").then(pl.col("base_method")).alias("old_method"),
            "new_volume",
        )
        .cast(EDIT_AUDIT)  # type: ignore[arg-type]
    )
    final = audit.group_by("meter_id", "ts").agg(pl.col("new_volume").last().alias("edit_volume"))

    out = intervals.join(final, on=["meter_id", "ts"], how="left", maintain_order="left")
    edited = pl.col("edit_volume").is_not_null()
    cols = intervals.columns
    prior = {
        "original_volume": pl.col("original_volume") if "original_volume" in cols else None,
        "original_flag": pl.col("original_flag") if "original_flag" in cols else None,
        "original_method": pl.col("original_method") if "original_method" in cols else None,
    }

    def original(name: str, source: str) -> pl.Expr:
        # An interval edited in an earlier run keeps its first original value.
        before = prior[name]
        fresh = pl.when(edited).then(pl.col(source))
        return (
            pl.when(pl.col("flag") == FLAG_EDITED).then(before).otherwise(fresh)
            if before is not None
            else fresh
        ).alias(name)

    out = out.with_columns(
        original("original_volume", "volume"),
        original("original_flag", "flag"),
        original("original_method", "method"),
    ).with_columns(
        volume=pl.when(edited).then(pl.col("edit_volume")).otherwise(pl.col("volume")),
        flag=pl.when(edited).then(pl.lit(FLAG_EDITED)).otherwise(pl.col("flag")),
        method=pl.when(edited).then(None).otherwise(pl.col("method")),
        quality=pl.when(edited)
        .then(pl.col("quality").cast(pl.Int32).fill_null(0) | int(Quality.EDITED))
        .otherwise(pl.col("quality"))
        .cast(pl.Int16),
    )
    return EditResult(out.drop("edit_volume"), audit, rejected)
