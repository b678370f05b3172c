"""Per-process resources for actors: settings, storage, Redis and upstream clients.

Created lazily on the worker's event loop (Dramatiq's AsyncIO middleware runs one per
process) and kept for the life of the process.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from redis.asyncio import Redis

from shared import diskcache
from shared.logging import configure_logging
from shared.metrics import declare_series
from shared.oci.digest import Digest
from shared.proxy.events import CacheEvents, make_broker
from shared.proxy.fill import FillDeps
from shared.proxy.manifests import ManifestCache
from shared.proxy.spool import Spool
from shared.proxy.upstreams import UpstreamPool
from shared.registry.blobs import BlobStore
from shared.registry.repositories import RepositoryStore
from shared.registry.storage import ObjectStore
from shared.registry.uploads import UploadStore
from shared.routing import Target
from shared.settings import Settings, load_settings


@cache
def settings() -> Settings:
    loaded = load_settings()
    configure_logging(loaded.log_format, loaded.log_level)
    declare_series([p.name for p in loaded.projects], [u.name for u in loaded.upstreams])
    return loaded


@dataclass(frozen=True)
class Stores:
    objects: ObjectStore
    blobs: BlobStore
    repositories: RepositoryStore
    uploads: UploadStore


@cache
def stores() -> Stores:
    s3 = settings().s3
    if s3 is None:
        raise RuntimeError("workers need s3 settings (set them, or start them with `seawall up`)")
    objects = ObjectStore(s3)
    blobs = BlobStore(objects)
    return Stores(objects, blobs, RepositoryStore(objects, redis()), UploadStore(objects, blobs))


@cache
def redis() -> Redis:
    return Redis.from_url(settings().redis_url or "", health_check_interval=30)


@cache
def upstreams() -> UpstreamPool:
    return UpstreamPool(settings(), redis())


@cache
def events() -> CacheEvents:
    return CacheEvents(make_broker(settings().redis_url or ""))


@cache
def fill_deps() -> FillDeps:
    found = stores()
    loaded = settings()
    tier = diskcache.from_settings(loaded)
    spool = Spool(loaded.disk_cache_path)
    return FillDeps(found.objects, found.blobs, found.repositories, redis(), events(), spool, tier)


@cache
def manifest_cache() -> ManifestCache:
    found = stores()

    async def prefetch(target: Target, digests: list[Digest]) -> None:
        await events().want_prefetched(redis(), target, digests)

    return ManifestCache(found.repositories, found.blobs, redis(), upstreams(), prefetch)
