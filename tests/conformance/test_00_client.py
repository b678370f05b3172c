"""Offline unit tests of the conformance helpers (builders, auth, env toggles, test data).

These need no registry; they guard the pieces other tests reuse.
"""

from __future__ import annotations

import base64
import hashlib
import json

import httpx
import pytest

from tests.conformance.client import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    OciTarget,
    Registry,
    RegistryAuth,
    digest_of,
    error_codes,
    link_next,
    make_blob,
    make_config,
    make_descriptor,
    make_index,
    make_manifest,
    parse_www_authenticate,
    relative_location,
    verify_digest,
)
from tests.conformance.suite import (
    EMPTY_JSON_DIGEST,
    Settings,
    build_suite_data,
    go_parse_bool,
)

# --------------------------------------------------------------------------- builders


def test_digests_are_algorithm_prefixed_hex() -> None:
    assert digest_of(b"hello world") == (
        "sha256:b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
    )
    sha512 = digest_of(b"x", "sha512")
    assert sha512 == "sha512:" + hashlib.sha512(b"x").hexdigest()
    assert verify_digest(sha512, b"x")
    assert not verify_digest(sha512, b"y")
    with pytest.raises(ValueError, match="unsupported"):
        digest_of(b"x", "md5")


def test_make_blob_from_size_data_and_seed() -> None:
    digest, data = make_blob(10)
    assert len(data) == 10
    assert digest == digest_of(data)
    assert make_blob(b"abc") == (digest_of(b"abc"), b"abc")
    assert make_blob(32, seed=7) == make_blob(32, seed=7)
    assert make_blob(16, algorithm="sha512")[0].startswith("sha512:")


def test_make_config_is_unique_unless_author_is_fixed() -> None:
    assert make_config()[0] != make_config()[0]
    assert make_config(author="me") == make_config(author="me")
    config = json.loads(make_config(author="me")[1])
    assert config == {
        "architecture": "amd64",
        "author": "me",
        "os": "linux",
        "rootfs": {"diff_ids": [], "type": "layers"},
    }


def test_make_manifest_builds_descriptors_deterministically() -> None:
    config, layer = make_config(author="a"), make_blob(b"layer")
    digest, raw = make_manifest(config, [layer], annotations={"k": "v"}, artifact_type="x/y")
    assert digest == digest_of(raw)
    assert raw == make_manifest(config, [layer], annotations={"k": "v"}, artifact_type="x/y")[1]
    assert b" " not in raw  # compact
    body = json.loads(raw)
    assert list(body) == sorted(body)
    assert body["schemaVersion"] == 2
    assert body["mediaType"] == OCI_MANIFEST
    assert body["artifactType"] == "x/y"
    assert body["annotations"] == {"k": "v"}
    assert body["config"] == {"mediaType": OCI_CONFIG, "digest": config[0], "size": len(config[1])}
    assert body["layers"] == [{"mediaType": OCI_LAYER_GZIP, "digest": layer[0], "size": 5}]
    assert "subject" not in body


def test_make_manifest_subject_media_type_comes_from_its_json() -> None:
    config = make_config()
    image = make_manifest(config, [])
    index = make_index([image])
    on_image = json.loads(make_manifest(config, [], subject=image)[1])
    on_index = json.loads(make_manifest(config, [], subject=index)[1])
    assert on_image["subject"]["mediaType"] == OCI_MANIFEST
    assert on_index["subject"] == {"mediaType": OCI_INDEX, "digest": index[0],
                                   "size": len(index[1])}  # fmt: skip


def test_make_manifest_options() -> None:
    config = make_config()
    body = json.loads(make_manifest(config, [], media_type=None, indent="\t")[1])
    assert "mediaType" not in body
    assert body["layers"] == []
    digest, raw = make_manifest(config, [], algorithm="sha512", indent=2)
    assert digest == digest_of(raw, "sha512")
    assert b"\n  " in raw
    verbatim = {"mediaType": "a/b", "digest": config[0], "size": 1, "newUnspecifiedField": None}
    body = json.loads(make_manifest(verbatim, [verbatim])[1])
    assert body["config"] == verbatim
    assert body["layers"] == [verbatim]


