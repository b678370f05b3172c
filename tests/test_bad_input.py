"""Malformed, lying and out-of-order requests: each gets its OCI error and changes nothing.

Every case checks the status, the `{"errors": [{"code", "message"}]}` envelope, that it
is not a 500, and that the bucket holds no new object under `blobs/`, `repositories/` or
`catalog/` (objects under `uploads/` may appear only for an upload session that is still
live). Paths that an HTTP client would normalise (`..`, `%2F`, `//`) are sent verbatim
with `http.client`; requests whose body lies about its length with a raw socket.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from services.embedded import RedisServer, S3Server
from shared.settings import S3Settings
from tests.fixtures import servers
from tests.fixtures.edge import USERS, EdgeServer, build_settings
from tests.support.images import (
    OCI_INDEX,
    OCI_MANIFEST,
    Image,
    canonical,
    make_image,
    make_index,
    make_layer,
    sha256,
)
from tests.support.oci_calls import catalog, push_blob, push_image, start_upload
from tests.support.oci_checks import Bucket, assert_error, error_count, wait_for_errors
from tests.support.raw_http import ALICE_HEADER, half_closed_exchange, raw_request, status_of

ALICE = ("alice", USERS["alice"])
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MAX_MANIFEST = 4 * 1024 * 1024


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def module_s3(s3_server: S3Server) -> S3Settings:
    bucket = f"bad-input-{secrets.token_hex(4)}"
    s3_server.ensure_bucket(bucket)
    return s3_server.settings(bucket)


@pytest.fixture(scope="module")
def edge(
    redis_server: RedisServer, module_s3: S3Settings, user_hashes: dict[str, str]
) -> Iterator[EdgeServer]:
    """One edge and bucket for the module, unlike the per-test `edge` fixture.

    Each SeaweedFS bucket is a collection that reserves volumes of its own, so a hundred
    cases with a bucket each exhaust the embedded server. Every case works in a repository
    of its own (`repo`, `other`) and checks the bucket against a snapshot instead.
    """
    redis_url = f"redis://127.0.0.1:{redis_server.port}/{next(servers._databases)}"
    with EdgeServer(build_settings(redis_url, module_s3, user_hashes)) as server:
        yield server


@pytest.fixture
def repo() -> str:
    return f"local/case-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def other(repo: str) -> str:
    return f"{repo}-other"


@pytest.fixture
def http(edge: EdgeServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=edge.url, auth=ALICE, timeout=60) as client:
        yield client


@pytest.fixture(autouse=True)
def never_internal(edge: EdgeServer) -> Iterator[None]:
    """No case may end in a 500, not even one whose answer the client never reads."""
    before = error_count(edge, "INTERNAL")
    yield
    assert error_count(edge, "INTERNAL") == before


@pytest.fixture
def bucket(s3_server: S3Server, module_s3: S3Settings) -> Bucket:
    return Bucket(s3_server.client(), module_s3.bucket)


@pytest.fixture
def image(http: httpx.Client, repo: str) -> Image:
    """An image in `repo`, tagged `v1`, its blobs linked there."""
    built = make_image(label="bad-input")
    push_image(http, repo, built, "v1")
    return built


@pytest.fixture
def blob(http: httpx.Client, repo: str) -> bytes:
    """A 100-byte blob in `repo`: bytes 0..99."""
    data = bytes(range(100))
    push_blob(http, repo, data)
    return data


# --------------------------------------------------------------------------- repository names

# Templates over the test's repository `local/<path>`: each names it, or a neighbour, badly.
BAD_NAMES = [
    pytest.param("local/{PATH}", id="uppercase"),
    pytest.param("local/../{path}", id="dot-dot"),
    pytest.param("{repo}/../x", id="dot-dot-inner"),
    pytest.param("local//{path}", id="empty-component"),
    pytest.param("{repo}/", id="trailing-slash"),
    pytest.param("{repo}/" + "a" * 255, id="over-255"),
    pytest.param("local%2F{path}", id="encoded-slash"),
    pytest.param("local%2f{path}", id="encoded-slash-lowercase"),
    pytest.param("{repo}%2Fx", id="encoded-slash-inner"),
    pytest.param("local/%2e%2e/{path}", id="encoded-dot-dot"),
    pytest.param("{repo}/%2E%2E", id="encoded-dot-dot-upper"),
]


def bad_name(template: str, repo: str) -> str:
    path = repo.split("/", 1)[1]
    return template.format(repo=repo, path=path, PATH=path.upper())


@pytest.mark.parametrize("template", BAD_NAMES)
def test_malformed_repository_names_are_name_invalid(
    edge: EdgeServer, http: httpx.Client, bucket: Bucket, image: Image, template: str, repo: str
) -> None:
    name = bad_name(template, repo)
    catalog = http.get("/v2/_catalog").json()
    layer = image.layers[0]
    new_blob = b"never stored under a malformed name"
    requests: list[tuple[str, str, bytes | None, dict[str, str]]] = [
        ("GET", f"/v2/{name}/manifests/v1", None, {}),
        ("HEAD", f"/v2/{name}/manifests/v1", None, {}),
        ("GET", f"/v2/{name}/manifests/{image.digest}", None, {}),
        ("PUT", f"/v2/{name}/manifests/v2", image.manifest, {"Content-Type": OCI_MANIFEST}),
        (
            "PUT",
            f"/v2/{name}/manifests/{image.digest}",
            image.manifest,
            {"Content-Type": OCI_MANIFEST},
        ),
        ("DELETE", f"/v2/{name}/manifests/{image.digest}", None, {}),
        ("GET", f"/v2/{name}/tags/list", None, {}),
        ("GET", f"/v2/{name}/referrers/{image.digest}", None, {}),
        ("GET", f"/v2/{name}/blobs/{sha256(layer)}", None, {}),
        ("HEAD", f"/v2/{name}/blobs/{sha256(layer)}", None, {}),
        ("DELETE", f"/v2/{name}/blobs/{sha256(layer)}", None, {}),
        ("POST", f"/v2/{name}/blobs/uploads/", None, {}),
        ("POST", f"/v2/{name}/blobs/uploads/?digest={sha256(new_blob)}", new_blob, {}),
        ("POST", f"/v2/{name}/blobs/uploads/?mount={sha256(layer)}&from={repo}", None, {}),
    ]
    bucket.snapshot()
    for method, path, body, headers in requests:
        response = raw_request(edge, method, path, body, headers)
        assert_error(response, 400, "NAME_INVALID")
    bucket.assert_unchanged(http)
    # The well-formed repository is untouched and nothing was created elsewhere.
    assert http.get(f"/v2/{repo}/manifests/v1").content == image.manifest
    assert http.get(f"/v2/{repo}/tags/list").json()["tags"] == ["v1"]
    assert http.get("/v2/_catalog").json() == catalog


def test_upload_session_under_malformed_name_is_name_invalid(
    edge: EdgeServer, http: httpx.Client, bucket: Bucket, repo: str
) -> None:
    upload = start_upload(http, repo)
    bucket.snapshot()
    for template in ("local%2F{path}", "local/{PATH}", "local//{path}", "local/%2e%2e/{path}"):
        path = f"/v2/{bad_name(template, repo)}/blobs/uploads/{upload}"
        assert_error(raw_request(edge, "GET", path), 400, "NAME_INVALID")
        assert_error(raw_request(edge, "PATCH", path, b"chunk"), 400, "NAME_INVALID")
        assert_error(raw_request(edge, "PUT", f"{path}?digest={sha256(b'chunk')}"), 400, "NAME_INVALID")
        assert_error(raw_request(edge, "DELETE", path), 400, "NAME_INVALID")
    bucket.assert_unchanged(http, {upload: repo})
    assert http.get(f"/v2/{repo}/blobs/uploads/{upload}").headers["Range"] == "0-0"


# --------------------------------------------------------------------------- tags


@pytest.mark.parametrize("tag", ["-bad", ".bad", "a" * 129, "bad+tag"])
def test_malformed_tag_on_put_is_refused(
    edge: EdgeServer, http: httpx.Client, bucket: Bucket, tag: str, repo: str
) -> None:
    built = make_image(label=f"tag-{tag[:8]}")
    for data in built.blobs.values():
        push_blob(http, repo, data)
    bucket.snapshot()
    response = http.put(
        f"/v2/{repo}/manifests/{tag}",
        content=built.manifest,
        headers={"Content-Type": OCI_MANIFEST},
    )
    assert_error(response, 400, "MANIFEST_INVALID")
    bucket.assert_unchanged(http)
    assert http.get(f"/v2/{repo}/tags/list").json()["tags"] == []
    assert_error(http.get(f"/v2/{repo}/manifests/{built.digest}"), 404, "MANIFEST_UNKNOWN")


def test_a_128_character_tag_is_valid(http: httpx.Client, image: Image, repo: str) -> None:
    """A tag of exactly 128 characters is fine: the limit is not off by one."""
    tag = "t" * 128
    response = http.put(
        f"/v2/{repo}/manifests/{tag}",
        content=image.manifest,
        headers={"Content-Type": OCI_MANIFEST},
    )
    assert response.status_code == 201, response.text
    assert tag in http.get(f"/v2/{repo}/tags/list").json()["tags"]


# --------------------------------------------------------------------------- digests


def _bad_digests(real: str) -> list[str]:
    hex_part = real.split(":", 1)[1]
    return [
        "sha256:xyz",
        "sha256:" + hex_part[:63],
        "md5:" + hashlib.md5(b"x", usedforsecurity=False).hexdigest(),
        "sha256:" + hex_part.upper(),
        "sha256" + hex_part,
        "sha256:" + hex_part + "0",
    ]


def test_malformed_digests_are_digest_invalid(
    edge: EdgeServer, http: httpx.Client, bucket: Bucket, image: Image, repo: str, other: str
) -> None:
    layer = image.layers[0]
    upload = start_upload(http, repo)
    chunk = http.patch(f"/v2/{repo}/blobs/uploads/{upload}", content=layer)
    assert chunk.status_code == 202
    bucket.snapshot()
    for bad in _bad_digests(sha256(layer)):
        for method in ("GET", "HEAD", "DELETE"):
            assert_error(raw_request(edge, method, f"/v2/{repo}/blobs/{bad}"), 400, "DIGEST_INVALID")
        for method in ("GET", "HEAD", "DELETE"):
            manifest_bad = bad.replace(sha256(layer).split(":")[1], image.digest.split(":")[1])
            if ":" in bad:  # without a colon the reference is a tag, which is another case
                assert_error(
                    raw_request(edge, method, f"/v2/{repo}/manifests/{manifest_bad}"),
                    400,
                    "DIGEST_INVALID",
                )
        mount = http.post(f"/v2/{repo}/blobs/uploads/", params={"mount": bad, "from": other})
        assert_error(mount, 400, "DIGEST_INVALID")
        referrers = http.get(f"/v2/{repo}/referrers/{bad}")
        assert_error(referrers, 400, "DIGEST_INVALID")
        monolithic = http.post(f"/v2/{other}/blobs/uploads/", params={"digest": bad}, content=layer)
        assert_error(monolithic, 400, "DIGEST_INVALID")
        finish = http.put(f"/v2/{repo}/blobs/uploads/{upload}", params={"digest": bad})
        assert_error(finish, 400, "DIGEST_INVALID")
    missing = http.put(f"/v2/{repo}/blobs/uploads/{upload}")
    assert_error(missing, 400, "DIGEST_INVALID")
    bucket.assert_unchanged(http, {upload: repo})
    # The session survived every refused finish and still completes with the right digest.
    status = http.get(f"/v2/{repo}/blobs/uploads/{upload}")
    assert status.headers["Range"] == f"0-{len(layer) - 1}"
    assert http.put(f"/v2/{repo}/blobs/uploads/{upload}", params={"digest": sha256(layer)}).status_code == 201
    assert http.get(f"/v2/{repo}/blobs/{sha256(layer)}").content == layer
    assert_error(http.get(f"/v2/{other}/blobs/{sha256(layer)}"), 404, "BLOB_UNKNOWN")
    assert other not in catalog(http)


def test_manifest_tag_shaped_like_a_digest_is_unknown_not_stored(
    http: httpx.Client, bucket: Bucket, image: Image, repo: str
) -> None:
    """`sha256` + hex without a colon is a (valid) tag that does not exist."""
    reference = "sha256" + image.digest.split(":")[1][:60]
    bucket.snapshot()
    assert_error(http.get(f"/v2/{repo}/manifests/{reference}"), 404, "MANIFEST_UNKNOWN")
    assert_error(http.delete(f"/v2/{repo}/manifests/{reference}"), 404, "MANIFEST_UNKNOWN")
    bucket.assert_unchanged(http)


# --------------------------------------------------------------------------- ranges


@pytest.mark.parametrize(
    "header",
    [
        "bytes=5-2",
        "bytes=abc",
        "bytes=100-200",
        "bytes=100-",
        "bytes=5000-",
        "bytes=-0",
        "bytes=",
        "bytes=-",
        "items=0-5",
        "bytes=0-1,5-6",
        "bytes=1-2-3",
        "bytes=" + "9" * 5000 + "-",
        "bytes=-0" + "0" * 5000,
    ],
)
def test_unsatisfiable_or_malformed_range_is_416(
    http: httpx.Client, blob: bytes, header: str, repo: str
) -> None:
    for method in ("GET", "HEAD"):
        response = http.request(method, f"/v2/{repo}/blobs/{sha256(blob)}", headers={"Range": header})
        assert_error(response, 416, "RANGE_INVALID")
        assert response.headers["Content-Range"] == f"bytes */{len(blob)}"


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=0-9", 0, 9),
        ("bytes=10-10", 10, 10),
        ("bytes=-10", 90, 99),
        ("bytes=90-", 90, 99),
        ("bytes=95-500", 95, 99),
        ("bytes=-500", 0, 99),
        ("bytes=0-99", 0, 99),
        ("bytes=0-" + "9" * 5000, 0, 99),
        ("bytes=-" + "9" * 5000, 0, 99),
        ("bytes=" + "0" * 5000 + "7-8", 7, 8),
    ],
)
def test_valid_range_is_206_with_the_bytes(
    http: httpx.Client, blob: bytes, header: str, start: int, end: int, repo: str
) -> None:
    url = f"/v2/{repo}/blobs/{sha256(blob)}"
    response = http.get(url, headers={"Range": header})
    assert response.status_code == 206, response.text
    assert response.content == blob[start : end + 1]
    assert response.headers["Content-Range"] == f"bytes {start}-{end}/{len(blob)}"
    assert response.headers["Content-Length"] == str(end - start + 1)
    head = http.head(url, headers={"Range": header})
    assert head.status_code == 206
    assert head.headers["Content-Length"] == str(end - start + 1)


# --------------------------------------------------------------------------- digest mismatch


def _chunks(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for offset in range(0, len(data), size):
        yield data[offset : offset + size]


@pytest.mark.parametrize("size", [1000, 9 * 1024 * 1024], ids=["small", "multipart"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_monolithic_post_with_wrong_digest_stores_nothing(
    http: httpx.Client, bucket: Bucket, size: int, chunked: bool, repo: str
) -> None:
    data = hashlib.sha256(str(size).encode()).digest() * (size // 32 + 1)
    data = data[:size]
    claimed = sha256(data[:-1] + b"\0")
    bucket.snapshot()
    body: Any = _chunks(data) if chunked else data
    response = http.post(f"/v2/{repo}/blobs/uploads/", params={"digest": claimed}, content=body)
    assert_error(response, 400, "DIGEST_INVALID")
    bucket.assert_unchanged(http)
    for digest in (claimed, sha256(data)):
        assert_error(http.head(f"/v2/{repo}/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    assert repo not in catalog(http)


@pytest.mark.parametrize("final_chunk", [False, True], ids=["patch-then-put", "body-on-put"])
def test_chunked_upload_with_wrong_digest_stores_nothing(
    http: httpx.Client, bucket: Bucket, final_chunk: bool, repo: str
) -> None:
    data = b"0123456789" * 50
    claimed = sha256(data + b"!")
    bucket.snapshot()
    upload = start_upload(http, repo)
    url = f"/v2/{repo}/blobs/uploads/{upload}"
    first = data[:300] if final_chunk else data
    patch = http.patch(url, content=first, headers={"Content-Range": f"0-{len(first) - 1}"})
    assert patch.status_code == 202, patch.text
    rest = data[300:] if final_chunk else b""
    response = http.put(url, params={"digest": claimed}, content=rest)
    assert_error(response, 400, "DIGEST_INVALID")
    bucket.assert_unchanged(http, {upload: repo})
    for digest in (claimed, sha256(data)):
        assert_error(http.head(f"/v2/{repo}/blobs/{digest}"), 404, "BLOB_UNKNOWN")


# --------------------------------------------------------------------------- manifests


def test_manifest_naming_a_missing_blob_is_manifest_blob_unknown(
    http: httpx.Client, bucket: Bucket, repo: str, other: str
) -> None:
    built = make_image([make_layer({"a": b"a"}), make_layer({"b": b"b"})], label="missing")
    push_blob(http, repo, built.config)
    push_blob(http, repo, built.layers[0])
    # The last layer exists in the registry, but not in this repository.
    push_blob(http, other, built.layers[1])
    bucket.snapshot()
    for reference in ("v1", built.digest):
        response = http.put(
            f"/v2/{repo}/manifests/{reference}",
            content=built.manifest,
            headers={"Content-Type": OCI_MANIFEST},
        )
        error = assert_error(response, 404, "MANIFEST_BLOB_UNKNOWN")
        assert sha256(built.layers[1]) in json.dumps(error)
    bucket.assert_unchanged(http)
    assert http.get(f"/v2/{repo}/tags/list").json()["tags"] == []
    assert_error(http.get(f"/v2/{repo}/manifests/{built.digest}"), 404, "MANIFEST_UNKNOWN")


def test_index_naming_a_missing_manifest_is_manifest_blob_unknown(
    http: httpx.Client, bucket: Bucket, image: Image, repo: str, other: str
) -> None:
    absent = make_image(label="absent", architecture="arm64")
    for data in absent.blobs.values():
        push_blob(http, repo, data)
    # The child manifest is held by another repository only.
    push_image(http, other, absent)
    index = make_index([(image, "linux", "amd64"), (absent, "linux", "arm64")])
    bucket.snapshot()
    for reference in ("multi", sha256(index)):
        response = http.put(
            f"/v2/{repo}/manifests/{reference}",
            content=index,
            headers={"Content-Type": OCI_INDEX},
        )
        error = assert_error(response, 404, "MANIFEST_BLOB_UNKNOWN")
        assert absent.digest in json.dumps(error)
    bucket.assert_unchanged(http)
    assert http.get(f"/v2/{repo}/tags/list").json()["tags"] == ["v1"]


# case -> (document of a valid image manifest, its bytes) -> (body, Content-Type)
INVALID_MANIFESTS: dict[str, Any] = {
    "bad-json": lambda doc, raw: (b"{not json", OCI_MANIFEST),
    "not-utf8": lambda doc, raw: (b"\xff\xfe", OCI_MANIFEST),
    "not-an-object": lambda doc, raw: (b"[]", OCI_MANIFEST),
    "schema-version-1": lambda doc, raw: (canonical({**doc, "schemaVersion": 1}), OCI_MANIFEST),
    "schema-version-string": lambda doc, raw: (
        canonical({**doc, "schemaVersion": "2"}),
        OCI_MANIFEST,
    ),
    "content-type-contradicts-media-type": lambda doc, raw: (raw, DOCKER_MANIFEST),
    "index-content-type-for-a-manifest": lambda doc, raw: (raw, OCI_INDEX),
    "no-layers": lambda doc, raw: (
        canonical({k: v for k, v in doc.items() if k != "layers"}),
        OCI_MANIFEST,
    ),
    "negative-size": lambda doc, raw: (
        canonical({**doc, "config": {**doc["config"], "size": -1}}),
        OCI_MANIFEST,
    ),
    "index-without-manifests": lambda doc, raw: (
        canonical({"schemaVersion": 2, "mediaType": OCI_INDEX}),
        OCI_INDEX,
    ),
    "unknown-media-type": lambda doc, raw: (
        canonical({**doc, "mediaType": "text/plain"}),
        "text/plain",
    ),
    "nested-too-deeply": lambda doc, raw: (
        b'{"schemaVersion": 2, "layers": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        OCI_MANIFEST,
    ),
    "layer-size-differs-from-the-blob": lambda doc, raw: (
        canonical({**doc, "layers": [{**doc["layers"][0], "size": doc["layers"][0]["size"] + 1}]}),
        OCI_MANIFEST,
    ),
    "config-size-differs-from-the-blob": lambda doc, raw: (
        canonical({**doc, "config": {**doc["config"], "size": 1}}),
        OCI_MANIFEST,
    ),
}


@pytest.mark.parametrize("case", INVALID_MANIFESTS)
def test_invalid_manifest_is_manifest_invalid(
    http: httpx.Client, bucket: Bucket, case: str, repo: str
) -> None:
    built = make_image(label="invalid")
    for data in built.blobs.values():
        push_blob(http, repo, data)
    body, content_type = INVALID_MANIFESTS[case](json.loads(built.manifest), built.manifest)
    bucket.snapshot()
    for reference in ("v1", sha256(body)):
        response = http.put(
            f"/v2/{repo}/manifests/{reference}",
            content=body,
            headers={"Content-Type": content_type},
        )
        assert_error(response, 400, "MANIFEST_INVALID")
    bucket.assert_unchanged(http)
    assert http.get(f"/v2/{repo}/tags/list").json()["tags"] == []


def test_manifest_with_a_malformed_descriptor_digest_is_digest_invalid(
    http: httpx.Client, bucket: Bucket, repo: str
) -> None:
    """A descriptor's digest is checked like one in a URL (Distribution answers the same)."""
    built = make_image(label="bad-descriptor")
    for data in built.blobs.values():
        push_blob(http, repo, data)
    document = json.loads(built.manifest)
    document["layers"][0]["digest"] = "sha256:" + "A" * 64
    body = canonical(document)
    bucket.snapshot()
    for reference in ("v1", sha256(body)):
        response = http.put(
            f"/v2/{repo}/manifests/{reference}",
            content=body,
            headers={"Content-Type": OCI_MANIFEST},
        )
        assert_error(response, 400, "DIGEST_INVALID")
    bucket.assert_unchanged(http)
    assert http.get(f"/v2/{repo}/tags/list").json()["tags"] == []


