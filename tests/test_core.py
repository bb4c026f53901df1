"""Tests for fastrelay._core: CidrSet, RateWindow, UniqueWindow.

Every structure is checked against a slow, obviously correct model: Python's
ipaddress module for CidrSet, an event list for the two windows.  Property
tests drive random operation sequences (clock jumps forward and backward
included) and compare every answer; each step also runs the structure's own
invariant check.
"""

from __future__ import annotations

import ipaddress
import math
import os
import subprocess
import sys
import tracemalloc
from collections.abc import Iterable, Sequence

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastrelay._core import CidrSet, RateWindow, UniqueWindow, key_hash

PROPERTY = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------
# CidrSet: the ipaddress oracle
# ---------------------------------------------------------------------------

Spec = tuple[str, int, bool]   # (network text, payload, enabled)
AnyNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def oracle_network(text: str) -> AnyNetwork:
    """The network as the relay means it: IPv4-mapped IPv6 is IPv4."""
    net = ipaddress.ip_network(text)
    if isinstance(net, ipaddress.IPv6Network):
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, net.prefixlen - 96))
    return net


def oracle_lookup(specs: Sequence[Spec], address: object) -> tuple[int, ...]:
    return Oracle(specs).lookup(address)


class Oracle:
    """ipaddress's answer: payloads of enabled networks containing the address."""

    def __init__(self, specs: Sequence[Spec]) -> None:
        self.networks = [(oracle_network(text), payload) for text, payload, enabled in specs
                         if enabled]

    def lookup(self, address: object) -> tuple[int, ...]:
        if not isinstance(address, (str, bytes)):
            return ()   # the transport never gives anything else
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return ()
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return tuple(sorted({payload for net, payload in self.networks if ip in net}))


def built(specs: Iterable[Spec]) -> CidrSet:
    cs = CidrSet()
    for text, payload, enabled in specs:
        cs.add(text, payload, enabled)
    cs.build()
    cs._check_invariants()
    return cs


def renderings(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[str | bytes]:
    """The ways a transport may hand us the same address."""
    out: list[str | bytes] = [str(ip), ip.packed]
    if isinstance(ip, ipaddress.IPv4Address):
        mapped = ipaddress.IPv6Address(0xFFFF00000000 | int(ip))
        out += [f"::ffff:{ip}", str(mapped), mapped.packed, f"::FFFF:{ip}"]
    else:
        out += [ip.exploded, str(ip).upper(), f"{ip}%eth0"]
    return out


# ---------------------------------------------------------------------------
# CidrSet: exhaustive small cases
# ---------------------------------------------------------------------------

def interval_oracle(specs: Sequence[Spec]) -> list[tuple[int, int, int, bool, int]]:
    out: list[tuple[int, int, int, bool, int]] = []
    for text, payload, enabled in specs:
        net = oracle_network(text)
        out.append((int(net.network_address), int(net.broadcast_address),
                    payload, enabled, net.version))
    return out


def check_block_exhaustively(specs: Sequence[Spec], first: int, last: int,
                             version: int) -> None:
    """Every address in [first, last], as text and packed, against the specs."""
    cs = built(specs)
    intervals = interval_oracle(specs)
    make = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    for value in range(first, last + 1):
        expected = tuple(sorted({p for lo, hi, p, on, v in intervals
                                 if on and v == version and lo <= value <= hi}))
        ip = make(value)
        assert cs.lookup(str(ip)) == expected, str(ip)
        assert cs.lookup(ip.packed) == expected, str(ip)
        assert cs.contains(str(ip)) == bool(expected)


NESTED_V4: list[Spec] = [
    ("10.0.0.0/16", 1, True),
    ("10.0.0.0/17", 2, False),          # disabled parent of live children
    ("10.0.0.0/24", 9, True),
    ("10.0.128.0/24", 3, True),
    ("10.0.128.0/24", 3, True),         # duplicate: payload reported once
    ("10.0.128.0/24", 7, True),         # same range, another rule
    ("10.0.128.128/25", 4, True),
    ("10.0.128.192/26", 4, False),      # disabled, same payload as its parent
    ("10.0.128.255/32", 5, True),
    ("10.0.255.255", 6, True),          # a single address, last of the /16
    ("10.0.0.0", 8, True),              # a single address, first of the /16
    ("10.1.0.0/16", 10, True),          # adjacent block
]


def test_nested_ipv4_block_exhaustive() -> None:
    lo = int(ipaddress.IPv4Address("9.255.255.0"))
    hi = int(ipaddress.IPv4Address("10.1.0.255"))
    check_block_exhaustively(NESTED_V4, lo, hi, 4)


def test_every_prefix_length_nested_exhaustive() -> None:
    # A chain /16 ⊃ /17 ⊃ ... ⊃ /32 around one address, every other one off.
    specs: list[Spec] = []
    target = int(ipaddress.IPv4Address("10.5.77.93"))
    for prefix in range(16, 33):
        base = target & ~((1 << (32 - prefix)) - 1) & 0xFFFFFFFF
        specs.append((f"{ipaddress.IPv4Address(base)}/{prefix}", prefix, prefix % 2 == 0))
    first = int(ipaddress.IPv4Address("10.5.0.0"))
    check_block_exhaustively(specs, first - 16, first + 0xFFFF + 16, 4)
    assert built(specs).lookup("10.5.77.93") == tuple(range(16, 33, 2))


def test_nested_ipv6_block_exhaustive() -> None:
    specs: list[Spec] = [
        ("2001:db8::/112", 1, True),
        ("2001:db8::8000/113", 2, True),
        ("2001:db8::8000/120", 3, False),
        ("2001:db8::80ff/128", 4, True),
        ("2001:db8::ffff", 5, True),
        ("2001:db8::1:0/112", 6, True),
    ]
    first = int(ipaddress.IPv6Address("2001:db8::"))
    check_block_exhaustively(specs, first - 256, first + 0x1FFFF + 256, 6)


def test_ipv4_mapped_networks_exhaustive() -> None:
    # A range written in IPv4-mapped notation is the IPv4 range.
    specs: list[Spec] = [("::ffff:192.0.2.0/120", 1, True),
                         ("::ffff:c000:280/121", 2, True),
                         ("192.0.2.64/26", 3, True)]
    first = int(ipaddress.IPv4Address("192.0.1.200"))
    check_block_exhaustively(specs, first, first + 400, 4)
    cs = built(specs)
    assert cs.lookup("::ffff:192.0.2.130") == (1, 2)
    assert cs.lookup("::ffff:c000:0282") == (1, 2)


def test_edges_of_the_address_spaces() -> None:
    specs: list[Spec] = [
        ("0.0.0.0/16", 1, True),
        ("0.0.0.0", 2, True),
        ("255.255.0.0/16", 3, True),
        ("255.255.255.255", 4, True),
        ("::/112", 5, True),
        ("::", 6, True),
        ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:0/112", 7, True),
        ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 8, True),
    ]
    check_block_exhaustively(specs, 0, 0x10100, 4)
    check_block_exhaustively(specs, 0xFFFEFF00, 0xFFFFFFFF, 4)
    check_block_exhaustively(specs, 0, 0x10100, 6)
    top = (1 << 128) - 1
    check_block_exhaustively(specs, top - 0x10100, top, 6)


