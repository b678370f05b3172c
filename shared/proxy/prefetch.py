"""Prefetching a new image's blobs: one download at a time, in manifest order.

A client pulling the image reads the blobs in about that order, so each one downloads at
the upstream's full speed just ahead of it (blobs a client asks for first get their own
fill at once). The next download starts once the previous one is in and verified; staging
and committing carry on meanwhile, and the prefetch ends when every blob is committed. A
blob already held is skipped; one that another fill is downloading (a client asked for it
first) counts as the current download until that one is in. The upstream closing stops
the list; the caller retries the whole list once it reopens (what is held by then is
skipped).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from shared.oci.digest import Digest
from shared.proxy.fill import FillDeps, fill_blob
from shared.proxy.upstreams import UpstreamChain
from shared.upstream import UpstreamFailure

# Failures that close the upstream until a known time: asking again before then only
# spends requests (and, on Docker Hub, standing with the abuse limiter).
CLOSED_KINDS = frozenset({"quota", "abuse", "governor"})


def reopens_in(failure: UpstreamFailure) -> float | None:
    """Seconds until the upstream reopens, when `failure` closed it until a known time."""
    wait = failure.seconds_until_reopen()
    if failure.kind in CLOSED_KINDS and wait is not None:
        return wait
    return None


@dataclass(frozen=True)
class Prefetched:
    """What a prefetch did: the outcome of each fill it started, in manifest order (a
    string such as "committed", "present" or "busy", or the exception the fill raised)."""

    outcomes: list[tuple[Digest, str | BaseException]]

    @property
    def closed(self) -> UpstreamFailure | None:
        """The last failure that closed the upstream until a known time: retry then."""
        found = None
        for _, outcome in self.outcomes:
            if isinstance(outcome, UpstreamFailure) and reopens_in(outcome) is not None:
                found = outcome
        return found


async def prefetch_blobs(
    deps: FillDeps, upstreams: UpstreamChain, name: str, repository: str, digests: Sequence[Digest]
) -> Prefetched:
    """Fill `digests` of upstream `repository` into our repository `name`, one download at a
    time; waits for every fill started to end. Fill failures are outcomes, not raised."""
    fills: list[asyncio.Task[str]] = []
    for digest in digests:
        downloaded = asyncio.Event()
        task = asyncio.create_task(fill_blob(deps, upstreams, name, repository, digest, downloaded))
        fills.append(task)
        waiting = asyncio.create_task(downloaded.wait())
        await asyncio.wait([task, waiting], return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if task.done() and _upstream_closed(task):
            break
    outcomes = await asyncio.gather(*fills, return_exceptions=True)
    return Prefetched(list(zip(digests, outcomes, strict=False)))


def _upstream_closed(task: asyncio.Task[str]) -> bool:
    failure = task.exception()
    return isinstance(failure, UpstreamFailure) and failure.kind in CLOSED_KINDS
