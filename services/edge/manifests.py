"""Manifest endpoints: GET/HEAD/PUT/DELETE of `/v2/<name>/manifests/<reference>`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from typing import Any

from aiohttp import web

from services.edge import keys
from services.edge.context import body_source, content_length, target
from services.edge.onpush import tag_pushed
from shared.auth.access import Action
from shared.lifecycle.pulls import PullRecorder
from shared.metrics import BYTES_SERVED, REQUESTS
from shared.oci.digest import Digest
from shared.oci.errors import RegistryError
from shared.oci.manifest import Manifest, parse_manifest
from shared.oci.reference import is_valid_tag, validate_tag
from shared.proxy.manifests import HIT, STALE
from shared.registry.blobs import BlobStore
from shared.registry.repositories import RepositoryStore, Revision
from shared.routing import Target

# Counter children per (project, result) and per project: found without prometheus_client's
# label lookup and lock on every GET; bounded by the projects.
_REQUESTS: dict[tuple[str, str], Any] = {}
_BYTES: dict[str, Any] = {}


def _count(project: str, result: str, served: int | None) -> None:
    """One manifest request by result; with `served`, the bytes of a GET's body."""
    requests = _REQUESTS.get((project, result))
    if requests is None:
        requests = _REQUESTS[(project, result)] = REQUESTS.labels(project, "manifest", result)
    requests.inc()
    if served is not None:
        counter = _BYTES.get(project)
        if counter is None:
            counter = _BYTES[project] = BYTES_SERVED.labels(project, "manifest")
        counter.inc(served)


def manifest_response(
    request: web.Request, revision: Revision, body: bytes, extra: dict[str, str] | None = None
) -> web.Response:
    headers = {
        "Docker-Content-Digest": str(revision.digest),
        "Content-Type": revision.media_type,
        "ETag": f'"{revision.digest}"',
        **(extra or {}),
    }
    if request.method == "HEAD":
        headers["Content-Length"] = str(len(body))
        return web.Response(status=200, headers=headers)
    return web.Response(status=200, body=body, headers=headers)


async def find_revision(repositories: RepositoryStore, repo: Target, reference: str) -> Revision | None:
    if Digest.is_digest(reference):
        return await repositories.revision(repo.name, Digest.parse(reference))
    if not is_valid_tag(reference):
        # A name that cannot be a tag cannot be tagged either: unknown, not malformed.
        return None
    digest = await repositories.resolve_tag(repo.name, reference)
    return await repositories.revision(repo.name, digest) if digest else None


async def get_manifest(request: web.Request) -> web.Response:
    repo = target(request, Action.PULL)
    reference = request.match_info["reference"]
    app = request.app
    if repo.project.type == "proxy":
        return await _get_cached_manifest(request, repo, reference)
    revision = await find_revision(app[keys.REPOSITORIES], repo, reference)
    if revision is None:
        _count(repo.project.name, "miss", None)
        raise RegistryError("MANIFEST_UNKNOWN", detail={"reference": reference[:200]})
    body = await app[keys.BLOBS].read(revision.digest)
    _answered(request, repo, revision, reference, HIT, body)
    return manifest_response(request, revision, body)


def _answered(
    request: web.Request, repo: Target, revision: Revision, reference: str, result: str, body: bytes
) -> None:
    """Count the answer and note the pull. A hit may be repeated as it is for a moment
    (services/edge/hot.py), and each repeat does the same again."""
    tag = None if Digest.is_digest(reference) else reference
    served = len(body) if request.method == "GET" else None
    effects: Callable[[], None] = partial(
        _served, request.app[keys.PULLS], repo.project.name, repo.name, revision.digest, tag, result, served
    )
    effects()
    if result == HIT:
        request[keys.REPEAT] = effects


def _served(
    pulls: PullRecorder,
    project: str,
    name: str,
    digest: Digest,
    tag: str | None,
    result: str,
    served: int | None,
) -> None:
    """Remember the pull for eviction and retention (in memory; flushed every few seconds),
    and count it. A HEAD counts too: containerd resolves a tag with HEAD, then GETs by digest."""
    pulls.pulled(name, digest, tag)
    _count(project, result, served)


async def _get_cached_manifest(request: web.Request, repo: Target, reference: str) -> web.Response:
    try:
        cached = await request.app[keys.MANIFEST_CACHE].get(repo, reference)
    except RegistryError:
        _count(repo.project.name, "error", None)
        raise
    _answered(request, repo, cached.revision, reference, cached.result, cached.body)
    extra = {"X-Seawall-Cache": cached.result}
    if cached.result == STALE:
        # RFC 9111's stale warning, which HTTP tooling shows; the upstream could not be asked.
        extra["Warning"] = '110 seawall "Response is Stale"'
    return manifest_response(request, cached.revision, cached.body, extra)


