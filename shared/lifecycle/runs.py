"""What every lifecycle job shares: the clients it works with, its report, and the rule
that only one runs at a time cluster-wide.

Garbage collection, eviction and retention all delete; run together they would race each
other's view of what is referenced, and together they would also load the store twice.
One Redis lease serialises them, whoever starts them (the scheduler, a worker, the CLI).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field
from redis.asyncio import Redis

from shared.leases import Lease
from shared.registry.blobs import BlobStore
from shared.registry.repositories import RepositoryStore
from shared.registry.storage import ObjectStore
from shared.settings import Settings

if TYPE_CHECKING:
    from shared.lifecycle.guard import ReferenceGuard

Job = Literal["gc", "eviction", "retention"]
LIFECYCLE_LEASE = "seawall:lifecycle:lease"
LEASE_TTL_SECONDS = 60.0
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
