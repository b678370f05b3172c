"""How a garbage collection deletes: in batches, each through the reference guard, checking
the lifecycle lease between them; and the kill points its fault tests use.

Whatever the collection deletes on the strength of its mark (a blob's record and data, a
layer link, a project entry, an untagged manifest) goes through `Sweeper.guarded`: the
digests are condemned first, a digest some write claimed since the run's `since` is left
alone, and only then are the objects deleted (see shared/lifecycle/guard.py).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from shared.leases import Lease, LeaseLost
from shared.lifecycle.runs import LifecycleDeps, LifecycleReport
from shared.oci.digest import Digest

T = TypeVar("T")
Progress = Callable[[int], None]

# Digests condemned, and objects deleted, per batch.
BATCH = 500

# Test-only (tests/test_gc_faults.py): a kill point named in this variable makes the
# collection SIGKILL its own process when it gets there, to prove that a run cut short
# anywhere breaks no pull and that the next run finishes its work. Read once at import;
# unset (always, outside those tests) a checkpoint costs one comparison.
KILL_ENV = "SEAWALL_GC_KILL_AT"
KILL_POINTS = ("mark", "untagged", "sweep", "links", "orphans")
_KILL_AT = os.environ.get(KILL_ENV) or None


def checkpoint(point: str) -> None:
    """A place a test may kill the collection at (see KILL_ENV)."""
    if point == _KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)


def batches(items: Sequence[T], size: int = BATCH) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass
class Sweeper:
    """One run's deleting side: its clients, its report and its clock."""

    deps: LifecycleDeps
    report: LifecycleReport
    lease: Lease | None
    run_id: str
    dry_run: bool
    now: float  # the run's clock, for ages (tests may set it)
    cutoff: float  # objects last modified before this are past the grace period
    since: float  # claims at or after this (real time) protect a digest
    progress: Progress | None = None

    def tick(self, count: int) -> None:
        if self.progress is not None and count:
            self.progress(count)

    def check_lease(self) -> None:
        """Stop between batches once the lifecycle lease is lost: another job may run."""
        if self.lease is not None and self.lease.lost:
            raise LeaseLost("lost the lifecycle lease (Redis unreachable or flushed); collection stopped")

    async def guarded(
        self, digests: Iterable[Digest], delete: Callable[[set[Digest]], Awaitable[None]]
    ) -> set[Digest]:
        """Run `delete` on those of `digests` no write claimed meanwhile; returns them. In a
        dry run nothing is deleted and every digest is returned (what would go)."""
        wanted = set(digests)
        if not wanted:
            return set()
        self.check_lease()
        self.tick(len(wanted))
        if self.dry_run:
            return wanted
        guard = self.deps.guard
        safe = wanted if guard is None else await guard.condemn(self.run_id, wanted, self.since)
        if safe:
            await delete(safe)
            if guard is not None:
                await guard.deleted(self.run_id, safe)
        for digest in safe:
            self.deps.blobs.forget(digest)
        return safe
