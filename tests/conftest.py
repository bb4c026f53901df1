"""Shared fixtures: a real fastrelay process on loopback, real TLS certificates.

Every test talks to the relay the way a client would: over a socket, with
smtplib, swaks, msmtp or Postfix.  The relay runs as a subprocess
(``python -m fastrelay serve``) so a crash, a signal or a restart is real.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme

HOSTNAME = "relay.example.test"
ROOT = Path(__file__).resolve().parent.parent

# An argon2id hash of "secret-password" (tests must not spend seconds hashing).
ALICE_PASSWORD = "secret-password"


_PORTS_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port free now and not handed out before in this run.

    The port is released before its user binds it, so the kernel may offer it
    again meanwhile; never giving the same one twice keeps two servers of one
    test (the relay and its next hop, say) from colliding.
    """
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _PORTS_HANDED_OUT:
            _PORTS_HANDED_OUT.add(port)
            return port


def wait_port(host: str, port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5) as s:
                s.recv(1)  # the banner: fully up
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} not listening after {timeout}s")


@dataclass
class Certs:
    ca: trustme.CA
    cert: Path
    key: Path
    ca_file: Path

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    d = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    leaf = ca.issue_cert(HOSTNAME, "localhost", "127.0.0.1")
    cert, key, ca_file = d / "cert.pem", d / "key.pem", d / "ca.pem"
    leaf.private_key_pem.write_to_path(str(key))
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    for extra in leaf.cert_chain_pems[1:]:
        with open(cert, "ab") as f:
            f.write(extra.bytes())
    ca.cert_pem.write_to_path(str(ca_file))
    return Certs(ca, cert, key, ca_file)


@pytest.fixture(scope="session")
def alice_hash() -> str:
    import argon2

    # Cheap parameters: the tests check the logic, not argon2's cost.
    return argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(ALICE_PASSWORD)


DEFAULT_ACCOUNTS = """
[[accounts]]
name = "example"
domains = ["example.com", "example.org"]
status = "active"
super_admins = ["admin@example.com"]

[[accounts.users]]
address = "alice@example.com"
passwords = ["{alice_hash}"]

[[accounts.rules]]
name = "loopback"
allowed_senders = "my_domains"
only_allowed_ips = true
ips = [ { range = "127.0.0.0/24", description = "tests", enabled = true } ]

[[accounts.rules]]
name = "authenticated"
allowed_senders = "registered_users"
require_auth = true
require_tls = true
"""


