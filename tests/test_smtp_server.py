"""The SMTP server protocol, over loopback, against a real ``fastrelay serve``.

Clients are Python's smtplib (what most scripts and devices amount to) and
``RawClient`` for byte-exact and malformed input.  Every check is on what a
client sees (reply codes, enhanced codes and texts from ``fastrelay.replies``)
or on what the spool holds on disk, byte for byte.

Tests that only need the default config share one relay per module
(``module_relay``) and look only at their own queue ids; tests that need a
special config or kill/signal the relay start their own.
"""

from __future__ import annotations

import base64
import os
import random
import re
import select
import shutil
import signal
import smtplib
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
from conftest import (
    ALICE_PASSWORD,
    HOSTNAME,
    RawClient,
    RelayProcess,
    TlsRawClient,
    queue_id_of,
    spooled,
    start_tls,
)

from fastrelay import replies
from fastrelay.config import ServerConfig
from fastrelay.server import AuthThrottle, client_key

CLIENT_IP = "127.0.0.1"
HELO = "client.example.com"
SENDER = "bob@example.com"
RCPT = "carol@dest.test"
QUIT_REPLY = f"221 2.0.0 {HOSTNAME} closing connection".encode()
TLS_DESCRIPTION = re.compile(r"^TLSv1\.[23] with cipher \S+ \(\d+/\d+ bits\)$")

# Header, an empty line, and lines that need dot-stuffing on the wire (a lone
# "." included): smtplib stuffs them, the relay must store them unstuffed.
CONTENT = (
    b"From: Bob <bob@example.com>\r\n"
    b"To: Carol <carol@dest.test>\r\n"
    b"Subject: protocol test\r\n"
    b"Message-ID: <protocol-test@example.com>\r\n"
    b"\r\n"
    b"Hello Carol,\r\n"
    b".a line that starts with a dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b"\r\n"
    b"end\r\n"
)


def wire(reply: bytes) -> bytes:
    """A reply constant as RawClient.reply() returns it (no final CRLF)."""
    return reply.removesuffix(b"\r\n")


def stuff(content: bytes) -> bytes:
    """RFC 5321 §4.5.2: the client doubles a leading dot on every line."""
    return (b"\r\n" + content).replace(b"\r\n.", b"\r\n..")[2:]


def send_one(smtp: smtplib.SMTP, content: bytes = CONTENT, sender: str = SENDER,
             rcpts: tuple[str, ...] = (RCPT,), mail_options: tuple[str, ...] = ()) -> str:
    """One transaction with smtplib; returns the queue id from the 250."""
    smtp.ehlo_or_helo_if_needed()
    assert smtp.mail(sender, list(mail_options)) == (250, wire(replies.SENDER_OK)[4:])
    for rcpt in rcpts:
        assert smtp.rcpt(rcpt) == (250, wire(replies.RCPT_OK)[4:])
    code, text = smtp.data(content)
    assert code == 250, text
    return queue_id_of(text)


def check_stored(relay: RelayProcess, queue_id: str, content: bytes, *, sender: str = SENDER,
                 rcpts: tuple[str, ...] = (RCPT,), helo: str = HELO, tls: bool = False,
                 auth_user: str | None = None, protocol: str = "ESMTP", client_ip: str = CLIENT_IP) -> object:
    """The spooled message: envelope fields and content byte for byte after Received:."""
    envelope, header, stored = spooled(relay, queue_id)
    assert stored == content
    assert envelope.queue_id == queue_id  # type: ignore[attr-defined]
    assert envelope.sender == sender  # type: ignore[attr-defined]
    assert envelope.recipients == list(rcpts)  # type: ignore[attr-defined]
    assert envelope.client_ip == client_ip  # type: ignore[attr-defined]
    assert envelope.client_helo == helo  # type: ignore[attr-defined]
    assert envelope.auth_user == auth_user  # type: ignore[attr-defined]
    if tls:
        assert TLS_DESCRIPTION.match(envelope.tls or ""), envelope.tls  # type: ignore[attr-defined]
    else:
        assert envelope.tls is None  # type: ignore[attr-defined]
    first = f"Received: from {helo} (unknown [{client_ip}])\r\n".encode()
    assert header.startswith(first)
    assert f"by {HOSTNAME} (fastrelay) with {protocol} id {queue_id}".encode() in header
    if len(rcpts) == 1:
        assert f"\tfor <{rcpts[0]}>; ".encode() in header
    return envelope


def ehlo_reply(tls: bool, size: int = 26_214_400) -> bytes:
    last = "AUTH PLAIN LOGIN" if tls else "STARTTLS"
    lines = [f"{HOSTNAME} at your service, [{CLIENT_IP}]", "PIPELINING", f"SIZE {size}",
             "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8", last]
    return "\r\n".join(f"250-{line}" for line in lines[:-1]).encode() + f"\r\n250 {lines[-1]}".encode()


# -- 1. transactions with smtplib ---------------------------------------------------


def test_plain_message_is_queued_byte_for_byte(module_relay: RelayProcess) -> None:
    with smtplib.SMTP("127.0.0.1", module_relay.port, local_hostname=HELO) as smtp:
        smtp.ehlo()
        queue_id = send_one(smtp)
    envelope = check_stored(module_relay, queue_id, CONTENT)
    assert envelope.account == "example" and envelope.rule == "loopback"  # type: ignore[attr-defined]
    assert not envelope.smtputf8 and not envelope.body_8bit  # type: ignore[attr-defined]


def test_helo_client_is_recorded_as_smtp(module_relay: RelayProcess) -> None:
    with smtplib.SMTP("127.0.0.1", module_relay.port, local_hostname=HELO) as smtp:
        assert smtp.helo() == (250, f"{HOSTNAME} at your service, [{CLIENT_IP}]".encode())
        queue_id = send_one(smtp)
    check_stored(module_relay, queue_id, CONTENT, protocol="SMTP")


def test_several_recipients_keep_their_order(module_relay: RelayProcess) -> None:
    rcpts = ("zed@dest.test", "amy@Dest.TEST", "carol@other.test")
    with smtplib.SMTP("127.0.0.1", module_relay.port, local_hostname=HELO) as smtp:
        queue_id = send_one(smtp, rcpts=rcpts)
    # The domain is lower-cased, the local part kept as is.
    check_stored(module_relay, queue_id, CONTENT, rcpts=("zed@dest.test", "amy@dest.test", "carol@other.test"))


def test_starttls_message(module_relay: RelayProcess) -> None:
    with smtplib.SMTP("127.0.0.1", module_relay.port, local_hostname=HELO) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("starttls") and not smtp.has_extn("auth")
        code, _ = smtp.starttls(context=module_relay.certs.client_context())
        assert code == 220
        smtp.ehlo("tls.example.com")
        assert not smtp.has_extn("starttls") and smtp.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        queue_id = send_one(smtp)
    check_stored(module_relay, queue_id, CONTENT, helo="tls.example.com", tls=True, protocol="ESMTPS")


