"""A fill is one upstream download cluster-wide, and reading it is no back door.

Two proxy projects on the same upstream share fills by digest (the bytes are the same),
but a project's clients may read another project's running fill only once their own
upstream serves that blob in the repository they asked for. And however many fill jobs
are sent for one blob, the lease lets exactly one of them download it.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Callable
from typing import Any

import httpx

from shared.jobs import make_broker
from shared.proxy.events import CacheEvents
from tests.fixtures.edge import PROJECTS
from tests.fixtures.proxy import StackFactory, wait_for
from tests.support.dockerhub import DockerHubEmulator
from tests.support.images import random_bytes
from tests.support.seed import push_blob

TWO_CACHES: list[dict[str, Any]] = [
    *PROJECTS,
    {"name": "hub", "type": "proxy", "public": True, "upstream": "hub", "tag_ttl": "0s"},
    {"name": "hub2", "type": "proxy", "public": True, "upstream": "hub", "tag_ttl": "0s"},
]
MIB = 1024 * 1024


def _upstream_blob(distribution: Any, names: list[str], data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with httpx.Client(base_url=distribution.url, timeout=120) as upstream:
        for name in names:
            push_blob(upstream, name, digest, data)
    return digest


class Download(threading.Thread):
    """A client streaming one blob, recording what it received."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.received = bytearray()
        self.status: int | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            with httpx.Client(timeout=120) as client, client.stream("GET", self.url) as response:
                self.status = response.status_code
                for chunk in response.iter_bytes():
                    self.received.extend(chunk)
        except Exception as exc:  # asserted by the test
            self.error = exc


def test_a_project_cannot_read_another_projects_fill_of_a_blob_its_upstream_lacks(
    cache_stack: StackFactory, hub: DockerHubEmulator, distribution: Any, repo_name: Callable[[], str]
) -> None:
    owner, stranger = repo_name(), repo_name()
    data = random_bytes(12 * MIB, owner)
    digest = _upstream_blob(distribution, [owner], data)
    stack = cache_stack(projects=TWO_CACHES)
    hub.throttle_blob(digest, 2 * MIB)
    filling = Download(f"{stack.edge.url}/v2/hub/{owner}/blobs/{digest}")
    wait_for(lambda: len(filling.received) > MIB, 60, "the fill for hub streaming")

    with httpx.Client(base_url=stack.edge.url, timeout=60) as client:
        response = client.get(f"/v2/hub2/{stranger}/blobs/{digest}")
        assert response.status_code == 404, response.text[:200]
        assert response.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
        assert data[:65536] not in response.content
        # hub2's upstream was asked, with a HEAD in the repository the client named.
        assert hub.count("HEAD", path=f"/v2/{stranger}/blobs/{digest}") >= 1
        assert hub.count("GET", path=f"/v2/{stranger}/blobs/{digest}") == 0

        hub.throttle_blob(digest, None)
        filling.join(120)
        assert filling.error is None
        assert bytes(filling.received) == data
        # Committed now, and still not hub2's to serve.
        after = client.get(f"/v2/hub2/{stranger}/blobs/{digest}")
        assert after.status_code == 404
        assert data[:65536] not in after.content


def test_a_project_whose_upstream_has_the_blob_follows_another_projects_fill(
    cache_stack: StackFactory, hub: DockerHubEmulator, distribution: Any, repo_name: Callable[[], str]
) -> None:
    owner, other = repo_name(), repo_name()
    data = random_bytes(12 * MIB, owner)
    digest = _upstream_blob(distribution, [owner, other], data)
    stack = cache_stack(projects=TWO_CACHES)
    hub.throttle_blob(digest, 3 * MIB)
    first = Download(f"{stack.edge.url}/v2/hub/{owner}/blobs/{digest}")
    wait_for(lambda: len(first.received) > MIB, 60, "the fill for hub streaming")
    second = Download(f"{stack.edge.url}/v2/hub2/{other}/blobs/{digest}")
    for download in (first, second):
        download.join(120)
        assert download.error is None, download.error
        assert download.status == 200
        assert bytes(download.received) == data
    # One download for both projects; hub2's upstream only answered a HEAD.
    assert len(hub.blob_gets(digest)) == 1
    assert hub.count("HEAD", path=f"/v2/{other}/blobs/{digest}") >= 1
    # hub2 holds the blob now: a later pull is a hit, with no upstream request.
    before = len(hub.requests)
    with httpx.Client(base_url=stack.edge.url, timeout=60) as client:
        again = client.get(f"/v2/hub2/{other}/blobs/{digest}")
    assert again.status_code == 200
    assert again.content == data
    assert len(hub.requests) == before


def test_two_fill_jobs_for_one_blob_make_exactly_one_upstream_download(
    cache_stack: StackFactory,
    hub: DockerHubEmulator,
    distribution: Any,
    repo_name: Callable[[], str],
    redis_url: str,
) -> None:
    """The jobs are sent straight to the queue, past the edge's dedupe, and the second
    one while the first is provably downloading: only the fill lease can keep it out."""
    name = repo_name()
    data = random_bytes(10 * MIB, name)
    digest = _upstream_blob(distribution, [name], data)
    stack = cache_stack(workers=2)
    hub.throttle_blob(digest, 2 * MIB)
    events = CacheEvents(make_broker(redis_url))
    try:
        asyncio.run(events.fill_wanted("hub", name, digest))
        wait_for(lambda: len(hub.blob_gets(digest)) == 1, 30, "the first fill downloading")
        asyncio.run(events.fill_wanted("hub", name, digest))
        asyncio.run(events.fill_wanted("hub", name, digest))
        with httpx.Client(base_url=stack.edge.url, timeout=60) as client:
            wait_for(
                lambda: (
                    client.head(f"/v2/hub/{name}/blobs/{digest}").headers.get("X-Seawall-Cache") is None
                    and client.head(f"/v2/hub/{name}/blobs/{digest}").status_code == 200
                ),
                60,
                "the blob committed",
            )
            assert client.get(f"/v2/hub/{name}/blobs/{digest}").content == data
    finally:
        events.close()
    assert len(hub.blob_gets(digest)) == 1
