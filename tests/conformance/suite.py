"""Port of the Go suite's `setup.go`: environment toggles, shared test data, Gomega-like checks.

Environment variables (same names and meaning as the Go suite unless marked *extension*):

=================================== =========================================================
OCI_ROOT_URL, OCI_NAMESPACE,        the target (read in conftest.py; see `OciTarget`)
OCI_CROSSMOUNT_NAMESPACE,
OCI_USERNAME, OCI_PASSWORD,
OCI_AUTH_SCOPE
OCI_TEST_PULL, OCI_TEST_PUSH,       workflows to run. Go runs only the ones set true. Here,
OCI_TEST_CONTENT_DISCOVERY,         when *none* of them is set true all four run, and one
OCI_TEST_CONTENT_MANAGEMENT         set false switches just that one off; as soon as one is
                                    set true, the unset ones are off (Go's opt-in behaviour).
OCI_HIDE_SKIPPED_WORKFLOWS          deselect disabled workflows instead of reporting skips
OCI_DEBUG                           log every request/response (headers) to stderr
OCI_TAG_NAME, OCI_MANIFEST_DIGEST,  all three set: skip the pull setup and pull this
OCI_BLOB_DIGEST                     existing content (the digests override the test data)
OCI_TAG_LIST                        comma-separated tags: skip the discovery setup
OCI_DELETE_MANIFEST_BEFORE_BLOBS    teardown order (default true, as in Go)
OCI_AUTOMATIC_CROSSMOUNT            unset here means true (Go: unset skips both tests);
                                    true expects 201 for a mount without `from`, false 202
OCI_SKIP_EMPTY_LAYER_PUSH_TEST      skip "manifest upload with no layers"
OCI_TAG_DELETE_ENABLED,             *extension*, default true: the spec-text checks require
OCI_MANIFEST_DELETE_ENABLED,        202 for these deletes (false: they require 400/405).
OCI_BLOB_DELETE_ENABLED             The ported Go specs accept either, as Go does.
OCI_SEED                            *extension*: seed of the random test blobs
OCI_TARGET                          *extension*: "distribution" runs against a local CNCF
                                    Distribution (see conftest.py)
=================================== =========================================================

Booleans are parsed like Go's strconv.ParseBool (1/t/true/0/f/false, any case); anything else
is false, as in Go.
"""

from __future__ import annotations

import base64
import contextlib
import os
import random
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.conformance.client import (
    OCI_CONFIG,
    OCI_EMPTY,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    canonical_json,
    describe,
    digest_of,
    error_codes,
)

# --------------------------------------------------------------------------- environment

ENV_ROOT_URL = "OCI_ROOT_URL"
ENV_NAMESPACE = "OCI_NAMESPACE"
ENV_USERNAME = "OCI_USERNAME"
ENV_PASSWORD = "OCI_PASSWORD"
ENV_DEBUG = "OCI_DEBUG"
ENV_PULL = "OCI_TEST_PULL"
ENV_PUSH = "OCI_TEST_PUSH"
ENV_CONTENT_DISCOVERY = "OCI_TEST_CONTENT_DISCOVERY"
ENV_CONTENT_MANAGEMENT = "OCI_TEST_CONTENT_MANAGEMENT"
ENV_PUSH_EMPTY_LAYER = "OCI_SKIP_EMPTY_LAYER_PUSH_TEST"
ENV_BLOB_DIGEST = "OCI_BLOB_DIGEST"
ENV_MANIFEST_DIGEST = "OCI_MANIFEST_DIGEST"
ENV_TAG_NAME = "OCI_TAG_NAME"
ENV_TAG_LIST = "OCI_TAG_LIST"
ENV_HIDE_SKIPPED_WORKFLOWS = "OCI_HIDE_SKIPPED_WORKFLOWS"
ENV_AUTH_SCOPE = "OCI_AUTH_SCOPE"
ENV_DELETE_MANIFEST_BEFORE_BLOBS = "OCI_DELETE_MANIFEST_BEFORE_BLOBS"
ENV_CROSSMOUNT_NAMESPACE = "OCI_CROSSMOUNT_NAMESPACE"
ENV_AUTOMATIC_CROSSMOUNT = "OCI_AUTOMATIC_CROSSMOUNT"
# extensions (not in the Go suite)
ENV_TARGET = "OCI_TARGET"
ENV_SEED = "OCI_SEED"
ENV_TAG_DELETE_ENABLED = "OCI_TAG_DELETE_ENABLED"
ENV_MANIFEST_DELETE_ENABLED = "OCI_MANIFEST_DELETE_ENABLED"
ENV_BLOB_DELETE_ENABLED = "OCI_BLOB_DELETE_ENABLED"

