"""``fastrelay bench HOST:PORT``: an SMTP load generator on uvloop.

It drives one SMTP server with ``--sessions`` concurrent connections and
reports the rate (messages/s), the latency of each message (percentiles),
the errors by command and reply code, and the connections it opened.  It is
the generator for the TLS, AUTH, pipelining and fixed-rate figures of
docs/benchmarks.md, where Postfix's ``smtp-source`` (plain SMTP, no
pipelining, closed loop only) cannot go.

What a session does (RFC 5321 §3):

* opening a connection: connect (``--tls``: the TLS handshake first, RFC
  8314), read the 220 greeting, EHLO; ``--starttls``: STARTTLS, the
  handshake, EHLO again (RFC 3207 §4.2: the client forgets what it learnt);
  ``--auth USER:PASS``: ``AUTH PLAIN`` with an initial response (RFC 4954,
  RFC 4616), only inside TLS;
* one transaction per message: MAIL, ``--recipients`` RCPT, DATA, the
  content, the final dot.  With ``--pipelining``, when the EHLO reply offers
  PIPELINING (RFC 2920), MAIL, the RCPTs and DATA go in one write and their
  replies are read together (RFC 2920 §3.1: DATA ends a group); the content
  and its dot are always one write.  A refused command ends the transaction
  with RSET;
* after ``--messages-per-connection`` messages (1: a connection per message,
  like ``smtp-source`` without ``-d``; 0: no limit), QUIT and close.  The
  last message's QUIT is sent with its final dot when pipelining.

Two ways of offering load:

* closed loop (default): every session starts its next message as soon as
  the previous one is answered, like ``smtp-source``;
* open loop (``--rate R``): messages are due at fixed times, R per second,
  whether or not the server keeps up; a due message waits for a free session
  (at most ``--sessions`` connections).  Its latency is counted from the time
  it was due, not from when a session took it, so a server that falls behind
  shows it in the percentiles (no coordinated omission).

A message's latency runs from its start (closed loop: the moment a session
takes it; open loop: its due time) to the 250 after its final dot, so it
includes the connection set-up when the message opened a connection.  The
report also gives the set-up alone (connect to ready for MAIL) and the
transaction alone (MAIL to the 250).

Bounds: ``--count`` messages and/or ``--duration`` seconds (at least one),
and ``--timeout`` seconds overall after which anything in flight is
abandoned and counted as unfinished.  The target must be a loopback address
unless ``--allow-remote`` is given: this is for loading your own relay.

Keeping the client out of the way: each command group is one write of bytes
built once per run; replies are cut out of one buffer per connection and
only their codes kept (their text only for EHLO and for refusals); one
future per group of replies.  The generator's own CPU is reported
(``client CPU``): near one core means it, not the server, set the pace.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ipaddress
import json
import math
import resource
import socket
import ssl
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

CRLF = b"\r\n"
# RFC 5321 §4.5.3.1.5: reply lines are at most 512 octets; allow slack.
MAX_REPLY_BUFFER = 65536
# After --duration, messages in flight get this long to finish.
DRAIN_GRACE = 10.0


class SmtpFailure(Exception):
    """A reply that ends what the session was doing: ``stage`` and the reply code."""

    def __init__(self, stage: str, code: int, text: bytes = b"") -> None:
        super().__init__(f"{stage} {code} {text.decode('utf-8', 'replace')}".strip())
        self.key = f"{stage} {code}"
        self.text = text.decode("utf-8", "replace")


class LostConnection(Exception):
    """The server closed the connection, or spoke something that is not SMTP."""


# --- options and results ---------------------------------------------------------------


@dataclass(frozen=True)
class LoadOptions:
    host: str
    port: int
    sessions: int = 10
    messages_per_connection: int = 1     # 0: unlimited
    size: int = 1024                     # content bytes (headers included), before dot-stuffing
    recipients: int = 1
    starttls: bool = False
    tls: bool = False                    # implicit TLS (RFC 8314)
    auth: tuple[str, str] | None = None  # (user, password): AUTH PLAIN inside TLS
    pipelining: bool = False
    sender: str = "from@example.com"
    recipient: str = "to@example.net"
    helo: str = "client.example.com"
    count: int | None = None
    duration: float | None = None
    rate: float | None = None            # open loop: messages per second
    timeout: float = 300.0               # hard stop for the whole run
    insecure: bool = False
    cafile: str | None = None
    server_name: str | None = None       # SNI and the name verified; default: the host
    sources: tuple[str, ...] = ()        # local addresses to connect from, round robin
    pause_after_tls: float = 0.0         # seconds to wait after a STARTTLS handshake before EHLO


@dataclass
class Percentiles:
    count: int
    p50: float
    p90: float
    p99: float
    p999: float
    max: float
    mean: float

    @classmethod
    def of(cls, seconds: list[float]) -> Percentiles:
        if not seconds:
            nan = float("nan")
            return cls(0, nan, nan, nan, nan, nan, nan)
        xs = sorted(seconds)
        return cls(len(xs), 1000 * _rank(xs, 50), 1000 * _rank(xs, 90), 1000 * _rank(xs, 99),
                   1000 * _rank(xs, 99.9), 1000 * xs[-1], 1000 * sum(xs) / len(xs))


def _rank(sorted_xs: list[float], p: float) -> float:
    """Nearest-rank percentile of a sorted, non-empty list."""
    k = max(0, min(len(sorted_xs) - 1, math.ceil(p / 100 * len(sorted_xs)) - 1))
    return sorted_xs[k]


@dataclass
class LoadResult:
    target: str
    mode: str                    # human description of the options
    sent: int                    # messages answered 2xx after their final dot
    failed: int                  # messages refused or lost
    unfinished: int              # messages in flight when the hard stop came
    seconds: float               # first message started -> last one answered
    rate: float                  # sent / seconds
    offered_rate: float | None   # --rate, if open loop
    connections: int             # connections opened (successfully or not)
    errors: dict[str, int]       # "STAGE CODE" (or "STAGE error-name") -> count
    error_examples: dict[str, str]
    latency_ms: Percentiles      # per message, start (or due time) -> 250 after the dot
    setup_ms: Percentiles        # connect -> ready for MAIL (per connection)
    transaction_ms: Percentiles  # MAIL -> 250 after the dot
    client_cpu_cores: float      # this process's CPU seconds per wall second

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("latency_ms", "setup_ms", "transaction_ms"):
            d[key] = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d[key].items()}
        return d


# --- the client protocol ---------------------------------------------------------------


class ReplyBuffer(asyncio.Protocol):
    """One client connection: bytes in, reply codes out.

    ``data_received`` appends to one buffer and cuts complete replies out of
    it (RFC 5321 §4.2: ``ddd-text`` continuation lines, ``ddd text`` or
    ``ddd`` last line); ``expect(n)`` is a future for the next n replies."""

    __slots__ = (
        "_buf",
        "_codes",
        "_loop",
        "_lost",
        "_texts",
        "_waiter",
        "_want",
        "keep_text",
        "pipelining",
        "quit_sent",
        "transport",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: Any = None
        self._buf = bytearray()
        self._codes: list[int] = []
        self._texts: list[bytes] = []       # the text of each reply, when kept (EHLO, refusals)
        self._want = 0
        self._waiter: asyncio.Future[list[int]] | None = None
        self._lost: LostConnection | None = None
        self.keep_text = False               # keep every line of multi-line replies (EHLO)
        self.pipelining = False              # the server offered PIPELINING and --pipelining
        self.quit_sent = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        # Fast path: one whole single-line reply in one read, nothing buffered (the usual case).
        if (not self._buf and data[-1:] == b"\n" and data.find(b"\n") == len(data) - 1
                and data[3:4] in (b" ", b"\r") and not self.keep_text):
            try:
                code = int(data[:3])
            except ValueError:
                pass
            else:
                self._codes.append(code)
                if code >= 400:
                    self._texts.append(data[4:].rstrip(b"\r\n"))
                waiter = self._waiter
                if waiter is not None and len(self._codes) >= self._want:
                    self._wake(waiter)
                return
        buf = self._buf
        buf += data
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            stop = end - 1 if end > start and buf[end - 1] == 13 else end   # drop the CR
            sep = buf[start + 3] if start + 3 < stop else 32
            if stop - start < 3 or sep not in (32, 45):
                self._fail(LostConnection(f"malformed reply line {bytes(buf[start:end])!r}"))
                return
            if sep == 45:  # "ddd-text": a continuation line
                if self.keep_text:
                    self._texts.append(bytes(buf[start + 4:stop]))
                start = end + 1
                continue
            try:
                code = int(buf[start:start + 3])
            except ValueError:
                self._fail(LostConnection(f"malformed reply line {bytes(buf[start:end])!r}"))
                return
            self._codes.append(code)
            if self.keep_text or code >= 400:
                self._texts.append(bytes(buf[start + 4:stop]))
            start = end + 1
        if start:
            del buf[:start]
        if len(buf) > MAX_REPLY_BUFFER:
            self._fail(LostConnection("reply line too long"))
            return
        waiter = self._waiter
        if waiter is not None and len(self._codes) >= self._want:
            self._wake(waiter)

    def _wake(self, waiter: asyncio.Future[list[int]]) -> None:
        self._waiter = None
        if not waiter.done():
            codes = self._codes
            if len(codes) == self._want:
                self._codes = []
            else:
                codes, self._codes = codes[:self._want], codes[self._want:]
            waiter.set_result(codes)

    def expect(self, count: int) -> asyncio.Future[list[int]]:
        fut: asyncio.Future[list[int]] = self._loop.create_future()
        if len(self._codes) >= count:
            fut.set_result(self._codes[:count])
            del self._codes[:count]
        elif self._lost is not None:
            fut.set_exception(self._lost)
        else:
            self._want = count
            self._waiter = fut
        return fut

    def take_texts(self) -> list[bytes]:
        texts, self._texts = self._texts, []
        return texts

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(LostConnection(f"connection lost ({exc})" if exc else "connection closed by the server"))

    def _fail(self, error: LostConnection) -> None:
        if self._lost is None:
            self._lost = error
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()


# --- one run ------------------------------------------------------------------------------


def build_content(size: int, sender: str, recipient: str, helo: str) -> bytes:
    """Message content of ``size`` bytes (headers included, at least the headers), then ``.CRLF``.

    Lines of 76 to 78 ``X`` fill the body: nothing needs dot-stuffing (RFC 5321 §4.5.2)."""
    head = (f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: fastrelay bench\r\n"
            f"Message-ID: <bench@{helo}>\r\n\r\n").encode()
    room = max(0, size - len(head))
    line = b"X" * 76 + CRLF
    lines, rest = divmod(room, len(line))
    body = line * lines
    if rest >= 3:
        body += b"X" * (rest - 2) + CRLF
    elif rest and body:
        body = body[:-2] + b"X" * rest + CRLF    # one or two more X on the last line
    elif rest == 2:
        body = CRLF
    return head + body + b".\r\n"


class LoadRun:
    """The shared state of one run: what to send, the counters, the schedule."""

    def __init__(self, opts: LoadOptions, loop: asyncio.AbstractEventLoop) -> None:
        self.opts = opts
        self.loop = loop
        self.ssl_context = _client_context(opts) if (opts.tls or opts.starttls) else None
        self.server_name = opts.server_name or opts.host
        self.banner_ehlo = f"EHLO {opts.helo}\r\n".encode()
        rcpts = [opts.recipient] + [f"{i}{opts.recipient}" for i in range(2, opts.recipients + 1)]
        self.mail_cmd = f"MAIL FROM:<{opts.sender}>\r\n".encode()
        self.rcpt_cmds = [f"RCPT TO:<{r}>\r\n".encode() for r in rcpts]
        self.group = self.mail_cmd + b"".join(self.rcpt_cmds) + b"DATA\r\n"
        self.group_stages = ("MAIL",) + ("RCPT",) * len(rcpts) + ("DATA",)
        self.content = build_content(opts.size, opts.sender, opts.recipient, opts.helo)
        self.content_quit = self.content + b"QUIT\r\n"
        if opts.auth is not None:
            token = base64.b64encode(b"\0" + opts.auth[0].encode() + b"\0" + opts.auth[1].encode())
            self.auth_cmd = b"AUTH PLAIN " + token + CRLF
        # counters
        self.sent = 0
        self.failed = 0
        self.started = 0
        self.connections = 0
        self.errors: dict[str, int] = {}
        self.error_examples: dict[str, str] = {}
        self.latency: list[float] = []
        self.setup_times: list[float] = []
        self.txn_times: list[float] = []
        self.last_done = 0.0
        # schedule
        self.t0 = 0.0
        self.stop_at = math.inf
        self.due: asyncio.Queue[float | None] | None = None
        # Open loop with connection reuse: every session connects before the first message is
        # due, so the first messages do not wait for set-ups that the later ones never see.
        self.preconnect = bool(opts.rate) and opts.messages_per_connection != 1
        self.connected = 0
        self.all_connected = asyncio.Event()
        self._source_index = 0

    # -- the schedule ---------------------------------------------------------------

    def take_closed(self) -> float | None:
        """Closed loop: the next message starts now, if the bounds allow one more."""
        opts = self.opts
        if opts.count is not None and self.started >= opts.count:
            return None
        now = time.perf_counter()
        if now >= self.stop_at:
            return None
        self.started += 1
        return now

    async def take(self) -> float | None:
        if self.due is None:
            return self.take_closed()
        return await self.due.get()

    async def dispatch(self, sessions: int) -> None:
        """Open loop: put each message's due time in the queue when it falls due."""
        assert self.due is not None and self.opts.rate
        interval = 1.0 / self.opts.rate
        count = self.opts.count
        i = 0
        try:
            while count is None or i < count:
                due = self.t0 + i * interval
                if due >= self.stop_at:
                    break
                now = time.perf_counter()
                if due > now:
                    await asyncio.sleep(due - now)
                    now = time.perf_counter()
                # Release everything already due (sleep has ~1 ms granularity).
                while (count is None or i < count) and due <= now and due < self.stop_at:
                    self.due.put_nowait(due)
                    self.started += 1
                    i += 1
                    due = self.t0 + i * interval
        finally:
            for _ in range(sessions):
                self.due.put_nowait(None)

    # -- errors ----------------------------------------------------------------------

    def error(self, key: str, example: str) -> None:
        self.errors[key] = self.errors.get(key, 0) + 1
        if key not in self.error_examples:
            self.error_examples[key] = example[:200]

    # -- connections -------------------------------------------------------------------

    def _next_source(self) -> tuple[str, int] | None:
        sources = self.opts.sources
        if not sources:
            return None
        self._source_index += 1
        return (sources[self._source_index % len(sources)], 0)

    async def open(self) -> ReplyBuffer:
        """Connect and get ready for MAIL: greeting, EHLO, STARTTLS + EHLO, AUTH."""
        opts, loop = self.opts, self.loop
        self.connections += 1
        try:
            _, proto = await loop.create_connection(
                lambda: ReplyBuffer(loop), opts.host, opts.port,
                ssl=self.ssl_context if opts.tls else None,
                server_hostname=self.server_name if opts.tls else None,
                local_addr=self._next_source())
        except ssl.SSLError as exc:
            raise SmtpFailure("TLS", 0, str(exc).encode()) from None
        except OSError as exc:
            raise SmtpFailure("CONNECT", 0, f"{type(exc).__name__}: {exc}".encode()) from None
        try:
            await _expect(proto, 1, "CONNECT", 220)
            extensions = await self._ehlo(proto)
            if opts.starttls:
                if "STARTTLS" not in extensions:
                    raise SmtpFailure("EHLO", 0, b"STARTTLS not offered")
                proto.transport.write(b"STARTTLS\r\n")
                await _expect(proto, 1, "STARTTLS", 220)
                try:
                    transport = await loop.start_tls(proto.transport, proto, self.ssl_context,  # type: ignore[arg-type]
                                                     server_hostname=self.server_name)
                except (ssl.SSLError, OSError) as exc:
                    raise SmtpFailure("TLS", 0, str(exc).encode()) from None
                if transport is None:
                    raise LostConnection("connection closed during the TLS handshake")
                proto.transport = transport
                if opts.pause_after_tls:
                    await asyncio.sleep(opts.pause_after_tls)
                extensions = await self._ehlo(proto)
            if opts.auth is not None:
                proto.transport.write(self.auth_cmd)
                await _expect(proto, 1, "AUTH", 235)
        except BaseException:
            if proto.transport is not None:
                proto.transport.abort()
            raise
        proto.keep_text = False
        proto.pipelining = opts.pipelining and "PIPELINING" in extensions
        return proto

    async def _ehlo(self, proto: ReplyBuffer) -> set[str]:
        proto.keep_text = True
        proto.take_texts()
        proto.transport.write(self.banner_ehlo)
        await _expect(proto, 1, "EHLO", 250)
        texts = proto.take_texts()
        proto.keep_text = False
        if not (self.opts.starttls or self.opts.pipelining):
            return set()   # nothing to look for
        # The first line is the greeting; the others name extensions (RFC 5321 §4.1.1.1).
        return {t.split(b" ", 1)[0].decode("ascii", "replace").upper() for t in texts[1:]}

    # -- one message ---------------------------------------------------------------------

    async def transaction(self, proto: ReplyBuffer, last: bool) -> bool:
        """MAIL, RCPT..., DATA, content. True when the final dot was answered 2xx.

        ``last``: QUIT goes with the final dot when pipelining."""
        write = proto.transport.write
        if proto.pipelining:
            write(self.group)
            codes = await proto.expect(len(self.group_stages))
            rcpt_ok = sum(1 for c in codes[1:-1] if 200 <= c < 300)
            if not (200 <= codes[0] < 300 and rcpt_ok == len(codes) - 2 and codes[-1] == 354):
                self._refused(proto, [(stage, c) for stage, c in zip(self.group_stages, codes)
                                      if not (c == 354 if stage == "DATA" else 200 <= c < 300)])
                if codes[-1] == 354:
                    # RFC 2920 §3.1: DATA accepted although MAIL or every RCPT failed:
                    # end it empty; with some recipients, send the message to them.
                    if not (200 <= codes[0] < 300 and rcpt_ok):
                        write(b".\r\n")
                        await proto.expect(1)
                        proto.take_texts()
                        await self._rset(proto)
                        return False
                else:
                    await self._rset(proto)
                    return False
        else:
            write(self.mail_cmd)
            code = (await proto.expect(1))[0]
            if not 200 <= code < 300:
                self._refused(proto, [("MAIL", code)])
                await self._rset(proto)
                return False
            rcpt_ok = 0
            for cmd in self.rcpt_cmds:
                write(cmd)
                code = (await proto.expect(1))[0]
                if 200 <= code < 300:
                    rcpt_ok += 1
                else:
                    self._refused(proto, [("RCPT", code)])
            if not rcpt_ok:
                await self._rset(proto)
                return False
            write(b"DATA\r\n")
            code = (await proto.expect(1))[0]
            if code != 354:
                self._refused(proto, [("DATA", code)])
                await self._rset(proto)
                return False
        if last and proto.pipelining:
            write(self.content_quit)
            proto.quit_sent = True
        else:
            write(self.content)
        code = (await proto.expect(1))[0]
        if not 200 <= code < 300:
            self._refused(proto, [("END-OF-DATA", code)])
            return False
        return True

    def _refused(self, proto: ReplyBuffer, failures: list[tuple[str, int]]) -> None:
        """Count refused commands; the kept texts are those of the replies >= 400, in order."""
        texts = iter(proto.take_texts())
        for stage, code in failures:
            text = next(texts, b"") if code >= 400 else b""
            self.error(f"{stage} {code}", text.decode("utf-8", "replace"))

    async def _rset(self, proto: ReplyBuffer) -> None:
        proto.transport.write(b"RSET\r\n")
        await proto.expect(1)
        proto.take_texts()

    # -- one session -----------------------------------------------------------------------

    async def session(self) -> None:
        opts = self.opts
        per_connection = opts.messages_per_connection
        proto: ReplyBuffer | None = None
        on_connection = 0
        perf = time.perf_counter
        if self.preconnect:
            t = perf()
            try:
                proto = await self.open()
                self.setup_times.append(perf() - t)
            except (SmtpFailure, LostConnection) as exc:
                key = exc.key if isinstance(exc, SmtpFailure) else "LOST connection"
                self.error(key, exc.text if isinstance(exc, SmtpFailure) else str(exc))
            self.connected += 1
            if self.connected == opts.sessions:
                self.all_connected.set()
        try:
            while True:
                start = await self.take()
                if start is None:
                    break
                try:
                    if proto is None:
                        t = perf()
                        proto = await self.open()
                        self.setup_times.append(perf() - t)
                        on_connection = 0
                    on_connection += 1
                    last = per_connection > 0 and on_connection >= per_connection
                    t = perf()
                    ok = await self.transaction(proto, last)
                    done = perf()
                    if ok:
                        self.sent += 1
                        self.latency.append(done - start)
                        self.txn_times.append(done - t)
                        self.last_done = done
                    else:
                        self.failed += 1
                    if last:
                        if not proto.quit_sent:
                            proto.transport.write(b"QUIT\r\n")
                        with contextlib.suppress(LostConnection):
                            await proto.expect(1)   # 221
                        proto.transport.close()
                        proto = None
                except SmtpFailure as exc:
                    self.failed += 1
                    self.error(exc.key, exc.text)
                    _abort(proto)
                    proto = None
                except LostConnection as exc:
                    self.failed += 1
                    self.error("LOST connection", str(exc))
                    _abort(proto)
                    proto = None
                except Exception as exc:  # noqa: BLE001  (reported with the run, not a crash)
                    self.failed += 1
                    self.error(f"CLIENT {type(exc).__name__}", str(exc))
                    _abort(proto)
                    proto = None
        finally:
            if proto is not None and not proto.transport.is_closing():
                proto.transport.write(b"QUIT\r\n")
                proto.transport.close()


