"""Abuse control over loopback: a real relay, real scanners, real sinks.

The relay delivers everything to one aiosmtpd sink (tests/sink.py) through
a ``[[delivery.routes]] domain = "*"`` route, so the sink sees what is
delivered and the super admins' notices alike.  rspamd, spamd and clamd are
private instances started once per module (tests/scanner_daemons.py).
GTUBE and EICAR are the test patterns every spam filter and virus scanner
knows; the builtin scanner knows them too.
"""

from __future__ import annotations

import base64
import email
import email.header
import email.policy
import email.utils
import json
import smtplib
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from conftest import RelayProcess, free_port
from hypothesis import given, settings
from hypothesis import strategies as st
from scanner_daemons import (
    EICAR,
    GTUBE,
    Daemon,
    StubDaemon,
    running,
    start_clamd,
    start_rspamd,
    start_spamd,
)
from sink import Sink, SinkMessage

from fastrelay.config import load_config
from fastrelay.control import request as control_request
from fastrelay.control import socket_path
from fastrelay.errors import ConfigError
from fastrelay.scanners import RspamdClient, ScannerError, SpamdClient, content_signals
from fastrelay.spool import Envelope, MessageState, Spool

ACCOUNTS = """
[[accounts]]
name = "example"
domains = ["example.com", "example.org"]
super_admins = ["admin@example.com", "security@example.org"]

[[accounts.users]]
address = "alice@example.com"

[[accounts.users]]
address = "bob@example.com"

[[accounts.users]]
address = "carol@example.com"

[[accounts.rules]]
name = "loopback"
allowed_senders = "my_domains"
only_allowed_ips = true
ips = [ { range = "127.0.0.0/24", description = "tests" } ]
"""

DELIVERY = """
[delivery]
retry_schedule = ["1s"]
connect_timeout = 2
command_timeout = 5
connection_idle_time = 1

[[delivery.routes]]
domain = "*"
host = "127.0.0.1:{port}"
tls = "none"
"""

HELO = "mail.example.com"
PRINTER = "printer@example.org"   # an account domain, not a registered user
DAEMON_KEY = {"rspamd": "rspamd_url", "spamd": "spamd", "clamd": "clamd"}


def toml_value(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def start(relay_factory: Callable[..., RelayProcess], sink: Sink, **abuse: Any) -> RelayProcess:
    extra = DELIVERY.format(port=sink.port)
    if abuse:
        extra += "\n[abuse]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in abuse.items())
    return relay_factory(accounts=ACCOUNTS, extra=extra)


@pytest.fixture(scope="module")
def clamd() -> Iterator[Daemon]:
    yield from running(start_clamd)


@pytest.fixture(scope="module")
def spamd() -> Iterator[Daemon]:
    yield from running(start_spamd)


@pytest.fixture(scope="module")
def rspamd() -> Iterator[Daemon]:
    yield from running(start_rspamd)


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink("127.0.0.1").start()
    yield s
    s.stop()


def message(sender: str, subject: str, text: bytes = b"Hello.", headers: str = "") -> bytes:
    """A well-formed message (Date, Message-ID, From of the sender's domain): only the content counts."""
    return (f"From: {sender}\r\nTo: someone@dest.test\r\nSubject: {subject}\r\n"
            f"Date: {email.utils.formatdate()}\r\nMessage-ID: <{uuid.uuid4().hex}@example.com>\r\n"
            f"{headers}\r\n").encode() + text + b"\r\n"


def with_attachment(sender: str, subject: str, name: str, payload: bytes) -> bytes:
    encoded = base64.encodebytes(payload).decode().replace("\n", "\r\n")
    return message(sender, subject, (
        "--b1\r\nContent-Type: text/plain\r\n\r\nSee the attachment.\r\n"
        f"--b1\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
        f'Content-Disposition: attachment; filename="{name}"\r\n\r\n{encoded}--b1--').encode(),
        'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b1"\r\n')


def send(relay: RelayProcess, sender: str, body: bytes, recipients: list[str] | None = None) -> str:
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname=HELO, timeout=15) as client:
        client.ehlo()
        code, text = client.mail(sender)
        assert code == 250, text
        for rcpt in recipients or ["someone@dest.test"]:
            code, text = client.rcpt(rcpt)
            assert code == 250, text
        code, text = client.data(body)
        assert code == 250, text
    return text.decode().rsplit(" ", 1)[-1]


def mail_from(relay: RelayProcess, sender: str) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname=HELO, timeout=15) as client:
        client.ehlo()
        code, text = client.mail(sender)
        return code, text.decode()


def cli(relay: RelayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastrelay", *args, "--config", str(relay.config_path)],
                          capture_output=True, text=True, timeout=30, check=False)


