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

Usage:
  .venv/bin/python bench/e2e_abuse.py [--runs 3] [--messages 4000] [--cases 1k-new 1k-reuse 100k-reuse]

Reuses bench/e2e.py's fastrelay config and bench/e2e_delivery.py's counting
sink.  Only 127.0.0.1 is ever a target; every run is bounded in messages and
seconds.
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--messages", type=int, default=4000, help="messages per 1 KiB run")
    p.add_argument("--big-messages", type=int, default=800, help="messages per 100 KiB run")
    p.add_argument("--cases", nargs="+", default=["1k-new", "1k-reuse", "100k-reuse"], choices=list(CASES))
    p.add_argument("--timeout", type=float, default=180.0, help="seconds per run, at most")
    args = p.parse_args(argv)
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