def test_empty_set_answers_nothing() -> None:
    cs = built([])
    assert len(cs) == 0
    for address in ("0.0.0.0", "255.255.255.255", "::", "2001:db8::1", b"\0" * 4):
        assert cs.lookup(address) == ()
        assert not cs.contains(address)


def test_disabled_only_set() -> None:
    cs = built([("10.0.0.0/16", 1, False), ("2001:db8::/112", 2, False)])
    assert len(cs) == 2
    assert cs.lookup("10.0.0.1") == ()
    assert cs.lookup("2001:db8::1") == ()
    assert cs._segment_count() == (1, 1)


def test_insertion_order_does_not_matter() -> None:
    forward = built(NESTED_V4)
    backward = built(list(reversed(NESTED_V4)))
    for i in range(0, 65536, 97):
        address = f"10.0.{i >> 8}.{i & 255}"
        assert forward.lookup(address) == backward.lookup(address)


# ---------------------------------------------------------------------------
# CidrSet: property tests against ipaddress
# ---------------------------------------------------------------------------

V4_BLOCKS = [0x0A000000, 0x0A010000, 0xC0000200 & 0xFFFF0000, 0x00000000, 0xFFFF0000]
V6_BLOCKS = [
    int(ipaddress.IPv6Address("2001:db8::")),
    int(ipaddress.IPv6Address("2001:db8::1:0")),
    0,                                              # ::/112, holds :: and ::1
    ((1 << 128) - 1) & ~0xFFFF,                     # the top /112
    int(ipaddress.IPv6Address("fe80::")),
]


@st.composite
def v4_spec(draw: st.DrawFn) -> Spec:
    prefix = draw(st.integers(16, 32))
    base = draw(st.sampled_from(V4_BLOCKS)) | draw(st.integers(0, 0xFFFF))
    base &= ~((1 << (32 - prefix)) - 1) & 0xFFFFFFFF
    net = ipaddress.IPv4Network((base, prefix))
    text = str(net) if draw(st.booleans()) else f"::ffff:{net.network_address}/{prefix + 96}"
    if prefix == 32 and draw(st.booleans()):
        text = str(net.network_address)
    return (text, draw(st.integers(0, 12)), draw(st.booleans() | st.just(True)))


@st.composite
def v6_spec(draw: st.DrawFn) -> Spec:
    prefix = draw(st.integers(112, 128))
    base = draw(st.sampled_from(V6_BLOCKS)) | draw(st.integers(0, 0xFFFF))
    base &= ~((1 << (128 - prefix)) - 1)
    net = ipaddress.IPv6Network((base, prefix))
    return (str(net), draw(st.integers(0, 12)), draw(st.booleans() | st.just(True)))


def probe_addresses(specs: Sequence[Spec], extra: Sequence[int]) -> list[str | bytes]:
    """Edges of every range and their outside neighbours, plus random picks."""
    out: list[str | bytes] = []
    for text, _, _ in specs:
        net = oracle_network(text)
        limit = (1 << net.max_prefixlen) - 1
        for value in (int(net.network_address) - 1, int(net.network_address),
                      int(net.broadcast_address), int(net.broadcast_address) + 1):
            if 0 <= value <= limit:
                out += renderings(ipaddress.ip_address(value)
                                  if net.version == 4 else ipaddress.IPv6Address(value))
    for value in extra:
        if value <= 0xFFFFFFFF:
            out += renderings(ipaddress.IPv4Address(value))
        else:
            out += renderings(ipaddress.IPv6Address(value))
    return out


@PROPERTY
@given(specs=st.lists(v4_spec() | v6_spec(), max_size=40),
       extra=st.lists(st.sampled_from(V4_BLOCKS + V6_BLOCKS).flatmap(
           lambda b: st.integers(b, b + 0x1FFFF).map(lambda v: min(v, (1 << 128) - 1))),
           max_size=20))
def test_cidrset_matches_ipaddress(specs: list[Spec], extra: list[int]) -> None:
    cs = built(specs)
    oracle = Oracle(specs)
    assert len(cs) == len(specs)
    for address in probe_addresses(specs, extra):
        expected = oracle.lookup(address)
        assert cs.lookup(address) == expected, (address, specs)
        assert cs.contains(address) is bool(expected)


@PROPERTY
@given(specs=st.lists(v4_spec(), min_size=1, max_size=30),
       addresses=st.lists(st.integers(0, 0xFFFFFFFF), max_size=30))
def test_cidrset_random_ipv4_addresses(specs: list[Spec], addresses: list[int]) -> None:
    cs = built(specs)
    oracle = Oracle(specs)
    for value in addresses:
        for address in renderings(ipaddress.IPv4Address(value)):
            assert cs.lookup(address) == oracle.lookup(address)


MALFORMED: list[object] = [
    "", " ", "10.0.0.1 ", " 10.0.0.1", "10.0.0", "10.0.0.1.5", "010.0.0.1",
    "10.0.0.01", "256.0.0.1", "1.2.3.-4", "10.0.0.1/32", "10.0.0.0/16",
    "10.0.0.1%eth0", "10.0.0.1\x00", "10.0.0.1\x00junk", "::g", "1:2:3:4:5:6:7:8:9",
    "2001:db8::1%", "2001:db8::1%a%b", ":::", "2001:db8:::1", "12345::",
    "\u0661\u0660.0.0.1", "10.0.0.\u00b9", "x" * 100, "2001:db8::1" + "1" * 60,
    b"", b"\x0a\x00\x00", b"\x0a\x00\x00\x01\x00", b"\x00" * 15, b"\x00" * 17,
    bytearray(b"\x0a\x00\x00\x01"), memoryview(b"\x0a\x00\x00\x01"),
    None, 167772161, 3.5, ("10.0.0.1", 25), object(),
]


