"""A next-hop SMTP server for the delivery tests: aiosmtpd on a loopback address.

It records every message it accepts (envelope, raw content, the connection it
came on, TLS and AUTH facts), every command it acts on (``commands``, so a
test can show that something was *not* sent: AUTH before TLS, MAIL or DATA to
a hop that cannot take the message), and its connections (how many at once,
when each closed and whether with QUIT).  It can be told to misbehave: scripted replies
to MAIL, RCPT or DATA (a 4xx first and then 250, a 5xx...), a stall in DATA
longer than the relay's timeout, a limit on recipients per transaction (452,
RFC 5321 §4.5.3.1.10).  It advertises PIPELINING (aiosmtpd reads commands
one at a time from a stream, so pipelined groups work) unless told not to.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from conftest import free_port


@dataclass
class SinkMessage:
    """One message as the sink received it."""

    mail_from: str
    rcpt_tos: list[str]
    content: bytes            # as received, dot-stuffing removed
    peer: tuple[str, int]     # the relay's end of the connection it came on
    tls: bool
    auth_user: str | None
    mail_options: list[str]
    helo: str


@dataclass
class SinkCommand:
    """One command line as the sink read it (before aiosmtpd acted on it)."""

    at: float                 # time.monotonic()
    peer: tuple[str, int]
    verb: str                 # "EHLO", "STARTTLS", "AUTH", "MAIL", "DATA", "QUIT"...
    arg: str                  # the rest of the line ("" if none)
    tls: bool                 # read inside TLS


@dataclass
class SinkConnection:
    """One connection the sink accepted."""

    peer: tuple[str, int]
    opened: float             # time.monotonic()
    closed: float | None = None


@dataclass
class SinkBehaviour:
    """Scripted answers; each list is consumed first, then the default applies."""

    mail_replies: deque[str] = field(default_factory=deque)
    rcpt_replies: deque[str] = field(default_factory=deque)
    data_replies: deque[str] = field(default_factory=deque)
    rcpt_reply_for: dict[str, str] = field(default_factory=dict)   # address -> fixed reply
    rcpt_limit: int = 0           # 452 after this many accepted in one transaction
    stall: float = 0.0            # seconds to sleep before answering the final dot
    pipelining: bool = True


class _Handler:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        if self.sink.behaviour.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        b = self.sink.behaviour
        if b.mail_replies:
            return b.mail_replies.popleft()
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        b = self.sink.behaviour
        if address in b.rcpt_reply_for:
            return b.rcpt_reply_for[address]
        if b.rcpt_replies:
            return b.rcpt_replies.popleft()
        if b.rcpt_limit and len(envelope.rcpt_tos) >= b.rcpt_limit:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        b = self.sink.behaviour
        self.sink.data_started += 1
        if b.stall:
            await asyncio.sleep(b.stall)
        if b.data_replies:
            return b.data_replies.popleft()
        auth = session.auth_data
        message = SinkMessage(
            # aiosmtpd keeps the null sender as "<>" (an empty one would read as "no MAIL yet").
            mail_from="" if envelope.mail_from == "<>" else envelope.mail_from, rcpt_tos=list(envelope.rcpt_tos),
            content=bytes(envelope.original_content or b""), peer=tuple(session.peer),
            tls=session.ssl is not None,
            auth_user=auth.login.decode() if isinstance(auth, LoginPassword) else None,
            mail_options=list(envelope.mail_options), helo=session.host_name or "",
        )
        self.sink._accept(message)
        return "250 2.0.0 OK: queued"


class _RecordingSMTP(SMTP):
    """aiosmtpd's server, noting each command line and each connection in the sink."""

    def __init__(self, handler: Any, sink: Sink, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.sink = sink
        self._record: SinkConnection | None = None
        for verb, method in self._smtp_methods.items():
            self._smtp_methods[verb] = self._recorded(verb, method)

    def _recorded(self, verb: str, method: Callable[[str | None], Awaitable[None]]
                  ) -> Callable[[str | None], Awaitable[None]]:
        @functools.wraps(method)   # keeps aiosmtpd's syntax attributes (HELP, EHLO) in place
        async def recorded(arg: str | None) -> None:
            self.sink.commands.append(SinkCommand(time.monotonic(), tuple(self.session.peer), verb, arg or "",
                                                  self.session.ssl is not None))
            await method(arg)
        return recorded

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        starttls = self._original_transport is not None   # the same connection, now inside TLS
        super().connection_made(transport)
        if not starttls and self.sink.started:   # not aiosmtpd's own probe at start
            self._record = SinkConnection(tuple(self.session.peer), time.monotonic())
            self.sink._opened(self._record)

    def connection_lost(self, error: Exception | None) -> None:
        if self._record is not None:
            self.sink._closed(self._record)
            self._record = None
        super().connection_lost(error)


class _RecordingController(Controller):
    def __init__(self, sink: Sink, handler: Any, **kwargs: Any) -> None:
        self.sink = sink
        super().__init__(handler, **kwargs)

    def factory(self) -> SMTP:
        return _RecordingSMTP(self.handler, self.sink, **self.SMTP_kwargs)


class Sink:
    """An SMTP server on ``host:port`` that keeps what it receives.

    Options beyond the scripted behaviour: ``tls_context`` offers STARTTLS;
    ``credentials`` offers AUTH (PLAIN and LOGIN, minus ``auth_exclude``;
    only inside TLS unless ``auth_require_tls`` is false); ``decode_data``
    makes aiosmtpd stop advertising 8BITMIME; ``data_size_limit`` is the
    advertised SIZE (aiosmtpd's default, 32 MiB, when None).
    """

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, *,
                 tls_context: ssl.SSLContext | None = None,
                 credentials: tuple[str, str] | None = None,
                 smtputf8: bool = False, idle_timeout: float = 300.0,
                 auth_exclude: list[str] | None = None, auth_require_tls: bool = True,
                 decode_data: bool = False, data_size_limit: int | None = None,
                 **behaviour: Any) -> None:
        self.host = host
        self.port = port or free_port()
        self.behaviour = SinkBehaviour(**{k: deque(v) if k.endswith("_replies") else v
                                          for k, v in behaviour.items()})
        self.messages: list[SinkMessage] = []
        self.data_started = 0     # transactions that reached the end of DATA (accepted or not)
        self.commands: list[SinkCommand] = []
        self.connections: list[SinkConnection] = []
        self.open_connections = 0
        self.max_open_connections = 0   # the most connections open at one time
        self.started = False
        self._cond = threading.Condition()
        kwargs: dict[str, Any] = {"enable_SMTPUTF8": smtputf8, "timeout": idle_timeout,
                                  "auth_require_tls": auth_require_tls, "decode_data": decode_data}
        if auth_exclude is not None:
            kwargs["auth_exclude_mechanism"] = auth_exclude
        if data_size_limit is not None:
            kwargs["data_size_limit"] = data_size_limit
        if tls_context is not None:
            kwargs["tls_context"] = tls_context
        if credentials is not None:
            user, password = credentials

            def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
                ok = isinstance(data, LoginPassword) and data.login.decode() == user \
                    and data.password.decode() == password
                return AuthResult(success=ok, handled=False, auth_data=data)

            kwargs["authenticator"] = authenticate
        self.controller = _RecordingController(self, _Handler(self), hostname=host, port=self.port,
                                               server_hostname=f"sink-{host}.test", **kwargs)

    def start(self) -> Sink:
        self.controller.start()   # it connects once to itself to see the server up
        self.started = True
        return self

    def stop(self) -> None:
        self.controller.stop()

    def _accept(self, message: SinkMessage) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def _opened(self, connection: SinkConnection) -> None:
        with self._cond:
            self.connections.append(connection)
            self.open_connections += 1
            self.max_open_connections = max(self.max_open_connections, self.open_connections)

    def _closed(self, connection: SinkConnection) -> None:
        with self._cond:
            connection.closed = time.monotonic()
            self.open_connections -= 1
            self._cond.notify_all()

    def verbs(self) -> list[str]:
        """The command verbs read so far, in order."""
        return [c.verb for c in self.commands]

    def wait(self, count: int = 1, timeout: float = 10.0) -> list[SinkMessage]:
        """Block until ``count`` messages have arrived; return them all."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"sink {self.host}:{self.port}: {len(self.messages)} of "
                                         f"{count} message(s) after {timeout}s")
                self._cond.wait(left)
            return list(self.messages)

    @property
    def recipients(self) -> list[str]:
        return [r for m in self.messages for r in m.rcpt_tos]