def test_implicit_tls_message(module_relay: RelayProcess) -> None:
    ctx = module_relay.certs.client_context()
    with smtplib.SMTP_SSL("127.0.0.1", module_relay.tls_port, local_hostname=HELO, context=ctx) as smtp:
        smtp.ehlo()
        assert not smtp.has_extn("starttls") and smtp.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        queue_id = send_one(smtp)
    check_stored(module_relay, queue_id, CONTENT, tls=True, protocol="ESMTPS")


def test_authenticated_message_records_the_user(module_relay: RelayProcess) -> None:
    # From an address outside the loopback rule's range: only AUTH admits it.
    ctx = module_relay.certs.client_context()
    with smtplib.SMTP_SSL("127.0.0.1", module_relay.tls_port, local_hostname=HELO, context=ctx,
                          source_address=("127.0.1.5", 0)) as smtp:
        smtp.ehlo()
        assert smtp.mail("alice@example.com") == (530, wire(replies.AUTH_REQUIRED)[4:])
        assert smtp.rset()[0] == 250
        assert smtp.login("alice@example.com", ALICE_PASSWORD) == (235, wire(replies.AUTH_OK)[4:])
        queue_id = send_one(smtp, sender="alice@example.com")
    envelope = check_stored(module_relay, queue_id, CONTENT, sender="alice@example.com", tls=True,
                            auth_user="alice@example.com", protocol="ESMTPSA", client_ip="127.0.1.5")
    _, header, _ = spooled(module_relay, queue_id)
    assert b"\t(Authenticated sender: alice@example.com)\r\n" in header
    assert envelope.rule == "authenticated"  # type: ignore[attr-defined]


def test_many_transactions_on_one_connection(module_relay: RelayProcess) -> None:
    contents = [CONTENT, b"Subject: second\r\n\r\nsecond\r\n", b"Subject: third\r\n\r\n.\r\n..\r\n"]
    ids = []
    with smtplib.SMTP("127.0.0.1", module_relay.port, local_hostname=HELO) as smtp:
        smtp.ehlo()
        ids.append(send_one(smtp, contents[0]))
        # A transaction abandoned with RSET leaves nothing behind.
        assert smtp.mail(SENDER) [0] == 250
        assert smtp.rcpt("abandoned@dest.test")[0] == 250
        assert smtp.rset() == (250, wire(replies.RESET_OK)[4:])
        assert smtp.rcpt(RCPT) == (503, wire(replies.NEED_MAIL)[4:])
        ids.append(send_one(smtp, contents[1], sender="dave@example.org"))
        assert smtp.rset()[0] == 250
        ids.append(send_one(smtp, contents[2], rcpts=("x@dest.test", "y@dest.test")))
    assert len(set(ids)) == 3
    check_stored(module_relay, ids[0], contents[0])
    check_stored(module_relay, ids[1], contents[1], sender="dave@example.org")
    check_stored(module_relay, ids[2], contents[2], rcpts=("x@dest.test", "y@dest.test"))
    assert not any("abandoned@dest.test" in env.recipients  # type: ignore[attr-defined]
                   for env, _ in module_relay.queued())


def test_pipelined_transactions_replies_in_order(module_relay: RelayProcess) -> None:
    """RFC 2920: a whole session in one write; the replies come back in command order."""
    second = b"Subject: pipelined 2\r\n\r\n.dot\r\n"
    client = RawClient(module_relay.port)
    try:
        assert client.cmd(f"EHLO {HELO}".encode()) == ehlo_reply(tls=False)
        client.send(
            b"MAIL FROM:<bob@example.com>\r\nRCPT TO:<a@dest.test>\r\nRCPT TO:<>\r\n"
            b"RCPT TO:<b@dest.test>\r\nDATA\r\n" + stuff(CONTENT) + b".\r\n"
            b"MAIL FROM:<dave@example.org> BODY=7BIT\r\nRCPT TO:<c@dest.test>\r\nDATA\r\n"
            + stuff(second) + b".\r\n"
            b"RSET\r\nMAIL FROM:<bob@example.com>\r\nNOOP\r\nRSET\r\nNOOP\r\nQUIT\r\n"
        )
        assert client.reply() == wire(replies.SENDER_OK)
        assert client.reply() == wire(replies.RCPT_OK)
        assert client.reply() == wire(replies.BAD_RCPT_SYNTAX)
        assert client.reply() == wire(replies.RCPT_OK)
        assert client.reply() == wire(replies.START_DATA)
        first_id = queue_id_of(client.reply())
        assert client.reply() == wire(replies.SENDER_OK)
        assert client.reply() == wire(replies.RCPT_OK)
        assert client.reply() == wire(replies.START_DATA)
        second_id = queue_id_of(client.reply())
        for expected in (replies.RESET_OK, replies.SENDER_OK, replies.NOOP_OK, replies.RESET_OK,
                         replies.NOOP_OK):
            assert client.reply() == wire(expected)
        assert client.reply() == QUIT_REPLY
        assert client.closed()
    finally:
        client.close()
    check_stored(module_relay, first_id, CONTENT, rcpts=("a@dest.test", "b@dest.test"))
    check_stored(module_relay, second_id, second, sender="dave@example.org", rcpts=("c@dest.test",))


def test_replies_before_a_closing_command_are_not_lost(module_relay: RelayProcess) -> None:
    """Commands pipelined in front of QUIT (or of an EHLO that closes) get their replies first."""
    client = RawClient(module_relay.port)
    try:
        client.send(f"EHLO {HELO}\r\nNOOP\r\nRSET\r\nQUIT\r\n".encode())
        assert client.reply() == ehlo_reply(tls=False)
        assert client.reply() == wire(replies.NOOP_OK)
        assert client.reply() == wire(replies.RESET_OK)
        assert client.reply() == QUIT_REPLY
        assert client.closed()
    finally:
        client.close()
    client = RawClient(module_relay.port)
    try:
        client.send(b"NOOP\r\nEHLO\r\n")
        assert client.reply() == wire(replies.NOOP_OK)
        assert client.reply() == wire(replies.EMPTY_HELO)
        assert client.closed()
    finally:
        client.close()


def test_8bitmime_body(module_relay: RelayProcess) -> None:
    content = "Subject: Grüße\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nÄpfel, Birnen, 日本語\r\n".encode()
    content += b"latin-1: \xe4\xf6\xfc\r\n\x80\xff\r\n"
    with smtplib.SMTP("127.0.0.1", module_relay.port, local_hostname=HELO) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("8bitmime")
        queue_id = send_one(smtp, content, mail_options=("BODY=8BITMIME",))
        # No BODY= parameter but 8-bit content: the envelope still says so.
        undeclared = send_one(smtp, content)
        # Declared 8BITMIME but plain ASCII: nothing 8-bit to carry.
        ascii_only = b"Subject: plain\r\n\r\nonly ASCII here\r\n"
        declared_only = send_one(smtp, ascii_only, mail_options=("BODY=8BITMIME",))
    for qid in (queue_id, undeclared):
        envelope = check_stored(module_relay, qid, content)
        assert envelope.body_8bit  # type: ignore[attr-defined]
    assert not check_stored(module_relay, declared_only, ascii_only).body_8bit  # type: ignore[attr-defined]