def states(relay: RelayProcess) -> dict[str, MessageState]:
    return {m.envelope.queue_id: m.state.state for m in Spool(relay.spool_dir).scan()}


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def wait_held(relay: RelayProcess, *queue_ids: str) -> None:
    wait_until(lambda: all(states(relay).get(q) == MessageState.HOLD for q in queue_ids),
               f"{queue_ids} on hold; log:\n{relay.log()[-3000:]}")


def parse(m: SinkMessage) -> Message:
    return email.message_from_bytes(m.content, policy=email.policy.compat32)


def notices(sink: Sink) -> list[tuple[str, SinkMessage]]:
    """(Subject, message) of every notice the super admins received."""
    return [(str(parse(m)["Subject"]), m) for m in sink.messages if m.mail_from == "postmaster@example.com"]


def wait_relayed(sink: Sink, count: int) -> list[SinkMessage]:
    """The relayed messages, once ``count`` of them have arrived: a virus verdict also sends the
    super admins a notice, which may reach the sink first."""
    wait_until(lambda: len(relayed(sink)) >= count, f"{count} relayed message(s)")
    return relayed(sink)


def relayed(sink: Sink) -> list[SinkMessage]:
    return [m for m in sink.messages if m.mail_from != "postmaster@example.com"]


def wait_notices(sink: Sink, count: int, timeout: float = 15.0) -> list[tuple[str, SinkMessage]]:
    wait_until(lambda: len(notices(sink)) >= count,
               f"{count} notice(s); got {[s for s, _ in notices(sink)]}", timeout)
    return notices(sink)


def scan_line(relay: RelayProcess, queue_id: str) -> str:
    log = relay.wait_log(f"{queue_id}: scan: ")
    [line] = [ln for ln in log.splitlines() if f"{queue_id}: scan: " in ln]
    return str(line)


# --- the builtin scanner, no daemon --------------------------------------------------------------


def test_builtin_default_delivers_plain_mail_and_quarantines_the_test_patterns(
        sink: Sink, relay_factory: Callable[..., RelayProcess]) -> None:
    relay = relay_factory(accounts=ACCOUNTS, extra=DELIVERY.format(port=sink.port))  # no [abuse]: the default
    # What devices send every day, even without Date or Message-ID, is delivered as is.
    plain_body = b"From: carol@example.com\r\nSubject: minutes\r\n\r\nSee you.\r\n"
    plain = send(relay, "carol@example.com", plain_body)
    [delivered] = sink.wait(1)
    assert delivered.content.endswith(plain_body)
    assert "verdict=clean, scanner=builtin, score=2.0/5.0, reasons=NO_MESSAGE_ID(1),NO_DATE(1)" \
        in scan_line(relay, plain)

    gtube = send(relay, "alice@example.com", message("alice@example.com", "cheap", GTUBE))
    eicar = send(relay, "alice@example.com", with_attachment("alice@example.com", "report", "report.com", EICAR))
    exe = send(relay, "alice@example.com", with_attachment("alice@example.com", "invoice", "invoice.exe", b"MZ\x90"))
    wait_held(relay, gtube, eicar, exe)
    log = relay.wait_log(f"{exe}: hold:")
    assert f"{gtube}: hold: quarantine: spam (builtin score 1000.0/5.0: GTUBE(1000))" in log
    assert f"{eicar}: hold: quarantine: virus (builtin: EICAR-Test-File" in log
    assert f"{exe}: hold: quarantine: spam (builtin score 5.0/5.0: BAD_ATTACHMENT(5: invoice.exe))" in log
    # Any virus crosses the alert threshold: one notice to the super admins.
    [(subject, _)] = wait_notices(sink, 1)
    assert subject == "[fastrelay] Virus alert: alice@example.com"
    time.sleep(0.5)
    assert len(sink.messages) == 2 and sink.messages[0] is delivered


def test_builtin_history_signals_many_new_recipients_and_a_volume_jump(
        sink: Sink, relay_factory: Callable[..., RelayProcess]) -> None:
    relay = start(relay_factory, sink, scanners=["builtin"], builtin_many_recipients=3, builtin_volume_min=4,
                  builtin_volume_factor=2.0)
    team = ["a@dest.test", "b@dest.test", "c@dest.test"]
    first = send(relay, "carol@example.com", message("carol@example.com", "kick-off"), team)
    second = send(relay, "carol@example.com", message("carol@example.com", "agenda"), team)
    third = send(relay, "carol@example.com", message("carol@example.com", "notes"))
    fourth = send(relay, "carol@example.com", message("carol@example.com", "more notes"))
    sink.wait(4)
    assert "reasons=MANY_NEW_RECIPIENTS(2: 3 of 3 never written to before)" in scan_line(relay, first)
    assert "verdict=clean" in scan_line(relay, second) and "MANY_NEW" not in scan_line(relay, second)
    assert "VOLUME_JUMP" not in scan_line(relay, third)
    assert "VOLUME_JUMP(2: 4 messages in the last hour, baseline 0.0/h)" in scan_line(relay, fourth)


