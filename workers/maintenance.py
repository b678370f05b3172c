"""Maintenance jobs: purge abandoned uploads, scrub stored blobs."""

from __future__ import annotations

import time

import structlog

from shared.scrub import ScrubReport, scrub_once
from workers.context import WorkerContext

log = structlog.get_logger("worker")


async def purge_expired_uploads(ctx: WorkerContext) -> int:
    """Delete upload sessions older than `upload_expiry`; safe to run twice."""
    cutoff = time.time() - ctx.settings.upload_expiry.total_seconds()
    expired = await ctx.uploads.expired(cutoff)
    for upload_id in expired:
        await ctx.uploads.purge(upload_id)
    log.info("uploads_purged", count=len(expired))
    return len(expired)


async def scrub_blobs(ctx: WorkerContext) -> ScrubReport | None:
    """The scheduled scrub, at `scrub.bytes_per_second`, one at a time cluster-wide."""
    rate = int(ctx.settings.scrub.bytes_per_second)
    return await scrub_once(ctx.redis, ctx.objects, ctx.blobs, bytes_per_second=rate)
