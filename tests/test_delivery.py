"""Delivery: the queue drains to real next hops over loopback.

Every test runs a real fastrelay process, a real DNS server for the test's
zone (tests/dns_server.py) and aiosmtpd sinks as next hops (tests/sink.py).
Every MX and A record points to a 127.0.0.x address; all MX hosts of a test
listen on the same port (``[delivery] mx_port``), told apart by address.
"""

from __future__ import annotations

import email
import email.policy
import itertools
import json
import re
import smtplib
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
import trustme
from conftest import Certs, RelayProcess, free_port
from dns_server import TestDns
from sink import Sink

from fastrelay.agent import SUSPENSIONS_SWEEP_MIN, Suspensions
from fastrelay.smtp_client import deferred
from fastrelay.spool import MessageState, Spool

SENDER = "alice@example.com"
HELO = "mail.example.com"

DELIVERY = """
[delivery]
nameservers = ["{dns}"]
mx_port = {mx_port}
retry_schedule = {retry}
max_queue_lifetime = "{lifetime}"
connect_timeout = 2
command_timeout = {command_timeout}
connection_idle_time = {idle_time}
per_destination_concurrency = {per_destination}
"""


class World:
    """One test's DNS zone, sinks and relay."""

    def __init__(self, factory: Callable[..., RelayProcess], dns: TestDns) -> None:
        self.factory = factory
        self.dns = dns
        self.zone = dns.zone
        self.mx_port = free_port()
        self.sinks: list[Sink] = []
        self.relay: RelayProcess | None = None
        # The sender's own domain has an MX too, so that DSNs have somewhere to go.
        self.zone.mx("example.com", (10, "mx.example.com"))
        self.zone.a("mx.example.com", "127.0.0.9")

    def sink(self, host: str, port: int | None = None, **behaviour: Any) -> Sink:
        sink = Sink(host, port or self.mx_port, **behaviour).start()
        self.sinks.append(sink)
        return sink

    def sender_sink(self, **behaviour: Any) -> Sink:
        """Where DSNs to alice@example.com arrive."""
        return self.sink("127.0.0.9", **behaviour)

    def start(self, *, retry: str = '["1s", "1s", "2s"]', lifetime: str = "5d", command_timeout: float = 5,
              per_destination: int = 10, idle_time: float = 3, routes: str = "", extra: str = "",
              events: bool = False) -> RelayProcess:
        config = DELIVERY.format(dns=self.dns.address, mx_port=self.mx_port, retry=retry, lifetime=lifetime,
                                 command_timeout=command_timeout, per_destination=per_destination,
                                 idle_time=idle_time)
        self.relay = self.factory(extra=config + extra + routes, start=not events)
        if events:   # the event log, in the relay's directory
            path = self.relay.config_path
            path.write_text(path.read_text().replace("[logging]\n", '[logging]\nevents_file = "events.jsonl"\n'))
            self.relay.start()
        return self.relay

    def close(self) -> None:
        # The relay first: it QUITs its cached connections before the sinks go.
        if self.relay is not None and self.relay.proc is not None and self.relay.proc.poll() is None:
            self.relay.stop()
        for sink in self.sinks:
            sink.stop()


@pytest.fixture
def world(relay_factory: Callable[..., RelayProcess]) -> Iterator[World]:
    dns = TestDns().start()
    w = World(relay_factory, dns)
    yield w
    w.close()
    dns.stop()


def send(relay: RelayProcess, recipients: list[str], body: bytes | None = None, sender: str = SENDER,
         subject: str = "delivery test", mail_options: tuple[str, ...] = ()) -> str:
    """Send one message through the relay; return its queue id."""
    if body is None:
        body = (f"From: {sender}\r\nTo: {', '.join(recipients)}\r\nSubject: {subject}\r\n"
                f"Message-ID: <{time.time_ns()}@example.com>\r\n\r\nHello.\r\n").encode()
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname=HELO, timeout=15) as client:
        client.ehlo()
        client.mail(sender, list(mail_options))
        for rcpt in recipients:
            code, text = client.rcpt(rcpt)
            assert code == 250, text
        code, text = client.data(body)
        assert code == 250, text
    return text.decode().rsplit(" ", 1)[-1]


def route(domain: str, host: str, **keys: str) -> str:
    """One [[delivery.routes]] table (string values only)."""
    lines = [f'domain = "{domain}"', f'host = "{host}"', *(f'{k} = "{v}"' for k, v in keys.items())]
    return "\n[[delivery.routes]]\n" + "\n".join(lines) + "\n"


def queue_states(relay: RelayProcess) -> dict[str, Any]:
    """queue id -> DeliveryState of the live messages, read from the spool on disk."""
    return {m.envelope.queue_id: m.state for m in Spool(relay.spool_dir).scan()}


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def wait_drained(relay: RelayProcess, timeout: float = 10.0) -> None:
    wait_until(lambda: not queue_states(relay), timeout, f"an empty queue; log:\n{relay.log()[-3000:]}")


def parse(content: bytes) -> Message:
    return email.message_from_bytes(content, policy=email.policy.compat32)


def dsn_parts(content: bytes) -> tuple[str, list[Message], str]:
    """(human text, delivery-status blocks, returned headers) of a DSN."""
    msg = parse(content)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    text_part, status_part, headers_part = msg.get_payload()
    assert text_part.get_content_type() == "text/plain"
    # RFC 6533 types when addresses or headers are not ASCII.
    assert status_part.get_content_type() in ("message/delivery-status", "message/global-delivery-status")
    assert headers_part.get_content_type() in ("text/rfc822-headers", "message/global-headers")
    blocks = status_part.get_payload()
    return text_part.get_payload(), blocks, headers_part.get_payload()


def cli(relay: RelayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastrelay", "queue", *args, "--config", str(relay.config_path)],
                          capture_output=True, text=True, timeout=30, check=False)


