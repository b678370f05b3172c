"""A capped proxy cache's growth between evictions: fills count the bytes they add, and an
eviction is asked for as soon as the project nears its `max_bytes`.

The scheduled eviction runs every few minutes; a cache pulled hard can outgrow its cap in
less. So each fill that commits a blob into a proxy project with `cache.max_bytes` adds
the blob's size to a Redis counter of the project's cache bytes, and when the counter
passes `(1 - eviction_headroom) * max_bytes`, the size eviction brings it down to, one
eviction job is published (a burst of
fills asks once: a short-lived key marks the request). Every successful eviction sets the
counter to the bytes it measured, plus what fills added while it ran.

The counter only tells when to look: eviction measures the cache from the bucket. If Redis
loses it, it starts again from the fills seen since, and the next scheduled eviction sets
it right. Nothing here may fail a fill: Redis or broker trouble is logged and ignored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog
from redis.asyncio import Redis

from shared.lifecycle.runs import LifecycleReport
from shared.settings import Settings

log = structlog.get_logger("lifecycle")

# While this key lives, fills past the threshold do not ask for another eviction.
ASKED_SECONDS = 5
# Counting a fill and asking for an eviction never holds a fill's job longer than this.
GROWTH_TIMEOUT_SECONDS = 5.0

AskEviction = Callable[[str], Awaitable[None]]


def counter_key(project: str) -> str:
    """The project's cache bytes as last measured by eviction, plus fills since."""
    return f"seawall:lifecycle:cache-bytes:{project}"


def asked_key(project: str) -> str:
    return f"seawall:lifecycle:eviction-asked:{project}"


def trigger_bytes(settings: Settings, project: str) -> int | None:
    """The cache bytes past which a fill asks for an eviction of `project`, or None when
    the project is no proxy project with a `max_bytes`."""
    found = settings.project(project)
    if found is None or found.type != "proxy" or found.cache.max_bytes is None:
        return None
    headroom = settings.lifecycle.eviction_headroom
    # Asked as soon as the cache is over what an eviction leaves: waiting for the cap itself
    # (or halfway to it) let a fast-filling cache pass the cap before the eviction ran.
    return int((1 - headroom) * int(found.cache.max_bytes))


async def grew(redis: Redis, settings: Settings, project: str, added: int, ask: AskEviction) -> bool:
    """Count `added` bytes just committed into `project`'s cache; ask for an eviction (once
    within ASKED_SECONDS) when the count passes the trigger. Whether it asked; never raises."""
    trigger = trigger_bytes(settings, project)
    if trigger is None or added <= 0:
        return False
    try:
        async with asyncio.timeout(GROWTH_TIMEOUT_SECONDS):
            total = int(await redis.incrby(counter_key(project), added))
            if total <= trigger:
                return False
            if not await redis.set(asked_key(project), "1", nx=True, ex=ASKED_SECONDS):
                return False
            await ask(project)
    except Exception as exc:  # a fill that committed its blob has done its work
        log.warning(
            "cache_growth_not_counted", project=project, bytes=added, error=str(exc) or type(exc).__name__
        )
        return False
    log.info("cache_eviction_asked", project=project, cache_bytes=total, trigger=trigger)
    return True


async def counted(redis: Redis, project: str) -> int | None:
    """The counter as an eviction starts (0 when missing), or None if Redis did not answer."""
    try:
        async with asyncio.timeout(GROWTH_TIMEOUT_SECONDS):
            value = await redis.get(counter_key(project))
    except Exception as exc:
        log.warning("cache_growth_not_read", project=project, error=str(exc) or type(exc).__name__)
        return None
    return int(value) if value is not None else 0


async def measured(redis: Redis, report: LifecycleReport, before: int | None) -> None:
    """After an eviction: the counter becomes the bytes it left, plus what fills added while
    it ran (counted from `before`, the counter as it started: fills between that and the
    run's listing count twice, which only asks for the next eviction a little early)."""
    project = report.project
    if report.outcome != "succeeded" or report.dry_run or report.project_bytes is None or project is None:
        return
    try:
        async with asyncio.timeout(GROWTH_TIMEOUT_SECONDS):
            if before is None:
                await redis.set(counter_key(project), report.project_bytes)
            else:
                await redis.incrby(counter_key(project), report.project_bytes - before)
            # Fills past the trigger from now on ask again at once.
            await redis.delete(asked_key(project))
    except Exception as exc:
        log.warning("cache_growth_not_reset", project=project, error=str(exc) or type(exc).__name__)