def test_builtin_content_signals_and_their_weights() -> None:
    env = Envelope("Q", 0.0, "127.0.0.1", HELO, "alice@example.com", ["x@dest.test"])
    domains = ("example.com", "example.org")

    def names(body: bytes) -> dict[str, float]:
        return {s.name: s.weight for s in content_signals(env, body, domains).signals}

    assert names(message("alice@example.com", "hi")) == {}
    assert names(message("news@mail.example.org", "hi")) == {}            # the account's own domain
    assert names(message("ceo@paypa1-secure.test", "hi")) == {"FROM_UNRELATED": 2.0}
    assert names(b"Subject: x\r\n\r\nbody\r\n") == {"NO_MESSAGE_ID": 1.0, "NO_DATE": 1.0, "NO_FROM": 1.0}
    links = b"".join(b"http://t.test/%d\r\n" % i for i in range(10))
    assert names(message("alice@example.com", "deals", links)) == {"URL_DENSITY": 2.0}
    assert names(with_attachment("alice@example.com", "x", "run.vbs", b"x")) == {"BAD_ATTACHMENT": 5.0}
    assert names(with_attachment("alice@example.com", "x", "run.pdf", b"x")) == {}
    # The executable in the first part (its delimiter on the text's first line), and one
    # in a multipart nested inside a later part.
    first = message("alice@example.com", "x", b'--b1\r\nContent-Disposition: attachment; filename="a.scr"\r\n'
                    b"\r\nx\r\n--b1--", 'Content-Type: multipart/mixed; boundary="b1"\r\n')
    assert names(first) == {"BAD_ATTACHMENT": 5.0}
    nested = message("alice@example.com", "x", b"--b1\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
                     b'--b1\r\nContent-Type: multipart/mixed; boundary="b2"\r\n\r\n'
                     b'--b2\r\nContent-Type: application/x-msdownload; name="setup.exe"\r\n\r\nMZ\r\n'
                     b"--b2--\r\n--b1--", 'Content-Type: multipart/mixed; boundary="b1"\r\n')
    assert names(nested) == {"BAD_ATTACHMENT": 5.0}
    assert names(nested.replace(b"setup.exe", b"setup.txt")) == {}
    facts = content_signals(env, with_attachment("alice@example.com", "x", "a.txt", EICAR), domains)
    assert facts.virus == "EICAR-Test-File" and facts.subject == "x"


@pytest.mark.parametrize("hidden", ["line\r\n.\r\nMAIL FROM:<x@y>", "bare\nlf and \rcr", "red \x1b[31malert\x1b[0m",
                                    "right-to-left \u202egpj.exe", "nul\x00 and del\x7f"])
def test_a_subject_is_shown_without_control_characters(hidden: str) -> None:
    """The subject of held mail reaches the super admins' notices, the log and
    `fastrelay quarantine list` on an administrator's terminal.  An encoded word can
    carry any character: line ends (which would break the notice's lines), terminal
    escapes, a right-to-left override.  Each becomes a space."""
    env = Envelope("Q", 0.0, "127.0.0.1", HELO, "alice@example.com", ["x@dest.test"])
    encoded = email.header.Header(hidden, "utf-8").encode()
    facts = content_signals(env, message("alice@example.com", encoded), ("example.com",))
    assert facts.subject and all(c.isprintable() for c in facts.subject), repr(facts.subject)
    visible = "".join(c for c in hidden if c.isprintable())
    assert facts.subject.replace(" ", "") == visible.replace(" ", ""), repr(facts.subject)


