"""The fleet simulator's model, truth and traffic, checked on small fleets (pure, no servers)."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from aquameter.registry import Registry, load_registry
from pipelines.schemas import DMA_FLOW, DMA_PRESSURE, DMAS, METER_READS, METERS
from protocols.payloads import decode
from protocols.uplink import PayloadError, Quality
from simulators.faults import Fault, random_faults
from simulators.fleet import (
    FleetParams,
    customer_meters,
    meter_id_of,
    simulate_fleet,
    synthetic_registry,
    write_manifest,
)
from simulators.traffic import TrafficParams, build_traffic, decode_publish, with_traffic

START = datetime(2026, 3, 2, tzinfo=UTC)  # a Monday
DAYS = 14


@pytest.fixture(scope="module")
def registry():
    return synthetic_registry(150, dmas=2)


@pytest.fixture(scope="module")
def meter_ids(registry):
    return [meter_id_of(d) for d, _ in customer_meters(registry)]


@pytest.fixture(scope="module")
def faults(meter_ids):
    t = START + timedelta(days=3, hours=5)
    return [
        Fault("LEAK_CONTINUOUS", meter_ids[0], t, None, {"rate_lph": 15.0}),
        Fault("BURST", meter_ids[1], t, t + timedelta(hours=3)),
        Fault("REVERSE_FLOW", meter_ids[2], t, t + timedelta(hours=2)),
        Fault("STUCK_METER", meter_ids[3], t, None),
        Fault("TAMPER", meter_ids[4], t, None),
        Fault("LOW_BATTERY", meter_ids[5], t, None),
        Fault("COMMS_LOSS", meter_ids[6], t, t + timedelta(days=2)),
        Fault("COMMS_LOSS", meter_ids[7], t, t + timedelta(days=1), {"delivery": "late"}),
        Fault("DMA_LEAK", "DMA-02", START + timedelta(days=5, hours=13), None, {"rate_m3h": 1.5}),
    ]


@pytest.fixture(scope="module")
def fleet(registry, faults, meter_ids):
    params = FleetParams(rollover_meters=[meter_ids[10]])
    return simulate_fleet(registry, START, DAYS, seed=7, faults=faults, params=params)


def _intervals(reads: pl.DataFrame) -> pl.DataFrame:
    return reads.sort("meter_id", "ts").with_columns(
        v=pl.col("register").diff().over("meter_id"),
        dt=pl.col("ts").diff().over("meter_id"),
    )


def test_frames_follow_the_schemas(fleet, registry):
    for frame, schema in (
        (fleet.reads, METER_READS),
        (fleet.dma_flow, DMA_FLOW),
        (fleet.dma_pressure, DMA_PRESSURE),
        (fleet.meters, METERS),
        (fleet.dmas, DMAS),
    ):
        assert frame.schema == pl.Schema(schema)
    n_meters = len(customer_meters(registry))
    assert fleet.meters.height == n_meters
    lost = fleet.manifest["meters"]["reads_lost"]
    assert lost == 2 * 96  # the two-day comms gap, nothing else
    assert fleet.reads.height == n_meters * (DAYS * 96 + 1) - lost
    assert fleet.dma_flow.height == 2 * DAYS * 96
    # Registers are whole litres.
    litres = fleet.reads["register"] * 1000.0
    assert (litres - litres.round(0)).abs().max() < 1e-6


def test_same_seed_same_fleet_and_faults_do_not_move_other_meters(registry, faults, fleet):
    params = FleetParams(rollover_meters=[fleet.manifest["rollovers"][0]["meter"]])
    again = simulate_fleet(registry, START, DAYS, seed=7, faults=faults, params=params)
    assert again.reads.equals(fleet.reads)
    assert again.dma_flow.equals(fleet.dma_flow)
    assert json.dumps(again.manifest, sort_keys=True) == json.dumps(fleet.manifest, sort_keys=True)
    clean = simulate_fleet(registry, START, DAYS, seed=7)
    other = simulate_fleet(registry, START, DAYS, seed=8)
    assert not other.reads["register"].equals(clean.reads["register"])
    # Meters without faults consume exactly the same with and without the faults elsewhere.
    skip = [f.subject for f in faults] + [r["meter"] for r in fleet.manifest["rollovers"]]
    litres = (pl.col("v") * 1000).round(0)
    a = _intervals(clean.reads).filter(~pl.col("meter_id").is_in(skip))
    b = _intervals(fleet.reads).filter(~pl.col("meter_id").is_in(skip))
    assert a.height > 100_000
    assert a.select("meter_id", "ts", litres).equals(b.select("meter_id", "ts", litres))


def test_clean_meters_have_zero_flow_intervals_every_night(fleet, faults, registry):
    faulty = {f.subject for f in faults}
    tz = {d.id: d.timezone for d in registry.dmas}
    iv = (
        _intervals(fleet.reads)
        .filter(~pl.col("meter_id").is_in(list(faulty)) & pl.col("v").is_not_null())
        .join(fleet.meters.select("meter_id", "dma_id", "customer_type"), on="meter_id")
    )
    per_night = []
    for dma_id, part in iv.group_by("dma_id"):
        local = part.with_columns(lt=pl.col("ts").dt.convert_time_zone(tz[str(dma_id[0])]))
        night = local.filter(pl.col("lt").dt.hour() < 5)
        per_night.append(
            night.group_by("meter_id", pl.col("lt").dt.date().alias("d")).agg(
                zeros=(pl.col("v") == 0).sum(), n=pl.len()
            )
        )
    nights = pl.concat(per_night).filter(pl.col("n") >= 16)
    assert nights.height > 1000
    # Every clean meter has zero-flow intervals in every night window.
    assert nights["zeros"].min() >= 1
    assert nights["zeros"].median() >= 12
    # And no clean interval exceeds the meter's Q4 (no false OVER_CAPACITY).
    with_q = iv.join(fleet.meters.select("meter_id", "q4"), on="meter_id")
    assert (with_q["v"] <= with_q["q4"] * 0.25).all()


def test_demand_level_and_diurnal_shape_in_local_time(fleet, faults, registry):
    faulty = {f.subject for f in faults} | {r["meter"] for r in fleet.manifest["rollovers"]}
    tz = {d.id: d.timezone for d in registry.dmas}
    iv = (
        _intervals(fleet.reads)
        .filter(~pl.col("meter_id").is_in(list(faulty)) & pl.col("v").is_not_null())
        .join(fleet.meters.select("meter_id", "dma_id", "customer_type"), on="meter_id")
    )
    hh = iv.filter(pl.col("customer_type") == "household")
    per_meter_day = hh.group_by("meter_id").agg(pl.col("v").sum() / DAYS)
    assert 0.3 <= per_meter_day["v"].mean() <= 0.5
    nh = iv.filter(pl.col("customer_type") == "non_household")
    assert nh.group_by("meter_id").agg(pl.col("v").sum() / DAYS)["v"].mean() > 1.0
    for dma_id, zone in tz.items():
        part = hh.filter(pl.col("dma_id") == dma_id).with_columns(
            # the interval ending at ts mostly lies in the quarter-hour before it
            h=(pl.col("ts") - timedelta(minutes=1)).dt.convert_time_zone(zone).dt.hour(),
            wd=pl.col("ts").dt.convert_time_zone(zone).dt.weekday(),
        )
        by_hour = part.filter(pl.col("wd") <= 5).group_by("h").agg(pl.col("v").mean()).sort("h")
        v = dict(zip(by_hour["h"].to_list(), by_hour["v"].to_list(), strict=True))
        assert v[3] < 0.15 * v[7], (dma_id, v)  # the 07 h local peak, the 03 h trough
        assert v[19] > 3 * v[3]
        assert max(v, key=lambda h: v[h]) in (6, 7, 8)


def test_meter_faults_show_in_reads(fleet, faults, meter_ids):
    iv = _intervals(fleet.reads)
    onset = faults[0].start

    def meter(i: int) -> pl.DataFrame:
        return iv.filter(pl.col("meter_id") == meter_ids[i])

    leak = meter(0).filter(pl.col("ts") > onset + timedelta(minutes=15))
    assert leak.height > 96 and (leak["v"] > 0).all()  # never a zero interval after onset
    burst = meter(1).filter((pl.col("ts") > onset) & (pl.col("ts") <= onset + timedelta(hours=3)))
    assert burst["v"].min() >= 0.8 * 2.5 * 0.25 - 0.002  # ≥ 80 % of Q3 over each interval
    rev = meter(2).filter((pl.col("ts") > onset) & (pl.col("ts") <= onset + timedelta(hours=2)))
    assert (rev["v"] < 0).all()
    assert all(q & Quality.REVERSE_FLOW for q in rev["quality"].to_list())
    stuck = meter(3).filter(pl.col("ts") > onset + timedelta(minutes=15))
    assert (stuck["v"] == 0).all()
    tamper = meter(4).filter(pl.col("ts") >= onset)
    assert all(q & Quality.TAMPER for q in tamper["quality"].to_list())
    assert not any(q & Quality.TAMPER for q in meter(4).filter(pl.col("ts") < onset)["quality"])
    battery = meter(5).filter(pl.col("ts") >= onset)
    assert all(q & Quality.LOW_BATTERY for q in battery["quality"].to_list())
    gap = meter(6)
    assert gap.filter(
        (pl.col("ts") >= onset) & (pl.col("ts") < onset + timedelta(days=2))
    ).is_empty()
    assert gap["dt"].max() == timedelta(days=2, minutes=15)
    late_meter = meter(7)
    assert late_meter.height == DAYS * 96 + 1  # late reads do arrive
    assert fleet.late.height == 96 and set(fleet.late["meter_id"]) == {meter_ids[7]}
    entries = {(f["code"], f["subject"]): f for f in fleet.manifest["faults"]}
    assert entries[("STUCK_METER", meter_ids[3])]["effect"]["unregistered_l"] > 0
    assert entries[("DMA_LEAK", "DMA-02")]["alert"] == "DMA_NIGHT_FLOW_RISE"
    assert entries[("LEAK_CONTINUOUS", meter_ids[0])]["params"]["rate_lph"] == 15.0


def test_rollover_wraps_once_and_is_in_the_manifest(fleet, meter_ids):
    [roll] = fleet.manifest["rollovers"]
    assert roll["meter"] == meter_ids[10] and roll["direction"] == "forward"
    reads = fleet.reads.filter(pl.col("meter_id") == meter_ids[10]).sort("ts")
    v = reads["register"].diff().drop_nulls()
    assert (v < 0).sum() == 1
    [at] = reads.filter(pl.col("register").diff() < 0)["ts"].to_list()
    assert at == datetime.fromisoformat(roll["ts"].replace("Z", "+00:00"))
    assert reads["register"].max() < 1e5 and reads["register"].max() > 99_990


def test_water_balance_closes_and_matches_the_data(fleet, faults, meter_ids):
    dmas = fleet.manifest["dmas"]
    for dma_id, truth in dmas.items():
        flow = fleet.dma_flow.filter(pl.col("dma_id") == dma_id)
        siv = float(flow["flow_m3h"].sum()) * 0.25
        assert siv == pytest.approx(truth["siv_m3"], rel=1e-12)
        assert truth["balance_residual_m3"] == pytest.approx(0.0, abs=0.05)
        assert truth["nrw_m3"] == pytest.approx(truth["siv_m3"] - truth["billed_metered_m3"])
        assert truth["nrw_fraction"] == pytest.approx(truth["nrw_m3"] / truth["siv_m3"])
        assert truth["water_losses_m3"] == pytest.approx(
            truth["real_losses_m3"] + truth["apparent_losses_m3"], abs=0.05
        )
        # Billed = what the registers say (rollover corrected), computed from the reads.
        wraps = fleet.meters.select("meter_id", "dma_id", "register_digits")
        ends = (
            fleet.reads.join(wraps, on="meter_id")
            .filter(pl.col("dma_id") == dma_id)
            .sort("meter_id", "ts")
            .group_by("meter_id")
            .agg(
                d=pl.col("register").diff().drop_nulls(),
                wrap=pl.col("register_digits").first(),
            )
            .explode("d")
            .with_columns(
                d=pl.when(pl.col("d") < -1000)
                .then(pl.col("d") + 10.0 ** pl.col("wrap"))
                .otherwise(pl.col("d"))
            )
        )
        assert float(ends["d"].sum()) == pytest.approx(truth["billed_metered_m3"], abs=1e-6)
    # The stuck meter's missed water is an apparent loss of its DMA.
    stuck = next(f for f in fleet.manifest["faults"] if f["code"] == "STUCK_METER")
    stuck_dma = fleet.meters.filter(pl.col("meter_id") == stuck["subject"])["dma_id"][0]
    assert dmas[stuck_dma]["apparent_losses_m3"] >= stuck["effect"]["unregistered_l"] / 1000 - 0.5
    assert dmas["DMA-01"]["ili"] == pytest.approx(2.0, rel=1e-9)  # background only
    json.dumps(fleet.manifest)  # JSON-serialisable as is


def test_dma_leak_raises_night_flow_by_its_rate(registry, faults, fleet):
    no_leak = simulate_fleet(
        registry,
        START,
        DAYS,
        seed=7,
        faults=[f for f in faults if f.code != "DMA_LEAK"],
        params=FleetParams(rollover_meters=[fleet.manifest["rollovers"][0]["meter"]]),
    )
    leak = next(f for f in faults if f.code == "DMA_LEAK")
    diff = fleet.dma_flow.join(no_leak.dma_flow, on=["dma_id", "ts"]).with_columns(
        d=pl.col("flow_m3h") - pl.col("flow_m3h_right")
    )
    other = diff.filter(pl.col("dma_id") != leak.subject)
    assert other["d"].abs().max() == 0.0
    mine = diff.filter(pl.col("dma_id") == leak.subject)
    before = mine.filter(pl.col("ts") < leak.start - timedelta(minutes=15))
    assert before["d"].abs().max() < 1e-3  # only instrument rounding
    after = mine.filter(pl.col("ts") >= leak.start).with_columns(
        h=pl.col("ts").dt.convert_time_zone("Asia/Shanghai").dt.hour()
    )
    night = after.filter(pl.col("h").is_between(2, 4))
    assert night["d"].mean() == pytest.approx(1.5, rel=0.02)  # rate quoted at night pressure
    assert after["d"].mean() < night["d"].mean()  # FAVAD: less by day, at lower pressure
    truth = fleet.manifest["dmas"][leak.subject]
    [entry] = truth["leaks"]
    assert entry["volume_m3"] == pytest.approx(truth["dma_leak_m3"])
    assert entry["volume_m3"] == pytest.approx(float(after["d"].sum()) * 0.25, rel=1e-3)
    pressure = fleet.dma_pressure.filter(pl.col("dma_id") == leak.subject).with_columns(
        h=pl.col("ts").dt.convert_time_zone("Asia/Shanghai").dt.hour()
    )
    by_h = pressure.group_by("h").agg(pl.col("pressure_m").mean())
    p = dict(zip(by_h["h"].to_list(), by_h["pressure_m"].to_list(), strict=True))
    assert p[3] > p[7] + 4  # night pressure well above the morning-peak pressure


def test_exchange_in_window_matches_the_registry():
    channel = {"name": "register", "quantity": "volume", "unit": "m3", "role": "customer"}
    exchange = {"at": "2026-03-04T12:00:00Z", "old_register_final": 812.5}
    reg = Registry.model_validate(
        {
            "dma": [{"id": "D", "timezone": "Europe/London"}],
            "vendor": [{"id": "v", "payload": "json", "channel": [channel]}],
            "device": [
                {"id": "M1", "vendor": "v", "dma": "D", "meter": {"exchanges": [exchange]}},
                {"id": "M2", "vendor": "v", "dma": "D", "meter": {}},
            ],
        }
    )
    f = simulate_fleet(reg, START, 4, seed=3)
    reads = f.reads.filter(pl.col("meter_id") == "M1").sort("ts")
    at = datetime(2026, 3, 4, 12, tzinfo=UTC)
    before = reads.filter(pl.col("ts") < at)["register"]
    after = reads.filter(pl.col("ts") >= at)["register"]
    assert before[-1] <= 812.5 and 812.5 - before[-1] <= 0.5
    assert after[0] == 0.0 and after[-1] > 0.0
    assert f.exchanges.height == 1 and f.exchanges["old_register_final"][0] == 812.5
    [ex] = f.manifest["exchanges"]
    assert ex["meter"] == "M1"
    # Billed volume is the consumption, not the jump between the two registers.
    billed = f.manifest["dmas"]["D"]["billed_metered_m3"]
    m2 = f.reads.filter(pl.col("meter_id") == "M2")["register"]
    m1_use = (812.5 - before[0]) + after[-1]
    assert billed == pytest.approx(m1_use + (m2[-1] - m2[0]), abs=1e-6)


def test_random_faults_are_reproducible(meter_ids):
    a = random_faults(meter_ids, ["DMA-01"], START, 30, seed=5)
    b = random_faults(meter_ids, ["DMA-01"], START, 30, seed=5)
    assert a == b
    codes = Counter(f.code for f in a)
    assert codes["DMA_LEAK"] == 1 and codes["STUCK_METER"] == 1
    assert len({f.subject for f in a if f.code != "DMA_LEAK"}) == len(a) - 1
    with pytest.raises(ValueError):
        Fault("NOT_A_CODE", "x", START)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Fault("BURST", "x", START, START - timedelta(hours=1))


# --- traffic -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def example():
    from tests.servers import EXAMPLE_REGISTRY

    reg = load_registry(EXAMPLE_REGISTRY)
    ids = [meter_id_of(d) for d, _ in customer_meters(reg)]
    t = START + timedelta(days=1, hours=3)
    faults = [
        Fault("TAMPER", "KMS00003", t, t + timedelta(hours=8)),
        Fault("REVERSE_FLOW", "AQN00004", t, t + timedelta(hours=1)),
        Fault("COMMS_LOSS", "AQN00005", t, t + timedelta(hours=13), {"delivery": "late"}),
        Fault("COMMS_LOSS", "KMS00006", t, t + timedelta(hours=13), {"delivery": "late"}),
        Fault("COMMS_LOSS", "KMS00007", t, t + timedelta(hours=13)),
    ]
    fleet = simulate_fleet(reg, START, 3, seed=11, faults=faults)
    assert len(ids) == 100
    return reg, fleet


def _expected(fleet) -> Counter:
    exp: Counter = Counter()
    for r in fleet.reads.iter_rows():
        exp[(r[0], "register", r[1].timestamp(), r[2], r[3])] += 1
    for r in fleet.inlet_values.iter_rows(named=True):
        exp[(r["device_id"], r["channel"], r["ts"].timestamp(), r["value"], 0)] += 1
    return exp


def _decoded(publishes, reg) -> Counter:
    serial_to_dev = {f"serial:{d.serial}": d.id for d in reg.all_devices() if d.serial}
    got: Counter = Counter()
    for pub in publishes:
        for up in decode_publish(pub, reg):
            dev = serial_to_dev.get(up.device, up.device)
            for t, v in zip(up.ts, up.values, strict=True):
                got[(dev, up.channel, t, v, up.status)] += 1
    return got


def test_every_payload_round_trips_to_exactly_the_readings(example):
    reg, fleet = example
    traffic = build_traffic(fleet, reg)
    expected = _expected(fleet)
    assert _decoded(traffic.publishes, reg) == expected
    c = traffic.counts
    assert c.readings == c.unique_readings == sum(expected.values())
    assert c.meter_readings == fleet.reads.height
    assert c.late_readings == 2 * 52 and c.late_messages >= 2
    # Decoded with the shared codec directly too (sniffed format), units as configured.
    topics = Counter(p.topic.split("/")[-1] for p in traffic.publishes)
    assert topics["batch"] > 0 and topics["up"] > 0
    inlet = next(p for p in traffic.publishes if b'"ch":"flow"' in p.payload)
    [up] = decode(inlet.payload)
    assert up.unit == "L/s" and up.channel == "flow"
    binary = next(p for p in traffic.publishes if "kamstrup" in p.topic)
    assert decode(binary.payload)[0].device.startswith("serial:")
    # Reads per uplink: 4 uplinks a day → 24 reads, unless cut by a gap or a status change.
    sizes = Counter(p.readings for p in traffic.publishes if "kamstrup" in p.topic)
    assert sizes.most_common(1)[0][0] == 24


def test_reads_per_message_is_configurable(example):
    reg, fleet = example
    one = build_traffic(fleet, reg, TrafficParams(reads_per_message=1, concentrators=False))
    assert one.counts.meter_readings == fleet.reads.height
    assert all(p.readings == 1 for p in one.publishes if "bulk-inlet" not in p.topic)
    day = build_traffic(fleet, reg, TrafficParams(reads_per_message=96))
    assert max(p.readings for p in day.publishes if "kamstrup" in p.topic) == 96
    expected = _expected(fleet)
    assert _decoded(one.publishes, reg) == expected


def test_transport_faults_are_counted_and_detectable(example):
    reg, fleet = example
    params = TrafficParams(malformed=9, duplicate_fraction=0.05, reorder_window=25, seed=4)
    traffic = build_traffic(fleet, reg, params)
    c = traffic.counts
    kinds = Counter(p.kind for p in traffic.publishes)
    assert kinds["malformed"] == c.malformed == 9
    assert kinds["duplicate"] == c.duplicates > 0
    assert c.reordered > 0 and c.messages == len(traffic.publishes)
    reasons: Counter = Counter()
    good = []
    for p in traffic.publishes:
        if p.kind == "malformed":
            with pytest.raises(PayloadError) as err:
                decode_publish(p, reg)
            reasons[err.value.reason] += 1
        else:
            good.append(p)
    assert dict(reasons) == c.expected_quarantine
    assert set(reasons) == {"MALFORMED", "BAD_CRC"}
    # Duplicates are exact copies; without them the readings are exactly the fleet's.
    originals = {(p.topic, p.payload) for p in good if p.kind != "duplicate"}
    assert all((p.topic, p.payload) in originals for p in good if p.kind == "duplicate")
    expected = _expected(fleet)
    assert _decoded([p for p in good if p.kind != "duplicate"], reg) == expected
    assert c.readings == c.unique_readings + c.duplicate_readings
    manifest = with_traffic(fleet.manifest, traffic)
    assert manifest["traffic"]["expected_quarantine"] == c.expected_quarantine
    assert manifest["traffic"]["params"]["reorder_window"] == 25


def test_late_backlog_is_sent_after_newer_reads(example):
    reg, fleet = example
    traffic = build_traffic(fleet, reg)
    newest = 0.0
    delays = []
    for p in traffic.publishes:
        ups = decode_publish(p, reg)
        if p.kind == "late":
            # Delivered after traffic holding newer reads: out of time order.
            first_ts = min(min(up.ts) for up in ups)
            assert newest > first_ts
            delays.append(newest - first_ts)
        newest = max(newest, max(max(up.ts) for up in ups))
    assert len(delays) == traffic.counts.late_messages >= 2
    assert max(delays) > 6 * 3600  # the gap's first reads arrive hours late


def test_manifest_file(tmp_path, fleet):
    path = write_manifest(fleet.manifest, tmp_path / "truth" / "manifest.json")
    loaded = json.loads(path.read_text())
    assert loaded["seed"] == 7 and loaded["window"]["days"] == DAYS
    assert {f["code"] for f in loaded["faults"]} >= {"LEAK_CONTINUOUS", "DMA_LEAK", "COMMS_LOSS"}
    assert set(loaded["dmas"]) == {"DMA-01", "DMA-02"}
    assert np.isfinite(loaded["dmas"]["DMA-02"]["nrw_pct"])
