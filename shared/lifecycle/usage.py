"""Project usage and quotas: a Redis ledger of the unique bytes each hosted project's
manifests reference, checked and updated atomically when a manifest is stored.

Per project, the ledger holds every (repository, manifest) it counted ("members", each
with the digests and sizes it references: the manifest itself, its config and layers),
a reference count and size per digest, and the total of the sizes of the digests counted
at least once. Adding a member that is there already changes nothing, so a re-push of a
manifest costs nothing, and a blob shared by several images counts once.

`admit` (at manifest PUT, and in `RepositoryStore.add_revision` for every other writer)
checks the project's quota and adds the member in one script: a push that would take the
project over is refused with DENIED before anything of it is referenced. Removing a
revision removes its member and leaves a tombstone.

Redis is disposable: a missing ledger (flushed, or never built) is rebuilt from the
bucket with the inventory, and garbage collection rebuilds every project's after its
mark. Members written while a rebuild read the bucket are kept (their revision is found
in the bucket, or they are younger than IN_FLIGHT_SECONDS: a push under way), tombstoned
ones dropped when their revision is gone. Times are Redis's own clock. When Redis cannot
be reached a push is not refused for it (the quota is not checked then, which is logged).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from functools import partial

import structlog
from pydantic import ByteSize
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.lifecycle.inventory import RepositoryView, bounded, read_repositories
from shared.metrics import PROJECT_BYTES
from shared.oci.digest import Digest
from shared.oci.errors import RegistryError
from shared.oci.manifest import Manifest
from shared.registry import layout
from shared.registry.blobs import BlobStore
from shared.registry.repositories import project_of
from shared.registry.storage import ObjectStore
from shared.settings import Settings

log = structlog.get_logger("usage")

# A member the bucket does not show (yet) is kept by a rebuild while this young: its
# manifest PUT may be between the ledger and the revision's write.
IN_FLIGHT_SECONDS = 120.0
TOMBSTONE_SECONDS = 86_400.0

_PARTS = ("members", "refs", "sizes", "bytes", "ready", "gone")

_NOW = """
local t = redis.call('time')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
"""

# KEYS: members, refs, sizes, bytes, ready. ARGV: member, quota (-1: none), digest, size, ...
# Returns {status, usage, need}: status 'ok', 'denied' or 'missing' (no ledger).
_ADMIT = (
    _NOW
    + """
if redis.call('exists', KEYS[5]) == 0 then return {'missing', 0, 0} end
local total = tonumber(redis.call('get', KEYS[4]) or '0')
if redis.call('hexists', KEYS[1], ARGV[1]) == 1 then return {'ok', total, 0} end
local need, seen, value = 0, {}, string.format('%.6f', now)
for i = 3, #ARGV, 2 do
  local d = ARGV[i]
  if not seen[d] then
    seen[d] = ARGV[i + 1]
    value = value .. ' ' .. d .. ' ' .. ARGV[i + 1]
    if (tonumber(redis.call('hget', KEYS[2], d)) or 0) <= 0 then need = need + tonumber(ARGV[i + 1]) end
  end
end
local quota = tonumber(ARGV[2])
if quota >= 0 and need > 0 and total + need > quota then return {'denied', total, need} end
for d, size in pairs(seen) do
  if redis.call('hincrby', KEYS[2], d, 1) == 1 then redis.call('hset', KEYS[3], d, size) end
end
redis.call('hset', KEYS[1], ARGV[1], value)
redis.call('incrby', KEYS[4], need)
return {'ok', total + need, need}
"""
)

# KEYS: members, refs, sizes, bytes, ready, gone. ARGV: member. Returns the usage.
_REMOVE = (
    _NOW
    + """
redis.call('hset', KEYS[6], ARGV[1], string.format('%.6f', now))
local value = redis.call('hget', KEYS[1], ARGV[1])
if value then
  redis.call('hdel', KEYS[1], ARGV[1])
  local first = true
  local d
  for word in string.gmatch(value, '%S+') do
    if first then first = false
    elseif not d then d = word
    else
      if redis.call('hincrby', KEYS[2], d, -1) <= 0 then
        local s = tonumber(redis.call('hget', KEYS[3], d) or word)
        redis.call('hdel', KEYS[2], d)
        redis.call('hdel', KEYS[3], d)
        redis.call('decrby', KEYS[4], s)
      end
      d = nil
    end
  end
end
return tonumber(redis.call('get', KEYS[4]) or '0')
"""
)

# KEYS: members, gone. Returns {now, members..., '', tombstoned...}.
_READ = (
    _NOW
    + """
