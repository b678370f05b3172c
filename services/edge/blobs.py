"""Blob endpoints: GET/HEAD (with Range) and DELETE of `/v2/<name>/blobs/<digest>`."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
from collections.abc import AsyncIterator

import structlog
from aiohttp import web
from redis.exceptions import RedisError

from services.edge import keys
from services.edge.context import target
from services.edge.sendfile import can_sendfile, cut_off, send_file
from shared.auth.access import Action
from shared.diskcache import DiskCache
from shared.metrics import BYTES_SERVED, REQUESTS
from shared.oci.digest import Digest
from shared.oci.errors import RegistryError
from shared.proxy.protocol import LEASE_TTL
from shared.registry.storage import StorageUnavailable
from shared.routing import Target

log = structlog.get_logger("edge")

_RANGE = re.compile(r"^bytes=([0-9]*)-([0-9]*)$")
# Any offset with more digits is past the end of every blob; int() of thousands of digits
# is refused by Python, so such numbers are never converted.
_MAX_DIGITS = 18


def _offset(text: str) -> int:
    digits = text.lstrip("0") or "0"
    return int(digits) if len(digits) <= _MAX_DIGITS else 10**_MAX_DIGITS


# How long a blob GET waits for the bucket to confirm a link this process saw recently
# before serving the disk tier's copy on that memory (a healthy bucket answers in ms).
LINK_PATIENCE_SECONDS = 0.5


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive byte range a `Range` header asks for, None for the whole blob."""
    if header is None:
        return None
    match = _RANGE.match(header.strip())
    if not match or (not match[1] and not match[2]):
        raise RegistryError(
            "RANGE_INVALID", f"unsupported Range {header[:100]!r}", headers=_unsatisfiable(size)
        )
    if not match[1]:  # suffix range: the last N bytes
        start, end = max(size - _offset(match[2]), 0), size - 1
    else:
        start = _offset(match[1])
        end = min(_offset(match[2]), size - 1) if match[2] else size - 1
    if start > end or start >= size:
        raise RegistryError(
            "RANGE_INVALID", f"range {header[:100]!r} is outside the blob", headers=_unsatisfiable(size)
        )
    return start, end


def _unsatisfiable(size: int) -> dict[str, str]:
    return {"Content-Range": f"bytes */{size}"}


async def _held_size(request: web.Request, repo: Target, digest: Digest) -> int | None:
    """The blob's size if this repository may serve it from storage."""
    app = request.app
    linked = await _linked_size(request, repo, digest)
    if linked is not None:
        return linked
    if repo.project.type != "proxy":
        return None
    # Claimed before the checks (an eviction may be deleting it: lifecycle/guard.py).
    await app[keys.REPOSITORIES].claim([digest], app[keys.BLOBS])
    if await app[keys.REPOSITORIES].project_holds(repo.project.name, digest):
        # A layer another image of this cache brought in (base layers are shared widely)
        # is a hit here too: it was verified when it was committed.
        size = await app[keys.BLOBS].size(digest)
        if size is not None:
            await app[keys.REPOSITORIES].link_blob(repo.name, digest, size)
        return size
    return None


async def _linked_size(request: web.Request, repo: Target, digest: Digest) -> int | None:
    """The size in the repository's link, as the bucket says.

    A stalled bucket must not stop a blob the disk tier holds: when this process saw the
    link recently and the bucket has not answered within LINK_PATIENCE_SECONDS (or has
    failed), the blob is served on that memory. The lookup goes on, and its answer
    replaces the memory, so a deleted link stops being served as soon as the bucket
    answers again.
    """
    repositories = request.app[keys.REPOSITORIES]
    remembered = repositories.remembered_size(repo.name, digest)
    cache = request.app.get(keys.DISK_CACHE)
    if remembered is None or cache is None:
        return await repositories.linked_size(repo.name, digest)
    lookup = asyncio.ensure_future(repositories.linked_size(repo.name, digest))
    lookup.add_done_callback(_retrieve)  # it may outlive this request
    done, _ = await asyncio.wait({lookup}, timeout=LINK_PATIENCE_SECONDS)
    if done and lookup.exception() is None:
        return lookup.result()
    if not cache.contains(digest):
        return await lookup
    reason = "no answer in time" if not done else str(lookup.exception())
    log.warning("link_unconfirmed", repository=repo.name, digest=str(digest), reason=reason)
    return remembered


def _retrieve(lookup: asyncio.Future[int | None]) -> None:
    """Take a finished lookup's error, so one nobody awaited is not reported as never retrieved."""
    if not lookup.cancelled():
        lookup.exception()


def _blob_headers(request: web.Request, digest: Digest, size: int) -> tuple[int, int, int, dict[str, str]]:
    """Status, offset, length and headers of a blob response, honouring `Range`."""
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
    return status, offset, length, headers


async def _send(
    request: web.Request,
    status: int,
    headers: dict[str, str],
    length: int,
    chunks: AsyncIterator[bytes],
    project: str,
) -> web.StreamResponse:
    """Stream a body; a failure after the headers went out can only cut the connection,
    which the client sees as a truncated (and therefore rejected) blob."""
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = length
    await response.prepare(request)
    try:
        async for chunk in chunks:
            await response.write(chunk)
            BYTES_SERVED.labels(project, "blob").inc(len(chunk))
    except (RegistryError, StorageUnavailable, RedisError) as exc:
        cut_off(request, "blob_stream_aborted", exc)
        return response
    await response.write_eof()
    return response


