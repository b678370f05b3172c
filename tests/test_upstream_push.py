"""shared.upstream's client on the replication side: tags lists, catalogs and referrers read
page by page, blobs mounted and pushed in chunked sessions that survive a cut link,
manifests put and deleted. Against a real Distribution, the Docker Hub emulator in front of
it, and a real Seawall edge; the cut link is a TCP proxy (tests/support/cutproxy.py).

Coroutines run with `asyncio.run` (no pytest-asyncio).
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from shared.ratelimit import Governor, QuotaRefused
from shared.settings import Upstream
from shared.upstream import UpstreamClient, UpstreamFailure
from shared.upstream import push as push_module
from tests.fixtures.edge import USERS, EdgeFactory, EdgeServer
from tests.support.cutproxy import CuttingProxy
from tests.support.distribution import Distribution
from tests.support.dockerhub import DockerHubEmulator
from tests.support.images import OCI_MANIFEST, canonical, make_image, make_layer, random_bytes, sha256
from tests.support.seed import push_blob, push_image, push_manifest
from tests.support.upstream import metric, requests_counted, run, upstream_for

MIB = 1024 * 1024
PASSWORD_ENV = "PUSH_TEST_PASSWORD"


class MemorySource:
    """`open_source(offset)` over bytes in memory; `opened` lists the offsets it was opened at."""

    def __init__(self, data: bytes, piece: int = 64 * 1024) -> None:
        self.data = data
        self.piece = piece
        self.opened: list[int] = []

    def __call__(self, offset: int) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        self.opened.append(offset)
        return self._open(offset)

    @asynccontextmanager
    async def _open(self, offset: int) -> AsyncIterator[AsyncIterator[bytes]]:
        yield self._chunks(offset)

    async def _chunks(self, offset: int) -> AsyncIterator[bytes]:
        for start in range(offset, len(self.data), self.piece):
            yield self.data[start : start + self.piece]


def as_alice(edge: EdgeServer, monkeypatch: pytest.MonkeyPatch, url: str | None = None) -> Upstream:
    """Upstream settings for a Seawall edge (or a proxy in front of it), pushing as alice."""
    monkeypatch.setenv(PASSWORD_ENV, USERS["alice"])
    return upstream_for(url or edge.url, username="alice", password_env=PASSWORD_ENV)


async def push_and_read(
    client: UpstreamClient, repository: str, data: bytes, **options: Any
) -> tuple[int, bytes]:
    """Push `data` as a blob, then read it back: (bytes sent, bytes read)."""
    digest = sha256(data)
    sent = await client.push_blob(repository, digest, len(data), MemorySource(data), **options)
    async with client.open_blob(repository, digest) as stream:
        return sent, await stream.read()


def fresh(prefix: str = "local") -> str:
    return f"{prefix}/push-{secrets.token_hex(4)}"


# ----------------------------------------------------------------------- listings
def tagged(edge: EdgeServer, tags: list[str]) -> str:
    """A fresh repository of the edge's `local` project with one image under `tags`."""
    repository = fresh()
    image = make_image(label=repository)
    alice = ("alice", USERS["alice"])
    push_image(edge.url, repository, image, tags[0], auth=alice)
    with httpx.Client(base_url=edge.url, auth=alice) as http:
        for tag in tags[1:]:
            push_manifest(http, repository, tag, image.manifest, OCI_MANIFEST)
    return repository


def test_tags_are_listed_page_by_page(edge: EdgeServer) -> None:
    tags = [f"v{i}" for i in range(5)]
    repository = tagged(edge, tags)
    upstream = upstream_for(edge.url)

    async def body() -> list[str]:
        async with UpstreamClient(upstream) as client:
            return [tag async for tag in client.list_tags(repository, page_size=2)]

    assert run(body()) == tags
    assert requests_counted(upstream, "tags", "GET", "200") == 3  # 2 + 2 + 1, following Link


def test_tags_of_an_unknown_repository_are_not_found(distribution: Distribution) -> None:
    async def body() -> None:
        async with UpstreamClient(upstream_for(distribution.url)) as client:
            with pytest.raises(UpstreamFailure) as info:
                [tag async for tag in client.list_tags(f"library/none-{secrets.token_hex(4)}")]
            assert info.value.kind == "not_found"

    run(body())


