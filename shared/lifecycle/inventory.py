"""What the bucket holds, read in one listing pass: each repository's images, tags and
blob links, and every stored blob with its extents (the storage lifecycle's view).

Listings go page by page (a page is one bounded request); the small objects behind them
(tags, revisions, manifests, blob records) are read concurrently, a bounded number at a
time. Everything here only reads: the garbage collection, eviction, retention and the
quota ledger decide what to do with it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TypeVar

import structlog

from shared.oci.digest import Digest
from shared.oci.errors import RegistryError
from shared.oci.manifest import Manifest, parse_manifest
from shared.registry import layout
from shared.registry.blobs import BlobStore
from shared.registry.repositories import Revision
from shared.registry.storage import ObjectInfo, ObjectMissing, ObjectStore

log = structlog.get_logger("inventory")

T = TypeVar("T")
# Keys per listing request (S3's own maximum) and small objects read at once.
PAGE = 1000
CONCURRENT_READS = 32
# A blob object larger than this is a whole object (a record this big would name tens of
# thousands of extents): its metadata is read with a HEAD rather than a GET of its bytes.
RECORD_READ_LIMIT = 64 * 1024
_RECORD_META = "seawall-extents"
REPOSITORIES = layout.REPOSITORIES

Progress = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class Image:
    """One manifest (revision) of one repository."""

    repository: str  # full name, "<project>/<path>"
    digest: Digest
    media_type: str
    size: int  # manifest bytes
    pushed: float  # the revision object's last-modified (epoch s)
    tags: tuple[str, ...]  # tags of this repository pointing at it
    blobs: tuple[Digest, ...]  # config + layers (empty for an index)
    children: tuple[Digest, ...]  # an index's manifests
    subject: Digest | None  # a referrer's subject
    blob_sizes: tuple[int, ...] = ()  # the descriptors' sizes of `blobs`, in order


@dataclass
class RepositoryView:
    name: str
    links: dict[Digest, tuple[int, float]] = field(default_factory=dict)  # size, last-modified
    images: dict[Digest, Image] = field(default_factory=dict)
    tags: dict[str, tuple[Digest, float]] = field(default_factory=dict)  # digest, last-modified
    # Revisions whose manifest could not be read or parsed: what they reference is unknown.
    unreadable: set[Digest] = field(default_factory=set)

    @property
    def project(self) -> str:
        return self.name.split("/", 1)[0]

    def reachable(self, *, untagged: bool) -> set[Digest]:
        """Manifests reachable from the tags: tagged ones, an index's children and the
        referrers of reachable ones, recursively. With `untagged`, every image counts as a
        starting point."""
        return self.reachable_from(set(self.images) if untagged else self.tagged())

    def tagged(self) -> set[Digest]:
        return {digest for digest, _ in self.tags.values()}

    def reachable_from(self, start: Iterable[Digest]) -> set[Digest]:
        """`start` and what it reaches: an index's children and the referrers of reached
        manifests, recursively. Children this repository does not hold are included (their
        blob may be held for another repository)."""
        referrers: dict[Digest, list[Digest]] = {}
        for image in self.images.values():
            if image.subject is not None:
                referrers.setdefault(image.subject, []).append(image.digest)
        reached: set[Digest] = set()
        pending = list(start)
        while pending:
            digest = pending.pop()
            if digest in reached:
                continue
            reached.add(digest)
            held = self.images.get(digest)
            if held is not None:
                pending.extend(held.children)
            pending.extend(referrers.get(digest, ()))
        return reached

    def referenced_blobs(self, manifests: Iterable[Digest]) -> set[Digest]:
        """The configs and layers of these manifests (those this repository holds)."""
        found: set[Digest] = set()
        for digest in manifests:
            image = self.images.get(digest)
            if image is not None:
                found.update(image.blobs)
        return found


@dataclass(frozen=True, slots=True)
class StoredBlob:
    size: int
    modified: float
    extents: tuple[str, ...] | None  # extent keys of a record; None for a whole object


async def pages(objects: ObjectStore, prefix: str) -> AsyncIterator[list[ObjectInfo]]:
    """Every object under `prefix`, one listing page at a time, in key order."""
    after: str | None = None
    while True:
        page = await objects.list_objects(prefix, start_after=after, limit=PAGE)
        if not page:
            return
        yield page
        if len(page) < PAGE:
            return
        after = page[-1].key


async def bounded(calls: Iterable[Callable[[], Awaitable[T]]], limit: int = CONCURRENT_READS) -> list[T]:
    """Await every call, at most `limit` at a time; results in order."""
    gate = asyncio.Semaphore(limit)

    async def one(call: Callable[[], Awaitable[T]]) -> T:
        async with gate:
            return await call()

    return list(await asyncio.gather(*(one(call) for call in calls)))


def digest_of(algorithm: str, hex_part: str) -> Digest | None:
    """The digest `<algorithm>:<hex>` as keys spell it, None when it is not a valid one."""
    try:
        return Digest.parse(f"{algorithm}:{hex_part}")
    except RegistryError:
        return None


async def _small(objects: ObjectStore, key: str) -> bytes | None:
    try:
        return await objects.get_bytes(key)
    except ObjectMissing:
        return None  # deleted since it was listed


@dataclass
class _Listed:
    """One repository's keys as listed, before the small objects behind them are read."""

    links: dict[Digest, float] = field(default_factory=dict)
    revisions: dict[Digest, float] = field(default_factory=dict)
    tags: dict[str, tuple[str, float]] = field(default_factory=dict)  # tag -> key, modified


