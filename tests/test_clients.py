"""Real clients and MTAs as peers: swaks, msmtp and a private Postfix.

Each test sends one message through a real program and reads it back from
fastrelay's spool on disk.  What must hold, byte for byte: the spooled
content is fastrelay's Received: header followed by exactly the bytes the
client sent (after SMTP dot-unstuffing).  Postfix adds its own Received:
header, so there the rest after both trace headers is compared.

The message has a line starting with a dot (RFC 5321 §4.5.2 transparency)
and 8-bit UTF-8 text, the two places where a client, a relay or a next hop
most often changes content.

A tool's tests are skipped, with the reason shown, only when its binary is
missing (scripts/test installs swaks, msmtp and postfix as root).
"""

from __future__ import annotations

import glob
import re
import shutil
import smtplib
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ALICE_PASSWORD, Certs, RelayProcess, free_port
from peers import POSTFIX, POSTMAP, PostfixPeer

from fastrelay.spool import Envelope

SWAKS = shutil.which("swaks")
MSMTP = shutil.which("msmtp")
needs_swaks = pytest.mark.skipif(SWAKS is None, reason="swaks is not installed (Debian package swaks)")
needs_msmtp = pytest.mark.skipif(MSMTP is None, reason="msmtp is not installed (Debian package msmtp)")
needs_postfix = pytest.mark.skipif(POSTFIX is None, reason="postfix is not installed (Debian package postfix)")

SENDER = "bob@example.com"
ALICE = "alice@example.com"
RECIPIENT = "carol@example.net"
CLIENT_HELO = "client.example.com"

MESSAGE = (
    b"From: Bob <bob@example.com>\r\n"
    b"To: Carol <carol@example.net>\r\n"
    b"Subject: fastrelay peer test\r\n"
    b"Date: Mon, 02 Jun 2025 10:00:00 +0000\r\n"
    b"Message-ID: <peer-test.1@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"X-Peer-Test: kept as is\r\n"
    b"\r\n"
    b"Hello Carol,\r\n"
    b".this line starts with a dot\r\n"
    b"..and this one with two\r\n"
    b"caf\xc3\xa9, na\xc3\xafve, \xe2\x82\xac\r\n"
    b"\r\n"
    b"-- \r\n"
    b"Bob\r\n"
)

# Only the authenticated rule: mail is admitted only if the client really did
# SMTP AUTH inside TLS, whatever its IP.
AUTH_ONLY_ACCOUNTS = """
[[accounts]]
name = "example"
domains = ["example.com", "example.org"]

[[accounts.users]]
address = "alice@example.com"
passwords = ["{alice_hash}"]

[[accounts.rules]]
name = "authenticated"
allowed_senders = "registered_users"
require_auth = true
require_tls = true
"""


def split_first_field(content: bytes) -> tuple[bytes, bytes]:
    """The first header field (with its folded lines), and everything after it."""
    end = 0
    while True:
        end = content.index(b"\r\n", end) + 2
        if content[end:end + 1] not in (b" ", b"\t"):
            return content[:end], content[end:]


def only_message(relay: RelayProcess) -> tuple[Envelope, bytes, bytes]:
    """(envelope, fastrelay's Received: header, the rest) of the one queued message."""
    queued = relay.queued()
    assert len(queued) == 1, queued
    envelope, content = queued[0]
    assert isinstance(envelope, Envelope)
    received, rest = split_first_field(content)
    assert received.startswith(b"Received: from "), content[:300]
    return envelope, received, rest


def queued_as(transcript: str) -> str:
    """The queue id from fastrelay's "250 2.0.0 Ok: queued as ID" in a client transcript."""
    m = re.search(r"250 2\.0\.0 Ok: queued as (\S+)", transcript)
    assert m is not None, transcript
    return m.group(1)


# --- swaks ----------------------------------------------------------------------

# (id, swaks options, use the implicit TLS port, relay admits AUTH only, Received "with")
SWAKS_CASES = [
    ("plain", [], False, False, "ESMTP"),
    ("starttls", ["--tls"], False, False, "ESMTPS"),
    ("implicit-tls", ["--tls-on-connect"], True, False, "ESMTPS"),
    ("starttls-auth-login", ["--tls", "--auth", "LOGIN"], False, True, "ESMTPSA"),
    ("implicit-tls-auth-plain", ["--tls-on-connect", "--auth", "PLAIN"], True, True, "ESMTPSA"),
    ("protocol-esmtpsa", ["--protocol", "ESMTPSA"], False, True, "ESMTPSA"),
    ("protocol-ssmtpa", ["--protocol", "SSMTPA", "--auth", "PLAIN"], True, True, "ESMTPSA"),
]


