"""Blob upload sessions kept in the bucket, so any edge replica can continue any upload.

S3 has no append, so each PATCH becomes one part object; the session's offset is the end
of the last part. Finishing checks the digest (a single part was hashed on its way in;
several are read back) and commits the parts as the blob's extents, so the bytes are not
written a second time.

What a committed digest serves must never change, whatever clients do concurrently:
- every part is written under a key of its own (`layout.upload_part`), so a chunk that
  arrives late, or two chunks sent at once, can never replace bytes a blob points to;
- finishing first writes the commit marker and only then lists the parts; a chunk first
  writes its part and only then looks for the marker. Whichever way the two interleave,
  either the listing sees the part or the chunk sees the marker and is refused, so no
  chunk is acknowledged that the commit left out. Cancelling does the same with its own
  marker against the commit marker, so a cancel never deletes parts a commit names;
- two parts that start at the same byte (chunks raced without Content-Range) make the
  upload invalid rather than letting either win silently.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from shared.oci.digest import Digest
from shared.oci.errors import RegistryError
from shared.registry import layout
from shared.registry.blobs import BlobStore, Extent, Source, VerifyingSource, source_from_chunks
from shared.registry.storage import ObjectInfo, ObjectMissing, ObjectStore

# Parts this small (a client sending tiny chunks) are rewritten as one object when the
# upload finishes rather than kept as extents, so reading the blob stays a few requests.
MIN_EXTENT = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Part:
    key: str
    start: int
    end: int  # exclusive

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Upload:
    id: str
    name: str
    started: float
    parts: tuple[Part, ...]

    @property
    def offset(self) -> int:
        return self.parts[-1].end if self.parts else 0


def _unknown(upload_id: str) -> RegistryError:
    return RegistryError("BLOB_UPLOAD_UNKNOWN", detail={"upload": upload_id[:64]})


def _chain(upload_id: str, objects: list[ObjectInfo]) -> tuple[Part, ...]:
    """The upload's parts in byte order; refused when two cover the same bytes."""
    parts: list[Part] = []
    for info in sorted(objects, key=lambda o: (layout.start_of(o.key), o.key)):
        if info.size == 0:
            continue  # a chunk that carried nothing
        start = layout.start_of(info.key)
        expected = parts[-1].end if parts else 0
        if start != expected:
            raise RegistryError(
                "BLOB_UPLOAD_INVALID",
                "chunks of this upload were sent concurrently or out of order; start a new upload",
                detail={"upload": upload_id[:64]},
            )
        parts.append(Part(info.key, start, start + info.size))
    return tuple(parts)


