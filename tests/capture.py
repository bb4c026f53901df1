"""A transport in place of the socket, for driving an SmtpSession in process.

Used by the fuzz harness (tests/test_fuzz.py) and the protocol micro
benchmarks (bench/test_bench_protocol.py, which puts this directory on its
path): the session is the real one, only the bytes it writes are captured.
"""

from __future__ import annotations

from typing import Any


class CaptureTransport:
    """Records writes; pause/resume as a transport does."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False
        self.paused = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "a write after close"
        self.out += data

    def close(self) -> None:
        self.closed = True

    abort = close

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default
