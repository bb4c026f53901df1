"""The server's SMTP protocol (fastrelay.server.SmtpSession) driven in process, with no socket.

Run: .venv/bin/pytest bench/test_bench_protocol.py --benchmark-only

The session is the real one behind a real config, policy (``build_policy``)
and Spool, on a uvloop loop as the relay runs; only the socket is replaced,
by ``CaptureTransport``, which records what the session writes.  Bytes go in
through ``data_received`` as the transport would hand them over.  The mail
log's INFO lines are off (pytest leaves the root logger at WARNING), so the
figures are the protocol without the cost of logging.

Groups:
  protocol: pipelined commands   MAIL FROM / RCPT TO x N / RSET in one read,
                                 and the same bytes in 7-byte reads (the cost
                                 of splitting lines across reads).  MAIL
                                 includes the relay decision; RCPT runs
                                 without a quota (none is configured).
                                 extra_info["commands_per_s"]: commands per
                                 round over the median round.
  protocol: DATA framing         1 MiB of content after the 354, in 64 KiB
                                 reads, to the end of data: finding
                                 <CRLF>.<CRLF>, collecting, scanning, dot-
                                 unstuffing, and handing the message to the
                                 spool (the disk write is not timed, see
                                 test_data_framing).  extra_info["MB_per_s"]:
                                 bytes on the wire (10^6 a MB) over the median
                                 round.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvloop

# The fuzz harness's transport (tests/ is not a package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from capture import CaptureTransport

from fastrelay import replies
from fastrelay.app import build_policy
from fastrelay.config import Config, load_config
from fastrelay.policy import RelayPolicy
from fastrelay.server import SmtpServer, SmtpSession, State
from fastrelay.spool import Spool

CONFIG = """
[server]
hostname = "relay.example.test"
listen = ["127.0.0.1:2525"]

[[accounts]]
name = "example"
domains = ["example.com"]

[[accounts.rules]]
name = "loopback"
allowed_senders = "my_domains"
only_allowed_ips = true
ips = [ { range = "127.0.0.0/24" } ]

[delivery]
enabled = false
"""

EHLO = b"EHLO client.example.com\r\n"
MAIL = b"MAIL FROM:<bob@example.com>\r\n"
RSET = b"RSET\r\n"
QUEUED = re.compile(rb"250 2\.0\.0 Ok: queued as ([0-9A-F]+)\r\n\Z")

MESSAGE_BYTES = 1024 * 1024
READ_BYTES = 64 * 1024        # what one read of a busy socket typically hands over


@dataclass
class InProcessServer:
    """An SmtpServer, its spool and its loop; sessions are opened on CaptureTransports."""

    loop: asyncio.AbstractEventLoop
    spool_dir: Path
    spool: Spool
    server: SmtpServer

    def open_session(self) -> tuple[SmtpSession, CaptureTransport]:
        transport = CaptureTransport()
        session = SmtpSession(self.server, implicit_tls=False)
        session.connection_made(transport)
        assert transport.out == self.server.banner
        return session, transport

    def settle(self, session: SmtpSession) -> None:
        """Run the loop until the session's pending spool write has answered.

        The benchmarks call ``data_received`` with the loop stopped, so the
        spool's completion (a call_soon_threadsafe from its writer thread)
        only runs here."""
        self.loop.run_until_complete(_until_idle(session))


async def _until_idle(session: SmtpSession, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while session.busy:
        assert loop.time() < deadline, "the spool write never answered"
        await asyncio.sleep(0.0005)


@pytest.fixture(scope="module")
def relay_config(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, RelayPolicy]:
    path = tmp_path_factory.mktemp("protocol") / "relay.toml"
    path.write_text(CONFIG)
    config = load_config(path)
    return config, build_policy(config)


@pytest.fixture
def relay(relay_config: tuple[Config, RelayPolicy]) -> Iterator[InProcessServer]:
    config, policy = relay_config
    # Removed after each test: the framing benchmark stores 1 MiB per round.
    spool_dir = Path(tempfile.mkdtemp(prefix="fastrelay-bench-protocol-"))
    loop = uvloop.new_event_loop()
    spool = Spool(spool_dir)
    try:
        spool.recover()
        spool.start(loop)

        async def make_server() -> SmtpServer:
            return SmtpServer(config, policy, spool)   # it takes the running loop

        yield InProcessServer(loop, spool_dir, spool, loop.run_until_complete(make_server()))
    finally:
        spool.close()
        loop.close()
        shutil.rmtree(spool_dir, ignore_errors=True)


def per_second(benchmark: Any, key: str, amount: float) -> None:
    # No stats under --benchmark-disable: the function ran once, untimed.
    if benchmark.stats is not None:
        benchmark.extra_info[key] = amount / benchmark.stats.stats.median


# ---------------------------------------------------------------------------
# Pipelined commands
# ---------------------------------------------------------------------------

@pytest.mark.benchmark(group="protocol: pipelined commands")
@pytest.mark.parametrize("read_size", [0, 7], ids=["one-read", "7-byte-reads"])
@pytest.mark.parametrize("rcpts", [10, 100])   # 100 is the per-transaction limit
def test_pipelined_commands(benchmark: Any, relay: InProcessServer, rcpts: int, read_size: int) -> None:
    session, transport = relay.open_session()
    session.data_received(EHLO)
    assert session.state == State.READY, bytes(transport.out)
    batch = MAIL + b"".join(b"RCPT TO:<r%d@dest.test>\r\n" % i for i in range(rcpts)) + RSET
    reads = [batch] if not read_size else [batch[i:i + read_size] for i in range(0, len(batch), read_size)]
    # RSET leaves the session as EHLO did, so one session serves every round.
    expected = replies.SENDER_OK + replies.RCPT_OK * rcpts + replies.RESET_OK

    def feed() -> None:
        for piece in reads:
            session.data_received(piece)

    benchmark.extra_info["commands_per_round"] = rcpts + 2
    benchmark.extra_info["reads_per_round"] = len(reads)
    benchmark.pedantic(feed, setup=transport.out.clear, rounds=300, warmup_rounds=10)
    # Whatever the read size, every command is answered, in order, with its 250.
    assert bytes(transport.out) == expected
    assert session.state == State.READY and not session.busy and not session.buffer
    per_second(benchmark, "commands_per_s", rcpts + 2)


# ---------------------------------------------------------------------------
# DATA framing
# ---------------------------------------------------------------------------

PROSE = textwrap.wrap(
    "The quarterly figures are attached. Revenue rose in every region except the north, "
    "where the new warehouse opened late. Please review the numbers before Thursday. "
    "Costs were flat, e.g. freight at 4.2% of sales, and headcount grew by 3. "
    "If anything looks off, reply to this message or call the finance desk. "
    "Minutes of the last meeting follow below, as promised. Nothing was decided on the "
    "office move; it comes back next month. Thanks to everyone who sent their reports on time.",
    width=76)


def message(size: int, dot_lines: bool) -> tuple[bytes, bytes]:
    """(the DATA stream a client sends, ending in <CRLF>.<CRLF>; the content the relay must store).

    Text lines of up to 76 bytes with the periods prose has (the end-of-data
    search looks for "." first).  With ``dot_lines`` one line in ten starts
    with "." and one in fifty is a lone ".", so the client doubles them and
    the relay must take them out again (RFC 5321 §4.5.2)."""
    head = (b"From: Bob <bob@example.com>\r\nTo: carol@dest.test\r\nSubject: framing\r\n"
            b"Message-ID: <framing@example.com>\r\n\r\n")
    content = [head]
    stream = [head]
    total = len(head)
    i = 0
    while total < size:
        line = PROSE[i % len(PROSE)].encode() + b"\r\n"
        if dot_lines and i % 50 == 0:
            line = b".\r\n"
        elif dot_lines and i % 10 == 0:
            line = b"." + line
        content.append(line)
        wire = b"." + line if line.startswith(b".") else line
        stream.append(wire)
        total += len(wire)
        i += 1
    return b"".join(stream) + b".\r\n", b"".join(content)


def content_of(body: bytes, queue_id: str) -> bytes:
    """The content as received: the spooled body without the relay's Received: header.

    The header's line with ``id QUEUEID`` is followed by exactly one more
    line (``for <rcpt>; date``), as tests/conftest.py's split_received says."""
    assert body.startswith(b"Received: from "), body[:80]
    at = body.index(f" id {queue_id}".encode())
    id_line_end = body.index(b"\r\n", at) + 2
    return body[body.index(b"\r\n", id_line_end) + 2:]


