"""A gateway message of several wM-Bus telegrams with one under a wrong key loses that telegram
only: through the real ingest path into PostgreSQL, the two good meters' readings are stored and
the bad telegram is one quarantine row DECRYPT_FAILED holding that telegram's own bytes.

Why end to end: the codec (``Decoded.rejected``) and the validator (one Rejection per refused
part) are written apart; only the database shows they agree."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from aquameter.registry import load_registry
from ingest.pipeline import IngestPipeline
from ingest.registry_sync import sync_registry
from protocols import wmbus
from protocols.payloads import decode
from protocols.uplink import Frame, FrameOutcome
from protocols.wmbus import DECRYPT_FAILED, KeyRing, encode_wmbus
from sql.migrate import migrate

REGISTRY = """
[[dma]]
id = "DMA-EU"

[[vendor]]
id = "wmbus-water"
payload = "wmbus"
  [[vendor.channel]]
  name = "register"
  quantity = "volume"
  unit = "m3"
  kind = "register"

[[device]]
id = "WM-1"
vendor = "wmbus-water"
dma = "DMA-EU"
serial = 11111111

[[device]]
id = "WM-2"
vendor = "wmbus-water"
dma = "DMA-EU"
serial = 22222222

[[device]]
id = "WM-3"
vendor = "wmbus-water"
dma = "DMA-EU"
serial = 33333333
"""

KEYS = {
    "11111111": bytes.fromhex("00112233445566778899AABBCCDDEEFF"),
    "22222222": bytes.fromhex("0F0E0D0C0B0A09080706050403020100"),
    "33333333": bytes.fromhex("A0A1A2A3A4A5A6A7A8A9AAABACADAEAF"),
}


@pytest.fixture
def keyring() -> Iterator[None]:
    wmbus.set_keyring(KeyRing(KEYS, from_env=False))
    yield
    wmbus.set_keyring(KeyRing())


def _message() -> tuple[bytes, bytes]:
    """Three telegrams back to back (two with CRC blocks), the middle one under a wrong key."""
    bad = encode_wmbus("22222222", 5.5, key=bytes(16), access_number=2)
    good = (
        encode_wmbus("11111111", 42.125, key=KEYS["11111111"], access_number=1, crc=True),
        encode_wmbus("33333333", 7.25, key=KEYS["33333333"], access_number=3, crc=True),
    )
    return good[0] + bad + good[1], bad


def test_codec_keeps_the_good_telegrams(keyring: None) -> None:
    message, bad = _message()
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
    path = tmp_path / "registry.toml"
    path.write_text(REGISTRY)
    with psycopg.connect(empty_db_url) as conn:
        migrate(conn, partitions_ahead=1)
        sync_registry(conn, load_registry(path))
        conn.commit()
    message, bad = _message()
    pipeline = IngestPipeline(empty_db_url, batch_seconds=0.05).start()
    done = threading.Event()
    outcomes: list[FrameOutcome] = []

    def on_durable(outcome: FrameOutcome) -> None:
        outcomes.append(outcome)
        done.set()

    try:
        frame = Frame(source="mqtt", address="gw", payload=message, payload_format="wmbus")
        pipeline.submit(frame, on_durable)
        assert done.wait(60)
    finally:
        pipeline.close()
    with psycopg.connect(empty_db_url) as conn:
        got = conn.execute(
            "SELECT c.device_id, c.name, r.value FROM readings r JOIN channels c "
            "ON c.id = r.channel_id ORDER BY c.device_id"
        ).fetchall()
        rows = conn.execute("SELECT reason, device_id, raw FROM quarantine ORDER BY id").fetchall()
    assert [(d, n, float(v)) for d, n, v in got] == [
        ("WM-1", "register", 42.125),
        ("WM-3", "register", 7.25),
    ]
    assert len(rows) == 1
    reason, device, raw = rows[0]
    assert reason == DECRYPT_FAILED
    assert device in ("WM-2", "serial:22222222")
    assert bytes(raw) == bad
    assert [o.accepted for o in outcomes] == [2]
