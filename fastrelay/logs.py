"""Mail log output: Postfix-style lines, written in batches.

A relay logs several lines per message; a write system call per line (what
logging.StreamHandler does) cost about a third of the accept path in the
benchmarks.  ``BatchedLogHandler`` formats each record at once (so the line
says when it happened) but writes them together: when ``MAX_PENDING``
lines have gathered, when the oldest pending line is ``MAX_DELAY`` old, on
every record of level WARNING or above, and at exit.  A crash can lose at
most the last ``MAX_DELAY`` seconds of INFO lines — never a warning.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from typing import TextIO

MAX_PENDING = 256
MAX_DELAY = 0.2


class BatchedLogHandler(logging.Handler):
    def __init__(self, stream: TextIO, owns_stream: bool = False) -> None:
        super().__init__()
        self.stream = stream
        self.owns_stream = owns_stream
        self._pending: list[str] = []
        self._oldest = 0.0
        self._timer: threading.Timer | None = None
        atexit.register(self.flush)

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
