"""Pull-through cache: the three routings, revalidation with HEAD, fills, prefetch, indexes."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable

import httpx
import pytest
import redis

from tests.fixtures.proxy import StackFactory, wait_for
from tests.support.dockerhub import DockerHubEmulator
from tests.support.images import Image, make_image, make_index, make_layer, sha256
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
            assert sha256(blob.content) == digest
            assert blob.content == data


@pytest.fixture
def seeded(hub: DockerHubEmulator, distribution, repo_name: Callable[[], str]) -> tuple[str, Image]:
    name = repo_name()
    image = make_image(
        [make_layer(size=300_000, seed=name), make_layer({"etc/os": name.encode()})], label=name
    )
    push_image(distribution.url, name, image, "1.0")
    return name, image


def test_project_path_pull_fills_from_upstream_then_hits(
    cache_stack: StackFactory, hub: DockerHubEmulator, seeded
) -> None:
    name, image = seeded
    stack = cache_stack(tag_ttl="1h")
    pull(stack.edge.url, f"hub/{name}", "1.0", image)
    assert hub.count("GET", "manifest", status=200) == 1
    blob_gets = hub.count("GET", "blob", status=200)
    # Prefetch and the client's fill share one fetch per blob.
    assert blob_gets <= len(image.blobs)
    hub.reset_counters()
    pull(stack.edge.url, f"hub/{name}", "1.0", image)
    assert hub.count("GET") == 0
    assert hub.count("HEAD") == 0


def test_root_path_is_served_by_the_default_mirror_project(
    cache_stack: StackFactory, hub: DockerHubEmulator, seeded
) -> None:
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


def push_layers(distribution, name: str, count: int, tag: str = "1.0") -> tuple[list[bytes], Image]:
    """An image of `count` random 2 MB layers, pushed to the upstream as `name:tag`."""
    layers = [make_layer(size=2_000_000, seed=f"{name}-{n}") for n in range(count)]
    image = make_image(layers, label=name)
    push_image(distribution.url, name, image, tag)
    return layers, image


def _pull_in_subprocess(args: tuple[str, str, str, bytes, dict[str, bytes]]) -> None:
    base_url, path, tag, manifest, blobs = args
    image = Image(config=b"", layers=[], manifest=manifest, blobs=blobs)
    pull(base_url, path, tag, image)


def test_concurrent_cold_pulls_reach_the_upstream_once_per_object(
    cache_stack: StackFactory, hub: DockerHubEmulator, distribution, repo_name: Callable[[], str]
) -> None:
    import concurrent.futures
    import multiprocessing

    name = repo_name()
    _, image = push_layers(distribution, name, 3, "cold")
    stack = cache_stack(workers=2)
    second_edge = stack.start_edge()
    urls = [stack.edge.url, second_edge.url]
    jobs = [(urls[i % 2], f"hub/{name}", "cold", image.manifest, image.blobs) for i in range(20)]
    # Client processes, several connections each: the pulls really are concurrent.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(4, mp_context=context) as pool:
        list(pool.map(_pull_in_subprocess, jobs))
    assert hub.count("GET", "manifest", status=200) == 1
    for digest in image.blobs:
        assert hub.count("GET", "blob", path=f"/v2/{name}/blobs/{digest}", status=200) == 1, digest


def test_cached_tag_after_ttl_is_revalidated_with_head_only(
    cache_stack: StackFactory, hub: DockerHubEmulator, seeded
) -> None:
    name, image = seeded
    stack = cache_stack(tag_ttl="0s")
    pull(stack.edge.url, f"hub/{name}", "1.0", image)
    hub.reset_counters()
    with httpx.Client(base_url=stack.edge.url) as client:
        for _ in range(10):
            response = client.get(f"/v2/hub/{name}/manifests/1.0", headers={"Accept": ACCEPT})
            assert response.status_code == 200
            assert response.content == image.manifest
    assert hub.count("GET", "manifest") == 0
    assert hub.count("HEAD", "manifest", status=200) == 10


def test_within_tag_ttl_the_upstream_is_not_asked(
    cache_stack: StackFactory, hub: DockerHubEmulator, seeded
) -> None:
    name, image = seeded
    stack = cache_stack(tag_ttl="1h")
    pull(stack.edge.url, f"hub/{name}", "1.0", image)
    hub.reset_counters()
    with httpx.Client(base_url=stack.edge.url) as client:
        for _ in range(5):
            assert client.get(f"/v2/hub/{name}/manifests/1.0").status_code == 200
    assert hub.count("HEAD", "manifest") == 0
    assert hub.count("GET", "manifest") == 0


def test_moved_tag_is_fetched_once_and_the_tag_follows(
    cache_stack: StackFactory, hub: DockerHubEmulator, distribution, seeded
) -> None:
    name, image = seeded
    stack = cache_stack(tag_ttl="0s")
    pull(stack.edge.url, f"hub/{name}", "1.0", image)
    newer = make_image([make_layer({"v2": b"2"})], label=f"{name}-v2")
    push_image(distribution.url, name, newer, "1.0")
    hub.reset_counters()
    pull(stack.edge.url, f"hub/{name}", "1.0", newer)
    assert hub.count("GET", "manifest", status=200) == 1
    # The old image stays reachable by digest.
    with httpx.Client(base_url=stack.edge.url) as client:
        old = client.get(f"/v2/hub/{name}/manifests/{image.digest}")
    assert old.status_code == 200
    assert old.content == image.manifest


def test_pulling_one_platform_of_an_index_fetches_only_that_manifest(
    cache_stack: StackFactory, hub: DockerHubEmulator, distribution, repo_name: Callable[[], str]
) -> None:
    name = repo_name()
    amd = make_image([make_layer({"amd": name.encode()})], label=f"{name}-amd64")
    arm = make_image([make_layer({"arm": name.encode()})], architecture="arm64", label=f"{name}-arm64")
    index = make_index([(amd, "linux", "amd64"), (arm, "linux", "arm64")])
    push_index(distribution.url, name, [amd, arm], index, "multi")
    stack = cache_stack()
    with httpx.Client(base_url=stack.edge.url, timeout=30) as client:
        top = client.get(f"/v2/hub/{name}/manifests/multi", headers={"Accept": ACCEPT})
        assert top.status_code == 200
        assert top.content == index
        platform = client.get(f"/v2/hub/{name}/manifests/{arm.digest}", headers={"Accept": ACCEPT})
        assert platform.status_code == 200
        assert platform.content == arm.manifest
    assert hub.count("GET", "manifest", path=f"/v2/{name}/manifests/{arm.digest}") == 1
    assert hub.count("GET", "manifest", path=f"/v2/{name}/manifests/{amd.digest}") == 0


def test_new_image_manifest_prefetches_its_blobs(
    cache_stack: StackFactory, hub: DockerHubEmulator, seeded
) -> None:
    name, image = seeded
    stack = cache_stack()
    with httpx.Client(base_url=stack.edge.url, timeout=30) as client:
        assert client.get(f"/v2/hub/{name}/manifests/1.0", headers={"Accept": ACCEPT}).status_code == 200
        # No client asks for a blob, yet the workers fetch them all.
        wait_for(lambda: hub.count("GET", "blob", status=200) >= len(image.blobs), 30, "prefetched blobs")
        wait_for(
            lambda: all(
                client.head(f"/v2/hub/{name}/blobs/{d}").headers.get("X-Seawall-Cache") is None
                for d in image.blobs
            ),
            30,
            "prefetched blobs committed",
        )
    for digest in image.blobs:
        assert hub.count("GET", "blob", path=f"/v2/{name}/blobs/{digest}", status=200) == 1


def test_prefetch_goes_blob_by_blob_and_a_client_never_waits_behind_it(
    cache_stack: StackFactory, hub: DockerHubEmulator, distribution, repo_name: Callable[[], str]
) -> None:
    name = repo_name()
    layers, image = push_layers(distribution, name, 3)
    digests = [sha256(layer) for layer in layers]
    for digest in digests:
        hub.throttle_blob(digest, 2 * 1024 * 1024)  # about a second each
    stack = cache_stack()
    with httpx.Client(base_url=stack.edge.url, timeout=60) as client:
        assert client.get(f"/v2/hub/{name}/manifests/1.0", headers={"Accept": ACCEPT}).status_code == 200
        # The last layer first: it must not wait for the prefetch to get there.
        assert client.get(f"/v2/hub/{name}/blobs/{digests[2]}").content == layers[2]
        wait_for(lambda: hub.count("GET", "blob", status=200) >= len(image.blobs), 30, "every blob fetched")
    arrivals = [
        r.path.rsplit("/", 1)[1]
        for r in hub.requests
        if (r.method, r.kind) == ("GET", "blob") and r.status in (200, 206)
    ]
    arrivals = [d for d in arrivals if d in digests]
    # One download each; the client's layer started before the prefetch reached the
    # second layer, which starts only once the first is done.
    assert sorted(arrivals) == sorted(digests)
    assert arrivals.index(digests[2]) < arrivals.index(digests[1])
    assert arrivals.index(digests[0]) < arrivals.index(digests[1])


def test_prefetch_waits_for_a_blob_a_client_is_filling_before_the_next_download(
    cache_stack: StackFactory, hub: DockerHubEmulator, distribution, repo_name: Callable[[], str]
) -> None:
    """A client pulling in order reads the first layer first: the prefetch must not split
    the upstream link with that layer's fill by starting the second one beside it."""
    name = repo_name()
    layers, _ = push_layers(distribution, name, 2)
    first, second = (sha256(layer) for layer in layers)
    hub.throttle_blob(first, 2 * 1024 * 1024)  # about a second
    stack = cache_stack()
    received: list[bytes] = []
    with httpx.Client(base_url=stack.edge.url, timeout=60) as client:
        # The client's own fill holds the first layer before the manifest starts the prefetch.
        reader = threading.Thread(
            target=lambda: received.append(client.get(f"/v2/hub/{name}/blobs/{first}").content)
        )
        reader.start()
        wait_for(lambda: hub.blob_gets(first), 10, "the client's fill of the first layer")
        assert client.get(f"/v2/hub/{name}/manifests/1.0", headers={"Accept": ACCEPT}).status_code == 200
        reader.join(30)
        wait_for(lambda: hub.blob_gets(second), 30, "the prefetch of the second layer")
        wait_for(lambda: hub.blob_gets(first)[0].duration is not None, 10, "the first download's end")
    assert received == [layers[0]]
    [first_get], [second_get] = hub.blob_gets(first), hub.blob_gets(second)
    assert first_get.duration is not None
    assert second_get.time >= first_get.time + first_get.duration - 0.05


