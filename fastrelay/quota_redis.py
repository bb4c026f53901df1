"""The Redis backend of the sending limits: one quota shared by several nodes.

Same interface as ``quota.QuotaBook`` but every check returns an awaitable,
and each is exactly one round trip: a Lua script (EVALSHA) checks, and at the
end of DATA counts, atomically on the server.  Times come from Redis's own
clock (``TIME``), so nodes with skewed clocks share one notion of the window.

The windows mirror ``_core``: a rolling counter is a hash holding a ring of
buckets (``b<i>``), its running total (``t``) and the newest bucket number
(``h``); advancing clears only the buckets that expired since the last call,
so each call is O(1) amortized.  Unique recipients are a sorted set scored by
last-seen time, trimmed of members older than 24 h on each use.

When Redis cannot be reached or answers too slowly ([quota] redis_timeout),
``on_backend_error = "tempfail"`` (default) answers 451 4.3.0 — the client
keeps the mail and retries — and ``"allow"`` lets the mail through uncounted.

Config keys read: [quota] redis_url, redis_key_prefix, redis_timeout,
on_backend_error; [limits.*].
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from . import replies
from .config import Config, LimitSet
from .policy import Account, RelayDecision
from .quota import DAY, DAY_BUCKETS, DAY_RING_SPAN, PEAK, PEAK_BUCKETS, PEAK_RING_SPAN, QuotaTxn, limit_replies, rcpt_key, record_refusal

log = logging.getLogger("fastrelay.quota")

_RING = """
local function advance(key, now, width, nb)
  local cur = math.floor(now / width)
  local head = tonumber(redis.call('HGET', key, 'h'))
  if not head then return cur, 0 end
  local total = tonumber(redis.call('HGET', key, 't')) or 0
  if cur <= head then return head, total end
  if cur - head >= nb then
    redis.call('DEL', key)
    return cur, 0
  end
  for b = head + 1, cur do
    local f = 'b' .. (b % nb)
    local v = tonumber(redis.call('HGET', key, f))
    if v then
      total = total - v
      redis.call('HDEL', key, f)
    end
  end
  redis.call('HSET', key, 'h', cur, 't', total)
  return cur, total
end

local function ring_add(key, now, width, nb, n)
  local cur, total = advance(key, now, width, nb)
  redis.call('HINCRBY', key, 'b' .. (cur % nb), n)
  redis.call('HSET', key, 'h', cur, 't', total + n)
  redis.call('EXPIRE', key, math.ceil(width * nb + width))
end

local function now_seconds()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end
"""

# KEYS: org_day, org_peak, user_msgs, user_rcpts
# ARGV: pending, pending_new, rcpt, already_pending, has_user,
#       peak_limit, day_limit, user_msgs_limit, user_unique_limit
# -> {code, count, is_new}; code 0 ok, 1 peak, 2 org day, 3 user messages, 4 user unique
_CHECK_RCPT = _RING + f"""
local now = now_seconds()
local pending = tonumber(ARGV[1])
local _, peak = advance(KEYS[2], now, {PEAK_RING_SPAN / PEAK_BUCKETS}, {PEAK_BUCKETS})
if peak + pending + 1 > tonumber(ARGV[6]) then return {{1, peak + pending, 0}} end
local _, day = advance(KEYS[1], now, {DAY_RING_SPAN / DAY_BUCKETS}, {DAY_BUCKETS})
if day + pending + 1 > tonumber(ARGV[7]) then return {{2, day + pending, 0}} end
if ARGV[5] == '1' then
  local _, msgs = advance(KEYS[3], now, {DAY_RING_SPAN / DAY_BUCKETS}, {DAY_BUCKETS})
  if msgs + 1 > tonumber(ARGV[8]) then return {{3, msgs, 0}} end
  if ARGV[4] == '0' then
    redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - {DAY})
    if not redis.call('ZSCORE', KEYS[4], ARGV[3]) then
      local unique = redis.call('ZCARD', KEYS[4]) + tonumber(ARGV[2])
      if unique + 1 > tonumber(ARGV[9]) then return {{4, unique, 0}} end
      return {{0, 0, 1}}
    end
  end
