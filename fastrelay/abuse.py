"""Abuse control: content scanning before delivery, per-sender thresholds, alerts, suspensions.

The relay model's spam policy (shared/reference/relay-model.md §5): the
super admins get an alert when a sender relays a lot of spam; a registered
user still sending spam ``suspend_after`` (24 h) later is suspended, with a
second notice.  Here, in the order a message meets it:

1. **Scanning** is the queue manager's ``pre_delivery`` hook (delivery.py):
   it runs after the 250, at most ``concurrency`` messages at a time, and
   once per message before its first delivery attempt.  A message still
   ``incoming`` on disk was not scanned (a ``hold`` or ``active``/deferred
   state record is only written after the hook answered), so after a crash
   or a restart it is scanned again: nothing is delivered unscanned.
   Mail the relay makes itself (DSNs, the notices below) is not scanned.
2. **Scanners** (``scanners.py``): builtin heuristics, rspamd, spamd, clamd,
   run side by side.  A virus from any of them makes the verdict virus, else
   spam from any makes it spam, else clean.  A scanner that is down or
   times out: with ``on_scanner_error = "defer"`` (default) the message waits
   (the hook raises ``PreDeliveryDeferred``; delivery asks again after
   ``retry_schedule[0]``) unless the scanners that did answer already found
   spam or a virus, which decides at once.
3. **Verdicts**: clean -> DELIVER; virus -> HOLD ``quarantine: virus (...)``;
   spam -> HOLD ``quarantine: spam (...)``, or with ``spam_action = "bounce"``
   and a registered sender, BOUNCE (a DSN, status 5.7.1).  The quarantine
   record (scanner, score, reasons) is on disk before the hold is written.
   Each verdict is one log line (queue id, scanner, score, reasons, action)
   and an ``abuse_verdict`` event.
4. **Per-sender counts**: the subject is the registered user (envelope
   sender, else SMTP AUTH user), or ``account:<name>`` for the account's
   non-registered senders.  Rolling ``RateWindow``s over ``alert_window``
   count its messages, spam and viruses.  At least ``alert_min_spam`` spam
   verdicts that are at least ``alert_spam_ratio`` of its messages, or any
   virus, open an *incident*: one alert to every super admin of the account
   (from postmaster@<primary domain>, through our own spool and delivery).
   ``suspend_after`` later, a subject still over the threshold is escalated
   once: a registered user is suspended (MAIL FROM -> 550 5.7.0 Mail Sending
   denied; policy.py consults ``suspended``) with a second notice; for
   non-registered senders the second notice recommends acting.  The incident
   closes when a review (every ``suspend_after``) finds the subject back
   under the threshold, or when the user is unsuspended; only then can a new
   crossing alert again.
5. **State** (``<state_dir>/abuse-state.json``, written atomically):
   suspensions, quarantine records, per-sender windows, recipient histories
   (the latest ``HISTORY_KEEP`` per sender) and incidents.  It
   survives restarts; ``fastrelay user unsuspend`` edits it when the relay is
   stopped and asks the relay over the control socket when it runs.

Config keys read: abuse.* (docs/abuse.md), server.hostname, [[accounts]]
(super_admins, domains, users), delivery.retry_schedule (via delivery.py).
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import os
import sys
import textwrap
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from logging import INFO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from . import events
from ._core import RateWindow, UniqueWindow
from .bounce import original_headers
from .config import Config, load_config, parse_duration
from .delivery import DELIVER, PreDeliveryDeferred, Verdict, VerdictAction
from .errors import ConfigError, SpoolError
from .logs import MailLog
from .policy import Account, Directory
from .scanners import (
    CLEAN,
    SPAM,
    VIRUS,
    ClamdClient,
    ContentFacts,
    DaemonClient,
    RspamdClient,
    ScannerError,
    ScanResult,
    Signal,
    SpamdClient,
    content_signals,
)
from .spool import Envelope, Location, MessageState, QueueIdGenerator, Spool

if TYPE_CHECKING:
    from .delivery import QueueEntry, QueueManager

log = MailLog("fastrelay.abuse")

STATE_FILE = "abuse-state.json"
WINDOW_BUCKETS = 60                 # alert_window / 60 per bucket
HOUR = 3600.0
BASELINE_SPAN = 7 * 86400.0         # a sender's own volume baseline
BASELINE_BUCKETS = 168
HISTORY_SPAN = 7 * 86400.0          # recipients a sender wrote to
HISTORY_KEEP = 1000                 # at most this many (the latest) are saved per sender: each save encodes them all
SAMPLES = 5                         # recent spam/virus messages kept per sender for the notices
INLINE_READ = 256 * 1024            # bigger bodies are read and scanned off the event loop
SAVE_INTERVAL = 5.0                 # counts are written this often when they changed
# RateWindow.to_state() (see _core.pyi); spelled out: msgspec needs it at run time.
RateWindowState = tuple[float, int, float, float | None, list[int]]
# UniqueWindow.to_state(): (span, clock, [(stable 64-bit key hash, last seen)]).
UniqueWindowState = tuple[float, float | None, list[tuple[int, float]]]
W_NEW_RECIPIENTS = 2.0
W_VOLUME_JUMP = 2.0
NEW_RECIPIENTS_SHARE = 0.9


# --- persisted state -------------------------------------------------------------------------


class Sample(msgspec.Struct, array_like=True):
    queue_id: str
    verdict: str
    subject: str
    at: float


class SenderState(msgspec.Struct, omit_defaults=True):
    subject: str
    account: str
    registered: bool
    first_seen: float
    messages: RateWindowState
    spam: RateWindowState
    virus: RateWindowState
    hourly: RateWindowState
    baseline: RateWindowState
    samples: list[Sample] = msgspec.field(default_factory=list)
    alerted_at: float = 0.0
    alert_kind: str = ""
    escalated_at: float = 0.0
    last_seen: float = 0.0
    recipients: UniqueWindowState | None = None   # absent in files written before it was kept


class Suspension(msgspec.Struct):
    address: str
    account: str
    since: float
    reason: str


class QuarantineRecord(msgspec.Struct, omit_defaults=True):
    queue_id: str
    verdict: str
    scanner: str
    score: float
    threshold: float
    reasons: list[str]
    at: float
    subject: str = ""


class AbuseState(msgspec.Struct):
    version: int = 1
    suspensions: dict[str, Suspension] = msgspec.field(default_factory=dict)
    quarantine: dict[str, QuarantineRecord] = msgspec.field(default_factory=dict)
    senders: list[SenderState] = msgspec.field(default_factory=list)


_state_decoder = msgspec.json.Decoder(AbuseState)


def state_path(config: Config) -> Path:
    return config.path(config.abuse.state_dir) / STATE_FILE


def read_state(path: Path) -> AbuseState:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return AbuseState()
    return _state_decoder.decode(data)


def write_state(path: Path, data: bytes) -> None:
    """Atomic replace: write a temporary file, fsync it, rename it over, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StateWriter:
    """Coalesces saves: ``await save()`` returns after a write that began after the call."""

    def __init__(self, path: Path, snapshot: Callable[[], bytes]) -> None:
        self.path = path
        self.snapshot = snapshot
        self._requested = 0
        self._written = 0
        self._task: asyncio.Task[None] | None = None

    async def save(self) -> None:
        self._requested += 1
        wanted = self._requested
        while self._written < wanted:
            if self._task is None:
                self._task = asyncio.ensure_future(self._run())
            await asyncio.shield(self._task)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._written < self._requested:
                generation = self._requested
                data = self.snapshot()
                await loop.run_in_executor(None, write_state, self.path, data)
                self._written = generation
        finally:
            self._task = None