WORKFLOW_ENV = {
    "pull": ENV_PULL,
    "push": ENV_PUSH,
    "content_discovery": ENV_CONTENT_DISCOVERY,
    "content_management": ENV_CONTENT_MANAGEMENT,
}
WORKFLOW_TITLES = {
    "pull": "Pull",
    "push": "Push",
    "content_discovery": "Content Discovery",
    "content_management": "Content Management",
}

_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def go_parse_bool(value: str | None) -> bool | None:
    """strconv.ParseBool: True/False, or None when the value is not a Go boolean."""
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    return None


def _env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    if name not in env:
        return default
    return bool(go_parse_bool(env[name]))  # Go ignores the parse error: invalid means false


@dataclass(frozen=True)
class Settings:
    pull: bool = True
    push: bool = True
    content_discovery: bool = True
    content_management: bool = True
    hide_skipped_workflows: bool = False
    debug: bool = False
    tag_name: str = ""
    manifest_digest: str = ""
    blob_digest: str = ""
    tag_list: tuple[str, ...] = ()
    run_pull_setup: bool = True
    run_push_setup: bool = True
    run_content_discovery_setup: bool = True
    run_content_management_setup: bool = True
    delete_manifest_before_blobs: bool = True
    run_automatic_crossmount_test: bool = True
    automatic_crossmount_enabled: bool = True
    skip_empty_layer_push_test: bool = False
    tag_delete_enabled: bool = True
    manifest_delete_enabled: bool = True
    blob_delete_enabled: bool = True
    seed: int | None = None
    env_snapshot: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        # Workflow selection: opt-out by default, Go's opt-in as soon as one is set true.
        opted_in = any(go_parse_bool(env.get(name)) for name in WORKFLOW_ENV.values())
        workflows = {key: _env_bool(env, name, default=not opted_in) for key, name in WORKFLOW_ENV.items()}
        tag_name = env.get(ENV_TAG_NAME, "")
        manifest_digest = env.get(ENV_MANIFEST_DIGEST, "")
        blob_digest = env.get(ENV_BLOB_DIGEST, "")
        tag_list_raw = env.get(ENV_TAG_LIST, "")
        crossmount = env.get(ENV_AUTOMATIC_CROSSMOUNT)
        seed_raw = env.get(ENV_SEED, "")
        return cls(
            **workflows,
            hide_skipped_workflows=_env_bool(env, ENV_HIDE_SKIPPED_WORKFLOWS, False),
            debug=_env_bool(env, ENV_DEBUG, False),
            tag_name=tag_name,
            manifest_digest=manifest_digest,
            blob_digest=blob_digest,
            tag_list=tuple(tag_list_raw.split(",")) if tag_list_raw else (),
            run_pull_setup=not (tag_name and manifest_digest and blob_digest),
            run_content_discovery_setup=not tag_list_raw,
            delete_manifest_before_blobs=_env_bool(env, ENV_DELETE_MANIFEST_BEFORE_BLOBS, True),
            run_automatic_crossmount_test=True,
            automatic_crossmount_enabled=True if crossmount is None else bool(go_parse_bool(crossmount)),
            skip_empty_layer_push_test=_env_bool(env, ENV_PUSH_EMPTY_LAYER, False),
            tag_delete_enabled=_env_bool(env, ENV_TAG_DELETE_ENABLED, True),
            manifest_delete_enabled=_env_bool(env, ENV_MANIFEST_DELETE_ENABLED, True),
            blob_delete_enabled=_env_bool(env, ENV_BLOB_DELETE_ENABLED, True),
            seed=int(seed_raw) if seed_raw else None,
            env_snapshot=tuple((k, env[k]) for k in WORKFLOW_ENV.values() if k in env),
        )

    def enabled(self, workflow: str) -> bool:
        return bool(getattr(self, workflow))

    def skip_report(self) -> str:
        """generateSkipReport(): why a workflow's tests were skipped."""
        lines = ["you have skipped this test; if this is an error, check your environment variable settings:"]
        env = dict(self.env_snapshot)
        lines += [f"\t{name}={env.get(name, '')}" for name in WORKFLOW_ENV.values()]
        return "\n".join(lines)


SETTINGS = Settings.from_env()


def workflow_marks(workflow: str) -> list[pytest.MarkDecorator]:
    """`pytestmark` for a workflow module: skip it when disabled (SkipIfDisabled)."""
    return [
        pytest.mark.skipif(not SETTINGS.enabled(workflow), reason=SETTINGS.skip_report()),
        pytest.mark.conformance_workflow(workflow),
    ]


