"""DATA framing over loopback: the end of data, dot-unstuffing, size limits, SMTP smuggling.

RFC 5321 §4.1.1.4: only ``<CR><LF>.<CR><LF>`` ends the content; §4.5.2: the
server removes the first dot of every line that starts with one; §2.3.8: lines
end with CRLF, and a bare CR or LF could make the next hop see a different
message end (SMTP smuggling, CVE-2023-51764 class), so the relay refuses it
(``bare_newline = "reject"``, the default) or turns bare LFs into CRLFs
(``"normalize"``) — never ends DATA on anything else.

The reference model here (``rfc5321_data``) is what the server must do with a
byte stream after its 354; the tests compare the relay against it, with the
stream split at every offset and at random places.
"""

from __future__ import annotations

import socket
import time

import pytest
from conftest import RawClient, RelayProcess, queue_id_of, split_received, spooled
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fastrelay import replies


# These tests send hundreds of refused messages on one connection on purpose; the
# session's error limit (hard_error_limit, tested in test_smtp_server.py) is moved aside.
MODULE_RELAY_SERVER_EXTRA = "hard_error_limit = 1000000"

HELO = "client.example.com"
SENDER = "bob@example.com"
RCPT = "carol@dest.test"
OPEN = f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n".encode()
EVIL = b"MAIL FROM:<bob@example.com>\r\nRCPT TO:<evil@dest.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n"


def wire(reply: bytes) -> bytes:
    return reply.removesuffix(b"\r\n")


def stuff(content: bytes) -> bytes:
    """RFC 5321 §4.5.2, client side."""
    return (b"\r\n" + content).replace(b"\r\n.", b"\r\n..")[2:]


def rfc5321_data(stream: bytes) -> tuple[bytes | None, bytes]:
    """Reference model: (content to store or None if refused for a bare CR/LF, bytes after the end).

    The CRLF that ended the DATA command counts as the start of the first
    line, so ``.<CR><LF>`` right after the 354 is an empty message.
    """
    window = b"\r\n" + stream
    end = window.find(b"\r\n.\r\n")
    assert end >= 0, "no end of data in the stream"
    content, rest = window[2:end + 2], window[end + 5:]
    lines = content.split(b"\r\n")
    if any(b"\r" in line or b"\n" in line for line in lines):
        return None, rest
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines), rest


def client_for(relay: RelayProcess) -> RawClient:
    client = RawClient(relay.port)
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    assert client.cmd(f"EHLO {HELO}".encode())[:4] == b"250-"
    return client


def open_data(client: RawClient) -> None:
    client.send(OPEN)
    assert [client.reply() for _ in range(3)] == [
        wire(replies.SENDER_OK), wire(replies.RCPT_OK), wire(replies.START_DATA)]


def queue_ids(relay: RelayProcess) -> set[str]:
    return {env.queue_id for env, _ in relay.queued()}  # type: ignore[attr-defined]


def stored(relay: RelayProcess, queue_id: str) -> bytes:
    envelope, _, content = spooled(relay, queue_id)
    assert envelope.sender == SENDER and envelope.recipients == [RCPT]  # type: ignore[attr-defined]
    return content


# -- end of data and unstuffing ---------------------------------------------------------------

EXACT = [
    pytest.param(b".\r\n", b"", id="empty-message"),
    pytest.param(b"\r\n.\r\n", b"\r\n", id="one-empty-line"),
    pytest.param(b"..\r\n.\r\n", b".\r\n", id="lone-dot-line"),
    pytest.param(b"a\r\n..b\r\n...c\r\n....\r\n.\r\n", b"a\r\n.b\r\n..c\r\n...\r\n", id="stuffed-dots"),
    # A client that forgot to stuff: the first dot still goes (RFC 5321 §4.5.2).
    pytest.param(b".x\r\n.\r\n", b"x\r\n", id="unstuffed-by-client"),
    pytest.param(b"a.\r\n. \r\n.\t\r\n.\r\n", b"a.\r\n \r\n\t\r\n", id="dot-then-blank"),
    pytest.param(b"nul \x00 and del \x7f\r\n.\r\n", b"nul \x00 and del \x7f\r\n", id="nul-and-del"),
    pytest.param(b"x" * 5000 + b"\r\n.\r\n", b"x" * 5000 + b"\r\n", id="line-over-998"),
]


