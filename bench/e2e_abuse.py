"""Accept throughput with content scanning (builtin) against without: smtp-source -> fastrelay -> smtp-sink.

Scanning is the queue manager's pre_delivery stage: it runs after the 250,
so what it can cost the accept path is CPU taken from the same event loop.
Both variants deliver everything to a counting smtp-sink (scanning only runs
where delivery does), so the only difference is ``[abuse]``:

  off      [abuse] enabled = false        (no scan: the hook answers DELIVER at once)
  builtin  [abuse] scanners = ["builtin"] (the default: the builtin heuristics)

Figures, each the median of ``--runs`` runs, variants alternating (A B, B A, ...):
  accept msg/s     messages / seconds until smtp-source had every 250
  end-to-end msg/s messages / seconds until the sink had every message
                   (for builtin: every message scanned, then delivered)

Side by side (``--side-by-side``): the machine's speed drifts between runs by
more than the difference measured (the same configuration's CPU per message
moved from 0.34 to 0.54 ms between consecutive runs), so a ratio of runs
taken one after the other needs many rounds.  This mode runs both relays at
once, each with its own smtp-source (-c, a running count of completed DATA)
and sink, on the same two cores: whatever slows the machine slows both.
After a second of warm-up, each relay's accept rate is its smtp-source
counter's progress over the same ``--window`` seconds.  The ratio of the two
rates is the ratio of their CPU cost per message (the scheduler shares the
cores between the two relays); the variants swap their start order every
round.  Each round still varies (0.8-1.2 here: which core each process
lands on matters), so take the median of many.  Pinning each relay to a core
of its own (taskset) was tried and varied more: one core is much slower
than the other on this machine.

Usage:
  .venv/bin/python bench/e2e_abuse.py [--runs 3] [--messages 4000] [--cases 1k-new 1k-reuse 100k-reuse]
  .venv/bin/python bench/e2e_abuse.py --side-by-side [--runs 9] [--window 4]

Reuses bench/e2e.py's fastrelay config and bench/e2e_delivery.py's counting
sink.  Only 127.0.0.1 is ever a target; every run is bounded in messages and
seconds.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from e2e import (
    DELIVERY_SECTION,
    FASTRELAY_CONFIG,
    HOST,
    KIB,
    PYTHON,
    SMTP_SOURCE,
    WORK_BASE,
    CountingSink,
    free_port,
    stop_process,
    tree_cpu,
    wait_banner,
)
from e2e_delivery import CASES, Case

VARIANTS = {
    "off": "\n[abuse]\nenabled = false\n",
    "builtin": '\n[abuse]\nscanners = ["builtin"]\nstate_dir = "abuse"\n',
}


class _Blank(dict[str, object]):
    """Placeholders of e2e.py's config that this benchmark does not use (TLS, users) stay empty."""

    def __missing__(self, key: str) -> str:
        return ""




@dataclass
class Result:
    variant: str
    case: str
    messages: int
    accept_seconds: float
    total_seconds: float
    relay_cpu: float
    ok: bool
    note: str = ""


