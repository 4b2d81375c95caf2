"""Publish simulated traffic to a real MQTT broker, as fast as QoS 1 allows and no faster.

The publisher is a plain paho-mqtt 2.x client (callback API v2). It prefers MQTT v5 and falls
back to 3.1.1 when the broker refuses v5 (the embedded amqtt broker speaks only 3.1.1). Messages
in flight are bounded by a semaphore released on each PUBACK, so memory stays flat for millions
of publishes and the broker sets the pace. paho resends unacknowledged QoS 1 messages after a
reconnect; the run ends when every PUBACK is in, or when no PUBACK came for ``ack_timeout_s``.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import unquote, urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from simulators.traffic import Publish

# CONNACK reasons that a v3.1.1 retry cannot fix: bad credentials stay bad.
_AUTH_FAILURES = {"Bad user name or password", "Not authorized", "Banned"}


@dataclass
class PublishStats:
    """Outcome of one :func:`publish` run. ``unacked`` > 0 means the broker never confirmed those
    messages within the timeout; ``failed`` counts PUBACKs with a failure reason (v5) or
    publishes the client refused."""

    sent: int = 0
    acked: int = 0
    failed: int = 0
    unacked: int = 0
    readings: int = 0
    bytes: int = 0
    seconds: float = 0.0
    protocol: str = ""
    reconnects: int = 0
    timed_out: bool = False

    @property
    def rate(self) -> float:
        """Acknowledged messages per second."""
        return self.acked / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (
            f"{self.acked:,}/{self.sent:,} publishes acknowledged ({self.readings:,} readings, "
            f"{self.bytes / 1e6:.1f} MB) in {self.seconds:.2f} s = {self.rate:,.0f} msg/s over "
            f"{self.protocol}; failed {self.failed}, unacked {self.unacked}, "
            f"reconnects {self.reconnects}" + (" [TIMED OUT]" if self.timed_out else "")
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"rate": self.rate}


@dataclass(frozen=True)
class _Target:
    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None


def _parse(url: str) -> _Target:
    u = urlparse(url)
    if u.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(f"unsupported MQTT URL scheme {u.scheme!r}")
    tls = u.scheme in ("mqtts", "ssl")
    return _Target(
        host=u.hostname or "127.0.0.1",
        port=u.port or (8883 if tls else 1883),
        tls=tls,
        username=unquote(u.username) if u.username else None,
        password=unquote(u.password) if u.password else None,
    )


class _Session:
    """One paho client and the state its callbacks share with the publishing thread."""

    def __init__(
        self, target: _Target, client_id: str, protocol: int, max_inflight: int, keepalive: int
    ) -> None:
        self.protocol = protocol
        self.connected = threading.Event()
        self.connack: ReasonCode | None = None
        self.lock = threading.Lock()
        self.acked = 0
        self.failed = 0
        self.connects = 0
        self.last_ack = time.monotonic()
        self.window = threading.BoundedSemaphore(max_inflight)
        kwargs: dict[str, Any] = {}
        if protocol != mqtt.MQTTv5:
            kwargs["clean_session"] = True
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,  # type: ignore[arg-type]
            reconnect_on_failure=True,
            **kwargs,
        )
        # paho's own window equals ours, so nothing waits in paho's queue unbounded.
        self.client.max_inflight_messages_set(max_inflight)
        self.client.reconnect_delay_set(1, 8)
        if target.username is not None:
            self.client.username_pw_set(target.username, target.password)
        if target.tls:
            self.client.tls_set()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.target = target
        self.keepalive = keepalive

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        self.connack = reason
        if not reason.is_failure:
            with self.lock:
                self.connects += 1
        self.connected.set()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        self.connected.clear()

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any
    ) -> None:
        with self.lock:
            if reason.is_failure:
                self.failed += 1
            else:
                self.acked += 1
            self.last_ack = time.monotonic()
        self.window.release()

    def start(self, timeout_s: float) -> bool:
        """Connect and wait for the CONNACK; False when the broker refused or never answered."""
        try:
            self.client.connect(self.target.host, self.target.port, keepalive=self.keepalive)
        except OSError:
            return False
        self.client.loop_start()
        if not self.connected.wait(timeout_s) or self.connack is None or self.connack.is_failure:
            self.client.loop_stop()
            self.client.disconnect()
            return False
        return True

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _open(
    target: _Target, client_id: str, max_inflight: int, keepalive: int, timeout_s: float
) -> _Session:
    """MQTT v5 first; 3.1.1 when the broker refuses v5 for any reason but credentials."""
    v5 = _Session(target, client_id, mqtt.MQTTv5, max_inflight, keepalive)
    if v5.start(timeout_s):
        return v5
    if v5.connack is not None and str(v5.connack) in _AUTH_FAILURES:
        raise ConnectionError(f"broker refused the connection: {v5.connack}")
    v311 = _Session(target, client_id, mqtt.MQTTv311, max_inflight, keepalive)
    if v311.start(timeout_s):
        return v311
    reason = v311.connack or v5.connack or "no CONNACK"
    raise ConnectionError(f"cannot connect to {target.host}:{target.port}: {reason}")


def publish(
    url: str,
    publishes: Iterable[Publish],
    *,
    client_id: str,
    qos: int | None = 1,
    max_inflight: int = 100,
    progress: bool = True,
    total: int | None = None,
    connect_timeout_s: float = 10.0,
    ack_timeout_s: float = 30.0,
    keepalive: int = 30,
    console: Console | None = None,
) -> PublishStats:
    """Publish everything in ``publishes`` and wait for its PUBACKs.

    ``qos`` overrides each publish's own QoS (None keeps them). ``max_inflight`` bounds messages
    awaiting a PUBACK. ``ack_timeout_s`` is how long to wait without any PUBACK (e.g. while the
    broker restarts) before giving up and reporting the rest as unacked.
    """
    target = _parse(url)
    session = _open(target, client_id, max_inflight, keepalive, connect_timeout_s)
    stats = PublishStats(protocol="MQTTv5" if session.protocol == mqtt.MQTTv5 else "MQTTv311")
    if total is None and hasattr(publishes, "__len__"):
        total = len(publishes)  # type: ignore[arg-type]
    bar = _progress(console) if progress else None
    task = bar.add_task("publish", total=total) if bar else None
    t_start = time.perf_counter()
    session.last_ack = time.monotonic()
    try:
        if bar:
            bar.start()
        for pub in publishes:
            while not session.window.acquire(timeout=0.5):
                if time.monotonic() - session.last_ack > ack_timeout_s:
                    stats.timed_out = True
                    break
            if stats.timed_out:
                break
            try:
                info = session.client.publish(
                    pub.topic, pub.payload, qos=pub.qos if qos is None else qos
                )
                refused = info.rc not in (
                    MQTTErrorCode.MQTT_ERR_SUCCESS,
                    MQTTErrorCode.MQTT_ERR_NO_CONN,
                )
            except ValueError:  # an invalid topic or an oversized payload: bad input, counted
                refused = True
            if refused:
                # Refused by the client itself (e.g. queue full): it will never be acknowledged.
                session.window.release()
                with session.lock:
                    session.failed += 1
            stats.sent += 1
            stats.bytes += len(pub.payload)
            stats.readings += pub.readings
            if bar is not None and task is not None and stats.sent % 512 == 0:
                bar.update(task, completed=session.acked)
        while not stats.timed_out:
            with session.lock:
                done = session.acked + session.failed >= stats.sent
                idle = time.monotonic() - session.last_ack
            if done:
                break
            if idle > ack_timeout_s:
                stats.timed_out = True
                break
            if bar is not None and task is not None:
                bar.update(task, completed=session.acked)
            time.sleep(0.02)
    finally:
        stats.seconds = time.perf_counter() - t_start
        session.stop()
        if bar is not None and task is not None:
            bar.update(task, completed=session.acked)
            bar.stop()
    with session.lock:
        stats.acked = session.acked
        stats.failed = session.failed
        stats.reconnects = max(0, session.connects - 1)
    stats.unacked = max(0, stats.sent - stats.acked - stats.failed)
    if progress:
        (console or Console(stderr=True)).print(stats.summary())
    return stats


def _progress(console: Console | None) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        transient=False,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m simulators.publish --url mqtt://127.0.0.1:1883 --meters 300 --days 2``:
    simulate a fleet, turn it into traffic and publish it (prints the manifest path)."""
    from datetime import datetime
    from pathlib import Path

    from simulators.faults import random_faults
    from simulators.fleet import customer_meters, meter_id_of, simulate_fleet, synthetic_registry
    from simulators.traffic import TrafficParams, build_traffic, with_traffic

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--url", required=True)
    ap.add_argument("--meters", type=int, default=300)
    ap.add_argument("--days", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--start", default="2026-01-05T00:00:00+00:00")
    ap.add_argument("--reads-per-message", type=int, default=None)
    ap.add_argument("--max-inflight", type=int, default=100)
    ap.add_argument("--manifest", type=Path, default=None)
    args = ap.parse_args(argv)
    from simulators.fleet import write_manifest

    registry = synthetic_registry(args.meters)
    start = datetime.fromisoformat(args.start)
    ids = [meter_id_of(d) for d, _ in customer_meters(registry)]
    faults = random_faults(ids, [d.id for d in registry.dmas], start, args.days, args.seed)
    fleet = simulate_fleet(registry, start, args.days, seed=args.seed, faults=faults)
    traffic = build_traffic(
        fleet, registry, TrafficParams(reads_per_message=args.reads_per_message, seed=args.seed)
    )
    stats = publish(
        args.url, traffic.publishes, client_id="aquameter-sim", max_inflight=args.max_inflight
    )
    if args.manifest:
        manifest = with_traffic(fleet.manifest, traffic) | {"publish": stats.to_json()}
        print(write_manifest(manifest, args.manifest))


if __name__ == "__main__":
    main()
