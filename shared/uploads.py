"""Blob upload sessions kept in the bucket, so any edge replica can continue any upload.

S3 has no append, so each PATCH becomes one part object named by its byte range; the
session's offset is the end of the last part. Finishing checks the digest (a single part
was hashed on its way in; several are read back) and commits the parts as the blob's
extents, so the bytes are not written a second time.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from shared import layout
from shared.blobs import BlobStore, Extent, Source, VerifyingSource, source_from_chunks
from shared.oci.digest import Digest
from shared.oci.errors import RegistryError
from shared.storage import ObjectMissing, ObjectStore

# Parts this small (a client sending tiny chunks) are rewritten as one object when the
# upload finishes rather than kept as extents, so reading the blob stays a few requests.
MIN_EXTENT = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Upload:
    id: str
    name: str
    started: float
    parts: tuple[tuple[int, int], ...]  # (start, end) byte ranges, end exclusive

    @property
    def offset(self) -> int:
        return self.parts[-1][1] if self.parts else 0


class UploadStore:
    def __init__(self, store: ObjectStore, blobs: BlobStore) -> None:
        self._store = store
        self._blobs = blobs

    async def start(self, name: str) -> Upload:
        upload_id = uuid.uuid4().hex
        started = time.time()
        info = json.dumps({"name": name, "started": started}).encode()
        await self._store.put_bytes(layout.upload_info(upload_id), info)
        return Upload(upload_id, name, started, ())

    async def get(self, name: str, upload_id: str) -> Upload:
        unknown = RegistryError("BLOB_UPLOAD_UNKNOWN", detail={"upload": upload_id[:64]})
        if not upload_id.isalnum() or len(upload_id) != 32:
            raise unknown
        try:
            info = json.loads(await self._store.get_bytes(layout.upload_info(upload_id)))
        except ObjectMissing:
            raise unknown from None
        if info.get("name") != name:
            raise unknown
        objects = await self._store.list_objects(layout.upload_parts(upload_id))
        starts = sorted((int(o.key.rsplit("/", 1)[1]), o.size) for o in objects)
        parts = tuple((start, start + size) for start, size in starts)
        return Upload(upload_id, name, float(info["started"]), parts)

    async def append(
        self, upload: Upload, source: Source, length: int | None, start: int | None = None
    ) -> Upload:
        """Store one chunk; `start` (from Content-Range) must continue the upload exactly."""
        if start is not None and start != upload.offset:
            raise RegistryError(
                "BLOB_UPLOAD_INVALID",
                f"chunk starts at {start}, the upload is at {upload.offset}",
                status=416,
            )
        if length == 0:
            return upload
        received = 0
        # The first part is hashed on its way in: an upload sent as one chunk (what docker
        # and skopeo do) is then committed by a server-side copy, without reading it back.
        hasher = hashlib.sha256() if upload.offset == 0 else None

        async def counting(n: int) -> bytes:
            nonlocal received
            chunk = await source(n)
            received += len(chunk)
            if hasher is not None:
                hasher.update(chunk)
            if not chunk and length is not None and received != length:
                # Raised inside the upload so the part is never completed.
                raise RegistryError("SIZE_INVALID", f"received {received} bytes, expected {length}")
            return chunk

        # The part's size is its length in storage, so a part that failed midway (and
        # was therefore never completed) leaves no trace in the upload's state.
        key = layout.upload_part(upload.id, upload.offset)
        await self._store.put_stream(key, counting, -1)
        if received == 0:
            await self._store.delete(key)
            return upload
        if hasher is not None:
            await self._store.put_bytes(
                layout.upload_first_part_sha256(upload.id), hasher.hexdigest().encode()
            )
        end = upload.offset + received
        return Upload(upload.id, upload.name, upload.started, (*upload.parts, (upload.offset, end)))

    async def _iterate_parts(self, upload: Upload) -> AsyncIterator[bytes]:
        for start, _end in upload.parts:
            async for chunk in self._store.stream(layout.upload_part(upload.id, start)):
                yield chunk

    async def finish(self, upload: Upload, digest: Digest) -> int:
        """Verify the whole upload against `digest` and commit it as a blob."""
        sizes = [end - start for start, end in upload.parts]
        if not sizes or any(size < MIN_EXTENT for size in sizes[:-1]):
            size = await self._blobs.commit(
                digest, source_from_chunks(self._iterate_parts(upload)), upload.offset
            )
            await self.cancel(upload)
            return size
        if not await self._first_part_is(upload, digest):
            verifying = VerifyingSource(
                source_from_chunks(self._iterate_parts(upload)), digest, upload.offset
            )
            while await verifying(1024 * 1024):
                pass
        # The marker tells the janitor, should we stop between the two writes, that the
        # parts may belong to a blob now (see `purge`).
        await self._store.put_bytes(layout.upload_committed(upload.id), str(digest).encode())
        extents = [Extent(layout.upload_part(upload.id, start), end - start) for start, end in upload.parts]
        if await self._blobs.commit_extents(digest, extents):
            await self._delete_session(upload.id)
        else:
            await self.cancel(upload)  # the blob was already stored: these parts are spare
        return upload.offset

    async def _first_part_is(self, upload: Upload, digest: Digest) -> bool:
        """Whether the upload is one part that hashed to `digest` when it was written."""
        if len(upload.parts) != 1 or digest.algorithm != "sha256":
            return False
        try:
            recorded = await self._store.get_bytes(layout.upload_first_part_sha256(upload.id))
        except ObjectMissing:
            return False
        return recorded.decode() == digest.hex

    async def cancel(self, upload: Upload) -> None:
        await self._store.delete_many(await self._store.list_keys(layout.upload_parts(upload.id)))
        await self._delete_session(upload.id)

    async def _delete_session(self, upload_id: str) -> None:
        await self._store.delete_many(await self._store.list_keys(layout.upload(upload_id)))

    async def expired(self, older_than: float) -> list[str]:
        """Ids of uploads started before `older_than` (epoch seconds), for the janitor."""
        ids = []
        for key in await self._store.list_keys("uploads/", recursive=False):
            upload_id = key.rstrip("/").rsplit("/", 1)[-1]
            try:
                info = json.loads(await self._store.get_bytes(layout.upload_info(upload_id)))
            except ObjectMissing:
                # Filer-backed stores (SeaweedFS) keep the empty directory of a finished or
                # purged session; only one that still holds objects is an orphan to purge.
                if await self._store.list_keys(layout.upload(upload_id)):
                    ids.append(upload_id)
                continue
            if float(info.get("started", 0)) < older_than:
                ids.append(upload_id)
        return ids

    async def purge(self, upload_id: str) -> None:
        """Remove an abandoned session and its parts, unless the parts became a blob."""
        try:
            marker = await self._store.get_bytes(layout.upload_committed(upload_id))
            committed = Digest.parse(marker.decode())
        except ObjectMissing:
            committed = None
        if committed is not None:
            placement = await self._blobs.placement(committed)
            prefix = layout.upload_parts(upload_id)
            if placement and placement.extents and placement.extents[0].key.startswith(prefix):
                await self._delete_session(upload_id)
                return
        await self._store.delete_many(await self._store.list_keys(layout.upload_parts(upload_id)))
        await self._delete_session(upload_id)