end
return {{0, 0, 0}}
"""

# KEYS as above; ARGV: n, has_user, peak_limit, day_limit, user_msgs_limit,
#                      user_unique_limit, rcpt keys...
# -> {code, count, newly added recipient keys...}
_RESERVE = _RING + f"""
local now = now_seconds()
local n = tonumber(ARGV[1])
local _, peak = advance(KEYS[2], now, {PEAK_RING_SPAN / PEAK_BUCKETS}, {PEAK_BUCKETS})
if peak + n > tonumber(ARGV[3]) then return {{1, peak}} end
local _, day = advance(KEYS[1], now, {DAY_RING_SPAN / DAY_BUCKETS}, {DAY_BUCKETS})
if day + n > tonumber(ARGV[4]) then return {{2, day}} end
local fresh = {{}}
if ARGV[2] == '1' then
  local _, msgs = advance(KEYS[3], now, {DAY_RING_SPAN / DAY_BUCKETS}, {DAY_BUCKETS})
  if msgs + 1 > tonumber(ARGV[5]) then return {{3, msgs}} end
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - {DAY})
  for i = 7, #ARGV do
    if not redis.call('ZSCORE', KEYS[4], ARGV[i]) then table.insert(fresh, ARGV[i]) end
  end
  local unique = redis.call('ZCARD', KEYS[4])
  if unique + #fresh > tonumber(ARGV[6]) then return {{4, unique}} end
  ring_add(KEYS[3], now, {DAY_RING_SPAN / DAY_BUCKETS}, {DAY_BUCKETS}, 1)
  for i = 7, #ARGV do redis.call('ZADD', KEYS[4], now, ARGV[i]) end
  redis.call('EXPIRE', KEYS[4], {int(DAY) + 600})
end
ring_add(KEYS[2], now, {PEAK_RING_SPAN / PEAK_BUCKETS}, {PEAK_BUCKETS}, n)
ring_add(KEYS[1], now, {DAY_RING_SPAN / DAY_BUCKETS}, {DAY_BUCKETS}, n)
local out = {{0, 0}}
for _, k in ipairs(fresh) do table.insert(out, k) end
return out
"""

# KEYS as above; ARGV: n, has_user, fresh recipient keys...
_RELEASE = _RING + f"""
local now = now_seconds()
local n = tonumber(ARGV[1])
local function take(key, width, nb, k)
  local cur, total = advance(key, now, width, nb)
  local f = 'b' .. (cur % nb)
  local v = tonumber(redis.call('HGET', key, f)) or 0
  local d = math.min(v, k)
  if d > 0 then
    redis.call('HSET', key, f, v - d, 't', total - d)
  end
end
take(KEYS[2], {PEAK_RING_SPAN / PEAK_BUCKETS}, {PEAK_BUCKETS}, n)
take(KEYS[1], {DAY_RING_SPAN / DAY_BUCKETS}, {DAY_BUCKETS}, n)
if ARGV[2] == '1' then
  take(KEYS[3], {DAY_RING_SPAN / DAY_BUCKETS}, {DAY_BUCKETS}, 1)
  for i = 3, #ARGV do redis.call('ZREM', KEYS[4], ARGV[i]) end
