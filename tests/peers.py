"""Private instances of real MTAs for the tests to talk to fastrelay through.

``PostfixPeer`` is a Postfix of its own: a config directory, a queue
directory and a data directory under one temporary directory, a single smtpd
listener on 127.0.0.1, and ``relayhost = [127.0.0.1]:<relay port>`` so that
everything it accepts is forwarded to fastrelay.  It shares nothing with the
system Postfix (which the tests never start) and several can run at once.
The recipe follows shared/reference/benchmarking.md.

Only loopback addresses are ever a target.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

POSTFIX = shutil.which("postfix")
POSTMAP = shutil.which("postmap")

# Every service chroot-free ("n" in the 5th column): the instance lives in a
# temporary directory that a chroot would not contain.  One inet listener only.
_MASTER_CF = """\
{listen} inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


@dataclass
class PostfixPeer:
    """A private Postfix that relays everything to ``[127.0.0.1]:relay_port``."""

    port: int                      # its smtpd listener on 127.0.0.1
    relay_port: int                # fastrelay's plain + STARTTLS port
    ca_file: Path                  # the test CA, so Postfix can verify fastrelay
    hostname: str = "postfix.peer.test"   # myhostname: its HELO name at fastrelay
    # Extra main.cf settings (they override the defaults below).
    settings: dict[str, str] = field(default_factory=dict)
    # (user, password) for smtp_sasl_password_maps; None: no SASL client.
    sasl_password: tuple[str, str] | None = None
    directory: Path = field(init=False)

    def __post_init__(self) -> None:
        # Not under pytest's tmp_path: its parents are mode 0700 and Postfix
        # daemons run as the postfix user.
        self.directory = Path(tempfile.mkdtemp(prefix="fastrelay-postfix-"))
        self.directory.chmod(0o755)

    @property
    def config_dir(self) -> Path:
        return self.directory / "etc"

    @property
    def log_path(self) -> Path:
        return self.directory / "maillog"

    def main_cf(self) -> dict[str, str]:
        d = self.directory
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(d / "queue"),
            "data_directory": str(d / "data"),
            "meta_directory": "/etc/postfix",
            "myhostname": self.hostname,
            "mydomain": self.hostname.partition(".")[2],
            "myorigin": "$myhostname",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "relay_domains": "",
            "relayhost": f"[127.0.0.1]:{self.relay_port}",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "smtpd_peername_lookup": "no",
            "smtp_dns_support_level": "disabled",
            "smtp_tls_security_level": "may",
            "smtp_tls_CAfile": str(d / "ca.pem"),
            "smtp_tls_loglevel": "1",
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(d),
            "biff": "no",
        }
        if self.sasl_password is not None:
            settings.update({
                "smtp_sasl_auth_enable": "yes",
                "smtp_sasl_password_maps": f"hash:{self.config_dir / 'sasl_passwd'}",
                "smtp_sasl_security_options": "noanonymous",
                # fastrelay offers AUTH only inside TLS.
                "smtp_tls_security_level": "encrypt",
            })
        settings.update(self.settings)
        return settings

    def start(self, timeout: float = 30.0) -> None:
        assert POSTFIX is not None
        etc = self.config_dir
        etc.mkdir()
        # The queue directory belongs to root (Postfix makes its subdirectories);
        # the data directory (master.lock, caches) to the mail owner.
        (self.directory / "queue").mkdir(mode=0o755)
        (self.directory / "data").mkdir(mode=0o700)
        shutil.chown(self.directory / "data", "postfix", "postfix")
        shutil.copyfile(self.ca_file, self.directory / "ca.pem")
        (self.directory / "ca.pem").chmod(0o644)
        (etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in self.main_cf().items()))
        (etc / "master.cf").write_text(_MASTER_CF.format(listen=f"127.0.0.1:{self.port}"))
        if self.sasl_password is not None:
            assert POSTMAP is not None
            user, password = self.sasl_password
            table = etc / "sasl_passwd"
            table.write_text(f"[127.0.0.1]:{self.relay_port} {user}:{password}\n")
            table.chmod(0o600)
            self._run(POSTMAP, "-c", str(etc), f"hash:{table}")
        self._run(POSTFIX, "-c", str(etc), "start")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as s:
                    if s.recv(3) == b"220":
                        return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"Postfix not listening on 127.0.0.1:{self.port}:\n{self.log()}")

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the instance, wait for its master to exit, remove its directory."""
        pid_file = self.directory / "queue" / "pid" / "master.pid"
        if POSTFIX is not None and pid_file.exists():
            pid = int(pid_file.read_text().split()[0])
            subprocess.run([POSTFIX, "-c", str(self.config_dir), "stop"],
                           capture_output=True, timeout=60, check=False)
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        shutil.rmtree(self.directory, ignore_errors=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _run(self, *argv: str) -> None:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False,
                                env={**os.environ, "MAIL_CONFIG": str(self.config_dir)})
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}:\n"
                               f"{result.stdout}{result.stderr}\n{self.log()}")


def _alive(pid: int) -> bool:
    """Whether a process is still running (a zombie waiting to be reaped is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False
