"""Storage lifecycle actors: garbage collection, cache eviction, tag retention (see
workers/lifecycle.py). One runs at a time cluster-wide; a run that found another running,
or failed, is published again with a delay and the next attempt number, rather than
retried by Dramatiq (a busy run is no error)."""

from __future__ import annotations

import asyncio
from typing import Any

import dramatiq

from shared import jobs
from shared.lifecycle.runs import Job
from workers import context
from workers.lifecycle import run_scheduled


async def _run(actor: Any, job: Job, project: str | None, attempt: int) -> None:
    delay = await run_scheduled(context.current(), job, project, attempt)
    if delay is not None:
        args = (attempt + 1,) if project is None else (project, attempt + 1)
        await asyncio.to_thread(actor.send_with_options, args=args, delay=int(delay * 1000))


# A collection cut off by the time limit is finished by the next one.
@dramatiq.actor(
    actor_name=jobs.COLLECT_GARBAGE.actor,
    queue_name=jobs.COLLECT_GARBAGE.queue,
    max_retries=0,
    time_limit=24 * 3_600_000,
)
async def collect_garbage_job(attempt: int = 0) -> None:
    await _run(collect_garbage_job, "gc", None, attempt)


@dramatiq.actor(
    actor_name=jobs.EVICT_CACHE.actor,
    queue_name=jobs.EVICT_CACHE.queue,
    max_retries=0,
    time_limit=6 * 3_600_000,
)
async def evict_cache_job(project: str, attempt: int = 0) -> None:
    await _run(evict_cache_job, "eviction", project, attempt)


@dramatiq.actor(
    actor_name=jobs.APPLY_RETENTION.actor,
    queue_name=jobs.APPLY_RETENTION.queue,
    max_retries=0,
    time_limit=6 * 3_600_000,
)
async def apply_retention_job(project: str, attempt: int = 0) -> None:
    await _run(apply_retention_job, "retention", project, attempt)
