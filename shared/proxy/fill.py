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

A project with several upstreams fills from the first that serves; when one fails midway,
the next resumes from what was staged (shared/proxy/upstreams.py says which failures move
on).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import structlog
from redis.asyncio import Redis

from shared.diskcache import DiskCache
from shared.leases import Lease, LeaseLost
from shared.metrics import DIGEST_MISMATCHES, FILLS_IN_FLIGHT
from shared.oci.digest import Digest
from shared.proxy import protocol
from shared.proxy.events import CacheEvents
from shared.proxy.protocol import FillProgress, FillSource, Segment
from shared.proxy.spool import Spool
from shared.proxy.staging import Stager
from shared.proxy.upstreams import UpstreamChain
from shared.registry.blobs import BlobStore, Extent
from shared.registry.repositories import RepositoryStore, project_of
from shared.registry.storage import ObjectStore, StorageUnavailable
from shared.upstream import UpstreamClient, UpstreamFailure
from shared.upstream.early import EarlyBlob

log = structlog.get_logger("fill")

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


async def fill_blob(
    deps: FillDeps,
    upstreams: UpstreamChain,
    name: str,
    repository: str,
    digest: Digest,
    downloaded: asyncio.Event | None = None,
) -> str:
    """Fill `digest` of upstream `repository` into our repository `name` from the first of
    `upstreams` that serves it; idempotent.

    Returns what happened: "present", "busy" (another holder), "committed". `downloaded`
    is set once the bytes are in and verified, before they are staged and committed; a
    caller that passes it (the prefetch, which downloads one blob at a time) is also made
    to wait, when another fill holds the blob, until that fill's download is over.
    Raises UpstreamFailure (retryable) or DigestMismatch (permanent).
    """
    # Claimed before anything below finds the blob stored and skips writing it: a
    # collection running now keeps it, or has deleted it and the checks see that.
    await deps.repositories.claim([digest], deps.blobs)
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
        await FillProgress(deps.redis, digest).committed(size)
        return "present"
    lease = Lease(deps.redis, protocol.lease_key(digest), ttl=protocol.LEASE_TTL)
    if not await lease.acquire():
        await protocol.clear_queued(deps.redis, digest, project)
        await _join_other_fill(deps, upstreams, name, repository, digest, downloaded)
        return "busy"
    await protocol.clear_queued(deps.redis, digest, project)
    # This fill's bytes come from this project's upstreams: its clients may follow it.
    await protocol.entitle(deps.redis, digest, project)

    async def fill_from(upstream: UpstreamClient) -> str:
        FILLS_IN_FLIGHT.labels(upstream.name).inc()
        try:
            return await _fill_under_lease(deps, upstream, lease, name, repository, digest, downloaded)
        finally:
            FILLS_IN_FLIGHT.labels(upstream.name).dec()

    try:
        async with lease.heartbeat():
            # Followers see the fill fail only once every upstream has: a fallback resumes
            # from the segments the failed attempt staged.
            return await upstreams.first(f"blob {digest}", fill_from)
    except UpstreamFailure as failure:
        code = failure.to_registry_error("BLOB_UNKNOWN").code
        await FillProgress(deps.redis, digest).failed(code, str(failure), failure.retry_after)
        raise


async def _join_other_fill(
    deps: FillDeps,
    upstreams: UpstreamChain,
    name: str,
    repository: str,
    digest: Digest,
    downloaded: asyncio.Event | None,
) -> None:
    """Another fill (perhaps for another project) holds the blob: let this project's clients
    follow it only once one of this project's own upstreams serves the blob in `repository`
    (a HEAD, which costs no pull), then link the blob here when that fill has committed it."""
    project = project_of(name)
    redis = deps.redis
    if not await protocol.entitled(redis, digest, project):

        async def head(upstream: UpstreamClient) -> tuple[str, int | None]:
            return upstream.name, await upstream.head_blob(repository, str(digest))

        try:
            answered, size = await upstreams.first(f"blob HEAD {digest}", head)
        except UpstreamFailure as failure:
            error = failure.to_registry_error("BLOB_UNKNOWN")
            await protocol.refuse(redis, digest, project, error.code, error.message)
            raise
        if size is None:
            message = f"{digest} is not in {repository} on upstream {answered}"
            await protocol.refuse(redis, digest, project, "BLOB_UNKNOWN", message)
            raise UpstreamFailure("not_found", message, upstream=answered, status=404)
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
    progress = FillProgress(redis, digest)
    while await protocol.being_filled(redis, digest):
        if (await progress.read()).status in protocol.DOWNLOAD_OVER:
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
            deps.blobs.held_soundly(digest), protocol.staged_segments(deps.objects, digest)
        )
        if stored:
            offset = await _verify_only(deps, upstream, early, digest)
            resumed_from = 0
        else:
            offset, resumed_from = await _fill_and_stage(
                deps, upstream, early, lease, digest, listed, downloaded
            )
    await deps.repositories.link_blob(name, digest, offset)
    await FillProgress(deps.redis, digest).committed(offset)
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
    progress = FillProgress(deps.redis, digest)
    await progress.started(FillSource.BLOB, staged=0, spool=None)
    hasher = digest.hasher()
    offset = 0
    async with early.open() as stream:
        await progress.sized(stream.total_size)
        async for chunk in stream.iter_chunks(256 * 1024):
            hasher.update(chunk)
            offset += len(chunk)
            await progress.progressed(staged=offset)
        await _check(deps, upstream, digest, hasher, offset, stream.total_size, [])
    await progress.verified()
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
        resumed = await protocol.resume_point(deps.objects, digest, spooled, listed)
        segments, offset, hasher = resumed.kept, resumed.offset, resumed.hasher
        resumed_from = offset
        progress = FillProgress(deps.redis, digest)
        await progress.started(FillSource.SEGMENTS, staged=resumed.staged, spool=deps.spool.node)
        stager = Stager(deps.objects, deps.redis, deps.spool.node, lease, digest, spooled, resumed)
        try:
            async with early.open(offset) as stream:
                await progress.sized(stream.total_size)
                async for chunk in stream.iter_chunks(256 * 1024):
                    if lease.lost:
                        raise LeaseLost(f"lost the fill lease for {digest}")
                    hasher.update(chunk)
                    stager.spool(chunk)
                    offset += len(chunk)
                    await stager.check()
                total = stream.total_size
            await _check(deps, upstream, digest, hasher, offset, total, segments, stager)
            # Verified: edges may now release the last byte to their clients (the ones
            # reading the spool at once, the others when the last segment is staged).
            await progress.verified()
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
    hasher: hashlib._Hash,
    offset: int,
    total: int | None,
    segments: list[Extent],
    stager: Stager | None = None,
) -> None:
    """Raise if the upstream sent a short body or bytes that do not hash to the digest."""
    if total is not None and offset != total:
        raise UpstreamFailure(
            "network", f"upstream sent {offset} of {total} bytes of {digest}", upstream=upstream.name
        )
    actual = f"{digest.algorithm}:{hasher.hexdigest()}"
    if actual == str(digest):
        return
    DIGEST_MISMATCHES.labels("upstream").inc()
    log.error("fill_digest_mismatch", digest=str(digest), actual=actual, upstream=upstream.name)
    message = f"upstream content for {digest} hashes to {actual}"
    await FillProgress(deps.redis, digest).failed("UPSTREAM_ERROR", message)
    if stager is not None:
        await stager.cancel()
    await deps.objects.delete_many(e.key for e in segments)
    deps.spool.path(digest).unlink(missing_ok=True)
    raise DigestMismatch(f"{digest} from {upstream.name} hashed to {actual}")
