"""Wireless M-Bus / OMS codec against telegrams and values nobody here wrote.

Cases are data in ``tests/cases/wmbus/<case>/`` (``telegram.hex``, ``expected.json`` quoting its
source): published example telegrams of wmbusmeters with their (published, test-only) keys. Two
independent decoders check ours: pyMeterBus decodes the same data records (wrapped into a wired
M-Bus long frame, which it reads), and the wmbusmeters binary, when built (see
``/work/shared/vendor/wmbusmeters/README.md``), decodes the same telegrams.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import wmbus
from protocols.payloads import BAD_CRC, MALFORMED, decode
from protocols.uplink import PayloadError, Quality
from protocols.wmbus import (
    DECRYPT_FAILED,
    KeyRing,
    add_crcs,
    encode_wmbus,
    parse_records,
    parse_telegram,
)

CASES = Path(__file__).parent / "cases" / "wmbus"
ALL = sorted(p.name for p in CASES.iterdir())
WMBUSMETERS = os.environ.get(
    "AQUAMETER_WMBUSMETERS", "/tmp/wmbusmeters-build/wmbusmeters-3.0.0/build/wmbusmeters"
)


def _case(name: str) -> tuple[bytes, dict[str, Any]]:
    folder = CASES / name
    spec = json.loads((folder / "expected.json").read_text())
    assert spec["source"], "a case quotes where its telegram comes from"
    return bytes.fromhex((folder / "telegram.hex").read_text().strip()), spec


def _ring(spec: dict[str, Any]) -> KeyRing:
    keys = {spec["meter_id"]: bytes.fromhex(spec["key"])} if spec.get("key") else {}
    return KeyRing(keys, from_env=False)


@pytest.fixture
def keyring() -> Iterator[None]:
    yield
    wmbus.set_keyring(KeyRing())


@pytest.mark.parametrize("case", ALL)
def test_case(case: str, keyring: None) -> None:
    telegram, spec = _case(case)
    wmbus.set_keyring(_ring(spec))
    # as hex text, as binary, and as binary with format A CRC blocks: the same outcome
    for payload, fmt in (
        (telegram.hex().encode(), "wmbus-hex"),
        (telegram, "wmbus"),
        (add_crcs(telegram), "wmbus"),
    ):
        if "error" in spec["expected"]:
            with pytest.raises(PayloadError) as err:
                decode(payload, fmt, None)
            assert err.value.reason == spec["expected"]["error"], err.value.detail
            continue
        ups = decode(payload, fmt, None)
        assert {u.device for u in ups} == {f"serial:{spec['meter_id']}"}
        got = {u.channel: u.values[0] for u in ups}
        assert got == pytest.approx(spec["expected"]["uplinks"], abs=1e-9)


def _wired(records: bytes) -> bytes:
    """A wired M-Bus long frame (RSP_UD, CI 0x72) holding ``records``: what pyMeterBus reads."""
    body = bytes.fromhex("0800724455223342AE0407550000 00".replace(" ", "")) + records
    return bytes([0x68, len(body), len(body), 0x68]) + body + bytes([sum(body) & 0xFF, 0x16])


def _plain_records(telegram: bytes, ring: KeyRing) -> bytes:
    """The application layer of ``telegram`` after decryption (2F2F fillers stripped)."""
    t = parse_telegram(telegram, ring)
    assert t.records
    head = 15 if telegram[10] == 0x7A else 23
    cw = int.from_bytes(telegram[head - 2 : head], "little")
    body = telegram[head:]
    if (cw >> 8) & 0x1F == 5:
        n = 16 * ((cw >> 4) & 0x0F)
        iv = telegram[2:10] + bytes([telegram[11]]) * 8
        body = wmbus._decrypt_mode5(ring.key_for(t.meter_id) or b"", iv, body[:n], "") + body[n:]
    return body.lstrip(b"\x2f")


@pytest.mark.parametrize(
    "case",
    [c for c in ALL if "error" not in _case(c)[1]["expected"] and _case(c)[1].get("mode") != 7],
)
def test_same_records_as_pymeterbus(case: str) -> None:
    meterbus = pytest.importorskip("meterbus")
    telegram, spec = _case(case)
    plain = _plain_records(telegram, _ring(spec))
    ours = [r for r in parse_records(plain)]
    theirs = meterbus.load(_wired(plain)).body.bodyPayload.records
    compared = 0
    for mine, other in zip(ours, theirs, strict=False):
        info = other.interpreted
        if mine.quantity in ("volume", "flow", "error_flags"):
            assert isinstance(info["value"], (int, Decimal))
            assert mine.value == pytest.approx(float(info["value"]), rel=1e-9, abs=1e-12)
            assert info["storage_number"] == mine.storage
            compared += 1
        elif mine.quantity == "datetime" and mine.value is not None:
            from datetime import UTC, datetime

            stamp = datetime.fromtimestamp(mine.value, UTC).strftime("%Y-%m-%dT%H:%M")
            assert stamp == info["value"]
            compared += 1
    assert compared >= 2


@pytest.mark.parametrize("case", [c for c in ALL if "wmbusmeters" in _case(c)[1]])
def test_same_total_as_wmbusmeters(case: str, keyring: None) -> None:
    if not (Path(WMBUSMETERS).is_file() and os.access(WMBUSMETERS, os.X_OK)):
        pytest.skip(f"wmbusmeters not built at {WMBUSMETERS} (build.sh in shared/vendor)")
    telegram, spec = _case(case)
    peer = spec["wmbusmeters"]
    run = subprocess.run(
        [
            WMBUSMETERS,
            "--format=json",
            telegram.hex().upper(),
            "MyMeter",
            peer["driver"],
            spec["meter_id"],
            spec["key"] or "NOKEY",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TZ": "UTC"},
        check=False,
    )
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert lines, f"wmbusmeters decoded nothing: {run.stderr[-300:]}"
    assert lines[0]["total_m3"] == pytest.approx(peer["total_m3"])
    wmbus.set_keyring(_ring(spec))
    ours = {u.channel: u.values[0] for u in decode(telegram, "wmbus", None)}
    assert ours["register"] == pytest.approx(lines[0]["total_m3"], abs=1e-9)


def test_many_telegrams_in_one_message(keyring: None) -> None:
    key = bytes(range(16))
    wmbus.set_keyring(KeyRing({"12345678": key}, from_env=False))
    a = encode_wmbus("12345678", 10.5, key=key, crc=True)
    b = encode_wmbus("87654321", 1.25)
    ups = decode(a + b, "wmbus", None)
    assert [(u.device, u.values) for u in ups] == [
        ("serial:12345678", [10.5]),
        ("serial:87654321", [1.25]),
    ]
    text = f"{a.hex()}\n0x{b.hex().upper()}".encode()
    assert [u.values for u in decode(text, "wmbus-hex", None)] == [[10.5], [1.25]]


def test_corrupted_crc_block_is_bad_crc() -> None:
    frame = bytearray(add_crcs(encode_wmbus("12345678", 3.0)))
    frame[-1] ^= 0xFF
    with pytest.raises(PayloadError) as err:
        decode(bytes(frame), "wmbus", None)
    assert err.value.reason in (BAD_CRC, MALFORMED)


def test_no_key_is_decrypt_failed_and_power_low_is_low_battery(keyring: None) -> None:
    key = bytes(16)
    tg = encode_wmbus("11112222", 7.0, key=key, status=0x04)
    wmbus.set_keyring(KeyRing(from_env=False))
    with pytest.raises(PayloadError) as err:
        decode(tg, "wmbus", None)
    assert err.value.reason == DECRYPT_FAILED
    wmbus.set_keyring(KeyRing({"11112222": key}, from_env=False))
    (up,) = decode(tg, "wmbus", None)
    assert up.status == int(Quality.LOW_BATTERY)


def test_keys_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = bytes(range(16, 32))
    monkeypatch.setenv("AQUAMETER_WMBUS_KEY_11112222", key.hex())
    keys = tmp_path / "keys"
    keys.write_text(f"# id key\n22223333 {key.hex().upper()}\n")
    keys.chmod(0o600)
    monkeypatch.setenv("AQUAMETER_WMBUS_KEYS_FILE", str(keys))
    ring = KeyRing()
    assert ring.key_for("11112222") == key
    assert ring.key_for("22223333") == key
    assert ring.key_for("99999999") is None
    monkeypatch.setenv("AQUAMETER_WMBUS_KEY_33334444", "not-hex")
    tg = encode_wmbus("33334444", 1.0, key=key)
    with pytest.raises(PayloadError) as err:
        wmbus.decode_wmbus(tg, keys=KeyRing())
    assert err.value.reason == DECRYPT_FAILED
    assert "not-hex" not in err.value.detail  # the key text never reaches a quarantine row


@settings(max_examples=100, deadline=None)
@given(
    meter=st.integers(min_value=0, max_value=99_999_999),
    litres=st.integers(min_value=-(2**31), max_value=2**31 - 1),
    acc=st.integers(min_value=0, max_value=255),
    mode=st.sampled_from([0, 5, 7]),
    crc=st.booleans(),
)
def test_round_trip(meter: int, litres: int, acc: int, mode: int, crc: bool) -> None:
    meter_id = f"{meter:08d}"
    key = bytes(range(16)) if mode else None
    tg = encode_wmbus(
        meter_id, litres / 1000, key=key, access_number=acc, crc=crc, mode=mode, counter=acc * 7
    )
    ring = KeyRing({meter_id: bytes(range(16))}, from_env=False)
    (up,) = wmbus.decode_wmbus(tg, keys=ring)
    # The registry's integer serial: id 00001234 is serial 1234, leading zeros and all.
    assert up.device == f"serial:{meter}" and up.channel == "register" and up.unit == "m3"
    assert up.values == [pytest.approx(litres / 1000, abs=1e-9)]


def _registry(
    payload: str,
    serials: dict[str, int],
    timezone: str = "UTC",
    extra: dict[str, str] | None = None,
) -> str:
    """One DMA (in ``timezone``), one wM-Bus vendor speaking ``payload``, and a device per (id,
    serial), with ``extra`` TOML lines for some devices."""
    head = f"""