@pytest.mark.parametrize("address", MALFORMED, ids=repr)
def test_malformed_addresses_answer_the_empty_tuple(address: object) -> None:
    cs = built([("0.0.0.0/16", 1, True), ("10.0.0.0/16", 2, True),
                ("2001:db8::/112", 3, True)])
    result = cs.lookup(address)  # type: ignore[arg-type]
    assert result == ()
    assert result is cs.lookup("203.0.113.1")   # the one shared empty tuple
    assert cs.contains(address) is False  # type: ignore[arg-type]
    if isinstance(address, (str, bytes)):
        with pytest.raises(ValueError):         # ipaddress rejects it too
            ipaddress.ip_address(address)


def test_zone_ids_are_accepted_on_ipv6() -> None:
    cs = built([("fe80::/112", 1, True), ("2001:db8::/112", 2, True)])
    assert cs.lookup("fe80::1%eth0") == (1,)
    assert cs.lookup("fe80::1%1") == (1,)
    assert cs.lookup("2001:db8::7%x") == (2,)
    assert cs.lookup("2001:db8::7%" + "z" * 100) == (2,)    # long zones too
    assert oracle_lookup([("fe80::/112", 1, True)], "fe80::1%eth0") == (1,)


def test_lookups_allocate_nothing() -> None:
    cs = built([("10.0.0.0/16", 1, True), ("10.0.1.0/24", 2, True),
                ("2001:db8::/112", 3, True)])
    addresses: list[str | bytes] = ["10.0.1.9", "10.9.0.1", "2001:db8::9", "2001:db8:1::",
                                    "::ffff:10.0.1.9", "garbage", b"\x0a\x00\x01\x09",
                                    "\u00e9t\u00e9", "fe80::1%eth0"] * 200
    lookup = cs.lookup
    for address in addresses:        # warm up any lazily created state
        lookup(address)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        for address in addresses:
            lookup(address)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - before < 64, (before, current, peak)


@pytest.mark.parametrize("text, message", [
    ("10.0.0.0/8", "wider than the 65,536-address limit; IPv4 prefix must be /16"),
    ("10.0.0.0/15", "wider than the 65,536-address limit"),
    ("0.0.0.0/0", "wider than the 65,536-address limit"),
    ("2001:db8::/64", "IPv6 prefix must be /112"),
    ("2001:db8::/111", "wider than the 65,536-address limit"),
    ("::ffff:10.0.0.0/104", "IPv6 prefix must be /112"),
    ("10.0.0.1/24", "host bits set; did you mean 10.0.0.0/24?"),
    ("10.0.0.128/24", "host bits set"),
    ("2001:db8::1/112", "did you mean 2001:db8::/112?"),
    ("garbage", "not an IPv4 or IPv6 address"),
    ("", "not an IPv4 or IPv6 address"),
    ("10.0.0.256/24", "not an IPv4 or IPv6 address"),
    ("10.0.0.0/33", "prefix length must be a number from 0 to 32"),
    ("2001:db8::/129", "from 0 to 128"),
    ("10.0.0.0/", "prefix length"),
    ("10.0.0.0/+24", "prefix length"),
    ("10.0.0.0/ 24", "prefix length"),
    ("10.0.0.0/2 4", "prefix length"),
    ("10.0.0.0/24/1", "prefix length"),
    ("10.0.0.0/\u0662\u0664", "prefix length"),
    ("fe80::%eth0/112", "not an IPv4 or IPv6 address"),
    (" 10.0.0.0/24", "not an IPv4 or IPv6 address"),
])
def test_add_rejects_bad_networks(text: str, message: str) -> None:
    cs = CidrSet()
    with pytest.raises(ValueError, match=message.replace("?", r"\?").replace("+", r"\+")):
        cs.add(text, 1)
    assert len(cs) == 0


@PROPERTY
@given(value=st.integers(0, 0xFFFFFFFF), prefix=st.integers(16, 31))
def test_add_rejects_any_host_bits(value: int, prefix: int) -> None:
    host = value & ((1 << (32 - prefix)) - 1)
    cs = CidrSet()
    text = f"{ipaddress.IPv4Address(value)}/{prefix}"
    if host:
        with pytest.raises(ValueError, match="host bits set"):
            cs.add(text, 1)
    else:
        cs.add(text, 1)
        assert len(cs) == 1


@PROPERTY
@given(value=st.integers(0, (1 << 128) - 1), prefix=st.integers(0, 111))
def test_add_rejects_wide_ipv6(value: int, prefix: int) -> None:
    base = value & ~((1 << (128 - prefix)) - 1)
    with pytest.raises(ValueError, match="wider than the 65,536-address limit"):
        CidrSet().add(f"{ipaddress.IPv6Address(base)}/{prefix}", 1)


