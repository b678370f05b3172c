"""Project storage quotas (shared/lifecycle/usage.py): a hosted project's pushes are counted by
the unique bytes its manifests reference, and one that would take it over is refused."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from pydantic import ByteSize
from redis.asyncio import Redis

from shared.lifecycle.inventory import read_repositories
from shared.lifecycle.usage import UsageLedger
from shared.oci.digest import Digest
from shared.registry import layout
from shared.registry.blobs import BlobStore
from shared.registry.storage import ObjectStore
from shared.settings import S3Settings, Settings
from tests.fixtures.clients import Skopeo, output
from tests.fixtures.edge import PROJECTS, USERS, EdgeFactory, EdgeServer
from tests.support.images import OCI_MANIFEST, Image, make_image, make_layer, write_oci_layout
from tests.support.seed import push_blob

ALICE = ("alice", USERS["alice"])
QUOTA = 100 * 1024
QUOTED: dict[str, Any] = {
    "name": "quoted",
    "type": "hosted",
    "public": True,
    "push": ["alice"],
    "delete": ["alice"],
    "quota": QUOTA,
}


def image_of(seed: str, size: int = 60 * 1024) -> Image:
    return make_image([make_layer(size=size, seed=seed)], label=seed)


def human(n: int) -> str:
    return ByteSize(n).human_readable()


def footprint(*images: Image) -> int:
    """Unique bytes: each image's manifest, config and layers, a shared blob once."""
    held: dict[str, int] = {}
    for image in images:
        held[image.digest] = len(image.manifest)
        held.update({digest: len(data) for digest, data in image.blobs.items()})
    return sum(held.values())


def push(client: httpx.Client, repo: str, image: Image, tag: str) -> httpx.Response:
    for digest, data in image.blobs.items():
        push_blob(client, repo, digest, data)
    return client.put(
        f"/v2/{repo}/manifests/{tag}", content=image.manifest, headers={"Content-Type": OCI_MANIFEST}
    )


def usage(settings: Settings, project: str = "quoted") -> int:
    async def read() -> int:
        assert settings.redis_url is not None
        assert settings.s3 is not None
        client = Redis.from_url(settings.redis_url)
        objects = ObjectStore(settings.s3)
        try:
            return await UsageLedger(client, settings, objects, BlobStore(objects)).usage(project)
        finally:
            await client.aclose()
            objects.close()

    return asyncio.run(read())


def stored(s3: S3Settings, key: str) -> bool:
    async def stat() -> bool:
        objects = ObjectStore(s3)
        try:
            return await objects.stat(key) is not None
        finally:
            objects.close()

    return asyncio.run(stat())


def flush(url: str) -> None:
    with redis.Redis.from_url(url) as direct:
        direct.flushdb()


@pytest.fixture
def quoted_edge(edge_factory: EdgeFactory) -> EdgeServer:
    return edge_factory(projects=[*PROJECTS, QUOTED])


def test_a_push_over_the_quota_is_denied_with_nothing_of_it_referenced(
    quoted_edge: EdgeServer, s3_settings: S3Settings
) -> None:
    first, second = image_of("first"), image_of("second")
    with httpx.Client(base_url=quoted_edge.url, auth=ALICE, timeout=30) as client:
        assert push(client, "quoted/app", first, "v1").status_code == 201
        assert usage(quoted_edge.settings) == footprint(first)

        refused = push(client, "quoted/app", second, "v2")
        assert refused.status_code == 403, refused.text
        error = refused.json()["errors"][0]
        assert error["code"] == "DENIED"
        used, needs = footprint(first), footprint(second)
        assert error["message"] == (
            f"project quoted is over its quota: {human(used)} ({used} bytes) of 100.0KiB"
            f" ({QUOTA} bytes) used, this push needs {human(needs)} ({needs} bytes) more"
        )
        assert error["detail"]["needs"] == footprint(second)

        # Nothing of it is referenced: no revision, no tag; the usage did not move.
        assert client.get(f"/v2/quoted/app/manifests/{second.digest}").status_code == 404
        assert client.get("/v2/quoted/app/manifests/v2").status_code == 404
        assert not stored(s3_settings, layout.tag("quoted/app", "v2"))
        assert not stored(s3_settings, layout.revision("quoted/app", Digest.parse(second.digest)))
        assert usage(quoted_edge.settings) == footprint(first)

        # After the first image is deleted, the same push fits.
        assert client.delete(f"/v2/quoted/app/manifests/{first.digest}").status_code == 202
        assert usage(quoted_edge.settings) == 0
        assert push(client, "quoted/app", second, "v2").status_code == 201
        assert usage(quoted_edge.settings) == footprint(second)