def test_make_index_and_descriptor() -> None:
    image = make_manifest(make_config(), [])
    digest, raw = make_index(
        [make_descriptor(OCI_MANIFEST, image, platform={"os": "linux", "architecture": "arm64"})],
        artifact_type="application/x",
        annotations={"a": "b"},
    )
    body = json.loads(raw)
    assert digest == digest_of(raw)
    assert body["mediaType"] == OCI_INDEX
    assert body["artifactType"] == "application/x"
    assert body["manifests"][0]["platform"]["architecture"] == "arm64"
    embedded = make_descriptor("x/y", (digest_of(b"hi"), b"hi"), embed_data=True)
    assert embedded["data"] == base64.b64encode(b"hi").decode()


# --------------------------------------------------------------------------- responses


def _response(status: int = 200, headers: dict[str, str] | None = None, body: bytes = b"",
              url: str = "http://r/v2/x") -> httpx.Response:  # fmt: skip
    return httpx.Response(status, headers=headers, content=body, request=httpx.Request("GET", url))


def test_relative_location_keeps_path_and_query() -> None:
    absolute = _response(202, {"Location": "http://host:5000/v2/a/blobs/uploads/u?_state=x%3D"})
    assert relative_location(absolute) == "/v2/a/blobs/uploads/u?_state=x%3D"
    assert relative_location(_response(202, {"Location": "/v2/a/blobs/uploads/u"})) == (
        "/v2/a/blobs/uploads/u"
    )
    assert relative_location(_response(202)) == ""


def test_link_next_and_error_codes() -> None:
    link = '</v2/a/tags/list?n=2&last=b>; rel="next"'
    assert link_next(_response(headers={"Link": link})) == "/v2/a/tags/list?n=2&last=b"
    assert link_next(_response(headers={"Link": '<http://x/p>; rel="prev"'})) is None
    body = b'{"errors":[{"code":"BLOB_UNKNOWN","message":"m"}]}'
    assert error_codes(_response(404, body=body)) == ["BLOB_UNKNOWN"]
    assert error_codes(_response(404, body=b"404 page not found")) is None


def test_parse_www_authenticate() -> None:
    scheme, params = parse_www_authenticate(
        'Bearer realm="https://auth.example/token",service="registry",scope="repository:a/b:pull,push"'
    )
    assert scheme == "bearer"
    assert params == {"realm": "https://auth.example/token", "service": "registry",
                      "scope": "repository:a/b:pull,push"}  # fmt: skip


# --------------------------------------------------------------------------- auth


def test_basic_credentials_are_sent_preemptively() -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("Authorization"))
        return httpx.Response(200)

    with httpx.Client(transport=httpx.MockTransport(handler), auth=RegistryAuth("user", "pass")) as client:
        client.get("http://registry/v2/")
    assert seen == ["Basic " + base64.b64encode(b"user:pass").decode()]


def test_bearer_challenge_fetches_and_reuses_a_token() -> None:
    token_requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth":
            token_requests.append(request)
            return httpx.Response(200, json={"token": "T0K"})
        if request.headers.get("Authorization") == "Bearer T0K":
            return httpx.Response(200, text="ok")
        challenge = 'Bearer realm="http://auth/token",service="reg",scope="repository:a:pull"'
        return httpx.Response(401, headers={"WWW-Authenticate": challenge})

    auth = RegistryAuth("user", "pass", extra_scope="registry:catalog:*")
    with httpx.Client(transport=httpx.MockTransport(handler), auth=auth) as client:
        assert client.put("http://registry/v2/a/manifests/t", content=b"{}").text == "ok"
        assert client.get("http://registry/v2/a/tags/list").text == "ok"
    assert len(token_requests) == 1
    token_request = token_requests[0]
    assert token_request.url.params.get("service") == "reg"
    assert token_request.url.params.get_list("scope") == ["repository:a:pull", "registry:catalog:*"]
    assert token_request.headers["Authorization"].startswith("Basic ")


def test_anonymous_bearer_flow_sends_no_credentials() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth":
            assert "Authorization" not in request.headers
            return httpx.Response(200, json={"access_token": "anon"})
        if request.headers.get("Authorization") == "Bearer anon":
            return httpx.Response(200)
        return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer realm="http://auth/t"'})

    with httpx.Client(transport=httpx.MockTransport(handler), auth=RegistryAuth(None, None)) as c:
        assert c.get("http://registry/v2/").status_code == 200


def test_registry_appends_params_to_upload_location() -> None:
    urls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        urls.append(str(request.url))
        return httpx.Response(201)

    target = OciTarget("http://registry:5000", namespace="a/b")
    with target.client(transport=httpx.MockTransport(handler)) as client:
        Registry(target, client).put_upload("/v2/a/b/blobs/uploads/u?_state=x%2By%3D", "sha256:0")
    assert urls == ["http://registry:5000/v2/a/b/blobs/uploads/u?_state=x%2By%3D&digest=sha256%3A0"]


