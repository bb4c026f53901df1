"""Soak (opt-in): half of peak load for 30 minutes; the relay's memory and open files stay flat.

The relay delivers to a sink (Postfix's smtp-sink when installed, else the
aiosmtpd sink of tests/sink.py), so the queue drains and what is measured is
the steady state, not a growing queue.  First 10 s of closed-loop load (every
session sends as fast as it is answered) give the peak rate; then the soak
offers half of it at a fixed rate, with connection reuse (each connection
carries up to 50 messages, then QUITs and a new one opens).  Every 10 s the
relay's VmRSS, its open files (/proc/PID/fd) and the spool's size on disk
are sampled.  Flat means: the largest sample of the last quarter is within
20% of the largest of the first quarter (files: within 20% or 10 fds).

Run:  FASTRELAY_SLOW=1 FASTRELAY_SOAK_SECONDS=1800 .venv/bin/python -m pytest \\
          tests/reliability/test_soak.py -s --timeout=0
(FASTRELAY_SOAK_SECONDS defaults to 1800; 180 checks that it works.)
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import RelayProcess, free_port, wait_port

from .helpers import delivery_to, open_fds, opt_in, rss_kib

SOAK_SECONDS = float(os.environ.get("FASTRELAY_SOAK_SECONDS", "1800"))
SAMPLE_EVERY = 10.0
SOAK_LIMITS = """
[limits.active]
user_messages_per_day = 1000000000
user_unique_recipients_per_day = 1000000000
org_recipients_per_day = 1000000000
org_recipients_per_10min = 1000000000
"""
SESSIONS = 8
MESSAGES_PER_CONNECTION = 50
MESSAGE = (b"From: bob@example.com\r\nTo: carol@dest.test\r\nSubject: soak\r\n\r\n"
           + b"soak test line of text, not much in it\r\n" * 20 + b".\r\n")


@dataclass
class LoadStats:
    sent: int = 0
    errors: list[str] = field(default_factory=list)
    connections: int = 0


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed by the relay")
        if line[3:4] != b"-":
            return line


async def _session(port: int, stats: LoadStats, stop_at: float, due: Callable[[], float | None]) -> None:
    while time.monotonic() < stop_at:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        stats.connections += 1
        try:
            assert (await _reply(reader)).startswith(b"220")
            writer.write(b"EHLO soak.example.com\r\n")
            assert (await _reply(reader)).startswith(b"250")
            for _ in range(MESSAGES_PER_CONNECTION):
                when = due()
                if when is None:
                    break
                delay = when - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                # RFC 2920: MAIL, RCPT and DATA in one write.
                writer.write(b"MAIL FROM:<bob@example.com>\r\nRCPT TO:<carol@dest.test>\r\nDATA\r\n")
                codes = [(await _reply(reader))[:3] for _ in range(3)]
                if codes != [b"250", b"250", b"354"]:
                    stats.errors.append(f"envelope: {codes}")
                    writer.write(b"RSET\r\n")
                    await _reply(reader)
                    continue
                writer.write(MESSAGE)
                final = await _reply(reader)
                if final.startswith(b"250"):
                    stats.sent += 1
                else:
                    stats.errors.append(final.decode(errors="replace").strip())
            writer.write(b"QUIT\r\n")
            await _reply(reader)
        except (OSError, ConnectionError, AssertionError) as exc:
            stats.errors.append(f"session: {exc!r}")
        finally:
            writer.close()


def run_load(port: int, seconds: float, rate: float | None) -> LoadStats:
    """``SESSIONS`` sessions for ``seconds``; at ``rate`` messages/s in all, or as fast as answered."""
    stats = LoadStats()
    start = time.monotonic()
    stop_at = start + seconds
    counter = iter(range(1 << 62))

    def due() -> float | None:
        if time.monotonic() >= stop_at:
            return None
        if rate is None:
            return 0.0
        when = start + next(counter) / rate
        return when if when < stop_at else None

    async def main() -> None:
        await asyncio.gather(*(_session(port, stats, stop_at, due) for _ in range(SESSIONS)))

    asyncio.run(main())
    return stats


def spool_bytes(relay: RelayProcess) -> int:
    return sum(p.stat().st_size for p in (relay.spool_dir / "segments").glob("*.log"))


@pytest.mark.slow
@opt_in
def test_soak_at_half_of_peak_memory_and_files_stay_flat(relay_factory: Callable[..., RelayProcess],
                                                        report: Callable[[str], None], tmp_path: Path) -> None:
    sink_port = free_port()
    sink: subprocess.Popen[bytes] | None = None
    aiosmtpd_sink = None
    if shutil.which("smtp-sink"):
        sink = subprocess.Popen(["smtp-sink", "-u", "nobody", f"127.0.0.1:{sink_port}", "256"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port("127.0.0.1", sink_port, proc=sink)
    else:
        from sink import Sink
        aiosmtpd_sink = Sink("127.0.0.1", sink_port).start()
    # Half of the peak is now ~2,000 msg/s: the default organisation limit
    # (319,444 recipients per 10 minutes) would refuse most of a 30-minute soak.
    relay = relay_factory(extra=delivery_to(sink_port, per_destination=20) + SOAK_LIMITS,
                          server_extra="max_connections_per_ip = 1000")
    assert relay.proc is not None
    pid = relay.proc.pid
    samples: list[tuple[float, int, int, int]] = []   # (t, rss KiB, fds, spool bytes)
    try:
        peak = run_load(relay.port, 10, None)
        peak_rate = peak.sent / 10
        assert peak.sent and not peak.errors, peak.errors[:5]
        rate = peak_rate / 2
        stop = threading.Event()

        def sample() -> None:
            t0 = time.monotonic()
            while not stop.wait(SAMPLE_EVERY):
                samples.append((time.monotonic() - t0, rss_kib(pid), open_fds(pid), spool_bytes(relay)))

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            soak = run_load(relay.port, SOAK_SECONDS, rate)
        finally:
            stop.set()
            sampler.join()
        assert relay.proc.poll() is None, "the relay died during the soak"
    finally:
        relay.stop()
        if sink is not None:
            sink.terminate()
            sink.wait(10)
        if aiosmtpd_sink is not None:
            aiosmtpd_sink.stop()
    lines = [f"{t:6.0f} s  RSS {r} KiB  fds {f}  spool {s // 1024} KiB" for t, r, f, s in samples]
    (tmp_path / "soak-samples.txt").write_text("\n".join(lines) + "\n")
    quarter = max(1, len(samples) // 4)
    first, last = samples[:quarter], samples[-quarter:]
    rss_first, rss_last = max(s[1] for s in first), max(s[1] for s in last)
    fds_first, fds_last = max(s[2] for s in first), max(s[2] for s in last)
    spool_first, spool_last = max(s[3] for s in first), max(s[3] for s in last)
    report(f"peak {peak_rate:.0f} msg/s (closed loop, {SESSIONS} sessions); soak {SOAK_SECONDS:.0f} s at "
           f"{rate:.0f} msg/s: {soak.sent} sent over {soak.connections} connections, {len(soak.errors)} errors; "
           f"RSS max first/last quarter {rss_first}/{rss_last} KiB, fds {fds_first}/{fds_last}, "
           f"spool {spool_first // 1024}/{spool_last // 1024} KiB, {len(samples)} samples")
    for line in lines:
        print(line)
    assert len(samples) >= 4, "too short a soak to compare quarters"
    assert not soak.errors, soak.errors[:10]
    assert soak.sent >= 0.9 * rate * SOAK_SECONDS, "the relay fell behind half of its own peak"
    assert rss_last <= 1.2 * rss_first, f"memory grew: {rss_first} -> {rss_last} KiB"
    assert fds_last <= max(1.2 * fds_first, fds_first + 10), f"open files grew: {fds_first} -> {fds_last}"
