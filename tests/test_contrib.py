"""contrib/fastrelay.service and the deployment guide (docs/operations.md) agree with fastrelay.

``systemd-analyze verify`` checks the unit where systemd is installed (it is
on the Debian machines the suite runs on); the keys the deployment relies on
are checked from the file itself everywhere.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

from fastrelay.config import Config, ServerConfig, _decode, parse_duration

UNIT = ROOT / "contrib" / "fastrelay.service"
VENV = "/opt/fastrelay/.venv"


def unit_keys() -> dict[str, list[str]]:
    """``Section.Key`` -> every value given (systemd allows repeated keys)."""
    keys: dict[str, list[str]] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        keys.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return keys


def guide_config() -> Config:
    text = (ROOT / "docs" / "operations.md").read_text()
    [block] = re.findall(r"```toml\n(.*?)```", text, re.DOTALL)
    return _decode("docs/operations.md", block, Config)  # type: ignore[no-any-return]


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (the key checks below still run)")
    # Point the unit at this checkout's virtualenv: verify checks that the commands exist.
    unit = tmp_path / "fastrelay.service"
    unit.write_text(UNIT.read_text().replace(VENV, str(ROOT / ".venv")))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60,
                          check=False)
    # Unknown keys and bad values are only warnings (exit 0): there must be none.
    assert done.returncode == 0 and done.stderr == "", done.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                              capture_output=True, text=True, timeout=60, check=False)
    found = re.search(r"Overall exposure level for fastrelay\.service: (\d+\.\d+)", security.stdout)
    if found is not None:   # systemd >= 250
        assert float(found.group(1)) <= 2.5, security.stdout[-2000:]


def test_the_unit_has_what_the_deployment_relies_on() -> None:
    keys = unit_keys()
    service = {k.removeprefix("Service."): v for k, v in keys.items() if k.startswith("Service.")}
    assert service["Type"][0] in ("simple", "exec", "notify")
    assert service["User"] == ["fastrelay"] and service["Group"] == ["fastrelay"]
    assert service["ExecStart"] == [f"{VENV}/bin/fastrelay serve --config /etc/fastrelay/relay.toml"]
    assert service["ExecReload"][-1] == "/bin/kill -HUP $MAINPID"
    assert service["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert service["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome", "PrivateDevices"):
        assert service[key] == ["yes"], key
    assert service["ProtectSystem"] == ["strict"]
    writable = [p.lstrip("-") for value in service["ReadWritePaths"] for p in value.split()]
    writable += [f"/var/lib/{d}" for d in service["StateDirectory"]] + [f"/var/log/{d}" for d in service["LogsDirectory"]]
    # SIGTERM drains for drain_timeout: systemd must wait longer before SIGKILL.
    config = guide_config()
    assert parse_duration(service["TimeoutStopSec"][0]) > config.server.drain_timeout
    assert parse_duration(service["TimeoutStopSec"][0]) > ServerConfig().drain_timeout
    # Every directory the guide's config writes to is writable under ProtectSystem=strict.
    for needed in (config.server.spool_dir, config.quota.state_dir, config.archive.dir,
                   str(Path(config.logging.events_file).parent)):
        assert any(needed == w or needed.startswith(w.rstrip("/") + "/") for w in writable), needed
    for directory in ("spool", "quota", "archive"):
        assert f"/var/lib/fastrelay/{directory}" in writable
    assert keys["Install.WantedBy"] == ["multi-user.target"]
