"""Outbound SMTP: the client protocol, one transaction's outcomes, the idle-connection cache.

The protocol (``ReplyReader``) only feeds bytes into a buffer and cuts
complete replies out of it (RFC 5321 §4.2: ``code-text`` continuation lines,
``code text`` last line); a delivery coroutine writes commands and awaits the
number of replies it expects.  With PIPELINING (RFC 2920) that is one write of
``[RSET] MAIL RCPT... DATA`` and one wait for all their replies; without it,
one command at a time.

``OutboundConnection.open`` connects, reads the greeting, says EHLO (HELO if
EHLO is refused, RFC 5321 §3.2), upgrades with STARTTLS (RFC 3207) as the
route's TLS policy says, then authenticates (RFC 4954, PLAIN or LOGIN) when the
route has credentials.  Failures at that stage are ``HopError``: the caller
tries the next MX host.  ``OutboundConnection.send`` runs transactions and
returns one ``RecipientResult`` per recipient; a 452 answer to RCPT after
other recipients were accepted means "too many recipients" (RFC 5321
§4.5.3.1.10) and those recipients go in a following transaction on the same
connection.

TLS policies (``[[delivery.routes]] tls``):

* ``none``           never STARTTLS;
* ``opportunistic``  STARTTLS when offered, certificate not checked; a failed
  handshake is retried once in plaintext (as Postfix's "may" level);
* ``required``       no STARTTLS offered (or a failed handshake) defers the mail;
* ``verify``         as required, and the certificate must chain to
  ``delivery.ca_file`` (or the system store) and name the host.

Credentials are only sent inside TLS, unless the route says ``tls = "none"``.

Config keys read (through ``ClientSettings``): server.hostname (the EHLO
name), delivery.connect_timeout (30 s), delivery.command_timeout (300 s),
delivery.ca_file, delivery.connection_idle_time (5 s), and each route's tls,
username and password.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import re
import ssl
from dataclasses import dataclass
from typing import Literal, NamedTuple

from .logs import MailLog, printable
from .routing import NextHop

log = MailLog("fastrelay.smtp_client")

# RFC 5321 §4.5.3.1.5 caps reply lines at 512 octets; allow generous slack
# before calling a peer broken.
MAX_REPLY_LINE = 8192
# A multi-line reply longer than this (an EHLO reply is well under 1 KiB), or
# more complete replies waiting than were asked for, means a broken or
# hostile next hop: any MX on the internet could otherwise make the relay
# buffer what it sends until the command timeout.
MAX_REPLY_BYTES = 64 * 1024
MAX_UNASKED_REPLIES = 4
# RFC 3463 enhanced status code at the start of a reply text.
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s|$)")

TlsPolicy = Literal["none", "opportunistic", "required", "verify"]


class Reply(NamedTuple):
    """One complete server reply."""

    code: int
    lines: tuple[str, ...]

    @property
    def dsn(self) -> str:
        """The enhanced status code, or one derived from the reply class."""
        m = _ENHANCED.match(self.lines[0]) if self.lines else None
        if m and m.group(1) == str(self.code // 100):
            return f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
        return f"{self.code // 100}.0.0"

    def __str__(self) -> str:
        return f"{self.code} {' '.join(line.strip() for line in self.lines)}".strip()


class ConnectionLost(Exception):
    """The peer closed the connection (or broke the protocol) while replies were awaited."""

    def __init__(self, text: str, received: list[Reply] | None = None) -> None:
        super().__init__(text)
        self.received = received or []   # replies of the current wait that did arrive


class HopError(Exception):
    """A next hop could not be used (connect, greeting, EHLO, TLS, AUTH): try the next one."""

    def __init__(self, text: str, dsn: str = "4.4.1", reply: Reply | None = None,
                 tls_failed: bool = False) -> None:
        super().__init__(text)
        self.text = text
        self.dsn = dsn
        self.reply = reply
        self.tls_failed = tls_failed


class StaleConnection(Exception):
    """A cached connection turned out dead before the transaction began: safe to retry."""


class Outcome(enum.Enum):
    SENT = "sent"
    DEFERRED = "deferred"
    BOUNCED = "bounced"


class RecipientResult(NamedTuple):
    """What happened to one recipient in one attempt."""

    outcome: Outcome
    dsn: str                 # RFC 3463 status, e.g. "2.0.0", "4.4.1", "5.1.1"
    detail: str              # the text inside Postfix's status=...(detail)
    reply: Reply | None = None   # the remote reply, for the DSN's Diagnostic-Code
    remote: str = ""         # the remote MTA's host name, for the DSN's Remote-MTA


def result_from_reply(reply: Reply, hop: NextHop, command: str) -> RecipientResult:
    """Classify a reply to MAIL, RCPT or DATA for a recipient (RFC 5321 §4.2.1)."""
    if 200 <= reply.code < 300:
        return RecipientResult(Outcome.SENT, reply.dsn, str(reply), reply, hop.hostname)
    outcome = Outcome.DEFERRED if reply.code < 500 else Outcome.BOUNCED
    detail = f"host {hop.hostname}[{hop.address}] said: {reply} (in reply to {command} command)"
    return RecipientResult(outcome, reply.dsn, detail, reply, hop.hostname)


def deferred(text: str, dsn: str = "4.4.1", remote: str = "", reply: Reply | None = None) -> RecipientResult:
    return RecipientResult(Outcome.DEFERRED, dsn, text, reply, remote)


def bounced(text: str, dsn: str, remote: str = "", reply: Reply | None = None) -> RecipientResult:
    return RecipientResult(Outcome.BOUNCED, dsn, text, reply, remote)


def dot_stuff(body: bytes, dot_lines: bool = True) -> bytes:
    """Message content as sent after DATA, without the final ``.`` line.

    RFC 5321 §4.5.2: a line that starts with "." gets one more "."; the content
    must end with CRLF so that ``.CRLF`` forms the terminator.  ``dot_lines``
    False says no line starts with "." (the server saw it on reception), which
    spares a search through the whole body.
    """
    if body[:1] == b".":
        body = b"." + body
    if dot_lines and b"\r\n." in body:
        body = body.replace(b"\r\n.", b"\r\n..")
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """How to talk to one destination."""

    helo: str
    connect_timeout: float
    command_timeout: float
    tls: TlsPolicy = "opportunistic"
    tls_context: ssl.SSLContext | None = None   # None with tls = "none"
    username: str = ""
    password: str = ""


def client_tls_context(policy: TlsPolicy, ca_file: str = "") -> ssl.SSLContext | None:
    """The SSL context for a TLS policy (one per policy, shared by all connections)."""
    if policy == "none":
        return None
    if policy == "verify":
        ctx = ssl.create_default_context(cafile=ca_file or None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx
    # Opportunistic and "required" encrypt against passive eavesdropping only
    # (RFC 7435): an unverifiable certificate is still better than plaintext.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# A next hop answers the same pipelined MAIL/RCPT/DATA with the same bytes every
# time (only the final reply carries a queue id): a read seen before is not cut
# and decoded again.  Replies are immutable, so every connection shares them.
REMEMBERED_READS = 256        # distinct reads kept (all forgotten when full)
REMEMBERED_READ_MAX = 512     # longer reads are never kept
_REPLIES_OF_READ: dict[bytes, tuple[Reply, ...]] = {}


class ReplyReader(asyncio.Protocol):
    """Client side of one connection: cuts server replies out of the byte stream."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buffer = bytearray()
        self._lines: list[str] = []
        self._reply_bytes = 0             # the bytes of the lines in self._lines
        self._replies: list[Reply] = []
        self._want = 0
        self._waiter: asyncio.Future[list[Reply]] | None = None
        self._lost: ConnectionLost | None = None
        # The deadline of the current wait.  One timer per connection follows it
        # lazily (re-armed only when it fires early), instead of an
        # asyncio.timeout per command, which cost 5 us each.
        self.deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        whole = not buffer and not self._lines
        if whole:
            known = _REPLIES_OF_READ.get(data)
            if known is not None:
                self._replies += known
                if not self._too_many_unasked():
                    self._wake()
                return
        elif buffer:
            buffer += data
            data = bytes(buffer)
            buffer.clear()
        # Whole lines, split at once (a read usually holds whole replies);
        # the last piece is an unfinished line, kept for the next read.
        *lines, rest = data.split(b"\n")
        first = len(self._replies)
        for line in lines:
            if line[-1:] == b"\r":
                line = line[:-1]
            sep = line[3:4]
            # RFC 5321 §4.2: the first digit is 2 to 5 (1yz is never used in SMTP, but harmless).
            if len(line) < 3 or not line[:3].isdigit() or line[:1] == b"0" or line[:1] > b"5" \
                    or sep not in (b"", b" ", b"-"):
                self._fail(ConnectionLost(f"malformed reply line {line[:60]!r}", self._replies))
                return
            # Anyone's text, bound for the log, bounces and the queue listing: a bare CR
            # would split a header field of the bounce, an escape reach a terminal.
            self._lines.append(printable(line[4:].decode("utf-8", "replace"), "?"))
            if sep != b"-":
                self._replies.append(Reply(int(line[:3]), tuple(self._lines)))
                self._lines = []
                self._reply_bytes = 0
            else:
                self._reply_bytes += len(line)
                if self._reply_bytes > MAX_REPLY_BYTES:
                    self._fail(ConnectionLost(f"reply too long (over {MAX_REPLY_BYTES} bytes)", self._replies))
                    return
        if self._too_many_unasked():
            return
        if whole and not rest and not self._lines and len(data) <= REMEMBERED_READ_MAX:
            if len(_REPLIES_OF_READ) >= REMEMBERED_READS:
                _REPLIES_OF_READ.clear()
            _REPLIES_OF_READ[data] = tuple(self._replies[first:])
        buffer += rest
        if len(buffer) > MAX_REPLY_LINE:
            self._fail(ConnectionLost("reply line too long", self._replies))
            return
        self._wake()

    def _too_many_unasked(self) -> bool:
        asked = self._want if self._waiter is not None else 0
        if len(self._replies) - asked <= MAX_UNASKED_REPLIES:
            return False
        self._fail(ConnectionLost(f"replies nobody asked for: {len(self._replies)} where {asked} were awaited",
                                  self._replies))
        return True

    @property
    def idle(self) -> bool:
        """No reply arrived that nobody asked for."""
        return not self._replies and not self._lines and not self._buffer

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and len(self._replies) >= self._want:
            self._waiter = None
            got = self._replies[:self._want]
            del self._replies[:self._want]
            if not waiter.done():
                waiter.set_result(got)

    def expect(self, count: int, timeout: float) -> asyncio.Future[list[Reply]]:
        """A future for the next ``count`` replies; TimeoutError after ``timeout`` seconds."""
        fut: asyncio.Future[list[Reply]] = self.loop.create_future()
        if self._lost is not None and len(self._replies) < count:
            fut.set_exception(ConnectionLost(str(self._lost), self._replies))
            return fut
        self._want = count
        self._waiter = fut
        self._wake()
        if self._waiter is not None:
            self.deadline = self.loop.time() + timeout
            if self._timer is None:
                self._timer = self.loop.call_at(self.deadline, self._check_deadline)
        return fut

    def _check_deadline(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or self.closed:
            return   # nothing awaited now: the next expect arms the timer again
        if self.loop.time() < self.deadline:
            self._timer = self.loop.call_at(self.deadline, self._check_deadline)
            return
        self._waiter = None
        if not waiter.done():
            waiter.set_exception(TimeoutError())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._fail(ConnectionLost(f"lost connection ({exc})" if exc else "lost connection", self._replies))

    def _fail(self, error: ConnectionLost) -> None:
        self.closed = True
        if self._lost is None:
            self._lost = error
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()


class OutboundConnection:
    """One SMTP client connection to a next hop, ready for transactions."""

    def __init__(self, hop: NextHop, reader: ReplyReader, settings: ClientSettings) -> None:
        self.hop = hop
        self.reader = reader
        self.settings = settings
        self.extensions: dict[str, str] = {}
        self.tls: str | None = None       # e.g. "TLSv1.3" once STARTTLS succeeded
        self.transactions = 0             # transactions begun on this connection
        # The last transaction ended with the reply to its final dot, and the
        # connection has not waited in the cache since: the server is ready
        # for MAIL and no RSET is needed to prove the connection alive.
        self.ready_for_mail = True

    # -- opening -------------------------------------------------------------------

    @classmethod
    async def open(cls, hop: NextHop, settings: ClientSettings) -> OutboundConnection:
        """Connect and greet; with an opportunistic policy, fall back to plaintext if TLS fails."""
        try:
            return await cls._open(hop, settings, use_tls=settings.tls != "none")
        except HopError as exc:
            if not (exc.tls_failed and settings.tls == "opportunistic"):
                raise
            log.info("%s; trying again in plaintext", exc.text)
            return await cls._open(hop, settings, use_tls=False)

    @classmethod
    async def _open(cls, hop: NextHop, settings: ClientSettings, use_tls: bool) -> OutboundConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(settings.connect_timeout):
                _, reader = await loop.create_connection(lambda: ReplyReader(loop), hop.address, hop.port)
        except TimeoutError:
            raise HopError(f"connect to {hop}: Connection timed out") from None
        except OSError as exc:
            raise HopError(f"connect to {hop}: {exc.strerror or exc}") from None
        conn = cls(hop, reader, settings)
        try:
            await conn._handshake(use_tls)
        except BaseException:
            conn.abort()
            raise
        return conn

    async def _handshake(self, use_tls: bool) -> None:
        hop, settings = self.hop, self.settings
        greeting = await self._await(1, "receiving the initial server greeting")
        if greeting[0].code != 220:
            raise self._refused(greeting[0], "the initial server greeting")
        await self._ehlo()
        policy = settings.tls
        if use_tls and "STARTTLS" in self.extensions:
            await self._starttls()
        elif policy in ("required", "verify"):
            raise HopError(f"TLS is required, but was not offered by host {hop}", "4.7.4")
        if settings.username:
            if self.tls is None and policy != "none":
                raise HopError(f"not sending credentials to {hop} in plaintext (no TLS)", "4.7.0")
            await self._authenticate()

    def _refused(self, reply: Reply, stage: str) -> HopError:
        return HopError(f"host {self.hop.hostname}[{self.hop.address}] refused to talk to me: {reply} "
                        f"(in reply to {stage})", _temporary(reply.dsn), reply)

    async def _ehlo(self) -> None:
        helo = self.settings.helo
        reply = await self.command(f"EHLO {helo}\r\n".encode(), "EHLO")
        if reply.code == 250:
            extensions = {}
            for line in reply.lines[1:]:
                keyword, _, params = line.strip().partition(" ")
                extensions[keyword.upper()] = params
            self.extensions = extensions
            return
        if reply.code >= 500:  # RFC 5321 §3.2: fall back to HELO
            reply = await self.command(f"HELO {helo}\r\n".encode(), "HELO")
            if reply.code == 250:
                self.extensions = {}
                return
        raise self._refused(reply, "EHLO command")

    async def _starttls(self) -> None:
        hop, settings = self.hop, self.settings
        reply = await self.command(b"STARTTLS\r\n", "STARTTLS")
        if reply.code != 220:
            if settings.tls in ("required", "verify"):
                raise HopError(f"host {hop} refused STARTTLS: {reply}", "4.7.4", reply)
            return
        if not self.reader.idle:
            # RFC 3207 §4.2, the client side of CVE-2011-0411: anything behind the 220
            # came in plaintext and would be read, after the handshake, as the server's.
            self.abort()
            raise HopError(f"host {hop} sent data behind its 220 to STARTTLS (a plaintext injection?)",
                           "4.7.5", tls_failed=True)
        assert settings.tls_context is not None and self.reader.transport is not None
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                self.reader.transport, self.reader, settings.tls_context,
                server_hostname=hop.hostname.strip("[]"),
                ssl_handshake_timeout=settings.command_timeout,
            )
        except (ssl.SSLError, ssl.CertificateError, OSError, TimeoutError, ConnectionError) as exc:
            raise HopError(f"TLS handshake with {hop} failed: {_reason(exc)}", "4.7.5", tls_failed=True) from None
        if transport is None:
            raise HopError(f"TLS handshake with {hop} failed: connection closed", "4.7.5", tls_failed=True)
        self.reader.transport = transport
        ssl_object = transport.get_extra_info("ssl_object")
        self.tls = str(ssl_object.version()) if ssl_object is not None else "TLS"
        # RFC 3207 §4.2: forget what was learnt before TLS and say EHLO again.
        await self._ehlo()

    async def _authenticate(self) -> None:
        settings, hop = self.settings, self.hop
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        user, password = settings.username.encode(), settings.password.encode()
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + user + b"\0" + password)
            reply = await self.command(b"AUTH PLAIN " + token + b"\r\n", "AUTH")
        elif "LOGIN" in mechanisms:
            reply = await self.command(b"AUTH LOGIN\r\n", "AUTH")
            if reply.code == 334:
                reply = await self.command(base64.b64encode(user) + b"\r\n", "AUTH")
            if reply.code == 334:
                reply = await self.command(base64.b64encode(password) + b"\r\n", "AUTH")
        else:
            raise HopError(f"host {hop} offers no AUTH PLAIN or LOGIN (AUTH {' '.join(mechanisms) or 'not offered'})",
                           "4.7.0")
        if reply.code != 235:
            raise HopError(f"SASL authentication failed; server {hop} said: {reply}", _temporary(reply.dsn), reply)

    # -- commands ------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """Open, and silent since its last reply (an idle peer may have sent a 421)."""
        return not self.reader.closed and self.reader.idle

    def write(self, data: bytes) -> None:
        transport = self.reader.transport
        assert transport is not None
        transport.write(data)

    async def _await(self, count: int, stage: str) -> list[Reply]:
        """The next ``count`` replies, within command_timeout; HopError on timeout or loss."""
        try:
            return await self.reader.expect(count, self.settings.command_timeout)
        except TimeoutError:
            self.abort()
            raise HopError(f"conversation with {self.hop.hostname}[{self.hop.address}] timed out "
                           f"while {stage}", "4.4.2") from None
        except ConnectionLost as exc:
            raise HopError(f"{exc} with {self.hop.hostname}[{self.hop.address}] while {stage}", "4.4.2") from None

    async def command(self, line: bytes, name: str) -> Reply:
        self.write(line)
        return (await self._await(1, f"sending {name}"))[0]

    # -- transactions --------------------------------------------------------------

    async def send(self, sender: str, recipients: list[str], content: bytes, *,
                   body_8bit: bool = False, smtputf8: bool = False) -> list[RecipientResult]:
        """Deliver ``content`` (already dot-stuffed) to ``recipients``; one result each.

        Raises StaleConnection if a reused connection is found dead before
        anything was accepted (the caller opens a new one and tries again).
        """
        hop, ext = self.hop, self.extensions
        # RFC 1870 counts the content with its CRLFs, without dot-stuffing or the
        # final dot; the stuffed length is at most a few bytes more: close enough
        # to declare, and the same number is checked against the limit here.
        size = len(content)
        size_limit = ext.get("SIZE", "")
        if size_limit.isascii() and size_limit.isdigit() and 0 < int(size_limit) < size:  # "²".isdigit()
            r = bounced(f"message size {size} exceeds size limit {size_limit} of server {hop}",
                        "5.3.4", hop.hostname)
            return [r] * len(recipients)
        if body_8bit and "8BITMIME" not in ext:
            # RFC 6152 §3: 8-bit content must not go to a server without 8BITMIME.
            r = bounced(f"host {hop} does not support 8BITMIME and the message has 8-bit content "
                        f"(conversion required but not supported)", "5.6.3", hop.hostname)
            return [r] * len(recipients)
        if smtputf8 and "SMTPUTF8" not in ext:
            # RFC 6531 §3.2: an internationalized message needs SMTPUTF8 at the next hop.
            r = bounced(f"host {hop} does not support SMTPUTF8, which the message needs", "5.6.7", hop.hostname)
            return [r] * len(recipients)
        params = ""
        if "SIZE" in ext:
            params += f" SIZE={size}"
        if body_8bit:
            params += " BODY=8BITMIME"
        if smtputf8:
            params += " SMTPUTF8"
        results: list[RecipientResult | None] = [None] * len(recipients)
        todo = list(range(len(recipients)))
        while todo:
            overflow = await self._transaction(sender, params, recipients, todo, content, results)
            if not overflow:
                break
            todo = overflow
        return [r if r is not None else deferred(f"no reply from {hop}", "4.4.2", hop.hostname)
                for r in results]

    async def _transaction(self, sender: str, params: str, recipients: list[str], todo: list[int],
                           content: bytes, results: list[RecipientResult | None]) -> list[int]:
        """One MAIL..DATA transaction for ``todo``; returns the recipients to send in another."""
        hop = self.hop
        try:
            mail, rcpt_replies, data = await self._exchange(
                f"MAIL FROM:<{sender}>{params}\r\n".encode(),
                [f"RCPT TO:<{recipients[i]}>\r\n".encode() for i in todo])
        except HopError as exc:
            for i in todo:
                results[i] = deferred(exc.text, exc.dsn, hop.hostname)
            return []
        if mail.code // 100 != 2:
            for i in todo:
                results[i] = result_from_reply(mail, hop, "MAIL FROM")
            await self._abandon_data(data)
            return []
        accepted: list[int] = []
        overflow: list[int] = []
        for i, reply in zip(todo, rcpt_replies):
            results[i] = result_from_reply(reply, hop, "RCPT TO")
            if reply.code // 100 == 2:
                accepted.append(i)
            elif reply.code == 452 and (accepted or reply.dsn == "4.5.3"):
                # RFC 5321 §4.5.3.1.10: too many recipients; send these in another
                # transaction (if none was accepted, the 452 stands as a deferral).
                overflow.append(i)
        if not accepted:
            await self._abandon_data(data)
            return []
        try:
            if data is None:
                data = await self.command(b"DATA\r\n", "DATA")
        except HopError as exc:
            for i in accepted:
                results[i] = deferred(exc.text, exc.dsn, hop.hostname)
            return []
        if data.code != 354:
            if data.code // 100 == 2:
                # RFC 5321 §4.1.1.4: DATA's only positive reply is 354.  A 2xx means the
                # server is out of step with us; taken as "sent", the content would be lost.
                self.abort()
                for i in accepted:
                    results[i] = deferred(f"host {hop.hostname}[{hop.address}] said: {data} (in reply to DATA "
                                          "command, where only 354 may start the content)", "4.5.0", hop.hostname)
                return []
            for i in accepted:
                results[i] = result_from_reply(data, hop, "DATA")
            return overflow
        transport = self.reader.transport
        assert transport is not None
        transport.writelines((content, b".\r\n"))  # one send, without copying the content
        try:
            final = (await self._await(1, "sending end of data"))[0]
        except HopError as exc:
            # RFC 1047: the dot may have arrived; a retry may duplicate the message.
            for i in accepted:
                results[i] = deferred(f"{exc.text} -- message may be sent more than once", exc.dsn, hop.hostname)
            return []
        self.ready_for_mail = True
        for i in accepted:
            results[i] = result_from_reply(final, hop, "end of DATA")
        return overflow

    async def _exchange(self, mail: bytes, rcpts: list[bytes]) -> tuple[Reply, list[Reply], Reply | None]:
        """Send [RSET] MAIL RCPT...; (MAIL reply, RCPT replies, DATA reply if DATA was pipelined).

        A connection taken from the cache, or whose last transaction did not
        end at the final dot, starts with RSET (RFC 5321 §4.1.1.5), which also
        proves it is alive: if it is not, StaleConnection says nothing was
        sent.  Straight after a completed transaction the server is already
        reset (§4.1.1.4), so the next one starts with MAIL, as Postfix does;
        a connection kept open that way (a lingering session's) is stale too
        when it is found closed before any reply, or its MAIL gets 421 (a
        server that limits messages per connection says so there): nothing
        can have been accepted, and a new connection is tried.
        """
        reused = self.transactions > 0 and not self.ready_for_mail
        kept = self.transactions > 0 and self.ready_for_mail
        self.ready_for_mail = False
        self.transactions += 1
        hop = f"{self.hop.hostname}[{self.hop.address}]"
        if "PIPELINING" in self.extensions:
            # RFC 2920 §3.1: RSET, MAIL and RCPT may go anywhere in a group, DATA last.
            commands = ([b"RSET\r\n"] if reused else []) + [mail, *rcpts, b"DATA\r\n"]
            self.write(b"".join(commands))
            try:
                replies = await self.reader.expect(len(commands), self.settings.command_timeout)
            except ConnectionLost as exc:
                # A reused connection whose RSET got no 250 was dead (or closing, 421)
                # before the transaction began: nothing was sent, try a new one.
                if ((reused and (not exc.received or exc.received[0].code != 250))
                        or (kept and (not exc.received or exc.received[0].code == 421))):
                    raise StaleConnection(str(exc)) from None
                answered = exc.received[1:] if reused else exc.received
                if answered and answered[0].code // 100 != 2:
                    # The server answered MAIL (a 421 says why it closes) and hung up:
                    # its reply is the reason to log, not "lost connection".
                    self.abort()
                    return answered[0], [], None
                raise HopError(f"{exc} with {hop} while sending MAIL FROM", "4.4.2") from None
            except TimeoutError:
                self.abort()
                raise HopError(f"conversation with {hop} timed out while sending MAIL FROM", "4.4.2") from None
            if reused:
                replies = replies[1:]
            if kept and replies[0].code == 421:
                self.abort()
                raise StaleConnection(f"{hop} closes the connection: {replies[0]}")
            return replies[0], replies[1:-1], replies[-1]
        if reused:
            try:
                reset = await self.command(b"RSET\r\n", "RSET")
            except HopError as exc:
                raise StaleConnection(exc.text) from None
            if reset.code != 250:
                raise StaleConnection(f"RSET answered {reset}")
        try:
            mail_reply = await self.command(mail, "MAIL FROM")
        except HopError as exc:
            if kept and exc.reply is None:
                raise StaleConnection(exc.text) from None
            raise
        if kept and mail_reply.code == 421:
            self.abort()
            raise StaleConnection(f"{hop} closes the connection: {mail_reply}")
        if mail_reply.code // 100 != 2:
            return mail_reply, [], None
        return mail_reply, [await self.command(rcpt, "RCPT TO") for rcpt in rcpts], None

    async def _abandon_data(self, data: Reply | None) -> None:
        """A server that said 354 to a pipelined DATA with no valid recipient gets an empty end."""
        if data is not None and data.code == 354:
            try:
                await self.command(b".\r\n", "end of data")
            except HopError:
                pass

    # -- closing -------------------------------------------------------------------

    def quit(self) -> None:
        """Say QUIT and close; the reply is not worth waiting for."""
        transport = self.reader.transport
        if transport is not None and not transport.is_closing():
            transport.write(b"QUIT\r\n")
            transport.close()
        self.reader.closed = True

    def abort(self) -> None:
        transport = self.reader.transport
        if transport is not None:
            transport.abort()
        self.reader.closed = True