def test_range_request_on_a_cached_blob(cache_stack: StackFactory, seeded) -> None:
    name, image = seeded
    stack = cache_stack()
    pull(stack.edge.url, f"hub/{name}", "1.0", image)
    digest, data = next(iter(image.blobs.items()))
    with httpx.Client(base_url=stack.edge.url) as client:
        part = client.get(f"/v2/hub/{name}/blobs/{digest}", headers={"Range": "bytes=10-99"})
    assert part.status_code == 206
    assert part.content == data[10:100]
    assert part.headers["Content-Range"] == f"bytes 10-99/{len(data)}"


def test_worker_metrics_count_fills_and_upstream_bytes(
    cache_stack: StackFactory, hub: DockerHubEmulator, seeded, tmp_path
) -> None:
    from services.processes import free_port

    name, image = seeded
    metrics_port = free_port()
    stack = cache_stack(
        workers=0,
        worker_metrics_listen=f"127.0.0.1:{metrics_port}",
        worker_processes=1,
        worker_threads=2,
        data_dir=str(tmp_path / "data"),
    )
    stack.start_worker(with_metrics=True)
    pull(stack.edge.url, f"hub/{name}", "1.0", image)

    def scraped() -> str:
        try:
            return httpx.get(f"http://127.0.0.1:{metrics_port}/").text
        except httpx.HTTPError:
            return ""

    # The prefetch or the client's own fill commits each blob, whichever starts first.
    def committed() -> float:
        found = re.findall(r'seawall_jobs_total\{actor="\w+",result="committed"\} ([0-9.]+)', scraped())
        return sum(float(n) for n in found)

    wait_for(lambda: committed() == len(image.blobs), 30, "worker metrics")
    text = scraped()
    assert 'seawall_upstream_bytes_total{upstream="hub"}' in text
    assert "dramatiq_messages_total" in text