def run_only_if(condition: bool, why: str = "you have skipped this test.") -> pytest.MarkDecorator:
    """RunOnlyIf / RunOnlyIfNot as a mark (for conditions known at import time)."""
    return pytest.mark.skipif(not condition, reason=why)


# --------------------------------------------------------------------------- warnings

WARNINGS: list[str] = []
"""Go's Warn(): collected here and printed in the terminal summary (never `warnings.warn`,
since the project turns warnings into errors)."""


def warn(message: str) -> None:
    WARNINGS.append(message)
    print(f"WARNING: {message}", file=sys.stderr)


# --------------------------------------------------------------------------- matchers


def is_2xx(status: int) -> bool:
    return 200 <= status < 300


def expect_status(response: httpx.Response, *codes: int, any_2xx: bool = False, what: str = "") -> None:
    """Expect the status to be one of `codes` (or any 2xx when `any_2xx`)."""
    status = response.status_code
    if (any_2xx and is_2xx(status)) or status in codes:
        return
    wanted = " or ".join([*(["2xx"] if any_2xx else []), *map(str, codes)])
    prefix = f"{what}: " if what else ""
    raise AssertionError(f"{prefix}expected {wanted}, got {status}: {describe(response)}")


def expect_2xx(response: httpx.Response, what: str = "") -> None:
    expect_status(response, any_2xx=True, what=what)


def expect_header(response: httpx.Response, name: str, value: str | None = None) -> str:
    """Expect a non-empty header (equal to `value` when given); returns it."""
    actual = response.headers.get(name, "")
    assert actual, f"missing {name} header: {describe(response)}"
    if value is not None:
        assert actual == value, f"{name}: expected {value!r}, got {actual!r}: {describe(response)}"
    return actual


def expect_error_code_in(response: httpx.Response, allowed: list[str] | tuple[str, ...]) -> None:
    """The body is an OCI error list whose first code is in `allowed` (reggie resp.Errors())."""
    codes = error_codes(response)
    assert codes is not None, f"body is not an OCI error list: {describe(response)}"
    assert codes, f"empty error list: {describe(response)}"
    assert codes[0] in allowed, f"error code {codes[0]!r} not in {allowed}: {describe(response)}"


# --------------------------------------------------------------------------- test data

TEST_TAG_NAME = "tagtest0"
EMPTY_LAYER_TEST_TAG = "emptylayer"
NONEXISTENT_MANIFEST = ".INVALID_MANIFEST_NAME"
INVALID_MANIFEST_CONTENT = b"blablabla"
ARTIFACT_TYPE_FILTER = "artifactType"
ARTIFACT_TYPE_A = "application/vnd.nhl.peanut.butter.bagel"
ARTIFACT_TYPE_B = "application/vnd.nba.strawberry.jam.croissant"
ARTIFACT_TYPE_INDEX = "application/vnd.food.stand"
ANNOTATION_KEY = "org.opencontainers.conformance.test"
EMPTY_JSON_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"

# Every error code the Go suite accepts (its errorCodes list; note: no TOOMANYREQUESTS).
ERROR_CODES = (
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_INVALID",
    "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN",
    "MANIFEST_UNVERIFIED",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "SIZE_INVALID",
    "TAG_INVALID",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
)

# A tiny tar.gz holding test.txt (the Go suite's layerBase64String).
LAYER_BASE64 = (
    "H4sIAAAAAAAAA+3OQQrCMBCF4a49xXgBSUnaHMCTRBptQRNpp6i3t0UEV7oqIv7fYgbmzeJpHHSjVy0"
    "WZCa1c/MufWVe94N3RWlrZ72x3k/30nhbFWKWLPU0Dhp6keJ8im//PuU/6pZH2WVtYx8b0Sz7LjWSR5VLG6Y"
    "RBumSzOlGtjkd+qD"
    "jMWiX07Befbs7AAAAAAAAAAAAAAAAAPyzO34MnqoAKAAA"
)

# The Go suite builds 16 configs/manifests (numWorkflows is 1<<4 there); it uses 0..4.
NUM_WORKFLOW_OBJECTS = 5


@dataclass(frozen=True)
class Blob:
    """Content plus the digest the tests use for it (which env vars may override)."""

    content: bytes
    digest: str

    @property
    def length(self) -> int:
        return len(self.content)

    @property
    def real_digest(self) -> str:
        return digest_of(self.content)

    @classmethod
    def of(cls, content: bytes, digest: str | None = None) -> Blob:
        return cls(content, digest or digest_of(content))


