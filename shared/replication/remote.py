"""A remote registry (an upstream: Docker Hub, Distribution, another Seawall) as a replication
source or destination, over its UpstreamClient.

Every request goes through the client's transport, so through the upstream's governor:
listings and HEADs use its request rate, manifest GETs spend its quota at the priority the
caller set (`shared.ratelimit.background()` for replication). Nothing here sets it.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from shared.oci.digest import Digest
from shared.replication.transfer import ListingUnsupported, Manifest, Missing, OpenSource
from shared.upstream import UpstreamClient, UpstreamFailure

# Where each destination was seen to hold a blob (digest -> repository), for mounts: per
# client, so every task a worker process runs against that registry shares what it saw
# (the endpoints themselves are built per task). Bounded, and gone with the client.
KNOWN_LOCATIONS = 10_000
_locations: weakref.WeakKeyDictionary[UpstreamClient, OrderedDict[str, str]] = weakref.WeakKeyDictionary()


class RemoteRegistry:
    """Both ends of replication over one upstream client; repository names are the
    registry's own (`library/python`)."""

    def __init__(self, client: UpstreamClient) -> None:
        self.client = client
        self.name = client.name
        self._located = _locations.setdefault(client, OrderedDict())

    # -- as a source -----------------------------------------------------------------
    async def repositories(self) -> AsyncIterator[str]:
        """The catalog; ListingUnsupported when the registry has none or refuses it."""
        try:
            async for repository in self.client.catalog():
                yield repository
        except UpstreamFailure as failure:
            if failure.kind == "unsupported":
                raise ListingUnsupported(f"{self.name} does not list its repositories") from failure
            raise

    async def tags(self, repository: str) -> AsyncIterator[str]:
        """Every tag of `repository` (none when the registry does not know it)."""
        try:
            async for tag in self.client.list_tags(repository):
                yield tag
        except UpstreamFailure as failure:
            if failure.kind != "not_found":
                raise

    async def manifest_digest(self, repository: str, reference: str) -> str | None:
        """The manifest's digest by HEAD (free on Docker Hub); None when it is not there."""
        head = await self.client.head_manifest(repository, reference)
        if head is None:
            return None
        if head.digest:
            return head.digest
        if Digest.is_digest(reference):
            return reference
        # A registry that leaves Docker-Content-Digest out of HEAD: the body tells.
        return (await self.manifest(repository, reference)).digest

    async def manifest(self, repository: str, reference: str) -> Manifest:
        """The manifest's exact bytes (one pull on Docker Hub), verified by the client."""
        fetched = await self.client.get_manifest(repository, reference)
        if fetched is None:
            raise Missing(f"{self.name} has no manifest {repository}:{reference}")
        return Manifest(fetched.body, fetched.media_type, fetched.digest)

    @asynccontextmanager
    async def open_blob(
        self, repository: str, digest: str, offset: int = 0
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """The blob from `offset` (a Range request when past 0)."""
        try:
            async with self.client.open_blob(repository, digest, offset=offset) as stream:
                yield stream.iter_chunks()
        except UpstreamFailure as failure:
            if failure.kind == "not_found":
                raise Missing(f"{self.name} has no blob {digest} in {repository}") from failure
            raise

    async def blob_size(self, repository: str, digest: str) -> int | None:
        return await self.client.head_blob(repository, digest)

    async def referrers(self, repository: str, digest: str) -> list[dict[str, Any]]:
        """The referrers API's descriptors ([] when the registry does not offer the API)."""
        return await self.client.referrers(repository, digest)

    # -- as a destination ------------------------------------------------------------
    def _saw(self, repository: str, digest: str) -> None:
        self._located[digest] = repository
        self._located.move_to_end(digest)
        if len(self._located) > KNOWN_LOCATIONS:
            self._located.popitem(last=False)

    async def has_blob(self, repository: str, digest: str) -> bool:
        present = await self.client.head_blob(repository, digest) is not None
        if present:
            self._saw(repository, digest)
        return present

    async def mount(self, repository: str, digest: str, from_repository: str | None = None) -> bool:
        """Link a blob another repository of the registry holds (no bytes move).

        Without `from_repository`, the repository this process last saw holding the blob
        at this registry is asked; False when there is none or the registry does not mount.
        """
        origin = from_repository or self._located.get(digest)
        if origin is None or origin == repository:
            return False
        if not await self.client.mount_blob(repository, digest, origin):
            return False
        self._saw(repository, digest)
        return True

    async def put_blob(
        self, repository: str, digest: str, size: int, open_source: OpenSource, bandwidth: int | None
    ) -> int:
        """Upload in chunks, resuming the session when the link breaks; the bytes sent."""
        sent = await self.client.push_blob(repository, digest, size, open_source, bandwidth=bandwidth)
        self._saw(repository, digest)
        return sent

    async def put_manifest(self, repository: str, reference: str, body: bytes, media_type: str) -> str:
        return await self.client.put_manifest(repository, reference, body, media_type)

    async def delete_tag(self, repository: str, tag: str) -> None:
        await self.client.delete_manifest(repository, tag)
