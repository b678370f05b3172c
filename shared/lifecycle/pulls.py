"""When each image and tag was last pulled: recorded by the edges, read by eviction and retention.

A pull costs no I/O on the request path: the edge notes it in memory (`PullRecorder.pulled`)
and flushes what it noted every few seconds, one pipeline per project, into a sorted set
per project (`ZADD GT`, so edges flushing out of order never move a time backwards).
Members are `<repository>@<digest>` and `<repository>:<tag>` (a repository name never
holds `@` or `:`), scores epoch seconds.

Redis is disposable, so the record may be lost. A lost record must never make an image
look old: the record carries the time from which it is complete (`since`, set when the
first write finds it missing), and an age is never counted from before it. The lifecycle
runs also write a snapshot of the merged record to the bucket
(`lifecycle/pulls/<project>.json`), so after a loss the order in which images were last
pulled (what eviction by size needs) survives, and record first-seen = now for images
that have no record at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import cast

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.oci.digest import Digest
from shared.registry.repositories import project_of
from shared.registry.storage import ObjectMissing, ObjectStore

log = structlog.get_logger("pulls")

FLUSH_SECONDS = 5.0
# Pulls noted while Redis is away are kept for the next flush, up to this many members;
# beyond it new ones are dropped (an image without a record is never taken as old).
MAX_PENDING = 100_000


def pulls_key(project: str) -> str:
    return f"seawall:pulls:{project}"


def since_key(project: str) -> str:
    """When the project's record began: it holds every pull since then."""
    return f"seawall:pulls:{project}:since"


def snapshot_key(project: str) -> str:
    return f"lifecycle/pulls/{project}.json"


def image_member(repository: str, digest: Digest | str) -> str:
    return f"{repository}@{digest}"


def tag_member(repository: str, tag: str) -> str:
    return f"{repository}:{tag}"


class PullRecorder:
    """The edge's notes of pulls, flushed to Redis every `flush_seconds`."""

    def __init__(self, redis: Redis, flush_seconds: float = FLUSH_SECONDS) -> None:
        self._redis = redis
        self._flush_seconds = flush_seconds
        self._pending: dict[str, dict[str, float]] = {}
        self._count = 0
        self._task: asyncio.Task[None] | None = None

    def pulled(self, repository: str, digest: Digest, tag: str | None) -> None:
        """Note a pull of `repository`'s manifest `digest` (by `tag`, if by tag): no I/O."""
        now = time.time()
        members = self._pending.setdefault(project_of(repository), {})
        for member in (image_member(repository, digest), tag_member(repository, tag) if tag else None):
            if member is None:
                continue
            if member not in members:
                if self._count >= MAX_PENDING:
                    continue
                self._count += 1
            members[member] = now

    async def start(self) -> None:
        self._task = asyncio.create_task(self._flush_forever(), name="pull-recorder")

    async def close(self) -> None:
        """Stop flushing periodically and flush what is left (bounded by the client's timeouts)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self._flush_seconds)
            await self.flush()

    async def flush(self) -> None:
        pending, self._pending, self._count = self._pending, {}, 0
        for project, members in pending.items():
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.set(since_key(project), repr(min(members.values())), nx=True)
                    pipe.zadd(pulls_key(project), members, gt=True)
                    await pipe.execute()
            except RedisError as exc:
                log.warning("pulls_not_recorded", project=project, members=len(members), reason=str(exc))
                self._keep(project, members)

    def _keep(self, project: str, members: dict[str, float]) -> None:
        """Put back what could not be flushed, keeping the later time of each member."""
        kept = self._pending.setdefault(project, {})
        for member, when in members.items():
            if member in kept:
                kept[member] = max(kept[member], when)
            elif self._count < MAX_PENDING:
                kept[member] = when
                self._count += 1


@dataclass
class PullHistory:
    """A project's merged record of pulls, as a lifecycle run reads it."""

    times: dict[str, float]
    # Every pull since this time is in `times`; before it, the record may have been lost.
    since: float

    def last(self, members: Iterable[str]) -> float | None:
        """The latest recorded pull of any of `members` (None: no record)."""
        found = [self.times[m] for m in members if m in self.times]
        return max(found) if found else None

    def age_floor(self, members: Iterable[str]) -> float:
        """The time from which to count the members' age: their last pull, but never before
        the record began (a pull before a loss of the record may have been lost with it)."""
        return max(self.last(members) or 0.0, self.since)


async def _snapshot(objects: ObjectStore, project: str) -> dict[str, float]:
    try:
        raw = await objects.get_bytes(snapshot_key(project))
    except ObjectMissing:
        return {}
    try:
        pulls = json.loads(raw)["pulls"]
        return {str(m): float(t) for m, t in pulls.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        log.warning("pull_snapshot_unreadable", project=project)
        return {}


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _recorded(redis: Redis, project: str) -> dict[str, float]:
    entries = cast(list[tuple[bytes, float]], await redis.zrange(pulls_key(project), 0, -1, withscores=True))
    return {_text(member): float(when) for member, when in entries}


def _merge(*records: dict[str, float]) -> dict[str, float]:
    merged: dict[str, float] = {}
    for record in records:
        for member, when in record.items():
            merged[member] = max(merged.get(member, 0.0), when)
    return merged


async def last_pulls(redis: Redis, objects: ObjectStore, project: str) -> dict[str, float]:
    """The project's last pulls, `repo@<digest>` and `repo:<tag>` -> epoch s: Redis's record
    merged with the snapshot in the bucket."""
    recorded, snapshot = await asyncio.gather(_recorded(redis, project), _snapshot(objects, project))
    return _merge(recorded, snapshot)


async def read_history(redis: Redis, objects: ObjectStore, project: str, now: float) -> PullHistory:
    """The merged record and when it began (now, if Redis had no record: it starts here)."""
    await redis.set(since_key(project), repr(now), nx=True)
    raw_since = await redis.get(since_key(project))
    since = float(raw_since) if raw_since is not None else now
    return PullHistory(await last_pulls(redis, objects, project), since)


async def note_first_seen(
    redis: Redis, project: str, history: PullHistory, members: Collection[str], now: float
) -> None:
    """Images (or tags) with no record at all count as pulled now, in Redis and in `history`."""
    missing = {m: now for m in members if m not in history.times}
    if missing:
        await redis.zadd(pulls_key(project), missing, nx=True)
        history.times.update(missing)


async def save_history(
    redis: Redis,
    objects: ObjectStore,
    project: str,
    history: PullHistory,
    current: Collection[str],
    started: float,
) -> None:
    """Write the snapshot of the members still current, and drop from Redis the records of
    members that are gone (only those not pulled since the run started: one pulled meanwhile
    may be an image cached again)."""
    kept = {m: t for m, t in history.times.items() if m in current}
    body = {"version": 1, "written": time.time(), "since": history.since, "pulls": kept}
    await objects.put_bytes(snapshot_key(project), json.dumps(body).encode(), content_type="application/json")
    stale = cast(list[bytes], await redis.zrangebyscore(pulls_key(project), "-inf", f"({started!r}"))
    gone = [member for member in (_text(m) for m in stale) if member not in current]
    if gone:
        await redis.zrem(pulls_key(project), *gone)