def test_the_synchronous_check_answers_clean_mail_and_leaves_a_quarantine_to_the_awaited_one(
        tmp_path: Path) -> None:
    """The queue manager asks ``pre_delivery_now`` first: clean mail is judged (and counted) at
    once; a quarantine must wait for its record to be on disk, so the quick path declines it
    without counting anything, and the awaited path judges it once."""
    import asyncio

    from fastrelay.abuse import AbuseDesk, state_path
    from fastrelay.delivery import VerdictAction
    from fastrelay.policy import Directory
    from fastrelay.spool import QueueIdGenerator

    cfg = tmp_path / "relay.toml"
    cfg.write_text('[[accounts]]\nname = "example"\ndomains = ["example.com"]\n'
                   '[[accounts.rules]]\nname = "lo"\nallowed_senders = "my_domains"\nonly_allowed_ips = true\n'
                   'ips = [ { range = "127.0.0.0/24" } ]\n'
                   f'[abuse]\nstate_dir = "{tmp_path / "abuse"}"\n')
    config = load_config(cfg)

    async def run() -> None:
        spool = Spool(tmp_path / "spool")
        spool.recover()
        spool.start(asyncio.get_running_loop())
        ids = QueueIdGenerator()
        desk = AbuseDesk(config, spool, ids, Directory(config))

        async def queued(body: bytes) -> tuple[Envelope, Any]:
            env = Envelope(ids.next(), time.time(), "127.0.0.1", HELO, "alice@example.com", ["bob@dest.test"],
                           account="example")
            location = await spool.append_message(env, (body,))
            assert location is not None
            return env, location

        clean = await queued(message("alice@example.com", "hello"))
        verdict = desk.pre_delivery_now(*clean)
        assert verdict is not None and verdict.action == VerdictAction.DELIVER
        assert desk.counters["scanned"] == 1 and desk.counters["clean"] == 1

        spam = await queued(message("alice@example.com", "offer", GTUBE))
        assert desk.pre_delivery_now(*spam) is None
        assert desk.counters["scanned"] == 1 and desk.counters["spam"] == 0   # nothing counted twice
        held = await desk.pre_delivery(*spam)
        assert held.action == VerdictAction.HOLD and desk.counters["spam"] == 1
        assert spam[0].queue_id in state_path(config).read_text()             # on disk before the hold

        relay_made = Envelope(ids.next(), time.time(), "", "relay.test", "", ["alice@example.com"])
        assert desk.pre_delivery_now(relay_made, clean[1]) is not None        # DSNs and notices: not scanned
        assert desk.counters["scanned"] == 2
        await desk.close(1.0)
        desk.reader.close()
        spool.close()

    asyncio.run(run())


# --- each daemon ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scanner", ["rspamd", "spamd", "clamd"])
def test_each_daemon_judges_over_loopback(scanner: str, sink: Sink, relay_factory: Callable[..., RelayProcess],
                                          request: pytest.FixtureRequest) -> None:
    daemon: Daemon = request.getfixturevalue(scanner)
    relay = start(relay_factory, sink, scanners=[scanner], **{DAEMON_KEY[scanner]: daemon.address},
                  scan_timeout=10)
    clean = send(relay, "carol@example.com", message("carol@example.com", "lunch?"))
    if scanner == "clamd":
        bad = send(relay, "alice@example.com", with_attachment("alice@example.com", "doc", "doc.zip", EICAR))
        verdict, reason = "virus", "Fastrelay.Test.EICAR"
    else:
        body = message("alice@example.com", "win", GTUBE)
        bad = send(relay, "alice@example.com", body)
        verdict, reason = "spam", "GTUBE"
    [delivered] = wait_relayed(sink, 1)
    assert b"Subject: lunch?" in delivered.content
    assert f"verdict=clean, scanner={scanner}," in scan_line(relay, clean)
    line = scan_line(relay, bad)
    assert f"verdict={verdict}, scanner={scanner}," in line and reason in line, line
    wait_held(relay, bad)
    assert f"{bad}: hold: quarantine: {verdict} ({scanner}" in relay.wait_log(f"{bad}: hold:")
    if scanner == "rspamd":
        assert bad in daemon.log  # our Queue-Id header, in rspamd's own log
    elif scanner == "clamd":
        assert f"{reason}.UNOFFICIAL FOUND" in daemon.log
    else:
        message_id = body.split(b"Message-ID: <")[1].split(b">")[0].decode()
        assert "identified spam" in daemon.log and message_id in daemon.log
    time.sleep(0.3)
    assert relayed(sink) == [delivered]


# --- the whole path ------------------------------------------------------------------------------


