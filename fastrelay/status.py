"""`fastrelay status`: a live one-screen summary read from the running relay.

The relay answers a ``status`` request on its control socket (control.py)
with plain numbers it already keeps: nothing is added to the SMTP path
except a sampler that copies two counters every few seconds, from which the
message and recipient rates are derived.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from typing import TYPE_CHECKING, Any

from .quota import QuotaBook

if TYPE_CHECKING:
    from .app import Relay

SAMPLE_EVERY = 5.0


class StatusReporter:
    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.started = time.time()
        self._samples: deque[tuple[float, int, int]] = deque(maxlen=int(300 / SAMPLE_EVERY) + 1)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._sample())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _sample(self) -> None:
        while True:
            c = self.relay.server.counters
            self._samples.append((time.monotonic(), c["messages"], c["recipients"]))
            await asyncio.sleep(SAMPLE_EVERY)

    def _rate(self, seconds: float) -> tuple[float, float]:
        """(messages/s, recipients/s) over about the last ``seconds``."""
        c = self.relay.server.counters
        now = time.monotonic()
        past = [s for s in self._samples if now - s[0] <= seconds + SAMPLE_EVERY]
        if not past:
            return 0.0, 0.0
        t0, m0, r0 = past[0]
        elapsed = max(now - t0, 1e-3)
        return (c["messages"] - m0) / elapsed, (c["recipients"] - r0) / elapsed

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        relay = self.relay
        server, delivery = relay.server, relay.delivery
        states = Counter(entry.state.state.value for entry in delivery.entries.values())
        scanning = sum(1 for entry in delivery.entries.values() if entry.scanning)
        now = time.time()
        oldest = min((e.envelope.arrival for e in delivery.entries.values()), default=now)
        top: list[dict[str, Any]] = []
        quota = relay.quota
        if isinstance(quota, QuotaBook):  # the Redis backend keeps no users here
            usage = sorted(((quota.usage(u), u) for u in list(quota.users)), reverse=True)[:5]
            for (messages, unique), user in usage:
                found = server.policy.directory.user(user)
                account = found[0] if found else None
                limits = quota.limits_for(account)
                top.append({"user": user, "messages": messages, "messages_limit": limits.user_messages_per_day,
                            "unique_recipients": unique,
                            "unique_limit": limits.user_unique_recipients_per_day})
        abuse = getattr(relay, "abuse", None)
        alerts = [{"time": t, "notice": kind, "sender": who, "queue_id": qid}
                  for t, kind, who, qid in (abuse.recent_alerts if abuse is not None else ())]
        m1, r1 = self._rate(60)
        m5, r5 = self._rate(300)
        return {
            "ok": True,
            "uptime": now - self.started,
            "connections": {"open": len(server.sessions), "total": server.counters["connections"],
                            "refused": server.counters["refused_connections"]},
            "accepted": {"messages": server.counters["messages"], "recipients": server.counters["recipients"]},
            "data_memory": {"held": server.data_bytes, "limit": server.data_memory_limit},
            "rates": {"messages_1m": m1, "recipients_1m": r1, "messages_5m": m5, "recipients_5m": r5},
            "queue": {"states": dict(states), "scanning": scanning, "total": len(delivery.entries),
                      "oldest_age": now - oldest},
            "deliveries": dict(delivery.counters),
            "top_senders": top,
            "suspended": sorted(abuse.suspended) if abuse is not None else [],
            "recent_alerts": alerts,
        }


def render(s: dict[str, Any]) -> str:
    """The answer as one screen of text."""
    up = int(s["uptime"])
    lines = [
        f"fastrelay: up {up // 86400}d {up % 86400 // 3600:02d}:{up % 3600 // 60:02d}:{up % 60:02d}",
        f"connections: {s['connections']['open']} open, {s['connections']['total']} total, "
        f"{s['connections']['refused']} refused",
        f"accepted: {s['accepted']['messages']} messages, {s['accepted']['recipients']} recipients",
        f"message content in memory: {s['data_memory']['held'] / 2**20:.1f} MiB of "
        f"{s['data_memory']['limit'] / 2**20:.0f} MiB (max_data_memory)",
        f"rates: {s['rates']['messages_1m']:.1f} msg/s, {s['rates']['recipients_1m']:.1f} rcpt/s (1 min); "
        f"{s['rates']['messages_5m']:.1f} msg/s (5 min)",
        "queue: " + (", ".join(f"{k} {v}" for k, v in sorted(s["queue"]["states"].items())) or "empty")
        + f" (total {s['queue']['total']}, scanning {s['queue']['scanning']}, "
          f"oldest {int(s['queue']['oldest_age'])}s)",
        "deliveries: " + ", ".join(f"{k} {v}" for k, v in s["deliveries"].items()),
    ]
    if s["top_senders"]:
        lines.append("top senders (24 h, against their daily limits):")
        for t in s["top_senders"]:
            lines.append(f"  {t['user']:<40} {t['messages']:>7}/{t['messages_limit']} messages  "
                         f"{t['unique_recipients']:>7}/{t['unique_limit']} unique recipients")
    if s["suspended"]:
        lines.append("suspended: " + ", ".join(s["suspended"]))
    if s["recent_alerts"]:
        lines.append("recent abuse alerts:")
        for a in s["recent_alerts"]:
            when = time.strftime("%b %d %H:%M:%S", time.localtime(a["time"]))
            lines.append(f"  {when} {a['notice']:<12} {a['sender']} (notice {a['queue_id']})")
    return "\n".join(lines)
