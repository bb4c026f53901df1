"""Next-hop faults: fastrelay retries and delivers every message, once (beyond the documented window).

The next hop is ``ScriptedHop`` (hop.py), a raw SMTP server that refuses,
says 421 mid-session, drops the connection in DATA or right after the final
dot, or stalls, on the connections it is told to.  The relay routes every
domain to it with short timeouts and a one-second retry.  Checked for each
fault: the message is deferred for the right reason (the log), retried, and
in the end acknowledged by the hop exactly once; the hop holds a second copy
only after a fault after the final dot (RFC 1047: the relay cannot know the
message arrived), which the relay logs as "message may be sent more than
once" (docs/delivery.md, the duplicate window).
"""

from __future__ import annotations

import random
import re
import smtplib
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest
from conftest import Certs, RelayProcess, queue_id_of

from fastrelay.agent import LINGER

from .helpers import delivery_to, rss_kib, wait_for
from .hop import AFTER_THE_DOT, FAULTS, Reception, ScriptedHop

SENDER = "alice@example.com"
HELO = "client.example.com"
TOKEN = re.compile(rb"^Subject: hop (\S+)\r\n", re.MULTILINE)


def body(token: str) -> bytes:
    lines = [f"Subject: hop {token}", f"Message-ID: <{token}@example.com>", ""]
    lines += [("." if i % 5 == 0 else "") + f"{token} line {i} " + "z" * 50 for i in range(12)]
    return ("\r\n".join(lines) + "\r\n").encode()


def send(relay: RelayProcess, tokens: list[str]) -> dict[str, str]:
    """Send one message per token over one session; token -> queue id."""
    ids = {}
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname=HELO, timeout=15) as smtp:
        smtp.ehlo()
        for token in tokens:
            code, text = smtp.mail(SENDER)
            assert code == 250, text
            code, text = smtp.rcpt(f"{token}@dest.test")
            assert code == 250, text
            code, text = smtp.data(body(token))
            assert code == 250, text
            ids[token] = queue_id_of(text)
    return ids


def token_of(reception: Reception) -> str:
    m = TOKEN.search(reception.content)
    assert m is not None, reception.content[:200]
    return m.group(1).decode()


def check_receptions(hop: ScriptedHop, tokens: list[str]) -> tuple[Counter[str], Counter[str]]:
    """Every token acknowledged by the hop exactly once, content whole; (acked, received whole) counts."""
    acked: Counter[str] = Counter()
    received: Counter[str] = Counter()
    for reception in list(hop.receptions):
        token = token_of(reception)
        assert token in tokens, f"a message this test did not send: {token}"
        # The relay's Received: header, then exactly what was sent.
        assert reception.content.endswith(b"\r\n" + body(token)), f"{token} arrived altered"
        assert reception.rcpt_tos == [f"{token}@dest.test"] and reception.mail_from == SENDER
        received[token] += 1
        acked[token] += reception.acked
    assert {t: n for t, n in acked.items() if n != 1} == {}, f"acknowledged more than once: {acked}"
    assert set(acked) == set(tokens), f"never acknowledged: {set(tokens) - set(acked)}"
    return acked, received


# The deferral each fault must cause, as the relay logs it.
DEFERRAL = {
    "refused": "Connection refused",
    "greet421": "refused to talk to me: 421 4.3.2 hop.test busy",
    "stall_greeting": "timed out while receiving the initial server greeting",
    "mail421": "said: 421 4.3.2 hop.test shutting down (in reply to MAIL FROM command)",
    "drop_in_data": "while sending end of data -- message may be sent more than once",
    "data451": "said: 451 4.3.0 hop.test try again later (in reply to end of DATA command)",
    "data250": "said: 250 2.0.0 Ok (in reply to DATA command, where only 354 may start the content)",
    "drop_at_dot": "lost connection with 127.0.0.1[127.0.0.1] while sending end of data -- message may be sent more than once",
    "stall_at_dot": "timed out while sending end of data -- message may be sent more than once",
    "rset421": None,   # a cached connection found dead: replaced, no deferral
}


