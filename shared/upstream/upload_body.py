"""The body of an upload request: the next bytes of a blob's source, cut to the request's
length, paced to a bandwidth cap and counted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

# `open_source(offset)`: the blob's bytes from `offset` on.
OpenSource = Callable[[int], AbstractAsyncContextManager[AsyncIterator[bytes]]]
# Request bodies are handed to the connection in pieces this large (smaller under a
# bandwidth cap, so the pace stays even).
PIECE = 256 * 1024
MIN_PIECE = 16 * 1024


class Meter:
    """Bytes handed to the connection, paced to at most `bandwidth` bytes per second."""

    def __init__(self, bandwidth: int | None) -> None:
        if bandwidth is not None and bandwidth <= 0:
            raise ValueError("bandwidth must be positive")
        self.sent = 0
        self.rate = bandwidth
        self._started = time.monotonic()
        self.piece = PIECE if bandwidth is None else max(MIN_PIECE, min(PIECE, bandwidth // 8))

    async def spend(self, count: int) -> None:
        self.sent += count
        if self.rate is not None:
            ahead = self.sent / self.rate - (time.monotonic() - self._started)
            if ahead > 0:
                await asyncio.sleep(ahead)


class SourceReader:
    """The source's chunks, cut again to the sizes the requests take."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = b""

    async def read(self, limit: int) -> bytes:
        while not self._pending:
            try:
                self._pending = bytes(await anext(self._chunks))
            except StopAsyncIteration:
                return b""
        data, self._pending = self._pending[:limit], self._pending[limit:]
        return data


class ChunkBody:
    """One request's body: the next `length` bytes of the source, paced and counted.

    aiohttp turns anything the body raises into a connection error; the source's own
    failure is kept in `error`, so that it is raised as itself, not taken for the link's.
    """

    def __init__(self, reader: SourceReader, length: int, meter: Meter, what: str) -> None:
        self._reader = reader
        self._left = length
        self._meter = meter
        self._what = what
        self.error: Exception | None = None

    def __aiter__(self) -> ChunkBody:
        return self

    async def __anext__(self) -> bytes:
        if self._left <= 0:
            raise StopAsyncIteration
        try:
            data = await self._reader.read(min(self._meter.piece, self._left))
            if not data:
                raise ValueError(f"{self._what}: the source ended {self._left} bytes early")
        except Exception as exc:
            self.error = exc
            raise
        self._left -= len(data)
        await self._meter.spend(len(data))
        return data
