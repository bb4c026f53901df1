"""The spool in process: fastrelay.spool.Spool on a temporary directory.

Each test runs the spool on the default asyncio loop and on uvloop (the
relay's loop).  Recovery is checked by opening a *new* Spool on the same
directory, as a restarted relay does.
"""

from __future__ import annotations

import asyncio
import errno
import os
import struct
import sys
import threading
import time
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from fastrelay._core import commit_records
from fastrelay.spool import (
    HEADER_SIZE,
    MAGIC,
    PREALLOCATE_BYTES,
    DeliveryState,
    Envelope,
    Location,
    MessageState,
    QueuedMessage,
    QueueIdGenerator,
    Spool,
    read_records,
)

T = TypeVar("T")
LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Awaitable[T]], T]:
    """Run a coroutine to completion on the loop under test."""
    factory = LOOPS[request.param]

    def runner(coro: Awaitable[T]) -> T:
        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(coro)  # type: ignore[arg-type]

    return runner


def envelope(n: int, **kw: Any) -> Envelope:
    return Envelope(
        queue_id=f"Q{n:06d}", arrival=1_700_000_000.0 + n, client_ip="127.0.0.1",
        client_helo="client.example.com", sender=f"s{n}@example.com",
        recipients=[f"r{n}@dest.test", f"x{n}@dest.test"], **kw,
    )


def body(n: int, size: int = 0) -> tuple[bytes, bytes]:
    """(Received header, content) as the server hands them to the spool."""
    header = f"Received: from client.example.com\r\n\tby relay id Q{n:06d}\r\n".encode()
    content = f"Subject: message {n}\r\n\r\n".encode() + bytes(range(256)) + b"\r\n"
    if size:
        content += b"x" * size + b"\r\n"
    return header, content


async def append(spool: Spool, numbers: range | list[int], size: int = 0) -> list[Location | None]:
    spool.start(asyncio.get_running_loop())
    try:
        return await asyncio.gather(*(spool.append_message(envelope(n), body(n, size)) for n in numbers))
    finally:
        spool.close()


def recovered(directory: Path) -> list[QueuedMessage]:
    spool = Spool(directory)
    try:
        return spool.recover()
    finally:
        spool.close()


def check_messages(directory: Path, messages: list[QueuedMessage], numbers: list[int], size: int = 0) -> None:
    spool = Spool(directory)
    assert [m.envelope for m in messages] == [envelope(n) for n in numbers]
    for m, n in zip(messages, numbers):
        assert spool.read_body(m) == b"".join(body(n, size))


def segments(directory: Path) -> list[str]:
    return sorted(p.name for p in (directory / "segments").glob("*.log"))


def record_ends(path: Path) -> list[int]:
    return [end for *_, end in read_records(path)]


# -- append and recover -----------------------------------------------------------------


def test_commit_records_writes_the_records_the_reader_checks(tmp_path: Path) -> None:
    """The compiled group commit frames records exactly as the format says (zlib's CRC-32 over
    envelope then body), from any buffer type, and across more parts than one pwritev takes."""
    many = [bytes([65 + i % 26]) * (i % 7 + 1) for i in range(3000)]   # > IOV_MAX (1024) parts
    frames: list[tuple[bytes, bytes, list[bytes | bytearray | memoryview]]] = [
        (b"M", b"envelope-1", [b"Subject: x\r\n", bytearray(b"\r\nbody\r\n"), memoryview(b"z" * 300_000)]),
        (b"S", b"state", []),
        (b"M", b"envelope-3", list(many)),
    ]
    path = tmp_path / "segment.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"x" * 10)   # records go at the offset given, not at the file's position
        written = commit_records(fd, 10, MAGIC, frames)
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert len(data) == 10 + written
    offset = 10
    for kind, env, body in frames:
        content = b"".join(bytes(part) for part in body)
        crc = zlib.crc32(content, zlib.crc32(env))
        header = struct.pack("<4scxxxIQI", MAGIC, kind, len(env), len(content), crc)
        assert len(header) == HEADER_SIZE
        end = offset + HEADER_SIZE + len(env) + len(content)
        assert data[offset:end] == header + env + content
        offset = end
    assert offset == len(data)
    (tmp_path / "clean.log").write_bytes(data[10:])
    got = [(kind, env, data[10 + start:10 + start + length])
           for kind, env, start, length, _ in read_records(tmp_path / "clean.log")]
    assert got == [(kind, env, b"".join(bytes(p) for p in body)) for kind, env, body in frames]