def test_api_misuse() -> None:
    cs = CidrSet()
    with pytest.raises(RuntimeError, match="before build"):
        cs.lookup("10.0.0.1")
    with pytest.raises(RuntimeError, match="before build"):
        cs.contains("10.0.0.1")
    with pytest.raises(TypeError, match="network must be str"):
        cs.add(b"10.0.0.0/24", 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        cs.add("10.0.0.0/24", "1")  # type: ignore[arg-type]
    with pytest.raises(OverflowError):
        cs.add("10.0.0.0/24", 1 << 64)
    cs.add("10.0.0.0/24", 1)
    cs.build()
    cs.build()      # idempotent
    with pytest.raises(RuntimeError, match="frozen"):
        cs.add("10.0.1.0/24", 2)
    assert len(cs) == 1
    assert cs.lookup("10.0.0.5") == (1,)


def test_large_payloads_and_negative_payloads_round_trip() -> None:
    cs = built([("10.0.0.0/24", (1 << 63) - 1, True), ("10.0.0.0/25", -5, True)])
    assert cs.lookup("10.0.0.1") == (-5, (1 << 63) - 1)


def test_segments_are_maximal() -> None:
    # Adjacent or nested ranges that answer alike collapse into one segment.
    cs = built([("10.0.0.0/24", 1, True), ("10.0.1.0/24", 1, True),
                ("10.0.2.0/23", 1, True), ("10.0.1.0/25", 1, True),
                ("10.0.0.0/25", 2, False), ("2001:db8::/113", 3, True),
                ("2001:db8::8000/113", 3, True)])
    assert cs._segment_count() == (3, 3)
    assert cs.lookup("10.0.3.255") == (1,)
    assert cs.lookup("10.0.4.0") == ()


def test_many_ranges_in_one_block() -> None:
    # Every /32 of one /24 plus the /24: 257 ranges sharing a /16 block.
    specs: list[Spec] = [("198.51.100.0/24", 1000, True)]
    specs += [(f"198.51.100.{i}", i, i % 3 != 0) for i in range(256)]
    cs = built(specs)
    for i in range(256):
        expected = (i, 1000) if i % 3 != 0 else (1000,)
        assert cs.lookup(f"198.51.100.{i}") == expected
    assert cs.lookup("198.51.101.0") == ()


# ---------------------------------------------------------------------------
# RateWindow: the event-list model
# ---------------------------------------------------------------------------

class RateModel:
    """Every event kept; the window is the current bucket and the nbuckets-1
    before it, with bucket = floor(t / (span / nbuckets)); time never goes
    back (an earlier `now` counts as the latest seen)."""

    def __init__(self, span: float, buckets: int) -> None:
        self.width = span / buckets
        self.buckets = buckets
        self.clock: float | None = None
        self.events: list[tuple[int, int]] = []

    def _bucket(self, now: float) -> int:
        self.clock = now if self.clock is None else max(self.clock, now)
        return math.floor(self.clock / self.width)

    def total(self, now: float) -> int:
        current = self._bucket(now)
        return sum(n for b, n in self.events if b > current - self.buckets)

    def add(self, n: int, now: float) -> None:
        current = self._bucket(now)
        in_bucket = sum(k for b, k in self.events if b == current)
        if in_bucket + n > 0xFFFFFFFF:
            raise OverflowError
        self.events.append((current, n))

    def subtract(self, n: int, now: float) -> int:
        """Take back from the newest bucket only, never below zero."""
        current = self._bucket(now)
        taken = min(n, sum(k for b, k in self.events if b == current))
        self.events.append((current, -taken))
        return taken


# (1.0, 3) and (0.3, 3) have inexact widths, where k * width / width can
# land just below k: persistence must still restore the same bucket.
WINDOW_SHAPES = [(86400.0, 288), (600.0, 600), (10.0, 3), (1.0, 1), (7.5, 4),
                 (0.3, 3), (1.0, 3), (3600.0, 60)]


@st.composite
def clock_steps(draw: st.DrawFn, span: float) -> float:
    kind = draw(st.sampled_from(["small", "small", "small", "zero", "back",
                                 "bucket", "span", "far"]))
    if kind == "small":
        return draw(st.floats(0.0, span / 5, allow_nan=False))
    if kind == "zero":
        return 0.0
    if kind == "back":
        return -draw(st.floats(0.0, span * 2, allow_nan=False))
    if kind == "bucket":
        return span * draw(st.integers(1, 4)) / draw(st.integers(1, 8))
    if kind == "span":
        return span * draw(st.sampled_from([1.0, 0.999, 1.001, 2.0, 0.5]))
    return draw(st.floats(span, span * 1000, allow_nan=False))


@st.composite
def rate_scenarios(draw: st.DrawFn) -> tuple[float, int, float, list[tuple[str, int, float]]]:
    span, buckets = draw(st.sampled_from(WINDOW_SHAPES))
    start = draw(st.sampled_from([0.0, 1.7e9, -5000.0, 123.456]))
    ops = draw(st.lists(st.tuples(
        st.sampled_from(["add", "add", "total", "exceed", "empty", "persist",
                         "subtract"]),
        st.one_of(st.integers(0, 5), st.integers(0, 300), st.sampled_from([65535, 70000]),
                  st.just(0xFFFFFFFF)),
        clock_steps(span)), max_size=60))
    return span, buckets, start, ops


@PROPERTY
@given(rate_scenarios())
def test_ratewindow_matches_model(scenario: tuple[float, int, float,
                                                  list[tuple[str, int, float]]]) -> None:
    span, buckets, now, ops = scenario
    window = RateWindow(span, buckets)
    model = RateModel(span, buckets)
    for op, n, step in ops:
        now += step
        if op == "add":
            try:
                model.add(n, now)
            except OverflowError:
                with pytest.raises(OverflowError):
                    window.add(n, now)
            else:
                window.add(n, now)
        elif op == "subtract":
            assert window.subtract(n, now) == model.subtract(n, now)
        elif op == "total":
            assert window.total(now) == model.total(now)
        elif op == "exceed":
            limit = model.total(now) + n - 1 + (step > 0)
            assert window.would_exceed(n, limit, now) == (model.total(now) + n > limit)
        elif op == "empty":
            assert window.is_empty(now) == (model.total(now) == 0)
        else:
            state = msgspec.msgpack.decode(msgspec.msgpack.encode(window.to_state()))
            window = RateWindow.from_state(state)
        window._check_invariants()
    assert window.total(now) == model.total(now)


def test_ratewindow_buckets_and_expiry() -> None:
    w = RateWindow(86400.0, 288)           # 300-second buckets
    assert (w.span, w.buckets, w.width) == (86400.0, 288, 300.0)
    w.add(2, 1000.0)                        # bucket 3, [900, 1200)
    w.add(5, 1199.0)
    assert w.total(1199.0) == 7
    # Bucket 3 leaves when bucket 3 + 288 begins: at 291 * 300 = 87300.
    assert w.total(87299.9) == 7
    assert w.total(87300.0) == 0
    assert w.is_empty(87300.0)
    assert w._ring_bytes() == 0             # drained: the ring is freed


def test_ratewindow_clock_going_back_neither_frees_nor_doubles() -> None:
    w = RateWindow(600.0, 600)
    w.add(10, 5000.0)
    w.add(1, 4000.0)                        # counted in the newest bucket (5000)
    assert w.total(3000.0) == 11
    assert w.would_exceed(1, 11, 1.0)
    assert not w.would_exceed(0, 11, 1.0)
    # Both counts leave together, 600 s after 5000, not 600 s after 4000.
    assert w.total(5599.0) == 11
    assert w.total(5600.0) == 0


def test_ratewindow_subtract_takes_back_from_the_newest_bucket_only() -> None:
    w = RateWindow(600.0, 600)              # 1-second buckets
    w.add(5, 100.0)
    w.add(4, 101.5)
    assert w.subtract(3, 101.9) == 3        # from bucket 101
    assert w.total(101.9) == 6
    assert w.subtract(10, 101.9) == 1       # bucket 101 had 1 left; 100 untouched
    assert w.total(101.9) == 5
    assert w.subtract(2, 102.0) == 0        # a new bucket: nothing to take back
    assert w.total(102.0) == 5
    assert w.subtract(1, 50.0) == 0         # clock going back lands in bucket 102
    assert w.subtract(0, 102.0) == 0
    with pytest.raises(ValueError, match="n must be >= 0"):
        w.subtract(-1, 102.0)
    w2 = RateWindow(600.0, 600)
    w2.add(2, 0.0)
    assert w2.subtract(5, 0.5) == 2
    assert w2.is_empty(0.5)
    assert w2._ring_bytes() == 0            # emptied by subtract: the ring is freed
    w2._check_invariants()


def test_ratewindow_counts_widen_as_needed() -> None:
    w = RateWindow(86400.0, 288)
    w.add(255, 0.0)
    assert w._ring_bytes() == 288
    w.add(1, 0.0)
    assert w._ring_bytes() == 576
    w.add(65279, 0.0)                       # 65,535: still fits uint16
    assert w._ring_bytes() == 576
    w.add(1, 0.0)
    assert w._ring_bytes() == 1152
    assert w.total(0.0) == 65536
    w._check_invariants()
    with pytest.raises(OverflowError):
        w.add(0xFFFFFFFF, 0.0)
    assert w.total(0.0) == 65536
    w.add(0xFFFFFFFF, 300.0)               # a fresh bucket takes the maximum
    assert w.total(300.0) == 65536 + 0xFFFFFFFF
    restored = RateWindow.from_state(w.to_state())
    assert restored.total(300.0) == 65536 + 0xFFFFFFFF
    assert restored._ring_bytes() == 1152


def test_ratewindow_state_keeps_the_head_bucket_with_inexact_width() -> None:
    w = RateWindow(1.0, 3)                  # width 1/3: 7 * w / w < 7 in floats
    w.add(1, 2.34)                          # bucket 7
    head_time = w.to_state()[3]
    assert head_time is not None and head_time / w.width < 7
    copy = RateWindow.from_state(w.to_state())
    assert copy.total(3.33) == w.total(3.33) == 1     # still bucket 9
    assert copy.total(3.34) == w.total(3.34) == 0     # bucket 10: 7 has left


def test_ratewindow_long_idle_resets_once() -> None:
    w = RateWindow(86400.0, 288)
    for i in range(288):
        w.add(1, i * 300.0)
    assert w.total(287 * 300.0) == 288
    assert w.total(287 * 300.0 + 86400.0 * 50) == 0
    assert w._ring_bytes() == 0
    w.add(3, 287 * 300.0 + 86400.0 * 50)
    assert w.total(287 * 300.0 + 86400.0 * 50) == 3


def test_ratewindow_argument_checks() -> None:
    for span, buckets in [(0.0, 1), (-1.0, 1), (math.inf, 1), (math.nan, 1), (1.0, 0)]:
        with pytest.raises(ValueError):
            RateWindow(span, buckets)
    w = RateWindow(60.0, 6)
    for bad in (math.nan, math.inf, -math.inf, 1e300):
        with pytest.raises(ValueError, match="finite time"):
            w.add(1, bad)
    with pytest.raises(ValueError, match="n must be >= 0"):
        w.add(-1, 0.0)
    with pytest.raises(ValueError, match="n must be >= 0"):
        w.would_exceed(-1, 5, 0.0)
    assert w.would_exceed(0, -1, 0.0)
    assert not w.would_exceed(0, 0, 0.0)
    assert w.would_exceed(1, 0, 0.0)


def test_ratewindow_state_round_trip_and_validation() -> None:
    fresh = RateWindow(600.0, 10)
    state = fresh.to_state()
    assert state == (600.0, 10, 60.0, None, [0] * 10)
    assert RateWindow.from_state(state).total(0.0) == 0
    w = RateWindow(600.0, 10)
    for i in range(25):
        w.add(i, 1.7e9 + 37.0 * i)
    now = 1.7e9 + 37.0 * 24
    span, buckets, width, head_time, counts = w.to_state()
    assert (span, buckets, width, len(counts)) == (600.0, 10, 60.0, 10)
    assert head_time == math.floor(now / 60.0) * 60.0
    assert sum(counts) == w.total(now)
    decoded = [msgspec.json.decode(msgspec.json.encode(w.to_state())),
               msgspec.msgpack.decode(msgspec.msgpack.encode(w.to_state()))]
    for state in decoded:
        copy = RateWindow.from_state(state)
        for later in (now, now + 59.0, now + 61.0, now + 300.0, now + 599.0, now + 700.0):
            assert copy.total(later) == RateWindow.from_state(w.to_state()).total(later)
    for bad in [(), (600.0, 10, 60.0, None), (600.0, 10, 61.0, None, [0] * 10),
                (600.0, 10, 60.0, None, [0] * 9), (600.0, 10, 60.0, None, [1] + [0] * 9),
                (600.0, 10, 60.0, 0.0, [-1] + [0] * 9), (600.0, 10, 60.0, 0.0, [1 << 32] + [0] * 9),
                (600.0, 10, 60.0, math.nan, [0] * 10), (600.0, 0, 60.0, None, [])]:
        with pytest.raises(ValueError):
            RateWindow.from_state(bad)


# ---------------------------------------------------------------------------
# UniqueWindow: the dictionary model
# ---------------------------------------------------------------------------

class UniqueModel:
    """Keys with their latest time; a key counts while now - last < span."""

    def __init__(self, span: float) -> None:
        self.span = span
        self.clock = -math.inf
        self.last: dict[str, float] = {}

    def _cutoff(self, now: float) -> float:
        self.clock = max(self.clock, now)
        return self.clock - self.span

    def add(self, key: str, now: float) -> bool:
        cutoff = self._cutoff(now)
        fresh = not (key in self.last and self.last[key] > cutoff)
        self.last[key] = self.clock
        return fresh

    def seen(self, key: str, now: float) -> bool:
        cutoff = self._cutoff(now)
        return key in self.last and self.last[key] > cutoff

    def count(self, now: float) -> int:
        cutoff = self._cutoff(now)
        return sum(1 for t in self.last.values() if t > cutoff)


@st.composite
def unique_scenarios(draw: st.DrawFn) -> tuple[float, float, list[tuple[str, str, float]]]:
    span = draw(st.sampled_from([86400.0, 600.0, 10.0, 1.0, 0.3]))
    start = draw(st.sampled_from([0.0, 1.7e9, -5000.0]))
    pool = draw(st.sampled_from([3, 12, 60, 400]))
    key = st.integers(0, pool - 1).map(lambda i: f"rcpt{i}@example.test")
    ops = draw(st.lists(st.tuples(
        st.sampled_from(["add", "add", "add", "seen", "count", "empty", "persist"]),
        key, clock_steps(span)), max_size=120))
    return span, start, ops


@PROPERTY
@given(unique_scenarios())
def test_uniquewindow_matches_model(scenario: tuple[float, float,
                                                    list[tuple[str, str, float]]]) -> None:
    span, now, ops = scenario
    window = UniqueWindow(span)
    model = UniqueModel(span)
    for op, key, step in ops:
        now += step
        if op == "add":
            assert window.add(key, now) == model.add(key, now)
        elif op == "seen":
            assert window.seen(key, now) == model.seen(key, now)
        elif op == "count":
            assert window.count(now) == model.count(now)
        elif op == "empty":
            assert window.is_empty(now) == (model.count(now) == 0)
        else:
            state = msgspec.msgpack.decode(msgspec.msgpack.encode(window.to_state()))
            window = UniqueWindow.from_state(state)
        window._check_invariants()
    assert window.count(now) == model.count(now)


def test_uniquewindow_refresh_and_expiry() -> None:
    w = UniqueWindow(100.0)
    assert w.add("a@x", 0.0)
    assert not w.add("a@x", 50.0)           # refreshed: now leaves at 150
    assert w.add("b@x", 60.0)
    assert w.count(149.9) == 2
    assert w.seen("a@x", 149.9)
    assert w.count(150.0) == 1
    assert not w.seen("a@x", 150.0)
    assert w.add("a@x", 150.0)              # counted afresh
    assert w.count(100.0) == 2              # the clock does not go back
    assert w.count(250.0) == 0
    assert w.is_empty(250.0)
    assert w._memory_bytes() == 0


def test_uniquewindow_memory_follows_activity() -> None:
    w = UniqueWindow(1000.0)
    for i in range(5000):
        w.add(f"user{i}@example.test", float(i) * 0.01)
    assert w.count(50.0) == 5000
    big = w._memory_bytes()
    assert big >= 5000 * 16 * 2
    w._check_invariants()
    assert w.add("keeper@example.test", 1000.0)
    assert w.count(1060.0) == 1             # every other key has expired
    w._check_invariants()
    assert w._memory_bytes() == 2 * 8 * 16  # shrunk to the minimum table and FIFO
    assert w.seen("keeper@example.test", 1060.0)
    assert w.count(3000.0) == 0
    assert w._memory_bytes() == 0           # freed when empty


def test_uniquewindow_repeated_key_does_not_grow_the_fifo() -> None:
    w = UniqueWindow(86400.0)
    for i in range(100_000):
        w.add(f"rcpt{i % 3}@example.test", float(i))
    assert w.count(100_000.0) == 3
    w._check_invariants()
    assert w._memory_bytes() <= 2 * 8 * 16


def test_uniquewindow_state_round_trip_and_validation() -> None:
    assert UniqueWindow(60.0).to_state() == (60.0, None, [])
    w = UniqueWindow(600.0)
    for i in range(30):
        w.add(f"k{i % 17}", 1.7e9 + 25.0 * i)
    now = 1.7e9 + 25.0 * 29
    span, clock, pairs = w.to_state()
    assert (span, clock, len(pairs)) == (600.0, now, 17)
    assert [t for _, t in pairs] == sorted(t for _, t in pairs)
    assert {h for h, _ in pairs} == {key_hash(f"k{i}") for i in range(17)}
    copy = UniqueWindow.from_state(msgspec.json.decode(msgspec.json.encode(w.to_state())))
    copy._check_invariants()
    for later in (now, now + 100.0, now + 330.0, now + 599.0, now + 700.0):
        assert copy.count(later) == w.count(later)
    for bad in [(), (60.0, None, [(1, 0.0)]), (60.0, 0.0, [(0, 0.0)]),
                (60.0, 0.0, [(1 << 64, 0.0)]), (60.0, 0.0, [(1, 5.0)]),
                (60.0, 0.0, [("1", 0.0)]), (60.0, 0.0, [(1, math.nan)]),
                (60.0, math.inf, []), (0.0, None, []), (60.0, 0.0, [(1,)])]:
        with pytest.raises(ValueError):
            UniqueWindow.from_state(bad)
    # Entries already out of the window at the saved clock are dropped.
    old = UniqueWindow.from_state((60.0, 100.0, [(5, 30.0), (6, 50.0), (6, 45.0)]))
    assert old.count(100.0) == 1
    old._check_invariants()


def test_uniquewindow_argument_checks() -> None:
    for span in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError):
            UniqueWindow(span)
    w = UniqueWindow(60.0)
    with pytest.raises(TypeError, match="key must be str"):
        w.add(b"a@x", 0.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finite time"):
        w.add("a@x", math.nan)
    assert w.is_empty(0.0)


# ---------------------------------------------------------------------------
# The stable key hash
# ---------------------------------------------------------------------------

def reference_hash(key: str) -> int:
    """FNV-1a 64 over UTF-8 (surrogates passed through), then fmix64."""
    mask = (1 << 64) - 1
    h = 0xCBF29CE484222325
    for byte in key.encode("utf-8", "surrogatepass"):
        h = ((h ^ byte) * 0x100000001B3) & mask
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & mask
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & mask
    h ^= h >> 33
    return h or 1


@PROPERTY
@given(st.text())
def test_key_hash_matches_reference(key: str) -> None:
    assert key_hash(key) == reference_hash(key)


PINNED_EMPTY = 0xEFD01F60BA992926
PINNED_ALICE = 0x53E4B3BC79050458


def test_key_hash_pinned_values() -> None:
    # Persisted windows depend on these never changing.
    assert key_hash("") == PINNED_EMPTY
    assert key_hash("alice@example.com") == PINNED_ALICE
    assert key_hash("a") == 9413272369427828315
    assert key_hash("\udcff") == 5661787390030571528     # surrogateescape'd 0xFF
    assert key_hash("ü@example.com") != key_hash("u@example.com")


def test_key_hash_is_stable_across_processes() -> None:
    keys = ["alice@example.com", "ü@例え.jp", "\udcff\udcfe"]
    script = ("import sys; from fastrelay._core import key_hash; "
              f"print([key_hash(k) for k in {keys!r}])")
    results = set()
    for seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", script], env=env, check=True,
                             capture_output=True, text=True).stdout
        results.add(out.strip())
    assert results == {str([key_hash(k) for k in keys])}


