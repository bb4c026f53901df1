"""The whole per-RCPT quota decision, from Python, on the local backend.

Run: .venv/bin/pytest bench/test_bench_quota.py --benchmark-only
Target (issue 4): under 2 µs per decision, flat in user count and history.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fastrelay.config import load_config
from fastrelay.policy import Directory, RelayPolicy, SessionFacts
from fastrelay.quota import QuotaBook


class StepClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _setup(tmp_path: Path, users: int, history: int) -> tuple[QuotaBook, object]:
    lines = ['[server]\nhostname = "relay.example.test"\nlisten = ["127.0.0.1:2525"]\n',
             '[[accounts]]\nname = "example"\ndomains = ["example.com"]\n',
             '[[accounts.rules]]\nname = "lo"\nallowed_senders = "my_domains"\nonly_allowed_ips = true\n'
             'ips = [ { range = "127.0.0.0/24" } ]\n']
    lines += [f'[[accounts.users]]\naddress = "u{i}@example.com"\n' for i in range(users)]
    lines.append("[limits.active]\nuser_messages_per_day = 100000000\nuser_unique_recipients_per_day = 100000000\n"
                 "org_recipients_per_day = 1000000000\norg_recipients_per_10min = 1000000000\n")
    cfg = tmp_path / "relay.toml"
    cfg.write_text("".join(lines))
    config = load_config(cfg)
    clock = StepClock()
    book = QuotaBook(config, clock=clock)  # type: ignore[arg-type]
    policy = RelayPolicy(Directory(config))
    # History: every user has sent; the benchmarked user has `history` messages behind it.
    for i in range(users):
        d = policy.decide(SessionFacts("127.0.0.1", "c.example.com", False, None), f"u{i}@example.com")
        rcpts: list[str] = []
        txn = book.begin(d, rcpts)
        rcpts.append(f"r{i}@x.net")
        book.reserve(txn)
    d = policy.decide(SessionFacts("127.0.0.1", "c.example.com", False, None), "u0@example.com")
    for j in range(history):
        clock.now += 0.5
        rcpts = [f"h{j}@x.net"]
        book.reserve(book.begin(d, rcpts))
    return book, d


@pytest.mark.parametrize("users,history", [(1, 1000), (1000, 1000), (100_000, 1000), (1000, 10_000)])
def test_per_rcpt_decision(benchmark, tmp_path: Path, users: int, history: int) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = "quota: per-RCPT decision"
    book, decision = _setup(tmp_path, users, history)
    recipients: list[str] = ["already@x.net"]
    txn = book.begin(decision, recipients)  # type: ignore[arg-type]

    def check() -> bytes | None:
        # A fresh recipient each time: the unique-recipient window is consulted too.
        txn.new_unique.clear()
        return book.check_recipient(txn, "new@x.net")

    assert check() is None
    benchmark.pedantic(check, rounds=20, iterations=5000, warmup_rounds=2)