def test_a_listing_waits_for_the_request_rate_instead_of_failing(edge: EdgeServer, redis_url: str) -> None:
    """With the governor's request rate spent, each page waits for it to refill: the listing
    is slower, and complete."""
    repository = tagged(edge, ["a", "b", "c"])
    upstream = upstream_for(edge.url, requests_per_minute=600)  # refills 10 requests a second

    async def body() -> list[str]:
        redis = Redis.from_url(redis_url)
        try:
            governor = Governor(redis, upstream)
            with contextlib.suppress(QuotaRefused):
                while True:  # spend the whole minute's requests
                    await governor.admit(pull=False)
            async with UpstreamClient(upstream, governor=governor) as client:
                return [tag async for tag in client.list_tags(repository, page_size=1)]
        finally:
            await redis.aclose()

    started = time.monotonic()
    assert run(body()) == ["a", "b", "c"]
    assert time.monotonic() - started >= 0.15
    assert metric("seawall_quota_denied_total", upstream=upstream.name, priority="client") >= 3
    assert requests_counted(upstream, "tags", "GET", "200") == 3


def test_the_catalog_is_listed_page_by_page(edge: EdgeServer) -> None:
    names = sorted(fresh() for _ in range(3))
    for name in names:
        push_image(edge.url, name, make_image(label=name), "latest", auth=("alice", USERS["alice"]))
    upstream = upstream_for(edge.url)

    async def body() -> list[str]:
        async with UpstreamClient(upstream) as client:
            return [name async for name in client.catalog(page_size=2)]

    assert run(body()) == names
    assert requests_counted(upstream, "catalog", "GET", "200") == 2


def test_a_registry_that_denies_its_catalog_has_none(hub: DockerHubEmulator) -> None:
    """Docker Hub answers the catalog with 401 whatever token is sent."""
    hub.fail_always(status=401, path="/_catalog")

    async def body() -> UpstreamFailure:
        async with UpstreamClient(upstream_for(hub.url)) as client:
            with pytest.raises(UpstreamFailure) as info:
                [name async for name in client.catalog()]
            return info.value

    assert run(body()).kind == "unsupported"


def test_referrers_come_from_the_referrers_api(edge: EdgeServer, distribution: Distribution) -> None:
    repository = fresh()
    image = make_image(label=repository)
    signature, empty = b"signed", b"{}"
    artifact = canonical(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": "application/vnd.example.signature",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256(empty), "size": 2},
            "layers": [
                {"mediaType": "application/vnd.example.signature", "digest": sha256(signature), "size": 6}
            ],
            "subject": {"mediaType": OCI_MANIFEST, "digest": image.digest, "size": len(image.manifest)},
        }
    )
    alice = ("alice", USERS["alice"])
    push_image(edge.url, repository, image, "latest", auth=alice)
    with httpx.Client(base_url=edge.url, auth=alice) as http:
        for data in (signature, empty):
            push_blob(http, repository, sha256(data), data)
        push_manifest(http, repository, sha256(artifact), artifact, OCI_MANIFEST)
    plain = f"library/plain-{secrets.token_hex(4)}"
    push_image(distribution.url, plain, image, "latest")

    async def body() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        async with UpstreamClient(upstream_for(edge.url)) as seawall:
            found = await seawall.referrers(repository, image.digest)
        async with UpstreamClient(upstream_for(distribution.url)) as registry:
            # Distribution 2.8 has no referrers API: it answers 404.
            none = await registry.referrers(plain, image.digest)
        return found, none

    found, none = run(body())
    assert [(d["digest"], d.get("artifactType")) for d in found] == [
        (sha256(artifact), "application/vnd.example.signature")
    ]
    assert none == []


# ---------------------------------------------------------------------- pushes
def test_a_blob_pushed_in_chunks_reads_back_byte_for_byte(distribution: Distribution) -> None:
    data = random_bytes(MIB + 12345, "chunks")
    repository = f"library/chunks-{secrets.token_hex(4)}"

    async def body() -> tuple[int, bytes]:
        async with UpstreamClient(upstream_for(distribution.url)) as client:
            return await push_and_read(client, repository, data, chunk_size=256 * 1024)

    sent, stored = run(body())
    assert stored == data
    assert sent == len(data)


