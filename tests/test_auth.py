"""Authentication and per-project grants on hosted projects.

Callers authenticate with HTTP Basic on every request, or with a Bearer token from the
edge's `/token` endpoint (the flow docker and containerd follow after the edge's
`Bearer realm=".../token"` challenge). The edge fixture's projects: `local` is public,
alice pushes and deletes there; `private` is not public, bob may only pull, alice pushes
and deletes. Refused requests answer the OCI envelope, carry no content, store nothing.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from minio import Minio

from services.embedded import RedisServer, S3Server
from shared.auth.tokens import TOKEN_TTL, TokenSigner
from shared.registry import layout
from shared.settings import S3Settings
from tests.fixtures import servers
from tests.fixtures.edge import PROJECTS, USERS, EdgeServer, build_settings
from tests.support.bucket import read
from tests.support.images import OCI_MANIFEST, Image, make_image, sha256

PUBLIC = "local/app"
PRIVATE = "private/secret"
# A private project only alice may use: bob is an authenticated caller without a grant.
VAULT = {"name": "vault", "type": "hosted", "public": False, "pull": ["alice"], "push": ["alice"]}
CHALLENGE = re.compile(r'^Bearer realm="http://127\.0\.0\.1:\d+/token",service="seawall"$')


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


ALICE = basic("alice", USERS["alice"])
BOB = basic("bob", USERS["bob"])
# What skopeo and podman send when they have no credentials for the registry.
EMPTY = "Basic Og=="
BAD_CREDENTIALS = [
    "wrong-password",
    "other-users-password",
    "unknown-user",
    "empty-password",
    "no-colon",
    "not-base64",
    "unknown-scheme",
    "garbage-token",
    "forged-token",
    "expired-token",
    "tampered-token",
    "non-ascii-token",
    "non-ascii-basic",
    "latin1-token",
]


# --------------------------------------------------------------------------- helpers


def keys(client: Minio, bucket: str) -> set[str]:
    return {o.object_name for o in client.list_objects(bucket, recursive=True) if o.object_name}


def assert_refused(response: httpx.Response, status: int, code: str, secret: bytes | None = None) -> None:
    """The OCI error, the challenge on a 401, and none of the content asked for."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    assert "Docker-Content-Digest" not in response.headers
    if status == 401:
        assert CHALLENGE.match(response.headers["WWW-Authenticate"]), response.headers["WWW-Authenticate"]
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

    def __init__(self, url: str, authorization: str | bytes | None) -> None:
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
def edge(
    redis_server: RedisServer, module_s3: S3Settings, user_hashes: dict[str, str]
) -> Iterator[EdgeServer]:
    """One edge and bucket for the module: each SeaweedFS bucket reserves volumes of its
    own, and every case here only reads, is refused, or re-pushes the same two images.

    Its login limits are out of reach: the cases here send hundreds of wrong passwords from
    one address on purpose (the limits have tests of their own, in test_logins.py)."""
    redis_url = f"redis://127.0.0.1:{redis_server.port}/{next(servers._databases)}"
    settings = build_settings(
        redis_url,
        module_s3,
        user_hashes,
        projects=[*PROJECTS, VAULT],
        logins={"failures_per_client": 1_000_000, "failures_per_account": 1_000_000},
    )
    with EdgeServer(settings) as server:
        yield server


