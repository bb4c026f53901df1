"""A next hop that misbehaves on purpose: a small raw SMTP server on asyncio, in its own thread.

aiosmtpd (tests/sink.py) answers like a well-behaved server; the faults here
need control over the bytes and the connection itself: a 421 greeting, a 421
and a close in the middle of a session, a connection dropped during DATA or
right after the final dot, no answer at all.  Faults are taken from a list,
one per connection in the order connections arrive (``"ok"`` once the list is
empty).  Every complete message (its final dot seen) is recorded, with
whether this hop answered it with 250: a message received whole but never
acknowledged is the RFC 1047 window, where a retry duplicates it.

Faults:

* ``greet421``: ``421`` instead of the greeting, then close.
* ``stall_greeting``: accept and say nothing.
* ``mail421``: ``421 4.3.2`` to MAIL, then close (a server going down mid-session).
* ``rset421``: the first transaction goes through; ``421`` to the RSET that
  starts the next one on this connection, then close.
* ``drop_in_data``: close after some bytes of the content, before the dot.
* ``data451``: ``451`` to the final dot (a temporary refusal, connection kept).
* ``data250``: ``250`` instead of ``354`` to DATA, then whatever comes is read as
  commands (a server out of step; taken as "sent", the message would be lost).

The faults in DATA apply to the first transaction of their connection.
* ``drop_at_dot``: read the whole message and its dot, close without a reply.
* ``stall_at_dot``: read the whole message and its dot, never answer.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass

FAULTS = ("greet421", "stall_greeting", "mail421", "rset421", "drop_in_data", "data451", "data250",
          "drop_at_dot", "stall_at_dot")
# Faults after which the hop holds the whole message without having said 250.
AFTER_THE_DOT = ("drop_at_dot", "stall_at_dot")


@dataclass
class Reception:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes        # dot-stuffing removed
    acked: bool           # this hop answered 250 to the final dot
    fault: str            # the fault of the connection it came on


class ScriptedHop:
    def __init__(self, faults: list[str] | tuple[str, ...] = (), messages_per_connection: int = 0,
                 ehlo: bytes = b"250-hop.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 10485760\r\n",
                 refuse: tuple[str, bytes] = ("", b"")) -> None:
        self.ehlo = ehlo
        # RCPT of an address containing refuse[0] is answered refuse[1] (a whole reply line).
        self.refuse = refuse
        for fault in faults:
            assert fault in FAULTS or fault == "ok", fault
        # The port stays bound from here on, so nothing started meanwhile (the relay's
        # own listeners) can take it; until start() it does not listen, and a connection
        # to it is refused.
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]
        self.faults = deque(faults)
        # After this many transactions a connection is closed at the next RSET or MAIL
        # (421), as servers that limit messages per connection do; 0 = no limit.
        self.messages_per_connection = messages_per_connection
        self.faults_used: list[str] = []
        self.receptions: list[Reception] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="scripted-hop", daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    # -- control (test thread) ------------------------------------------------------

    def start(self) -> ScriptedHop:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            self._socket.close()
            self._loop.close()
            return
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def acked(self) -> list[Reception]:
        with self._lock:
            return [r for r in self.receptions if r.acked]

    def wait_acked(self, count: int, timeout: float = 20.0) -> list[Reception]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.acked()
            if len(got) >= count:
                return got
            time.sleep(0.05)
        raise AssertionError(f"hop: {len(self.acked())} of {count} message(s) acknowledged after {timeout}s "
                             f"(faults used: {self.faults_used})")

    # -- the server (its own loop) ---------------------------------------------------

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._session, sock=self._socket)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()

    def _next_fault(self) -> str:
        with self._lock:
            self.connections += 1
            fault = self.faults.popleft() if self.faults else "ok"
            self.faults_used.append(fault)
            return fault

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await self._converse(reader, writer, self._next_fault())
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, fault: str) -> None:
        if fault == "stall_greeting":
            await reader.read()          # until the relay gives up and closes
            return
        if fault == "greet421":
            writer.write(b"421 4.3.2 hop.test busy, try again later\r\n")
            await writer.drain()
            return
        writer.write(b"220 hop.test ESMTP scripted\r\n")
        mail_from, transactions = "", 0
        rcpts: list[str] = []
        while True:
            line = await reader.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                writer.write(self.ehlo)
            elif verb == b"RSET":
                limit = self.messages_per_connection
                if (fault == "rset421" and transactions) or (limit and transactions >= limit):
                    writer.write(b"421 4.3.2 hop.test closing\r\n")
                    await writer.drain()
                    return
                mail_from, rcpts = "", []
                writer.write(b"250 2.0.0 Ok\r\n")
            elif verb == b"MAIL":
                limit = self.messages_per_connection
                if limit and transactions >= limit:
                    writer.write(b"421 4.3.2 hop.test closing: too many messages\r\n")
                    await writer.drain()
                    return
                if fault == "mail421":
                    writer.write(b"421 4.3.2 hop.test shutting down\r\n")
                    await writer.drain()
                    return
                mail_from = line[10:].split(b">")[0].lstrip(b"<").decode()
                writer.write(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                rcpt = line[8:].split(b">")[0].lstrip(b"<").decode()
                if self.refuse[0] and self.refuse[0] in rcpt:
                    writer.write(self.refuse[1])
                else:
                    rcpts.append(rcpt)
                    writer.write(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                if fault == "data250" and not transactions:
                    transactions += 1
                    writer.write(b"250 2.0.0 Ok\r\n")
                    await writer.drain()
                    continue
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                transactions += 1
                if not await self._data(reader, writer, fault if transactions == 1 else "ok", mail_from, rcpts):
                    return
                mail_from, rcpts = "", []
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 bye\r\n")
                await writer.drain()
                return
            else:
                writer.write(b"500 5.5.2 what?\r\n")
            await writer.drain()

    async def _data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, fault: str,
                    mail_from: str, rcpts: list[str]) -> bool:
        """Read one message; False when the fault ends the connection."""
        lines: list[bytes] = []
        size = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            if line == b".\r\n":
                break
            size += len(line)
            if fault == "drop_in_data" and size > 200:
                return False
            lines.append(line[1:] if line.startswith(b".") else line)   # RFC 5321 §4.5.2
        if fault == "data451":   # refused: this hop keeps nothing
            writer.write(b"451 4.3.0 hop.test try again later\r\n")
            return True
        reception = Reception(mail_from, list(rcpts), b"".join(lines), False, fault)
        with self._lock:
            self.receptions.append(reception)
        if fault == "drop_at_dot":
            return False
        if fault == "stall_at_dot":
            await reader.read()
            return False
        with self._lock:
            reception.acked = True
        writer.write(b"250 2.0.0 Ok: queued\r\n")
        return True
