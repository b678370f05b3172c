"""The client of one upstream registry: manifests and blobs over one session, with its auth;
and what replication needs besides: listings, referrers, pushes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

from shared.auth.upstream_tokens import SharedTokens
from shared.ratelimit import Governor
from shared.settings import Upstream
from shared.upstream.auth import UpstreamAuth
from shared.upstream.blobs import Blobs
from shared.upstream.blobstream import BlobStream
from shared.upstream.listing import Listings
from shared.upstream.manifests import MAX_MANIFEST_BYTES, FetchedManifest, ManifestHead, Manifests
from shared.upstream.push import DEFAULT_CHUNK, Pushes
from shared.upstream.transport import Transport
from shared.upstream.upload_body import OpenSource


class UpstreamClient:
    """The client of one upstream registry. `await start()` before use, `await close()` after
    (or `async with UpstreamClient(...) as client`).

    With a `governor`, every request is admitted by it first and it learns from every quota
    header and 429; with `shared_tokens`, Bearer tokens are shared with other processes.
    """

    def __init__(
        self,
        upstream: Upstream,
        *,
        governor: Governor | None = None,
        shared_tokens: SharedTokens | None = None,
    ) -> None:
        self.upstream = upstream
        self.name = upstream.name
        self.base_url = upstream.url.rstrip("/")
        self._transport = Transport(upstream, governor)
        auth = UpstreamAuth(upstream, self._transport, shared_tokens)
        self._manifests = Manifests(self._transport, auth)
        self._blobs = Blobs(self._transport, auth)
        self._listings = Listings(self._transport, auth)
        self._pushes = Pushes(self._transport, auth)

    async def start(self) -> None:
        await self._transport.start()

    async def close(self) -> None:
        await self._transport.close()

    async def __aenter__(self) -> UpstreamClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def head_manifest(
        self,
        repository: str,
        reference: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - bounds the auth dance too
    ) -> ManifestHead | None:
        """Digest, media type and size of a manifest without spending quota; None on 404.

        The whole operation (auth included) is bounded by `timeout`, by default the
        upstream's head_timeout.
        """
        return await self._manifests.head(repository, reference, timeout=timeout)

    async def get_manifest(
        self, repository: str, reference: str, *, max_bytes: int = MAX_MANIFEST_BYTES
    ) -> FetchedManifest | None:
        """The manifest's exact bytes (spends one pull on Docker Hub); None on 404.

        The body is verified: against the reference when it is a digest, and against
        Docker-Content-Digest when the upstream sends one.
        """
        return await self._manifests.get(repository, reference, max_bytes=max_bytes)

    async def head_blob(self, repository: str, digest: str) -> int | None:
        """The size of a blob the upstream serves in `repository`, None on 404 (free on
        Docker Hub: no pull is counted). Bounded by the upstream's head_timeout."""
        return await self._blobs.head(repository, digest)

    def open_blob(
        self, repository: str, digest: str, *, offset: int = 0
    ) -> AbstractAsyncContextManager[BlobStream]:
        """`async with client.open_blob(...) as stream`: a blob from `offset` (with
        `Range: bytes=<offset>-` when offset > 0).

        Redirects are followed (Authorization dropped across origins). A 404 raises
        UpstreamFailure(kind="not_found"). The connection goes back to the pool only if
        the body was read to the end; otherwise it is closed on exit.
        """
        return self._blobs.open(repository, digest, offset=offset)

    # ------------------------------------------------------------ listings
    def list_tags(self, repository: str, page_size: int = 100) -> AsyncIterator[str]:
        """Every tag of `repository`, `page_size` per request (following the Link header);
        UpstreamFailure(kind="not_found") when the upstream answers 404. Free on Docker
        Hub; each page waits for the governor's request rate when it is spent."""
        return self._listings.tags(repository, page_size)

    def catalog(self, page_size: int = 100) -> AsyncIterator[str]:
        """Every repository of the upstream's catalog, `page_size` per request.

        Raises UpstreamFailure(kind="unsupported") when the registry has no catalog or
        denies it (Docker Hub).
        """
        return self._listings.catalog(page_size)

    async def referrers(self, repository: str, digest: str) -> list[dict[str, Any]]:
        """The descriptors of the referrers API's index for `digest`; [] when the registry
        answers 404 (it has no referrers API)."""
        return await self._listings.referrers(repository, digest)

    # -------------------------------------------------------------- pushes
    async def mount_blob(self, repository: str, digest: str, from_repository: str) -> bool:
        """Mount a blob from another repository of this registry: True on 201; False when
        the registry opened an upload instead (cancelled) or cannot mount."""
        return await self._pushes.mount_blob(repository, digest, from_repository)

    async def push_blob(
        self,
        repository: str,
        digest: str,
        size: int,
        open_source: OpenSource,
        *,
        chunk_size: int = DEFAULT_CHUNK,
        bandwidth: int | None = None,
    ) -> int:
        """Upload a blob in chunks from `open_source(offset)`; the bytes actually sent.

        When the link breaks, the upload goes on from the offset the registry reports for
        its session (a new session only when the registry dropped it); bounded retries,
        then UpstreamFailure. `bandwidth` caps the bytes per second.
        """
        return await self._pushes.push_blob(
            repository, digest, size, open_source, chunk_size=chunk_size, bandwidth=bandwidth
        )

    async def put_manifest(self, repository: str, reference: str, body: bytes, media_type: str) -> str:
        """Store a manifest's exact bytes under `reference`; the digest the registry names."""
        return await self._pushes.put_manifest(repository, reference, body, media_type)

    async def delete_manifest(self, repository: str, reference: str) -> bool:
        """Delete a manifest (by digest, or by tag where the registry allows it); False on 404."""
        return await self._pushes.delete_manifest(repository, reference)
