"""Push workflow: a port of the Go suite's ``02_push_test.go`` (29 specs), plus spec-text checks.

The Go specs are mirrored one test each, class by Ginkgo ``Context``. The Go suite threads
``lastResponse``/``prevResponse`` through its specs; here every state-changing step is a
module-scoped fixture that performs the request and returns the response, and each test only
asserts on the step it is named after. Each dependency is therefore explicit (e.g.
``chunked_put`` needs ``chunk2`` needs ``stale_status`` needs ``chunk1_retry`` needs ``chunk1``)
and any test can run on its own. Two order dependencies remain, as in Go:

* ``test_blob_after_single_post_is_200_if_created_else_404`` expects the config blob not to
  exist yet when the single POST answered 202, so it must run before
  ``test_put_blob_to_session_returns_201`` pushes it (file order);
* Teardown deletes what the tests pushed and stays last.

``TestSpecTextPush`` (at the end) holds **spec text** checks the Go suite does not make: a chunk
gap answering 416 then ``GET`` on the session giving ``204`` with ``Range: 0-<offset-1>``; upload
status on a fresh session; the final chunk sent with the closing PUT; a cancelled upload
(``DELETE`` on the session, from the Docker Registry HTTP API V2 the spec is based on) then
answering 404 ``BLOB_UPLOAD_UNKNOWN``; sha512 blobs; a wrong digest answering 400
``DIGEST_INVALID``; manifest push by digest; ``OCI-Subject``; manifests referencing unknown blobs;
automatic cross-mount without ``from``; mount of an unknown blob; image index push.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.conformance.client import (
    OCI_EMPTY,
    OCI_INDEX,
    OCI_MANIFEST,
    OCTET_STREAM,
    Registry,
    absolute_location,
    describe,
    digest_of,
    error_codes,
    make_blob,
    make_config,
    make_descriptor,
    make_index,
    make_manifest,
    media_type,
    relative_location,
    verify_digest,
)
from tests.conformance.suite import (
    EMPTY_LAYER_TEST_TAG,
    NONEXISTENT_MANIFEST,
    SETTINGS,
    ChunkedBlob,
    Janitor,
    SuiteData,
    expect_2xx,
    expect_header,
    expect_status,
    run_only_if,
    warn,
    workflow_marks,
)

pytestmark = workflow_marks("push")

NUM_MANIFEST_TAGS = 4


# ============================================================================ Blob Upload Streamed


@pytest.fixture(scope="module")
def streamed_patch(registry: Registry, data: SuiteData) -> tuple[httpx.Response, httpx.Response]:
    """POST a session, then PATCH blob A into it without Content-Range (streamed)."""
    post = registry.start_upload()
    patch = registry.request(
        "PATCH",
        relative_location(post),
        headers={"Content-Type": OCTET_STREAM},
        content=data.blob_a.content,
    )
    return post, patch


@pytest.fixture(scope="module")
def streamed_put(
    registry: Registry, data: SuiteData, streamed_patch: tuple[httpx.Response, httpx.Response]
) -> httpx.Response:
    """Close the streamed session: PUT <location>?digest=<blob A> with an empty body."""
    _, patch = streamed_patch
    return registry.put_upload(relative_location(patch), data.blob_a.digest)


class TestBlobUploadStreamed:
    """Context "Blob Upload Streamed"."""

    def test_patch_with_blob_body_returns_202(
        self, streamed_patch: tuple[httpx.Response, httpx.Response]
    ) -> None:
        """PATCH request with blob in body should yield 202 response."""
        post, patch = streamed_patch
        expect_header(post, "Location")
        expect_status(patch, 202)

    def test_put_to_session_with_digest_returns_201_with_location(self, streamed_put: httpx.Response) -> None:
        """PUT request to session URL with digest should yield 201 response."""
        expect_status(streamed_put, 201)
        expect_header(streamed_put, "Location")


# ======================================================================= Blob Upload Monolithic


@pytest.fixture(scope="module")
def monolithic_post(registry: Registry, data: SuiteData) -> httpx.Response:
    """Single POST ?digest=<configs[1]> with the blob as body."""
    config = data.configs[1]
    return registry.start_upload(
        params={"digest": config.digest},
        headers={"Content-Type": OCTET_STREAM},
        content=config.content,
    )


@pytest.fixture(scope="module")
def monolithic_session(registry: Registry) -> httpx.Response:
    """POST /v2/<name>/blobs/uploads/ (no body)."""
    return registry.start_upload()


@pytest.fixture(scope="module")
def monolithic_put(registry: Registry, data: SuiteData, monolithic_session: httpx.Response) -> httpx.Response:
    """PUT configs[1] into the session."""
    config = data.configs[1]
    return registry.put_upload(relative_location(monolithic_session), config.digest, config.content)


@pytest.fixture(scope="module")
def layer_put(registry: Registry, data: SuiteData) -> httpx.Response:
    """POST then PUT the layer blob."""
    session = registry.start_upload()
    return registry.put_upload(relative_location(session), data.layer.digest, data.layer.content)


class TestBlobUploadMonolithic:
    """Context "Blob Upload Monolithic"."""

    def test_get_nonexistent_blob_returns_404(self, registry: Registry, data: SuiteData) -> None:
        """GET nonexistent blob should result in 404 response."""
        expect_status(registry.get_blob(data.dummy_digest), 404)

    def test_single_post_with_digest_and_blob_returns_201_or_202(
        self, monolithic_post: httpx.Response
    ) -> None:
        """POST request with digest and blob should yield a 201 or 202 (with a Location)."""
        expect_header(monolithic_post, "Location")
        expect_status(monolithic_post, 201, 202)

    def test_blob_after_single_post_is_200_if_created_else_404(
        self, registry: Registry, data: SuiteData, monolithic_post: httpx.Response
    ) -> None:
        """GET request to blob URL from prior request should yield 200 or 404 based on
        response code (202: the blob was not stored, 404; otherwise 200)."""
        response = registry.get_blob(data.configs[1].digest)
        expect_status(response, 404 if monolithic_post.status_code == 202 else 200)

    def test_post_returns_202_upload_session(self, monolithic_session: httpx.Response) -> None:
        """POST request should yield a session ID (202)."""
        expect_status(monolithic_session, 202)

    def test_put_blob_to_session_returns_201(self, monolithic_put: httpx.Response) -> None:
        """PUT upload of a blob should yield a 201 Response (with a Location)."""
        expect_header(monolithic_put, "Location")
        expect_status(monolithic_put, 201)

    def test_get_pushed_blob_returns_200(
        self, registry: Registry, data: SuiteData, monolithic_put: httpx.Response
    ) -> None:
        """GET request to existing blob should yield 200 response."""
        expect_status(registry.get_blob(data.configs[1].digest), 200)

    def test_put_layer_blob_to_session_returns_201(self, layer_put: httpx.Response) -> None:
        """PUT upload of a layer blob should yield a 201 Response (with a Location)."""
        expect_header(layer_put, "Location")
        expect_status(layer_put, 201)

    def test_get_pushed_layer_returns_200(
        self, registry: Registry, data: SuiteData, layer_put: httpx.Response
    ) -> None:
        """GET request to existing layer should yield 200 response."""
        expect_status(registry.get_blob(data.layer.digest), 200)


# ============================================================================ Blob Upload Chunked


@dataclass
class ChunkedStart:
    post: httpx.Response
    blob: ChunkedBlob
    patch: httpx.Response


@pytest.fixture(scope="module")
def chunk1(registry: Registry, data: SuiteData) -> ChunkedStart:
    """POST (Content-Length: 0), then PATCH chunk 1 with its Content-Range."""
    post = registry.start_upload()
    blob = data.chunked_for_min_length(post.headers.get("OCI-Chunk-Min-Length"))
    patch = registry.patch_upload(relative_location(post), blob.chunk1, blob.chunk1_range)
    return ChunkedStart(post, blob, patch)


@pytest.fixture(scope="module")
def chunk1_retry(registry: Registry, chunk1: ChunkedStart) -> httpx.Response:
    """PATCH chunk 1 again, to the Location the POST gave (now stale)."""
    blob = chunk1.blob
    return registry.patch_upload(relative_location(chunk1.post), blob.chunk1, blob.chunk1_range)


@pytest.fixture(scope="module")
def stale_status(registry: Registry, chunk1: ChunkedStart, chunk1_retry: httpx.Response) -> httpx.Response:
    """GET the stale (POST) Location: the upload status."""
    return registry.request("GET", relative_location(chunk1.post))


@pytest.fixture(scope="module")
def chunk2(registry: Registry, chunk1: ChunkedStart, stale_status: httpx.Response) -> httpx.Response:
    """PATCH chunk 2 to the Location the status GET returned."""
    blob = chunk1.blob
    return registry.patch_upload(relative_location(stale_status), blob.chunk2, blob.chunk2_range)


@pytest.fixture(scope="module")
def chunked_put(registry: Registry, chunk1: ChunkedStart, chunk2: httpx.Response) -> httpx.Response:
    """Close the chunked session: PUT ?digest=<whole blob> with no body."""
    return registry.put_upload(relative_location(chunk2), chunk1.blob.blob.digest)


class TestBlobUploadChunked:
    """Context "Blob Upload Chunked"."""

    def test_out_of_order_chunk_returns_416(self, registry: Registry, data: SuiteData) -> None:
        """Out-of-order blob upload should return 416 (chunk 2 first, on a fresh session)."""
        post = registry.start_upload()
        expect_header(post, "Location")
        blob = data.chunked_for_min_length(post.headers.get("OCI-Chunk-Min-Length"))
        patch = registry.patch_upload(relative_location(post), blob.chunk2, blob.chunk2_range)
        expect_status(patch, 416)

    def test_first_chunk_returns_202_with_range(self, chunk1: ChunkedStart) -> None:
        """PATCH request with first chunk should return 202 (Range: 0-<end of chunk 1>)."""
        expect_header(chunk1.post, "Location")
        expect_status(chunk1.patch, 202)
        expect_header(chunk1.patch, "Range", chunk1.blob.chunk1_range)

    def test_retrying_previous_chunk_returns_416(self, chunk1_retry: httpx.Response) -> None:
        """Retry previous blob chunk should return 416."""
        expect_status(chunk1_retry, 416)

    def test_get_on_stale_session_returns_204_with_range_and_location(
        self, chunk1: ChunkedStart, stale_status: httpx.Response
    ) -> None:
        """Get on stale blob upload should return 204 with a range and location."""
        expect_status(stale_status, 204)
        expect_header(stale_status, "Location")
        expect_header(stale_status, "Range", chunk1.blob.chunk1_range)

    def test_second_chunk_returns_202(self, chunk2: httpx.Response) -> None:
        """PATCH request with second chunk should return 202 (with a Location)."""
        expect_status(chunk2, 202)
        expect_header(chunk2, "Location")

    def test_put_with_digest_closes_chunked_upload_with_201(self, chunked_put: httpx.Response) -> None:
        """PUT request with digest should return 201 (with a Location)."""
        expect_status(chunked_put, 201)
        expect_header(chunked_put, "Location")


# ======================================================================= Cross-Repository Mount


@pytest.fixture(scope="module")
def mount_from(registry: Registry, data: SuiteData, streamed_put: httpx.Response) -> httpx.Response:
    """POST to the cross-mount repository ?mount=<blob A>&from=<namespace>."""
    return registry.start_upload(
        registry.crossmount_name, params={"mount": data.blob_a.digest, "from": registry.name}
    )


class TestCrossRepositoryBlobMount:
    """Context "Cross-Repository Blob Mount"."""

    def test_mount_without_from_yields_upload_session(self, registry: Registry, data: SuiteData) -> None:
        """Cross-mounting of a blob without the from argument should yield session id (202,
        Location) -- the digest is one no repository holds."""
        response = registry.start_upload(registry.crossmount_name, params={"mount": data.dummy_digest})
        expect_status(response, 202)
        assert absolute_location(response), describe(response)

    def test_mount_from_other_repository_returns_201_or_202(self, mount_from: httpx.Response) -> None:
        """POST request to mount another repository's blob should return 201 or 202."""
        expect_status(mount_from, 201, 202)

    def test_mounted_blob_location_is_pullable_in_target_repository(
        self, registry: Registry, data: SuiteData, mount_from: httpx.Response
    ) -> None:
        """GET request to test digest within cross-mount namespace should return 200 (only
        when the mount answered 201; Location must be /v2/<crossmount>/blobs/<digest>)."""
        if mount_from.status_code != 201:
            pytest.skip("you have skipped this test. (mount answered 202)")
        expected = f"/v2/{registry.crossmount_name}/blobs/{data.blob_a.digest}"
        assert relative_location(mount_from) == expected, describe(mount_from)
        expect_status(registry.request("GET", relative_location(mount_from)), 200)

    def test_mount_fallback_location_is_upload_session_in_target_repository(
        self, registry: Registry, mount_from: httpx.Response
    ) -> None:
        """Cross-mounting of nonexistent blob should yield session id (only when the mount
        answered 202: Location must be /v2/<crossmount>/blobs/uploads/...)."""
        if mount_from.status_code != 202:
            pytest.skip("you have skipped this test. (mount answered 201)")
        prefix = f"/v2/{registry.crossmount_name}/blobs/uploads/"
        assert relative_location(mount_from).startswith(prefix), describe(mount_from)

    @run_only_if(SETTINGS.run_automatic_crossmount_test)
    @run_only_if(SETTINGS.automatic_crossmount_enabled, "OCI_AUTOMATIC_CROSSMOUNT is false")
    def test_mount_without_from_returns_201_when_automatic_crossmount_enabled(
        self, registry: Registry, data: SuiteData, mount_from: httpx.Response
    ) -> None:
        """Cross-mounting without from, and automatic content discovery enabled should return
        a 201 (only after a 201 mount)."""
        if mount_from.status_code != 201:
            pytest.skip("you have skipped this test. (mount answered 202)")
        response = registry.start_upload(registry.crossmount_name, params={"mount": data.blob_a.digest})
        expect_status(response, 201)

    @run_only_if(SETTINGS.run_automatic_crossmount_test)
    @run_only_if(not SETTINGS.automatic_crossmount_enabled, "OCI_AUTOMATIC_CROSSMOUNT is true")
    def test_mount_without_from_returns_202_when_automatic_crossmount_disabled(
        self, registry: Registry, data: SuiteData, mount_from: httpx.Response
    ) -> None:
        """Cross-mounting without from, and automatic content discovery disabled should return
        a 202 (only after a 201 mount)."""
        if mount_from.status_code != 201:
            pytest.skip("you have skipped this test. (mount answered 202)")
        response = registry.start_upload(registry.crossmount_name, params={"mount": data.blob_a.digest})
        expect_status(response, 202)


