"""Scenario tests: the pure analytics chained as the flows chain them, judged against the fleet
simulator's ground truth (issue 4, "Done when"). No database: simulator frames go straight into
``flows.meter_series.meter_series`` (VEE + estimation), ``pipelines.anomalies``, ``dma.daily``,
``dma.leak_detection``, ``dma.leak_events`` and ``dma.water_balance``.

Run with ``-s`` to see the measured figures (NNF rise, NRW, the precision/recall table).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import polars as pl
import pytest

from aquameter.registry import Channel, Device, Dma, MeterGroup, Registry, Vendor
from dma.daily import dma_daily
from dma.inflow import net_inflow
from dma.leak_detection import ALERT_CODE, night_flow_rise_alerts
from dma.leak_events import leak_event_alerts, leak_events
from dma.water_balance import metered_consumption, system_input_volume, water_balance
from flows.meter_series import MeterSeries, meter_series
from pipelines.anomalies import detect_meter_anomalies
from simulators.faults import Fault, random_faults
from simulators.fleet import FleetData, customer_meters, meter_id_of, simulate_fleet

# Local midnight in Asia/Shanghai (UTC+8, no daylight saving): local days, nights and balance
# periods line up exactly with the simulated window.
TZ = "Asia/Shanghai"
START = datetime(2026, 3, 1, 16, tzinfo=UTC)  # 2026-03-02 00:00 local, a Monday
DAYS = 30
MEASURED_CODES = (
    "LEAK_CONTINUOUS",
    "BURST",
    "REVERSE_FLOW",
    "STUCK_METER",
    "TAMPER",
    "LOW_BATTERY",
    "COMMS_LOSS",
    "OVER_CAPACITY",
)
NB_IOT_PERIOD = timedelta(hours=6)  # MeterAnomalyParams.reporting_period default


# The standards' vendors a mixed estate adds: (vendor id, payload format, needs a serial).
STANDARD_VENDORS = (
    ("lwm2m-senml", "senml-json", False),
    ("lwm2m-senml-cbor", "senml-cbor", False),
    ("oms-wmbus", "wmbus", True),
    ("oms-wmbus-hex", "wmbus-hex", True),
    ("cjt188-dtu", "cjt188", True),
)


def scenario_registry(meters_per_dma: int, dmas: int = 2, *, mixed: bool = False) -> Registry:
    """Realistic small DMAs: 8 % small businesses, ~1 % unmetered households, service connections
    equal to meters + unmetered properties, ~13 m of main and ~1.2 m of private pipe per property
    (typical urban densities: ~75 connections per km of main), 40-46 m average pressure. Meters are
    two years old, so METER_AGE (6-year JJG 162 life) is legitimately silent. ``mixed``: the
    households are shared among the JSON and binary vendors and the standards' (SenML JSON/CBOR,
    wireless M-Bus binary/hex via a gateway, CJ/T 188 via a DTU); ids stay the same."""
    register = Channel(
        name="register", quantity="volume", unit="m3", kind="register", role="customer"
    )
    vendors = [
        Vendor(id="aqualink", name="JSON NB-IoT", payload="json", channel=[register]),
        Vendor(id="kamstrup-nb", name="binary NB-IoT", payload="binary-v1", channel=[register]),
        Vendor(
            id="bulk-inlet",
            payload="json",
            channel=[
                Channel(name="flow", quantity="flow", unit="L/s", kind="flow", role="inlet"),
                Channel(name="pressure", quantity="pressure", unit="bar", role="pressure_azp"),
            ],
        ),
    ]
    if mixed:
        vendors += [
            Vendor(id=v, name=v, payload=fmt, channel=[register])  # type: ignore[arg-type]
            for v, fmt, _ in STANDARD_VENDORS
        ]
    serial_vendors = {"kamstrup-nb"} | {v for v, _, serial in STANDARD_VENDORS if serial}
    household_vendors = ["aqualink", "kamstrup-nb"]
    if mixed:
        household_vendors += [v for v, _, _ in STANDARD_VENDORS]
    dma_list: list[Dma] = []
    groups: list[MeterGroup] = []
    start = 1
    for i in range(dmas):
        n_nh = round(meters_per_dma * 0.08)
        n_hh = meters_per_dma - n_nh
        unmetered = max(1, meters_per_dma // 100)
        dma_id = f"DMA-{chr(ord('A') + i)}"
        connections = meters_per_dma + unmetered
        dma_list.append(
            Dma(
                id=dma_id,
                timezone=TZ,
                mains_km=round(connections / 75.0, 2),
                service_connections=connections,
                private_pipe_km=round(connections * 0.0012, 3),
                avg_pressure_m=40.0 + 6.0 * i,
                unmetered_households=unmetered,
            )
        )
        k = len(household_vendors)
        plan = [
            (v, n_hh * (j + 1) // k - n_hh * j // k, "household")
            for j, v in enumerate(household_vendors)
        ]
        for vendor, count, ctype in (*plan, ("aqualink", n_nh, "non_household")):
            wired = mixed and vendor in serial_vendors
            groups.append(
                MeterGroup(
                    vendor=vendor,
                    dma=dma_id,
                    count=count,
                    start=start,
                    id_format="SM{:07d}",
                    account_format="ACC{:07d}",
                    customer_type=ctype,  # type: ignore[arg-type]
                    q3=2.5 if ctype == "household" else 6.3,
                    dn=15 if ctype == "household" else 25,
                    install_date=date(2024, 3, 1),
                    serial_start=70_000_000 + start if wired else None,
                    gateway=f"GW-{vendor}-{dma_id}" if wired else None,
                )
            )
            start += count
    inlets = [Device(id=f"INLET-{d.id}", vendor="bulk-inlet", dma=d.id) for d in dma_list]
    return Registry(dma=dma_list, vendor=vendors, device=inlets, meter_group=groups)


def ids_of(registry: Registry) -> list[str]:
    return [meter_id_of(d) for d, _ in customer_meters(registry)]


@dataclass
class Analysed:
    fleet: FleetData
    meters: pl.DataFrame
    series: MeterSeries
    alerts: pl.DataFrame


def analyse(fleet: FleetData) -> Analysed:
    """VEE, estimation and meter anomalies as ``flows.meter_anomalies`` chains them, at the end
    of the window, with the received reads as uplinks."""
    meters = fleet.meters.join(fleet.dmas.select("dma_id", "timezone"), on="dma_id", how="left")
    series = meter_series(fleet.reads, meters, fleet.exchanges, fleet.dmas, as_of=fleet.end)
    alerts = detect_meter_anomalies(
        series.intervals,
        meters,
        as_of=fleet.end,
        uplinks=fleet.reads.select("meter_id", "ts"),
        failures=series.failures,
    )
    return Analysed(fleet, meters, series, alerts)


def nightly(a: Analysed) -> pl.DataFrame:
    """``dma.daily`` as ``flows.dma_night_flow`` runs it (inlet channels → net inflow)."""
    boundary = a.fleet.dma_flow.with_columns(
        pl.lit("inlet").alias("role"), pl.col("dma_id").alias("channel_id")
    )
    return dma_daily(
        net_inflow(boundary), a.fleet.dma_pressure, a.series.intervals, a.meters, a.fleet.dmas
    )


def nnf_series(daily: pl.DataFrame) -> pl.DataFrame:
    return daily.select(
        "dma_id", pl.col("local_date").alias("night_date"), "nnf_m3h", "mnf_start_ts"
    )


def balance(a: Analysed) -> pl.DataFrame:
    """``dma.water_balance`` over the whole window as one period of local dates."""
    first = (START + timedelta(hours=8)).date()
    periods = pl.DataFrame(
        {
            "period": ["window"],
            "start_date": [first],
            "end_date": [first + timedelta(days=DAYS)],
        }
    )
    boundary = a.fleet.dma_flow.with_columns(pl.lit("inlet").alias("role"))
    siv = system_input_volume(net_inflow(boundary), periods, a.fleet.dmas)
    metered = metered_consumption(a.series.intervals, a.meters, periods, a.fleet.dmas)
    inputs = siv.join(metered, on=["dma_id", "period"])
    return water_balance(inputs, a.fleet.dmas).summary


# --- 1 + 2: DMA leak and water balance --------------------------------------------------------

LEAK_RATE = 2.5  # m³/h at night pressure
LEAK_ONSET = START + timedelta(days=14, hours=14)  # 14:00 local on day 15, after 15 clean nights


@pytest.fixture(scope="module")
def leak_case() -> tuple[Analysed, pl.DataFrame]:
    reg = scenario_registry(150)
    leak = Fault("DMA_LEAK", "DMA-A", LEAK_ONSET, None, {"rate_m3h": LEAK_RATE})
    a = analyse(simulate_fleet(reg, START, DAYS, seed=21, faults=[leak]))
    return a, nightly(a)


def test_dma_leak_raises_nnf_by_its_rate_and_is_alerted(
    leak_case: tuple[Analysed, pl.DataFrame],
) -> None:
    a, daily = leak_case
    onset_night = (LEAK_ONSET + timedelta(hours=8)).date() + timedelta(days=1)
    leaky = daily.filter(pl.col("dma_id") == "DMA-A", pl.col("nnf_m3h").is_not_null())
    before_nights = leaky.filter(pl.col("local_date") < onset_night)["nnf_m3h"].to_list()
    after_nights = leaky.filter(pl.col("local_date") >= onset_night)["nnf_m3h"].to_list()
    assert len(before_nights) >= 12 and len(after_nights) >= 12
    before = sum(before_nights) / len(before_nights)
    after = sum(after_nights) / len(after_nights)
    rise = after - before
    truth = a.fleet.manifest["dmas"]["DMA-A"]
    print(
        f"\nNNF before {before:.3f} m³/h (truth background "
        f"{truth['background_night_m3h']:.3f}), after {after:.3f}: "
        f"rise {rise:.3f} vs injected {LEAK_RATE} m³/h ({100 * (rise / LEAK_RATE - 1):+.1f} %)"
    )
    assert rise == pytest.approx(LEAK_RATE, rel=0.10)
    # NNF before the leak is the background leakage (plus the unmetered allowance's error).
    assert before == pytest.approx(truth["background_night_m3h"], rel=0.25)

    alerts = night_flow_rise_alerts(nnf_series(daily))
    assert set(alerts["subject_id"]) == {"DMA-A"}  # DMA-B has no leak and no alert
    [alert] = alerts.rows(named=True)
    assert alert["code"] == ALERT_CODE and alert["status"] == "open"
    start_night = date.fromisoformat(json.loads(alert["evidence"])["start_night"])
    print(f"DMA_NIGHT_FLOW_RISE start night {start_night}, first leaky night {onset_night}")
    assert abs((start_night - onset_night).days) <= 1
    # start_ts is the MNF window of the change-point night, in its local night.
    local_start = alert["start_ts"].astimezone(ZoneInfo(TZ)).date()
    assert abs((local_start - onset_night).days) <= 1


def test_dma_leak_is_one_leak_event_of_its_size(
    leak_case: tuple[Analysed, pl.DataFrame],
) -> None:
    """The flow's default detector on the same nights: one event in DMA-A only, dated at the
    first leaky night, sized within 15 % of the injected rate, alarmed within 2 nights."""
    _, daily = leak_case
    onset_night = (LEAK_ONSET + timedelta(hours=8)).date() + timedelta(days=1)
    nnf = nnf_series(daily)
    events = leak_events(nnf)
    [event] = events.rows(named=True)
    print(
        f"leak event onset {event['onset_night']}, alarm {event['alarm_night']}, size "
        f"{event['size_m3h']:.3f} m³/h, {event['status']}, confidence {event['confidence']:.3f}"
    )
    assert event["dma_id"] == "DMA-A" and event["kind"] == "step"
    assert abs((event["onset_night"] - onset_night).days) <= 1
    assert (event["alarm_night"] - onset_night).days <= 2
    assert event["size_m3h"] == pytest.approx(LEAK_RATE, rel=0.15)
    assert event["status"] == "confirmed"
    [alert] = leak_event_alerts(events, nnf).rows(named=True)
    assert alert["code"] == ALERT_CODE and alert["status"] == "open"
    assert json.loads(alert["evidence"])["event_id"] == f"DMA-A:{event['onset_night']}"


def test_water_balance_nrw_matches_the_truth(leak_case: tuple[Analysed, pl.DataFrame]) -> None:
    a, _ = leak_case
    summary = balance(a)
    assert summary.height == 2
    for row in summary.iter_rows(named=True):
        truth = a.fleet.manifest["dmas"][row["dma_id"]]
        print(
            f"{row['dma_id']}: NRW {row['nrw_pct']:.2f} % vs truth {truth['nrw_pct']:.2f} %; "
            f"SIV {row['siv_m3']:.1f} vs {truth['siv_m3']:.1f} m³; CARL {row['carl_m3']:.1f} vs "
            f"real losses {truth['real_losses_m3']:.1f} m³; ILI {row['ili']:.2f} vs "
            f"{truth['ili']:.2f}"
        )
        assert row["nrw_pct"] == pytest.approx(truth["nrw_pct"], abs=2.0)
        assert row["siv_m3"] == pytest.approx(truth["siv_m3"], rel=1e-6)
        # Real losses are a remainder after AWWA-default apparent-loss estimates: same scale.
        assert row["carl_m3"] == pytest.approx(truth["real_losses_m3"], rel=0.25)
    # Plausible NRW for these DMAs: background leakage at ILI 2, plus the leak in DMA-A.
    nrw = dict(zip(summary["dma_id"], summary["nrw_pct"], strict=True))
    assert 5.0 < nrw["DMA-B"] < 40.0 and nrw["DMA-A"] > nrw["DMA-B"]


# --- 3: every meter fault is raised with the right code near its start -------------------------


def start_offset_ok(a: Analysed, fault: Fault, alert_start: datetime) -> bool:
    """Within one NB-IoT reporting period of the injected start. STUCK_METER's documented start is
    the first zero interval after the last use, so a start earlier than that is also right when
    the register did not move in between (the meter stopping between two uses looks the same)."""
    if abs(alert_start - fault.start) <= NB_IOT_PERIOD:
        return True
    if fault.code != "STUCK_METER" or alert_start > fault.start:
        return False
    used = a.series.intervals.filter(
        (pl.col("meter_id") == fault.subject)
        & (pl.col("ts") > alert_start)
        & (pl.col("ts") <= fault.start)
    )["volume"]
    return float(used.abs().sum()) == 0.0


@pytest.fixture(scope="module")
def each_fault_case() -> tuple[Analysed, list[Fault]]:
    reg = scenario_registry(100)
    ids = ids_of(reg)
    t = START + timedelta(days=3, hours=5, minutes=7)  # not on the 15-min grid on purpose
    faults = [
        Fault("LEAK_CONTINUOUS", ids[3], t, None, {"rate_lph": 12.0}),
        Fault("BURST", ids[20], t, t + timedelta(hours=3)),
        Fault("REVERSE_FLOW", ids[41], t, t + timedelta(hours=2)),
        Fault("STUCK_METER", ids[60], t, None),
        Fault("TAMPER", ids[110], t + timedelta(days=1), None),
        Fault("LOW_BATTERY", ids[150], t, t + timedelta(days=4)),
        Fault("COMMS_LOSS", ids[190], t, t + timedelta(days=2)),
        Fault("OVER_CAPACITY", ids[120], t + timedelta(days=2), t + timedelta(minutes=2910)),
    ]
    return analyse(simulate_fleet(reg, START, 14, seed=5, faults=faults)), faults


def test_every_meter_fault_is_raised_near_its_start(
    each_fault_case: tuple[Analysed, list[Fault]],
) -> None:
    a, faults = each_fault_case
    for fault in faults:
        mine = a.alerts.filter(
            (pl.col("subject_id") == fault.subject) & (pl.col("code") == fault.code)
        )
        assert mine.height == 1, (
            fault.code,
            a.alerts.filter(pl.col("subject_id") == fault.subject),
        )
        start = mine["start_ts"][0]
        print(f"{fault.code:16s} injected {fault.start:%m-%d %H:%M}, alert {start:%m-%d %H:%M}")
        assert start_offset_ok(a, fault, start), (fault.code, fault.start, start)
        if fault.end is not None and fault.code != "COMMS_LOSS":
            # A fault that ended closes its episode.
            assert mine["status"][0] == "closed", fault.code
    # Nothing else: one alert per fault, no other meter raised anything.
    assert a.alerts.height == len(faults), a.alerts


def over_the_wire(fleet: FleetData, reg: Registry) -> tuple[pl.DataFrame, Counter[str]]:
    """The fleet's meter reads as ingest would get them: every MQTT publish of the traffic
    decoded by its vendor's codec (SenML packs, wM-Bus gateway messages under each meter's key)
    and every CJ/T 188 frame the DTUs push, back into a reads frame; and the readings per
    payload format. What the analytics then find, the encoders carried."""
    from protocols import wmbus
    from protocols.payloads import decode
    from simulators.dtu import cjt188_frames
    from simulators.traffic import (
        TrafficParams,
        build_traffic,
        decode_publish,
        wmbus_key,
        wmbus_meters,
    )

    idents = [f"{d.serial:08d}" for d in wmbus_meters(reg) if d.serial is not None]
    wmbus.set_keyring(wmbus.KeyRing({i: wmbus_key(i) for i in idents}, from_env=False))
    fmt_of = {meter_id_of(d): reg.vendor(d.vendor).payload for d, _ in customer_meters(reg)}
    by_serial = {d.serial: meter_id_of(d) for d, _ in customer_meters(reg) if d.serial}
    rows: list[tuple[str, float, float, int]] = []
    try:
        ups = []
        for pub in build_traffic(fleet, reg, TrafficParams()):
            got = decode_publish(pub, reg)
            assert not getattr(got, "rejected", ()), got.rejected  # type: ignore[attr-defined]
            ups += got
        for frames in cjt188_frames(fleet, reg).values():
            for frame in frames:
                ups += decode(frame, "cjt188")
    finally:
        wmbus.set_keyring(wmbus.KeyRing())
    for u in ups:
        if u.channel != "register":
            continue  # DMA inlet loggers
        assert u.unit == "m3", u
        dev = by_serial[int(u.device[7:])] if u.device.startswith("serial:") else u.device
        rows += [(dev, t, v, u.status) for t, v in zip(u.ts, u.values, strict=True)]
    reads = pl.DataFrame(
        rows, schema=["meter_id", "ts", "register", "quality"], orient="row"
    ).select(
        "meter_id",
        pl.from_epoch(pl.col("ts") * 1_000_000, time_unit="us").dt.replace_time_zone("UTC"),
        "register",
        pl.col("quality").cast(pl.Int16),
    )
    per_format = Counter(fmt_of[m] for m in reads["meter_id"].to_list())
    return reads.sort("meter_id", "ts"), per_format


@pytest.fixture(scope="module")
def mixed_fault_case() -> tuple[Analysed, list[Fault], Counter[str], Counter[str]]:
    reg = scenario_registry(100, mixed=True)
    kind = {meter_id_of(d): reg.vendor(d.vendor).payload for d, _ in customer_meters(reg)}

    def one(fmt: str, n: int = 1) -> str:
        return [m for m, f in kind.items() if f == fmt][n]

    t = START + timedelta(days=3, hours=5, minutes=7)
    faults = [
        Fault("LEAK_CONTINUOUS", one("wmbus"), t, None, {"rate_lph": 12.0}),
        Fault("BURST", one("wmbus-hex"), t, t + timedelta(hours=3)),
        Fault("STUCK_METER", one("cjt188"), t, None),
        # Reverse flow needs the meter's flag (VEE takes an unflagged fall as a bad read):
        # SenML carries it (LwM2M 3424/11), this wM-Bus and CJ/T 188 encoding do not.
        Fault("REVERSE_FLOW", one("senml-json"), t, t + timedelta(hours=2)),
        Fault("LEAK_CONTINUOUS", one("senml-cbor"), t + timedelta(days=1), None),
        Fault("STUCK_METER", one("json"), t, None),
    ]
    fleet = simulate_fleet(reg, START, 14, seed=5, faults=faults)
    reads, per_format = over_the_wire(fleet, reg)
    truth = Counter(kind[m] for m in fleet.reads["meter_id"].to_list() if m in kind)
    return analyse(replace(fleet, reads=reads)), faults, per_format, truth


def test_every_kind_of_meter_arrives_whole_over_its_protocol(
    mixed_fault_case: tuple[Analysed, list[Fault], Counter[str], Counter[str]],
) -> None:
    """Each payload format's reads come back from the wire, every one of them."""
    a, _, per_format, truth = mixed_fault_case
    print(dict(per_format))
    assert set(per_format) == {"json", "binary-v1", "senml-json", "senml-cbor", "wmbus",
                               "wmbus-hex", "cjt188"}  # fmt: skip
    assert per_format == truth


