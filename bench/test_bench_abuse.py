"""The builtin scanner's cost per message, in process (no I/O): scanned messages per second per core.

Run: .venv/bin/pytest bench/test_bench_abuse.py --benchmark-only
The end-to-end figure (accept throughput with and without scanning) is
bench/e2e_abuse.py.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fastrelay.abuse import AbuseDesk
from fastrelay.config import load_config
from fastrelay.policy import Directory
from fastrelay.scanners import content_signals
from fastrelay.spool import Envelope, QueueIdGenerator, Spool

SENDER = "alice@example.com"


def _message(size: int, attachment: bool = False) -> bytes:
    head = (f"Received: from mail.example.com ([127.0.0.1]) by relay.example.test with ESMTP id Q1;\r\n"
            f"\tThu, 27 Nov 2025 10:00:00 +0000\r\nFrom: Alice <{SENDER}>\r\nTo: bob@dest.test\r\n"
            "Subject: quarterly numbers\r\nDate: Thu, 27 Nov 2025 10:00:00 +0000\r\n"
            "Message-ID: <q1@example.com>\r\nMIME-Version: 1.0\r\n")
    text = b"Hello Bob, the numbers are at https://intranet.example.com/q3 as promised.\r\n"
    text += (b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n"
             * (size // 64 + 1))[:size - len(text)]
    if not attachment:
        return head.encode() + b"Content-Type: text/plain\r\n\r\n" + text
    blob = base64.encodebytes(bytes(range(256)) * (size // 256 + 1)).replace(b"\n", b"\r\n")
    b = "----=_Part_4321_1234567890.1700000000000"   # as mail clients make them
    return (head + f'Content-Type: multipart/mixed; boundary="{b}"\r\n\r\n--{b}\r\nContent-Type: text/plain\r\n\r\n'
            ).encode() + text + (f'\r\n--{b}\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; '
                                 f'filename="q3.pdf"\r\nContent-Transfer-Encoding: base64\r\n\r\n').encode() \
        + blob + f"--{b}--\r\n".encode()


@pytest.mark.benchmark(group="builtin scan")
@pytest.mark.parametrize(("size", "attachment"), [(1024, False), (100 * 1024, True)],
                         ids=["1k-text", "100k-attachment"])
def test_content_signals(benchmark: Any, size: int, attachment: bool) -> None:
    env = Envelope("Q1", time.time(), "127.0.0.1", "mail.example.com", SENDER, ["bob@dest.test"])
    body = _message(size, attachment)
    facts = benchmark(content_signals, env, body, ("example.com",))
    assert facts.signals == [] and facts.virus == ""


@pytest.mark.benchmark(group="builtin scan")
def test_whole_builtin_verdict_with_history(benchmark: Any, tmp_path: Path) -> None:
    """content_signals + the per-sender signals + counting: the hook minus the spool read."""
    import asyncio

    cfg = tmp_path / "relay.toml"
    cfg.write_text('[[accounts]]\nname = "example"\ndomains = ["example.com"]\n'
                   '[[accounts.users]]\naddress = "alice@example.com"\n'
                   '[[accounts.rules]]\nname = "lo"\nallowed_senders = "my_domains"\nonly_allowed_ips = true\n'
                   'ips = [ { range = "127.0.0.0/24" } ]\n'
                   f'[abuse]\nstate_dir = "{tmp_path / "abuse"}"\n')
    config = load_config(cfg)
    body = _message(1024)

    async def setup() -> tuple[AbuseDesk, Callable[[], object]]:
        desk = AbuseDesk(config, Spool(tmp_path / "spool"), QueueIdGenerator(), Directory(config))
        env = Envelope("Q1", time.time(), "127.0.0.1", "mail.example.com", SENDER, ["bob@dest.test"],
                       account="example")
        track = desk._track_for(env)

        def one() -> object:
            facts = content_signals(env, body, ("example.com",))
            result = desk._builtin_result(facts.signals, facts.virus, env, track)
            assert track is not None
            desk._count(track, env, result.verdict, facts.subject, time.time())
            return result
        return desk, one

    _, one = asyncio.run(setup())
    result = benchmark(one)
    assert result.verdict == "clean"


@pytest.mark.benchmark(group="builtin scan")
def test_pre_delivery_hook_builtin(benchmark: Any, tmp_path: Path) -> None:
    """The whole check on a spooled 1 KiB message: read, scan, count, verdict (what the event loop pays)."""
    import asyncio
    import itertools

    from fastrelay.spool import Location

    cfg = tmp_path / "relay.toml"
    cfg.write_text('[[accounts]]\nname = "example"\ndomains = ["example.com"]\n'
                   '[[accounts.rules]]\nname = "lo"\nallowed_senders = "my_domains"\nonly_allowed_ips = true\n'
                   'ips = [ { range = "127.0.0.0/24" } ]\n'
                   f'[abuse]\nstate_dir = "{tmp_path / "abuse"}"\n')
    config = load_config(cfg)
    body = _message(1024)
    ids = QueueIdGenerator()

    async def spool_some() -> list[tuple[Envelope, Location]]:
        spool = Spool(tmp_path / "spool")
        spool.recover()
        spool.start(asyncio.get_running_loop())
        out = []
        for _ in range(2000):
            env = Envelope(ids.next(), time.time(), "127.0.0.1", "mail.example.com", SENDER, ["bob@dest.test"],
                           account="example")
            location = await spool.append_message(env, (body,))
            assert location is not None
            out.append((env, location))
        spool.close()
        return out

    messages = asyncio.run(spool_some())
    desk = AbuseDesk(config, Spool(tmp_path / "spool"), ids, Directory(config))
    cycle = itertools.cycle(messages)

    def one() -> object:
        env, location = next(cycle)
        verdict = desk.pre_delivery_now(env, location)   # the builtin path answers at once
        assert verdict is not None, "the builtin-only check wanted to wait"
        return verdict

    verdict = benchmark(one)
    assert verdict.action.value == "deliver"
    desk.reader.close()
