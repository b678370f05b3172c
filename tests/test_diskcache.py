"""The local disk tier on a real file system: verified writes, adoption, LRU eviction, and
several processes sharing one directory."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import multiprocessing
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shared.diskcache import ABANDONED_AFTER, ContentMismatch, DiskCache
from shared.metrics import DISK_CACHE_BYTES, DISK_CACHE_EVICTIONS, DISK_CACHE_WRITES
from shared.oci.digest import Digest
from tests.support.images import random_bytes

KIB = 1024


def blob(size: int, seed: str) -> tuple[Digest, bytes]:
    data = random_bytes(size, seed)
    return Digest("sha256", hashlib.sha256(data).hexdigest()), data


async def chunked(data: bytes, size: int = 64 * KIB) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        await asyncio.sleep(0)
        yield data[start : start + size]


def cached_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "blobs").rglob("*") if p.is_file())


def tmp_files(root: Path) -> list[Path]:
    return sorted((root / "tmp").iterdir())


def stored_count() -> float:
    return DISK_CACHE_WRITES.labels("stored")._value.get()


def make_source(directory: Path, name: str, data: bytes) -> Path:
    """A complete file outside blobs/, on the cache's file system, as a worker leaves one."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(data)
    return path


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_populate_stores_a_verified_blob_where_path_finds_it(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, 10 * 1024 * KIB)
    digest, data = blob(300 * KIB, "populate")
    assert cache.path(digest) is None
    stored = asyncio.run(cache.populate(digest, len(data), chunked(data)))
    assert stored == tmp_path / "blobs" / "sha256" / digest.hex
    assert cache.path(digest) == stored
    assert stored.read_bytes() == data
    assert tmp_files(tmp_path) == []
    assert DISK_CACHE_BYTES._value.get() == len(data)


@pytest.mark.parametrize(
    ("label", "offered"),
    [
        ("wrong digest", random_bytes(300 * KIB, "someone else")),
        ("short stream", random_bytes(300 * KIB, "bad")[:-1]),
        ("long stream", random_bytes(300 * KIB, "bad") + b"x"),
    ],
)
def test_a_bad_or_incomplete_stream_leaves_nothing_behind(tmp_path: Path, label: str, offered: bytes) -> None:
    cache = DiskCache(tmp_path, 10 * 1024 * KIB)
    digest, data = blob(300 * KIB, "bad")
    failed = DISK_CACHE_WRITES.labels("failed")._value.get()
    with pytest.raises(ContentMismatch):
        asyncio.run(cache.populate(digest, len(data), chunked(offered)))
    assert cached_files(tmp_path) == [], label
    assert tmp_files(tmp_path) == [], label
    assert cache.path(digest) is None
    assert DISK_CACHE_WRITES.labels("failed")._value.get() == failed + 1


def test_a_source_that_fails_midway_leaves_nothing_behind(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, 10 * 1024 * KIB)
    digest, data = blob(300 * KIB, "cut")

    async def cut() -> AsyncIterator[bytes]:
        yield data[: 100 * KIB]
        raise ConnectionResetError("storage went away")

    with pytest.raises(ConnectionResetError):
        asyncio.run(cache.populate(digest, len(data), cut()))
    assert cached_files(tmp_path) == []
    assert tmp_files(tmp_path) == []


def test_a_cancelled_write_leaves_nothing_behind(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, 10 * 1024 * KIB)
    digest, data = blob(300 * KIB, "cancel")
    halfway = asyncio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        yield data[: 100 * KIB]
        halfway.set()
        await asyncio.sleep(3600)
        yield data[100 * KIB :]

    async def run() -> None:
        task = asyncio.create_task(cache.populate(digest, len(data), stalls()))
        await halfway.wait()
        assert len(tmp_files(tmp_path)) == 1  # the write was under way
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert cached_files(tmp_path) == []
    assert tmp_files(tmp_path) == []


def test_eviction_removes_the_least_recently_used_first_and_keeps_the_budget(tmp_path: Path) -> None:
    size = 100 * KIB
    cache = DiskCache(tmp_path, 3 * size)
    blobs = {name: blob(size, name) for name in "abcd"}
    for name in "abc":
        digest, data = blobs[name]
        cache.adopt(digest, make_source(tmp_path / "spool", name, data), size)
    # Written five, four and three minutes ago; then `a` is read, by another process.
    for minutes, name in ((5, "a"), (4, "b"), (3, "c")):
        age(tmp_path / "blobs" / "sha256" / blobs[name][0].hex, minutes * 60)
    reader = DiskCache(tmp_path, 3 * size)
    assert reader.path(blobs["a"][0]) is not None

    evicted = DISK_CACHE_EVICTIONS._value.get()
    digest, data = blobs["d"]
    cache.adopt(digest, make_source(tmp_path / "spool", "d", data), size)

    assert cache.path(blobs["b"][0]) is None
    assert all(cache.path(blobs[name][0]) is not None for name in "acd")
    assert DISK_CACHE_EVICTIONS._value.get() == evicted + 1
    assert sum(p.stat().st_size for p in cached_files(tmp_path)) == 3 * size
    assert DISK_CACHE_BYTES._value.get() == 3 * size


