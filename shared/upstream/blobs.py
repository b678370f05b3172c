"""Blobs from one upstream: HEAD for the size, GET streamed from an offset (free on Docker Hub)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from shared.upstream.auth import UpstreamAuth, pull_scope
from shared.upstream.blobstream import BlobStream, open_body
from shared.upstream.failures import UpstreamFailure
from shared.upstream.transport import Transport


class Blobs:
    """The blobs of one upstream."""

    def __init__(self, transport: Transport, auth: UpstreamAuth) -> None:
        self._transport = transport
        self._auth = auth
        self._name = transport.name

    async def head(self, repository: str, digest: str) -> int | None:
        """The size of a blob the upstream serves in `repository`, None on 404 (free on
        Docker Hub: no pull is counted). Bounded by the upstream's head_timeout."""
        what = f"HEAD blob {repository}@{digest}"
        limit = self._transport.head_timeout
        try:
            async with asyncio.timeout(limit):
                response = await self._auth.send(
                    "HEAD",
                    self._transport.url(repository, "blobs", digest),
                    kind="blob",
                    scope=pull_scope(repository),
                    headers={"Accept": "*/*"},
                )
                try:
                    if response.status == 404:
                        return None
                    if response.status != 200:
                        await self._transport.raise_for_status(response, what)
                    length = response.headers.get("Content-Length", "")
                    return int(length) if length.isascii() and length.isdigit() else 0
                finally:
                    response.release()
        except TimeoutError as exc:
            raise UpstreamFailure(
                "timeout", f"{what}: no answer within {limit:g} s", upstream=self._name
            ) from exc

    @asynccontextmanager
    async def open(self, repository: str, digest: str, *, offset: int = 0) -> AsyncIterator[BlobStream]:
        """Stream a blob from `offset` (with `Range: bytes=<offset>-` when offset > 0).

        Redirects are followed (Authorization dropped across origins). A 404 raises
        UpstreamFailure(kind="not_found"). The connection goes back to the pool only if
        the body was read to the end; otherwise it is closed on exit.
        """
        if offset < 0:
            raise ValueError("offset must not be negative")
        what = f"GET blob {repository}@{digest}"
        headers = {"Accept": "*/*"}
        if offset > 0:
            headers["Range"] = f"bytes={offset}-"
        response = await self._auth.send(
            "GET",
            self._transport.url(repository, "blobs", digest),
            kind="blob",
            scope=pull_scope(repository),
            headers=headers,
        )
        stream: BlobStream | None = None
        try:
            if response.status == 404:
                raise UpstreamFailure("not_found", f"{what}: blob unknown", upstream=self._name, status=404)
            if response.status not in (200, 206):
                await self._transport.raise_for_status(response, what)
            stream = await open_body(self._name, response, offset=offset, digest=digest, what=what)
            yield stream
        finally:
            if stream is not None and stream.complete:
                response.release()
            else:
                response.close()