def _abort(proto: ReplyBuffer | None) -> None:
    if proto is not None and proto.transport is not None:
        proto.transport.abort()


async def _expect(proto: ReplyBuffer, n: int, stage: str, wanted: int) -> None:
    codes = await proto.expect(n)
    if codes[-1] != wanted:
        texts = proto.take_texts()
        raise SmtpFailure(stage, codes[-1], texts[-1] if texts else b"")


def _client_context(opts: LoadOptions) -> ssl.SSLContext:
    if opts.insecure:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    return ssl.create_default_context(cafile=opts.cafile)


async def run_load(opts: LoadOptions) -> LoadResult:
    """Run the load described by ``opts`` on the running loop and return the figures."""
    if opts.count is None and opts.duration is None:
        raise ValueError("give --count and/or --duration")
    loop = asyncio.get_running_loop()
    run = LoadRun(opts, loop)
    cpu0 = _cpu()
    t_begin = time.perf_counter()
    tasks = []
    if opts.rate:
        run.due = asyncio.Queue()
    tasks += [loop.create_task(run.session()) for _ in range(opts.sessions)]
    if run.preconnect:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run.all_connected.wait(), opts.timeout)
    run.t0 = time.perf_counter()
    if opts.duration is not None:
        run.stop_at = run.t0 + opts.duration
    hard_stop = opts.timeout if opts.duration is None else min(opts.timeout, opts.duration + DRAIN_GRACE)
    hard_stop = max(0.0, hard_stop - (run.t0 - t_begin))
    if opts.rate:
        tasks.append(loop.create_task(run.dispatch(opts.sessions)))
    _, pending = await asyncio.wait(tasks, timeout=hard_stop)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]  # a bug in the generator, not the server
    now = time.perf_counter()
    wall = now - t_begin   # for the CPU share: pre-connecting included
    cpu = _cpu() - cpu0
    seconds = (run.last_done - run.t0) if run.sent else now - run.t0
    mode = describe(opts)
    return LoadResult(
        target=f"{opts.host}:{opts.port}", mode=mode, sent=run.sent, failed=run.failed,
        unfinished=run.started - run.sent - run.failed, seconds=seconds, rate=run.sent / seconds if seconds > 0 else 0.0,
        offered_rate=opts.rate, connections=run.connections,
        errors=dict(sorted(run.errors.items())), error_examples=run.error_examples,
        latency_ms=Percentiles.of(run.latency), setup_ms=Percentiles.of(run.setup_times),
        transaction_ms=Percentiles.of(run.txn_times), client_cpu_cores=cpu / wall if wall > 0 else 0.0)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def describe(opts: LoadOptions) -> str:
    conn = ("new connection per message" if opts.messages_per_connection == 1 else
            "connection reuse" if opts.messages_per_connection == 0 else
            f"{opts.messages_per_connection} messages per connection")
    parts = [f"{opts.sessions} sessions", f"{opts.size} bytes", f"{opts.recipients} rcpt", conn]
    if opts.tls:
        parts.append("implicit TLS")
    if opts.starttls:
        parts.append("STARTTLS")
    if opts.auth:
        parts.append("AUTH PLAIN")
    if opts.pipelining:
        parts.append("pipelining")
    if opts.rate:
        parts.append(f"open loop at {opts.rate:g} msgs/s")
    return ", ".join(parts)