@pytest.mark.benchmark(group="protocol: DATA framing")
@pytest.mark.parametrize("dot_lines", [True, False], ids=["dot-lines", "no-dot-lines"])
def test_data_framing(benchmark: Any, relay: InProcessServer, dot_lines: bool) -> None:
    stream, content = message(MESSAGE_BYTES, dot_lines)
    assert len(content) < relay.server.cfg.max_message_size   # refused would time a shorter path
    assert (b"\r\n." in content) == dot_lines
    reads = [stream[i:i + READ_BYTES] for i in range(0, len(stream), READ_BYTES)]
    envelope = MAIL + b"RCPT TO:<carol@dest.test>\r\nDATA\r\n"
    sessions: list[tuple[SmtpSession, CaptureTransport]] = []

    # Where the timing stops: the last read makes _feed_data find the end,
    # _end_of_data join, scan and unstuff the content, and _queue build the
    # envelope and hand it to Spool.append_message, which only appends to
    # the writer thread's batch and returns a future.  The session answers
    # from that future's callback, which the writer thread schedules on the
    # loop after its fdatasync; feed() runs with the loop stopped, so the
    # write and the 250 happen in finish(), untimed.  finish() also waits for
    # the write, so no round's fsync overlaps the next round's timing.  A
    # fresh session per round (setup) keeps each round one whole transaction.
    def begin() -> tuple[tuple[SmtpSession], dict[str, Any]]:
        session, transport = relay.open_session()
        transport.out.clear()
        session.data_received(EHLO)
        transport.out.clear()
        session.data_received(envelope)
        assert bytes(transport.out) == replies.SENDER_OK + replies.RCPT_OK + replies.START_DATA
        transport.out.clear()
        sessions.append((session, transport))
        return (session,), {}

    def feed(session: SmtpSession) -> None:
        for piece in reads:
            session.data_received(piece)

    def finish(session: SmtpSession) -> None:
        if session.state != State.CLOSED:
            relay.settle(session)
            session.connection_lost(None)   # or max_connections_per_ip runs out

    benchmark.extra_info["wire_bytes"] = len(stream)
    benchmark.pedantic(feed, setup=begin, teardown=finish, rounds=40, warmup_rounds=3)
    # --benchmark-disable runs feed() once and no teardown.
    for session, _ in sessions:
        finish(session)
    per_second(benchmark, "MB_per_s", len(stream) / 1e6)

    queue_ids = []
    for _, transport in sessions:
        queued = QUEUED.fullmatch(bytes(transport.out))
        assert queued is not None, bytes(transport.out)[-200:]
        queue_ids.append(queued.group(1).decode())
    stored = Spool(relay.spool_dir).scan()
    assert [m.envelope.queue_id for m in stored] == queue_ids
    reader = Spool(relay.spool_dir)
    for m in stored:
        assert m.envelope.dot_lines == dot_lines
        assert content_of(reader.read_body(m), m.envelope.queue_id) == content
