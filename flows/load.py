"""Loading analytics inputs from PostgreSQL into the ``pipelines.schemas`` frames.

Millions of readings go through ``COPY (SELECT …) TO STDOUT``: readings travel as fixed-width
binary rows decoded by numpy in one call (no Python object per row), reference data as CSV parsed
by polars. Timestamps leave the server as microseconds since 1970 and dates as days since 1970, so
nothing on the client parses a date string or guesses a time zone.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from typing import Any, cast

import numpy as np
import polars as pl
import psycopg
from psycopg import sql

from pipelines.schemas import (
    ALERTS,
    DMAS,
    METER_EXCHANGES,
    METER_READS,
    METERS,
    SENSOR_VALUES,
    UTC_TS,
)
from sql.copy_format import COPY_SIGNATURE, PG_EPOCH_US, READING_ROW

SchemaDict = dict[str, Any]


# Extra columns the flows carry next to METERS: the pure functions use ``timezone`` (local days)
# and ``active`` (VEE's active-account rule) when present.
METERS_EXTRA: SchemaDict = {
    "timezone": pl.String,
    "active": pl.Boolean,
    "device_id": pl.String,
    "vendor_id": pl.String,
    "channel_id": pl.Int32,
    "meter_class": pl.String,
}

EDIT_ROWS: SchemaDict = {
    "id": pl.Int64,
    "meter_id": pl.String,
    "ts": UTC_TS,
    "new_volume": pl.Float64,
    "user": pl.String,
    "edited_at": UTC_TS,
    "reason": pl.String,
}


def ts_us(column: str) -> str:
    """SQL for a timestamptz column as integer microseconds since 1970 (exact: numeric epoch)."""
    return f"(extract(epoch FROM {column}) * 1000000)::bigint"


def days_since_1970(column: str) -> str:
    return f"({column} - date '1970-01-01')"


def copy_frame(
    conn: psycopg.Connection,
    query: str | sql.Composable,
    params: Sequence[Any] | dict[str, Any] | None,
    schema: SchemaDict,
) -> pl.DataFrame:
    """Run ``query`` through ``COPY … TO STDOUT (FORMAT CSV)`` and parse it with polars.

    Columns arrive in ``schema`` order. ``Datetime`` columns must be selected as microseconds
    since 1970 (:func:`ts_us`) and ``Date`` columns as days since 1970 (:func:`days_since_1970`).
    SQL NULL is written as ``\\N`` so that an empty string stays an empty string.
    """
    inner = sql.SQL(query) if isinstance(query, str) else query  # type: ignore[arg-type]
    stmt = sql.SQL("COPY ({}) TO STDOUT (FORMAT CSV, NULL '\\N')").format(inner)
    chunks: list[bytes] = []
    with conn.cursor() as cur:
        with cur.copy(stmt, params) as copy:
            for block in copy:
                chunks.append(bytes(block))
    names = list(schema)
    raw_types: SchemaDict = {}
    for name, dtype in schema.items():
        if dtype == pl.Date or (isinstance(dtype, pl.Datetime) or dtype == pl.Datetime):
            raw_types[name] = pl.Int64
        elif dtype == pl.Boolean:
            raw_types[name] = pl.String
        else:
            raw_types[name] = dtype
    data = b"".join(chunks)
    if not data:
        return pl.DataFrame(schema=schema)
    frame = pl.read_csv(
        data,
        has_header=False,
        new_columns=names,
        schema=raw_types,
        null_values="\\N",
        empty_string_is_null=False,
        quote_char='"',
    )
    casts: list[pl.Expr] = []
    for name, dtype in schema.items():
        if dtype == pl.Date:
            casts.append(pl.col(name).cast(pl.Int32).cast(pl.Date))
        elif isinstance(dtype, pl.Datetime) or dtype == pl.Datetime:
            casts.append(pl.col(name).cast(pl.Datetime("us")).dt.replace_time_zone("UTC"))
        elif dtype == pl.Boolean:
            casts.append(pl.col(name).replace_strict({"t": True, "f": False}, default=None))
        else:
            casts.append(pl.col(name))
    return frame.select(casts).cast(cast(Any, schema))


def _copy_readings(
    conn: psycopg.Connection, channel_ids: Sequence[int], lo: datetime, hi: datetime
) -> pl.DataFrame:
    """(channel_id, ts, value, quality) of ``channel_ids`` in [lo, hi), as one binary COPY."""
    schema: SchemaDict = {
        "channel_id": pl.Int32,
        "ts": UTC_TS,
        "value": pl.Float64,
        "quality": pl.Int16,
    }
    if not channel_ids:
        return pl.DataFrame(schema=schema)
    chunks: list[bytes] = []
    with conn.cursor() as cur:
        with cur.copy(
            "COPY (SELECT channel_id, ts, value, quality FROM readings "
            "WHERE channel_id = ANY(%s) AND ts >= %s AND ts < %s "
            "ORDER BY channel_id, ts) TO STDOUT (FORMAT BINARY)",
            (list(channel_ids), lo, hi),
        ) as copy:
            for block in copy:
                chunks.append(bytes(block))
    buf = b"".join(chunks)
    if not buf.startswith(COPY_SIGNATURE):
        raise ValueError("unexpected COPY BINARY stream from the server")
    ext = int.from_bytes(buf[15:19], "big")
    start = 19 + ext
    body = len(buf) - start - 2  # trailer: int16 -1
    if body % READING_ROW.itemsize:
        raise ValueError("COPY BINARY stream is not made of fixed-width reading rows")
    rows = np.frombuffer(buf, dtype=READING_ROW, count=body // READING_ROW.itemsize, offset=start)
    return pl.DataFrame(
        {
            "channel_id": rows["ch"].astype(np.int32),
            "ts": (rows["ts"].astype(np.int64) + PG_EPOCH_US),
            "value": rows["v"].astype(np.float64),
            "quality": rows["q"].astype(np.int16),
        }
    ).with_columns(pl.col("ts").cast(pl.Datetime("us")).dt.replace_time_zone("UTC"))


# --- reference data ---------------------------------------------------------------------------


def load_dmas(conn: psycopg.Connection, dma_ids: Sequence[str] | None = None) -> pl.DataFrame:
    """``DMAS`` for all DMAs or the ones named, plus ``holidays`` (list of dates, see
    :func:`load_dma_holidays`): estimation profiles a holiday as a Sunday, and the night-floor
    rule of meter anomalies leaves holiday nights out (``pipelines.estimation.meter_holidays``
    turns them into per-meter days)."""
    where = "" if dma_ids is None else "WHERE id = ANY(%s)"
    frame = copy_frame(
        conn,
        f"""SELECT id, timezone, mains_km, service_connections, private_pipe_km, avg_pressure_m,
                   unmetered_households, unmetered_non_households
            FROM dmas {where} ORDER BY id""",
        None if dma_ids is None else (list(dma_ids),),
        DMAS,
    )
    days = load_dma_holidays(conn, dma_ids)
    return frame.with_columns(
        pl.Series(
            "holidays",
            [list(days.get(d, ())) for d in frame["dma_id"].to_list()],
            dtype=pl.List(pl.Date),
        )
    )


def load_meter_classes(conn: psycopg.Connection) -> dict[str, dict[str, Any]]:
    """Per meter class, what the registry changes: ``{"anomaly": {...}, "hold_codes": [...] |
    None}`` (table ``meter_classes``, migration 0011); classes without a row are absent."""
    with conn.cursor() as cur:
        cur.execute("SELECT id, anomaly, hold_codes FROM meter_classes ORDER BY id")
        return {r[0]: {"anomaly": dict(r[1] or {}), "hold_codes": r[2]} for r in cur.fetchall()}


APPARENT_LOSS_PCTS: SchemaDict = {
    "dma_id": pl.String,
    "unauthorized_pct_of_siv": pl.Float64,
    "meter_under_registration_pct": pl.Float64,
    "data_handling_pct_of_billed_metered": pl.Float64,
}


def load_apparent_loss_pcts(
    conn: psycopg.Connection, dma_ids: Sequence[str] | None = None
) -> pl.DataFrame:
    """Per-DMA apparent-loss percentages (``APPARENT_LOSS_PCTS``; null: the default)."""
    where = "" if dma_ids is None else "WHERE id = ANY(%s)"
    return copy_frame(
        conn,
        f"""SELECT id, unauthorized_pct_of_siv, meter_under_registration_pct,
                   data_handling_pct_of_billed_metered
            FROM dmas {where} ORDER BY id""",
        None if dma_ids is None else (list(dma_ids),),
        APPARENT_LOSS_PCTS,
    )


def load_meters(
    conn: psycopg.Connection,
    *,
    meter_ids: Sequence[str] | None = None,
    dma_ids: Sequence[str] | None = None,
) -> pl.DataFrame:
    """``METERS`` plus :data:`METERS_EXTRA` (time zone of the DMA, active flag, device, vendor and
    register channel), one row per meter, sorted by meter id.

    ``active`` is false when either the meter or its device is retired; a meter without a register
    channel has a null ``channel_id``.
    """
    cond = []
    params: list[Any] = []
    if meter_ids is not None:
        cond.append("m.id = ANY(%s)")
        params.append(list(meter_ids))
    if dma_ids is not None:
        cond.append("m.dma_id = ANY(%s)")
        params.append(list(dma_ids))
    where = ("WHERE " + " AND ".join(cond)) if cond else ""
    return copy_frame(
        conn,
        f"""SELECT m.id, m.dma_id, m.account, m.customer_type, m.dn, m.q3, m.q4,
                   m.register_digits, {days_since_1970("m.install_date")}, d.gateway,
                   z.timezone, (m.active AND d.active), d.id, d.vendor_id, c.id, m.meter_class
            FROM meters m
            JOIN devices d ON d.id = m.device_id
            LEFT JOIN dmas z ON z.id = m.dma_id
            LEFT JOIN LATERAL (
                SELECT id FROM channels ch
                WHERE ch.meter_id = m.id AND ch.kind IN ('register', '')
                ORDER BY (ch.kind = 'register') DESC, ch.id LIMIT 1
            ) c ON true
            {where}
            ORDER BY m.id""",
        params,
        {**METERS, **METERS_EXTRA},
    )


def load_exchanges(
    conn: psycopg.Connection, meter_ids: Sequence[str] | None = None
) -> pl.DataFrame:
    where = "" if meter_ids is None else "WHERE meter_id = ANY(%s)"
    return copy_frame(
        conn,
        f"""SELECT meter_id, {ts_us("exchanged_at")}, old_register_final, new_register_start
            FROM meter_exchanges {where} ORDER BY meter_id, exchanged_at""",
        None if meter_ids is None else (list(meter_ids),),
        METER_EXCHANGES,
    )


# --- readings ---------------------------------------------------------------------------------


def load_meter_reads(
    conn: psycopg.Connection, meters: pl.DataFrame, lo: datetime, hi: datetime
) -> pl.DataFrame:
    """``METER_READS`` of the meters in ``meters`` (needs ``meter_id``, ``channel_id``) with
    ``lo <= ts < hi``, sorted by meter and time."""
    chans = meters.select("meter_id", "channel_id").drop_nulls()
    raw = _copy_readings(conn, chans["channel_id"].to_list(), lo, hi)
    return (
        raw.join(chans, on="channel_id", how="inner")
        .select("meter_id", "ts", pl.col("value").alias("register"), "quality")
        .sort("meter_id", "ts")
        .cast(cast(Any, METER_READS))
    )


def dma_channels(conn: psycopg.Connection, dma_ids: Sequence[str]) -> pl.DataFrame:
    """Boundary flow and zone pressure channels of the DMAs: ``channel_id, dma_id, role``."""
    return copy_frame(
        conn,
        """SELECT id, dma_id, role FROM channels
           WHERE dma_id = ANY(%s) AND ((role IN ('inlet', 'outlet') AND quantity = 'flow')
                                       OR (role = 'pressure_azp' AND quantity = 'pressure'))
           ORDER BY id""",
        (list(dma_ids),),
        {"channel_id": pl.Int32, "dma_id": pl.String, "role": pl.String},
    )


def load_dma_boundary(
    conn: psycopg.Connection, dma_ids: Sequence[str], lo: datetime, hi: datetime
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Boundary flows (``dma_id, channel_id, role, ts, flow_m3h``, the input of
    ``dma.inflow.net_inflow``) and ``DMA_PRESSURE`` (mean over a DMA's AZP channels per instant)."""
    chans = dma_channels(conn, dma_ids)
    raw = _copy_readings(conn, chans["channel_id"].to_list(), lo, hi).join(chans, on="channel_id")
    flow = raw.filter(pl.col("role").is_in(["inlet", "outlet"])).select(
        "dma_id", "channel_id", "role", "ts", pl.col("value").alias("flow_m3h")
    )
    pressure = (
        raw.filter(pl.col("role") == "pressure_azp")
        .group_by("dma_id", "ts")
        .agg(pl.col("value").mean().alias("pressure_m"))
        .sort("dma_id", "ts")
    )
    return flow, pressure


