"""The workers' jobs, run in-process: each job function is called with a WorkerContext
against the real Redis, the real S3 server and the Docker Hub emulator (no worker process,
no broker in between). Also the one enqueue() and the middleware that gives a worker
process its context."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dramatiq
import httpx
import pytest
import redis
from dramatiq import Worker
from dramatiq.brokers.stub import StubBroker
from dramatiq.common import dq_name
from dramatiq.middleware import AsyncIO

from shared import jobs
from shared.oci.digest import Digest
from shared.proxy import protocol
from shared.settings import S3Settings, Settings
from shared.upstream import UpstreamFailure
from tests.fixtures.servers import InProcessWorker, WorkerFactory
from tests.support.distribution import Distribution
from tests.support.dockerhub import DockerHubEmulator
from tests.support.images import Image, make_image, make_layer, random_bytes, sha256
from tests.support.seed import push_blob, push_image
from workers import context
from workers.context import WorkerContext, WorkerContextMiddleware
from workers.fills import prefetch, run_fill
from workers.warm import warm_tag

KIB = 1024


@pytest.fixture
def hub_worker(worker_factory: WorkerFactory, hub: DockerHubEmulator) -> InProcessWorker:
    """An in-process worker whose proxy project `hub` fronts the Docker Hub emulator."""
    return worker_factory(
        upstreams=[
            {
                "name": "hub",
                "url": hub.url,
                "flavor": "dockerhub",
                "head_timeout": "2s",
                "read_timeout": "10s",
                "connect_timeout": "2s",
            }
        ],
        projects=[{"name": "hub", "type": "proxy", "public": True, "upstream": "hub", "tag_ttl": "0s"}],
    )


def _upstream_blob(distribution: Distribution, name: str, data: bytes) -> str:
    with httpx.Client(base_url=distribution.url, timeout=60) as upstream:
        push_blob(upstream, name, sha256(data), data)
    return sha256(data)


async def _stored(ctx: WorkerContext, name: str, digest: str) -> bytes | None:
    """The blob as our repository `name` serves it: its stored bytes, if linked there."""
    parsed = Digest.parse(digest)
    if not await ctx.repositories.blob_linked(name, parsed):
        return None
    return b"".join([chunk async for chunk in ctx.blobs.stream(parsed)])


def test_a_fill_commits_the_upstream_blob_byte_for_byte(
    hub_worker: InProcessWorker,
    hub: DockerHubEmulator,
    distribution: Distribution,
    repo_name: Callable[[], str],
) -> None:
    name = repo_name()
    data = random_bytes(300 * KIB, name)
    digest = _upstream_blob(distribution, name, data)
    ctx = hub_worker.context

    assert hub_worker.run(run_fill(ctx, "hub", name, digest)) == "committed"
    assert hub_worker.run(_stored(ctx, f"hub/{name}", digest)) == data
    assert len(hub.blob_gets(digest)) == 1
    # Run again (a redelivered message): the blob is held, nothing is fetched.
    assert hub_worker.run(run_fill(ctx, "hub", name, digest)) == "present"
    assert len(hub.blob_gets(digest)) == 1


def test_a_fill_cut_off_by_the_upstream_resumes_from_its_staged_segments(
    hub_worker: InProcessWorker,
    hub: DockerHubEmulator,
    distribution: Distribution,
    repo_name: Callable[[], str],
) -> None:
    name = repo_name()
    data = random_bytes(600 * KIB, name)
    digest = _upstream_blob(distribution, name, data)
    ctx = hub_worker.context
    # Sent in pieces, so the fill takes in what arrives before the cut (aiohttp drops
    # what it holds unread when the connection breaks).
    hub.throttle_blob(digest, 1024 * KIB)
    hub.cut_blob_after(digest, 200 * KIB)

    with pytest.raises(UpstreamFailure):
        hub_worker.run(run_fill(ctx, "hub", name, digest))
    listed = hub_worker.run(protocol.staged_segments(ctx.objects, Digest.parse(digest)))
    staged = sum(segment.size for segment in protocol.contiguous(listed))
    assert 0 < staged <= 200 * KIB
    assert hub_worker.run(_stored(ctx, f"hub/{name}", digest)) is None
    # As if the next attempt ran on another machine: only the bucket's segments are left.
    ctx.spool.path(Digest.parse(digest)).unlink()

    hub.clear_faults()
    hub.reset_counters()
    assert hub_worker.run(run_fill(ctx, "hub", name, digest)) == "committed"
    # Upstream was asked for the rest only (the whole-blob GET sent early is dropped).
    assert [r.range for r in hub.blob_gets(digest) if r.range] == [f"bytes={staged}-"]
    assert hub_worker.run(_stored(ctx, f"hub/{name}", digest)) == data


def _image(name: str, layers: int) -> Image:
    return make_image([make_layer(size=120 * KIB, seed=f"{name}-{n}") for n in range(layers)], label=name)


def _blob_digests(image: Image) -> list[str]:
    """The image's blobs in manifest order: the config, then the layers."""
    manifest = json.loads(image.manifest)
    return [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]


