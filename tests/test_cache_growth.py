"""A capped proxy cache asks for an eviction as fills make it grow: fills from the Docker Hub
emulator (in-process fill jobs, real Redis and S3), the eviction messages they publish, and
the counter an eviction resets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import redis
from redis.asyncio import Redis

from services.processes import free_port
from shared import jobs
from shared.lifecycle import growth
from shared.lifecycle.runs import LifecycleReport
from shared.settings import Settings
from tests.fixtures.servers import InProcessWorker, WorkerFactory
from tests.support.distribution import Distribution
from tests.support.dockerhub import DockerHubEmulator
from tests.support.images import random_bytes, sha256
from tests.support.seed import push_blob
from workers.fills import prefetch, run_fill
from workers.lifecycle import run_job

KIB = 1024
# Triggers past (1 - 0.1) * 1000 KiB = 900 KiB: three 300 KiB fills stay at it, a fourth passes.
CAP = 1000 * KIB
BLOB = 300 * KIB


def _worker(worker_factory: WorkerFactory, hub: DockerHubEmulator) -> InProcessWorker:
    proxy = {"type": "proxy", "public": True, "upstream": "hub"}
    return worker_factory(
        upstreams=[{"name": "hub", "url": hub.url, "flavor": "dockerhub", "read_timeout": "10s"}],
        projects=[
            {"name": "hub", **proxy, "cache": {"max_bytes": CAP}},
            {"name": "open", **proxy},
        ],
    )


def _evictions(redis_url: str) -> list[list[Any]]:
    """The arguments of every eviction message waiting in the maintenance queue."""
    with redis.Redis.from_url(redis_url) as client:
        raw = client.hvals(f"{jobs.NAMESPACE}:{jobs.MAINTENANCE_QUEUE}.msgs")
    messages = [json.loads(data) for data in raw]
    return [m["args"] for m in messages if m["actor_name"] == jobs.EVICT_CACHE.actor]


def _counter(redis_url: str, project: str) -> int | None:
    with redis.Redis.from_url(redis_url) as client:
        value = client.get(growth.counter_key(project))
    return int(value) if value is not None else None


def _upstream_blobs(distribution: Distribution, name: str, count: int) -> list[str]:
    digests = []
    with httpx.Client(base_url=distribution.url, timeout=60) as upstream:
        for n in range(count):
            data = random_bytes(BLOB, f"{name}-{n}")
            push_blob(upstream, name, sha256(data), data)
            digests.append(sha256(data))
    return digests


def test_fills_past_the_trigger_ask_for_one_eviction_of_the_project(
    worker_factory: WorkerFactory,
    hub: DockerHubEmulator,
    distribution: Distribution,
    redis_url: str,
    repo_name: Callable[[], str],
) -> None:
    worker = _worker(worker_factory, hub)
    ctx = worker.context
    name = repo_name()
    digests = _upstream_blobs(distribution, name, 5)

    for digest in digests[:3]:
        assert worker.run(run_fill(ctx, "hub", name, digest)) == "committed"
    assert _counter(redis_url, "hub") == 3 * BLOB
    assert _evictions(redis_url) == [], "under the trigger nothing is asked"
    # A fill of what the project holds already adds nothing.
    assert worker.run(run_fill(ctx, "hub", name, digests[0])) == "present"
    assert _counter(redis_url, "hub") == 3 * BLOB

    # A prefetch brings the fourth, which passes the trigger, and the fifth in the same burst:
    # one eviction is asked.
    prefetched = worker.run(prefetch(ctx, "hub", name, digests[3:]))
    assert [outcome for _, outcome in prefetched.outcomes] == ["committed", "committed"]
    assert _counter(redis_url, "hub") == 5 * BLOB
    assert _evictions(redis_url) == [["hub", 0]]

    # A project without max_bytes is not counted.
    assert worker.run(run_fill(ctx, "open", name, digests[0])) == "committed"
    assert _counter(redis_url, "open") is None
    assert _evictions(redis_url) == [["hub", 0]]


def test_an_eviction_sets_the_counter_to_what_it_measured(
    worker_factory: WorkerFactory,
    hub: DockerHubEmulator,
    distribution: Distribution,
    redis_url: str,
    repo_name: Callable[[], str],
) -> None:
    worker = _worker(worker_factory, hub)
    ctx = worker.context
    name = repo_name()
    [digest] = _upstream_blobs(distribution, name, 1)
    assert worker.run(run_fill(ctx, "hub", name, digest)) == "committed"
    # Wrong since (fills in a Redis that was later restored, say), and an eviction asked.
    with redis.Redis.from_url(redis_url) as client:
        client.set(growth.counter_key("hub"), 50 * CAP)
        client.set(growth.asked_key("hub"), "1")

    dry = worker.run(run_job(ctx.lifecycle, "eviction", "hub", dry_run=True))
    assert dry.outcome == "succeeded"
    assert _counter(redis_url, "hub") == 50 * CAP, "a dry run changes nothing"

    report = worker.run(run_job(ctx.lifecycle, "eviction", "hub"))
    assert report.outcome == "succeeded"
    assert report.project_bytes == BLOB, report
    assert _counter(redis_url, "hub") == BLOB
    with redis.Redis.from_url(redis_url) as client:
        assert client.get(growth.asked_key("hub")) is None, "the next fill past the trigger asks again"


def _capped() -> Settings:
    return Settings(
        projects=[{"name": "hub", "type": "proxy", "upstream": "hub", "cache": {"max_bytes": CAP}}],
        upstreams=[{"name": "hub", "url": "http://127.0.0.1:9"}],
    )


def test_fills_during_an_eviction_stay_counted(redis_url: str) -> None:
    settings = _capped()
    asked: list[str] = []

    async def ask(project: str) -> None:
        asked.append(project)

    async def scenario() -> int | None:
        client = Redis.from_url(redis_url)
        try:
            await growth.grew(client, settings, "hub", 100 * KIB, ask)
            before = await growth.counted(client, "hub")
            await growth.grew(client, settings, "hub", 200 * KIB, ask)  # while the eviction runs
            report = LifecycleReport(job="eviction", project="hub", project_bytes=600 * KIB)
            await growth.measured(client, report, before)
            # A run that found another running measured nothing.
            await growth.measured(client, LifecycleReport(job="eviction", project="hub", outcome="busy"), 0)
        finally:
            await client.aclose()
        return _counter(redis_url, "hub")

    assert asyncio.run(scenario()) == 800 * KIB
    assert asked == []


def test_redis_trouble_never_fails_the_count() -> None:
    # Nothing listens there: every command fails to connect.
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    settings = _capped()

    async def ask(project: str) -> None:
        raise AssertionError("nothing to ask without a count")

    async def scenario() -> tuple[bool, int | None]:
        client = Redis.from_url(unreachable, socket_connect_timeout=1)
        try:
            asked = await growth.grew(client, settings, "hub", 10 * CAP, ask)
            return asked, await growth.counted(client, "hub")
        finally:
            await client.aclose()

    assert asyncio.run(scenario()) == (False, None)