def load_sensor_values(
    conn: psycopg.Connection,
    lo: datetime,
    hi: datetime,
    sensor_ids: Sequence[str] | None = None,
) -> pl.DataFrame:
    """``SENSOR_VALUES`` of sensor channels (water quality, pumps, …) in [lo, hi)."""
    where = "" if sensor_ids is None else "AND sensor_id = ANY(%s)"
    return _sensor_values(
        conn,
        f"SELECT id, sensor_id, quantity FROM channels WHERE sensor_id IS NOT NULL {where}",
        None if sensor_ids is None else (list(sensor_ids),),
        lo,
        hi,
    )


def load_quality_values(conn: psycopg.Connection, lo: datetime, hi: datetime) -> pl.DataFrame:
    """``SENSOR_VALUES`` of the water-quality channels (role ``quality``) in [lo, hi).

    The analyser is the device and the subject of its alerts is ``device:quantity`` (the limits
    are per quantity: a ``free_chlorine`` channel is judged as ``chlorine``). A device with two
    probes of one quantity would need two devices in the registry.
    """
    sql = "SELECT id, device_id, quantity FROM channels WHERE role = 'quality'"
    return _sensor_values(conn, sql, None, lo, hi)


def _sensor_values(
    conn: psycopg.Connection, channels_sql: str, params: Any, lo: datetime, hi: datetime
) -> pl.DataFrame:
    """Readings of the channels ``channels_sql`` selects as (id, sensor id, quantity)."""
    chans = copy_frame(
        conn,
        channels_sql,
        params,
        {"channel_id": pl.Int32, "sensor_id": pl.String, "quantity": pl.String},
    )
    raw = _copy_readings(conn, chans["channel_id"].to_list(), lo, hi)
    return (
        raw.join(chans, on="channel_id")
        .select("sensor_id", "quantity", "ts", "value", "quality")
        .sort("sensor_id", "quantity", "ts")
        .cast(cast(Any, SENSOR_VALUES))
    )


