"""The archive (issue 8): every relayed message stored once, searchable, exportable, tamper-evident.

Messages go through a real relay over loopback and are read back with the
real ``fastrelay archive`` commands.  The tamper, retention and crash tests
drive ``ArchiveStore`` / ``Archiver`` directly on files in a temporary
directory (altering bytes on disk, a clock of our own, a SIGKILLed child),
and check the outcome with the same commands.
"""

from __future__ import annotations

import email
import email.policy
import json
import mailbox
import os
import shutil
import signal
import smtplib
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import DEFAULT_ACCOUNTS, ROOT, RelayProcess, free_port
from sink import Sink

from fastrelay.archive import (
    SEGMENT_HEADER_SIZE,
    ArchiveMeta,
    ArchiveStore,
    SearchQuery,
    read_mbox,
    read_record,
)

HELO = "mail.example.com"

OTHER_ACCOUNT = """
[[accounts]]
name = "other"
domains = ["other.test"]

[[accounts.rules]]
name = "other-lan"
allowed_senders = "my_domains"
only_allowed_ips = true
ips = [ { range = "127.0.1.0/24" } ]
"""

ARCHIVE = """
[archive]
enabled = true
dir = "archive"
accounts = ["example"]
{journal}
"""


def archive_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastrelay", "archive", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)


def search(config: Path, *args: str) -> list[dict[str, object]]:
    done = archive_cli(config, "search", "--json", *args)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def send(port: int, sender: str, recipients: list[str], body: bytes, source: str | None = None) -> str:
    with smtplib.SMTP("127.0.0.1", port, local_hostname=HELO, timeout=15,
                      source_address=(source, 0) if source else None) as client:
        client.ehlo()
        client.mail(sender)
        for rcpt in recipients:
            code, text = client.rcpt(rcpt)
            assert code == 250, text
        code, text = client.data(body)
        assert code == 250, text
    return text.decode().rsplit(" ", 1)[-1]


def wait_archived(relay: RelayProcess, count: int, timeout: float = 15.0) -> None:
    index = relay.directory / "archive" / "index.sqlite3"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if index.exists():
            store = ArchiveStore(relay.directory / "archive", readonly=True)
            store.open()
            try:
                if store.count() >= count:
                    return
            finally:
                store.close()
        time.sleep(0.1)
    raise AssertionError(f"fewer than {count} message(s) archived; log:\n{relay.log()[-3000:]}")


