"""What every lifecycle job shares: the clients it works with, its report, and the rule
that only one runs at a time cluster-wide.

Garbage collection, eviction and retention all delete; run together they would race each
other's view of what is referenced, and together they would also load the store twice.
One Redis lease serialises them, whoever starts them (the scheduler, a worker, the CLI).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field
from redis.asyncio import Redis

from shared.leases import Lease
from shared.metrics import (
    LIFECYCLE_LAST_SUCCESS,
    LIFECYCLE_RECLAIMED_BYTES,
    LIFECYCLE_RECLAIMED_OBJECTS,
    LIFECYCLE_RUNS,
    PROJECT_BYTES,
)
from shared.registry.blobs import BlobStore
from shared.registry.repositories import RepositoryStore
from shared.registry.storage import ObjectStore, request_pace
from shared.settings import Settings

if TYPE_CHECKING:
    from shared.lifecycle.guard import ReferenceGuard

Job = Literal["gc", "eviction", "retention"]
LIFECYCLE_LEASE = "seawall:lifecycle:lease"
# Short: a killed run's condemned blobs hold pushes back until its lease lapses (guard.py).
LEASE_TTL_SECONDS = 20.0
# A report lists at most this many of the things it deleted (or would delete).
MAX_ITEMS = 1000


@dataclass
class LifecycleDeps:
    """The clients a lifecycle job works with; built by the worker context and by the CLI."""

    settings: Settings
    objects: ObjectStore
    blobs: BlobStore
    repositories: RepositoryStore
    redis: Redis
    guard: ReferenceGuard | None = None


class Tally(BaseModel):
    objects: int = 0
    bytes: int = 0

    def add(self, size: int, count: int = 1) -> None:
        self.objects += count
        self.bytes += size


class LifecycleReport(BaseModel):
    """What one run examined, kept and deleted (or, in a dry run, would delete)."""

    job: Job
    project: str | None = None
    dry_run: bool = False
    started: float = Field(default_factory=time.time)
    seconds: float = 0.0
    outcome: Literal["succeeded", "failed", "busy"] = "succeeded"
    error: str | None = None
    examined: Tally = Field(default_factory=Tally)
    kept: Tally = Field(default_factory=Tally)
    # Per kind of object: "blob", "manifest", "tag", "link", "segment", "upload", ...
    deleted: dict[str, Tally] = Field(default_factory=dict)
    items: list[str] = Field(default_factory=list)
    items_omitted: int = 0
    # The project's bytes after the run, where the job measured them (eviction: the cache's
    # bytes; retention: the usage): exported as seawall_project_bytes{project}.
    project_bytes: int | None = None

    def deleting(self, kind: str, size: int = 0, item: str | None = None, count: int = 1) -> None:
        """Count one deletion (done, or to be done in a dry run) of `kind`."""
        self.deleted.setdefault(kind, Tally()).add(size, count)
        if item is not None:
            if len(self.items) < MAX_ITEMS:
                self.items.append(item)
            else:
                self.items_omitted += 1

    @property
    def deleted_bytes(self) -> int:
        return sum(t.bytes for t in self.deleted.values())

    @property
    def deleted_objects(self) -> int:
        return sum(t.objects for t in self.deleted.values())

    def finish(self) -> LifecycleReport:
        self.seconds = time.time() - self.started
        return self


class RequestPace:
    """At most `rate` calls a second on average, spaced evenly (see `paced`)."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate
        self._next = 0.0

    async def __call__(self) -> None:
        now = time.monotonic()
        at = max(self._next, now)
        self._next = at + self._interval
        if at > now:
            await asyncio.sleep(at - now)


@contextlib.contextmanager
def paced(requests_per_second: int) -> Iterator[None]:
    """Hold the store requests made within (by this task and the tasks it starts) to
    `requests_per_second`; 0 leaves them unpaced."""
    if requests_per_second <= 0:
        yield
        return
    token = request_pace.set(RequestPace(requests_per_second))
    try:
        yield
    finally:
        request_pace.reset(token)


