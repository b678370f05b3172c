"""Upstream bearer tokens shared through Redis by every edge and worker process.

A cold pull asks the upstream for the same repository from two processes: the edge for
the manifest, a worker for the layers. Each used to fetch its own token first, a round
trip to the upstream's token service (auth.docker.io for Docker Hub) on the way to the
first layer's first byte. A token one process got is now offered to the others for as
long as it stays valid. Tokens are keyed by upstream, by the identity it authenticates as
and by scope, and expire in Redis when they expire upstream. Redis failing only means
each process fetches its own again.
"""

from __future__ import annotations

import hashlib
from typing import cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.settings import Upstream

# Shorter than this left, a shared token is not worth taking.
MIN_TTL_SECONDS = 5.0


class SharedTokens:
    def __init__(self, redis: Redis, upstream: Upstream) -> None:
        self._redis = redis
        # Another account (or another registry under the same name after a config change)
        # never sees these tokens.
        identity = f"{upstream.url}\n{upstream.username or ''}".encode()
        self._prefix = f"seawall:upstream-token:{upstream.name}:{hashlib.sha256(identity).hexdigest()[:16]}:"

    async def get(self, scope: str) -> tuple[str, float] | None:
        """(token, seconds it stays valid) another process got for `scope`, if any."""
        key = self._prefix + scope
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.get(key)
                pipe.pttl(key)
                value, ttl_ms = cast(tuple[bytes | None, int], tuple(await pipe.execute()))
        except RedisError:
            return None
        if value is None or ttl_ms < MIN_TTL_SECONDS * 1000:
            return None
        return value.decode(), ttl_ms / 1000

    async def put(self, scope: str, token: str, ttl: float) -> None:
        if ttl < MIN_TTL_SECONDS:
            return
        try:
            await self._redis.set(self._prefix + scope, token, px=int(ttl * 1000))
        except RedisError:
            return