def test_manifest_put_by_a_digest_it_does_not_hash_to_is_digest_invalid(
    http: httpx.Client, bucket: Bucket, image: Image, repo: str
) -> None:
    another = make_image(label="other-digest")
    bucket.snapshot()
    response = http.put(
        f"/v2/{repo}/manifests/{another.digest}",
        content=image.manifest,
        headers={"Content-Type": OCI_MANIFEST},
    )
    assert_error(response, 400, "DIGEST_INVALID")
    bucket.assert_unchanged(http)
    assert_error(http.get(f"/v2/{repo}/manifests/{another.digest}"), 404, "MANIFEST_UNKNOWN")


def _oversized_manifest(image: Image) -> bytes:
    document = json.loads(image.manifest)
    document["annotations"] = {"padding": ""}
    base = len(canonical(document))
    document["annotations"]["padding"] = "x" * (MAX_MANIFEST + 1 - base)
    body = canonical(document)
    assert len(body) == MAX_MANIFEST + 1
    return body


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_manifest_over_4_mib_is_413(
    http: httpx.Client, bucket: Bucket, image: Image, chunked: bool, repo: str
) -> None:
    body = _oversized_manifest(image)
    bucket.snapshot()
    for reference in ("big", sha256(body)):
        content: Any = _chunks(body) if chunked else body
        response = http.put(
            f"/v2/{repo}/manifests/{reference}",
            content=content,
            headers={"Content-Type": OCI_MANIFEST},
        )
        assert "Content-Length" in response.request.headers or chunked
        assert_error(response, 413, "MANIFEST_TOO_LARGE")
    bucket.assert_unchanged(http)
    assert http.get(f"/v2/{repo}/tags/list").json()["tags"] == ["v1"]
    # The connection is still usable and a manifest at the limit is accepted.
    exact = json.loads(body)
    exact["annotations"]["padding"] = exact["annotations"]["padding"][1:]
    at_limit = canonical(exact)
    assert len(at_limit) == MAX_MANIFEST
    response = http.put(f"/v2/{repo}/manifests/big", content=at_limit, headers={"Content-Type": OCI_MANIFEST})
    assert response.status_code == 201, response.text


