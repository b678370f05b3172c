"""Fleets: edge sites whose proxy project asks a central Seawall first and Docker Hub only
when the central one is unreachable or failing, never when it says "not found".

Every site is a Seawall of its own (its own Redis database and bucket), started in-process;
only the test that pulls blobs through the sites' edges runs a worker process per site.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from prometheus_client import REGISTRY

from services.embedded import RedisServer, S3Server
from services.processes import free_port
from shared.oci.digest import Digest
from shared.proxy.upstreams import falls_back
from shared.settings import Settings, load_settings
from shared.upstream import UpstreamFailure
from tests.fixtures import servers
from tests.fixtures.edge import EdgeServer
from tests.fixtures.proxy import WorkerProcess
from tests.fixtures.servers import InProcessWorker
from tests.support.distribution import Distribution
from tests.support.dockerhub import DockerHubEmulator
from tests.support.images import Image, make_image, make_layer, random_bytes, sha256
from tests.support.seed import push_blob, push_image
from workers.fills import run_fill

KIB = 1024
ACCEPT = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"
# The central Seawall is asked first; these bound how long a site waits on it.
CENTRAL_TIMEOUTS = {"connect_timeout": "1s", "head_timeout": "1s", "read_timeout": "5s"}


def _dockerhub(hub: DockerHubEmulator) -> dict[str, Any]:
    return {
        "name": "dockerhub",
        "url": hub.url,
        "flavor": "dockerhub",
        "connect_timeout": "2s",
        "head_timeout": "2s",
        "read_timeout": "10s",
    }


def _central(url: str) -> dict[str, Any]:
    return {"name": "central", "url": url, "flavor": "registry", "requests_per_minute": 0, **CENTRAL_TIMEOUTS}


def _proxy(upstreams: list[str]) -> dict[str, Any]:
    return {"name": "hub", "type": "proxy", "public": True, "upstreams": upstreams, "tag_ttl": "0s"}


@dataclass
class Site:
    """One Seawall: its settings, its edge (in-process), its worker (a process) if any."""

    settings: Settings
    edge: EdgeServer
    worker: WorkerProcess | None = None

    @property
    def url(self) -> str:
        return self.edge.url


SiteFactory = Callable[..., Site]


@pytest.fixture
def site_factory(redis_server: RedisServer, s3_server: S3Server, tmp_path: Path) -> Iterator[SiteFactory]:
    """Seawalls, each on a Redis database and a bucket of its own, as separate sites are."""
    sites: list[Site] = []
    buckets: list[str] = []

    def start(name: str, *, worker: bool = False, **config: Any) -> Site:
        url = f"redis://127.0.0.1:{redis_server.port}/{next(servers._databases)}"
        with redis.Redis.from_url(url) as client:
            client.flushdb()
        bucket = f"fleet-{name}-{secrets.token_hex(3)}"
        s3_server.ensure_bucket(bucket)
        buckets.append(bucket)
        s3 = s3_server.settings(bucket)
        values = {
            "listen": f"127.0.0.1:{free_port()}",
            "metrics_listen": None,
            "redis_url": url,
            "s3": {
                "endpoint": s3.endpoint,
                "access_key": s3.access_key,
                "secret_key": s3.secret_key.get_secret_value(),
                "bucket": s3.bucket,
            },
            "data_dir": str(tmp_path / name),
            # Info: the worker's readiness line is an info one.
            "log_level": "info",
            **config,
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(values, sort_keys=False))
        process = None
        if worker:
            # Spawned first and waited for by _wait_for_workers: the sites' workers boot side
            # by side, while the edges start.
            env = {**os.environ, "SEAWALL_CONFIG": str(path), "PYTHONUNBUFFERED": "1"}
            argv = [sys.executable, "-m", "dramatiq", "workers.actors", "--processes", "1", "--threads", "4"]
            process = WorkerProcess(f"{name}-worker", argv, tmp_path / f"{name}-worker.log", env=env)
        try:
            settings = load_settings(path)
            site = Site(settings, EdgeServer(settings).start(), process)
        except BaseException:
            if process is not None:
                process.kill()
            raise
        sites.append(site)
        return site

    yield start
    for site in sites:
        site.edge.stop()
        if site.worker is not None:
            site.worker.kill()  # nothing of it is kept: no need to wait for a graceful stop
    for bucket in buckets:
        with contextlib.suppress(Exception):
            s3_server.client().remove_bucket(bucket)


def _wait_for_workers(sites: list[Site]) -> None:
    """Workers start side by side; wait for each to take messages."""
    for site in sites:
        assert site.worker is not None
        site.worker.wait_ready(site.worker.ready, 60, "dramatiq worker ready")


def _fallbacks(project: str = "hub", from_upstream: str = "central", to_upstream: str = "dockerhub") -> float:
    labels = {"project": project, "from_upstream": from_upstream, "to_upstream": to_upstream}
    return REGISTRY.get_sample_value("seawall_upstream_fallback_total", labels) or 0.0


def _pull(base_url: str, path: str, tag: str, image: Image, start: threading.Barrier | None = None) -> None:
    """What a client does: the manifest by tag, then config and layers; every byte checked.

    With `start`, the first request waits for the other pulls at that barrier, so all of
    them meet the cold caches at once.
    """
    with httpx.Client(base_url=base_url, timeout=30) as client:
        if start is not None:
            start.wait(timeout=30)
        manifest = client.get(f"/v2/{path}/manifests/{tag}", headers={"Accept": ACCEPT})
        assert manifest.status_code == 200, manifest.text
        assert manifest.content == image.manifest
        for digest, data in image.blobs.items():
            blob = client.get(f"/v2/{path}/blobs/{digest}")
            assert blob.status_code == 200, blob.text
            assert blob.content == data


@pytest.fixture
def image(distribution: Distribution, repo_name: Callable[[], str]) -> tuple[str, Image]:
    """An image on the emulated Docker Hub: `library/<x>:1.0`, two layers and a config."""
    name = repo_name()
    pushed = make_image([make_layer(size=200 * KIB, seed=name), make_layer({"etc/site": name.encode()})])
    push_image(distribution.url, name, pushed, "1.0")
    return name, pushed


# The fleet: five edge sites behind one central Seawall, four pulls per site.
SITES = 5
PULLS_PER_SITE = 4


def test_concurrent_cold_pulls_over_the_sites_reach_docker_hub_once_per_object(
    site_factory: SiteFactory, hub: DockerHubEmulator, image: tuple[str, Image]
) -> None:
    name, pushed = image
    central = site_factory(
        "central",
        worker=True,
        upstreams=[_dockerhub(hub)],
        projects=[_proxy(["dockerhub"])],
        mirror={"default": "hub"},
    )
    # All six Seawalls' edges and the emulator share this process: twenty requests at once
    # on a busy two-core machine can keep a tag's HEAD at central over a second. This test
    # is about single flight (the fallback tests hold the timeouts), so a site waits longer.
    patient_central = {**_central(central.url), "head_timeout": "5s"}
    # Started one after the other from this (the main) thread: a worker spawned from a
    # pool's thread would be sent SIGTERM when that thread ends (see shared/lifetime.py),
    # and on two cores the edges start no faster side by side.
    sites = [
        site_factory(
            f"site{n}",
            worker=True,
            upstreams=[patient_central, _dockerhub(hub)],
            projects=[_proxy(["central", "dockerhub"])],
        )
        for n in range(SITES)
    ]
    _wait_for_workers([central, *sites])
    before = _fallbacks()

    pulls = SITES * PULLS_PER_SITE
    start = threading.Barrier(pulls)
    with ThreadPoolExecutor(pulls) as pool:
        list(
            pool.map(lambda n: _pull(sites[n % SITES].url, f"hub/{name}", "1.0", pushed, start), range(pulls))
        )

    assert hub.count("GET", "manifest", status=200) == 1
    for digest in pushed.blobs:
        assert len([r for r in hub.blob_gets(digest) if r.status == 200]) == 1, digest
    # No site went around central: neither its edge (counted in this process) nor its
    # worker (a process of its own, which logs each fallback).
    assert _fallbacks() == before
    for site in sites:
        assert site.worker is not None
        log = site.worker.log_path.read_text(errors="replace")
        assert "upstream_fallback" not in log, site.worker.log_tail()


def test_a_site_falls_back_to_docker_hub_at_once_when_central_is_stopped(
    site_factory: SiteFactory, hub: DockerHubEmulator, image: tuple[str, Image]
) -> None:
    name, pushed = image
    stopped_central = f"http://127.0.0.1:{free_port()}"  # nothing listens: connections are refused
    site = site_factory(
        "site",
        upstreams=[{**_central(stopped_central), "connect_timeout": "5s"}, _dockerhub(hub)],
        projects=[_proxy(["central", "dockerhub"])],
    )
    before = _fallbacks()

    started = time.monotonic()
    with httpx.Client(base_url=site.url, timeout=30) as client:
        manifest = client.get(f"/v2/hub/{name}/manifests/1.0", headers={"Accept": ACCEPT})
    elapsed = time.monotonic() - started

    assert manifest.status_code == 200, manifest.text
    assert manifest.content == pushed.manifest
    # A refused connection falls back at once, not after the central upstream's timeouts.
    assert elapsed < 5.0
    assert _fallbacks() == before + 2  # the tag's HEAD and the manifest's GET
    layer = sha256(pushed.layers[0])
    assert _fill(site, name, layer) == pushed.blobs[layer]
    assert _fallbacks() == before + 3
    assert len(hub.blob_gets(layer)) == 1


def test_a_site_falls_back_within_its_timeout_when_central_hangs(
    site_factory: SiteFactory, hub: DockerHubEmulator, image: tuple[str, Image]
) -> None:
    name, pushed = image
    with _silent_listener() as hanging_url:
        site = site_factory(
            "site",
            upstreams=[
                {**_central(hanging_url), "head_timeout": "0.5s", "read_timeout": "0.5s"},
                _dockerhub(hub),
            ],
            projects=[_proxy(["central", "dockerhub"])],
        )
        started = time.monotonic()
        with httpx.Client(base_url=site.url, timeout=30) as client:
            manifest = client.get(f"/v2/hub/{name}/manifests/1.0", headers={"Accept": ACCEPT})
        elapsed = time.monotonic() - started

    assert manifest.status_code == 200, manifest.text
    assert manifest.content == pushed.manifest
    # The tag's HEAD waits out the central upstream's head_timeout (0.5 s) and the
    # manifest's GET its read_timeout (0.5 s), each then answered by Docker Hub.
    assert 1.0 <= elapsed < 4.0
    assert hub.count("GET", "manifest", status=200) == 1


def test_a_not_found_from_central_is_final(
    site_factory: SiteFactory, hub: DockerHubEmulator, image: tuple[str, Image]
) -> None:
    name, pushed = image
    # A central registry that answers, but holds nothing: every repository is unknown there.
    central = site_factory(
        "central",
        projects=[{"name": "mirror", "type": "hosted", "public": True}],
        mirror={"default": "mirror"},
    )
    site = site_factory(
        "site",
        upstreams=[_central(central.url), _dockerhub(hub)],
        projects=[_proxy(["central", "dockerhub"])],
    )
    before = _fallbacks()

    with httpx.Client(base_url=site.url, timeout=30) as client:
        manifest = client.get(f"/v2/hub/{name}/manifests/1.0", headers={"Accept": ACCEPT})
    assert manifest.status_code == 404, manifest.text
    assert manifest.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    layer = sha256(pushed.layers[0])
    with pytest.raises(UpstreamFailure) as failure:
        _fill(site, name, layer)
    assert failure.value.kind == "not_found"
    # Docker Hub holds the image, and was never asked.
    assert hub.count("HEAD") == hub.count("GET") == 0
    assert _fallbacks() == before


def test_a_fill_cut_off_by_the_first_upstream_resumes_from_the_next(
    site_factory: SiteFactory,
    hub: DockerHubEmulator,
    distribution: Distribution,
    repo_name: Callable[[], str],
) -> None:
    name = repo_name()
    data = random_bytes(600 * KIB, name)
    digest = sha256(data)
    with httpx.Client(base_url=distribution.url, timeout=60) as upstream:
        push_blob(upstream, name, digest, data)
    with DockerHubEmulator(distribution.url) as first:
        # Sent in pieces, so the fill takes in what arrives before the cut.
        first.throttle_blob(digest, 1024 * KIB)
        first.cut_blob_after(digest, 200 * KIB)
        site = site_factory(
            "site",
            upstreams=[{**_dockerhub(first), "name": "central"}, _dockerhub(hub)],
            projects=[_proxy(["central", "dockerhub"])],
        )
        before = _fallbacks()
        assert _fill(site, name, digest) == data
        assert len(first.blob_gets(digest)) == 1

    assert _fallbacks() == before + 1
    # Docker Hub was asked only for what the cut-off download had not staged (the
    # whole-blob GET a fill sends early is dropped).
    ranges = [r.range for r in hub.blob_gets(digest) if r.range]
    assert len(ranges) == 1
    resumed_from = int(ranges[0].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_from <= 200 * KIB


def _fill(site: Site, repository: str, digest: str) -> bytes:
    """Run the site's fill job in-process (as its worker would) and read the stored blob."""
    worker = InProcessWorker(site.settings)
    try:
        worker.run(run_fill(worker.context, "hub", repository, digest))

        async def stored() -> bytes:
            return b"".join([chunk async for chunk in worker.context.blobs.stream(Digest.parse(digest))])

        return worker.run(stored())
    finally:
        worker.close()


