"""Filling one blob from its upstream: staged in segments, resumable, verified, committed.

The fill runs in a worker under a Redis lease. Bytes are written to a local spool file as
they arrive (edges on the same machine stream it to their clients) and staged from there
in the bucket as segments (small at first so the first byte reaches remote edges early,
larger later); the progress is published in Redis for the edges that stream the growing
fill to clients.
A fill that dies leaves its segments; the next holder rehashes them and asks upstream
for the rest with a Range request. Once the bytes hash to the digest, the segments are
committed as the blob's extents: nothing is written twice.

A blob already stored (brought in by another project) is not staged again: the upstream's
bytes are only hashed, and followers read the stored copy as far as the hash has reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import structlog
from redis.asyncio import Redis

from shared.diskcache import DiskCache
from shared.metrics import DIGEST_MISMATCHES, FILLS_IN_FLIGHT
from shared.oci.digest import Digest
from shared.proxy import protocol
from shared.proxy.events import CacheEvents
from shared.proxy.leases import Lease, LeaseLost
from shared.proxy.segments import Segment, contiguous, staged_segments
from shared.proxy.spool import Spool
from shared.registry import layout
from shared.registry.blobs import BlobStore, Extent
from shared.registry.repositories import RepositoryStore, project_of
from shared.registry.storage import ObjectStore, StorageUnavailable
from shared.upstream import UpstreamClient, UpstreamFailure
from shared.upstream.early import EarlyBlob

log = structlog.get_logger("fill")

FIRST_SEGMENT = 16 * 1024
MAX_SEGMENT = 8 * 1024 * 1024
FLUSH_INTERVAL = 0.1
SEGMENTS_IN_FLIGHT = 3
# How often a fill whose staging waits looks for edges that need the bucket's segments.
REMOTE_CHECK_SECONDS = 0.05
# The longest staging waits for this machine's clients after the download: until then the
# blob exists only in the spool.
STAGING_DEFERRAL_SECONDS = 30.0
LEASE_TTL = 10.0
# How often a prefetch that found a blob being filled by someone else looks whether that
# download is over.
HOLDER_POLL_SECONDS = 0.01


@dataclass(frozen=True)
class FillDeps:
    objects: ObjectStore
    blobs: BlobStore
    repositories: RepositoryStore
    redis: Redis
    events: CacheEvents
    spool: Spool
    # Where a filled blob's spool file goes once committed (None: it is deleted).
    disk_cache: DiskCache | None = None


class DigestMismatch(Exception):
    """The upstream's bytes do not hash to the digest asked for; nothing was committed."""


async def _resume_point(
    deps: FillDeps, digest: Digest, spooled: int, listed: list[Segment]
) -> tuple[list[Extent], int, object]:
    """Where an interrupted fill stands: its staged segments, how far it got, the hash so far.

    The contiguous staged prefix counts. Segments after a gap, or duplicates of a start,
    are left alone rather than deleted: a fill that lost its lease may still commit them
    (each fill commits only the keys it wrote or kept). A spool file left on this machine
    that reaches further counts too: its bytes are rehashed, and the part not staged yet is
    staged again. Otherwise the spool is rewritten from the bucket.
    """
    hasher = digest.hasher()
    kept = [Extent(segment.key, segment.size) for segment in contiguous(listed)]
    staged = sum(extent.size for extent in kept)
    local = os.fstat(spooled).st_size
    if local >= staged:
        position = 0
        while position < local:
            chunk = os.pread(spooled, min(1024 * 1024, local - position), position)
            if not chunk:
                break
            hasher.update(chunk)
            position += len(chunk)
        os.lseek(spooled, position, os.SEEK_SET)
        return kept, position, hasher
    os.ftruncate(spooled, 0)
    os.lseek(spooled, 0, os.SEEK_SET)
    for extent in kept:
        async for chunk in deps.objects.stream(extent.key):
            hasher.update(chunk)
            os.write(spooled, chunk)
    return kept, staged, hasher


async def fill_blob(
    deps: FillDeps,
    upstream: UpstreamClient,
    name: str,
    repository: str,
    digest: Digest,
    downloaded: asyncio.Event | None = None,
) -> str:
    """Fill `digest` of upstream `repository` into our repository `name`; idempotent.

    Returns what happened: "present", "busy" (another holder), "committed". `downloaded`
    is set once the bytes are in and verified, before they are staged and committed; a
    caller that passes it (the prefetch, which downloads one blob at a time) is also made
    to wait, when another fill holds the blob, until that fill's download is over.
    Raises UpstreamFailure (retryable) or DigestMismatch (permanent).
    """
    # Held by this proxy project already: link it. Held only by another project: fetch it
    # anyway, so the upstream proves it serves this content here (the bytes are hashed,
    # not written again).
    held, size = await asyncio.gather(
        deps.repositories.project_holds(project_of(name), digest), deps.blobs.size(digest)
    )
    project = project_of(name)
    if held and size is not None:
        await deps.repositories.link_blob(name, digest, size)
        await protocol.entitle(deps.redis, digest, project)
        await protocol.write_state(deps.redis, digest, status=protocol.COMMITTED, size=size, staged=size)
        return "present"
    lease = Lease(deps.redis, protocol.lease_key(digest), ttl=LEASE_TTL)
    if not await lease.acquire():
        await protocol.clear_queued(deps.redis, digest, project)
        await _join_other_fill(deps, upstream, name, repository, digest, downloaded)
        return "busy"
    await protocol.clear_queued(deps.redis, digest, project)
    # This fill's bytes come from this project's upstream: its clients may follow it.
    await protocol.entitle(deps.redis, digest, project)
    FILLS_IN_FLIGHT.labels(upstream.name).inc()
    try:
        async with lease.heartbeat():
            return await _fill_under_lease(deps, upstream, lease, name, repository, digest, downloaded)
    except UpstreamFailure as failure:
        await protocol.write_state(
            deps.redis,
            digest,
            status=protocol.FAILED,
            error_code=failure.to_registry_error("BLOB_UNKNOWN").code,
            error=str(failure),
            retry_after=failure.retry_after,
        )
        raise
    finally:
        FILLS_IN_FLIGHT.labels(upstream.name).dec()