def issue_token(edge: EdgeServer, authorization: str | None = None) -> str:
    headers = {"Authorization": authorization} if authorization else {}
    response = httpx.get(f"{edge.url}/token", headers=headers, params={"service": "seawall"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token"] == body["access_token"]
    assert body["expires_in"] == TOKEN_TTL
    return str(body["token"])


@pytest.fixture(scope="module")
def token_secret(edge: EdgeServer, s3_server: S3Server, module_s3: S3Settings) -> bytes:
    """The secret the edge signs tokens with (kept in the bucket, shared by replicas)."""
    return read(s3_server, module_s3.bucket, layout.TOKEN_SECRET_KEY)


def bad_credentials(edge: EdgeServer, secret: bytes, hashes: dict[str, str]) -> dict[str, str | bytes]:
    """Authorization headers that must be refused, whatever they are presented to."""
    alice_token = issue_token(edge, ALICE)
    payload, _, signature = alice_token.partition(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["exp"] += 86400
    longer = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return {
        "wrong-password": basic("alice", USERS["alice"] + "x"),
        "other-users-password": basic("bob", USERS["alice"]),
        "unknown-user": basic("mallory", USERS["alice"]),
        "empty-password": basic("alice", ""),
        "no-colon": "Basic " + base64.b64encode(b"alice").decode(),
        "not-base64": "Basic !!!not-base64!!!",
        "unknown-scheme": "Digest username=alice",
        "garbage-token": "Bearer some.jwt.token",
        "forged-token": "Bearer " + TokenSigner(os.urandom(32)).issue("alice", hashes["alice"]),
        "expired-token": "Bearer "
        + TokenSigner(secret).issue("alice", hashes["alice"], now=time.time() - 2 * TOKEN_TTL),
        "tampered-token": f"Bearer {longer}.{signature}",
        # Header bytes that are no ASCII at all, as UTF-8 and as a lone Latin-1 byte.
        "non-ascii-token": f"Bearer {payload}.{signature[:-1]}é".encode(),
        "non-ascii-basic": b"Basic " + base64.b64encode(b"alice:x")[:-2] + "é=".encode(),
        "latin1-token": b"Bearer " + payload.encode() + b"." + signature.encode()[:-1] + b"\xff",
    }


@pytest.fixture(scope="module")
def callers(
    edge: EdgeServer, token_secret: bytes, user_hashes: dict[str, str]
) -> Iterator[dict[str, Caller]]:
    """One set for the module: issuing the tokens costs a password check each, and nothing
    here changes a caller."""
    made = {
        "anonymous": Caller(edge.url, None),
        "alice": Caller(edge.url, ALICE),
        "bob": Caller(edge.url, BOB),
        "empty": Caller(edge.url, EMPTY),
        "anonymous-token": Caller(edge.url, "Bearer " + issue_token(edge)),
        "alice-token": Caller(edge.url, "Bearer " + issue_token(edge, ALICE)),
        "bob-token": Caller(edge.url, "Bearer " + issue_token(edge, BOB)),
        **{
            name: Caller(edge.url, header)
            for name, header in bad_credentials(edge, token_secret, user_hashes).items()
        },
    }
    assert set(BAD_CREDENTIALS) <= set(made)
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
        response = caller.request(
            "POST", f"/v2/{repo}/blobs/uploads/", params={"digest": digest}, content=data
        )
        assert response.status_code == 201, response.text
    response = caller.request(
        "PUT",
        f"/v2/{repo}/manifests/{tag}",
        content=image.manifest,
        headers={"Content-Type": OCI_MANIFEST},
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
        (
            "POST",
            f"/v2/{repo}/blobs/uploads/",
            {"params": {"digest": sha256(blob)}, "content": blob},
        ),
        ("POST", f"/v2/{repo}/blobs/uploads/", {"params": {"mount": sha256(blob), "from": PUBLIC}}),
        (
            "PUT",
            f"/v2/{repo}/manifests/v2",
            {"content": pushed.manifest, "headers": {"Content-Type": OCI_MANIFEST}},
        ),
    ]


# --------------------------------------------------------------------------- pulls


def test_anonymous_pull_of_a_public_project(callers: dict[str, Caller], images: dict[str, Image]) -> None:
    for name in (
        "anonymous",
        "empty",
        "anonymous-token",
        "alice",
        "bob",
        "alice-token",
        "bob-token",
    ):
        for method, path, content in pull_requests(PUBLIC, images[PUBLIC]):
            response = callers[name].request(method, path)
            assert response.status_code == 200, (name, method, path, response.text)
            assert content in response.content


def test_private_project_pull_needs_a_grant(callers: dict[str, Caller], images: dict[str, Image]) -> None:
    image = images[PRIVATE]
    # bob is granted pull; alice's push implies it.
    for name in ("bob", "alice", "bob-token", "alice-token"):
        for method, path, content in pull_requests(PRIVATE, image):
            response = callers[name].request(method, path)
            assert response.status_code == 200, (name, method, path, response.text)
            assert content in response.content
    for name in ("anonymous", "empty", "anonymous-token"):
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
    for name in ("anonymous", "empty", "anonymous-token"):
        caller = callers[name]
        for repo in (PUBLIC, PRIVATE):
            for method, path, kwargs in push_requests(repo):
                assert_refused(caller.request(method, path, **kwargs), 401, "UNAUTHORIZED")
        # Nor may an anonymous caller touch alice's upload session.
        assert_refused(caller.request("GET", session), 401, "UNAUTHORIZED")
        assert_refused(caller.request("PATCH", session, content=b"sneaky"), 401, "UNAUTHORIZED")
        assert_refused(
            caller.request("PUT", session, params={"digest": sha256(b"sneaky")}),
            401,
            "UNAUTHORIZED",
        )
        assert_refused(caller.request("DELETE", session), 401, "UNAUTHORIZED")
    assert stored() == before
    assert callers["alice"].get(session).status_code == 204


@pytest.mark.parametrize("bob", ["bob", "bob-token"])
def test_bob_may_not_push(
    callers: dict[str, Caller], images: dict[str, Image], stored: Any, bob: str
) -> None:
    before = stored()
    for repo in (PUBLIC, PRIVATE):  # `private` grants bob pull only
        for method, path, kwargs in push_requests(repo):
            assert_refused(callers[bob].request(method, path, **kwargs), 403, "DENIED")
    assert stored() == before
    assert callers["anonymous"].get("/v2/_catalog").json()["repositories"] == [PUBLIC]


# --------------------------------------------------------------------------- deletes


def test_alice_may_delete_bob_may_not(
    callers: dict[str, Caller], images: dict[str, Image], stored: Any
) -> None:
    for repo in (PUBLIC, PRIVATE):
        image = images[repo]
        layer = sha256(image.layers[0])
        deletes = [
            f"/v2/{repo}/manifests/v1",
            f"/v2/{repo}/manifests/{image.digest}",
            f"/v2/{repo}/blobs/{layer}",
        ]
        before = stored()
        for path in deletes:
            for bob in ("bob", "bob-token"):
                assert_refused(callers[bob].request("DELETE", path), 403, "DENIED")
            for anonymous in ("anonymous", "empty", "anonymous-token"):
                assert_refused(callers[anonymous].request("DELETE", path), 401, "UNAUTHORIZED")
        assert stored() == before
        assert callers["bob"].get(f"/v2/{repo}/manifests/v1").content == image.manifest
        for path, alice in zip(deletes, ["alice", "alice-token", "alice"], strict=True):
            assert callers[alice].request("DELETE", path).status_code == 202, path
        assert callers["alice"].get(f"/v2/{repo}/manifests/{image.digest}").status_code == 404
        assert callers["alice"].get(f"/v2/{repo}/blobs/{layer}").status_code == 404


# --------------------------------------------------------------------------- /v2/ and _catalog


def test_version_check_challenges_anonymous_callers(edge: EdgeServer, callers: dict[str, Caller]) -> None:
    response = callers["anonymous"].get("/v2/")
    assert_refused(response, 401, "UNAUTHORIZED")
    assert response.headers["WWW-Authenticate"] == f'Bearer realm="{edge.url}/token",service="seawall"'
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    # Whoever presents credentials that verify passes the probe, anonymous ones included:
    # what they may do is decided per project (see the empty-credentials test).
    for name in ("alice", "bob", "alice-token", "bob-token", "anonymous-token", "empty"):
        response = callers[name].get("/v2/")
        assert response.status_code == 200, name
        assert response.json() == {}
        assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"


def test_following_the_challenge_yields_a_working_token(edge: EdgeServer, stored: Any) -> None:
    """docker's flow: probe, fetch a token from the realm with Basic credentials, push."""
    challenge = httpx.get(f"{edge.url}/v2/").headers["WWW-Authenticate"]
    realm = re.search(r'realm="([^"]+)"', challenge)
    service = re.search(r'service="([^"]+)"', challenge)
    assert realm
    assert service
    query = {"service": service[1], "scope": f"repository:{PUBLIC}:pull,push"}
    response = httpx.get(realm[1], params=query, headers={"Authorization": ALICE})
    assert response.status_code == 200, response.text
    token = response.json()["token"]
    data = b"pushed with a token"
    with httpx.Client(base_url=edge.url, headers={"Authorization": f"Bearer {token}"}) as alice:
        pushed = alice.post(f"/v2/{PUBLIC}/blobs/uploads/", params={"digest": sha256(data)}, content=data)
        assert pushed.status_code == 201, pushed.text
    assert httpx.get(f"{edge.url}/v2/{PUBLIC}/blobs/{sha256(data)}").content == data


def test_token_endpoint_checks_credentials(
    edge: EdgeServer, token_secret: bytes, user_hashes: dict[str, str]
) -> None:
    signer = TokenSigner(token_secret)
    assert signer.verify(issue_token(edge), user_hashes) is None
    assert signer.verify(issue_token(edge, ALICE), user_hashes) == "alice"
    assert signer.verify(issue_token(edge, EMPTY), user_hashes) is None
    # The OAuth2 password grant (containerd) checks the same credentials.
    granted = httpx.post(
        f"{edge.url}/token",
        data={
            "grant_type": "password",
            "username": "bob",
            "password": USERS["bob"],
            "service": "seawall",
        },
    )
    assert granted.status_code == 200, granted.text
    assert signer.verify(granted.json()["access_token"], user_hashes) == "bob"
    refused = [
        httpx.get(f"{edge.url}/token", headers={"Authorization": basic("alice", "wrong")}),
        httpx.get(f"{edge.url}/token", headers={"Authorization": basic("mallory", USERS["alice"])}),
        httpx.post(f"{edge.url}/token", data={"grant_type": "password", "username": "bob", "password": "x"}),
        # A token cannot be traded for another (which could outlive it).
        httpx.get(
            f"{edge.url}/token",
            headers={"Authorization": "Bearer " + signer.issue("alice", user_hashes["alice"])},
        ),
    ]
    for response in refused:
        assert response.status_code == 401, response.text
        assert response.json()["errors"][0]["code"] == "UNAUTHORIZED"
        assert "token" not in response.json()


def test_catalog_lists_only_pullable_repositories(
    callers: dict[str, Caller], images: dict[str, Image]
) -> None:
    assert callers["anonymous"].get("/v2/_catalog").json()["repositories"] == [PUBLIC]
    assert callers["empty"].get("/v2/_catalog").json()["repositories"] == [PUBLIC]
    assert callers["anonymous-token"].get("/v2/_catalog").json()["repositories"] == [PUBLIC]
    assert callers["bob"].get("/v2/_catalog").json()["repositories"] == [PUBLIC, PRIVATE]
    assert callers["bob-token"].get("/v2/_catalog").json()["repositories"] == [PUBLIC, PRIVATE]
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
    assert_refused(empty.request("DELETE", f"/v2/{PUBLIC}/manifests/v1"), 401, "UNAUTHORIZED")


# --------------------------------------------------------------------------- project names


def test_a_missing_project_is_refused_exactly_like_a_private_one(
    callers: dict[str, Caller], images: dict[str, Image]
) -> None:
    """A caller who may not use a project cannot tell it from one that does not exist:
    same status, code, message and challenge, and no project named in the answer."""
    image = images[PRIVATE]
    # `private/secret` holds an image; `vault` exists but grants only alice; `private`
    # alone names a project but no repository in it.
    cases = {
        "anonymous": [PRIVATE, "vault/secret", "private"],
        "empty": [PRIVATE, "vault/secret"],
        "anonymous-token": [PRIVATE, "vault/secret"],
        "bob": ["vault/secret"],
        "bob-token": ["vault/secret"],
    }
    for name, existing in cases.items():
        caller = callers[name]
        for repo in existing:
            missing = repo.replace("private", "nothere").replace("vault", "nothere")
            asked = [(method, path, {}) for method, path, _ in pull_requests(repo, image)]
            asked += [*push_requests(repo), ("DELETE", f"/v2/{repo}/manifests/v1", {})]
            for method, path, kwargs in asked:
                other = path.replace(f"/v2/{repo}/", f"/v2/{missing}/", 1)
                exists = caller.request(method, path, **kwargs)
                absent = caller.request(method, other, **kwargs)
                assert exists.status_code in (401, 403), (name, method, path, exists.text)
                assert exists.status_code == absent.status_code, (name, method, path)
                assert exists.content == absent.content, (name, method, path)
                assert exists.headers.get("WWW-Authenticate") == absent.headers.get("WWW-Authenticate")
                for project in (b"private", b"vault", b"nothere"):
                    assert project not in exists.content
                    assert project not in absent.content
