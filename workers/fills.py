"""Fill jobs: fetch a blob a client waits for; prefetch the blobs of a new image."""

from __future__ import annotations

import asyncio

import structlog

from shared.oci.digest import Digest
from shared.proxy import fill
from shared.proxy.prefetch import Prefetched, prefetch_blobs
from shared.upstream import UpstreamClient
from workers.context import WorkerContext

log = structlog.get_logger("worker")
UNKNOWN_PROJECT = "unknown-project"


async def _upstream_of(ctx: WorkerContext, project: str) -> UpstreamClient | None:
    found = ctx.settings.project(project)
    if found is None or found.upstream is None:
        log.warning("fill_for_unknown_project", project=project)
        return None
    return await ctx.upstreams.client(found.upstream)


async def run_fill(
    ctx: WorkerContext,
    project: str,
    repository: str,
    digest: str,
    downloaded: asyncio.Event | None = None,
) -> str:
    """Fill one blob of `project`'s upstream `repository`; what happened (see fill_blob)."""
    upstream = await _upstream_of(ctx, project)
    if upstream is None:
        return UNKNOWN_PROJECT
    return await fill.fill_blob(
        ctx.fill, upstream, f"{project}/{repository}", repository, Digest.parse(digest), downloaded
    )


async def prefetch(ctx: WorkerContext, project: str, repository: str, digests: list[str]) -> Prefetched:
    """Fill a new image's blobs one download at a time, in the order given."""
    parsed = [Digest.parse(digest) for digest in digests]
    upstream = await _upstream_of(ctx, project)
    if upstream is None:
        return Prefetched([(digest, UNKNOWN_PROJECT) for digest in parsed])
    return await prefetch_blobs(ctx.fill, upstream, f"{project}/{repository}", repository, parsed)
