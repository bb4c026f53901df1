"""Transaction latency (p50/p99) at a fixed concurrency: fastrelay against Postfix and the others.

smtp-source gives throughput only, so this is a small uvloop client: CONCURRENCY
workers, each running transactions back to back (closed loop, no pipelining,
one command at a time like smtp-source), timing each one:

* ``new``: connect, banner, EHLO, MAIL, RCPT, DATA, content, until the 250 after
  the final dot (then QUIT, not timed): what a client waits per message when it
  opens a connection for each.
* ``reuse``: MAIL, RCPT, DATA, content, until the 250, on a connection kept open.

The servers are bench/e2e.py's (started fresh per run, on free loopback ports);
runs are interleaved and each figure is the median over runs.  The client is
Python: on a 2-core machine it competes with the server for CPU, so compare
servers with each other, not with absolute targets.

Usage: .venv/bin/python bench/latency.py [--runs 3] [--messages 3000] [--concurrency 20]
                                           [--servers fastrelay postfix ...] [--size 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # the servers and the work directory (after the sys.path line)

HELO = b"EHLO client.example.com\r\n"
MAIL = b"MAIL FROM:<from@example.com>\r\n"
RCPT = b"RCPT TO:<to@example.net>\r\n"
DATA = b"DATA\r\n"
QUIT = b"QUIT\r\n"


def content(size: int) -> bytes:
    line = b"X" * 78 + b"\r\n"
    body = b"From: <from@example.com>\r\nTo: <to@example.net>\r\nSubject: latency\r\n\r\n"
    body += line * max(1, (size - len(body)) // len(line))
    return body + b".\r\n"


async def reply(reader: asyncio.StreamReader) -> bytes:
    """Read one (possibly multi-line) reply; raise on anything but 2xx/3xx."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        if line[3:4] != b"-":
            if line[:1] not in (b"2", b"3"):
                raise RuntimeError(line.decode(errors="replace").strip())
            return line


async def transaction(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> None:
    for cmd in (MAIL, RCPT, DATA):
        writer.write(cmd)
        await reply(reader)
    writer.write(body)
    await reply(reader)


async def worker(port: int, mode: str, body: bytes, quota: list[int], times: list[float], deadline: float) -> None:
    loop = asyncio.get_running_loop()
    reader = writer = None
    try:
        while quota[0] > 0 and loop.time() < deadline:
            quota[0] -= 1
            t0 = time.perf_counter()
            if writer is None:
                reader, writer = await asyncio.open_connection(e2e.HOST, port)
                await reply(reader)
                writer.write(HELO)
                await reply(reader)
            assert reader is not None
            await transaction(reader, writer, body)
            times.append(time.perf_counter() - t0)
            if mode == "new":
                writer.write(QUIT)
                await reply(reader)
                writer.close()
                await writer.wait_closed()
                reader = writer = None
    finally:
        if writer is not None:
            writer.write(QUIT)
            writer.close()


async def load(port: int, mode: str, messages: int, concurrency: int, size: int, timeout: float) -> tuple[list[float], float]:
    loop = asyncio.get_running_loop()
    body, quota, times = content(size), [messages], []  # type: ignore[var-annotated]
    deadline = loop.time() + timeout
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(port, mode, body, quota, times, deadline) for _ in range(concurrency)))
    return times, time.perf_counter() - t0


def pct(sorted_xs: list[float], p: float) -> float:
    if not sorted_xs:
        return float("nan")
    k = min(len(sorted_xs) - 1, max(0, round(p / 100 * len(sorted_xs)) - 1))
    return sorted_xs[k]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--messages", type=int, default=3000, help="transactions per run (default 3000)")
    ap.add_argument("--concurrency", type=int, default=20)
    ap.add_argument("--size", type=int, default=1024, help="approximate content bytes (default 1024)")
    ap.add_argument("--modes", nargs="*", default=["new", "reuse"], choices=["new", "reuse"])
    ap.add_argument("--servers", nargs="*", default=["fastrelay", "postfix", "postfix-hold", "floor"],
                    choices=sorted(e2e.SERVERS))
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds before a run stops early")
    ap.add_argument("--out", default=str(e2e.BENCH / "results"))
    args = ap.parse_args()

    e2e.WORK_BASE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="latency-", dir=e2e.WORK_BASE))
    work.chmod(0o755)
    servers = {name: e2e.SERVERS[name](work) for name in args.servers}
    # results[mode][server] = list of (p50, p99, max, rate) per run
    results: dict[str, dict[str, list[tuple[float, float, float, float]]]] = {}
    notes: list[str] = []
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    for mode in args.modes:
        for rnd in range(args.runs):
            order = args.servers if rnd % 2 == 0 else args.servers[::-1]
            for name in order:
                server = servers[name]
                server.start()
                try:
                    times, seconds = uvloop.run(load(server.port, mode, args.messages, args.concurrency,
                                                     args.size, args.timeout))
                except Exception as exc:  # noqa: BLE001  (a refused or broken run is reported, not fatal)
                    times, seconds = [], 1.0
                    notes.append(f"{mode} {name} round {rnd}: {exc!r}")
                finally:
                    server.stop()
                    server.cleanup()
                times.sort()
                row = (1000 * pct(times, 50), 1000 * pct(times, 99), 1000 * (times[-1] if times else float("nan")),
                       len(times) / seconds)
                results.setdefault(mode, {}).setdefault(name, []).append(row)
                print(f"{mode:>5} round {rnd} {name:>13}: p50 {row[0]:7.2f} ms  p99 {row[1]:7.2f} ms  "
                      f"max {row[2]:7.1f} ms  {row[3]:7,.0f} tx/s ({len(times)} tx)", flush=True)

    machine = e2e.machine()
    lines = [f"# Transaction latency at concurrency {args.concurrency}, {started}", "",
             (f"`{' '.join(['latency.py', *sys.argv[1:]])}`: {args.messages} transactions of "
              f"~{args.size} bytes per run, {args.runs} interleaved runs, medians over runs; "
              f"machine: {machine['nproc']} cores, {machine['cpu']}, loadavg {machine['loadavg at start']}."),
             "", "| mode | server | p50 ms | p99 ms | max ms | tx/s |", "|---|---|---:|---:|---:|---:|"]
    for mode, per in results.items():
        for name, rows in per.items():
            med = [statistics.median(col) for col in zip(*rows)]
            lines.append(f"| {mode} | {name} | {med[0]:.2f} | {med[1]:.2f} | {med[2]:.1f} | {med[3]:,.0f} |")
    if notes:
        lines += ["", "Failed runs:", *(f"- {n}" for n in notes)]
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dest = out / f"latency-{time.strftime('%Y%m%d-%H%M%S')}.md"
    dest.write_text(text)
    print()
    print(text)
    print(f"written: {dest}")
    return 1 if notes else 0


if __name__ == "__main__":
    sys.exit(main())
