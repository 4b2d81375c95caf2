"""``aquameter ingest``: every adapter the registry asks for, into one validated write path.

MQTT runs on paho's network thread (or, with ``--mqtt-workers N``, in N processes on the shared
subscription: ``ingest.workers``); CoAP, Modbus and OPC-UA adapters run concurrently on one asyncio
loop. All of them submit to the same :class:`IngestPipeline`, so validation, de-duplication and the
quarantine behave the same whatever the protocol.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
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
) -> MqttIngest:
    """The MQTT adapter as the settings describe it (not started)."""
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
    return adapters


async def run_adapters(
    adapters: dict[str, Any],
    duration_s: float | None,
    tick: Callable[[], None] | None = None,
    tick_every_s: float = 5.0,
) -> None:
    tasks = [asyncio.create_task(a.run(), name=f"adapter-{p}") for p, a in adapters.items()]
    deadline = None if duration_s is None else time.monotonic() + duration_s
    try:
        while deadline is None or time.monotonic() < deadline:
            await asyncio.sleep(
                tick_every_s
                if deadline is None
                else min(tick_every_s, max(0.0, deadline - time.monotonic()))
            )
            if tick is not None:
                tick()
            for t in tasks:
                if t.done() and not t.cancelled() and t.exception() is not None:
                    log.error("adapter %s stopped: %r", t.get_name(), t.exception())
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def make_pipeline(settings: Settings, database_url: str) -> IngestPipeline:
    return pipeline_from_settings(database_url, settings).start()
