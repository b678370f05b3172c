"""Warming: fetch a tag into a proxy project before anyone pulls it (`seawall warm`).

Runs at background priority: it spends upstream quota only above the reserve kept for
client pulls, so warming never starves the edge.
"""

from __future__ import annotations

import structlog

from shared.oci.manifest import parse_manifest
from shared.ratelimit import background
from shared.routing import Target
from workers.context import WorkerContext

log = structlog.get_logger("worker")


async def warm_tag(ctx: WorkerContext, project: str, repository: str, tag: str) -> str:
    """Fetch `tag` (and each platform of an index) as a pull would; hit, miss or stale."""
    found = ctx.settings.project(project)
    if found is None or found.type != "proxy":
        log.warning("warm_for_unknown_project", project=project)
        return "unknown-project"
    target = Target(found, f"{project}/{repository}", repository)
    with background():
        cached = await ctx.manifests.get(target, tag)
        # Each platform of an index is a pull of its own; warm them all, still above
        # the reserve.
        for child in parse_manifest(cached.body, cached.revision.media_type).manifests:
            await ctx.manifests.get(target, str(child.digest))
    log.info("tag_warmed", repository=target.name, tag=tag, result=cached.result)
    return cached.result