async def get_blob(request: web.Request) -> web.StreamResponse:
    repo = target(request, Action.PULL)
    digest = Digest.parse(request.match_info["digest"])
    size = await _held_size(request, repo, digest)
    if size is None:
        REQUESTS.labels(repo.project.name, "blob", "miss").inc()
        if repo.project.type == "proxy":
            return await _serve_fill(request, repo, digest)
        raise RegistryError("BLOB_UNKNOWN", detail={"digest": str(digest)})
    status, offset, length, headers = _blob_headers(request, digest, size)
    blobs = request.app[keys.BLOBS]
    cache = request.app.get(keys.DISK_CACHE)
    in_tier = cache is not None and cache.contains(digest)
    if not in_tier and await blobs.size(digest) is None:
        # Linked, but the stored copy is gone (quarantined after failing verification):
        # a proxy fetches it again, a hosted repository has lost it until it is pushed again.
        REQUESTS.labels(repo.project.name, "blob", "miss").inc()
        if repo.project.type == "proxy":
            return await _serve_fill(request, repo, digest)
        raise RegistryError("BLOB_UNKNOWN", detail={"digest": str(digest)})
    REQUESTS.labels(repo.project.name, "blob", "hit").inc()
    if request.method == "HEAD":
        return web.Response(status=status, headers=headers)
    if cache is not None and length and can_sendfile(request):
        sent = await _send_cached(request, cache, digest, size, status, headers, offset, length, repo)
        if sent is not None:
            return sent
    if not length:
        chunks = _nothing()
    elif length == size:
        # A whole blob is hashed on its way out: bytes that do not match are never completed.
        chunks = blobs.stream_verified(digest, size)
    else:
        chunks = blobs.stream(digest, offset, length)
    return await _send(request, status, headers, length, chunks, repo.project.name)


async def _send_cached(
    request: web.Request,
    cache: DiskCache,
    digest: Digest,
    size: int,
    status: int,
    headers: dict[str, str],
    offset: int,
    length: int,
    repo: Target,
) -> web.StreamResponse | None:
    """Send the blob from the local disk tier; None (and a background copy) if it is not there.

    Only where the bytes come from changes: the caller has already checked, as for any
    hit, that this repository may read the blob and how big it is.
    """
    blobs = request.app[keys.BLOBS]

    def copy_to_disk() -> None:
        cache.populate_later(digest, size, lambda: blobs.stream(digest), on_corrupt=quarantine)

    async def quarantine(reason: str) -> None:
        await blobs.quarantine(digest, "disk_tier", reason)

    path = cache.path(digest)
    if path is None:
        copy_to_disk()
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:  # evicted since the lookup
        copy_to_disk()
        return None
    try:
        if os.fstat(fd).st_size != size:
            log.warning("disk_cache_wrong_size", digest=str(digest), expected=size)
            cache.discard(digest)
            copy_to_disk()
            return None
        bytes_served = BYTES_SERVED.labels(repo.project.name, "blob")
        mode = request.app[keys.SETTINGS].disk_cache.sendfile
        zero_copy = mode if isinstance(mode, bool) else not _loopback_peer(request)
        return await send_file(
            request, status, headers, fd, offset, length, bytes_served.inc, zero_copy=zero_copy
        )
    finally:
        os.close(fd)


def _loopback_peer(request: web.Request) -> bool:
    """Whether the client connected over loopback (it runs on this host)."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if not peer:
        return False
    try:
        return ipaddress.ip_address(peer[0]).is_loopback
    except ValueError:  # a unix socket's path
        return True


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""


async def _serve_fill(request: web.Request, repo: Target, digest: Digest) -> web.StreamResponse:
    """A cache miss: ask the workers for the blob and stream the fill as it grows."""
    app = request.app
    redis, events, follower = app[keys.REDIS], app[keys.EVENTS], app[keys.FOLLOWER]
    # The fill may try each of the project's upstreams in turn: wait for all of them.
    settings = app[keys.SETTINGS]
    chain = [found for name in repo.project.upstreams if (found := settings.upstream(name))]
    connect = sum(upstream.connect_timeout.total_seconds() for upstream in chain) or 5.0
    read = sum(upstream.read_timeout.total_seconds() for upstream in chain) or 30.0

    async def rerequest() -> None:
        await events.want(redis, repo, digest)

    await rerequest()
    size = await follower.wait_for_size(repo.project.name, digest, rerequest, within=connect + read)
    status, offset, length, headers = _blob_headers(request, digest, size)
    headers["X-Seawall-Cache"] = "miss"
    if request.method == "HEAD":
        return web.Response(status=status, headers=headers)
    # A dead filler is noticed when its lease lapses, and a new fill then resumes it.
    stall = read + connect + LEASE_TTL
    chunks = follower.follow(
        repo.project.name, digest, offset, offset + length, size, rerequest, stall_timeout=stall
    )
    return await _send(request, status, headers, length, chunks, repo.project.name)


async def delete_blob(request: web.Request) -> web.Response:
    repo = target(request, Action.DELETE)
    digest = Digest.parse(request.match_info["digest"])
    if not await request.app[keys.REPOSITORIES].unlink_blob(repo.name, digest):
        raise RegistryError("BLOB_UNKNOWN", detail={"digest": str(digest)})
    return web.Response(status=202, headers={"Content-Length": "0"})
