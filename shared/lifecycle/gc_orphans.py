"""The garbage collection's last step: objects nothing will ever read again.

- upload sessions past `upload_expiry` (purged as the janitor does: the parts a blob is
  made of stay);
- data objects no blob record names, past the grace period: bytes under `blobdata/` of a
  commit that lost a race or was cut short, parts under `extents/` of no open upload (a
  chunk that arrived after its upload closed), segments under `fills/` of fills no longer
  running (a fill in progress holds its lease; the collection takes that lease while it
  deletes a fill's segments, so none starts meanwhile). Quarantined blobs are kept.

Records are read again first (only those written since the mark began, which may name
objects the mark did not see), after the upload sessions are listed: a session that
finished meanwhile wrote its record before it went away, so its parts are named.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from shared.leases import Lease
from shared.lifecycle.gc_sweep import Sweeper, batches, checkpoint
from shared.lifecycle.inventory import StoredBlob, digest_of, pages, read_blobs
from shared.oci.digest import Digest
from shared.proxy import protocol
from shared.registry import layout
from shared.registry.storage import ObjectInfo
from shared.registry.uploads import UploadStore

# Records written from this long before the mark began are read again (the store's clock
# and this process's may differ by a little).
CLOCK_MARGIN_SECONDS = 60.0


async def sweep_orphans(sweeper: Sweeper, stored: dict[Digest, StoredBlob], mark_started: float) -> None:
    await _expired_uploads(sweeper, stored)
    sessions = await _open_sessions(sweeper)
    fresh = await read_blobs(
        sweeper.deps.objects, known=stored, reread_after=mark_started - CLOCK_MARGIN_SECONDS
    )
    named = {key for blob in fresh.values() for key in blob.extents or ()}
    await _data_orphans(sweeper, named)
    checkpoint("orphans")
    await _part_orphans(sweeper, named, sessions)
    await _fill_orphans(sweeper, named)


async def _expired_uploads(sweeper: Sweeper, stored: dict[Digest, StoredBlob]) -> None:
    deps = sweeper.deps
    uploads = UploadStore(deps.objects, deps.blobs)
    expired = await uploads.expired(sweeper.now - deps.settings.upload_expiry.total_seconds())
    named = {key for blob in stored.values() for key in blob.extents or ()}
    for upload_id in expired:
        sweeper.check_lease()
        parts = await deps.objects.list_objects(layout.upload_parts(upload_id))
        size = sum(part.size for part in parts if part.key not in named)
        if not sweeper.dry_run:
            await uploads.purge(upload_id)
        sweeper.report.deleting("upload", size, f"upload {upload_id}")
        sweeper.tick(1)


async def _open_sessions(sweeper: Sweeper) -> set[str]:
    """Ids of upload sessions that still hold objects (filer-backed stores keep the empty
    directory of a closed one)."""
    sessions: set[str] = set()
    async for page in pages(sweeper.deps.objects, layout.UPLOADS):
        sessions.update(info.key.removeprefix(layout.UPLOADS).split("/", 1)[0] for info in page)
    return sessions


async def _old_unnamed(sweeper: Sweeper, prefix: str, named: set[str]) -> list[ObjectInfo]:
    found: list[ObjectInfo] = []
    async for page in pages(sweeper.deps.objects, prefix):
        found.extend(i for i in page if i.key not in named and i.modified < sweeper.cutoff)
        sweeper.tick(len(page))
    return found


def _by_digest(prefix: str, objects: Iterable[ObjectInfo]) -> dict[Digest, list[ObjectInfo]]:
    """Objects under `<prefix><alg>/<hex>/` grouped by that digest."""
    grouped: dict[Digest, list[ObjectInfo]] = defaultdict(list)
    for info in objects:
        parts = info.key.removeprefix(prefix).split("/")
        digest = digest_of(parts[0], parts[1]) if len(parts) == 3 else None
        if digest is not None:
            grouped[digest].append(info)
    return grouped


async def _still_named(sweeper: Sweeper, digest: Digest) -> set[str]:
    """The extents the blob's record names now (read again, not from any cache)."""
    sweeper.deps.blobs.forget(digest)
    placement = await sweeper.deps.blobs.placement(digest)
    return {extent.key for extent in placement.extents or ()} if placement is not None else set()


async def _delete(sweeper: Sweeper, kind: str, doomed: list[ObjectInfo]) -> None:
    for batch in batches(doomed):
        sweeper.check_lease()
        if not sweeper.dry_run:
            await sweeper.deps.objects.delete_many(info.key for info in batch)
        for info in batch:
            sweeper.report.deleting(kind, info.size, f"{kind} {info.key}")


async def _data_orphans(sweeper: Sweeper, named: set[str]) -> None:
    """Bytes under `blobdata/<alg>/<hex>/` that no record names (only that digest's can)."""
    candidates = _by_digest(layout.BLOB_DATA, await _old_unnamed(sweeper, layout.BLOB_DATA, named))
    doomed: list[ObjectInfo] = []
    for digest, infos in sorted(candidates.items()):
        keep = set() if sweeper.dry_run else await _still_named(sweeper, digest)
        doomed.extend(info for info in infos if info.key not in keep)
    await _delete(sweeper, "orphan", doomed)


async def _part_orphans(sweeper: Sweeper, named: set[str], sessions: set[str]) -> None:
    """Upload parts under `extents/<upload>/` of no open session that no record names."""
    candidates = await _old_unnamed(sweeper, layout.UPLOAD_PARTS, named)
    doomed = [
        info
        for info in candidates
        if info.key.removeprefix(layout.UPLOAD_PARTS).split("/", 1)[0] not in sessions
    ]
    await _delete(sweeper, "orphan", doomed)


async def _fill_orphans(sweeper: Sweeper, named: set[str]) -> None:
    """Staged segments under `fills/<alg>/<hex>/` that no record names, of fills not running."""
    candidates = _by_digest(layout.FILLS, await _old_unnamed(sweeper, layout.FILLS, named))
    for digest, infos in sorted(candidates.items()):
        sweeper.check_lease()
        if sweeper.dry_run:
            if not await protocol.being_filled(sweeper.deps.redis, digest):
                await _delete(sweeper, "segment", infos)
            continue
        lease = Lease(sweeper.deps.redis, protocol.lease_key(digest), ttl=protocol.LEASE_TTL)
        if not await lease.acquire():
            continue  # a fill is running: its segments are its own
        try:
            keep = await _still_named(sweeper, digest)
            await _delete(sweeper, "segment", [info for info in infos if info.key not in keep])
        finally:
            await lease.release()
