"""Warming: fetch a tag into a proxy project before anyone pulls it (`seawall warm`).

Runs at background priority: it spends upstream quota only above the reserve kept for
client pulls, so warming never starves the edge.
"""

from __future__ import annotations

import dramatiq
import structlog

from shared.metrics import JOBS
from shared.oci.errors import RegistryError
from shared.oci.manifest import parse_manifest
from shared.proxy.events import PREFETCH_QUEUE, WARM_ACTOR
from shared.ratelimit import background
from shared.routing import Target
from workers.runtime import manifest_cache, settings

log = structlog.get_logger("worker")


async def warm_tag(project: str, repository: str, tag: str) -> str:
    found = settings().project(project)
    if found is None or found.type != "proxy":
        log.warning("warm_for_unknown_project", project=project)
        return "unknown-project"
    target = Target(found, f"{project}/{repository}", repository)
    cache = manifest_cache()
    with background():
        cached = await cache.get(target, tag)
        # Each platform of an index is a pull of its own; warm them all, still above
        # the reserve.
        for child in parse_manifest(cached.body, cached.revision.media_type).manifests:
            await cache.get(target, str(child.digest))
    log.info("tag_warmed", repository=target.name, tag=tag, result=cached.result)
    return cached.result


@dramatiq.actor(
    actor_name=WARM_ACTOR, queue_name=PREFETCH_QUEUE, max_retries=3, min_backoff=30_000, time_limit=3_600_000
)
async def warm(project: str, repository: str, tag: str) -> None:
    try:
        outcome = await warm_tag(project, repository, tag)
    except RegistryError as error:
        JOBS.labels(WARM_ACTOR, error.code.lower()).inc()
        retry_after = error.headers.get("Retry-After")
        if error.status == 429 and retry_after:
            raise dramatiq.Retry(error.message, delay=int(retry_after) * 1000) from None
        raise
    JOBS.labels(WARM_ACTOR, outcome).inc()
