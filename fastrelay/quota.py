"""Sending limits on top of the compiled windows of ``_core``.

Limits (defaults; [limits.<status>] per account status):

* per transaction: ``recipients_per_transaction`` (100); the next RCPT gets
  452 4.5.3 and the recipients already accepted are kept;
* per registered user, keyed on the envelope sender (never on From: or
  Reply-To:): ``user_messages_per_day`` and ``user_unique_recipients_per_day``
  over a rolling 24 h → 550 5.4.5; senders that are not registered users are
  not subject to them;
* per account, every recipient counted: ``org_recipients_per_day`` → 550
  5.7.1 and ``org_recipients_per_10min`` → 450 4.2.1.

``[limits] daily_limits_temporary = true`` answers the daily limits with 450
and the same enhanced code in class 4 (4.4.5, 4.7.1), so the client's MTA
keeps the mail instead of bouncing it.

When limits are checked and counted
-----------------------------------
Each RCPT is checked against the counts *plus* what the transaction already
holds, so a message with N recipients crossing a limit part way has its first
recipients accepted and the rest refused at RCPT time; the client then sends
the message to the accepted ones.  At the end of DATA the whole message is
checked again and counted in one step (``reserve``): if concurrent
transactions used the room meanwhile, the message is refused whole.  A
refused message consumes nothing, and if the spool then fails to store the
message, ``release`` gives the quota back.

Windows are rings of buckets (5 minutes over 24 h, 1 second over 10
minutes): a count leaves the window between 24 h and 24 h + one bucket after
it was made, never early.

State that survives (local backend)
-----------------------------------
Counted events are appended to a journal under ``[quota] state_dir`` and
made durable every ``flush_interval`` (1 s): a crash loses at most that much
counting.  Every ``snapshot_interval`` a forked child writes a consistent
snapshot of all windows (copy-on-write, so the event loop does not stop to
serialise 100,000 users) and the journals it covers are dropped.  Times are
a logical clock: wall-clock at start (never earlier than the last persisted
time), advanced by the monotonic clock, so a wall-clock jump neither frees
nor doubles quota.

Config keys read: [limits.active|trial|unpaid] *, [limits]
daily_limits_temporary, [quota] backend, state_dir, flush_interval,
snapshot_interval, redis_url, redis_key_prefix, redis_timeout,
on_backend_error.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import msgspec

from . import events, replies
from ._core import RateWindow, UniqueWindow
from .config import Config, LimitSet
from .policy import Account, RelayDecision, User

log = logging.getLogger("fastrelay.quota")

DAY = 86_400.0
PEAK = 600.0
# A ring of N buckets drops a bucket as soon as the window's start passes the
# bucket's end, i.e. up to one bucket early; one extra bucket makes every
# count stay at least the full span (and at most span + one bucket).
DAY_BUCKETS = 288 + 1      # 5-minute buckets
PEAK_BUCKETS = 600 + 1     # 1-second buckets
DAY_RING_SPAN = DAY / 288 * DAY_BUCKETS
PEAK_RING_SPAN = PEAK / 600 * PEAK_BUCKETS


def limit_replies(temporary_daily: bool) -> dict[str, bytes]:
    if temporary_daily:
        user_day = replies.reply(450, "4.4.5", "Daily SMTP relay limit exceeded for user. This is a temporary error.")
        org_day = replies.reply(450, "4.7.1", "Daily SMTP relay limit exceeded for customer. This is a temporary error.")
    else:
        user_day = replies.reply(550, "5.4.5", "Daily SMTP relay limit exceeded for user.")
        org_day = replies.reply(550, "5.7.1", "Daily SMTP relay limit exceeded for customer.")
    return {
        "recipients_per_transaction": replies.TOO_MANY_RCPTS,
        "user_messages_per_day": user_day,
        "user_unique_recipients_per_day": user_day,
        "org_recipients_per_day": org_day,
        "org_recipients_per_10min": replies.reply(
            450, "4.2.1", "Peak SMTP relay limit exceeded for customer. This is a temporary error."),
    }


@dataclass(slots=True)
class QuotaTxn:
    """What one SMTP transaction holds against the limits before it is counted."""

    decision: RelayDecision
    limits: LimitSet
    recipients: list[str] = field(default_factory=list)
    new_unique: set[str] = field(default_factory=set)   # recipients the user's window has not seen
    reserved: list[str] = field(default_factory=list)   # backend bookkeeping for release()


class UserWindows:
    __slots__ = ("messages", "unique")

    def __init__(self) -> None:
        self.messages = RateWindow(DAY_RING_SPAN, DAY_BUCKETS)
        self.unique = UniqueWindow(DAY)


class OrgWindows:
    __slots__ = ("day", "peak")

    def __init__(self) -> None:
        self.day = RateWindow(DAY_RING_SPAN, DAY_BUCKETS)
        self.peak = RateWindow(PEAK_RING_SPAN, PEAK_BUCKETS)


class LogicalClock:
    """Wall-clock time at start, moved forward by the monotonic clock only."""

    def __init__(self, floor: float = 0.0) -> None:
        self._offset = max(time.time(), floor) - time.monotonic()

    def __call__(self) -> float:
        return self._offset + time.monotonic()


def rcpt_key(address: str) -> str:
    # Unique recipients compare case-insensitively in the domain; the local
    # part is kept as sent (RFC 5321 §2.4 lets the receiver decide).
    local, _, domain = address.rpartition("@")
    return f"{local}@{domain.lower()}"


class QuotaBook:
    """The local backend: compiled windows in this process, journal on disk.

    Every call is synchronous and O(1) in history and user count; the Redis
    backend (``RedisQuotaBook``) has the same interface but returns awaitables.
    """

    def __init__(self, config: Config, clock: LogicalClock | None = None) -> None:
        self.clock = clock or LogicalClock()
        self.users: dict[str, UserWindows] = {}
        self.orgs: dict[str, OrgWindows] = {}
        self.journal: QuotaJournal | None = None
        self.refused: dict[str, int] = {}   # refusals per limit, read by metrics.py
        self.apply(config)

    def apply(self, config: Config) -> None:
        self.limits = config.limits
        self.replies = limit_replies(config.limits.daily_limits_temporary)

    def limits_for(self, account: Account | None) -> LimitSet:
        status = account.status if account is not None else "active"
        return getattr(self.limits, status)  # type: ignore[no-any-return]

    # -- the hot path -----------------------------------------------------------

    def begin(self, decision: RelayDecision, recipients: list[str]) -> QuotaTxn:
        """A transaction's quota view; ``recipients`` is the session's own list,
        which the session appends to when ``check_recipient`` lets one in."""
        return QuotaTxn(decision, self.limits_for(decision.account), recipients)

    def check_recipient(self, txn: QuotaTxn, rcpt: str) -> bytes | None:
        """None if ``rcpt`` may join the transaction, else the reply."""
        limits = txn.limits
        n = len(txn.recipients)
        if n >= limits.recipients_per_transaction:
            return self._refuse(txn, "recipients_per_transaction", n, limits.recipients_per_transaction)
        now = self.clock()
        account = txn.decision.account
        if account is not None:
            org = self.orgs.get(account.name)
            if org is not None:
                if org.peak.would_exceed(n + 1, limits.org_recipients_per_10min, now):
                    return self._refuse(txn, "org_recipients_per_10min", org.peak.total(now) + n, limits.org_recipients_per_10min)
                if org.day.would_exceed(n + 1, limits.org_recipients_per_day, now):
                    return self._refuse(txn, "org_recipients_per_day", org.day.total(now) + n, limits.org_recipients_per_day)
            elif n + 1 > limits.org_recipients_per_10min or n + 1 > limits.org_recipients_per_day:
                which = "org_recipients_per_10min" if n + 1 > limits.org_recipients_per_10min else "org_recipients_per_day"
                return self._refuse(txn, which, n, getattr(limits, which))
        user = txn.decision.user
        key = rcpt_key(rcpt)
        if user is not None:
            windows = self.users.get(user.address)
            sent = windows.messages.total(now) if windows is not None else 0
            if sent + 1 > limits.user_messages_per_day:
                return self._refuse(txn, "user_messages_per_day", sent, limits.user_messages_per_day)
            if key not in txn.new_unique and (windows is None or not windows.unique.seen(key, now)):
                unique = windows.unique.count(now) if windows is not None else 0
                if unique + len(txn.new_unique) + 1 > limits.user_unique_recipients_per_day:
                    return self._refuse(txn, "user_unique_recipients_per_day",
                                        unique + len(txn.new_unique), limits.user_unique_recipients_per_day)
                txn.new_unique.add(key)
        return None

    def reserve(self, txn: QuotaTxn) -> bytes | None:
        """End of DATA: check the whole message again and count it, in one step."""
        now = self.clock()
        limits = txn.limits
        n = len(txn.recipients)
        decision = txn.decision
        account, user = decision.account, decision.user
        org = self._org(account) if account is not None else None
        if org is not None:
            if org.peak.would_exceed(n, limits.org_recipients_per_10min, now):
                return self._refuse(txn, "org_recipients_per_10min", org.peak.total(now), limits.org_recipients_per_10min)
            if org.day.would_exceed(n, limits.org_recipients_per_day, now):
                return self._refuse(txn, "org_recipients_per_day", org.day.total(now), limits.org_recipients_per_day)
        windows = self._user(user) if user is not None else None
        keys: list[str] = []   # every recipient's, as the user's window counts them
        if windows is not None:
            if windows.messages.would_exceed(1, limits.user_messages_per_day, now):
                return self._refuse(txn, "user_messages_per_day", windows.messages.total(now), limits.user_messages_per_day)
            keys = [rcpt_key(r) for r in txn.recipients]
            unseen = sum(1 for k in set(keys) if not windows.unique.seen(k, now))
            if windows.unique.count(now) + unseen > limits.user_unique_recipients_per_day:
                return self._refuse(txn, "user_unique_recipients_per_day", windows.unique.count(now), limits.user_unique_recipients_per_day)
        self._count(now, account.name if account else None, user.address if user else None, n, keys)
        if self.journal is not None:
            self.journal.record(now, account.name if account else "", user.address if user else "", n, keys)
        return None

    def release(self, txn: QuotaTxn) -> None:
        """Give back what ``reserve`` counted (the spool could not store the message)."""
        now = self.clock()
        decision = txn.decision
        n = len(txn.recipients)
        if decision.account is not None:
            org = self._org(decision.account)
            org.day.subtract(n, now)
            org.peak.subtract(n, now)
        if decision.user is not None:
            self._user(decision.user).messages.subtract(1, now)
        if self.journal is not None:
            self.journal.record(now, decision.account.name if decision.account else "",
                                decision.user.address if decision.user else "", -n, [])
        # Unique recipients stay counted: the client will retry the same
        # message to the same people, so this overstates nothing that lasts.

    def _refuse(self, txn: QuotaTxn, limit: str, current: int, maximum: int) -> bytes:
        record_refusal(self.refused, txn, limit, current, maximum)
        return self.replies[limit]

    # -- state ------------------------------------------------------------------

    def _org(self, account: Account) -> OrgWindows:
        org = self.orgs.get(account.name)
        if org is None:
            org = self.orgs[account.name] = OrgWindows()
        return org

    def _user(self, user: User) -> UserWindows:
        windows = self.users.get(user.address)
        if windows is None:
            windows = self.users[user.address] = UserWindows()
        return windows

    def _count(self, now: float, account: str | None, user: str | None, n: int, keys: list[str]) -> None:
        if account:
            org = self.orgs.get(account)
            if org is None:
                org = self.orgs[account] = OrgWindows()
            if n >= 0:
                org.day.add(n, now)
                org.peak.add(n, now)
            else:
                org.day.subtract(-n, now)
                org.peak.subtract(-n, now)
        if user:
            windows = self.users.get(user)
            if windows is None:
                windows = self.users[user] = UserWindows()
            if n > 0:
                windows.messages.add(1, now)
            elif n < 0:
                windows.messages.subtract(1, now)
            for k in keys:
                windows.unique.add(k, now)

    def prune(self) -> int:
        """Drop the windows of users and accounts idle for a day: an idle user costs nothing."""
        now = self.clock()
        idle = [u for u, w in self.users.items() if w.messages.is_empty(now) and w.unique.is_empty(now)]
        for u in idle:
            del self.users[u]
        for name in [a for a, o in self.orgs.items() if o.day.is_empty(now) and o.peak.is_empty(now)]:
            del self.orgs[name]
        return len(idle)

    def usage(self, user: str) -> tuple[int, int]:
        """(messages, unique recipients) of a user in the last 24 h."""
        now = self.clock()
        w = self.users.get(user)
        return (w.messages.total(now), w.unique.count(now)) if w is not None else (0, 0)

    def snapshot_state(self) -> QuotaSnapshot:
        return QuotaSnapshot(
            clock=self.clock(),
            orgs={a: (o.day.to_state(), o.peak.to_state()) for a, o in self.orgs.items()},
            users={u: (w.messages.to_state(), w.unique.to_state()) for u, w in self.users.items()},
        )

    def load_snapshot(self, snap: QuotaSnapshot) -> None:
        self.orgs = {a: _org_from(day, peak) for a, (day, peak) in snap.orgs.items()}
        self.users = {u: _user_from(m, q) for u, (m, q) in snap.users.items()}

    def replay(self, event: QuotaEvent) -> None:
        self._count(event.t, event.account or None, event.user or None, event.n, event.keys)


_WINDOW_OF_LIMIT = {"recipients_per_transaction": "transaction", "org_recipients_per_10min": "10m"}


def record_refusal(refused: dict[str, int], txn: QuotaTxn, limit: str, current: int, maximum: int) -> None:
    """Log, count and emit a limit refusal: the same for every backend."""
    decision = txn.decision
    account = decision.account.name if decision.account else None
    user = decision.user.address if decision.user else None
    log.warning("quota: %s exceeded: account=%s user=%s count=%d limit=%d window=%s", limit,
                account or "-", user or "-", current, maximum, _WINDOW_OF_LIMIT.get(limit, "24h"))
    refused[limit] = refused.get(limit, 0) + 1
    events.emit("quota", limit=limit, account=account, user=user, count=current, maximum=maximum)


def _org_from(day: Any, peak: Any) -> OrgWindows:
    org = OrgWindows.__new__(OrgWindows)
    org.day = RateWindow.from_state(day)
    org.peak = RateWindow.from_state(peak)
    return org


def _user_from(messages: Any, unique: Any) -> UserWindows:
    w = UserWindows.__new__(UserWindows)
    w.messages = RateWindow.from_state(messages)
    w.unique = UniqueWindow.from_state(unique)
    return w


# -- persistence (local backend) ------------------------------------------------------


class QuotaEvent(msgspec.Struct, array_like=True):
    t: float
    account: str
    user: str
    n: int
    keys: list[str]


class QuotaSnapshot(msgspec.Struct):
    clock: float
    orgs: dict[str, tuple[Any, Any]]
    users: dict[str, tuple[Any, Any]]
    next_journal: int = 0


_event_encoder = msgspec.msgpack.Encoder()
_event_decoder = msgspec.msgpack.Decoder(QuotaEvent)
_snapshot_decoder = msgspec.msgpack.Decoder(QuotaSnapshot)


class QuotaJournal:
    """Events appended to ``journal.<n>``, flushed each second; snapshots by a forked child."""

    def __init__(self, book: QuotaBook, directory: Path, flush_interval: float, snapshot_interval: float) -> None:
        self.book = book
        self.directory = directory
        self.flush_interval = flush_interval
        self.snapshot_interval = snapshot_interval
        self.number = 0
        self._pending: list[bytes] = []
        self._fd = -1
        self._tasks: list[asyncio.Task[None]] = []
        # The journal write running in a thread.  It outlives a cancelled flush, so the
        # descriptor it writes to is closed only once it is done.
        self._writing: asyncio.Future[None] | None = None

    # -- recovery ---------------------------------------------------------------

    def restore(self) -> None:
        """Load the snapshot and replay newer journals; called before serving."""
        self.directory.mkdir(parents=True, exist_ok=True)
        snap_path = self.directory / "snapshot"
        first = 0
        floor = 0.0
        if snap_path.exists():
            try:
                snap = _snapshot_decoder.decode(snap_path.read_bytes())
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.error("quota: snapshot %s unreadable (%s); starting from the journals", snap_path, exc)
            else:
                self.book.load_snapshot(snap)
                first, floor = snap.next_journal, snap.clock
        replayed = 0
        journals = sorted(self._journals())
        for number, path in journals:
            if number < first:
                continue
            for event in _read_events(path):
                self.book.replay(event)
                floor = max(floor, event.t)
                replayed += 1
        self.number = (journals[-1][0] + 1) if journals else first
        self.book.clock = LogicalClock(floor)
        log.info("quota: restored %d user(s), %d account(s); %d journal event(s) replayed",
                 len(self.book.users), len(self.book.orgs), replayed)
        self._fd = self._open_journal(self.number)

    def _journals(self) -> list[tuple[int, Path]]:
        out = []
        for p in self.directory.glob("journal.*"):
            try:
                out.append((int(p.suffix[1:]), p))
            except ValueError:
                continue
        return out

    def _open_journal(self, number: int) -> int:
        return os.open(self.directory / f"journal.{number}", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    # -- running -------------------------------------------------------------------

    def record(self, t: float, account: str, user: str, n: int, keys: list[str]) -> None:
        data = _event_encoder.encode(QuotaEvent(t, account, user, n, keys))
        self._pending.append(len(data).to_bytes(4, "little") + data)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._flusher()), loop.create_task(self._snapshotter())]

    async def _flusher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.flush_interval)
            await self.flush(loop)
            self.book.prune()

    async def flush(self, loop: asyncio.AbstractEventLoop) -> None:
        await self._settle()
        if self._pending:
            data, self._pending = b"".join(self._pending), []
            await self._write(loop, self._fd, data)

    async def _settle(self) -> None:
        """Wait until no journal write is in flight (one at a time keeps the order)."""
        while self._writing is not None and not self._writing.done():
            await asyncio.wait([self._writing])

    async def _write(self, loop: asyncio.AbstractEventLoop, fd: int, data: bytes, close: bool = False) -> None:
        writing = self._writing = loop.run_in_executor(None, _write_sync, fd, data, close)
        writing.add_done_callback(_log_write_error)
        await asyncio.wait([writing])   # a cancelled flush does not stop the thread: _settle waits for it

    def _switch_journal(self) -> tuple[int, int, bytes]:
        """Events from now on go to the next journal; returns the old one's number and
        descriptor, and the events counted but not yet written, which belong to it."""
        covered = self.number
        new_fd = self._open_journal(covered + 1)   # if this fails, nothing has changed
        old_fd, self._fd, self.number = self._fd, new_fd, covered + 1
        data, self._pending = b"".join(self._pending), []
        return covered, old_fd, data

    async def _snapshotter(self) -> None:
        while True:
            await asyncio.sleep(self.snapshot_interval)
            await self.snapshot_in_child()

    async def snapshot_in_child(self) -> None:
        """Fork: the child sees a frozen copy of every window and writes it out.

        The fork, the switch to the next journal and the hand-over of the unwritten
        events to the old one happen with no await between them, so each event is
        either in the snapshot and the journals it covers, or after both."""
        loop = asyncio.get_running_loop()
        await self._settle()
        try:
            covered, old_fd, data = self._switch_journal()
        except OSError as exc:
            log.error("quota: snapshot skipped, the next journal cannot be opened: %s", exc)
            return
        pid = os.fork()
        if pid == 0:  # child: no logging, no event loop; just write and leave
            code = 0
            try:
                self._write_snapshot(covered + 1)
            except BaseException:
                code = 1
            os._exit(code)
        await self._write(loop, old_fd, data, close=True)
        _, status = await loop.run_in_executor(None, os.waitpid, pid, 0)
        if os.waitstatus_to_exitcode(status) == 0:
            for number, path in self._journals():
                if number <= covered:
                    path.unlink(missing_ok=True)
        else:
            log.error("quota: snapshot child failed (status %d); journals kept", status)

    def _write_snapshot(self, next_journal: int) -> None:
        snap = self.book.snapshot_state()
        snap.next_journal = next_journal
        tmp = self.directory / "snapshot.tmp"
        with open(tmp, "wb") as f:
            f.write(msgspec.msgpack.encode(snap))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.directory / "snapshot")
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    async def close(self) -> None:
        """Clean shutdown: flush, then a final snapshot written in process."""
        for task in self._tasks:
            task.cancel()
        loop = asyncio.get_running_loop()
        await self.flush(loop)   # also waits for a write the cancelled flusher left running
        covered, old_fd, data = self._switch_journal()
        await self._write(loop, old_fd, data, close=True)
        try:
            self._write_snapshot(covered + 1)
        except OSError as exc:
            log.error("quota: final snapshot failed: %s", exc)
            return
        for number, path in self._journals():
            if number <= covered:
                path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = -1


def _log_write_error(writing: asyncio.Future[None]) -> None:
    if not writing.cancelled() and writing.exception() is not None:
        log.error("quota: journal write failed: %s", writing.exception())


def _write_sync(fd: int, data: bytes, close: bool = False) -> None:
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        if data:
            os.fdatasync(fd)
    finally:
        if close:
            os.close(fd)


def _read_events(path: Path) -> list[QuotaEvent]:
    data = path.read_bytes()
    events, pos = [], 0
    while pos + 4 <= len(data):
        size = int.from_bytes(data[pos:pos + 4], "little")
        chunk = data[pos + 4:pos + 4 + size]
        if len(chunk) < size:
            break  # torn tail: the last second before a crash
        try:
            events.append(_event_decoder.decode(chunk))
        except (msgspec.DecodeError, msgspec.ValidationError):
            break
        pos += 4 + size
    return events


if TYPE_CHECKING:
    from .quota_redis import RedisQuotaBook

# The two backends: the local book answers at once, the Redis one's checks are awaited.
QuotaBackend: TypeAlias = "QuotaBook | RedisQuotaBook"


def make_quota_book(config: Config) -> QuotaBackend:
    """The backend named by [quota] backend."""
    if config.quota.backend == "redis":
        from .quota_redis import RedisQuotaBook

        return RedisQuotaBook(config)
    return QuotaBook(config)


PendingReply = bytes | None | Awaitable[bytes | None]
