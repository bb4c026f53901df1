"""End-to-end delivery benchmark: smtp-source -> relay -> smtp-sink, fastrelay against Postfix.

What is timed is the whole path: from the first connection of the load
generator until the next hop (Postfix's ``smtp-sink -c``, whose running
counter we read) has received every message.  So each figure includes
accepting, making durable, queue management and the outbound SMTP client.

Both relays run privately on loopback, each with a fresh spool (on the real
disk, never tmpfs) and a fresh smtp-sink behind it:

  fastrelay  fastrelay serve, [[delivery.routes]] domain="*" -> the sink, log level info
  postfix    Postfix 3.7 (bench/e2e.py's private instance), relayhost = the sink,
             default_destination_concurrency_limit = 50, maillog to a file

Both log every message and fsync before answering 250; both cache outbound
connections.  Rounds alternate the order (A B, B A, ...) so the noise of a
shared 2-core machine falls on both; the ratio is the median of per-round ratios.

Cases (20 sessions each, as shared/reference/benchmarking.md suggests):
  1k-new     1 KiB, a new connection per message
  1k-reuse   1 KiB, each session keeps its connection (smtp-source -d)
  100k-reuse 100 KiB, connection reuse

Usage:
  .venv/bin/python bench/e2e_delivery.py [--runs 3] [--messages 3000] [--big-messages 600]
                                          [--cases 1k-new 1k-reuse 100k-reuse]

Only 127.0.0.1 is ever a target; every run is bounded in messages and seconds.
"""

from __future__ import annotations

import argparse
import os
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
    POSTFIX,
    POSTFIX_MAIN,
    POSTFIX_MASTER,
    PYTHON,
    SMTP_SOURCE,
    WORK_BASE,
    CountingSink,
    free_port,
    machine_busy,
    stop_process,
    tree_cpu,
    wait_banner,
)


@dataclass(frozen=True)
class Case:
    name: str
    size: int
    reuse: bool
    sessions: int = 20


CASES = {c.name: c for c in (Case("1k-new", KIB, False), Case("1k-reuse", KIB, True),
                              Case("100k-reuse", 100 * KIB, True))}


