"""Maintenance actors: purge abandoned uploads."""

from __future__ import annotations

import time

import dramatiq
import structlog

from shared.proxy.events import MAINTENANCE_QUEUE
from workers.runtime import settings, stores

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
