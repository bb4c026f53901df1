"""Delivery agents: the SMTP sessions that carry queued mail to its next hops.

Postfix splits the queue manager (qmgr) from the delivery agents (smtp): the
queue manager decides what to send and records what happened; an agent only
runs SMTP sessions.  We split the same way, on one event loop.
``QueueManager`` (delivery.py) hands the ``SessionPool`` one ``Transfer`` per
message and destination (the recipients of one attempt that go to one
place) and gets one ``RecipientResult`` per recipient back through the
transfer's ``done`` callback.  The pool holds no queue state: what it has
not finished when the relay stops is still queued on disk.

A job queue per destination is served by up to
``per_destination_concurrency`` sessions (``concurrency`` in all); a session
delivers transfer after transfer over one connection, so messages to one
destination share connections, and connections left idle are cached for
``connection_idle_time`` seconds.  A session whose queue runs dry lingers
first (``LINGER``, within the idle time) with its connection, and the next
transfer to the destination wakes it: under load the queue runs dry between
almost every two messages (measured: 4,736 sessions for 8,000 messages in
bench/e2e.py's 1k-reuse), and a new session per message cost a task, a trip
through the cache and an RSET each.  A lingering session gives its slot up
at once when another destination waits for one.  A body is read (and
dot-stuffed) once for all the transfers of it in flight.  A destination that cannot be reached
(no next hop answers, or DNS fails for now) is suspended until the first
``retry_schedule`` delay has passed: the transfers queued behind the failing
one, and those that come meanwhile, are deferred at once ("delivery
temporarily suspended: ...") instead of each waiting for its own connect
timeout, as Postfix marks a destination dead.

Why not a child process, as Postfix's smtp(8)?  It was built and measured
(bench/e2e_delivery.py's 1k-new case on the 2-core benchmark machine): the
relay's main thread cost per message did not fall with the sessions moved
out, and with the load generator and the sink on the same two cores the
extra process only added IPC work; end to end it was 0-10% slower.

Config keys read: delivery.concurrency (50), delivery.per_destination_concurrency
(10), delivery.connection_idle_time (5 s), delivery.connect_timeout,
delivery.command_timeout, delivery.ca_file, delivery.tls (opportunistic), delivery.routes,
delivery.nameservers, delivery.mx_port, delivery.retry_schedule (its first
delay: how long a dead destination stays suspended); server.hostname.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .config import Config, parse_duration
from .logs import MailLog
from .routing import Destination, NextHop, Router, RoutingError
from .smtp_client import (
    ClientSettings,
    ConnectionCache,
    HopError,
    OutboundConnection,
    Outcome,
    RecipientResult,
    StaleConnection,
    bounced,
    client_tls_context,
    deferred,
    dot_stuff,
)
from .spool import Location

log = MailLog("fastrelay.agent")

SUSPENDED = "delivery temporarily suspended: "

# Bodies up to this size are read on the agent's event loop (a page-cache hit
# costs microseconds); larger ones in a thread.
INLINE_READ = 256 * 1024

# How long a session whose destination has nothing more waits, connection
# open, for its next transfer before it leaves the connection to the cache.
LINGER = 2.0

# Suspensions of unreachable destinations are swept of expired entries when
# their number has doubled since the last sweep, starting here.
SUSPENSIONS_SWEEP_MIN = 1024


def _never() -> bool:
    return False


def _resolve(waiter: asyncio.Future[bool], value: bool) -> None:
    if not waiter.done():
        waiter.set_result(value)


@dataclass(eq=False, slots=True)
class Transfer:
    """One message's recipients for one destination: what a delivery session sends."""

    queue_id: str
    sender: str
    recipients: list[str]
    body_8bit: bool
    smtputf8: bool           # SMTPUTF8 was given at MAIL: the content may need it
    dot_lines: bool          # some line starts with "." (dot-stuffing needed)
    location: Location       # the body in the spool
    done: Callable[[list[RecipientResult], NextHop | None], None]
    cancelled: Callable[[], bool] = _never   # checked before the transfer starts