class Relay:
    name = ""

    def __init__(self, work: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=work))
        self.dir.chmod(0o755)  # Postfix's daemons must reach their directories
        self.port = free_port()
        self.sink = CountingSink(self.dir)

    def root_pid(self) -> int:
        raise NotImplementedError

    def stop(self) -> None:
        self.sink.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class FastrelayRelay(Relay):
    name = "fastrelay"

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        config = self.dir / "relay.toml"
        config.write_text(FASTRELAY_CONFIG.format(
            host=HOST, port=self.port, level="info", tls="", users="",
            delivery=DELIVERY_SECTION.format(host=HOST, sink_port=self.sink.port)))
        with open(self.dir / "server.out", "wb") as out:
            self.proc = subprocess.Popen([PYTHON, "-m", "fastrelay", "serve", "--config", str(config)],
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_banner(self.port, proc=self.proc)

    def root_pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        stop_process(self.proc)
        super().stop()


class PostfixRelay(Relay):
    name = "postfix"

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        conf, self.queue, data = self.dir / "etc", self.dir / "queue", self.dir / "data"
        for d in (conf, self.queue, data):
            d.mkdir()
        shutil.chown(data, "postfix", "postfix")
        (conf / "main.cf").write_text(POSTFIX_MAIN.format(queue=self.queue, data=data,
                                                          sink_port=self.sink.port, extra="", tls=""))
        (conf / "master.cf").write_text(POSTFIX_MASTER.format(host=HOST, port=self.port, implicit=""))
        self.conf = conf
        r = subprocess.run([POSTFIX, "-c", str(conf), "start"], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"postfix start failed: {r.stdout}{r.stderr}")
        wait_banner(self.port)

    def root_pid(self) -> int:
        return int((self.queue / "pid" / "master.pid").read_text().split()[0])

    def stop(self) -> None:
        pid = self.root_pid()
        subprocess.run([POSTFIX, "-c", str(self.conf), "stop"], capture_output=True, check=False)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except OSError:
                break
            time.sleep(0.05)
        super().stop()


RELAYS: dict[str, type[Relay]] = {"fastrelay": FastrelayRelay, "postfix": PostfixRelay}


@dataclass
class Result:
    relay: str
    case: str
    messages: int
    accept_seconds: float     # until smtp-source finished (every message had its 250)
    total_seconds: float      # until the sink had every message
    relay_cpu: float          # CPU seconds of the relay's process tree (not the sink)
    connections: int          # sessions the sink saw (outbound connection reuse)
    ok: bool
    note: str = ""

    @property
    def rate(self) -> float:
        return self.messages / self.total_seconds


def run_once(kind: type[Relay], case: Case, messages: int, work: Path, timeout: float) -> Result:
    relay = kind(work)
    try:
        argv = [SMTP_SOURCE, "-4", "-s", str(case.sessions), "-m", str(messages), "-l", str(case.size),
                "-r", "1", "-f", "from@example.com", "-t", "to@example.net", "-M", "client.example.com"]
        if case.reuse:
            argv.append("-d")
        argv.append(f"{HOST}:{relay.port}")
        root = relay.root_pid()
        cpu0 = tree_cpu(root)
        t0 = time.perf_counter()
        source = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        killer = threading.Timer(timeout, source.kill)
        killer.start()
        _, errors = source.communicate()
        accept = time.perf_counter() - t0
        deadline = t0 + timeout
        while relay.sink.count() < messages and time.perf_counter() < deadline:
            time.sleep(0.02)
        total = time.perf_counter() - t0
        killer.cancel()
        cpu = tree_cpu(root) - cpu0
        delivered = relay.sink.count()
        connections = relay.sink.count(b"sess")
    finally:
        relay.stop()
    ok = source.returncode == 0 and delivered == messages
    note = "" if ok else f"smtp-source exit {source.returncode}, delivered {delivered}/{messages}: " \
                         f"{errors.decode(errors='replace')[-200:]}"
    return Result(kind.name, case.name, messages, accept, total, cpu, connections, ok, note)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--messages", type=int, default=3000, help="messages per 1 KiB run")
    p.add_argument("--big-messages", type=int, default=600, help="messages per 100 KiB run")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--timeout", type=float, default=180.0, help="seconds per run, at most")
    args = p.parse_args(argv)
    WORK_BASE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="delivery-", dir=WORK_BASE))
    work.chmod(0o755)
    results: list[Result] = []
    busy0 = machine_busy()
    try:
        for name in args.cases:
            case = CASES[name]
            messages = args.big_messages if case.size > 10 * KIB else args.messages
            for rnd in range(args.runs):
                order = ["fastrelay", "postfix"] if rnd % 2 == 0 else ["postfix", "fastrelay"]
                for relay in order:
                    r = run_once(RELAYS[relay], case, messages, work, args.timeout)
                    results.append(r)
                    print(f"{case.name:<11} round {rnd + 1} {relay:<9} {r.rate:8.0f} msg/s end to end "
                          f"(accepted in {r.accept_seconds:5.2f}s, delivered in {r.total_seconds:5.2f}s, "
                          f"relay CPU {1000 * r.relay_cpu / messages:.2f} ms/msg, {r.connections} connections to the sink)"
                          f"{'' if r.ok else '  FAILED: ' + r.note}",
                          flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"{'case':<11} {'fastrelay msg/s':>16} {'postfix msg/s':>14} {'ratio':>6}   "
          f"{'fastrelay CPU/msg':>18} {'postfix CPU/msg':>16}")
    for name in args.cases:
        rows = {k: [r for r in results if r.case == name and r.relay == k] for k in RELAYS}
        fr, pf = rows["fastrelay"], rows["postfix"]
        ratios = [a.rate / b.rate for a, b in zip(fr, pf)]
        print(f"{name:<11} {statistics.median(r.rate for r in fr):>16.0f} "
              f"{statistics.median(r.rate for r in pf):>14.0f} {statistics.median(ratios):>6.2f}   "
              f"{statistics.median(1000 * r.relay_cpu / r.messages for r in fr):>15.2f} ms "
              f"{statistics.median(1000 * r.relay_cpu / r.messages for r in pf):>13.2f} ms")
    print(f"\n(median of {args.runs} runs; ratio = median of per-round fastrelay/postfix; "
          f"machine busy {machine_busy() - busy0:.0f} CPU-s during the benchmark)")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
