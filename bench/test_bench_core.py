"""Micro benchmarks for fastrelay._core (not part of the default test run).

    .venv/bin/pytest bench/test_bench_core.py --benchmark-only

Every benchmark times a batch of operations and records the cost of one
operation in extra_info["ns_per_op"] (see --benchmark-json).  Batches drive
the call through map() into a zero-length deque, so the loop itself is C and
the time is the call; the `call-overhead` rows time the same loop around the
builtin id() to show what any METH_O call costs on this machine.

Groups:
  cidr-<n>-hit / cidr-<n>-miss   CidrSet vs pytricia vs an ipaddress loop
                                 (the loop only for 10 and 1,000 ranges)
  cidr-v6-100000-*               the same for IPv6 at 100,000 ranges
  ratewindow                     would_exceed + add, history 1x and 10x
  uniquewindow                   add + count, 1,000 and 10,000 live keys
"""

from __future__ import annotations

import ipaddress
import random
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import pytricia  # type: ignore[import-not-found]

from fastrelay._core import CidrSet, RateWindow, UniqueWindow

BATCH = 1000
SIZES = [10, 1_000, 100_000]
ROUNDS = 200


def per_op(benchmark: Any, run: Callable[[], object], ops: int, rounds: int = ROUNDS) -> None:
    benchmark.extra_info["ops_per_round"] = ops
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=5, iterations=1)
    benchmark.extra_info["ns_per_op"] = benchmark.stats.stats.mean / ops * 1e9


# ---------------------------------------------------------------------------
# CIDR lookup
# ---------------------------------------------------------------------------

def random_v4_ranges(n: int, rng: random.Random) -> list[tuple[str, int]]:
    # Prefixes /16 to /32, weighted to the /24-/32 an organisation lists.
    out = []
    for i in range(n):
        prefix = rng.choice([16, 20, 22, 24, 24, 26, 28, 29, 30, 32, 32, 32])
        base = rng.getrandbits(32) & ~((1 << (32 - prefix)) - 1) & 0xFFFFFFFF
        out.append((f"{ipaddress.IPv4Address(base)}/{prefix}", i))
    return out


def random_v6_ranges(n: int, rng: random.Random) -> list[tuple[str, int]]:
    out = []
    for i in range(n):
        prefix = rng.choice([112, 120, 124, 128, 128])
        base = (0x20010DB8 << 96) | rng.getrandbits(64) << 16
        base &= ~((1 << (128 - prefix)) - 1)
        out.append((f"{ipaddress.IPv6Address(base)}/{prefix}", i))
    return out


class Fixture:
    def __init__(self, ranges: list[tuple[str, int]], v6: bool, seed: int) -> None:
        rng = random.Random(seed)
        self.ranges = ranges
        self.cidr = CidrSet()
        self.tree = pytricia.PyTricia(128)
        for text, payload in ranges:
            self.cidr.add(text, payload)
            self.tree[text] = payload
        self.cidr.build()
        cls = ipaddress.IPv6Address if v6 else ipaddress.IPv4Address
        hits = []
        for _ in range(BATCH):
            net = ipaddress.ip_network(rng.choice(ranges)[0])
            offset = rng.randrange(net.num_addresses)
            hits.append(str(cls(int(net.network_address) + offset)))
        misses: list[str] = []
        while len(misses) < BATCH:
            if v6:
                candidate = str(cls((0x20010DB8 << 96) | rng.getrandbits(80)))
            else:
                candidate = str(cls(rng.getrandbits(32)))
            if self.tree.get(candidate) is None:
                misses.append(candidate)
        self.addresses = {"hit": hits, "miss": misses}
        for kind, addresses in self.addresses.items():
            for a in addresses:
                assert bool(self.cidr.lookup(a)) == (kind == "hit")
                assert (self.tree.get(a) is not None) == (kind == "hit")


_FIXTURES: dict[tuple[int, bool], Fixture] = {}


