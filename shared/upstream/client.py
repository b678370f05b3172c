"""The client of one upstream registry: manifests and blobs over one session, with its auth."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager

from shared.auth.upstream_tokens import SharedTokens
from shared.ratelimit import Governor
from shared.settings import Upstream
from shared.upstream.auth import UpstreamAuth
from shared.upstream.blobs import Blobs
from shared.upstream.blobstream import BlobStream
from shared.upstream.manifests import MAX_MANIFEST_BYTES, FetchedManifest, ManifestHead, Manifests
from shared.upstream.transport import Transport


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
