"""The fill protocol: what a worker filling a blob and the edges streaming it agree on.

One place for it: the fill's status and progress record in Redis (keys, TTLs, and one
typed method per step that writes it), the other per-fill keys (lease, remote follower,
spool readers, queued marks, entitlements, refusals), the timing both sides count on,
the staged segments in the bucket, and where an interrupted fill resumes.

Redis is disposable: losing this state only makes edges re-request a fill, which resumes
from the segments already staged in the bucket.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from redis.asyncio import Redis

from shared.oci.digest import Digest
from shared.registry import layout
from shared.registry.blobs import Extent
from shared.registry.storage import ObjectStore

# Timing both sides count on.
# A fill holds its lease for this long and renews it every third of it: a holder that died
# is replaced within it (by a fill that resumes), so an edge allows a stalled fill this
# much on top of the upstream's own timeouts.
LEASE_TTL = 10.0
# An edge following a fill asks for it again this often: if the holder died, its lease
# lapses and the new request starts a fill that resumes. The edge renews its remote
# follower mark (REMOTE_TTL_MS, far longer) at the same time.
REREQUEST_SECONDS = 1.0
REMOTE_TTL_MS = 30_000
# Edges reading a spool mark their machine busy, refreshed while they read, so that
# staging to the bucket waits for the clients there; the mark lapses soon after the last.
SPOOL_READERS_TTL_MS = 1_000
SPOOL_READERS_REFRESH_SECONDS = 0.25
# A request for a fill is not repeated (enqueued again) within this window.
QUEUED_DEDUPE_SECONDS = 30.0
REFUSAL_TTL_SECONDS = 60
# The progress record and the entitlements: long after any fill is over.
STATE_TTL_SECONDS = 3600


class FillStatus(enum.StrEnum):
    """Where a fill stands. The values are the strings in Redis (older processes write the
    same ones), so edges and workers of different versions still understand each other."""

    QUEUED = "queued"  # asked for; no worker has started it yet
    FILLING = "filling"  # downloading; `staged` says how far the bytes are readable
    VERIFIED = "verified"  # every byte in and hashed to the digest; the last byte may go
    COMMITTED = "committed"  # the blob is stored under its digest
    FAILED = "failed"  # the error fields say why


# Once a fill's download is over, the next download no longer shares the upstream link.
DOWNLOAD_OVER = frozenset({FillStatus.VERIFIED, FillStatus.COMMITTED, FillStatus.FAILED})


class FillSource(enum.StrEnum):
    """Where followers read the bytes a fill has made available: its staged segments, or
    the copy already stored (when the fill only checks that the upstream serves that
    content). The values are the strings in Redis."""

    SEGMENTS = "segments"
    BLOB = "blob"


# Who asked for a fill: a waiting client (the fills queue) or a prefetch (its own queue,
# worked through one image at a time). Each is deduplicated on its own, so a client never
# waits behind a prefetch still queued.
CLIENT, PREFETCH = "client", "prefetch"


def lease_key(digest: Digest) -> str:
    return f"seawall:fill:{digest}:lease"


def state_key(digest: Digest) -> str:
    return f"seawall:fill:{digest}:state"


def remote_key(digest: Digest) -> str:
    return f"seawall:fill:{digest}:remote"


def spool_readers_key(node: str) -> str:
    return f"seawall:spool:{node}:readers"


def _queued_key(digest: Digest, kind: str, project: str) -> str:
    return f"seawall:fill:{digest}:queued:{kind}:{project}"


def _entitled_key(digest: Digest) -> str:
    return f"seawall:fill:{digest}:projects"


def _refusal_key(digest: Digest, project: str) -> str:
    return f"seawall:fill:{digest}:refused:{project}"


_E = TypeVar("_E", FillStatus, FillSource)
_N = TypeVar("_N", int, float)


@dataclass(frozen=True, slots=True)
class FillState:
    """One reading of a fill's progress record; all defaults when no fill is known."""

    status: FillStatus | None = None
    size: int | None = None
    staged: int = 0  # bytes followers may read from `source`, from byte 0
    source: FillSource = FillSource.SEGMENTS
    spool: str | None = None  # the node whose local spool holds the fill's bytes
    error_code: str | None = None
    error: str | None = None
    retry_after: float | None = None
    updated: float = 0.0

    @classmethod
    def parse(cls, stored: Mapping[bytes, bytes]) -> FillState:
        """Read a record as Redis holds it. Missing or empty fields take their defaults, and
        fields or values this version does not know are ignored (a status it does not know
        reads as no status), so a record from another version never stops a follower."""
        raw = {k.decode(): v.decode() for k, v in stored.items()}
        source = raw.get("source")
        return cls(
            status=_member(FillStatus, raw.get("status")),
            size=_number(int, raw.get("size")),
            staged=_number(int, raw.get("staged")) or 0,
            source=_member(FillSource, source) or FillSource.SEGMENTS,
            spool=raw.get("spool") or None,
            error_code=raw.get("error_code") or None,
            error=raw.get("error") or None,
            retry_after=_number(float, raw.get("retry_after")),
            updated=_number(float, raw.get("updated")) or 0.0,
        )


