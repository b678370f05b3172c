"""HTTP client, target description and content builders for the OCI conformance tests.

Everything here is plain Python (no pytest), so other tests can reuse it:

    from tests.conformance.client import make_blob, make_config, make_manifest, make_index

    config = make_config()                       # (digest, bytes), unique per call
    layer = make_blob(1024)                      # (digest, bytes), random content
    manifest = make_manifest(config, [layer])    # (digest, bytes)
    index = make_index([manifest])

Builders return `(digest, bytes)` with digests in the `<algorithm>:<hex>` form (sha256 unless
`algorithm="sha512"`); JSON is serialised deterministically (sorted keys; compact unless an
`indent` is given). Wherever a builder takes content (`config`, `layers`, `subject`,
`manifests`) it accepts either a `(digest, bytes)` pair, from which a descriptor is built, or a
descriptor `dict`, which is used verbatim (that is how the conformance data adds fields such
as `data` or `newUnspecifiedField` to descriptors).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import random
import re
import secrets
import sys
from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx

# --------------------------------------------------------------------------- media types

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCTET_STREAM = "application/octet-stream"

USER_AGENT = "seawall-conformance-tests (port of distribution-spec conformance)"

Content = tuple[str, bytes]
"""A `(digest, bytes)` pair as returned by every builder."""

# --------------------------------------------------------------------------- digests

SUPPORTED_ALGORITHMS = ("sha256", "sha384", "sha512")
DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    """The OCI digest string (`<algorithm>:<hex>`) of `data`."""
    if algorithm not in SUPPORTED_ALGORITHMS:
        raise ValueError(f"unsupported digest algorithm {algorithm!r}")
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def verify_digest(digest: str, data: bytes) -> bool:
    """Whether `data` hashes to `digest` (any supported algorithm)."""
    algorithm, _, _ = digest.partition(":")
    if algorithm not in SUPPORTED_ALGORITHMS:
        return False
    return digest_of(data, algorithm) == digest


# --------------------------------------------------------------------------- builders


def canonical_json(obj: Any, indent: str | int | None = None) -> bytes:
    """Deterministic JSON bytes: sorted keys, compact separators unless `indent` is set."""
    if indent is None:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return json.dumps(obj, sort_keys=True, indent=indent, ensure_ascii=False).encode()


def make_blob(
    size_or_data: int | bytes = 64,
    *,
    algorithm: str = "sha256",
    seed: int | None = None,
) -> Content:
    """A blob: random bytes of the given size (reproducible with `seed`), or the given bytes."""
    if isinstance(size_or_data, bytes | bytearray | memoryview):
        data = bytes(size_or_data)
    else:
        if size_or_data < 0:
            raise ValueError("size must be >= 0")
        data = os.urandom(size_or_data) if seed is None else random.Random(seed).randbytes(size_or_data)
    return digest_of(data, algorithm), data


def make_config(
    *,
    author: str | None = None,
    architecture: str = "amd64",
    os_name: str = "linux",
    diff_ids: Iterable[str] = (),
    algorithm: str = "sha256",
    indent: str | int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Content:
    """An OCI image config. A random `author` is used unless one is given, so each call yields
    a unique digest (as the Go suite does for each workflow)."""
    config: dict[str, Any] = {
        "architecture": architecture,
        "os": os_name,
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "author": author if author is not None else secrets.token_urlsafe(12),
    }
    if extra:
        config.update(extra)
    data = canonical_json(config, indent)
    return digest_of(data, algorithm), data


def _media_type_of(data: bytes, default: str) -> str:
    try:
        value = json.loads(data).get("mediaType")
    except (ValueError, AttributeError):
        return default
    return value if isinstance(value, str) and value else default


def make_descriptor(
    media_type: str,
    content: Content,
    *,
    annotations: Mapping[str, str] | None = None,
    artifact_type: str | None = None,
    platform: Mapping[str, Any] | None = None,
    urls: Iterable[str] | None = None,
    embed_data: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """An OCI descriptor for `(digest, bytes)` content."""
    digest, data = content
    desc: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": len(data)}
    if artifact_type:
        desc["artifactType"] = artifact_type
    if annotations:
        desc["annotations"] = dict(annotations)
    if platform:
        desc["platform"] = dict(platform)
    if urls:
        desc["urls"] = list(urls)
    if embed_data:
        desc["data"] = base64.b64encode(data).decode()
    if extra:
        desc.update(extra)
    return desc


def _as_descriptor(item: Content | Mapping[str, Any], default_media_type: str) -> dict[str, Any]:
    if isinstance(item, Mapping):
        return dict(item)
    digest, data = item
    return make_descriptor(_media_type_of(data, default_media_type), (digest, data))


def _as_blob_descriptor(item: Content | Mapping[str, Any], media_type: str) -> dict[str, Any]:
    if isinstance(item, Mapping):
        return dict(item)
    return make_descriptor(media_type, item)


def make_manifest(
    config: Content | Mapping[str, Any],
    layers: Iterable[Content | Mapping[str, Any]] = (),
    media_type: str | None = OCI_MANIFEST,
    subject: Content | Mapping[str, Any] | None = None,
    artifact_type: str | None = None,
    annotations: Mapping[str, str] | None = None,
    *,
    config_media_type: str = OCI_CONFIG,
    layer_media_type: str = OCI_LAYER_GZIP,
    algorithm: str = "sha256",
    indent: str | int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Content:
    """An image manifest (`schemaVersion: 2`). `media_type=None` omits the `mediaType` field.

    A `(digest, bytes)` config gets `config_media_type`, layers get `layer_media_type`, and a
    `(digest, bytes)` subject gets the `mediaType` found in its JSON (else the OCI manifest type).
    """
    manifest: dict[str, Any] = {"schemaVersion": 2}
    if media_type:
        manifest["mediaType"] = media_type
    if artifact_type:
        manifest["artifactType"] = artifact_type
    manifest["config"] = _as_blob_descriptor(config, config_media_type)
    manifest["layers"] = [_as_blob_descriptor(layer, layer_media_type) for layer in layers]
    if subject is not None:
        manifest["subject"] = _as_descriptor(subject, OCI_MANIFEST)
    if annotations:
        manifest["annotations"] = dict(annotations)
    if extra:
        manifest.update(extra)
    data = canonical_json(manifest, indent)
    return digest_of(data, algorithm), data


def make_index(
    manifests: Iterable[Content | Mapping[str, Any]],
    media_type: str | None = OCI_INDEX,
    subject: Content | Mapping[str, Any] | None = None,
    artifact_type: str | None = None,
    annotations: Mapping[str, str] | None = None,
    *,
    algorithm: str = "sha256",
    indent: str | int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Content:
    """An image index. `(digest, bytes)` entries get the `mediaType` found in their JSON."""
    index: dict[str, Any] = {"schemaVersion": 2}
    if media_type:
        index["mediaType"] = media_type
    if artifact_type:
        index["artifactType"] = artifact_type
    index["manifests"] = [_as_descriptor(m, OCI_MANIFEST) for m in manifests]
    if subject is not None:
        index["subject"] = _as_descriptor(subject, OCI_MANIFEST)
    if annotations:
        index["annotations"] = dict(annotations)
    if extra:
        index.update(extra)
    data = canonical_json(index, indent)
    return digest_of(data, algorithm), data


# --------------------------------------------------------------------------- auth

_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


def parse_www_authenticate(value: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="...",service="...",scope="..."` -> ("bearer", {...})."""
    scheme, _, rest = value.strip().partition(" ")
    params = {
        m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
        for m in _CHALLENGE_PARAM.finditer(rest)
    }
    return scheme.lower(), params


