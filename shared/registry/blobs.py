"""Content-addressed blobs: verified while streamed in, committed once, streamed out.

A blob is stored under its digest as a small record naming the objects that hold its
bytes, in order ("extents"): the parts a client pushed, the segments a fill staged, or
one object written for bytes that arrived whole. Committing a record instead of
assembling a new object means every byte is written to the bucket once, however it
arrived. Every extent is an object written once under a key of its own
(`layout.unique_suffix`), so what a record names can never change after it is verified;
two concurrent commits of one digest write two records naming equally verified bytes.

Blobs stored by earlier versions may be whole objects (written atomically after their
hash was checked: trusted) or records without a version, whose extents had reusable
keys: those are re-hashed once before a copy is shared with another repository. A
reader that finds stored bytes not matching their digest moves the blob to quarantine
(`quarantine/`), counts it, and does not serve it.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import structlog

from shared.metrics import BLOB_CORRUPTIONS
from shared.oci.digest import Digest
from shared.oci.errors import RegistryError
from shared.registry import layout
from shared.registry.storage import ObjectMissing, ObjectStore, StorageUnavailable

log = structlog.get_logger("blobs")

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
    # Whether the bytes were verified when committed and cannot have changed since: whole
    # objects and versioned records. Records of earlier versions are checked on sharing.
    sealed: bool = True


# Object metadata marking a record (and giving the blob's size without reading it).
_EXTENTS_META = "seawall-extents"
_SIZE_META = "seawall-size"
RECORD_TYPE = "application/vnd.seawall.blob-extents+json"
# Records whose extents are written once under keys of their own carry this version.
RECORD_VERSION = 2
VERIFY_CHUNK = 1024 * 1024
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
        # Unsealed (older) blobs this process has re-hashed and found sound.
        self._sound: OrderedDict[Digest, None] = OrderedDict()

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
            found = Placement(int(record["size"]), extents, record.get("version", 1) >= RECORD_VERSION)
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

        A digest already held (and sound) is verified but not written again.
        """
        verifying = VerifyingSource(source, digest, expected_size)
        if await self.held_soundly(digest):
            while await verifying(VERIFY_CHUNK):
                pass
            return verifying.size
        key = layout.blob_data(digest)
        await self._store.put_stream(key, verifying, expected_size or -1)
        await self._write_record(digest, [Extent(key, verifying.size)])
        return verifying.size

    async def commit_extents(
        self, digest: Digest, extents: Sequence[Extent], held: bool | None = None
    ) -> bool:
        """Commit objects already verified to hash to `digest` (in order) as the blob.

        Returns False, writing nothing, if the blob is already stored (and sound): the
        caller's extents are then a spare copy it may delete. `held` is that check's
        answer when the caller already asked `held_soundly` (after claiming the digest).
        """
        if held if held is not None else await self.held_soundly(digest):
            return False
        await self._write_record(digest, extents)
        return True

    async def commit_bytes(self, digest: Digest, data: bytes) -> None:
        actual = Digest.of(data, digest.algorithm)
        if actual != digest:
            raise RegistryError(
                "DIGEST_INVALID",
                f"content hashes to {actual}, not {digest}",
                detail={"digest": str(digest)},
            )
        if await self.held_soundly(digest):
            return
        key = layout.blob_data(digest)
        await self._store.put_bytes(key, data)
        await self._write_record(digest, [Extent(key, len(data))])

    async def _write_record(self, digest: Digest, extents: Sequence[Extent]) -> None:
        size = sum(e.size for e in extents)
        record = {"version": RECORD_VERSION, "size": size, "extents": [[e.key, e.size] for e in extents]}
        await self._store.put_bytes(
            layout.blob(digest),
            json.dumps(record).encode(),
            content_type=RECORD_TYPE,
            metadata={_EXTENTS_META: str(len(extents)), _SIZE_META: str(size)},
        )
        self._placements.pop(digest, None)

    # -- integrity -----------------------------------------------------------------------
    async def held_soundly(self, digest: Digest, where: str = "link") -> bool:
        """Whether the blob is stored with bytes that hash to its digest.

        Sealed blobs are taken as verified; an older record is re-hashed once per process
        (and quarantined if it fails), so a copy is never shared that was not verified.
        """
        found = await self.placement(digest)
        if found is None:
            return False
        if found.sealed or digest in self._sound:
            return True
        if await self.rehash(digest, found.size):
            self._sound[digest] = None
            if len(self._sound) > PLACEMENT_CACHE:
                self._sound.popitem(last=False)
            return True
        await self.quarantine(digest, where, "stored bytes do not hash to the digest")
        return False

    async def rehash(
        self, digest: Digest, size: int, pace: Callable[[int], Awaitable[None]] | None = None
    ) -> bool:
        """Read the stored blob back and say whether it is `size` bytes hashing to `digest`.

        Hashing runs in a thread (principle: whole-blob hashing never blocks the event
        loop); `pace` is awaited after each chunk (the scrub's rate limit).
        """
        hasher = digest.hasher()
        seen = 0
        async for chunk in self.stream(digest):
            await asyncio.to_thread(hasher.update, chunk)
            seen += len(chunk)
            if pace is not None:
                await pace(len(chunk))
        return seen == size and hasher.hexdigest() == digest.hex

    async def stream_verified(self, digest: Digest, size: int) -> AsyncIterator[bytes]:
        """The whole blob, hashed on the way out; the last chunk is held back until the hash
        matches. On a mismatch the blob is quarantined and the stream fails, so the client
        receives a truncated body, which it rejects, instead of wrong bytes."""
        hasher = digest.hasher()
        held: bytes | None = None
        seen = 0
        async for chunk in self.stream(digest):
            hashing = asyncio.ensure_future(asyncio.to_thread(hasher.update, chunk))
            if held is not None:
                yield held
            await hashing
            held = chunk
            seen += len(chunk)
        if seen != size or hasher.hexdigest() != digest.hex:
            await self.quarantine(digest, "stream", f"read {seen} bytes hashing to {hasher.hexdigest()}")
            raise RegistryError(
                "BLOB_UNKNOWN",
                "the stored copy failed verification and was quarantined",
                detail={"digest": str(digest)},
            )
        if held is not None:
            yield held

    async def quarantine(self, digest: Digest, where: str, reason: str) -> None:
        """Move a blob whose stored bytes are wrong out of `blobs/`, keeping its record for
        inspection; clients then see it as missing (a proxy refetches it, a push restores it)."""
        key = layout.blob(digest)
        stamp = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(4)}"
        try:
            await self._store.copy(key, layout.quarantined(digest, stamp))
        except ObjectMissing:
            self.forget(digest)
            return  # already quarantined (or deleted) by someone else
        except StorageUnavailable as exc:
            log.warning("quarantine_copy_failed", digest=str(digest), error=str(exc))
        await self._store.delete(key)
        self.forget(digest)
        BLOB_CORRUPTIONS.labels(where).inc()
        log.error("blob_quarantined", digest=str(digest), where=where, reason=reason)

    def forget_placement(self, digest: Digest) -> None:
        """Drop only the remembered placement: the next lookup asks the bucket (a write
        about to rely on the blob being stored, while a collection may have deleted it)."""
        self._placements.pop(digest, None)

    def forget(self, digest: Digest) -> None:
        """Drop what this process remembers about a blob (it was quarantined or replaced)."""
        self._placements.pop(digest, None)
        self._sound.pop(digest, None)
        cached = self._recent.pop(digest, None)
        if cached is not None:
            self._recent_bytes -= len(cached)