@contextlib.contextmanager
def _silent_listener() -> Iterator[str]:
    """A registry that accepts connections and never answers: a hung central Seawall."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                held.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for connection in held:
            connection.close()
        listener.close()


@pytest.mark.parametrize(
    ("kind", "status", "next_asked"),
    [
        ("refused", None, True),
        ("network", None, True),
        ("timeout", None, True),
        ("status", 503, True),
        ("status", 200, True),  # a body that does not match its digest
        ("quota", 429, True),
        ("abuse", 429, True),
        ("governor", None, True),
        ("not_found", 404, False),
        ("status", 404, False),
        ("status", 403, False),
        ("auth", 401, False),
    ],
)
def test_only_an_unreachable_or_failing_upstream_sends_a_chain_on(
    kind: str, status: int | None, next_asked: bool
) -> None:
    assert falls_back(UpstreamFailure(kind, "what happened", upstream="central", status=status)) is next_asked


@pytest.mark.parametrize(
    ("project", "message"),
    [
        ({"upstream": "a", "upstreams": ["b"]}, "sets both upstream and upstreams"),
        ({"upstreams": ["a", "a"]}, "names an upstream twice"),
        ({"upstreams": ["a", "nope"]}, "names unknown upstream 'nope'"),
        ({"upstreams": []}, "needs an upstream"),
    ],
)
def test_upstreams_are_checked(project: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings(
            upstreams=[
                {"name": "a", "url": "http://127.0.0.1:1"},
                {"name": "b", "url": "http://127.0.0.1:2"},
            ],
            projects=[{"name": "hub", "type": "proxy", **project}],
        )


def test_upstream_is_the_shorthand_for_a_list_of_one() -> None:
    settings = Settings(
        upstreams=[{"name": "a", "url": "http://127.0.0.1:1"}],
        projects=[{"name": "hub", "type": "proxy", "upstream": "a"}],
    )
    project = settings.project("hub")
    assert project is not None
    assert project.upstreams == ["a"]
    # One form to serve and edit: what is read back loads again.
    assert type(project).model_validate(project.model_dump()).upstreams == ["a"]
