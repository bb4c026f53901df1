"""What fastrelay's own Python costs per message, and which stage costs what.

The end-to-end runs (e2e.py) put fastrelay at 0.5-0.8 of the bare-protocol
floor on 1 KiB messages, and its event-loop thread is the one that runs out
of CPU there.  This script measures that thread's CPU per message with no
socket at all: the real ``Relay`` (the benchmark config of e2e.py: quota,
spool, queue manager), sessions opened on ``CaptureTransport`` (tests/), and
the SMTP commands of smtp-source's transactions (MAIL, RCPT, DATA, a 1 KiB
message, no pipelining) fed to ``data_received`` round by round, one
transaction per session per round, each round waiting for every 250.

Each variant leaves one stage out, so the differences say what that stage
costs.  The leave-outs patch the running relay and are a measuring device,
not product paths:

  full          everything, as the relay runs
  no-spool      the spool write answers at once (no record, no writer thread)
  no-quota      no quota book (no limits counted, no journal)
  no-journal    the quota is counted, its journal record is not written
  no-handoff    no hand-off to the queue manager after the 250
  no-data       MAIL, RCPT and RSET only: the envelope commands' cost
  new-connection  everything, with a new session per message (connection_made,
                EHLO, the transaction, QUIT, connection_lost), as smtp-source
                without -d: what a connection adds to full

Run: python bench/python_path.py [--runs 5] [--sessions 100] [--rounds 300]
     [--variants full no-spool ...]
It prints a Markdown table: main-thread CPU (time.thread_time) per message,
median and minimum over the runs, each run in a fresh process, variants
interleaved.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH.parent / "tests"))

VARIANTS = ("full", "no-spool", "no-quota", "no-journal", "no-handoff", "no-data", "new-connection")

# e2e.py's accept-only fastrelay, so the figures here and there are of one relay.
DELIVERY_OFF = "\n[delivery]\nenabled = false\n"

# smtp-source -l 1024: its headers and filler, 1 KiB in all.
CONTENT = (b"From: <from@example.com>\r\nTo: <to@example.net>\r\nSubject: test\r\n\r\n"
           + (b"x" * 70 + b"\r\n") * 13 + b".\r\n")


async def measure(variant: str, sessions: int, rounds: int, work: Path) -> float:
    """Main-thread CPU seconds per message for one variant."""
    from capture import CaptureTransport
    from e2e import FASTRELAY_CONFIG, HOST, free_port

    from fastrelay.app import GIL_SWITCH_INTERVAL, Relay
    from fastrelay.config import load_config
    from fastrelay.server import SmtpSession
    from fastrelay.spool import Location, Spool

    sys.setswitchinterval(GIL_SWITCH_INTERVAL)   # as app.serve sets it (and the collector, below)
    os.chdir(work)
    # The listener is bound but nobody connects to it.
    Path("relay.toml").write_text(FASTRELAY_CONFIG.format(host=HOST, port=free_port(), level="warning",
                                                          delivery=DELIVERY_OFF, tls="", users=""))
    relay = Relay("relay.toml", load_config("relay.toml"), tune_gc=True)
    running = asyncio.ensure_future(relay.run())
    while not hasattr(relay, "status"):    # run() sets it once the server is built
        if running.done():
            running.result()
        await asyncio.sleep(0.01)
    server = relay.server
    loop = asyncio.get_running_loop()
    if variant == "no-spool":
        def answered(self: Spool, envelope: Any, body: Any) -> asyncio.Future[Any]:
            fut = loop.create_future()
            fut.set_result(Location(0, 0, sum(map(len, body))))
            return fut
        Spool.append_message = answered  # type: ignore[method-assign]
    elif variant == "no-quota":
        server.quota = None
    elif variant == "no-journal":
        assert relay.quota_journal is not None
        relay.quota_journal.record = lambda *args: None  # type: ignore[method-assign]
    elif variant == "no-handoff":
        server.on_queued = None

    # Wake the round when its last session has answered: no polling, which
    # would count as CPU.
    left = 0
    round_done = asyncio.Event()
    resume = SmtpSession._resume

    def counted_resume(self: SmtpSession, reply: bytes) -> None:
        nonlocal left
        resume(self, reply)
        left -= 1
        if left == 0:
            round_done.set()
    SmtpSession._resume = counted_resume  # type: ignore[method-assign]

    def connect() -> list[tuple[SmtpSession, CaptureTransport]]:
        clients = []
        for _ in range(sessions):
            transport = CaptureTransport()
            session = SmtpSession(server, implicit_tls=False)
            session.connection_made(transport)
            session.data_received(b"EHLO client.example.com\r\n")
            clients.append((session, transport))
        return clients

    new_connections = variant == "new-connection"
    queued = 0
    clients = [] if new_connections else connect()
    start = time.thread_time()
    for _ in range(rounds):
        if new_connections:
            clients = connect()
        for session, _t in clients:
            session.data_received(b"MAIL FROM:<from@example.com>\r\n")
        for session, _t in clients:
            session.data_received(b"RCPT TO:<to@example.net>\r\n")
        if variant == "no-data":
            for session, _t in clients:
                session.data_received(b"RSET\r\n")
            continue
        for session, _t in clients:
            session.data_received(b"DATA\r\n")
        left = sessions
        round_done.clear()
        for session, _t in clients:
            session.data_received(CONTENT)
        if left:
            await round_done.wait()
        if new_connections:
            for session, transport in clients:
                session.data_received(b"QUIT\r\n")
                session.connection_lost(None)
                queued += transport.out.count(b"250 2.0.0 Ok: queued")
    spent = time.thread_time() - start
    if not new_connections:   # (with new ones, counted as each round's sessions closed)
        queued = sum(t.out.count(b"250 2.0.0 Ok: queued") for _s, t in clients)
    expected = 0 if variant == "no-data" else sessions * rounds
    assert queued == expected, f"{variant}: {queued} messages queued, expected {expected}"
    return spent / (sessions * rounds)   # no shutdown: the process ends (see child)


def child(variant: str, sessions: int, rounds: int) -> None:
    import uvloop

    work = Path(tempfile.mkdtemp(prefix="fastrelay-python-path-", dir="/var/tmp"))
    try:
        seconds = uvloop.run(measure(variant, sessions, rounds, work))
        print(json.dumps({"variant": variant, "seconds": seconds}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # The capture sessions never close, so a graceful shutdown would wait out
    # its drain timeout; nothing of this run is kept anyway.
    os._exit(0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="runs per variant (default 5)")
    ap.add_argument("--sessions", type=int, default=100, help="sessions per round (default 100)")
    ap.add_argument("--rounds", type=int, default=300, help="transactions per session (default 300)")
    ap.add_argument("--variants", nargs="*", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.sessions, a.rounds)
        return 0
    results: dict[str, list[float]] = {v: [] for v in a.variants}
    for _ in range(a.runs):
        for variant in a.variants:
            out = subprocess.run([sys.executable, __file__, "--child", variant, "--sessions", str(a.sessions),
                                  "--rounds", str(a.rounds)], capture_output=True, text=True, check=True)
            results[variant].append(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH, capture_output=True,
                            text=True, check=False).stdout.strip()
    print(f"fastrelay `{commit}`: `python bench/python_path.py --runs {a.runs} --sessions {a.sessions} "
          f"--rounds {a.rounds}`, {time.strftime('%Y-%m-%d %H:%M')}\n")
    print("| variant | main-thread CPU per message, median | minimum | full minus this |")
    print("|---|---:|---:|---:|")
    full = statistics.median(results["full"]) if "full" in results else None
    for variant, runs in results.items():
        med = statistics.median(runs)
        diff = f"{(full - med) * 1e6:.1f} us" if full is not None and variant != "full" else ""
        print(f"| {variant} | {med * 1e6:.1f} us | {min(runs) * 1e6:.1f} us | {diff} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