@pytest.mark.parametrize("fault", ["refused", *FAULTS])
def test_a_next_hop_fault_is_retried_and_the_message_delivered_once(
        relay_factory: Callable[..., RelayProcess], fault: str) -> None:
    hop = ScriptedHop([] if fault == "refused" else [fault])
    # One session at a time: the faulty connection carries the first message (and,
    # for rset421, the second one after it).
    relay = relay_factory(extra=delivery_to(hop.port, command_timeout=1, per_destination=1))
    tokens = [f"{fault}-{i}" for i in range(3)]
    try:
        if fault == "refused":
            ids = send(relay, tokens)   # nothing listens at the hop's port yet
            relay.wait_log(f"{ids[tokens[0]]}: deferred")
            hop.start()
        elif fault == "rset421":
            # The second message must find the connection waiting in the cache (only
            # then does the relay begin with RSET): it is sent once the first is gone
            # and the session has stopped lingering (within the 3 s idle time).
            hop.start()
            ids = send(relay, tokens[:1])
            relay.wait_log(f"{ids[tokens[0]]}: removed")
            time.sleep(LINGER + 0.3)
            ids |= send(relay, tokens[1:])
        else:
            hop.start()
            ids = send(relay, tokens)
        hop.wait_acked(len(tokens))
        for qid in ids.values():
            relay.wait_log(f"{qid}: removed")
        wait_for(lambda: not relay.queued(), 10, "an empty queue")
        _, received = check_receptions(hop, tokens)
    finally:
        relay.stop()
        hop.stop()
    log = relay.log()
    assert "Traceback" not in log
    if fault != "refused":
        assert hop.faults_used[0] == fault
    expected = DEFERRAL[fault]
    if expected is None:
        assert "status=deferred" not in log
        assert len(hop.faults_used) >= 2 and received == Counter({t: 1 for t in tokens})
    else:
        assert re.search(r"dsn=4\.\d\.\d, status=deferred \(.*" + re.escape(expected), log), log[-3000:]
        assert "status=sent" in log[log.index("status=deferred"):]
    duplicates = sum(received.values()) - len(tokens)
    assert duplicates <= (1 if fault in AFTER_THE_DOT else 0), received


def test_a_next_hop_that_limits_messages_per_connection_costs_no_deferral(
        relay_factory: Callable[..., RelayProcess]) -> None:
    """One message per connection at the hop: each next MAIL on the kept connection gets 421
    and the connection closes; nothing was accepted, so the relay opens a new one at once."""
    hop = ScriptedHop(messages_per_connection=1).start()
    relay = relay_factory(extra=delivery_to(hop.port, command_timeout=1, per_destination=1))
    tokens = [f"limited-{i}" for i in range(3)]
    try:
        ids: dict[str, str] = {}
        for token in tokens:   # one after another: the session lingers between them
            ids |= send(relay, [token])
            hop.wait_acked(len(ids))
        for qid in ids.values():
            relay.wait_log(f"{qid}: removed")
        _, received = check_receptions(hop, tokens)
    finally:
        relay.stop()
        hop.stop()
    log = relay.log()
    assert "status=deferred" not in log, log[-3000:]
    assert received == Counter({t: 1 for t in tokens})
    assert hop.connections == 3