def _followed(metrics_url: str | None) -> dict[str, float]:
    """seawall_fill_follow_bytes_total by source, as an edge exposes it."""
    text = httpx.get(f"{metrics_url}/metrics", timeout=10).text
    found = {}
    for line in text.splitlines():
        if line.startswith("seawall_fill_follow_bytes_total{"):
            source = line.split('source="', 1)[1].split('"', 1)[0]
            found[source] = float(line.rsplit(" ", 1)[1])
    return found


def test_edge_beside_the_worker_streams_the_spool_and_another_node_the_bucket(
    cache_stack: StackFactory, hub: DockerHubEmulator, distribution, repo_name: Callable[[], str]
) -> None:
    name = repo_name()
    near = make_layer(size=6_000_000, seed=f"{name}-near")
    far = make_layer(size=6_000_000, seed=f"{name}-far")
    image = make_image([near, far], label=name)
    push_image(distribution.url, name, image, "1.0")
    stack = cache_stack(tag_ttl="1h")
    other_node = stack.start_edge()
    digests = {data: sha256(data) for data in (near, far)}
    for data in (near, far):
        hub.throttle_blob(digests[data], 4 * 1024 * 1024)  # a fill of ~1.5 s: edges follow it

    before = _followed(stack.edge.metrics_url)
    with httpx.Client(base_url=stack.edge.url, timeout=60) as client:
        assert client.get(f"/v2/hub/{name}/blobs/{digests[near]}").content == near
    after_near = _followed(stack.edge.metrics_url)
    # In-process edges share one metrics registry: compare what each pull added. (A
    # follower may find the blob committed before its last reads: it then reads the
    # remaining bytes from the stored blob.)
    assert len(near) / 2 < after_near["spool"] - before["spool"] <= len(near)
    assert after_near["segments"] == before["segments"]

    with httpx.Client(base_url=other_node.url, timeout=60) as client:
        assert client.get(f"/v2/hub/{name}/blobs/{digests[far]}").content == far
    after_far = _followed(stack.edge.metrics_url)
    assert len(far) / 2 < after_far["segments"] - after_near["segments"] <= len(far)
    assert after_far["spool"] == after_near["spool"]

    # Committed: the worker's spool files moved into this machine's disk tier.
    cache = stack.work_dir / "data" / "cache"
    for data in (near, far):
        hex_digest = digests[data].removeprefix("sha256:")
        wait_for(lambda h=hex_digest: (cache / "blobs" / "sha256" / h).exists(), 30, "spool kept")
        assert (cache / "blobs" / "sha256" / hex_digest).read_bytes() == data
        assert not (cache / "spool" / "sha256" / hex_digest).exists()