def body_of(i: int, sender: str) -> bytes:
    # A "From " line and a ">From " line (mbox quoting), 8-bit text, a dot line.
    return (f"From: {sender}\r\nTo: team@example.com\r\nSubject: Quarterly report {i} – ünïcode\r\n"
            f"Message-ID: <burst-{i}@example.com>\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            f"From the desk of {sender}:\r\n>From a quote\r\n.\r\nLigne {i} été.\r\n").encode()


@pytest.fixture(scope="module")
def burst(tmp_path_factory: pytest.TempPathFactory, certs: object, alice_hash: str
          ) -> Iterator[tuple[RelayProcess, list[str], str]]:
    """A relay that archived 12 messages of account "example" and saw one of account "other"."""
    from conftest import write_config

    directory = tmp_path_factory.mktemp("archive-relay")
    port, tls_port = free_port(), free_port()
    config = write_config(directory, certs, port, tls_port,  # type: ignore[arg-type]
                          accounts=DEFAULT_ACCOUNTS.replace("{alice_hash}", alice_hash) + OTHER_ACCOUNT,
                          extra=ARCHIVE.format(journal=""))
    relay = RelayProcess(directory, port, tls_port, certs, config)  # type: ignore[arg-type]
    relay.start()
    ids = []
    for i in range(12):
        sender = "alice@example.com" if i % 2 == 0 else "bob@example.org"
        ids.append(send(port, sender, [f"r{i}@dest.test", "everyone@example.com"], body_of(i, sender)))
    other = send(port, "carol@other.test", ["x@dest.test"], body_of(99, "carol@other.test"), source="127.0.1.1")
    wait_archived(relay, 12)
    yield relay, ids, other
    relay.stop()


def test_a_burst_is_found_by_every_search_field(burst: tuple[RelayProcess, list[str], str]) -> None:
    relay, ids, other = burst
    config = relay.config_path
    everything = search(config)
    assert [m["queue_id"] for m in everything] == ids          # oldest first; account "other" not archived
    first = everything[0]
    assert (first["client_ip"], first["rule"], first["account"]) == ("127.0.0.1", "loopback", "example")
    assert [m["queue_id"] for m in search(config, "--from", "alice@example.com")] == ids[0::2]
    assert [m["queue_id"] for m in search(config, "--from", "@EXAMPLE.org")] == ids[1::2]
    assert [m["queue_id"] for m in search(config, "--to", "r3@dest.test")] == [ids[3]]
    # Mail to the account's own domain is archived too.
    assert [m["queue_id"] for m in search(config, "--to", "everyone@example.com")] == ids
    assert [m["queue_id"] for m in search(config, "--subject", "REPORT 7 –")] == [ids[7]]
    assert len(search(config, "--subject", "ünï")) == 12
    assert [m["queue_id"] for m in search(config, "--queue-id", ids[5])] == [ids[5]]
    assert search(config, "--queue-id", other) == []
    since, until = everything[4]["arrival"], everything[8]["arrival"]
    assert [m["queue_id"] for m in search(config, "--since", f"@{since!r}", "--until", f"@{until!r}")] == ids[4:8]
    assert [m["queue_id"] for m in search(config, "--from", "bob@example.org", "--since", f"@{since!r}",
                                          "--to", "@dest.test")] == ids[5::2]
    text = archive_cli(config, "search", "--subject", "report 1")
    assert text.returncode == 0 and text.stdout.strip().endswith("-- 3 message(s)")  # 1, 10, 11


def test_export_round_trips_byte_for_byte_as_eml_and_mbox(burst: tuple[RelayProcess, list[str], str],
                                                          tmp_path: Path) -> None:
    relay, ids, _ = burst
    spooled = {env.queue_id: body for env, body in relay.queued()}  # type: ignore[attr-defined]
    done = archive_cli(relay.config_path, "export", "--from", "alice@example.com", "--format", "eml",
                       "--output", str(tmp_path / "eml"))
    assert done.returncode == 0, done.stderr
    for qid in ids[0::2]:
        assert (tmp_path / "eml" / f"{qid}.eml").read_bytes() == spooled[qid]
    manifest = [json.loads(line) for line in (tmp_path / "eml" / "manifest.jsonl").read_text().splitlines()]
    assert [(m["queue_id"], m["intact"], m["recipients"]) for m in manifest] == \
        [(qid, True, [f"r{ids.index(qid)}@dest.test", "everyone@example.com"]) for qid in ids[0::2]]

    mbox_path = tmp_path / "hold.mbox"
    done = archive_cli(relay.config_path, "export", "--format", "mbox", "--output", str(mbox_path))
    assert done.returncode == 0, done.stderr
    data = mbox_path.read_bytes()
    assert b"\n>>From a quote\n" in data and b"\n>From the desk of" in data
    assert list(read_mbox(data)) == [spooled[qid] for qid in ids]
    # Other mbox readers see the same messages.
    box = mailbox.mbox(str(mbox_path), create=False)
    assert [m["Message-ID"] for m in box] == [f"<burst-{i}@example.com>" for i in range(12)]
    box.close()


# --- tamper evidence and retention: ArchiveStore on files we alter ------------------------


def write_archive_config(tmp_path: Path, retention_days: int = 365) -> Path:
    config = tmp_path / "relay.toml"
    config.write_text(textwrap.dedent(f"""
        [server]
        hostname = "relay.example.test"
        [archive]
        enabled = true
        dir = "archive"
        retention_days = {retention_days}
        """))
    return config


def meta(i: int, arrival: float) -> ArchiveMeta:
    return ArchiveMeta(f"T{i:04d}", arrival, arrival, "192.0.2.1", "h.example.com", f"s{i}@example.com",
                       [f"r{i}@dest.test"], account="example", rule="lan")


def fill(store: ArchiveStore, first: int, count: int, arrival: float) -> None:
    store.append([(meta(i, arrival), f"Subject: record {i}\r\n\r\nbody {i}\r\n".encode())
                  for i in range(first, first + count)])


def records_on_disk(directory: Path) -> list[str]:
    """The queue id of every record in every segment file, in order."""
    out = []
    for path in sorted((directory / "segments").glob("*.arc")):
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            offset = SEGMENT_HEADER_SIZE
            f.seek(offset)
            while (rec := read_record(f, offset, size)) is not None:
                out.append(json.loads(rec.meta)["queue_id"])
                offset = rec.end
    return out


def test_verify_reports_the_record_altered_or_removed(tmp_path: Path) -> None:
    config = write_archive_config(tmp_path)
    store = ArchiveStore(tmp_path / "archive")
    store.open()
    fill(store, 0, 6, time.time())
    fill(store, 6, 4, time.time())
    [row6] = store.search(SearchQuery(queue_id="T0006"))
    [row4] = store.search(SearchQuery(queue_id="T0004"))
    [row5] = store.search(SearchQuery(queue_id="T0005"))
    segment = next((tmp_path / "archive" / "segments").glob("*.arc"))
    store.close()
    done = archive_cli(config, "verify")
    assert done.returncode == 0 and "ok: 10 record(s)" in done.stdout, done.stdout + done.stderr
    original = segment.read_bytes()

    altered = bytearray(original)
    altered[original.index(b"body 6")] ^= 0x01       # one bit of record #7's content
    segment.write_bytes(bytes(altered))
    done = archive_cli(config, "verify")
    assert done.returncode == 1
    assert "FAILED at record #7 (queue id T0006)" in done.stdout and "content altered" in done.stdout, done.stdout
    assert row6.seq == 7

    # Remove record #5 (T0004) whole: the next one reads as #6 where #5 should be.
    segment.write_bytes(original[:row4.offset] + original[row5.offset:])
    done = archive_cli(config, "verify")
    assert done.returncode == 1
    assert "FAILED at record #5 (queue id T0004)" in done.stdout and "removed" in done.stdout, done.stdout

    # The last record cut off: the index still knows it.
    segment.write_bytes(original[:row6.offset + 10])
    done = archive_cli(config, "verify")
    assert done.returncode == 1 and "record #7 (queue id T0006)" in done.stdout, done.stdout


def test_retention_removes_whole_segments_and_the_chain_stays_verifiable(tmp_path: Path) -> None:
    config = write_archive_config(tmp_path, retention_days=2)
    day0 = 1_800_000_000.0 - 1_800_000_000.0 % 86400 + 3600
    clock = [day0]
    store = ArchiveStore(tmp_path / "archive", retention_days=2, clock=lambda: clock[0])
    store.open()
    for day in range(4):          # one segment per UTC day
        clock[0] = day0 + day * 86400
        fill(store, day * 3, 3, clock[0])
    assert len(list((tmp_path / "archive" / "segments").glob("*.arc"))) == 4
    assert store.expire(now=day0 + 3.5 * 86400) == 2  # days 0 and 1 are past 2 days
    assert [r.queue_id for r in store.search(SearchQuery())] == [f"T{i:04d}" for i in range(6, 12)]
    store.close()
    assert len(list((tmp_path / "archive" / "segments").glob("*.arc"))) == 2

    done = archive_cli(config, "verify")
    assert done.returncode == 0, done.stdout
    assert "ok: 6 record(s) in 2 segment(s) (2 expired segment(s) before them)" in done.stdout

    # The first kept segment disappearing is not retention: it is reported.
    first_kept = min((tmp_path / "archive" / "segments").glob("*.arc"))
    first_kept.unlink()
    done = archive_cli(config, "verify")
    assert done.returncode == 1 and "FAILED at record #7 (queue id T0006)" in done.stdout, done.stdout
    assert "missing" in done.stdout


# --- crash safety -----------------------------------------------------------------------------

CHILD = r"""
import asyncio, sys, time
from fastrelay.archive import Archiver, ArchiveStore
from fastrelay.spool import Envelope

async def main(directory, start):
    archiver = Archiver(ArchiveStore(directory))
    archiver.start(asyncio.get_running_loop())
    body = b"Subject: crash\r\n\r\n" + b"x" * 4000 + b"\r\n"
    def acked(fut):
        sys.stdout.write(fut.result().queue_id + "\n")
        sys.stdout.flush()
    i = start
    while True:
        for _ in range(25):
            env = Envelope(f"K{i:06d}", time.time(), "127.0.0.1", "h.example.com", "a@example.com", ["b@dest.test"])
            archiver.archive(env, body).add_done_callback(acked)
            i += 1
        await asyncio.sleep(0.002)

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def test_sigkill_while_archiving_loses_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "archive"
    acked: set[str] = set()
    start = 0
    for stop_after in (150, 400, 700):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(directory), str(start)],
                                 stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert child.stdout is not None
        seen = 0
        for line in child.stdout:
            acked.add(line.strip())
            seen += 1
            if seen >= stop_after:
                break
        assert seen == stop_after, "the archiving child died on its own"
        child.send_signal(signal.SIGKILL)
        rest, _ = child.communicate()
        acked.update(rest.split())
        # The next run retries some messages the last one acknowledged.
        start = max(int(q[1:]) for q in acked) - 40

    store = ArchiveStore(directory)
    store.open()   # indexes whatever the last kill left unindexed, cuts a torn tail
    indexed = {r.queue_id for r in store.search(SearchQuery())}
    assert acked <= indexed
    on_disk = records_on_disk(directory)
    assert len(on_disk) == len(set(on_disk)) == len(indexed)
    # What a retry after the crash does: everything again; nothing is written twice.
    highest = max(int(q[1:]) for q in indexed)
    results = store.append([
        (ArchiveMeta(f"K{i:06d}", 0.0, 0.0, "127.0.0.1", "h", "a@example.com", ["b@dest.test"]), b"retry")
        for i in range(highest + 1)])
    assert all(not r.new for r in results if r.queue_id in indexed)  # type: ignore[union-attr]
    on_disk = records_on_disk(directory)
    assert len(on_disk) == len(set(on_disk)) == store.count() == highest + 1
    assert store.verify().ok
    store.close()


def test_records_appended_but_never_indexed_are_indexed_at_start(tmp_path: Path) -> None:
    """A crash between the segment's fsync and the index commit leaves the index behind the segment."""
    directory = tmp_path / "archive"
    store = ArchiveStore(directory)
    store.open()
    fill(store, 0, 3, time.time())
    store.close()
    shutil.copy(directory / "index.sqlite3", tmp_path / "index.before")
    store = ArchiveStore(directory)
    store.open()
    fill(store, 3, 4, time.time())
    store.close()
    shutil.copy(tmp_path / "index.before", directory / "index.sqlite3")   # the commit never happened

    store = ArchiveStore(directory)
    store.open()
    assert store.count() == 7
    again = store.append([(meta(i, time.time()), b"again") for i in range(7)])
    assert [r.new for r in again] == [False] * 7  # type: ignore[union-attr]
    assert records_on_disk(directory) == [f"T{i:04d}" for i in range(7)]
    assert store.verify().ok
    store.close()

    # The index lost altogether: rebuilt from the segments.
    for name in ("index.sqlite3", "index.sqlite3-wal", "index.sqlite3-shm"):
        (directory / name).unlink(missing_ok=True)
    store = ArchiveStore(directory)
    store.open()
    assert [r.queue_id for r in store.search(SearchQuery())] == [f"T{i:04d}" for i in range(7)]
    assert store.verify().ok
    store.close()


# --- inside the relay: journaling, and archiving before delivery -----------------------------


def test_journal_report_goes_through_the_queue_once_with_the_original_inside(relay_factory: object) -> None:
    relay: RelayProcess = relay_factory(  # type: ignore[operator]
        extra=ARCHIVE.format(journal='journal_address = "journal@example.com"'))
    qid = send(relay.port, "alice@example.com", ["bcc-only@dest.test"], body_of(1, "alice@example.com"))
    wait_archived(relay, 1)
    relay.wait_log("journal report")
    relay.stop()
    relay.start()    # a restart archives nothing again and queues no second report
    relay.wait_log("archive: ")
    queued = {env.queue_id: (env, body) for env, body in relay.queued()}  # type: ignore[attr-defined]
    reports = [(env, body) for env, body in queued.values() if env.recipients == ["journal@example.com"]]
    assert len(reports) == 1, relay.log()[-2000:]
    env, report = reports[0]
    assert env.sender == "" and env.rule == "fastrelay:journal"
    message = email.message_from_bytes(report, policy=email.policy.compat32)
    assert message.get_content_type() == "multipart/mixed"
    assert message["X-Fastrelay-Journal-Report"] == qid
    summary, original = message.get_payload()
    text = summary.get_payload(decode=True).decode()
    assert "Sender: alice@example.com" in text and "To: bcc-only@dest.test" in text and f"Queue-Id: {qid}" in text
    assert original.get_content_type() == "message/rfc822"
    boundary = message.get_boundary().encode()
    start = report.index(b"Content-Type: message/rfc822\r\n")
    start = report.index(b"\r\n\r\n", start) + 4
    assert report[start:report.index(b"\r\n--" + boundary + b"--", start)] == queued[qid][1]
    # The report is not archived itself.
    assert [m["queue_id"] for m in search(relay.config_path)] == [qid]
    assert search(relay.config_path, "--to", "journal@example.com") == []


def test_nothing_is_delivered_before_it_is_archived(relay_factory: object, tmp_path: Path) -> None:
    sink = Sink("127.0.0.2").start()
    try:
        relay: RelayProcess = relay_factory(extra=ARCHIVE.format(journal="") + f"""
            [delivery]
            retry_schedule = ["1s"]
            [[delivery.routes]]
            domain = "*"
            host = "127.0.0.2:{sink.port}"
            tls = "none"
            """)  # type: ignore[operator]
        first = send(relay.port, "alice@example.com", ["a@dest.test"], body_of(1, "alice@example.com"))
        sink.wait(1)
        log = relay.wait_log(f"{first}: to=<a@dest.test>")
        assert log.index(f"{first}: archived") < log.index(f"{first}: to=<a@dest.test>")

        # The archive cannot write: its segment and its directory made immutable
        # (a real EPERM, even for root; a new segment cannot be created either).
        segments = relay.directory / "archive" / "segments"
        frozen = [*segments.glob("*.arc"), segments]
        if subprocess.run(["chattr", "+i", *map(str, frozen)], capture_output=True, check=False).returncode:
            pytest.skip("chattr +i is not supported here")
        try:
            second = send(relay.port, "alice@example.com", ["b@dest.test"], body_of(2, "alice@example.com"))
            relay.wait_log(f"{second}: archiving failed")
            time.sleep(1.5)          # at least one retry, still failing
            assert len(sink.messages) == 1
        finally:
            subprocess.run(["chattr", "-i", *map(str, frozen)], check=True)
        sink.wait(2)
        assert [m["queue_id"] for m in search(relay.config_path)] == [first, second]
        assert archive_cli(relay.config_path, "verify").returncode == 0
        relay.stop()
    finally:
        sink.stop()


def test_config_errors_name_the_archive_keys(tmp_path: Path) -> None:
    from fastrelay.config import load_config
    from fastrelay.errors import ConfigError

    for bad, key in (('retention_days = 0', "archive.retention_days"),
                     ('journal_address = "nobody"', "archive.journal_address"),
                     ('accounts = ["nope"]', "archive.accounts[0]")):
        path = tmp_path / "relay.toml"
        path.write_text(f'[server]\nhostname = "relay.example.test"\n[archive]\nenabled = true\n{bad}\n')
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert info.value.key == key
