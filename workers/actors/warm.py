"""The warm actor: `seawall warm` jobs, on the prefetch queue (see workers/warm.py)."""

from __future__ import annotations

import dramatiq

from shared import jobs
from shared.metrics import JOBS
from shared.oci.errors import RegistryError
from workers import context
from workers.warm import warm_tag


# A quota 429 comes back when the upstream says it reopens, not before.
@dramatiq.actor(
    actor_name=jobs.WARM.actor,
    queue_name=jobs.WARM.queue,
    max_retries=3,
    min_backoff=30_000,
    time_limit=3_600_000,
)
async def warm(project: str, repository: str, tag: str) -> None:
    try:
        outcome = await warm_tag(context.current(), project, repository, tag)
    except RegistryError as error:
        JOBS.labels(jobs.WARM.actor, error.code.lower()).inc()
        retry_after = error.headers.get("Retry-After")
        if error.status == 429 and retry_after:
            raise dramatiq.Retry(error.message, delay=int(retry_after) * 1000) from None
        raise
    JOBS.labels(jobs.WARM.actor, outcome).inc()
