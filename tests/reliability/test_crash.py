"""SIGKILL the relay under load, restart it on the same spool, and count the mail.

The promise checked: no 250 goes out before the message is durable.  So after
every restart each message a client got a 250 for is in the spool, whole
(content byte for byte, envelope right); a message that never got its 250 may
or may not be there, but if it is, it is whole too.  No torn record, no
duplicate queue id.

With delivery on (``test_sigkill_under_delivery_...``), the relay also
delivers to an aiosmtpd sink while it is killed: every message that got a 250
is then delivered to the sink or still queued, and in the end delivered, byte
for byte.  Delivery is at-least-once (docs/delivery.md): a message the sink
accepted whose "done" record was not yet on disk at the kill is delivered
again after the restart.  The test counts those duplicates and checks that
each one is explained by that window: the spool, read from disk while the
relay is down, still holds the message live although the sink already has it.

``FASTRELAY_CRASH_KILLS`` sets the number of kills per test (default 20, as issue 7 asks;
about 50 s for both tests);
``FASTRELAY_CRASH_SEED`` replays a run (the seed is in every failure message).
"""

from __future__ import annotations

import os
import random
import re
import smtplib
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from conftest import RelayProcess, queue_id_of, split_received
from sink import Sink

from fastrelay.config import MIN_SEGMENT_BYTES

from .helpers import delivery_to, wait_for

KILLS = int(os.environ.get("FASTRELAY_CRASH_KILLS", "20"))
CLIENTS = 4
HELO = "client.example.com"
SENDER = "bob@example.com"
SUBJECT = re.compile(rb"^Subject: crash (\S+)\r\n", re.MULTILINE)


def message(token: str, rng: random.Random) -> bytes:
    """A message that names itself, of varied size (so kills land in all kinds of writes)."""
    lines = [f"Subject: crash {token}", f"Message-ID: <{token}@example.com>", ""]
    for i in range(rng.choice((1, 5, 50, 400, 1500))):
        lines.append(("." if i % 7 == 0 else "") + f"{token} line {i} " + "x" * rng.randint(0, 60))
    return ("\r\n".join(lines) + "\r\n").encode()


@dataclass
class Ledger:
    """What the clients sent, and which queue ids were acknowledged."""

    sent: dict[str, tuple[bytes, str]] = field(default_factory=dict)    # token -> (content, recipient)
    acked: dict[str, str] = field(default_factory=dict)                 # queue id -> token
    errors: list[str] = field(default_factory=list)                     # unexpected replies
    lock: threading.Lock = field(default_factory=threading.Lock)


def client(relay: RelayProcess, ledger: Ledger, stop: threading.Event, name: str, seed: int) -> None:
    rng = random.Random(seed)
    seq = 0
    while not stop.is_set():
        try:
            with smtplib.SMTP("127.0.0.1", relay.port, local_hostname=HELO, timeout=10) as smtp:
                smtp.ehlo()
                for _ in range(rng.randint(1, 8)):
                    seq += 1
                    token = f"{name}.{seq}"
                    content = message(token, rng)
                    rcpt = f"{token}@dest.test"
                    with ledger.lock:
                        ledger.sent[token] = (content, rcpt)
                    smtp.mail(SENDER)
                    smtp.rcpt(rcpt)
                    code, text = smtp.data(content)
                    if code == 250:
                        with ledger.lock:
                            ledger.acked[queue_id_of(text)] = token
                    else:
                        ledger.errors.append(f"{token}: {code} {text!r}")
        except (OSError, smtplib.SMTPException):
            # The relay was killed mid-session (or is not up again yet).
            time.sleep(0.02)