def test_a_re_push_and_shared_blobs_cost_nothing_more(quoted_edge: EdgeServer) -> None:
    base = make_layer(size=50 * 1024, seed="base")
    one = make_image([base, make_layer({"one.txt": b"1"})], label="one")
    two = make_image([base, make_layer({"two.txt": b"2"})], label="two")
    with httpx.Client(base_url=quoted_edge.url, auth=ALICE, timeout=30) as client:
        assert push(client, "quoted/app", one, "one").status_code == 201
        assert push(client, "quoted/other", two, "two").status_code == 201
        counted = usage(quoted_edge.settings)
        assert counted == footprint(one, two) < 2 * len(base)  # the base layer once
        # The same manifest again, by tag, by digest, in the same repository: free.
        assert push(client, "quoted/app", one, "again").status_code == 201
        assert push(client, "quoted/app", one, one.digest).status_code == 201
        assert usage(quoted_edge.settings) == counted
        # Deleting one image keeps the base layer counted for the other.
        assert client.delete(f"/v2/quoted/app/manifests/{one.digest}").status_code == 202
        assert usage(quoted_edge.settings) == footprint(two)


def test_a_flushed_ledger_is_rebuilt_from_the_bucket_with_the_same_figure(
    quoted_edge: EdgeServer, redis_url: str
) -> None:
    first, second = image_of("kept", size=30 * 1024), image_of("refused", size=80 * 1024)
    with httpx.Client(base_url=quoted_edge.url, auth=ALICE, timeout=30) as client:
        assert push(client, "quoted/app", first, "v1").status_code == 201
        assert push(client, "quoted/app", first, "latest").status_code == 201
        counted = usage(quoted_edge.settings)
        assert counted == footprint(first)
        flush(redis_url)
        assert usage(quoted_edge.settings) == counted
        flush(redis_url)
        # A push finding no ledger rebuilds it before checking, so the quota still holds.
        refused = push(client, "quoted/app", second, "v2")
        assert refused.status_code == 403, refused.text
        assert usage(quoted_edge.settings) == counted


@pytest.mark.clients
def test_skopeo_is_refused_over_the_quota_and_told_why(
    quoted_edge: EdgeServer, skopeo: Skopeo, tmp_path: Path
) -> None:
    for name, image in [("fits", image_of("fits")), ("over", image_of("over"))]:
        directory = tmp_path / name
        write_oci_layout(directory, [image], tag=name)
        result = skopeo.copy(
            f"oci:{directory}:{name}",
            f"docker://{quoted_edge.address}/quoted/app:{name}",
            dest_creds=ALICE,
            check=name == "fits",
        )
    assert result.returncode != 0
    assert "project quoted is over its quota" in output(result)
    assert "100.0KiB" in output(result)


def test_a_rebuild_keeps_what_was_pushed_or_deleted_while_it_read_the_bucket(
    quoted_edge: EdgeServer, s3_settings: S3Settings, redis_url: str
) -> None:
    early, late, gone = image_of("early", 10_000), image_of("late", 10_000), image_of("gone", 10_000)
    settings = quoted_edge.settings
    with httpx.Client(base_url=quoted_edge.url, auth=ALICE, timeout=30) as client:
        assert push(client, "quoted/app", early, "early").status_code == 201
        assert push(client, "quoted/app", gone, "gone").status_code == 201

        async def rebuild_around(change: Callable[[], None]) -> int:
            client_ = Redis.from_url(redis_url)
            objects = ObjectStore(s3_settings)
            try:
                ledger = UsageLedger(client_, settings, objects, BlobStore(objects))
                views = await read_repositories(objects, BlobStore(objects), project="quoted")
                await asyncio.to_thread(change)  # while the "listing" is in hand
                return await ledger.rebuild("quoted", views)
            finally:
                await client_.aclose()
                objects.close()

        def push_and_delete() -> None:
            assert push(client, "quoted/app", late, "late").status_code == 201
            assert client.delete(f"/v2/quoted/app/manifests/{gone.digest}").status_code == 202

        assert asyncio.run(rebuild_around(push_and_delete)) == footprint(early, late)
        assert usage(settings) == footprint(early, late)
