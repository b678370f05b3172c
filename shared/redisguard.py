"""The edge's Redis client: every call bounded in time, and Redis skipped for a moment once it failed.

Redis holds nothing the edge cannot do without for a while (caches, freshness markers,
quota buckets, fill state), so a stalled or unreachable Redis must cost a request at most
one `redis_timeout`, not one per call, and not a hang. `GuardedRedis` sends every command
and pipeline through one `Breaker`: after a call fails with a connection error or a
timeout, further calls fail at once with `RedisUnavailable` (a `redis.exceptions
.ConnectionError`, so every `except RedisError` fallback takes it) for `PAUSE_SECONDS`;
then a single call probes Redis again while the others keep skipping it, and its success
closes the breaker. Callers therefore need no Redis-specific code beyond the fallbacks
they already have: the repository cache reads the bucket, the manifest cache serves what
it holds, the governor (whose calls fail too) keeps the upstream unasked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

T = TypeVar("T")
log = structlog.get_logger("redis")

# How long Redis is skipped after a failed call before one call tries it again.
PAUSE_SECONDS = 3.0
# Idle pooled connections are checked with a PING before use after this long.
HEALTH_CHECK_SECONDS = 30


class RedisUnavailable(RedisConnectionError):
    """Redis failed moments ago: the call was not sent."""


class Breaker:
    """Closed while Redis answers; open for `pause` seconds after a failure; then one probe."""

    def __init__(self, pause: float = PAUSE_SECONDS) -> None:
        self.pause = pause
        self._tripped = False
        self._retry_at = 0.0
        self._probing = False
        self._reason = ""

    @property
    def away(self) -> bool:
        """Whether Redis failed and has not answered since."""
        return self._tripped

    def before_call(self) -> bool:
        """Raise RedisUnavailable while Redis is skipped; True when this call is the probe."""
        if not self._tripped:
            return False
        now = time.monotonic()
        if self._probing or now < self._retry_at:
            wait = max(self._retry_at - now, 0.0)
            raise RedisUnavailable(f"Redis is unavailable ({self._reason}); retried in {wait:.1f}s")
        self._probing = True
        return True

    def succeeded(self, probe: bool) -> None:
        if probe:
            self._probing = False
        if self._tripped:
            self._tripped = False
            log.info("redis_available")

    def failed(self, probe: bool, reason: str) -> None:
        if probe:
            self._probing = False
        if not self._tripped:
            log.warning("redis_unavailable", reason=reason, pause=self.pause)
        self._tripped = True
        self._reason = reason[:200]
        self._retry_at = time.monotonic() + self.pause

    def abandoned(self, probe: bool) -> None:
        """The call was cancelled before Redis said anything: the next one probes instead."""
        if probe:
            self._probing = False

    async def call(self, send: Callable[[], Awaitable[T]], within: float) -> T:
        """Run one Redis exchange under the breaker, within `within` seconds whatever the client does."""
        probe = self.before_call()
        try:
            async with asyncio.timeout(within):
                result = await send()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            self.failed(probe, str(exc) or type(exc).__name__)
            if isinstance(exc, RedisConnectionError | RedisTimeoutError):
                raise
            # The overall deadline (asyncio's TimeoutError) or a socket error the client
            # did not wrap: callers catch RedisError, so that is what they get.
            raise RedisTimeoutError(f"Redis did not answer within {within:.1f}s: {exc!r}") from exc
        except RedisError:
            # An error reply (a failing script, a wrong type): Redis is there.
            self.succeeded(probe)
            raise
        except BaseException:
            # Cancelled before Redis said anything either way.
            self.abandoned(probe)
            raise
        self.succeeded(probe)
        return result


class GuardedPipeline(Pipeline):
    """A pipeline whose `execute` goes through the client's breaker."""

    breaker: Breaker
    deadline: float

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        send = super().execute
        return await self.breaker.call(lambda: send(raise_on_error), self.deadline)


class GuardedRedis(Redis):
    """`redis.asyncio.Redis` whose calls share one breaker and one overall deadline."""

    def __init__(self, pool: ConnectionPool, breaker: Breaker, deadline: float) -> None:
        super().__init__(connection_pool=pool)
        # The pool is this client's alone: `aclose()` closes it too.
        self.auto_close_connection_pool = True
        self.breaker = breaker
        self.deadline = deadline

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        send: Callable[..., Awaitable[Any]] = super().execute_command
        return await self.breaker.call(lambda: send(*args, **options), self.deadline)

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> GuardedPipeline:
        pipe = GuardedPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe.breaker = self.breaker
        pipe.deadline = self.deadline
        return pipe


def connect(url: str, timeout: float, *, pause: float = PAUSE_SECONDS) -> GuardedRedis:
    """A client for request paths: connect and each reply bounded by `timeout`, no retries.

    A retry would only double the wait on a stalled Redis; a connection that died while
    idle is found by the health check before use. Every call as a whole (connecting, the
    health check, the reply) is bounded by twice `timeout`.
    """
    pool = ConnectionPool.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=HEALTH_CHECK_SECONDS,
    )
    return GuardedRedis(pool, Breaker(pause), deadline=2 * timeout)
