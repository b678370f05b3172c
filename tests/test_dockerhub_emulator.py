"""The Docker Hub emulator, over real HTTP, in front of a real Distribution registry."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.dockerhub import DockerHubEmulator

REGISTRY_BIN = shutil.which("docker-registry")
pytestmark = pytest.mark.skipif(REGISTRY_BIN is None, reason="docker-registry is not installed")

ROOT = Path(__file__).resolve().parent.parent
REPO = "library/alpine"
SCHEMA2 = "application/vnd.docker.distribution.manifest.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
ACCEPT_ALL = ", ".join([SCHEMA2, OCI_MANIFEST, OCI_INDEX])
ALPINE_MANIFEST = f"/v2/{REPO}/manifests/latest"
TOOMANY = (
    "You have reached your pull rate limit. You may increase the limit by authenticating "
    "and upgrading: https://www.docker.com/increase-rate-limit"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Seeded:
    url: str
    manifest_digest: str
    layer: bytes
    layer_digest: str
    index_digest: str
    platform_digests: list[str]


def push_blob(client: httpx.Client, name: str, data: bytes) -> str:
    digest = sha256(data)
    r = client.post(f"/v2/{name}/blobs/uploads/")
    assert r.status_code == 202, r.text
    location = httpx.URL(r.headers["Location"]).copy_merge_params({"digest": digest})
    r = client.put(location, content=data, headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    return digest


def push_manifest(client: httpx.Client, name: str, ref: str, doc: dict[str, Any], media_type: str) -> str:
    body = json.dumps(doc).encode()
    r = client.put(f"/v2/{name}/manifests/{ref}", content=body, headers={"Content-Type": media_type})
    assert r.status_code == 201, r.text
    return sha256(body)


def push_image(client: httpx.Client, name: str, layer: bytes, arch: str, media_type: str) -> str:
    config = json.dumps(
        {
            "architecture": arch,
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [sha256(layer)]},
        }
    ).encode()
    oci = media_type == OCI_MANIFEST
    doc = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json"
            if oci
            else "application/vnd.docker.container.image.v1+json",
            "size": len(config),
            "digest": push_blob(client, name, config),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"
                if oci
                else "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "size": len(layer),
                "digest": push_blob(client, name, layer),
            }
        ],
    }
    return push_manifest(client, name, sha256(json.dumps(doc).encode()), doc, media_type)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    """A real Distribution registry on a free port, seeded with library/alpine images."""
    root = tmp_path_factory.mktemp("distribution")
    port = free_port()
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log: {level: error, accesslog: {disabled: true}}\n"
        f"storage: {{filesystem: {{rootdirectory: {root / 'data'}}}, delete: {{enabled: true}}}}\n"
        f"http: {{addr: 127.0.0.1:{port}, secret: emulator-tests}}\n"
    )
    url = f"http://127.0.0.1:{port}"
    with (root / "registry.log").open("wb") as log:
        proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=log, stderr=log)  # type: ignore[list-item]
    try:
        with httpx.Client(base_url=url, timeout=10) as client:
            deadline = time.monotonic() + 20
            while True:
                try:
                    if client.get("/v2/").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("docker-registry did not start:\n" + (root / "registry.log").read_text())
                time.sleep(0.05)
            layer = os.urandom(300 * 1024)
            manifest = push_image(client, REPO, layer, "amd64", SCHEMA2)
            client.put(
                f"/v2/{REPO}/manifests/latest",
                content=client.get(f"/v2/{REPO}/manifests/{manifest}", headers={"Accept": SCHEMA2}).content,
                headers={"Content-Type": SCHEMA2},
            ).raise_for_status()
            platforms = [
                push_image(client, "library/multi", os.urandom(1024), arch, OCI_MANIFEST)
                for arch in ("amd64", "arm64")
            ]
            index = {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [
                    {
                        "mediaType": OCI_MANIFEST,
                        "digest": d,
                        "size": len(
                            client.get(
                                f"/v2/library/multi/manifests/{d}", headers={"Accept": OCI_MANIFEST}
                            ).content
                        ),
                        "platform": {"architecture": arch, "os": "linux"},
                    }
                    for d, arch in zip(platforms, ("amd64", "arm64"), strict=True)
                ],
            }
            index_digest = push_manifest(client, "library/multi", "latest", index, OCI_INDEX)
        yield Seeded(url, manifest, layer, sha256(layer), index_digest, platforms)
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def hub(registry: Seeded) -> Iterator[DockerHubEmulator]:
    with DockerHubEmulator(registry.url, accounts={"alice": "s3cret"}) as emulator:
        yield emulator


@pytest.fixture
def client(hub: DockerHubEmulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=hub.url, timeout=10) as c:
        yield c


def token(client: httpx.Client, *scopes: str, auth: tuple[str, str] | None = None) -> str:
    params: list[tuple[str, str | int | float | bool | None]] = [("service", "registry.docker.io")]
    params += [("scope", s) for s in scopes]
    r = client.get("/token", params=params, auth=auth)
    assert r.status_code == 200, r.text
    return str(r.json()["token"])


def bearer(client: httpx.Client, repo: str = REPO, auth: tuple[str, str] | None = None) -> dict[str, str]:
    return {
        "Authorization": "Bearer " + token(client, f"repository:{repo}:pull", auth=auth),
        "Accept": ACCEPT_ALL,
    }


# ------------------------------------------------------------------------------ auth
def test_token_flow(hub: DockerHubEmulator, client: httpx.Client, registry: Seeded) -> None:
    r = client.get("/v2/")
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == (f'Bearer realm="{hub.url}/token",service="registry.docker.io"')
    r = client.get(ALPINE_MANIFEST)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == (
        f'Bearer realm="http://127.0.0.1:{hub.port}/token",service="registry.docker.io",'
        f'scope="repository:library/alpine:pull"'
    )
    assert r.json()["errors"][0]["code"] == "UNAUTHORIZED"

    r = client.get(
        "/token",
        params={"service": "registry.docker.io", "scope": "repository:library/alpine:pull"},
    )
    body = r.json()
    assert r.status_code == 200
    assert body["token"] == body["access_token"]
    assert body["expires_in"] == 60
    assert body["issued_at"].endswith("Z")

    auth = {"Authorization": f"Bearer {body['token']}", "Accept": SCHEMA2}
    r = client.get(ALPINE_MANIFEST, headers=auth)
    assert r.status_code == 200
    assert r.headers["Docker-Content-Digest"] == registry.manifest_digest
    assert client.get("/v2/", headers=auth).status_code == 200
    # the token only covers library/alpine
    r = client.get("/v2/library/multi/manifests/latest", headers=auth)
    assert r.status_code == 401
    assert 'scope="repository:library/multi:pull",error="insufficient_scope"' in r.headers["WWW-Authenticate"]
    # garbage and revoked tokens are refused
    assert client.get(ALPINE_MANIFEST, headers={"Authorization": "Bearer nope"}).status_code == 401
    hub.revoke_tokens()
    r = client.get(ALPINE_MANIFEST, headers=auth)
    assert r.status_code == 401
    assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]
    assert hub.count("GET", "token") == 1
    assert hub.count("GET", "manifest") == 5
    assert hub.count("GET", "manifest", status=200) == 1


def test_token_expiry_scopes_and_accounts(hub: DockerHubEmulator, client: httpx.Client) -> None:
    hub.set_token_ttl(0.3)
    headers = bearer(client)
    assert client.head(ALPINE_MANIFEST, headers=headers).status_code == 200
    time.sleep(0.4)
    assert client.head(ALPINE_MANIFEST, headers=headers).status_code == 401

    hub.set_token_ttl(60)
    assert (
        client.get(
            "/token", params={"scope": "repository:library/alpine:pull"}, auth=("alice", "wrong")
        ).status_code
        == 401
    )
    assert client.get("/token", params={"service": "auth.example"}).status_code == 400
    # several scopes in one token request, space-separated or repeated
    t = token(
        client,
        "repository:library/alpine:pull repository:library/multi:pull",
        "repository:library/other:pull",
    )
    for repo in ("alpine", "multi"):
        r = client.head(
            f"/v2/library/{repo}/manifests/latest",
            headers={"Authorization": f"Bearer {t}", "Accept": ACCEPT_ALL},
        )
        assert r.status_code == 200
    # anonymous tokens never grant push; alice's do
    anon = token(client, "repository:library/alpine:pull,push")
    r = client.post(f"/v2/{REPO}/blobs/uploads/", headers={"Authorization": f"Bearer {anon}"})
    assert r.status_code == 401
    assert (
        'scope="repository:library/alpine:pull,push",error="insufficient_scope"'
        in r.headers["WWW-Authenticate"]
    )
    alice = token(client, "repository:library/pushed:pull,push", auth=("alice", "s3cret"))
    data = b"pushed through the emulator"
    r = client.post("/v2/library/pushed/blobs/uploads/", headers={"Authorization": f"Bearer {alice}"})
    assert r.status_code == 202
    assert r.headers["Location"].startswith(hub.url + "/v2/library/pushed/blobs/uploads/")
    location = httpx.URL(r.headers["Location"]).copy_merge_params({"digest": sha256(data)})
    r = client.put(location, content=data, headers={"Authorization": f"Bearer {alice}"})
    assert r.status_code == 201, r.text
    r = client.get(f"/v2/library/pushed/blobs/{sha256(data)}", headers={"Authorization": f"Bearer {alice}"})
    assert r.content == data
    assert hub.count("GET", "token") == 6
    assert hub.count("POST", "other") == 2
    assert hub.count("PUT", "other") == 1


# ----------------------------------------------------------------------------- quota
def test_quota_counts_manifest_gets_only(
    hub: DockerHubEmulator, client: httpx.Client, registry: Seeded
) -> None:
    headers = bearer(client)
    r = client.head(ALPINE_MANIFEST, headers=headers)
    assert r.status_code == 200
    assert r.headers["ratelimit-limit"] == "100;w=21600"
    assert r.headers["ratelimit-remaining"] == "100;w=21600"
    assert r.headers["docker-ratelimit-source"] == "127.0.0.1"
    assert int(r.headers["Content-Length"]) > 0
    assert hub.remaining() == 100

    r = client.get(ALPINE_MANIFEST, headers=headers)
    assert r.headers["ratelimit-remaining"] == "99;w=21600"
    r = client.get(f"/v2/{REPO}/blobs/{registry.layer_digest}", headers=headers)
    assert r.content == registry.layer
    assert "ratelimit-remaining" not in r.headers
    assert client.get(f"/v2/{REPO}/tags/list", headers=headers).json()["tags"] == ["latest"]
    # a 404 manifest GET is not a pull
    assert client.get(f"/v2/{REPO}/manifests/nope", headers=headers).status_code == 404
    assert hub.remaining() == 99
    assert hub.pulls() == 1

    # multi-arch: the index GET is free, each platform manifest GET is a pull
    multi = bearer(client, "library/multi")
    r = client.get("/v2/library/multi/manifests/latest", headers=multi)
    assert r.headers["Content-Type"] == OCI_INDEX
    assert r.headers["ratelimit-remaining"] == "99;w=21600"
    for d in registry.platform_digests:
        assert client.get(f"/v2/library/multi/manifests/{d}", headers=multi).status_code == 200
    assert hub.remaining() == 97
    assert hub.count("GET", "manifest") == 5
    assert hub.count("HEAD", "manifest") == 1
    assert hub.count("GET", "blob") == 1
    assert hub.count("GET", "tags") == 1

    # quota is per identity: alice's pulls don't touch the anonymous quota
    r = client.get(ALPINE_MANIFEST, headers=bearer(client, auth=("alice", "s3cret")))
    assert r.headers["docker-ratelimit-source"] == "alice"
    assert r.headers["ratelimit-remaining"] == "99;w=21600"
    assert hub.remaining() == 97
    assert hub.remaining("alice") == 99
    assert hub.pulls("alice") == 1
    assert hub.pulls("anonymous") == 3


def test_quota_exhausted(hub: DockerHubEmulator, client: httpx.Client) -> None:
    hub.set_quota(limit=5, window_seconds=3600, remaining=2)
    headers = bearer(client)
    for left in (1, 0):
        r = client.get(ALPINE_MANIFEST, headers=headers)
        assert r.status_code == 200
        assert r.headers["ratelimit-remaining"] == f"{left};w=3600"
    r = client.get(ALPINE_MANIFEST, headers=headers)
    assert r.status_code == 429
    assert r.json() == {"errors": [{"code": "TOOMANYREQUESTS", "message": TOOMANY}]}
    assert r.headers["ratelimit-limit"] == "5;w=3600"
    assert r.headers["ratelimit-remaining"] == "0;w=3600"
    assert "Retry-After" not in r.headers
    # HEAD is free, even over the limit
    r = client.head(ALPINE_MANIFEST, headers=headers)
    assert r.status_code == 200
    assert r.headers["ratelimit-remaining"] == "0;w=3600"
    assert hub.remaining() == 0
    assert hub.count("GET", "manifest", status=429) == 1
    # another identity still has its own quota
    assert client.get(ALPINE_MANIFEST, headers=bearer(client, auth=("alice", "s3cret"))).status_code == 200


@pytest.mark.parametrize("form", ["seconds", "epoch", "http-date"])
def test_quota_retry_after_forms(hub: DockerHubEmulator, client: httpx.Client, form: str) -> None:
    hub.set_quota(limit=1, window_seconds=600, retry_after=form)
    headers = bearer(client)
    assert client.get(ALPINE_MANIFEST, headers=headers).status_code == 200
    r = client.get(ALPINE_MANIFEST, headers=headers)
    assert r.status_code == 429
    value = r.headers["Retry-After"]
    if form == "seconds":
        assert 590 <= int(value) <= 600
    elif form == "epoch":
        assert 590 <= int(value) - time.time() <= 601
    else:
        assert 590 <= parsedate_to_datetime(value).timestamp() - time.time() <= 601


def test_quota_window_and_unlimited(hub: DockerHubEmulator, client: httpx.Client) -> None:
    hub.set_quota(limit=1, window_seconds=0.5)
    headers = bearer(client)
    assert client.get(ALPINE_MANIFEST, headers=headers).status_code == 200
    assert client.get(ALPINE_MANIFEST, headers=headers).status_code == 429
    time.sleep(0.6)
    assert client.get(ALPINE_MANIFEST, headers=headers).status_code == 200

    hub.set_quota(limit=1, identity="alice", send_headers=False)  # alice pays; anonymous doesn't
    alice = bearer(client, auth=("alice", "s3cret"))
    assert client.get(ALPINE_MANIFEST, headers=alice).status_code == 200
    assert client.get(ALPINE_MANIFEST, headers=alice).status_code == 200
    assert client.get(ALPINE_MANIFEST, headers=headers).status_code == 429

    hub.set_quota(send_headers=False)  # paid account: not counted, no headers
    for _ in range(3):
        r = client.get(ALPINE_MANIFEST, headers=headers)
        assert r.status_code == 200
        assert "ratelimit-limit" not in r.headers
        assert "docker-ratelimit-source" not in r.headers
    assert hub.remaining() is None


def test_count_index_gets_option(registry: Seeded) -> None:
    with (
        DockerHubEmulator(registry.url, count_index_gets=True) as hub,
        httpx.Client(base_url=hub.url) as c,
    ):
        r = c.get("/v2/library/multi/manifests/latest", headers=bearer(c, "library/multi"))
        assert r.headers["Content-Type"] == OCI_INDEX
        assert r.headers["ratelimit-remaining"] == "99;w=21600"
        assert hub.pulls() == 1


# ---------------------------------------------------------------- faults and limits
def test_fail_next_with_retry_after_forms(hub: DockerHubEmulator, client: httpx.Client) -> None:
    headers = bearer(client)
    hub.fail_next(1, 429, kind="manifest", retry_after=30)
    r = client.get(ALPINE_MANIFEST, headers=headers)
    assert r.status_code == 429
    assert r.headers["Retry-After"] == "30"
    assert r.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    hub.fail_next(1, 429, kind="manifest", retry_after=30, retry_after_format="epoch")
    r = client.get(ALPINE_MANIFEST, headers=headers)
    assert 28 <= int(r.headers["Retry-After"]) - time.time() <= 31
    hub.fail_next(1, 503, kind="manifest", retry_after="Wed, 21 Oct 2037 07:28:00 GMT")
    r = client.get(ALPINE_MANIFEST, headers=headers)
    assert (r.status_code, r.headers["Retry-After"]) == (503, "Wed, 21 Oct 2037 07:28:00 GMT")
    assert client.get(ALPINE_MANIFEST, headers=headers).status_code == 200
    assert hub.pulls() == 1  # faulted requests are not pulls


def test_plain_text_429_and_abuse_limit(hub: DockerHubEmulator, client: httpx.Client) -> None:
    headers = bearer(client)
    hub.fail_next(1, 429, kind="blob", plain_text=True)
    r = client.get(f"/v2/{REPO}/blobs/sha256:{'0' * 64}", headers=headers)
    assert r.status_code == 429
    assert r.headers["Content-Type"].startswith("text/plain")
    assert r.text == "Too Many Requests"

    hub.set_abuse_limit(3, window_seconds=60)
    statuses = [client.head(ALPINE_MANIFEST, headers=headers).status_code for _ in range(3)]
    r = client.get("/token", params={"scope": "repository:library/alpine:pull"})
    assert statuses == [200, 200, 200]
    assert (r.status_code, r.text) == (429, "Too Many Requests")
    hub.clear_faults()
    assert client.head(ALPINE_MANIFEST, headers=headers).status_code == 200


def test_fail_next_always_and_clear(hub: DockerHubEmulator, client: httpx.Client, registry: Seeded) -> None:
    headers = bearer(client)
    blob = f"/v2/{REPO}/blobs/{registry.layer_digest}"
    hub.fail_next(2, 500, kind="manifest", method="GET")
    assert client.head(ALPINE_MANIFEST, headers=headers).status_code == 200  # HEAD doesn't match
    assert client.get(blob, headers=headers).status_code == 200  # nor does a blob
    assert [client.get(ALPINE_MANIFEST, headers=headers).status_code for _ in range(3)] == [
        500,
        500,
        200,
    ]

    hub.fail_always(502, kind="blob", body="bad gateway")
    assert [client.get(blob, headers=headers).status_code for _ in range(3)] == [502] * 3
    assert client.get(blob, headers=headers).text == "bad gateway"
    hub.clear_faults()
    assert client.get(blob, headers=headers).status_code == 200

    hub.fail_next(1, 0, kind="manifest")  # status 0: drop the connection unanswered
    with pytest.raises(httpx.RemoteProtocolError):
        client.get(ALPINE_MANIFEST, headers=headers)
    assert client.get(ALPINE_MANIFEST, headers=headers).status_code == 200
    assert [r.fault for r in hub.requests if r.fault] == ["fail:500"] * 2 + ["fail:502"] * 4 + ["fail:0"]


def test_stall(hub: DockerHubEmulator, client: httpx.Client) -> None:
    headers = bearer(client)
    hub.stall("manifest", 2.0, times=1)
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        client.get(ALPINE_MANIFEST, headers=headers, timeout=0.3)
    assert time.monotonic() - started < 1.5
    assert client.get(ALPINE_MANIFEST, headers=headers).status_code == 200  # times=1: used up
    hub.stall("token", 0.3)
    started = time.monotonic()
    token(client, "repository:library/alpine:pull")
    assert time.monotonic() - started >= 0.3


def test_range_pass_through(hub: DockerHubEmulator, client: httpx.Client, registry: Seeded) -> None:
    headers = {**bearer(client), "Range": "bytes=1000-1999"}
    r = client.get(f"/v2/{REPO}/blobs/{registry.layer_digest}", headers=headers)
    assert r.status_code == 206
    assert r.headers["Content-Range"] == f"bytes 1000-1999/{len(registry.layer)}"
    assert r.headers["Content-Length"] == "1000"
    assert r.headers["Docker-Content-Digest"] == registry.layer_digest
    assert r.content == registry.layer[1000:2000]
    assert hub.requests[-1].range == "bytes=1000-1999"
    assert hub.requests[-1].status == 206


def test_corrupt_blob(hub: DockerHubEmulator, client: httpx.Client, registry: Seeded) -> None:
    headers = bearer(client)
    hub.corrupt_blob(registry.layer_digest)
    r = client.get(f"/v2/{REPO}/blobs/{registry.layer_digest}", headers=headers)
    assert r.status_code == 200
    assert len(r.content) == len(registry.layer)
    assert r.content != registry.layer
    assert sha256(r.content) != registry.layer_digest
    assert r.headers["Docker-Content-Digest"] == registry.layer_digest  # the lie is in the body
    r = client.get(f"/v2/{REPO}/blobs/{registry.layer_digest}", headers={**headers, "Range": "bytes=0-9"})
    assert r.status_code == 206
    assert len(r.content) == 10
    assert r.content != registry.layer[:10]


def test_cut_blob_after(hub: DockerHubEmulator, client: httpx.Client, registry: Seeded) -> None:
    headers = bearer(client)
    hub.cut_blob_after(registry.layer_digest, 100_000)
    received = bytearray()
    url = f"/v2/{REPO}/blobs/{registry.layer_digest}"
    with client.stream("GET", url, headers=headers) as r:
        assert r.headers["Content-Length"] == str(len(registry.layer))
        with pytest.raises(httpx.RemoteProtocolError):  # noqa: PT012
            for chunk in r.iter_bytes():
                received += chunk
    assert bytes(received) == registry.layer[:100_000]
    assert hub.requests[-1].fault == "cut:100000"
    assert hub.requests[-1].bytes_sent == 100_000


def test_throttle_blob(hub: DockerHubEmulator, client: httpx.Client, registry: Seeded) -> None:
    headers = bearer(client)
    hub.throttle_blob(None, 1_000_000)
    started = time.monotonic()
    r = client.get(f"/v2/{REPO}/blobs/{registry.layer_digest}", headers=headers)
    assert r.content == registry.layer
    assert time.monotonic() - started >= 0.25  # 300 KiB at 1 MB/s
    # a consumer that gives up mid-transfer does not upset the emulator
    hub.throttle_blob(registry.layer_digest, 100_000)
    with client.stream("GET", f"/v2/{REPO}/blobs/{registry.layer_digest}", headers=headers) as r:
        first = next(r.iter_raw())
    assert 0 < len(first) < len(registry.layer)
    hub.throttle_blob(registry.layer_digest, None)
    hub.throttle_blob(None, None)
    assert client.get(f"/v2/{REPO}/blobs/{registry.layer_digest}", headers=headers).content == registry.layer


# -------------------------------------------------------------------------- counters
def test_counters_and_requests(hub: DockerHubEmulator, client: httpx.Client, registry: Seeded) -> None:
    headers = bearer(client)
    client.head(ALPINE_MANIFEST, headers=headers)
    client.get(ALPINE_MANIFEST, headers=headers)
    client.get(f"/v2/{REPO}/manifests/{registry.manifest_digest}", headers=headers)
    client.get(f"/v2/{REPO}/blobs/{registry.layer_digest}", headers={**headers, "Range": "bytes=0-0"})
    client.get("/v2/alpine/manifests/latest", headers=headers)  # no name rewriting: 401 (scope)
    assert hub.counts == {
        ("GET", "token"): 1,
        ("HEAD", "manifest"): 1,
        ("GET", "manifest"): 3,
        ("GET", "blob"): 1,
    }
    assert hub.count("GET", "manifest", path=ALPINE_MANIFEST) == 1
    assert hub.count("HEAD", "manifest", path=ALPINE_MANIFEST) == 1
    assert hub.count("GET", path="/v2/alpine/manifests/latest") == 1
    assert hub.count("GET", "manifest", status=401) == 1
    assert hub.path_counts[("GET", f"/v2/{REPO}/manifests/{registry.manifest_digest}")] == 1
    last = hub.requests[-2]
    assert (last.method, last.kind, last.range, last.status) == ("GET", "blob", "bytes=0-0", 206)
    assert last.identity == "anonymous"
    assert hub.requests[0].kind == "token"
    hub.reset_counters()
    assert hub.counts == {}
    assert hub.requests == []
    assert hub.count("GET", "manifest") == 0
    assert hub.remaining() == 98  # quota usage survives a counter reset


# ------------------------------------------------------------------------- lifecycle
def test_stop_then_start_refuses_then_serves(hub: DockerHubEmulator, registry: Seeded) -> None:
    url = hub.url
    hub.stop()
    with httpx.Client(timeout=5) as c:
        with pytest.raises(httpx.ConnectError):
            c.get(url + "/v2/")
        hub.start()
        assert hub.url == url
        assert c.get(url + "/v2/").status_code == 401


def test_upstream_down_is_502(registry: Seeded) -> None:
    with (
        DockerHubEmulator(f"http://127.0.0.1:{free_port()}") as hub,
        httpx.Client(base_url=hub.url) as c,
    ):
        r = c.get(ALPINE_MANIFEST, headers=bearer(c))
        assert r.status_code == 502
        assert hub.pulls() == 0


def test_control_api_subprocess(registry: Seeded) -> None:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "tests.support.dockerhub",
        "--upstream",
        registry.url,
        "--port",
        str(port),
        "--quota",
        "3",
        "--window",
        "600",
        "--account",
        "bob:pw",
    ]
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.strip() == f"dockerhub emulator listening on http://127.0.0.1:{port}", line + (
                proc.stderr.read() if proc.poll() is not None and proc.stderr else ""
            )
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
                headers = bearer(c)
                assert c.get(ALPINE_MANIFEST, headers=headers).headers["ratelimit-remaining"] == "2;w=600"
                counts = c.get("/_emulator/counts").json()
                assert counts["by_kind"] == {"GET manifest": 1, "GET token": 1}
                assert counts["by_path"][f"GET {ALPINE_MANIFEST}"] == 1
                assert counts["remaining"] == {"anonymous": 2, "bob": 3}
                assert counts["pulls"] == {"anonymous": 1}

                assert (
                    c.post("/_emulator/faults", json={"n": 1, "status": 503, "kind": "manifest"}).status_code
                    == 200
                )
                assert c.get(ALPINE_MANIFEST, headers=headers).status_code == 503
                assert c.post("/_emulator/faults", json={"bogus": 1}).status_code == 400
                assert (
                    c.post(
                        "/_emulator/quota", json={"limit": 10, "window_seconds": 60, "remaining": 1}
                    ).status_code
                    == 200
                )
                assert c.get("/_emulator/quota").json() == {"identity": "anonymous", "remaining": 1}
                assert c.get(ALPINE_MANIFEST, headers=headers).status_code == 200
                assert c.get(ALPINE_MANIFEST, headers=headers).status_code == 429

                r = c.post(
                    "/_emulator/call/count",
                    json={"method": "GET", "kind": "manifest", "status": 429},
                )
                assert r.json() == {"ok": True, "result": 1}
                assert (
                    c.post("/_emulator/call/stall", json={"kind": "blob", "seconds": 0.1}).status_code == 200
                )
                assert c.post("/_emulator/call/__init__", json={}).status_code == 404
                assert c.post("/_emulator/faults/clear").status_code == 200
                requests = c.get("/_emulator/requests").json()
                assert [r["status"] for r in requests if r["kind"] == "manifest"] == [
                    200,
                    503,
                    200,
                    429,
                ]
                assert c.post("/_emulator/reset").status_code == 200
                assert c.get("/_emulator/counts").json()["by_kind"] == {}
        finally:
            proc.terminate()
            assert proc.wait(10) == 0


@pytest.mark.clients
@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")
def test_skopeo_pulls_through_the_emulator(hub: DockerHubEmulator, registry: Seeded, tmp_path: Path) -> None:
    """A real client does the whole dance: challenge, token, manifest, config and layer."""
    host = hub.url.removeprefix("http://")
    out = subprocess.run(
        [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--src-tls-verify=false",
            f"docker://{host}/library/alpine:latest",
            f"dir:{tmp_path / 'img'}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "img" / registry.layer_digest.removeprefix("sha256:")).read_bytes() == registry.layer
    assert hub.pulls() == 1
    assert hub.count("GET", "blob") == 2  # config + layer
    assert hub.count("GET", "token") >= 1
