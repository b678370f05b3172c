"""Online garbage collection: mark what the repositories reference, sweep the rest, while
pushes and pulls go on (docs/storage.md, "Garbage collection").

The mark is one listing pass (shared/lifecycle/inventory.py). Referenced are the manifests
every repository keeps (all of them, or with `gc: {delete_untagged: true}` those a tag, an
index or a referrer reaches), their configs, layers and children; every layer link of a
proxy project (cached content stays until eviction) or of a project no longer configured;
and anything written within `gc_grace` (a blob pushed just before its manifest). The
sweep deletes, each step through the reference guard (gc_sweep.py), in an order that a
run cut short at any point leaves nothing a pull needs half-deleted:
1. untagged manifests no longer reached (their revision, its tags and referrer entry);
   then every hosted project's usage ledger is rebuilt from the mark;
2. unreferenced blobs: the record first, then the objects holding its bytes (an
   interrupted run leaves those as orphans, which step 5 of the next run sweeps);
3. layer links whose blob is gone, or that no image of their repository references;
4. project entries (`projects/<p>/_layers/`) no repository of the project links;
5. orphans (gc_orphans.py): expired uploads, data objects no record names, segments of
   fills no longer running.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from contextlib import suppress

import structlog
from redis.exceptions import RedisError

from shared.lifecycle.gc_orphans import sweep_orphans
from shared.lifecycle.gc_sweep import Progress, Sweeper, batches, checkpoint
from shared.lifecycle.inventory import (
    RepositoryView,
    StoredBlob,
    digest_of,
    pages,
    read_blobs,
    read_repositories,
)
from shared.lifecycle.runs import LifecycleDeps, LifecycleReport, exclusive, paced
from shared.lifecycle.usage import UsageLedger
from shared.oci.digest import Digest
from shared.registry import layout
from shared.registry.repositories import Revision
from shared.settings import Settings

log = structlog.get_logger("gc")


async def collect(
    deps: LifecycleDeps,
    *,
    dry_run: bool = False,
    progress: Progress | None = None,
    now: float | None = None,
) -> LifecycleReport:
    """One garbage collection over the whole bucket, under the cluster-wide lifecycle lease
    (`Busy` if another lifecycle job holds it). A dry run deletes nothing and reports what
    would go. `now` (tests) moves the clock the grace period counts back from."""
    report = LifecycleReport(job="gc", dry_run=dry_run)
    async with exclusive(deps.redis, "gc") as lease:
        pace = deps.settings.lifecycle.gc_requests_per_second
        started = time.time()
        clock = started if now is None else now
        grace = deps.settings.lifecycle.gc_grace.total_seconds()
        sweeper = Sweeper(
            deps=deps,
            report=report,
            lease=lease,
            run_id=uuid.uuid4().hex,
            dry_run=dry_run,
            now=clock,
            cutoff=clock - grace,
            since=started - grace,
            progress=progress,
        )
        try:
            with paced(pace):
                await _collect(sweeper, started)
        finally:
            if deps.guard is not None and not dry_run:
                with suppress(RedisError):
                    await deps.guard.release(sweeper.run_id)
    report.finish()
    log.info(
        "gc_finished",
        dry_run=dry_run,
        deleted_objects=report.deleted_objects,
        deleted_bytes=report.deleted_bytes,
        seconds=round(report.seconds, 3),
    )
    return report


async def _collect(sweeper: Sweeper, started: float) -> None:
    deps, report = sweeper.deps, sweeper.report
    views = await read_repositories(deps.objects, deps.blobs, progress=sweeper.progress)
    stored = await read_blobs(deps.objects, progress=sweeper.progress)
    for blob in stored.values():
        report.examined.add(blob.size)
    checkpoint("mark")
    await _delete_untagged(sweeper, views)
    if not sweeper.dry_run:
        await _rebuild_usage(deps, views)
    referenced = _referenced(deps.settings, views, sweeper.cutoff)
    gone = await _sweep_blobs(sweeper, stored, referenced)
    for digest, blob in stored.items():
        if digest not in gone:
            report.kept.add(blob.size)
    checkpoint("links")
    await _sweep_links(sweeper, views, stored, gone)
    await _sweep_project_entries(sweeper, views)
    await sweep_orphans(sweeper, stored, started)


async def _rebuild_usage(deps: LifecycleDeps, views: dict[str, RepositoryView]) -> None:
    """Every hosted project's usage ledger, from the mark (Redis may have lost or skewed it)."""
    ledger = deps.repositories.ledger or UsageLedger(deps.redis, deps.settings, deps.objects, deps.blobs)
    for project in deps.settings.projects:
        if project.type == "hosted":
            held = [view for view in views.values() if view.project == project.name]
            await ledger.rebuild(project.name, held)


def _keeps_every_link(settings: Settings, view: RepositoryView) -> bool:
    """A proxy project's links are its cache (eviction's to remove); a project no longer
    configured, or a repository with a manifest that cannot be read, is left as it is."""
    project = settings.project(view.project)
    return project is None or project.type == "proxy" or bool(view.unreadable)


def _doomed(settings: Settings, view: RepositoryView, cutoff: float) -> list[Digest]:
    """The repository's manifests that `delete_untagged` removes: past the grace period and
    reached by no tag, index or referrer (nor by a manifest within the grace period)."""
    project = settings.project(view.project)
    if project is None or not project.gc.delete_untagged or view.unreadable:
        return []
    young = {digest for digest, image in view.images.items() if image.pushed >= cutoff}
    live = view.reachable_from(view.tagged() | young)
    return sorted(digest for digest in view.images if digest not in live)