# --------------------------------------------------------------------------- lying lengths


def test_monolithic_upload_shorter_than_its_content_length_stores_nothing(
    edge: EdgeServer, http: httpx.Client, bucket: Bucket, repo: str
) -> None:
    sent = b"only half of the promised body " * 16
    # The digest is the one of what is actually sent: only the length check can refuse it.
    digest = sha256(sent)
    request = (
        f"POST /v2/{repo}/blobs/uploads/?digest={digest} HTTP/1.1\r\n"
        f"Host: {edge.address}\r\n"
        f"Authorization: {ALICE_HEADER}\r\n"
        "Content-Type: application/octet-stream\r\n"
        f"Content-Length: {len(sent) * 2}\r\n"
        "\r\n"
    ).encode() + sent
    bucket.snapshot()
    errors = error_count(edge, "SIZE_INVALID")
    answer = half_closed_exchange(edge, request)
    # The edge cannot answer a client that hung up; if it did answer, it refused.
    status = status_of(answer)
    assert status is None or 400 <= status < 500, answer[:300]
    wait_for_errors(edge, "SIZE_INVALID", errors)
    bucket.assert_unchanged(http)
    assert_error(http.head(f"/v2/{repo}/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    assert repo not in catalog(http)


def test_manifest_shorter_than_its_content_length_stores_nothing(
    edge: EdgeServer, http: httpx.Client, bucket: Bucket, image: Image, repo: str
) -> None:
    built = make_image(label="short-manifest")
    for data in built.blobs.values():
        push_blob(http, repo, data)
    request = (
        f"PUT /v2/{repo}/manifests/short HTTP/1.1\r\n"
        f"Host: {edge.address}\r\n"
        f"Authorization: {ALICE_HEADER}\r\n"
        f"Content-Type: {OCI_MANIFEST}\r\n"
        f"Content-Length: {len(built.manifest) + 100}\r\n"
        "\r\n"
    ).encode() + built.manifest
    bucket.snapshot()
    errors = error_count(edge, "SIZE_INVALID")
    status = status_of(half_closed_exchange(edge, request))
    assert status is None or 400 <= status < 500
    wait_for_errors(edge, "SIZE_INVALID", errors)
    bucket.assert_unchanged(http)
    assert http.get(f"/v2/{repo}/tags/list").json()["tags"] == ["v1"]


def test_patch_shorter_than_its_content_length_stores_no_part(
    edge: EdgeServer, http: httpx.Client, bucket: Bucket, repo: str
) -> None:
    upload = start_upload(http, repo)
    sent = b"x" * 300
    request = (
        f"PATCH /v2/{repo}/blobs/uploads/{upload} HTTP/1.1\r\n"
        f"Host: {edge.address}\r\n"
        f"Authorization: {ALICE_HEADER}\r\n"
        "Content-Type: application/octet-stream\r\n"
        "Content-Length: 1000\r\n"
        "Content-Range: 0-999\r\n"
        "\r\n"
    ).encode() + sent
    bucket.snapshot()
    errors = error_count(edge, "SIZE_INVALID")
    status = status_of(half_closed_exchange(edge, request))
    assert status is None or 400 <= status < 500
    wait_for_errors(edge, "SIZE_INVALID", errors)
    bucket.assert_unchanged(http, {upload: repo})
    assert http.get(f"/v2/{repo}/blobs/uploads/{upload}").headers["Range"] == "0-0"
    # The session is intact: the real chunk is accepted at offset 0.
    data = b"y" * 1000
    patch = http.patch(f"/v2/{repo}/blobs/uploads/{upload}", content=data, headers={"Content-Range": "0-999"})
    assert patch.status_code == 202
    assert http.put(f"/v2/{repo}/blobs/uploads/{upload}", params={"digest": sha256(data)}).status_code == 201
    assert http.get(f"/v2/{repo}/blobs/{sha256(data)}").content == data


@pytest.mark.parametrize(
    ("content_range", "body"),
    [
        pytest.param("0-99", b"a" * 50, id="longer"),
        pytest.param("0-9", b"a" * 50, id="shorter"),
        pytest.param("5-2", b"a" * 4, id="backwards"),
        pytest.param("0-", b"a", id="open-ended"),
        pytest.param("bytes=0-1", b"ab", id="bytes-equals"),
        pytest.param("x", b"a", id="garbage"),
    ],
)
def test_patch_whose_content_range_disagrees_with_its_body(
    http: httpx.Client, bucket: Bucket, content_range: str, body: bytes, repo: str
) -> None:
    upload = start_upload(http, repo)
    url = f"/v2/{repo}/blobs/uploads/{upload}"
    bucket.snapshot()
    response = http.patch(url, content=body, headers={"Content-Range": content_range})
    assert_error(response, 416, "BLOB_UPLOAD_INVALID")
    bucket.assert_unchanged(http, {upload: repo})
    assert http.get(url).headers["Range"] == "0-0"


@pytest.mark.parametrize(
    ("content_range", "body"),
    [pytest.param("0-99", b"a" * 50, id="longer"), pytest.param("0-9", b"a" * 50, id="shorter")],
)
def test_chunked_patch_whose_content_range_disagrees_with_its_body(
    http: httpx.Client, bucket: Bucket, content_range: str, body: bytes, repo: str
) -> None:
    """Without a Content-Length, the body's real length is checked against Content-Range."""
    upload = start_upload(http, repo)
    url = f"/v2/{repo}/blobs/uploads/{upload}"
    bucket.snapshot()
    response = http.patch(url, content=_chunks(body, 16), headers={"Content-Range": content_range})
    assert_error(response, 400, "SIZE_INVALID")
    # The same body as the final chunk of a PUT: the digest matches, the range does not.
    response = http.put(
        url,
        params={"digest": sha256(body)},
        content=_chunks(body, 16),
        headers={"Content-Range": content_range},
    )
    assert_error(response, 400, "SIZE_INVALID")
    bucket.assert_unchanged(http, {upload: repo})
    assert http.get(url).headers["Range"] == "0-0"
    assert not [k for k in bucket.listing() if k.startswith(f"uploads/{upload}/parts/")]
    assert_error(http.head(f"/v2/{repo}/blobs/{sha256(body)}"), 404, "BLOB_UNKNOWN")


# --------------------------------------------------------------------------- chunk order


def test_out_of_order_and_repeated_chunks_are_416(http: httpx.Client, bucket: Bucket, repo: str) -> None:
    data = bytes(range(30)) * 2
    upload = start_upload(http, repo)
    url = f"/v2/{repo}/blobs/uploads/{upload}"

    def patch(start: int, end: int) -> httpx.Response:
        return http.patch(url, content=data[start : end + 1], headers={"Content-Range": f"{start}-{end}"})

    first = patch(0, 9)
    assert first.status_code == 202
    assert first.headers["Range"] == "0-9"
    bucket.snapshot()
    assert_error(patch(20, 29), 416, "BLOB_UPLOAD_INVALID")  # skips 10..19
    assert http.get(url).headers["Range"] == "0-9"
    assert_error(patch(0, 9), 416, "BLOB_UPLOAD_INVALID")  # the same chunk again
    assert http.get(url).headers["Range"] == "0-9"
    assert_error(patch(5, 14), 416, "BLOB_UPLOAD_INVALID")  # overlaps
    assert http.get(url).headers["Range"] == "0-9"
    bucket.assert_unchanged(http, {upload: repo})
    assert patch(10, 19).headers["Range"] == "0-19"
    assert patch(20, 59).headers["Range"] == "0-59"
    # A PUT whose final chunk is out of order is refused the same way.
    put = http.put(url, params={"digest": sha256(data)}, content=b"zz", headers={"Content-Range": "70-71"})
    assert_error(put, 416, "BLOB_UPLOAD_INVALID")
    assert http.get(url).headers["Range"] == "0-59"
    done = http.put(url, params={"digest": sha256(data)})
    assert done.status_code == 201, done.text
    assert http.get(f"/v2/{repo}/blobs/{sha256(data)}").content == data


# --------------------------------------------------------------------------- upload ids


def test_unknown_or_foreign_upload_id_is_blob_upload_unknown(
    edge: EdgeServer, http: httpx.Client, bucket: Bucket, repo: str, other: str
) -> None:
    mine = start_upload(http, repo)
    assert http.patch(f"/v2/{repo}/blobs/uploads/{mine}", content=b"abc").status_code == 202
    push_blob(http, other, b"other exists as a repository too")
    bucket.snapshot()
    ids = [(repo, uuid.uuid4().hex), (repo, "not-an-upload"), (repo, "a" * 300), (other, mine)]
    for name, upload in ids:
        url = f"/v2/{name}/blobs/uploads/{upload}"
        assert_error(http.get(url), 404, "BLOB_UPLOAD_UNKNOWN")
        assert_error(http.patch(url, content=b"def"), 404, "BLOB_UPLOAD_UNKNOWN")
        assert_error(http.put(url, params={"digest": sha256(b"abc")}), 404, "BLOB_UPLOAD_UNKNOWN")
        assert_error(
            http.put(url, params={"digest": sha256(b"abcdef")}, content=b"def"),
            404,
            "BLOB_UPLOAD_UNKNOWN",
        )
        assert_error(http.delete(url), 404, "BLOB_UPLOAD_UNKNOWN")
    bucket.assert_unchanged(http, {mine: repo})
    # The session survived the foreign DELETE and PUT, with exactly its own bytes.
    assert http.get(f"/v2/{repo}/blobs/uploads/{mine}").headers["Range"] == "0-2"
    assert http.put(f"/v2/{repo}/blobs/uploads/{mine}", params={"digest": sha256(b"abc")}).status_code == 201
    # A finished session is gone for good.
    assert_error(http.get(f"/v2/{repo}/blobs/uploads/{mine}"), 404, "BLOB_UPLOAD_UNKNOWN")


# --------------------------------------------------------------------------- endpoints


@pytest.mark.parametrize(
    "path",
    [
        "/v2/x/unknown",
        "/v2/local/app/unknown",
        "/v2/local/app/manifests/",
        "/v2/local/app/blobs/",
        "/v3/",
        "/",
        "/v2/local/app/tags/list/extra",
    ],
)
def test_unknown_endpoint_is_404_envelope(edge: EdgeServer, path: str) -> None:
    for method in ("GET", "PUT", "DELETE"):
        assert_error(raw_request(edge, method, path), 404, "NOT_FOUND")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v2/local/app/manifests/v1"),
        ("PATCH", "/v2/local/app/manifests/v1"),
        ("PUT", f"/v2/local/app/blobs/{sha256(b'x')}"),
        ("POST", f"/v2/local/app/blobs/{sha256(b'x')}"),
        ("PATCH", "/v2/"),
        ("DELETE", "/v2/_catalog"),
        ("POST", "/v2/local/app/tags/list"),
        ("PUT", f"/v2/local/app/referrers/{sha256(b'x')}"),
    ],
)
def test_unsupported_method_is_405_envelope(
    edge: EdgeServer, http: httpx.Client, bucket: Bucket, method: str, path: str
) -> None:
    bucket.snapshot()
    assert_error(raw_request(edge, method, path, b"{}"), 405, "UNSUPPORTED")
    bucket.assert_unchanged(http)


