"""Sending limits (issue 4): each limit over loopback, persistence, Redis across nodes."""

from __future__ import annotations

import asyncio
import shutil
import smtplib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastrelay import replies
from fastrelay.config import Config, load_config
from fastrelay.policy import Directory, RelayPolicy, SessionFacts
from fastrelay.quota import QuotaBook, QuotaJournal

from conftest import free_port

ACCOUNTS = """
[[accounts]]
name = "example"
domains = ["example.com"]
status = "{status}"

[[accounts.users]]
address = "alice@example.com"

[[accounts.users]]
address = "bob@example.com"

[[accounts.rules]]
name = "loopback"
allowed_senders = "my_domains"
only_allowed_ips = true
ips = [ {{ range = "127.0.0.0/24" }} ]
"""

SMALL_LIMITS = """
[limits.active]
recipients_per_transaction = 5
user_messages_per_day = 3
user_unique_recipients_per_day = 4
org_recipients_per_day = 1000
org_recipients_per_10min = 1000
"""


def send(port: int, sender: str, rcpts: list[str]) -> tuple[list[tuple[int, bytes]], tuple[int, bytes] | None]:
    """One transaction; returns the RCPT replies and the DATA reply (None if no RCPT was accepted)."""
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.ehlo("client.example.com")
        code, msg = s.mail(sender)
        assert code == 250, msg
        rcpt_replies = [s.rcpt(r) for r in rcpts]
        if not any(code == 250 for code, _ in rcpt_replies):
            s.rset()
            return rcpt_replies, None
        return rcpt_replies, s.data(b"Subject: quota\r\n\r\nbody\r\n")


def reply_line(code_msg: tuple[int, bytes]) -> bytes:
    return f"{code_msg[0]} ".encode() + code_msg[1]


def expected(reply: bytes) -> bytes:
    return reply.rstrip(b"\r\n")


# -- in-process: the QuotaBook with a controllable clock ------------------------------


