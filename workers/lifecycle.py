"""The storage lifecycle's jobs as workers and the CLI run them: garbage collection, cache
eviction and tag retention, each to a report that is logged and counted in the metrics.

A run that finds another lifecycle job running (they share one lease) ends "busy"; a
scheduled one then comes back a little later, so that the daily GC is not lost to an
eviction that happened to start in the same minute. A failed scheduled run comes back the
same way: every job is idempotent, and the next run finishes what one cut short left.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from shared.lifecycle import growth
from shared.lifecycle.eviction import evict
from shared.lifecycle.gc import collect
from shared.lifecycle.retention import apply_retention
from shared.lifecycle.runs import Busy, Job, LifecycleDeps, LifecycleReport, policy_problem, record
from workers.context import WorkerContext

log = structlog.get_logger("worker")
Progress = Callable[[int], None]

# How many times a scheduled run that ended busy or failed is tried again. Eviction runs
# every few minutes anyway, so it is retried less.
RETRIES: dict[Job, int] = {"gc": 10, "eviction": 2, "retention": 10}
RETRY_SECONDS = 60.0
RETRY_MAX_SECONDS = 900.0


async def _start(
    deps: LifecycleDeps, job: Job, project: str | None, dry_run: bool, progress: Progress | None
) -> LifecycleReport:
    if job == "gc":
        return await collect(deps, dry_run=dry_run, progress=progress)
    if project is None:
        raise ValueError(f"{job} runs on a project; none was named")
    if job == "eviction":
        # The growth counter that asks for evictions between schedules restarts from what this run measures.
        before = await growth.counted(deps.redis, project)
        report = await evict(deps, project, dry_run=dry_run, progress=progress)
        await growth.measured(deps.redis, report, before)
        return report
    return await apply_retention(deps, project, dry_run=dry_run, progress=progress)


async def run_job(
    deps: LifecycleDeps,
    job: Job,
    project: str | None = None,
    *,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> LifecycleReport:
    """Run one lifecycle job to its report, counted in the metrics: outcome "busy" when
    another lifecycle job holds the lease, "failed" (with the error, logged with its
    traceback) when the job raised."""
    started = time.time()
    try:
        report = await _start(deps, job, project, dry_run, progress)
    except Busy as exc:
        report = LifecycleReport(
            job=job, project=project, dry_run=dry_run, started=started, outcome="busy", error=str(exc)
        ).finish()
    except Exception as exc:
        log.exception("lifecycle_job_failed", job=job, project=project)
        error = str(exc) or type(exc).__name__
        report = LifecycleReport(
            job=job, project=project, dry_run=dry_run, started=started, outcome="failed", error=error
        ).finish()
    record(report)
    log.info(
        "lifecycle_job_finished",
        job=job,
        project=project,
        dry_run=dry_run,
        outcome=report.outcome,
        seconds=round(report.seconds, 3),
        examined=report.examined.objects,
        deleted_objects=report.deleted_objects,
        deleted_bytes=report.deleted_bytes,
        error=report.error,
    )
    return report


def retry_delay(job: Job, attempt: int) -> float | None:
    """Seconds until the next try of a scheduled run that ended busy or failed on its
    `attempt`-th try (0: the first), or None when it has been tried often enough."""
    if attempt >= RETRIES[job]:
        return None
    return float(min(RETRY_SECONDS * 2**attempt, RETRY_MAX_SECONDS))


async def run_scheduled(ctx: WorkerContext, job: Job, project: str | None, attempt: int) -> float | None:
    """A scheduled (or retried) run; returns the delay before its next try, or None when
    none is needed."""
    if project is not None and (problem := policy_problem(ctx.settings, job, project)) is not None:
        # The configuration changed since the message was published.
        log.warning("lifecycle_job_skipped", job=job, project=project, reason=problem)
        return None
    report = await run_job(ctx.lifecycle, job, project)
    if report.outcome == "succeeded":
        return None
    delay = retry_delay(job, attempt)
    if delay is not None:
        log.info("lifecycle_job_retried", job=job, project=project, attempt=attempt + 1, seconds=delay)
    return delay