# ============================================================================ Manifest Upload


@pytest.fixture(scope="module")
def manifest_tags_put(
    registry: Registry,
    data: SuiteData,
    monolithic_put: httpx.Response,
    layer_put: httpx.Response,
) -> list[httpx.Response]:
    """PUT manifests[1] as tags test0..test3 (its config and layer were pushed above)."""
    return [
        registry.put_manifest(f"test{i}", data.manifests[1].content, OCI_MANIFEST)
        for i in range(NUM_MANIFEST_TAGS)
    ]


@pytest.fixture(scope="module")
def empty_layer_put(
    registry: Registry, data: SuiteData, monolithic_put: httpx.Response
) -> httpx.Response | None:
    """PUT the manifest without layers as tag ``emptylayer`` (unless skipped by env)."""
    if SETTINGS.skip_empty_layer_push_test:
        return None
    return registry.put_manifest(EMPTY_LAYER_TEST_TAG, data.empty_layer_manifest.content, OCI_MANIFEST)


class TestManifestUpload:
    """Context "Manifest Upload"."""

    def test_get_nonexistent_manifest_returns_404(self, registry: Registry) -> None:
        """GET nonexistent manifest should return 404."""
        expect_status(registry.get_manifest(NONEXISTENT_MANIFEST, accept=None), 404)

    def test_put_manifest_under_four_tags_returns_201_with_location(
        self, manifest_tags_put: list[httpx.Response]
    ) -> None:
        """PUT should accept a manifest upload (as tags test0..test3: Location, 201)."""
        for response in manifest_tags_put:
            expect_header(response, "Location")
            expect_status(response, 201)

    @run_only_if(not SETTINGS.skip_empty_layer_push_test, "OCI_SKIP_EMPTY_LAYER_PUSH_TEST set")
    def test_put_manifest_without_layers_is_accepted(self, empty_layer_put: httpx.Response | None) -> None:
        """Registry should accept a manifest upload with no layers (201 with a Location;
        anything else is only a warning, as in Go)."""
        assert empty_layer_put is not None
        if empty_layer_put.status_code == 201:
            expect_header(empty_layer_put, "Location")
        else:
            warn("image manifest with no layers is not supported")

    def test_get_pushed_manifest_by_digest_returns_200(
        self, registry: Registry, data: SuiteData, manifest_tags_put: list[httpx.Response]
    ) -> None:
        """GET request to manifest URL (digest) should yield 200 response."""
        expect_status(registry.get_manifest(data.manifests[1].digest), 200)


