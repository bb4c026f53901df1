"""The command line: ``hash-password``, ``queue list`` and ``explain``, run as subprocesses."""

from __future__ import annotations

import json
import re
import smtplib
import subprocess
import sys

import argon2
import pytest
from conftest import RelayProcess
from fastrelay import abuse
from fastrelay.config import load_config

FASTRELAY = [sys.executable, "-m", "fastrelay"]
SENDER = "bob@example.com"
CLIENT_HELO = "client.example.com"


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FASTRELAY, *args], input=stdin, capture_output=True, text=True,
                          timeout=60, check=False)


# --- hash-password ------------------------------------------------------------------


def test_hash_password_verifies() -> None:
    result = run("hash-password", "--password-stdin", stdin="correct horse battery staple\n")
    assert (result.returncode, result.stderr) == (0, "")
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("$argon2id$v=19$")
    hasher = argon2.PasswordHasher()
    assert hasher.verify(lines[0], "correct horse battery staple")
    with pytest.raises(argon2.exceptions.VerifyMismatchError):
        hasher.verify(lines[0], "correct horse battery staple\n")


def test_hash_password_refuses_empty() -> None:
    result = run("hash-password", "--password-stdin", stdin="\n")
    assert (result.returncode, result.stdout, result.stderr) == (2, "", "fastrelay: empty password\n")


# --- queue list ---------------------------------------------------------------------


def test_queue_list(relay: RelayProcess) -> None:
    empty = run("queue", "list", "--config", str(relay.config_path))
    assert (empty.returncode, empty.stderr) == (0, "")
    assert empty.stdout.splitlines()[-1] == "-- 0 message(s)"

    replies = []
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname=CLIENT_HELO, timeout=30) as client:
        assert client.ehlo()[0] == 250
        for recipients in (["carol@example.net"], ["dave@example.net", "erin@example.org"]):
            assert client.mail(SENDER) == (250, b"2.1.0 Ok")
            for rcpt in recipients:
                assert client.rcpt(rcpt) == (250, b"2.1.5 Ok")
            replies.append(client.data(b"Subject: queue list\r\n\r\nhello\r\n"))
    queue_ids = []
    for code, text in replies:
        queued = re.fullmatch(rb"2\.0\.0 Ok: queued as (\S+)", text)
        assert code == 250 and queued is not None, text
        queue_ids.append(queued.group(1).decode())

    result = run("queue", "list", "--config", str(relay.config_path))
    assert (result.returncode, result.stderr) == (0, "")
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["queue", "id", "state", "size", "age", "sender", "->", "recipients"]
    assert lines[-1] == "-- 2 message(s)"
    sizes = {envelope.queue_id: len(content) for envelope, content in relay.queued()}  # type: ignore[attr-defined]
    expected = [(queue_ids[0], "carol@example.net"), (queue_ids[1], "dave@example.net, erin@example.org")]
    for row, (qid, rcpts) in zip(lines[1:-1], expected, strict=True):
        m = re.fullmatch(r"(\S+) +incoming +(\d+) +\d+s  <bob@example\.com> -> (.*)", row)
        assert m is not None, row
        assert (m.group(1), int(m.group(2)), m.group(3)) == (qid, sizes[qid], rcpts)


# --- explain ------------------------------------------------------------------------


def test_explain_allowed(relay_factory: object) -> None:
    relay: RelayProcess = relay_factory(start=False)  # type: ignore[operator]
    result = run("explain", "--config", str(relay.config_path), "--ip", "127.0.0.1",
                 "--helo", CLIENT_HELO, "--from", SENDER, "--rcpt", "carol@example.net")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines() == [
        "client 127.0.0.1, HELO client.example.com, TLS no, AUTH -",
        "account: example (identified by sender)",
        "  rule 'loopback': ADMITS: rule 'loopback' admits",
        "  rule 'authenticated': fails at TLS: rule 'authenticated': TLS required, session not in TLS",
        "MAIL FROM:<bob@example.com>: 250 2.1.0 Ok",
        "RCPT TO:<carol@example.net>: 250 2.1.5 Ok (limits are checked by the running server)",
    ]


