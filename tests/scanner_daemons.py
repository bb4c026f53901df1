"""Private rspamd, spamd and clamd instances for the abuse tests, on loopback only.

Each daemon runs from its own directory (config, database, socket, log) on a
free 127.0.0.1 port; a test module starts each once (``running``, from a
module-scoped fixture) and stops it after its last test.
Nothing leaves the machine: no DNS server but a loopback port where nothing
answers, no network rules, no signature updates.

* **clamd** gets a one-signature database made here: an ``.ndb`` body
  signature for the EICAR test string (freshclam cannot download anything).
  ClamAV decodes MIME, so an EICAR attachment in base64 is found too.
* **spamd** uses the rules the spamassassin package ships, with network
  tests, Bayes and user configs off (``--local --nouser-config``); GTUBE
  scores 1000.
* **rspamd** runs a minimal config (one normal worker, no Lua plugins, so no
  fuzzy or RBL lookups); its core recognises GTUBE and answers ``reject``.

``StubDaemon`` stands in for a daemon where a real one cannot be made to
misbehave on demand: one that accepts and never answers (a hung scanner),
or a clamd that answers late, counting the requests in progress at once.

The directories live under /tmp with mode 0755 (not pytest's 0700
tmp_path): spamd drops root privileges to ``nobody``, which must read them.

Debian packages: clamav-daemon (clamd), spamd (spamd; pulls spamassassin),
rspamd.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import free_port

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
CLAMD_SIGNATURE = "Fastrelay.Test.EICAR"
START_TIMEOUT = 60.0
IS_ROOT = os.geteuid() == 0


@dataclass
class Daemon:
    name: str
    address: str            # what the relay's config names: host:port or URL
    directory: Path
    proc: subprocess.Popen[bytes]
    unix_socket: str = ""   # a socket path it also listens on (clamd's LocalSocket), or ""

    @property
    def log(self) -> str:
        text = ""
        for path in sorted(self.directory.glob("*.log")):
            text += path.read_text(errors="replace")
        return text

    def stop(self) -> None:
        if self.proc.poll() is None:
            # The daemon's own process group (start_new_session): its workers go too.
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def _binary(name: str, *candidates: str) -> str:
    for path in (shutil.which(name), *candidates):
        if path and os.access(path, os.X_OK):
            return path
    pytest.skip(f"{name} is not installed (Debian package: see tests/scanner_daemons.py); "
                f"scripts/test installs it when run as root")


def _directory(name: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=f"fastrelay-{name}-"))
    d.chmod(0o755)
    return d


def _start(name: str, argv: list[str], directory: Path, address: str,
           ready: Callable[[], bool]) -> Daemon:
    with open(directory / f"{name}-stdout.log", "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=directory, start_new_session=True)
    daemon = Daemon(name, address, directory, proc)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = daemon.log
            daemon.stop()
            pytest.fail(f"{name} exited with {proc.returncode} at start:\n{log[-3000:]}")
        try:
            if ready():
                return daemon
        except OSError:
            pass
        time.sleep(0.1)
    log = daemon.log
    daemon.stop()
    pytest.fail(f"{name} did not answer within {START_TIMEOUT:.0f}s:\n{log[-3000:]}")


def _exchange(port: int, request: bytes, until: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        data = b""
        while until not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def start_clamd() -> Daemon:
    binary = _binary("clamd", "/usr/sbin/clamd")
    d = _directory("clamd")
    db = d / "db"
    db.mkdir()
    # ClamAV body signature: Name:TargetType(0 = any file):Offset(* = anywhere):HexSignature
    (db / "fastrelay-test.ndb").write_text(f"{CLAMD_SIGNATURE}:0:*:{EICAR.hex()}\n")
    port = free_port()
    (d / "clamd.conf").write_text(
        f"DatabaseDirectory {db}\n"
        f"TCPSocket {port}\nTCPAddr 127.0.0.1\n"
        f"LocalSocket {d / 'clamd.sock'}\n"
        f"Foreground yes\nLogFile {d / 'clamd.log'}\nPidFile {d / 'clamd.pid'}\n"
        "LogVerbose no\nSelfCheck 0\n"
        # Room for the relay's largest message plus its Received: header.
        "StreamMaxLength 64M\n")
    daemon = _start("clamd", [binary, "-c", str(d / "clamd.conf")], d, f"127.0.0.1:{port}",
                    lambda: _exchange(port, b"zPING\0", b"\0").startswith(b"PONG"))
    daemon.unix_socket = str(d / "clamd.sock")
    return daemon


def start_spamd() -> Daemon:
    binary = _binary("spamd", "/usr/sbin/spamd")
    d = _directory("spamd")
    site = d / "site"
    site.mkdir()
    # The .pre files load the plugins (at least Check); local.cf turns off
    # whatever would reach the network or learn between tests.
    for pre in Path("/etc/spamassassin").glob("*.pre"):
        shutil.copy(pre, site)
    (site / "local.cf").write_text(
        "use_bayes 0\nbayes_auto_learn 0\ndns_available no\nskip_rbl_checks 1\n"
        "use_razor2 0\nuse_pyzor 0\n")
    for p in site.iterdir():
        p.chmod(0o644)
    site.chmod(0o755)
    port = free_port()
    argv = [binary, f"--listen=127.0.0.1:{port}", "--allowed-ips=127.0.0.1", "--local",
            "--nouser-config", f"--siteconfigpath={site}", "--max-children=2", "--min-children=1",
            f"--pidfile={d / 'spamd.pid'}", "--syslog=stderr"]
    if IS_ROOT:
        argv.append("--username=nobody")
    return _start("spamd", argv, d, f"127.0.0.1:{port}",
                  lambda: b" 0 PONG" in _exchange(port, b"PING SPAMC/1.5\r\n\r\n", b"\r\n"))


RSPAMD_CONF = """\
options {{
  pidfile = "{d}/rspamd.pid";
  filters = "";
  dns {{ nameserver = ["127.0.0.1:{dns_port}"]; timeout = 0.2s; retransmits = 1; }}
  local_addrs = ["127.0.0.0/8", "::1"];
  cache_file = "{d}/symbols.cache";
  hs_cache_dir = "{d}";
  control_socket = "{d}/rspamd.sock mode=0600";
  tempdir = "{d}";
  allow_raw_input = true;
  url_tld = "{d}/tlds.dat";
}}
logging {{ type = "file"; filename = "{d}/rspamd.log"; level = "info"; }}
worker "normal" {{ bind_socket = "127.0.0.1:{port}"; count = 1; mime = true; }}
actions {{ reject = 15; add_header = 6; greylist = 4; }}
"""


def start_rspamd() -> Daemon:
    binary = _binary("rspamd", "/usr/bin/rspamd")
    d = _directory("rspamd")
    port = free_port()
    (d / "rspamd.conf").write_text(RSPAMD_CONF.format(d=d, port=port, dns_port=free_port()))
    # The full public suffix list takes rspamd 15 s to compile on every cold
    # start; the tests' domains need a handful of suffixes.
    (d / "tlds.dat").write_text("com\nnet\norg\ntest\n")
    argv = [binary, "-f", "-c", str(d / "rspamd.conf")]
    if IS_ROOT:
        argv += ["-i", "-u", "root", "-g", "root"]  # its own dir, no other user needed

    def ready() -> bool:
        body = b"Subject: ping\r\n\r\nping\r\n"
        answer = _exchange(port, b"POST /checkv2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body), b"}")
        return answer.startswith(b"HTTP/1.1 200")

    return _start("rspamd", argv, d, f"http://127.0.0.1:{port}", ready)


def running(start: Callable[[], Daemon]) -> Iterator[Daemon]:
    """For a module-scoped fixture: ``yield from running(start_clamd)``."""
    daemon = start()
    try:
        yield daemon
    finally:
        daemon.stop()


class StubDaemon:
    """A scanner daemon's stand-in on a free loopback port, from a thread.

    ``answer=None``: accept, read whatever comes and never answer, until the
    client hangs up (any protocol: a hung rspamd, spamd or clamd).
    Otherwise: read one clamd ``zINSTREAM`` request, wait ``delay`` seconds
    and send ``answer``.  ``peak`` is the most requests in progress at once;
    a request stops counting before its answer is sent, so a client cannot
    start its next one while this one still counts.
    """

    def __init__(self, answer: bytes | None = None, delay: float = 0.0) -> None:
        self.answer = answer
        self.delay = delay
        self.connections = 0
        self.in_progress = 0
        self.peak = 0
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed by stop()
            with self._lock:
                self._conns.append(conn)
                self.connections += 1
                self.in_progress += 1
                self.peak = max(self.peak, self.in_progress)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        counted = True
        try:
            if self.answer is None:
                while conn.recv(65536):
                    pass
                return
            _recv_exactly(conn, len(b"zINSTREAM\0"))
            while (size := int.from_bytes(_recv_exactly(conn, 4), "big")) > 0:
                _recv_exactly(conn, size)
            time.sleep(self.delay)
            with self._lock:
                self.in_progress -= 1
                counted = False
            conn.sendall(self.answer)
        except OSError:
            pass
        finally:
            if counted:
                with self._lock:
                    self.in_progress -= 1
            conn.close()

    def stop(self) -> None:
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept(): close() alone does not
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._thread.join(5)


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the client hung up mid-request")
        data += chunk
    return data