def test_spam_burst_alerts_once_then_suspends_with_real_scanners(
        sink: Sink, relay_factory: Callable[..., RelayProcess], rspamd: Daemon, spamd: Daemon,
        clamd: Daemon) -> None:
    relay = start(relay_factory, sink, scanners=["builtin", "rspamd", "spamd", "clamd"],
                  rspamd_url=rspamd.address, spamd=spamd.address, clamd=clamd.address,
                  alert_min_spam=3, alert_spam_ratio=0.5, alert_window="1h", suspend_after="4s",
                  scan_timeout=10)
    send(relay, "carol@example.com", message("carol@example.com", "status"))
    send(relay, "alice@example.com", message("alice@example.com", "weekly report"))
    alice = [send(relay, "alice@example.com", message("alice@example.com", f"cheap offer {i}", GTUBE))
             for i in range(4)]
    bob = [send(relay, "bob@example.com", message("bob@example.com", "prize", GTUBE)) for _ in range(3)]
    virus = send(relay, PRINTER, with_attachment(PRINTER, "scan", "scan.pdf.exe.zip", EICAR))
    wait_held(relay, *alice, *bob, virus)
    line = scan_line(relay, alice[0])
    for part in ("verdict=spam, scanner=rspamd, score=15.0/15.0", "rspamd:spam 15.0/15.0", "spamd:spam ",
                 "clamd:clean,", "builtin:spam 1000.0/5.0", "action=quarantine", "counted_as=alice@example.com"):
        assert part in line, line
    assert "verdict=virus, scanner=clamd" in scan_line(relay, virus)

    # One alert per sender that crossed a threshold: alice (3 of 5 spam), bob, the account's others (a virus).
    found = dict(wait_notices(sink, 3))
    assert set(found) == {"[fastrelay] Spam alert: alice@example.com", "[fastrelay] Spam alert: bob@example.com",
                          "[fastrelay] Virus alert: non-registered senders of account 'example'"}
    alert = found["[fastrelay] Spam alert: alice@example.com"]
    assert alert.mail_from == "postmaster@example.com"
    assert alert.rcpt_tos == ["admin@example.com", "security@example.org"]
    text = " ".join(str(parse(alert).get_payload()).split())  # unwrapped
    for part in ("the registered user alice@example.com", "at least 3 spam messages making up at least 50%",
                 "within 1h", "4s from now, it will be suspended", "Subject: cheap offer ",
                 "fastrelay quarantine list --config"):
        assert part in text, text
    assert sum(qid in text for qid in alice) >= 3, text   # the samples: the spam seen so far
    delivered_before = len(sink.messages)

    # The quarantine, from the command line.
    listing = cli(relay, "quarantine", "list")
    assert listing.returncode == 0, listing.stderr
    for qid in (*alice, *bob):
        assert f"{qid} spam" in " ".join(listing.stdout.split()), listing.stdout
    assert "15.0/15.0  rspamd" in listing.stdout and "reasons: action=reject, GTUBE(0)" in listing.stdout
    assert "-- 8 message(s) in quarantine" in listing.stdout
    shown = cli(relay, "quarantine", "show", alice[0])
    assert shown.returncode == 0, shown.stderr
    assert "Subject: cheap offer 0" in shown.stdout and "X-Quarantine: spam by rspamd, score 15.0/15.0" in shown.stdout
    released = cli(relay, "quarantine", "release", alice[0])
    assert released.returncode == 0 and f"{alice[0]}: released" in released.stdout
    deleted = cli(relay, "quarantine", "delete", alice[1])
    assert deleted.returncode == 0 and f"{alice[1]}: removed" in deleted.stdout
    # A virus is never delivered: it can be shown or deleted, not released, by any way in.
    refused = cli(relay, "quarantine", "release", virus)
    assert refused.returncode == 1, refused
    assert "quarantined as a virus (Fastrelay.Test.EICAR.UNOFFICIAL" in refused.stderr
    assert "cannot be released" in refused.stderr and f"quarantine delete {virus}" in refused.stderr
    assert cli(relay, "queue", "release", virus).returncode == 1
    forced = cli(relay, "quarantine", "release", "--force", virus)
    assert forced.returncode != 0 and "unrecognized arguments: --force" in forced.stderr, forced
    answer = control_request(socket_path(relay.spool_dir),
                             {"cmd": "quarantine_release", "queue_id": virus, "force": True})
    assert answer["ok"] is False and "cannot be released" in answer["error"], answer
    shown = cli(relay, "quarantine", "show", virus)
    assert shown.returncode == 0 and "X-Quarantine: virus by clamd" in shown.stdout, shown
    relay.wait_log(f"{virus}: release refused: quarantined as a virus")
    wait_until(lambda: len(sink.messages) >= delivered_before + 1, "the released message")
    assert any(b"cheap offer 0" in m.content for m in sink.messages[delivered_before:])
    assert states(relay)[virus] == MessageState.HOLD
    assert alice[1] not in states(relay)
    assert relay.log().count(f"{alice[0]}: scan: ") == 1   # released as is, not scanned again

    # suspend_after later: still over the threshold.
    found = dict(wait_notices(sink, 6))
    assert set(found) >= {"[fastrelay] User suspended: alice@example.com",
                          "[fastrelay] User suspended: bob@example.com",
                          "[fastrelay] Still sending viruses: non-registered senders of account 'example'"}
    assert "fastrelay user unsuspend alice@example.com --config" in str(parse(
        found["[fastrelay] User suspended: alice@example.com"]).get_payload())
    code, text = mail_from(relay, "alice@example.com")
    assert code == 550 and text.startswith("5.7.0 Mail Sending denied"), text
    # Others' mail flows meanwhile.
    carol = send(relay, "carol@example.com", message("carol@example.com", "still here"))
    relay.wait_log(f"{carol}: removed")

    # Suspensions and the quarantine survive a restart.
    relay.stop()
    relay.start()
    assert mail_from(relay, "bob@example.com")[0] == 550
    listing = cli(relay, "quarantine", "list")
    assert alice[3] in listing.stdout and f"{virus} virus" in " ".join(listing.stdout.split())
    assert "-- 6 message(s) in quarantine" in listing.stdout, listing.stdout
    suspended = cli(relay, "user", "suspended")
    assert "alice@example.com" in suspended.stdout and "bob@example.com" in suspended.stdout
    unsuspended = cli(relay, "user", "unsuspend", "bob@example.com")
    assert unsuspended.returncode == 0 and "bob@example.com: unsuspended" in unsuspended.stdout
    assert mail_from(relay, "bob@example.com")[0] == 250
    assert mail_from(relay, "alice@example.com")[0] == 550

    # With the relay stopped, unsuspend edits the state file.
    relay.stop()
    offline = cli(relay, "user", "unsuspend", "alice@example.com")
    assert offline.returncode == 0 and "the relay is not running" in offline.stdout, offline.stderr
    relay.start()
    back = send(relay, "alice@example.com", message("alice@example.com", "sorry, fixed"))
    relay.wait_log(f"{back}: removed")
    time.sleep(0.5)
    assert len(notices(sink)) == 6  # exactly one alert and one second notice per sender
    assert not [m for m in sink.messages if b"scan.pdf.exe.zip" in m.content and m.mail_from == PRINTER]
    assert states(relay)[virus] == MessageState.HOLD


