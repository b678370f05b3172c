"""Driving shared.upstream's client in tests: a seeded upstream image, clients run to completion,
their failures, metrics, and a fake registry that wants Basic auth and sends blobs to a CDN."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from aiohttp import web
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from shared.auth.upstream_tokens import SharedTokens
from shared.settings import Upstream
from shared.upstream import UpstreamClient, UpstreamFailure
from tests.support.dockerhub import DockerHubEmulator
from tests.support.images import Image, make_image, make_layer, sha256
from tests.support.seed import push_image

T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    """Coroutines run with `asyncio.run` (no pytest-asyncio)."""
    return asyncio.run(coro)  # type: ignore[arg-type]


@dataclass
class Seeded:
    repository: str
    image: Image
    layer: bytes

    @property
    def layer_digest(self) -> str:
        return sha256(self.layer)


def seed_image(registry_url: str) -> Seeded:
    """An image tagged `latest` in a fresh library/* repository of the registry."""
    repository = f"library/upstream-{secrets.token_hex(4)}"
    # Random content so the gzipped layer stays ~300 KiB (cuts and ranges need a big body).
    layer = make_layer({"random.bin": secrets.token_bytes(300 * 1024)})
    assert len(layer) > 300 * 1024
    image = make_image([layer], label=repository)
    push_image(registry_url, repository, image, "latest")
    return Seeded(repository, image, layer)


def upstream_for(url: str, **fields: Any) -> Upstream:
    """Upstream settings for `url` under a fresh name (metrics are per name)."""
    fields.setdefault("name", f"hub-{secrets.token_hex(3)}")
    return Upstream(url=url, **fields)


async def with_client(upstream: Upstream, body: Callable[[UpstreamClient], Awaitable[T]]) -> T:
    async with UpstreamClient(upstream) as client:
        return await body(client)


def failure_of(upstream: Upstream, body: Callable[[UpstreamClient], Awaitable[Any]]) -> UpstreamFailure:
    """The UpstreamFailure that `body` raises with a client of its own."""

    async def scenario() -> UpstreamFailure:
        async with UpstreamClient(upstream) as client:
            with pytest.raises(UpstreamFailure) as info:
                await body(client)
            return info.value

    return run(scenario())


def shared_clients(
    upstream: Upstream, redis_url: str, *bodies: Callable[[UpstreamClient], Awaitable[None]]
) -> None:
    """Run each body in a client of its own (as separate processes would), all sharing
    their tokens through one Redis."""

    async def scenario() -> None:
        redis = Redis.from_url(redis_url)
        try:
            for body in bodies:
                async with UpstreamClient(upstream, shared_tokens=SharedTokens(redis, upstream)) as client:
                    await body(client)
        finally:
            await redis.aclose()

    run(scenario())


def tokens_issued(hub: DockerHubEmulator) -> int:
    return int(hub.snapshot()["tokens_issued"])


def metric(name: str, **labels: str) -> float:
    """A sample of this process's Prometheus registry (0 when it was never set)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def requests_counted(upstream: Upstream, kind: str, method: str, status: str) -> float:
    return metric(
        "seawall_upstream_requests_total", upstream=upstream.name, kind=kind, method=method, status=status
    )


async def wait_async(check: Callable[[], object], what: str) -> None:
    """Poll the emulator's records (another thread's) for up to 10 s."""
    for _ in range(1000):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class FakeRegistry:
    """A registry that wants Basic credentials and redirects blob GETs to a 'CDN' on
    another origin; the CDN ignores Range. Both record the Authorization they saw."""

    def __init__(self, blob: bytes, manifest: bytes) -> None:
        self.blob = blob
        self.manifest = manifest
        self.registry_auth: list[str | None] = []
        self.cdn_auth: list[str | None] = []
        self.cdn_ranges: list[str | None] = []
        self._runners: list[web.AppRunner] = []
        self.url = self.cdn_url = ""

    async def __aenter__(self) -> FakeRegistry:
        registry = web.Application()
        registry.router.add_route("*", "/v2/{name:.+}/manifests/{ref}", self._manifest)
        registry.router.add_get("/v2/{name:.+}/blobs/{digest}", self._redirect)
        cdn = web.Application()
        cdn.router.add_get("/blobs/{digest}", self._cdn)
        self.url = await self._serve(registry)
        self.cdn_url = await self._serve(cdn)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for runner in self._runners:
            await runner.cleanup()

    async def _serve(self, app: web.Application) -> str:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    def _check(self, request: web.Request) -> web.Response | None:
        auth = request.headers.get("Authorization")
        self.registry_auth.append(auth)
        if auth is None or not auth.startswith("Basic "):
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="fake"'})
        return None

    async def _manifest(self, request: web.Request) -> web.StreamResponse:
        denied = self._check(request)
        if denied is not None:
            return denied
        # No Docker-Content-Digest and no Content-Type: the client hashes and sniffs.
        response = web.Response(body=self.manifest)
        response.headers.popall("Content-Type", None)
        return response

    async def _redirect(self, request: web.Request) -> web.StreamResponse:
        denied = self._check(request)
        if denied is not None:
            return denied
        raise web.HTTPTemporaryRedirect(f"{self.cdn_url}/blobs/{request.match_info['digest']}")

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        self.cdn_auth.append(request.headers.get("Authorization"))
        self.cdn_ranges.append(request.headers.get("Range"))
        return web.Response(body=self.blob, content_type="application/octet-stream")