def _closed(upload_id: str, session: set[str]) -> bool:
    """Whether the session was finished or cancelled (its markers are written first)."""
    return bool({layout.upload_committed(upload_id), layout.upload_cancelled(upload_id)} & session)


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
        """An open session of repository `name`; finished, cancelled or foreign ones are unknown."""
        if not upload_id.isalnum() or len(upload_id) != 32:
            raise _unknown(upload_id)
        info_raw, session, objects = await asyncio.gather(
            self._info(upload_id),
            self._session_keys(upload_id),
            self._store.list_objects(layout.upload_parts(upload_id)),
        )
        if info_raw is None or _closed(upload_id, session) or info_raw.get("name") != name:
            raise _unknown(upload_id)
        return Upload(upload_id, name, float(str(info_raw["started"])), _chain(upload_id, objects))

    async def _info(self, upload_id: str) -> dict[str, object] | None:
        try:
            info = json.loads(await self._store.get_bytes(layout.upload_info(upload_id)))
        except ObjectMissing:
            return None
        return info if isinstance(info, dict) else None

    async def _session_keys(self, upload_id: str) -> set[str]:
        """The session's own objects (its info and markers, among others), in one listing."""
        return set(await self._store.list_keys(layout.upload(upload_id)))

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
        # The first part is hashed on its way in (in a thread, part by part, by the store):
        # an upload sent as one chunk (what docker and skopeo do) is then committed without
        # reading it back.
        hasher = hashlib.sha256() if upload.offset == 0 else None

        async def counting(n: int) -> bytes:
            nonlocal received
            chunk = await source(n)
            received += len(chunk)
            if not chunk and length is not None and received != length:
                # Raised inside the upload so the part is never completed.
                raise RegistryError("SIZE_INVALID", f"received {received} bytes, expected {length}")
            return chunk

        # A part that failed midway was never completed, so it leaves no trace.
        key = layout.upload_part(upload.id, upload.offset)
        await self._store.put_stream(key, counting, -1, hasher=hasher)
        if received == 0:
            await self._store.delete(key)
            return upload
        # Written first, checked second (see the module docstring). A part that arrived
        # after the session closed is left for the janitor: the commit may have listed it.
        # The part's recorded hash goes up beside the check; a closed session's is purged
        # with it.
        session, _ = await asyncio.gather(
            self._session_keys(upload.id),
            self._record_sha256(upload.id, key, hasher),
        )
        if layout.upload_info(upload.id) not in session or _closed(upload.id, session):
            raise RegistryError(
                "BLOB_UPLOAD_UNKNOWN",
                "the upload was finished or cancelled while this chunk was arriving",
                detail={"upload": upload.id},
            )
        end = upload.offset + received
        return Upload(upload.id, upload.name, upload.started, (*upload.parts, Part(key, upload.offset, end)))

    async def _record_sha256(self, upload_id: str, key: str, hasher: hashlib._Hash | None) -> None:
        if hasher is not None:
            await self._store.put_bytes(
                layout.upload_part_sha256(upload_id, key), hasher.hexdigest().encode()
            )

    async def _iterate_parts(self, parts: tuple[Part, ...]) -> AsyncIterator[bytes]:
        for part in parts:
            async for chunk in self._store.stream(part.key):
                yield chunk

    async def finish(
        self, upload: Upload, digest: Digest, then: Callable[[int], Awaitable[None]] | None = None
    ) -> int:
        """Close the session, verify exactly its parts against `digest`, commit them as a blob.

        `then(size)` (linking the blob to the repository) runs once the blob is committed,
        while the closed session is deleted.
        """
        marker = json.dumps({"digest": str(digest)}).encode()
        await self._store.put_bytes(layout.upload_committed(upload.id), marker)
        try:
            # All after the marker, at once. Listed after it: every chunk acknowledged so far
            # is here. The hash recorded for the one part the session held when the client
            # asked to finish is read alongside (it counts only if that part is still exactly
            # what was listed), and so is whether the blob is stored already (the handler
            # claimed the digest before calling this).
            cancelled, objects, recorded, held = await asyncio.gather(
                self._store.stat(layout.upload_cancelled(upload.id)),
                self._store.list_objects(layout.upload_parts(upload.id)),
                self._recorded_sha256(upload.id, upload.parts),
                self._blobs.held_soundly(digest),
            )
            if cancelled is not None:
                raise _unknown(upload.id)
            parts = _chain(upload.id, objects)
            size = await self._verify_and_commit(
                parts, digest, recorded if parts == upload.parts else None, held
            )
        except RegistryError:
            # The content was refused, so nothing was committed: reopen the session (a
            # client may PUT again with the right digest). After a storage failure it stays
            # closed, since a record may have landed: the janitor then keeps what it names.
            await self._store.delete(layout.upload_committed(upload.id))
            raise
        await asyncio.gather(self._delete_session(upload.id), *([then(size)] if then is not None else []))
        return size

    async def _verify_and_commit(
        self, parts: tuple[Part, ...], digest: Digest, recorded: str | None, held: bool
    ) -> int:
        total = parts[-1].end if parts else 0
        if not parts or any(part.size < MIN_EXTENT for part in parts[:-1]):
            size = await self._blobs.commit(digest, source_from_chunks(self._iterate_parts(parts)), total)
            await self._store.delete_many([p.key for p in parts])
            return size
        # A single part whose SHA-256, recorded as it was written, is the digest is not read
        # back; anything else is read back and verified before it is committed (and whether
        # the blob is stored is then asked again, after that read).
        hashed_on_arrival = len(parts) == 1 and digest.algorithm == "sha256" and recorded == digest.hex
        if not hashed_on_arrival:
            verifying = VerifyingSource(source_from_chunks(self._iterate_parts(parts)), digest, total)
            while await verifying(1024 * 1024):
                pass
        extents = [Extent(part.key, part.size) for part in parts]
        if not await self._blobs.commit_extents(digest, extents, held if hashed_on_arrival else None):
            await self._store.delete_many([p.key for p in parts])  # stored already: a spare copy
        return total

    async def _recorded_sha256(self, upload_id: str, parts: tuple[Part, ...]) -> str | None:
        """The sha256 recorded when the upload's only part was written, if it has one part."""
        if len(parts) != 1:
            return None
        try:
            return (await self._store.get_bytes(layout.upload_part_sha256(upload_id, parts[0].key))).decode()
        except ObjectMissing:
            return None

    async def cancel(self, upload: Upload) -> None:
        await self._store.put_bytes(layout.upload_cancelled(upload.id), b"")
        if await self._store.stat(layout.upload_committed(upload.id)) is not None:
            # Finishing at this moment: its parts may be a blob now. Leave them to it.
            raise _unknown(upload.id)
        await self._store.delete_many(await self._store.list_keys(layout.upload_parts(upload.id)))
        await self._delete_session(upload.id)

    async def _delete_session(self, upload_id: str) -> None:
        await self._store.delete_many(await self._store.list_keys(layout.upload(upload_id)))

    async def expired(self, older_than: float) -> list[str]:
        """Ids of uploads started before `older_than` (epoch seconds), for the janitor."""
        ids = []
        for key in await self._store.list_keys("uploads/", recursive=False):
            upload_id = key.rstrip("/").rsplit("/", 1)[-1]
            info = await self._info(upload_id)
            if info is None:
                # Filer-backed stores (SeaweedFS) keep the empty directory of a finished or
                # purged session; only one that still holds objects is an orphan to purge.
                if await self._store.list_keys(layout.upload(upload_id)):
                    ids.append(upload_id)
                continue
            if float(str(info.get("started", 0))) < older_than:
                ids.append(upload_id)
        return ids

    async def purge(self, upload_id: str) -> None:
        """Remove an abandoned session and its parts, except the parts a blob is made of."""
        keep: set[str] = set()
        committed = await self._committed_digest(upload_id)
        if committed is None and await self._info(upload_id) is None:
            # No session and no commit marker: only a write that came after the session was
            # closed is left (a late, refused chunk's hash record). The session may have been
            # committed and its parts be a blob's extents now: delete the stray state only;
            # parts no blob names are garbage collection's (it deletes only those).
            await self._delete_session(upload_id)
            return
        if committed is not None:
            placement = await self._blobs.placement(committed)
            if placement is not None and placement.extents:
                keep = {extent.key for extent in placement.extents}
        parts = await self._store.list_keys(layout.upload_parts(upload_id))
        await self._store.delete_many(key for key in parts if key not in keep)
        await self._delete_session(upload_id)

    async def _committed_digest(self, upload_id: str) -> Digest | None:
        try:
            marker = (await self._store.get_bytes(layout.upload_committed(upload_id))).decode()
        except ObjectMissing:
            return None
        # Sessions closed by earlier versions hold the bare digest.
        text = json.loads(marker)["digest"] if marker.startswith("{") else marker
        return Digest.parse(str(text))
