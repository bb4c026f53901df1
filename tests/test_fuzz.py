"""Fuzzing the command parser and DATA framing against a reference model of RFC 5321 framing.

The server side of fastrelay (``SmtpSession``) runs in this process, driven
by hypothesis.  The socket is replaced by ``CaptureTransport``, a test
harness: it records the bytes the session writes and honours
``pause_reading`` as a transport would.  It stands in for the kernel, not for
a peer: the peer is the test, which feeds the session its input split at
random read boundaries, with or without letting the event loop run between
reads.  Everything behind the session is real: config, policy, and the spool
on disk (a fresh one per example, on /dev/shm when there is one), read back
with ``Spool.scan`` to see what was stored.

``Rfc5321Model`` is written from the RFC, not from the server: it says which
lines are commands, what each one answers (for the commands generated here),
where DATA ends (RFC 5321 §4.1.1.4: ``<CRLF>.<CRLF>`` only), and what
content is stored (§4.5.2: the first dot of a line removed; §2.3.8: a bare
CR or LF refused, or with ``bare_newline = "normalize"`` a bare LF taken as
a line end).  The session must give the same replies, in the same order,
and store the same messages, whatever the read boundaries.

``test_smuggling_*`` is a differential test of end-of-data detection: the
smuggling sequences (``\\n.\\n``, ``\\n.\\r\\n``, ``\\r.\\r``, ``\\r\\n.\\n``,
``\\r\\n.\\r``) in content must neither end the message at the relay nor,
once fastrelay dot-stuffs it for the next hop, at a next hop that is lenient
about bare CR or LF (as some MTAs are): every recogniser must find exactly
one end, the true one.

An opt-in atheris harness (``tests/reliability/atheris_session.py``) drives
the same harness and model from coverage-guided input.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
from capture import CaptureTransport
from conftest import split_received
import argon2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastrelay import replies
from fastrelay.app import build_policy
from fastrelay.config import Config, load_config
from fastrelay.policy import PasswordVerifier, RelayPolicy
from fastrelay.quota import QuotaBook
from fastrelay.server import SmtpServer, SmtpSession, State
from fastrelay.smtp_client import dot_stuff
from fastrelay.spool import Spool

HOSTNAME = "relay.example.test"
MAX_SIZE = 2048          # small, so that the size limit is met often
MAX_LINE = 512           # RFC 5321 §4.5.3.1.4, with its CRLF
MAX_RCPTS = 5            # recipients per transaction: small, so that the limit is met often
HARD_ERROR_LIMIT = 8     # 4xx/5xx replies before the session is closed: met by many junk sessions

CONFIG = """
[server]
hostname = "{hostname}"
listen = ["127.0.0.1:2525"]
spool_dir = "spool"
max_message_size = {max_size}
bare_newline = "{bare_newline}"
hard_error_limit = {hard_error_limit}
# No delay and no lockout: the session's error limit comes first, and a test must not sleep.
auth_failures_before_delay = 1000
auth_failures_before_lockout = 1000

[[accounts]]
name = "example"
domains = ["example.com"]

[[accounts.users]]
address = "alice@example.com"
passwords = ["{alice_hash}"]

[[accounts.rules]]
name = "loopback"
allowed_senders = "my_domains"
only_allowed_ips = true
ips = [ {{ range = "127.0.0.0/24" }} ]

[limits.active]
recipients_per_transaction = {max_rcpts}

