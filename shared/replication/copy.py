"""Copying one tag from a replication source to a destination, with what it references.

The order keeps the destination valid at every moment and the work idempotent (a task
may run twice; a re-run of a finished execution moves nothing):

1. HEAD both ends: a destination tag already at the source's digest is skipped (no
   manifest GET, so no quota spent); one pointing elsewhere is left alone when the rule
   does not overwrite.
2. The manifest is fetched by digest (the tag could move meanwhile), children of an index
   first (the index is copied whole), and for each image its config and layers: a blob
   the destination repository holds is not sent, one another of its repositories holds
   is mounted, only the rest travels (resuming where a broken link stopped).
3. Manifests go up children first, the tag last, so a client never sees a tag whose
   content is incomplete.
4. Referrers travel too: those the referrers API lists for each copied manifest and the
   `sha256-<hex>.sig` / `.att` / `.sbom` tags of the tag scheme, and theirs in turn. When
   the run listed the source repository (`ListedTags`), only the tag-scheme tags it found
   are asked for; otherwise each is looked up with a HEAD.

Two optional collaborators make concurrent tasks cheaper without changing what a copy
does: a `BlobGate` sends each blob to a destination once however many tasks need it at
the same moment (the others wait, then find it there or mount it), and `ListedTags` saves
the HEADs of tag-scheme tags the source does not have. Without them (or when they cannot
answer) a copy works alone, as it always could.

When the upstream's governor refuses a request (or the upstream answers 429), the copy
raises `QuotaWait` so that the task waits for the window to reopen instead of failing.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Any, Protocol

from pydantic import BaseModel

from shared.oci.manifest import Descriptor, parse_manifest
from shared.oci.reference import is_valid_tag
from shared.ratelimit import QuotaRefused
from shared.replication.endpoints import Destination, Source
from shared.replication.transfer import Manifest, Missing
from shared.upstream import UpstreamFailure

# Blobs of one manifest copied at once (one at a time under a bandwidth cap, which is the
# task's: a cap shared by parallel uploads would be exceeded by each of them).
BLOB_CONCURRENCY = 4
# Indexes inside indexes, and referrers of referrers, are followed this deep.
MAX_DEPTH = 4
# The tag scheme of cosign and others: `sha256-<hex>.sig` next to the image it signs.
REFERRER_TAG_SUFFIXES = (".sig", ".att", ".sbom")
# Any tag of that scheme, whatever the digest's algorithm.
_SCHEME_TAG = re.compile(r"^[a-z0-9]+-[0-9a-f]+\.(?:sig|att|sbom)$")
# Upstream failures that mean "not now": the governor holding back, or a 429.
QUOTA_KINDS = frozenset({"governor", "quota", "abuse"})
# When a refusal does not say when the upstream reopens.
DEFAULT_WAIT_SECONDS = 60.0

Log = Callable[[str], None]


def is_scheme_tag(tag: str) -> bool:
    """A tag of the referrer tag scheme (`<algorithm>-<hex>.sig`, `.att`, `.sbom`)."""
    return bool(_SCHEME_TAG.match(tag))


class BlobPass(Protocol):
    """Leave to send one blob to the destination; `release()` it when done, sent or not."""

    # A repository of the destination where a task stored the blob lately (None if unknown).
    located: str | None

    async def sent(self, repository: str) -> None:
        """The blob is stored in `repository`: tasks waiting for it may mount it from there."""
        ...

    async def release(self) -> None: ...


class BlobGate(Protocol):
    """One upload per blob and destination across the tasks running at once."""

    async def enter(self, digest: str) -> BlobPass | None:
        """Leave to send `digest`; None while another task sends it. A gate that cannot
        tell (its store away) gives leave, so the copy goes on without it."""
        ...

    async def wait(self, digest: str) -> None:
        """Return once the task sending `digest` is done, or known to have stopped."""
        ...


class ListedTags(Protocol):
    """The referrer tag-scheme tags the run found listing the source repository."""

    async def present(self, tags: Sequence[str]) -> set[str] | None:
        """Those of `tags` the listing found; None when it is not known (ask the source)."""
        ...


class CopyResult(BaseModel):
    """What copying one tag did."""

    digest: str | None = None  # the source's digest for the tag
    bytes_moved: int = 0  # blob bytes read from the source (resends included)
    blobs_copied: int = 0
    blobs_present: int = 0  # already in the destination repository, or mounted there
    blobs_mounted: int = 0
    manifests: int = 0  # manifests pushed: children, referrers and the tag's own
    referrers: int = 0  # referrer manifests pushed (counted in `manifests` too)
    skipped: bool = False  # the destination tag already pointed at the same digest
    kept: bool = False  # the destination tag pointed elsewhere and the rule does not overwrite
    blob_waits: int = 0  # blobs waited for while another task sent them


class QuotaWait(Exception):
    """The upstream's quota (or request rate) is spent: try again at `reopens_at` (epoch s)."""

    def __init__(self, reopens_at: float, upstream: str = "") -> None:
        super().__init__(reopens_at, upstream)
        self.reopens_at = reopens_at
        self.upstream = upstream

    def __str__(self) -> str:
        at = datetime.fromtimestamp(self.reopens_at, UTC).strftime("%H:%M:%SZ")
        where = f" of {self.upstream}" if self.upstream else ""
        return f"waiting for quota{where}, reopens at {at}"