local out = {string.format('%.6f', now)}
for _, m in ipairs(redis.call('hkeys', KEYS[1])) do table.insert(out, m) end
table.insert(out, '')
for _, m in ipairs(redis.call('hkeys', KEYS[2])) do table.insert(out, m) end
return out
"""
)

# KEYS: members, refs, sizes, bytes, ready, gone.
# ARGV: cutoff (when the members were read), tombstones' lifetime, then member, value pairs
# (the rebuilt set).
# Members added or removed since the cutoff win over the rebuilt set. Returns the usage.
_REPLACE = (
    _NOW
    + """
local cutoff = tonumber(ARGV[1])
local final = {}
for i = 3, #ARGV, 2 do final[ARGV[i]] = ARGV[i + 1] end
local live = redis.call('hgetall', KEYS[1])
for i = 1, #live, 2 do
  local at = tonumber(string.match(live[i + 1], '^(%S+)')) or 0
  if at >= cutoff then final[live[i]] = live[i + 1] end
end
local gone = redis.call('hgetall', KEYS[6])
for i = 1, #gone, 2 do
  local at = tonumber(gone[i + 1]) or 0
  if at >= cutoff and final[gone[i]] then
    local added = tonumber(string.match(final[gone[i]], '^(%S+)')) or 0
    if added < at then final[gone[i]] = nil end
  end
  if at < now - tonumber(ARGV[2]) then redis.call('hdel', KEYS[6], gone[i]) end
end
redis.call('del', KEYS[1], KEYS[2], KEYS[3])
local total = 0
for m, value in pairs(final) do
  redis.call('hset', KEYS[1], m, value)
  local first, d = true, nil
  for word in string.gmatch(value, '%S+') do
    if first then first = false
    elseif not d then d = word
    else
      if redis.call('hincrby', KEYS[2], d, 1) == 1 then
        redis.call('hset', KEYS[3], d, word)
        total = total + tonumber(word)
      end
      d = nil
    end
  end
