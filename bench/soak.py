"""Fault-injection soak of the real ingest: steady MQTT load through crashes and outages.

``aquameter ingest --mqtt-workers 2`` runs as a subprocess against a private PostgreSQL 15 and a
private mosquitto (both started here on free loopback ports, in a temp dir), while a paho
publisher (QoS 1, persistent MQTT v5 session) sends N readings at a steady rate and keeps
publishing through every fault; paho queues and resends what the broker did not take. Only
messages whose PUBACK arrived count as published. In order, it injects:

1. ``worker-kill``     SIGKILL one MQTT worker process (a child of the ingest process, which
                       restarts it);
2. ``pg-restart``      ``pg_ctl stop -m immediate`` and start at once (crash recovery);
3. ``broker-restart``  the broker killed (``--broker-kill term``: SIGTERM, it saves its state;
                       ``kill``: SIGKILL, only what its autosave wrote survives) and started again;
4. ``db-outage``       ``pg_ctl stop -m fast``, the database held down ``--outage-s``, started.

Each fault's recovery time runs from the fault's end (the kill; the server accepting again)
until the stored count caught up with the published one: lag (published - stored readings) at
most one second of traffic. Peak RSS is the sum over the ingest process and its children,
sampled every 0.5 s from /proc. At the end it waits for the last PUBACKs and for the stored
count to settle, then compares what was published with what the database holds:

- lost = published readings whose (channel, ts) is not in ``readings``;
- duplicated = rows beyond distinct (channel, ts) (0 by the unique key), and the sum of the
  stored values against the sum computed from what was published (a value stored twice or
  wrongly would show there).

Exits 1 with one line saying what failed when lost or duplicated is not 0.

The broker runs ``deploy/mosquitto.conf`` (its listener, persistence_location, log and
authentication lines replaced by private ones); ``--broker-config defaults`` runs mosquitto's
defaults instead (no persistence, 1000 queued messages per client), to show what they lose.

    .venv/bin/python bench/soak.py                       # 1,000,000 readings, 60 s outage
    .venv/bin/python bench/soak.py --quick               # 20,000 readings, 5 s outage, < 3 min
    .venv/bin/python bench/soak.py --quick --broker-kill kill --broker-config defaults
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from aquameter.embedded import free_port, port_open

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
DEPLOY_CONF = ROOT / "deploy" / "mosquitto.conf"
TOPIC_ROOT = "aquameter/v1"
VENDOR = "soakjson"
PROBE_VENDOR = "soakprobe"
STEP_S = 60
SAMPLE_S = 0.5
STABLE_S = 5.0  # a fault counts as recovered once the lag stayed down this long
# Lines of deploy/mosquitto.conf the soak replaces with its private ones.
REPLACED = {
    "listener",
    "persistence_location",
    "log_dest",
    "log_type",
    "allow_anonymous",
    "password_file",
    "acl_file",
    "pid_file",
    "user",
    "certfile",
    "keyfile",
    "cafile",
}


def say(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def wait_for(what: str, check, timeout_s: float, every: float = 0.1):
    """Poll ``check`` until it returns something truthy; raise a clear error after timeout."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as err:  # the server is still starting
            last = err
        time.sleep(every)
    raise TimeoutError(
        f"{what}: not ready after {timeout_s:.0f} s" + (f" ({last})" if last else "")
    )


# --- private servers --------------------------------------------------------------------------


