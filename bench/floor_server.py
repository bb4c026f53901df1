"""A calibration floor, NOT a product path: the least an SMTP server can do durably.

The smallest uvloop Protocol that speaks just enough SMTP for Postfix's
``smtp-source`` (banner, HELO/EHLO, MAIL, RCPT, DATA, RSET, NOOP, QUIT), checks
nothing, and appends each message to one log file, covered by a group-commit
``fdatasync`` on a writer thread, before its 250.  It answers the question
"what does durable accept cost on this machine, in Python on uvloop, with no
policy, no quota, no parsing, no logging?"  fastrelay / floor is then the price
of everything fastrelay does on top.

It does not parse addresses, validate anything, dot-unstuff, frame records,
or survive a crash with a clean log: do not reuse it as a server.

Run: python bench/floor_server.py --listen 127.0.0.1:PORT --log FILE [--stats FILE]
On SIGTERM it writes "messages N" to --stats and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import threading
from typing import Any

import uvloop

BANNER = b"220 floor.bench.test ESMTP calibration floor\r\n"
EHLO = b"250-floor.bench.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
OK = b"250 2.0.0 Ok\r\n"
START = b"354 End data with <CR><LF>.<CR><LF>\r\n"
QUEUED = b"250 2.0.0 Ok: queued\r\n"
BYE = b"221 2.0.0 Bye\r\n"
WHAT = b"502 5.5.2 Error: command not recognized\r\n"


class GroupLog:
    """Append-only file; one fdatasync covers every message queued since the last one."""

    def __init__(self, path: str, loop: asyncio.AbstractEventLoop) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.loop = loop
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.parts: list[bytes] = []
        self.waiters: list[asyncio.Future[None]] = []
        self.messages = 0
        self.thread = threading.Thread(target=self._run, name="floor-writer", daemon=True)
        self.thread.start()

    def append(self, data: bytes) -> asyncio.Future[None]:
        fut = self.loop.create_future()
        with self.lock:
            self.parts.append(data)
            self.waiters.append(fut)
            self.wake.notify()
        return fut

    def _run(self) -> None:
        while True:
            with self.lock:
                while not self.waiters:
                    self.wake.wait()
                parts, self.parts = self.parts, []
                waiters, self.waiters = self.waiters, []
            for i in range(0, len(parts), 1024):  # IOV_MAX
                chunk = parts[i:i + 1024]
                n = os.writev(self.fd, chunk)
                if n == sum(len(p) for p in chunk):
                    continue
                rest = memoryview(b"".join(chunk))[n:]
                while rest:  # a short write: finish it plainly
                    rest = rest[os.write(self.fd, rest):]
            os.fdatasync(self.fd)
            self.loop.call_soon_threadsafe(self._done, waiters)

    def _done(self, waiters: list[asyncio.Future[None]]) -> None:
        self.messages += len(waiters)
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)


class FloorSession(asyncio.Protocol):
    def __init__(self, log: GroupLog) -> None:
        self.log = log
        # A bytearray: appends are amortised O(1) and deleting from the front is cheap,
        # so a 10 MiB message costs no quadratic copying.
        self.buf = bytearray()
        self.scan = 0              # in DATA: where to resume looking for the terminator
        self.in_data = False
        self.busy = False
        self.transport: Any = None  # uvloop's TCPTransport is not an asyncio.Transport subclass

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(BANNER)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._drain()

    def _drain(self) -> None:
        assert self.transport is not None
        out: list[bytes] = []
        buf = self.buf
        while not self.busy:
            if self.in_data:
                end = buf.find(b"\r\n.\r\n", self.scan)
                if end < 0:
                    self.scan = max(0, len(buf) - 4)
                    break
                message = bytes(buf[:end + 2])
                del buf[:end + 5]
                self.in_data = False
                self.busy = True
                self.log.append(message).add_done_callback(self._stored)
                break
            nl = buf.find(b"\r\n")
            if nl < 0:
                break
            verb = bytes(buf[:4]).upper()
            del buf[:nl + 2]
            if verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP", b"HELO"):
                out.append(OK)
            elif verb == b"EHLO":
                out.append(EHLO)
            elif verb == b"DATA":
                out.append(START)
                self.in_data = True
                # The client waits for 354, so the content starts after a fresh CRLF.
                buf[0:0] = b"\r\n"
                self.scan = 0
            elif verb == b"QUIT":
                out.append(BYE)
                self.transport.write(b"".join(out))
                self.transport.close()
                return
            else:
                out.append(WHAT)
        if out:
            self.transport.write(b"".join(out))

    def _stored(self, fut: asyncio.Future[None]) -> None:
        self.busy = False
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(QUEUED)
        if self.buf:
            self._drain()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def main(host: str, port: int, log_path: str) -> int:
    """Serve until SIGTERM; return how many messages were made durable."""
    loop = asyncio.get_running_loop()
    log = GroupLog(log_path, loop)
    server = await loop.create_server(lambda: FloorSession(log), host, port, reuse_address=True, backlog=4096)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    server.close()
    return log.messages


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True, help="HOST:PORT (loopback)")
    ap.add_argument("--log", required=True, help="the append-only message log")
    ap.add_argument("--stats", help="write 'messages N' here on exit")
    a = ap.parse_args()
    h, _, p = a.listen.rpartition(":")
    stored = uvloop.run(main(h, int(p), a.log))
    if a.stats:
        with open(a.stats, "w") as f:
            f.write(f"messages {stored}\n")