# -- scan_content: one pass over message content -------------------------------------------


def _content_flags_model(data: bytes) -> int:
    """The obvious, slow definition the compiled pass must match."""
    from fastrelay._core import CONTENT_8BIT, CONTENT_BARE_NEWLINE, CONTENT_LEADING_DOT, CONTENT_LONG_LINE

    flags = 0
    crlf = data.count(b"\r\n")
    if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
        flags |= CONTENT_BARE_NEWLINE
    if data.startswith(b".") or b"\n." in data:
        flags |= CONTENT_LEADING_DOT
    if not data.isascii():
        flags |= CONTENT_8BIT
    for line in data.split(b"\n"):   # RFC 5322 §2.1.1, its CRLF (or bare LF) and a stuffing dot not counted
        if len(line.removesuffix(b"\r").removeprefix(b".")) > 998:
            flags |= CONTENT_LONG_LINE
    return flags


@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"a", b"\xe9", b" ", b"\r\n.", b"\n."]),
                max_size=40).map(b"".join))
@settings(max_examples=2000)
def test_scan_content_matches_model(data: bytes) -> None:
    from fastrelay._core import scan_content

    assert scan_content(data) == _content_flags_model(data)


def test_scan_content_examples() -> None:
    from fastrelay._core import (
        CONTENT_8BIT,
        CONTENT_BARE_NEWLINE,
        CONTENT_LEADING_DOT,
        CONTENT_LONG_LINE,
        scan_content,
    )

    assert scan_content(b"") == 0
    assert scan_content(b"Subject: x\r\n\r\nbody\r\n") == 0
    assert scan_content(b"a\nb\r\n") == CONTENT_BARE_NEWLINE
    assert scan_content(b"a\r\n..b\r\n") == CONTENT_LEADING_DOT
    assert scan_content(b"caf\xc3\xa9\r\n") == CONTENT_8BIT
    assert scan_content(b"x\r") == CONTENT_BARE_NEWLINE
    assert scan_content(b"y" * 998 + b"\r\n.." + b"z" * 997 + b"\r\n") == CONTENT_LEADING_DOT
    assert scan_content(b"y" * 999 + b"\r\n") == CONTENT_LONG_LINE


