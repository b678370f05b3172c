"""The Docker Hub emulator, over real HTTP, in front of a real Distribution registry."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from email.utils import parsedate_to_datetime
from pathlib import Path

import httpx
import pytest

from services.processes import free_port
from tests.support.distribution import distribution_binary
from tests.support.dockerhub import DockerHubEmulator
from tests.support.images import OCI_INDEX, sha256
from tests.support.seeded_hub import ACCEPT_ALL, ALPINE_MANIFEST, REPO, SCHEMA2, Seeded, bearer, token

pytestmark = pytest.mark.skipif(distribution_binary() is None, reason="docker-registry is not installed")

ROOT = Path(__file__).resolve().parent.parent
TOOMANY = (
    "You have reached your pull rate limit. You may increase the limit by authenticating "
    "and upgrading: https://www.docker.com/increase-rate-limit"
)


# ------------------------------------------------------------------------------ auth
def test_token_flow(
    seeded_hub: DockerHubEmulator, seeded_hub_client: httpx.Client, seeded_registry: Seeded
) -> None:
    r = seeded_hub_client.get("/v2/")
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == (
        f'Bearer realm="{seeded_hub.url}/token",service="registry.docker.io"'
    )
    r = seeded_hub_client.get(ALPINE_MANIFEST)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == (
        f'Bearer realm="http://127.0.0.1:{seeded_hub.port}/token",service="registry.docker.io",'
        f'scope="repository:library/alpine:pull"'
    )
    assert r.json()["errors"][0]["code"] == "UNAUTHORIZED"

    r = seeded_hub_client.get(
        "/token",
        params={"service": "registry.docker.io", "scope": "repository:library/alpine:pull"},
    )
    body = r.json()
    assert r.status_code == 200
    assert body["token"] == body["access_token"]
    assert body["expires_in"] == 60
    assert body["issued_at"].endswith("Z")

    auth = {"Authorization": f"Bearer {body['token']}", "Accept": SCHEMA2}
    r = seeded_hub_client.get(ALPINE_MANIFEST, headers=auth)
    assert r.status_code == 200
    assert r.headers["Docker-Content-Digest"] == seeded_registry.manifest_digest
    assert seeded_hub_client.get("/v2/", headers=auth).status_code == 200
    # the token only covers library/alpine
    r = seeded_hub_client.get("/v2/library/multi/manifests/latest", headers=auth)
    assert r.status_code == 401
    assert 'scope="repository:library/multi:pull",error="insufficient_scope"' in r.headers["WWW-Authenticate"]
    # garbage and revoked tokens are refused
    assert seeded_hub_client.get(ALPINE_MANIFEST, headers={"Authorization": "Bearer nope"}).status_code == 401
    seeded_hub.revoke_tokens()
    r = seeded_hub_client.get(ALPINE_MANIFEST, headers=auth)
    assert r.status_code == 401
    assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]
    assert seeded_hub.count("GET", "token") == 1
    assert seeded_hub.count("GET", "manifest") == 5
    assert seeded_hub.count("GET", "manifest", status=200) == 1


def test_token_expiry_scopes_and_accounts(
    seeded_hub: DockerHubEmulator, seeded_hub_client: httpx.Client
) -> None:
    seeded_hub.set_token_ttl(0.3)
    headers = bearer(seeded_hub_client)
    assert seeded_hub_client.head(ALPINE_MANIFEST, headers=headers).status_code == 200
    time.sleep(0.4)
    assert seeded_hub_client.head(ALPINE_MANIFEST, headers=headers).status_code == 401

    seeded_hub.set_token_ttl(60)
    assert (
        seeded_hub_client.get(
            "/token", params={"scope": "repository:library/alpine:pull"}, auth=("alice", "wrong")
        ).status_code
        == 401
    )
    assert seeded_hub_client.get("/token", params={"service": "auth.example"}).status_code == 400
    # several scopes in one token request, space-separated or repeated
    t = token(
        seeded_hub_client,
        "repository:library/alpine:pull repository:library/multi:pull",
        "repository:library/other:pull",
    )
    for repo in ("alpine", "multi"):
        r = seeded_hub_client.head(
            f"/v2/library/{repo}/manifests/latest",
            headers={"Authorization": f"Bearer {t}", "Accept": ACCEPT_ALL},
        )
        assert r.status_code == 200
    # anonymous tokens never grant push; alice's do
    anon = token(seeded_hub_client, "repository:library/alpine:pull,push")
    r = seeded_hub_client.post(f"/v2/{REPO}/blobs/uploads/", headers={"Authorization": f"Bearer {anon}"})
    assert r.status_code == 401
    assert (
        'scope="repository:library/alpine:pull,push",error="insufficient_scope"'
        in r.headers["WWW-Authenticate"]
    )
    alice = token(seeded_hub_client, "repository:library/pushed:pull,push", auth=("alice", "s3cret"))
    data = b"pushed through the emulator"
    r = seeded_hub_client.post(
        "/v2/library/pushed/blobs/uploads/", headers={"Authorization": f"Bearer {alice}"}
    )
    assert r.status_code == 202
    assert r.headers["Location"].startswith(seeded_hub.url + "/v2/library/pushed/blobs/uploads/")
    location = httpx.URL(r.headers["Location"]).copy_merge_params({"digest": sha256(data)})
    r = seeded_hub_client.put(location, content=data, headers={"Authorization": f"Bearer {alice}"})
    assert r.status_code == 201, r.text
    r = seeded_hub_client.get(
        f"/v2/library/pushed/blobs/{sha256(data)}", headers={"Authorization": f"Bearer {alice}"}
    )
    assert r.content == data
    assert seeded_hub.count("GET", "token") == 6
    assert seeded_hub.count("POST", "other") == 2
    assert seeded_hub.count("PUT", "other") == 1


# ----------------------------------------------------------------------------- quota
def test_quota_counts_manifest_gets_only(
    seeded_hub: DockerHubEmulator, seeded_hub_client: httpx.Client, seeded_registry: Seeded
) -> None:
    headers = bearer(seeded_hub_client)
    r = seeded_hub_client.head(ALPINE_MANIFEST, headers=headers)
    assert r.status_code == 200
    assert r.headers["ratelimit-limit"] == "100;w=21600"
    assert r.headers["ratelimit-remaining"] == "100;w=21600"
    assert r.headers["docker-ratelimit-source"] == "127.0.0.1"
    assert int(r.headers["Content-Length"]) > 0
    assert seeded_hub.remaining() == 100

    r = seeded_hub_client.get(ALPINE_MANIFEST, headers=headers)
    assert r.headers["ratelimit-remaining"] == "99;w=21600"
    r = seeded_hub_client.get(f"/v2/{REPO}/blobs/{seeded_registry.layer_digest}", headers=headers)
    assert r.content == seeded_registry.layer
    assert "ratelimit-remaining" not in r.headers
    assert seeded_hub_client.get(f"/v2/{REPO}/tags/list", headers=headers).json()["tags"] == ["latest"]
    # a 404 manifest GET is not a pull
    assert seeded_hub_client.get(f"/v2/{REPO}/manifests/nope", headers=headers).status_code == 404
    assert seeded_hub.remaining() == 99
    assert seeded_hub.pulls() == 1

    # multi-arch: the index GET is free, each platform manifest GET is a pull
    multi = bearer(seeded_hub_client, "library/multi")
    r = seeded_hub_client.get("/v2/library/multi/manifests/latest", headers=multi)
    assert r.headers["Content-Type"] == OCI_INDEX
    assert r.headers["ratelimit-remaining"] == "99;w=21600"
    for d in seeded_registry.platform_digests:
        assert seeded_hub_client.get(f"/v2/library/multi/manifests/{d}", headers=multi).status_code == 200
    assert seeded_hub.remaining() == 97
    assert seeded_hub.count("GET", "manifest") == 5
    assert seeded_hub.count("HEAD", "manifest") == 1
    assert seeded_hub.count("GET", "blob") == 1
    assert seeded_hub.count("GET", "tags") == 1

    # quota is per identity: alice's pulls don't touch the anonymous quota
    r = seeded_hub_client.get(ALPINE_MANIFEST, headers=bearer(seeded_hub_client, auth=("alice", "s3cret")))
    assert r.headers["docker-ratelimit-source"] == "alice"
    assert r.headers["ratelimit-remaining"] == "99;w=21600"
    assert seeded_hub.remaining() == 97
    assert seeded_hub.remaining("alice") == 99
    assert seeded_hub.pulls("alice") == 1
    assert seeded_hub.pulls("anonymous") == 3


def test_quota_exhausted(seeded_hub: DockerHubEmulator, seeded_hub_client: httpx.Client) -> None:
    seeded_hub.set_quota(limit=5, window_seconds=3600, remaining=2)
    headers = bearer(seeded_hub_client)
    for left in (1, 0):
        r = seeded_hub_client.get(ALPINE_MANIFEST, headers=headers)
        assert r.status_code == 200
        assert r.headers["ratelimit-remaining"] == f"{left};w=3600"
    r = seeded_hub_client.get(ALPINE_MANIFEST, headers=headers)
    assert r.status_code == 429
    assert r.json() == {"errors": [{"code": "TOOMANYREQUESTS", "message": TOOMANY}]}
    assert r.headers["ratelimit-limit"] == "5;w=3600"
    assert r.headers["ratelimit-remaining"] == "0;w=3600"
    assert "Retry-After" not in r.headers
    # HEAD is free, even over the limit
    r = seeded_hub_client.head(ALPINE_MANIFEST, headers=headers)
    assert r.status_code == 200
    assert r.headers["ratelimit-remaining"] == "0;w=3600"
    assert seeded_hub.remaining() == 0
    assert seeded_hub.count("GET", "manifest", status=429) == 1
    # another identity still has its own quota
    assert (
        seeded_hub_client.get(
            ALPINE_MANIFEST, headers=bearer(seeded_hub_client, auth=("alice", "s3cret"))
        ).status_code
        == 200
    )


@pytest.mark.parametrize("form", ["seconds", "epoch", "http-date"])
def test_quota_retry_after_forms(
    seeded_hub: DockerHubEmulator, seeded_hub_client: httpx.Client, form: str
) -> None:
    seeded_hub.set_quota(limit=1, window_seconds=600, retry_after=form)
    headers = bearer(seeded_hub_client)
    assert seeded_hub_client.get(ALPINE_MANIFEST, headers=headers).status_code == 200
    r = seeded_hub_client.get(ALPINE_MANIFEST, headers=headers)
    assert r.status_code == 429
    value = r.headers["Retry-After"]
    if form == "seconds":
        assert 590 <= int(value) <= 600
    elif form == "epoch":
        assert 590 <= int(value) - time.time() <= 601
    else:
        assert 590 <= parsedate_to_datetime(value).timestamp() - time.time() <= 601


def test_quota_window_and_unlimited(seeded_hub: DockerHubEmulator, seeded_hub_client: httpx.Client) -> None:
    seeded_hub.set_quota(limit=1, window_seconds=0.5)
    headers = bearer(seeded_hub_client)
    assert seeded_hub_client.get(ALPINE_MANIFEST, headers=headers).status_code == 200
    assert seeded_hub_client.get(ALPINE_MANIFEST, headers=headers).status_code == 429
    time.sleep(0.6)
    assert seeded_hub_client.get(ALPINE_MANIFEST, headers=headers).status_code == 200

    seeded_hub.set_quota(limit=1, identity="alice", send_headers=False)  # alice pays; anonymous doesn't
    alice = bearer(seeded_hub_client, auth=("alice", "s3cret"))
    assert seeded_hub_client.get(ALPINE_MANIFEST, headers=alice).status_code == 200
    assert seeded_hub_client.get(ALPINE_MANIFEST, headers=alice).status_code == 200
    assert seeded_hub_client.get(ALPINE_MANIFEST, headers=headers).status_code == 429

    seeded_hub.set_quota(send_headers=False)  # paid account: not counted, no headers
    for _ in range(3):
        r = seeded_hub_client.get(ALPINE_MANIFEST, headers=headers)
        assert r.status_code == 200
        assert "ratelimit-limit" not in r.headers
        assert "docker-ratelimit-source" not in r.headers
    assert seeded_hub.remaining() is None


def test_count_index_gets_option(seeded_registry: Seeded) -> None:
    with (
        DockerHubEmulator(seeded_registry.url, count_index_gets=True) as hub,
        httpx.Client(base_url=hub.url) as c,
    ):
        r = c.get("/v2/library/multi/manifests/latest", headers=bearer(c, "library/multi"))
        assert r.headers["Content-Type"] == OCI_INDEX
        assert r.headers["ratelimit-remaining"] == "99;w=21600"
        assert hub.pulls() == 1


# ---------------------------------------------------------------- faults and limits
def test_fail_next_with_retry_after_forms(
    seeded_hub: DockerHubEmulator, seeded_hub_client: httpx.Client
) -> None:
    headers = bearer(seeded_hub_client)
    seeded_hub.fail_next(1, 429, kind="manifest", retry_after=30)
    r = seeded_hub_client.get(ALPINE_MANIFEST, headers=headers)
    assert r.status_code == 429
    assert r.headers["Retry-After"] == "30"
    assert r.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    seeded_hub.fail_next(1, 429, kind="manifest", retry_after=30, retry_after_format="epoch")
    r = seeded_hub_client.get(ALPINE_MANIFEST, headers=headers)
    assert 28 <= int(r.headers["Retry-After"]) - time.time() <= 31
    seeded_hub.fail_next(1, 503, kind="manifest", retry_after="Wed, 21 Oct 2037 07:28:00 GMT")
    r = seeded_hub_client.get(ALPINE_MANIFEST, headers=headers)
    assert (r.status_code, r.headers["Retry-After"]) == (503, "Wed, 21 Oct 2037 07:28:00 GMT")
    assert seeded_hub_client.get(ALPINE_MANIFEST, headers=headers).status_code == 200
    assert seeded_hub.pulls() == 1  # faulted requests are not pulls


def test_plain_text_429_and_abuse_limit(
    seeded_hub: DockerHubEmulator, seeded_hub_client: httpx.Client
) -> None:
    headers = bearer(seeded_hub_client)
    seeded_hub.fail_next(1, 429, kind="blob", plain_text=True)
    r = seeded_hub_client.get(f"/v2/{REPO}/blobs/sha256:{'0' * 64}", headers=headers)
    assert r.status_code == 429
    assert r.headers["Content-Type"].startswith("text/plain")
    assert r.text == "Too Many Requests"

    seeded_hub.set_abuse_limit(3, window_seconds=60)
    statuses = [seeded_hub_client.head(ALPINE_MANIFEST, headers=headers).status_code for _ in range(3)]
    r = seeded_hub_client.get("/token", params={"scope": "repository:library/alpine:pull"})
    assert statuses == [200, 200, 200]
    assert (r.status_code, r.text) == (429, "Too Many Requests")
    seeded_hub.clear_faults()
    assert seeded_hub_client.head(ALPINE_MANIFEST, headers=headers).status_code == 200


def test_fail_next_always_and_clear(
    seeded_hub: DockerHubEmulator, seeded_hub_client: httpx.Client, seeded_registry: Seeded
) -> None:
    headers = bearer(seeded_hub_client)
    blob = f"/v2/{REPO}/blobs/{seeded_registry.layer_digest}"
    seeded_hub.fail_next(2, 500, kind="manifest", method="GET")
    assert seeded_hub_client.head(ALPINE_MANIFEST, headers=headers).status_code == 200  # HEAD doesn't match
    assert seeded_hub_client.get(blob, headers=headers).status_code == 200  # nor does a blob
    assert [seeded_hub_client.get(ALPINE_MANIFEST, headers=headers).status_code for _ in range(3)] == [
        500,
        500,
        200,
    ]

    seeded_hub.fail_always(502, kind="blob", body="bad gateway")
    assert [seeded_hub_client.get(blob, headers=headers).status_code for _ in range(3)] == [502] * 3
    assert seeded_hub_client.get(blob, headers=headers).text == "bad gateway"
    seeded_hub.clear_faults()
    assert seeded_hub_client.get(blob, headers=headers).status_code == 200

    seeded_hub.fail_next(1, 0, kind="manifest")  # status 0: drop the connection unanswered
    with pytest.raises(httpx.RemoteProtocolError):
        seeded_hub_client.get(ALPINE_MANIFEST, headers=headers)
    assert seeded_hub_client.get(ALPINE_MANIFEST, headers=headers).status_code == 200
    assert [r.fault for r in seeded_hub.requests if r.fault] == ["fail:500"] * 2 + ["fail:502"] * 4 + [
        "fail:0"
    ]


def test_stall(seeded_hub: DockerHubEmulator, seeded_hub_client: httpx.Client) -> None:
    headers = bearer(seeded_hub_client)
    seeded_hub.stall("manifest", 2.0, times=1)
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        seeded_hub_client.get(ALPINE_MANIFEST, headers=headers, timeout=0.3)
    assert time.monotonic() - started < 1.5
    assert seeded_hub_client.get(ALPINE_MANIFEST, headers=headers).status_code == 200  # times=1: used up
    seeded_hub.stall("token", 0.3)
    started = time.monotonic()
    token(seeded_hub_client, "repository:library/alpine:pull")
    assert time.monotonic() - started >= 0.3


def test_range_pass_through(
    seeded_hub: DockerHubEmulator, seeded_hub_client: httpx.Client, seeded_registry: Seeded
) -> None:
    headers = {**bearer(seeded_hub_client), "Range": "bytes=1000-1999"}
    r = seeded_hub_client.get(f"/v2/{REPO}/blobs/{seeded_registry.layer_digest}", headers=headers)
    assert r.status_code == 206
    assert r.headers["Content-Range"] == f"bytes 1000-1999/{len(seeded_registry.layer)}"
    assert r.headers["Content-Length"] == "1000"
    assert r.headers["Docker-Content-Digest"] == seeded_registry.layer_digest
    assert r.content == seeded_registry.layer[1000:2000]
    assert seeded_hub.requests[-1].range == "bytes=1000-1999"
    assert seeded_hub.requests[-1].status == 206


def test_corrupt_blob(
    seeded_hub: DockerHubEmulator, seeded_hub_client: httpx.Client, seeded_registry: Seeded
) -> None:
    headers = bearer(seeded_hub_client)
    seeded_hub.corrupt_blob(seeded_registry.layer_digest)
    r = seeded_hub_client.get(f"/v2/{REPO}/blobs/{seeded_registry.layer_digest}", headers=headers)
    assert r.status_code == 200
    assert len(r.content) == len(seeded_registry.layer)
    assert r.content != seeded_registry.layer
    assert sha256(r.content) != seeded_registry.layer_digest
    assert r.headers["Docker-Content-Digest"] == seeded_registry.layer_digest  # the lie is in the body
    r = seeded_hub_client.get(
        f"/v2/{REPO}/blobs/{seeded_registry.layer_digest}", headers={**headers, "Range": "bytes=0-9"}
    )
    assert r.status_code == 206
    assert len(r.content) == 10
    assert r.content != seeded_registry.layer[:10]


def test_cut_blob_after(
    seeded_hub: DockerHubEmulator, seeded_hub_client: httpx.Client, seeded_registry: Seeded
) -> None:
    headers = bearer(seeded_hub_client)
    seeded_hub.cut_blob_after(seeded_registry.layer_digest, 100_000)
    received = bytearray()
    url = f"/v2/{REPO}/blobs/{seeded_registry.layer_digest}"
    with seeded_hub_client.stream("GET", url, headers=headers) as r:
        assert r.headers["Content-Length"] == str(len(seeded_registry.layer))
        with pytest.raises(httpx.RemoteProtocolError):  # noqa: PT012
            for chunk in r.iter_bytes():
                received += chunk
    assert bytes(received) == seeded_registry.layer[:100_000]
    assert seeded_hub.requests[-1].fault == "cut:100000"
    assert seeded_hub.requests[-1].bytes_sent == 100_000


def test_throttle_blob(
    seeded_hub: DockerHubEmulator, seeded_hub_client: httpx.Client, seeded_registry: Seeded
) -> None:
    headers = bearer(seeded_hub_client)
    seeded_hub.throttle_blob(None, 1_000_000)
    started = time.monotonic()
    r = seeded_hub_client.get(f"/v2/{REPO}/blobs/{seeded_registry.layer_digest}", headers=headers)
    assert r.content == seeded_registry.layer
    assert time.monotonic() - started >= 0.25  # 300 KiB at 1 MB/s
    # a consumer that gives up mid-transfer does not upset the emulator
    seeded_hub.throttle_blob(seeded_registry.layer_digest, 100_000)
    with seeded_hub_client.stream(
        "GET", f"/v2/{REPO}/blobs/{seeded_registry.layer_digest}", headers=headers
    ) as r:
        first = next(r.iter_raw())
    assert 0 < len(first) < len(seeded_registry.layer)
    seeded_hub.throttle_blob(seeded_registry.layer_digest, None)
    seeded_hub.throttle_blob(None, None)
    assert (
        seeded_hub_client.get(f"/v2/{REPO}/blobs/{seeded_registry.layer_digest}", headers=headers).content
        == seeded_registry.layer
    )


# -------------------------------------------------------------------------- counters
def test_counters_and_requests(
    seeded_hub: DockerHubEmulator, seeded_hub_client: httpx.Client, seeded_registry: Seeded
) -> None:
    headers = bearer(seeded_hub_client)
    seeded_hub_client.head(ALPINE_MANIFEST, headers=headers)
    seeded_hub_client.get(ALPINE_MANIFEST, headers=headers)
    seeded_hub_client.get(f"/v2/{REPO}/manifests/{seeded_registry.manifest_digest}", headers=headers)
    seeded_hub_client.get(
        f"/v2/{REPO}/blobs/{seeded_registry.layer_digest}", headers={**headers, "Range": "bytes=0-0"}
    )
    seeded_hub_client.get("/v2/alpine/manifests/latest", headers=headers)  # no name rewriting: 401 (scope)
    assert seeded_hub.counts == {
        ("GET", "token"): 1,
        ("HEAD", "manifest"): 1,
        ("GET", "manifest"): 3,
        ("GET", "blob"): 1,
    }
    assert seeded_hub.count("GET", "manifest", path=ALPINE_MANIFEST) == 1
    assert seeded_hub.count("HEAD", "manifest", path=ALPINE_MANIFEST) == 1
    assert seeded_hub.count("GET", path="/v2/alpine/manifests/latest") == 1
    assert seeded_hub.count("GET", "manifest", status=401) == 1
    assert seeded_hub.path_counts[("GET", f"/v2/{REPO}/manifests/{seeded_registry.manifest_digest}")] == 1
    last = seeded_hub.requests[-2]
    assert (last.method, last.kind, last.range, last.status) == ("GET", "blob", "bytes=0-0", 206)
    assert last.identity == "anonymous"
    assert seeded_hub.requests[0].kind == "token"
    seeded_hub.reset_counters()
    assert seeded_hub.counts == {}
    assert seeded_hub.requests == []
    assert seeded_hub.count("GET", "manifest") == 0
    assert seeded_hub.remaining() == 98  # quota usage survives a counter reset


# ------------------------------------------------------------------------- lifecycle
def test_stop_then_start_refuses_then_serves(seeded_hub: DockerHubEmulator, seeded_registry: Seeded) -> None:
    url = seeded_hub.url
    seeded_hub.stop()
    with httpx.Client(timeout=5) as c:
        with pytest.raises(httpx.ConnectError):
            c.get(url + "/v2/")
        seeded_hub.start()
        assert seeded_hub.url == url
        assert c.get(url + "/v2/").status_code == 401


def test_upstream_down_is_502(seeded_registry: Seeded) -> None:
    with (
        DockerHubEmulator(f"http://127.0.0.1:{free_port()}") as hub,
        httpx.Client(base_url=hub.url) as c,
    ):
        r = c.get(ALPINE_MANIFEST, headers=bearer(c))
        assert r.status_code == 502
        assert hub.pulls() == 0


def test_control_api_subprocess(seeded_registry: Seeded) -> None:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "tests.support.dockerhub",
        "--upstream",
        seeded_registry.url,
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
def test_skopeo_pulls_through_the_emulator(
    seeded_hub: DockerHubEmulator, seeded_registry: Seeded, tmp_path: Path
) -> None:
    """A real client does the whole dance: challenge, token, manifest, config and layer."""
    host = seeded_hub.url.removeprefix("http://")
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
    assert (
        tmp_path / "img" / seeded_registry.layer_digest.removeprefix("sha256:")
    ).read_bytes() == seeded_registry.layer
    assert seeded_hub.pulls() == 1
    assert seeded_hub.count("GET", "blob") == 2  # config + layer
    assert seeded_hub.count("GET", "token") >= 1
