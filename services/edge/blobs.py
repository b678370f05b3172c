"""Blob endpoints: GET/HEAD (with Range) and DELETE of `/v2/<name>/blobs/<digest>`."""

from __future__ import annotations

import re

from aiohttp import web

from services.edge import keys
from services.edge.context import target
from shared.access import Action
from shared.metrics import BYTES_SERVED, REQUESTS
from shared.oci.digest import Digest
from shared.oci.errors import RegistryError

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive byte range a `Range` header asks for, None for the whole blob."""
    if header is None:
        return None
    match = _RANGE.match(header.strip())
    if not match or (not match[1] and not match[2]):
        raise RegistryError("RANGE_INVALID", f"unsupported Range {header[:100]!r}", headers=_unsatisfiable(size))
    if not match[1]:  # suffix range: the last N bytes
        start, end = max(size - int(match[2]), 0), size - 1
    else:
        start = int(match[1])
        end = min(int(match[2]), size - 1) if match[2] else size - 1
    if start > end or start >= size:
        raise RegistryError("RANGE_INVALID", f"range {header[:100]!r} is outside the blob", headers=_unsatisfiable(size))
    return start, end


def _unsatisfiable(size: int) -> dict[str, str]:
    return {"Content-Range": f"bytes */{size}"}


async def get_blob(request: web.Request) -> web.StreamResponse:
    repo = target(request, Action.PULL)
    digest = Digest.parse(request.match_info["digest"])
    app = request.app
    size = None
    if await app[keys.REPOSITORIES].blob_linked(repo.name, digest):
        size = await app[keys.BLOBS].size(digest)
    if size is None:
        REQUESTS.labels(repo.project.name, "blob", "miss").inc()
        raise RegistryError("BLOB_UNKNOWN", detail={"digest": str(digest)})
    REQUESTS.labels(repo.project.name, "blob", "hit").inc()

    headers = {
        "Docker-Content-Digest": str(digest),
        "Accept-Ranges": "bytes",
        "Content-Type": "application/octet-stream",
        "ETag": f'"{digest}"',
        "Cache-Control": "max-age=31536000",
    }
    byte_range = parse_range(request.headers.get("Range"), size)
    status, offset, length = 200, 0, size
    if byte_range is not None:
        status, offset, length = 206, byte_range[0], byte_range[1] - byte_range[0] + 1
        headers["Content-Range"] = f"bytes {byte_range[0]}-{byte_range[1]}/{size}"
    headers["Content-Length"] = str(length)
    if request.method == "HEAD":
        return web.Response(status=status, headers=headers)

    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = length
    await response.prepare(request)
    if length:
        async for chunk in app[keys.BLOBS].stream(digest, offset, length):
            await response.write(chunk)
            BYTES_SERVED.labels(repo.project.name, "blob").inc(len(chunk))
    await response.write_eof()
    return response


async def delete_blob(request: web.Request) -> web.Response:
    repo = target(request, Action.DELETE)
    digest = Digest.parse(request.match_info["digest"])
    if not await request.app[keys.REPOSITORIES].unlink_blob(repo.name, digest):
        raise RegistryError("BLOB_UNKNOWN", detail={"digest": str(digest)})
    return web.Response(status=202, headers={"Content-Length": "0"})