async def _join_other_fill(
    deps: FillDeps,
    upstream: UpstreamClient,
    name: str,
    repository: str,
    digest: Digest,
    downloaded: asyncio.Event | None,
) -> None:
    """Another fill (perhaps for another project) holds the blob: let this project's clients
    follow it only once this project's own upstream serves the blob in `repository` (a HEAD,
    which costs no pull), then link the blob here when that fill has committed it."""
    project = project_of(name)
    redis = deps.redis
    if not await protocol.entitled(redis, digest, project):
        try:
            size = await upstream.head_blob(repository, str(digest))
        except UpstreamFailure as failure:
            error = failure.to_registry_error("BLOB_UNKNOWN")
            await protocol.refuse(redis, digest, project, error.code, error.message)
            raise
        if size is None:
            message = f"{digest} is not in {repository} on upstream {upstream.name}"
            await protocol.refuse(redis, digest, project, "BLOB_UNKNOWN", message)
            raise UpstreamFailure("not_found", message, upstream=upstream.name, status=404)
        await protocol.entitle(redis, digest, project)
    if downloaded is not None:
        await _holder_downloaded(redis, digest)
        downloaded.set()
    # The holder is another process: only its lease says when it is done.
    while await protocol.being_filled(redis, digest):  # noqa: ASYNC110
        await asyncio.sleep(HOLDER_POLL_SECONDS * 10)
    stored = await deps.blobs.size(digest)
    if stored is not None:
        await deps.repositories.link_blob(name, digest, stored)


async def _holder_downloaded(redis: Redis, digest: Digest) -> None:
    """Return once the fill holding `digest` has its bytes in (or has failed, or its holder
    is gone): the next download then does not split the upstream link with this one, which
    a client reading the image in order needs first."""
    while await protocol.being_filled(redis, digest):
        if (await protocol.read_state(redis, digest)).status in protocol.DOWNLOAD_OVER:
            return
        await asyncio.sleep(HOLDER_POLL_SECONDS)


async def _fill_under_lease(
    deps: FillDeps,
    upstream: UpstreamClient,
    lease: Lease,
    name: str,
    repository: str,
    digest: Digest,
    downloaded: asyncio.Event | None,
) -> str:
    started = time.monotonic()
    # Asked together: is it stored already, what did an interrupted fill stage, and the
    # upstream for the whole blob (what nearly every fill then reads).
    async with EarlyBlob(upstream, repository, str(digest)) as early:
        # A stored copy counts only if it is sound: an older one is re-hashed first.
        stored, listed = await asyncio.gather(
            deps.blobs.held_soundly(digest), staged_segments(deps.objects, digest)
        )
        if stored:
            offset = await _verify_only(deps, upstream, early, digest)
            resumed_from = 0
        else:
            offset, resumed_from = await _fill_and_stage(
                deps, upstream, early, lease, digest, listed, downloaded
            )
    await deps.repositories.link_blob(name, digest, offset)
    await protocol.write_state(deps.redis, digest, status=protocol.COMMITTED)
    log.info(
        "blob_filled",
        digest=str(digest),
        bytes=offset,
        resumed_from=resumed_from,
        seconds=round(time.monotonic() - started, 3),
        upstream=upstream.name,
    )
    return "committed"


async def _verify_only(deps: FillDeps, upstream: UpstreamClient, early: EarlyBlob, digest: Digest) -> int:
    """Hash what the upstream serves for a blob stored already; followers read the stored copy."""
    await protocol.write_state(
        deps.redis, digest, status=protocol.FILLING, staged=0, source=protocol.FROM_BLOB, spool=None
    )
    hasher = digest.hasher()
    offset = 0
    async with early.open() as stream:
        await protocol.write_state(deps.redis, digest, size=stream.total_size)
        async for chunk in stream.iter_chunks(256 * 1024):
            hasher.update(chunk)
            offset += len(chunk)
            await protocol.write_state(deps.redis, digest, staged=offset)
        await _check(deps, upstream, digest, hasher, offset, stream.total_size, [])
    await protocol.write_state(deps.redis, digest, status=protocol.VERIFIED)
    return offset


