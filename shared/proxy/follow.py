"""Streaming a blob to a client while a worker fills it (any edge, any replica).

The follower reads the fill's progress from Redis and the bytes from the worker's spool
file when it shares the worker's disk, from the staged segments in the bucket otherwise,
so the first byte leaves soon after the upstream's first byte. The last byte is withheld
until the worker has verified the digest: a client never receives a complete body of a
blob that turned out to be wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from redis.asyncio import Redis

from shared.metrics import FILL_BYTES_FOLLOWED
from shared.oci.digest import Digest
from shared.oci.errors import RegistryError
from shared.proxy import protocol
from shared.proxy.protocol import (
    REREQUEST_SECONDS,
    SPOOL_READERS_REFRESH_SECONDS,
    FillProgress,
    FillSource,
    FillState,
    FillStatus,
    Segment,
)
from shared.proxy.spool import Spool
from shared.registry.blobs import BlobStore
from shared.registry.repositories import RepositoryStore
from shared.registry.storage import ObjectMissing, ObjectStore

# Waiting polls Redis quickly at first (a fill's first bytes come within milliseconds),
# then backs off to POLL_SECONDS.
FIRST_POLL_SECONDS = 0.001
FAST_POLL_SECONDS = 0.002
FAST_POLL_FOR_SECONDS = 0.1
POLL_SECONDS = 0.01
SPOOL_CHUNK = 1024 * 1024


def failure_error(fill: FillState, digest: Digest) -> RegistryError:
    code = fill.error_code or "UPSTREAM_ERROR"
    headers = {}
    if fill.retry_after:
        headers["Retry-After"] = str(max(1, round(fill.retry_after)))
    return RegistryError(
        code, fill.error or f"filling {digest} failed", headers=headers, detail={"digest": str(digest)}
    )


class _Poll:
    """How long to wait before looking again: every 1-2 ms for the first 100 ms without
    progress (a fill's next bytes usually come within that), then backing off to 10 ms."""

    def __init__(self) -> None:
        self.progress()

    def progress(self) -> None:
        self._since = time.monotonic()
        self._pause = FIRST_POLL_SECONDS

    async def wait(self) -> None:
        await asyncio.sleep(self._pause)
        fast = time.monotonic() - self._since < FAST_POLL_FOR_SECONDS
        self._pause = min(self._pause * 2, FAST_POLL_SECONDS if fast else POLL_SECONDS)


class _Listing:
    """The staged segments of a fill, as last listed."""

    def __init__(self) -> None:
        self.segments: list[Segment] = []

    def covers(self, end: int) -> bool:
        return bool(self.segments) and max(s.end for s in self.segments) >= end


class _SpoolFile:
    """The worker's spool file of one fill, opened once the fill is seen on this machine."""

    def __init__(self, spool: Spool | None, digest: Digest) -> None:
        self._spool = spool
        self._digest = digest
        self._fd: int | None = None

    def fd(self, fill: FillState) -> int | None:
        if self._fd is None and self._spool is not None and self._spool.is_local(fill.spool):
            with contextlib.suppress(FileNotFoundError):
                self._fd = os.open(self._spool.path(self._digest), os.O_RDONLY | os.O_CLOEXEC)
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class BlobFollower:
    def __init__(
        self,
        objects: ObjectStore,
        blobs: BlobStore,
        repositories: RepositoryStore,
        redis: Redis,
        spool: Spool | None = None,
    ) -> None:
        self._objects = objects
        self._blobs = blobs
        self._repositories = repositories
        self._redis = redis
        self._spool = spool
        self._readers_marked = 0.0

    async def _committed_size(self, project: str, digest: Digest) -> int | None:
        """The blob's size once this project holds it (a copy held elsewhere does not count,
        unless this project's upstream vouched for it and its fill's link is on its way)."""
        if not await self._repositories.project_holds(project, digest) and not await protocol.entitled(
            self._redis, digest, project
        ):
            return None
        return await self._blobs.size(digest)

    async def _may_follow(self, project: str, digest: Digest) -> bool:
        """Whether this project's clients may read the running fill's bytes: the fill is
        for this project, or this project's upstream vouched for the blob, or the project
        holds the stored copy (a fill for another project is only hashing what it serves).
        Otherwise raise this project's refusal, if its upstream gave one."""
        if await protocol.entitled(self._redis, digest, project):
            return True
        if await self._repositories.project_holds(project, digest):
            return True
        refused = await protocol.refusal(self._redis, digest, project)
        if refused is not None:
            raise RegistryError(refused[0], refused[1], detail={"digest": str(digest)})
        return False

    async def wait_for_size(
        self, project: str, digest: Digest, rerequest: Callable[[], Awaitable[None]], within: float
    ) -> int:
        """Wait until the filling worker knows the blob's size (it has the upstream's headers)."""
        deadline = time.monotonic() + within
        next_rerequest = time.monotonic() + REREQUEST_SECONDS
        poll = _Poll()
        progress = FillProgress(self._redis, digest)
        while True:
            fill = await progress.read()
            if fill.status == FillStatus.FAILED:
                raise failure_error(fill, digest)
            if fill.size is not None and await self._may_follow(project, digest):
                return fill.size
            if fill.status in (None, FillStatus.COMMITTED):
                size = await self._committed_size(project, digest)
                if size is not None:
                    return size
            now = time.monotonic()
            if now > deadline:
                raise RegistryError("UPSTREAM_TIMEOUT", f"no fill of {digest} started in {within:.0f}s")
            if now > next_rerequest:
                await rerequest()
                next_rerequest = now + REREQUEST_SECONDS
            await poll.wait()

    async def follow(
        self,
        project: str,
        digest: Digest,
        start: int,
        end: int,
        size: int,
        rerequest: Callable[[], Awaitable[None]],
        stall_timeout: float,
    ) -> AsyncIterator[bytes]:
        """Yield bytes [start, end) of the blob as the fill makes them available."""
        spooled = _SpoolFile(self._spool, digest)
        listing = _Listing()
        offset = start
        last_progress = time.monotonic()
        next_rerequest = last_progress + REREQUEST_SECONDS
        poll = _Poll()
        marked_remote = False
        allowed = False
        progress = FillProgress(self._redis, digest)
        try:
            while offset < end:
                fill = await progress.read()
                if (
                    fill.status in (None, FillStatus.COMMITTED)
                    and await self._committed_size(project, digest) is not None
                ):
                    async for chunk in self._blobs.stream(digest, offset, end - offset):
                        yield chunk
                    return
                if fill.status == FillStatus.FAILED:
                    raise failure_error(fill, digest)
                allowed = allowed or await self._may_follow(project, digest)
                filling = allowed and fill.status in (FillStatus.FILLING, FillStatus.VERIFIED)
                fd = spooled.fd(fill) if filling else None
                if filling and fd is None and fill.source == FillSource.SEGMENTS and not marked_remote:
                    await protocol.mark_remote_follower(self._redis, digest)
                    marked_remote = True
                # Every byte but the last may go before verification; the last one only after.
                limit = end if fill.status == FillStatus.VERIFIED else min(end, size - 1)
                before = offset
                available = self._available(digest, fill, fd, offset, limit, listing) if allowed else None
                async for source, chunk in available or _nothing():
                    offset += len(chunk)
                    FILL_BYTES_FOLLOWED.labels(source).inc(len(chunk))
                    yield chunk
                if offset > before:
                    last_progress = time.monotonic()
                    poll.progress()
                    continue
                now = time.monotonic()
                if now - last_progress > stall_timeout:
                    raise RegistryError(
                        "UPSTREAM_TIMEOUT", f"the fill of {digest} made no progress for {stall_timeout:.0f}s"
                    )
                if now > next_rerequest:
                    # The holder may have died: its lease lapses and a new fill resumes it.
                    await rerequest()
                    next_rerequest = now + REREQUEST_SECONDS
                    marked_remote = False  # renew the mark, which expires
                await poll.wait()
        finally:
            spooled.close()

    async def _available(
        self,
        digest: Digest,
        fill: FillState,
        fd: int | None,
        offset: int,
        limit: int,
        listing: _Listing,
    ) -> AsyncIterator[tuple[str, bytes]]:
        """The bytes after `offset` (up to `limit`) the fill has made available, by source."""
        if fd is not None:
            # The spool grows as the worker writes; every byte in it was hashed.
            releasable = min(os.fstat(fd).st_size, limit)
            while offset < releasable:
                data = os.pread(fd, min(SPOOL_CHUNK, releasable - offset), offset)
                if not data:
                    return  # truncated by a fill that resumed: it is written again
                offset += len(data)
                yield "spool", data
                await self._spool_reading()  # kept fresh while a slow client takes its time
            return
        releasable = min(fill.staged, limit)
        if releasable <= offset:
            return
        if fill.source == FillSource.BLOB:
            async for chunk in self._blobs.stream(digest, offset, releasable - offset):
                yield "blob", chunk
            return
        if not listing.covers(releasable):
            listing.segments = await protocol.staged_segments(self._objects, digest)
        before = offset
        async for chunk in self._read_staged(listing.segments, offset, releasable):
            offset += len(chunk)
            yield "segments", chunk
        if offset == before:
            listing.segments = []  # the listing was stale or the segments deleted: look again

    async def _spool_reading(self) -> None:
        """Tell the workers a client here reads a spool (at most every 250 ms per edge)."""
        now = time.monotonic()
        node = self._spool.node if self._spool else None
        if node is not None and now - self._readers_marked > SPOOL_READERS_REFRESH_SECONDS:
            self._readers_marked = now
            await protocol.mark_spool_readers(self._redis, node)

    async def _read_staged(self, segments: list[Segment], offset: int, until: int) -> AsyncIterator[bytes]:
        for segment in segments:
            if segment.end <= offset or segment.start >= until:
                continue  # before what is needed, or a second attempt at bytes already read
            if segment.start > offset:
                return  # a gap: the listing is behind; read it again next round
            lo, hi = offset - segment.start, min(segment.end, until) - segment.start
            try:
                async for chunk in self._objects.stream(segment.key, lo, hi - lo):
                    offset += len(chunk)
                    yield chunk
            except ObjectMissing:
                return  # deleted (a fill that failed): the caller reads the state again


async def _nothing() -> AsyncIterator[tuple[str, bytes]]:
    return
    yield ("", b"")