[delivery]
enabled = false
"""


def wire(reply: bytes) -> bytes:
    return reply.removesuffix(b"\r\n")


# --- the harness -------------------------------------------------------------------------------


@dataclass
class Outcome:
    replies: list[bytes]           # the first line of each reply, in order
    stored: list[bytes]            # contents queued, in order (the relay's Received: header removed)
    closed: bool


def _spool_root() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


class Harness:
    """One config and policy; ``run`` plays one input through a fresh session and spool."""

    def __init__(self, bare_newline: str, directory: Path, tls: bool = False) -> None:
        """``tls``: the session is on an implicit-TLS listener (AUTH is offered); the
        TLS layer itself is not here (tests/test_tls.py has real handshakes)."""
        self.tls = tls
        path = directory / f"relay-{bare_newline}{'-tls' if tls else ''}.toml"
        # A cheap argon2 hash: the fuzz checks the AUTH dialogue, not the hash's cost.
        alice_hash = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(AUTH_PASSWORD)
        path.write_text(CONFIG.format(hostname=HOSTNAME, max_size=MAX_SIZE, bare_newline=bare_newline,
                                     max_rcpts=MAX_RCPTS, hard_error_limit=HARD_ERROR_LIMIT,
                                     alice_hash=alice_hash))
        self.config: Config = load_config(path)
        self.policy: RelayPolicy = build_policy(self.config)
        self.passwords = PasswordVerifier(workers=1)   # one thread pool for every session played

    def run(self, stream: bytes, cuts: list[int], settle: list[bool],
            probe: Callable[[SmtpSession], None] | None = None) -> Outcome:
        """``probe``, if given, looks at the session after each read."""
        spool_dir = tempfile.mkdtemp(prefix="fastrelay-fuzz-", dir=_spool_root())
        try:
            out, closed = asyncio.run(self._play(Path(spool_dir), stream, cuts, settle, probe))
            stored = []
            for m in Spool(spool_dir).scan():   # in arrival order
                body = Spool(spool_dir).read_body(m)
                stored.append(split_received(body, m.envelope.queue_id)[1])
        finally:
            shutil.rmtree(spool_dir, ignore_errors=True)
        return Outcome(parse_replies(out), stored, closed)

    async def _play(self, spool_dir: Path, stream: bytes, cuts: list[int], settle: list[bool],
                    probe: Callable[[SmtpSession], None] | None) -> tuple[bytes, bool]:
        loop = asyncio.get_running_loop()
        spool = Spool(spool_dir)
        spool.recover()
        spool.start(loop)
        try:
            # The relay's own quota book, fresh for each input: the transaction limit is
            # checked where the relay checks it, and nothing is carried between inputs.
            server = SmtpServer(self.config, self.policy, spool, quota=QuotaBook(self.config))
            server.passwords = self.passwords
            transport = CaptureTransport()
            session = SmtpSession(server, implicit_tls=self.tls)
            session.connection_made(transport)
            points = sorted({c for c in cuts if 0 < c < len(stream)})
            pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)])]
            for i, piece in enumerate(pieces):
                if transport.closed:
                    break
                await _until(lambda: not transport.paused)   # a paused transport delivers nothing
                session.data_received(piece)
                if probe is not None:
                    probe(session)
                if settle[i % len(settle)] if settle else False:
                    await _until(lambda: not session.busy)
            await _until(lambda: not session.busy)
            closed = transport.closed
            session.connection_lost(None)   # as the loop does, after the relay's close too
            # Every byte counted against max_data_memory was given back, at any read boundaries.
            assert server.data_bytes == 0, f"{server.data_bytes} bytes of content still counted"
            return bytes(transport.out), closed
        finally:
            spool.close()


async def _until(predicate: Any, timeout: float = 10.0) -> None:
    """Let the loop run (the spool's writer thread answers through it) until ``predicate``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "the session stayed busy"
        await asyncio.sleep(0.0005)


def parse_replies(out: bytes) -> list[bytes]:
    """The first line of each reply (a reply ends at a ``code<SP>`` line, RFC 5321 §4.2.1)."""
    lines = out.split(b"\r\n")
    assert lines[-1] == b"", f"output does not end with CRLF: {out[-80:]!r}"
    firsts: list[bytes] = []
    continued = False
    for line in lines[:-1]:
        assert re.match(rb"^\d{3}[ -]", line), f"not a reply line: {line!r}"
        if not continued:
            firsts.append(line)
        continued = line[3:4] == b"-"
    assert not continued, "a multi-line reply without its last line"
    return firsts


# --- the reference model ---------------------------------------------------------------------------

EHLO = b"EHLO client.example.com"
HELO = b"HELO client.example.com"
MAIL = b"MAIL FROM:<bob@example.com>"
RCPTS = (b"RCPT TO:<carol@dest.test>", b"RCPT TO:<dave@dest.test>", b"RCPT TO:<evil@dest.test>")
AUTH_USER, AUTH_PASSWORD = "alice@example.com", "secret"
_ALICE = b"\0alice@example.com\0"
# RFC 4954: AUTH with and without an initial response, right and wrong, and STARTTLS.
AUTH_LINES = (
    b"AUTH PLAIN " + base64.b64encode(_ALICE + b"secret"),
    b"AUTH PLAIN " + base64.b64encode(_ALICE + b"wrong"),
    b"AUTH PLAIN " + base64.b64encode(b"bob@example.com" + _ALICE + b"secret"),   # another identity
    b"AUTH PLAIN",
    b"AUTH LOGIN",
    b"AUTH LOGIN " + base64.b64encode(b"ALICE@example.com"),
    b"AUTH CRAM-MD5",
    b"STARTTLS",
)
# Lines a client may send after a 334 challenge.
AUTH_RESPONSES = (b"*", base64.b64encode(b"alice@example.com"), base64.b64encode(b"secret"),
                  base64.b64encode(b"wrong"), base64.b64encode(_ALICE + b"secret"), b"not base64!",
                  b" " + base64.b64encode(b"secret") + b"\t", b"=")
AUTH_WAIT = ("auth_plain", "auth_user", "auth_pass")
MAX_AUTH_LINE = 12288    # RFC 4954 §4, with its CRLF
COMMAND_LINES = (EHLO, HELO, MAIL, *RCPTS, b"DATA", b"RSET", b"NOOP", b"QUIT", *AUTH_LINES)
VERBS = {b"HELO", b"EHLO", b"MAIL", b"RCPT", b"DATA", b"RSET", b"NOOP", b"QUIT", b"VRFY", b"EXPN", b"HELP",
         b"STARTTLS", b"AUTH"}

QUEUED = b"250 2.0.0 Ok: queued as "


@dataclass
class Rfc5321Model:
    """What a server must answer and store for a byte stream (the commands used here only)."""

    bare_newline: str
    tls: bool = False
    max_size: int = MAX_SIZE
    replies: list[tuple[bytes, ...]] = field(default_factory=list)   # acceptable first lines (prefixes)
    stored: list[bytes] = field(default_factory=list)
    closed: bool = False
    errors: int = 0
    esmtp: bool = False            # the last greeting was EHLO
    authenticated: bool = False
    login_user: str = ""

    def run(self, stream: bytes) -> Rfc5321Model:
        state, recipients, pos = "greeted", 0, 0
        while not self.closed:
            if state == "data":
                # §4.1.1.4: the CRLF ending the DATA line starts the first content line,
                # so ".CRLF" at once is an empty message; only CRLF.CRLF ends the content.
                window = b"\r\n" + stream[pos:]
                end = window.find(b"\r\n.\r\n")
                if end < 0:
                    break
                self._end_of_data(window[2:end + 2])
                pos += end + 3
                state, recipients = "ready", 0
                continue
            nl = stream.find(b"\n", pos)
            if nl < 0:
                break
            line, pos = stream[pos:nl + 1], nl + 1
            state, recipients = self._line(line, state, recipients)
        return self

    def _say(self, *alternatives: bytes) -> None:
        self.replies.append(alternatives)
        # Every alternative of one answer is of the same class; the session ends at
        # hard_error_limit 4xx/5xx replies (the relay's, as Postfix's smtpd_hard_error_limit).
        if alternatives[0][:1] in (b"4", b"5"):
            self.errors += 1
            if self.errors >= HARD_ERROR_LIMIT:
                self.replies.append((wire(replies.TOO_MANY_ERRORS),))
                self.closed = True

    def _line(self, line: bytes, state: str, recipients: int) -> tuple[str, int]:
        bare = not line.endswith(b"\r\n")
        # After a 334 the line is a response, not a command (RFC 4954 §4); a
        # malformed one ends the exchange as a bad one does.
        waiting = state if state in AUTH_WAIT else None
        if waiting:
            state = "ready"
        if len(line) > (MAX_AUTH_LINE if waiting or line[:5].upper() == b"AUTH " else MAX_LINE):
            # Too long.  A long line that also ends in a bare LF may be answered for
            # either fault: which one the server sees first depends on the read boundaries.
            if bare:
                self._say(wire(replies.LINE_TOO_LONG), wire(replies.BARE_NEWLINE_COMMAND))
            else:
                self._say(wire(replies.LINE_TOO_LONG))
            return state, recipients
        if bare or b"\r" in line[:-2]:
            self._say(wire(replies.BARE_NEWLINE_COMMAND))      # §2.3.8
            return state, recipients
        command = line[:-2]
        if waiting:
            return self._auth_response(command, waiting), recipients
        verb = command.partition(b" ")[0].upper()
        if verb not in VERBS:
            self._say(wire(replies.SYNTAX_ERROR))
            return state, recipients
        assert command in COMMAND_LINES, f"the model knows no answer to {command!r}"
        if command in (EHLO, HELO):
            self._say(b"250-" + HOSTNAME.encode() if command == EHLO else b"250 " + HOSTNAME.encode())
            self.esmtp = command == EHLO
            return "ready", 0
        if command == b"STARTTLS":
            # The harness has no certificate (the relay then has no STARTTLS);
            # on the implicit-TLS listener TLS is already on.
            self._say(wire(replies.ALREADY_TLS) if self.tls else wire(replies.NOT_IMPLEMENTED))
            return state, recipients
        if verb == b"AUTH":
            return self._auth(command[5:], state), recipients
        if command == MAIL:
            if state == "greeted":
                self._say(wire(replies.NEED_HELO))
            elif state == "mail":
                self._say(wire(replies.NESTED_MAIL))
            else:
                self._say(wire(replies.SENDER_OK))
                return "mail", 0
            return state, recipients
        if command in RCPTS:
            if state != "mail":
                self._say(wire(replies.NEED_MAIL))
                return state, recipients
            if recipients >= MAX_RCPTS:
                self._say(wire(replies.TOO_MANY_RCPTS))     # §4.5.3.1.10
                return state, recipients
            self._say(wire(replies.RCPT_OK))
            return state, recipients + 1
        if command == b"DATA":
            if state != "mail":
                self._say(wire(replies.NEED_MAIL))
            elif not recipients:
                self._say(wire(replies.NO_VALID_RECIPIENTS))
            else:
                self._say(wire(replies.START_DATA))
                return "data", recipients
            return state, recipients
        if command == b"RSET":
            self._say(wire(replies.RESET_OK))
            return ("greeted" if state == "greeted" else "ready"), 0
        if command == b"NOOP":
            self._say(wire(replies.NOOP_OK))
            return state, recipients
        self._say(b"221 2.0.0 ")     # QUIT
        self.closed = True
        return state, recipients

    # -- RFC 4954 ------------------------------------------------------------------------------

    def _auth(self, arg: bytes, state: str) -> str:
        if not self.tls:
            self._say(wire(replies.NEED_STARTTLS))           # §4: never in the clear
        elif state == "greeted" or not self.esmtp:
            self._say(wire(replies.NEED_HELO))               # an ESMTP extension: EHLO first
        elif self.authenticated:
            self._say(wire(replies.ALREADY_AUTH))            # §4: once per session
        elif state != "ready":
            self._say(wire(replies.AUTH_IN_TRANSACTION))     # §4: not during a mail transaction
        else:
            mechanism, _, initial = arg.partition(b" ")
            if mechanism.upper() == b"PLAIN":
                if not initial:
                    self._say(b"334 ")
                    return "auth_plain"
                self._plain(_b64(initial))
            elif mechanism.upper() == b"LOGIN":
                if not initial:
                    self._say(b"334 VXNlcm5hbWU6")            # "Username:"
                    return "auth_user"
                return self._login_user(_b64(initial))
            else:
                self._say(wire(replies.UNKNOWN_MECHANISM))
        return state

    def _auth_response(self, response: bytes, waiting: str) -> str:
        if response == b"*":
            self._say(wire(replies.AUTH_CANCELLED))          # §4: the client gave up
            return "ready"
        if waiting == "auth_plain":
            self._plain(_b64(response))
        elif waiting == "auth_user":
            return self._login_user(_b64(response))
        elif (password := _b64(response)) is None:
            self._say(wire(replies.BAD_BASE64))
        else:
            self._verify(self.login_user, password.decode("utf-8", "replace"))
        return "ready"

    def _plain(self, decoded: bytes | None) -> None:
        # RFC 4616: authzid NUL authcid NUL passwd.
        parts = decoded.split(b"\0") if decoded is not None else []
        if len(parts) != 3:
            self._say(wire(replies.BAD_BASE64))
            return
        authzid, authcid, password = (part.decode("utf-8", "replace") for part in parts)
        if authzid and authzid.lower() != authcid.lower():
            self._say(wire(replies.AUTH_IDENTITY_MISMATCH))
            return
        self._verify(authcid, password)

    def _login_user(self, decoded: bytes | None) -> str:
        if decoded is None:
            self._say(wire(replies.BAD_BASE64))
            return "ready"
        self.login_user = decoded.decode("utf-8", "replace")
        self._say(b"334 UGFzc3dvcmQ6")                       # "Password:"
        return "auth_pass"

    def _verify(self, user: str, password: str) -> None:
        if user.lower() == AUTH_USER and password == AUTH_PASSWORD:
            self._say(wire(replies.AUTH_OK))
            self.authenticated = True
        else:
            self._say(wire(replies.AUTH_FAILED))

    def _end_of_data(self, raw: bytes) -> None:
        lines = raw.split(b"\r\n")
        assert lines[-1] == b""   # the content ends with the CRLF of the terminator
        lines = lines[:-1]
        # A stuffed stream is at most 4/3 of its content: far beyond that the server
        # stops keeping the stream at all (and cannot look at its lines).
        threshold = self.max_size + self.max_size // 3 + 4
        if len(raw) > threshold:
            self._say(wire(replies.MESSAGE_TOO_BIG))
            return
        # Up to ".\r" of a terminator split across reads is counted before it is
        # recognised: right at the threshold, read boundaries may make it 552.
        too_big = (wire(replies.MESSAGE_TOO_BIG),) if len(raw) > threshold - 2 else ()
        if any(b"\r" in line or b"\n" in line for line in lines):
            if self.bare_newline == "reject" or any(b"\r" in line for line in lines):
                self._say(wire(replies.BARE_NEWLINE_DATA), *too_big)
                return
            lines = [part for line in lines for part in line.split(b"\n")]   # a bare LF ends a line
        content = b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)
        if len(content) > self.max_size:
            self._say(wire(replies.MESSAGE_TOO_BIG))
            return
        self._say(QUEUED)
        self.stored.append(content)