@needs_swaks
@pytest.mark.parametrize("options, implicit, auth, with_", [c[1:] for c in SWAKS_CASES],
                         ids=[c[0] for c in SWAKS_CASES])
def test_swaks(relay_factory: object, certs: Certs, tmp_path: Path,
               options: list[str], implicit: bool, auth: bool, with_: str) -> None:
    assert SWAKS is not None
    relay: RelayProcess = relay_factory(accounts=AUTH_ONLY_ACCOUNTS if auth else None)  # type: ignore[operator]
    sender = ALICE if auth else SENDER
    data = tmp_path / "message.eml"
    # swaks adds CRLF "." CRLF after the file's last byte (a final CRLF in the
    # file would become an extra empty line): without it, swaks sends MESSAGE.
    data.write_bytes(MESSAGE.removesuffix(b"\r\n"))
    argv = [SWAKS, "--server", "127.0.0.1", "--port", str(relay.tls_port if implicit else relay.port),
            "--helo", CLIENT_HELO, "--from", sender, "--to", RECIPIENT, "--data", f"@{data}",
            "--timeout", "30", *options]
    if options:  # every case but "plain" uses TLS: verify fastrelay's certificate
        argv += ["--tls-verify", "--tls-ca-path", str(certs.ca_file)]
    if auth:
        argv += ["--auth-user", ALICE, "--auth-password", ALICE_PASSWORD]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    if auth:
        assert re.search(r"<~  235 2\.7\.0 Accepted", result.stdout), result.stdout

    envelope, received, rest = only_message(relay)
    assert envelope.queue_id == queued_as(result.stdout)
    assert rest == MESSAGE
    assert (envelope.sender, envelope.recipients, envelope.client_helo) == (sender, [RECIPIENT], CLIENT_HELO)
    assert envelope.auth_user == (ALICE if auth else None)
    assert (envelope.tls is not None) == bool(options)
    assert f"by relay.example.test (fastrelay) with {with_} id {envelope.queue_id}".encode() in received


# --- msmtp ----------------------------------------------------------------------

# (id, msmtp settings, use the implicit TLS port, relay admits AUTH only, Received "with")
MSMTP_CASES = [
    ("plain", {"tls": "off", "auth": "off"}, False, False, "ESMTP"),
    ("starttls", {"tls": "on", "tls_starttls": "on", "auth": "off"}, False, False, "ESMTPS"),
    ("starttls-auth", {"tls": "on", "tls_starttls": "on", "auth": "on"}, False, True, "ESMTPSA"),
    ("implicit-tls-auth-login", {"tls": "on", "tls_starttls": "off", "auth": "login"}, True, True, "ESMTPSA"),
]


@needs_msmtp
@pytest.mark.parametrize("settings, implicit, auth, with_", [c[1:] for c in MSMTP_CASES],
                         ids=[c[0] for c in MSMTP_CASES])
def test_msmtp(relay_factory: object, certs: Certs, tmp_path: Path,
               settings: dict[str, str], implicit: bool, auth: bool, with_: str) -> None:
    assert MSMTP is not None
    relay: RelayProcess = relay_factory(accounts=AUTH_ONLY_ACCOUNTS if auth else None)  # type: ignore[operator]
    sender = ALICE if auth else SENDER
    lines = {
        "host": "127.0.0.1",
        "port": str(relay.tls_port if implicit else relay.port),
        "domain": CLIENT_HELO,  # the EHLO name; msmtp's default "localhost" is refused
        "from": sender,
        "tls_trust_file": str(certs.ca_file),
        "timeout": "30",
        **settings,
    }
    if auth:
        lines.update(user=ALICE, password=ALICE_PASSWORD)
    config = tmp_path / "msmtprc"
    config.write_text("account relay\n" + "".join(f"{k} {v}\n" for k, v in lines.items())
                      + "account default : relay\n")
    config.chmod(0o600)  # msmtp refuses a config with a password that others can read
    result = subprocess.run([MSMTP, "-C", str(config), "-v", "-f", sender, RECIPIENT],
                            input=MESSAGE, capture_output=True, timeout=60, check=False)
    transcript = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 0, transcript

    envelope, received, rest = only_message(relay)
    assert envelope.queue_id == queued_as(transcript)
    assert rest == MESSAGE
    assert (envelope.sender, envelope.recipients, envelope.client_helo) == (sender, [RECIPIENT], CLIENT_HELO)
    assert envelope.auth_user == (ALICE if auth else None)
    assert f"by relay.example.test (fastrelay) with {with_} id {envelope.queue_id}".encode() in received


