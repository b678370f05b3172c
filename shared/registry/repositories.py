"""Repository metadata in the bucket: blob links, manifest revisions, tags, referrers, catalog."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import TYPE_CHECKING, Any, cast

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.localcache import LocalCache, SingleFlight
from shared.oci.digest import Digest
from shared.oci.manifest import Descriptor, Manifest
from shared.registry import layout
from shared.registry.storage import ObjectMissing, ObjectStore

if TYPE_CHECKING:
    from shared.lifecycle.guard import ReferenceGuard
    from shared.lifecycle.usage import UsageLedger
    from shared.registry.blobs import BlobStore

log = structlog.get_logger("repositories")


@dataclass(frozen=True, slots=True)
class Revision:
    """A manifest held by a repository, with what its GET response needs."""

    digest: Digest
    media_type: str
    size: int
    subject: Digest | None = None

    def to_json(self) -> bytes:
        record: dict[str, Any] = {"mediaType": self.media_type, "size": self.size}
        if self.subject:
            record["subject"] = str(self.subject)
        return json.dumps(record).encode()

    @classmethod
    def from_json(cls, digest: Digest, raw: bytes) -> Revision:
        record = json.loads(raw)
        subject = record.get("subject")
        return cls(digest, record["mediaType"], record["size"], Digest.parse(subject) if subject else None)


# Tag and revision lookups are cached in Redis (shared by every replica, written through
# on every change here); the bucket stays the truth and answers when Redis cannot. An
# entry lives only briefly: a change made while this process could not reach Redis (or
# whose write-through Redis lost) leaves the old entry behind, and every edge must see a
# moved tag or a deleted manifest within 2 s whatever Redis did. The cache still spares
# the bucket all but one read per entry and interval of a hot repository, cluster-wide.
CACHE_TTL_MS = 1500
# An edge also keeps what it looked up in its own memory for up to LOCAL_TTL_SECONDS, and
# never past the Redis entry it came from: a warm GET then costs no Redis round trip, and
# a change made elsewhere is seen here within max(LOCAL_TTL_SECONDS, CACHE_TTL_MS) plus a
# bucket read. This process's own writes replace its entries at once.
LOCAL_TTL_SECONDS = 1.0
# Links this process found recently, per repository: a blob the disk tier holds is served
# on their word when the bucket does not answer in time (see `remembered_size`).
LINK_MEMORY_SECONDS = 600.0
LINK_MEMORY_ENTRIES = 50_000


def _tag_cache_key(name: str, tag: str) -> str:
    return f"seawall:tag:{name}:{tag}"


def _revision_cache_key(name: str, digest: Digest) -> str:
    return f"seawall:revision:{name}@{digest}"


# A hot record is the same bytes on every lookup: parsed once (records are immutable values).
@lru_cache(maxsize=4096)
def _parse_revision(digest: Digest, raw: bytes) -> Revision:
    return Revision.from_json(digest, raw)


@lru_cache(maxsize=4096)
def _parse_digest(raw: bytes) -> Digest:
    return Digest.parse(raw.decode())


def project_of(name: str) -> str:
    """Stored repository names are `<project>/<path>`."""
    return name.split("/", 1)[0]


class RepositoryStore:
    """`guard` (the storage lifecycle's reference guard) and `ledger` (project usage and
    quotas) are optional: without them references are written without telling a collection,
    and nothing is counted."""

    def __init__(
        self,
        store: ObjectStore,
        cache: Redis | None = None,
        *,
        guard: ReferenceGuard | None = None,
        ledger: UsageLedger | None = None,
        local_ttl: float = 0.0,
    ) -> None:
        """`local_ttl` > 0 keeps lookups in this process too (the edge: LOCAL_TTL_SECONDS)."""
        self._store = store
        self._cache = cache
        self.guard = guard
        self.ledger = ledger
        self._links: OrderedDict[tuple[str, Digest], tuple[int, float]] = OrderedDict()
        self._loading: SingleFlight[str, bytes | None] = SingleFlight()
        self._local: LocalCache[str, bytes] = LocalCache(local_ttl)
        # Bumped by every write here: a lookup that began before one does not keep its answer.
        self._writes = 0

    @property
    def writes(self) -> int:
        """How many writes this process made: an answer read before one may be out of date."""
        return self._writes

    @property
    def local_ttl(self) -> float:
        """How long this process keeps what it looked up (0: it asks Redis every time)."""
        return self._local.ttl

    async def _cached(self, key: str) -> tuple[bytes | None, float]:
        """The Redis entry and the seconds it has left (one round trip)."""
        if self._cache is None:
            return None, 0.0
        try:
            pipe = self._cache.pipeline(transaction=False)
            pipe.get(key)
            pipe.pttl(key)
            value, ttl_ms = await pipe.execute()
        except RedisError:
            return None, 0.0
        return cast(bytes | None, value), max(int(ttl_ms), 0) / 1000

    async def _remember(self, key: str, value: bytes) -> None:
        self._local.put(key, value)
        if self._cache is not None:
            with contextlib.suppress(RedisError):
                await self._cache.set(key, value, px=CACHE_TTL_MS)

    async def _forget(self, *keys: str) -> None:
        """Drop entries at once; if Redis cannot be told, they expire within CACHE_TTL_MS."""
        self._writes += 1
        self._local.drop(*keys)
        if self._cache is not None and keys:
            try:
                await self._cache.delete(*keys)
            except RedisError as exc:
                log.warning("lookup_cache_not_cleared", reason=str(exc), expires_ms=CACHE_TTL_MS)

    # -- repositories ------------------------------------------------------------------
    async def register(self, name: str) -> None:
        key = layout.catalog_entry(name)
        if await self._store.stat(key) is None:
            await self._store.put_bytes(key, name.encode())

    async def exists(self, name: str) -> bool:
        return await self._store.stat(layout.catalog_entry(name)) is not None

    async def names(self) -> list[str]:
        keys = await self._store.list_keys(layout.CATALOG)
        return sorted(layout.catalog_name(k) for k in keys)

    # -- references and the collection -----------------------------------------------
    async def claim(self, digests: Iterable[Digest], blobs: BlobStore | None = None) -> set[Digest]:
        """Tell a running collection that a write is about to reference `digests` (see
        shared/lifecycle/guard.py); call it before the checks that let the write skip work.
        Those checks then ask the bucket: the placements of `digests` are dropped from
        `blobs`, and for the digests it returns (condemned or deleted lately) everything
        this process remembers (links here too)."""
        if self.guard is None:
            return set()
        wanted = list(digests)
        found = await self.guard.claim(wanted)
        if blobs is not None:
            # A placement remembered for longer than the guard reports deletions (a day)
            # could name a blob collected since: the write's checks ask the bucket.
            for digest in wanted:
                blobs.forget_placement(digest)
        if found:
            for key in [key for key in self._links if key[1] in found]:
                del self._links[key]
            if blobs is not None:
                for digest in found:
                    blobs.forget(digest)
        return found

    # -- blob links --------------------------------------------------------------------
    async def link_blob(self, name: str, digest: Digest, size: int) -> None:
        await self.register(name)
        await self._store.put_bytes(layout.layer_link(name, digest), str(size).encode())
        await self._store.put_bytes(layout.project_blob(project_of(name), digest), str(size).encode())
        self._note_link(name, digest, size)

    async def project_holds(self, project: str, digest: Digest) -> bool:
        """Whether any repository of `project` has this blob.

        Blobs are stored once per digest, but sharing one with a repository of another
        project would hand out content to callers who know only its digest.
        """
        return await self._store.stat(layout.project_blob(project, digest)) is not None

    async def blob_linked(self, name: str, digest: Digest) -> bool:
        return await self._store.stat(layout.layer_link(name, digest)) is not None

    async def linked_size(self, name: str, digest: Digest) -> int | None:
        """The size recorded in the repository's link, None when the blob is not linked.

        One small read answers both "may this repository serve it" and "how big is it".
        """
        try:
            size = int(await self._store.get_bytes(layout.layer_link(name, digest)))
        except ObjectMissing:
            size = None
        self._note_link(name, digest, size)
        return size

    def remembered_size(self, name: str, digest: Digest) -> int | None:
        """The size of a link this process found or wrote within LINK_MEMORY_SECONDS.

        Only a stand-in for the bucket's answer while the bucket does not give one: every
        answer it gives replaces it, so a deleted link stops counting as soon as a lookup
        of it completes (on this process: at once).
        """
        found = self._links.get((name, digest))
        if found is None or time.monotonic() - found[1] > LINK_MEMORY_SECONDS:
            return None
        return found[0]

    def _note_link(self, name: str, digest: Digest, size: int | None) -> None:
        key = (name, digest)
        if size is None:
            self._links.pop(key, None)
            return
        self._links[key] = (size, time.monotonic())
        self._links.move_to_end(key)
        if len(self._links) > LINK_MEMORY_ENTRIES:
            self._links.popitem(last=False)

    async def unlink_blob(self, name: str, digest: Digest) -> bool:
        key = layout.layer_link(name, digest)
        self._note_link(name, digest, None)
        if await self._store.stat(key) is None:
            return False
        await self._store.delete(key)
        return True

    # -- manifests ---------------------------------------------------------------------
    async def add_revision(self, name: str, digest: Digest, manifest: Manifest) -> Revision:
        """Store the manifest's revision (and referrer entry); with a ledger, counted first
        (DENIED, with nothing written, if that takes the project over its quota)."""
        if self.ledger is not None:
            await self.ledger.admit(name, digest, manifest)
        revision = Revision(
            digest,
            manifest.media_type,
            len(manifest.raw),
            manifest.subject.digest if manifest.subject else None,
        )
        await self.register(name)
        await self._store.put_bytes(layout.revision(name, digest), revision.to_json())
        self._writes += 1
        await self._remember(_revision_cache_key(name, digest), revision.to_json())
        if manifest.subject is not None:
            descriptor = Descriptor(
                media_type=manifest.media_type,
                digest=digest,
                size=len(manifest.raw),
                artifact_type=manifest.referrer_artifact_type,
                annotations=manifest.annotations or None,
            )
            await self._store.put_bytes(
                layout.referrer(name, manifest.subject.digest, digest),
                json.dumps(descriptor.to_json()).encode(),
            )
        return revision

    async def revision(self, name: str, digest: Digest) -> Revision | None:
        raw = await self._lookup(_revision_cache_key(name, digest), layout.revision(name, digest))
        return _parse_revision(digest, raw) if raw is not None else None

    async def _lookup(self, cache_key: str, bucket_key: str) -> bytes | None:
        """A small record from this process, else the Redis cache, else the bucket (None if
        missing; a miss is never kept, as what is missing may arrive any moment).

        Concurrent misses of one key in this process share one Redis and bucket read: when
        a hot entry expires, every request that was waiting on it would otherwise ask at
        the same moment.
        """
        raw = self._local.get(cache_key)
        if raw is not None:
            return raw
        return await self._loading.run(cache_key, partial(self._load, cache_key, bucket_key))

    async def _load(self, cache_key: str, bucket_key: str) -> bytes | None:
        writes = self._writes
        raw, ttl = await self._cached(cache_key)
        if raw is not None:
            if writes == self._writes:
                self._local.put(cache_key, raw, min(self._local.ttl, ttl))
            return raw
        try:
            raw = await self._store.get_bytes(bucket_key)
        except ObjectMissing:
            return None
        if writes == self._writes:
            # Else a write here overtook this read: its entry stands, not this older answer.
            await self._remember(cache_key, raw)
        return raw

    async def delete_revision(self, name: str, revision: Revision) -> None:
        """Forget a manifest in this repository, with the tags and referrer entry naming it."""
        tag_names = await self.tags(name)
        tagged = await asyncio.gather(*(self.resolve_tag(name, t) for t in tag_names))
        doomed = [layout.tag(name, t) for t, d in zip(tag_names, tagged, strict=True) if d == revision.digest]
        if revision.subject is not None:
            doomed.append(layout.referrer(name, revision.subject, revision.digest))
        doomed.append(layout.revision(name, revision.digest))
        await self._store.delete_many(doomed)
        gone_tags = [t for t, d in zip(tag_names, tagged, strict=True) if d == revision.digest]
        await self._forget(
            _revision_cache_key(name, revision.digest), *(_tag_cache_key(name, t) for t in gone_tags)
        )
        if self.ledger is not None:
            await self.ledger.remove(name, revision.digest)

    # -- tags --------------------------------------------------------------------------
    async def resolve_tag(self, name: str, tag: str) -> Digest | None:
        raw = await self._lookup(_tag_cache_key(name, tag), layout.tag(name, tag))
        return _parse_digest(raw) if raw is not None else None

    async def set_tag(self, name: str, tag: str, digest: Digest) -> None:
        await self._store.put_bytes(layout.tag(name, tag), str(digest).encode())
        self._writes += 1
        await self._remember(_tag_cache_key(name, tag), str(digest).encode())

    async def delete_tag(self, name: str, tag: str) -> bool:
        key = layout.tag(name, tag)
        if await self._store.stat(key) is None:
            return False
        await self._store.delete(key)
        await self._forget(_tag_cache_key(name, tag))
        return True

    async def tags(self, name: str) -> list[str]:
        prefix = layout.tags(name)
        return sorted(k.removeprefix(prefix) for k in await self._store.list_keys(prefix))

    # -- referrers ---------------------------------------------------------------------
    async def referrers(self, name: str, subject: Digest) -> list[dict[str, Any]]:
        keys = await self._store.list_keys(layout.referrers(name, subject))
        bodies = await asyncio.gather(*(self._store.get_bytes(k) for k in keys), return_exceptions=True)
        # A referrer deleted between the listing and the read is simply gone.
        return [json.loads(b) for b in bodies if isinstance(b, bytes)]