class RegistryAuth(httpx.Auth):
    """HTTP Basic when credentials are set, plus the registry token flow on a Bearer challenge.

    Basic is sent pre-emptively (Seawall speaks Basic directly). When a response is a 401 with
    `WWW-Authenticate: Bearer realm=...,service=...,scope=...` (CNCF Distribution with token
    auth), a token is fetched from the realm (with Basic credentials if any, anonymous
    otherwise), remembered, and the request retried once with it.
    """

    # Bodies are not read for every response (a streamed blob GET must stay unread); the
    # token response is read explicitly below, which works for the sync client used here.
    requires_response_body = False

    def __init__(self, username: str | None, password: str | None, extra_scope: str | None = None) -> None:
        self._basic: str | None = None
        if username or password:
            raw = f"{username or ''}:{password or ''}".encode()
            self._basic = "Basic " + base64.b64encode(raw).decode()
        self._extra_scope = extra_scope
        self._token: str | None = None

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self._token:
            request.headers["Authorization"] = f"Bearer {self._token}"
        elif self._basic:
            request.headers["Authorization"] = self._basic
        response = yield request
        if response.status_code != 401:
            return
        challenge = response.headers.get("WWW-Authenticate", "")
        scheme, params = parse_www_authenticate(challenge)
        if scheme == "bearer" and params.get("realm"):
            query: list[tuple[str, str]] = []
            if params.get("service"):
                query.append(("service", params["service"]))
            for scope in (params.get("scope"), self._extra_scope):
                if scope:
                    query.extend(("scope", s) for s in scope.split(" ") if s)
            token_request = httpx.Request("GET", params["realm"], params=query)
            if self._basic:
                token_request.headers["Authorization"] = self._basic
            token_response = yield token_request
            token_response.read()
            if token_response.status_code != 200:
                return
            try:
                body = token_response.json()
            except ValueError:
                return
            token = body.get("token") or body.get("access_token")
            if not token:
                return
            self._token = token
            request.headers["Authorization"] = f"Bearer {token}"
            yield request
        elif scheme == "basic" and self._basic and "Authorization" not in request.headers:
            request.headers["Authorization"] = self._basic
            yield request


