"""Run an embedded amqtt broker on 127.0.0.1:PORT (MQTT 3.1.1) until terminated.

Used only when no MQTT URL is configured and no ``mosquitto`` binary is found (or
``AQUAMETER_EMBEDDED_BROKER=amqtt``). It speaks MQTT 3.1.1 only: no shared subscriptions, so
ingest runs one subscriber (``--mqtt-workers`` falls back to 1), on a persistent session
(``clean_session=False``) with QoS 1 and manual acknowledgement.

amqtt 0.12 as shipped does not keep the at-least-once promise that manual acknowledgement relies
on, so this process adjusts three things (measured with ``tests/test_bare_machine.py``):

- *Anonymous sessions are not persistent*: amqtt drops a disconnected anonymous session and
  does not queue QoS 1 messages for it. :class:`LoopbackAuthPlugin` admits every client of this
  loopback-only broker without marking it anonymous, so ``clean_session=False`` means what the
  MQTT 3.1.1 standard says (subscriptions and QoS 1 messages kept while disconnected).
- *Unacknowledged deliveries are discarded after 5 s*: amqtt waits 5 s for a PUBACK and then
  forgets the message, so a message held by an ingest that cannot commit (a database outage,
  a crash) was lost. Here an outgoing QoS 1 message stays in the session until its PUBACK,
  however long that takes, and is sent again (DUP) when the session resumes [MQTT-4.4.0-1].
- *Resending blocks the connection*: amqtt resends a resumed session's unacknowledged messages,
  and the messages queued while it was away, and waits (up to 10 s each) for their PUBACKs
  before it reads the client's SUBSCRIBE or notices a disconnect. Here both are sent without
  waiting; their PUBACKs arrive through the normal read loop.

These patches live in this broker process only; nothing else imports this module's patches.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from dataclasses import dataclass
from typing import Any

from amqtt.plugins.base import BaseAuthPlugin


def _patch_amqtt() -> None:
    from amqtt.mqtt.constants import QOS_1
    from amqtt.mqtt.protocol.handler import ProtocolHandler
    from amqtt.session import OUTGOING

    original_qos1 = ProtocolHandler._handle_qos1_message_flow
    background: set[asyncio.Task[None]] = set()

    async def qos1_flow(self: Any, app_message: Any) -> None:
        if app_message.direction != OUTGOING or app_message.qos != QOS_1:
            await original_qos1(self, app_message)
            return
        packet_id = app_message.packet_id
        self.session.inflight_out.setdefault(packet_id, app_message)
        # A message sent before (a resumed session) goes out again with the DUP flag.
        packet = app_message.build_publish_packet(dup=app_message.publish_packet is not None)
        await self._send_packet(packet)
        app_message.publish_packet = packet
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._puback_waiters[packet_id] = waiter
        try:
            # No timeout: ingest acknowledges when the reading is committed, which may take a
            # database outage. A disconnect cancels the waiter and the message stays in the
            # session, for the next connection of that client id.
            app_message.puback_packet = await waiter
        finally:
            if self._puback_waiters.get(packet_id) is waiter:
                del self._puback_waiters[packet_id]
        self.session.inflight_out.pop(packet_id, None)

    async def retry_deliveries(self: Any) -> None:
        for message in itertools.chain(
            list(self.session.inflight_in.values()), list(self.session.inflight_out.values())
        ):
            task = asyncio.ensure_future(self._handle_message_flow(message))
            background.add(task)
            task.add_done_callback(_forget(background))

    async def publish_session_queue(broker: Any, session: Any) -> None:
        handler = broker._get_handler(session)
        if handler is None:
            return
        while not session.retained_messages.empty():
            queued = await session.retained_messages.get()
            # Delivered as the message it was (amqtt set the retain flag on these).
            task = asyncio.ensure_future(
                handler.mqtt_publish(queued.topic, queued.data, queued.qos, retain=False)
            )
            background.add(task)
            task.add_done_callback(_forget(background))

    from amqtt.broker import Broker

    ProtocolHandler._handle_qos1_message_flow = qos1_flow  # type: ignore[method-assign]
    ProtocolHandler._retry_deliveries = retry_deliveries  # type: ignore[method-assign]
    Broker._publish_session_retained_messages = publish_session_queue  # type: ignore[method-assign]


def _forget(tasks: set[asyncio.Task[None]]) -> Any:
    def done(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a closed connection is expected here, not an error

    return done


class LoopbackAuthPlugin(BaseAuthPlugin):
    """Admit every client of this loopback-only broker, as a non-anonymous session."""

    @dataclass
    class Config:
        pass

    async def authenticate(self, *, session: Any) -> bool:
        return True


async def _serve(port: int) -> None:
    from amqtt.broker import Broker

    _patch_amqtt()
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"aquameter.amqtt_broker.LoopbackAuthPlugin": {}},
    }
    broker = Broker(config)
    await broker.start()
    try:
        await asyncio.Event().wait()
    finally:
        await broker.shutdown()


def main() -> None:
    asyncio.run(_serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