def test_a_flaky_next_hop_under_load_loses_nothing(relay_factory: Callable[..., RelayProcess],
                                                    report: Callable[[str], None]) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    faults = [rng.choice(FAULTS) if rng.random() < 0.6 else "ok" for _ in range(16)]
    # Two messages per connection at most: the faults meet many connections.
    hop = ScriptedHop(faults, messages_per_connection=2).start()
    relay = relay_factory(extra=delivery_to(hop.port, command_timeout=1, per_destination=4))
    tokens: list[str] = []
    lock = threading.Lock()

    def client(name: str) -> None:
        mine = [f"{name}-{i}" for i in range(10)]
        send(relay, mine)
        with lock:
            tokens.extend(mine)

    try:
        threads = [threading.Thread(target=client, args=(f"c{i}",)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(tokens) == 40, f"seed {seed}: the clients did not finish"
        hop.wait_acked(40, timeout=60)
        wait_for(lambda: not relay.queued(), 20, f"an empty queue (seed {seed})")
        _, received = check_receptions(hop, tokens)
    finally:
        relay.stop()
        hop.stop()
    used = Counter(hop.faults_used)
    window = sum(used[f] for f in AFTER_THE_DOT)
    duplicates = sum(received.values()) - len(tokens)
    report(f"seed {seed}: 40 messages over {hop.connections} connections; faults "
           f"{dict(sorted((f, n) for f, n in used.items() if f != 'ok'))}; {duplicates} duplicate(s), "
           f"{window} fault(s) after the final dot")
    assert "Traceback" not in relay.log()
    assert duplicates <= window, f"seed {seed}: {duplicates} duplicates, only {window} after-the-dot faults"


class FloodingHop:
    """A next hop that answers EHLO with reply lines that never stop: ``continued`` sends
    "250-" continuation lines (one reply that never ends), ``unasked`` sends complete
    "250 ok" replies nobody asked for.  Any MX on the internet can do this to a relay."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.sent = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stopped = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        line = b"250-flood " + b"x" * 80 + b"\r\n" if self.kind == "continued" else b"250 2.0.0 ok\r\n"
        chunk = line * 1000
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.sendall(b"220 flood.test ESMTP\r\n")
                    conn.recv(4096)                       # the EHLO
                    while not self.stopped.is_set():
                        conn.sendall(chunk)
                        self.sent += len(chunk)
                except OSError:
                    continue                              # the relay hung up, as it should

    def stop(self) -> None:
        self.stopped.set()
        self.listener.close()


@pytest.mark.parametrize("kind", ["continued", "unasked"])
def test_a_next_hop_that_floods_replies_is_cut_off_with_bounded_memory(
        relay_factory: Callable[..., RelayProcess], kind: str, report: Callable[[str], None]) -> None:
    hop = FloodingHop(kind)
    relay = relay_factory(extra=delivery_to(hop.port, command_timeout=20, retry='["1h"]'))
    try:
        assert relay.proc is not None
        before = rss_kib(relay.proc.pid)
        ids = send(relay, [f"flood-{kind}"])
        [qid] = ids.values()
        log = relay.wait_log(f"{qid}: to=<", timeout=30)
        peak = rss_kib(relay.proc.pid)
    finally:
        relay.stop()
        hop.stop()
    line = next(ln for ln in log.splitlines() if f"{qid}: to=<" in ln)
    report(f"a next hop flooding {kind} replies: cut off after it sent {hop.sent // 1024} KiB; "
           f"relay RSS {before} -> {peak} KiB")
    expected = "reply too long" if kind == "continued" else "replies nobody asked for"
    assert "status=deferred" in line and expected in line, line
    assert peak - before < 32 * 1024, (before, peak)


class InjectingHop:
    """A next hop (or a man in the middle) that puts a reply right behind its
    "220 ready to start TLS", in plaintext: read after the handshake, it would
    answer the relay's EHLO inside TLS (the client side of CVE-2011-0411)."""

    def __init__(self, certs: Certs) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(certs.cert, certs.key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.commands: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        stream: socket.socket = conn
        try:
            reader = stream.makefile("rb")
            stream.sendall(b"220 inject.test ESMTP\r\n")
            while line := reader.readline():
                self.commands.append(line.strip())
                verb = (line.split() or [b""])[0].upper()
                if verb == b"EHLO":
                    stream.sendall(b"250-inject.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
                elif verb == b"STARTTLS":
                    stream.sendall(b"220 2.0.0 ready\r\n250 2.0.0 injected\r\n")
                    stream = self.context.wrap_socket(conn, server_side=True)
                    reader = stream.makefile("rb")
                elif verb == b"QUIT":
                    stream.sendall(b"221 bye\r\n")
                    return
                else:
                    stream.sendall(b"250 2.0.0 ok\r\n" if verb != b"DATA" else b"354 go\r\n")
        except (OSError, ssl.SSLError):
            return
        finally:
            stream.close()
            conn.close()

    def stop(self) -> None:
        self.listener.close()


def test_a_reply_injected_behind_the_starttls_220_is_refused(
        relay_factory: Callable[..., RelayProcess], certs: Certs) -> None:
    hop = InjectingHop(certs)
    relay = relay_factory(extra=delivery_to(hop.port, retry='["1h"]').replace('tls = "none"', 'tls = "required"'))
    try:
        [qid] = send(relay, ["injected"]).values()
        log = relay.wait_log(f"{qid}: to=<", timeout=30)
    finally:
        relay.stop()
        hop.stop()
    line = next(ln for ln in log.splitlines() if f"{qid}: to=<" in ln)
    assert "status=deferred" in line and "sent data behind its 220 to STARTTLS" in line, line
    assert not any(c.upper().startswith(b"MAIL") for c in hop.commands), hop.commands


@pytest.mark.parametrize("size", ["\u00b2", "12x", "-5", "99999999999999999999999999"])
def test_an_odd_size_in_the_ehlo_reply_does_not_stop_delivery(relay_factory: Callable[..., RelayProcess],
                                                             size: str) -> None:
    """SIZE's parameter is the server's to get right (RFC 1870); a superscript digit, which
    str.isdigit accepts and int refuses, made the delivery fail with a traceback."""
    ehlo = f"250-hop.test\r\n250-PIPELINING\r\n250 SIZE {size}\r\n".encode()
    hop = ScriptedHop(ehlo=ehlo).start()
    relay = relay_factory(extra=delivery_to(hop.port))
    try:
        [qid] = send(relay, [f"size-{len(size)}"]).values()
        hop.wait_acked(1)
        relay.wait_log(f"{qid}: removed")
    finally:
        relay.stop()
        hop.stop()
    assert "Traceback" not in relay.log()


def test_a_next_hop_reply_with_control_characters_reaches_neither_the_log_nor_the_bounce(
        relay_factory: Callable[..., RelayProcess]) -> None:
    """A remote reply is text from anyone: a bare CR in it would split the Diagnostic-Code
    field of the bounce (a header injection), an escape would reach the administrator's
    terminal through the log.  Both are shown as "?"; the rest of the text is kept."""
    evil = b"550 5.1.1 no such user\rX-Injected: yes \x1b[31mred\x07\r\n"
    hop = ScriptedHop(refuse=("nosuch", evil)).start()
    relay = relay_factory(extra=delivery_to(hop.port))
    try:
        with smtplib.SMTP("127.0.0.1", relay.port, local_hostname=HELO, timeout=15) as smtp:
            assert smtp.sendmail(SENDER, ["nosuch@dest.test"], body("evil")) == {}
        wait_for(lambda: any(r.mail_from == "" and r.acked for r in hop.acked()), 20, "the bounce")
        [dsn] = [r for r in hop.acked() if r.mail_from == ""]
        log = relay.wait_log("no such user")
    finally:
        relay.stop()
        hop.stop()
    assert dsn.mail_from == "" and dsn.rcpt_tos == [SENDER]
    assert b"no such user?X-Injected: yes ?[31mred?" in dsn.content, dsn.content
    assert b"\x1b" not in dsn.content and b"\x07" not in dsn.content
    assert b"\r" not in dsn.content.replace(b"\r\n", b""), dsn.content    # no bare CR anywhere
    assert "no such user?X-Injected: yes ?[31mred?" in log and "\x1b" not in log