class PrivatePostgres:
    """A PostgreSQL 15 cluster of our own in ``root`` (run as the postgres user when we are root:
    PostgreSQL refuses to run as root)."""

    def __init__(self, root: Path, port: int, bindir: Path) -> None:
        self.root = root
        self.port = port
        self.bindir = bindir
        self.data = root / "data"
        self.log = root / "postgres.log"
        self.sock = root / "sock"
        self.as_postgres = os.geteuid() == 0

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _cmd(self, tool: str, *args: str, timeout: float = 180) -> None:
        cmd = [str(self.bindir / tool), *args]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed: {res.stderr.strip()[-500:]}")

    def init(self) -> None:
        self.root.mkdir(parents=True)
        self.sock.mkdir()
        if self.as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(self.sock, "postgres", "postgres")
        self._cmd("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")

    def start(self) -> None:
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.sock}"
        self._cmd(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "300", "-o", opts,
            "start",
        )  # fmt: skip
        wait_for("PostgreSQL", self._accepts, 120)

    def stop(self, mode: str) -> None:
        self._cmd("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "300", "stop")

    def _accepts(self) -> bool:
        with psycopg.connect(self.url, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()


class PrivateBroker:
    """mosquitto on a free loopback port, from deploy/mosquitto.conf or from its defaults."""

    def __init__(self, root: Path, port: int, config: str) -> None:
        self.root = root
        self.port = port
        self.conf = root / "mosquitto.conf"
        self.log = root / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(exe).exists():
            raise SystemExit("mosquitto not found on PATH (Debian package mosquitto)")
        self.exe = exe
        root.mkdir(parents=True)
        lines = [f"# written by bench/soak.py ({config})"]
        if config == "deploy":
            for raw in DEPLOY_CONF.read_text().splitlines():
                line = raw.strip()
                if line and not line.startswith("#") and line.split()[0] not in REPLACED:
                    lines.append(line)
            lines.append(f"persistence_location {root}/")
        lines += [
            f"listener {port} 127.0.0.1",
            "allow_anonymous true",
            f"log_dest file {self.log}",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        if os.geteuid() == 0:
            # As root mosquitto would switch to its own user, which cannot write our temp dir.
            lines.append("user root")
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for(f"mosquitto on 127.0.0.1:{self.port}", lambda: port_open(self.port), 60)

    def kill(self, sig: int) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the load ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Message i: meter i % meters, readings slots (i // meters) * per_msg + j, one per minute;
    value (m³) = meter * 10 + slot / 1000, so the stored sum can be checked exactly."""

    readings: int
    per_msg: int
    meters: int
    t0: int

    @property
    def messages(self) -> int:
        return -(-self.readings // self.per_msg)

    def device(self, meter: int) -> str:
        return f"SOAK{meter + 1:05d}"

    def message(self, i: int) -> tuple[str, bytes]:
        meter, k = i % self.meters, i // self.meters
        first = k * self.per_msg
        n = min(self.per_msg, self.readings - i * self.per_msg)
        regs = [f"{meter * 10 + (first + j) / 1000:.3f}" for j in range(n)]
        dev = self.device(meter)
        body = (
            f'{{"dev":"{dev}","t0":{self.t0 + first * STEP_S},"step":{STEP_S},'
            f'"unit":"m3","reg":[{",".join(regs)}]}}'
        )
        return f"{TOPIC_ROOT}/{VENDOR}/{dev}/up", body.encode()

    def milli_sum(self, i: int) -> int:
        """Sum of round(value * 1000) of message i's readings."""
        meter, k = i % self.meters, i // self.meters
        first = k * self.per_msg
        n = min(self.per_msg, self.readings - i * self.per_msg)
        return n * meter * 10_000 + n * first + n * (n - 1) // 2

    def message_of(self, meter: int, ts: int) -> int:
        slot = (ts - self.t0) // STEP_S
        return (slot // self.per_msg) * self.meters + meter

    def registry(self) -> str:
        return f"""\
# written by bench/soak.py
[[dma]]
id = "SOAK"
timezone = "UTC"

[[vendor]]
id = "{VENDOR}"
payload = "json"
  [[vendor.channel]]
  name = "register"
  quantity = "volume"
  unit = "m3"
  kind = "register"
  role = "customer"

[[vendor]]
id = "{PROBE_VENDOR}"
payload = "json"
  [[vendor.channel]]
  name = "register"
  quantity = "volume"
  unit = "m3"
  kind = "register"
  role = "customer"

[[meter_group]]
vendor = "{VENDOR}"
dma = "SOAK"
id_format = "SOAK{{:05d}}"
count = {self.meters}
install_date = "2020-01-01"

[[device]]
id = "PROBE"
vendor = "{PROBE_VENDOR}"
dma = "SOAK"
"""


class Publisher:
    """paho QoS 1 publisher on a persistent MQTT v5 session, paced at ``rate`` messages/s.

    It never stops for a fault: while the broker is away paho keeps the messages (state
    "publish") and sends them after its automatic reconnect. ``published`` counts PUBACKs."""

    def __init__(self, port: int, plan: Plan, rate: float, client_id: str) -> None:
        self.plan = plan
        self.rate = rate
        self.lock = threading.Lock()
        self.published_msgs = 0
        self.sent_msgs = 0
        self.refused = 0
        self.connects = 0
        self.disconnects = 0
        self.infos: list[mqtt.MQTTMessageInfo | None] = [None] * plan.messages
        self.sent_at = np.full(plan.messages, np.nan)
        self.acked_at = np.full(plan.messages, np.nan)  # stamped by the sampler (0.5 s)
        self.pending: list[int] = []
        self.done = threading.Event()
        self.finished_at: float | None = None
        self.connected = threading.Event()
        c = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        # mosquitto announces max_inflight_messages (default 20) as its Receive Maximum, which
        # paho does not enforce; stay within it so the default-config run is not disconnected.
        c.max_inflight_messages_set(20)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(0.1, 1.0)
        c.on_publish = self._on_publish
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        c.connect_async("127.0.0.1", port, keepalive=10, clean_start=False, properties=props)
        self.client = c

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self.lock:
            self.published_msgs += 1

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if not reason_code.is_failure:
            self.connects += 1
            self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.disconnects += 1
        self.connected.clear()

    @property
    def published(self) -> int:
        """Readings whose message the broker acknowledged (the last message may hold fewer)."""
        with self.lock:
            n = self.published_msgs
        return min(n * self.plan.per_msg, self.plan.readings)

    def start(self, t_start: float) -> Publisher:
        self.client.loop_start()
        wait_for("publisher connected", self.connected.is_set, 60)
        threading.Thread(target=self._run, args=(t_start,), name="publisher", daemon=True).start()
        return self

    def _run(self, t_start: float) -> None:
        plan = self.plan
        for i in range(plan.messages):
            due = t_start + i / self.rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            topic, payload = plan.message(i)
            while True:
                info = self.client.publish(topic, payload, qos=1)
                if info.rc != mqtt.MQTT_ERR_QUEUE_SIZE:
                    break
                # 65,535 message ids outstanding (a long broker outage): wait for PUBACKs.
                self.refused += 1
                time.sleep(0.05)
            self.infos[i] = info
            self.sent_at[i] = time.monotonic()
            with self.lock:
                self.pending.append(i)
            self.sent_msgs = i + 1
        self.finished_at = time.monotonic()
        self.done.set()

    def stamp_acks(self, now: float) -> None:
        """Note when each message's PUBACK was seen (the sampler calls this every 0.5 s)."""
        with self.lock:
            pending, self.pending = self.pending, []
        still = []
        for i in pending:
            info = self.infos[i]
            if info is not None and info._published:
                self.acked_at[i] = now
            else:
                still.append(i)
        with self.lock:
            self.pending = still + self.pending

    def unconfirmed(self) -> int:
        return sum(1 for info in self.infos if info is not None and not info._published)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --- what we watch ----------------------------------------------------------------------------


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its descendants, from /proc/<pid>/task/<tid>/children."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return out


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def worker_pids(ingest_pid: int) -> list[int]:
    """The MQTT worker processes: children started by multiprocessing's spawn (not the
    resource tracker)."""
    return sorted(
        p
        for p in tree_pids(ingest_pid)[1:]
        if "spawn_main" in cmdline(p) and "resource_tracker" not in cmdline(p)
    )


@dataclass
class Sample:
    t: float
    published: int
    stored: int | None
    rss: int


class Sampler:
    """Every 0.5 s: PUBACKed readings, stored readings (count(*) of the soak's channels; None
    while the database is down) and the RSS of the ingest process tree."""

    def __init__(self, db_url: str, channel_ids: list[int], pub: Publisher, ingest_pid: int):
        self.db_url = db_url
        self.channel_ids = channel_ids
        self.pub = pub
        self.ingest_pid = ingest_pid
        self.samples: list[Sample] = []
        self.peak_rss = 0
        self.peak_rss_at = 0.0
        self.peak_rss_parts: list[tuple[str, int]] = []
        self.stop_ev = threading.Event()
        self.conn: psycopg.Connection | None = None
        self.count_ms: list[float] = []
        self.thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def start(self) -> Sampler:
        self.thread.start()
        return self

    def stored(self) -> int | None:
        try:
            if self.conn is None or self.conn.closed:
                self.conn = psycopg.connect(self.db_url, autocommit=True, connect_timeout=2)
            t = time.perf_counter()
            row = self.conn.execute(
                "SELECT count(*) FROM readings WHERE channel_id = ANY(%s)", (self.channel_ids,)
            ).fetchone()
            self.count_ms.append((time.perf_counter() - t) * 1000)
            return int(row[0]) if row else 0
        except psycopg.Error:
            if self.conn is not None:
                try:
                    self.conn.close()
                except psycopg.Error:
                    pass
            self.conn = None
            return None

    def _run(self) -> None:
        while not self.stop_ev.is_set():
            t = time.monotonic()
            pids = tree_pids(self.ingest_pid)
            parts = [(p, rss_bytes(p)) for p in pids]
            rss = sum(r for _, r in parts)
            if rss > self.peak_rss:
                self.peak_rss, self.peak_rss_at = rss, t
                self.peak_rss_parts = [(f"{p} {cmdline(p)[-40:]}", r) for p, r in parts]
            published = self.pub.published
            self.pub.stamp_acks(t)
            self.samples.append(Sample(t, published, self.stored(), rss))
            self.stop_ev.wait(max(0.0, SAMPLE_S - (time.monotonic() - t)))

    def last_stored(self) -> int | None:
        for s in reversed(self.samples):
            if s.stored is not None:
                return s.stored
        return None

    def stop(self) -> None:
        self.stop_ev.set()
        self.thread.join()
        if self.conn is not None:
            self.conn.close()


@dataclass
class Fault:
    name: str
    planned_at: float
    started: float = 0.0
    ended: float = 0.0
    recovered: float | None = None
    peak_lag: int = 0
    note: str = ""

    @property
    def recovery_s(self) -> float | None:
        return None if self.recovered is None else self.recovered - self.ended


@dataclass
class Result:
    commit: str
    dirty: list[str]
    readings: int
    rate: float
    per_msg: int
    meters: int
    outage_s: float
    broker_kill: str
    broker_config: str
    broker_in_outage: bool = False
    published: int = 0
    unconfirmed_msgs: int = 0
    stored_rows: int = 0
    stored_distinct: int = 0
    lost: int = 0
    duplicated: int = 0
    extra_unpublished: int = 0
    value_sum_ok: bool = False
    value_sum_diff: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    faults: list[dict[str, object]] = field(default_factory=list)
    lost_by_phase: dict[str, int] = field(default_factory=dict)
    peak_rss_mb: float = 0.0
    peak_rss_parts: list[tuple[str, float]] = field(default_factory=list)
    steady_lag: int = 0
    lag_threshold: int = 0
    publish_seconds: float = 0.0
    total_seconds: float = 0.0
    publisher_reconnects: int = 0
    worker_restarts_seen: int = 0
    ingest_exit: int | None = None
    loadavg: str = ""
    count_ms_median: float = 0.0
    samples: list[tuple[float, int, int | None, float]] = field(default_factory=list)


def git_state(code: Path) -> tuple[str, list[str]]:
    """The commit ``code`` is at and its files with local changes; for a ``git archive``
    snapshot (no .git) the commit written in its COMMIT file."""
    if not (code / ".git").exists():
        label = (code / "COMMIT").read_text().strip() if (code / "COMMIT").exists() else "?"
        return f"{label} (snapshot {code})", []

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=code, capture_output=True, text=True, check=False
        ).stdout

    paths = ("ingest", "protocols", "aquameter", "sql")
    dirty = [line[3:] for line in git("status", "--porcelain", "--", *paths).splitlines()]
    return git("rev-parse", "--short", "HEAD").strip(), dirty


# --- the run ----------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readings", type=int, default=1_000_000)
    ap.add_argument("--rate", type=float, default=1_000.0, help="messages per second")
    ap.add_argument("--per-msg", type=int, default=2, help="readings per message")
    ap.add_argument("--meters", type=int, default=1_000)
    ap.add_argument("--outage-s", type=float, default=60.0)
    ap.add_argument("--broker-kill", choices=["term", "kill"], default="term")
    ap.add_argument(
        "--broker-config",
        choices=["deploy", "defaults"],
        default="deploy",
        help="deploy/mosquitto.conf, or mosquitto's defaults (no persistence, 1000 queued)",
    )
    ap.add_argument(
        "--quick", action="store_true", help="20,000 readings at 200 msg/s, 1 per message, 5 s"
    )
    ap.add_argument(
        "--broker-in-outage",
        action="store_true",
        help="also restart the broker (--broker-kill) halfway through the database outage, "
        "while it holds the backlog: what its persistence settings are for",
    )
    ap.add_argument(
        "--no-broker-restart",
        action="store_true",
        help="leave out the broker restart (mosquitto 2.0.11 drops what arrives for shared "
        "subscriptions restored from its database before ingest re-subscribes, ~1 s; ingest's "
        "catch-up sessions, protocols/mqtt.py, recover it since they exist)",
    )
    ap.add_argument("--settle-timeout-s", type=float, default=180.0)
    ap.add_argument("--json", type=Path, help="also write the result as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data)")
    ap.add_argument(
        "--code",
        type=Path,
        default=ROOT,
        help="run the aquameter code in this directory (e.g. a `git archive` snapshot, so that "
        "edits in the working tree cannot reach a worker restarted mid-run)",
    )
    ap.add_argument(
        "--pg-bin", type=Path, default=Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
    )
    args = ap.parse_args()
    if args.quick:
        args.readings, args.rate, args.per_msg, args.outage_s = 20_000, 200.0, 1, 5.0
    if not (args.pg_bin / "pg_ctl").exists():
        raise SystemExit(f"no pg_ctl in {args.pg_bin} (Debian postgresql-15, or --pg-bin)")

    # A background job has SIGINT ignored, and SIGTERM would skip the clean-up: both end the run
    # through the `finally` below, which stops every process this script started.
    def interrupted(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    code = args.code.resolve()
    commit, dirty = git_state(code)
    work = Path(tempfile.mkdtemp(prefix="aquameter-soak-"))
    work.chmod(0o755)  # the postgres user must reach its data dir inside
    say(f"work dir {work}; commit {commit}" + (f" + local changes in {dirty}" if dirty else ""))
    pg = PrivatePostgres(work / "pg", free_port(), args.pg_bin)
    broker = PrivateBroker(work / "mqtt", free_port(), args.broker_config)
    ingest: subprocess.Popen[bytes] | None = None
    pub: Publisher | None = None
    sampler: Sampler | None = None
    ok = False
    try:
        pg.init()
        pg.start()
        broker.start()
        say(f"PostgreSQL 127.0.0.1:{pg.port}, mosquitto 127.0.0.1:{broker.port} ({broker.conf})")

        now = int(time.time())
        t0 = (now - 2 * 86_400) // 3600 * 3600
        plan = Plan(args.readings, args.per_msg, args.meters, t0)
        span_s = (plan.messages // plan.meters + 1) * plan.per_msg * STEP_S
        if t0 + span_s > now:
            raise SystemExit("too many readings per meter for the time span: raise --meters")
        reg_path = work / "registry.toml"
        reg_path.write_text(plan.registry())
        env = dict(
            os.environ,
            AQUAMETER_DATABASE_URL=pg.url,
            AQUAMETER_MQTT_URL=broker.url,
            AQUAMETER_REGISTRY=str(reg_path),
            AQUAMETER_TIMESCALE="off",
            AQUAMETER_DATA_DIR=str(work / "data"),
            AQUAMETER_MQTT_CLIENT_ID="soak-ingest",
            AQUAMETER_MQTT_SHARED_GROUP="soak",
            AQUAMETER_STATS_INTERVAL_S="5",
            PYTHONPATH=str(code),
        )
        aq = str(VENV_BIN / "aquameter")
        for cmd in (["db", "migrate"], ["devices", "sync"]):
            res = subprocess.run(
                [aq, *cmd], env=env, cwd=code, capture_output=True, text=True, timeout=600
            )
            if res.returncode != 0:
                raise SystemExit(f"aquameter {' '.join(cmd)} failed:\n{res.stdout}{res.stderr}")
        with psycopg.connect(pg.url) as conn:
            rows = conn.execute(
                "SELECT c.id, d.id FROM channels c JOIN devices d ON d.id = c.device_id "
                "WHERE d.id LIKE 'SOAK%'"
            ).fetchall()
        meter_of = {int(cid): int(dev[4:]) - 1 for cid, dev in rows}
        if len(meter_of) != plan.meters:
            raise SystemExit(f"registry sync made {len(meter_of)} soak channels, not {plan.meters}")

        ingest_log = work / "ingest.log"
        ingest = subprocess.Popen(
            [aq, "-v", "ingest", "--mqtt-workers", "2"],
            env=env,
            cwd=code,
            stdout=ingest_log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        say(f"ingest pid {ingest.pid}, log {ingest_log}")

        def both_connected() -> bool:
            if ingest.poll() is not None:
                raise SystemExit(f"ingest exited with {ingest.returncode}; see {ingest_log}")
            return ingest_log.read_text(errors="replace").count("MQTT connected") >= 2

        wait_for("2 MQTT workers connected (see ingest.log)", both_connected, 180, 0.2)
        probe(broker.port, pg.url)
        say("ingest is storing; starting the load")

        pub = Publisher(broker.port, plan, args.rate, "soak-publisher")
        sampler = Sampler(pg.url, sorted(meter_of), pub, ingest.pid).start()
        t_start = time.monotonic() + 0.5
        pub.start(t_start)
        duration = plan.messages / args.rate
        threshold = int(max(args.rate * args.per_msg * 1.0, 10))
        say(
            f"{plan.readings:,} readings in {plan.messages:,} messages of {plan.per_msg} at "
            f"{args.rate:,.0f} msg/s: {duration:,.0f} s of publishing; recovered = lag <= "
            f"{threshold:,} readings (1 s of traffic)"
        )
        kill_signal = signal.SIGTERM if args.broker_kill == "term" else signal.SIGKILL
        faults = [
            Fault("worker-kill", t_start + 0.10 * duration),
            Fault("pg-restart", t_start + 0.28 * duration),
            *(
                []
                if args.no_broker_restart
                else [Fault(f"broker-restart ({args.broker_kill})", t_start + 0.46 * duration)]
            ),
            Fault(
                f"db-outage {args.outage_s:g}s"
                + (f" + broker {args.broker_kill}" if args.broker_in_outage else ""),
                t_start + 0.62 * duration,
            ),
        ]
        progress = Progress(sampler, pub, plan, t_start)
        restarts = 0
        for f in faults:
            while time.monotonic() < f.planned_at:
                progress.maybe()
                check_ingest(ingest, ingest_log)
                time.sleep(0.2)
            if pub.done.is_set():
                f.note = "after publishing ended"
            f.started = time.monotonic()
            say(f"FAULT {f.name}")
            if f.name == "worker-kill":
                pids = worker_pids(ingest.pid)
                if not pids:
                    raise SystemExit("no MQTT worker process found under the ingest process")
                os.kill(pids[0], signal.SIGKILL)
                f.note = f"pid {pids[0]} of {pids}"
                f.ended = time.monotonic()
                wait_for(
                    "a replacement MQTT worker",
                    lambda p=pids: len(set(worker_pids(ingest.pid)) - set(p)) >= 1,
                    120,
                    0.2,
                )
                restarts += 1
            elif f.name == "pg-restart":
                pg.stop("immediate")
                pg.start()
                f.ended = time.monotonic()
            elif f.name.startswith("broker-restart"):
                broker.kill(kill_signal)
                broker.start()
                f.ended = time.monotonic()
            else:
                pg.stop("fast")
                down_until = time.monotonic() + args.outage_s
                broker_at = time.monotonic() + args.outage_s / 2 if args.broker_in_outage else None
                while time.monotonic() < down_until:
                    progress.maybe()
                    if broker_at is not None and time.monotonic() >= broker_at:
                        say(f"broker {args.broker_kill} while the database is down")
                        broker.kill(kill_signal)
                        broker.start()
                        broker_at = None
                    time.sleep(0.2)
                pg.start()
                f.ended = time.monotonic()
            say(f"fault {f.name} over after {f.ended - f.started:.1f} s; waiting for catch-up")
            # Wait for the catch-up before the next fault. Lost messages would keep the lag up
            # for good, so stop waiting once it has not fallen for 15 s (the reported recovery
            # is recomputed at the end, net of the readings that turned out lost).
            deadline = f.ended + max(120.0, args.outage_s * 3)
            best, best_at = None, time.monotonic()
            while time.monotonic() < deadline:
                progress.maybe()
                check_ingest(ingest, ingest_log)
                lag = lag_now(sampler)
                if lag is not None and sampler.samples[-1].t > f.ended:
                    if lag <= threshold:
                        f.recovered = sampler.samples[-1].t
                        break
                    if best is None or lag < best:
                        best, best_at = lag, time.monotonic()
                    elif time.monotonic() - best_at > 15:
                        f.note = (f.note + "; " if f.note else "") + f"lag stayed at {lag:,}"
                        break
                time.sleep(0.1)
            say(
                f"fault {f.name}: "
                + (
                    f"lag back to <= {threshold:,} {f.recovery_s:.1f} s after it ended"
                    if f.recovery_s is not None
                    else "lag did NOT come back down (lost messages?)"
                )
            )

        while not pub.done.wait(0.2):
            progress.maybe()
            check_ingest(ingest, ingest_log)
        say("publishing done; waiting for the last PUBACKs")
        wait_confirms(pub, progress, args.settle_timeout_s)
        say("waiting for the stored count to settle")
        settle(sampler, pub, progress, args.settle_timeout_s)
        sampler.stop()

        res = Result(
            commit=commit,
            dirty=dirty,
            readings=plan.readings,
            rate=args.rate,
            per_msg=plan.per_msg,
            meters=plan.meters,
            outage_s=args.outage_s,
            broker_kill=args.broker_kill,
            broker_config=args.broker_config,
            broker_in_outage=args.broker_in_outage,
            worker_restarts_seen=restarts,
        )
        res.publish_seconds = round((pub.finished_at or time.monotonic()) - t_start, 1)
        res.total_seconds = round(time.monotonic() - t_start, 1)
        res.publisher_reconnects = max(0, pub.connects - 1)
        missing = account(res, plan, pub, pg.url, meter_of, faults, t_start)
        res.faults = recoveries(sampler.samples, faults, pub, missing, threshold, t_start)
        res.peak_rss_mb = round(sampler.peak_rss / 1e6, 1)
        res.peak_rss_parts = [(name, round(r / 1e6, 1)) for name, r in sampler.peak_rss_parts]
        before = [
            s.published - s.stored
            for s in sampler.samples
            if s.stored is not None and s.t < faults[0].started and s.t > t_start + 2
        ]
        res.steady_lag = int(np.median(before)) if before else 0
        res.lag_threshold = threshold
        res.count_ms_median = round(float(np.median(sampler.count_ms)), 1)
        res.samples = [
            (round(x.t - t_start, 2), x.published, x.stored, round(x.rss / 1e6, 1))
            for x in sampler.samples
        ]
        res.loadavg = " ".join(Path("/proc/loadavg").read_text().split()[:3])

        ingest.send_signal(signal.SIGTERM)
        try:
            res.ingest_exit = ingest.wait(120)
        except subprocess.TimeoutExpired:
            say("ingest did not stop within 120 s of SIGTERM; killing it")
            os.killpg(ingest.pid, signal.SIGKILL)
            res.ingest_exit = ingest.wait()
        pub.stop()
        pub = None

        report(res)
        if args.json:
            args.json.write_text(json.dumps(asdict(res), indent=2))
        problems = []
        if res.lost:
            problems.append(f"lost {res.lost:,} of {res.published:,} published readings")
        if res.duplicated:
            problems.append(f"{res.duplicated:,} duplicated rows")
        if not res.value_sum_ok:
            problems.append(f"stored value sum differs from the truth by {res.value_sum_diff}")
        if problems:
            print("SOAK FAILED: " + "; ".join(problems), file=sys.stderr)
            return 1
        ok = True
        return 0
    finally:
        if sampler is not None and sampler.thread.is_alive():
            sampler.stop()
        if pub is not None:
            pub.stop()
        if ingest is not None and ingest.poll() is None:
            ingest.send_signal(signal.SIGTERM)
            try:
                ingest.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(ingest.pid, signal.SIGKILL)
                ingest.wait()
        broker.kill(signal.SIGTERM)
        if pg.running():
            try:
                pg.stop("fast")
            except Exception as err:
                say(f"could not stop PostgreSQL: {err}")
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            say(f"kept {work} (logs: ingest.log, pg/postgres.log, mqtt/mosquitto.log)")


class Progress:
    def __init__(self, sampler: Sampler, pub: Publisher, plan: Plan, t_start: float) -> None:
        self.sampler, self.pub, self.plan, self.t_start = sampler, pub, plan, t_start
        self.next = 0.0

    def maybe(self) -> None:
        now = time.monotonic()
        if now < self.next or not self.sampler.samples:
            return
        self.next = now + 5.0
        s = self.sampler.samples[-1]
        stored = "db down" if s.stored is None else f"{s.stored:,}"
        lag = "" if s.stored is None else f" lag {s.published - s.stored:,}"
        say(
            f"t={now - self.t_start:6.1f}s sent {self.pub.sent_msgs * self.plan.per_msg:,} "
            f"published {s.published:,} stored {stored}{lag} rss {s.rss / 1e6:,.0f} MB "
            f"(peak {self.sampler.peak_rss / 1e6:,.0f})"
        )


def lag_now(sampler: Sampler) -> int | None:
    if not sampler.samples:
        return None
    s = sampler.samples[-1]
    return None if s.stored is None else s.published - s.stored


def check_ingest(ingest: subprocess.Popen[bytes], log: Path) -> None:
    if ingest.poll() is not None:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise SystemExit(f"ingest exited with {ingest.returncode} mid-run:\n" + "\n".join(tail))


def probe(port: int, db_url: str) -> None:
    """One probe reading through the whole path, so the load starts on a working ingest."""
    c = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id="soak-probe",
        protocol=mqtt.MQTTv5,
    )
    c.connect("127.0.0.1", port)
    c.loop_start()
    ts = int(time.time()) - 60
    body = f'{{"dev":"PROBE","ts":{ts},"reg":1.0,"unit":"m3"}}'.encode()
    c.publish(f"{TOPIC_ROOT}/{PROBE_VENDOR}/PROBE/up", body, qos=1).wait_for_publish(30)
    c.disconnect()
    c.loop_stop()

    def stored() -> bool:
        with psycopg.connect(db_url, connect_timeout=2) as conn:
            row = conn.execute(
                "SELECT count(*) FROM readings r JOIN channels c ON c.id = r.channel_id "
                "WHERE c.device_id = 'PROBE'"
            ).fetchone()
        return bool(row and row[0])

    wait_for("the probe reading stored by ingest", stored, 120, 0.2)


def wait_confirms(pub: Publisher, progress: Progress, timeout_s: float) -> None:
    """Until every sent message has its PUBACK, or none arrived for ``timeout_s``."""
    last, last_change = -1, time.monotonic()
    while True:
        n = pub.unconfirmed()
        if n == 0:
            return
        if n != last:
            last, last_change = n, time.monotonic()
        elif time.monotonic() - last_change > timeout_s:
            say(f"{n:,} messages still without PUBACK after {timeout_s:.0f} s; counting as sent")
            return
        progress.maybe()
        time.sleep(0.5)


def settle(sampler: Sampler, pub: Publisher, progress: Progress, timeout_s: float) -> None:
    """Until stored >= published, or the stored count did not move for 30 s (or timeout_s)."""
    start = time.monotonic()
    last, last_change = -1, time.monotonic()
    while time.monotonic() - start < timeout_s:
        progress.maybe()
        stored = sampler.last_stored()
        if stored is not None and stored >= pub.published:
            time.sleep(2 * SAMPLE_S)  # a redelivery still in flight would show in the counts
            return
        if stored != last:
            last, last_change = stored, time.monotonic()
        elif time.monotonic() - last_change > 30:
            say(f"stored count stuck at {stored:,} for 30 s; accounting now")
            return
        time.sleep(0.5)
    say(f"stored count did not reach the published count within {timeout_s:.0f} s")


def account(
    res: Result,
    plan: Plan,
    pub: Publisher,
    db_url: str,
    meter_of: dict[int, int],
    faults: list[Fault],
    t_start: float,
) -> np.ndarray:
    """Compare what the broker acknowledged with what the database holds; return the readings
    missing per message."""
    acked = np.array([info is not None and info._published for info in pub.infos])
    res.unconfirmed_msgs = int((~acked).sum())
    sizes = np.minimum(
        plan.per_msg, plan.readings - np.arange(plan.messages, dtype=np.int64) * plan.per_msg
    )
    res.published = int(sizes[acked].sum())
    ids = sorted(meter_of)
    stored_per_msg = np.zeros(plan.messages, dtype=np.int64)
    lut = np.full(max(ids) + 1, -(10**9), dtype=np.int64)
    lut[np.array(ids)] = [meter_of[c] for c in ids]
    idx = np.arange(plan.messages, dtype=np.int64)
    first = (idx // plan.meters) * plan.per_msg
    milli = sizes * (idx % plan.meters) * 10_000 + sizes * first + sizes * (sizes - 1) // 2
    with psycopg.connect(db_url) as conn:
        # Whole-table reads: fresh statistics and sequential scans. With the statistics of the
        # load's start, the planner chose per-id index scans that ran for more than 6 minutes
        # on CPU at 1,000,000 rows (the full soak of 2026-12-04).
        conn.execute("ANALYZE readings")
        for setting in ("enable_indexscan", "enable_indexonlyscan", "enable_bitmapscan"):
            conn.execute(f"SET {setting} = off")  # type: ignore[arg-type]
        row = conn.execute(
            "SELECT count(*), count(DISTINCT (channel_id, ts)), "
            "coalesce(sum(round(value * 1000)::bigint), 0) "
            "FROM readings WHERE channel_id = ANY(%s)",
            (ids,),
        ).fetchone()
        assert row is not None
        res.stored_rows, res.stored_distinct, stored_sum = int(row[0]), int(row[1]), int(row[2])
        cur = conn.cursor()
        cur.execute(
            "SELECT DISTINCT channel_id, extract(epoch FROM ts)::bigint FROM readings "
            "WHERE channel_id = ANY(%s)",
            (ids,),
        )
        while batch := cur.fetchmany(100_000):
            arr = np.array(batch, dtype=np.int64)
            meters = lut[arr[:, 0]]
            slots = (arr[:, 1] - plan.t0) // STEP_S
            msgs = (slots // plan.per_msg) * plan.meters + meters
            np.add.at(stored_per_msg, msgs[(msgs >= 0) & (msgs < plan.messages)], 1)
        res.quarantined = dict(
            conn.execute(
                "SELECT reason, count(*) FROM quarantine GROUP BY reason ORDER BY 2 DESC"
            ).fetchall()
        )
    missing = np.where(acked, sizes - np.minimum(stored_per_msg, sizes), 0)
    res.lost = int(missing.sum())
    res.extra_unpublished = int(stored_per_msg[~acked].sum())
    res.duplicated = res.stored_rows - res.stored_distinct
    # Stored values against the truth: the sum of what every completely stored message carried
    # (all published messages when nothing was lost). A reading stored twice or with a wrong
    # value shows as a difference; a message stored in part is counted as a difference too.
    complete = stored_per_msg == sizes
    expected = int(milli[complete].sum())
    partial = int(((stored_per_msg > 0) & ~complete).sum())
    res.value_sum_diff = stored_sum - expected
    res.value_sum_ok = res.value_sum_diff == 0 and partial == 0
    # Which phase were the lost readings sent in? (the last fault begun before the send)
    phases: Counter[str] = Counter()
    for i in np.flatnonzero(missing):
        t = pub.sent_at[i]
        name = "before the first fault"
        for f in faults:
            if f.started and t >= f.started:
                name = f"after {f.name} began"
        phases[name] += int(missing[i])
    res.lost_by_phase = dict(phases)
    return missing


def recoveries(
    samples: list[Sample],
    faults: list[Fault],
    pub: Publisher,
    missing: np.ndarray,
    limit: int,
    t_start: float,
) -> list[dict[str, object]]:
    """Per fault, from the 0.5 s samples: the peak lag, and the time from the fault's end to
    the first sample with lag <= ``limit`` before the next fault; once as measured, once net of
    the readings that turned out lost (their PUBACK arrived, their rows never did)."""
    lost_idx = np.flatnonzero(missing)
    lost_t = pub.acked_at[lost_idx]
    lost_n = missing[lost_idx]
    order = np.argsort(lost_t)
    lost_t, lost_cum = lost_t[order], np.cumsum(lost_n[order])
    ts = np.array([x.t for x in samples])
    lag = np.array([np.nan if x.stored is None else x.published - x.stored for x in samples])
    k = np.searchsorted(lost_t, ts, side="right")
    lost_before = np.concatenate(([0], lost_cum))[k]  # nothing lost: all zeros
    net = lag - lost_before
    out = []
    for n, f in enumerate(faults):
        end = faults[n + 1].started if n + 1 < len(faults) else np.inf
        window = (ts >= f.started) & (ts < end)
        after = (ts > f.ended) & (ts < end)
        row: dict[str, object] = {
            "fault": f.name,
            "at_s": round(f.started - t_start, 1),
            "duration_s": round(f.ended - f.started, 1),
            "peak_lag": int(np.nanmax(lag[window])) if np.any(window & ~np.isnan(lag)) else 0,
            "note": f.note,
        }
        for key, series in (("recovery_s", lag), ("recovery_net_s", net)):
            row[key] = None
            ok = after & (series <= limit)  # NaN (database down) is not ok
            for i in np.flatnonzero(ok):
                # recovered: the lag stays down for STABLE_S (or until the next fault / the end),
                # so a lull right after the fault (no PUBACKs yet) does not count
                hold = (ts >= ts[i]) & (ts < min(ts[i] + STABLE_S, end))
                if ok[hold].all():
                    row[key] = round(float(ts[i] - f.ended), 1)
                    break
        out.append(row)
    return out


def report(res: Result) -> None:
    w = sys.stdout.write
    w("\nSoak: faults under steady load (bench/soak.py)\n")
    w(
        f"commit {res.commit}"
        + (f" + uncommitted changes in {', '.join(res.dirty)}" if res.dirty else "")
        + f"; load average at the end {res.loadavg}\n"
    )
    w(
        f"readings {res.readings:,}, {res.rate:,.0f} msg/s, {res.per_msg} per message, "
        f"{res.meters:,} meters; broker {res.broker_config} config, restart by "
        f"{'SIGKILL' if res.broker_kill == 'kill' else 'SIGTERM'}; outage {res.outage_s:g} s\n"
    )
    w(
        f"publishing took {res.publish_seconds:,.1f} s (planned "
        f"{res.readings / res.per_msg / res.rate:,.1f}), the whole run {res.total_seconds:,.1f} s;"
        f" publisher reconnects {res.publisher_reconnects}\n"
    )
    w(f"{'fault':<26}{'at':>8}{'lasted':>9}{'recovery':>10}{'net of lost':>13}{'peak lag':>10}\n")
    for f in res.faults:
        rec, net = (
            "never" if f[k] is None else f"{f[k]:.1f} s" for k in ("recovery_s", "recovery_net_s")
        )
        w(
            f"{f['fault']!s:<26}{f['at_s']!s:>7}s{f['duration_s']!s:>8}s{rec:>10}{net:>13}"
            f"{f['peak_lag']:>10,}  {f['note']}\n"
        )
    w(
        f"(recovered = lag <= {res.lag_threshold:,} readings for {STABLE_S:g} s; steady lag "
        f"before the first fault "
        f"{res.steady_lag:,}; count(*) took {res.count_ms_median} ms median)\n"
    )
    w(f"published readings (PUBACK received) {res.published:,}")
    if res.unconfirmed_msgs:
        w(f"  [{res.unconfirmed_msgs:,} messages never confirmed, not counted]")
    w("\n")
    w(
        f"stored readings                      {res.stored_rows:,} "
        f"({res.stored_distinct:,} distinct)\n"
    )
    w(f"lost                                 {res.lost:,}\n")
    if res.lost_by_phase:
        for k, v in res.lost_by_phase.items():
            w(f"    sent {k}: {v:,}\n")
    w(f"duplicated                           {res.duplicated:,}\n")
    w(
        f"value sum vs truth                   "
        f"{'equal' if res.value_sum_ok else f'differs by {res.value_sum_diff}'}\n"
    )
    if res.extra_unpublished:
        w(f"stored but never confirmed           {res.extra_unpublished:,}\n")
    if res.quarantined:
        w(f"quarantine rows                      {res.quarantined}\n")
    w(f"peak RSS of the ingest process tree  {res.peak_rss_mb:,.1f} MB\n")
    for name, mb in res.peak_rss_parts:
        w(f"    {mb:7.1f} MB  {name}\n")
    w(f"ingest exit status after SIGTERM     {res.ingest_exit}\n")
    targets = [
        ("0 lost", res.lost == 0),
        ("0 duplicated", res.duplicated == 0 and res.value_sum_ok),
        (
            "recovery < 15 s per fault",
            all(f["recovery_s"] is not None and f["recovery_s"] < 15 for f in res.faults),
        ),
        (
            "(net of lost)",
            all(f["recovery_net_s"] is not None and f["recovery_net_s"] < 15 for f in res.faults),
        ),
        ("peak RSS < 300 MB", res.peak_rss_mb < 300),
    ]
    w("targets: " + ", ".join(f"{n} {'met' if ok else 'MISSED'}" for n, ok in targets) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