class Busy(RuntimeError):
    """Another lifecycle job holds the lease; this one did not start."""


@contextlib.asynccontextmanager
async def exclusive(redis: Redis, job: Job) -> AsyncIterator[Lease]:
    """Hold the cluster-wide lifecycle lease while the body runs (renewed by a heartbeat);
    raises `Busy` when another job holds it. The body should check `lease.lost` between
    batches of deletions and stop when it turns True."""
    lease = Lease(redis, LIFECYCLE_LEASE, ttl=LEASE_TTL_SECONDS)
    if not await lease.acquire():
        raise Busy(f"another lifecycle job (gc, eviction or retention) is running; {job} not started")
    async with lease.heartbeat():
        yield lease


def record(report: LifecycleReport) -> None:
    """Count a finished run in the metrics: its outcome, what it reclaimed (not in a dry run)
    and, for a successful real run, when it finished."""
    LIFECYCLE_RUNS.labels(report.job, report.outcome).inc()
    if report.dry_run:
        return
    # A failed run may have deleted some of its batches before it failed: those count too.
    for kind_of_object, tally in report.deleted.items():
        LIFECYCLE_RECLAIMED_OBJECTS.labels(report.job, kind_of_object).inc(tally.objects)
        LIFECYCLE_RECLAIMED_BYTES.labels(report.job, kind_of_object).inc(tally.bytes)
    if report.outcome == "succeeded":
        LIFECYCLE_LAST_SUCCESS.labels(report.job).set(report.started + report.seconds)
    if report.project is not None and report.project_bytes is not None:
        PROJECT_BYTES.labels(report.project).set(report.project_bytes)


# Which projects each per-project job applies to, and why one does not.


def evicted_projects(settings: Settings) -> list[str]:
    """Proxy projects with a cache bound (`max_bytes` or `evict_after`): eviction runs on these."""
    return [
        p.name
        for p in settings.projects
        if p.type == "proxy" and (p.cache.max_bytes is not None or p.cache.evict_after is not None)
    ]


def retained_projects(settings: Settings) -> list[str]:
    """Hosted projects with retention rules: retention runs on these."""
    return [p.name for p in settings.projects if p.type == "hosted" and p.retention]


def scheduled_jobs(settings: Settings) -> list[Job]:
    """The jobs the scheduler runs: those with a schedule, and for eviction and retention a
    project to run on."""
    schedules = settings.lifecycle
    jobs: list[Job] = []
    if schedules.gc_schedule:
        jobs.append("gc")
    if schedules.eviction_schedule and evicted_projects(settings):
        jobs.append("eviction")
    if schedules.retention_schedule and retained_projects(settings):
        jobs.append("retention")
    return jobs


def project_limits(settings: Settings) -> dict[str, int]:
    """Each bounded project's limit: a hosted project's quota, a proxy project's cache max_bytes."""
    limits = {}
    for project in settings.projects:
        limit = project.quota if project.type == "hosted" else project.cache.max_bytes
        if limit is not None:
            limits[project.name] = int(limit)
    return limits


def policy_problem(settings: Settings, job: Job, project_name: str) -> str | None:
    """Why `job` cannot run on the project (unknown, of the wrong type, without the policy),
    or None when it can."""
    project = settings.project(project_name)
    if project is None:
        known = ", ".join(p.name for p in settings.projects) or "none"
        return f"no project named {project_name!r} (projects: {known})"
    if job == "eviction":
        if project.type != "proxy":
            return f"project {project_name!r} is {project.type}: eviction applies to proxy projects"
        if project_name not in evicted_projects(settings):
            return f"project {project_name!r} has no cache policy (cache: max_bytes or evict_after)"
    elif job == "retention":
        if project.type != "hosted":
            return f"project {project_name!r} is {project.type}: retention applies to hosted projects"
        if not project.retention:
            return f"project {project_name!r} has no retention rules"
    return None