def _redact(headers: httpx.Headers) -> dict[str, str]:
    return {
        k: ("*****" if k.lower() in {"authorization", "cookie", "set-cookie"} else v)
        for k, v in headers.items()
    }


def _debug_request(request: httpx.Request) -> None:
    print(f">>> {request.method} {request.url} {_redact(request.headers)}", file=sys.stderr)


def _debug_response(response: httpx.Response) -> None:
    print(f"<<< {response.status_code} {_redact(response.headers)}", file=sys.stderr)


# --------------------------------------------------------------------------- target


@dataclass
class OciTarget:
    """The registry under test (the Go suite's OCI_ROOT_URL, OCI_NAMESPACE, ... settings)."""

    url: str
    namespace: str = "library/conformance"
    crossmount_namespace: str = "library/conformance-other"
    username: str | None = None
    password: str | None = None
    auth_scope: str | None = None
    """Extra scope requested with every token (the Go suite's OCI_AUTH_SCOPE)."""
    debug: bool = False
    """Log every request and response (headers only, credentials redacted) to stderr."""
    timeout: float = 60.0
    verify_tls: bool = False
    """The Go suite skips TLS verification (reggie.WithInsecureSkipTLSVerify(true))."""
    extra_headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if "://" not in self.url:
            self.url = f"https://{self.url}"
        self.url = self.url.rstrip("/")

    @classmethod
    def from_object(cls, obj: Any, **overrides: Any) -> OciTarget:
        """A target from any object with `url`, `namespace`, `crossmount_namespace`,
        `username` and `password` attributes (or such a dict). Missing or None namespaces fall
        back to the defaults; `overrides` replace fields."""
        if isinstance(obj, OciTarget):
            return dataclasses.replace(obj, **overrides)

        def get(name: str) -> Any:
            if isinstance(obj, Mapping):
                return obj.get(name)
            return getattr(obj, name, None)

        url = get("url")
        if not url:
            raise ValueError(f"{obj!r} has no url")
        values: dict[str, Any] = {"url": str(url)}
        for name in ("namespace", "crossmount_namespace", "username", "password", "auth_scope"):
            value = get(name)
            if value is not None:
                values[name] = value
        values.update(overrides)
        return cls(**values)

    def client(self, **kwargs: Any) -> httpx.Client:
        """A new `httpx.Client` for this registry; the caller must close it."""
        headers = {"User-Agent": USER_AGENT, **self.extra_headers, **kwargs.pop("headers", {})}
        options: dict[str, Any] = {
            "base_url": self.url,
            "auth": RegistryAuth(self.username, self.password, self.auth_scope),
            "timeout": self.timeout,
            "follow_redirects": True,  # like resty/reggie: blob GETs may redirect to storage
            "verify": self.verify_tls,
            "headers": headers,
        }
        if self.debug:
            options["event_hooks"] = {"request": [_debug_request], "response": [_debug_response]}
        options.update(kwargs)
        return httpx.Client(**options)


