"""Content discovery workflow: a port of the Go suite's ``03_discovery_test.go`` (16 specs), plus
spec-text checks.

The Go specs are mirrored one test each, class by Ginkgo ``Context``. The setup pushes happen in
module fixtures (``discovery_setup``: config, layer, tags test0..test3; ``references_setup``: the
referrers and their subject ``manifests[4]`` tagged ``tagtest0``) and the Setup tests assert on
what they recorded. One deliberate difference: Go's single "References setup" spec stops at its
first failed expectation (e.g. a missing ``OCI-Subject``), so the later pushes never happen and
the referrers specs fail as a consequence; here every push is made and the test still reports
the first failed expectation, so the referrers specs fail only for their own reasons.
The tag listing specs depend (through ``listed_tags``) on both setups, as Go's order implies.
Teardown deletes everything and stays last.

``TestSpecTextDiscovery`` (at the end) holds **spec text** checks: tags in lexical order,
``tags/list?n=0`` (MUST be an empty list, MUST NOT carry ``Link``), ``n`` pagination with
``Link: <...>; rel="next"``, ``last`` (exclusive), the referrers descriptors (``artifactType``
from the manifest or its config, annotations, sizes), ``?artifactType=`` filtering announced by
``OCI-Filters-Applied: artifactType``, an empty image index for an unknown subject, 400 for a
malformed digest, and ``_catalog`` pagination (not in the spec; Docker Registry HTTP API V2).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.conformance.client import (
    OCI_EMPTY,
    OCI_INDEX,
    OCI_MANIFEST,
    Registry,
    describe,
    link_next,
    make_blob,
    make_config,
    make_descriptor,
    make_index,
    make_manifest,
    media_type,
    tag_list,
)
from tests.conformance.suite import (
    ANNOTATION_KEY,
    ARTIFACT_TYPE_A,
    ARTIFACT_TYPE_FILTER,
    EMPTY_JSON_DIGEST,
    SETTINGS,
    TEST_TAG_NAME,
    Janitor,
    SuiteData,
    expect_2xx,
    expect_header,
    expect_status,
    run_only_if,
    warn,
    workflow_marks,
)

pytestmark = workflow_marks("content_discovery")

NUM_TAGS = 4
setup_only = run_only_if(SETTINGS.run_content_discovery_setup, "discovery setup skipped: OCI_TAG_LIST is set")


@dataclass
class Step:
    label: str
    response: httpx.Response
    expected_subject: str | None = None


@dataclass
class DiscoverySetup:
    config: httpx.Response | None = None
    layer: httpx.Response | None = None
    tags: list[httpx.Response] = field(default_factory=list)


@pytest.fixture(scope="module")
def discovery_setup(registry: Registry, data: SuiteData) -> DiscoverySetup:
    """Push configs[2], the layer, and manifests[2] as tags test0..test3 (unless OCI_TAG_LIST)."""
    if not SETTINGS.run_content_discovery_setup:
        return DiscoverySetup()
    config = data.configs[2]
    return DiscoverySetup(
        config=registry.push_blob(config.digest, config.content),
        layer=registry.push_blob(data.layer.digest, data.layer.content),
        tags=[
            registry.put_manifest(f"test{i}", data.manifests[2].content, OCI_MANIFEST)
            for i in range(NUM_TAGS)
        ],
    )


@pytest.fixture(scope="module")
def references_setup(registry: Registry, data: SuiteData, discovery_setup: DiscoverySetup) -> list[Step]:
    """Go's "References setup": referrers of manifests[4] pushed before and after it, an index
    referrer, and a referrer of manifests[3], which is never pushed."""
    if not SETTINGS.run_content_discovery_setup:
        return []
    m3, m4 = data.manifests[3].digest, data.manifests[4].digest

    def blob(label: str, digest: str, content: bytes) -> Step:
        return Step(label, registry.push_blob(digest, content))

    def manifest(label: str, reference: str, content: bytes, subject: str | None = None,
                 content_type: str = OCI_MANIFEST) -> Step:  # fmt: skip
        return Step(label, registry.put_manifest(reference, content, content_type), subject)

    return [
        blob("empty JSON blob", data.empty_json.digest, data.empty_json.content),
        blob("reference blob A", data.ref_blob_a.digest, data.ref_blob_a.content),
        manifest("refs A (config artifact)", data.refs_a_config.digest,
                 data.refs_a_config.content, m4),
        manifest("refs A (layer artifact)", data.refs_a_layer.digest,
                 data.refs_a_layer.content, m4),
        manifest("refs index", data.refs_index.digest, data.refs_index.content, m4, OCI_INDEX),
        blob("config[4]", data.configs[4].digest, data.configs[4].content),
        blob("layer", data.layer.digest, data.layer.content),
        manifest("manifest[4] as tagtest0", TEST_TAG_NAME, data.manifests[4].content),
        blob("reference blob B", data.ref_blob_b.digest, data.ref_blob_b.content),
        manifest("refs B (config artifact)", data.refs_b_config.digest,
                 data.refs_b_config.content, m4),
        manifest("refs B (layer artifact)", data.refs_b_layer.digest,
                 data.refs_b_layer.content, m4),
        manifest("refs C (subject not pushed)", data.refs_c_layer.digest,
                 data.refs_c_layer.content, m3),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def listed_tags(
    registry: Registry, discovery_setup: DiscoverySetup, references_setup: list[Step]
) -> httpx.Response:
    """GET /v2/<name>/tags/list after both setups (numTags comes from it, as in Go)."""
    return registry.list_tags()


class TestSetup:
    """Context "Setup"."""

    @setup_only
    def test_pushes_config_blob(self, discovery_setup: DiscoverySetup) -> None:
        """Populate registry with test blob (configs[2]): 2xx."""
        assert discovery_setup.config is not None
        expect_2xx(discovery_setup.config)

    @setup_only
    def test_pushes_layer_blob(self, discovery_setup: DiscoverySetup) -> None:
        """Populate registry with test layer: 2xx."""
        assert discovery_setup.layer is not None
        expect_2xx(discovery_setup.layer)

    @setup_only
    def test_pushes_manifest_under_four_tags(self, discovery_setup: DiscoverySetup) -> None:
        """Populate registry with test tags (test0..test3): 2xx each."""
        for response in discovery_setup.tags:
            expect_2xx(response)

    @run_only_if(not SETTINGS.run_content_discovery_setup)
    def test_takes_tag_list_from_environment(self) -> None:
        """Populate registry with test tags (no push): OCI_TAG_LIST gives the tags."""
        assert SETTINGS.tag_list

    @setup_only
    def test_pushes_referrers_and_gets_oci_subject_header(
        self, data: SuiteData, references_setup: list[Step]
    ) -> None:
        """References setup: every push 2xx, and each manifest with a subject answers
        `OCI-Subject: <subject digest>` (checked in Go's order; the first failure is
        reported)."""
        assert data.empty_json.digest == EMPTY_JSON_DIGEST
        for step in references_setup:
            expect_2xx(step.response, what=step.label)
            if step.expected_subject is not None:
                actual = step.response.headers.get("OCI-Subject", "")
                assert actual == step.expected_subject, (
                    f"{step.label}: OCI-Subject {actual!r} != {step.expected_subject!r}: "
                    f"{describe(step.response)}"
                )


class TestListingTags:
    """Context "Test content discovery endpoints (listing tags)"."""

    def test_list_tags_returns_200(self, listed_tags: httpx.Response) -> None:
        """GET request to list tags should yield 200 response."""
        expect_status(listed_tags, 200)

    def test_n_limits_number_of_tags(self, registry: Registry, listed_tags: httpx.Response) -> None:
        """GET number of tags should be limitable by `n` query parameter (n = numTags/2)."""
        num_results = len(tag_list(listed_tags)) // 2
        response = registry.list_tags(params={"n": num_results})
        expect_status(response, 200)
        assert len(tag_list(response)) == num_results, describe(response)

    def test_last_sets_start_of_tag_list(self, registry: Registry, listed_tags: httpx.Response) -> None:
        """GET start of tag is set by `last` query parameter.

        Ported as Go has it: Go builds the second request from the first, `n`-limited page
        and never re-reads the second response, so besides its 200 the expectations are about
        the first page (its tag numTags/2-1 exists, and it holds at most numTags/2 tags). The
        semantics of `last` itself are checked in TestSpecTextDiscovery.
        """
        num_results = len(tag_list(listed_tags)) // 2
        first = tag_list(registry.list_tags(params={"n": num_results}))
        assert 0 < num_results <= len(first), f"cannot index tag {num_results - 1} of {first}"
        response = registry.list_tags(params={"n": num_results, "last": first[num_results - 1]})
        expect_status(response, 200)
        assert len(first) <= num_results
        assert first[num_results - 1] in first


def _check_index_response(response: httpx.Response) -> dict[str, Any]:
    expect_status(response, 200)
    assert response.headers.get("Content-Type") == OCI_INDEX, describe(response)
    body = response.json()
    assert isinstance(body, dict), describe(response)
    return body


def _check_annotations(data: SuiteData, manifests: list[dict[str, Any]]) -> None:
    for desc in manifests:
        annotations = desc.get("annotations") or {}
        assert len(annotations) == 1, desc
        assert annotations.get(ANNOTATION_KEY) == data.annotation_values.get(desc["digest"]), desc


class TestListingReferrers:
    """Context "Test content discovery endpoints (listing references)"."""

    def test_referrers_of_nonexistent_manifest_is_empty_index(
        self, registry: Registry, data: SuiteData, references_setup: list[Step]
    ) -> None:
        """GET request to nonexistent blob should result in empty 200 response (an image
        index with no manifests, Content-Type application/vnd.oci.image.index.v1+json)."""
        body = _check_index_response(registry.referrers(data.dummy_digest))
        assert len(body.get("manifests") or []) == 0, body

    def test_referrers_of_subject_lists_all_five_with_annotations(
        self, registry: Registry, data: SuiteData, references_setup: list[Step]
    ) -> None:
        """GET request to existing blob should yield 200: the five referrers of manifests[4],
        each with its one annotation."""
        body = _check_index_response(registry.referrers(data.manifests[4].digest))
        manifests = body.get("manifests") or []
        assert len(manifests) == 5, body
        assert manifests[0]["digest"] != manifests[1]["digest"]
        _check_annotations(data, manifests)

    def test_referrers_filtered_by_artifact_type(
        self, registry: Registry, data: SuiteData, references_setup: list[Step]
    ) -> None:
        """GET request to existing blob with filter should yield 200: with
        `OCI-Filters-Applied: artifactType` exactly the two type-A referrers; a registry that
        does not filter returns all five (a warning in Go)."""
        response = registry.referrers(data.manifests[4].digest, params={"artifactType": ARTIFACT_TYPE_A})
        body = _check_index_response(response)
        manifests = body.get("manifests") or []
        if response.headers.get("OCI-Filters-Applied"):
            assert len(manifests) == 2, body
            expect_header(response, "OCI-Filters-Applied", ARTIFACT_TYPE_FILTER)
        else:
            assert len(manifests) == 5, body
            warn("filtering by artifact-type is not implemented")
        _check_annotations(data, manifests)

    def test_referrers_of_missing_subject_list_its_referrer(
        self, registry: Registry, data: SuiteData, references_setup: list[Step]
    ) -> None:
        """GET request to missing manifest should yield 200: manifests[3] was never pushed,
        yet its one referrer (refs C) is listed."""
        body = _check_index_response(registry.referrers(data.manifests[3].digest))
        manifests = body.get("manifests") or []
        assert len(manifests) == 1, body
        assert manifests[0]["digest"] == data.refs_c_layer.digest, body


def _delete_manifests_test() -> Callable[..., None]:
    def test(
        self: Any,
        registry: Registry,
        data: SuiteData,
        discovery_setup: DiscoverySetup,
        references_setup: list[Step],
    ) -> None:
        references = [
            data.refs_index.digest,
            data.manifests[2].digest,
            data.manifests[4].digest,
            data.refs_a_config.digest,
            data.refs_a_layer.digest,
            TEST_TAG_NAME,
            data.refs_b_config.digest,
            data.refs_b_layer.digest,
            data.refs_c_layer.digest,
        ]
        for reference in references:
            response = registry.delete_manifest(reference)
            expect_status(response, 404, 405, any_2xx=True, what=f"DELETE {reference}")

    test.__doc__ = "Delete created manifest & associated tags: 2xx, 404 or 405 each."
    return setup_only(test)


def _delete_blob_test(which: str) -> Callable[..., None]:
    def test(self: Any, registry: Registry, data: SuiteData, discovery_setup: DiscoverySetup) -> None:
        digest = data.layer.digest if which == "layer" else data.configs[2].digest
        expect_status(registry.delete_blob(digest), 405, any_2xx=True)

    test.__doc__ = f"Delete {which} blob created in setup: 2xx or 405 (not 404, as in Go)."
    return setup_only(test)


@setup_only
def _references_teardown(
    self: Any, registry: Registry, data: SuiteData, references_setup: list[Step]
) -> None:
    """References teardown: delete the referrers, manifests[4] and the referrer blobs."""

    def delete(kind: str, reference: str) -> None:
        response = registry.request("DELETE", registry.path(kind, reference))
        expect_status(response, 404, 405, any_2xx=True, what=f"DELETE {kind}/{reference}")

    manifests = [
        data.refs_index.digest,
        data.refs_a_config.digest,
        data.refs_a_layer.digest,
        data.manifests[4].digest,
        data.refs_b_config.digest,
        data.refs_b_layer.digest,
    ]
    if SETTINGS.delete_manifest_before_blobs:
        for reference in manifests:
            delete("manifests", reference)
    for digest in (
        data.configs[4].digest,
        data.ref_blob_a.digest,
        data.ref_blob_b.digest,
        data.empty_json.digest,
    ):
        delete("blobs", digest)
    if not SETTINGS.delete_manifest_before_blobs:
        for reference in manifests:
            delete("manifests", reference)


class TestTeardown:
    """Context "Teardown" (must run last)."""

    if SETTINGS.delete_manifest_before_blobs:
        test_deletes_manifests_and_tags = _delete_manifests_test()
    test_deletes_config_blob = _delete_blob_test("config")
    test_deletes_layer_blob = _delete_blob_test("layer")
    if not SETTINGS.delete_manifest_before_blobs:
        test_deletes_manifests_and_tags = _delete_manifests_test()
    test_references_teardown = _references_teardown


# ============================================================================ spec text

ARTIFACT_TYPE_X = "application/vnd.seawall.conformance.x"
ARTIFACT_TYPE_Y = "application/vnd.seawall.conformance.y"
MAX_PAGES = 1000


def _is_lexical(tags: list[str]) -> bool:
    """ "lexical order (i.e. case-insensitive alphanumeric order)": byte order or, for the
    case-insensitive reading, the lower-cased order."""
    return tags == sorted(tags) or tags == sorted(tags, key=str.lower)


def _collect(registry: Registry, first: httpx.Response, key: str) -> list[Any]:
    """The entries of `first` and of every page its `Link: rel="next"` chain leads to."""
    entries: list[Any] = []
    response = first
    for _ in range(MAX_PAGES):
        expect_status(response, 200)
        entries += response.json().get(key) or []
        following = link_next(response)
        if not following:
            return entries
        response = registry.request("GET", following)
    raise AssertionError(f"more than {MAX_PAGES} pages")


@dataclass
class SpecTags:
    digest: str
    tags: list[str]


@pytest.fixture(scope="module")
def spec_tags(registry: Registry, janitor: Janitor) -> SpecTags:
    """One manifest under five fresh tags (deleted with the manifest afterwards)."""
    config = make_config()
    expect_2xx(registry.push_blob(*config))
    janitor.blob(config[0])
    digest, raw = make_manifest(config, [])
    prefix = f"spec-{secrets.token_hex(3)}"
    tags = [f"{prefix}-{letter}" for letter in "abcde"]
    for tag in tags:
        expect_status(registry.put_manifest(tag, raw), 201)
    janitor.manifest(digest)
    return SpecTags(digest, tags)


@dataclass
class SpecReferrers:
    subject: str
    expected: dict[str, dict[str, Any]]
    """digest -> the descriptor fields the referrers list must carry."""


@pytest.fixture(scope="module")
def spec_referrers(registry: Registry, janitor: Janitor) -> SpecReferrers:
    """A subject with three referrers: X (artifactType set), Y (artifactType from its config
    media type) and an index Z (no artifactType)."""
    config, layer = make_config(), make_blob(64)
    empty = make_blob(b"{}")
    y_config = make_blob(b'{"y": true}')
    for blob in (config, layer, empty, y_config):
        expect_2xx(registry.push_blob(*blob))
        janitor.blob(blob[0])
    subject = make_manifest(config, [layer])
    expect_status(registry.put_manifest(subject[0], subject[1]), 201)
    janitor.manifest(subject[0])

    x = make_manifest(
        make_descriptor(OCI_EMPTY, empty), [make_descriptor(OCI_EMPTY, empty)],
        subject=subject, artifact_type=ARTIFACT_TYPE_X, annotations={ANNOTATION_KEY: "x"},
    )  # fmt: skip
    y = make_manifest(
        make_descriptor(ARTIFACT_TYPE_Y, y_config), [make_descriptor(OCI_EMPTY, empty)],
        subject=subject, annotations={ANNOTATION_KEY: "y", "org.example.extra": "2"},
    )  # fmt: skip
    z = make_index([x], subject=subject, annotations={ANNOTATION_KEY: "z"})
    for digest, raw, content_type in ((*x, OCI_MANIFEST), (*y, OCI_MANIFEST), (*z, OCI_INDEX)):
        expect_status(registry.put_manifest(digest, raw, content_type), 201)
    for digest in (z[0], y[0], x[0]):
        janitor.manifest(digest)
    expected = {
        x[0]: {"mediaType": OCI_MANIFEST, "size": len(x[1]), "artifactType": ARTIFACT_TYPE_X,
               "annotations": {ANNOTATION_KEY: "x"}},
        y[0]: {"mediaType": OCI_MANIFEST, "size": len(y[1]), "artifactType": ARTIFACT_TYPE_Y,
               "annotations": {ANNOTATION_KEY: "y", "org.example.extra": "2"}},
        z[0]: {"mediaType": OCI_INDEX, "size": len(z[1]), "artifactType": None,
               "annotations": {ANNOTATION_KEY: "z"}},
    }  # fmt: skip
    return SpecReferrers(subject[0], expected)


class TestSpecTextDiscovery:
    """Spec text checks (distribution-spec v1.1 "Content Discovery") the Go suite misses."""

    def test_tags_are_listed_in_lexical_order(self, registry: Registry, spec_tags: SpecTags) -> None:
        """ "If the list is not empty, the tags MUST be in lexical order"."""
        tags = _collect(registry, registry.list_tags(), "tags")
        assert set(spec_tags.tags) <= set(tags), tags
        assert _is_lexical(tags), tags

    def test_n_zero_returns_empty_list_without_link(self, registry: Registry, spec_tags: SpecTags) -> None:
        """ "When `n` is zero, this endpoint MUST return an empty list, and MUST NOT include a
        `Link` header"."""
        response = registry.list_tags(params={"n": 0})
        expect_status(response, 200)
        assert response.json().get("tags") == [], describe(response)
        assert "Link" not in response.headers, describe(response)

    def test_n_pages_follow_link_next_through_the_whole_list(
        self, registry: Registry, spec_tags: SpecTags
    ) -> None:
        """`n=2`: each page holds 2 tags ("MAY return fewer ... only when the total number of
        tags ... is less than <int> or a `Link` header is provided"), pages are chained by
        `Link: <...>; rel="next"` (RFC 5988; Seawall always sends it while tags remain, the
        spec says MAY), and together they are the whole list in order."""
        full = _collect(registry, registry.list_tags(), "tags")
        assert len(full) >= 5
        pages: list[list[str]] = []
        response = registry.list_tags(params={"n": 2})
        for _ in range(MAX_PAGES):
            expect_status(response, 200)
            page = tag_list(response)
            following = link_next(response)
            assert len(page) <= 2, describe(response)
            if len(page) < 2:
                assert following or sum(map(len, pages)) + len(page) == len(full), describe(response)
            pages.append(page)
            if sum(map(len, pages)) < len(full):
                assert following, f"no Link rel=next after {pages}: {describe(response)}"
            if not following:
                break
            response = registry.request("GET", following)
        assert [tag for page in pages for tag in page] == full

    def test_last_returns_tags_after_it_exclusively(self, registry: Registry, spec_tags: SpecTags) -> None:
        """`n=2&last=<tag>` returns up to 2 tags "beginning non-inclusively with <tagname>";
        without `n` it returns all the following tags (`n` is OPTIONAL with `last`)."""
        full = _collect(registry, registry.list_tags(), "tags")
        last = spec_tags.tags[1]
        after = full[full.index(last) + 1 :]
        response = registry.list_tags(params={"n": 2, "last": last})
        expect_status(response, 200)
        assert tag_list(response) == after[:2], describe(response)
        everything_after = _collect(registry, registry.list_tags(params={"last": last}), "tags")
        assert everything_after == after

    def test_referrers_descriptors_carry_artifact_type_and_annotations(
        self, registry: Registry, spec_referrers: SpecReferrers
    ) -> None:
        """Descriptors "MUST include an `artifactType`" (the manifest's, else its config
        `mediaType`; omitted for an index without one) and "MUST include annotations"."""
        response = registry.referrers(spec_referrers.subject)
        expect_status(response, 200)
        assert media_type(response.headers.get("Content-Type")) == OCI_INDEX, describe(response)
        manifests = _collect(registry, response, "manifests")
        by_digest: dict[str, Any] = {desc["digest"]: desc for desc in manifests}
        assert set(by_digest) == set(spec_referrers.expected), manifests
        for digest, expected in spec_referrers.expected.items():
            desc = by_digest[digest]
            assert desc.get("mediaType") == expected["mediaType"], desc
            assert desc.get("size") == expected["size"], desc
            assert desc.get("artifactType") == expected["artifactType"], desc
            assert desc.get("annotations") == expected["annotations"], desc

    def test_artifact_type_filter_is_applied_and_announced(
        self, registry: Registry, spec_referrers: SpecReferrers
    ) -> None:
        """`?artifactType=` (SHOULD be supported; Seawall does): only matching descriptors,
        and "the response MUST include a header `OCI-Filters-Applied: artifactType`"."""
        response = registry.referrers(spec_referrers.subject, params={"artifactType": ARTIFACT_TYPE_Y})
        expect_status(response, 200)
        expect_header(response, "OCI-Filters-Applied", ARTIFACT_TYPE_FILTER)
        manifests = response.json().get("manifests")
        assert [d["digest"] for d in manifests] == [
            d for d, e in spec_referrers.expected.items() if e["artifactType"] == ARTIFACT_TYPE_Y
        ], manifests

    def test_referrers_of_unknown_subject_is_empty_image_index(self, registry: Registry) -> None:
        """The registry "MUST NOT return a 404": a subject nobody refers to (and that does not
        exist) gets 200 and an empty image index, Content-Type
        application/vnd.oci.image.index.v1+json."""
        response = registry.referrers(make_blob(16)[0])
        expect_status(response, 200)
        assert media_type(response.headers.get("Content-Type")) == OCI_INDEX, describe(response)
        body = response.json()
        assert body.get("schemaVersion") == 2, body
        assert body.get("mediaType", OCI_INDEX) == OCI_INDEX, body
        assert body.get("manifests") == [], body

    def test_referrers_with_malformed_digest_returns_400(self, registry: Registry) -> None:
        """ "If the request is invalid, such as a `<digest>` with an invalid syntax, a
        `400 Bad Request` MUST be returned"."""
        expect_status(registry.referrers("sha256:not-a-valid-digest"), 400)

    def test_catalog_pages_are_sorted_and_linked(
        self, registry: Registry, janitor: Janitor, spec_tags: SpecTags
    ) -> None:
        """`/v2/_catalog` (Docker Registry HTTP API V2, not in spec.md v1.1): repositories in
        sorted order; `n` limits a page, `Link: rel="next"` and `last` continue it."""
        config = make_config()
        expect_2xx(registry.push_blob(*config, name=registry.crossmount_name))
        janitor.blob(config[0], registry.crossmount_name)
        other = make_manifest(config, [])
        put = registry.put_manifest(other[0], other[1], name=registry.crossmount_name)
        expect_status(put, 201)
        janitor.manifest(other[0], registry.crossmount_name)

        full = _collect(registry, registry.catalog(), "repositories")
        assert registry.name in full, full
        assert registry.crossmount_name in full, full
        assert full == sorted(full), full

        first = registry.catalog(params={"n": 1})
        expect_status(first, 200)
        assert first.json().get("repositories") == full[:1], describe(first)
        following = link_next(first)
        assert following, describe(first)
        second = registry.request("GET", following)
        expect_status(second, 200)
        assert second.json().get("repositories") == full[1:2], describe(second)
        after_first = registry.catalog(params={"n": 1, "last": full[0]})
        expect_status(after_first, 200)
        assert after_first.json().get("repositories") == full[1:2], describe(after_first)