def test_a_sender_that_stops_is_not_suspended_and_a_new_crossing_alerts_again(
        sink: Sink, relay_factory: Callable[..., RelayProcess]) -> None:
    relay = start(relay_factory, sink, scanners=["builtin"], alert_min_spam=2, alert_window="2s",
                  suspend_after="3s")
    first = [send(relay, "alice@example.com", message("alice@example.com", "offer", GTUBE)) for _ in range(2)]
    wait_held(relay, *first)
    assert [s for s, _ in wait_notices(sink, 1)] == ["[fastrelay] Spam alert: alice@example.com"]
    # suspend_after later the 2 s window is empty again: no suspension, the incident closes.
    relay.wait_log("abuse: alice@example.com is back under the thresholds: incident closed")
    assert mail_from(relay, "alice@example.com")[0] == 250
    again = [send(relay, "alice@example.com", message("alice@example.com", "offer", GTUBE)) for _ in range(2)]
    wait_held(relay, *again)
    assert [s for s, _ in wait_notices(sink, 2)] == ["[fastrelay] Spam alert: alice@example.com"] * 2


def test_a_scanner_that_is_down_defers_and_a_crash_rescans(
        sink: Sink, relay_factory: Callable[..., RelayProcess], clamd: Daemon) -> None:
    closed = f"127.0.0.1:{free_port()}"  # nothing listens there
    relay = start(relay_factory, sink, scanners=["builtin", "clamd"], clamd=closed, scan_timeout=2)
    clean = send(relay, "carol@example.com", message("carol@example.com", "invoice"))  # the 250 does not wait
    spam = send(relay, "alice@example.com", message("alice@example.com", "offer", GTUBE))
    relay.wait_log(f"{clean}: pre-delivery check deferred: clamd: ")
    # What the builtin scan finds is decided at once: clamd cannot make spam clean.
    wait_held(relay, spam)
    wait_until(lambda: relay.log().count(f"{clean}: pre-delivery check deferred") >= 2, "a second try")
    assert sink.messages == []
    assert states(relay)[clean] == MessageState.INCOMING

    relay.kill()  # a crash, then the scanner comes back
    relay.config_path.write_text(relay.config_path.read_text().replace(closed, clamd.address))
    relay.start()
    [delivered] = sink.wait(1)
    assert b"Subject: invoice" in delivered.content
    assert "clamd:clean" in scan_line(relay, clean)
    assert states(relay) == {spam: MessageState.HOLD}
    assert relay.log().count(f"{spam}: scan: ") == 1  # held: not scanned again


@pytest.mark.parametrize(("scanner", "failure"), [
    ("rspamd", "hung"), ("rspamd", "refused"), ("spamd", "hung"), ("spamd", "refused"), ("clamd", "hung")])
