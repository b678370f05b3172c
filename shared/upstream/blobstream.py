"""A blob body from an upstream, read in chunks, with its place in the whole blob; and how the
answer to a blob GET (200 or 206, from an offset) becomes one."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import aiohttp

from shared.logging import get_logger
from shared.metrics import BYTES_FETCHED
from shared.upstream.failures import UpstreamFailure, transport_failure

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
        upstream: str,
        response: aiohttp.ClientResponse,
        *,
        offset: int,
        total_size: int | None,
        digest: str,
    ) -> None:
        self._upstream = upstream
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
            raise transport_failure(self._upstream, exc, f"reading blob {self.digest}") from exc
        if data:
            BYTES_FETCHED.labels(self._upstream).inc(len(data))
        return data

    def _cut(self, message: str) -> UpstreamFailure:
        return UpstreamFailure("network", message, upstream=self._upstream, status=self.status)

    async def _skip(self, count: int) -> None:
        left = count
        while left > 0:
            data = await self._raw_read(min(left, BLOB_CHUNK))
            if not data:
                raise self._cut(f"blob {self.digest} ended before offset {count}")
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
                raise self._cut(f"blob {self.digest} body is longer than its size {self.total_size}")
            return data
        self._eof = True
        expected = self.expected
        if expected is not None and self.bytes_read != expected:
            raise self._cut(
                f"blob {self.digest} body ended after {self.offset + self.bytes_read} "
                f"of {self.total_size} bytes"
            )
        return b""

    async def iter_chunks(self, limit: int = BLOB_CHUNK) -> AsyncIterator[bytes]:
        """The body as it arrives, in chunks of at most `limit` bytes: nothing waits for a
        buffer to fill, so the first bytes move on as soon as the upstream sends them."""
        if limit <= 0:
            raise ValueError("chunk size must be positive")
        while data := await self.read(limit):
            yield data


async def open_body(
    upstream: str, response: aiohttp.ClientResponse, *, offset: int, digest: str, what: str
) -> BlobStream:
    """The stream of a blob GET's 200 or 206 answer, from `offset`.

    A 206 must start at `offset`. A 200 to a ranged request means the upstream ignored
    Range: its first `offset` bytes are skipped so callers always get the body from where
    they asked. The caller still owns `response` (and closes it if this raises).
    """
    length = response.content_length
    if response.status == 206:
        content_range = CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
        if content_range is None:
            raise UpstreamFailure(
                "status", f"{what}: 206 without a usable Content-Range", upstream=upstream, status=206
            )
        start, _end, total = content_range.groups()
        if int(start) != offset:
            raise UpstreamFailure(
                "status",
                f"{what}: asked for bytes from {offset}, got from {start}",
                upstream=upstream,
                status=206,
            )
        total_size = int(total) if total != "*" else None
        if total_size is None and length is not None:
            total_size = offset + length
        return BlobStream(upstream, response, offset=offset, total_size=total_size, digest=digest)
    stream = BlobStream(upstream, response, offset=offset, total_size=length, digest=digest)
    if offset > 0:
        if length is not None and offset > length:
            raise UpstreamFailure(
                "status",
                f"{what}: offset {offset} beyond the blob's {length} bytes",
                upstream=upstream,
                status=200,
            )
        log.debug("upstream_range_ignored", upstream=upstream, digest=digest, offset=offset)
        await stream._skip(offset)
    return stream
