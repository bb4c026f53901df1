"""Observability (issue 8): the Prometheus endpoint and the JSON Lines event log.

A real relay takes real traffic (accepted mail, policy refusals, a quota
refusal, a failed AUTH, a connection over the per-IP limit) while a real
HTTP client scrapes it; the counters must match what was sent and refused.
"""

from __future__ import annotations

import json
import smtplib
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ALICE_PASSWORD, DEFAULT_ACCOUNTS, RelayProcess, free_port, write_config
from prometheus_client.parser import text_string_to_metric_families

HELO = "mail.example.com"
ACCEPTED = 5


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        assert answer.status == 200
        text = answer.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory, certs: object, alice_hash: str
             ) -> Iterator[tuple[RelayProcess, int, list[str], list[dict[str, float]]]]:
    """A relay with metrics, events and the archive on, after known traffic; and scrapes taken during it."""
    directory = tmp_path_factory.mktemp("metrics-relay")
    port, tls_port, metrics_port = free_port(), free_port(), free_port()
    config = write_config(directory, certs, port, tls_port,  # type: ignore[arg-type]
                          accounts=DEFAULT_ACCOUNTS.replace("{alice_hash}", alice_hash),
                          server_extra="max_connections_per_ip = 3",
                          extra=f"""
                              [limits.active]
                              recipients_per_transaction = 2
                              [archive]
                              enabled = true
                              [metrics]
                              listen = "127.0.0.1:{metrics_port}"
                              """)
    config.write_text(config.read_text().replace('[logging]\n', '[logging]\nevents_file = "events.jsonl"\n'))
    relay = RelayProcess(directory, port, tls_port, certs, config)  # type: ignore[arg-type]
    relay.start()
    try:
        yield from _traffic(relay, port, metrics_port, certs)
    finally:
        relay.stop()


def _traffic(relay: RelayProcess, port: int, metrics_port: int, certs: object
             ) -> Iterator[tuple[RelayProcess, int, list[str], list[dict[str, float]]]]:
    during: list[dict[str, float]] = []
    stop = threading.Event()

    def scraper() -> None:
        while not stop.is_set():
            s = scrape(metrics_port)
            during.append({"messages": value(s, "fastrelay_smtpd_messages_accepted_total")})
            time.sleep(0.02)

    thread = threading.Thread(target=scraper)
    thread.start()
    ids = []
    try:
        with smtplib.SMTP("127.0.0.1", port, local_hostname=HELO, timeout=15) as client:
            client.ehlo()
            for i in range(ACCEPTED):
                code, text = client.mail("alice@example.com")
                assert code == 250
                assert client.rcpt("a@dest.test")[0] == 250
                assert client.rcpt("b@dest.test")[0] == 250
                if i == 0:   # a third recipient is over recipients_per_transaction
                    assert client.rcpt("c@dest.test")[0] == 452
                code, text = client.data(f"Subject: m{i}\r\n\r\nbody\r\n".encode())
                assert code == 250, text
                ids.append(text.decode().rsplit(" ", 1)[-1])
            for _ in range(3):  # a sender outside the account's domains
                assert client.mail("mallory@evil.test")[0] == 550
        with smtplib.SMTP("127.0.0.1", port, local_hostname=HELO, timeout=15) as client:
            client.starttls(context=certs.client_context())  # type: ignore[attr-defined]
            client.ehlo(HELO)
            client.user, client.password = "alice@example.com", ALICE_PASSWORD + "-wrong"
            with pytest.raises(smtplib.SMTPAuthenticationError):
                client.auth("PLAIN", client.auth_plain)   # one attempt (login() would try LOGIN too)
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        for s in idle:
            assert s.recv(100).startswith(b"220 ")
        with socket.create_connection(("127.0.0.1", port)) as refused:
            assert refused.recv(100).startswith(b"421 4.7.0")
        for s in idle:
            s.close()
    finally:
        stop.set()
        thread.join()
    yield relay, metrics_port, ids, during