def sink_tls(certs: Certs, leaf: trustme.LeafCert | None = None) -> ssl.SSLContext:
    """A sink's STARTTLS context: the tests' certificate (127.0.0.1, localhost) or ``leaf``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if leaf is None:
        ctx.load_cert_chain(certs.cert, certs.key)
    else:
        leaf.configure_cert(ctx)
    return ctx


def failing_tls(certs: Certs) -> ssl.SSLContext:
    """A STARTTLS whose handshake no ordinary client completes: TLS 1.2 at most, PSK cipher
    suites only and no PSK, so the server answers the ClientHello with "no shared cipher"."""
    ctx = sink_tls(certs)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("PSK")
    return ctx


def log_line(log: str, *parts: str) -> str:
    """The one log line that contains every part."""
    lines = [ln for ln in log.splitlines() if all(p in ln for p in parts)]
    assert len(lines) == 1, (parts, lines, log[-3000:])
    return lines[0]


def per_connection(sink: Sink) -> list[list[str]]:
    """The verbs the sink read, one list per connection, in the order the connections came."""
    peers = [c.peer for c in sink.connections]
    return [[c.verb for c in sink.commands if c.peer == peer] for peer in peers]


# --- routing ------------------------------------------------------------------------


def test_mx_preference_order_and_fallback_when_the_best_host_refuses(world: World) -> None:
    world.zone.mx("dest.test", (30, "mx3.dest.test"), (10, "mx1.dest.test"), (20, "mx2.dest.test"))
    world.zone.a("mx1.dest.test", "127.0.0.2")   # nothing listens there: connection refused
    world.zone.a("mx2.dest.test", "127.0.0.3")
    world.zone.a("mx3.dest.test", "127.0.0.4")
    second = world.sink("127.0.0.3")
    third = world.sink("127.0.0.4")
    relay = world.start()
    qid = send(relay, ["bob@dest.test"])
    [message] = second.wait(1)
    assert message.rcpt_tos == ["bob@dest.test"]
    assert message.mail_from == SENDER
    assert message.helo == "relay.example.test"
    log = relay.wait_log(f"{qid}: removed")
    assert f"connect to mx1.dest.test[127.0.0.2]:{world.mx_port}: Connection refused" in log
    assert (f"{qid}: to=<bob@dest.test>, relay=mx2.dest.test[127.0.0.3]:{world.mx_port}, delay=" in log)
    assert "dsn=2.0.0, status=sent (250 2.0.0 OK: queued)" in log
    assert third.messages == []
    wait_drained(relay)


def test_a_domain_with_many_mx_hosts_costs_at_most_five_addresses_per_attempt(world: World) -> None:
    """As Postfix's smtp_mx_address_limit (5): a domain that lists 30 MX hosts where nothing
    answers (or, worse, where each one stalls until connect_timeout) is given up on for this
    attempt after five addresses, the best ones."""
    world.zone.mx("many.test", *[(i, f"mx{i:02d}.many.test") for i in range(30)])
    for i in range(30):
        world.zone.a(f"mx{i:02d}.many.test", f"127.0.1.{i + 1}")   # nothing listens: refused
    relay = world.start(retry='["1h"]')
    qid = send(relay, ["bob@many.test"])
    log = relay.wait_log(f"{qid}: to=<bob@many.test>")
    tried = [line for line in log.splitlines() if ": connect to mx" in line and "many.test[127.0.1." in line]
    assert len(tried) == 5, tried
    assert all(f"mx{i:02d}.many.test[127.0.1.{i + 1}]" in tried[i] for i in range(5)), tried
    assert "status=deferred" in log


def test_ipv6_next_hops_by_aaaa_record_and_by_route(world: World) -> None:
    # An MX host with only an AAAA record (::1), and a route to an IPv6 literal.
    world.zone.mx("six.test", (10, "mx6.six.test"))
    world.zone.aaaa("mx6.six.test", "::1")
    by_dns = world.sink("::1")
    by_route = world.sink("::1", free_port())
    routes = route("routed.test", f"[::1]:{by_route.port}")
    relay = world.start(routes=routes)
    qid = send(relay, ["a@six.test", "b@routed.test"])
    assert [m.rcpt_tos for m in by_dns.wait(1)] == [["a@six.test"]]
    assert [m.rcpt_tos for m in by_route.wait(1)] == [["b@routed.test"]]
    log = relay.wait_log(f"{qid}: removed")
    assert f"{qid}: to=<a@six.test>, relay=mx6.six.test[::1]:{world.mx_port}, delay=" in log
    assert f"{qid}: to=<b@routed.test>, relay=" in log and f"[::1]:{by_route.port}" in log
    wait_drained(relay)


def test_routes_override_dns_first_match_wins(world: World) -> None:
    # DNS says dest.test goes to 127.0.0.2; the routes say otherwise.
    world.zone.mx("dest.test", (10, "mx.dest.test"))
    world.zone.a("mx.dest.test", "127.0.0.2")
    by_dns = world.sink("127.0.0.2")
    exact = world.sink("127.0.0.5", free_port())
    subdomains = world.sink("127.0.0.6", free_port())
    everything = world.sink("127.0.0.7", free_port())
    routes = (route("dest.test", f"127.0.0.5:{exact.port}") + route(".dest.test", f"127.0.0.6:{subdomains.port}")
              + route("*", f"127.0.0.7:{everything.port}"))
    relay = world.start(routes=routes)
    send(relay, ["a@dest.test", "b@sub.dest.test", "c@elsewhere.test"])
    assert [m.rcpt_tos for m in exact.wait(1)] == [["a@dest.test"]]
    assert [m.rcpt_tos for m in subdomains.wait(1)] == [["b@sub.dest.test"]]
    assert [m.rcpt_tos for m in everything.wait(1)] == [["c@elsewhere.test"]]
    wait_drained(relay)
    assert by_dns.messages == []


def test_one_message_is_split_per_destination_one_transaction_each(world: World) -> None:
    world.zone.mx("one.test", (10, "mx.one.test"))
    world.zone.a("mx.one.test", "127.0.0.2")
    world.zone.a("two.test", "127.0.0.3")       # no MX: the domain itself (RFC 5321 §5.1)
    one = world.sink("127.0.0.2")
    two = world.sink("127.0.0.3")
    relay = world.start()
    qid = send(relay, ["a1@one.test", "b1@two.test", "a2@one.test"])
    [m1] = one.wait(1)
    [m2] = two.wait(1)
    assert m1.rcpt_tos == ["a1@one.test", "a2@one.test"]
    assert m2.rcpt_tos == ["b1@two.test"]
    assert m1.content == m2.content
    log = relay.wait_log(f"{qid}: removed")
    assert log.count(f"{qid}: to=<") == 3


def test_too_many_recipients_452_sends_the_rest_in_another_transaction(world: World) -> None:
    world.zone.a("dest.test", "127.0.0.2")
    # Without PIPELINING: one command at a time, RSET before the next transaction.
    sink = world.sink("127.0.0.2", rcpt_limit=2, pipelining=False)
    relay = world.start()
    qid = send(relay, [f"r{i}@dest.test" for i in range(5)])
    messages = sink.wait(3)
    assert [m.rcpt_tos for m in messages] == [["r0@dest.test", "r1@dest.test"], ["r2@dest.test", "r3@dest.test"],
                                              ["r4@dest.test"]]
    assert len({m.peer for m in messages}) == 1   # the same connection
    relay.wait_log(f"{qid}: removed")
    assert "status=deferred" not in relay.log()


def test_null_mx_and_nxdomain_bounce_at_once_servfail_defers(world: World) -> None:
    world.zone.null_mx("nomail.test")
    world.zone.servfail("broken.test")
    sender_sink = world.sender_sink()
    relay = world.start(retry='["1h"]')
    qid = send(relay, ["x@nomail.test", "y@nowhere.test", "z@broken.test"])
    [dsn] = sender_sink.wait(1)
    assert dsn.mail_from == "" and dsn.rcpt_tos == [SENDER]
    _, blocks, headers = dsn_parts(dsn.content)
    per_rcpt = {b["Final-Recipient"]: b for b in blocks[1:]}
    assert set(per_rcpt) == {"rfc822; x@nomail.test", "rfc822; y@nowhere.test"}
    assert per_rcpt["rfc822; x@nomail.test"]["Status"] == "5.1.10"
    assert per_rcpt["rfc822; y@nowhere.test"]["Status"] == "5.1.2"
    assert all(b["Action"] == "failed" for b in per_rcpt.values())
    assert "Subject: delivery test" in headers
    log = relay.wait_log(f"{qid}: deferred")
    assert f"{qid}: to=<z@broken.test>, relay=none" in log
    assert "dsn=4.4.3, status=deferred (Host or domain name not found" in log
    state = queue_states(relay)[qid]
    assert state.state == MessageState.DEFERRED
    assert sorted(state.done_recipients) == [0, 1]
    assert "try again" in state.last_error


# --- retries, bounces, timeouts --------------------------------------------------------


def test_temporary_failure_is_retried_until_accepted(world: World) -> None:
    world.zone.a("dest.test", "127.0.0.2")
    sink = world.sink("127.0.0.2", data_replies=["451 4.3.0 Try again later"])
    relay = world.start(events=True)
    qid = send(relay, ["bob@dest.test"])
    [message] = sink.wait(1)
    log = relay.wait_log(f"{qid}: removed")
    assert ("dsn=4.3.0, status=deferred (host dest.test[127.0.0.2] said: 451 4.3.0 Try again later "
            "(in reply to end of DATA command))") in log
    assert f"{qid}: deferred: 1 recipient(s) pending after attempt 1" in log
    assert "(queue active, attempt 2)" in log
    assert log.index("status=deferred") < log.index("status=sent")
    assert message.rcpt_tos == ["bob@dest.test"]
    # The event log has the message's whole life, in order.
    path = relay.directory / "events.jsonl"
    kinds = ["reception", "abuse_verdict", "deferral", "delivery"]
    wait_until(lambda: path.exists() and all(f'"kind":"{k}"' in path.read_text() for k in kinds),
               what="every event of the message")   # the log is written at least once a second
    events = [e for e in map(json.loads, path.read_text().splitlines()) if e.get("queue_id") == qid]
    assert [e["kind"] for e in events] == kinds
    assert (events[1]["verdict"], events[1]["scanner"], events[1]["action"]) == ("clean", "builtin", "deliver")
    assert (events[2]["dsn"], events[2]["status"], events[2]["recipient"]) == ("4.3.0", "deferred", "bob@dest.test")
    assert (events[3]["dsn"], events[3]["status"], events[3]["relay"]) == ("2.0.0", "sent", "dest.test[127.0.0.2]:"
                                                                            + str(world.mx_port))


def test_permanent_failure_returns_a_dsn_with_the_original_headers(world: World) -> None:
    world.zone.a("dest.test", "127.0.0.2")
    sink = world.sink("127.0.0.2", rcpt_reply_for={"nobody@dest.test": "550 5.1.1 <nobody@dest.test>: no such user"})
    sender_sink = world.sender_sink()
    relay = world.start()
    qid = send(relay, ["nobody@dest.test", "bob@dest.test"], subject="quarterly report")
    [delivered] = sink.wait(1)
    assert delivered.rcpt_tos == ["bob@dest.test"]
    [dsn] = sender_sink.wait(1)
    assert dsn.mail_from == "" and dsn.rcpt_tos == [SENDER]
    msg = parse(dsn.content)
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["From"].startswith("MAILER-DAEMON@relay.example.test")
    text, blocks, headers = dsn_parts(dsn.content)
    assert "<nobody@dest.test>: host dest.test[127.0.0.2] said: 550 5.1.1" in text
    assert blocks[0]["Reporting-MTA"] == "dns; relay.example.test"
    assert blocks[0]["Arrival-Date"]
    [rcpt] = blocks[1:]
    assert rcpt["Final-Recipient"] == "rfc822; nobody@dest.test"
    assert rcpt["Action"] == "failed"
    assert rcpt["Status"] == "5.1.1"
    assert rcpt["Remote-MTA"] == "dns; dest.test"
    assert rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 <nobody@dest.test>: no such user"
    assert "Subject: quarterly report" in headers
    assert f"by relay.example.test (fastrelay) with ESMTP id {qid}" in headers
    log = relay.wait_log(f"{qid}: removed")
    assert f"{qid}: to=<nobody@dest.test>, relay=dest.test[127.0.0.2]:{world.mx_port}" in log
    assert "dsn=5.1.1, status=bounced" in log
    assert f"{qid}: sender non-delivery notification: " in log
    wait_drained(relay)


def test_a_delay_warning_reaches_the_sender_once_while_the_message_is_retried(world: World) -> None:
    world.zone.a("dest.test", "127.0.0.2")
    world.sink("127.0.0.2", rcpt_reply_for={"slow@dest.test": "451 4.2.0 Mailbox busy"})
    sender_sink = world.sender_sink()
    relay = world.start(retry='["1s"]', extra='delay_warning = "1s"\n')
    qid = send(relay, ["slow@dest.test"], subject="status report")
    quiet = send(relay, ["slow@dest.test"], sender="")            # the null sender is never warned
    [dsn] = sender_sink.wait(1, timeout=15)
    assert dsn.mail_from == "" and dsn.rcpt_tos == [SENDER]
    assert parse(dsn.content)["Subject"] == "Delayed Mail (still being retried)"
    text, blocks, headers = dsn_parts(dsn.content)
    assert "THIS IS A WARNING ONLY" in text and "<slow@dest.test>: host dest.test[127.0.0.2] said: 451" in text
    [rcpt] = blocks[1:]
    assert rcpt["Action"] == "delayed" and rcpt["Status"] == "4.2.0"
    assert rcpt["Diagnostic-Code"] == "smtp; 451 4.2.0 Mailbox busy" and rcpt["Will-Retry-Until"]
    assert "Subject: status report" in headers
    log = relay.wait_log(f"{qid}: sender delay notification: ")
    wait_until(lambda: "(queue active, attempt 4)" in relay.log(), 15, "a fourth attempt")   # retried on ...
    assert qid in queue_states(relay) and queue_states(relay)[qid].warned
    time.sleep(0.5)
    assert len(sender_sink.messages) == 1                              # ... without a second warning
    assert f"{quiet}: sender delay notification" not in relay.log()
    assert "sender delay notification" in log


def test_mail_from_the_null_sender_is_never_bounced(world: World) -> None:
    world.zone.a("dest.test", "127.0.0.2")
    world.sink("127.0.0.2", rcpt_replies=["550 5.1.1 no such user"])
    sender_sink = world.sender_sink()
    relay = world.start()
    qid = send(relay, ["nobody@dest.test"], sender="")
    log = relay.wait_log(f"{qid}: removed")
    assert "status=bounced" in log
    assert f"{qid}: no non-delivery notification for mail from the null sender" in log
    time.sleep(0.3)
    assert sender_sink.messages == []
    wait_drained(relay)


def test_connection_refused_defers_and_expiry_bounces(world: World) -> None:
    world.zone.a("dest.test", "127.0.0.2")       # nothing listens
    sender_sink = world.sender_sink()
    relay = world.start(lifetime="2s")
    qid = send(relay, ["bob@dest.test"])
    log = relay.wait_log(f"{qid}: deferred")
    assert (f"{qid}: to=<bob@dest.test>, relay=none, delay=") in log
    assert f"dsn=4.4.1, status=deferred (connect to dest.test[127.0.0.2]:{world.mx_port}: Connection refused)" in log
    [dsn] = sender_sink.wait(1, timeout=15)
    _, blocks, _ = dsn_parts(dsn.content)
    assert blocks[1]["Status"] == "5.4.7"
    assert "Connection refused" in blocks[1]["Diagnostic-Code"]
    log = relay.wait_log(f"{qid}: removed")
    assert f"{qid}: from=<{SENDER}>, status=expired, returned to sender" in log


def test_retry_delays_follow_the_schedule_grow_and_the_last_one_repeats(world: World) -> None:
    """The delay after attempt n is retry_schedule[n-1], the last entry once the schedule runs
    out: as logged, and as the next hop saw the attempts come."""
    world.zone.a("dest.test", "127.0.0.2")
    sink = world.sink("127.0.0.2", rcpt_reply_for={"bob@dest.test": "451 4.2.0 Mailbox busy"})
    relay = world.start(retry='["0.3s", "0.6s", "1.2s"]')
    qid = send(relay, ["bob@dest.test"])
    log = relay.wait_log(f"{qid}: deferred: 1 recipient(s) pending after attempt 5;", timeout=20)
    logged = re.findall(rf"{qid}: deferred: 1 recipient\(s\) pending after attempt (\d+); next attempt in ([\d.]+) s",
                        log)
    assert logged[:5] == [("1", "0.30"), ("2", "0.60"), ("3", "1.20"), ("4", "1.20"), ("5", "1.20")]
    rcpts = [c.at for c in sink.commands if c.verb == "RCPT"]
    gaps = [later - earlier for earlier, later in itertools.pairwise(rcpts[:5])]
    for gap, delay in zip(gaps, [0.3, 0.6, 1.2, 1.2], strict=True):
        assert delay <= gap < delay + 1.0, gaps
    assert sink.messages == []


def test_the_default_retry_schedule_starts_near_a_minute_and_grows() -> None:
    from fastrelay.config import DeliveryConfig, parse_duration

    delays = [parse_duration(d) for d in DeliveryConfig().retry_schedule]
    assert delays[:4] == [60, 60, 180, 300]                      # 1, 1, 3, 5 minutes (issue 5)
    assert all(a <= b for a, b in itertools.pairwise(delays)) and delays[-1] >= 3600


def test_a_destination_that_cannot_be_reached_is_suspended_until_the_first_retry(world: World) -> None:
    """As Postfix marks a destination dead: after a failed connection, mail that comes for the
    same destination before the first retry delay is deferred at once, without knocking again;
    once the next hop answers, the retries deliver everything."""
    world.zone.a("dest.test", "127.0.0.2")       # nothing listens yet
    relay = world.start(retry='["3s"]')
    first = send(relay, ["bob@dest.test"])
    relay.wait_log(f"{first}: deferred")
    second = send(relay, ["carol@dest.test"])
    log = relay.wait_log(f"{second}: deferred")
    [line] = [ln for ln in log.splitlines() if f"{second}: to=<carol@dest.test>" in ln]
    assert ("relay=none" in line and "status=deferred (delivery temporarily suspended: "
            f"connect to dest.test[127.0.0.2]:{world.mx_port}: Connection refused)") in line
    assert log.count(f"connect to dest.test[127.0.0.2]:{world.mx_port}: Connection refused\n") == 1
    sink = world.sink("127.0.0.2")
    delivered = sink.wait(2, timeout=20)
    assert sorted(r for m in delivered for r in m.rcpt_tos) == ["bob@dest.test", "carol@dest.test"]
    wait_drained(relay)


def test_a_next_hop_that_stalls_times_out_and_the_message_is_deferred(world: World) -> None:
    world.zone.a("dest.test", "127.0.0.2")
    world.sink("127.0.0.2", stall=5)
    relay = world.start(command_timeout=1, retry='["1h"]')
    qid = send(relay, ["bob@dest.test"])
    log = relay.wait_log(f"{qid}: deferred", timeout=15)
    assert ("dsn=4.4.2, status=deferred (conversation with dest.test[127.0.0.2] timed out while "
            "sending end of data -- message may be sent more than once)") in log
    [state] = queue_states(relay).values()
    assert state.state == MessageState.DEFERRED
    assert state.attempts == 1
    assert state.next_attempt > time.time() + 3000


def test_a_message_that_needs_smtputf8_bounces_at_a_hop_without_it(world: World) -> None:
    world.zone.a("dest.test", "127.0.0.2")
    sink = world.sink("127.0.0.2", smtputf8=False)
    sender_sink = world.sender_sink()
    relay = world.start()
    body = "From: alice@example.com\r\nSubject: café\r\n\r\nnaïve\r\n".encode()
    qid = send(relay, ["bob@dest.test"], body=body, mail_options=("SMTPUTF8", "BODY=8BITMIME"))
    [dsn] = sender_sink.wait(1)
    _, blocks, _ = dsn_parts(dsn.content)
    assert blocks[1]["Status"] == "5.6.7"
    assert "does not support SMTPUTF8" in relay.wait_log(f"{qid}: removed")
    assert sink.messages == []


def test_8bit_content_bounces_5_6_3_at_a_next_hop_without_8bitmime_and_7bit_mail_still_goes(world: World) -> None:
    world.zone.a("dest.test", "127.0.0.2")
    sink = world.sink("127.0.0.2", decode_data=True)    # aiosmtpd then does not advertise 8BITMIME
    sender_sink = world.sender_sink()
    relay = world.start()
    body = ("From: alice@example.com\r\nTo: bob@dest.test\r\nSubject: eight bits\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\ncaf\u00e9\r\n").encode()
    eight = send(relay, ["bob@dest.test"], body=body, mail_options=("BODY=8BITMIME",))
    [dsn] = sender_sink.wait(1)
    assert dsn.mail_from == "" and dsn.rcpt_tos == [SENDER]
    text, blocks, headers = dsn_parts(dsn.content)
    [rcpt] = blocks[1:]
    assert rcpt["Final-Recipient"] == "rfc822; bob@dest.test" and rcpt["Status"] == "5.6.3"
    assert "does not support 8BITMIME" in text and "Subject: eight bits" in headers
    log = relay.wait_log(f"{eight}: removed")
    assert (f"dsn=5.6.3, status=bounced (host dest.test[127.0.0.2]:{world.mx_port} does not support 8BITMIME "
            "and the message has 8-bit content (conversion required but not supported))"
            ) in log_line(log, f"{eight}: to=<bob@dest.test>")
    # The hop itself works: 7-bit mail goes, even when its client declared BODY=8BITMIME
    # (what counts is the content, as for Postfix).
    seven = send(relay, ["carol@dest.test"], mail_options=("BODY=8BITMIME",))
    [message] = sink.wait(1)
    assert message.rcpt_tos == ["carol@dest.test"] and "BODY=8BITMIME" not in message.mail_options
    relay.wait_log(f"{seven}: removed")
    assert sink.verbs().count("MAIL") == 1             # the 8-bit message never got as far as MAIL


def test_a_message_over_the_next_hops_size_limit_bounces_5_3_4_without_mail_or_data(world: World) -> None:
    world.zone.a("dest.test", "127.0.0.2")
    sink = world.sink("127.0.0.2", data_size_limit=2000)   # EHLO says SIZE 2000
    sender_sink = world.sender_sink()
    relay = world.start()
    body = b"From: alice@example.com\r\nSubject: too big\r\n\r\n" + (b"x" * 78 + b"\r\n") * 40
    big = send(relay, ["bob@dest.test"], body=body)
    [dsn] = sender_sink.wait(1)
    _, blocks, headers = dsn_parts(dsn.content)
    assert blocks[1]["Status"] == "5.3.4" and "Subject: too big" in headers
    log = relay.wait_log(f"{big}: removed")
    line = log_line(log, f"{big}: to=<bob@dest.test>")
    assert re.search(r"dsn=5\.3\.4, status=bounced \(message size (\d+) exceeds size limit 2000 of server "
                     rf"dest\.test\[127\.0\.0\.2\]:{world.mx_port}\)", line), line
    assert "MAIL" not in sink.verbs() and "DATA" not in sink.verbs()
    small = send(relay, ["carol@dest.test"])
    [message] = sink.wait(1)
    assert message.rcpt_tos == ["carol@dest.test"]
    assert any(o.startswith("SIZE=") for o in message.mail_options)
    relay.wait_log(f"{small}: removed")
    assert sink.verbs().count("DATA") == 1


# --- restart ------------------------------------------------------------------------------


def test_deferred_mail_survives_a_restart_and_keeps_its_schedule(world: World) -> None:
    world.zone.a("dest.test", "127.0.0.2")
    relay = world.start(retry='["3s"]')
    qid = send(relay, ["bob@dest.test"])
    relay.wait_log(f"{qid}: deferred")
    [before] = queue_states(relay).values()
    assert before.state == MessageState.DEFERRED and "Connection refused" in before.last_error
    assert relay.stop() == 0
    [after_stop] = queue_states(relay).values()
    assert after_stop.next_attempt == before.next_attempt
    sink = world.sink("127.0.0.2")
    relay.start()
    [message] = sink.wait(1, timeout=15)
    assert time.time() >= before.next_attempt - 0.1   # not earlier than scheduled
    assert message.rcpt_tos == ["bob@dest.test"]
    relay.wait_log(f"{qid}: removed")
    relay.wait_log("delivery: resuming 1 deferred")
    wait_drained(relay)


def test_a_message_active_at_a_crash_is_delivered_again_after_restart(world: World) -> None:
    world.zone.a("dest.test", "127.0.0.2")
    sink = world.sink("127.0.0.2", stall=1.5)   # the final dot is answered late
    relay = world.start()
    qid = send(relay, ["bob@dest.test"])
    wait_until(lambda: sink.data_started == 1, what="the relay to send the final dot")
    wait_until(lambda: queue_states(relay).get(qid) is not None
               and queue_states(relay)[qid].state == MessageState.ACTIVE, what="an active state record")
    relay.kill()   # before the next hop's 250 arrives
    relay.start()
    log = relay.wait_log(f"{qid}: removed", timeout=15)
    assert "delivery: resuming 1 active" in log
    assert f"{qid}: from=<{SENDER}>, size=" in log and "(queue active, attempt 1)" in log
    # The killed transaction never completed (aiosmtpd drops it with the
    # connection); the one after the restart did.
    [message] = sink.wait(1)
    assert message.rcpt_tos == ["bob@dest.test"]
    assert sink.data_started == 2
    wait_drained(relay)


# --- connections ---------------------------------------------------------------------------


def test_messages_to_one_destination_share_a_connection(world: World) -> None:
    world.zone.a("dest.test", "127.0.0.2")
    sink = world.sink("127.0.0.2")
    relay = world.start(per_destination=1)
    for i in range(5):
        send(relay, [f"r{i}@dest.test"])
    messages = sink.wait(5)
    assert sorted(r for m in messages for r in m.rcpt_tos) == [f"r{i}@dest.test" for i in range(5)]
    assert len({m.peer for m in messages}) == 1, [m.peer for m in messages]
    wait_drained(relay)


def test_a_session_lingers_for_the_next_message_and_sends_it_without_rset(world: World) -> None:
    """Messages that follow each other closely ride one session: after a completed transaction
    the next hop is already reset (RFC 5321 §4.1.1.4), so no RSET, no trip through the cache."""
    world.zone.a("dest.test", "127.0.0.2")
    sink = world.sink("127.0.0.2")
    relay = world.start(per_destination=1, idle_time=30)
    for i in range(4):
        send(relay, [f"r{i}@dest.test"])
        sink.wait(i + 1)          # each one delivered before the next arrives: the queue ran dry
    messages = sink.wait(4)
    assert len({m.peer for m in messages}) == 1
    assert sink.verbs().count("MAIL") == 4
    assert "RSET" not in sink.verbs(), sink.verbs()
    wait_drained(relay)


def test_a_lingering_session_gives_its_slot_to_another_destination(world: World) -> None:
    """With every session slot taken by a lingering session, a message to another destination
    is sent at once, not after the linger time (2 s); the lingering connection goes to the
    cache, and the next message there takes it back with an RSET."""
    world.zone.a("one.test", "127.0.0.2")
    world.zone.a("two.test", "127.0.0.3")
    one = world.sink("127.0.0.2")
    two = world.sink("127.0.0.3")
    relay = world.start(idle_time=30, extra="concurrency = 1\n")
    send(relay, ["a@one.test"])
    [first] = one.wait(1)
    sent = time.monotonic()
    send(relay, ["b@two.test"])
    two.wait(1)
    assert time.monotonic() - sent < 1.5
    [connection] = one.connections
    assert connection.closed is None               # cached, not closed
    send(relay, ["c@one.test"])
    second = one.wait(2)[1]
    assert second.peer == first.peer
    assert one.verbs().count("RSET") == 1, one.verbs()
    wait_drained(relay)


def test_a_cached_connection_the_next_hop_closed_is_replaced_without_a_deferral(world: World) -> None:
    world.zone.a("dest.test", "127.0.0.2")
    sink = world.sink("127.0.0.2", idle_timeout=0.5)   # closes idle sessions long before the relay would
    relay = world.start(per_destination=1)
    send(relay, ["first@dest.test"])
    [first] = sink.wait(1)
    time.sleep(1.5)
    qid = send(relay, ["second@dest.test"])
    second = sink.wait(2)[1]
    assert second.rcpt_tos == ["second@dest.test"] and second.peer != first.peer
    relay.wait_log(f"{qid}: removed")
    assert "status=deferred" not in relay.log()


def test_per_destination_concurrency_caps_the_connections_to_a_slow_next_hop(world: World) -> None:
    world.zone.a("dest.test", "127.0.0.2")
    sink = world.sink("127.0.0.2", stall=0.2)     # every final dot answered 0.2 s late
    relay = world.start(per_destination=2)
    ids = [send(relay, [f"r{i}@dest.test"]) for i in range(20)]
    messages = sink.wait(20, timeout=30)
    assert sorted(r for m in messages for r in m.rcpt_tos) == sorted(f"r{i}@dest.test" for i in range(20))
    assert sink.max_open_connections == 2, sink.connections   # the limit was reached, never passed
    log = relay.wait_log(f"{ids[-1]}: removed")
    assert all(f"{qid}: removed" in log for qid in ids)
    assert "status=deferred" not in log
    wait_drained(relay)


def test_an_idle_cached_connection_is_closed_with_quit_after_the_idle_time(world: World) -> None:
    world.zone.a("dest.test", "127.0.0.2")
    sink = world.sink("127.0.0.2")                # keeps idle sessions open for 300 s itself
    relay = world.start(idle_time=1)
    qid = send(relay, ["bob@dest.test"])
    [message] = sink.wait(1)
    relay.wait_log(f"{qid}: removed")
    [connection] = sink.connections
    wait_until(lambda: connection.closed is not None, 10, "the relay to close its idle connection")
    assert connection.closed is not None
    data = max(c.at for c in sink.commands if c.verb == "DATA")
    quits = [c for c in sink.commands if c.verb == "QUIT"]
    assert [c.peer for c in quits] == [message.peer] == [connection.peer]
    # Cached for the idle time after the transaction, then closed with QUIT: not at once, not later.
    assert 0.9 <= quits[0].at - data <= 3.0, quits[0].at - data
    assert connection.closed - quits[0].at < 1.0


def test_starttls_verified_with_auth_and_required_tls_without_starttls_defers(world: World, certs: Certs) -> None:
    import ssl

    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(certs.cert, certs.key)
    secure = world.sink("127.0.0.1", free_port(), tls_context=server_ctx, credentials=("relayuser", "s3cret"))
    plain = world.sink("127.0.0.8", free_port())
    routes = (route("secure.test", f"127.0.0.1:{secure.port}", tls="verify", username="relayuser",
                    password="s3cret")
              + route("plain.test", f"127.0.0.8:{plain.port}", tls="required"))
    relay = world.start(routes=routes, retry='["1h"]', extra=f'ca_file = "{certs.ca_file}"\n')
    qid = send(relay, ["a@secure.test", "b@plain.test"])
    [message] = secure.wait(1)
    assert message.tls and message.auth_user == "relayuser"
    assert message.rcpt_tos == ["a@secure.test"]
    log = relay.wait_log(f"{qid}: deferred")
    assert f"{qid}: to=<a@secure.test>, relay=127.0.0.1[127.0.0.1]:{secure.port}" in log
    assert "dsn=4.7.4, status=deferred (TLS is required, but was not offered by host 127.0.0.8" in log
    assert plain.messages == []
    [state] = queue_states(relay).values()
    assert state.done_recipients == [0]


def test_the_global_tls_policy_applies_to_mx_delivery_and_routes_without_their_own(world: World) -> None:
    """[delivery] tls is the policy of MX delivery and of every route that sets none: "required"
    defers mail to a next hop without STARTTLS; a route's own tls = "none" still sends."""
    world.zone.a("dest.test", "127.0.0.2")
    world.sink("127.0.0.2")                                   # MX-routed, no STARTTLS
    inherits = world.sink("127.0.0.3", free_port())           # a route with no tls of its own
    own = world.sink("127.0.0.4", free_port())                # a route that says tls = "none"
    routes = route("inherits.test", f"127.0.0.3:{inherits.port}") + route("own.test", f"127.0.0.4:{own.port}",
                                                                           tls="none")
    relay = world.start(routes=routes, retry='["1h"]', extra='tls = "required"\n')
    qid = send(relay, ["a@dest.test", "b@inherits.test", "c@own.test"])
    [message] = own.wait(1)
    assert message.rcpt_tos == ["c@own.test"] and not message.tls
    log = relay.wait_log(f"{qid}: deferred")
    assert "status=deferred (TLS is required, but was not offered by host dest.test" in log
    assert "status=deferred (TLS is required, but was not offered by host 127.0.0.3" in log
    assert inherits.messages == [] and world.sinks[0].messages == []