def test_commit_records_raises_the_write_error() -> None:
    """A failed write is an OSError with its errno (here a real one: /dev/full), never a short count."""
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        with pytest.raises(OSError) as failure:
            commit_records(fd, 0, MAGIC, [(b"M", b"env", [b"body"])])
    finally:
        os.close(fd)
    assert failure.value.errno == errno.ENOSPC
    with pytest.raises(ValueError):
        commit_records(1, 0, MAGIC, [(b"MM", b"env", [])])


def test_append_then_recover_every_message(tmp_path: Path, run: Callable[[Awaitable[Any]], Any]) -> None:
    spool = Spool(tmp_path)
    assert spool.recover() == []
    locations = run(append(spool, range(5)))
    # Each future resolved to where the body is; the body is readable there.
    for n, loc in enumerate(locations):
        assert isinstance(loc, Location)
        assert spool.read_body(loc) == b"".join(body(n))
    messages = recovered(tmp_path)
    check_messages(tmp_path, messages, list(range(5)))
    assert [Location(m.segment, m.body_offset, m.body_len) for m in messages] == locations
    assert all(m.state == DeliveryState(m.envelope.queue_id, MessageState.INCOMING) for m in messages)


def test_recent_bodies_are_kept_within_their_budget(tmp_path: Path, run: Callable[[Awaitable[Any]], Any]) -> None:
    spool = Spool(tmp_path)
    spool.recover()
    one = len(b"".join(body(0)))
    spool.recent_budget = 2 * one + one // 2       # room for two of the three

    async def scenario() -> None:
        spool.start(asyncio.get_running_loop())
        try:
            locations = [await spool.append_message(envelope(n), body(n)) for n in range(3)]
            kept = [loc for loc in locations if loc is not None and spool.recent_body(loc) is not None]
            assert len(kept) == 2
            for n, loc in enumerate(locations):
                assert loc is not None
                # From memory or from the segment, the same bytes.
                assert spool.read_body(loc) == b"".join(body(n))
                assert spool.recent_body(loc) in (None, b"".join(body(n)))
            for loc in kept:
                spool.release_body(loc)
                assert spool.recent_body(loc) is None
            # Released bytes make room again; with no budget nothing is kept.
            loc = await spool.append_message(envelope(3), body(3))
            assert loc is not None and spool.recent_body(loc) == b"".join(body(3))
            spool.recent_budget = 0
            loc = await spool.append_message(envelope(4), body(4))
            assert loc is not None and spool.recent_body(loc) is None
        finally:
            spool.close()

    run(scenario())


def test_a_segment_is_kept_while_a_batch_written_to_it_is_not_yet_counted(
        tmp_path: Path, run: Callable[[Awaitable[Any]], Any]) -> None:
    """The writer may write a batch into segment N, then open N+1 for the next one,
    before the loop has counted the first.  If the last counted message of N is done
    meanwhile, N must stay: it holds the uncounted one.  (Found under 10 MiB messages
    from 100 sessions: messages answered 250 whose segment had been deleted.)"""
    spool = Spool(tmp_path, segment_bytes=4096)
    spool.recover()

    async def scenario() -> None:
        spool.start(asyncio.get_running_loop())
        try:
            first = await spool.append_message(envelope(1), body(1))
            assert first is not None and first.segment == 1
            second = spool.append_message(envelope(2), body(2, size=5000))   # also in 1, filling it
            time.sleep(0.3)     # the loop stands still: the writer writes it, nobody counts it
            third = spool.append_message(envelope(3), body(3))               # opens segment 2
            time.sleep(0.3)
            spool.moved_out(first.segment)          # the first is delivered before the loop catches up
            located = await second
            assert located is not None and located.segment == 1 and (await third) is not None
            assert "00000001.log" in segments(tmp_path)
            assert spool.read_body(located) == b"".join(body(2, size=5000))
            spool.moved_out(located.segment)        # now segment 1 holds nothing live: it goes
            assert segments(tmp_path) == ["00000002.log"]
        finally:
            spool.close()

    run(scenario())
    assert [m.envelope.queue_id for m in recovered(tmp_path)] == ["Q000003"]


