"""The ingest pipeline: transports submit frames, one writer thread commits them in batches.

Frames are decoded and validated in the submitting thread (so N transports validate in parallel
with the write), then wait in a bounded queue: a full queue blocks ``submit``, which stalls the
transport's socket reads and pushes back on the broker or device instead of growing memory. A
frame's ``on_durable`` callback runs only after the transaction holding all its readings and
quarantine rows has committed: transports acknowledge upstream there, so a crash or database
outage loses nothing that was acknowledged.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import psycopg

from aquameter.settings import Settings
from ingest.channels import ChannelIndex
from ingest.counters import IngestCounters
from ingest.validate import Prepared, Rejection, Validator
from ingest.writer import Batch, BatchWriter, CopyStream, WriteResult
from protocols.uplink import DurableCallback, Frame, FrameOutcome
from sql.connect import connect

log = logging.getLogger("aquameter.ingest")

WRITE_FAILED = "WRITE_FAILED"


@dataclass(slots=True)
class _Item:
    frame: Frame
    prepared: Prepared
    on_durable: DurableCallback


_STOP = object()


class IngestPipeline:
    def __init__(
        self,
        database_url: str,
        *,
        batch_rows: int = 20_000,
        batch_seconds: float = 0.25,
        queue_frames: int = 5_000,
        future_tolerance_s: float = 300.0,
        earliest_epoch: float = 946_684_800.0,
        reload_every_s: float = 10.0,
        retry_max_s: float = 10.0,
        stream_rows: int = 5_000,
        batch_linger_s: float = 0.01,
    ) -> None:
        self.database_url = database_url
        self.batch_rows = batch_rows
        self.stream_rows = stream_rows
        self.batch_linger_s = batch_linger_s
        self._stream: CopyStream | None = None
        self.batch_seconds = batch_seconds
        self.retry_max_s = retry_max_s
        self.counters = IngestCounters()
        self._queue: queue.Queue[_Item | object] = queue.Queue(maxsize=queue_frames)
        self._index: ChannelIndex | None = None
        self._reload_every_s = reload_every_s
        self._last_reload = 0.0
        self._reload_lock = threading.Lock()
        self.validator = Validator(
            self.index,
            future_tolerance_s=future_tolerance_s,
            earliest_epoch=earliest_epoch,
            on_unknown_device=self._maybe_reload,
        )
        self._thread: threading.Thread | None = None
        self._acker: threading.Thread = threading.Thread()
        self._acks: queue.SimpleQueue[list[_Item] | None] = queue.SimpleQueue()
        self._conn: psycopg.Connection | None = None

    # --- channel index ---------------------------------------------------------------------
    def index(self) -> ChannelIndex:
        assert self._index is not None, "pipeline not started"
        return self._index

    def reload_index(self) -> int:
        with connect(self.database_url) as conn:
            self._index = ChannelIndex.load(conn)
        self._last_reload = time.monotonic()
        return len(self._index)

    def _maybe_reload(self) -> bool:
        with self._reload_lock:
            if time.monotonic() - self._last_reload < self._reload_every_s:
                return False
            try:
                self.reload_index()
            except psycopg.Error as err:
                log.warning("channel index reload failed: %s", err)
                self._last_reload = time.monotonic()
                return False
            return True

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> IngestPipeline:
        self.reload_index()
        self._thread = threading.Thread(target=self._run, name="aquameter-writer", daemon=True)
        self._acker = threading.Thread(target=self._run_acks, name="aquameter-acks", daemon=True)
        self._thread.start()
        self._acker.start()
        return self

    def close(self, timeout: float | None = 60.0) -> None:
        """Drain what was submitted, commit it, and stop the writer."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self._thread = None
        self._acks.put(None)
        self._acker.join(timeout)

    def __enter__(self) -> IngestPipeline:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the submit side -------------------------------------------------------------------
    def submit(self, frame: Frame, on_durable: DurableCallback) -> None:
        prepared = self.validator.prepare(frame)
        self.counters.add(frames=1, readings_received=len(prepared) + len(prepared.rejections))
        self._queue.put(_Item(frame, prepared, on_durable))

    def submit_many(self, frames: list[Frame]) -> list[FrameOutcome]:
        """Submit frames and wait until all are durable (bulk import, tests)."""
        done = threading.Semaphore(0)
        outcomes: list[FrameOutcome] = []

        def cb(outcome: FrameOutcome) -> None:
            outcomes.append(outcome)
            done.release()

        for frame in frames:
            self.submit(frame, cb)
        for _ in frames:
            done.acquire()
        return outcomes

    # --- the writer side -------------------------------------------------------------------
    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = connect(self.database_url)
            self._writer = BatchWriter(self._conn)
        return self._conn

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            assert isinstance(first, _Item)
            self._stream = self._open_stream()
            items = [first]
            rows = self._feed(first)
            deadline = time.monotonic() + self.batch_seconds
            while rows < self.batch_rows:
                # Group commit: take what is queued; when nothing is, wait only a short linger
                # for more, never past the batch's deadline. Under load batches fill up by
                # themselves while the previous one commits; when traffic stops, the last
                # frames are committed (and acknowledged) at once instead of at the deadline.
                remaining = min(self.batch_linger_s, deadline - time.monotonic())
                try:
                    item = (
                        self._queue.get(timeout=remaining)
                        if remaining > 0
                        else (self._queue.get_nowait())
                    )
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                assert isinstance(item, _Item)
                items.append(item)
                rows += self._feed(item)
            self._finish(items)
        if self._conn is not None:
            self._conn.close()

    # A batch's readings are streamed into its COPY as frames arrive (see CopyStream); the frames
    # are kept until the commit, so any failure can fall back to writing them as one batch.
    def _open_stream(self) -> CopyStream | None:
        try:
            self._connection()
        except psycopg.Error:
            return None  # _commit's retry loop deals with the outage
        return None if self._writer.careful else CopyStream(self._writer)

    def _feed(self, item: _Item) -> int:
        p = item.prepared
        stream = self._stream
        if stream is not None and len(p):
            stream.add(p.channel_ids, p.ts, p.values, p.quality)
            if stream.pending >= self.stream_rows:
                try:
                    stream.flush()
                except psycopg.Error as err:
                    self._stream = None
                    _abandon(stream, err)
        return len(p)

    def _finish(self, items: list[_Item]) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            rejections = [
                (it.frame.source, it.frame.address, rej)
                for it in items
                for rej in it.prepared.rejections
            ]
            try:
                result = stream.commit(rejections)
            except psycopg.Error as err:
                if isinstance(err, psycopg.errors.UniqueViolation):
                    self._writer.note_duplicates()
                _abandon(stream, err)
            else:
                self._acknowledge(items, result)
                return
        self._commit(items)

    def _batch(self, items: list[_Item]) -> Batch:
        batch = Batch()
        for it in items:
            p = it.prepared
            batch.channel_ids.extend(p.channel_ids)
            batch.ts.extend(p.ts)
            batch.values.extend(p.values)
            batch.quality.extend(p.quality)
            batch.rejections.extend(
                (it.frame.source, it.frame.address, rej) for rej in p.rejections
            )
        return batch

    def _commit(self, items: list[_Item]) -> None:
        """Write items; retry with backoff while the database is away. Never acknowledges a frame
        before its transaction committed."""
        batch = self._batch(items)
        delay = 0.1
        failures = 0
        while True:
            try:
                self._connection()
                result = self._writer.write(batch)
                break
            except psycopg.OperationalError as err:
                self.counters.add(db_errors=1)
                log.warning("database unavailable (%s); retrying in %.1fs", err, delay)
            except psycopg.Error as err:
                self.counters.add(db_errors=1)
                failures += 1
                log.error("batch write failed (%s)", err)
                if failures >= 3 and len(items) > 1:
                    for item in items:  # isolate the frame that fails; the others go through
                        self._commit([item])
                    return
                if failures >= 3:
                    batch = self._quarantine_instead(items[0], str(err))
            time.sleep(delay)
            delay = min(delay * 2, self.retry_max_s)
        self._acknowledge(items, result)

    def _acknowledge(self, items: list[_Item], result: WriteResult) -> None:
        """Count a committed batch and hand its frames to the ack thread.

        Why a thread of its own: acknowledging is per frame (a PUBACK, a CoAP response), and
        done here it would keep the writer from starting the next COPY; handed over, the server
        inserts the next batch while the acks go out. One thread, FIFO, so acknowledgements keep
        the order frames arrived in (MQTT requires PUBACKs in order).
        """
        self.counters.add(stored=result.inserted, duplicates=result.duplicates, batches=1)
        self.counters.add_quarantined(result.quarantined)
        self._acks.put(items)

    def _run_acks(self) -> None:
        while (items := self._acks.get()) is not None:
            for it in items:
                p = it.prepared
                outcome = FrameOutcome(
                    accepted=len(p),
                    quarantined=len(p.rejections),
                    reasons=[r.reason for r in p.rejections],
                )
                try:
                    it.on_durable(outcome)
                except Exception:  # a transport's callback must not stop the acknowledgements
                    log.exception("on_durable callback failed")

    def _quarantine_instead(self, item: _Item, error: str) -> Batch:
        item.prepared = Prepared(
            rejections=[
                Rejection(
                    WRITE_FAILED, error[:500], item.frame.device_hint, item.frame.payload or None
                )
            ]
        )
        return self._batch([item])


def _abandon(stream: CopyStream, err: psycopg.Error) -> None:
    """Roll a streamed batch back; its frames are then written as one batch (``_commit``)."""
    if not isinstance(err, psycopg.errors.UniqueViolation):  # a redelivery is not news
        log.warning("streamed write failed (%s); writing the batch again", err)
    stream.abort()


def pipeline_from_settings(database_url: str, settings: Settings) -> IngestPipeline:
    return IngestPipeline(
        database_url,
        batch_rows=settings.batch_rows,
        batch_seconds=settings.batch_seconds,
        batch_linger_s=settings.batch_linger_s,
        stream_rows=settings.stream_rows,
        queue_frames=settings.queue_frames,
        future_tolerance_s=settings.future_tolerance_s,
        earliest_epoch=settings.earliest_timestamp.timestamp(),
    )
