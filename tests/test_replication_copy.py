"""Copying one tag (shared/replication/copy.py) between real ends, in-process: the Docker Hub
emulator (over the session's Distribution) into a hosted project, and a hosted project
out to Distribution. Jobs run on an in-process worker's
context, against the real Redis and S3 server."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import httpx
import pytest

from shared.oci.digest import Digest
from shared.oci.manifest import parse_manifest
from shared.ratelimit import background
from shared.replication.copy import CopyResult, QuotaWait, copy_tag
from shared.replication.endpoints import Destination, LocalProject, RemoteRegistry, Source
from shared.replication.rules import ReplicationRule
from tests.fixtures.servers import InProcessWorker, WorkerFactory
from tests.support.distribution import Distribution
from tests.support.dockerhub import DockerHubEmulator
from tests.support.images import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    Image,
    canonical,
    make_image,
    make_index,
    make_layer,
    sha256,
)
from tests.support.replication import KIB, TIMEOUTS, hub_upstream, rule_endpoints, stored, tagged
from tests.support.seed import push_image, push_index

COSIGN_LAYER = "application/vnd.dev.cosign.simplesigning.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
SPDX = "application/spdx+json"


@pytest.fixture
def replicator(
    worker_factory: WorkerFactory, hub: DockerHubEmulator, distribution: Distribution
) -> InProcessWorker:
    """A worker whose upstreams are the emulator (`hub`) and Distribution itself (`dist`),
    with hosted projects `local` and `mirror`."""
    return worker_factory(
        upstreams=[
            hub_upstream(hub),
            {"name": "dist", "url": distribution.url, "flavor": "registry", **TIMEOUTS},
        ],
        projects=[{"name": "local", "type": "hosted"}, {"name": "mirror", "type": "hosted"}],
    )


async def _end(worker: InProcessWorker, name: str) -> Any:
    """The upstream named `name` as a RemoteRegistry, else the project as a LocalProject."""
    ctx = worker.context
    project = ctx.settings.project(name)
    if project is None:
        return RemoteRegistry(await ctx.upstreams.client(name))
    return LocalProject(project, ctx.blobs, ctx.repositories, ctx.objects)


def _copy(
    worker: InProcessWorker,
    ends: tuple[str, str],
    source_repository: str,
    tag: str,
    destination_repository: str,
    *,
    overwrite: bool = True,
    copy_referrers: bool = True,
    bandwidth: int | None = None,
    as_background_work: bool = False,
    log: list[str] | None = None,
) -> CopyResult:
    """Copy one tag between the ends named (upstreams or projects), as a task does; as
    background work (replication's priority with the governor) when asked."""
    lines = [] if log is None else log

    async def run() -> CopyResult:
        with background() if as_background_work else nullcontext():
            source: Source = await _end(worker, ends[0])
            destination: Destination = await _end(worker, ends[1])
            return await copy_tag(
                source,
                destination,
                source_repository,
                tag,
                destination_repository,
                overwrite=overwrite,
                copy_referrers=copy_referrers,
                bandwidth=bandwidth,
                log=lines.append,
            )

    return worker.run(run())


def _manifest_held(worker: InProcessWorker, name: str, digest: str) -> bytes | None:
    ctx = worker.context

    async def read() -> bytes | None:
        if await ctx.repositories.revision(name, Digest.parse(digest)) is None:
            return None
        return await ctx.blobs.read(Digest.parse(digest))

    return worker.run(read())


def _image(name: str, *layers: bytes, arch: str = "amd64") -> Image:
    return make_image(list(layers) or [make_layer(size=64 * KIB, seed=name)], architecture=arch, label=name)


def test_a_tag_pulled_from_docker_hub_lands_byte_for_byte_and_a_rerun_moves_nothing(
    replicator: InProcessWorker,
    hub: DockerHubEmulator,
    distribution: Distribution,
    repo_name: Callable[[], str],
) -> None:
    name = repo_name()
    image = _image(name, make_layer(size=300 * KIB, seed=name))
    push_image(distribution.url, name, image, tag="v1")
    rule = ReplicationRule(name="python", mode="pull", source="hub", destination="mirror")
    destination_repository = rule.destination_repository(name)

    async def run() -> CopyResult:
        source, destination = await rule_endpoints(replicator, rule)
        return await copy_tag(
            source,
            destination,
            name,
            "v1",
            destination_repository,
            overwrite=True,
            copy_referrers=True,
            bandwidth=None,
            log=lambda line: None,
        )

    first = replicator.run(run())
    assert (first.blobs_copied, first.blobs_present, first.manifests) == (2, 0, 1)
    assert first.bytes_moved == sum(len(data) for data in image.blobs.values())
    assert tagged(replicator, destination_repository, "v1") == image.digest
    assert _manifest_held(replicator, destination_repository, image.digest) == image.manifest
    for digest, data in image.blobs.items():
        assert stored(replicator, destination_repository, digest) == data

    hub.reset_counters()
    again = replicator.run(run())
    assert again.skipped
    assert (again.bytes_moved, again.blobs_copied, again.manifests) == (0, 0, 0)
    assert hub.count("GET", "manifest") == 0
    assert hub.count("GET", "blob") == 0


def test_a_multi_arch_index_is_copied_whole_and_shared_layers_travel_once(
    replicator: InProcessWorker, distribution: Distribution, repo_name: Callable[[], str]
) -> None:
    name = repo_name()
    base = make_layer(size=100 * KIB, seed=f"{name}-base")
    amd64 = _image(f"{name}-amd64", base, make_layer(size=20 * KIB, seed=f"{name}-a"), arch="amd64")
    # A layer listed twice in one manifest (as empty layers are) travels once too.
    own = make_layer(size=20 * KIB, seed=f"{name}-b")
    arm64 = _image(f"{name}-arm64", base, own, own, arch="arm64")
    index = make_index([(amd64, "linux", "amd64"), (arm64, "linux", "arm64")])
    push_index(distribution.url, name, [amd64, arm64], index, tag="multi")
    target = f"mirror/{name}"

    result = _copy(replicator, ("hub", "mirror"), name, "multi", target)

    assert result.manifests == 3
    assert result.blobs_copied == 5  # two configs, two own layers, the shared base once
    assert tagged(replicator, target, "multi") == sha256(index)
    assert _manifest_held(replicator, target, sha256(index)) == index
    for image in (amd64, arm64):
        assert _manifest_held(replicator, target, image.digest) == image.manifest
        for digest, data in image.blobs.items():
            assert stored(replicator, target, digest) == data


def test_blobs_another_repository_of_the_project_holds_are_mounted_not_sent(
    replicator: InProcessWorker, distribution: Distribution, repo_name: Callable[[], str]
) -> None:
    first_name, second_name = repo_name(), repo_name()
    image = _image(first_name)
    push_image(distribution.url, first_name, image, tag="v1")
    push_image(distribution.url, second_name, image, tag="v1")
    _copy(replicator, ("hub", "mirror"), first_name, "v1", f"mirror/{first_name}")

    result = _copy(replicator, ("hub", "mirror"), second_name, "v1", f"mirror/{second_name}")

    assert (result.blobs_mounted, result.blobs_copied, result.bytes_moved) == (2, 0, 0)
    for digest, data in image.blobs.items():
        assert stored(replicator, f"mirror/{second_name}", digest) == data


def test_without_overwrite_a_destination_tag_pointing_elsewhere_is_left_alone(
    replicator: InProcessWorker, distribution: Distribution, repo_name: Callable[[], str]
) -> None:
    name = repo_name()
    base = make_layer(size=50 * KIB, seed=f"{name}-base")
    old = _image(f"{name}-old", base, make_layer(size=10 * KIB, seed=f"{name}-old"))
    new = _image(f"{name}-new", base, make_layer(size=10 * KIB, seed=f"{name}-new"))
    push_image(distribution.url, name, old, tag="v1")
    _copy(replicator, ("hub", "mirror"), name, "v1", f"mirror/{name}")
    push_image(distribution.url, name, new, tag="v1")

    lines: list[str] = []
    kept = _copy(replicator, ("hub", "mirror"), name, "v1", f"mirror/{name}", overwrite=False, log=lines)
    assert kept.kept
    assert kept.manifests == 0
    assert tagged(replicator, f"mirror/{name}", "v1") == old.digest
    assert any("overwrite is off" in line for line in lines)

    moved = _copy(replicator, ("hub", "mirror"), name, "v1", f"mirror/{name}", overwrite=True)
    assert moved.manifests == 1
    # The shared layer is in the repository already: neither sent nor mounted.
    assert (moved.blobs_copied, moved.blobs_present, moved.blobs_mounted) == (2, 1, 0)
    assert tagged(replicator, f"mirror/{name}", "v1") == new.digest


def test_a_source_stream_cut_midway_resumes_from_where_it_stopped(
    replicator: InProcessWorker,
    hub: DockerHubEmulator,
    distribution: Distribution,
    repo_name: Callable[[], str],
) -> None:
    name = repo_name()
    layer = make_layer(size=600 * KIB, seed=name)
    image = _image(name, layer)
    push_image(distribution.url, name, image, tag="v1")
    # Sent in pieces, so what arrives before each cut is taken in (aiohttp drops what it
    # holds unread when the connection breaks); every GET of the layer is cut.
    hub.throttle_blob(sha256(layer), 2048 * KIB)
    hub.cut_blob_after(sha256(layer), 250 * KIB)

    result = _copy(replicator, ("hub", "mirror"), name, "v1", f"mirror/{name}")

    assert stored(replicator, f"mirror/{name}", sha256(layer)) == layer
    gets = hub.blob_gets(sha256(layer))
    assert len(gets) >= 3
    assert gets[0].range is None
    assert all(get.range is not None and get.range != "bytes=0-" for get in gets[1:])
    # Each reopen asked only for what was missing: nothing read twice.
    assert result.bytes_moved == sum(len(data) for data in image.blobs.values())


def test_a_bandwidth_cap_holds_the_copy_to_its_rate(
    replicator: InProcessWorker, distribution: Distribution, repo_name: Callable[[], str]
) -> None:
    name = repo_name()
    image = _image(name, make_layer(size=256 * KIB, seed=name))
    push_image(distribution.url, name, image, tag="v1")
    total = sum(len(data) for data in image.blobs.values())
    cap = 512 * KIB

    started = time.monotonic()
    result = _copy(
        replicator, ("hub", "mirror"), name, "v1", f"mirror/{name}", copy_referrers=False, bandwidth=cap
    )
    elapsed = time.monotonic() - started

    assert result.bytes_moved == total
    # The layer alone takes half a second at the cap (the small config hardly counts).
    assert elapsed >= 0.9 * 256 * KIB / cap


def test_a_refusal_by_the_governor_is_a_quota_wait_and_reaches_no_upstream_429(
    worker_factory: WorkerFactory,
    hub: DockerHubEmulator,
    distribution: Distribution,
    repo_name: Callable[[], str],
) -> None:
    name = repo_name()
    push_image(distribution.url, name, _image(name), tag="v1")
    hub.set_quota(limit=10, window_seconds=3600, remaining=1)
    worker = worker_factory(
        upstreams=[
            {
                "name": "hub",
                "url": hub.url,
                "flavor": "dockerhub",
                "quota": {"limit": 10, "window": "1h", "reserve": 0.2},
            }
        ],
        projects=[{"name": "mirror", "type": "hosted"}],
    )

    # Replication spends quota as background work: the last pull is the clients' reserve.
    with pytest.raises(QuotaWait) as waiting:
        _copy(worker, ("hub", "mirror"), name, "v1", f"mirror/{name}", as_background_work=True)
    assert waiting.value.reopens_at > time.time()
    assert "waiting for quota" in str(waiting.value)
    assert hub.count("GET", "manifest") == 0
    assert hub.count("GET", status=429) == 0


def _artifact(payload: bytes, *, layer_type: str, subject: tuple[str, int] | None = None) -> Image:
    """A small manifest over one payload blob: a cosign signature (no subject, found by its
    tag) or an OCI 1.1 referrer (with `subject`, found through the referrers API)."""
    config = canonical({}) if subject is not None else canonical({"architecture": "", "os": ""})
    document: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_EMPTY if subject is not None else OCI_CONFIG,
            "digest": sha256(config),
            "size": len(config),
        },
        "layers": [{"mediaType": layer_type, "digest": sha256(payload), "size": len(payload)}],
    }
    if subject is not None:
        document["artifactType"] = layer_type
        document["subject"] = {"mediaType": OCI_MANIFEST, "digest": subject[0], "size": subject[1]}
    manifest = canonical(document)
    return Image(config, [payload], manifest, {sha256(config): config, sha256(payload): payload})


