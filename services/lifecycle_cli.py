"""`seawall gc`, `seawall evict`, `seawall retention`: run a storage lifecycle job by hand,
with a progress bar, then print its report; `seawall stats`: each project's bytes.

The job runs in this process, against the configured (or the running `seawall up`'s)
bucket and Redis, under the same cluster-wide lease as the workers' runs: while another
lifecycle job runs, the command says so and exits 3.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import structlog
from redis.asyncio import Redis
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from services.replication_cli import seconds, size
from services.scrub import s3_settings
from shared.lifecycle.guard import ReferenceGuard
from shared.lifecycle.runs import Job, LifecycleDeps, LifecycleReport
from shared.logging import configure_logging
from shared.registry.blobs import BlobStore
from shared.registry.repositories import RepositoryStore
from shared.registry.storage import ObjectStore
from shared.settings import Settings

# Exit codes: the job succeeded; it failed; (2: the command line, click's own); another
# lifecycle job was running, so it did not start.
EXIT_SUCCEEDED = 0
EXIT_FAILED = 1
EXIT_BUSY = 3
_EXIT = {"succeeded": EXIT_SUCCEEDED, "failed": EXIT_FAILED, "busy": EXIT_BUSY}


@contextlib.asynccontextmanager
async def lifecycle_deps(settings: Settings, redis_url: str) -> AsyncIterator[LifecycleDeps]:
    """The jobs' clients over the configured (or the running `seawall up`'s) bucket and Redis;
    `ValueError` when there is no bucket to reach."""
    objects = ObjectStore(s3_settings(settings))
    redis = Redis.from_url(redis_url)
    try:
        yield LifecycleDeps(
            settings=settings,
            objects=objects,
            blobs=BlobStore(objects),
            repositories=RepositoryStore(objects, redis),
            redis=redis,
            guard=ReferenceGuard(redis),
        )
    finally:
        await redis.aclose()
        objects.close()


async def run_command(
    settings: Settings,
    redis_url: str,
    job: Job,
    project: str | None,
    dry_run: bool,
    console: Console | None = None,
) -> int:
    """Run the job with a progress bar (on stderr), print its report (on stdout); the exit code."""
    from workers.lifecycle import run_job

    # The job's log lines go to stderr, and only its warnings and errors: the report is the output.
    if not structlog.is_configured():
        configure_logging(settings.log_format, "warning")
    console = console or Console(stderr=True)
    what = job if project is None else f"{job} of {project}"
    columns = (
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        TextColumn("{task.completed} objects"),
        TimeElapsedColumn(),
    )
    async with lifecycle_deps(settings, redis_url) as deps:
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task(f"{what}{' (dry run)' if dry_run else ''}", total=None)
            report = await run_job(
                deps, job, project, dry_run=dry_run, progress=lambda n: progress.advance(task, n)
            )
    for line in report_lines(report):
        print(line)
    return _EXIT[report.outcome]


def report_lines(report: LifecycleReport) -> list[str]:
    """The report as plain lines (no wrapping), so scripts can read it."""
    what = report.job if report.project is None else f"{report.job} of {report.project}"
    if report.outcome == "busy":
        return [f"{what}: not started: {report.error}"]
    head = f"{what}{' (dry run)' if report.dry_run else ''}: {report.outcome} in {seconds(report.seconds)}"
    lines = [head + (f": {report.error}" if report.error else "")]
    lines.append(f"examined  {report.examined.objects} objects  {size(report.examined.bytes)}")
    lines.append(f"kept      {report.kept.objects} objects  {size(report.kept.bytes)}")
    verb = "would delete" if report.dry_run else "deleted"
    kinds = ", ".join(
        f"{kind} {tally.objects} ({size(tally.bytes)})" for kind, tally in sorted(report.deleted.items())
    )
    lines.append(
        f"{verb:<9} {report.deleted_objects} objects  {size(report.deleted_bytes)}"
        + (f"  ({kinds})" if kinds else "")
    )
    if report.project_bytes is not None:
        lines.append(f"project   {size(report.project_bytes)}")
    if report.dry_run:
        lines += [f"would delete {item}" for item in report.items]
        if report.items_omitted:
            lines.append(f"... and {report.items_omitted} more")
    return lines
