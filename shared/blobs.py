"""Content-addressed blobs: verified while streamed in, committed once, streamed out.

A blob is stored under its digest either whole (one object) or as a small record naming
the objects that hold its bytes, in order ("extents"): the parts a client pushed, or the
segments a fill staged. Committing a record instead of assembling a new object means
every byte is written to the bucket once, however it arrived.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from shared import layout
from shared.oci.digest import Digest
from shared.oci.errors import RegistryError
from shared.storage import ObjectMissing, ObjectStore

Source = Callable[[int], Awaitable[bytes]]


def source_from_chunks(chunks: AsyncIterator[bytes]) -> Source:
    """Adapt a chunk iterator to a source that never returns more than asked for."""
    pending = b""

    async def read(n: int) -> bytes:
        nonlocal pending
        while not pending:
            pending = await anext(chunks, b"")
            if not pending:
                return b""
        out, pending = pending[:n], pending[n:]
        return out

    return read


class VerifyingSource:
    """Wraps a byte source, hashing what passes; fails the read that completes a bad blob.

    Raising on that last read (instead of checking afterwards) is what keeps an
    unverified blob from ever becoming visible: the storage upload is aborted before it
    is completed.
    """

    def __init__(self, source: Source, digest: Digest, expected_size: int | None) -> None:
        self._source = source
        self._digest = digest
        self._hasher = digest.hasher()
        self._expected = expected_size
        self.size = 0
        self._done = False

    async def __call__(self, n: int) -> bytes:
        if self._done:
            return b""
        if self._expected is not None:
            n = min(n, self._expected - self.size)
            if n <= 0:
                self._finish()
                return b""
        chunk = await self._source(n)
        self._hasher.update(chunk)
        self.size += len(chunk)
        if not chunk or (self._expected is not None and self.size >= self._expected):
            self._finish()
        return chunk

    def _finish(self) -> None:
        self._done = True
        if self._expected is not None and self.size != self._expected:
            raise RegistryError(
                "SIZE_INVALID",
                f"received {self.size} bytes, expected {self._expected}",
            )
        actual = f"{self._digest.algorithm}:{self._hasher.hexdigest()}"
        if actual != str(self._digest):
            raise RegistryError(
                "DIGEST_INVALID",
                f"content hashes to {actual}, not {self._digest}",
                detail={"digest": str(self._digest)},
            )


@dataclass(frozen=True, slots=True)
class Extent:
    key: str
    size: int


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a blob's bytes are: its own object, or the extents its record names."""

    size: int
    extents: tuple[Extent, ...] | None = None


# Object metadata marking a record (and giving the blob's size without reading it).
_EXTENTS_META = "seawall-extents"
_SIZE_META = "seawall-size"
RECORD_TYPE = "application/vnd.seawall.blob-extents+json"
# Placements never change once committed; remember this many per process.
PLACEMENT_CACHE = 100_000


# Manifests are read whole and, being content-addressed, never change: keep the recent
# ones in memory (bounded by bytes) so a warm manifest GET needs no storage round trip.
MANIFEST_CACHE_BYTES = 64 * 1024 * 1024
_CACHEABLE = 4 * 1024 * 1024


class BlobStore:
    def __init__(self, store: ObjectStore) -> None:
        self._store = store
        self._recent: OrderedDict[Digest, bytes] = OrderedDict()
        self._recent_bytes = 0
        self._placements: OrderedDict[Digest, Placement] = OrderedDict()

    async def placement(self, digest: Digest) -> Placement | None:
        """Where the blob is, or None if it is not stored (never cached: it may arrive)."""
        found = self._placements.get(digest)
        if found is not None:
            return found
        info = await self._store.stat(layout.blob(digest))
        if info is None:
            return None
        if _EXTENTS_META not in info.metadata:
            found = Placement(info.size)
        else:
            try:
                record = json.loads(await self._store.get_bytes(layout.blob(digest)))
            except ObjectMissing:
                return None
            extents = tuple(Extent(key, size) for key, size in record["extents"])
            found = Placement(int(record["size"]), extents)
        self._placements[digest] = found
        if len(self._placements) > PLACEMENT_CACHE:
            self._placements.popitem(last=False)
        return found

    def _keep(self, digest: Digest, data: bytes) -> None:
        if len(data) > _CACHEABLE or digest in self._recent:
            return
        self._recent[digest] = data
        self._recent_bytes += len(data)
        while self._recent_bytes > MANIFEST_CACHE_BYTES:
            _, evicted = self._recent.popitem(last=False)
            self._recent_bytes -= len(evicted)

    async def size(self, digest: Digest) -> int | None:
        found = await self.placement(digest)
        return found.size if found else None

    async def read(self, digest: Digest) -> bytes:
        """A small blob whole (manifests are at most a few MiB)."""
        cached = self._recent.get(digest)
        if cached is not None:
            self._recent.move_to_end(digest)
            return cached
        try:
            found = await self.placement(digest)
            if found is None:
                raise ObjectMissing(layout.blob(digest))
            if found.extents is None:
                data = await self._store.get_bytes(layout.blob(digest))
            else:
                data = b"".join([chunk async for chunk in self.stream(digest)])
        except ObjectMissing:
            raise RegistryError("BLOB_UNKNOWN", detail={"digest": str(digest)}) from None
        self._keep(digest, data)
        return data

    async def stream(
        self, digest: Digest, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        """The blob's bytes [offset, offset + length); ObjectMissing if it is not stored."""
        found = await self.placement(digest)
        if found is None:
            raise ObjectMissing(layout.blob(digest))
        if found.extents is None:
            async for chunk in self._store.stream(layout.blob(digest), offset, length):
                yield chunk
            return
        end = found.size if length is None else min(found.size, offset + length)
        start = 0
        for extent in found.extents:
            stop = start + extent.size
            if stop > offset and start < end:
                lo, hi = max(offset, start) - start, min(end, stop) - start
                async for chunk in self._store.stream(extent.key, lo, hi - lo):
                    yield chunk
            start = stop
            if start >= end:
                return

    async def commit(self, digest: Digest, source: Source, expected_size: int | None = None) -> int:
        """Stream `source` in, verify it hashes to `digest`, commit it; return its size.

        A digest already held is verified but not rewritten: rewriting would race readers
        of the existing object on stores that free old chunks on overwrite.
        """
        verifying = VerifyingSource(source, digest, expected_size)
        if await self.size(digest) is not None:
            while await verifying(1024 * 1024):
                pass
            return verifying.size
        await self._store.put_stream(layout.blob(digest), verifying, expected_size or -1)
        return verifying.size

    async def commit_extents(self, digest: Digest, extents: Sequence[Extent]) -> bool:
        """Commit objects already verified to hash to `digest` (in order) as the blob.

        Returns False, writing nothing, if the blob is already stored: the caller's
        extents are then a spare copy it may delete.
        """
        if await self.size(digest) is not None:
            return False
        size = sum(e.size for e in extents)
        record = {"size": size, "extents": [[e.key, e.size] for e in extents]}
        await self._store.put_bytes(
            layout.blob(digest),
            json.dumps(record).encode(),
            content_type=RECORD_TYPE,
            metadata={_EXTENTS_META: str(len(extents)), _SIZE_META: str(size)},
        )
        return True

    async def commit_bytes(self, digest: Digest, data: bytes) -> None:
        actual = Digest.of(data, digest.algorithm)
        if actual != digest:
            raise RegistryError(
                "DIGEST_INVALID",
                f"content hashes to {actual}, not {digest}",
                detail={"digest": str(digest)},
            )
        if await self.size(digest) is None:
            await self._store.put_bytes(layout.blob(digest), data)
