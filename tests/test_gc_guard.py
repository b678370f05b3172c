"""The reference guard between online collection and concurrent writes (shared/lifecycle/guard.py):
its interleavings against a real Redis, and a manifest PUT racing a condemned blob end to end."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import pytest
from redis.asyncio import Redis

from services.embedded import RedisServer
from shared import redisguard
from shared.lifecycle import guard as guard_module
from shared.lifecycle.guard import ClaimsLost, ReferenceGuard
from shared.lifecycle.runs import LIFECYCLE_LEASE, exclusive
from shared.oci.digest import Digest
from shared.oci.errors import RegistryError
from shared.registry import layout
from shared.registry.storage import ObjectStore
from shared.settings import S3Settings
from tests.fixtures.edge import USERS, EdgeServer
from tests.support.images import OCI_MANIFEST, make_image, sha256
from tests.support.processes import paused
from tests.support.seed import push_blob

A = Digest.of(b"a")
B = Digest.of(b"b")


@asynccontextmanager
async def connected(url: str) -> AsyncIterator[tuple[Redis, ReferenceGuard]]:
    redis = Redis.from_url(url)
    try:
        yield redis, ReferenceGuard(redis)
    finally:
        await redis.aclose()


def test_a_claim_before_condemn_keeps_the_digest(redis_url: str) -> None:
    async def scenario() -> None:
        async with connected(redis_url) as (redis, guard), exclusive(redis, "gc"):
            since = time.time() - 1
            assert await guard.claim([A]) == set()
            assert await guard.condemn("run1", [A, B], since) == {B}
            # A is no longer condemned: a claim of it neither waits nor is told to look again.
            assert await guard.claim([A]) == set()
            await guard.deleted("run1", [B])
            assert await guard.claim([B]) == {B}

    asyncio.run(scenario())


def test_a_claim_older_than_since_does_not_protect(redis_url: str) -> None:
    async def scenario() -> None:
        async with connected(redis_url) as (redis, guard), exclusive(redis, "gc"):
            await guard.claim([A])
            assert await guard.condemn("run1", [A], since=time.time() + 1) == {A}
            assert await guard.release("run1") == 1

    asyncio.run(scenario())


def test_a_claim_of_a_condemned_digest_waits_for_its_deletion_and_reports_it(redis_url: str) -> None:
    async def scenario() -> None:
        async with connected(redis_url) as (redis, guard), exclusive(redis, "gc"):
            assert await guard.condemn("run1", [A], time.time() - 1) == {A}
            claiming = asyncio.create_task(guard.claim([A]))
            await asyncio.sleep(0.3)
            assert not claiming.done(), "claim went ahead while the blob was being deleted"
            await guard.deleted("run1", [A])
            assert await asyncio.wait_for(claiming, 2) == {A}
            # A later run sees the claim made while it waited.
            assert await guard.condemn("run2", [A], time.time() - 5) == set()

    asyncio.run(scenario())


def test_a_claim_waiting_on_a_released_condemnation_reports_it_for_a_recheck(redis_url: str) -> None:
    async def scenario() -> None:
        async with connected(redis_url) as (redis, guard), exclusive(redis, "gc"):
            await guard.condemn("run1", [A], time.time() - 1)
            claiming = asyncio.create_task(guard.claim([A, B]))
            await asyncio.sleep(0.2)
            assert await guard.release("run1") == 1
            assert await asyncio.wait_for(claiming, 2) == {A}

    asyncio.run(scenario())


def test_a_claim_gives_up_with_unavailable_when_a_deletion_never_ends(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guard_module, "CLAIM_PATIENCE_SECONDS", 0.3)

    async def scenario() -> None:
        async with connected(redis_url) as (redis, guard), exclusive(redis, "gc"):
            await guard.condemn("run1", [A], time.time() - 1)
            with pytest.raises(RegistryError) as refused:
                await guard.claim([A])
            assert refused.value.code == "UNAVAILABLE"

    asyncio.run(scenario())


def test_a_killed_runs_condemnation_lapses(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        async with connected(redis_url) as (redis, guard), exclusive(redis, "gc"):
            await guard.condemn("killed", [A, B], time.time() - 1)
            monkeypatch.setattr(guard_module, "STALE_CONDEMNED_SECONDS", -1.0)
            # Abandoned: reported for a re-check at once, without waiting.
            assert await asyncio.wait_for(guard.claim([A]), 1) == {A}
            # A new run clears the others' old marks as it condemns.
            await guard.condemn("next", [Digest.of(b"c")], time.time() - 1)
            assert not await redis.hexists(guard_module.CONDEMNED, str(B))

    asyncio.run(scenario())


def test_a_condemnation_lapses_with_the_lease_of_the_run_that_made_it(redis_url: str) -> None:
    async def scenario() -> None:
        async with connected(redis_url) as (redis, guard):
            async with exclusive(redis, "gc"):
                await guard.condemn("killed", [A, B], time.time() - 1)
                # A killed run's lease lapses (its TTL); here it is gone at once.
                await redis.delete(LIFECYCLE_LEASE)
                assert await asyncio.wait_for(guard.claim([A]), 1) == {A}
            async with exclusive(redis, "gc"):
                # The next holder's run clears the marks of runs that no longer hold it.
                await guard.condemn("next", [Digest.of(b"c")], time.time() - 1)
                assert not await redis.hexists(guard_module.CONDEMNED, str(B))

    asyncio.run(scenario())


def test_condemn_refuses_without_the_lifecycle_lease(redis_url: str) -> None:
    async def scenario() -> None:
        async with connected(redis_url) as (redis, guard):
            async with exclusive(redis, "gc"):
                await guard.claim([A])
                await redis.delete(LIFECYCLE_LEASE)  # what a flush does
                with pytest.raises(ClaimsLost):
                    await guard.condemn("run1", [B], time.time() - 1)
            assert not await redis.exists(guard_module.CONDEMNED)

    asyncio.run(scenario())


def test_recently_claimed_and_trimming(redis_url: str) -> None:
    async def scenario() -> None:
        async with connected(redis_url) as (redis, guard), exclusive(redis, "gc"):
            await guard.claim([A])
            await redis.zadd(guard_module.CLAIMED, {str(B): time.time() - 100})
            assert await guard.recently_claimed([A, B], time.time() - 10) == {A}
            # A run with a grace of 10 s trims claims older than twice that.
            await guard.condemn("run1", [Digest.of(b"c")], time.time() - 10)
            assert await redis.zscore(guard_module.CLAIMED, str(B)) is None
            assert await redis.zscore(guard_module.CLAIMED, str(A)) is not None

    asyncio.run(scenario())


def test_claim_returns_nothing_when_redis_is_away(own_redis: RedisServer) -> None:
    async def scenario() -> None:
        redis = redisguard.connect(f"redis://127.0.0.1:{own_redis.port}/0", 0.2)
        try:
            guard = ReferenceGuard(redis)
            assert await guard.claim([A]) == set()
            with paused(own_redis.pid) as started:
                assert await guard.claim([A, B]) == set()
                assert time.monotonic() - started < 2
        finally:
            await redis.aclose()

    asyncio.run(scenario())


@pytest.mark.parametrize("condemned_first", [True, False])
def test_a_manifest_put_racing_a_condemned_blob_never_leaves_a_missing_blob(
    edge_factory: Callable[..., EdgeServer],
    redis_url: str,
    s3_settings: S3Settings,
    condemned_first: bool,
) -> None:
    """Condemned first: the PUT's claim waits for the deletion, then finds the layer gone
    (MANIFEST_BLOB_UNKNOWN). Claimed first: the collection keeps the layer, the PUT stores."""
    edge = edge_factory()
    image = make_image()
    layer = Digest.parse(sha256(image.layers[0]))
    auth = ("alice", USERS["alice"])
    with httpx.Client(base_url=edge.url, auth=auth, timeout=30) as client:
        for digest, data in image.blobs.items():
            push_blob(client, "local/raced", digest, data)

        def put() -> httpx.Response:
            return client.put(
                "/v2/local/raced/manifests/v1",
                content=image.manifest,
                headers={"Content-Type": OCI_MANIFEST},
            )

        async def race() -> tuple[httpx.Response, set[Digest], bool]:
            objects = ObjectStore(s3_settings)
            try:
                async with connected(redis_url) as (redis, guard), exclusive(redis, "gc"):
                    # The run starts after the pushes of the blobs (their claims are older).
                    await asyncio.sleep(0.05)
                    since = time.time()
                    if condemned_first:
                        safe = await guard.condemn("run1", [layer], since)
                        putting = asyncio.ensure_future(asyncio.to_thread(put))
                        await asyncio.sleep(0.5)
                        assert not putting.done(), "the PUT went ahead while its layer was condemned"
                    else:
                        putting = asyncio.ensure_future(asyncio.to_thread(put))
                        async with asyncio.timeout(10):  # until the PUT has claimed the layer
                            while (await redis.zscore(guard_module.CLAIMED, str(layer)) or 0) < since:  # noqa: ASYNC110
                                await asyncio.sleep(0.01)
                        safe = await guard.condemn("run1", [layer], since)
                    for found in safe:
                        await objects.delete_many([layout.blob(found)])
                        await guard.deleted("run1", [found])
                    response = await putting
                stored = await objects.stat(layout.blob(layer)) is not None
            finally:
                objects.close()
            return response, safe, stored

        response, deleted, stored = asyncio.run(race())
        if response.status_code == 201:
            assert stored, "a manifest was stored whose layer was deleted"
            assert not deleted
            assert client.get(f"/v2/local/raced/blobs/{layer}").content == image.layers[0]
        else:
            assert response.status_code == 404, response.text
            assert response.json()["errors"][0]["code"] == "MANIFEST_BLOB_UNKNOWN"
            assert not stored
            assert deleted == {layer}
            assert client.get("/v2/local/raced/manifests/v1").status_code == 404
        assert (response.status_code == 201) is (not condemned_first)


def test_a_blob_collected_long_ago_is_uploaded_again_whatever_the_edge_remembers(
    edge_factory: Callable[..., EdgeServer], s3_settings: S3Settings
) -> None:
    """A deletion older than the guard reports (a day) must not leave a process trusting the
    placement it remembered from before: the re-push writes the blob again."""
    edge = edge_factory()
    image = make_image()
    layer = Digest.parse(sha256(image.layers[0]))
    with httpx.Client(base_url=edge.url, auth=("alice", USERS["alice"]), timeout=30) as client:
        for digest, data in image.blobs.items():
            push_blob(client, "local/old", digest, data)
        assert client.get(f"/v2/local/old/blobs/{layer}").content == image.layers[0]  # remembered

        async def collect_long_ago() -> None:
            # What a collection did to the layer, with no record of it left in Redis.
            objects = ObjectStore(s3_settings)
            try:
                doomed = [layout.blob(layer), layout.layer_link("local/old", layer)]
                doomed.append(layout.project_blob("local", layer))
                doomed += await objects.list_keys(f"blobdata/{layer.algorithm}/{layer.hex}/")
                await objects.delete_many(doomed)
            finally:
                objects.close()

        asyncio.run(collect_long_ago())
        push_blob(client, "local/old", str(layer), image.layers[0])
        response = client.put(
            "/v2/local/old/manifests/v1", content=image.manifest, headers={"Content-Type": OCI_MANIFEST}
        )
        assert response.status_code == 201, response.text
        assert client.get(f"/v2/local/old/blobs/{layer}").content == image.layers[0]

        async def in_bucket() -> bool:
            objects = ObjectStore(s3_settings)
            try:
                return await objects.stat(layout.blob(layer)) is not None
            finally:
                objects.close()

        # In the bucket, not only in the edge's disk tier.
        assert asyncio.run(in_bucket()), "the re-pushed layer was not written again"
