"""Billing export files: what the billing system imports, from the ``billing_export`` view.

One row per meter and period with the latest determinant version, and whether it replaces a
version issued earlier (then billing cancels ``replaces_version`` and rebills). CSV for the
billing system's importers (lists joined with ``;``, charge lines as JSON text), Parquet for
analysts (lists stay lists).

Volumes and registers leave as exact decimals rounded to the meter's register resolution (the
register channel's ``params.resolution`` in m³, else 0.001 m³ = 1 L): the database keeps doubles,
and ``closing − opening`` in binary floating point prints as ``9.216999999999985``, which a billing
importer either rejects or bills to the femtolitre. A period that was never computed is an error
(:class:`PeriodNotComputedError`), not a header-only file that looks like "nobody used water".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Literal

import polars as pl
import psycopg

from flows.load import copy_frame, days_since_1970, ts_us
from flows.window import resolve_database_url
from sql.connect import connect

ExportFormat = Literal["csv", "parquet"]

_LIST_COLUMNS = ("flags", "methods", "vee_rules", "hold_codes", "changed_columns")

# Volumes in m³, exported as decimals at the register resolution (not as floats).
DECIMAL_COLUMNS = ("opening_register", "closing_register", "volume", "estimated_m3", "edited_m3")
DEFAULT_RESOLUTION_M3 = Decimal("0.001")

EXPORT_COLUMNS: dict[str, object] = {
    "meter_id": pl.String,
    "account": pl.String,
    "dma_id": pl.String,
    "period_start": pl.Date,
    "period_end": pl.Date,
    "version": pl.Int32,
    "is_replacement": pl.Boolean,
    "replaces_version": pl.Int32,
    "reason": pl.String,
    "opening_register": pl.Float64,
    "opening_read_type": pl.String,
    "closing_register": pl.Float64,
    "closing_read_type": pl.String,
    "volume": pl.Float64,
    "unit": pl.String,
    "estimated_m3": pl.Float64,
    "edited_m3": pl.Float64,
    "estimated_share": pl.Float64,
    "flags": pl.String,
    "methods": pl.String,
    "vee_status": pl.String,
    "vee_rules": pl.String,
    "hold": pl.Boolean,
    "hold_codes": pl.String,
    "hold_reason": pl.String,  # why the bill is held, in words (null: not held)
    "charge_lines": pl.String,
    "charge_total": pl.Float64,
    "changed_columns": pl.String,
    "computed_at": pl.Datetime("us", "UTC"),
}


class PeriodNotComputedError(LookupError):
    """The billing period has no determinants at all: ``billing_export`` never ran for it (or ran
    with other period bounds). Raised instead of writing an empty file, which an importer would
    take for a period in which nobody used water."""

    def __init__(
        self, period_start: date, period_end: date, known: list[tuple[date, date]]
    ) -> None:
        self.period_start, self.period_end, self.known = period_start, period_end, known
        hint = (
            "computed periods: " + ", ".join(f"{a}..{b}" for a, b in known)
            if known
            else "no period has been computed yet"
        )
        super().__init__(
            f"billing period {period_start}..{period_end} was never computed ({hint}); "
            f"run `aquameter flow run billing_export` for it first"
        )


def parse_period(text: str) -> tuple[date, date]:
    """``2026-03`` (a calendar month), ``2026-03-01..2026-03-31`` or ``2026-03-01/2026-03-31``
    (inclusive local dates) → (period_start, period_end)."""
    text = text.strip()
    if re.fullmatch(r"\d{4}-\d{2}", text):
        start = date.fromisoformat(text + "-01")
        end = (start + timedelta(days=32)).replace(day=1) - timedelta(days=1)
        return start, end
    parts = re.split(r"\.\.|/", text)
    if len(parts) == 2:
        start, end = date.fromisoformat(parts[0]), date.fromisoformat(parts[1])
        if end < start:
            raise ValueError(f"period {text!r} ends before it starts")
        return start, end
    raise ValueError(f"period {text!r}: use YYYY-MM or YYYY-MM-DD..YYYY-MM-DD")


def billing_export_frame(
    conn: psycopg.Connection,
    period_start: date,
    period_end: date,
    *,
    computed_since: datetime | None = None,
) -> pl.DataFrame:
    """Rows of the ``billing_export`` view for one period (lists as JSON text, volumes as
    decimals at the register resolution), optionally only versions computed at or after
    ``computed_since`` (what one billing run added).

    Rounding happens in SQL on ``numeric`` (half away from zero) and the values travel as text,
    so no binary float sits between the rounding and the file."""
    cols = []
    for name in EXPORT_COLUMNS:
        if name in DECIMAL_COLUMNS:
            cols.append(f"(round({name}::numeric / r.res) * r.res)::text")
        elif name in _LIST_COLUMNS:
            cols.append(f"array_to_json({name})::text")
        elif name in ("period_start", "period_end"):
            cols.append(days_since_1970(name))
        elif name == "computed_at":
            cols.append(ts_us(name))
        elif name == "charge_lines":
            cols.append("charge_lines::text")
        else:
            cols.append(name)
    since_filter = "" if computed_since is None else "AND computed_at >= %s"
    params: list[object] = [DEFAULT_RESOLUTION_M3, period_start, period_end]
    if computed_since is not None:
        params.append(computed_since)
    schema: dict[str, object] = {
        k: (pl.String if k in DECIMAL_COLUMNS else v) for k, v in EXPORT_COLUMNS.items()
    } | {"_resolution": pl.String}
    # A meter's resolution: its register channel's params.resolution (m³), else the default.
    raw = copy_frame(
        conn,
        f"""SELECT {", ".join(cols)}, r.res::text FROM billing_export b
            CROSS JOIN LATERAL (
                SELECT coalesce(min(nullif(c.params->>'resolution', '')::numeric),
                                %s::numeric) AS res
                FROM channels c WHERE c.meter_id = b.meter_id AND c.kind = 'register') r
            WHERE period_start = %s AND period_end = %s {since_filter}
            ORDER BY meter_id""",
        params,
        schema,  # type: ignore[arg-type]
    )
    scale = max(
        [_decimals(Decimal(r)) for r in raw["_resolution"].drop_nulls().unique().to_list()]
        + [_decimals(DEFAULT_RESOLUTION_M3)]
    )
    return raw.drop("_resolution").with_columns(
        pl.col(c).cast(pl.Decimal(38, scale)) for c in DECIMAL_COLUMNS
    )


def _decimals(resolution: Decimal) -> int:
    """Decimal places a resolution needs (0.001 → 3, 0.5 → 1, 1 → 0)."""
    exponent = resolution.normalize().as_tuple().exponent
    return max(0, -int(exponent))


def computed_periods(conn: psycopg.Connection, limit: int = 6) -> list[tuple[date, date]]:
    """The most recent billing periods that have determinants (for error messages)."""
    rows = conn.execute(
        "SELECT DISTINCT period_start, period_end FROM billing_volumes "
        "ORDER BY period_start DESC, period_end DESC LIMIT %s",
        (limit,),
    ).fetchall()
    return [(a, b) for a, b in rows]


def period_computed(conn: psycopg.Connection, period_start: date, period_end: date) -> bool:
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM billing_volumes WHERE period_start = %s AND period_end = %s)",
        (period_start, period_end),
    ).fetchone()
    return bool(row and row[0])


def write_frame(frame: pl.DataFrame, path: Path, fmt: ExportFormat) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        frame.with_columns(
            pl.col(c).str.json_decode(pl.List(pl.String)) for c in _LIST_COLUMNS
        ).write_parquet(path)
    elif fmt == "csv":
        frame.with_columns(
            pl.col(c).str.json_decode(pl.List(pl.String)).list.join(";") for c in _LIST_COLUMNS
        ).write_csv(path)
    else:
        raise ValueError(f"export format must be csv or parquet, not {fmt!r}")
    return path


def default_export_path(
    directory: Path, period_start: date, period_end: date, fmt: ExportFormat, stamp: datetime
) -> Path:
    return directory / (
        f"billing_{period_start.isoformat()}_{period_end.isoformat()}_"
        f"{stamp.astimezone(UTC):%Y%m%dT%H%M%S%fZ}.{fmt}"
    )


@dataclass(frozen=True)
class ExportResult:
    path: Path
    rows: int
    replacements: int


def export_billing(
    database_url: str | None,
    period: str,
    fmt: ExportFormat = "csv",
    output: Path | None = None,
    *,
    changed_since: datetime | None = None,
) -> ExportResult:
    """Write the current billing determinants of ``period`` to a file (``aquameter export
    billing``). Without ``output`` the file goes to ``<data_dir>/exports``.

    Raises :class:`PeriodNotComputedError` (and writes nothing) when the period has no
    determinants at all; with ``changed_since`` an empty file is a real answer ("nothing changed")
    and is written."""
    from aquameter.settings import get_settings

    start, end = parse_period(period)
    with connect(resolve_database_url(database_url), autocommit=True) as conn:
        frame = billing_export_frame(conn, start, end, computed_since=changed_since)
        if frame.height == 0 and not period_computed(conn, start, end):
            raise PeriodNotComputedError(start, end, computed_periods(conn))
    path = output or default_export_path(
        get_settings().data_path("exports"), start, end, fmt, datetime.now(UTC)
    )
    write_frame(frame, path, fmt)
    return ExportResult(path, frame.height, int(frame["is_replacement"].sum()))
