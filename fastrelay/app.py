"""The running relay: wires config, policy, quota, spool, server and delivery.

Data flows one way: bytes -> server (protocol) -> policy/quota decision ->
spool -> delivery.  This module only builds the pieces and handles signals:
SIGTERM drains and exits 0, SIGHUP reloads the config (a bad file is refused
and the old config kept).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from . import events, logs
from .abuse import AbuseDesk
from .archive import ArchiveStage
from .config import Config, load_config, parse_hostport
from .control import ControlServer, socket_path
from .delivery import QueueManager
from .errors import ConfigError
from .logs import BatchedLogHandler
from .metrics import MetricsServer, start_metrics
from .policy import Directory, RelayPolicy
from .quota import QuotaBook, QuotaJournal, make_quota_book
from .server import SmtpServer
from .spool import Spool
from .status import StatusReporter
from .tlsutil import server_context

log = logging.getLogger("fastrelay")

GIL_SWITCH_INTERVAL = 0.0005   # seconds; see serve()
# Collect the youngest generation after this many new container objects
# (Python's default is 700); see Relay._tune_gc().
GC_YOUNG_THRESHOLD = 10_000


def setup_logging(config: Config) -> None:
    """Log to [logging] file (or stderr).  The new file is opened before the old handler
    goes, so a path that cannot be opened is a ConfigError and the old log stays."""
    if config.logging.file:
        path = config.path(config.logging.file)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            stream = open(path, "a", encoding="utf-8")  # noqa: SIM115 -- the handler owns it
        except OSError as exc:
            raise ConfigError(config.source, "logging.file", f"cannot open {path}: {exc.strerror or exc}") from None
        handler = BatchedLogHandler(stream, owns_stream=True)
    else:
        handler = BatchedLogHandler(sys.stderr)
    root = logging.getLogger("fastrelay")
    for h in list(root.handlers):
        root.removeHandler(h)
        logs.uninstall(h)
        h.close()
    logs.install(root, handler)
    root.setLevel(config.logging.level.upper())
    root.propagate = False


def build_policy(config: Config) -> RelayPolicy:
    return RelayPolicy(Directory(config))


class Relay:
    def __init__(self, config_path: str | Path, config: Config, tune_gc: bool = False) -> None:
        self.config_path = Path(config_path)
        self.config = config
        self.stopped = asyncio.Event()
        self._shutdown: asyncio.Task[None] | None = None
        self.exit_status = 0
        self.tune_gc = tune_gc   # see _tune_gc(): a process of its own, not a test's relay

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        config = self.config
        tls = server_context(config)
        policy = build_policy(config)
        self.spool = Spool(config.path(config.server.spool_dir), config.server.spool_segment_bytes)
        events.configure(config)
        # Bound before recovery: a second relay on the same spool stops here.
        self.control = ControlServer(socket_path(self.spool.directory))
        await self.control.start()
        recovered = self.spool.recover()
        self.spool.start(loop)
        log.info("spool: %d queued message(s) recovered", len(recovered))
        self.quota = make_quota_book(config)
        self.quota_journal: QuotaJournal | None = None
        if isinstance(self.quota, QuotaBook):
            self.quota_journal = QuotaJournal(
                self.quota, config.path(config.quota.state_dir),
                config.quota.flush_interval, config.quota.snapshot_interval,
            )
            self.quota.journal = self.quota_journal
            self.quota_journal.restore()
            self.quota_journal.start()
        else:
            await self.quota.connect()
        self.server = SmtpServer(config, policy, self.spool, quota=self.quota, tls_context=tls)
        # Delivery takes over the recovered messages and every new one.  Content
        # scanning and per-sender abuse control (docs/abuse.md) is the
        # pre_delivery hook; its suspensions are an overlay on the policy.
        self.abuse = AbuseDesk(config, self.spool, self.server.queue_ids, policy.directory)
        policy.suspended = self.abuse.suspended
        self.delivery = QueueManager(config, self.spool, self.server.queue_ids,
                                     pre_delivery=self.abuse.pre_delivery,
                                     pre_delivery_now=self.abuse.pre_delivery_now)
        self.server.on_queued = self.delivery.on_queued
        # The archive (docs/archive.md): every message is archived before its
        # first delivery attempt (pre_delivery), and archiving starts at once
        # in the background (on_queued), off the SMTP path.
        self.archive: ArchiveStage | None = None
        if config.archive.enabled:
            self.archive = ArchiveStage.from_config(config, self.spool, self.server.queue_ids)
            self.archive.start(loop, requeue=self.delivery.on_queued, recovered=recovered)
            self.delivery.pre_delivery = self.archive.hook(self.delivery.pre_delivery)
            self.delivery.pre_delivery_now = None   # the archive copy is awaited first
            self.server.on_queued = self.archive.on_queued(self.server.on_queued)
        self.delivery.start(recovered)
        self.abuse.start(self.delivery)
        for name, handler in self.delivery.control_handlers().items():
            self.control.register(name, handler)
        # quarantine_* and user_*; its release/delete replace delivery's (a virus is never released).
        for name, handler in self.abuse.control_handlers().items():
            self.control.register(name, handler)
        self.status = StatusReporter(self)
        self.status.start()
        self.control.register("status", self.status.handle)
        for addr in config.server.listen:
            await self.server.listen(parse_hostport(addr), implicit_tls=False)
        for addr in config.server.listen_tls:
            await self.server.listen(parse_hostport(addr), implicit_tls=True)
        log.info("fastrelay listening on %s%s", ", ".join(config.server.listen),
                 f"; implicit TLS on {', '.join(config.server.listen_tls)}" if config.server.listen_tls else "")
        self.metrics: MetricsServer | None = await start_metrics(config, self, loop)
        loop.add_signal_handler(signal.SIGTERM, self.stop_requested, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self.stop_requested, "SIGINT")
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        if self.tune_gc:
            self._tune_gc()
        await self.stopped.wait()

    def reload(self) -> None:
        try:
            config = load_config(self.config_path)
            policy = build_policy(config)
            setup_logging(config)
        except (ConfigError, ValueError) as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            return
        if (config.server.listen, config.server.listen_tls) != (self.config.server.listen, self.config.server.listen_tls):
            log.warning("reload: listener changes take effect at the next restart")
        self.config = config
        self.spool.segment_bytes = config.server.spool_segment_bytes   # from the next segment on
        events.configure(config)
        self.quota.apply(config)
        policy.suspended = self.abuse.suspended
        self.server.apply(config, policy, self.quota)
        self.delivery.apply(config)
        self.abuse.apply(config, policy.directory)
        log.info("reload: config %s loaded (%d account(s), %d user(s))",
                 self.config_path, len(config.accounts), policy.directory.user_count())

    def stop_requested(self, signal_name: str) -> None:
        # One shutdown however many signals: two running side by side closed
        # every resource twice.  A message answered 250 is already on disk, so
        # an operator in a hurry can SIGKILL without losing it.
        if self._shutdown is not None:
            log.warning("shutdown: already under way (%s ignored); draining ends within %.0fs",
                        signal_name, self.config.server.drain_timeout)
            return
        self._shutdown = asyncio.get_running_loop().create_task(self.shutdown())

    async def shutdown(self) -> None:
        """Drain, then close each part; a part that fails is logged and the rest still close,
        so the process always exits (with status 1 when something failed)."""
        log.info("shutdown: draining connections (up to %.0fs)", self.config.server.drain_timeout)
        timeout = self.config.server.drain_timeout
        steps: list[tuple[str, Callable[[], Awaitable[object] | None]]] = [
            ("drain", lambda: asyncio.gather(self.server.drain(timeout), self.delivery.stop(timeout))),
            ("status", self.status.stop),
            ("abuse", lambda: self.abuse.close(timeout)),
        ]
        archive, metrics = self.archive, self.metrics
        if archive is not None:
            steps.append(("archive", lambda: archive.close(timeout)))
        if metrics is not None:
            steps.append(("metrics", metrics.close))
        steps += [("events", events.shutdown), ("control", self.control.close)]
        if self.quota_journal is not None:
            steps.append(("quota journal", self.quota_journal.close))
        elif not isinstance(self.quota, QuotaBook):
            steps.append(("quota backend", self.quota.close))
        steps.append(("spool", self.spool.close))
        for name, step in steps:
            try:
                pending = step()
                if pending is not None:
                    await pending
            except OSError as exc:   # the environment (a full disk, a removed directory): one line
                log.error("shutdown: closing the %s failed: %s", name, exc)
                self.exit_status = 1
            except Exception:        # a fault of ours: the traceback is worth having
                log.exception("shutdown: closing the %s failed", name)
                self.exit_status = 1
        log.info("shutdown: done")
        self.stopped.set()

    @staticmethod
    def _tune_gc() -> None:
        """Freeze the start-up heap; fewer, larger collections of the young generation.

        Everything built before serving (modules, config, policy, listeners)
        lives as long as the process: the collector need not scan it again.
        Each message makes a few dozen container objects that live until its
        group commit, so at the default threshold (700) a collection runs every
        few dozen messages, finds the transactions in flight alive, and moves
        them to older generations that full collections then scan again.
        bench/python_path.py: the collector took ~4 us of the ~35 us per
        message at the defaults, ~2.3 us with this; accept rate +5% (1 KiB,
        100 sessions, reuse).  What it costs: garbage in reference cycles (rare
        here) waits a little longer to be freed."""
        gc.freeze()
        _, older, oldest = gc.get_threshold()
        gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def serve(config_path: str) -> int:
    import uvloop

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"fastrelay: {exc}", file=sys.stderr)
        return 2
    try:
        setup_logging(config)
    except ConfigError as exc:
        print(f"fastrelay: {exc}", file=sys.stderr)
        return 2
    relay = Relay(config_path, config, tune_gc=True)
    # The spool's writer thread needs the GIL for a moment after each group
    # commit, and the clients wait for that moment: at Python's default 5 ms
    # the busy event loop thread holds it long enough to cost 10-15% of the
    # accept rate (bench/e2e.py, 1k-new and 100k-new; 0.2-1 ms all did as well).
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    try:
        uvloop.run(relay.run())
    except ConfigError as exc:
        print(f"fastrelay: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"fastrelay: cannot start: {exc}", file=sys.stderr)
        return 1
    return relay.exit_status
