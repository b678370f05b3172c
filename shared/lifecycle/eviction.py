"""Proxy cache eviction: least recently pulled images go first, and those not pulled lately.

A proxy project with `cache: {max_bytes, evict_after}` is measured as the unique bytes of
its images (manifests, configs, layers) and of the blobs its repositories link. Images not
pulled within `evict_after` are evicted; then, if the project is over `max_bytes`, the
least recently pulled ones until it is under `(1 - eviction_headroom) * max_bytes`.

The unit of eviction is an image as clients pull it: a manifest no other manifest of the
repository lists (an image, or an index), with its children and the referrers of any of
them. A unit counts as pulled when any of its manifests or tags was (pulls.py); a blob a
repository links that no image of it references (fetched by digest alone) is a unit of
its own, pulled when it was linked.

Evicting a unit deletes its revisions and their tags, then, for each blob no remaining
image of the repository uses, the layer link; for each blob no repository of the project
links any more, the project's entry; and the blob itself when no other project holds it.
What is deleted on the strength of the listing goes through the reference guard
(guard.py), so a blob a fill or a push claimed meanwhile stays, with its links. An evicted
image pulls again transparently: the proxy refetches what it no longer holds.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import structlog

from shared.lifecycle.inventory import RepositoryView, bounded, read_repositories
from shared.lifecycle.pulls import (
    PullHistory,
    image_member,
    note_first_seen,
    read_history,
    save_history,
    tag_member,
)
from shared.lifecycle.runs import LifecycleDeps, LifecycleReport, exclusive
from shared.oci.digest import Digest
from shared.proxy import protocol
from shared.registry import layout
from shared.registry.repositories import Revision

log = structlog.get_logger("lifecycle")
Progress = Callable[[int], None]

# Blobs condemned, checked and deleted together (a push that needs one waits at most one
# batch's deletions).
SWEEP_BATCH = 100
# A digest claimed (guard.py) this long before the run started, or since, stays with its
# links: the write that claimed it may not have been in the listing. Unlike garbage
# collection, eviction does not wait out the whole gc_grace: a blob cached within the
# last hour is exactly what a busy cache must be able to evict. What the listing can miss
# is a write in flight as it ran (a link, a manifest PUT, an upload's finish: each follows
# its claim within a request). gc_grace still applies when it is shorter.
IN_FLIGHT_SECONDS = 60.0
LEASE_LOST = "the lifecycle lease was lost (another job may have started); stopped"
# Units whose revisions are deleted together (16 at a time).
UNIT_BATCH = 64


@dataclass
class Unit:
    """What is evicted together: an image as pulled, or a blob linked on its own."""

    repository: str
    manifests: tuple[Digest, ...]  # the root first
    blobs: frozenset[Digest]  # configs and layers its manifests use (or the lone linked blob)
    last: float  # when it was last pulled (the order of eviction by size)
    floor: float  # the time its age counts from (never before the pull record began)

    @property
    def label(self) -> str:
        if self.manifests:
            return f"{self.repository}@{self.manifests[0]}"
        return f"{self.repository} blob {next(iter(self.blobs))}"


@dataclass
class Cache:
    """The project's cache as a set of units, with what each digest costs and who uses it."""

    units: list[Unit]
    sizes: dict[Digest, int]
    # Per digest: how many units use it (the project's bytes count each digest once).
    users: Counter[Digest] = field(default_factory=Counter)
    bytes: int = 0

    def __post_init__(self) -> None:
        for unit in self.units:
            self.users.update(_content(unit))
        self.bytes = sum(self.sizes.get(d, 0) for d in self.users)

    def drop(self, unit: Unit) -> None:
        for digest in _content(unit):
            self.users[digest] -= 1
            if self.users[digest] == 0:
                del self.users[digest]
                self.bytes -= self.sizes.get(digest, 0)


def _content(unit: Unit) -> set[Digest]:
    return {*unit.manifests, *unit.blobs}


def _closure(view: RepositoryView, root: Digest, referrers: dict[Digest, list[Digest]]) -> list[Digest]:
    """The root, its children and the referrers of any of them, recursively (root first)."""
    found: list[Digest] = []
    seen: set[Digest] = set()
    pending = [root]
    while pending:
        digest = pending.pop(0)
        if digest in seen or digest not in view.images:
            continue
        seen.add(digest)
        found.append(digest)
        pending.extend(view.images[digest].children)
        pending.extend(referrers.get(digest, ()))
    return found