class BodyReader:
    """Small bodies read with ``pread`` on a few cached segment descriptors.

    The scan reads every message once more after the server wrote it; an
    open/seek/read/close per message is most of what the builtin scan costs.
    A descriptor keeps a deleted segment's blocks allocated, so at most
    ``KEEP`` are open, and ``release_deleted`` (every save interval) closes
    those whose segment the spool dropped.  Event loop only: large bodies
    are read in a thread with Spool.read_body, never through these."""

    KEEP = 4

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.fds: OrderedDict[int, int] = OrderedDict()

    def read(self, location: Location) -> bytes:
        recent = self.spool.recent_body(location)
        if recent is not None:
            return recent
        fd = self.fds.get(location.segment)
        if fd is None:
            fd = os.open(self.spool.segment_path(location.segment), os.O_RDONLY | os.O_CLOEXEC)
            self.fds[location.segment] = fd
            while len(self.fds) > self.KEEP:
                os.close(self.fds.popitem(last=False)[1])
        else:
            self.fds.move_to_end(location.segment)
        data = os.pread(fd, location.body_len, location.body_offset)
        if len(data) != location.body_len:
            raise OSError(f"segment {location.segment}: short read at {location.body_offset}")
        return data

    def release_deleted(self) -> None:
        for segment, fd in list(self.fds.items()):
            if os.fstat(fd).st_nlink == 0:
                os.close(self.fds.pop(segment))

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


# --- per-sender tracking ---------------------------------------------------------------------


def _window(span: float, buckets: int, state: RateWindowState | None = None) -> RateWindow:
    if state is not None and abs(state[0] - span) < 1e-9 and state[1] == buckets:
        return RateWindow.from_state(state)
    return RateWindow(span, buckets)


@dataclass(eq=False, slots=True)
class SenderTrack:
    """Rolling counts and the open incident of one subject (a user, or an account's others)."""

    subject: str              # lower-case address, or "account:<name>"
    account: str
    registered: bool
    first_seen: float
    messages: RateWindow
    spam: RateWindow
    virus: RateWindow
    hourly: RateWindow        # messages in the last hour (volume jump)
    baseline: RateWindow      # messages in the last week (the sender's own baseline)
    recipients: UniqueWindow  # who it wrote to (hashes; the latest HISTORY_KEEP are saved)
    samples: deque[Sample] = field(default_factory=lambda: deque(maxlen=SAMPLES))
    alerted_at: float = 0.0   # an incident is open since
    alert_kind: str = ""      # "spam" or "virus"
    escalated_at: float = 0.0
    last_seen: float = 0.0    # its last message (a week of silence and it is forgotten)
    timer: asyncio.TimerHandle | None = None

    @property
    def label(self) -> str:
        if self.registered:
            return self.subject
        return f"non-registered senders of account {self.account!r}"


def _history(state: UniqueWindowState | None) -> UniqueWindow:
    """A sender's saved recipient history, or an empty one (a heuristic's input: never fatal)."""
    if state is not None and abs(state[0] - HISTORY_SPAN) < 1e-9:
        try:
            return UniqueWindow.from_state(state)
        except ValueError as exc:
            log.warning("abuse: a saved recipient history is unreadable, starting it afresh: %s", exc)
    return UniqueWindow(HISTORY_SPAN)


def _history_state(window: UniqueWindow) -> UniqueWindowState | None:
    span, clock, pairs = window.to_state()
    if not pairs:
        return None
    return (span, clock, pairs[-HISTORY_KEEP:])  # pairs run oldest first


def _rcpt_key(address: str) -> str:
    local, _, domain = address.rpartition("@")
    return f"{local}@{domain.lower()}"


# --- the desk --------------------------------------------------------------------------------


