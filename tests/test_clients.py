"""The hosted registry as real clients see it: skopeo, docker (dockerd), podman and ctr."""

from __future__ import annotations

import json
import random
import re
import secrets
from pathlib import Path

import pytest

from tests.fixtures.clients import ContainerdFactory, Ctr, Docker, Podman, Skopeo, output
from tests.fixtures.edge import USERS, EdgeFactory, EdgeServer
from tests.support.images import Image, make_image, make_index, make_layer, sha256, write_oci_layout

pytestmark = pytest.mark.clients

ALICE = ("alice", USERS["alice"])
BOB = ("bob", USERS["bob"])
MIB = 1024 * 1024
# What docker, podman and skopeo print when a registry wants credentials they lack (docker
# says "no basic auth credentials" before sending anything once /v2/ challenged it).
NEEDS_AUTH = re.compile(r"unauthori[sz]ed|authentication required|no basic auth credentials", re.IGNORECASE)


def tiny_image(label: str, *, architecture: str = "amd64") -> Image:
    """A one-layer image whose blobs no other test has (the label is in layer and config)."""
    layer = make_layer({"hello.txt": f"hello {label} {architecture}\n".encode()})
    return make_image([layer], architecture=architecture, label=f"{label}-{architecture}")


def layered_image(label: str) -> Image:
    """Three layers, one of them over 5 MiB even gzipped (incompressible bytes)."""
    payload = random.Random(label).randbytes(5 * MIB + 123)
    layers = [
        make_layer({"etc/motd": f"seawall {label}\n".encode()}),
        make_layer({"opt/big.bin": payload}),
        make_layer({"opt/small.txt": label.encode() * 100}),
    ]
    image = make_image(layers, label=label)
    assert len(image.layers[1]) > 5 * MIB
    return image


def layout_blobs(layout: Path) -> dict[str, bytes]:
    """digest -> content of every blob in an OCI layout, each checked against its name."""
    blobs = {}
    for path in sorted((layout / "blobs" / "sha256").iterdir()):
        data = path.read_bytes()
        digest = f"sha256:{path.name}"
        assert sha256(data) == digest, f"{path} does not hash to its name"
        blobs[digest] = data
    return blobs


def layout_top(layout: Path) -> dict[str, object]:
    manifests = json.loads((layout / "index.json").read_text())["manifests"]
    assert len(manifests) == 1, manifests
    return dict(manifests[0])


def push_with_skopeo(
    skopeo: Skopeo, tmp_path: Path, edge: EdgeServer, image: Image, repo: str, tag: str = "v1"
) -> str:
    """Copy one image into `repo:tag` on the edge as alice; the docker:// reference."""
    layout = tmp_path / f"layout-{secrets.token_hex(3)}"
    write_oci_layout(layout, [image], tag=tag)
    ref = f"docker://{edge.address}/{repo}:{tag}"
    skopeo.copy(f"oci:{layout}:{tag}", ref, dest_creds=ALICE)
    return ref


def docker_load(docker: Docker, skopeo: Skopeo, tmp_path: Path, image: Image, name: str) -> str:
    """Put an image into dockerd without a build: skopeo writes a docker-archive, docker loads it.

    The image id, which docker derives from the config, is returned.
    """
    layout = tmp_path / f"load-{secrets.token_hex(3)}"
    write_oci_layout(layout, [image], tag="load")
    archive = tmp_path / f"{layout.name}.tar"
    skopeo.copy(f"oci:{layout}:load", f"docker-archive:{archive}:{name}", preserve_digests=False)
    loaded = docker.run("load", "--input", str(archive))
    assert name in loaded.stdout, loaded.stdout
    image_id = str(docker.inspect_image(name)["Id"])
    assert image_id == sha256(image.config), "docker changed the image config on load"
    return image_id