def test_a_prefetch_fetches_the_images_blobs_in_manifest_order_and_skips_those_held(
    hub_worker: InProcessWorker,
    hub: DockerHubEmulator,
    distribution: Distribution,
    repo_name: Callable[[], str],
) -> None:
    name = repo_name()
    image = _image(name, 3)
    push_image(distribution.url, name, image)
    config, first, held, last = _blob_digests(image)
    ctx = hub_worker.context
    assert hub_worker.run(run_fill(ctx, "hub", name, held)) == "committed"
    hub.reset_counters()
    # Slow enough that downloads running side by side would overlap.
    hub.throttle_blob(None, 1024 * KIB)

    prefetched = hub_worker.run(prefetch(ctx, "hub", name, [config, first, held, last]))

    assert [(str(digest), outcome) for digest, outcome in prefetched.outcomes] == [
        (config, "committed"),
        (first, "committed"),
        (held, "present"),
        (last, "committed"),
    ]
    gets = [r for r in hub.requests if (r.method, r.kind) == ("GET", "blob") and r.status != 401]
    assert [r.path.rsplit("/", 1)[-1] for r in gets] == [config, first, last]
    # One download at a time: each starts once the one before it is in.
    for before, after in itertools.pairwise(gets):
        assert before.duration is not None
        assert after.time >= before.time + before.duration * 0.9
    for digest in (config, first, held, last):
        assert hub_worker.run(_stored(ctx, f"hub/{name}", digest)) == image.blobs[digest]


def _queued(redis_url: str, queue: str) -> list[dict[str, Any]]:
    client = redis.Redis.from_url(redis_url)
    try:
        return [json.loads(raw) for raw in client.hvals(f"{jobs.NAMESPACE}:{queue}.msgs")]
    finally:
        client.close()


def test_the_warm_job_caches_the_tag_with_one_pull_and_asks_for_its_blobs(
    hub_worker: InProcessWorker,
    hub: DockerHubEmulator,
    distribution: Distribution,
    repo_name: Callable[[], str],
    redis_url: str,
) -> None:
    name = repo_name()
    image = _image(name, 2)
    push_image(distribution.url, name, image, tag="latest")
    ctx = hub_worker.context
    hub.reset_counters()

    assert hub_worker.run(warm_tag(ctx, "hub", name, "latest")) == "miss"
    assert hub.pulls() == 1
    tagged = hub_worker.run(ctx.repositories.resolve_tag(f"hub/{name}", "latest"))
    assert str(tagged) == image.digest
    # The new image's blobs are asked for, in manifest order, as one prefetch job.
    [message] = _queued(redis_url, jobs.PREFETCH.queue)
    assert message["actor_name"] == jobs.PREFETCH.actor
    assert message["args"] == ["hub", name, _blob_digests(image)]

    # Warm again: the tag is revalidated with a HEAD, which costs no pull.
    assert hub_worker.run(warm_tag(ctx, "hub", name, "latest")) == "hit"
    assert hub.pulls() == 1
    assert hub_worker.run(warm_tag(ctx, "nowhere", name, "latest")) == "unknown-project"


