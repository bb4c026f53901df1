"""``fastrelay bench`` (fastrelay/loadgen.py) against a real relay: what it says it sent is in the spool.

No timing assertions: only that every message landed and that the printed
counts (sent, failed, connections, errors) are the truth.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

import pytest
from conftest import ALICE_PASSWORD, HOSTNAME, RelayProcess

from fastrelay.loadgen import LostConnection, ReplyBuffer, build_content


def bench(relay: RelayProcess, port: int, *args: str, json_out: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "fastrelay", "bench", f"127.0.0.1:{port}", "--timeout", "60", *args]
    if json_out:
        argv.append("--json")
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def result_of(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


CASES = {
    # name: (extra arguments, use the implicit TLS port, messages, sessions)
    "plain-new": (["--messages-per-connection", "1"], False, 200, 10),
    "plain-reuse-pipelining": (["--messages-per-connection", "0", "--pipelining", "--recipients", "3"], False, 300, 10),
    "starttls-reuse": (["--starttls", "--messages-per-connection", "25"], False, 200, 8),
    "implicit-tls-new-pipelining": (["--tls", "--messages-per-connection", "1", "--pipelining"], True, 100, 10),
    "starttls-auth-pipelining": (["--starttls", "--auth", f"alice@example.com:{ALICE_PASSWORD}",
                                  "--from", "alice@example.com", "--messages-per-connection", "50",
                                  "--pipelining"], False, 200, 4),
    "tls-auth-new": (["--tls", "--auth", f"alice@example.com:{ALICE_PASSWORD}",
                      "--from", "alice@example.com", "--messages-per-connection", "1"], True, 60, 6),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bench_messages_land_in_the_spool(relay: RelayProcess, case: str) -> None:
    extra, implicit, count, sessions = CASES[case]
    port = relay.tls_port if implicit else relay.port
    tls_args = ["--cafile", str(relay.certs.ca_file), "--server-name", HOSTNAME] if "--tls" in extra or "--starttls" in extra else []
    r = result_of(bench(relay, port, "--count", str(count), "--sessions", str(sessions), "--size", "1500",
                        *extra, *tls_args))
    assert r["sent"] == count
    assert r["failed"] == 0 and r["unfinished"] == 0 and r["errors"] == {}
    per_connection = int(extra[extra.index("--messages-per-connection") + 1])
    if per_connection == 1:
        assert r["connections"] == count
    elif per_connection == 0:
        assert r["connections"] == sessions
    else:
        # Each session takes messages as they come: at least ceil(count / per) connections.
        assert -(-count // per_connection) <= r["connections"] <= -(-count // per_connection) + sessions
    assert r["latency_ms"]["count"] == count and r["latency_ms"]["p50"] > 0
    queued = relay.queued()
    assert len(queued) == count
    recipients = int(extra[extra.index("--recipients") + 1]) if "--recipients" in extra else 1
    sender = "alice@example.com" if "--auth" in extra else "from@example.com"
    for envelope, body in queued:
        assert envelope.sender == sender  # type: ignore[attr-defined]
        assert len(envelope.recipients) == recipients  # type: ignore[attr-defined]
        assert body.endswith(b"X" * 10 + b"\r\n")
    if "--auth" in extra:
        assert all(env.auth_user == "alice@example.com" for env, _ in queued)  # type: ignore[attr-defined]


def test_bench_text_output_and_refusals(relay: RelayProcess) -> None:
    """A sender the relay refuses: every message fails with the reply code counted, nothing lands."""
    proc = bench(relay, relay.port, "--count", "30", "--sessions", "3", "--messages-per-connection", "0",
                 "--from", "someone@elsewhere.example", json_out=False)
    assert proc.returncode == 1
    assert "sent 0 messages" in proc.stdout
    assert "failed 30, unfinished 0, connections opened 3" in proc.stdout
    assert "MAIL 5" in proc.stdout  # e.g. "MAIL 550: 30"
    assert relay.queued() == []


def test_bench_duration_and_rate(relay: RelayProcess) -> None:
    """Open loop at 100 msgs/s for 1 s: about 100 messages, each one in the spool."""
    r = result_of(bench(relay, relay.port, "--duration", "1", "--rate", "100", "--sessions", "5",
                        "--messages-per-connection", "0"))
    assert 90 <= r["sent"] <= 101 and r["offered_rate"] == 100
    assert r["connections"] == 5   # the pool connects before the first message is due
    assert len(relay.queued()) == r["sent"]


def test_bench_refuses_bad_options_and_remote_targets() -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fastrelay", "bench", *args],
                              capture_output=True, text=True, timeout=30, check=False)

    assert "--count" in run("127.0.0.1:25").stderr
    assert "loopback" in run("192.0.2.1:25", "--count", "1").stderr
    assert "inside TLS" in run("127.0.0.1:25", "--count", "1", "--auth", "a:b").stderr


def test_reply_buffer_cuts_replies_split_at_every_offset() -> None:
    stream = b"220 hi\r\n250-relay\r\n250-PIPELINING\r\n250 SIZE 10\r\n451 4.3.0 later\r\n354 go\r\n"

    async def feed(cut: int) -> tuple[list[int], list[bytes]]:
        proto = ReplyBuffer(asyncio.get_running_loop())
        proto.keep_text = False
        fut = proto.expect(3)
        proto.data_received(stream[:cut])
        proto.data_received(stream[cut:])
        codes = await fut
        return codes + await proto.expect(1), proto.take_texts()

    for cut in range(len(stream) + 1):
        codes, texts = asyncio.run(feed(cut))
        assert codes == [220, 250, 451, 354], cut
        assert texts == [b"4.3.0 later"], cut


def test_reply_buffer_malformed_reply_fails_the_waiter() -> None:
    async def go() -> None:
        proto = ReplyBuffer(asyncio.get_running_loop())
        fut = proto.expect(1)
        proto.data_received(b"hello there\r\n")
        with pytest.raises(LostConnection):
            await fut

    asyncio.run(go())


def test_build_content_has_the_asked_size() -> None:
    head_len = len(build_content(0, "a@example.com", "b@example.net", "h.example")) - 3
    for size in (0, 100, head_len + 1, head_len + 2, head_len + 3, 1024, 1025, 1026, 100_000):
        content = build_content(size, "a@example.com", "b@example.net", "h.example")
        assert content.endswith(b"\r\n.\r\n")
        body = content[:-3]
        assert len(body) == (head_len if size < head_len else size if size != head_len + 1 else head_len), size
        assert b"\r\n." not in body
        assert max(len(line) for line in body.split(b"\r\n")) <= 78