def quota_wait(exc: BaseException, now: float | None = None) -> QuotaWait | None:
    """The wait an exception stands for, if it is a refusal for quota; None otherwise."""
    now = time.time() if now is None else now
    if isinstance(exc, QuotaRefused):
        return QuotaWait(now + exc.retry_after, exc.upstream)
    if isinstance(exc, UpstreamFailure) and exc.kind in QUOTA_KINDS:
        reopens_at = exc.reopens_at if exc.reopens_at is not None else now + DEFAULT_WAIT_SECONDS
        return QuotaWait(reopens_at, exc.upstream)
    return None


def short(digest: str) -> str:
    """`sha256:0123456789ab`: enough to tell digests apart in a log line."""
    algorithm, _, encoded = digest.partition(":")
    return f"{algorithm}:{encoded[:12]}"


def size_text(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


async def copy_tag(
    source: Source,
    destination: Destination,
    source_repository: str,
    tag: str,
    destination_repository: str,
    *,
    overwrite: bool,
    copy_referrers: bool,
    bandwidth: int | None,
    log: Log,
    gate: BlobGate | None = None,
    listed_tags: ListedTags | None = None,
) -> CopyResult:
    """Copy `source_repository:tag` to `destination_repository:tag` (see the module's
    docstring). Raises `QuotaWait` when an upstream's quota holds the copy back, `Missing`
    when the source no longer has the tag; other failures propagate as they are."""
    copier = _TagCopier(
        source,
        destination,
        source_repository,
        destination_repository,
        overwrite=overwrite,
        bandwidth=bandwidth,
        log=log,
        gate=gate,
        listed_tags=listed_tags,
    )
    try:
        return await copier.copy(tag, copy_referrers=copy_referrers)
    except (UpstreamFailure, QuotaRefused) as exc:
        wait = quota_wait(exc)
        if wait is None:
            raise
        log(str(wait))
        raise wait from exc


async def _all(coroutines: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Run them together; the first failure cancels the rest and is raised as it is."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class _TagCopier:
    """One tag's copy between two repositories; remembers what it did, so no blob or
    referrer is handled twice within it."""

    def __init__(
        self,
        source: Source,
        destination: Destination,
        source_repository: str,
        destination_repository: str,
        *,
        overwrite: bool,
        bandwidth: int | None,
        log: Log,
        gate: BlobGate | None = None,
        listed_tags: ListedTags | None = None,
    ) -> None:
        self._source = source
        self._destination = destination
        self._from = source_repository
        self._to = destination_repository
        self._overwrite = overwrite
        self._bandwidth = bandwidth
        self._log = log
        self._gate = gate
        self._listed_tags = listed_tags
        self._blobs_seen: set[str] = set()
        self._referrers_seen: set[str] = set()
        self._pushed: list[str] = []
        self._slots = asyncio.Semaphore(1 if bandwidth else BLOB_CONCURRENCY)
        self.result = CopyResult()

    async def copy(self, tag: str, *, copy_referrers: bool) -> CopyResult:
        result = self.result
        digest = await self._source.manifest_digest(self._from, tag)
        if digest is None:
            raise Missing(f"{self._source.name} has no tag {self._from}:{tag}")
        result.digest = digest
        current = await self._destination.manifest_digest(self._to, tag)
        if current == digest:
            result.skipped = True
            self._log(f"{self._to}:{tag} is already {short(digest)}")
        elif current is not None and not self._overwrite:
            result.kept = True
            self._log(
                f"{self._to}:{tag} points at {short(current)}, not {short(digest)}: "
                "left alone (overwrite is off)"
            )
            return result
        else:
            manifest = await self._source.manifest(self._from, digest)
            await self._copy_content(manifest, depth=0)
            await self._push(manifest, tag)
            self._log(
                f"{self._to}:{tag} -> {short(digest)}: {result.blobs_copied} blobs copied "
                f"({size_text(result.bytes_moved)}), {result.blobs_present} present"
            )
        if copy_referrers:
            for subject in self._pushed.copy() if self._pushed else [digest]:
                await self._copy_referrers(subject, depth=0)
        return result

    async def _copy_content(self, manifest: Manifest, *, depth: int) -> None:
        """What `manifest` references, so that it can be pushed next: an index's child
        manifests (each with its own content), an image's config and layers."""
        parsed = parse_manifest(manifest.body, manifest.media_type)
        if not parsed.is_index:
            await self._copy_blobs(parsed.blobs)
            return
        for child in parsed.manifests:
            digest = str(child.digest)
            if await self._destination.manifest_digest(self._to, digest) == digest:
                continue
            if depth >= MAX_DEPTH:
                raise ValueError(f"{self._from}: indexes nested deeper than {MAX_DEPTH} levels")
            child_manifest = await self._source.manifest(self._from, digest)
            await self._copy_content(child_manifest, depth=depth + 1)
            await self._push(child_manifest, digest)

    async def _push(self, manifest: Manifest, reference: str) -> None:
        await self._destination.put_manifest(self._to, reference, manifest.body, manifest.media_type)
        self.result.manifests += 1
        self._pushed.append(manifest.digest)

    async def _copy_blobs(self, descriptors: Iterable[Descriptor]) -> None:
        wanted: list[Descriptor] = []
        for descriptor in descriptors:
            digest = str(descriptor.digest)
            if digest not in self._blobs_seen:
                self._blobs_seen.add(digest)
                wanted.append(descriptor)
        await _all(self._copy_blob(descriptor) for descriptor in wanted)

    async def _copy_blob(self, descriptor: Descriptor) -> None:
        """Send the blob unless the destination repository has it or can mount it. With a
        gate, only one task sends it: the others wait (without a slot), then look again."""
        digest = str(descriptor.digest)
        waited_since: float | None = None
        while True:
            async with self._slots:
                if await self._held(digest):
                    self._waited(digest, waited_since, "copied by another task")
                    return
                if self._gate is None:
                    await self._send(descriptor)
                    return
                gate_pass = await self._gate.enter(digest)
                if gate_pass is not None:
                    try:
                        # Sent by a task that let go between our look and our entry?
                        if gate_pass.located and await self._held(digest, gate_pass.located):
                            self._waited(digest, waited_since, "copied by another task")
                            return
                        self._waited(digest, waited_since, "whose sender stopped or failed: sending it")
                        await self._send(descriptor)
                        await gate_pass.sent(self._to)
                    finally:
                        await gate_pass.release()
                    return
            if waited_since is None:
                waited_since = time.monotonic()
                self.result.blob_waits += 1
            await self._gate.wait(digest)

    def _waited(self, digest: str, since: float | None, outcome: str) -> None:
        if since is not None:
            seconds = time.monotonic() - since
            self._log(f"waited {seconds:.1f}s for blob {short(digest)} {outcome}")

    async def _held(self, digest: str, origin: str | None = None) -> bool:
        """Whether the destination repository holds the blob, or now does by a mount (from
        `origin`, else from where the destination knows of it)."""
        result = self.result
        if await self._destination.has_blob(self._to, digest):
            result.blobs_present += 1
            return True
        if await self._destination.mount(self._to, digest, origin):
            result.blobs_present += 1
            result.blobs_mounted += 1
            self._log(f"mounted blob {short(digest)}")
            return True
        return False

    async def _send(self, descriptor: Descriptor) -> None:
        digest = str(descriptor.digest)

        def open_source(offset: int) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
            return self._source.open_blob(self._from, digest, offset)

        sent = await self._destination.put_blob(
            self._to, digest, descriptor.size, open_source, self._bandwidth
        )
        self.result.bytes_moved += sent
        self.result.blobs_copied += 1
        self._log(f"copied blob {short(digest)} ({size_text(descriptor.size)})")

    async def _copy_referrers(self, subject: str, *, depth: int) -> None:
        """The referrers of `subject` (API and tag scheme), then theirs, `MAX_DEPTH` deep."""
        if depth > MAX_DEPTH or subject in self._referrers_seen:
            return
        self._referrers_seen.add(subject)
        followed: list[str] = []
        for descriptor in await self._source.referrers(self._from, subject):
            digest = descriptor.get("digest")
            if isinstance(digest, str) and await self._copy_referrer(digest, digest):
                followed.append(digest)
        for tag in await self._scheme_tags(subject):
            digest = await self._source.manifest_digest(self._from, tag)
            if digest is not None and await self._copy_referrer(tag, digest):
                followed.append(digest)
        for digest in followed:
            await self._copy_referrers(digest, depth=depth + 1)

    async def _scheme_tags(self, subject: str) -> list[str]:
        """The tag-scheme tags of `subject` to look up at the source: those the run's
        listing found, or all three when it is not known."""
        algorithm, _, encoded = subject.partition(":")
        # A digest too long to be named in a tag (sha512) has none.
        tags = [
            tag for suffix in REFERRER_TAG_SUFFIXES if is_valid_tag(tag := f"{algorithm}-{encoded}{suffix}")
        ]
        if not tags or self._listed_tags is None:
            return tags
        listed = await self._listed_tags.present(tags)
        return tags if listed is None else [tag for tag in tags if tag in listed]

    async def _copy_referrer(self, reference: str, digest: str) -> bool:
        """Copy one referrer manifest under `reference` (its digest, or its tag); False when
        it is not to be followed (gone from the source, or a tag left alone)."""
        current = await self._destination.manifest_digest(self._to, reference)
        if current == digest:
            return True
        if current is not None and not self._overwrite:
            self._log(f"{self._to}:{reference} points elsewhere: left alone (overwrite is off)")
            return False
        try:
            manifest = await self._source.manifest(self._from, digest)
        except Missing:
            self._log(f"referrer {short(digest)} is gone from {self._source.name}")
            return False
        await self._copy_content(manifest, depth=0)
        await self._push(manifest, reference)
        self.result.referrers += 1
        self._log(f"copied referrer {reference if reference != digest else short(digest)}")
        return True
