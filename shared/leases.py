"""Redis leases: one holder cluster-wide, replaced when it stops renewing.

Used two ways: a job (a fill, a scrub, a manifest fetch) acquires the lease, keeps it with
a heartbeat while it works and releases it; a standing role (the scheduler's leader) takes
or renews it in one call each time it checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import uuid
from collections.abc import AsyncIterator

from redis.asyncio import Redis
from redis.exceptions import RedisError

# Renew or release only if we still hold it: compare-and-set in one atomic script.
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class LeaseLost(RuntimeError):
    """Another holder took the lease after ours expired; stop working on it."""


class Hold(enum.Enum):
    """What one `Lease.hold` found."""

    TAKEN = "taken"  # it was free (first start, expired, or Redis lost it): ours now
    RENEWED = "renewed"  # ours already, and extended
    ELSEWHERE = "elsewhere"  # another holder has it

    @property
    def ours(self) -> bool:
        return self is not Hold.ELSEWHERE


class Lease:
    def __init__(self, redis: Redis, key: str, ttl: float = 10.0) -> None:
        self.redis = redis
        self.key = key
        self.ttl_ms = int(ttl * 1000)
        self.holder = uuid.uuid4().hex
        self.lost = False

    async def acquire(self) -> bool:
        return bool(await self.redis.set(self.key, self.holder, nx=True, px=self.ttl_ms))

    async def renew(self) -> bool:
        return bool(await self.redis.eval(_RENEW, 1, self.key, self.holder, str(self.ttl_ms)))

    async def hold(self) -> Hold:
        """Take the lease if free, renew it if ours. Redis errors propagate: the caller
        cannot tell then whether it holds the lease."""
        if await self.acquire():
            return Hold.TAKEN
        if await self.renew():
            return Hold.RENEWED
        return Hold.ELSEWHERE

    async def release(self) -> None:
        """Give the lease up; if Redis cannot be told, it lapses by its TTL instead."""
        with contextlib.suppress(RedisError):
            await self.release_or_raise()

    async def release_or_raise(self) -> None:
        """Give the lease up; Redis errors propagate, for a caller that reports them."""
        await self.redis.eval(_RELEASE, 1, self.key, self.holder)

    @contextlib.asynccontextmanager
    async def heartbeat(self) -> AsyncIterator[Lease]:
        """Keep renewing while the body runs; `lost` turns True if renewal ever fails."""

        async def beat() -> None:
            while True:
                await asyncio.sleep(self.ttl_ms / 3000)
                try:
                    renewed = await self.renew()
                except RedisError:
                    renewed = False  # unprovable is as good as lost: another may take it
                if not renewed:
                    self.lost = True
                    return

        task = asyncio.create_task(beat())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self.release()