def test_faults_on_every_kind_are_found_through_its_codec(
    mixed_fault_case: tuple[Analysed, list[Fault], Counter[str], Counter[str]],
) -> None:
    """The faults injected on SenML, wM-Bus and CJ/T 188 meters are raised, from the values
    their encoders carried, like those of the JSON meters: right code, near the start, and
    nothing raised on any other meter."""
    a, faults, _, _ = mixed_fault_case
    for fault in faults:
        mine = a.alerts.filter(
            (pl.col("subject_id") == fault.subject) & (pl.col("code") == fault.code)
        )
        assert mine.height == 1, (fault.code, fault.subject, a.alerts)
        assert start_offset_ok(a, fault, mine["start_ts"][0]), (fault.code, fault.start)
    assert set(a.alerts["subject_id"].to_list()) == {f.subject for f in faults}, a.alerts


def test_reverse_flow_survives_vee_as_negative_volume(
    each_fault_case: tuple[Analysed, list[Fault]],
) -> None:
    """The backflow the vendor flags is real water: VEE keeps it (a soft REGISTER_DECREASE)."""
    a, faults = each_fault_case
    rev = next(f for f in faults if f.code == "REVERSE_FLOW")
    assert rev.end is not None
    iv = a.series.intervals.filter(
        (pl.col("meter_id") == rev.subject)
        & (pl.col("ts") > rev.start + timedelta(minutes=15))
        & (pl.col("ts") <= rev.end)
    )
    assert iv.height == 7 and (iv["volume"] < 0).all() and (iv["flag"] == "A").all()
    decreases = a.series.failures.filter(
        (pl.col("meter_id") == rev.subject) & (pl.col("rule") == "REGISTER_DECREASE")
    )
    assert decreases.height > 0 and not decreases["hard"].any()
    reverse_l = next(e for e in a.fleet.manifest["faults"] if e["code"] == "REVERSE_FLOW")[
        "effect"
    ]["reverse_l"]
    assert -float(iv["volume"].sum()) == pytest.approx(reverse_l / 1000.0, abs=0.01)


