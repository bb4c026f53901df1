"""Prometheus endpoint: plain counters, read when scraped.

Nothing on the SMTP path touches prometheus_client.  Each module keeps plain
``int`` counters in dicts (``SmtpServer.counters``, ``.refusals``,
``.connection_refusals``; ``QueueManager.counters``; the quota book's
``refused``; ``AbuseDesk.counters``; ``Archiver.counters``) and ``RelayCollector`` turns them into
metric families at scrape time.  The scrape runs on prometheus_client's HTTP
thread; the collector hands the reading to the event loop and waits for it
(``call_soon_threadsafe``), so it sees one consistent state and never walks a
dict that the loop is changing.  Reading the queue walks every live message
once per scrape (about 10 ms per 100,000).

Names carry the ``fastrelay_`` prefix; labels follow postfix_exporter
(``status``, ``code``, ``stage``):

=============================================== ======= ==========================================
fastrelay_smtpd_connections_total               counter connections accepted
fastrelay_smtpd_connections_open                gauge   sessions open now
fastrelay_smtpd_data_memory_bytes               gauge   message content in memory, DATA to spool write
                                                        (bounded by max_data_memory)
fastrelay_smtpd_connections_refused_total       counter {reason}: max_connections,
                                                        max_connections_per_ip, shutting_down
fastrelay_smtpd_messages_accepted_total         counter transactions queued (250 to DATA)
fastrelay_smtpd_recipients_accepted_total       counter their recipients
fastrelay_smtpd_refusals_total                  counter {stage, code, dsn}: every 4xx/5xx reply;
                                                        stage = the SMTP command (CONNECT before any)
fastrelay_smtpd_auth_failures_total             counter failed AUTH attempts
fastrelay_quota_refusals_total                  counter {limit}: the [limits] key that refused
fastrelay_queue_messages                        gauge   {state}: incoming, active, deferred, hold
fastrelay_queue_size_bytes                      gauge   {state}
fastrelay_queue_oldest_message_age_seconds      gauge   {state}
fastrelay_delivery_recipients_total             counter {status}: sent, deferred, bounced
fastrelay_delivery_notifications_total          counter DSNs queued
fastrelay_delivery_sessions                     gauge   outbound sessions now
fastrelay_delivery_delay_seconds                histogram arrival to final outcome, per recipient
fastrelay_scanner_verdicts_total                counter {verdict}: clean, spam, virus
fastrelay_scanner_deferred_total                counter messages kept waiting: a scanner failed
fastrelay_abuse_bounced_total                   counter spam bounced (spam_action = "bounce")
fastrelay_abuse_alerts_total                    counter alerts to super admins
fastrelay_abuse_suspensions_total               counter users suspended
fastrelay_abuse_quarantined_messages            gauge   messages in quarantine
fastrelay_spool_write_failing                   gauge   1 while the spool cannot write
fastrelay_archive_messages_total                counter {result}: archived, already_archived, failed
fastrelay_archive_pending                       gauge   messages waiting to be archived
fastrelay_archive_lag_seconds                   gauge   how long the oldest of them has waited
fastrelay_archive_journal_reports_total         counter journal reports queued
fastrelay_archive_expired_segments_total        counter segments removed by retention
fastrelay_events_written_total                  counter event log lines written ({dropped} too)
=============================================== ======= ==========================================

A gap, named so that nobody mistakes it for zeros: the delivery delay
histogram is exported only once delivery observes into
``QueueManager.delay_histogram`` (a ``DelayHistogram``); until then the family
is absent, not empty.

Config keys read: metrics.listen ("" = off; e.g. "127.0.0.1:9154").
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from . import __version__, events
from .config import Config, parse_hostport

log = logging.getLogger("fastrelay.metrics")

SCRAPE_TIMEOUT = 5.0
REQUEST_TIMEOUT = 5.0        # for the request line and headers to arrive
MAX_SCRAPERS = 256           # connections served at once; more are closed at once
MAX_REQUEST = 8192           # bytes of one request line or header line
QUEUE_STATES = ("incoming", "active", "deferred", "hold")


class DelayHistogram:
    """Plain-int histogram for the delivery path: ``observe`` is a bisect and two adds.

    Buckets in seconds, from a next hop answering at once to the 5-day queue lifetime."""

    BOUNDS = (1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 86400.0, 5 * 86400.0)

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BOUNDS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.BOUNDS, seconds)] += 1
        self.sum += seconds

    def buckets(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for bound, n in zip((*self.BOUNDS, float("inf")), self.counts):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
        return out


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _labelled(kind: type[Any], name: str, doc: str, labels: list[str],
              samples: dict[tuple[str, ...], float]) -> Metric:
    family = kind(name, doc, labels=labels)
    for key, value in sorted(samples.items()):
        family.add_metric(list(key), value)
    return family  # type: ignore[no-any-return]


def snapshot(relay: Any) -> list[Metric]:
    """Every metric family, read from the relay's plain counters.  Runs on the event loop.

    Reads ``relay.server``, ``relay.delivery``, ``relay.spool``, ``relay.quota``,
    ``relay.abuse`` (the AbuseDesk) and ``relay.archive`` (an ArchiveStage), each if present."""
    out: list[Metric] = [_labelled(GaugeMetricFamily, "fastrelay_build_info", "fastrelay version",
                                   ["version"], {(__version__,): 1.0})]
    server = getattr(relay, "server", None)
    if server is not None:
        c = server.counters
        out.append(_counter("fastrelay_smtpd_connections", "SMTP connections accepted", c["connections"]))
        out.append(GaugeMetricFamily("fastrelay_smtpd_connections_open", "SMTP sessions open",
                                     value=len(server.sessions)))
        out.append(GaugeMetricFamily("fastrelay_smtpd_data_memory_bytes",
                                     "message content in memory, from DATA until the spool has written it",
                                     value=server.data_bytes))
        out.append(_labelled(CounterMetricFamily, "fastrelay_smtpd_connections_refused",
                             "SMTP connections refused with 421, by reason", ["reason"],
                             {(k,): v for k, v in getattr(server, "connection_refusals", {}).items()}))
        out.append(_counter("fastrelay_smtpd_messages_accepted", "messages queued (250 to the final dot)",
                            c["messages"]))
        out.append(_counter("fastrelay_smtpd_recipients_accepted", "recipients of the messages queued",
                            c["recipients"]))
        out.append(_labelled(CounterMetricFamily, "fastrelay_smtpd_refusals",
                             "4xx/5xx replies, by SMTP stage, reply code and enhanced status code",
                             ["stage", "code", "dsn"], dict(getattr(server, "refusals", {}))))
        out.append(_counter("fastrelay_smtpd_auth_failures", "failed SMTP AUTH attempts",
                            c.get("auth_failures", 0)))
    quota = getattr(relay, "quota", None)
    if quota is not None and hasattr(quota, "refused"):
        out.append(_labelled(CounterMetricFamily, "fastrelay_quota_refusals",
                             "recipients or messages refused by a sending limit, by limit", ["limit"],
                             {(k,): v for k, v in quota.refused.items()}))
    spool = getattr(relay, "spool", None)
    if spool is not None:
        out.append(GaugeMetricFamily("fastrelay_spool_write_failing", "1 while the spool cannot write",
                                     value=1.0 if spool.failed is not None else 0.0))
    delivery = getattr(relay, "delivery", None)
    if delivery is not None:
        out.extend(_queue_families(delivery))
        dc = delivery.counters
        out.append(_labelled(CounterMetricFamily, "fastrelay_delivery_recipients",
                             "recipient delivery outcomes (deferred counts each attempt)", ["status"],
                             {(s,): dc.get(s, 0) for s in ("sent", "deferred", "bounced")}))
        out.append(_counter("fastrelay_delivery_notifications", "non-delivery notifications queued",
                            dc.get("notifications", 0)))
        out.append(GaugeMetricFamily("fastrelay_delivery_sessions", "outbound SMTP sessions",
                                     value=getattr(delivery, "sessions", 0)))
        histogram = getattr(delivery, "delay_histogram", None)
        if histogram is not None:
            h = HistogramMetricFamily("fastrelay_delivery_delay_seconds",
                                      "time from arrival to a recipient's final outcome (sent or bounced)")
            h.add_metric([], histogram.buckets(), sum_value=histogram.sum)
            out.append(h)
    abuse = getattr(relay, "abuse", None)
    if abuse is not None:
        bc = abuse.counters
        out.append(_labelled(CounterMetricFamily, "fastrelay_scanner_verdicts", "content scanning verdicts",
                             ["verdict"], {(k,): bc.get(k, 0) for k in ("clean", "spam", "virus")}))
        out.append(_counter("fastrelay_scanner_deferred", "messages kept waiting because a scanner failed",
                            bc.get("deferred", 0)))
        out.append(_counter("fastrelay_abuse_bounced", "spam bounced to a registered sender", bc.get("bounced", 0)))
        out.append(_counter("fastrelay_abuse_alerts", "abuse alerts sent to super admins", bc.get("alerts", 0)))
        out.append(_counter("fastrelay_abuse_suspensions", "users suspended for abuse", bc.get("suspensions", 0)))
        out.append(GaugeMetricFamily("fastrelay_abuse_quarantined_messages", "messages held in quarantine",
                                     value=len(getattr(abuse, "quarantine", ()))))
    stage = getattr(relay, "archive", None)
    if stage is not None:
        archiver = stage.archiver
        ac = archiver.counters
        out.append(_labelled(CounterMetricFamily, "fastrelay_archive_messages", "archive requests, by result",
                             ["result"], {("archived",): ac["archived"],
                                          ("already_archived",): ac["already_archived"],
                                          ("failed",): ac["failures"]}))
        out.append(GaugeMetricFamily("fastrelay_archive_pending", "messages waiting to be archived",
                                     value=archiver.pending))
        out.append(GaugeMetricFamily("fastrelay_archive_lag_seconds",
                                     "how long the oldest message waiting to be archived has waited",
                                     value=archiver.lag()))
        out.append(_counter("fastrelay_archive_journal_reports", "journal reports queued",
                            ac["journal_reports"]))
        out.append(_counter("fastrelay_archive_expired_segments", "archive segments removed by retention",
                            ac["expired_segments"]))
    event_log = events._log
    if event_log is not None:
        out.append(_labelled(CounterMetricFamily, "fastrelay_events", "event log lines", ["result"],
                             {("written",): event_log.written, ("dropped",): event_log.dropped}))
    return out


def _queue_families(delivery: Any) -> list[Metric]:
    count = dict.fromkeys(QUEUE_STATES, 0)
    size = dict.fromkeys(QUEUE_STATES, 0)
    oldest: dict[str, float] = {}
    for entry in delivery.entries.values():
        if entry.attempt is not None:
            state = "active"
        else:
            state = entry.state.state.value
            if state not in count:
                continue
        count[state] += 1
        size[state] += entry.location.body_len
        arrival = entry.envelope.arrival
        if arrival < oldest.get(state, float("inf")):
            oldest[state] = arrival
    now = time.time()
    return [
        _labelled(GaugeMetricFamily, "fastrelay_queue_messages", "messages in the queue, by state", ["state"],
                  {(s,): n for s, n in count.items()}),
        _labelled(GaugeMetricFamily, "fastrelay_queue_size_bytes", "bytes of the queued messages, by state",
                  ["state"], {(s,): n for s, n in size.items()}),
        _labelled(GaugeMetricFamily, "fastrelay_queue_oldest_message_age_seconds",
                  "age of the oldest message in each state (0 when none)", ["state"],
                  {(s,): max(0.0, now - oldest[s]) if s in oldest else 0.0 for s in QUEUE_STATES}),
    ]


class RelayCollector(Collector):
    """Reads the relay on its event loop at each scrape."""

    def __init__(self, relay: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.relay = relay
        self.loop = loop

    def collect(self) -> Iterator[Metric]:
        result: concurrent.futures.Future[list[Metric]] = concurrent.futures.Future()

        def run() -> None:
            if not result.set_running_or_notify_cancel():
                return
            try:
                result.set_result(snapshot(self.relay))
            except Exception as exc:  # noqa: BLE001 -- the scrape fails, not the relay
                result.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        yield from result.result(SCRAPE_TIMEOUT)


class MetricsServer:
    """GET /metrics on the relay's event loop, over a RelayCollector.

    prometheus_client's own server (``start_http_server``) runs a thread per
    connection with no timeout, so anyone who can reach the port holds a
    thread for as long as they keep a connection open (measured: 2,000 idle
    connections, 2,000 threads, +52 MiB).  Here a connection is a coroutine
    that waits at most REQUEST_TIMEOUT for its request, and at most
    MAX_SCRAPERS are served at once.  The exposition is prometheus_client's
    (``generate_latest``), run in a thread because the collector hands its
    reading to this loop and waits for it."""

    def __init__(self, relay: Any, loop: asyncio.AbstractEventLoop, listen: str) -> None:
        from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(RelayCollector(relay, loop))
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)
        self.loop = loop
        self.listen = listen
        self.open = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        host, port = parse_hostport(self.listen)
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_REQUEST,
                                                  reuse_address=True)
        log.info("metrics: listening on http://%s/metrics", self.listen)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.open >= MAX_SCRAPERS:
            writer.close()
            return
        self.open += 1
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                request = await reader.readline()
                while (await reader.readline()).strip():
                    pass                               # headers: nothing in them matters here
            method, path, *_ = request.decode("latin-1").split() + ["", ""]
            if method not in ("GET", "HEAD"):
                writer.write(_http(405, b"GET only\n"))
            elif path.partition("?")[0] not in ("/metrics", "/"):
                writer.write(_http(404, b"see /metrics\n"))
            else:
                body = await self.loop.run_in_executor(None, generate_latest, self.registry)
                writer.write(_http(200, b"" if method == "HEAD" else body, CONTENT_TYPE_LATEST, len(body)))
            async with asyncio.timeout(SCRAPE_TIMEOUT):
                await writer.drain()
        except (TimeoutError, ValueError, ConnectionError):
            pass   # a request that never came, a line over MAX_REQUEST, a client that left
        finally:
            self.open -= 1
            writer.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None


def _http(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
          length: int | None = None) -> bytes:
    reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}[status]
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\nConnection: close\r\n\r\n")
    return head.encode("latin-1") + body


async def start_metrics(config: Config, relay: Any, loop: asyncio.AbstractEventLoop) -> MetricsServer | None:
    """Start the endpoint if ``[metrics] listen`` is set."""
    if not config.metrics.listen:
        return None
    server = MetricsServer(relay, loop, config.metrics.listen)
    await server.start()
    return server
