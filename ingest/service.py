"""``aquameter ingest``: every adapter the registry asks for, into one validated write path.

MQTT runs on paho's network thread (or, with ``--mqtt-workers N``, in N processes on the shared
subscription: ``ingest.workers``); CoAP, Modbus and OPC-UA adapters run concurrently on one asyncio
loop, and so does the CJ/T 188 TCP listener when ``--cjt188-listen`` opens it. All of them submit
to the same :class:`IngestPipeline`, so validation, de-duplication and the quarantine behave the
same whatever the protocol.

Health: a process that reads nothing must not look alive. :func:`ingest_problem` names what
broke for good — paho's network thread died, or the pipeline reported ``failure`` (its writer
gave up) — and the supervisors (``aquameter ingest``, each ``ingest.workers`` process) stop
cleanly and exit non-zero on it, so the service manager (or the worker supervisor) restarts the
process and the broker redelivers what was not acknowledged.

Async adapters are not restarted in-process: :func:`run_adapters` raises :class:`IngestFailed`
as soon as one adapter's ``run()`` ends with an exception. Each adapter already retries what is
expected to fail (CoAP binding, Modbus and OPC-UA connections) and contains per-request and
per-poll errors; an exception that still escapes ``run()`` is a bug or a broken configuration,
after which the adapter's state (sockets, sessions, half-drained frames) is unknown. Restarting
the whole process is the one restart whose outcome is known, and it is loud.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aquameter.registry import Registry
from aquameter.settings import Settings
from ingest.pipeline import IngestPipeline, pipeline_from_settings
from protocols.mqtt import MqttIngest
from protocols.uplink import FrameSink

log = logging.getLogger("aquameter.ingest")

# protocol -> (module, class) of its adapter; each has (devices, registry, sink) and async run().
ASYNC_ADAPTERS: dict[str, tuple[str, str]] = {
    "coap": ("protocols.coap", "CoapIngest"),
    "modbus": ("protocols.modbus", "ModbusPoller"),
    "opcua": ("protocols.opcua", "OpcUaSubscriber"),
}


class IngestFailed(RuntimeError):
    """Ingest cannot go on in this process (an adapter died, the pipeline or MQTT failed); the
    message says what failed and what to do. The process must stop cleanly and exit non-zero."""


def ingest_problem(pipeline: object, mqtt: MqttIngest | None = None) -> str | None:
    """None while this process can ingest; else what failed, as one line for the log.

    ``pipeline.failure`` is read with ``getattr``: any sink may stand in for the pipeline."""
    failure = getattr(pipeline, "failure", None)
    if failure:
        return f"ingest pipeline failed: {failure}"
    if mqtt is not None:
        return mqtt.problem()
    return None


@dataclass
class IngestRun:
    pipeline: IngestPipeline
    mqtt: MqttIngest | None = None
    adapters: dict[str, Any] = field(default_factory=dict)


def vendor_formats(registry: Registry) -> dict[str, str]:
    return {v.id: v.payload for v in registry.vendors}


def mqtt_client(
    settings: Settings,
    vendor_formats: dict[str, str],
    sink: FrameSink,
    url: str,
    v5: bool,
    client_id: str | None = None,
    *,
    persistent: bool = True,
) -> MqttIngest:
    """The MQTT adapter as the settings describe it (not started): login and TLS from the
    settings, never only from the URL (so the URL stays printable). ``persistent=False``: a
    one-off listener's session, gone when it disconnects."""
    return MqttIngest(
        url,
        sink,
        vendor_formats,
        topic_root=settings.mqtt_topic_root,
        shared_group=settings.mqtt_shared_group,
        client_id=client_id or settings.mqtt_client_id,
        session_expiry_s=settings.mqtt_session_expiry_s,
        qos=settings.mqtt_qos,
        receive_maximum=settings.mqtt_receive_maximum,
        reconnect_min_s=settings.mqtt_reconnect_min_s,
        reconnect_max_s=settings.mqtt_reconnect_max_s,
        v5=v5,
        username=settings.mqtt_username,
        password=(
            settings.mqtt_password.get_secret_value()
            if settings.mqtt_password is not None
            else None
        ),
        password_file=settings.mqtt_password_file,
        ca_file=settings.mqtt_ca_file,
        cert_file=settings.mqtt_cert_file,
        key_file=settings.mqtt_key_file,
        tls_version=settings.mqtt_tls_version,
        trust_topic=settings.mqtt_trust_topic,
        persistent=persistent,
    )


