"""The rate-limit governor: a cluster-wide token bucket per upstream identity, in Redis.

Docker Hub counts a pull per manifest GET (HEAD and blob GETs are free) within a window
per address or account, and its numbers have changed often; so the bucket starts from
the configured quota and is corrected by every `ratelimit-*` header the upstream sends.
Client pulls may spend the whole bucket; background work (prefetch, warming, replication)
only what lies above the reserve. A 429 closes the identity until it reopens, so no
request that would spend quota is sent in vain. A second bucket caps all requests per
minute (the abuse limit). Each decision is one Lua script: no read-modify-write races
between edges and workers.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum

from redis.asyncio import Redis

from shared.metrics import QUOTA_DENIED, QUOTA_LIMIT, QUOTA_REMAINING
from shared.settings import Quota, Upstream

PRESETS: dict[str, tuple[int, timedelta] | None] = {
    "dockerhub-anonymous": (100, timedelta(hours=6)),
    "dockerhub-personal": (200, timedelta(hours=6)),
    "unlimited": None,
}
# Without Retry-After, a plain-text (abuse) 429 closes the upstream this long.
ABUSE_CLOSE_SECONDS = 60.0
SPEND_HISTORY_SECONDS = 3600.0


class Priority(StrEnum):
    CLIENT = "client"
    BACKGROUND = "background"


_priority: contextvars.ContextVar[Priority] = contextvars.ContextVar("priority", default=Priority.CLIENT)


@contextlib.contextmanager
def background() -> Iterator[None]:
    """Upstream requests made inside spend quota only above the reserve."""
    token = _priority.set(Priority.BACKGROUND)
    try:
        yield
    finally:
        _priority.reset(token)


def current_priority() -> Priority:
    return _priority.get()


def configured_quota(quota: Quota) -> tuple[int, float] | None:
    """(limit, window seconds), or None for an unlimited upstream."""
    if quota.preset is not None:
        preset = PRESETS[quota.preset]
        return None if preset is None else (preset[0], preset[1].total_seconds())
    if quota.limit is None:
        return None
    return quota.limit, quota.window.total_seconds()


# KEYS[1] bucket. ARGV: now, limit, window, cost, floor_fraction.
# The bucket remembers a limit/window learned from the upstream over the configured one.
# Returns {allowed, tokens, limit, wait_seconds} as strings (Lua numbers would be truncated).
_SPEND = """
local now = tonumber(ARGV[1])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts', 'limit', 'window', 'closed_until', 'blocked_until')
local limit = tonumber(b[3]) or tonumber(ARGV[2])
local window = tonumber(b[4]) or tonumber(ARGV[3])
local rate = limit / window
local tokens = tonumber(b[1]) or limit
local ts = tonumber(b[2]) or now
tokens = math.min(limit, tokens + math.max(0, now - ts) * rate)
local cost = tonumber(ARGV[4])
local floor = limit * tonumber(ARGV[5])
local closed = math.max(tonumber(b[5]) or 0, tonumber(b[6]) or 0)
local allowed = 0
local wait = 0
if closed > now then
  wait = closed - now
elseif tokens - cost < floor then
  wait = (cost + floor - tokens) / rate
else
  tokens = tokens - cost
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(window * 2))
return {tostring(allowed), tostring(tokens), tostring(limit), tostring(wait)}
"""

# KEYS[1] bucket. ARGV: now, remaining, limit, window. The upstream's count can only
# lower ours: a header that predates pulls still in flight must not hand them back.
_CORRECT = """
local now = tonumber(ARGV[1])
local limit = tonumber(ARGV[3])
local window = tonumber(ARGV[4])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1]) or limit
local ts = tonumber(b[2]) or now
tokens = math.min(limit, tokens + math.max(0, now - ts) * limit / window, tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now),
  'limit', ARGV[3], 'window', ARGV[4])
redis.call('EXPIRE', KEYS[1], math.ceil(window * 2))
return tostring(tokens)
"""

# KEYS[1] bucket. ARGV: field, until, zero_tokens, now.
_CLOSE = """
local current = tonumber(redis.call('HGET', KEYS[1], ARGV[1])) or 0
if tonumber(ARGV[2]) > current then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], 'tokens', '0', 'ts', ARGV[4])
end
redis.call('EXPIRE', KEYS[1], math.max(60, math.ceil(tonumber(ARGV[2]) - tonumber(ARGV[4])) + 60))
return 1
"""


class QuotaRefused(Exception):
    """The governor keeps this request from the upstream; `retry_after` says for how long."""

    def __init__(self, upstream: str, message: str, retry_after: float) -> None:
        self.upstream = upstream
        self.retry_after = retry_after
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class QuotaStatus:
    upstream: str
    identity: str
    limit: int | None
    window: float | None
    remaining: float | None
    closed_until: float | None
    spent_last_hour: int

    @property
    def runs_out_in(self) -> float | None:
        """Seconds until the bucket is empty at the last hour's pace (None: never)."""
        if self.remaining is None or not self.spent_last_hour or self.window is None or self.limit is None:
            return None
        pace = self.spent_last_hour / SPEND_HISTORY_SECONDS - self.limit / self.window
        return self.remaining / pace if pace > 0 else None


