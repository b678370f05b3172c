"""`seawall gc`, `seawall evict`, `seawall retention`: run a storage lifecycle job by hand,
with a progress bar, then print its report; `seawall stats`: each project's bytes.

The job runs in this process, against the configured (or the running `seawall up`'s)
bucket and Redis, under the same cluster-wide lease as the workers' runs: while another
lifecycle job runs, the command says so and exits 3.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta

from redis.asyncio import Redis
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.replication_cli import seconds, size
from services.running import s3_settings
from shared.lifecycle.guard import ReferenceGuard
from shared.lifecycle.inventory import RepositoryView, blob_bytes, read_repositories
from shared.lifecycle.runs import Job, LifecycleDeps, LifecycleReport
from shared.lifecycle.usage import UsageLedger
from shared.registry.blobs import BlobStore
from shared.registry.repositories import RepositoryStore
from shared.registry.storage import ObjectStore
from shared.settings import Settings
from workers.lifecycle import run_job

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
    blobs = BlobStore(objects)
    guard = ReferenceGuard(redis)
    # As the edge and the workers build it: deletions of revisions update the usage ledger.
    ledger = UsageLedger(redis, settings, objects, blobs)
    try:
        yield LifecycleDeps(
            settings=settings,
            objects=objects,
            blobs=blobs,
            repositories=RepositoryStore(objects, redis, guard=guard, ledger=ledger),
            redis=redis,
            guard=guard,
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
        return [f"{what}: {report.error}"]
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
        # What the project holds once the run is done (a cache after eviction).
        lines.append(f"{'would leave' if report.dry_run else 'left':<9} {size(report.project_bytes)}")
    if report.dry_run:
        lines += [f"would delete {item}" for item in report.items]
        if report.items_omitted:
            lines.append(f"... and {report.items_omitted} more")
    return lines


def _duration(value: timedelta) -> str:
    whole = int(value.total_seconds())
    for unit, length in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if whole >= length and whole % length == 0:
            return f"{whole // length}{unit}"
    return f"{whole}s"


def cache_bytes(views: list[RepositoryView]) -> int:
    """A proxy project's cached bytes, as eviction measures them: the unique bytes of its
    images, and of the blobs its repositories link that no image of it references."""
    linked = {digest: size for view in views for digest, (size, _) in view.links.items()}
    in_images = {d for view in views for image in view.images.values() for d in (image.digest, *image.blobs)}
    return blob_bytes(views, linked) + sum(size for d, size in linked.items() if d not in in_images)


async def show_stats(settings: Settings, redis_url: str, console: Console) -> int:
    """A table of every project's bytes: a hosted project's usage (the quota's ledger,
    rebuilt from the bucket if Redis lost it), a proxy project's cache (listed from the
    bucket), each against its quota or cache max_bytes."""
    table = Table("project", "type", "bytes", "limit", "used", "policy")
    async with lifecycle_deps(settings, redis_url) as deps:
        ledger = UsageLedger(deps.redis, settings, deps.objects, deps.blobs)
        for project in settings.projects:
            if project.type == "hosted":
                used = await ledger.usage(project.name)
                limit = project.quota
                policy = f"{len(project.retention)} retention rules" if project.retention else ""
            else:
                with console.status(f"listing {project.name}"):
                    views = await read_repositories(deps.objects, deps.blobs, project=project.name)
                used = cache_bytes(list(views.values()))
                limit = project.cache.max_bytes
                after = project.cache.evict_after
                policy = f"evict after {_duration(after)}" if after is not None else ""
            share = f"{used / limit:.0%}" if limit else "-"
            table.add_row(
                project.name, project.type, size(used), size(limit) if limit else "-", share, policy
            )
    console.print(table)
    return 0
