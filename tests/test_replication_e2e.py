"""Replication end to end. A push: a hosted project on one Seawall pushed to a second Seawall
(its own bucket and Redis, a configured upstream with credentials) and to a CNCF
Distribution, run through the job functions as workers run them; then skopeo pulls the
images back from each destination and they are the bytes pushed at the source. A pull
against a small quota, run by real worker processes beside an edge serving clients."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from services.embedded import S3Server
from shared.replication.records import Execution, ExecutionStatus
from tests.fixtures.clients import Skopeo
from tests.fixtures.edge import USERS, EdgeFactory, EdgeServer, build_settings
from tests.fixtures.proxy import StackFactory, wait_for
from tests.fixtures.servers import WorkerFactory
from tests.support.distribution import Distribution
from tests.support.dockerhub import DockerHubEmulator
from tests.support.images import OCI_MANIFEST, Image, make_image, make_layer
from tests.support.replication import (
    KIB,
    TIMEOUTS,
    flattened,
    publish_start,
    pull_rule,
    push_small_images,
    read_executions,
    run_execution,
    small_image,
    stack_reader,
    tagged,
)
from tests.support.seed import push_image

ALICE = ("alice", USERS["alice"])
PASSWORD_ENV = "E2E_SITE_B_PASSWORD"


@pytest.fixture
def site_b(redis_url: str, s3_server: S3Server, user_hashes: dict[str, str]) -> Iterator[EdgeServer]:
    """A second Seawall: its own bucket and its own Redis database (the one after this test's)."""
    bucket = f"site-b-{secrets.token_hex(3)}"
    s3_server.ensure_bucket(bucket)
    base, database = redis_url.rsplit("/", 1)
    url = f"{base}/{int(database) % 1023 + 1}"
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    with EdgeServer(build_settings(url, s3_server.settings(bucket), user_hashes)) as server:
        yield server


def _pulled(
    skopeo: Skopeo, reference: str, into: Path, creds: tuple[str, str] | None = None
) -> dict[str, bytes]:
    """What skopeo pulls of `reference` (docker://), by file name: manifest.json and blobs by hex."""
    skopeo.copy(f"docker://{reference}", f"dir:{into}", src_creds=creds)
    return {path.name: path.read_bytes() for path in into.iterdir() if path.name != "version"}


def _expected(image: Image) -> dict[str, bytes]:
    return {"manifest.json": image.manifest} | {d.split(":", 1)[1]: data for d, data in image.blobs.items()}


def test_a_push_rule_copies_a_hosted_project_to_another_seawall_and_to_distribution(
    edge_factory: EdgeFactory,
    worker_factory: WorkerFactory,
    site_b: EdgeServer,
    distribution: Distribution,
    skopeo: Skopeo,
    repo_name: Callable[[], str],
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, USERS["alice"])
    site_a = edge_factory()
    repository = f"local/e2e-{secrets.token_hex(4)}"
    images = {
        tag: make_image(
            [make_layer(size=300 * KIB, seed=f"{repository}:{tag}"), make_layer(size=20 * KIB, seed=tag)],
            label=f"{repository}:{tag}",
        )
        for tag in ("v1", "v2")
    }
    for tag, image in images.items():
        push_image(site_a.url, repository, image, tag, auth=ALICE)
    rules: list[dict[str, Any]] = [
        {"name": "to-b", "mode": "push", "source": "local", "destination": "site-b", "flatten": 0},
        {"name": "to-dist", "mode": "push", "source": "local", "destination": "dist", "flatten": 0},
    ]
    for rule in rules:
        rule["filters"] = {"name": repository}
    worker = worker_factory(
        upstreams=[
            {
                "name": "site-b",
                "url": site_b.url,
                "username": "alice",
                "password_env": PASSWORD_ENV,
                **TIMEOUTS,
            },
            {"name": "dist", "url": distribution.url, **TIMEOUTS},
        ],
        projects=[{"name": "local", "type": "hosted"}],
        replication=rules,
    )
    size = sum(len(data) for image in images.values() for data in image.blobs.values())

    for rule_name, url, creds in (("to-b", site_b.url, ALICE), ("to-dist", distribution.url, None)):
        done = run_execution(worker, redis_url, rule_name)
        assert (done.status, done.succeeded, done.total) == (ExecutionStatus.SUCCEEDED, 2, 2), done
        assert done.bytes_moved == size
        host = url.removeprefix("http://")
        for tag, image in images.items():
            pulled = _pulled(skopeo, f"{host}/{repository}:{tag}", tmp_path / f"{rule_name}-{tag}", creds)
            assert pulled == _expected(image)
        # A second run finds every tag in place: nothing moves.
        again = run_execution(worker, redis_url, rule_name)
        assert (again.status, again.succeeded, again.bytes_moved) == (ExecutionStatus.SUCCEEDED, 2, 0)


def test_a_pull_run_under_a_small_quota_pauses_without_a_429_keeps_the_reserve_and_finishes_after_the_window(
    cache_stack: StackFactory,
    worker_factory: WorkerFactory,
    hub: DockerHubEmulator,
    distribution: Distribution,
    repo_name: Callable[[], str],
) -> None:
    name = repo_name()
    tags = [f"v{n}" for n in range(10)]
    images = push_small_images(distribution.url, name, tags, size=KIB)
    client_image = small_image(f"{name}:client", size=KIB)
    push_image(distribution.url, name, client_image, "client")
    # Five pulls per 1.5 s: background work may take four of them, the reserve keeps one.
    window = 1.5
    hub.set_quota(limit=5, window_seconds=window)
    rule = pull_rule("quota", name, destination="local", filters={"name": name, "tag": "v*"})
    stack = cache_stack(
        workers=0,
        upstream={"quota": {"limit": 5, "window": f"{window * 1000:.0f}ms", "reserve": 0.2}},
        replication=[rule],
    )
    stack.start_worker(threads=4)
    reader = stack_reader(worker_factory, stack)
    hub.reset_counters()

    started = time.monotonic()
    publish_start(stack.edge.settings.redis_url or "", "quota")

    def execution() -> Execution | None:
        found = read_executions(reader, "quota")
        return found[0] if found else None

    def waiting() -> bool:
        current = execution()
        return current is not None and (current.message or "").startswith("waiting for quota")

    wait_for(waiting, 10, "the execution waiting for quota")
    paused = execution()
    assert paused is not None
    assert paused.status is ExecutionStatus.RUNNING
    assert paused.succeeded < len(tags)
    # A client pull meanwhile gets the reserve.
    with httpx.Client(base_url=stack.edge.url, timeout=10) as client:
        answer = client.get(f"/v2/hub/{name}/manifests/client", headers={"Accept": OCI_MANIFEST})
    assert answer.status_code == 200, answer.text
    assert answer.content == client_image.manifest

    def over() -> bool:
        current = execution()
        return current is not None and current.done

    try:
        wait_for(over, 30, "the execution over")
    except Exception as exc:
        raise AssertionError(f"{exc}; {execution()}\n{stack.worker_logs()}") from exc
    took = time.monotonic() - started
    done = execution()
    assert done is not None
    assert (done.status, done.succeeded, done.total) == (ExecutionStatus.SUCCEEDED, len(tags), len(tags))
    assert done.message is None
    # Ten pulls at four a window cannot fit in fewer than two windows.
    assert took > 2 * window
    assert [r for r in hub.requests if r.status == 429] == []
    assert hub.pulls() == len(tags) + 1
    destination = flattened("local", name)
    for tag, image in images.items():
        assert tagged(reader, destination, tag) == image.digest
    for worker_process in stack.workers:
        worker_process.kill()  # nothing of it is kept: no need to wait for a graceful stop
