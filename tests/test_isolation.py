"""Blobs are stored once per digest, yet a digest alone never opens another project's content."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import httpx

from tests.fixtures.edge import USERS
from tests.fixtures.proxy import StackFactory
from tests.support.dockerhub import DockerHubEmulator
from tests.support.images import random_bytes
from tests.support.seed import push_blob


def _push_private(base_url: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with httpx.Client(base_url=base_url, auth=("alice", USERS["alice"]), timeout=30) as client:
        push_blob(client, "private/secrets", digest, data)
    return digest


def test_proxy_project_does_not_serve_a_private_blob_the_upstream_lacks(
    cache_stack: StackFactory, hub: DockerHubEmulator, repo_name: Callable[[], str]
) -> None:
    stack = cache_stack()
    secret = random_bytes(50_000, "secret")
    digest = _push_private(stack.edge.url, secret)
    with httpx.Client(base_url=stack.edge.url, timeout=30) as client:
        response = client.get(f"/v2/hub/{repo_name()}/blobs/{digest}")
    assert response.status_code == 404
    assert response.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert secret not in response.content
    # The upstream was asked: only it can vouch that this repository has the blob.
    assert hub.count("GET", "blob") >= 1


def test_proxy_project_serves_a_blob_held_elsewhere_once_the_upstream_has_it(
    cache_stack: StackFactory, hub: DockerHubEmulator, distribution, repo_name: Callable[[], str]
) -> None:
    stack = cache_stack()
    shared = random_bytes(80_000, "shared-layer")
    digest = _push_private(stack.edge.url, shared)
    name = repo_name()
    with httpx.Client(base_url=distribution.url, timeout=30) as upstream:
        push_blob(upstream, name, digest, shared)
    with httpx.Client(base_url=stack.edge.url, timeout=30) as client:
        response = client.get(f"/v2/hub/{name}/blobs/{digest}")
    assert response.status_code == 200
    assert response.content == shared
    assert hub.count("GET", "blob", status=200) == 1


def test_automatic_mount_only_shares_blobs_within_a_project(cache_stack: StackFactory) -> None:
    stack = cache_stack()
    digest = _push_private(stack.edge.url, random_bytes(10_000, "mount"))
    with httpx.Client(base_url=stack.edge.url, auth=("alice", USERS["alice"]), timeout=30) as client:
        other_project = client.post("/v2/local/app/blobs/uploads/", params={"mount": digest})
        same_project = client.post("/v2/private/other/blobs/uploads/", params={"mount": digest})
        blob = client.get(f"/v2/local/app/blobs/{digest}")
    assert other_project.status_code == 202  # an upload session, not a mount
    assert same_project.status_code == 201
    assert blob.status_code == 404