def test_enqueue_wakes_the_queue_for_an_immediate_job_and_not_for_a_delayed_one(redis_url: str) -> None:
    broker = jobs.make_broker(redis_url)
    client = redis.Redis.from_url(redis_url)
    try:
        jobs.enqueue(broker, jobs.WARM, ("hub", "library/a", "later"), delay_ms=60_000)
        assert client.llen(jobs.wake_key(jobs.WARM.queue)) == 0
        [delayed] = _queued(redis_url, dq_name(jobs.WARM.queue))
        assert (delayed["actor_name"], delayed["args"]) == (jobs.WARM.actor, ["hub", "library/a", "later"])

        jobs.enqueue(broker, jobs.WARM, ("hub", "library/a", "now"))
        assert client.llen(jobs.wake_key(jobs.WARM.queue)) == 1
        assert 0 < client.ttl(jobs.wake_key(jobs.WARM.queue)) <= jobs.WAKE_TTL_SECONDS
        [now] = _queued(redis_url, jobs.WARM.queue)
        assert (now["queue_name"], now["args"]) == (jobs.WARM.queue, ["hub", "library/a", "now"])
    finally:
        broker.close()
        client.close()


def _connections(redis_url: str) -> int:
    """Clients connected to this test's Redis database (the probe itself included)."""
    db = int(redis_url.rsplit("/", 1)[-1])
    client = redis.Redis.from_url(redis_url)
    try:
        return sum(1 for c in client.client_list() if int(c["db"]) == db)
    finally:
        client.close()


def test_the_middleware_builds_the_context_as_the_worker_boots_and_closes_it_at_shutdown(
    redis_url: str, s3_settings: S3Settings, tmp_path: Path
) -> None:
    settings = Settings(redis_url=redis_url, s3=s3_settings, data_dir=tmp_path, log_level="warning")
    broker = StubBroker()
    broker.add_middleware(AsyncIO())
    broker.add_middleware(WorkerContextMiddleware(settings))
    seen: list[tuple[str | None, int]] = []

    async def probe() -> None:
        ctx = context.current()
        await ctx.redis.set("probe", "1")
        seen.append((ctx.settings.redis_url, _connections(redis_url)))

    actor: dramatiq.Actor[[], Any] = dramatiq.actor(
        probe, broker=broker, actor_name="probe", queue_name="probe"
    )
    baseline = _connections(redis_url)
    worker = Worker(broker, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        actor.send()
        broker.join("probe", fail_fast=True)
        worker.join()
    finally:
        worker.stop()
    # The job ran with the context built from those settings, whose clients are its own...
    assert seen == [(redis_url, baseline + 1)]
    # ...and shutdown closed them.
    assert _connections(redis_url) == baseline
    with pytest.raises(RuntimeError, match="no worker context"):
        context.current()


def test_a_worker_without_storage_settings_still_boots_and_its_jobs_say_why_they_fail(
    redis_url: str, tmp_path: Path
) -> None:
    settings = Settings(redis_url=redis_url, data_dir=tmp_path, log_level="warning")
    broker = StubBroker()
    broker.add_middleware(AsyncIO())
    broker.add_middleware(WorkerContextMiddleware(settings))

    async def probe() -> None:
        context.current()

    actor: dramatiq.Actor[[], Any] = dramatiq.actor(
        probe, broker=broker, actor_name="probe", queue_name="probe", max_retries=0
    )
    worker = Worker(broker, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        actor.send()
        with pytest.raises(RuntimeError, match="no worker context: workers need s3 settings"):
            broker.join("probe", fail_fast=True)
    finally:
        worker.stop()