def test_a_body_released_while_it_is_joined_stays_released(tmp_path: Path) -> None:
    """read_body joins a kept body in a thread; if the loop releases it meanwhile,
    the join must not put it back (it would stay in memory, uncounted, for ever)."""
    spool = Spool(tmp_path)
    spool.recent_budget = 1 << 20
    where = Location(1, 100, 6)

    class ReleasedDuringTheJoin:
        def __iter__(self) -> Any:
            spool.release_body(where)
            return iter([b"abc", b"def"])

    spool._keep_recent(where, ReleasedDuringTheJoin())  # type: ignore[arg-type]
    assert spool.recent_body(where) == b"abcdef"
    assert spool.recent_body(where) is None and spool._recent_bytes == 0


def test_recover_across_several_starts(tmp_path: Path, run: Callable[[Awaitable[Any]], Any]) -> None:
    for start in range(3):
        spool = Spool(tmp_path)
        assert len(spool.recover()) == 2 * start
        run(append(spool, [2 * start, 2 * start + 1]))
    messages = recovered(tmp_path)
    check_messages(tmp_path, messages, list(range(6)))
    # Every start writes to a fresh segment.
    assert len({m.segment for m in messages}) == 3


def test_large_body(tmp_path: Path, run: Callable[[Awaitable[Any]], Any]) -> None:
    spool = Spool(tmp_path)
    spool.recover()
    run(append(spool, [1, 2], size=3 << 20))
    check_messages(tmp_path, recovered(tmp_path), [1, 2], size=3 << 20)


def test_scan_is_read_only(tmp_path: Path, run: Callable[[Awaitable[Any]], Any]) -> None:
    spool = Spool(tmp_path)
    spool.recover()
    run(append(spool, range(3)))
    [path] = (tmp_path / "segments").glob("*.log")
    with open(path, "ab") as f:
        f.write(b"torn")
    size = path.stat().st_size
    names = segments(tmp_path)
    assert [m.envelope.queue_id for m in Spool(tmp_path).scan()] == ["Q000000", "Q000001", "Q000002"]
    assert path.stat().st_size == size and segments(tmp_path) == names


# -- preallocation ---------------------------------------------------------------------------


def test_the_segment_is_preallocated_while_written_and_cut_to_its_records_when_finished(
        tmp_path: Path, run: Callable[[Awaitable[Any]], Any]) -> None:
    spool = Spool(tmp_path)
    spool.recover()
    [path] = (tmp_path / "segments").glob("*.log")

    async def go() -> tuple[int, int]:
        spool.start(asyncio.get_running_loop())
        try:
            await asyncio.gather(*(spool.append_message(envelope(n), body(n)) for n in range(3)))
            return path.stat().st_size, path.stat().st_blocks * 512
        finally:
            spool.close()

    size_while_open, allocated = run(go())
    ends = record_ends(path)
    assert len(ends) == 3
    # Written into space allocated ahead (PREALLOCATE_BYTES), not appended ...
    assert size_while_open == PREALLOCATE_BYTES and allocated >= PREALLOCATE_BYTES
    # ... and a closed segment is exactly its records.
    assert path.stat().st_size == ends[-1]