[[dma]]
id = "DMA-EU"
timezone = "{timezone}"

[[vendor]]
id = "wmbus-water"
payload = "{payload}"
  [[vendor.channel]]
  name = "register"
  quantity = "volume"
  unit = "m3"
  kind = "register"
"""
    return head + "".join(
        f'\n[[device]]\nid = "{d}"\nvendor = "wmbus-water"\ndma = "DMA-EU"\nserial = {n}\n'
        + (extra or {}).get(d, "")
        for d, n in serials.items()
    )


WMBUS_REGISTRY = _registry("wmbus-hex", {"WM-1": 12345678})


def _ingest(url: str, tmp_path: Path, registry: str, payloads: list[bytes], fmt: str) -> list[Any]:
    """Register ``registry`` in the empty database ``url``, then put each payload through the
    real ingest pipeline as its own frame, waiting until each is durable; the outcomes."""
    import threading

    import psycopg

    from aquameter.registry import load_registry
    from ingest.pipeline import IngestPipeline
    from ingest.registry_sync import sync_registry
    from protocols.uplink import Frame, FrameOutcome
    from sql.migrate import migrate

    path = tmp_path / "registry.toml"
    path.write_text(registry)
    with psycopg.connect(url) as conn:
        migrate(conn, partitions_ahead=1)
        sync_registry(conn, load_registry(path))
        conn.commit()
    pipeline = IngestPipeline(url, batch_seconds=0.05).start()
    done = threading.Event()
    outcomes: list[FrameOutcome] = []

    def on_durable(outcome: FrameOutcome) -> None:
        outcomes.append(outcome)
        done.set()

    try:
        for payload in payloads:
            done.clear()
            frame = Frame(source="mqtt", address="gw", payload=payload, payload_format=fmt)
            pipeline.submit(frame, on_durable)
            assert done.wait(60)
    finally:
        pipeline.close()
    return outcomes


def _stored(url: str) -> tuple[list[tuple[str, str, float]], list[tuple[Any, ...]]]:
    """(device, channel, value) of every reading by device; (reason, device, detail, raw) of
    every quarantine row in order."""
    import psycopg

    with psycopg.connect(url) as conn:
        got = conn.execute(
            "SELECT c.device_id, c.name, r.value FROM readings r JOIN channels c "
            "ON c.id = r.channel_id ORDER BY c.device_id"
        ).fetchall()
        rows = conn.execute(
            "SELECT reason, device_id, detail, raw FROM quarantine ORDER BY id"
        ).fetchall()
    return [(d, n, float(v)) for d, n, v in got], rows


def test_gateway_message_into_the_database(
    empty_db_url: str, tmp_path: Path, keyring: None
) -> None:
    """A gateway's message of three telegrams through the real pipeline: the keyed one is
    stored, the one for a meter without a key is DECRYPT_FAILED, the unknown meter
    UNKNOWN_DEVICE; the key is nowhere in the database."""
    key = bytes.fromhex("00112233445566778899AABBCCDDEEFF")
    wmbus.set_keyring(KeyRing({"12345678": key}, from_env=False))
    telegrams = (
        encode_wmbus("12345678", 42.125, key=key, crc=True),
        encode_wmbus("55555555", 1.0, key=bytes(16)),
        encode_wmbus("77777777", 2.0),
    )
    # A gateway publishing one hex telegram per message.
    outcomes = _ingest(
        empty_db_url, tmp_path, WMBUS_REGISTRY, [t.hex().encode() for t in telegrams], "wmbus-hex"
    )
    got, rows = _stored(empty_db_url)
    assert got == [("WM-1", "register", 42.125)]
    assert [r[0] for r in rows] == ["DECRYPT_FAILED", "UNKNOWN_DEVICE"]
    assert all(key.hex() not in (r[2] or "").lower() for r in rows)
    assert [o.accepted for o in outcomes] == [1, 0, 0]


# --- one bad telegram among good ones costs that telegram only --------------------------------
# Why end to end: the codec (``Decoded.rejected``) and the validator (one Rejection per refused
# part) are written apart; only the database shows they agree.
PARTIAL_REGISTRY = _registry("wmbus", {"WM-1": 11111111, "WM-2": 22222222, "WM-3": 33333333})

PARTIAL_KEYS = {
    "11111111": bytes.fromhex("00112233445566778899AABBCCDDEEFF"),
    "22222222": bytes.fromhex("0F0E0D0C0B0A09080706050403020100"),
    "33333333": bytes.fromhex("A0A1A2A3A4A5A6A7A8A9AAABACADAEAF"),
}


def _partial_message() -> tuple[bytes, bytes]:
    """Three telegrams back to back (two with CRC blocks), the middle one under a wrong key."""
    bad = encode_wmbus("22222222", 5.5, key=bytes(16), access_number=2)
    good = (
        encode_wmbus("11111111", 42.125, key=PARTIAL_KEYS["11111111"], access_number=1, crc=True),
        encode_wmbus("33333333", 7.25, key=PARTIAL_KEYS["33333333"], access_number=3, crc=True),
    )
    return good[0] + bad + good[1], bad


def test_codec_keeps_the_good_telegrams(keyring: None) -> None:
    wmbus.set_keyring(KeyRing(PARTIAL_KEYS, from_env=False))
    message, bad = _partial_message()
    ups = decode(message, "wmbus", None)
    assert [(u.device, u.values) for u in ups] == [
        ("serial:11111111", [42.125]),
        ("serial:33333333", [7.25]),
    ]
    ((err, raw),) = ups.rejected
    assert err.reason == DECRYPT_FAILED and err.device == "serial:22222222"
    assert raw == bad


def test_one_wrong_key_in_three_telegrams_into_postgres(
    empty_db_url: str, tmp_path: Path, keyring: None
) -> None:
    wmbus.set_keyring(KeyRing(PARTIAL_KEYS, from_env=False))
    message, bad = _partial_message()
    outcomes = _ingest(empty_db_url, tmp_path, PARTIAL_REGISTRY, [message], "wmbus")
    got, rows = _stored(empty_db_url)
    assert got == [("WM-1", "register", 42.125), ("WM-3", "register", 7.25)]
    assert len(rows) == 1
    reason, device, _, raw = rows[0]
    assert reason == DECRYPT_FAILED
    assert device in ("WM-2", "serial:22222222")
    assert bytes(raw) == bad
    assert [o.accepted for o in outcomes] == [2]


# --- the meter's clock: its date/time record is its wall clock, read in its zone -----------------
CLOCK_REGISTRY = _registry(
    "wmbus",
    {"WM-LOCAL": 123456, "WM-UTC": 22222222},
    timezone="Europe/Berlin",
    extra={"WM-UTC": 'clock = "utc"\n'},
)


def test_meter_time_is_read_in_the_meters_clock_zone(empty_db_url: str, tmp_path: Path) -> None:
    """An OMS meter keeps local legal time and its date/time record carries no zone: a reading
    taken at 10:00 UTC says 12:00 in a Berlin summer and 11:00 in its winter. Ingest stores the
    instant, 10:00 UTC, both times; a meter registered with ``clock = "utc"`` is read as UTC.
    In the hour that repeats on 25 October the meter's summer-time bit (SU) tells 02:30 CEST
    from 02:30 CET. The local meter's id 00123456 also resolves to its registry serial 123456."""
    from datetime import UTC, datetime
    from zoneinfo import ZoneInfo

    import psycopg

    berlin = ZoneInfo("Europe/Berlin")
    summer = datetime(2026, 7, 1, 10, 0, tzinfo=UTC).timestamp()
    winter = datetime(2026, 1, 15, 10, 0, tzinfo=UTC).timestamp()
    twice = [datetime(2026, 10, 25, h, 30, tzinfo=UTC).timestamp() for h in (0, 1)]
    payloads = [
        encode_wmbus("00123456", 1.0, meter_time=summer, clock=berlin),
        encode_wmbus("00123456", 2.0, meter_time=winter, clock=berlin),
        encode_wmbus("22222222", 3.0, meter_time=summer),  # a meter set to UTC
        encode_wmbus("00123456", 4.0, meter_time=twice[0], clock=berlin),  # 02:30, SU set
        encode_wmbus("00123456", 5.0, meter_time=twice[1], clock=berlin),  # 02:30, SU clear
    ]
    decoded = [wmbus.decode_wmbus(p)[0] for p in payloads[3:]]
    assert decoded[0].ts == decoded[1].ts  # the same wall time...
    assert [u.clock_summer for u in decoded] == [True, False]  # ...told apart by SU
    outcomes = _ingest(empty_db_url, tmp_path, CLOCK_REGISTRY, payloads, "wmbus")
    assert [o.accepted for o in outcomes] == [1, 1, 1, 1, 1]
    with psycopg.connect(empty_db_url) as conn:
        got = conn.execute(
            "SELECT c.device_id, r.value, r.ts FROM readings r JOIN channels c "
            "ON c.id = r.channel_id ORDER BY r.value"
        ).fetchall()
    assert [(d, float(v), ts.timestamp()) for d, v, ts in got] == [
        ("WM-LOCAL", 1.0, summer),
        ("WM-LOCAL", 2.0, winter),
        ("WM-UTC", 3.0, summer),
        ("WM-LOCAL", 4.0, twice[0]),
        ("WM-LOCAL", 5.0, twice[1]),
    ]
