"""Proxy cache eviction: under the cap by least recent pull, not pulled within evict_after,
shared blobs kept, the bucket shrinking, and evicted images pulled again from the upstream."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from shared.lifecycle.eviction import evict
from shared.lifecycle.guard import ReferenceGuard
from shared.lifecycle.inventory import blob_bytes, read_repositories
from shared.lifecycle.pulls import PullRecorder, image_member, pulls_key, tag_member
from shared.lifecycle.runs import LifecycleDeps
from shared.oci.digest import Digest
from shared.oci.manifest import parse_manifest
from shared.proxy.manifests import CachedManifest
from shared.registry import layout
from shared.routing import Target
from shared.settings import S3Settings
from tests.fixtures.edge import PROJECTS, EdgeServer, build_settings
from tests.fixtures.servers import InProcessWorker, WorkerFactory
from tests.support.dockerhub import DockerHubEmulator
from tests.support.images import OCI_MANIFEST, Image, make_image, make_layer
from tests.support.seed import push_image
from workers.context import WorkerContext
from workers.fills import run_fill

CAP = 1536 * 1024
ACCEPT = {"Accept": OCI_MANIFEST}
UPSTREAM = {"name": "hub", "url": "http://127.0.0.1:9", "flavor": "dockerhub"}


def _hub_project(**cache: Any) -> dict[str, Any]:
    return {"name": "hub", "type": "proxy", "public": True, "upstream": "hub", "cache": cache}


def _worker(
    worker_factory: WorkerFactory, user_hashes: dict[str, str], gc_grace: str, **cache: Any
) -> InProcessWorker:
    return worker_factory(
        upstreams=[UPSTREAM],
        projects=[*PROJECTS, _hub_project(**cache)],
        users=[{"name": n, "password_hash": h} for n, h in user_hashes.items()],
        lifecycle={"gc_grace": gc_grace},
    )


def _deps(worker: InProcessWorker) -> LifecycleDeps:
    ctx = worker.context
    return dataclasses.replace(ctx.lifecycle, guard=ReferenceGuard(ctx.redis))


async def _store(deps: LifecycleDeps, repository: str, image: Image, tag: str) -> None:
    """Store an image as the cache (or a push) does: blobs, links, manifest, revision, tag."""
    for digest, data in image.blobs.items():
        await deps.blobs.commit_bytes(Digest.parse(digest), data)
        await deps.repositories.link_blob(repository, Digest.parse(digest), len(data))
    digest = Digest.parse(image.digest)
    await deps.blobs.commit_bytes(digest, image.manifest)
    await deps.repositories.add_revision(repository, digest, parse_manifest(image.manifest, OCI_MANIFEST))
    await deps.repositories.set_tag(repository, tag, digest)


def _stored(worker: InProcessWorker, key: str) -> bool:
    return worker.run(worker.context.objects.stat(key)) is not None


def _blob(digest: str) -> str:
    return layout.blob(Digest.parse(digest))


def _digest_of(data: bytes) -> str:
    return str(Digest.of(data))


@pytest.mark.parametrize("redis_flushed", [False, True], ids=["record-kept", "redis-flushed"])
def test_image_not_pulled_within_evict_after_goes_unless_its_record_was_lost(
    worker_factory: WorkerFactory, user_hashes: dict[str, str], redis_flushed: bool
) -> None:
    worker = _worker(worker_factory, user_hashes, "0s", evict_after="1s")
    deps = _deps(worker)
    shared_layer = make_layer(size=2000, seed="evict-shared")
    old_layer = make_layer(size=3000, seed="evict-old")
    cross_layer = make_layer(size=4000, seed="evict-cross")
    old = make_image([shared_layer, old_layer, cross_layer], label="evict-old")
    new = make_image([shared_layer], label="evict-new")
    hosted = make_image([cross_layer], label="evict-hosted")
    worker.run(_store(deps, "hub/library/old", old, "latest"))
    worker.run(_store(deps, "hub/library/new", new, "latest"))
    worker.run(_store(deps, "local/app", hosted, "1.0"))

    recorder = PullRecorder(deps.redis)
    recorder.pulled("hub/library/old", Digest.parse(old.digest), "latest")
    recorder.pulled("hub/library/new", Digest.parse(new.digest), "latest")
    worker.run(recorder.flush())
    first = worker.run(evict(deps, "hub"))
    assert first.outcome == "succeeded"
    assert first.items == []

    time.sleep(1.1)
    if redis_flushed:
        worker.run(deps.redis.flushdb())
    recorder.pulled("hub/library/new", Digest.parse(new.digest), "latest")
    worker.run(recorder.flush())
    report = worker.run(evict(deps, "hub"))
    assert report.outcome == "succeeded"

    if redis_flushed:
        # The record of old's pull is gone: it may have been pulled since, so it stays.
        assert report.items == []
        assert _stored(worker, layout.tag("hub/library/old", "latest"))
        return
    assert f"hub/library/old@{old.digest}" in report.items
    assert not _stored(worker, layout.tag("hub/library/old", "latest"))
    assert not _stored(worker, layout.revision("hub/library/old", Digest.parse(old.digest)))
    assert _stored(worker, layout.tag("hub/library/new", "latest"))
    # The bucket shrinks by the blobs nothing else holds; a blob another image of the
    # project uses, or another project holds, stays.
    assert not _stored(worker, _blob(_digest_of(old_layer)))
    assert not _stored(worker, layout.layer_link("hub/library/old", Digest.parse(_digest_of(old_layer))))
    assert _stored(worker, _blob(_digest_of(shared_layer)))
    assert _stored(worker, _blob(_digest_of(cross_layer)))
    assert not _stored(worker, layout.project_blob("hub", Digest.parse(_digest_of(cross_layer))))
    assert report.deleted["blob"].bytes >= len(old_layer)


def test_a_blob_claimed_during_the_grace_period_stays_when_its_image_is_evicted(
    worker_factory: WorkerFactory, user_hashes: dict[str, str]
) -> None:
    worker = _worker(worker_factory, user_hashes, "1h", max_bytes=1)
    deps = _deps(worker)
    claimed, unclaimed = make_layer(size=2000, seed="evict-claimed"), make_layer(size=2000, seed="evict-free")
    image = make_image([claimed, unclaimed], label="evict-claims")
    worker.run(_store(deps, "hub/library/app", image, "latest"))
    assert deps.guard is not None
    # As a fill linking it for another repository would, just before the run.
    worker.run(deps.guard.claim([Digest.of(claimed)]))
    report = worker.run(evict(deps, "hub"))
    assert f"hub/library/app@{image.digest}" in report.items
    assert not _stored(worker, layout.revision("hub/library/app", Digest.parse(image.digest)))
    assert _stored(worker, _blob(_digest_of(claimed)))
    assert _stored(worker, layout.project_blob("hub", Digest.of(claimed)))
    assert not _stored(worker, _blob(_digest_of(unclaimed)))


async def _pull(ctx: WorkerContext, recorder: PullRecorder, name: str, tag: str) -> CachedManifest:
    """What a client's pull makes the cache do: the manifest through the proxy's manifest
    cache, noted as the edge notes it, then its blobs filled from the upstream (the fill
    jobs a worker runs)."""
    project = ctx.settings.project("hub")
    assert project is not None
    target = Target(project, f"hub/{name}", name)
    cached = await ctx.manifests.get(target, tag)
    recorder.pulled(target.name, cached.revision.digest, tag)
    manifest = parse_manifest(cached.body, cached.revision.media_type)
    for descriptor in manifest.blobs:
        assert await run_fill(ctx, "hub", name, str(descriptor.digest)) in ("committed", "present")
    return cached


def test_capped_cache_keeps_the_most_recently_pulled_images_and_an_evicted_one_is_fetched_again(
    hub: DockerHubEmulator,
    distribution: Any,
    repo_name: Callable[[], str],
    worker_factory: WorkerFactory,
    user_hashes: dict[str, str],
) -> None:
    # 6 distinct images of 500 kB (3 MB) under a cap of 1.5 MiB: eviction goes down to
    # 0.9 of it, which holds the two most recently pulled.
    names = [repo_name() for _ in range(6)]
    images = [(n, make_image([make_layer(size=500_000, seed=n)], label=n)) for n in names]
    with ThreadPoolExecutor(len(images)) as pool:
        list(pool.map(lambda pair: push_image(distribution.url, pair[0], pair[1], "1.0"), images))
    worker = worker_factory(
        upstreams=[{**UPSTREAM, "url": hub.url}],
        projects=[*PROJECTS, _hub_project(max_bytes=CAP)],
        users=[{"name": n, "password_hash": h} for n, h in user_hashes.items()],
        lifecycle={"gc_grace": "0s"},
    )
    deps = _deps(worker)
    recorder = PullRecorder(deps.redis)
    ctx = worker.context

    async def pull_in_order() -> None:
        # The first four at once (all of them go), then the two that stay, one after the other.
        await asyncio.gather(*(_pull(ctx, recorder, name, "1.0") for name in names[:4]))
        for name in names[4:]:
            await _pull(ctx, recorder, name, "1.0")
        await recorder.flush()

    worker.run(pull_in_order())

    evicted = sorted(f"hub/{n}@{i.digest}" for n, i in images[:4])
    dry = worker.run(evict(deps, "hub", dry_run=True))
    assert sorted(item for item in dry.items if "@" in item) == evicted
    assert all(_stored(worker, _blob(_digest_of(i.layers[0]))) for _, i in images)
    report = worker.run(evict(deps, "hub"))
    assert report.outcome == "succeeded"
    assert sorted(item for item in report.items if "@" in item) == evicted
    assert report.examined.bytes > 3_000_000
    views = worker.run(read_repositories(deps.objects, deps.blobs, project="hub"))
    held = [
        n for n, i in images if f"hub/{n}" in views and Digest.parse(i.digest) in views[f"hub/{n}"].images
    ]
    assert held == [n for n, _ in images[-2:]]
    assert report.project_bytes is not None
    assert blob_bytes(views.values(), {}) == report.project_bytes <= 0.9 * CAP
    # The bucket shrank: the evicted images' layers are gone.
    assert [n for n, i in images if _stored(worker, _blob(_digest_of(i.layers[0])))] == held

    hub.reset_counters()
    name, image = images[0]
    cached = worker.run(_pull(worker.context, recorder, name, "1.0"))
    assert cached.body == image.manifest
    assert hub.count("GET", "manifest", status=200) == 1
    assert hub.count("GET", "blob", status=200) == len(image.blobs)
    assert _stored(worker, _blob(_digest_of(image.layers[0])))


def test_the_edge_notes_pulls_of_manifests_and_flushes_them_as_it_closes(
    worker_factory: WorkerFactory, user_hashes: dict[str, str], redis_url: str, s3_settings: S3Settings
) -> None:
    worker = _worker(worker_factory, user_hashes, "1h")
    image = make_image(label="noted")
    worker.run(_store(worker.context.lifecycle, "local/app", image, "1.0"))
    with EdgeServer(build_settings(redis_url, s3_settings, user_hashes)) as edge:
        assert httpx.get(f"{edge.url}/v2/local/app/manifests/1.0", headers=ACCEPT).status_code == 200
        assert (
            httpx.head(f"{edge.url}/v2/local/app/manifests/{image.digest}", headers=ACCEPT).status_code == 200
        )
        assert httpx.get(f"{edge.url}/v2/local/app/manifests/2.0", headers=ACCEPT).status_code == 404
    recorded = worker.run(worker.context.redis.zrange(pulls_key("local"), 0, -1))
    assert sorted(recorded) == [b"local/app:1.0", f"local/app@{image.digest}".encode()]


def test_pull_times_only_move_forward_whichever_edge_flushes_last(
    worker_factory: WorkerFactory, user_hashes: dict[str, str]
) -> None:
    worker = _worker(worker_factory, user_hashes, "1h")
    redis = worker.context.redis
    digest = Digest.of(b"an image")
    earlier, later = PullRecorder(redis), PullRecorder(redis)
    earlier.pulled("hub/library/a", digest, "1.0")
    time.sleep(0.01)
    later.pulled("hub/library/a", digest, None)
    worker.run(later.flush())
    worker.run(earlier.flush())
    times = dict(worker.run(redis.zrange(pulls_key("hub"), 0, -1, withscores=True)))
    assert (
        times[image_member("hub/library/a", digest).encode()]
        > times[tag_member("hub/library/a", "1.0").encode()]
    )