# --- command line ---------------------------------------------------------------------------


def format_result(r: LoadResult) -> str:
    def row(name: str, p: Percentiles) -> str:
        if not p.count:
            return f"  {name:<34} -"
        return (f"  {name:<34} p50 {p.p50:8.2f}  p90 {p.p90:8.2f}  p99 {p.p99:8.2f}  "
                f"p99.9 {p.p999:8.2f}  max {p.max:8.2f}  (n={p.count})")

    lines = [f"target {r.target}: {r.mode}",
             f"sent {r.sent} messages in {r.seconds:.3f} s = {r.rate:,.1f} msgs/s"
             + (f" (offered {r.offered_rate:g} msgs/s)" if r.offered_rate else ""),
             f"failed {r.failed}, unfinished {r.unfinished}, connections opened {r.connections}",
             "latency, ms:",
             row("per message (start -> 250 after .)", r.latency_ms),
             row("connection set-up (-> ready)", r.setup_ms),
             row("transaction (MAIL -> 250 after .)", r.transaction_ms),
             f"client CPU {r.client_cpu_cores:.2f} cores"]
    if r.errors:
        lines.append("errors:")
        for key, n in r.errors.items():
            lines.append(f"  {key}: {n}  ({r.error_examples.get(key, '')})")
    else:
        lines.append("errors: none")
    return "\n".join(lines)


