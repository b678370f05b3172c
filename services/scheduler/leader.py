"""A leader lease in Redis, so running several schedulers fires each trigger once."""

from __future__ import annotations

from redis.asyncio import Redis

from shared.leases import Hold
from shared.leases import Lease as _RedisLease

LEADER_KEY = "seawall:scheduler:leader"
# What one `LeaderLease.hold` found: TAKEN, RENEWED or ELSEWHERE (`ours` for the first two).
Lease = Hold


class LeaderLease:
    def __init__(self, redis: Redis, key: str = LEADER_KEY, ttl_ms: int = 15_000) -> None:
        self._lease = _RedisLease(redis, key, ttl=ttl_ms / 1000)
        self.holder = self._lease.holder

    async def hold(self) -> Lease:
        """Take the lease if free, renew it if ours. Redis errors propagate: the caller
        cannot tell then whether it leads."""
        return await self._lease.hold()

    async def release(self) -> None:
        """Give the lease up; Redis errors propagate (the caller logs that it lapses instead)."""
        await self._lease.release_or_raise()
