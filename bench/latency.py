"""Transaction latency: at full load (closed loop) and at 50% and 90% of each server's peak (open loop).

smtp-source gives throughput only; this uses ``fastrelay bench`` (fastrelay/loadgen.py),
run as its own process so that it has its own interpreter and GIL.

For each server, round and mode, three runs, each on a fresh server instance:

1. **peak**: closed loop, ``--concurrency`` sessions, for ``--peak-seconds``:
   every session starts its next message when the last one is answered.  Its
   rate is the server's peak for this round, and its percentiles are the
   latency at full load (the old ``latency.py`` table).
2. **at 50% and at 90% of that peak**: open loop, ``--rate`` fixed at the
   fraction of the peak, for ``--seconds``; a pool of up to ``--pool``
   connections.  Each message's latency is counted from the time it was due,
   so a server that falls behind shows it (no coordinated omission).

Modes: ``new`` (a connection per message: the latency includes connect,
greeting and EHLO) and ``reuse`` (connections kept open: MAIL to the 250 after
the dot, plus any wait for a free connection).  After each run the server is
left to settle (Postfix: its queue empty) and stopped.  Servers are interleaved per round
(A B, then B A) and every figure is the median over rounds.

The servers are bench/e2e.py's (fresh directories, free loopback ports).  The
client is Python on the same 2 cores: compare servers with each other, not
with absolute targets.

Usage: .venv/bin/python bench/latency.py [--runs 3] [--servers fastrelay postfix] [--modes new reuse]
                                           [--fractions 0.5 0.9] [--seconds 10] [--peak-seconds 8]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # the servers and the work directory (after the sys.path line)


@dataclass
class Point:
    server: str
    mode: str
    round: int
    load: str                  # "peak" or "50%", "90%"
    offered: float | None      # msgs/s (open loop)
    rate: float                # achieved msgs/s
    sent: int
    p50: float
    p90: float
    p99: float
    p999: float
    max: float
    errors: dict[str, int]
    unfinished: int
    command: str


def bench(server: e2e.Server, mode: str, args: argparse.Namespace, seconds: float,
          rate: float | None, sessions: int) -> tuple[dict[str, Any], str]:
    argv = [e2e.PYTHON, "-m", "fastrelay", "bench", f"{e2e.HOST}:{server.port}", "--sessions", str(sessions),
            "--size", str(args.size), "--messages-per-connection", "1" if mode == "new" else "0",
            "--duration", f"{seconds:g}", "--count", str(int(seconds * 50000)),
            "--timeout", str(seconds + 60), "--helo", "client.example.com", "--json"]
    if rate is not None:
        argv += ["--rate", f"{rate:.1f}"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120, check=False)
    try:
        return json.loads(r.stdout), " ".join(argv[2:])
    except ValueError:
        raise RuntimeError(f"fastrelay bench exit {r.returncode}: {r.stderr[-500:]}") from None


def point(server: str, mode: str, rnd: int, load: str, out: dict[str, Any], command: str) -> Point:
    lat = {k: float("nan") if v is None else v for k, v in out["latency_ms"].items()}
    return Point(server, mode, rnd, load, out.get("offered_rate"), out["rate"], out["sent"],
                 lat["p50"], lat["p90"], lat["p99"], lat["p999"], lat["max"], out["errors"], out["unfinished"],
                 command)


def settle(server: e2e.Server, expected: int) -> None:
    server.settle(expected, 120.0)
    time.sleep(0.5)


def run_server(server: e2e.Server, mode: str, rnd: int, args: argparse.Namespace) -> list[Point]:
    """The peak run, then the open-loop runs at fractions of it; a fresh server for each run
    (fastrelay keeps every message: a spool that grew by the earlier runs would skew the later ones)."""
    points: list[Point] = []
    loads: list[tuple[str, float | None, int]] = [("peak", None, args.concurrency)]
    loads += [(f"{f:.0%}", f, args.pool) for f in args.fractions]
    peak_rate = 0.0
    for load, fraction, sessions in loads:
        server.features = frozenset()
        server.start()
        try:
            rate = None if fraction is None else fraction * peak_rate
            out, cmd = bench(server, mode, args, args.peak_seconds if fraction is None else args.seconds,
                             rate, sessions)
            settle(server, out["sent"])
        finally:
            server.stop()
            server.cleanup()
        p = point(server.name, mode, rnd, load, out, cmd)
        if fraction is None:
            peak_rate = p.rate
        points.append(p)
    return points


def med(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.median(xs) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--servers", nargs="*", default=["fastrelay", "postfix"], choices=sorted(e2e.SERVERS))
    ap.add_argument("--modes", nargs="*", default=["new", "reuse"], choices=["new", "reuse"])
    ap.add_argument("--fractions", nargs="*", type=float, default=[0.5, 0.9],
                    help="open-loop rates as fractions of the round's peak (default 0.5 0.9)")
    ap.add_argument("--concurrency", type=int, default=20, help="sessions of the closed-loop peak run (default 20)")
    ap.add_argument("--pool", type=int, default=50, help="most connections of an open-loop run (default 50)")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each open-loop run (default 10)")
    ap.add_argument("--peak-seconds", type=float, default=8.0, help="length of the peak run (default 8)")
    ap.add_argument("--size", type=int, default=1024 + e2e.SMTP_SOURCE_HEADERS,
                    help="message content bytes (default: what smtp-source -l 1024 sends)")
    ap.add_argument("--out", default=str(e2e.BENCH / "results"))
    args = ap.parse_args()

    e2e.WORK_BASE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="latency-", dir=e2e.WORK_BASE))
    work.chmod(0o755)
    servers = {name: e2e.SERVERS[name](work) for name in args.servers}
    points: list[Point] = []
    notes: list[str] = []
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    machine = e2e.machine()
    t0 = time.monotonic()
    for mode in args.modes:
        for rnd in range(args.runs):
            order = args.servers if rnd % 2 == 0 else args.servers[::-1]
            for name in order:
                try:
                    got = run_server(servers[name], mode, rnd, args)
                except Exception as exc:  # noqa: BLE001  (a failed run is reported, not fatal)
                    notes.append(f"{mode} {name} round {rnd}: {exc!r}")
                    continue
                points += got
                for p in got:
                    if p.errors or p.unfinished:
                        notes.append(f"{mode} {name} round {rnd} {p.load}: errors {p.errors}, "
                                     f"unfinished {p.unfinished}")
                    print(f"{mode:>5} round {rnd} {name:>13} {p.load:>5}: {p.rate:8,.0f} msg/s"
                          + (f" (offered {p.offered:,.0f})" if p.offered else "")
                          + f"  p50 {p.p50:7.2f}  p99 {p.p99:7.2f}  p99.9 {p.p999:7.2f}  max {p.max:7.1f} ms",
                          flush=True)
    elapsed = time.monotonic() - t0
    shutil.rmtree(work, ignore_errors=True)

    loads = ["peak"] + [f"{f:.0%}" for f in args.fractions]
    lines = [f"# Latency at full load and at fixed fractions of the peak, {started}", "",
             (f"`{' '.join(['latency.py', *sys.argv[1:]])}` ({elapsed:.0f} s): fastrelay bench, "
              f"{args.size}-byte messages, one recipient, no pipelining; peak = closed loop with "
              f"{args.concurrency} sessions for {args.peak_seconds:g} s; then open loop at "
              + ", ".join(f"{f:.0%}" for f in args.fractions)
              + f" of that round's peak for {args.seconds:g} s each (up to {args.pool} connections; latency "
              f"from each message's due time). {args.runs} interleaved rounds, medians over rounds. "
              f"Machine: {machine['nproc']} cores, {machine['cpu']}; loadavg at start "
              f"{machine['loadavg at start']}, at end {Path('/proc/loadavg').read_text().split(' ', 3)[:3]}."),
             "",
             ("`new`: a connection per message, latency from the due time (or the start) to the 250 after "
             "the dot, connect and EHLO included. `reuse`: connections kept open."), "",
             "| mode | server | load | offered msg/s | achieved msg/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for mode in args.modes:
        for name in args.servers:
            for load in loads:
                ps = [p for p in points if p.mode == mode and p.server == name and p.load == load]
                if not ps:
                    continue
                offered = med([p.offered for p in ps if p.offered]) if load != "peak" else float("nan")
                lines.append(
                    f"| {mode} | {name} | {load} | {e2e.fmt(offered)} | {e2e.fmt(med([p.rate for p in ps]))} | "
                    + " | ".join(e2e.fmt(med([getattr(p, k) for p in ps]), 2) for k in ("p50", "p90", "p99", "p999"))
                    + f" | {e2e.fmt(med([p.max for p in ps]), 1)} |")
    lines += ["", "Per round (rate msg/s, p50 / p99 / p99.9 ms):", ""]
    for p in points:
        lines.append(f"- {p.mode} {p.server} round {p.round} {p.load}: {p.rate:,.0f}"
                     + (f" of {p.offered:,.0f} offered" if p.offered else "")
                     + f"; {p.p50:.2f} / {p.p99:.2f} / {p.p999:.2f}")
    if notes:
        lines += ["", "Notes:", *(f"- {n}" for n in notes)]
    lines += ["", "Commands (the port differs per run):", ""]
    for cmd in dict.fromkeys(re.sub(r"--rate [0-9.]+", "--rate FRACTION_OF_PEAK",
                                    re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", p.command)) for p in points):
        lines.append(f"    {cmd}")
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dest = out / f"latency-{time.strftime('%Y%m%d-%H%M%S')}"
    dest.with_suffix(".md").write_text(text)
    dest.with_suffix(".json").write_text(json.dumps([asdict(p) for p in points], indent=1))
    print()
    print(text)
    print(f"written: {dest}.md, .json")
    return 1 if notes else 0


if __name__ == "__main__":
    sys.exit(main())
