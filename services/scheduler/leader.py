"""A leader lease in Redis, so running several schedulers fires each trigger once."""

from __future__ import annotations

import enum
import uuid

from redis.asyncio import Redis

# Renew only if we still hold it; compare-and-set in one atomic script.
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


class Lease(enum.Enum):
    """What one `hold` found."""

    TAKEN = "taken"  # it was free (first start, expired, or Redis lost it): ours now
    RENEWED = "renewed"  # ours already, and extended
    ELSEWHERE = "elsewhere"  # another scheduler holds it

    @property
    def ours(self) -> bool:
        return self is not Lease.ELSEWHERE


class LeaderLease:
    def __init__(self, redis: Redis, key: str = "seawall:scheduler:leader", ttl_ms: int = 15_000):
        self._redis = redis
        self._key = key
        self._ttl = ttl_ms
        self.holder = uuid.uuid4().hex

    async def hold(self) -> Lease:
        """Take the lease if free, renew it if ours. Redis errors propagate: the caller
        cannot tell then whether it leads."""
        if await self._redis.set(self._key, self.holder, nx=True, px=self._ttl):
            return Lease.TAKEN
        if await self._redis.eval(_RENEW, 1, self._key, self.holder, str(self._ttl)):
            return Lease.RENEWED
        return Lease.ELSEWHERE

    async def release(self) -> None:
        await self._redis.eval(_RELEASE, 1, self._key, self.holder)