async def _fill_and_stage(
    deps: FillDeps,
    upstream: UpstreamClient,
    early: EarlyBlob,
    lease: Lease,
    digest: Digest,
    listed: list[Segment],
    downloaded: asyncio.Event | None,
) -> tuple[int, int]:
    """Fetch into the spool and the bucket's segments, verify, commit; (size, resumed from)."""
    path = deps.spool.path(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    spooled = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        segments, offset, hasher = await _resume_point(deps, digest, spooled, listed)
        resumed_from = offset
        staged = sum(e.size for e in segments)
        await protocol.write_state(
            deps.redis,
            digest,
            status=protocol.FILLING,
            staged=staged,
            source=protocol.FROM_SEGMENTS,
            spool=deps.spool.node or "",
            error_code=None,
            error=None,
        )
        stager = _Stager(deps, lease, digest, spooled, staged, offset, segments)
        try:
            async with early.open(offset) as stream:
                await protocol.write_state(deps.redis, digest, size=stream.total_size)
                async for chunk in stream.iter_chunks(256 * 1024):
                    if lease.lost:
                        raise LeaseLost(f"lost the fill lease for {digest}")
                    hasher.update(chunk)  # type: ignore[attr-defined]
                    stager.spool(chunk)
                    offset += len(chunk)
                    await stager.check()
                total = stream.total_size
            await _check(deps, upstream, digest, hasher, offset, total, segments, stager)
            # Verified: edges may now release the last byte to their clients (the ones
            # reading the spool at once, the others when the last segment is staged).
            await protocol.write_state(deps.redis, digest, status=protocol.VERIFIED)
            log.info("blob_downloaded", digest=str(digest), bytes=offset, resumed_from=resumed_from)
            if downloaded is not None:
                downloaded.set()
            await stager.finish()
        except UpstreamFailure:
            # What did arrive is staged, for the fill that resumes (best effort: the
            # upstream's failure is the one to report).
            with contextlib.suppress(StorageUnavailable, LeaseLost):
                await stager.finish()
            raise
        finally:
            await stager.cancel()
    finally:
        os.close(spooled)
    if not await deps.blobs.commit_extents(digest, segments):
        await deps.objects.delete_many(e.key for e in segments)  # committed meanwhile
    _keep_spooled(deps, digest, path, offset)
    return offset, resumed_from


def _keep_spooled(deps: FillDeps, digest: Digest, path: Path, size: int) -> None:
    """Hand the committed blob's spool file to the disk tier, or delete it."""
    if deps.disk_cache is None:
        path.unlink(missing_ok=True)
        return
    try:
        deps.disk_cache.adopt(digest, path, size)
    except (OSError, ValueError) as exc:
        log.warning("spool_not_kept", digest=str(digest), reason=str(exc))
        path.unlink(missing_ok=True)


async def _check(
    deps: FillDeps,
    upstream: UpstreamClient,
    digest: Digest,
    hasher: object,
    offset: int,
    total: int | None,
    segments: list[Extent],
    stager: _Stager | None = None,
) -> None:
    """Raise if the upstream sent a short body or bytes that do not hash to the digest."""
    if total is not None and offset != total:
        raise UpstreamFailure(
            "network", f"upstream sent {offset} of {total} bytes of {digest}", upstream=upstream.name
        )
    actual = f"{digest.algorithm}:{hasher.hexdigest()}"  # type: ignore[attr-defined]
    if actual == str(digest):
        return
    DIGEST_MISMATCHES.labels("upstream").inc()
    log.error("fill_digest_mismatch", digest=str(digest), actual=actual, upstream=upstream.name)
    await protocol.write_state(
        deps.redis,
        digest,
        status=protocol.FAILED,
        error_code="UPSTREAM_ERROR",
        error=f"upstream content for {digest} hashes to {actual}",
    )
    if stager is not None:
        await stager.cancel()
    await deps.objects.delete_many(e.key for e in segments)
    deps.spool.path(digest).unlink(missing_ok=True)
    raise DigestMismatch(f"{digest} from {upstream.name} hashed to {actual}")


class _Stager:
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
        deps: FillDeps,
        lease: Lease,
        digest: Digest,
        fd: int,
        staged: int,
        spooled: int,
        segments: list[Extent],
    ) -> None:
        self._deps = deps
        self._lease = lease
        self._digest = digest
        self._fd = fd
        self._spooled = spooled
        self._segments = segments
        self._done = False
        self._grew = asyncio.Event()
        self._task = asyncio.create_task(self._run(staged))

    async def _wait_for_turn(self) -> None:
        """Return when staging should start: at once for a remote follower; otherwise once
        the download is over and no client on this machine is reading a fill's spool (or
        after STAGING_DEFERRAL_SECONDS at most, so the bucket gets the blob in any case)."""
        redis, node = self._deps.redis, self._deps.spool.node
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
            await self._deps.objects.put_bytes(key, data)
            if previous is not None:
                await previous
            await protocol.write_state(self._deps.redis, digest, staged=end)

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