class AbuseDesk:
    """The scanning stage, the per-sender thresholds and what follows from them."""

    def __init__(self, config: Config, spool: Spool, queue_ids: QueueIdGenerator,
                 directory: Directory) -> None:
        self.spool = spool
        self.reader = BodyReader(spool)
        self.queue_ids = queue_ids
        self.path = state_path(config)  # a new state_dir takes a restart
        self.suspended: set[str] = set()            # policy.py's overlay
        self.recent_alerts: deque[tuple[float, str, str, str]] = deque(maxlen=10)  # for `fastrelay status`
        self.suspensions: dict[str, Suspension] = {}
        self.senders: dict[str, SenderTrack] = {}
        self.quarantine: dict[str, QuarantineRecord] = {}
        self.counters = {"scanned": 0, "clean": 0, "spam": 0, "virus": 0, "deferred": 0,
                         "bounced": 0, "alerts": 0, "suspensions": 0}
        self.delivery: QueueManager | None = None
        self.concurrency = 0
        self._slots = asyncio.Semaphore(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._dirty = False
        self._save_timer: asyncio.TimerHandle | None = None
        self.writer = StateWriter(self.path, self._snapshot)
        self.apply(config, directory)
        self._restore()

    # -- configuration ----------------------------------------------------------------------

    def apply(self, config: Config, directory: Directory) -> None:
        """Install a (re)loaded config and directory."""
        ab = config.abuse
        self.config = config
        self.settings = ab
        self.directory = directory
        self.accounts: dict[str, Account] = {a.name: a for a in directory.accounts}
        self.enabled = ab.enabled
        self.hostname = config.server.hostname
        window = parse_duration(ab.alert_window)
        period = parse_duration(ab.suspend_after)
        changed_window = getattr(self, "window", window) != window
        changed_period = getattr(self, "period", period) != period
        self.window, self.period = window, period
        self.builtin = "builtin" in ab.scanners
        self.clients: list[DaemonClient] = []
        for name in ab.scanners:
            if name == "rspamd":
                self.clients.append(RspamdClient(ab.rspamd_url, ab.scan_timeout))
            elif name == "spamd":
                self.clients.append(SpamdClient(ab.spamd, ab.scan_timeout))
            elif name == "clamd":
                self.clients.append(ClamdClient(ab.clamd, ab.scan_timeout))
        if ab.concurrency != self.concurrency:
            self.concurrency = ab.concurrency
            self._slots = asyncio.Semaphore(ab.concurrency)
        if changed_window:
            for track in self.senders.values():
                track.messages = RateWindow(window, WINDOW_BUCKETS)
                track.spam = RateWindow(window, WINDOW_BUCKETS)
                track.virus = RateWindow(window, WINDOW_BUCKETS)
        if changed_period and self.delivery is not None:
            for track in self.senders.values():
                self._schedule(track)

    def _restore(self) -> None:
        try:
            state = read_state(self.path)
        except (OSError, msgspec.DecodeError) as exc:
            # Refuse to start rather than forget who is suspended.
            raise ConfigError(str(self.path), "", f"abuse state unreadable: {exc}") from None
        self.suspensions = dict(state.suspensions)
        self.suspended.clear()
        self.suspended.update(self.suspensions)
        self.quarantine = dict(state.quarantine)
        for s in state.senders:
            track = SenderTrack(
                s.subject, s.account, s.registered, s.first_seen,
                _window(self.window, WINDOW_BUCKETS, s.messages), _window(self.window, WINDOW_BUCKETS, s.spam),
                _window(self.window, WINDOW_BUCKETS, s.virus), _window(HOUR, WINDOW_BUCKETS, s.hourly),
                _window(BASELINE_SPAN, BASELINE_BUCKETS, s.baseline), _history(s.recipients),
                deque(s.samples, maxlen=SAMPLES), s.alerted_at, s.alert_kind, s.escalated_at,
                s.last_seen or s.first_seen)
            self.senders[s.subject] = track
        if self.suspensions or self.quarantine:
            log.info("abuse: %d suspended user(s), %d quarantined message(s) on record",
                     len(self.suspensions), len(self.quarantine))

    def start(self, delivery: QueueManager) -> None:
        """After the queue manager took over the spool: timers, and records of messages gone."""
        self.delivery = delivery
        for qid in [q for q in self.quarantine if q not in delivery.entries]:
            del self.quarantine[qid]
        for track in self.senders.values():
            self._schedule(track)
        self._save_timer = asyncio.get_running_loop().call_later(SAVE_INTERVAL, self._periodic_save)

    def _snapshot(self) -> bytes:
        now = time.time()
        senders = []
        for subject, track in list(self.senders.items()):
            if not track.alerted_at and now - track.last_seen > BASELINE_SPAN:
                del self.senders[subject]  # a week of silence: forgotten
                continue
            senders.append(SenderState(
                track.subject, track.account, track.registered, track.first_seen,
                track.messages.to_state(), track.spam.to_state(), track.virus.to_state(),
                track.hourly.to_state(), track.baseline.to_state(), list(track.samples),
                track.alerted_at, track.alert_kind, track.escalated_at, track.last_seen,
                _history_state(track.recipients)))
        return msgspec.json.encode(AbuseState(1, self.suspensions, self.quarantine, senders))

    async def save(self) -> None:
        self._dirty = False
        await self.writer.save()

    def _save_soon(self) -> None:
        self._spawn(self._save_logged())

    async def _save_logged(self) -> None:
        try:
            await self.save()
        except OSError as exc:
            self._dirty = True
            log.error("abuse: cannot write %s: %s", self.path, exc)

    def _periodic_save(self) -> None:
        self.reader.release_deleted()
        if self._dirty:
            self._save_soon()
        self._save_timer = asyncio.get_running_loop().call_later(SAVE_INTERVAL, self._periodic_save)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the pre_delivery hook ------------------------------------------------------------------

    def pre_delivery_now(self, envelope: Envelope, location: Location) -> Verdict | None:
        """The verdict without waiting, or None when ``pre_delivery`` must be awaited.

        The builtin scan alone on a small body (the default) has nothing to
        wait for, so the queue manager asks here first and spares a task per
        message.  A quarantine waits for its record to be on disk."""
        if not self.enabled or not envelope.client_ip:
            return DELIVER  # scanning off, or mail the relay made itself (DSNs, notices)
        if self.clients or location.body_len > INLINE_READ:
            return None
        track = self._track_for(envelope)
        facts, builtin = self._builtin(envelope, self.reader.read(location), track)
        results = [builtin] if builtin else []
        result, action = self._judge(envelope, track, results, [])
        if action == "quarantine":
            return None
        return self._conclude(envelope, track, facts, result, action, results, [])

    async def pre_delivery(self, envelope: Envelope, location: Location) -> Verdict:
        if not self.enabled or not envelope.client_ip:
            return DELIVER
        track = self._track_for(envelope)
        async with self._slots:
            body = await self._read(location)
            facts, results, errors = await self._scan(envelope, body, track)
        return await self._decide(envelope, track, facts, results, errors)

    async def _read(self, location: Location) -> bytes:
        if location.body_len <= INLINE_READ:
            return self.reader.read(location)
        return await asyncio.get_running_loop().run_in_executor(None, self.spool.read_body, location)

    def _track_for(self, envelope: Envelope) -> SenderTrack | None:
        account = envelope.account
        if account is None:
            return None
        subject, registered = f"account:{account}", False
        for address in (envelope.sender, envelope.auth_user):
            if address:
                found = self.directory.user(address)
                if found is not None and found[0].name == account:
                    subject, registered = found[1].address.lower(), True
                    break
        track = self.senders.get(subject)
        now = time.time()
        if track is not None:
            track.last_seen = now  # in use: not to be forgotten while its message is scanned
        else:
            track = SenderTrack(
                subject, account, registered, now,
                RateWindow(self.window, WINDOW_BUCKETS), RateWindow(self.window, WINDOW_BUCKETS),
                RateWindow(self.window, WINDOW_BUCKETS), RateWindow(HOUR, WINDOW_BUCKETS),
                RateWindow(BASELINE_SPAN, BASELINE_BUCKETS), UniqueWindow(HISTORY_SPAN), last_seen=now)
            self.senders[subject] = track
        return track

    def _content(self, envelope: Envelope, body: bytes) -> ContentFacts:
        account = self.accounts.get(envelope.account or "")
        return content_signals(envelope, body, account.domains if account is not None else ())

    def _builtin(self, envelope: Envelope, body: bytes, track: SenderTrack | None,
                 facts: ContentFacts | None = None) -> tuple[ContentFacts, ScanResult | None]:
        if facts is None:
            facts = self._content(envelope, body)
        if not self.builtin:
            return facts, None
        return facts, self._builtin_result(facts.signals, facts.virus, envelope, track)

    async def _scan(self, envelope: Envelope, body: bytes, track: SenderTrack | None
                    ) -> tuple[ContentFacts, list[ScanResult], list[str]]:
        """(what the builtin scan read, every scanner's result, every scanner's failure)."""
        ab = self.settings
        clients = [c for c in self.clients
                   if isinstance(c, ClamdClient) or len(body) <= ab.spam_scan_max_size]
        tasks = [asyncio.ensure_future(c.scan(envelope, body)) for c in clients]
        # A large body is read through in a thread; the sender's counts stay on the loop.
        facts = (await asyncio.get_running_loop().run_in_executor(None, self._content, envelope, body)
                 if len(body) > INLINE_READ else None)
        facts, builtin = self._builtin(envelope, body, track, facts)
        # The daemons first: when they agree with the builtin scan, their scores say more.
        results: list[ScanResult] = []
        errors: list[str] = []
        for client, outcome in zip(clients, await asyncio.gather(*tasks, return_exceptions=True)):
            if isinstance(outcome, ScanResult):
                results.append(outcome)
            elif isinstance(outcome, ScannerError):
                errors.append(str(outcome))
            elif isinstance(outcome, BaseException):
                log.error("%s: %s scan failed", envelope.queue_id, client.name, exc_info=outcome)
                errors.append(f"{client.name}: {outcome!r}")
        if builtin is not None:
            results.append(builtin)
        return facts, results, errors

    def _builtin_result(self, signals: list[Signal], virus: str, envelope: Envelope,
                        track: SenderTrack | None) -> ScanResult:
        ab = self.settings
        score = 0.0
        for s in signals:
            score += s.weight
        new_recipients: tuple[int, int] | None = None
        volume: tuple[int, float] | None = None
        if track is not None:
            now = time.time()
            n = len(envelope.recipients)
            if n >= ab.builtin_many_recipients:
                new = sum(1 for r in envelope.recipients if not track.recipients.seen(_rcpt_key(r), now))
                if new >= NEW_RECIPIENTS_SHARE * n:
                    new_recipients = (new, n)
                    score += W_NEW_RECIPIENTS
            recent = track.hourly.total(now) + 1
            if recent >= ab.builtin_volume_min:
                history = min(BASELINE_SPAN, now - track.first_seen) - HOUR
                before = track.baseline.total(now) - (recent - 1)
                per_hour = before / (history / HOUR) if history >= HOUR else 0.0
                if recent > ab.builtin_volume_factor * max(per_hour, 1.0):
                    volume = (recent, per_hour)
                    score += W_VOLUME_JUMP
        verdict = VIRUS if virus else SPAM if score >= ab.builtin_threshold else CLEAN
        if verdict == CLEAN and not (log.isEnabledFor(INFO) or events.enabled()):
            # A clean verdict's reasons are read only by its log line and event.
            return ScanResult("builtin", CLEAN, score, ab.builtin_threshold)
        if new_recipients is not None:
            signals = [*signals, Signal("MANY_NEW_RECIPIENTS", W_NEW_RECIPIENTS,
                                        f"{new_recipients[0]} of {new_recipients[1]} never written to before")]
        if volume is not None:
            signals = [*signals, Signal("VOLUME_JUMP", W_VOLUME_JUMP,
                                        f"{volume[0]} messages in the last hour, baseline {volume[1]:.1f}/h")]
        reasons = tuple([s.reason() for s in signals])
        return ScanResult("builtin", verdict, score, ab.builtin_threshold, (virus, *reasons) if virus else reasons)

    async def _decide(self, envelope: Envelope, track: SenderTrack | None, facts: ContentFacts,
                      results: list[ScanResult], errors: list[str]) -> Verdict:
        result, action = self._judge(envelope, track, results, errors)
        verdict = self._conclude(envelope, track, facts, result, action, results, errors)
        if action == "quarantine":
            # The record is on disk before the hold: `quarantine list` can always say why.
            await self.save()
        return verdict

    def _judge(self, envelope: Envelope, track: SenderTrack | None, results: list[ScanResult],
               errors: list[str]) -> tuple[ScanResult, str]:
        """(the decisive result, the action); counts nothing."""
        decisive = None
        for r in results:
            if r.verdict == VIRUS:
                decisive = r
                break
            if r.verdict == SPAM and decisive is None:
                decisive = r
        if errors and decisive is None and self.settings.on_scanner_error == "defer":
            self.counters["deferred"] += 1
            raise PreDeliveryDeferred(f"{'; '.join(errors)} (answered: {_summary(results)})")
        result = decisive or (results[0] if results else ScanResult("none", CLEAN))
        verdict = result.verdict
        if verdict == CLEAN:
            action = "deliver"
        elif verdict == SPAM and self.settings.spam_action == "bounce" and track is not None and track.registered:
            action = "bounce"
        else:
            action = "quarantine"
        return result, action

    def _conclude(self, envelope: Envelope, track: SenderTrack | None, facts: ContentFacts, result: ScanResult,
                  action: str, results: list[ScanResult], errors: list[str]) -> Verdict:
        """Count the verdict, log it, check the sender's thresholds; a quarantine record is kept
        (the caller saves it before the hold)."""
        qid = envelope.queue_id
        verdict = result.verdict
        subject = "" if verdict == CLEAN else facts.subject
        now = time.time()
        self.counters["scanned"] += 1
        self.counters[verdict] += 1
        if track is not None:
            self._count(track, envelope, verdict, subject, now)
        detail = "" if verdict == CLEAN else _detail(result)
        # The line and the event are built only for a reader: for a clean message
        # their formatting costs as much as the counting (docs/abuse.md, Cost).
        if log.isEnabledFor(INFO):
            log.info("%s: scan: verdict=%s, scanner=%s, score=%.1f/%.1f, reasons=%s, action=%s, from=<%s>, "
                     "counted_as=%s, results=%s%s", qid, verdict, result.scanner, result.score, result.threshold,
                     ",".join(result.reasons) or "-", action, envelope.sender,
                     track.subject if track is not None else "-", _summary(results),
                     f", unavailable: {'; '.join(errors)}" if errors else "")
        if events.enabled():
            events.emit("abuse_verdict", queue_id=qid, verdict=verdict, scanner=result.scanner,
                        score=result.score, threshold=result.threshold, reasons=list(result.reasons),
                        action=action, sender=envelope.sender, counted_as=track.subject if track else None,
                        results=_summary(results), unavailable=errors)
        if track is not None and verdict != CLEAN:
            self._check(track, now)
        if action == "deliver":
            self._dirty = True
            return DELIVER
        if action == "bounce":
            self.counters["bounced"] += 1
            self._dirty = True
            return Verdict(VerdictAction.BOUNCE, f"message refused as spam ({detail})")
        self.quarantine[qid] = QuarantineRecord(qid, verdict, result.scanner, result.score, result.threshold,
                                                list(result.reasons), now, subject)
        return Verdict(VerdictAction.HOLD, f"quarantine: {verdict} ({detail})")

    def _count(self, track: SenderTrack, envelope: Envelope, verdict: str, subject: str, now: float) -> None:
        track.last_seen = now
        track.messages.add(1, now)
        track.hourly.add(1, now)
        track.baseline.add(1, now)
        for r in envelope.recipients:
            track.recipients.add(_rcpt_key(r), now)
        if verdict == SPAM:
            track.spam.add(1, now)
        elif verdict == VIRUS:
            track.virus.add(1, now)
        if verdict != CLEAN:
            track.samples.append(Sample(envelope.queue_id, verdict, subject, now))

    # -- thresholds, incidents, notices -----------------------------------------------------------

    def over_threshold(self, track: SenderTrack, now: float) -> str:
        """"virus", "spam" or "" (under every threshold) for the current window."""
        if track.virus.total(now) > 0:
            return VIRUS
        spam = track.spam.total(now)
        if spam >= self.settings.alert_min_spam and spam >= self.settings.alert_spam_ratio * track.messages.total(now):
            return SPAM
        return ""

    def _check(self, track: SenderTrack, now: float) -> None:
        if track.alerted_at:
            return  # one alert per incident
        kind = self.over_threshold(track, now)
        if not kind:
            return
        track.alerted_at, track.alert_kind, track.escalated_at = now, kind, 0.0
        log.warning("abuse: %s crossed the %s threshold (account %s): alerting its super admins",
                    track.label, kind, track.account)
        self._schedule(track)
        self._spawn(self._notify(track, "alert"))

    def _schedule(self, track: SenderTrack) -> None:
        if track.timer is not None:
            track.timer.cancel()
            track.timer = None
        if not track.alerted_at or track.subject in self.suspensions:
            return
        due = (track.escalated_at or track.alerted_at) + self.period
        track.timer = asyncio.get_running_loop().call_later(max(0.0, due - time.time()), self._review,
                                                            track.subject)

    def _review(self, subject: str) -> None:
        """suspend_after after the alert (then every suspend_after): escalate, or close the incident."""
        track = self.senders.get(subject)
        if track is None or not track.alerted_at:
            return
        track.timer = None
        now = time.time()
        kind = self.over_threshold(track, now)
        self._dirty = True
        if not kind:
            log.info("abuse: %s is back under the thresholds: incident closed", track.label)
            track.alerted_at, track.alert_kind, track.escalated_at = 0.0, "", 0.0
            return
        first = not track.escalated_at
        track.escalated_at = now
        if not first:
            self._schedule(track)  # escalated already: look again next period
            return
        if track.registered:
            self.suspensions[track.subject] = Suspension(
                track.subject, track.account, now,
                f"still over the {kind} threshold {_duration(self.period)} after the alert")
            self.suspended.add(track.subject)
            self.counters["suspensions"] += 1
            log.warning("abuse: %s suspended: still over the %s threshold %s after the alert",
                        track.subject, kind, _duration(self.period))
            self._spawn(self._notify(track, "suspension"))
        else:
            log.warning("abuse: %s still over the %s threshold %s after the alert",
                        track.label, kind, _duration(self.period))
            self._spawn(self._notify(track, "still"))
            self._schedule(track)

    async def _notify(self, track: SenderTrack, kind: str) -> None:
        """Queue a notice to the account's super admins, then save the incident's state."""
        try:
            account = self.accounts.get(track.account)
            if account is None or not account.super_admins:
                log.warning("abuse: no super admin to tell about %s (%s)", track.label, kind)
                return
            now = time.time()
            qid = self.queue_ids.next()
            sender = f"postmaster@{account.primary_domain}"
            content = self._notice(track, kind, account, qid, now)
            recipients = list(account.super_admins)
            envelope = Envelope(queue_id=qid, arrival=now, client_ip="", client_helo=self.hostname,
                                sender=sender, recipients=recipients, account=account.name,
                                smtputf8=not all(r.isascii() for r in recipients),
                                body_8bit=not content.isascii())
            try:
                location = await self.spool.append_message(envelope, (content,))
            except (SpoolError, OSError, RuntimeError) as exc:
                log.error("abuse: cannot queue the %s notice about %s: %s", kind, track.label, exc)
                return
            self.counters["alerts"] += 1
            self.recent_alerts.append((now, kind, track.label, qid))
            log.info("%s: abuse %s about %s to %s", qid, kind, track.label, ", ".join(recipients))
            log.info("%s: from=<%s>, size=%d, nrcpt=%d (queue active)", qid, sender, len(content), len(recipients))
            events.emit("abuse_alert", queue_id=qid, notice=kind, subject=track.subject, account=account.name,
                        registered=track.registered, threshold=track.alert_kind, recipients=recipients)
            if location is not None and self.delivery is not None:
                self.delivery.on_queued(envelope, location)
        finally:
            await self._save_logged()

    def _notice(self, track: SenderTrack, kind: str, account: Account, qid: str, now: float) -> bytes:
        ab = self.settings
        window = _duration(self.window)
        period = _duration(self.period)
        who = (f"the registered user {track.subject}" if track.registered
               else f"non-registered senders of your account {account.name!r} (envelope senders that are "
                    f"not registered users, e.g. devices admitted by IP)")
        messages, spam, virus = (track.messages.total(now), track.spam.total(now), track.virus.total(now))
        share = f" ({100 * spam / messages:.0f}% of its messages)" if messages else ""
        if track.alert_kind == VIRUS:
            threshold = "any message carrying a virus"
        else:
            threshold = (f"at least {ab.alert_min_spam} spam messages making up at least "
                         f"{100 * ab.alert_spam_ratio:.0f}% of its messages within {window}")
        config = self.config.source or "FILE"
        if kind == "alert":
            title = f"{'Virus' if track.alert_kind == VIRUS else 'Spam'} alert: {track.label}"
            what = "a virus" if track.alert_kind == VIRUS else "a large amount of spam"
            opening = f"The relay {self.hostname} detected {what} sent by {who}."
            follow = (f"If this user is still over the threshold {period} from now, it will be suspended "
                      "(it will not be able to send through the relay) and you will get a second notice."
                      if track.registered else
                      f"If these senders are still over the threshold {period} from now, you will get "
                      "a second notice, and we recommend suspending them.")
            restore = ""
        elif kind == "suspension":
            title = f"User suspended: {track.subject}"
            opening = (f"{period} after the first alert, {who} is still over the threshold, so the user "
                       "has been suspended: the relay refuses its mail with \"550 5.7.0 Mail Sending "
                       "denied\". It can still receive mail.")
            follow = "When the problem is fixed, restore the user with:"
            restore = f"    fastrelay user unsuspend {track.subject} --config {config}"
        else:
            title = f"Still sending {'viruses' if track.alert_kind == VIRUS else 'spam'}: {track.label}"
            opening = (f"{period} after the first alert, {who} are still over the threshold. We recommend "
                       "suspending these senders: disable the IP range or the relay rule that admits them, "
                       "or make them registered users so that they can be suspended one by one.")
            follow = restore = ""
        lines = [
            *textwrap.wrap(opening, 76),
            "",
            *textwrap.wrap(f"Threshold crossed: {threshold}.", 76),
            f"Counts over the last {window}: {messages} message(s), {spam} spam{share}, {virus} with a virus.",
            "",
            "Recent messages held or refused:",
        ]
        for s in list(track.samples)[-SAMPLES:]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.at))
            lines.append(f"  {s.queue_id}  {s.verdict:<5}  {when}  Subject: {s.subject or '(none)'}"[:300])
        lines.append("")
        if follow:
            lines += [*textwrap.wrap(follow, 76), *([restore] if restore else []), ""]
        lines += [
            "What you can do:",
            "  - check the user's device or account for compromise (change its password);",
            f"  - review the quarantine:  fastrelay quarantine list --config {config}",
            "    then show, release or delete a message by its queue id;",
            f"  - search the relay log for the queue ids above, or for from=<{track.subject}>.",
            "",
            f"-- fastrelay on {self.hostname}",
        ]
        text = "\r\n".join(lines)
        date = email.utils.formatdate(now, localtime=True)
        head = [
            f"Received: by {self.hostname} (fastrelay) id {qid}; {date}",
            f"Date: {date}",
            f"From: Mail relay abuse desk <postmaster@{account.primary_domain}>",
            f"To: {', '.join(account.super_admins)}",
            f"Subject: [fastrelay] {title}",
            f"Message-ID: <{qid}.abuse@{self.hostname}>",
            "Auto-Submitted: auto-generated",
            f"X-Fastrelay-Abuse: {kind}; subject={track.subject}; threshold={track.alert_kind}",
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=utf-8",
            f"Content-Transfer-Encoding: {'7bit' if text.isascii() else '8bit'}",
        ]
        return ("\r\n".join(head) + "\r\n\r\n" + text + "\r\n").encode("utf-8")

    # -- administration ---------------------------------------------------------------------------

    async def unsuspend(self, address: str) -> str:
        key = address.strip().lower()
        if key not in self.suspensions:
            raise LookupError(f"{address} is not suspended")
        del self.suspensions[key]
        self.suspended.discard(key)
        track = self.senders.pop(key, None)  # a fresh start: counts and incident cleared
        if track is not None and track.timer is not None:
            track.timer.cancel()
        await self.save()
        log.warning("abuse: %s unsuspended by the administrator", key)
        events.emit("abuse_alert", notice="unsuspension", subject=key)
        return f"{key}: unsuspended"

    def _held(self) -> list[tuple[QuarantineRecord, QueueEntry]]:
        assert self.delivery is not None
        out = []
        for qid, record in list(self.quarantine.items()):
            entry = self.delivery.entries.get(qid)
            if entry is None:
                del self.quarantine[qid]  # deleted or delivered by other means
                self._dirty = True
            elif entry.state.state == MessageState.HOLD:
                out.append((record, entry))
        return out

    def _item(self, record: QuarantineRecord, entry: QueueEntry) -> dict[str, Any]:
        env = entry.envelope
        return {"queue_id": record.queue_id, "sender": env.sender, "recipients": list(env.recipients),
                "verdict": record.verdict, "scanner": record.scanner, "score": record.score,
                "threshold": record.threshold, "reasons": record.reasons, "subject": record.subject,
                "at": record.at, "size": entry.location.body_len}

    def control_handlers(self) -> dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]]:
        """quarantine_* and user_* commands; release/delete replace delivery's (virus guard)."""

        def queue_id(request: dict[str, Any]) -> str:
            qid = request.get("queue_id")
            if not isinstance(qid, str) or not qid:
                raise LookupError("queue_id missing")
            return qid

        async def q_list(request: dict[str, Any]) -> dict[str, Any]:
            items = [self._item(r, e) for r, e in self._held()]
            return {"ok": True, "items": items, "message": f"{len(items)} message(s) in quarantine"}

        async def q_show(request: dict[str, Any]) -> dict[str, Any]:
            qid = queue_id(request)
            found = {r.queue_id: (r, e) for r, e in self._held()}.get(qid)
            if found is None:
                raise LookupError(f"{qid} is not in quarantine")
            record, entry = found
            body = await self._read(entry.location)
            headers = original_headers(body).decode("utf-8", errors="replace")
            return {"ok": True, "item": self._item(record, entry), "headers": headers,
                    "message": f"{qid}: {record.verdict}"}

        async def release(request: dict[str, Any], *, quarantine_only: bool) -> dict[str, Any]:
            assert self.delivery is not None
            qid = queue_id(request)
            record = self.quarantine.get(qid)
            if record is None and quarantine_only:
                raise LookupError(f"{qid} is not in quarantine")
            if record is not None and record.verdict == VIRUS:
                # Never delivered (issue 6), whatever the request says: no "force" is read.
                log.warning("%s: release refused: quarantined as a virus", qid)
                raise LookupError(f"{qid} is quarantined as a virus ({', '.join(record.reasons)}) and "
                                  f"cannot be released; `fastrelay quarantine show {qid}` shows it, "
                                  f"`fastrelay quarantine delete {qid}` removes it")
            message = self.delivery.release(qid)
            if record is not None:
                del self.quarantine[qid]
                log.warning("%s: released from quarantine (%s)", qid, record.verdict)
                await self.save()
            return {"ok": True, "message": message}

        async def delete(request: dict[str, Any], *, quarantine_only: bool) -> dict[str, Any]:
            assert self.delivery is not None
            qid = queue_id(request)
            if quarantine_only and qid not in self.quarantine:
                raise LookupError(f"{qid} is not in quarantine")
            message = self.delivery.delete(qid)
            if self.quarantine.pop(qid, None) is not None:
                await self.save()
            return {"ok": True, "message": message}

        async def unsuspend(request: dict[str, Any]) -> dict[str, Any]:
            address = request.get("address")
            if not isinstance(address, str) or not address:
                raise LookupError("address missing")
            return {"ok": True, "message": await self.unsuspend(address)}

        async def suspended(request: dict[str, Any]) -> dict[str, Any]:
            items = [msgspec.to_builtins(s) for s in self.suspensions.values()]
            return {"ok": True, "items": items, "message": f"{len(items)} suspended user(s)"}

        def guarded(handler: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
                    ) -> Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]:
            async def run(request: dict[str, Any]) -> dict[str, Any]:
                if self.delivery is None:
                    return {"ok": False, "error": "the relay is still starting; try again"}
                try:
                    return await handler(request)
                except LookupError as exc:
                    return {"ok": False, "error": str(exc.args[0])}
            return run

        return {
            "quarantine_list": guarded(q_list),
            "quarantine_show": guarded(q_show),
            "quarantine_release": guarded(lambda r: release(r, quarantine_only=True)),
            "quarantine_delete": guarded(lambda r: delete(r, quarantine_only=True)),
            "release": guarded(lambda r: release(r, quarantine_only=False)),
            "delete": guarded(lambda r: delete(r, quarantine_only=False)),
            "user_unsuspend": guarded(unsuspend),
            "user_suspended": guarded(suspended),
        }

    # -- shutdown -----------------------------------------------------------------------------------

    async def close(self, timeout: float = 10.0) -> None:
        """After delivery stopped: let queued notices finish, then write the state once more."""
        if self._save_timer is not None:
            self._save_timer.cancel()
        for track in self.senders.values():
            if track.timer is not None:
                track.timer.cancel()
                track.timer = None
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        self.reader.close()
        try:
            await self.save()
        except OSError as exc:
            log.error("abuse: cannot write %s at shutdown: %s", self.path, exc)


