"""Fill actors: fetch a blob a client waits for; prefetch the blobs of a new image."""

from __future__ import annotations

import dramatiq
import structlog

from shared import jobs
from shared.metrics import JOBS
from shared.proxy.fill import DigestMismatch
from shared.proxy.prefetch import reopens_in
from shared.upstream import UpstreamFailure
from workers import context
from workers.fills import prefetch, run_fill

log = structlog.get_logger("worker")


# Upstream failures are retried with backoff (the fill resumes where it stopped); a
# digest mismatch is permanent. Redelivery of a finished fill finds the blob present.
@dramatiq.actor(
    actor_name=jobs.FILL.actor,
    queue_name=jobs.FILL.queue,
    max_retries=5,
    min_backoff=1_000,
    max_backoff=60_000,
    time_limit=6 * 3_600_000,
    throws=(DigestMismatch,),
)
async def fill_blob(project: str, repository: str, digest: str) -> None:
    try:
        outcome = await run_fill(context.current(), project, repository, digest)
    except UpstreamFailure as failure:
        JOBS.labels(jobs.FILL.actor, "error").inc()
        retry = _retry_when_reopened(failure)
        if retry is not None:
            raise retry from None
        raise
    except Exception:
        JOBS.labels(jobs.FILL.actor, "error").inc()
        raise
    JOBS.labels(jobs.FILL.actor, outcome).inc()


# See shared/proxy/prefetch.py: one download at a time, in manifest order. The upstream
# closing retries the whole list once it reopens (what is held by then is skipped); a
# digest mismatch is not retried.
@dramatiq.actor(
    actor_name=jobs.PREFETCH.actor,
    queue_name=jobs.PREFETCH.queue,
    max_retries=3,
    min_backoff=5_000,
    max_backoff=60_000,
    time_limit=6 * 3_600_000,
)
async def prefetch_blobs(project: str, repository: str, digests: list[str]) -> None:
    prefetched = await prefetch(context.current(), project, repository, digests)
    for digest, outcome in prefetched.outcomes:
        if isinstance(outcome, str):
            JOBS.labels(jobs.PREFETCH.actor, outcome).inc()
            continue
        JOBS.labels(jobs.PREFETCH.actor, "error").inc()
        if isinstance(outcome, UpstreamFailure):
            log.warning("prefetch_failed", digest=str(digest), reason=str(outcome))
        elif not isinstance(outcome, DigestMismatch):
            raise outcome
    retry = _retry_when_reopened(prefetched.closed) if prefetched.closed is not None else None
    if retry is not None:
        raise retry


def _retry_when_reopened(failure: UpstreamFailure) -> dramatiq.Retry | None:
    """The upstream is closed until a known time: come back then, not in a loop."""
    wait = reopens_in(failure)
    if wait is None:
        return None
    return dramatiq.Retry(str(failure), delay=int(wait * 1000) + 1000)