@pytest.mark.parametrize(("stream", "content"), EXACT)
def test_content_stored_exactly(module_relay: RelayProcess, stream: bytes, content: bytes) -> None:
    assert rfc5321_data(stream) == (content, b"")
    client = client_for(module_relay)
    try:
        open_data(client)
        # The next command rides in the same write as the end of data.
        client.send(stream + b"NOOP\r\n")
        queue_id = queue_id_of(client.reply())
        assert client.reply() == wire(replies.NOOP_OK)
    finally:
        client.close()
    assert stored(module_relay, queue_id) == content


def test_large_message_in_one_write(module_relay: RelayProcess) -> None:
    line = bytes(range(32, 127)) + b"\r\n"
    content = b"Subject: big\r\n\r\n" + (line + b"." + line) * 6000    # ~1.1 MB
    client = client_for(module_relay)
    try:
        open_data(client)
        queue_id = queue_id_of(client.cmd(stuff(content) + b".\r\n"))
    finally:
        client.close()
    assert stored(module_relay, queue_id) == content


# -- size limit -------------------------------------------------------------------------------------


def test_message_over_max_message_size(relay_factory: object) -> None:
    relay: RelayProcess = relay_factory(server_extra="max_message_size = 2048")  # type: ignore[operator]
    line = b"x" * 98 + b"\r\n"
    exact = line * 20 + b"y" * 46 + b"\r\n"
    assert len(exact) == 2048
    client = RawClient(relay.port)
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        assert b"\r\n250-SIZE 2048\r\n" in client.cmd(f"EHLO {HELO}".encode())
        assert client.cmd(f"MAIL FROM:<{SENDER}> SIZE=2049".encode()) == wire(replies.MESSAGE_TOO_BIG)
        for too_big in (line * 30, exact + b"z\r\n", line * 2000):
            open_data(client)
            assert client.cmd(too_big + b".\r\n") == wire(replies.MESSAGE_TOO_BIG)
            assert client.cmd(b"NOOP") == wire(replies.NOOP_OK)
        assert relay.queued() == []
        ids = []
        # Exactly at the limit: accepted, also when the terminator straddles two reads...
        open_data(client)
        ids.append(queue_id_of(client.cmd(exact + b".\r\n")))
        open_data(client)
        client.send(exact + b".\r")
        time.sleep(0.05)
        client.send(b"\n")
        ids.append(queue_id_of(client.reply()))
        # ...and when dot-stuffing makes the stream longer (RFC 1870: the size
        # does not count the doubled dots).
        dotted = (b"." + line[1:]) * 20 + b"y" * 46 + b"\r\n"
        open_data(client)
        ids.append(queue_id_of(client.cmd(stuff(dotted) + b".\r\n")))
    finally:
        client.close()
    assert [stored(relay, i) for i in ids] == [exact, exact, dotted]


# -- bare CR / LF and SMTP smuggling ------------------------------------------------------------------

BARE = [
    pytest.param(b"a\nb\r\n", id="bare-lf"),
    pytest.param(b"a\rb\r\n", id="bare-cr"),
    pytest.param(b"a\r\r\n", id="cr-crlf"),
    pytest.param(b"end\n", id="lf-before-terminator"),
    pytest.param(b"\n", id="lone-lf"),
    pytest.param(b"a\n\rb\r\n", id="lf-cr"),
]


@pytest.mark.parametrize("content", BARE)
def test_bare_newline_in_content_is_refused(module_relay: RelayProcess, content: bytes) -> None:
    stream = b"Subject: bare\r\n\r\n" + content + b"\r\n.\r\n"
    assert rfc5321_data(stream) == (None, b"")
    before = queue_ids(module_relay)
    client = client_for(module_relay)
    try:
        open_data(client)
        assert client.cmd(stream) == wire(replies.BARE_NEWLINE_DATA)
        assert client.cmd(b"NOOP") == wire(replies.NOOP_OK)
        # The session goes on: the next message is taken.
        open_data(client)
        queue_id = queue_id_of(client.cmd(b"fine\r\n.\r\n"))
    finally:
        client.close()
    assert queue_ids(module_relay) - before == {queue_id}


def test_many_refused_messages_pipelined_in_one_write(module_relay: RelayProcess) -> None:
    """Hundreds of messages refused at their end, in one write: every reply, in order.

    (The relay used to recurse once per such message and ran out of stack,
    answering 451 and then reading message content as commands.)"""
    before = queue_ids(module_relay)
    n = 1500
    client = client_for(module_relay)
    try:
        client.send((OPEN + b"x\ny\r\n.\r\n") * n + b"NOOP\r\n")
        expected = [wire(replies.SENDER_OK), wire(replies.RCPT_OK), wire(replies.START_DATA),
                    wire(replies.BARE_NEWLINE_DATA)]
        for i in range(n):
            assert [client.reply() for _ in range(4)] == expected, i
        assert client.reply() == wire(replies.NOOP_OK)
    finally:
        client.close()
    assert queue_ids(module_relay) == before


