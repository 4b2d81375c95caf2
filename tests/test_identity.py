"""Device identity: readings are accepted only for the identity a transport proved.

Ingest-level tests on a real database; the same rules over a real broker with TLS and an ACL are
in the MQTT security tests."""

from __future__ import annotations

import json
import time

import psycopg

from ingest.pipeline import IngestPipeline
from protocols.uplink import Frame

NOW = time.time()


def _frame(doc: object, peer: str | None, vendor: str | None = None) -> Frame:
    return Frame(
        source="mqtt",
        address="test",
        payload=json.dumps(doc).encode(),
        payload_format="json",
        device_hint=peer if vendor else None,
        peer=peer,
        peer_vendor=vendor,
    )


def _read(dev: str, v: float) -> dict[str, object]:
    return {"dev": dev, "ts": NOW - 60, "reg": v}


def test_spoofs_are_unauthorized_and_the_rest_is_stored(db_url):
    frames = [
        _frame(_read("AQN00001", 1.0), "AQN00001", "aqualink"),  # its own topic: fine
        _frame(_read("AQN00002", 2.0), "AQN00001", "aqualink"),  # payload names another meter
        _frame(_read("AQN00003", 3.0), "AQN00003", "kamstrup-nb"),  # wrong vendor segment
        _frame({"gw": "GW-NORTH-1", "readings": [_read("AQN00004", 4.0)]}, "GW-NORTH-1"),
        # a gateway writing another gateway's meter, beside one of its own
        _frame(
            {"gw": "GW-NORTH-1", "readings": [_read("KMS00001", 5.0), _read("AQN00005", 6.0)]},
            "GW-NORTH-1",
        ),
        _frame(_read("AQN00006", 7.0), None),  # no proven identity (e.g. import): not checked
    ]
    with IngestPipeline(db_url, registry_poll_s=None) as p:
        outcomes = p.submit_many(frames)
    assert [(o.accepted, o.reasons) for o in outcomes] == [
        (1, []),
        (0, ["UNAUTHORIZED"]),
        (0, ["UNAUTHORIZED"]),
        (1, []),
        (1, ["UNAUTHORIZED"]),
        (1, []),
    ]
    assert p.counters.quarantined["UNAUTHORIZED"] == 3
    with psycopg.connect(db_url) as conn:
        details = [r[0] for r in conn.execute("SELECT detail FROM quarantine ORDER BY id")]
        stored = conn.execute("SELECT count(*) FROM readings").fetchone()[0]
    assert stored == 4
    assert "peer 'AQN00001' (proven)" in details[0] and "'AQN00002' (claimed)" in details[0]
    assert "vendor 'kamstrup-nb' (claimed)" in details[1] and "'aqualink'" in details[1]
    assert "peer 'GW-NORTH-1'" in details[2] and "'KMS00001'" in details[2]
