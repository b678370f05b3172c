"""A local disk tier for hot blobs: complete, verified files at `<root>/blobs/<alg>/<hex>`.

Edges and workers on one host may share the directory. A file appears under `blobs/`
only by an atomic rename of a complete file whose size and digest were checked, so
whatever is found there can be served as is. Recency is the file's mtime: reads bump it
(at most once a minute per process, so a hit costs a stat, not a metadata write), and
eviction removes the least recently used files until the total fits the budget. Eviction
holds an advisory lock (`<root>/lock`) so that processes take turns rather than each
deleting files for the same excess. Deleting a file that is being sent is fine: open
descriptors keep its bytes until they are closed.

Files being written live in `<root>/tmp/`, each locked by its writer; the ones nobody
holds any more are removed at start-up and at each eviction. `<root>/spool/` belongs to
in-flight fills and is never touched here.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import structlog

from shared.metrics import (
    DISK_CACHE_BYTES,
    DISK_CACHE_EVICTIONS,
    DISK_CACHE_HITS,
    DISK_CACHE_MISSES,
    DISK_CACHE_WRITES,
)
from shared.oci.digest import Digest
from shared.settings import Settings

T = TypeVar("T")
log = structlog.get_logger("diskcache")

# How often one process may bump a file's mtime on reads: fine enough for LRU order.
TOUCH_INTERVAL = 60.0
# A temporary file is only removed once it is this old and unlocked: its writer creates
# it and then locks it, and must not lose it in between.
ABANDONED_AFTER = 60.0
# Reads bumped recently, remembered per process; forgotten wholesale past this many.
_TOUCHED_MAX = 100_000


class ContentMismatch(ValueError):
    """The bytes offered for a blob are not that blob: wrong size or wrong digest."""


class HashMismatch(ContentMismatch):
    """The bytes offered for a blob hash to another digest."""


# Called with the reason when the bytes a background copy read do not hash to the digest.
OnCorrupt = Callable[[str], Awaitable[None]]


class DiskCache:
    """Blobs on local disk, least recently used evicted first, within `max_bytes`."""

    def __init__(self, root: Path, max_bytes: int, *, max_blob_bytes: int | None = None) -> None:
        self.root = root
        self.max_bytes = max_bytes
        # One blob may not take more than this (by default the whole budget).
        self.max_blob_bytes = max_bytes if max_blob_bytes is None else min(max_blob_bytes, max_bytes)
        self._blobs = root / "blobs"
        self._tmp = root / "tmp"
        self._touched: dict[Digest, float] = {}
        self._filling: dict[Digest, asyncio.Task[None]] = {}
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(exist_ok=True)
        self.evict()  # counts what a previous run left, and removes its abandoned writes

    def _file(self, digest: Digest) -> Path:
        return self._blobs / digest.algorithm / digest.hex

    def path(self, digest: Digest) -> Path | None:
        """The cached file of `digest`, or None; a hit counts as a use for eviction."""
        file = self._file(digest)
        now = time.monotonic()
        try:
            if now - self._touched.get(digest, -TOUCH_INTERVAL) >= TOUCH_INTERVAL:
                try:
                    os.utime(file)
                except PermissionError:  # another user's file: still servable, only not bumped
                    os.stat(file)
                if len(self._touched) >= _TOUCHED_MAX:
                    self._touched.clear()
                self._touched[digest] = now
            else:
                os.stat(file)
        except FileNotFoundError:
            self._touched.pop(digest, None)
            DISK_CACHE_MISSES.inc()
            return None
        DISK_CACHE_HITS.inc()
        return file

    def contains(self, digest: Digest) -> bool:
        """Whether the tier holds the blob (a plain look, not counted as a use)."""
        return self._file(digest).exists()

    def discard(self, digest: Digest) -> None:
        """Remove a cached file that turned out unusable (e.g. not the size the blob has)."""
        self._touched.pop(digest, None)
        self._file(digest).unlink(missing_ok=True)

    def adopt(self, digest: Digest, source: Path, size: int) -> None:
        """Move `source`, a complete file already verified to be `digest`, into the cache.

        `source` must be on the cache's file system, and the cache takes it over: it is
        renamed into place, or deleted if the blob is bigger than `max_blob_bytes`, or
        deleted with ContentMismatch if it does not hold `size` bytes. Safe to call from
        several processes at once: the rename is atomic, and a second copy of the same
        blob replaces the first with the same bytes.
        """
        actual = os.stat(source).st_size
        if actual != size:
            source.unlink(missing_ok=True)
            DISK_CACHE_WRITES.labels("failed").inc()
            raise ContentMismatch(f"{source} holds {actual} bytes, not the {size} of {digest}")
        if size > self.max_blob_bytes:
            source.unlink(missing_ok=True)
            DISK_CACHE_WRITES.labels("too_big").inc()
            return
        self._install(source, digest)
        self.evict()

    def _install(self, source: Path, digest: Digest) -> None:
        target = self._file(digest)
        target.parent.mkdir(exist_ok=True)
        os.utime(source)  # the newest file from the moment it is visible to eviction
        os.replace(source, target)
        self._touched[digest] = time.monotonic()
        DISK_CACHE_WRITES.labels("stored").inc()

    async def populate(self, digest: Digest, size: int, chunks: AsyncIterator[bytes]) -> Path | None:
        """Write `chunks` as the blob `digest` of `size` bytes; its path, or None if too big.

        The bytes go to a temporary file and are renamed into place only once their size
        and digest match (ContentMismatch otherwise). On any failure, the chunk source's
        own included, the temporary file is removed and nothing appears under `blobs/`.
        `chunks` is closed either way.
        """
        try:
            existing = self._file(digest)
            if existing.exists():
                return existing
            if size > self.max_blob_bytes:
                DISK_CACHE_WRITES.labels("too_big").inc()
                return None
            return await self._write(digest, size, chunks)
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _write(self, digest: Digest, size: int, chunks: AsyncIterator[bytes]) -> Path:
        tmp = self._tmp / f"{digest.algorithm}-{digest.hex}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = await _in_thread(_create_locked, tmp)
        hasher = digest.hasher()
        written = 0
        try:
            async for chunk in chunks:
                written += len(chunk)
                if written > size:
                    raise ContentMismatch(f"{digest}: more than the expected {size} bytes")
                await _in_thread(_write_hashed, fd, hasher, chunk)
            if written != size:
                raise ContentMismatch(f"{digest}: {written} bytes, expected {size}")
            actual = hasher.hexdigest()
            if actual != digest.hex:
                raise HashMismatch(f"content hashes to {digest.algorithm}:{actual}, not {digest}")
            await _in_thread(self._commit, fd, tmp, digest)
        except BaseException:
            DISK_CACHE_WRITES.labels("failed").inc()
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)  # only now: the lock must outlive the rename
        await _in_thread(self.evict)
        return self._file(digest)

    def _commit(self, fd: int, tmp: Path, digest: Digest) -> None:
        # Durable before visible: after a crash, a file under blobs/ must still be whole.
        os.fsync(fd)
        self._install(tmp, digest)

    def populate_later(
        self,
        digest: Digest,
        size: int,
        open_chunks: Callable[[], AsyncIterator[bytes]],
        on_corrupt: OnCorrupt | None = None,
    ) -> bool:
        """Populate in the background, at most once at a time per digest in this process.

        `open_chunks` is called only if a write starts. False if one is already running
        or the blob is too big. Failures are logged: the tier is only ever an optimisation,
        except bytes that do not hash to the digest, which `on_corrupt` is told about.
        """
        if digest in self._filling:
            return False
        if size > self.max_blob_bytes:
            DISK_CACHE_WRITES.labels("too_big").inc()
            return False
        task = asyncio.get_running_loop().create_task(
            self._populate_logged(digest, size, open_chunks, on_corrupt)
        )
        self._filling[digest] = task
        task.add_done_callback(lambda _: self._filling.pop(digest, None))
        return True

    async def _populate_logged(
        self,
        digest: Digest,
        size: int,
        open_chunks: Callable[[], AsyncIterator[bytes]],
        on_corrupt: OnCorrupt | None,
    ) -> None:
        started = time.monotonic()
        try:
            await self.populate(digest, size, open_chunks())
        except HashMismatch as exc:
            log.error("disk_cache_content_mismatch", digest=str(digest), error=str(exc))
            if on_corrupt is not None:
                await on_corrupt(str(exc))
            return
        except Exception as exc:
            log.warning("disk_cache_write_failed", digest=str(digest), error=str(exc))
            return
        log.info("disk_cache_stored", digest=str(digest), bytes=size, seconds=time.monotonic() - started)

    async def wait_idle(self) -> None:
        """Wait for the background writes running now."""
        await asyncio.gather(*self._filling.values(), return_exceptions=True)

    async def aclose(self) -> None:
        """Stop the background writes (their temporary files are removed)."""
        for task in self._filling.values():
            task.cancel()
        await self.wait_idle()

    def evict(self) -> int:
        """Remove least recently used blobs until the total fits `max_bytes`; the total kept."""
        with self._locked():
            self._remove_abandoned()
            entries = sorted(self._entries())
            total = sum(size for _, size, _ in entries)
            for _, size, file in entries:
                if total <= self.max_bytes:
                    break
                with contextlib.suppress(FileNotFoundError):
                    file.unlink()
                    DISK_CACHE_EVICTIONS.inc()
                total -= size
        DISK_CACHE_BYTES.set(total)
        return total

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _entries(self) -> Iterator[tuple[float, int, Path]]:
        """(mtime, size, path) of every cached file."""
        for algorithm in os.scandir(self._blobs):
            if not algorithm.is_dir():
                continue
            for entry in os.scandir(algorithm.path):
                with contextlib.suppress(FileNotFoundError):
                    info = entry.stat()
                    yield info.st_mtime, info.st_size, Path(entry.path)

    def _remove_abandoned(self) -> None:
        """Delete temporary files whose writer is gone (no one holds their lock)."""
        cutoff = time.time() - ABANDONED_AFTER
        for entry in os.scandir(self._tmp):
            try:
                if entry.stat().st_mtime > cutoff:
                    continue
                fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer holds it
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
            finally:
                os.close(fd)


def from_settings(settings: Settings) -> DiskCache | None:
    """The tier `disk_cache` describes, or None when its `max_bytes` is 0 (switched off).

    Start-up counts the files already there: call it off the event loop.
    """
    limits = settings.disk_cache
    if not limits.max_bytes:
        return None
    return DiskCache(settings.disk_cache_path, int(limits.max_bytes), max_blob_bytes=limits.max_blob_bytes)


async def _in_thread(func: Callable[..., T], *args: Any) -> T:
    """Run `func` on the default executor and, even if cancelled, return only once it has.

    A thread cannot be stopped: were a cancelled write still running when its descriptor
    is closed, the number could be reused by another file and the write land there.
    """
    future = asyncio.get_running_loop().run_in_executor(None, func, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise


def _create_locked(path: Path) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _write_hashed(fd: int, hasher: Any, chunk: bytes) -> None:
    hasher.update(chunk)
    view = memoryview(chunk)
    while view:
        view = view[os.write(fd, view) :]
