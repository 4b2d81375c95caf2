"""Column schemas of the polars frames that analytics take and return.

Flows load these from the database, simulators produce them directly, benchmarks generate them:
one contract, so the pure functions in ``pipelines`` and ``dma`` are tested without servers.
All timestamps are UTC (``Datetime("us", "UTC")``); local time is derived per DMA time zone.
"""

from __future__ import annotations

import polars as pl

UTC_TS = pl.Datetime("us", "UTC")

# Cumulative register reads of customer meters (m³), one row per meter and timestamp.
METER_READS = {
    "meter_id": pl.String,
    "ts": UTC_TS,
    "register": pl.Float64,
    "quality": pl.Int16,  # protocols.uplink.Quality bits (vendor status flags)
}

# Static meter attributes (from the meters/devices/dmas tables or the registry).
METERS = {
    "meter_id": pl.String,
    "dma_id": pl.String,
    "account": pl.String,
    "customer_type": pl.String,  # household | non_household
    "dn": pl.Int32,
    "q3": pl.Float64,  # m³/h
    "q4": pl.Float64,  # m³/h
    "register_digits": pl.Int32,
    "install_date": pl.Date,
    "gateway": pl.String,
}

METER_EXCHANGES = {
    "meter_id": pl.String,
    "exchanged_at": UTC_TS,
    "old_register_final": pl.Float64,
    "new_register_start": pl.Float64,
}

# Interval consumption derived from register reads (m³ per interval ending at ts).
INTERVALS = {
    "meter_id": pl.String,
    "ts": UTC_TS,
    "volume": pl.Float64,
    "quality": pl.Int16,
    "flag": pl.String,  # A actual | E estimated | M manually edited
    "method": pl.String,  # estimation method code, null for actual reads
}

# DMA boundary flows and pressure: net inflow already summed over inlets minus outlets.
DMA_FLOW = {
    "dma_id": pl.String,
    "ts": UTC_TS,
    "flow_m3h": pl.Float64,
}
DMA_PRESSURE = {
    "dma_id": pl.String,
    "ts": UTC_TS,
    "pressure_m": pl.Float64,  # average zone point pressure
}

DMAS = {
    "dma_id": pl.String,
    "timezone": pl.String,
    "mains_km": pl.Float64,
    "service_connections": pl.Int64,
    "private_pipe_km": pl.Float64,
    "avg_pressure_m": pl.Float64,
    "unmetered_households": pl.Int64,
    "unmetered_non_households": pl.Int64,
}

# Sensor values (water quality, pumps): one row per sensor channel and timestamp.
SENSOR_VALUES = {
    "sensor_id": pl.String,
    "quantity": pl.String,
    "ts": UTC_TS,
    "value": pl.Float64,
    "quality": pl.Int16,
}

# Alert episodes: one row per episode, not per reading.
ALERTS = {
    "code": pl.String,
    "subject_id": pl.String,  # meter, sensor or DMA id
    "start_ts": UTC_TS,
    "end_ts": UTC_TS,  # null while open
    "status": pl.String,  # open | closed
    "severity": pl.String,
    "evidence": pl.String,  # JSON text
}


def empty(schema: dict[str, pl.DataType | type[pl.DataType]]) -> pl.DataFrame:
    return pl.DataFrame(schema=schema)