@dataclass
class RelayProcess:
    """A running ``fastrelay serve`` with its config, ports and spool."""

    directory: Path
    port: int
    tls_port: int
    certs: Certs
    config_path: Path
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.log_path = self.directory / "relay.log"

    @property
    def spool_dir(self) -> Path:
        return self.directory / "spool"

    def start(self) -> None:
        env = dict(os.environ)
        env.update(self.env)
        self._log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastrelay", "serve", "--config", str(self.config_path)],
            stdout=self._log_file, stderr=subprocess.STDOUT, env=env, cwd=self.directory,
        )
        try:
            wait_port("127.0.0.1", self.port, proc=self.proc)
        except Exception:
            self.proc.kill()
            raise RuntimeError(f"relay did not start:\n{self.log()}") from None

    def stop(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        return self.proc.returncode

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._log_file.close()

    def reload(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def queued(self) -> list[tuple[object, bytes]]:
        """(envelope, content) of every live message in the spool, read from disk.

        A running relay may finish a message and delete its segment between the
        scan and the read of its body: then the spool is read again."""
        from fastrelay.spool import Spool

        spool = Spool(self.spool_dir)
        for _ in range(20):
            try:
                return [(m.envelope, spool.read_body(m)) for m in spool.scan()]
            except FileNotFoundError:
                time.sleep(0.01)
        raise AssertionError(f"{self.spool_dir}: segments kept vanishing under 20 reads in a row")

    def wait_log(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if text in log:
                return log
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in the relay log:\n{self.log()[-3000:]}")


def write_config(directory: Path, certs: Certs, port: int, tls_port: int, *,
                 accounts: str, server_extra: str = "", extra: str = "") -> Path:
    extra = textwrap.dedent(extra)
    if "[delivery]" not in extra:
        # Accepted mail stays in the spool unless a test configures delivery.
        extra += "\n[delivery]\nenabled = false\n"
    config = textwrap.dedent(f"""
        [server]
        hostname = "{HOSTNAME}"
        listen = ["127.0.0.1:{port}"]
        listen_tls = ["127.0.0.1:{tls_port}"]
        tls_cert = "{certs.cert}"
        tls_key = "{certs.key}"
        spool_dir = "spool"
        {server_extra}
        """) + accounts + textwrap.dedent(extra) + textwrap.dedent("""
        [logging]
        level = "debug"
        """)
    path = directory / "relay.toml"
    path.write_text(config)
    return path


@pytest.fixture
def relay_factory(tmp_path: Path, certs: Certs, alice_hash: str) -> Iterator[object]:
    started: list[RelayProcess] = []

    def make(*, accounts: str | None = None, server_extra: str = "", extra: str = "",
             start: bool = True, env: dict[str, str] | None = None, name: str = "relay") -> RelayProcess:
        directory = tmp_path / name
        directory.mkdir(exist_ok=True)
        port, tls_port = free_port(), free_port()
        accounts_text = (accounts if accounts is not None else DEFAULT_ACCOUNTS).replace("{alice_hash}", alice_hash)
        config_path = write_config(directory, certs, port, tls_port, accounts=accounts_text,
                                   server_extra=server_extra, extra=extra)
        relay = RelayProcess(directory, port, tls_port, certs, config_path, env=env or {})
        if start:
            relay.start()
        started.append(relay)
        return relay

    yield make
    for relay in started:
        if relay.proc is not None and relay.proc.poll() is None:
            relay.stop()


@pytest.fixture
def relay(relay_factory: object) -> RelayProcess:
    return relay_factory()  # type: ignore[operator, no-any-return]


class RawClient:
    """A byte-exact SMTP client for malformed input: sends what it is told."""

    def __init__(self, port: int, host: str = "127.0.0.1", source: str | None = None, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.buf = b""
        self.banner = self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; buffered {self.buf!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def reply(self) -> bytes:
        """One whole (possibly multi-line) reply, lines joined with CRLF."""
        lines = [self.line()]
        while len(lines[-1]) >= 4 and lines[-1][3:4] == b"-":
            lines.append(self.line())
        return b"\r\n".join(lines)

    def cmd(self, data: bytes) -> bytes:
        self.send(data if data.endswith(b"\r\n") else data + b"\r\n")
        return self.reply()

    def closed(self, timeout: float = 5.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(relay: RelayProcess) -> Iterator[RawClient]:
    client = RawClient(relay.port)
    yield client
    client.close()


# --- Helpers for the protocol, framing and spool tests (issue 2) ---------------

QUEUED_RE = re.compile(rb"^250 2\.0\.0 Ok: queued as ([0-9A-Za-z]+)$")


def queue_id_of(reply: bytes) -> str:
    """The queue id from a ``250 2.0.0 Ok: queued as ID`` reply (with or without the code)."""
    text = reply.strip()
    if not text.startswith(b"250 "):
        text = b"250 " + text
    m = QUEUED_RE.match(text)
    assert m is not None, f"not a queued reply: {reply!r}"
    return m.group(1).decode()


def split_received(body: bytes, queue_id: str) -> tuple[bytes, bytes]:
    """Split a spooled body into the relay's own Received: header and the content as received.

    The header is ``Received: from ...`` and continuation lines; its line with
    ``id QUEUEID`` is followed by exactly one more line (``for <rcpt>; date`` or
    the date alone), so the split does not depend on what the content looks like.
    """
    assert body.startswith(b"Received: from "), body[:80]
    at = body.index(f" id {queue_id}".encode())
    id_line_end = body.index(b"\r\n", at) + 2
    end = body.index(b"\r\n", id_line_end) + 2
    return body[:end], body[end:]


def spooled(relay: RelayProcess, queue_id: str) -> tuple[object, bytes, bytes]:
    """(envelope, Received header, content) of one queued message, read from disk."""
    for envelope, body in relay.queued():
        if envelope.queue_id == queue_id:  # type: ignore[attr-defined]
            header, content = split_received(body, queue_id)
            return envelope, header, content
    raise AssertionError(f"{queue_id} is not in the spool")


def start_tls(client: RawClient, context: ssl.SSLContext, server_hostname: str = HOSTNAME) -> None:
    """Upgrade a RawClient's socket after its ``220 2.0.0 Ready to start TLS``."""
    assert client.buf == b"", f"plaintext bytes after the 220: {client.buf!r}"
    client.sock = context.wrap_socket(client.sock, server_hostname=server_hostname)


@pytest.fixture(scope="module")
def module_relay(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, certs: Certs,
                 alice_hash: str) -> Iterator[RelayProcess]:
    """One relay with the default config shared by a module's tests (saves a start per test).

    Only for tests that leave no state behind that another test could see
    (every check goes through the test's own queue ids).  A module may set
    MODULE_RELAY_SERVER_EXTRA: lines added to the relay's [server] section."""
    directory = tmp_path_factory.mktemp("module-relay")
    port, tls_port = free_port(), free_port()
    config_path = write_config(directory, certs, port, tls_port,
                               accounts=DEFAULT_ACCOUNTS.replace("{alice_hash}", alice_hash),
                               server_extra=getattr(request.module, "MODULE_RELAY_SERVER_EXTRA", ""))
    relay = RelayProcess(directory, port, tls_port, certs, config_path)
    relay.start()
    yield relay
    if relay.proc is not None and relay.proc.poll() is None:
        relay.stop()


class TlsRawClient(RawClient):
    """A RawClient on the implicit TLS port: the handshake comes before the banner."""

    def __init__(self, port: int, context: ssl.SSLContext, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        sock = socket.create_connection((host, port), timeout=timeout)
        self.sock = context.wrap_socket(sock, server_hostname=HOSTNAME)
        self.buf = b""
        self.banner = self.reply()
