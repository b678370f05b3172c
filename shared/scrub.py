"""The scrub: read every stored blob back and check it still hashes to its digest.

Object stores can lose or damage bytes (a bad disk, an operator's mistake, a bug in a
store or in an older Seawall). The scrub finds such blobs before a client does, moves
them to quarantine (a proxy project refetches them, a push restores a hosted one) and
counts them. It reads at a capped rate so that it never competes with clients, and it
is safe to stop and run again (it only reads, and quarantining twice is harmless).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog
from redis.asyncio import Redis

from shared.leases import Lease
from shared.metrics import SCRUB_BLOBS, SCRUB_BYTES, SCRUB_LAST_SUCCESS
from shared.oci.digest import Digest
from shared.oci.errors import RegistryError
from shared.registry import layout
from shared.registry.blobs import BlobStore
from shared.registry.storage import ObjectMissing, ObjectStore

log = structlog.get_logger("scrub")

PAGE = 1000
SCRUB_LEASE = "seawall:scrub:lease"


@dataclass
class ScrubReport:
    blobs: int = 0
    bytes: int = 0
    ok: int = 0
    corrupt: list[str] = field(default_factory=list)
    gone: int = 0
    seconds: float = 0.0


class _Pace:
    """Sleeps so that reads stay at or under `bytes_per_second` on average."""

    def __init__(self, bytes_per_second: int) -> None:
        self._rate = bytes_per_second
        self._started = time.monotonic()
        self._read = 0

    async def __call__(self, n: int) -> None:
        self._read += n
        SCRUB_BYTES.inc(n)
        if self._rate <= 0:
            return
        ahead = self._read / self._rate - (time.monotonic() - self._started)
        if ahead > 0:
            await asyncio.sleep(ahead)


def digest_of_key(key: str) -> Digest | None:
    """The digest a `blobs/<alg>/<xx>/<hex>` key stores, None for anything else."""
    parts = key.split("/")
    if len(parts) != 4 or parts[0] != layout.BLOBS.rstrip("/"):
        return None
    try:
        return Digest.parse(f"{parts[1]}:{parts[3]}")
    except RegistryError:
        return None


async def count_blobs(store: ObjectStore) -> int:
    total, after = 0, None
    while True:
        page = await store.list_keys(layout.BLOBS, start_after=after, limit=PAGE)
        total += len(page)
        if len(page) < PAGE:
            return total
        after = page[-1]


async def scrub(
    store: ObjectStore,
    blobs: BlobStore,
    *,
    bytes_per_second: int,
    progress: Callable[[int], None] | None = None,
) -> ScrubReport:
    """Re-hash every stored blob, quarantining those that fail; `progress` gets bytes read."""
    report = ScrubReport()
    started = time.monotonic()
    pace = _Pace(bytes_per_second)

    async def paced(n: int) -> None:
        await pace(n)
        if progress is not None:
            progress(n)

    after: str | None = None
    while True:
        page = await store.list_keys(layout.BLOBS, start_after=after, limit=PAGE)
        for key in page:
            digest = digest_of_key(key)
            if digest is None:
                continue
            report.blobs += 1
            await _check(blobs, digest, paced, report)
        if len(page) < PAGE:
            break
        after = page[-1]
    report.seconds = time.monotonic() - started
    SCRUB_LAST_SUCCESS.set(time.time())
    log.info(
        "scrub_finished",
        blobs=report.blobs,
        bytes=report.bytes,
        corrupt=len(report.corrupt),
        gone=report.gone,
        seconds=round(report.seconds, 1),
    )
    return report


async def scrub_once(
    redis: Redis, store: ObjectStore, blobs: BlobStore, *, bytes_per_second: int
) -> ScrubReport | None:
    """`scrub`, but one at a time cluster-wide (a lease in Redis): None when one runs already."""
    lease = Lease(redis, SCRUB_LEASE, ttl=60.0)
    if not await lease.acquire():
        log.info("scrub_already_running")
        return None
    try:
        async with lease.heartbeat():
            return await scrub(store, blobs, bytes_per_second=bytes_per_second)
    finally:
        await lease.release()


async def _check(
    blobs: BlobStore, digest: Digest, paced: Callable[[int], Awaitable[None]], report: ScrubReport
) -> None:
    blobs.forget(digest)  # read the record as stored now, not as this process remembers it
    placement = await blobs.placement(digest)
    if placement is None:
        SCRUB_BLOBS.labels("gone").inc()
        report.gone += 1
        return
    try:
        sound = await blobs.rehash(digest, placement.size, paced)
    except ObjectMissing:
        # Deleted while we read it, or an extent is missing: the latter is damage too.
        if await blobs.placement(digest) is None:
            SCRUB_BLOBS.labels("gone").inc()
            report.gone += 1
            return
        sound = False
    report.bytes += placement.size
    if sound:
        SCRUB_BLOBS.labels("ok").inc()
        report.ok += 1
        return
    SCRUB_BLOBS.labels("corrupt").inc()
    report.corrupt.append(str(digest))
    await blobs.quarantine(digest, "scrub", "re-read bytes do not hash to the digest")