def test_skopeo_round_trip_keeps_blobs_and_manifest_digest(
    edge: EdgeServer, skopeo: Skopeo, tmp_path: Path
) -> None:
    image = layered_image(f"app-{secrets.token_hex(4)}")
    source = tmp_path / "source"
    write_oci_layout(source, [image], tag="v1")
    ref = f"docker://{edge.address}/local/app:v1"

    skopeo.copy(f"oci:{source}:v1", ref, dest_creds=ALICE)

    raw = skopeo.inspect(ref, raw=True).stdout
    assert raw.encode() == image.manifest, "the registry serves other manifest bytes than pushed"
    copied = tmp_path / "copied"
    skopeo.copy(ref, f"oci:{copied}:v1")
    assert layout_top(copied)["digest"] == image.digest
    assert layout_blobs(copied) == layout_blobs(source)
    assert set(layout_blobs(copied)) == {image.digest, *image.blobs}


def test_skopeo_copy_all_round_trips_a_two_platform_index(
    edge: EdgeServer, skopeo: Skopeo, tmp_path: Path
) -> None:
    label = f"multi-{secrets.token_hex(4)}"
    amd64 = tiny_image(label, architecture="amd64")
    arm64 = tiny_image(label, architecture="arm64")
    index = make_index([(amd64, "linux", "amd64"), (arm64, "linux", "arm64")])
    source = tmp_path / "source"
    write_oci_layout(source, [amd64, arm64], index=index, tag="v1")
    ref = f"docker://{edge.address}/local/multi:v1"

    skopeo.copy(f"oci:{source}:v1", ref, dest_creds=ALICE, all=True)

    assert skopeo.inspect(ref, raw=True).stdout.encode() == index
    for platform_image in (amd64, arm64):
        by_digest = f"docker://{edge.address}/local/multi@{platform_image.digest}"
        assert skopeo.inspect(by_digest, raw=True).stdout.encode() == platform_image.manifest
    copied = tmp_path / "copied"
    skopeo.copy(ref, f"oci:{copied}:v1", all=True)
    assert layout_top(copied)["digest"] == sha256(index)
    assert layout_blobs(copied) == layout_blobs(source)
    assert {sha256(index), amd64.digest, arm64.digest} <= set(layout_blobs(copied))


def test_docker_push_then_pull_gives_back_the_same_image(
    edge: EdgeServer, docker: Docker, skopeo: Skopeo, tmp_path: Path
) -> None:
    label = secrets.token_hex(4)
    image = make_image(
        [
            make_layer({"a.txt": f"a {label}".encode()}),
            make_layer({"b.bin": random.Random(label).randbytes(MIB)}),
        ],
        label=label,
    )
    image_id = docker_load(docker, skopeo, tmp_path, image, f"seawall-test/docker-{label}:built")
    repository = f"{edge.address}/local/docker-{label}"
    reference = f"{repository}:v1"

    docker.login(edge.address, *ALICE)
    docker.run("tag", f"seawall-test/docker-{label}:built", reference)
    pushed = docker.run("push", reference)
    digest = re.search(r"v1: digest: (sha256:[0-9a-f]{64})", pushed.stdout)
    assert digest, pushed.stdout
    repo_digest = f"{repository}@{digest.group(1)}"
    assert repo_digest in docker.inspect_image(reference)["RepoDigests"]  # type: ignore[operator]
    manifest = skopeo.inspect(f"docker://{reference}", raw=True).stdout.encode()
    assert sha256(manifest) == digest.group(1), "the registry's manifest is not what docker pushed"

    docker.run("rmi", "--force", image_id)
    assert image_id not in docker.image_ids()
    pulled = docker.run("pull", reference)
    assert f"Digest: {digest.group(1)}" in pulled.stdout, pulled.stdout

    after = docker.inspect_image(reference)
    assert after["Id"] == image_id
    assert repo_digest in after["RepoDigests"]  # type: ignore[operator]


def test_docker_pulls_a_public_project_anonymously(
    edge: EdgeServer, docker: Docker, skopeo: Skopeo, tmp_path: Path
) -> None:
    label = secrets.token_hex(4)
    image = tiny_image(label)
    push_with_skopeo(skopeo, tmp_path, edge, image, f"local/public-{label}")
    reference = f"{edge.address}/local/public-{label}:v1"

    pulled = docker.run("pull", reference)  # this client never logged in

    assert f"Digest: {image.digest}" in pulled.stdout, pulled.stdout
    assert docker.inspect_image(reference)["Id"] == sha256(image.config)