def test_tls_verify_and_required_defer_on_a_failed_handshake_and_never_send_in_plaintext(
        world: World, certs: Certs) -> None:
    """A certificate from an unknown CA, or one that does not name the host, fails "verify";
    a handshake that fails fails "required".  Each is deferred (4.7.5, as docs/delivery.md
    says) with the reason in the log and the queue, after one connection: no plaintext retry,
    no MAIL.  The same policy to a hop whose certificate is good delivers."""
    good = world.sink("127.0.0.1", free_port(), tls_context=sink_tls(certs))
    untrusted = world.sink("127.0.0.2", free_port(),
                           tls_context=sink_tls(certs, trustme.CA().issue_cert("127.0.0.2")))
    misnamed = world.sink("127.0.0.3", free_port(),
                          tls_context=sink_tls(certs, certs.ca.issue_cert("elsewhere.example.test")))
    failing = world.sink("127.0.0.4", free_port(), tls_context=failing_tls(certs))
    routes = (route("good.test", f"127.0.0.1:{good.port}", tls="verify")
              + route("untrusted.test", f"127.0.0.2:{untrusted.port}", tls="verify")
              + route("misnamed.test", f"127.0.0.3:{misnamed.port}", tls="verify")
              + route("failing.test", f"127.0.0.4:{failing.port}", tls="required"))
    relay = world.start(routes=routes, retry='["1h"]', extra=f'ca_file = "{certs.ca_file}"\n')
    qid = send(relay, ["a@good.test", "b@untrusted.test", "c@misnamed.test", "d@failing.test"])
    [message] = good.wait(1)
    assert message.tls and message.rcpt_tos == ["a@good.test"]
    log = relay.wait_log(f"{qid}: deferred")
    for rcpt, sink, why in (("b@untrusted.test", untrusted, r"\[SSL: CERTIFICATE_VERIFY_FAILED\] .+"),
                            ("c@misnamed.test", misnamed, r"\[SSL: CERTIFICATE_VERIFY_FAILED\] .+ mismatch.*"),
                            ("d@failing.test", failing, r".*\w.*")):   # the reason, never empty
        line = log_line(log, f"{qid}: to=<{rcpt}>")
        assert re.search(r"relay=none, delay=[\d.]+, dsn=4\.7\.5, status=deferred \(TLS handshake with "
                         rf"{re.escape(f'{sink.host}[{sink.host}]:{sink.port}')} failed: {why}\)$", line), line
        assert sink.messages == []
        assert per_connection(sink) == [["EHLO", "STARTTLS"]], per_connection(sink)
    assert "trying again in plaintext" not in log
    state = queue_states(relay)[qid]
    assert state.state == MessageState.DEFERRED and state.done_recipients == [0]
    assert state.last_error.startswith("TLS handshake with 127.0.0.") and " failed: " in state.last_error