def test_smtputf8_addresses(module_relay: RelayProcess) -> None:
    sender, rcpt = "jösé@example.com", "zoë@dest.test"
    content = "Subject: ünïcödé\r\nFrom: jösé@example.com\r\n\r\nhi\r\n".encode()
    with smtplib.SMTP("127.0.0.1", module_relay.port, local_hostname=HELO) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("smtputf8")
        queue_id = send_one(smtp, content, sender=sender, rcpts=(rcpt,), mail_options=("SMTPUTF8",))
    envelope = check_stored(module_relay, queue_id, content, sender=sender, rcpts=(rcpt,))
    assert envelope.smtputf8  # type: ignore[attr-defined]


def test_non_ascii_address_without_smtputf8(module_relay: RelayProcess) -> None:
    client = RawClient(module_relay.port)
    try:
        client.cmd(f"EHLO {HELO}".encode())
        assert client.cmd("MAIL FROM:<jösé@example.com>".encode()) == wire(replies.NEED_SMTPUTF8)
        assert client.cmd(b"MAIL FROM:<bob@example.com>") == wire(replies.SENDER_OK)
        assert client.cmd("RCPT TO:<zoë@dest.test>".encode()) == wire(replies.NEED_SMTPUTF8)
        assert client.cmd(b"NOOP") == wire(replies.NOOP_OK)
        assert client.cmd(b"RCPT TO:<zoe@dest.test>") == wire(replies.RCPT_OK)
    finally:
        client.close()


def test_null_sender_takes_one_recipient(module_relay: RelayProcess) -> None:
    # An empty sender is admitted when HELO names one of the account's domains.
    with smtplib.SMTP("127.0.0.1", module_relay.port, local_hostname="example.com") as smtp:
        smtp.ehlo()
        assert smtp.mail("") == (250, wire(replies.SENDER_OK)[4:])
        assert smtp.rcpt(RCPT)[0] == 250
        assert smtp.rcpt("second@dest.test") == (550, wire(replies.NULL_SENDER_ONE_RCPT)[4:])
        code, text = smtp.data(b"Subject: bounce\r\n\r\nx\r\n")
        assert code == 250
    check_stored(module_relay, queue_id_of(text), b"Subject: bounce\r\n\r\nx\r\n", sender="",
                 helo="example.com")


# -- 2. EHLO advertisement --------------------------------------------------------------


def test_ehlo_advertisement_plain_and_tls(module_relay: RelayProcess) -> None:
    ctx = module_relay.certs.client_context()
    client = RawClient(module_relay.port)
    try:
        assert client.banner == f"220 {HOSTNAME} ESMTP fastrelay".encode()
        assert client.cmd(f"EHLO {HELO}".encode()) == ehlo_reply(tls=False)
        auth = b"AUTH PLAIN " + base64.b64encode(b"\0alice@example.com\0" + ALICE_PASSWORD.encode())
        assert client.cmd(auth) == wire(replies.NEED_STARTTLS)
        assert client.cmd(b"AUTH LOGIN") == wire(replies.NEED_STARTTLS)
        assert client.cmd(b"NOOP") == wire(replies.NOOP_OK)
        assert client.cmd(b"STARTTLS") == wire(replies.READY_TLS)
        start_tls(client, ctx)
        assert client.cmd(f"EHLO {HELO}".encode()) == ehlo_reply(tls=True)
    finally:
        client.close()
    implicit = TlsRawClient(module_relay.tls_port, ctx)
    try:
        assert implicit.banner == f"220 {HOSTNAME} ESMTP fastrelay".encode()
        assert implicit.cmd(f"EHLO {HELO}".encode()) == ehlo_reply(tls=True)
    finally:
        implicit.close()


# -- 3. malformed input ------------------------------------------------------------------

EHLO = f"EHLO {HELO}\r\n".encode()
MAIL = b"MAIL FROM:<bob@example.com>\r\n"
RCPT_LINE = b"RCPT TO:<carol@dest.test>\r\n"
LONG_DOMAIN = ".".join(["d" * 63] * 3) + ".example"      # 200 octets, valid labels


def _param(setup: list[bytes], bad: bytes, expected: bytes, name: str) -> object:
    return pytest.param(setup, bad, expected, id=name)


