"""Cache events published to the workers: blob fills wanted now, layers to prefetch.

Messages name an actor and carry only primitives (project, repository, digest), so the
edge needs no worker code, only the broker.
"""

from __future__ import annotations

import asyncio
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from redis import Redis as BlockingRedis
from redis.asyncio import Redis

from shared.oci.digest import Digest
from shared.proxy import protocol
from shared.routing import Target

FILL_ACTOR = "fill_blob"
FILL_QUEUE = "fills"
PREFETCH_ACTOR = "prefetch_blobs"
PREFETCH_QUEUE = "prefetch"
WARM_ACTOR = "warm_tag"
MAINTENANCE_QUEUE = "maintenance"


# Idle workers block on a queue's wake list (see workers/broker.py); publishing a message
# the workers should start at once also pushes a token there. Bounded and short-lived, so
# tokens nobody took (no worker running) do not pile up.
WAKE_TOKENS = 16
WAKE_TTL_SECONDS = 10


def wake_key(queue: str) -> str:
    return f"seawall:wake:{queue}"


def make_broker(redis_url: str, timeout: float | None = None) -> RedisBroker:
    """A broker for publishing only (the workers build theirs with middleware).

    `timeout` bounds connecting and each reply (the edge passes `redis_timeout`, so a
    stalled Redis fails a cache miss with a RedisError instead of holding it).
    """
    if timeout is None:
        return RedisBroker(url=redis_url, namespace="seawall")  # type: ignore[no-untyped-call]
    client = BlockingRedis.from_url(redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
    return RedisBroker(client=client, namespace="seawall")  # type: ignore[no-untyped-call]


class CacheEvents:
    def __init__(self, broker: RedisBroker) -> None:
        self._broker = broker

    async def _send(self, queue: str, actor: str, args: tuple[Any, ...], delay_ms: int | None = None) -> None:
        message: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=queue, actor_name=actor, args=args, kwargs={}, options={}
        )
        # The broker's client is synchronous; keep the event loop free while it talks to Redis.
        await asyncio.to_thread(self._enqueue, message, delay_ms)

    def _enqueue(self, message: dramatiq.Message[Any], delay_ms: int | None) -> None:
        self._broker.enqueue(message, delay=delay_ms)
        if delay_ms is None:
            key = wake_key(message.queue_name)
            with self._broker.client.pipeline(transaction=False) as pipe:
                pipe.lpush(key, "1")
                pipe.ltrim(key, 0, WAKE_TOKENS - 1)
                pipe.expire(key, WAKE_TTL_SECONDS)
                pipe.execute()

    async def fill_wanted(self, project: str, repository: str, digest: str) -> None:
        """A client is waiting for this blob: the cache-miss event."""
        await self._send(FILL_QUEUE, FILL_ACTOR, (project, repository, digest))

    async def prefetch(self, project: str, repository: str, digests: list[str]) -> None:
        """A new manifest names these blobs; fetch them, one after another, before a client asks."""
        await self._send(PREFETCH_QUEUE, PREFETCH_ACTOR, (project, repository, digests))

    async def want(self, redis: Redis, target: Target, digest: Digest) -> None:
        """Ask for a fill a client waits for, unless one is running or was asked for moments ago."""
        if await protocol.request_fill(redis, digest, target.project.name, protocol.CLIENT):
            await self.fill_wanted(target.project.name, target.path, str(digest))

    async def want_prefetched(self, redis: Redis, target: Target, digests: list[Digest]) -> None:
        """Ask for the blobs of a new image in the background, in the order given.

        A blob some fill is downloading already stays in the list, so the prefetch waits
        for it before starting the next one; a blob another prefetch was given moments
        ago is left to that one.
        """
        wanted: list[str] = []
        new = False
        for digest in digests:
            if await protocol.request_fill(redis, digest, target.project.name, protocol.PREFETCH):
                wanted.append(str(digest))
                new = True
            elif await protocol.being_filled(redis, digest):
                wanted.append(str(digest))
        if new:
            await self.prefetch(target.project.name, target.path, wanted)

    def close(self) -> None:
        self._broker.close()
