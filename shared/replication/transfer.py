"""What passes between a replication source and destination: a manifest as fetched, the
errors both sides raise, and a blob read that resumes where a broken stream stopped, paced
to a rule's bandwidth."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from shared.registry.storage import StorageUnavailable
from shared.upstream import UpstreamFailure

# `open_source(offset)`: the blob's bytes from `offset` on, as an async context manager.
OpenSource = Callable[[int], AbstractAsyncContextManager[AsyncIterator[bytes]]]

# A stream that breaks is reopened from where it stopped at most this many times in a row
# without progress (a reopen that delivers bytes starts the count again).
REOPEN_ATTEMPTS = 4
REOPEN_DELAY_SECONDS = 0.25
# Failures of a read that a reopen may cure; anything else (a 404, a 401) will not.
TRANSIENT_KINDS = frozenset({"network", "timeout", "refused"})


@dataclass(frozen=True, slots=True)
class Manifest:
    """A manifest exactly as the source holds it: the bytes are never re-serialised, so
    the digest at the destination is the digest at the source."""

    body: bytes
    media_type: str
    digest: str


class Missing(LookupError):
    """The endpoint does not have what was asked for (a tag deleted since the run was
    planned, a blob a cache never fetched): trying again will not help."""


class ListingUnsupported(Exception):
    """The source cannot list its repositories (Docker Hub has no catalog)."""


def transient(exc: BaseException) -> bool:
    """Whether reading again (from where the read stopped) may succeed."""
    if isinstance(exc, UpstreamFailure):
        return exc.kind in TRANSIENT_KINDS
    return isinstance(exc, StorageUnavailable | ConnectionError | TimeoutError)


class Pacer:
    """Holds a transfer to `bandwidth` bytes per second on average (None: no cap)."""

    def __init__(self, bandwidth: int | None) -> None:
        self._bandwidth = bandwidth
        self._started = time.monotonic()
        self._sent = 0

    async def passed(self, count: int) -> None:
        if not self._bandwidth:
            return
        self._sent += count
        ahead = self._sent / self._bandwidth - (time.monotonic() - self._started)
        if ahead > 0:
            await asyncio.sleep(ahead)


class ResumingReader:
    """`read(n)` over a blob opened with `open_source`, never more than `n` bytes at once.

    When the stream breaks (the network, a timeout, storage trouble) it is reopened at the
    offset reached, as fills resume with Range, so bytes already read are not fetched
    again. `bytes_read` counts what came in, resends included. `await close()` at the end.
    """

    def __init__(self, open_source: OpenSource, *, bandwidth: int | None = None) -> None:
        self._open_source = open_source
        self._pacer = Pacer(bandwidth)
        self._stack: contextlib.AsyncExitStack | None = None
        self._chunks: AsyncIterator[bytes] | None = None
        self._pending = b""
        self.offset = 0  # bytes handed out so far
        self.bytes_read = 0
        self.reopened = 0

    async def _open(self) -> AsyncIterator[bytes]:
        if self._chunks is None:
            stack = contextlib.AsyncExitStack()
            try:
                self._chunks = await stack.enter_async_context(self._open_source(self.offset))
            except BaseException:
                await stack.aclose()
                raise
            self._stack = stack
        return self._chunks

    async def _drop_stream(self) -> None:
        stack, self._stack, self._chunks = self._stack, None, None
        if stack is not None:
            with contextlib.suppress(Exception):
                await stack.aclose()

    async def close(self) -> None:
        self._pending = b""
        await self._drop_stream()

    async def _next_chunk(self) -> bytes:
        failures = 0
        while True:
            try:
                chunks = await self._open()
                chunk = await anext(chunks, b"")
            except Exception as exc:
                await self._drop_stream()
                failures += 1
                if not transient(exc) or failures >= REOPEN_ATTEMPTS:
                    raise
                self.reopened += 1
                await asyncio.sleep(REOPEN_DELAY_SECONDS * failures)
                continue
            if chunk:
                self.bytes_read += len(chunk)
                await self._pacer.passed(len(chunk))
            return chunk

    async def read(self, n: int) -> bytes:
        """Up to `n` bytes (at least one unless the blob is over); b"" at its end."""
        if not self._pending:
            self._pending = await self._next_chunk()
            if not self._pending:
                return b""
        out, self._pending = self._pending[:n], self._pending[n:]
        self.offset += len(out)
        return out