def units_of(view: RepositoryView, history: PullHistory) -> list[Unit]:
    """The repository's images as clients pull them, and its blobs no image references."""
    referrers: dict[Digest, list[Digest]] = {}
    listed: set[Digest] = set()
    for image in view.images.values():
        listed.update(image.children)
        if image.subject is not None and image.subject in view.images:
            referrers.setdefault(image.subject, []).append(image.digest)
    roots = [
        d
        for d, image in sorted(view.images.items())
        if d not in listed and (image.subject is None or image.subject not in view.images)
    ]
    groups = [_closure(view, root, referrers) for root in roots]
    covered = {d for group in groups for d in group}
    # Whatever no root reaches (a cycle cannot occur; this is belt and braces) stands alone.
    groups.extend([d] for d in sorted(view.images) if d not in covered)
    units = []
    used: set[Digest] = set()
    for group in groups:
        members = [image_member(view.name, d) for d in group]
        members += [tag_member(view.name, t) for d in group for t in view.images[d].tags]
        blobs = frozenset(b for d in group for b in view.images[d].blobs)
        used |= blobs
        last = history.last(members) or history.since
        units.append(Unit(view.name, tuple(group), blobs, last, history.age_floor(members)))
    for digest, (_, modified) in sorted(view.links.items()):
        if digest not in used:
            units.append(Unit(view.name, (), frozenset([digest]), modified, modified))
    return units


def sizes_of(views: Iterable[RepositoryView]) -> dict[Digest, int]:
    sizes: dict[Digest, int] = {}
    for view in views:
        for digest, (size, _) in view.links.items():
            sizes[digest] = size
        for image in view.images.values():
            sizes[image.digest] = image.size
            for digest, size in zip(image.blobs, image.blob_sizes, strict=False):
                sizes.setdefault(digest, size)
    return sizes


def choose(
    cache: Cache, *, now: float, evict_after: float | None, max_bytes: int | None, headroom: float
) -> list[Unit]:
    """The units to evict, in order: those not pulled within `evict_after`, then, while the
    cache is over `max_bytes`, the least recently pulled until it is under the headroom."""
    chosen: list[Unit] = []
    remaining = list(cache.units)
    if evict_after is not None:
        horizon = now - evict_after
        chosen = [u for u in remaining if u.floor < horizon]
        remaining = [u for u in remaining if u.floor >= horizon]
        for unit in chosen:
            cache.drop(unit)
    if max_bytes is not None and cache.bytes > max_bytes:
        target = (1 - headroom) * max_bytes
        for unit in sorted(remaining, key=lambda u: (u.last, u.label)):
            if cache.bytes <= target:
                break
            chosen.append(unit)
            cache.drop(unit)
    return chosen


async def evict(
    deps: LifecycleDeps, project: str, *, dry_run: bool = False, progress: Progress | None = None
) -> LifecycleReport:
    """Evict from proxy project `project` what its cache policy says (a dry run only lists it)."""
    found = deps.settings.project(project)
    if found is None or found.type != "proxy":
        raise ValueError(f"eviction applies to proxy projects; {project!r} is not one")
    policy = found.cache
    report = LifecycleReport(job="eviction", project=project, dry_run=dry_run)
    async with exclusive(deps.redis, "eviction") as lease:
        views = await read_repositories(deps.objects, deps.blobs, project=project, progress=progress)
        now = time.time()
        history = await read_history(deps.redis, deps.objects, project, now)
        images = [image_member(v.name, d) for v in views.values() for d in v.images]
        # An image with no record of a pull counts as pulled now: a lost record never makes it old.
        await note_first_seen(deps.redis, project, history, images, now)
        units = [u for name in sorted(views) for u in units_of(views[name], history)]
        cache = Cache(units, sizes_of(views.values()))
        report.examined.add(cache.bytes, len(units))
        chosen = choose(
            cache,
            now=now,
            evict_after=policy.evict_after.total_seconds() if policy.evict_after else None,
            max_bytes=int(policy.max_bytes) if policy.max_bytes is not None else None,
            headroom=deps.settings.lifecycle.eviction_headroom,
        )
        report.kept.add(cache.bytes, len(units) - len(chosen))
        report.project_bytes = cache.bytes
        eviction = _Eviction(deps, project, views, units, report, dry_run)
        for start in range(0, len(chosen), UNIT_BATCH):
            if lease.lost:
                report.outcome, report.error = "failed", LEASE_LOST
                return report.finish()
            batch = chosen[start : start + UNIT_BATCH]
            await bounded([functools.partial(eviction.forget_images, u) for u in batch], limit=16)
            if progress is not None:
                progress(len(batch))
        await eviction.sweep(lambda: lease.lost)
        if not dry_run:
            current = {m for v in views.values() for m in _members(v)} - eviction.gone_members
            await save_history(deps.redis, deps.objects, project, history, current, now)
    log.info(
        "cache_evicted",
        project=project,
        dry_run=dry_run,
        units=len(chosen),
        cache_bytes=report.project_bytes,
        deleted_bytes=report.deleted_bytes,
    )
    return report.finish()


def _members(view: RepositoryView) -> list[str]:
    return [image_member(view.name, d) for d in view.images] + [tag_member(view.name, t) for t in view.tags]