def start_mqtt(
    settings: Settings, registry: Registry, pipeline: IngestPipeline, url: str, v5: bool
) -> MqttIngest:
    return mqtt_client(settings, vendor_formats(registry), pipeline, url, v5).start()


def adapter_options(settings: Settings) -> dict[str, dict[str, Any]]:
    """Per-protocol keyword options of the adapters, from settings."""
    return {
        "coap": {
            "host": settings.coap_host,
            "port": settings.coap_port,
            "path": settings.coap_path,
            "max_payload_bytes": settings.max_payload_bytes,
        },
    }


def build_async_adapters(
    registry: Registry,
    pipeline: IngestPipeline,
    protocols: set[str] | None = None,
    options: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    adapters: dict[str, Any] = {}
    for proto, (module, cls_name) in ASYNC_ADAPTERS.items():
        if protocols is not None and proto not in protocols:
            continue
        devices = registry.devices_by_protocol(proto)  # type: ignore[arg-type]
        if not devices:
            continue
        cls = getattr(importlib.import_module(module), cls_name)
        adapters[proto] = cls(devices, registry, pipeline, **(options or {}).get(proto, {}))
    listen = (options or {}).get("cjt188")
    if listen and (protocols is None or "cjt188" in protocols):
        # Not a registry protocol: DTUs dial in to a port the operator opens (--cjt188-listen),
        # and every frame names its meter by address, resolved among the cjt188 vendors' devices.
        from protocols.cjt188_listener import Cjt188Listener, cjt188_addresses

        adapters["cjt188"] = Cjt188Listener(cjt188_addresses(registry), pipeline, **listen)
    return adapters


async def run_adapters(
    adapters: dict[str, Any],
    duration_s: float | None,
    tick: Callable[[], None] | None = None,
    tick_every_s: float = 5.0,
    check: Callable[[], str | None] | None = None,
    check_every_s: float = 1.0,
) -> None:
    """Run the async adapters until ``duration_s`` passes (or forever, until cancelled).

    ``tick`` (the counters line) runs every ``tick_every_s``; ``check`` (what failed, or None)
    every ``check_every_s``. Raises :class:`IngestFailed` when ``check`` reports a problem or
    an adapter's ``run()`` ended with an exception (see the module docstring for why adapters
    are not restarted here); the other adapters are cancelled (and drain) first.
    """
    tasks = [asyncio.create_task(a.run(), name=f"adapter-{p}") for p, a in adapters.items()]
    loop = asyncio.get_running_loop()
    deadline = None if duration_s is None else loop.time() + duration_s
    next_tick = loop.time() + tick_every_s
    finished: set[asyncio.Task[Any]] = set()
    try:
        while deadline is None or loop.time() < deadline:
            step = min(check_every_s, max(0.0, next_tick - loop.time()))
            if deadline is not None:
                step = min(step, max(0.0, deadline - loop.time()))
            await asyncio.sleep(step)
            if tick is not None and loop.time() >= next_tick:
                next_tick = loop.time() + tick_every_s
                tick()
            for t in tasks:
                if not t.done() or t in finished:
                    continue
                finished.add(t)
                exc = None if t.cancelled() else t.exception()
                if exc is not None:
                    log.error("adapter %s stopped: %r", t.get_name(), exc)
                    raise IngestFailed(
                        f"{t.get_name()} stopped with {type(exc).__name__}: {exc}; fix the "
                        "cause (see the traceback above) and start ingest again"
                    ) from exc
                log.warning("adapter %s ended (nothing left to run)", t.get_name())
            problem = check() if check is not None else None
            if problem is not None:
                raise IngestFailed(problem)
        if tick is not None:
            tick()  # the counters at the end of a timed run
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def make_pipeline(settings: Settings, database_url: str) -> IngestPipeline:
    return pipeline_from_settings(database_url, settings).start()