def check(harness: Harness, stream: bytes, cuts: list[int], settle: list[bool],
          probe: Callable[[SmtpSession], None] | None = None) -> Outcome:
    model = Rfc5321Model(harness.config.server.bare_newline, tls=harness.tls).run(stream)
    got = harness.run(stream, cuts, settle, probe)
    banner = got.replies[0]
    assert banner.startswith(b"220 " + HOSTNAME.encode())
    answers = got.replies[1:]
    for i, (actual, expected) in enumerate(zip(answers, model.replies)):
        assert any(actual.startswith(e) for e in expected), (
            f"reply {i}: {actual!r}, the model expects one of {expected!r}\nstream {stream!r}\ncuts {cuts}")
    assert len(answers) == len(model.replies), (
        f"{len(answers)} replies, the model expects {len(model.replies)}\n{answers}\n{model.replies}\n{stream!r}")
    assert got.stored == model.stored, f"stored {got.stored!r}, the model {model.stored!r}\nstream {stream!r}"
    assert got.closed == model.closed
    return got


def _b64(text: bytes) -> bytes | None:
    """A base64 response, blanks around it forgiven; None if it is not base64."""
    try:
        return base64.b64decode(text.strip(b" \t"), validate=True)
    except binascii.Error:
        return None


# --- generators ---------------------------------------------------------------------------------------

