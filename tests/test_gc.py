"""The storage inventory and the online garbage collection, against a real bucket and edge."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import httpx

from services.embedded import S3Server
from shared.lifecycle.inventory import (
    RepositoryView,
    StoredBlob,
    blob_bytes,
    read_blobs,
    read_repositories,
)
from shared.oci.digest import Digest
from shared.registry.blobs import BlobStore
from shared.registry.storage import ObjectStore
from shared.settings import S3Settings
from tests.fixtures.edge import USERS, EdgeFactory
from tests.support.images import OCI_MANIFEST, Image, canonical, make_image, make_index, make_layer, sha256
from tests.support.seed import push_blob, push_image, push_index, push_manifest

T = TypeVar("T")
ALICE = ("alice", USERS["alice"])
EMPTY_CONFIG = b"{}"


def make_referrer(subject: Image, label: str) -> tuple[bytes, dict[str, bytes]]:
    """A signature-like artifact whose subject is `subject`: (manifest, blobs)."""
    payload = f"signature of {subject.digest} {label}".encode()
    manifest = canonical(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": "application/vnd.example.signature",
            "config": {
                "mediaType": "application/vnd.oci.empty.v1+json",
                "digest": sha256(EMPTY_CONFIG),
                "size": len(EMPTY_CONFIG),
            },
            "layers": [
                {"mediaType": "application/vnd.example.sig", "digest": sha256(payload), "size": len(payload)}
            ],
            "subject": {"mediaType": OCI_MANIFEST, "digest": subject.digest, "size": len(subject.manifest)},
        }
    )
    return manifest, {sha256(EMPTY_CONFIG): EMPTY_CONFIG, sha256(payload): payload}


def push_referrer(base_url: str, repo: str, subject: Image, label: str) -> str:
    manifest, blobs = make_referrer(subject, label)
    with httpx.Client(base_url=base_url, auth=ALICE, timeout=60) as client:
        for digest, data in blobs.items():
            push_blob(client, repo, digest, data)
        push_manifest(client, repo, sha256(manifest), manifest, OCI_MANIFEST)
    return sha256(manifest)


def run(job: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(job)


async def _inventory(s3: S3Settings) -> tuple[dict[str, RepositoryView], dict[Digest, StoredBlob]]:
    objects = ObjectStore(s3)
    try:
        listed: list[int] = []
        views = await read_repositories(objects, BlobStore(objects), progress=listed.append)
        stored = await read_blobs(objects)
        assert sum(listed) > 0
        return views, stored
    finally:
        objects.close()


def d(text: str) -> Digest:
    return Digest.parse(text)


def test_inventory_reads_images_tags_links_and_blobs_back(
    edge_factory: EdgeFactory, s3_settings: S3Settings, s3_server: S3Server
) -> None:
    edge = edge_factory(disk_cache={"max_bytes": 0})
    shared_layer = make_layer(size=3000, seed="shared")
    first = make_image([shared_layer, make_layer(size=2000, seed="a")], label="first")
    second = make_image([shared_layer], label="second")
    loose = make_image(label="loose")
    amd, arm = make_image(label="amd"), make_image(architecture="arm64", label="arm")
    index = make_index([(amd, "linux", "amd64"), (arm, "linux", "arm64")])
    push_image(edge.url, "local/app", first, tag="v1", auth=ALICE)
    push_image(edge.url, "local/app", second, tag="v2", auth=ALICE)
    signature = push_referrer(edge.url, "local/app", first, "one")
    push_image(edge.url, "local/other", loose, tag=None, auth=ALICE)
    push_index(edge.url, "local/multi", [amd, arm], index, tag="latest", auth=ALICE)

    views, stored = run(_inventory(s3_settings))

    assert sorted(views) == ["local/app", "local/multi", "local/other"]
    app = views["local/app"]
    assert {t: digest for t, (digest, _) in app.tags.items()} == {
        "v1": d(first.digest),
        "v2": d(second.digest),
    }
    assert set(app.images) == {d(first.digest), d(second.digest), d(signature)}
    image = app.images[d(first.digest)]
    assert image.tags == ("v1",)
    assert image.blobs == (d(sha256(first.config)), *(d(sha256(layer)) for layer in first.layers))
    assert image.size == len(first.manifest)
    assert image.pushed > 0
    assert app.images[d(signature)].subject == d(first.digest)
    # The signature is reachable through its subject's tag.
    assert app.reachable(untagged=False) == {d(first.digest), d(second.digest), d(signature)}
    assert app.links[d(sha256(shared_layer))][0] == len(shared_layer)
    assert views["local/other"].reachable(untagged=False) == set()
    assert views["local/other"].reachable(untagged=True) == {d(loose.digest)}
    multi = views["local/multi"]
    assert multi.images[d(sha256(index))].children == (d(amd.digest), d(arm.digest))
    assert multi.reachable(untagged=False) == {d(sha256(index)), d(amd.digest), d(arm.digest)}

    pushed: dict[str, bytes] = {}
    for each in (first, second, loose, amd, arm):
        pushed |= each.blobs | {each.digest: each.manifest}
    pushed[sha256(index)] = index
    pushed |= make_referrer(first, "one")[1] | {signature: make_referrer(first, "one")[0]}
    assert {str(digest): blob.size for digest, blob in stored.items()} == {
        k: len(v) for k, v in pushed.items()
    }
    assert all(blob.extents for blob in stored.values())

    # The app repository's unique bytes: three manifests, two configs, a shared layer
    # counted once, the signature's empty config and payload.
    app_blobs = first.blobs | second.blobs | make_referrer(first, "one")[1]
    expected = sum(len(v) for v in app_blobs.values()) + len(first.manifest) + len(second.manifest)
    expected += len(make_referrer(first, "one")[0])
    assert blob_bytes([app], {}) == expected
