"""Manifests from one upstream: HEAD (free on Docker Hub) and GET (one pull), the body verified
against its digests and its media type sniffed when the upstream does not say."""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass

import aiohttp

from shared.metrics import DIGEST_MISMATCHES
from shared.oci.mediatypes import ACCEPT
from shared.upstream.auth import UpstreamAuth, pull_scope
from shared.upstream.failures import UpstreamFailure
from shared.upstream.headers import RateLimit
from shared.upstream.transport import Transport

# A manifest larger than this is refused (the edge's own limit is usually lower).
MAX_MANIFEST_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class ManifestHead:
    digest: str | None
    media_type: str | None
    size: int | None
    rate_limit: RateLimit | None


@dataclass(frozen=True)
class FetchedManifest:
    body: bytes
    media_type: str
    digest: str  # Docker-Content-Digest if sent (and verified), else sha256 of the body
    rate_limit: RateLimit | None


class Manifests:
    """The manifests of one upstream."""

    def __init__(self, transport: Transport, auth: UpstreamAuth) -> None:
        self._transport = transport
        self._auth = auth
        self._name = transport.name
        self._log = transport.log

    async def _request(self, method: str, repository: str, reference: str) -> aiohttp.ClientResponse:
        return await self._auth.send(
            method,
            self._transport.url(repository, "manifests", reference),
            kind="manifest",
            scope=pull_scope(repository),
            headers={"Accept": ACCEPT},
        )

    async def head(
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
        limit = self._transport.head_timeout if timeout is None else timeout
        what = f"HEAD manifest {repository}:{reference}"
        try:
            async with asyncio.timeout(limit):
                response = await self._request("HEAD", repository, reference)
                try:
                    rate_limit = await self._transport.report_rate_limit(response)
                    if response.status == 404:
                        return None
                    if response.status != 200:
                        await self._transport.raise_for_status(response, what, rate_limit)
                    length = response.headers.get("Content-Length")
                    has_type = bool(response.headers.get("Content-Type"))
                    return ManifestHead(
                        digest=response.headers.get("Docker-Content-Digest"),
                        media_type=response.content_type if has_type else None,
                        size=int(length) if length and length.isdigit() else None,
                        rate_limit=rate_limit,
                    )
                finally:
                    response.release()
        except TimeoutError as exc:
            self._log.info("upstream_head_timeout", repository=repository, timeout=limit)
            raise UpstreamFailure(
                "timeout", f"{what}: no answer within {limit:g} s", upstream=self._name
            ) from exc

    async def get(
        self, repository: str, reference: str, *, max_bytes: int = MAX_MANIFEST_BYTES
    ) -> FetchedManifest | None:
        """The manifest's exact bytes (spends one pull on Docker Hub); None on 404.

        The body is verified: against the reference when it is a digest, and against
        Docker-Content-Digest when the upstream sends one.
        """
        what = f"GET manifest {repository}:{reference}"
        response = await self._request("GET", repository, reference)
        try:
            rate_limit = await self._transport.report_rate_limit(response)
            if response.status == 404:
                await self._transport.discard(response)
                return None
            if response.status != 200:
                await self._transport.raise_for_status(response, what, rate_limit)
            length = response.content_length
            if length is not None and length > max_bytes:
                raise self._bad_body(f"{what}: manifest of {length} bytes exceeds {max_bytes}")
            body = await self._transport.read_limited(response, max_bytes + 1, what)
            if len(body) > max_bytes:
                raise self._bad_body(f"{what}: manifest exceeds {max_bytes} bytes")
            if length is not None and len(body) != length:
                raise UpstreamFailure(
                    "network",
                    f"{what}: body ended after {len(body)} of {length} bytes",
                    upstream=self._name,
                    status=200,
                )
            header_digest = response.headers.get("Docker-Content-Digest")
            media_type = response.content_type if response.headers.get("Content-Type") else ""
        finally:
            response.release()
        digest = self._verify(what, body, header_digest, reference)
        if not media_type or media_type == "application/octet-stream":
            media_type = sniff_media_type(body) or media_type or "application/octet-stream"
        return FetchedManifest(body=body, media_type=media_type, digest=digest, rate_limit=rate_limit)

    def _bad_body(self, message: str) -> UpstreamFailure:
        """A 200 whose body cannot be the manifest asked for."""
        return UpstreamFailure("status", message, upstream=self._name, status=200)

    def _verify(self, what: str, body: bytes, header_digest: str | None, reference: str) -> str:
        computed: dict[str, str] = {}

        def digest_with(algorithm: str) -> str | None:
            if algorithm not in ("sha256", "sha512"):
                return None
            if algorithm not in computed:
                computed[algorithm] = f"{algorithm}:{hashlib.new(algorithm, body).hexdigest()}"
            return computed[algorithm]

        for claimed, source in ((reference, "reference"), (header_digest, "Docker-Content-Digest")):
            if not claimed or ":" not in claimed:
                continue
            actual = digest_with(claimed.split(":", 1)[0])
            if actual is not None and actual != claimed:
                DIGEST_MISMATCHES.labels("upstream").inc()
                self._log.warning("upstream_digest_mismatch", what=what, source=source)
                raise self._bad_body(f"{what}: body does not match its {source} {claimed}")
        if header_digest:
            return header_digest
        if ":" in reference and digest_with(reference.split(":", 1)[0]):
            return reference
        return digest_with("sha256") or ""


def sniff_media_type(body: bytes) -> str | None:
    """The `mediaType` a manifest names in its body, if any."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    media_type = document.get("mediaType") if isinstance(document, dict) else None
    return media_type if isinstance(media_type, str) else None
