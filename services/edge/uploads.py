"""Blob uploads: POST (monolithic, session start, mount), PATCH chunks, PUT to finish,
GET status and DELETE to cancel, under `/v2/<name>/blobs/uploads/`."""

from __future__ import annotations

import re

from aiohttp import web

from services.edge import keys
from services.edge.context import body_source, content_length, target
from shared.auth.access import Action
from shared.metrics import BYTES_RECEIVED
from shared.oci.digest import Digest
from shared.oci.errors import RegistryError
from shared.registry.repositories import project_of
from shared.registry.uploads import Upload

_CONTENT_RANGE = re.compile(r"^(?:bytes )?([0-9]{1,19})-([0-9]{1,19})(?:/[0-9]{1,19}|/\*)?$")


def _upload_headers(name: str, upload: Upload) -> dict[str, str]:
    # Range is inclusive; an empty upload is reported as 0-0, as Distribution does.
    end = max(upload.offset - 1, 0)
    return {
        "Location": f"/v2/{name}/blobs/uploads/{upload.id}",
        "Range": f"0-{end}",
        "Docker-Upload-UUID": upload.id,
        "Content-Length": "0",
    }


def _created(name: str, digest: Digest) -> web.Response:
    return web.Response(
        status=201,
        headers={
            "Location": f"/v2/{name}/blobs/{digest}",
            "Docker-Content-Digest": str(digest),
            "Content-Length": "0",
        },
    )


def _request_name(request: web.Request) -> str:
    return request.match_info["name"]


async def start_upload(request: web.Request) -> web.Response:
    repo = target(request, Action.PUSH)
    app = request.app
    name = _request_name(request)
    mount = request.query.get("mount")
    if mount is not None:
        digest = Digest.parse(mount)
        if await _mount(request, repo.name, digest, request.query.get("from")):
            return _created(name, digest)

    monolithic = request.query.get("digest")
    if monolithic is not None:
        digest = Digest.parse(monolithic)
        length = content_length(request)
        # Claimed before `commit` decides whether the blob is stored already (lifecycle/guard.py).
        await app[keys.REPOSITORIES].claim([digest], app[keys.BLOBS])
        size = await app[keys.BLOBS].commit(digest, body_source(request), length)
        await app[keys.REPOSITORIES].link_blob(repo.name, digest, size)
        BYTES_RECEIVED.labels(repo.project.name).inc(size)
        return _created(name, digest)

    upload = await app[keys.UPLOADS].start(repo.name)
    return web.Response(status=202, headers=_upload_headers(name, upload))


async def _mount(request: web.Request, name: str, digest: Digest, source: str | None) -> bool:
    """Link a blob another repository holds, if the caller may read it there.

    With no `from`, a blob that any repository of the same project holds is mounted
    (the spec's automatic mount): blobs are stored once per digest, so this costs one
    small link object. Other projects' blobs are never mounted without `from`.
    """
    app = request.app
    repositories = app[keys.REPOSITORIES]
    # Claimed before the checks that find the blob held (lifecycle/guard.py).
    await repositories.claim([digest], app[keys.BLOBS])
    if source is None and not await repositories.project_holds(project_of(name), digest):
        return False
    if source is not None:
        try:
            origin = target(request, Action.PULL, name=source)
        except RegistryError:
            return False
        if not await repositories.blob_linked(origin.name, digest):
            return False
    # The stored copy is shared with this repository only once its bytes are known sound.
    blobs = app[keys.BLOBS]
    size = await blobs.size(digest)
    if size is None or not await blobs.held_soundly(digest):
        return False
    await repositories.link_blob(name, digest, size)
    return True


async def upload_status(request: web.Request) -> web.Response:
    repo = target(request, Action.PUSH)
    upload = await request.app[keys.UPLOADS].get(repo.name, request.match_info["upload"])
    return web.Response(status=204, headers=_upload_headers(_request_name(request), upload))


def _chunk_range(request: web.Request, length: int | None) -> tuple[int | None, int | None]:
    """The start offset a PATCH/PUT declares in Content-Range, and the length its body must
    have: Content-Length, else the range's own (a chunked body declares no other, and a
    short or long chunk must not be stored as the range it claims to be)."""
    header = request.headers.get("Content-Range")
    if header is None:
        return None, length
    match = _CONTENT_RANGE.match(header.strip())
    if not match:
        raise RegistryError("BLOB_UPLOAD_INVALID", f"malformed Content-Range {header[:100]!r}", status=416)
    start, end = int(match[1]), int(match[2])
    if end < start or (length is not None and end - start + 1 != length):
        raise RegistryError(
            "BLOB_UPLOAD_INVALID",
            f"Content-Range {header[:100]!r} does not match the body length",
            status=416,
        )
    return start, end - start + 1


async def upload_chunk(request: web.Request) -> web.Response:
    repo = target(request, Action.PUSH)
    uploads = request.app[keys.UPLOADS]
    upload = await uploads.get(repo.name, request.match_info["upload"])
    length = content_length(request)
    start, expected = _chunk_range(request, length)
    upload = await uploads.append(upload, body_source(request), expected, start)
    BYTES_RECEIVED.labels(repo.project.name).inc(length or 0)
    return web.Response(status=202, headers=_upload_headers(_request_name(request), upload))


async def finish_upload(request: web.Request) -> web.Response:
    repo = target(request, Action.PUSH)
    app = request.app
    uploads = app[keys.UPLOADS]
    upload = await uploads.get(repo.name, request.match_info["upload"])
    if "digest" not in request.query:
        raise RegistryError("DIGEST_INVALID", "the digest query parameter is required")
    digest = Digest.parse(request.query["digest"])
    length = content_length(request)
    if length or request.headers.get("Transfer-Encoding", "").lower() == "chunked":
        start, expected = _chunk_range(request, length)
        upload = await uploads.append(upload, body_source(request), expected, start)
    # Claimed before `finish` decides whether the blob is stored already (lifecycle/guard.py).
    await app[keys.REPOSITORIES].claim([digest], app[keys.BLOBS])
    repositories = app[keys.REPOSITORIES]
    await uploads.finish(upload, digest, then=lambda size: repositories.link_blob(repo.name, digest, size))
    return _created(_request_name(request), digest)


async def cancel_upload(request: web.Request) -> web.Response:
    repo = target(request, Action.PUSH)
    uploads = request.app[keys.UPLOADS]
    upload = await uploads.get(repo.name, request.match_info["upload"])
    await uploads.cancel(upload)
    return web.Response(status=204, headers={"Content-Length": "0"})