def test_a_crash_leaves_the_unused_reservation_which_recovery_cuts_quietly(
        tmp_path: Path, run: Callable[[Awaitable[Any]], Any], caplog: pytest.LogCaptureFixture) -> None:
    """The segment as a crash leaves it (copied while the spool runs): records, then zeros."""
    spool = Spool(tmp_path)
    spool.recover()
    [path] = (tmp_path / "segments").glob("*.log")
    crashed = tmp_path / "crashed"

    async def go() -> None:
        spool.start(asyncio.get_running_loop())
        try:
            await asyncio.gather(*(spool.append_message(envelope(n), body(n)) for n in range(4)))
            (crashed / "segments").mkdir(parents=True)
            (crashed / "segments" / path.name).write_bytes(path.read_bytes())
        finally:
            spool.close()

    run(go())
    image = crashed / "segments" / path.name
    assert image.stat().st_size == PREALLOCATE_BYTES > path.stat().st_size
    with caplog.at_level("DEBUG", logger="fastrelay.spool"):
        messages = recovered(crashed)
    check_messages(crashed, messages, list(range(4)))
    assert image.stat().st_size == path.stat().st_size
    assert "unused reservation" in caplog.text and "torn tail" not in caplog.text


def test_a_torn_write_into_the_reservation_is_still_a_torn_tail(
        tmp_path: Path, run: Callable[[Awaitable[Any]], Any], caplog: pytest.LogCaptureFixture) -> None:
    """Half a record, then zeros: the half record is cut with a warning, the rest recovers."""
    spool = Spool(tmp_path)
    spool.recover()
    run(append(spool, range(3)))
    [path] = (tmp_path / "segments").glob("*.log")
    ends = record_ends(path)
    data = path.read_bytes()
    path.write_bytes(data[:ends[1]] + data[ends[1]:ends[1] + 40] + bytes(PREALLOCATE_BYTES))
    messages = recovered(tmp_path)
    check_messages(tmp_path, messages, [0, 1])
    assert path.stat().st_size == ends[1]
    assert "torn tail" in caplog.text