# --------------------------------------------------------------------------- responses


def relative_location(response: httpx.Response) -> str:
    """Path and query of the Location header (reggie's GetRelativeLocation)."""
    location = response.headers.get("Location", "")
    if not location:
        return ""
    parts = urlsplit(location)
    path = parts.path
    if parts.query:
        path += "?" + parts.query
    return path


def absolute_location(response: httpx.Response) -> str:
    """The Location header resolved against the request URL ("" if absent)."""
    location = response.headers.get("Location", "")
    if not location:
        return ""
    return str(response.request.url.join(location))


def error_codes(response: httpx.Response) -> list[str] | None:
    """The `code`s of an OCI error body, or None if the body is not one."""
    try:
        body = response.json()
        return [str(e["code"]) for e in body["errors"]]
    except (ValueError, KeyError, TypeError):
        return None


def media_type(value: str | None) -> str:
    """A Content-Type value without parameters, lower-cased."""
    return (value or "").split(";", 1)[0].strip().lower()


_LINK_NEXT = re.compile(r'<([^>]*)>\s*;(?:[^,]*?)\brel\s*=\s*"?([^",;]*)"?')


def link_next(response: httpx.Response) -> str | None:
    """The target of the `Link: <...>; rel="next"` header, if any."""
    for value in response.headers.get_list("Link"):
        for m in _LINK_NEXT.finditer(value):
            if "next" in m.group(2).split():
                return m.group(1)
    return None


def describe(response: httpx.Response, limit: int = 400) -> str:
    """One line for assertion messages: request, status, interesting headers, body start."""
    request = response.request
    interesting = {
        k: v
        for k, v in response.headers.items()
        if k.lower() in {"location", "range", "content-type", "docker-content-digest", "oci-subject", "link"}
    }
    try:
        body = response.content[:limit]
    except httpx.ResponseNotRead:
        body = b"<not read>"
    return f"{request.method} {request.url} -> {response.status_code} {interesting} {body!r}"


# --------------------------------------------------------------------------- registry helper


