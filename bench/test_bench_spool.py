"""Durable appends to the spool (fastrelay.spool.Spool): writev + fdatasync, group commit.

Run: .venv/bin/pytest bench/test_bench_spool.py --benchmark-only

Each round appends message records with ``append_message`` and runs the
loop until every future has resolved, i.e. until the records are written
and fdatasync'd and the writer thread's completion has come back through
the loop: what a session waits for between the end of DATA and its 250.
The loop is uvloop's, as the relay runs.

Spools go in a fresh directory per test under FASTRELAY_BENCH_WORK
(default /var/tmp/fastrelay-bench, as bench/e2e.py), removed afterwards.  It
must be on the real disk: on tmpfs fsync is free and the figures say
nothing, so a test there is skipped with the reason.

Groups:
  spool: one append          one 1 KiB / 100 KiB message at a time: the
                             latency of one durable append (one fdatasync)
  spool: 100 concurrent      100 appends made at once and gathered: what
                             group commit makes of them

extra_info: messages_per_s and MB_per_s (content bytes, 10^6 a MB) over the
median round; for the concurrent rounds batches_per_round, the mean number of
batches (so of fdatasyncs) the writer thread made of one round's 100 appends.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvloop

from fastrelay.spool import Envelope, Location, QueueIdGenerator, Spool

WORK_BASE = Path(os.environ.get("FASTRELAY_BENCH_WORK", "/var/tmp/fastrelay-bench"))
MEMORY_FILESYSTEMS = {"tmpfs", "ramfs"}

SIZES = [1024, 100 * 1024]
SIZE_IDS = ["1k", "100k"]
CONCURRENT = 100

# What SmtpSession._received_header prepends to every message.
RECEIVED = (b"Received: from client.example.com (unknown [127.0.0.1])\r\n"
            b"\tby relay.example.test (fastrelay) with ESMTP id 18F2A3B4C5D6E7\r\n"
            b"\tfor <carol@dest.test>; Thu, 27 Nov 2025 10:00:00 +0000\r\n")


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding ``path`` (its longest mount point in /proc/self/mounts)."""
    target = os.path.realpath(path)
    best, kind = "", ""
    try:
        with open("/proc/self/mounts") as mounts:
            for entry in mounts:
                fields = entry.split()
                if len(fields) < 3:
                    continue
                # /proc/mounts writes a space in a path as \040.
                point = fields[1].encode().decode("unicode_escape")
                inside = target == point or target.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, fields[2]
    except OSError:
        return ""   # no /proc: nothing to check against
    return kind


def content(size: int) -> bytes:
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n"
    head = b"From: bob@example.com\r\nTo: carol@dest.test\r\nSubject: spool\r\n\r\n"
    return (head + line * (size // len(line) + 1))[:size - 2] + b"\r\n"


@dataclass
class RunningSpool:
    loop: asyncio.AbstractEventLoop
    directory: Path
    spool: Spool
    queue_ids: QueueIdGenerator
    appended: int = 0

    def envelopes(self, n: int) -> list[Envelope]:
        now = time.time()
        return [Envelope(self.queue_ids.next(), now, "127.0.0.1", "client.example.com", "bob@example.com",
                         ["carol@dest.test"], account="example", rule="loopback") for _ in range(n)]

    def append(self, envelopes: list[Envelope], body: bytes) -> list[Location]:
        """Append one message per envelope at once; return when every one is durable."""
        futures = [self.spool.append_message(envelope, (RECEIVED, body)) for envelope in envelopes]
        self.appended += len(futures)

        async def durable() -> list[Location | None]:
            return await asyncio.gather(*futures)

        locations = self.loop.run_until_complete(durable())
        written = [location for location in locations if location is not None]
        assert len(written) == len(locations), "a message record resolved to no location"
        return written


@pytest.fixture
def running_spool() -> Iterator[RunningSpool]:
    WORK_BASE.mkdir(parents=True, exist_ok=True)
    kind = filesystem_type(WORK_BASE)
    if kind in MEMORY_FILESYSTEMS:
        pytest.skip(f"{WORK_BASE} is on {kind}: fsync costs nothing there; "
                    "set FASTRELAY_BENCH_WORK to a directory on the disk")
    directory = Path(tempfile.mkdtemp(prefix="spool-", dir=WORK_BASE))
    loop = uvloop.new_event_loop()
    spool = Spool(directory)
    try:
        spool.recover()
        spool.start(loop)
        yield RunningSpool(loop, directory, spool, QueueIdGenerator())
    finally:
        spool.close()
        loop.close()
        shutil.rmtree(directory, ignore_errors=True)
        try:
            WORK_BASE.rmdir()   # only if nothing else (bench/e2e.py) uses it
        except OSError:
            pass


def count_batches(spool: Spool) -> list[int]:
    """Count the writer thread's batches (one fdatasync each): the Spool keeps no such count."""
    counter = [0]
    write_batch = spool._write_batch

    def counting(batch: Any) -> OSError | None:
        counter[0] += 1
        return write_batch(batch)

    spool._write_batch = counting   # type: ignore[method-assign]
    return counter


def record_rates(benchmark: Any, messages: int, size: int) -> None:
    # No stats under --benchmark-disable: the function ran once, untimed.
    if benchmark.stats is not None:
        median = benchmark.stats.stats.median
        benchmark.extra_info["messages_per_s"] = messages / median
        benchmark.extra_info["MB_per_s"] = messages * size / median / 1e6


def check_on_disk(running: RunningSpool, last: list[Location], body: bytes) -> None:
    """Every acknowledged record is on disk, and the last ones read back whole."""
    for location in last:
        assert location.body_len == len(RECEIVED) + len(body)
        assert running.spool.read_body(location) == RECEIVED + body
    assert len(Spool(running.directory).scan()) == running.appended


@pytest.mark.benchmark(group="spool: one append")
@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_one_append(benchmark: Any, running_spool: RunningSpool, size: int) -> None:
    body = content(size)

    # The envelope is made in setup: the round times the append and its wait.
    def one_envelope() -> tuple[tuple[list[Envelope], bytes], dict[str, Any]]:
        return (running_spool.envelopes(1), body), {}

    last = benchmark.pedantic(running_spool.append, setup=one_envelope, rounds=200, warmup_rounds=5)
    record_rates(benchmark, 1, size)
    check_on_disk(running_spool, last, body)


@pytest.mark.benchmark(group=f"spool: {CONCURRENT} concurrent")
@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_concurrent_appends(benchmark: Any, running_spool: RunningSpool, size: int) -> None:
    body = content(size)
    rounds, warmup = (100, 3) if size <= 1024 else (20, 2)
    batches = count_batches(running_spool.spool)
    made = [0]

    # All 100 appends are made before the loop runs, as sessions ending DATA
    # in the same loop iteration would; the writer thread wakes on the first
    # and may take it alone, then the rest as the next batch.
    def envelopes() -> tuple[tuple[list[Envelope], bytes], dict[str, Any]]:
        made[0] += 1
        return (running_spool.envelopes(CONCURRENT), body), {}

    last = benchmark.pedantic(running_spool.append, setup=envelopes, rounds=rounds, warmup_rounds=warmup)
    assert len(last) == CONCURRENT
    per_round = batches[0] / made[0]
    # One fdatasync per record would still pass every other check here.
    assert per_round <= 10, f"group commit made {per_round:.1f} batches of {CONCURRENT} appends"
    benchmark.extra_info["batches_per_round"] = per_round
    record_rates(benchmark, CONCURRENT, size)
    check_on_disk(running_spool, last, body)
