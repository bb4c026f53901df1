"""Resident memory of the relay per idle connection (issue 7: under 16 KiB each).

Part 1, the whole process: ``fastrelay serve`` (bench/e2e.py's accept-only
config, connection limits raised) is started fresh; this script opens idle
connections to it (greeting read, nothing else; then EHLO on every one) and
reads the relay's ``VmRSS`` and ``RssAnon`` from /proc:

* RSS_0 after start-up and a few warm-up connections;
* RSS_N with N idle connections (``--counts``, default 1,000 and 10,000);
* after EHLO on all of them (a session that has said EHLO holds a little more);
* after closing them all (what Python's allocators keep).

The per-connection cost is (RSS_N - RSS_0) / N.  Kernel socket buffers are
not in RSS (they are kernel memory), so this is the relay's own cost.  The
same is done with implicit TLS connections (handshake done, greeting read)
on a second fresh relay, ``--tls-counts`` (default 1,000).

Calibration (with ``--tls-counts``): the same TLS clients against
``OpenSslFloor``, a server that keeps one ``ssl.SSLObject`` per connection and
nothing else: what OpenSSL itself keeps per session, the least a server on
Python's ``ssl`` can hold per TLS connection.

Part 2, where it goes: the relay's ``SmtpServer`` is run inside this process
under tracemalloc, a child process opens ``--trace-count`` idle connections,
and the allocations made for them are grouped by source line; one session is
then taken apart with ``sys.getsizeof`` (its ``__dict__`` and each attribute
that is its own, not shared with the server).

Both sides raise RLIMIT_NOFILE to the hard limit; connections come from
several 127.0.0.x source addresses (``--sources``) so ephemeral ports never
run short.  Only loopback is a target; every step has a timeout.

Usage: .venv/bin/python bench/memory.py [--counts 1000 10000] [--tls-counts 1000] [--trace-count 1000]
Writes bench/results/memory-DATE.md.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import resource
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # the servers and the work directory (after the sys.path line)

from fastrelay.loadgen import ReplyBuffer

KIB = 1024
CONNECT_BATCH = 250   # connections opened at once


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile of a process, in KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


class BigFastrelay(e2e.Fastrelay):
    """The benchmark's fastrelay with room for tens of thousands of connections."""

    name = "fastrelay"

    def config_text(self) -> str:
        return (super().config_text()
                .replace("max_connections = 20000", "max_connections = 60000")
                .replace("max_connections_per_ip = 10000", "max_connections_per_ip = 60000"))

    def _spawn(self, argv: list[str], **kw: Any) -> None:
        super()._spawn(argv, preexec_fn=raise_nofile, **kw)


# --- the client: idle connections ------------------------------------------------------


