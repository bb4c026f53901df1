"""The event log: one JSON object per line (JSON Lines), one line per event.

For machines (a SIEM, jq, a billing job) where the Postfix-style log is for
people.  Every line has ``time`` (RFC 3339, UTC, microseconds) and ``kind``,
and ``queue_id`` whenever the event concerns a queued message::

    {"time":"2024-05-01T10:00:00.123456Z","kind":"reception","queue_id":"...","client_ip":"192.0.2.7",...}

Kinds: ``reception`` (a message queued: the 250), ``refusal`` (a 4xx/5xx
reply: stage, code, dsn, text), ``quota`` (a sending limit refused a
recipient or a message: limit, account, user); from abuse control
(abuse.py), ``abuse_verdict`` (each scanned message) and ``abuse_alert``;
and, once delivery.py emits them, ``delivery``, ``deferral``, ``bounce`` and
``expiry`` (one per recipient outcome / expired message).

``emit`` only appends a tuple to a list: no encoding and no I/O on the SMTP
path.  A task encodes and writes what has gathered every ``FLUSH_INTERVAL``
seconds (sooner past ``FLUSH_EVENTS`` events), with one write, on a worker
thread.  A crash loses at most the last interval; a clean stop writes
everything.  SIGHUP reopens the file (logrotate without copytruncate).

Config keys read: logging.events_file ("" = off).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec

from .config import Config

log = logging.getLogger("fastrelay.events")

FLUSH_INTERVAL = 1.0
FLUSH_EVENTS = 5000

_encoder = msgspec.json.Encoder(enc_hook=str)


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


class EventLog:
    """An append-only JSON Lines file written from a buffer."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.buffer: list[tuple[float, str, dict[str, Any]]] = []
        self.written = 0
        self.dropped = 0            # events lost to write errors
        self._fd = -1
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="events")

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.ensure_future(self._run())

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), FLUSH_INTERVAL)
            except TimeoutError:
                pass
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        if not self.buffer:
            return
        batch, self.buffer = self.buffer, []
        await asyncio.get_running_loop().run_in_executor(self._executor, self._write, batch)

    def _write(self, batch: list[tuple[float, str, dict[str, Any]]]) -> None:
        lines = []
        for t, kind, fields in batch:
            lines.append(_encoder.encode({"time": _rfc3339(t), "kind": kind, **fields}))
        data = b"\n".join(lines) + b"\n"
        try:
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            self.written += len(batch)
        except OSError as exc:
            self.dropped += len(batch)
            log.error("events: %d event(s) not written to %s: %s", len(batch), self.path, exc)

    def reopen(self) -> None:
        """After logrotate moved the file: write to a new one at the same path."""
        self._executor.submit(self._reopen).result()

    def _reopen(self) -> None:
        old = self._fd
        self.open()
        if old >= 0:
            os.close(old)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await self.flush()
        self._executor.shutdown(wait=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


_log: EventLog | None = None
_closing: set[asyncio.Future[None]] = set()


def enabled() -> bool:
    """Whether the event log is on: per-message callers ask first, so that the
    fields of an event are not even gathered when nobody records them."""
    return _log is not None


def emit(kind: str, **fields: Any) -> None:
    """Record one event (cheap: a tuple appended to a list; nothing when the log is off)."""
    event_log = _log
    if event_log is None:
        return
    event_log.buffer.append((time.time(), kind, fields))
    if len(event_log.buffer) >= FLUSH_EVENTS:
        event_log.wake()


def configure(config: Config) -> EventLog | None:
    """Start, reopen, move or stop the event log to match the config (start and SIGHUP).

    Call on the event loop; stopping an old log flushes it in the background."""
    global _log
    path = config.path(config.logging.events_file) if config.logging.events_file else None
    old = _log
    if old is not None and path is not None and old.path == path:
        try:
            old.reopen()
        except OSError as exc:
            log.error("events: cannot reopen %s: %s; still writing to the old file", path, exc)
        return old
    if path is not None:
        new = EventLog(path)
        try:
            new.open()
        except OSError as exc:
            log.error("events: cannot open %s: %s; the event log is off", path, exc)
            path = None
        else:
            new.start()
            _log = new
    if path is None:
        _log = None
    if old is not None and old is not _log:
        task = asyncio.ensure_future(old.close())
        _closing.add(task)
        task.add_done_callback(_closing.discard)
    return _log


async def shutdown() -> None:
    """Write every buffered event and close the file."""
    global _log
    old, _log = _log, None
    if old is not None:
        await old.close()