# Junk: nothing here spells a command verb, so every junk line is a syntax error
# (or a bare CR/LF, or too long) unless DATA is on.
JUNK_PIECES = [b"a", b"X", b".", b" ", b"\r", b"\n", b"\r\n", b"\r\n.\r\n", b"\n.\n", b"\n.\r\n", b"\r.\r",
               b"\r\n.\n", b"\r\n.\r", b"\x00", b"\xc3\xa9", b"..", b"X" * 300, b".\r\n"]
SMUGGLING = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\r\n.\r"]
CONTENT_LINES = [b"", b".", b"..", b".lorem", b"lorem ipsum", b"\xc3\xa9t\xc3\xa9", b"x" * 80, b"y" * 700,
                 MAIL, RCPTS[2], b"DATA", b"Subject: smuggled"]


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    """A message as a client sends it: lines, stuffed or not, joined by CRLF (sometimes not), ended."""
    lines = draw(st.lists(st.sampled_from(CONTENT_LINES), max_size=12))
    joiners = draw(st.lists(st.sampled_from([b"\r\n"] * 6 + [b"\n", b"\r", *SMUGGLING]), min_size=len(lines),
                            max_size=len(lines)))
    stuffed = draw(st.booleans())
    body = b"".join((b"." + line if stuffed and line.startswith(b".") else line) + j
                    for line, j in zip(lines, joiners))
    return body + draw(st.sampled_from([b"\r\n.\r\n", b".\r\n", b"\r\n.\r\n"]))


