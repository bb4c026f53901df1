"""`fastrelay status` against a running relay, over its control socket."""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys
import time

from conftest import RawClient, RelayProcess


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


def test_status_shows_the_content_held_in_memory(relay_factory) -> None:  # type: ignore[no-untyped-def]
    relay = relay_factory(server_extra="max_data_memory = 67108864")
    client = RawClient(relay.port)
    try:
        client.cmd(b"EHLO client.example.com")
        client.send(b"MAIL FROM:<bob@example.com>\r\nRCPT TO:<carol@dest.test>\r\nDATA\r\n")
        assert [client.reply()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
        client.send(b"Subject: half\r\n\r\n" + b"y" * 998 + b"\r\n")   # 1,017 bytes, no final dot yet
        deadline = time.monotonic() + 10
        while True:
            answer = json.loads(status(relay, "--json").stdout)
            if answer["data_memory"]["held"] == 1017 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert answer["data_memory"] == {"held": 1017, "limit": 64 << 20}
        assert "message content in memory: 0.0 MiB of 64 MiB (max_data_memory)" in status(relay).stdout
        assert client.cmd(b".")[:3] == b"250"
        assert json.loads(status(relay, "--json").stdout)["data_memory"]["held"] == 0
    finally:
        client.close()


def test_status_when_the_relay_is_not_running(relay_factory) -> None:  # type: ignore[no-untyped-def]
    relay = relay_factory(start=False)
    done = status(relay)
    assert done.returncode == 1
    assert "not running" in done.stderr
