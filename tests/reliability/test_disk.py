"""A spool on a disk that fills up or turns read-only: 452 4.3.1, nothing lost, recovery.

Each test makes a small ext4 filesystem (a loop-mounted image, as root) and
mounts it as the relay's spool directory, then makes it fail for real: filled
to ENOSPC by a big file, made immutable with ``chattr +i`` (writes through the
relay's open segment then fail with EPERM), mounted read-only, or failed by
ext4 itself (``errors=remount-ro``).  The promise checked every time: a
message the relay cannot make durable gets ``452 4.3.1 Insufficient system
storage`` (never a 250), every message acknowledged before is still in the
spool byte for byte, no torn record is left behind, and mail is accepted
again as soon as the disk can take it.  Skipped where mounting is not allowed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import RawClient, RelayProcess, free_port, queue_id_of, split_received

from fastrelay import replies
from fastrelay.spool import PREALLOCATE_BYTES, MessageState, Spool

from .helpers import SmallFilesystem, delivery_to, wait_for

HELO = "client.example.com"
SENDER = "bob@example.com"
RCPT = "carol@dest.test"
TOKEN = re.compile(rb"^Subject: disk (\S+)\r\n", re.MULTILINE)
STORAGE_FULL = replies.STORAGE_FULL.removesuffix(b"\r\n")

MountFs = Callable[..., SmallFilesystem]


def content(token: str, size: int) -> bytes:
    head = f"Subject: disk {token}\r\nMessage-ID: <{token}@example.com>\r\n\r\n".encode()
    line = (token + " " + "y" * 70)[:70].encode() + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


class Ledger:
    """Messages sent in a test, and the ones the relay acknowledged."""

    def __init__(self) -> None:
        self.sent: dict[str, bytes] = {}
        self.acked: dict[str, str] = {}      # queue id -> token
        self.refused: set[str] = set()

    def transaction(self, client: RawClient, token: str, size: int = 2000) -> bytes:
        """One MAIL/RCPT/DATA on ``client``; the reply to the final dot."""
        body = content(token, size)
        self.sent[token] = body
        client.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n".encode())
        assert [client.reply()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
        reply = client.cmd(body + b".")
        if reply.startswith(b"250 "):
            self.acked[queue_id_of(reply)] = token
        else:
            self.refused.add(token)
        return reply

    def check_spool(self, relay: RelayProcess, context: str) -> int:
        """Every acknowledged message is in the spool, whole; no refused one is."""
        found: dict[str, str] = {}
        for envelope, body in relay.queued():
            qid = envelope.queue_id  # type: ignore[attr-defined]
            _, stored = split_received(body, qid)
            m = TOKEN.match(stored)
            assert m is not None, f"{context}: {qid}: not a message of this test"
            token = m.group(1).decode()
            assert token not in self.refused, f"{context}: {token} was refused with 452 but is in the spool"
            assert stored == self.sent[token], f"{context}: {qid} ({token}) is not what was sent"
            assert envelope.recipients == [RCPT], context  # type: ignore[attr-defined]
            found[qid] = token
        missing = {q: t for q, t in self.acked.items() if found.get(q) != t}
        assert not missing, f"{context}: acknowledged with 250 but not in the spool: {missing}"
        return len(found)


def client_for(relay: RelayProcess) -> RawClient:
    client = RawClient(relay.port)
    assert client.cmd(f"EHLO {HELO}".encode())[:3] == b"250"
    return client


def segment_sizes(relay: RelayProcess) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted((relay.spool_dir / "segments").glob("*.log"))}


def restart_and_check(relay: RelayProcess, ledger: Ledger, context: str) -> None:
    assert relay.stop() == 0, relay.log()[-2000:]
    relay.start()
    count = ledger.check_spool(relay, f"{context}, after a restart")
    relay.wait_log(f"spool: {count} queued message(s) recovered")
    assert count == len(ledger.acked)


def test_disk_full_answers_452_keeps_what_was_accepted_and_recovers(small_fs: MountFs,
                                                                     relay_factory: Callable[..., RelayProcess],
                                                                     report: Callable[[str], None]) -> None:
    relay = relay_factory(start=False)
    fs = small_fs(relay.spool_dir, 16)
    relay.start()
    ledger = Ledger()
    client = client_for(relay)
    for i in range(5):
        assert ledger.transaction(client, f"before-{i}")[:4] == b"250 "
    filler = fs.fill()
    report(f"spool filesystem filled: {fs.free_bytes()} bytes left")
    # The spool allocates its segment PREALLOCATE_BYTES ahead of its writes:
    # that space still takes messages. Once it is used, a message needs new
    # blocks, and there are none.
    reserve = 0
    while (reply := ledger.transaction(client, f"reserve-{reserve}", size=64 * 1024))[:4] == b"250 ":
        reserve += 1
        assert reserve <= PREALLOCATE_BYTES // (64 * 1024) + 1, "accepted more than the reservation holds"
    assert reply == STORAGE_FULL
    report(f"accepted into the spool's reservation after the disk filled: {reserve} message(s) of 64 KiB")
    before = segment_sizes(relay)
    for i in range(3):
        assert ledger.transaction(client, f"full-{i}", size=64 * 1024) == STORAGE_FULL
    other = client_for(relay)
    assert ledger.transaction(other, "full-other", size=64 * 1024) == STORAGE_FULL
    # The refused transactions left the sessions usable, and the segment as it was
    # (a write that failed half-way was cut back: no torn record).
    assert client.cmd(b"NOOP")[:3] == b"250"
    assert segment_sizes(relay) == before
    log = relay.wait_log("spool write failed")
    assert "No space left on device" in log
    assert "Traceback" not in log
    ledger.check_spool(relay, "disk full")

    filler.unlink()
    assert ledger.transaction(client, "after-0", size=64 * 1024)[:4] == b"250 "
    assert ledger.transaction(other, "after-1", size=64 * 1024)[:4] == b"250 "
    client.close()
    other.close()
    assert ledger.check_spool(relay, "space back") == 7 + reserve
    restart_and_check(relay, ledger, "disk full")


def test_immutable_spool_answers_452_then_accepts_again(small_fs: MountFs,
                                                         relay_factory: Callable[..., RelayProcess]) -> None:
    """chattr +i: the kernel refuses writes through the relay's open segment (EPERM)."""
    relay = relay_factory(start=False)
    fs = small_fs(relay.spool_dir, 16)
    relay.start()
    ledger = Ledger()
    client = client_for(relay)
    for i in range(3):
        assert ledger.transaction(client, f"before-{i}")[:4] == b"250 "
    segments = relay.spool_dir / "segments"
    locked = [segments, *segments.glob("*.log")]
    fs.immutable(True, locked)
    try:
        before = segment_sizes(relay)
        assert ledger.transaction(client, "locked-0") == STORAGE_FULL
        assert ledger.transaction(client, "locked-1", size=100) == STORAGE_FULL
        assert segment_sizes(relay) == before
        assert "Operation not permitted; answered 452" in relay.wait_log("answered 452")
    finally:
        fs.immutable(False, locked)
    assert ledger.transaction(client, "after")[:4] == b"250 "
    client.close()
    assert ledger.check_spool(relay, "immutable") == 4
    restart_and_check(relay, ledger, "immutable")