# --- results read back ------------------------------------------------------------------------


def load_alerts(
    conn: psycopg.Connection,
    *,
    codes: Sequence[str] | None = None,
    subject_ids: Sequence[str] | None = None,
) -> pl.DataFrame:
    """Stored alerts in the ``ALERTS`` layout (evidence as JSON text)."""
    cond, params = [], []
    if codes is not None:
        cond.append("code = ANY(%s)")
        params.append(list(codes))
    if subject_ids is not None:
        cond.append("subject_id = ANY(%s)")
        params.append(list(subject_ids))
    where = ("WHERE " + " AND ".join(cond)) if cond else ""
    return copy_frame(
        conn,
        f"""SELECT code, subject_id, {ts_us("start_ts")}, {ts_us("end_ts")}, status, severity,
                   evidence::text
            FROM alerts {where} ORDER BY code, subject_id, start_ts""",
        params,
        ALERTS,
    )


def load_edits(
    conn: psycopg.Connection, meter_ids: Sequence[str], lo: datetime, hi: datetime
) -> pl.DataFrame:
    """Manual edits of intervals ending in (lo, hi] (``pipelines.editing.EDITS`` plus ``id``)."""
    return copy_frame(
        conn,
        f"""SELECT id, meter_id, {ts_us("ts")}, new_volume, edited_by, {ts_us("edited_at")}, reason
            FROM meter_edits WHERE meter_id = ANY(%s) AND ts > %s AND ts <= %s
            ORDER BY meter_id, ts, edited_at, id""",
        (list(meter_ids), lo, hi),
        EDIT_ROWS,
    )