def test_explain_allowed_by_auth(relay_factory: object) -> None:
    relay: RelayProcess = relay_factory(start=False)  # type: ignore[operator]
    result = run("explain", "--config", str(relay.config_path), "--ip", "192.0.2.7", "--helo", CLIENT_HELO,
                 "--from", "alice@example.com", "--auth", "alice@example.com", "--tls")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines() == [
        "client 192.0.2.7, HELO client.example.com, TLS yes, AUTH alice@example.com",
        "account: example (identified by auth)",
        "  rule 'loopback': fails at IP: rule 'loopback': client IP 192.0.2.7 is not in an enabled range",
        "  rule 'authenticated': ADMITS: rule 'authenticated' admits",
        "MAIL FROM:<alice@example.com>: 250 2.1.0 Ok",
    ]


def test_explain_sees_the_relays_suspensions_for_spam(relay_factory: object) -> None:
    relay: RelayProcess = relay_factory(start=False)  # type: ignore[operator]
    config = load_config(relay.config_path)
    state = abuse.state_path(config)
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps({"version": 1, "suspensions": {"alice@example.com": {
        "address": "alice@example.com", "account": "example", "since": 1.0, "reason": "spam"}}}))
    argv = ("explain", "--config", str(relay.config_path), "--ip", "192.0.2.7", "--helo", CLIENT_HELO,
            "--from", "alice@example.com", "--auth", "alice@example.com", "--tls")
    result = run(*argv)
    assert result.returncode == 1, result.stdout
    assert "alice@example.com is suspended for sending spam" in result.stdout
    state.write_text("{not json")
    broken = run(*argv)
    assert broken.returncode == 2 and str(state.name) in broken.stderr + broken.stdout


def test_explain_refused(relay_factory: object) -> None:
    relay: RelayProcess = relay_factory(start=False)  # type: ignore[operator]
    result = run("explain", "--config", str(relay.config_path), "--ip", "192.0.2.7",
                 "--helo", CLIENT_HELO, "--from", SENDER, "--rcpt", "carol@example.net")
    assert (result.returncode, result.stderr) == (1, "")
    lines = result.stdout.splitlines()
    assert lines[:-1] == [
        "client 192.0.2.7, HELO client.example.com, TLS no, AUTH -",
        "account: example (identified by sender)",
        "  rule 'loopback': fails at IP: rule 'loopback': client IP 192.0.2.7 is not in an enabled range",
        "  rule 'authenticated': fails at TLS: rule 'authenticated': TLS required, session not in TLS",
        # The rule that got furthest (TLS is after IP) gives the reply.
        "MAIL FROM:<bob@example.com>: 530 5.7.0 Must issue a STARTTLS command first.",
    ]
    assert lines[-1].startswith("reason: ") and "TLS required, session not in TLS" in lines[-1]


def test_explain_refused_helo(relay_factory: object) -> None:
    relay: RelayProcess = relay_factory(start=False)  # type: ignore[operator]
    result = run("explain", "--config", str(relay.config_path), "--ip", "192.0.2.7",
                 "--helo", "localhost", "--from", SENDER)
    assert (result.returncode, result.stderr) == (1, "")
    assert result.stdout.splitlines() == [
        "client 192.0.2.7, HELO localhost, TLS no, AUTH -",
        "HELO: refused: 421 4.7.0 Try again later, closing connection. (EHLO)",
    ]


def test_explain_bad_config(relay_factory: object) -> None:
    relay: RelayProcess = relay_factory(start=False)  # type: ignore[operator]
    relay.config_path.write_text("[server]\nlisten = 25\n")
    result = run("explain", "--config", str(relay.config_path), "--ip", "127.0.0.1", "--helo", CLIENT_HELO)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"fastrelay: {relay.config_path}: server.listen: Expected `array`, got `int`\n"