def random_blob(size: int, seed: int) -> Blob:
    """randomBlob(size, seed): reproducible pseudo-random bytes."""
    return Blob.of(random.Random(seed).randbytes(size))


@dataclass(frozen=True)
class ChunkedBlob:
    """setupChunkedBlob(size): a blob split into two chunks for the chunked-upload specs."""

    blob: Blob
    chunk1: bytes
    chunk2: bytes

    @classmethod
    def make(cls, size: int, seed: int) -> ChunkedBlob:
        blob = random_blob(size, seed)
        cut = size // 2 + 1
        return cls(blob, blob.content[:cut], blob.content[cut:])

    @property
    def chunk1_range(self) -> str:
        return f"0-{len(self.chunk1) - 1}"

    @property
    def chunk2_range(self) -> str:
        return f"{len(self.chunk1)}-{self.blob.length - 1}"


def _descriptor(
    media_type: str, content: bytes, *, digest: str | None = None, **fields: Any
) -> dict[str, Any]:
    """A descriptor shaped like the Go suite's `descriptor` struct marshalled by encoding/json:
    `newUnspecifiedField` has no omitempty, so it is always present (null when unset)."""
    desc: dict[str, Any] = {
        "mediaType": media_type,
        "digest": digest or digest_of(content),
        "size": len(content),
        "newUnspecifiedField": None,
    }
    desc.update(fields)
    return desc


def _go_json(obj: Any) -> bytes:
    """json.MarshalIndent(obj, "", "\\t") equivalent (key order differs; irrelevant)."""
    return canonical_json(obj, indent="\t")


@dataclass(frozen=True)
class SuiteData:
    seed: int
    configs: tuple[Blob, ...]
    manifests: tuple[Blob, ...]
    layer: Blob
    empty_layer_manifest: Blob
    blob_a: Blob
    chunked: ChunkedBlob
    dummy_digest: str
    empty_json: Blob
    ref_blob_a: Blob
    ref_blob_b: Blob
    refs_a_config: Blob
    refs_b_config: Blob
    refs_a_layer: Blob
    refs_b_layer: Blob
    refs_c_layer: Blob
    refs_index: Blob
    annotation_values: Mapping[str, str]

    def chunked_for_min_length(self, header: str | None) -> ChunkedBlob:
        """Rebuild the chunked blob when the registry's OCI-Chunk-Min-Length exceeds chunk 1
        (the Go suite calls setupChunkedBlob(minSize*2 - 2) then)."""
        if header:
            min_size = int(header)
            if min_size > len(self.chunked.chunk1):
                return ChunkedBlob.make(min_size * 2 - 2, self.seed + 2)
        return self.chunked