# --------------------------------------------------------------------------- pagination


@pytest.mark.parametrize("n", ["abc", "-1", "1.5", "0x10", " 3", "²", "٣", "9" * 5000])
def test_tags_list_with_malformed_n_is_400(http: httpx.Client, image: Image, n: str, repo: str) -> None:
    assert_error(http.get(f"/v2/{repo}/tags/list", params={"n": n}), 400, "PAGINATION_INVALID")
    assert_error(http.get("/v2/_catalog", params={"n": n}), 400, "PAGINATION_INVALID")
    assert http.get(f"/v2/{repo}/tags/list", params={"n": "1"}).json()["tags"] == ["v1"]


# --------------------------------------------------------------------------- clients that leave


def test_clients_that_hang_up_before_the_answer_cause_no_internal_error(
    edge: EdgeServer, http: httpx.Client, repo: str
) -> None:
    """Dozens of GETs whose connection is reset at once: the edge may find the client gone
    when it writes the headers, which is not a server error."""
    data = os.urandom(2 * 1024 * 1024)
    push_blob(http, repo, data)
    host, port = edge.address.rsplit(":", 1)
    request = f"GET /v2/{repo}/blobs/{sha256(data)} HTTP/1.1\r\nHost: {edge.address}\r\n\r\n".encode()
    for _ in range(3):
        sockets = []
        for _ in range(30):
            sock = socket.create_connection((host, int(port)), timeout=10)
            # Close with a reset, not a FIN: the edge's next write fails at once.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.sendall(request)
            sockets.append(sock)
        for sock in sockets:
            sock.close()
        time.sleep(0.5)
    assert http.get(f"/v2/{repo}/blobs/{sha256(data)}").content == data