def test_counters_match_what_was_sent_and_refused(
        observed: tuple[RelayProcess, int, list[str], list[dict[str, float]]]) -> None:
    _, metrics_port, _, during = observed
    deadline = time.monotonic() + 10
    while True:
        s = scrape(metrics_port)
        if value(s, "fastrelay_archive_messages_total", result="archived") == ACCEPTED \
                and value(s, "fastrelay_smtpd_connections_open") == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    # Scrapes during the traffic all answered, and never went backwards.
    seen = [d["messages"] for d in during]
    assert len(seen) >= 2 and seen == sorted(seen)
    assert value(s, "fastrelay_smtpd_messages_accepted_total") == ACCEPTED
    assert value(s, "fastrelay_smtpd_recipients_accepted_total") == 2 * ACCEPTED
    # The harness's readiness probe, two SMTP sessions, three idle connections (the fourth was refused).
    assert value(s, "fastrelay_smtpd_connections_total") == 1 + 2 + 3
    assert value(s, "fastrelay_smtpd_connections_refused_total", reason="max_connections_per_ip") == 1
    assert value(s, "fastrelay_smtpd_refusals_total", stage="CONNECT", code="421", dsn="4.7.0") == 1
    assert value(s, "fastrelay_smtpd_refusals_total", stage="MAIL", code="550", dsn="5.7.1") == 3
    assert value(s, "fastrelay_smtpd_refusals_total", stage="RCPT", code="452", dsn="4.5.3") == 1
    assert value(s, "fastrelay_smtpd_refusals_total", stage="AUTH", code="535", dsn="5.7.8") == 1
    assert value(s, "fastrelay_smtpd_auth_failures_total") == 1
    assert value(s, "fastrelay_quota_refusals_total", limit="recipients_per_transaction") == 1
    assert value(s, "fastrelay_queue_messages", state="incoming") == ACCEPTED    # delivery is off
    assert value(s, "fastrelay_queue_oldest_message_age_seconds", state="incoming") > 0
    assert value(s, "fastrelay_archive_messages_total", result="archived") == ACCEPTED
    assert value(s, "fastrelay_archive_pending") == 0
    assert value(s, "fastrelay_spool_write_failing") == 0
    assert value(s, "process_resident_memory_bytes") > 0
    # Delivery is off here: nothing was scanned yet.
    assert ("fastrelay_scanner_verdicts_total", (("verdict", "clean"),)) in s
    assert value(s, "fastrelay_scanner_verdicts_total", verdict="clean") == 0
    # Delivery is off: the delay histogram is there, with nothing observed.
    assert value(s, "fastrelay_delivery_delay_seconds_count") == 0


def test_event_log_has_each_reception_refusal_and_quota_event(
        observed: tuple[RelayProcess, int, list[str], list[dict[str, float]]]) -> None:
    relay, _, ids, _ = observed
    path: Path = relay.directory / "events.jsonl"
    deadline = time.monotonic() + 10
    while True:   # written at least once a second
        events = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        if sum(e["kind"] == "refusal" for e in events) >= 6 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    receptions = [e for e in events if e["kind"] == "reception"]
    assert [e["queue_id"] for e in receptions] == ids
    assert receptions[0]["recipients"] == ["a@dest.test", "b@dest.test"]
    assert (receptions[0]["sender"], receptions[0]["client_ip"], receptions[0]["rule"]) == \
        ("alice@example.com", "127.0.0.1", "loopback")
    assert receptions[0]["time"].endswith("Z")
    refusals = [(e["stage"], e["code"], e["dsn"]) for e in events if e["kind"] == "refusal"]
    assert sorted(refusals) == sorted([("RCPT", 452, "4.5.3"), ("AUTH", 535, "5.7.8"), ("CONNECT", 421, "4.7.0")]
                                      + [("MAIL", 550, "5.7.1")] * 3)
    mail_refusal = next(e for e in events if e["kind"] == "refusal" and e["stage"] == "MAIL")
    assert "mallory@evil.test" in mail_refusal["command"]
    [quota] = [e for e in events if e["kind"] == "quota"]
    assert (quota["limit"], quota["account"], quota["maximum"]) == ("recipients_per_transaction", "example", 2)


def _threads(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("Threads:")[1].split()[0])


def test_idle_and_junk_connections_to_the_metrics_port_cost_no_thread(
        observed: tuple[RelayProcess, int, list[str], list[dict[str, float]]]) -> None:
    """prometheus_client's own server gave each connection a thread with no timeout (2,000 idle
    connections: 2,000 threads, +52 MiB).  Here they cost no thread, a scrape still answers,
    junk gets 404/405 or is dropped, and the idle ones are closed after the request timeout."""
    relay, metrics_port, _, _ = observed
    assert relay.proc is not None
    threads = _threads(relay.proc.pid)
    idle = [socket.create_connection(("127.0.0.1", metrics_port)) for _ in range(200)]
    try:
        for s in idle[:100]:
            s.sendall(b"GET /metrics HTTP/1.1\r\n")           # a request that never ends
        time.sleep(0.5)
        assert _threads(relay.proc.pid) <= threads + 2         # the executor may add one for the scrape
        assert "fastrelay_smtpd_connections_total" in str(scrape(metrics_port))
        for request, status in ((b"POST /metrics HTTP/1.0\r\n\r\n", b"405"), (b"GET /x HTTP/1.0\r\n\r\n", b"404"),
                                (b"GET /" + b"a" * 10000 + b" HTTP/1.0\r\n\r\n", b"")):
            with socket.create_connection(("127.0.0.1", metrics_port), timeout=10) as junk:
                junk.sendall(request)
                answer = junk.recv(100)
                assert answer[9:12] == status, answer
        idle[0].settimeout(10)
        assert idle[0].recv(1) == b""                          # closed by the relay after REQUEST_TIMEOUT
    finally:
        for s in idle:
            s.close()
    assert relay.proc.poll() is None
