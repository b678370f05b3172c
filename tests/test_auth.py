"""HTTP Basic authentication and per-project grants on hosted projects.

The edge fixture's projects: `local` is public, alice pushes and deletes there; `private`
is not public, bob may only pull, alice pushes and deletes. Refused requests must answer
the OCI envelope, carry no content, and store nothing.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from minio import Minio

from services.embedded import RedisServer, S3Server
from shared.settings import S3Settings
from tests.fixtures import servers
from tests.fixtures.edge import USERS, EdgeServer, build_settings
from tests.support.images import OCI_MANIFEST, Image, make_image, sha256

PUBLIC = "local/app"
PRIVATE = "private/secret"
REALM_PREFIX = 'Basic realm="'


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


ALICE = basic("alice", USERS["alice"])
BOB = basic("bob", USERS["bob"])
WRONG_PASSWORD = basic("alice", USERS["alice"] + "x")
UNKNOWN_USER = basic("mallory", USERS["alice"])
# What skopeo and podman send when they have no credentials for the registry.
EMPTY = "Basic Og=="
BAD_CREDENTIALS = {
    "wrong-password": WRONG_PASSWORD,
    "other-users-password": basic("bob", USERS["alice"]),
    "unknown-user": UNKNOWN_USER,
    "empty-password": basic("alice", ""),
    "no-colon": "Basic " + base64.b64encode(b"alice").decode(),
    "not-base64": "Basic !!!not-base64!!!",
    "bearer": "Bearer some.jwt.token",
}


# --------------------------------------------------------------------------- helpers


def keys(client: Minio, bucket: str) -> set[str]:
    return {o.object_name for o in client.list_objects(bucket, recursive=True) if o.object_name}


def assert_refused(response: httpx.Response, status: int, code: str, secret: bytes | None = None) -> None:
    """The OCI error, the Basic challenge on a 401, and none of the content asked for."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    assert "Docker-Content-Digest" not in response.headers
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith(REALM_PREFIX)
    if response.request.method == "HEAD":
        assert not response.content
        return
    envelope = json.loads(response.content)
    assert envelope["errors"][0]["code"] == code, envelope
    assert isinstance(envelope["errors"][0]["message"], str)
    if secret is not None:
        assert secret not in response.content


