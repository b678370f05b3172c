"""Pull workflow: a port of the Go suite's ``01_pull_test.go`` (24 specs), plus spec-text checks.

The Go specs are mirrored one test each, class by Ginkgo ``Context`` (Setup, Pull blobs, Pull
manifests, Error codes, Teardown), with the statuses the Go suite accepts. Setup runs once in the
module fixture ``pull_setup``; the Setup tests assert on what it recorded, so any test can run on
its own. Teardown tests delete what setup pushed and so must stay last (pytest runs the file in
order); their order follows ``OCI_DELETE_MANIFEST_BEFORE_BLOBS`` as in Go.

``TestSpecTextPull`` (at the end) holds **spec text** checks the Go suite does not make:
``GET /v2/``, blob ``Range`` requests (206 with ``Content-Range``; 416 when unsatisfiable),
``Content-Length``/``Docker-Content-Digest`` on HEAD and GET, manifests served byte for byte with
their media type, and 404 for a repository that does not exist.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.conformance.client import (
    OCI_MANIFEST,
    Registry,
    canonical_json,
    describe,
    digest_of,
    make_blob,
    make_config,
    make_descriptor,
    media_type,
    verify_digest,
)
from tests.conformance.suite import (
    ERROR_CODES,
    INVALID_MANIFEST_CONTENT,
    NONEXISTENT_MANIFEST,
    SETTINGS,
    TEST_TAG_NAME,
    Janitor,
    SuiteData,
    expect_2xx,
    expect_error_code_in,
    expect_status,
    run_only_if,
    workflow_marks,
)

pytestmark = workflow_marks("pull")

setup_only = run_only_if(SETTINGS.run_pull_setup, "pull setup skipped: content given by env")


@dataclass
class PullSetup:
    tag: str
    steps: dict[str, httpx.Response] = field(default_factory=dict)


@pytest.fixture(scope="module")
def pull_setup(registry: Registry, data: SuiteData) -> PullSetup:
    """Context "Setup": push two configs, the layer, manifest[0] as tag ``tagtest0`` and
    manifest[1] by digest -- unless OCI_TAG_NAME, OCI_MANIFEST_DIGEST and OCI_BLOB_DIGEST name
    existing content ("Get tag name from environment")."""
    if not SETTINGS.run_pull_setup:
        return PullSetup(tag=SETTINGS.tag_name)
    c0, c1, m0, m1 = data.configs[0], data.configs[1], data.manifests[0], data.manifests[1]
    steps = {
        "config0": registry.push_blob(c0.digest, c0.content),
        "config1": registry.push_blob(c1.digest, c1.content),
        "layer": registry.push_blob(data.layer.digest, data.layer.content),
        "manifest0": registry.put_manifest(TEST_TAG_NAME, m0.content, OCI_MANIFEST),
        "manifest1": registry.put_manifest(m1.digest, m1.content, OCI_MANIFEST),
    }
    return PullSetup(tag=TEST_TAG_NAME, steps=steps)


class TestSetup:
    """Context "Setup"."""

    @setup_only
    def test_pushes_config0_blob(self, pull_setup: PullSetup) -> None:
        """Populate registry with test blob (configs[0]): 2xx."""
        expect_2xx(pull_setup.steps["config0"])

    @setup_only
    def test_pushes_config1_blob(self, pull_setup: PullSetup) -> None:
        """Populate registry with test blob (configs[1]): 2xx."""
        expect_2xx(pull_setup.steps["config1"])

    @setup_only
    def test_pushes_layer_blob(self, pull_setup: PullSetup) -> None:
        """Populate registry with test layer: 2xx."""
        expect_2xx(pull_setup.steps["layer"])

    @setup_only
    def test_pushes_manifest0_by_tag(self, pull_setup: PullSetup) -> None:
        """Populate registry with test manifest (manifests[0] as tag tagtest0): 2xx."""
        expect_2xx(pull_setup.steps["manifest0"])

    @setup_only
    def test_pushes_manifest1_by_digest(self, pull_setup: PullSetup) -> None:
        """Populate registry with test manifest (manifests[1] by digest): 2xx."""
        expect_2xx(pull_setup.steps["manifest1"])

    @run_only_if(not SETTINGS.run_pull_setup)
    def test_takes_tag_name_from_environment(self, pull_setup: PullSetup) -> None:
        """Get tag name from environment (only when the setup is skipped)."""
        assert pull_setup.tag == SETTINGS.tag_name


class TestPullBlobs:
    """Context "Pull blobs"."""

    def test_head_nonexistent_blob_returns_404(self, registry: Registry, data: SuiteData) -> None:
        """HEAD request to nonexistent blob should result in 404 response."""
        expect_status(registry.head_blob(data.dummy_digest), 404)

    def test_head_existing_blob_returns_200_with_its_digest(
        self, registry: Registry, data: SuiteData, pull_setup: PullSetup
    ) -> None:
        """HEAD request to existing blob should yield 200 (Docker-Content-Digest, if sent,
        equals the blob digest)."""
        response = registry.head_blob(data.configs[0].digest)
        expect_status(response, 200)
        if header := response.headers.get("Docker-Content-Digest"):
            assert header == data.configs[0].digest, describe(response)

    def test_get_nonexistent_blob_returns_404(self, registry: Registry, data: SuiteData) -> None:
        """GET nonexistent blob should result in 404 response."""
        expect_status(registry.get_blob(data.dummy_digest), 404)

    def test_get_existing_blob_returns_200(
        self, registry: Registry, data: SuiteData, pull_setup: PullSetup
    ) -> None:
        """GET request to existing blob URL should yield 200."""
        expect_status(registry.get_blob(data.configs[0].digest), 200)


class TestPullManifests:
    """Context "Pull manifests"."""

    def test_head_nonexistent_manifest_returns_404(self, registry: Registry) -> None:
        """HEAD request to nonexistent manifest should return 404."""
        expect_status(registry.head_manifest(NONEXISTENT_MANIFEST, accept=None), 404)

    @pytest.mark.parametrize("index", [0, 1], ids=["manifest0", "manifest1"])
    def test_head_manifest_by_digest_returns_200_with_its_digest(
        self, registry: Registry, data: SuiteData, pull_setup: PullSetup, index: int
    ) -> None:
        """HEAD request to manifest[0] / manifest[1] path (digest) should yield 200 response."""
        digest = data.manifests[index].digest
        response = registry.head_manifest(digest)
        expect_status(response, 200)
        if header := response.headers.get("Docker-Content-Digest"):
            assert header == digest, describe(response)

    def test_head_manifest_by_tag_returns_200_with_manifest0_digest(
        self, registry: Registry, data: SuiteData, pull_setup: PullSetup
    ) -> None:
        """HEAD request to manifest path (tag) should yield 200 response."""
        assert pull_setup.tag, "no tag to pull"
        response = registry.head_manifest(pull_setup.tag)
        expect_status(response, 200)
        if header := response.headers.get("Docker-Content-Digest"):
            assert header == data.manifests[0].digest, describe(response)

    def test_get_nonexistent_manifest_returns_404(self, registry: Registry) -> None:
        """GET nonexistent manifest should return 404."""
        expect_status(registry.get_manifest(NONEXISTENT_MANIFEST, accept=None), 404)

    @pytest.mark.parametrize("index", [0, 1], ids=["manifest0", "manifest1"])
    def test_get_manifest_by_digest_returns_200(
        self, registry: Registry, data: SuiteData, pull_setup: PullSetup, index: int
    ) -> None:
        """GET request to manifest[0] / manifest[1] path (digest) should yield 200 response."""
        expect_status(registry.get_manifest(data.manifests[index].digest), 200)

    def test_get_manifest_by_tag_returns_200(self, registry: Registry, pull_setup: PullSetup) -> None:
        """GET request to manifest path (tag) should yield 200 response."""
        assert pull_setup.tag, "no tag to pull"
        expect_status(registry.get_manifest(pull_setup.tag), 200)


class TestErrorCodes:
    """Context "Error codes"."""

    def test_malformed_digest_reference_returns_404_or_400_with_oci_error_body(
        self, registry: Registry
    ) -> None:
        """400 response body should contain OCI-conforming JSON message.

        GET /v2/<name>/manifests/sha256:totallywrong (with a junk body, as in Go) must answer
        404, or 400 whose first error code is one of the spec's codes.
        """
        response = registry.request(
            "GET",
            registry.path("manifests", "sha256:totallywrong"),
            headers={"Content-Type": OCI_MANIFEST},
            content=INVALID_MANIFEST_CONTENT,
        )
        expect_status(response, 400, 404)
        if response.status_code == 400:
            expect_error_code_in(response, ERROR_CODES)


def _delete_manifest_test(index: int) -> Callable[..., None]:
    def test(self: Any, registry: Registry, data: SuiteData, pull_setup: PullSetup) -> None:
        response = registry.delete_manifest(data.manifests[index].digest)
        expect_status(response, 405, any_2xx=True)

    test.__doc__ = f"Delete manifest[{index}] created in setup: 2xx or 405."
    return setup_only(test)


def _delete_blob_test(which: str) -> Callable[..., None]:
    def test(self: Any, registry: Registry, data: SuiteData, pull_setup: PullSetup) -> None:
        digest = data.layer.digest if which == "layer" else data.configs[int(which)].digest
        expect_status(registry.delete_blob(digest), 404, 405, any_2xx=True)

    label = "layer blob" if which == "layer" else f"config[{which}] blob"
    test.__doc__ = f"Delete {label} created in setup: 2xx, 404 or 405."
    return setup_only(test)


class TestTeardown:
    """Context "Teardown" (must run last; manifests first unless
    OCI_DELETE_MANIFEST_BEFORE_BLOBS=false)."""

    if SETTINGS.delete_manifest_before_blobs:
        test_deletes_manifest0 = _delete_manifest_test(0)
        test_deletes_manifest1 = _delete_manifest_test(1)
    test_deletes_config0_blob = _delete_blob_test("0")
    test_deletes_config1_blob = _delete_blob_test("1")
    test_deletes_layer_blob = _delete_blob_test("layer")
    if not SETTINGS.delete_manifest_before_blobs:
        test_deletes_manifest0 = _delete_manifest_test(0)
        test_deletes_manifest1 = _delete_manifest_test(1)


# ============================================================================ spec text


@dataclass
class PullContent:
    blob: tuple[str, bytes]
    config: tuple[str, bytes]
    manifest: tuple[str, bytes]
    tag: str


@pytest.fixture(scope="module")
def pull_content(registry: Registry, janitor: Janitor) -> PullContent:
    """A random 1000-byte blob plus an indented (non-canonical) manifest, pushed by digest and
    by tag; deleted afterwards."""
    blob = make_blob(1000)
    config = make_config()
    manifest_body = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": make_descriptor("application/vnd.oci.image.config.v1+json", config),
        "layers": [make_descriptor("application/vnd.oci.image.layer.v1.tar", blob)],
        "annotations": {"org.example.note": "stored byte for byte"},
    }
    # deliberately odd formatting: a registry that re-serialises would change the digest
    raw = b"  " + canonical_json(manifest_body, indent=3) + b"\n\n"
    manifest = (digest_of(raw), raw)
    tag = f"spec-pull-{secrets.token_hex(4)}"
    for digest, content in (blob, config):
        expect_2xx(registry.push_blob(digest, content), what="push blob")
        janitor.blob(digest)
    expect_2xx(registry.put_manifest(manifest[0], raw, OCI_MANIFEST), what="push manifest")
    janitor.manifest(manifest[0])
    expect_2xx(registry.put_manifest(tag, raw, OCI_MANIFEST), what="tag manifest")
    return PullContent(blob=blob, config=config, manifest=manifest, tag=tag)


class TestSpecTextPull:
    """Spec text checks (distribution-spec v1.1 "Pull" section) the Go suite does not make."""

    def test_api_version_check_returns_200(self, registry: Registry) -> None:
        """ "If the response is `200 OK`, then the registry implements this specification"."""
        expect_status(registry.request("GET", "/v2/"), 200)

    def test_blob_range_request_returns_206_with_content_range(
        self, registry: Registry, pull_content: PullContent
    ) -> None:
        """SHOULD support `Range` (RFC 9110): `bytes=10-99` answers 206, `Content-Range:
        bytes 10-99/1000` and exactly those bytes."""
        digest, content = pull_content.blob
        response = registry.get_blob(digest, headers={"Range": "bytes=10-99", "Accept-Encoding": "identity"})
        expect_status(response, 206)
        assert response.headers.get("Content-Range") == f"bytes 10-99/{len(content)}", describe(response)
        assert response.content == content[10:100]

    def test_blob_suffix_range_returns_last_bytes(
        self, registry: Registry, pull_content: PullContent
    ) -> None:
        """RFC 9110 suffix range `bytes=-100`: 206 with the last 100 bytes."""
        digest, content = pull_content.blob
        response = registry.get_blob(digest, headers={"Range": "bytes=-100", "Accept-Encoding": "identity"})
        expect_status(response, 206)
        assert response.headers.get("Content-Range") == (
            f"bytes {len(content) - 100}-{len(content) - 1}/{len(content)}"
        ), describe(response)
        assert response.content == content[-100:]

    def test_blob_unsatisfiable_range_returns_416(
        self, registry: Registry, pull_content: PullContent
    ) -> None:
        """RFC 9110: a range starting past the end answers 416 (with `Content-Range:
        bytes */<size>` if the header is sent). The body is not read."""
        digest, content = pull_content.blob
        with registry.client.stream(
            "GET",
            registry.path("blobs", digest),
            headers={"Range": f"bytes={len(content) + 100}-{len(content) + 200}"},
        ) as response:
            assert response.status_code == 416, f"{response.status_code} {response.headers}"
            if content_range := response.headers.get("Content-Range"):
                assert content_range == f"bytes */{len(content)}"

    def test_head_blob_reports_size_and_digest(self, registry: Registry, pull_content: PullContent) -> None:
        """HEAD: 200, SHOULD carry `Content-Length` = blob size; `Docker-Content-Digest`, if
        present, MUST be the blob digest."""
        digest, content = pull_content.blob
        response = registry.head_blob(digest)
        expect_status(response, 200)
        assert response.headers.get("Content-Length") == str(len(content)), describe(response)
        if header := response.headers.get("Docker-Content-Digest"):
            assert header == digest, describe(response)

    def test_get_blob_returns_content_matching_digest(
        self, registry: Registry, pull_content: PullContent
    ) -> None:
        """GET blob: 200 with the blob; a `Docker-Content-Digest` header MUST match the body."""
        digest, content = pull_content.blob
        response = registry.get_blob(digest)
        expect_status(response, 200)
        assert response.content == content
        if header := response.headers.get("Docker-Content-Digest"):
            assert verify_digest(header, response.content), describe(response)

    @pytest.mark.parametrize("by", ["digest", "tag"])
    def test_get_manifest_returns_exact_bytes_and_media_type(
        self, registry: Registry, pull_content: PullContent, by: str
    ) -> None:
        """MUST store the manifest "in the exact byte representation provided"; Content-Type
        SHOULD match the pushed type; `Docker-Content-Digest`, if present, is its digest."""
        digest, raw = pull_content.manifest
        response = registry.get_manifest(digest if by == "digest" else pull_content.tag)
        expect_status(response, 200)
        assert response.content == raw, "manifest bytes changed"
        assert media_type(response.headers.get("Content-Type")) == OCI_MANIFEST, describe(response)
        if header := response.headers.get("Docker-Content-Digest"):
            assert header == digest, describe(response)

    def test_head_manifest_reports_size(self, registry: Registry, pull_content: PullContent) -> None:
        """HEAD manifest: 200, SHOULD carry `Content-Length` = manifest size."""
        digest, raw = pull_content.manifest
        response = registry.head_manifest(digest)
        expect_status(response, 200)
        assert response.headers.get("Content-Length") == str(len(raw)), describe(response)

    def test_pull_from_nonexistent_repository_returns_404(self, registry: Registry) -> None:
        """ "An attempt to pull a nonexistent repository MUST return response code 404"."""
        name = f"{registry.name}-missing-{secrets.token_hex(4)}"
        expect_status(registry.get_manifest("latest", name=name), 404)
