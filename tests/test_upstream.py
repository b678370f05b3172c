"""shared.upstream's client against the Docker Hub emulator in front of a real Distribution registry.

Coroutines run with `asyncio.run` (no pytest-asyncio). Timings are asserted with generous
bounds only. What the client makes of single answers (headers, failure kinds) is in
test_upstream_answers.py.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any, cast

import pytest
import redis

from shared.oci.mediatypes import ACCEPT
from shared.upstream import FetchedManifest, ManifestHead, RateLimit, UpstreamClient, UpstreamFailure
from shared.upstream.early import EarlyBlob
from tests.support.distribution import Distribution
from tests.support.dockerhub import SERVICE, DockerHubEmulator
from tests.support.images import OCI_MANIFEST, make_image, make_layer, sha256
from tests.support.seed import push_image
from tests.support.upstream import (
    FakeRegistry,
    Seeded,
    failure_of,
    metric,
    requests_counted,
    run,
    seed_image,
    shared_clients,
    tokens_issued,
    upstream_for,
    wait_async,
    with_client,
)


@pytest.fixture(scope="module")
def seeded(distribution: Distribution) -> Seeded:
    """An image tagged `latest` in a fresh library/* repository of the session's registry."""
    return seed_image(distribution.url)


# ------------------------------------------------------------------ tokens and auth
def test_token_flow_and_cache(hub: DockerHubEmulator, seeded: Seeded) -> None:
    upstream = upstream_for(hub.url)

    async def body(client: UpstreamClient) -> tuple[FetchedManifest | None, FetchedManifest | None]:
        first = await client.get_manifest(seeded.repository, "latest")
        second = await client.get_manifest(seeded.repository, "latest")
        return first, second

    first, second = run(with_client(upstream, body))
    assert first is not None
    assert second is not None
    assert tokens_issued(hub) == 1
    assert hub.count("GET", "token") == 1
    # One challenge, then the token was pre-sent.
    assert hub.count("GET", "manifest", status=401) == 1
    assert hub.count("GET", "manifest", status=200) == 2
    token_request = next(r for r in hub.requests if r.kind == "token")
    assert token_request.identity == "anonymous"


def test_a_new_repository_gets_its_token_before_its_first_request(
    hub: DockerHubEmulator, seeded: Seeded, distribution: Distribution
) -> None:
    """Only the first repository costs a 401: the token service it named is asked up
    front for the next repository's scope."""
    other = f"library/upstream-{secrets.token_hex(4)}"
    image = make_image([make_layer(size=1000, seed=other)], label=other)
    push_image(distribution.url, other, image, "latest")

    async def body(client: UpstreamClient) -> None:
        assert await client.get_manifest(seeded.repository, "latest") is not None
        assert await client.get_manifest(other, "latest") is not None
        async with client.open_blob(other, sha256(image.config)) as stream:
            assert await stream.read() == image.config

    run(with_client(upstream_for(hub.url), body))
    assert hub.count("GET", "manifest", status=401) == 1
    assert hub.count("GET", "blob", status=401) == 0
    assert tokens_issued(hub) == 2
    scopes = [r.path for r in hub.requests if r.kind == "token"]
    assert len(scopes) == 2


def test_concurrent_requests_share_one_token(hub: DockerHubEmulator, seeded: Seeded) -> None:
    upstream = upstream_for(hub.url)

    async def body(client: UpstreamClient) -> list[ManifestHead | None]:
        return await asyncio.gather(*(client.head_manifest(seeded.repository, "latest") for _ in range(10)))

    heads = run(with_client(upstream, body))
    assert all(h is not None and h.digest == seeded.image.digest for h in heads)
    assert tokens_issued(hub) == 1


def test_expired_token_is_renewed_before_the_request(hub: DockerHubEmulator, seeded: Seeded) -> None:
    hub.set_token_ttl(2)
    upstream = upstream_for(hub.url)

    async def body(client: UpstreamClient) -> None:
        assert await client.head_manifest(seeded.repository, "latest") is not None
        assert await client.head_manifest(seeded.repository, "latest") is not None
        assert tokens_issued(hub) == 1
        await asyncio.sleep(2.3)
        assert await client.head_manifest(seeded.repository, "latest") is not None

    run(with_client(upstream, body))
    assert tokens_issued(hub) == 2
    assert hub.count("HEAD", "manifest", status=401) == 1  # renewed without a new challenge


def test_revoked_token_is_replaced_after_401(hub: DockerHubEmulator, seeded: Seeded) -> None:
    upstream = upstream_for(hub.url)

    async def body(client: UpstreamClient) -> None:
        assert await client.head_manifest(seeded.repository, "latest") is not None
        hub.revoke_tokens()
        assert await client.head_manifest(seeded.repository, "latest") is not None

    run(with_client(upstream, body))
    assert tokens_issued(hub) == 2
    assert hub.count("HEAD", "manifest", status=401) == 2
    assert hub.count("HEAD", "manifest", status=200) == 2


def test_a_token_one_process_got_serves_the_others(
    hub: DockerHubEmulator, seeded: Seeded, redis_url: str
) -> None:
    """The edge gets the manifest, a worker the layer: one token for both, and the worker,
    which never met the upstream's token service, does not start with a 401."""

    async def edge(client: UpstreamClient) -> None:
        assert await client.get_manifest(seeded.repository, "latest") is not None

    async def worker(client: UpstreamClient) -> None:
        async with client.open_blob(seeded.repository, seeded.layer_digest) as stream:
            assert await stream.read() == seeded.layer

    shared_clients(upstream_for(hub.url), redis_url, edge, worker)
    assert tokens_issued(hub) == 1
    assert hub.count("GET", "manifest", status=401) == 1
    assert hub.count("GET", "blob", status=401) == 0
    # Another account's clients do not get it.
    shared_clients(upstream_for(hub.url, name="other", username="someone"), redis_url, edge)
    assert tokens_issued(hub) == 2


def test_an_upstream_without_auth_is_not_looked_up_in_redis_on_every_request(
    distribution: Distribution, seeded: Seeded, redis_url: str
) -> None:
    """Distribution without auth: after its first answer, requests go out without asking
    Redis for a token (the lookup is one PTTL each)."""

    def pttl_calls() -> int:
        with redis.Redis.from_url(redis_url) as client:
            stats = cast(dict[str, Any], client.info("commandstats"))
        return int(stats.get("cmdstat_pttl", {}).get("calls", 0))

    async def body(client: UpstreamClient) -> None:
        for _ in range(5):
            assert await client.head_manifest(seeded.repository, "latest") is not None

    before = pttl_calls()
    shared_clients(upstream_for(distribution.url), redis_url, body)
    assert pttl_calls() - before == 1


def test_a_shared_token_the_upstream_rejects_is_replaced_for_everyone(
    hub: DockerHubEmulator, seeded: Seeded, redis_url: str
) -> None:
    async def head(client: UpstreamClient) -> None:
        assert await client.head_manifest(seeded.repository, "latest") is not None

    async def revoke_then_head(client: UpstreamClient) -> None:
        hub.revoke_tokens()
        await head(client)

    shared_clients(upstream_for(hub.url), redis_url, head, revoke_then_head, head)
    # The second client was refused the first token and fetched one; the third took that.
    assert tokens_issued(hub) == 2
    assert hub.count("HEAD", "manifest", status=401) == 2
    assert hub.count("HEAD", "manifest", status=200) == 3


def test_second_401_is_an_auth_failure(hub: DockerHubEmulator, seeded: Seeded) -> None:
    challenge = (
        f'Bearer realm="{hub.url}/token",service="{SERVICE}",'
        f'scope="repository:{seeded.repository}:pull",error="insufficient_scope"'
    )
    hub.fail_always(401, kind="manifest", headers={"WWW-Authenticate": challenge})
    failure = failure_of(upstream_for(hub.url), lambda c: c.get_manifest(seeded.repository, "latest"))
    assert failure.kind == "auth"
    assert failure.status == 401
    assert "insufficient_scope" in failure.message
    # What Docker Hub says of a repository that does not exist: unknown to the client.
    assert failure.to_registry_error().code == "NAME_UNKNOWN"
    assert tokens_issued(hub) == 1  # one token, one retry with it, no loop
    assert hub.count("GET", "manifest") == 2


def test_basic_credentials_reach_the_token_endpoint(
    distribution: Distribution, seeded: Seeded, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEAWALL_TEST_HUB_PASSWORD", "alice-hub-secret")
    with DockerHubEmulator(distribution.url, accounts={"alice": "alice-hub-secret"}) as hub:
        hub.set_quota(limit=200, identity="alice")
        upstream = upstream_for(hub.url, username="alice", password_env="SEAWALL_TEST_HUB_PASSWORD")
        fetched = run(with_client(upstream, lambda c: c.get_manifest(seeded.repository, "latest")))
        assert fetched is not None
        assert hub.pulls("alice") == 1
        assert hub.pulls("anonymous") == 0
        assert hub.remaining("alice") == 199
        assert hub.remaining("anonymous") == 100
        assert fetched.rate_limit == RateLimit(limit=200, remaining=199, window=21600.0, source="alice")
        token_request = next(r for r in hub.requests if r.kind == "token")
        assert token_request.identity == "alice"


def test_wrong_credentials_are_an_auth_failure(
    distribution: Distribution, seeded: Seeded, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEAWALL_TEST_HUB_PASSWORD", "wrong")
    with DockerHubEmulator(distribution.url, accounts={"alice": "alice-hub-secret"}) as hub:
        upstream = upstream_for(hub.url, username="alice", password_env="SEAWALL_TEST_HUB_PASSWORD")
        failure = failure_of(upstream, lambda c: c.head_manifest(seeded.repository, "latest"))
        assert failure.kind == "auth"
        assert failure.status == 401
        assert "wrong" not in str(failure)


# ----------------------------------------------------------------------- manifests
def test_head_returns_digest_and_spends_no_quota(hub: DockerHubEmulator, seeded: Seeded) -> None:
    head = run(with_client(upstream_for(hub.url), lambda c: c.head_manifest(seeded.repository, "latest")))
    assert head is not None
    assert head.digest == seeded.image.digest
    assert head.media_type == OCI_MANIFEST
    assert head.size == len(seeded.image.manifest)
    assert head.rate_limit is not None
    assert head.rate_limit.remaining == 100
    assert hub.pulls() == 0
    assert hub.remaining() == 100


def test_get_returns_exact_bytes_and_spends_one_pull(hub: DockerHubEmulator, seeded: Seeded) -> None:
    upstream = upstream_for(hub.url)
    fetched = run(with_client(upstream, lambda c: c.get_manifest(seeded.repository, "latest")))
    assert fetched is not None
    assert fetched.body == seeded.image.manifest
    assert fetched.digest == seeded.image.digest
    assert fetched.media_type == OCI_MANIFEST
    assert hub.pulls() == 1
    assert hub.remaining() == 99
    assert fetched.rate_limit == RateLimit(limit=100, remaining=99, window=21600.0, source="127.0.0.1")
    manifest_gets = [r for r in hub.requests if r.kind == "manifest" and r.method == "GET"]
    assert all(r.accept == ACCEPT for r in manifest_gets)
    assert requests_counted(upstream, "manifest", "GET", "200") == 1
    assert requests_counted(upstream, "token", "GET", "200") == 1


def test_get_by_digest(hub: DockerHubEmulator, seeded: Seeded) -> None:
    fetched = run(
        with_client(upstream_for(hub.url), lambda c: c.get_manifest(seeded.repository, seeded.image.digest))
    )
    assert fetched is not None
    assert fetched.body == seeded.image.manifest


def test_unknown_manifest_is_none(hub: DockerHubEmulator, seeded: Seeded) -> None:
    async def body(client: UpstreamClient) -> tuple[Any, Any, Any]:
        return (
            await client.head_manifest(seeded.repository, "no-such-tag"),
            await client.get_manifest(seeded.repository, "no-such-tag"),
            await client.get_manifest("library/no-such-repo", "latest"),
        )

    assert run(with_client(upstream_for(hub.url), body)) == (None, None, None)
    assert hub.pulls() == 0  # Docker Hub does not charge a 404


# ----------------------------------------------------------------------------- 429s
def test_quota_429_with_retry_after_seconds(hub: DockerHubEmulator, seeded: Seeded) -> None:
    hub.fail_next(status=429, kind="manifest", method="GET", retry_after=120)
    upstream = upstream_for(hub.url)
    failure = failure_of(upstream, lambda c: c.get_manifest(seeded.repository, "latest"))
    assert failure.kind == "quota"
    assert failure.status == 429
    assert failure.retry_after == pytest.approx(120, abs=2)
    error = failure.to_registry_error()
    assert (error.code, error.status) == ("TOOMANYREQUESTS", 429)
    assert 115 <= int(error.headers["Retry-After"]) <= 121
    assert upstream.name in error.message
    assert metric("seawall_upstream_429_total", upstream=upstream.name, kind="quota") == 1
    # Never retried: exactly one manifest GET got through auth and was answered 429.
    assert hub.count("GET", "manifest", status=429) == 1


def test_quota_exhausted_with_epoch_retry_after(hub: DockerHubEmulator, seeded: Seeded) -> None:
    hub.set_quota(limit=1, window_seconds=300, retry_after="epoch")

    async def scenario() -> tuple[FetchedManifest | None, UpstreamFailure]:
        async with UpstreamClient(upstream_for(hub.url)) as client:
            fetched = await client.get_manifest(seeded.repository, "latest")
            with pytest.raises(UpstreamFailure) as info:
                await client.get_manifest(seeded.repository, "latest")
            return fetched, info.value

    fetched, failure = run(scenario())
    assert fetched is not None
    assert fetched.rate_limit is not None
    assert (fetched.rate_limit.remaining, fetched.rate_limit.limit) == (0, 1)
    assert fetched.rate_limit.window == 300
    assert failure.kind == "quota"
    assert failure.retry_after is not None
    assert 290 <= failure.retry_after <= 301
    assert failure.rate_limit is not None
    assert failure.rate_limit.remaining == 0
    assert hub.pulls() == 1


def test_quota_429_with_http_date(hub: DockerHubEmulator, seeded: Seeded) -> None:
    hub.fail_next(status=429, kind="manifest", method="GET", retry_after=90, retry_after_format="http-date")
    failure = failure_of(upstream_for(hub.url), lambda c: c.get_manifest(seeded.repository, "latest"))
    assert failure.kind == "quota"
    assert failure.retry_after is not None
    assert 85 <= failure.retry_after <= 91


def test_plain_text_429_is_abuse(hub: DockerHubEmulator, seeded: Seeded) -> None:
    hub.set_abuse_limit(0)
    upstream = upstream_for(hub.url)
    failure = failure_of(upstream, lambda c: c.get_manifest(seeded.repository, "latest"))
    assert failure.kind == "abuse"
    assert failure.status == 429
    assert failure.retry_after is None
    assert failure.to_registry_error().code == "TOOMANYREQUESTS"
    assert metric("seawall_upstream_429_total", upstream=upstream.name, kind="abuse") == 1
    assert hub.count("GET") == 1  # not retried, not even the token fetch


def test_plain_text_429_on_head_is_abuse(hub: DockerHubEmulator, seeded: Seeded) -> None:
    hub.fail_next(status=429, kind="manifest", method="HEAD", plain_text=True, retry_after=30)
    failure = failure_of(upstream_for(hub.url), lambda c: c.head_manifest(seeded.repository, "latest"))
    assert failure.kind == "abuse"
    assert failure.retry_after == pytest.approx(30, abs=2)


# ------------------------------------------------------------ other failure kinds
def test_server_error_is_status_failure(hub: DockerHubEmulator, seeded: Seeded) -> None:
    hub.fail_next(status=500, kind="manifest", method="GET")
    failure = failure_of(upstream_for(hub.url), lambda c: c.get_manifest(seeded.repository, "latest"))
    assert failure.kind == "status"
    assert failure.status == 500
    assert "500" in failure.message
    error = failure.to_registry_error()
    assert (error.code, error.status) == ("UPSTREAM_ERROR", 502)


def test_stalled_head_times_out(hub: DockerHubEmulator, seeded: Seeded) -> None:
    hub.stall("manifest", 30, method="HEAD")
    upstream = upstream_for(hub.url, head_timeout=0.5)
    started = time.monotonic()
    failure = failure_of(upstream, lambda c: c.head_manifest(seeded.repository, "latest"))
    elapsed = time.monotonic() - started
    assert failure.kind == "timeout"
    assert failure.status is None
    assert elapsed < 0.5 + 5
    assert failure.to_registry_error().status == 504
    hub.clear_faults()


def test_stalled_get_times_out_on_read_timeout(hub: DockerHubEmulator, seeded: Seeded) -> None:
    hub.stall("manifest", 30, method="GET")
    upstream = upstream_for(hub.url, read_timeout=0.5)
    started = time.monotonic()
    failure = failure_of(upstream, lambda c: c.get_manifest(seeded.repository, "latest"))
    assert failure.kind == "timeout"
    assert time.monotonic() - started < 0.5 + 5
    hub.clear_faults()


def test_stopped_upstream_is_refused(distribution: Distribution, seeded: Seeded) -> None:
    hub = DockerHubEmulator(distribution.url).start()
    url = hub.url
    hub.stop()
    upstream = upstream_for(url)
    failure = failure_of(upstream, lambda c: c.head_manifest(seeded.repository, "latest"))
    assert failure.kind == "refused"
    assert failure.status is None
    error = failure.to_registry_error()
    assert (error.code, error.status) == ("UNAVAILABLE", 503)
    assert requests_counted(upstream, "manifest", "HEAD", "error") == 1


# --------------------------------------------------------------------------- blobs
def test_blob_whole_and_from_offset(hub: DockerHubEmulator, seeded: Seeded) -> None:
    upstream = upstream_for(hub.url)
    layer, digest = seeded.layer, seeded.layer_digest

    async def body(client: UpstreamClient) -> None:
        async with client.open_blob(seeded.repository, digest) as stream:
            assert (stream.offset, stream.total_size) == (0, len(layer))
            assert await stream.read() == layer
        async with client.open_blob(seeded.repository, digest, offset=1000) as stream:
            assert (stream.offset, stream.total_size) == (1000, len(layer))
            chunks = [chunk async for chunk in stream.iter_chunks(64 * 1024)]
            assert all(0 < len(c) <= 64 * 1024 for c in chunks)
            assert b"".join(chunks) == layer[1000:]

    before = metric("seawall_upstream_bytes_total", upstream=upstream.name)
    run(with_client(upstream, body))
    assert metric("seawall_upstream_bytes_total", upstream=upstream.name) - before == 2 * len(layer) - 1000
    ranges = [r.range for r in hub.requests if r.kind == "blob" and r.status in (200, 206)]
    assert ranges == [None, "bytes=1000-"]
    assert hub.pulls() == 0


@pytest.mark.parametrize(
    ("offset", "ranges"),
    [(0, [None]), (1000, [None, "bytes=1000-"])],
    ids=["handed-over-from-the-start", "dropped-for-a-resume"],
)
def test_early_blob_get(
    hub: DockerHubEmulator, seeded: Seeded, offset: int, ranges: list[str | None]
) -> None:
    """The GET goes out before anyone asks for the stream; asked from byte 0 that response
    is the stream, asked from further on it is dropped and a ranged GET follows."""
    layer, digest = seeded.layer, seeded.layer_digest

    async def body(client: UpstreamClient) -> None:
        async with EarlyBlob(client, seeded.repository, digest) as early:
            await wait_async(lambda: hub.blob_gets(digest), "the early GET")
            async with early.open(offset) as stream:
                assert (stream.offset, stream.total_size) == (offset, len(layer))
                assert await stream.read() == layer[offset:]

    run(with_client(upstream_for(hub.url), body))
    assert [r.range for r in hub.blob_gets(digest)] == ranges


def test_early_blob_failure_is_raised_by_open(hub: DockerHubEmulator, seeded: Seeded) -> None:
    missing = sha256(b"not there " + secrets.token_bytes(8))

    async def body(client: UpstreamClient) -> None:
        async with EarlyBlob(client, seeded.repository, missing) as early, early.open(0):
            raise AssertionError("unreachable")

    assert failure_of(upstream_for(hub.url), body).kind == "not_found"


def test_early_blob_not_taken_is_closed(hub: DockerHubEmulator, seeded: Seeded) -> None:
    """A fill that finds the blob needs nothing leaves the block without opening it."""
    digest = seeded.layer_digest
    hub.throttle_blob(digest, 50 * 1024)  # the whole body would take about 6 s

    async def body(client: UpstreamClient) -> None:
        # Kept referenced past the block, so only leaving it (not garbage collection) can
        # close the response.
        early = EarlyBlob(client, seeded.repository, digest)
        async with early:
            await wait_async(lambda: hub.blob_gets(digest), "the early GET")
        # The response was closed: the upstream's send ends long before the body would.
        await wait_async(lambda: hub.blob_gets(digest)[0].duration is not None, "the early GET's end")
        assert hub.blob_gets(digest)[0].duration < 3
        del early
        hub.clear_faults()
        # The client still works, and nothing of the early GET is left pending.
        async with client.open_blob(seeded.repository, digest) as stream:
            assert await stream.read() == seeded.layer
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert pending == []

    run(with_client(upstream_for(hub.url), body))


def test_unknown_blob_is_not_found(hub: DockerHubEmulator, seeded: Seeded) -> None:
    missing = sha256(b"not there " + secrets.token_bytes(8))

    async def body(client: UpstreamClient) -> None:
        async with client.open_blob(seeded.repository, missing):
            raise AssertionError("unreachable")

    failure = failure_of(upstream_for(hub.url), body)
    assert failure.kind == "not_found"
    assert failure.status == 404
    error = failure.to_registry_error("BLOB_UNKNOWN")
    assert (error.code, error.status) == ("BLOB_UNKNOWN", 404)


def test_cut_blob_is_a_network_failure(hub: DockerHubEmulator, seeded: Seeded) -> None:
    hub.cut_blob_after(seeded.layer_digest, 50_000)

    async def body(client: UpstreamClient) -> None:
        async with client.open_blob(seeded.repository, seeded.layer_digest) as stream:
            await stream.read()

    failure = failure_of(upstream_for(hub.url), body)
    assert failure.kind == "network"


# ------------------------------------------ Basic auth, CDN redirect, Range ignored
def test_basic_auth_redirect_drops_authorization_and_ignored_range(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SEAWALL_TEST_FAKE_PASSWORD", "pw")
    blob = bytes(range(256)) * 400
    digest = sha256(blob)
    image = make_image(label="fake")

    async def scenario() -> None:
        async with FakeRegistry(blob, image.manifest) as fake:
            upstream = upstream_for(fake.url, username="bob", password_env="SEAWALL_TEST_FAKE_PASSWORD")
            async with UpstreamClient(upstream) as client:
                fetched = await client.get_manifest("team/app", "v1")
                assert fetched is not None
                assert fetched.body == image.manifest
                assert fetched.digest == image.digest  # sha256 of the body
                assert fetched.media_type == OCI_MANIFEST  # from the body's mediaType
                async with client.open_blob("team/app", digest, offset=5000) as stream:
                    # The CDN answered 200 with the whole blob: the client skipped ahead.
                    assert (stream.offset, stream.total_size) == (5000, len(blob))
                    assert await stream.read() == blob[5000:]
            # Challenged once, then Basic was pre-sent; nothing reached the CDN.
            assert fake.registry_auth[0] is None
            assert all(a is not None and a.startswith("Basic ") for a in fake.registry_auth[1:])
            assert len(fake.registry_auth) == 3
            assert fake.cdn_auth == [None]
            assert fake.cdn_ranges == ["bytes=5000-"]

    run(scenario())


def test_client_must_be_started() -> None:
    client = UpstreamClient(upstream_for("http://127.0.0.1:9"))
    with pytest.raises(RuntimeError):
        run(client.head_manifest("library/alpine", "latest"))


def test_manifest_not_matching_its_digest_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEAWALL_TEST_FAKE_PASSWORD", "pw")
    image = make_image(label="fake")
    other = sha256(b"some other manifest")

    async def scenario() -> UpstreamFailure:
        async with FakeRegistry(b"", image.manifest) as fake:
            upstream = upstream_for(fake.url, username="bob", password_env="SEAWALL_TEST_FAKE_PASSWORD")
            async with UpstreamClient(upstream) as client:
                with pytest.raises(UpstreamFailure) as info:
                    await client.get_manifest("team/app", other)
                return info.value

    before = metric("seawall_digest_mismatch_total", source="upstream")
    failure = run(scenario())
    assert failure.kind == "status"
    assert other in failure.message
    assert failure.to_registry_error().code == "UPSTREAM_ERROR"
    assert metric("seawall_digest_mismatch_total", source="upstream") == before + 1
