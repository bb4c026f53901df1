"""Archive index: searches over a million archived messages.

Run: .venv/bin/pytest bench/test_bench_archive.py --benchmark-only
     (FASTRELAY_BENCH_ARCHIVE_ROWS=100000 for a quicker run)
Target (issue 8): every ``fastrelay archive search`` filter well under a
second with 1,000,000 messages in the index.

The archive is built through the real write path (``ArchiveStore.append``
in batches of BATCH_MESSAGES: segments, hash chain, fdatasync, index), 30
days of mail from 1,000 sender domains to 500 recipient domains, 1-3
recipients each (sender and recipient addresses mostly distinct), subjects
with random numbers.  The build rate is printed (it is the archive's own
write throughput on one thread).  Results (docs/archive.md): every filter
under 0.2 s in-process at 1,000,000 messages.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fastrelay.archive import BATCH_MESSAGES, ArchiveMeta, ArchiveStore, SearchQuery

ROWS = int(os.environ.get("FASTRELAY_BENCH_ARCHIVE_ROWS", "1000000"))
START = 1_800_000_000.0
SPAN = 30 * 86400.0
MIDDLE = ROWS // 2


def message(rng: random.Random, i: int) -> tuple[ArchiveMeta, bytes]:
    sender = f"user{rng.randrange(10_000)}@corp{rng.randrange(1000)}.example"
    recipients = [f"p{rng.randrange(100_000)}@dest{rng.randrange(500)}.test" for _ in range(rng.randint(1, 3))]
    arrival = START + i * SPAN / ROWS
    meta = ArchiveMeta(f"Q{i:08d}", arrival, arrival, "192.0.2.1", "mta.corp.example", sender, recipients,
                       account="corp", rule="lan")
    body = (f"Received: from mta.corp.example\r\nFrom: {sender}\r\nTo: {recipients[0]}\r\n"
            f"Subject: Invoice {rng.randrange(1_000_000)} for order {rng.randrange(100_000)}\r\n"
            f"Message-ID: <{i}@corp.example>\r\n\r\nPlease find the invoice attached.\r\n").encode()
    return meta, body


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ArchiveStore, dict[str, Any]]]:
    directory = tmp_path_factory.mktemp("archive-bench")
    store = ArchiveStore(directory, retention_days=100_000, clock=lambda: START + 3600)  # one segment
    store.open()
    rng = random.Random(8)
    middle: tuple[ArchiveMeta, bytes] | None = None
    started = time.perf_counter()
    for first in range(0, ROWS, BATCH_MESSAGES):
        batch = [message(rng, i) for i in range(first, min(first + BATCH_MESSAGES, ROWS))]
        if first <= MIDDLE < first + len(batch):
            middle = batch[MIDDLE - first]
        store.append(batch)
    elapsed = time.perf_counter() - started
    store.db.execute("PRAGMA optimize")  # type: ignore[union-attr]
    size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    print(f"\narchive: {ROWS} messages archived in {elapsed:.1f} s ({ROWS / elapsed:,.0f} msg/s); "
          f"{size / 1e6:,.0f} MB on disk (index {(directory / 'index.sqlite3').stat().st_size / 1e6:,.0f} MB)")
    assert middle is not None
    meta, body = middle
    subject = body.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
    facts = {"queue_id": meta.queue_id, "sender": meta.sender, "sender_domain": "@" + meta.sender.split("@")[1],
             "recipient": meta.recipients[0], "recipient_domain": "@" + meta.recipients[0].split("@")[1],
             "arrival": meta.arrival, "invoice": subject.split(" for ")[0], "order": subject.split(" for ")[1],
             "directory": directory}
    yield store, facts
    store.close()


def queries(f: dict[str, Any]) -> dict[str, SearchQuery]:
    hour, day, week = 3600.0, 86400.0, 7 * 86400.0
    t = f["arrival"]
    return {
        "queue-id": SearchQuery(queue_id=f["queue_id"]),
        "from address": SearchQuery(sender=f["sender"]),
        "from @domain": SearchQuery(sender=f["sender_domain"]),
        "to address": SearchQuery(recipient=f["recipient"]),
        "to @domain": SearchQuery(recipient=f["recipient_domain"]),
        "since/until 1 hour": SearchQuery(since=t, until=t + hour),
        "subject (rare)": SearchQuery(subject=f["invoice"]),
        "subject (common words)": SearchQuery(subject=f["order"]),
        "from @domain + 1 day": SearchQuery(sender=f["sender_domain"], since=t - day / 2, until=t + day / 2),
        "to address + 1 week": SearchQuery(recipient=f["recipient"], since=t - week, until=t + week),
        "to @domain + subject": SearchQuery(recipient=f["recipient_domain"], subject="Invoice 1"),
    }


NAMES = list(queries({"arrival": 0.0, "queue_id": "", "sender": "", "sender_domain": "", "recipient": "",
                      "recipient_domain": "", "invoice": "", "order": ""}))


@pytest.mark.parametrize("name", NAMES)
def test_search(benchmark: Any, archive: tuple[ArchiveStore, dict[str, Any]], name: str) -> None:
    store, facts = archive
    benchmark.group = f"archive search, {ROWS:,} messages"
    query = queries(facts)[name]
    rows = benchmark.pedantic(store.search, args=(query,), rounds=20, iterations=1, warmup_rounds=2)
    benchmark.extra_info["results"] = len(rows)
    assert rows, name


def test_cli_search_end_to_end(benchmark: Any, archive: tuple[ArchiveStore, dict[str, Any]],
                               tmp_path: Path) -> None:
    """`fastrelay archive search` as an operator runs it: process start, config, query, output."""
    _, facts = archive
    config = tmp_path / "relay.toml"
    config.write_text(f'[server]\nhostname = "relay.example.test"\n[archive]\nenabled = true\n'
                      f'dir = "{facts["directory"]}"\n')
    benchmark.group = f"archive search CLI, {ROWS:,} messages"
    command = [sys.executable, "-m", "fastrelay", "archive", "search", "--config", str(config),
               "--to", facts["recipient"]]

    def run() -> str:
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout

    out = benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    assert facts["queue_id"] in out