def test_read_only_spool_refuses_to_start_then_recovers_everything(small_fs: MountFs,
                                                                   relay_factory: Callable[..., RelayProcess]
                                                                   ) -> None:
    """``mount -o remount,ro`` is refused (EBUSY) while the relay holds its segment open
    for writing, so a read-only spool is met at start: the relay must not start
    (it could not make anything durable) and must say why."""
    relay = relay_factory(start=False)
    fs = small_fs(relay.spool_dir, 16)
    relay.start()
    ledger = Ledger()
    client = client_for(relay)
    for i in range(3):
        assert ledger.transaction(client, f"before-{i}")[:4] == b"250 "
    client.close()
    busy = subprocess.run(["mount", "-o", "remount,ro", str(fs.mountpoint)], capture_output=True, text=True,
                          check=False)
    assert busy.returncode != 0, "the kernel let a filesystem with a file open for writing go read-only"
    assert relay.stop() == 0
    subprocess.run(["mount", "-o", "remount,ro", str(fs.mountpoint)], check=True, capture_output=True)
    started = subprocess.run([sys.executable, "-m", "fastrelay", "serve", "--config", str(relay.config_path)],
                             capture_output=True, text=True, timeout=60, cwd=relay.directory, check=False)
    assert started.returncode == 1, started.stderr
    assert "cannot start" in started.stderr and "Read-only file system" in started.stderr
    ledger.check_spool(relay, "read-only")   # untouched
    subprocess.run(["mount", "-o", "remount,rw", str(fs.mountpoint)], check=True, capture_output=True)
    relay.start()
    relay.wait_log("spool: 3 queued message(s) recovered")
    client = client_for(relay)
    assert ledger.transaction(client, "after")[:4] == b"250 "
    client.close()
    assert ledger.check_spool(relay, "writable again") == 4


