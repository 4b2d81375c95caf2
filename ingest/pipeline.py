"""The ingest pipeline: transports submit frames, one writer thread commits them in batches.

Frames are decoded and validated in the submitting thread (so N transports validate in parallel
with the write), then wait in a queue bounded in frames *and* bytes: a full queue blocks
``submit``, which stalls the transport's socket reads and pushes back on the broker or device
instead of growing memory. A frame's ``on_durable`` callback runs only after the transaction
holding all its readings and quarantine rows has committed: transports acknowledge upstream
there, so a crash or database outage loses nothing that was acknowledged.

The poison contract: no frame can stop ingest or reach another frame.

- ``submit`` never raises for content: an exception while decoding or validating one frame
  becomes that frame's PROCESSING_ERROR quarantine row (with its raw bytes, or its canonical rows
  as JSON, and the exception text).
- A batch the database refuses for a reason other than an outage is split in halves until the
  frame that fails is alone; that frame is retried a bounded number of times, then quarantined
  as WRITE_FAILED; the quarantine write itself escapes any content (``ingest.quarantine``).
- The writer thread is supervised: an unexpected exception is logged, counted and the loop
  restarts; one that keeps recurring sets :attr:`IngestPipeline.failure`, which the process's
  supervisor turns into a non-zero exit, so the broker redelivers to a healthy worker.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from aquameter.backoff import Backoff
from aquameter.settings import Settings
from ingest.channels import ChannelIndex
from ingest.counters import IngestCounters
from ingest.quarantine import bound_rejections, safe_text
from ingest.registry_watch import RegistryWatch
from ingest.validate import (
    PROCESSING_ERROR,
    WRITE_FAILED,
    Prepared,
    Rejection,
    Validator,
    frame_raw,
)
from ingest.writer import Batch, BatchWriter, CopyStream, WriteResult
from protocols.uplink import DurableCallback, Frame, FrameOutcome
from sql.connect import connect

log = logging.getLogger("aquameter.ingest")

__all__ = ["WRITE_FAILED", "IngestPipeline", "pipeline_from_settings"]

# Bytes a validated reading holds in memory (four Python list slots and their objects).
_READING_BYTES = 40


@dataclass(slots=True)
class _Item:
    frame: Frame
    prepared: Prepared
    on_durable: DurableCallback
    size: int = 0


_STOP = object()

# How often the writer looks at the queue while a batch is open (instead of being woken by
# every submit: a wake-up per frame costs a thread switch per message at 1 reading/message).
_POLL_S = 0.002


class _FrameQueue:
    """The queue between submitters and the writer, bounded in frames and in bytes.

    One lock and one condition for both bounds (``queue.Queue`` plus a byte condition took two
    locks, a notify and a writer wake-up per frame). A frame's bytes count from its submit until
    it is acknowledged (:meth:`release`), its place until the writer takes it. Submitters are
    woken only when some are blocked; the writer only when it sleeps on an empty queue: while a
    batch is open it polls (:meth:`take`), so a burst does not switch threads per frame."""

    def __init__(self, max_frames: int, max_bytes: int) -> None:
        self.items: deque[_Item | object] = deque()
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.bytes = 0
        self.blocked = 0  # submitters waiting for room
        self._idle = False  # the writer waits for the first frame of a batch
        self._cv = threading.Condition(threading.Lock())

    def _full(self, size: int) -> bool:
        # Bounded in bytes as well as frames: six 11 MB messages once took RSS to 742 MB.
        # A frame larger than the whole bound still goes through once nothing else is held.
        return len(self.items) >= self.max_frames or (
            self.bytes > 0 and self.bytes + size > self.max_bytes
        )

    def put(self, item: _Item | object, size: int, timeout: float | None = None) -> bool:
        """Queue ``item`` holding ``size`` bytes; block while full (False when ``timeout``
        passed first)."""
        cv = self._cv
        with cv:
            if self._full(size):
                deadline = None if timeout is None else time.monotonic() + timeout
                self.blocked += 1
                try:
                    while self._full(size):
                        wait = 1.0 if deadline is None else deadline - time.monotonic()
                        if wait <= 0:
                            return False
                        cv.wait(min(wait, 1.0))
                finally:
                    self.blocked -= 1
            self.bytes += size
            self.items.append(item)
            if self._idle:
                cv.notify_all()
        return True

    def take(self, wait_s: float | None) -> _Item | object | None:
        """The oldest item; waits up to ``wait_s`` (None: for ever) when there is none, and
        returns None if still none."""
        cv = self._cv
        with cv:
            if not self.items:
                if wait_s is not None and wait_s <= 0:
                    return None
                self._idle = True
                try:
                    cv.wait_for(lambda: self.items, wait_s)
                finally:
                    self._idle = False
                if not self.items:
                    return None
            item = self.items.popleft()
            if self.blocked:
                cv.notify_all()
            return item

    def saturated(self) -> bool:
        """A put now would block: full in frames or in bytes, or others already wait."""
        return (
            len(self.items) >= self.max_frames or self.blocked > 0 or self.bytes >= self.max_bytes
        )

    def release(self, size: int) -> None:
        """``size`` bytes are acknowledged: room for blocked submitters."""
        with self._cv:
            self.bytes -= size
            if self.blocked:
                self._cv.notify_all()


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
        queue_bytes: int = 64 * 1_048_576,
        max_payload_bytes: int = 1_048_576,
        max_readings_per_frame: int = 100_000,
        max_payload_depth: int = 32,
        max_quarantine_rows_per_frame: int = 100,
        clock_skew_s: float = 7 * 86_400.0,
        clock_skew_action: str = "flag",
        live_window_days: float = 400.0,
        frame_write_attempts: int = 3,
        registry_poll_s: float | None = 2.0,
    ) -> None:
        self.database_url = database_url
        self.batch_rows = batch_rows
        self.stream_rows = stream_rows
        self.batch_linger_s = batch_linger_s
        self._stream: CopyStream | None = None
        self.batch_seconds = batch_seconds
        self.retry_max_s = retry_max_s
        self.counters = IngestCounters()
        self._queue = _FrameQueue(queue_frames, queue_bytes)
        self.queue_bytes = queue_bytes
        self.max_quarantine_rows_per_frame = max_quarantine_rows_per_frame
        self.frame_write_attempts = frame_write_attempts
        self.failure: str | None = None
        self.writer_restarts = 0
        # Called by the writer thread with the seconds from a batch being closed to its commit
        # (retries while the database is away included): the one timing only the writer sees,
        # for the exporter's commit-latency histogram (ingest.metrics). Must be quick.
        self.on_commit: Callable[[float], None] | None = None
        self._registry_poll_s = registry_poll_s
        self._watch: RegistryWatch | None = None
        self._index: ChannelIndex | None = None
        self._reload_every_s = reload_every_s
        self._last_reload = 0.0
        self._reload_lock = threading.Lock()
        self.validator = Validator(
            self.index,
            future_tolerance_s=future_tolerance_s,
            earliest_epoch=earliest_epoch,
            on_unknown_device=self._maybe_reload,
            max_payload_bytes=max_payload_bytes,
            max_readings_per_frame=max_readings_per_frame,
            max_payload_depth=max_payload_depth,
            clock_skew_s=clock_skew_s,
            clock_skew_action=clock_skew_action,
            live_window_days=live_window_days,
        )
        self._thread: threading.Thread | None = None
        self._acker: threading.Thread = threading.Thread()
        self._acks: queue.SimpleQueue[list[_Item] | None] = queue.SimpleQueue()
        self._ack_flushes: list[Callable[[], None]] = []
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

    def _registry_changed(self) -> None:
        """``devices sync`` ran somewhere: take the new registry for the next frames."""
        with self._reload_lock:
            n = self.reload_index()
        log.info("registry changed: %d channels reloaded", n)

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
        if self._registry_poll_s:
            # Watch first, load second: a sync committed in between is then seen, not missed.
            self._watch = RegistryWatch(
                self.database_url, self._registry_changed, poll_s=self._registry_poll_s
            ).start()
        self.reload_index()
        self._thread = threading.Thread(
            target=self._supervise, name="aquameter-writer", daemon=True
        )
        self._acker = threading.Thread(target=self._run_acks, name="aquameter-acks", daemon=True)
        self._thread.start()
        self._acker.start()
        return self

    def healthy(self) -> bool:
        """The writer runs (or has not started) and nothing failed for good."""
        return self.failure is None and (self._thread is None or self._thread.is_alive())

    def saturated(self) -> bool:
        """A submit now would block: the queue is full in frames or in bytes."""
        return self._queue.saturated()

    @property
    def queued_bytes(self) -> int:
        return self._queue.bytes

    @property
    def queued_frames(self) -> int:
        """Frames waiting for the writer."""
        return len(self._queue.items)

    def close(self, timeout: float | None = 60.0) -> None:
        """Drain what was submitted, commit it, and stop the writer."""
        if self._thread is None:
            return
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        # A writer that died for good leaves a full queue nobody empties.
        if not self._queue.put(_STOP, 0, timeout=timeout):
            log.error("ingest writer is not draining; closing without it")
        self._thread.join(timeout)
        self._thread = None
        self._acks.put(None)
        self._acker.join(timeout)

    def __enter__(self) -> IngestPipeline:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the submit side -------------------------------------------------------------------
    def prepare(self, frame: Frame) -> Prepared:
        """Validate ``frame``: its readings and quarantine rows, the rows bounded per frame.

        Never raises for what the frame holds: whatever goes wrong becomes its quarantine row.
        Public so that a caller that must look at the outcome before submitting (the importer,
        keying re-imported rows) validates once and hands the result to :meth:`submit`.
        """
        try:
            prepared = self.validator.prepare(frame)
        except Exception as err:  # the poison contract: one frame's bug stays with the frame
            self.counters.add(processing_errors=1)
            log.warning(
                "frame from %s %s: %s: %s",
                frame.source,
                safe_text(frame.address, 120),
                type(err).__name__,
                safe_text(str(err), 200),
            )
            prepared = Prepared(
                rejections=[
                    Rejection(
                        PROCESSING_ERROR,
                        f"{type(err).__name__}: {err}",
                        _device_hint(frame),
                        _raw_of(frame),
                    )
                ]
            )
        limit = self.max_quarantine_rows_per_frame
        if len(prepared.rejections) > limit:
            prepared.rejections = bound_rejections(prepared.rejections, limit, _raw_of(frame))
        return prepared

    def submit(
        self, frame: Frame, on_durable: DurableCallback, prepared: Prepared | None = None
    ) -> None:
        """Validate ``frame`` (unless ``prepared`` by :meth:`prepare`) and queue it; blocks while
        the queue is full (back-pressure). Never raises for what the frame holds."""
        if prepared is None:
            prepared = self.prepare(frame)
        received = len(prepared) + sum(r.readings for r in prepared.rejections)
        self.counters.received(received)
        size = frame.size + _READING_BYTES * len(prepared)
        self._queue.put(_Item(frame, prepared, on_durable, size), size)

    def _release(self, items: list[_Item]) -> None:
        self._queue.release(sum(it.size for it in items))

    def submit_many(
        self, frames: list[Frame], prepared: list[Prepared | None] | None = None
    ) -> list[FrameOutcome]:
        """Submit frames (with what :meth:`prepare` made of them, where known) and wait until
        all are durable (bulk import, tests)."""
        done = threading.Semaphore(0)
        outcomes: list[FrameOutcome] = []

        def cb(outcome: FrameOutcome) -> None:
            outcomes.append(outcome)
            done.release()

        for i, frame in enumerate(frames):
            self.submit(frame, cb, prepared[i] if prepared is not None else None)
        for _ in frames:
            done.acquire()
        return outcomes

    # --- the writer side -------------------------------------------------------------------
    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = connect(self.database_url)
            self._writer = BatchWriter(self._conn)
        return self._conn

    def _supervise(self) -> None:
        """Run the writer loop; restart it after an unexpected exception, give up on a loop.

        Why: a writer thread that dies leaves every transport blocked on a full queue with no
        word said. Restarting keeps ingest going through a one-off; five crashes within a
        minute is a bug, not bad luck, and ``failure`` makes the process exit loudly."""
        crashes: list[float] = []
        while True:
            try:
                self._run()
                return
            except Exception as err:
                now = time.monotonic()
                crashes = [t for t in crashes if now - t < 60.0] + [now]
                self.writer_restarts += 1
                log.exception("ingest writer crashed (%s); restarting", err)
                self._reset_connection()
                if len(crashes) >= 5:
                    self.failure = f"ingest writer crashed {len(crashes)} times in 60 s: {err!r}"
                    log.critical("%s; giving up", self.failure)
                    return

    def _reset_connection(self) -> None:
        conn, self._conn = self._conn, None
        self._stream = None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # closing a broken connection may itself fail
                pass

    def _run(self) -> None:
        stopping = False
        take = self._queue.take
        while not stopping:
            first = take(None)
            if first is _STOP:
                break
            assert isinstance(first, _Item)
            self._stream = self._open_stream()
            items = [first]
            rows = self._feed(first)
            now = time.monotonic()
            deadline = now + self.batch_seconds
            linger_until = now + self.batch_linger_s
            while rows < self.batch_rows:
                # Group commit: take what is queued; when nothing is, wait only a short linger
                # for more, never past the batch's deadline. Under load batches fill up by
                # themselves while the previous one commits; when traffic stops, the last
                # frames are committed (and acknowledged) at once instead of at the deadline.
                # An empty queue is looked at again every _POLL_S rather than waited on.
                item = take(0)
                if item is None:
                    now = time.monotonic()
                    end = min(linger_until, deadline)
                    if now >= end:
                        break
                    time.sleep(min(_POLL_S, end - now))
                    continue
                if item is _STOP:
                    stopping = True
                    break
                assert isinstance(item, _Item)
                items.append(item)
                rows += self._feed(item)
                linger_until = time.monotonic() + self.batch_linger_s
            closed = time.monotonic()
            try:
                self._finish(items)
            except Exception as err:  # a bug on this batch's path: write it the careful way
                log.exception("batch commit failed unexpectedly (%s); isolating its frames", err)
                self._reset_connection()
                self._commit(items)
            self._observe_commit(time.monotonic() - closed)
        if self._conn is not None:
            self._conn.close()

    def _observe_commit(self, seconds: float) -> None:
        hook = self.on_commit
        if hook is not None:
            try:
                hook(seconds)
            except Exception:  # an observer's bug must not stop the writer
                log.exception("on_commit hook failed")

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
                except Exception as err:
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
            except Exception as err:
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
        before its transaction committed.

        A batch refused for any other reason is halved until the frame that fails is alone
        (log2(n) rounds instead of one transaction per frame); a lone frame that still fails
        after ``frame_write_attempts`` becomes one WRITE_FAILED row, and if even that row cannot
        be written the frame is left unacknowledged and the pipeline reports ``failure``.
        """
        batch = self._batch(items)
        backoff = Backoff(0.1, self.retry_max_s)
        failures = 0
        while True:
            try:
                self._connection()
                result = self._writer.write(batch)
                break
            except psycopg.OperationalError as err:
                self.counters.add(db_errors=1)
                delay = backoff.failed()
                log.warning("database unavailable (%s); retrying in %.1fs", err, delay)
            except Exception as err:
                self.counters.add(db_errors=1)
                failures += 1
                log.error("batch write failed (%s: %s)", type(err).__name__, safe_text(err, 300))
                self._reset_if_broken()
                if len(items) > 1:
                    half = len(items) // 2
                    self._commit(items[:half])
                    self._commit(items[half:])
                    return
                if failures == self.frame_write_attempts:
                    batch = self._quarantine_instead(items[0], err)
                elif failures > self.frame_write_attempts:
                    self.failure = (
                        f"cannot write even a quarantine row: {type(err).__name__}: "
                        f"{safe_text(err, 300)}"
                    )
                    log.critical("%s; frame left unacknowledged", self.failure)
                    self._release(items)
                    return
                delay = backoff.failed()
            time.sleep(delay)
        self._acknowledge(items, result)

    def _reset_if_broken(self) -> None:
        conn = self._conn
        if conn is not None and (conn.closed or conn.broken):
            self._reset_connection()
        elif conn is not None:
            try:
                conn.rollback()
            except Exception:
                self._reset_connection()

    def _acknowledge(self, items: list[_Item], result: WriteResult) -> None:
        """Count a committed batch and hand its frames to the ack thread.

        Why a thread of its own: acknowledging is per frame (a PUBACK, a CoAP response), and
        done here it would keep the writer from starting the next COPY; handed over, the server
        inserts the next batch while the acks go out. One thread, FIFO, so acknowledgements keep
        the order frames arrived in (MQTT requires PUBACKs in order).
        """
        self.counters.add(stored=result.inserted, duplicates=result.duplicates, batches=1)
        self.counters.add_quarantined(result.quarantined)
        if result.quarantine_repeats:
            self.counters.add_quarantine_repeats(result.quarantine_repeats)
        self._release(items)
        self._acks.put(items)

    def add_ack_flush(self, flush: Callable[[], None]) -> None:
        """Have ``flush`` called on the ack thread after each batch's ``on_durable`` callbacks.

        Why: a transport can then send a batch's acknowledgements upstream in one go
        (``MqttIngest.flush_acks``: one write of all its PUBACKs) instead of one by one."""
        self._ack_flushes.append(flush)

    def _run_acks(self) -> None:
        while (items := self._acks.get()) is not None:
            self._durable(items)
            for flush in self._ack_flushes:
                try:
                    flush()
                except Exception:  # a transport's flush must not stop the acknowledgements
                    log.exception("acknowledgement flush failed")

    def _durable(self, items: list[_Item]) -> None:
        for it in items:
            p = it.prepared
            outcome = FrameOutcome(
                accepted=len(p),
                quarantined=sum(r.readings for r in p.rejections),
                reasons=[r.reason for r in p.rejections],
            )
            try:
                it.on_durable(outcome)
            except Exception:  # a transport's callback must not stop the acknowledgements
                log.exception("on_durable callback failed")

    def _quarantine_instead(self, item: _Item, error: BaseException) -> Batch:
        """The frame's rows could not be stored: one WRITE_FAILED row keeps all of it instead
        (its raw bytes, or its rows as JSON, and why), so it can be replayed once fixed."""
        p = item.prepared
        readings = len(p) + sum(r.readings for r in p.rejections)
        item.prepared = Prepared(
            rejections=[
                Rejection(
                    WRITE_FAILED,
                    f"{type(error).__name__}: {error}",
                    _device_hint(item.frame),
                    _raw_of(item.frame),
                    readings=max(1, readings),
                )
            ]
        )
        return self._batch([item])


def _raw_of(frame: Frame) -> bytes | None:
    try:
        return frame_raw(frame)
    except Exception:  # a frame too odd to serialise still gets its row, without raw
        return None


def _device_hint(frame: Frame) -> str | None:
    if frame.device_hint:
        return frame.device_hint
    if frame.uplinks and len({u.device for u in frame.uplinks}) == 1:
        return frame.uplinks[0].device
    return None


def _abandon(stream: CopyStream, err: Exception) -> None:
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
        queue_bytes=settings.queue_bytes,
        max_payload_bytes=settings.max_payload_bytes,
        max_readings_per_frame=settings.max_readings_per_frame,
        max_payload_depth=settings.max_payload_depth,
        max_quarantine_rows_per_frame=settings.max_quarantine_rows_per_frame,
        clock_skew_s=settings.clock_skew_s,
        clock_skew_action=settings.clock_skew_action,
        live_window_days=settings.live_window_days,
        registry_poll_s=settings.registry_poll_s,
    )