async def _read_manifest_body(request: web.Request, limit: int) -> bytes:
    declared = content_length(request)
    if declared is not None and declared > limit:
        raise RegistryError("MANIFEST_TOO_LARGE", f"manifests are limited to {limit} bytes")
    # Read through body_source: a client that hangs up mid-body is SIZE_INVALID, not a 500.
    read = body_source(request)
    body = await read(limit + 1)
    while len(body) <= limit:
        more = await read(limit + 1 - len(body))
        if not more:
            break
        body += more
    if len(body) > limit:
        raise RegistryError("MANIFEST_TOO_LARGE", f"manifests are limited to {limit} bytes")
    if declared is not None and len(body) != declared:
        raise RegistryError("SIZE_INVALID", f"received {len(body)} bytes, Content-Length said {declared}")
    return body


async def _check_references(repositories: RepositoryStore, name: str, manifest: Manifest) -> None:
    """Every blob and child manifest must already be in the repository, with the size the
    descriptor gives (a client trusts that size when it pulls); the subject need not."""
    blobs = manifest.blobs
    children = manifest.manifests
    found = await asyncio.gather(
        *(repositories.linked_size(name, b.digest) for b in blobs),
        *(repositories.revision(name, c.digest) for c in children),
    )
    sizes = [f if isinstance(f, int) or f is None else f.size for f in found]
    for descriptor, size in zip([*blobs, *children], sizes, strict=True):
        if size is None:
            raise RegistryError(
                "MANIFEST_BLOB_UNKNOWN",
                f"{descriptor.digest} is not in repository {name}",
                detail={"digest": str(descriptor.digest)},
            )
        if size != descriptor.size:
            raise RegistryError(
                "MANIFEST_INVALID",
                f"the descriptor of {descriptor.digest} gives size {descriptor.size}, the content has {size}",
                detail={"digest": str(descriptor.digest)},
            )


async def _check_stored(blobs: BlobStore, name: str, digests: list[Digest]) -> None:
    """A link can outlive its blob for a while (a collection deletes the blob first, the
    link after it): what the manifest names must be stored, not only linked."""
    sizes = await asyncio.gather(*(blobs.size(digest) for digest in digests))
    for digest, size in zip(digests, sizes, strict=True):
        if size is None:
            raise RegistryError(
                "MANIFEST_BLOB_UNKNOWN",
                f"{digest} is not in repository {name}",
                detail={"digest": str(digest)},
            )


async def put_manifest(request: web.Request) -> web.Response:
    repo = target(request, Action.PUSH)
    app = request.app
    reference = request.match_info["reference"]
    body = await _read_manifest_body(request, app[keys.SETTINGS].max_manifest_bytes)
    if Digest.is_digest(reference):
        digest = Digest.parse(reference)
        tag = None
        if Digest.of(body, digest.algorithm) != digest:
            raise RegistryError("DIGEST_INVALID", "manifest body does not hash to the digest in the URL")
    else:
        tag = validate_tag(reference)
        digest = Digest.of(body)
    manifest = parse_manifest(body, request.headers.get("Content-Type"))
    repositories, blobs = app[keys.REPOSITORIES], app[keys.BLOBS]
    # Claimed before the checks: a collection running now either keeps what this manifest
    # names or has deleted it, and then the checks below find it gone (lifecycle/guard.py).
    named = [*(d.digest for d in manifest.blobs), *(d.digest for d in manifest.manifests)]
    await repositories.claim([digest, *named], blobs)
    await _check_references(repositories, repo.name, manifest)
    await _check_stored(blobs, repo.name, named)
    if repositories.ledger is not None:
        # Refused over the quota before anything of the manifest is stored.
        await repositories.ledger.admit(repo.name, digest, manifest)

    await blobs.commit_bytes(digest, body)
    await repositories.add_revision(repo.name, digest, manifest)
    if tag is not None:
        await repositories.set_tag(repo.name, tag, digest)
        await tag_pushed(app, repo, tag)
    headers = {
        "Location": f"/v2/{request.match_info['name']}/manifests/{digest}",
        "Docker-Content-Digest": str(digest),
        "Content-Length": "0",
    }
    if manifest.subject is not None:
        headers["OCI-Subject"] = str(manifest.subject.digest)
    return web.Response(status=201, headers=headers)


async def delete_manifest(request: web.Request) -> web.Response:
    repo = target(request, Action.DELETE)
    reference = request.match_info["reference"]
    repositories = request.app[keys.REPOSITORIES]
    if Digest.is_digest(reference):
        revision = await repositories.revision(repo.name, Digest.parse(reference))
        if revision is None:
            raise RegistryError("MANIFEST_UNKNOWN", detail={"reference": reference[:200]})
        await repositories.delete_revision(repo.name, revision)
    elif not await repositories.delete_tag(repo.name, validate_tag(reference)):
        raise RegistryError("MANIFEST_UNKNOWN", detail={"reference": reference[:200]})
    return web.Response(status=202, headers={"Content-Length": "0"})
