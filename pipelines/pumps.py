"""Pump KPIs per asset and local day: specific energy (kWh/m³), run hours, starts, stops, trips.

Specific energy is the pumping KPI utilities report ("kWh per m³ pumped"): it rises when impellers
wear, valves are throttled or a pump runs far from its best-efficiency point. Run hours and starts
drive maintenance; trips (protection relay or VFD fault) are the ones that need a visit.

Input is ``schemas.SENSOR_VALUES`` with canonical quantities: ``flow`` (m³/h), ``power`` (kW),
``energy`` (kWh counter), ``volume`` (m³ counter), ``state`` (running 1 / stopped 0) and ``trip``
(fault 1 / healthy 0). An optional ``assets`` frame (``sensor_id, asset_id``) maps channels to the
pump or station they describe; several pumps' energy mapped to one station sum up, which is how a
station's specific energy is formed. Unmapped sensors are their own asset.

Integration works on consecutive samples of one channel ("segments"). A segment longer than
``max_gap`` is a hole in the data and contributes nothing (coverage columns say how many hours were
integrated). Segments crossing local midnight are split at midnight with the value interpolated, so
a day gets exactly its share; days are local dates in ``timezone`` (23 or 25 h on DST days).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import polars as pl

from pipelines.schemas import UTC_TS

QUALITY_BAD = 16  # protocols.uplink.Quality.BAD


@dataclass(frozen=True)
class PumpParams:
    """Settings of the pump KPIs, with why each default is what it is."""

    timezone: str = "UTC"
    """Zone of the reporting day; set it to the station's DMA zone."""
    max_gap: timedelta = timedelta(hours=1)
    """Samples further apart are a data gap: no energy, volume or run time is invented across it.
    Must be under 24 h (a segment is split at one midnight at most)."""
    integration: Literal["trapezoid", "hold"] = "trapezoid"
    """Flow and power between samples: linear ("trapezoid", for periodic sampling) or held at the
    earlier value ("hold", for historians that store on change)."""
    running_threshold: float = 0.5
    """State at or above this is running (state channels are 0/1, some report 0/100)."""
    min_volume_m3: float = 1.0
    """A day pumping less has no meaningful kWh/m³ (standby consumption over a trickle)."""
    flow_quantity: str = "flow"
    power_quantity: str = "power"
    energy_quantity: str = "energy"
    volume_quantity: str = "volume"
    state_quantity: str = "state"
    trip_quantity: str = "trip"


def specific_energy(
    values: pl.DataFrame, params: PumpParams | None = None, assets: pl.DataFrame | None = None
) -> pl.DataFrame:
    """kWh per m³ pumped, per asset and local day.

    Energy comes from ``energy`` counters where an asset has them (metered, so preferred) and from
    integrated ``power`` otherwise; volume from ``volume`` counters, else integrated ``flow``.
    Counter decreases are resets and count as nothing. Returns ``asset_id, day, energy_kwh,
    volume_m3, specific_energy_kwh_m3`` (null under ``min_volume_m3``), ``energy_source``,
    ``volume_source`` and the hours each figure covers.
    """
    p = params or PumpParams()
    pieces = _pieces(values, p, assets)
    key = ["asset_id", "day"]

    def total(quantity: str, column: str, name: str) -> pl.DataFrame:
        return (
            pieces.filter(pl.col("quantity") == quantity)
            .group_by(key)
            .agg(
                pl.col(column).sum().alias(name),
                # Hours actually integrated: a counter reset covers nothing.
                pl.col("hours").filter(pl.col(column).is_not_null()).sum().alias(f"{name}_hours"),
            )
        )

    rate_col = "trap" if p.integration == "trapezoid" else "hold"
    energy_c = total(p.energy_quantity, "increment", "e_counter")
    energy_p = total(p.power_quantity, rate_col, "e_power")
    volume_c = total(p.volume_quantity, "increment", "v_counter")
    volume_f = total(p.flow_quantity, rate_col, "v_flow")
    days = pieces.select(key).unique()
    out = (
        days.join(energy_c, on=key, how="left")
        .join(energy_p, on=key, how="left")
        .join(volume_c, on=key, how="left")
        .join(volume_f, on=key, how="left")
    )
    counter_e = pl.col("e_counter").is_not_null()
    counter_v = pl.col("v_counter").is_not_null()
    out = out.select(
        *key,
        pl.when(counter_e).then("e_counter").otherwise("e_power").alias("energy_kwh"),
        pl.when(counter_v).then("v_counter").otherwise("v_flow").alias("volume_m3"),
        pl.when(counter_e)
        .then(pl.lit(p.energy_quantity))
        .when(pl.col("e_power").is_not_null())
        .then(pl.lit(p.power_quantity))
        .alias("energy_source"),
        pl.when(counter_v)
        .then(pl.lit(p.volume_quantity))
        .when(pl.col("v_flow").is_not_null())
        .then(pl.lit(p.flow_quantity))
        .alias("volume_source"),
        pl.when(counter_e).then("e_counter_hours").otherwise("e_power_hours").alias("energy_hours"),
        pl.when(counter_v).then("v_counter_hours").otherwise("v_flow_hours").alias("volume_hours"),
    ).filter(pl.col("energy_kwh").is_not_null() | pl.col("volume_m3").is_not_null())
    sec = pl.when(pl.col("volume_m3") >= p.min_volume_m3).then(
        pl.col("energy_kwh") / pl.col("volume_m3")
    )
    return (
        out.with_columns(specific_energy_kwh_m3=sec)
        .select(
            *key,
            "energy_kwh",
            "volume_m3",
            "specific_energy_kwh_m3",
            "energy_source",
            "volume_source",
            "energy_hours",
            "volume_hours",
        )
        .sort(key)
    )


