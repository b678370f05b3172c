"""A blob GET sent before the caller knows it needs it, to overlap the upstream's round trip
with the caller's own lookups."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from types import TracebackType

from shared.upstream.blobstream import BlobStream
from shared.upstream.client import UpstreamClient


class EarlyBlob:
    """`async with EarlyBlob(...) as early`: the GET of the whole blob is on its way at once;
    `early.open(offset)` then hands over that response when offset is 0, or drops it and
    asks again from `offset`. Leaving the block closes whatever is still open.

    A fill checks the bucket (is the blob stored, what did an interrupted fill stage) before
    it knows where to start; nearly always it starts at byte 0, and the upstream's answer
    is then already there. A failure of the early GET is raised by `open(0)`, as a plain
    open would raise it, and is dropped when the caller asks from another offset.
    """

    def __init__(self, upstream: UpstreamClient, repository: str, digest: str) -> None:
        self._upstream = upstream
        self._repository = repository
        self._digest = digest
        self._exits = contextlib.AsyncExitStack()
        self._early: asyncio.Task[BlobStream] | None = None

    async def __aenter__(self) -> EarlyBlob:
        body = self._upstream.open_blob(self._repository, self._digest)
        self._early = asyncio.create_task(self._exits.enter_async_context(body))
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._drop_early()

    async def _drop_early(self) -> None:
        early, self._early = self._early, None
        if early is not None:
            early.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await early
        await self._exits.aclose()

    @contextlib.asynccontextmanager
    async def open(self, offset: int = 0) -> AsyncIterator[BlobStream]:
        """The blob from `offset`; used once."""
        early, self._early = self._early, None
        if early is not None and offset == 0:
            try:
                yield await early
            finally:
                await self._exits.aclose()
            return
        self._early = early
        await self._drop_early()
        async with self._upstream.open_blob(self._repository, self._digest, offset=offset) as stream:
            yield stream