MALFORMED = [
    _param([], b"FOO bar\r\n", replies.SYNTAX_ERROR, "unknown-command"),
    _param([EHLO], b"\r\n", replies.SYNTAX_ERROR, "empty-line"),
    _param([EHLO], b"NOOP\0\r\n", replies.SYNTAX_ERROR, "nul-in-verb"),
    _param([EHLO], b"EXPN staff\r\n", replies.EXPN_DISABLED, "expn"),
    _param([EHLO], b"NOOP " + b"x" * 506 + b"\r\n", replies.LINE_TOO_LONG, "line-513-octets"),
    _param([EHLO], b"NOOP " + b"x" * 505 + b"\r\n", replies.NOOP_OK, "line-512-octets-ok"),
    _param([EHLO], b"NOOP\n", replies.BARE_NEWLINE_COMMAND, "bare-lf"),
    _param([EHLO], b"\n", replies.BARE_NEWLINE_COMMAND, "lone-lf"),
    _param([EHLO], b"NO\rOP\r\n", replies.BARE_NEWLINE_COMMAND, "bare-cr"),
    _param([EHLO], b"NOOP\r\r\n", replies.BARE_NEWLINE_COMMAND, "cr-cr-lf"),
    _param([EHLO, MAIL], b"RCPT TO:<carol@dest.test>\rDATA\r\n", replies.BARE_NEWLINE_COMMAND, "bare-cr-rcpt"),
    _param([], MAIL, replies.NEED_HELO, "mail-before-helo"),
    _param([], b"STARTTLS\r\n", replies.NEED_HELO, "starttls-before-helo"),
    _param([EHLO], RCPT_LINE, replies.NEED_MAIL, "rcpt-before-mail"),
    _param([EHLO], b"DATA\r\n", replies.NEED_MAIL, "data-before-mail"),
    # RFC 5321 §3.3 allows 503 or 554 here; the relay answers 554 "No valid recipients".
    _param([EHLO, MAIL], b"DATA\r\n", replies.NO_VALID_RECIPIENTS, "data-before-rcpt"),
    _param([EHLO, MAIL], MAIL, replies.NESTED_MAIL, "nested-mail"),
    _param([EHLO, MAIL, RCPT_LINE], MAIL, replies.NESTED_MAIL, "nested-mail-after-rcpt"),
    _param([EHLO, MAIL, RCPT_LINE], b"DATA now\r\n", replies.ARGS_NOT_ALLOWED, "data-with-argument"),
    _param([EHLO], b"RSET all\r\n", replies.ARGS_NOT_ALLOWED, "rset-with-argument"),
    _param([EHLO], b"EHLO -bad-.example\r\n", replies.BAD_HELO, "bad-helo-syntax"),
    # RFC 5321 §4.1.3 address literals only: the name goes into the log and the Received: field.
    _param([EHLO], b"EHLO [\x1b[31mred]\r\n", replies.BAD_HELO, "helo-literal-with-escape"),
    _param([EHLO], "EHLO [\u202eevil]\r\n".encode(), replies.BAD_HELO, "helo-literal-with-bidi"),
    _param([EHLO], b"EHLO [x y]\r\n", replies.BAD_HELO, "helo-literal-with-space"),
    _param([EHLO], b"EHLO [300.1.2.3]\r\n", replies.BAD_HELO, "helo-literal-bad-ipv4"),
    _param([EHLO], b"EHLO [IPv6:1.2.3.4]\r\n", replies.BAD_HELO, "helo-literal-ipv6-tag-with-ipv4"),
    _param([EHLO], b"MAIL TO:<bob@example.com>\r\n", replies.reply(501, "5.5.4", "Syntax: MAIL FROM:<address>"),
           "mail-to"),
    _param([EHLO], b"MAIL FROM:bob@example.com\r\n",
           replies.reply(501, "5.5.4", "Syntax: MAIL FROM:<address> (angle brackets required)"), "mail-no-brackets"),
    _param([EHLO, MAIL], b"RCPT TO:carol@dest.test\r\n",
           replies.reply(501, "5.5.4", "Syntax: RCPT TO:<address> (angle brackets required)"), "rcpt-no-brackets"),
    _param([EHLO], b"MAIL FROM:\r\n",
           replies.reply(501, "5.5.4", "Syntax: MAIL FROM:<address> (angle brackets required)"), "mail-empty"),
    _param([EHLO], b"MAIL FROM:<" + b"a" * 65 + b"@example.com>\r\n", replies.PATH_TOO_LONG, "local-part-65"),
    _param([EHLO], b"MAIL FROM:<" + b"a" * 64 + b"@example.com>\r\n", replies.SENDER_OK, "local-part-64-ok"),
    _param([EHLO, MAIL], b"RCPT TO:<a@" + (LONG_DOMAIN + "." + "e" * 55).encode() + b">\r\n",
           replies.PATH_TOO_LONG, "domain-256"),
    _param([EHLO, MAIL], b"RCPT TO:<" + b"r" * 64 + b"@" + LONG_DOMAIN.encode() + b">\r\n",
           replies.PATH_TOO_LONG, "path-265"),
    _param([EHLO, MAIL], b"RCPT TO:<" + b"r" * 55 + b"@" + LONG_DOMAIN.encode() + b">\r\n",
           replies.RCPT_OK, "path-256-ok"),
    _param([EHLO], b"MAIL FROM:<bob@@example.com>\r\n", replies.BAD_SENDER_SYNTAX, "double-at"),
    _param([EHLO], b"MAIL FROM:<bob@example..com>\r\n", replies.BAD_SENDER_SYNTAX, "empty-label"),
    _param([EHLO], b"MAIL FROM:<b ob@example.com>\r\n", replies.BAD_SENDER_SYNTAX, "space-in-local"),
    _param([EHLO], b"MAIL FROM:<bob@example.com\r\n", replies.BAD_SENDER_SYNTAX, "unclosed-bracket"),
    _param([EHLO], b"MAIL FROM:<bob@example.com>junk\r\n", replies.BAD_SENDER_SYNTAX, "junk-after-path"),
    _param([EHLO], b"MAIL FROM:<@>\r\n", replies.BAD_SENDER_SYNTAX, "lone-at"),
    _param([EHLO], b"MAIL FROM:<\x01\x02@example.com>\r\n", replies.BAD_SENDER_SYNTAX, "control-chars"),
    # Non-ASCII that is not text: a C1 control (U+009B is CSI to some terminals), a
    # right-to-left override (it would reverse the address in the log), a no-break space.
    _param([EHLO], "MAIL FROM:<bob\u009b31m@example.com> SMTPUTF8\r\n".encode(), replies.BAD_SENDER_SYNTAX,
           "c1-control"),
    _param([EHLO], "MAIL FROM:<bob\u202e@example.com> SMTPUTF8\r\n".encode(), replies.BAD_SENDER_SYNTAX,
           "bidi-override"),
    _param([EHLO, MAIL], "RCPT TO:<carol\u00a0x@dest.test> SMTPUTF8\r\n".encode(), replies.BAD_RCPT_SYNTAX,
           "no-break-space"),
    _param([EHLO, MAIL], "RCPT TO:<carol@d\u200best.test>\r\n".encode(), replies.BAD_RCPT_SYNTAX,
           "zero-width-space-in-domain"),
    _param([EHLO, MAIL], b"RCPT TO:<>\r\n", replies.BAD_RCPT_SYNTAX, "null-recipient"),
    _param([EHLO, MAIL], b"RCPT TO:<carol>\r\n", replies.BAD_RCPT_SYNTAX, "recipient-without-domain"),
    _param([EHLO, MAIL], b"RCPT TO:<carol@[300.1.1.1]>\r\n", replies.BAD_RCPT_SYNTAX, "bad-address-literal"),
    _param([EHLO], b"MAIL FROM:<bob@example.com> FOO=BAR\r\n", replies.UNKNOWN_PARAMETER, "unknown-mail-param"),
    _param([EHLO, MAIL], b"RCPT TO:<carol@dest.test> FOO\r\n", replies.UNKNOWN_PARAMETER, "unknown-rcpt-param"),
    _param([EHLO], b"MAIL FROM:<bob@example.com> SIZE=26214401\r\n", replies.MESSAGE_TOO_BIG, "size-over-limit"),
    _param([EHLO], b"MAIL FROM:<bob@example.com> SIZE=26214400\r\n", replies.SENDER_OK, "size-at-limit-ok"),
    _param([EHLO], b"MAIL FROM:<bob@example.com> SIZE=-1\r\n", replies.reply(501, "5.5.4", "Bad SIZE parameter"),
           "size-negative"),
    _param([EHLO], b"MAIL FROM:<bob@example.com> BODY=9BIT\r\n",
           replies.reply(501, "5.5.4", "BODY must be 7BIT or 8BITMIME"), "body-9bit"),
    _param([EHLO], b"MAIL FROM:<b\xffob@example.com>\r\n", replies.BAD_UTF8, "invalid-utf8-address"),
    _param([EHLO], b"MAIL FROM:<bob@example.com> SMTPUTF8\xc3\r\n", replies.BAD_UTF8, "truncated-utf8"),
    _param([EHLO], b"NOOP \xed\xa0\x80\r\n", replies.BAD_UTF8, "utf8-surrogate"),
    _param([EHLO], b"\xff\xfe\xfd\r\n", replies.SYNTAX_ERROR, "binary-verb"),
]