# ============================================================================ Teardown


def _delete_manifests_test() -> Callable[..., None]:
    def test(
        self: Any,
        registry: Registry,
        data: SuiteData,
        manifest_tags_put: list[httpx.Response],
        empty_layer_put: httpx.Response | None,
    ) -> None:
        expect_status(registry.delete_manifest(data.manifests[1].digest), 405, any_2xx=True)
        if empty_layer_put is not None and empty_layer_put.status_code == 201:
            response = registry.delete_manifest(data.empty_layer_manifest.digest)
            expect_status(response, 405, any_2xx=True)

    test.__doc__ = "Delete manifest created in tests (and the no-layer one): 2xx or 405."
    return test


def _delete_blob_test(which: str) -> Callable[..., None]:
    def test(
        self: Any,
        registry: Registry,
        data: SuiteData,
        monolithic_put: httpx.Response,
        layer_put: httpx.Response,
    ) -> None:
        digest = data.layer.digest if which == "layer" else data.configs[1].digest
        expect_status(registry.delete_blob(digest), 404, 405, any_2xx=True)

    test.__doc__ = f"Delete {which} blob created in tests: 2xx, 404 or 405."
    return test


class TestTeardown:
    """Context "Teardown" (must run last; manifests first unless
    OCI_DELETE_MANIFEST_BEFORE_BLOBS=false)."""

    if SETTINGS.delete_manifest_before_blobs:
        test_deletes_pushed_manifests = _delete_manifests_test()
    test_deletes_config_blob = _delete_blob_test("config")
    test_deletes_layer_blob = _delete_blob_test("layer")
    if not SETTINGS.delete_manifest_before_blobs:
        test_deletes_pushed_manifests = _delete_manifests_test()


