"""The mail log: MailLog's direct INFO lines read exactly like the logging module's."""

from __future__ import annotations

import io
import logging
import os
import re

from fastrelay import logs

LINE = re.compile(r"^[A-Z][a-z]{2} [ 0-9]\d \d\d:\d\d:\d\d fastrelay\[(\d+)\]: (.*)$")


def test_direct_info_lines_match_the_formatter_and_respect_the_level() -> None:
    out = io.StringIO()
    logger = logging.getLogger("fastrelay.test-logs")
    logger.propagate = False
    handler = logs.BatchedLogHandler(out)
    logs.install(logger, handler)
    try:
        mail = logs.MailLog("fastrelay.test-logs")
        logger.setLevel(logging.INFO)
        mail.info("%s: from=<%s>, size=%d", "ABC123", "a@example.com", 42)
        mail.info("no arguments: 100%")
        logger.info("through logging: %d", 7)
        logger.setLevel(logging.WARNING)
        mail.info("not written")
        mail.warning("a warning: %s", "flushed at once")
        handler.flush()
    finally:
        logger.removeHandler(handler)
        logs.uninstall(handler)
        handler.close()
    lines = out.getvalue().splitlines()
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert {m.group(1) for m in parsed if m} == {str(os.getpid())}
    assert [m.group(2) for m in parsed if m] == [
        "ABC123: from=<a@example.com>, size=42", "no arguments: 100%", "through logging: 7",
        "a warning: flushed at once"]
    # The direct path and the Formatter give the same timestamp text for the same second.
    assert lines[0][:15] == lines[2][:15] or lines[0][:12] == lines[2][:12]
