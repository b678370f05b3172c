"""The rate-limit governor against the Docker Hub emulator with a quota of 5 pulls a window."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sys
import time
from collections.abc import Callable

import httpx
import pytest
from click.testing import CliRunner
from redis.asyncio import Redis

from services.cli import main as seawall
from services.processes import ManagedProcess, free_port, port_open, wait_until
from services.quota import enqueue_warm
from shared.ratelimit import Governor
from shared.settings import load_settings
from tests.fixtures.proxy import CacheStack, StackFactory, wait_for
from tests.support.dockerhub import DockerHubEmulator
from tests.support.images import make_image, make_layer
from tests.support.seed import push_image
from tests.test_proxy_pull import ACCEPT

QUOTA = {"limit": 5, "window": "6h"}


@pytest.fixture
def images(distribution, repo_name: Callable[[], str]) -> Callable[[int], list[str]]:
    """Push n small images upstream; their names."""

    def push(count: int) -> list[str]:
        names = []
        for _ in range(count):
            name = repo_name()
            push_image(
                distribution.url, name, make_image([make_layer({"id": name.encode()})], label=name), "1.0"
            )
            names.append(name)
        return names

    return push


def get_manifest(base_url: str, name: str, tag: str = "1.0") -> httpx.Response:
    with httpx.Client(base_url=base_url, timeout=30) as client:
        return client.get(f"/v2/hub/{name}/manifests/{tag}", headers={"Accept": ACCEPT})


def governor_status(stack: CacheStack):
    settings = load_settings(stack.config_path)

    async def read():
        redis = Redis.from_url(settings.redis_url)
        try:
            return await Governor(redis, settings.upstreams[0]).status()
        finally:
            await redis.aclose()

    return asyncio.run(read())


def test_uncached_pulls_beyond_the_quota_never_reach_the_upstream(
    cache_stack: StackFactory, hub: DockerHubEmulator, images
) -> None:
    hub.set_quota(limit=5, window_seconds=21600)
    stack = cache_stack(upstream={"quota": QUOTA})
    # Counters are per process, and other tests in this one may have refused pulls too.
    denied = 'seawall_quota_denied_total{priority="client",upstream="hub"} '

    def denied_so_far() -> float:
        text = httpx.get(f"{stack.edge.metrics_url}/metrics").text
        return float(next(line for line in text.splitlines() if line.startswith(denied)).split()[-1])

    denied_before = denied_so_far()
    names = images(10)
    answers = [get_manifest(stack.edge.url, name) for name in names]
    assert [a.status_code for a in answers] == [200] * 5 + [429] * 5
    refused = answers[-1].json()["errors"][0]
    assert refused["code"] == "TOOMANYREQUESTS"
    assert "hub" in refused["message"]
    assert "refills" in refused["message"]
    assert int(answers[-1].headers["Retry-After"]) > 0
    assert hub.count("GET", "manifest") == 5
    assert hub.count("GET", "manifest", status=429) == 0
    # The cached ones keep pulling: revalidation is a HEAD, which costs nothing.
    for name in names[:5]:
        assert get_manifest(stack.edge.url, name).status_code == 200
    assert hub.count("GET", "manifest") == 5
    metrics = httpx.get(f"{stack.edge.metrics_url}/metrics").text
    assert denied_so_far() == denied_before + 5
    assert 'seawall_quota_remaining{upstream="hub"} 0.0' in metrics


def test_two_edges_and_two_workers_share_one_bucket(
    cache_stack: StackFactory, hub: DockerHubEmulator, images, tmp_path
) -> None:
    hub.set_quota(limit=5, window_seconds=21600)
    stack = cache_stack(workers=2, upstream={"quota": {**QUOTA, "reserve": 0.0}})
    port = free_port()
    other_edge = ManagedProcess(
        "edge-2",
        [sys.executable, "-m", "services.edge", "--config", str(stack.config_path)],
        tmp_path / "edge-2.log",
        env={
            **os.environ,
            "SEAWALL_LISTEN": f"127.0.0.1:{port}",
            "SEAWALL_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
        },
    )
    try:
        other_edge.wait_ready(lambda: port_open("127.0.0.1", port), 30, "second edge")
        names = images(12)
        settings = load_settings(stack.config_path)
        enqueue_warm(settings, settings.redis_url, [f"hub/{n}:1.0" for n in names[8:]])
        urls = [stack.edge.url, f"http://127.0.0.1:{port}"]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda i: get_manifest(urls[i % 2], names[i]).status_code, range(8)))
        time.sleep(2)  # let the warm jobs run into the empty bucket
        # Twelve candidates for five pulls: exactly the quota reaches the upstream.
        assert hub.count("GET", "manifest", status=200) == 5
        assert hub.count("GET", "manifest", status=429) == 0
        assert statuses.count(200) <= 5
        assert set(statuses) <= {200, 429}
    finally:
        other_edge.stop()


def test_the_bucket_follows_the_upstreams_remaining_header(
    cache_stack: StackFactory, hub: DockerHubEmulator, images
) -> None:
    # The emulator (the truth) has only 2 pulls left though we think we have 5.
    hub.set_quota(limit=5, window_seconds=21600, remaining=2)
    stack = cache_stack(upstream={"quota": QUOTA})
    names = images(4)
    assert get_manifest(stack.edge.url, names[0]).status_code == 200
    status = governor_status(stack)
    assert status.remaining is not None
    assert status.remaining < 2
    assert get_manifest(stack.edge.url, names[1]).status_code == 200
    refused = get_manifest(stack.edge.url, names[2])
    assert refused.status_code == 429
    assert hub.count("GET", "manifest") == 2


def test_background_work_stops_at_the_reserve_and_clients_get_the_rest(
    cache_stack: StackFactory, hub: DockerHubEmulator, images
) -> None:
    hub.set_quota(limit=5, window_seconds=21600)
    stack = cache_stack(upstream={"quota": {**QUOTA, "reserve": 0.4}})
    names = images(8)
    settings = load_settings(stack.config_path)
    enqueue_warm(settings, settings.redis_url, [f"hub/{n}:1.0" for n in names[:5]])
    wait_for(lambda: hub.count("GET", "manifest", status=200) >= 3, 30, "three warmed images")
    wait_for(lambda: stack.worker_logs().count("Retrying message") >= 2, 30, "two warm jobs held back")
    assert hub.count("GET", "manifest", status=200) == 3
    assert [get_manifest(stack.edge.url, n).status_code for n in names[5:8]] == [200, 200, 429]
    assert hub.count("GET", "manifest", status=200) == 5


@pytest.mark.parametrize("plain_text", [False, True], ids=["quota-429", "abuse-429"])
def test_a_429_closes_the_upstream_until_retry_after(
    cache_stack: StackFactory, hub: DockerHubEmulator, images, plain_text: bool
) -> None:
    stack = cache_stack(upstream={"quota": QUOTA})
    names = images(3)
    hub.fail_next(
        1,
        429,
        kind="manifest",
        method="GET" if not plain_text else None,
        retry_after=2,
        plain_text=plain_text,
    )
    first = get_manifest(stack.edge.url, names[0])
    assert first.status_code == 429
    assert first.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    reached, pulls = len(hub.requests), hub.count("GET", "manifest")
    closed = get_manifest(stack.edge.url, names[1])
    assert closed.status_code == 429
    # A quota 429 stops what would spend quota (HEAD is free and goes on); the abuse
    # limit stops everything.
    assert hub.count("GET", "manifest") == pulls
    if plain_text:
        assert len(hub.requests) == reached, "nothing may reach an upstream closed for abuse"
    wait_until(lambda: get_manifest(stack.edge.url, names[1]).status_code == 200, 10, "upstream reopened")
    assert get_manifest(stack.edge.url, names[2]).status_code == 200


def test_head_revalidation_goes_on_while_the_quota_is_spent(
    cache_stack: StackFactory, hub: DockerHubEmulator, images
) -> None:
    hub.set_quota(limit=5, window_seconds=21600)
    stack = cache_stack(upstream={"quota": QUOTA})
    names = images(6)
    for name in names[:5]:
        assert get_manifest(stack.edge.url, name).status_code == 200
    assert get_manifest(stack.edge.url, names[5]).status_code == 429
    heads = hub.count("HEAD", "manifest")
    response = get_manifest(stack.edge.url, names[0])
    assert response.status_code == 200
    assert response.headers["X-Seawall-Cache"] == "hit"
    assert hub.count("HEAD", "manifest") == heads + 1


def test_quota_command_prints_remaining_and_window(
    cache_stack: StackFactory, hub: DockerHubEmulator, images
) -> None:
    hub.set_quota(limit=5, window_seconds=21600)
    stack = cache_stack(upstream={"quota": QUOTA})
    for name in images(2):
        assert get_manifest(stack.edge.url, name).status_code == 200
    result = CliRunner().invoke(seawall, ["quota", "--config", str(stack.config_path)])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "hub" in line)
    assert "anonymous" in row
    assert " 3 " in row
    assert " 5 " in row
    assert "6h00m" in row
