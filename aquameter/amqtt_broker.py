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

Persistence (``python -m aquameter.amqtt_broker PORT STATE_DIR``): amqtt keeps sessions in
memory only, so a restart lost every persistent session with its subscriptions, queued and
unacknowledged messages (CI saw one 24-reading message lost across a restart). As mosquitto's
``persistence true`` does, the broker writes its state to ``STATE_DIR/amqtt-sessions.json``
(:func:`snapshot`: persistent sessions with subscriptions, unacknowledged outgoing QoS 1 messages
and queued messages; messages acknowledged to their publisher but not routed yet; retained
messages) on SIGTERM/SIGINT after it stopped accepting connections, and every
``SAVE_EVERY_S`` while it runs when something changed, so a SIGKILL loses at most that much. On
start it restores them (:func:`restore`) before the listener opens. Each periodic save
serialises the whole state: fine for the embedded test/bare-machine broker it is, not meant for
millions of queued messages.

These patches live in this broker process only; nothing else imports this module's patches.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amqtt.plugins.base import BaseAuthPlugin

log = logging.getLogger("aquameter.amqtt_broker")


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


# --- persistence across a restart (what mosquitto's ``persistence true`` gives) -----------------

STATE_FILE = "amqtt-sessions.json"
SAVE_EVERY_S = 0.25  # at most this much is lost to a SIGKILL; SIGTERM saves everything


def _b64(data: bytes | bytearray) -> str:
    return base64.b64encode(bytes(data)).decode("ascii")


def snapshot(broker: Any) -> dict[str, Any]:
    """Everything a restart must not lose, as JSON-ready data.

    - each persistent (``clean_session=False``) session: its client id, its subscriptions
      (filter, QoS), its unacknowledged outgoing QoS 1 messages (with their packet ids, sent
      again with DUP on resume) and the messages queued for it while it was away;
    - ``pending``: messages a publisher already had acknowledged (PUBACK) but that the broker has
      not routed yet (a publisher's delivery queue, the broadcast queue). A publisher may well
      use a clean session, so these are kept whatever session they came from, and routed again
      after the restart."""
    subs: dict[str, list[list[Any]]] = {}
    for topic_filter, entries in broker._subscriptions.items():
        for session, qos in entries:
            subs.setdefault(session.client_id, []).append([topic_filter, qos])
    sessions = []
    pending: list[dict[str, Any]] = []
    for client_id, (session, _handler) in list(broker._sessions.items()):
        for message in list(session.delivered_message_queue._queue):
            if message.topic is not None and message.data is not None:
                # routed as amqtt routes it: at each subscription's QoS
                pending.append({"topic": message.topic, "qos": None, "data": _b64(message.data)})
        if session.clean_session or session.is_anonymous:
            continue
        inflight = [
            {"id": pid, "topic": m.topic, "qos": m.qos, "data": _b64(m.data)}
            for pid, m in list(session.inflight_out.items())
            if m.qos == 1
        ]
        queued = [
            {"topic": m.topic, "qos": m.qos, "data": _b64(m.data)}
            for m in list(session.retained_messages._queue)
        ]
        sessions.append(
            {
                "client_id": client_id,
                "subscriptions": subs.get(client_id, []),
                "inflight": inflight,
                "queued": queued,
            }
        )
    for broadcast in list(broker._broadcast_queue._queue):
        if broadcast.get("topic") is not None and broadcast.get("data") is not None:
            pending.append(
                {
                    "topic": broadcast["topic"],
                    "qos": broadcast.get("qos"),
                    "data": _b64(broadcast["data"]),
                }
            )
    retained = [
        {"topic": topic, "qos": m.qos, "data": _b64(m.data)}
        for topic, m in list(broker._retained_messages.items())
    ]
    return {"version": 1, "sessions": sessions, "pending": pending, "retained": retained}