end
redis.call('set', KEYS[4], string.format('%d', total))
redis.call('set', KEYS[5], '1')
return total
"""
)


def _keys(project: str) -> list[str]:
    return [f"seawall:usage:{project}:{part}" for part in _PARTS]


def member(repository: str, digest: Digest) -> str:
    return f"{repository}@{digest}"


def references(digest: Digest, manifest: Manifest) -> dict[Digest, int]:
    """What a stored manifest makes its project hold: itself, its config and its layers
    (an index's children and a referrer's subject are manifests counted on their own)."""
    found = {digest: len(manifest.raw)}
    for descriptor in manifest.blobs:
        found.setdefault(descriptor.digest, descriptor.size)
    return found


def _value(added: float, refs: Mapping[Digest, int]) -> str:
    return " ".join([f"{added:.6f}", *(f"{d} {s}" for d, s in refs.items())])


def _bytes(n: int) -> str:
    return f"{ByteSize(n).human_readable()} ({n} bytes)"


class UsageLedger:
    """The ledger of hosted projects' usage; proxy projects are not counted here (their
    cache is measured by eviction)."""

    def __init__(self, redis: Redis, settings: Settings, objects: ObjectStore, blobs: BlobStore) -> None:
        self._redis = redis
        self._settings = settings
        self._objects = objects
        self._blobs = blobs
        self._admit = redis.register_script(_ADMIT)
        self._remove = redis.register_script(_REMOVE)
        self._read = redis.register_script(_READ)
        self._replace = redis.register_script(_REPLACE)
        self._rebuilding: dict[str, asyncio.Lock] = {}

    def counts(self, project: str) -> bool:
        found = self._settings.project(project)
        return found is not None and found.type == "hosted"

    def quota(self, project: str) -> int | None:
        found = self._settings.project(project)
        return int(found.quota) if found is not None and found.quota is not None else None

    async def admit(self, repository: str, digest: Digest, manifest: Manifest) -> None:
        """Count the manifest `digest` of `repository`, or raise DENIED if that would take
        its project over its quota. Counting what is counted already changes nothing."""
        project = project_of(repository)
        if not self.counts(project):
            return
        quota = self.quota(project)
        refs = references(digest, manifest)
        args: list[str | int] = [member(repository, digest), -1 if quota is None else quota]
        for d, size in refs.items():
            args += [str(d), size]
        try:
            status, usage, need = await self._admit(keys=_keys(project)[:5], args=args)
            if status == b"missing":
                if quota is None:
                    return  # counted when the ledger is next rebuilt (GC, `usage`)
                await self._rebuild_from_bucket(project)
                status, usage, need = await self._admit(keys=_keys(project)[:5], args=args)
            if status == b"missing":  # flushed again meanwhile: not checked this once
                raise RedisError("the usage ledger vanished while it was rebuilt")
        except RedisError as exc:
            log.warning("quota_not_checked", project=project, repository=repository, reason=str(exc))
            return
        if status == b"denied":
            raise RegistryError(
                "DENIED",
                f"project {project} is over its quota: {_bytes(int(usage))} of {_bytes(quota or 0)} used,"
                f" this push needs {_bytes(int(need))} more",
                detail={"project": project, "quota": quota, "usage": int(usage), "needs": int(need)},
            )
        PROJECT_BYTES.labels(project).set(int(usage))

    async def remove(self, repository: str, digest: Digest) -> None:
        """Uncount the manifest `digest` of `repository` (its revision was deleted)."""
        project = project_of(repository)
        if not self.counts(project):
            return
        try:
            usage = await self._remove(keys=_keys(project), args=[member(repository, digest)])
        except RedisError as exc:
            # Counted until the next rebuild: a quota errs on the side of the stored bytes.
            log.warning("usage_not_updated", project=project, repository=repository, reason=str(exc))
            return
        PROJECT_BYTES.labels(project).set(int(usage))

    async def usage(self, project: str) -> int:
        """The project's usage in bytes (rebuilt from the bucket if Redis lost it)."""
        keys = _keys(project)
        total, ready = await self._redis.mget([keys[3], keys[4]])
        if ready is None:
            return await self._rebuild_from_bucket(project)
        PROJECT_BYTES.labels(project).set(int(total or 0))
        return int(total or 0)

    async def _rebuild_from_bucket(self, project: str) -> int:
        lock = self._rebuilding.setdefault(project, asyncio.Lock())
        async with lock:
            keys = _keys(project)
            total, ready = await self._redis.mget([keys[3], keys[4]])
            if ready is not None:  # rebuilt while this waited
                return int(total or 0)
            views = await read_repositories(self._objects, self._blobs, project=project)
            return await self.rebuild(project, views)

    async def rebuild(
        self, project: str, views: Iterable[RepositoryView] | Mapping[str, RepositoryView]
    ) -> int:
        """Replace the project's ledger with what `views` (read from the bucket) reference,
        keeping what was pushed or deleted meanwhile; returns the usage."""
        listed = views.values() if isinstance(views, Mapping) else views
        snapshot: dict[str, str] = {}
        for view in listed:
            if view.project != project:
                continue
            for image in view.images.values():
                refs = {image.digest: image.size}
                for d, size in zip(image.blobs, image.blob_sizes, strict=False):
                    refs.setdefault(d, size)
                for d in image.blobs[len(image.blob_sizes) :]:
                    refs.setdefault(d, view.links.get(d, (0, 0.0))[0])
                snapshot[member(view.name, image.digest)] = _value(image.pushed, refs)
        keys = _keys(project)
        read = [x.decode() for x in await self._read(keys=[keys[0], keys[5]])]
        cutoff, rest = float(read[0]), read[1:]
        split = rest.index("")
        live, gone = set(rest[:split]), set(rest[split + 1 :])
        # Counted but not listed (pushed during the listing, or a push that failed after
        # it was counted), and listed but deleted since: the bucket says which holds.
        doubtful = sorted((live - snapshot.keys()) | (gone & snapshot.keys()))
        present = await bounded([partial(self._revision_exists, m) for m in doubtful])
        raw: list[bytes | str | None] = await self._redis.hmget(keys[0], doubtful) if doubtful else []
        for name, exists, value in zip(doubtful, present, raw, strict=True):
            if name in snapshot and not exists:
                del snapshot[name]
            elif name not in snapshot and value is not None:
                text = value.decode() if isinstance(value, bytes) else value
                if exists or float(text.split(" ", 1)[0]) >= cutoff - IN_FLIGHT_SECONDS:
                    snapshot[name] = text
        args: list[str | float] = [cutoff, TOMBSTONE_SECONDS]
        for name, kept in snapshot.items():
            args += [name, kept]
        total = int(await self._replace(keys=keys, args=args))
        PROJECT_BYTES.labels(project).set(total)
        log.info("usage_rebuilt", project=project, images=len(snapshot), bytes=total)
        return total

    async def _revision_exists(self, name: str) -> bool:
        repository, _, digest = name.rpartition("@")
        return await self._objects.stat(layout.revision(repository, Digest.parse(digest))) is not None
