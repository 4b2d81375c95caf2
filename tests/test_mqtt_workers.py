"""Several MQTT ingest worker processes on one shared subscription, against the real broker and
PostgreSQL: the load is split, a worker killed outright loses and duplicates nothing, and
``aquameter ingest --mqtt-workers`` runs them."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import psycopg

from aquameter.registry import load_registry
from aquameter.settings import Settings
from ingest.service import vendor_formats
from ingest.workers import MqttWorkers, effective_workers, worker_client_id
from protocols.mqtt import uplink_topic
from protocols.payloads import encode_binary_v1
from tests.mqtt_helpers import create_session, publish_all, skip_unless_v5, wait_count
from tests.servers import EXAMPLE_REGISTRY
from tests.servers import ROOT as REPO

# A topic root and share groups of this run's own: other clients of a shared broker (and other
# runs of this file) neither see our messages nor take them from our share group.
RUN = uuid.uuid4().hex[:8]
ROOT = f"aqt-{RUN}/v1"
NOW = int(time.time()) // 900 * 900
T0 = NOW - 2 * 86400
FORMATS = vendor_formats(load_registry(EXAMPLE_REGISTRY))
ROWS = "SELECT count(*) FROM readings"


def _settings(db_url: str, mqtt_url: str, name: str, **kw: object) -> Settings:
    return Settings(
        database_url=db_url,
        mqtt_url=mqtt_url,
        mqtt_topic_root=ROOT,
        mqtt_shared_group=f"aqt{RUN}{name}",
        mqtt_client_id=f"aqt-{RUN}-{name}",
        mqtt_session_expiry_s=300,
        batch_seconds=0.05,
        **kw,  # type: ignore[arg-type]
    )


def _workers(settings: Settings, mqtt_url: str, n: int = 2) -> MqttWorkers:
    assert settings.database_url is not None
    return MqttWorkers(
        settings,
        settings.database_url,
        mqtt_url,
        FORMATS,
        n,
        report_every_s=0.05,
        restart_min_s=0.5,
        stop_timeout_s=30,
        log_level=logging.WARNING,
    )


def _messages(rounds: range, per_msg: int) -> tuple[list[tuple[str, bytes]], int]:
    """100 messages a round (60 JSON, 40 binary-v1 meters of the example registry), each round
    ``per_msg`` later 15-minute reads of every meter."""
    msgs: list[tuple[str, bytes]] = []
    for r in rounds:
        t0 = T0 + r * per_msg * 900
        for i in range(1, 61):
            dev = f"AQN{i:05d}"
            regs = [100 + i + 0.01 * (r * per_msg + k) for k in range(per_msg)]
            body = {"dev": dev, "t0": t0, "step": 900, "reg": regs, "unit": "m3"}
            msgs.append((uplink_topic(ROOT, "aqualink", dev), json.dumps(body).encode()))
        for i in range(1, 41):
            regs_l = [5000 * i + 7 * (r * per_msg + k) for k in range(per_msg)]
            frame = encode_binary_v1(70000000 + i, t0, 900, regs_l)
            msgs.append((uplink_topic(ROOT, "kamstrup-nb", f"KMS{i:05d}"), frame))
    return msgs, len(msgs) * per_msg


def _count(db_url: str, sql: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(sql).fetchone()  # type: ignore[arg-type]
        return int(row[0]) if row else 0


def _wait(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_effective_workers_falls_back_without_v5_or_group(caplog):
    caplog.set_level(logging.WARNING, logger="aquameter.ingest.workers")
    assert effective_workers(4, v5=True, shared_group="g") == 4
    assert effective_workers(1, v5=False, shared_group=None) == 1
    assert not caplog.records
    assert effective_workers(4, v5=False, shared_group="g") == 1
    assert effective_workers(3, v5=True, shared_group="") == 1
    assert effective_workers(3, v5=True, shared_group=None) == 1
    assert len(caplog.records) == 3
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_two_workers_split_the_load_and_store_each_reading_once(mqtt_url, db_url):
    skip_unless_v5(mqtt_url)
    settings = _settings(db_url, mqtt_url, "split")
    msgs, n = _messages(range(3), 4)
    workers = _workers(settings, mqtt_url).start()
    try:
        assert workers.wait_all("connected", 30)
        pids = {r.pid for r in workers.rows()}
        assert len(pids) == 2 and os.getpid() not in pids  # two processes of their own
        publish_all(mqtt_url, msgs)
        assert wait_count(db_url, ROWS, n) == n
    finally:
        workers.stop()
    rows = workers.rows()
    assert [r.restarts for r in rows] == [0, 0]
    assert all(r.counters["stored"] > 0 for r in rows), [r.counters for r in rows]
    assert sum(r.counters["stored"] for r in rows) == n
    assert sum(r.counters["duplicates"] for r in rows) == 0
    assert sum(r.mqtt["messages"] for r in rows) == len(msgs)
    assert sum(r.mqtt["acked"] for r in rows) == len(msgs)  # the clean stop acked everything
    total = workers.counters()
    assert (total.stored, total.frames) == (n, len(msgs))
    assert _count(db_url, ROWS) == n
    assert _count(db_url, "SELECT count(*) FROM quarantine") == 0

    # The same identities come back to sessions with nothing left to redeliver.
    again = _workers(settings, mqtt_url).start()
    try:
        assert again.wait_all("connected", 30)
        time.sleep(1.0)
    finally:
        again.stop()
    assert again.mqtt_totals()["messages"] == 0


def test_a_worker_that_cannot_start_is_restarted_with_backoff(mqtt_url, db_url):
    broken = db_url.replace("dbname=", "dbname=no_such_db_") if "dbname=" in db_url else None
    assert broken is not None
    settings = _settings(broken, mqtt_url, "broken")
    workers = MqttWorkers(
        settings, broken, mqtt_url, FORMATS, 1, restart_min_s=0.1, log_level=logging.CRITICAL
    ).start()
    try:
        assert _wait(lambda: workers.rows()[0].restarts >= 2, timeout=30)
    finally:
        t = time.monotonic()
        workers.stop()
        stopped_in = time.monotonic() - t
    row = workers.rows()[0]
    assert row.last_exitcode not in (0, None)
    assert not row.alive and stopped_in < 15  # a pending restart does not hold up the stop


def test_stop_mid_stream_commits_and_acks_what_was_read_and_leaves_the_rest(mqtt_url, db_url):
    skip_unless_v5(mqtt_url)
    # Receive Maximum 10: each worker has at most 10 unacknowledged messages; the rest stay
    # queued in its session at the broker.
    settings = _settings(db_url, mqtt_url, "drain", mqtt_receive_maximum=10)
    msgs, n = _messages(range(4), 2)
    workers = _workers(settings, mqtt_url).start()
    stopper = threading.Thread(target=workers.stop)
    try:
        assert workers.wait_all("connected", 30)
        with psycopg.connect(db_url) as lock:
            # Nothing can commit: the stop begins with every received reading uncommitted.
            lock.execute("LOCK TABLE readings IN ACCESS EXCLUSIVE MODE")
            publish_all(mqtt_url, msgs)
            assert _wait(lambda: all(r.counters["frames"] > 0 for r in workers.rows()))
            stopper.start()
            assert workers.wait_all("stopping", 20)  # reading no more, waiting on the lock
            assert all(r.mqtt["acked"] == 0 for r in workers.rows())
            lock.rollback()
        stopper.join(60)
        assert not stopper.is_alive()
    finally:
        if not stopper.is_alive():
            workers.stop()
    first = workers.rows()
    for r in first:
        # Every message read was committed and acknowledged before the disconnect.
        assert r.mqtt["messages"] == r.counters["frames"] == r.mqtt["acked"] > 0
        assert r.counters["stored"] == r.counters["readings_received"]
    read_first = sum(r.mqtt["messages"] for r in first)
    assert read_first < len(msgs)  # it really stopped mid-stream
    stored_first = _count(db_url, ROWS)
    assert stored_first == sum(r.counters["stored"] for r in first)

    # The same sessions hand over exactly what was not acknowledged: nothing twice, nothing lost.
    again = _workers(settings.model_copy(update={"mqtt_receive_maximum": 1000}), mqtt_url).start()
    try:
        assert again.wait_all("connected", 30)
        assert wait_count(db_url, ROWS, n, timeout=30) == n
    finally:
        again.stop()
    second = again.counters()
    assert again.mqtt_totals()["messages"] == len(msgs) - read_first
    assert (second.stored, second.duplicates) == (n - stored_first, 0)


def test_worker_killed_mid_run_is_restarted_and_nothing_is_lost_or_doubled(mqtt_url, db_url):
    skip_unless_v5(mqtt_url)
    settings = _settings(db_url, mqtt_url, "kill")
    first, n_first = _messages(range(0, 2), 6)
    second, n_second = _messages(range(2, 4), 6)
    n = n_first + n_second
    workers = _workers(settings, mqtt_url).start()
    try:
        assert workers.wait_all("connected", 30)
        victim = workers.pid(0)
        assert victim is not None
        # Hold every write behind a table lock, so worker 0 is certainly killed with readings it
        # has received but not committed (and so not acknowledged).
        with psycopg.connect(db_url) as lock:
            lock.execute("LOCK TABLE readings IN ACCESS EXCLUSIVE MODE")
            publish_all(mqtt_url, first)
            assert _wait(lambda: workers.rows()[0].counters["frames"] > 0)
            held = workers.rows()[0]
            assert held.counters["stored"] == 0 and held.mqtt["acked"] == 0
            os.kill(victim, signal.SIGKILL)
            assert _wait(lambda: workers.pid(0) is None or workers.pid(0) != victim)
            # While it is down, the broker keeps routing its share to its offline session.
            publish_all(mqtt_url, second)
            lock.rollback()
        assert wait_count(db_url, ROWS, n, timeout=40) == n
        assert _wait(lambda: workers.rows()[0].restarts == 1)
        assert workers.pid(0) not in (None, victim)
    finally:
        workers.stop()
    rows = workers.rows()
    assert [r.restarts for r in rows] == [1, 0]
    assert rows[0].last_exitcode == 0  # the restarted incarnation stopped cleanly
    assert rows[0].mqtt["connects"] >= 2  # both incarnations connected
    assert _count(db_url, ROWS) == n
    assert _count(db_url, "SELECT count(*) FROM quarantine") == 0
    # The killed incarnation committed nothing, so every reading was stored exactly once by a
    # worker that lived to report it: the redelivered ones by worker 0's second incarnation.
    assert sum(r.counters["stored"] for r in rows) == n
    # Readings may arrive twice, never more: worker 0's catch-up session (protocols/mqtt.py:
    # mosquitto drops $share traffic after a broker restart) replays what it had not
    # acknowledged when killed and what it queued while the worker was down; the database
    # keeps one copy (stored == n above).
    assert sum(r.counters["duplicates"] for r in rows) <= n
    assert rows[0].counters["stored"] > 0 and rows[1].counters["stored"] > 0


def test_cli_mqtt_workers_flag_drains_a_backlog(mqtt_url, db_url):
    skip_unless_v5(mqtt_url)
    settings = _settings(db_url, mqtt_url, "cli")
    assert settings.mqtt_shared_group is not None
    # The sessions of worker 0 and 1 exist (as after an earlier run), so the backlog published
    # now waits for them, split between the two.
    for k in range(2):
        group = settings.mqtt_shared_group
        create_session(
            mqtt_url,
            worker_client_id(settings.mqtt_client_id, k),
            [f"$share/{group}/{ROOT}/+/+/up", f"$share/{group}/{ROOT}/+/gw/+/batch"],
            expiry_s=300,
        )
    msgs, n = _messages(range(2), 3)
    # One malformed uplink, sent twice (a device retrying it): one quarantine row, one repeat.
    bad = (uplink_topic(ROOT, "aqualink", "AQN00001"), b"{not json")
    publish_all(mqtt_url, [*msgs, bad, bad])
    env = {
        **os.environ,
        "AQUAMETER_DATABASE_URL": db_url,
        "AQUAMETER_MQTT_URL": mqtt_url,
        "AQUAMETER_REGISTRY": str(EXAMPLE_REGISTRY),
        "AQUAMETER_MQTT_TOPIC_ROOT": ROOT,
        "AQUAMETER_MQTT_SHARED_GROUP": settings.mqtt_shared_group,
        "AQUAMETER_MQTT_CLIENT_ID": settings.mqtt_client_id,
        "AQUAMETER_MQTT_SESSION_EXPIRY_S": "300",
        "AQUAMETER_BATCH_SECONDS": "0.05",
        "COLUMNS": "200",
        "PYTHONIOENCODING": "utf-8",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "aquameter.cli", "ingest", "--mqtt-workers", "2", "--duration", "8"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 MQTT worker processes" in proc.stdout
    table = _worker_rows(proc.stdout)
    assert sorted(table) == [0, 1], proc.stdout
    assert [table[k]["restarts"] for k in (0, 1)] == [0, 0]
    # Both workers drained their part of the backlog, acknowledged it, and stored each reading once.
    assert all(table[k]["stored"] > 0 for k in (0, 1)), proc.stdout
    assert sum(table[k]["stored"] for k in (0, 1)) == n
    assert sum(table[k]["messages"] for k in (0, 1)) == len(msgs) + 2
    assert sum(table[k]["acked"] for k in (0, 1)) == len(msgs) + 2
    assert sum(table[k]["quarantined"] for k in (0, 1)) == 1, proc.stdout
    assert sum(table[k]["repeats"] for k in (0, 1)) == 1, proc.stdout
    assert _count(db_url, ROWS) == n


def _worker_rows(stdout: str) -> dict[int, dict[str, int]]:
    """The CLI's "MQTT workers" table, parsed back: worker -> numeric columns by header."""
    rows: dict[int, dict[str, int]] = {}
    names: list[str] = []
    for line in stdout.split("MQTT workers", 1)[-1].splitlines():
        cells = [
            c.strip() for c in line.replace("|", "│").strip("│┃ ").replace("┃", "│").split("│")
        ]
        if cells[:2] == ["worker", "pid"]:
            names = cells[2:]
        elif names and len(cells) == len(names) + 2 and cells[0].isdigit():
            values = [int(v.replace(",", "")) for v in cells[2:]]
            rows[int(cells[0])] = dict(zip(names, values, strict=True))
    return rows


def test_the_ingest_command_does_not_load_the_analytics_stack():
    """The ingest service imports the CLI; polars loaded there cost its process about 40 MB it
    never used (quick soak: ingest process 124 → 85 MB in CI, whole tree 299 → 260 MB, against
    a 300 MB target). Only analytics commands load it, when they run."""
    code = (
        "import sys, aquameter.errors, aquameter.cli, ingest.workers, ingest.service;"
        "print(sorted(m for m in ('polars', 'prefect', 'pandas') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