def test_an_image_pushed_through_token_auth_pulls_back(
    distribution: Distribution, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The emulated Docker Hub grants push only to an account, and only for a token asked
    with the push scope: blobs, then the manifest by tag, then the image pulls back."""
    monkeypatch.setenv(PASSWORD_ENV, "pusher-secret")
    repository = f"library/pushed-{secrets.token_hex(4)}"
    image = make_image([make_layer(size=300 * 1024, seed=repository)], label=repository)

    async def body(hub: DockerHubEmulator) -> tuple[str, bytes | None]:
        upstream = upstream_for(hub.url, username="pusher", password_env=PASSWORD_ENV)
        async with UpstreamClient(upstream) as client:
            for digest, data in image.blobs.items():
                assert await client.push_blob(repository, digest, len(data), MemorySource(data)) == len(data)
            digest = await client.put_manifest(repository, "1.0", image.manifest, OCI_MANIFEST)
            fetched = await client.get_manifest(repository, "1.0")
            return digest, fetched.body if fetched else None

    with DockerHubEmulator(distribution.url, accounts={"pusher": "pusher-secret"}) as hub:
        digest, pulled = run(body(hub))
        assert digest == image.digest
        assert pulled == image.manifest

        async def anonymous() -> UpstreamFailure:
            async with UpstreamClient(upstream_for(hub.url)) as client:
                with pytest.raises(UpstreamFailure) as info:
                    await client.put_manifest(repository, "2.0", image.manifest, OCI_MANIFEST)
                return info.value

        refused = run(anonymous())
        assert (refused.kind, refused.status) == ("auth", 401)
        assert "insufficient_scope" in refused.message


class RevokingSource(MemorySource):
    """Revokes the emulator's tokens when its piece number `at` is read from byte 0."""

    def __init__(self, data: bytes, hub: DockerHubEmulator, at: int) -> None:
        super().__init__(data)
        self.hub = hub
        self.at = at

    async def _chunks(self, offset: int) -> AsyncIterator[bytes]:
        index = 0
        async for piece in super()._chunks(offset):
            if offset == 0 and index == self.at:
                self.hub.revoke_tokens()
            index += 1
            yield piece


def test_a_token_revoked_mid_upload_is_renewed_and_the_upload_goes_on(
    distribution: Distribution, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request after the revocation meets a 401 while its body cannot be sent again: the
    challenge is answered and the upload goes on from the session's offset."""
    monkeypatch.setenv(PASSWORD_ENV, "pusher-secret")
    repository = f"library/revoked-{secrets.token_hex(4)}"
    data = random_bytes(3 * 256 * 1024, "revoked")

    with DockerHubEmulator(distribution.url, accounts={"pusher": "pusher-secret"}) as hub:
        # Four 64 KiB pieces a chunk: revoked while the second chunk is on its way.
        source = RevokingSource(data, hub, at=5)

        async def body() -> bytes:
            upstream = upstream_for(hub.url, username="pusher", password_env=PASSWORD_ENV)
            async with UpstreamClient(upstream) as client:
                await client.push_blob(repository, sha256(data), len(data), source, chunk_size=256 * 1024)
            async with (
                UpstreamClient(upstream_for(distribution.url)) as direct,
                direct.open_blob(repository, sha256(data)) as stream,
            ):
                return await stream.read()

        started = time.monotonic()
        assert run(body()) == data
        # A half-consumed body sent again after the challenge would stall the request until
        # the read timeout (30 s).
        assert time.monotonic() - started < 10
        # The second chunk's PATCH, or the final PUT when the emulator had let the PATCH in.
        assert hub.count("PATCH", "other", status=401) + hub.count("PUT", "other", status=401) == 1
        assert int(hub.snapshot()["tokens_issued"]) == 2
        assert source.opened in ([0, 256 * 1024], [0, 2 * 256 * 1024])


def test_a_push_cut_halfway_resumes_the_same_session(
    edge_factory: EdgeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Seawall destination keeps the session when a chunk is cut: the push goes on from
    the offset it reports and sends again less than a quarter of the layer."""
    edge = edge_factory()
    layer = random_bytes(20 * MIB, "cut-seawall")
    digest = sha256(layer)
    repository = fresh()

    async def body() -> tuple[int, int, list[int]]:
        async with CuttingProxy(int(edge.address.rsplit(":", 1)[1])) as proxy:
            proxy.cut_after(len(layer) // 2)
            source = MemorySource(layer, piece=MIB)
            async with UpstreamClient(as_alice(edge, monkeypatch, proxy.url)) as client:
                sent = await client.push_blob(repository, digest, len(layer), source, chunk_size=4 * MIB)
            return sent, proxy.cuts, source.opened

    sent, cuts, opened = run(body())
    assert cuts == 1
    assert len(opened) == 2
    assert 0 < opened[1] <= len(layer) // 2  # resumed, not restarted
    assert len(layer) <= sent < len(layer) * 5 // 4

    async def stored() -> str:
        hasher = hashlib.sha256()
        async with (
            UpstreamClient(as_alice(edge, monkeypatch)) as client,
            client.open_blob(repository, digest) as s,
        ):
            async for chunk in s.iter_chunks():
                hasher.update(chunk)
        return "sha256:" + hasher.hexdigest()

    assert run(stored()) == digest


def test_a_push_to_distribution_cut_halfway_starts_a_new_session_and_finishes(
    distribution: Distribution,
) -> None:
    """Distribution cancels a session whose chunk was cut (the bytes it wrote no longer
    match the session's state): the push opens a new one and still finishes."""
    layer = random_bytes(4 * MIB, "cut-distribution")
    repository = f"library/cut-{secrets.token_hex(4)}"

    async def body() -> tuple[int, bytes, int]:
        async with CuttingProxy(distribution.port) as proxy:
            proxy.cut_after(len(layer) // 2)
            async with UpstreamClient(upstream_for(proxy.url)) as client:
                sent, stored = await push_and_read(client, repository, layer, chunk_size=MIB)
            return sent, stored, proxy.cuts

    sent, stored, cuts = run(body())
    assert cuts == 1
    assert stored == layer
    assert sent > len(layer)


def test_a_link_that_keeps_breaking_fails_after_bounded_retries(
    distribution: Distribution, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(push_module, "RETRY_DELAYS", (0.01, 0.01, 0.01))
    data = random_bytes(MIB, "keeps-breaking")

    async def body() -> tuple[UpstreamFailure, int]:
        async with CuttingProxy(distribution.port) as proxy:
            proxy.cut_after(100 * 1024, every=True)
            async with UpstreamClient(upstream_for(proxy.url)) as client:
                with pytest.raises(UpstreamFailure) as info:
                    await client.push_blob(
                        f"library/broken-{secrets.token_hex(4)}", sha256(data), len(data), MemorySource(data)
                    )
            return info.value, proxy.cuts

    failure, cuts = run(body())
    assert failure.kind == "network"
    assert cuts == 4  # the first try and three more


def test_a_failing_source_fails_the_push_as_itself(distribution: Distribution) -> None:
    data = random_bytes(MIB, "failing-source")

    @asynccontextmanager
    async def broken(offset: int) -> AsyncIterator[AsyncIterator[bytes]]:
        async def chunks() -> AsyncIterator[bytes]:
            yield data[:1000]
            raise RuntimeError("the source broke")

        yield chunks()

    async def body() -> None:
        async with UpstreamClient(upstream_for(distribution.url)) as client:
            with pytest.raises(RuntimeError, match="the source broke"):
                await client.push_blob(
                    f"library/source-{secrets.token_hex(4)}", sha256(data), len(data), broken
                )

    run(body())


def test_bandwidth_caps_the_push(distribution: Distribution) -> None:
    data = random_bytes(512 * 1024, "bandwidth")

    async def body() -> float:
        async with UpstreamClient(upstream_for(distribution.url)) as client:
            started = time.monotonic()
            await client.push_blob(
                f"library/slow-{secrets.token_hex(4)}",
                sha256(data),
                len(data),
                MemorySource(data),
                bandwidth=MIB,
            )
            return time.monotonic() - started

    assert run(body()) >= 0.45


def test_a_blob_is_mounted_from_another_repository(edge: EdgeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    origin, target = fresh(), fresh()
    image = make_image(label=origin)
    push_image(edge.url, origin, image, "latest", auth=("alice", USERS["alice"]))
    config = sha256(image.config)
    unknown = sha256(b"nobody has this")

    async def body() -> tuple[bool, bool, int | None]:
        async with UpstreamClient(as_alice(edge, monkeypatch)) as client:
            mounted = await client.mount_blob(target, config, origin)
            missing = await client.mount_blob(target, unknown, origin)
            return mounted, missing, await client.head_blob(target, config)

    mounted, missing, size = run(body())
    assert (mounted, missing) == (True, False)
    assert size == len(image.config)


def test_a_manifest_is_put_and_deleted(distribution: Distribution) -> None:
    repository = f"library/deleted-{secrets.token_hex(4)}"
    image = make_image(label=repository)
    push_image(distribution.url, repository, image, tag=None)

    async def body() -> tuple[str, bool, bool, bool]:
        async with UpstreamClient(upstream_for(distribution.url)) as client:
            digest = await client.put_manifest(repository, "v1", image.manifest, OCI_MANIFEST)
            deleted = await client.delete_manifest(repository, digest)
            again = await client.delete_manifest(repository, digest)
            gone = await client.head_manifest(repository, "v1") is None
            return digest, deleted, again, gone

    assert run(body()) == (image.digest, True, False, True)