# Long runs of ordinary bytes between the special ones, so the eight-bytes-at-a-time
# path and its hand-over to the byte loop are both exercised.
_LONG_CONTENT = st.lists(
    st.one_of(st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"\xe9", b"\r\n.", b"\n.", b"\r\n.\r\n", b"\x0e",
                               b"\x7f", b"\x80"]),
              st.integers(1, 40).map(lambda k: b"x" * k), st.integers(990, 1000).map(lambda k: b"L" * k)),
    max_size=60).map(b"".join)


@given(_LONG_CONTENT)
@settings(max_examples=2000)
def test_scan_content_matches_model_on_long_lines(data: bytes) -> None:
    from fastrelay._core import scan_content

    assert scan_content(data) == _content_flags_model(data)


@given(_LONG_CONTENT, st.lists(st.integers(0, 3000), max_size=8))
@settings(max_examples=3000)
def test_content_scan_read_by_read_matches_model(data: bytes, cuts: list[int]) -> None:
    """The server scans each read as it comes: any split of the content gives the flags of the whole."""
    from fastrelay._core import ContentScan

    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    scan = ContentScan()
    for start, end in zip(bounds, bounds[1:]):
        scan.feed(memoryview(data)[start:end])
    assert scan.finish() == _content_flags_model(data)
    scan.reset()
    assert scan.feed(data, True) == _content_flags_model(data)


