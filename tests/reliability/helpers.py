"""What the reliability tests share: process probes, opt-in switches, a small filesystem, delivery config.

Every probe reads the real relay process from /proc; nothing here stands in
for the relay or its peers.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

# Opt-in runs (soak, 20+ kills, 10,000 connections, atheris): FASTRELAY_SLOW=1.
SLOW = os.environ.get("FASTRELAY_SLOW", "") == "1"
opt_in = pytest.mark.skipif(not SLOW, reason="opt-in: set FASTRELAY_SLOW=1 (docs/reliability.md)")


def rss_kib(pid: int) -> int:
    """Resident memory of a process (VmRSS), in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@contextmanager
def open_file_limit(wanted: int) -> Iterator[int]:
    """Raise this process's soft RLIMIT_NOFILE (a relay started inside inherits it).

    Raises the hard limit too where allowed (root); otherwise skips the test
    when the hard limit is lower than ``wanted``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    raised_hard = hard
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, wanted))
        except (ValueError, OSError):
            pytest.skip(f"needs {wanted} open files; the hard limit is {hard} (raise it with ulimit -Hn)")
        raised_hard = wanted
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, raised_hard))
    try:
        yield wanted
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class SmallFilesystem:
    """A loop-mounted ext4 image of a few MiB, made and mounted by the test (root only).

    ext4 rather than tmpfs: ``chattr +i`` on ext4 makes writes through an
    already open file fail with a real EPERM (tmpfs ignores it for open
    files), and ext4 can be made to fail for real (errors=remount-ro)."""

    def __init__(self, image: Path, mountpoint: Path) -> None:
        self.image = image
        self.mountpoint = mountpoint
        self.device = ""

    def mount(self, size_mib: int, options: str = "") -> SmallFilesystem:
        if os.geteuid() != 0:
            pytest.skip("mounting a test filesystem needs root")
        for tool in ("mkfs.ext4", "mount", "umount", "chattr", "losetup"):
            if shutil.which(tool) is None:
                pytest.skip(f"{tool} is not installed (e2fsprogs, mount)")
        with open(self.image, "wb") as f:
            f.truncate(size_mib * 1024 * 1024)
        # -m 0: no blocks reserved for root (the relay runs as root here).
        made = subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(self.image)],
                              capture_output=True, text=True, check=False)
        if made.returncode != 0:
            pytest.skip(f"mkfs.ext4 failed: {made.stderr.strip()}")
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.remount_image(options)
        return self

    def remount_image(self, options: str = "") -> None:
        opts = "loop" + (f",{options}" if options else "")
        done = subprocess.run(["mount", "-o", opts, str(self.image), str(self.mountpoint)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot loop-mount a test filesystem here: {done.stderr.strip()}")
        source = subprocess.run(["findmnt", "-no", "SOURCE", str(self.mountpoint)],
                                capture_output=True, text=True, check=False).stdout.strip()
        self.device = os.path.basename(source)

    def fill(self, name: str = "filler") -> Path:
        """Write a file until the filesystem says ENOSPC; return it."""
        path = self.mountpoint / name
        chunk = b"\0" * (1 << 20)
        with open(path, "wb", buffering=0) as f:
            for size in (1 << 20, 4096, 512):
                while True:
                    try:
                        f.write(chunk[:size])
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
            try:
                os.fsync(f.fileno())
            except OSError:
                pass
        return path

    def free_bytes(self) -> int:
        st = os.statvfs(self.mountpoint)
        return st.f_bavail * st.f_frsize

    def immutable(self, on: bool, paths: list[Path]) -> None:
        flag = "+i" if on else "-i"
        subprocess.run(["chattr", flag, *map(str, paths)], check=True, capture_output=True)

    def unmount(self) -> None:
        if not self.mountpoint.is_mount():
            return
        subprocess.run(["chattr", "-R", "-i", str(self.mountpoint)], capture_output=True, check=False)
        for _ in range(50):
            if subprocess.run(["umount", str(self.mountpoint)], capture_output=True, check=False).returncode == 0:
                return
            time.sleep(0.1)
        subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True, check=False)


def delivery_to(port: int, *, retry: str = '["1s"]', command_timeout: float = 5,
                per_destination: int = 10, extra: str = "") -> str:
    """Config: delivery on, every domain routed to 127.0.0.1:port without TLS, no content scanning."""
    return f"""
[delivery]
retry_schedule = {retry}
connect_timeout = 2
command_timeout = {command_timeout}
connection_idle_time = 3
per_destination_concurrency = {per_destination}
{extra}
[[delivery.routes]]
domain = "*"
host = "127.0.0.1:{port}"
tls = "none"

[abuse]
enabled = false
"""
