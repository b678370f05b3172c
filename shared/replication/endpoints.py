"""The two ends of a replication rule: what a source must offer and a destination accept,
and the ends a rule names (`endpoints_for`).

A remote registry (`RemoteRegistry`, over an upstream client) and a local project
(`LocalProject`, over the bucket's stores) are each both: a pull rule copies from a remote
registry into a hosted project, a push rule from a local project to a remote registry.
Repository names are full names at that end (`library/python` on Docker Hub,
`mirror/python` in project `mirror`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from shared.proxy.upstreams import UpstreamPool
from shared.registry.blobs import BlobStore
from shared.registry.repositories import RepositoryStore
from shared.registry.storage import ObjectStore
from shared.replication.local import LocalProject
from shared.replication.remote import RemoteRegistry
from shared.replication.rules import ReplicationRule
from shared.replication.transfer import ListingUnsupported, Manifest, Missing, OpenSource
from shared.settings import Settings

__all__ = [
    "Destination",
    "ListingUnsupported",
    "LocalProject",
    "Manifest",
    "Missing",
    "OpenSource",
    "RemoteRegistry",
    "Source",
    "endpoints_for",
]


class Source(Protocol):
    """Where a rule copies from. `manifest` and `open_blob` raise `Missing` for what is not
    there; `repositories` raises `ListingUnsupported` when the source has no catalog."""

    name: str

    def repositories(self) -> AsyncIterator[str]: ...

    def tags(self, repository: str) -> AsyncIterator[str]: ...

    async def manifest_digest(self, repository: str, reference: str) -> str | None:
        """The digest a tag points at, without fetching the manifest (a HEAD: no quota)."""
        ...

    async def manifest(self, repository: str, reference: str) -> Manifest: ...

    def open_blob(
        self, repository: str, digest: str, offset: int = 0
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]: ...

    async def blob_size(self, repository: str, digest: str) -> int | None: ...

    async def referrers(self, repository: str, digest: str) -> list[dict[str, Any]]: ...


class Destination(Protocol):
    """Where a rule copies to."""

    name: str

    async def manifest_digest(self, repository: str, reference: str) -> str | None: ...

    async def has_blob(self, repository: str, digest: str) -> bool: ...

    async def mount(self, repository: str, digest: str, from_repository: str | None = None) -> bool:
        """Link a blob another repository of the destination holds (`from_repository`, or
        one the destination knows of); False when it cannot, and the bytes must travel."""
        ...

    async def put_blob(
        self, repository: str, digest: str, size: int, open_source: OpenSource, bandwidth: int | None
    ) -> int:
        """Store the blob read from `open_source(offset)`; returns the bytes that moved."""
        ...

    async def put_manifest(self, repository: str, reference: str, body: bytes, media_type: str) -> str: ...

    async def delete_tag(self, repository: str, tag: str) -> None: ...

    def tags(self, repository: str) -> AsyncIterator[str]: ...


async def endpoints_for(
    rule: ReplicationRule,
    settings: Settings,
    *,
    blobs: BlobStore,
    repositories: RepositoryStore,
    objects: ObjectStore,
    upstreams: UpstreamPool,
) -> tuple[Source, Destination]:
    """The source and destination `rule` names: an upstream and a local project, in the
    order its mode gives (settings validation has checked that both exist)."""

    def local(name: str) -> LocalProject:
        project = settings.project(name)
        if project is None:
            raise ValueError(f"replication rule {rule.name!r} names unknown project {name!r}")
        return LocalProject(project, blobs, repositories, objects)

    if rule.mode == "pull":
        return RemoteRegistry(await upstreams.client(rule.source)), local(rule.destination)
    return local(rule.source), RemoteRegistry(await upstreams.client(rule.destination))
