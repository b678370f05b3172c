"""Maintenance actors: purge abandoned uploads, scrub stored blobs."""

from __future__ import annotations

import time

import dramatiq
import structlog

from shared.proxy.events import MAINTENANCE_QUEUE
from shared.scrub import ScrubReport, scrub_once
from workers.runtime import redis, settings, stores

log = structlog.get_logger("worker")


async def purge_expired_uploads() -> int:
    """Delete upload sessions older than `upload_expiry`; safe to run twice."""
    uploads = stores().uploads
    cutoff = time.time() - settings().upload_expiry.total_seconds()
    expired = await uploads.expired(cutoff)
    for upload_id in expired:
        await uploads.purge(upload_id)
    log.info("uploads_purged", count=len(expired))
    return len(expired)


@dramatiq.actor(queue_name=MAINTENANCE_QUEUE, max_retries=3, min_backoff=60_000, time_limit=3_600_000)
async def purge_expired_uploads_job() -> None:
    await purge_expired_uploads()


async def scrub_blobs() -> ScrubReport | None:
    """The scheduled scrub, at `scrub.bytes_per_second`, one at a time cluster-wide."""
    found = stores()
    rate = int(settings().scrub.bytes_per_second)
    return await scrub_once(redis(), found.objects, found.blobs, bytes_per_second=rate)


# A day of reading at the default rate covers about 2.7 TiB; a scrub cut off by the time
# limit simply starts over at its next scheduled time.
@dramatiq.actor(queue_name=MAINTENANCE_QUEUE, max_retries=0, time_limit=24 * 3_600_000)
async def scrub_blobs_job() -> None:
    await scrub_blobs()
