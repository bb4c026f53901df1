"""The durable queue on disk: an append-only segment log with group commit.

Why a log and not a file per message: on these machines one create + write +
fsync costs about 0.5 ms, which caps a file-per-message spool near 2,000
messages/s per thread.  Appending every message of a batch to one segment and
covering the whole batch with a single fdatasync lets concurrent transactions
share the cost, and no 250 goes out before its own record is durable.

Layout under ``spool_dir``::

    segments/00000001.log   records, appended in order; a new segment every
                            ``SEGMENT_BYTES`` and at every start
    incoming/ active/ deferred/ hold/   (none: the state of each message is
                            the last state record written for it, see below)

A record is ``MAGIC | kind | env_len | body_len | crc32 | envelope | body``:
length- and checksum-framed, so a crash mid-write leaves a torn tail that
recovery detects and cuts off.  Kinds:

* ``M`` a message: its msgspec-encoded Envelope and its content (Received:
  header already prepended).
* ``S`` a state change of a message already in the log (delivery progress,
  deferral, hold, done).  The newest state record of a queue id wins.

A segment is deleted once every message in it is done and every older
segment is gone (so no state record about a live message is ever lost).  A
long-deferred (or held) message would so keep its segment and every later
one; the queue manager copies such messages forward: ``M`` again in the
current segment, then its latest state, and only once both are durable does
the old segment stop counting it (``head_segment``, ``moved_out``).  Recovery
takes the newest ``M`` record of a queue id as its location and keeps the
state it had, so a crash between the two leaves the old copy in charge.

The writes and fsyncs happen on one writer thread so the event loop never
blocks on the disk; completion comes back with one ``call_soon_threadsafe``
per batch, even for a lone client: writing its commit on the loop's own
thread instead (no hand-offs) measured 8-33% slower here (docs/benchmarks.md,
twelfth session).
A batch's headers, CRCs, pwritev and fdatasync are one call into the
compiled core (``_core.commit_records``): one release of the GIL per batch,
where Python's calls took it back a dozen times, each time waiting behind
the busy event loop.
Segments are allocated ``PREALLOCATE_BYTES`` ahead of the writes, so a
commit does not also commit a new file size; a finished segment is cut back
to its records.

Config keys read: server.spool_dir.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, NamedTuple

import msgspec

from ._core import commit_records
from .errors import SpoolError

log = logging.getLogger("fastrelay.spool")

MAGIC = b"FRq1"
_HEADER = struct.Struct("<4scxxxIQI")  # magic, kind, pad, env_len, body_len, crc32
HEADER_SIZE = _HEADER.size
SEGMENT_BYTES = 64 * 1024 * 1024
# Space reserved ahead of the write offset (posix_fallocate).  An append that
# grows the file makes fdatasync commit the new size through the filesystem's
# journal; a write into space already allocated does not, which made each
# commit about 30 us (a third) cheaper here.  Databases preallocate their
# logs for the same reason.  Unused reservation is cut when a segment is
# finished, and after a crash recovery cuts the zeros silently.
PREALLOCATE_BYTES = 4 * 1024 * 1024
KIND_MESSAGE = b"M"
KIND_STATE = b"S"
# A "done" record nobody waits for is not worth an fdatasync of its own: it
# rides with the next commit, or is flushed after this many seconds.  Losing
# it in a crash only means the message is delivered once more (the
# at-least-once window, docs/reliability.md); a lone client with delivery on
# paid a second fdatasync per message for it, in series with its own.
DONE_FLUSH_DELAY = 0.05


class MessageState(enum.StrEnum):
    INCOMING = "incoming"   # accepted, not yet handed to scanning/delivery
    ACTIVE = "active"       # being delivered now (in memory only; on disk it is incoming/deferred)
    DEFERRED = "deferred"   # waiting for its next attempt
    HOLD = "hold"           # held by an admin or by the content scanner
    DONE = "done"           # every recipient sent or bounced: may be dropped


class Envelope(msgspec.Struct, array_like=True, omit_defaults=True):
    """What the SMTP transaction established about a message."""

    queue_id: str
    arrival: float                  # wall-clock time of the 250
    client_ip: str
    client_helo: str
    sender: str                     # after any rewriting; "" is the null sender
    recipients: list[str]
    auth_user: str | None = None
    original_sender: str | None = None  # before "any address" rewriting
    tls: str | None = None          # e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384"
    account: str | None = None
    rule: str | None = None
    smtputf8: bool = False
    body_8bit: bool = False
    # Some line of the body starts with "." (needs dot-stuffing again for
    # DATA).  Unknown, so True, for records written before this field and for
    # mail the relay makes itself.
    dot_lines: bool = True


class DeliveryState(msgspec.Struct, array_like=True, omit_defaults=True):
    """Where a message stands in its delivery; written as an ``S`` record."""

    queue_id: str
    state: MessageState
    attempts: int = 0
    next_attempt: float = 0.0        # wall-clock time
    done_recipients: list[int] = msgspec.field(default_factory=list)  # indexes: sent or bounced
    last_error: str = ""
    warned: bool = False             # the sender got the delay warning


_env_encoder = msgspec.msgpack.Encoder()
_env_decoder = msgspec.msgpack.Decoder(Envelope)
_state_decoder = msgspec.msgpack.Decoder(DeliveryState)


class QueuedMessage(msgspec.Struct):
    """A live message as recovery and the queue manager see it."""

    envelope: Envelope
    state: DeliveryState
    segment: int                     # segment number holding the body
    body_offset: int                 # file offset of the body
    body_len: int


def _segment_name(number: int) -> str:
    return f"{number:08d}.log"


def read_records(path: Path) -> Iterator[tuple[bytes, bytes, int, int, int]]:
    """Yield (kind, envelope bytes, body offset, body length, record end) for each intact record.

    A crash can only tear the tail (appends are sequential and a batch is
    acknowledged after its fsync), but a disk can also damage a record in the
    middle.  So a bad record is skipped by searching for the next magic whose
    record checks out (length and CRC), and only what follows the last intact
    record is a torn tail: acknowledged records after damage are never lost.
    """
    # Read, not mapped: a running relay cuts the unused end of a segment it
    # finishes, and a mapping's pages past the new end would fault (SIGBUS)
    # in a scan beside it (`fastrelay queue list`).
    with open(path, "rb") as f:
        data = f.read()
    size = len(data)
    offset = 0
    while offset + HEADER_SIZE <= size:
        record = _record_at(data, offset, size)
        if record is None:
            resync = data.find(MAGIC, offset + 1)
            while resync >= 0 and _record_at(data, resync, size) is None:
                resync = data.find(MAGIC, resync + 1)
            if resync < 0:
                return  # a torn tail, or the unused reservation: nothing intact follows
            log.error("spool: segment %s: skipped %d damaged bytes at offset %d",
                      path.name, resync - offset, offset)
            offset = resync
            continue
        kind, env, body_offset, body_len = record
        end = body_offset + body_len
        yield kind, env, body_offset, body_len, end
        offset = end


def _zeros_from(f: BinaryIO, offset: int) -> bool:
    """Whether the file holds only zero bytes from ``offset`` on (a preallocated, unused end)."""
    f.seek(offset)
    while chunk := f.read(1 << 20):
        if chunk.count(0) != len(chunk):
            return False
    return True


def _record_at(data: bytes, offset: int, size: int) -> tuple[bytes, bytes, int, int] | None:
    if offset + HEADER_SIZE > size:
        return None
    magic, kind, env_len, body_len, crc = _HEADER.unpack_from(data, offset)
    if magic != MAGIC or kind not in (KIND_MESSAGE, KIND_STATE):
        return None
    body_offset = offset + HEADER_SIZE + env_len
    if body_offset + body_len > size:
        return None
    env = data[offset + HEADER_SIZE:body_offset]
    with memoryview(data) as view:
        check = zlib.crc32(view[body_offset:body_offset + body_len], zlib.crc32(env))
    if check != crc:
        return None
    return kind, env, body_offset, body_len


class Location(NamedTuple):
    """Where a message's body lies on disk."""

    segment: int
    body_offset: int
    body_len: int