# --- 4: a clean fleet raises nothing -----------------------------------------------------------


def test_clean_fleet_raises_no_alert() -> None:
    reg = scenario_registry(200)
    a = analyse(simulate_fleet(reg, START, DAYS, seed=3))
    # Meters are two years old, so METER_AGE is silent for the right reason, not excluded.
    assert a.alerts.height == 0, a.alerts.group_by("code").len()
    assert a.series.failures.filter(pl.col("hard")).height == 0
    nnf = nnf_series(nightly(a))
    assert night_flow_rise_alerts(nnf).height == 0
    assert leak_events(nnf).height == 0
    assert nnf["nnf_m3h"].null_count() <= 1  # only the window's last night may be incomplete


# --- 5: precision and recall over larger faulted fleets ----------------------------------------

PR_SEEDS = (1, 2, 3)
PR_COUNTS = {code: 4 for code in MEASURED_CODES} | {"LEAK_CONTINUOUS": 6, "STUCK_METER": 5}


def score(a: Analysed, faults: list[Fault]) -> dict[str, Counter[str]]:
    """Per code: injected, detected (right code, right meter, start within tolerance), missed,
    false (alerts matching no injected fault of that code and meter)."""
    table: dict[str, Counter[str]] = {c: Counter() for c in MEASURED_CODES}
    matched: set[int] = set()
    rows = list(a.alerts.iter_rows(named=True))
    for fault in faults:
        table[fault.code]["injected"] += 1
        hit = next(
            (
                i
                for i, r in enumerate(rows)
                if i not in matched
                and r["code"] == fault.code
                and r["subject_id"] == fault.subject
                and start_offset_ok(a, fault, r["start_ts"])
            ),
            None,
        )
        if hit is None:
            table[fault.code]["missed"] += 1
        else:
            matched.add(hit)
            table[fault.code]["detected"] += 1
    for i, r in enumerate(rows):
        if i not in matched:
            table.setdefault(r["code"], Counter())["false"] += 1
    return table


