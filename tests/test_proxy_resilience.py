"""Pull-through cache under upstream trouble: stale serving, clear errors, crashed and bad fills."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable

import httpx
import pytest
from minio.error import S3Error

from services.embedded import S3Server
from shared.settings import S3Settings
from tests.fixtures.proxy import StackFactory, wait_for
from tests.support.dockerhub import DockerHubEmulator
from tests.support.images import Image, make_image, make_layer, random_bytes
from tests.support.seed import push_blob, push_image
from tests.test_proxy_pull import ACCEPT, pull

HEAD_TIMEOUT = 1.0


@pytest.fixture
def seeded(distribution, repo_name: Callable[[], str]) -> tuple[str, Image]:
    name = repo_name()
    image = make_image([make_layer(size=100_000, seed=name)], label=name)
    push_image(distribution.url, name, image, "1.0")
    return name, image


def _manifest(stack_url: str, path: str, tag: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    with httpx.Client(base_url=stack_url, timeout=30) as client:
        response = client.get(f"/v2/{path}/manifests/{tag}", headers={"Accept": ACCEPT})
    return response, time.monotonic() - started


def _start(cache_stack: StackFactory):
    return cache_stack(upstream={"head_timeout": f"{HEAD_TIMEOUT}s"})


@pytest.mark.parametrize(
    "trouble",
    ["quota-429", "abuse-429", "server-500", "stall", "stopped"],
)
def test_cached_tag_is_served_when_the_upstream_fails(
    cache_stack: StackFactory, hub: DockerHubEmulator, seeded, trouble: str
) -> None:
    name, image = seeded
    stack = _start(cache_stack)
    pull(stack.edge.url, f"hub/{name}", "1.0", image)
    if trouble == "quota-429":
        hub.fail_always(429, kind="manifest", retry_after=30)
    elif trouble == "abuse-429":
        hub.fail_always(429, kind="any", plain_text=True)
    elif trouble == "server-500":
        hub.fail_always(500, kind="manifest")
    elif trouble == "stall":
        hub.stall("manifest", 30)
    else:
        hub.stop()
    response, seconds = _manifest(stack.edge.url, f"hub/{name}", "1.0")
    assert response.status_code == 200, response.text
    assert response.content == image.manifest
    assert response.headers["X-Seawall-Cache"] == "stale"
    assert "110" in response.headers["Warning"]
    # The promise to the user: the cached copy within the upstream timeout plus a second.
    assert seconds < HEAD_TIMEOUT + 1.0
    pull(stack.edge.url, f"hub/{name}", "1.0", image)
    metrics = httpx.get(f"{stack.edge.metrics_url}/metrics").text
    assert 'seawall_requests_total{kind="manifest",project="hub",result="stale"}' in metrics


@pytest.mark.parametrize(
    ("trouble", "status", "code"),
    [
        ("quota-429", 429, "TOOMANYREQUESTS"),
        ("server-500", 502, "UPSTREAM_ERROR"),
        ("stall", 504, "UPSTREAM_TIMEOUT"),
        ("stopped", 503, "UNAVAILABLE"),
    ],
)
def test_uncached_tag_fails_with_a_clear_oci_error(
    cache_stack: StackFactory, hub: DockerHubEmulator, seeded, trouble: str, status: int, code: str
) -> None:
    name, _ = seeded
    stack = _start(cache_stack)
    if trouble == "quota-429":
        hub.fail_always(429, kind="manifest", retry_after=30)
    elif trouble == "server-500":
        hub.fail_always(500, kind="manifest")
    elif trouble == "stall":
        hub.stall("manifest", 30)
    else:
        hub.stop()
    response, seconds = _manifest(stack.edge.url, f"hub/{name}", "1.0")
    assert response.status_code == status, response.text
    error = response.json()["errors"][0]
    assert error["code"] == code
    assert "hub" in error["message"]
    if status == 429:
        assert int(response.headers["Retry-After"]) >= 1
    assert seconds < HEAD_TIMEOUT + 1.0 or trouble != "stall"


def _blob_key(digest: str) -> str:
    hex_digest = digest.removeprefix("sha256:")
    return f"blobs/sha256/{hex_digest[:2]}/{hex_digest}"


def _committed_size(s3_server: S3Server, bucket: str, digest: str) -> int | None:
    """The stored blob's size: a record of extents carries it in its metadata."""
    try:
        info = s3_server.client().stat_object(bucket, _blob_key(digest))
    except S3Error:
        return None
    recorded = (info.metadata or {}).get("x-amz-meta-seawall-size")
    return int(recorded) if recorded is not None else info.size