end
return 0
"""

_LIMITS = ("", "org_recipients_per_10min", "org_recipients_per_day",
           "user_messages_per_day", "user_unique_recipients_per_day")


class RedisQuotaBook:
    def __init__(self, config: Config) -> None:
        q = config.quota
        self.prefix = q.redis_key_prefix
        self.client: Any = aioredis.Redis.from_url(
            q.redis_url, socket_timeout=q.redis_timeout, socket_connect_timeout=q.redis_timeout,
        )
        self._check = self.client.register_script(_CHECK_RCPT)
        self._reserve = self.client.register_script(_RESERVE)
        self._release = self.client.register_script(_RELEASE)
        self._background: set[asyncio.Task[None]] = set()
        self.refused: dict[str, int] = {}   # refusals per limit, read by metrics.py
        self.apply(config)

    def apply(self, config: Config) -> None:
        self.limits = config.limits
        self.on_error = config.quota.on_backend_error
        self.replies = limit_replies(config.limits.daily_limits_temporary)

    async def connect(self) -> None:
        try:
            await self.client.ping()
            log.info("quota: Redis backend reachable")
        except redis.exceptions.RedisError as exc:
            log.error("quota: Redis backend unreachable at start (%s); on_backend_error=%s", exc, self.on_error)

    async def close(self) -> None:
        await self.client.aclose()

    def limits_for(self, account: Account | None) -> LimitSet:
        return getattr(self.limits, account.status if account is not None else "active")  # type: ignore[no-any-return]

    def begin(self, decision: RelayDecision, recipients: list[str]) -> QuotaTxn:
        return QuotaTxn(decision, self.limits_for(decision.account), recipients)

    def _keys(self, decision: RelayDecision) -> list[str]:
        p = self.prefix
        account = decision.account.name if decision.account else "-"
        user = decision.user.address if decision.user else "-"
        return [f"{p}org:{account}:day", f"{p}org:{account}:peak", f"{p}user:{user}:msgs", f"{p}user:{user}:rcpts"]

    def _backend_failed(self, exc: Exception) -> bytes | None:
        log.error("quota: Redis error (%s): %s", type(exc).__name__, exc)
        return None if self.on_error == "allow" else replies.TEMP_LOCAL_ERROR

    def check_recipient(self, txn: QuotaTxn, rcpt: str) -> Any:
        limits = txn.limits
        if len(txn.recipients) >= limits.recipients_per_transaction:
            return self._refuse(txn, "recipients_per_transaction", len(txn.recipients))
        return self._check_recipient(txn, rcpt)

    async def _check_recipient(self, txn: QuotaTxn, rcpt: str) -> bytes | None:
        limits = txn.limits
        key = rcpt_key(rcpt)
        has_user = txn.decision.user is not None
        try:
            code, count, is_new = await self._check(
                keys=self._keys(txn.decision),
                args=[len(txn.recipients), len(txn.new_unique), key, int(key in txn.new_unique),
                      int(has_user), limits.org_recipients_per_10min, limits.org_recipients_per_day,
                      limits.user_messages_per_day, limits.user_unique_recipients_per_day],
            )
        except (redis.exceptions.RedisError, OSError, asyncio.TimeoutError) as exc:
            return self._backend_failed(exc)
        if code:
            return self._refuse(txn, _LIMITS[code], count)
        if is_new:
            txn.new_unique.add(key)
        return None

    async def reserve(self, txn: QuotaTxn) -> bytes | None:
        limits = txn.limits
        has_user = txn.decision.user is not None
        keys = sorted({rcpt_key(r) for r in txn.recipients}) if has_user else []
        try:
            result = await self._reserve(
                keys=self._keys(txn.decision),
                args=[len(txn.recipients), int(has_user), limits.org_recipients_per_10min,
                      limits.org_recipients_per_day, limits.user_messages_per_day,
                      limits.user_unique_recipients_per_day, *keys],
            )
        except (redis.exceptions.RedisError, OSError, asyncio.TimeoutError) as exc:
            return self._backend_failed(exc)
        code, count = result[0], result[1]
        if code:
            return self._refuse(txn, _LIMITS[code], count)
        txn.reserved = [k.decode() if isinstance(k, bytes) else k for k in result[2:]]
        return None

    def release(self, txn: QuotaTxn) -> None:
        task = asyncio.ensure_future(self._release_async(txn))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _release_async(self, txn: QuotaTxn) -> None:
        try:
            await self._release(keys=self._keys(txn.decision),
                                args=[len(txn.recipients), int(txn.decision.user is not None), *txn.reserved])
        except (redis.exceptions.RedisError, OSError, asyncio.TimeoutError) as exc:
            log.error("quota: Redis release failed: %s", exc)

    def _refuse(self, txn: QuotaTxn, limit: str, current: int) -> bytes:
        record_refusal(self.refused, txn, limit, current, getattr(txn.limits, limit))
        return self.replies[limit]
