"""Live state of blob fills in Redis: lease, progress and outcome, shared by workers and edges.

Redis is disposable: losing this state only makes edges re-request a fill, which resumes
from the segments already staged in the bucket.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import Redis

from shared.oci.digest import Digest

QUEUED, FILLING, VERIFIED, COMMITTED, FAILED = "queued", "filling", "verified", "committed", "failed"
DOWNLOAD_OVER = frozenset({VERIFIED, COMMITTED, FAILED})
# Where followers read the bytes a fill has made available: its staged segments, or the
# copy already stored (when the fill only checks that the upstream serves that content).
FROM_SEGMENTS, FROM_BLOB = "segments", "blob"
_STATE_TTL = 3600


def lease_key(digest: Digest) -> str:
    return f"seawall:fill:{digest}:lease"


def state_key(digest: Digest) -> str:
    return f"seawall:fill:{digest}:state"


@dataclass(frozen=True, slots=True)
class FillState:
    status: str | None = None
    size: int | None = None
    staged: int = 0
    source: str = FROM_SEGMENTS
    spool: str | None = None  # the node whose local spool holds the fill's bytes
    error_code: str | None = None
    error: str | None = None
    retry_after: float | None = None
    updated: float = 0.0


async def read_state(redis: Redis, digest: Digest) -> FillState:
    stored = cast(dict[bytes, bytes], await redis.hgetall(state_key(digest)))
    raw = {k.decode(): v.decode() for k, v in stored.items()}
    if not raw:
        return FillState()
    return FillState(
        status=raw.get("status"),
        size=int(raw["size"]) if raw.get("size") else None,
        staged=int(raw.get("staged") or 0),
        source=raw.get("source") or FROM_SEGMENTS,
        spool=raw.get("spool") or None,
        error_code=raw.get("error_code") or None,
        error=raw.get("error") or None,
        retry_after=float(raw["retry_after"]) if raw.get("retry_after") else None,
        updated=float(raw.get("updated") or 0),
    )


async def write_state(redis: Redis, digest: Digest, **fields: str | int | float | None) -> None:
    mapping: dict[Any, Any] = {k: ("" if v is None else str(v)) for k, v in fields.items()}
    mapping["updated"] = str(time.time())
    key = state_key(digest)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(key, mapping=mapping)
        pipe.expire(key, _STATE_TTL)
        await pipe.execute()


def remote_key(digest: Digest) -> str:
    return f"seawall:fill:{digest}:remote"


REMOTE_TTL_MS = 30_000


async def mark_remote_follower(redis: Redis, digest: Digest) -> None:
    """An edge that cannot read the worker's spool follows this fill: stage it right away."""
    await redis.set(remote_key(digest), "1", px=REMOTE_TTL_MS)


async def being_filled(redis: Redis, digest: Digest) -> bool:
    """Whether a fill holds the blob's lease now."""
    return bool(await redis.exists(lease_key(digest)))


async def remote_follower(redis: Redis, digest: Digest) -> bool:
    return bool(await redis.exists(remote_key(digest)))


# Edges reading a spool mark their machine busy (refreshed while they read), so that
# staging to the bucket waits for the clients there.
SPOOL_READERS_TTL_MS = 1_000


def spool_readers_key(node: str) -> str:
    return f"seawall:spool:{node}:readers"


async def mark_spool_readers(redis: Redis, node: str) -> None:
    await redis.set(spool_readers_key(node), "1", px=SPOOL_READERS_TTL_MS)


async def spool_readers_active(redis: Redis, node: str) -> bool:
    return bool(await redis.exists(spool_readers_key(node)))


# Who asked for a fill: a waiting client (the fills queue) or a prefetch (its own queue,
# worked through one image at a time). Each is deduplicated on its own, so a client never
# waits behind a prefetch still queued.
CLIENT, PREFETCH = "client", "prefetch"


def _queued_key(digest: Digest, kind: str, project: str) -> str:
    return f"seawall:fill:{digest}:queued:{kind}:{project}"


async def request_fill(
    redis: Redis, digest: Digest, project: str, kind: str = CLIENT, dedupe_seconds: float = 30.0
) -> bool:
    """Mark a fill as wanted for `project`; True when the caller should enqueue it.

    A fill running for this project, or one queued for it moments ago, makes a new one
    needless. A fill running for another project does not: this project's own upstream
    must vouch for the blob before its clients may read that fill (see `entitled`).
    Nobody holds the lease: reset a stale outcome (a past failure) so followers wait for
    the new attempt instead of reading the old verdict.
    """
    filling = await being_filled(redis, digest)
    if filling and await entitled(redis, digest, project):
        return False
    queued = await redis.set(_queued_key(digest, kind, project), "1", nx=True, px=int(dedupe_seconds * 1000))
    if not queued:
        return False
    await redis.delete(_refusal_key(digest, project))
    if not filling:
        state = await read_state(redis, digest)
        if state.status != COMMITTED:
            await write_state(redis, digest, status=QUEUED, error_code=None, error=None)
    return True


async def clear_queued(redis: Redis, digest: Digest, project: str) -> None:
    await redis.delete(_queued_key(digest, CLIENT, project), _queued_key(digest, PREFETCH, project))


# A fill's state is shared by every project that wants the digest, but its bytes may be
# read only by projects whose own upstream serves that blob: the project the fill runs
# for, and each one whose upstream answered a HEAD for it in its own repository. The
# blob's content is the same for all (it is addressed by its digest); the right to read
# it is not, or a digest alone would open another project's blob.
def _entitled_key(digest: Digest) -> str:
    return f"seawall:fill:{digest}:projects"


def _refusal_key(digest: Digest, project: str) -> str:
    return f"seawall:fill:{digest}:refused:{project}"


REFUSAL_TTL_SECONDS = 60


async def entitle(redis: Redis, digest: Digest, project: str) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        pipe.sadd(_entitled_key(digest), project)
        pipe.expire(_entitled_key(digest), _STATE_TTL)
        await pipe.execute()


async def entitled(redis: Redis, digest: Digest, project: str) -> bool:
    return bool(await redis.sismember(_entitled_key(digest), project))


async def refuse(redis: Redis, digest: Digest, project: str, code: str, message: str) -> None:
    """This project's upstream did not vouch for the blob: its followers fail with `code`."""
    value = json.dumps({"code": code, "message": message})
    await redis.set(_refusal_key(digest, project), value, ex=REFUSAL_TTL_SECONDS)


async def refusal(redis: Redis, digest: Digest, project: str) -> tuple[str, str] | None:
    raw = await redis.get(_refusal_key(digest, project))
    if raw is None:
        return None
    found = json.loads(raw)
    return str(found["code"]), str(found["message"])
