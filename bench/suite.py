"""The whole benchmark suite in one command, one report (issue 7).

Runs each part of bench/ one after the other, never two at once (they would
share the two cores and measure each other):

  e2e       bench/e2e.py --full      micro benchmarks, the 25 smtp-source cases against every
                                     server, accept + delivery against Postfix relaying
  tls       bench/e2e.py --tls       STARTTLS, implicit TLS and AUTH rows (fastrelay bench)
  generator bench/e2e.py --check-generator   fastrelay bench against smtp-source on the plain path
  latency   bench/latency.py         p50/p99/p99.9 at full load, 50% and 90% of each server's peak
  memory    bench/memory.py          RSS per idle connection at 1,000 and 10,000 (and TLS)

Each part writes its own report into bench/results/suite-DATE/ (Markdown,
JSON, PNG chart where it draws one); this script then writes
bench/results/suite-DATE.md: the machine, the command of each part, how long
it took, whether it succeeded, and each part's report inlined.  A part that
fails is reported as failed and the others still run.

Usage:
  .venv/bin/python bench/suite.py [--runs N] [--quick] [--parts e2e tls generator latency memory]
  ./scripts/bench --all   (the same, after installing the peers)

--quick is a smoke test of the whole chain (few messages, short runs): its
figures are not for comparison.  The full suite takes about 75 minutes here.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHON = sys.executable
# A Markdown link or image to a file next to the part's report (not a URL, not an anchor).
RELATIVE_LINK = re.compile(r"\]\((?![a-z]+:|/|#)")


@dataclass
class Part:
    name: str
    argv: list[str]
    seconds: float = 0.0
    returncode: int | None = None
    reports: list[Path] = field(default_factory=list)


def parts(runs: int, quick: bool, out: Path) -> dict[str, Part]:
    runs_arg = ["--runs", str(runs)]
    e2e_args = ["--quick"] if quick else []
    latency_args = ["--seconds", "2", "--peak-seconds", "2"] if quick else []
    memory_args = ["--counts", "200", "--tls-counts", "100", "--trace-count", "100"] if quick else []
    script = {name: str(BENCH / name) for name in ("e2e.py", "latency.py", "memory.py")}
    return {
        "e2e": Part("e2e", [PYTHON, script["e2e.py"], "--full", *runs_arg, *e2e_args, "--out", str(out)]),
        "tls": Part("tls", [PYTHON, script["e2e.py"], "--tls", *runs_arg, *e2e_args, "--out", str(out)]),
        "generator": Part("generator", [PYTHON, script["e2e.py"], "--check-generator", *runs_arg, *e2e_args,
                                        "--out", str(out)]),
        "latency": Part("latency", [PYTHON, script["latency.py"], *runs_arg, *latency_args, "--out", str(out)]),
        "memory": Part("memory", [PYTHON, script["memory.py"], *memory_args, "--out", str(out)]),
    }


def machine() -> list[str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip() or "unknown"
    return [(f"- Machine: {platform.node()}, {cpu}, {os.cpu_count()} CPUs, "
            f"{int(mem) // 1024 ** 2} GiB; {platform.platform()}; Python {platform.python_version()}"),
            f"- fastrelay commit: `{commit}`"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="interleaved rounds per case (default 3)")
    ap.add_argument("--quick", action="store_true", help="a smoke test of the whole chain")
    ap.add_argument("--parts", nargs="+", choices=["e2e", "tls", "generator", "latency", "memory"],
                    default=["e2e", "tls", "generator", "latency", "memory"])
    ap.add_argument("--out", default=str(BENCH / "results"))
    args = ap.parse_args(argv)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) / f"suite-{stamp}"
    out.mkdir(parents=True)
    plan = parts(args.runs, args.quick, out)
    started = time.strftime("%Y-%m-%d %H:%M")
    done: list[Part] = []
    for name in args.parts:
        part = plan[name]
        print(f"suite: {name}: {' '.join(part.argv)}", flush=True)
        before = set(out.iterdir())
        t0 = time.monotonic()
        part.returncode = subprocess.run(part.argv, cwd=ROOT, check=False).returncode
        part.seconds = time.monotonic() - t0
        part.reports = sorted(p for p in set(out.iterdir()) - before if p.suffix == ".md")
        done.append(part)

    lines = [f"# fastrelay benchmark suite, {started}", ""]
    if args.quick:
        lines += ["**Smoke run (`--quick`): too few messages for the figures to mean anything.**", ""]
    lines += machine()
    lines += [f"- Command: `{' '.join([Path(PYTHON).name, 'bench/suite.py', *(argv or sys.argv[1:])])}`", ""]
    lines += ["| part | command | minutes | result | report |", "|---|---|---:|---|---|"]
    for part in done:
        command = " ".join(Path(a).name if a.startswith(str(ROOT)) or a == PYTHON else a for a in part.argv)
        reports = ", ".join(f"`{p.relative_to(out.parent)}`" for p in part.reports)
        result = "ok" if part.returncode == 0 else f"failed (exit {part.returncode})"
        lines.append(f"| {part.name} | `{command}` | {part.seconds / 60:.1f} | {result} | {reports} |")
    for part in done:
        for report in part.reports:
            lines += ["", "---", "", f"<!-- {report.name} -->", ""]
            text = report.read_text()
            # The part's own pictures sit next to its report: keep their links working from here.
            lines.append(RELATIVE_LINK.sub(f"]({out.name}/", text))
    summary = Path(args.out) / f"suite-{stamp}.md"
    summary.write_text("\n".join(lines) + "\n")
    print(f"suite: report in {summary}")
    return 0 if all(p.returncode == 0 for p in done) else 1


if __name__ == "__main__":
    sys.exit(main())