def test_opportunistic_starttls_encrypts_when_offered_and_falls_back_to_plaintext_when_it_fails(
        world: World, certs: Certs) -> None:
    """No tls key anywhere (MX delivery): STARTTLS to a hop that offers it, and everything
    after it inside TLS.  A route that says "opportunistic" to a hop whose handshake fails:
    one more connection, in plaintext, as Postfix's "may" level does (docs/delivery.md)."""
    world.zone.a("dest.test", "127.0.0.2")
    offers = world.sink("127.0.0.2", tls_context=sink_tls(certs))
    failing = world.sink("127.0.0.3", free_port(), tls_context=failing_tls(certs))
    routes = route("failing.test", f"127.0.0.3:{failing.port}", tls="opportunistic")
    relay = world.start(routes=routes)
    qid = send(relay, ["a@dest.test", "b@failing.test"])
    [encrypted] = offers.wait(1)
    assert encrypted.tls and encrypted.rcpt_tos == ["a@dest.test"]
    [after_ehlo, *rest] = [c for c in offers.commands if c.verb != "EHLO"]
    assert after_ehlo.verb == "STARTTLS" and not after_ehlo.tls
    assert {c.verb for c in rest} >= {"MAIL", "RCPT", "DATA"} and all(c.tls for c in rest)
    [plain] = failing.wait(1)
    assert not plain.tls and plain.rcpt_tos == ["b@failing.test"]
    first, second = per_connection(failing)
    assert first == ["EHLO", "STARTTLS"]
    assert "STARTTLS" not in second and "DATA" in second
    log = relay.wait_log(f"{qid}: removed")
    assert (f"TLS handshake with 127.0.0.3[127.0.0.3]:{failing.port} failed: " in log
            and "; trying again in plaintext" in log)
    assert "status=deferred" not in log