def parse_target(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def _is_loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def options_from_args(args: argparse.Namespace) -> LoadOptions:
    host, port = args.target
    auth = None
    if args.auth is not None:
        user, sep, password = args.auth.partition(":")
        if not sep:
            raise ValueError("--auth takes USER:PASS")
        auth = (user, password)
    return LoadOptions(
        host=host, port=port, sessions=args.sessions, messages_per_connection=args.messages_per_connection,
        size=args.size, recipients=args.recipients, starttls=args.starttls, tls=args.tls, auth=auth,
        pipelining=args.pipelining, sender=args.sender, recipient=args.recipient, helo=args.helo,
        count=args.count, duration=args.duration, rate=args.rate, timeout=args.timeout,
        insecure=args.insecure, cafile=args.cafile, server_name=args.server_name,
        sources=tuple(s for s in (args.source or "").split(",") if s),
        pause_after_tls=args.pause_after_tls / 1000)


def _cmd_bench(args: argparse.Namespace) -> int:
    try:
        opts = options_from_args(args)
        if opts.count is None and opts.duration is None:
            raise ValueError("give --count N and/or --duration SECONDS")
        if opts.tls and opts.starttls:
            raise ValueError("--tls and --starttls exclude each other")
        if opts.auth and not (opts.tls or opts.starttls):
            raise ValueError("--auth sends the password only inside TLS: add --starttls or --tls")
        if opts.sessions < 1 or opts.recipients < 1 or opts.messages_per_connection < 0:
            raise ValueError("--sessions and --recipients must be at least 1, --messages-per-connection at least 0")
        if opts.rate is not None and opts.rate <= 0:
            raise ValueError("--rate must be positive")
        if not args.allow_remote:
            for h in (opts.host, *opts.sources):
                if not _is_loopback(h):
                    raise ValueError(f"{h} is not a loopback address (add --allow-remote to load a relay you run elsewhere)")
    except ValueError as exc:
        print(f"fastrelay bench: {exc}", file=sys.stderr)
        return 2
    _raise_nofile(opts.sessions + 64)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        result = asyncio.run(run_load(opts))
    else:
        result = uvloop.run(run_load(opts))
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
    else:
        print(format_result(result))
    return 0 if result.sent and not result.failed and not result.unfinished else 1


def _raise_nofile(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", type=parse_target, metavar="HOST:PORT", help="the SMTP server to load (loopback)")
    p.add_argument("--sessions", type=int, default=10, help="concurrent connections (default 10)")
    p.add_argument("--messages-per-connection", type=int, default=1, metavar="N",
                   help="messages before QUIT; 1: a new connection per message (default), 0: no limit")
    p.add_argument("--size", type=int, default=1024, metavar="BYTES",
                   help="message content size, headers included (default 1024)")
    p.add_argument("--recipients", type=int, default=1, metavar="N", help="RCPT per message (default 1)")
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--starttls", action="store_true", help="STARTTLS after EHLO (RFC 3207)")
    tls.add_argument("--tls", action="store_true", help="implicit TLS from the first byte (RFC 8314)")
    p.add_argument("--auth", metavar="USER:PASS", help="AUTH PLAIN after TLS (needs --starttls or --tls)")
    p.add_argument("--pipelining", action="store_true",
                   help="send MAIL, RCPT and DATA in one write when the server offers PIPELINING")
    p.add_argument("--from", dest="sender", default="from@example.com", help="envelope sender")
    p.add_argument("--to", dest="recipient", default="to@example.net",
                   help="envelope recipient (with --recipients N the others are 2ADDR, 3ADDR...)")
    p.add_argument("--helo", default="client.example.com", help="EHLO name")
    p.add_argument("--count", type=int, help="messages to send in all")
    p.add_argument("--duration", type=float, metavar="SECONDS", help="stop starting messages after this long")
    p.add_argument("--rate", type=float, metavar="MSGS_PER_S",
                   help="open loop: start messages at this fixed rate (latency counted from each due time)")
    p.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                   help="hard stop for the run; in-flight messages are abandoned (default 300)")
    p.add_argument("--pause-after-tls", type=float, default=0.0, metavar="MS",
                   help="wait this long after the STARTTLS handshake before EHLO (default 0: at once; "
                        "see docs/benchmarks.md on Postfix and TLS 1.3 session tickets)")
    p.add_argument("--insecure", action="store_true", help="do not verify the server's certificate")
    p.add_argument("--cafile", help="verify the server's certificate against this CA bundle")
    p.add_argument("--server-name", help="TLS server name to send and verify (default: the host)")
    p.add_argument("--source", metavar="IP[,IP...]", help="local addresses to connect from, round robin")
    p.add_argument("--allow-remote", action="store_true", help="allow a target that is not on loopback")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_cmd_bench)


def add_commands(sub: Any) -> None:
    """``fastrelay bench HOST:PORT [options]``."""
    p = sub.add_parser("bench", help="load an SMTP server and report rate, latency and errors (docs/benchmarks.md)")
    add_arguments(p)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fastrelay bench")
    add_arguments(ap)
    args = ap.parse_args(argv)
    return int(args.func(args))


__all__ = ["LoadOptions", "LoadResult", "Percentiles", "ReplyBuffer", "add_commands", "build_content",
           "format_result", "main", "run_load"]

if __name__ == "__main__":
    sys.exit(main())
