"""The fill protocol's progress record and the lease helper, read and written in real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.asyncio import Redis

from services.scheduler.leader import LeaderLease, Lease
from shared.leases import Hold
from shared.leases import Lease as RedisLease
from shared.oci.digest import Digest
from shared.proxy import protocol
from shared.proxy.protocol import FillProgress, FillSource, FillState, FillStatus

DIGEST = Digest.parse("sha256:" + "ab" * 32)
T = TypeVar("T")


def _with_redis(redis_url: str, body: Callable[[Redis], Awaitable[T]]) -> T:
    async def run() -> T:
        redis = Redis.from_url(redis_url)
        try:
            return await body(redis)
        finally:
            await redis.aclose()

    return asyncio.run(run())


def test_each_step_of_a_fill_reads_back_as_written_and_is_stored_as_plain_strings(redis_url: str) -> None:
    async def body(redis: Redis) -> None:
        progress = FillProgress(redis, DIGEST)
        assert await progress.read() == FillState()
        await progress.queued()
        assert (await progress.read()).status is FillStatus.QUEUED
        await progress.started(FillSource.SEGMENTS, staged=4096, spool="node-a")
        await progress.sized(10_000)
        await progress.progressed(staged=8192)
        filling = await progress.read()
        assert (filling.status, filling.source, filling.spool) == (
            FillStatus.FILLING,
            FillSource.SEGMENTS,
            "node-a",
        )
        assert (filling.size, filling.staged) == (10_000, 8192)
        assert filling.updated > 0
        await progress.verified()
        assert (await progress.read()).status in protocol.DOWNLOAD_OVER
        await progress.committed(10_000)
        stored = await redis.hgetall(protocol.state_key(DIGEST))
        # What an edge or worker of an older version reads: the bare strings, no enum names.
        assert stored[b"status"] == b"committed"
        assert stored[b"source"] == b"segments"
        assert (stored[b"size"], stored[b"staged"]) == (b"10000", b"10000")
        assert 0 < await redis.ttl(protocol.state_key(DIGEST)) <= protocol.STATE_TTL_SECONDS

    _with_redis(redis_url, body)


def test_a_failure_replaces_the_whole_previous_outcome_and_a_new_start_clears_it(redis_url: str) -> None:
    async def body(redis: Redis) -> None:
        progress = FillProgress(redis, DIGEST)
        await progress.failed("TOOMANYREQUESTS", "quota", retry_after=30.0)
        first = await progress.read()
        assert (first.status, first.error_code, first.error, first.retry_after) == (
            FillStatus.FAILED,
            "TOOMANYREQUESTS",
            "quota",
            30.0,
        )
        await progress.failed("UPSTREAM_ERROR", "bad digest")
        assert (await progress.read()).retry_after is None  # not the earlier failure's
        await progress.started(FillSource.BLOB, staged=0, spool=None)
        started = await progress.read()
        assert (started.status, started.source, started.spool) == (FillStatus.FILLING, FillSource.BLOB, None)
        assert (started.error_code, started.error) == (None, None)

    _with_redis(redis_url, body)


def test_a_record_written_by_another_version_is_read_without_failing(redis_url: str) -> None:
    async def body(redis: Redis) -> None:
        key = protocol.state_key(DIGEST)
        # An older worker: free-form fields, empty strings for "none".
        await redis.hset(
            key,
            mapping={"status": "filling", "staged": "512", "source": "blob", "spool": "", "size": ""},
        )
        old = await FillProgress(redis, DIGEST).read()
        assert old == FillState(status=FillStatus.FILLING, staged=512, source=FillSource.BLOB)
        assert old.status == "filling"  # still equal to the bare string
        # A newer one: a status, a source and a field this version does not know, a bad number.
        await redis.delete(key)
        await redis.hset(
            key,
            mapping={"status": "paused", "source": "peer", "staged": "x", "size": "12", "hint": "1"},
        )
        assert await FillProgress(redis, DIGEST).read() == FillState(size=12)

    _with_redis(redis_url, body)


def test_a_lease_is_taken_renewed_and_held_elsewhere_until_released(redis_url: str) -> None:
    async def body(redis: Redis) -> None:
        ours, theirs = (
            RedisLease(redis, "seawall:test:lease", ttl=5.0),
            RedisLease(redis, "seawall:test:lease"),
        )
        assert await ours.hold() is Hold.TAKEN
        assert await ours.hold() is Hold.RENEWED
        assert await theirs.hold() is Hold.ELSEWHERE
        assert not await theirs.acquire()
        await theirs.release()  # not theirs to give up
        assert await redis.get("seawall:test:lease") == ours.holder.encode()
        await ours.release_or_raise()
        assert await theirs.acquire()
        # The scheduler's leader lease is the same lease under its own key.
        leader, other = LeaderLease(redis), LeaderLease(redis)
        assert (await leader.hold(), await leader.hold(), await other.hold()) == (
            Lease.TAKEN,
            Lease.RENEWED,
            Lease.ELSEWHERE,
        )
        assert [s.ours for s in Lease] == [True, True, False]
        await leader.release()
        assert await other.hold() is Lease.TAKEN

    _with_redis(redis_url, body)
