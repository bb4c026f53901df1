"""The queue manager: from the spool to the next hops, retries, bounces.

Postfix's design in one process (its qmgr + smtp): every live message is a
``QueueEntry`` in memory; the spool holds its durable state.

    incoming --pre_delivery--> active --+--> done        (every recipient sent or bounced)
        |                               +--> deferred    (some recipient failed temporarily)
        +--> hold (scanner, admin)                |
                                                  +-- next_attempt --> active ...

* **incoming**: queued by the server (or recovered in that state).  The
  ``pre_delivery`` hook (content scanning plugs in here) sees it once, before
  any delivery attempt, and may put it on hold.
* **active**: an attempt runs.  The pending recipients are split per
  ``Destination`` (routing.py), and each group is one ``Transfer`` for the
  delivery agent (agent.py), which runs the SMTP sessions and reports one
  result per recipient.
* **deferred**: some recipients failed temporarily; the next attempt is due
  after the next ``retry_schedule`` delay (its last entry repeats).  When a
  message has been queued longer than ``max_queue_lifetime`` its temporary
  failures become permanent.
* **done**: written when every recipient is sent or bounced; a DSN for the
  bounced ones (bounce.py) is made durable in the spool *before* that record,
  so a crash cannot lose it.  Mail from the null sender is never bounced.

Every state change is a state record in the spool and a log line, except
that the ``active`` record is written only for an attempt still running
after ``ACTIVE_RECORD_DELAY``: it only tells recovery that the hook already
passed, and most attempts end (with their ``done`` record) before that;
a crash inside that window scans the message again.  Records are not waited
for; every recipient's outcome is a Postfix-style log line.  Progress of a
message split over several destinations is written as each destination
finishes (``done_recipients``), so a restart does not send to them again.

At-least-once: a recipient is recorded as sent only after the next hop's 250
to the final dot.  A crash between that 250 and the state record being on
disk (a few milliseconds of group commit), or a lost connection after the
dot, makes the next attempt send the message again.

Config keys read: delivery.enabled, delivery.max_queue_lifetime (5d),
delivery.retry_schedule, delivery.routes (to group recipients); the agent
reads the rest of [delivery]; server.hostname (DSNs).
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

from msgspec.structs import replace

from . import events
from .agent import SessionPool, Transfer
from .bounce import FailedRecipient, build_dsn
from .config import Config, parse_duration
from .errors import SpoolError
from .logs import MailLog
from .metrics import DelayHistogram
from .routing import NextHop, Router
from .smtp_client import Outcome, RecipientResult, bounced
from .spool import (
    DeliveryState,
    Envelope,
    Location,
    MessageState,
    QueuedMessage,
    QueueIdGenerator,
    Spool,
)

log = MailLog("fastrelay.delivery")

_EVENT_OF_OUTCOME = {Outcome.SENT: "delivery", Outcome.DEFERRED: "deferral", Outcome.BOUNCED: "bounce"}

# Spool compaction: a message that keeps the oldest segment (and so every
# later one) on disk, that segment closed at least COMPACT_AGE seconds ago, is
# copied forward, up to COMPACT_BATCH_BYTES of bodies per pass, a pass every
# COMPACT_INTERVAL seconds.  A message copied forward is copied again only
# when its new segment has become the oldest: the cost follows what stays
# queued, not the traffic.  A segment still more than COMPACT_LIVE_SHARE
# live is left as it is (copying it would free little: with delivery off,
# say, everything stays live).
COMPACT_AGE = 300.0
COMPACT_LIVE_SHARE = 0.5
COMPACT_INTERVAL = 60.0
COMPACT_BATCH_BYTES = 64 * 1024 * 1024

# An attempt still running after this long gets its ``active`` state record.
ACTIVE_RECORD_DELAY = 0.5

# What the spool keeps in memory of freshly queued bodies, for the scan and
# the first attempt; released as each message leaves its first attempt.
RECENT_BODIES_BUDGET = 64 * 1024 * 1024


class VerdictAction(enum.Enum):
    DELIVER = "deliver"
    HOLD = "hold"
    BOUNCE = "bounce"   # refused: every pending recipient bounces at once (a DSN to the sender)


class Verdict(NamedTuple):
    """What the pre-delivery stage decided about a message."""

    action: VerdictAction
    reason: str = ""


DELIVER = Verdict(VerdictAction.DELIVER)

# The content-scanning stage: called once per message before its first
# delivery attempt.  HOLD puts it on hold (released with `queue release`);
# BOUNCE bounces it (status 5.7.1, the reason as diagnostic).  An exception
# leaves the message incoming and asks again after the first retry_schedule
# delay.
PreDelivery = Callable[[Envelope, Location], Awaitable[Verdict]]

# Its synchronous front door, asked first when set: the verdict at once, or
# None when the stage must wait for something (then PreDelivery is awaited).
# The builtin scan of a small message needs no task per message this way.
PreDeliveryNow = Callable[[Envelope, Location], "Verdict | None"]


class PreDeliveryDeferred(Exception):
    """A pre_delivery hook cannot decide now (e.g. a scanner is down): ask again later.

    The same as any other exception, but logged as one line, without a traceback."""


# A control-socket command handler (control.py): request object in, answer out.
ControlHandler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclass(eq=False, slots=True)
class QueueEntry:
    """A live message as the queue manager tracks it."""

    envelope: Envelope
    location: Location
    state: DeliveryState
    timer: asyncio.TimerHandle | None = None
    attempt: Attempt | None = None      # the attempt in flight
    scanning: bool = False              # the pre_delivery hook is running
    moving: bool = False                # being copied forward in the spool (see compact)
    hold_reason: str | None = None      # hold when the current attempt or scan ends
    delete_requested: bool = False      # remove when the current attempt ends


@dataclass(eq=False, slots=True)
class Attempt:
    """One delivery attempt of one message, over one or more destinations."""

    entry: QueueEntry
    jobs_left: int
    results: dict[int, RecipientResult] = field(default_factory=dict)


@dataclass(eq=False, slots=True)
class Job:
    """The recipients of one attempt that go to one destination."""

    attempt: Attempt
    recipients: list[int]


def _deleted(entry: QueueEntry) -> bool:
    return entry.delete_requested


def format_delay(seconds: float) -> str:
    return f"{seconds:.2f}" if seconds < 100 else f"{seconds:.0f}"


class QueueManager:
    """Schedules delivery attempts for every live message and records their outcome."""

    def __init__(self, config: Config, spool: Spool, queue_ids: QueueIdGenerator, *,
                 pre_delivery: PreDelivery | None = None, pre_delivery_now: PreDeliveryNow | None = None,
                 router: Router | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.spool = spool
        self.queue_ids = queue_ids
        self.pre_delivery = pre_delivery
        self.pre_delivery_now = pre_delivery_now
        self.entries: dict[str, QueueEntry] = {}
        self.in_flight = 0                     # attempts running
        self.stopping = False   # SIGTERM: no new attempts
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.counters = {"sent": 0, "deferred": 0, "bounced": 0, "notifications": 0}
        self.delay_histogram = DelayHistogram()  # read by metrics.py
        self.enabled = False
        self.agent: SessionPool | None = None   # made when delivery is enabled
        self.compact_age = COMPACT_AGE
        self._compact_timer: asyncio.TimerHandle | None = None
        # Attempts by start time, oldest first: one timer writes the active record
        # of those still running after ACTIVE_RECORD_DELAY (a timer per attempt
        # cost more than the attempt's own bookkeeping).
        self._running: dict[QueueEntry, float] = {}
        self._running_timer: asyncio.TimerHandle | None = None
        self._compacting = False
        self.apply(config, router)

    # -- configuration ---------------------------------------------------------------

    def apply(self, config: Config, router: Router | None = None) -> None:
        """Install a (re)loaded config; queued jobs keep the settings they were queued with."""
        d = config.delivery
        was_enabled = self.enabled
        self.config = config
        self.hostname = config.server.hostname
        self.enabled = d.enabled
        self.spool.recent_budget = RECENT_BODIES_BUDGET if d.enabled else 0
        self.lifetime = parse_duration(d.max_queue_lifetime)
        self.delay_warning = parse_duration(d.delay_warning)
        self.retry_delays = [parse_duration(v) for v in d.retry_schedule] or [300.0]
        # The router only groups recipients per destination here; the agent
        # resolves and connects.
        self.router = router if router is not None else Router(d)
        if self.agent is not None:
            self.agent.apply(config)
        elif self.enabled:
            self.agent = SessionPool(config, self.spool.read_body)
        if self.enabled and not was_enabled and self.entries:
            self._resume_all()

    # -- intake ------------------------------------------------------------------------

    def start(self, recovered: list[QueuedMessage]) -> None:
        """Take over the messages recovered from the spool at start."""
        for m in recovered:
            entry = QueueEntry(m.envelope, Location(m.segment, m.body_offset, m.body_len), m.state)
            self.entries[m.envelope.queue_id] = entry
        if self.enabled and recovered:
            self._resume_all()
        self._compact_timer = self.loop.call_later(COMPACT_INTERVAL, self._compact_due)

    def _resume_all(self) -> None:
        counts: dict[str, int] = {}
        for entry in list(self.entries.values()):
            if entry.attempt is not None or entry.scanning:
                continue
            state = entry.state.state
            counts[state.value] = counts.get(state.value, 0) + 1
            if state == MessageState.INCOMING:
                self._admit(entry)
            elif state == MessageState.ACTIVE:
                # It was being delivered when the relay stopped: try again now
                # (at-least-once; see the module docstring).
                self._activate(entry)
            elif state == MessageState.DEFERRED:
                self._schedule(entry, entry.state.next_attempt)
        if counts:
            log.info("delivery: resuming %s", ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))

    def on_queued(self, envelope: Envelope, location: Location) -> None:
        """The server's hand-off: a message is durable in the spool."""
        entry = QueueEntry(envelope, location, DeliveryState(envelope.queue_id, MessageState.INCOMING))
        self.entries[envelope.queue_id] = entry
        if self.enabled and not self.stopping:
            self._admit(entry)

    def _admit(self, entry: QueueEntry) -> None:
        """incoming -> (pre_delivery) -> active or hold."""
        if entry.moving:
            entry.timer = self.loop.call_later(1.0, self._admit, entry)
            return
        if self.pre_delivery is None:
            self._activate(entry)
            return
        if self.pre_delivery_now is not None:
            try:
                verdict = self.pre_delivery_now(entry.envelope, entry.location)
            except Exception:
                log.exception("%s: pre-delivery check failed; asking the awaited stage", entry.envelope.queue_id)
                verdict = None
            if verdict is not None:
                self._after_check(entry, verdict)
                return
        entry.scanning = True
        self._spawn(self._scan(entry, self.pre_delivery))

    async def _scan(self, entry: QueueEntry, hook: PreDelivery) -> None:
        qid = entry.envelope.queue_id
        try:
            verdict = await hook(entry.envelope, entry.location)
        except PreDeliveryDeferred as exc:
            log.warning("%s: pre-delivery check deferred: %s; asking again in %.0fs", qid, exc,
                        self.retry_delays[0])
            verdict = None
        except Exception:
            log.exception("%s: pre-delivery check failed; asking again in %.0fs", qid, self.retry_delays[0])
            verdict = None
        entry.scanning = False
        if self.entries.get(qid) is entry:
            self._after_check(entry, verdict)

    def _after_check(self, entry: QueueEntry, verdict: Verdict | None) -> None:
        """Act on the pre-delivery verdict (None: ask again after the first retry delay)."""
        if entry.delete_requested:
            self._remove(entry, "deleted by the administrator")
        elif entry.hold_reason is not None:
            self._hold(entry, entry.hold_reason)
        elif verdict is None:
            entry.timer = self.loop.call_later(self.retry_delays[0], self._admit, entry)
        elif verdict.action == VerdictAction.HOLD:
            self._hold(entry, verdict.reason or "pre-delivery check")
        elif verdict.action == VerdictAction.BOUNCE:
            self._refuse(entry, verdict.reason or "refused by the pre-delivery check")
        else:
            self._activate(entry)

    def _refuse(self, entry: QueueEntry, reason: str) -> None:
        """The pre-delivery stage refused the message: an attempt in which every pending
        recipient bounces, so the usual path writes the DSN and then removes the message."""
        if self.stopping or entry.attempt is not None:
            return  # still incoming on disk: checked again at the next start
        done = set(entry.state.done_recipients)
        pending = [i for i in range(len(entry.envelope.recipients)) if i not in done]
        attempt = Attempt(entry, 1)
        entry.attempt = attempt
        self.in_flight += 1
        self._idle.clear()
        self._job_done(Job(attempt, pending), [bounced(reason, "5.7.1")] * len(pending), None)

    def _schedule(self, entry: QueueEntry, when: float) -> None:
        if entry.timer is not None:
            entry.timer.cancel()
        entry.timer = self.loop.call_later(max(0.0, when - time.time()), self._due, entry)

    def _due(self, entry: QueueEntry) -> None:
        entry.timer = None
        if self.entries.get(entry.envelope.queue_id) is entry:
            self._activate(entry)

    # -- an attempt ----------------------------------------------------------------------

    def _activate(self, entry: QueueEntry) -> None:
        """Start a delivery attempt: split the pending recipients per destination."""
        if not self.enabled or self.stopping or entry.attempt is not None:
            return
        if entry.moving:   # its body changes place: try again in a moment
            self._schedule(entry, time.time() + 1.0)
            return
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None
        env, state = entry.envelope, entry.state
        done = set(state.done_recipients)
        groups: dict[str, tuple[str, list[int]]] = {}   # destination key -> (a domain, recipients)
        for i, rcpt in enumerate(env.recipients):
            if i in done:
                continue
            domain = rcpt.rpartition("@")[2]
            key = self.router.destination_for(domain).key
            group = groups.get(key)
            if group is None:
                groups[key] = (domain, [i])
            else:
                group[1].append(i)
        if state.attempts or state.state != MessageState.INCOMING:
            log.info("%s: from=<%s>, size=%d, nrcpt=%d (queue active, attempt %d)", env.queue_id, env.sender,
                     entry.location.body_len, len(env.recipients) - len(done), state.attempts + 1)
        entry.state = replace(state, state=MessageState.ACTIVE, next_attempt=0.0)
        self._running[entry] = self.loop.time()
        if self._running_timer is None:
            self._running_timer = self.loop.call_later(ACTIVE_RECORD_DELAY, self._record_active)
        attempt = Attempt(entry, len(groups))
        entry.attempt = attempt
        self.in_flight += 1
        self._idle.clear()
        if not groups:
            self._finish(attempt)
            return
        assert self.agent is not None
        for domain, recipients in groups.values():
            job = Job(attempt, recipients)
            self.agent.submit(domain, Transfer(
                env.queue_id, env.sender, [env.recipients[i] for i in recipients], env.body_8bit, env.smtputf8,
                env.dot_lines, entry.location, partial(self._job_done, job), partial(_deleted, entry)))

    def _job_done(self, job: Job, results: list[RecipientResult], hop: NextHop | None) -> None:
        attempt = job.attempt
        entry = attempt.entry
        env = entry.envelope
        now = time.time()
        relay = str(hop) if hop is not None else "none"
        delay = format_delay(now - env.arrival)
        for i, result in zip(job.recipients, results):
            attempt.results[i] = result
            self.counters[result.outcome.value] += 1
            log.info("%s: to=<%s>, relay=%s, delay=%s, dsn=%s, status=%s (%s)", env.queue_id,
                     env.recipients[i], relay, delay, result.dsn, result.outcome.value, result.detail)
            if result.outcome != Outcome.DEFERRED:
                self.delay_histogram.observe(now - env.arrival)
            if events.enabled():
                events.emit(_EVENT_OF_OUTCOME[result.outcome], queue_id=env.queue_id,
                            recipient=env.recipients[i], relay=relay, delay=round(now - env.arrival, 3),
                            dsn=result.dsn, status=result.outcome.value, detail=result.detail)
        attempt.jobs_left -= 1
        if attempt.jobs_left == 0:
            self._finish(attempt)
        elif any(r.outcome == Outcome.SENT for r in results):
            # Record progress now so that a restart does not send to these again.
            # (Bounced recipients wait for the end of the attempt: their DSN first.)
            sent = {i for i, r in attempt.results.items() if r.outcome == Outcome.SENT}
            state = entry.state
            entry.state = replace(state, done_recipients=sorted(sent.union(state.done_recipients)))
            self._write_state(entry.state)

    def _finish(self, attempt: Attempt) -> None:
        """Every job of the attempt is done: bounce, defer or remove the message."""
        entry = attempt.entry
        env = entry.envelope
        attempts = entry.state.attempts + 1
        failed: list[tuple[int, RecipientResult]] = []
        pending: list[tuple[int, RecipientResult]] = []
        sent: list[int] = []
        for i, result in attempt.results.items():
            if result.outcome == Outcome.SENT:
                sent.append(i)
            elif result.outcome == Outcome.BOUNCED:
                failed.append((i, result))
            else:
                pending.append((i, result))
        if pending and not entry.delete_requested and time.time() - env.arrival >= self.lifetime:
            # RFC 5321 §4.5.4.1: give up after the queue lifetime.
            log.info("%s: from=<%s>, status=expired, returned to sender", env.queue_id, env.sender)
            events.emit("expiry", queue_id=env.queue_id, sender=env.sender, attempts=entry.state.attempts,
                        recipients=[env.recipients[i] for i, _ in pending])
            for i, result in pending:
                failed.append((i, result._replace(
                    outcome=Outcome.BOUNCED, dsn="5.4.7",
                    detail=f"message expired after {attempts} attempt(s); last error: {result.detail}")))
            pending = []
        if failed and env.sender and not entry.delete_requested:
            self._spawn(self._notify_then_record(attempt, attempts, sent, failed, pending))
            return
        if failed and not env.sender:
            log.info("%s: no non-delivery notification for mail from the null sender", env.queue_id)
        self._record(attempt, attempts, sent + [i for i, _ in failed], pending)

    async def _notify_then_record(self, attempt: Attempt, attempts: int, sent: list[int],
                                  failed: list[tuple[int, RecipientResult]],
                                  pending: list[tuple[int, RecipientResult]]) -> None:
        """Queue a DSN for the failed recipients (durably) before recording them as done."""
        entry = attempt.entry
        dsn_id = await self._queue_dsn(entry, failed, "failed")
        if dsn_id is None:
            # Keep the failed recipients pending: the next attempt fails them again
            # and tries the notification again.
            pending = pending + failed
            failed = []
        else:
            log.info("%s: sender non-delivery notification: %s", entry.envelope.queue_id, dsn_id)
        self._record(attempt, attempts, sent + [i for i, _ in failed], pending)

    async def _warn_sender(self, entry: QueueEntry, pending: list[tuple[int, RecipientResult]]) -> None:
        """Queue a delay warning (a "delayed" DSN) for the recipients still pending."""
        dsn_id = await self._queue_dsn(entry, pending, "delayed")
        if dsn_id is not None:
            log.info("%s: sender delay notification: %s", entry.envelope.queue_id, dsn_id)

    async def _queue_dsn(self, entry: QueueEntry, about: list[tuple[int, RecipientResult]],
                         action: str) -> str | None:
        """Make a DSN durable in the spool and hand it to delivery; its queue id, or None."""
        env = entry.envelope
        try:
            body = self.spool.recent_body(entry.location)
            if body is None:
                body = await self.loop.run_in_executor(None, self.spool.read_body, entry.location)
            dsn_id = self.queue_ids.next()
            now = time.time()
            notification = build_dsn(
                reporting_mta=self.hostname, dsn_queue_id=dsn_id, original_queue_id=env.queue_id,
                sender=env.sender, arrival=env.arrival, now=now, original=body,
                retry_until=env.arrival + self.lifetime if action == "delayed" else None,
                failed=[FailedRecipient(env.recipients[i], r.dsn, r.detail,
                                        str(r.reply) if r.reply is not None else "", r.remote, action)
                        for i, r in sorted(about)])
            dsn_envelope = Envelope(
                queue_id=dsn_id, arrival=now, client_ip="", client_helo=self.hostname, sender="",
                recipients=[env.sender], account=env.account,
                smtputf8=notification.utf8, body_8bit=notification.eight_bit)
            location = await self.spool.append_message(dsn_envelope, (notification.content,))
        except (SpoolError, OSError) as exc:
            log.error("%s: cannot queue the %s notification: %s", env.queue_id,
                      "non-delivery" if action == "failed" else "delay", exc)
            return None
        self.counters["notifications"] += 1
        log.info("%s: from=<>, size=%d, nrcpt=1 (queue active)", dsn_id, len(notification.content))
        if location is not None:
            self.on_queued(dsn_envelope, location)
        return dsn_id

    def _record(self, attempt: Attempt, attempts: int, finished: list[int],
                pending: list[tuple[int, RecipientResult]]) -> None:
        """Write the attempt's outcome: done, hold or deferred."""
        entry = attempt.entry
        env, state = entry.envelope, entry.state
        entry.attempt = None
        self._running.pop(entry, None)
        self.spool.release_body(entry.location)
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()
        if entry.delete_requested:
            self._remove(entry, "deleted by the administrator")
            return
        done = sorted(set(state.done_recipients).union(finished))
        if not pending:
            # Every recipient's outcome is known: losing this "done" in a crash
            # would only deliver again (at-least-once), so it rides the next commit.
            self._remove(entry, "", deferrable=True)
            return
        last_error = pending[0][1].detail
        if entry.hold_reason is not None:
            entry.state = replace(state, state=MessageState.HOLD, attempts=attempts, next_attempt=0.0,
                                  done_recipients=done, last_error=last_error)
            self._write_state(entry.state)
            log.info("%s: hold: %s", env.queue_id, entry.hold_reason)
            entry.hold_reason = None
            return
        delay = self.retry_delays[min(attempts - 1, len(self.retry_delays) - 1)]
        now = time.time()
        next_attempt = now + delay
        # The delay warning is marked in the same record: a crash before the
        # notice is queued loses the notice, never sends it twice.
        warn = (self.delay_warning > 0 and not state.warned and bool(env.sender)
                and now - env.arrival >= self.delay_warning)
        entry.state = replace(state, state=MessageState.DEFERRED, attempts=attempts, next_attempt=next_attempt,
                              done_recipients=done, last_error=last_error, warned=state.warned or warn)
        self._write_state(entry.state)
        log.info("%s: deferred: %d recipient(s) pending after attempt %d; next attempt in %s s",
                 env.queue_id, len(pending), attempts, format_delay(delay))
        if warn:
            self._spawn(self._warn_sender(entry, pending))
        if not self.stopping:
            self._schedule(entry, next_attempt)

    # -- state changes ------------------------------------------------------------------

    def _remove(self, entry: QueueEntry, why: str, deferrable: bool = False) -> None:
        env = entry.envelope
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None
        entry.state = replace(entry.state, state=MessageState.DONE, next_attempt=0.0)
        self._write_state(entry.state, deferrable)
        self.spool.release_body(entry.location)
        self.entries.pop(env.queue_id, None)
        log.info("%s: removed%s", env.queue_id, f" ({why})" if why else "")

    def _hold(self, entry: QueueEntry, reason: str) -> None:
        self.spool.release_body(entry.location)
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None
        entry.hold_reason = None
        s = entry.state
        entry.state = replace(s, state=MessageState.HOLD, next_attempt=0.0)
        self._write_state(entry.state)
        log.info("%s: hold: %s", s.queue_id, reason)

    def _record_active(self) -> None:
        self._running_timer = None
        due = self.loop.time() - ACTIVE_RECORD_DELAY
        running = self._running
        while running:
            entry, started = next(iter(running.items()))
            if started > due:
                self._running_timer = self.loop.call_later(started - due, self._record_active)
                return
            del running[entry]
            if entry.attempt is not None and self.entries.get(entry.envelope.queue_id) is entry:
                self._write_state(entry.state)

    def _write_state(self, state: DeliveryState, deferrable: bool = False) -> None:
        try:
            self.spool.post_state(state, deferrable)   # a failed write is logged by the spool
        except RuntimeError as exc:  # the spool is closed
            log.error("%s: state %s not written: %s", state.queue_id, state.state.value, exc)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- spool compaction ------------------------------------------------------------------

    def _compact_due(self) -> None:
        self._compact_timer = None
        if self.stopping:
            return
        self._spawn(self.compact())
        self._compact_timer = self.loop.call_later(COMPACT_INTERVAL, self._compact_due)

    async def compact(self) -> int:
        """Copy forward the idle messages that keep the oldest spool segment; returns how many."""
        head = self.spool.head_segment(self.compact_age)
        if head is None or self._compacting:
            return 0
        in_head = [e for e in self.entries.values() if e.location.segment == head]
        if sum(e.location.body_len for e in in_head) > COMPACT_LIVE_SHARE * self.spool.segment_bytes:
            return 0
        self._compacting = True
        moved = budget = 0
        try:
            for entry in in_head:
                if entry.attempt is not None or entry.scanning or entry.moving or self.stopping:
                    continue   # busy now: the next pass takes it
                if await self._copy_forward(entry):
                    moved += 1
                budget += entry.location.body_len
                if budget >= COMPACT_BATCH_BYTES:
                    break
        finally:
            self._compacting = False
        if moved:
            log.info("spool: %d message(s) copied forward out of segment %d", moved, head)
        return moved

    async def _copy_forward(self, entry: QueueEntry) -> bool:
        qid, old = entry.envelope.queue_id, entry.location
        entry.moving = True
        try:
            body = self.spool.recent_body(old)
            if body is None:
                body = await self.loop.run_in_executor(None, self.spool.read_body, old)
            new = await self.spool.append_message(entry.envelope, (body,))
            assert new is not None
            self.spool.release_body(new)   # not needed in memory: it waits for its next attempt
            if self.entries.get(qid) is not entry:
                # Removed while it was copied: the copy must be done too.
                self._write_state(DeliveryState(qid, MessageState.DONE))
                return False
            if entry.state.state != MessageState.INCOMING:
                await self.spool.append_state(entry.state)
            entry.location = new
            self.spool.moved_out(old.segment)
            return True
        except (SpoolError, OSError) as exc:
            log.error("%s: cannot copy forward out of segment %d: %s", qid, old.segment, exc)
            return False
        finally:
            entry.moving = False

    # -- administration (the control socket) ----------------------------------------------

    def flush(self) -> int:
        """Attempt every deferred message now; returns how many."""
        if self.agent is not None:
            self.agent.forget_failures()
        count = 0
        for entry in list(self.entries.values()):
            if entry.attempt is None and entry.state.state == MessageState.DEFERRED:
                self._activate(entry)
                count += 1
        return count

    def hold(self, queue_id: str) -> str:
        entry = self._entry(queue_id)
        if entry.state.state == MessageState.HOLD:
            return f"{queue_id}: already on hold"
        if entry.attempt is not None or entry.scanning:
            entry.hold_reason = "by the administrator"
            return f"{queue_id}: will be held when its current delivery attempt ends"
        self._hold(entry, "by the administrator")
        return f"{queue_id}: on hold"

    def release(self, queue_id: str) -> str:
        entry = self._entry(queue_id)
        if entry.state.state != MessageState.HOLD:
            if entry.hold_reason is not None:
                entry.hold_reason = None
                return f"{queue_id}: hold cancelled"
            raise LookupError(f"{queue_id} is not on hold")
        s = entry.state
        entry.state = replace(s, state=MessageState.DEFERRED, next_attempt=time.time())
        self._write_state(entry.state)
        log.info("%s: released from hold", queue_id)
        self._activate(entry)
        return f"{queue_id}: released"

    def delete(self, queue_id: str) -> str:
        entry = self._entry(queue_id)
        if entry.attempt is not None or entry.scanning:
            entry.delete_requested = True
            return f"{queue_id}: will be removed when its current delivery attempt ends"
        self._remove(entry, "deleted by the administrator")
        return f"{queue_id}: removed"

    def _entry(self, queue_id: str) -> QueueEntry:
        entry = self.entries.get(queue_id)
        if entry is None:
            raise LookupError(f"no message {queue_id} in the queue")
        return entry

    def control_handlers(self) -> dict[str, ControlHandler]:
        """The queue commands of the control socket (control.py)."""

        async def flush(request: dict[str, Any]) -> dict[str, Any]:
            if not self.enabled:
                return {"ok": False, "error": "delivery is disabled ([delivery] enabled = false)"}
            n = self.flush()
            return {"ok": True, "message": f"{n} deferred message(s) scheduled for delivery now", "count": n}

        def by_id(action: Callable[[str], str]) -> ControlHandler:
            async def handler(request: dict[str, Any]) -> dict[str, Any]:
                queue_id = request.get("queue_id")
                if not isinstance(queue_id, str) or not queue_id:
                    return {"ok": False, "error": "queue_id missing"}
                try:
                    message = action(queue_id)
                except LookupError as exc:
                    return {"ok": False, "error": str(exc.args[0])}
                # Answer once the change is on disk: a "removed" the administrator
                # reads must survive a crash a moment later.
                try:
                    await self.spool.sync()
                except SpoolError as exc:
                    return {"ok": False, "error": f"{message}, but not saved: {exc}"}
                return {"ok": True, "message": message}
            return handler

        return {"flush": flush, "hold": by_id(self.hold), "release": by_id(self.release),
                "delete": by_id(self.delete)}

    # -- shutdown -------------------------------------------------------------------------

    async def stop(self, timeout: float) -> None:
        """Let running attempts finish (up to ``timeout``), then stop; the rest resumes at restart."""
        self.stopping = True
        if self._compact_timer is not None:
            self._compact_timer.cancel()
            self._compact_timer = None
        if self._running_timer is not None:
            self._running_timer.cancel()
            self._running_timer = None
        for entry in self.entries.values():
            if entry.timer is not None:
                entry.timer.cancel()
                entry.timer = None
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.warning("shutdown: %d delivery attempt(s) interrupted; they resume at the next start",
                        self.in_flight)
        if self.agent is not None:
            await self.agent.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