def run_once(variant: str, case: Case, messages: int, work: Path, timeout: float) -> Result:
    d = Path(tempfile.mkdtemp(prefix=f"abuse-{variant}-", dir=work))
    sink = CountingSink(d)
    port = free_port()
    config = d / "relay.toml"
    config.write_text(FASTRELAY_CONFIG.format_map(_Blank(
        host=HOST, port=port, level="warning",
        delivery=DELIVERY_SECTION.format(host=HOST, sink_port=sink.port) + VARIANTS[variant])))
    with open(d / "server.out", "wb") as out:
        proc = subprocess.Popen([PYTHON, "-m", "fastrelay", "serve", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_banner(port, proc=proc)
        argv = [SMTP_SOURCE, "-4", "-s", str(case.sessions), "-m", str(messages), "-l", str(case.size),
                "-r", "1", "-f", "from@example.com", "-t", "to@example.net", "-M", "client.example.com"]
        if case.reuse:
            argv.append("-d")
        argv.append(f"{HOST}:{port}")
        cpu0 = tree_cpu(proc.pid)
        t0 = time.perf_counter()
        source = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  stdin=subprocess.DEVNULL)
        killer = threading.Timer(timeout, source.kill)
        killer.start()
        _, errors = source.communicate()
        accept = time.perf_counter() - t0
        while sink.count() < messages and time.perf_counter() < t0 + timeout:
            time.sleep(0.02)
        total = time.perf_counter() - t0
        killer.cancel()
        cpu = tree_cpu(proc.pid) - cpu0
        delivered = sink.count()
    finally:
        stop_process(proc)
        sink.stop()
    ok = source.returncode == 0 and delivered == messages
    note = "" if ok else (f"smtp-source exit {source.returncode}, delivered {delivered}/{messages}: "
                          f"{errors.decode(errors='replace')[-200:]}")
    if ok:
        shutil.rmtree(d, ignore_errors=True)
    return Result(variant, case.name, messages, accept, total, cpu, ok, note)


class SideBySide:
    """One variant's relay, sink and smtp-source in a side-by-side round."""

    def __init__(self, variant: str, case: Case, work: Path) -> None:
        self.variant = variant
        self.dir = Path(tempfile.mkdtemp(prefix=f"pair-{variant}-", dir=work))
        self.sink = CountingSink(self.dir)
        self.port = free_port()
        config = self.dir / "relay.toml"
        config.write_text(FASTRELAY_CONFIG.format_map(_Blank(
            host=HOST, port=self.port, level="warning",
            delivery=DELIVERY_SECTION.format(host=HOST, sink_port=self.sink.port) + VARIANTS[variant])))
        with open(self.dir / "server.out", "wb") as out:
            self.proc = subprocess.Popen([PYTHON, "-m", "fastrelay", "serve", "--config", str(config)],
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_banner(self.port, proc=self.proc)
        self.case = case
        self.source: subprocess.Popen[bytes] | None = None
        self.counter = self.dir / "source.out"

    def load(self, messages: int) -> None:
        case = self.case
        argv = [SMTP_SOURCE, "-c", "-4", "-s", str(case.sessions), "-m", str(messages), "-l", str(case.size),
                "-r", "1", "-f", "from@example.com", "-t", "to@example.net", "-M", "client.example.com"]
        if case.reuse:
            argv.append("-d")
        with open(self.counter, "wb") as out:
            self.source = subprocess.Popen([*argv, f"{HOST}:{self.port}"], stdout=out, stderr=subprocess.DEVNULL,
                                           stdin=subprocess.DEVNULL)

    def accepted(self) -> int:
        """smtp-source -c's running count: "N\\r" after each completed DATA."""
        with open(self.counter, "rb") as f:
            f.seek(max(0, os.path.getsize(self.counter) - 64))
            found = re.findall(rb"(\d+)\r", f.read())
        return int(found[-1]) if found else 0

    def stop(self) -> None:
        if self.source is not None and self.source.poll() is None:
            self.source.kill()
            self.source.wait()
        stop_process(self.proc)
        self.sink.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def side_by_side(case: Case, rnd: int, window: float, work: Path) -> tuple[float, float]:
    """(off's accept rate, builtin's) over the same window, both loaded at once."""
    order = list(VARIANTS) if rnd % 2 == 0 else list(reversed(VARIANTS))
    pair: dict[str, SideBySide] = {}
    try:
        for variant in order:
            pair[variant] = SideBySide(variant, case, work)
        # More than either can take in the window: both stay loaded throughout.
        budget = int(40000 * window) if case.size <= 10 * KIB else int(4000 * window)
        for variant in order:
            pair[variant].load(budget)
        time.sleep(1.0)
        start = {v: r.accepted() for v, r in pair.items()}
        t0 = time.perf_counter()
        time.sleep(window)
        elapsed = time.perf_counter() - t0
        end = {v: r.accepted() for v, r in pair.items()}
        if any(r.source is not None and r.source.poll() is not None for r in pair.values()):
            raise RuntimeError("a load generator finished (or failed) inside the window: raise the budget")
    finally:
        for r in pair.values():
            r.stop()
    return ((end["off"] - start["off"]) / elapsed, (end["builtin"] - start["builtin"]) / elapsed)


def main_side_by_side(args: argparse.Namespace) -> int:
    WORK_BASE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="abuse-pair-", dir=WORK_BASE))
    rows = []
    try:
        for name in args.cases:
            case = CASES[name]
            rates = []
            for rnd in range(args.runs):
                off, on = side_by_side(case, rnd, args.window, work)
                rates.append((off, on))
                print(f"{name:<10} round {rnd + 1}  off {off:7.0f} msg/s  builtin {on:7.0f} msg/s  "
                      f"ratio {on / off:5.2f}", flush=True)
            rows.append((name, rates))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"{'case':<10} {'off msg/s':>10} {'builtin msg/s':>14} {'ratio':>6} {'ratios (min-max)':>18}")
    for name, rates in rows:
        ratios = [on / off for off, on in rates]
        print(f"{name:<10} {statistics.median(r[0] for r in rates):>10.0f} "
              f"{statistics.median(r[1] for r in rates):>14.0f} {statistics.median(ratios):>6.2f} "
              f"{min(ratios):>8.2f}-{max(ratios):.2f}")
    print(f"\n(side by side: both relays loaded at once on the same cores; accept rates over the same "
          f"{args.window:g} s window; median of {args.runs} rounds)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--messages", type=int, default=4000, help="messages per 1 KiB run")
    p.add_argument("--big-messages", type=int, default=800, help="messages per 100 KiB run")
    p.add_argument("--cases", nargs="+", default=["1k-new", "1k-reuse", "100k-reuse"], choices=list(CASES))
    p.add_argument("--timeout", type=float, default=180.0, help="seconds per run, at most")
    p.add_argument("--side-by-side", action="store_true",
                   help="both variants at once on the same cores (see the module docstring)")
    p.add_argument("--window", type=float, default=4.0, help="seconds measured per side-by-side round")
    args = p.parse_args(argv)
    if args.side_by_side:
        return main_side_by_side(args)
    WORK_BASE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="abuse-", dir=WORK_BASE))
    results: list[Result] = []
    try:
        for name in args.cases:
            case = CASES[name]
            messages = args.big_messages if case.size > 10 * KIB else args.messages
            for rnd in range(args.runs):
                order = list(VARIANTS) if rnd % 2 == 0 else list(reversed(VARIANTS))
                for variant in order:
                    r = run_once(variant, case, messages, work, args.timeout)
                    results.append(r)
                    print(f"{name:<10} round {rnd + 1} {variant:<8} accept {messages / r.accept_seconds:7.0f} msg/s, "
                          f"end to end {messages / r.total_seconds:7.0f} msg/s, relay CPU "
                          f"{1000 * r.relay_cpu / messages:.3f} ms/msg{'' if r.ok else '  FAILED: ' + r.note}",
                          flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"{'case':<10} {'accept off':>11} {'accept builtin':>15} {'ratio':>6}   "
          f"{'e2e off':>8} {'e2e builtin':>12} {'ratio':>6}   {'CPU/msg off':>12} {'builtin':>8}")
    for name in args.cases:
        off = [r for r in results if r.case == name and r.variant == "off"]
        on = [r for r in results if r.case == name and r.variant == "builtin"]

        def med(rs: list[Result], attr: str) -> float:
            return float(statistics.median(r.messages / float(getattr(r, attr)) for r in rs))

        accept_ratio = statistics.median((b.messages / b.accept_seconds) / (a.messages / a.accept_seconds)
                                         for a, b in zip(off, on))
        e2e_ratio = statistics.median((b.messages / b.total_seconds) / (a.messages / a.total_seconds)
                                      for a, b in zip(off, on))
        print(f"{name:<10} {med(off, 'accept_seconds'):>11.0f} {med(on, 'accept_seconds'):>15.0f} "
              f"{accept_ratio:>6.2f}   {med(off, 'total_seconds'):>8.0f} {med(on, 'total_seconds'):>12.0f} "
              f"{e2e_ratio:>6.2f}   "
              f"{statistics.median(1000 * r.relay_cpu / r.messages for r in off):>9.3f} ms "
              f"{statistics.median(1000 * r.relay_cpu / r.messages for r in on):>5.3f} ms")
    print(f"\n(median of {args.runs} runs; ratio = median of per-round builtin/off; "
          "end to end with builtin = every message scanned, then delivered)")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
