"""Cache-miss events published to the workers: blob fills wanted now, layers to prefetch.

Each is deduplicated in Redis first (see shared/proxy/protocol.py), then published as a
job (shared/jobs.py): the edge needs no worker code, only a broker.
"""

from __future__ import annotations

import asyncio

from dramatiq.brokers.redis import RedisBroker
from redis.asyncio import Redis

from shared import jobs
from shared.oci.digest import Digest
from shared.proxy import protocol
from shared.routing import Target


class CacheEvents:
    def __init__(self, broker: RedisBroker) -> None:
        self._broker = broker

    async def _publish(self, job: jobs.Job, *args: object) -> None:
        # The broker's client is synchronous; keep the event loop free while it talks to Redis.
        await asyncio.to_thread(jobs.enqueue, self._broker, job, args)

    async def fill_wanted(self, project: str, repository: str, digest: str) -> None:
        """A client is waiting for this blob: the cache-miss event, published as it is."""
        await self._publish(jobs.FILL, project, repository, digest)

    async def eviction_wanted(self, project: str) -> None:
        """The project's cache nears its cap (shared/lifecycle/growth.py): evict it now."""
        await self._publish(jobs.EVICT_CACHE, project, 0)

    async def want(self, redis: Redis, target: Target, digest: Digest) -> None:
        """Ask for a fill a client waits for, unless one is running or was asked for moments ago."""
        if await protocol.request_fill(redis, digest, target.project.name, protocol.CLIENT):
            await self.fill_wanted(target.project.name, target.path, str(digest))

    async def want_prefetched(self, redis: Redis, target: Target, digests: list[Digest]) -> None:
        """Ask for the blobs of a new image in the background, fetched one after another in
        the order given.

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
            await self._publish(jobs.PREFETCH, target.project.name, target.path, wanted)

    def close(self) -> None:
        self._broker.close()
