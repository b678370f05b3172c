"""A local project as a replication end: the source of a push rule (hosted or proxy), the
destination of a pull rule (hosted).

It works through the bucket's stores exactly as the edge serves a pull and takes a push:
blobs are verified while they stream in and committed by `BlobStore` (the record format
pushes use), linked to the repository, manifests checked against what the repository
holds, stored as the exact bytes received and tagged last. Repository names are full
names, starting with the project's (`mirror/python`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

from shared.oci.digest import Digest
from shared.oci.errors import RegistryError
from shared.oci.manifest import Descriptor, parse_manifest
from shared.oci.reference import is_valid_tag, validate_tag
from shared.registry import layout
from shared.registry.blobs import BlobStore
from shared.registry.repositories import RepositoryStore, Revision
from shared.registry.storage import ObjectMissing, ObjectStore
from shared.replication.transfer import Manifest, Missing, OpenSource, ResumingReader
from shared.settings import Project


class LocalProject:
    """One project of this Seawall, read and written through the bucket's stores."""

    def __init__(
        self, project: Project, blobs: BlobStore, repositories: RepositoryStore, objects: ObjectStore
    ) -> None:
        self.project = project
        self.name = project.name
        self._blobs = blobs
        self._repositories = repositories
        self._objects = objects

    def _own(self, repository: str) -> str:
        """`repository` if it is one of this project's; a name elsewhere is refused."""
        if not repository.startswith(f"{self.name}/"):
            raise ValueError(f"repository {repository!r} is not in project {self.name!r}")
        return repository

    # -- as a source -----------------------------------------------------------------
    async def repositories(self) -> AsyncIterator[str]:
        """The project's repositories, from the catalog entries under its name only."""
        prefix = layout.catalog_entry(f"{self.name}/")
        for key in await self._objects.list_keys(prefix):
            yield layout.catalog_name(key)

    async def tags(self, repository: str) -> AsyncIterator[str]:
        for tag in await self._repositories.tags(self._own(repository)):
            yield tag

    async def _revision(self, repository: str, reference: str) -> Revision | None:
        name = self._own(repository)
        if Digest.is_digest(reference):
            return await self._repositories.revision(name, Digest.parse(reference))
        if not is_valid_tag(reference):
            return None
        digest = await self._repositories.resolve_tag(name, reference)
        return await self._repositories.revision(name, digest) if digest else None

    async def manifest_digest(self, repository: str, reference: str) -> str | None:
        revision = await self._revision(repository, reference)
        return str(revision.digest) if revision else None

    async def manifest(self, repository: str, reference: str) -> Manifest:
        revision = await self._revision(repository, reference)
        if revision is None:
            raise Missing(f"project {self.name} has no manifest {repository}:{reference}")
        try:
            body = await self._blobs.read(revision.digest)
        except RegistryError as exc:  # BLOB_UNKNOWN: the revision outlived its bytes
            raise Missing(f"project {self.name} lost the bytes of {revision.digest}") from exc
        return Manifest(body, revision.media_type, str(revision.digest))

    async def blob_size(self, repository: str, digest: str) -> int | None:
        """The blob's size if this repository may serve it: linked there, or (a proxy
        project, whose fills are shared by its repositories) held by the project."""
        name = self._own(repository)
        parsed = Digest.parse(digest)
        size = await self._repositories.linked_size(name, parsed)
        if (
            size is None
            and self.project.type == "proxy"
            and await self._repositories.project_holds(self.name, parsed)
        ):
            size = await self._blobs.size(parsed)
        return size

    @asynccontextmanager
    async def open_blob(
        self, repository: str, digest: str, offset: int = 0
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        if await self.blob_size(repository, digest) is None:
            raise Missing(f"project {self.name} holds no blob {digest} for {repository}")
        # An async generator: closed here, so a reader that stops early frees its connection.
        chunks = cast(AsyncGenerator[bytes, None], self._blobs.stream(Digest.parse(digest), offset))
        try:
            yield chunks
        except ObjectMissing as exc:
            raise Missing(f"project {self.name} lost the bytes of blob {digest}") from exc
        finally:
            await chunks.aclose()

    async def referrers(self, repository: str, digest: str) -> list[dict[str, Any]]:
        return await self._repositories.referrers(self._own(repository), Digest.parse(digest))

    # -- as a destination ------------------------------------------------------------
    async def has_blob(self, repository: str, digest: str) -> bool:
        return await self._repositories.blob_linked(self._own(repository), Digest.parse(digest))

    async def mount(self, repository: str, digest: str, from_repository: str | None = None) -> bool:
        """Link a blob another repository of this project holds: no bytes move.

        Only within the project (`from_repository`, if given, must be in it too), as the
        edge's automatic mount: a blob stored for another project is not shared on the
        strength of a manifest naming its digest.
        """
        name = self._own(repository)
        parsed = Digest.parse(digest)
        # Claimed before the checks find it held (a collection may be deleting it).
        await self._repositories.claim([parsed], self._blobs)
        if from_repository is not None:
            if not await self._repositories.blob_linked(self._own(from_repository), parsed):
                return False
        elif not await self._repositories.project_holds(self.name, parsed):
            return False
        size = await self._blobs.size(parsed)
        if size is None or not await self._blobs.held_soundly(parsed):
            return False
        await self._repositories.link_blob(name, parsed, size)
        return True

    async def put_blob(
        self, repository: str, digest: str, size: int, open_source: OpenSource, bandwidth: int | None
    ) -> int:
        """Stream the blob into the bucket, verified against `digest` and `size`, and link
        it; a broken source stream is reopened where it stopped. Returns the bytes read."""
        name = self._own(repository)
        parsed = Digest.parse(digest)
        reader = ResumingReader(open_source, bandwidth=bandwidth)
        # Claimed before `commit` finds the blob stored and skips writing it.
        await self._repositories.claim([parsed], self._blobs)
        try:
            stored = await self._blobs.commit(parsed, reader.read, size)
        finally:
            await reader.close()
        await self._repositories.link_blob(name, parsed, stored)
        return reader.bytes_read

    async def put_manifest(self, repository: str, reference: str, body: bytes, media_type: str) -> str:
        """Store a manifest as a push would: what it references must be in the repository
        already (children and blobs first), then the bytes, the revision, the tag."""
        name = self._own(repository)
        tag: str | None = None
        if Digest.is_digest(reference):
            digest = Digest.parse(reference)
            if Digest.of(body, digest.algorithm) != digest:
                raise RegistryError("DIGEST_INVALID", f"manifest body does not hash to {reference}")
        else:
            tag = validate_tag(reference)
            digest = Digest.of(body)
        manifest = parse_manifest(body, media_type)
        # Claimed before the checks (shared/lifecycle/guard.py); what a collection deleted
        # lately may still be linked, so those must be stored too.
        named = [digest, *(d.digest for d in manifest.blobs), *(d.digest for d in manifest.manifests)]
        rechecked = await self._repositories.claim(named, self._blobs)
        await self._check_references(name, manifest.blobs, manifest.manifests)
        for gone in rechecked - {digest}:
            if await self._blobs.size(gone) is None:
                raise RegistryError("MANIFEST_BLOB_UNKNOWN", f"{gone} is not in repository {name}")
        await self._blobs.commit_bytes(digest, body)
        await self._repositories.add_revision(name, digest, manifest)
        if tag is not None:
            await self._repositories.set_tag(name, tag, digest)
        return str(digest)

    async def _check_references(
        self, name: str, blobs: tuple[Descriptor, ...], children: tuple[Descriptor, ...]
    ) -> None:
        """The edge's rule for a pushed manifest: every blob linked and every child manifest
        present, with the size its descriptor gives."""
        found = await asyncio.gather(
            *(self._repositories.linked_size(name, b.digest) for b in blobs),
            *(self._repositories.revision(name, c.digest) for c in children),
        )
        for descriptor, held in zip([*blobs, *children], found, strict=True):
            size = held.size if isinstance(held, Revision) else held
            if size is None:
                raise RegistryError(
                    "MANIFEST_BLOB_UNKNOWN",
                    f"{descriptor.digest} is not in repository {name}",
                    detail={"digest": str(descriptor.digest)},
                )
            if size != descriptor.size:
                raise RegistryError(
                    "MANIFEST_INVALID",
                    f"the descriptor of {descriptor.digest} gives size {descriptor.size},"
                    f" the content has {size}",
                    detail={"digest": str(descriptor.digest)},
                )

    async def delete_tag(self, repository: str, tag: str) -> None:
        await self._repositories.delete_tag(self._own(repository), tag)
