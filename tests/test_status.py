"""`fastrelay status` against a running relay, over its control socket."""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys

from conftest import RelayProcess


def status(relay: RelayProcess, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastrelay", "status", "--config", str(relay.config_path), *extra],
                          capture_output=True, text=True, timeout=30)


def test_status_of_a_running_relay(relay: RelayProcess) -> None:
    with smtplib.SMTP("127.0.0.1", relay.port) as s:
        s.ehlo("client.example.com")
        for i in range(3):
            assert s.sendmail("alice@example.com", [f"r{i}@x.net", f"q{i}@x.net"], b"Subject: s\r\n\r\nhi\r\n") == {}
        done = status(relay, "--json")
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        assert answer["accepted"] == {"messages": 3, "recipients": 6}
        assert answer["connections"]["open"] == 1          # this one
        assert answer["queue"]["total"] == 3                 # delivery is off in the default test config
        assert answer["queue"]["states"] == {"incoming": 3}
        [top] = answer["top_senders"]                        # alice is a registered user
        assert (top["user"], top["messages"], top["messages_limit"], top["unique_recipients"]) == \
               ("alice@example.com", 3, 10_000, 6)
    text = status(relay)
    assert text.returncode == 0
    assert "accepted: 3 messages, 6 recipients" in text.stdout
    assert "queue: incoming 3 (total 3" in text.stdout
    assert "alice@example.com" in text.stdout and "3/10000 messages" in text.stdout


def test_status_when_the_relay_is_not_running(relay_factory) -> None:  # type: ignore[no-untyped-def]
    relay = relay_factory(start=False)
    done = status(relay)
    assert done.returncode == 1
    assert "not running" in done.stderr