def test_auth_login_with_the_routes_credentials_a_refused_login_defers_and_never_in_plaintext(
        world: World, certs: Certs) -> None:
    """A hop offering only AUTH LOGIN gets the route's credentials (inside STARTTLS).  Wrong
    credentials: 535, deferred (docs/delivery.md: a config mistake should not bounce mail).
    A hop that offers AUTH without STARTTLS, or whose handshake fails (so the opportunistic
    retry is in plaintext), never sees an AUTH command: the mail is deferred instead."""
    creds = {"credentials": ("relayuser", "s3cret"), "auth_exclude": ["PLAIN"]}
    login = world.sink("127.0.0.2", free_port(), tls_context=sink_tls(certs), **creds)
    wrong = world.sink("127.0.0.3", free_port(), tls_context=sink_tls(certs), **creds)
    plain = world.sink("127.0.0.4", free_port(), auth_require_tls=False, **creds)   # AUTH LOGIN offered in clear
    failing = world.sink("127.0.0.5", free_port(), tls_context=failing_tls(certs), auth_require_tls=False,
                         **creds)
    user = {"username": "relayuser", "password": "s3cret"}
    routes = (route("login.test", f"127.0.0.2:{login.port}", **user)
              + route("wrong.test", f"127.0.0.3:{wrong.port}", username="relayuser", password="guess")
              + route("plain.test", f"127.0.0.4:{plain.port}", **user)
              + route("failing.test", f"127.0.0.5:{failing.port}", **user))
    relay = world.start(routes=routes, retry='["1h"]')
    qid = send(relay, ["a@login.test", "c@plain.test", "d@failing.test"])
    refused = send(relay, ["b@wrong.test"])
    [message] = login.wait(1)
    assert message.tls and message.auth_user == "relayuser" and message.rcpt_tos == ["a@login.test"]
    [auth] = [c for c in login.commands if c.verb == "AUTH"]
    assert auth.arg == "LOGIN" and auth.tls
    log = relay.wait_log(f"{refused}: deferred")
    said = f"SASL authentication failed; server 127.0.0.3[127.0.0.3]:{wrong.port} said: 535 5.7.8 " \
           "Authentication credentials invalid"
    assert f"dsn=4.7.8, status=deferred ({said})" in log_line(log, f"{refused}: to=<b@wrong.test>")
    assert [c.arg for c in wrong.commands if c.verb == "AUTH"] == ["LOGIN"]
    assert "MAIL" not in wrong.verbs()
    assert queue_states(relay)[refused].last_error == said
    log = relay.wait_log(f"{qid}: deferred")
    for rcpt, sink in (("c@plain.test", plain), ("d@failing.test", failing)):
        line = log_line(log, f"{qid}: to=<{rcpt}>")
        assert (f"dsn=4.7.0, status=deferred (not sending credentials to {sink.host}[{sink.host}]:{sink.port} "
                "in plaintext (no TLS))") in line
        assert "AUTH" not in sink.verbs() and "MAIL" not in sink.verbs(), sink.verbs()
    assert ["EHLO", "STARTTLS"] in per_connection(failing)   # it did try TLS first
    assert queue_states(relay)[qid].done_recipients == [0]
    # The plaintext hop did offer AUTH LOGIN in the clear: the relay chose not to use it.
    with smtplib.SMTP(plain.host, plain.port, timeout=5) as probe:
        probe.ehlo("probe.test")
        assert probe.has_extn("auth") and probe.esmtp_features["auth"].strip() == "LOGIN"