def _classify(info: ObjectInfo, listed: dict[str, _Listed]) -> None:
    rest = info.key.removeprefix(REPOSITORIES)
    # A name component never starts with `_`, so the first "/_" ends the name.
    cut = rest.find("/_")
    if cut <= 0:
        return
    name, parts = rest[:cut], rest[cut + 2 :].split("/")
    entry = listed.setdefault(name, _Listed())
    if parts[0] == "layers" and len(parts) == 3:
        digest = digest_of(parts[1], parts[2])
        if digest is not None:
            entry.links[digest] = info.modified
    elif parts[:2] == ["manifests", "revisions"] and len(parts) == 4:
        digest = digest_of(parts[2], parts[3])
        if digest is not None:
            entry.revisions[digest] = info.modified
    elif parts[:2] == ["manifests", "tags"] and len(parts) == 3:
        entry.tags[parts[2]] = (info.key, info.modified)
    # `_referrers/` entries follow from the referrers' own manifests (their subject).


class _Manifests:
    """Each manifest read and parsed once, however many repositories hold it."""

    def __init__(self, blobs: BlobStore) -> None:
        self._blobs = blobs
        self._parsed: dict[tuple[Digest, str], asyncio.Future[Manifest | None]] = {}

    async def get(self, digest: Digest, media_type: str) -> Manifest | None:
        key = (digest, media_type)
        found = self._parsed.get(key)
        if found is None:
            found = asyncio.ensure_future(self._read(digest, media_type))
            self._parsed[key] = found
        return await found

    async def _read(self, digest: Digest, media_type: str) -> Manifest | None:
        try:
            raw = await self._blobs.read(digest)
            return parse_manifest(raw, media_type)
        except (RegistryError, ObjectMissing) as exc:
            log.warning("manifest_unreadable", digest=str(digest), reason=str(exc))
            return None


class _Unreadable(Exception):
    """A revision whose manifest blob cannot be read or parsed."""


async def _image(
    objects: ObjectStore, manifests: _Manifests, name: str, digest: Digest, pushed: float
) -> Image | None:
    raw = await _small(objects, layout.revision(name, digest))
    if raw is None:
        return None
    revision = Revision.from_json(digest, raw)
    manifest = await manifests.get(digest, revision.media_type)
    if manifest is None:
        raise _Unreadable
    return Image(
        repository=name,
        digest=digest,
        media_type=revision.media_type,
        size=revision.size,
        pushed=pushed,
        tags=(),
        blobs=tuple(d.digest for d in manifest.blobs),
        children=tuple(d.digest for d in manifest.manifests),
        subject=manifest.subject.digest if manifest.subject else None,
        blob_sizes=tuple(d.size for d in manifest.blobs),
    )


async def _view(objects: ObjectStore, manifests: _Manifests, name: str, listed: _Listed) -> RepositoryView:
    view = RepositoryView(name)

    async def image(digest: Digest, pushed: float) -> None:
        try:
            found = await _image(objects, manifests, name, digest, pushed)
        except _Unreadable:
            view.unreadable.add(digest)
            return
        if found is not None:
            view.images[digest] = found

    async def tag(tag_name: str, key: str, modified: float) -> None:
        raw = await _small(objects, key)
        digest = digest_of(*raw.decode().split(":", 1)) if raw and b":" in raw else None
        if digest is not None:
            view.tags[tag_name] = (digest, modified)

    await bounded(
        [
            *(partial(image, d, m) for d, m in listed.revisions.items()),
            *(partial(tag, t, k, m) for t, (k, m) in listed.tags.items()),
        ]
    )
    tagged: dict[Digest, list[str]] = {}
    for tag_name, (digest, _) in sorted(view.tags.items()):
        tagged.setdefault(digest, []).append(tag_name)
    for digest, names in tagged.items():
        if digest in view.images:
            view.images[digest] = replace(view.images[digest], tags=tuple(names))
    # A link's body is the blob's size; the images' descriptors give it for the linked
    # blobs they reference (a push checks they agree), so only the others are read.
    described = {
        d: size
        for image_ in view.images.values()
        for d, size in zip(image_.blobs, image_.blob_sizes, strict=True)
    }

    async def link(digest: Digest, modified: float) -> None:
        size = described.get(digest)
        if size is None:
            raw = await _small(objects, layout.layer_link(name, digest))
            if raw is None:
                return
            try:
                size = int(raw)
            except ValueError:
                size = 0
        view.links[digest] = (size, modified)

    await bounded([partial(link, d, m) for d, m in listed.links.items()])
    return view


