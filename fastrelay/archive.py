"""Comprehensive mail storage: every relayed message archived once, tamper-evident.

When ``[archive] enabled`` is on, every message fastrelay accepts (and every
notification it generates) is stored once, with its envelope, before any
delivery attempt: the queue manager's ``pre_delivery`` stage awaits
``ArchiveStage``, and the server's ``on_queued`` hand-off starts the same work
in the background so the archive keeps up even while delivery is off.  The
SMTP session never waits for it: the 250 is given when the spool has the
message, as without an archive.

Layout under ``dir``::

    segments/00000001-2024-05-01.arc   append-only records; a new segment each
                                       UTC day and every SEGMENT_BYTES
    index.sqlite3                      the index (and each segment's chain anchor)
    archive.lock                       held by the running relay

A segment starts with a header ``SEGMENT_MAGIC | number | anchor | created``;
``anchor`` is the hash the chain had before the segment's first record.  A
record is ``MAGIC | seq | meta_len | body_len | prev | hash | meta | body``:
``meta`` is the JSON envelope (queue id, arrival, client IP, HELO, sender,
recipients, AUTH user, account, rule, TLS), ``body`` the message exactly as
queued (fastrelay's Received: header first), and::

    hash = sha256(prev || seq, meta_len, body_len || meta || body)

where ``prev`` is the previous record's hash (the genesis anchor is 32 zero
bytes).  Altering one byte of a record changes its hash; removing a record
leaves a gap in ``seq`` and a ``prev`` that no longer matches; both are found
by ``verify`` at that record.  The index keeps each record's hash and each
segment's anchor and head, so retention can delete whole segments and the
chain stays verifiable from the first kept record (its anchor is the head of
the last expired segment, still in the index).  Whoever can rewrite both the
segments and the index can rewrite history: ``verify`` prints the chain head,
and an operator who keeps that value elsewhere (a ticket, another host) can
prove that nothing before it changed later (docs/archive.md).

Why SQLite (the standard library's sqlite3) for the index: it answers the
searches the legal side asks for (sender, recipient, time range, subject
words, queue id) through B-tree indexes and an FTS5 trigram index in
milliseconds over millions of rows (bench/test_bench_archive.py), readers
(``fastrelay archive search`` from another process) never block the writer in
WAL mode, a batch of records is one transaction, and there is no server to
run.  The segments stay the source of truth: the index can always be rebuilt
from them.

Crash safety.  A batch is appended to the segment and fdatasync'ed first, then
indexed in one SQLite transaction that also moves the segment's ``end_offset``
(the watermark); only then are the callers told.  At start, records beyond the
watermark (a crash between the fsync and the commit) are indexed before
anything new is accepted, and a torn tail (a crash mid-write, never
acknowledged) is cut.  A queue id already in the index is never appended
again, so archiving is idempotent: a retry after a crash finds the record.

Journaling (``journal_address``): after a message is archived, a journal
report (``build_journal_copy``: an envelope summary and the original as a
message/rfc822 part, as Exchange journal reports do) is queued through
fastrelay's own spool from the null sender to that address.  It is not
archived itself.  At-least-once: a crash between queuing the report and
recording it in the index sends a second report.

Config keys read: archive.enabled (false), archive.dir ("var/archive"),
archive.retention_days (365), archive.journal_address (""), archive.accounts
([] = every account); server.hostname.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import email.header
import email.utils
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import sqlite3
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple

import msgspec

from .config import Config, load_config, parse_duration
from .errors import ConfigError, FastrelayError
from .spool import Envelope, Location, QueueIdGenerator, Spool

log = logging.getLogger("fastrelay.archive")

SEGMENT_MAGIC = b"FRarch1\n"
_SEGMENT_HEADER = struct.Struct("<8sQ32sd")  # magic, number, anchor, created
SEGMENT_HEADER_SIZE = _SEGMENT_HEADER.size
MAGIC = b"FRa1"
_RECORD = struct.Struct("<4sQIQ32s32s")  # magic, seq, meta_len, body_len, prev, hash
_HASHED = struct.Struct("<QIQ")          # seq, meta_len, body_len: covered by the hash
RECORD_HEADER_SIZE = _RECORD.size
GENESIS = bytes(32)
SEGMENT_BYTES = 1 << 30
# One batch (one fdatasync, one transaction) holds at most this much.
BATCH_MESSAGES = 512
BATCH_BYTES = 64 * 1024 * 1024
# The rule name carried by journal reports: they are copies, not archived again.
JOURNAL_RULE = "fastrelay:journal"
EXPIRY_INTERVAL = 3600.0

INDEX_NAME = "index.sqlite3"
SCHEMA = """
CREATE TABLE IF NOT EXISTS segments (
    number INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    day TEXT NOT NULL,
    anchor BLOB NOT NULL,        -- chain hash before the first record
    head BLOB NOT NULL,          -- chain hash after the last indexed record
    first_seq INTEGER NOT NULL,
    records INTEGER NOT NULL,
    end_offset INTEGER NOT NULL, -- the watermark: records before it are indexed
    newest REAL NOT NULL,        -- newest arrival in the segment (retention)
    expired REAL                 -- when retention deleted the file
);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,
    queue_id TEXT NOT NULL UNIQUE,
    arrival REAL NOT NULL,
    sender TEXT NOT NULL,        -- lower case
    sender_domain TEXT NOT NULL,
    subject TEXT NOT NULL,
    message_id TEXT NOT NULL,
    client_ip TEXT NOT NULL,
    account TEXT,
    rule TEXT,
    size INTEGER NOT NULL,
    segment INTEGER NOT NULL,
    offset INTEGER NOT NULL,     -- of the record header
    meta_len INTEGER NOT NULL,
    hash BLOB NOT NULL,
    journal_id TEXT
);
CREATE INDEX IF NOT EXISTS messages_arrival ON messages(arrival);
CREATE INDEX IF NOT EXISTS messages_sender ON messages(sender, arrival);
CREATE INDEX IF NOT EXISTS messages_sender_domain ON messages(sender_domain, arrival);
CREATE TABLE IF NOT EXISTS recipients (
    seq INTEGER NOT NULL,
    address TEXT NOT NULL,       -- lower case
    domain TEXT NOT NULL,
    PRIMARY KEY (seq, address)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS recipients_address ON recipients(address);
CREATE INDEX IF NOT EXISTS recipients_domain ON recipients(domain);
CREATE VIRTUAL TABLE IF NOT EXISTS subjects USING fts5(
    subject, content='messages', content_rowid='seq', tokenize='trigram');
"""


class ArchiveError(FastrelayError):
    """The archive cannot be opened or written."""


class ArchiveMeta(msgspec.Struct, omit_defaults=True):
    """A record's envelope, as stored (JSON) in the segment."""

    queue_id: str
    arrival: float
    archived: float
    client_ip: str
    client_helo: str
    sender: str
    recipients: list[str]
    auth_user: str | None = None
    original_sender: str | None = None
    tls: str | None = None
    account: str | None = None
    rule: str | None = None


_meta_encoder = msgspec.json.Encoder()
_meta_decoder = msgspec.json.Decoder(ArchiveMeta)


def meta_from_envelope(envelope: Envelope, archived: float) -> ArchiveMeta:
    e = envelope
    return ArchiveMeta(e.queue_id, e.arrival, archived, e.client_ip, e.client_helo, e.sender,
                       list(e.recipients), e.auth_user, e.original_sender, e.tls, e.account, e.rule)


class ArchivedRecord(NamedTuple):
    """The answer to an archive request."""

    queue_id: str
    seq: int
    hash: bytes
    journal_id: str | None
    new: bool          # False: the queue id was archived before


@dataclass(slots=True)
class _Segment:
    number: int
    name: str
    day: str
    anchor: bytes
    head: bytes
    first_seq: int
    records: int
    end_offset: int
    newest: float
    expired: float | None

    @property
    def last_seq(self) -> int:
        return self.first_seq + self.records - 1


@dataclass(slots=True)
class _Parsed:
    """One record read back from a segment."""

    seq: int
    offset: int
    meta: bytes
    body: bytes
    prev: bytes
    hash: bytes
    end: int

    def computed_hash(self) -> bytes:
        return record_hash(self.prev, self.seq, self.meta, self.body)


def record_hash(prev: bytes, seq: int, meta: bytes, body: bytes) -> bytes:
    h = hashlib.sha256(prev)
    h.update(_HASHED.pack(seq, len(meta), len(body)))
    h.update(meta)
    h.update(body)
    return h.digest()


def _segment_name(number: int, day: str) -> str:
    return f"{number:08d}-{day}.arc"


def _utc_day(t: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(t))


def _domain(address: str) -> str:
    return address.rpartition("@")[2] if "@" in address else ""


_INDEXED_HEADER = re.compile(rb"^(subject|message-id)[ \t]*:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)",
                             re.IGNORECASE | re.MULTILINE)


def header_fields(body: bytes) -> tuple[str, str]:
    """(Subject, Message-ID) of a message for the index: unfolded, RFC 2047 encoded
    words decoded, raw UTF-8 allowed (RFC 6532).  A direct scan of the header
    block: the email package's parser costs ten times more, on the archive's thread."""
    end = body.find(b"\r\n\r\n")
    head = body[:end + 2] if end >= 0 else body
    found: dict[bytes, bytes] = {}
    for m in _INDEXED_HEADER.finditer(head):
        found.setdefault(m.group(1).lower(), m.group(2))
    subject = found.get(b"subject", b"").replace(b"\r\n", b"").decode("utf-8", "replace")
    if "=?" in subject:
        try:
            decoded = str(email.header.make_header(email.header.decode_header(subject)))
        except Exception:  # noqa: BLE001 -- a broken encoded word is indexed as it is written
            decoded = subject
        subject = decoded
    message_id = found.get(b"message-id", b"").replace(b"\r\n", b"").decode("utf-8", "replace")
    return " ".join(subject.split()), message_id.strip()


def read_segment_header(f: IO[bytes]) -> tuple[int, bytes, float] | None:
    raw = f.read(SEGMENT_HEADER_SIZE)
    if len(raw) < SEGMENT_HEADER_SIZE:
        return None
    magic, number, anchor, created = _SEGMENT_HEADER.unpack(raw)
    if magic != SEGMENT_MAGIC:
        return None
    return number, anchor, created


def read_record(f: IO[bytes], offset: int, limit: int) -> _Parsed | None:
    """The record at ``offset`` (f positioned there) ending by ``limit``, or None
    if it is torn or not a record (lengths are checked before anything is read)."""
    raw = f.read(RECORD_HEADER_SIZE)
    if len(raw) < RECORD_HEADER_SIZE:
        return None
    magic, seq, meta_len, body_len, prev, stored = _RECORD.unpack(raw)
    if magic != MAGIC:
        return None
    end = offset + RECORD_HEADER_SIZE + meta_len + body_len
    if end > limit:
        return None
    meta = f.read(meta_len)
    body = f.read(body_len)
    if len(meta) < meta_len or len(body) < body_len:
        return None
    return _Parsed(seq, offset, meta, body, prev, stored, end)


# --- searching ------------------------------------------------------------------------


@dataclass(slots=True)
class SearchQuery:
    """Filters of ``archive search`` / ``archive export``; all given ones must match."""

    sender: str | None = None         # an address, or "@domain"
    recipient: str | None = None      # an address, or "@domain"
    since: float | None = None
    until: float | None = None
    subject: str | None = None        # a substring, any case
    queue_id: str | None = None
    limit: int = 0                    # 0: no limit


class IndexRow(NamedTuple):
    seq: int
    queue_id: str
    arrival: float
    sender: str
    subject: str
    message_id: str
    client_ip: str
    account: str | None
    rule: str | None
    size: int
    segment: int
    offset: int
    meta_len: int
    hash: bytes
    recipients: list[str]


_ROW_COLUMNS = ("m.seq, m.queue_id, m.arrival, m.sender, m.subject, m.message_id, m.client_ip, "
                "m.account, m.rule, m.size, m.segment, m.offset, m.meta_len, m.hash")


def _build_search(q: SearchQuery) -> tuple[str, list[Any]]:
    where: list[str] = []
    args: list[Any] = []
    selective = False
    if q.queue_id:
        where.append("m.queue_id = ?")
        args.append(q.queue_id)
        selective = True
    if q.sender is not None:
        s = q.sender.lower()
        if s.startswith("@"):
            where.append("m.sender_domain = ?")
            args.append(s[1:])
        else:
            where.append("m.sender = ?")
            args.append(s)
        selective = True
    if q.recipient:
        r = q.recipient.lower()
        column = "domain" if r.startswith("@") else "address"
        where.append(f"m.seq IN (SELECT seq FROM recipients WHERE {column} = ?)")
        args.append(r.removeprefix("@"))
        selective = True
    if q.subject:
        text = " ".join(q.subject.split())
        if len(text) >= 3:
            # FTS5 trigram: a substring match through the index (any case).
            where.append("m.seq IN (SELECT rowid FROM subjects WHERE subjects MATCH ?)")
            args.append('"' + text.replace('"', '""') + '"')
        else:
            where.append("m.subject LIKE ? ESCAPE '\\'")
            args.append("%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
        selective = True
    # With an equality filter, keep the planner off the arrival index (a
    # time range is rarely the selective part): "+" disables an index.
    column = "+m.arrival" if selective else "m.arrival"
    if q.since is not None:
        where.append(f"{column} >= ?")
        args.append(q.since)
    if q.until is not None:
        where.append(f"{column} < ?")
        args.append(q.until)
    sql = f"SELECT {_ROW_COLUMNS} FROM messages m"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY m.arrival, m.seq"
    if q.limit > 0:
        sql += f" LIMIT {int(q.limit)}"
    return sql, args


# --- the store -----------------------------------------------------------------------------


@dataclass(slots=True)
class VerifyReport:
    ok: bool
    records: int = 0                  # records checked
    segments: int = 0                 # segment files read
    expired_segments: int = 0
    head: bytes = GENESIS
    problem: str = ""                 # the first problem found
    problem_seq: int | None = None
    problem_queue_id: str | None = None
    notes: list[str] = field(default_factory=list)


class ArchiveStore:
    """Segments and their index; blocking, used from one thread at a time."""

    def __init__(self, directory: Path | str, retention_days: int = 365, *, readonly: bool = False,
                 segment_bytes: int = SEGMENT_BYTES, clock: Callable[[], float] = time.time) -> None:
        self.directory = Path(directory)
        self.segments_dir = self.directory / "segments"
        self.retention_days = retention_days
        self.readonly = readonly
        self.segment_bytes = segment_bytes
        self.clock = clock
        self.db: sqlite3.Connection | None = None
        self._lock_fd = -1
        self._fd = -1
        self._current: _Segment | None = None
        self._next_seq = 1
        self._head = GENESIS
        self._dirty = False   # appended but not indexed: index the tail before the next batch

    # -- opening and recovery ----------------------------------------------------------

    def open(self) -> None:
        index = self.directory / INDEX_NAME
        if self.readonly:
            if not index.exists():
                raise ArchiveError(f"no archive index at {index}")
            self.db = sqlite3.connect(f"file:{index}?mode=ro", uri=True, isolation_level=None,
                                      check_same_thread=False)
            return
        self.segments_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / "archive.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise ArchiveError(f"{self.directory} is in use by another fastrelay") from None
        self.db = sqlite3.connect(index, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # The segments are fsynced before each commit; an index commit lost to a
        # power cut is redone from them at the next start.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self._recover()
        self.expire()

    def close(self) -> None:
        if self.db is not None:
            if not self.readonly:
                try:
                    self.db.execute("PRAGMA optimize")
                except sqlite3.Error:
                    pass
            self.db.close()
            self.db = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _db(self) -> sqlite3.Connection:
        assert self.db is not None, "ArchiveStore.open() not called"
        return self.db

    def segments(self) -> list[_Segment]:
        rows = self._db().execute(
            "SELECT number, name, day, anchor, head, first_seq, records, end_offset, newest, expired"
            " FROM segments ORDER BY number").fetchall()
        return [_Segment(*row) for row in rows]

    def _recover(self) -> None:
        segments = self.segments()
        for seg in segments:
            if seg.expired is not None:
                # An expiry that stopped between its commit and the unlink.
                (self.segments_dir / seg.name).unlink(missing_ok=True)
        live = [s for s in segments if s.expired is None]
        if segments:
            last = segments[-1]
            self._head = last.head
            self._next_seq = last.first_seq + last.records
        known = {s.number for s in segments}
        highest = segments[-1].number if segments else 0
        if live:
            self._index_tail(live[-1])
        # Segment files newer than the index: created, perhaps written, never
        # committed (or the index is new: it is rebuilt from the segments).
        for path in sorted(self.segments_dir.glob("*.arc")):
            number = _number_of(path)
            if number is None or number in known or number < highest:
                continue
            with open(path, "rb") as f:
                header = read_segment_header(f)
                first = read_record(f, SEGMENT_HEADER_SIZE, os.fstat(f.fileno()).st_size)
            if header is None and path.stat().st_size <= SEGMENT_HEADER_SIZE:
                log.warning("archive: %s: torn at creation, removed (nothing in it was acknowledged)", path.name)
                path.unlink()
                continue
            if header is not None and header[0] == number and header[1] != self._head and not known:
                # A new index over old segments: the chain is verifiable from here on.
                log.warning("archive: index rebuilt from %s on; the records before it are not in the index",
                            path.name)
                self._head = header[1]
                self._next_seq = first.seq if first is not None else self._next_seq
            if header is None or header[0] != number or header[1] != self._head:
                log.error("archive: %s does not continue the chain; set aside as %s.orphan", path.name, path.name)
                path.rename(path.with_name(path.name + ".orphan"))
                continue
            known.add(number)
            day = path.stem.partition("-")[2]
            seg = _Segment(number, path.name, day, self._head, self._head, self._next_seq, 0,
                           SEGMENT_HEADER_SIZE, 0.0, None)
            db = self._db()
            db.execute("BEGIN")
            self._insert_segment(seg)
            db.execute("COMMIT")
            self._index_tail(seg)
            live.append(seg)
            highest = number
        if live:
            self._current = live[-1]

    def _index_tail(self, seg: _Segment) -> None:
        """Index the intact records after ``seg``'s watermark; cut a torn tail."""
        path = self.segments_dir / seg.name
        if not path.exists():
            return
        good_end = seg.end_offset
        pending: list[tuple[_Parsed, ArchiveMeta]] = []
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(seg.end_offset)
            offset = seg.end_offset
            while True:
                rec = read_record(f, offset, size)
                if rec is None or rec.seq != self._next_seq + len(pending) or rec.hash != rec.computed_hash():
                    break
                expected_prev = pending[-1][0].hash if pending else self._head
                if rec.prev != expected_prev:
                    break
                try:
                    meta = _meta_decoder.decode(rec.meta)
                except msgspec.DecodeError:
                    break
                pending.append((rec, meta))
                offset = good_end = rec.end
        if good_end < size:
            log.warning("archive: %s: cut %d bytes of torn tail at offset %d (never acknowledged)",
                        seg.name, size - good_end, good_end)
            with open(path, "r+b") as f:
                f.truncate(good_end)
                os.fsync(f.fileno())
        if pending:
            log.info("archive: %s: indexed %d record(s) written before a crash", seg.name, len(pending))
            self._commit(seg, pending)
        self._dirty = False

    # -- appending ------------------------------------------------------------------------

    def lookup(self, queue_id: str) -> ArchivedRecord | None:
        row = self._db().execute("SELECT seq, hash, journal_id FROM messages WHERE queue_id = ?",
                                 (queue_id,)).fetchone()
        return ArchivedRecord(queue_id, row[0], row[1], row[2], False) if row else None

    def append(self, items: list[tuple[ArchiveMeta, bytes | Callable[[], bytes]]]
               ) -> list[ArchivedRecord | BaseException]:
        """Archive a batch: one write, one fdatasync, one index transaction.

        A queue id already archived (or twice in the batch) is not written
        again.  A body given as a callable is read here; if that fails, only
        that item fails."""
        if self._dirty and self._current is not None:
            self._index_tail(self._current)
        results: list[ArchivedRecord | BaseException | None] = [None] * len(items)
        fresh: list[tuple[int, ArchiveMeta, bytes]] = []
        seen: dict[str, int] = {}
        archived = self._lookup_many([meta.queue_id for meta, _ in items])
        for i, (meta, body) in enumerate(items):
            old = archived.get(meta.queue_id)
            if old is not None:
                results[i] = old
                continue
            if meta.queue_id in seen:
                continue  # answered from the first one below
            if callable(body):
                try:
                    body = body()
                except OSError as exc:
                    results[i] = exc
                    continue
            seen[meta.queue_id] = i
            fresh.append((i, meta, body))
        if fresh:
            written = self._write(fresh)
            for (i, _, _), rec in zip(fresh, written):
                results[i] = rec
        for i, (meta, _) in enumerate(items):
            if results[i] is None:
                results[i] = results[seen[meta.queue_id]]
        return [r for r in results if r is not None]

    def _write(self, fresh: list[tuple[int, ArchiveMeta, bytes]]) -> list[ArchivedRecord]:
        now = self.clock()
        seg = self._segment_for(now)
        parts: list[bytes] = []
        pending: list[tuple[_Parsed, ArchiveMeta]] = []
        offset = seg.end_offset
        prev = self._head
        seq = self._next_seq
        for _, meta, body in fresh:
            meta_bytes = _meta_encoder.encode(meta)
            digest = record_hash(prev, seq, meta_bytes, body)
            header = _RECORD.pack(MAGIC, seq, len(meta_bytes), len(body), prev, digest)
            parts += (header, meta_bytes, body)
            end = offset + RECORD_HEADER_SIZE + len(meta_bytes) + len(body)
            pending.append((_Parsed(seq, offset, meta_bytes, body, prev, digest, end), meta))
            prev, offset, seq = digest, end, seq + 1
        try:
            _writev_all(self._fd, parts)
            os.fdatasync(self._fd)
        except OSError:
            # Nothing of this batch is acknowledged: cut what was partly written,
            # or, if even that fails, write the next batch to a new segment.
            try:
                os.ftruncate(self._fd, seg.end_offset)
            except OSError:
                os.close(self._fd)
                self._fd = -1
                self._current = None
            raise
        try:
            self._commit(seg, pending)
        except sqlite3.Error:
            # Durable in the segment but not indexed: index it before the next batch.
            self._dirty = True
            raise
        return [ArchivedRecord(m.queue_id, rec.seq, rec.hash, None, True) for rec, m in pending]

    def _commit(self, seg: _Segment, pending: list[tuple[_Parsed, ArchiveMeta]]) -> None:
        """Index records already durable in ``seg`` and move its watermark, in one transaction."""
        db = self._db()
        messages = []
        recipients = []
        subjects = []
        newest = seg.newest
        known = self._known_ids([meta.queue_id for _, meta in pending])
        for rec, meta in pending:
            newest = max(newest, meta.arrival)
            if meta.queue_id in known:
                log.warning("archive: record #%d repeats queue id %s; the index keeps the first",
                            rec.seq, meta.queue_id)
                continue
            known.add(meta.queue_id)
            subject, message_id = header_fields(rec.body)
            sender = meta.sender.lower()
            messages.append((rec.seq, meta.queue_id, meta.arrival, sender, _domain(sender), subject,
                             message_id, meta.client_ip, meta.account, meta.rule, len(rec.body),
                             seg.number, rec.offset, len(rec.meta), rec.hash))
            for address in {r.lower() for r in meta.recipients}:
                recipients.append((rec.seq, address, _domain(address)))
            if subject:
                subjects.append((rec.seq, subject))
        last = pending[-1][0]
        db.execute("BEGIN")
        try:
            db.executemany("INSERT INTO messages (seq, queue_id, arrival, sender, sender_domain,"
                           " subject, message_id, client_ip, account, rule, size, segment, offset, meta_len,"
                           " hash) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", messages)
            db.executemany("INSERT INTO recipients (seq, address, domain) VALUES (?,?,?)", recipients)
            db.executemany("INSERT INTO subjects (rowid, subject) VALUES (?,?)", subjects)
            db.execute("UPDATE segments SET head = ?, records = records + ?, end_offset = ?, newest = ?"
                       " WHERE number = ?", (last.hash, len(pending), last.end, newest, seg.number))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        seg.head, seg.records, seg.end_offset, seg.newest = last.hash, seg.records + len(pending), last.end, newest
        self._head = last.hash
        self._next_seq = last.seq + 1

    def _lookup_many(self, queue_ids: list[str]) -> dict[str, ArchivedRecord]:
        found: dict[str, ArchivedRecord] = {}
        db = self._db()
        for i in range(0, len(queue_ids), 500):
            chunk = queue_ids[i:i + 500]
            marks = ",".join("?" * len(chunk))
            for qid, seq, digest, journal_id in db.execute(
                    f"SELECT queue_id, seq, hash, journal_id FROM messages WHERE queue_id IN ({marks})", chunk):
                found[qid] = ArchivedRecord(qid, seq, digest, journal_id, False)
        return found

    def _known_ids(self, queue_ids: list[str]) -> set[str]:
        return set(self._lookup_many(queue_ids))

    def _segment_for(self, now: float) -> _Segment:
        seg = self._current
        day = _utc_day(now)
        if seg is not None and seg.day == day and seg.end_offset < self.segment_bytes:
            if self._fd >= 0:
                return seg
            try:
                self._fd = os.open(self.segments_dir / seg.name, os.O_WRONLY | os.O_APPEND)
                return seg
            except FileNotFoundError:
                log.error("archive: segment %s is missing (verify will report it); starting a new one", seg.name)
        number = max(seg.number if seg is not None else 0, self._highest_number()) + 1
        name = _segment_name(number, day)
        path = self.segments_dir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        try:
            os.write(fd, _SEGMENT_HEADER.pack(SEGMENT_MAGIC, number, self._head, now))
            os.fsync(fd)
            _fsync_dir(self.segments_dir)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        new = _Segment(number, name, day, self._head, self._head, self._next_seq, 0,
                       SEGMENT_HEADER_SIZE, 0.0, None)
        db = self._db()
        db.execute("BEGIN")
        self._insert_segment(new)
        db.execute("COMMIT")
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self._current = new
        return new

    def _highest_number(self) -> int:
        row = self._db().execute("SELECT max(number) FROM segments").fetchone()
        return int(row[0] or 0)

    def _insert_segment(self, seg: _Segment) -> None:
        self._db().execute(
            "INSERT INTO segments (number, name, day, anchor, head, first_seq, records, end_offset, newest,"
            " expired) VALUES (?,?,?,?,?,?,?,?,?,NULL)",
            (seg.number, seg.name, seg.day, seg.anchor, seg.head, seg.first_seq, seg.records,
             seg.end_offset, seg.newest))

    def mark_journaled(self, queue_id: str, journal_id: str) -> None:
        db = self._db()
        db.execute("BEGIN")
        db.execute("UPDATE messages SET journal_id = ? WHERE queue_id = ?", (journal_id, queue_id))
        db.execute("COMMIT")

    # -- retention ------------------------------------------------------------------------

    def expire(self, now: float | None = None) -> int:
        """Delete the oldest segments whose newest message is past retention; returns how many.

        Never the segment being written.  The index keeps each expired
        segment's row (anchor and head) so that the chain stays verifiable."""
        now = self.clock() if now is None else now
        cutoff = now - self.retention_days * 86400.0
        db = self._db()
        expired = 0
        for seg in self.segments():
            if seg.expired is not None:
                continue
            if seg.newest >= cutoff or (self._current is not None and seg.number == self._current.number):
                break
            first, last = seg.first_seq, seg.last_seq
            db.execute("PRAGMA synchronous=FULL")  # the commit must outlive the unlink below
            db.execute("BEGIN")
            try:
                db.execute("INSERT INTO subjects (subjects, rowid, subject) SELECT 'delete', seq, subject"
                           " FROM messages WHERE seq BETWEEN ? AND ? AND subject != ''", (first, last))
                db.execute("DELETE FROM recipients WHERE seq BETWEEN ? AND ?", (first, last))
                db.execute("DELETE FROM messages WHERE seq BETWEEN ? AND ?", (first, last))
                db.execute("UPDATE segments SET expired = ? WHERE number = ?", (now, seg.number))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            finally:
                db.execute("PRAGMA synchronous=NORMAL")
            (self.segments_dir / seg.name).unlink(missing_ok=True)
            _fsync_dir(self.segments_dir)
            log.info("archive: retention: removed segment %s (%d message(s), newest %s)",
                     seg.name, seg.records, _format_time(seg.newest))
            expired += 1
        return expired

    # -- reading --------------------------------------------------------------------------

    def search(self, query: SearchQuery) -> list[IndexRow]:
        db = self._db()
        sql, args = _build_search(query)
        rows = db.execute(sql, args).fetchall()
        recipients: dict[int, list[str]] = {}
        seqs = [r[0] for r in rows]
        for i in range(0, len(seqs), 500):
            chunk = seqs[i:i + 500]
            marks = ",".join("?" * len(chunk))
            for seq, address in db.execute(
                    f"SELECT seq, address FROM recipients WHERE seq IN ({marks})", chunk):
                recipients.setdefault(seq, []).append(address)
        return [IndexRow(*r, recipients.get(r[0], [])) for r in rows]  # type: ignore[call-arg]

    def read(self, row: IndexRow) -> tuple[ArchiveMeta, bytes, bool]:
        """(envelope, body, intact) of an indexed record; intact = its hash still matches."""
        segment = self._db().execute("SELECT name FROM segments WHERE number = ?", (row.segment,)).fetchone()
        if segment is None:
            raise ArchiveError(f"{row.queue_id}: segment {row.segment} unknown")
        with open(self.segments_dir / segment[0], "rb") as f:
            f.seek(row.offset)
            rec = read_record(f, row.offset, os.fstat(f.fileno()).st_size)
        if rec is None:
            raise ArchiveError(f"{row.queue_id}: record #{row.seq} unreadable in {segment[0]}")
        intact = rec.seq == row.seq and rec.hash == row.hash and rec.computed_hash() == rec.hash
        try:
            meta = _meta_decoder.decode(rec.meta)
        except msgspec.DecodeError:
            meta = ArchiveMeta(row.queue_id, row.arrival, 0.0, row.client_ip, "", row.sender, row.recipients)
            intact = False
        return meta, rec.body, intact

    def count(self) -> int:
        return int(self._db().execute("SELECT count(*) FROM messages").fetchone()[0])

    # -- verification -------------------------------------------------------------------

    def verify(self) -> VerifyReport:
        """Walk the chain from the first kept record; stop at the first record altered or removed."""
        db = self._db()
        db.execute("BEGIN")  # one snapshot of the index, even while the relay appends
        try:
            return self._verify()
        finally:
            db.execute("COMMIT")

    def _verify(self) -> VerifyReport:
        report = VerifyReport(ok=True)

        def fail(problem: str, seq: int | None = None) -> VerifyReport:
            report.ok = False
            report.problem = problem
            report.problem_seq = seq
            report.problem_queue_id = self._queue_id_of(seq) if seq is not None else None
            return report

        prev_head: bytes | None = None   # unknown before the first segment row
        kept_started = False
        for seg in self.segments():
            if prev_head is None:
                if seg.anchor != GENESIS:
                    report.notes.append(f"the index starts at {seg.name} (record #{seg.first_seq}): it was "
                                        "rebuilt from the segments; the chain is verified from there")
            elif seg.anchor != prev_head:
                return fail(f"segment {seg.name}: its anchor does not continue the chain of the segment "
                            "before it (index altered)", seg.first_seq)
            prev_head = seg.head
            if seg.expired is not None:
                if kept_started:
                    return fail(f"segment {seg.name} is marked expired after kept segments (index altered)")
                report.expired_segments += 1
                continue
            kept_started = True
            problem = self._verify_segment(seg, report)
            if problem is not None:
                return fail(*problem)
        report.head = prev_head if prev_head is not None else GENESIS
        return report

    def _verify_segment(self, seg: _Segment, report: VerifyReport) -> tuple[str, int] | None:
        """Check one kept segment against its index rows; (problem, seq) of the first failure."""
        path = self.segments_dir / seg.name
        if not path.exists():
            if seg.records:
                return (f"segment {seg.name} is missing: records #{seg.first_seq}..#{seg.last_seq} removed",
                        seg.first_seq)
            return None
        rows = self._db().execute("SELECT seq, hash, offset FROM messages WHERE seq BETWEEN ? AND ? ORDER BY seq",
                                  (seg.first_seq, seg.last_seq))
        row = rows.fetchone()
        report.segments += 1
        with open(path, "rb") as f:
            header = read_segment_header(f)
            if header is None or header[0] != seg.number or header[1] != seg.anchor:
                return f"segment {seg.name}: header altered (anchor or number differs from the index)", seg.first_seq
            head = seg.anchor
            offset = SEGMENT_HEADER_SIZE
            for seq in range(seg.first_seq, seg.last_seq + 1):
                where = f"in {seg.name} at offset {offset}"
                if offset >= seg.end_offset:
                    return f"record #{seq} removed: {seg.name} ends at offset {offset}", seq
                f.seek(offset)
                rec = read_record(f, offset, seg.end_offset)
                if rec is None:
                    return f"record #{seq} {where}: unreadable (altered or truncated)", seq
                if rec.seq > seq:
                    missing = f"#{seq}" if rec.seq == seq + 1 else f"#{seq}..#{rec.seq - 1}"
                    return f"record {missing} removed from {seg.name} (offset {offset} holds #{rec.seq})", seq
                if rec.seq != seq:
                    return f"record #{seq} {where}: sequence number altered (reads #{rec.seq})", seq
                if rec.prev != head:
                    return f"record #{seq} {where}: chain broken (the record before it was altered or removed)", seq
                if rec.computed_hash() != rec.hash:
                    return f"record #{seq} {where}: content altered (hash mismatch)", seq
                while row is not None and row[0] < seq:
                    row = rows.fetchone()
                if row is None or row[0] != seq or row[1] != rec.hash or row[2] != offset:
                    return f"record #{seq} {where}: altered (differs from the index)", seq
                head = rec.hash
                offset = rec.end
                report.records += 1
        if head != seg.head or offset != seg.end_offset:
            problem = (f"segment {seg.name}: ends differently from the index (records altered or removed "
                       f"after #{seg.last_seq})")
            return problem, seg.last_seq + 1
        size = path.stat().st_size
        if size > seg.end_offset:
            report.notes.append(f"{seg.name}: {size - seg.end_offset} byte(s) after the indexed records "
                                "(being written, or indexed at the next start)")
        return None

    def _queue_id_of(self, seq: int) -> str | None:
        row = self._db().execute("SELECT queue_id FROM messages WHERE seq = ?", (seq,)).fetchone()
        return str(row[0]) if row else None


def _number_of(path: Path) -> int | None:
    try:
        return int(path.stem.partition("-")[0])
    except ValueError:
        return None


def _writev_all(fd: int, parts: list[bytes]) -> None:
    views = [memoryview(p) for p in parts if len(p)]
    i = 0
    while i < len(views):
        n = os.writev(fd, views[i:i + 1024])  # IOV_MAX is 1024 on Linux
        while i < len(views) and n >= len(views[i]):
            n -= len(views[i])
            i += 1
        if n:
            views[i] = views[i][n:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _format_time(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


# --- export: eml files and mboxrd ----------------------------------------------------------

_FROM_LINE = re.compile(rb"^>*From ")


def mbox_from_line(sender: str, arrival: float) -> bytes:
    who = sender if sender and " " not in sender else "MAILER-DAEMON"
    return f"From {who} {time.asctime(time.gmtime(arrival))}\n".encode("utf-8", "replace")


def mbox_entry(sender: str, arrival: float, body: bytes) -> bytes:
    """One mboxrd entry: From_ line, the message with LF line ends and every
    ``>*From `` line quoted with one more ``>``, then an empty line."""
    lines = body.split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = [mbox_from_line(sender, arrival)]
    for line in lines:
        out.append(b">" + line + b"\n" if _FROM_LINE.match(line) else line + b"\n")
    out.append(b"\n")
    return b"".join(out)


def read_mbox(data: bytes) -> Iterator[bytes]:
    """The messages of an mboxrd file as CRLF text: the inverse of ``mbox_entry``."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    current: list[bytes] | None = None
    for line in lines:
        if line.startswith(b"From "):
            if current is not None:
                yield _mbox_message(current)
            current = []
            continue
        if current is None:
            continue
        current.append(line[1:] if line.startswith(b">") and _FROM_LINE.match(line[1:]) else line)
    if current is not None:
        yield _mbox_message(current)


def _mbox_message(lines: list[bytes]) -> bytes:
    if lines and lines[-1] == b"":
        lines = lines[:-1]  # the separator
    return b"".join(line + b"\r\n" for line in lines)


# --- journal reports -------------------------------------------------------------------------


def is_journal_copy(envelope: Envelope) -> bool:
    return envelope.rule == JOURNAL_RULE and not envelope.client_ip


def build_journal_copy(envelope: Envelope, body: bytes, *, queue_id: str, hostname: str,
                       journal_address: str, now: float) -> tuple[Envelope, bytes]:
    """A journal report for ``envelope``/``body``: (its envelope, its content).

    Like an Exchange envelope journal report: a multipart/mixed message from
    postmaster@hostname whose first part lists the envelope (the only place
    Bcc recipients appear) and whose second part is the original, byte for
    byte, as message/rfc822 (RFC 2046 §5.2.1: 7bit or 8bit, never encoded).
    Sent from the null sender so that it is never bounced back."""
    subject, message_id = header_fields(body)
    summary = [
        f"Sender: {envelope.sender or '<>'}",
        *(f"To: {r}" for r in envelope.recipients),
        f"Queue-Id: {envelope.queue_id}",
        f"Arrival: {email.utils.formatdate(envelope.arrival, usegmt=True)}",
        f"Client: {envelope.client_helo or '-'} [{envelope.client_ip or 'local'}]",
        f"Auth-User: {envelope.auth_user or '-'}",
        f"Account: {envelope.account or '-'}",
        f"Rule: {envelope.rule or '-'}",
        f"TLS: {envelope.tls or '-'}",
        f"Message-Id: {message_id or '-'}",
        f"Subject: {subject}",
    ]
    if envelope.original_sender is not None:
        summary.insert(1, f"Original-Sender: {envelope.original_sender or '<>'}")
    text = ("\r\n".join(summary) + "\r\n").encode("utf-8")
    boundary = "=_fastrelay_journal_" + secrets.token_hex(12)
    while boundary.encode() in body:
        boundary = "=_fastrelay_journal_" + secrets.token_hex(12)
    headers = [
        f"From: fastrelay journal <postmaster@{hostname}>",
        f"To: <{journal_address}>",
        f"Subject: Journal report {envelope.queue_id}",
        f"Date: {email.utils.formatdate(now, usegmt=True)}",
        f"Message-ID: <{queue_id}.journal@{hostname}>",
        "MIME-Version: 1.0",
        f"X-Fastrelay-Journal-Report: {envelope.queue_id}",
        f'Content-Type: multipart/mixed; boundary="{boundary}"',
    ]
    text_cte = "7bit" if text.isascii() else "8bit"
    original_cte = "7bit" if body.isascii() else "8bit"
    content = b"".join([
        ("\r\n".join(headers) + "\r\n\r\n").encode(),
        b"This is a journal report.\r\n\r\n",
        f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Transfer-Encoding: {text_cte}\r\n\r\n".encode(),
        text,
        f"\r\n--{boundary}\r\nContent-Type: message/rfc822\r\n"
        f"Content-Transfer-Encoding: {original_cte}\r\n\r\n".encode(),
        body if body.endswith(b"\r\n") else body + b"\r\n",
        f"\r\n--{boundary}--\r\n".encode(),
    ])
    journal_envelope = Envelope(
        queue_id=queue_id, arrival=now, client_ip="", client_helo=hostname, sender="",
        recipients=[journal_address], account=envelope.account, rule=JOURNAL_RULE,
        smtputf8=not (journal_address.isascii() and text.isascii()) and envelope.smtputf8,
        body_8bit=not content.isascii(),
    )
    return journal_envelope, content


# --- the relay side: off the SMTP path, before delivery --------------------------------------


@dataclass(slots=True)
class _Request:
    meta: ArchiveMeta
    body: bytes | Callable[[], bytes]
    size: int
    future: asyncio.Future[ArchivedRecord]
    since: float      # monotonic time of the request


class Archiver:
    """An ArchiveStore driven from the event loop: requests are batched and written
    by one worker thread (file and SQLite I/O never run on the loop).  While a
    batch is written the next one gathers, so one fdatasync and one index
    transaction cover many messages under load."""

    def __init__(self, store: ArchiveStore, accounts: Iterable[str] = ()) -> None:
        self.store = store
        self.accounts = frozenset(accounts)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[_Request] = []
        self._batch: list[_Request] = []     # being written
        self._inflight: dict[str, asyncio.Future[ArchivedRecord]] = {}
        self._idle: asyncio.Event | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._closed = False
        self._executor: Any = None
        # Plain counters, read by metrics.py at scrape time.
        self.counters = {"archived": 0, "already_archived": 0, "failures": 0, "journal_reports": 0,
                         "expired_segments": 0}

    def wants(self, envelope: Envelope) -> bool:
        """Is this message archived at all (account filter; journal reports are not)?"""
        if is_journal_copy(envelope):
            return False
        return not self.accounts or envelope.account in self.accounts

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Open the store (indexing what a crash left unindexed) and start the worker."""
        from concurrent.futures import ThreadPoolExecutor

        self.loop = loop
        self._idle = asyncio.Event()
        self._idle.set()
        self.store.open()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="archive")
        log.info("archive: %s open, %d message(s) indexed", self.store.directory, self.store.count())
        self._expiry = loop.call_later(EXPIRY_INTERVAL, self._expire)

    @property
    def pending(self) -> int:
        """Requests not yet archived (queued or being written)."""
        return len(self._inflight)

    def lag(self) -> float:
        """Seconds the oldest request not yet archived has waited (0 when none)."""
        oldest = min((r.since for r in (*self._batch, *self._pending[:1])), default=None)
        return max(0.0, time.monotonic() - oldest) if oldest is not None else 0.0

    def archive(self, envelope: Envelope, body: bytes | Callable[[], bytes],
                size: int | None = None) -> asyncio.Future[ArchivedRecord]:
        """Archive once (idempotent by queue id); resolves when durable and indexed.

        ``body`` may be a function that reads it (called on the worker
        thread); ``size`` is then its length, to bound a batch's memory."""
        assert self.loop is not None, "Archiver.start() not called"
        qid = envelope.queue_id
        fut = self._inflight.get(qid)
        if fut is not None:
            return fut
        fut = self.loop.create_future()
        if self._closed:
            fut.set_exception(ArchiveError("the archive is closed"))
            return fut
        self._inflight[qid] = fut
        if size is None:
            size = len(body) if isinstance(body, bytes) else 0
        self._pending.append(_Request(meta_from_envelope(envelope, time.time()), body, size, fut,
                                      time.monotonic()))
        if not self._batch:
            self._next_batch()
        return fut

    def _next_batch(self) -> None:
        assert self.loop is not None and self._idle is not None
        if not self._pending:
            self._batch = []
            self._idle.set()
            return
        n = size = 0
        for req in self._pending:
            if n >= BATCH_MESSAGES or (n and size + req.size > BATCH_BYTES):
                break
            n += 1
            size += req.size
        batch, self._batch = self._pending[:n], self._pending[:n]
        del self._pending[:n]
        self._idle.clear()
        work = self.loop.run_in_executor(self._executor, self.store.append, [(r.meta, r.body) for r in batch])
        work.add_done_callback(lambda done: self._batch_done(batch, done))

    def _batch_done(self, batch: list[_Request], done: asyncio.Future[list[ArchivedRecord | BaseException]]
                    ) -> None:
        try:
            results: list[ArchivedRecord | BaseException] = done.result()
        except Exception as exc:  # noqa: BLE001 -- the whole batch failed (disk full, index error)
            log.error("archive: writing %d message(s) failed: %s", len(batch), exc)
            results = [exc] * len(batch)
        for req, result in zip(batch, results):
            self._inflight.pop(req.meta.queue_id, None)
            if req.future.done():
                continue
            if isinstance(result, BaseException):
                self.counters["failures"] += 1
                req.future.set_exception(ArchiveError(f"{req.meta.queue_id}: not archived: {result}"))
            else:
                self.counters["archived" if result.new else "already_archived"] += 1
                if result.new:
                    log.info("%s: archived (record #%d)", req.meta.queue_id, result.seq)
                req.future.set_result(result)
        self._next_batch()

    async def mark_journaled(self, queue_id: str, journal_id: str) -> None:
        assert self.loop is not None
        await self.loop.run_in_executor(self._executor, self.store.mark_journaled, queue_id, journal_id)

    def _expire(self) -> None:
        assert self.loop is not None
        self._expiry = self.loop.call_later(EXPIRY_INTERVAL, self._expire)
        work = self.loop.run_in_executor(self._executor, self.store.expire)

        def done(f: asyncio.Future[int]) -> None:
            if f.cancelled():
                return
            exc = f.exception()
            if exc is not None:
                log.error("archive: retention expiry failed: %s", exc)
            else:
                self.counters["expired_segments"] += f.result()
        work.add_done_callback(done)

    async def close(self, timeout: float = 30.0) -> None:
        """Finish what is queued (up to ``timeout``), then close the store."""
        self._closed = True
        if self._expiry is not None:
            self._expiry.cancel()
        if self._idle is not None:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except TimeoutError:
                log.warning("archive: %d message(s) not archived at shutdown; archived at the next start",
                            self.pending)
        if self._executor is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self.store.close)
            self._executor.shutdown(wait=True)
            self._executor = None
        else:
            self.store.close()


PreDeliveryHook = Callable[[Envelope, Location], Awaitable[Any]]


class ArchiveStage:
    """Archive (and journal) each message before its first delivery attempt.

    * ``hook(inner)`` returns the queue manager's ``pre_delivery`` hook: it
      archives the message (raising if that fails: the queue manager then
      keeps the message and asks again later, so nothing is delivered
      unarchived), queues its journal report, then runs ``inner`` (content
      scanning) or answers DELIVER.
    * ``on_queued(then)`` wraps the server's hand-off so that archiving starts
      at once, whether or not delivery is enabled.
    Both run the same task per queue id."""

    def __init__(self, archiver: Archiver, spool: Spool, queue_ids: QueueIdGenerator, config: Config) -> None:
        self.archiver = archiver
        self.spool = spool
        self.queue_ids = queue_ids
        self.hostname = config.server.hostname
        self.journal_address = config.archive.journal_address
        self.requeue: Callable[[Envelope, Location], None] | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}

    @classmethod
    def from_config(cls, config: Config, spool: Spool, queue_ids: QueueIdGenerator) -> ArchiveStage:
        a = config.archive
        store = ArchiveStore(config.path(a.dir), a.retention_days)
        return cls(Archiver(store, a.accounts), spool, queue_ids, config)

    def start(self, loop: asyncio.AbstractEventLoop, requeue: Callable[[Envelope, Location], None] | None,
              recovered: Iterable[Any] = ()) -> None:
        """Open the archive; archive (in the background) what the spool recovered."""
        self.requeue = requeue
        self.archiver.start(loop)
        for m in recovered:
            self.ensure(m.envelope, Location(m.segment, m.body_offset, m.body_len))

    def ensure(self, envelope: Envelope, location: Location) -> asyncio.Task[None]:
        """The archiving task of this message (started if it is not running)."""
        qid = envelope.queue_id
        task = self._tasks.get(qid)
        if task is None:
            task = asyncio.ensure_future(self._process(envelope, location))
            self._tasks[qid] = task
            task.add_done_callback(lambda t: self._task_done(qid, t))
        return task

    def _task_done(self, qid: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(qid) is task:
            del self._tasks[qid]
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: archiving failed: %s (tried again before delivery)", qid, task.exception())

    async def _process(self, envelope: Envelope, location: Location) -> None:
        if not self.archiver.wants(envelope):
            return
        record = await self.archiver.archive(envelope, lambda: self.spool.read_body(location), location.body_len)
        if self.journal_address and record.journal_id is None:
            await self._journal(envelope, location)

    async def _journal(self, envelope: Envelope, location: Location) -> None:
        loop = asyncio.get_running_loop()
        body = await loop.run_in_executor(None, self.spool.read_body, location)
        journal_id = self.queue_ids.next()
        jenv, content = build_journal_copy(envelope, body, queue_id=journal_id, hostname=self.hostname,
                                           journal_address=self.journal_address, now=time.time())
        jloc = await self.spool.append_message(jenv, (content,))
        await self.archiver.mark_journaled(envelope.queue_id, journal_id)
        self.archiver.counters["journal_reports"] += 1
        log.info("%s: journal report %s queued to <%s>", envelope.queue_id, journal_id, self.journal_address)
        log.info("%s: from=<>, size=%d, nrcpt=1 (queue active)", journal_id, len(content))
        if jloc is not None and self.requeue is not None:
            self.requeue(jenv, jloc)

    def hook(self, inner: PreDeliveryHook | None = None) -> PreDeliveryHook:
        from .delivery import DELIVER

        async def pre_delivery(envelope: Envelope, location: Location) -> Any:
            await asyncio.shield(self.ensure(envelope, location))
            if inner is not None:
                return await inner(envelope, location)
            return DELIVER

        return pre_delivery

    def on_queued(self, then: Callable[[Envelope, Location], None] | None
                  ) -> Callable[[Envelope, Location], None]:
        def queued(envelope: Envelope, location: Location) -> None:
            self.ensure(envelope, location)
            if then is not None:
                then(envelope, location)
        return queued

    async def close(self, timeout: float) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=timeout)
        await self.archiver.close(timeout)


# --- command line: fastrelay archive search | export | verify -------------------------------


def parse_time(value: str, now: float | None = None) -> float:
    """'2024-05-01', '2024-05-01T10:00', '2024-05-01 10:00+02:00' (no zone: local time),
    '@1714550400' (epoch seconds), or a duration ago: '7d', '12h'."""
    value = value.strip()
    if value.startswith("@"):
        return float(value[1:])
    try:
        return (time.time() if now is None else now) - parse_duration(value)
    except ValueError:
        pass
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a time (2024-05-01, 2024-05-01T10:00, @EPOCH, or 7d ago)") from None
    return parsed.timestamp()


def _query_from(args: argparse.Namespace) -> SearchQuery:
    return SearchQuery(
        sender=args.sender, recipient=args.recipient,
        since=parse_time(args.since) if args.since else None,
        until=parse_time(args.until) if args.until else None,
        subject=args.subject, queue_id=args.queue_id, limit=getattr(args, "limit", 0) or 0,
    )


def _open_readonly(args: argparse.Namespace) -> ArchiveStore:
    config = load_config(args.config)
    store = ArchiveStore(config.path(config.archive.dir), config.archive.retention_days, readonly=True)
    store.open()
    return store


def _cmd_search(args: argparse.Namespace) -> int:
    store = _open_readonly(args)
    try:
        rows = store.search(_query_from(args))
    finally:
        store.close()
    for r in rows:
        if args.json:
            print(json.dumps({"queue_id": r.queue_id, "arrival": r.arrival, "sender": r.sender,
                              "recipients": r.recipients, "subject": r.subject, "message_id": r.message_id,
                              "client_ip": r.client_ip, "account": r.account, "rule": r.rule, "size": r.size,
                              "record": r.seq}, ensure_ascii=False))
        else:
            print(f"{_format_time(r.arrival)}  {r.queue_id:<14} <{r.sender}> -> "
                  f"{', '.join(r.recipients)}  [{r.size}]  {r.subject}")
    if not args.json:
        print(f"-- {len(rows)} message(s)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    store = _open_readonly(args)
    altered = 0
    try:
        rows = store.search(_query_from(args))
        out = Path(args.output)
        if args.format == "eml":
            out.mkdir(parents=True, exist_ok=True)
            with open(out / "manifest.jsonl", "a", encoding="utf-8") as manifest:
                for r in rows:
                    meta, body, intact = store.read(r)
                    altered += not intact
                    (out / f"{r.queue_id}.eml").write_bytes(body)
                    manifest.write(json.dumps({
                        "file": f"{r.queue_id}.eml", "sha256": hashlib.sha256(body).hexdigest(),
                        "record": r.seq, "record_hash": r.hash.hex(), "intact": intact,
                        **msgspec.to_builtins(meta)}, ensure_ascii=False) + "\n")
        else:
            with open(out, "ab") as f:
                for r in rows:
                    meta, body, intact = store.read(r)
                    altered += not intact
                    f.write(mbox_entry(meta.sender, meta.arrival, body))
    finally:
        store.close()
    print(f"exported {len(rows)} message(s) to {args.output} ({args.format})")
    if altered:
        print(f"fastrelay: warning: {altered} exported record(s) fail their hash check "
              "(run `fastrelay archive verify`)", file=sys.stderr)
        return 1
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    store = _open_readonly(args)
    try:
        report = store.verify()
    finally:
        store.close()
    for note in report.notes:
        print(f"note: {note}")
    if not report.ok:
        print(f"archive verify: FAILED at record #{report.problem_seq}"
              f"{f' (queue id {report.problem_queue_id})' if report.problem_queue_id else ''}: {report.problem}")
        return 1
    print(f"archive verify: ok: {report.records} record(s) in {report.segments} segment(s) "
          f"({report.expired_segments} expired segment(s) before them); chain head {report.head.hex()}")
    return 0


def _add_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("--from", dest="sender", help="envelope sender address, or @domain")
    p.add_argument("--to", dest="recipient", help="envelope recipient address, or @domain")
    p.add_argument("--since", help="2024-05-01, 2024-05-01T10:00 (local time unless a zone is given), @EPOCH, 7d")
    p.add_argument("--until", help="same forms as --since (exclusive)")
    p.add_argument("--subject", help="text in the Subject (any case)")
    p.add_argument("--queue-id")


def add_commands(sub: Any) -> None:
    """Register ``fastrelay archive ...`` on the CLI's subparsers."""
    p = sub.add_parser("archive", help="search, export and verify the mail archive")
    asub = p.add_subparsers(dest="archive_command", required=True)
    q = asub.add_parser("search", help="list archived messages matching every given filter")
    _add_filters(q)
    q.add_argument("--limit", type=int, default=0, help="at most this many (oldest first)")
    q.add_argument("--json", action="store_true", help="one JSON object per line")
    q.set_defaults(func=_run(_cmd_search))
    q = asub.add_parser("export", help="export matching messages (legal hold)")
    _add_filters(q)
    q.add_argument("--format", choices=("eml", "mbox"), required=True)
    q.add_argument("--output", required=True, help="a directory (eml) or a file (mbox)")
    q.set_defaults(func=_run(_cmd_export))
    q = asub.add_parser("verify", help="check the hash chain; report the first record altered or removed")
    q.add_argument("--config", required=True)
    q.set_defaults(func=_run(_cmd_verify))


def _run(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except ConfigError as exc:
            print(f"fastrelay: {exc}", file=sys.stderr)
            return 2
        except (ArchiveError, ValueError, sqlite3.Error, OSError) as exc:
            print(f"fastrelay: archive: {exc}", file=sys.stderr)
            return 1
    return run