class Caller:
    """Requests to the edge with one fixed Authorization header (or none)."""

    def __init__(self, url: str, authorization: str | None) -> None:
        headers = {"Authorization": authorization} if authorization else {}
        self.client = httpx.Client(base_url=url, headers=headers, timeout=30)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.request(method, path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.get(path, **kwargs)

    def close(self) -> None:
        self.client.close()


@pytest.fixture(scope="module")
def module_s3(s3_server: S3Server) -> S3Settings:
    bucket = f"auth-{secrets.token_hex(4)}"
    s3_server.ensure_bucket(bucket)
    return s3_server.settings(bucket)


@pytest.fixture(scope="module")
def edge(redis_server: RedisServer, module_s3: S3Settings, user_hashes: dict[str, str]) -> Iterator[EdgeServer]:
    """One edge and bucket for the module: each SeaweedFS bucket reserves volumes of its
    own, and every case here only reads, is refused, or re-pushes the same two images."""
    redis_url = f"redis://127.0.0.1:{redis_server.port}/{next(servers._databases)}"
    with EdgeServer(build_settings(redis_url, module_s3, user_hashes)) as server:
        yield server


@pytest.fixture
def callers(edge: EdgeServer) -> Iterator[dict[str, Caller]]:
    made = {
        "anonymous": Caller(edge.url, None),
        "alice": Caller(edge.url, ALICE),
        "bob": Caller(edge.url, BOB),
        "empty": Caller(edge.url, EMPTY),
        **{name: Caller(edge.url, header) for name, header in BAD_CREDENTIALS.items()},
    }
    yield made
    for caller in made.values():
        caller.close()


@pytest.fixture
def alice(callers: dict[str, Caller]) -> Caller:
    return callers["alice"]


@pytest.fixture
def stored(s3_server: S3Server, module_s3: S3Settings) -> Any:
    client = s3_server.client()
    return lambda: keys(client, module_s3.bucket)


def push_image(caller: Caller, repo: str, image: Image, tag: str) -> None:
    for digest, data in image.blobs.items():
        response = caller.request("POST", f"/v2/{repo}/blobs/uploads/", params={"digest": digest}, content=data)
        assert response.status_code == 201, response.text
    response = caller.request(
        "PUT", f"/v2/{repo}/manifests/{tag}", content=image.manifest, headers={"Content-Type": OCI_MANIFEST}
    )
    assert response.status_code == 201, response.text


@pytest.fixture
def images(alice: Caller) -> dict[str, Image]:
    """An image tagged `v1` in the public and in the private project."""
    made = {PUBLIC: make_image(label="public"), PRIVATE: make_image(label="private")}
    for repo, image in made.items():
        push_image(alice, repo, image, "v1")
    return made


def pull_requests(repo: str, image: Image) -> list[tuple[str, str, bytes]]:
    """(method, path, content expected on success) for every read of `image` in `repo`."""
    layer = image.layers[0]
    return [
        ("GET", f"/v2/{repo}/manifests/v1", image.manifest),
        ("HEAD", f"/v2/{repo}/manifests/v1", b""),
        ("GET", f"/v2/{repo}/manifests/{image.digest}", image.manifest),
        ("GET", f"/v2/{repo}/blobs/{sha256(layer)}", layer),
        ("HEAD", f"/v2/{repo}/blobs/{sha256(layer)}", b""),
        ("GET", f"/v2/{repo}/tags/list", b'"v1"'),
        ("GET", f"/v2/{repo}/referrers/{image.digest}", b'"manifests"'),
    ]


def push_requests(repo: str) -> list[tuple[str, str, dict[str, Any]]]:
    """Every kind of write to `repo`, each of which would store something if allowed."""
    blob = b"pushed by someone who may not"
    pushed = make_image(label=f"refused-{repo}")
    return [
        ("POST", f"/v2/{repo}/blobs/uploads/", {}),
        ("POST", f"/v2/{repo}/blobs/uploads/", {"params": {"digest": sha256(blob)}, "content": blob}),
        ("POST", f"/v2/{repo}/blobs/uploads/", {"params": {"mount": sha256(blob), "from": PUBLIC}}),
        ("PUT", f"/v2/{repo}/manifests/v2", {"content": pushed.manifest, "headers": {"Content-Type": OCI_MANIFEST}}),
    ]


# --------------------------------------------------------------------------- pulls


def test_anonymous_pull_of_a_public_project(callers: dict[str, Caller], images: dict[str, Image]) -> None:
    for name in ("anonymous", "empty", "alice", "bob"):
        for method, path, content in pull_requests(PUBLIC, images[PUBLIC]):
            response = callers[name].request(method, path)
            assert response.status_code == 200, (name, method, path, response.text)
            assert content in response.content


def test_private_project_pull_needs_a_grant(callers: dict[str, Caller], images: dict[str, Image]) -> None:
    image = images[PRIVATE]
    for name in ("bob", "alice"):  # bob is granted pull; alice's push implies it
        for method, path, content in pull_requests(PRIVATE, image):
            response = callers[name].request(method, path)
            assert response.status_code == 200, (name, method, path, response.text)
            assert content in response.content
    for name in ("anonymous", "empty"):
        for method, path, _ in pull_requests(PRIVATE, image):
            assert_refused(callers[name].request(method, path), 401, "UNAUTHORIZED", image.layers[0])
    # A repository that does not exist in the private project is no less private.
    assert_refused(callers["anonymous"].get(f"/v2/{PRIVATE}-not-there/tags/list"), 401, "UNAUTHORIZED")


@pytest.mark.parametrize("credentials", BAD_CREDENTIALS)
def test_bad_credentials_are_refused_even_on_a_public_project(
    callers: dict[str, Caller], images: dict[str, Image], stored: Any, credentials: str
) -> None:
    caller = callers[credentials]
    for repo in (PUBLIC, PRIVATE):
        image = images[repo]
        for method, path, _ in pull_requests(repo, image):
            response = caller.request(method, path)
            assert_refused(response, 401, "UNAUTHORIZED", image.manifest)
            assert image.layers[0] not in response.content
    for path in ("/v2/", "/v2/_catalog"):
        response = caller.get(path)
        assert_refused(response, 401, "UNAUTHORIZED")
        assert b"local/app" not in response.content
    before = stored()
    for repo in (PUBLIC, PRIVATE):
        for method, path, kwargs in push_requests(repo):
            assert_refused(caller.request(method, path, **kwargs), 401, "UNAUTHORIZED")
        manifest = f"/v2/{repo}/manifests/v1"
        assert_refused(caller.request("DELETE", manifest), 401, "UNAUTHORIZED")
    assert stored() == before


def test_a_wrong_password_is_refused_after_the_right_one_was_accepted(
    callers: dict[str, Caller], images: dict[str, Image]
) -> None:
    """Verified credentials are cached; the cache must not let a wrong password in."""
    assert callers["alice"].get(f"/v2/{PRIVATE}/manifests/v1").status_code == 200
    assert_refused(callers["wrong-password"].get(f"/v2/{PRIVATE}/manifests/v1"), 401, "UNAUTHORIZED")
    assert callers["alice"].get(f"/v2/{PRIVATE}/manifests/v1").status_code == 200


# --------------------------------------------------------------------------- pushes


def test_anonymous_push_is_challenged(
    callers: dict[str, Caller], images: dict[str, Image], stored: Any
) -> None:
    upload = callers["alice"].request("POST", f"/v2/{PUBLIC}/blobs/uploads/")
    session = f"/v2/{PUBLIC}/blobs/uploads/{upload.headers['Docker-Upload-UUID']}"
    before = stored()
    for name in ("anonymous", "empty"):
        caller = callers[name]
        for repo in (PUBLIC, PRIVATE):
            for method, path, kwargs in push_requests(repo):
                assert_refused(caller.request(method, path, **kwargs), 401, "UNAUTHORIZED")
        # Nor may an anonymous caller touch alice's upload session.
        assert_refused(caller.request("GET", session), 401, "UNAUTHORIZED")
        assert_refused(caller.request("PATCH", session, content=b"sneaky"), 401, "UNAUTHORIZED")
        assert_refused(caller.request("PUT", session, params={"digest": sha256(b"sneaky")}), 401, "UNAUTHORIZED")
        assert_refused(caller.request("DELETE", session), 401, "UNAUTHORIZED")
    assert stored() == before
    assert callers["alice"].get(session).status_code == 204


def test_bob_may_not_push(callers: dict[str, Caller], images: dict[str, Image], stored: Any) -> None:
    bob = callers["bob"]
    before = stored()
    for repo in (PUBLIC, PRIVATE):  # `private` grants bob pull only
        for method, path, kwargs in push_requests(repo):
            assert_refused(bob.request(method, path, **kwargs), 403, "DENIED")
    assert stored() == before
    assert callers["anonymous"].get("/v2/_catalog").json()["repositories"] == [PUBLIC]


# --------------------------------------------------------------------------- deletes


def test_alice_may_delete_bob_may_not(callers: dict[str, Caller], images: dict[str, Image], stored: Any) -> None:
    for repo in (PUBLIC, PRIVATE):
        image = images[repo]
        layer = sha256(image.layers[0])
        deletes = [f"/v2/{repo}/manifests/v1", f"/v2/{repo}/manifests/{image.digest}", f"/v2/{repo}/blobs/{layer}"]
        before = stored()
        for path in deletes:
            assert_refused(callers["bob"].request("DELETE", path), 403, "DENIED")
            assert_refused(callers["anonymous"].request("DELETE", path), 401, "UNAUTHORIZED")
            assert_refused(callers["empty"].request("DELETE", path), 401, "UNAUTHORIZED")
        assert stored() == before
        assert callers["bob"].get(f"/v2/{repo}/manifests/v1").content == image.manifest
        for path in deletes:
            assert callers["alice"].request("DELETE", path).status_code == 202, path
        assert callers["alice"].get(f"/v2/{repo}/manifests/{image.digest}").status_code == 404
        assert callers["alice"].get(f"/v2/{repo}/blobs/{layer}").status_code == 404


# --------------------------------------------------------------------------- /v2/ and _catalog


def test_version_check_challenges_anonymous_callers(callers: dict[str, Caller]) -> None:
    for name in ("anonymous", "empty"):
        response = callers[name].get("/v2/")
        assert_refused(response, 401, "UNAUTHORIZED")
        assert response.headers["WWW-Authenticate"] == 'Basic realm="Seawall"'
        assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    for name in ("alice", "bob"):
        response = callers[name].get("/v2/")
        assert response.status_code == 200
        assert response.json() == {}
        assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert_refused(callers["wrong-password"].get("/v2/"), 401, "UNAUTHORIZED")


def test_catalog_lists_only_pullable_repositories(callers: dict[str, Caller], images: dict[str, Image]) -> None:
    assert callers["anonymous"].get("/v2/_catalog").json()["repositories"] == [PUBLIC]
    assert callers["empty"].get("/v2/_catalog").json()["repositories"] == [PUBLIC]
    assert callers["bob"].get("/v2/_catalog").json()["repositories"] == [PUBLIC, PRIVATE]
    assert callers["alice"].get("/v2/_catalog").json()["repositories"] == [PUBLIC, PRIVATE]
    # Pagination counts only what the caller may see.
    page = callers["anonymous"].get("/v2/_catalog", params={"n": "1"})
    assert page.json()["repositories"] == [PUBLIC]
    assert "Link" not in page.headers
    page = callers["bob"].get("/v2/_catalog", params={"n": "1"})
    assert page.json()["repositories"] == [PUBLIC]
    assert "Link" in page.headers


def test_empty_basic_credentials_are_anonymous(callers: dict[str, Caller], images: dict[str, Image]) -> None:
    empty = callers["empty"]
    assert empty.get(f"/v2/{PUBLIC}/manifests/v1").content == images[PUBLIC].manifest
    # Anonymous, so a challenge (401) and not a refusal of a known user (403).
    assert_refused(empty.get(f"/v2/{PRIVATE}/manifests/v1"), 401, "UNAUTHORIZED")
    assert_refused(empty.request("POST", f"/v2/{PUBLIC}/blobs/uploads/"), 401, "UNAUTHORIZED")
    assert_refused(empty.get("/v2/"), 401, "UNAUTHORIZED")