def load_dma_daily_nnf(conn: psycopg.Connection, dma_ids: Sequence[str]) -> pl.DataFrame:
    """The stored nightly NNF series (``dma_id, night_date, nnf_m3h, mnf_start_ts``), all of it:
    episodes are judged on the whole history known, whatever window a run was given."""
    return copy_frame(
        conn,
        f"""SELECT dma_id, {days_since_1970("day")}, nnf_m3h, {ts_us("mnf_start_ts")}
            FROM dma_daily WHERE dma_id = ANY(%s) ORDER BY dma_id, day""",
        (list(dma_ids),),
        {
            "dma_id": pl.String,
            "night_date": pl.Date,
            "nnf_m3h": pl.Float64,
            "mnf_start_ts": UTC_TS,
        },
    )


def load_dma_holidays(
    conn: psycopg.Connection, dma_ids: Sequence[str] | None = None
) -> dict[str, tuple[date, ...]]:
    """Per DMA, its holidays (migration 0012): its calendar's (``dmas.calendar``, else the
    calendar ``default``) and its own dates, sorted. A DMA without any maps to ``()``. The
    leak-event detector judges these nights with weekend nights."""
    where = "" if dma_ids is None else "WHERE d.id = ANY(%s)"
    with conn.cursor() as cur:
        cur.execute(
            f"""SELECT d.id, ARRAY(SELECT DISTINCT h
                                   FROM unnest(d.holidays || coalesce(c.holidays, '{{}}')) h
                                   ORDER BY h)
                FROM dmas d LEFT JOIN holiday_calendars c
                  ON c.id = coalesce(d.calendar, 'default')
                {where}""",
            () if dma_ids is None else (list(dma_ids),),
        )
        return {str(r[0]): tuple(r[1] or ()) for r in cur.fetchall()}