def _member(kind: type[_E], value: str | None) -> _E | None:
    try:
        return kind(value) if value else None
    except ValueError:
        return None


def _number(kind: type[_N], value: str | None) -> _N | None:
    try:
        return kind(value) if value else None
    except ValueError:
        return None


class FillProgress:
    """The progress record of the fill of one digest: the worker holding the fill writes it,
    one method per step, and the edges read it. Every write refreshes the record's TTL and
    its `updated` time."""

    def __init__(self, redis: Redis, digest: Digest) -> None:
        self._redis = redis
        self.key = state_key(digest)

    async def read(self) -> FillState:
        return FillState.parse(cast(dict[bytes, bytes], await self._redis.hgetall(self.key)))

    async def queued(self) -> None:
        """Asked for again: a past outcome no longer holds, followers wait for the new one."""
        await self._write(status=FillStatus.QUEUED, error_code=None, error=None)

    async def started(self, source: FillSource, staged: int, spool: str | None) -> None:
        """A worker holds the fill: `staged` bytes are readable from `source` already (what
        an interrupted fill left), and the machine `spool` has them in its spool file."""
        await self._write(
            status=FillStatus.FILLING,
            staged=staged,
            source=source,
            spool=spool,
            error_code=None,
            error=None,
        )

    async def sized(self, size: int | None) -> None:
        """The upstream said how large the blob is (None: it did not)."""
        await self._write(size=size)

    async def progressed(self, staged: int) -> None:
        await self._write(staged=staged)

    async def verified(self) -> None:
        """Every byte is in and hashes to the digest: followers may send the last one."""
        await self._write(status=FillStatus.VERIFIED)

    async def committed(self, size: int) -> None:
        await self._write(status=FillStatus.COMMITTED, size=size, staged=size)

    async def failed(self, code: str, message: str, retry_after: float | None = None) -> None:
        """The fill failed: followers answer their clients with this OCI error."""
        await self._write(status=FillStatus.FAILED, error_code=code, error=message, retry_after=retry_after)

    async def _write(self, **fields: str | int | float | None) -> None:
        mapping: dict[Any, Any] = {k: ("" if v is None else str(v)) for k, v in fields.items()}
        mapping["updated"] = str(time.time())
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.key, mapping=mapping)
            pipe.expire(self.key, STATE_TTL_SECONDS)
            await pipe.execute()


async def being_filled(redis: Redis, digest: Digest) -> bool:
    """Whether a fill holds the blob's lease now."""
    return bool(await redis.exists(lease_key(digest)))


async def mark_remote_follower(redis: Redis, digest: Digest) -> None:
    """An edge that cannot read the worker's spool follows this fill: stage it right away."""
    await redis.set(remote_key(digest), "1", px=REMOTE_TTL_MS)


async def remote_follower(redis: Redis, digest: Digest) -> bool:
    return bool(await redis.exists(remote_key(digest)))


async def mark_spool_readers(redis: Redis, node: str) -> None:
    await redis.set(spool_readers_key(node), "1", px=SPOOL_READERS_TTL_MS)


