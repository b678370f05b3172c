"""Manifests of proxy projects: serve locally, revalidate tags with HEAD, fetch each digest once.

Upstream quota is spent only on a manifest GET of a digest we do not hold (HEAD is free
on Docker Hub). Any upstream failure on a tag we hold serves the cached copy, marked
stale; with nothing cached, the failure becomes a clear OCI error. A project with several
upstreams asks them in order (shared/proxy/upstreams.py): "failure" here means the whole
chain failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.leases import Lease
from shared.localcache import LocalCache, SingleFlight
from shared.metrics import DIGEST_MISMATCHES
from shared.oci.digest import Digest
from shared.oci.errors import RegistryError
from shared.oci.manifest import parse_manifest
from shared.oci.reference import is_valid_tag
from shared.proxy.upstreams import UpstreamPool
from shared.registry.blobs import BlobStore
from shared.registry.repositories import RepositoryStore, Revision
from shared.routing import Target
from shared.upstream import UpstreamFailure

log = structlog.get_logger("proxy")

HIT, MISS, STALE = "hit", "miss", "stale"
FETCH_LEASE_SECONDS = 30.0
UPSTREAM_TROUBLE = frozenset({429, 502, 503, 504})
WAIT_POLL_SECONDS = 0.05


@dataclass(frozen=True, slots=True)
class CachedManifest:
    revision: Revision
    body: bytes
    result: str  # hit, miss or stale


# Called with the blobs of a newly cached image manifest (the edge enqueues a prefetch).
PrefetchHook = Callable[[Target, list[Digest]], Awaitable[None]]


def _fresh_key(name: str, tag: str) -> str:
    return f"seawall:fresh:{name}:{tag}"


class ManifestCache:
    def __init__(
        self,
        repositories: RepositoryStore,
        blobs: BlobStore,
        redis: Redis,
        upstreams: UpstreamPool,
        prefetch: PrefetchHook,
    ) -> None:
        self._repositories = repositories
        self._blobs = blobs
        self._redis = redis
        self._upstreams = upstreams
        self._prefetch = prefetch
        # Freshness markers seen in Redis, kept here as long as the lookups they go with
        # (never past the marker's own expiry); a revalidation here updates this at once.
        self._fresh: LocalCache[str, bool] = LocalCache(repositories.local_ttl)
        self._asking: SingleFlight[str, bool] = SingleFlight()

    async def get(self, target: Target, reference: str) -> CachedManifest:
        if Digest.is_digest(reference):
            return await self._by_digest(target, Digest.parse(reference))
        if not is_valid_tag(reference):
            raise RegistryError("MANIFEST_UNKNOWN", detail={"reference": reference[:200]})
        return await self._by_tag(target, reference)

    async def _local(self, name: str, digest: Digest | None) -> tuple[Revision, bytes] | None:
        if digest is None:
            return None
        revision = await self._repositories.revision(name, digest)
        if revision is None:
            return None
        return revision, await self._blobs.read(digest)

    async def _by_digest(self, target: Target, digest: Digest) -> CachedManifest:
        held = await self._local(target.name, digest)
        if held:
            return CachedManifest(*held, HIT)
        try:
            return await self._fetch(target, digest, tag=None)
        except RedisError as exc:
            raise _redis_unavailable(target, str(digest), exc) from None

    async def _by_tag(self, target: Target, tag: str) -> CachedManifest:
        tagged = await self._repositories.resolve_tag(target.name, tag)
        held = await self._local(target.name, tagged)
        try:
            return await self._revalidate(target, tag, tagged, held)
        except RedisError as exc:
            # Without Redis there is no freshness marker, no quota governor and no fetch
            # lease, so the upstream is not asked: what is held is served, marked stale.
            if held:
                log.warning("serving_stale_manifest", repository=target.name, tag=tag, reason=str(exc))
                return CachedManifest(*held, STALE)
            raise _redis_unavailable(target, tag, exc) from None

    async def _revalidate(
        self, target: Target, tag: str, tagged: Digest | None, held: tuple[Revision, bytes] | None
    ) -> CachedManifest:
        """Answer a tag we may hold: locally while fresh, else as the upstream's HEAD says."""
        if held and await self._is_fresh(target, tag):
            return CachedManifest(*held, HIT)

        upstreams = await self._upstreams.chain(target.project)
        try:
            head = await upstreams.first(
                "manifest HEAD", lambda upstream: upstream.head_manifest(target.path, tag)
            )
        except UpstreamFailure as failure:
            if held:
                log.warning("serving_stale_manifest", repository=target.name, tag=tag, reason=str(failure))
                return CachedManifest(*held, STALE)
            raise failure.to_registry_error("MANIFEST_UNKNOWN") from None
        if head is None:
            # The upstream says the tag is gone; a mirror reflects that (the cached
            # content stays reachable by digest).
            raise RegistryError("MANIFEST_UNKNOWN", f"{target.path}:{tag} does not exist upstream")

        digest = Digest.parse(head.digest) if head.digest else None
        if digest is not None:
            held_now = held if tagged == digest else await self._local(target.name, digest)
            if held_now:
                if tagged != digest:
                    await self._repositories.set_tag(target.name, tag, digest)
                await self._mark_fresh(target, tag)
                return CachedManifest(*held_now, HIT)
        try:
            result = await self._fetch(target, digest, tag=tag)
        except RegistryError as error:
            # The tag moved but the new manifest cannot be had (quota, upstream trouble):
            # the previous image still pulls.
            if held and error.status in UPSTREAM_TROUBLE:
                log.warning("serving_stale_manifest", repository=target.name, tag=tag, reason=error.message)
                return CachedManifest(*held, STALE)
            raise
        await self._mark_fresh(target, tag)
        return result

    async def _is_fresh(self, target: Target, tag: str) -> bool:
        """Whether the tag was confirmed within its TTL (RedisError when Redis cannot say)."""
        key = _fresh_key(target.name, tag)
        if self._fresh.get(key):
            return True
        return await self._asking.run(key, partial(self._ask_fresh, key))

    async def _ask_fresh(self, key: str) -> bool:
        ttl_ms = int(await self._redis.pttl(key))  # -2: no marker; -1: one without expiry
        if ttl_ms == -2:
            return False
        self._fresh.put(key, True, min(self._fresh.ttl, ttl_ms / 1000) if ttl_ms > 0 else None)
        return True

    async def _mark_fresh(self, target: Target, tag: str) -> None:
        ttl_ms = int(target.project.tag_ttl.total_seconds() * 1000)
        if ttl_ms > 0:
            key = _fresh_key(target.name, tag)
            self._fresh.put(key, True, min(self._fresh.ttl, ttl_ms / 1000))
            with contextlib.suppress(RedisError):
                await self._redis.set(key, "1", px=ttl_ms)

    async def _fetch(self, target: Target, digest: Digest | None, tag: str | None) -> CachedManifest:
        """GET a manifest upstream once cluster-wide; concurrent askers wait for that GET."""
        reference = str(digest) if digest else str(tag)
        lease = Lease(self._redis, f"seawall:manifest-fetch:{target.name}@{reference}", FETCH_LEASE_SECONDS)
        deadline = time.monotonic() + FETCH_LEASE_SECONDS
        while not await lease.acquire():
            await asyncio.sleep(WAIT_POLL_SECONDS)
            done = await self._fetched_meanwhile(target, digest, tag)
            if done:
                return done
            if time.monotonic() > deadline:
                raise RegistryError("UPSTREAM_TIMEOUT", f"fetching {target.path}@{reference} took too long")
        async with lease.heartbeat():
            done = await self._fetched_meanwhile(target, digest, tag)
            if done:
                return done
            return await self._get_and_store(target, digest, tag)

    async def _fetched_meanwhile(
        self, target: Target, digest: Digest | None, tag: str | None
    ) -> CachedManifest | None:
        if digest is None and tag is not None:
            if not await self._is_fresh(target, tag):
                return None
            digest = await self._repositories.resolve_tag(target.name, tag)
        held = await self._local(target.name, digest)
        if held is None:
            return None
        if tag is not None and digest is not None:
            await self._repositories.set_tag(target.name, tag, digest)
        return CachedManifest(*held, HIT)

    async def _get_and_store(self, target: Target, digest: Digest | None, tag: str | None) -> CachedManifest:
        upstreams = await self._upstreams.chain(target.project)
        reference = str(digest) if digest else str(tag)
        try:
            fetched = await upstreams.first(
                "manifest GET", lambda upstream: upstream.get_manifest(target.path, reference)
            )
        except UpstreamFailure as failure:
            raise failure.to_registry_error("MANIFEST_UNKNOWN") from None
        if fetched is None:
            raise RegistryError("MANIFEST_UNKNOWN", f"{target.path}@{reference} does not exist upstream")
        # The digest is computed over the exact bytes received; a tag fetch trusts nothing else.
        actual = Digest.of(fetched.body, digest.algorithm if digest else "sha256")
        if digest is not None and actual != digest:
            DIGEST_MISMATCHES.labels("upstream").inc()
            log.error(
                "manifest_digest_mismatch", repository=target.name, expected=str(digest), actual=str(actual)
            )
            raise RegistryError("UPSTREAM_ERROR", f"upstream manifest for {digest} hashes to {actual}")
        try:
            manifest = parse_manifest(fetched.body, fetched.media_type)
        except RegistryError as invalid:
            raise RegistryError(
                "UPSTREAM_ERROR", f"upstream sent an invalid manifest: {invalid.message}"
            ) from None

        # Claimed before commit_bytes finds it stored (an eviction may be deleting it).
        await self._repositories.claim([actual], self._blobs)
        await self._blobs.commit_bytes(actual, fetched.body)
        revision = await self._repositories.add_revision(target.name, actual, manifest)
        if tag is not None:
            await self._repositories.set_tag(target.name, tag, actual)
        log.info(
            "manifest_cached", repository=target.name, digest=str(actual), media_type=manifest.media_type
        )
        # An index's platform manifests are fetched only when a client asks for one: each
        # costs a pull. An image's config and layers are free to fetch, so prefetch them.
        if not manifest.is_index:
            try:
                await self._prefetch(target, [descriptor.digest for descriptor in manifest.blobs])
            except RedisError as exc:
                # The manifest is stored: the client gets it, and its layers are filled
                # when asked for.
                log.warning("prefetch_not_requested", repository=target.name, reason=str(exc))
        return CachedManifest(revision, fetched.body, MISS)


def _redis_unavailable(target: Target, reference: str, exc: RedisError) -> RegistryError:
    return RegistryError(
        "UNAVAILABLE",
        f"{target.path}:{reference} is not cached, and fetching it needs Redis, which is unavailable",
        detail={"reason": str(exc)[:200]},
    )