def check_spool(relay: RelayProcess, ledger: Ledger, context: str) -> int:
    queued = relay.queued()
    ids = [env.queue_id for env, _ in queued]  # type: ignore[attr-defined]
    assert len(ids) == len(set(ids)), f"{context}: duplicate queue ids"
    found: dict[str, str] = {}
    for envelope, body in queued:
        queue_id = envelope.queue_id  # type: ignore[attr-defined]
        _, content = split_received(body, queue_id)
        m = SUBJECT.match(content)
        assert m is not None, f"{context}: {queue_id}: not a message of this test: {content[:80]!r}"
        token = m.group(1).decode()
        sent, rcpt = ledger.sent[token]
        assert content == sent, f"{context}: {queue_id} ({token}) differs from what was sent"
        assert envelope.sender == SENDER and envelope.recipients == [rcpt], context  # type: ignore[attr-defined]
        found[queue_id] = token
    missing = {qid: tok for qid, tok in ledger.acked.items() if found.get(qid) != tok}
    assert not missing, f"{context}: acknowledged with 250 but not in the spool: {missing}"
    return len(queued)


def test_sigkill_loses_no_acknowledged_message(relay_factory: object) -> None:
    seed = int(os.environ.get("FASTRELAY_CRASH_SEED", str(random.randrange(1 << 30))))
    rng = random.Random(seed)
    relay: RelayProcess = relay_factory()  # type: ignore[operator]
    ledger = Ledger()
    for kill in range(KILLS):
        context = f"seed {seed}, kill {kill + 1} of {KILLS}"
        stop = threading.Event()
        threads = [threading.Thread(target=client, args=(relay, ledger, stop, f"k{kill}c{i}", rng.random()))
                   for i in range(CLIENTS)]
        for t in threads:
            t.start()
        acked_before = len(ledger.acked)
        # Let some mail through, then kill at a random moment.
        deadline = time.monotonic() + 10
        while len(ledger.acked) < acked_before + 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.8))
        relay.kill()
        stop.set()
        for t in threads:
            t.join(30)
        assert not ledger.errors, f"{context}: {ledger.errors[:5]}"
        assert len(ledger.acked) > acked_before, f"{context}: no message went through"
        relay.start()
        count = check_spool(relay, ledger, context)
        relay.wait_log(f"spool: {count} queued message(s) recovered")
    assert relay.stop() == 0
    check_spool(relay, ledger, f"seed {seed}, after the final stop")


# --- with delivery: killed while delivering ----------------------------------------------

RECEIVED_ID = re.compile(rb"^\tby \S+ \(fastrelay\) with \S+ id (\S+)", re.MULTILINE)


def deliveries(sink: Sink, ledger: Ledger, context: str) -> Counter[str]:
    """Queue id -> times delivered, checking every delivered message is whole."""
    counts: Counter[str] = Counter()
    for message in list(sink.messages):
        m = RECEIVED_ID.search(message.content)
        assert m is not None, f"{context}: a delivered message without the relay's Received: header"
        queue_id = m.group(1).decode()
        _, content = split_received(message.content, queue_id)
        token_match = SUBJECT.match(content)
        assert token_match is not None, f"{context}: {queue_id}: not a message of this test"
        sent, rcpt = ledger.sent[token_match.group(1).decode()]
        assert content == sent, f"{context}: {queue_id} was delivered altered or truncated"
        assert message.rcpt_tos == [rcpt] and message.mail_from == SENDER, context
        counts[queue_id] += 1
    return counts


