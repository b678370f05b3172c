"""A blob body from an upstream, read in chunks, with its place in the whole blob."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import aiohttp

from shared.logging import get_logger
from shared.metrics import BYTES_FETCHED

if TYPE_CHECKING:  # the client creates streams; a runtime import would be circular
    from shared.upstream.client import UpstreamClient

log = get_logger(__name__)
BLOB_CHUNK = 1024 * 1024


CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


class BlobStream:
    """The body of a blob GET, from `offset` on.

    `offset` always equals the offset asked for: when the upstream ignores Range and
    answers 200 with the whole blob, the first `offset` bytes are read and discarded before
    the stream is handed out. `total_size` is the full blob's size (Content-Range's total,
    or the 200's Content-Length), None if the upstream did not say. A body that ends before
    `total_size` raises UpstreamFailure(kind="network").
    """

    def __init__(
        self,
        client: UpstreamClient,
        response: aiohttp.ClientResponse,
        *,
        offset: int,
        total_size: int | None,
        digest: str,
    ) -> None:
        self._client = client
        self._response = response
        self.offset = offset
        self.total_size = total_size
        self.digest = digest
        self.media_type: str | None = response.content_type if response.content_type else None
        self.status = response.status
        self.bytes_read = 0  # body bytes handed to the caller (after `offset`)
        self._eof = False

    @property
    def complete(self) -> bool:
        return self._eof

    @property
    def expected(self) -> int | None:
        """Bytes still to come in this body in total (from `offset`), if known."""
        return None if self.total_size is None else self.total_size - self.offset

    async def _raw_read(self, n: int) -> bytes:
        try:
            data = await self._response.content.read(n)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise self._client._transport_failure(exc, f"reading blob {self.digest}") from exc
        if data:
            BYTES_FETCHED.labels(self._client.name).inc(len(data))
        return data

    async def _skip(self, count: int) -> None:
        left = count
        while left > 0:
            data = await self._raw_read(min(left, BLOB_CHUNK))
            if not data:
                raise self._client._failure(
                    "network",
                    f"blob {self.digest} ended before offset {count}",
                    status=self.status,
                )
            left -= len(data)

    async def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes (all that is left if n < 0); b"" at the end of the body."""
        if self._eof:
            return b""
        if n < 0:
            parts = []
            while chunk := await self.read(BLOB_CHUNK):
                parts.append(chunk)
            return b"".join(parts)
        if n == 0:
            return b""
        data = await self._raw_read(n)
        if data:
            self.bytes_read += len(data)
            expected = self.expected
            if expected is not None and self.bytes_read > expected:
                raise self._client._failure(
                    "network",
                    f"blob {self.digest} body is longer than its size {self.total_size}",
                    status=self.status,
                )
            return data
        self._eof = True
        expected = self.expected
        if expected is not None and self.bytes_read != expected:
            raise self._client._failure(
                "network",
                f"blob {self.digest} body ended after {self.offset + self.bytes_read} "
                f"of {self.total_size} bytes",
                status=self.status,
            )
        return b""

    async def iter_chunks(self, limit: int = BLOB_CHUNK) -> AsyncIterator[bytes]:
        """The body as it arrives, in chunks of at most `limit` bytes: nothing waits for a
        buffer to fill, so the first bytes move on as soon as the upstream sends them."""
        if limit <= 0:
            raise ValueError("chunk size must be positive")
        while data := await self.read(limit):
            yield data
