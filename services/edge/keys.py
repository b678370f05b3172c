"""Typed application state: every AppKey of the edge, declared once."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from redis.asyncio import Redis

from shared.auth.access import Access
from shared.diskcache import DiskCache
from shared.lifecycle.guard import ReferenceGuard
from shared.lifecycle.pulls import PullRecorder
from shared.lifecycle.usage import UsageLedger
from shared.proxy.events import CacheEvents
from shared.proxy.follow import BlobFollower
from shared.proxy.manifests import ManifestCache
from shared.proxy.upstreams import UpstreamPool
from shared.registry.blobs import BlobStore
from shared.registry.repositories import RepositoryStore
from shared.registry.storage import ObjectStore
from shared.registry.uploads import UploadStore
from shared.replication.triggers import PushEvents
from shared.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
ACCESS = web.AppKey("access", Access)
STORE = web.AppKey("store", ObjectStore)
BLOBS = web.AppKey("blobs", BlobStore)
REPOSITORIES = web.AppKey("repositories", RepositoryStore)
UPLOADS = web.AppKey("uploads", UploadStore)
REDIS = web.AppKey("redis", Redis)
EVENTS = web.AppKey("events", CacheEvents)
UPSTREAMS = web.AppKey("upstreams", UpstreamPool)
MANIFEST_CACHE = web.AppKey("manifest_cache", ManifestCache)
FOLLOWER = web.AppKey("follower", BlobFollower)
PUSH_EVENTS = web.AppKey("push_events", PushEvents)
PULLS = web.AppKey("pulls", PullRecorder)
GUARD = web.AppKey("guard", ReferenceGuard)
LEDGER = web.AppKey("ledger", UsageLedger)
# Absent when the disk tier is off (`disk_cache.max_bytes: 0`).
DISK_CACHE = web.AppKey("disk_cache", DiskCache)

# Per-request state: the authenticated user (None when anonymous).
USER = web.RequestKey[str | None]("user")
# Set by a handler whose answer may be repeated as it is (services/edge/hot.py): what each
# repeat still does (count it, note the pull).
REPEAT = web.RequestKey[Callable[[], None]]("repeat")