def run_hours(
    values: pl.DataFrame, params: PumpParams | None = None, assets: pl.DataFrame | None = None
) -> pl.DataFrame:
    """Run hours, starts, stops and trips per asset and local day.

    A state sample holds until the next one (a pump is running from the sample that says so), so
    run time is the held "running" time; starts and stops are state changes, counted on the day of
    the sample that shows the change, also across data gaps (the change did happen). Trips are
    rising edges of the ``trip`` channel; assets without one get null, not zero.
    """
    p = params or PumpParams()
    pieces = _pieces(values, p, assets)
    key = ["asset_id", "day"]
    running = (
        pieces.filter(pl.col("quantity") == p.state_quantity)
        .group_by(key)
        .agg(
            (pl.col("hours") * (pl.col("v0") >= p.running_threshold).cast(pl.Float64))
            .sum()
            .alias("run_hours"),
            pl.col("hours").sum().alias("state_hours"),
        )
    )
    edges = _edges(values, p, assets)
    state_edges = (
        edges.filter(pl.col("quantity") == p.state_quantity)
        .group_by(key)
        .agg(
            pl.col("rising").sum().cast(pl.Int64).alias("starts"),
            pl.col("falling").sum().cast(pl.Int64).alias("stops"),
        )
    )
    trip_edges = (
        edges.filter(pl.col("quantity") == p.trip_quantity)
        .group_by(key)
        .agg(pl.col("rising").sum().cast(pl.Int64).alias("trips"))
    )
    trip_assets = edges.filter(pl.col("quantity") == p.trip_quantity).select("asset_id").unique()
    days = pl.concat([running.select(key), edges.select(key)], how="vertical").unique()
    out = (
        days.join(running, on=key, how="left")
        .join(state_edges, on=key, how="left")
        .join(trip_edges, on=key, how="left")
        .join(trip_assets.with_columns(_has_trip=pl.lit(True)), on="asset_id", how="left")
    )
    return out.select(
        *key,
        pl.col("run_hours").fill_null(0.0),
        pl.col("state_hours").fill_null(0.0),
        pl.col("starts").fill_null(0),
        pl.col("stops").fill_null(0),
        pl.when(pl.col("_has_trip")).then(pl.col("trips").fill_null(0)).alias("trips"),
    ).sort(key)


# --- internals ---------------------------------------------------------------------------------


