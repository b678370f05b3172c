"""Real clients pulling through the cache, one per routing: project path, dockerd's
`registry-mirrors` at the root, and containerd's `hosts.toml` with `?ns=docker.io`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures.clients import ContainerdFactory, DockerdFactory, Podman, Skopeo
from tests.fixtures.proxy import StackFactory
from tests.support.dockerhub import DockerHubEmulator
from tests.support.images import Image, make_image, make_layer
from tests.support.seed import push_image

pytestmark = pytest.mark.clients


@pytest.fixture
def upstream_image(distribution, repo_name: Callable[[], str]) -> tuple[str, Image]:
    name = repo_name()
    image = make_image(
        [make_layer(size=1_000_000, seed=name), make_layer({"etc/hostname": name.encode()})], label=name
    )
    push_image(distribution.url, name, image, "1.0")
    return name, image


def test_skopeo_copies_through_the_project_path(
    cache_stack: StackFactory, hub: DockerHubEmulator, skopeo: Skopeo, upstream_image, tmp_path: Path
) -> None:
    name, image = upstream_image
    stack = cache_stack()
    layout = tmp_path / "out"
    skopeo.copy(f"docker://{stack.address}/hub/{name}:1.0", f"oci:{layout}:1.0")
    stored = {f"sha256:{p.name}": p.read_bytes() for p in (layout / "blobs" / "sha256").iterdir()}
    assert stored[image.digest] == image.manifest
    for digest, data in image.blobs.items():
        assert stored[digest] == data
    assert hub.count("GET", "manifest", status=200) == 1


def test_podman_pulls_through_the_project_path(
    cache_stack: StackFactory, podman: Podman, upstream_image
) -> None:
    name, image = upstream_image
    stack = cache_stack()
    reference = f"{stack.address}/hub/{name}:1.0"
    podman.pull(reference)
    assert podman.image_digest(reference) == image.digest


def test_dockerd_registry_mirror_pulls_official_images_without_a_prefix(
    cache_stack: StackFactory, hub: DockerHubEmulator, dockerd_factory: DockerdFactory, upstream_image
) -> None:
    name, image = upstream_image
    stack = cache_stack()
    docker = dockerd_factory(registry_mirrors=[stack.edge.url])
    short = name.removeprefix("library/")
    # What a user types; dockerd asks the mirror for /v2/library/<short>/...
    docker.run("pull", f"{short}:1.0")
    inspected = docker.inspect_image(f"{short}:1.0")
    assert any(str(d).endswith(image.digest) for d in inspected["RepoDigests"])  # type: ignore[union-attr]
    assert hub.count("GET", "manifest", status=200) >= 1


def test_containerd_hosts_toml_pulls_docker_io_through_the_namespace_query(
    cache_stack: StackFactory, hub: DockerHubEmulator, containerd_factory: ContainerdFactory, upstream_image
) -> None:
    name, image = upstream_image
    stack = cache_stack()
    ctr = containerd_factory()
    ctr.write_hosts("docker.io", stack.edge.url)
    reference = f"docker.io/{name}:1.0"
    ctr.pull(reference)
    assert ctr.images()[reference] == image.digest
    assert {image.digest, *image.blobs} <= ctr.content_digests()
    assert hub.count("GET", "manifest", status=200) == 1
