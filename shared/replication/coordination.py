"""What the tasks of replication share through Redis beside their records (store.py): the blob
gate, so that a blob goes to a destination once however many tasks need it at the same
moment, and the referrer tag-scheme tags a run found when it listed each source repository.

Both only save work: a Redis error here never fails a copy. Without the gate a blob may be
sent by two tasks at once (as it was before there was one); without the listed tags a copy
asks the source for each tag-scheme tag with a HEAD.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.leases import Lease
from shared.replication.store import RECORD_TTL_SECONDS

log = structlog.get_logger("worker")

_PREFIX = "seawall:replication"
# A task sending a blob holds the gate this long past its last heartbeat (a third of it),
# so a task whose worker died keeps the others waiting at most this long.
GATE_TTL_SECONDS = 10.0
# A waiting task looks at the gate this often, doubling up to the longest pause.
GATE_POLL_SECONDS = 0.05
GATE_POLL_MAX_SECONDS = 0.5
# Where a task stored a blob is remembered this long, for others to mount it from.
LOCATION_TTL_SECONDS = 3600
# Members written per command when saving the tag-scheme tags.
TAGS_PER_COMMAND = 1000


def destination_scope(local: bool, name: str) -> str:
    """A destination as the gate names it: a local project and an upstream may share a name."""
    return f"{'project' if local else 'upstream'}:{name}"


def gate_key(destination: str, digest: str) -> str:
    """The lease of the task sending `digest` to `destination` (a `destination_scope`)."""
    return f"{_PREFIX}:blob:{destination}:{digest}"


def location_key(destination: str, digest: str) -> str:
    """The repository of `destination` a task last stored `digest` in."""
    return f"{_PREFIX}:blob:{destination}:{digest}:at"


def listed_tags_key(execution_id: str) -> str:
    """A set: `<repository> <tag>` for each tag-scheme tag the execution's listing found in a
    source repository, and `<repository> ` for each repository it listed (neither a
    repository name nor a tag holds a space)."""
    return f"{_PREFIX}:execution:{execution_id}:scheme-tags"


# Take over the gate from an earlier run of the same task (the holder starts with ARGV[1]):
# its worker died and its message came back, or it runs twice; either way it is not to be
# waited for.
_TAKE_OVER = """
local holder = redis.call('get', KEYS[1])
if holder and string.sub(holder, 1, string.len(ARGV[1])) == ARGV[1] then
  redis.call('set', KEYS[1], ARGV[2], 'px', ARGV[3])
  return 1
end
return 0
"""


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


class _Ungated:
    """Leave given when the gate cannot be asked: the blob is sent as without a gate."""

    located: str | None = None

    async def sent(self, repository: str) -> None:
        return None

    async def release(self) -> None:
        return None


class _LeasePass:
    """Leave held by a lease renewed by its heartbeat until released."""

    def __init__(
        self, redis: Redis, key: str, located: str | None, heartbeat: contextlib.AsyncExitStack
    ) -> None:
        self._redis = redis
        self._key = key
        self._heartbeat = heartbeat
        self.located = located

    async def sent(self, repository: str) -> None:
        with contextlib.suppress(RedisError):
            await self._redis.set(self._key, repository, ex=LOCATION_TTL_SECONDS)

    async def release(self) -> None:
        await self._heartbeat.aclose()


class RedisBlobGate:
    """The `BlobGate` of copy.py over a Redis lease per destination (a `destination_scope`)
    and digest (shared/leases.py), so tasks in every worker process share it. `owner` names
    the task: a lease an earlier run of it left is taken over, not waited for."""

    def __init__(
        self, redis: Redis, destination: str, *, owner: str = "", ttl: float = GATE_TTL_SECONDS
    ) -> None:
        self._redis = redis
        self._destination = destination
        self._owner = f"{owner} " if owner else ""
        self._ttl = ttl

    async def enter(self, digest: str) -> _LeasePass | _Ungated | None:
        key = gate_key(self._destination, digest)
        lease = Lease(self._redis, key, ttl=self._ttl)
        lease.holder = f"{self._owner}{lease.holder}"
        try:
            if not await lease.acquire() and not (
                self._owner
                and await self._redis.eval(_TAKE_OVER, 1, key, self._owner, lease.holder, str(lease.ttl_ms))
            ):
                return None
            located = _text(await self._redis.get(location_key(self._destination, digest)))
        except RedisError as exc:
            log.warning("replication_gate_unavailable", digest=digest, error=str(exc))
            await lease.release()
            return _Ungated()
        heartbeat = contextlib.AsyncExitStack()
        await heartbeat.enter_async_context(lease.heartbeat())
        return _LeasePass(self._redis, location_key(self._destination, digest), located, heartbeat)

    async def wait(self, digest: str) -> None:
        """Poll the lease until it is gone: released, or lapsed with its holder's heartbeat."""
        key = gate_key(self._destination, digest)
        pause = GATE_POLL_SECONDS
        while True:
            try:
                left_ms = int(await self._redis.pttl(key))
            except RedisError:
                return  # cannot tell: look at the destination again
            if left_ms < 0:  # gone (-2), or a key without expiry no heartbeat keeps (-1)
                return
            await asyncio.sleep(min(pause, left_ms / 1000 + 0.01))
            pause = min(pause * 2, GATE_POLL_MAX_SECONDS)


class RedisListedTags:
    """The `ListedTags` of copy.py: what the execution's planning saved for a repository."""

    def __init__(self, redis: Redis, execution_id: str, repository: str) -> None:
        self._redis = redis
        self._key = listed_tags_key(execution_id)
        self._repository = repository

    async def present(self, tags: Sequence[str]) -> set[str] | None:
        members = [f"{self._repository} ", *(f"{self._repository} {tag}" for tag in tags)]
        try:
            found = await self._redis.smismember(self._key, members)
        except RedisError as exc:
            log.warning("replication_listed_tags_unavailable", error=str(exc))
            return None
        if not found or not found[0]:
            return None  # not listed by this execution (an on-push run), or gone
        return {tag for tag, member in zip(tags, found[1:], strict=True) if member}


async def save_listed_tags(redis: Redis, execution_id: str, listed: Mapping[str, Sequence[str]]) -> None:
    """Keep the tag-scheme tags found in each source repository for the execution's tasks.

    One transaction, each repository's own member last, so a task never takes a repository
    for listed before all its tags are there. A start planned again only adds: a tag it no
    longer finds costs a HEAD that finds nothing, never a signature left behind.
    """
    if not listed:
        return
    key = listed_tags_key(execution_id)
    members = [f"{repository} {tag}" for repository, tags in listed.items() for tag in tags]
    members += [f"{repository} " for repository in listed]
    async with redis.pipeline(transaction=True) as pipe:
        for start in range(0, len(members), TAGS_PER_COMMAND):
            pipe.sadd(key, *members[start : start + TAGS_PER_COMMAND])
        pipe.expire(key, RECORD_TTL_SECONDS)
        await pipe.execute()


async def forget_listed_tags(redis: Redis, execution_id: str) -> None:
    """The execution is over: its tasks no longer need what its listing found."""
    with contextlib.suppress(RedisError):
        await redis.delete(listed_tags_key(execution_id))