ITEMS = st.one_of(
    st.sampled_from([line + b"\r\n" for line in COMMAND_LINES if line != b"QUIT"]),
    st.just(b"QUIT\r\n"),
    st.sampled_from([response + b"\r\n" for response in AUTH_RESPONSES]),
    st.lists(st.sampled_from(JUNK_PIECES), max_size=12).map(b"".join),
    messages(),
)
TRANSACTION = [EHLO + b"\r\n", MAIL + b"\r\n", RCPTS[0] + b"\r\n", b"DATA\r\n"]


@st.composite
def sessions(draw: st.DrawFn) -> tuple[bytes, list[int], list[bool]]:
    # Mostly start like a real client, so that DATA is reached often.
    start = TRANSACTION if draw(st.integers(0, 3)) else []
    stream = b"".join(start + draw(st.lists(ITEMS, max_size=20)))
    cuts = draw(st.lists(st.integers(0, len(stream)), max_size=12))
    settle = draw(st.lists(st.booleans(), min_size=1, max_size=6))
    return stream, cuts, settle


AUTH_ITEMS = st.one_of(
    st.sampled_from([line + b"\r\n" for line in AUTH_LINES]),
    st.sampled_from([response + b"\r\n" for response in AUTH_RESPONSES]),
    ITEMS,
)


