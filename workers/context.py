"""What a worker process's jobs share: settings, stores, Redis, upstream clients, events.

`WorkerContext.open(settings)` builds it and `close()` closes what it opened. In a worker
process, `WorkerContextMiddleware` builds one when the worker boots, on the event loop of
Dramatiq's AsyncIO middleware (where every actor runs, so the clients belong to that
loop), and closes it at shutdown; actors get it with `current()`. Tests build their own.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import dramatiq
import structlog
from dramatiq.asyncio import EventLoopThread, get_event_loop_thread
from redis.asyncio import Redis

from shared import diskcache
from shared.diskcache import DiskCache
from shared.jobs import make_broker
from shared.lifecycle.guard import ReferenceGuard
from shared.lifecycle.runs import LifecycleDeps
from shared.lifecycle.usage import UsageLedger
from shared.oci.digest import Digest
from shared.proxy.events import CacheEvents
from shared.proxy.fill import FillDeps
from shared.proxy.manifests import ManifestCache
from shared.proxy.spool import Spool
from shared.proxy.upstreams import UpstreamPool
from shared.registry.blobs import BlobStore
from shared.registry.repositories import RepositoryStore
from shared.registry.storage import ObjectStore
from shared.registry.uploads import UploadStore
from shared.routing import Target
from shared.settings import Settings

log = structlog.get_logger("worker")
# Idle pooled connections are checked with a PING before use after this long.
HEALTH_CHECK_SECONDS = 30


@dataclass(frozen=True, kw_only=True)
class WorkerContext:
    settings: Settings
    objects: ObjectStore
    blobs: BlobStore
    repositories: RepositoryStore
    uploads: UploadStore
    redis: Redis
    upstreams: UpstreamPool
    events: CacheEvents
    spool: Spool
    disk_cache: DiskCache | None
    manifests: ManifestCache
    fill: FillDeps
    # What a lifecycle job condemns against, and the project usage ledger (also given to
    # `repositories`, so every write here claims and counts).
    guard: ReferenceGuard
    ledger: UsageLedger
    _opened: contextlib.AsyncExitStack = field(repr=False)

    @classmethod
    async def open(cls, settings: Settings) -> WorkerContext:
        """Build the clients `settings` name (none connects yet); on a failure, close those built."""
        if settings.redis_url is None:
            raise RuntimeError("workers need redis_url (set it, or start them with `seawall up`)")
        if settings.s3 is None:
            raise RuntimeError("workers need s3 settings (set them, or start them with `seawall up`)")
        async with contextlib.AsyncExitStack() as opened:
            objects = ObjectStore(settings.s3)
            opened.callback(objects.close)
            redis = Redis.from_url(settings.redis_url, health_check_interval=HEALTH_CHECK_SECONDS)
            opened.push_async_callback(redis.aclose)
            upstreams = UpstreamPool(settings, redis)
            opened.push_async_callback(upstreams.close)
            events = CacheEvents(make_broker(settings.redis_url))
            opened.callback(events.close)
            # Start-up counts the files already in the tier: off the event loop.
            disk_cache = await asyncio.to_thread(diskcache.from_settings, settings)
            if disk_cache is not None:
                opened.push_async_callback(disk_cache.aclose)
            spool = Spool(settings.disk_cache_path)
            blobs = BlobStore(objects)
            guard = ReferenceGuard(redis)
            ledger = UsageLedger(redis, settings, objects, blobs)
            repositories = RepositoryStore(objects, redis, guard=guard, ledger=ledger)

            async def prefetch(target: Target, digests: list[Digest]) -> None:
                await events.want_prefetched(redis, target, digests)

            return cls(
                settings=settings,
                objects=objects,
                blobs=blobs,
                repositories=repositories,
                uploads=UploadStore(objects, blobs),
                redis=redis,
                upstreams=upstreams,
                events=events,
                spool=spool,
                disk_cache=disk_cache,
                manifests=ManifestCache(repositories, blobs, redis, upstreams, prefetch),
                fill=FillDeps(
                    objects=objects,
                    blobs=blobs,
                    repositories=repositories,
                    redis=redis,
                    events=events,
                    spool=spool,
                    disk_cache=disk_cache,
                ),
                guard=guard,
                ledger=ledger,
                _opened=opened.pop_all(),
            )

    @property
    def lifecycle(self) -> LifecycleDeps:
        """The clients the storage lifecycle's jobs (workers/lifecycle.py) work with."""
        return LifecycleDeps(
            settings=self.settings,
            objects=self.objects,
            blobs=self.blobs,
            repositories=self.repositories,
            redis=self.redis,
            guard=self.guard,
        )

    async def close(self) -> None:
        """Close what `open` built, the last built first."""
        await self._opened.aclose()


_current: WorkerContext | None = None
# Why this process has no context, when building it failed (jobs then fail with that).
_missing = "the broker needs WorkerContextMiddleware"


def current() -> WorkerContext:
    """This worker process's context (see WorkerContextMiddleware)."""
    if _current is None:
        raise RuntimeError(f"no worker context: {_missing}")
    return _current


class WorkerContextMiddleware(dramatiq.Middleware):
    """Builds the process's WorkerContext as the worker boots and closes it at shutdown.

    Add it after the AsyncIO middleware: its boot hook then runs once that middleware's
    event loop is running, and its shutdown hook before the loop stops. Building before
    the worker threads take messages (rather than after boot) means no job finds it missing.
    A context that cannot be built (no s3 settings) leaves the worker running, as a job's
    failure would: its jobs fail, are retried, and say why.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def before_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        global _current, _missing
        try:
            _current = _event_loop().run_coroutine(WorkerContext.open(self._settings))
        except Exception as exc:
            _missing = str(exc) or type(exc).__name__
            log.error("worker_context_failed", error=_missing)

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        global _current
        context, _current = _current, None
        if context is not None:
            _event_loop().run_coroutine(context.close())


def _event_loop() -> EventLoopThread:
    thread = get_event_loop_thread()
    if thread is None:
        raise RuntimeError("WorkerContextMiddleware needs the AsyncIO middleware before it")
    return thread