SMUGGLING = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\r.\r\n", b"\n.\r", b"\r\n.\r"]


@pytest.mark.parametrize("sequence", SMUGGLING, ids=lambda s: s.decode().replace("\r", "CR").replace("\n", "LF"))
def test_smuggling_sequence_does_not_end_data(module_relay: RelayProcess, sequence: bytes) -> None:
    stream = b"Subject: smuggle\r\n\r\nbefore" + sequence + EVIL + b".\r\n"
    assert rfc5321_data(stream) == (None, b"")
    before = queue_ids(module_relay)
    client = client_for(module_relay)
    try:
        open_data(client)
        client.send(stream)
        # One reply for the whole stream, refusing it; nothing else is pending.
        assert client.reply() == wire(replies.BARE_NEWLINE_DATA)
        assert client.cmd(b"NOOP") == wire(replies.NOOP_OK)
        assert not client.closed(timeout=0.2) and client.buf == b""
    finally:
        client.close()
    assert queue_ids(module_relay) == before
    assert "evil@dest.test" not in module_relay.log()


def test_smuggling_sequence_split_across_reads(module_relay: RelayProcess) -> None:
    """The same, with the stream cut inside each smuggling sequence."""
    before = queue_ids(module_relay)
    client = client_for(module_relay)
    try:
        for sequence in SMUGGLING:
            stream = b"before" + sequence + EVIL + b".\r\n"
            for cut in range(6, 6 + len(sequence) + 1):
                open_data(client)
                client.send(stream[:cut])
                time.sleep(0.002)
                assert client.cmd(stream[cut:]) == wire(replies.BARE_NEWLINE_DATA)
        assert client.cmd(b"NOOP") == wire(replies.NOOP_OK)
    finally:
        client.close()
    assert queue_ids(module_relay) == before


def test_normalize_mode(relay_factory: object) -> None:
    relay: RelayProcess = relay_factory(server_extra='bare_newline = "normalize"')  # type: ignore[operator]
    client = client_for(relay)
    try:
        # A legacy device with bare-LF lines: stored with CRLF only.
        open_data(client)
        queue_ids_sent = [queue_id_of(client.cmd(b"Subject: lf\n\nline 1\nline 2\r\nline 3\r\n.\r\n"))]
        # A bare-LF "end of data" does not end DATA: the NOOP behind it is content.
        open_data(client)
        client.send(b"Subject: lf end\n\nbody\n.\nNOOP\r\n")
        time.sleep(0.05)
        queue_ids_sent.append(queue_id_of(client.cmd(b".\r\n")))
        # Smuggling payloads stay inside one message for one recipient.
        for sequence in (b"\n.\n", b"\n.\r\n", b"\r\n.\n"):
            open_data(client)
            queue_ids_sent.append(queue_id_of(client.cmd(b"before" + sequence + EVIL + b".\r\n")))
        # A bare CR is still refused.
        for sequence in (b"\r.\r", b"\r.\r\n", b"a\rb\r\n"):
            open_data(client)
            assert client.cmd(b"before" + sequence + EVIL + b".\r\n") == wire(replies.BARE_NEWLINE_DATA)
        assert client.cmd(b"NOOP") == wire(replies.NOOP_OK)
    finally:
        client.close()
    expected = [
        b"Subject: lf\r\n\r\nline 1\r\nline 2\r\nline 3\r\n",
        # ".\n" became ".\r\n", then lost its dot like any dot-led line (RFC 5321 §4.5.2).
        b"Subject: lf end\r\n\r\nbody\r\n\r\nNOOP\r\n",
        b"before\r\n\r\n" + EVIL,
        b"before\r\n\r\n" + EVIL,
        b"before\r\n\r\n" + EVIL,
    ]
    assert [stored(relay, i) for i in queue_ids_sent] == expected
    assert len(relay.queued()) == len(expected)
    for content in expected:
        assert b"\r" not in content.replace(b"\r\n", b"") and b"\n" not in content.replace(b"\r\n", b"")


