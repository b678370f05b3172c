"""Object storage through the minio SDK: the only module that talks S3 or imports `minio`.

The SDK is synchronous (urllib3), so every call runs on a dedicated thread pool sized for
the edge's concurrency; the default asyncio executor has only a handful of threads.
Vendor errors are translated here: a missing key is `ObjectMissing`, anything else the
store could not do is `StorageUnavailable`.

A stalled store must cost a client seconds, not minutes. Every connection attempt is
bounded by `s3.connect_timeout` and every socket read by `s3.read_timeout`; a read that
timed out is never retried (it would only repeat the stall). Metadata calls (stat, whole
reads of small objects, small writes, deletes, listings) go through a second client whose
reads wait at most `s3.request_timeout`, and each such call as a whole (queueing for a
thread and retries included) gets the same deadline: past it, StorageUnavailable, which
clients see as 503 UNAVAILABLE. Transfers (streamed reads, multipart parts, large writes)
have no overall deadline, only the socket bounds, so a long one on a healthy store runs
to its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import io
import itertools
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, TypeVar

import urllib3
from minio import Minio
from minio.commonconfig import CopySource
from minio.datatypes import Part
from minio.deleteobjects import DeleteObject
from minio.error import S3Error

from shared.metrics import STORAGE_REQUESTS
from shared.settings import S3Settings

T = TypeVar("T")

READ_CHUNK = 1024 * 1024
READ_AHEAD = 2
# Multipart part size (S3's minimum is 5 MiB); at most PARALLEL_PARTS are in memory, 30 MiB
# per upload. Measured on the embedded SeaweedFS, five 40 MiB uploads one after another
# (what docker and skopeo do): 8 MiB parts three at a time wrote 94-98 MiB/s, 5 MiB parts
# six at a time 176 MiB/s.
PART_SIZE = 5 * 1024 * 1024
PARALLEL_PARTS = 6
_MISSING_CODES = {"NoSuchKey", "NoSuchObject", "NoSuchUpload", "ResourceNotFound"}
# Writes up to this size are metadata (links, tags, records, markers): bounded like reads.
SMALL_WRITE = 256 * 1024


def _retries() -> urllib3.Retry:
    """A refused connection or a 502-504 is tried again, quickly; a stalled read never is."""
    return urllib3.Retry(
        total=2,
        connect=1,
        read=0,
        other=0,
        status=2,
        backoff_factor=0.1,
        status_forcelist=[502, 503, 504],
    )


class Hasher(Protocol):
    """What `put_stream` feeds the bytes it stores to (a `hashlib` object)."""

    def update(self, data: bytes, /) -> None: ...


# Background work (garbage collection, eviction) sets this for its own calls: awaited before
# each request to the store, it holds that work to a request rate so that it never crowds
# out the clients' requests (asyncio tasks started within inherit it).
request_pace: contextvars.ContextVar[Callable[[], Awaitable[None]] | None] = contextvars.ContextVar(
    "request_pace", default=None
)


class ObjectMissing(LookupError):
    """The key does not exist in the bucket."""


class StorageUnavailable(RuntimeError):
    """The object store failed or could not be reached."""


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    metadata: dict[str, str]
    # Last-modified, epoch seconds (whole seconds on most stores); listings give it.
    modified: float = 0.0


def _user_metadata(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {
        k.lower().removeprefix("x-amz-meta-"): v for k, v in headers if k.lower().startswith("x-amz-meta-")
    }


async def _read_exactly(source: Callable[[int], Awaitable[bytes]], size: int) -> bytes:
    """Up to `size` bytes from the source; fewer only at its end.

    The pieces are joined once at the end: growing a buffer and copying it out again cost
    the edge a tenth of its CPU during a push.
    """
    pieces: list[bytes] = []
    left = size
    while left > 0:
        chunk = await source(left)
        if not chunk:
            break
        pieces.append(chunk)
        left -= len(chunk)
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


class ObjectStore:
    """Async facade over one bucket."""

    def __init__(self, settings: S3Settings, *, max_connections: int = 64) -> None:
        self.bucket = settings.bucket
        connect = settings.connect_timeout.total_seconds()
        read = settings.read_timeout.total_seconds()
        self.request_timeout = settings.request_timeout.total_seconds()
        # Transfers: streamed reads, multipart parts, large writes.
        self._client = self._minio(settings, max_connections, urllib3.Timeout(connect=connect, read=read))
        # Metadata calls, whose answers are small and quick on a healthy store.
        self._quick = self._minio(
            settings, max_connections, urllib3.Timeout(connect=connect, read=min(read, self.request_timeout))
        )
        self._pool = ThreadPoolExecutor(max_workers=max_connections, thread_name_prefix="s3")

    @staticmethod
    def _minio(settings: S3Settings, max_connections: int, timeout: urllib3.Timeout) -> Minio:
        return Minio(
            settings.endpoint,
            access_key=settings.access_key,
            secret_key=settings.secret_key.get_secret_value(),
            secure=settings.secure,
            region=settings.region,
            http_client=urllib3.PoolManager(maxsize=max_connections, timeout=timeout, retries=_retries()),
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client._http.clear()
        self._quick._http.clear()

    async def _run(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A transfer: bounded by the socket timeouts only."""
        return await self._call(None, func, *args, **kwargs)

    async def _ask(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A metadata call: answered within `request_timeout`, or StorageUnavailable."""
        return await self._call(self.request_timeout, func, *args, **kwargs)

    async def _call(self, deadline: float | None, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        pace = request_pace.get()
        if pace is not None:
            await pace()
        loop = asyncio.get_running_loop()
        STORAGE_REQUESTS.inc()
        try:
            # A call past its deadline is abandoned, not stopped: its thread ends with the
            # socket timeouts, and one still queued for a thread never starts.
            async with asyncio.timeout(deadline) as scope:
                return await loop.run_in_executor(self._pool, partial(func, *args, **kwargs))
        except S3Error as exc:
            if exc.code in _MISSING_CODES:
                raise ObjectMissing(exc.object_name or "") from None
            raise StorageUnavailable(f"object store error {exc.code}: {exc.message}") from exc
        except TimeoutError as exc:
            if scope.expired():
                raise StorageUnavailable(f"object store did not answer within {deadline:.1f}s") from None
            raise StorageUnavailable(f"object store unreachable: {exc}") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise StorageUnavailable(f"object store unreachable: {exc}") from exc

    async def ensure_bucket(self) -> None:
        if not await self._ask(self._quick.bucket_exists, self.bucket):
            try:
                await self._ask(self._quick.make_bucket, self.bucket)
            except StorageUnavailable:
                # Another process created it between our check and our call.
                if not await self._ask(self._quick.bucket_exists, self.bucket):
                    raise

    async def shared_secret(self, key: str) -> bytes:
        """A random secret kept in the bucket, created by whichever process comes first."""
        try:
            return await self.get_bytes(key)
        except ObjectMissing:
            await self.put_bytes(key, secrets.token_bytes(32))
            # Read back: if two processes raced, both now use whichever write landed last.
            return await self.get_bytes(key)

    async def stat(self, key: str) -> ObjectInfo | None:
        try:
            result = await self._ask(self._quick.stat_object, self.bucket, key)
        except ObjectMissing:
            return None
        return ObjectInfo(key, int(result.size or 0), _user_metadata((result.metadata or {}).items()))

    async def get_bytes(self, key: str) -> bytes:
        """Read a small object (manifests, links) whole, within `request_timeout`."""

        def fetch() -> bytes:
            response = self._quick.get_object(self.bucket, key)
            try:
                return bytes(response.read())
            finally:
                response.close()
                response.release_conn()

        return await self._ask(fetch)

    async def get_bytes_and_metadata(self, key: str) -> tuple[bytes, dict[str, str]]:
        """Read a small object whole with its user metadata, in one request."""

        def fetch() -> tuple[bytes, dict[str, str]]:
            response = self._quick.get_object(self.bucket, key)
            try:
                data = bytes(response.read())
                return data, _user_metadata(response.headers.items())
            finally:
                response.close()
                response.release_conn()

        return await self._ask(fetch)

    async def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
    ) -> None:
        """Write an object whole; a small one (SMALL_WRITE) within `request_timeout`."""
        if len(data) <= SMALL_WRITE:
            call, client = self._ask, self._quick
        else:
            call, client = self._run, self._client
        await call(
            client.put_object,
            self.bucket,
            key,
            io.BytesIO(data),
            len(data),
            content_type=content_type,
            metadata=metadata,
        )

    async def put_stream(
        self,
        key: str,
        source: Callable[[int], Awaitable[bytes]],
        length: int = -1,
        *,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
        hasher: Hasher | None = None,
    ) -> None:
        """Upload from an async source; the object appears only when the upload completes.

        Parts are read on the event loop and up to `PARALLEL_PARTS` of them upload at once
        (object stores write faster in parallel; the SDK's own parallel mode would queue
        parts without bound). If `source` raises (a digest mismatch found at the last
        byte, a client gone), the multipart upload is aborted and nothing becomes visible
        under `key`. `length` is advisory: the source's end is the object's end.

        A `hasher` is fed every byte stored, part by part in order, in a thread (whole-blob
        hashing stays off the event loop), while the next part is read and the previous
        ones upload; it has seen the whole object when this returns.
        """
        first = await _read_exactly(source, PART_SIZE)
        hashing: asyncio.Future[None] | None = None
        if hasher is not None:
            hashing = asyncio.ensure_future(self._hash_in_order(hasher, first, None))
        headers = {"Content-Type": content_type}
        headers |= {f"x-amz-meta-{k}": v for k, v in (metadata or {}).items()}
        if len(first) < PART_SIZE:
            try:
                await self.put_bytes(key, first, content_type=content_type, metadata=metadata)
            finally:
                if hashing is not None:
                    await hashing
            return
        client = self._client
        uploads: dict[int, asyncio.Future[str]] = {}
        upload_id = ""
        try:
            upload_id = await self._ask(self._quick._create_multipart_upload, self.bucket, key, headers)
            number, data = 1, first
            while data:
                if hasher is not None and number > 1:
                    hashing = asyncio.ensure_future(self._hash_in_order(hasher, data, hashing))
                uploads[number] = asyncio.ensure_future(
                    self._run(client._upload_part, self.bucket, key, data, None, upload_id, number)
                )
                pending = [f for f in uploads.values() if not f.done()]
                if len(pending) >= PARALLEL_PARTS:
                    await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for done in (f for f in uploads.values() if f.done()):
                    done.result()  # surface a failed part now, not after reading everything
                number, data = number + 1, await _read_exactly(source, PART_SIZE)
            etags = await asyncio.gather(*uploads.values())
            if hashing is not None:
                await hashing
            parts = [Part(n, etag) for n, etag in zip(uploads, etags, strict=True)]
            await self._run(client._complete_multipart_upload, self.bucket, key, upload_id, parts, None)
        except BaseException:
            outstanding: list[asyncio.Future[Any]] = [*uploads.values(), *([hashing] if hashing else [])]
            for future in outstanding:
                future.cancel()
            await asyncio.gather(*outstanding, return_exceptions=True)
            if upload_id:
                with contextlib.suppress(StorageUnavailable, ObjectMissing):
                    await self._ask(self._quick._abort_multipart_upload, self.bucket, key, upload_id)
            raise

    async def _hash_in_order(
        self, hasher: Hasher, data: bytes, previous: asyncio.Future[None] | None
    ) -> None:
        """Feed `data` to `hasher` in a thread once the part before it has been fed."""
        if previous is not None:
            await previous
        await asyncio.get_running_loop().run_in_executor(self._pool, hasher.update, data)

    async def stream(
        self, key: str, offset: int = 0, length: int | None = None, chunk_size: int = READ_CHUNK
    ) -> AsyncIterator[bytes]:
        """Yield an object's bytes (or a range of them) in chunks.

        The next chunks are read while the consumer sends the current one (at most
        READ_AHEAD chunks wait in memory), so storage and the client's socket work in
        parallel instead of taking turns.
        """

        def open_object() -> Any:
            return self._client.get_object(self.bucket, key, offset=offset, length=length or 0)

        response = await self._run(open_object)
        chunks: asyncio.Queue[bytes | BaseException] = asyncio.Queue(READ_AHEAD)

        async def read_ahead() -> None:
            try:
                while True:
                    chunk = await self._run(response.read, chunk_size)
                    await chunks.put(chunk)
                    if not chunk:
                        return
            except Exception as exc:  # handed to the consumer, which raises it
                await chunks.put(exc)

        reader = asyncio.create_task(read_ahead())
        try:
            while True:
                item = await chunks.get()
                if isinstance(item, BaseException):
                    raise item
                if not item:
                    return
                yield item
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            response.close()
            response.release_conn()

    async def delete(self, key: str) -> None:
        await self._ask(self._quick.remove_object, self.bucket, key)

    async def copy(self, source: str, destination: str) -> None:
        """A server-side copy of one object (for objects up to 5 GiB, S3's CopyObject limit)."""
        await self._run(self._client.copy_object, self.bucket, destination, CopySource(self.bucket, source))

    async def delete_many(self, keys: Iterable[str]) -> None:
        def remove(batch: list[str]) -> None:
            errors = list(self._quick.remove_objects(self.bucket, (DeleteObject(k) for k in batch)))
            failed = [e for e in errors if e.code not in _MISSING_CODES]
            if failed:
                raise StorageUnavailable(f"could not delete {failed[0].name}: {failed[0].message}")

        batch = list(keys)
        if batch:
            await self._ask(remove, batch)

    async def list_objects(
        self, prefix: str, *, start_after: str | None = None, limit: int | None = None
    ) -> list[ObjectInfo]:
        """Every object under `prefix` (the first `limit` after `start_after` if given), with
        its size and last-modified, in key order (within `request_timeout`)."""

        def objects() -> list[ObjectInfo]:
            listing = self._quick.list_objects(
                self.bucket, prefix=prefix, recursive=True, start_after=start_after
            )
            found = (
                ObjectInfo(
                    o.object_name,
                    int(o.size or 0),
                    {},
                    o.last_modified.timestamp() if o.last_modified is not None else 0.0,
                )
                for o in listing
                if o.object_name
            )
            return list(itertools.islice(found, limit))

        return await self._ask(objects)

    async def list_keys(
        self,
        prefix: str,
        *,
        recursive: bool = True,
        start_after: str | None = None,
        limit: int | None = None,
    ) -> list[str]:
        """The keys under `prefix` in order, the first `limit` of them if given (directories
        end with `/` when not recursive).

        Like every listing, answered within `request_timeout`: a walk over a whole large
        bucket goes page by page (`limit`, then `start_after` the last key).
        """

        def names() -> list[str]:
            objects = self._quick.list_objects(
                self.bucket, prefix=prefix, recursive=recursive, start_after=start_after
            )
            found = (o.object_name for o in objects if o.object_name)
            return list(itertools.islice(found, limit))

        return await self._ask(names)