@pytest.fixture(scope="module")
def pr_table() -> dict[str, Counter[str]]:
    reg = scenario_registry(250)
    ids = ids_of(reg)
    total: dict[str, Counter[str]] = {}
    for seed in PR_SEEDS:
        faults = random_faults(ids, [], START, DAYS, seed, counts=PR_COUNTS)
        a = analyse(simulate_fleet(reg, START, DAYS, seed=seed, faults=faults))
        for code, counts in score(a, faults).items():
            total.setdefault(code, Counter()).update(counts)
    return total


def test_precision_and_recall_over_faulted_fleets(pr_table: dict[str, Counter[str]]) -> None:
    t = pr_table
    print(f"\n{len(PR_SEEDS)} seeds x 500 meters x {DAYS} days")
    print(f"{'code':16s} {'injected':>8s} {'detected':>8s} {'missed':>6s} {'false':>5s}")
    for code, c in sorted(t.items()):
        print(f"{code:16s} {c['injected']:8d} {c['detected']:8d} {c['missed']:6d} {c['false']:5d}")
    injected = sum(c["injected"] for c in t.values())
    detected = sum(c["detected"] for c in t.values())
    false = sum(c["false"] for c in t.values())
    recall = detected / injected
    precision = detected / (detected + false) if detected + false else 0.0
    print(f"recall {recall:.3f}  precision {precision:.3f}  ({injected} faults)")
    assert injected == len(PR_SEEDS) * sum(PR_COUNTS.values())
    assert recall == 1.0
    assert precision >= 0.95
