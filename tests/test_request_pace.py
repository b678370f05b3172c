"""Garbage collection's pace: every store request made under `paced()` waits its turn."""

from __future__ import annotations

import asyncio

import pytest

from shared.lifecycle import runs
from shared.lifecycle.runs import RequestPace, paced
from shared.registry.storage import ObjectStore, request_pace
from shared.settings import S3Settings


def test_requests_under_a_pace_are_spaced_evenly(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(round(seconds, 6))
        clock[0] += seconds

    monkeypatch.setattr(runs.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(runs.asyncio, "sleep", sleep)
    pace = RequestPace(4)

    async def five() -> None:
        for _ in range(5):
            await pace()

    asyncio.run(five())
    # The first goes at once; each next one a quarter of a second after the one before.
    assert slept == [0.25, 0.25, 0.25, 0.25]


def test_every_store_request_made_under_a_pace_waits_for_it(s3_settings: S3Settings) -> None:
    waited: list[int] = []

    async def counting() -> None:
        waited.append(1)

    async def scenario() -> None:
        store = ObjectStore(s3_settings)
        try:
            await store.stat("nothing/here")  # unpaced
            token = request_pace.set(counting)
            try:
                await store.put_bytes("paced/one", b"1")
                # Tasks started under the pace inherit it.
                await asyncio.gather(store.stat("paced/one"), store.get_bytes("paced/one"))
            finally:
                request_pace.reset(token)
            await store.delete("paced/one")  # unpaced again
        finally:
            store.close()

    asyncio.run(scenario())
    assert len(waited) == 3


def test_a_zero_rate_leaves_requests_unpaced() -> None:
    with paced(0):
        assert request_pace.get() is None
    with paced(50):
        assert isinstance(request_pace.get(), RequestPace)
    assert request_pace.get() is None