def test_long_lines_reject_mode(relay_factory: object) -> None:
    """long_lines = "reject": a content line over RFC 5322's 998 octets refuses the message;
    998 octets pass, the stuffing dot and the CRLF not counted, wherever the reads cut the line."""
    relay: RelayProcess = relay_factory(server_extra='long_lines = "reject"')  # type: ignore[operator]
    fits = b"Subject: 998\r\n\r\n" + b"a" * 998 + b"\r\n." + b"b" * 997 + b"\r\n"
    too_long = b"Subject: 999\r\n\r\n" + b"c" * 999 + b"\r\nlast\r\n"
    client = client_for(relay)
    try:
        sent = []
        for cut in (0, 20, 500, 1017, 1018, 1019, 1500):
            for content in (fits, too_long):
                open_data(client)
                stream = stuff(content) + b".\r\n"
                client.send(stream[:cut])
                time.sleep(0.01)   # two reads, most of the time
                client.send(stream[cut:])
                reply = client.reply()
                if content is fits:
                    sent.append(queue_id_of(reply))
                else:
                    assert reply == wire(replies.LONG_LINE_DATA), cut
        assert client.cmd(b"NOOP") == wire(replies.NOOP_OK)
    finally:
        client.close()
    assert [stored(relay, i) for i in sent] == [fits] * len(sent)
    assert len(relay.queued()) == len(sent)
    relay.wait_log("NOQUEUE: reject: DATA from client.example.com[127.0.0.1]: a line longer than 998 octets")


def test_long_lines_are_passed_and_logged_by_default(module_relay: RelayProcess) -> None:
    content = b"Subject: long\r\n\r\n" + b"d" * 999 + b"\r\n"
    client = client_for(module_relay)
    try:
        open_data(client)
        queue_id = queue_id_of(client.cmd(content + b".\r\n"))
    finally:
        client.close()
    assert stored(module_relay, queue_id) == content
    module_relay.wait_log("a line longer than 998 octets, passed as it is (server.long_lines = accept)")


# -- every split offset, and a property test against the model ------------------------------------

SPLIT_CONTENT = b"Subject: split\r\n\r\n.lead\r\n\r\n.\r\n..\r\nend.\r\n"


def test_split_at_every_offset(module_relay: RelayProcess) -> None:
    """One transaction (commands and content) sent as two writes, cut at every byte offset.

    TCP_NODELAY and a short pause make the relay see two reads in practice
    (loopback may still merge them now and then; every cut is tried anyway)."""
    transaction = OPEN + stuff(SPLIT_CONTENT) + b".\r\n"
    expected = [wire(replies.SENDER_OK), wire(replies.RCPT_OK), wire(replies.START_DATA)]
    ids = []
    client = client_for(module_relay)
    try:
        for cut in range(1, len(transaction)):
            client.send(transaction[:cut])
            time.sleep(0.002)
            client.send(transaction[cut:])
            assert [client.reply() for _ in range(3)] == expected, cut
            ids.append(queue_id_of(client.reply()))
        assert client.cmd(b"NOOP") == wire(replies.NOOP_OK)
    finally:
        client.close()
    assert len(set(ids)) == len(transaction) - 1
    by_id = {env.queue_id: body for env, body in module_relay.queued()}  # type: ignore[attr-defined]
    for queue_id in ids:
        assert split_received(by_id[queue_id], queue_id)[1] == SPLIT_CONTENT


TOKENS = st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"\r\n.", b".\r\n", b".."])


def test_end_of_data_matches_the_model(module_relay: RelayProcess) -> None:
    """Random content streams, cut at random places, against ``rfc5321_data``."""
    client = client_for(module_relay)
    results: list[tuple[str, bytes]] = []

    @settings(max_examples=40, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(tokens=st.lists(TOKENS, max_size=30), cuts=st.lists(st.integers(0, 200), max_size=3))
    def check(tokens: list[bytes], cuts: list[int]) -> None:
        stream = b"".join(tokens) + b"\r\n.\r\n"
        content, rest = rfc5321_data(stream)
        assume(rest == b"")  # an earlier end of data would make the tail commands
        open_data(client)
        points = sorted({c for c in cuts if 0 < c < len(stream)})
        for a, b in zip([0, *points], points):
            client.send(stream[a:b])
            time.sleep(0.001)
        client.send(stream[points[-1] if points else 0:])
        reply = client.reply()
        if content is None:
            assert reply == wire(replies.BARE_NEWLINE_DATA), stream
        else:
            results.append((queue_id_of(reply), content))

    try:
        check()
        assert client.cmd(b"NOOP") == wire(replies.NOOP_OK)
    finally:
        client.close()
    by_id = {env.queue_id: body for env, body in module_relay.queued()}  # type: ignore[attr-defined]
    for queue_id, content in results:
        assert split_received(by_id[queue_id], queue_id)[1] == content
