"""Filling one blob from its upstream: staged in segments, resumable, verified, committed.

The fill runs in a worker under a Redis lease. Bytes are staged in the bucket as
segments (small at first so the first client byte leaves early, larger later) and the
progress is published in Redis for the edges that stream the growing fill to clients.
A fill that dies leaves its segments; the next holder rehashes them and asks upstream
for the rest with a Range request. The blob becomes visible under its digest only after
the bytes hash to it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

import structlog
from redis.asyncio import Redis

from shared import layout
from shared.blobs import BlobStore, source_from_chunks
from shared.metrics import DIGEST_MISMATCHES, FILLS_IN_FLIGHT
from shared.oci.digest import Digest
from shared.proxy import state
from shared.proxy.events import CacheEvents
from shared.proxy.leases import Lease, LeaseLost
from shared.repositories import RepositoryStore, project_of
from shared.storage import ObjectStore
from shared.upstream import UpstreamClient, UpstreamFailure

log = structlog.get_logger("fill")

FIRST_SEGMENT = 16 * 1024
MAX_SEGMENT = 8 * 1024 * 1024
FLUSH_INTERVAL = 0.1
SEGMENTS_IN_FLIGHT = 3
LEASE_TTL = 10.0
# Edges still streaming staged segments when the blob is committed get this long to finish.
STAGING_GRACE_MS = 120_000


@dataclass(frozen=True)
class FillDeps:
    objects: ObjectStore
    blobs: BlobStore
    repositories: RepositoryStore
    redis: Redis
    events: CacheEvents


class DigestMismatch(Exception):
    """The upstream's bytes do not hash to the digest asked for; nothing was committed."""


async def _staged_segments(objects: ObjectStore, digest: Digest) -> list[tuple[int, int]]:
    listing = await objects.list_objects(layout.staging(digest))
    return sorted((int(o.key.rsplit("/", 1)[1]), o.size) for o in listing)


async def _resume_point(deps: FillDeps, digest: Digest) -> tuple[int, object]:
    """Rehash the contiguous staged prefix; drop anything after a gap."""
    hasher = digest.hasher()
    offset = 0
    stray = []
    for start, size in await _staged_segments(deps.objects, digest):
        if start != offset or size == 0:
            stray.append(layout.staging_segment(digest, start))
            continue
        async for chunk in deps.objects.stream(layout.staging_segment(digest, start)):
            hasher.update(chunk)
        offset += size
    await deps.objects.delete_many(stray)
    return offset, hasher


async def _staged_bytes(objects: ObjectStore, digest: Digest) -> AsyncIterator[bytes]:
    for start, _size in await _staged_segments(objects, digest):
        async for chunk in objects.stream(layout.staging_segment(digest, start)):
            yield chunk


async def fill_blob(
    deps: FillDeps, upstream: UpstreamClient, name: str, repository: str, digest: Digest
) -> str:
    """Fill `digest` of upstream `repository` into our repository `name`; idempotent.

    Returns what happened: "present", "busy" (another holder), "committed".
    Raises UpstreamFailure (retryable) or DigestMismatch (permanent).
    """
    # Held by this proxy project already: link it. Held only by another project: fetch it
    # anyway, so the upstream proves it serves this content here (the bytes are verified
    # against the stored blob, not written again).
    if await deps.repositories.project_holds(project_of(name), digest):
        size = await deps.blobs.size(digest)
        if size is not None:
            await deps.repositories.link_blob(name, digest, size)
            await state.write_state(deps.redis, digest, status=state.COMMITTED, size=size, staged=size)
            return "present"
    lease = Lease(deps.redis, state.lease_key(digest), ttl=LEASE_TTL)
    if not await lease.acquire():
        return "busy"
    await state.clear_queued(deps.redis, digest)
    FILLS_IN_FLIGHT.labels(upstream.name).inc()
    try:
        async with lease.heartbeat():
            return await _fill_under_lease(deps, upstream, lease, name, repository, digest)
    except UpstreamFailure as failure:
        await state.write_state(
            deps.redis,
            digest,
            status=state.FAILED,
            error_code=failure.to_registry_error("BLOB_UNKNOWN").code,
            error=str(failure),
            retry_after=failure.retry_after,
        )
        raise
    finally:
        FILLS_IN_FLIGHT.labels(upstream.name).dec()