# ============================================================================ spec text

RANGE_RE = re.compile(r"^0-\d+$")
PLATFORM = {"architecture": "amd64", "os": "linux"}


def _push_empty_json(registry: Registry, janitor: Janitor) -> tuple[str, bytes]:
    empty = make_blob(b"{}")
    expect_2xx(registry.push_blob(*empty), what="push empty JSON blob")
    janitor.blob(empty[0])
    return empty


def _push_image(registry: Registry, janitor: Janitor) -> tuple[str, bytes]:
    """A small image (random config and layer), pushed by digest; returns the manifest."""
    config, layer = make_config(), make_blob(128)
    for blob in (config, layer):
        expect_2xx(registry.push_blob(*blob), what="push blob")
        janitor.blob(blob[0])
    manifest = make_manifest(config, [layer])
    expect_status(registry.put_manifest(manifest[0], manifest[1]), 201)
    janitor.manifest(manifest[0])
    return manifest


class TestSpecTextPush:
    """Spec text checks (distribution-spec v1.1 "Push" section) the Go suite does not make."""

    def test_chunk_gap_returns_416_and_status_reports_committed_range(
        self, registry: Registry, janitor: Janitor
    ) -> None:
        """ "If a chunk is uploaded out of order, the registry MUST respond with a 416"; the
        status GET then MUST answer 204 with `Location` and `Range: 0-<end-of-range>`, and the
        upload can resume from there."""
        digest, content = make_blob(30)
        post = registry.start_upload()
        expect_status(post, 202)
        first = registry.patch_upload(relative_location(post), content[:10], "0-9")
        expect_status(first, 202)
        expect_header(first, "Range", "0-9")
        location = relative_location(first)
        gap = registry.patch_upload(location, content[15:], "15-29")
        expect_status(gap, 416)
        status = registry.request("GET", location)
        expect_status(status, 204)
        expect_header(status, "Location")
        expect_header(status, "Range", "0-9")
        rest = registry.patch_upload(relative_location(status), content[10:], "10-29")
        expect_status(rest, 202)
        expect_header(rest, "Range", "0-29")
        closed = registry.put_upload(relative_location(rest), digest)
        expect_status(closed, 201)
        janitor.blob(digest)
        assert registry.get_blob(digest).content == content

    def test_upload_status_of_new_session_returns_204_with_location(self, registry: Registry) -> None:
        """GET on an active upload location MUST answer 204 with `Location` (and `Range`; what
        an empty session reports is not pinned down, Distribution says `0-0`)."""
        post = registry.start_upload()
        expect_status(post, 202)
        status = registry.request("GET", relative_location(post))
        expect_status(status, 204)
        expect_header(status, "Location")
        if value := status.headers.get("Range"):
            assert RANGE_RE.match(value), describe(status)

    def test_final_chunk_may_be_sent_with_closing_put(self, registry: Registry, janitor: Janitor) -> None:
        """ "The final chunk MAY be uploaded using a PATCH request or it MAY be uploaded in the
        closing PUT request" (with its Content-Range)."""
        digest, content = make_blob(40)
        post = registry.start_upload()
        first = registry.patch_upload(relative_location(post), content[:16], "0-15")
        expect_status(first, 202)
        closed = registry.put_upload(
            relative_location(first), digest, content[16:], headers={"Content-Range": "16-39"}
        )
        expect_status(closed, 201)
        expect_header(closed, "Location")
        janitor.blob(digest)
        assert registry.get_blob(digest).content == content

    def test_cancelled_upload_session_is_unknown_afterwards(self, registry: Registry) -> None:
        """Docker Registry HTTP API V2 (the spec's base, not in spec.md v1.1): DELETE on the
        upload location cancels it (204); the session then answers 404 BLOB_UPLOAD_UNKNOWN."""
        post = registry.start_upload()
        patch = registry.patch_upload(relative_location(post), b"abcde", "0-4")
        expect_status(patch, 202)
        location = relative_location(patch)
        expect_status(registry.request("DELETE", location), 200, 202, 204)
        status = registry.request("GET", location)
        expect_status(status, 404)
        assert "BLOB_UPLOAD_UNKNOWN" in (error_codes(status) or []), describe(status)

    def test_sha512_blob_push_and_pull(self, registry: Registry, janitor: Janitor) -> None:
        """A blob pushed with a sha512 digest is stored (201, Location) and served under that
        digest; a `Docker-Content-Digest` header (any algorithm) must match the body."""
        digest, content = make_blob(300, algorithm="sha512")
        assert digest.startswith("sha512:")
        assert len(digest) == 7 + 128
        put = registry.push_blob(digest, content)
        expect_status(put, 201)
        expect_header(put, "Location")
        janitor.blob(digest)
        expect_status(registry.head_blob(digest), 200)
        response = registry.get_blob(digest)
        expect_status(response, 200)
        assert response.content == content
        if header := response.headers.get("Docker-Content-Digest"):
            assert verify_digest(header, content), describe(response)

    def test_put_with_mismatched_digest_is_rejected_with_digest_invalid(self, registry: Registry) -> None:
        """Closing PUT whose digest does not match the content: 400 DIGEST_INVALID ("provided
        digest did not match uploaded content"), and nothing is stored under that digest."""
        _, content = make_blob(64)
        wrong_digest, _ = make_blob(64)
        put = registry.push_blob(wrong_digest, content)
        expect_status(put, 400)
        assert "DIGEST_INVALID" in (error_codes(put) or []), describe(put)
        expect_status(registry.head_blob(wrong_digest), 404)

    def test_manifest_push_by_digest_returns_201_with_that_digest(
        self, registry: Registry, janitor: Janitor
    ) -> None:
        """PUT /manifests/<digest>: 201 with `Location`; `Docker-Content-Digest` "MUST be equal
        to the client provided digest"."""
        config = make_config()
        expect_2xx(registry.push_blob(*config))
        janitor.blob(config[0])
        digest, raw = make_manifest(config, [])
        response = registry.put_manifest(digest, raw)
        expect_status(response, 201)
        janitor.manifest(digest)
        expect_header(response, "Location")
        if header := response.headers.get("Docker-Content-Digest"):
            assert header == digest, describe(response)

    def test_manifest_with_subject_answers_oci_subject_header(
        self, registry: Registry, janitor: Janitor
    ) -> None:
        """A registry supporting the referrers API "MUST respond with the response header
        `OCI-Subject: <subject digest>`" to a manifest PUT with a `subject`."""
        subject = _push_image(registry, janitor)
        empty = _push_empty_json(registry, janitor)
        artifact = make_manifest(
            make_descriptor(OCI_EMPTY, empty),
            [make_descriptor(OCI_EMPTY, empty)],
            subject=subject,
            artifact_type="application/vnd.seawall.conformance.subject-test",
        )
        response = registry.put_manifest(artifact[0], artifact[1])
        expect_status(response, 201)
        janitor.manifest(artifact[0])
        expect_header(response, "OCI-Subject", subject[0])

    def test_manifest_with_unknown_blob_is_accepted_or_rejected_as_manifest_blob_unknown(
        self, registry: Registry, janitor: Janitor
    ) -> None:
        """A registry MAY reject a manifest referencing a missing blob; if it does, "it MUST
        result in one or more MANIFEST_BLOB_UNKNOWN errors"."""
        config = make_config()
        expect_2xx(registry.push_blob(*config))
        janitor.blob(config[0])
        missing_layer = make_blob(77)
        digest, raw = make_manifest(config, [missing_layer])
        response = registry.put_manifest(digest, raw)
        if response.status_code == 201:
            janitor.manifest(digest)
            return
        assert 400 <= response.status_code < 500, describe(response)
        assert "MANIFEST_BLOB_UNKNOWN" in (error_codes(response) or []), describe(response)

    @pytest.mark.skipif(not SETTINGS.automatic_crossmount_enabled, reason="OCI_AUTOMATIC_CROSSMOUNT is false")
    def test_mount_without_from_mounts_blob_found_in_another_repository(
        self, registry: Registry, janitor: Janitor
    ) -> None:
        """ "The registry MAY treat the `from` parameter as optional, and it MAY cross-mount the
        blob if it can be found" (required here: OCI_AUTOMATIC_CROSSMOUNT): a blob only in the
        namespace mounts into the cross-mount repository with 201 and is pullable there."""
        digest, content = make_blob(50)
        expect_2xx(registry.push_blob(digest, content))
        janitor.blob(digest)
        target = registry.crossmount_name
        response = registry.start_upload(target, params={"mount": digest})
        expect_status(response, 201)
        janitor.blob(digest, target)
        expect_header(response, "Location")
        assert relative_location(response) == f"/v2/{target}/blobs/{digest}", describe(response)
        pulled = registry.get_blob(digest, name=target)
        expect_status(pulled, 200)
        assert pulled.content == content

    def test_mount_of_unknown_blob_falls_back_to_upload_session(self, registry: Registry) -> None:
        """ "if a registry ... is unable to mount the requested blob, it SHOULD return a 202"
        (an upload session in the target repository)."""
        digest, _ = make_blob(20)
        response = registry.start_upload(
            registry.crossmount_name, params={"mount": digest, "from": registry.name}
        )
        expect_status(response, 202)
        prefix = f"/v2/{registry.crossmount_name}/blobs/uploads/"
        assert relative_location(response).startswith(prefix), describe(response)

    def test_image_index_push_and_pull_keeps_bytes_and_media_type(
        self, registry: Registry, janitor: Janitor
    ) -> None:
        """An image index PUT with its media type is served back byte for byte with that
        Content-Type (MUST store exact bytes; Content-Type SHOULD match the pushed one)."""
        manifest = _push_image(registry, janitor)
        digest, raw = make_index(
            [make_descriptor(OCI_MANIFEST, manifest, platform=PLATFORM)],
            indent=2,
        )
        tag = f"spec-index-{secrets.token_hex(3)}"
        response = registry.put_manifest(tag, raw, OCI_INDEX)
        expect_status(response, 201)
        janitor.manifest(digest)
        pulled = registry.get_manifest(digest, accept=OCI_INDEX)
        expect_status(pulled, 200)
        assert pulled.content == raw
        assert media_type(pulled.headers.get("Content-Type")) == OCI_INDEX, describe(pulled)
        assert json.loads(pulled.content)["manifests"][0]["digest"] == manifest[0]
        assert digest_of(pulled.content) == digest