def test_target_from_object() -> None:
    class Provided:
        url = "http://127.0.0.1:1234/"
        namespace = None
        crossmount_namespace = "x/other"
        username = "u"
        password = None

    target = OciTarget.from_object(Provided())
    assert target.url == "http://127.0.0.1:1234"
    assert target.namespace == "library/conformance"
    assert target.crossmount_namespace == "x/other"
    assert (target.username, target.password) == ("u", None)
    assert OciTarget.from_object(target, namespace="n").namespace == "n"
    assert OciTarget("registry.example:443").url == "https://registry.example:443"


# --------------------------------------------------------------------------- settings and data


def test_go_parse_bool() -> None:
    assert go_parse_bool("1") is True
    assert go_parse_bool("True") is True
    assert go_parse_bool("f") is False
    assert go_parse_bool("0") is False
    assert go_parse_bool("yes") is None
    assert go_parse_bool(None) is None


def test_workflows_default_on_and_switch_to_opt_in_like_go() -> None:
    assert Settings.from_env({}).enabled("content_management")
    only_pull = Settings.from_env({"OCI_TEST_PULL": "1"})
    assert only_pull.pull
    assert not only_pull.push
    assert not only_pull.content_discovery
    no_push = Settings.from_env({"OCI_TEST_PUSH": "0"})
    assert no_push.pull
    assert not no_push.push
    assert no_push.content_management
    assert not Settings.from_env({"OCI_TEST_PULL": "yes"}).pull  # Go: invalid means false


def test_other_toggles() -> None:
    defaults = Settings.from_env({})
    assert defaults.run_pull_setup
    assert defaults.delete_manifest_before_blobs
    assert defaults.run_automatic_crossmount_test
    assert defaults.automatic_crossmount_enabled
    env = {
        "OCI_TAG_NAME": "t",
        "OCI_MANIFEST_DIGEST": "sha256:m",
        "OCI_BLOB_DIGEST": "sha256:b",
        "OCI_TAG_LIST": "a,b",
        "OCI_DELETE_MANIFEST_BEFORE_BLOBS": "false",
        "OCI_AUTOMATIC_CROSSMOUNT": "0",
        "OCI_BLOB_DELETE_ENABLED": "0",
    }
    settings = Settings.from_env(env)
    assert not settings.run_pull_setup
    assert not settings.run_content_discovery_setup
    assert settings.tag_list == ("a", "b")
    assert not settings.delete_manifest_before_blobs
    assert not settings.automatic_crossmount_enabled
    assert not settings.blob_delete_enabled
    assert settings.tag_delete_enabled
    data = build_suite_data(settings, seed=1)
    assert {c.digest for c in data.configs} == {"sha256:b"}
    assert {m.digest for m in data.manifests} == {"sha256:m"}


def test_suite_data_matches_the_go_suite() -> None:
    data = build_suite_data(Settings.from_env({}), seed=42)
    assert data.empty_json.digest == EMPTY_JSON_DIGEST
    assert data.dummy_digest == digest_of(b"hello world")
    assert len({c.digest for c in data.configs}) == len(data.configs)
    assert data.blob_a.length == 42
    assert data.chunked.blob.length == 42
    assert data.chunked.chunk1_range == "0-21"
    assert data.chunked.chunk2_range == "22-41"
    assert data.chunked.chunk1 + data.chunked.chunk2 == data.chunked.blob.content
    rebuilt = data.chunked_for_min_length("30")
    assert len(rebuilt.chunk1) == 30
    assert rebuilt.blob.length == 58
    manifest = json.loads(data.manifests[0].content)
    assert manifest["config"]["data"] == base64.b64encode(data.configs[0].content).decode()
    assert manifest["config"]["newUnspecifiedField"] == base64.b64encode(b"hello world").decode()
    assert manifest["layers"][0]["newUnspecifiedField"] is None
    assert "mediaType" not in json.loads(data.empty_layer_manifest.content)
    refs_c = json.loads(data.refs_c_layer.content)
    assert refs_c["subject"]["digest"] == data.manifests[3].digest
    assert "annotations" not in refs_c
    index = json.loads(data.refs_index.content)
    assert [d["digest"] for d in index["manifests"]] == [
        data.refs_a_config.digest,
        data.refs_a_layer.digest,
    ]
    assert len(data.annotation_values) == 5
