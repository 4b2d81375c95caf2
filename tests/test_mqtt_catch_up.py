"""The catch-up session (protocols/mqtt.py) closes its window again when it alone loses its
connection: the worker's shared subscription was never lost, so it renews it to get the SUBACK
that lets the fence go out. Before, the window stayed open until the main connection happened to
reconnect, and every message meanwhile was handed to the sink twice (stored once, counted as a
duplicate). Real mosquitto (MQTT v5 shared subscriptions), real PostgreSQL."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable

from ingest.pipeline import IngestPipeline
from tests.mqtt_helpers import (
    publish_all,
    register_messages,
    shared_worker,
    skip_unless_v5,
    wait_count,
)


def _wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_catch_up_session_dropped_alone_closes_its_window_again(mqtt_url: str, db_url: str) -> None:
    skip_unless_v5(mqtt_url)
    root = f"aqc-{uuid.uuid4().hex[:8]}/v1"
    t0 = int(time.time()) // 900 * 900 - 2 * 86400
    pipeline = IngestPipeline(db_url, batch_seconds=0.05).start()
    client = shared_worker(mqtt_url, pipeline, root).start(wait_s=30)
    try:
        assert client.connected.is_set(), "the worker never became ready"
        assert client.stats.fences == 1
        assert client.catch_up is not None
        sock = client.catch_up.socket()
        assert sock is not None
        connects = client.stats.connects
        sock.shutdown(socket.SHUT_RDWR)  # the catch-up session's connection alone is lost
        assert _wait_for(lambda: client.stats.fences >= 2), (
            "the catch-up window never closed after its session reconnected alone "
            f"(resubscribes={client.stats.resubscribes})"
        )
        assert client.stats.resubscribes == 1
        assert client.stats.connects == connects  # the main connection stayed up throughout

        handed = client.stats.catch_up
        msgs = register_messages(root, t0)
        publish_all(mqtt_url, msgs)
        assert wait_count(db_url, "SELECT count(*) FROM readings", 40, timeout=60) == 40
        assert _wait_for(lambda: client.stats.catch_up_skipped >= 40)
        assert client.stats.catch_up == handed  # not one handed to the sink a second time
        assert pipeline.counters.duplicates == 0
    finally:
        client.stop()
        pipeline.close()