def settled(sink: Sink, quiet: float = 0.5, timeout: float = 10.0) -> None:
    """Wait until the sink has received nothing for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    last, since = len(sink.messages), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if len(sink.messages) != last:
            last, since = len(sink.messages), time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


# Spool segments of the default size, and of the smallest: a new segment every
# few messages, so kills land while segments are started, filled and dropped
# under delivery.  (A segment was once dropped under messages not yet counted:
# tests/test_spool.py makes that window happen; this load did not hit it.)
@pytest.mark.parametrize("segment_bytes", [None, MIN_SEGMENT_BYTES], ids=["segments-64MiB", "segments-64KiB"])
def test_sigkill_under_delivery_delivers_every_acknowledged_message(
        relay_factory: Callable[..., RelayProcess], report: Callable[[str], None], segment_bytes: int | None) -> None:
    seed = int(os.environ.get("FASTRELAY_CRASH_SEED", str(random.randrange(1 << 30))))
    rng = random.Random(seed)
    sink = Sink("127.0.0.1").start()
    relay = relay_factory(extra=delivery_to(sink.port),
                          server_extra=f"spool_segment_bytes = {segment_bytes}" if segment_bytes else "")
    ledger = Ledger()
    window: Counter[str] = Counter()   # queue id -> kills at which it was delivered but still live
    try:
        for kill in range(KILLS):
            context = f"seed {seed}, kill {kill + 1} of {KILLS}"
            stop = threading.Event()
            threads = [threading.Thread(target=client, args=(relay, ledger, stop, f"d{kill}c{i}", rng.random()))
                       for i in range(CLIENTS)]
            for t in threads:
                t.start()
            acked_before, delivered_before = len(ledger.acked), len(sink.messages)
            deadline = time.monotonic() + 10
            while ((len(ledger.acked) < acked_before + 5 or len(sink.messages) <= delivered_before)
                   and time.monotonic() < deadline):
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.8))
            relay.kill()
            stop.set()
            for t in threads:
                t.join(30)
            assert not ledger.errors, f"{context}: {ledger.errors[:5]}"
            assert len(ledger.acked) > acked_before, f"{context}: no message went through"
            settled(sink)   # a final dot sent just before the kill may still be in the sink's hands
            # The spool as the crash left it (read from disk, the relay down), then the sink:
            # a message that is in neither was lost.
            live = check_spool_contents(relay, ledger, context)
            delivered = deliveries(sink, ledger, context)
            lost = {q: t for q, t in ledger.acked.items() if q not in live and q not in delivered}
            assert not lost, f"{context}: acknowledged, neither delivered nor queued: {lost}"
            for queue_id in live:
                if delivered[queue_id]:
                    window[queue_id] += 1   # will be delivered again: the at-least-once window
            relay.start()
            relay.wait_log(f"spool: {len(live)} queued message(s) recovered")
        wait_for(lambda: not relay.queued(), 60, f"the queue to drain (seed {seed})")
        assert relay.stop() == 0
        assert not relay.queued()
        delivered = deliveries(sink, ledger, f"seed {seed}, at the end")
    finally:
        if relay.proc is not None and relay.proc.poll() is None:
            relay.stop()
        sink.stop()
    never = {q: t for q, t in ledger.acked.items() if not delivered[q]}
    assert not never, f"seed {seed}: acknowledged but never delivered: {never}"
    duplicates = sum(n - 1 for n in delivered.values())
    unexplained = {q: n for q, n in delivered.items() if n > 1 + window[q]}
    report(f"seed {seed}: {KILLS} kills, {len(ledger.acked)} acknowledged, {len(delivered)} delivered "
           f"({sum(delivered.values())} deliveries), {duplicates} duplicate(s); "
           f"{sum(window.values())} message(s) were in the at-least-once window at the kills")
    assert not unexplained, (f"seed {seed}: delivered more often than the crash window explains "
                             f"(queue id -> deliveries): {unexplained}")
    assert duplicates <= sum(window.values())


def check_spool_contents(relay: RelayProcess, ledger: Ledger, context: str) -> set[str]:
    """The queue ids in the spool; each is a message this test sent, whole, and only once."""
    queued = relay.queued()
    ids = [env.queue_id for env, _ in queued]  # type: ignore[attr-defined]
    assert len(ids) == len(set(ids)), f"{context}: duplicate queue ids"
    for envelope, body in queued:
        queue_id = envelope.queue_id  # type: ignore[attr-defined]
        _, content = split_received(body, queue_id)
        m = SUBJECT.match(content)
        assert m is not None, f"{context}: {queue_id}: not a message of this test: {content[:80]!r}"
        sent, rcpt = ledger.sent[m.group(1).decode()]
        assert content == sent, f"{context}: {queue_id} differs from what was sent"
        assert envelope.recipients == [rcpt], context  # type: ignore[attr-defined]
    return set(ids)