class _Batch:
    __slots__ = ("barriers", "frames", "futures", "offset", "records", "segment", "urgent")

    def __init__(self) -> None:
        self.frames: list[tuple[bytes, bytes, Sequence[bytes | bytearray | memoryview]]] = []
        self.futures: list[asyncio.Future[Location | None] | None] = []   # None: nobody waits
        # per record, in order: (queue id of a message record or None, env_len, body_len)
        self.records: list[tuple[str | None, int, int]] = []
        self.segment = 0  # set by the writer: where the batch landed
        self.offset = 0   # and at which offset it starts
        self.urgent = False  # holds a record that may not wait (see DONE_FLUSH_DELAY): write it now
        # Spool.sync() waiters, each with the spool's failed-write count when it
        # called: resolved once this batch, and so all before it, is on disk
        self.barriers: list[tuple[asyncio.Future[None], int]] = []

    def __bool__(self) -> bool:
        """Has the writer anything to do with this batch?"""
        return bool(self.futures) or bool(self.barriers)


class Spool:
    """Append-only segment log; the only place messages are made durable."""

    def __init__(self, directory: Path | str, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.directory = Path(directory)
        self.segments_dir = self.directory / "segments"
        self.segment_bytes = segment_bytes
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._pending = _Batch()
        self._closing = False
        self._done_flush: asyncio.TimerHandle | None = None  # flushes deferred "done" records
        self._thread: threading.Thread | None = None
        self._fd = -1
        self._segment = 0
        self._offset = 0
        self._reserved = 0           # the current segment's size: written and preallocated bytes
        self._preallocate = PREALLOCATE_BYTES > 0
        # live message count per segment, to know when a segment can go
        self._live: dict[int, int] = {}
        # The newest segment with records the loop has counted (_on_written).
        # The writer may already have moved past it, with a batch of the older
        # segment written but not yet counted: only segments older than this
        # one are known whole, and may be dropped once their live count is 0.
        self._counted_segment = 0
        self._where: dict[str, int] = {}
        # when each segment before the current one stopped taking records
        self._closed_at: dict[int, float] = {}
        self.failed: OSError | None = None
        self._failed_writes = 0   # batches whose write failed, and the last error: for sync()
        self._last_write_error: OSError | None = None
        # Bodies just written, kept for the stages that read them right back
        # (scanning, then the first delivery attempt): reading each one from
        # the segment again cost more CPU than delivering it.  Off (0) unless
        # someone will release them; bounded in bytes, so a backlog falls
        # back to reading the disk.
        self.recent_budget = 0
        # A body is kept as the parts it was written from, and joined when
        # first read: on the loop, before the client's 250, a large message's
        # join was a copy its client waited for.
        self._recent: dict[tuple[int, int], bytes | Sequence[bytes | bytearray | memoryview]] = {}
        # read_body joins in a thread while the loop may release the same body:
        # the join is stored only if the entry is still there, under this lock.
        self._recent_lock = threading.Lock()
        self._recent_bytes = 0

    # -- opening and recovery -------------------------------------------------

    def scan(self) -> list[QueuedMessage]:
        """Read-only: the live messages as they are on disk (for the admin CLI)."""
        if not self.segments_dir.is_dir():
            return []
        live, _ = self._scan(repair=False)
        return live

    def recover(self) -> list[QueuedMessage]:
        """Read every segment, cut torn tails, and return the messages that are not done."""
        self.segments_dir.mkdir(parents=True, exist_ok=True)
        live, last = self._scan(repair=True)
        self._live = {}
        for m in live:
            self._live[m.segment] = self._live.get(m.segment, 0) + 1
            self._where[m.envelope.queue_id] = m.segment
        self._segment = last
        now = time.time()
        self._closed_at = {number: now for number in self._live}
        # Every start writes to a fresh segment, so a torn tail is never appended to.
        self._open_segment(last + 1)
        self._counted_segment = self._segment   # nothing written since: every older segment is whole
        self._drop_dead_segments()
        return live

    def _scan(self, repair: bool) -> tuple[list[QueuedMessage], int]:
        messages: dict[str, QueuedMessage] = {}
        last = 0
        for path in sorted(self.segments_dir.glob("*.log")):
            try:
                number = int(path.stem)
            except ValueError:
                continue
            last = max(last, number)
            good_end = 0
            try:
                for kind, env, body_offset, body_len, end in read_records(path):
                    good_end = end
                    if kind == KIND_MESSAGE:
                        envelope = _env_decoder.decode(env)
                        old = messages.get(envelope.queue_id)
                        state = old.state if old else DeliveryState(envelope.queue_id, MessageState.INCOMING)
                        messages[envelope.queue_id] = QueuedMessage(envelope, state, number, body_offset,
                                                                    body_len)
                    else:
                        state = _state_decoder.decode(env)
                        msg = messages.get(state.queue_id)
                        if msg is not None:
                            msg.state = state
            except FileNotFoundError:
                if repair:
                    raise
                # scan() beside a running relay: the relay deleted the segment between the
                # listing and the open, so each message in it was done or copied forward
                # into a later segment, which this scan reads next.
                continue
            if not repair:
                continue
            size = path.stat().st_size
            if good_end < size:
                with open(path, "r+b") as f:
                    if _zeros_from(f, good_end):
                        log.debug("spool: segment %s: cut %d bytes of unused reservation",
                                  path.name, size - good_end)
                    else:
                        log.warning("spool: segment %s: cut %d bytes of torn tail at offset %d",
                                    path.name, size - good_end, good_end)
                    f.truncate(good_end)
                    os.fsync(f.fileno())
        live = [m for m in messages.values() if m.state.state != MessageState.DONE]
        live.sort(key=lambda m: m.envelope.arrival)
        return live, last

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the writer thread; call after recover()."""
        self._loop = loop
        if self._fd < 0:
            self.segments_dir.mkdir(parents=True, exist_ok=True)
            self._open_segment(self._segment + 1)
        self._counted_segment = self._segment
        self._thread = threading.Thread(target=self._writer, name="spool-writer", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._done_flush is not None:
            self._done_flush.cancel()   # the writer writes everything pending as it stops
            self._done_flush = None
        with self._lock:
            self._closing = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._fd >= 0:
            self._cut_reservation()
            os.close(self._fd)
            self._fd = -1

    # -- appending (event loop side) -----------------------------------------

    def append_message(self, envelope: Envelope,
                       body: Sequence[bytes | bytearray | memoryview]) -> asyncio.Future[Location | None]:
        """Queue a message record; the future resolves to its Location once fsynced."""
        env = _env_encoder.encode(envelope)
        fut = self._new_future()
        self._append(KIND_MESSAGE, env, body, (envelope.queue_id, len(env), sum(map(len, body))), fut)
        return fut

    def _keep_recent(self, location: Location, body: Sequence[bytes | bytearray | memoryview]) -> None:
        if self._recent_bytes + location.body_len > self.recent_budget:
            return
        with self._recent_lock:
            self._recent[(location.segment, location.body_offset)] = body
        self._recent_bytes += location.body_len

    def release_body(self, location: Location) -> None:
        """The in-memory copy of this body (if any) is no longer needed."""
        with self._recent_lock:
            released = self._recent.pop((location.segment, location.body_offset), None)
        if released is not None:
            self._recent_bytes -= location.body_len

    def recent_body(self, location: Location | QueuedMessage) -> bytes | None:
        key = (location.segment, location.body_offset)
        body = self._recent.get(key)
        if body is None or isinstance(body, bytes):
            return body
        joined = b"".join(body)
        with self._recent_lock:
            if self._recent.get(key) is body:   # not released meanwhile (by the loop)
                self._recent[key] = joined
        return joined

    def append_state(self, state: DeliveryState) -> asyncio.Future[Location | None]:
        """Queue a state record; the future resolves (to None) once fsynced."""
        fut = self._new_future()
        self._append_state(state, fut)
        return fut

    def post_state(self, state: DeliveryState, deferrable: bool = False) -> None:
        """Queue a state record that nobody waits for (a failed write is logged here).

        The queue manager writes one or two per message and never waits:
        a future and its callback each time cost more than the record.
        ``deferrable``: losing the record in a crash only repeats a delivery
        (a "done" after the last recipient's outcome), so it need not be
        committed on its own; see DONE_FLUSH_DELAY."""
        self._append_state(state, None, deferrable)

    def _append_state(self, state: DeliveryState, fut: asyncio.Future[Location | None] | None,
                      deferrable: bool = False) -> None:
        if state.state == MessageState.DONE:
            self._forget(state.queue_id)
        env = _env_encoder.encode(state)
        self._append(KIND_STATE, env, (), (None, len(env), 0), fut, deferrable=deferrable)

    def _new_future(self) -> asyncio.Future[Location | None]:
        assert self._loop is not None, "Spool.start() not called"
        return self._loop.create_future()

    def _append(self, kind: bytes, env: bytes, body: Sequence[bytes | bytearray | memoryview],
                record: tuple[str | None, int, int], fut: asyncio.Future[Location | None] | None,
                deferrable: bool = False) -> None:
        with self._lock:
            batch = self._pending
            # The CRC and header are made on the writer thread, in
            # commit_records: the loop only hands over.
            batch.frames.append((kind, env, body))
            batch.futures.append(fut)
            batch.records.append(record)
            if deferrable:
                if not batch.urgent and self._done_flush is None:
                    assert self._loop is not None
                    self._done_flush = self._loop.call_later(DONE_FLUSH_DELAY, self._flush_deferred)
                return
            if not batch.urgent:  # the writer may be waiting for work
                batch.urgent = True
                self._wakeup.notify()

    def sync(self) -> asyncio.Future[None]:
        """Resolves once every record appended before this call is on disk.

        For the rare caller that must answer only when a record it posted
        without waiting (post_state) is durable: an administrator's hold or
        delete.  Batches are written in order, so the barrier rides the
        pending batch, or an empty one right behind the batch being written."""
        assert self._loop is not None, "Spool.start() not called"
        fut: asyncio.Future[None] = self._loop.create_future()
        with self._lock:
            if self._thread is None:   # closed: close() wrote everything
                fut.set_result(None)
                return fut
            batch = self._pending
            batch.barriers.append((fut, self._failed_writes))
            if not batch.urgent:
                batch.urgent = True
                self._wakeup.notify()
        return fut

    def _flush_deferred(self) -> None:
        self._done_flush = None
        with self._lock:
            if self._pending.futures and not self._pending.urgent:
                self._pending.urgent = True
                self._wakeup.notify()

    def _forget(self, queue_id: str) -> None:
        segment = self._where.pop(queue_id, None)
        if segment is not None:
            self.moved_out(segment)

    def _on_written(self, batch: _Batch, error: OSError | None) -> None:
        """Runs on the event loop: bookkeeping first, then wake the waiters."""
        if error is not None:
            self._failed_writes += 1
            self._last_write_error = error
            for barrier, _ in batch.barriers:
                if not barrier.done():
                    barrier.set_exception(SpoolError(str(error)))
            unwatched = 0
            for fut in batch.futures:
                if fut is None:
                    unwatched += 1
                elif not fut.done():
                    fut.set_exception(SpoolError(str(error)))
            if unwatched:
                log.error("spool: %d state record(s) not written: %s", unwatched, error)
            return
        seg, offset, messages = batch.segment, batch.offset, 0
        keep = self.recent_budget > 0
        for fut, (qid, env_len, body_len), (_, _, body) in zip(batch.futures, batch.records, batch.frames):
            location = None
            if qid is not None:
                # Nothing acts on a message before its future resolves here,
                # so it cannot have been forgotten already.
                self._where[qid] = seg
                messages += 1
                location = Location(seg, offset + HEADER_SIZE + env_len, body_len)
                if keep:
                    self._keep_recent(location, body)
            offset += HEADER_SIZE + env_len + body_len
            if fut is not None and not fut.done():
                fut.set_result(location)
        if messages:
            self._live[seg] = self._live.get(seg, 0) + messages
        if seg > self._counted_segment:
            # Every batch of the older segments has been counted (the writer's
            # callbacks run in order): those whose messages are all done can go.
            self._counted_segment = seg
            self._drop_dead_segments()
        for barrier, failed_before in batch.barriers:
            if barrier.done():
                continue
            if self._failed_writes != failed_before:   # a batch before this one was lost
                barrier.set_exception(SpoolError(f"a spool write failed: {self._last_write_error}"))
            else:
                barrier.set_result(None)

    # -- the writer thread ---------------------------------------------------

    def _writer(self) -> None:
        while True:
            with self._lock:
                while not self._pending.urgent and not self._closing:
                    self._wakeup.wait()
                if not self._pending and self._closing:
                    return
                batch, self._pending = self._pending, _Batch()
            error = self._write_batch(batch)
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(self._on_written, batch, error)
            except RuntimeError:  # loop closed during shutdown
                return

    def _write_batch(self, batch: _Batch) -> OSError | None:
        if not batch.frames:   # only sync() barriers: the batches before it were fsynced
            return None
        start = self._offset
        try:
            if self._offset >= self.segment_bytes:
                self._open_segment(self._segment + 1)
                start = 0
            size = sum(HEADER_SIZE + len(env) + sum(map(len, body)) for _, env, body in batch.frames)
            self._reserve(start + size)
            self._offset = start + commit_records(self._fd, start, MAGIC, batch.frames)
        except OSError as exc:
            # Cut what was partly written so the segment stays a clean log;
            # nothing of this batch was acknowledged.
            try:
                os.ftruncate(self._fd, start)
                self._reserved = start
            except OSError:
                pass
            self._offset = start
            # One line whatever the errno (EACCES after a chown, EFBIG, ...): the error says
            # what the operator must fix, and a traceback of this function would add nothing.
            log.error("spool: cannot write: %s", exc)
            self.failed = exc
            return exc
        self.failed = None
        batch.segment = self._segment
        batch.offset = start
        return None

    def _reserve(self, end: int) -> None:
        """Make sure the segment's space up to ``end`` is allocated (see PREALLOCATE_BYTES)."""
        if end <= self._reserved or not self._preallocate:
            return
        size = max(PREALLOCATE_BYTES, end - self._reserved)
        try:
            os.posix_fallocate(self._fd, self._reserved, size)
        except OSError as exc:
            # No room for the reservation (the write itself may still fit), or a
            # filesystem without it: the write grows the file as an append would.
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                log.info("spool: no preallocation on this filesystem (%s)", exc)
                self._preallocate = False
            return
        self._reserved += size

    def _cut_reservation(self) -> None:
        """A finished segment keeps only what was written."""
        if self._reserved > self._offset:
            try:
                os.ftruncate(self._fd, self._offset)
            except OSError as exc:  # recovery cuts the zeros after a restart
                log.warning("spool: cannot cut the unused end of segment %d: %s", self._segment, exc)
            else:
                self._reserved = self._offset

    def _open_segment(self, number: int) -> None:
        if self._fd >= 0:
            self._cut_reservation()
            os.close(self._fd)
            self._closed_at[self._segment] = time.time()
        path = self.segments_dir / _segment_name(number)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        self._segment = number
        self._offset = self._reserved = os.fstat(self._fd).st_size
        # The new name must be durable before anything in it is acknowledged.
        dir_fd = os.open(self.segments_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _drop_dead_segments(self) -> None:
        """Delete the oldest segments whose messages are all done."""
        for path in sorted(self.segments_dir.glob("*.log")):
            try:
                number = int(path.stem)
            except ValueError:
                continue
            if number >= self._counted_segment or self._live.get(number, 0) > 0:
                break
            self._live.pop(number, None)
            self._closed_at.pop(number, None)
            path.unlink(missing_ok=True)

    # -- copying forward (the queue manager decides what) ----------------------

    def head_segment(self, min_age: float) -> int | None:
        """The oldest segment, when live messages keep it (and every later one)
        on disk and it stopped taking records at least ``min_age`` seconds ago."""
        if not self._live:
            return None
        head = min(self._live)
        if head >= self._counted_segment or self._live[head] <= 0:
            return None
        closed = self._closed_at.get(head)
        return head if closed is not None and time.time() - closed >= min_age else None

    def moved_out(self, segment: int) -> None:
        """A live message of ``segment`` no longer keeps it: it is done, or durable
        again further on (its message record and its latest state)."""
        if segment in self._live:
            self._live[segment] -= 1
            if self._live[segment] <= 0 and segment < self._counted_segment:
                self._drop_dead_segments()

    # -- reading ---------------------------------------------------------------

    def segment_path(self, number: int) -> Path:
        return self.segments_dir / _segment_name(number)

    def read_body(self, location: QueuedMessage | Location) -> bytes:
        """Blocking read of a body (run it in a thread for large messages)."""
        recent = self.recent_body(location)
        if recent is not None:
            return recent
        with open(self.segment_path(location.segment), "rb") as f:
            f.seek(location.body_offset)
            return f.read(location.body_len)


class QueueIdGenerator:
    """Postfix-style queue ids: upper-case hex, time-ordered, unique across restarts.

    Microseconds since the epoch, bumped to stay strictly increasing; one
    f-string format, since an id is made for every message.
    """

    ALPHABET = "0123456789ABCDEF"

    def __init__(self, floor: int = 0) -> None:
        self._last = floor

    def next(self) -> str:
        now = time.time_ns() // 1000
        self._last = now if now > self._last else self._last + 1
        return f"{self._last:X}"
