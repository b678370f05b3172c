"""Content management workflow: a port of the Go suite's ``04_management_test.go`` (10 specs),
plus spec-text checks.

The Go specs are mirrored one test each, class by Ginkgo ``Context``. Setup pushes configs[3],
the layer and manifests[3] as ``tagtest0`` (fixture ``management_setup``); each delete is a
fixture depending on the previous step, in Go's order: count tags -> delete the tag -> delete
the manifest by digest -> delete the blobs. The tests assert on those steps, accepting what Go
accepts (deletion may be disabled: 400 UNSUPPORTED/405).

``TestSpecTextManagement`` (at the end) holds **spec text** checks the Go suite does not make.
They require deletion to work (202) unless ``OCI_TAG_DELETE_ENABLED``,
``OCI_MANIFEST_DELETE_ENABLED`` or ``OCI_BLOB_DELETE_ENABLED`` is false, in which case they
require the spec's 400/405: deleting a tag keeps the manifest and its other tags; deleting a
manifest makes it and every tag on it 404; deleting a blob makes it 404, and deleting it again
answers 404; a deleted referrer leaves the referrers list; deleting in a repository that does not
exist answers 404.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import httpx
import pytest

from tests.conformance.client import (
    OCI_EMPTY,
    Registry,
    describe,
    error_codes,
    make_blob,
    make_config,
    make_descriptor,
    make_manifest,
    tag_list,
)
from tests.conformance.suite import (
    SETTINGS,
    TEST_TAG_NAME,
    Janitor,
    SuiteData,
    expect_2xx,
    expect_status,
    run_only_if,
    workflow_marks,
)

pytestmark = workflow_marks("content_management")

setup_only = run_only_if(SETTINGS.run_content_management_setup)


@dataclass
class ManagementSetup:
    config: httpx.Response
    layer: httpx.Response
    tag: httpx.Response
    tag_to_delete: str


@pytest.fixture(scope="module")
def management_setup(registry: Registry, data: SuiteData) -> ManagementSetup:
    """Push configs[3], the layer, and manifests[3] as tag ``tagtest0``."""
    config = data.configs[3]
    return ManagementSetup(
        config=registry.push_blob(config.digest, config.content),
        layer=registry.push_blob(data.layer.digest, data.layer.content),
        tag=registry.put_manifest(TEST_TAG_NAME, data.manifests[3].content),
        tag_to_delete=TEST_TAG_NAME,
    )


@pytest.fixture(scope="module")
def tags_before_delete(registry: Registry, management_setup: ManagementSetup) -> httpx.Response:
    """GET tags/list before anything is deleted."""
    return registry.list_tags()


@pytest.fixture(scope="module")
def tag_delete(
    registry: Registry, management_setup: ManagementSetup, tags_before_delete: httpx.Response
) -> httpx.Response:
    """DELETE /v2/<name>/manifests/tagtest0."""
    return registry.delete_manifest(management_setup.tag_to_delete)


@pytest.fixture(scope="module")
def digest_delete(registry: Registry, data: SuiteData, tag_delete: httpx.Response) -> httpx.Response:
    """DELETE /v2/<name>/manifests/<manifests[3] digest>."""
    return registry.delete_manifest(data.manifests[3].digest)


@pytest.fixture(scope="module")
def blob_delete(
    registry: Registry, data: SuiteData, digest_delete: httpx.Response
) -> tuple[httpx.Response, httpx.Response]:
    """DELETE the config blob, then the layer blob."""
    return registry.delete_blob(data.configs[3].digest), registry.delete_blob(data.layer.digest)


def _tag_count(response: httpx.Response) -> int:
    try:
        body = response.json()
    except ValueError as exc:
        raise AssertionError(f"tags list is not JSON: {describe(response)}") from exc
    assert isinstance(body, dict), describe(response)
    return len(tag_list(response))


class TestSetup:
    """Context "Setup"."""

    @setup_only
    def test_pushes_config_blob(self, management_setup: ManagementSetup) -> None:
        """Populate registry with test config blob (configs[3]): 2xx."""
        expect_2xx(management_setup.config)

    @setup_only
    def test_pushes_layer_blob(self, management_setup: ManagementSetup) -> None:
        """Populate registry with test layer: 2xx."""
        expect_2xx(management_setup.layer)

    @setup_only
    def test_pushes_manifest_as_tag(self, management_setup: ManagementSetup) -> None:
        """Populate registry with test tag (manifests[3] as tagtest0): 2xx."""
        expect_2xx(management_setup.tag)

    @setup_only
    def test_counts_tags_before_deleting(self, tags_before_delete: httpx.Response) -> None:
        """Check how many tags there are before anything gets deleted: 200, JSON."""
        expect_status(tags_before_delete, 200)
        _tag_count(tags_before_delete)


class TestManifestDelete:
    """Context "Manifest delete"."""

    def test_delete_tag_returns_202_unless_tag_deletion_is_disallowed(
        self, tag_delete: httpx.Response
    ) -> None:
        """DELETE request to manifest tag should return 202, unless tag deletion is disallowed
        (400 with error code UNSUPPORTED, or 405)."""
        expect_status(tag_delete, 400, 202, 405)
        if tag_delete.status_code == 400:
            codes = error_codes(tag_delete)
            assert codes, f"400 without an OCI error body: {describe(tag_delete)}"
            assert codes[0] == "UNSUPPORTED", describe(tag_delete)

    def test_delete_manifest_by_digest_returns_202_unless_already_deleted(
        self, digest_delete: httpx.Response
    ) -> None:
        """DELETE request to manifest (digest) should yield 202 response unless already
        deleted (404)."""
        expect_status(digest_delete, 202, 404)

    def test_get_deleted_manifest_returns_404_unless_delete_is_disallowed(
        self, registry: Registry, data: SuiteData, digest_delete: httpx.Response
    ) -> None:
        """GET request to deleted manifest URL should yield 404 response, unless delete is
        disallowed (200)."""
        expect_status(registry.get_manifest(data.manifests[3].digest, accept=None), 404, 200)

    def test_tags_list_reflects_manifest_deletion(
        self,
        registry: Registry,
        tags_before_delete: httpx.Response,
        digest_delete: httpx.Response,
    ) -> None:
        """GET request to tags list should reflect manifest deletion (fewer tags than before)."""
        response = registry.list_tags()
        expect_status(response, 200)
        assert _tag_count(response) < len(tag_list(tags_before_delete)), describe(response)


class TestBlobDelete:
    """Context "Blob delete"."""

    @setup_only
    def test_delete_blobs_returns_202(self, blob_delete: tuple[httpx.Response, httpx.Response]) -> None:
        """DELETE request to blob URL should yield 202 response (or 404/405), config then
        layer."""
        config, layer = blob_delete
        expect_status(config, 202, 404, 405, what="config blob")
        expect_status(layer, 202, 404, 405, what="layer blob")

    @setup_only
    def test_get_deleted_blob_returns_404(
        self,
        registry: Registry,
        data: SuiteData,
        blob_delete: tuple[httpx.Response, httpx.Response],
    ) -> None:
        """GET request to deleted blob URL should yield 404 response (only when blob deletion
        is allowed, i.e. the layer delete did not answer 405)."""
        if blob_delete[1].status_code == 405:
            pytest.skip("you have skipped this test. (blob deletion disallowed)")
        expect_status(registry.get_blob(data.configs[3].digest), 404)


class TestTeardown:
    """Context "Teardown": nothing to do (as in Go)."""


# ============================================================================ spec text


def _push_image(registry: Registry, janitor: Janitor, *tags: str) -> tuple[str, bytes]:
    config = make_config()
    expect_2xx(registry.push_blob(*config))
    janitor.blob(config[0])
    manifest = make_manifest(config, [])
    expect_status(registry.put_manifest(manifest[0], manifest[1]), 201)
    janitor.manifest(manifest[0])
    for tag in tags:
        expect_status(registry.put_manifest(tag, manifest[1]), 201)
    return manifest


def _fresh_tag(label: str) -> str:
    return f"spec-{label}-{secrets.token_hex(3)}"


class TestSpecTextManagement:
    """Spec text checks (distribution-spec v1.1 "Content Management") the Go suite misses."""

    def test_deleting_tag_keeps_manifest_and_other_tags(self, registry: Registry, janitor: Janitor) -> None:
        """DELETE /manifests/<tag>: "the registry MUST respond with a 202" (400/405 when tag
        deletion is disabled); then GET of that tag is 404, while the manifest and its other
        tags remain."""
        doomed, kept = _fresh_tag("doomed"), _fresh_tag("kept")
        digest, _ = _push_image(registry, janitor, doomed, kept)
        response = registry.delete_manifest(doomed)
        if not SETTINGS.tag_delete_enabled:
            expect_status(response, 400, 405)
            expect_status(registry.get_manifest(doomed), 200)
            return
        expect_status(response, 202)
        expect_status(registry.get_manifest(doomed), 404)
        expect_status(registry.get_manifest(kept), 200)
        expect_status(registry.get_manifest(digest), 200)
        assert doomed not in tag_list(registry.list_tags())

    def test_deleting_manifest_removes_it_and_every_tag_on_it(
        self, registry: Registry, janitor: Janitor
    ) -> None:
        """DELETE /manifests/<digest>: 202; "Once deleted, a GET to .../<digest> and any tag
        pointing to that digest will return a 404"."""
        tags = [_fresh_tag("gone1"), _fresh_tag("gone2")]
        digest, _ = _push_image(registry, janitor, *tags)
        response = registry.delete_manifest(digest)
        if not SETTINGS.manifest_delete_enabled:
            expect_status(response, 400, 405)
            expect_status(registry.get_manifest(digest), 200)
            return
        expect_status(response, 202)
        expect_status(registry.get_manifest(digest), 404)
        expect_status(registry.head_manifest(digest), 404)
        for tag in tags:
            expect_status(registry.get_manifest(tag), 404)

    def test_deleting_blob_makes_it_unknown_and_a_second_delete_404(
        self, registry: Registry, janitor: Janitor
    ) -> None:
        """DELETE /blobs/<digest>: 202, then HEAD/GET 404; "If the blob is not found, a 404 Not
        Found code MUST be returned" for the second DELETE."""
        digest, content = make_blob(128)
        expect_2xx(registry.push_blob(digest, content))
        janitor.blob(digest)
        response = registry.delete_blob(digest)
        if not SETTINGS.blob_delete_enabled:
            expect_status(response, 400, 405)
            expect_status(registry.head_blob(digest), 200)
            return
        expect_status(response, 202)
        expect_status(registry.head_blob(digest), 404)
        expect_status(registry.get_blob(digest), 404)
        expect_status(registry.delete_blob(digest), 404)

    @pytest.mark.skipif(not SETTINGS.manifest_delete_enabled, reason="manifest deletion off")
    def test_deleted_referrer_leaves_the_referrers_list(self, registry: Registry, janitor: Janitor) -> None:
        """Referrers are the manifests "in the same <name> namespace with a subject field" for
        the digest: once a referrer is deleted it is no longer listed."""
        subject = _push_image(registry, janitor)
        empty = make_blob(b"{}")
        expect_2xx(registry.push_blob(*empty))
        janitor.blob(empty[0])
        referrer = make_manifest(
            make_descriptor(OCI_EMPTY, empty), [make_descriptor(OCI_EMPTY, empty)],
            subject=subject, artifact_type="application/vnd.seawall.conformance.deleted",
        )  # fmt: skip
        expect_status(registry.put_manifest(referrer[0], referrer[1]), 201)
        janitor.manifest(referrer[0])
        before = registry.referrers(subject[0])
        expect_status(before, 200)
        assert [d["digest"] for d in before.json().get("manifests") or []] == [referrer[0]]
        expect_status(registry.delete_manifest(referrer[0]), 202)
        after = registry.referrers(subject[0])
        expect_status(after, 200)
        assert (after.json().get("manifests") or []) == [], describe(after)

    @pytest.mark.skipif(not SETTINGS.manifest_delete_enabled, reason="manifest deletion off")
    def test_delete_in_nonexistent_repository_returns_404(self, registry: Registry) -> None:
        """Deleting manifests: "If the repository does not exist, the response MUST return
        404 Not Found"."""
        name = f"{registry.name}-missing-{secrets.token_hex(4)}"
        digest, _ = make_manifest(make_config(), [])
        expect_status(registry.delete_manifest(digest, name=name), 404)