def _samples(values: pl.DataFrame, p: PumpParams, assets: pl.DataFrame | None) -> pl.DataFrame:
    """Good samples with their asset, sorted per channel."""
    quality = pl.col("quality").cast(pl.Int32).fill_null(0)
    frame = values.select(
        "sensor_id",
        "quantity",
        pl.col("ts").cast(UTC_TS),
        pl.col("value").cast(pl.Float64),
        quality.alias("quality"),
    ).filter(((pl.col("quality") & QUALITY_BAD) == 0) & pl.col("value").is_finite())
    if assets is not None:
        mapping = assets.select("sensor_id", "asset_id").unique("sensor_id", keep="last")
        frame = frame.join(mapping, on="sensor_id", how="left")
        frame = frame.with_columns(pl.coalesce("asset_id", "sensor_id").alias("asset_id"))
    else:
        frame = frame.with_columns(asset_id=pl.col("sensor_id"))
    frame = frame.sort("sensor_id", "quantity", "ts", maintain_order=True)
    # A repeated timestamp keeps its last sample (sorted, so by comparing with the next row).
    same_next = (
        (pl.col("sensor_id") == pl.col("sensor_id").shift(-1))
        & (pl.col("quantity") == pl.col("quantity").shift(-1))
        & (pl.col("ts") == pl.col("ts").shift(-1))
    )
    return frame.filter(~same_next.fill_null(False)).with_columns(
        _new_channel=(
            (pl.col("sensor_id") != pl.col("sensor_id").shift(1))
            | (pl.col("quantity") != pl.col("quantity").shift(1))
        ).fill_null(True)
    )


def _local_day(ts: pl.Expr, tz: str) -> pl.Expr:
    return ts.dt.convert_time_zone(tz).dt.date()


def _pieces(values: pl.DataFrame, p: PumpParams, assets: pl.DataFrame | None) -> pl.DataFrame:
    """Segments between consecutive samples, split at local midnight, with their integrals.

    Columns: ``asset_id, quantity, day, hours`` and, for the piece, ``v0`` (the earlier sample's
    value, for held states), ``trap`` (linear integral, value x hours), ``hold`` (held integral)
    and ``increment`` (counter increase apportioned by time; null for a counter reset).
    """
    s = _samples(values, p, assets)
    same_channel_next = ~pl.col("_new_channel").shift(-1).fill_null(True)
    seg = s.select(
        "asset_id",
        "quantity",
        pl.col("ts").alias("t0"),
        pl.col("value").alias("v0"),
        pl.when(same_channel_next).then(pl.col("ts").shift(-1)).alias("t1"),
        pl.when(same_channel_next).then(pl.col("value").shift(-1)).alias("v1"),
    ).filter(pl.col("t1").is_not_null() & ((pl.col("t1") - pl.col("t0")) <= p.max_gap))
    midnight = pl.col("t1").dt.convert_time_zone(p.timezone).dt.truncate("1d")
    seg = seg.with_columns(_mid=pl.max_horizontal(midnight.dt.convert_time_zone("UTC"), "t0"))
    span_s = (pl.col("t1") - pl.col("t0")).dt.total_seconds(fractional=True)

    def piece(a: pl.Expr, b: pl.Expr, day_of: pl.Expr) -> pl.DataFrame:
        frac_a = (a - pl.col("t0")).dt.total_seconds(fractional=True) / span_s
        frac_b = (b - pl.col("t0")).dt.total_seconds(fractional=True) / span_s
        va = pl.col("v0") + (pl.col("v1") - pl.col("v0")) * frac_a
        vb = pl.col("v0") + (pl.col("v1") - pl.col("v0")) * frac_b
        hours = (b - a).dt.total_seconds(fractional=True) / 3600.0
        rise = pl.col("v1") - pl.col("v0")
        return seg.select(
            "asset_id",
            "quantity",
            _local_day(day_of, p.timezone).alias("day"),
            hours.alias("hours"),
            "v0",
            ((va + vb) / 2.0 * hours).alias("trap"),
            (pl.col("v0") * hours).alias("hold"),
            pl.when(rise >= 0).then(rise * (frac_b - frac_a)).alias("increment"),
        )

    before = piece(pl.col("t0"), pl.col("_mid"), pl.col("t0"))
    after = piece(pl.col("_mid"), pl.col("t1"), pl.col("t1"))
    return pl.concat([before, after], how="vertical").filter(pl.col("hours") > 0)


def _edges(values: pl.DataFrame, p: PumpParams, assets: pl.DataFrame | None) -> pl.DataFrame:
    """0->1 and 1->0 changes of two-state channels, on the local day of the sample showing them."""
    s = _samples(values, p, assets).filter(
        pl.col("quantity").is_in([p.state_quantity, p.trip_quantity])
    )
    on = pl.col("value") >= p.running_threshold
    prev = pl.when(~pl.col("_new_channel")).then(on.shift(1))
    return s.select(
        "asset_id",
        "quantity",
        _local_day(pl.col("ts"), p.timezone).alias("day"),
        (on & ~prev).fill_null(False).alias("rising"),
        (~on & prev).fill_null(False).alias("falling"),
    )