async def _fill_under_lease(
    deps: FillDeps, upstream: UpstreamClient, lease: Lease, name: str, repository: str, digest: Digest
) -> str:
    started = time.monotonic()
    offset, hasher = await _resume_point(deps, digest)
    resumed_from = offset
    await state.write_state(
        deps.redis, digest, status=state.FILLING, staged=offset, error_code=None, error=None
    )
    async with upstream.open_blob(repository, str(digest), offset=offset) as stream:
        total = stream.total_size
        await state.write_state(deps.redis, digest, size=total)
        segment = bytearray()
        target = FIRST_SEGMENT if offset == 0 else MAX_SEGMENT
        last_flush = time.monotonic()
        # Segments upload while the next ones download (up to SEGMENTS_IN_FLIGHT at once:
        # object stores write faster in parallel). Each upload waits for the one before it
        # to publish the staged mark, so the mark only ever covers stored bytes, in order.
        writing: deque[asyncio.Task[None]] = deque()

        async def store(start: int, data: bytes, previous: asyncio.Task[None] | None) -> None:
            await deps.objects.put_bytes(layout.staging_segment(digest, start), data)
            if previous is not None:
                await previous
            await state.write_state(deps.redis, digest, staged=start + len(data))

        async def flush() -> None:
            nonlocal offset, target, last_flush
            if lease.lost:
                raise LeaseLost(f"lost the fill lease for {digest}")
            previous = writing[-1] if writing else None
            writing.append(asyncio.create_task(store(offset, bytes(segment), previous)))
            offset += len(segment)
            segment.clear()
            target = min(target * 2, MAX_SEGMENT)
            last_flush = time.monotonic()
            while writing and (writing[0].done() or len(writing) >= SEGMENTS_IN_FLIGHT):
                await writing.popleft()

        try:
            async for chunk in stream.iter_chunks(256 * 1024):
                hasher.update(chunk)  # type: ignore[attr-defined]
                segment += chunk
                if len(segment) >= target or time.monotonic() - last_flush > FLUSH_INTERVAL:
                    await flush()
            if segment:
                await flush()
            while writing:
                await writing.popleft()
        finally:
            for task in writing:
                task.cancel()
            await asyncio.gather(*writing, return_exceptions=True)

    if total is not None and offset != total:
        raise UpstreamFailure(
            "network", f"upstream sent {offset} of {total} bytes of {digest}", upstream=upstream.name
        )
    actual = f"{digest.algorithm}:{hasher.hexdigest()}"  # type: ignore[attr-defined]
    if actual != str(digest):
        DIGEST_MISMATCHES.labels("upstream").inc()
        log.error("fill_digest_mismatch", digest=str(digest), actual=actual, upstream=upstream.name)
        await state.write_state(
            deps.redis,
            digest,
            status=state.FAILED,
            error_code="UPSTREAM_ERROR",
            error=f"upstream content for {digest} hashes to {actual}",
        )
        await deps.objects.delete_many(
            [layout.staging_segment(digest, s) for s, _ in await _staged_segments(deps.objects, digest)]
        )
        raise DigestMismatch(f"{digest} from {upstream.name} hashed to {actual}")

    # Verified: edges may now release the last byte to their clients.
    await state.write_state(deps.redis, digest, status=state.VERIFIED, staged=offset)
    await deps.blobs.commit(digest, source_from_chunks(_staged_bytes(deps.objects, digest)), offset)
    await deps.repositories.link_blob(name, digest, offset)
    await state.write_state(deps.redis, digest, status=state.COMMITTED)
    await deps.events.purge_staging_later(str(digest), STAGING_GRACE_MS)
    log.info(
        "blob_filled",
        digest=str(digest),
        bytes=offset,
        resumed_from=resumed_from,
        seconds=round(time.monotonic() - started, 3),
        upstream=upstream.name,
    )
    return "committed"


async def purge_staging(deps: FillDeps, digest: Digest) -> int:
    """Remove a committed fill's segments (they are a copy of the blob by then)."""
    if await deps.blobs.size(digest) is None:
        return 0  # not committed: the segments are a resumable fill, keep them
    keys = await deps.objects.list_keys(layout.staging(digest))
    await deps.objects.delete_many(keys)
    return len(keys)
