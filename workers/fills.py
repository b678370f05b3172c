"""Fill jobs: fetch a blob a client waits for; prefetch the blobs of a new image."""

from __future__ import annotations

import asyncio

import structlog

from shared.oci.digest import Digest
from shared.proxy import fill
from shared.proxy.prefetch import Prefetched, prefetch_blobs
from shared.proxy.upstreams import UpstreamChain
from workers.context import WorkerContext

log = structlog.get_logger("worker")
UNKNOWN_PROJECT = "unknown-project"


async def _upstreams_of(ctx: WorkerContext, project: str) -> UpstreamChain | None:
    """The project's upstreams in its order of preference; None for a project that has none
    (renamed or no longer a proxy since the message was sent)."""
    found = ctx.settings.project(project)
    if found is None or not found.upstreams:
        log.warning("fill_for_unknown_project", project=project)
        return None
    return await ctx.upstreams.chain(found)


async def run_fill(
    ctx: WorkerContext,
    project: str,
    repository: str,
    digest: str,
    downloaded: asyncio.Event | None = None,
) -> str:
    """Fill one blob of `project`'s upstream `repository` from the first of its upstreams
    that serves it; what happened (see fill_blob)."""
    upstreams = await _upstreams_of(ctx, project)
    if upstreams is None:
        return UNKNOWN_PROJECT
    return await fill.fill_blob(
        ctx.fill, upstreams, f"{project}/{repository}", repository, Digest.parse(digest), downloaded
    )


async def prefetch(ctx: WorkerContext, project: str, repository: str, digests: list[str]) -> Prefetched:
    """Fill a new image's blobs one download at a time, in the order given."""
    parsed = [Digest.parse(digest) for digest in digests]
    upstreams = await _upstreams_of(ctx, project)
    if upstreams is None:
        return Prefetched([(digest, UNKNOWN_PROJECT) for digest in parsed])
    return await prefetch_blobs(ctx.fill, upstreams, f"{project}/{repository}", repository, parsed)