class Suspensions:
    """Destinations that could not be reached: until when, and the result that
    transfers to them get meanwhile, without a connection attempt.

    An entry is dropped when its destination is asked for after it expired,
    and, for destinations never asked for again (a spam run to dead domains),
    by a sweep each time the table has doubled since the last one."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, RecipientResult]] = {}
        self._sweep_at = SUSPENSIONS_SWEEP_MIN

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, now: float) -> RecipientResult | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now < entry[0]:
            return entry[1]
        del self._entries[key]
        return None

    def add(self, key: str, until: float, result: RecipientResult, now: float) -> None:
        self._entries[key] = (until, result)
        if len(self._entries) >= self._sweep_at:
            for gone in [k for k, (end, _) in self._entries.items() if end <= now]:
                del self._entries[gone]
            self._sweep_at = max(SUSPENSIONS_SWEEP_MIN, 2 * len(self._entries))

    def clear(self) -> None:
        self._entries.clear()


# -- the sessions ------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Content:
    """A body read once for every transfer of it in flight (one per destination)."""

    users: int
    data: bytes | None = None           # dot-stuffed, as sent after DATA
    smtputf8: bool = False              # the content needs SMTPUTF8 at the next hop
    reading: asyncio.Future[None] | None = None


@dataclass(eq=False, slots=True)
class DestinationQueue:
    """Transfers waiting for one destination and the sessions serving them."""

    destination: Destination
    settings: ClientSettings
    transfers: deque[Transfer] = field(default_factory=deque)
    sessions: int = 0
    # Lingering sessions, each waiting on its future: True hands it the new
    # transfer, False sends it away (its time is up, or another destination
    # needs the slot).
    idle: deque[asyncio.Future[bool]] = field(default_factory=deque)


class SessionPool:
    """SMTP sessions per destination, with connection caching and concurrency limits."""

    def __init__(self, config: Config, read_body: Callable[[Location], bytes]) -> None:
        self.loop = asyncio.get_running_loop()
        self.read_body = read_body   # Spool.read_body (fresh bodies come from its memory)
        self.destinations: dict[str, DestinationQueue] = {}
        self.waiting: dict[str, None] = {}    # destination keys with transfers but no session (ordered set)
        self.sessions = 0
        self.closed = False
        self.suspended = Suspensions()
        self.connections = ConnectionCache(config.delivery.connection_idle_time)
        self._contents: dict[Location, _Content] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.apply(config)

    def apply(self, config: Config) -> None:
        """Install a (re)loaded config; queued transfers keep the settings they were queued with."""
        d = config.delivery
        self.config = config
        self.router = Router(d)
        ca_file = str(config.path(d.ca_file)) if d.ca_file else ""
        self.tls_contexts = {p: client_tls_context(p, ca_file)
                             for p in ("none", "opportunistic", "required", "verify")}
        self.connections.idle_time = d.connection_idle_time
        # A dead destination is not tried again before the first retry delay:
        # the mail deferred by it would not be retried sooner either.
        self.suspend_time = parse_duration(d.retry_schedule[0]) if d.retry_schedule else 300.0

    def _settings_for(self, destination: Destination) -> ClientSettings:
        d = self.config.delivery
        route = destination.route
        tls = route.tls if route is not None and route.tls is not None else d.tls
        return ClientSettings(
            helo=self.config.server.hostname, connect_timeout=d.connect_timeout,
            command_timeout=d.command_timeout, tls=tls, tls_context=self.tls_contexts[tls],
            username=route.username if route is not None else "",
            password=route.password if route is not None else "",
        )

    def submit(self, domain: str, transfer: Transfer) -> None:
        destination = self.router.destination_for(domain)
        queue = self.destinations.get(destination.key)
        if queue is None:
            queue = DestinationQueue(destination, self._settings_for(destination))
            self.destinations[destination.key] = queue
        key = transfer.location
        content = self._contents.get(key)
        if content is None:
            self._contents[key] = _Content(1)
        else:
            content.users += 1
        queue.transfers.append(transfer)
        while queue.idle:
            waiter = queue.idle.popleft()
            if not waiter.done():
                waiter.set_result(True)
                return
        self._start_sessions(queue)

    def _finish(self, transfer: Transfer, results: list[RecipientResult], hop: NextHop | None) -> None:
        key = transfer.location
        content = self._contents[key]
        content.users -= 1
        if content.users == 0:
            del self._contents[key]
        transfer.done(results, hop)

    def forget_failures(self) -> None:
        """Try every destination again (the administrator's queue flush)."""
        self.suspended.clear()

    def _start_sessions(self, queue: DestinationQueue) -> None:
        if self.closed:
            return
        d = self.config.delivery
        key = queue.destination.key
        while queue.transfers and queue.sessions < min(len(queue.transfers), d.per_destination_concurrency):
            if self.sessions >= d.concurrency:
                self.waiting[key] = None
                self._send_one_lingering_away()
                return
            queue.sessions += 1
            self.sessions += 1
            task = asyncio.ensure_future(self._session(queue))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self.waiting.pop(key, None)

    async def _session(self, queue: DestinationQueue) -> None:
        """One delivery session: transfers to one destination, one after another, one connection."""
        key = queue.destination.key
        conn: OutboundConnection | None = None
        lingered = 0.0
        try:
            while True:
                while queue.transfers:
                    transfer = queue.transfers.popleft()
                    try:
                        conn = await self._deliver(queue, transfer, conn)
                    except Exception:
                        log.exception("%s: delivery failed unexpectedly", transfer.queue_id)
                        if conn is not None:
                            conn.abort()
                            conn = None
                        self._finish(transfer, [deferred("internal error (see the log)", "4.3.0")]
                                     * len(transfer.recipients), None)
                lingered = 0.0
                if conn is None or not conn.usable or self.closed or self.waiting:
                    break
                started = self.loop.time()
                more = await self._linger(queue)
                lingered = self.loop.time() - started
                if not more:
                    break
        finally:
            queue.sessions -= 1
            self.sessions -= 1
            if conn is not None:
                self.connections.put(key, conn, waited=lingered)
            if not queue.transfers and not queue.sessions and self.destinations.get(key) is queue:
                del self.destinations[key]
            self._start_waiting()

    async def _linger(self, queue: DestinationQueue) -> bool:
        """Wait for the destination's next transfer (True) or the end of the linger time (False)."""
        waiter: asyncio.Future[bool] = self.loop.create_future()
        timer = self.loop.call_later(min(LINGER, self.connections.idle_time), _resolve, waiter, False)
        queue.idle.append(waiter)
        try:
            return await waiter
        finally:
            timer.cancel()
            if waiter in queue.idle:   # its time was up, or the session was cancelled
                queue.idle.remove(waiter)

    def _send_one_lingering_away(self) -> None:
        """Free a slot held by a lingering session (its connection goes to the cache)."""
        for queue in self.destinations.values():
            while queue.idle:
                waiter = queue.idle.popleft()
                if not waiter.done():
                    waiter.set_result(False)
                    return

    def _start_waiting(self) -> None:
        """A session slot came free: give it to a destination that waits for one."""
        while self.waiting and self.sessions < self.config.delivery.concurrency:
            key = next(iter(self.waiting))
            del self.waiting[key]
            queue = self.destinations.get(key)
            if queue is not None:
                self._start_sessions(queue)

    async def _deliver(self, queue: DestinationQueue, transfer: Transfer, conn: OutboundConnection | None
                       ) -> OutboundConnection | None:
        """Run one transfer; returns the connection if it can carry the next one."""
        if transfer.cancelled():
            self._finish(transfer, [], None)
            return conn
        try:
            content = await self._content(transfer)
        except OSError as exc:
            log.error("%s: cannot read the queued message: %s", transfer.queue_id, exc)
            self._finish(transfer, [deferred(f"cannot read the queued message: {exc}", "4.3.0")]
                         * len(transfer.recipients), None)
            return conn
        assert content.data is not None
        key = queue.destination.key
        if conn is not None and not conn.usable:   # closed by the next hop while the session lingered
            conn.abort()
            conn = None
        while True:
            if conn is None:
                conn = self.connections.take(key)
            if conn is None:
                suspended = self.suspended.get(key, self.loop.time())
                if suspended is not None:
                    self._fail_queue(queue, transfer, suspended)
                    return None
                try:
                    conn = await self._connect(queue)
                except RoutingError as exc:
                    result = (deferred(exc.text, exc.dsn) if exc.temporary else bounced(exc.text, exc.dsn))
                    self._fail_queue(queue, transfer, result)
                    return None
                except HopError as exc:
                    self._fail_queue(queue, transfer, deferred(exc.text, exc.dsn, reply=exc.reply))
                    return None
            try:
                results = await conn.send(transfer.sender, transfer.recipients, content.data,
                                          body_8bit=transfer.body_8bit, smtputf8=content.smtputf8)
            except StaleConnection:
                conn.abort()
                conn = None
                continue
            self._finish(transfer, results, conn.hop)
            return conn if conn.usable else None

    async def _connect(self, queue: DestinationQueue) -> OutboundConnection:
        """A new connection to the best next hop that answers (RFC 5321 §5.1)."""
        hops = await self.router.next_hops(queue.destination)
        failure: HopError | None = None
        for hop in hops:
            try:
                return await OutboundConnection.open(hop, queue.settings)
            except HopError as exc:
                log.info("%s", exc.text)
                failure = exc
        assert failure is not None
        raise failure

    def _fail_queue(self, queue: DestinationQueue, transfer: Transfer, result: RecipientResult) -> None:
        """No next hop for this destination: the transfer fails, and so do those waiting behind it."""
        self._finish(transfer, [result] * len(transfer.recipients), None)
        if result.outcome == Outcome.DEFERRED and not result.detail.startswith(SUSPENDED):
            # As Postfix: do not knock again at a door that just failed to open,
            # neither for the transfers waiting here nor for those that come
            # before the first retry delay is over.
            result = result._replace(detail=f"{SUSPENDED}{result.detail}")
            now = self.loop.time()
            self.suspended.add(queue.destination.key, now + self.suspend_time, result, now)
        while queue.transfers:
            waiting = queue.transfers.popleft()
            self._finish(waiting, [result] * len(waiting.recipients), None)

    async def _content(self, transfer: Transfer) -> _Content:
        content = self._contents[transfer.location]
        if content.data is not None:
            return content
        if content.reading is not None:
            await asyncio.shield(content.reading)
            return content
        if transfer.location.body_len <= INLINE_READ:
            self._set_content(content, transfer, self.read_body(transfer.location))
            return content
        content.reading = self.loop.create_future()
        try:
            body = await self.loop.run_in_executor(None, self.read_body, transfer.location)
        except OSError as exc:
            content.reading.set_exception(exc)
            content.reading.exception()  # retrieved: other transfers see it through shield
            content.reading = None
            raise
        self._set_content(content, transfer, body)
        content.reading.set_result(None)
        return content

    @staticmethod
    def _set_content(content: _Content, transfer: Transfer, body: bytes) -> None:
        content.data = dot_stuff(body, transfer.dot_lines)
        if transfer.smtputf8:
            # Only mail that really carries non-ASCII addresses or headers needs
            # SMTPUTF8 at the next hop (RFC 6531 §3.4).
            end = body.find(b"\r\n\r\n")
            content.smtputf8 = not (transfer.sender.isascii() and all(r.isascii() for r in transfer.recipients)
                                    and body[:end if end >= 0 else len(body)].isascii())

    async def close(self) -> None:
        """Stop every session (their transfers stay unfinished) and close cached connections."""
        self.closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.connections.close_all()
