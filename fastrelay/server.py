"""The SMTP server: a flat state machine on an asyncio (uvloop) Protocol.

``data_received`` only feeds a buffer and drains complete lines, dispatching
on the command verb to one ``_cmd_*`` method each (asyncpg's shape).  No
coroutine per connection and no StreamReader: a session is one small object,
and replies produced while draining one read are written in one batch
(RFC 2920 pipelining).

When a command needs something slow (the spool's fsync, an argon2 check, a
remote quota store), the session becomes *busy*: it stops draining its buffer
and pauses reading until the answer arrives, then writes the reply and
resumes.  Replies therefore always go out in command order.

Framing is strict (SMTP smuggling, CVE-2023-51764 class): a line ends with
CRLF only.  In DATA only ``<CR><LF>.<CR><LF>`` ends the message, and with
``bare_newline = "reject"`` a message containing a bare CR or LF is refused
whole.

Config keys read: [server] hostname, max_message_size, max_data_memory,
max_connections, max_connections_per_ip, bare_newline, command_timeout, data_timeout,
tls_handshake_timeout, drain_timeout, auth_failures_before_delay,
auth_failures_before_lockout, auth_failure_window, auth_lockout, hard_error_limit.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import enum
import ipaddress
import re
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from . import events, replies
from ._core import (
    CONTENT_8BIT,
    CONTENT_BARE_NEWLINE,
    CONTENT_LEADING_DOT,
    CONTENT_LONG_LINE,
    MAX_CONTENT_LINE,
    ContentScan,
    find_end_of_data,
    scan_content,
)
from .addresses import parse_path_argument
from .config import Config, ServerConfig, data_memory_limit
from .errors import SpoolError
from .logs import MailLog
from .policy import (
    PasswordVerifier,
    RelayDecision,
    RelayPolicy,
    SessionFacts,
    is_valid_helo,
    normalize_address,
)
from .quota import QuotaBook
from .spool import Envelope, Location, QueueIdGenerator, Spool

if TYPE_CHECKING:
    from .quota import QuotaBackend, QuotaTxn
    from .quota_redis import RedisQuotaBook

log = MailLog("fastrelay.smtpd")

CRLF = b"\r\n"
# RFC 5321 §4.5.3.1.4; RFC 4954 §4 raises it to 12288 for AUTH lines.
MAX_COMMAND_LINE = 512
MAX_AUTH_LINE = 12288
# Stop reading from a client that pipelines this much while a reply is pending.
MAX_PENDING_INPUT = 64 * 1024
# Reads of content shorter than SMALL_READ are merged into one buffer of up
# to MERGED_READS bytes; longer ones are kept as they came.
SMALL_READ = 16 * 1024
MERGED_READS = 64 * 1024
# Characters of a failed AUTH's user name that the log shows.
MAX_LOGGED_USER = 100
# How far into the content the header section is looked for (loop detection).
HEADER_SCAN_LIMIT = 65536


class State(enum.IntEnum):
    GREETED = 0        # banner sent, no HELO/EHLO yet
    READY = 1          # after HELO/EHLO or RSET: may start a transaction
    MAIL = 2           # MAIL accepted, collecting RCPT
    DATA = 3           # receiving message content
    AUTH_PLAIN = 4     # waiting for the PLAIN initial response
    AUTH_LOGIN_USER = 5
    AUTH_LOGIN_PASS = 6
    CLOSED = 7


# Waiting for a response to a 334 challenge (RFC 4954 §4): the next line is not a command.
AUTH_STATES = frozenset({State.AUTH_PLAIN, State.AUTH_LOGIN_USER, State.AUTH_LOGIN_PASS})

def normalize_ip(ip: str) -> str:
    # IPv4-mapped IPv6 peers (dual-stack sockets) are IPv4 clients.
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip


def client_key(ip: str, ipv6_prefix: int) -> str:
    """What per-client limits count by: an IPv4 address, or an IPv6 address's
    network of ``ipv6_prefix`` bits ("2001:db8::/64"), since one IPv6 host
    can use every address of its /64 (Postfix 3.8's smtpd_client_ipv6_prefix_length)."""
    if ":" not in ip or ipv6_prefix >= 128:
        return ip
    try:
        return str(ipaddress.IPv6Network((ipaddress.IPv6Address(ip.partition("%")[0]), ipv6_prefix), strict=False))
    except ValueError:
        return ip


class AuthThrottle:
    """Failed AUTH attempts per client (client_key): slow down, then lock out for a while.

    Only the failing IP waits (an asyncio sleep, not a blocked loop).  The
    failures of addresses seen once are swept when they leave
    auth_failure_window (every SWEEP_EVERY new addresses), and at most
    MAX_TRACKED addresses are remembered, the oldest dropped first: a botnet,
    or one IPv6 host walking its /64, must not grow the relay without bound."""

    MAX_TRACKED = 20_000
    SWEEP_EVERY = 1_000

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self._failures: dict[str, deque[float]] = {}
        self._locked_until: dict[str, float] = {}
        self._new_since_sweep = 0

    def tracked(self) -> int:
        return len(self._failures) + len(self._locked_until)

    def _sweep(self, now: float) -> None:
        horizon = now - self.cfg.auth_failure_window
        for ip in [ip for ip, q in self._failures.items() if q[-1] < horizon]:
            del self._failures[ip]
        for ip in [ip for ip, until in self._locked_until.items() if until <= now]:
            del self._locked_until[ip]
        while len(self._failures) >= self.MAX_TRACKED:   # room for the one being added
            del self._failures[next(iter(self._failures))]
        while len(self._locked_until) > self.MAX_TRACKED:
            del self._locked_until[next(iter(self._locked_until))]
        self._new_since_sweep = 0

    def locked(self, ip: str, now: float) -> bool:
        until = self._locked_until.get(ip)
        if until is None:
            return False
        if now >= until:
            del self._locked_until[ip]
            self._failures.pop(ip, None)
            return False
        return True

    def fail(self, ip: str, now: float) -> float:
        """Record a failure; return how long to wait before answering."""
        q = self._failures.get(ip)
        if q is None:
            self._new_since_sweep += 1
            if self._new_since_sweep >= self.SWEEP_EVERY or len(self._failures) >= self.MAX_TRACKED:
                self._sweep(now)
            q = self._failures[ip] = deque()
        q.append(now)
        while q and q[0] < now - self.cfg.auth_failure_window:
            q.popleft()
        n = len(q)
        if n >= self.cfg.auth_failures_before_lockout:
            self._locked_until[ip] = now + self.cfg.auth_lockout
            log.warning("auth: %s locked out for %.0fs after %d failures", ip, self.cfg.auth_lockout, n)
        if n > self.cfg.auth_failures_before_delay:
            return min(2.0 ** (n - self.cfg.auth_failures_before_delay - 1), 8.0)
        return 0.0

    def succeed(self, ip: str) -> None:
        # Failures are not wiped: whoever holds one valid password could
        # otherwise reset the count between guesses at other users' passwords.
        # They age out of auth_failure_window instead.
        pass


class SmtpServer:
    """What all sessions share: config, policy, quota, spool and connection counts."""

    def __init__(
        self,
        config: Config,
        policy: RelayPolicy,
        spool: Spool,
        quota: QuotaBackend | None = None,
        tls_context: ssl.SSLContext | None = None,
        on_queued: Callable[[Envelope, Location], None] | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.spool = spool
        self.queue_ids = QueueIdGenerator()
        self.tls_context = tls_context
        self.on_queued = on_queued
        self.sessions: set[SmtpSession] = set()
        self.per_client: dict[str, int] = {}
        # Message content the sessions hold in memory, from its first byte
        # until the spool has written it (bounded by server.max_data_memory).
        self.data_bytes = 0
        self.draining = False
        self._servers: list[asyncio.base_events.Server] = []
        self._sweeper: asyncio.Task[None] | None = None
        self.counters = {"connections": 0, "refused_connections": 0, "messages": 0, "recipients": 0}
        # Plain counters for metrics.py (read at scrape time, never on this path).
        self.counters["auth_failures"] = 0
        self.connection_refusals = {"max_connections": 0, "max_connections_per_ip": 0, "shutting_down": 0}
        self.refusals: dict[tuple[str, str, str], int] = {}   # (stage, code, enhanced code) -> replies
        self.passwords = PasswordVerifier()   # one argon2 pool for the process, across reloads
        self.apply(config, policy, quota)

    def apply(self, config: Config, policy: RelayPolicy, quota: QuotaBackend | None) -> None:
        """Install a (re)loaded config; open sessions pick it up at their next transaction."""
        self.config = config
        self.cfg = config.server
        self.policy = policy
        self.quota = quota
        self.hostname = config.server.hostname
        self.auth_throttle = AuthThrottle(config.server)   # a reload lifts lockouts (docs/relay-errors.md)
        self.banner = f"220 {self.hostname} ESMTP fastrelay\r\n".encode()
        self.data_memory_limit = data_memory_limit(config.server)
        size = config.server.max_message_size
        common = ["PIPELINING", f"SIZE {size}", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8"]
        plain = common + (["STARTTLS"] if self.tls_context else [])
        secure = common + ["AUTH PLAIN LOGIN"]
        self.ehlo_plain = self._ehlo_lines(plain)
        self.ehlo_tls = self._ehlo_lines(secure)

    def _ehlo_lines(self, extensions: list[str]) -> str:
        return "".join(f"250-{e}\r\n" for e in extensions[:-1]) + f"250 {extensions[-1]}\r\n"

    async def listen(self, address: tuple[str, int], implicit_tls: bool) -> None:
        ctx = self.tls_context if implicit_tls else None
        server = await self.loop.create_server(
            lambda: SmtpSession(self, implicit_tls),
            host=address[0], port=address[1], ssl=ctx, reuse_address=True, backlog=4096,
            ssl_handshake_timeout=self.cfg.tls_handshake_timeout if ctx else None,
        )
        self._servers.append(server)
        if self._sweeper is None:
            self._sweeper = self.loop.create_task(self._sweep_timeouts())

    async def _sweep_timeouts(self) -> None:
        # One periodic sweep instead of a timer per session: re-arming a timer
        # on every read would cost more than the check.
        while True:
            await asyncio.sleep(1.0)
            now = self.loop.time()
            for session in list(self.sessions):
                session.check_timeout(now)

    def register(self, session: SmtpSession) -> bytes | None:
        """Count a new connection; return a 421 reply if a limit refuses it."""
        if self.draining:
            self.connection_refusals["shutting_down"] += 1
            return replies.SHUTTING_DOWN
        ip, key = session.client_ip, session.client_key
        if len(self.sessions) >= self.cfg.max_connections:
            self.counters["refused_connections"] += 1
            self.connection_refusals["max_connections"] += 1
            log.warning("connect from [%s]: refused: too many connections (%d)", ip, len(self.sessions))
            return replies.TOO_MANY_CONNECTIONS
        n = self.per_client.get(key, 0)
        if n >= self.cfg.max_connections_per_ip:
            self.counters["refused_connections"] += 1
            self.connection_refusals["max_connections_per_ip"] += 1
            log.warning("connect from [%s]: refused: too many connections from %s (%d)",
                        ip, "this IP" if key == ip else key, n)
            return replies.TOO_MANY_FROM_IP
        self.per_client[key] = n + 1
        self.sessions.add(session)
        self.counters["connections"] += 1
        return None

    def count_refusal(self, session: SmtpSession, reply: bytes, line: bytes = b"") -> None:
        """A 4xx/5xx reply: count it by stage, code and enhanced code, and log the event
        (with the refused command ``line`` for MAIL and RCPT)."""
        stage = _STAGES.get(session.command, "UNKNOWN")
        first = reply.split(b"\r\n", 1)[0].decode("utf-8", "replace")
        code, text = first[:3], first[4:]
        dsn, _, rest = text.partition(" ")
        if not _ENHANCED.match(dsn):
            dsn, rest = "", text
        key = (stage, code, dsn)
        self.refusals[key] = self.refusals.get(key, 0) + 1
        events.emit("refusal", stage=stage, code=int(code) if code.isdigit() else code, dsn=dsn, text=rest,
                    client_ip=session.client_ip, helo=session.helo or None, sender=session.sender or None,
                    auth_user=session.auth_user,
                    command=line[:600].decode("utf-8", "replace") if stage in ("MAIL", "RCPT") else None)

    def unregister(self, session: SmtpSession) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            key = session.client_key
            n = self.per_client.get(key, 1) - 1
            if n <= 0:
                self.per_client.pop(key, None)
            else:
                self.per_client[key] = n

    def stop_listening(self) -> None:
        for server in self._servers:
            server.close()
        self._servers.clear()

    async def drain(self, timeout: float) -> None:
        """SIGTERM: stop accepting; let open transactions finish, then 421 everyone."""
        self.draining = True
        self.stop_listening()
        for session in list(self.sessions):
            session.drain()
        deadline = self.loop.time() + timeout
        while self.sessions and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            session.close_with(replies.SHUTTING_DOWN)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None


class SmtpSession(asyncio.Protocol):
    """One SMTP connection, server side."""

    # Thousands of mostly idle sessions: no per-instance __dict__ (~1.3 KiB each).
    __slots__ = (
        "server", "cfg", "implicit_tls", "transport", "client_ip", "client_key", "state", "buffer", "busy",
        "closing", "draining", "discarding", "tls_pending", "tls", "tls_info", "helo", "esmtp",
        "auth_user", "last_activity", "reading_paused", "writing_paused", "_auth_login_user",
        "command", "_unsent", "decision", "quota_txn", "sender", "recipients", "smtputf8",
        "body_8bit", "dot_lines", "declared_size", "chunks", "data_size", "held", "tail", "dropped",
        "content_scan", "rescan", "errors",
    )

    def __init__(self, server: SmtpServer, implicit_tls: bool) -> None:
        self.server = server
        self.cfg = server.cfg
        self.implicit_tls = implicit_tls
        self.transport: Any = None
        self.client_ip = "?"
        self.client_key = "?"          # what per-client limits count by (client_key())
        self.state = State.GREETED
        self.buffer = b""
        self.busy = False
        self.closing = False
        self.draining = False
        self.discarding = False        # inside an over-long line: drop until CRLF
        self.errors = 0                # 4xx/5xx replies so far (hard_error_limit)
        self.tls_pending = False
        self.tls = implicit_tls
        self.tls_info: str | None = None
        self.helo = ""
        self.esmtp = False
        self.auth_user: str | None = None
        self.last_activity = 0.0
        self.reading_paused = False     # paused while busy with a pipelined backlog
        self.writing_paused = False     # paused while the client does not read its replies
        self._auth_login_user = ""
        self.command: Any = "CONNECT"   # the handler of the last command: the stage of a refusal
        # Replies to the commands of the current read, not yet written; a
        # command that closes the session writes them first (RFC 2920 order).
        self._unsent: list[bytes] = []
        self.held = 0
        self.content_scan = ContentScan()   # of the content being read, read by read
        self._reset_transaction()

    def _reset_transaction(self) -> None:
        self.decision: RelayDecision | None = None
        self.quota_txn: QuotaTxn | None = None
        self.sender = ""
        self.recipients: list[str] = []
        self.smtputf8 = False
        self.body_8bit = False
        self.dot_lines = False      # some content line starts with "." (to stuff again on delivery)
        self.declared_size = 0
        # DATA framing
        self._release_content()
        self.data_size = 0
        self.tail = CRLF           # the last bytes seen, to find a terminator split across reads
        self.content_scan.reset()
        self.rescan = False        # the scan counted bytes cut off (_unstore): scan again at the end
        # The reply and logged reason that refuse the content being read: it
        # is read to its end but not kept (too big, or no memory left for it).
        self.dropped: tuple[bytes, str] | None = None

    def _release_content(self) -> None:
        """Drop the content read so far, and its share of server.max_data_memory."""
        self.chunks: list[bytes | bytearray | memoryview] = []
        if self.held:
            self.server.data_bytes -= self.held
            self.held = 0

    # -- connection life ---------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.client_ip = normalize_ip(peer[0]) if peer else "unknown"
        self.client_key = client_key(self.client_ip, self.cfg.ipv6_client_prefix)
        self.last_activity = self.server.loop.time()
        refusal = self.server.register(self)
        if refusal is not None:
            self.server.count_refusal(self, refusal)
            transport.write(refusal)
            transport.close()
            self.state = State.CLOSED
            return
        if self.implicit_tls:
            self.tls_info = _tls_description(transport)
        log.info("connect from [%s]%s", self.client_ip, " (TLS)" if self.implicit_tls else "")
        transport.write(self.server.banner)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state != State.CLOSED or self in self.server.sessions:
            log.info("disconnect from %s[%s]", self.helo or "unknown", self.client_ip)
        self.state = State.CLOSED
        self.closing = True
        self._release_content()
        self.server.unregister(self)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def check_timeout(self, now: float) -> None:
        limit = self.cfg.data_timeout if self.state == State.DATA else self.cfg.command_timeout
        if not self.busy and now - self.last_activity > limit:
            log.info("timeout after %s from [%s]", self.state.name, self.client_ip)
            self.close_with(replies.TIMEOUT)

    def close_with(self, reply: bytes) -> None:
        if self.closing or self.transport is None:
            return
        self.closing = True
        if reply[0] >= 52:
            self.server.count_refusal(self, reply)
        try:
            self.transport.write(b"".join(self._unsent) + reply)
            self._unsent.clear()
        finally:
            self.transport.close()

    def drain(self) -> None:
        """Server shutdown: close now if idle, else after the current transaction."""
        self.draining = True
        if not self.busy and self.state in (State.GREETED, State.READY):
            self.close_with(replies.SHUTTING_DOWN)

    # -- input ---------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        # Only a read that completes a line restarts the timeout (a per-line
        # deadline, as Postfix's smtpd_per_record_deadline): a client that
        # trickles a byte at a time is cut off at the timeout all the same.
        if b"\n" in data:
            self.last_activity = self.server.loop.time()
        if self.closing or self.tls_pending:
            return  # RFC 3207 §4.2: nothing sent before the TLS handshake counts
        if self.state == State.DATA and not self.busy:
            if self._feed_data(data) and self.buffer and not self.busy:
                self._drain_lines()
            return
        self.buffer += data
        if self.busy:
            if len(self.buffer) > MAX_PENDING_INPUT and not self.reading_paused:
                self.transport.pause_reading()
                self.reading_paused = True
            return
        self._drain_lines()

    def _drain_lines(self) -> None:
        out: list[bytes] = []
        self._unsent = out
        buf = self.buffer
        pos = 0
        try:
            while not self.busy and not self.closing:
                if self.state == State.DATA:
                    self.buffer = buf[pos:]
                    if out:
                        self.transport.write(b"".join(out))
                        out.clear()
                    rest, self.buffer = self.buffer, b""
                    if not rest or not self._feed_data(rest):
                        return
                    # The content ended in this read: go on with what follows,
                    # in this loop (recursing once per pipelined message that is
                    # refused at once would exhaust the stack).
                    buf, pos = self.buffer, 0
                    continue
                nl = buf.find(b"\n", pos)
                if nl < 0:
                    if len(buf) - pos > MAX_COMMAND_LINE and len(buf) - pos > self._line_limit(buf, pos):
                        # Drop the over-long line as it comes; answer once it ends.
                        self.discarding = True
                        pos = len(buf)
                    break
                line_end = nl + 1
                if self.discarding:
                    self.discarding = False
                    reply, line = replies.LINE_TOO_LONG, b""
                elif nl == pos or buf[nl - 1] != 13:  # 13 == "\r": this is a bare LF
                    reply, line = replies.BARE_NEWLINE_COMMAND, b""
                else:
                    line = buf[pos:nl - 1]
                    if len(line) + 2 > MAX_COMMAND_LINE and len(line) + 2 > self._line_limit(buf, pos):
                        reply = replies.LINE_TOO_LONG
                    elif b"\r" in line:
                        reply = replies.BARE_NEWLINE_COMMAND
                    else:
                        pos = line_end
                        answer = self._dispatch(line)
                        if answer is None:
                            continue
                        out.append(answer)
                        if answer[0] >= 52:  # "4" or "5": a refusal
                            self.server.count_refusal(self, answer, line)
                            if self._too_many_errors():
                                out.append(replies.TOO_MANY_ERRORS)
                                break
                        continue
                pos = line_end
                out.append(reply)
                if self.state in AUTH_STATES:
                    # A malformed response to a 334 ends the exchange, as a bad
                    # one does (RFC 4954 §4): the next line is a command again.
                    self.state = State.READY
                if self._too_many_errors():
                    out.append(replies.TOO_MANY_ERRORS)
                    break
        except Exception:
            # Errors never escape the hot path: answer a temporary failure.
            log.exception("session [%s]: internal error", self.client_ip)
            out.append(replies.TEMP_LOCAL_ERROR)
            self._reset_transaction()
            if self.state not in (State.GREETED, State.CLOSED):
                self.state = State.READY
        self.buffer = buf[pos:]
        if out and not self.closing:
            self.transport.write(b"".join(out))
            if out[-1] is replies.TOO_MANY_ERRORS:
                self.server.count_refusal(self, replies.TOO_MANY_ERRORS)
                self.closing = True
                self.transport.close()
        out.clear()

    def _too_many_errors(self) -> bool:
        """Count an error reply; True at hard_error_limit (Postfix's smtpd_hard_error_limit):
        the caller then ends the session with TOO_MANY_ERRORS."""
        self.errors += 1
        if self.errors < self.cfg.hard_error_limit:
            return False
        log.info("too many errors (%d) from %s[%s]", self.errors, self.helo or "unknown", self.client_ip)
        return True

    def _line_limit(self, buf: bytes, pos: int) -> int:
        """512 octets, or 12288 for AUTH lines (RFC 4954 §4); asked only of long lines."""
        if self.state in AUTH_STATES:
            return MAX_AUTH_LINE
        return MAX_AUTH_LINE if buf[pos:pos + 5].upper() == b"AUTH " else MAX_COMMAND_LINE

    # -- flow control ------------------------------------------------------------

    def pause_writing(self) -> None:
        # The client pipelines commands without reading the replies: stop
        # reading until it catches up, or the replies pile up in memory.
        self.writing_paused = True
        if not self.reading_paused and not self.closing:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if not self.reading_paused and not self.closing:
            self.transport.resume_reading()

    # -- async replies -----------------------------------------------------------

    def _defer(self, work: Awaitable[bytes]) -> None:
        """Answer later: keep the buffer, stop reading, resume after the reply."""
        self.busy = True
        task = asyncio.ensure_future(work)
        task.add_done_callback(self._deferred_done)

    def _deferred_done(self, task: asyncio.Future[bytes]) -> None:
        try:
            reply = task.result()
        except Exception:
            log.exception("session [%s]: internal error", self.client_ip)
            reply = replies.TEMP_LOCAL_ERROR
            self._reset_transaction()
            self.state = State.READY
        self._resume(reply)

    def _resume(self, reply: bytes) -> None:
        """Send a deferred reply, then go on with what the client pipelined meanwhile."""
        self.busy = False
        if self.closing:
            return
        if reply:
            self.transport.write(reply)
            if reply[0] >= 52:
                self.server.count_refusal(self, reply)
                if self._too_many_errors():
                    self.close_with(replies.TOO_MANY_ERRORS)
        if self.closing:
            return
        if self.draining and self.state in (State.READY, State.GREETED):
            self.close_with(replies.SHUTTING_DOWN)
            return
        if self.reading_paused:
            self.reading_paused = False
            if not self.writing_paused:
                self.transport.resume_reading()
        if self.buffer:
            self._drain_lines()

    # -- commands ------------------------------------------------------------------

    def _dispatch(self, line: bytes) -> bytes | None:
        if self.state in AUTH_STATES:
            return self._auth_continue(line)
        verb, _, arg_bytes = line.partition(b" ")
        handler = _COMMANDS.get(verb.upper())
        self.command = handler
        if handler is None:
            return replies.SYNTAX_ERROR
        try:
            arg = arg_bytes.decode("utf-8")
        except UnicodeDecodeError:
            return replies.BAD_UTF8
        return handler(self, arg)

    def _cmd_helo(self, arg: str) -> bytes | None:
        return self._greet(arg.strip(), esmtp=False)

    def _cmd_ehlo(self, arg: str) -> bytes | None:
        return self._greet(arg.strip(), esmtp=True)

    def _greet(self, name: str, esmtp: bool) -> bytes | None:
        if not name:
            self.close_with(replies.EMPTY_HELO)
            return None
        if not is_valid_helo(name):
            return replies.BAD_HELO
        refusal = self.server.policy.helo_refusal(name, self.client_ip)
        if refusal is not None:
            log.info("reject: EHLO from [%s]: %s: not a qualified identity", self.client_ip, name)
            self.close_with(refusal)
            return None
        self.helo = name
        self.esmtp = esmtp
        self._reset_transaction()
        self.state = State.READY
        hello = f"250-{self.server.hostname} at your service, [{self.client_ip}]\r\n"
        if not esmtp:
            return f"250 {self.server.hostname} at your service, [{self.client_ip}]\r\n".encode()
        return (hello + (self.server.ehlo_tls if self.tls else self.server.ehlo_plain)).encode()

    def _cmd_mail(self, arg: str) -> bytes | None:
        if self.state == State.GREETED:
            return replies.NEED_HELO
        if self.state != State.READY:
            return replies.NESTED_MAIL
        if self.draining:
            self.close_with(replies.SHUTTING_DOWN)
            return None
        parsed = parse_path_argument(arg, "FROM:", allow_null=True)
        if isinstance(parsed, bytes):
            return parsed
        params = parsed.params
        smtputf8 = "SMTPUTF8" in params
        for key, value in params.items():
            if key == "SIZE":
                if not value.isdigit():
                    return replies.reply(501, "5.5.4", "Bad SIZE parameter")
                if int(value) > self.cfg.max_message_size:
                    return replies.MESSAGE_TOO_BIG
                self.declared_size = int(value)
            elif key == "BODY":
                if value.upper() not in ("7BIT", "8BITMIME"):
                    return replies.reply(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")
                # What the client declares is checked, not kept: whether the
                # content is 8-bit is read from the content itself (below), so
                # a declared-8BITMIME message of plain ASCII goes to any next hop.
            elif key == "SMTPUTF8":
                if value:
                    return replies.reply(501, "5.5.4", "SMTPUTF8 takes no value")
            elif key == "AUTH":
                pass  # RFC 4954 §5: accepted, not trusted
            else:
                return replies.UNKNOWN_PARAMETER
        if parsed.non_ascii and not smtputf8:
            return replies.NEED_SMTPUTF8
        sender = normalize_address(parsed.address) if parsed.address else ""
        facts = SessionFacts(self.client_ip, self.helo, self.tls, self.auth_user)
        decision = self.server.policy.decide(facts, sender)
        if not decision.allowed:
            log.info(
                "NOQUEUE: reject: MAIL from %s[%s]: %s; from=<%s> helo=<%s> auth=%s tls=%s",
                self.helo, self.client_ip, decision.reply[:3].decode(), sender, self.helo,
                self.auth_user or "-", "yes" if self.tls else "no",
            )
            log.info("NOQUEUE: reason: %s", decision.reason)
            return decision.reply
        self.decision = decision
        if self.server.quota is not None:
            self.quota_txn = self.server.quota.begin(decision, self.recipients)
        self.sender = decision.sender
        self.smtputf8 = smtputf8
        self.state = State.MAIL
        log.info("accept: MAIL from %s[%s]: %s (identified by %s); from=<%s> helo=<%s> auth=%s tls=%s",
                 self.helo, self.client_ip, decision.reason, decision.identified_by, sender,
                 self.helo, self.auth_user or "-", "yes" if self.tls else "no")
        if decision.original_sender is not None:
            log.info("rewrite: from=<%s> to=<%s> client=[%s] account=%s rule=%s",
                     decision.original_sender, decision.sender, self.client_ip,
                     decision.account.name if decision.account else "-",
                     decision.rule.name if decision.rule else "-")
        return replies.SENDER_OK

    def _cmd_rcpt(self, arg: str) -> bytes | None:
        if self.state != State.MAIL:
            return replies.NEED_MAIL if self.state in (State.READY, State.GREETED) else replies.BAD_SEQUENCE
        parsed = parse_path_argument(arg, "TO:", allow_null=False)
        if isinstance(parsed, bytes):
            return parsed
        for key in parsed.params:
            if key not in ("NOTIFY", "ORCPT"):
                return replies.UNKNOWN_PARAMETER
        if parsed.non_ascii and not self.smtputf8:
            return replies.NEED_SMTPUTF8
        decision = self.decision
        assert decision is not None
        rcpt = normalize_address(parsed.address)
        if decision.original_sender == "" or (not self.sender and decision.original_sender is None):
            # The null sender, even rewritten: one recipient only.
            if self.recipients:
                return self._rcpt_verdict(rcpt, replies.NULL_SENDER_ONE_RCPT)
        quota, txn = self.server.quota, self.quota_txn
        if quota is None or txn is None:
            # No quota book (an in-process harness): the configured transaction limit still holds.
            if len(self.recipients) >= self.server.config.limits.active.recipients_per_transaction:
                return replies.TOO_MANY_RCPTS
            self.recipients.append(rcpt)
            return replies.RCPT_OK
        result = quota.check_recipient(txn, rcpt)
        if isinstance(result, bytes) or result is None:
            return self._rcpt_verdict(rcpt, result)
        self._defer(self._rcpt_async(rcpt, result))
        return None

    async def _rcpt_async(self, rcpt: str, pending: Awaitable[bytes | None]) -> bytes:
        return self._rcpt_verdict(rcpt, await pending)

    def _rcpt_verdict(self, rcpt: str, refusal: bytes | None) -> bytes:
        if refusal is not None:
            log.info("NOQUEUE: reject: RCPT from %s[%s]: %s from=<%s> to=<%s>",
                     self.helo, self.client_ip, refusal.decode(errors="replace").strip(), self.sender, rcpt)
            return refusal
        self.recipients.append(rcpt)
        return replies.RCPT_OK

    def _cmd_data(self, arg: str) -> bytes | None:
        if arg:
            return replies.ARGS_NOT_ALLOWED
        if self.state != State.MAIL:
            return replies.NEED_MAIL if self.state in (State.READY, State.GREETED) else replies.BAD_SEQUENCE
        if not self.recipients:
            return replies.NO_VALID_RECIPIENTS
        server = self.server
        limit = server.data_memory_limit
        if server.data_bytes >= limit or server.data_bytes + self.declared_size > limit:
            # Say so before the client sends it all (it keeps the transaction
            # and may try DATA again, or come back later).
            self._log_data_refusal(self._memory_full())
            return replies.DATA_MEMORY_FULL
        # The content state (chunks, scan, tail) was reset when the last
        # transaction ended: every end goes through _reset_transaction.
        self.state = State.DATA
        return replies.START_DATA

    def _cmd_rset(self, arg: str) -> bytes | None:
        if arg:
            return replies.ARGS_NOT_ALLOWED
        self._reset_transaction()
        if self.state != State.GREETED:
            self.state = State.READY
        return replies.RESET_OK

    def _cmd_noop(self, arg: str) -> bytes | None:
        return replies.NOOP_OK

    def _cmd_quit(self, arg: str) -> bytes | None:
        self.close_with(f"221 2.0.0 {self.server.hostname} closing connection\r\n".encode())
        return None

    def _cmd_vrfy(self, arg: str) -> bytes | None:
        if not arg:
            return replies.reply(501, "5.5.4", "VRFY needs an argument")
        return replies.VRFY_CANNOT

    def _cmd_expn(self, arg: str) -> bytes | None:
        return replies.EXPN_DISABLED

    def _cmd_help(self, arg: str) -> bytes | None:
        return replies.reply(
            214, "2.0.0",
            "Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS AUTH\n"
            "See docs/clients.md in the fastrelay documentation",
        )

    # -- STARTTLS (RFC 3207) -------------------------------------------------------

    def _cmd_starttls(self, arg: str) -> bytes | None:
        if arg:
            return replies.ARGS_NOT_ALLOWED
        if self.tls:
            return replies.ALREADY_TLS
        context = self.server.tls_context
        if context is None:
            return replies.NOT_IMPLEMENTED
        if self.state == State.GREETED:
            return replies.NEED_HELO
        # RFC 3207 §4.2: discard anything pipelined behind STARTTLS (CVE-2011-0411).
        self.buffer = b""
        self.tls_pending = True
        self.busy = True
        asyncio.ensure_future(self._start_tls(context))
        # Returned, not written: replies pipelined before STARTTLS go out first.
        # The handshake starts after this read's replies are written.
        return replies.READY_TLS

    async def _start_tls(self, context: ssl.SSLContext) -> None:
        loop = self.server.loop
        try:
            transport = await loop.start_tls(
                self.transport, self, context, server_side=True,
                ssl_handshake_timeout=self.cfg.tls_handshake_timeout,
            )
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            log.info("STARTTLS from [%s] failed: %s", self.client_ip, exc)
            self.closing = True
            self.transport.close()
            return
        if transport is None:
            self.closing = True
            return
        self.transport = transport
        # A pause_writing of the plain transport now belongs to the TLS layer:
        # flow control starts over with the new transport.
        self.writing_paused = False
        self.tls = True
        self.tls_pending = False
        self.busy = False
        self.tls_info = _tls_description(transport)
        # RFC 3207 §4.2: the session starts over; the client must EHLO again.
        self.helo = ""
        self.auth_user = None
        self._reset_transaction()
        self.state = State.GREETED
        self.buffer = b""
        self.last_activity = loop.time()
        log.info("STARTTLS from [%s]: %s", self.client_ip, self.tls_info)

    # -- AUTH (RFC 4954) -----------------------------------------------------------

    def _cmd_auth(self, arg: str) -> bytes | None:
        if not self.tls:
            return replies.NEED_STARTTLS
        if self.state == State.GREETED or not self.esmtp:
            return replies.NEED_HELO
        if self.auth_user is not None:
            return replies.ALREADY_AUTH
        if self.state != State.READY:
            return replies.AUTH_IN_TRANSACTION
        if self.server.auth_throttle.locked(self.client_key, time.monotonic()):
            return replies.AUTH_LOCKED_OUT
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper()
        if mechanism == "PLAIN":
            if not initial:
                self.state = State.AUTH_PLAIN
                return b"334 \r\n"
            return self._auth_plain(initial)
        if mechanism == "LOGIN":
            if initial:
                return self._auth_login_username(initial)
            self.state = State.AUTH_LOGIN_USER
            return b"334 VXNlcm5hbWU6\r\n"  # "Username:"
        return replies.UNKNOWN_MECHANISM

    def _auth_continue(self, line: bytes) -> bytes | None:
        state = self.state
        self.state = State.READY
        if line == b"*":
            return replies.AUTH_CANCELLED
        text = line.decode("ascii", "replace")
        if state == State.AUTH_PLAIN:
            return self._auth_plain(text)
        if state == State.AUTH_LOGIN_USER:
            return self._auth_login_username(text)
        return self._auth_login_password(text)

    def _auth_plain(self, b64: str) -> bytes | None:
        decoded = _b64decode(b64)
        if decoded is None:
            return replies.BAD_BASE64
        parts = decoded.split(b"\0")
        if len(parts) != 3:
            return replies.BAD_BASE64
        authzid, authcid, password = (p.decode("utf-8", "replace") for p in parts)
        if authzid and authzid.lower() != authcid.lower():
            # No sending as someone else: the authorization identity must be the user.
            self._auth_failed(authcid, "authorization identity differs")
            return replies.AUTH_IDENTITY_MISMATCH
        self._verify(authcid, password)
        return None

    def _auth_login_username(self, b64: str) -> bytes | None:
        decoded = _b64decode(b64)
        if decoded is None:
            return replies.BAD_BASE64
        self._auth_login_user = decoded.decode("utf-8", "replace")
        self.state = State.AUTH_LOGIN_PASS
        return b"334 UGFzc3dvcmQ6\r\n"  # "Password:"

    def _auth_login_password(self, b64: str) -> bytes | None:
        decoded = _b64decode(b64)
        if decoded is None:
            return replies.BAD_BASE64
        self._verify(self._auth_login_user, decoded.decode("utf-8", "replace"))
        return None

    def _verify(self, username: str, password: str) -> None:
        self._defer(self._verify_async(username, password))

    async def _verify_async(self, username: str, password: str) -> bytes:
        user = await self.server.passwords.verify(self.server.policy.directory, username, password)
        if user is None:
            delay = self._auth_failed(username, "bad credentials")
            if delay:
                await asyncio.sleep(delay)
            return replies.AUTH_FAILED
        self.server.auth_throttle.succeed(self.client_key)
        self.auth_user = user.address
        log.info("auth: [%s] authenticated as %s", self.client_ip, user.address)
        return replies.AUTH_OK

    def _auth_failed(self, username: str, why: str) -> float:
        # The name is the client's: quoted and escaped (repr), and cut, since
        # an AUTH line may carry 12 KB of it.
        shown = repr(username[:MAX_LOGGED_USER]) + (f" (+{len(username) - MAX_LOGGED_USER} characters)"
                                                     if len(username) > MAX_LOGGED_USER else "")
        log.warning("auth: [%s] failed for %s: %s", self.client_ip, shown, why)
        self.server.counters["auth_failures"] += 1
        return self.server.auth_throttle.fail(self.client_key, time.monotonic())

    # -- DATA ------------------------------------------------------------------------

    def _feed_data(self, data: bytes) -> bool:
        """Collect message content until <CR><LF>.<CR><LF> (RFC 5321 §4.1.1.4).

        True when the content ended; the bytes after it are then in self.buffer."""
        tail = self.tail
        # Look across the read boundary in a few bytes, then in the read
        # itself, so a large message is never copied just to be searched.
        window = tail + data[:4]
        found = window.find(b"\r\n.\r\n")
        if found < 0:
            found = find_end_of_data(data)
            if found >= 0:
                found += len(tail)
        if found < 0:
            self._store(data)
            self.tail = data[-4:] if len(data) >= 4 else (tail + data)[-4:]
            return False
        # Content ends with the CRLF that starts the terminator.
        cut = found + 2 - len(tail)
        if cut >= 0:
            # A view, not a copy: a message that came in one read (most do, up to
            # the loop's 256 KiB read buffer) then reaches the spool uncopied.
            self._store(memoryview(data)[:cut] if cut < len(data) else data)
        else:
            self._unstore(-cut)
        rest = data[found + 5 - len(tail):]
        self._end_of_data()
        if rest:
            self.buffer = rest + self.buffer
        return True

    def _store(self, data: bytes | memoryview) -> None:
        if self.dropped is not None or not data:
            return
        n = len(data)
        self.data_size += n
        # RFC 1870: the size excludes the doubled dots, and up to ".\r" of the
        # terminator may be stored before it is recognised; the exact check is
        # on the unstuffed content in _end_of_data.  A dot-stuffed stream is at
        # most 4/3 of its content ("." -> "..\r\n").
        if self.data_size > self.cfg.max_message_size + self.cfg.max_message_size // 3 + 4:
            # Keep reading to the end of DATA but stop buffering (RFC 5321 §4.5.3.1.10).
            self._drop(replies.MESSAGE_TOO_BIG, "message too big")
            return
        server = self.server
        if server.data_bytes + n > server.data_memory_limit:
            self._drop(replies.DATA_MEMORY_FULL, self._memory_full())
            return
        server.data_bytes += n
        self.held += n
        if not self.rescan:
            # Scanned as it comes, while the client is still sending, rather
            # than after its last byte, when it waits for the reply.
            self.content_scan.feed(data)
        chunks = self.chunks
        if chunks and n < SMALL_READ and len(chunks[-1]) < MERGED_READS:
            # A client writing small pieces would otherwise cost a Python object
            # (~40 bytes, not counted in max_data_memory) per read of a few bytes.
            last = chunks[-1]
            if type(last) is not bytearray:
                last = chunks[-1] = bytearray(last)
            last += data
            return
        chunks.append(data)

    def _memory_full(self) -> str:
        server = self.server
        return (f"too much mail in transit: {server.data_bytes} bytes in memory "
                f"(server.max_data_memory = {server.data_memory_limit})")

    def _drop(self, reply: bytes, why: str) -> None:
        self.dropped = (reply, why)
        self._release_content()

    def _unstore(self, n: int) -> None:
        if self.dropped is not None:
            return
        content = b"".join(self.chunks)
        self.chunks = [content[:-n]]
        self.rescan = True
        self.data_size -= n
        self.held -= n
        self.server.data_bytes -= n

    def _end_of_data(self) -> None:
        if self.dropped is not None:
            self._finish_transaction(*self.dropped)
            return
        chunks = self.chunks
        # The content keeps its share of max_data_memory until the spool has
        # written it (_reset_transaction gives it back): under a burst of
        # large messages it is the spool's pending batch that holds them.
        self.chunks = []
        # After _unstore the content is one chunk, scanned again whole.
        flags = scan_content(chunks[0]) if self.rescan else self.content_scan.finish()
        if flags & (CONTENT_BARE_NEWLINE | CONTENT_LEADING_DOT):
            text = bytes(chunks[0]) if len(chunks) == 1 else b"".join(chunks)
            if flags & CONTENT_BARE_NEWLINE:
                # A bare CR or LF could make a next hop see a different message
                # end (SMTP smuggling).  "normalize" takes a bare LF as CRLF; a
                # bare CR is refused either way.
                crlf = text.count(b"\r\n")
                if self.cfg.bare_newline == "reject" or text.count(b"\r") != crlf:
                    self._finish_transaction(replies.BARE_NEWLINE_DATA, "bare CR or LF in content")
                    return
                text = text.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            if flags & CONTENT_LEADING_DOT:
                # RFC 5321 §4.5.2: remove the leading dot of every line that has one
                # (the first line by hand: a CRLF put in front would copy the content twice).
                text = text.replace(b"\r\n.", b"\r\n")
                if text[:1] == b".":
                    text = text[1:]
                self.dot_lines = True
            chunks = [text]
        # Otherwise the content goes to the spool as it was read, in pieces
        # (pwritev): joining a large message would copy it while its client waits.
        self.body_8bit = bool(flags & CONTENT_8BIT)
        size = sum(map(len, chunks))
        if size > self.cfg.max_message_size:
            self._finish_transaction(replies.MESSAGE_TOO_BIG, "message too big")
            return
        if _hop_count(chunks) >= self.cfg.max_hops:
            self._finish_transaction(replies.TOO_MANY_HOPS, f"too many hops (max_hops = {self.cfg.max_hops})")
            return
        if flags & CONTENT_LONG_LINE:
            why = f"a line longer than {MAX_CONTENT_LINE} octets"
            if self.cfg.long_lines == "reject":
                self._finish_transaction(replies.LONG_LINE_DATA, why)
                return
            log.info("DATA from %s[%s]: %s, passed as it is (server.long_lines = accept); from=<%s>",
                     self.helo, self.client_ip, why, self.sender)
        self._queue(chunks, size)

    def _finish_transaction(self, reply: bytes, why: str) -> None:
        self.server.count_refusal(self, reply)
        self._log_data_refusal(why)
        self._reset_transaction()
        self.state = State.READY
        self.transport.write(reply)
        if self._too_many_errors():
            self.close_with(replies.TOO_MANY_ERRORS)

    def _log_data_refusal(self, why: str) -> None:
        log.info("NOQUEUE: reject: DATA from %s[%s]: %s; from=<%s> nrcpt=%d",
                 self.helo, self.client_ip, why, self.sender, len(self.recipients))

    def _queue(self, content: list[bytes | bytearray | memoryview], size: int) -> None:
        """End of DATA: count the quota, write the spool, answer when durable.

        With the local quota everything up to the spool write is synchronous
        and the reply rides on the spool future's callback: no Task per
        message.  A remote quota (Redis) needs a coroutine."""
        quota, txn = self.server.quota, self.quota_txn
        if quota is not None and txn is not None:
            if not isinstance(quota, QuotaBook):
                self._defer(self._queue_after_remote_quota(quota, txn, content, size))
                return
            refusal = quota.reserve(txn)
            if refusal is not None:
                self._finish_transaction(refusal, "quota: " + refusal.decode(errors="replace").strip())
                return
        envelope, header = self._envelope()
        self.busy = True
        future = self.server.spool.append_message(envelope, (header, *content))
        future.add_done_callback(partial(self._on_spooled, envelope, len(header) + size))

    def _on_spooled(self, envelope: Envelope, size: int, future: asyncio.Future[Location | None]) -> None:
        try:
            reply = self._spooled(envelope, size, future)
        except Exception:
            # Errors never escape the hot path (nor leave the session busy).
            log.exception("%s: internal error after the spool write", envelope.queue_id)
            reply = replies.TEMP_LOCAL_ERROR
            self._reset_transaction()
            self.state = State.READY
        self._resume(reply)

    async def _queue_after_remote_quota(self, quota: RedisQuotaBook, txn: QuotaTxn,
                                        content: list[bytes | bytearray | memoryview], size: int) -> bytes:
        refusal = await quota.reserve(txn)
        if refusal is not None:
            self._finish_transaction(refusal, "quota: " + refusal.decode(errors="replace").strip())
            return b""
        envelope, header = self._envelope()
        future = self.server.spool.append_message(envelope, (header, *content))
        await asyncio.wait([future])
        return self._spooled(envelope, len(header) + size, future)

    def _envelope(self) -> tuple[Envelope, bytes]:
        decision = self.decision
        assert decision is not None
        queue_id = self.server.queue_ids.next()
        now = time.time()
        envelope = Envelope(
            queue_id=queue_id, arrival=now, client_ip=self.client_ip, client_helo=self.helo,
            sender=self.sender, recipients=self.recipients, auth_user=self.auth_user,
            original_sender=decision.original_sender, tls=self.tls_info,
            account=decision.account.name if decision.account else None,
            rule=decision.rule.name if decision.rule else None,
            smtputf8=self.smtputf8, body_8bit=self.body_8bit, dot_lines=self.dot_lines,
        )
        return envelope, self._received_header(queue_id, now)

    def _spooled(self, envelope: Envelope, size: int, future: asyncio.Future[Location | None]) -> bytes:
        """The spool write finished: the reply to send, and the hand-off to delivery."""
        server = self.server
        decision = self.decision
        assert decision is not None
        queue_id = envelope.queue_id
        try:
            location = future.result()
        except SpoolError as exc:
            quota, txn = server.quota, self.quota_txn
            if quota is not None and txn is not None:
                quota.release(txn)
            log.error("%s: spool write failed: %s; answered 452", queue_id, exc)
            self._reset_transaction()
            self.state = State.READY
            return replies.STORAGE_FULL
        server.counters["messages"] += 1
        server.counters["recipients"] += len(self.recipients)
        log.info("%s: client=%s[%s]%s%s", queue_id, self.helo, self.client_ip,
                 f", sasl_username={self.auth_user}" if self.auth_user else "",
                 f", orig_from=<{decision.original_sender}>" if decision.original_sender is not None else "")
        log.info("%s: from=<%s>, size=%d, nrcpt=%d, account=%s, rule=%s (queue active)",
                 queue_id, self.sender, size, len(self.recipients), envelope.account, envelope.rule)
        if events.enabled():
            events.emit("reception", queue_id=queue_id, client_ip=self.client_ip, helo=self.helo,
                        sender=self.sender, recipients=self.recipients, size=size, account=envelope.account,
                        rule=envelope.rule, auth_user=self.auth_user, tls=self.tls_info,
                        original_sender=decision.original_sender)
        self._reset_transaction()
        self.state = State.READY
        if server.on_queued is not None and location is not None:
            # The hand-off runs after this reply is written: the 250 never
            # waits for the stages behind the spool (a synchronous scan, the
            # start of a delivery attempt), nor do the other 250s of its batch.
            server.loop.call_soon(server.on_queued, envelope, location)
        return b"250 2.0.0 Ok: queued as " + queue_id.encode() + b"\r\n"

    def _received_header(self, queue_id: str, now: float) -> bytes:
        # RFC 5321 §4.4 trace field; "with" keywords from RFC 3848.
        protocol = "ESMTP" if self.esmtp else "SMTP"
        if self.tls:
            protocol += "S"
        if self.auth_user:
            protocol += "A"
        lines = [f"Received: from {self.helo} (unknown [{self.client_ip}])"]
        if self.tls_info:
            lines.append(f"\t(using {self.tls_info})")
        if self.auth_user:
            lines.append(f"\t(Authenticated sender: {self.auth_user})")
        lines.append(f"\tby {self.server.hostname} (fastrelay) with {protocol} id {queue_id}")
        stamp = _received_date(now)
        if len(self.recipients) == 1:
            lines.append(f"\tfor <{self.recipients[0]}>; {stamp}")
        else:
            lines[-1] += ";"
            lines.append(f"\t{stamp}")
        return ("\r\n".join(lines) + "\r\n").encode("utf-8")


_COMMANDS: dict[bytes, Callable[[SmtpSession, str], bytes | None]] = {
    b"HELO": SmtpSession._cmd_helo,
    b"EHLO": SmtpSession._cmd_ehlo,
    b"MAIL": SmtpSession._cmd_mail,
    b"RCPT": SmtpSession._cmd_rcpt,
    b"DATA": SmtpSession._cmd_data,
    b"RSET": SmtpSession._cmd_rset,
    b"NOOP": SmtpSession._cmd_noop,
    b"QUIT": SmtpSession._cmd_quit,
    b"VRFY": SmtpSession._cmd_vrfy,
    b"EXPN": SmtpSession._cmd_expn,
    b"HELP": SmtpSession._cmd_help,
    b"STARTTLS": SmtpSession._cmd_starttls,
    b"AUTH": SmtpSession._cmd_auth,
}


# The stage of a refusal (metrics.py's "stage" label): the command being answered.
_STAGES: dict[Any, str] = {handler: verb.decode() for verb, handler in _COMMANDS.items()}
_STAGES["CONNECT"] = "CONNECT"
_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


_date_cache: tuple[int, str] = (0, "")


def _received_date(now: float) -> str:
    """RFC 5322 date for the Received: header, formatted once per second."""
    global _date_cache
    second = int(now)
    if _date_cache[0] != second:
        _date_cache = (second, email.utils.formatdate(second, localtime=True))
    return _date_cache[1]


def _b64decode(text: str) -> bytes | None:
    try:
        # Only base64 is allowed (RFC 4954 §4); blanks around it are forgiven.
        return base64.b64decode(text.strip(" \t"), validate=True)
    except (binascii.Error, ValueError):
        return None


def _hop_count(content: list[bytes | bytearray | memoryview]) -> int:
    """Received: headers in the header section (RFC 5321 §6.3 loop detection)."""
    first = content[0] if content else b""
    # A view is always of the start of a read (see _feed_data): search its bytes.
    data, size = (first.obj, len(first)) if isinstance(first, memoryview) else (first, len(first))
    assert isinstance(data, (bytes, bytearray))
    end = data.find(b"\r\n\r\n", 0, size)
    if end < 0 and size < HEADER_SCAN_LIMIT and len(content) > 1:
        # The header section goes on past the first read: look at the start of the whole.
        joined = bytearray()
        for part in content:
            joined += part
            if len(joined) >= HEADER_SCAN_LIMIT:
                break
        data, size = joined, len(joined)
        end = data.find(b"\r\n\r\n", 0, size)
    head = data[:end if end >= 0 else min(size, HEADER_SCAN_LIMIT)].lower()
    return head.count(b"\r\nreceived:") + head.startswith(b"received:")


def _tls_description(transport: Any) -> str | None:
    obj = transport.get_extra_info("ssl_object")
    if obj is None:
        return None
    cipher = obj.cipher()
    if cipher:
        return f"{obj.version()} with cipher {cipher[0]} ({cipher[2]}/{cipher[2]} bits)"
    return str(obj.version())