def test_a_smaller_budget_at_start_up_evicts_down_to_it(tmp_path: Path) -> None:
    size = 100 * KIB
    cache = DiskCache(tmp_path, 10 * size)
    digests = []
    for index in range(6):
        digest, data = blob(size, f"shrink-{index}")
        asyncio.run(cache.populate(digest, size, chunked(data)))
        age(tmp_path / "blobs" / "sha256" / digest.hex, 600 - index * 60)
        digests.append(digest)
    smaller = DiskCache(tmp_path, 2 * size + 1)
    assert [smaller.path(d) is not None for d in digests] == [False] * 4 + [True] * 2
    assert DISK_CACHE_BYTES._value.get() == 2 * size


def test_adopt_moves_the_file_in(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "cache", 10 * 1024 * KIB)
    digest, data = blob(200 * KIB, "adopt")
    source = make_source(tmp_path / "cache" / "spool", "fill", data)
    before = stored_count()
    cache.adopt(digest, source, len(data))
    assert not source.exists()
    found = cache.path(digest)
    assert found is not None
    assert found.read_bytes() == data
    assert stored_count() == before + 1


def test_adopt_refuses_a_file_of_the_wrong_size(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, 10 * 1024 * KIB)
    digest, data = blob(200 * KIB, "adopt-short")
    source = make_source(tmp_path / "spool", "fill", data[:-10])
    with pytest.raises(ContentMismatch):
        cache.adopt(digest, source, len(data))
    assert not source.exists()
    assert cached_files(tmp_path) == []


def test_a_blob_over_the_per_blob_limit_is_not_kept(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, 1024 * KIB, max_blob_bytes=256 * KIB)
    digest, data = blob(300 * KIB, "too-big")
    too_big = DISK_CACHE_WRITES.labels("too_big")._value.get()
    assert asyncio.run(cache.populate(digest, len(data), chunked(data))) is None
    source = make_source(tmp_path / "spool", "big", data)
    cache.adopt(digest, source, len(data))
    assert not source.exists()
    assert cached_files(tmp_path) == []
    assert DISK_CACHE_WRITES.labels("too_big")._value.get() == too_big + 2


def test_concurrent_populates_of_one_digest_give_one_whole_file(tmp_path: Path) -> None:
    # Two instances on one directory stand for two edge processes.
    caches = [DiskCache(tmp_path, 10 * 1024 * KIB), DiskCache(tmp_path, 10 * 1024 * KIB)]
    digest, data = blob(512 * KIB, "race")

    async def run() -> list[Path | None]:
        return await asyncio.gather(
            *(caches[i % 2].populate(digest, len(data), chunked(data, 16 * KIB)) for i in range(8))
        )

    paths = asyncio.run(run())
    assert set(paths) == {tmp_path / "blobs" / "sha256" / digest.hex}
    assert cached_files(tmp_path) == [tmp_path / "blobs" / "sha256" / digest.hex]
    assert cached_files(tmp_path)[0].read_bytes() == data
    assert tmp_files(tmp_path) == []


def test_populate_later_writes_once_per_digest_however_often_asked(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, 10 * 1024 * KIB)
    digest, data = blob(512 * KIB, "once")
    opened = 0

    def open_chunks() -> AsyncIterator[bytes]:
        nonlocal opened
        opened += 1
        return chunked(data, 16 * KIB)

    async def run() -> list[bool]:
        started = [cache.populate_later(digest, len(data), open_chunks) for _ in range(8)]
        await cache.wait_idle()
        return started

    before = stored_count()
    assert asyncio.run(run()) == [True] + [False] * 7
    assert opened == 1
    assert stored_count() == before + 1
    assert cache.path(digest) is not None


def test_start_up_removes_only_abandoned_temporary_files(tmp_path: Path) -> None:
    DiskCache(tmp_path, 1024 * KIB)
    abandoned = tmp_path / "tmp" / "abandoned"
    abandoned.write_bytes(b"x")
    age(abandoned, ABANDONED_AFTER + 60)
    held = tmp_path / "tmp" / "held"
    held.write_bytes(b"x")
    age(held, ABANDONED_AFTER + 60)
    fresh = tmp_path / "tmp" / "fresh"
    fresh.write_bytes(b"x")
    spool = tmp_path / "spool" / "fill" / "part"
    spool.parent.mkdir(parents=True)
    spool.write_bytes(b"x")
    age(spool, 3600)
    with held.open("rb") as writer:
        fcntl.flock(writer, fcntl.LOCK_EX)  # a writer in another process still at work
        DiskCache(tmp_path, 1024 * KIB)
    assert sorted(p.name for p in tmp_files(tmp_path)) == ["fresh", "held"]
    assert spool.read_bytes() == b"x"


def _adopt_in_process(root: str, spool: str, seeds: list[str], size: int, budget: int) -> None:
    cache = DiskCache(Path(root), budget)
    for seed in seeds:
        digest, data = blob(size, seed)
        source = make_source(Path(spool), f"{seed}-{os.getpid()}", data)
        cache.adopt(digest, source, size)


def test_processes_adopting_at_once_keep_whole_files_within_the_budget(tmp_path: Path) -> None:
    size, budget = 64 * KIB, 10 * 64 * KIB
    # Every process adopts the shared blob and eight of its own: 33 blobs for room for 10.
    jobs = [["shared", *(f"p{n}-{i}" for i in range(8))] for n in range(4)]
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(
            target=_adopt_in_process, args=(str(tmp_path), str(tmp_path / "spool"), seeds, size, budget)
        )
        for seeds in jobs
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    files = cached_files(tmp_path)
    assert 0 < sum(p.stat().st_size for p in files) <= budget
    for file in files:
        assert hashlib.sha256(file.read_bytes()).hexdigest() == file.name
    assert tmp_files(tmp_path) == []
    assert list((tmp_path / "spool").iterdir()) == []
