"""Mail log output: Postfix-style lines, written in batches.

A relay logs several lines per message; a write system call per line (what
logging.StreamHandler does) cost about a third of the accept path in the
benchmarks.  ``BatchedLogHandler`` formats each record at once (so the line
says when it happened) but writes them together: when ``MAX_PENDING``
lines have gathered, when the oldest pending line is ``MAX_DELAY`` old, on
every record of level WARNING or above, and at exit.  A crash can lose at
most the last ``MAX_DELAY`` seconds of INFO lines — never a warning.

``MailLog`` is what the SMTP server, the queue manager and the scanners log
through: about ten INFO lines per relayed message went through
``logging.Logger.info`` (a LogRecord, a caller lookup, a Formatter) at a
cost of a quarter of the relay's CPU in the delivery benchmark.  Its
``info`` formats the line itself and hands it to the batched handler, with
the same text the Formatter makes; every other level, and any setup without
a ``BatchedLogHandler`` (tests, embedding), goes through ``logging``.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from typing import TextIO

MAX_PENDING = 256
MAX_DELAY = 0.2

LINE_FORMAT = "%(asctime)s fastrelay[%(process)d]: %(message)s"
DATE_FORMAT = "%b %d %H:%M:%S"

# The handler that MailLog.info writes to directly (set by install()).
_direct: BatchedLogHandler | None = None


def printable(text: str, placeholder: str) -> str:
    """``text`` with each character that is not printable (control characters, line
    ends, bidi overrides) replaced: text from clients and next hops goes into the
    log, bounces and administrators' terminals."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else placeholder for c in text)


def install(logger: logging.Logger, handler: BatchedLogHandler) -> None:
    """Make ``handler`` the only output of ``logger`` (and of MailLog's fast path)."""
    global _direct
    handler.setFormatter(logging.Formatter(LINE_FORMAT, DATE_FORMAT))
    logger.addHandler(handler)
    _direct = handler


def uninstall(handler: logging.Handler) -> None:
    global _direct
    if _direct is handler:
        _direct = None


class MailLog:
    """A logger whose INFO lines skip the logging module's per-record work."""

    __slots__ = ("debug", "error", "exception", "logger", "warning")

    def __init__(self, name: str) -> None:
        self.logger = logging.getLogger(name)
        self.debug = self.logger.debug
        self.warning = self.logger.warning
        self.error = self.logger.error
        self.exception = self.logger.exception

    def info(self, msg: str, *args: object) -> None:
        handler = _direct
        if handler is None:
            self.logger.info(msg, *args)
        elif self.logger.isEnabledFor(logging.INFO):
            handler.emit_line(msg % args if args else msg)

    def isEnabledFor(self, level: int) -> bool:
        return self.logger.isEnabledFor(level)


class BatchedLogHandler(logging.Handler):
    def __init__(self, stream: TextIO, owns_stream: bool = False) -> None:
        super().__init__()
        self.stream = stream
        self.owns_stream = owns_stream
        self._pending: list[str] = []
        self._oldest = 0.0
        self._timer: threading.Timer | None = None
        self._second = -1
        self._prefix = ""
        atexit.register(self.flush)

    def emit_line(self, message: str) -> None:
        """An INFO line from MailLog: formatted here, as LINE_FORMAT would."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = f"{time.strftime(DATE_FORMAT, time.localtime(second))} fastrelay[{os.getpid()}]: "
        with self.lock if self.lock is not None else _NO_LOCK:
            pending = self._pending
            if not pending:
                self._oldest = time.monotonic()
                self._arm()
            pending.append(self._prefix + message)
            if len(pending) >= MAX_PENDING or time.monotonic() - self._oldest >= MAX_DELAY:
                self.flush()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        pending = self._pending
        if not pending:
            self._oldest = time.monotonic()
            self._arm()
        pending.append(line)
        if (record.levelno >= logging.WARNING or len(pending) >= MAX_PENDING
                or time.monotonic() - self._oldest >= MAX_DELAY):
            self.flush()

    def _arm(self) -> None:
        # A timer thread flushes a quiet tail; it only runs when lines wait.
        if self._timer is None:
            self._timer = threading.Timer(MAX_DELAY, self._timed_flush)
            self._timer.daemon = True
            self._timer.start()

    def _timed_flush(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        with self.lock if self.lock is not None else _NO_LOCK:
            if not self._pending:
                return
            lines, self._pending = self._pending, []
            try:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        self.flush()
        if self._timer is not None:
            self._timer.cancel()
        if self.owns_stream:
            self.stream.close()
        super().close()


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_LOCK = _NoLock()