@pytest.mark.parametrize(("setup", "bad", "expected"), MALFORMED)
def test_malformed_command(module_relay: RelayProcess, setup: list[bytes], bad: bytes, expected: bytes) -> None:
    client = RawClient(module_relay.port)
    try:
        for line in setup:
            assert client.cmd(line)[:1] == b"2"
        client.send(bad)
        assert client.reply() == wire(expected)
        assert client.cmd(b"NOOP") == wire(replies.NOOP_OK)
    finally:
        client.close()


def test_overlong_line_in_pieces(module_relay: RelayProcess) -> None:
    """A line over 64 KiB, sent 1 KiB at a time: dropped as it comes, one 500 5.5.6 when it ends."""
    client = RawClient(module_relay.port)
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        assert client.cmd(EHLO)[:3] == b"250"
        client.send(b"MAIL FROM:<")
        for i in range(70):
            client.send(b"x" * 1024)
            if i % 8 == 0:
                time.sleep(0.002)  # let the relay see several reads
        # The line ends in the middle of a write that carries the next command.
        client.send(b"@example.com>\r\nNOOP\r\n")
        assert client.reply() == wire(replies.LINE_TOO_LONG)
        assert client.reply() == wire(replies.NOOP_OK)
        # The session is intact: the over-long MAIL did not start a transaction.
        assert client.cmd(MAIL) == wire(replies.SENDER_OK)
        # AUTH lines may be longer (RFC 4954 §4: 12288 octets), but not without limit.
        assert client.cmd(b"RSET") == wire(replies.RESET_OK)
        assert client.cmd(b"AUTH PLAIN " + b"A" * 12000) == wire(replies.NEED_STARTTLS)
        assert client.cmd(b"AUTH PLAIN " + b"A" * 13000) == wire(replies.LINE_TOO_LONG)
        assert client.cmd(b"NOOP") == wire(replies.NOOP_OK)
    finally:
        client.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_binary_garbage(module_relay: RelayProcess, seed: int) -> None:
    rng = random.Random(seed)
    client = RawClient(module_relay.port)
    try:
        assert client.cmd(EHLO)[:3] == b"250"
        # Without CR or LF: one line, answered once.
        line = bytes(b for b in rng.randbytes(400) if b not in (10, 13))
        assert client.cmd(b"\x00" + line) == wire(replies.SYNTAX_ERROR)
        # With CR and LF anywhere (about 150 lines): every reply is a 5xx until the
        # session has had hard_error_limit (20) of them; then 421, and it is closed.
        junk = b"\x00" + rng.randbytes(20_000)
        client.send(junk + b"\r\nNOOP\r\n")
        errors = 1
        while (reply := client.reply()) != wire(replies.TOO_MANY_ERRORS):
            assert reply[:1] == b"5", reply
            errors += 1
        assert errors == 20 and client.closed()
    finally:
        client.close()
    again = RawClient(module_relay.port)       # the relay itself goes on
    try:
        assert again.cmd(EHLO)[:3] == b"250"
        assert again.cmd(MAIL) == wire(replies.SENDER_OK)
    finally:
        again.close()


@pytest.mark.parametrize("line", [b"EHLO", b"EHLO    ", b"HELO"])
def test_empty_helo_closes(module_relay: RelayProcess, line: bytes) -> None:
    client = RawClient(module_relay.port)
    try:
        assert client.cmd(line) == wire(replies.EMPTY_HELO)
        assert client.closed()
    finally:
        client.close()


@pytest.mark.parametrize("name", [b"localhost", b"LOCALHOST.localdomain", b"mailhost", HOSTNAME.encode()])
def test_unqualified_ehlo_is_refused(module_relay: RelayProcess, name: bytes) -> None:
    client = RawClient(module_relay.port)
    try:
        client.send(b"EHLO " + name + b"\r\nNOOP\r\n")
        assert client.reply() == wire(replies.EHLO_REFUSED)
        assert client.closed()
        assert client.buf == b""  # nothing answered after the 421
    finally:
        client.close()


# -- 5. STARTTLS ------------------------------------------------------------------------


@pytest.mark.parametrize("injected", [b"NOOP\r\n", b"EHLO evil.example.com\r\nMAIL FROM:<bob@example.com>\r\n"])
def test_starttls_discards_pipelined_bytes(module_relay: RelayProcess, injected: bytes) -> None:
    """RFC 3207 §4.2 / CVE-2011-0411: bytes behind STARTTLS in the same packet are dropped."""
    client = RawClient(module_relay.port)
    try:
        assert client.cmd(EHLO)[:3] == b"250"
        client.send(b"STARTTLS\r\n" + injected)
        assert client.reply() == wire(replies.READY_TLS)
        start_tls(client, module_relay.certs.client_context())
        # The first reply after the handshake answers our first command: the
        # injected ones were neither answered nor acted on.
        assert client.cmd(MAIL) == wire(replies.NEED_HELO)
        assert client.cmd(EHLO) == ehlo_reply(tls=True)
        assert client.cmd(RCPT_LINE) == wire(replies.NEED_MAIL)
        assert client.cmd(b"NOOP") == wire(replies.NOOP_OK)
        assert not client.closed(timeout=0.3)
        assert client.buf == b""
    finally:
        client.close()


def test_starttls_resets_the_session(module_relay: RelayProcess) -> None:
    client = RawClient(module_relay.port)
    try:
        assert client.cmd(EHLO)[:3] == b"250"
        assert client.cmd(b"STARTTLS now") == wire(replies.ARGS_NOT_ALLOWED)
        assert client.cmd(b"STARTTLS") == wire(replies.READY_TLS)
        start_tls(client, module_relay.certs.client_context())
        # RFC 3207 §4.2: the client must EHLO again.
        assert client.cmd(MAIL) == wire(replies.NEED_HELO)
        assert client.cmd(b"AUTH PLAIN") == wire(replies.NEED_HELO)
        assert client.cmd(EHLO) == ehlo_reply(tls=True)
        assert client.cmd(b"STARTTLS") == wire(replies.ALREADY_TLS)
        assert client.cmd(MAIL) == wire(replies.SENDER_OK)
        assert client.cmd(RCPT_LINE) == wire(replies.RCPT_OK)
        assert client.cmd(b"DATA") == wire(replies.START_DATA)
        queue_id = queue_id_of(client.cmd(stuff(CONTENT) + b".\r\n"))
    finally:
        client.close()
    check_stored(module_relay, queue_id, CONTENT, tls=True, protocol="ESMTPS")


def test_starttls_pipelined_after_other_commands(module_relay: RelayProcess) -> None:
    """RFC 2920: STARTTLS may end a pipelined group; earlier replies come first, in plaintext."""
    client = RawClient(module_relay.port)
    try:
        client.send(EHLO + b"NOOP\r\nSTARTTLS\r\n")
        assert client.reply() == ehlo_reply(tls=False)
        assert client.reply() == wire(replies.NOOP_OK)
        assert client.reply() == wire(replies.READY_TLS)
        start_tls(client, module_relay.certs.client_context())
        assert client.cmd(EHLO) == ehlo_reply(tls=True)
    finally:
        client.close()