def test_docker_push_without_login_is_refused(
    edge: EdgeServer, docker: Docker, skopeo: Skopeo, tmp_path: Path
) -> None:
    label = secrets.token_hex(4)
    docker_load(docker, skopeo, tmp_path, tiny_image(label), f"seawall-test/anon-{label}:built")
    target = f"{edge.address}/local/anon-{label}:v1"
    docker.run("tag", f"seawall-test/anon-{label}:built", target)

    refused = docker.run("push", target, check=False)  # this client never logged in

    assert refused.returncode != 0, output(refused)
    assert NEEDS_AUTH.search(output(refused)), output(refused)
    missing = skopeo.inspect(f"docker://{target}", raw=True, creds=ALICE, check=False)
    assert missing.returncode != 0, "an anonymous push left a manifest behind"
    assert "manifest unknown" in missing.stderr, missing.stderr


def test_skopeo_push_without_credentials_is_refused(edge: EdgeServer, skopeo: Skopeo, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    write_oci_layout(layout, [tiny_image(secrets.token_hex(4))], tag="v1")
    target = f"docker://{edge.address}/local/anon-skopeo:v1"

    refused = skopeo.copy(f"oci:{layout}:v1", target, check=False)

    assert refused.returncode != 0, output(refused)
    assert NEEDS_AUTH.search(output(refused)), output(refused)
    assert skopeo.inspect(target, creds=ALICE, check=False).returncode != 0


def test_podman_pulls_public_anonymously_and_private_with_credentials(
    edge: EdgeServer, podman: Podman, skopeo: Skopeo, tmp_path: Path
) -> None:
    label = secrets.token_hex(4)
    public, private = tiny_image(f"{label}-public"), tiny_image(f"{label}-private")
    push_with_skopeo(skopeo, tmp_path, edge, public, f"local/pod-{label}")
    push_with_skopeo(skopeo, tmp_path, edge, private, f"private/pod-{label}")

    public_ref = f"{edge.address}/local/pod-{label}:v1"
    podman.pull(public_ref)
    assert podman.image_digest(public_ref) == public.digest

    private_ref = f"{edge.address}/private/pod-{label}:v1"
    refused = podman.pull(private_ref, check=False)
    assert refused.returncode != 0, output(refused)
    assert NEEDS_AUTH.search(output(refused)), output(refused)
    podman.pull(private_ref, creds=BOB)
    assert podman.image_digest(private_ref) == private.digest


def test_ctr_pulls_through_a_hosts_dir(edge: EdgeServer, ctr: Ctr, skopeo: Skopeo, tmp_path: Path) -> None:
    label = secrets.token_hex(4)
    image = tiny_image(label)
    push_with_skopeo(skopeo, tmp_path, edge, image, f"local/ctr-{label}")
    ctr.write_hosts(edge.address, edge.url)
    reference = f"{edge.address}/local/ctr-{label}:v1"

    ctr.pull(reference)

    assert ctr.images()[reference] == image.digest
    assert {image.digest, *image.blobs} <= ctr.content_digests()


def test_ctr_pulls_docker_io_names_through_a_mirror_hosts_entry(
    edge_factory: EdgeFactory,
    containerd_factory: ContainerdFactory,
    skopeo: Skopeo,
    tmp_path: Path,
) -> None:
    """hosts.toml for docker.io sends containerd to the edge, which maps `?ns=` to a project."""
    edge = edge_factory(mirror={"namespaces": {"docker.io": "local"}})
    ctr = containerd_factory()
    label = secrets.token_hex(4)
    image = tiny_image(label)
    push_with_skopeo(skopeo, tmp_path, edge, image, f"local/library/mirrored-{label}")
    ctr.write_hosts("docker.io", edge.url)
    reference = f"docker.io/library/mirrored-{label}:v1"

    ctr.pull(reference)

    assert ctr.images()[reference] == image.digest
    assert {image.digest, *image.blobs} <= ctr.content_digests()
