"""Staging a fill in the bucket: its spool file cut into segments, stored in order.

Segments start small (the first byte reaches remote edges early) and grow; each one's
arrival moves the fill's `staged` mark, which only ever covers stored bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import deque

from redis.asyncio import Redis

from shared.leases import Lease, LeaseLost
from shared.oci.digest import Digest
from shared.proxy import protocol
from shared.registry import layout
from shared.registry.blobs import Extent
from shared.registry.storage import ObjectStore

FIRST_SEGMENT = 16 * 1024
MAX_SEGMENT = 8 * 1024 * 1024
FLUSH_INTERVAL = 0.1
SEGMENTS_IN_FLIGHT = 3
# How often a fill whose staging waits looks for edges that need the bucket's segments.
REMOTE_CHECK_SECONDS = 0.05
# The longest staging waits for this machine's clients after the download: until then the
# blob exists only in the spool.
STAGING_DEFERRAL_SECONDS = 30.0


class Stager:
    """Cuts the spool file into segments and stores them in the bucket.

    While only edges on this machine follow the fill (they read the spool), staging waits
    for the download to finish and for the clients on this machine to finish reading
    spools: on a small machine the object store's writes would otherwise take the CPU
    the download and the clients need. Once an edge that cannot read the spool asks for
    the bytes (it marks the fill in Redis), staging runs right behind the download.
    Segments upload up to SEGMENTS_IN_FLIGHT at once (object stores write faster in
    parallel). Each upload waits for the one before it to publish the staged mark, so the
    mark only ever covers stored bytes, in order.
    """

    def __init__(
        self,
        objects: ObjectStore,
        redis: Redis,
        node: str | None,
        lease: Lease,
        digest: Digest,
        fd: int,
        resumed: protocol.ResumePoint,
    ) -> None:
        """Stage the spool file `fd` of `node` (this machine) from where `resumed` left it;
        the segments stored are appended to `resumed.kept`."""
        self._objects = objects
        self._redis = redis
        self._node = node
        self._progress = protocol.FillProgress(redis, digest)
        self._lease = lease
        self._digest = digest
        self._fd = fd
        self._spooled = resumed.offset
        self._segments = resumed.kept
        self._done = False
        self._grew = asyncio.Event()
        self._task = asyncio.create_task(self._run(resumed.staged))

    async def _wait_for_turn(self) -> None:
        """Return when staging should start: at once for a remote follower; otherwise once
        the download is over and no client on this machine is reading a fill's spool (or
        after STAGING_DEFERRAL_SECONDS at most, so the bucket gets the blob in any case)."""
        redis, node = self._redis, self._node
        deferred_since: float | None = None
        while True:
            if await protocol.remote_follower(redis, self._digest):
                return
            if self._done:
                now = time.monotonic()
                deferred_since = deferred_since or now
                if now - deferred_since > STAGING_DEFERRAL_SECONDS:
                    return
                if node is None or not await protocol.spool_readers_active(redis, node):
                    return
            await asyncio.sleep(REMOTE_CHECK_SECONDS)

    def spool(self, chunk: bytes) -> None:
        os.write(self._fd, chunk)
        self._spooled += len(chunk)
        self._grew.set()

    async def check(self) -> None:
        """Surface a failed upload now rather than after the whole download."""
        if self._task.done():
            self._task.result()
        await asyncio.sleep(0)

    async def finish(self) -> None:
        """Wait until everything spooled is staged."""
        self._done = True
        self._grew.set()
        await self._task

    async def cancel(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task

    async def _run(self, start: int) -> None:
        await self._wait_for_turn()
        digest = self._digest
        target = FIRST_SEGMENT if start == 0 else MAX_SEGMENT
        last_cut = time.monotonic()
        writing: deque[asyncio.Task[None]] = deque()

        async def store(key: str, end: int, data: bytes, previous: asyncio.Task[None] | None) -> None:
            await self._objects.put_bytes(key, data)
            if previous is not None:
                await previous
            await self._progress.progressed(staged=end)

        try:
            while True:
                available = self._spooled - start
                if available and (
                    available >= target or self._done or time.monotonic() - last_cut > FLUSH_INTERVAL
                ):
                    if self._lease.lost:
                        raise LeaseLost(f"lost the fill lease for {digest}")
                    data = os.pread(self._fd, min(available, target), start)
                    key = layout.fill_segment(digest, start)
                    self._segments.append(Extent(key, len(data)))
                    start += len(data)
                    previous = writing[-1] if writing else None
                    writing.append(asyncio.create_task(store(key, start, data, previous)))
                    target = min(target * 2, MAX_SEGMENT)
                    last_cut = time.monotonic()
                    while writing and (writing[0].done() or len(writing) >= SEGMENTS_IN_FLIGHT):
                        await writing.popleft()
                    continue
                if self._done:
                    break
                self._grew.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._grew.wait(), FLUSH_INTERVAL)
            while writing:
                await writing.popleft()
        finally:
            for task in writing:
                task.cancel()
            await asyncio.gather(*writing, return_exceptions=True)