class Governor:
    """The shared buckets of one upstream identity (the upstream plus its credential)."""

    def __init__(self, redis: Redis, upstream: Upstream) -> None:
        self._redis = redis
        self.upstream = upstream.name
        self.identity = upstream.username or "anonymous"
        self._quota = configured_quota(upstream.quota)
        self._reserve = upstream.quota.reserve
        self._rpm = upstream.requests_per_minute
        key = f"seawall:quota:{self.upstream}:{self.identity}"
        self._bucket = key
        self._requests = f"{key}:requests"
        self._spent = f"{key}:spent"

    async def admit(self, *, pull: bool) -> None:
        """Let one request go, or raise QuotaRefused. `pull`: it spends quota (a manifest GET)."""
        now = time.time()
        priority = current_priority()
        if self._rpm > 0:
            # Every request counts against the per-minute cap; an abuse closure (recorded on
            # the quota bucket) stops everything, a quota closure only pulls.
            allowed, _, _, wait = await self._spend(self._requests, now, self._rpm, 60.0, 1, 0.0)
            if not allowed:
                self._deny(priority)
                raise QuotaRefused(self.upstream, f"more than {self._rpm} requests a minute", wait)
        blocked = await self._redis.hget(self._bucket, "blocked_until")
        if blocked is not None and float(blocked) > now:
            self._deny(priority)
            raise QuotaRefused(self.upstream, "closed after an abuse-limit 429", float(blocked) - now)
        if not pull or self._quota is None:
            return
        limit, window = self._quota
        floor = self._reserve if priority is Priority.BACKGROUND else 0.0
        allowed, tokens, learned_limit, wait = await self._spend(self._bucket, now, limit, window, 1, floor)
        QUOTA_REMAINING.labels(self.upstream).set(tokens)
        QUOTA_LIMIT.labels(self.upstream).set(learned_limit)
        if not allowed:
            self._deny(priority)
            reason = "the reserve for client pulls" if floor and tokens >= 1 else "no pulls left"
            raise QuotaRefused(self.upstream, f"pull quota held back ({reason}, {tokens:.0f} left)", wait)
        await self._record_spend(now)

    def _deny(self, priority: Priority) -> None:
        QUOTA_DENIED.labels(self.upstream, priority.value).inc()

    async def _spend(
        self, key: str, now: float, limit: float, window: float, cost: int, floor: float
    ) -> tuple[bool, float, float, float]:
        raw = await self._redis.eval(_SPEND, 1, key, str(now), str(limit), str(window), str(cost), str(floor))
        allowed, tokens, learned, wait = (float(x) for x in raw)
        return allowed == 1, tokens, learned, wait

    async def _record_spend(self, now: float) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zadd(self._spent, {f"{now:.6f}": now})
            pipe.zremrangebyscore(self._spent, 0, now - SPEND_HISTORY_SECONDS)
            pipe.expire(self._spent, int(SPEND_HISTORY_SECONDS) * 2)
            await pipe.execute()

    async def observe(self, remaining: int | None, limit: int | None, window: float | None) -> None:
        """Correct the bucket to what the upstream's `ratelimit-*` headers say."""
        if remaining is None or self._quota is None:
            return
        conf_limit, conf_window = self._quota
        limit = limit or conf_limit
        window = window or conf_window
        tokens = await self._redis.eval(
            _CORRECT, 1, self._bucket, str(time.time()), str(remaining), str(limit), str(window)
        )
        QUOTA_REMAINING.labels(self.upstream).set(float(tokens))
        QUOTA_LIMIT.labels(self.upstream).set(limit)

    async def close(self, *, abuse: bool, retry_after: float | None) -> float:
        """Hold the identity closed after a 429; returns seconds until it reopens.

        Without Retry-After, a quota 429 waits for one pull to refill (the window divided
        by the limit); an abuse 429 waits a minute.
        """
        now = time.time()
        # With Retry-After the upstream said when pulls work again; without it the bucket
        # is emptied and refills at the window's pace.
        empty_bucket = not abuse and retry_after is None
        if retry_after is None:
            if abuse or self._quota is None:
                retry_after = ABUSE_CLOSE_SECONDS
            else:
                limit, window = self._quota
                learned = await self._redis.hmget(self._bucket, "limit", "window")
                limit = int(float(learned[0])) if learned[0] else limit
                window = float(learned[1]) if learned[1] else window
                retry_after = window / limit
        field = "blocked_until" if abuse else "closed_until"
        await self._redis.eval(
            _CLOSE, 1, self._bucket, field, str(now + retry_after), "1" if empty_bucket else "0", str(now)
        )
        if empty_bucket:
            QUOTA_REMAINING.labels(self.upstream).set(0)
        return retry_after

    async def status(self) -> QuotaStatus:
        now = time.time()
        fields = await self._redis.hmget(
            self._bucket, "tokens", "ts", "limit", "window", "closed_until", "blocked_until"
        )
        spent = await self._redis.zcount(self._spent, now - SPEND_HISTORY_SECONDS, now)
        if self._quota is None:
            return QuotaStatus(self.upstream, self.identity, None, None, None, None, spent)
        limit = int(float(fields[2])) if fields[2] else self._quota[0]
        window = float(fields[3]) if fields[3] else self._quota[1]
        remaining: float = float(limit)
        if fields[0] is not None:
            elapsed = max(0.0, now - float(fields[1] or now))
            remaining = min(float(limit), float(fields[0]) + elapsed * limit / window)
        closes = [float(f) for f in fields[4:6] if f is not None and float(f) > now]
        return QuotaStatus(
            self.upstream, self.identity, limit, window, remaining, max(closes) if closes else None, spent
        )