def test_content_scan_carries_a_line_across_reads() -> None:
    from fastrelay._core import CONTENT_BARE_NEWLINE, CONTENT_LEADING_DOT, CONTENT_LONG_LINE, ContentScan

    scan = ContentScan()
    assert scan.feed(b"a\r") == 0                  # its LF may be in the next read
    assert scan.feed(b"\nb\r\n") == 0
    assert scan.feed(b".") == CONTENT_LEADING_DOT    # a line's first byte, at a read's start
    assert scan.feed(b"x" * 998) == CONTENT_LEADING_DOT
    assert scan.feed(b"\r") == CONTENT_LEADING_DOT  # 998 octets after the stuffing dot: not long
    assert scan.feed(b"\ny") == CONTENT_LEADING_DOT
    assert scan.feed(b"y" * 998 + b"\r") == CONTENT_LEADING_DOT   # still open
    assert scan.finish() == CONTENT_LEADING_DOT | CONTENT_LONG_LINE | CONTENT_BARE_NEWLINE
    scan.reset()
    assert scan.feed(b"b\r") == 0
    assert scan.feed(b"c\r\n") == CONTENT_BARE_NEWLINE     # the CR before "c" had no LF
    scan.reset()
    assert scan.feed(b"") == 0 and scan.finish() == 0


@given(_LONG_CONTENT, st.integers(-1, 200))
@settings(max_examples=3000)
def test_find_end_of_data_matches_bytes_find(data: bytes, start: int) -> None:
    from fastrelay._core import find_end_of_data

    assert find_end_of_data(data, start) == data.find(b"\r\n.\r\n", max(start, 0))


# --- LiteralSet -----------------------------------------------------------------------------

