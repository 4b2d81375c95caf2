"""Device wall-clock times (a wM-Bus date/time record carries no zone) read in a zone: the
conversion ingest and the simulators' decoder share (``protocols.uplink.wall_clock_to_utc``)."""

from __future__ import annotations

import math
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.uplink import wall_clock_to_utc


def wall(*a: int) -> float:
    """A wall-clock time written as if UTC, as the codec returns it."""
    return datetime(*a, tzinfo=UTC).timestamp()


def test_summer_and_winter_offsets() -> None:
    got = wall_clock_to_utc([wall(2026, 7, 1, 12), wall(2026, 1, 15, 11)], "Europe/Berlin")
    assert got == [wall(2026, 7, 1, 10), wall(2026, 1, 15, 10)]


def test_the_repeated_hour_is_read_as_summer_time_and_the_skipped_hour_kept() -> None:
    # 25 October 2026: Berlin goes from 03:00 CEST back to 02:00 CET; 02:30 happens twice.
    assert wall_clock_to_utc([wall(2026, 10, 25, 2, 30)], "Europe/Berlin") == [
        wall(2026, 10, 25, 0, 30)
    ]
    # 29 March 2026: 02:00 CET jumps to 03:00 CEST; a meter saying 02:30 is read at UTC+1.
    assert wall_clock_to_utc([wall(2026, 3, 29, 2, 30)], "Europe/Berlin") == [
        wall(2026, 3, 29, 1, 30)
    ]


def test_utc_unknown_zone_and_impossible_times_pass_through() -> None:
    ts = [wall(2026, 7, 1, 12)]
    assert wall_clock_to_utc(ts, "UTC") is ts
    assert wall_clock_to_utc(ts, "Mars/Olympus_Mons") == ts
    out = wall_clock_to_utc([math.nan, 1e300, -1e300], "Europe/Berlin")
    assert math.isnan(out[0]) and out[1:] == [1e300, -1e300]


@settings(max_examples=300, deadline=None)
@given(
    t=st.floats(allow_nan=True, allow_infinity=True),
    zone=st.sampled_from(["Europe/Berlin", "America/New_York", "Asia/Shanghai", "Nope/Zone"]),
)
def test_never_raises_and_moves_a_time_by_at_most_a_day(t: float, zone: str) -> None:
    (out,) = wall_clock_to_utc([t], zone)
    if math.isfinite(t) and math.isfinite(out):
        assert abs(out - t) <= 86_400
    else:
        assert out is t or (math.isnan(out) and math.isnan(t))


def test_the_summer_time_flag_settles_the_repeated_and_the_skipped_hour() -> None:
    berlin = "Europe/Berlin"
    repeated = [wall(2026, 10, 25, 2, 30)]
    assert wall_clock_to_utc(repeated, berlin, summer=True) == [wall(2026, 10, 25, 0, 30)]
    assert wall_clock_to_utc(repeated, berlin, summer=False) == [wall(2026, 10, 25, 1, 30)]
    skipped = [wall(2026, 3, 29, 2, 30)]  # 02:30 CEST would be 00:30 UTC, 02:30 CET 01:30 UTC
    assert wall_clock_to_utc(skipped, berlin, summer=True) == [wall(2026, 3, 29, 0, 30)]
    assert wall_clock_to_utc(skipped, berlin, summer=False) == [wall(2026, 3, 29, 1, 30)]
    # Outside those hours the flag changes nothing, even when a device gets it wrong.
    july = [wall(2026, 7, 1, 12)]
    assert wall_clock_to_utc(july, berlin, summer=False) == [wall(2026, 7, 1, 10)]


@settings(max_examples=200, deadline=None)
@given(
    minute=st.integers(min_value=0, max_value=366 * 24 * 60 - 1),
    zone=st.sampled_from(["Europe/Berlin", "America/New_York", "Australia/Sydney"]),
)
def test_an_instant_written_with_its_summer_flag_comes_back(minute: int, zone: str) -> None:
    """What a meter writes (its wall clock and SU bit, as the simulator's encoder does) reads
    back as the same instant, the repeated hour included."""
    from zoneinfo import ZoneInfo

    instant = wall(2026, 1, 1) + minute * 60
    local = datetime.fromtimestamp(instant, ZoneInfo(zone))
    written = local.replace(tzinfo=UTC).timestamp()
    assert wall_clock_to_utc([written], zone, bool(local.dst())) == [instant]


def test_the_estates_wmbus_meters_keep_every_reading_when_clocks_go_back() -> None:
    """The demo estate's wM-Bus meters (London and Shanghai DMAs) over 25 October 2026, when
    London's clocks go back: each reading, written as its meter's wall clock and SU bit and
    read back as ingest reads it, is its own instant. Without the SU bit the repeated hour's
    readings collide."""
    from collections import Counter
    from pathlib import Path

    import simulators.traffic as traffic
    from aquameter.registry import load_registry
    from protocols import wmbus
    from protocols.payloads import decode
    from simulators.fleet import simulate_fleet

    reg = load_registry(Path(__file__).parent.parent / "examples" / "estate.toml")
    meters = {f"serial:{d.serial}": d for d in traffic.wmbus_meters(reg)}
    idents = [f"{d.serial:08d}" for d in meters.values()]
    wmbus.set_keyring(wmbus.KeyRing({i: traffic.wmbus_key(i) for i in idents}, from_env=False))
    try:
        fleet = simulate_fleet(reg, datetime(2026, 10, 24, tzinfo=UTC), 3, seed=3)
        ups = []
        for pub in traffic.build_traffic(fleet, reg).publishes:
            vendor, kind = pub.topic[len(traffic.DEFAULT_ROOT) + 1 :].split("/")[:2]
            fmt = reg.vendor(vendor).payload
            if kind == "gw" and fmt in traffic.WMBUS_FORMATS:
                ups += decode(pub.payload, fmt)
    finally:
        wmbus.set_keyring(wmbus.KeyRing())
    got: Counter[tuple[str, float]] = Counter()
    without_su: Counter[tuple[str, float]] = Counter()
    for up in ups:
        dev = meters[up.device]
        assert up.local_clock and up.clock_summer is not None
        zone = reg.clock_zone(dev)
        got.update((dev.id, t) for t in wall_clock_to_utc(up.ts, zone, up.clock_summer))
        without_su.update((dev.id, t) for t in wall_clock_to_utc(up.ts, zone))
    reads = fleet.reads.filter(fleet.reads["meter_id"].is_in([d.id for d in meters.values()]))
    expected = Counter(
        (m, t.timestamp()) for m, t in zip(reads["meter_id"], reads["ts"], strict=True)
    )
    assert {reg.clock_zone(d) for d in meters.values()} == {"Europe/London", "Asia/Shanghai"}
    assert reads.height > 20_000 and got == expected
    assert sum((expected - without_su).values()) > 0  # the repeated hours, read as summer time