# --- Postfix ----------------------------------------------------------------------


@pytest.fixture
def postfix_factory(certs: Certs) -> object:
    started: list[PostfixPeer] = []

    def make(relay: RelayProcess, **kwargs: object) -> PostfixPeer:
        peer = PostfixPeer(port=free_port(), relay_port=relay.port, ca_file=certs.ca_file, **kwargs)  # type: ignore[arg-type]
        started.append(peer)
        peer.start()
        return peer

    yield make
    for peer in started:
        peer.stop()


def send_through_postfix(peer: PostfixPeer, sender: str) -> None:
    with smtplib.SMTP("127.0.0.1", peer.port, local_hostname=CLIENT_HELO, timeout=30) as client:
        assert client.sendmail(sender, [RECIPIENT], MESSAGE) == {}


def wait_forwarded(relay: RelayProcess, peer: PostfixPeer, timeout: float = 60.0) -> tuple[Envelope, bytes, bytes]:
    """Poll fastrelay's spool until Postfix has forwarded the message; check Postfix's log agrees."""
    deadline = time.monotonic() + timeout
    while not relay.queued():
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing forwarded in {timeout}s; Postfix log:\n{peer.log()}"
                                 f"\nfastrelay log:\n{relay.log()[-3000:]}")
        time.sleep(0.1)
    envelope, received, rest = only_message(relay)
    qid = envelope.queue_id
    line = f"relay=127.0.0.1[127.0.0.1]:{relay.port},"
    while f"status=sent (250 2.0.0 Ok: queued as {qid})" not in peer.log():
        if time.monotonic() > deadline:
            raise AssertionError(f"Postfix did not log {qid} as sent:\n{peer.log()}")
        time.sleep(0.1)
    assert line in peer.log()
    return envelope, received, rest


def check_postfix_content(rest: bytes) -> None:
    """Postfix's own Received: comes first; the client's headers and body follow unchanged."""
    postfix_received, original = split_first_field(rest)
    assert postfix_received.startswith(f"Received: from {CLIENT_HELO} ".encode()), rest[:300]
    assert b"by postfix.peer.test (Postfix) with ESMTP" in postfix_received
    assert original == MESSAGE


@needs_postfix
def test_postfix_relayhost_starttls(relay: RelayProcess, postfix_factory: object) -> None:
    peer: PostfixPeer = postfix_factory(relay)  # type: ignore[operator]
    send_through_postfix(peer, SENDER)
    envelope, received, rest = wait_forwarded(relay, peer)
    assert (envelope.sender, envelope.recipients) == (SENDER, [RECIPIENT])
    assert (envelope.client_helo, envelope.client_ip) == ("postfix.peer.test", "127.0.0.1")
    assert envelope.tls is not None and envelope.auth_user is None
    assert envelope.rule == "loopback"
    assert b"with ESMTPS id" in received
    assert "Trusted TLS connection established to 127.0.0.1[127.0.0.1]" in peer.log()
    check_postfix_content(rest)


def _cyrus_client_plugins() -> bool:
    return bool(glob.glob("/usr/lib/*/sasl2/libplain.so*") or glob.glob("/usr/lib/sasl2/libplain.so*"))


@needs_postfix
@pytest.mark.skipif(POSTMAP is None, reason="postmap is not installed (Debian package postfix)")
@pytest.mark.skipif(not _cyrus_client_plugins(),
                    reason="Postfix's SASL client needs Cyrus SASL's PLAIN module (Debian package libsasl2-modules)")
def test_postfix_relayhost_sasl_auth(relay_factory: object, postfix_factory: object) -> None:
    relay: RelayProcess = relay_factory(accounts=AUTH_ONLY_ACCOUNTS)  # type: ignore[operator]
    peer: PostfixPeer = postfix_factory(relay, sasl_password=(ALICE, ALICE_PASSWORD))  # type: ignore[operator]
    send_through_postfix(peer, ALICE)
    envelope, received, rest = wait_forwarded(relay, peer)
    assert (envelope.sender, envelope.recipients) == (ALICE, [RECIPIENT])
    assert envelope.client_helo == "postfix.peer.test"
    assert (envelope.auth_user, envelope.rule) == (ALICE, "authenticated")
    assert b"with ESMTPSA id" in received
    assert b"(Authenticated sender: alice@example.com)" in received
    check_postfix_content(rest)