class Registry:
    """Thin convenience layer over an `httpx.Client` bound to the target's namespaces.

    Every method returns the raw `httpx.Response`; nothing here asserts. `name` defaults to the
    target namespace. Paths starting with `/` or `http` are used as given.
    """

    def __init__(self, target: OciTarget, client: httpx.Client) -> None:
        self.target = target
        self.client = client
        self.name = target.namespace
        self.crossmount_name = target.crossmount_namespace

    # generic -----------------------------------------------------------------------------
    def request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str | int] | None = None,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
    ) -> httpx.Response:
        if params:
            # Append rather than pass `params=`: httpx would replace the query of an upload
            # Location (e.g. Distribution's `_state`), which must be kept byte for byte.
            url += ("&" if "?" in url else "?") + urlencode({k: str(v) for k, v in params.items()})
        return self.client.request(method, url, headers=headers, content=content)

    def path(self, kind: str, reference: str = "", name: str | None = None) -> str:
        return f"/v2/{name or self.name}/{kind}/{reference}"

    # blobs ---------------------------------------------------------------------------------
    def start_upload(
        self,
        name: str | None = None,
        *,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = b"",
    ) -> httpx.Response:
        """POST /v2/<name>/blobs/uploads/ (Content-Length: 0 unless content is given)."""
        return self.request(
            "POST", self.path("blobs", "uploads/", name), params=params, headers=headers,
            content=content,
        )  # fmt: skip

    def put_upload(
        self,
        location: str,
        digest: str,
        data: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """PUT <location>?digest=<digest> with `data` as body (the closing request)."""
        hdrs = {"Content-Type": OCTET_STREAM, **(headers or {})}
        return self.request("PUT", location, params={"digest": digest}, headers=hdrs, content=data)

    def patch_upload(self, location: str, data: bytes, content_range: str | None = None) -> httpx.Response:
        headers = {"Content-Type": OCTET_STREAM}
        if content_range is not None:
            headers["Content-Range"] = content_range
        return self.request("PATCH", location, headers=headers, content=data)

    def push_blob(self, digest: str, data: bytes, name: str | None = None) -> httpx.Response:
        """POST then PUT, as the Go suite's setup steps do; returns the PUT response (or the
        POST response when it gave no Location to PUT to)."""
        started = self.start_upload(name)
        location = relative_location(started)
        if not location:
            return started
        return self.put_upload(location, digest, data)

    def get_blob(
        self, digest: str, name: str | None = None, headers: Mapping[str, str] | None = None
    ) -> httpx.Response:
        return self.request("GET", self.path("blobs", digest, name), headers=headers)

    def head_blob(self, digest: str, name: str | None = None) -> httpx.Response:
        return self.request("HEAD", self.path("blobs", digest, name))

    def delete_blob(self, digest: str, name: str | None = None) -> httpx.Response:
        return self.request("DELETE", self.path("blobs", digest, name))

    # manifests -----------------------------------------------------------------------------
    def put_manifest(
        self,
        reference: str,
        data: bytes,
        content_type: str = OCI_MANIFEST,
        name: str | None = None,
    ) -> httpx.Response:
        return self.request(
            "PUT", self.path("manifests", reference, name), headers={"Content-Type": content_type},
            content=data,
        )  # fmt: skip

    def get_manifest(
        self, reference: str, accept: str | None = OCI_MANIFEST, name: str | None = None
    ) -> httpx.Response:
        headers = {"Accept": accept} if accept else None
        return self.request("GET", self.path("manifests", reference, name), headers=headers)

    def head_manifest(
        self, reference: str, accept: str | None = OCI_MANIFEST, name: str | None = None
    ) -> httpx.Response:
        headers = {"Accept": accept} if accept else None
        return self.request("HEAD", self.path("manifests", reference, name), headers=headers)

    def delete_manifest(self, reference: str, name: str | None = None) -> httpx.Response:
        return self.request("DELETE", self.path("manifests", reference, name))

    # discovery -----------------------------------------------------------------------------
    def list_tags(
        self, name: str | None = None, params: Mapping[str, str | int] | None = None
    ) -> httpx.Response:
        return self.request("GET", self.path("tags", "list", name), params=params)

    def referrers(
        self, digest: str, name: str | None = None, params: Mapping[str, str] | None = None
    ) -> httpx.Response:
        return self.request("GET", self.path("referrers", digest, name), params=params)

    def catalog(self, params: Mapping[str, str | int] | None = None) -> httpx.Response:
        return self.request("GET", "/v2/_catalog", params=params)


def tag_list(response: httpx.Response) -> list[str]:
    """The `tags` of a tags/list body ([] if unparsable; like the Go suite's getTagList)."""
    try:
        tags = response.json().get("tags")
    except (ValueError, AttributeError):
        return []
    return list(tags) if isinstance(tags, list) else []