# --- end to end ------------------------------------------------------------------------------


def test_end_to_end_the_next_hop_gets_the_message_byte_for_byte(world: World) -> None:
    world.zone.a("dest.test", "127.0.0.2")
    sink = world.sink("127.0.0.2")
    relay = world.start()
    original = (b"From: Alice <alice@example.com>\r\nTo: bob@dest.test\r\nSubject: dots and 8 bits\r\n"
                b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                b"Content-Transfer-Encoding: 8bit\r\n\r\n"
                b".a line that starts with a dot\r\n..two dots\r\n.\r\nnot the end\r\n"
                + "caf\u00e9 \u2014 8-bit\r\n".encode() + b"x" * 990 + b"\r\nlast line\r\n")
    qid = send(relay, ["bob@dest.test"], body=original, mail_options=("BODY=8BITMIME",))
    [message] = sink.wait(1)
    received, sep, rest = message.content.partition(b"\r\n" + original[:5])
    assert received.startswith(b"Received: from " + HELO.encode())
    assert f"id {qid}".encode() in received
    assert sep + rest == b"\r\n" + original
    assert "BODY=8BITMIME" in message.mail_options
    assert any(o.startswith("SIZE=") for o in message.mail_options)
    wait_drained(relay)


# --- administration ------------------------------------------------------------------------------


