"""The governor's bucket on a real Redis: windows, reserve, corrections and closures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
from redis.asyncio import Redis

from shared.ratelimit import Governor, QuotaRefused, background
from shared.settings import Upstream

T = TypeVar("T")


def run(redis_url: str, body: Callable[[Governor], Awaitable[T]], **quota: object) -> T:
    async def main() -> T:
        redis = Redis.from_url(redis_url)
        try:
            upstream = Upstream(
                name="hub", url="http://127.0.0.1:1", quota=quota or {"limit": 4, "window": "1h"}
            )
            return await body(Governor(redis, upstream))
        finally:
            await redis.aclose()

    return asyncio.run(main())


def test_a_quota_429_without_retry_after_waits_one_refill_of_the_window(redis_url: str) -> None:
    async def body(governor: Governor) -> tuple[float, float | None]:
        wait = await governor.close(abuse=False, retry_after=None)
        status = await governor.status()
        return wait, status.closed_until

    wait, closed_until = run(redis_url, body)
    # 4 pulls an hour: one pull refills every 900 s.
    assert wait == pytest.approx(900)
    assert closed_until is not None
    assert closed_until == pytest.approx(time.time() + 900, abs=5)


def test_an_abuse_429_closes_every_request_for_a_minute(redis_url: str) -> None:
    async def body(governor: Governor) -> float:
        wait = await governor.close(abuse=True, retry_after=None)
        with pytest.raises(QuotaRefused) as refused:
            await governor.admit(pull=False)  # even a HEAD
        assert refused.value.retry_after == pytest.approx(60, abs=2)
        return wait

    assert run(redis_url, body) == 60


def test_presets_set_the_docker_hub_numbers(redis_url: str) -> None:
    async def body(governor: Governor) -> tuple[int | None, float | None]:
        status = await governor.status()
        return status.limit, status.window

    assert run(redis_url, body, preset="dockerhub-personal") == (200, 21600)


def test_background_spends_only_above_the_reserve(redis_url: str) -> None:
    async def body(governor: Governor) -> tuple[int, int]:
        background_pulls = 0
        with background():
            for _ in range(4):
                try:
                    await governor.admit(pull=True)
                    background_pulls += 1
                except QuotaRefused:
                    pass
        client_pulls = 0
        for _ in range(4):
            try:
                await governor.admit(pull=True)
                client_pulls += 1
            except QuotaRefused:
                pass
        return background_pulls, client_pulls

    # limit 4, reserve 50%: background takes 2, clients the other 2.
    assert run(redis_url, body, limit=4, window="1h", reserve=0.5) == (2, 2)


def test_a_header_never_raises_the_bucket_above_what_we_spent(redis_url: str) -> None:
    async def body(governor: Governor) -> float | None:
        for _ in range(3):
            await governor.admit(pull=True)
        await governor.observe(remaining=4, limit=4, window=3600)  # a header from before our pulls
        await governor.observe(remaining=0, limit=4, window=3600)  # and one saying less
        return (await governor.status()).remaining

    remaining = run(redis_url, body)
    assert remaining is not None
    assert remaining < 0.1