def test_fill_killed_midway_resumes_with_a_range_request(
    cache_stack: StackFactory,
    hub: DockerHubEmulator,
    distribution,
    repo_name: Callable[[], str],
    s3_server: S3Server,
    s3_settings: S3Settings,
) -> None:
    name = repo_name()
    size = 100 * 1024 * 1024
    layer = random_bytes(size, name)
    digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    with httpx.Client(base_url=distribution.url, timeout=120) as upstream:
        push_blob(upstream, name, digest, layer)
    stack = cache_stack()
    # Slow enough that the fill is still running when its worker dies.
    hub.throttle_blob(digest, 10 * 1024 * 1024)

    received = bytearray()
    outcome: dict[str, object] = {}

    def client_pull() -> None:
        try:
            with (
                httpx.Client(base_url=stack.edge.url, timeout=120) as client,
                client.stream("GET", f"/v2/hub/{name}/blobs/{digest}") as response,
            ):
                outcome["status"] = response.status_code
                for chunk in response.iter_bytes():
                    received.extend(chunk)
        except Exception as exc:  # reported through outcome, asserted below
            outcome["error"] = exc

    puller = threading.Thread(target=client_pull)
    puller.start()
    wait_for(lambda: len(received) > 20 * 1024 * 1024, 60, "20 MiB streamed to the client")
    stack.workers[0].kill()
    assert _committed_size(s3_server, s3_settings.bucket, digest) is None
    hub.throttle_blob(digest, None)
    stack.start_worker()
    puller.join(120)
    assert not puller.is_alive()
    assert "error" not in outcome, outcome
    assert outcome["status"] == 200
    assert bytes(received) == layer
    ranged = [r for r in hub.requests if r.kind == "blob" and r.method == "GET" and r.range]
    assert ranged, "the resumed fill must ask for the remainder only"
    start = int(ranged[-1].range.removeprefix("bytes=").split("-")[0])
    assert 0 < start < size
    wait_for(
        lambda: _committed_size(s3_server, s3_settings.bucket, digest) == len(layer), 60, "blob committed"
    )


def test_upstream_bytes_that_do_not_match_the_digest_are_never_committed(
    cache_stack: StackFactory,
    hub: DockerHubEmulator,
    distribution,
    repo_name: Callable[[], str],
    s3_server: S3Server,
    s3_settings: S3Settings,
) -> None:
    name = repo_name()
    image = make_image([make_layer(size=500_000, seed=name)], label=name)
    push_image(distribution.url, name, image, "bad")
    digest = "sha256:" + hashlib.sha256(image.layers[0]).hexdigest()
    hub.corrupt_blob(digest)
    stack = cache_stack()

    def fetch() -> None:
        with httpx.Client(base_url=stack.edge.url, timeout=60) as client:
            # Either the connection is cut before the last byte, or an error status.
            client.get(f"/v2/hub/{name}/blobs/{digest}").raise_for_status()

    with pytest.raises(httpx.HTTPError):
        fetch()
    wait_for(lambda: "fill_digest_mismatch" in stack.worker_logs(), 30, "mismatch logged")
    assert _committed_size(s3_server, s3_settings.bucket, digest) is None
    metrics = httpx.get(f"{stack.edge.metrics_url}/metrics").text
    assert "seawall_digest_mismatch_total" in metrics