def _summary(results: list[ScanResult]) -> str:
    """Every scanner's result in one line."""
    return ", ".join(r.summary() for r in results) or "none"


def _detail(result: ScanResult) -> str:
    """The scanner's finding as the hold reason and the DSN show it."""
    if result.verdict == VIRUS:
        return f"{result.scanner}: {', '.join(result.reasons)}"
    shown = [r for r in result.reasons if not r.startswith("action=")][:6]
    return f"{result.scanner} score {result.score:.1f}/{result.threshold:.1f}" + (
        f": {', '.join(shown)}" if shown else "")


def _duration(seconds: float) -> str:
    """86400 -> "24h", 604800 -> "7d", 4 -> "4s"."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0 and (unit != "d" or seconds > 2 * 86400):
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


# --- command line: fastrelay quarantine ... | fastrelay user ... ---------------------------------


def _ask(config: Config, message: dict[str, Any]) -> dict[str, Any]:
    from .control import request, socket_path

    return request(socket_path(config.path(config.server.spool_dir)), message)


def _load(args: argparse.Namespace) -> Config | None:
    try:
        return load_config(args.config)
    except ConfigError as exc:
        print(f"fastrelay: {exc}", file=sys.stderr)
        return None


def _cmd_quarantine(args: argparse.Namespace) -> int:
    from .control import ask_running_relay

    message: dict[str, Any] = {"cmd": f"quarantine_{args.quarantine_command}"}
    if getattr(args, "queue_id", None):
        message["queue_id"] = args.queue_id
    answer = ask_running_relay(args.config, message)
    if answer is None:
        return 1
    if args.quarantine_command == "list":
        items = answer.get("items", [])
        print(f"{'queue id':<16} {'verdict':<7} {'score':>13}  {'scanner':<8} sender -> recipients")
        for it in items:
            score = "-" if it["verdict"] == VIRUS else f"{it['score']:.1f}/{it['threshold']:.1f}"
            print(f"{it['queue_id']:<16} {it['verdict']:<7} {score:>13}  {it['scanner']:<8} "
                  f"<{it['sender']}> -> {', '.join(it['recipients'])}")
            print(f"{'':<16} reasons: {', '.join(it['reasons']) or '-'}")
            if it.get("subject"):
                print(f"{'':<16} subject: {it['subject']}")
        print(f"-- {len(items)} message(s) in quarantine")
    elif args.quarantine_command == "show":
        it = answer["item"]
        print(answer["headers"].replace("\r\n", "\n"), end="")
        print()
        score = "" if it["verdict"] == VIRUS else f", score {it['score']:.1f}/{it['threshold']:.1f}"
        print(f"X-Quarantine: {it['verdict']} by {it['scanner']}{score}; "
              f"at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(it['at']))}")
        print(f"X-Quarantine-Reasons: {', '.join(it['reasons']) or '-'}")
        print(f"X-Quarantine-Envelope: <{it['sender']}> -> {', '.join(it['recipients'])}; {it['size']} bytes")
    else:
        print(answer.get("message", "ok"))
    return 0


def _cmd_user(args: argparse.Namespace) -> int:
    """unsuspend / suspended: the running relay if it answers, else the state file."""
    from .control import RelayNotRunning
    from .errors import FastrelayError

    config = _load(args)
    if config is None:
        return 2
    message: dict[str, Any] = {"cmd": f"user_{args.user_command}"}
    if args.user_command == "unsuspend":
        message["address"] = args.address
    try:
        answer = _ask(config, message)
    except RelayNotRunning:
        return _user_offline(config, args)
    except (FastrelayError, OSError, ValueError) as exc:
        print(f"fastrelay: control socket: {exc}", file=sys.stderr)
        return 1
    if not answer.get("ok"):
        print(f"fastrelay: {answer.get('error', 'failed')}", file=sys.stderr)
        return 1
    if args.user_command == "suspended":
        _print_suspensions(answer.get("items", []))
    else:
        print(answer.get("message", "ok"))
    return 0


def _print_suspensions(items: list[dict[str, Any]]) -> None:
    for s in items:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["since"]))
        print(f"{s['address']}  account {s['account']}  since {when}: {s['reason']}")
    print(f"-- {len(items)} suspended user(s)")


def _user_offline(config: Config, args: argparse.Namespace) -> int:
    path = state_path(config)
    try:
        state = read_state(path)
    except (OSError, msgspec.DecodeError) as exc:
        print(f"fastrelay: {path}: {exc}", file=sys.stderr)
        return 1
    if args.user_command == "suspended":
        _print_suspensions([msgspec.to_builtins(s) for s in state.suspensions.values()])
        return 0
    key = args.address.strip().lower()
    if key not in state.suspensions:
        print(f"fastrelay: {args.address} is not suspended", file=sys.stderr)
        return 1
    del state.suspensions[key]
    state.senders = [s for s in state.senders if s.subject != key]
    write_state(path, msgspec.json.encode(state))
    print(f"{key}: unsuspended (the relay is not running: {path} updated)")
    return 0


def add_commands(sub: Any) -> None:
    """``fastrelay quarantine list|show|release|delete`` and ``fastrelay user unsuspend|suspended``."""
    p = sub.add_parser("quarantine", help="messages held by content scanning (running relay)")
    qsub = p.add_subparsers(dest="quarantine_command", required=True)
    q = qsub.add_parser("list", help="id, sender, recipients, verdict, score and reasons")
    q.add_argument("--config", required=True)
    q.set_defaults(func=_cmd_quarantine)
    for name, text in (("show", "the message's headers and its verdict"),
                       ("release", "deliver it (never a virus: show or delete that)"),
                       ("delete", "remove it without a bounce")):
        q = qsub.add_parser(name, help=text)
        q.add_argument("queue_id", metavar="QUEUEID")
        q.add_argument("--config", required=True)
        q.set_defaults(func=_cmd_quarantine)

    p = sub.add_parser("user", help="users suspended for sending spam")
    usub = p.add_subparsers(dest="user_command", required=True)
    u = usub.add_parser("unsuspend", help="let a suspended user send again")
    u.add_argument("address", metavar="ADDRESS")
    u.add_argument("--config", required=True)
    u.set_defaults(func=_cmd_user)
    u = usub.add_parser("suspended", help="list the users suspended for sending spam")
    u.add_argument("--config", required=True)
    u.set_defaults(func=_cmd_user)
