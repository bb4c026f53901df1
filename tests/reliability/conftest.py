"""Fixtures of the reliability suite: measurements to report, and a small filesystem to fill."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .helpers import SmallFilesystem

# Numbers the tests measured (memory per connection, duplicates...), printed
# at the end of the run under "reliability measurements".
_MEASUREMENTS: list[str] = []


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Callable[[str], None]:
    def add(line: str) -> None:
        text = f"{request.node.name}: {line}"
        _MEASUREMENTS.append(text)
        request.node.user_properties.append(("measurement", line))
        print(text)
    return add


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _MEASUREMENTS:
        terminalreporter.section("reliability measurements")
        for line in _MEASUREMENTS:
            terminalreporter.write_line(line)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[[Path, int], SmallFilesystem]]:
    """``small_fs(mountpoint, size_mib)`` mounts a fresh ext4 image there; unmounted at teardown.

    List this fixture before ``relay_factory`` so that it is torn down after the relay stops."""
    mounted: list[SmallFilesystem] = []

    def mount(mountpoint: Path, size_mib: int, options: str = "") -> SmallFilesystem:
        fs = SmallFilesystem(tmp_path / f"fs{len(mounted)}.img", mountpoint)
        mounted.append(fs)
        return fs.mount(size_mib, options)

    yield mount
    for fs in reversed(mounted):
        fs.unmount()
