"""Fill actors: fetch a blob a client waits for; prefetch the blobs of a new image."""

from __future__ import annotations

import asyncio

import dramatiq
import structlog

from shared.metrics import JOBS
from shared.oci.digest import Digest
from shared.proxy import fill
from shared.proxy.events import FILL_ACTOR, FILL_QUEUE, PREFETCH_ACTOR, PREFETCH_QUEUE
from shared.upstream import UpstreamFailure
from workers.runtime import fill_deps, settings, upstreams

log = structlog.get_logger("worker")
CLOSED_KINDS = frozenset({"quota", "abuse", "governor"})


async def run_fill(
    project: str, repository: str, digest: str, downloaded: asyncio.Event | None = None
) -> str:
    found = settings().project(project)
    if found is None or found.upstream is None:
        log.warning("fill_for_unknown_project", project=project)
        return "unknown-project"
    client = await upstreams().client(found.upstream)
    return await fill.fill_blob(
        fill_deps(), client, f"{project}/{repository}", repository, Digest.parse(digest), downloaded
    )


# Upstream failures are retried with backoff (the fill resumes where it stopped); a
# digest mismatch is permanent. Redelivery of a finished fill finds the blob present.
@dramatiq.actor(
    actor_name=FILL_ACTOR,
    queue_name=FILL_QUEUE,
    max_retries=5,
    min_backoff=1_000,
    max_backoff=60_000,
    time_limit=6 * 3_600_000,
    throws=(fill.DigestMismatch,),
)
async def fill_blob(project: str, repository: str, digest: str) -> None:
    try:
        outcome = await run_fill(project, repository, digest)
    except UpstreamFailure as failure:
        JOBS.labels(FILL_ACTOR, "error").inc()
        retry = _retry_when_reopened(failure)
        if retry is not None:
            raise retry from None
        raise
    except Exception:
        JOBS.labels(FILL_ACTOR, "error").inc()
        raise
    JOBS.labels(FILL_ACTOR, outcome).inc()


# A new image's blobs, fetched one after another in manifest order: a client pulling the
# image reads them in about that order, so each one downloads at the upstream's full speed
# just ahead of it (blobs a client asks for first get their own fill at once). The next
# download starts once the previous one is in and verified; staging and committing carry
# on meanwhile, and the job ends when every blob is committed. A blob already held is
# skipped; one that another fill is downloading (a client asked for it first) counts as
# the current download until that one is in. The upstream closing retries the whole list
# once it reopens (what is held by then is skipped).
@dramatiq.actor(
    actor_name=PREFETCH_ACTOR,
    queue_name=PREFETCH_QUEUE,
    max_retries=3,
    min_backoff=5_000,
    max_backoff=60_000,
    time_limit=6 * 3_600_000,
)
async def prefetch_blobs(project: str, repository: str, digests: list[str]) -> None:
    fills: list[asyncio.Task[str]] = []
    for digest in digests:
        downloaded = asyncio.Event()
        task = asyncio.create_task(run_fill(project, repository, digest, downloaded))
        fills.append(task)
        waiting = asyncio.create_task(downloaded.wait())
        await asyncio.wait([task, waiting], return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if task.done() and _upstream_closed(task):
            break
    retry: dramatiq.Retry | None = None
    for digest, outcome in zip(digests, await asyncio.gather(*fills, return_exceptions=True), strict=False):
        if isinstance(outcome, str):
            JOBS.labels(PREFETCH_ACTOR, outcome).inc()
            continue
        JOBS.labels(PREFETCH_ACTOR, "error").inc()
        if isinstance(outcome, UpstreamFailure):
            retry = _retry_when_reopened(outcome) or retry
            log.warning("prefetch_failed", digest=digest, reason=str(outcome))
        elif not isinstance(outcome, fill.DigestMismatch):
            raise outcome
    if retry is not None:
        raise retry


def _retry_when_reopened(failure: UpstreamFailure) -> dramatiq.Retry | None:
    """The upstream is closed until a known time: come back then, not in a loop."""
    wait = failure.seconds_until_reopen()
    if failure.kind in CLOSED_KINDS and wait is not None:
        return dramatiq.Retry(str(failure), delay=int(wait * 1000) + 1000)
    return None


def _upstream_closed(task: asyncio.Task[str]) -> bool:
    failure = task.exception()
    return isinstance(failure, UpstreamFailure) and failure.kind in CLOSED_KINDS
