"""Content-addressed blobs: verified while streamed in, committed whole, streamed out."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable

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


# Manifests are read whole and, being content-addressed, never change: keep the recent
# ones in memory (bounded by bytes) so a warm manifest GET needs no storage round trip.
MANIFEST_CACHE_BYTES = 64 * 1024 * 1024
_CACHEABLE = 4 * 1024 * 1024


class BlobStore:
    def __init__(self, store: ObjectStore) -> None:
        self._store = store
        self._recent: OrderedDict[Digest, bytes] = OrderedDict()
        self._recent_bytes = 0

    def _keep(self, digest: Digest, data: bytes) -> None:
        if len(data) > _CACHEABLE or digest in self._recent:
            return
        self._recent[digest] = data
        self._recent_bytes += len(data)
        while self._recent_bytes > MANIFEST_CACHE_BYTES:
            _, evicted = self._recent.popitem(last=False)
            self._recent_bytes -= len(evicted)

    async def size(self, digest: Digest) -> int | None:
        info = await self._store.stat(layout.blob(digest))
        return info.size if info else None

    async def read(self, digest: Digest) -> bytes:
        """A small blob whole (manifests are at most a few MiB)."""
        cached = self._recent.get(digest)
        if cached is not None:
            self._recent.move_to_end(digest)
            return cached
        try:
            data = await self._store.get_bytes(layout.blob(digest))
        except ObjectMissing:
            raise RegistryError("BLOB_UNKNOWN", detail={"digest": str(digest)}) from None
        self._keep(digest, data)
        return data

    def stream(self, digest: Digest, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        return self._store.stream(layout.blob(digest), offset, length)

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

    async def adopt(self, digest: Digest, key: str, size: int) -> None:
        """Commit an object already verified to hash to `digest`, by a server-side copy."""
        if await self.size(digest) is None:
            await self._store.copy(key, layout.blob(digest))

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