class StepClock:
    """A clock the test moves by hand: window expiry without waiting a day."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def book_and_policy(tmp_path: Path) -> tuple[QuotaBook, RelayPolicy, StepClock]:
    cfg = tmp_path / "relay.toml"
    cfg.write_text('[server]\nhostname = "relay.example.test"\nlisten = ["127.0.0.1:2525"]\n'
                   + ACCOUNTS.format(status="active") + SMALL_LIMITS)
    config = load_config(cfg)
    clock = StepClock()
    book = QuotaBook(config, clock=clock)  # type: ignore[arg-type]
    return book, RelayPolicy(Directory(config)), clock


def transaction(book: QuotaBook, policy: RelayPolicy, sender: str, rcpts: list[str]) -> list[bytes | None]:
    decision = policy.decide(SessionFacts("127.0.0.1", "client.example.com", False, None), sender)
    assert decision.allowed
    recipients: list[str] = []
    txn = book.begin(decision, recipients)
    out: list[bytes | None] = []
    for r in rcpts:
        refusal = book.check_recipient(txn, r)
        if refusal is None:
            recipients.append(r)
        out.append(refusal)
    if recipients:
        out.append(book.reserve(txn))
    return out


def test_user_messages_per_day_rolls_over(book_and_policy: tuple[QuotaBook, RelayPolicy, StepClock]) -> None:
    book, policy, clock = book_and_policy
    for _ in range(3):
        assert transaction(book, policy, "alice@example.com", ["x@example.net"]) == [None, None]
    assert transaction(book, policy, "alice@example.com", ["x@example.net"]) == [book.replies["user_messages_per_day"]]
    # Another user and a non-registered sender are not affected.
    assert transaction(book, policy, "bob@example.com", ["x@example.net"]) == [None, None]
    assert transaction(book, policy, "printer@example.com", ["x@example.net"]) == [None, None]
    clock.now += 86_400 - 600
    assert transaction(book, policy, "alice@example.com", ["x@example.net"])[0] is not None
    clock.now += 600 + 300  # past 24 h + one 5-minute bucket
    assert transaction(book, policy, "alice@example.com", ["x@example.net"]) == [None, None]


def test_unique_recipients_count_distinct_and_domain_case(book_and_policy: tuple[QuotaBook, RelayPolicy, StepClock]) -> None:
    book, policy, _ = book_and_policy
    assert transaction(book, policy, "alice@example.com", ["a@x.net", "b@x.net"]) == [None, None, None]
    # The same recipients again (domain in another case) count once.
    assert transaction(book, policy, "alice@example.com", ["a@X.NET", "c@x.net"]) == [None, None, None]
    # Two more new ones: the first fits (4th unique), the second crosses the limit part way.
    result = transaction(book, policy, "alice@example.com", ["d@x.net", "e@x.net", "a@x.net"])
    assert result == [None, book.replies["user_unique_recipients_per_day"], None, None]
    assert book.usage("alice@example.com") == (3, 4)


def test_refused_message_consumes_nothing(book_and_policy: tuple[QuotaBook, RelayPolicy, StepClock]) -> None:
    book, policy, _ = book_and_policy
    decision = policy.decide(SessionFacts("127.0.0.1", "client.example.com", False, None), "alice@example.com")
    recipients: list[str] = []
    txn = book.begin(decision, recipients)
    assert book.check_recipient(txn, "a@x.net") is None
    recipients.append("a@x.net")
    assert book.usage("alice@example.com") == (0, 0)  # nothing counted before the end of DATA
    assert book.reserve(txn) is None
    assert book.usage("alice@example.com") == (1, 1)
    book.release(txn)  # the spool failed: the message is given back
    assert book.usage("alice@example.com")[0] == 0


def test_org_limits(tmp_path: Path) -> None:
    cfg = tmp_path / "relay.toml"
    cfg.write_text('[server]\nhostname = "relay.example.test"\nlisten = ["127.0.0.1:2525"]\n'
                   + ACCOUNTS.format(status="active")
                   + "[limits.active]\norg_recipients_per_10min = 5\norg_recipients_per_day = 8\n")
    config = load_config(cfg)
    clock = StepClock()
    book = QuotaBook(config, clock=clock)  # type: ignore[arg-type]
    policy = RelayPolicy(Directory(config))
    peak, day = book.replies["org_recipients_per_10min"], book.replies["org_recipients_per_day"]
    assert transaction(book, policy, "p@example.com", ["a@x", "b@x", "c@x"]) == [None] * 4
    assert transaction(book, policy, "p@example.com", ["d@x", "e@x", "f@x"]) == [None, None, peak, None]
    clock.now += 601
    assert transaction(book, policy, "p@example.com", ["g@x", "h@x", "i@x"]) == [None, None, None, None]
    assert transaction(book, policy, "p@example.com", ["j@x"]) == [day]


# -- over loopback ---------------------------------------------------------------------


def test_recipients_per_transaction_over_smtp(relay_factory) -> None:  # type: ignore[no-untyped-def]
    relay = relay_factory(accounts=ACCOUNTS.format(status="active"), extra=SMALL_LIMITS)
    # 6th recipient of one transaction: 452 4.5.3, the first 5 are kept and delivered.
    rcpt_replies, data = send(relay.port, "printer@example.com", [f"r{i}@x.net" for i in range(6)])
    assert [c for c, _ in rcpt_replies] == [250] * 5 + [452]
    assert reply_line(rcpt_replies[5]) == expected(replies.TOO_MANY_RCPTS)
    assert data is not None and data[0] == 250
    [(envelope, _)] = relay.queued()
    assert envelope.recipients == [f"r{i}@x.net" for i in range(5)]


def test_unique_recipients_over_smtp(relay_factory) -> None:  # type: ignore[no-untyped-def]
    relay = relay_factory(accounts=ACCOUNTS.format(status="active"), extra=SMALL_LIMITS)
    # bob may reach 4 distinct recipients a day; a repeated one counts once.
    rcpt_replies, data = send(relay.port, "bob@example.com", ["r0@x.net", "r1@x.net", "r0@X.NET", "r2@x.net"])
    assert [c for c, _ in rcpt_replies] == [250] * 4 and data is not None and data[0] == 250
    rcpt_replies, data = send(relay.port, "bob@example.com", ["r1@X.net", "r3@x.net", "r4@x.net"])
    assert [c for c, _ in rcpt_replies] == [250, 250, 550]
    assert reply_line(rcpt_replies[2]) == b"550 5.4.5 Daily SMTP relay limit exceeded for user."
    assert data is not None and data[0] == 250


def test_user_limits_over_smtp_and_restart(relay_factory) -> None:  # type: ignore[no-untyped-def]
    relay = relay_factory(accounts=ACCOUNTS.format(status="active"), extra=SMALL_LIMITS)
    for i in range(3):
        _, data = send(relay.port, "alice@example.com", ["one@x.net"])
        assert data is not None and data[0] == 250
    # The restart must not reset alice's count.
    assert relay.stop() == 0
    relay.start()
    rcpt_replies, data = send(relay.port, "alice@example.com", ["one@x.net"])
    assert data is None
    assert reply_line(rcpt_replies[0]) == b"550 5.4.5 Daily SMTP relay limit exceeded for user."
    log = relay.wait_log("quota: user_messages_per_day exceeded")
    assert "user=alice@example.com count=3 limit=3 window=24h" in log
    # Counted by envelope sender only: a From: header naming alice changes nothing for bob.
    with smtplib.SMTP("127.0.0.1", relay.port) as s:
        s.ehlo("client.example.com")
        refused = s.sendmail("bob@example.com", ["one@x.net"], b"From: alice@example.com\r\n\r\nhi\r\n")
    assert refused == {}
    assert len(relay.queued()) == 4


def test_crash_keeps_counts_flushed_before_it(relay_factory) -> None:  # type: ignore[no-untyped-def]
    relay = relay_factory(accounts=ACCOUNTS.format(status="active"), extra=SMALL_LIMITS)
    for _ in range(3):
        _, data = send(relay.port, "alice@example.com", ["one@x.net"])
        assert data is not None and data[0] == 250
    time.sleep(1.5)  # the journal is made durable every second
    relay.kill()
    relay.start()
    rcpt_replies, _ = send(relay.port, "alice@example.com", ["one@x.net"])
    assert rcpt_replies[0][0] == 550


def test_daily_limits_temporary(relay_factory) -> None:  # type: ignore[no-untyped-def]
    relay = relay_factory(accounts=ACCOUNTS.format(status="active"),
                          extra=SMALL_LIMITS + "\n[limits]\ndaily_limits_temporary = true\n")
    for _ in range(3):
        send(relay.port, "alice@example.com", ["one@x.net"])
    rcpt_replies, _ = send(relay.port, "alice@example.com", ["one@x.net"])
    assert reply_line(rcpt_replies[0]).startswith(b"450 4.4.5 Daily SMTP relay limit exceeded for user.")


def test_trial_account_gets_trial_limits(relay_factory) -> None:  # type: ignore[no-untyped-def]
    relay = relay_factory(accounts=ACCOUNTS.format(status="trial"),
                          extra=SMALL_LIMITS + "\n[limits.trial]\nuser_messages_per_day = 1\n")
    _, data = send(relay.port, "alice@example.com", ["one@x.net"])
    assert data is not None and data[0] == 250
    rcpt_replies, _ = send(relay.port, "alice@example.com", ["one@x.net"])
    assert rcpt_replies[0][0] == 550


def test_org_peak_limit_over_smtp(relay_factory) -> None:  # type: ignore[no-untyped-def]
    relay = relay_factory(accounts=ACCOUNTS.format(status="active"),
                          extra="[limits.active]\norg_recipients_per_10min = 3\n")
    rcpt_replies, data = send(relay.port, "printer@example.com", ["a@x.net", "b@x.net", "c@x.net", "d@x.net"])
    assert [c for c, _ in rcpt_replies] == [250, 250, 250, 450]
    assert reply_line(rcpt_replies[3]) == b"450 4.2.1 Peak SMTP relay limit exceeded for customer. This is a temporary error."
    assert data is not None and data[0] == 250


# -- Redis: one quota for several nodes ------------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (scripts/test installs it as root)")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            import socket

            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError("redis-server did not start")
        time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


def test_redis_limits_hold_across_two_nodes(relay_factory, redis_server: str) -> None:  # type: ignore[no-untyped-def]
    extra = SMALL_LIMITS + f'\n[quota]\nbackend = "redis"\nredis_url = "{redis_server}"\n'
    a = relay_factory(accounts=ACCOUNTS.format(status="active"), extra=extra, name="node-a")
    b = relay_factory(accounts=ACCOUNTS.format(status="active"), extra=extra, name="node-b")
    results = []
    for port in (a.port, b.port, a.port, b.port):
        _, data = send(port, "alice@example.com", ["one@x.net"])
        results.append(data[0] if data else None)
    assert results == [250, 250, 250, None]
    rcpt_replies, _ = send(a.port, "alice@example.com", ["one@x.net"])
    assert reply_line(rcpt_replies[0]) == b"550 5.4.5 Daily SMTP relay limit exceeded for user."
    # Unique recipients across nodes: bob sends to 4 distinct addresses over both nodes.
    assert send(a.port, "bob@example.com", ["u1@x.net", "u2@x.net"])[1][0] == 250  # type: ignore[index]
    rcpt_replies, data = send(b.port, "bob@example.com", ["u1@x.net", "u3@x.net", "u4@x.net", "u5@x.net"])
    assert [c for c, _ in rcpt_replies] == [250, 250, 250, 550]


def test_redis_unreachable_fails_closed(relay_factory) -> None:  # type: ignore[no-untyped-def]
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    relay = relay_factory(accounts=ACCOUNTS.format(status="active"),
                          extra=f'[quota]\nbackend = "redis"\nredis_url = "{dead}"\nredis_timeout = 0.3\n')
    rcpt_replies, _ = send(relay.port, "alice@example.com", ["one@x.net"])
    assert reply_line(rcpt_replies[0]) == expected(replies.TEMP_LOCAL_ERROR)
    relay.wait_log("quota: Redis error")


def test_redis_unreachable_allow(relay_factory) -> None:  # type: ignore[no-untyped-def]
    dead = f"redis://127.0.0.1:{free_port()}/0"
    relay = relay_factory(accounts=ACCOUNTS.format(status="active"),
                          extra=f'[quota]\nbackend = "redis"\nredis_url = "{dead}"\nredis_timeout = 0.3\n'
                                'on_backend_error = "allow"\n')
    _, data = send(relay.port, "alice@example.com", ["one@x.net"])
    assert data is not None and data[0] == 250



# -- the journal and its snapshots -----------------------------------------------------


def _journal_setup(tmp_path: Path) -> tuple[Config, RelayPolicy, Path]:
    """The default limits (none is met here), a policy, and an empty state directory."""
    cfg = tmp_path / "relay.toml"
    cfg.write_text('[server]\nhostname = "relay.example.test"\nlisten = ["127.0.0.1:2525"]\n'
                   + ACCOUNTS.format(status="active"))
    state = tmp_path / "quota"
    state.mkdir()
    config = load_config(cfg)
    return config, RelayPolicy(Directory(config)), state


def _journal(book: QuotaBook, state: Path) -> QuotaJournal:
    """Restored from ``state``, flushed and snapshotted only when the test says so."""
    journal = QuotaJournal(book, state, flush_interval=3600, snapshot_interval=3600)
    book.journal = journal
    journal.restore()
    return journal


def test_snapshot_taken_while_a_flush_is_in_flight_counts_each_event_once(tmp_path: Path) -> None:
    """A message counted while the journal is being written must land in exactly one of the
    snapshot and the journals after it: in both, it would count twice after a restart."""
    config, policy, state = _journal_setup(tmp_path)

    async def counted_then_restored() -> tuple[int, int]:
        book = QuotaBook(config)
        journal = _journal(book, state)
        loop = asyncio.get_running_loop()
        assert transaction(book, policy, "alice@example.com", ["a@x"]) == [None, None]
        flushing = loop.create_task(journal.flush(loop))
        await asyncio.sleep(0)            # its write is now in a thread
        assert transaction(book, policy, "alice@example.com", ["b@x"]) == [None, None]
        snapshot = loop.create_task(journal.snapshot_in_child())
        await asyncio.sleep(0)            # the snapshot waits for the journal to be written
        assert transaction(book, policy, "alice@example.com", ["c@x"]) == [None, None]  # before its fork
        await asyncio.gather(flushing, snapshot)
        assert transaction(book, policy, "alice@example.com", ["d@x"]) == [None, None]
        assert book.usage("alice@example.com") == (4, 4)
        await journal.flush(loop)         # then a crash: no final snapshot
        again = QuotaBook(config)
        _journal(again, state)
        return again.usage("alice@example.com")

    assert asyncio.run(counted_then_restored()) == (4, 4)


def test_a_snapshot_that_cannot_open_the_next_journal_is_skipped_and_counting_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The state directory vanished under the relay: the snapshot says so and changes nothing;
    the journal in use keeps taking events (its descriptor is still open)."""
    config, policy, state = _journal_setup(tmp_path)

    async def run() -> None:
        book = QuotaBook(config)
        journal = _journal(book, state)
        loop = asyncio.get_running_loop()
        assert transaction(book, policy, "alice@example.com", ["a@x"]) == [None, None]
        shutil.rmtree(state)
        number = journal.number
        await journal.snapshot_in_child()
        assert journal.number == number
        assert transaction(book, policy, "alice@example.com", ["b@x"]) == [None, None]
        await journal.flush(loop)
        assert book.usage("alice@example.com") == (2, 2)

    asyncio.run(run())
    assert "quota: snapshot skipped, the next journal cannot be opened" in caplog.text
    assert "journal write failed" not in caplog.text