def test_filesystem_failing_under_the_relay_answers_452_and_nothing_is_lost(
        small_fs: MountFs, relay_factory: Callable[..., RelayProcess]) -> None:
    """ext4 with errors=remount-ro hits an error (its trigger_fs_error test hook): every write
    fails with EROFS from then on, as after a real disk error.  The relay answers 452, stops
    cleanly on SIGTERM, and after fsck and a new mount recovers every acknowledged message."""
    relay = relay_factory(start=False)
    fs = small_fs(relay.spool_dir, 16, "errors=remount-ro")
    trigger = Path(f"/sys/fs/ext4/{fs.device}/trigger_fs_error")
    if not trigger.exists():
        pytest.skip(f"{trigger} is not available on this kernel")
    relay.start()
    ledger = Ledger()
    client = client_for(relay)
    for i in range(3):
        assert ledger.transaction(client, f"before-{i}")[:4] == b"250 "
    trigger.write_text("fastrelay reliability test\n")
    assert ledger.transaction(client, "failed-0") == STORAGE_FULL
    assert ledger.transaction(client, "failed-1") == STORAGE_FULL
    assert "Read-only file system; answered 452" in relay.wait_log("answered 452")
    client.close()
    # SIGTERM: the relay must still stop (and say 0) with its spool directory read-only.
    assert relay.stop() == 0, relay.log()[-3000:]
    fs.unmount()
    subprocess.run(["e2fsck", "-fy", str(fs.image)], capture_output=True, check=False)
    fs.remount_image()
    wait_for(lambda: fs.mountpoint.is_mount(), 5, "the filesystem to be mounted again")
    relay.start()
    relay.wait_log("spool: 3 queued message(s) recovered")
    assert ledger.check_spool(relay, "after fsck") == 3
    client = client_for(relay)
    assert ledger.transaction(client, "after")[:4] == b"250 "
    client.close()
    assert ledger.check_spool(relay, "after fsck") == 4


def queue_command(relay: RelayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastrelay", "queue", *args, "--config", str(relay.config_path)],
                          capture_output=True, text=True, timeout=30, check=False)


def test_queue_hold_is_answered_only_once_it_is_on_disk(small_fs: MountFs,
                                                        relay_factory: Callable[..., RelayProcess]) -> None:
    """An administrator's ``queue hold`` says "on hold" only once its record is fsynced:
    a crash right after the answer keeps the hold, and a spool that cannot take the
    record makes the command fail and say so, rather than report a hold a restart undoes."""
    nobody = free_port()   # nothing listens there: every delivery is deferred
    relay = relay_factory(start=False, extra=delivery_to(nobody, retry='["1h"]'))
    fs = small_fs(relay.spool_dir, 16)
    relay.start()
    ledger = Ledger()
    client = client_for(relay)
    for i in range(2):
        assert ledger.transaction(client, f"held-{i}")[:4] == b"250 "
    client.close()
    first, second = ledger.acked
    relay.wait_log(f"{first}: deferred")
    relay.wait_log(f"{second}: deferred")

    segments = relay.spool_dir / "segments"
    locked = [segments, *segments.glob("*.log")]
    fs.immutable(True, locked)
    try:
        refused = queue_command(relay, "hold", first)
    finally:
        fs.immutable(False, locked)
    assert refused.returncode == 1, refused.stdout
    assert f"{first}: on hold, but not saved" in refused.stderr and "Operation not permitted" in refused.stderr

    held = queue_command(relay, "hold", second)
    assert held.returncode == 0 and f"{second}: on hold" in held.stdout, held.stderr
    relay.kill()   # at once: the answer promised the record is on disk
    states = {m.envelope.queue_id: m.state.state for m in Spool(relay.spool_dir).scan()}
    assert states == {first: MessageState.DEFERRED, second: MessageState.HOLD}
    assert ledger.check_spool(relay, "after the kill") == 2