async def spool_readers_active(redis: Redis, node: str) -> bool:
    return bool(await redis.exists(spool_readers_key(node)))


async def request_fill(
    redis: Redis,
    digest: Digest,
    project: str,
    kind: str = CLIENT,
    dedupe_seconds: float = QUEUED_DEDUPE_SECONDS,
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
        progress = FillProgress(redis, digest)
        if (await progress.read()).status != FillStatus.COMMITTED:
            await progress.queued()
    return True


async def clear_queued(redis: Redis, digest: Digest, project: str) -> None:
    await redis.delete(_queued_key(digest, CLIENT, project), _queued_key(digest, PREFETCH, project))


# A fill's state is shared by every project that wants the digest, but its bytes may be
# read only by projects whose own upstream serves that blob: the project the fill runs
# for, and each one whose upstream answered a HEAD for it in its own repository. The
# blob's content is the same for all (it is addressed by its digest); the right to read
# it is not, or a digest alone would open another project's blob.
async def entitle(redis: Redis, digest: Digest, project: str) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        pipe.sadd(_entitled_key(digest), project)
        pipe.expire(_entitled_key(digest), STATE_TTL_SECONDS)
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


# A fill's staged segments in the bucket. Each segment is written once under a key of its
# own (`layout.fill_segment`): a fill that lost its lease and writes late can add segments,
# never replace one a blob record names. So a listing may hold two segments that start at
# the same byte (two attempts); both hold the upstream's bytes at those offsets, and
# readers take the first.
@dataclass(frozen=True, slots=True)
class Segment:
    key: str
    start: int
    size: int

    @property
    def end(self) -> int:
        return self.start + self.size


async def staged_segments(objects: ObjectStore, digest: Digest) -> list[Segment]:
    """Every staged segment of the fill of `digest`, by first byte."""
    listing = await objects.list_objects(layout.fill_segments(digest))
    found = [Segment(o.key, layout.start_of(o.key), o.size) for o in listing]
    return sorted(found, key=lambda s: (s.start, s.key))


def contiguous(segments: list[Segment]) -> list[Segment]:
    """The segments that continue each other from byte 0, one per start, up to the first gap."""
    chain: list[Segment] = []
    for segment in segments:
        end = chain[-1].end if chain else 0
        if segment.start == end and segment.size:
            chain.append(segment)
    return chain


@dataclass(slots=True)
class ResumePoint:
    """Where an interrupted fill stands."""

    kept: list[Extent]  # the staged segments it keeps, from byte 0
    offset: int  # how far its bytes reach (in the spool file, positioned there)
    hasher: hashlib._Hash  # the hash of those bytes

    @property
    def staged(self) -> int:
        return sum(extent.size for extent in self.kept)


async def resume_point(
    objects: ObjectStore, digest: Digest, spooled: int, listed: list[Segment]
) -> ResumePoint:
    """Where the fill of `digest` resumes, given its spool file and its staged segments.

    The contiguous staged prefix counts. Segments after a gap, or duplicates of a start,
    are left alone rather than deleted: a fill that lost its lease may still commit them
    (each fill commits only the keys it wrote or kept). A spool file left on this machine
    that reaches further counts too: its bytes are rehashed, and the part not staged yet is
    staged again. Otherwise the spool is rewritten from the bucket.
    """
    hasher = digest.hasher()
    kept = [Extent(segment.key, segment.size) for segment in contiguous(listed)]
    staged = sum(extent.size for extent in kept)
    local = os.fstat(spooled).st_size
    if local >= staged:
        position = 0
        while position < local:
            chunk = os.pread(spooled, min(1024 * 1024, local - position), position)
            if not chunk:
                break
            hasher.update(chunk)
            position += len(chunk)
        os.lseek(spooled, position, os.SEEK_SET)
        return ResumePoint(kept, position, hasher)
    os.ftruncate(spooled, 0)
    os.lseek(spooled, 0, os.SEEK_SET)
    for extent in kept:
        async for chunk in objects.stream(extent.key):
            hasher.update(chunk)
            os.write(spooled, chunk)
    return ResumePoint(kept, staged, hasher)