def build_suite_data(settings: Settings = SETTINGS, seed: int | None = None) -> SuiteData:
    """The Go suite's init(): unique configs and manifests per workflow, blobs and referrers."""
    if seed is None:
        seed = settings.seed if settings.seed is not None else secrets.randbits(48)

    configs = []
    for _ in range(NUM_WORKFLOW_OBJECTS):
        # a random author makes every run's config (and so manifest) digests unique
        config = {
            "author": secrets.token_urlsafe(12)[:16],
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []},
        }
        content = _go_json(config)
        configs.append(Blob.of(content, settings.blob_digest or None))

    layer = Blob.of(base64.b64decode(LAYER_BASE64))
    layer_descriptor = _descriptor(OCI_LAYER_GZIP, layer.content)

    def config_descriptor(config: Blob) -> dict[str, Any]:
        return _descriptor(
            OCI_CONFIG,
            config.content,
            digest=config.digest,
            data=base64.b64encode(config.content).decode(),  # must be the config content
            newUnspecifiedField=base64.b64encode(b"hello world").decode(),  # content irrelevant
        )

    manifests = []
    for config in configs:
        content = _go_json(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": config_descriptor(config),
                "layers": [layer_descriptor],
            }
        )
        manifests.append(Blob.of(content, settings.manifest_digest or None))

    # used in the push test: no mediaType field, no layers
    empty_layer_manifest = Blob.of(
        _go_json({"schemaVersion": 2, "config": config_descriptor(configs[1]), "layers": []})
    )

    blob_a = random_blob(42, seed + 1)
    chunked = ChunkedBlob.make(42, seed + 2)

    # referrers (artifacts with a subject)
    empty_json = Blob.of(b"{}")
    empty_json_descriptor = _descriptor(OCI_EMPTY, empty_json.content)
    ref_blob_a = Blob.of(b"NHL Peanut Butter on my NHL bagel")
    ref_blob_b = Blob.of(b"NBA Strawberry Jam on my NBA croissant")

    def subject(manifest: Blob) -> dict[str, Any]:
        return _descriptor(OCI_MANIFEST, manifest.content)  # digest of the bytes, not env

    def artifact(
        *,
        config: dict[str, Any],
        layers: list[dict[str, Any]],
        subject_of: Blob,
        artifact_type: str | None = None,
        annotation: str | None = None,
    ) -> Blob:
        body: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_MANIFEST}
        if artifact_type:
            body["artifactType"] = artifact_type
        body.update(config=config, layers=layers, subject=subject(subject_of))
        if annotation:
            body["annotations"] = {ANNOTATION_KEY: annotation}
        return Blob.of(_go_json(body))

    # artifacts with config.mediaType = artifactType
    refs_a_config = artifact(
        config=_descriptor(ARTIFACT_TYPE_A, ref_blob_a.content),
        layers=[empty_json_descriptor],
        subject_of=manifests[4],
        annotation="test config a",
    )
    refs_b_config = artifact(
        config=_descriptor(ARTIFACT_TYPE_B, ref_blob_b.content),
        layers=[empty_json_descriptor],
        subject_of=manifests[4],
        annotation="test config b",
    )
    # artifacts with artifactType set and the empty JSON config
    refs_a_layer = artifact(
        artifact_type=ARTIFACT_TYPE_A,
        config=empty_json_descriptor,
        layers=[_descriptor(ARTIFACT_TYPE_A, ref_blob_a.content)],
        subject_of=manifests[4],
        annotation="test layer a",
    )
    refs_b_layer = artifact(
        artifact_type=ARTIFACT_TYPE_B,
        config=empty_json_descriptor,
        layers=[_descriptor(ARTIFACT_TYPE_B, ref_blob_b.content)],
        subject_of=manifests[4],
        annotation="test layer b",
    )
    # like B, but its subject (manifests[3]) has not been pushed
    refs_c_layer = artifact(
        artifact_type=ARTIFACT_TYPE_B,
        config=empty_json_descriptor,
        layers=[_descriptor(ARTIFACT_TYPE_B, ref_blob_b.content)],
        subject_of=manifests[3],
    )
    refs_index = Blob.of(
        _go_json(
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "artifactType": ARTIFACT_TYPE_INDEX,
                "manifests": [
                    _descriptor(OCI_MANIFEST, refs_a_config.content),
                    _descriptor(OCI_MANIFEST, refs_a_layer.content),
                ],
                "subject": subject(manifests[4]),
                "annotations": {ANNOTATION_KEY: "test index"},
            }
        )
    )
    annotation_values = {
        refs_a_config.digest: "test config a",
        refs_b_config.digest: "test config b",
        refs_a_layer.digest: "test layer a",
        refs_b_layer.digest: "test layer b",
        refs_index.digest: "test index",
    }

    return SuiteData(
        seed=seed,
        configs=tuple(configs),
        manifests=tuple(manifests),
        layer=layer,
        empty_layer_manifest=empty_layer_manifest,
        blob_a=blob_a,
        chunked=chunked,
        dummy_digest=digest_of(b"hello world"),
        empty_json=empty_json,
        ref_blob_a=ref_blob_a,
        ref_blob_b=ref_blob_b,
        refs_a_config=refs_a_config,
        refs_b_config=refs_b_config,
        refs_a_layer=refs_a_layer,
        refs_b_layer=refs_b_layer,
        refs_c_layer=refs_c_layer,
        refs_index=refs_index,
        annotation_values=annotation_values,
    )


# --------------------------------------------------------------------------- cleanup


class Janitor:
    """Remembers what the spec-text checks pushed and deletes it afterwards (best effort:
    manifests before blobs, errors ignored)."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry
        self._manifests: list[tuple[str, str | None]] = []
        self._blobs: list[tuple[str, str | None]] = []

    def manifest(self, reference: str, name: str | None = None) -> str:
        self._manifests.append((reference, name))
        return reference

    def blob(self, digest: str, name: str | None = None) -> str:
        self._blobs.append((digest, name))
        return digest

    def clean(self) -> None:
        for reference, name in reversed(self._manifests):
            self._delete("manifests", reference, name)
        for digest, name in reversed(self._blobs):
            self._delete("blobs", digest, name)
        self._manifests.clear()
        self._blobs.clear()

    def _delete(self, kind: str, reference: str, name: str | None) -> None:
        with contextlib.suppress(httpx.HTTPError):
            self.registry.request("DELETE", self.registry.path(kind, reference, name))