class SessionStore:
    """The broker's state file in ``directory``: written atomically (temporary file, fsync,
    rename), so a kill during a write leaves the previous snapshot intact."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / STATE_FILE
        self._last: bytes | None = None

    def save(self, broker: Any) -> bool:
        """Write the broker's state if it changed since the last save; whether it wrote."""
        data = json.dumps(snapshot(broker), separators=(",", ":")).encode()
        if data == self._last:
            return False
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._last = data
        return True

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None (no file yet; an unreadable file is logged and ignored:
        a broker that cannot start is worse than one that forgot its sessions)."""
        try:
            state = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.error("amqtt state file %s unreadable, starting empty: %s", self.path, exc)
            return None
        return state if isinstance(state, dict) and state.get("version") == 1 else None


async def restore(broker: Any, state: dict[str, Any]) -> None:
    """Recreate the saved sessions as disconnected persistent sessions (before the listeners
    open): a client reconnecting with ``clean_session=False`` resumes its subscriptions, gets
    its unacknowledged messages again with DUP under their packet ids, then the queued ones."""
    from amqtt.broker import RetainedApplicationMessage
    from amqtt.session import OutgoingApplicationMessage

    for saved in state.get("sessions", []):
        handler, session = broker.create_offline_session(saved["client_id"])
        session.clean_session = False
        session.is_anonymous = False
        broker._sessions[session.client_id] = (session, handler)
        for topic_filter, qos in saved["subscriptions"]:
            await broker.add_subscription((topic_filter, qos), session)
        for item in saved["inflight"]:
            message = OutgoingApplicationMessage(
                item["id"], item["topic"], item["qos"], base64.b64decode(item["data"]), False
            )
            message.publish_packet = message.build_publish_packet()  # resent with DUP
            session.inflight_out[item["id"]] = message
        if session.inflight_out:
            session._packet_id = max(session.inflight_out)
        for item in saved["queued"]:
            session.retained_messages.put_nowait(
                RetainedApplicationMessage(
                    None, item["topic"], base64.b64decode(item["data"]), item["qos"]
                )
            )
    for item in state.get("retained", []):
        broker._retained_messages[item["topic"]] = RetainedApplicationMessage(
            None, item["topic"], base64.b64decode(item["data"]), item["qos"]
        )
    for item in state.get("pending", []):
        broadcast: dict[str, Any] = {
            "session": None,
            "topic": item["topic"],
            "data": base64.b64decode(item["data"]),
        }
        if item.get("qos") is not None:
            broadcast["qos"] = item["qos"]
        broker._broadcast_queue.put_nowait(broadcast)


async def _serve(port: int, state_dir: Path | None) -> None:
    from amqtt.broker import Broker

    _patch_amqtt()
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"aquameter.amqtt_broker.LoopbackAuthPlugin": {}},
    }
    store = SessionStore(state_dir) if state_dir is not None else None
    broker = Broker(config)
    if store is not None and (state := store.load()) is not None:
        saved = state
        start_listeners = broker._start_listeners

        async def restore_then_listen() -> None:
            # after start() cleared the sessions, before any client can connect
            await restore(broker, saved)
            await start_listeners()

        broker._start_listeners = restore_then_listen  # type: ignore[method-assign]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await broker.start()
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), SAVE_EVERY_S)
            except TimeoutError:
                pass
            if store is not None and not stop.is_set():
                store.save(broker)
    finally:
        if store is not None:
            for server in broker._servers.values():
                if server.instance is not None:
                    server.instance.close()  # no new connections while the last state is taken
            for _ in range(10):
                await asyncio.sleep(0.01)  # publish tasks already started register in-flight
            store.save(broker)
        await broker.shutdown()


def main() -> None:
    """``python -m aquameter.amqtt_broker PORT [STATE_DIR]``: serve until SIGTERM; with
    STATE_DIR, persistent sessions survive a restart (see the module docstring)."""
    logging.basicConfig(level=logging.WARNING)
    state_dir = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    asyncio.run(_serve(int(sys.argv[1]), state_dir))


if __name__ == "__main__":
    main()