def test_cli_hold_release_delete_flush_on_the_running_relay(world: World) -> None:
    world.zone.a("dest.test", "127.0.0.2")
    relay = world.start(retry='["1h"]')
    first = send(relay, ["one@dest.test"])
    second = send(relay, ["two@dest.test"])
    relay.wait_log(f"{first}: deferred")
    relay.wait_log(f"{second}: deferred")

    held = cli(relay, "hold", first)
    assert held.returncode == 0 and f"{first}: on hold" in held.stdout
    assert queue_states(relay)[first].state == MessageState.HOLD
    listing = cli(relay, "list")
    assert re.search(rf"^{first} +hold ", listing.stdout, re.MULTILINE), listing.stdout

    sink = world.sink("127.0.0.2")
    flushed = cli(relay, "flush")
    assert flushed.returncode == 0 and "1 deferred message(s)" in flushed.stdout
    [message] = sink.wait(1)
    assert message.rcpt_tos == ["two@dest.test"]   # the held one stays
    relay.wait_log(f"{second}: removed")
    # A delivery's "done" rides the next commit or waits up to 50 ms (spool.DONE_FLUSH_DELAY).
    wait_until(lambda: list(queue_states(relay)) == [first], what="only the held message on disk")

    released = cli(relay, "release", first)
    assert released.returncode == 0, released.stderr
    sink.wait(2)
    relay.wait_log(f"{first}: removed")

    third = send(relay, ["three@dest.test"], body=None)
    relay.wait_log(f"{third}: removed")  # delivered at once: the sink is up now
    fourth_sink_count = len(sink.messages)
    sink.behaviour.data_replies.extend(["451 4.3.0 later"])
    fourth = send(relay, ["four@dest.test"])
    relay.wait_log(f"{fourth}: deferred")
    deleted = cli(relay, "delete", fourth)
    assert deleted.returncode == 0 and f"{fourth}: removed" in deleted.stdout
    assert queue_states(relay) == {}
    assert len(sink.messages) == fourth_sink_count
    relay.wait_log("deleted by the administrator")

    unknown = cli(relay, "hold", "NOSUCHID")
    assert unknown.returncode == 1 and "no message NOSUCHID" in unknown.stderr
    relay.stop()
    down = cli(relay, "flush")
    assert down.returncode == 1 and "not running" in down.stderr


def test_queue_list_shows_a_deferred_messages_next_attempt_and_last_error(world: World) -> None:
    world.zone.a("dest.test", "127.0.0.2")
    world.sink("127.0.0.2", rcpt_reply_for={"bob@dest.test": "451 4.2.1 Mailbox full, try later"})
    relay = world.start(retry='["1h"]')
    qid = send(relay, ["bob@dest.test"])
    relay.wait_log(f"{qid}: deferred")
    wait_until(lambda: queue_states(relay).get(qid) is not None
               and queue_states(relay)[qid].state == MessageState.DEFERRED, what="the deferred record")
    error = "host dest.test[127.0.0.2] said: 451 4.2.1 Mailbox full, try later (in reply to RCPT TO command)"
    for running in (True, False):    # it reads the spool: the same with the relay stopped
        listing = cli(relay, "list")
        assert listing.returncode == 0, listing.stderr
        lines = listing.stdout.splitlines()
        [at] = [i for i, line in enumerate(lines) if line.startswith(qid)]
        assert re.fullmatch(rf"{qid} +deferred +\d+ +\d+s  <{SENDER}> -> bob@dest\.test", lines[at]), lines[at]
        detail = re.fullmatch(r" +next attempt in (\d+)s; attempts: 1; last error: (.+)", lines[at + 1])
        assert detail is not None, listing.stdout
        assert 3500 < int(detail[1]) <= 3600 and detail[2] == error
        assert lines[-1] == "-- 1 message(s)"
        if running:
            relay.stop()


def test_control_socket_is_private_and_guards_the_spool(world: World) -> None:
    relay = world.start()
    sock = relay.spool_dir / "control.sock"
    assert sock.stat().st_mode & 0o777 == 0o600
    # A second relay on the same spool stops before touching it.
    second = subprocess.run([sys.executable, "-m", "fastrelay", "serve", "--config", str(relay.config_path)],
                            capture_output=True, text=True, timeout=30, check=False)
    assert second.returncode == 1
    assert "another fastrelay is running on this spool" in second.stderr
    assert relay.proc is not None and relay.proc.poll() is None
    relay.stop()
    assert not sock.exists()


# --- the pre-delivery stage (in process: the hook is a Python callable) --------------------------