class IdleClient:
    def __init__(self, port: int, sources: list[str], tls: ssl.SSLContext | None = None) -> None:
        self.port = port
        self.sources = sources
        self.tls = tls
        self.conns: list[ReplyBuffer] = []
        self.failures: dict[str, int] = {}

    async def _one(self, i: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, proto = await asyncio.wait_for(loop.create_connection(
                lambda: ReplyBuffer(loop), e2e.HOST, self.port, ssl=self.tls,
                server_hostname=e2e.HOST if self.tls else None,
                local_addr=(self.sources[i % len(self.sources)], 0)), 30)
            codes = await asyncio.wait_for(proto.expect(1), 30)
            if codes[0] != 220:
                raise RuntimeError(f"greeting {codes[0]}")
            self.conns.append(proto)
        except Exception as exc:  # noqa: BLE001  (counted and reported)
            key = f"{type(exc).__name__}: {exc}"[:120]
            self.failures[key] = self.failures.get(key, 0) + 1

    async def open_to(self, n: int) -> None:
        start = len(self.conns) + sum(self.failures.values())
        for base in range(start, n, CONNECT_BATCH):
            await asyncio.gather(*(self._one(i) for i in range(base, min(n, base + CONNECT_BATCH))))

    async def ehlo_all(self) -> int:
        async def one(proto: ReplyBuffer) -> bool:
            proto.transport.write(b"EHLO client.example.com\r\n")
            try:
                return (await asyncio.wait_for(proto.expect(1), 30))[0] == 250
            except Exception:  # noqa: BLE001
                return False

        ok = 0
        for base in range(0, len(self.conns), CONNECT_BATCH):
            ok += sum(await asyncio.gather(*(one(p) for p in self.conns[base:base + CONNECT_BATCH])))
        return ok

    def close_all(self) -> None:
        for proto in self.conns:
            proto.transport.abort()
        self.conns.clear()


async def measure_process(pid: int, port: int, counts: list[int], sources: list[str], ca: Path | None,
                          settle: float, ehlo: bool = True) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Open idle connections step by step; the server's memory at each step.

    ``ca``: connect with TLS (implicit), verifying against this CA file."""
    tls = ca is not None
    ctx = ssl.create_default_context(cafile=str(ca)) if ca is not None else None
    rows: list[dict[str, Any]] = []

    def snap(label: str, n: int) -> None:
        gc.collect()
        mem = proc_memory(pid)
        rows.append({"step": label, "connections": n, **mem})
        print(f"  {label:<28} {n:>6} connections: VmRSS {mem['VmRSS']:>8,} KiB  RssAnon {mem['RssAnon']:>8,} KiB",
              flush=True)

    warm = IdleClient(port, sources, ctx)
    await warm.open_to(10)
    if ehlo:
        await warm.ehlo_all()
    warm.close_all()
    await asyncio.sleep(settle)
    snap("start (after 10 warm-up)", 0)
    client = IdleClient(port, sources, ctx)
    for n in counts:
        t0 = time.monotonic()
        await client.open_to(n)
        print(f"  opened {len(client.conns)} in {time.monotonic() - t0:.1f} s", flush=True)
        await asyncio.sleep(settle)
        snap("idle (greeting read)", len(client.conns))
    if not tls and ehlo:
        ok = await client.ehlo_all()
        await asyncio.sleep(settle)
        snap(f"after EHLO on {ok}", len(client.conns))
    client.close_all()
    await asyncio.sleep(settle + 1)
    snap("all closed", 0)
    return rows, client.failures


# --- calibration: what OpenSSL itself keeps per TLS session ------------------------------------


class OpenSslFloor(asyncio.Protocol):
    """A calibration, NOT a product path: the least a TLS server on Python's ssl can hold.

    Per connection: one ``ssl.SSLObject`` over two ``MemoryBIO``s, driven by
    hand (no uvloop SSL transport, no read buffer of its own), which sends a
    greeting once the handshake is done and ignores everything after it.  Its
    memory per idle connection is what OpenSSL (and the thinnest Python
    wrapping) costs, so it says how far under it the relay's TLS
    connections could go at best."""

    __slots__ = ("incoming", "outgoing", "ready", "tls", "transport")
    context: ssl.SSLContext

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = self.context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.ready = False

    def data_received(self, data: bytes) -> None:
        self.incoming.write(data)
        try:
            if self.ready:
                self.tls.read(65536)
            else:
                self.tls.do_handshake()
                self.ready = True
                self.tls.write(b"220 floor.bench.test calibration\r\n")
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError:
            self.transport.close()
        out = self.outgoing.read()
        if out:
            self.transport.write(out)


def openssl_floor_server(port: int, cert: str, key: str) -> int:
    """Child process: the OpenSSL floor on 127.0.0.1:port until killed."""
    raise_nofile()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    OpenSslFloor.context = ctx

    async def run() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(OpenSslFloor, e2e.HOST, port, backlog=4096)
        print("READY", flush=True)
        await asyncio.Event().wait()

    uvloop.run(run())
    return 0


def measure_openssl_floor(work: Path, counts: list[int], sources: list[str],
                          settle: float) -> tuple[list[dict[str, Any]], dict[str, int]]:
    files = e2e.tls_files(work)
    port = e2e.free_port()
    child = subprocess.Popen([e2e.PYTHON, __file__, "--openssl-floor", str(port), str(files.cert), str(files.key)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        if child.stdout.readline().strip() != "READY":
            raise RuntimeError("the OpenSSL floor server did not start")
        print(f"OpenSSL floor: pid {child.pid}", flush=True)
        return uvloop.run(measure_process(child.pid, port, counts, sources, files.ca, settle, ehlo=False))
    finally:
        child.kill()
        child.wait()


# --- part 2: in-process breakdown --------------------------------------------------------


def hold_client(port: int, n: int, sources: list[str], tls: bool) -> int:
    """Child process: open n idle connections, say READY, wait for stdin to close."""
    raise_nofile()
    ctx = None
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE

    async def run() -> None:
        client = IdleClient(port, sources, ctx)
        await client.open_to(n)
        print(f"READY {len(client.conns)} {client.failures}", flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)
        client.close_all()

    uvloop.run(run())
    return 0


def session_breakdown(session: Any, shared: set[int]) -> list[tuple[str, int, str]]:
    """(attribute, bytes, type) for each attribute that belongs to this session alone."""
    rows = [("SmtpSession object", sys.getsizeof(session), type(session).__name__)]
    d = getattr(session, "__dict__", None)
    if d is not None:
        rows.append(("its __dict__", sys.getsizeof(d), f"{len(d)} keys"))
    names = list(d) if d is not None else [s for c in type(session).__mro__ for s in getattr(c, "__slots__", ())]
    for name in names:
        value = getattr(session, name, None)
        if id(value) in shared or value is None or isinstance(value, (bool, int)) and -5 <= int(value) <= 256:
            continue
        if isinstance(value, (str, bytes)) and len(value) <= 1:
            continue   # interned / shared singletons
        size = sys.getsizeof(value)
        if isinstance(value, (list, tuple, set, dict)):
            size += sum(sys.getsizeof(v) for v in (value.values() if isinstance(value, dict) else value))
        rows.append((name, size, type(value).__name__))
    return rows


async def trace_in_process(work: Path, count: int, sources: list[str], tls: bool) -> str:
    from fastrelay.app import build_policy
    from fastrelay.config import load_config
    from fastrelay.server import SmtpServer, SmtpSession
    from fastrelay.spool import Spool
    from fastrelay.tlsutil import server_context

    relay = BigFastrelay(work)
    relay.features = frozenset({"tls", "implicit"}) if tls else frozenset()
    relay.fresh_dir()
    relay.port = e2e.free_port()
    relay.tls_port = e2e.free_port() if tls else 0
    cfg_path = relay.dir / "relay.toml"
    cfg_path.write_text(relay.config_text())
    config = load_config(cfg_path)
    spool = Spool(config.path(config.server.spool_dir))
    server = SmtpServer(config, build_policy(config), spool, tls_context=server_context(config) if tls else None)
    port = relay.tls_port if tls else relay.port
    await server.listen((e2e.HOST, port), implicit_tls=tls)
    loop = asyncio.get_running_loop()
    gc.collect()
    tracemalloc.start(4)
    before = tracemalloc.take_snapshot()
    child = await asyncio.create_subprocess_exec(
        e2e.PYTHON, __file__, "--hold-client", str(port), str(count), "--source-addrs", ",".join(sources),
        *(["--hold-tls"] if tls else []), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert child.stdout is not None and child.stdin is not None
    ready = (await asyncio.wait_for(child.stdout.readline(), 120)).decode().strip()
    await asyncio.sleep(1.0)
    gc.collect()
    after = tracemalloc.take_snapshot()
    n = len(server.sessions)
    filters = [tracemalloc.Filter(False, tracemalloc.__file__)]
    stats = after.filter_traces(filters).compare_to(before.filter_traces(filters), "lineno")
    total = sum(s.size_diff for s in stats)
    lines = [(f"In-process (tracemalloc, {n} idle {'implicit TLS ' if tls else ''}sessions after greeting; "
             f"child said `{ready}`): "
             f"{total / max(n, 1):,.0f} bytes per session traced by Python's allocators "
             "(libuv's and OpenSSL's own mallocs are not traced)."), "",
             "| where (file:line) | bytes per session | blocks per session |", "|---|---:|---:|"]
    for s in stats[:12]:
        frame = s.traceback[0]
        where = f"{frame.filename.split('/site-packages/')[-1].split('/fastrelay/')[-1]}:{frame.lineno}"
        lines.append(f"| {where} | {s.size_diff / max(n, 1):,.0f} | {s.count_diff / max(n, 1):.2f} |")
    session = next(iter(server.sessions))
    shared = {id(server), id(server.cfg), id(session.transport), id(server.loop)}
    rows = session_breakdown(session, shared)
    lines += ["", ("One idle session taken apart (`sys.getsizeof`; shared objects such as the server, its "
              "config and the transport left out):"), "", "| attribute | bytes | type |", "|---|---:|---|"]
    lines += [f"| {a} | {b:,} | {t} |" for a, b, t in rows]
    own = sum(b for _, b, _ in rows)
    transport = session.transport
    lines += ["", (f"Sum: {own:,} bytes in Python objects the session owns; the uvloop transport object "
              f"{sys.getsizeof(transport):,} bytes (`{type(transport).__name__}`, plus its libuv handle, not "
              f"visible to Python); `SmtpSession` has `__slots__`: {'__slots__' in vars(SmtpSession)}.")]
    tracemalloc.stop()
    child.stdin.close()
    await asyncio.wait_for(child.wait(), 60)
    server.stop_listening()
    for s in list(server.sessions):
        s.transport.abort()
    await asyncio.sleep(0.2)
    del loop
    return "\n".join(lines)


# --- the report ------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]]) -> list[str]:
    base = rows[0]
    out = ["| step | connections | VmRSS KiB | RssAnon KiB | VmRSS - start, per connection |",
           "|---|---:|---:|---:|---:|"]
    for r in rows:
        per = ((r["VmRSS"] - base["VmRSS"]) * KIB / r["connections"]) if r["connections"] else None
        out.append(f"| {r['step']} | {r['connections']:,} | {r['VmRSS']:,} | {r['RssAnon']:,} | "
                   + (f"{per / KIB:.2f} KiB ({per:,.0f} bytes)" if per is not None else "") + " |")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", nargs="*", type=int, default=[1000, 10000])
    ap.add_argument("--tls-counts", nargs="*", type=int, default=[1000])
    ap.add_argument("--trace-count", type=int, default=1000, help="idle sessions for the tracemalloc breakdown")
    ap.add_argument("--sources", type=int, default=4, help="source addresses 127.0.0.1..N (default 4)")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds to wait before reading memory")
    ap.add_argument("--out", default=str(e2e.BENCH / "results"))
    ap.add_argument("--hold-client", nargs=2, type=int, metavar=("PORT", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--source-addrs", default="127.0.0.1", help=argparse.SUPPRESS)  # with --hold-client
    ap.add_argument("--hold-tls", action="store_true", help=argparse.SUPPRESS)      # with --hold-client
    ap.add_argument("--openssl-floor", nargs=3, metavar=("PORT", "CERT", "KEY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.openssl_floor:
        port, cert, key = args.openssl_floor
        return openssl_floor_server(int(port), cert, key)
    if args.hold_client:
        return hold_client(args.hold_client[0], args.hold_client[1], args.source_addrs.split(","),
                           args.hold_tls)

    hard = raise_nofile()
    sources = [f"127.0.0.{i}" for i in range(1, args.sources + 1)]
    need = max(args.counts + args.tls_counts + [args.trace_count]) + 100
    if hard < need:
        sys.exit(f"RLIMIT_NOFILE hard limit {hard} is below {need}: lower --counts")
    e2e.WORK_BASE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="memory-", dir=e2e.WORK_BASE))
    work.chmod(0o755)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    machine = e2e.machine()
    sections: list[str] = []
    results: dict[str, Any] = {}
    try:
        for tls, counts in ((False, sorted(args.counts)), (True, sorted(args.tls_counts))):
            if not counts:
                continue
            server = BigFastrelay(work)
            server.features = frozenset({"tls", "implicit"}) if tls else frozenset()
            server.start()
            print(f"{'implicit TLS' if tls else 'plain'}: fastrelay pid {server.root_pid()}", flush=True)
            ca = e2e.tls_files(server.work).ca if tls else None
            port = server.tls_port if tls else server.port
            try:
                rows, failures = uvloop.run(measure_process(server.root_pid(), port, counts, sources, ca,
                                                            args.settle))
            finally:
                server.stop()
                server.cleanup()
            results["tls" if tls else "plain"] = rows
            title = "Implicit TLS (TLS 1.3 handshake done, greeting read)" if tls else "Plain (greeting read)"
            sections += [f"## {title}", "", *table(rows), ""]
            if failures:
                sections += ["Connections that failed: " + "; ".join(f"{k} x{v}" for k, v in failures.items()), ""]
        if args.tls_counts:
            rows, failures = measure_openssl_floor(work, sorted(args.tls_counts), sources, args.settle)
            results["openssl-floor"] = rows
            sections += ["## Calibration: OpenSSL's own cost per TLS session", "",
                         ("`OpenSslFloor` (in this script; not a product path): a uvloop server that holds one "
                          "`ssl.SSLObject` over two `MemoryBIO`s per connection and nothing else, same "
                          "certificate, same clients. Its cost per connection is what OpenSSL keeps per "
                          "session after the handshake, plus the thinnest Python wrapping: the least any "
                          "server on Python's `ssl` could hold."), "", *table(rows), ""]
            if failures:
                sections += ["Connections that failed: " + "; ".join(f"{k} x{v}" for k, v in failures.items()), ""]
        if args.trace_count:
            print("in-process breakdown...", flush=True)
            sections += ["## Where it goes: plain", "",
                         uvloop.run(trace_in_process(work, args.trace_count, sources, False)), ""]
            if args.tls_counts:
                sections += ["## Where it goes: implicit TLS", "",
                             uvloop.run(trace_in_process(work, min(args.trace_count, 1000), sources, True)), ""]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = "\n".join([
        f"# fastrelay memory per idle connection, {started}", "",
        (f"`{' '.join(['memory.py', *sys.argv[1:]])}`: fastrelay serve (bench/e2e.py's accept-only config, "
         f"max_connections raised), connections from {', '.join(sources)}, memory read {args.settle:g} s after "
         f"each step from /proc/PID/status. Machine: {machine['nproc']} cores, {machine['cpu']}, "
         f"{machine['memory']}; RLIMIT_NOFILE hard {hard}; Python {sys.version.split()[0]}; "
         f"fastrelay {e2e.versions().get('fastrelay git', '?')}."), "",
        "Target (issue 7): under 16 KiB per idle connection. Kernel socket buffers are not counted (not RSS).",
        "", *sections])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dest = out / f"memory-{time.strftime('%Y%m%d-%H%M%S')}.md"
    dest.write_text(text)
    print()
    print(text)
    print(f"written: {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