async def _delete_untagged(sweeper: Sweeper, views: dict[str, RepositoryView]) -> None:
    """Delete the untagged manifests `_doomed` names; those deleted leave `views`."""
    repositories = sweeper.deps.repositories
    for view in views.values():
        doomed = _doomed(sweeper.deps.settings, view, sweeper.cutoff)
        for batch in batches(doomed):

            async def delete(safe: set[Digest], view: RepositoryView = view) -> None:
                for digest in sorted(safe):
                    image = view.images[digest]
                    revision = Revision(image.digest, image.media_type, image.size, image.subject)
                    await repositories.delete_revision(view.name, revision)
                    checkpoint("untagged")

            for digest in sorted(await sweeper.guarded(batch, delete)):
                # Its bytes are counted when its blob goes (no other repository holding it).
                view.images.pop(digest)
                sweeper.report.deleting("manifest", 0, f"manifest {view.name}@{digest}")


def _referenced(settings: Settings, views: dict[str, RepositoryView], cutoff: float) -> set[Digest]:
    """Every digest a blob of which must stay: the manifests still held (after the untagged
    ones went) with their children, configs and layers; every link of a repository that
    keeps them all; links within the grace period."""
    referenced: set[Digest] = set()
    for view in views.values():
        live = view.reachable(untagged=True) | view.unreadable
        referenced |= live | view.referenced_blobs(live)
        keep_all = _keeps_every_link(settings, view)
        referenced.update(d for d, (_, modified) in view.links.items() if keep_all or modified >= cutoff)
    return referenced


async def _sweep_blobs(
    sweeper: Sweeper, stored: dict[Digest, StoredBlob], referenced: set[Digest]
) -> set[Digest]:
    """Delete blobs nothing references that are past the grace period: each record first,
    then its extents. Returns the digests deleted (in a dry run: that would be)."""
    objects = sweeper.deps.objects
    candidates = sorted(d for d, b in stored.items() if d not in referenced and b.modified < sweeper.cutoff)
    chosen = set(candidates)
    # Extents are never shared between records; should one be, the kept record wins.
    kept_extents = {
        key for digest, blob in stored.items() if digest not in chosen for key in blob.extents or ()
    }
    gone: set[Digest] = set()
    for batch in batches(candidates):

        async def delete(safe: set[Digest]) -> None:
            await objects.delete_many(layout.blob(digest) for digest in sorted(safe))
            checkpoint("sweep")
            data = [key for d in sorted(safe) for key in stored[d].extents or () if key not in kept_extents]
            await objects.delete_many(data)

        for digest in sorted(await sweeper.guarded(batch, delete)):
            sweeper.report.deleting("blob", stored[digest].size, f"blob {digest}")
            gone.add(digest)
    return gone


async def _sweep_links(
    sweeper: Sweeper, views: dict[str, RepositoryView], stored: dict[Digest, StoredBlob], gone: set[Digest]
) -> None:
    """Delete layer links past the grace period whose blob is gone, or (where links are not
    all kept) that no image of their repository references; those deleted leave `views`."""
    settings = sweeper.deps.settings
    doomed: dict[Digest, list[RepositoryView]] = defaultdict(list)
    for view in views.values():
        keep_all = _keeps_every_link(settings, view)
        wanted = view.referenced_blobs(view.images)
        for digest, (_, modified) in view.links.items():
            if modified >= sweeper.cutoff:
                continue
            if digest in gone or digest not in stored or (not keep_all and digest not in wanted):
                doomed[digest].append(view)
    objects = sweeper.deps.objects
    for batch in batches(sorted(doomed)):

        async def delete(safe: set[Digest]) -> None:
            await objects.delete_many(layout.layer_link(v.name, d) for d in sorted(safe) for v in doomed[d])

        for digest in sorted(await sweeper.guarded(batch, delete)):
            for view in doomed[digest]:
                view.links.pop(digest, None)
                sweeper.report.deleting("link", 0, f"link {view.name}@{digest}")


def _project_entry(key: str) -> tuple[str, Digest] | None:
    """(project, digest) of `projects/<project>/_layers/<alg>/<hex>`."""
    parts = key.removeprefix(layout.PROJECTS).split("/")
    if len(parts) != 4 or parts[1] != "_layers":
        return None
    digest = digest_of(parts[2], parts[3])
    if digest is None or layout.project_blob(parts[0], digest) != key:
        return None
    return parts[0], digest


async def _sweep_project_entries(sweeper: Sweeper, views: dict[str, RepositoryView]) -> None:
    """Delete `projects/<p>/_layers/<digest>` entries past the grace period that no
    repository of the project links or references any longer."""
    held: dict[str, set[Digest]] = defaultdict(set)
    for view in views.values():
        held[view.project] |= set(view.links) | view.referenced_blobs(view.images)
    doomed: dict[Digest, list[str]] = defaultdict(list)
    async for page in pages(sweeper.deps.objects, layout.PROJECTS):
        for info in page:
            entry = _project_entry(info.key)
            if entry is not None and info.modified < sweeper.cutoff and entry[1] not in held[entry[0]]:
                doomed[entry[1]].append(entry[0])
        sweeper.tick(len(page))
    objects = sweeper.deps.objects
    for batch in batches(sorted(doomed)):

        async def delete(safe: set[Digest]) -> None:
            await objects.delete_many(layout.project_blob(p, d) for d in sorted(safe) for p in doomed[d])

        for digest in sorted(await sweeper.guarded(batch, delete)):
            for project in doomed[digest]:
                sweeper.report.deleting("project_link", 0, f"project_link {project}@{digest}")