def test_starttls_on_implicit_tls_port(module_relay: RelayProcess) -> None:
    client = TlsRawClient(module_relay.tls_port, module_relay.certs.client_context())
    try:
        client.send(EHLO + b"STARTTLS\r\nNOOP\r\n")
        assert client.reply() == ehlo_reply(tls=True)
        assert client.reply() == wire(replies.ALREADY_TLS)
        assert client.reply() == wire(replies.NOOP_OK)
    finally:
        client.close()


# -- 6. timeouts and connection limits -----------------------------------------------------


def test_idle_client_times_out_while_others_are_served(relay_factory: object) -> None:
    relay: RelayProcess = relay_factory(server_extra="command_timeout = 1\ndata_timeout = 1")  # type: ignore[operator]
    idle = RawClient(relay.port)
    in_data = RawClient(relay.port)
    busy = RawClient(relay.port)
    try:
        assert busy.cmd(EHLO)[:3] == b"250"
        assert in_data.cmd(EHLO)[:3] == b"250"
        in_data.send(MAIL + RCPT_LINE + b"DATA\r\n")
        assert [in_data.reply() for _ in range(3)][-1] == wire(replies.START_DATA)
        in_data.send(b"Subject: never finished\r\n")
        deadline = time.monotonic() + 10
        timed_out: set[str] = set()
        while len(timed_out) < 2 and time.monotonic() < deadline:
            assert busy.cmd(b"NOOP") == wire(replies.NOOP_OK)
            ready, _, _ = select.select([idle.sock, in_data.sock], [], [], 0.2)
            for sock in ready:
                client, name = (idle, "idle") if sock is idle.sock else (in_data, "data")
                if name not in timed_out:
                    assert client.reply() == wire(replies.TIMEOUT)
                    assert client.closed()
                    timed_out.add(name)
        assert timed_out == {"idle", "data"}
        # The active client was never cut off, and can still send mail.
        assert busy.cmd(MAIL) == wire(replies.SENDER_OK)
        assert busy.cmd(RCPT_LINE) == wire(replies.RCPT_OK)
        assert busy.cmd(b"DATA") == wire(replies.START_DATA)
        queue_id = queue_id_of(busy.cmd(b"Subject: ok\r\n\r\nok\r\n.\r\n"))
    finally:
        for c in (idle, in_data, busy):
            c.close()
    assert [env.queue_id for env, _ in relay.queued()] == [queue_id]  # type: ignore[attr-defined]


def test_tls_handshake_timeout(relay_factory: object) -> None:
    relay: RelayProcess = relay_factory(server_extra="tls_handshake_timeout = 1")  # type: ignore[operator]
    with socket.create_connection(("127.0.0.1", relay.tls_port), timeout=10) as s:
        # A client that connects to the implicit TLS port and says nothing is cut off.
        assert s.recv(100) == b""


def _connect_when_free(port: int, source: str, expect_banner: bytes) -> RawClient:
    """Connection counts drop when the relay sees the close: retry for a moment."""
    deadline = time.monotonic() + 5
    while True:
        client = RawClient(port, source=source)
        if client.banner == expect_banner or time.monotonic() > deadline:
            return client
        client.close()
        time.sleep(0.05)


def test_max_connections_per_ip(relay_factory: object) -> None:
    relay: RelayProcess = relay_factory(server_extra="max_connections_per_ip = 2")  # type: ignore[operator]
    banner = f"220 {HOSTNAME} ESMTP fastrelay".encode()
    first, second = RawClient(relay.port, source="127.0.0.2"), RawClient(relay.port, source="127.0.0.2")
    try:
        assert first.banner == banner and second.banner == banner
        third = RawClient(relay.port, source="127.0.0.2")
        assert third.banner == wire(replies.TOO_MANY_FROM_IP)
        assert third.closed()
        third.close()
        # Another address is not affected; the first two still work.
        other = RawClient(relay.port, source="127.0.0.3")
        assert other.banner == banner
        assert other.cmd(EHLO)[:3] == b"250"
        other.close()
        assert first.cmd(b"NOOP") == wire(replies.NOOP_OK)
        assert second.cmd(b"NOOP") == wire(replies.NOOP_OK)
        first.close()
        again = _connect_when_free(relay.port, "127.0.0.2", banner)
        assert again.banner == banner
        again.close()
    finally:
        first.close()
        second.close()
    assert "refused: too many connections from this IP (2)" in relay.log()


# Addresses put on the loopback interface for the IPv6 test below: two in one
# /64, one in another (documentation-style ULA prefixes, never routed).
IPV6_SOURCES = ("fd00:fa57:0:1::10", "fd00:fa57:0:1::11", "fd00:fa57:0:2::10")


@pytest.fixture
def ipv6_sources() -> Iterator[tuple[str, ...]]:
    """Client addresses for per-/64 limits: added to lo, removed afterwards (root only; CI is root)."""
    if os.geteuid() != 0 or shutil.which("ip") is None or not socket.has_ipv6:
        pytest.skip("needs root and iproute2 to add IPv6 addresses to lo")
    added = []
    try:
        for address in IPV6_SOURCES:
            subprocess.run(["ip", "-6", "addr", "add", f"{address}/128", "dev", "lo", "nodad"], check=True)
            added.append(address)
        yield IPV6_SOURCES
    finally:
        for address in added:
            subprocess.run(["ip", "-6", "addr", "del", f"{address}/128", "dev", "lo"], check=False)


def test_client_key_is_an_ipv4_address_or_an_ipv6_network() -> None:
    assert client_key("192.0.2.1", 64) == "192.0.2.1"
    assert client_key("2001:db8:1:2:3:4:5:6", 64) == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:2:3:4:5:6", 84) == "2001:db8:1:2:3::/84"   # Postfix 3.8's default
    assert client_key("2001:db8:1:2:3:4:5:6", 128) == "2001:db8:1:2:3:4:5:6"
    assert client_key("fe80::1%eth0", 64) == "fe80::/64"
    assert client_key("unknown", 64) == "unknown"


def test_auth_throttle_locks_out_an_ipv6_network() -> None:
    """Guessing from a new address of the same /64 for every try does not escape the lockout."""
    throttle = AuthThrottle(ServerConfig())
    now = 1000.0
    for i in range(throttle.cfg.auth_failures_before_lockout):
        throttle.fail(client_key(f"2001:db8:0:7::{i + 1:x}", 64), now)
    assert throttle.locked(client_key("2001:db8:0:7::ffff", 64), now)
    assert not throttle.locked(client_key("2001:db8:0:8::1", 64), now)