@st.composite
def auth_sessions(draw: st.DrawFn) -> tuple[bytes, list[int], list[bool]]:
    """After EHLO, mostly AUTH commands and responses to 334 challenges."""
    stream = EHLO + b"\r\n" + b"".join(draw(st.lists(AUTH_ITEMS, max_size=16)))
    cuts = draw(st.lists(st.integers(0, len(stream)), max_size=12))
    settle = draw(st.lists(st.booleans(), min_size=1, max_size=6))
    return stream, cuts, settle


@pytest.fixture(scope="module")
def harnesses(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Harness]:
    directory = tmp_path_factory.mktemp("fuzz")
    return {"reject": Harness("reject", directory), "normalize": Harness("normalize", directory),
            "tls": Harness("reject", directory, tls=True)}


FUZZ = settings(max_examples=int(os.environ.get("FASTRELAY_FUZZ_EXAMPLES", "250")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- the tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["reject", "normalize", "tls"])
def test_sessions_match_the_model_at_any_read_boundaries(harnesses: dict[str, Harness], mode: str) -> None:
    harness = harnesses[mode]

    @FUZZ
    @given(sessions())
    def run(case: tuple[bytes, list[int], list[bool]]) -> None:
        check(harness, *case)

    run()


def test_auth_sessions_match_the_model_at_any_read_boundaries(harnesses: dict[str, Harness]) -> None:
    """SMTP AUTH (RFC 4954) on the implicit-TLS listener, against the model."""
    harness = harnesses["tls"]

    @FUZZ
    @given(auth_sessions())
    def run(case: tuple[bytes, list[int], list[bool]]) -> None:
        check(harness, *case)

    run()


def test_the_harness_sees_what_the_model_sees() -> None:
    """The model itself, on streams whose outcome is known by hand."""
    stream = b"".join(TRANSACTION) + b"a\r\n..b\r\n.\r\nNOOP\r\n" + b"x" * 600 + b"\r\nQUIT\r\n"
    model = Rfc5321Model("reject").run(stream)
    assert model.stored == [b"a\r\n.b\r\n"]
    assert [r[0][:3] for r in model.replies] == [b"250", b"250", b"250", b"354", b"250", b"250", b"500", b"221"]
    assert model.closed
    normalized = Rfc5321Model("normalize").run(b"".join(TRANSACTION) + b"a\n.b\n.\n\r\n.\r\n")
    assert normalized.stored == [b"a\r\nb\r\n\r\n\r\n"]   # lines a, .b, ., "" then the end
    refused = Rfc5321Model("normalize").run(b"".join(TRANSACTION) + b"a\r.b\r\n.\r\n")
    assert refused.replies[-1] == (wire(replies.BARE_NEWLINE_DATA),) and refused.stored == []


def test_every_split_of_one_session_matches_the_model(harnesses: dict[str, Harness]) -> None:
    """One session with every kind of line, cut at every single offset."""
    stream = (b"".join(TRANSACTION) + b"one\r\n..two\r\n\r\n.\r\n" + b"NOOP\r\n" + b"X" * 520 + b"\n"
              + MAIL + b"\r\n" + RCPTS[1] + b"\r\nDATA\r\n.\r\n" + b"bad\rline\r\nRSET\r\n")
    for mode in ("reject", "normalize"):
        for cut in range(1, len(stream)):
            check(harnesses[mode], stream, [cut], [cut % 2 == 0])



AUTH_SESSION = b"".join(line + b"\r\n" for line in [
    EHLO, b"AUTH PLAIN", b"*",                                            # cancelled: 501
    b"AUTH LOGIN", base64.b64encode(b"alice@example.com"), b"not base64!",  # 334, 334, 501
    AUTH_LINES[5], base64.b64encode(b"wrong"),                              # 334, 535
    b"AUTH PLAIN", b"X" * 600,                                             # 334, 501: long is fine after a 334
]) + b"AUTH PLAIN\r\nabc\nNOOP\r\n" + b"".join(line + b"\r\n" for line in [   # 334, bare LF: 500, NOOP
    AUTH_LINES[0], AUTH_LINES[3], MAIL, RCPTS[0], b"DATA",                 # 235, 503, 250, 250, 354
]) + b"authenticated\r\n.\r\nQUIT\r\n"


def test_the_model_knows_the_auth_dialogue() -> None:
    model = Rfc5321Model("reject", tls=True).run(AUTH_SESSION)
    assert [r[0][:3] for r in model.replies] == [
        b"250", b"334", b"501", b"334", b"334", b"501", b"334", b"535", b"334", b"501", b"334", b"500",
        b"250", b"235", b"503", b"250", b"250", b"354", b"250", b"221"]
    assert model.stored == [b"authenticated\r\n"]
    plain = Rfc5321Model("reject").run(EHLO + b"\r\n" + AUTH_LINES[0] + b"\r\n")
    assert plain.replies[-1] == (wire(replies.NEED_STARTTLS),)


def test_every_split_of_an_auth_session_matches_the_model(harnesses: dict[str, Harness]) -> None:
    """SMTP AUTH on the implicit-TLS listener: challenges, responses, cancels and bad
    responses, cut at every offset (AUTH in the clear gets 530 in the other harnesses)."""
    for cut in range(1, len(AUTH_SESSION), 3):
        check(harnesses["tls"], AUTH_SESSION, [cut], [cut % 2 == 0])
    check(harnesses["reject"], AUTH_SESSION, [], [False])


def test_the_recipient_limit_matches_the_model(harnesses: dict[str, Harness]) -> None:
    """More RCPTs than recipients_per_transaction, a nested MAIL between them (atheris found
    the model had no limit, and the harness's quota-less relay a fixed 100), cut anywhere."""
    stream = (b"".join(TRANSACTION[:2]) + RCPTS[0] + b"\r\n" + MAIL + b"\r\n"
              + b"".join(r + b"\r\n" for r in (RCPTS * MAX_RCPTS)[:MAX_RCPTS + 1])
              + b"DATA\r\nbody\r\n.\r\n" + MAIL + b"\r\n" + RCPTS[1] + b"\r\nQUIT\r\n")
    model = Rfc5321Model("reject").run(stream)
    assert [r[0][:3] for r in model.replies].count(b"452") == 2 and len(model.stored) == 1
    for cut in range(1, len(stream), 7):
        check(harnesses["reject"], stream, [cut], [cut % 2 == 0])


def test_content_sent_a_byte_at_a_time_is_held_in_one_buffer(harnesses: dict[str, Harness]) -> None:
    """A read of a few bytes must not cost a Python object each (~40 bytes that
    max_data_memory does not count): small reads are merged as they come."""
    content = b"Subject: slow\r\n\r\n" + b"..a line of text\r\n" * 100
    head = b"".join(TRANSACTION)
    stream = head + content + b".\r\nQUIT\r\n"
    held: list[int] = []

    def probe(session: SmtpSession) -> None:
        if session.state == State.DATA:
            held.append(len(session.chunks))

    got = check(harnesses["reject"], stream, list(range(len(head), len(stream))), [False], probe)
    assert len(held) > len(content) and max(held) == 1
    assert got.stored == [content.replace(b"\r\n..", b"\r\n.")]


# -- smuggling: differential end-of-data detection --------------------------------------------------


def ends(stream: bytes, terminators: tuple[bytes, ...]) -> list[int]:
    """Where a recogniser that accepts ``terminators`` (each "<newline>.<newline>") sees the
    lone dot that ends DATA: its offsets in ``stream``, read as if the DATA line's CRLF came first."""
    window = b"\r\n" + stream
    found = []
    for t in terminators:
        dot = t.index(b".")
        start = window.find(t)
        while start >= 0:
            found.append(start + dot - 2)
            start = window.find(t, start + 1)
    return sorted(set(found))


STRICT = (b"\r\n.\r\n",)
LENIENT = (b"\r\n.\r\n", b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r\n.\r", b"\r.\r\n")


@pytest.mark.parametrize("mode", ["reject", "normalize"])
@pytest.mark.parametrize("sequence", SMUGGLING)
def test_smuggling_sequences_end_nothing_at_the_relay_or_the_next_hop(harnesses: dict[str, Harness], mode: str,
                                                                      sequence: bytes) -> None:
    harness = harnesses[mode]
    smuggled = MAIL + b"\r\n" + RCPTS[2] + b"\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n"
    stream = (b"".join(TRANSACTION) + b"Subject: real\r\n\r\nbody" + sequence + smuggled
              + b"\r\n.\r\nNOOP\r\n")

    @settings(max_examples=60, deadline=None, database=None)
    @given(cuts=st.lists(st.integers(0, len(stream)), max_size=6), settle=st.lists(st.booleans(), min_size=1))
    def run(cuts: list[int], settle: list[bool]) -> None:
        got = check(harness, stream, cuts, settle)
        # One message, never two: the smuggled transaction stayed content or was refused.
        assert len(got.stored) <= 1
        assert [r[:3] for r in got.replies[-2:]] in ([b"250", b"250"], [b"554", b"250"])
        for content in got.stored:
            # What the next hop will see: fastrelay's own stuffing, then the final dot.
            relayed = dot_stuff(content) + b".\r\n"
            true_end = [len(relayed) - 3]    # the dot of the final ".\r\n"
            assert ends(relayed, STRICT) == true_end
            assert ends(relayed, LENIENT) == true_end, (
                f"a next hop lenient about bare CR/LF would see the message end early: {relayed!r}")

    run()
    if mode == "reject":   # every one of these sequences has a bare CR or LF
        assert check(harness, stream, [], [True]).stored == []


@FUZZ
@given(content=st.lists(st.sampled_from([b"a", b".", b"\r\n", b"\n", b"\r", b"..", *SMUGGLING]), max_size=30))
def test_stored_content_never_holds_a_lenient_terminator_after_stuffing(content: list[bytes]) -> None:
    """Whatever was accepted in normalize mode comes out of dot_stuff with one end for every recogniser."""
    model = Rfc5321Model("normalize").run(b"".join(TRANSACTION) + b"".join(content) + b"\r\n.\r\n")
    for stored in model.stored:
        relayed = dot_stuff(stored) + b".\r\n"
        assert ends(relayed, LENIENT) == [len(relayed) - 3], relayed


# -- atheris (opt-in) ---------------------------------------------------------------------------------

ATHERIS = Path(__file__).parent / "reliability" / "atheris_session.py"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FASTRELAY_SLOW", "") != "1", reason="opt-in: set FASTRELAY_SLOW=1")
def test_atheris_session_fuzzer_runs_clean(tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    runs = os.environ.get("FASTRELAY_ATHERIS_RUNS", "20000")
    done = subprocess.run([sys.executable, str(ATHERIS), f"-runs={runs}", "-max_total_time=600",
                           f"-artifact_prefix={tmp_path}/"], capture_output=True, text=True, timeout=900,
                          check=False)
    assert done.returncode == 0, textwrap.shorten(done.stderr[-4000:], 4000)