# -- torn tails ----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["header", "envelope", "body", "last-byte"])
def test_torn_last_record_is_cut(tmp_path: Path, run: Callable[[Awaitable[Any]], Any], where: str) -> None:
    """A crash in the middle of the last write: recovery cuts it, earlier records survive."""
    spool = Spool(tmp_path)
    spool.recover()
    run(append(spool, range(3)))
    [path] = (tmp_path / "segments").glob("*.log")
    ends = record_ends(path)
    assert len(ends) == 3 and ends[-1] == path.stat().st_size
    last_start = ends[1]
    cut = {"header": last_start + 7, "envelope": last_start + HEADER_SIZE + 3,
           "body": last_start + (ends[2] - last_start) // 2 + 20, "last-byte": ends[2] - 1}[where]
    assert last_start < cut < ends[2]
    os.truncate(path, cut)

    messages = recovered(tmp_path)
    check_messages(tmp_path, messages, [0, 1])
    # The torn bytes are gone from disk, so nothing can ever be appended after them.
    assert path.stat().st_size == ends[1]
    # The spool goes on: new messages land in a new segment and recover with the old ones.
    spool = Spool(tmp_path)
    spool.recover()
    run(append(spool, [3]))
    check_messages(tmp_path, recovered(tmp_path), [0, 1, 3])


@pytest.mark.parametrize("where", ["header", "body"])
def test_damage_in_the_middle_keeps_later_records(tmp_path: Path, run: Callable[[Awaitable[Any]], Any],
                                                  where: str) -> None:
    """A damaged record (bad disk, not a crash) is skipped; acknowledged records after it survive."""
    spool = Spool(tmp_path)
    spool.recover()
    run(append(spool, range(4)))
    [path] = (tmp_path / "segments").glob("*.log")
    ends = record_ends(path)
    start = ends[0]  # the second record
    flip = start + 1 if where == "header" else ends[1] - 10
    data = bytearray(path.read_bytes())
    data[flip] ^= 0xFF
    path.write_bytes(bytes(data))
    messages = recovered(tmp_path)
    check_messages(tmp_path, messages, [0, 2, 3])
    assert path.stat().st_size == ends[-1]  # nothing was cut


@pytest.mark.parametrize("garbage", ["random", "zeros", "bad-magic", "bad-crc", "huge-length"])
def test_garbage_after_the_last_record_is_cut(tmp_path: Path, run: Callable[[Awaitable[Any]], Any],
                                              garbage: str) -> None:
    spool = Spool(tmp_path)
    spool.recover()
    run(append(spool, range(3)))
    [path] = (tmp_path / "segments").glob("*.log")
    good_size = path.stat().st_size
    data = path.read_bytes()
    first_record = data[:record_ends(path)[0]]
    tail = {
        "random": os.urandom(1000),
        "zeros": bytes(4096),                     # a file system that extended the file but lost the data
        "bad-magic": b"XXXX" + first_record[4:],
        "bad-crc": first_record[:-1] + bytes([first_record[-1] ^ 0x55]),
        "huge-length": MAGIC + b"M\0\0\0" + (10).to_bytes(4, "little") + (1 << 40).to_bytes(8, "little")
                       + bytes(4) + b"0123456789",
    }[garbage]
    with open(path, "ab") as f:
        f.write(tail)
    check_messages(tmp_path, recovered(tmp_path), [0, 1, 2])
    assert path.stat().st_size == good_size


# -- state records and segment deletion ------------------------------------------------------


def test_state_records(tmp_path: Path, run: Callable[[Awaitable[Any]], Any]) -> None:
    spool = Spool(tmp_path)
    spool.recover()

    async def go() -> None:
        spool.start(asyncio.get_running_loop())
        await asyncio.gather(*(spool.append_message(envelope(n), body(n)) for n in range(4)))
        await spool.append_state(DeliveryState("Q000001", MessageState.DONE))
        await spool.append_state(DeliveryState("Q000002", MessageState.DEFERRED, attempts=1, next_attempt=5.0))
        # The newest state record of a queue id wins.
        await spool.append_state(DeliveryState("Q000002", MessageState.DEFERRED, attempts=2, next_attempt=9.0,
                                               done_recipients=[1], last_error="451 4.3.0 try later"))
        await spool.append_state(DeliveryState("Q000003", MessageState.HOLD))
        # A state about a message the spool never had changes nothing.
        await spool.append_state(DeliveryState("Q999999", MessageState.DEFERRED))
        spool.close()

    run(go())
    messages = recovered(tmp_path)
    check_messages(tmp_path, messages, [0, 2, 3])
    assert [m.state for m in messages] == [
        DeliveryState("Q000000", MessageState.INCOMING),
        DeliveryState("Q000002", MessageState.DEFERRED, attempts=2, next_attempt=9.0, done_recipients=[1],
                      last_error="451 4.3.0 try later"),
        DeliveryState("Q000003", MessageState.HOLD),
    ]


def live_ids(directory: Path) -> list[str]:
    """What a reader beside the running spool finds on disk (as ``fastrelay queue list`` does)."""
    return [m.envelope.queue_id for m in Spool(directory).scan()]


async def eventually(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    """Poll until ``predicate`` holds or ``seconds`` pass (the caller then asserts)."""
    for _ in range(int(seconds / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)


def recovered_spool(directory: Path, monkeypatch: pytest.MonkeyPatch, done_flush_delay: float) -> Spool:
    """A spool ready to start, whose deferred "done" records wait ``done_flush_delay`` seconds."""
    monkeypatch.setattr("fastrelay.spool.DONE_FLUSH_DELAY", done_flush_delay)
    spool = Spool(directory)
    spool.recover()
    return spool


def test_done_record_rides_with_the_next_commit(tmp_path: Path, run: Callable[[Awaitable[Any]], Any],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # A "done" nobody waits for gets no fdatasync of its own: the next commit carries it.
    spool = recovered_spool(tmp_path, monkeypatch, 3600.0)

    async def go() -> None:
        spool.start(asyncio.get_running_loop())
        await asyncio.gather(*(spool.append_message(envelope(n), body(n)) for n in range(2)))
        spool.post_state(DeliveryState("Q000000", MessageState.DONE), deferrable=True)
        await asyncio.sleep(0.2)
        assert live_ids(tmp_path) == ["Q000000", "Q000001"]   # not written yet
        await spool.append_message(envelope(2), body(2))
        assert live_ids(tmp_path) == ["Q000001", "Q000002"]   # written with message 2
        # A "done" someone waits for is written at once.
        await spool.append_state(DeliveryState("Q000001", MessageState.DONE))
        assert live_ids(tmp_path) == ["Q000002"]
        spool.post_state(DeliveryState("Q000002", MessageState.DONE), deferrable=True)
        spool.close()   # and closing writes what is pending

    run(go())
    assert recovered(tmp_path) == []


def test_done_record_is_flushed_after_its_delay(tmp_path: Path, run: Callable[[Awaitable[Any]], Any],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    spool = recovered_spool(tmp_path, monkeypatch, 0.05)

    async def go() -> list[str]:
        spool.start(asyncio.get_running_loop())
        await spool.append_message(envelope(0), body(0))
        spool.post_state(DeliveryState("Q000000", MessageState.DONE), deferrable=True)
        await eventually(lambda: not live_ids(tmp_path))
        live = live_ids(tmp_path)
        spool.close()
        return live

    assert run(go()) == []


def test_other_records_are_written_at_once(tmp_path: Path, run: Callable[[Awaitable[Any]], Any],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # Only what the caller says may wait is put off: a crash must not undo a
    # hold, or an administrator's delete.
    spool = recovered_spool(tmp_path, monkeypatch, 3600.0)

    async def go() -> None:
        spool.start(asyncio.get_running_loop())
        await asyncio.gather(*(spool.append_message(envelope(n), body(n)) for n in range(3)))
        spool.post_state(DeliveryState("Q000000", MessageState.HOLD))
        spool.post_state(DeliveryState("Q000001", MessageState.DEFERRED, attempts=1, next_attempt=5.0))
        spool.post_state(DeliveryState("Q000002", MessageState.DONE))
        await eventually(lambda: len(live_ids(tmp_path)) == 2
                         and all(m.state.state != MessageState.INCOMING for m in Spool(tmp_path).scan()))
        assert [m.state.state for m in Spool(tmp_path).scan()] == [MessageState.HOLD, MessageState.DEFERRED]
        spool.close()

    run(go())


def test_sync_resolves_once_everything_before_it_is_on_disk(tmp_path: Path,
                                                            run: Callable[[Awaitable[Any]], Any],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # An administrator's hold or delete is answered after sync(): what was
    # posted before it, deferred "done" records included, is then on disk.
    spool = recovered_spool(tmp_path, monkeypatch, 3600.0)

    async def go() -> None:
        spool.start(asyncio.get_running_loop())
        await spool.sync()                     # nothing pending: resolves all the same
        await asyncio.gather(*(spool.append_message(envelope(n), body(n)) for n in range(3)))
        spool.post_state(DeliveryState("Q000000", MessageState.DONE), deferrable=True)
        spool.post_state(DeliveryState("Q000001", MessageState.HOLD))
        await spool.sync()
        assert [(m.envelope.queue_id, m.state.state) for m in Spool(tmp_path).scan()] == \
            [("Q000001", MessageState.HOLD), ("Q000002", MessageState.INCOMING)]
        # Many waiters while a batch is being written: each resolves after its records.
        for n in range(3, 40):
            spool.post_state(DeliveryState("Q000002", MessageState.DEFERRED, attempts=n, next_attempt=5.0))
            if n % 4 == 0:
                await spool.sync()
                assert [m.state.attempts for m in Spool(tmp_path).scan()][-1] == n
        spool.close()

    run(go())


def test_done_segments_are_deleted(tmp_path: Path, run: Callable[[Awaitable[Any]], Any]) -> None:
    spool = Spool(tmp_path)
    spool.recover()
    run(append(spool, range(3)))                       # segment 1
    assert segments(tmp_path) == ["00000001.log"]

    spool = Spool(tmp_path)
    assert len(spool.recover()) == 3                   # writes go to segment 2 now

    async def finish() -> None:
        spool.start(asyncio.get_running_loop())
        for n in (0, 1):
            await spool.append_state(DeliveryState(f"Q{n:06d}", MessageState.DONE))
        assert segments(tmp_path) == ["00000001.log", "00000002.log"]   # message 2 still lives in 1
        await spool.append_state(DeliveryState("Q000002", MessageState.DONE))
        assert segments(tmp_path) == ["00000002.log"]
        spool.close()

    run(finish())
    assert recovered(tmp_path) == []
    # At the next start segment 2 (state records only) goes too.
    assert segments(tmp_path) == ["00000003.log"]


def test_scan_beside_a_running_spool_that_deletes_segments(tmp_path: Path,
                                                           run: Callable[[Awaitable[Any]], Any]) -> None:
    """`fastrelay queue list` reads the spool while the relay runs: segments the relay
    deletes between the listing and the open are skipped, never an error."""
    spool = Spool(tmp_path, segment_bytes=2048)    # a new segment every few messages
    spool.recover()
    scans: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def scan_again_and_again() -> None:
        while not stop.is_set():
            try:
                scans.append(len(Spool(tmp_path).scan()))
            except BaseException as exc:  # noqa: BLE001 - the failure is what the test reports
                errors.append(exc)
                return

    async def churn() -> None:
        spool.start(asyncio.get_running_loop())
        reader = threading.Thread(target=scan_again_and_again)
        reader.start()
        try:
            for first in range(0, 600, 6):
                numbers = range(first, first + 6)
                await asyncio.gather(*(spool.append_message(envelope(n), body(n)) for n in numbers))
                await asyncio.gather(*(spool.append_state(DeliveryState(f"Q{n:06d}", MessageState.DONE))
                                       for n in numbers))
            await spool.append_message(envelope(600), body(600))   # one stays live
        finally:
            stop.set()
            reader.join()
            spool.close()

    # Threads switch every few microseconds instead of every 5 ms, so that the relay's
    # deletions land inside the scans (between a segment's listing and its open).
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        run(churn())
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    assert len(scans) > 10                              # the scans did overlap the deletions
    assert [m.envelope.queue_id for m in Spool(tmp_path).scan()] == ["Q000600"]


def test_newer_segment_waits_for_older_live_ones(tmp_path: Path, run: Callable[[Awaitable[Any]], Any]) -> None:
    """A segment may hold the state of a message in an older segment: it stays while that one lives."""
    spool = Spool(tmp_path)
    spool.recover()
    run(append(spool, [0]))                            # segment 1: message 0

    spool = Spool(tmp_path)
    spool.recover()                                    # segment 2

    async def second() -> None:
        spool.start(asyncio.get_running_loop())
        await spool.append_message(envelope(1), body(1))
        await spool.append_state(DeliveryState("Q000000", MessageState.DEFERRED, attempts=4))
        spool.close()

    run(second())

    spool = Spool(tmp_path)
    assert [m.state.attempts for m in spool.recover()] == [4, 0]      # segment 3

    async def third() -> None:
        spool.start(asyncio.get_running_loop())
        await spool.append_state(DeliveryState("Q000001", MessageState.DONE))
        spool.close()

    run(third())
    # Segment 2 has no live message left, but it holds message 0's state.
    assert segments(tmp_path) == ["00000001.log", "00000002.log", "00000003.log"]
    [m] = recovered(tmp_path)
    assert m.envelope == envelope(0) and m.state == DeliveryState("Q000000", MessageState.DEFERRED, attempts=4)


def test_a_message_copied_forward_keeps_its_state_and_frees_the_old_segment(
        tmp_path: Path, run: Callable[[Awaitable[Any]], Any]) -> None:
    """Copy-forward as the queue manager does it: message again, its state again, then
    moved_out.  A crash after the message record alone leaves the old state in charge;
    after both, the old segments go and recovery finds the copy with its state."""
    spool = Spool(tmp_path)
    spool.recover()
    run(append(spool, [0]))                                      # segment 1: message 0

    spool = Spool(tmp_path)
    [m0] = spool.recover()                                       # segment 2
    old = Location(m0.segment, m0.body_offset, m0.body_len)
    assert spool.head_segment(min_age=3600) is None              # closed just now
    assert spool.head_segment(min_age=0) == 1

    async def copy_message_only() -> None:
        spool.start(asyncio.get_running_loop())
        await spool.append_state(DeliveryState("Q000000", MessageState.DEFERRED, attempts=3, last_error="451"))
        await spool.append_message(envelope(0), (spool.read_body(old),))
        spool.close()                                            # "crash" before the state

    run(copy_message_only())
    spool = Spool(tmp_path)
    [m] = spool.recover()                                        # segment 3
    assert m.segment == 2 and m.state.attempts == 3              # the copy, with the older state
    assert segments(tmp_path) == ["00000002.log", "00000003.log"]   # nothing lives in 1 now
    moved_from = m.segment

    async def copy_fully() -> Location | None:
        spool.start(asyncio.get_running_loop())
        new = await spool.append_message(envelope(0), (spool.read_body(m),))
        await spool.append_state(m.state)
        spool.moved_out(moved_from)
        spool.close()
        return new

    assert spool.head_segment(min_age=0) == 2
    new = run(copy_fully())
    assert new is not None and new.segment == 3
    assert segments(tmp_path) == ["00000003.log"]
    [again] = recovered(tmp_path)
    assert again.segment == 3 and again.state == m.state
    check_messages(tmp_path, [again], [0])


# -- group commit ------------------------------------------------------------------------------


def test_concurrent_appends_share_fsyncs(tmp_path: Path, run: Callable[[Awaitable[Any]], Any]) -> None:
    """200 transactions at once: a handful of batches (one fdatasync each), not 200.

    To make the count deterministic the writer thread is held at its first
    batch until every append is queued (a wrapper around the real method: the
    writes and fsyncs themselves are real).
    """
    spool = Spool(tmp_path)
    spool.recover()
    gate = threading.Event()
    batches: list[int] = []
    real_write = spool._write_batch

    def held_write(batch: Any) -> Any:
        gate.wait(30)
        batches.append(len(batch.futures))
        return real_write(batch)

    spool._write_batch = held_write  # type: ignore[method-assign]

    async def go() -> list[Location | None]:
        spool.start(asyncio.get_running_loop())

        # As 200 sessions finishing DATA in the same loop iteration do.
        futures = [spool.append_message(envelope(n), body(n)) for n in range(200)]
        gate.set()
        try:
            return await asyncio.gather(*futures)
        finally:
            spool.close()

    locations = run(go())
    assert sum(batches) == 200 and len(batches) <= 2, batches
    assert len({loc for loc in locations}) == 200
    check_messages(tmp_path, recovered(tmp_path), list(range(200)))


# -- queue ids -----------------------------------------------------------------------------------


def test_queue_ids_unique_and_time_ordered() -> None:
    gen = QueueIdGenerator()
    ids = [gen.next() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids, key=lambda i: (len(i), i))
    assert all(c in QueueIdGenerator.ALPHABET for c in "".join(ids))
    # A later generator (a restart) continues above the earlier ids.
    later = QueueIdGenerator().next()
    assert (len(later), later) > (len(ids[0]), ids[0])


def test_more_parts_than_one_writev_takes(tmp_path: Path, run: Callable[[Awaitable[Any]], Any]) -> None:
    """A batch of over IOV_MAX (1024) parts is written in several writev calls, in order."""
    spool = Spool(tmp_path)
    spool.recover()
    numbers = list(range(600))  # 600 records of 4 parts each: 2,400 parts in one batch at most
    run(append(spool, numbers))
    check_messages(tmp_path, recovered(tmp_path), numbers)