@pytest.mark.parametrize("prefix", [64, 128])
def test_ipv6_clients_are_counted_by_network(relay_factory: object, ipv6_sources: tuple[str, ...],
                                             prefix: int) -> None:
    """One IPv6 host may use every address of its /64: with the default
    ipv6_client_prefix = 64 its addresses share max_connections_per_ip."""
    relay: RelayProcess = relay_factory(  # type: ignore[operator]
        server_extra=f"max_connections_per_ip = 1\nipv6_client_prefix = {prefix}", start=False)
    text = relay.config_path.read_text()
    relay.config_path.write_text(text.replace(f'listen = ["127.0.0.1:{relay.port}"]',
                                              f'listen = ["127.0.0.1:{relay.port}", "[::1]:{relay.port}"]', 1))
    relay.start()
    banner = f"220 {HOSTNAME} ESMTP fastrelay".encode()
    one, same_net, other_net = ipv6_sources
    first = RawClient(relay.port, host="::1", source=one)
    clients = [first]
    try:
        assert first.banner == banner
        neighbour = RawClient(relay.port, host="::1", source=same_net)
        clients.append(neighbour)
        if prefix == 64:
            assert neighbour.banner == wire(replies.TOO_MANY_FROM_IP)
            assert neighbour.closed()
            relay.wait_log(f"connect from [{same_net}]: refused: too many connections from fd00:fa57:0:1::/64 (1)")
        else:
            assert neighbour.banner == banner
        elsewhere = RawClient(relay.port, host="::1", source=other_net)
        clients.append(elsewhere)
        assert elsewhere.banner == banner
        assert first.cmd(b"NOOP") == wire(replies.NOOP_OK)
    finally:
        for client in clients:
            client.close()


def test_max_connections(relay_factory: object) -> None:
    relay: RelayProcess = relay_factory(server_extra="max_connections = 2")  # type: ignore[operator]
    relay.wait_log("disconnect from unknown[127.0.0.1]")  # the fixture's readiness probe is gone
    banner = f"220 {HOSTNAME} ESMTP fastrelay".encode()
    first, second = RawClient(relay.port, source="127.0.0.4"), RawClient(relay.port, source="127.0.0.5")
    try:
        assert first.banner == banner and second.banner == banner
        third = RawClient(relay.port, source="127.0.0.6")
        assert third.banner == wire(replies.TOO_MANY_CONNECTIONS)
        assert third.closed()
        third.close()
        assert second.cmd(b"NOOP") == wire(replies.NOOP_OK)
        assert first.cmd(b"QUIT") == QUIT_REPLY
        first.close()
        again = _connect_when_free(relay.port, "127.0.0.6", banner)
        assert again.banner == banner
        again.close()
    finally:
        first.close()
        second.close()


# -- 7. operations: signals ------------------------------------------------------------------


def test_sigterm_closes_idle_connections_and_exits_0(relay: RelayProcess) -> None:
    client = RawClient(relay.port)
    try:
        assert client.cmd(EHLO)[:3] == b"250"
        assert relay.stop() == 0
        assert client.reply() == wire(replies.SHUTTING_DOWN)
        assert client.closed()
    finally:
        client.close()
    assert "shutdown: done" in relay.log()


def sigterm_during_data(relay: RelayProcess, subject: bytes) -> RawClient:
    """A session in the middle of its content when SIGTERM comes; returned once the relay drains."""
    client = RawClient(relay.port)
    assert client.cmd(EHLO)[:3] == b"250"
    client.send(MAIL + RCPT_LINE + b"DATA\r\n" + b"Subject: " + subject + b"\r\n\r\n")
    assert [client.reply() for _ in range(3)][-1] == wire(replies.START_DATA)
    assert relay.proc is not None
    relay.proc.send_signal(signal.SIGTERM)
    relay.wait_log("shutdown: draining")
    return client


def test_sigterm_lets_an_open_transaction_finish(relay_factory: object) -> None:
    relay: RelayProcess = relay_factory()  # type: ignore[operator]
    client = sigterm_during_data(relay, b"drain")
    try:
        # The listener is closed at once.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", relay.port), timeout=5).close()
        queue_id = queue_id_of(client.cmd(b"finished\r\n.\r\n"))
        assert client.reply() == wire(replies.SHUTTING_DOWN)
        assert client.closed()
    finally:
        client.close()
    assert relay.proc is not None and relay.proc.wait(20) == 0
    relay.stop()
    [(envelope, body)] = relay.queued()
    assert envelope.queue_id == queue_id  # type: ignore[attr-defined]
    assert body.endswith(b"\r\nSubject: drain\r\n\r\nfinished\r\n")


def test_signals_repeated_during_the_drain_stop_the_relay_once(relay_factory: object) -> None:
    """An operator who sends SIGTERM again, or presses Ctrl-C, while the relay drains:
    one shutdown, not two running side by side (which closed the quota journal twice,
    died with a traceback and left the process running)."""
    relay: RelayProcess = relay_factory()  # type: ignore[operator]
    client = sigterm_during_data(relay, b"twice")
    try:
        assert relay.proc is not None
        relay.proc.send_signal(signal.SIGTERM)
        relay.proc.send_signal(signal.SIGINT)
        relay.wait_log("shutdown: already under way")
        queue_id = queue_id_of(client.cmd(b"finished\r\n.\r\n"))
        assert client.reply() == wire(replies.SHUTTING_DOWN)
    finally:
        client.close()
    assert relay.proc.wait(20) == 0
    relay.stop()
    log = relay.log()
    assert log.count("shutdown: draining") == 1 and log.count("shutdown: done") == 1, log[-3000:]
    assert "Traceback" not in log and "Error" not in log, log[-3000:]
    [(envelope, _)] = relay.queued()
    assert envelope.queue_id == queue_id  # type: ignore[attr-defined]


def test_a_part_that_fails_to_close_is_logged_and_the_relay_still_exits(relay_factory: object) -> None:
    """Someone removed the quota state directory under the running relay: its final snapshot
    cannot be written.  The shutdown says so, closes everything else, and exits 1."""
    relay: RelayProcess = relay_factory()  # type: ignore[operator]
    shutil.rmtree(relay.directory / "var" / "quota")
    assert relay.stop() == 1
    log = relay.log()
    assert "shutdown: closing the quota journal failed: [Errno 2] No such file or directory" in log, log[-3000:]
    assert "Traceback" not in log
    assert log.count("shutdown: done") == 1


ONE_RULE = """
[[accounts]]
name = "example"
domains = ["example.com"]

[[accounts.rules]]
name = "loopback"
allowed_senders = "my_domains"
only_allowed_ips = true
ips = [ { range = "127.0.0.1/32" } ]
"""


