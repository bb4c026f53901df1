"""The Python peer for bench/e2e.py: aiosmtpd on uvloop, storing each message durably.

The handler writes every message to its own file, fsyncs it, renames it into
place and fsyncs the directory (as Maildir writers do) before answering 250.  The
blocking writes run in the loop's default thread pool, so concurrent
transactions can overlap their fsyncs; nothing is batched on purpose: this is
the straightforward way to write a durable aiosmtpd handler.

Run: python bench/aiosmtpd_peer.py --listen 127.0.0.1:PORT --dir DIR
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
from typing import Any

import uvloop
from aiosmtpd.smtp import SMTP, Envelope, Session


class FsyncHandler:
    def __init__(self, directory: str) -> None:
        self.tmp = os.path.join(directory, "tmp")
        self.new = os.path.join(directory, "new")
        os.makedirs(self.tmp, exist_ok=True)
        os.makedirs(self.new, exist_ok=True)
        self.dir_fd = os.open(self.new, os.O_RDONLY)
        self.ids = itertools.count(1)

    def _store(self, name: str, data: bytes) -> None:
        tmp = os.path.join(self.tmp, name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, os.path.join(self.new, name))
        os.fsync(self.dir_fd)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        name = f"{os.getpid()}.{next(self.ids)}"
        content = envelope.original_content or b""
        header = (f"X-Envelope: {envelope.mail_from} -> {','.join(envelope.rcpt_tos)}\r\n").encode()
        await asyncio.get_running_loop().run_in_executor(None, self._store, name, header + content)
        return f"250 2.0.0 Ok: queued as {name}"


async def main(host: str, port: int, directory: str) -> None:
    loop = asyncio.get_running_loop()
    handler = FsyncHandler(directory)

    def factory() -> Any:
        # hostname given: aiosmtpd would otherwise call socket.getfqdn() (a DNS query).
        return SMTP(handler, hostname="aiosmtpd.bench.test", ident="aiosmtpd bench peer")

    server = await loop.create_server(factory, host, port, reuse_address=True, backlog=4096)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True, help="HOST:PORT (loopback)")
    ap.add_argument("--dir", required=True, help="where messages go (tmp/ then new/)")
    a = ap.parse_args()
    h, _, p = a.listen.rpartition(":")
    uvloop.run(main(h, int(p), a.dir))