def _signature_tag(digest: str) -> str:
    return digest.replace(":", "-") + ".sig"


def _push_local(worker: InProcessWorker, name: str, artifact: Image, reference: str) -> None:
    """Push into a hosted project through the stores, as the edge's upload and manifest
    PUT do: blobs verified and linked, then the manifest's bytes, revision and tag."""
    ctx = worker.context

    async def push() -> None:
        for digest, data in artifact.blobs.items():
            await ctx.blobs.commit_bytes(Digest.parse(digest), data)
            await ctx.repositories.link_blob(name, Digest.parse(digest), len(data))
        digest = Digest.parse(artifact.digest)
        await ctx.blobs.commit_bytes(digest, artifact.manifest)
        await ctx.repositories.add_revision(name, digest, parse_manifest(artifact.manifest, OCI_MANIFEST))
        if not Digest.is_digest(reference):
            await ctx.repositories.set_tag(name, reference, digest)

    worker.run(push())


def _remote_digest(client: httpx.Client, repository: str, reference: str) -> str | None:
    answer = client.head(
        f"/v2/{repository}/manifests/{reference}", headers={"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"}
    )
    return answer.headers.get("Docker-Content-Digest") if answer.status_code == 200 else None


def test_a_push_to_distribution_carries_the_image_its_signature_tag_and_its_referrers(
    replicator: InProcessWorker,
    distribution: Distribution,
    repo_name: Callable[[], str],
) -> None:
    local = f"local/{repo_name()}"
    image = _image(local)
    signature = _artifact(b'{"critical":{"image":"' + image.digest.encode() + b'"}}', layer_type=COSIGN_LAYER)
    sbom = _artifact(
        b'{"spdxVersion":"SPDX-2.3"}', layer_type=SPDX, subject=(image.digest, len(image.manifest))
    )
    # A signature of the SBOM itself: referrers of referrers travel too.
    sbom_signature = _artifact(
        b'{"critical":{"sbom":"' + sbom.digest.encode() + b'"}}', layer_type=COSIGN_LAYER
    )
    _push_local(replicator, local, image, "v1")
    _push_local(replicator, local, signature, _signature_tag(image.digest))
    _push_local(replicator, local, sbom, sbom.digest)
    _push_local(replicator, local, sbom_signature, _signature_tag(sbom.digest))
    target = f"pushed/{repo_name().rsplit('/', 1)[1]}"

    result = _copy(replicator, ("local", "dist"), local, "v1", target)

    assert result.referrers == 3
    assert result.manifests == 4
    with httpx.Client(base_url=distribution.url, timeout=60) as remote:
        assert _remote_digest(remote, target, "v1") == image.digest
        assert _remote_digest(remote, target, _signature_tag(image.digest)) == signature.digest
        assert _remote_digest(remote, target, sbom.digest) == sbom.digest
        assert _remote_digest(remote, target, _signature_tag(sbom.digest)) == sbom_signature.digest
        for artifact in (image, signature, sbom, sbom_signature):
            for digest, data in artifact.blobs.items():
                assert remote.get(f"/v2/{target}/blobs/{digest}").content == data

    again = _copy(replicator, ("local", "dist"), local, "v1", target)
    assert again.skipped
    assert (again.bytes_moved, again.manifests) == (0, 0)


def test_a_push_mounts_what_the_destination_holds_in_another_repository(
    replicator: InProcessWorker, distribution: Distribution, repo_name: Callable[[], str]
) -> None:
    first, second = f"local/{repo_name()}", f"local/{repo_name()}"
    image = _image(first, make_layer(size=100 * KIB, seed=first))
    _push_local(replicator, first, image, "v1")
    _push_local(replicator, second, image, "v1")
    targets = [f"pushed/{name.rsplit('/', 1)[1]}" for name in (first, second)]
    _copy(replicator, ("local", "dist"), first, "v1", targets[0])

    # Another task (endpoints are built afresh): the blobs are mounted from the first.
    result = _copy(replicator, ("local", "dist"), second, "v1", targets[1])

    assert (result.blobs_mounted, result.blobs_copied, result.bytes_moved) == (2, 0, 0)
    with httpx.Client(base_url=distribution.url, timeout=60) as remote:
        assert _remote_digest(remote, targets[1], "v1") == image.digest
        for digest, data in image.blobs.items():
            assert remote.get(f"/v2/{targets[1]}/blobs/{digest}").content == data
