"""Pull-through cache: the three routings, revalidation with HEAD, fills, prefetch, indexes."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

import httpx
import pytest

from tests.fixtures.proxy import StackFactory, wait_for
from tests.support.dockerhub import DockerHubEmulator
from tests.support.images import Image, make_image, make_index, make_layer
from tests.support.seed import push_image, push_index

ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)


def pull(base_url: str, path: str, tag: str, image: Image, params: dict[str, str] | None = None) -> None:
    """What a client does: manifest by tag, then config and layers; checks every byte."""
    with httpx.Client(base_url=base_url, timeout=60) as client:
        manifest = client.get(f"/v2/{path}/manifests/{tag}", headers={"Accept": ACCEPT}, params=params)
        assert manifest.status_code == 200, manifest.text
        assert manifest.content == image.manifest
        assert manifest.headers["Docker-Content-Digest"] == image.digest
        for digest, data in image.blobs.items():
            blob = client.get(f"/v2/{path}/blobs/{digest}", params=params)
            assert blob.status_code == 200, blob.text
            assert "sha256:" + hashlib.sha256(blob.content).hexdigest() == digest
            assert blob.content == data


@pytest.fixture
def seeded(hub: DockerHubEmulator, distribution, repo_name: Callable[[], str]) -> tuple[str, Image]:
    name = repo_name()
    image = make_image([make_layer(size=300_000, seed=name), make_layer({"etc/os": name.encode()})], label=name)
    push_image(distribution.url, name, image, "1.0")
    return name, image


def test_project_path_pull_fills_from_upstream_then_hits(cache_stack: StackFactory, hub: DockerHubEmulator, seeded) -> None:
    name, image = seeded
    stack = cache_stack(tag_ttl="1h")
    pull(stack.edge.url, f"hub/{name}", "1.0", image)
    assert hub.count("GET", "manifest", status=200) == 1
    blob_gets = hub.count("GET", "blob", status=200)
    # Prefetch and the client's fill share one fetch per blob.
    assert blob_gets <= len(image.blobs)
    hub.reset_counters()
    pull(stack.edge.url, f"hub/{name}", "1.0", image)
    assert hub.count("GET") == 0 and hub.count("HEAD") == 0


def test_root_path_is_served_by_the_default_mirror_project(cache_stack: StackFactory, hub: DockerHubEmulator, seeded) -> None:
    name, image = seeded
    stack = cache_stack()
    pull(stack.edge.url, name, "1.0", image)
    # `library/x` at the root and `x` alone name the same Docker Hub image.
    short = name.removeprefix("library/")
    pull(stack.edge.url, short, "1.0", image)


def test_containerd_namespace_query_routes_to_the_mapped_project(cache_stack: StackFactory, seeded) -> None:
    name, image = seeded
    stack = cache_stack()
    pull(stack.edge.url, name, "1.0", image, params={"ns": "docker.io"})
    with httpx.Client(base_url=stack.edge.url) as client:
        unknown = client.get(f"/v2/{name}/manifests/1.0", params={"ns": "quay.io"})
    assert unknown.status_code == 404
    assert unknown.json()["errors"][0]["code"] == "NAME_UNKNOWN"