def fixture(n: int, v6: bool = False) -> Fixture:
    key = (n, v6)
    if key not in _FIXTURES:
        rng = random.Random(n * 7 + v6)
        ranges = random_v6_ranges(n, rng) if v6 else random_v4_ranges(n, rng)
        _FIXTURES[key] = Fixture(ranges, v6, seed=n)
    return _FIXTURES[key]


def batch(fn: Callable[[Any], object], addresses: Sequence[str]) -> Callable[[], object]:
    return lambda: deque(map(fn, addresses), 0)


@pytest.mark.parametrize("kind", ["hit", "miss"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("impl", ["fastrelay", "pytricia", "ipaddress-loop", "call-overhead"])
def test_cidr_lookup(benchmark: Any, impl: str, n: int, kind: str) -> None:
    benchmark.group = f"cidr-{n}-{kind}"
    fx = fixture(n)
    addresses = fx.addresses[kind]
    if impl == "fastrelay":
        per_op(benchmark, batch(fx.cidr.lookup, addresses), len(addresses))
    elif impl == "pytricia":
        per_op(benchmark, batch(fx.tree.get, addresses), len(addresses))
    elif impl == "call-overhead":
        per_op(benchmark, batch(id, addresses), len(addresses))
    else:
        if n > 1_000:
            pytest.skip("the plain loop is only measured up to 1,000 ranges")
        networks = [(ipaddress.ip_network(text), payload) for text, payload in fx.ranges]
        sample = addresses[:100]

        def loop() -> None:
            for a in sample:
                ip = ipaddress.ip_address(a)
                [payload for net, payload in networks if ip in net]

        per_op(benchmark, loop, len(sample), rounds=20 if n >= 1_000 else ROUNDS)


@pytest.mark.parametrize("kind", ["hit", "miss"])
@pytest.mark.parametrize("impl", ["fastrelay", "pytricia"])
def test_cidr_lookup_v6(benchmark: Any, impl: str, kind: str) -> None:
    benchmark.group = f"cidr-v6-100000-{kind}"
    fx = fixture(100_000, v6=True)
    fn = fx.cidr.lookup if impl == "fastrelay" else fx.tree.get
    per_op(benchmark, batch(fn, fx.addresses[kind]), BATCH)


# ---------------------------------------------------------------------------
# Rolling windows
# ---------------------------------------------------------------------------

SPAN = 86400.0


@pytest.mark.parametrize("history", [1_000, 10_000], ids=["history-1x", "history-10x"])
def test_ratewindow_would_exceed_add(benchmark: Any, history: int) -> None:
    # Steady state: events arrive every span / history seconds, so the
    # window always holds `history` events spread over all 288 buckets.
    benchmark.group = "ratewindow"
    window = RateWindow(SPAN, 288)
    dt = SPAN / history
    limit = history * 2
    clock = [0.0]

    def run() -> None:
        now = clock[0]
        would_exceed = window.would_exceed
        add = window.add
        for _ in range(BATCH):
            now += dt
            if not would_exceed(1, limit, now):
                add(1, now)
        clock[0] = now

    for _ in range(history // BATCH * 2 + 1):
        run()
    assert abs(window.total(clock[0]) - history) <= history // 100 + 10
    per_op(benchmark, run, BATCH)


@pytest.mark.parametrize("history", [1_000, 10_000], ids=["keys-1x", "keys-10x"])
def test_uniquewindow_add_count(benchmark: Any, history: int) -> None:
    # Steady state: a new recipient every span / history seconds from a pool
    # of 2 * history, so the window holds `history` keys and every add also
    # expires one.
    benchmark.group = "uniquewindow"
    window = UniqueWindow(SPAN)
    keys = [f"rcpt{i}@example.test" for i in range(2 * history)]
    dt = SPAN / history
    position = [0]

    def run() -> None:
        i = position[0]
        add = window.add
        count = window.count
        for j in range(i, i + BATCH):
            now = j * dt
            add(keys[j % len(keys)], now)
            count(now)
        position[0] = i + BATCH

    for _ in range(history // BATCH * 2 + 1):
        run()
    assert abs(window.count(position[0] * dt) - history) <= 1
    per_op(benchmark, run, BATCH)
