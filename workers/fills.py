"""Fill jobs: fetch a blob a client waits for; prefetch the blobs of a new image.

Blobs a fill commits count towards a capped proxy cache's growth (shared/lifecycle/growth.py),
so that a cache pulled hard is evicted before it outgrows its cap, not only on the schedule.
"""

from __future__ import annotations

import asyncio

import structlog

from shared.lifecycle import growth
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
    parsed = Digest.parse(digest)
    outcome = await fill.fill_blob(
        ctx.fill, upstreams, f"{project}/{repository}", repository, parsed, downloaded
    )
    if outcome == "committed":
        await _count_growth(ctx, project, [parsed])
    return outcome


async def prefetch(ctx: WorkerContext, project: str, repository: str, digests: list[str]) -> Prefetched:
    """Fill a new image's blobs one download at a time, in the order given."""
    parsed = [Digest.parse(digest) for digest in digests]
    upstreams = await _upstreams_of(ctx, project)
    if upstreams is None:
        return Prefetched([(digest, UNKNOWN_PROJECT) for digest in parsed])
    prefetched = await prefetch_blobs(ctx.fill, upstreams, f"{project}/{repository}", repository, parsed)
    await _count_growth(
        ctx, project, [digest for digest, outcome in prefetched.outcomes if outcome == "committed"]
    )
    return prefetched


async def _count_growth(ctx: WorkerContext, project: str, committed: list[Digest]) -> None:
    """Add the bytes of blobs this fill committed to the project's cache count, which asks
    for an eviction when the cache nears its cap. A blob only linked ("present", or another
    fill's: "busy") adds nothing here; the next eviction measures it. Never raises."""
    if not committed or growth.trigger_bytes(ctx.settings, project) is None:
        return
    try:
        sizes = await asyncio.gather(*(ctx.blobs.size(digest) for digest in committed))
    except Exception as exc:  # the blobs are committed: the fill has done its work
        log.warning("cache_growth_not_counted", project=project, error=str(exc) or type(exc).__name__)
        return
    added = sum(size for size in sizes if size is not None)
    await growth.grew(ctx.redis, ctx.settings, project, added, ctx.events.eviction_wanted)