async def read_repositories(
    objects: ObjectStore,
    blobs: BlobStore,
    *,
    project: str | None = None,
    progress: Progress | None = None,
) -> dict[str, RepositoryView]:
    """Every repository (of `project`, if given) with its links, images and tags.

    `progress` is called with the number of objects each listed page held.
    """
    prefix = REPOSITORIES if project is None else f"{REPOSITORIES}{project}/"
    listed: dict[str, _Listed] = {}
    async for page in pages(objects, prefix):
        for info in page:
            _classify(info, listed)
        if progress is not None:
            progress(len(page))
    manifests = _Manifests(blobs)
    views = await bounded(
        [partial(_view, objects, manifests, n, e) for n, e in sorted(listed.items())],
        limit=4,
    )
    return {view.name: view for view in views}


async def _stored_blob(objects: ObjectStore, info: ObjectInfo) -> StoredBlob | None:
    """A blob object as listed: a record (read for its extents) or a whole object."""
    try:
        if info.size <= RECORD_READ_LIMIT:
            raw, metadata = await objects.get_bytes_and_metadata(info.key)
        else:
            stat = await objects.stat(info.key)
            if stat is None:
                return None
            metadata, raw = stat.metadata, b""
            if _RECORD_META in metadata:
                raw = await objects.get_bytes(info.key)
    except ObjectMissing:
        return None
    if _RECORD_META not in metadata:
        return StoredBlob(info.size, info.modified, None)
    record = json.loads(raw)
    extents = tuple(str(key) for key, _ in record["extents"])
    return StoredBlob(int(record["size"]), info.modified, extents)


def blob_key_digest(key: str) -> Digest | None:
    """The digest a key under `blobs/` stores (`blobs/<alg>/<xx>/<hex>`)."""
    parts = key.removeprefix(layout.BLOBS).split("/")
    if len(parts) != 3:
        return None
    digest = digest_of(parts[0], parts[2])
    return digest if digest is not None and layout.blob(digest) == key else None


async def read_blobs(
    objects: ObjectStore,
    *,
    progress: Progress | None = None,
    known: Mapping[Digest, StoredBlob] | None = None,
    reread_after: float = 0.0,
) -> dict[Digest, StoredBlob]:
    """Every stored blob: its size, last-modified and, for a record, its extents.

    With `known` (an earlier reading), a blob whose last-modified is unchanged and before
    `reread_after` is taken from it instead of read again: a record rewritten since then
    (two commits of one digest) has a newer last-modified.
    """
    found: dict[Digest, StoredBlob] = {}
    async for page in pages(objects, layout.BLOBS):
        wanted: list[tuple[Digest, ObjectInfo]] = []
        for info in page:
            digest = blob_key_digest(info.key)
            if digest is None:
                continue
            earlier = known.get(digest) if known is not None else None
            if earlier is not None and earlier.modified == info.modified and info.modified < reread_after:
                found[digest] = earlier
            else:
                wanted.append((digest, info))
        read = await bounded([partial(_stored_blob, objects, i) for _, i in wanted])
        for (digest, _), stored in zip(wanted, read, strict=True):
            if stored is not None:
                found[digest] = stored
        if progress is not None:
            progress(len(page))
    return found


def blob_bytes(views: Iterable[RepositoryView], sizes: Mapping[Digest, int]) -> int:
    """Unique bytes referenced by these repositories' images: their manifests, configs and
    layers (a quota's and a cache's measure). Sizes come from the images' descriptors;
    `sizes` fills in any other (a blob no descriptor of these images describes)."""
    counted: dict[Digest, int] = {}
    for view in views:
        for image in view.images.values():
            counted[image.digest] = image.size
            for digest, size in zip(image.blobs, image.blob_sizes, strict=False):
                counted[digest] = size
            for digest in image.blobs[len(image.blob_sizes) :]:
                counted.setdefault(digest, sizes.get(digest, 0))
    return sum(counted.values())