def test_sighup_applies_a_new_rule_without_dropping_connections(relay_factory: object) -> None:
    relay: RelayProcess = relay_factory(accounts=ONE_RULE)  # type: ignore[operator]
    client = RawClient(relay.port, source="127.0.0.9")
    try:
        assert client.cmd(EHLO)[:3] == b"250"
        refused = client.cmd(MAIL)
        assert refused.startswith(b"550 5.7.0 Mail relay denied [127.0.0.9]."), refused
        old = '{ range = "127.0.0.1/32" }'
        text = relay.config_path.read_text()
        assert old in text
        relay.config_path.write_text(text.replace(old, old + ', { range = "127.0.0.8/29" }'))
        relay.reload()
        relay.wait_log("reload: config")
        # Same connection, next transaction: the new range admits it.
        assert client.cmd(MAIL) == wire(replies.SENDER_OK)
        assert client.cmd(RCPT_LINE) == wire(replies.RCPT_OK)
        assert client.cmd(b"DATA") == wire(replies.START_DATA)
        queue_id = queue_id_of(client.cmd(b"Subject: after reload\r\n\r\nok\r\n.\r\n"))
    finally:
        client.close()
    [(envelope, _)] = relay.queued()
    assert envelope.queue_id == queue_id and envelope.client_ip == "127.0.0.9"  # type: ignore[attr-defined]


def test_sighup_applies_a_new_spool_segment_size(relay_factory: object) -> None:
    relay: RelayProcess = relay_factory()  # type: ignore[operator]
    segments = relay.spool_dir / "segments"

    def send(n: int) -> None:
        with smtplib.SMTP("127.0.0.1", relay.port, local_hostname=HELO) as smtp:
            for i in range(n):
                smtp.sendmail("bob@example.com", ["carol@dest.test"],
                              f"Subject: {i}\r\n\r\n".encode() + b"x" * 40_000 + b"\r\n")

    send(3)
    assert len(list(segments.glob("*.log"))) == 1          # 64 MiB segments: one holds them all
    text = relay.config_path.read_text()
    relay.config_path.write_text(text.replace('spool_dir = "spool"', 'spool_dir = "spool"\nspool_segment_bytes = 65536', 1))
    relay.reload()
    relay.wait_log("reload: config")
    send(6)
    assert len(list(segments.glob("*.log"))) >= 3           # now a new segment past 64 KiB
    assert len(relay.queued()) == 9


def test_sighup_with_a_broken_config_keeps_the_old_one(relay_factory: object) -> None:
    relay: RelayProcess = relay_factory(accounts=ONE_RULE)  # type: ignore[operator]
    client = RawClient(relay.port)
    try:
        assert client.cmd(EHLO)[:3] == b"250"
        good = relay.config_path.read_text()
        unopenable_log = good.replace("[logging]", '[logging]\nfile = "/"')   # a directory
        assert unopenable_log != good
        for broken in ("[server\nthis is not TOML", good.replace("[server]", "[server]\nno_such_key = 1"),
                       unopenable_log):
            before = relay.log().count("reload refused")
            relay.config_path.write_text(broken)
            relay.reload()
            deadline = time.monotonic() + 10
            while relay.log().count("reload refused") == before and time.monotonic() < deadline:
                time.sleep(0.05)
            assert relay.log().count("reload refused") == before + 1
            # The open session and new ones are served, under the old rules.
            assert client.cmd(b"NOOP") == wire(replies.NOOP_OK)
            other = RawClient(relay.port, source="127.0.0.9")
            assert other.cmd(EHLO)[:3] == b"250"
            assert other.cmd(MAIL).startswith(b"550 5.7.0 Mail relay denied [127.0.0.9].")
            other.close()
        assert client.cmd(MAIL) == wire(replies.SENDER_OK)
        assert client.cmd(RCPT_LINE) == wire(replies.RCPT_OK)
        assert client.cmd(b"DATA") == wire(replies.START_DATA)
        queue_id = queue_id_of(client.cmd(b"Subject: still here\r\n\r\nok\r\n.\r\n"))
    finally:
        client.close()
    assert relay.proc is not None and relay.proc.poll() is None
    log = relay.wait_log(f"{queue_id}: ")
    assert "no_such_key" in log
    # The log that could not be opened was not switched to: the relay still logs here.
    assert "logging.file: cannot open /: Is a directory" in log
    assert "Traceback" not in log, log[-3000:]
    assert f"{queue_id}: " in log.split("cannot open /")[1]    # the message queued after it


def test_a_message_with_too_many_hops_is_refused_as_a_loop(module_relay: RelayProcess) -> None:
    """RFC 5321 §6.3: with max_hops = 50 (the default), 49 Received: headers pass
    (ours makes 50), 50 are a loop; headers of any case count, a body line does not."""

    def message(hops: int) -> bytes:
        trace = b"".join(f"{'Received' if i % 2 else 'RECEIVED'}: from hop{i}.example.net by x;"
                         f" Fri, 27 Nov 2026 12:00:00 +0000\r\n".encode() for i in range(hops))
        return trace + b"Subject: hops\r\n\r\nReceived: in the body is not a hop\r\n"

    with smtplib.SMTP("127.0.0.1", module_relay.port, local_hostname=HELO) as smtp:
        queue_id = send_one(smtp, message(49))
        check_stored(module_relay, queue_id, message(49))
        smtp.mail(SENDER)
        smtp.rcpt(RCPT)
        code, text = smtp.data(message(50))
        assert (code, text) == (554, b"5.4.6 Too many hops: mail loop detected")
        # The session goes on.
        assert send_one(smtp) != queue_id
    module_relay.wait_log("too many hops (max_hops = 50)")


def test_a_session_is_closed_after_hard_error_limit_errors(relay_factory: object) -> None:
    """As Postfix's smtpd_hard_error_limit (20): a client that keeps getting 4xx/5xx replies
    (a recipient harvester, a stuck device, a scanner) is cut off.  Every kind of error
    counts: unknown commands, refused recipients, framing errors, refused content."""
    relay: RelayProcess = relay_factory(server_extra="hard_error_limit = 5")  # type: ignore[operator]
    client = RawClient(relay.port)
    try:
        assert client.cmd(EHLO)[:3] == b"250"
        assert client.cmd(b"FROB") == wire(replies.SYNTAX_ERROR)                    # 1
        assert client.cmd(b"RCPT TO:<carol@dest.test>") == wire(replies.NEED_MAIL)  # 2
        assert client.cmd(b"NOOP\rNOOP") == wire(replies.BARE_NEWLINE_COMMAND)      # 3
        assert client.cmd(b"NOOP") == wire(replies.NOOP_OK)                         # not an error
        assert client.cmd(MAIL) == wire(replies.SENDER_OK)
        assert client.cmd(b"RCPT TO:<carol>") == wire(replies.BAD_RCPT_SYNTAX)       # 4
        assert client.cmd(b"VRFY carol")[:3] == b"252"                                # not an error
        # The fifth error, pipelined with a command that is never answered: its reply, then 421.
        client.send(b"DATA\r\nNOOP\r\n")
        assert client.reply() == wire(replies.NO_VALID_RECIPIENTS)                   # 5
        assert client.reply() == wire(replies.TOO_MANY_ERRORS)
        assert client.closed()
    finally:
        client.close()
    assert "too many errors (5) from client.example.com[127.0.0.1]" in relay.wait_log("too many errors")
