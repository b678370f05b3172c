"""Maintenance actors: purge abandoned uploads, scrub stored blobs (see workers/maintenance.py)."""

from __future__ import annotations

import dramatiq

from shared import jobs
from workers import context
from workers.maintenance import purge_expired_uploads, scrub_blobs


@dramatiq.actor(
    actor_name=jobs.PURGE_EXPIRED_UPLOADS.actor,
    queue_name=jobs.PURGE_EXPIRED_UPLOADS.queue,
    max_retries=3,
    min_backoff=60_000,
    time_limit=3_600_000,
)
async def purge_expired_uploads_job() -> None:
    await purge_expired_uploads(context.current())


# A day of reading at the default rate covers about 2.7 TiB; a scrub cut off by the time
# limit simply starts over at its next scheduled time.
@dramatiq.actor(
    actor_name=jobs.SCRUB_BLOBS.actor,
    queue_name=jobs.SCRUB_BLOBS.queue,
    max_retries=0,
    time_limit=24 * 3_600_000,
)
async def scrub_blobs_job() -> None:
    await scrub_blobs(context.current())