def test_a_hung_or_unreachable_scanner_defers_until_it_answers(
        scanner: str, failure: str, sink: Sink, relay_factory: Callable[..., RelayProcess],
        request: pytest.FixtureRequest) -> None:
    """A scanner that accepts and never answers, or where nothing listens: mail waits, unscanned
    mail is not delivered, the builtin scan still decides what it can; once the config names the
    real daemon (SIGHUP), the waiting message is scanned and delivered."""
    daemon: Daemon = request.getfixturevalue(scanner)
    stub = StubDaemon() if failure == "hung" else None
    try:
        broken = stub.address if stub is not None else f"127.0.0.1:{free_port()}"
        if scanner == "rspamd":
            broken = f"http://{broken}"
        relay = start(relay_factory, sink, scanners=["builtin", scanner], **{DAEMON_KEY[scanner]: broken},
                      scan_timeout=0.5)
        clean = send(relay, "carol@example.com", message("carol@example.com", "invoice"))
        spam = send(relay, "alice@example.com", message("alice@example.com", "offer", GTUBE))
        log = relay.wait_log(f"{clean}: pre-delivery check deferred: {scanner}: ")
        [line] = [ln for ln in log.splitlines() if f"{clean}: pre-delivery check deferred" in ln]
        assert ("no answer within 0.5s" if failure == "hung" else "[Errno 111]") in line, line  # ECONNREFUSED
        assert "(answered: builtin:clean " in line, line          # the builtin scan ran
        wait_held(relay, spam)                                       # and what it finds stands at once
        assert "verdict=spam, scanner=builtin," in scan_line(relay, spam)
        wait_until(lambda: relay.log().count(f"{clean}: pre-delivery check deferred") >= 2, "a second try")
        assert sink.messages == []
        assert states(relay)[clean] == MessageState.INCOMING
        assert f"{clean}: scan: " not in relay.log()
        if stub is not None:
            assert stub.connections >= 2          # asked each time, and each time it hung

        relay.config_path.write_text(relay.config_path.read_text().replace(broken, daemon.address)
                                     .replace("scan_timeout = 0.5", "scan_timeout = 10"))
        relay.reload()
        [delivered] = sink.wait(1)
        assert b"Subject: invoice" in delivered.content
        assert f"{scanner}:clean" in scan_line(relay, clean)
        assert states(relay) == {spam: MessageState.HOLD}
    finally:
        if stub is not None:
            stub.stop()


def test_clamd_over_a_unix_socket_finds_a_virus(
        sink: Sink, relay_factory: Callable[..., RelayProcess], clamd: Daemon) -> None:
    assert clamd.unix_socket and Path(clamd.unix_socket).is_socket(), clamd.log[-2000:]
    relay = start(relay_factory, sink, scanners=["clamd"], clamd=clamd.unix_socket, scan_timeout=10)
    clean = send(relay, "carol@example.com", message("carol@example.com", "lunch?"))
    bad = send(relay, "alice@example.com", with_attachment("alice@example.com", "doc", "doc.zip", EICAR))
    [delivered] = wait_relayed(sink, 1)
    assert b"Subject: lunch?" in delivered.content
    assert "results=clamd:clean" in scan_line(relay, clean)
    line = scan_line(relay, bad)
    assert "verdict=virus, scanner=clamd, " in line and "Fastrelay.Test.EICAR.UNOFFICIAL" in line, line
    wait_held(relay, bad)
    relay.wait_log(f"{bad}: hold: quarantine: virus (clamd: Fastrelay.Test.EICAR.UNOFFICIAL)")
    time.sleep(0.3)
    assert relayed(sink) == [delivered]


def test_scans_in_progress_never_exceed_the_concurrency_setting(
        sink: Sink, relay_factory: Callable[..., RelayProcess]) -> None:
    # A stand-in, not the real clamd: the real one answers a small message in
    # milliseconds, so how many scans overlap would be left to chance; one that
    # takes 0.4 s per message makes the limit the only thing that bounds them.
    slow = StubDaemon(b"stream: OK\0", delay=0.4)
    try:
        relay = start(relay_factory, sink, scanners=["builtin", "clamd"], clamd=slow.address,
                      concurrency=3, scan_timeout=10)
        queued = [send(relay, "carol@example.com", message("carol@example.com", f"report {i}")) for i in range(10)]
        sink.wait(10, timeout=20)
        assert all("results=clamd:clean" in scan_line(relay, q) for q in queued)
        assert slow.connections == 10
        assert slow.peak == 3     # never more than the setting, and the setting is used
    finally:
        slow.stop()


def test_the_recipient_history_survives_a_restart(
        sink: Sink, relay_factory: Callable[..., RelayProcess]) -> None:
    relay = start(relay_factory, sink, scanners=["builtin"], builtin_many_recipients=3)
    team = ["a@dest.test", "b@dest.test", "C@Dest.Test"]
    first = send(relay, "carol@example.com", message("carol@example.com", "kick-off"), team)
    sink.wait(1)
    assert "MANY_NEW_RECIPIENTS(2: 3 of 3 never written to before)" in scan_line(relay, first)
    relay.stop()
    relay.start()
    again = send(relay, "carol@example.com", message("carol@example.com", "agenda"),
                 ["a@dest.test", "b@dest.test", "C@dest.test"])   # the domain's case does not matter
    others = send(relay, "carol@example.com", message("carol@example.com", "hello"),
                  ["x@dest.test", "y@dest.test", "a@dest.test"])
    strangers = send(relay, "carol@example.com", message("carol@example.com", "hi"),
                     ["p@dest.test", "q@dest.test", "r@dest.test"])
    sink.wait(4)
    assert "MANY_NEW_RECIPIENTS" not in scan_line(relay, again)
    assert "MANY_NEW_RECIPIENTS" not in scan_line(relay, others)    # 2 of 3 new: under 90 %
    assert "MANY_NEW_RECIPIENTS(2: 3 of 3 never written to before)" in scan_line(relay, strangers)


