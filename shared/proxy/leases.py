"""Redis leases with heartbeat: one holder cluster-wide, replaced when its heartbeat stops."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

from redis.asyncio import Redis
from redis.exceptions import RedisError

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

    async def release(self) -> None:
        """Give the lease up; if Redis cannot be told, it lapses by its TTL instead."""
        with contextlib.suppress(RedisError):
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