def test_staging_waits_for_the_download_unless_a_remote_edge_follows(
    cache_stack: StackFactory,
    hub: DockerHubEmulator,
    distribution,
    repo_name: Callable[[], str],
    redis_url: str,
) -> None:
    """Only edges beside the worker follow: the bucket's segments are written after the
    download (the download keeps the CPU); an edge elsewhere needs them at once."""
    name = repo_name()
    alone, shared = make_layer(size=4_000_000, seed=f"{name}-a"), make_layer(size=4_000_000, seed=f"{name}-b")
    push_image(distribution.url, name, make_image([alone, shared], label=name), "1.0")
    stack = cache_stack(tag_ttl="1h")
    other_node = stack.start_edge()
    store = redis.Redis.from_url(redis_url)
    staged_while_filling: dict[str, list[int]] = {}

    def pull_watching(edge_urls: list[str], data: bytes) -> None:
        digest = sha256(data)
        hub.throttle_blob(digest, 2 * 1024 * 1024)  # about 2 s
        seen = staged_while_filling.setdefault(digest, [])
        results: list[bytes] = []

        def get(url: str) -> None:
            with httpx.Client(base_url=url, timeout=60) as client:
                results.append(client.get(f"/v2/hub/{name}/blobs/{digest}").content)

        threads = [threading.Thread(target=get, args=(url,)) for url in edge_urls]
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            fill = store.hgetall(f"seawall:fill:{digest}:state")
            if fill.get(b"status") == b"filling":
                seen.append(int(fill.get(b"staged") or 0))
            time.sleep(0.05)
        assert results == [data] * len(edge_urls)

    pull_watching([stack.edge.url], alone)
    pull_watching([stack.edge.url, other_node.url], shared)
    by_layer = list(staged_while_filling.values())
    assert len(by_layer[0]) > 5
    assert max(by_layer[0]) == 0  # nothing staged while only the local edge followed
    assert max(by_layer[1]) > 0  # staged during the download for the other node


def test_staging_waits_while_a_client_on_this_machine_still_reads(
    cache_stack: StackFactory,
    hub: DockerHubEmulator,
    distribution,
    repo_name: Callable[[], str],
    redis_url: str,
) -> None:
    """The download is over but a slow local client is still reading the spool: the
    bucket's segments wait for it, then the blob is committed."""
    name = repo_name()
    layer = make_layer(size=24_000_000, seed=name)
    push_image(distribution.url, name, make_image([layer], label=name), "1.0")
    digest = sha256(layer)
    stack = cache_stack(tag_ttl="1h")
    store = redis.Redis.from_url(redis_url)
    seen_while_reading: list[tuple[bytes, int]] = []
    received = bytearray()
    with (
        httpx.Client(base_url=stack.edge.url, timeout=60) as client,
        client.stream("GET", f"/v2/hub/{name}/blobs/{digest}") as response,
    ):
        for chunk in response.iter_bytes(1024 * 1024):
            received += chunk
            fill = store.hgetall(f"seawall:fill:{digest}:state")
            seen_while_reading.append((fill.get(b"status", b""), int(fill.get(b"staged") or 0)))
            time.sleep(0.1)  # a slow client: the edge waits for it to take each piece
    assert bytes(received) == layer
    # Downloaded and verified while the client was still reading, yet nothing staged.
    verified = [staged for status, staged in seen_while_reading if status == b"verified"]
    assert len(verified) > 3
    assert max(verified) == 0
    # Once the client is done, the blob is staged and committed.
    key = f"seawall:fill:{digest}:state"
    wait_for(lambda: store.hget(key, "status") == b"committed", 60, "committed after the reader left")
