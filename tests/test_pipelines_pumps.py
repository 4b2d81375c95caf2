"""Pump KPIs: specific energy, run hours, starts/stops and trips, worked out by hand."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import polars as pl

from pipelines.pumps import PumpParams, run_hours, specific_energy
from pipelines.schemas import SENSOR_VALUES

T0 = datetime(2024, 5, 1, tzinfo=UTC)
H = timedelta(hours=1)


def samples(sensor: str, quantity: str, points: list[tuple[float, float]]) -> pl.DataFrame:
    """``points``: (hours after T0, value)."""
    return pl.DataFrame(
        {
            "sensor_id": [sensor] * len(points),
            "quantity": [quantity] * len(points),
            "ts": [T0 + h * H for h, _ in points],
            "value": [v for _, v in points],
            "quality": [0] * len(points),
        },
        schema=SENSOR_VALUES,
    )


def test_specific_energy_from_power_and_flow_trapezoid_and_hold():
    frame = pl.concat(
        [
            samples("P1", "power", [(0, 10.0), (0.5, 20.0), (1, 30.0)]),
            samples("P1", "flow", [(0, 100.0), (0.5, 100.0), (1, 100.0)]),
        ]
    )
    trap = specific_energy(frame)
    # Energy: (10+20)/2 x 0.5 + (20+30)/2 x 0.5 = 7.5 + 12.5 = 20 kWh; volume 100 m³/h x 1 h.
    assert trap.select("asset_id", "day", "energy_kwh", "volume_m3").rows() == [
        ("P1", date(2024, 5, 1), 20.0, 100.0)
    ]
    assert trap.item(0, "specific_energy_kwh_m3") == 0.2  # 20 / 100
    assert trap.item(0, "energy_source") == "power"
    assert trap.item(0, "energy_hours") == 1.0
    hold = specific_energy(frame, PumpParams(integration="hold"))
    # Held at the earlier sample: 10 x 0.5 + 20 x 0.5 = 15 kWh; 15 / 100 = 0.15 kWh/m³.
    assert hold.item(0, "energy_kwh") == 15.0
    assert hold.item(0, "specific_energy_kwh_m3") == 0.15


def test_station_counters_preferred_and_split_at_local_midnight():
    # Asia/Shanghai: local midnight 2024-05-02 00:00+08 is 2024-05-01 16:00 UTC. Samples at 15:00
    # and 17:00 UTC (23:00 and 01:00 local), 2 h apart (max_gap raised to 3 h).
    frame = pl.concat(
        [
            samples("E1", "energy", [(15, 1000.0), (17, 1040.0)]),  # 40 kWh: 20 + 20
            samples("E2", "energy", [(15, 500.0), (17, 520.0)]),  # 20 kWh: 10 + 10
            samples("PW", "power", [(15, 999.0), (17, 999.0)]),  # ignored: counters exist
            samples("F", "flow", [(15, 100.0), (17, 300.0)]),  # 200 m³/h at midnight
        ]
    )
    assets = pl.DataFrame({"sensor_id": ["E1", "E2", "PW", "F"], "asset_id": ["ST"] * 4})
    params = PumpParams(timezone="Asia/Shanghai", max_gap=3 * H)
    out = specific_energy(frame, params, assets)
    # Day 1 volume (100+200)/2 x 1 h = 150 m³; day 2 (200+300)/2 x 1 h = 250 m³.
    # Specific energy: 30/150 = 0.2 and 30/250 = 0.12 kWh/m³.
    assert out.select(
        "asset_id", "day", "energy_kwh", "volume_m3", "specific_energy_kwh_m3", "energy_source"
    ).rows() == [
        ("ST", date(2024, 5, 1), 30.0, 150.0, 0.2, "energy"),
        ("ST", date(2024, 5, 2), 30.0, 250.0, 0.12, "energy"),
    ]


def test_counter_gap_and_reset_add_nothing_and_small_volume_has_no_ratio():
    frame = pl.concat(
        [
            # 00:00-00:30 +10; 00:30-03:00 is a 2.5 h gap (> 1 h); 03:00-03:30 a reset; then +10.
            samples("E", "energy", [(0, 100.0), (0.5, 110.0), (3, 150.0), (3.5, 5.0), (4, 15.0)]),
            samples("E", "flow", [(0, 0.5), (1, 0.5)]),  # 0.5 m³ < 1 m³ minimum
        ]
    )
    out = specific_energy(frame)
    row = out.row(0, named=True)
    assert row["energy_kwh"] == 20.0  # 10 + 10
    assert row["energy_hours"] == 1.0  # 00:00-00:30 and 03:30-04:00
    assert row["volume_m3"] == 0.5
    assert row["specific_energy_kwh_m3"] is None


def test_run_hours_starts_stops_and_trips_per_day():
    frame = pl.concat(
        [
            samples("P1", "state", [(0, 0), (6, 1), (8.5, 0), (20, 1), (26, 0), (27, 0)]),
            samples("P1", "trip", [(0, 0), (8.5, 1), (9, 0), (27, 0)]),
            samples("P2", "state", [(0, 1), (1, 1)]),
        ]
    )
    out = run_hours(frame, PumpParams(max_gap=12 * H))
    assert out.select("asset_id", "day", "run_hours", "starts", "stops", "trips").rows() == [
        # Running 06:00-08:30 (2.5 h) and 20:00-24:00 (4 h); started at 06:00 and 20:00, stopped
        # at 08:30; tripped once at 08:30.
        ("P1", date(2024, 5, 1), 6.5, 2, 1, 1),
        # Running 00:00-02:00 (the 20:00 -> 02:00 segment split at midnight); stopped at 02:00.
        ("P1", date(2024, 5, 2), 2.0, 0, 1, 0),
        # No trip channel: trips unknown, not zero.
        ("P2", date(2024, 5, 1), 1.0, 0, 0, None),
    ]
    # State covered 24 h on day 1 and 02:00-03:00 plus 00:00-02:00 = 3 h on day 2.
    assert out.get_column("state_hours").to_list() == [24.0, 3.0, 1.0]


def test_run_hours_on_a_23_hour_dst_day():
    # Europe/London springs forward on 2024-03-31: local day 31 March runs from 00:00 UTC (GMT)
    # to 23:00 UTC (midnight BST), 23 hours. A pump running throughout, sampled hourly in UTC.
    start = datetime(2024, 3, 30, tzinfo=UTC)
    frame = pl.DataFrame(
        {
            "sensor_id": ["P"] * 49,
            "quantity": ["state"] * 49,
            "ts": [start + h * H for h in range(49)],
            "value": [1.0] * 49,
            "quality": [0] * 49,
        },
        schema=SENSOR_VALUES,
    )
    out = run_hours(frame, PumpParams(timezone="Europe/London"))
    # 30 March: 00:00-24:00 GMT = 24 h; 31 March: 23 h; 1 April: 00:00 BST (23:00 UTC) to the
    # last sample at 00:00 UTC = 1 h.
    assert out.select("day", "run_hours").rows() == [
        (date(2024, 3, 30), 24.0),
        (date(2024, 3, 31), 23.0),
        (date(2024, 4, 1), 1.0),
    ]
