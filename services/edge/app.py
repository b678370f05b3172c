"""The edge's app factory: `create_app(settings)` wires state, middlewares and routes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from services.edge import keys
from services.edge.middleware import serve_request
from services.edge.onpush import push_events
from services.edge.routes import setup_routes
from shared import diskcache, redisguard
from shared.auth.access import Access
from shared.auth.tokens import TokenSigner
from shared.jobs import make_broker
from shared.lifecycle.guard import ReferenceGuard
from shared.lifecycle.pulls import PullRecorder
from shared.lifecycle.usage import UsageLedger
from shared.metrics import declare_series
from shared.oci.digest import Digest
from shared.proxy.events import CacheEvents
from shared.proxy.follow import BlobFollower
from shared.proxy.manifests import ManifestCache
from shared.proxy.spool import Spool
from shared.proxy.upstreams import UpstreamPool
from shared.registry.blobs import BlobStore
from shared.registry.layout import TOKEN_SECRET_KEY
from shared.registry.repositories import LOCAL_TTL_SECONDS, RepositoryStore
from shared.registry.storage import ObjectStore
from shared.registry.uploads import UploadStore
from shared.routing import Target
from shared.settings import Settings


async def _storage(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    if settings.s3 is None:
        raise RuntimeError("no object storage configured: set s3 in seawall.yaml or run `seawall up`")
    store = ObjectStore(settings.s3)
    try:
        await store.ensure_bucket()
        blobs = BlobStore(store)
        app[keys.STORE] = store
        app[keys.BLOBS] = blobs
        # Pushes tell a running collection what they reference, and are counted against quotas.
        redis = app[keys.REDIS]
        app[keys.GUARD] = guard = ReferenceGuard(redis)
        app[keys.LEDGER] = ledger = UsageLedger(redis, settings, store, blobs)
        app[keys.REPOSITORIES] = RepositoryStore(
            store, redis, guard=guard, ledger=ledger, local_ttl=LOCAL_TTL_SECONDS
        )
        app[keys.UPLOADS] = UploadStore(store, blobs)
        yield
    finally:
        store.close()


async def _disk_cache(app: web.Application) -> AsyncIterator[None]:
    """The local disk tier for hot blobs, unless `disk_cache.max_bytes` is 0."""
    cache = await asyncio.to_thread(diskcache.from_settings, app[keys.SETTINGS])
    if cache is None:
        yield
        return
    app[keys.DISK_CACHE] = cache
    try:
        yield
    finally:
        await cache.aclose()


async def _auth(app: web.Application) -> AsyncIterator[None]:
    """Credentials and the token signer every replica shares."""
    settings = app[keys.SETTINGS]
    if settings.token_secret is not None:
        secret = settings.token_secret.get_secret_value().encode()
    else:
        secret = await app[keys.STORE].shared_secret(TOKEN_SECRET_KEY)
    access = Access(settings, TokenSigner(secret))
    app[keys.ACCESS] = access
    try:
        yield
    finally:
        access.close()


async def _redis(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    if settings.redis_url is None:
        raise RuntimeError("no Redis configured: set redis_url in seawall.yaml or run `seawall up`")
    # Every call bounded by `redis_timeout`, and Redis skipped for a moment after a failure:
    # what needs it degrades (see shared/redisguard.py) instead of holding requests.
    redis = redisguard.connect(settings.redis_url, settings.redis_timeout.total_seconds())
    try:
        app[keys.REDIS] = redis
        yield
    finally:
        await redis.aclose()


async def _proxy(app: web.Application) -> AsyncIterator[None]:
    """The pull-through cache: upstream clients, cache-miss events, fill followers."""
    settings = app[keys.SETTINGS]
    redis = app[keys.REDIS]
    events = CacheEvents(make_broker(settings.redis_url or "", settings.redis_timeout.total_seconds()))
    upstreams = UpstreamPool(settings, redis)
    try:
        app[keys.EVENTS] = events
        app[keys.UPSTREAMS] = upstreams

        async def prefetch(target: Target, digests: list[Digest]) -> None:
            await events.want_prefetched(redis, target, digests)

        app[keys.MANIFEST_CACHE] = ManifestCache(
            app[keys.REPOSITORIES], app[keys.BLOBS], redis, upstreams, prefetch
        )
        spool = Spool(settings.disk_cache_path, create=False)
        app[keys.FOLLOWER] = BlobFollower(
            app[keys.STORE], app[keys.BLOBS], app[keys.REPOSITORIES], redis, spool
        )
        yield
    finally:
        await upstreams.close()
        events.close()


async def _pulls(app: web.Application) -> AsyncIterator[None]:
    """Pulls noted in memory and flushed to Redis every few seconds (eviction and retention
    read them); the last notes are flushed at shutdown."""
    recorder = PullRecorder(app[keys.REDIS])
    app[keys.PULLS] = recorder
    await recorder.start()
    try:
        yield
    finally:
        await recorder.close()


def create_app(settings: Settings) -> web.Application:
    # The upload size cap is per request body; blobs are streamed, so no cap applies there.
    app = web.Application(middlewares=[serve_request], client_max_size=0)
    app[keys.SETTINGS] = settings
    declare_series([p.name for p in settings.projects], [u.name for u in settings.upstreams])
    app.cleanup_ctx.append(_redis)
    app.cleanup_ctx.append(_storage)
    app.cleanup_ctx.append(_pulls)
    app.cleanup_ctx.append(_disk_cache)
    app.cleanup_ctx.append(_auth)
    app.cleanup_ctx.append(_proxy)
    app.cleanup_ctx.append(push_events)
    setup_routes(app)
    return app