class _Eviction:
    """The deletions of one run: revisions and tags first, then (through the guard) the
    links, project entries and blobs that no remaining image uses."""

    def __init__(
        self,
        deps: LifecycleDeps,
        project: str,
        views: dict[str, RepositoryView],
        units: list[Unit],
        report: LifecycleReport,
        dry_run: bool,
    ) -> None:
        self._deps = deps
        self._project = project
        self._views = views
        self._report = report
        self._dry_run = dry_run
        self._run_id = f"evict-{project}-{secrets.token_hex(6)}"
        # Per repository: how many units use each manifest and each blob.
        self._manifest_users: Counter[tuple[str, Digest]] = Counter()
        self._blob_users: Counter[tuple[str, Digest]] = Counter()
        for unit in units:
            self._manifest_users.update((unit.repository, m) for m in unit.manifests)
            self._blob_users.update((unit.repository, b) for b in unit.blobs)
        # Per blob: how many repositories of the project link it.
        self._linkers: Counter[Digest] = Counter(d for v in views.values() for d in v.links)
        # Links no remaining unit uses, to delete through the guard.
        self._released: dict[Digest, list[str]] = {}
        self.gone_members: set[str] = set()

    async def forget_images(self, unit: Unit) -> None:
        """Delete the unit's revisions (and so their tags) that no remaining unit uses, and
        note the links it releases."""
        view = self._views[unit.repository]
        for digest in unit.manifests:
            key = (unit.repository, digest)
            self._manifest_users[key] -= 1
            if self._manifest_users[key] > 0:
                continue
            image = view.images[digest]
            if not self._dry_run:
                revision = Revision(digest, image.media_type, image.size, image.subject)
                await self._deps.repositories.delete_revision(unit.repository, revision)
            self._report.deleting("manifest", item=f"{unit.repository}@{digest}")
            for tag in image.tags:
                self._report.deleting("tag", item=f"{unit.repository}:{tag}")
                self.gone_members.add(tag_member(unit.repository, tag))
            self.gone_members.add(image_member(unit.repository, digest))
        for digest in unit.blobs:
            key = (unit.repository, digest)
            self._blob_users[key] -= 1
            if self._blob_users[key] == 0 and digest in view.links:
                self._released.setdefault(digest, []).append(unit.repository)

    async def sweep(self, stop: Callable[[], bool]) -> None:
        """Delete the released links, then the project entries and blobs nobody else holds,
        a batch at a time through the guard."""
        guard = self._deps.guard
        grace = self._deps.settings.lifecycle.gc_grace.total_seconds()
        since = self._report.started - min(grace, IN_FLIGHT_SECONDS)
        pending = sorted(self._released)
        try:
            for start in range(0, len(pending), SWEEP_BATCH):
                if stop():
                    self._report.outcome, self._report.error = "failed", LEASE_LOST
                    return
                batch = pending[start : start + SWEEP_BATCH]
                if guard is not None and not self._dry_run:
                    safe = await guard.condemn(self._run_id, batch, since)
                else:
                    safe = set(batch)
                for digest in batch:
                    if digest not in safe:
                        log.info("eviction_blob_claimed", project=self._project, digest=str(digest))
                gone = await bounded([functools.partial(self._release, d) for d in sorted(safe)], limit=16)
                log.debug("eviction_batch_swept", project=self._project, blobs=sum(gone), digests=len(safe))
                if guard is not None and not self._dry_run:
                    # Links went for each of them (a blob too, for some): claims of these
                    # digests re-check what they remember.
                    await guard.deleted(self._run_id, safe)
                    await guard.release(self._run_id)
        finally:
            if guard is not None and not self._dry_run:
                await guard.release(self._run_id)

    async def _release(self, digest: Digest) -> bool:
        """Unlink `digest` from the repositories that released it; then, if no repository of
        the project links it, drop the project's entry, and the blob if no project holds it.
        Returns whether the blob was deleted."""
        repositories = self._deps.repositories
        for name in self._released[digest]:
            if not self._dry_run:
                await repositories.unlink_blob(name, digest)
            self._report.deleting("link", item=None)
            self._linkers[digest] -= 1
        if self._linkers[digest] > 0:
            return False
        objects = self._deps.objects
        if not self._dry_run:
            await objects.delete(layout.project_blob(self._project, digest))
        self._report.deleting("project_link")
        others = [p.name for p in self._deps.settings.projects if p.name != self._project]
        held = await asyncio.gather(*(objects.stat(layout.project_blob(p, digest)) for p in others))
        if any(info is not None for info in held):
            return False
        placement = await self._deps.blobs.placement(digest)
        if placement is None:
            return False
        if not self._dry_run:
            # The record first: a blob is never visible with extents missing.
            await objects.delete(layout.blob(digest))
            if placement.extents:
                await objects.delete_many(e.key for e in placement.extents)
            self._deps.blobs.forget(digest)
            # The fill's record says "committed" for an hour after a fill: an edge must not
            # take it for the blob being there, and ask for a new fill instead.
            await self._deps.redis.delete(protocol.state_key(digest))
        self._report.deleting("blob", placement.size, item=f"blob {digest}")
        return True