# Needles with shared blocks and a shared prefix, so that a window may match
# several of them and shifts come from more than one needle.
_NEEDLES = [b"abcabcabxy", b"xyabcabcab", b"abcabcabxyz-long", b"qqqqqqqqqq"]


def _found_model(needles: Sequence[bytes], data: bytes) -> int:
    return sum(1 << k for k, needle in enumerate(needles) if needle in data)


@given(st.lists(st.one_of(st.sampled_from([b"a", b"b", b"c", b"x", b"y", b"z", b"q", b"-", b"long"]),
                          st.sampled_from(_NEEDLES), st.sampled_from([n[:-1] for n in _NEEDLES])),
                max_size=80).map(b"".join))
@settings(max_examples=3000)
def test_literal_set_matches_the_in_operator(data: bytes) -> None:
    from fastrelay._core import LiteralSet

    assert LiteralSet(_NEEDLES).found(data) == _found_model(_NEEDLES, data)


def test_literal_set_finds_needles_at_the_edges_and_takes_any_buffer() -> None:
    from fastrelay._core import LiteralSet

    needles = [b"X" * 30 + b"end", b"-STANDARD-ANTI-"]
    literal_set = LiteralSet(needles)
    filler = b"the quick brown fox jumps over the lazy dog\r\n" * 2000
    assert literal_set.found(b"") == 0
    assert literal_set.found(needles[1]) == 2                  # the whole buffer
    assert literal_set.found(needles[0][:-1]) == 0             # one byte short
    assert literal_set.found(needles[1] + filler) == 2         # at the start
    assert literal_set.found(filler + needles[0]) == 1         # at the very end
    assert literal_set.found(filler + needles[0] + filler + needles[1]) == 3
    assert literal_set.found(bytearray(filler + needles[1])) == 2
    assert literal_set.found(memoryview(needles[1] + filler)[:15]) == 2


@pytest.mark.parametrize("needles, message", [
    ([], "1 to 32"), ([b"ab"] * 33, "1 to 32"), ([b"a", b"abc"], "2 to 256"), ([b"a" * 257], "2 to 256")])
def test_literal_set_refuses_needles_it_cannot_hold(needles: list[bytes], message: str) -> None:
    from fastrelay._core import LiteralSet

    with pytest.raises(ValueError, match=message):
        LiteralSet(needles)


# --- header_facts ---------------------------------------------------------------------------


def _header_facts_model(body: bytes, url_scan_bytes: int) -> tuple[int, ...]:
    """What the builtin scanner computed in Python before header_facts: finds in a
    lower-cased copy of the header section, bytes.strip, and a substring count."""
    from fastrelay._core import HEADER_BOUNDARY, HEADER_DATE, HEADER_MESSAGE_ID, HEADER_NAME

    end = body.find(b"\r\n\r\n")
    head, text_start = (body, len(body)) if end < 0 else (body[:end + 2], end + 4)
    lowered = b"\n" + head.lower()

    def field(needle: bytes) -> tuple[int, int]:
        at = lowered.find(needle)
        if at < 0:
            return -1, -1
        start = at + len(needle) - 1
        stop = head.find(b"\r\n", start)
        while stop >= 0 and head[stop + 2:stop + 3] in (b" ", b"\t"):
            stop = head.find(b"\r\n", stop + 2)
        value = head[start:len(head) if stop < 0 else stop]
        lead = len(value) - len(value.lstrip())
        return start + lead, start + lead + len(value.strip())

    flags = ((HEADER_MESSAGE_ID if b"\nmessage-id:" in lowered else 0) | (HEADER_DATE if b"\ndate:" in lowered else 0)
             | (HEADER_NAME if b"name" in lowered else 0) | (HEADER_BOUNDARY if b"boundary" in lowered else 0))
    scanned = min(len(body) - text_start, url_scan_bytes)
    urls = body.count(b"://", text_start, text_start + scanned) if scanned > 0 else 0
    return (flags, len(head), text_start, *field(b"\nfrom:"), *field(b"\nsubject:"), urls)


_HEADER_PIECES = [b"From: Alice <a@example.com>", b"from:x", b"FROM:", b"Subject: hi", b"sUbJeCt:", b"Date: now",
                  b"Message-ID: <m@x>", b"message-id:", b" folded", b"\tfolded", b"X-Name: y", b"filename=a.exe",
                  b"Content-Type: multipart/mixed; BOUNDARY=q", b"", b"\r\n", b"\r", b"\n", b" ", b"\x0b",
                  b"http://a.test/", b"://", b":", b"/", b"x" * 30]


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(_HEADER_PIECES) | st.binary(max_size=8), max_size=40),
       st.sampled_from([b"\r\n", b"", b" ", b"\n"]), st.integers(min_value=0, max_value=80))
def test_header_facts_agree_with_the_python_model(pieces: list[bytes], joint: bytes, url_scan_bytes: int) -> None:
    """Lines, folds, the empty line, bare CR and LF, case, and URLs straddling the scan limit."""
    from fastrelay._core import header_facts

    body = joint.join(pieces)
    for limit in (url_scan_bytes, 32 * 1024):
        assert header_facts(body, limit) == _header_facts_model(body, limit), (body, limit)


def test_header_facts_on_a_typical_message() -> None:
    from fastrelay._core import HEADER_DATE, HEADER_MESSAGE_ID, header_facts

    body = (b"Received: by mx\r\nFrom: \"Alice\" <alice@example.com>\r\nSubject: Quarterly\r\n  numbers \r\n"
            b"Date: Thu, 27 Nov 2025 10:00:00 +0000\r\nMessage-ID: <q1@example.com>\r\n\r\n"
            b"See https://intranet.example.com/q3 and ftp://x.test.\r\n")
    flags, head, text, fs, fe, ss, se, urls = header_facts(body, 32 * 1024)
    assert flags == HEADER_MESSAGE_ID | HEADER_DATE
    assert body[:head].endswith(b"<q1@example.com>\r\n") and body[text:].startswith(b"See ")
    assert body[fs:fe] == b'"Alice" <alice@example.com>'
    assert body[ss:se] == b"Quarterly\r\n  numbers"
    assert urls == 2
    assert header_facts(b"no header end\r\nFrom: x", 100)[1:3] == (len(b"no header end\r\nFrom: x"),) * 2