def _reason(exc: BaseException) -> str:
    """An exception as the text of a log line and a queue's last error.

    A server that drops the connection in the middle of the TLS handshake
    (aiosmtpd does so on "no shared cipher") surfaces as a bare
    ConnectionResetError(), whose str() is empty: the log said "failed: "
    and nothing more.
    """
    text = str(exc)
    if text:
        return text
    if isinstance(exc, ConnectionResetError):
        return "connection reset by peer"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return type(exc).__name__


def _temporary(dsn: str) -> str:
    """A status for a hop-level failure: always retried, so always class 4."""
    return "4" + dsn[1:] if dsn[:1] == "5" else dsn


class ConnectionCache:
    """Idle connections per destination, closed after ``idle_time`` seconds unused."""

    def __init__(self, idle_time: float) -> None:
        self.idle_time = idle_time
        self._idle: dict[str, list[tuple[OutboundConnection, asyncio.TimerHandle]]] = {}

    def put(self, key: str, conn: OutboundConnection, waited: float = 0.0) -> None:
        """Park ``conn``, idle for ``waited`` seconds already, for the rest of the idle time."""
        if not conn.usable or self.idle_time - waited <= 0:
            conn.quit()
            return
        conn.ready_for_mail = False   # it may have been closed while it waited: RSET first
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.idle_time - waited, self._expire, key, conn)
        self._idle.setdefault(key, []).append((conn, timer))

    def take(self, key: str) -> OutboundConnection | None:
        """The most recently parked usable connection for ``key``, if any."""
        idle = self._idle.get(key)
        while idle:
            conn, timer = idle.pop()
            timer.cancel()
            if conn.usable:
                if not idle:
                    del self._idle[key]
                return conn
            conn.abort()
        self._idle.pop(key, None)
        return None

    def _expire(self, key: str, conn: OutboundConnection) -> None:
        idle = self._idle.get(key, [])
        for i, (c, _) in enumerate(idle):
            if c is conn:
                del idle[i]
                break
        if not idle:
            self._idle.pop(key, None)
        conn.quit()

    def close_all(self) -> None:
        for idle in self._idle.values():
            for conn, timer in idle:
                timer.cancel()
                conn.quit()
        self._idle.clear()

