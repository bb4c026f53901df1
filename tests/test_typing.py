"""The package type-checks under mypy's strict mode ([tool.mypy] in pyproject.toml).

The interfaces between the modules (protocol, policy, quotas, queue,
delivery) are typed so that a change on one side is caught on the other
before any test runs; this keeps that true."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_package_type_checks_strictly(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy-cache"), "fastrelay"],
        cwd=ROOT, capture_output=True, text=True, timeout=280, check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Success: no issues found" in result.stdout