def test_pre_delivery_hook_holds_a_message_before_any_attempt(tmp_path: Path) -> None:
    """The content-scanning stage: HOLD keeps the message from every next hop until released.

    The hook is Python code, so this test drives a QueueManager in process,
    with a real spool on disk, a real DNS server and a real sink.
    """
    import asyncio

    from fastrelay.config import Config, DeliveryConfig, ServerConfig
    from fastrelay.delivery import DELIVER, QueueManager, Verdict, VerdictAction
    from fastrelay.spool import Envelope, Location, QueueIdGenerator

    dns = TestDns().start()
    dns.zone.a("dest.test", "127.0.0.2")
    port = free_port()
    sink = Sink("127.0.0.2", port).start()
    config = Config(server=ServerConfig(hostname="relay.example.test"),
                    delivery=DeliveryConfig(nameservers=[dns.address], mx_port=port, retry_schedule=["1s"]))
    spool = Spool(tmp_path / "spool")
    spool.recover()
    scanned: list[str] = []

    async def scanner(envelope: Envelope, location: Location) -> Verdict:
        scanned.append(envelope.queue_id)
        body = spool.read_body(location)
        if b"flaky" in body and scanned.count(envelope.queue_id) == 1:
            raise RuntimeError("scanner unavailable")   # asked again after retry_schedule[0]
        if b"Subject: spam" in body:
            return Verdict(VerdictAction.HOLD, "spam score 12.5")
        return DELIVER

    async def until(predicate: Callable[[], bool]) -> None:
        for _ in range(200):
            if predicate():
                return
            await asyncio.sleep(0.05)
        raise AssertionError("timed out")

    def on_disk(qid: str) -> MessageState | None:
        states = {m.envelope.queue_id: m.state.state for m in Spool(tmp_path / "spool").scan()}
        return states.get(qid)

    async def scenario() -> None:
        spool.start(asyncio.get_running_loop())
        ids = QueueIdGenerator()
        manager = QueueManager(config, spool, ids, pre_delivery=scanner)
        manager.start([])

        async def queue(subject: str) -> str:
            qid = ids.next()
            envelope = Envelope(qid, time.time(), "127.0.0.1", "mail.example.com", SENDER, ["bob@dest.test"])
            location = await spool.append_message(envelope, (f"Subject: {subject}\r\n\r\nbody\r\n".encode(),))
            assert location is not None
            manager.on_queued(envelope, location)
            return qid

        spam, ham, flaky = await queue("spam"), await queue("ham"), await queue("flaky")
        await until(lambda: len(sink.messages) == 2 and on_disk(spam) == MessageState.HOLD)
        assert sorted(m.content.split(b"\r\n")[0] for m in sink.messages) == [b"Subject: flaky", b"Subject: ham"]
        assert scanned.count(flaky) == 2 and scanned.count(ham) == 1
        assert manager.release(spam) == f"{spam}: released"
        await until(lambda: len(sink.messages) == 3 and on_disk(spam) is None)
        assert scanned.count(spam) == 1     # a released message is not scanned again
        await manager.stop(5)
        spool.close()

    try:
        asyncio.run(asyncio.wait_for(scenario(), 30))
    finally:
        sink.stop()
        dns.stop()
    assert sink.messages[-1].content.startswith(b"Subject: spam")


def test_a_long_deferred_message_is_copied_forward_and_the_segments_it_kept_go(tmp_path: Path) -> None:
    """Segments are deleted oldest first, so one deferred message would keep every later
    segment on disk for up to max_queue_lifetime.  Compaction copies it forward (message,
    then its state); the old segments go, and after a restart the message is still there,
    byte for byte, with its attempts and last error.  In process, with a real spool (small
    segments), DNS server and sink."""
    import asyncio

    from fastrelay import delivery
    from fastrelay.config import Config, DeliveryConfig, ServerConfig
    from fastrelay.delivery import QueueManager
    from fastrelay.spool import Envelope, QueueIdGenerator

    dns = TestDns().start()
    dns.zone.a("dest.test", "127.0.0.2")
    port = free_port()
    sink = Sink("127.0.0.2", port, rcpt_reply_for={"stuck@dest.test": "451 4.3.0 Try again later"}).start()
    config = Config(server=ServerConfig(hostname="relay.example.test"),
                    delivery=DeliveryConfig(nameservers=[dns.address], mx_port=port, retry_schedule=["1h"]))
    directory = tmp_path / "spool"
    spool = Spool(directory, segment_bytes=16 * 1024)
    spool.recover()
    stuck_body = b"Subject: stuck\r\n\r\n" + (b"0123456789abcdef" * 4 + b"\r\n") * 64

    def segments() -> list[int]:
        return sorted(int(p.stem) for p in (directory / "segments").glob("*.log"))

    def on_disk() -> dict[str, Any]:
        return {m.envelope.queue_id: m for m in Spool(directory).scan()}

    async def until(predicate: Callable[[], bool]) -> None:
        for _ in range(300):
            if predicate():
                return
            await asyncio.sleep(0.05)
        raise AssertionError("timed out")

    async def scenario() -> str:
        spool.start(asyncio.get_running_loop())
        ids = QueueIdGenerator()
        manager = QueueManager(config, spool, ids)
        manager.start([])

        async def queue(rcpt: str, body: bytes) -> str:
            envelope = Envelope(ids.next(), time.time(), "127.0.0.1", "mail.example.com", SENDER, [rcpt])
            location = await spool.append_message(envelope, (body,))
            assert location is not None
            manager.on_queued(envelope, location)
            return envelope.queue_id

        stuck = await queue("stuck@dest.test", stuck_body)
        await until(lambda: stuck in on_disk() and on_disk()[stuck].state.attempts == 1)
        first = manager.entries[stuck].location.segment
        for i in range(20):
            await queue("ok@dest.test", f"Subject: {i}\r\n\r\n".encode() + (b"x" * 78 + b"\r\n") * 50)
        await until(lambda: len(sink.messages) == 20 and set(on_disk()) == {stuck})
        kept = segments()
        assert kept[0] == first and len(kept) >= 4, kept      # every later segment is kept

        assert await manager.compact() == 0                    # the oldest segment is too young
        manager.compact_age = 0
        assert await manager.compact() == 1
        assert manager.entries[stuck].location.segment == kept[-1]
        assert segments() == [kept[-1]]                        # the rest is gone
        assert await manager.compact() == 0
        # A head segment that is mostly live is left alone: copying it would free little.
        more = [await queue("stuck@dest.test", stuck_body) for _ in range(8)]
        await until(lambda: all(q in on_disk() and on_disk()[q].state.attempts == 1 for q in more))
        assert len(segments()) >= 3 and await manager.compact() == 0
        share, delivery.COMPACT_LIVE_SHARE = delivery.COMPACT_LIVE_SHARE, 1.0
        try:
            assert await manager.compact() > 0                 # it was the share that held it back
        finally:
            delivery.COMPACT_LIVE_SHARE = share
        await manager.stop(5)
        spool.close()
        return stuck

    try:
        stuck = asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        sink.stop()
        dns.stop()
    again = Spool(directory)
    message = next(m for m in again.recover() if m.envelope.queue_id == stuck)
    assert message.state.state == MessageState.DEFERRED and message.state.attempts == 1
    assert "451 4.3.0 Try again later" in message.state.last_error
    assert again.read_body(message) == stuck_body


def test_suspensions_of_destinations_never_asked_for_again_do_not_pile_up() -> None:
    """A spam run to a hundred thousand dead domains suspends each once; none is asked
    for again.  The table keeps about what is still suspended, not every domain seen."""
    result = deferred("connect to mx.dead.test: Connection refused", "4.4.1")
    table = Suspensions()
    largest = 0
    for i in range(100_000):
        now = i * 0.01                               # 100 new dead domains a second
        table.add(f"dead{i}.test", now + 60.0, result, now)
        largest = max(largest, len(table))
    assert largest < 2 * 60 * 100 + SUSPENSIONS_SWEEP_MIN     # about 60 s worth of domains, not 100,000
    now = 100_000 * 0.01
    assert table.get(f"dead{99_999}.test", now) == result     # still suspended
    assert table.get("dead0.test", now) is None               # long expired
    before = len(table)
    assert table.get(f"dead{99_000}.test", now + 61.0) is None and len(table) == before - 1