def test_spam_action_bounce_returns_a_dsn_to_a_registered_sender(
        sink: Sink, relay_factory: Callable[..., RelayProcess]) -> None:
    relay = start(relay_factory, sink, scanners=["builtin"], spam_action="bounce")
    spam = send(relay, "alice@example.com", message("alice@example.com", "buy now", GTUBE),
                ["x@dest.test", "y@dest.test"])
    [dsn] = sink.wait(1)
    assert dsn.mail_from == "" and dsn.rcpt_tos == ["alice@example.com"]
    assert b"Status: 5.7.1" in dsn.content and b"Subject: buy now" in dsn.content
    assert b"message refused as spam (builtin score 1000.0/5.0: GTUBE(1000))" in dsn.content
    wait_until(lambda: spam not in states(relay), "the refused message to leave the queue")
    # No bounce to a sender that is not a registered user: quarantine instead.
    other = send(relay, PRINTER, message(PRINTER, "buy now", GTUBE))
    wait_held(relay, other)
    assert len(sink.messages) == 1


@pytest.mark.parametrize(("line", "key", "problem"), [
    ('scanners = ["builtin", "sophos"]', "abuse.scanners[1]", "Invalid enum value 'sophos'"),
    ('scanners = []', "abuse.scanners", "no scanner"),
    ('alert_window = "soon"', "abuse.alert_window", "not a duration"),
    ("alert_spam_ratio = 1.5", "abuse.alert_spam_ratio", "between 0 and 1"),
    ('clamd = "clamd.sock"', "abuse.clamd", "absolute unix socket path"),
    ('spam_action = "drop"', "abuse.spam_action", "Invalid enum value 'drop'"),
    ("alert_min_spam = 0", "abuse.alert_min_spam", "at least 1"),
    ("quarantine = true", "abuse.quarantine", "unknown key"),
])
def test_abuse_config_errors_name_the_key(tmp_path: Path, line: str, key: str, problem: str) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(f"[abuse]\n{line}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key and problem in info.value.problem, str(info.value)


# --- daemons' answers that make no sense -------------------------------------------------------

_SCALAR = st.none() | st.booleans() | st.floats(allow_nan=True, allow_infinity=True) | st.integers() | st.text(max_size=8)
_KEY = st.sampled_from(["action", "score", "required_score", "symbols", "name"]) | st.text(max_size=4)
_VALUE = _SCALAR | st.lists(_SCALAR, max_size=3) | st.dictionaries(_KEY, _SCALAR | st.dictionaries(_KEY, _SCALAR),
                                                                     max_size=4)
_NUMBER = st.floats(allow_nan=True, allow_infinity=True) | st.integers() | st.sampled_from(["1.5", "x", ""])
# Shaped like rspamd's answer (action, score, symbols) with anything in each place, or anything at all.
_JSON = (st.fixed_dictionaries({"action": _SCALAR, "score": _NUMBER},
                               optional={"required_score": _NUMBER, "symbols": _VALUE})
         | _SCALAR | st.lists(_VALUE, max_size=3) | st.dictionaries(_KEY, _VALUE, max_size=5))

_SPAMD = st.builds(
    lambda status, verdict, score, threshold, symbols: (
        b"SPAMD/1.1 " + status + b"\r\nSpam: " + verdict + b" ; " + score + b" / " + threshold
        + b"\r\n\r\n" + symbols),
    st.sampled_from([b"0 EX_OK", b"76 EX_PROTOCOL", b""]), st.sampled_from([b"True", b"no", b"maybe"]),
    st.text("0123456789.-", max_size=6).map(str.encode), st.text("0123456789.-", max_size=6).map(str.encode),
    st.binary(max_size=20))


@settings(max_examples=300, deadline=None)
@given(rspamd=st.one_of(_JSON.map(lambda v: json.dumps(v).encode()), st.binary(max_size=60)),
       spamd=st.one_of(_SPAMD, st.binary(max_size=60)))
def test_any_answer_from_rspamd_or_spamd_is_a_verdict_or_a_scanner_error(rspamd: bytes, spamd: bytes) -> None:
    """Parsed, never raised past the scanner: anything but ScannerError would escape the
    retry logic (a spamd score "1..5" did).  The real daemons never answer this way, so
    their parsers are fed directly."""
    for client, answer in ((RspamdClient("http://127.0.0.1:11333", 1.0), rspamd),
                           (SpamdClient("127.0.0.1:783", 1.0), spamd)):
        try:
            result = client.parse(answer)
        except ScannerError:
            continue
        assert result.verdict in ("clean", "spam"), result
